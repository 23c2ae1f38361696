//! URLs that may hold a password: the database and broker URLs, checked
//! with the `url` crate (the parser mysql and lapin use), their redaction,
//! and the broker's list of cluster nodes ([`AmqpNodes`]).
//!
//! A password is never printed: [`SecretUrl`] shows itself redacted, and
//! an error about a URL shows it only if its password can be told apart.
//! A URL whose password holds an unencoded `/ # ? @ :` parses into other
//! parts than the user meant (`mysql://u:se/cr@t@h/db`), so it is refused
//! without being shown, saying what to percent-encode. Nothing here
//! connects.

use std::fmt;

use url::{Position, Url};

use super::ConfigError;
use super::settings::Setting;
use super::values::Value;

/// A checked URL that may hold a password, and what its client connects
/// with (`O`). It prints redacted, as `Display` and as `Debug`, so that no
/// log line, `check` output or error shows the password; only the client
/// reads `opts`. Both URLs are this one type: [`DatabaseUrl`], [`AmqpUrl`].
#[derive(Clone)]
pub struct SecretUrl<O> {
    /// What the client connects with, credentials included.
    pub opts: O,
    url: Url,
}

impl<O> fmt::Display for SecretUrl<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.url).unwrap_or_else(|| NOT_SHOWN.to_string()))
    }
}

impl<O> fmt::Debug for SecretUrl<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A MySQL/MariaDB URL; the mysql crate connects with its `opts`.
pub type DatabaseUrl = SecretUrl<mysql::Opts>;

/// An AMQP URL; lapin connects with its `opts`: the URL and the heartbeat,
/// if the URL sets none ([`AmqpUrl::secret`]).
pub type AmqpUrl = SecretUrl<String>;

impl AmqpUrl {
    /// Checks `value`; the error says what is wrong with it.
    pub fn parse(value: &str) -> Result<AmqpUrl, String> {
        if !(value.starts_with("amqp://") || value.starts_with("amqps://")) {
            return Err("expected amqp://USER:PASSWORD@HOST:PORT/VHOST or amqps://…".into());
        }
        let url = unambiguous(value)?;
        let uri = value
            .parse::<lapin::uri::AMQPUri>()
            .map_err(|e| without_secrets(&e.to_string(), value))?;
        // `amqp://host:5672/` names the vhost "", which no broker has: the
        // broker answers only `NOT_ALLOWED - vhost  not found`.
        if uri.vhost.is_empty() {
            let mut fixed = url.clone();
            fixed.set_path("/%2f");
            return Err(format!(
                "the URL names an empty vhost (nothing after the last /); the default vhost / \
                 is written %2f: {}",
                redact(&fixed).unwrap_or_else(|| NOT_SHOWN.to_string())
            ));
        }
        Ok(AmqpUrl {
            url,
            opts: value.to_string(),
        })
    }

    /// Whether it asks for TLS (`amqps://`).
    pub fn tls(&self) -> bool {
        self.url.scheme() == "amqps"
    }

    /// The vhost, as the broker names it (percent-decoded).
    pub fn vhost(&self) -> String {
        self.uri().map_or_else(|| "/".to_string(), |uri| uri.vhost)
    }

    fn uri(&self) -> Option<lapin::uri::AMQPUri> {
        self.opts.parse().ok()
    }

    /// Connects with a heartbeat of `secs` seconds unless the URL asks for
    /// one itself (`?heartbeat=`): without heartbeats, a link that dies
    /// silently (no FIN, no RST) is noticed only when TCP gives up.
    pub fn with_heartbeat(mut self, secs: u16) -> AmqpUrl {
        if !self.url.query_pairs().any(|(key, _)| key == "heartbeat") {
            let separator = if self.opts.contains('?') { '&' } else { '?' };
            self.opts = format!("{}{separator}heartbeat={secs}", self.opts);
        }
        self
    }

    /// The full URL, credentials included: only for connecting.
    pub fn secret(&self) -> &str {
        &self.opts
    }

    /// The user, as lapin logs in (percent-decoded); `guest` if none.
    pub fn user(&self) -> String {
        self.uri().map_or_else(
            || "guest".to_string(),
            |uri| uri.authority.userinfo.username,
        )
    }
}

