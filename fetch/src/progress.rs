//! Progress lines of a fetch (`fetching URI: 12.0 of 80.0 MB (15%), 40.1
//! MB/s`), at most one per interval, logged with `tracing` at info level.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The progress of one fetch, shared by its downloads.
pub(crate) struct Progress {
    label: String,
    interval: Duration,
    started: Instant,
    state: Mutex<ProgressState>,
}

struct ProgressState {
    total: Option<u64>,
    done: u64,
    last: Instant,
}

impl Progress {
    /// `label` names the source (credentials removed); `total` is the size
    /// of everything to fetch, where known.
    pub(crate) fn new(label: String, total: Option<u64>, interval: Duration) -> Self {
        let now = Instant::now();
        Progress { label, interval, started: now, state: Mutex::new(ProgressState { total, done: 0, last: now }) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ProgressState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A file of this size was already present.
    pub(crate) fn skip(&self, size: u64) {
        let mut state = self.state();
        state.total = state.total.map(|t| t.saturating_sub(size));
    }

    /// The size of a file became known while the total was not.
    pub(crate) fn add_total(&self, size: u64) {
        let mut state = self.state();
        if state.done == 0 && state.total.is_none() {
            state.total = Some(size);
        }
    }

    /// Bytes counted before were thrown away (a download started over).
    pub(crate) fn rewind(&self, bytes: u64) {
        let mut state = self.state();
        state.done = state.done.saturating_sub(bytes);
    }

    /// Bytes received; logs a line when the interval has passed.
    pub(crate) fn add(&self, bytes: u64) {
        let mut state = self.state();
        state.done += bytes;
        let now = Instant::now();
        if now.duration_since(state.last) < self.interval {
            return;
        }
        state.last = now;
        let elapsed = now.duration_since(self.started);
        let rate = rate_mb_s(state.done, elapsed);
        match state.total {
            Some(total) if total > 0 => tracing::info!(
                "fetching {}: {:.1} of {:.1} MB ({:.0}%), {rate:.1} MB/s",
                self.label,
                state.done as f64 / 1e6,
                total as f64 / 1e6,
                100.0 * state.done as f64 / total as f64
            ),
            _ => tracing::info!("fetching {}: {:.1} MB, {rate:.1} MB/s", self.label, state.done as f64 / 1e6),
        }
    }
}

/// Megabytes (10^6 bytes) per second.
pub(crate) fn rate_mb_s(bytes: u64, elapsed: Duration) -> f64 {
    let seconds = elapsed.as_secs_f64();
    if seconds > 0.0 {
        bytes as f64 / 1e6 / seconds
    } else {
        0.0
    }
}
