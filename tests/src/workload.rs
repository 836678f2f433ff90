//! The [`Workload`] guard: starts a workload program, talks to it through signals and
//! its log file, follows it through dump and restore, and kills and reaps it on drop.
//!
//! Protocol of every workload (see [`crate::wl`]): one `READY pid=N ...` line once set
//! up; on SIGUSR2 exactly one `PASS ...` or `FAIL ...` line. Stdout and stderr go to a
//! log file opened with `O_APPEND`, so a restored workload (which gets the same file
//! back) keeps appending to the same log.
//!
//! Life cycle of the PID: [`Workload::start`] spawns a child of ours; after a dump
//! that kills it, [`Workload::reap_killed`] reaps the original so the PID is free for
//! the restore; after `restore --detach`, [`Workload::adopt_restored`] takes the new
//! process with the same PID (reparented to us, the subreaper) under the guard.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::procs::{self, Waited};

/// How long [`Workload::start`] waits for `READY` by default (a 4 GiB fill in a debug
/// build takes a while).
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// How long [`Workload::verify`] waits for the `PASS`/`FAIL` line.
pub const VERIFY_TIMEOUT: Duration = Duration::from_secs(60);

/// Options of [`Workload::start_with`].
#[derive(Debug, Clone)]
pub struct Spawn {
    /// Run the workload in a new session (`setsid` before exec). Default true; false
    /// leaves it in our session and process group, like a job started from a shell.
    pub new_session: bool,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// How long to wait for the `READY` line.
    pub ready_timeout: Duration,
    /// Run as this user and group id instead of root.
    pub uid: Option<u32>,
}

