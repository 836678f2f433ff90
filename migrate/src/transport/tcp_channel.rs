//! TCP page channels: bulk page data on plain TCP connections beside the
//! QUIC session.
//!
//! QUIC costs CPU per packet (about 1.4 KB of payload each on a 1500-byte
//! path): on a 2-core machine quinn moves ~500 MiB/s, a fraction of what the
//! link carries. TCP hands the kernel large writes (TSO/GRO, 64 KiB
//! segments on loopback), so the pages of a migration travel on TCP
//! channels when the receiver offers them, and on QUIC page streams
//! otherwise. The QUIC connection stays the session: handshake,
//! authentication and every control message.
//!
//! # Who may open a channel
//!
//! A channel belongs to one authenticated QUIC session. Both ends derive a
//! channel secret from that session's TLS exporter
//! ([`CHANNEL_EXPORTER_LABEL`]); nobody else can. The exchange:
//!
//! ```text
//!   source (client)                                  destination (server)
//!   ── TCP connect to the receiver's address and port (TCP, same number) ──
//!   "CRMT" ‖ session id (16 B = HMAC(secret, "session id")) ───────────▶ unknown id: close
//!   ◀─────────────────────────────────────────────────── nonce (32 random B)
//!   index u16 ‖ flags u8 ‖ HMAC(secret, "channel" ‖ nonce ‖ index ‖ flags) ▶ verify
//!   ◀───────────────────────────────────────────────────────── 0x01 (accepted)
//!   then the page stream format of QUIC page streams ("CRMP", batches)
//! ```
//!
//! The nonce makes every proof single-use. `flags` says whether the channel
//! is sealed ([`FLAG_SEALED`]): its bytes then travel in AES-256-GCM records
//! ([`super::sealed`]) under a key only the two ends can derive
//! (`HMAC(secret, "page channel key" ‖ nonce ‖ index)`). A channel between
//! two loopback addresses (the same host) is not sealed: the bytes never
//! leave the kernel, and reading or injecting into a loopback TCP
//! connection needs root, which could read the process's memory anyway.
//! The receiver refuses an unsealed channel from any other address.
//!
//! The receiver bounds the work an unauthenticated peer can cause: at most
//! [`MAX_PENDING_HANDSHAKES`] channel handshakes at once, each within
//! [`CHANNEL_HANDSHAKE_TIMEOUT`], and nothing but the fixed-size hello and
//! proof is read before the proof is checked.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, warn, Instrument};

use super::error::{Result, TransportError};
use super::sealed::{Opener, Sealer};
use super::MAX_PAGE_STREAMS;

/// Capability a receiver announces when it accepts TCP page channels.
pub const CAPABILITY: &str = "tcp-pages";
/// TLS exporter label of the channel secret.
pub const CHANNEL_EXPORTER_LABEL: &[u8] = b"EXPORTER-cr-migrate-page-channels";
/// First bytes of a channel.
pub const CHANNEL_MAGIC: [u8; 4] = *b"CRMT";
/// Time a peer has to complete a channel handshake.
pub const CHANNEL_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a TCP connect may take before page channels are given up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Channel handshakes the receiver runs at once.
pub const MAX_PENDING_HANDSHAKES: usize = 16;
/// Socket buffers of a channel: enough for a few batches in flight.
const CHANNEL_BUFFER: usize = 8 << 20;

const SESSION_ID_LEN: usize = 16;
const NONCE_LEN: usize = 32;
const PROOF_LEN: usize = 32;
const ACCEPTED: u8 = 1;
/// Channel flag: the channel's bytes are sealed records.
pub const FLAG_SEALED: u8 = 1;

type HmacSha256 = Hmac<Sha256>;

/// The secret both ends of a session derive from its TLS exporter.
#[derive(Clone)]
pub struct ChannelSecret([u8; 32]);

impl ChannelSecret {
    pub fn new(exported: [u8; 32]) -> Self {
        ChannelSecret(exported)
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.0).expect("HMAC accepts keys of any length")
    }

    /// Public name of the session on the channel listener.
    pub fn session_id(&self) -> [u8; SESSION_ID_LEN] {
        let mut m = self.mac();
        m.update(b"session id");
        let full: [u8; 32] = m.finalize().into_bytes().into();
        let mut id = [0u8; SESSION_ID_LEN];
        id.copy_from_slice(&full[..SESSION_ID_LEN]);
        id
    }

    fn proof_mac(&self, nonce: &[u8; NONCE_LEN], index: u16, flags: u8) -> HmacSha256 {
        let mut m = self.mac();
        m.update(b"channel");
        m.update(nonce);
        m.update(&index.to_le_bytes());
        m.update(&[flags]);
        m
    }

    /// The client's proof for channel `index` answering `nonce`.
    pub fn proof(&self, nonce: &[u8; NONCE_LEN], index: u16, flags: u8) -> [u8; PROOF_LEN] {
        self.proof_mac(nonce, index, flags)
            .finalize()
            .into_bytes()
            .into()
    }

    /// The AES-256-GCM key of channel `index` on the connection that
    /// received `nonce`.
    pub fn channel_key(&self, nonce: &[u8; NONCE_LEN], index: u16) -> [u8; 32] {
        let mut m = self.mac();
        m.update(b"page channel key");
        m.update(nonce);
        m.update(&index.to_le_bytes());
        m.finalize().into_bytes().into()
    }

    /// Checks a proof in constant time.
    pub fn verify(&self, nonce: &[u8; NONCE_LEN], index: u16, flags: u8, proof: &[u8]) -> bool {
        self.proof_mac(nonce, index, flags)
            .verify_slice(proof)
            .is_ok()
    }
}

