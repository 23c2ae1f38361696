//! The watermark file of source `bugs`: the watermark, kept across restarts.
//!
//! Owns one small file in the state directory (systemd's `StateDirectory=`)
//! holding the database time of the last poll whose changes were all
//! confirmed, `YYYY-MM-DDTHH:MM:SS` and a newline. It is replaced
//! atomically (write a temporary file, fsync, rename, fsync the folder), so
//! a crash leaves the old watermark or the new one, never half of one. A
//! missing, unreadable or corrupt file is never fatal: the poller falls
//! back to starting one overlap before the database's current time, and
//! says so once. Nothing here talks to the database.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use log::{debug, info, warn};

use crate::notification::ChangeTime;

pub struct WatermarkFile {
    path: PathBuf,
    /// The watermark last written, so an unchanged one is not written again
    /// (the database clock has one-second steps; polls may come faster).
    saved: Option<ChangeTime>,
    /// The last save failed: said once, until a save works again.
    failing: bool,
}

impl WatermarkFile {
    /// The state file for the pollers that share `lock_name` (one name per
    /// Bugzilla database), in `directory`.
    pub fn new(directory: &Path, lock_name: &str) -> WatermarkFile {
        let name: String = lock_name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        WatermarkFile {
            path: directory.join(format!("{name}.watermark")),
            saved: None,
            failing: false,
        }
    }

    #[cfg(test)]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Why the last save failed, if it did: said in `/health` until a save
    /// works again.
    pub fn failing(&self) -> Option<String> {
        self.failing.then(|| {
            format!(
                "cannot save the watermark to {}: a restarted poller would not replay what \
                 changed while it was down (see the log)",
                self.path.display()
            )
        })
    }

    /// The saved watermark; `None` (after one warning, unless there simply
    /// is no file yet) when there is none to trust.
    pub fn load(&self) -> Option<ChangeTime> {
        let text = match fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                debug!("no state file {} yet", self.path.display());
                return None;
            }
            Err(e) => {
                warn!(
                    "cannot read the state file {}: {e}; starting one overlap before the \
                     database's current time, so changes made while no poller ran are not \
                     replayed. Check the file's owner and mode (or remove it)",
                    self.path.display()
                );
                return None;
            }
        };
        let watermark = text.trim_end_matches('\n');
        if is_datetime(watermark) {
            Some(ChangeTime::new(watermark))
        } else {
            warn!(
                "the state file {} holds no watermark (expected YYYY-MM-DDTHH:MM:SS, found \
                 {:?}); starting one overlap before the database's current time, so changes \
                 made while no poller ran are not replayed. The next confirmed poll rewrites it",
                self.path.display(),
                text.chars().take(40).collect::<String>()
            );
            None
        }
    }

    /// Replaces the saved watermark. A failure is logged (once, until a
    /// save works again) and otherwise ignored: notifications must not wait
    /// for a disk.
    pub fn save(&mut self, watermark: &ChangeTime) {
        if self.saved.as_ref() == Some(watermark) {
            return;
        }
        match self.write(watermark) {
            Ok(()) => {
                if self.failing {
                    info!("state file {}: saved again", self.path.display());
                    self.failing = false;
                }
                self.saved = Some(watermark.clone());
            }
            Err(e) => {
                if !self.failing {
                    warn!(
                        "cannot save the watermark to {}: {e}; a restarted poller would not \
                         replay what changed while it was down. Make the folder writable \
                         (systemd: StateDirectory=bzpush) or set BZPUSH_STATE_DIRECTORY=off",
                        self.path.display()
                    );
                    self.failing = true;
                }
            }
        }
    }

    fn write(&self, watermark: &ChangeTime) -> io::Result<()> {
        let directory = self.path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(directory)?;
        let temporary = self.path.with_extension("watermark.tmp");
        let mut file = File::create(&temporary)?;
        file.write_all(format!("{watermark}\n").as_bytes())?;
        file.sync_all()?;
        drop(file);
        fs::rename(&temporary, &self.path)?;
        // The rename is durable only once the folder is: without this a
        // power cut can bring back the old file, or none.
        File::open(directory)?.sync_all()
    }
}

/// `YYYY-MM-DDTHH:MM:SS`, digits where digits belong. Times in this form
/// compare as text in time order.
pub fn is_datetime(s: &str) -> bool {
    s.len() == 19
        && s.bytes().enumerate().all(|(i, b)| match i {
            4 | 7 => b == b'-',
            10 => b == b'T',
            13 | 16 => b == b':',
            _ => b.is_ascii_digit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("bzpush-state-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_saved_watermark_loads_back_and_a_corrupt_one_is_none() {
        let dir = scratch("roundtrip");
        let mut state = WatermarkFile::new(&dir, "bzpush.poller/bugs");
        assert_eq!(state.load(), None, "no file yet");
        let watermark = ChangeTime::new("2026-11-30T10:00:00");
        state.save(&watermark);
        assert_eq!(state.load(), Some(watermark));
        assert!(state.path().ends_with("bzpush.poller_bugs.watermark"));
        for corrupt in ["", "garbage", "2026-11-30 10:00:00", "\u{0}\u{0}"] {
            fs::write(state.path(), corrupt).expect("write");
            assert_eq!(state.load(), None, "{corrupt:?}");
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn datetimes() {
        assert!(is_datetime("2026-01-01T00:00:00"));
        for bad in [
            "2026-01-01 00:00:00",
            "2026-1-01T00:00:00",
            "2026-01-01T00:00:0x",
        ] {
            assert!(!is_datetime(bad), "{bad}");
        }
    }
}
