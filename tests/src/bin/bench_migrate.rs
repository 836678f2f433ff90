//! `bench_migrate`: end-to-end benchmark of live migration over loopback (not a test).
//!
//! Usage: `bench_migrate [--size-mib 1024] [--rate-mbps 100] [--runs 1] [--dir DIR] [--recv-memory-mib N] [--page-transport auto|quic|sealed] [--case idle|busy] [--streams N]`
//! (as root; `--case` runs one case only). Build and run:
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-benchmig cargo build --release -p crm-tests -p crm-migrate
//! CRM_BIN=/work/target-benchmig/release/cr-migrate /work/target-benchmig/release/bench_migrate
//! ```
//!
//! Without `CRM_BIN` the `cr-migrate` next to this executable is used (built first if
//! it is missing or stale, see [`crm_tests::crm`]); the workloads `wl_memory` and
//! `wl_dirtier` are taken from next to this executable.
//!
//! What it measures, in this order:
//! 1. **Loopback bandwidth**, now: one TCP connection over 127.0.0.1 carries 2 GiB in
//!    1 MiB `write`s to a reader thread (3 times; the best is the reference). For
//!    comparison only, a child process of ours times `memcpy` between two 256 MiB
//!    buffers (in a child so that this process stays small, see below).
//! 2. **Idle case**: `wl_memory DIR SIZE` (SIZE MiB of patterned anonymous memory,
//!    nothing changes it) in its own session below this process, a child subreaper.
//!    `cr-migrate -v receive --listen 127.0.0.1:PORT` and then `cr-migrate -v send PID
//!    127.0.0.1:PORT --json --max-downtime-ms 50` run under `wait4` (wall time,
//!    `ru_maxrss`). Source and destination are the same host, so the source kills its
//!    copy before the restore (the PID must be free): this process reaps it at once
//!    (its pidfd wakes us). Once `send` exits 0 the restored workload, reparented to us,
//!    must answer SIGUSR2 with `PASS` (else the case fails). Reported: send's
//!    `total_ms` and the wall time of the send command, the tool's `downtime_ms`
//!    (source frozen → destination running), rounds, raw and wire bytes, peak RSS of
//!    send and receive. Targets: `total_ms ≤ 3 × SIZE / loopback bandwidth` and
//!    `downtime_ms ≤ 50`.
//! 3. **Busy case**: `wl_dirtier SIZE RATE` (rewrites RATE MiB of pages per second:
//!    `--rate-mbps` is passed on as is, in the workload's unit, MiB/s; on SIGUSR2
//!    prints `PASS pages=N rewritten=M max_gap_ms=G`, G being the longest stall the
//!    workload itself saw) migrated with `--max-downtime-ms 300`; also reported: the
//!    workload-perceived downtime G. Target: send converges (exits 0) with
//!    `downtime_ms ≤ 300`.
//!
//! Every line both `cr-migrate` processes log (`-v`: debug) is timestamped when it
//! arrives here (the tool logs no time of its own); after each case the merged
//! timeline of both sides and of this process's own events (original reaped, ...)
//! is printed, followed by the downtime split into phases: freeze and final round on
//! the source, image assembly, restore preflight, PID release and the restore itself
//! on the destination. Timestamps are arrival times, accurate to a millisecond or so.
//!
//! Peak RSS: `ru_maxrss` from `wait4`, which for `receive` also covers the
//! `cr-migrate restore` child it runs and reaps. A child's `ru_maxrss` also includes
//! the high-water RSS of the process that spawned it (recorded at `execve`), so this
//! process keeps itself small: 1 MiB buffers for the TCP test, `memcpy` in a child.
//! The destination's peak (`dest_peak_mib`) is sampled instead, every 2 ms: the
//! resident size of `receive` plus that of the restored workload, which `receive`
//! fills after the commit from the pages it holds.
//!
//! The final lines are machine-readable, one per case and run: `BENCH case=idle
//! size_mib=... loopback_gbps=... total_ms=... downtime_ms=... rounds=... wire_mib=...
//! send_rss_mib=... recv_rss_mib=... dest_peak_mib=...` and `BENCH case=busy ... workload_gap_ms=...`.
//!
//! Clean-up: every process started here (workloads, `cr-migrate`, restored
//! processes) is killed and reaped and the work directory `DIR/crm-benchmig-PID` (DIR
//! defaults to `/var/tmp`) removed, also on error, panic, SIGINT or SIGTERM.
//!
//! GB/s are 10^9 bytes per second, MiB 2^20 bytes. Exit status: 0 when
//! every case ran and its workload verified (even if a target is missed), 1 on any
//! failure, 2 on bad usage.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use crm_tests::procs;
use crm_tests::workload::field;
use crm_tests::{crm_bin, wl, workload_path, Spawn, Workload};

const MIB: usize = 1 << 20;
/// Bytes the TCP loopback test moves, and its write size.
const TCP_BYTES: usize = 2 << 30;
const TCP_WRITE: usize = MIB;
const TCP_REPS: usize = 3;
/// Buffers of the memcpy baseline (in a child process) and how much it copies.
const MEMCPY_BUF: usize = 256 * MIB;
const MEMCPY_BYTES: usize = 2 << 30;
/// Downtime budgets given to `send`, and the targets.
const IDLE_DOWNTIME_MS: f64 = 50.0;
const BUSY_DOWNTIME_MS: f64 = 300.0;
/// Target: total migration time at most this many times SIZE / loopback bandwidth.
const TOTAL_FACTOR: f64 = 3.0;
/// Longest a `send` may take; how long `receive` may take to get ready and to exit
/// after `send` did.
const SEND_TIMEOUT: Duration = Duration::from_secs(600);
const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);
const RECV_EXIT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a workload may take to fill its memory.
const READY_TIMEOUT: Duration = Duration::from_secs(300);

/// The log filter of both `cr-migrate` processes: what `-v` gives (debug), except
/// for the QUIC and TLS libraries, whose per-packet debug lines would drown the rest.
const RUST_LOG: &str = "debug,quinn=info,quinn_proto=info,quinn_udp=info,rustls=info";

