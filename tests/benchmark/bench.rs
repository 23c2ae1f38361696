//! Benchmarks against real MariaDB, real RabbitMQ and the real (release)
//! `bzpush` binary, through the test harness.
//!
//! `cargo bench --bench bench -- <GROUP>` runs one group of scenarios and
//! ends with a Markdown table. Each group is a module here with a
//! `run() -> Vec<Row>`, listed in [`GROUPS`].
//!
//! The binary under test is the one `cargo bench` builds with the bench
//! profile (release settings), `target/release/bzpush`: Cargo passes its
//! path as `CARGO_BIN_EXE_bzpush` to benchmarks as to integration tests,
//! and the harness starts it from there. The numbers depend on everything
//! else the machine runs, so the 1-minute load average before and after is
//! printed with the table.
#![allow(clippy::print_stdout, clippy::print_stderr)]

// The part of the tests' harness (`tests/integration/util`) the benchmarks
// share with the tests, file by file, at this crate's root, where those
// files find each other as `super::`. Each of them is used whole by both.
#[path = "../integration/util/basics.rs"]
mod basics;
#[path = "../integration/util/frames.rs"]
mod frames;
#[path = "../integration/util/mariadb.rs"]
mod mariadb;
#[path = "../integration/util/process.rs"]
mod process;
#[path = "../integration/util/rabbitmq.rs"]
mod rabbitmq;
#[path = "../integration/util/watchdog.rs"]
mod watchdog;

mod poll;
mod serve;

use basics::{Rng, unique, wait_until, wait_until_every};
use mariadb::{MYSQL_ADDR, TestDb};
use process::Bzpush;
use rabbitmq::{AMQP_ADDR, Broker, amqp_url_at};

use std::process::ExitCode;

/// One line of the final table.
pub struct Row {
    pub scenario: String,
    pub setting: String,
    /// The central figure: a median or a p50.
    pub center: String,
    /// The spread: p90/p99, or the individual runs.
    pub spread: String,
    pub target: String,
    /// `None` when the row has no target.
    pub met: Option<bool>,
}

struct Group {
    name: &'static str,
    about: &'static str,
    run: fn() -> Vec<Row>,
}

const GROUPS: &[Group] = &[
    Group {
        name: "poll",
        about: "bzpush poll: push_notify backlog throughput, and commit-to-consumer lag",
        run: poll::run,
    },
    Group {
        name: "serve",
        about: "bzpush serve: idle memory and CPU, fan-out latency, delivery throughput, reconnect storm",
        run: serve::run,
    },
];

fn usage() -> String {
    let mut text = String::from(
        "Usage: cargo bench --bench bench -- <GROUP>\n\n\
         Needs what the tests need: MariaDB at 127.0.0.1:3306 with the tests' \
         account and RabbitMQ at 127.0.0.1:5672; `./test` sets both up.\n\nGroups:\n",
    );
    for g in GROUPS {
        text.push_str(&format!("  {:<8} {}\n", g.name, g.about));
    }
    text
}

fn main() -> ExitCode {
    // Cargo adds `--bench` (and `cargo test` runs this with no argument at
    // all): the group is the first argument that is not a flag.
    let Some(name) = std::env::args().skip(1).find(|a| !a.starts_with('-')) else {
        print!("{}", usage());
        return ExitCode::SUCCESS;
    };
    if name == serve::FLOOR_PROCESS {
        return serve::floor_process();
    }
    let Some(group) = GROUPS.iter().find(|g| g.name == name) else {
        eprint!("unknown group {name:?}\n\n{}", usage());
        return ExitCode::from(2);
    };
    let load_before = load_average();
    let rows = (group.run)();
    println!();
    print!("{}", table(&rows));
    if let (Some(before), Some(after)) = (load_before, load_average()) {
        println!("\nLoad average (1 min) before: {before}, after: {after}.");
    }
    ExitCode::SUCCESS
}

/// The 1-minute load average, where the system tells it (Linux).
fn load_average() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    text.split_whitespace().next().map(str::to_string)
}

fn table(rows: &[Row]) -> String {
    let mut text = String::from(
        "| scenario | setting | median / p50 | p90 / p99 (or runs) | target | met? |\n\
         | --- | --- | --- | --- | --- | --- |\n",
    );
    for r in rows {
        let met = match r.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "–",
        };
        text.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            r.scenario, r.setting, r.center, r.spread, r.target, met
        ));
    }
    text
}

/// The `q`-quantile (0..=1) of `sorted` by nearest rank.
pub fn quantile<T: Copy>(sorted: &[T], q: f64) -> T {
    assert!(!sorted.is_empty(), "no samples");
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A count with thousands separators: 12345.6 → `12,346`.
pub fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}
