//! Validators: one setting's text to a typed value, or an error naming the
//! setting, what was wrong and what it takes.
//!
//! Each takes `(setting, value)` as [`super::resolve`] reads them and
//! nothing else: no environment, no file, no clock (what the machine says,
//! such as its host name, is passed in). URLs, which may hold a password,
//! are [`super::url`]'s.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use log::LevelFilter;

use super::settings::{Range, Setting};
use super::url::AmqpNodes;
use super::{ConfigError, Feed, QueueType, Source};
use crate::address::TrustedProxies;
use crate::origin;

/// MariaDB and MySQL refuse lock names longer than this.
pub(super) const MAX_LOCK_NAME: usize = 64;
/// AMQP short strings (exchange names) are at most this many bytes.
pub(super) const MAX_EXCHANGE_NAME: usize = 255;

/// A setting as a resolver reads it: its row, and its value (given, or
/// the default).
pub(super) type Value<'a> = (&'static Setting, &'a str);

/// `250ms`, `2s`, `5m`, `24h`: a whole number and a unit, more than zero.
pub fn parse_duration(value: &str) -> Option<Duration> {
    let digits = value.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = value.split_at(digits);
    let number: u64 = number.parse().ok()?;
    let duration = match unit {
        "ms" => Duration::from_millis(number),
        "s" => Duration::from_secs(number),
        "m" => Duration::from_secs(number.checked_mul(60)?),
        "h" => Duration::from_secs(number.checked_mul(3600)?),
        _ => return None,
    };
    (!duration.is_zero()).then_some(duration)
}

/// A duration in the largest unit [`parse_duration`] reads back exactly.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        _ if ms.is_multiple_of(3_600_000) => format!("{}h", ms / 3_600_000),
        _ if ms.is_multiple_of(60_000) => format!("{}m", ms / 60_000),
        _ if ms.is_multiple_of(1000) => format!("{}s", ms / 1000),
        _ => format!("{ms}ms"),
    }
}

pub(super) fn duration((setting, value): Value) -> Result<Duration, ConfigError> {
    let parsed = parse_duration(value).ok_or_else(|| {
        ConfigError::setting(setting, value, "expected a duration like 250ms or 2s")
    })?;
    match setting.range {
        Range::Duration(min, max) if !(min..=max).contains(&parsed) => Err(ConfigError::setting(
            setting,
            value,
            &format!("expected {}", setting.range.describe().unwrap_or_default()),
        )),
        _ => Ok(parsed),
    }
}

/// An AMQP heartbeat: whole seconds, as the protocol counts them.
pub(super) fn heartbeat((setting, value): Value) -> Result<u16, ConfigError> {
    parse_duration(value)
        .filter(|d| d.subsec_millis() == 0)
        .and_then(|d| u16::try_from(d.as_secs()).ok())
        .ok_or_else(|| ConfigError::setting(setting, value, "expected whole seconds, 1s to 65535s"))
}

pub(super) fn number((setting, value): Value) -> Result<usize, ConfigError> {
    let (min, max, unit) = match setting.range {
        Range::Count { min, max, unit } => (min, max, unit),
        _ => (0, u64::MAX, "units"),
    };
    value
        .parse::<u64>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| {
            ConfigError::setting(
                setting,
                value,
                &format!("expected a number of {unit} from {min} to {max}"),
            )
        })
}

pub(super) fn text((setting, value): Value, max_len: usize) -> Result<String, ConfigError> {
    if value.is_empty() || value.len() > max_len {
        return Err(ConfigError::setting(
            setting,
            value,
            &format!("expected 1 to {max_len} characters"),
        ));
    }
    Ok(value.to_string())
}

pub(super) fn log_level((setting, value): Value) -> Result<LevelFilter, ConfigError> {
    match value {
        "error" => Ok(LevelFilter::Error),
        "warn" => Ok(LevelFilter::Warn),
        "info" => Ok(LevelFilter::Info),
        "debug" => Ok(LevelFilter::Debug),
        "trace" => Ok(LevelFilter::Trace),
        _ => Err(ConfigError::setting(
            setting,
            value,
            "expected error, warn, info, debug or trace",
        )),
    }
}

