//! Stage two: one resolver per mode builds that mode's configuration from
//! the values of stage one ([`Read`]) and what the machine said ([`Host`]).
//!
//! Pure: no environment, no file, no clock, no connection; the same input
//! gives the same configuration. A resolver reads exactly the settings
//! whose table row names its mode (a test holds them to it).

use std::path::PathBuf;

use super::settings::{Setting, key};
use super::url::{amqp_nodes, database_url, server_url};
use super::values::{
    MAX_EXCHANGE_NAME, Value, bugzilla_url, duration, feeds, heartbeat, lock_name, log_level,
    number, number_or, origins, queue_prefix, queue_type, socket_addr, source, state_directory,
    text, trusted_proxies,
};
use super::{
    Config, ConfigError, DemoConfig, Mode, PollConfig, PollerConfig, RunConfig, ServeConfig,
    ServerConfig,
};

/// Where a resolver reads settings from: the user's values, or in a test
/// a recorder of what it read.
pub(super) trait Read {
    /// A setting and its value: given, or its default.
    fn get(&self, setting: &'static Setting) -> Value<'_>;
    /// Whether the user gave `setting` (environment, env file or flag).
    fn given(&self, setting: &'static Setting) -> bool;
}

/// What resolution needs from the machine, read once before it.
pub(super) struct Host {
    /// This machine's name, for serve's default queue names.
    pub hostname: String,
    /// The folder systemd made for `StateDirectory=`, if any.
    pub state_directory: Option<PathBuf>,
}

/// The configuration of `mode` from `values`.
pub(super) fn resolve(mode: Mode, values: &dyn Read, host: &Host) -> Result<Config, ConfigError> {
    Ok(match mode {
        Mode::Run => Config::Run(run(values, host)?),
        Mode::Poll => Config::Poll(poll(values, host)?),
        Mode::Serve => Config::Serve(serve(values, host)?),
        Mode::Demo => Config::Demo(demo(values)?),
    })
}

fn run(v: &dyn Read, host: &Host) -> Result<RunConfig, ConfigError> {
    Ok(RunConfig {
        poller: poller(v, host)?,
        server: server(v)?,
        stale_after: duration(v.get(&key::STALE_AFTER))?,
        log: log_level(v.get(&key::LOG))?,
    })
}

fn poll(v: &dyn Read, host: &Host) -> Result<PollConfig, ConfigError> {
    let mut poller = poller(v, host)?;
    poller.broker_grace = Some(duration(v.get(&key::BROKER_GRACE))?);
    Ok(PollConfig {
        poller,
        amqp: amqp_nodes(v.get(&key::AMQP_URL))?.with_heartbeat(heartbeat(v.get(&key::HEARTBEAT))?),
        exchange: text(v.get(&key::EXCHANGE), MAX_EXCHANGE_NAME)?,
        stale_after: duration(v.get(&key::STALE_AFTER))?,
        log: log_level(v.get(&key::LOG))?,
    })
}

fn serve(v: &dyn Read, host: &Host) -> Result<ServeConfig, ConfigError> {
    let amqp =
        amqp_nodes(v.get(&key::AMQP_URL))?.with_heartbeat(heartbeat(v.get(&key::HEARTBEAT))?);
    let catchup = v.get(&key::CATCHUP_DATABASE_URL);
    Ok(ServeConfig {
        feeds: feeds(v.get(&key::FEEDS))?,
        queue_prefix: queue_prefix(v.get(&key::QUEUE), &amqp, &host.hostname)?,
        queue_expires: duration(v.get(&key::QUEUE_EXPIRES))?,
        queue_type: queue_type(v.get(&key::QUEUE_TYPE))?,
        catchup_database: if catchup.1 == catchup.0.default {
            None
        } else {
            Some(database_url(catchup)?)
        },
        server: server(v)?,
        amqp,
        stale_after: duration(v.get(&key::STALE_AFTER))?,
        log: log_level(v.get(&key::LOG))?,
    })
}

fn demo(v: &dyn Read) -> Result<DemoConfig, ConfigError> {
    // Unset, the demo simulates Bugzilla in memory.
    let database = v.get(&key::DATABASE_URL);
    Ok(DemoConfig {
        database: match v.given(&key::DATABASE_URL) {
            true => Some(server_url(database)?),
            false => None,
        },
        poll_interval: duration(v.get(&key::POLL_INTERVAL))?,
        server: server(v)?,
        listen_given: v.given(&key::LISTEN),
        stale_after: duration(v.get(&key::STALE_AFTER))?,
        log: log_level(v.get(&key::LOG))?,
    })
}

fn poller(v: &dyn Read, host: &Host) -> Result<PollerConfig, ConfigError> {
    let database = database_url(v.get(&key::DATABASE_URL))?;
    let db = database.opts.get_db_name().unwrap_or_default();
    Ok(PollerConfig {
        lock_name: lock_name(v.get(&key::LOCK_NAME), db)?,
        source: source(v.get(&key::SOURCE))?,
        source_given: v.given(&key::SOURCE),
        poll_interval: duration(v.get(&key::POLL_INTERVAL))?,
        batch_size: number(v.get(&key::BATCH_SIZE))?,
        overlap: duration(v.get(&key::OVERLAP))?,
        state_directory: state_directory(
            v.get(&key::STATE_DIRECTORY),
            host.state_directory.clone(),
        )?,
        replay_limit: duration(v.get(&key::REPLAY_LIMIT))?,
        broker_grace: None,
        database,
    })
}

fn server(v: &dyn Read) -> Result<ServerConfig, ConfigError> {
    let max_connections = number(v.get(&key::MAX_CONNECTIONS))?;
    Ok(ServerConfig {
        listen: socket_addr(v.get(&key::LISTEN))?,
        max_connections,
        max_connections_per_address: number_or(
            v.get(&key::MAX_CONNECTIONS_PER_ADDRESS),
            (max_connections / 10).max(1),
        )?,
        max_subscriptions: number(v.get(&key::MAX_SUBSCRIPTIONS))?,
        max_subscriptions_total: number(v.get(&key::MAX_SUBSCRIPTIONS_TOTAL))?,
        trusted_proxies: trusted_proxies(v.get(&key::TRUSTED_PROXIES))?,
        max_message_size: number(v.get(&key::MAX_MESSAGE_SIZE))?,
        outbound_queue: number(v.get(&key::OUTBOUND_QUEUE))?,
        cache_size: number(v.get(&key::CACHE_SIZE))?,
        ping_interval: duration(v.get(&key::PING_INTERVAL))?,
        ping_timeout: duration(v.get(&key::PING_TIMEOUT))?,
        allowed_origins: origins(v.get(&key::ALLOWED_ORIGINS))?,
        bugzilla_url: bugzilla_url(v.get(&key::BUGZILLA_URL))?,
        page_bugs: Vec::new(),
        page_note: None,
    })
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::config::settings::SETTINGS;

    /// Every setting at its default, `given` or not, noting each read.
    struct Recorder {
        given: bool,
        read: RefCell<Vec<&'static str>>,
    }

    impl Read for Recorder {
        fn get(&self, setting: &'static Setting) -> Value<'_> {
            self.read.borrow_mut().push(setting.name);
            (setting, setting.default)
        }

        fn given(&self, setting: &'static Setting) -> bool {
            self.read.borrow_mut().push(setting.name);
            self.given
        }
    }

    /// The table's `modes` are what each resolver reads: help, the man
    /// page and `check` may go by the table.
    #[test]
    fn each_resolver_reads_exactly_the_settings_the_table_gives_its_mode() {
        let host = Host {
            hostname: "h".into(),
            state_directory: None,
        };
        for mode in Mode::ALL {
            for given in [false, true] {
                let recorder = Recorder {
                    given,
                    read: RefCell::new(Vec::new()),
                };
                // Every default is valid, given or not.
                resolve(mode, &recorder, &host).expect("the defaults are valid");
                let read = recorder.read.into_inner();
                let table: Vec<&str> = SETTINGS
                    .iter()
                    .filter(|s| s.read_by(mode))
                    .map(|s| s.name)
                    .collect();
                let read: Vec<&str> = SETTINGS
                    .iter()
                    .map(|s| s.name)
                    .filter(|name| read.contains(name))
                    .collect();
                assert_eq!(read, table, "{mode} (given: {given})");
            }
        }
    }
}
