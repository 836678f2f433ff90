//! `bench_engine`: throughput and memory benchmark of the cr-migrate engine (not a test).
//!
//! Usage: `bench_engine [--sizes 1024,4096] [--reps N] [--dir DIR]` (as root). Sizes
//! are in MiB; every size is measured N times (default 3) and the best figures are
//! compared. The work directory is `DIR/crm-bench-PID` (DIR defaults to `/var/tmp`) and
//! is removed at the end, as is every process the benchmark starts, also on error,
//! panic, SIGINT or SIGTERM. Build and run:
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-bench cargo build --release -p crm-tests -p crm-migrate
//! CRM_BIN=/work/target-bench/release/cr-migrate /work/target-bench/release/bench_engine
//! ```
//!
//! Without `CRM_BIN` the `cr-migrate` next to this executable is used (built first if
//! it is missing or stale, see [`crm_tests::crm`]).
//!
//! Each repetition of a size measures, in this order:
//! 1. **Raw figures**, measured the way the tool works. *Dump raw*: a forked holder
//!    fills SIZE bytes of anonymous memory; a second forked child reads them with
//!    `process_vm_readv` in 8 MiB batches into one buffer, `write`s each batch
//!    sequentially to a file in the work directory and `fsync`s it (the dumper fsyncs
//!    its image too). *Restore raw*: a forked child `pread`s that file sequentially
//!    into freshly mmapped anonymous memory (first touch), once with 8 MiB and once
//!    with 64 MiB reads (the restorer reads runs of up to 64 MiB). Like
//!    `pages-PID.img`, the file has a 4 KiB header before the data: this matters, as
//!    2 MiB-aligned data gets 2 MiB page cache folios, and on the VM this was written
//!    on writing those was about twice as slow as writing data 4 KiB off alignment. The page cache is
//!    not dropped (that cannot be done reliably here): both the raw restore and the
//!    tool's restore read a file that was just written, i.e. with a warm page cache.
//!    All of this runs in forked children so that the benchmark process itself stays
//!    small: a child's `ru_maxrss` includes the high-water RSS of the process that
//!    spawned it (the kernel records the old mm's peak at `execve`), so a big
//!    benchmark process would inflate the peak RSS measured for `cr-migrate`.
//! 2. **The tool**: `wl_memory FILES SIZE` (SIZE MiB of patterned anonymous memory,
//!    every 16th MiB a never-touched hole) runs in its own session below this process,
//!    a child subreaper. `cr-migrate dump --pid P --images-dir IMG` runs under `wait4`
//!    (wall time, `ru_maxrss`); the freeze time is its `frozen N ms` info line; the
//!    page bytes are the size of `IMG/pages-*.img`, the image size the sum of all
//!    files in IMG. The killed original is reaped, then `cr-migrate restore
//!    --images-dir IMG --detach` runs under `wait4`; the restored process is adopted,
//!    must answer SIGUSR2 with `PASS` (otherwise the benchmark fails), and is killed
//!    and reaped.
//!
//! Then a table per size: dump GB/s (page bytes / freeze time, and / wall time) and
//! restore GB/s (page bytes / restore wall time) next to the raw figures, the freeze
//! time, image size and peak RSS of `cr-migrate`, with the targets (dump and restore
//! at least 50% of raw, peak RSS under 64 MiB whatever the size) marked OK or MISS;
//! finally one machine-readable `BENCH size_mib=...` line per size.
//!
//! Why repetitions, best of N: on a VM that hands free memory back to its host (free
//! page reporting, as on the Firecracker VMs this was written on), every fresh page
//! (page cache for a dump, anonymous memory for a restore) may cost a host page fault,
//! and the time that takes varies several-fold from run to run. That noise only ever
//! slows a phase down, so the best of N runs, raw and tool alike and interleaved, is the
//! fairest comparison; the tables also show the range. Throughputs are maxima, the
//! freeze time a minimum, peak RSS the maximum over the runs (the target must hold in
//! every run).
//!
//! With `--tree N` it measures instead a tree of N `wl_tree bench` tasks, each with
//! 4 MiB of private memory, all sharing 16 MiB of `MAP_SHARED | MAP_ANONYMOUS`
//! memory (issue 4): dump wall and freeze time, image size (the shared memory must be
//! stored once) and restore wall time (target under 1 s); the restored tree must
//! verify.
//!
//! GB/s are 10^9 bytes per second. Exit status: 0 when every size was measured (even
//! if a target is missed), 1 on any failure (including a restored workload that does
//! not verify), 2 on bad usage.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crm_tests::{crm_bin, procs, wl, workload_path, Spawn, Workload};

const MIB: usize = 1 << 20;
/// `process_vm_readv` batch of the raw dump (the dumper's batch).
const DUMP_BATCH: usize = 8 * MIB;
/// Read sizes of the raw restore (the restorer reads runs of up to 64 MiB).
const READ_CHUNKS: [usize; 2] = [8 * MIB, 64 * MIB];
/// The raw file starts with a header of this size, like `pages-PID.img`: data at
/// 4 KiB past a 2 MiB boundary gets smaller page cache folios than 2 MiB-aligned data,
/// which changes the cost of the writes (see the module docs).
const RAW_HEADER: usize = 4096;
/// Targets: tool throughput at least this fraction of raw ...
const RATIO_TARGET: f64 = 0.5;
/// ... and peak RSS of `cr-migrate` under this many MiB.
const RSS_LIMIT_MIB: f64 = 64.0;
/// Longest a `cr-migrate` run may take.
const CRM_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest `wl_memory` may take to fill its memory.
const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest a raw helper may take after it reported.
const HELPER_EXIT_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_SIZES: [usize; 2] = [1024, 4096];
const DEFAULT_REPS: usize = 3;

