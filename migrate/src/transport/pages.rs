//! Page streams: [`PageSender`] spreads page batches over several
//! unidirectional QUIC streams, compressing them per [`Compress`];
//! [`PageReceiver`] merges all incoming page streams into one bounded queue.
//!
//! # Sending
//! Each stream has a worker task with a small bounded queue; `send_batch`
//! copies the caller's pages into the least-loaded queue (most free slots,
//! ties broken round-robin) and returns, so compression and writes of
//! different streams proceed in parallel and the caller is slowed down
//! (backpressure) only when every queue is full. At most
//! `n_streams * (QUEUE_DEPTH + 1)` batches are in flight in this process.
//!
//! # Compression policy
//! [`Compress::Never`] sends raw pages; [`Compress::Always`] compresses every
//! batch with zstd level 1 (a batch that does not shrink is sent raw anyway).
//! [`Compress::Auto`] starts raw and decides every [`SAMPLE_EVERY`] batches:
//!
//! - The batch at each decision point is compressed as a trial (while
//!   compressing, every batch is), giving the single-core zstd speed `z`
//!   (raw bytes per second) and the ratio `r` (compressed / raw, smoothed).
//! - The link rate `L` is the larger of the congestion controller's estimate
//!   `cwnd / smoothed RTT` (QUIC `Connection::stats()`, or on TCP page
//!   channels the sum over the channels of `TCP_INFO`'s `cwnd × mss / rtt`:
//!   the QUIC connection then carries only control messages and its window
//!   says nothing about the link) and the wire rate we
//!   actually achieved since the last decision. The first undershoots before
//!   slow start has opened the window, the second when we do not keep the
//!   link busy; each covers the other's blind spot, and neither collapses
//!   while we compress (the window stays open), so the rule does not
//!   oscillate.
//! - With `p = min(n_streams, CPU cores)` workers compressing in parallel,
//!   compressed sending moves raw pages at `C = min(p * z, L / r)`: limited by
//!   the compressors or by the link carrying the smaller data.
//! - Compression is switched **on** when `C > 1.25 * L` and **off** when
//!   `C < L` (hysteresis, so noise near the break-even point does not flip
//!   it). See [`compression_pays`], a pure function tested with given numbers.
//!
//! So on a fast link (10 GbE: `L` above what level-1 zstd can feed) pages
//! go raw, and on a slow link (1 GbE and below, WAN) compressible memory is
//! compressed. To a receiver on the same host (unsealed TCP page channels)
//! `Auto` never compresses: there is no link to spare, and on a loaded host
//! the congestion window's RTT, inflated by scheduling, made the rule switch
//! compression on and spend the CPU the transfer needed.
//!
//! Limit: the model counts the link, not the CPU that QUIC itself spends per
//! byte (encryption, UDP syscalls). Where that is the bottleneck — loopback
//! on a small machine: ~450 MiB/s raw on 2 cores while `cwnd / RTT` says
//! 1-3 GB/s — `Auto` stays raw although 4:1-compressible pages would go
//! faster compressed (measured ~530 MiB/s with `Always`). Over a real link
//! the link is the bottleneck and the rule holds.
//!
//! # Receiving
//! One task accepts the peer's page streams; each stream gets a reader task
//! that reads a batch, decompresses it (into a buffer of exactly the
//! announced length), checks its CRC and queues it. The queue holds
//! [`RECV_QUEUE`] batches, and a reader stops reading while the queue is
//! full, so QUIC flow control stops the sender: memory stays bounded at
//! about `(RECV_QUEUE + streams) * 4 MiB` plus QUIC's receive window.
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crm_page_server::OwnedPages;
use crm_proto::migrate::{Compression, PageBatchHeader};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, Instrument};

use super::error::{Result, TransportError};
use super::frame::{
    batch_decompressor, decode_batch_data, decode_batch_prefix, encode_batch_prefix, read_batch,
    read_stream_magic, FrameKind, MAX_BATCH_BYTES, PAGE_SIZE, PAGE_STREAM_MAGIC,
};
use super::sealed::{write_parts, Opener, Sealer};
use super::tcp_channel::{self, ChannelSecret, IncomingChannel};
use super::{code, MAX_PAGE_STREAMS};

/// Batches queued per sending stream.
pub const QUEUE_DEPTH: usize = 2;
/// Decoded batches queued in a [`PageReceiver`].
pub const RECV_QUEUE: usize = 8;
/// `Compress::Auto` re-decides every this many batches.
pub const SAMPLE_EVERY: u64 = 16;
/// zstd level used for pages.
pub const ZSTD_LEVEL: i32 = 1;
/// Switch compression on when it is this much faster than raw.
pub const SWITCH_ON_GAIN: f64 = 1.25;

/// Compression policy of a [`PageSender`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Compress {
    /// Decide from measured link and compression speed (module docs).
    #[default]
    Auto,
    /// zstd level 1 on every batch.
    Always,
    /// Raw pages.
    Never,
}