type Res<T> = Result<T, String>;

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("--first-touch-probe") {
        return first_touch_probe();
    }
    if std::env::args().nth(1).as_deref() == Some("--memcpy-probe") {
        return memcpy_probe();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match parse_args(&args) {
        Ok(Some(a)) => a,
        Ok(None) => {
            println!("{}", usage());
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("bench_migrate: {e}\n{}", usage());
            return ExitCode::from(2);
        }
    };
    // A panic (the harness panics when a workload does not get ready) must not skip
    // the final sweep below.
    let result = std::panic::catch_unwind(|| run(&opts))
        .unwrap_or_else(|_| Err("panicked (see the message above)".into()));
    // Whatever happened: nothing we started may outlive us.
    sweep_children();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nbench_migrate: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage() -> &'static str {
    "usage: bench_migrate [--size-mib 1024] [--rate-mbps 100] [--runs 1] [--dir /var/tmp] [--recv-memory-mib N] [--page-transport auto|quic|sealed] [--case idle|busy] [--streams N]   (as root)"
}

/// Command line options.
#[derive(Debug, PartialEq)]
struct Opts {
    size_mib: usize,
    rate_mbps: u64,
    runs: usize,
    /// Where the work directory is created.
    dir: PathBuf,
    /// `receive --memory-limit-mib` (default: receive's own default).
    recv_memory_mib: Option<u64>,
    /// `send --page-transport` (default: send's own, auto).
    page_transport: Option<String>,
    /// The cases to run (default: both).
    cases: Vec<Case>,
    /// `send --streams` (default: send's own).
    streams: Option<u32>,
}

/// `Ok(None)` for `--help`.
fn parse_args(args: &[String]) -> Res<Option<Opts>> {
    let mut opts = Opts {
        size_mib: 1024,
        rate_mbps: 100,
        runs: 1,
        dir: PathBuf::from("/var/tmp"),
        recv_memory_mib: None,
        page_transport: None,
        cases: vec![Case::Idle, Case::Busy],
        streams: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (key, inline) = match a.split_once('=') {
            Some((k, v)) => (k, Some(v.to_string())),
            None => (a.as_str(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        fn positive<T: std::str::FromStr + PartialOrd + Default>(name: &str, v: &str) -> Res<T> {
            match v.parse::<T>() {
                Ok(n) if n > T::default() => Ok(n),
                _ => Err(format!("bad {name} {v:?} (a positive integer)")),
            }
        }
        match key {
            "-h" | "--help" => return Ok(None),
            "--size-mib" => opts.size_mib = positive("--size-mib", &value("--size-mib")?)?,
            "--rate-mbps" => opts.rate_mbps = positive("--rate-mbps", &value("--rate-mbps")?)?,
            "--runs" => opts.runs = positive("--runs", &value("--runs")?)?,
            "--dir" => opts.dir = PathBuf::from(value("--dir")?),
            "--recv-memory-mib" => {
                opts.recv_memory_mib =
                    Some(positive("--recv-memory-mib", &value("--recv-memory-mib")?)?)
            }
            "--page-transport" => match value("--page-transport")?.as_str() {
                t @ ("auto" | "quic" | "sealed") => opts.page_transport = Some(t.to_string()),
                t => return Err(format!("bad --page-transport {t:?} (auto, quic or sealed)")),
            },
            "--streams" => opts.streams = Some(positive("--streams", &value("--streams")?)?),
            "--case" => match value("--case")?.as_str() {
                "idle" => opts.cases = vec![Case::Idle],
                "busy" => opts.cases = vec![Case::Busy],
                c => return Err(format!("bad --case {c:?} (idle or busy)")),
            },
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Some(opts))
}

// ---------------------------------------------------------------------------------
// Interruption, work directory, leftovers
// ---------------------------------------------------------------------------------

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Whether SIGINT or SIGTERM arrived (latched).
fn interrupted() -> bool {
    if wl::take(libc::SIGINT) || wl::take(libc::SIGTERM) {
        INTERRUPTED.store(true, Ordering::SeqCst);
    }
    INTERRUPTED.load(Ordering::SeqCst)
}

fn check_interrupt() -> Res<()> {
    if interrupted() {
        Err("interrupted by a signal".into())
    } else {
        Ok(())
    }
}

/// A directory removed recursively on drop.
struct Dir(PathBuf);

impl Dir {
    fn create(path: PathBuf) -> Res<Dir> {
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).map_err(|e| format!("creating {}: {e}", path.display()))?;
        Ok(Dir(path))
    }

    fn sub(&self, name: &str) -> Res<Dir> {
        Dir::create(self.0.join(name))
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn str(&self) -> Res<&str> {
        self.0
            .to_str()
            .ok_or_else(|| format!("{} is not UTF-8", self.0.display()))
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("warning: removing {}: {e}", self.0.display());
            }
        }
    }
}

/// Kills and reaps every child of ours still there (restored processes that were
/// never adopted, a `cr-migrate restore` orphaned by a killed `receive`, ...).
/// Called when no guard owns a process any more. Returns how many it found.
fn sweep_children() -> usize {
    let me = procs::getpid();
    let kids: Vec<i32> = std::fs::read_dir("/proc")
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .filter(|&pid| matches!(procs::stat(pid), Some(s) if s.ppid == me))
                .collect()
        })
        .unwrap_or_default();
    for &pid in &kids {
        let st = procs::stat(pid);
        if st.as_ref().is_some_and(|s| s.state != 'Z') {
            eprintln!("LEFTOVER: killing child {pid} {st:?}");
        }
        if !procs::kill_and_reap(pid) {
            eprintln!("LINGERING: child {pid} still there: {:?}", procs::stat(pid));
        }
    }
    kids.len()
}

/// Now on CLOCK_MONOTONIC, in seconds (what `Instant` reads on Linux).
fn monotonic_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a PID and flags and returns a new descriptor or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as RawFd;
    if raw < 0 {
        return None;
    }
    // SAFETY: a fresh descriptor owned by nobody else.
    Some(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Waits up to `timeout` until one of `fds` is readable (a pidfd: the process ended).
fn poll_fds(fds: &[RawFd], timeout: Duration) {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
    if pfds.is_empty() {
        std::thread::sleep(timeout);
        return;
    }
    // SAFETY: `pfds` is a live array of `pfds.len()` pollfd structures.
    unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
}

// ---------------------------------------------------------------------------------
// Loopback and memcpy baselines
// ---------------------------------------------------------------------------------

fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64().max(1e-9) / 1e9
}

