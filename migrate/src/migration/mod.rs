//! Live migration: the source (`send`) and destination (`receive`) state
//! machines, the pre-copy convergence policy and the final report. The
//! engine does the process work (`crm_engine::precopy`, `restore`); the
//! transport moves bytes (`crate::transport`).
mod assemble;
pub mod destination;
pub mod policy;
pub mod report;
mod restorer;
mod side_files;
pub mod source;

use std::io::{IsTerminal, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub fn now_unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Progress for people: a live status line on a terminal, log lines
/// otherwise.
pub struct Progress {
    tty: bool,
    round: u32,
    bytes: u64,
    started: std::time::Instant,
}

impl Progress {
    pub fn new() -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
            round: 0,
            bytes: 0,
            started: std::time::Instant::now(),
        }
    }

    pub fn round_start(&mut self, round: u32) {
        self.round = round;
        self.bytes = 0;
        self.started = std::time::Instant::now();
    }

    pub fn pages(&mut self, bytes: u64) {
        self.bytes += bytes;
        if self.tty {
            let secs = self.started.elapsed().as_secs_f64().max(1e-6);
            let mib = self.bytes as f64 / (1 << 20) as f64;
            eprint!(
                "\r  round {:>2}: {:>9.1} MiB sent  {:>8.1} MiB/s   ",
                self.round,
                mib,
                mib / secs
            );
            let _ = std::io::stderr().flush();
        }
    }

    pub fn round_done(&mut self, round: u32, bytes: u64, elapsed: Duration, dirty_pages: u64) {
        let secs = elapsed.as_secs_f64().max(1e-6);
        let mib = bytes as f64 / (1 << 20) as f64;
        let rate = dirty_pages as f64 * 4096.0 / (1 << 20) as f64 / secs;
        if self.tty {
            eprintln!(
                "\r  round {round:>2}: {mib:>9.1} MiB sent  {:>8.1} MiB/s  dirty {dirty_pages} pages ({rate:.1} MiB/s)",
                mib / secs
            );
        } else {
            tracing::info!(
                "round {round}: {mib:.1} MiB sent in {:.1} ms ({:.1} MiB/s), {dirty_pages} pages dirty ({rate:.1} MiB/s)",
                secs * 1e3,
                mib / secs
            );
        }
    }

    pub fn stage(&mut self, what: &str) {
        if self.tty {
            eprintln!("  {what}...");
        } else {
            tracing::info!("{what}");
        }
    }

    pub fn finish(&mut self) {}
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

pub(crate) use crm_engine::error_chain as chain;
