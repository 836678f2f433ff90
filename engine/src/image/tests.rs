//! Round trips of every file of an image directory, the typed errors, and a
//! fuzz-style pass over a real image: every truncation, thousands of bit
//! flips and byte overwrites, and payload mutations with a fixed-up checksum,
//! checking that readers return errors and never panic.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use crm_proto::image::{
    fd_entry, Creds, FdEntry, FileId, FilesCore, GpRegs, Inventory, MmCore, PageMapChunk, PageRun,
    PendingSignal, RegularFile, Rseq, TaskCore, ThreadCore, Vma, VmaKind,
};
use crm_proto::IMAGE_FORMAT_VERSION;

use super::framing::{FileKind, RecordWriter, HEADER_LEN, MAX_RECORD_LEN, RECORD_PREFIX_LEN};
use super::*;

const PID: i32 = 42;
const PAGE: usize = PAGE_SIZE as usize;

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "crm-image-test-{}-{}-{name}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// xorshift64: deterministic pseudo-random numbers without a crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn sample_inventory() -> Inventory {
    Inventory {
        format_version: IMAGE_FORMAT_VERSION,
        tool_version: "0.1.0-test".into(),
        kernel_release: "6.8.0".into(),
        created_unix_ms: 1_700_000_000_000,
        root_pid: PID,
        pids: vec![PID, 43],
        shell_job: true,
        page_size: 4096,
        xfeatures: 0x2e7,
        dirty_tracking: String::new(),
        parent_image: String::new(),
    }
}

fn sample_core() -> TaskCore {
    TaskCore {
        pid: PID,
        ppid: 1,
        pgid: PID,
        sid: PID,
        comm: "sleeper".into(),
        umask: 0o022,
        cwd: "/tmp".into(),
        root: "/".into(),
        creds: Some(Creds {
            uids: vec![1000; 4],
            gids: vec![1000; 4],
            groups: vec![4, 27],
            cap_bnd: u64::MAX >> 23,
            ..Default::default()
        }),
        threads: vec![ThreadCore {
            tid: PID,
            comm: "sleeper".into(),
            regs: Some(GpRegs {
                rip: 0x401000,
                rsp: 0x7ffe_0000_1000,
                ..Default::default()
            }),
            xsave: (0..576u32).map(|i| (i * 7) as u8).collect(),
            rseq: Some(Rseq {
                abi_pointer: 0x7f00_0000_0020,
                abi_size: 32,
                signature: 0x5305_3053,
                flags: 0,
            }),
            pending: vec![PendingSignal {
                siginfo: vec![10; 128],
            }],
            ..Default::default()
        }],
        exit_signal: 17,
        ..Default::default()
    }
}

fn sample_mm() -> MmCore {
    MmCore {
        start_code: 0x400000,
        end_code: 0x401000,
        brk: 0x600000,
        auxv: vec![6, 4096, 0, 0],
        exe: Some(FileId {
            path: "/usr/bin/sleeper".into(),
            dev: 0x803,
            ino: 1234,
            size: 8192,
            mtime_ns: 1,
        }),
        vmas: vec![
            Vma {
                start: 0x400000,
                end: 0x403000,
                prot: 5,
                kind: VmaKind::File as i32,
                vm_flags: "rd ex mr mw me".into(),
                ..Default::default()
            },
            Vma {
                start: 0x7ffe_0000_0000,
                end: 0x7ffe_0002_0000,
                prot: 3,
                kind: VmaKind::Stack as i32,
                ..Default::default()
            },
        ],
        ..Default::default()
    }
}

fn sample_files() -> FilesCore {
    FilesCore {
        fds: (0..3)
            .map(|fd| FdEntry {
                fd,
                cloexec: fd == 2,
                kind: Some(fd_entry::Kind::Regular(RegularFile {
                    file: Some(FileId {
                        path: "/dev/null".into(),
                        ..Default::default()
                    }),
                    flags: 2,
                    pos: fd as u64,
                    ghost: None,
                    locks: vec![crm_proto::image::FileLock {
                        kind: crm_proto::image::LockKind::Posix as i32,
                        write: true,
                        start: 10,
                        len: fd as u64,
                    }],
                    dup_of: (fd == 2).then_some(1),
                })),
                shared: if fd == 1 { 7 } else { 0 },
                shared_owner: fd == 1,
            })
            .collect(),
    }
}

