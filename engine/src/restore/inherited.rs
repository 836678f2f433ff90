//! Private memory a task of a tree inherited over fork and never wrote:
//! a tree dump stores it once, with the task it came from
//! (`MmCore.inherited`, `inherited_from`), instead of once per child.
//!
//! Before the tasks exist, [`resolve`] turns each task's inherited ranges
//! into [`Borrowed`] pieces: where in which task's pages file each piece's
//! contents are (following a chain of parents when the source inherited
//! them too); parts no task stores are zero pages and need nothing. Every
//! task inherits the coordinator's open pages files over fork, so the
//! restoring task reads its borrowed pieces from the same descriptors
//! ([`super::child`]). After a restore the pages are the task's own
//! private copies: the image is not multiplied, the memory is.
use super::RestoreError;
use crate::image::PagesReader;
use crm_proto::image::{MmCore, VmaKind};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};

const PAGE: u64 = 4096;

/// `nr_pages` pages at `vaddr` to read from descriptor `fd` at byte
/// `offset` (a pages file of the image, inherited from the coordinator).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Borrowed {
    pub vaddr: u64,
    pub nr_pages: u64,
    pub fd: RawFd,
    pub offset: u64,
}

/// What [`resolve`] needs of one task of the image.
pub struct Source<'a> {
    pub pages: &'a PagesReader,
    pub mm: &'a MmCore,
}

fn invalid(pid: i32, what: impl std::fmt::Display) -> RestoreError {
    RestoreError::InvalidImage {
        what: format!("the inherited memory of task {pid}: {what}"),
    }
}

/// The inherited ranges of `mm`, checked: page-aligned, sorted, disjoint,
/// inside private anonymous VMAs.
fn ranges(pid: i32, mm: &MmCore) -> Result<Vec<(u64, u64)>, RestoreError> {
    if !mm.inherited.len().is_multiple_of(2) {
        return Err(invalid(pid, "an odd number of bounds"));
    }
    let out: Vec<(u64, u64)> = mm.inherited.chunks(2).map(|p| (p[0], p[1])).collect();
    let mut last = 0;
    for &(a, b) in &out {
        if a % PAGE != 0 || b % PAGE != 0 || a >= b || a < last {
            return Err(invalid(pid, format!("bad range {a:#x}-{b:#x}")));
        }
        last = b;
        let inside = mm.vmas.iter().any(|v| {
            v.start <= a
                && b <= v.end
                && !v.shared
                && matches!(v.kind(), VmaKind::Anon | VmaKind::Heap | VmaKind::Stack)
        });
        if !inside {
            return Err(invalid(
                pid,
                format!("{a:#x}-{b:#x} is not inside one private anonymous VMA"),
            ));
        }
    }
    Ok(out)
}

/// The pieces task `pid` borrows (see the module docs). `tasks`: every
/// live task of the image by PID.
pub fn resolve(pid: i32, tasks: &HashMap<i32, Source<'_>>) -> Result<Vec<Borrowed>, RestoreError> {
    let me = tasks
        .get(&pid)
        .ok_or_else(|| invalid(pid, "no such task"))?;
    let own = ranges(pid, me.mm)?;
    if own.is_empty() {
        return Ok(Vec::new());
    }
    // A task never borrows over its own pages.
    for r in me.pages.runs() {
        let end = r.vaddr + r.nr_pages * PAGE;
        if own.iter().any(|&(a, b)| a < end && r.vaddr < b) {
            return Err(invalid(
                pid,
                format!("overlaps its own pages at {:#x}", r.vaddr),
            ));
        }
    }
    let mut out = Vec::new();
    let mut work: Vec<((u64, u64), i32, usize)> = own
        .into_iter()
        .map(|r| (r, me.mm.inherited_from, 1))
        .collect();
    while let Some(((a, b), src_pid, depth)) = work.pop() {
        if depth > tasks.len() {
            return Err(invalid(pid, "its sources form a cycle"));
        }
        let src = tasks
            .get(&src_pid)
            .filter(|_| src_pid != pid)
            .ok_or_else(|| {
                invalid(
                    pid,
                    format!("task {src_pid} it inherited from is not a live task of the image"),
                )
            })?;
        let fd = src.pages.file().as_raw_fd();
        // Runs of the source inside [a, b): read from its file.
        let mut at = a;
        for r in src.pages.runs() {
            let (rs, re) = (r.vaddr, r.vaddr + r.nr_pages * PAGE);
            if re <= at || rs >= b {
                continue;
            }
            let (x, y) = (at.max(rs), b.min(re));
            if at < x {
                gap(&mut work, (at, x), src, depth);
            }
            let offset = src
                .pages
                .file_offset(r, (x - rs) / PAGE)
                .map_err(|e| invalid(pid, e))?;
            out.push(Borrowed {
                vaddr: x,
                nr_pages: (y - x) / PAGE,
                fd,
                offset,
            });
            at = y;
        }
        if at < b {
            gap(&mut work, (at, b), src, depth);
        }
    }
    out.sort_by_key(|p| p.vaddr);
    Ok(out)
}

/// A part of a range the source stores no pages for: what the source
/// inherited itself is looked up in its own source; the rest is zero.
fn gap(
    work: &mut Vec<((u64, u64), i32, usize)>,
    (a, b): (u64, u64),
    src: &Source<'_>,
    depth: usize,
) {
    for p in src.mm.inherited.chunks(2) {
        let (x, y) = (a.max(p[0]), b.min(p.get(1).copied().unwrap_or(0)));
        if x < y {
            work.push(((x, y), src.mm.inherited_from, depth + 1));
        }
    }
}