/// Moves [`TCP_BYTES`] over one TCP connection on 127.0.0.1 in [`TCP_WRITE`] writes;
/// the time from connect to the reader's EOF.
fn tcp_loopback() -> Res<Duration> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("TCP bind: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("TCP local_addr: {e}"))?;
    let reader = std::thread::spawn(move || -> Res<usize> {
        let (mut s, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        let mut buf = vec![0u8; TCP_WRITE];
        let mut total = 0;
        loop {
            match s.read(&mut buf) {
                Ok(0) => return Ok(total),
                Ok(n) => total += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    });
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).map_err(|e| format!("TCP connect: {e}"))?;
    let buf: Vec<u8> = (0..TCP_WRITE).map(|i| (i * 7 + 3) as u8).collect();
    let mut sent = 0;
    while sent < TCP_BYTES {
        s.write_all(&buf).map_err(|e| format!("TCP write: {e}"))?;
        sent += buf.len();
    }
    s.shutdown(std::net::Shutdown::Write)
        .map_err(|e| format!("TCP shutdown: {e}"))?;
    let got = reader
        .join()
        .map_err(|_| "the TCP reader thread panicked".to_string())??;
    let took = started.elapsed();
    if got != TCP_BYTES {
        return Err(format!("TCP reader got {got} bytes of {TCP_BYTES}"));
    }
    Ok(took)
}

/// `--memcpy-probe`: in a child process, copies [`MEMCPY_BYTES`] between two
/// [`MEMCPY_BUF`] buffers (touched first) and prints the GB/s.
fn memcpy_probe() -> ExitCode {
    let mut src = vec![0u8; MEMCPY_BUF];
    for (i, b) in src.iter_mut().enumerate() {
        *b = (i >> 12) as u8;
    }
    let mut dst = vec![1u8; MEMCPY_BUF];
    dst.copy_from_slice(&src);
    let started = Instant::now();
    let mut copied = 0;
    while copied < MEMCPY_BYTES {
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
        copied += MEMCPY_BUF;
    }
    println!("{:.3}", gbps(copied, started.elapsed()));
    ExitCode::SUCCESS
}

/// `--first-touch-probe MIB`: in a child process, maps MIB MiB of fresh
/// anonymous memory and writes one byte per page; prints the milliseconds.
/// Every page a migration carries lands in fresh memory at the destination
/// (its page store), so this is a floor for the transfer on this machine.
fn first_touch_probe() -> ExitCode {
    let mib: usize = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1024);
    let len = mib * MIB;
    let p = crm_tests::wl::map_anon(len);
    let started = Instant::now();
    for off in (0..len).step_by(4096) {
        // SAFETY: `p` maps `len` bytes, readable and writable.
        unsafe { p.add(off).write_volatile(1) };
    }
    println!("{:.3}", started.elapsed().as_secs_f64() * 1e3);
    ExitCode::SUCCESS
}

/// Runs [`first_touch_probe`] for `mib` MiB; the milliseconds it took.
fn first_touch_ms(mib: usize) -> Res<f64> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let out = Command::new(exe)
        .args(["--first-touch-probe", &mib.to_string()])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running the first-touch probe: {e}"))?;
    if !out.status.success() {
        return Err(format!("the first-touch probe failed: {}", out.status));
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|e| format!("first-touch probe output: {e}"))
}

fn memcpy_gbps() -> Res<f64> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let out = Command::new(exe)
        .arg("--memcpy-probe")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running the memcpy probe: {e}"))?;
    if !out.status.success() {
        return Err(format!("the memcpy probe failed: {}", out.status));
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|e| format!("memcpy probe output: {e}"))
}

// ---------------------------------------------------------------------------------
// cr-migrate processes, with timestamped log lines
// ---------------------------------------------------------------------------------

/// Log lines of a case: (time since the case started, who, text).
type Timeline = Arc<Mutex<Vec<(Duration, &'static str, String)>>>;

fn log_event(tl: &Timeline, t0: Instant, who: &'static str, text: String) {
    tl.lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((t0.elapsed(), who, text));
}

/// Removes ANSI escape sequences (in case the log is colored after all).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// How a process ended.
#[derive(Debug, Clone, Copy)]
struct Ended {
    status: i32,
    wall: Duration,
    maxrss_kib: i64,
}

impl Ended {
    fn ok(&self) -> bool {
        libc::WIFEXITED(self.status) && libc::WEXITSTATUS(self.status) == 0
    }

    fn rss_mib(&self) -> f64 {
        self.maxrss_kib as f64 / 1024.0
    }
}

/// A running `cr-migrate`: SIGKILLed and reaped on drop if it has not ended.
/// The destination's memory over time: every [`DEST_SAMPLE`] the resident
/// size of `receive` plus that of the restored workload (the workload's PID
/// once its start time is no longer the original's: a same-host migration
/// reuses the PID), keeping the largest sum. `ru_maxrss` cannot tell this:
/// the restored process is not `receive`'s child.
struct DestPeak {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

const DEST_SAMPLE: Duration = Duration::from_millis(2);

impl DestPeak {
    fn start(recv: i32, workload: i32) -> DestPeak {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let original = start_time(workload);
            let mut peak = 0;
            while !stopped.load(Ordering::Relaxed) {
                let restored = match (original, start_time(workload)) {
                    (Some(o), Some(now)) if now != o => rss_bytes(workload),
                    _ => 0,
                };
                peak = peak.max(rss_bytes(recv) + restored);
                std::thread::sleep(DEST_SAMPLE);
            }
            peak
        });
        DestPeak { stop, thread }
    }

    /// The largest sum seen, in MiB.
    fn finish(self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or(0) as f64 / MIB as f64
    }
}

