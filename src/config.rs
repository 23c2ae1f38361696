//! The settings table, and turning environment plus flags into a checked
//! configuration.
//!
//! Every setting is an environment variable `BZPUSH_NAME` and a flag
//! `--name`; a flag wins. [`SETTINGS`] is the one table: `--help`, the README
//! and the example environment file are written from it. Resolution is pure:
//! this module reads the environment and arguments it is given, validates,
//! and never opens a connection or starts a thread. Credentials never appear
//! in anything it prints ([`redact_url`]).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use log::LevelFilter;

use crate::origin;

/// One setting: its flag name, default and a line of documentation.
pub struct Setting {
    /// The flag without `--`; the variable is `BZPUSH_` + upper snake case.
    pub name: &'static str,
    pub default: &'static str,
    pub doc: &'static str,
    /// The values it takes, enforced and shown in `--help`.
    pub range: Range,
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

/// A duration in the largest unit [`parse_duration`] reads back exactly.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        _ if ms.is_multiple_of(3_600_000) => format!("{}h", ms / 3_600_000),
        _ if ms.is_multiple_of(60_000) => format!("{}m", ms / 60_000),
        _ if ms.is_multiple_of(1000) => format!("{}s", ms / 1000),
        _ => format!("{ms}ms"),
    }
}

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

const fn count(min: u64, max: u64, unit: &'static str) -> Range {
    Range::Count { min, max, unit }
}

impl Setting {
    /// The environment variable that carries this setting.
    pub fn env_var(&self) -> String {
        format!(
            "BZPUSH_{}",
            self.name.to_ascii_uppercase().replace('-', "_")
        )
    }
}

/// Every setting bzpush reads. A subcommand ignores the ones it does not
/// use, so one environment file can serve every unit.
pub const SETTINGS: &[Setting] = &[
    key::DATABASE_URL,
    key::SOURCE,
    key::POLL_INTERVAL,
    key::BATCH_SIZE,
    key::STATE_DIRECTORY,
    key::REPLAY_LIMIT,
    key::OVERLAP,
    key::LOCK_NAME,
    key::AMQP_URL,
    key::HEARTBEAT,
    key::EXCHANGE,
    key::FEEDS,
    key::QUEUE,
    key::QUEUE_EXPIRES,
    key::LISTEN,
    key::MAX_CONNECTIONS,
    key::MAX_SUBSCRIPTIONS,
    key::MAX_MESSAGE_SIZE,
    key::OUTBOUND_QUEUE,
    key::CACHE_SIZE,
    key::PING_INTERVAL,
    key::PING_TIMEOUT,
    key::ALLOWED_ORIGINS,
    key::CATCHUP_DATABASE_URL,
    key::BUGZILLA_URL,
    key::LOG,
];

/// One constant per row of [`SETTINGS`], named for it: code asks for a
/// setting by its row, not by a string, so it cannot name one the table
/// lacks.
pub mod key {
    use std::time::Duration;

    use super::{MAX_BATCH_SIZE, MAX_OVERLAP, MAX_REPLAY_LIMIT, Range, Setting, count, secs};

    pub const DATABASE_URL: Setting = Setting {
        name: "database-url",
        default: "mysql://bugs@localhost:3306/bugs",
        doc: "Bugzilla's database (poll, run)",
        range: Range::Text,
    };

    pub const SOURCE: Setting = Setting {
        name: "source",
        default: "push_notify",
        doc: "push_notify (table of the PushNotify extension) or bugs (stock Bugzilla)",
        range: Range::Text,
    };

    pub const POLL_INTERVAL: Setting = Setting {
        name: "poll-interval",
        default: "1s",
        doc: "time between polls, e.g. 250ms or 2s",
        range: Range::Duration(Duration::from_millis(10), secs(3600)),
    };

    pub const BATCH_SIZE: Setting = Setting {
        name: "batch-size",
        default: "1000",
        doc: "rows read and published per poll; a full batch polls again at once",
        range: count(1, MAX_BATCH_SIZE, "rows"),
    };

    pub const STATE_DIRECTORY: Setting = Setting {
        name: "state-directory",
        default: "$STATE_DIRECTORY",
        doc: "source bugs: folder of the watermark file (an absolute path, or off); default systemd's StateDirectory=, none without it",
        range: Range::Text,
    };

    pub const REPLAY_LIMIT: Setting = Setting {
        name: "replay-limit",
        default: "24h",
        doc: "source bugs: on start, replay from the watermark file at most this far back",
        range: Range::Duration(secs(1), MAX_REPLAY_LIMIT),
    };

    pub const OVERLAP: Setting = Setting {
        name: "overlap",
        default: "30s",
        doc: "source bugs: how far back each poll looks for late commits; push_notify: how long a bug is re-checked after its row is deleted",
        range: Range::Duration(secs(1), MAX_OVERLAP),
    };

    pub const LOCK_NAME: Setting = Setting {
        name: "lock-name",
        default: "bzpush.poller.<database>",
        doc: "database lock held by the active poller; server-wide, so the default names the database",
        range: Range::Text,
    };

    pub const AMQP_URL: Setting = Setting {
        name: "amqp-url",
        default: "amqp://guest:guest@127.0.0.1:5672/%2f",
        doc: "the broker; amqps:// for TLS (poll, serve)",
        range: Range::Text,
    };

    pub const HEARTBEAT: Setting = Setting {
        name: "heartbeat",
        default: "10s",
        doc: "poll, serve: AMQP heartbeat, in whole seconds; a silently dead broker link is noticed within about twice this (a heartbeat= in the URL wins)",
        range: Range::Duration(secs(1), secs(65535)),
    };

    pub const EXCHANGE: Setting = Setting {
        name: "exchange",
        default: "exchange/bugzilla/simple",
        doc: "exchange the poller publishes to",
        range: Range::Text,
    };

    pub const FEEDS: Setting = Setting {
        name: "feeds",
        default: "/=exchange/bugzilla/simple",
        doc: "serve: comma-separated PATH=EXCHANGE, one WebSocket path per Pulse exchange",
        range: Range::Text,
    };

    pub const QUEUE: Setting = Setting {
        name: "queue",
        default: "queue/<amqp user>/bzpush-<hostname>",
        doc: "serve: name prefix of the durable consumer queues (one per feed)",
        range: Range::Text,
    };

    pub const QUEUE_EXPIRES: Setting = Setting {
        name: "queue-expires",
        default: "24h",
        doc: "serve: the broker deletes a queue unused this long (x-expires)",
        range: Range::Duration(secs(60), secs(30 * 24 * 3600)),
    };

    pub const LISTEN: Setting = Setting {
        name: "listen",
        default: "127.0.0.1:8844",
        doc: "serve, run: WebSocket and HTTP address",
        range: Range::Text,
    };

    pub const MAX_CONNECTIONS: Setting = Setting {
        name: "max-connections",
        default: "10000",
        doc: "serve, run: open WebSocket connections; more are refused with HTTP 503",
        range: count(1, 1_000_000, "connections"),
    };

    pub const MAX_SUBSCRIPTIONS: Setting = Setting {
        name: "max-subscriptions",
        default: "20000",
        doc: "serve, run: bugs one connection may subscribe to",
        range: count(1, 10_000_000, "bugs"),
    };

    pub const MAX_MESSAGE_SIZE: Setting = Setting {
        name: "max-message-size",
        default: "1048576",
        doc: "serve, run: largest client message in bytes; larger closes with 1009",
        range: count(1024, 64 << 20, "bytes"),
    };

    pub const OUTBOUND_QUEUE: Setting = Setting {
        name: "outbound-queue",
        default: "4096",
        doc: "serve, run: messages waiting for one slow client before it is closed with 1008",
        range: count(16, 1_000_000, "messages"),
    };

    pub const CACHE_SIZE: Setting = Setting {
        name: "cache-size",
        default: "100000",
        doc: "serve, run: recent updates per feed kept to answer `since`",
        range: count(0, 10_000_000, "updates"),
    };

    pub const PING_INTERVAL: Setting = Setting {
        name: "ping-interval",
        default: "30s",
        doc: "serve, run: a silent connection is pinged after this long",
        range: Range::Duration(secs(1), secs(3600)),
    };

    pub const PING_TIMEOUT: Setting = Setting {
        name: "ping-timeout",
        default: "30s",
        doc: "serve, run: a pinged connection that stays silent this long is closed",
        range: Range::Duration(secs(1), secs(3600)),
    };

    pub const ALLOWED_ORIGINS: Setting = Setting {
        name: "allowed-origins",
        default: "*",
        doc: "serve, run: comma-separated Origin values allowed to connect; * allows all",
        range: Range::Text,
    };

    pub const CATCHUP_DATABASE_URL: Setting = Setting {
        name: "catchup-database-url",
        default: "off",
        doc: "serve: Bugzilla's database, read-only, to answer `since` beyond the cache (run uses database-url)",
        range: Range::Text,
    };

    pub const BUGZILLA_URL: Setting = Setting {
        name: "bugzilla-url",
        default: "off",
        doc: "serve, run, demo: Bugzilla's address, e.g. https://bugzilla.example.org; the live page links bug numbers to it",
        range: Range::Text,
    };

