//! The destination's image, assembled from the page store and the final
//! state once the source froze its process.
//!
//! The image directory gets the task's records and only the pages a restore
//! must place before the process runs: those of file mappings, shared and
//! inaccessible memory. The pages of private anonymous memory (nearly all of
//! it) stay in the [`PageStore`] and are served from there by lazy restore
//! ([`super::restorer`]); only pages the final dump still saw resident
//! count, so memory dropped since an earlier round stays dropped. The two
//! are separate steps so that finding the lazy ranges (a walk over every
//! page held) can overlap with a same-host source releasing its PIDs.
use anyhow::{Context, Result};
use crm_engine::dump::TaskState;
use crm_engine::image::ImageDir;
use crm_page_server::PageStore;
use crm_proto::image::VmaKind;

/// The VMAs an image describes, by address, without the kernel's special
/// mappings.
fn vmas(state: &TaskState) -> Vec<&crm_proto::image::Vma> {
    let mut v: Vec<_> = state
        .mm
        .vmas
        .iter()
        .filter(|v| {
            !matches!(
                v.kind(),
                VmaKind::Vdso | VmaKind::Vvar | VmaKind::VvarVclock | VmaKind::Vsyscall
            )
        })
        .collect();
    v.sort_by_key(|v| v.start);
    v
}

/// `a ∩ b` of two sorted lists of disjoint ranges.
fn intersect(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() && j < b.len() {
        let lo = a[i].0.max(b[j].0);
        let hi = a[i].1.min(b[j].1);
        if lo < hi {
            out.push((lo, hi));
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// Writes the image of `state` into `dir`: the records and the resident
/// pages of the VMAs lazy restore does not serve. Returns the pages written.
pub fn write_image(
    dir: &ImageDir,
    state: &TaskState,
    store: &PageStore,
    resident: &[(u64, u64)],
) -> Result<u64> {
    let pid = state.core.pid;
    let mut pages = 0;
    let mut writer = dir
        .pages_writer(pid)
        .with_context(|| format!("creating the pages file of process {pid}"))?;
    for v in vmas(state) {
        if crm_engine::restore::lazy_eligible(v) {
            continue;
        }
        for (a, b) in intersect(&store.data_ranges(pid, v.start, v.end), resident) {
            let mut addr = a;
            while addr < b {
                let page = store
                    .get(pid, addr)
                    .with_context(|| format!("reading the page at {addr:#x}"))?
                    .with_context(|| format!("the page at {addr:#x} vanished from the store"))?;
                writer
                    .add_run(addr, &page)
                    .with_context(|| format!("writing the page at {addr:#x}"))?;
                pages += 1;
                addr += 4096;
            }
        }
        // Runs never cross a VMA boundary.
        writer.end_run();
    }
    writer
        .finish()
        .with_context(|| format!("finishing the pages file of process {pid}"))?;
    crm_engine::dump::write_state(dir, state)
        .with_context(|| format!("writing the records of process {pid}"))?;
    Ok(pages)
}

/// The ranges lazy restore serves: resident pages with data in the VMAs it
/// handles (sorted, at their dump-time addresses), and their page count.
pub fn lazy_ranges(
    state: &TaskState,
    store: &PageStore,
    resident: &[(u64, u64)],
) -> (Vec<(u64, u64)>, u64) {
    let pid = state.core.pid;
    let mut out = Vec::new();
    for v in vmas(state) {
        if crm_engine::restore::lazy_eligible(v) {
            out.extend(intersect(&store.data_ranges(pid, v.start, v.end), resident));
        }
    }
    let pages = out.iter().map(|r| (r.1 - r.0) / 4096).sum();
    (out, pages)
}

#[cfg(test)]
mod tests {
    use super::intersect;

    #[test]
    fn intersect_sorted_ranges() {
        let a = [(0, 10), (20, 30), (40, 50)];
        let b = [(5, 25), (45, 60)];
        assert_eq!(intersect(&a, &b), vec![(5, 10), (20, 25), (45, 50)]);
        assert!(intersect(&a, &[]).is_empty());
    }
}
