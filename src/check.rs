//! `bzpush check <mode>`: the configuration and every dependency that mode
//! names, one line per check, with what to do when one fails.
//!
//! Usable as `ExecStartPre=`: the answer is the exit status. A check only
//! looks: it reads, attempts a DELETE that matches no row, and declares an
//! exchange exactly as the publisher would; it never changes data, and never
//! creates a queue (serve's queues are probed: see [`pulse::probe_queue`]).
//! Credentials never appear in what it prints.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use lapin::{Connection, ConnectionProperties};
use log::Level;
use mysql::Conn;
use mysql::prelude::Queryable;

use crate::capacity::Capacity;
use crate::config::{
    AmqpUrl, Config, DatabaseUrl, Given, Mode, PollerConfig, ServeConfig, ServerConfig, Setting,
    Source, key,
};
use crate::hub::Budget;
use crate::pulse::{ConsumerSetup, QueueState};
use crate::{database, logging, poller, pulse};

/// MySQL/MariaDB's ER_NO_SUCH_TABLE.
const NO_SUCH_TABLE: u16 = 1146;
/// ER_BAD_DB_ERROR: no database of that name.
const NO_SUCH_DATABASE: u16 = 1049;
/// ER_DBACCESS_DENIED_ERROR: no such database, or none this user may use
/// (the server does not say which).
const DATABASE_DENIED: u16 = 1044;
/// A check query slower than this fails.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Runs every check of `config`, printing one line each to `out`. `given`:
/// the settings the user gave; a failing default says it is one, and given
/// settings the mode does not read are listed. `true` if all passed.
pub fn run(config: &Config, given: &Given, out: &mut dyn Write) -> bool {
    let mut report = Report {
        out,
        ok: true,
        journal: logging::stdout_is_journal(),
        given,
    };
    report.line(Ok("configuration: valid".to_string()));
    if let Some(unread) = not_read_by(config.mode(), given) {
        report.line(Ok(unread));
    }
    match config {
        Config::Poll(c) => {
            check_poller(&mut report, &c.poller, false);
            check_broker(&mut report, &c.amqp, std::slice::from_ref(&c.exchange));
        }
        Config::Run(c) => {
            check_listen(&mut report, c.server.listen);
            report_origins(&mut report, &c.server.allowed_origins);
            report_limits(&mut report, &c.server);
            check_poller(&mut report, &c.poller, true);
        }
        // `bzpush check demo` is refused while parsing: a demo needs nothing.
        Config::Demo(_) => {}
        Config::Serve(c) => {
            check_listen(&mut report, c.server.listen);
            report_origins(&mut report, &c.server.allowed_origins);
            report_limits(&mut report, &c.server);
            let exchanges: Vec<String> = c.feeds.iter().map(|f| f.exchange.clone()).collect();
            check_broker(&mut report, &c.amqp, &exchanges);
            check_queues(&mut report, c);
            if let Some(url) = &c.catchup_database
                && let Some(mut db) = check_database(&mut report, url, &key::CATCHUP_DATABASE_URL)
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
    /// `out` is the journal: each line starts with its priority, so a
    /// failed check at boot shows in `journalctl -p warning`.
    journal: bool,
    given: &'a Given,
}

impl Report<'_> {
    fn line(&mut self, result: Result<String, String>) {
        match result {
            Ok(what) => self.print(Level::Info, &format!("ok    {what}")),
            Err(what) => {
                self.ok = false;
                self.print(Level::Error, &format!("FAIL  {what}"));
            }
        }
    }

    /// A problem that does not fail the check.
    fn warn(&mut self, what: &str) {
        self.print(Level::Warn, &format!("warn  {what}"));
    }

    /// `url`, saying so if it is `setting`'s default: a failing default is
    /// most likely a setting never made.
    fn url(&self, url: &dyn std::fmt::Display, setting: &Setting) -> String {
        if self.given.iter().any(|s| s.name == setting.name) {
            url.to_string()
        } else {
            format!("{url} (the default; set {})", setting.env_var())
        }
    }

    fn print(&mut self, level: Level, line: &str) {
        let prefix = if self.journal {
            logging::priority(level)
        } else {
            ""
        };
        let _ = writeln!(self.out, "{prefix}{line}");
    }
}

/// The settings `given` that `mode` does not read, as `not read by run:
/// BZPUSH_AMQP_URL (poll, serve)`; `None` if it reads them all. One
/// environment file may serve every unit, so this is no failure, but a
/// setting meant for this mode and misfiled shows here.
fn not_read_by(mode: Mode, given: &Given) -> Option<String> {
    let unread: Vec<String> = given
        .iter()
        .filter(|s| !s.read_by(mode))
        .map(|s| {
            let modes: Vec<&str> = s.modes.iter().map(|m| m.name()).collect();
            format!("{} ({})", s.env_var(), modes.join(", "))
        })
        .collect();
    (!unread.is_empty()).then(|| format!("not read by {mode}: {}", unread.join(", ")))
}

fn check_poller(report: &mut Report, config: &PollerConfig, catchup: bool) {
    let Some(mut db) = check_database(report, &config.database, &key::DATABASE_URL) else {
        return;
    };
    check_lock(report, &mut db, &config.lock_name);
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
            // `run` checks the same grant for catch-up below.
            if !catchup {
                check_bugs_table(report, &mut db, "PushNotify race check", false);
            }
        }
        Source::Bugs => {
            check_bugs_table(report, &mut db, "source bugs", true);
            check_state_directory(report, config);
        }
    }
    if catchup {
        check_bugs_table(report, &mut db, "catch-up", false);
    }
}

