//! What each task of a tree runs between its `clone3(set_tid)` and the
//! restorer blob (see `restore::tree` for the coordinator's side).
//!
//! 1. Block every signal, close the control descriptors that are not its
//!    own ([`super::control`]).
//! 2. `setsid()` if it leads a session, else `setpgid(0, 0)` if it leads a
//!    group; then create its children, each with its PID and exit signal,
//!    each running this same code; report `Created`.
//! 3. On `GO_GROUPS`: join its process group; report `Grouped`.
//! 4. A zombie, on `GO_EXIT`: exit with its saved status (its parent keeps
//!    it unreaped); a helper: exit. A live task, on `GO_RESTORE`: reap the
//!    helpers it created, discard the signals queued meanwhile (its
//!    children's exits), close the inherited shared files it does not
//!    use, then run its restore plan (`child::run_now`), which ends in
//!    the blob.
//!
//! Any failure is reported as a `Failed` event and ends the task; end of
//! file on the go pipe (the coordinator gave up) ends it silently.
use super::child;
use super::control::{self, Kind, GO_EXIT, GO_GROUPS, GO_RESTORE};
use super::tree::TreeCtx;
use crate::sys;
use crate::tree::Group;
use std::collections::BTreeSet;
use std::convert::Infallible;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Runs in task `i` of the tree (just created). Never returns.
pub(super) fn run(ctx: &TreeCtx, i: usize) -> ! {
    let pid = ctx.shape.tasks[i].pid;
    let what = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(ctx, i))) {
        Ok(Ok(never)) => match never {},
        Ok(Err(Quit::Failed(what))) => what,
        Ok(Err(Quit::Abort)) => sys::exit_now(1),
        Err(_) => "the restoring task panicked".to_string(),
    };
    control::send(ctx.event_w, pid, Kind::Failed, &what);
    sys::exit_now(1)
}

enum Quit {
    /// Report this and exit.
    Failed(String),
    /// The coordinator gave up: exit without a word.
    Abort,
}

fn failed(what: String) -> Quit {
    Quit::Failed(what)
}

fn close(fd: RawFd) {
    // SAFETY: closing a control descriptor or shared file number this task
    // inherited and does not use; the OwnedFd copies of them in this process's memory are
    // never dropped (the task ends with `_exit` or in the blob).
    unsafe { libc::close(fd) };
}

