//! Workload `wl_memory`: a large anonymous region, file mappings and a file offset.
//!
//! Usage: `wl_memory DIR [SIZE_MIB]` (default 512 MiB). Sets up:
//! - an anonymous private mapping of SIZE_MIB MiB, every 8-byte word filled with a
//!   value derived from its offset, except every 16th MiB (MiB 15, 31, ...) which is
//!   never written: a hole that must still read as zero;
//! - `DIR/private.dat` (32 pages) mapped `MAP_PRIVATE`, pages 1, 5, 9, ... changed in
//!   memory only: they must show the change while the file on disk does not; the
//!   other pages are never written (clean file pages: they must read as the file);
//! - `DIR/shared.dat` (32 pages) mapped `MAP_SHARED`, pages 2, 6, 10, ... changed: the
//!   file on disk must show it;
//!   (both files are closed after mmap; the mappings alone keep them);
//! - `DIR/wronly.dat` opened `O_WRONLY` with its offset at 5000.
//!
//! Protocol: `READY pid=N size_mib=S anon=0xADDR holes=H`; on SIGUSR2 checks all of the
//! above and then that the mappings still behave as such: a new value written to the
//! last page of the shared mapping reaches the file, one written to the private
//! mapping does not, and a 16-byte record written to the O_WRONLY fd lands at the
//! expected offset (checked with pread on a fresh fd). Prints `PASS ...` (with how many
//! hole pages were resident, for information) or `FAIL ...`.
//! Hook: `CRM_WL_CORRUPT=1` flips one byte in MiB 3 of the anonymous region first.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crm_tests::wl;

const MIB: usize = 1 << 20;
const PAGE: usize = 4096;
const FILE_PAGES: usize = 32;
/// The page of each file mapping used for the write-through probe.
const PROBE: usize = FILE_PAGES - 1;
const WRONLY_START: u64 = 5000;
const REC_LEN: u64 = 16;

fn anon_word(off: usize) -> u64 {
    ((off / 8) as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn is_hole(mib: usize) -> bool {
    mib % 16 == 15
}

fn file_byte(page: usize, i: usize) -> u8 {
    (page
        .wrapping_mul(31)
        .wrapping_add(i.wrapping_mul(7))
        .wrapping_add(0x11)) as u8
}

fn file_page(page: usize) -> Vec<u8> {
    (0..PAGE).map(|i| file_byte(page, i)).collect()
}

fn modified_page(page: usize) -> Vec<u8> {
    (0..PAGE).map(|i| !file_byte(page, i)).collect()
}

/// A mapping that lives as long as the process (never unmapped).
struct Map {
    addr: *mut u8,
    len: usize,
}

impl Map {
    fn new(len: usize, prot: i32, flags: i32, fd: i32) -> Map {
        // SAFETY: a fresh mapping at an address the kernel chooses; it overlaps nothing
        // we own. The result is checked against MAP_FAILED.
        let addr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, 0) };
        if addr == libc::MAP_FAILED {
            wl::fail_setup(&format!("mmap of {len} bytes"));
        }
        Map {
            addr: addr.cast(),
            len,
        }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `addr..addr+len` is a readable mapping that is never unmapped; the
        // process is single-threaded, so no one writes it during the borrow.
        unsafe { std::slice::from_raw_parts(self.addr, self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and the mapping is writable; `&mut self` makes the
        // borrow exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.addr, self.len) }
    }

    fn words(&self, off: usize, len: usize) -> &[u64] {
        assert!(off.is_multiple_of(8) && off + len <= self.len);
        // SAFETY: in bounds (asserted), 8-aligned because mappings are page-aligned and
        // `off` is a multiple of 8; readable for the life of the process.
        unsafe { std::slice::from_raw_parts(self.addr.add(off).cast(), len / 8) }
    }

    fn words_mut(&mut self, off: usize, len: usize) -> &mut [u64] {
        assert!(off.is_multiple_of(8) && off + len <= self.len);
        // SAFETY: as in `words`, writable, and exclusive through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.addr.add(off).cast(), len / 8) }
    }

    /// How many pages of `off..off+len` are resident (mincore).
    fn resident_pages(&self, off: usize, len: usize) -> usize {
        let mut vec = vec![0u8; len.div_ceil(PAGE)];
        // SAFETY: `addr+off` is page-aligned and inside our mapping; `vec` has one byte
        // per page of the range, as mincore requires.
        let rc = unsafe { libc::mincore(self.addr.add(off).cast(), len, vec.as_mut_ptr()) };
        if rc != 0 {
            return usize::MAX;
        }
        vec.iter().filter(|b| *b & 1 != 0).count()
    }
}

/// What a file mapping of ours must contain: pages where `modified(p)` hold the
/// complement of the file pattern, the probe page starts with `probe` (u64 LE).
fn expected_mapping(modified: fn(usize) -> bool, probe: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(FILE_PAGES * PAGE);
    for p in 0..FILE_PAGES {
        v.extend(if modified(p) {
            modified_page(p)
        } else {
            file_page(p)
        });
    }
    v[PROBE * PAGE..PROBE * PAGE + 8].copy_from_slice(&probe.to_le_bytes());
    v
}

fn private_modified(p: usize) -> bool {
    p % 4 == 1 && p != PROBE
}

fn shared_modified(p: usize) -> bool {
    p % 4 == 2 && p != PROBE
}

fn original_file() -> Vec<u8> {
    (0..FILE_PAGES).flat_map(file_page).collect()
}

/// First difference between two equal-length buffers, for messages.
fn first_diff(got: &[u8], want: &[u8]) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("length {} != {}", got.len(), want.len()));
    }
    let i = got.iter().zip(want).position(|(a, b)| a != b)?;
    let n = got.iter().zip(want).filter(|(a, b)| a != b).count();
    Some(format!(
        "{n} bytes differ, first at offset {i:#x} (page {}): {:#04x} != {:#04x}",
        i / PAGE,
        got[i],
        want[i]
    ))
}

