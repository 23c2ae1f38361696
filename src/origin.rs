//! Origins: the `BZPUSH_ALLOWED_ORIGINS` entries and a handshake's `Origin`
//! header, both in the form browsers serialise an origin, and the log line
//! for a refused one.
//!
//! A browser sends `Origin: https://bugzilla.example.org`: scheme and host
//! in lower case, no default port, no path, no trailing `/`. An entry
//! written as Bugzilla's `urlbase` (`https://Bugzilla.Example.org/`) would
//! never equal it, and every browser would be refused while `check` passed;
//! so entries are normalised the same way at start, and one that cannot be
//! an origin (a path, a query, a user) stops bzpush naming the setting.
//! Refusals are logged once per origin a minute, in bounded memory: a
//! flood of made-up origins costs neither memory nor log lines.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use log::warn;
use url::Url;

/// The origin sandboxed frames and `file:` pages send.
pub const NULL: &str = "null";
/// A refused origin is logged again after this long.
const LOG_EVERY: Duration = Duration::from_secs(60);
/// Origins remembered for [`LOG_EVERY`]; beyond this, one line a minute
/// says that more were refused.
const MAX_REMEMBERED: usize = 1024;
/// A logged origin is cut to this many characters: it is the client's text.
const MAX_SHOWN: usize = 200;

/// `value` as a browser serialises an origin: `scheme://host[:port]`, scheme
/// and host in lower case, the scheme's default port dropped, a trailing
/// `/` dropped. `null` stays `null`. The error says what is wrong.
pub fn normalize(value: &str) -> Result<String, String> {
    const SHAPE: &str = "an origin is SCHEME://HOST[:PORT], e.g. https://bugzilla.example.org";
    if value == NULL {
        return Ok(NULL.to_string());
    }
    // The url crate would also take `https:host` and an IDN, which no
    // browser sends.
    if !value.contains("://") {
        return Err(SHAPE.into());
    }
    if !value.is_ascii() {
        return Err("write the host in its ASCII (xn--) form, as browsers send it".into());
    }
    let url = Url::parse(value).map_err(|e| format!("{e}: {SHAPE}"))?;
    if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
        return Err("an origin has no path, query or fragment: SCHEME://HOST[:PORT] only".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("an origin has no user or password: SCHEME://HOST[:PORT] only".into());
    }
    let Some(host) = url.host_str().filter(|h| !h.is_empty()) else {
        return Err("the origin names no host".into());
    };
    // The url crate leaves the host of a scheme it does not know (an
    // extension's) as written, and drops the default port of those it does.
    let host = host.to_ascii_lowercase();
    Ok(match url.port() {
        Some(port) => format!("{}://{host}:{port}", url.scheme()),
        None => format!("{}://{host}", url.scheme()),
    })
}

/// Whether a handshake whose `Origin` header says `origin` may connect:
/// it normalises to one of `allowed` (normalised entries).
pub fn is_allowed(allowed: &[String], origin: &str) -> bool {
    normalize(origin).is_ok_and(|origin| allowed.contains(&origin))
}

/// Logs refused origins, each at most once per [`LOG_EVERY`].
#[derive(Default)]
pub struct Refusals {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// When each origin was last logged.
    logged: HashMap<String, Instant>,
    /// When "more were refused" was last logged.
    overflow: Option<Instant>,
}

impl Refusals {
    /// Notes that a handshake from `origin` was refused; logs it unless it
    /// was logged within the last minute.
    pub fn refused(&self, origin: &str) {
        let shown: String = origin.chars().take(MAX_SHOWN).collect();
        let now = Instant::now();
        let recent = |at: &Instant| now.duration_since(*at) < LOG_EVERY;
        // A log limiter poisoned by a panic elsewhere still limits.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.logged.get(&shown).is_some_and(recent) {
            return;
        }
        if state.logged.len() >= MAX_REMEMBERED {
            state.logged.retain(|_, at| recent(at));
        }
        if state.logged.len() >= MAX_REMEMBERED {
            if !state.overflow.as_ref().is_some_and(recent) {
                state.overflow = Some(now);
                warn!(
                    "refused WebSocket handshakes from more than {MAX_REMEMBERED} origins within \
                     a minute; not logging each (BZPUSH_ALLOWED_ORIGINS)"
                );
            }
            return;
        }
        warn!(
            "refused a WebSocket handshake from origin {shown:?}: not in BZPUSH_ALLOWED_ORIGINS \
             (logged once a minute per origin)"
        );
        state.logged.insert(shown, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_normalised_as_browsers_send_them() {
        for (written, serialised) in [
            (
                "https://bugzilla.example.org/",
                "https://bugzilla.example.org",
            ),
            (
                "https://Bugzilla.Example.org",
                "https://bugzilla.example.org",
            ),
            (
                "HTTPS://BUGZILLA.EXAMPLE.ORG:443/",
                "https://bugzilla.example.org",
            ),
            ("http://example.org:80", "http://example.org"),
            ("http://example.org:8080", "http://example.org:8080"),
            ("https://example.org:80", "https://example.org:80"),
            ("http://[::1]:8844", "http://[::1]:8844"),
            ("http://[::1]", "http://[::1]"),
            ("http://127.0.0.1:443/", "http://127.0.0.1:443"),
            ("moz-extension://ABC", "moz-extension://abc"),
            ("null", "null"),
        ] {
            assert_eq!(normalize(written).as_deref(), Ok(serialised), "{written}");
        }
        for bad in [
            "bugzilla.example.org",
            "https://bugzilla.example.org/bugzilla/",
            "https://bugzilla.example.org/?x=1",
            "https://bugzilla.example.org#top",
            "https://user@bugzilla.example.org",
            "https://",
            "https://example.org:http",
            "https://example.org:70000",
            "https://bücher.example",
            "1http://example.org",
            "Null",
            "https://exa mple.org",
        ] {
            assert!(normalize(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn a_request_origin_matches_in_any_case() {
        let allowed = vec!["https://bugzilla.example.org".to_string()];
        assert!(is_allowed(&allowed, "https://bugzilla.example.org"));
        assert!(is_allowed(&allowed, "https://BUGZILLA.example.org:443"));
        assert!(!is_allowed(&allowed, "http://bugzilla.example.org"));
        assert!(!is_allowed(&allowed, "https://bugzilla.example.org.evil"));
        assert!(!is_allowed(&allowed, "null"));
        assert!(!is_allowed(&allowed, ""));
    }

    #[test]
    fn refusals_are_remembered_in_bounded_memory() {
        let refusals = Refusals::default();
        for n in 0..3 * MAX_REMEMBERED {
            refusals.refused(&format!("https://{n}.example"));
        }
        let state = refusals.state.lock().expect("not poisoned");
        assert_eq!(state.logged.len(), MAX_REMEMBERED);
        assert!(state.overflow.is_some());
    }
}
