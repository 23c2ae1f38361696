//! Log lines on stderr, one per event, and their priority in the journal.
//!
//! Owns the process's logger. Lines carry no timestamp (journald adds its
//! own). When stderr is the journal's stream (systemd sets `JOURNAL_STREAM`
//! to its device and inode), each line starts with an sd-daemon `<N>`
//! priority, so `journalctl -p warning` finds warnings; anywhere else the
//! lines have no prefix. Dependencies (lapin, rustls, mysql) log their own
//! retries and details, which would repeat what bzpush says once: their
//! messages are demoted, to debug at most. Never logs a
//! setting's value: callers pass only redacted text.

use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Starts logging at `level` to stderr. Once per process: a second call
/// changes nothing.
pub fn init(level: LevelFilter) {
    let logger = Logger {
        level,
        journal: stderr_is_journal(),
    };
    // Leaked: the logger lives as long as the process, as `log` requires.
    if log::set_logger(Box::leak(Box::new(logger))).is_ok() {
        log::set_max_level(level);
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
        // One write per message: lines of different threads never mix. A
        // closed stderr leaves nowhere to say so.
        let _ = io::stderr().lock().write_all(text.as_bytes());
    }

    fn flush(&self) {
        let _ = io::stderr().flush();
    }
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
    fn priorities_follow_sd_daemon() {
        assert_eq!(priority(Level::Error), "<3>");
        assert_eq!(priority(Level::Warn), "<4>");
        assert_eq!(priority(Level::Info), "<6>");
        assert_eq!(priority(Level::Debug), "<7>");
        assert_eq!(priority(Level::Trace), "<7>");
    }
}