/// Resident bytes of `pid` (0 if it is gone).
fn rss_bytes(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|t| t.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// Field 22 of `/proc/PID/stat`: when the process started.
fn start_time(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    text.get(text.rfind(')')? + 1..)?
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

struct Crm {
    who: &'static str,
    pid: i32,
    pidfd: Option<OwnedFd>,
    started: Instant,
    stdout: mpsc::Receiver<Vec<u8>>,
    stderr_done: mpsc::Receiver<()>,
    ended: Option<Ended>,
}

impl Crm {
    /// Starts `cr-migrate ARGS`; its stderr lines go to `tl` as they arrive.
    fn spawn(who: &'static str, args: &[&str], tl: &Timeline, t0: Instant) -> Res<Crm> {
        println!("  $ cr-migrate {}", args.join(" "));
        let started = Instant::now();
        let mut child = Command::new(crm_bin())
            .args(args)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", RUST_LOG)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", crm_bin().display()))?;
        let pid = child.id() as i32;
        procs::own(pid);
        log_event(tl, t0, "bench", format!("{who} started (pid {pid})"));
        let mut out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        // The exit status is collected with wait4 below, not by Child.
        drop(child);
        let (out_tx, stdout) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = out.read_to_end(&mut buf);
            let _ = out_tx.send(buf);
        });
        let (done_tx, stderr_done) = mpsc::channel();
        let tl = tl.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                log_event(&tl, t0, who, strip_ansi(&line));
            }
            let _ = done_tx.send(());
        });
        Ok(Crm {
            who,
            pid,
            pidfd: pidfd_open(pid),
            started,
            stdout,
            stderr_done,
            ended: None,
        })
    }

    /// The pidfd while the process has not been reaped.
    fn live_fd(&self) -> Option<RawFd> {
        if self.ended.is_some() {
            None
        } else {
            self.pidfd.as_ref().map(|f| f.as_raw_fd())
        }
    }

    /// Reaps the process if it ended (`wait4`, no blocking); whether it has ended.
    fn try_reap(&mut self) -> bool {
        if self.ended.is_some() {
            return true;
        }
        let mut status = 0;
        // SAFETY: all-zero is a valid rusage.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 writes the status and the rusage into live locals.
        let rc = unsafe { libc::wait4(self.pid, &mut status, libc::WNOHANG, &mut ru) };
        if rc == self.pid {
            self.ended = Some(Ended {
                status,
                wall: self.started.elapsed(),
                maxrss_kib: ru.ru_maxrss,
            });
            procs::disown(self.pid);
            true
        } else if rc < 0 && errno() != libc::EINTR {
            // Not our child any more: nothing to collect.
            self.ended = Some(Ended {
                status: -1,
                wall: self.started.elapsed(),
                maxrss_kib: 0,
            });
            procs::disown(self.pid);
            true
        } else {
            false
        }
    }

    /// The whole stdout (after the process ended); also waits briefly for the last
    /// stderr lines.
    fn output(&self) -> String {
        let grace = Duration::from_secs(5);
        let _ = self.stderr_done.recv_timeout(grace);
        self.stdout
            .recv_timeout(grace)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    fn kill(&mut self) {
        if self.try_reap() {
            return;
        }
        let _ = procs::kill(self.pid, libc::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.try_reap() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if self.ended.is_none() {
            eprintln!(
                "LINGERING: cr-migrate {} (pid {}) survived SIGKILL",
                self.who, self.pid
            );
            procs::disown(self.pid);
        }
    }
}

impl Drop for Crm {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------
// The JSON summary of `send --json`
// ---------------------------------------------------------------------------------

/// The raw token of the scalar member `key` of the JSON text `obj` (flat objects;
/// strings returned without quotes).
fn json_scalar<'a>(obj: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("\"{key}\":");
    let rest = obj[obj.find(&pat)? + pat.len()..].trim_start();
    if let Some(s) = rest.strip_prefix('"') {
        return s.find('"').map(|e| &s[..e]);
    }
    let end = rest.find([',', '}', ']']).unwrap_or(rest.len());
    Some(rest[..end].trim())
}

fn json_num(obj: &str, key: &str) -> Res<f64> {
    json_scalar(obj, key)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no number {key:?} in send's JSON: {obj}"))
}

/// The objects of the array member `key` (objects without nested objects).
fn json_objects<'a>(obj: &'a str, key: &str) -> Vec<&'a str> {
    let pat = format!("\"{key}\":[");
    let Some(start) = obj.find(&pat).map(|i| i + pat.len()) else {
        return Vec::new();
    };
    let Some(len) = obj[start..].find(']') else {
        return Vec::new();
    };
    let mut v = Vec::new();
    let mut rest = &obj[start..start + len];
    while let (Some(a), Some(b)) = (rest.find('{'), rest.find('}')) {
        if b < a {
            break;
        }
        v.push(&rest[a..=b]);
        rest = &rest[b + 1..];
    }
    v
}

#[derive(Debug, Default)]
struct Round {
    round: u64,
    dirty_pages: u64,
    pages_sent: u64,
    zero_pages: u64,
    bytes_sent: u64,
    ms: f64,
}

#[derive(Debug, Default)]
struct Summary {
    tracker: String,
    stop_reason: String,
    rounds: Vec<Round>,
    raw_bytes: u64,
    wire_bytes: u64,
    compression_ratio: f64,
    batches: u64,
    compressed_batches: u64,
    total_ms: f64,
    downtime_ms: f64,
}

fn parse_summary(out: &str) -> Res<Summary> {
    let json = out
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| format!("no JSON object in send's stdout: {out:?}"))?;
    let mut rounds = Vec::new();
    for r in json_objects(json, "rounds") {
        rounds.push(Round {
            round: json_num(r, "round")? as u64,
            dirty_pages: json_num(r, "dirty_pages")? as u64,
            pages_sent: json_num(r, "pages_sent")? as u64,
            zero_pages: json_num(r, "zero_pages")? as u64,
            bytes_sent: json_num(r, "bytes_sent")? as u64,
            ms: json_num(r, "ms")?,
        });
    }
    Ok(Summary {
        tracker: json_scalar(json, "tracker").unwrap_or("?").to_string(),
        stop_reason: json_scalar(json, "stop_reason").unwrap_or("?").to_string(),
        rounds,
        raw_bytes: json_num(json, "raw_bytes")? as u64,
        wire_bytes: json_num(json, "wire_bytes")? as u64,
        compression_ratio: json_num(json, "compression_ratio")?,
        batches: json_num(json, "batches")? as u64,
        compressed_batches: json_num(json, "compressed_batches")? as u64,
        total_ms: json_num(json, "total_ms")?,
        downtime_ms: json_num(json, "downtime_ms")?,
    })
}

