//! The source side of a live migration (`cr-migrate send`).
//!
//! State machine (DESIGN §5): `Connect → Handshake → PreCopy(0..n) → Freeze →
//! FinalDump → Transfer → [PidsBusy → release] → Restore (remote) →
//! Commit (kill source) | Abort (resume source)`.
//!
//! All ptrace work runs on one dedicated OS thread ([`engine_thread`]), which
//! owns the [`PreCopy`] and later the frozen process; the async side talks to
//! it with commands and receives pages and results as [`Event`]s over a
//! bounded channel (back-pressure keeps memory bounded). Whatever goes wrong
//! before the destination reports the process running — an error, a dropped
//! connection, Ctrl-C — ends in `Cmd::Abort`: the engine thread removes the
//! dirty tracking and resumes the process exactly as it was.
use super::policy::{self, Decision, Policy, RoundRecord};
use super::report::{Report, RoundReport};
use super::{chain, now_unix_us, Progress};
use crate::transport::{Compress, PageSender, PageTransport, Session};
use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use crm_engine::dump::tree::FrozenTree;
use crm_engine::dump::{DumpError, DumpOptions, PageSink};
use crm_engine::image::ImageDir;
use crm_engine::mm_holder::MemoryHolder;
use crm_engine::precopy::RoundStats;
use crm_engine::precopy_tree::{TaskFinal, TreeFinal, TreePreCopy, TreeSink};
use crm_proto::image::ProcessTree;
use crm_proto::migrate::{control, Control};
use prost::Message;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How long a control message may still take once the receiver closed
/// its page channels.
const CLOSED_GRACE: Duration = Duration::from_secs(2);

/// Largest batch handed to the transport.
const BATCH_BYTES: usize = 1 << 20;

pub struct SendOptions {
    pub pid: i32,
    pub policy: Policy,
    pub compress: Compress,
    pub streams: usize,
    pub page_transport: PageTransport,
    pub shell_job: bool,
    /// SysV IPC objects to move besides the shared memory the tree attached.
    pub ipc_keys: Vec<i32>,
}

enum Cmd {
    Round,
    Finish,
    Kill,
    Abort,
}

enum Event {
    Started {
        tracker: &'static str,
        tasks: usize,
    },
    Pages {
        pid: i32,
        vaddr: u64,
        data: Bytes,
    },
    Zero {
        pid: i32,
        vaddr: u64,
        nr_pages: u64,
    },
    RoundDone(RoundStats),
    Final {
        /// Root first.
        tasks: Vec<TaskFinal>,
        tree: ProcessTree,
        stats: RoundStats,
        frozen_at_us: u64,
    },
    Killed,
    Resumed,
    Error(String),
}

/// Pages from the engine thread to the async sender, of task `pid`.
struct ChannelSink {
    pid: i32,
    tx: mpsc::Sender<Event>,
}

impl ChannelSink {
    fn send(&self, ev: Event) -> Result<(), DumpError> {
        self.tx.blocking_send(ev).map_err(|_| DumpError::Io {
            pid: self.pid,
            what: "hand pages to the migration connection".into(),
            source: std::io::Error::other("the sender stopped"),
        })
    }
}

impl PageSink for ChannelSink {
    fn add_run(&mut self, vaddr: u64, data: &[u8]) -> Result<(), DumpError> {
        self.add_run_owned(vaddr, Bytes::copy_from_slice(data))
    }

    fn keeps_pages(&self) -> bool {
        true
    }

    /// Sends `data` on in batches of [`BATCH_BYTES`], slices of one buffer.
    fn add_run_owned(&mut self, vaddr: u64, data: Bytes) -> Result<(), DumpError> {
        let mut at = 0;
        while at < data.len() {
            let end = (at + BATCH_BYTES).min(data.len());
            self.send(Event::Pages {
                pid: self.pid,
                vaddr: vaddr + at as u64,
                data: data.slice(at..end),
            })?;
            at = end;
        }
        Ok(())
    }

