//! Workload `wl_dirtier`: memory rewritten at a steady rate, for live migration.
//!
//! Usage: `wl_dirtier SIZE_MIB RATE_MIBPS`. Sets up an anonymous private mapping of
//! SIZE_MIB MiB, every 4 KiB page laid out as 512 words: `[index, generation,
//! checksum, body...]`, the body derived from (index, generation) and the checksum a
//! hash of the body. A second, separate mapping (the shadow) holds one word per page:
//! the generation last written to it. The main loop runs every ~1 ms
//! (`CLOCK_MONOTONIC`) and rewrites pages round-robin so that RATE_MIBPS MiB/s of
//! pages are rewritten (0: none), each with its generation bumped, then its shadow
//! entry. The loop records the longest gap between two iterations: across a
//! migration within one host (which keeps the monotonic clock) that is the downtime
//! the workload itself saw.
//!
//! Protocol: `READY pid=N size_mib=S rate_mibps=R pages=P addr=0xADDR`; on SIGUSR2
//! checks every page: index word, checksum of the body, generation equal to its
//! shadow entry (an older or newer page than its shadow means memory of two different
//! pre-copy rounds was mixed up), and the round-robin invariant (pages before the
//! cursor are one generation ahead of those after it). Prints
//! `PASS pages=N rewritten=M max_gap_ms=G` or `FAIL <problems> max_gap_ms=G`. The time
//! spent verifying is not counted as a gap.
//! Hook: `CRM_WL_CORRUPT=1` flips one body byte of the middle page first.

use std::time::Duration;

use crm_tests::wl;

const MIB: usize = 1 << 20;
const PAGE: usize = 4096;
const WORDS: usize = PAGE / 8;
/// Words before the body: index, generation, checksum.
const HEAD: usize = 3;
/// Length of one pacing slice.
const SLICE: Duration = Duration::from_millis(1);
/// How far the writer may fall behind its schedule before it stops catching up (a
/// long pause, e.g. the migration's downtime, must not turn into a burst).
const MAX_LAG_NS: u128 = 20_000_000;
/// At most this many problems are listed.
const MAX_PROBLEMS: usize = 8;

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Body word `j` of page `index` at generation `gen`.
fn body_word(index: u64, gen: u64, j: usize) -> u64 {
    splitmix(index.wrapping_mul(0x1_0000_0001) ^ gen.rotate_left(40) ^ j as u64)
}

fn checksum(body: &[u64]) -> u64 {
    body.iter().fold(0xCBF2_9CE4_8422_2325u64, |h, &w| {
        (h ^ w).wrapping_mul(0x0000_0100_0000_01B3).rotate_left(7)
    })
}

/// A mapping that lives as long as the process.
struct Map {
    addr: *mut u64,
    words: usize,
}

impl Map {
    fn new(len: usize) -> Map {
        let addr = wl::map_anon(len);
        Map {
            addr: addr.cast(),
            words: len / 8,
        }
    }

    fn words(&self) -> &[u64] {
        // SAFETY: `addr` is a live read-write mapping of `words` u64s (page aligned),
        // never unmapped; only this thread touches it.
        unsafe { std::slice::from_raw_parts(self.addr, self.words) }
    }

    fn words_mut(&mut self) -> &mut [u64] {
        // SAFETY: as in `words`; `&mut self` makes this the only live reference.
        unsafe { std::slice::from_raw_parts_mut(self.addr, self.words) }
    }
}

struct State {
    pages: Map,
    shadow: Map,
    n: usize,
    /// Next page to rewrite.
    cursor: usize,
    /// Completed passes over all pages.
    passes: u64,
    /// Total page rewrites since setup.
    rewritten: u64,
}

impl State {
    fn write_page(&mut self, i: usize, gen: u64) {
        let page = &mut self.pages.words_mut()[i * WORDS..(i + 1) * WORDS];
        page[0] = i as u64;
        page[1] = gen;
        for (j, w) in page[HEAD..].iter_mut().enumerate() {
            *w = body_word(i as u64, gen, j);
        }
        page[2] = checksum(&page[HEAD..]);
        self.shadow.words_mut()[i] = gen;
    }

    /// Rewrites the page under the cursor with the next generation.
    fn rewrite_next(&mut self) {
        let i = self.cursor;
        self.write_page(i, self.passes + 1);
        self.rewritten += 1;
        self.cursor += 1;
        if self.cursor == self.n {
            self.cursor = 0;
            self.passes += 1;
        }
    }

