//! The summary every migration ends with: rounds, bytes per round and on
//! the wire, compression, total time and downtime (source frozen →
//! destination running), as text or JSON.
use std::fmt::Write;
use std::time::Duration;

#[derive(Debug, Clone, Default)]
pub struct RoundReport {
    pub round: u32,
    pub dirty_pages: u64,
    pub pages_sent: u64,
    pub zero_pages: u64,
    pub bytes_sent: u64,
    pub elapsed: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub tracker: String,
    /// What carried the pages: "quic", "tcp" or "tcp-sealed".
    pub page_transport: &'static str,
    pub rounds: Vec<RoundReport>,
    pub stop_reason: String,
    pub batches: u64,
    pub compressed_batches: u64,
    pub raw_bytes: u64,
    pub wire_bytes: u64,
    pub frozen_at_unix_us: u64,
    pub restored_at_unix_us: u64,
    /// Start → the destination committed (the process runs there and the
    /// original is dead); freeing the original's memory comes after.
    pub total: Duration,
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

impl Report {
    /// Source frozen → destination running (both clocks are this host's in
    /// tests; across hosts, as good as their clock sync).
    pub fn downtime(&self) -> Duration {
        Duration::from_micros(
            self.restored_at_unix_us
                .saturating_sub(self.frozen_at_unix_us),
        )
    }

    pub fn compression_ratio(&self) -> f64 {
        if self.wire_bytes == 0 {
            1.0
        } else {
            self.raw_bytes as f64 / self.wire_bytes as f64
        }
    }

    pub fn text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "migration complete (dirty tracking: {}; pages on {}; pre-copy stopped: {})",
            self.tracker,
            match self.page_transport {
                "tcp" => "TCP page channels",
                "tcp-sealed" => "sealed TCP page channels",
                _ => "QUIC page streams",
            },
            self.stop_reason
        );
        for r in &self.rounds {
            let secs = r.elapsed.as_secs_f64();
            let _ = writeln!(
                s,
                "  round {:>2}: {:>9} pages sent ({:>8.1} MiB, {:>7} zero skipped), {:>8} dirty, {:>7.1} ms, {:>7.1} MiB/s",
                r.round,
                r.pages_sent,
                mib(r.bytes_sent),
                r.zero_pages,
                r.dirty_pages,
                secs * 1e3,
                if secs > 0.0 { mib(r.bytes_sent) / secs } else { 0.0 }
            );
        }
        let _ = writeln!(
            s,
            "  total: {:.1} MiB of pages, {:.1} MiB on the wire (compression ratio {:.2}, {} of {} batches compressed)",
            mib(self.raw_bytes),
            mib(self.wire_bytes),
            self.compression_ratio(),
            self.compressed_batches,
            self.batches
        );
        let _ = writeln!(
            s,
            "  time: {:.3} s total (start -> committed), downtime {:.1} ms (source frozen -> destination running)",
            self.total.as_secs_f64(),
            self.downtime().as_secs_f64() * 1e3
        );
        s
    }

    pub fn json(&self) -> String {
        let rounds: Vec<String> = self
            .rounds
            .iter()
            .map(|r| {
                format!(
                    "{{\"round\":{},\"dirty_pages\":{},\"pages_sent\":{},\"zero_pages\":{},\"bytes_sent\":{},\"ms\":{:.3}}}",
                    r.round,
                    r.dirty_pages,
                    r.pages_sent,
                    r.zero_pages,
                    r.bytes_sent,
                    r.elapsed.as_secs_f64() * 1e3
                )
            })
            .collect();
        format!(
            "{{\"tracker\":\"{}\",\"page_transport\":\"{}\",\"stop_reason\":\"{}\",\"rounds\":[{}],\"raw_bytes\":{},\"wire_bytes\":{},\"compression_ratio\":{:.4},\"batches\":{},\"compressed_batches\":{},\"total_ms\":{:.3},\"downtime_ms\":{:.3}}}",
            self.tracker,
            self.page_transport,
            self.stop_reason,
            rounds.join(","),
            self.raw_bytes,
            self.wire_bytes,
            self.compression_ratio(),
            self.batches,
            self.compressed_batches,
            self.total.as_secs_f64() * 1e3,
            self.downtime().as_secs_f64() * 1e3
        )
    }
}
