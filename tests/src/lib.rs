//! Harness for the integration tests of cr-migrate, and support code for the
//! workload programs they checkpoint.
//!
//! The tests drive the real `cr-migrate` binary as a subprocess (DESIGN.md §6-7):
//! they start a workload ([`workload::Workload`]), dump it, restore it and ask it to
//! verify its own state. Everything a test starts lives below the test process, which
//! makes itself a child subreaper ([`init`]) so that restored processes (reparented when
//! `cr-migrate restore --detach` exits) and killed originals can be reaped: on the CI
//! VMs PID 1 never reaps orphans, and a zombie keeps the PID a restore needs.
//!
//! Modules:
//! - [`procs`]: subreaper, `/proc` queries, waiting and zombie reaping;
//! - [`crm`]: locating (building if needed) and running `cr-migrate` with a timeout;
//! - [`tmp`]: per-test temporary directories removed on drop;
//! - [`workload`]: the guard that starts, talks to and finally kills a workload;
//! - [`wl`]: the workload side of the line protocol (used by `src/bin/*`);
//! - [`tree`]: the guard of a process-tree workload (`wl_tree`);
//! - [`mailbox`]: a parent and child workload talking through shared memory;
//! - [`bg`]: background commands (a `receive` and a `send` running at once);
//! - [`netns`]: two network namespaces joined by a veth pair, removed on drop;
//! - [`sock`]: socket helpers for the socket workloads;
//! - [`port`]: a port free for both UDP and TCP (receive listens on both).

use std::sync::{Mutex, MutexGuard, Once};

pub mod bg;
pub mod crm;
pub mod mailbox;
pub mod netns;
pub mod port;
pub mod procs;
pub mod sock;
pub mod tmp;
pub mod tree;
pub mod wl;
pub mod workload;

pub use crm::{
    assert_success, crm_bin, dump_leave_running, path_str, run_crm, run_crm_timeout, stderr,
    workload_path,
};
pub use tmp::TempDir;
pub use workload::{Spawn, Workload};

static INIT: Once = Once::new();

/// Prepares the test process: makes it a child subreaper. Call first in every test.
///
/// Panics if the process cannot become a subreaper: without it restored processes
/// would be reparented to PID 1, which never reaps them on the CI VMs.
pub fn init() {
    INIT.call_once(|| {
        procs::become_subreaper().expect("prctl(PR_SET_CHILD_SUBREAPER)");
    });
}

static SERIAL: Mutex<()> = Mutex::new(());

/// Process-wide lock for tests that are heavy on memory or CPU (or that cycle
/// dump/restore): hold the returned guard for the whole test, declared before any
/// other guard so it is released last. A test that panicked while holding it does
/// not poison it for the others.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Reports a skipped test: prints `SKIPPED: <test>: <reason>` on stderr.
///
/// Only for a kernel or CPU that lacks something the test needs; the caller returns
/// right after (see [`skip_test!`]). The line is printed even when output is captured
/// by libtest, because it goes to the real stderr.
pub fn skip(test: &str, reason: &str) {
    use std::io::Write;
    // `io::stderr()` written directly is not captured by libtest (only the print
    // macros are), so the line shows even for a test that is reported as ok.
    let _ = std::io::stderr().write_all(format!("SKIPPED: {test}: {reason}\n").as_bytes());
}

/// Skips the current test with a reason: prints `SKIPPED: <test>: <reason>` and
/// returns from the enclosing function. The reason takes `format!` arguments.
#[macro_export]
macro_rules! skip_test {
    ($test:expr, $($reason:tt)+) => {{
        $crate::skip($test, &format!($($reason)+));
        return;
    }};
}

/// Path of a workload binary of this crate, for integration tests and benches of
/// `crm-tests`: `workload_bin!(wl_counter)`.
#[macro_export]
macro_rules! workload_bin {
    ($name:ident) => {
        ::std::path::Path::new(env!(concat!("CARGO_BIN_EXE_", stringify!($name))))
    };
}