fn read_file(path: &Path) -> std::io::Result<Vec<u8>> {
    let f = File::open(path)?;
    let mut buf = vec![0u8; FILE_PAGES * PAGE];
    f.read_exact_at(&mut buf, 0)?;
    Ok(buf)
}

struct State {
    size: usize,
    anon: Map,
    private: Map,
    shared: Map,
    private_path: PathBuf,
    shared_path: PathBuf,
    wronly: File,
    wronly_path: PathBuf,
    /// Value of the probe word in both file mappings.
    gen: u64,
    /// Records written to the O_WRONLY file so far.
    records: u64,
}

fn map_file(path: &Path, shared: bool) -> Map {
    std::fs::write(path, original_file())
        .unwrap_or_else(|_| wl::fail_setup(&format!("writing {}", path.display())));
    let file = OpenOptions::new()
        .read(true)
        .write(shared)
        .open(path)
        .unwrap_or_else(|_| wl::fail_setup(&format!("opening {}", path.display())));
    let flags = if shared {
        libc::MAP_SHARED
    } else {
        libc::MAP_PRIVATE
    };
    // The file is closed when `file` drops: only the mapping refers to it afterwards.
    Map::new(
        FILE_PAGES * PAGE,
        libc::PROT_READ | libc::PROT_WRITE,
        flags,
        file.as_raw_fd(),
    )
}