    pub const LOG: Setting = Setting {
        name: "log",
        default: "info",
        doc: "error, warn, info, debug or trace",
        range: Range::Text,
    };
}

/// What the user asked for on the command line.
#[derive(Debug)]
pub enum Invocation {
    Help,
    /// `bzpush run --help`: the settings of one mode.
    ModeHelp(&'static str),
    Version,
    /// Run a subcommand.
    Start(Mode),
    /// `bzpush check <mode>`: check a subcommand's configuration and
    /// dependencies without starting it.
    Check(Mode),
}

/// A subcommand that runs, with its configuration.
#[derive(Clone, Debug)]
pub enum Mode {
    Poll(PollConfig),
    Serve(ServeConfig),
    Run(RunConfig),
    Demo(DemoConfig),
}

/// A bad or missing setting: printed as one line, exit status 2.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError(String);

impl ConfigError {
    fn setting(setting: &Setting, value: &str, expected: &str) -> ConfigError {
        // systemd keeps a `#` after a value as part of it.
        let comment = if value.contains(" #") || value.contains("\t#") {
            " (a # after a value is part of it: put comments on lines of their own)"
        } else {
            ""
        };
        ConfigError(format!(
            "{} (--{}): {}: {expected}{comment}",
            setting.env_var(),
            setting.name,
            invalid_value(value),
        ))
    }

    /// A bad URL setting, which may hold a password: shown only redacted,
    /// with the characters that must be percent-encoded.
    fn url(setting: &Setting, value: &str, expected: &str) -> ConfigError {
        ConfigError(format!(
            "{} (--{}): {}: {expected}; {PERCENT_ENCODE}",
            setting.env_var(),
            setting.name,
            invalid_value(value),
        ))
    }
}

/// Said with every bad URL: unencoded, these end the user or password part
/// early, and the rest of the password is read as host, port or path.
const PERCENT_ENCODE: &str =
    "in the user and password, write / # ? @ : as %2F %23 %3F %40 %3A (percent-encoded)";

/// `invalid value "…"` with the value redacted, or without the value where
/// it does not parse clearly enough to tell its password apart.
fn invalid_value(value: &str) -> String {
    match shown(value) {
        Some(shown) => format!("invalid value {shown:?}"),
        None => "invalid value (not shown: it may hold a password)".to_string(),
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Where the poller reads changes from (the README's "Install on one VM"
/// says what each needs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The PushNotify extension's queue table: read, publish, delete.
    PushNotify,
    /// Stock Bugzilla: `bugs.delta_ts` above a watermark, read-only.
    Bugs,
}

/// A checked URL that may hold a password, and what its client connects
/// with (`O`). It prints redacted, as `Display` and as `Debug`, so that no
/// log line, `check` output or error shows the password; only the client
/// reads `opts`. Both URLs are this one type: [`DatabaseUrl`], [`AmqpUrl`].
#[derive(Clone)]
pub struct SecretUrl<O> {
    /// What the client connects with, credentials included.
    pub opts: O,
    url: String,
}

impl<O> fmt::Display for SecretUrl<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.url))
    }
}

impl<O> fmt::Debug for SecretUrl<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A MySQL/MariaDB URL; the mysql crate connects with its `opts`.
pub type DatabaseUrl = SecretUrl<mysql::Opts>;

/// An AMQP URL; lapin connects with its `opts`: the URL and the heartbeat,
/// if the URL sets none ([`AmqpUrl::secret`]).
pub type AmqpUrl = SecretUrl<String>;

impl AmqpUrl {
    /// Checks `value`; the error says what is wrong with it.
    pub fn parse(value: &str) -> Result<AmqpUrl, String> {
        if !(value.starts_with("amqp://") || value.starts_with("amqps://")) {
            return Err("expected amqp://USER:PASSWORD@HOST:PORT/VHOST or amqps://…".into());
        }
        if redacted(value).is_none() {
            return Err(AMBIGUOUS.into());
        }
        value
            .parse::<lapin::uri::AMQPUri>()
            .map_err(|e| without_secrets(&e.to_string(), value))?;
        Ok(AmqpUrl {
            url: value.to_string(),
            opts: value.to_string(),
        })
    }

    /// Connects with a heartbeat of `secs` seconds unless the URL asks for
    /// one itself (`?heartbeat=`): without heartbeats, a link that dies
    /// silently (no FIN, no RST) is noticed only when TCP gives up.
    pub fn with_heartbeat(self, secs: u16) -> AmqpUrl {
        let set = self
            .url
            .parse::<lapin::uri::AMQPUri>()
            .is_ok_and(|uri| uri.query.heartbeat.is_some());
        if set {
            return self;
        }
        let separator = if self.url.contains('?') { '&' } else { '?' };
        AmqpUrl {
            opts: format!("{}{separator}heartbeat={secs}", self.url),
            url: self.url,
        }
    }

    /// The full URL, credentials included: only for connecting.
    pub fn secret(&self) -> &str {
        &self.opts
    }
}

/// The database poller's settings (poll, run).
#[derive(Clone, Debug)]
pub struct PollerConfig {
    pub database: DatabaseUrl,
    pub source: Source,
    pub poll_interval: Duration,
    pub batch_size: usize,
    pub overlap: Duration,
    pub lock_name: String,
    /// Source `bugs`: where the watermark survives a restart; `None`: it
    /// does not.
    pub state_directory: Option<PathBuf>,
    /// Source `bugs`: how far back a saved watermark may take a start.
    pub replay_limit: Duration,
}

/// Everything `bzpush poll` needs.
#[derive(Clone, Debug)]
pub struct PollConfig {
    pub poller: PollerConfig,
    pub amqp: AmqpUrl,
    pub exchange: String,
    pub log: LevelFilter,
}

/// One WebSocket path and the Pulse exchange it serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Feed {
    /// Starts and ends with `/`.
    pub path: String,
    pub exchange: String,
}

/// Everything `bzpush serve` needs.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub amqp: AmqpUrl,
    pub feeds: Vec<Feed>,
    pub queue_prefix: String,
    pub queue_expires: Duration,
    /// Read-only access to Bugzilla's database for catch-up, if set.
    pub catchup_database: Option<DatabaseUrl>,
    pub server: ServerConfig,
    pub log: LevelFilter,
}

/// Everything `bzpush run` needs: a poller and a server, no broker.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub poller: PollerConfig,
    pub server: ServerConfig,
    pub log: LevelFilter,
}

/// Everything `bzpush demo` needs: `run` fed by a simulated Bugzilla.
#[derive(Clone, Debug)]
pub struct DemoConfig {
    /// A server where the demo may create (and drop) a scratch database;
    /// `None`: simulate in memory. The database the URL names, if any, is
    /// not touched.
    pub database: Option<DatabaseUrl>,
    pub poll_interval: Duration,
    pub server: ServerConfig,
    /// `--listen` was given: a busy port is then an error, not a reason to
    /// pick another.
    pub listen_given: bool,
    pub log: LevelFilter,
}

/// The WebSocket server's settings (serve, run).
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub max_connections: usize,
    pub max_subscriptions: usize,
    pub max_message_size: usize,
    pub outbound_queue: usize,
    pub cache_size: usize,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    /// `None`: every origin may connect. Otherwise origins as browsers
    /// serialise them (`origin::normalize`).
    pub allowed_origins: Option<Vec<String>>,
    /// Where the live page links bug numbers to, if set.
    pub bugzilla_url: Option<String>,
    /// Bugs the live page subscribes to when its address names none (the
    /// demo's simulated bugs).
    pub page_bugs: Vec<u32>,
}

/// Largest batch: a batch is held in memory and in one publish round.
const MAX_BATCH_SIZE: u64 = 100_000;
/// MariaDB and MySQL refuse lock names longer than this.
const MAX_LOCK_NAME: usize = 64;
/// AMQP short strings (exchange names) are at most this many bytes.
const MAX_EXCHANGE_NAME: usize = 255;
/// Longest overlap: every poll of source `bugs` reads this far back, and
/// source `push_notify` re-checks each deleted row's bug this long.
const MAX_OVERLAP: Duration = Duration::from_secs(3600);
/// Longest replay of source `bugs` after a restart: 30 days. Longer is a
/// flood of stale notifications that no client still waits for.
const MAX_REPLAY_LIMIT: Duration = Duration::from_secs(30 * 24 * 3600);