/// Distinct contents for each page, a function of its address.
fn page_data(vaddr: u64, pages: usize) -> Vec<u8> {
    (0..pages * PAGE)
        .map(|i| ((vaddr >> 12) as usize + i / PAGE) as u8 ^ (i % PAGE % 251) as u8)
        .collect()
}

/// The sample runs as written: (vaddr, pages). The second continues the first.
const SAMPLE_RUNS: [(u64, usize); 4] = [
    (0x400000, 2),
    (0x402000, 1),
    (0x7ffe_0001_f000, 1),
    (0x1000, 1),
];

/// Writes a complete small image for task `PID`.
fn write_sample_image(path: &Path) -> ImageDir {
    let dir = ImageDir::create(path).unwrap();
    dir.write_core(PID, &sample_core()).unwrap();
    dir.write_mm(PID, &sample_mm()).unwrap();
    dir.write_files(PID, &sample_files()).unwrap();
    let mut w = dir.pages_writer(PID).unwrap();
    for (vaddr, pages) in SAMPLE_RUNS {
        w.add_run(vaddr, &page_data(vaddr, pages)).unwrap();
    }
    w.finish().unwrap();
    dir.write_tree(&crm_proto::image::ProcessTree {
        tasks: vec![crm_proto::image::TreeTask {
            pid: PID,
            ppid: 1,
            pgid: PID,
            sid: PID,
            threads: vec![PID, PID + 1],
            exit_signal: libc::SIGCHLD,
            ..Default::default()
        }],
    })
    .unwrap();
    dir.write_inventory(&sample_inventory()).unwrap();
    dir
}

/// Opens every run and reads it back, as a restore would.
fn read_all_pages(dir: &ImageDir) -> Result<Vec<(PageRun, Vec<u8>)>, ImageError> {
    let reader = dir.pages_reader(PID)?;
    reader
        .runs()
        .iter()
        .map(|run| {
            let mut buf = vec![0u8; run.nr_pages as usize * PAGE];
            reader.read_run_into(run, &mut buf)?;
            Ok((*run, buf))
        })
        .collect()
}

