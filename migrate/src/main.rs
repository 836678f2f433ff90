//! `cr-migrate`: checkpoint, restore and (soon) live-migrate running Linux
//! processes. This binary parses the command line, sets up logging and turns
//! engine errors into messages that name what failed; the work is done by
//! `crm-engine` (and later the migration modules of this crate).
mod cmd_check;
mod cmd_dump;
mod cmd_receive;
mod cmd_restore;
mod cmd_send;
mod cmd_show;
mod migration;
mod transport;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "cr-migrate",
    version,
    about = "Checkpoint, restore and live-migrate running Linux processes",
    long_about = "Checkpoint, restore and live-migrate running Linux processes.\n\n\
        Typical use:\n  \
        cr-migrate check                                  # what this kernel supports\n  \
        cr-migrate dump --pid 1234 --images-dir /tmp/img  # checkpoint (and stop) PID 1234\n  \
        cr-migrate show /tmp/img                          # inspect the image\n  \
        cr-migrate restore --images-dir /tmp/img --detach # bring it back, same PID\n  \
        cr-migrate receive --listen 0.0.0.0:7070 --token-file t   # on the destination\n  \
        cr-migrate send 1234 dest:7070 --token-file t     # live-migrate PID 1234 there\n\n\
        Needs root (ptrace, clone3 with set_tid, PR_SET_MM_MAP)."
)]
struct Cli {
    /// More output (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Checkpoint a running process tree (the process, its children, theirs
    /// ..., all their threads, and unreaped zombies) into an image directory.
    ///
    /// The tree is frozen with ptrace while its state is collected and
    /// killed once the image is complete, unless --leave-running is given.
    /// Anything the engine cannot restore (an unsupported file descriptor or
    /// mapping in any task, a session whose leader is gone, a stopped task)
    /// makes the dump fail before any task is touched.
    Dump {
        /// The root of the tree to checkpoint.
        #[arg(long, short = 'p')]
        pid: i32,
        /// Where to write the image (created; must not already hold an image).
        #[arg(long, short = 'D')]
        images_dir: PathBuf,
        /// Resume the tree after the dump instead of killing it.
        #[arg(long)]
        leave_running: bool,
        /// Allow a process that shares its session with a shell (started from
        /// an interactive shell); it will be restored into the session of
        /// `cr-migrate restore --shell-job`.
        #[arg(long)]
        shell_job: bool,
        /// Also save the SysV message queue, semaphore set and shared
        /// memory segment with this key (decimal or 0x hex; repeatable).
        /// SysV shared memory the tree has attached is always saved; queues
        /// and semaphore sets only when named here (nothing tells which ones
        /// a process uses). The tree must share cr-migrate's IPC namespace.
        /// Saved objects keep their key, id, owner and mode; without
        /// --leave-running the dump removes them (they live in the image
        /// now), and restore refuses to replace an existing object.
        #[arg(long = "ipc-key", value_name = "KEY", value_parser = parse_ipc_key)]
        ipc_keys: Vec<i32>,
    },
    /// Restore a process tree from an image directory, with its original
    /// PIDs and TIDs, parents, process groups, sessions and zombies.
    ///
    /// Without --detach, cr-migrate waits for the restored process (the
    /// root of the tree) and exits with its status.
    Restore {
        #[arg(long, short = 'D')]
        images_dir: PathBuf,
        /// Return as soon as the process runs; it is reparented to our
        /// nearest child subreaper (or init).
        #[arg(long, short = 'd')]
        detach: bool,
        /// Needed for images dumped with --shell-job: the process joins our session.
        #[arg(long)]
        shell_job: bool,
        /// Start the process before its memory is loaded: pages are filled
        /// as it touches them (userfaultfd), the rest in the background.
        /// The process runs sooner (large images: much sooner); cr-migrate
        /// stays until every page is in place, also with --detach. Falls back
        /// to loading everything first where userfaultfd is not available.
        #[arg(long)]
        lazy_pages: bool,
        /// Print "RUNNING PID" on stdout the moment the process runs (for
        /// programs that drive cr-migrate).
        #[arg(long, hide = true)]
        announce: bool,
        /// With --lazy-pages: hand the lazy memory to the process at the
        /// other end of this (inherited) unix socket instead of serving it
        /// from the image (used by `receive`).
        #[arg(long, hide = true, requires = "lazy_pages")]
        lazy_pages_fd: Option<i32>,
    },
    /// Live-migrate a running process to a `cr-migrate receive` on HOST:PORT.
    ///
    /// Memory is copied while the process keeps running (iterative pre-copy
    /// with dirty-page tracking), then the process is frozen for the last
    /// dirty pages and its state, restored on the destination, and killed
    /// here only once the destination reports it running. Any failure before
    /// that (including Ctrl-C) resumes the process here, untouched. A
    /// process with children moves with its whole tree (children forked
    /// during the copy included); its private memory comes in lazily too,
    /// its shared memory while it is frozen.
    /// What a dump would refuse is refused before connecting.
    Send {
        /// The process to migrate.
        pid: i32,
        /// The destination, e.g. 10.0.0.2:7070 (QUIC over UDP; page channels over TCP, same port).
        dest: String,
        /// File holding the shared secret both sides use to authenticate.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// SHA-256 fingerprint of the destination's certificate (printed by
        /// `receive`), to authenticate it without or besides a token.
        #[arg(long)]
        pin_fingerprint: Option<String>,
        /// Downtime budget: freeze once the dirty pages would go out within it.
        #[arg(long, default_value_t = 300)]
        max_downtime_ms: u64,
        /// Most pre-copy rounds before freezing regardless.
        #[arg(long, default_value_t = 10)]
        max_rounds: u32,
        /// zstd compression of page batches: auto (only when it makes the
        /// transfer faster), always or never.
        #[arg(long, value_enum, default_value_t = CompressArg::Auto)]
        compress: CompressArg,
        /// Parallel page streams.
        #[arg(long, default_value_t = 4)]
        streams: usize,
        /// What carries the pages: auto (TCP page channels to the same port
        /// number over TCP, sealed with AES-256-GCM unless the destination
        /// is this host; QUIC streams if the destination offers none),
        /// quic (QUIC streams only), or sealed (sealed TCP channels even to
        /// this host, to measure what a migration between hosts costs).
        #[arg(long, value_enum, default_value_t = PageTransportArg::Auto)]
        page_transport: PageTransportArg,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
        /// Allow a process that shares a shell's session (see `dump --shell-job`).
        #[arg(long)]
        shell_job: bool,
        /// Also move the SysV message queue, semaphore set and shared
        /// memory segment with this key (see `dump --ipc-key`). SysV shared
        /// memory the tree attached always moves. The objects are copied
        /// while the tree is frozen, created at the destination with their
        /// ids (which must be free there) and removed here once it runs.
        #[arg(long = "ipc-key", value_name = "KEY", value_parser = parse_ipc_key)]
        ipc_keys: Vec<i32>,
    },
    /// Accept one live migration from `cr-migrate send` and restore it here.
    ///
    /// Refuses to start without --token-file: the destination restores code
    /// as root, so every peer must authenticate.
    Receive {
        /// Address to listen on, e.g. 0.0.0.0:7070: UDP for the QUIC session, TCP (same port) for page channels.
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// File holding the shared secret (the same file as the sender's).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Where the TLS certificate and key live (created on first use).
        #[arg(long, default_value = "/var/lib/cr-migrate")]
        state_dir: PathBuf,
        /// Where incoming images are assembled.
        #[arg(long, default_value = "/var/tmp/cr-migrate")]
        work_dir: PathBuf,
        /// Keep the assembled image after a successful migration.
        #[arg(long)]
        keep_images: bool,
        /// MiB of received pages held in memory; beyond it pages spill to a
        /// file in the work dir. Default: half of this host's RAM.
        #[arg(long, value_name = "MIB")]
        memory_limit_mib: Option<u64>,
    },
    /// Print the contents of an image directory.
    Show {
        images_dir: PathBuf,
        /// Also list every page run.
        #[arg(long)]
        pages: bool,
    },
    /// Report which kernel features this host has and what each one enables.
    Check {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum PageTransportArg {
    Auto,
    Quic,
    Sealed,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum CompressArg {
    Auto,
    Always,
    Never,
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
}

/// Keeps page buffers in the heap. glibc serves blocks of 128 KiB and more
/// (its threshold adapts up to a few MiB) with a fresh `mmap` each, and
/// trims the heap as soon as 128 KiB are free at its top: a migration that
/// moves a GiB in 1 MiB batches, allocated by one thread and freed by
/// another, then page-faults every batch in again and unmaps it after (an
/// eighth of the sender's CPU). Fixed thresholds keep that memory in the
/// heap, recycled; what is held stays bounded by the batch queues.
fn tune_malloc() {
    // SAFETY: mallopt only sets allocator parameters; called before any
    // thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

fn main() {
    tune_malloc();
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let result = match cli.command {
        Command::Dump {
            pid,
            images_dir,
            leave_running,
            shell_job,
            ipc_keys,
        } => cmd_dump::run(pid, &images_dir, leave_running, shell_job, ipc_keys),
        Command::Restore {
            images_dir,
            detach,
            shell_job,
            lazy_pages,
            announce,
            lazy_pages_fd,
        } => cmd_restore::run(
            &images_dir,
            cmd_restore::Options {
                detach,
                shell_job,
                lazy_pages,
                announce,
                lazy_pages_fd,
            },
        ),
        Command::Show { images_dir, pages } => cmd_show::run(&images_dir, pages),
        Command::Send {
            pid,
            dest,
            token_file,
            pin_fingerprint,
            max_downtime_ms,
            max_rounds,
            compress,
            streams,
            page_transport,
            json,
            shell_job,
            ipc_keys,
        } => cmd_send::run(cmd_send::Args {
            pid,
            dest,
            token_file,
            pin: pin_fingerprint,
            max_downtime_ms,
            max_rounds,
            compress: match compress {
                CompressArg::Auto => transport::Compress::Auto,
                CompressArg::Always => transport::Compress::Always,
                CompressArg::Never => transport::Compress::Never,
            },
            streams,
            page_transport: match page_transport {
                PageTransportArg::Auto => transport::PageTransport::Auto,
                PageTransportArg::Quic => transport::PageTransport::Quic,
                PageTransportArg::Sealed => transport::PageTransport::Sealed,
            },
            json,
            shell_job,
            ipc_keys,
        }),
        Command::Receive {
            listen,
            token_file,
            state_dir,
            work_dir,
            keep_images,
            memory_limit_mib,
        } => cmd_receive::run(cmd_receive::Args {
            listen,
            token_file,
            state_dir,
            work_dir,
            keep_images,
            memory_limit_mib,
        }),
        Command::Check { json } => cmd_check::run(json).map(|()| 0),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("cr-migrate: error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            std::process::exit(1);
        }
    }
}

/// A SysV IPC key: decimal (possibly negative, as `ipcs` prints keys with
/// the top bit set) or `0x` hex; 0 (IPC_PRIVATE) names no object.
fn parse_ipc_key(s: &str) -> Result<i32, String> {
    let v = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => i64::from_str_radix(h, 16).map_err(|e| e.to_string())?,
        None => s.parse::<i64>().map_err(|e| e.to_string())?,
    };
    let key = match v {
        0..=0xffff_ffff => v as u32 as i32,
        v if v >= i64::from(i32::MIN) && v < 0 => v as i32,
        _ => return Err(format!("{s} is not a 32-bit key")),
    };
    if key == 0 {
        return Err("key 0 is IPC_PRIVATE: it names no object".into());
    }
    Ok(key)
}

#[cfg(test)]
mod ipc_key_tests {
    use super::parse_ipc_key;

    #[test]
    fn ipc_keys() {
        assert_eq!(parse_ipc_key("0x4352ba01"), Ok(0x4352ba01));
        assert_eq!(parse_ipc_key("0xdeadbeef"), Ok(0xdeadbeefu32 as i32));
        assert_eq!(parse_ipc_key("-559038737"), Ok(0xdeadbeefu32 as i32));
        assert_eq!(parse_ipc_key("1234"), Ok(1234));
        assert!(parse_ipc_key("0").is_err());
        assert!(parse_ipc_key("0x100000000").is_err());
        assert!(parse_ipc_key("key").is_err());
    }
}