/// Resolves the command line (`args`, without the program name) and the
/// environment into what to do.
///
/// Precedence: a flag wins over an `--env-file`, which wins over the
/// environment. systemd puts an `EnvironmentFile=` into the environment, so
/// a unit never passes `--env-file`; the flag is for `bzpush check run
/// --env-file /etc/bzpush/bzpush.env` from a shell, which must check what
/// the unit reads whatever that shell happens to export.
pub fn parse(
    args: impl IntoIterator<Item = OsString>,
    env: impl IntoIterator<Item = (OsString, OsString)>,
) -> Result<Invocation, ConfigError> {
    let args = args
        .into_iter()
        .map(|a| {
            a.into_string()
                .map_err(|a| ConfigError(format!("argument {a:?} is not valid UTF-8")))
        })
        .collect::<Result<Vec<String>, ConfigError>>()?;
    let mut args = args.into_iter();
    let mut command = match args.next() {
        None => return Err(ConfigError("no command given; try `bzpush --help`".into())),
        Some(c) => c,
    };
    let check = command == "check";
    if check {
        command = args.next().ok_or_else(|| {
            ConfigError("check needs the command to check: bzpush check poll|serve|run".into())
        })?;
    }
    let mode: &'static str = match command.as_str() {
        "-h" | "--help" | "help" => return Ok(Invocation::Help),
        "-V" | "--version" | "version" if !check => return Ok(Invocation::Version),
        "poll" => "poll",
        "serve" => "serve",
        "run" => "run",
        "demo" if !check => "demo",
        other => {
            return Err(ConfigError(format!(
                "unknown command {other:?}; try `bzpush --help`"
            )));
        }
    };
    let args: Vec<String> = args.collect();
    // Before anything is read: help must work in a broken environment.
    if args.iter().any(|a| a == "-h" || a == "--help") {
        return Ok(Invocation::ModeHelp(mode));
    }
    let env: Vec<(OsString, OsString)> = env.into_iter().collect();
    // systemd sets it from StateDirectory=: a colon-separated list, ours first.
    let systemd_state_directory = env
        .iter()
        .find(|(key, _)| key == "STATE_DIRECTORY")
        .and_then(|(_, value)| value.to_str())
        .and_then(|value| value.split(':').next())
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from);
    let mut values = from_env(env)?;
    let mut flags = BTreeMap::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let Some(flag) = arg.strip_prefix("--") else {
            // A URL given without its flag may hold a password.
            let shown = shown(&arg).map_or("(not shown: it may hold a password)".into(), |a| {
                format!("{a:?}")
            });
            return Err(ConfigError(format!(
                "unexpected argument {shown}; settings are flags like --poll-interval 2s"
            )));
        };
        let (name, inline) = match flag.split_once('=') {
            Some((name, value)) => (name, Some(value.to_string())),
            None => (flag, None),
        };
        let value = |args: &mut std::vec::IntoIter<String>| {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| ConfigError(format!("flag --{name} needs a value")))
        };
        if name == "env-file" {
            let path = value(&mut args)?;
            values.extend(read_env_file(std::path::Path::new(&path))?);
            continue;
        }
        let setting = lookup(name).ok_or_else(|| {
            ConfigError(format!(
                "unknown flag --{name}{}; try `bzpush {mode} --help`",
                suggest(name, SETTINGS.iter().map(|s| s.name.to_string()))
                    .map(|s| format!(" (did you mean --{s}?)"))
                    .unwrap_or_default()
            ))
        })?;
        flags.insert(setting.name, value(&mut args)?);
    }
    values.extend(flags);
    let given = Given {
        get: &|setting| {
            let value = values
                .get(setting.name)
                .map_or(setting.default, String::as_str);
            (setting, value)
        },
        is_set: &|setting| values.contains_key(setting.name),
        systemd_state_directory,
    };
    let mode = resolve(mode, &given)?;
    Ok(if check {
        Invocation::Check(mode)
    } else {
        Invocation::Start(mode)
    })
}

/// A setting and its value, as [`resolve`] asks for them by row
/// ([`key`]).
type Get<'a> = dyn Fn(&'static Setting) -> (&'static Setting, &'a str) + 'a;

/// What [`resolve`] reads.
struct Given<'a> {
    /// Each setting's value: given, or its default.
    get: &'a Get<'a>,
    /// Whether the user gave a setting (environment, env file or flag).
    is_set: &'a dyn Fn(&Setting) -> bool,
    /// The folder systemd made for `StateDirectory=`, if any.
    systemd_state_directory: Option<PathBuf>,
}

/// The configuration of `mode` ("poll", "serve", "run" or "demo") from the
/// values `given`. The settings it asks `given.get` for are exactly the ones
/// the mode reads: [`settings_of`] lists them that way.
fn resolve(mode: &str, given: &Given) -> Result<Mode, ConfigError> {
    let get = given.get;
    let poller = || -> Result<PollerConfig, ConfigError> {
        let database = database_url(get(&key::DATABASE_URL))?;
        Ok(PollerConfig {
            lock_name: lock_name(get(&key::LOCK_NAME), &database)?,
            database,
            source: source(get(&key::SOURCE))?,
            poll_interval: duration(get(&key::POLL_INTERVAL))?,
            batch_size: number(get(&key::BATCH_SIZE))?,
            overlap: duration(get(&key::OVERLAP))?,
            state_directory: state_directory(
                get(&key::STATE_DIRECTORY),
                given.systemd_state_directory.clone(),
            )?,
            replay_limit: duration(get(&key::REPLAY_LIMIT))?,
        })
    };
    let server = || -> Result<ServerConfig, ConfigError> {
        Ok(ServerConfig {
            listen: socket_addr(get(&key::LISTEN))?,
            max_connections: number(get(&key::MAX_CONNECTIONS))?,
            max_subscriptions: number(get(&key::MAX_SUBSCRIPTIONS))?,
            max_message_size: number(get(&key::MAX_MESSAGE_SIZE))?,
            outbound_queue: number(get(&key::OUTBOUND_QUEUE))?,
            cache_size: number(get(&key::CACHE_SIZE))?,
            ping_interval: duration(get(&key::PING_INTERVAL))?,
            ping_timeout: duration(get(&key::PING_TIMEOUT))?,
            allowed_origins: origins(get(&key::ALLOWED_ORIGINS))?,
            bugzilla_url: bugzilla_url(get(&key::BUGZILLA_URL))?,
            page_bugs: Vec::new(),
        })
    };
    let log = log_level(get(&key::LOG))?;
    Ok(match mode {
        "poll" => Mode::Poll(PollConfig {
            poller: poller()?,
            amqp: amqp_url(get(&key::AMQP_URL))?.with_heartbeat(heartbeat(get(&key::HEARTBEAT))?),
            exchange: text(get(&key::EXCHANGE), MAX_EXCHANGE_NAME)?,
            log,
        }),
        "run" => Mode::Run(RunConfig {
            poller: poller()?,
            server: server()?,
            log,
        }),
        "demo" => {
            let database = get(&key::DATABASE_URL);
            Mode::Demo(DemoConfig {
                database: if (given.is_set)(&key::DATABASE_URL) {
                    Some(server_url(database)?)
                } else {
                    None
                },
                poll_interval: duration(get(&key::POLL_INTERVAL))?,
                server: server()?,
                listen_given: (given.is_set)(&key::LISTEN),
                log,
            })
        }
        _ => {
            let amqp =
                amqp_url(get(&key::AMQP_URL))?.with_heartbeat(heartbeat(get(&key::HEARTBEAT))?);
            let catchup = get(&key::CATCHUP_DATABASE_URL);
            Mode::Serve(ServeConfig {
                feeds: feeds(get(&key::FEEDS))?,
                queue_prefix: queue_prefix(get(&key::QUEUE), &amqp)?,
                queue_expires: duration(get(&key::QUEUE_EXPIRES))?,
                catchup_database: if catchup.1 == catchup.0.default {
                    None
                } else {
                    Some(database_url(catchup)?)
                },
                server: server()?,
                amqp,
                log,
            })
        }
    })
}

/// The settings `mode` reads, in table order: those [`resolve`] asks for
/// when every setting has its default.
pub fn settings_of(mode: &str) -> Vec<&'static Setting> {
    let read = std::cell::RefCell::new(Vec::new());
    // The defaults are valid (a test says so); were one not, the list
    // would only be shorter, never wrong.
    let given = Given {
        get: &|setting| {
            read.borrow_mut().push(setting.name);
            (setting, setting.default)
        },
        is_set: &|_| false,
        systemd_state_directory: None,
    };
    let _ = resolve(mode, &given);
    let read = read.into_inner();
    SETTINGS.iter().filter(|s| read.contains(&s.name)).collect()
}

/// The candidate nearest to `name` by edit distance, if near enough to be
/// a plausible typo.
fn suggest(name: &str, candidates: impl Iterator<Item = String>) -> Option<String> {
    candidates
        .map(|c| (edit_distance(name, &c), c))
        .filter(|(d, c)| *d <= 3.max(c.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Levenshtein distance over bytes: names are ASCII.
fn edit_distance(a: &str, b: &str) -> usize {
    let b = b.as_bytes();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.bytes().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

/// The `BZPUSH_*` assignments of an environment file, by setting name.
fn read_env_file(path: &std::path::Path) -> Result<BTreeMap<&'static str, String>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError(format!(
            "--env-file {}: cannot read it: {e}",
            path.display()
        ))
    })?;
    let mut values = BTreeMap::new();
    for (line, key, value) in parse_env_file(&text) {
        if !key.starts_with("BZPUSH_") {
            // The unit would export it too, and bzpush would ignore it.
            continue;
        }
        let setting = env_setting(&key)
            .map_err(|e| ConfigError(format!("--env-file {} line {line}: {e}", path.display())))?;
        values.insert(setting.name, value);
    }
    Ok(values)
}

