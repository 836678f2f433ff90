//! The record file format shared by every `.img` file except the pages file.
//!
//! ```text
//! offset  size  field
//! 0       8     magic  b"CRMIMG\0\0"
//! 8       4     format version, u32 little endian (crm_proto::IMAGE_FORMAT_VERSION)
//! 12      4     file kind, u32 little endian (inventory=1, core=2, mm=3, files=4, pagemap=5,
//!               tree=6, ipc=7)
//! 16      ...   records, back to back:
//!                 4  payload length, u32 little endian (at most the kind's limit)
//!                 4  CRC32 (IEEE, as crc32fast) of the payload, u32 little endian
//!                 n  payload: one protobuf message of the file kind's type
//! ```
//!
//! Inventory, core, mm, files and tree hold exactly one record; a pagemap holds up
//! to [`MAX_PAGEMAP_RECORDS`] `PageMapChunk` records. The file ends exactly
//! at a record boundary; anything else is [`ImageErrorKind::Truncated`].
//!
//! Reading trusts nothing in the file: a record's length is checked against
//! the kind's limit ([`MAX_RECORD_LEN`], [`MAX_PAGEMAP_RECORD_LEN`] for a
//! pagemap) and against the bytes left in the file, and the record
//! count against the kind's limit, before any buffer is allocated; the
//! checksum is verified before the payload is decoded.
//!
//! Writing is atomic: the file is written as `NAME.tmp`, fsynced, renamed to
//! `NAME`, and the directory is fsynced. A writer dropped before it commits
//! removes its temporary file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crm_proto::IMAGE_FORMAT_VERSION;
use prost::Message;

use super::error::{ImageError, ImageErrorKind};

/// First 8 bytes of every record file.
pub const MAGIC: [u8; 8] = *b"CRMIMG\0\0";
/// Magic, version and kind.
pub const HEADER_LEN: u64 = 16;
/// Length and CRC32 in front of each record's payload.
pub const RECORD_PREFIX_LEN: u64 = 8;
/// Largest record payload accepted or written (64 MiB).
pub const MAX_RECORD_LEN: u64 = 64 << 20;
/// Largest pagemap record payload accepted or written (1 MiB: a written record of
/// 4096 runs takes at most about 170 KiB). Kept small because decoding expands
/// the smallest encoded runs about sixteen-fold in memory.
pub const MAX_PAGEMAP_RECORD_LEN: u64 = 1 << 20;
/// Largest number of records in a pagemap file.
pub const MAX_PAGEMAP_RECORDS: u64 = 1 << 16;
/// Largest tree record payload (4 MiB: thousands of tasks with their TIDs).
pub const MAX_TREE_RECORD_LEN: u64 = 4 << 20;

/// What a record file holds; the code is stored in its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// `inventory.img`: one `Inventory`.
    Inventory = 1,
    /// `core-PID.img`: one `TaskCore`.
    Core = 2,
    /// `mm-PID.img`: one `MmCore`.
    Mm = 3,
    /// `files-PID.img`: one `FilesCore`.
    Files = 4,
    /// `pagemap-PID.img`: `PageMapChunk` records indexing `pages-PID.img`.
    PageMap = 5,
    /// `tree.img`: one `ProcessTree`.
    Tree = 6,
    /// `ipc.img`: one `IpcCore`.
    Ipc = 7,
}

impl FileKind {
    const ALL: [FileKind; 7] = [
        FileKind::Inventory,
        FileKind::Core,
        FileKind::Mm,
        FileKind::Files,
        FileKind::PageMap,
        FileKind::Tree,
        FileKind::Ipc,
    ];