    fn zero_run(&mut self, vaddr: u64, nr_pages: u64) -> Result<(), DumpError> {
        self.send(Event::Zero {
            pid: self.pid,
            vaddr,
            nr_pages,
        })
    }
}

impl TreeSink for ChannelSink {
    fn task(&mut self, pid: i32) -> &mut dyn PageSink {
        self.pid = pid;
        self
    }
}

/// Kills the frozen tree. A single process is killed beside a memory
/// holder: a second task holding the address space lets the process exit
/// (and free its PID) without tearing down its memory first; that happens
/// when the holder is dropped, after `Killed` went out.
/// Kills the frozen tree. Returns the memory holder, if one was made: the
/// original's memory goes when it is dropped.
fn kill_tree(frozen: FrozenTree, tx: &mpsc::Sender<Event>) -> Option<MemoryHolder> {
    let root = frozen.tasks.first().map_or(0, |f| f.pid());
    let holder = match frozen.tasks.as_slice() {
        [only] => MemoryHolder::spawn(only)
            .map_err(|e| tracing::debug!(root, "killing without a memory holder: {}", chain(&e)))
            .ok(),
        _ => None,
    };
    let ev = match frozen.kill() {
        Ok(()) => Event::Killed,
        Err(e) => Event::Error(format!("killing the tree of process {root}: {e}")),
    };
    let _ = tx.blocking_send(ev);
    holder
}

/// Owns every ptrace interaction with the migrated tree.
fn engine_thread(
    pid: i32,
    opts: DumpOptions,
    side: ImageDir,
    cmds: std_mpsc::Receiver<Cmd>,
    tx: mpsc::Sender<Event>,
) {
    let send = |e: Event| tx.blocking_send(e).is_ok();
    let mut pre = match TreePreCopy::start(pid, &opts) {
        Ok(p) => p,
        Err(e) => {
            send(Event::Error(chain(&e)));
            return;
        }
    };
    if !send(Event::Started {
        tracker: pre.tracker_name(),
        tasks: pre.tasks(),
    }) {
        return;
    }
    let mut sink = ChannelSink {
        pid,
        tx: tx.clone(),
    };
    loop {
        match cmds.recv() {
            Ok(Cmd::Round) => match pre.round(&mut sink) {
                Ok(st) => {
                    send(Event::RoundDone(st));
                }
                Err(e) => {
                    send(Event::Error(chain(&e)));
                    return; // `pre` dropped: tracking removed, tree untouched
                }
            },
            Ok(Cmd::Finish) => {
                let frozen_at_us = now_unix_us();
                let fin = match pre.finish(&mut sink, &side) {
                    Ok(f) => f,
                    Err(e) => {
                        send(Event::Error(chain(&e)));
                        return; // frozen tree dropped inside: resumed
                    }
                };
                let TreeFinal {
                    frozen,
                    tasks,
                    tree,
                    last_round,
                    tracking,
                    ipc,
                    ..
                } = fin;
                send(Event::Final {
                    tasks,
                    tree,
                    stats: last_round,
                    frozen_at_us,
                });
                // Only an explicit Kill ends the tree; anything else resumes it.
                match cmds.recv() {
                    Ok(Cmd::Kill) => {
                        let holder = kill_tree(frozen, &tx);
                        // The SysV objects moved with the tree, as a dump
                        // that kills its tree removes them.
                        ipc.remove();
                        // Tearing down the original's memory (tens of ms
                        // for a GiB) waits until the migration is over (the
                        // driver drops its end of the channel): it would
                        // compete with the destination's restore for the CPU.
                        let _ = cmds.recv();
                        drop(holder);
                    }
                    _ => {
                        send(match frozen.thaw() {
                            Ok(()) => Event::Resumed,
                            Err(e) => Event::Error(format!("resuming process {pid}: {e}")),
                        });
                    }
                };
                // After the kill or the thaw: removing tracking from a
                // dead tree costs nothing.
                drop(tracking);
                return;
            }
            Ok(Cmd::Kill) => {}
            Ok(Cmd::Abort) | Err(_) => {
                let r = pre.abort();
                send(match r {
                    Ok(()) => Event::Resumed,
                    Err(e) => Event::Error(chain(&e)),
                });
                return;
            }
        }
    }
}