/// Inputs of the `Auto` decision, all measured (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkSample {
    /// Estimated link rate, bytes per second on the wire.
    pub link_bytes_per_sec: f64,
    /// zstd level-1 speed on one core, raw bytes in per second.
    pub zstd_bytes_per_sec: f64,
    /// Compressed size / raw size (0 < ratio, 1 = incompressible).
    pub zstd_ratio: f64,
    /// Compressors that can run at once.
    pub parallelism: u32,
}

impl LinkSample {
    /// Raw bytes per second moved when compressing: `min(p * z, L / r)`.
    pub fn compressed_rate(&self) -> f64 {
        let compressors = self.zstd_bytes_per_sec * f64::from(self.parallelism.max(1));
        compressors.min(self.link_bytes_per_sec / self.zstd_ratio)
    }
}

/// The `Auto` rule: should the next batches be compressed? `compressing_now`
/// gives the hysteresis: on when compression is [`SWITCH_ON_GAIN`] times
/// faster than raw, off when it is slower than raw. Garbage measurements
/// (zero, negative, NaN) keep the current state.
pub fn compression_pays(s: &LinkSample, compressing_now: bool) -> bool {
    let sane = |x: f64| x.is_finite() && x > 0.0;
    if !sane(s.link_bytes_per_sec) || !sane(s.zstd_bytes_per_sec) || !sane(s.zstd_ratio) {
        return compressing_now;
    }
    let raw_rate = s.link_bytes_per_sec;
    let c = s.compressed_rate();
    if compressing_now {
        c >= raw_rate
    } else {
        c > raw_rate * SWITCH_ON_GAIN
    }
}

/// Which streams carry page data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PageTransport {
    /// TCP page channels to a receiver on this host that offers them
    /// ([`super::tcp_channel`]), QUIC page streams otherwise.
    #[default]
    Auto,
    /// QUIC page streams always.
    Quic,
    /// TCP page channels, sealed even to a receiver on this host (what a
    /// migration between hosts uses; to measure or test it on one host).
    Sealed,
}

/// Counters of a [`PageSender`].
#[derive(Clone, Debug, Default)]
pub struct SenderStats {
    /// Batches accepted by `send_batch`.
    pub batches: u64,
    /// Raw page bytes accepted by `send_batch`.
    pub raw_bytes: u64,
    /// Bytes written to the page streams (frames included).
    pub wire_bytes: u64,
    /// Batches sent compressed.
    pub compressed_batches: u64,
    /// `Auto`: whether compression is currently on.
    #[allow(dead_code)] // API for the commands and reports; exercised by the tests
    pub compressing: bool,
    /// `Auto`: the inputs of the last decision.
    #[allow(dead_code)] // API for the commands and reports; exercised by the tests
    pub last_sample: Option<LinkSample>,
}

enum Job {
    Batch {
        pid: i32,
        round: u32,
        vaddr: u64,
        data: Bytes,
    },
    Flush(oneshot::Sender<()>),
}

struct AutoState {
    compressing: bool,
    batches: u64,
    zstd_rate: Option<f64>,
    ratio: Option<f64>,
    window_start: Instant,
    window_wire: u64,
    last_sample: Option<LinkSample>,
}

struct Shared {
    conn: quinn::Connection,
    /// Duplicates of the TCP page channels' sockets, to ask their
    /// congestion control for the link rate (empty on QUIC streams).
    tcp_probes: Vec<std::os::fd::OwnedFd>,
    peer: SocketAddr,
    policy: Compress,
    parallelism: u32,
    wire_bytes: AtomicU64,
    compressed_batches: AtomicU64,
    auto: Mutex<AutoState>,
}

/// What a worker should do with one batch.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Plan {
    Raw,
    Compress,
    /// `Auto` decision point: compress as a trial, then decide.
    Sample,
}

impl Shared {
    fn plan(&self) -> Plan {
        match self.policy {
            Compress::Never => Plan::Raw,
            Compress::Always => Plan::Compress,
            Compress::Auto => {
                let mut a = self.auto.lock().unwrap_or_else(|p| p.into_inner());
                a.batches += 1;
                if a.batches.is_multiple_of(SAMPLE_EVERY) {
                    Plan::Sample
                } else if a.compressing {
                    Plan::Compress
                } else {
                    Plan::Raw
                }
            }
        }
    }

