//! Bugzilla's database as bzpush meets it: connections with timeouts, and
//! its column values read without panicking.
//!
//! The mysql crate panics when a row does not convert to the asked type;
//! values from Bugzilla's tables go through the functions here instead,
//! which answer `None` for anything unexpected. Nothing here writes. Host
//! `localhost` means the server's Unix socket, as for every MySQL client.

use std::fmt;
use std::io;
use std::path::Path;
use std::time::Duration;

use mysql::OptsBuilder;

use crate::config::DatabaseUrl;
use crate::notification::{BugId, ChangeTime};

/// How long connecting may take before the database counts as down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where MySQL and MariaDB put their Unix socket, in the order tried when
/// the URL's host is `localhost` and names no `?socket=`: Debian's and
/// most distributions' path, its older alias, and the upstream default.
pub const SOCKET_PATHS: [&str; 3] = [
    "/run/mysqld/mysqld.sock",
    "/var/run/mysqld/mysqld.sock",
    "/tmp/mysql.sock",
];

/// "Access denied": ER_ACCESS_DENIED_ERROR, and ER_ACCESS_DENIED_NO_PASSWORD_ERROR
/// (MariaDB answers it where no account matches the host at all).
pub const ACCESS_DENIED: [u16; 2] = [1045, 1698];

/// A new connection whose reads and writes fail after `io_timeout`, so a
/// dead peer is noticed instead of waited on forever. It goes where
/// [`route`] says, as every MySQL client does: host `localhost` is the Unix
/// socket (`?socket=PATH`, else the first of [`SOCKET_PATHS`] that exists),
/// any other host is TCP. The server tells the two apart: an account
/// `'u'@'localhost'` matches only socket logins when it skips name
/// resolution. The mysql crate would otherwise take `localhost` over TCP,
/// and switch 127.0.0.1 over to the socket. An "Access denied" error says
/// which account the server tried ([`access_denied_hint`]), wherever it is
/// logged or printed.
pub fn connect(url: &DatabaseUrl, io_timeout: Duration) -> Result<mysql::Conn, mysql::Error> {
    let opts = OptsBuilder::from_opts(url.opts.clone())
        .prefer_socket(false)
        .tcp_connect_timeout(Some(CONNECT_TIMEOUT))
        .read_timeout(Some(io_timeout))
        .write_timeout(Some(io_timeout));
    let opts = match route(url) {
        Route::Socket(path) => opts.socket(Some(path)),
        Route::NoSocket => {
            return Err(mysql::Error::IoError(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "host localhost means the server's Unix socket, and there is none at {}: \
                     is the server running? Name its socket with ?socket=/PATH in the URL, or \
                     use host 127.0.0.1 for TCP",
                    SOCKET_PATHS.join(", ")
                ),
            )));
        }
        Route::Tcp => opts,
    };
    let mut conn =
        mysql::Conn::new(opts).map_err(|error| match (access_denied_hint(&error), error) {
            (Some(hint), mysql::Error::MySqlError(mut e)) => {
                e.message = format!("{} ({hint})", e.message);
                mysql::Error::MySqlError(e)
            }
            (_, error) => error,
        })?;
    bound_lock_waits(&mut conn)?;
    Ok(conn)
}

/// Makes every statement on `conn` give up at once, or within a second,
/// when another session holds a lock it needs, instead of waiting for the
/// server's defaults (50 s for a row, a day for a table's metadata, as
/// when `checksetup.pl` alters a table or an open transaction holds a
/// row): the caller retries at its next poll, and everything else keeps
/// flowing meanwhile. The wait then fails with [`LOCK_WAIT`]. MariaDB
/// takes 0 (fail at once) for metadata locks, MySQL 1 s at least; row
/// locks wait 1 s, as a 0 there made MariaDB 10.11 refuse the next
/// COMMIT.
fn bound_lock_waits(conn: &mut mysql::Conn) -> Result<(), mysql::Error> {
    use mysql::prelude::Queryable;
    conn.query_drop("SET SESSION innodb_lock_wait_timeout = 1")?;
    conn.query_drop("SET SESSION lock_wait_timeout = 0")
        .or_else(|_| conn.query_drop("SET SESSION lock_wait_timeout = 1"))
}

