//! The settings table: every setting's name, default, one line of
//! documentation, the values it takes, and the modes that read it.
//!
//! The table describes; it never reads a value. `--help`, each mode's help,
//! the man page, `check`, the README and the example environment file are
//! written from it, and a test holds each row's `modes` to what the mode's
//! resolver ([`super::resolve`]) reads, so the two cannot drift apart.

use std::time::Duration;

use super::Mode::{self, Demo, Poll, Run, Serve};
use super::values::format_duration;

/// One setting: its flag name, default, a line of documentation, its
/// values and the modes that read it.
#[derive(Debug)]
pub struct Setting {
    /// The flag without `--`; the variable is `BZPUSH_` + upper snake case.
    pub name: &'static str,
    pub default: &'static str,
    pub doc: &'static str,
    /// The values it takes, enforced and shown in `--help`.
    pub range: Range,
    /// The modes whose configuration it is part of, in [`Mode::ALL`]'s order.
    pub modes: &'static [Mode],
}

impl Setting {
    /// The environment variable that carries this setting.
    pub fn env_var(&self) -> String {
        format!(
            "BZPUSH_{}",
            self.name.to_ascii_uppercase().replace('-', "_")
        )
    }

    /// Whether `mode` reads this setting.
    pub fn read_by(&self, mode: Mode) -> bool {
        self.modes.contains(&mode)
    }
}

/// The values a setting takes. Every duration and number has bounds: a
/// value outside them is refused, naming them, so a typo like `1ms` for a
/// ping timeout or `999999h` for a poll interval stops bzpush at start.
#[derive(Clone, Copy, Debug)]
pub enum Range {
    /// Text in the format the setting's doc describes.
    Text,
    /// A duration from the first to the second, inclusive.
    Duration(Duration, Duration),
    /// A whole number from `min` to `max`, inclusive, counting `unit`.
    Count {
        min: u64,
        max: u64,
        unit: &'static str,
    },
}

impl Range {
    /// `a duration from 10ms to 1h`, `a number of rows from 1 to 100000`;
    /// `None` for text.
    pub fn describe(&self) -> Option<String> {
        match *self {
            Range::Text => None,
            Range::Duration(min, max) => Some(format!(
                "a duration from {} to {}",
                format_duration(min),
                format_duration(max)
            )),
            Range::Count { min, max, unit } => {
                Some(format!("a number of {unit} from {min} to {max}"))
            }
        }
    }
}

/// Largest batch: a batch is held in memory and in one publish round.
const MAX_BATCH_SIZE: u64 = 100_000;
/// Longest overlap: every poll of source `bugs` reads this far back, and
/// so does the audit of source `push_notify`.
const MAX_OVERLAP: Duration = Duration::from_secs(3600);
/// Longest replay of source `bugs` after a restart: 30 days. Longer is a
/// flood of stale notifications that no client still waits for.
const MAX_REPLAY_LIMIT: Duration = Duration::from_secs(30 * 24 * 3600);

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

const fn count(min: u64, max: u64, unit: &'static str) -> Range {
    Range::Count { min, max, unit }
}

/// The modes with a poller.
const POLLERS: &[Mode] = &[Run, Poll];
/// The modes with a broker link.
const BROKERS: &[Mode] = &[Poll, Serve];
/// The modes with a WebSocket server.
const SERVERS: &[Mode] = &[Run, Serve, Demo];

/// [`SETTINGS`] and [`key`] from one list, a setting a row:
/// `KEY "name" = "default", range, modes, "doc";`.
macro_rules! table {
    ($($key:ident $name:literal = $default:literal, $range:expr, $modes:expr, $doc:literal;)*) => {
        /// Every setting bzpush reads. A mode ignores the ones it does not
        /// read, so one environment file can serve every unit.
        pub const SETTINGS: &[Setting] = &[$(key::$key),*];

        /// One constant per row of [`SETTINGS`], named for it: code asks for
        /// a setting by its row, not by a string, so it cannot name one the
        /// table lacks.
        pub mod key {
            use super::*;
            $(pub const $key: Setting = Setting {
                name: $name, default: $default, doc: $doc, range: $range, modes: $modes,
            };)*
        }
    };
}

