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
