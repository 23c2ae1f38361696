//! The `bzpush` command: configuration, logging, the chosen subcommand,
//! an exit status (0 clean stop, 1 runtime failure, 2 bad configuration).
#![forbid(unsafe_code)]

use std::net::TcpListener;
use std::process::ExitCode;

use bzpush::config::{self, Config, Invocation};
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
        Invocation::Check(config) => {
            if check::run(&config, &mut std::io::stdout()) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Invocation::Start(config) => {
            logging::init(config.log());
            match start(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!("{e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// Runs `config`'s mode until SIGTERM or SIGINT, or until a thread the pipeline
/// needs ends ([`shutdown::spawn_essential`]): that is an error, status 1.
fn start(config: Config) -> Result<(), String> {
    info!("bzpush {} {}", env!("CARGO_PKG_VERSION"), describe(&config));
    // Bound before any thread starts: a taken port is a start-up failure.
    let listener = match &config {
        Config::Poll(_) => None,
        Config::Serve(config) => Some(bind(config.server.listen)?),
        Config::Run(config) => Some(bind(config.server.listen)?),
        Config::Demo(config) => Some(demo::bind(config.server.listen, config.listen_given)?),
    };
    let (trigger, shutdown) = shutdown::channel();
    let signals = signals::spawn(trigger).map_err(|e| format!("cannot watch signals: {e}"))?;
    let result = match (config, listener) {
        (Config::Serve(config), Some(listener)) => {
            server::serve(&config, listener, &shutdown).map_err(|e| format!("serve: {e}"))
        }
        (Config::Run(config), Some(listener)) => {
            server::run(&config, listener, &shutdown).map_err(|e| format!("run: {e}"))
        }
        (Config::Demo(config), Some(listener)) => demo::run(&config, listener, &shutdown),
        (Config::Poll(config), _) => {
            server::poll(&config, &shutdown).map_err(|e| format!("poll: {e}"))
        }
        _ => Err("no listener".to_string()),
    };
    signals.stop();
    match shutdown.failure() {
        Some(reason) => Err(format!("stopped with status 1: {reason}")),
        None => result,
    }
}

fn bind(addr: std::net::SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr} (BZPUSH_LISTEN): {e}"))
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