    /// Feeds one compression measurement; at a decision point, decides.
    fn measured(&self, raw_len: usize, compressed_len: usize, took: Duration, decide: bool) {
        if self.policy != Compress::Auto || raw_len == 0 {
            return;
        }
        let secs = took.as_secs_f64().max(1e-9);
        let rate = raw_len as f64 / secs;
        let ratio = (compressed_len as f64 / raw_len as f64).clamp(1e-4, 1.0);
        let mut a = self.auto.lock().unwrap_or_else(|p| p.into_inner());
        let ewma = |old: Option<f64>, new: f64| Some(old.map_or(new, |o| 0.75 * o + 0.25 * new));
        a.zstd_rate = ewma(a.zstd_rate, rate);
        a.ratio = ewma(a.ratio, ratio);
        if !decide {
            return;
        }
        let cwnd_rate = if self.tcp_probes.is_empty() {
            let stats = self.conn.stats();
            let rtt = stats.path.rtt.as_secs_f64();
            if rtt > 0.0 {
                stats.path.cwnd as f64 / rtt
            } else {
                0.0
            }
        } else {
            // Page channels are separate flows: the link carries their sum.
            use std::os::fd::AsFd;
            self.tcp_probes
                .iter()
                .filter_map(|fd| tcp_channel::link_rate(fd.as_fd()))
                .sum()
        };
        let elapsed = a.window_start.elapsed().as_secs_f64().max(1e-6);
        let observed = a.window_wire as f64 / elapsed;
        a.window_start = Instant::now();
        a.window_wire = 0;
        let sample = LinkSample {
            link_bytes_per_sec: cwnd_rate.max(observed),
            zstd_bytes_per_sec: a.zstd_rate.unwrap_or(rate),
            zstd_ratio: a.ratio.unwrap_or(ratio),
            parallelism: self.parallelism,
        };
        let on = compression_pays(&sample, a.compressing);
        if on != a.compressing {
            debug!(peer = %self.peer, ?sample, compress = on, "page compression switched");
        }
        a.compressing = on;
        a.last_sample = Some(sample);
    }

    fn wrote(&self, n: usize) {
        self.wire_bytes.fetch_add(n as u64, Ordering::Relaxed);
        if self.policy == Compress::Auto {
            self.auto
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .window_wire += n as u64;
        }
    }
}

struct Worker {
    tx: Option<mpsc::Sender<Job>>,
    task: Option<JoinHandle<Result<()>>>,
}

/// How often [`PageSender::channels_closed`] looks at the channels.
const HANG_UP_POLL: Duration = Duration::from_millis(100);

/// Sends page batches over several unidirectional streams. Create with
/// [`Session::page_sender`](super::Session::page_sender); one per session is
/// enough (it serves all rounds). Dropping it without [`finish`](Self::finish)
/// still delivers what was queued, but nobody learns of failures.
pub struct PageSender {
    shared: Arc<Shared>,
    workers: Vec<Worker>,
    tcp: bool,
    sealed: bool,
    next: usize,
    batches: u64,
    raw_bytes: u64,
}

