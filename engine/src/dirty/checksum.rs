//! [`Checksum`]: dirty tracking by hashing every tracked page each round.
//! Works on any kernel and needs nothing from the target but
//! `process_vm_readv`; costs a read of all tracked memory per round and 8
//! bytes of memory per tracked page (one 64-bit hash).
//!
//! Pages are read in batches of [`BATCH`] bytes. A page that cannot be read
//! (its VMA vanished or is not readable) is remembered as unreadable and is
//! not reported; it is reported once it becomes readable again (it
//! "appeared"). Reading a never-touched anonymous page maps the shared zero
//! page in the target; no memory is allocated for it.
//!
//! The hash is four independent multiply–rotate lanes over the page's u64
//! words, folded and finalised with the MurmurHash3 64-bit mixer. Each step
//! is a bijection of the lane state for a given word, so a change of one
//! word always changes the lane; the chance that any other change goes
//! unnoticed is about 2⁻⁶³ per page and round.

use super::{normalize, push_range, DirtyError, DirtyRange, DirtyTracker, VmaRange, PAGE};
use crate::features::DIRTY_TRACKER_CHECKSUM;
use crate::procfs::{self, MapEntry};
use crate::ptrace;
use std::path::PathBuf;

/// Bytes read from the target per `process_vm_readv`.
pub const BATCH: usize = 8 << 20;

/// Hash slot of a page not read yet. Real hashes are odd.
const UNSEEN: u64 = 0;
/// Hash slot of a page that could not be read last time.
const UNREADABLE: u64 = 2;

/// A tracked span and the hash of each of its pages.
struct Span {
    start: u64,
    hashes: Vec<u64>,
}

impl Span {
    fn end(&self) -> u64 {
        self.start + self.hashes.len() as u64 * PAGE
    }
}

/// Tracks writes by comparing page hashes; see the module documentation.
pub struct Checksum {
    pid: i32,
    spans: Vec<Span>,
    buf: Vec<u8>,
    disarmed: bool,
}

impl Checksum {
    /// A tracker for `pid` (which must exist); nothing is read until `arm`.
    pub fn new(pid: i32) -> Result<Checksum, DirtyError> {
        procfs::read_stat(pid).map_err(|source| DirtyError::Proc { pid, source })?;
        Ok(Checksum {
            pid,
            spans: Vec::new(),
            buf: Vec::new(),
            disarmed: false,
        })
    }

    /// Bytes of hash state held (8 per tracked page).
    pub fn state_bytes(&self) -> usize {
        self.spans.iter().map(|s| s.hashes.len() * 8).sum()
    }

    fn check_live(&self) -> Result<(), DirtyError> {
        if self.disarmed {
            return Err(DirtyError::Disarmed {
                pid: self.pid,
                tracker: DIRTY_TRACKER_CHECKSUM,
            });
        }
        Ok(())
    }

    /// The target's VMAs (from `maps`: cheaper than `smaps`).
    fn maps(&self) -> Result<Vec<MapEntry>, DirtyError> {
        let path = PathBuf::from(format!("/proc/{}/maps", self.pid));
        let text = std::fs::read_to_string(&path).map_err(|source| DirtyError::File {
            pid: self.pid,
            op: "read",
            path: path.clone(),
            source,
        })?;
        procfs::parse_maps(&path, &text).map_err(|source| DirtyError::Proc {
            pid: self.pid,
            source,
        })
    }
}

impl DirtyTracker for Checksum {
    fn name(&self) -> &'static str {
        DIRTY_TRACKER_CHECKSUM
    }

    fn arm(&mut self, vmas: &[VmaRange]) -> Result<(), DirtyError> {
        self.check_live()?;
        let wanted = normalize(self.pid, vmas)?;
        let old = std::mem::take(&mut self.spans);
        // Keep the hashes of pages still tracked: their writes since the
        // last collect stay pending.
        let mut spans: Vec<Span> = wanted
            .iter()
            .map(|w| {
                let mut hashes = vec![UNSEEN; ((w.end - w.start) / PAGE) as usize];
                for o in old.iter().filter(|o| o.start < w.end && w.start < o.end()) {
                    let (s, e) = (o.start.max(w.start), o.end().min(w.end));
                    let (from, to) = (
                        ((s - o.start) / PAGE) as usize,
                        ((s - w.start) / PAGE) as usize,
                    );
                    let n = ((e - s) / PAGE) as usize;
                    hashes[to..to + n].copy_from_slice(&o.hashes[from..from + n]);
                }
                Span {
                    start: w.start,
                    hashes,
                }
            })
            .collect();
        // Baseline hashes of the new pages.
        let maps = self.maps()?;
        if self.buf.is_empty() {
            self.buf = vec![0u8; BATCH];
        }
        for span in &mut spans {
            let mut i = 0;
            while i < span.hashes.len() {
                if span.hashes[i] != UNSEEN {
                    i += 1;
                    continue;
                }
                let run = span.hashes[i..]
                    .iter()
                    .position(|&h| h != UNSEEN)
                    .unwrap_or(span.hashes.len() - i);
                let addr = span.start + i as u64 * PAGE;
                hash_run(
                    self.pid,
                    addr,
                    &mut span.hashes[i..i + run],
                    &maps,
                    &mut self.buf,
                    None,
                )?;
                i += run;
            }
        }
        self.spans = spans;
        Ok(())
    }

    fn collect(&mut self) -> Result<Vec<DirtyRange>, DirtyError> {
        self.check_live()?;
        let maps = self.maps()?;
        if self.buf.is_empty() {
            self.buf = vec![0u8; BATCH];
        }
        let mut out = Vec::new();
        for span in &mut self.spans {
            hash_run(
                self.pid,
                span.start,
                &mut span.hashes,
                &maps,
                &mut self.buf,
                Some(&mut out),
            )?;
        }
        Ok(out)
    }

    fn disarm(&mut self) -> Result<(), DirtyError> {
        self.disarmed = true;
        self.spans = Vec::new();
        self.buf = Vec::new();
        Ok(())
    }
}