/// This machine's boot id: tells a same-host migration apart.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn ctl(msg: control::Msg) -> Control {
    Control { msg: Some(msg) }
}

struct Driver<'a> {
    session: &'a Session,
    pages: PageSender,
    cmds: std_mpsc::Sender<Cmd>,
    events: mpsc::Receiver<Event>,
    pid: i32,
    progress: Progress,
    report: Report,
    /// The engine thread reported the process resumed or killed.
    settled: bool,
    /// The side image directory (see [`super::side_files`]).
    side: std::path::PathBuf,
}

/// Removes a scratch directory when dropped.
struct RemoveDir(std::path::PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Driver<'_> {
    async fn event(&mut self) -> Result<Event> {
        match self.events.recv().await {
            Some(Event::Error(e)) => bail!("process {}: {e}", self.pid),
            Some(ev) => Ok(ev),
            None => bail!("the engine thread of process {} stopped", self.pid),
        }
    }

    /// Forwards pages until the round's end event; returns it.
    async fn pump(&mut self, round: u32) -> Result<Event> {
        loop {
            match self.event().await? {
                Event::Pages { pid, vaddr, data } => {
                    self.progress.pages(data.len() as u64);
                    self.pages
                        .send_batch(pid, round, vaddr, data)
                        .await
                        .with_context(|| format!("sending pages to {}", self.session.peer()))?;
                }
                Event::Zero {
                    pid,
                    vaddr,
                    nr_pages,
                } => {
                    self.session
                        .send_control(&ctl(control::Msg::ZeroPages(
                            crm_proto::migrate::ZeroPages {
                                pid,
                                round,
                                vaddr,
                                nr_pages,
                            },
                        )))
                        .await?;
                }
                ev @ (Event::RoundDone(_) | Event::Final { .. }) => return Ok(ev),
                Event::Resumed | Event::Killed => {
                    self.settled = true;
                    bail!("process {} was released unexpectedly", self.pid)
                }
                Event::Started { .. } | Event::Error(_) => {}
            }
        }
    }

    /// Ends a round: flushes its pages and announces it. With `wait_stored`
    /// (every round before the final one) also waits until the destination
    /// has stored all of it, so the round's time is the real end-to-end time
    /// and nothing of it is still queued when the process is frozen.
    async fn end_round(
        &mut self,
        round: u32,
        stats: &RoundStats,
        batches_before: u64,
        started: Instant,
        wait_stored: bool,
    ) -> Result<RoundRecord> {
        self.pages.flush().await?;
        let st = self.pages.stats();
        let batches = st.batches - batches_before;
        let bytes = stats.mem.pages_written * 4096;
        self.session
            .send_control(&ctl(control::Msg::RoundEnd(crm_proto::migrate::RoundEnd {
                round,
                pages: stats.mem.pages_written,
                bytes,
                batches,
            })))
            .await?;
        if wait_stored {
            self.wait_stored(round).await?;
        }
        let elapsed = started.elapsed();
        self.report.rounds.push(RoundReport {
            round,
            dirty_pages: stats.dirty_pages,
            pages_sent: stats.mem.pages_written,
            zero_pages: stats.mem.zero_pages,
            bytes_sent: bytes,
            elapsed,
        });
        self.progress
            .round_done(round, bytes, elapsed, stats.dirty_pages);
        Ok(RoundRecord {
            round,
            bytes,
            elapsed,
        })
    }

    /// The next control message from the destination. A receiver that
    /// dies closes its page channels at once, while its QUIC session would
    /// take the idle timeout (60 s) to be declared lost: once the channels
    /// are closed (a receiver keeps them open until it is done), the
    /// message has [`CLOSED_GRACE`] to arrive. `what(peer)` says what was
    /// awaited, for the error.
    async fn recv_control_or_gone(
        &self,
        what: impl Fn(std::net::SocketAddr) -> String,
    ) -> Result<Control> {
        let peer = self.session.peer();
        tokio::select! {
            m = self.session.recv_control() => m.with_context(|| what(peer)),
            _ = self.pages.channels_closed() => {
                match tokio::time::timeout(CLOSED_GRACE, self.session.recv_control()).await {
                    Ok(m) => m.with_context(|| what(peer)),
                    Err(_) => Err(anyhow!(
                        "{peer} closed its page channels and went silent: the receiver is gone"
                    ))
                    .with_context(|| what(peer)),
                }
            }
        }
    }

    /// Waits for the destination's `RoundStored` of `round`.
    async fn wait_stored(&mut self, round: u32) -> Result<()> {
        loop {
            let msg = self
                .recv_control_or_gone(|peer| format!("waiting for {peer} to store round {round}"))
                .await?;
            match msg.msg {
                Some(control::Msg::RoundStored(r)) if r.round == round => return Ok(()),
                Some(control::Msg::Abort(a)) => bail!("the destination aborted: {}", a.reason),
                _ => {}
            }
        }
    }

    async fn wait_killed(&mut self) -> Result<()> {
        self.cmds
            .send(Cmd::Kill)
            .map_err(|_| anyhow!("the engine thread stopped"))?;
        loop {
            match self.event().await? {
                Event::Killed => {
                    self.settled = true;
                    return Ok(());
                }
                Event::Resumed => {
                    self.settled = true;
                    bail!("process {} was resumed instead of killed", self.pid)
                }
                _ => {}
            }
        }
    }

    async fn run(&mut self, policy: &Policy) -> Result<()> {
        match self.event().await? {
            Event::Started { tracker, tasks } => {
                self.report.tracker = tracker.to_string();
                let what = match tasks {
                    1 => format!("process {}", self.pid),
                    n => format!("the tree of process {} ({n} live tasks)", self.pid),
                };
                tracing::info!(
                    "migrating {what} to {} (dirty tracking: {tracker})",
                    self.session.peer()
                );
            }
            _ => bail!("unexpected first event from the engine thread"),
        }
        let mut history = Vec::new();
        let mut round = 0u32;
        loop {
            let started = Instant::now();
            let batches_before = self.pages.stats().batches;
            self.session
                .send_control(&ctl(control::Msg::RoundStart(
                    crm_proto::migrate::RoundStart { round },
                )))
                .await?;
            self.progress.round_start(round);
            self.cmds
                .send(Cmd::Round)
                .map_err(|_| anyhow!("the engine thread stopped"))?;
            let Event::RoundDone(stats) = self.pump(round).await? else {
                bail!("unexpected event during round {round}");
            };
            history.push(
                self.end_round(round, &stats, batches_before, started, true)
                    .await?,
            );
            round += 1;
            let d = policy::decide(policy, &history);
            if d != Decision::Continue {
                self.report.stop_reason = d.reason().to_string();
                break;
            }
        }

        // Freeze and final dump.
        let started = Instant::now();
        let batches_before = self.pages.stats().batches;
        self.session
            .send_control(&ctl(control::Msg::RoundStart(
                crm_proto::migrate::RoundStart { round },
            )))
            .await?;
        self.progress.round_start(round);
        self.cmds
            .send(Cmd::Finish)
            .map_err(|_| anyhow!("the engine thread stopped"))?;
        let Event::Final {
            tasks,
            tree,
            stats,
            frozen_at_us,
        } = self.pump(round).await?
        else {
            bail!("unexpected event during the final round");
        };
        self.end_round(round, &stats, batches_before, started, false)
            .await?;
        self.report.frozen_at_unix_us = frozen_at_us;
        let side_bytes = super::side_files::send(self.session, &self.side)
            .await
            .context("sending the memfds and SysV IPC objects")?;
        if side_bytes > 0 {
            tracing::info!(
                "memfd and SysV IPC objects sent ({:.1} MiB)",
                side_bytes as f64 / (1 << 20) as f64
            );
        }
        let final_state = final_state(&tasks, &tree, round, frozen_at_us)?;
        // Every thread of the tree: what a same-host destination may find busy.
        let our_tids: Vec<i32> = tasks
            .iter()
            .flat_map(|t| t.state.core.threads.iter().map(|th| th.tid))
            .chain(tree.tasks.iter().map(|e| e.pid))
            .collect();
        self.session
            .send_control(&ctl(control::Msg::FinalState(final_state)))
            .await?;
        self.progress
            .stage("waiting for the destination to restore");

        let mut killed_early = false;
        loop {
            let msg = self
                .recv_control_or_gone(|peer| format!("waiting for the restore result from {peer}"))
                .await?;
            match msg.msg {
                Some(control::Msg::PidsBusy(busy)) => {
                    let ours = busy.pids.iter().all(|p| our_tids.contains(p));
                    if busy.boot_id != boot_id() || !ours {
                        bail!(
                            "the destination cannot restore: PIDs {:?} are in use there by other processes",
                            busy.pids
                        );
                    }
                    // Same host: the original must go before its copy can have its PID.
                    tracing::info!(
                        "same-host migration: releasing PID {} for the restored copy",
                        self.pid
                    );
                    self.wait_killed().await?;
                    killed_early = true;
                    self.session
                        .send_control(&ctl(control::Msg::PidsReleased(
                            crm_proto::migrate::PidsReleased {},
                        )))
                        .await?;
                }
                Some(control::Msg::RestoreResult(r)) if r.ok => {
                    if !killed_early {
                        self.wait_killed().await?;
                    }
                    self.report.restored_at_unix_us = r.restored_at_unix_us;
                    self.session
                        .send_control(&ctl(control::Msg::Commit(crm_proto::migrate::Commit {})))
                        .await?;
                    return Ok(());
                }
                Some(control::Msg::RestoreResult(r)) => {
                    if killed_early {
                        bail!(
                            "the destination failed to restore process {} after the source was released: {} \
                             (the complete image is kept at the destination: {})",
                            self.pid,
                            r.error,
                            r.images_dir
                        );
                    }
                    bail!(
                        "the destination failed to restore process {}: {}",
                        self.pid,
                        r.error
                    );
                }
                Some(control::Msg::Abort(a)) => bail!("the destination aborted: {}", a.reason),
                _ => {}
            }
        }
    }
}