fn setup(dir: &Path, size_mib: usize) -> State {
    let size = size_mib * MIB;
    let mut anon = Map::new(
        size,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        -1,
    );
    for mib in (0..size_mib).filter(|m| !is_hole(*m)) {
        let base = mib * MIB;
        for (i, w) in anon.words_mut(base, MIB).iter_mut().enumerate() {
            *w = anon_word(base + i * 8);
        }
    }
    let private_path = dir.join("private.dat");
    let shared_path = dir.join("shared.dat");
    let mut private = map_file(&private_path, false);
    let mut shared = map_file(&shared_path, true);
    let gen = 1;
    // Write only the modified pages and the probe: the other pages of the private
    // mapping stay clean file pages, which the restore must map from the file.
    for (map, modified) in [
        (&mut private, private_modified as fn(usize) -> bool),
        (&mut shared, shared_modified),
    ] {
        let want = expected_mapping(modified, gen);
        for p in (0..FILE_PAGES).filter(|p| modified(*p) || *p == PROBE) {
            let range = p * PAGE..(p + 1) * PAGE;
            map.bytes_mut()[range.clone()].copy_from_slice(&want[range]);
        }
    }
    let wronly_path = dir.join("wronly.dat");
    let mut wronly = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&wronly_path)
        .unwrap_or_else(|_| wl::fail_setup("opening wronly.dat"));
    wronly
        .seek(SeekFrom::Start(WRONLY_START))
        .unwrap_or_else(|_| wl::fail_setup("lseek on wronly.dat"));
    State {
        size,
        anon,
        private,
        shared,
        private_path,
        shared_path,
        wronly,
        wronly_path,
        gen,
        records: 0,
    }
}

fn check_anon(st: &State, problems: &mut Vec<String>) -> (usize, usize) {
    let (mut holes, mut resident) = (0, 0);
    let mut bad_mibs = 0;
    for mib in 0..st.size / MIB {
        let base = mib * MIB;
        if is_hole(mib) {
            holes += 1;
            resident += st.anon.resident_pages(base, MIB);
        }
        let words = st.anon.words(base, MIB);
        let bad = if is_hole(mib) {
            words.iter().position(|w| *w != 0).map(|i| (i, 0))
        } else {
            words
                .iter()
                .enumerate()
                .position(|(i, w)| *w != anon_word(base + i * 8))
                .map(|i| (i, anon_word(base + i * 8)))
        };
        if let Some((i, want)) = bad {
            bad_mibs += 1;
            if bad_mibs <= 3 {
                problems.push(format!(
                    "anon {} at offset {:#x} (addr {:#x}): word {:#018x} != {want:#018x}",
                    if is_hole(mib) { "hole" } else { "data" },
                    base + i * 8,
                    st.anon.addr as usize + base + i * 8,
                    words[i]
                ));
            }
        }
    }
    if bad_mibs > 3 {
        problems.push(format!("anon: {bad_mibs} MiB differ in all"));
    }
    (holes, resident)
}

fn check_files(st: &mut State, problems: &mut Vec<String>) {
    let want_private = expected_mapping(private_modified, st.gen);
    if let Some(d) = first_diff(st.private.bytes(), &want_private) {
        problems.push(format!("private mapping of private.dat: {d}"));
    }
    let want_shared = expected_mapping(shared_modified, st.gen);
    if let Some(d) = first_diff(st.shared.bytes(), &want_shared) {
        problems.push(format!("shared mapping of shared.dat: {d}"));
    }
    match read_file(&st.private_path) {
        Ok(disk) => {
            if let Some(d) = first_diff(&disk, &original_file()) {
                problems.push(format!("private.dat on disk changed: {d}"));
            }
        }
        Err(e) => problems.push(format!("reading private.dat: {e}")),
    }
    match read_file(&st.shared_path) {
        Ok(disk) => {
            if let Some(d) = first_diff(&disk, &want_shared) {
                problems.push(format!(
                    "shared.dat on disk lacks the mapping's changes: {d}"
                ));
            }
        }
        Err(e) => problems.push(format!("reading shared.dat: {e}")),
    }
    // The mappings must still be what they were: write a new probe value to both.
    st.gen += 1;
    let probe = PROBE * PAGE..PROBE * PAGE + 8;
    st.private.bytes_mut()[probe.clone()].copy_from_slice(&st.gen.to_le_bytes());
    st.shared.bytes_mut()[probe.clone()].copy_from_slice(&st.gen.to_le_bytes());
    let mut word = [0u8; 8];
    match File::open(&st.shared_path).and_then(|f| f.read_exact_at(&mut word, probe.start as u64)) {
        Ok(()) if u64::from_le_bytes(word) == st.gen => {}
        Ok(()) => problems.push(format!(
            "write to the shared mapping did not reach shared.dat (file has {:#x}, wrote {:#x}): not MAP_SHARED any more",
            u64::from_le_bytes(word),
            st.gen
        )),
        Err(e) => problems.push(format!("reading shared.dat: {e}")),
    }
    match File::open(&st.private_path).and_then(|f| f.read_exact_at(&mut word, probe.start as u64))
    {
        Ok(()) if word[..] == file_page(PROBE)[..8] => {}
        Ok(()) => problems.push(
            "write to the private mapping reached private.dat: not MAP_PRIVATE any more".into(),
        ),
        Err(e) => problems.push(format!("reading private.dat: {e}")),
    }
}