    fn verify(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut count = 0usize;
        let mut note = |p: String, problems: &mut Vec<String>| {
            count += 1;
            if problems.len() < MAX_PROBLEMS {
                problems.push(p);
            }
        };
        let words = self.pages.words();
        let shadow = self.shadow.words();
        for i in 0..self.n {
            let page = &words[i * WORDS..(i + 1) * WORDS];
            let (index, gen, sum) = (page[0], page[1], page[2]);
            if index != i as u64 {
                note(format!("page {i}: index word {index}"), &mut problems);
                continue;
            }
            let got = checksum(&page[HEAD..]);
            if got != sum {
                note(
                    format!("page {i} (gen {gen}): checksum {got:#x} != stored {sum:#x}"),
                    &mut problems,
                );
                continue;
            }
            let want = if i < self.cursor {
                self.passes + 1
            } else {
                self.passes
            };
            if gen != shadow[i] {
                let age = if gen < shadow[i] { "older" } else { "newer" };
                note(
                    format!(
                        "page {i}: generation {gen} is {age} than its shadow {}",
                        shadow[i]
                    ),
                    &mut problems,
                );
            } else if gen != want {
                note(
                    format!(
                        "page {i}: generation {gen}, expected {want} (cursor {} pass {})",
                        self.cursor, self.passes
                    ),
                    &mut problems,
                );
            }
        }
        if count > problems.len() {
            problems.push(format!("{count} bad pages in all"));
        }
        problems
    }
}

fn now() -> libc::timespec {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into a live local.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts
}

fn ns_between(a: &libc::timespec, b: &libc::timespec) -> u128 {
    let a = a.tv_sec as i128 * 1_000_000_000 + a.tv_nsec as i128;
    let b = b.tv_sec as i128 * 1_000_000_000 + b.tv_nsec as i128;
    (b - a).max(0) as u128
}

fn parse_arg(args: &[String], i: usize, what: &str) -> u64 {
    match args.get(i).map(|s| s.parse::<u64>()) {
        Some(Ok(n)) => n,
        _ => {
            eprintln!("usage: wl_dirtier SIZE_MIB RATE_MIBPS ({what} missing or not a number)");
            std::process::exit(2);
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let size_mib = parse_arg(&args, 1, "SIZE_MIB") as usize;
    let rate_mibps = parse_arg(&args, 2, "RATE_MIBPS");
    if size_mib == 0 {
        eprintln!("wl_dirtier: SIZE_MIB must be positive");
        std::process::exit(2);
    }
    wl::catch(libc::SIGUSR2);
    let corrupt = wl::corrupt_requested();
    let n = size_mib * MIB / PAGE;
    let mut st = State {
        pages: Map::new(size_mib * MIB),
        shadow: Map::new((n * 8).div_ceil(PAGE) * PAGE),
        n,
        cursor: 0,
        passes: 0,
        rewritten: 0,
    };
    for i in 0..n {
        st.write_page(i, 0);
    }
    wl::ready(&format!(
        "size_mib={size_mib} rate_mibps={rate_mibps} pages={n} addr={:#x}",
        st.pages.addr as usize
    ));

    // Pages per second, and the schedule: `due` pages should have been rewritten
    // `ns` nanoseconds after `origin`.
    let pages_per_sec = rate_mibps as u128 * MIB as u128 / PAGE as u128;
    let mut origin = now();
    let mut done_since_origin: u128 = 0;
    let mut last = now();
    let mut max_gap_ns: u128 = 0;
    loop {
        let t = now();
        max_gap_ns = max_gap_ns.max(ns_between(&last, &t));
        last = t;

        if wl::take(libc::SIGUSR2) {
            if corrupt {
                let mid = (n / 2) * WORDS + HEAD + 17;
                st.pages.words_mut()[mid] ^= 0x40;
            }
            let problems = st.verify();
            let gap_ms = max_gap_ns as f64 / 1e6;
            if problems.is_empty() {
                wl::say(&format!(
                    "PASS pages={n} rewritten={} max_gap_ms={gap_ms:.1}",
                    st.rewritten
                ));
            } else {
                wl::say(&format!(
                    "FAIL {} max_gap_ms={gap_ms:.1}",
                    problems.join("; ")
                ));
            }
            // Verifying is not downtime: restart the gap clock after it.
            last = now();
        }

        if pages_per_sec > 0 {
            let elapsed = ns_between(&origin, &now());
            let due = elapsed * pages_per_sec / 1_000_000_000;
            if due > done_since_origin + pages_per_sec * MAX_LAG_NS / 1_000_000_000 {
                // Far behind (a pause): start a new schedule instead of a burst.
                origin = now();
                done_since_origin = 0;
            } else {
                while done_since_origin < due {
                    st.rewrite_next();
                    done_since_origin += 1;
                }
            }
        }
        std::thread::sleep(SLICE);
    }
}
