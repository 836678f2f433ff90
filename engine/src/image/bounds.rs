//! Bounds on repeated fields, checked on the raw protobuf bytes before a
//! record is decoded. A repeated message field costs two bytes on disk but
//! hundreds in memory once decoded, so a record under the size cap could
//! still ask for gigabytes; counting the top-level occurrences of each
//! repeated field first keeps decoding proportional to a sane image.
use super::framing::FileKind;

/// Most tasks a `tree.img` may list.
pub const MAX_TREE_TASKS: u64 = 1 << 15;

/// `(field number, name, most occurrences)` per file kind.
fn limits(kind: FileKind) -> &'static [(u32, &'static str, u64)] {
    match kind {
        FileKind::Inventory => &[(6, "pids", 1 << 16)],
        FileKind::Core => &[
            (11, "rlimits", 64),
            (12, "sigactions", 64),
            (13, "itimers", 3),
            (14, "shared_pending", 1 << 16),
            (15, "threads", 1 << 14),
        ],
        FileKind::Mm => &[
            (12, "auxv", 128),
            (14, "vmas", 1 << 18),
            (15, "inherited ranges", 1 << 20),
        ],
        FileKind::Files => &[(1, "fds", 1 << 18)],
        FileKind::PageMap => &[(1, "runs", 1 << 16)],
        FileKind::Tree => &[(1, "tasks", MAX_TREE_TASKS)],
        // The kernel allows at most 32768 objects of each kind (IPCMNI);
        // messages are top-level so that they are counted here.
        FileKind::Ipc => &[
            (1, "queues", 1 << 15),
            (2, "sem_sets", 1 << 15),
            (3, "segments", 1 << 15),
            (4, "messages", 1 << 20),
        ],
    }
}

fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos).ok_or("truncated varint")?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint longer than 10 bytes".into())
}

/// Walks the top-level fields of `payload` and refuses it if a repeated
/// field occurs more often than its limit (packed scalars count per element
/// byte, an upper bound on their number). Malformed wire data is left to the
/// decoder, which reports it as a typed decode error.
pub(crate) fn check(kind: FileKind, payload: &[u8]) -> Result<(), String> {
    match count(kind, payload) {
        Err(Refusal::TooMany(what)) => Err(what),
        Err(Refusal::Malformed) | Ok(()) => Ok(()),
    }
}

enum Refusal {
    TooMany(String),
    Malformed,
}

impl From<String> for Refusal {
    fn from(_: String) -> Self {
        Refusal::Malformed
    }
}

impl From<&str> for Refusal {
    fn from(_: &str) -> Self {
        Refusal::Malformed
    }
}

fn count(kind: FileKind, payload: &[u8]) -> Result<(), Refusal> {
    let limits = limits(kind);
    let mut counts = [0u64; 8];
    let mut pos = 0;
    while pos < payload.len() {
        let tag = varint(payload, &mut pos)?;
        let field = (tag >> 3) as u32;
        let slot = limits.iter().position(|l| l.0 == field);
        let mut n = 1;
        match tag & 7 {
            0 => {
                varint(payload, &mut pos)?;
            }
            1 => pos = pos.checked_add(8).ok_or("overflow")?,
            5 => pos = pos.checked_add(4).ok_or("overflow")?,
            2 => {
                let len = varint(payload, &mut pos)?;
                let len = usize::try_from(len).map_err(|_| "length overflow")?;
                if slot.is_some() && field == 12 && kind == FileKind::Mm {
                    n = len as u64; // packed auxv words: at most one per byte
                }
                pos = pos.checked_add(len).ok_or("overflow")?;
            }
            _ => return Err(Refusal::Malformed),
        }
        if pos > payload.len() {
            return Err(Refusal::Malformed);
        }
        if let Some(i) = slot {
            counts[i] += n;
            let (_, name, max) = limits[i];
            if counts[i] > max {
                return Err(Refusal::TooMany(format!(
                    "more than {max} `{name}` entries"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn counts_threads() {
        let core = crm_proto::image::TaskCore {
            threads: vec![Default::default(); 3],
            ..Default::default()
        };
        assert!(check(FileKind::Core, &core.encode_to_vec()).is_ok());
        // 20000 empty thread entries: two bytes each on disk.
        let bomb = [0x7a, 0x00].repeat(20_000);
        let err = check(FileKind::Core, &bomb).unwrap_err();
        assert!(err.contains("threads"), "{err}");
        // Malformed bytes are the decoder's to report.
        assert!(check(FileKind::Core, &[0x7a, 0x05, 0]).is_ok());
        assert!(check(FileKind::Core, &[0x80]).is_ok());
    }

    #[test]
    fn counts_ipc_messages() {
        // 2^20 + 1 empty messages (field 4): two bytes each on disk.
        let bomb = [0x22, 0x00].repeat((1 << 20) + 1);
        let err = check(FileKind::Ipc, &bomb).unwrap_err();
        assert!(err.contains("messages"), "{err}");
        assert!(check(FileKind::Ipc, &[0x22, 0x00].repeat(100)).is_ok());
    }
}
