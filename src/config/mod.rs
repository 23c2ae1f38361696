//! Configuration: the command line and the environment in, what to do out
//! ([`Invocation`]): help, or a mode ([`Mode`]) with its checked
//! configuration ([`Config`]).
//!
//! Every setting is an environment variable `BZPUSH_NAME` and a flag
//! `--name`; a flag wins. One job per file, as ripgrep's flags: the table
//! describes (`settings`: each row names the modes that read it, so help,
//! the man page and `check` come from it), and two stages build. Stage one,
//! `environment`, gathers what the user wrote (flags, `env_file`s, the
//! environment) into values and reads what the machine says, once; stage
//! two, `resolve`, is pure: one resolver per mode validates those values
//! (`values`, `url`) into that mode's configuration. Nothing here opens a
//! connection or starts a thread, and no password appears in anything it
//! prints ([`redact_url`]).

mod env_file;
mod environment;
mod help;
mod resolve;
mod settings;
mod url;
mod values;

use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use log::LevelFilter;

use crate::address::TrustedProxies;
pub use help::{help, mode_help};
pub use settings::{Range, SETTINGS, Setting, key};
pub use url::{AmqpNodes, AmqpUrl, DatabaseUrl, SecretUrl, redact_url};
pub use values::{feed_path, format_duration, parse_duration};

use resolve::Read;

/// A command that runs: what `bzpush MODE` starts and `bzpush check MODE`
/// checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Poller and WebSocket server in one process, no broker.
    Run,
    /// The poller, publishing to Pulse.
    Poll,
    /// The WebSocket server, fed by Pulse.
    Serve,
    /// `run` fed by a simulated Bugzilla.
    Demo,
}

impl Mode {
    /// Every mode, in the order help and the man page list them.
    pub const ALL: [Mode; 4] = [Mode::Run, Mode::Poll, Mode::Serve, Mode::Demo];

    /// The command's name.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Run => "run",
            Mode::Poll => "poll",
            Mode::Serve => "serve",
            Mode::Demo => "demo",
        }
    }

    /// Whether `bzpush check` takes it: a demo depends on nothing.
    pub fn checkable(self) -> bool {
        self != Mode::Demo
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the user asked for on the command line.
#[derive(Debug)]
pub enum Invocation {
    Help,
    /// `bzpush run --help`: the settings of one mode.
    ModeHelp(Mode),
    Version,
    /// Run a mode.
    Start(Config),
    /// `bzpush check <mode>`: check a mode's configuration and
    /// dependencies without starting it; which settings were given.
    Check(Config, Given),
}

/// A mode with its configuration.
#[derive(Clone, Debug)]
pub enum Config {
    Poll(PollConfig),
    Serve(ServeConfig),
    Run(RunConfig),
    Demo(DemoConfig),
}

impl Config {
    /// The mode this configures.
    pub fn mode(&self) -> Mode {
        match self {
            Config::Poll(_) => Mode::Poll,
            Config::Serve(_) => Mode::Serve,
            Config::Run(_) => Mode::Run,
            Config::Demo(_) => Mode::Demo,
        }
    }

    /// The log level this mode was configured with.
    pub fn log(&self) -> LevelFilter {
        match self {
            Config::Poll(c) => c.log,
            Config::Serve(c) => c.log,
            Config::Run(c) => c.log,
            Config::Demo(c) => c.log,
        }
    }
}

/// The settings the user gave (environment, env file or flag), in table
/// order; every other setting has its default.
pub type Given = Vec<&'static Setting>;

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
            url::invalid_value(value),
        ))
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

/// What kind of queue `serve` declares (`BZPUSH_QUEUE_TYPE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueType {
    /// Replicated over the cluster's nodes (Raft): survives the loss of a
    /// minority of them. RabbitMQ 3.8 and later.
    Quorum,
    /// On one node: gone while that node is down.
    Classic,
}

impl QueueType {
    /// The setting's value, as the table and `x-queue-type` spell it.
    pub fn name(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        }
    }
}

/// The database poller's settings (poll, run).
#[derive(Clone, Debug)]
pub struct PollerConfig {
    pub database: DatabaseUrl,
    pub source: Source,
    /// `BZPUSH_SOURCE` was set. Left at its default (`bugs`, since this
    /// version; `push_notify` before), a PushNotify table in the database
    /// is said at start and by `check`: an upgraded install is not switched
    /// without a word.
    pub source_given: bool,
    pub poll_interval: Duration,
    pub batch_size: usize,
    pub overlap: Duration,
    pub lock_name: String,
    /// Source `bugs`: where the watermark survives a restart; `None`: it
    /// does not.
    pub state_directory: Option<PathBuf>,
    /// Source `bugs`: how far back a saved watermark may take a start.
    pub replay_limit: Duration,
    /// `poll`: how long no broker node may answer before an active poller
    /// lets go of the lock (and a standby stops competing for it); `None`
    /// for `run`, which has no broker.
    pub broker_grace: Option<Duration>,
}

/// Everything `bzpush poll` needs.
#[derive(Clone, Debug)]
pub struct PollConfig {
    pub poller: PollerConfig,
    pub amqp: AmqpNodes,
    pub exchange: String,
    /// `/health` answers 503 once a change owed downstream has waited
    /// this long (`BZPUSH_STALE_AFTER`).
    pub stale_after: Duration,
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
    pub amqp: AmqpNodes,
    pub feeds: Vec<Feed>,
    pub queue_prefix: String,
    pub queue_expires: Duration,
    pub queue_type: QueueType,
    /// Read-only access to Bugzilla's database for catch-up, if set.
    pub catchup_database: Option<DatabaseUrl>,
    pub server: ServerConfig,
    /// `/health` answers 503 once a change owed downstream has waited
    /// this long (`BZPUSH_STALE_AFTER`).
    pub stale_after: Duration,
    pub log: LevelFilter,
}

