//! `bzpush check <mode>`: the configuration and every dependency that mode
//! names, one line per check, with what to do when one fails.
//!
//! Usable as `ExecStartPre=`: the answer is the exit status. A check only
//! looks: it reads, attempts a DELETE that matches no row, and declares an
//! exchange exactly as the publisher would; it never changes data, and never
//! creates a queue. Credentials never appear in what it prints.

use std::io::Write;
use std::time::Duration;

use lapin::{Connection, ConnectionProperties};
use mysql::Conn;
use mysql::prelude::Queryable;

use crate::config::{AmqpUrl, DatabaseUrl, Mode, PollerConfig, Source};
use crate::{database, pulse};

/// MySQL/MariaDB's ER_NO_SUCH_TABLE.
const NO_SUCH_TABLE: u16 = 1146;
/// ER_ACCESS_DENIED_ERROR: wrong user or password.
const ACCESS_DENIED: u16 = 1045;
/// ER_BAD_DB_ERROR: no database of that name.
const NO_SUCH_DATABASE: u16 = 1049;
/// ER_DBACCESS_DENIED_ERROR: no such database, or none this user may use
/// (the server does not say which).
const DATABASE_DENIED: u16 = 1044;
/// A check query slower than this fails.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Runs every check of `mode`, printing one line each to `out`. `true` if
/// all passed.
pub fn run(mode: &Mode, out: &mut dyn Write) -> bool {
    let mut report = Report { out, ok: true };
    report.line(Ok("configuration: valid".to_string()));
    match mode {
        Mode::Poll(c) => {
            check_poller(&mut report, &c.poller, false);
            check_broker(&mut report, &c.amqp, std::slice::from_ref(&c.exchange));
        }
        Mode::Run(c) => check_poller(&mut report, &c.poller, true),
        Mode::Serve(c) => {
            let exchanges: Vec<String> = c.feeds.iter().map(|f| f.exchange.clone()).collect();
            check_broker(&mut report, &c.amqp, &exchanges);
            if let Some(url) = &c.catchup_database
                && let Some(mut db) = check_database(&mut report, url)
            {
                check_bugs_table(&mut report, &mut db, "catch-up", true);
            }
        }
    }
    report.ok
}

struct Report<'a> {
    out: &'a mut dyn Write,
    ok: bool,
}

impl Report<'_> {
    fn line(&mut self, result: Result<String, String>) {
        let line = match result {
            Ok(what) => format!("ok    {what}"),
            Err(what) => {
                self.ok = false;
                format!("FAIL  {what}")
            }
        };
        let _ = writeln!(self.out, "{line}");
    }
}

fn check_poller(report: &mut Report, config: &PollerConfig, catchup: bool) {
    let Some(mut db) = check_database(report, &config.database) else {
        return;
    };
    match config.source {
        Source::PushNotify => {
            let read = db.query_drop("SELECT id, bug_id, delta_ts FROM push_notify LIMIT 0");
            // Only a table that is not there calls for the extension; one
            // that is there but refused calls for a GRANT.
            let missing =
                matches!(&read, Err(mysql::Error::MySqlError(e)) if e.code == NO_SUCH_TABLE);
            let todo = if missing {
                "install Bugzilla's PushNotify extension, or set BZPUSH_SOURCE=bugs"
            } else {
                "GRANT SELECT, DELETE ON push_notify"
            };
            report.line(
                read.map(|()| "table push_notify: present, SELECT allowed".into())
                    .map_err(|e| format!("table push_notify: {}", advice(&e, todo))),
            );
            // No privilege would help a missing table: the line above says
            // what would.
            if !missing {
                // Matches no row (ids start at 1): proves the privilege only.
                let delete = db.query_drop("DELETE FROM push_notify WHERE id = 0");
                report.line(
                    delete
                        .map(|()| "table push_notify: DELETE allowed".into())
                        .map_err(|e| format!("table push_notify: {}", advice(&e, todo))),
                );
            }
        }
        Source::Bugs => check_bugs_table(report, &mut db, "source bugs", true),
    }
    if catchup {
        check_bugs_table(report, &mut db, "catch-up", false);
    }
}

/// Reading `bugs`. For `run`'s catch-up it is not `required`: without it
/// the server still works and answers `partial`, so it only warns.
fn check_bugs_table(report: &mut Report, db: &mut Conn, purpose: &str, required: bool) {
    let read = db.query_drop("SELECT bug_id, delta_ts FROM bugs LIMIT 0");
    let result = read
        .map(|()| format!("table bugs ({purpose}): SELECT allowed"))
        .map_err(|e| {
            format!(
                "table bugs ({purpose}): {}",
                advice(&e, "GRANT SELECT (bug_id, delta_ts) ON bugs")
            )
        });
    match result {
        Err(e) if !required => {
            let _ = writeln!(
                report.out,
                "warn  {e} (until then `since` may be answered partial)"
            );
        }
        result => report.line(result),
    }
}

fn check_database(report: &mut Report, url: &DatabaseUrl) -> Option<Conn> {
    match database::connect(url, TIMEOUT) {
        Ok(mut db) => {
            let version: Option<String> = db.query_first("SELECT VERSION()").ok().flatten();
            report.line(Ok(format!(
                "database {url}: reachable ({})",
                version.as_deref().unwrap_or("unknown version")
            )));
            Some(db)
        }
        Err(e) => {
            report.line(Err(format!(
                "database {url}: {}",
                advice(&e, "check BZPUSH_DATABASE_URL")
            )));
            None
        }
    }
}

/// The error as a sentence, and what to do about it.
fn advice(error: &mysql::Error, otherwise: &str) -> String {
    let todo = match error {
        mysql::Error::MySqlError(e) if e.code == ACCESS_DENIED => {
            "check the user and password in the URL"
        }
        mysql::Error::MySqlError(e) if e.code == NO_SUCH_DATABASE => {
            "check the database name in the URL"
        }
        mysql::Error::MySqlError(e) if e.code == DATABASE_DENIED => {
            "check the database name in the URL, and GRANT this user access to that database"
        }
        mysql::Error::MySqlError(_) => otherwise,
        _ => "is the server running and reachable at that host and port?",
    };
    format!("{} — {todo}", database::sentence(error))
}

fn check_broker(report: &mut Report, url: &AmqpUrl, exchanges: &[String]) {
    let properties = ConnectionProperties::default().with_connection_name("bzpush check".into());
    // Bounded like every other broker operation: a check must end.
    let connection = match pulse::wait("connecting", Connection::connect(url.secret(), properties))
    {
        Ok(c) => {
            report.line(Ok(format!("broker {url}: reachable")));
            c
        }
        Err(e) => {
            let todo = if e.refused() {
                "check the user, password and vhost in BZPUSH_AMQP_URL"
            } else {
                "is RabbitMQ running and reachable at that host and port?"
            };
            report.line(Err(format!("broker {url}: {e} — {todo}")));
            return;
        }
    };
    for exchange in exchanges {
        // A fresh channel each: a refused declaration closes its channel.
        let declared = pulse::wait("declaring the exchange", async {
            let channel = connection.create_channel().await?;
            pulse::declare_exchange(&channel, exchange).await
        });
        report.line(declared.map(|()| format!("exchange {exchange:?}: declarable (topic, durable)")).map_err(|e| {
            format!(
                "exchange {exchange:?}: {e} — an exchange of that name with another type or \
                 durability exists, or the user may not configure it"
            )
        }));
    }
    let _ = pulse::wait("closing", connection.close(200, "check done".into()));
}
