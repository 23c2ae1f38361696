//! The `bzpush` command: configuration, logging, the chosen subcommand,
//! an exit status (0 clean stop, 1 runtime failure, 2 bad configuration).
#![forbid(unsafe_code)]

use std::net::TcpListener;
use std::process::ExitCode;
use std::time::Duration;

use bzpush::config::{self, Invocation, Mode};
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
        Invocation::Check(mode) => {
            if check::run(&mode, &mut std::io::stdout()) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Invocation::Start(mode) => {
            logging::init(mode.log());
            let status = match start(mode) {
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

/// Runs `mode` until SIGTERM or SIGINT, or until a thread the pipeline
/// needs ends ([`shutdown::spawn_essential`]): that is an error, status 1.
fn start(mode: Mode) -> Result<(), String> {
    info!("bzpush {} {}", env!("CARGO_PKG_VERSION"), describe(&mode));
    // Bound before any thread starts: a taken port is a start-up failure.
    let listener = match &mode {
        Mode::Poll(_) => None,
        Mode::Serve(config) => Some(bind(config.server.listen)?),
        Mode::Run(config) => Some(bind(config.server.listen)?),
        Mode::Demo(config) => Some(demo::bind(config.server.listen, config.listen_given)?),
    };
    let (trigger, shutdown) = shutdown::channel();
    let signals = signals::spawn(trigger).map_err(|e| format!("cannot watch signals: {e}"))?;
    let result = match (mode, listener) {
        (Mode::Serve(config), Some(listener)) => {
            server::serve(&config, listener, &shutdown).map_err(|e| format!("serve: {e}"))
        }
        (Mode::Run(config), Some(listener)) => {
            server::run(&config, listener, &shutdown).map_err(|e| format!("run: {e}"))
        }
        (Mode::Demo(config), Some(listener)) => demo::run(&config, listener, &shutdown),
        (Mode::Poll(config), _) => {
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
fn describe(mode: &Mode) -> String {
    match mode {
        Mode::Poll(c) => format!(
            "poll: source {:?}, database {}, broker {}, exchange {:?}",
            c.poller.source, c.poller.database, c.amqp, c.exchange
        ),
        Mode::Serve(c) => format!(
            "serve: broker {}, feeds {}",
            c.amqp,
            c.feeds
                .iter()
                .map(|f| format!("{}={}", f.path, f.exchange))
                .collect::<Vec<_>>()
                .join(",")
        ),
        Mode::Run(c) => format!(
            "run: source {:?}, database {}, listening on {}",
            c.poller.source, c.poller.database, c.server.listen
        ),
        Mode::Demo(c) => match &c.database {
            Some(server) => format!("demo: a scratch database on {server}"),
            None => "demo: in memory".to_string(),
        },
    }
}