pub(super) fn source((setting, value): Value) -> Result<Source, ConfigError> {
    match value {
        "push_notify" => Ok(Source::PushNotify),
        "bugs" => Ok(Source::Bugs),
        _ => Err(ConfigError::setting(
            setting,
            value,
            "expected push_notify or bugs",
        )),
    }
}

pub(super) fn queue_type((setting, value): Value) -> Result<QueueType, ConfigError> {
    match value {
        "quorum" => Ok(QueueType::Quorum),
        "classic" => Ok(QueueType::Classic),
        _ => Err(ConfigError::setting(
            setting,
            value,
            "expected quorum or classic",
        )),
    }
}

pub(super) fn socket_addr((setting, value): Value) -> Result<SocketAddr, ConfigError> {
    value
        .parse()
        .map_err(|_| ConfigError::setting(setting, value, "expected IP:PORT, e.g. 127.0.0.1:8844"))
}

/// The default is systemd's `$STATE_DIRECTORY` (`systemd`), or none
/// outside systemd; `off` is none whatever systemd says.
pub(super) fn state_directory(
    (setting, value): Value,
    systemd: Option<PathBuf>,
) -> Result<Option<PathBuf>, ConfigError> {
    if value == setting.default {
        return Ok(systemd);
    }
    if value == "off" {
        return Ok(None);
    }
    let path = PathBuf::from(value);
    if !path.is_absolute() {
        return Err(ConfigError::setting(
            setting,
            value,
            "expected an absolute path, or off",
        ));
    }
    Ok(Some(path))
}

/// The poller lock's name. `GET_LOCK` names are server-wide, so the default
/// names the database `db`: pollers of one database exclude each other,
/// pollers of two databases on one server never do.
pub(super) fn lock_name(value: Value, db: &str) -> Result<String, ConfigError> {
    if value.1 != value.0.default {
        return text(value, MAX_LOCK_NAME);
    }
    Ok(default_lock_name(db))
}

/// `bzpush.poller.<db>`. A database name that does not fit MySQL's 64
/// characters, or that has upper-case letters (MySQL compares lock names
/// case-blind, MariaDB does not), is cut and followed by a hash of the whole
/// name: stable across hosts and versions (FNV-1a, not std's hasher, which
/// may change), so every poller of the database agrees.
fn default_lock_name(db: &str) -> String {
    const PREFIX: &str = "bzpush.poller.";
    let exact = format!("{PREFIX}{db}");
    if exact.chars().count() <= MAX_LOCK_NAME && db.to_lowercase() == db {
        return exact;
    }
    // `.` and 16 hex digits after the cut part.
    let keep = MAX_LOCK_NAME - PREFIX.len() - 17;
    let cut: String = db.to_lowercase().chars().take(keep).collect();
    let hash = db.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{PREFIX}{cut}.{hash:016x}")
}

/// The prefix of serve's queue names; the default names the broker user
/// and this machine (`hostname`).
pub(super) fn queue_prefix(
    value: Value,
    amqp: &AmqpNodes,
    hostname: &str,
) -> Result<String, ConfigError> {
    if value.1 != value.0.default {
        return text(value, MAX_EXCHANGE_NAME - 64);
    }
    Ok(format!("queue/{}/bzpush-{hostname}", amqp.user()))
}

pub(super) fn feeds((setting, value): Value) -> Result<Vec<Feed>, ConfigError> {
    let expected = "expected PATH=EXCHANGE[,PATH=EXCHANGE…], e.g. /=exchange/bugzilla/simple";
    let mut feeds: Vec<Feed> = Vec::new();
    for part in value.split(',').map(str::trim) {
        let Some((path, exchange)) = part.split_once('=') else {
            return Err(ConfigError::setting(setting, value, expected));
        };
        let path = feed_path(path.trim())
            .ok_or_else(|| ConfigError::setting(setting, value, "each PATH must start with /"))?;
        let exchange = exchange.trim();
        if exchange.is_empty() || exchange.len() > MAX_EXCHANGE_NAME {
            return Err(ConfigError::setting(setting, value, expected));
        }
        if feeds.iter().any(|f| f.path == path) {
            return Err(ConfigError::setting(
                setting,
                value,
                "each PATH may appear once",
            ));
        }
        feeds.push(Feed {
            path,
            exchange: exchange.to_string(),
        });
    }
    Ok(feeds)
}

