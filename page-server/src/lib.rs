//! crm-page-server: the destination's page store.
//!
//! During a live migration the source sends memory pages in batches — the
//! whole address space in the first pre-copy round, then only the pages
//! written since, then the final dump — and the destination must end up with
//! the newest copy of every page. Lazy restore (post-copy, DESIGN.md §2.5)
//! then serves the restored process's userfaultfd faults from that copy.
//!
//! This crate is that store. [`PageStore`] keeps the newest copy of each
//! page keyed by (task, page address), in memory up to a byte bound and in an
//! append-only spill file beyond it; pages that turned zero are recorded
//! without data. `cr-migrate receive` fills it from the page streams and,
//! once the process is restored, serves its userfaultfd faults from it (the
//! fault loop is `crm_engine::restore::lazy`). This crate knows nothing
//! about QUIC, and nothing about ptrace.

pub(crate) mod frames;
mod index;
mod page_buf;
mod store;

pub use frames::CHUNK_BYTES;
pub use page_buf::{OwnedPages, PageBuf};
pub use store::{PageStore, PageStoreError, StoreStats, TaskId, PAGE_SIZE};