/// The setting a `BZPUSH_*` variable names; the error suggests the nearest
/// one. Refused rather than ignored: a misspelt line in an environment file
/// would otherwise leave its setting at the default without a word.
fn env_setting(key: &str) -> Result<&'static Setting, ConfigError> {
    SETTINGS.iter().find(|s| s.env_var() == key).ok_or_else(|| {
        ConfigError(format!(
            "{key} is not a bzpush setting{}; `bzpush --help` lists them",
            suggest(key, SETTINGS.iter().map(Setting::env_var))
                .map(|s| format!(" (did you mean {s}?)"))
                .unwrap_or_default()
        ))
    })
}

/// Assignments in systemd's `EnvironmentFile=` syntax, as systemd reads
/// them: `(line, key, value)`. Comments are whole lines starting with `#`
/// or `;`; a `#` after a value is part of the value. Unquoted values lose
/// trailing whitespace, and a backslash escapes the next character (before
/// a newline it joins the lines). Single quotes keep everything; in double
/// quotes a backslash escapes only `"`, `\`, `` ` ``, `$` and a newline.
/// Quoted and unquoted parts run together (`A="x"y` is `xy`), but quotes
/// after unquoted text are kept. A line without `=` is ignored, as systemd
/// does.
pub fn parse_env_file(text: &str) -> Vec<(usize, String, String)> {
    #[derive(Clone, Copy, PartialEq)]
    enum State {
        PreKey,
        Key,
        PreValue,
        Value,
        ValueEscape,
        Single,
        Double,
        DoubleEscape,
        Comment,
        CommentEscape,
    }
    let mut out = Vec::new();
    let (mut key, mut value) = (String::new(), String::new());
    // Where trailing unquoted whitespace begins, if the value ends in some.
    let mut trailing: Option<usize> = None;
    let (mut line, mut key_line) = (1, 1);
    let mut state = State::PreKey;
    let push = |out: &mut Vec<_>,
                line,
                key: &mut String,
                value: &mut String,
                trailing: &mut Option<usize>| {
        if let Some(at) = trailing.take() {
            value.truncate(at);
        }
        let key = std::mem::take(key);
        let key = key.trim_end().to_string();
        out.push((line, key, std::mem::take(value)));
    };
    for c in text.chars().chain(std::iter::once('\n')) {
        match state {
            State::PreKey => {
                if c == '#' || c == ';' {
                    state = State::Comment;
                } else if !c.is_whitespace() {
                    state = State::Key;
                    key_line = line;
                    key.push(c);
                }
            }
            State::Key => {
                if c == '\n' {
                    key.clear();
                    state = State::PreKey;
                } else if c == '=' {
                    state = State::PreValue;
                } else {
                    key.push(c);
                }
            }
            State::PreValue => match c {
                '\n' => {
                    push(&mut out, key_line, &mut key, &mut value, &mut trailing);
                    state = State::PreKey;
                }
                '\'' => state = State::Single,
                '"' => state = State::Double,
                '\\' => state = State::ValueEscape,
                c if c.is_whitespace() => {}
                c => {
                    value.push(c);
                    state = State::Value;
                }
            },
            State::Value => match c {
                '\n' => {
                    push(&mut out, key_line, &mut key, &mut value, &mut trailing);
                    state = State::PreKey;
                }
                '\\' => {
                    trailing = None;
                    state = State::ValueEscape;
                }
                c => {
                    if !c.is_whitespace() {
                        trailing = None;
                    } else if trailing.is_none() {
                        trailing = Some(value.len());
                    }
                    value.push(c);
                }
            },
            State::ValueEscape => {
                if c != '\n' {
                    value.push(c);
                }
                state = State::Value;
            }
            State::Single => {
                if c == '\'' {
                    state = State::PreValue;
                } else {
                    value.push(c);
                }
            }
            State::Double => match c {
                '"' => state = State::PreValue,
                '\\' => state = State::DoubleEscape,
                c => value.push(c),
            },
            State::DoubleEscape => {
                match c {
                    '"' | '\\' | '`' | '$' => value.push(c),
                    '\n' => {}
                    c => {
                        value.push('\\');
                        value.push(c);
                    }
                }
                state = State::Double;
            }
            State::Comment => match c {
                '\\' => state = State::CommentEscape,
                '\n' => state = State::PreKey,
                _ => {}
            },
            State::CommentEscape => state = State::Comment,
        }
        if c == '\n' {
            line += 1;
        }
    }
    out
}

impl Mode {
    /// The log level this mode was configured with.
    pub fn log(&self) -> LevelFilter {
        match self {
            Mode::Poll(c) => c.log,
            Mode::Serve(c) => c.log,
            Mode::Run(c) => c.log,
            Mode::Demo(c) => c.log,
        }
    }
}

fn lookup(name: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.name == name)
}

/// The `BZPUSH_*` variables, by setting name. An unknown `BZPUSH_*` variable
/// is an error ([`env_setting`]).
fn from_env(
    env: impl IntoIterator<Item = (OsString, OsString)>,
) -> Result<BTreeMap<&'static str, String>, ConfigError> {
    let mut values = BTreeMap::new();
    for (key, value) in env {
        let Some(key) = key.to_str() else { continue };
        // The test-only fault injection is no setting (see its doc).
        if !key.starts_with("BZPUSH_") || key == crate::shutdown::TEST_PANIC_VAR {
            continue;
        }
        let setting = env_setting(key)?;
        let value = value
            .into_string()
            .map_err(|_| ConfigError(format!("{key}: value is not valid UTF-8")))?;
        values.insert(setting.name, value);
    }
    Ok(values)
}

fn database_url((setting, value): (&Setting, &str)) -> Result<DatabaseUrl, ConfigError> {
    if !value.starts_with("mysql://") {
        return Err(ConfigError::url(
            setting,
            value,
            "expected mysql://USER[:PASSWORD]@HOST[:PORT]/DATABASE",
        ));
    }
    if redacted(value).is_none() {
        return Err(ConfigError::url(setting, value, AMBIGUOUS));
    }
    let opts = mysql::Opts::from_url(value)
        .map_err(|e| ConfigError::url(setting, value, &url_complaint(&e, value)))?;
    if opts.get_db_name().is_none_or(str::is_empty) {
        return Err(ConfigError::url(
            setting,
            value,
            "the URL names no database (…/DATABASE)",
        ));
    }
    Ok(DatabaseUrl {
        opts,
        url: value.to_string(),
    })
}

/// A database server the demo may create a database on: a MySQL URL that
/// may name no database.
fn server_url((setting, value): (&Setting, &str)) -> Result<DatabaseUrl, ConfigError> {
    // The same checks and advice as `database_url`: a password holding
    // `/` or `@` must not be blamed on the port.
    if !value.starts_with("mysql://") {
        return Err(ConfigError::url(
            setting,
            value,
            "expected mysql://USER[:PASSWORD]@HOST[:PORT]/",
        ));
    }
    if redacted(value).is_none() {
        return Err(ConfigError::url(setting, value, AMBIGUOUS));
    }
    let opts = mysql::Opts::from_url(value)
        .map_err(|e| ConfigError::url(setting, value, &url_complaint(&e, value)))?;
    Ok(DatabaseUrl {
        opts,
        url: value.to_string(),
    })
}

impl DatabaseUrl {
    /// The same server and account, database `name`.
    pub fn with_database(&self, name: &str) -> DatabaseUrl {
        let opts = mysql::OptsBuilder::from_opts(self.opts.clone()).db_name(Some(name));
        // scheme://authority/PATH?query: replace PATH, keep the rest.
        let start = self.url.find("://").map_or(0, |i| i + 3);
        let path = self.url[start..]
            .find('/')
            .map_or(self.url.len(), |i| start + i);
        let query = self.url[path..]
            .find('?')
            .map_or("", |i| &self.url[path + i..]);
        DatabaseUrl {
            opts: opts.into(),
            url: format!("{}/{name}{query}", &self.url[..path]),
        }
    }
}

/// `off`, or an http(s) address without quotes or spaces: it goes into the
/// page's HTML (escaped as well) and into links.
fn bugzilla_url((setting, value): (&Setting, &str)) -> Result<Option<String>, ConfigError> {
    if value == setting.default {
        return Ok(None);
    }
    let scheme = value.starts_with("https://") || value.starts_with("http://");
    if !scheme
        || value
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "\"'<>`".contains(c))
    {
        return Err(ConfigError::setting(
            setting,
            value,
            "expected off or an address like https://bugzilla.example.org",
        ));
    }
    Ok(Some(value.trim_end_matches('/').to_string()))
}

fn amqp_url((setting, value): (&Setting, &str)) -> Result<AmqpUrl, ConfigError> {
    AmqpUrl::parse(value).map_err(|why| ConfigError::url(setting, value, &why))
}