/// A request path as a feed path: `/dev` and `/dev/` are the same feed.
/// `None` unless it starts with `/`. The query string is not part of it.
pub fn feed_path(path: &str) -> Option<String> {
    let path = path.split('?').next().unwrap_or_default();
    if !path.starts_with('/') {
        return None;
    }
    Some(if path.ends_with('/') {
        path.to_string()
    } else {
        format!("{path}/")
    })
}

/// `*` alone: any origin (`None`). Otherwise each entry as browsers
/// serialise an origin ([`origin::normalize`]), `null` included only if
/// listed: a start-up error beats a server that refuses every browser.
pub(super) fn origins((setting, value): Value) -> Result<Option<Vec<String>>, ConfigError> {
    let entries: Vec<&str> = value
        .split(',')
        .map(str::trim)
        .filter(|o| !o.is_empty())
        .collect();
    match entries[..] {
        [] => Err(ConfigError::setting(
            setting,
            value,
            "expected * or comma-separated origins like https://bugzilla.example.org",
        )),
        ["*"] => Ok(None),
        _ if entries.contains(&"*") => Err(ConfigError::setting(
            setting,
            value,
            "* allows every origin: give it alone, or list the origins without it",
        )),
        _ => entries
            .iter()
            .map(|entry| {
                origin::normalize(entry).map_err(|why| {
                    ConfigError::setting(setting, value, &format!("{entry:?}: {why}"))
                })
            })
            .collect::<Result<Vec<String>, ConfigError>>()
            .map(Some),
    }
}

/// `off`, or an http(s) address without quotes or spaces: it goes into the
/// page's HTML (escaped as well) and into links.
pub(super) fn bugzilla_url((setting, value): Value) -> Result<Option<String>, ConfigError> {
    if value == setting.default {
        return Ok(None);
    }
    let scheme = value.starts_with("https://") || value.starts_with("http://");
    if !scheme
        || value
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "\"'<>`".contains(c))
    {
        return Err(ConfigError::setting(
            setting,
            value,
            "expected off or an address like https://bugzilla.example.org",
        ));
    }
    Ok(Some(value.trim_end_matches('/').to_string()))
}

/// `off`, or comma-separated addresses and networks ([`TrustedProxies`]).
pub(super) fn trusted_proxies((setting, value): Value) -> Result<TrustedProxies, ConfigError> {
    TrustedProxies::parse(value).map_err(|why| ConfigError::setting(setting, value, &why))
}