type Res<T> = Result<T, String>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match parse_args(&args) {
        Ok(Some(a)) => a,
        Ok(None) => {
            println!("{}", usage());
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("bench_engine: {e}\n{}", usage());
            return ExitCode::from(2);
        }
    };
    match run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nbench_engine: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage() -> &'static str {
    "usage: bench_engine [--sizes 1024,4096] [--reps 3] [--dir DIR]   (sizes in MiB; as root)\n       \
     bench_engine --tree 50 [--dir DIR]   (a 50-task tree, 4 MiB private + 16 MiB shared)"
}

/// Command line options.
#[derive(Debug)]
struct Opts {
    /// Sizes in MiB.
    sizes: Vec<usize>,
    /// Repetitions per size.
    reps: usize,
    /// Where the work directory is created.
    dir: PathBuf,
    /// Instead of the sizes: dump and restore a tree of this many tasks.
    tree: Option<usize>,
}

/// `Ok(None)` for `--help`.
fn parse_args(args: &[String]) -> Res<Option<Opts>> {
    let mut opts = Opts {
        sizes: DEFAULT_SIZES.to_vec(),
        reps: DEFAULT_REPS,
        dir: PathBuf::from("/var/tmp"),
        tree: None,
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
        match key {
            "-h" | "--help" => return Ok(None),
            "--sizes" => {
                let v = value("--sizes")?;
                opts.sizes = v
                    .split(',')
                    .map(|s| match s.trim().parse::<usize>() {
                        Ok(n) if n >= 16 => Ok(n),
                        _ => Err(format!("bad size {s:?} in --sizes (MiB, at least 16)")),
                    })
                    .collect::<Res<_>>()?;
            }
            "--reps" => {
                let v = value("--reps")?;
                opts.reps = match v.parse() {
                    Ok(n) if n >= 1 => n,
                    _ => return Err(format!("bad --reps {v:?} (at least 1)")),
                };
            }
            "--dir" => opts.dir = PathBuf::from(value("--dir")?),
            "--tree" => {
                let v = value("--tree")?;
                opts.tree = match v.parse() {
                    Ok(n) if (2..=1000).contains(&n) => Some(n),
                    _ => return Err(format!("bad --tree {v:?} (2 to 1000 tasks)")),
                };
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Some(opts))
}

// ---------------------------------------------------------------------------------
// Interruption, work directory
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

/// The work directory, removed recursively on drop.
struct WorkDir(PathBuf);

impl WorkDir {
    fn create(parent: &Path) -> Res<WorkDir> {
        let path = parent.join(format!("crm-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).map_err(|e| format!("creating {}: {e}", path.display()))?;
        Ok(WorkDir(path))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("warning: removing {}: {e}", self.0.display());
        }
    }
}

/// Removes a file or directory tree on drop (a phase's leftovers, as soon as it ends).
struct Remove(PathBuf);

impl Drop for Remove {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0).or_else(|_| std::fs::remove_file(&self.0));
    }
}

// ---------------------------------------------------------------------------------
// The run, the figures and the table
// ---------------------------------------------------------------------------------

/// Raw figures of one repetition.
struct Raw {
    /// Bytes dumped and read back.
    bytes: u64,
    /// Raw dump: total, in `process_vm_readv`, in `write`, in `fsync`.
    dump: Duration,
    dump_read: Duration,
    dump_write: Duration,
    dump_fsync: Duration,
    /// Raw restore time per read size.
    restore: Vec<(usize, Duration)>,
}

impl Raw {
    fn dump_gbps(&self) -> f64 {
        gbps(self.bytes, self.dump)
    }

    fn restore_gbps(&self) -> f64 {
        self.restore
            .iter()
            .map(|&(_, d)| gbps(self.bytes, d))
            .fold(0.0, f64::max)
    }
}

/// Tool figures of one repetition.
struct Tool {
    page_bytes: u64,
    image_bytes: u64,
    freeze: Duration,
    dump_wall: Duration,
    dump_rss_kib: i64,
    restore_wall: Duration,
    restore_rss_kib: i64,
}

impl Tool {
    fn dump_gbps(&self) -> f64 {
        gbps(self.page_bytes, self.freeze)
    }

    fn dump_wall_gbps(&self) -> f64 {
        gbps(self.page_bytes, self.dump_wall)
    }

    fn restore_gbps(&self) -> f64 {
        gbps(self.page_bytes, self.restore_wall)
    }
}

/// All repetitions of one size.
struct SizeRuns {
    size_mib: usize,
    raw: Vec<Raw>,
    tool: Vec<Tool>,
}

/// Best (or, for RSS, worst) figures of a size.
struct Summary {
    dump: f64,
    dump_wall: f64,
    dump_raw: f64,
    restore: f64,
    restore_raw: f64,
    freeze_ms: f64,
    image_mib: f64,
    page_mib: f64,
    dump_rss_mib: f64,
    restore_rss_mib: f64,
}

fn max_of<T>(v: &[T], f: impl Fn(&T) -> f64) -> f64 {
    v.iter().map(f).fold(f64::NEG_INFINITY, f64::max)
}

fn min_of<T>(v: &[T], f: impl Fn(&T) -> f64) -> f64 {
    v.iter().map(f).fold(f64::INFINITY, f64::min)
}

impl SizeRuns {
    fn summary(&self) -> Summary {
        let mib = |b: u64| b as f64 / MIB as f64;
        let last = self.tool.last().expect("at least one repetition");
        Summary {
            dump: max_of(&self.tool, Tool::dump_gbps),
            dump_wall: max_of(&self.tool, Tool::dump_wall_gbps),
            dump_raw: max_of(&self.raw, Raw::dump_gbps),
            restore: max_of(&self.tool, Tool::restore_gbps),
            restore_raw: max_of(&self.raw, Raw::restore_gbps),
            freeze_ms: min_of(&self.tool, |t| t.freeze.as_secs_f64() * 1e3),
            image_mib: mib(last.image_bytes),
            page_mib: mib(last.page_bytes),
            dump_rss_mib: max_of(&self.tool, |t| t.dump_rss_kib as f64 / 1024.0),
            restore_rss_mib: max_of(&self.tool, |t| t.restore_rss_kib as f64 / 1024.0),
        }
    }
}

fn run(opts: &Opts) -> Res<()> {
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("needs root (ptrace of other processes, clone3 with set_tid)".into());
    }
    crm_tests::init();
    wl::catch(libc::SIGINT);
    wl::catch(libc::SIGTERM);
    let bin = crm_bin();
    let wl_exe = workload_path("wl_memory");
    if !wl_exe.is_file() {
        return Err(format!(
            "{} not found: build it with `cargo build --release -p crm-tests`",
            wl_exe.display()
        ));
    }
    let work = WorkDir::create(&opts.dir)?;
    if let Some(n) = opts.tree {
        return tree_figures(n, &work.0);
    }
    println!("bench_engine: cr-migrate = {}", bin.display());
    println!("              wl_memory  = {}", wl_exe.display());
    println!("              work dir   = {}", work.0.display());
    println!(
        "              kernel {}, {} CPUs, THP {}",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_else(|_| "?".into())
            .trim()
    );
    println!(
        "              page cache not dropped: raw and tool restores both read a file just \
         written (warm cache); raw and tool dumps both fsync"
    );
    println!(
        "              {} repetition(s) per size, raw and tool interleaved; best figures \
         compared",
        opts.reps
    );

    let mut all = Vec::new();
    for &size_mib in &opts.sizes {
        let mut runs = SizeRuns {
            size_mib,
            raw: Vec::new(),
            tool: Vec::new(),
        };
        for rep in 1..=opts.reps {
            check_interrupt()?;
            println!("\n== {size_mib} MiB, repetition {rep}/{} ==", opts.reps);
            let raw = raw_figures(size_mib, &work.0)?;
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            let restores: Vec<String> = raw
                .restore
                .iter()
                .map(|&(c, d)| format!("{:.2} GB/s with {} MiB reads", gbps(raw.bytes, d), c / MIB))
                .collect();
            println!(
                "  raw dump {:.2} GB/s: {:.0} ms = process_vm_readv {:.0} + write {:.0} + \
                 fsync {:.0}; raw restore {}",
                raw.dump_gbps(),
                ms(raw.dump),
                ms(raw.dump_read),
                ms(raw.dump_write),
                ms(raw.dump_fsync),
                restores.join(", ")
            );
            runs.raw.push(raw);
            check_interrupt()?;
            let tool = tool_figures(size_mib, &wl_exe, &work.0)?;
            println!(
                "  tool dump {:.2} GB/s (freeze {:.0} ms, wall {:.0} ms, peak RSS {:.1} MiB), \
                 restore {:.2} GB/s (wall {:.0} ms, peak RSS {:.1} MiB)",
                tool.dump_gbps(),
                ms(tool.freeze),
                ms(tool.dump_wall),
                tool.dump_rss_kib as f64 / 1024.0,
                tool.restore_gbps(),
                ms(tool.restore_wall),
                tool.restore_rss_kib as f64 / 1024.0
            );
            runs.tool.push(tool);
        }
        print_table(&runs);
        all.push(runs);
    }
    println!(
        "\nbench_engine's own peak RSS: {:.1} MiB (a floor for the peaks measured for \
         cr-migrate: execve records the spawner's peak)",
        self_maxrss_kib() as f64 / 1024.0
    );
    println!();
    for runs in &all {
        println!("{}", bench_line(runs.size_mib, &runs.summary()));
    }
    Ok(())
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if s > 0.0 {
        bytes as f64 / s / 1e9
    } else {
        0.0
    }
}