#[test]
fn every_record_kind_round_trips() {
    let tmp = TempDir::new("roundtrip");
    write_sample_image(&tmp.0);
    let dir = ImageDir::open(&tmp.0).unwrap();
    assert_eq!(dir.path(), tmp.0);
    assert_eq!(dir.read_inventory().unwrap(), sample_inventory());
    assert_eq!(dir.read_core(PID).unwrap(), sample_core());
    assert_eq!(dir.read_mm(PID).unwrap(), sample_mm());
    assert_eq!(dir.read_files(PID).unwrap(), sample_files());

    // Empty messages are one empty record, still framed and checked.
    dir.write_files(7, &FilesCore::default()).unwrap();
    assert_eq!(dir.read_files(7).unwrap(), FilesCore::default());

    // No temporary file is left behind.
    let leftovers: Vec<_> = fs::read_dir(&tmp.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // The format version is the build's whatever the caller put in.
    dir.write_inventory(&Inventory {
        format_version: 77,
        ..sample_inventory()
    })
    .unwrap();
    assert_eq!(
        dir.read_inventory().unwrap().format_version,
        IMAGE_FORMAT_VERSION
    );
}

#[test]
fn create_and_open_refusals() {
    let tmp = TempDir::new("refusals");
    let missing = ImageDir::open(&tmp.0).unwrap_err();
    assert!(matches!(missing.kind, ImageErrorKind::Missing), "{missing}");
    assert_eq!(missing.file, tmp.0.join("inventory.img"));

    let dir = write_sample_image(&tmp.0);
    let err = ImageDir::create(&tmp.0).unwrap_err();
    assert!(matches!(err.kind, ImageErrorKind::AlreadyExists), "{err}");

    let err = dir.read_core(99).unwrap_err();
    assert!(matches!(err.kind, ImageErrorKind::Missing), "{err}");
    let err = dir.pages_reader(99).unwrap_err();
    assert!(matches!(err.kind, ImageErrorKind::Missing), "{err}");
    let err = dir.write_core(0, &sample_core()).unwrap_err();
    assert!(matches!(err.kind, ImageErrorKind::Invalid(_)), "{err}");
    let err = dir.read_mm(-5).unwrap_err();
    assert!(matches!(err.kind, ImageErrorKind::Invalid(_)), "{err}");

    // An inventory with another page size.
    dir.write_inventory(&Inventory {
        page_size: 16384,
        ..sample_inventory()
    })
    .unwrap();
    let err = ImageDir::open(&tmp.0).unwrap_err();
    assert!(matches!(err.kind, ImageErrorKind::Invalid(_)), "{err}");
}

#[test]
fn pages_round_trip_with_merged_runs() {
    let tmp = TempDir::new("pages");
    let dir = write_sample_image(&tmp.0);
    let reader = dir.pages_reader(PID).unwrap();
    // Sorted by address; the two runs at 0x400000 merged into one of 3 pages.
    let shape: Vec<(u64, u64)> = reader
        .runs()
        .iter()
        .map(|r| (r.vaddr, r.nr_pages))
        .collect();
    assert_eq!(shape, [(0x1000, 1), (0x400000, 3), (0x7ffe_0001_f000, 1)]);
    assert_eq!(reader.total_pages(), 5);
    for (run, data) in read_all_pages(&dir).unwrap() {
        assert!(
            data == page_data(run.vaddr, run.nr_pages as usize),
            "{run:?}"
        );
        assert_eq!(run.crc32, crc32fast::hash(&data));
    }

    // A writer reports what it wrote, and an empty one makes an empty, valid pair.
    let mut w = dir.pages_writer(7).unwrap();
    assert_eq!(w.pages_written(), 0);
    w.add_run(0x5000, &[]).unwrap();
    w.finish().unwrap();
    let empty = dir.pages_reader(7).unwrap();
    assert!(empty.runs().is_empty());
    assert_eq!(empty.total_pages(), 0);

    // A large write (16 MiB) goes through in one piece and reads back.
    let big = page_data(0x10_0000_0000, 4096);
    let mut w = dir.pages_writer(8).unwrap();
    w.add_run(0x10_0000_0000, &big).unwrap();
    w.add_run(0x10_0100_0000, &big[..PAGE]).unwrap();
    assert_eq!(w.pages_written(), 4097);
    w.finish().unwrap();
    let r = dir.pages_reader(8).unwrap();
    assert_eq!(r.runs().len(), 1);
    let mut buf = vec![0u8; 4097 * PAGE];
    r.read_run_into(&r.runs()[0], &mut buf).unwrap();
    assert!(buf[..big.len()] == big[..] && buf[big.len()..] == big[..PAGE]);
}

#[test]
fn corrupt_page_is_a_checksum_mismatch() {
    let tmp = TempDir::new("crc");
    let dir = write_sample_image(&tmp.0);
    let pages = tmp.0.join("pages-42.img");
    let reader = dir.pages_reader(PID).unwrap();
    let run = reader.runs()[1];
    let offset = PAGE_SIZE + run.page_index * PAGE_SIZE;
    let file = OpenOptions::new().write(true).open(&pages).unwrap();
    file.write_at(&[0xff], offset + 100).unwrap();
    let mut buf = vec![0u8; run.nr_pages as usize * PAGE];
    let err = reader.read_run_into(&run, &mut buf).unwrap_err();
    assert!(
        matches!(err.kind, ImageErrorKind::ChecksumMismatch { offset: o } if o == offset),
        "{err}"
    );
    assert_eq!(err.file, pages);
}

#[test]
fn header_errors_are_typed() {
    let tmp = TempDir::new("headers");
    let dir = write_sample_image(&tmp.0);
    let core = tmp.0.join("core-42.img");

    // Unknown version.
    let bytes = fs::read(&core).unwrap();
    let mut newer = bytes.clone();
    newer[8..12].copy_from_slice(&(IMAGE_FORMAT_VERSION + 1).to_le_bytes());
    fs::write(&core, &newer).unwrap();
    let err = dir.read_core(PID).unwrap_err();
    assert!(
        matches!(err.kind, ImageErrorKind::UnsupportedVersion { found, supported }
            if found == IMAGE_FORMAT_VERSION + 1 && supported == IMAGE_FORMAT_VERSION),
        "{err}"
    );

    // Not an image at all.
    fs::write(&core, b"#!/bin/sh\necho hello\n").unwrap();
    let err = dir.read_core(PID).unwrap_err();
    assert!(matches!(err.kind, ImageErrorKind::BadMagic), "{err}");

    // A core file read as mm.
    fs::write(tmp.0.join("mm-42.img"), &bytes).unwrap();
    let err = dir.read_mm(PID).unwrap_err();
    assert!(
        matches!(
            err.kind,
            ImageErrorKind::WrongKind {
                expected: "mm",
                found: 2
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "image file {}: holds file kind 2 (core) where mm was expected",
            tmp.0.join("mm-42.img").display()
        )
    );

    // A length field over the cap, in a tiny file: refused before allocating.
    let mut huge = bytes[..HEADER_LEN as usize].to_vec();
    huge.extend_from_slice(&u32::MAX.to_le_bytes());
    huge.extend_from_slice(&0u32.to_le_bytes());
    fs::write(&core, &huge).unwrap();
    let err = dir.read_core(PID).unwrap_err();
    assert!(
        matches!(err.kind, ImageErrorKind::RecordTooLarge { offset: 16, len, max }
            if len == u64::from(u32::MAX) && max == MAX_RECORD_LEN),
        "{err}"
    );

    // Two records in a single-message file.
    let mut two = bytes.clone();
    two.extend_from_slice(&bytes[HEADER_LEN as usize..]);
    fs::write(&core, &two).unwrap();
    let err = dir.read_core(PID).unwrap_err();
    assert!(
        matches!(err.kind, ImageErrorKind::TooManyRecords { max: 1 }),
        "{err}"
    );

    // A pages file with another version.
    let pages = tmp.0.join("pages-42.img");
    let file = OpenOptions::new().write(true).open(&pages).unwrap();
    file.write_at(&99u32.to_le_bytes(), 8).unwrap();
    let err = dir.pages_reader(PID).unwrap_err();
    assert!(
        matches!(
            err.kind,
            ImageErrorKind::UnsupportedVersion { found: 99, .. }
        ),
        "{err}"
    );
    assert_eq!(err.file, pages);
}

#[test]
fn error_messages_name_the_file_and_do_not_repeat_the_cause() {
    let tmp = TempDir::new("messages");
    let dir = write_sample_image(&tmp.0);
    let core = tmp.0.join("core-42.img");
    let len = fs::metadata(&core).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&core)
        .unwrap()
        .set_len(len - 3)
        .unwrap();
    let err = dir.read_core(PID).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "image file {}: truncated at byte {}",
            core.display(),
            len - 3
        )
    );
    assert!(std::error::Error::source(&err).is_none());

    // An I/O failure: the OS error is the source, not part of the message.
    let file = tmp.0.join("a-file");
    fs::write(&file, b"x").unwrap();
    let err = ImageDir::create(&file.join("sub")).unwrap_err();
    let source = std::error::Error::source(&err).expect("an io::Error source");
    assert!(source.downcast_ref::<std::io::Error>().is_some());
    assert!(
        !err.to_string().contains(&source.to_string()),
        "{err} repeats {source}"
    );
    assert!(
        err.to_string().ends_with("create directory failed"),
        "{err}"
    );

    // A record that passes its checksum but is not protobuf.
    let payload = [0xffu8; 5];
    let mut bytes = fs::read(&core).unwrap()[..HEADER_LEN as usize].to_vec();
    bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    bytes.extend_from_slice(&payload);
    fs::write(&core, &bytes).unwrap();
    let err = dir.read_core(PID).unwrap_err();
    assert!(
        matches!(err.kind, ImageErrorKind::Decode { offset: 16, .. }),
        "{err}"
    );
    let source = std::error::Error::source(&err).expect("a DecodeError source");
    assert!(source.downcast_ref::<prost::DecodeError>().is_some());
    assert!(!err.to_string().contains(&source.to_string()));
}