// ---------------------------------------------------------------------------------
// One migration
// ---------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Case {
    Idle,
    Busy,
}

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::Idle => "idle",
            Case::Busy => "busy",
        }
    }

    fn budget_ms(self) -> f64 {
        match self {
            Case::Idle => IDLE_DOWNTIME_MS,
            Case::Busy => BUSY_DOWNTIME_MS,
        }
    }
}

/// Figures of one migration.
struct Outcome {
    summary: Summary,
    send: Ended,
    recv: Ended,
    /// Largest resident size of `receive` plus the restored workload.
    dest_peak_mib: f64,
    /// `max_gap_ms` of the workload's PASS line (busy case).
    workload_gap_ms: Option<f64>,
}

fn ok_miss(ok: bool) -> &'static str {
    if ok {
        "OK"
    } else {
        "MISS"
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / MIB as f64
}

/// A free UDP port on 127.0.0.1 (bound and released; `receive` binds it right after).
/// A port free for UDP (QUIC) and TCP (page channels).
fn free_port() -> Res<u16> {
    crm_tests::port::free_port().map_err(|e| format!("finding a free port: {e}"))
}

/// Migrates one workload over 127.0.0.1 and verifies it afterwards.
fn migrate_once(case: Case, opts: &Opts, work: &Dir, run: usize) -> Res<Outcome> {
    let case_dir = work.sub(&format!("{}-{run}", case.name()))?;
    let files = case_dir.sub("files")?;
    let state = case_dir.sub("state")?;
    let incoming = case_dir.sub("incoming")?;
    let token = case_dir.path().join("token");
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&token)
        .and_then(|mut f| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            writeln!(f, "bench-migrate-{}-{run}-{nanos}", std::process::id())
        })
        .map_err(|e| format!("writing {}: {e}", token.display()))?;
    let token_s = token.to_str().ok_or("work dir is not UTF-8")?;

    let size = opts.size_mib.to_string();
    let rate = opts.rate_mbps.to_string();
    let (exe, args): (PathBuf, Vec<&str>) = match case {
        Case::Idle => (workload_path("wl_memory"), vec![files.str()?, &size]),
        Case::Busy => (workload_path("wl_dirtier"), vec![&size, &rate]),
    };
    if !exe.is_file() {
        return Err(format!(
            "{} not found: build it with `cargo build --release -p crm-tests`",
            exe.display()
        ));
    }
    check_interrupt()?;
    let mut wl = Workload::start_with(
        &exe,
        &args,
        case_dir.path(),
        Spawn {
            new_session: true,
            ready_timeout: READY_TIMEOUT,
            ..Spawn::default()
        },
    );
    let pid = wl.pid();
    match procs::stat(pid) {
        Some(s) if s.session == pid => {}
        other => {
            return Err(format!(
                "{} {pid} is not a session leader: {other:?}",
                wl.name()
            ))
        }
    }
    // Its pidfd wakes us the moment the source kills it, so its PID is free at once.
    let wl_fd = pidfd_open(pid).ok_or_else(|| format!("pidfd_open({pid}) failed"))?;
    if case == Case::Busy {
        // Let the dirtier reach its steady rate before the migration starts.
        std::thread::sleep(Duration::from_millis(500));
    }
    check_interrupt()?;

    let tl: Timeline = Arc::new(Mutex::new(Vec::new()));
    let t0 = Instant::now();
    println!(
        "  t0 (receive started) = {:.6} s on CLOCK_MONOTONIC (the clock of `perf record -k CLOCK_MONOTONIC`)",
        monotonic_secs()
    );
    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    // receive's own default (half the RAM) unless the bench was told otherwise.
    let recv_memory = opts.recv_memory_mib.map(|m| m.to_string());
    let mut recv_args = vec![
        "-v",
        "receive",
        "--listen",
        &listen,
        "--token-file",
        token_s,
        "--state-dir",
        state.str()?,
        "--work-dir",
        incoming.str()?,
    ];
    if let Some(m) = &recv_memory {
        recv_args.extend(["--memory-limit-mib", m]);
    }
    let mut recv = Crm::spawn("recv", &recv_args, &tl, t0)?;
    let dest_peak = DestPeak::start(recv.pid, pid);
    // Wait for it to listen.
    let deadline = Instant::now() + LISTEN_TIMEOUT;
    loop {
        let listening = tl
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|(_, who, l)| *who == "recv" && l.contains("listening on"));
        if listening {
            break;
        }
        if recv.try_reap() {
            let _ = recv.output();
            return Err(format!(
                "cr-migrate receive exited before listening ({}):\n{}",
                procs::describe_status(recv.ended.map_or(-1, |e| e.status)),
                render_timeline(&tl)
            ));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "cr-migrate receive not listening after {LISTEN_TIMEOUT:?}:\n{}",
                render_timeline(&tl)
            ));
        }
        check_interrupt()?;
        std::thread::sleep(Duration::from_millis(5));
    }

    let pid_s = pid.to_string();
    let budget = format!("{}", case.budget_ms());
    let mut send_args = vec![
        "-v",
        "send",
        &pid_s,
        &listen,
        "--token-file",
        token_s,
        "--json",
        "--max-downtime-ms",
        &budget,
    ];
    if let Some(t) = &opts.page_transport {
        send_args.extend(["--page-transport", t]);
    }
    let streams = opts.streams.map(|n| n.to_string());
    if let Some(n) = &streams {
        send_args.extend(["--streams", n]);
    }
    let mut send = Crm::spawn("send", &send_args, &tl, t0)?;

    // Until send and receive have ended: reap the original as soon as the source
    // kills it (a zombie keeps the PID the restore needs), and collect both.
    let mut original_reaped = false;
    let deadline = Instant::now() + SEND_TIMEOUT;
    let mut send_ended_at: Option<Instant> = None;
    loop {
        if !original_reaped {
            let mut pfd = libc::pollfd {
                fd: wl_fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one live pollfd; timeout 0 never blocks.
            let ready = unsafe { libc::poll(&mut pfd, 1, 0) } > 0;
            if ready {
                match wl.reap_killed(Duration::from_secs(1)) {
                    Ok(how) => {
                        original_reaped = true;
                        log_event(&tl, t0, "bench", format!("original {pid} reaped ({how})"));
                    }
                    Err(e) => return Err(format!("reaping the original workload: {e}")),
                }
            }
        }
        if send.try_reap() && send_ended_at.is_none() {
            send_ended_at = Some(Instant::now());
            log_event(&tl, t0, "bench", "send exited".into());
        }
        let recv_was = recv.ended.is_some();
        if recv.try_reap() && !recv_was {
            log_event(&tl, t0, "bench", "receive exited".into());
        }
        if send.ended.is_some() && recv.ended.is_some() {
            break;
        }
        if let Some(at) = send_ended_at {
            if at.elapsed() > RECV_EXIT_TIMEOUT {
                log_event(&tl, t0, "bench", "receive still running: killed".into());
                recv.kill();
                break;
            }
        }
        if Instant::now() > deadline {
            log_event(&tl, t0, "bench", format!("timeout after {SEND_TIMEOUT:?}"));
            send.kill();
            recv.kill();
            break;
        }
        if interrupted() {
            send.kill();
            recv.kill();
            break;
        }
        let mut fds: Vec<RawFd> = [send.live_fd(), recv.live_fd()]
            .into_iter()
            .flatten()
            .collect();
        if !original_reaped {
            fds.push(wl_fd.as_raw_fd());
        }
        poll_fds(&fds, Duration::from_millis(100));
    }
    let send_out = send.output();
    let _ = recv.output();
    let dest_peak_mib = dest_peak.finish();
    // A restored process (ours after reparenting) goes under the guard whatever the
    // exit statuses say, so that it is killed at the end.
    let adopted = if original_reaped {
        Some(wl.adopt_restored())
    } else {
        None
    };
    let timeline = render_timeline(&tl);
    println!("  timeline (ms since receive was started; arrival times of log lines):");
    print!("{timeline}");
    check_interrupt()?;
    let send_end = send.ended.expect("send ended or was killed");
    let recv_end = recv.ended.expect("receive ended or was killed");
    println!(
        "  send: {} in {:.0} ms, peak RSS {:.1} MiB; receive: {} in {:.0} ms, peak RSS {:.1} MiB",
        procs::describe_status(send_end.status),
        send_end.wall.as_secs_f64() * 1e3,
        send_end.rss_mib(),
        procs::describe_status(recv_end.status),
        recv_end.wall.as_secs_f64() * 1e3,
        recv_end.rss_mib()
    );
    if !send_end.ok() {
        return Err(format!(
            "cr-migrate send failed ({}); stdout: {send_out:?}",
            procs::describe_status(send_end.status)
        ));
    }
    if !recv_end.ok() {
        return Err(format!(
            "cr-migrate receive failed ({})",
            procs::describe_status(recv_end.status)
        ));
    }
    let summary = parse_summary(&send_out)?;
    match adopted {
        Some(Ok(ppid)) if ppid != procs::getpid() => {
            println!("  note: restored pid {pid} has parent {ppid}, not us")
        }
        Some(Ok(_)) => {}
        Some(Err(e)) => return Err(format!("after the migration: {e}")),
        None => {
            return Err(format!(
                "send succeeded but the original {pid} was never killed and reaped"
            ))
        }
    }
    let pass = wl
        .verify()
        .map_err(|e| format!("the migrated {} did not verify: {e}", wl.name()))?;
    println!("  restored {} {pid}: {pass}", wl.name());
    let workload_gap_ms = match case {
        Case::Idle => None,
        Case::Busy => Some(
            field(&pass, "max_gap_ms")
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("no max_gap_ms=N in {pass:?}"))?,
        ),
    };
    wl.kill_and_reap()?;
    print_phases(&tl, &summary);
    Ok(Outcome {
        summary,
        send: send_end,
        recv: recv_end,
        dest_peak_mib,
        workload_gap_ms,
    })
}