fn mark(ok: bool) -> &'static str {
    if ok {
        "OK"
    } else {
        "MISS"
    }
}

fn print_table(runs: &SizeRuns) {
    let s = runs.summary();
    let n = runs.tool.len();
    let range = |lo: f64, hi: f64| {
        if n > 1 {
            format!("({lo:.2}..{hi:.2})")
        } else {
            String::new()
        }
    };
    let tool_range = |f: fn(&Tool) -> f64| range(min_of(&runs.tool, f), max_of(&runs.tool, f));
    let raw_range = |f: fn(&Raw) -> f64| range(min_of(&runs.raw, f), max_of(&runs.raw, f));
    println!(
        "\n-- {} MiB: best of {n} (range over the runs) --",
        runs.size_mib
    );
    println!(
        "  {:<26} {:<23} {:<23} {:>6}   target",
        "", "tool GB/s", "raw GB/s", "ratio"
    );
    let row = |name: &str, tool: f64, trange: String, raw: f64, rrange: String, target: bool| {
        let ratio = if raw > 0.0 { tool / raw } else { 0.0 };
        println!(
            "  {name:<26} {:<23} {:<23} {:>5.0}%   {}",
            format!("{tool:.2} {trange}"),
            format!("{raw:.2} {rrange}"),
            ratio * 100.0,
            if target {
                format!(">= 50%  {}", mark(ratio >= RATIO_TARGET))
            } else {
                "(info)".into()
            }
        );
    };
    row(
        "dump (page bytes/freeze)",
        s.dump,
        tool_range(Tool::dump_gbps),
        s.dump_raw,
        raw_range(Raw::dump_gbps),
        true,
    );
    row(
        "dump (page bytes/wall)",
        s.dump_wall,
        tool_range(Tool::dump_wall_gbps),
        s.dump_raw,
        raw_range(Raw::dump_gbps),
        false,
    );
    row(
        "restore (page bytes/wall)",
        s.restore,
        tool_range(Tool::restore_gbps),
        s.restore_raw,
        raw_range(Raw::restore_gbps),
        true,
    );
    let freeze_max = max_of(&runs.tool, |t| t.freeze.as_secs_f64() * 1e3);
    println!(
        "  {:<26} {:<23}",
        "freeze time",
        format!("{:.0} ms (worst {freeze_max:.0})", s.freeze_ms)
    );
    println!(
        "  {:<26} {:<23}",
        "image size",
        format!("{:.1} MiB (pages {:.1} MiB)", s.image_mib, s.page_mib)
    );
    for (name, rss) in [
        ("peak RSS dump (worst)", s.dump_rss_mib),
        ("peak RSS restore (worst)", s.restore_rss_mib),
    ] {
        println!(
            "  {name:<26} {:<23} {:<23} {:>6}   < 64 MiB {}",
            format!("{rss:.1} MiB"),
            "",
            "",
            mark(rss < RSS_LIMIT_MIB)
        );
    }
}