/// `BZPUSH_AMQP_URL`: the nodes of one RabbitMQ cluster, in the order
/// given, each an [`AmqpUrl`] with the same user and vhost (a cluster
/// shares its users and vhosts). One node is a list of one. Prints as the
/// list, each URL redacted.
#[derive(Clone, Debug)]
pub struct AmqpNodes(Vec<AmqpUrl>);

impl AmqpNodes {
    /// Checks `value`, comma-separated URLs; the error says which one is
    /// wrong and how.
    pub fn parse(value: &str) -> Result<AmqpNodes, String> {
        let nodes = value
            .split(',')
            .map(str::trim)
            .enumerate()
            .map(|(i, node)| {
                AmqpUrl::parse(node).map_err(|why| match i {
                    0 => why,
                    _ => format!(
                        "node {} of the list: {why} (a , inside a password is written %2C)",
                        i + 1
                    ),
                })
            })
            .collect::<Result<Vec<AmqpUrl>, String>>()?;
        let first = &nodes[0];
        if let Some(other) = nodes
            .iter()
            .find(|n| n.user() != first.user() || n.vhost() != first.vhost())
        {
            return Err(format!(
                "every node of one cluster has the same user and vhost: {first} and {other} differ"
            ));
        }
        Ok(AmqpNodes(nodes))
    }

    /// The nodes, in the order given; never empty.
    pub fn nodes(&self) -> &[AmqpUrl] {
        &self.0
    }

    /// Every node with a heartbeat of `secs` seconds ([`AmqpUrl::with_heartbeat`]).
    pub fn with_heartbeat(self, secs: u16) -> AmqpNodes {
        AmqpNodes(self.0.into_iter().map(|n| n.with_heartbeat(secs)).collect())
    }

    /// The user every node logs in as.
    pub fn user(&self) -> String {
        self.0[0].user()
    }

    /// The vhost of every node.
    pub fn vhost(&self) -> String {
        self.0[0].vhost()
    }
}

impl fmt::Display for AmqpNodes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, node) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            node.fmt(f)?;
        }
        Ok(())
    }
}

impl DatabaseUrl {
    /// The same server and account, database `name`.
    pub fn with_database(&self, name: &str) -> DatabaseUrl {
        let opts = mysql::OptsBuilder::from_opts(self.opts.clone()).db_name(Some(name));
        let mut url = self.url.clone();
        url.set_path(&format!("/{name}"));
        DatabaseUrl {
            opts: opts.into(),
            url,
        }
    }
}

/// `BZPUSH_DATABASE_URL` and `BZPUSH_CATCHUP_DATABASE_URL`: a MySQL URL
/// naming a database.
pub(super) fn database_url(value: Value) -> Result<DatabaseUrl, ConfigError> {
    mysql_url(value, "mysql://USER[:PASSWORD]@HOST[:PORT]/DATABASE")
}

/// A database server the demo may create a database on: a MySQL URL that
/// may name no database.
pub(super) fn server_url(value: Value) -> Result<DatabaseUrl, ConfigError> {
    mysql_url(value, "mysql://USER[:PASSWORD]@HOST[:PORT]/")
}

/// A MySQL URL of `shape`; a shape ending in `DATABASE` needs one named.
fn mysql_url((setting, value): Value, shape: &str) -> Result<DatabaseUrl, ConfigError> {
    if !value.starts_with("mysql://") {
        return Err(ConfigError::url(
            setting,
            value,
            &format!("expected {shape}"),
        ));
    }
    // Before the mysql crate: a password holding `/` or `@` must not be
    // blamed on the port.
    let url = unambiguous(value).map_err(|why| ConfigError::url(setting, value, &why))?;
    // The URL parses (the mysql crate's parser is ours): what remains are
    // its own complaints, about parameters.
    let opts = mysql::Opts::from_url(value)
        .map_err(|e| ConfigError::url(setting, value, &without_secrets(&e.to_string(), value)))?;
    if shape.ends_with("DATABASE") && opts.get_db_name().is_none_or(str::is_empty) {
        return Err(ConfigError::url(
            setting,
            value,
            "the URL names no database (…/DATABASE)",
        ));
    }
    Ok(DatabaseUrl { opts, url })
}