/// A number whose default is derived: the default row text stands for
/// `derived`, anything else must be a number in the row's range.
pub(super) fn number_or((setting, value): Value, derived: usize) -> Result<usize, ConfigError> {
    if value == setting.default {
        return Ok(derived);
    }
    number((setting, value))
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;

    use super::*;
    use crate::config::tests::{demo, poll};
    use crate::config::{Config, Invocation, parse};

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Some(Duration::from_secs(60)));
        for bad in ["", "0s", "1", "s", "1.5s", "-1s", "1 s", "1d"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn bugzilla_url_is_an_address_that_cannot_break_out_of_html() {
        let config =
            demo(&["--bugzilla-url", "https://bugzilla.example.org/"], &[]).expect("valid");
        assert_eq!(
            config.server.bugzilla_url.as_deref(),
            Some("https://bugzilla.example.org")
        );
        for bad in [
            "bugzilla.example.org",
            "javascript:alert(1)",
            "https://b/\"><x>",
            "https://b/ x",
        ] {
            let err = demo(&["--bugzilla-url", bad], &[]).unwrap_err();
            assert!(err.to_string().contains("BZPUSH_BUGZILLA_URL"), "{err}");
        }
    }

    fn allowed_origins(value: &str) -> Result<Option<Vec<String>>, ConfigError> {
        let args = ["run", "--allowed-origins", value].map(OsString::from);
        match parse(args, std::iter::empty())? {
            Invocation::Start(Config::Run(config)) => Ok(config.server.allowed_origins),
            other => panic!("expected run, got {other:?}"),
        }
    }

    #[test]
    fn allowed_origins_are_normalised_or_refused() {
        assert_eq!(allowed_origins("*"), Ok(None));
        assert_eq!(
            allowed_origins("https://bugzilla.example.org/, https://Bugzilla.Example.org:443,null"),
            Ok(Some(vec![
                "https://bugzilla.example.org".to_string(),
                "https://bugzilla.example.org".to_string(),
                "null".to_string(),
            ]))
        );
        for bad in [
            "",
            " , ",
            "*,https://a.example",
            "https://bugzilla.example.org/bugzilla/",
            "bugzilla.example.org",
            "https://a.example?x",
        ] {
            let err = allowed_origins(bad).expect_err(bad).to_string();
            assert!(err.starts_with("BZPUSH_ALLOWED_ORIGINS"), "{err}");
        }
    }

    #[test]
    fn the_state_directory_defaults_to_systemds_and_the_replay_limit_is_bounded() {
        let config = poll(&[], &[]).expect("valid");
        assert_eq!(config.poller.state_directory, None);
        assert_eq!(config.poller.replay_limit, Duration::from_secs(86_400));
        let systemd = [("STATE_DIRECTORY", "/var/lib/bzpush:/var/lib/other")];
        let config = poll(&[], &systemd).expect("valid");
        assert_eq!(
            config.poller.state_directory,
            Some(PathBuf::from("/var/lib/bzpush"))
        );
        let config = poll(&["--state-directory", "off"], &systemd).expect("valid");
        assert_eq!(config.poller.state_directory, None);
        let config = poll(&["--state-directory", "/srv/bz"], &systemd).expect("valid");
        assert_eq!(
            config.poller.state_directory,
            Some(PathBuf::from("/srv/bz"))
        );
        assert!(poll(&["--state-directory", "relative"], &[]).is_err());
        assert!(poll(&["--replay-limit", "500ms"], &[]).is_err());
        assert!(poll(&["--replay-limit", "721h"], &[]).is_err());
        assert!(poll(&["--replay-limit", "720h"], &[]).is_ok());
        assert!(poll(&["--overlap", "500ms"], &[]).is_err());
        assert!(poll(&["--overlap", "2h"], &[]).is_err());
    }

    #[test]
    fn the_default_lock_name_names_the_database_and_fits() {
        let config = poll(&[], &[]).expect("defaults are valid");
        assert_eq!(config.poller.lock_name, "bzpush.poller.bugs");
        let set = poll(&["--lock-name", "mine"], &[]).expect("an explicit name");
        assert_eq!(set.poller.lock_name, "mine");
        // Long names and case-only differences: cut, told apart by a hash.
        let long = "b".repeat(64);
        let longer = format!("{long}x");
        let names = [
            default_lock_name(&long),
            default_lock_name(&longer),
            default_lock_name("Bugs"),
            default_lock_name("bugs"),
            default_lock_name("BUGS"),
        ];
        for (i, name) in names.iter().enumerate() {
            assert!(name.chars().count() <= MAX_LOCK_NAME, "{name}");
            assert!(name.starts_with("bzpush.poller."), "{name}");
            assert!(!names[..i].contains(name), "{name} twice");
        }
        // Stable: every poller of a database, on any host, derives it.
        assert_eq!(default_lock_name("Bugs"), default_lock_name("Bugs"));
        assert_eq!(
            default_lock_name("Bugs"),
            "bzpush.poller.bugs.2a46d4a7e4573732"
        );
    }
}
