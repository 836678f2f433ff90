//! A question/answer channel between a parent and a child workload through
//! one page of memory they share (a memfd or POSIX shm mapping), so that
//! their talk itself proves the memory is still shared after a restore.
//!
//! Layout of the page: request number (u64) at 0, answer number at 8,
//! answer length at 16, answer text from 64. The parent [`ask`]s (bumps the
//! request number and waits for the same answer number); the child polls
//! with [`serve`] and answers with the problems its check found.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const TEXT_AT: usize = 64;
const TEXT_MAX: usize = 4096 - TEXT_AT;

/// The shared page.
#[derive(Debug, Clone, Copy)]
pub struct Mailbox {
    page: *mut u8,
}

impl Mailbox {
    /// # Safety
    /// `page` must be a page-aligned shared mapping of at least 4096 bytes
    /// that stays mapped for the life of the process and that nothing else
    /// uses.
    pub unsafe fn new(page: *mut u8) -> Mailbox {
        Mailbox { page }
    }

    /// Parent side: see [`ask`].
    pub fn ask(&self, timeout: Duration) -> Result<Vec<String>, String> {
        ask(self, timeout)
    }

    /// Child side: see [`serve`].
    pub fn serve(&self, check: impl FnOnce() -> Vec<String>) {
        serve(self, check)
    }
}

fn word(m: &Mailbox, i: usize) -> &'static AtomicU64 {
    // SAFETY: `m.page` is a live, page-aligned shared mapping of at least
    // 4096 bytes for the life of the workload (`Mailbox::new`); the words
    // are 8-aligned and only ever accessed atomically by both processes.
    unsafe { &*(m.page.add(i * 8) as *const AtomicU64) }
}

/// Parent side: asks the child to check itself and returns its problems
/// (empty if it is fine), or an error if it did not answer within `timeout`.
fn ask(page: &Mailbox, timeout: Duration) -> Result<Vec<String>, String> {
    let n = word(page, 0).fetch_add(1, Ordering::SeqCst) + 1;
    let deadline = Instant::now() + timeout;
    while word(page, 1).load(Ordering::SeqCst) != n {
        if Instant::now() > deadline {
            return Err(format!(
                "the child did not answer request {n} within {timeout:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let len = (word(page, 2).load(Ordering::SeqCst) as usize).min(TEXT_MAX);
    // SAFETY: the text lies inside the shared page; the child wrote it
    // before publishing the answer number.
    let text = unsafe { std::slice::from_raw_parts(page.page.add(TEXT_AT), len) };
    let text = String::from_utf8_lossy(text).into_owned();
    Ok(if text.is_empty() {
        Vec::new()
    } else {
        text.split('\n').map(str::to_string).collect()
    })
}

/// Child side: if a new request is pending, runs `check` and answers it.
fn serve(page: &Mailbox, check: impl FnOnce() -> Vec<String>) {
    let n = word(page, 0).load(Ordering::SeqCst);
    if n == word(page, 1).load(Ordering::SeqCst) {
        return;
    }
    let text = check().join("\n");
    let bytes = &text.as_bytes()[..text.len().min(TEXT_MAX)];
    // SAFETY: inside the shared page; the parent reads it only after the
    // answer number below is published.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), page.page.add(TEXT_AT), bytes.len()) };
    word(page, 2).store(bytes.len() as u64, Ordering::SeqCst);
    word(page, 1).store(n, Ordering::SeqCst);
}