/// Whether page data may travel unencrypted between these two addresses:
/// only when both are loopback addresses (the same host).
pub fn plaintext_allowed(local: SocketAddr, peer: SocketAddr) -> bool {
    local.ip().is_loopback() && peer.ip().is_loopback()
}

fn channel_err(
    peer: SocketAddr,
    what: &'static str,
) -> impl FnOnce(std::io::Error) -> TransportError {
    move |source| TransportError::Channel { peer, what, source }
}

fn tune(stream: &TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = stream.set_nodelay(true);
    let _ = setsockopt(stream, sockopt::SndBuf, &CHANNEL_BUFFER);
    let _ = setsockopt(stream, sockopt::RcvBuf, &CHANNEL_BUFFER);
}

/// An authenticated channel as the receiver gets it.
pub struct IncomingChannel {
    pub stream: TcpStream,
    /// Present when the channel is sealed.
    pub opener: Option<Opener>,
}

struct Entry {
    secret: ChannelSecret,
    tx: mpsc::Sender<IncomingChannel>,
}

/// Sessions of a listener that accept channels, by session id.
#[derive(Default)]
pub struct Registry {
    sessions: Mutex<HashMap<[u8; SESSION_ID_LEN], Entry>>,
}

impl Registry {
    /// Registers a session; its channels arrive on the returned
    /// registration until it is dropped.
    pub fn register(self: &Arc<Self>, secret: ChannelSecret) -> Registration {
        let id = secret.session_id();
        let (tx, rx) = mpsc::channel(MAX_PAGE_STREAMS as usize);
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, Entry { secret, tx });
        Registration {
            registry: self.clone(),
            id,
            rx: Some(rx),
        }
    }

    fn lookup(
        &self,
        id: &[u8; SESSION_ID_LEN],
    ) -> Option<(ChannelSecret, mpsc::Sender<IncomingChannel>)> {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|e| (e.secret.clone(), e.tx.clone()))
    }
}

/// A session's place in the [`Registry`]; removed on drop.
pub struct Registration {
    registry: Arc<Registry>,
    id: [u8; SESSION_ID_LEN],
    rx: Option<mpsc::Receiver<IncomingChannel>>,
}

impl Registration {
    /// The authenticated channels of this session (once).
    pub fn take_channels(&mut self) -> Option<mpsc::Receiver<IncomingChannel>> {
        self.rx.take()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// The receiver's TCP listener for page channels.
pub struct ChannelListener {
    registry: Arc<Registry>,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for ChannelListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ChannelListener {
    /// Listens on `addr` (TCP). Channels are accepted only for sessions
    /// registered in [`registry`](Self::registry).
    pub async fn bind(addr: SocketAddr) -> std::io::Result<ChannelListener> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let registry = Arc::new(Registry::default());
        let span = tracing::debug_span!("page_channels", %addr);
        let task = tokio::spawn(accept_loop(listener, registry.clone()).instrument(span));
        Ok(ChannelListener {
            registry,
            addr,
            task,
        })
    }

    /// The bound address.
    #[allow(dead_code)] // used by the tests
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }
}

async fn accept_loop(listener: TcpListener, registry: Arc<Registry>) {
    let slots = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and the like: wait a little rather than spin.
                warn!(error = %e, "accepting a page channel failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            warn!(%peer, "too many page channel handshakes in progress; closing");
            continue;
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let r = tokio::time::timeout(
                CHANNEL_HANDSHAKE_TIMEOUT,
                server_handshake(stream, peer, &registry),
            )
            .await
            .unwrap_or(Err(TransportError::Timeout {
                peer,
                what: "the page channel handshake",
                secs: CHANNEL_HANDSHAKE_TIMEOUT.as_secs(),
            }));
            if let Err(e) = r {
                warn!(%peer, error = %e, "refused a page channel");
            }
            drop(slot);
        });
    }
}

