//! The database the poller runs on, as the poll loop needs it: connect,
//! take the poller lock and see who holds it, end a stale session of its
//! own, and tell a refusal (no retry cures it) from an outage. Two
//! implementations: Bugzilla's MariaDB or MySQL ([`MariaDb`]) and the
//! demo's simulated database ([`super::memory`]). Reading and forgetting
//! changes is the sources' job, not this one's.

use std::time::Duration;

use mysql::Conn;
use mysql::prelude::Queryable;

use super::state::LockHolder;
use crate::config::{PollerConfig, Source};
use crate::database;
use crate::notification::ChangeTime;

/// A query that takes longer than this means the connection is dead.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the poller's connections go.
pub trait Database {
    type Session: Session;

    /// Where it is, for log lines: a URL without its password.
    fn describe(&self) -> String;

    fn connect(&self) -> Result<Self::Session, mysql::Error>;

    /// Whether `error` is one no retry cures; if so, what it means and
    /// what to do (see [`refusal`]).
    fn refusal(&self, error: &mysql::Error) -> Option<String>;
}

/// What one attempt at the poller lock found.
#[derive(Debug)]
pub struct LockAttempt {
    /// This connection holds the lock now.
    pub taken: bool,
    /// The database's clock when the attempt began.
    pub now: ChangeTime,
    /// The connection that holds the lock, if any.
    pub holder: Option<u64>,
}

/// One connection to a [`Database`], and the poller lock on it: the lock
/// goes with the connection.
pub trait Session {
    /// One attempt at the lock `name`, waiting at most `wait_secs`.
    fn try_lock(&mut self, name: &str, wait_secs: u32) -> Result<LockAttempt, mysql::Error>;

    /// This connection's id, as [`LockAttempt::holder`] names one.
    fn connection_id(&mut self) -> Result<Option<u64>, mysql::Error>;

    /// The holder of the lock, connection `id`, as far as it can be seen.
    fn lock_holder(&mut self, id: u64) -> LockHolder;

    /// Ends connection `id`, which took its lock with it.
    fn end_connection(&mut self, id: u64) -> Result<(), mysql::Error>;

    /// The age of the oldest change in `bugs` stamped after `mark` (on the
    /// database's clock), if there is one: what a standby `run` owes its
    /// own clients and cannot deliver.
    fn oldest_change_after(&mut self, mark: &ChangeTime) -> Result<Option<Duration>, mysql::Error>;
}

/// Bugzilla's database on MariaDB or MySQL, as `config` names it.
pub struct MariaDb<'a>(pub &'a PollerConfig);

impl Database for MariaDb<'_> {
    type Session = Conn;

    fn describe(&self) -> String {
        self.0.database.to_string()
    }

    fn connect(&self) -> Result<Conn, mysql::Error> {
        database::connect(&self.0.database, IO_TIMEOUT)
    }

    fn refusal(&self, error: &mysql::Error) -> Option<String> {
        refusal(error, self.0)
    }
}

impl Session for Conn {
    fn try_lock(&mut self, name: &str, wait_secs: u32) -> Result<LockAttempt, mysql::Error> {
        // GET_LOCK: 1 taken, 0 timed out, NULL on an error.
        let row: Option<(Option<i64>, String, Option<u64>)> = self.exec_first(
            "SELECT GET_LOCK(?, ?), DATE_FORMAT(NOW(), '%Y-%m-%dT%H:%i:%s'), IS_USED_LOCK(?)",
            (name, wait_secs, name),
        )?;
        let (taken, now, holder) = row.unwrap_or((None, String::new(), None));
        Ok(LockAttempt {
            taken: taken == Some(1),
            now: ChangeTime::new(now),
            holder,
        })
    }

    fn connection_id(&mut self) -> Result<Option<u64>, mysql::Error> {
        self.query_first("SELECT CONNECTION_ID()")
    }

    fn lock_holder(&mut self, id: u64) -> LockHolder {
        lock_holder(self, id)
    }

    fn end_connection(&mut self, id: u64) -> Result<(), mysql::Error> {
        self.query_drop(format!("KILL CONNECTION {id}"))
    }

    fn oldest_change_after(&mut self, mark: &ChangeTime) -> Result<Option<Duration>, mysql::Error> {
        let age: Option<Option<i64>> = self.exec_first(
            "SELECT TIMESTAMPDIFF(SECOND, MIN(delta_ts), NOW()) FROM bugs \
             WHERE delta_ts > STR_TO_DATE(?, '%Y-%m-%dT%H:%i:%s')",
            (mark.as_str(),),
        )?;
        Ok(age
            .flatten()
            .map(|secs| Duration::from_secs(secs.max(0).unsigned_abs())))
    }
}

