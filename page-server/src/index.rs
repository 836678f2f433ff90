//! The store's index: one entry per page held, by (task, page address).
//!
//! A map entry per page cost about 200 ns per insert (50 ms of the
//! receiver's CPU for a 1 GiB round). Pages are grouped instead in blocks
//! of [`BLOCK_PAGES`] consecutive pages of one task: one map entry per
//! block, an array inside it. A block costs 16 slots of 24 bytes whatever
//! it holds, so the worst case (one page per block) spends about 400 bytes
//! of index per 4 KiB page held (a map entry per page cost about 50); dense
//! memory, the usual case, under 1%.
use std::collections::BTreeMap;
use std::ops::Bound;

use crate::store::{TaskId, PAGE_SIZE};

/// Pages per block (64 KiB of address space).
const BLOCK_PAGES: usize = 16;
const BLOCK_BYTES: u64 = (BLOCK_PAGES * PAGE_SIZE) as u64;

type Block<T> = [Option<T>; BLOCK_PAGES];
/// A block's map key: its task and its number (address / 64 KiB).
type Key = (TaskId, u64);

/// A value per page address, kept in address order per task.
#[derive(Debug)]
pub(crate) struct PageIndex<T> {
    blocks: BTreeMap<Key, Box<Block<T>>>,
}

impl<T> Default for PageIndex<T> {
    fn default() -> Self {
        PageIndex {
            blocks: BTreeMap::new(),
        }
    }
}

/// Block number and slot of a page address.
fn split(addr: u64) -> (u64, usize) {
    (
        addr / BLOCK_BYTES,
        ((addr % BLOCK_BYTES) / PAGE_SIZE as u64) as usize,
    )
}

fn page_addr(block: u64, slot: usize) -> u64 {
    block * BLOCK_BYTES + (slot * PAGE_SIZE) as u64
}

/// The map keys of the blocks of `task` that hold pages in `[start, end)`
/// (none when the range is empty).
fn block_keys(task: TaskId, start: u64, end: u64) -> (Bound<Key>, Bound<Key>) {
    if start < end {
        (
            Bound::Included((task, start / BLOCK_BYTES)),
            Bound::Included((task, (end - 1) / BLOCK_BYTES)),
        )
    } else {
        (Bound::Included((task, 0)), Bound::Excluded((task, 0)))
    }
}

/// The slots of `block` whose pages lie in `[start, end)`.
fn slots_in(block: u64, start: u64, end: u64) -> std::ops::Range<usize> {
    let first = if start > block * BLOCK_BYTES {
        split(start).1
    } else {
        0
    };
    let last = if end < (block + 1).saturating_mul(BLOCK_BYTES) {
        (end - block * BLOCK_BYTES).div_ceil(PAGE_SIZE as u64) as usize
    } else {
        BLOCK_PAGES
    };
    first..last.max(first)
}

impl<T> PageIndex<T> {
    /// The value of the page at `addr` (page-aligned).
    pub(crate) fn get(&self, task: TaskId, addr: u64) -> Option<&T> {
        let (b, s) = split(addr);
        self.blocks.get(&(task, b))?[s].as_ref()
    }

    pub(crate) fn get_mut(&mut self, task: TaskId, addr: u64) -> Option<&mut T> {
        let (b, s) = split(addr);
        self.blocks.get_mut(&(task, b))?[s].as_mut()
    }

    /// Sets the value of the page at `addr`; returns the one it replaces.
    pub(crate) fn insert(&mut self, task: TaskId, addr: u64, value: T) -> Option<T> {
        let (b, s) = split(addr);
        let block = self
            .blocks
            .entry((task, b))
            .or_insert_with(|| Box::new(std::array::from_fn(|_| None)));
        block[s].replace(value)
    }

    /// Removes the value of the page at `addr`; a block left empty goes.
    pub(crate) fn remove(&mut self, task: TaskId, addr: u64) -> Option<T> {
        let (b, s) = split(addr);
        let block = self.blocks.get_mut(&(task, b))?;
        let v = block[s].take();
        if v.is_some() && block.iter().all(Option::is_none) {
            self.blocks.remove(&(task, b));
        }
        v
    }