/// Who holds the poller lock. Held is no failure (it is how a standby
/// starts), but it is said, naming the holder: a forgotten poller elsewhere
/// would make this one a standby that delivers nothing.
fn check_lock(report: &mut Report, db: &mut Conn, name: &str) {
    // NULL when free: a bare u64 would make the mysql crate panic.
    let holder: Result<Option<Option<u64>>, _> = db.exec_first("SELECT IS_USED_LOCK(?)", (name,));
    match holder.map(Option::flatten) {
        Ok(Some(id)) => {
            let holder = poller::lock_holder(db, id);
            report.warn(&format!(
                "lock {name:?}: held by {holder}; this poller will wait as a standby \
                 until it is released (if that is no poller of this database, set \
                 BZPUSH_LOCK_NAME)"
            ));
        }
        Ok(None) => report.line(Ok(format!(
            "lock {name:?}: free; this poller will be the active one"
        ))),
        Err(e) => report.line(Err(format!(
            "lock {name:?}: {}",
            advice(&e, "is the server MariaDB or MySQL?")
        ))),
    }
}

/// Where source `bugs` keeps its watermark. None is a valid choice, and a
/// missing folder is created at the first save; a path that is there but
/// no folder fails.
fn check_state_directory(report: &mut Report, config: &PollerConfig) {
    let Some(dir) = &config.state_directory else {
        report.line(Ok(
            "state directory: none (BZPUSH_STATE_DIRECTORY, or systemd's \
             StateDirectory=): a restarted poller replays only one overlap"
                .into(),
        ));
        return;
    };
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {
            report.line(Ok(format!("state directory {}: present", dir.display())));
        }
        Ok(_) => report.line(Err(format!(
            "state directory {}: not a folder — set BZPUSH_STATE_DIRECTORY to a folder",
            dir.display()
        ))),
        Err(e) => {
            report.warn(&format!(
                "state directory {}: {e} (the poller creates it at its first save)",
                dir.display()
            ));
        }
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
            let until = if purpose == "catch-up" {
                "`since` may be answered partial"
            } else {
                "a change the extension loses to a delete is not caught"
            };
            report.warn(&format!("{e} (until then {until})"));
        }
        result => report.line(result),
    }
}

/// Connects to `url`, the value of `setting`.
fn check_database(report: &mut Report, url: &DatabaseUrl, setting: &Setting) -> Option<Conn> {
    match database::connect(url, TIMEOUT) {
        Ok(mut db) => {
            let version: Option<String> = db.query_first("SELECT VERSION()").ok().flatten();
            report.line(Ok(format!(
                "database {url}: reachable over {} ({})",
                database::route(url),
                version.as_deref().unwrap_or("unknown version")
            )));
            check_time_zone(report, &mut db);
            Some(db)
        }
        Err(e) => {
            let todo = format!("check {}", setting.env_var());
            report.line(Err(format!(
                "database {}: {}",
                report.url(url, setting),
                advice(&e, &todo)
            )));
            None
        }
    }
}

/// Binds the listen address and lets it go at once: a port another process
/// holds, or one this user may not bind, fails here rather than when the
/// service starts.
fn check_listen(report: &mut Report, addr: SocketAddr) {
    report.line(match TcpListener::bind(addr) {
        Ok(_) => Ok(format!("listen {addr}: free")),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(format!(
            "listen {addr}: in use ({e}) — another process listens there (`ss -ltnp 'sport = :{}'` \
             names it): stop it, or set BZPUSH_LISTEN to a free address",
            addr.port()
        )),
        Err(e) => Err(format!(
            "listen {addr}: cannot bind ({e}) — ports below 1024 need privileges bzpush does not \
             have, and the IP must belong to this host: set BZPUSH_LISTEN"
        )),
    });
}

/// The origins browsers may connect from, as they will be compared with
/// what browsers send: an entry that differs from what was written shows.
fn report_origins(report: &mut Report, allowed: &Option<Vec<String>>) {
    report.line(Ok(match allowed {
        None => "allowed origins: any (*)".to_string(),
        Some(list) => format!("allowed origins: {}", list.join(", ")),
    }));
}