/// ER_LOCK_WAIT_TIMEOUT: another session holds a lock the statement
/// needed, past the bound [`connect`] sets. Nothing is wrong with the
/// connection; the statement is retried later.
pub const LOCK_WAIT: u16 = 1205;

/// Whether `error` is a statement that gave up waiting for another
/// session's lock ([`LOCK_WAIT`], or MySQL's ER_LOCK_NOWAIT).
pub fn is_lock_wait(error: &mysql::Error) -> bool {
    matches!(error, mysql::Error::MySqlError(e) if e.code == LOCK_WAIT || e.code == 3572)
}

/// How [`connect`] reaches the database.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// A Unix socket at this path.
    Socket(String),
    /// Host `localhost`, but no socket where one is looked for.
    NoSocket,
    Tcp,
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Route::Socket(path) => write!(f, "Unix socket {path}"),
            Route::NoSocket => f.write_str("no Unix socket"),
            Route::Tcp => f.write_str("TCP"),
        }
    }
}

/// Where `url` leads, looked up now: a socket may appear once the server
/// starts.
pub fn route(url: &DatabaseUrl) -> Route {
    if let Some(path) = url.opts.get_socket() {
        return Route::Socket(path.to_string());
    }
    if !url
        .opts
        .get_ip_or_hostname()
        .eq_ignore_ascii_case("localhost")
    {
        return Route::Tcp;
    }
    SOCKET_PATHS
        .iter()
        .find(|path| Path::new(path).exists())
        .map_or(Route::NoSocket, |path| Route::Socket(path.to_string()))
}

/// For an "Access denied" error: which account the server tried (its
/// message names `'user'@'host'`, the host being where it saw the login
/// come from) and what that means. `None` for any other error.
fn access_denied_hint(error: &mysql::Error) -> Option<String> {
    let mysql::Error::MySqlError(e) = error else {
        return None;
    };
    if !ACCESS_DENIED.contains(&e.code) {
        return None;
    }
    // "Access denied for user 'bzpush'@'127.0.0.1' (using password: YES)"
    let (user, host) = e
        .message
        .split_once(" user '")
        .and_then(|(_, rest)| rest.split_once("'@'"))
        .and_then(|(user, rest)| Some((user, rest.split_once('\'')?.0)))
        .unwrap_or(("USER", "?"));
    Some(match host {
        "localhost" => format!(
            "a Unix-socket login, so the server tried the account '{user}'@'localhost': \
             check that it exists and its password"
        ),
        "127.0.0.1" | "::1" => format!(
            "a TCP login from {host}, so the server tried the account '{user}'@'{host}' (or a \
             wildcard host); '{user}'@'localhost' matches only Unix-socket logins: use host \
             localhost in the URL for the socket, or create the account for {host}"
        ),
        _ => format!(
            "a login from {host}, so the server tried the account '{user}'@'{host}' (or a \
             wildcard host that matches it): check that it exists and its password"
        ),
    })
}

/// Whether `error` says the server or the network closed an open
/// connection: MariaDB closes one idle past `wait_timeout` (8 h by default,
/// so every quiet night), and a `KILL` ends one. A connection dropped like
/// that is worth one immediate reconnection before anyone calls it an
/// outage. A timeout is not among these: that peer is still there, hung.
pub fn connection_dropped(error: &mysql::Error) -> bool {
    match error {
        mysql::Error::IoError(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
        ),
        mysql::Error::CodecError(_) => true,
        mysql::Error::DriverError(e) => matches!(
            e,
            mysql::DriverError::PacketOutOfSync | mysql::DriverError::UnexpectedPacket
        ),
        // ER_CONNECTION_KILLED (MariaDB), ER_CLIENT_INTERACTION_TIMEOUT
        // (MySQL 8: idle past wait_timeout).
        mysql::Error::MySqlError(e) => e.code == 1927 || e.code == 4031,
        _ => false,
    }
}