pub(super) fn amqp_nodes((setting, value): Value) -> Result<AmqpNodes, ConfigError> {
    AmqpNodes::parse(value).map_err(|why| ConfigError::url(setting, value, &why))
}

impl ConfigError {
    /// A bad URL setting, which may hold a password: shown only redacted,
    /// with the characters that must be percent-encoded.
    fn url(setting: &Setting, value: &str, expected: &str) -> ConfigError {
        ConfigError::setting(setting, value, &format!("{expected}; {PERCENT_ENCODE}"))
    }
}

/// Said with every bad URL: unencoded, these end the user or password part
/// early, and the rest of the password is read as host, port or path.
const PERCENT_ENCODE: &str =
    "in the user and password, write / # ? @ : as %2F %23 %3F %40 %3A (percent-encoded)";

/// Why a URL that is not [`unambiguous`] is refused.
const AMBIGUOUS: &str = "expected SCHEME://USER[:PASSWORD]@HOST[:PORT]/…, with one @ \
    and nothing but digits after the host's colon";

const NOT_SHOWN: &str = "(URL not shown: it may hold a password)";

/// `invalid value "…"` with the value redacted, or without the value where
/// it does not parse clearly enough to tell its password apart.
pub(super) fn invalid_value(value: &str) -> String {
    match shown(value) {
        Some(shown) => format!("invalid value {shown:?}"),
        None => "invalid value (not shown: it may hold a password)".to_string(),
    }
}

/// `scheme://user:secret@host/…` → `scheme://user:***@host/…`, for a URL
/// that bzpush accepted (every accepted URL is unambiguous); for anything
/// else, what `shown` shows.
pub fn redact_url(url: &str) -> String {
    shown(url).unwrap_or_else(|| NOT_SHOWN.to_string())
}

/// `value` as it may be printed: unchanged if it cannot hold a password,
/// redacted if it is an [`unambiguous`] URL, `None` if it might hold one
/// that cannot be told apart (`mysql://u:se/cr@t@host/db`,
/// `mysql://u:secret/db`, `mysql:/u:pw@host/db`).
pub(super) fn shown(value: &str) -> Option<String> {
    if !value.contains("://") && !value.contains('@') {
        return Some(value.to_string());
    }
    redact(&unambiguous(value).ok()?)
}

/// `value` parsed, if it parses into the parts its writer meant: the `url`
/// crate reads the last `@` of the authority as the end of the user and
/// password, and an unencoded `/`, `?` or `#` in a password ends the
/// authority early, so a URL with more than one `@`, or one after the
/// authority, is refused.
fn unambiguous(value: &str) -> Result<Url, String> {
    let url = Url::parse(value).map_err(|e| format!("{e}: {AMBIGUOUS}"))?;
    if value.matches('@').count() > 1 || url[Position::BeforePath..].contains('@') {
        return Err(AMBIGUOUS.into());
    }
    Ok(url)
}

/// `url` with its password and any `password=` query value as `***`, and
/// no fragment; `None` if the password cannot be replaced.
fn redact(url: &Url) -> Option<String> {
    let mut shown = url.clone();
    if url.password().is_some() {
        shown.set_password(Some("***")).ok()?;
    }
    shown.set_fragment(None);
    if let Some(query) = url.query() {
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
                _ => pair.to_string(),
            })
            .collect();
        shown.set_query(Some(&pairs.join("&")));
    }
    Some(shown.into())
}