    /// The pages of `task` in `[start, end)` that have a value, in address
    /// order.
    pub(crate) fn range(
        &self,
        task: TaskId,
        start: u64,
        end: u64,
    ) -> impl Iterator<Item = (u64, &T)> + '_ {
        self.blocks
            .range(block_keys(task, start, end))
            .flat_map(move |(&(_, b), block)| {
                slots_in(b, start, end)
                    .filter_map(move |s| block[s].as_ref().map(|v| (page_addr(b, s), v)))
            })
    }

    /// [`PageIndex::range`], the values writable.
    pub(crate) fn range_mut(
        &mut self,
        task: TaskId,
        start: u64,
        end: u64,
    ) -> impl Iterator<Item = (u64, &mut T)> + '_ {
        self.blocks
            .range_mut(block_keys(task, start, end))
            .flat_map(move |(&(_, b), block)| {
                let slots = slots_in(b, start, end);
                block[slots.clone()]
                    .iter_mut()
                    .zip(slots)
                    .filter_map(move |(v, s)| v.as_mut().map(|v| (page_addr(b, s), v)))
            })
    }

    /// Every page of `task` that has a value, in address order.
    pub(crate) fn task(&self, task: TaskId) -> impl Iterator<Item = (u64, &T)> + '_ {
        self.blocks
            .range((task, 0)..=(task, u64::MAX))
            .flat_map(|(&(_, b), block)| {
                block
                    .iter()
                    .enumerate()
                    .filter_map(move |(s, v)| v.as_ref().map(|v| (page_addr(b, s), v)))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE as u64;

    #[test]
    fn index_keeps_values_per_task_and_page_in_order() {
        let mut ix = PageIndex::default();
        // Around a block boundary, a far page, and another task.
        for addr in [63 * P, 64 * P, 65 * P, 1 << 40, 0] {
            assert_eq!(ix.insert(1, addr, addr), None);
        }
        assert_eq!(ix.insert(2, 64 * P, 7), None);
        assert_eq!(ix.insert(1, 64 * P, 8), Some(64 * P));
        assert_eq!(ix.get(1, 64 * P), Some(&8));
        assert_eq!(ix.get(2, 64 * P), Some(&7));
        assert_eq!(ix.get(1, 66 * P), None);
        assert_eq!(ix.get(3, 0), None);
        let all: Vec<u64> = ix.task(1).map(|(a, _)| a).collect();
        assert_eq!(all, [0, 63 * P, 64 * P, 65 * P, 1 << 40]);
        let mid: Vec<u64> = ix.range(1, 63 * P, 65 * P).map(|(a, _)| a).collect();
        assert_eq!(mid, [63 * P, 64 * P]);
        // An end inside a page still covers it; an empty range nothing.
        assert_eq!(ix.range(1, 65 * P, 65 * P + 1).count(), 1);
        assert_eq!(ix.range(1, 64 * P, 64 * P).count(), 0);
        assert_eq!(ix.range(1, 0, u64::MAX).count(), 5);
        for (_, v) in ix.range_mut(1, 64 * P, 1 << 41) {
            *v += 1;
        }
        assert_eq!(ix.get(1, 64 * P), Some(&9));
        assert_eq!(ix.get(1, 1 << 40), Some(&((1 << 40) + 1)));
        assert_eq!(ix.get(1, 63 * P), Some(&(63 * P)));
        *ix.get_mut(2, 64 * P).unwrap() = 1;
        assert_eq!(ix.task(2).collect::<Vec<_>>(), [(64 * P, &1)]);
        assert_eq!(ix.remove(2, 64 * P), Some(1));
        assert_eq!(ix.remove(2, 64 * P), None);
        assert_eq!(ix.task(2).count(), 0);
        assert!(
            !ix.blocks.contains_key(&(2, 64 / BLOCK_PAGES as u64)),
            "an empty block goes"
        );
        assert_eq!(ix.remove(1, 63 * P), Some(63 * P));
        assert_eq!(ix.task(1).count(), 4);
    }
}