impl PageSender {
    /// Opens `n_streams` page streams: TCP page channels when `channels`
    /// is given (falling back to QUIC streams if a channel cannot be
    /// opened), QUIC unidirectional streams otherwise.
    pub(super) async fn open(
        conn: quinn::Connection,
        peer: SocketAddr,
        n_streams: usize,
        policy: Compress,
        channels: Option<(&ChannelSecret, bool)>,
    ) -> Result<PageSender> {
        let n = n_streams.clamp(1, MAX_PAGE_STREAMS as usize);
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        let outs = match channels {
            Some((secret, sealed)) => match open_channels(peer, secret, n, sealed).await {
                Ok(outs) => outs,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "no TCP page channels; pages go on QUIC streams");
                    open_quic_streams(&conn, peer, n).await?
                }
            },
            None => open_quic_streams(&conn, peer, n).await?,
        };
        let tcp_probes = outs
            .iter()
            .filter_map(|o| match o {
                PageOut::Tcp(s, _) => {
                    use std::os::fd::AsFd;
                    s.as_fd().try_clone_to_owned().ok()
                }
                PageOut::Quic(_) => None,
            })
            .collect();
        // An unsealed channel runs between two loopback addresses: there is
        // no network to save bytes on, only CPU (shared by sender, receiver
        // and the process) to spend, so `Auto` sends raw there.
        let same_host = outs.iter().any(|o| matches!(o, PageOut::Tcp(_, None)));
        let policy = match policy {
            Compress::Auto if same_host => Compress::Never,
            p => p,
        };
        let shared = Arc::new(Shared {
            conn: conn.clone(),
            tcp_probes,
            peer,
            policy,
            parallelism: n.min(cores) as u32,
            wire_bytes: AtomicU64::new(0),
            compressed_batches: AtomicU64::new(0),
            auto: Mutex::new(AutoState {
                compressing: false,
                batches: 0,
                zstd_rate: None,
                ratio: None,
                window_start: Instant::now(),
                window_wire: 0,
                last_sample: None,
            }),
        });
        let tcp = outs.iter().any(|o| matches!(o, PageOut::Tcp(..)));
        let sealed = outs.iter().any(|o| matches!(o, PageOut::Tcp(_, Some(_))));
        let mut workers = Vec::with_capacity(n);
        for (i, out) in outs.into_iter().enumerate() {
            let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
            let span =
                tracing::debug_span!("page_stream_out", %peer, stream = i, kind = out.kind());
            let task = tokio::spawn(worker(out, rx, shared.clone()).instrument(span));
            workers.push(Worker {
                tx: Some(tx),
                task: Some(task),
            });
        }
        Ok(PageSender {
            shared,
            workers,
            tcp,
            sealed,
            next: 0,
            batches: 0,
            raw_bytes: 0,
        })
    }

    /// Number of page streams.
    #[allow(dead_code)] // API for the commands and reports; exercised by the tests
    pub fn streams(&self) -> usize {
        self.workers.len()
    }

    /// Whether the pages travel on TCP page channels (else QUIC streams).
    pub fn uses_tcp_channels(&self) -> bool {
        self.tcp
    }

    /// Resolves once the receiver has closed a TCP page channel (it closes
    /// them when it is done with the pages, or when it dies); never without
    /// TCP channels. Checked every [`HANG_UP_POLL`].
    pub async fn channels_closed(&self) {
        use std::os::fd::AsFd;
        if self.shared.tcp_probes.is_empty() {
            return std::future::pending().await;
        }
        loop {
            if self
                .shared
                .tcp_probes
                .iter()
                .any(|fd| tcp_channel::hung_up(fd.as_fd()))
            {
                return;
            }
            tokio::time::sleep(HANG_UP_POLL).await;
        }
    }

    /// Whether the TCP page channels are sealed (encrypted).
    pub fn sealed(&self) -> bool {
        self.sealed
    }

    /// Queues one batch: `data` holds `data.len() / 4096` whole pages starting
    /// at the page-aligned `vaddr` of task `pid`, at most 4 MiB. Returns once
    /// the batch is queued (waits while all streams are busy). An error from
    /// an earlier batch of the chosen stream is returned here.
    pub async fn send_batch(
        &mut self,
        pid: i32,
        round: u32,
        vaddr: u64,
        data: impl Into<Bytes>,
    ) -> Result<()> {
        let data: Bytes = data.into();
        let peer = self.shared.peer;
        let invalid = |what: String| TransportError::InvalidSend { peer, what };
        if data.is_empty() || !data.len().is_multiple_of(PAGE_SIZE) || data.len() > MAX_BATCH_BYTES
        {
            return Err(invalid(format!(
                "page batch of {} bytes (must be 1 to {} whole pages)",
                data.len(),
                MAX_BATCH_BYTES / PAGE_SIZE
            )));
        }
        if pid <= 0 {
            return Err(invalid(format!("pid {pid}")));
        }
        if !vaddr.is_multiple_of(PAGE_SIZE as u64) || vaddr.checked_add(data.len() as u64).is_none()
        {
            return Err(invalid(format!("vaddr {vaddr:#x} is unaligned or wraps")));
        }
        let i = self.pick();
        let raw_len = data.len() as u64;
        let job = Job::Batch {
            pid,
            round,
            vaddr,
            data,
        };
        let sent = match &self.workers[i].tx {
            Some(tx) => tx.send(job).await.is_ok(),
            None => false,
        };
        if !sent {
            return Err(self.worker_error(i).await);
        }
        self.next = (i + 1) % self.workers.len();
        self.batches += 1;
        self.raw_bytes += raw_len;
        Ok(())
    }

    /// Least-loaded worker (most free queue slots), round-robin on ties.
    fn pick(&self) -> usize {
        let n = self.workers.len();
        let mut best = self.next;
        let mut best_free = 0;
        for k in 0..n {
            let i = (self.next + k) % n;
            let free = self.workers[i].tx.as_ref().map_or(0, |t| t.capacity());
            if free > best_free {
                best = i;
                best_free = free;
            }
        }
        best
    }

    /// Waits for worker `i` to end and returns how it ended.
    async fn join_worker(&mut self, i: usize) -> Result<()> {
        let peer = self.shared.peer;
        self.workers[i].tx = None;
        let Some(task) = self.workers[i].task.take() else {
            return Err(TransportError::PageStreamStopped {
                peer,
                what: "an earlier error ended it".into(),
            });
        };
        match task.await {
            Ok(r) => r,
            Err(e) => Err(TransportError::PageStreamStopped {
                peer,
                what: format!("worker task failed: {e}"),
            }),
        }
    }

    /// The error that ended worker `i` (which refused a job).
    async fn worker_error(&mut self, i: usize) -> TransportError {
        match self.join_worker(i).await {
            Err(e) => e,
            Ok(()) => TransportError::PageStreamStopped {
                peer: self.shared.peer,
                what: "ended early".into(),
            },
        }
    }

    /// Waits until every batch queued so far has been handed to QUIC (not
    /// necessarily acknowledged; [`finish`](Self::finish) waits for that).
    pub async fn flush(&mut self) -> Result<()> {
        for i in 0..self.workers.len() {
            let (done_tx, done_rx) = oneshot::channel();
            let ok = match &self.workers[i].tx {
                Some(tx) => tx.send(Job::Flush(done_tx)).await.is_ok() && done_rx.await.is_ok(),
                None => false,
            };
            if !ok {
                return Err(self.worker_error(i).await);
            }
        }
        Ok(())
    }

    /// Counters so far.
    pub fn stats(&self) -> SenderStats {
        let a = self.shared.auto.lock().unwrap_or_else(|p| p.into_inner());
        SenderStats {
            batches: self.batches,
            raw_bytes: self.raw_bytes,
            wire_bytes: self.shared.wire_bytes.load(Ordering::Relaxed),
            compressed_batches: self.shared.compressed_batches.load(Ordering::Relaxed),
            compressing: match self.shared.policy {
                Compress::Auto => a.compressing,
                Compress::Always => true,
                Compress::Never => false,
            },
            last_sample: a.last_sample,
        }
    }

    /// Sends everything queued, closes the streams and waits until the peer
    /// has acknowledged all their data. Returns the final counters, or the
    /// first error of any stream.
    #[allow(dead_code)] // used by the tests; the source drops the sender after the commit
    pub async fn finish(mut self) -> Result<SenderStats> {
        for w in &mut self.workers {
            w.tx = None;
        }
        let mut first_err = None;
        for i in 0..self.workers.len() {
            if self.workers[i].task.is_none() {
                continue;
            }
            if let Err(e) = self.join_worker(i).await {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(self.stats()),
        }
    }
}