/// A database error as a sentence for a log line or a check, without the
/// mysql crate's type wrappers (`MySqlError { ERROR 1045 (28000): … }`,
/// `DriverError { … }`). The server's own message stays verbatim, with its
/// error number for searching.
pub fn sentence(error: &mysql::Error) -> String {
    use mysql::DriverError;
    match error {
        mysql::Error::MySqlError(e) => format!("{} (MySQL error {})", e.message, e.code),
        mysql::Error::DriverError(DriverError::CouldNotConnect(Some((addr, why, _)))) => {
            format!("cannot connect to {addr}: {why}")
        }
        mysql::Error::DriverError(DriverError::ConnectTimeout) => {
            format!("no connection within {}s", CONNECT_TIMEOUT.as_secs())
        }
        mysql::Error::DriverError(DriverError::Timeout) => "no answer in time".to_string(),
        mysql::Error::DriverError(e) => format!("{e}"),
        mysql::Error::IoError(e) => match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                "the connection stopped answering (timed out)".to_string()
            }
            _ => format!("connection failed: {e}"),
        },
        mysql::Error::CodecError(e) => format!("garbled reply from the server: {e}"),
        mysql::Error::UrlError(e) => format!("bad database URL: {e}"),
        mysql::Error::FromValueError(_) | mysql::Error::FromRowError(_) => {
            "a reply of an unexpected type".to_string()
        }
    }
}

/// [`sentence`] as a `Display`, for what takes one.
pub struct Sentence<'a>(pub &'a mysql::Error);

impl std::fmt::Display for Sentence<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&sentence(self.0))
    }
}

/// A DATETIME as the database stored it, `YYYY-MM-DDTHH:MM:SS`.
pub fn change_time(value: &mysql::Value) -> Option<ChangeTime> {
    match *value {
        mysql::Value::Date(year, month, day, hour, minute, second, _) => Some(ChangeTime::new(
            format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}"),
        )),
        _ => None,
    }
}

/// A bug id column, which Bugzilla declares as a signed MEDIUMINT.
pub fn bug_id(value: &mysql::Value) -> Option<BugId> {
    match *value {
        mysql::Value::Int(n) => u32::try_from(n).ok().and_then(BugId::new),
        mysql::Value::UInt(n) => u32::try_from(n).ok().and_then(BugId::new),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datetimes_keep_the_stored_value() {
        let v = mysql::Value::Date(2026, 11, 28, 2, 4, 50, 0);
        assert_eq!(
            change_time(&v).map(|t| t.to_string()).as_deref(),
            Some("2026-11-28T02:04:50")
        );
        assert_eq!(change_time(&mysql::Value::NULL), None);
    }

    #[test]
    fn access_denied_names_the_account_tried() {
        let denied = |code: u16, message: &str| {
            mysql::Error::MySqlError(mysql::MySqlError {
                state: "28000".into(),
                message: message.into(),
                code,
            })
        };
        let hint = access_denied_hint(&denied(
            1045,
            "Access denied for user 'bz'@'127.0.0.1' (using password: YES)",
        ))
        .expect("a hint");
        assert!(hint.contains("TCP login from 127.0.0.1"), "{hint}");
        assert!(hint.contains("'bz'@'localhost' matches only"), "{hint}");
        let hint = access_denied_hint(&denied(1698, "Access denied for user 'bz'@'localhost'"))
            .expect("a hint");
        assert!(hint.contains("'bz'@'localhost'"), "{hint}");
        assert_eq!(access_denied_hint(&denied(1146, "no such table")), None);
    }

    #[test]
    fn bug_ids_must_be_positive() {
        assert_eq!(bug_id(&mysql::Value::Int(7)), BugId::new(7));
        assert_eq!(bug_id(&mysql::Value::Int(0)), None);
        assert_eq!(bug_id(&mysql::Value::Int(-3)), None);
        assert_eq!(bug_id(&mysql::Value::NULL), None);
    }
}
