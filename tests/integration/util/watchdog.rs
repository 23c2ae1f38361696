//! The last line of defence against a hung test: a timer per test binary
//! (the integration binary, and the benchmarks').
//!
//! Every wait in the harness has its own deadline, but a hang nobody
//! foresaw (a library call that never returns, a join on a stuck thread)
//! would otherwise hold CI until its limit, 90 minutes later, with nothing
//! to say where. So the first harness call starts a timer; if the binary is
//! still running when it fires, the stacks of the test process and of every
//! `bzpush` it started are printed (with gdb, when the machine has it) and
//! the children are killed and the binary exits with status 101, as a
//! failed test does. libtest's
//! "has been running for over 60 seconds" lines name the tests that hung.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Once;
use std::thread;
use std::time::Duration;

/// How long the test binary may run. The integration binary, every test
/// in it, took about 4 minutes on a loaded 2-core machine; a longer soak
/// sets `TEST_WATCHDOG_SECS`, and 0 turns the watchdog off.
const DEFAULT_LIMIT: Duration = Duration::from_secs(15 * 60);

/// Starts the timer, once per process; later calls do nothing.
pub fn arm() {
    static ARMED: Once = Once::new();
    ARMED.call_once(|| {
        let limit = match std::env::var("TEST_WATCHDOG_SECS") {
            Ok(secs) => match secs.parse::<u64>() {
                Ok(0) => return,
                Ok(secs) => Duration::from_secs(secs),
                Err(_) => panic!("TEST_WATCHDOG_SECS={secs:?}: expected whole seconds"),
            },
            Err(_) => DEFAULT_LIMIT,
        };
        thread::Builder::new()
            .name("test-watchdog".into())
            .spawn(move || {
                thread::sleep(limit);
                fire(limit);
            })
            .expect("spawn the test watchdog");
    });
}

fn fire(limit: Duration) -> ! {
    // Straight to the process's stderr: libtest captures what the
    // `eprintln!` of a test's threads prints and would show it only when
    // the hung test ends, which it never does.
    let mut stderr = std::io::stderr();
    let me = std::process::id();
    let _ = writeln!(
        stderr,
        "\nTEST WATCHDOG: this test binary (pid {me}) still runs after {limit:?}; a test \
         hung. Its stacks and those of its bzpush processes follow; then it exits."
    );
    let children = Command::new("pgrep")
        .args(["-P", &me.to_string()])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for pid in std::iter::once(me.to_string()).chain(children.split_whitespace().map(String::from))
    {
        let _ = writeln!(stderr, "\n---- stacks of pid {pid} ----");
        // gdb writes to our stderr itself: while it holds this process
        // stopped, no thread here could read a pipe from it.
        let gdb = Command::new("gdb")
            .args(["-p", &pid, "-batch", "-ex", "thread apply all bt 20"])
            .stdin(Stdio::null())
            .stdout(std::io::stderr())
            .stderr(Stdio::null())
            .status();
        if let Err(e) = gdb {
            let _ = writeln!(stderr, "(no stacks: gdb did not run: {e})");
        }
    }
    // Exiting runs no destructor: the children would live on as orphans
    // and load the machine for every test binary after this one.
    for pid in children.split_whitespace() {
        let _ = Command::new("kill").args(["-9", pid]).status();
    }
    std::process::exit(101);
}