/// Re-hashes the pages `[addr, addr + hashes.len() pages)`, updating
/// `hashes`; with `out`, appends the pages whose hash changed from an
/// earlier readable state, or that became readable.
fn hash_run(
    pid: i32,
    addr: u64,
    hashes: &mut [u64],
    maps: &[MapEntry],
    buf: &mut [u8],
    mut out: Option<&mut Vec<DirtyRange>>,
) -> Result<(), DirtyError> {
    let end = addr + hashes.len() as u64 * PAGE;
    let mut update = |page_addr: u64, new: u64, hashes: &mut [u64]| {
        let slot = &mut hashes[((page_addr - addr) / PAGE) as usize];
        let old = *slot;
        *slot = new;
        if let Some(out) = out.as_deref_mut() {
            if new != UNREADABLE && old != UNSEEN && old != new {
                push_range(out, page_addr, page_addr + PAGE);
            }
        }
    };
    let mut cur = addr;
    let readable = maps
        .iter()
        .filter(|m| m.read && m.end > addr && m.start < end)
        .map(|m| (m.start.max(addr), m.end.min(end)));
    for (s, e) in readable.chain(std::iter::once((end, end))) {
        // Unmapped or unreadable gap before this piece.
        while cur < s {
            update(cur, UNREADABLE, hashes);
            cur += PAGE;
        }
        cur = cur.max(s);
        while cur < e {
            let len = ((e - cur) as usize).min(buf.len());
            let got = match ptrace::read_mem(pid, cur, &mut buf[..len]) {
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(libc::EFAULT) => 0,
                Err(source) => {
                    return Err(DirtyError::ReadMem {
                        pid,
                        addr: cur,
                        len: len as u64,
                        source,
                    })
                }
            };
            let full = got / PAGE as usize;
            for (i, page) in buf[..full * PAGE as usize]
                .chunks_exact(PAGE as usize)
                .enumerate()
            {
                update(cur + i as u64 * PAGE, page_hash(page), hashes);
            }
            cur += full as u64 * PAGE;
            if got < len {
                // The read stopped at a page it could not read (unmapped
                // since `maps` was read): skip that page.
                update(cur, UNREADABLE, hashes);
                cur += PAGE;
            }
        }
    }
    Ok(())
}

/// 64-bit hash of one page; always odd (even values are slot markers).
pub(super) fn page_hash(page: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut lanes: [u64; 4] = [
        0x243F_6A88_85A3_08D3,
        0x1319_8A2E_0370_7344,
        0xA409_3822_299F_31D0,
        0x082E_FA98_EC4E_6C89,
    ];
    for chunk in page.chunks_exact(32) {
        for (lane, word) in lanes.iter_mut().zip(chunk.chunks_exact(8)) {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            *lane = (*lane ^ u64::from_le_bytes(w))
                .wrapping_mul(K)
                .rotate_left(29);
        }
    }
    let folded = lanes[0]
        ^ lanes[1].rotate_left(17)
        ^ lanes[2].rotate_left(31)
        ^ lanes[3].rotate_left(47)
        ^ page.len() as u64;
    fmix64(folded) | 1
}

/// MurmurHash3's 64-bit finaliser.
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    k ^= k >> 33;
    k = k.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    k ^ (k >> 33)
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn page_hash_sees_every_single_word_change() {
        let base = vec![0u8; PAGE as usize];
        let h0 = page_hash(&base);
        assert_eq!(h0 & 1, 1);
        let mut seen = std::collections::HashSet::new();
        seen.insert(h0);
        for word in 0..(PAGE as usize / 8) {
            let mut p = base.clone();
            p[word * 8 + (word % 8)] = 1;
            assert!(seen.insert(page_hash(&p)), "collision at word {word}");
        }
    }
}
