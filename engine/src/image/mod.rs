//! Image directory reading and writing.
//!
//! An image directory holds one `inventory.img`, one `tree.img`
//! (`ProcessTree`: pid, parent, group, session, threads of every task, and
//! the exit status of zombies; optional for a single task), `ipc.img`
//! (`IpcCore`: SysV IPC objects, when the dump saved any) with
//! `pages-shm-ID.img` and `pagemap-shm-ID.img` per shared memory segment
//! (page runs at byte offsets in the segment), and, per live
//! task, `core-PID.img`
//! (`TaskCore`), `mm-PID.img` (`MmCore`), `files-PID.img` (`FilesCore`),
//! `pages-PID.img` (raw pages) and `pagemap-PID.img` (the `PageRun`s indexing
//! the pages file). The messages are the prost types of `crm_proto::image`.
//! The contents of each memfd of a dump are stored once, as a pages file
//! whose runs are at their offset in the memfd (`memfd-pages-INO.img`,
//! `memfd-pagemap-INO.img`).
//!
//! Every `.img` file but the pages file is a record file ([`framing`]): magic,
//! format version ([`crm_proto::IMAGE_FORMAT_VERSION`], independent of the
//! tool version), file kind, then length-prefixed, CRC32-checked records; the
//! pages file ([`pages`]) has a 4 KiB header and CRC32s per run in the
//! pagemap. Readers trust nothing: lengths and counts are capped before
//! anything is allocated, checksums are checked before decoding, and every
//! failure is a typed [`ImageError`] naming the file, never a panic.
//!
//! Each file is written atomically (`NAME.tmp`, fsync, rename, fsync of the
//! directory). [`ImageDir::open`] requires `inventory.img`, so a dump should
//! write the inventory last: a dump that failed half-way then leaves no
//! image that opens.

mod bounds;
mod error;
pub mod framing;
pub mod pages;

#[cfg(test)]
mod tests;

use std::fs;
use std::path::{Path, PathBuf};

use crm_proto::image::{FilesCore, Inventory, IpcCore, MmCore, ProcessTree, TaskCore};
use crm_proto::IMAGE_FORMAT_VERSION;

pub use bounds::MAX_TREE_TASKS;
pub use error::{ImageError, ImageErrorKind};
pub use framing::Durability;
use framing::FileKind;
pub use pages::{PagesReader, PagesWriter, PAGE_SIZE};

/// Name of the inventory file.
pub const INVENTORY_FILE: &str = "inventory.img";
/// Name of the process tree file.
pub const TREE_FILE: &str = "tree.img";
/// Name of the SysV IPC file.
pub const IPC_FILE: &str = "ipc.img";

/// An image directory. Holds only its path; every call opens the files it needs.
#[derive(Clone, Debug)]
pub struct ImageDir {
    path: PathBuf,
    durability: Durability,
}

impl ImageDir {
    /// Creates the directory (and its parents) if missing. Refuses
    /// ([`ImageErrorKind::AlreadyExists`]) if it already holds an `inventory.img`.
    pub fn create(path: &Path) -> Result<ImageDir, ImageError> {
        fs::create_dir_all(path).map_err(|e| ImageError::io(path, "create directory", e))?;
        let inventory = path.join(INVENTORY_FILE);
        match fs::symlink_metadata(&inventory) {
            Ok(_) => Err(ImageError::new(inventory, ImageErrorKind::AlreadyExists)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ImageDir {
                path: path.to_owned(),
                durability: Durability::Durable,
            }),
            Err(e) => Err(ImageError::io(&inventory, "stat", e)),
        }
    }

    /// [`ImageDir::create`] for an image that only has to outlive this
    /// process's next step, not a crash: files are not fsynced (see
    /// [`Durability::Scratch`]).
    pub fn create_scratch(path: &Path) -> Result<ImageDir, ImageError> {
        let mut dir = Self::create(path)?;
        dir.durability = Durability::Scratch;
        Ok(dir)
    }

    /// The same directory, with files written without fsync: for a writer
    /// that makes them durable at once with [`ImageDir::sync_all`] before
    /// it writes the inventory.
    pub fn unsynced(&self) -> ImageDir {
        ImageDir {
            path: self.path.clone(),
            durability: Durability::Scratch,
        }
    }