fn feeds((setting, value): (&Setting, &str)) -> Result<Vec<Feed>, ConfigError> {
    let expected = "expected PATH=EXCHANGE[,PATH=EXCHANGE…], e.g. /=exchange/bugzilla/simple";
    let mut feeds: Vec<Feed> = Vec::new();
    for part in value.split(',').map(str::trim) {
        let Some((path, exchange)) = part.split_once('=') else {
            return Err(ConfigError::setting(setting, value, expected));
        };
        let path = feed_path(path.trim())
            .ok_or_else(|| ConfigError::setting(setting, value, "each PATH must start with /"))?;
        let exchange = exchange.trim();
        if exchange.is_empty() || exchange.len() > MAX_EXCHANGE_NAME {
            return Err(ConfigError::setting(setting, value, expected));
        }
        if feeds.iter().any(|f| f.path == path) {
            return Err(ConfigError::setting(
                setting,
                value,
                "each PATH may appear once",
            ));
        }
        feeds.push(Feed {
            path,
            exchange: exchange.to_string(),
        });
    }
    Ok(feeds)
}

/// A request path as a feed path: `/dev` and `/dev/` are the same feed.
/// `None` unless it starts with `/`. The query string is not part of it.
pub fn feed_path(path: &str) -> Option<String> {
    let path = path.split('?').next().unwrap_or_default();
    if !path.starts_with('/') {
        return None;
    }
    Some(if path.ends_with('/') {
        path.to_string()
    } else {
        format!("{path}/")
    })
}

fn queue_prefix((setting, value): (&Setting, &str), amqp: &AmqpUrl) -> Result<String, ConfigError> {
    if value != setting.default {
        return text((setting, value), MAX_EXCHANGE_NAME - 64);
    }
    let user = amqp_user(amqp);
    // /etc/hostname first: the hardened units hide /proc/sys.
    let host = ["/etc/hostname", "/proc/sys/kernel/hostname"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .map(|h| h.trim().to_string())
        .find(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_string());
    Ok(format!("queue/{user}/bzpush-{host}"))
}

/// The poller lock's name. `GET_LOCK` names are server-wide, so the default
/// names the database: pollers of one database exclude each other, pollers
/// of two databases on one server never do. A database name that does not
/// fit MySQL's 64 characters, or that has upper-case letters (MySQL compares
/// lock names case-blind, MariaDB does not), is cut and followed by a hash of
/// the whole name: stable across hosts and versions (FNV-1a, not std's
/// hasher, which may change), so every poller of the database agrees.
fn lock_name(
    (setting, value): (&Setting, &str),
    database: &DatabaseUrl,
) -> Result<String, ConfigError> {
    if value != setting.default {
        return text((setting, value), MAX_LOCK_NAME);
    }
    let db = database.opts.get_db_name().unwrap_or_default();
    Ok(default_lock_name(db))
}

fn default_lock_name(db: &str) -> String {
    const PREFIX: &str = "bzpush.poller.";
    let exact = format!("{PREFIX}{db}");
    if exact.chars().count() <= MAX_LOCK_NAME && db.to_lowercase() == db {
        return exact;
    }
    // `.` and 16 hex digits after the cut part.
    let keep = MAX_LOCK_NAME - PREFIX.len() - 17;
    let cut: String = db.to_lowercase().chars().take(keep).collect();
    let hash = db.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{PREFIX}{cut}.{hash:016x}")
}

fn amqp_user(amqp: &AmqpUrl) -> String {
    amqp.url
        .parse::<lapin::uri::AMQPUri>()
        .map(|uri| uri.authority.userinfo.username)
        .unwrap_or_else(|_| "guest".to_string())
}

fn socket_addr((setting, value): (&Setting, &str)) -> Result<SocketAddr, ConfigError> {
    value
        .parse()
        .map_err(|_| ConfigError::setting(setting, value, "expected IP:PORT, e.g. 127.0.0.1:8844"))
}

/// `*` alone: any origin (`None`). Otherwise each entry as browsers
/// serialise an origin ([`origin::normalize`]), `null` included only if
/// listed: a start-up error beats a server that refuses every browser.
fn origins((setting, value): (&Setting, &str)) -> Result<Option<Vec<String>>, ConfigError> {
    let entries: Vec<&str> = value
        .split(',')
        .map(str::trim)
        .filter(|o| !o.is_empty())
        .collect();
    match entries[..] {
        [] => Err(ConfigError::setting(
            setting,
            value,
            "expected * or comma-separated origins like https://bugzilla.example.org",
        )),
        ["*"] => Ok(None),
        _ if entries.contains(&"*") => Err(ConfigError::setting(
            setting,
            value,
            "* allows every origin: give it alone, or list the origins without it",
        )),
        _ => entries
            .iter()
            .map(|entry| {
                origin::normalize(entry).map_err(|why| {
                    ConfigError::setting(setting, value, &format!("{entry:?}: {why}"))
                })
            })
            .collect::<Result<Vec<String>, ConfigError>>()
            .map(Some),
    }
}

fn source((setting, value): (&Setting, &str)) -> Result<Source, ConfigError> {
    match value {
        "push_notify" => Ok(Source::PushNotify),
        "bugs" => Ok(Source::Bugs),
        _ => Err(ConfigError::setting(
            setting,
            value,
            "expected push_notify or bugs",
        )),
    }
}

fn duration((setting, value): (&Setting, &str)) -> Result<Duration, ConfigError> {
    let parsed = parse_duration(value).ok_or_else(|| {
        ConfigError::setting(setting, value, "expected a duration like 250ms or 2s")
    })?;
    match setting.range {
        Range::Duration(min, max) if !(min..=max).contains(&parsed) => Err(ConfigError::setting(
            setting,
            value,
            &format!(
                "expected a duration from {} to {}",
                format_duration(min),
                format_duration(max)
            ),
        )),
        _ => Ok(parsed),
    }
}

/// An AMQP heartbeat: whole seconds, as the protocol counts them.
fn heartbeat((setting, value): (&Setting, &str)) -> Result<u16, ConfigError> {
    parse_duration(value)
        .filter(|d| d.subsec_millis() == 0)
        .and_then(|d| u16::try_from(d.as_secs()).ok())
        .ok_or_else(|| ConfigError::setting(setting, value, "expected whole seconds, 1s to 65535s"))
}

/// `250ms`, `2s`, `5m`, `24h`: a whole number and a unit, more than zero.
pub fn parse_duration(value: &str) -> Option<Duration> {
    let digits = value.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = value.split_at(digits);
    let number: u64 = number.parse().ok()?;
    let duration = match unit {
        "ms" => Duration::from_millis(number),
        "s" => Duration::from_secs(number),
        "m" => Duration::from_secs(number.checked_mul(60)?),
        "h" => Duration::from_secs(number.checked_mul(3600)?),
        _ => return None,
    };
    (!duration.is_zero()).then_some(duration)
}

/// The default is systemd's `$STATE_DIRECTORY`, or none outside systemd;
/// `off` is none whatever systemd says.
fn state_directory(
    (setting, value): (&Setting, &str),
    systemd: Option<PathBuf>,
) -> Result<Option<PathBuf>, ConfigError> {
    if value == setting.default {
        return Ok(systemd);
    }
    if value == "off" {
        return Ok(None);
    }
    let path = PathBuf::from(value);
    if !path.is_absolute() {
        return Err(ConfigError::setting(
            setting,
            value,
            "expected an absolute path, or off",
        ));
    }
    Ok(Some(path))
}

fn number((setting, value): (&Setting, &str)) -> Result<usize, ConfigError> {
    let (min, max, unit) = match setting.range {
        Range::Count { min, max, unit } => (min, max, unit),
        _ => (0, u64::MAX, "units"),
    };
    value
        .parse::<u64>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| {
            ConfigError::setting(
                setting,
                value,
                &format!("expected a number of {unit} from {min} to {max}"),
            )
        })
}

fn text((setting, value): (&Setting, &str), max_len: usize) -> Result<String, ConfigError> {
    if value.is_empty() || value.len() > max_len {
        return Err(ConfigError::setting(
            setting,
            value,
            &format!("expected 1 to {max_len} characters"),
        ));
    }
    Ok(value.to_string())
}

fn log_level((setting, value): (&Setting, &str)) -> Result<LevelFilter, ConfigError> {
    match value {
        "error" => Ok(LevelFilter::Error),
        "warn" => Ok(LevelFilter::Warn),
        "info" => Ok(LevelFilter::Info),
        "debug" => Ok(LevelFilter::Debug),
        "trace" => Ok(LevelFilter::Trace),
        _ => Err(ConfigError::setting(
            setting,
            value,
            "expected error, warn, info, debug or trace",
        )),
    }
}

/// Why a URL that is not [`redacted`] is refused.
const AMBIGUOUS: &str = "expected SCHEME://USER[:PASSWORD]@HOST[:PORT]/…, with one @ \
    and nothing but digits after the host's colon";

/// `scheme://user:secret@host/…` → `scheme://user:***@host/…`, for a URL
/// that bzpush accepted (every accepted URL is [`redacted`]); for anything
/// else, what [`shown`] shows.
pub fn redact_url(url: &str) -> String {
    shown(url).unwrap_or_else(|| "(URL not shown: it may hold a password)".to_string())
}