fn refused(peer: SocketAddr, reason: String) -> TransportError {
    TransportError::AuthFailed { peer, reason }
}

async fn server_handshake(
    mut stream: TcpStream,
    peer: SocketAddr,
    registry: &Registry,
) -> Result<()> {
    let local = stream
        .local_addr()
        .map_err(channel_err(peer, "local address"))?;
    let mut hello = [0u8; 4 + SESSION_ID_LEN];
    stream
        .read_exact(&mut hello)
        .await
        .map_err(channel_err(peer, "reading the channel hello"))?;
    if hello[..4] != CHANNEL_MAGIC {
        return Err(refused(peer, "not a cr-migrate page channel".into()));
    }
    let mut id = [0u8; SESSION_ID_LEN];
    id.copy_from_slice(&hello[4..]);
    let Some((secret, tx)) = registry.lookup(&id) else {
        return Err(refused(peer, "page channel for no known session".into()));
    };
    let nonce = random_nonce();
    stream
        .write_all(&nonce)
        .await
        .map_err(channel_err(peer, "sending the channel nonce"))?;
    let mut answer = [0u8; 2 + 1 + PROOF_LEN];
    stream
        .read_exact(&mut answer)
        .await
        .map_err(channel_err(peer, "reading the channel proof"))?;
    let index = u16::from_le_bytes([answer[0], answer[1]]);
    let flags = answer[2];
    if !secret.verify(&nonce, index, flags, &answer[3..]) {
        return Err(refused(peer, "wrong page channel proof".into()));
    }
    if flags & !FLAG_SEALED != 0 {
        return Err(refused(
            peer,
            format!("unknown page channel flags {flags:#x}"),
        ));
    }
    let sealed = flags & FLAG_SEALED != 0;
    if !sealed && !plaintext_allowed(local, peer) {
        return Err(refused(
            peer,
            format!(
                "unencrypted page channel from {peer} to {local}: only loopback peers may use one"
            ),
        ));
    }
    if usize::from(index) >= MAX_PAGE_STREAMS as usize {
        return Err(refused(
            peer,
            format!("page channel index {index} out of range"),
        ));
    }
    stream
        .write_all(&[ACCEPTED])
        .await
        .map_err(channel_err(peer, "accepting the channel"))?;
    tune(&stream);
    debug!(%peer, index, "page channel accepted");
    let opener = sealed.then(|| Opener::new(&secret.channel_key(&nonce, index)));
    tx.try_send(IncomingChannel { stream, opener })
        .map_err(|_| refused(peer, "the session takes no more page channels".into()))
}

/// Client side: opens channel `index` of the session to `peer`, sealed
/// (with the returned [`Sealer`]) when `sealed`.
pub async fn connect(
    peer: SocketAddr,
    secret: &ChannelSecret,
    index: u16,
    sealed: bool,
) -> Result<(TcpStream, Option<Sealer>)> {
    let fut = async {
        // A firewall that drops TCP would otherwise hold the migration for
        // the whole handshake timeout before it falls back to QUIC streams.
        let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(peer))
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
            .map_err(channel_err(peer, "connecting a page channel"))?;
        let mut hello = Vec::with_capacity(4 + SESSION_ID_LEN);
        hello.extend_from_slice(&CHANNEL_MAGIC);
        hello.extend_from_slice(&secret.session_id());
        stream
            .write_all(&hello)
            .await
            .map_err(channel_err(peer, "sending the channel hello"))?;
        let mut nonce = [0u8; NONCE_LEN];
        stream
            .read_exact(&mut nonce)
            .await
            .map_err(channel_err(peer, "reading the channel nonce"))?;
        let flags = if sealed { FLAG_SEALED } else { 0 };
        let mut answer = Vec::with_capacity(2 + 1 + PROOF_LEN);
        answer.extend_from_slice(&index.to_le_bytes());
        answer.push(flags);
        answer.extend_from_slice(&secret.proof(&nonce, index, flags));
        stream
            .write_all(&answer)
            .await
            .map_err(channel_err(peer, "sending the channel proof"))?;
        let mut ok = [0u8; 1];
        stream
            .read_exact(&mut ok)
            .await
            .map_err(channel_err(peer, "waiting for the channel to be accepted"))?;
        if ok[0] != ACCEPTED {
            return Err(refused(
                peer,
                "the receiver refused the page channel".into(),
            ));
        }
        tune(&stream);
        let sealer = sealed.then(|| Sealer::new(&secret.channel_key(&nonce, index)));
        Ok((stream, sealer))
    };
    tokio::time::timeout(CHANNEL_HANDSHAKE_TIMEOUT, fut)
        .await
        .unwrap_or(Err(TransportError::Timeout {
            peer,
            what: "the page channel handshake",
            secs: CHANNEL_HANDSHAKE_TIMEOUT.as_secs(),
        }))
}

