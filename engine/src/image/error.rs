//! Errors of the image reader and writer.
//!
//! Every failure is an [`ImageError`]: the file it concerns plus an
//! [`ImageErrorKind`] saying what is wrong with it. The message of an
//! `ImageError` is `image file PATH: WHAT`; an underlying I/O or protobuf
//! error is exposed only through [`std::error::Error::source`], never repeated
//! in the message, so a chain printer shows each cause once.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use super::framing::FileKind;

/// A failure to read or write one file of an image directory.
#[derive(Debug)]
pub struct ImageError {
    /// The file concerned (the final name, also when a temporary file was being written).
    pub file: PathBuf,
    /// What is wrong with it.
    pub kind: ImageErrorKind,
}

/// What is wrong with an image file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageErrorKind {
    /// The file does not exist.
    #[error("file is missing")]
    Missing,
    /// The file exists but the operation must not overwrite it.
    #[error("already exists")]
    AlreadyExists,
    /// The operating system refused an operation on the file.
    #[error("{op} failed")]
    Io {
        /// What was being done, e.g. `"read"` or `"fsync"`.
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// The file does not start with the magic of its format.
    #[error("bad magic: not a cr-migrate image file")]
    BadMagic,
    /// The file was written in a format version this build does not read.
    #[error("unsupported format version {found} (this build reads version {supported})")]
    UnsupportedVersion { found: u32, supported: u32 },
    /// The file holds another kind of records than the one asked for.
    #[error("holds file kind {found} ({}) where {expected} was expected", FileKind::name_of(*found))]
    WrongKind { expected: &'static str, found: u32 },
    /// The file ends before the end of its header, of a record or of a page.
    #[error("truncated at byte {offset}")]
    Truncated { offset: u64 },
    /// A record's length field exceeds the limit (checked before allocating).
    #[error("record at byte {offset} claims {len} bytes, over the limit of {max}")]
    RecordTooLarge { offset: u64, len: u64, max: u64 },
    /// The file holds more records than its kind allows.
    #[error("holds more than {max} records")]
    TooManyRecords { max: u64 },
    /// A file that must hold one record holds none.
    #[error("holds no record")]
    NoRecord,
    /// The data at `offset` does not match its CRC32.
    #[error("checksum mismatch in the data at byte {offset}")]
    ChecksumMismatch { offset: u64 },
    /// A record passed its checksum but is not a valid protobuf message.
    #[error("record at byte {offset} does not decode")]
    Decode {
        offset: u64,
        #[source]
        source: prost::DecodeError,
    },
    /// The content is well-formed but inconsistent (the text says how), or
    /// the caller asked for something the format cannot hold.
    #[error("{0}")]
    Invalid(String),
}

impl ImageError {
    /// An error about `file`.
    pub fn new(file: impl Into<PathBuf>, kind: ImageErrorKind) -> Self {
        ImageError {
            file: file.into(),
            kind,
        }
    }

    /// `op` failed on `file` with `source`.
    pub(crate) fn io(file: &Path, op: &'static str, source: io::Error) -> Self {
        Self::new(file, ImageErrorKind::Io { op, source })
    }

    /// Opening `file` for reading failed: `NotFound` becomes [`ImageErrorKind::Missing`].
    pub(crate) fn open(file: &Path, source: io::Error) -> Self {
        if source.kind() == io::ErrorKind::NotFound {
            Self::new(file, ImageErrorKind::Missing)
        } else {
            Self::io(file, "open", source)
        }
    }

    /// An [`ImageErrorKind::Invalid`] error about `file`.
    pub(crate) fn invalid(file: &Path, what: impl Into<String>) -> Self {
        Self::new(file, ImageErrorKind::Invalid(what.into()))
    }
}

impl fmt::Display for ImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "image file {}: {}", self.file.display(), self.kind)
    }
}

impl std::error::Error for ImageError {
    /// The kind is part of this error's message, so the chain continues with
    /// the kind's own cause (an I/O or decode error), not with the kind itself.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.kind)
    }
}
