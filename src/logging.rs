//! Log lines on stderr, one per event, and their priority in the journal.
//!
//! Owns the process's logger and the one thread that writes to stderr.
//! Logging never blocks the thread that logs: a line goes into a bounded
//! queue, and when stderr stalls (journald stuck, a pipe nobody reads) the
//! queue fills and later lines are dropped and counted ([`dropped`]); the
//! count is said once stderr moves again. Lines that peers or clients can
//! cause go through a [`Throttle`] of their kind. Lines carry no timestamp
//! (journald adds its own). When stderr is the journal's stream (systemd sets `JOURNAL_STREAM`
//! to its device and inode), each line starts with an sd-daemon `<N>`
//! priority, so `journalctl -p warning` finds warnings; anywhere else the
//! lines have no prefix. Dependencies (lapin, rustls, mysql) log their own
//! retries and details, which would repeat what bzpush says once: their
//! messages are demoted, to debug at most. Never logs a
//! setting's value: callers pass only redacted text.

use std::fmt;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use log::{Level, LevelFilter, Log, Metadata, Record};

/// Lines waiting for stderr at most. A pipe holds 64 KiB, so a stalled
/// reader is noticed here after about 64 KiB more of lines; a burst of
/// lines a healthy journald would take is far smaller.
const QUEUE: usize = 1024;

/// Lines dropped since start because stderr did not take them.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// The writer thread's queue, once logging started.
static QUEUED: OnceLock<Sender<Line>> = OnceLock::new();

/// What the writer thread is given.
enum Line {
    Text(String),
    /// Everything queued before this is written: say so, and stop.
    Finish(Sender<()>),
}

/// Starts logging at `level` to stderr, and the thread that writes it.
/// Once per process: a second call changes nothing.
pub fn init(level: LevelFilter) {
    let (tx, rx) = crossbeam_channel::bounded(QUEUE);
    if QUEUED.set(tx.clone()).is_err() {
        return;
    }
    let journal = stderr_is_journal();
    let writer = thread::Builder::new()
        .name("log".into())
        .spawn(move || write_lines(&rx, journal));
    if let Err(e) = writer {
        // Nowhere else to say it, and nothing may block on it.
        let _ = writeln!(io::stderr(), "bzpush: cannot start the log thread: {e}");
        return;
    }
    let logger = Logger {
        level,
        journal,
        lines: tx,
    };
    // Leaked: the logger lives as long as the process, as `log` requires.
    if log::set_logger(Box::leak(Box::new(logger))).is_ok() {
        log::set_max_level(level);
    }
}

/// Waits at most `timeout` for the lines queued so far to reach stderr,
/// then ends the writer thread: the last thing a process does, so that its
/// last lines (why it stops) are not lost, and a stalled stderr cannot
/// hold its exit.
pub fn finish(timeout: Duration) {
    let Some(lines) = QUEUED.get() else { return };
    let (done_tx, done_rx) = crossbeam_channel::bounded(1);
    if lines.send_timeout(Line::Finish(done_tx), timeout).is_ok() {
        let _ = done_rx.recv_timeout(timeout);
    }
}

/// Lines dropped since start because stderr did not take them in time.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// The writer thread: writes each line whole, until [`finish`]. After
/// lines were dropped, the next write says how many.
fn write_lines(lines: &Receiver<Line>, journal: bool) {
    let mut said = 0;
    for line in lines {
        let text = match line {
            Line::Text(text) => text,
            Line::Finish(done) => {
                let _ = done.send(());
                return;
            }
        };
        let dropped = dropped();
        let mut stderr = io::stderr().lock();
        if dropped > said {
            let prefix = if journal { priority(Level::Warn) } else { "" };
            let _ = writeln!(
                stderr,
                "{prefix}[WARN] {} log lines were dropped: stderr did not take them \
                 (is journald stuck?)",
                dropped - said
            );
            said = dropped;
        }
        // A closed stderr leaves nowhere to say so.
        let _ = stderr.write_all(text.as_bytes());
    }
}

/// One kind of log line that peers or clients can cause (a malformed Pulse
/// message, a refused origin, a connection that hit a limit): at most
/// [`Throttle::PER_MINUTE`] a minute get through; the rest are counted,
/// and the next line let through says how many were held back.
pub struct Throttle {
    window: Mutex<Window>,
    /// Lines let through a minute.
    limit: u32,
}

struct Window {
    start: Option<Instant>,
    passed: u32,
    held: u64,
}

impl Throttle {
    /// Lines of one kind let through per minute.
    pub const PER_MINUTE: u32 = 10;

    pub const fn new() -> Throttle {
        Throttle::per_minute(Self::PER_MINUTE)
    }

    /// A throttle that lets `limit` lines a minute through: 1 for a kind
    /// whose every line says the same (a resource ran out), and whose count
    /// is what matters.
    pub const fn per_minute(limit: u32) -> Throttle {
        Throttle {
            window: Mutex::new(Window {
                start: None,
                passed: 0,
                held: 0,
            }),
            limit,
        }
    }

    /// `Some` if a line may be logged now, with how many of its kind were
    /// held back since the last one (to append to the line); `None` to
    /// hold this one back.
    pub fn allow(&self) -> Option<HeldBack> {
        let mut window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if window
            .start
            .is_none_or(|start| now.duration_since(start) >= Duration::from_secs(60))
        {
            window.start = Some(now);
            window.passed = 0;
        }
        if window.passed >= self.limit {
            window.held += 1;
            return None;
        }
        window.passed += 1;
        Some(HeldBack(std::mem::take(&mut window.held)))
    }
}

