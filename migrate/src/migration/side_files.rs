//! The image files of a migration that belong to no task: memfd contents
//! (`memfd-pages-INO.img`, `memfd-pagemap-INO.img`) and the SysV IPC
//! objects the tree attached (`ipc.img`, `pages-shm-ID.img`,
//! `pagemap-shm-ID.img`).
//!
//! The source writes them, frozen, into a scratch directory with the dump's
//! own code ([`crm_engine::dump::TreeObjects`]) and [`send`]s them as
//! `ImageFile` control messages before `FinalState`; the destination checks
//! each name against the kinds above, writes the pieces in order into its
//! image directory and bounds their number and size ([`Receiver`]).
use crate::transport::Session;
use anyhow::{bail, Context, Result};
use crm_proto::migrate::{control, Control, ImageFile};
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

/// Bytes of a file per `ImageFile` message.
const PIECE: usize = 1 << 20;
/// Most side files one migration may send.
const MAX_FILES: usize = 4096;
/// Most bytes of side files one migration may send (64 GiB).
const MAX_BYTES: u64 = 64 << 30;

/// Whether `name` is a side file of an image: one of the fixed names, or
/// a prefix, a number and `.img`.
pub fn valid_name(name: &str) -> bool {
    if name == "ipc.img" {
        return true;
    }
    [
        "memfd-pages-",
        "memfd-pagemap-",
        "pages-shm-",
        "pagemap-shm-",
    ]
    .iter()
    .any(|prefix| {
        name.strip_prefix(prefix)
            .and_then(|r| r.strip_suffix(".img"))
            .is_some_and(|n| {
                !n.is_empty() && n.len() <= 20 && n.bytes().all(|b| b.is_ascii_digit())
            })
    })
}

/// Sends every file of `dir` (all side files) to the destination; returns
/// the bytes sent.
pub async fn send(session: &Session, dir: &Path) -> Result<u64> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("listing {}", dir.display()))?;
    names.sort();
    let mut total = 0;
    for name in names {
        if !valid_name(&name) {
            bail!("unexpected file {name} among the objects of the image");
        }
        let path = dir.join(&name);
        let mut f = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let mut offset = 0u64;
        loop {
            let mut data = Vec::with_capacity(PIECE);
            (&mut f)
                .take(PIECE as u64)
                .read_to_end(&mut data)
                .with_context(|| format!("reading {}", path.display()))?;
            let last = data.len() < PIECE;
            let n = data.len() as u64;
            let msg = control::Msg::ImageFile(ImageFile {
                name: name.clone(),
                offset,
                data,
                last,
            });
            session.send_control(&Control { msg: Some(msg) }).await?;
            offset += n;
            if last {
                break;
            }
        }
        tracing::debug!(file = %name, bytes = offset, "image file sent");
        total += offset;
    }
    Ok(total)
}

/// The destination's side: the files being written.
#[derive(Default)]
pub struct Receiver {
    open: HashMap<String, (File, u64)>,
    done: Vec<String>,
    bytes: u64,
}

impl Receiver {
    /// Writes one piece into `dir` (the image directory).
    pub fn piece(&mut self, dir: &Path, f: ImageFile) -> Result<()> {
        if !valid_name(&f.name) {
            bail!("refused an image file named {:?}", f.name);
        }
        if self.done.contains(&f.name) {
            bail!("image file {} sent twice", f.name);
        }
        self.bytes = self.bytes.saturating_add(f.data.len() as u64);
        if self.bytes > MAX_BYTES {
            bail!("image files beyond {MAX_BYTES} bytes");
        }
        if !self.open.contains_key(&f.name) {
            if self.open.len() + self.done.len() >= MAX_FILES {
                bail!("more than {MAX_FILES} image files");
            }
            let path = dir.join(&f.name);
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            self.open.insert(f.name.clone(), (file, 0));
        }
        let (file, at) = self.open.get_mut(&f.name).expect("inserted above");
        if f.offset != *at {
            bail!(
                "image file {}: piece at {} where {} was expected",
                f.name,
                f.offset,
                at
            );
        }
        file.write_all(&f.data)
            .with_context(|| format!("writing image file {}", f.name))?;
        *at += f.data.len() as u64;
        if f.last {
            self.open.remove(&f.name);
            self.done.push(f.name);
        }
        Ok(())
    }

    /// Every file begun was ended.
    pub fn check_complete(&self) -> Result<()> {
        match self.open.keys().next() {
            Some(name) => bail!("image file {name} was not sent whole"),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for ok in [
            "ipc.img",
            "memfd-pages-123.img",
            "memfd-pagemap-9.img",
            "pages-shm-0.img",
            "pagemap-shm-42.img",
        ] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            "core-1.img",
            "inventory.img",
            "../ipc.img",
            "memfd-pages-.img",
            "memfd-pages-1/2.img",
            "pages-shm-1.img.tmp",
            "memfd-pages-123456789012345678901.img",
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn pieces_in_order_bounded_and_complete() {
        let dir = std::env::temp_dir().join(format!("crm-side-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let piece = |name: &str, offset, data: &[u8], last| ImageFile {
            name: name.into(),
            offset,
            data: data.to_vec(),
            last,
        };
        let mut r = Receiver::default();
        r.piece(&dir, piece("ipc.img", 0, b"abc", false)).unwrap();
        assert!(r.check_complete().is_err(), "ipc.img is not ended yet");
        assert!(r.piece(&dir, piece("ipc.img", 1, b"x", false)).is_err());
        r.piece(&dir, piece("ipc.img", 3, b"def", true)).unwrap();
        r.check_complete().unwrap();
        assert_eq!(std::fs::read(dir.join("ipc.img")).unwrap(), b"abcdef");
        assert!(r.piece(&dir, piece("ipc.img", 0, b"", true)).is_err());
        assert!(r.piece(&dir, piece("core-1.img", 0, b"", true)).is_err());
        assert!(r.piece(&dir, piece("../x.img", 0, b"", true)).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
