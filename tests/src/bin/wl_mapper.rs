//! Workload `wl_mapper`: a memory map that keeps changing, for live migration.
//!
//! Usage: `wl_mapper [REGIONS]` (default 16). Keeps REGIONS anonymous private
//! mappings of 64 KiB to 8 MiB, each filled with its own pattern (every 8-byte word
//! derived from the region's seed and the word's offset). Every ~20 ms it changes the
//! map with one of (chosen pseudo-randomly):
//! - replace: munmap a region and mmap a new one of another size and seed;
//! - grow: `mremap(MREMAP_MAYMOVE)` a region to a larger size (it may move) and fill
//!   the new tail;
//! - protect: `mprotect` a region read-only, or a read-only one back to read-write;
//! - rewrite: fill a read-write region with a new seed.
//!
//! So between two pre-copy rounds VMAs appear, grow, move, change protection and
//! vanish.
//!
//! Protocol: `READY pid=N regions=R bytes=B`; on SIGUSR2 checks every word of every
//! live region and that `/proc/self/maps` shows each region with its protection
//! (`r--` or `rw-`), then prints `PASS regions=R bytes=B ops=K replaced=..
//! grown=.. moved=.. protected=.. rewritten=..` or `FAIL ...`.
//! Hook: `CRM_WL_CORRUPT=1` flips one byte of a read-write region first.

use crm_tests::wl;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
const PAGE: usize = 4096;
const MIN_LEN: usize = 64 * KIB;
const MAX_LEN: usize = 8 * MIB;
/// At most this many problems are listed.
const MAX_PROBLEMS: usize = 8;

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn pattern(seed: u64, word: usize) -> u64 {
    splitmix(seed ^ (word as u64).wrapping_mul(0xA24B_AED4_963E_E407))
}

/// xorshift64*: the sequence of operations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// A length in [MIN_LEN, MAX_LEN], whole pages, biased towards small ones.
    fn len(&mut self) -> usize {
        let max_pages = if self.below(4) == 0 {
            MAX_LEN / PAGE
        } else {
            MAX_LEN / PAGE / 8
        };
        let min_pages = MIN_LEN / PAGE;
        (min_pages + self.below((max_pages - min_pages + 1) as u64) as usize) * PAGE
    }
}

/// One live mapping, unmapped by [`Region::unmap`] only.
struct Region {
    addr: *mut u64,
    len: usize,
    seed: u64,
    read_only: bool,
}

impl Region {
    fn map(len: usize, seed: u64) -> Region {
        let addr = wl::map_anon(len);
        let mut r = Region {
            addr: addr.cast(),
            len,
            seed,
            read_only: false,
        };
        r.fill(0);
        r
    }

    fn words(&self) -> &[u64] {
        // SAFETY: `addr` is a live readable mapping of `len` bytes (page aligned)
        // owned by this region; only this thread touches it.
        unsafe { std::slice::from_raw_parts(self.addr, self.len / 8) }
    }

    /// Writes the pattern from word `from` to the end. The region must be writable.
    fn fill(&mut self, from: usize) {
        assert!(!self.read_only, "fill of a read-only region");
        // SAFETY: as in `words`, and the mapping is read-write (checked above);
        // `&mut self` makes this the only live reference.
        let words = unsafe { std::slice::from_raw_parts_mut(self.addr, self.len / 8) };
        for (i, w) in words.iter_mut().enumerate().skip(from) {
            *w = pattern(self.seed, i);
        }
    }

    fn protect(&mut self, read_only: bool) {
        let prot = if read_only {
            libc::PROT_READ
        } else {
            libc::PROT_READ | libc::PROT_WRITE
        };
        // SAFETY: changes the protection of our own mapping, which no reference
        // outlives in a way that writes to it while read-only (fill checks the flag).
        if unsafe { libc::mprotect(self.addr.cast(), self.len, prot) } != 0 {
            wl::fail_setup("mprotect");
        }
        self.read_only = read_only;
    }

    /// Grows to `len` (may move); returns whether it moved.
    fn grow(&mut self, len: usize) -> bool {
        let old_len = self.len;
        // SAFETY: remaps our own mapping; no reference into it is live (the slices of
        // `words`/`fill` do not escape their calls). The result is checked.
        let addr = unsafe { libc::mremap(self.addr.cast(), old_len, len, libc::MREMAP_MAYMOVE) };
        if addr == libc::MAP_FAILED {
            wl::fail_setup(&format!("mremap of {old_len} to {len} bytes"));
        }
        let moved = addr.cast() != self.addr;
        self.addr = addr.cast();
        self.len = len;
        let was_ro = self.read_only;
        if was_ro {
            self.protect(false);
        }
        self.fill(old_len / 8);
        if was_ro {
            self.protect(true);
        }
        moved
    }

    fn unmap(self) {
        // SAFETY: unmaps our own mapping; `self` is consumed, so nothing refers to it
        // afterwards.
        if unsafe { libc::munmap(self.addr.cast(), self.len) } != 0 {
            wl::fail_setup("munmap");
        }
    }

