//! `cr-migrate show`: print an image directory in a readable form.
use anyhow::Context;
use crm_engine::image::ImageDir;
use crm_proto::image::VmaKind;
use std::path::Path;

fn prot(p: u32) -> String {
    let f = |bit: i32, c: char| if p & bit as u32 != 0 { c } else { '-' };
    [
        f(libc::PROT_READ, 'r'),
        f(libc::PROT_WRITE, 'w'),
        f(libc::PROT_EXEC, 'x'),
    ]
    .iter()
    .collect()
}

pub fn run(dir: &Path, show_pages: bool) -> anyhow::Result<i32> {
    let image = ImageDir::open(dir).with_context(|| format!("opening image {}", dir.display()))?;
    let inv = image.read_inventory()?;
    println!(
        "image {} (format {}, cr-migrate {}, kernel {}, xfeatures {:#x}{})",
        dir.display(),
        inv.format_version,
        inv.tool_version,
        inv.kernel_release,
        inv.xfeatures,
        if inv.shell_job { ", shell job" } else { "" }
    );
    let tree = image.read_tree()?;
    let mut zombies = std::collections::BTreeSet::new();
    if let Some(t) = &tree {
        println!(
            "\ntree of {} task(s), root {}:",
            t.tasks.len(),
            inv.root_pid
        );
        for e in &t.tasks {
            let what = if e.zombie {
                zombies.insert(e.pid);
                format!("zombie, wait status {:#x}", e.exit_status)
            } else {
                format!("{} thread(s)", e.threads.len())
            };
            println!(
                "  {} ppid {} pgid {} sid {} exit signal {}: {what}",
                e.pid, e.ppid, e.pgid, e.sid, e.exit_signal
            );
        }
    }
    if let Some(ipc) = image.read_ipc()? {
        println!("\nSysV IPC:");
        for line in crm_engine::ipc::describe(&ipc) {
            println!("  {line}");
        }
    }
    for &pid in inv.pids.iter().filter(|p| !zombies.contains(p)) {
        let core = image.read_core(pid)?;
        let mm = image.read_mm(pid)?;
        let files = image.read_files(pid)?;
        let pages = image.pages_reader(pid)?;
        println!(
            "\nprocess {pid} '{}' ppid {} pgid {} sid {} cwd {} umask {:03o}",
            core.comm, core.ppid, core.pgid, core.sid, core.cwd, core.umask
        );
        if let Some(c) = &core.creds {
            println!(
                "  uids {:?} gids {:?} groups {:?} cap_eff {:#x}",
                c.uids, c.gids, c.groups, c.cap_eff
            );
        }
        println!("  threads:");
        for t in &core.threads {
            let r = t.regs.unwrap_or_default();
            println!(
                "    {} '{}' rip {:#x} rsp {:#x} fs_base {:#x} blocked {:#x} rseq {:#x} xsave {} bytes, {} pending",
                t.tid,
                t.comm,
                r.rip,
                r.rsp,
                r.fs_base,
                t.blocked_mask,
                t.rseq.map_or(0, |r| r.abi_pointer),
                t.xsave.len(),
                t.pending.len()
            );
        }
        let handled: Vec<String> = core
            .sigactions
            .iter()
            .filter(|a| a.handler > 1)
            .map(|a| a.signo.to_string())
            .collect();
        println!("  signal handlers for: {}", handled.join(" "));
        for t in core.itimers.iter().filter(|t| t.value_us > 0) {
            println!(
                "  itimer {}: {} us left, interval {} us",
                t.which, t.value_us, t.interval_us
            );
        }
        for t in &core.posix_timers {
            let notify = match t.notify {
                0 => format!("signal {}", t.signo),
                1 => "no signal".to_string(),
                _ => format!("signal {} to thread {}", t.signo, t.notify_tid),
            };
            println!(
                "  posix timer {}: clock {}, {notify}, value {:#x}, {} ns left, interval {} ns",
                t.id, t.clock, t.sigev_value, t.value_ns, t.interval_ns
            );
        }
        println!(
            "  mm: code {:#x}-{:#x} brk {:#x}-{:#x} stack {:#x} exe {}",
            mm.start_code,
            mm.end_code,
            mm.start_brk,
            mm.brk,
            mm.start_stack,
            mm.exe.as_ref().map_or("?", |f| f.path.as_str())
        );
        println!("  VMAs:");
        for v in &mm.vmas {
            let kind = v.kind();
            let name = match kind {
                VmaKind::File => v.file.as_ref().map_or("?".into(), |f| f.path.clone()),
                VmaKind::SysvShm => format!("SysV shm segment {}", v.sysv_shmid),
                VmaKind::Memfd => v.memfd.as_ref().map_or("memfd ?".into(), |m| {
                    format!("memfd {:?} (inode {}) at {:#x}", m.name, m.ino, v.pgoff)
                }),
                other => format!("{other:?}").to_lowercase(),
            };
            println!(
                "    {:012x}-{:012x} {}{} {:>8} KiB {}",
                v.start,
                v.end,
                prot(v.prot),
                if v.shared { 's' } else { 'p' },
                (v.end - v.start) / 1024,
                name
            );
        }
        println!("  files:");
        for f in &files.fds {
            match &f.kind {
                Some(crm_proto::image::fd_entry::Kind::Regular(r)) => println!(
                    "    fd {} {} flags {:#o} pos {}{}{}{}{}",
                    f.fd,
                    r.file.as_ref().map_or("?", |f| f.path.as_str()),
                    r.flags,
                    r.pos,
                    r.dup_of
                        .map_or(String::new(), |n| format!(" (dup of fd {n})")),
                    r.ghost.as_ref().map_or(String::new(), |g| format!(
                        " (unlinked: {} bytes saved, mode {:o})",
                        g.contents.len(),
                        g.mode
                    )),
                    if r.locks.is_empty() {
                        String::new()
                    } else {
                        format!(
                            " locks: {}",
                            r.locks
                                .iter()
                                .map(crm_engine::files::locks::describe)
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    },
                    if f.cloexec { " cloexec" } else { "" }
                ),
                Some(crm_proto::image::fd_entry::Kind::Fifo(p)) => println!(
                    "    fd {} {}{}",
                    f.fd,
                    crm_engine::files::fifo::describe(p),
                    if f.cloexec { " cloexec" } else { "" }
                ),
                Some(crm_proto::image::fd_entry::Kind::Eventfd(e)) => println!(
                    "    fd {} eventfd count {}{}{}{}",
                    f.fd,
                    e.count,
                    if e.semaphore { " semaphore" } else { "" },
                    if e.flags & libc::O_NONBLOCK as u32 != 0 {
                        " nonblock"
                    } else {
                        ""
                    },
                    if f.cloexec { " cloexec" } else { "" }
                ),
                Some(crm_proto::image::fd_entry::Kind::Signalfd(s)) => println!(
                    "    fd {} signalfd mask {:#x}{}{}",
                    f.fd,
                    s.sigmask,
                    if s.flags & libc::O_NONBLOCK as u32 != 0 {
                        " nonblock"
                    } else {
                        ""
                    },
                    if f.cloexec { " cloexec" } else { "" }
                ),
                Some(crm_proto::image::fd_entry::Kind::Timerfd(t)) => println!(
                    "    fd {} timerfd clock {} next in {} ns every {} ns, {} unread{}{}",
                    f.fd,
                    t.clockid,
                    t.value_ns,
                    t.interval_ns,
                    t.ticks,
                    if t.flags & libc::O_NONBLOCK as u32 != 0 {
                        " nonblock"
                    } else {
                        ""
                    },
                    if f.cloexec { " cloexec" } else { "" }
                ),
                Some(crm_proto::image::fd_entry::Kind::Epoll(e)) => println!(
                    "    fd {} epoll watching {}{}",
                    f.fd,
                    e.targets
                        .iter()
                        .map(|t| format!("fd {} events {:#x} data {:#x}", t.fd, t.events, t.data))
                        .collect::<Vec<_>>()
                        .join(", "),
                    if f.cloexec { " cloexec" } else { "" }
                ),
                Some(crm_proto::image::fd_entry::Kind::Pipe(p)) => println!(
                    "    fd {} pipe:[{}] {} end, size {}, {} bytes buffered{}{}",
                    f.fd,
                    p.id,
                    if p.write_end { "write" } else { "read" },
                    p.size,
                    p.data.len(),
                    if p.flags & libc::O_NONBLOCK as u32 != 0 {
                        " nonblock"
                    } else {
                        ""
                    },
                    if f.cloexec { " cloexec" } else { "" }
                ),
                Some(crm_proto::image::fd_entry::Kind::UnixSocket(s)) => println!(
                    "    fd {} {}{}",
                    f.fd,
                    crm_engine::files::unix::describe(s),
                    if f.cloexec { " cloexec" } else { "" }
                ),
                Some(crm_proto::image::fd_entry::Kind::InetSocket(s)) => println!(
                    "    fd {} {}{}",
                    f.fd,
                    crm_engine::files::inet::describe(s),
                    if f.cloexec { " cloexec" } else { "" }
                ),
                Some(crm_proto::image::fd_entry::Kind::Inotify(i)) => println!(
                    "    fd {} {}{}",
                    f.fd,
                    crm_engine::files::inotify::describe(i),
                    if f.cloexec { " cloexec" } else { "" }
                ),
                Some(crm_proto::image::fd_entry::Kind::Memfd(m)) => println!(
                    "    fd {} {}{}",
                    f.fd,
                    crm_engine::files::memfd::describe(m),
                    if f.cloexec { " cloexec" } else { "" }
                ),
                Some(crm_proto::image::fd_entry::Kind::Tty(t)) => println!(
                    "    fd {} {}{}",
                    f.fd,
                    crm_engine::files::tty::describe(t),
                    if f.cloexec { " cloexec" } else { "" }
                ),
                None => println!("    fd {} (unknown kind)", f.fd),
            }
            if f.shared != 0 {
                println!(
                    "      shared with other tasks: object {}{}",
                    f.shared,
                    if f.shared_owner {
                        ", described here"
                    } else {
                        ""
                    }
                );
            }
        }
        println!(
            "  pages: {} in {} runs ({:.1} MiB)",
            pages.total_pages(),
            pages.runs().len(),
            pages.total_pages() as f64 * 4096.0 / (1 << 20) as f64
        );
        if show_pages {
            for r in pages.runs() {
                println!(
                    "    {:012x} {:>6} pages at page {}",
                    r.vaddr, r.nr_pages, r.page_index
                );
            }
        }
    }
    Ok(0)
}