table! {
    // For the demo, a server to create a scratch database on.
    DATABASE_URL "database-url" = "mysql://bugs@localhost:3306/bugs",
        Range::Text, &[Run, Poll, Demo],
        "Bugzilla's database (poll, run)";
    SOURCE "source" = "bugs", Range::Text, POLLERS,
        "bugs (stock Bugzilla: reads bugs.delta_ts, read-only) or push_notify (the table of Mozilla's PushNotify extension, where installed)";
    POLL_INTERVAL "poll-interval" = "1s",
        Range::Duration(Duration::from_millis(10), secs(3600)), &[Run, Poll, Demo],
        "time between polls, e.g. 250ms or 2s";
    BATCH_SIZE "batch-size" = "1000", count(1, MAX_BATCH_SIZE, "rows"), POLLERS,
        "rows read and published per poll; a full batch polls again at once";
    STATE_DIRECTORY "state-directory" = "$STATE_DIRECTORY", Range::Text, POLLERS,
        "source bugs: folder of the watermark file (an absolute path, or off); default systemd's StateDirectory=, none without it";
    REPLAY_LIMIT "replay-limit" = "24h", Range::Duration(secs(1), MAX_REPLAY_LIMIT), POLLERS,
        "source bugs: on start, replay from the watermark file at most this far back";
    OVERLAP "overlap" = "30s", Range::Duration(secs(1), MAX_OVERLAP), POLLERS,
        "how far back each poll (source bugs) or audit of push_notify against bugs looks for changes that commit after the second they were stamped";
    LOCK_NAME "lock-name" = "bzpush.poller.<database>", Range::Text, POLLERS,
        "database lock held by the active poller; server-wide, so the default names the database";
    AMQP_URL "amqp-url" = "amqp://guest:guest@127.0.0.1:5672/%2f", Range::Text, BROKERS,
        "the broker; amqps:// for TLS (poll, serve); several comma-separated URLs are the nodes of one RabbitMQ cluster";
    BROKER_GRACE "broker-grace" = "1m", Range::Duration(secs(1), secs(3600)), &[Poll],
        "poll: an active poller that reaches no broker node this long lets go of the database lock, so that a standby that reaches one takes over";
    HEARTBEAT "heartbeat" = "10s", Range::Duration(secs(1), secs(65535)), BROKERS,
        "poll, serve: AMQP heartbeat, in whole seconds; a silently dead broker link is noticed within about twice this (a heartbeat= in the URL wins)";
    EXCHANGE "exchange" = "exchange/bugzilla/simple", Range::Text, &[Poll],
        "exchange the poller publishes to";
    FEEDS "feeds" = "/=exchange/bugzilla/simple", Range::Text, &[Serve],
        "serve: comma-separated PATH=EXCHANGE, one WebSocket path per Pulse exchange";
    QUEUE "queue" = "queue/<amqp user>/bzpush-<hostname>", Range::Text, &[Serve],
        "serve: name prefix of the durable consumer queues (one per feed)";
    QUEUE_EXPIRES "queue-expires" = "24h",
        Range::Duration(secs(60), secs(30 * 24 * 3600)), &[Serve],
        "serve: the broker deletes a queue unused this long (x-expires)";
    QUEUE_TYPE "queue-type" = "quorum", Range::Text, &[Serve],
        "serve: quorum (replicated: a queue survives the loss of a minority of the cluster's nodes) or classic";
    LISTEN "listen" = "127.0.0.1:8844", Range::Text, SERVERS,
        "serve, run: WebSocket and HTTP address";
    MAX_CONNECTIONS "max-connections" = "10000", count(1, 1_000_000, "connections"), SERVERS,
        "serve, run: open WebSocket connections; more are refused with HTTP 503";
    MAX_SUBSCRIPTIONS "max-subscriptions" = "20000", count(1, 10_000_000, "bugs"), SERVERS,
        "serve, run: bugs one connection may subscribe to";
    MAX_CONNECTIONS_PER_ADDRESS "max-connections-per-address" = "<max-connections>/10",
        count(1, 1_000_000, "sockets"), SERVERS,
        "serve, run: open sockets (in their handshake or WebSocket) from one client address, an IPv6 one by its /64; default a tenth of max-connections";
    MAX_SUBSCRIPTIONS_TOTAL "max-subscriptions-total" = "5000000",
        count(1, 1_000_000_000, "subscriptions"), SERVERS,
        "serve, run: subscriptions over all connections (about 30 to 75 bytes each); one address may hold the share its max-connections-per-address gives it";
    TRUSTED_PROXIES "trusted-proxies" = "off", Range::Text, SERVERS,
        "serve, run: comma-separated addresses or networks (10.0.0.0/8) of reverse proxies whose X-Forwarded-For names the client; off ignores the header";
    MAX_MESSAGE_SIZE "max-message-size" = "1048576", count(1024, 64 << 20, "bytes"), SERVERS,
        "serve, run: largest client message in bytes; larger closes with 1009";
    OUTBOUND_QUEUE "outbound-queue" = "4096", count(16, 1_000_000, "messages"), SERVERS,
        "serve, run: messages waiting for one slow client before it is closed with 1008";
    CACHE_SIZE "cache-size" = "100000", count(0, 10_000_000, "updates"), SERVERS,
        "serve, run: recent updates per feed kept to answer `since`";
    PING_INTERVAL "ping-interval" = "30s", Range::Duration(secs(1), secs(3600)), SERVERS,
        "serve, run: a silent connection is pinged after this long";
    PING_TIMEOUT "ping-timeout" = "30s", Range::Duration(secs(1), secs(3600)), SERVERS,
        "serve, run: a pinged connection that stays silent this long is closed";
    ALLOWED_ORIGINS "allowed-origins" = "*", Range::Text, SERVERS,
        "serve, run: comma-separated Origin values allowed to connect; * allows all";
    CATCHUP_DATABASE_URL "catchup-database-url" = "off", Range::Text, &[Serve],
        "serve: Bugzilla's database, read-only, to answer `since` beyond the cache (run uses database-url)";
    BUGZILLA_URL "bugzilla-url" = "off", Range::Text, SERVERS,
        "serve, run, demo: Bugzilla's address, e.g. https://bugzilla.example.org; the live page links bug numbers to it";
    STALE_AFTER "stale-after" = "30s", Range::Duration(secs(1), secs(24 * 3600)), &Mode::ALL,
        "a change owed downstream and not handed on for this long makes the process stale: /health answers 503 (run, serve), the log says so (poll)";
    LOG "log" = "info", Range::Text, &Mode::ALL,
        "error, warn, info, debug or trace";
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::values::parse_duration;

    #[test]
    fn every_number_or_duration_has_a_range_and_modes_are_in_order() {
        for s in SETTINGS {
            let numeric = parse_duration(s.default).is_some()
                || s.default.parse::<u64>().is_ok()
                // A number derived from another setting's.
                || s.default == key::MAX_CONNECTIONS_PER_ADDRESS.default;
            assert_eq!(numeric, s.range.describe().is_some(), "{}", s.name);
            let order: Vec<Mode> = Mode::ALL.into_iter().filter(|m| s.read_by(*m)).collect();
            assert_eq!(s.modes, order, "{}", s.name);
        }
    }
}