fn render_timeline(tl: &Timeline) -> String {
    let mut lines = tl.lock().unwrap_or_else(|p| p.into_inner()).clone();
    lines.sort_by_key(|(t, ..)| *t);
    let mut s = String::new();
    for (t, who, l) in lines {
        s.push_str(&format!(
            "    {:>9.1} {who:<5} | {l}\n",
            t.as_secs_f64() * 1e3
        ));
    }
    s
}

/// Time of the last line of `who` containing `pat` (or the first, if `first`).
fn find_line(
    lines: &[(Duration, &'static str, String)],
    who: &str,
    pat: &str,
    first: bool,
) -> Option<Duration> {
    let mut it = lines
        .iter()
        .filter(|(_, w, l)| *w == who && l.contains(pat))
        .map(|(t, ..)| *t);
    if first {
        it.next()
    } else {
        it.next_back()
    }
}

/// The migration split into phases by the log lines: each mark with the time since
/// the previous one (marks sorted by time).
fn print_phases(tl: &Timeline, summary: &Summary) {
    let mut lines = tl.lock().unwrap_or_else(|p| p.into_inner()).clone();
    lines.sort_by_key(|(t, ..)| *t);
    let last_round = summary.rounds.last().map_or(0, |r| r.round);
    // (label, who, pattern, first occurrence)
    let mut marks: Vec<(String, &str, String, bool)> = vec![
        ("send started".into(), "bench", "send started".into(), true),
        (
            "connected, authenticated".into(),
            "recv",
            "authenticated".into(),
            true,
        ),
        (
            "pre-copy armed".into(),
            "send",
            "pre-copy armed".into(),
            true,
        ),
    ];
    for r in &summary.rounds {
        let label = if r.round == last_round {
            format!("final round {} sent (source frozen)", r.round)
        } else {
            format!("round {} sent", r.round)
        };
        marks.push((label, "send", format!("round {}: ", r.round), true));
    }
    marks.extend([
        (
            "source frozen (downtime starts)".to_string(),
            "send",
            "process frozen".to_string(),
            false,
        ),
        (
            "final round announced at dest".into(),
            "recv",
            format!("round {last_round}: "),
            true,
        ),
        ("image written".into(), "recv", "written in".into(), true),
        (
            "preflight passed".into(),
            "recv",
            "preflight passed".into(),
            true,
        ),
        (
            "source asked to release the PID".into(),
            "send",
            "releasing PID".into(),
            true,
        ),
        (
            "original killed and reaped".into(),
            "bench",
            " reaped (".into(),
            true,
        ),
        (
            "PIDs free at dest".into(),
            "recv",
            "PIDs free after".into(),
            true,
        ),
        (
            "restored and running (downtime ends)".into(),
            "recv",
            "restored and running".into(),
            true,
        ),
        ("committed".into(), "recv", "committed".into(), true),
        (
            "receive exited".into(),
            "bench",
            "receive exited".into(),
            true,
        ),
        ("send exited".into(), "bench", "send exited".into(), true),
    ]);
    let mut found: Vec<(Duration, String)> = Vec::new();
    let mut missing = Vec::new();
    for (label, who, pat, first) in marks {
        match find_line(&lines, who, &pat, first) {
            Some(t) => found.push((t, label)),
            None => missing.push(label),
        }
    }
    found.sort_by_key(|(t, _)| *t);
    println!("  phases (ms since receive was started; delta = since the previous mark):");
    let mut prev: Option<Duration> = None;
    for (t, label) in &found {
        let delta = prev.map_or(String::new(), |p| {
            format!("{:+.1} ms", (t.as_secs_f64() - p.as_secs_f64()) * 1e3)
        });
        println!("    {:>9.1}  {delta:>12}  {label}", t.as_secs_f64() * 1e3);
        prev = Some(*t);
    }
    if !missing.is_empty() {
        println!("    (no log line for: {})", missing.join(", "));
    }
    // The tool's own measurements of the destination's phases.
    for pat in [
        "written in",
        "to fill lazily",
        "preflight passed",
        "PIDs free after",
        "restored and running",
    ] {
        if let Some((_, _, l)) = lines
            .iter()
            .find(|(_, w, l)| *w == "recv" && l.contains(pat))
        {
            println!("    recv says: {}", l.trim());
        }
    }
}

// ---------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------

struct CaseResult {
    case: Case,
    run: usize,
    result: Res<Outcome>,
}

fn run(opts: &Opts) -> Res<()> {
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("needs root (ptrace of other processes, clone3 with set_tid)".into());
    }
    crm_tests::init();
    if !procs::is_subreaper() {
        return Err("could not become a child subreaper".into());
    }
    wl::catch(libc::SIGINT);
    wl::catch(libc::SIGTERM);
    let bin = crm_bin();
    let work = Dir::create(
        opts.dir
            .join(format!("crm-benchmig-{}", std::process::id())),
    )?;
    println!("bench_migrate: cr-migrate = {}", bin.display());
    println!("               work dir   = {}", work.path().display());
    println!(
        "               size {} MiB, busy rate {} MiB/s, {} run(s); kernel {}, {} CPUs, THP {}",
        opts.size_mib,
        opts.rate_mbps,
        opts.runs,
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_else(|_| "?".into())
            .trim()
    );
    println!(
        "               load average {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );

    println!("\n== loopback bandwidth ==");
    let mut tcp = Vec::new();
    for _ in 0..TCP_REPS {
        check_interrupt()?;
        tcp.push(gbps(TCP_BYTES, tcp_loopback()?));
    }
    let loopback = tcp.iter().copied().fold(0.0, f64::max);
    let runs_s: Vec<String> = tcp.iter().map(|g| format!("{g:.2}")).collect();
    println!(
        "  TCP over 127.0.0.1, {} GiB in {} MiB writes to a reader thread: {loopback:.2} GB/s \
         (best of {TCP_REPS}: {} GB/s)",
        TCP_BYTES >> 30,
        TCP_WRITE / MIB,
        runs_s.join(", ")
    );
    match memcpy_gbps() {
        Ok(g) => println!(
            "  memcpy between two {} MiB buffers (child process), for comparison: {g:.2} GB/s",
            MEMCPY_BUF / MIB
        ),
        Err(e) => println!("  memcpy baseline: {e}"),
    }
    match first_touch_ms(opts.size_mib) {
        Ok(ms) => println!(
            "  first write to {} MiB of fresh anonymous memory (child process): {ms:.0} ms \
             ({:.2} GB/s): every page lands in fresh memory at the destination, so a \
             migration cannot move pages faster on this machine",
            opts.size_mib,
            (opts.size_mib * MIB) as f64 / (ms * 1e-3) / 1e9
        ),
        Err(e) => println!("  first-touch baseline: {e}"),
    }
    let size_bytes = opts.size_mib * MIB;
    let total_limit_ms = TOTAL_FACTOR * size_bytes as f64 / (loopback * 1e9) * 1e3;
    println!(
        "  => idle target: total <= {TOTAL_FACTOR} x {} MiB / {loopback:.2} GB/s = {total_limit_ms:.0} ms, \
         downtime <= {IDLE_DOWNTIME_MS} ms; busy target: converges, downtime <= {BUSY_DOWNTIME_MS} ms",
        opts.size_mib
    );

    let mut results = Vec::new();
    for run in 1..=opts.runs {
        for &case in &opts.cases {
            check_interrupt()?;
            let what = match case {
                Case::Idle => format!("wl_memory {} MiB", opts.size_mib),
                Case::Busy => format!(
                    "wl_dirtier {} MiB at {} MiB/s",
                    opts.size_mib, opts.rate_mbps
                ),
            };
            println!(
                "\n== {} case: {what}, run {run}/{} ==",
                case.name(),
                opts.runs
            );
            let result = migrate_once(case, opts, &work, run);
            // Anything the case left behind goes now, before the next one.
            let left = sweep_children();
            if left > 0 {
                println!("  ({left} leftover child process(es) reaped)");
            }
            match &result {
                Ok(o) => print_outcome(case, o, total_limit_ms),
                Err(e) => println!("  FAILED: {e}"),
            }
            results.push(CaseResult { case, run, result });
            check_interrupt()?;
        }
    }

    println!();
    let mut failed = Vec::new();
    for r in &results {
        match &r.result {
            Ok(o) => println!("{}", bench_line(r, o, opts, loopback, total_limit_ms)),
            Err(e) => {
                println!(
                    "BENCH case={} run={} size_mib={} status=failed",
                    r.case.name(),
                    r.run,
                    opts.size_mib
                );
                failed.push(format!("{} run {}: {e}", r.case.name(), r.run));
            }
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("\n"))
    }
}

fn print_outcome(case: Case, o: &Outcome, total_limit_ms: f64) {
    let s = &o.summary;
    println!(
        "  dirty tracking {}, pre-copy stopped: {}",
        s.tracker, s.stop_reason
    );
    for r in &s.rounds {
        println!(
            "    round {:>2}: {:>7} pages sent ({:>7.1} MiB), {:>7} zero, {:>7} dirty, {:>8.1} ms, {:>7.1} MiB/s",
            r.round,
            r.pages_sent,
            mib(r.bytes_sent),
            r.zero_pages,
            r.dirty_pages,
            r.ms,
            if r.ms > 0.0 { mib(r.bytes_sent) / (r.ms / 1e3) } else { 0.0 }
        );
    }
    println!(
        "  bytes: raw {:.1} MiB, wire {:.1} MiB (ratio {:.2}, {} of {} batches compressed)",
        mib(s.raw_bytes),
        mib(s.wire_bytes),
        s.compression_ratio,
        s.compressed_batches,
        s.batches
    );
    println!(
        "  peak RSS: send {:.1} MiB, receive {:.1} MiB (incl. its restore child); \
         destination (receive + restored process, sampled every {} ms) {:.1} MiB",
        o.send.rss_mib(),
        o.recv.rss_mib(),
        DEST_SAMPLE.as_millis(),
        o.dest_peak_mib
    );
    let wall_ms = o.send.wall.as_secs_f64() * 1e3;
    match case {
        Case::Idle => {
            println!(
                "  total: {:.0} ms (send's total_ms; wall time of send {wall_ms:.0} ms), target <= {total_limit_ms:.0} ms: {} (wall: {})",
                s.total_ms,
                ok_miss(s.total_ms <= total_limit_ms),
                ok_miss(wall_ms <= total_limit_ms)
            );
            println!(
                "  downtime: {:.1} ms (tool), target <= {IDLE_DOWNTIME_MS} ms: {}",
                s.downtime_ms,
                ok_miss(s.downtime_ms <= IDLE_DOWNTIME_MS)
            );
        }
        Case::Busy => {
            println!(
                "  total: {:.0} ms (send's total_ms; wall time of send {wall_ms:.0} ms); converged: OK (send exited 0)",
                s.total_ms
            );
            println!(
                "  downtime: {:.1} ms (tool), {:.1} ms (perceived by the workload), target <= {BUSY_DOWNTIME_MS} ms: {} (workload: {})",
                s.downtime_ms,
                o.workload_gap_ms.unwrap_or(f64::NAN),
                ok_miss(s.downtime_ms <= BUSY_DOWNTIME_MS),
                ok_miss(o.workload_gap_ms.is_some_and(|g| g <= BUSY_DOWNTIME_MS))
            );
        }
    }
}

fn bench_line(r: &CaseResult, o: &Outcome, opts: &Opts, loopback: f64, limit_ms: f64) -> String {
    let s = &o.summary;
    let mut line = format!(
        "BENCH case={} size_mib={} loopback_gbps={loopback:.2} total_ms={:.0} downtime_ms={:.1} \
         rounds={} wire_mib={:.1} send_rss_mib={:.1} recv_rss_mib={:.1} dest_peak_mib={:.1} \
         raw_mib={:.1} wall_ms={:.0} stop=\"{}\" run={}",
        r.case.name(),
        opts.size_mib,
        s.total_ms,
        s.downtime_ms,
        s.rounds.len(),
        mib(s.wire_bytes),
        o.send.rss_mib(),
        o.recv.rss_mib(),
        o.dest_peak_mib,
        mib(s.raw_bytes),
        o.send.wall.as_secs_f64() * 1e3,
        s.stop_reason,
        r.run
    );
    match r.case {
        Case::Idle => line.push_str(&format!(
            " total_target_ms={limit_ms:.0} total={} downtime={}",
            ok_miss(s.total_ms <= limit_ms),
            ok_miss(s.downtime_ms <= IDLE_DOWNTIME_MS)
        )),
        Case::Busy => line.push_str(&format!(
            " rate_mbps={} workload_gap_ms={:.1} converged=OK downtime={}",
            opts.rate_mbps,
            o.workload_gap_ms.unwrap_or(f64::NAN),
            ok_miss(s.downtime_ms <= BUSY_DOWNTIME_MS)
        )),
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{"tracker":"uffd-wp","stop_reason":"the dirty set fits the downtime budget","rounds":[{"round":0,"dirty_pages":5,"pages_sent":262144,"zero_pages":16384,"bytes_sent":1073741824,"ms":812.500},{"round":1,"dirty_pages":3,"pages_sent":5,"zero_pages":0,"bytes_sent":20480,"ms":2.000}],"raw_bytes":1073762304,"wire_bytes":1073800000,"compression_ratio":0.9999,"batches":1025,"compressed_batches":0,"total_ms":901.250,"downtime_ms":31.500}"#;

    #[test]
    fn parses_summary() {
        let s = parse_summary(&format!("\n{SAMPLE}\n")).unwrap();
        assert_eq!(s.tracker, "uffd-wp");
        assert_eq!(s.stop_reason, "the dirty set fits the downtime budget");
        assert_eq!(s.rounds.len(), 2);
        assert_eq!(s.rounds[0].pages_sent, 262144);
        assert_eq!(s.rounds[1].round, 1);
        assert_eq!(s.rounds[1].ms, 2.0);
        assert_eq!(s.raw_bytes, 1073762304);
        assert_eq!(s.batches, 1025);
        assert_eq!(s.downtime_ms, 31.5);
        assert!(parse_summary("nothing").is_err());
    }

    #[test]
    fn parses_args() {
        let a = |v: &[&str]| parse_args(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let o = a(&["--size-mib", "64", "--rate-mbps=10", "--runs", "2"])
            .unwrap()
            .unwrap();
        assert_eq!((o.size_mib, o.rate_mbps, o.runs), (64, 10, 2));
        assert_eq!(a(&[]).unwrap().unwrap().size_mib, 1024);
        assert!(a(&["--runs", "0"]).is_err());
        assert!(a(&["--size-mib", "x"]).is_err());
        assert!(a(&["--bogus"]).is_err());
        assert!(a(&["--help"]).unwrap().is_none());
        assert_eq!(a(&["--case", "busy"]).unwrap().unwrap().cases, [Case::Busy]);
        assert!(a(&["--case", "both"]).is_err());
    }

    #[test]
    fn strips_ansi() {
        assert_eq!(strip_ansi("\u{1b}[2m a\u{1b}[0m b"), " a b");
    }
}
