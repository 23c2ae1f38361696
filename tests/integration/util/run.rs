//! Harness for `bzpush run` and `bzpush check`: the all-in-one process on
//! a free port, rows in Bugzilla's `bugs` table, a port nothing listens
//! on, and MariaDB users and broker exchanges that vanish with the test.

use std::net::TcpListener;
use std::time::Duration;

use lapin::{Connection, ConnectionProperties};
use mysql::prelude::Queryable;

use super::{
    AMQP_ADDR, BROKER_TIMEOUT, Bzpush, TestDb, admin_conn, amqp_url_at, delete_exchange, unique,
    within,
};

const STARTUP: Duration = Duration::from_secs(20);

impl Bzpush {
    /// `bzpush run` against `db` on a free port, polling every 100 ms, with
    /// a poller lock of its own and `extra` settings; returns once it
    /// listens (see [`Bzpush::listen_addr`]).
    pub fn run_on(db: &TestDb, extra: &[(&str, String)]) -> Bzpush {
        let mut env = vec![("BZPUSH_LOCK_NAME", format!("bzpush.{}", db.name))];
        env.extend(extra.iter().cloned());
        Bzpush::run_url(db.url(), &env)
    }

    /// `bzpush run` against the database at `url` on a free port, polling
    /// every 100 ms, with the default lock name (unless `extra` names one)
    /// and `extra` settings; returns once it listens.
    pub fn run_url(url: String, extra: &[(&str, String)]) -> Bzpush {
        let mut env = vec![
            ("BZPUSH_DATABASE_URL", url),
            ("BZPUSH_LISTEN", "127.0.0.1:0".to_string()),
            ("BZPUSH_POLL_INTERVAL", "100ms".to_string()),
            ("BZPUSH_LOG", "debug".to_string()),
        ];
        env.extend(extra.iter().cloned());
        let server = Bzpush::start(&["run"], &env);
        assert!(
            server.wait_listening(STARTUP),
            "bzpush run did not start:\n{}",
            server.log()
        );
        server
    }
}

impl TestDb {
    /// Sets `bugs.delta_ts` of `bug` (a DATETIME literal), inserting the
    /// bug if it is not there: what Bugzilla does on every change.
    pub fn set_bug(&self, bug: u32, delta_ts: &str) {
        self.conn()
            .exec_drop(
                "INSERT INTO bugs (bug_id, delta_ts) VALUES (?, ?)
                 ON DUPLICATE KEY UPDATE delta_ts = VALUES(delta_ts)",
                (bug, delta_ts),
            )
            .expect("set bugs.delta_ts");
    }
}

/// `127.0.0.1:PORT` where nothing listens: connecting is refused at once.
pub fn closed_port() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let addr = listener.local_addr().expect("its address");
    drop(listener);
    addr.to_string()
}

/// A MariaDB user of its own, with a password, dropped at the end of the
/// test.
pub struct TestUser {
    pub name: String,
    pub password: String,
}

impl TestUser {
    /// A new user `bz_…` with `grants`, each a privilege clause and its
    /// object as in `GRANT <clause> TO user`, e.g. `SELECT ON db.t`.
    pub fn new(grants: &[String]) -> TestUser {
        let user = TestUser {
            name: unique("bz"),
            password: unique("Secret"),
        };
        let mut admin = admin_conn();
        admin
            .query_drop(format!(
                "CREATE USER '{}'@'%' IDENTIFIED BY '{}'",
                user.name, user.password
            ))
            .expect("create the test user");
        for grant in grants {
            admin
                .query_drop(format!("GRANT {grant} TO '{}'@'%'", user.name))
                .unwrap_or_else(|e| panic!("GRANT {grant}: {e}"));
        }
        user
    }

    /// The URL of `db` as this user.
    pub fn url(&self, db: &TestDb) -> String {
        format!(
            "mysql://{}:{}@{}/{}",
            self.name,
            self.password,
            super::MYSQL_ADDR,
            db.name
        )
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        if let Ok(mut admin) = super::try_admin_conn() {
            let _ = admin.query_drop(format!("DROP USER IF EXISTS '{}'@'%'", self.name));
        }
    }
}

/// The name of an exchange that something under test declares; deleted
/// from the broker at the end of the test.
pub struct ExchangeName(pub String);

impl ExchangeName {
    pub fn new() -> ExchangeName {
        ExchangeName(unique("bzpush.test"))
    }
}

impl Drop for ExchangeName {
    fn drop(&mut self) {
        let url = amqp_url_at(AMQP_ADDR);
        let connect = Connection::connect(&url, ConnectionProperties::default());
        if let Some(Ok(connection)) = within(BROKER_TIMEOUT, connect) {
            delete_exchange(&connection, &self.0);
            let _ = within(BROKER_TIMEOUT, connection.close(200, "test done".into()));
        }
    }
}