fn body(ctx: &TreeCtx, i: usize) -> Result<Infallible, Quit> {
    let t = &ctx.shape.tasks[i];
    let full = nix::sys::signal::SigSet::all();
    nix::sys::signal::sigprocmask(nix::sys::signal::SigmaskHow::SIG_SETMASK, Some(&full), None)
        .map_err(|e| failed(format!("block signals: {e}")))?;
    let mine: BTreeSet<usize> = ctx.shape.subtree(i).into_iter().collect();
    close(ctx.event_r);
    for (j, (&r, &w)) in ctx.go_r.iter().zip(&ctx.go_w).enumerate() {
        close(w);
        if !mine.contains(&j) {
            close(r);
        }
    }

    if ctx.preps[i]
        .as_ref()
        .is_some_and(|p| p.core.child_subreaper)
    {
        // Now, not only before the blob: children of a session helper
        // that exits come back to this task.
        // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer, no pointers.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(failed(format!("prctl(PR_SET_CHILD_SUBREAPER): {e}")));
        }
    }
    if t.new_session {
        nix::unistd::setsid().map_err(|e| failed(format!("setsid: {e}")))?;
        if let Some(prep) = &ctx.preps[i] {
            // Before the children: they inherit the controlling terminal.
            crate::files::tty::take_ctty(&prep.plan.fds, &prep.plan.objects)
                .map_err(|e| failed(crate::files::chain(&e)))?;
        }
    } else if t.group == Group::Lead {
        let me = nix::unistd::Pid::from_raw(0);
        nix::unistd::setpgid(me, me).map_err(|e| failed(format!("setpgid(0, 0): {e}")))?;
    }
    for &c in &t.children {
        let ct = &ctx.shape.tasks[c];
        match sys::clone3_with_pid_signal(ct.pid, ct.exit_signal) {
            Ok(0) => run(ctx, c),
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                return Err(failed(format!(
                    "cannot create child {}: the PID is in use (it appeared during the restore)",
                    ct.pid
                )))
            }
            Err(e) => return Err(failed(format!("clone3 of child {}: {e}", ct.pid))),
        }
    }
    for &j in mine.iter().filter(|&&j| j != i) {
        close(ctx.go_r[j]);
    }
    control::send(ctx.event_w, t.pid, Kind::Created, "");

    let go = ctx.go_r[i];
    if control::recv_command(go) != Some(GO_GROUPS) {
        return Err(Quit::Abort);
    }
    let target = match t.group {
        Group::Lead => None,
        Group::Join(pgid) => Some(pgid),
        Group::Restorer => Some(ctx.restorer_pgid),
    };
    if let Some(pgid) = target {
        if nix::unistd::getpgrp().as_raw() != pgid {
            nix::unistd::setpgid(
                nix::unistd::Pid::from_raw(0),
                nix::unistd::Pid::from_raw(pgid),
            )
            .map_err(|e| failed(format!("join process group {pgid}: {e}")))?;
        }
    }
    control::send(ctx.event_w, t.pid, Kind::Grouped, "");

    match (control::recv_command(go), t.zombie, &ctx.preps[i]) {
        (Some(GO_EXIT), Some(status), _) => exit_as(status),
        (Some(GO_EXIT), None, _) if t.helper => sys::exit_now(0),
        (Some(GO_RESTORE), None, Some(prep)) => {
            close(go);
            for &fd in &ctx.shared_fds {
                if !prep.plan.inherited.iter().any(|&(_, src)| src == fd) {
                    close(fd);
                }
            }
            reap_helpers(ctx, i)?;
            discard_pending_signals();
            // SAFETY: the event pipe's write end is open in this task and
            // nothing else here owns or closes it (see `close`).
            let err = unsafe { OwnedFd::from_raw_fd(ctx.event_w) };
            child::run_now(
                &prep.plan,
                &prep.pages,
                prep.pages.runs(),
                err,
                report_failure,
            )
        }
        _ => Err(Quit::Abort),
    }
}

/// Reaps the helpers task `i` created (they exit on `GO_EXIT`, sent
/// before `GO_RESTORE`).
fn reap_helpers(ctx: &TreeCtx, i: usize) -> Result<(), Quit> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for &c in &ctx.shape.tasks[i].children {
        let h = ctx.shape.tasks[c].pid;
        if !ctx.shape.tasks[c].helper {
            continue;
        }
        loop {
            let mut status = 0;
            // SAFETY: waitpid writes the status into a live local.
            let r = unsafe { libc::waitpid(h, &mut status, libc::WNOHANG | libc::__WALL) };
            if r == h {
                break;
            }
            if r < 0 {
                let e = std::io::Error::last_os_error();
                return Err(failed(format!("reap helper {h} of process group {h}: {e}")));
            }
            if std::time::Instant::now() > deadline {
                return Err(failed(format!(
                    "helper {h} of process group {h} did not exit"
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    Ok(())
}

/// `child::Report` for tree tasks: a `Failed` event.
fn report_failure(fd: RawFd, what: &str) {
    control::send(fd, std::process::id() as i32, Kind::Failed, what);
}

/// Dequeues every pending signal (all are blocked): the task must hold
/// only the ones its image lists, which the blob queues again.
fn discard_pending_signals() {
    let all = nix::sys::signal::SigSet::all();
    let zero = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    for _ in 0..256 {
        // SAFETY: sigtimedwait reads the set and the timeout, both live
        // locals; no siginfo is requested.
        let r = unsafe { libc::sigtimedwait(all.as_ref(), std::ptr::null_mut(), &zero) };
        if r <= 0 {
            break;
        }
    }
}

/// Ends the task with the raw wait status `status`: killed by its signal
/// (no core file) or exited with its code.
fn exit_as(status: i32) -> ! {
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        let no_core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: plain syscalls on this process: no core file, default
        // action for `sig`, then the signal itself, unblocked.
        unsafe {
            libc::setrlimit(libc::RLIMIT_CORE, &no_core);
            libc::signal(sig, libc::SIG_DFL);
            libc::kill(libc::getpid(), sig);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        }
        // A signal whose default action does not kill.
        sys::exit_now(128 + sig)
    }
    sys::exit_now(libc::WEXITSTATUS(status))
}