/// `value` as it may be printed: redacted if it is a URL, unchanged if
/// it cannot hold a password, `None` if it might and its password cannot
/// be told apart (`mysql://u:se/cr@t@host/db`, `mysql:/u:pw@host/db`).
fn shown(value: &str) -> Option<String> {
    if !value.contains("://") && !value.contains('@') {
        return Some(value.to_string());
    }
    redacted(value)
}

/// `value` redacted, if it is a URL whose parts are unambiguous: a scheme,
/// an authority with at most one `@`, a port of digits only, and no `@`
/// after the authority (a sign of an unencoded `/`, `?` or `#` in the
/// password). The password and any `password=` query value become `***`;
/// a fragment is dropped.
fn redacted(value: &str) -> Option<String> {
    let (scheme, rest) = value.split_once("://")?;
    let scheme_ok = origin::is_scheme(scheme);
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    if !scheme_ok || tail.contains('@') {
        return None;
    }
    let (userinfo, hostport) = match authority.split_once('@') {
        Some((userinfo, hostport)) => (Some(userinfo), hostport),
        None => (None, authority),
    };
    let port = match hostport.strip_prefix('[') {
        // [IPv6]:port
        Some(bracketed) => bracketed.split_once(']')?.1.strip_prefix(':').unwrap_or(""),
        None => hostport.split_once(':').map_or("", |(_, port)| port),
    };
    if hostport.contains('@') || !port.bytes().all(|b| b.is_ascii_digit()) || port.len() > 5 {
        return None;
    }
    let user = match userinfo {
        Some(userinfo) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@"),
            None => format!("{userinfo}@"),
        },
        None => String::new(),
    };
    let tail = tail.split('#').next().unwrap_or_default();
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let pairs: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
                    _ => pair.to_string(),
                })
                .collect();
            format!("{path}?{}", pairs.join("&"))
        }
        None => tail.to_string(),
    };
    Some(format!("{scheme}://{user}{hostport}{tail}"))
}

/// A library's complaint about URL `value`, unless it repeats a secret of
/// it (the password, a `password=` query value): then only that the URL
/// does not parse.
/// The mysql crate's complaint about a URL as a sentence, without its
/// type wrapper (`URL ParseError { invalid port number }`) and without
/// any secret of `value`.
fn url_complaint(error: &mysql::UrlError, value: &str) -> String {
    let complaint = match error {
        mysql::UrlError::ParseError(e) => e.to_string(),
        e => e.to_string(),
    };
    without_secrets(&complaint, value)
}

fn without_secrets(complaint: &str, value: &str) -> String {
    let rest = value.split_once("://").map_or(value, |(_, rest)| rest);
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let password = authority
        .split_once('@')
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .map(|(_, password)| password);
    let query = rest.split_once('?').map_or("", |(_, query)| query);
    let query_passwords = query.split('&').filter_map(|pair| {
        let (key, secret) = pair.split_once('=')?;
        key.eq_ignore_ascii_case("password").then_some(secret)
    });
    let leaks = password
        .into_iter()
        .chain(query_passwords)
        .any(|secret| !secret.is_empty() && complaint.contains(secret));
    if leaks {
        "the URL does not parse".to_string()
    } else {
        complaint.to_string()
    }
}

/// The text of `bzpush --help`, written from [`SETTINGS`].
pub fn help() -> String {
    let mut text = format!(
        "bzpush {}: Bugzilla push notifications\n\n\
         Usage: bzpush <COMMAND> [--env-file PATH]... [--SETTING VALUE]...\n\n\
         Commands:\n  \
         run     poll Bugzilla's database and serve WebSocket clients, in one process\n  \
         poll    poll Bugzilla's database and publish each change to Pulse (AMQP)\n  \
         serve   serve WebSocket clients (bugzfeed protocol) from Pulse\n  \
         demo    run fed by a simulated Bugzilla (in memory, or a scratch database with --database-url)\n  \
         check   check a command's settings and dependencies: bzpush check run|poll|serve\n\n\
         `bzpush COMMAND --help` lists only the settings that command reads.\n\n\
         Settings (environment variable, flag, default):\n",
        env!("CARGO_PKG_VERSION")
    );
    text.push_str(&setting_lines(SETTINGS.iter()));
    text.push_str(HELP_FOOTER);
    text
}

/// The text of `bzpush MODE --help`: the settings `mode` reads.
pub fn mode_help(mode: &str) -> String {
    // `check` checks run, poll and serve; there is no `check demo`.
    let check = if mode == "demo" {
        String::new()
    } else {
        format!("       bzpush check {mode} [--env-file PATH]... [--SETTING VALUE]...\n")
    };
    let mut text = format!(
        "Usage: bzpush {mode} [--env-file PATH]... [--SETTING VALUE]...\n{check}\n\
         Settings `{mode}` reads (environment variable, flag, default):\n"
    );
    let mut lines = setting_lines(settings_of(mode).into_iter());
    if mode == "demo" {
        // The demo needs no Bugzilla: without the setting it simulates
        // one in memory, and given one it wants a server, not `bugs`.
        let database = lookup("database-url").map(|s| (s.default, s.doc));
        if let Some((default, doc)) = database {
            lines = lines.replacen(default, DEMO_DATABASE_DEFAULT, 1).replacen(
                doc,
                DEMO_DATABASE_DOC,
                1,
            );
        }
    }
    text.push_str(&lines);
    text.push_str(HELP_FOOTER);
    text
}

const DEMO_DATABASE_DEFAULT: &str = "none: in memory";
const DEMO_DATABASE_DOC: &str = "demo: a MySQL or MariaDB server where the demo may create and \
    drop a scratch database, e.g. mysql://root@127.0.0.1:3306/; unset, Bugzilla is simulated in memory";

const HELP_FOOTER: &str = "\n--env-file PATH reads a file in systemd's EnvironmentFile= syntax (repeatable, \
    later files win).\nA flag wins over an --env-file, which wins over the environment. \
    Exit status: 0 clean stop, 1 runtime failure, 2 bad configuration.\n";