#[test]
fn pagemap_missing_a_record_is_refused() {
    let tmp = TempDir::new("pagemap-records");
    let dir = write_sample_image(&tmp.0);
    let runs = dir.pages_reader(PID).unwrap().runs().to_vec();
    // The same runs, one record each, as a longer pagemap would be split.
    let pagemap = tmp.0.join("pagemap-42.img");
    let mut w =
        RecordWriter::create(&pagemap, FileKind::PageMap, super::Durability::Durable).unwrap();
    for (i, run) in runs.iter().enumerate() {
        let last = i + 1 == runs.len();
        w.append(&PageMapChunk {
            runs: vec![*run],
            last,
            total_runs: if last { runs.len() as u64 } else { 0 },
        })
        .unwrap();
    }
    w.commit().unwrap();
    assert_eq!(dir.pages_reader(PID).unwrap().runs(), &runs[..]);
    // Cut after the second record: a whole number of records, but pages unaccounted for.
    let bytes = fs::read(&pagemap).unwrap();
    let mut end = HEADER_LEN as usize;
    for _ in 0..2 {
        let len = u32::from_le_bytes(bytes[end..end + 4].try_into().unwrap()) as usize;
        end += RECORD_PREFIX_LEN as usize + len;
    }
    fs::write(&pagemap, &bytes[..end]).unwrap();
    let err = dir.pages_reader(PID).unwrap_err();
    assert!(matches!(err.kind, ImageErrorKind::Invalid(_)), "{err}");
    assert_eq!(err.file, pagemap);
}

