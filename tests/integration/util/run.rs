//! Harness for `bzpush run` and `bzpush check`: the all-in-one process on
//! a free port, rows in Bugzilla's `bugs` table, a port nothing listens
//! on, and MariaDB users and broker exchanges that vanish with the test.

use std::net::TcpListener;
use std::time::Duration;

use lapin::{Connection, ConnectionProperties};
use mysql::prelude::Queryable;

use super::{
    AMQP_ADDR, BROKER_TIMEOUT, Bzpush, STARTUP, TestDb, admin_conn, amqp_url_at, delete_exchange,
    unique, within,
};

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
            // What the tests write: the extension's table (`extra` may
            // choose `bugs`, which is the default).
            ("BZPUSH_SOURCE", "push_notify".to_string()),
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
    /// The database's `NOW()` moved by `secs`, as a DATETIME literal for
    /// SQL and as the `delta_ts` Pulse carries: a stamp Bugzilla could
    /// write now, which the poller's audit of `bugs` reads.
    pub fn stamp(&self, secs: i64) -> (String, String) {
        let sql: String = self
            .conn()
            .exec_first(
                "SELECT DATE_FORMAT(NOW() + INTERVAL ? SECOND, '%Y-%m-%d %H:%i:%s')",
                (secs,),
            )
            .expect("ask NOW()")
            .unwrap_or_default();
        let wire = sql.replace(' ', "T");
        (sql, wire)
    }

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
    /// The account's host part: `%`, or `localhost` for an account that
    /// matches only Unix-socket logins (as the README creates them).
    host: &'static str,
}

impl TestUser {
    /// A new user `bz_…'@'%'` with `grants`, each a privilege clause and
    /// its object as in `GRANT <clause> TO user`, e.g. `SELECT ON db.t`.
    pub fn new(grants: &[String]) -> TestUser {
        TestUser::at_host("%", grants)
    }

    /// As [`TestUser::new`], for the account host `host`.
    pub fn at_host(host: &'static str, grants: &[String]) -> TestUser {
        let user = TestUser {
            name: unique("bz"),
            password: unique("Secret"),
            host,
        };
        let mut admin = admin_conn();
        admin
            .query_drop(format!(
                "CREATE USER '{}'@'{host}' IDENTIFIED BY '{}'",
                user.name, user.password
            ))
            .expect("create the test user");
        for grant in grants {
            admin
                .query_drop(format!("GRANT {grant} TO '{}'@'{host}'", user.name))
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
            let _ = admin.query_drop(format!(
                "DROP USER IF EXISTS '{}'@'{}'",
                self.name, self.host
            ));
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

/// A MariaDB server of the test's own, with Bugzilla's tables in database
/// `bugs`; stopped and removed at the end of the test. For what must not
/// touch the shared server: its time zone (`+01:00`: a Bugzilla database
/// on local time east of UTC), `read_only`, replication.
pub struct PrivateServer {
    child: std::process::Child,
    dir: std::path::PathBuf,
    pub addr: String,
}

impl PrivateServer {
    /// A server whose clock is on time zone `zone`.
    pub fn start(zone: &str) -> PrivateServer {
        PrivateServer::start_with(&[format!("--default-time-zone={zone}")])
    }

    /// A server started with `args` besides the harness's own.
    pub fn start_with(args: &[String]) -> PrivateServer {
        const INSTALL: &str = "mariadb-install-db and mariadbd must be installed \
                               (run ./test, which installs them)";
        let dir = std::env::temp_dir().join(unique("bzpush-zoned"));
        let data = dir.join("data");
        let installed = std::process::Command::new("mariadb-install-db")
            .args(["--no-defaults", "--skip-test-db", "--user=root"])
            .arg(format!("--datadir={}", data.display()))
            .arg("--auth-root-authentication-method=normal")
            .output()
            .unwrap_or_else(|e| panic!("{INSTALL}: {e}"));
        assert!(
            installed.status.success(),
            "mariadb-install-db failed: {}",
            String::from_utf8_lossy(&installed.stderr)
        );
        let addr = closed_port();
        let port = addr.rsplit(':').next().unwrap_or_default().to_string();
        let child = std::process::Command::new("mariadbd")
            .args(["--no-defaults", "--user=root", "--bind-address=127.0.0.1"])
            .args(["--innodb-buffer-pool-size=16M", "--skip-log-bin"])
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", dir.join("sock").display()))
            .arg(format!("--pid-file={}", dir.join("pid").display()))
            .arg(format!("--log-error={}", dir.join("error.log").display()))
            .arg(format!("--port={port}"))
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{INSTALL}: {e}"));
        let server = PrivateServer { child, dir, addr };
        assert!(
            super::wait_until(STARTUP, || server.try_conn(None).is_ok()),
            "the test's own mariadbd did not start: see {}",
            server.dir.join("error.log").display()
        );
        let mut conn = server
            .try_conn(None)
            .expect("connect to the test's mariadbd");
        conn.query_drop("CREATE DATABASE bugs")
            .expect("create database bugs");
        conn.query_drop("USE bugs").expect("use bugs");
        conn.query_drop(super::BUGZILLA_TABLES)
            .expect("create the Bugzilla tables");
        server
    }

    fn try_conn(&self, db: Option<&str>) -> Result<mysql::Conn, mysql::Error> {
        let (host, port) = self.addr.rsplit_once(':').unwrap_or_default();
        let opts = mysql::OptsBuilder::new()
            .ip_or_hostname(Some(host))
            .tcp_port(port.parse().unwrap_or_default())
            .user(Some("root"))
            .db_name(db)
            .tcp_connect_timeout(Some(Duration::from_secs(5)));
        mysql::Conn::new(opts)
    }

    /// A connection to database `bugs`.
    pub fn conn(&self) -> mysql::Conn {
        self.try_conn(Some("bugs"))
            .expect("connect to the test's mariadbd")
    }

    /// The URL bzpush uses for database `bugs`.
    pub fn url(&self) -> String {
        format!("mysql://root@{}/bugs", self.addr)
    }

    /// The server's `NOW()`, as a DATETIME literal.
    pub fn now(&self) -> String {
        self.conn()
            .query_first("SELECT DATE_FORMAT(NOW(), '%Y-%m-%d %H:%i:%s')")
            .expect("ask NOW()")
            .unwrap_or_default()
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
