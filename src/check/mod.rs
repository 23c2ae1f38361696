//! `bzpush check <mode>`: the configuration and every dependency that mode
//! names, one line per check, with what to do when one fails.
//!
//! Usable as `ExecStartPre=`: the answer is the exit status. A check only
//! looks: it reads, attempts a DELETE that matches no row, writes and
//! removes a probe file in the state folder, declares an exchange exactly
//! as the publisher would, and publishes one message that reaches no queue
//! (to see a resource alarm: [`crate::pulse::alarm`]); it never changes
//! data, and never creates a queue (serve's queues are probed: see
//! [`crate::pulse::probe_queue`]). Every node of a broker cluster is tried.
//! Credentials never appear in what it prints. The checks of Bugzilla's
//! database are in `check/bugzilla.rs`, those of the broker in `check/broker.rs`; the
//! server's own (its port, its limits) and the report are here.

mod broker;
mod bugzilla;

use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener};

use log::Level;

use crate::capacity::Capacity;
use crate::config::{Config, Given, Mode, ServerConfig, Setting, key};
use crate::hub::Budget;
use crate::logging;
use broker::{check_broker, check_queues, close};
use bugzilla::{check_bugs_table, check_database, check_poller, check_replica};

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
            check_poller(&mut report, &c.poller, false, c.stale_after);
            if let Some((connection, _)) = check_broker(
                &mut report,
                &c.amqp,
                std::slice::from_ref(&c.exchange),
                true,
            ) {
                close(connection);
            }
        }
        Config::Run(c) => {
            check_listen(&mut report, c.server.listen);
            report_origins(&mut report, &c.server.allowed_origins);
            report_limits(&mut report, &c.server);
            check_poller(&mut report, &c.poller, true, c.stale_after);
        }
        // `bzpush check demo` is refused while parsing: a demo needs nothing.
        Config::Demo(_) => {}
        Config::Serve(c) => {
            check_listen(&mut report, c.server.listen);
            report_origins(&mut report, &c.server.allowed_origins);
            report_limits(&mut report, &c.server);
            let exchanges: Vec<String> = c.feeds.iter().map(|f| f.exchange.clone()).collect();
            // Unreachable: the broker lines already say so.
            if let Some((connection, _)) = check_broker(&mut report, &c.amqp, &exchanges, false) {
                check_queues(&mut report, c, &connection);
                close(connection);
            }
            if let Some(url) = &c.catchup_database
                && let Some(mut db) = check_database(&mut report, url, &key::CATCHUP_DATABASE_URL)
            {
                check_bugs_table(&mut report, &mut db, "catch-up", true);
                check_replica(&mut report, &mut db);
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
}