/// One file of the sample image and the reader a restore would use on it.
struct Target {
    name: &'static str,
    read: fn(&ImageDir) -> Result<(), ImageError>,
    /// A record file (as opposed to the pages file).
    records: bool,
}

const TARGETS: [Target; 7] = [
    Target {
        name: "inventory.img",
        read: |d| ImageDir::open(d.path()).map(drop),
        records: true,
    },
    Target {
        name: "tree.img",
        read: |d| {
            d.read_tree()?
                .map(drop)
                .ok_or_else(|| ImageError::new(d.path().join(TREE_FILE), ImageErrorKind::Missing))
        },
        records: true,
    },
    Target {
        name: "core-42.img",
        read: |d| d.read_core(PID).map(drop),
        records: true,
    },
    Target {
        name: "mm-42.img",
        read: |d| d.read_mm(PID).map(drop),
        records: true,
    },
    Target {
        name: "files-42.img",
        read: |d| d.read_files(PID).map(drop),
        records: true,
    },
    Target {
        name: "pagemap-42.img",
        read: |d| read_all_pages(d).map(drop),
        records: true,
    },
    Target {
        name: "pages-42.img",
        read: |d| read_all_pages(d).map(drop),
        records: false,
    },
];

/// Runs the target's reader, turning a panic into a test failure naming `what`.
fn read_without_panic(dir: &ImageDir, target: &Target, what: &str) -> Result<(), ImageError> {
    match catch_unwind(AssertUnwindSafe(|| (target.read)(dir))) {
        Ok(result) => result,
        Err(_) => panic!("reader of {} panicked on {what}", target.name),
    }
}

/// The (payload offset, payload length, checksum offset) of each record of a good record file.
fn record_layout(bytes: &[u8]) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    let mut at = HEADER_LEN as usize;
    while at < bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        out.push((at + 8, len, at + 4));
        at += 8 + len;
    }
    out
}