/// A library's complaint about URL `value`, unless it repeats a secret of
/// it (the password, a `password=` query value): then only that the URL
/// does not parse.
fn without_secrets(complaint: &str, value: &str) -> String {
    let rest = value.split_once("://").map_or(value, |(_, rest)| rest);
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let password = authority
        .split_once('@')
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .map(|(_, password)| password);
    let query = rest.split_once('?').map_or("", |(_, query)| query);
    let query_passwords = query.split('&').filter_map(|pair| {
        let (key, secret) = pair.split_once('=')?;
        key.eq_ignore_ascii_case("password").then_some(secret)
    });
    let leaks = password
        .into_iter()
        .chain(query_passwords)
        .any(|secret| !secret.is_empty() && complaint.contains(secret));
    if leaks {
        "the URL does not parse".to_string()
    } else {
        complaint.to_string()
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;

    use super::*;
    use crate::config::parse;
    use crate::config::tests::{demo, poll};

    #[test]
    fn the_broker_takes_the_nodes_of_one_cluster_and_no_empty_vhost() {
        let list = "amqp://u:p@a:5672/%2f, amqp://u:p@b:5672/%2f,amqps://u:p@c:5671/%2f";
        let config = poll(&["--amqp-url", list], &[]).expect("a list of nodes");
        let nodes: Vec<String> = config
            .amqp
            .nodes()
            .iter()
            .map(|n| n.secret().into())
            .collect();
        assert_eq!(
            nodes,
            [
                "amqp://u:p@a:5672/%2f?heartbeat=10",
                "amqp://u:p@b:5672/%2f?heartbeat=10",
                "amqps://u:p@c:5671/%2f?heartbeat=10"
            ]
        );
        assert_eq!(
            config.amqp.to_string(),
            "amqp://u:***@a:5672/%2f,amqp://u:***@b:5672/%2f,amqps://u:***@c:5671/%2f"
        );
        let refused = |list: &str| {
            poll(&["--amqp-url", list], &[])
                .map(drop)
                .unwrap_err()
                .to_string()
        };
        let err = refused("amqp://u:p@a/%2f,amqp://v:p@b/%2f");
        assert!(err.contains("same user and vhost"), "{err}");
        let err = refused("amqp://u:p@a/%2f,amqp://u:p@b/other");
        assert!(err.contains("same user and vhost"), "{err}");
        let err = refused("amqp://u:p@a/%2f,b:5672");
        assert!(err.contains("node 2 of the list"), "{err}");
        let err = refused("amqp://u:secret@a:5672/");
        assert!(
            err.contains("empty vhost") && err.contains("amqp://u:***@a:5672/%2f"),
            "{err}"
        );
        assert!(!err.contains("secret"), "{err}");
        // No path at all is the default vhost, as lapin reads it.
        assert!(poll(&["--amqp-url", "amqp://u:p@a:5672"], &[]).is_ok());
    }

    #[test]
    fn the_broker_link_has_a_heartbeat_unless_the_url_sets_one() {
        let config = poll(&[], &[]).expect("defaults are valid");
        assert_eq!(
            config.amqp.nodes()[0].secret(),
            "amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=10"
        );
        let url = "amqp://u:p@h/v?heartbeat=3";
        let config = poll(&["--amqp-url", url, "--heartbeat", "30s"], &[]).expect("valid");
        assert_eq!(config.amqp.nodes()[0].secret(), url);
        let config = poll(
            &["--amqp-url", "amqp://u:p@h/v?frame_max=8192"],
            &[("BZPUSH_HEARTBEAT", "1m")],
        )
        .expect("valid");
        assert_eq!(
            config.amqp.nodes()[0].secret(),
            "amqp://u:p@h/v?frame_max=8192&heartbeat=60"
        );
        for bad in ["1500ms", "0s", "19h"] {
            assert!(poll(&["--heartbeat", bad], &[]).is_err(), "{bad}");
        }
    }

    #[test]
    fn redaction() {
        assert_eq!(
            redact_url("mysql://bugs:pw@host/db"),
            "mysql://bugs:***@host/db"
        );
        assert_eq!(
            redact_url("amqp://u:p%40ss@[::1]:5672/%2f?heartbeat=5#x"),
            "amqp://u:***@[::1]:5672/%2f?heartbeat=5"
        );
        assert_eq!(
            redact_url("mysql://bugs@host/db?password=pw&socket=/s"),
            "mysql://bugs@host/db?password=***&socket=/s"
        );
        assert_eq!(redact_url("mysql://bugs@host/db"), "mysql://bugs@host/db");
        assert_eq!(redact_url("not a url"), "not a url");
        // Where the password cannot be told apart, nothing is shown.
        for ambiguous in [
            "amqp://u:p@ss@h:5672/%2f",
            "mysql://bzpush:se/cr@t:x#y@127.0.0.1:3306/bugs",
            "mysql://u:pw?x@h/db",
            "mysql://u:pw#x@h/db",
            "mysql://bugs:secret/bugs",
            "mysql://bugs:secret@h/db?x=@",
            "mysql:/u:secret@h/db",
            "mysql//u:secret@h/db",
        ] {
            assert_eq!(shown(ambiguous), None, "{ambiguous}");
            assert_eq!(
                redact_url(ambiguous),
                "(URL not shown: it may hold a password)"
            );
        }
    }

    /// Every URL setting, with a password holding each character that must
    /// be percent-encoded: the error names the setting, says what to
    /// encode, and never shows the password.
    #[test]
    fn url_errors_never_show_the_password() {
        let settings = [
            (
                "poll",
                "BZPUSH_DATABASE_URL",
                "mysql://bzpush:{}@127.0.0.1:3306/bugs",
            ),
            (
                "poll",
                "BZPUSH_AMQP_URL",
                "amqp://bzpush:{}@127.0.0.1:5672/%2f",
            ),
            (
                "serve",
                "BZPUSH_CATCHUP_DATABASE_URL",
                "mysql://bzpush:{}@127.0.0.1:3306/bugs",
            ),
            (
                "serve",
                "BZPUSH_AMQP_URL",
                "amqps://bzpush:{}@127.0.0.1:5671/%2f",
            ),
        ];
        let passwords = [
            "se/cr3t",
            "se#cr3t",
            "se?cr3t",
            "se@cr3t",
            "se:cr3t@x",
            "se/cr@t:x#y",
        ];
        // Scheme typos and missing parts print nothing of the password
        // either.
        let broken = [
            "mysq://bzpush:cr3t@127.0.0.1/bugs",
            "mysql:/bzpush:cr3t@127.0.0.1/bugs",
            "mysql://bzpush:cr3t@127.0.0.1:3306",
            "amqp:/bzpush:cr3t@127.0.0.1",
        ];
        for (command, variable, template) in settings {
            let values = passwords
                .iter()
                .map(|p| template.replace("{}", p))
                .chain(broken.iter().map(|b| b.to_string()));
            for value in values {
                let env = [(OsString::from(variable), OsString::from(&value))];
                let args = [OsString::from(command)];
                let err = match parse(args, env) {
                    Err(err) => err.to_string(),
                    // A broken URL of another scheme is fine for the other
                    // setting's parser only if it parses; none does.
                    Ok(_) => panic!("{variable}={value} was accepted"),
                };
                assert!(err.starts_with(variable), "{err}");
                assert!(!err.contains("cr3t"), "{variable}={value}: {err}");
                assert!(!err.contains("cr@t"), "{variable}={value}: {err}");
                assert!(err.contains("%2F %23 %3F %40 %3A"), "{err}");
            }
        }
        // The demo's server URL (it may name no database) alike.
        for password in passwords {
            let value = format!("mysql://bzpush:{password}@127.0.0.1:3306/");
            let err = demo(&["--database-url", &value], &[])
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("BZPUSH_DATABASE_URL"), "{err}");
            assert!(!err.contains("cr3t") && !err.contains("cr@t"), "{err}");
            assert!(err.contains("%2F %23 %3F %40 %3A"), "{value}: {err}");
        }
        // The URL parser's complaint without its Rust type wrapper.
        for value in [
            "mysql://bzpush:cr3t@127.0.0.1:99999/bugs",
            "mysql://bzpush:cr3t@/bugs",
        ] {
            let err = poll(&["--database-url", value], &[])
                .unwrap_err()
                .to_string();
            assert!(!err.contains("ParseError"), "{err}");
            let err = demo(&["--database-url", value], &[])
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(!err.contains("ParseError"), "{err}");
        }
        // A URL without its flag.
        let err = poll(&["mysql://bzpush:se/cr3t@127.0.0.1/bugs"], &[]).unwrap_err();
        assert!(!err.to_string().contains("cr3t"), "{err}");
        let err = poll(&["mysql://bzpush:cr3t@127.0.0.1/bugs"], &[]).unwrap_err();
        assert!(err.to_string().contains("bzpush:***@"), "{err}");
        // Where it parses, the rest of the URL is shown to find the fault.
        let err = poll(
            &["--database-url", "mysql://bzpush:s%40cr3t@127.0.0.1:3306"],
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("\"mysql://bzpush:***@127.0.0.1:3306\""),
            "{err}"
        );
    }
}