fn check_wronly(st: &mut State, problems: &mut Vec<String>) -> u64 {
    let want = WRONLY_START + REC_LEN * st.records;
    let fd = st.wronly.as_raw_fd();
    // SAFETY: F_GETFL on an fd we own; no pointers involved.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 || flags & libc::O_ACCMODE != libc::O_WRONLY {
        problems.push(format!(
            "wronly.dat fd {fd}: flags {flags:#o} are not O_WRONLY"
        ));
    }
    match st.wronly.stream_position() {
        Ok(pos) if pos == want => {}
        Ok(pos) => problems.push(format!("wronly.dat fd {fd}: offset {pos}, expected {want}")),
        Err(e) => problems.push(format!("wronly.dat fd {fd}: lseek: {e}")),
    }
    st.records += 1;
    let rec = format!("REC{:012}\n", st.records);
    if let Err(e) = st.wronly.write_all(rec.as_bytes()) {
        problems.push(format!("write to wronly.dat fd {fd}: {e}"));
        return want;
    }
    let mut got = vec![0u8; REC_LEN as usize];
    match File::open(&st.wronly_path).and_then(|f| f.read_exact_at(&mut got, want)) {
        Ok(()) if got == rec.as_bytes() => {}
        Ok(()) => problems.push(format!(
            "record written via fd {fd} not at offset {want} of wronly.dat (found {:?})",
            String::from_utf8_lossy(&got)
        )),
        Err(e) => problems.push(format!("pread of wronly.dat at {want}: {e}")),
    }
    want
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(dir) = args.get(1) else {
        eprintln!("usage: wl_memory DIR [SIZE_MIB]");
        std::process::exit(2);
    };
    let size_mib: usize = match args.get(2).map(|s| s.parse()) {
        None => 512,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("wl_memory: SIZE_MIB must be a positive integer");
            std::process::exit(2);
        }
    };
    wl::catch(libc::SIGUSR2);
    let corrupt = wl::corrupt_requested();
    let mut st = setup(Path::new(dir), size_mib);
    let holes = (0..size_mib).filter(|m| is_hole(*m)).count();
    wl::ready(&format!(
        "size_mib={size_mib} anon={:#x} holes={holes}",
        st.anon.addr as usize
    ));
    loop {
        if wl::take(libc::SIGUSR2) {
            if corrupt && st.size > 4 * MIB {
                st.anon.bytes_mut()[3 * MIB + 123] ^= 0x40;
            }
            let mut problems = Vec::new();
            let (holes, resident) = check_anon(&st, &mut problems);
            check_files(&mut st, &mut problems);
            let offset = check_wronly(&mut st, &mut problems);
            wl::verdict(
                &format!(
                    "anon {} MiB pattern ok, {holes} untouched MiB read zero ({resident} of their pages were resident); \
                     private map: modified pages kept, private.dat unchanged; \
                     shared map: modified pages in shared.dat, write-through ok (gen {}); \
                     O_WRONLY fd offset {offset}, write landed there",
                    st.size / MIB,
                    st.gen
                ),
                &problems,
            );
        }
        wl::sleep_ms(10);
    }
}
