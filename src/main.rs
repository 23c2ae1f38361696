//! The `bzpush` command: configuration, logging, the chosen subcommand,
//! an exit status (0 clean stop, 1 runtime failure, 2 bad configuration).
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::thread;

use std::net::TcpListener;

use bzpush::config::{self, Invocation, PollConfig, ServeConfig};
use bzpush::{poller, server, shutdown, signals};
use log::{LevelFilter, error, info};

fn main() -> ExitCode {
    let invocation = match config::parse(std::env::args_os().skip(1), std::env::vars_os()) {
        Ok(invocation) => invocation,
        Err(e) => {
            eprintln!("bzpush: {e}");
            return ExitCode::from(2);
        }
    };
    match invocation {
        Invocation::Help => {
            print!("{}", config::help());
            ExitCode::SUCCESS
        }
        Invocation::Version => {
            println!("bzpush {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Invocation::Poll(config) => {
            init_logging(config.log);
            exit_code(poll(config))
        }
        Invocation::Serve(config) => {
            init_logging(config.log);
            exit_code(serve(config))
        }
    }
}

fn exit_code(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::from(1)
        }
    }
}

/// Log lines to stderr without timestamps (journald adds its own), and only
/// bzpush's own: its dependencies' retries would repeat what it says once.
fn init_logging(level: LevelFilter) {
    let config = simplelog::ConfigBuilder::new()
        .set_time_level(LevelFilter::Off)
        .set_target_level(LevelFilter::Off)
        .set_thread_level(LevelFilter::Off)
        .add_filter_allow_str("bzpush")
        .build();
    // Only fails if a logger is already set, which main does once.
    let _ = simplelog::WriteLogger::init(level, config, std::io::stderr());
}

fn poll(config: PollConfig) -> Result<(), String> {
    info!(
        "bzpush {} poll: source {:?}, database {}, broker {}, exchange {:?}",
        env!("CARGO_PKG_VERSION"),
        config.source,
        config.database,
        config.amqp,
        config.exchange
    );
    let (trigger, shutdown) = shutdown::channel();
    let signals = signals::spawn(trigger).map_err(|e| format!("cannot watch signals: {e}"))?;
    let result = thread::Builder::new()
        .name("poller".into())
        .spawn(move || poller::run(&config, &shutdown))
        .map_err(|e| format!("cannot start the poller thread: {e}"))
        .and_then(|poller| {
            poller
                .join()
                .map_err(|_| "the poller thread panicked".to_string())
        });
    signals.stop();
    result
}

fn serve(config: ServeConfig) -> Result<(), String> {
    info!(
        "bzpush {} serve: broker {}, feeds {}",
        env!("CARGO_PKG_VERSION"),
        config.amqp,
        config
            .feeds
            .iter()
            .map(|f| format!("{}={}", f.path, f.exchange))
            .collect::<Vec<_>>()
            .join(",")
    );
    // Bound before any thread starts: a taken port is a start-up failure.
    let listener = TcpListener::bind(config.listen)
        .map_err(|e| format!("cannot listen on {} (BZPUSH_LISTEN): {e}", config.listen))?;
    let (trigger, shutdown) = shutdown::channel();
    let signals = signals::spawn(trigger).map_err(|e| format!("cannot watch signals: {e}"))?;
    let result = server::serve(&config, listener, &shutdown).map_err(|e| format!("serve: {e}"));
    signals.stop();
    result
}
