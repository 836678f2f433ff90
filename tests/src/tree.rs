//! The guard of a process-tree workload (`wl_tree`): its root under a
//! [`Workload`] guard, the PIDs of its other tasks ("members") and zombies
//! from the `READY` line, a `/proc` view of how they are linked, and
//! cleanup: dropping a [`Tree`] kills every task and reaps until every PID
//! of the tree is free (the killed tasks come back to us, the subreaper),
//! complaining (`LINGERING`) if one is left.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::{procs, Spawn, Workload};

/// How long a killed tree may take to disappear.
pub const GONE_TIMEOUT: Duration = Duration::from_secs(15);

/// Parent, group, session and "zombie or not" of a task.
pub type Links = (i32, i32, i32, bool);

fn pids_field(wl: &Workload, key: &str) -> Vec<i32> {
    wl.ready_field(key)
        .unwrap_or("")
        .split(',')
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// A running tree workload. Dropping it kills every task and waits until all PIDs
/// are free.
pub struct Tree {
    pub wl: Workload,
    pub members: Vec<i32>,
    pub zombies: Vec<i32>,
}

impl Tree {
    /// Starts `exe ARGS` (a `wl_tree`) in `dir` and reads its tasks from `READY`.
    /// Panics like [`Workload::start_with`], after reaping the members of a root
    /// that failed its setup.
    pub fn start(exe: &Path, args: &[&str], dir: &Path, opts: Spawn) -> Tree {
        let start = || Workload::start_with(exe, args, dir, opts);
        let wl = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(start)) {
            Ok(wl) => wl,
            Err(panic) => {
                // The root failed its setup and was reaped by its guard; the
                // members it had made exit once they see it gone, orphaned
                // to us: reap them before failing.
                let until = Instant::now() + Duration::from_secs(2);
                while Instant::now() < until {
                    procs::reap_zombies();
                    std::thread::sleep(Duration::from_millis(20));
                }
                std::panic::resume_unwind(panic)
            }
        };
        let members = pids_field(&wl, "members");
        let zombies = pids_field(&wl, "zombies");
        eprintln!(
            "tree {args:?}: root {} members {members:?} zombies {zombies:?}",
            wl.pid()
        );
        Tree {
            wl,
            members,
            zombies,
        }
    }

    /// Root, members, zombies.
    pub fn all(&self) -> Vec<i32> {
        let mut v = vec![self.wl.pid()];
        v.extend(&self.members);
        v.extend(&self.zombies);
        v
    }

    /// `/proc` view of every task; a missing task is left out.
    pub fn links(&self) -> BTreeMap<i32, Links> {
        self.all()
            .into_iter()
            .filter_map(|p| {
                let s = procs::stat(p)?;
                Some((p, (s.ppid, s.pgrp, s.session, s.state == 'Z')))
            })
            .collect()
    }

    /// Reaps what comes back to us until no task of the tree has a PID any more.
    pub fn wait_all_gone(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            procs::reap_zombies();
            let left: Vec<(i32, procs::Stat)> = self
                .all()
                .into_iter()
                .filter_map(|p| procs::stat(p).map(|s| (p, s)))
                .collect();
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("tasks still there after {timeout:?}: {left:?}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// After a dump that killed the tree: the root reaped by its guard, the others
    /// (orphaned to us) reaped here, every PID free. Returns how the root ended.
    pub fn reap_dumped(&mut self) -> Result<String, String> {
        let how = self.wl.reap_killed(GONE_TIMEOUT)?;
        self.wait_all_gone(GONE_TIMEOUT)
            .map_err(|e| format!("root {how}, but {e}"))?;
        Ok(how)
    }

    /// `cr-migrate dump --pid ROOT --images-dir IMAGES` (killing the tree),
    /// asserted to succeed, then reaps what it killed: every PID is free
    /// afterwards. Not through `run_crm`, which reaps our zombie children
    /// after the command: here nothing but the dumper may reap the killed
    /// tasks. Returns the dump's output.
    pub fn dump_and_reap(&mut self, images: &Path) -> std::process::Output {
        let pid = self.wl.pid().to_string();
        let out = std::process::Command::new(crate::crm_bin())
            .args([
                "dump",
                "--pid",
                &pid,
                "--images-dir",
                crate::path_str(images),
            ])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("running cr-migrate dump");
        crate::assert_success(&out, "dump");
        self.reap_dumped()
            .unwrap_or_else(|e| panic!("after `cr-migrate dump`: {e}"));
        out
    }

    /// `cr-migrate restore --detach` of `images`, asserted to succeed, and
    /// the restored root taken under the guard. Returns the output.
    pub fn restore_detached(&mut self, images: &Path) -> std::process::Output {
        let out = crate::run_crm(&[
            "restore",
            "--images-dir",
            crate::path_str(images),
            "--detach",
        ]);
        let adopted = self.wl.adopt_restored();
        crate::assert_success(&out, "restore --detach");
        adopted.unwrap_or_else(|e| panic!("after `cr-migrate restore --detach`: {e}"));
        out
    }

    /// Kills every task and waits until every PID is free.
    pub fn kill_all(&mut self) -> Result<(), String> {
        for &p in self.members.iter().rev() {
            // Only a live task running our program: a PID may have been reused.
            let ours = procs::stat(p).is_some_and(|s| s.state != 'Z' && s.comm == self.wl.name());
            if ours {
                let _ = procs::kill(p, libc::SIGKILL);
            }
        }
        let root = self.wl.kill_and_reap();
        let rest = self.wait_all_gone(GONE_TIMEOUT);
        root.and(rest)
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        if let Err(e) = self.kill_all() {
            if std::thread::panicking() {
                eprintln!("LINGERING: {e}");
            } else {
                panic!("LINGERING: {e}");
            }
        }
    }
}