/// Everything `bzpush run` needs: a poller and a server, no broker.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub poller: PollerConfig,
    pub server: ServerConfig,
    /// `/health` answers 503 once a change owed downstream has waited
    /// this long (`BZPUSH_STALE_AFTER`).
    pub stale_after: Duration,
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
    /// `/health` answers 503 once a change owed downstream has waited
    /// this long (`BZPUSH_STALE_AFTER`).
    pub stale_after: Duration,
    pub log: LevelFilter,
}

/// The WebSocket server's settings (serve, run).
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub max_connections: usize,
    /// Open sockets from one client address (handshaking or WebSocket).
    pub max_connections_per_address: usize,
    pub max_subscriptions: usize,
    /// Subscriptions over all connections.
    pub max_subscriptions_total: usize,
    /// Whose `X-Forwarded-For` names the client; empty: nobody's.
    pub trusted_proxies: TrustedProxies,
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
    /// A line the live page shows above everything (the demo's: its
    /// Bugzilla is simulated).
    pub page_note: Option<String>,
}

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
    let mut command = args
        .next()
        .ok_or_else(|| ConfigError("no command given; try `bzpush --help`".into()))?;
    let check = command == "check";
    if check {
        command = args.next().ok_or_else(|| {
            ConfigError("check needs the command to check: bzpush check poll|serve|run".into())
        })?;
    }
    let mode = match command.as_str() {
        "-h" | "--help" | "help" => return Ok(Invocation::Help),
        "-V" | "--version" | "version" if !check => return Ok(Invocation::Version),
        name => Mode::ALL
            .into_iter()
            .find(|mode| mode.name() == name && (mode.checkable() || !check))
            .ok_or_else(|| ConfigError(format!("unknown command {name:?}; try `bzpush --help`")))?,
    };
    let args: Vec<String> = args.collect();
    // Before anything is read: help must work in a broken environment.
    if args.iter().any(|a| a == "-h" || a == "--help") {
        return Ok(Invocation::ModeHelp(mode));
    }
    let env: Vec<(OsString, OsString)> = env.into_iter().collect();
    let values = environment::gather(mode, args, &env, crate::logging::stderr_is_journal())?;
    let config = resolve::resolve(mode, &values, &environment::host(&env))?;
    Ok(if check {
        Invocation::Check(
            config,
            SETTINGS.iter().filter(|s| values.given(s)).collect(),
        )
    } else {
        Invocation::Start(config)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn run_args(args: &[&str], env: &[(&str, &str)]) -> Result<Invocation, ConfigError> {
        let env = env
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        parse(args.iter().map(OsString::from), env)
    }

    /// `bzpush poll ARGS` in `env`.
    pub(super) fn poll(args: &[&str], env: &[(&str, &str)]) -> Result<PollConfig, ConfigError> {
        let args: Vec<&str> = std::iter::once("poll")
            .chain(args.iter().copied())
            .collect();
        match run_args(&args, env)? {
            Invocation::Start(Config::Poll(config)) => Ok(config),
            other => panic!("expected poll, got {other:?}"),
        }
    }

    /// `bzpush demo ARGS` in `env`.
    pub(super) fn demo(args: &[&str], env: &[(&str, &str)]) -> Result<DemoConfig, ConfigError> {
        let args: Vec<&str> = std::iter::once("demo")
            .chain(args.iter().copied())
            .collect();
        match run_args(&args, env)? {
            Invocation::Start(Config::Demo(config)) => Ok(config),
            other => panic!("expected demo, got {other:?}"),
        }
    }

    #[test]
    fn defaults_match_the_spec() {
        let config = poll(&[], &[]).expect("defaults are valid");
        assert_eq!(config.poller.source, Source::Bugs);
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

    #[test]
    fn commands_are_modes_and_nothing_else() {
        for mode in Mode::ALL {
            assert!(
                matches!(run_args(&[mode.name()], &[]), Ok(Invocation::Start(c)) if c.mode() == mode),
                "{mode}"
            );
            let checked = run_args(&["check", mode.name()], &[]);
            assert_eq!(
                matches!(checked, Ok(Invocation::Check(c, _)) if c.mode() == mode),
                mode.checkable(),
                "check {mode}"
            );
        }
        for unknown in ["server", "Run", ""] {
            let err = run_args(&[unknown], &[]).unwrap_err().to_string();
            assert!(err.contains("bzpush --help"), "{unknown}: {err}");
        }
    }

    #[test]
    fn check_knows_which_settings_were_given() {
        let env = [("BZPUSH_AMQP_URL", "amqp://u:p@h/v")];
        let Ok(Invocation::Check(_, given)) = run_args(&["check", "run", "--log", "debug"], &env)
        else {
            panic!("expected check run");
        };
        let names: Vec<&str> = given.iter().map(|s| s.name).collect();
        assert_eq!(names, ["amqp-url", "log"]);
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
    fn help_works_in_a_bad_environment() {
        let bad = [("BZPUSH_NOPE", "1"), ("BZPUSH_POLL_INTERVAL", "soon")];
        for args in [&["run", "--help"][..], &["check", "run", "-h"], &["--help"]] {
            assert!(
                matches!(
                    run_args(args, &bad),
                    Ok(Invocation::Help | Invocation::ModeHelp(Mode::Run))
                ),
                "{args:?}"
            );
        }
    }

    #[test]
    fn every_default_is_valid() {
        for mode in Mode::ALL {
            assert!(run_args(&[mode.name()], &[]).is_ok(), "{mode}");
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