fn compress(
    comp: &mut zstd::bulk::Compressor<'static>,
    data: &[u8],
) -> Result<(Vec<u8>, Duration)> {
    let start = Instant::now();
    let out = comp.compress(data).map_err(|source| TransportError::Zstd {
        what: "compression",
        source,
    })?;
    Ok((out, start.elapsed()))
}

async fn worker(mut out: PageOut, mut rx: mpsc::Receiver<Job>, shared: Arc<Shared>) -> Result<()> {
    let peer = shared.peer;
    out.write_all(peer, &PAGE_STREAM_MAGIC).await?;
    shared.wrote(PAGE_STREAM_MAGIC.len());
    let mut comp: Option<zstd::bulk::Compressor<'static>> = None;
    while let Some(job) = rx.recv().await {
        let (pid, round, vaddr, data) = match job {
            Job::Flush(done) => {
                let _ = done.send(());
                continue;
            }
            Job::Batch {
                pid,
                round,
                vaddr,
                data,
            } => (pid, round, vaddr, data),
        };
        let plan = shared.plan();
        let raw_len = data.len();
        let mut crc = None;
        let (compression, payload) = if plan == Plan::Raw {
            (Compression::None, data)
        } else {
            let mut c = match comp.take() {
                Some(c) => c,
                None => zstd::bulk::Compressor::new(ZSTD_LEVEL).map_err(|source| {
                    TransportError::Zstd {
                        what: "compressor setup",
                        source,
                    }
                })?,
            };
            // CPU-bound: off the async worker threads.
            let (c, data, res) = tokio::task::spawn_blocking(move || {
                let r = compress(&mut c, &data);
                (c, data, r)
            })
            .await
            .map_err(|e| TransportError::PageStreamStopped {
                peer,
                what: format!("compression task failed: {e}"),
            })?;
            comp = Some(c);
            let (z, took) = res?;
            shared.measured(raw_len, z.len(), took, plan == Plan::Sample);
            if z.len() < raw_len {
                shared.compressed_batches.fetch_add(1, Ordering::Relaxed);
                // Checks the receiver's decompression too; raw batches rely
                // on the transport's own integrity (see PageBatchHeader).
                crc = Some(crc32fast::hash(&data));
                (Compression::Zstd, Bytes::from(z))
            } else {
                (Compression::None, data)
            }
        };
        let header = PageBatchHeader {
            pid,
            round,
            vaddr,
            nr_pages: (raw_len / PAGE_SIZE) as u64,
            compression: compression as i32,
            raw_len: raw_len as u32,
            crc32: crc.unwrap_or(0),
            has_crc: crc.is_some(),
        };
        let prefix = encode_batch_prefix(&header, payload.len());
        let wire = prefix.len() + payload.len();
        out.write_batch(peer, prefix, payload).await?;
        shared.wrote(wire);
    }
    // Sender dropped: no more batches. Close the stream and wait until the
    // peer has taken everything on it.
    out.finish(peer).await
}

async fn open_quic_streams(
    conn: &quinn::Connection,
    peer: SocketAddr,
    n: usize,
) -> Result<Vec<PageOut>> {
    let mut outs = Vec::with_capacity(n);
    for _ in 0..n {
        let stream = conn
            .open_uni()
            .await
            .map_err(|source| TransportError::OpenStream {
                peer,
                what: "page",
                source,
            })?;
        outs.push(PageOut::Quic(stream));
    }
    Ok(outs)
}

