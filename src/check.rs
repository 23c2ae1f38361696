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
            check_time_zone(report, &mut db);
            Some(db)
        }
        Err(e) => {
            report.line(Err(format!(
                "database {url}: {}",
                advice(&e, "is the server running, and BZPUSH_DATABASE_URL right?")
            )));
            None
        }
    }
}

/// Warns (never fails) when the database's clock is not on UTC: a clock on
/// local time goes back an hour when summer time ends, and a change stamped
/// in the repeated hour is earlier than changes already sent. It is still
/// delivered live, but a `since` catch-up, which goes by time, cannot see
/// it.
fn check_time_zone(report: &mut Report, db: &mut Conn) {
    let zones: Option<(String, String)> = db
        .query_first("SELECT @@time_zone, @@system_time_zone")
        .ok()
        .flatten();
    let Some((session, system)) = zones else {
        return;
    };
    let line = match time_zone_warning(&session, &system) {
        Some(zone) => format!(
            "warn  database time zone: {zone}, not UTC — when its clock goes back (summer \
             time ending), a change stamped in the repeated hour is still delivered live, \
             but a client's `since` catch-up cannot see it; run the server on UTC \
             (default_time_zone = '+00:00')"
        ),
        None => "ok    database time zone: UTC".to_string(),
    };
    let _ = writeln!(report.out, "{line}");
}

/// The zone changes are stamped in, if it is not UTC. `SYSTEM` means the
/// server's system zone.
fn time_zone_warning(time_zone: &str, system_time_zone: &str) -> Option<String> {
    let zone = if time_zone.eq_ignore_ascii_case("SYSTEM") {
        system_time_zone
    } else {
        time_zone
    };
    let utc = [
        "UTC",
        "+00:00",
        "-00:00",
        "Etc/UTC",
        "Etc/UCT",
        "UCT",
        "Universal",
        "Etc/Universal",
        "Zulu",
        "Etc/Zulu",
        "GMT",
        "Etc/GMT",
        "Coordinated Universal Time",
    ];
    (!utc.iter().any(|u| u.eq_ignore_ascii_case(zone))).then(|| {
        if zone == time_zone {
            zone.to_string()
        } else {
            format!("SYSTEM ({zone})")
        }
    })
}

/// The error, and what to do about it.
fn advice(error: &mysql::Error, otherwise: &str) -> String {
    let todo = match error {
        mysql::Error::MySqlError(e) if e.code == 1045 => "check the user and password in the URL",
        mysql::Error::MySqlError(e) if e.code == 1049 => "check the database name in the URL",
        mysql::Error::MySqlError(_) => otherwise,
        _ => "is the server running and reachable at that host and port?",
    };
    format!("{error} — {todo}")
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
            report.line(Err(format!(
                "broker {url}: {e} — is RabbitMQ running, and BZPUSH_AMQP_URL (user, password, vhost) right?"
            )));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_time_zone_other_than_utc_is_named() {
        assert_eq!(time_zone_warning("SYSTEM", "UTC"), None);
        assert_eq!(time_zone_warning("+00:00", "CET"), None);
        assert_eq!(time_zone_warning("SYSTEM", "Etc/UTC"), None);
        assert_eq!(
            time_zone_warning("SYSTEM", "CET"),
            Some("SYSTEM (CET)".to_string())
        );
        assert_eq!(
            time_zone_warning("Europe/Berlin", "UTC"),
            Some("Europe/Berlin".to_string())
        );
        assert_eq!(
            time_zone_warning("+01:00", "UTC"),
            Some("+01:00".to_string())
        );
        // London is at +00:00 in winter, and still goes back an hour.
        assert_eq!(
            time_zone_warning("Europe/London", "UTC"),
            Some("Europe/London".to_string())
        );
    }
}
