//! [`NetnsPair`]: two network namespaces joined by a veth pair, as two "hosts" on
//! this machine (DESIGN.md §6), deleted on drop together with every process still in
//! them.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::procs;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Namespaces `a` (address `addr_a`) and `b` (`addr_b`), a /30 between them, `lo` up
/// in both. Dropping it SIGKILLs the processes left in them and deletes both.
#[derive(Debug)]
pub struct NetnsPair {
    /// Name of the first namespace (`crm-a-<pid>-<n>`).
    pub a: String,
    /// Name of the second namespace (`crm-b-<pid>-<n>`).
    pub b: String,
    /// Address of the veth end in `a` (10.213.x.1).
    pub addr_a: String,
    /// Address of the veth end in `b` (10.213.x.2).
    pub addr_b: String,
    created: Vec<String>,
}

/// The `ip` binary, if on `PATH` (or in /sbin, /usr/sbin).
pub fn ip_bin() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join("ip"))
        .find(|p| p.is_file())
}

fn ip(args: &[&str]) -> Result<(), String> {
    let bin = ip_bin().ok_or("`ip` (iproute2) is not installed")?;
    let out = Command::new(&bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {}: {e}", bin.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl NetnsPair {
    /// Creates the pair. On error whatever was created is deleted again and the
    /// message says which step failed (for a skip reason).
    pub fn create() -> Result<NetnsPair, String> {
        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let x = (pid + n * 7) % 250 + 1;
        let mut pair = NetnsPair {
            a: format!("crm-a-{pid}-{n}"),
            b: format!("crm-b-{pid}-{n}"),
            addr_a: format!("10.213.{x}.1"),
            addr_b: format!("10.213.{x}.2"),
            created: Vec::new(),
        };
        // Interface names have at most 15 characters.
        let (va, vb) = (format!("cva{pid}n{n}"), format!("cvb{pid}n{n}"));
        for ns in [pair.a.clone(), pair.b.clone()] {
            ip(&["netns", "add", &ns])?;
            pair.created.push(ns);
        }
        let (a, b) = (pair.a.clone(), pair.b.clone());
        ip(&[
            "link", "add", &va, "netns", &a, "type", "veth", "peer", "name", &vb, "netns", &b,
        ])?;
        for (ns, dev, addr) in [(&a, &va, &pair.addr_a), (&b, &vb, &pair.addr_b)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(pair)
    }

    /// `ip netns exec NS`, to put in front of a command.
    pub fn exec_prefix(&self, ns: &str) -> Vec<String> {
        let ip = ip_bin()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|| "ip".into());
        vec![ip, "netns".into(), "exec".into(), ns.into()]
    }

    /// The PIDs of the processes in namespace `ns` (`ip netns pids`).
    pub fn pids(ns: &str) -> Vec<i32> {
        let Some(bin) = ip_bin() else {
            return Vec::new();
        };
        Command::new(bin)
            .args(["netns", "pids", ns])
            .stdin(Stdio::null())
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        let mut problems = Vec::new();
        for ns in self.created.iter().rev() {
            let left = NetnsPair::pids(ns);
            for &pid in &left {
                if pid != procs::getpid() && !procs::kill_and_reap(pid) {
                    problems.push(format!("pid {pid} in {ns} survives SIGKILL"));
                }
            }
            if !left.is_empty() {
                eprintln!("killed processes left in netns {ns}: {left:?}");
            }
            // Deleting the namespace also deletes the veth end in it.
            if let Err(e) = ip(&["netns", "del", ns]) {
                problems.push(e);
            }
        }
        if !problems.is_empty() {
            let msg = format!("LINGERING: {}", problems.join("; "));
            if std::thread::panicking() {
                eprintln!("{msg}");
            } else {
                panic!("{msg}");
            }
        }
    }
}