fn bench_line(size_mib: usize, s: &Summary) -> String {
    format!(
        "BENCH size_mib={size_mib} dump_gbps={:.3} dump_raw_gbps={:.3} restore_gbps={:.3} \
         restore_raw_gbps={:.3} freeze_ms={:.0} image_mib={:.1} dump_rss_mib={:.1} \
         restore_rss_mib={:.1}",
        s.dump,
        s.dump_raw,
        s.restore,
        s.restore_raw,
        s.freeze_ms,
        s.image_mib,
        s.dump_rss_mib,
        s.restore_rss_mib
    )
}

fn self_maxrss_kib() -> i64 {
    // SAFETY: all-zero is a valid rusage; getrusage fills the live local.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a live, writable rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    ru.ru_maxrss
}

// ---------------------------------------------------------------------------------
// Raw figures, in forked children
// ---------------------------------------------------------------------------------

/// A forked child of ours: SIGKILLed (if not reaped yet) and reaped on drop.
struct Forked {
    pid: i32,
    reaped: bool,
}

impl Forked {
    /// Waits up to `timeout` for it to exit; its description on a failure.
    fn wait(&mut self, timeout: Duration) -> Res<i32> {
        match procs::wait_pid(self.pid, timeout) {
            procs::Waited::Exited(st) => {
                self.reaped = true;
                procs::disown(self.pid);
                Ok(st)
            }
            procs::Waited::NotChild => {
                self.reaped = true;
                procs::disown(self.pid);
                Err(format!(
                    "helper pid {} was reaped by someone else",
                    self.pid
                ))
            }
            procs::Waited::Timeout => Err(format!(
                "helper pid {} still running after {timeout:.0?}",
                self.pid
            )),
        }
    }
}

impl Drop for Forked {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = procs::kill(self.pid, libc::SIGKILL);
            let _ = self.wait(Duration::from_secs(30));
        }
    }
}