fn flatten(ranges: &[(u64, u64)]) -> Vec<u64> {
    ranges.iter().flat_map(|&(a, b)| [a, b]).collect()
}

/// The `FinalState` message of a frozen tree (`tasks`: root first).
fn final_state(
    tasks: &[TaskFinal],
    tree: &ProcessTree,
    round: u32,
    frozen_at_us: u64,
) -> Result<crm_proto::migrate::FinalState> {
    let (root, others) = tasks
        .split_first()
        .ok_or_else(|| anyhow!("the frozen tree has no live task"))?;
    let s = &root.state;
    Ok(crm_proto::migrate::FinalState {
        inventory: s.inventory.encode_to_vec(),
        core: s.core.encode_to_vec(),
        mm: s.mm.encode_to_vec(),
        files: s.files.encode_to_vec(),
        final_round: round,
        resident: flatten(&root.resident),
        frozen_at_unix_us: frozen_at_us,
        others: others
            .iter()
            .map(|t| crm_proto::migrate::TaskFinalState {
                core: t.state.core.encode_to_vec(),
                mm: t.state.mm.encode_to_vec(),
                files: t.state.files.encode_to_vec(),
                resident: flatten(&t.resident),
            })
            .collect(),
        tree: if tasks.len() > 1 || tree.tasks.len() > 1 {
            tree.encode_to_vec()
        } else {
            Vec::new()
        },
    })
}