    /// The code stored in the file header.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// The kind's name, as in its file names.
    pub fn name(self) -> &'static str {
        match self {
            FileKind::Inventory => "inventory",
            FileKind::Core => "core",
            FileKind::Mm => "mm",
            FileKind::Files => "files",
            FileKind::PageMap => "pagemap",
            FileKind::Tree => "tree",
            FileKind::Ipc => "ipc",
        }
    }

    /// The name of the kind with header code `code`, or `"unknown"`.
    pub fn name_of(code: u32) -> &'static str {
        Self::ALL
            .iter()
            .find(|k| k.code() == code)
            .map_or("unknown", |k| k.name())
    }

    /// The largest record payload of this kind.
    pub fn max_record_len(self) -> u64 {
        match self {
            FileKind::PageMap => MAX_PAGEMAP_RECORD_LEN,
            FileKind::Tree => MAX_TREE_RECORD_LEN,
            _ => MAX_RECORD_LEN,
        }
    }

    /// How many records a file of this kind may hold.
    pub fn max_records(self) -> u64 {
        match self {
            FileKind::PageMap => MAX_PAGEMAP_RECORDS,
            _ => 1,
        }
    }
}

/// `NAME.tmp` next to `path`.
fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Makes a rename inside `dir` durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir)?.sync_all()
}

/// A file written under `NAME.tmp` and renamed to `NAME` by [`AtomicFile::commit`].
/// Dropping it uncommitted removes the temporary file.
#[derive(Debug)]
pub(crate) struct AtomicFile {
    path: PathBuf,
    tmp: PathBuf,
    out: Option<BufWriter<File>>,
    committed: bool,
    /// fsync on commit (see [`Durability`]).
    durable: bool,
}

/// Whether committed files are fsynced. A checkpoint must survive a crash;
/// the image a live migration assembles on the destination only lives until
/// the restore a few milliseconds later (inside the downtime), and a crash
/// of the host before that loses the migration, not the process (the source
/// still has it), so it skips the fsyncs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// fsync every file and the directory on commit.
    Durable,
    /// Write, rename, no fsync.
    Scratch,
}

impl AtomicFile {
    /// Creates (or truncates) `path.tmp`. Writes of at least `buf_capacity`
    /// bytes go straight to the file; smaller ones are gathered first.
    pub(crate) fn create(
        path: &Path,
        buf_capacity: usize,
        durability: Durability,
    ) -> Result<Self, ImageError> {
        let tmp = tmp_path(path);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| ImageError::io(path, "create temporary file", e))?;
        Ok(AtomicFile {
            path: path.to_owned(),
            tmp,
            out: Some(BufWriter::with_capacity(buf_capacity, file)),
            committed: false,
            durable: durability == Durability::Durable,
        })
    }

    /// The final name of the file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn write_all(&mut self, data: &[u8]) -> Result<(), ImageError> {
        match self.out.as_mut() {
            Some(out) => out
                .write_all(data)
                .map_err(|e| ImageError::io(&self.path, "write", e)),
            None => Err(ImageError::invalid(&self.path, "write after commit")),
        }
    }

    /// Flushes, fsyncs, renames into place and fsyncs the directory (the
    /// fsyncs only when durable).
    pub(crate) fn commit(mut self) -> Result<(), ImageError> {
        let Some(out) = self.out.take() else {
            return Err(ImageError::invalid(&self.path, "committed twice"));
        };
        let file = out
            .into_inner()
            .map_err(|e| ImageError::io(&self.path, "write", e.into_error()))?;
        if self.durable {
            file.sync_all()
                .map_err(|e| ImageError::io(&self.path, "fsync", e))?;
        }
        drop(file);
        fs::rename(&self.tmp, &self.path)
            .map_err(|e| ImageError::io(&self.path, "rename into place", e))?;
        self.committed = true;
        if !self.durable {
            return Ok(());
        }
        sync_dir(self.path.parent().unwrap_or(Path::new(".")))
            .map_err(|e| ImageError::io(&self.path, "fsync of the directory", e))
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: the file may never have been created.
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Writes a record file: header at creation, one record per [`RecordWriter::append`].
#[derive(Debug)]
pub(crate) struct RecordWriter {
    out: AtomicFile,
    kind: FileKind,
    /// Where the next record starts.
    offset: u64,
}

impl RecordWriter {
    pub(crate) fn create(
        path: &Path,
        kind: FileKind,
        durability: Durability,
    ) -> Result<Self, ImageError> {
        let mut out = AtomicFile::create(path, 64 << 10, durability)?;
        let mut header = [0u8; HEADER_LEN as usize];
        header[..8].copy_from_slice(&MAGIC);
        header[8..12].copy_from_slice(&IMAGE_FORMAT_VERSION.to_le_bytes());
        header[12..16].copy_from_slice(&kind.code().to_le_bytes());
        out.write_all(&header)?;
        Ok(RecordWriter {
            out,
            kind,
            offset: HEADER_LEN,
        })
    }

    /// Appends `msg` as one record. A message over the kind's record limit is refused
    /// (the reader would refuse it too).
    pub(crate) fn append<M: Message>(&mut self, msg: &M) -> Result<(), ImageError> {
        let payload = msg.encode_to_vec();
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|&len| u64::from(len) <= self.kind.max_record_len())
            .ok_or_else(|| {
                ImageError::new(
                    self.out.path(),
                    ImageErrorKind::RecordTooLarge {
                        offset: self.offset,
                        len: payload.len() as u64,
                        max: self.kind.max_record_len(),
                    },
                )
            })?;
        let mut prefix = [0u8; RECORD_PREFIX_LEN as usize];
        prefix[..4].copy_from_slice(&len.to_le_bytes());
        prefix[4..].copy_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        self.out.write_all(&prefix)?;
        self.out.write_all(&payload)?;
        self.offset = self
            .offset
            .saturating_add(RECORD_PREFIX_LEN)
            .saturating_add(u64::from(len));
        Ok(())
    }

    pub(crate) fn commit(self) -> Result<(), ImageError> {
        self.out.commit()
    }
}

