//! The test harness: real MariaDB, real RabbitMQ, the real `bzpush` binary.
//!
//! Each test makes its own uniquely named database, exchange and queue and
//! drops them when it ends, so tests run in parallel without touching each
//! other's data. Faults are real: [`Proxy`] severs TCP connections, and
//! [`Bzpush::kill9`] sends SIGKILL. Each child gets a systemd notify socket
//! the harness owns: where it listens comes from its `STATUS=` line there,
//! as `systemctl status` shows it, not from its log. The tests log in to
//! MariaDB with an account of their own, which `./test` creates; a service
//! that is down or an account missing fails the test saying to run
//! `./test`; nothing is skipped. Every wait has a deadline, so a hung test
//! fails instead of hanging CI, and a [`watchdog`] ends a test binary that
//! runs far too long, printing where it hung.
//!
//! The benchmarks (`tests/benchmark`) include the part of the harness they
//! share with the tests, file by file: `basics.rs`, `mariadb.rs`,
//! `rabbitmq.rs`, `process.rs`, `frames.rs`, `watchdog.rs`. What only the
//! tests use is here and in the other files.

mod basics;
pub mod demo;
pub mod frames;
mod mariadb;
mod private_rabbitmq;
mod process;
mod proxy;
mod rabbitmq;
pub mod run;
pub mod serve;
mod watchdog;

pub use basics::*;
pub use mariadb::*;
pub use private_rabbitmq::PrivateRabbit;
pub use process::*;
pub use proxy::Proxy;
pub use rabbitmq::*;

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::message::Delivery;
use mysql::prelude::Queryable;

impl Rng {
    /// A number in `lo..=hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    /// True once in `n` times.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    /// One of `items` (not empty).
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// A process's resident memory in KiB, from `/proc/PID/status`; 0 once it
/// is gone.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// `2026-01-01 00:00:00` plus `secs` seconds (less than a day), as a
/// DATETIME literal for SQL and as the `delta_ts` Pulse carries.
pub fn datetime(secs: u32) -> (String, String) {
    assert!(secs < 86_400, "datetime({secs}) must stay within one day");
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    (
        format!("2026-01-01 {h:02}:{m:02}:{s:02}"),
        format!("2026-01-01T{h:02}:{m:02}:{s:02}"),
    )
}

impl TestDb {
    /// Rows left in `push_notify`.
    pub fn push_notify_rows(&self) -> u64 {
        self.conn()
            .query_first("SELECT COUNT(*) FROM push_notify")
            .expect("count")
            .unwrap_or(0)
    }
}

/// The exchange of a test and its queue's messages.
pub type TestBroker = Broker<Received>;

/// A message the test's consumer received.
#[derive(Debug)]
pub struct Received {
    pub routing_key: String,
    pub properties: BasicProperties,
    pub body: Vec<u8>,
}

impl Received {
    fn of(delivery: Delivery) -> Received {
        Received {
            routing_key: delivery.routing_key.to_string(),
            properties: delivery.properties.clone(),
            body: delivery.data.clone(),
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("the body is JSON")
    }

    /// `(payload.id, payload.delta_ts)`.
    pub fn bug_and_time(&self) -> (u64, String) {
        let json = self.json();
        let id = json["payload"]["id"]
            .as_u64()
            .expect("payload.id is a number");
        let ts = json["payload"]["delta_ts"]
            .as_str()
            .expect("payload.delta_ts is a string")
            .to_string();
        (id, ts)
    }
}

impl TestBroker {
    pub fn new() -> TestBroker {
        Broker::consuming(Received::of)
    }

    /// Everything that arrives until nothing has for `quiet`.
    pub fn drain(&self, quiet: Duration) -> Vec<Received> {
        std::iter::from_fn(|| self.recv(quiet)).collect()
    }

    /// Appends each arriving message's `(payload.id, payload.delta_ts)` to
    /// `into` until `done(into)` holds or `timeout` passes; `false` on
    /// timeout.
    pub fn receive_until(
        &self,
        into: &mut Vec<(u64, String)>,
        timeout: Duration,
        mut done: impl FnMut(&[(u64, String)]) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if done(into) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            if let Some(message) = self.recv(left.min(Duration::from_millis(100))) {
                into.push(message.bug_and_time());
            }
        }
    }
}

impl Bzpush {
    /// Runs `bzpush <args>` (environment as for [`Bzpush::start`]) to its
    /// end and returns what it printed; fails the test if it still runs
    /// after `timeout`.
    pub fn run(args: &[&str], env: &[(&str, String)], timeout: Duration) -> Finished {
        Bzpush::run_under(&[], args, env, timeout)
    }

    /// As [`Bzpush::run`], run by `wrapper` (see [`Bzpush::command_under`]).
    pub fn run_under(
        wrapper: &[&str],
        args: &[&str],
        env: &[(&str, String)],
        timeout: Duration,
    ) -> Finished {
        let mut child = Bzpush::command_under(wrapper, args, env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the bzpush binary");
        let stdout = read_all(child.stdout.take().expect("piped stdout"));
        let stderr = read_all(child.stderr.take().expect("piped stderr"));
        let deadline = Instant::now() + timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("bzpush {args:?} still ran after {timeout:?}");
                }
                Err(e) => panic!("waiting for bzpush {args:?}: {e}"),
            }
        };
        // The pipes close when the process exits, so the readers end too.
        let text = |reader: thread::JoinHandle<String>| reader.join().expect("pipe reader");
        Finished {
            status,
            stdout: text(stdout),
            stderr: text(stderr),
        }
    }

    /// The piped stdout of a process started with [`Bzpush::start_with`].
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }

    /// Waits until the log contains `needle`; `false` on timeout.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.log().contains(needle))
    }

    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// The exit status, or `None` if still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A `bzpush` run that ended: its status and everything it printed.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Reads a pipe to its end on a thread of its own.
fn read_all(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::Builder::new()
        .name("test-pipe-reader".into())
        .spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        })
        .expect("spawn a pipe reader")
}

impl Bzpush {
    /// As [`Bzpush::start`], but nobody reads its stderr (as when journald
    /// is stuck) until [`Bzpush::read_stderr`].
    pub fn start_unread(args: &[&str], env: &[(&str, String)]) -> Bzpush {
        let notices = process::Notices::bind();
        let child = Bzpush::command(args, env)
            .env("NOTIFY_SOCKET", &notices.name)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the bzpush binary");
        let mut bzpush = Bzpush {
            held_stderr: None,
            child,
            log: Arc::new(Mutex::new(String::new())),
            notices,
        };
        bzpush.held_stderr = bzpush.child.stderr.take();
        bzpush
    }
}