/// Whether the database `error` is one no retry cures: the server is up
/// and answers, but refuses what the poller asks. If so, what it means and
/// what to do, for the log and `/health`; `None` for an outage.
pub fn refusal(error: &mysql::Error, config: &PollerConfig) -> Option<String> {
    let mysql::Error::MySqlError(e) = error else {
        return None;
    };
    let db = config.database.opts.get_db_name().unwrap_or_default();
    let user = config.database.opts.get_user().unwrap_or_default();
    let todo = match (e.code, config.source) {
        // ER_NO_SUCH_TABLE
        (1146, Source::PushNotify) => "push_notify does not exist: install Mozilla's \
             PushNotify extension in Bugzilla, or set BZPUSH_SOURCE=bugs"
            .to_string(),
        (1146, Source::Bugs) => "is the database in BZPUSH_DATABASE_URL Bugzilla's?".to_string(),
        // ER_TABLEACCESS_DENIED_ERROR, ER_COLUMNACCESS_DENIED_ERROR
        (1142 | 1143, Source::PushNotify) => {
            format!("GRANT SELECT, DELETE ON `{db}`.push_notify TO '{user}'@…")
        }
        (1142 | 1143, Source::Bugs) => {
            format!("GRANT SELECT (bug_id, delta_ts) ON `{db}`.bugs TO '{user}'@…")
        }
        // ER_DBACCESS_DENIED_ERROR, ER_ACCESS_DENIED_ERROR, ER_BAD_DB_ERROR,
        // ER_HOST_NOT_PRIVILEGED
        (1044 | 1045 | 1049 | 1130, _) => "check the user, password, host and database \
             in BZPUSH_DATABASE_URL against the server's accounts (`bzpush check`)"
            .to_string(),
        // ER_BAD_FIELD_ERROR
        (1054, _) => "the table lacks a column bzpush reads: is it Bugzilla's?".to_string(),
        // ER_OPTION_PREVENTS_STATEMENT (--read-only), ER_READ_ONLY_MODE
        (1290 | 1836, Source::PushNotify) => "the database is read-only (a replica?), and \
             source push_notify deletes the rows it published: point BZPUSH_DATABASE_URL at \
             the primary"
            .to_string(),
        _ => return None,
    };
    Some(format!("{} — {todo}", database::Sentence(error)))
}

/// The holder of lock `id` as the server lists it, if this user may see it
/// (its own connections always; others' with the PROCESS privilege).
pub fn lock_holder(db: &mut Conn, id: u64) -> LockHolder {
    let host: Option<String> = db
        .exec_first(
            "SELECT HOST FROM information_schema.PROCESSLIST WHERE ID = ?",
            (id,),
        )
        .ok()
        .flatten();
    LockHolder {
        connection: id,
        host,
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_config as config;
    use super::*;

    fn server_error(code: u16) -> mysql::Error {
        mysql::Error::MySqlError(mysql::MySqlError {
            state: "42000".into(),
            message: "refused".into(),
            code,
        })
    }

    #[test]
    fn a_refusal_says_its_fix_and_an_outage_is_no_refusal() {
        let push_notify = config("push_notify");
        let bugs = config("bugs");
        let says = |e: &mysql::Error, c: &PollerConfig, fix: &str| {
            let reason = refusal(e, c).unwrap_or_else(|| panic!("{e} is a refusal"));
            assert!(reason.contains(fix), "{reason}");
        };
        says(&server_error(1146), &push_notify, "BZPUSH_SOURCE=bugs");
        says(
            &server_error(1142),
            &push_notify,
            "GRANT SELECT, DELETE ON `bugs`.push_notify",
        );
        says(
            &server_error(1143),
            &bugs,
            "GRANT SELECT (bug_id, delta_ts) ON `bugs`.bugs",
        );
        says(&server_error(1045), &bugs, "BZPUSH_DATABASE_URL");
        // Lock wait timeout, deadlock, too many connections, server
        // shutting down: a retry cures them.
        for code in [1205, 1213, 1040, 1053] {
            assert_eq!(refusal(&server_error(code), &push_notify), None, "{code}");
        }
        let io = mysql::Error::IoError(std::io::ErrorKind::TimedOut.into());
        assert_eq!(refusal(&io, &push_notify), None);
    }
}