/// The limits a client meets, and whether this machine allows
/// `BZPUSH_MAX_CONNECTIONS` connections (a failure if not: the server would
/// hold fewer).
fn report_limits(report: &mut Report, server: &ServerConfig) {
    let budget = Budget::new(
        server.max_subscriptions_total,
        server.max_connections_per_address,
        server.max_connections,
    );
    report.line(Ok(format!(
        "connections: at most {} (BZPUSH_MAX_CONNECTIONS), {} sockets from one client address \
         (BZPUSH_MAX_CONNECTIONS_PER_ADDRESS); X-Forwarded-For read from: {} \
         (BZPUSH_TRUSTED_PROXIES)",
        server.max_connections, server.max_connections_per_address, server.trusted_proxies
    )));
    report.line(Ok(format!(
        "subscriptions: at most {} per connection (BZPUSH_MAX_SUBSCRIPTIONS), {} per client \
         address, {} in all (BZPUSH_MAX_SUBSCRIPTIONS_TOTAL)",
        server.max_subscriptions,
        budget.share(),
        server.max_subscriptions_total
    )));
    let capacity = Capacity::measure();
    report.line(match capacity.shortfall(server.max_connections) {
        None => Ok(format!("this machine allows {}", capacity.describe())),
        Some(why) => Err(why),
    });
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
    match time_zone_warning(&session, &system) {
        Some(zone) => report.warn(&format!(
            "database time zone: {zone}, not UTC — when its clock goes back (summer \
             time ending), a change stamped in the repeated hour is still delivered live, \
             but a client's `since` catch-up cannot see it, and `serve` without a \
             catch-up database takes its stamps for UTC; run the server on UTC \
             (default_time_zone = '+00:00')"
        )),
        None => report.line(Ok("database time zone: UTC".to_string())),
    }
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

/// The error as a sentence, and what to do about it.
fn advice(error: &mysql::Error, otherwise: &str) -> String {
    let todo = match error {
        // The error says which account was tried (database::connect).
        mysql::Error::MySqlError(e) if database::ACCESS_DENIED.contains(&e.code) => {
            "check the user and password in the URL"
        }
        mysql::Error::MySqlError(e) if e.code == NO_SUCH_DATABASE => {
            "check the database name in the URL"
        }
        mysql::Error::MySqlError(e) if e.code == DATABASE_DENIED => {
            "check the database name in the URL, and GRANT this user access to that database"
        }
        mysql::Error::MySqlError(_) => otherwise,
        _ => "is the server running and reachable at that host and port, or socket?",
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
            let todo = if e.advised() {
                ""
            } else if e.refused() {
                " — check the user, password and vhost in BZPUSH_AMQP_URL"
            } else {
                " — is RabbitMQ running and reachable at that host and port?"
            };
            let url = report.url(url, &key::AMQP_URL);
            report.line(Err(format!("broker {url}: {e}{todo}")));
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

/// Each feed's queue next to the configuration: a queue that exists with
/// other arguments (a changed `BZPUSH_QUEUE_EXPIRES`) is a warning, since
/// serve consumes it as it is; the line says how to apply the setting.
fn check_queues(report: &mut Report, config: &ServeConfig) {
    let properties = ConnectionProperties::default().with_connection_name("bzpush check".into());
    let connecting = Connection::connect(config.amqp.secret(), properties);
    // Unreachable: the broker line above already says so.
    let Ok(connection) = pulse::wait("connecting", connecting) else {
        return;
    };
    for (feed, f) in config.feeds.iter().enumerate() {
        let setup = ConsumerSetup {
            feed,
            exchange: f.exchange.clone(),
            queue: pulse::queue_name(&config.queue_prefix, &f.exchange),
            expires: config.queue_expires,
        };
        let queue = &setup.queue;
        match pulse::probe_queue(&connection, &config.amqp, &setup) {
            Ok(QueueState::Missing) => {
                report.line(Ok(format!(
                    "queue {queue:?}: not there yet; serve creates it"
                )));
            }
            Ok(QueueState::Matches) => {
                report.line(Ok(format!("queue {queue:?}: exists as configured")));
            }
            Ok(QueueState::Differs(what)) => {
                report.warn(&what);
            }
            Err(e) => report.line(Err(format!(
                "queue {queue:?}: {e} — may the user in BZPUSH_AMQP_URL configure and read it?"
            ))),
        }
    }
    let _ = pulse::wait("closing", connection.close(200, "check done".into()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_settings_the_mode_does_not_read_are_listed_with_their_modes() {
        let given: Given = vec![&key::AMQP_URL, &key::LISTEN, &key::FEEDS];
        assert_eq!(
            not_read_by(Mode::Run, &given).as_deref(),
            Some("not read by run: BZPUSH_AMQP_URL (poll, serve), BZPUSH_FEEDS (serve)")
        );
        assert_eq!(not_read_by(Mode::Serve, &given), None);
    }

    #[test]
    fn a_failing_default_url_says_it_is_the_default() {
        let given: Given = vec![&key::AMQP_URL];
        let mut out = Vec::new();
        let report = Report {
            out: &mut out,
            ok: true,
            journal: false,
            given: &given,
        };
        let url = "mysql://bugs@localhost:3306/bugs";
        assert_eq!(
            report.url(&url, &key::DATABASE_URL),
            "mysql://bugs@localhost:3306/bugs (the default; set BZPUSH_DATABASE_URL)"
        );
        assert_eq!(
            report.url(&"amqp://u:***@h", &key::AMQP_URL),
            "amqp://u:***@h"
        );
    }

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