    fn check(&self, problems: &mut Vec<String>) -> bool {
        if let Some((i, &w)) = self
            .words()
            .iter()
            .enumerate()
            .find(|&(i, &w)| w != pattern(self.seed, i))
        {
            problems.push(format!(
                "region {:#x}+{:#x}: word at +{:#x} is {w:#x}, expected {:#x}",
                self.addr as usize,
                self.len,
                i * 8,
                pattern(self.seed, i)
            ));
            return false;
        }
        true
    }
}

/// `(start, end, perms)` of every line of /proc/self/maps.
fn own_maps() -> Vec<(usize, usize, String)> {
    let text = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (a, b) = f.next()?.split_once('-')?;
            let perms = f.next()?.to_string();
            Some((
                usize::from_str_radix(a, 16).ok()?,
                usize::from_str_radix(b, 16).ok()?,
                perms,
            ))
        })
        .collect()
}

#[derive(Default)]
struct Counts {
    ops: u64,
    replaced: u64,
    grown: u64,
    moved: u64,
    protected: u64,
    rewritten: u64,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let nregions: usize = match args.get(1).map(|s| s.parse()) {
        None => 16,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("usage: wl_mapper [REGIONS]");
            std::process::exit(2);
        }
    };
    wl::catch(libc::SIGUSR2);
    let corrupt = wl::corrupt_requested();
    // Never zero (xorshift's fixed point); differs between runs through the PID.
    let mut rng = Rng(0x5EED_0000_0000_0001 ^ ((std::process::id() as u64) << 20));
    let mut regions: Vec<Region> = Vec::new();
    for _ in 0..nregions {
        let len = rng.len();
        regions.push(Region::map(len, rng.next()));
    }
    let bytes: usize = regions.iter().map(|r| r.len).sum();
    wl::ready(&format!("regions={nregions} bytes={bytes}"));
    let mut c = Counts::default();
    loop {
        if wl::take(libc::SIGUSR2) {
            if corrupt {
                if let Some(r) = regions.iter_mut().find(|r| !r.read_only) {
                    // SAFETY: the first word of a live read-write region of ours.
                    unsafe { *r.addr ^= 0x40 };
                } else if let Some(r) = regions.first_mut() {
                    r.protect(false);
                    // SAFETY: the region was just made read-write.
                    unsafe { *r.addr ^= 0x40 };
                }
            }
            let mut problems = Vec::new();
            let mut bad = 0;
            for r in &regions {
                let mut p = Vec::new();
                if !r.check(&mut p) {
                    bad += 1;
                    if problems.len() < MAX_PROBLEMS {
                        problems.append(&mut p);
                    }
                }
            }
            let maps = own_maps();
            for r in &regions {
                let want = if r.read_only { "r--p" } else { "rw-p" };
                let start = r.addr as usize;
                let end = start + r.len;
                // Every VMA overlapping the region must carry its protection (the
                // kernel may merge neighbours with the same flags into one VMA).
                let overlapping: Vec<&(usize, usize, String)> = maps
                    .iter()
                    .filter(|(a, b, _)| *a < end && *b > start)
                    .collect();
                let covered: usize = overlapping
                    .iter()
                    .map(|(a, b, _)| (*b).min(end) - (*a).max(start))
                    .sum();
                let wrong: Vec<String> = overlapping
                    .iter()
                    .filter(|(_, _, p)| p != want)
                    .map(|(a, b, p)| format!("{a:#x}-{b:#x} {p}"))
                    .collect();
                if covered != r.len || !wrong.is_empty() {
                    bad += 1;
                    if problems.len() < MAX_PROBLEMS {
                        problems.push(format!(
                            "region {start:#x}+{:#x} ({want}): maps show {covered:#x} bytes, \
                             wrong protection: {wrong:?}",
                            r.len
                        ));
                    }
                }
            }
            if bad > MAX_PROBLEMS {
                problems.push(format!("{bad} problems in all"));
            }
            let bytes: usize = regions.iter().map(|r| r.len).sum();
            wl::verdict(
                &format!(
                    "regions={} bytes={bytes} ops={} replaced={} grown={} moved={} protected={} \
                     rewritten={}",
                    regions.len(),
                    c.ops,
                    c.replaced,
                    c.grown,
                    c.moved,
                    c.protected,
                    c.rewritten
                ),
                &problems,
            );
        }

        let i = rng.below(regions.len() as u64) as usize;
        match rng.below(8) {
            0..=2 => {
                let new = Region::map(rng.len(), rng.next());
                let old = std::mem::replace(&mut regions[i], new);
                old.unmap();
                c.replaced += 1;
            }
            3 | 4 => {
                let r = &mut regions[i];
                if r.len < MAX_LEN {
                    let extra = rng.below(((MAX_LEN - r.len) / PAGE) as u64) as usize + 1;
                    if r.grow(r.len + extra * PAGE) {
                        c.moved += 1;
                    }
                    c.grown += 1;
                }
            }
            5 | 6 => {
                let r = &mut regions[i];
                let ro = !r.read_only;
                r.protect(ro);
                c.protected += 1;
            }
            _ => {
                let seed = rng.next();
                let r = &mut regions[i];
                if !r.read_only {
                    r.seed = seed;
                    r.fill(0);
                    c.rewritten += 1;
                }
            }
        }
        c.ops += 1;
        wl::sleep_ms(20);
    }
}