/// Migrates `opts.pid` to the peer of `session`.
pub async fn send(session: Session, opts: &SendOptions, progress: Progress) -> Result<Report> {
    let started = Instant::now();
    let (cmd_tx, cmd_rx) = std_mpsc::channel();
    // 16 batches of 1 MiB between the engine thread and the page streams:
    // enough to keep both busy; more only adds memory to fault in.
    let (ev_tx, ev_rx) = mpsc::channel(16);
    let pid = opts.pid;
    let dump_opts = DumpOptions {
        leave_running: true,
        shell_job: opts.shell_job,
        ipc_keys: opts.ipc_keys.clone(),
    };
    // Where the frozen phase writes the objects stored beside the tasks.
    let side_path = std::env::temp_dir().join(format!("cr-migrate-send-{pid}-{}", now_unix_us()));
    let side = ImageDir::create_scratch(&side_path)
        .with_context(|| format!("creating {}", side_path.display()))?;
    let _side_guard = RemoveDir(side_path.clone());
    let engine = std::thread::Builder::new()
        .name(format!("ptrace-{pid}"))
        .spawn(move || engine_thread(pid, dump_opts, side, cmd_rx, ev_tx))
        .context("starting the engine thread")?;
    let pages = session
        .page_sender(opts.streams, opts.compress, opts.page_transport)
        .await
        .with_context(|| format!("opening page streams to {}", session.peer()))?;
    let page_transport = match (pages.uses_tcp_channels(), pages.sealed()) {
        (true, true) => "tcp-sealed",
        (true, false) => "tcp",
        _ => "quic",
    };
    tracing::debug!(
        streams = pages.streams(),
        page_transport,
        "page streams open"
    );
    let mut d = Driver {
        session: &session,
        pages,
        cmds: cmd_tx,
        events: ev_rx,
        pid,
        progress,
        report: Report {
            page_transport,
            ..Report::default()
        },
        settled: false,
        side: side_path,
    };
    let outcome = tokio::select! {
        r = d.run(&opts.policy) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted (Ctrl-C)")),
    };
    d.progress.finish();
    if let Err(e) = outcome {
        // Resume the process (or remove tracking) and tell the peer.
        let _ = d.cmds.send(Cmd::Abort);
        drop(d.cmds);
        while let Some(ev) = d.events.recv().await {
            match ev {
                Event::Resumed => tracing::info!("process {pid} resumed on this host, as it was"),
                Event::Killed => tracing::warn!("process {pid} had already been released"),
                Event::Error(m) => tracing::error!("while resuming process {pid}: {m}"),
                _ => {}
            }
        }
        let _ = engine.join();
        let reason = format!("{e:#}");
        let _ = session
            .send_control(&ctl(control::Msg::Abort(crm_proto::migrate::Abort {
                reason: reason.clone(),
            })))
            .await;
        // Let the Abort reach the destination (it closes on it) before closing.
        let _ = tokio::time::timeout(Duration::from_secs(3), async {
            while session.recv_control().await.is_ok() {}
        })
        .await;
        session.close_and_flush(&reason).await;
        return Err(e);
    }
    // Every round was flushed and the destination confirmed the restore:
    // the page streams have nothing left to carry. The migration is done
    // here (the process runs there, the original is dead); what follows is
    // cleanup: the engine thread frees the original's memory (a GiB takes
    // tens of ms) and removes the tracker.
    let total = started.elapsed();
    let stats = d.pages.stats();
    tracing::debug!(
        "path MTU {} bytes, RTT {:.2?}",
        session.path_mtu(),
        session.rtt()
    );
    let mut report = d.report;
    drop(d.cmds);
    let _ = engine.join();
    report.wire_bytes = stats.wire_bytes;
    report.raw_bytes = stats.raw_bytes;
    report.compressed_batches = stats.compressed_batches;
    report.batches = stats.batches;
    report.total = total;
    // The Commit must reach the destination before we close: wait until it
    // closes the connection (it exits right after the Commit), 3 s at most.
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        while session.recv_control().await.is_ok() {}
    })
    .await;
    session.close_and_flush("migration committed").await;
    Ok(report)
}
