//! Bugzilla's database as bzpush meets it: connections with timeouts, and
//! its column values read without panicking.
//!
//! The mysql crate panics when a row does not convert to the asked type;
//! values from Bugzilla's tables go through the functions here instead,
//! which answer `None` for anything unexpected. Nothing here writes.

use std::time::Duration;

use mysql::{Conn, OptsBuilder};

use crate::config::DatabaseUrl;
use crate::notification::{BugId, ChangeTime};

/// How long connecting may take before the database counts as down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A new connection whose reads and writes fail after `io_timeout`, so a
/// dead peer is noticed instead of waited on forever. It goes exactly where
/// the URL says: the mysql crate would otherwise switch a connection to
/// 127.0.0.1 over to the server's Unix socket.
pub fn connect(url: &DatabaseUrl, io_timeout: Duration) -> Result<Conn, mysql::Error> {
    let opts = OptsBuilder::from_opts(url.opts.clone())
        .prefer_socket(false)
        .tcp_connect_timeout(Some(CONNECT_TIMEOUT))
        .read_timeout(Some(io_timeout))
        .write_timeout(Some(io_timeout));
    Conn::new(opts)
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
    fn bug_ids_must_be_positive() {
        assert_eq!(bug_id(&mysql::Value::Int(7)), BugId::new(7));
        assert_eq!(bug_id(&mysql::Value::Int(0)), None);
        assert_eq!(bug_id(&mysql::Value::Int(-3)), None);
        assert_eq!(bug_id(&mysql::Value::NULL), None);
    }
}
