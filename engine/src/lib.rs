//! crm-engine: checkpoint and restore of Linux process trees on this machine.
//!
//! The engine knows nothing about networks. [`dump`] freezes a process tree with
//! ptrace, collects its state from `/proc`, ptrace and remote syscalls, and
//! writes an image directory; [`restore`] recreates the process from an image
//! with `clone3(set_tid)` and the position-independent restorer blob
//! (`engine/restorer/`).
//!
//! Where things live: `freeze` (seize/stop/resume), `ptrace` and `sys` (raw
//! syscall wrappers), `remote` (syscalls injected into a stopped thread),
//! `dump::memory` (VMAs and pages), `dump::task` (registers, signals, creds),
//! `files` (one module per fd kind), `image` (the on-disk format),
//! `restore::plan` / `child` / `tracer` (the three stages of a restore),
//! `tree` (the shape of a process tree: who creates whom, sessions, groups),
//! `dump::tree` and `restore::tree` (whole trees on each side).

pub mod dirty;
pub mod dump;
pub mod features;
pub mod files;
pub mod freeze;
pub mod image;
pub mod ipc;
pub mod mm_holder;
pub mod precopy;
pub mod precopy_tree;
pub mod procfs;
pub mod ptrace;
pub mod remote;
pub mod restore;
pub mod same_cpu;
pub mod sys;
pub mod tree;

/// `e` and its sources, joined with ": " (for one-line messages and logs).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
