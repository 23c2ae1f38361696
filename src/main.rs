//! The `bzpush` command: configuration, logging, the chosen subcommand,
//! an exit status (0 clean stop, 1 runtime failure, 2 bad configuration).
#![forbid(unsafe_code)]

use std::fmt;
use std::net::{SocketAddr, TcpListener};
use std::process::ExitCode;
use std::time::Duration;

use bzpush::config::{self, Config, Invocation, Mode};
use bzpush::{check, demo, logging, server, shutdown, signals};
use log::{Level, error, info};

fn main() -> ExitCode {
    let invocation = match config::parse(std::env::args_os().skip(1), std::env::vars_os()) {
        Ok(invocation) => invocation,
        Err(e) => {
            eprintln!("{}bzpush: {e}", logging::prefix(Level::Error));
            return ExitCode::from(2);
        }
    };
    match invocation {
        Invocation::Help => {
            print!("{}", config::help());
            ExitCode::SUCCESS
        }
        Invocation::ModeHelp(mode) => {
            print!("{}", config::mode_help(mode));
            ExitCode::SUCCESS
        }
        Invocation::Version => {
            println!("bzpush {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Invocation::Check(config, given) => {
            if check::run(&config, &given, &mut std::io::stdout()) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Invocation::Start(config) => {
            logging::init(config.log());
            let status = match start(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!("{e}");
                    ExitCode::from(1)
                }
            };
            // The last lines say why it stops; a stalled stderr does not
            // hold the exit for longer than this.
            logging::finish(Duration::from_secs(2));
            status
        }
    }
}

/// Why a started mode ended with status 1; printed once, as one line.
#[derive(Debug)]
enum StartError {
    /// What the mode needs before it runs (the listen address, the
    /// signal watcher) could not be had: what was tried, and why.
    Setup(String),
    /// The mode's run failed.
    Failed(Mode, String),
    /// A thread the pipeline needs ended ([`shutdown::spawn_essential`]).
    Stopped(String),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Setup(why) => f.write_str(why),
            StartError::Failed(mode, why) => write!(f, "{mode}: {why}"),
            StartError::Stopped(reason) => write!(f, "stopped with status 1: {reason}"),
        }
    }
}

/// Runs `config`'s mode until SIGTERM or SIGINT, or until a thread the
/// pipeline needs ends ([`shutdown::spawn_essential`]): that is an error.
fn start(config: Config) -> Result<(), StartError> {
    info!("bzpush {} {}", env!("CARGO_PKG_VERSION"), describe(&config));
    let mode = config.mode();
    // Bound before any thread starts: a taken port is a start-up failure.
    let listener = match &config {
        Config::Poll(_) => None,
        Config::Serve(c) => Some(bind(c.server.listen)?),
        Config::Run(c) => Some(bind(c.server.listen)?),
        Config::Demo(c) => {
            Some(demo::bind(c.server.listen, c.listen_given).map_err(StartError::Setup)?)
        }
    };
    let (trigger, shutdown) = shutdown::channel();
    let signals = signals::spawn(trigger)
        .map_err(|e| StartError::Setup(format!("cannot watch signals: {e}")))?;
    let result = match (config, listener) {
        (Config::Serve(c), Some(listener)) => {
            server::serve(&c, listener, &shutdown).map_err(|e| e.to_string())
        }
        (Config::Run(c), Some(listener)) => {
            server::run(&c, listener, &shutdown).map_err(|e| e.to_string())
        }
        (Config::Demo(c), Some(listener)) => demo::run(&c, listener, &shutdown),
        (Config::Poll(c), _) => server::poll(&c, &shutdown).map_err(|e| e.to_string()),
        _ => Err("no listener".to_string()),
    };
    signals.stop();
    match shutdown.failure() {
        Some(reason) => Err(StartError::Stopped(reason)),
        None => result.map_err(|why| StartError::Failed(mode, why)),
    }
}

fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .map_err(|e| StartError::Setup(format!("cannot listen on {addr} (BZPUSH_LISTEN): {e}")))
}

/// One line for the log saying what runs against what.
fn describe(config: &Config) -> String {
    match config {
        Config::Poll(c) => format!(
            "poll: source {:?}, database {}, broker {}, exchange {:?}",
            c.poller.source, c.poller.database, c.amqp, c.exchange
        ),
        Config::Serve(c) => format!(
            "serve: broker {}, feeds {}",
            c.amqp,
            c.feeds
                .iter()
                .map(|f| format!("{}={}", f.path, f.exchange))
                .collect::<Vec<_>>()
                .join(",")
        ),
        Config::Run(c) => format!(
            "run: source {:?}, database {}, listening on {}",
            c.poller.source, c.poller.database, c.server.listen
        ),
        Config::Demo(c) => match &c.database {
            Some(server) => format!("demo: a scratch database on {server}"),
            None => "demo: in memory".to_string(),
        },
    }
}