impl Default for Spawn {
    fn default() -> Spawn {
        Spawn {
            new_session: true,
            env: Vec::new(),
            ready_timeout: READY_TIMEOUT,
            uid: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The process we spawned, our child.
    Child,
    /// Reaped; the PID is not ours any more.
    Gone,
    /// A restored process with our PID, expected to be our child after reparenting.
    Restored,
}

static LOG_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A running workload program. Dropping it SIGKILLs and reaps the process.
#[derive(Debug)]
pub struct Workload {
    name: String,
    exe: PathBuf,
    pid: i32,
    log: PathBuf,
    ready: String,
    state: State,
}

impl Workload {
    /// Starts `exe ARGS` in a new session, with its log in `dir`, and waits for
    /// `READY`. Panics (with the log) if it does not get ready.
    pub fn start(exe: &Path, args: &[&str], dir: &Path) -> Workload {
        Workload::start_with(exe, args, dir, Spawn::default())
    }

    /// [`Workload::start`] with options.
    pub fn start_with(exe: &Path, args: &[&str], dir: &Path, opts: Spawn) -> Workload {
        crate::init();
        let name = exe
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "workload".into());
        let n = LOG_COUNTER.fetch_add(1, Ordering::Relaxed);
        let log = dir.join(format!("{name}-{n}.log"));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
        let file2 = file.try_clone().expect("dup of log fd");
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(file2);
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        if let Some(id) = opts.uid {
            std::os::unix::process::CommandExt::uid(&mut cmd, id);
            std::os::unix::process::CommandExt::gid(&mut cmd, id);
        }
        let new_session = opts.new_session;
        // SAFETY: the closure runs in the forked child before exec and only makes
        // raw syscalls (setsid, close_range), which are async-signal-safe and allocate
        // nothing.
        unsafe {
            cmd.pre_exec(move || {
                if new_session && libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Fds the test process inherited (cargo's jobserver pipe, ...) must not
                // leak into the workload: the dump would see them. Mark them
                // close-on-exec rather than closing them, so that std's own exec-error
                // pipe keeps working.
                if libc::syscall(
                    libc::SYS_close_range,
                    3u32,
                    u32::MAX,
                    libc::CLOSE_RANGE_CLOEXEC,
                ) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", exe.display()));
        let pid = child.id() as i32;
        procs::own(pid);
        // The exit status is collected with waitpid(pid) by this guard, not by Child.
        drop(child);
        let mut wl = Workload {
            name,
            exe: exe.to_path_buf(),
            pid,
            log,
            ready: String::new(),
            state: State::Child,
        };
        match wl.wait_line(0, |l| l.starts_with("READY"), opts.ready_timeout) {
            Ok(line) => wl.ready = line,
            Err(e) => panic!("{} did not get ready: {e}", wl.name),
        }
        eprintln!("started {} (pid {}): {}", wl.name, wl.pid, wl.ready);
        wl
    }

    /// The workload's PID (the same after a restore).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The program name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The `READY ...` line.
    pub fn ready_line(&self) -> &str {
        &self.ready
    }

    /// The value of `key=value` in the READY line.
    pub fn ready_field(&self, key: &str) -> Option<&str> {
        field(&self.ready, key)
    }

    /// Path of the log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Sends `sig` to the workload.
    pub fn signal(&self, sig: i32) -> std::io::Result<()> {
        if self.state == State::Gone {
            return Err(std::io::Error::other("workload already reaped"));
        }
        procs::kill(self.pid, sig)
    }

    /// The whole log.
    pub fn log(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The complete lines of the log.
    pub fn log_lines(&self) -> Vec<String> {
        complete_lines(&self.log(), 0)
    }

    /// The last `n` lines of the log, for error messages.
    pub fn log_tail(&self, n: usize) -> String {
        let lines = self.log_lines();
        let start = lines.len().saturating_sub(n);
        let mut s = format!("--- last lines of {} ---", self.log.display());
        for l in &lines[start..] {
            s.push_str("\n  ");
            s.push_str(l);
        }
        s
    }

    /// Current log length: lines written after this mark are "new".
    pub fn mark(&self) -> usize {
        std::fs::metadata(&self.log)
            .map(|m| m.len() as usize)
            .unwrap_or(0)
    }

    /// Waits up to `timeout` for a complete line written after byte offset `from` that
    /// satisfies `pred`. Fails early if the process is gone.
    pub fn wait_line(
        &self,
        from: usize,
        pred: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            // Check liveness before reading, so a line written just before death is
            // still found.
            let alive = self.state != State::Gone && procs::alive(self.pid);
            if let Some(line) = complete_lines(&self.log(), from)
                .into_iter()
                .find(|l| pred(l))
            {
                return Ok(line);
            }
            if !alive {
                return Err(format!(
                    "{} (pid {}) is not running (state {:?})\n{}",
                    self.name,
                    self.pid,
                    procs::stat(self.pid).map(|s| s.state),
                    self.log_tail(20)
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "timed out after {:.1?} waiting for a line from {} (pid {})\n{}",
                    timeout,
                    self.name,
                    self.pid,
                    self.log_tail(20)
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGUSR2 and waits for the verdict: `Ok(PASS line)` or `Err(FAIL line, or
    /// why there is none, with the log tail)`.
    pub fn verify(&self) -> Result<String, String> {
        let mark = self.mark();
        self.signal(libc::SIGUSR2)
            .map_err(|e| format!("sending SIGUSR2 to {} (pid {}): {e}", self.name, self.pid))?;
        self.verdict_since(mark)
    }

    /// The first `PASS` or `FAIL` line written after byte offset `mark`
    /// (see [`Workload::mark`]), waiting for it: `Ok` for `PASS`, else the
    /// line and the log's tail. For a verification asked for by hand.
    pub fn verdict_since(&self, mark: usize) -> Result<String, String> {
        let line = self.wait_line(
            mark,
            |l| l.starts_with("PASS") || l.starts_with("FAIL"),
            VERIFY_TIMEOUT,
        )?;
        if line.starts_with("PASS") {
            Ok(line)
        } else {
            Err(format!("{}\n{}", line, self.log_tail(20)))
        }
    }

    /// [`Workload::verify`], panicking with `context` on anything but PASS.
    pub fn expect_pass(&self, context: &str) -> String {
        match self.verify() {
            Ok(line) => {
                eprintln!("{} {}: {line}", self.name, context);
                line
            }
            Err(e) => panic!("{} {context}: expected PASS, got: {e}", self.name),
        }
    }

    /// After a dump that kills the workload: waits up to `timeout` for the original
    /// process to die and reaps it, so that its PID is free for the restore. Returns
    /// a description of how it ended.
    pub fn reap_killed(&mut self, timeout: Duration) -> Result<String, String> {
        if self.state != State::Child {
            return Err(format!(
                "{} (pid {}) is not our original child",
                self.name, self.pid
            ));
        }
        match procs::wait_pid(self.pid, timeout) {
            Waited::Exited(status) => {
                self.state = State::Gone;
                procs::disown(self.pid);
                Ok(procs::describe_status(status))
            }
            Waited::NotChild => {
                self.state = State::Gone;
                procs::disown(self.pid);
                Err(format!(
                    "{} (pid {}) was reaped by someone else",
                    self.name, self.pid
                ))
            }
            Waited::Timeout => Err(format!(
                "{} (pid {}) still running {:.1?} after the dump (state {:?})",
                self.name,
                self.pid,
                timeout,
                procs::stat(self.pid).map(|s| s.state)
            )),
        }
    }

    /// After `restore --detach`: takes the restored process with our PID under this
    /// guard. Fails if no live process has the PID; returns its parent PID (the test
    /// process when reparenting worked).
    pub fn adopt_restored(&mut self) -> Result<i32, String> {
        let stat = procs::stat(self.pid)
            .filter(|s| s.state != 'Z' && s.state != 'X')
            .ok_or_else(|| format!("no live process with pid {} after restore", self.pid))?;
        self.state = State::Restored;
        procs::own(self.pid);
        Ok(stat.ppid)
    }

    /// Whether the process with our PID is (still) ours to kill: our child, or at
    /// least running our program.
    fn is_ours(&self) -> bool {
        match procs::stat(self.pid) {
            None => false,
            Some(s) => {
                s.ppid == procs::getpid()
                    || procs::exe(self.pid).is_some_and(|e| {
                        e == self.exe || std::fs::canonicalize(&self.exe).is_ok_and(|c| c == e)
                    })
            }
        }
    }

    /// SIGKILLs the process and reaps it (and any other unowned zombie child).
    /// Returns an error if it is still alive afterwards.
    pub fn kill_and_reap(&mut self) -> Result<(), String> {
        let result = match self.state {
            State::Gone => Ok(()),
            State::Child | State::Restored => {
                if self.is_ours() {
                    let _ = procs::kill(self.pid, libc::SIGKILL);
                }
                let gone = match procs::wait_pid(self.pid, Duration::from_secs(10)) {
                    Waited::Exited(_) => true,
                    // Not our child (a restore that did not reparent it to us yet):
                    // wait until it is dead; its parent reaps it.
                    Waited::NotChild | Waited::Timeout => {
                        procs::wait_gone(self.pid, Duration::from_secs(5))
                    }
                };
                if gone {
                    Ok(())
                } else {
                    Err(format!(
                        "{} (pid {}) still alive after SIGKILL: {:?}",
                        self.name,
                        self.pid,
                        procs::stat(self.pid)
                    ))
                }
            }
        };
        self.state = State::Gone;
        procs::disown(self.pid);
        procs::reap_zombies();
        result
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        if let Err(e) = self.kill_and_reap() {
            if std::thread::panicking() {
                eprintln!("LINGERING: {e}");
            } else {
                panic!("LINGERING: {e}");
            }
        }
    }
}

/// The value of `key=value` in a space-separated line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// Complete (newline-terminated) lines of `text` starting at byte offset `from`.
fn complete_lines(text: &str, from: usize) -> Vec<String> {
    let Some(tail) = text.get(from.min(text.len())..) else {
        return Vec::new();
    };
    let end = tail.rfind('\n').map(|i| i + 1).unwrap_or(0);
    tail[..end].lines().map(str::to_string).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_fields() {
        let text = "READY pid=5 mode=x\ncount 100\npartial";
        assert_eq!(
            complete_lines(text, 0),
            vec!["READY pid=5 mode=x", "count 100"]
        );
        assert_eq!(complete_lines(text, 19), vec!["count 100"]);
        assert_eq!(field("READY pid=5 mode=x", "pid"), Some("5"));
        assert_eq!(field("READY pid=5 mode=x", "mode"), Some("x"));
        assert_eq!(field("READY pid=5", "mo"), None);
    }
}
