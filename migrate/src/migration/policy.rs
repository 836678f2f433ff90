//! When to stop pre-copy (cf. QEMU's and P.Haul's convergence rules). Pure
//! logic, no I/O. After each round the source decides, in this order:
//!
//! 1. **Fits**: the bytes the last round had to send (the dirty set one
//!    round long) would go out within the downtime budget at the bandwidth
//!    measured so far → freeze now.
//! 2. **Max rounds**: `max_rounds` pre-copy rounds are done → freeze now.
//! 3. **Not shrinking**: from round 2 on, the last round sent at least 90% of
//!    what the round before it sent: more rounds will not help → freeze now.
//!
//! Round 0 (the full copy) is always followed by at least one more round,
//! because only then is the dirty rate known.
use std::time::Duration;

#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub max_downtime: Duration,
    pub max_rounds: u32,
}

/// What a finished round sent and how long it took.
#[derive(Debug, Clone, Copy, Default)]
pub struct RoundRecord {
    #[allow(dead_code)] // kept for logs and tests
    pub round: u32,
    pub bytes: u64,
    pub elapsed: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Continue,
    Fits,
    MaxRounds,
    NotShrinking,
}

impl Decision {
    pub fn reason(self) -> &'static str {
        match self {
            Decision::Continue => "continue",
            Decision::Fits => "the dirty set fits the downtime budget",
            Decision::MaxRounds => "the round limit was reached",
            Decision::NotShrinking => "the dirty set stopped shrinking",
        }
    }
}

/// Bytes per second over all rounds so far (0 if nothing was timed).
pub fn bandwidth(history: &[RoundRecord]) -> f64 {
    let bytes: u64 = history.iter().map(|r| r.bytes).sum();
    let secs: f64 = history.iter().map(|r| r.elapsed.as_secs_f64()).sum();
    if secs > 0.0 {
        bytes as f64 / secs
    } else {
        0.0
    }
}

pub fn decide(policy: &Policy, history: &[RoundRecord]) -> Decision {
    let Some(last) = history.last() else {
        return Decision::Continue;
    };
    if history.len() < 2 {
        return Decision::Continue;
    }
    let bw = bandwidth(history);
    let expected = if bw > 0.0 {
        Duration::from_secs_f64(last.bytes as f64 / bw)
    } else {
        Duration::ZERO
    };
    if last.bytes == 0 || expected <= policy.max_downtime {
        return Decision::Fits;
    }
    if history.len() as u32 >= policy.max_rounds {
        return Decision::MaxRounds;
    }
    if history.len() >= 3 {
        let prev = &history[history.len() - 2];
        if last.bytes * 10 >= prev.bytes * 9 {
            return Decision::NotShrinking;
        }
    }
    Decision::Continue
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(round: u32, mib: u64, ms: u64) -> RoundRecord {
        RoundRecord {
            round,
            bytes: mib << 20,
            elapsed: Duration::from_millis(ms),
        }
    }

    const P: Policy = Policy {
        max_downtime: Duration::from_millis(300),
        max_rounds: 10,
    };

    #[test]
    fn full_copy_is_always_followed_by_a_round() {
        assert_eq!(decide(&P, &[]), Decision::Continue);
        assert_eq!(decide(&P, &[rec(0, 0, 1)]), Decision::Continue);
    }

    #[test]
    fn idle_process_fits_after_round_one() {
        assert_eq!(
            decide(&P, &[rec(0, 1024, 1000), rec(1, 0, 5)]),
            Decision::Fits
        );
        // 10 MiB at ~1 GiB/s: 10 ms.
        assert_eq!(
            decide(&P, &[rec(0, 1024, 1000), rec(1, 10, 10)]),
            Decision::Fits
        );
    }

    #[test]
    fn busy_process_continues_then_stops() {
        // 1 GiB/s link; 500 MiB dirty per round would take ~0.5 s: continue.
        let h = [rec(0, 1024, 1000), rec(1, 500, 500)];
        assert_eq!(decide(&P, &h), Decision::Continue);
        // Not shrinking.
        let h = [rec(0, 1024, 1000), rec(1, 500, 500), rec(2, 480, 480)];
        assert_eq!(decide(&P, &h), Decision::NotShrinking);
        // Shrinking but over the limit.
        let p = Policy { max_rounds: 3, ..P };
        let h = [rec(0, 1024, 1000), rec(1, 800, 800), rec(2, 400, 400)];
        assert_eq!(decide(&p, &h), Decision::MaxRounds);
        // Shrinking into the budget.
        let h = [rec(0, 1024, 1000), rec(1, 500, 500), rec(2, 100, 100)];
        assert_eq!(decide(&P, &h), Decision::Fits);
    }
}
