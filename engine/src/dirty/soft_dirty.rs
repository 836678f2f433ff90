//! [`SoftDirty`]: dirty tracking with the kernel's soft-dirty bits
//! (`CONFIG_MEM_SOFT_DIRTY`), as CRIU does: writing `4` to
//! `/proc/PID/clear_refs` clears the bits (and write-protects the pages);
//! a write sets bit 55 of the page's `/proc/PID/pagemap` entry again.
//!
//! Only usable where a real probe ([`crate::features::Feature::SoftDirty`])
//! proves the bits work; [`SoftDirty::new`] refuses otherwise. The
//! development kernel lacks them, so this tracker is tested here only for
//! that refusal and for its pagemap decoding.
//!
//! Limit: reading pagemap and clearing the bits are two steps, and
//! `clear_refs` covers the whole process. A write that lands between
//! `collect`'s pagemap read and its `clear_refs` is lost; the window is kept
//! as short as one write(2), but a caller that needs no window at all must
//! stop the target around `collect` (or use [`super::UffdWpAsync`], whose
//! scan re-protects atomically).

use super::{normalize, push_range, DirtyError, DirtyRange, DirtyTracker, VmaRange, PAGE};
use crate::features::{self, Feature, DIRTY_TRACKER_SOFT_DIRTY};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

/// Bit 55 of a pagemap entry: the page is soft-dirty.
const PM_SOFT_DIRTY: u64 = 1 << 55;
/// Pagemap entries read per `pread`.
const PAGEMAP_BATCH: usize = 64 * 1024;

/// Tracks writes with soft-dirty bits; see the module documentation.
pub struct SoftDirty {
    pid: i32,
    pagemap: File,
    clear_refs: File,
    tracked: Vec<VmaRange>,
    /// Ranges read before a re-`arm` cleared the bits, returned by the next
    /// collect.
    pending: Vec<DirtyRange>,
    armed: bool,
    disarmed: bool,
}

impl SoftDirty {
    /// Opens the target's pagemap and `clear_refs`, after probing that
    /// soft-dirty bits work on this kernel.
    pub fn new(pid: i32) -> Result<SoftDirty, DirtyError> {
        let probe = features::probe(Feature::SoftDirty);
        if !probe.available {
            return Err(DirtyError::Unavailable {
                pid,
                tracker: DIRTY_TRACKER_SOFT_DIRTY,
                reason: probe.detail,
            });
        }
        let open = |name: &str, write: bool| {
            let path = PathBuf::from(format!("/proc/{pid}/{name}"));
            OpenOptions::new()
                .read(!write)
                .write(write)
                .open(&path)
                .map_err(|source| DirtyError::File {
                    pid,
                    op: "open",
                    path,
                    source,
                })
        };
        Ok(SoftDirty {
            pid,
            pagemap: open("pagemap", false)?,
            clear_refs: open("clear_refs", true)?,
            tracked: Vec::new(),
            pending: Vec::new(),
            armed: false,
            disarmed: false,
        })
    }

    fn clear(&mut self) -> Result<(), DirtyError> {
        self.clear_refs
            .write_all(b"4")
            .map_err(|source| DirtyError::File {
                pid: self.pid,
                op: "write 4 to",
                path: PathBuf::from(format!("/proc/{}/clear_refs", self.pid)),
                source,
            })
    }

    /// Reads the soft-dirty bits of every tracked page.
    fn read_dirty(&self) -> Result<Vec<DirtyRange>, DirtyError> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; PAGEMAP_BATCH * 8];
        for span in &self.tracked {
            let mut page = span.start / PAGE;
            let last = span.end / PAGE;
            while page < last {
                let n = ((last - page) as usize).min(PAGEMAP_BATCH);
                let bytes = &mut buf[..n * 8];
                let got =
                    self.pagemap
                        .read_at(bytes, page * 8)
                        .map_err(|source| DirtyError::File {
                            pid: self.pid,
                            op: "read",
                            path: PathBuf::from(format!("/proc/{}/pagemap", self.pid)),
                            source,
                        })?;
                if got < 8 {
                    break; // the process is gone or the range is past its end
                }
                decode(page * PAGE, &bytes[..got - got % 8], &mut out);
                page += (got / 8) as u64;
            }
        }
        Ok(out)
    }

    fn check_live(&self) -> Result<(), DirtyError> {
        if self.disarmed {
            return Err(DirtyError::Disarmed {
                pid: self.pid,
                tracker: DIRTY_TRACKER_SOFT_DIRTY,
            });
        }
        Ok(())
    }
}

/// Appends the soft-dirty pages of the pagemap entries `entries` (the first
/// one for address `addr`) to `out`.
fn decode(addr: u64, entries: &[u8], out: &mut Vec<DirtyRange>) {
    for (i, e) in entries.chunks_exact(8).enumerate() {
        let mut word = [0u8; 8];
        word.copy_from_slice(e);
        if u64::from_le_bytes(word) & PM_SOFT_DIRTY != 0 {
            let start = addr + i as u64 * PAGE;
            push_range(out, start, start + PAGE);
        }
    }
}

impl DirtyTracker for SoftDirty {
    fn name(&self) -> &'static str {
        DIRTY_TRACKER_SOFT_DIRTY
    }

    fn arm(&mut self, vmas: &[VmaRange]) -> Result<(), DirtyError> {
        self.check_live()?;
        let wanted = normalize(self.pid, vmas)?;
        // clear_refs clears the whole process: keep what is pending in the
        // ranges that stay tracked.
        if self.armed {
            let before = self.read_dirty()?;
            self.pending.extend(before.into_iter().filter_map(|r| {
                let keep = wanted.iter().find(|w| w.start < r.end && r.start < w.end)?;
                Some(DirtyRange {
                    start: r.start.max(keep.start),
                    end: r.end.min(keep.end),
                })
            }));
        }
        self.clear()?;
        self.tracked = wanted;
        self.armed = true;
        Ok(())
    }

    fn collect(&mut self) -> Result<Vec<DirtyRange>, DirtyError> {
        self.check_live()?;
        let dirty = self.read_dirty()?;
        self.clear()?;
        let mut all = std::mem::take(&mut self.pending);
        all.extend(dirty);
        Ok(super::sort_merge(all))
    }

    fn disarm(&mut self) -> Result<(), DirtyError> {
        // Nothing is registered: soft-dirty bits cost the target nothing.
        self.disarmed = true;
        self.tracked.clear();
        self.pending.clear();
        Ok(())
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn decode_finds_bit_55_runs() {
        let mut entries = Vec::new();
        for dirty in [false, true, true, false, true] {
            let e: u64 = (1 << 63) | if dirty { PM_SOFT_DIRTY } else { 0 } | 1234;
            entries.extend_from_slice(&e.to_le_bytes());
        }
        let mut out = Vec::new();
        decode(0x10_0000, &entries, &mut out);
        assert_eq!(
            out,
            [
                DirtyRange {
                    start: 0x10_1000,
                    end: 0x10_3000
                },
                DirtyRange {
                    start: 0x10_4000,
                    end: 0x10_5000
                },
            ]
        );
    }
}