/// Atomically writes a file of `kind` holding the single record `msg`.
pub(crate) fn write_single<M: Message>(
    path: &Path,
    kind: FileKind,
    msg: &M,
    durability: Durability,
) -> Result<(), ImageError> {
    let mut w = RecordWriter::create(path, kind, durability)?;
    w.append(msg)?;
    w.commit()
}

/// Reads the single record of a file of `kind`.
pub(crate) fn read_single<M: Message + Default>(
    path: &Path,
    kind: FileKind,
) -> Result<M, ImageError> {
    let mut msg = None;
    read_records(path, kind, |offset, payload| {
        super::bounds::check(kind, payload)
            .map_err(|what| ImageErrorKind::Invalid(format!("record at byte {offset}: {what}")))?;
        msg = Some(M::decode(payload).map_err(|source| ImageErrorKind::Decode { offset, source })?);
        Ok(())
    })?;
    msg.ok_or_else(|| ImageError::new(path, ImageErrorKind::NoRecord))
}

/// Reads the record file `path` of `kind`, calling `on_record(offset, payload)`
/// for each record whose checksum matches, in file order.
pub(crate) fn read_records(
    path: &Path,
    kind: FileKind,
    on_record: impl FnMut(u64, &[u8]) -> Result<(), ImageErrorKind>,
) -> Result<u64, ImageError> {
    let file = File::open(path).map_err(|e| ImageError::open(path, e))?;
    let meta = file
        .metadata()
        .map_err(|e| ImageError::io(path, "stat", e))?;
    if !meta.is_file() {
        return Err(ImageError::invalid(path, "not a regular file"));
    }
    parse_records(
        BufReader::with_capacity(64 << 10, file),
        meta.len(),
        kind,
        on_record,
    )
    .map_err(|kind| ImageError::new(path, kind))
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
pub(crate) fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> Result<usize, ImageErrorKind> {
    let mut done = 0;
    while let Some(rest) = buf.get_mut(done..).filter(|rest| !rest.is_empty()) {
        match r.read(rest) {
            Ok(0) => break,
            Ok(n) => done = done.saturating_add(n.min(rest.len())),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => return Err(ImageErrorKind::Io { op: "read", source }),
        }
    }
    Ok(done)
}

/// Checks a record length field read at `offset` (the record's start) of
/// a `file_len`-byte input against the limit `max`, before anything is
/// allocated for it; returns the payload length and the offset just past the
/// record.
pub(crate) fn check_record_len(
    offset: u64,
    len: u32,
    max: u64,
    file_len: u64,
) -> Result<(usize, u64), ImageErrorKind> {
    let len64 = u64::from(len);
    if len64 > max {
        return Err(ImageErrorKind::RecordTooLarge {
            offset,
            len: len64,
            max,
        });
    }
    let end = offset
        .checked_add(RECORD_PREFIX_LEN)
        .and_then(|start| start.checked_add(len64))
        .filter(|&end| end <= file_len)
        .ok_or(ImageErrorKind::Truncated { offset: file_len })?;
    let len = usize::try_from(len).map_err(|_| ImageErrorKind::RecordTooLarge {
        offset,
        len: len64,
        max,
    })?;
    Ok((len, end))
}

/// Parses a record file of `kind` from `r`, which holds `file_len` bytes.
/// Returns the number of records.
pub(crate) fn parse_records(
    mut r: impl Read,
    file_len: u64,
    kind: FileKind,
    mut on_record: impl FnMut(u64, &[u8]) -> Result<(), ImageErrorKind>,
) -> Result<u64, ImageErrorKind> {
    let mut header = [0u8; HEADER_LEN as usize];
    let got = read_up_to(&mut r, &mut header)?;
    let magic_got = got.min(MAGIC.len());
    if header.get(..magic_got) != MAGIC.get(..magic_got) {
        return Err(ImageErrorKind::BadMagic);
    }
    if got < header.len() {
        return Err(ImageErrorKind::Truncated { offset: got as u64 });
    }
    let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if version != IMAGE_FORMAT_VERSION {
        return Err(ImageErrorKind::UnsupportedVersion {
            found: version,
            supported: IMAGE_FORMAT_VERSION,
        });
    }
    let found = u32::from_le_bytes([header[12], header[13], header[14], header[15]]);
    if found != kind.code() {
        return Err(ImageErrorKind::WrongKind {
            expected: kind.name(),
            found,
        });
    }

    let mut offset = HEADER_LEN;
    let mut count: u64 = 0;
    let mut payload = Vec::new();
    loop {
        let mut prefix = [0u8; RECORD_PREFIX_LEN as usize];
        let got = read_up_to(&mut r, &mut prefix)?;
        if got == 0 {
            break;
        }
        if got < prefix.len() {
            return Err(ImageErrorKind::Truncated {
                offset: offset.saturating_add(got as u64),
            });
        }
        count = count.saturating_add(1);
        if count > kind.max_records() {
            return Err(ImageErrorKind::TooManyRecords {
                max: kind.max_records(),
            });
        }
        let len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
        let crc = u32::from_le_bytes([prefix[4], prefix[5], prefix[6], prefix[7]]);
        let (len, end) = check_record_len(offset, len, kind.max_record_len(), file_len)?;
        // Bounded by the kind's limit and by the bytes left in the file.
        payload.clear();
        payload.resize(len, 0);
        let got = read_up_to(&mut r, &mut payload)?;
        if got < len {
            return Err(ImageErrorKind::Truncated {
                offset: offset
                    .saturating_add(RECORD_PREFIX_LEN)
                    .saturating_add(got as u64),
            });
        }
        if crc32fast::hash(&payload) != crc {
            return Err(ImageErrorKind::ChecksumMismatch { offset });
        }
        on_record(offset, &payload)?;
        offset = end;
    }
    if offset != file_len {
        // The input ended before the length it was said to have.
        return Err(ImageErrorKind::Truncated { offset });
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(version: u32, kind: u32) -> Vec<u8> {
        let mut v = MAGIC.to_vec();
        v.extend_from_slice(&version.to_le_bytes());
        v.extend_from_slice(&kind.to_le_bytes());
        v
    }

    fn parse(bytes: &[u8], kind: FileKind) -> Result<u64, ImageErrorKind> {
        parse_records(bytes, bytes.len() as u64, kind, |_, _| Ok(()))
    }

    #[test]
    fn header_checks() {
        assert!(matches!(
            parse(b"CRMIM", FileKind::Core),
            Err(ImageErrorKind::Truncated { offset: 5 })
        ));
        assert!(matches!(
            parse(b"ELF\x7f", FileKind::Core),
            Err(ImageErrorKind::BadMagic)
        ));
        assert!(matches!(
            parse(&header(IMAGE_FORMAT_VERSION + 1, 2), FileKind::Core),
            Err(ImageErrorKind::UnsupportedVersion { found, supported })
                if found == IMAGE_FORMAT_VERSION + 1 && supported == IMAGE_FORMAT_VERSION
        ));
        assert!(matches!(
            parse(&header(IMAGE_FORMAT_VERSION, 3), FileKind::Core),
            Err(ImageErrorKind::WrongKind {
                expected: "core",
                found: 3
            })
        ));
        assert_eq!(
            parse(&header(IMAGE_FORMAT_VERSION, 2), FileKind::Core).unwrap(),
            0
        );
    }

    #[test]
    fn oversized_length_is_refused_before_allocation() {
        let mut bytes = header(IMAGE_FORMAT_VERSION, 5);
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        let err = parse(&bytes, FileKind::PageMap).unwrap_err();
        assert!(
            matches!(err, ImageErrorKind::RecordTooLarge { offset: 16, len, max }
                if len == u64::from(u32::MAX) && max == MAX_PAGEMAP_RECORD_LEN),
            "{err:?}"
        );
        let err = check_record_len(16, MAX_RECORD_LEN as u32 + 1, MAX_RECORD_LEN, u64::MAX);
        assert!(
            matches!(err, Err(ImageErrorKind::RecordTooLarge { len, .. }) if len == MAX_RECORD_LEN + 1)
        );
        // Under the cap but past the end of the input: truncated, nothing allocated.
        assert!(matches!(
            check_record_len(16, (MAX_RECORD_LEN - 1) as u32, MAX_RECORD_LEN, 100),
            Err(ImageErrorKind::Truncated { offset: 100 })
        ));
        assert!(matches!(
            check_record_len(u64::MAX - 4, 1, MAX_RECORD_LEN, u64::MAX),
            Err(ImageErrorKind::Truncated { .. })
        ));
        assert_eq!(
            check_record_len(16, 10, MAX_RECORD_LEN, 34).unwrap(),
            (10, 34)
        );
    }

    #[test]
    fn record_count_is_capped() {
        let mut bytes = header(IMAGE_FORMAT_VERSION, 2);
        for _ in 0..2 {
            bytes.extend_from_slice(&0u32.to_le_bytes());
            bytes.extend_from_slice(&crc32fast::hash(&[]).to_le_bytes());
        }
        assert!(matches!(
            parse(&bytes, FileKind::Core),
            Err(ImageErrorKind::TooManyRecords { max: 1 })
        ));
    }

    #[test]
    fn input_shorter_than_announced_is_truncated() {
        let bytes = header(IMAGE_FORMAT_VERSION, 2);
        assert!(matches!(
            parse_records(&bytes[..], 40, FileKind::Core, |_, _| Ok(())),
            Err(ImageErrorKind::Truncated { offset: 16 })
        ));
    }

    /// Random bytes after a valid header, with the length fields sometimes
    /// small enough to reach the checksum and decode steps: never a panic.
    #[test]
    fn random_inputs_do_not_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for i in 0..3000 {
            let mut bytes = header(IMAGE_FORMAT_VERSION, 5);
            let n = (next() % 200) as usize;
            bytes.extend((0..n).map(|_| next() as u8));
            if i & 1 == 0 && bytes.len() >= 24 {
                // A plausible length with a matching checksum.
                let len = (bytes.len() - 24) as u32;
                bytes[16..20].copy_from_slice(&len.to_le_bytes());
                let crc = crc32fast::hash(&bytes[24..]);
                bytes[20..24].copy_from_slice(&crc.to_le_bytes());
            }
            let result = std::panic::catch_unwind(|| {
                parse_records(&bytes[..], bytes.len() as u64, FileKind::PageMap, |o, p| {
                    crm_proto::image::PageMapChunk::decode(p)
                        .map(drop)
                        .map_err(|source| ImageErrorKind::Decode { offset: o, source })
                })
                .map(drop)
            });
            assert!(result.is_ok(), "panic on input {bytes:?}");
        }
    }
}