fn setting_lines<'a>(settings: impl Iterator<Item = &'a Setting>) -> String {
    let mut text = String::new();
    for s in settings {
        text.push_str(&format!(
            "  {:<28} --{:<21} {}\n      {}\n",
            s.env_var(),
            s.name,
            s.default,
            s.doc
        ));
        if let Some(range) = s.range.describe() {
            text.push_str(&format!("      ({range})\n"));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(args: &[&str], env: &[(&str, &str)]) -> Result<Invocation, ConfigError> {
        let env = env
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        parse(args.iter().map(OsString::from), env)
    }

    fn poll(args: &[&str], env: &[(&str, &str)]) -> Result<PollConfig, ConfigError> {
        let args: Vec<&str> = std::iter::once("poll")
            .chain(args.iter().copied())
            .collect();
        match run_args(&args, env)? {
            Invocation::Start(Mode::Poll(config)) => Ok(config),
            other => panic!("expected poll, got {other:?}"),
        }
    }

    #[test]
    fn the_broker_link_has_a_heartbeat_unless_the_url_sets_one() {
        let config = poll(&[], &[]).expect("defaults are valid");
        assert_eq!(
            config.amqp.secret(),
            "amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=10"
        );
        let url = "amqp://u:p@h/v?heartbeat=3";
        let config = poll(&["--amqp-url", url, "--heartbeat", "30s"], &[]).expect("valid");
        assert_eq!(config.amqp.secret(), url);
        let config = poll(
            &["--amqp-url", "amqp://u:p@h/v?frame_max=8192"],
            &[("BZPUSH_HEARTBEAT", "1m")],
        )
        .expect("valid");
        assert_eq!(
            config.amqp.secret(),
            "amqp://u:p@h/v?frame_max=8192&heartbeat=60"
        );
        for bad in ["1500ms", "0s", "19h"] {
            assert!(poll(&["--heartbeat", bad], &[]).is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults_match_the_spec() {
        let config = poll(&[], &[]).expect("defaults are valid");
        assert_eq!(config.poller.source, Source::PushNotify);
        assert_eq!(config.poller.poll_interval, Duration::from_secs(1));
        assert_eq!(config.exchange, "exchange/bugzilla/simple");
        assert_eq!(
            config.amqp.to_string(),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            config.poller.database.to_string(),
            "mysql://bugs@localhost:3306/bugs"
        );
    }

    #[test]
    fn a_flag_wins_over_the_environment() {
        let config = poll(
            &["--poll-interval", "250ms", "--source=bugs"],
            &[
                ("BZPUSH_POLL_INTERVAL", "2s"),
                ("BZPUSH_SOURCE", "push_notify"),
            ],
        )
        .expect("valid");
        assert_eq!(config.poller.poll_interval, Duration::from_millis(250));
        assert_eq!(config.poller.source, Source::Bugs);
    }

    #[test]
    fn errors_name_the_setting_and_hide_passwords() {
        let err = poll(&[], &[("BZPUSH_POLL_INTERVAL", "soon")]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("BZPUSH_POLL_INTERVAL (--poll-interval)"),
            "{err}"
        );
        let err = poll(&["--database-url", "postgres://u:hunter2@h/db"], &[]).unwrap_err();
        assert!(err.to_string().contains("BZPUSH_DATABASE_URL"), "{err}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let err = poll(&[], &[("BZPUSH_POLL_INTERVL", "1s")]).unwrap_err();
        assert!(err.to_string().contains("BZPUSH_POLL_INTERVL"), "{err}");
        assert!(poll(&["--batch-size", "0"], &[]).is_err());
        assert!(poll(&["--nope", "1"], &[]).is_err());
        assert!(poll(&["--log"], &[]).is_err());
    }

    fn demo(args: &[&str], env: &[(&str, &str)]) -> Result<DemoConfig, ConfigError> {
        let args: Vec<&str> = std::iter::once("demo")
            .chain(args.iter().copied())
            .collect();
        match run_args(&args, env)? {
            Invocation::Start(Mode::Demo(config)) => Ok(config),
            other => panic!("expected demo, got {other:?}"),
        }
    }

    #[test]
    fn demo_simulates_in_memory_unless_given_a_database_server() {
        let config = demo(&[], &[]).expect("defaults are valid");
        assert!(config.database.is_none());
        assert!(!config.listen_given);
        assert_eq!(config.server.bugzilla_url, None);
        let config = demo(
            &[
                "--database-url",
                "mysql://root:pw@db:3306/?prefer_socket=false",
            ],
            &[("BZPUSH_LISTEN", "127.0.0.1:0")],
        )
        .expect("a server without a database is valid for the demo");
        assert!(config.listen_given);
        let scratch = config.database.expect("a server").with_database("scratch");
        assert_eq!(
            scratch.to_string(),
            "mysql://root:***@db:3306/scratch?prefer_socket=false"
        );
        assert_eq!(scratch.opts.get_db_name(), Some("scratch"));
        assert!(parse(["check", "demo"].map(OsString::from), []).is_err());
    }

    #[test]
    fn bugzilla_url_is_an_address_that_cannot_break_out_of_html() {
        let config =
            demo(&["--bugzilla-url", "https://bugzilla.example.org/"], &[]).expect("valid");
        assert_eq!(
            config.server.bugzilla_url.as_deref(),
            Some("https://bugzilla.example.org")
        );
        for bad in [
            "bugzilla.example.org",
            "javascript:alert(1)",
            "https://b/\"><x>",
            "https://b/ x",
        ] {
            let err = demo(&["--bugzilla-url", bad], &[]).unwrap_err();
            assert!(err.to_string().contains("BZPUSH_BUGZILLA_URL"), "{err}");
        }
    }

    fn allowed_origins(value: &str) -> Result<Option<Vec<String>>, ConfigError> {
        let args = ["run", "--allowed-origins", value].map(OsString::from);
        match parse(args, std::iter::empty())? {
            Invocation::Start(Mode::Run(config)) => Ok(config.server.allowed_origins),
            other => panic!("expected run, got {other:?}"),
        }
    }

    #[test]
    fn allowed_origins_are_normalised_or_refused() {
        assert_eq!(allowed_origins("*"), Ok(None));
        assert_eq!(
            allowed_origins("https://bugzilla.example.org/, https://Bugzilla.Example.org:443,null"),
            Ok(Some(vec![
                "https://bugzilla.example.org".to_string(),
                "https://bugzilla.example.org".to_string(),
                "null".to_string(),
            ]))
        );
        for bad in [
            "",
            " , ",
            "*,https://a.example",
            "https://bugzilla.example.org/bugzilla/",
            "bugzilla.example.org",
            "https://a.example?x",
        ] {
            let err = allowed_origins(bad).expect_err(bad).to_string();
            assert!(err.starts_with("BZPUSH_ALLOWED_ORIGINS"), "{err}");
        }
    }

    #[test]
    fn the_state_directory_defaults_to_systemds_and_the_replay_limit_is_bounded() {
        let config = poll(&[], &[]).expect("valid");
        assert_eq!(config.poller.state_directory, None);
        assert_eq!(config.poller.replay_limit, Duration::from_secs(86_400));
        let systemd = [("STATE_DIRECTORY", "/var/lib/bzpush:/var/lib/other")];
        let config = poll(&[], &systemd).expect("valid");
        assert_eq!(
            config.poller.state_directory,
            Some(PathBuf::from("/var/lib/bzpush"))
        );
        let config = poll(&["--state-directory", "off"], &systemd).expect("valid");
        assert_eq!(config.poller.state_directory, None);
        let config = poll(&["--state-directory", "/srv/bz"], &systemd).expect("valid");
        assert_eq!(
            config.poller.state_directory,
            Some(PathBuf::from("/srv/bz"))
        );
        assert!(poll(&["--state-directory", "relative"], &[]).is_err());
        assert!(poll(&["--replay-limit", "500ms"], &[]).is_err());
        assert!(poll(&["--replay-limit", "721h"], &[]).is_err());
        assert!(poll(&["--replay-limit", "720h"], &[]).is_ok());
        assert!(poll(&["--overlap", "500ms"], &[]).is_err());
        assert!(poll(&["--overlap", "2h"], &[]).is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Some(Duration::from_secs(60)));
        for bad in ["", "0s", "1", "s", "1.5s", "-1s", "1 s", "1d"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn redaction() {
        assert_eq!(
            redact_url("mysql://bugs:pw@host/db"),
            "mysql://bugs:***@host/db"
        );
        assert_eq!(
            redact_url("amqp://u:p%40ss@[::1]:5672/%2f?heartbeat=5#x"),
            "amqp://u:***@[::1]:5672/%2f?heartbeat=5"
        );
        assert_eq!(
            redact_url("mysql://bugs@host/db?password=pw&socket=/s"),
            "mysql://bugs@host/db?password=***&socket=/s"
        );
        assert_eq!(redact_url("mysql://bugs@host/db"), "mysql://bugs@host/db");
        assert_eq!(redact_url("not a url"), "not a url");
        // Where the password cannot be told apart, nothing is shown.
        for ambiguous in [
            "amqp://u:p@ss@h:5672/%2f",
            "mysql://bzpush:se/cr@t:x#y@127.0.0.1:3306/bugs",
            "mysql://u:pw?x@h/db",
            "mysql://u:pw#x@h/db",
            "mysql://bugs:secret/bugs",
            "mysql:/u:secret@h/db",
            "mysql//u:secret@h/db",
        ] {
            assert_eq!(redacted(ambiguous), None, "{ambiguous}");
            assert_eq!(
                redact_url(ambiguous),
                "(URL not shown: it may hold a password)"
            );
        }
    }

    /// Every URL setting, with a password holding each character that must
    /// be percent-encoded: the error names the setting, says what to
    /// encode, and never shows the password.
    #[test]
    fn url_errors_never_show_the_password() {
        let settings = [
            (
                "poll",
                "BZPUSH_DATABASE_URL",
                "mysql://bzpush:{}@127.0.0.1:3306/bugs",
            ),
            (
                "poll",
                "BZPUSH_AMQP_URL",
                "amqp://bzpush:{}@127.0.0.1:5672/%2f",
            ),
            (
                "serve",
                "BZPUSH_CATCHUP_DATABASE_URL",
                "mysql://bzpush:{}@127.0.0.1:3306/bugs",
            ),
            (
                "serve",
                "BZPUSH_AMQP_URL",
                "amqps://bzpush:{}@127.0.0.1:5671/%2f",
            ),
        ];
        let passwords = [
            "se/cr3t",
            "se#cr3t",
            "se?cr3t",
            "se@cr3t",
            "se:cr3t@x",
            "se/cr@t:x#y",
        ];
        // Scheme typos and missing parts print nothing of the password
        // either.
        let broken = [
            "mysq://bzpush:cr3t@127.0.0.1/bugs",
            "mysql:/bzpush:cr3t@127.0.0.1/bugs",
            "mysql://bzpush:cr3t@127.0.0.1:3306",
            "amqp:/bzpush:cr3t@127.0.0.1",
        ];
        for (command, variable, template) in settings {
            let values = passwords
                .iter()
                .map(|p| template.replace("{}", p))
                .chain(broken.iter().map(|b| b.to_string()));
            for value in values {
                let env = [(OsString::from(variable), OsString::from(&value))];
                let args = [OsString::from(command)];
                let err = match parse(args, env) {
                    Err(err) => err.to_string(),
                    // A broken URL of another scheme is fine for the other
                    // setting's parser only if it parses; none does.
                    Ok(_) => panic!("{variable}={value} was accepted"),
                };
                assert!(err.starts_with(variable), "{err}");
                assert!(!err.contains("cr3t"), "{variable}={value}: {err}");
                assert!(!err.contains("cr@t"), "{variable}={value}: {err}");
                assert!(err.contains("%2F %23 %3F %40 %3A"), "{err}");
            }
        }
        // The demo's server URL (it may name no database) alike.
        for password in passwords {
            let value = format!("mysql://bzpush:{password}@127.0.0.1:3306/");
            let err = demo(&["--database-url", &value], &[])
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("BZPUSH_DATABASE_URL"), "{err}");
            assert!(!err.contains("cr3t") && !err.contains("cr@t"), "{err}");
            assert!(err.contains("%2F %23 %3F %40 %3A"), "{value}: {err}");
        }
        // The URL parser's complaint without its Rust type wrapper.
        for value in [
            "mysql://bzpush:cr3t@127.0.0.1:99999/bugs",
            "mysql://bzpush:cr3t@/bugs",
        ] {
            let err = poll(&["--database-url", value], &[])
                .unwrap_err()
                .to_string();
            assert!(!err.contains("ParseError"), "{err}");
            let err = demo(&["--database-url", value], &[])
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(!err.contains("ParseError"), "{err}");
        }
        // A URL without its flag.
        let err = poll(&["mysql://bzpush:se/cr3t@127.0.0.1/bugs"], &[]).unwrap_err();
        assert!(!err.to_string().contains("cr3t"), "{err}");
        let err = poll(&["mysql://bzpush:cr3t@127.0.0.1/bugs"], &[]).unwrap_err();
        assert!(err.to_string().contains("bzpush:***@"), "{err}");
        // Where it parses, the rest of the URL is shown to find the fault.
        let err = poll(
            &["--database-url", "mysql://bzpush:s%40cr3t@127.0.0.1:3306"],
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("\"mysql://bzpush:***@127.0.0.1:3306\""),
            "{err}"
        );
    }
    #[test]
    fn the_default_lock_name_names_the_database_and_fits() {
        let config = poll(&[], &[]).expect("defaults are valid");
        assert_eq!(config.poller.lock_name, "bzpush.poller.bugs");
        let set = poll(&["--lock-name", "mine"], &[]).expect("an explicit name");
        assert_eq!(set.poller.lock_name, "mine");
        // Long names and case-only differences: cut, told apart by a hash.
        let long = "b".repeat(64);
        let longer = format!("{long}x");
        let names = [
            default_lock_name(&long),
            default_lock_name(&longer),
            default_lock_name("Bugs"),
            default_lock_name("bugs"),
            default_lock_name("BUGS"),
        ];
        for (i, name) in names.iter().enumerate() {
            assert!(name.chars().count() <= MAX_LOCK_NAME, "{name}");
            assert!(name.starts_with("bzpush.poller."), "{name}");
            assert!(!names[..i].contains(name), "{name} twice");
        }
        // Stable: every poller of a database, on any host, derives it.
        assert_eq!(default_lock_name("Bugs"), default_lock_name("Bugs"));
        assert_eq!(
            default_lock_name("Bugs"),
            "bzpush.poller.bugs.2a46d4a7e4573732"
        );
    }

    fn env_file(text: &str) -> Vec<(String, String)> {
        parse_env_file(text)
            .into_iter()
            .map(|(_, k, v)| (k, v))
            .collect()
    }

    fn pair(k: &str, v: &str) -> (String, String) {
        (k.to_string(), v.to_string())
    }

    #[test]
    fn env_files_read_as_systemd_reads_them() {
        // The README's old snippet: systemd keeps the comment in the value.
        assert_eq!(
            env_file("#BZPUSH_SOURCE=bugs\nBZPUSH_LISTEN=127.0.0.1:8844       # nginx\n"),
            vec![pair("BZPUSH_LISTEN", "127.0.0.1:8844       # nginx")]
        );
        assert_eq!(
            env_file("  ; comment\n\tA = x y  \nB=\nC\nD='a # b'\nE=\"q\\\"\\$\\n\"\n"),
            vec![
                pair("A", "x y"),
                pair("B", ""),
                pair("D", "a # b"),
                pair("E", "q\"$\\n"),
            ]
        );
        // Continuations, in values and in comments; escapes; quotes that
        // run together with unquoted text.
        assert_eq!(
            env_file("A=one\\\ntwo\n# x \\\nB=hidden\nC=\"x\"y 'z'\nD=a\\ \nE='multi\nline'\n"),
            vec![
                pair("A", "onetwo"),
                pair("C", "xy 'z'"),
                pair("D", "a "),
                pair("E", "multi\nline"),
            ]
        );
        // No newline at the end; CRLF is not special to systemd either.
        assert_eq!(env_file("A=1"), vec![pair("A", "1")]);
    }

    #[test]
    fn a_flag_wins_over_an_env_file_which_wins_over_the_environment() {
        let path = std::env::temp_dir().join(format!("bzpush-env-{}", std::process::id()));
        std::fs::write(
            &path,
            "# from the unit\nBZPUSH_POLL_INTERVAL=3s\nBZPUSH_BATCH_SIZE=7\nOTHER=ignored\n",
        )
        .expect("write a temp file");
        let file = path.to_str().expect("utf-8");
        let env = [("BZPUSH_POLL_INTERVAL", "2s"), ("BZPUSH_OVERLAP", "5s")];
        let config = poll(&["--env-file", file, "--batch-size", "9"], &env).expect("valid");
        assert_eq!(config.poller.poll_interval, Duration::from_secs(3));
        assert_eq!(config.poller.batch_size, 9);
        assert_eq!(config.poller.overlap, Duration::from_secs(5));
        std::fs::write(&path, "BZPUSH_POLL_INTERVL=3s\n").expect("write");
        let err = poll(&[&format!("--env-file={file}")], &[]).unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
        assert!(err.to_string().contains("BZPUSH_POLL_INTERVAL?"), "{err}");
        let _ = std::fs::remove_file(&path);
        let err = poll(&["--env-file", "/nonexistent/bzpush.env"], &[]).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/bzpush.env"), "{err}");
    }

    #[test]
    fn unknown_names_suggest_the_nearest() {
        let err = poll(&[], &[("BZPUSH_PING_TIMOUT", "1s")]).unwrap_err();
        assert!(
            err.to_string()
                .contains("did you mean BZPUSH_PING_TIMEOUT?"),
            "{err}"
        );
        let err = poll(&["--databse-url", "x"], &[]).unwrap_err();
        assert!(
            err.to_string().contains("did you mean --database-url?"),
            "{err}"
        );
        // Nothing near: no guess.
        let err = poll(&[], &[("BZPUSH_SOMETHING_ELSE_ENTIRELY", "1")]).unwrap_err();
        assert!(!err.to_string().contains("did you mean"), "{err}");
    }

    #[test]
    fn help_works_in_a_bad_environment() {
        let bad = [("BZPUSH_NOPE", "1"), ("BZPUSH_POLL_INTERVAL", "soon")];
        for args in [&["run", "--help"][..], &["check", "run", "-h"], &["--help"]] {
            assert!(
                matches!(
                    run_args(args, &bad),
                    Ok(Invocation::Help | Invocation::ModeHelp("run"))
                ),
                "{args:?}"
            );
        }
    }

    #[test]
    fn mode_help_lists_only_what_the_mode_reads_with_ranges() {
        let help = mode_help("run");
        for name in [
            "BZPUSH_DATABASE_URL",
            "BZPUSH_LISTEN",
            "BZPUSH_PING_TIMEOUT",
        ] {
            assert!(help.contains(name), "{name} in {help}");
        }
        for name in [
            "BZPUSH_AMQP_URL",
            "BZPUSH_FEEDS",
            "BZPUSH_CATCHUP_DATABASE_URL",
        ] {
            assert!(!help.contains(name), "{name} in {help}");
        }
        assert!(help.contains("(a duration from 1s to 1h)"), "{help}");
        let serve = mode_help("serve");
        assert!(!serve.contains("BZPUSH_POLL_INTERVAL"), "{serve}");
        assert!(serve.contains("BZPUSH_AMQP_URL"), "{serve}");
        let poll = mode_help("poll");
        assert!(!poll.contains("BZPUSH_LISTEN"), "{poll}");
        assert!(poll.contains("bzpush check poll"), "{poll}");
        // There is no `bzpush check demo` to advertise, and the demo
        // needs no Bugzilla: its database is none unless given a server.
        let demo = mode_help("demo");
        assert!(!demo.contains("bzpush check"), "{demo}");
        assert!(!demo.contains("mysql://bugs@localhost"), "{demo}");
        assert!(demo.contains(DEMO_DATABASE_DEFAULT), "{demo}");
        assert!(mode_help("run").contains("mysql://bugs@localhost"));
    }

    #[test]
    fn every_default_is_valid_and_every_number_or_duration_has_a_range() {
        for mode in ["poll", "serve", "run"] {
            assert!(run_args(&[mode], &[]).is_ok(), "{mode}");
        }
        for s in SETTINGS {
            let numeric = parse_duration(s.default).is_some() || s.default.parse::<u64>().is_ok();
            assert_eq!(numeric, s.range.describe().is_some(), "{}", s.name);
        }
    }

    #[test]
    fn out_of_range_values_are_refused_naming_the_range() {
        let err = poll(&[], &[("BZPUSH_POLL_INTERVAL", "999999h")]).unwrap_err();
        assert!(err.to_string().contains("from 10ms to 1h"), "{err}");
        let err = run_args(&["run"], &[("BZPUSH_PING_TIMEOUT", "1ms")]).unwrap_err();
        assert!(err.to_string().contains("from 1s to 1h"), "{err}");
        let err = poll(&["--batch-size", "0"], &[]).unwrap_err();
        assert!(err.to_string().contains("rows from 1 to 100000"), "{err}");
        assert!(poll(&["--poll-interval", "1h"], &[]).is_ok());
    }
}
