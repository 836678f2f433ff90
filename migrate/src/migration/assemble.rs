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
use crm_proto::image::{ProcessTree, Vma, VmaKind};

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
    let placed: Vec<Vma> = vmas(state)
        .into_iter()
        .filter(|v| !crm_engine::restore::lazy_eligible(v))
        .cloned()
        .collect();
    let pages = write_pages(dir, state.core.pid, &placed, store, resident)?;
    crm_engine::dump::write_state(dir, state)
        .with_context(|| format!("writing the records of process {}", state.core.pid))?;
    Ok(pages)
}

/// One task of a tree to assemble: its state and resident ranges.
pub struct TreeTaskIn {
    pub state: TaskState,
    pub resident: Vec<(u64, u64)>,
}

/// Writes the image of a tree into `dir`: each task's records and pages
/// (the parts of shared anonymous memory once, with the first task mapping
/// them, as the source sent them; none of the VMAs lazy restore serves),
/// the tree record, then the inventory (the root's). Returns the pages
/// written.
pub fn write_tree_image(
    dir: &ImageDir,
    tasks: &[TreeTaskIn],
    tree: &ProcessTree,
    store: &PageStore,
) -> Result<u64> {
    let root = tasks.first().context("a tree with no live task")?;
    let mut shared = crm_engine::dump::SharedObjects::default();
    let mut pages = 0;
    for t in tasks {
        let pid = t.state.core.pid;
        let all: Vec<Vma> = vmas(&t.state).into_iter().cloned().collect();
        let own: Vec<Vma> = shared
            .not_yet_stored(&all)
            .into_iter()
            .filter(|v| !crm_engine::restore::lazy_eligible(v))
            .collect();
        pages += write_pages(dir, pid, &own, store, &t.resident)?;
        crm_engine::dump::write_task_records(dir, &t.state)
            .with_context(|| format!("writing the records of process {pid}"))?;
    }
    dir.write_tree(tree).context("writing the process tree")?;
    dir.write_inventory(&root.state.inventory)
        .context("writing the inventory")?;
    Ok(pages)
}

/// Writes the pages file of `pid`: the resident pages the store holds in
/// `vmas` (sorted by address).
fn write_pages(
    dir: &ImageDir,
    pid: i32,
    vmas: &[Vma],
    store: &PageStore,
    resident: &[(u64, u64)],
) -> Result<u64> {
    let mut pages = 0;
    let mut writer = dir
        .pages_writer(pid)
        .with_context(|| format!("creating the pages file of process {pid}"))?;
    for v in vmas {
        for (a, b) in intersect(&store.data_ranges(pid, v.start, v.end), resident) {
            let mut addr = a;
            while addr < b {
                let page = store
                    .get(pid, addr)
                    .with_context(|| format!("reading the page at {addr:#x} of process {pid}"))?
                    .with_context(|| {
                        format!("the page at {addr:#x} of process {pid} vanished from the store")
                    })?;
                writer
                    .add_run(addr, &page)
                    .with_context(|| format!("writing the page at {addr:#x} of process {pid}"))?;
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
    Ok(pages)
}

/// Whether the restorer hands the memory of the task of `state` over to
/// the page server: it does when the task has a VMA lazy restore serves.
pub fn hands_over(state: &TaskState) -> bool {
    vmas(state)
        .into_iter()
        .any(crm_engine::restore::lazy_eligible)
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