    /// Makes everything written so far durable: one `syncfs(2)` of the
    /// directory's filesystem (data, renames and the directory itself)
    /// instead of an fsync per file.
    pub fn sync_all(&self) -> Result<(), ImageError> {
        let dir = fs::File::open(&self.path)
            .map_err(|e| ImageError::io(&self.path, "open the directory", e))?;
        // SAFETY: syncfs on a descriptor we own; no pointers.
        if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir)) } != 0 {
            return Err(ImageError::io(
                &self.path,
                "syncfs",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Opens an existing image: reads and checks `inventory.img` (magic, versions, page size).
    pub fn open(path: &Path) -> Result<ImageDir, ImageError> {
        let dir = ImageDir {
            path: path.to_owned(),
            durability: Durability::Durable,
        };
        dir.read_inventory()?;
        Ok(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `inventory.img`, with `format_version` set to
    /// [`IMAGE_FORMAT_VERSION`] whatever `inv` holds.
    pub fn write_inventory(&self, inv: &Inventory) -> Result<(), ImageError> {
        let inv = Inventory {
            format_version: IMAGE_FORMAT_VERSION,
            ..inv.clone()
        };
        framing::write_single(
            &self.inventory_path(),
            FileKind::Inventory,
            &inv,
            self.durability,
        )
    }

    /// Reads `inventory.img`, checking its `format_version` and `page_size`
    /// (0 or [`PAGE_SIZE`]) besides the file header.
    pub fn read_inventory(&self) -> Result<Inventory, ImageError> {
        let path = self.inventory_path();
        let inv: Inventory = framing::read_single(&path, FileKind::Inventory)?;
        if inv.format_version != IMAGE_FORMAT_VERSION {
            return Err(ImageError::new(
                path,
                ImageErrorKind::UnsupportedVersion {
                    found: inv.format_version,
                    supported: IMAGE_FORMAT_VERSION,
                },
            ));
        }
        if inv.page_size != 0 && u64::from(inv.page_size) != PAGE_SIZE {
            return Err(ImageError::invalid(
                &path,
                format!(
                    "page size {} (only {PAGE_SIZE} is supported)",
                    inv.page_size
                ),
            ));
        }
        Ok(inv)
    }

    /// Writes `tree.img`.
    pub fn write_tree(&self, tree: &ProcessTree) -> Result<(), ImageError> {
        framing::write_single(
            &self.path.join(TREE_FILE),
            FileKind::Tree,
            tree,
            self.durability,
        )
    }

    /// Reads `tree.img`; `None` if the image has none (a single-task image).
    pub fn read_tree(&self) -> Result<Option<ProcessTree>, ImageError> {
        match framing::read_single(&self.path.join(TREE_FILE), FileKind::Tree) {
            Ok(t) => Ok(Some(t)),
            Err(e) if matches!(e.kind, ImageErrorKind::Missing) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes `ipc.img`.
    pub fn write_ipc(&self, ipc: &IpcCore) -> Result<(), ImageError> {
        framing::write_single(
            &self.path.join(IPC_FILE),
            FileKind::Ipc,
            ipc,
            self.durability,
        )
    }

    /// Reads `ipc.img`; `None` if the image has none (no SysV objects saved).
    pub fn read_ipc(&self) -> Result<Option<IpcCore>, ImageError> {
        match framing::read_single(&self.path.join(IPC_FILE), FileKind::Ipc) {
            Ok(t) => Ok(Some(t)),
            Err(e) if matches!(e.kind, ImageErrorKind::Missing) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Starts writing the contents of SysV shared memory segment `id`
    /// (`pages-shm-ID.img`, runs at byte offsets in the segment).
    pub fn shm_pages_writer(&self, id: i32) -> Result<PagesWriter, ImageError> {
        let (pages, pagemap) = self.shm_files(id)?;
        PagesWriter::create(&pages, &pagemap, self.durability)
    }

    /// Opens the contents of SysV shared memory segment `id`.
    pub fn shm_pages_reader(&self, id: i32) -> Result<PagesReader, ImageError> {
        let (pages, pagemap) = self.shm_files(id)?;
        PagesReader::open(&pages, &pagemap)
    }

    fn shm_files(&self, id: i32) -> Result<(PathBuf, PathBuf), ImageError> {
        let pages = self.path.join(format!("pages-shm-{id}.img"));
        if id < 0 {
            return Err(ImageError::invalid(
                &pages,
                format!("invalid segment id {id}"),
            ));
        }
        Ok((pages, self.path.join(format!("pagemap-shm-{id}.img"))))
    }

    /// Writes `core-PID.img`.
    pub fn write_core(&self, pid: i32, core: &TaskCore) -> Result<(), ImageError> {
        framing::write_single(
            &self.task_file("core", pid)?,
            FileKind::Core,
            core,
            self.durability,
        )
    }

    /// Reads `core-PID.img`.
    pub fn read_core(&self, pid: i32) -> Result<TaskCore, ImageError> {
        framing::read_single(&self.task_file("core", pid)?, FileKind::Core)
    }

    /// Writes `mm-PID.img`.
    pub fn write_mm(&self, pid: i32, mm: &MmCore) -> Result<(), ImageError> {
        framing::write_single(
            &self.task_file("mm", pid)?,
            FileKind::Mm,
            mm,
            self.durability,
        )
    }

    /// Reads `mm-PID.img`.
    pub fn read_mm(&self, pid: i32) -> Result<MmCore, ImageError> {
        framing::read_single(&self.task_file("mm", pid)?, FileKind::Mm)
    }

    /// Writes `files-PID.img`.
    pub fn write_files(&self, pid: i32, f: &FilesCore) -> Result<(), ImageError> {
        framing::write_single(
            &self.task_file("files", pid)?,
            FileKind::Files,
            f,
            self.durability,
        )
    }

    /// Reads `files-PID.img`.
    pub fn read_files(&self, pid: i32) -> Result<FilesCore, ImageError> {
        framing::read_single(&self.task_file("files", pid)?, FileKind::Files)
    }

    /// Starts writing `pages-PID.img`; [`PagesWriter::finish`] adds `pagemap-PID.img`.
    pub fn pages_writer(&self, pid: i32) -> Result<PagesWriter, ImageError> {
        PagesWriter::create(
            &self.task_file("pages", pid)?,
            &self.task_file("pagemap", pid)?,
            self.durability,
        )
    }

    /// Opens `pages-PID.img` through its validated `pagemap-PID.img`.
    pub fn pages_reader(&self, pid: i32) -> Result<PagesReader, ImageError> {
        PagesReader::open(
            &self.task_file("pages", pid)?,
            &self.task_file("pagemap", pid)?,
        )
    }

    /// Starts writing the contents of memfd `ino` (`memfd-pages-INO.img`,
    /// page runs at their offset in the file, and `memfd-pagemap-INO.img`).
    pub fn memfd_pages_writer(&self, ino: u64) -> Result<PagesWriter, ImageError> {
        PagesWriter::create(
            &self.path.join(format!("memfd-pages-{ino}.img")),
            &self.path.join(format!("memfd-pagemap-{ino}.img")),
            self.durability,
        )
    }

    /// Opens the contents of memfd `ino` (see [`ImageDir::memfd_pages_writer`]).
    pub fn memfd_pages_reader(&self, ino: u64) -> Result<PagesReader, ImageError> {
        PagesReader::open(
            &self.path.join(format!("memfd-pages-{ino}.img")),
            &self.path.join(format!("memfd-pagemap-{ino}.img")),
        )
    }

    fn inventory_path(&self) -> PathBuf {
        self.path.join(INVENTORY_FILE)
    }

    /// `PREFIX-PID.img` in the directory; a PID below 1 is refused.
    pub(crate) fn task_file(&self, prefix: &str, pid: i32) -> Result<PathBuf, ImageError> {
        let path = self.path.join(format!("{prefix}-{pid}.img"));
        if pid < 1 {
            return Err(ImageError::invalid(&path, format!("invalid pid {pid}")));
        }
        Ok(path)
    }
}
