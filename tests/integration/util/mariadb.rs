//! MariaDB for the tests: the test account, a database of each test's own
//! with Bugzilla's tables, and admin connections.
//!
//! Shared with the benchmarks (see `basics.rs`): everything here is used
//! by both.

use std::time::Duration;

use mysql::prelude::Queryable;

use super::unique;

pub const MYSQL_ADDR: &str = "127.0.0.1:3306";

/// The account the tests log in with, for hosts `127.0.0.1` (TCP) and
/// `localhost` (the Unix socket), with every privilege: tests create and
/// drop databases and users, grant, and kill connections. `./test` creates
/// it with these same values; the password is no secret, the account takes
/// local logins only.
pub const TEST_USER: &str = "bzpush_test";
pub const TEST_PASSWORD: &str = "bzpush-test-only";

const START_MARIADB: &str = "MariaDB must answer at 127.0.0.1:3306 and let the test \
    account bzpush_test in: run `./test` once, which installs and starts MariaDB and \
    RabbitMQ and creates the account (after that, `cargo test` alone works)";

/// The URL of `database` (may be empty) at `addr`, as the test account.
pub fn test_account_url(addr: &str, database: &str) -> String {
    format!("mysql://{TEST_USER}:{TEST_PASSWORD}@{addr}/{database}")
}

/// Bugzilla's `push_notify`, and a minimal `bugs` table.
pub const BUGZILLA_TABLES: &str = "CREATE TABLE push_notify (
       id INT NOT NULL AUTO_INCREMENT PRIMARY KEY,
       bug_id MEDIUMINT NOT NULL,
       delta_ts DATETIME NOT NULL,
       UNIQUE KEY push_notify_idx (bug_id));
     CREATE TABLE bugs (
       bug_id MEDIUMINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
       short_desc VARCHAR(255) NOT NULL DEFAULT '',
       delta_ts DATETIME NOT NULL,
       KEY bugs_delta_ts_idx (delta_ts))";

/// A database of its own, with Bugzilla's `push_notify` and a minimal
/// `bugs` table, dropped at the end of the test.
pub struct TestDb {
    pub name: String,
}

impl TestDb {
    pub fn new() -> TestDb {
        let name = unique("bzpush_test");
        let mut admin = admin_conn();
        admin
            .query_drop(format!("CREATE DATABASE `{name}`"))
            .expect("create the test database");
        let db = TestDb { name };
        db.conn()
            .query_drop(BUGZILLA_TABLES)
            .expect("create the Bugzilla tables");
        db
    }

    /// The URL bzpush uses to reach this database at `addr`.
    pub fn url_at(&self, addr: &str) -> String {
        test_account_url(addr, &self.name)
    }

    pub fn url(&self) -> String {
        self.url_at(MYSQL_ADDR)
    }

    pub fn conn(&self) -> mysql::Conn {
        mysql::Conn::new(mysql::Opts::from_url(&self.url()).expect("valid URL"))
            .unwrap_or_else(|e| panic!("{START_MARIADB}: {e}"))
    }

    /// Records a change of `bug` the way the PushNotify extension does: in
    /// one transaction, find the bug's row, then update it in place or
    /// insert it. `delta_ts` is a DATETIME literal, or `None` for NOW().
    ///
    /// Returns whether the change landed in the table. It does not when the
    /// poller deletes the row between the SELECT and the UPDATE: the UPDATE
    /// then matches nothing and the change is lost, exactly as it is with
    /// the real extension (which takes no lock either). Nor when InnoDB
    /// picks the transaction as a deadlock victim (an INSERT racing the
    /// poller's DELETE over the unique `bug_id` index) or its lock wait
    /// times out: the transaction is rolled back, as Bugzilla's whole change
    /// would be. Tests that write while a poller runs expect only the
    /// changes that landed.
    pub fn push_notify_change(conn: &mut mysql::Conn, bug: u32, delta_ts: Option<&str>) -> bool {
        match Self::try_push_notify_change(conn, bug, delta_ts) {
            Ok(landed) => landed,
            // ER_LOCK_DEADLOCK, ER_LOCK_WAIT_TIMEOUT: rolled back.
            Err(mysql::Error::MySqlError(e)) if e.code == 1213 || e.code == 1205 => false,
            Err(e) => panic!("push_notify change of bug {bug}: {e}"),
        }
    }

    fn try_push_notify_change(
        conn: &mut mysql::Conn,
        bug: u32,
        delta_ts: Option<&str>,
    ) -> Result<bool, mysql::Error> {
        // Dropped without a commit on an error: rolled back.
        let mut tx = conn.start_transaction(mysql::TxOpts::default())?;
        let id: Option<i64> =
            tx.exec_first("SELECT id FROM push_notify WHERE bug_id = ?", (bug,))?;
        let ts = delta_ts.map_or("NOW()".to_string(), |t| format!("'{t}'"));
        let landed = match id {
            Some(id) => {
                tx.exec_drop(
                    format!("UPDATE push_notify SET delta_ts = {ts} WHERE id = ?"),
                    (id,),
                )?;
                // Counts changed rows only (no CLIENT_FOUND_ROWS): 0 is also
                // an unchanged NOW() in the same second. A locking read sees
                // the current row, not the transaction's snapshot.
                tx.affected_rows() == 1 || {
                    let current: Option<i64> =
                        tx.exec_first("SELECT id FROM push_notify WHERE id = ? FOR UPDATE", (id,))?;
                    current.is_some()
                }
            }
            None => {
                tx.exec_drop(
                    format!("INSERT INTO push_notify (bug_id, delta_ts) VALUES (?, {ts})"),
                    (bug,),
                )?;
                true
            }
        };
        tx.commit()?;
        Ok(landed)
    }

    /// Fills `push_notify` with one row per bug in `bugs`, all stamped
    /// `delta_ts` (a DATETIME literal), 1000 rows per INSERT: a large
    /// backlog in seconds rather than one transaction per row.
    pub fn push_notify_backlog(&self, bugs: std::ops::Range<u32>, delta_ts: &str) {
        let mut conn = self.conn();
        let bugs: Vec<u32> = bugs.collect();
        for chunk in bugs.chunks(1000) {
            let values: Vec<String> = chunk
                .iter()
                .map(|bug| format!("({bug},'{delta_ts}')"))
                .collect();
            conn.query_drop(format!(
                "INSERT INTO push_notify (bug_id, delta_ts) VALUES {}",
                values.join(",")
            ))
            .expect("insert a backlog chunk");
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Ok(mut admin) = try_admin_conn() {
            let _ = admin.query_drop(format!("DROP DATABASE IF EXISTS `{}`", self.name));
        }
    }
}

/// A connection as the test account, with no database; an error if
/// MariaDB does not answer or refuses the account.
pub fn try_admin_conn() -> Result<mysql::Conn, mysql::Error> {
    let opts = mysql::OptsBuilder::new()
        .ip_or_hostname(Some("127.0.0.1"))
        .tcp_port(3306)
        .user(Some(TEST_USER))
        .pass(Some(TEST_PASSWORD))
        .tcp_connect_timeout(Some(Duration::from_secs(5)));
    mysql::Conn::new(opts)
}

/// [`try_admin_conn`]; fails the test, saying to run `./test`, if it
/// cannot log in.
pub fn admin_conn() -> mysql::Conn {
    try_admin_conn().unwrap_or_else(|e| panic!("{START_MARIADB}: {e}"))
}