#[test]
fn fuzz_truncations_flips_and_overwrites_never_panic() {
    let tmp = TempDir::new("fuzz");
    let dir = write_sample_image(&tmp.0);
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let (mut mutations, mut structured_ok) = (0u64, 0u64);

    for target in &TARGETS {
        let path = tmp.0.join(target.name);
        let original = fs::read(&path).unwrap();
        assert!(read_without_panic(&dir, target, "the original").is_ok());
        let file = OpenOptions::new().write(true).open(&path).unwrap();

        // Every truncation, longest first, shrinking the file in place.
        for n in (0..original.len()).rev() {
            file.set_len(n as u64).unwrap();
            let result = read_without_panic(&dir, target, &format!("truncation to {n}"));
            let err = result.expect_err(&format!("{} truncated to {n} was accepted", target.name));
            if target.records && n != HEADER_LEN as usize {
                // Cut inside the header or a record: named as such, at the cut.
                assert!(
                    matches!(err.kind, ImageErrorKind::Truncated { offset } if offset == n as u64),
                    "{} truncated to {n}: {err}",
                    target.name
                );
            }
            mutations += 1;
        }
        fs::write(&path, &original).unwrap();
        let file = OpenOptions::new().write(true).open(&path).unwrap();

        // Single-bit flips, then random byte overwrites, each undone after the read.
        // Every byte of every file is covered by a magic, a check or a CRC32.
        for i in 0..3000 {
            let at = rng.below(original.len());
            let byte = if i < 2000 {
                original[at] ^ (1 << rng.below(8))
            } else {
                rng.next() as u8
            };
            file.write_at(&[byte], at as u64).unwrap();
            let what = format!("byte {at} set to {byte:#04x}");
            let result = read_without_panic(&dir, target, &what);
            if byte == original[at] {
                assert!(result.is_ok(), "{}: {what}: {result:?}", target.name);
            } else {
                assert!(result.is_err(), "{}: {what} was accepted", target.name);
            }
            file.write_at(&original[at..at + 1], at as u64).unwrap();
            mutations += 1;
        }

        // Payload mutations with the checksum fixed up, to reach the decoders
        // and the pagemap checks: any result but a panic is fine.
        if target.records {
            let layout = record_layout(&original);
            for _ in 0..2000 {
                let mut bytes = original.clone();
                let (start, len, crc_at) = layout[rng.below(layout.len())];
                if len == 0 {
                    continue;
                }
                for _ in 0..=rng.below(3) {
                    let at = start + rng.below(len);
                    bytes[at] = if rng.next() & 1 == 0 {
                        bytes[at] ^ (1 << rng.below(8))
                    } else {
                        rng.next() as u8
                    };
                }
                let crc = crc32fast::hash(&bytes[start..start + len]);
                bytes[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
                fs::write(&path, &bytes).unwrap();
                let result = read_without_panic(&dir, target, "a payload mutation");
                if result.is_ok() {
                    structured_ok += 1;
                    if target.name.starts_with("pagemap") {
                        check_runs_invariants(&dir);
                    }
                }
                mutations += 1;
            }
            fs::write(&path, &original).unwrap();
        }
        assert!(read_without_panic(&dir, target, "the restored original").is_ok());
    }
    eprintln!(
        "fuzz: {mutations} mutated reads, {structured_ok} checksum-fixed payload mutations decoded"
    );
}

/// What `PagesReader` promises about `runs()`.
fn check_runs_invariants(dir: &ImageDir) {
    let reader = dir.pages_reader(PID).unwrap();
    let mut prev_end = 0u64;
    for run in reader.runs() {
        assert!(
            run.nr_pages > 0 && run.vaddr & (PAGE_SIZE - 1) == 0,
            "{run:?}"
        );
        assert!(run.vaddr >= prev_end, "{run:?} overlaps");
        prev_end = run.vaddr + run.nr_pages * PAGE_SIZE;
    }
}

#[test]
fn tree_round_trips_and_is_bounded() {
    use crm_proto::image::{ProcessTree, TreeTask};
    use prost::Message;
    let tmp = TempDir::new("tree");
    let dir = ImageDir::create(&tmp.0).unwrap();
    assert!(
        dir.read_tree().unwrap().is_none(),
        "no tree.img: a single task"
    );
    let tree = ProcessTree {
        tasks: vec![
            TreeTask {
                pid: PID,
                ppid: 1,
                pgid: PID,
                sid: PID,
                threads: vec![PID, PID + 1],
                exit_signal: libc::SIGCHLD,
                ..Default::default()
            },
            TreeTask {
                pid: PID + 2,
                ppid: PID,
                pgid: PID,
                sid: PID,
                zombie: true,
                exit_status: 7 << 8,
                ..Default::default()
            },
        ],
    };
    dir.write_tree(&tree).unwrap();
    assert_eq!(dir.read_tree().unwrap(), Some(tree));

    // More tasks than allowed: refused before decoding, naming the field.
    let path = tmp.0.join(TREE_FILE);
    let bomb = [0x0a, 0x00].repeat(MAX_TREE_TASKS as usize + 1);
    let mut w =
        RecordWriter::create(&path, FileKind::Tree, super::framing::Durability::Durable).unwrap();
    w.append(&RawPayload(bomb)).unwrap();
    w.commit().unwrap();
    let err = dir.read_tree().unwrap_err();
    assert!(err.to_string().contains("tasks"), "{err}");
    // A core file is not a tree file.
    let core_path = dir.task_file("core", PID).unwrap();
    dir.write_core(PID, &sample_core()).unwrap();
    fs::copy(&core_path, &path).unwrap();
    assert!(matches!(
        dir.read_tree().unwrap_err().kind,
        ImageErrorKind::WrongKind {
            expected: "tree",
            ..
        }
    ));

    /// A message that encodes as the given raw bytes.
    #[derive(Debug, Default)]
    struct RawPayload(Vec<u8>);
    impl Message for RawPayload {
        fn encode_raw(&self, buf: &mut impl prost::bytes::BufMut) {
            buf.put_slice(&self.0);
        }
        fn merge_field(
            &mut self,
            _: u32,
            _: prost::encoding::WireType,
            _: &mut impl prost::bytes::Buf,
            _: prost::encoding::DecodeContext,
        ) -> Result<(), prost::DecodeError> {
            Ok(())
        }
        fn encoded_len(&self) -> usize {
            self.0.len()
        }
        fn clear(&mut self) {
            self.0.clear();
        }
    }
}
