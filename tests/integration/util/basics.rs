//! What every part of the harness uses: names no other test uses, waits
//! with a deadline, and a seedable random sequence.
//!
//! Shared with the benchmarks: `tests/benchmark/bench.rs` includes this
//! file (as it includes `mariadb.rs`, `rabbitmq.rs`, `process.rs`,
//! `frames.rs` and `watchdog.rs`), so everything here is used by both, and
//! `super` is the harness's root: `util` in the tests, the crate root in
//! the benchmarks. What only the tests use lives in `util/mod.rs` and the
//! other files of `util/`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::watchdog;

/// A name no other test (or test run) uses: `prefix_<pid>_<time>_<n>`.
/// Nearly every test asks for one first, so this arms the [`watchdog`].
pub fn unique(prefix: &str) -> String {
    watchdog::arm();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{prefix}_{}_{nanos}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// SplitMix64: small, seedable, the same sequence everywhere, so a seed
/// printed by a failing test replays it.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Waits until `check` is true or `timeout` passes; `false` on timeout.
pub fn wait_until(timeout: Duration, check: impl FnMut() -> bool) -> bool {
    wait_until_every(timeout, Duration::from_millis(20), check)
}

/// [`wait_until`], checking every `period`.
pub fn wait_until_every(
    timeout: Duration,
    period: Duration,
    mut check: impl FnMut() -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        thread::sleep(period);
    }
    check()
}