/// Opens `n` TCP page channels.
async fn open_channels(
    peer: SocketAddr,
    secret: &ChannelSecret,
    n: usize,
    sealed: bool,
) -> Result<Vec<PageOut>> {
    let mut outs = Vec::with_capacity(n);
    for i in 0..n {
        let index = u16::try_from(i).unwrap_or(u16::MAX);
        let (stream, sealer) = tcp_channel::connect(peer, secret, index, sealed).await?;
        outs.push(PageOut::Tcp(stream, sealer.map(Box::new)));
    }
    Ok(outs)
}

/// Where a page-stream worker writes: a QUIC unidirectional stream or a TCP
/// page channel ([`tcp_channel`]), plain or sealed. All carry the same
/// bytes; a sealed channel puts the magic, each batch's prefix and each
/// batch's data in records of their own.
enum PageOut {
    Quic(quinn::SendStream),
    /// The sealer is boxed: it holds an expanded AES key schedule.
    Tcp(TcpStream, Option<Box<Sealer>>),
}

impl PageOut {
    fn kind(&self) -> &'static str {
        match self {
            PageOut::Quic(_) => "quic",
            PageOut::Tcp(_, None) => "tcp",
            PageOut::Tcp(_, Some(_)) => "tcp-sealed",
        }
    }

    async fn write_all(&mut self, peer: SocketAddr, buf: &[u8]) -> Result<()> {
        let r = match self {
            PageOut::Quic(s) => {
                return s
                    .write_all(buf)
                    .await
                    .map_err(|source| TransportError::Write {
                        peer,
                        what: "page stream",
                        source,
                    })
            }
            PageOut::Tcp(s, None) => s.write_all(buf).await,
            PageOut::Tcp(s, Some(sealer)) => sealer.write(s, &mut buf.to_vec()).await,
        };
        r.map_err(|source| TransportError::Channel {
            peer,
            what: "writing to a page channel",
            source,
        })
    }

    async fn write_batch(
        &mut self,
        peer: SocketAddr,
        mut prefix: Vec<u8>,
        payload: Bytes,
    ) -> Result<()> {
        let r = match self {
            PageOut::Quic(s) => {
                let mut chunks = [Bytes::from(prefix), payload];
                return s.write_all_chunks(&mut chunks).await.map_err(|source| {
                    TransportError::Write {
                        peer,
                        what: "page batch",
                        source,
                    }
                });
            }
            PageOut::Tcp(s, None) => write_parts(s, &[&prefix, &payload]).await,
            PageOut::Tcp(s, Some(sealer)) => match sealer.write(s, &mut prefix).await {
                // Sealed in place where the batch is the only owner of its
                // buffer (the usual case: the source reads a batch per
                // buffer); a copy otherwise.
                Ok(()) => match payload.try_into_mut() {
                    Ok(mut own) => sealer.write(s, &mut own).await,
                    Err(shared) => sealer.write(s, &mut shared.to_vec()).await,
                },
                Err(e) => Err(e),
            },
        };
        r.map_err(|source| TransportError::Channel {
            peer,
            what: "writing a page batch",
            source,
        })
    }

    /// Ends the stream and waits until the receiver has read all of it (QUIC:
    /// acknowledged; TCP: the receiver closed its side after our end, and a
    /// sealed channel sent its end record first).
    async fn finish(self, peer: SocketAddr) -> Result<()> {
        match self {
            PageOut::Quic(mut stream) => {
                let _ = stream.finish();
                match stream.stopped().await {
                    Ok(None) => Ok(()),
                    Ok(Some(code)) => Err(TransportError::PageStreamStopped {
                        peer,
                        what: format!("the receiver stopped the stream (code {code})"),
                    }),
                    Err(e) => Err(TransportError::PageStreamStopped {
                        peer,
                        what: format!("waiting for acknowledgement: {e}"),
                    }),
                }
            }
            PageOut::Tcp(mut stream, sealer) => {
                let err = |what| move |source| TransportError::Channel { peer, what, source };
                if let Some(mut sealer) = sealer {
                    sealer
                        .write_end(&mut stream)
                        .await
                        .map_err(err("ending a sealed page channel"))?;
                }
                stream
                    .shutdown()
                    .await
                    .map_err(err("closing a page channel"))?;
                let mut rest = [0u8; 64];
                loop {
                    let n = stream
                        .read(&mut rest)
                        .await
                        .map_err(err("waiting for the receiver to close a page channel"))?;
                    if n == 0 {
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// One decoded page batch: header and raw pages (`header.raw_len` bytes,
/// CRC checked).
pub type ReceivedBatch = (PageBatchHeader, OwnedPages);

/// Merges the peer's page streams. Create with
/// [`Session::page_receiver`](super::Session::page_receiver).
pub struct PageReceiver {
    rx: mpsc::Receiver<Result<ReceivedBatch>>,
    task: JoinHandle<()>,
}

impl Drop for PageReceiver {
    fn drop(&mut self) {
        // Also drops (and so aborts) the reader tasks it owns.
        self.task.abort();
    }
}

impl PageReceiver {
    /// Reads the peer's QUIC page streams and, when given, the TCP page
    /// channels the session's registration hands over.
    pub(super) fn start(
        conn: quinn::Connection,
        peer: SocketAddr,
        channels: Option<mpsc::Receiver<IncomingChannel>>,
    ) -> PageReceiver {
        let (tx, rx) = mpsc::channel(RECV_QUEUE);
        let span = tracing::debug_span!("page_streams_in", %peer);
        let task = tokio::spawn(accept_streams(conn, peer, channels, tx).instrument(span));
        PageReceiver { rx, task }
    }

    /// The next batch from any stream, in arrival order per stream (no order
    /// across streams). `Ok(None)` once the connection is closed and every
    /// stream has been drained. A stream that fails yields its error once and
    /// is stopped; the other streams go on.
    pub async fn next(&mut self) -> Result<Option<ReceivedBatch>> {
        match self.rx.recv().await {
            Some(Ok(b)) => Ok(Some(b)),
            Some(Err(e)) => Err(e),
            None => Ok(None),
        }
    }
}

async fn accept_streams(
    conn: quinn::Connection,
    peer: SocketAddr,
    mut channels: Option<mpsc::Receiver<IncomingChannel>>,
    tx: mpsc::Sender<Result<ReceivedBatch>>,
) {
    let mut readers = JoinSet::new();
    let mut index = 0u32;
    loop {
        tokio::select! {
            c = async { channels.as_mut()?.recv().await }, if channels.is_some() => match c {
                Some(ch) => {
                    let sealed = ch.opener.is_some();
                    let span = tracing::debug_span!("page_channel_in", stream = index, sealed);
                    index += 1;
                    readers.spawn(read_channel(ch, peer, tx.clone()).instrument(span));
                }
                None => channels = None,
            },
            r = conn.accept_uni() => match r {
                Ok(stream) => {
                    let span = tracing::debug_span!("page_stream_in", stream = index);
                    index += 1;
                    readers.spawn(read_stream(stream, peer, tx.clone()).instrument(span));
                }
                Err(quinn::ConnectionError::ApplicationClosed(c)) if c.error_code == code::DONE => break,
                Err(quinn::ConnectionError::LocallyClosed) => break,
                Err(source) => {
                    let _ = tx.send(Err(TransportError::Connection { peer, source })).await;
                    break;
                }
            },
            // Reap finished readers so the set does not grow without bound.
            Some(_) = readers.join_next(), if !readers.is_empty() => {}
        }
    }
    drop(tx);
    while readers.join_next().await.is_some() {}
}

async fn read_stream(
    mut stream: quinn::RecvStream,
    peer: SocketAddr,
    tx: mpsc::Sender<Result<ReceivedBatch>>,
) {
    if let Err(e) = read_stream_inner(&mut stream, peer, &tx).await {
        let _ = stream.stop(code::PROTOCOL);
        let _ = tx.send(Err(e)).await;
    }
}

async fn read_channel(
    mut ch: IncomingChannel,
    peer: SocketAddr,
    tx: mpsc::Sender<Result<ReceivedBatch>>,
) {
    let r = match ch.opener.take() {
        None => read_stream_inner(&mut ch.stream, peer, &tx).await,
        Some(opener) => read_sealed(&mut ch.stream, opener, peer, &tx).await,
    };
    if let Err(e) = r {
        let _ = tx.send(Err(e)).await;
    }
    // Dropping the stream closes it: the sender's `finish` sees the end.
}

/// A sealed channel: a record with the magic, then per batch a record with
/// its prefix and one with its data, then the end record.
async fn read_sealed(
    stream: &mut TcpStream,
    mut opener: Opener,
    peer: SocketAddr,
    tx: &mpsc::Sender<Result<ReceivedBatch>>,
) -> Result<()> {
    let missing = |what: &str| TransportError::Invalid {
        peer,
        kind: FrameKind::SealedRecord,
        what: what.to_owned(),
    };
    let magic = opener
        .read(stream, peer)
        .await?
        .ok_or_else(|| missing("channel ended before its preamble"))?;
    let mut m = &magic[..];
    read_stream_magic(&mut m, peer).await?;
    if !m.is_empty() {
        return Err(missing("extra bytes after the preamble"));
    }
    let mut dec = batch_decompressor()?;
    while let Some(prefix) = opener.read(stream, peer).await? {
        let (h, len) = decode_batch_prefix(peer, &prefix)?;
        // The data record goes straight into memory the store adopts.
        let data = opener
            .read_pages(stream, peer)
            .await?
            .ok_or_else(|| missing("channel ended between a batch header and its data"))?;
        if data.len() != len {
            return Err(missing(&format!(
                "a data record of {} bytes after a header announcing {len}",
                data.len()
            )));
        }
        if !deliver(h, data.into(), &mut dec, peer, tx).await? {
            return Ok(());
        }
    }
    Ok(())
}

/// Decodes one batch (decompressing off the async threads when needed)
/// and queues it. `Ok(false)` when nobody receives any more.
async fn deliver(
    h: PageBatchHeader,
    data: OwnedPages,
    dec: &mut zstd::bulk::Decompressor<'static>,
    peer: SocketAddr,
    tx: &mpsc::Sender<Result<ReceivedBatch>>,
) -> Result<bool> {
    let batch = if h.compression == Compression::Zstd as i32 {
        let mut d = std::mem::replace(dec, batch_decompressor()?);
        let (d, h2, res) = tokio::task::spawn_blocking(move || {
            let r = decode_batch_data(peer, &h, data, &mut d);
            (d, h, r)
        })
        .await
        .map_err(|e| TransportError::PageStreamStopped {
            peer,
            what: format!("decompression task failed: {e}"),
        })?;
        *dec = d;
        (h2, res?)
    } else {
        // Uncompressed: only a CRC, cheap enough here.
        let raw = decode_batch_data(peer, &h, data, dec)?;
        (h, raw)
    };
    // An error means the receiver was dropped: nobody wants the pages.
    Ok(tx.send(Ok(batch)).await.is_ok())
}

async fn read_stream_inner<R: AsyncRead + Unpin>(
    stream: &mut R,
    peer: SocketAddr,
    tx: &mpsc::Sender<Result<ReceivedBatch>>,
) -> Result<()> {
    read_stream_magic(stream, peer).await?;
    let mut dec = batch_decompressor()?;
    while let Some((h, data)) = read_batch(stream, peer).await? {
        if !deliver(h, data, &mut dec, peer, tx).await? {
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: f64 = 1e6;
    const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

    fn sample(link: f64, zstd: f64, ratio: f64, p: u32) -> LinkSample {
        LinkSample {
            link_bytes_per_sec: link,
            zstd_bytes_per_sec: zstd,
            zstd_ratio: ratio,
            parallelism: p,
        }
    }

    #[test]
    fn auto_stays_raw_on_loopback() {
        // Loopback ~4 GiB/s; zstd-1 ~500 MB/s per core on 2 cores, 30 %.
        let s = sample(4.0 * GIB, 500.0 * MB, 0.3, 2);
        assert!(!compression_pays(&s, false));
        // ...and switches off if it was on.
        assert!(!compression_pays(&s, true));
        // Even with highly compressible memory.
        assert!(!compression_pays(
            &sample(4.0 * GIB, 900.0 * MB, 0.01, 2),
            false
        ));
    }

    #[test]
    fn auto_compresses_on_slow_links() {
        // 100 Mbit/s, memory compressing to 30 %.
        assert!(compression_pays(
            &sample(12.5 * MB, 500.0 * MB, 0.3, 2),
            false
        ));
        // 1 Gbit/s, 50 %, one slow core: min(300, 250) = 250 MB/s > 1.25 * 125.
        assert!(compression_pays(
            &sample(125.0 * MB, 300.0 * MB, 0.5, 1),
            false
        ));
        // 10 Gbit/s, 2 cores of 500 MB/s: compressors can't keep up.
        assert!(!compression_pays(
            &sample(1250.0 * MB, 500.0 * MB, 0.3, 2),
            false
        ));
    }

    #[test]
    fn auto_never_compresses_incompressible_data() {
        assert!(!compression_pays(
            &sample(1.0 * MB, 500.0 * MB, 1.0, 2),
            false
        ));
        assert!(!compression_pays(
            &sample(1.0 * MB, 500.0 * MB, 0.85, 2),
            false
        ));
    }

    #[test]
    fn auto_has_hysteresis() {
        // C = min(2 * 60, 100 / 0.5) = 120 MB/s vs L = 100 MB/s: 1.2x.
        let s = sample(100.0 * MB, 60.0 * MB, 0.5, 2);
        assert!(!compression_pays(&s, false), "not enough gain to switch on");
        assert!(compression_pays(&s, true), "enough to stay on");
        // C = 90 < L = 100: off.
        assert!(!compression_pays(
            &sample(100.0 * MB, 45.0 * MB, 0.5, 2),
            true
        ));
    }

    #[test]
    fn auto_ignores_garbage_measurements() {
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(compression_pays(&sample(bad, 500.0 * MB, 0.3, 2), true));
            assert!(!compression_pays(&sample(12.5 * MB, bad, 0.3, 2), false));
            assert!(!compression_pays(
                &sample(12.5 * MB, 500.0 * MB, bad, 2),
                false
            ));
        }
    }
}