impl Default for Throttle {
    fn default() -> Throttle {
        Throttle::new()
    }
}

/// How many lines of a kind a [`Throttle`] held back before this one:
/// shown as ` (N more like it were not logged)`, or as nothing.
#[derive(Debug, PartialEq, Eq)]
pub struct HeldBack(pub u64);

impl fmt::Display for HeldBack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            0 => Ok(()),
            n => write!(f, " ({n} more like it were not logged)"),
        }
    }
}

/// The `<N>` to put before a line of `level` on stderr: empty unless
/// stderr is the journal. For what is printed before logging starts (a
/// configuration error).
pub fn prefix(level: Level) -> &'static str {
    if stderr_is_journal() {
        priority(level)
    } else {
        ""
    }
}

/// Whether stdout is the journal: `bzpush check` prints there (as
/// `ExecStartPre=`, to the journal), and then prefixes [`priority`].
pub fn stdout_is_journal() -> bool {
    is_journal(io::stdout().as_fd())
}

struct Logger {
    level: LevelFilter,
    journal: bool,
    lines: Sender<Line>,
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        effective_level(metadata.target(), metadata.level()) <= self.level
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = effective_level(record.target(), record.level());
        let message = if is_own(record.target()) {
            record.args().to_string()
        } else {
            format!("{}: {}", record.target(), record.args())
        };
        let prefix = if self.journal { priority(level) } else { "" };
        let mut text = String::with_capacity(message.len() + 16);
        // journald reads one entry per line: a message of several lines
        // gets the priority on each, so none is filed as info.
        for line in message.split('\n') {
            text.push_str(&format!("{prefix}[{level}] {line}\n"));
        }
        // One write per message, by the writer thread: lines of different
        // threads never mix, and none waits for stderr.
        if self.lines.try_send(Line::Text(text)).is_err() {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn flush(&self) {}
}

fn is_own(target: &str) -> bool {
    target == "bzpush" || target.starts_with("bzpush::")
}

/// The level a record is logged at: its own for bzpush's. A dependency's
/// errors, warnings and notes show at debug, its own debug detail only at
/// trace: `BZPUSH_LOG=debug` stays readable.
fn effective_level(target: &str, level: Level) -> Level {
    match level {
        _ if is_own(target) => level,
        Level::Error | Level::Warn | Level::Info => Level::Debug,
        Level::Debug | Level::Trace => Level::Trace,
    }
}

/// The sd-daemon(3) priority prefix of a line of `level`.
pub fn priority(level: Level) -> &'static str {
    match level {
        Level::Error => "<3>",
        Level::Warn => "<4>",
        Level::Info => "<6>",
        Level::Debug | Level::Trace => "<7>",
    }
}

/// Whether stderr is the journal's stream: bzpush runs as a systemd unit.
pub(crate) fn stderr_is_journal() -> bool {
    is_journal(io::stderr().as_fd())
}

/// Whether `fd` is the stream systemd connected to the journal:
/// `JOURNAL_STREAM` is `DEVICE:INODE` of that stream, and it is inherited,
/// so it counts only if `fd` is still that very file (not redirected by a
/// wrapper or a shell).
fn is_journal(fd: BorrowedFd) -> bool {
    let Some(expected) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    // fstat on a duplicate: std offers no fstat on a borrowed descriptor.
    let Ok(fd) = fd.try_clone_to_owned() else {
        return false;
    };
    let Ok(metadata) = std::fs::File::from(fd).metadata() else {
        return false;
    };
    expected.to_str() == Some(&format!("{}:{}", metadata.dev(), metadata.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependencies_log_at_debug_at_most() {
        assert_eq!(effective_level("bzpush::poller", Level::Warn), Level::Warn);
        assert_eq!(effective_level("bzpush", Level::Error), Level::Error);
        assert_eq!(
            effective_level("lapin::channels", Level::Warn),
            Level::Debug
        );
        assert_eq!(effective_level("rustls::conn", Level::Error), Level::Debug);
        assert_eq!(effective_level("mysql::conn", Level::Debug), Level::Trace);
        assert_eq!(
            effective_level("lapin::io_loop", Level::Trace),
            Level::Trace
        );
        assert_eq!(effective_level("bzpushy", Level::Info), Level::Debug);
    }

    #[test]
    fn a_throttle_lets_a_few_through_and_counts_the_rest() {
        let throttle = Throttle::new();
        for _ in 0..Throttle::PER_MINUTE {
            assert_eq!(throttle.allow(), Some(HeldBack(0)));
        }
        assert_eq!(throttle.allow(), None);
        assert_eq!(throttle.allow(), None);
        // A new minute: the next line says what was held back.
        throttle.window.lock().expect("lock").start =
            Instant::now().checked_sub(Duration::from_secs(61));
        let held = throttle.allow().expect("a new minute");
        assert_eq!(held, HeldBack(2));
        assert_eq!(held.to_string(), " (2 more like it were not logged)");
        assert_eq!(HeldBack(0).to_string(), "");
    }

    #[test]
    fn priorities_follow_sd_daemon() {
        assert_eq!(priority(Level::Error), "<3>");
        assert_eq!(priority(Level::Warn), "<4>");
        assert_eq!(priority(Level::Info), "<6>");
        assert_eq!(priority(Level::Debug), "<7>");
        assert_eq!(priority(Level::Trace), "<7>");
    }
}