fn pipe() -> Res<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`, a live local array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe2: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: both descriptors are fresh and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Words a helper child reports on success.
const REPORT_WORDS: usize = 4;
/// What a helper child reports: `Ok(words)`, or `Err((step, errno))`.
type ChildResult = Result<[u64; REPORT_WORDS], (u64, i32)>;

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into a live local; it is
    // async-signal-safe, so forked children may call it.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Writes all of `buf` to `fd` with raw `write` calls (async-signal-safe).
fn write_raw(fd: RawFd, buf: &[u8]) -> bool {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unwritten tail of `buf`.
        let n = unsafe { libc::write(fd, buf[done..].as_ptr().cast(), buf.len() - done) };
        if n < 0 && errno() == libc::EINTR {
            continue;
        }
        if n <= 0 {
            return false;
        }
        done += n as usize;
    }
    true
}

/// Ends a forked child with status 127 when dropped (only during a panic's unwinding).
struct ExitOnUnwind;

impl Drop for ExitOnUnwind {
    fn drop(&mut self) {
        // SAFETY: terminating the forked child right away is always sound.
        unsafe { libc::_exit(127) };
    }
}

/// Forks a child that runs `body` and exits with `_exit`. `body` must only make raw,
/// async-signal-safe system calls (no allocation, no locks): other threads of ours may
/// hold locks at the moment of the fork.
fn fork_child(body: impl FnOnce() -> i32) -> Res<Forked> {
    // SAFETY: the child runs only `body`, restricted as documented above, and then
    // `_exit`s without running destructors or atexit handlers.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        // A panic in `body` (a bug) must not unwind into the parent's code running in
        // the child: the guard's drop ends the child during the unwinding.
        let guard = ExitOnUnwind;
        let code = body();
        std::mem::forget(guard);
        // SAFETY: terminating the forked child right away is always sound.
        unsafe { libc::_exit(code) };
    }
    procs::own(pid);
    Ok(Forked { pid, reaped: false })
}

/// Runs `body` in a forked child and returns what it reported through a pipe.
fn in_child(
    what: &str,
    steps: &[&str],
    body: impl FnOnce() -> ChildResult,
) -> Res<[u64; REPORT_WORDS]> {
    let (r, w) = pipe()?;
    let wfd = w.as_raw_fd();
    let mut child = fork_child(move || {
        let mut msg = [0u64; REPORT_WORDS + 1];
        match body() {
            Ok(words) => msg[1..].copy_from_slice(&words),
            Err((step, e)) => msg[..3].copy_from_slice(&[1, step, e as u64]),
        }
        let mut bytes = [0u8; 8 * (REPORT_WORDS + 1)];
        for (i, v) in msg.iter().enumerate() {
            bytes[i * 8..i * 8 + 8].copy_from_slice(&v.to_ne_bytes());
        }
        if write_raw(wfd, &bytes) {
            0
        } else {
            1
        }
    })?;
    drop(w);
    let mut bytes = Vec::new();
    // Blocks until the child exits (its write end closes).
    let read = File::from(r).read_to_end(&mut bytes);
    let status = child.wait(HELPER_EXIT_TIMEOUT)?;
    if let Err(e) = read {
        return Err(format!("{what}: reading the helper's report: {e}"));
    }
    if bytes.len() != 8 * (REPORT_WORDS + 1) {
        return Err(format!(
            "{what}: the helper died without a report ({})",
            procs::describe_status(status)
        ));
    }
    let word = |i: usize| u64::from_ne_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8"));
    if word(0) == 0 {
        return Ok(std::array::from_fn(|i| word(i + 1)));
    }
    let step = steps.get(word(1) as usize).copied().unwrap_or("?");
    Err(format!(
        "{what}: {step}: {}",
        std::io::Error::from_raw_os_error(word(2) as i32)
    ))
}

fn mmap_anon(len: usize) -> *mut u8 {
    // SAFETY: a fresh private anonymous mapping at an address of the kernel's choosing
    // overlaps nothing; the caller checks for MAP_FAILED.
    unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
        .cast()
    }
}

/// One repetition of the raw dump and the raw restores of `size_mib` MiB.
fn raw_figures(size_mib: usize, work: &Path) -> Res<Raw> {
    let size = size_mib * MIB;
    let path = work.join(format!("raw-{size_mib}.bin"));
    let _remove = Remove(path.clone());

    // The holder: fills `size` bytes, reports the address, sleeps until killed.
    let (r, w) = pipe()?;
    let wfd = w.as_raw_fd();
    let holder = fork_child(move || {
        let p = mmap_anon(size);
        if p.cast::<libc::c_void>() == libc::MAP_FAILED {
            return 1;
        }
        // SAFETY: `p..p+size` is our fresh writable mapping, page-aligned (so 8-aligned).
        let words = unsafe { std::slice::from_raw_parts_mut(p.cast::<u64>(), size / 8) };
        for (i, w) in words.iter_mut().enumerate() {
            *w = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
        if !write_raw(wfd, &(p as u64).to_ne_bytes()) {
            return 1;
        }
        loop {
            // SAFETY: pause has no arguments; it only waits for a signal.
            unsafe { libc::pause() };
        }
    })?;
    drop(w);
    let mut addr = [0u8; 8];
    File::from(r)
        .read_exact(&mut addr)
        .map_err(|e| format!("raw dump: the memory holder did not get ready: {e}"))?;
    let addr = u64::from_ne_bytes(addr);
    let holder_pid = holder.pid;
    check_interrupt()?;

    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("creating {}: {e}", path.display()))?;
    let fd = file.as_raw_fd();
    const DUMP_STEPS: [&str; 5] = [
        "mmap of the buffer",
        "process_vm_readv",
        "write",
        "fsync",
        "write of the header",
    ];
    // Reports total ns, bytes, ns in process_vm_readv, ns in write (fsync: the rest).
    let [ns, bytes, read_ns, write_ns] = in_child("raw dump", &DUMP_STEPS, move || {
        let buf = mmap_anon(DUMP_BATCH);
        if buf.cast::<libc::c_void>() == libc::MAP_FAILED {
            return Err((0, errno()));
        }
        let t0 = now_ns();
        // SAFETY: the buffer mapping is at least RAW_HEADER bytes, zero-filled.
        if !write_raw(fd, unsafe { std::slice::from_raw_parts(buf, RAW_HEADER) }) {
            return Err((4, errno()));
        }
        let (mut read_ns, mut write_ns) = (0, 0);
        let mut off = 0usize;
        while off < size {
            let t_read = now_ns();
            let len = DUMP_BATCH.min(size - off);
            let mut got = 0usize;
            while got < len {
                let local = libc::iovec {
                    // SAFETY: `got < len <= DUMP_BATCH`: inside the buffer mapping.
                    iov_base: unsafe { buf.add(got) }.cast(),
                    iov_len: len - got,
                };
                let remote = libc::iovec {
                    iov_base: (addr as usize + off + got) as *mut libc::c_void,
                    iov_len: len - got,
                };
                // SAFETY: `local` describes writable memory of ours; the remote range is
                // only read by the kernel from the holder.
                let n = unsafe { libc::process_vm_readv(holder_pid, &local, 1, &remote, 1, 0) };
                if n <= 0 {
                    return Err((1, errno()));
                }
                got += n as usize;
            }
            let t_write = now_ns();
            read_ns += t_write - t_read;
            // SAFETY: the first `len` bytes of the buffer mapping were just filled.
            if !write_raw(fd, unsafe { std::slice::from_raw_parts(buf, len) }) {
                return Err((2, errno()));
            }
            write_ns += now_ns() - t_write;
            off += len;
        }
        // SAFETY: fsync of a descriptor we own.
        if unsafe { libc::fsync(fd) } != 0 {
            return Err((3, errno()));
        }
        Ok([now_ns() - t0, off as u64, read_ns, write_ns])
    })?;
    // The holder's memory is freed before the restores.
    drop(holder);
    let ns_ = Duration::from_nanos;

    let mut restore = Vec::new();
    for chunk in READ_CHUNKS {
        check_interrupt()?;
        const READ_STEPS: [&str; 3] = ["mmap of the destination", "pread", "short file"];
        let [ns, got, ..] = in_child("raw restore", &READ_STEPS, move || {
            let dst = mmap_anon(size);
            if dst.cast::<libc::c_void>() == libc::MAP_FAILED {
                return Err((0, errno()));
            }
            let t0 = now_ns();
            let mut off = 0usize;
            while off < size {
                let len = chunk.min(size - off);
                let at = (RAW_HEADER + off) as libc::off_t;
                // SAFETY: `off + len <= size`: inside the fresh destination mapping.
                let n = unsafe { libc::pread(fd, dst.add(off).cast(), len, at) };
                if n < 0 && errno() == libc::EINTR {
                    continue;
                }
                if n < 0 {
                    return Err((1, errno()));
                }
                if n == 0 {
                    return Err((2, 0));
                }
                off += n as usize;
            }
            Ok([now_ns() - t0, off as u64, 0, 0])
        })?;
        if got != bytes {
            return Err(format!(
                "raw restore read {got} bytes, the dump wrote {bytes}"
            ));
        }
        restore.push((chunk, ns_(ns)));
    }
    drop(file);
    Ok(Raw {
        bytes,
        dump: ns_(ns),
        dump_read: ns_(read_ns),
        dump_write: ns_(write_ns),
        dump_fsync: ns_(ns - read_ns - write_ns),
        restore,
    })
}

// ---------------------------------------------------------------------------------
// The tool
// ---------------------------------------------------------------------------------

/// A finished `cr-migrate` run.
struct Measured {
    status: i32,
    wall: Duration,
    maxrss_kib: i64,
    stderr: String,
}

fn timeval(tv: libc::timeval) -> Duration {
    Duration::from_secs(tv.tv_sec as u64) + Duration::from_micros(tv.tv_usec as u64)
}

/// CPU time (user, system) used so far by `pid`, from `/proc/PID/stat`.
fn proc_cpu(pid: i32) -> Option<(Duration, Duration)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the comm: state is field 3, utime 14, stime 15.
    let rest = text.get(text.rfind(')')? + 1..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i)?.parse::<u64>().ok();
    // SAFETY: sysconf takes an integer and touches no memory.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let d = |t: u64| Duration::from_millis(t * 1000 / hz);
    Some((d(ticks(11)?), d(ticks(12)?)))
}

impl Measured {
    fn ok(&self) -> bool {
        libc::WIFEXITED(self.status) && libc::WEXITSTATUS(self.status) == 0
    }

    fn describe(&self) -> String {
        let mut s = procs::describe_status(self.status);
        for l in self.stderr.lines() {
            s.push_str("\n  | ");
            s.push_str(l);
        }
        s
    }
}

fn drain<R: Read + Send + 'static>(mut r: R) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

/// Runs `cr-migrate ARGS` and reaps it with `wait4`: exit status, wall time (spawn to
/// exit) and `ru_maxrss`. Killed after `timeout` or on SIGINT/SIGTERM.
fn run_measured(args: &[&str], timeout: Duration) -> Res<Measured> {
    println!("  $ cr-migrate {}", args.join(" "));
    let started = Instant::now();
    let mut child = Command::new(crm_bin())
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawning {}: {e}", crm_bin().display()))?;
    let pid = child.id() as i32;
    procs::own(pid);
    let stderr_rx = drain(child.stderr.take().expect("piped stderr"));
    // SAFETY: pidfd_open takes a PID and flags and returns a new descriptor or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as RawFd;
    let pidfd = if raw >= 0 {
        // SAFETY: a fresh descriptor owned by nobody else.
        Some(unsafe { OwnedFd::from_raw_fd(raw) })
    } else {
        None
    };
    let mut note = String::new();
    loop {
        let left = timeout.saturating_sub(started.elapsed());
        if left.is_zero() || interrupted() {
            note = if left.is_zero() {
                format!("timed out after {timeout:.0?}, killed")
            } else {
                "killed: interrupted".into()
            };
            let _ = procs::kill(pid, libc::SIGKILL);
            break;
        }
        let slice = left.min(Duration::from_millis(200)).as_millis() as i32;
        match &pidfd {
            Some(fd) => {
                let mut pfd = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one live pollfd.
                if unsafe { libc::poll(&mut pfd, 1, slice.max(1)) } > 0 {
                    break;
                }
            }
            None => {
                // No pidfd (old kernel): poll /proc for the zombie, 1 ms resolution.
                if matches!(procs::stat(pid), Some(s) if s.state == 'Z') {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    let wall = started.elapsed();
    let mut status = 0;
    // SAFETY: all-zero is a valid rusage.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: wait4 writes the status and the rusage into live locals.
        let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if rc == pid {
            break;
        }
        if rc < 0 && errno() == libc::EINTR {
            continue;
        }
        procs::disown(pid);
        return Err(format!(
            "wait4 of cr-migrate {pid}: {}",
            std::io::Error::last_os_error()
        ));
    }
    procs::disown(pid);
    drop(child);
    procs::reap_zombies();
    let mut stderr = stderr_rx
        .recv_timeout(Duration::from_secs(5))
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_else(|_| "[stderr still held open by another process]".into());
    if !note.is_empty() {
        stderr.push_str(&format!("\n[bench: {note}]"));
    }
    for l in stderr.lines() {
        println!("    | {l}");
    }
    println!(
        "    -> {} in {:.0} ms (CPU: user {:.0} ms, sys {:.0} ms), peak RSS {:.1} MiB",
        procs::describe_status(status),
        wall.as_secs_f64() * 1e3,
        timeval(ru.ru_utime).as_secs_f64() * 1e3,
        timeval(ru.ru_stime).as_secs_f64() * 1e3,
        ru.ru_maxrss as f64 / 1024.0
    );
    Ok(Measured {
        status,
        wall,
        maxrss_kib: ru.ru_maxrss,
        stderr,
    })
}

/// The `N` of `frozen N ms` in the dump's info line.
fn parse_frozen_ms(stderr: &str) -> Option<f64> {
    let rest = &stderr[stderr.find("frozen ")? + "frozen ".len()..];
    let num = &rest[..rest.find(" ms")?];
    if num.is_empty() || !num.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return None;
    }
    num.parse().ok()
}

/// (total bytes of all files, bytes of `pages-*` files) under `dir`.
fn image_sizes(dir: &Path) -> Res<(u64, u64)> {
    let mut total = 0;
    let mut pages = 0;
    let rd = std::fs::read_dir(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    for e in rd.flatten() {
        let meta = e
            .metadata()
            .map_err(|err| format!("stat {}: {err}", e.path().display()))?;
        if meta.is_dir() {
            let (t, p) = image_sizes(&e.path())?;
            total += t;
            pages += p;
        } else {
            total += meta.len();
            if e.file_name().to_string_lossy().starts_with("pages-") {
                pages += meta.len();
            }
        }
    }
    Ok((total, pages))
}

/// Private and shared memory of the tree benchmark's tasks (MiB).
const TREE_PRIVATE_MIB: usize = 4;
const TREE_SHARED_MIB: usize = 16;
/// Target: restore of the tree under this long.
const TREE_RESTORE_TARGET: Duration = Duration::from_secs(1);

/// Dump and restore of a `wl_tree bench` tree of `n` tasks, each with
/// [`TREE_PRIVATE_MIB`] of private memory, all sharing [`TREE_SHARED_MIB`].
fn tree_figures(n: usize, work: &Path) -> Res<()> {
    let exe = workload_path("wl_tree");
    let img = work.join("img-tree");
    let _remove_img = Remove(img.clone());
    let img_s = img.to_str().ok_or("work dir is not UTF-8")?;
    let (tasks, private, shared) = (
        n.to_string(),
        TREE_PRIVATE_MIB.to_string(),
        TREE_SHARED_MIB.to_string(),
    );
    let mut tree = crm_tests::tree::Tree::start(
        &exe,
        &["bench", &tasks, &private, &shared],
        work,
        Spawn::default(),
    );
    if tree.members.len() + 1 != n {
        return Err(format!(
            "wl_tree has {} tasks, not {n}",
            tree.members.len() + 1
        ));
    }
    let pid_s = tree.wl.pid().to_string();
    let dump = run_measured(
        &["dump", "--pid", &pid_s, "--images-dir", img_s],
        CRM_TIMEOUT,
    )?;
    if !dump.ok() {
        return Err(format!("cr-migrate dump failed: {}", dump.describe()));
    }
    let freeze_ms = parse_frozen_ms(&dump.stderr).unwrap_or(f64::NAN);
    tree.reap_dumped()
        .map_err(|e| format!("after cr-migrate dump: {e}"))?;
    let (image_bytes, page_bytes) = image_sizes(&img)?;
    let restore = run_measured(&["restore", "--images-dir", img_s, "--detach"], CRM_TIMEOUT)?;
    let adopted = tree.wl.adopt_restored();
    if !restore.ok() {
        return Err(format!("cr-migrate restore failed: {}", restore.describe()));
    }
    adopted.map_err(|e| format!("after cr-migrate restore: {e}"))?;
    let pass = tree
        .wl
        .verify()
        .map_err(|e| format!("the restored tree did not verify: {e}"))?;
    tree.kill_all()?;
    let mib = |b: u64| b as f64 / MIB as f64;
    let per_task = (n * (TREE_PRIVATE_MIB + TREE_SHARED_MIB)) as f64;
    let once = (n * TREE_PRIVATE_MIB + TREE_SHARED_MIB) as f64;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("tree of {n} tasks, {TREE_PRIVATE_MIB} MiB private each, {TREE_SHARED_MIB} MiB shared by all:");
    println!(
        "  dump: wall {:.0} ms, frozen {freeze_ms:.0} ms, peak RSS {:.1} MiB",
        ms(dump.wall),
        dump.maxrss_kib as f64 / 1024.0
    );
    println!(
        "  image: {:.1} MiB ({:.1} MiB of pages; the memory is {once:.0} MiB with the shared \
         part once, {per_task:.0} MiB with it per task) [{}]",
        mib(image_bytes),
        mib(page_bytes),
        mark(mib(page_bytes) < once + per_task * 0.1),
    );
    println!(
        "  restore: wall {:.0} ms, peak RSS {:.1} MiB [target < {} ms: {}]",
        ms(restore.wall),
        restore.maxrss_kib as f64 / 1024.0,
        TREE_RESTORE_TARGET.as_millis(),
        mark(restore.wall < TREE_RESTORE_TARGET)
    );
    println!("  restored tree: {pass}");
    println!(
        "BENCH tree_tasks={n} dump_ms={:.0} frozen_ms={freeze_ms:.0} image_mib={:.1} \
         pages_mib={:.1} restore_ms={:.0}",
        ms(dump.wall),
        mib(image_bytes),
        mib(page_bytes),
        ms(restore.wall)
    );
    Ok(())
}

/// One repetition of dump and restore of `wl_memory` with `size_mib` MiB.
fn tool_figures(size_mib: usize, wl_exe: &Path, work: &Path) -> Res<Tool> {
    let files = work.join(format!("files-{size_mib}"));
    let img = work.join(format!("img-{size_mib}"));
    let _remove_files = Remove(files.clone());
    let _remove_img = Remove(img.clone());
    std::fs::create_dir_all(&files).map_err(|e| format!("creating {}: {e}", files.display()))?;
    let files_s = files.to_str().ok_or("work dir is not UTF-8")?;
    let img_s = img.to_str().ok_or("work dir is not UTF-8")?;
    let size = size_mib.to_string();

    let mut wl = Workload::start_with(
        wl_exe,
        &[files_s, &size],
        work,
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
                "wl_memory {pid} is not a session leader: {other:?}"
            ))
        }
    }
    check_interrupt()?;
    let pid_s = pid.to_string();
    let dump = run_measured(
        &["dump", "--pid", &pid_s, "--images-dir", img_s],
        CRM_TIMEOUT,
    )?;
    if !dump.ok() {
        return Err(format!("cr-migrate dump failed: {}", dump.describe()));
    }
    let freeze_ms = parse_frozen_ms(&dump.stderr)
        .ok_or_else(|| format!("no `frozen N ms` in the dump's output: {}", dump.describe()))?;
    let how = wl
        .reap_killed(Duration::from_secs(30))
        .map_err(|e| format!("after cr-migrate dump: {e}"))?;
    println!("    original wl_memory {pid} {how}");
    let (image_bytes, page_bytes) = image_sizes(&img)?;
    check_interrupt()?;

    let restore = run_measured(&["restore", "--images-dir", img_s, "--detach"], CRM_TIMEOUT)?;
    // Take a restored process under the guard even if the exit status is wrong.
    let adopted = wl.adopt_restored();
    if !restore.ok() {
        return Err(format!("cr-migrate restore failed: {}", restore.describe()));
    }
    let ppid = adopted.map_err(|e| format!("after cr-migrate restore: {e}"))?;
    if ppid != procs::getpid() {
        println!("    note: restored pid {pid} has parent {ppid}, not us");
    }
    // The page reads and their CRC checks run in the restored process itself (a clone
    // of cr-migrate), so its CPU time before verifying is the restore's.
    if let Some((user, sys)) = proc_cpu(pid) {
        println!(
            "    restored process CPU so far (page reads, CRC checks): user {:.0} ms, sys {:.0} ms",
            user.as_secs_f64() * 1e3,
            sys.as_secs_f64() * 1e3
        );
    }
    let pass = wl
        .verify()
        .map_err(|e| format!("the restored wl_memory did not verify: {e}"))?;
    println!("    restored wl_memory {pid}: {pass}");
    wl.kill_and_reap()?;
    Ok(Tool {
        page_bytes,
        image_bytes,
        freeze: Duration::from_secs_f64(freeze_ms / 1e3),
        dump_wall: dump.wall,
        dump_rss_kib: dump.maxrss_kib,
        restore_wall: restore.wall,
        restore_rss_kib: restore.maxrss_kib,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_frozen() {
        let line = "INFO dumped process 5: 1 thread(s), 9 VMAs, 3 pages (0.0 MiB, 0 zero pages \
                    skipped); frozen 412 ms (2.10 GB/s); process killed";
        assert_eq!(parse_frozen_ms(line), Some(412.0));
        assert_eq!(parse_frozen_ms("frozen  ms"), None);
        assert_eq!(parse_frozen_ms("nothing"), None);
    }

    #[test]
    fn parses_args() {
        let a = |v: &[&str]| parse_args(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let o = a(&["--sizes", "64,128", "--dir=/tmp", "--reps", "2"])
            .unwrap()
            .unwrap();
        assert_eq!(o.sizes, vec![64, 128]);
        assert_eq!(o.dir, PathBuf::from("/tmp"));
        assert_eq!(o.reps, 2);
        assert_eq!(a(&[]).unwrap().unwrap().reps, DEFAULT_REPS);
        assert!(a(&["--reps", "0"]).is_err());
        assert!(a(&["--sizes", "x"]).is_err());
        assert!(a(&["--bogus"]).is_err());
        assert!(a(&["--help"]).unwrap().is_none());
    }
}