/// What the kernel's congestion control of one TCP connection says it can
/// carry: `cwnd × mss / smoothed RTT`, bytes per second (`None` if the
/// socket gives no answer).
pub fn link_rate(socket: std::os::fd::BorrowedFd<'_>) -> Option<f64> {
    use std::os::fd::AsRawFd;
    // SAFETY: all-zero is a valid tcp_info (plain integers).
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which is
    // that large and lives for the call; the fd is borrowed, so open.
    let r = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if r != 0 || info.tcpi_rtt == 0 {
        return None;
    }
    let bytes_in_flight = f64::from(info.tcpi_snd_cwnd) * f64::from(info.tcpi_snd_mss);
    Some(bytes_in_flight / (f64::from(info.tcpi_rtt) * 1e-6))
}

/// Whether the peer closed this connection or it failed (the receiver of a
/// page channel never writes to it: any hang-up or error means it is gone).
pub fn hung_up(socket: std::os::fd::BorrowedFd<'_>) -> bool {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one pollfd we own; timeout 0 never blocks; the fd is borrowed,
    // so open.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

fn random_nonce() -> [u8; NONCE_LEN] {
    use ring::rand::SecureRandom;
    let mut n = [0u8; NONCE_LEN];
    // The system RNG (getrandom) does not fail on Linux once booted.
    ring::rand::SystemRandom::new()
        .fill(&mut n)
        .expect("the system random number generator failed");
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_secret_nonce_index_and_flags() {
        let s = ChannelSecret::new([7; 32]);
        let other = ChannelSecret::new([8; 32]);
        let n1 = [1; 32];
        let n2 = [2; 32];
        let p = s.proof(&n1, 3, 0);
        assert!(s.verify(&n1, 3, 0, &p));
        assert!(!other.verify(&n1, 3, 0, &p), "other session");
        assert!(!s.verify(&n2, 3, 0, &p), "replayed on another nonce");
        assert!(!s.verify(&n1, 4, 0, &p), "other channel index");
        assert!(!s.verify(&n1, 3, 1, &p), "other flags");
        assert_ne!(
            s.channel_key(&n1, 3),
            s.channel_key(&n2, 3),
            "per connection"
        );
        assert_ne!(s.channel_key(&n1, 3), s.channel_key(&n1, 4), "per channel");
        assert_ne!(
            s.channel_key(&n1, 3),
            other.channel_key(&n1, 3),
            "per session"
        );
        assert!(!s.verify(&n1, 3, 0, &p[..31]), "truncated");
        assert_ne!(s.session_id(), other.session_id());
    }

    #[test]
    fn plaintext_only_between_loopback_addresses() {
        let lo: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let lo6: SocketAddr = "[::1]:1".parse().unwrap();
        let lan: SocketAddr = "10.1.2.3:1".parse().unwrap();
        assert!(plaintext_allowed(lo, lo));
        assert!(plaintext_allowed(lo6, lo6));
        assert!(!plaintext_allowed(lo, lan));
        assert!(!plaintext_allowed(lan, lo));
    }

    #[tokio::test]
    async fn channel_handshake_accepts_the_session_and_refuses_strangers() {
        let listener = ChannelListener::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = listener.local_addr();
        let secret = ChannelSecret::new([9; 32]);
        let mut reg = listener.registry().register(secret.clone());
        let mut rx = reg.take_channels().unwrap();

        let (mut c, sealer) = connect(addr, &secret, 0, false).await.unwrap();
        assert!(sealer.is_none());
        let mut s = rx.recv().await.unwrap();
        assert!(s.opener.is_none());
        c.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        s.stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");

        // A sealed channel: both ends hold the same per-channel key.
        let (mut c, sealer) = connect(addr, &secret, 1, true).await.unwrap();
        let mut s = rx.recv().await.unwrap();
        let (mut sealer, mut opener) = (sealer.unwrap(), s.opener.take().unwrap());
        sealer.write(&mut c, &mut b"sealed".to_vec()).await.unwrap();
        sealer.write_end(&mut c).await.unwrap();
        let peer = c.local_addr().unwrap();
        assert_eq!(
            opener.read(&mut s.stream, peer).await.unwrap().unwrap(),
            b"sealed"
        );
        assert!(opener.read(&mut s.stream, peer).await.unwrap().is_none());

        // A client with another secret (another session) is refused.
        let stranger = ChannelSecret::new([10; 32]);
        let e = connect(addr, &stranger, 0, false).await.unwrap_err();
        assert!(matches!(e, TransportError::Channel { .. }), "{e}");

        // Once the session is gone its channels are refused.
        drop(reg);
        assert!(connect(addr, &secret, 2, false).await.is_err());
    }
}
