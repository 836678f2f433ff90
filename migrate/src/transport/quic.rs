//! QUIC endpoints, the authenticated handshake and the control stream.
//!
//! [`listen`] binds a server endpoint whose TLS identity (self-signed,
//! generated on first use) lives in the state directory; [`Listener::accept`]
//! returns authenticated [`Session`]s. Handshakes run concurrently in a
//! background task (at most [`MAX_PENDING_HANDSHAKES`], each bounded by
//! [`HANDSHAKE_TIMEOUT`]), so a slow or hostile peer cannot block a real one.
//! A peer that fails the handshake gets `HelloReply{accepted: false, reason}`
//! and a connection close carrying the same reason; `accept` logs a warning,
//! counts it ([`Listener::refused_count`]) and keeps waiting. Before
//! authentication the peer may open no page stream at all (the connection
//! starts with a unidirectional stream limit of 0, raised only after both
//! proofs are checked), so no page data can reach us unauthenticated.
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crm_proto::migrate::{control, Control, Hello, HelloReply};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, VarInt};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::PrivateKeyDer;
use tokio::sync::{mpsc, Mutex};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{info, warn, Instrument};

use super::auth::{self, load_or_create_identity, Auth, Identity, Role, ServerVerifier};
use super::error::{Result, TransportError};
use super::frame::{
    decode_control, decode_hello, decode_hello_reply, encode_message, read_required, FrameKind,
    FrameReader, MAX_CONTROL_LEN, MAX_HELLO_LEN,
};
use super::pages::{Compress, PageReceiver, PageSender, PageTransport};
use super::tcp_channel::{self, ChannelListener, ChannelSecret, Registration, Registry};
use super::{code, ALPN, CAPABILITIES, MAX_PAGE_STREAMS, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// Time a peer has from its first packet to a completed Hello exchange.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes the listener runs at once; further connection attempts are
/// refused until one completes.
pub const MAX_PENDING_HANDSHAKES: usize = 16;
/// How long a refusing server waits for the client to read the reason.
const REFUSE_LINGER: Duration = Duration::from_secs(2);
/// How long [`Session::finish`] waits for the peer to end its side.
const FINISH_TIMEOUT: Duration = Duration::from_secs(30);
/// Name the client asks for in TLS (not verified: the certificate is pinned
/// by fingerprint, not by name).
const SERVER_NAME: &str = "cr-migrate";

const TOOL_VERSION: &str = env!("CARGO_PKG_VERSION");

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_err(what: &str) -> impl FnOnce(rustls::Error) -> TransportError + '_ {
    move |e| TransportError::Tls {
        what: format!("{what}: {e}"),
    }
}

fn transport_config(server: bool) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // The client opens the one control stream; the server opens none.
    t.max_concurrent_bidi_streams(VarInt::from_u32(u32::from(server)));
    // No page streams before authentication (raised in the handshake).
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    // Windows sized for ~1 Gbit/s at 50 ms (and far more on a LAN).
    t.stream_receive_window(VarInt::from_u32(8 << 20));
    t.receive_window(VarInt::from_u32(64 << 20));
    t.send_window(64 << 20);
    // A round may leave the connection quiet while the engine works.
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    t.max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(60_000))));
    t
}

/// Binds a QUIC endpoint (a server one when `server` is given) on a UDP
/// socket with large buffers (see [`SOCKET_BUFFER`]).
fn bind_endpoint(addr: SocketAddr, server: Option<quinn::ServerConfig>) -> Result<quinn::Endpoint> {
    let bind_err = |source| TransportError::Bind { addr, source };
    let cfg = quinn::EndpointConfig::default();
    let socket = std::net::UdpSocket::bind(addr).map_err(bind_err)?;
    size_socket_buffers(&socket);
    let runtime = quinn::default_runtime().ok_or_else(|| {
        bind_err(std::io::Error::other(
            "no async runtime for the QUIC endpoint",
        ))
    })?;
    quinn::Endpoint::new(cfg, server, socket, runtime).map_err(bind_err)
}

/// UDP socket buffer size we ask for. The default (~208 KiB) overflows as
/// soon as the receiving side falls behind for a moment; every overflow is a
/// packet loss to QUIC, which halves its window and, for large packets,
/// looks like an MTU black hole. 16 MiB rides out such stalls at GB/s.
const SOCKET_BUFFER: usize = 16 << 20;

/// Enlarges the socket's buffers: beyond `net.core.[rw]mem_max` where we
/// may (`SO_RCVBUFFORCE` needs CAP_NET_ADMIN), else up to the limit.
fn size_socket_buffers(socket: &std::net::UdpSocket) {
    use nix::sys::socket::{setsockopt, sockopt};
    let rcv = setsockopt(socket, sockopt::RcvBufForce, &SOCKET_BUFFER)
        .or_else(|_| setsockopt(socket, sockopt::RcvBuf, &SOCKET_BUFFER));
    let snd = setsockopt(socket, sockopt::SndBufForce, &SOCKET_BUFFER)
        .or_else(|_| setsockopt(socket, sockopt::SndBuf, &SOCKET_BUFFER));
    if let Err(e) = rcv.and(snd) {
        tracing::debug!("could not enlarge the UDP socket buffers: {e}");
    }
}

fn server_config(id: &Identity) -> Result<quinn::ServerConfig> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err("TLS versions"))?
        .with_no_client_auth()
        .with_single_cert(
            vec![id.cert.clone()],
            PrivateKeyDer::Pkcs8(id.key.clone_key()),
        )
        .map_err(tls_err("loading the certificate and key"))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(tls).map_err(|e| TransportError::Tls {
        what: format!("QUIC server config: {e}"),
    })?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(quic));
    sc.transport_config(Arc::new(transport_config(true)));
    Ok(sc)
}

fn client_config(verifier: Arc<ServerVerifier>) -> Result<quinn::ClientConfig> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err("TLS versions"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| TransportError::Tls {
        what: format!("QUIC client config: {e}"),
    })?;
    let mut cc = quinn::ClientConfig::new(Arc::new(quic));
    cc.transport_config(Arc::new(transport_config(false)));
    Ok(cc)
}

fn exporter(conn: &quinn::Connection) -> Result<[u8; 32]> {
    exporter_with(conn, auth::EXPORTER_LABEL)
}

fn exporter_with(conn: &quinn::Connection, label: &[u8]) -> Result<[u8; 32]> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, label, b"")
        .map_err(|_| TransportError::Tls {
            what: "TLS keying material export failed".into(),
        })?;
    Ok(out)
}

/// Replaces a stream-level error by the connection's close reason when the
/// connection is gone (a refusal's reason travels in the close frame).
fn explain(conn: &quinn::Connection, peer: SocketAddr, e: TransportError) -> TransportError {
    let stream_level = matches!(
        e,
        TransportError::Read { .. }
            | TransportError::Truncated { .. }
            | TransportError::UnexpectedEnd { .. }
            | TransportError::Write { .. }
    );
    if !stream_level {
        return e;
    }
    match conn.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(c)) if c.error_code == code::REFUSED => {
            TransportError::Refused {
                peer,
                reason: String::from_utf8_lossy(&c.reason).into_owned(),
            }
        }
        Some(source) => TransportError::Connection { peer, source },
        None => e,
    }
}

/// Name of a control message, for logs and errors.
pub fn control_kind(c: &Control) -> &'static str {
    match &c.msg {
        Some(control::Msg::RoundStart(_)) => "RoundStart",
        Some(control::Msg::RoundEnd(_)) => "RoundEnd",
        Some(control::Msg::FinalState(_)) => "FinalState",
        Some(control::Msg::RestoreResult(_)) => "RestoreResult",
        Some(control::Msg::Commit(_)) => "Commit",
        Some(control::Msg::Abort(_)) => "Abort",
        Some(control::Msg::Progress(_)) => "Progress",
        Some(control::Msg::RoundStored(_)) => "RoundStored",
        Some(control::Msg::ZeroPages(_)) => "ZeroPages",
        Some(control::Msg::PidsBusy(_)) => "PidsBusy",
        Some(control::Msg::PidsReleased(_)) => "PidsReleased",
        Some(control::Msg::ImageFile(_)) => "ImageFile",
        None => "an empty Control",
    }
}

fn check_token(auth: &Auth) -> Result<()> {
    match &auth.token {
        Some(t) if t.is_empty() => Err(TransportError::EmptyToken),
        _ => Ok(()),
    }
}

/// Listens for migration sessions on `addr` (UDP). The TLS identity is
/// `state_dir/cert.der` + `state_dir/key.der`, created on first use.
///
/// Refuses to start without `auth.token` ([`TransportError::NoAuth`]), and
/// with only a pinned fingerprint ([`TransportError::ListenerNeedsToken`]):
/// a fingerprint authenticates this listener to the source, not the source
/// to this listener, and accepting an unauthenticated source would let
/// anyone run code as root here.
pub async fn listen(addr: SocketAddr, auth: Auth, state_dir: &Path) -> Result<Listener> {
    check_token(&auth)?;
    let token = match (auth.token, auth.pinned_fingerprint) {
        (Some(t), None) => t,
        (Some(_), Some(_)) | (None, Some(_)) => return Err(TransportError::ListenerNeedsToken),
        (None, None) => return Err(TransportError::NoAuth { side: "listen" }),
    };
    let id = load_or_create_identity(state_dir)?;
    let endpoint = bind_endpoint(addr, Some(server_config(&id)?))?;
    let local = endpoint
        .local_addr()
        .map_err(|source| TransportError::Bind { addr, source })?;
    // Page channels listen on TCP at the same address and port number.
    let channels = match ChannelListener::bind(local).await {
        Ok(c) => Some(c),
        Err(e) => {
            warn!(addr = %local, error = %e, "no TCP page channels (pages will travel on QUIC)");
            None
        }
    };
    let registry = channels.as_ref().map(|c| c.registry().clone());
    let (tx, rx) = mpsc::channel(4);
    let refused = Arc::new(AtomicU64::new(0));
    let span = tracing::info_span!("listener", addr = %local);
    let task = tokio::spawn(
        accept_loop(
            endpoint.clone(),
            Arc::new(token),
            registry,
            tx,
            refused.clone(),
        )
        .instrument(span),
    );
    info!(
        addr = %local,
        fingerprint = %auth::format_fingerprint(&id.fingerprint),
        "listening for migrations"
    );
    Ok(Listener {
        endpoint,
        _channels: channels,
        addr: local,
        fingerprint: id.fingerprint,
        sessions: Mutex::new(rx),
        refused,
        task,
    })
}

/// A listening endpoint. Dropping it stops accepting; sessions already
/// returned by [`accept`](Self::accept) live on.
pub struct Listener {
    endpoint: quinn::Endpoint,
    /// TCP page channels (see [`tcp_channel`]); kept alive with the listener.
    _channels: Option<ChannelListener>,
    addr: SocketAddr,
    fingerprint: [u8; 32],
    sessions: Mutex<mpsc::Receiver<Session>>,
    #[allow(dead_code)] // read by `refused_count`
    refused: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("addr", &self.addr)
            .field("fingerprint", &auth::format_fingerprint(&self.fingerprint))
            .finish_non_exhaustive()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
        self.endpoint.set_server_config(None);
    }
}

impl Listener {
    /// The next authenticated session. Peers that fail the handshake (wrong
    /// or missing token, unsupported version, timeout, TLS failure) are
    /// refused, logged with `tracing::warn!` and counted in
    /// [`refused_count`](Self::refused_count); `accept` keeps waiting.
    /// Errors only when the listener itself is closed.
    pub async fn accept(&self) -> Result<Session> {
        self.sessions
            .lock()
            .await
            .recv()
            .await
            .ok_or(TransportError::ListenerClosed { addr: self.addr })
    }

    /// The bound address (with the real port when listening on port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// SHA-256 of the listener's certificate, for the source to pin
    /// (format with [`format_fingerprint`](super::format_fingerprint)).
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// Connection attempts refused so far.
    #[allow(dead_code)] // API for the commands and reports; exercised by the tests
    pub fn refused_count(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

use crm_engine::error_chain;

async fn accept_loop(
    endpoint: quinn::Endpoint,
    token: Arc<Vec<u8>>,
    registry: Option<Arc<Registry>>,
    tx: mpsc::Sender<Session>,
    refused: Arc<AtomicU64>,
) {
    let mut pending: JoinSet<(SocketAddr, Result<Session>)> = JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let peer = incoming.remote_address();
                if pending.len() >= MAX_PENDING_HANDSHAKES {
                    warn!(%peer, "too many handshakes in progress; refusing connection");
                    refused.fetch_add(1, Ordering::Relaxed);
                    incoming.refuse();
                    continue;
                }
                let token = token.clone();
                let endpoint = endpoint.clone();
                let registry = registry.clone();
                let span = tracing::info_span!("peer", %peer);
                pending.spawn(
                    async move {
                        let r = tokio::time::timeout(
                            HANDSHAKE_TIMEOUT,
                            server_handshake(incoming, peer, &token, registry, endpoint),
                        )
                        .await
                        .unwrap_or(Err(TransportError::Timeout {
                            peer,
                            what: "the handshake",
                            secs: HANDSHAKE_TIMEOUT.as_secs(),
                        }));
                        (peer, r)
                    }
                    .instrument(span),
                );
            }
            Some(done) = pending.join_next(), if !pending.is_empty() => {
                match done {
                    Ok((peer, Ok(session))) => {
                        info!(%peer, version = session.version, "authenticated session");
                        if tx.send(session).await.is_err() {
                            break;
                        }
                    }
                    Ok((peer, Err(e))) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        warn!(%peer, error = %error_chain(&e), "refused a connection");
                    }
                    Err(e) => warn!(error = %e, "handshake task failed"),
                }
            }
        }
    }
}

/// Server side of the handshake: TLS, then Hello/HelloReply. Reads nothing
/// but the Hello frame before the client's proof is verified.
async fn server_handshake(
    incoming: quinn::Incoming,
    peer: SocketAddr,
    token: &[u8],
    registry: Option<Arc<Registry>>,
    endpoint: quinn::Endpoint,
) -> Result<Session> {
    let conn = incoming
        .await
        .map_err(|source| TransportError::Connection { peer, source })?;
    let (mut send, mut recv) = conn
        .accept_bi()
        .await
        .map_err(|source| TransportError::Connection { peer, source })?;
    let hello = read_required(&mut recv, peer, FrameKind::Hello, MAX_HELLO_LEN)
        .await
        .and_then(|p| decode_hello(peer, &p));
    let hello = match hello {
        Ok(h) => h,
        Err(e) => {
            let e = explain(&conn, peer, e);
            let reason = format!("malformed Hello: {e}");
            return Err(refuse(&conn, &mut send, reason, e).await);
        }
    };
    if hello.protocol_version < MIN_PROTOCOL_VERSION {
        let e = TransportError::Version {
            peer,
            theirs: hello.protocol_version,
            min: MIN_PROTOCOL_VERSION,
            max: PROTOCOL_VERSION,
        };
        let reason = format!(
            "protocol version {} is too old; this receiver speaks {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}",
            hello.protocol_version
        );
        return Err(refuse(&conn, &mut send, reason, e).await);
    }
    let version = hello.protocol_version.min(PROTOCOL_VERSION);
    let ekm = exporter(&conn)?;
    if hello.auth_proof.is_empty() {
        let reason = "no authentication proof: start the sender with --token-file \
                      (the same token as this receiver)"
            .to_owned();
        let e = TransportError::AuthFailed {
            peer,
            reason: reason.clone(),
        };
        return Err(refuse(&conn, &mut send, reason, e).await);
    }
    if !auth::verify_proof(token, &ekm, Role::Client, &hello.auth_proof) {
        let reason = "wrong token: the sender's authentication proof does not match this \
                      receiver's token (different token files, or a man in the middle)"
            .to_owned();
        let e = TransportError::AuthFailed {
            peer,
            reason: reason.clone(),
        };
        return Err(refuse(&conn, &mut send, reason, e).await);
    }
    // Authenticated: the session may open TCP page channels.
    let registration = match &registry {
        Some(r) => Some(r.register(ChannelSecret::new(exporter_with(
            &conn,
            tcp_channel::CHANNEL_EXPORTER_LABEL,
        )?))),
        None => None,
    };
    let mut capabilities: Vec<String> = CAPABILITIES.iter().map(|s| s.to_string()).collect();
    if registration.is_some() {
        capabilities.push(tcp_channel::CAPABILITY.to_owned());
    }
    let reply = HelloReply {
        accepted: true,
        reason: String::new(),
        auth_proof: auth::proof(token, &ekm, Role::Server).to_vec(),
        protocol_version: version,
        tool_version: TOOL_VERSION.to_owned(),
        capabilities,
    };
    let frame = encode_message(peer, FrameKind::HelloReply, &reply)?;
    send.write_all(&frame)
        .await
        .map_err(|source| TransportError::Write {
            peer,
            what: "HelloReply",
            source,
        })?;
    conn.set_max_concurrent_uni_streams(VarInt::from_u32(MAX_PAGE_STREAMS));
    let mut session = Session::new(
        conn,
        endpoint,
        false,
        peer,
        version,
        hello.tool_version,
        hello.capabilities,
        send,
        recv,
        None,
    );
    session.channel_registration = std::sync::Mutex::new(registration);
    Ok(session)
}

/// Tells the client why it is refused, gives it a moment to read that, and
/// closes the connection with the same reason. Returns `err`.
async fn refuse(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    reason: String,
    err: TransportError,
) -> TransportError {
    let peer = conn.remote_address();
    let mut reason = reason;
    reason.truncate(512);
    let reply = HelloReply {
        accepted: false,
        reason: reason.clone(),
        protocol_version: PROTOCOL_VERSION,
        tool_version: TOOL_VERSION.to_owned(),
        ..Default::default()
    };
    if let Ok(frame) = encode_message(peer, FrameKind::HelloReply, &reply) {
        if send.write_all(&frame).await.is_ok() {
            let _ = send.finish();
            let _ = tokio::time::timeout(REFUSE_LINGER, conn.closed()).await;
        }
    }
    conn.close(code::REFUSED, reason.as_bytes());
    err
}

/// Connects to a listener at `addr` and authenticates both ways. Needs a
/// token, a pinned fingerprint, or both ([`TransportError::NoAuth`]
/// otherwise); a listener always requires the token.
pub async fn connect(addr: SocketAddr, auth: Auth) -> Result<Session> {
    check_token(&auth)?;
    if auth.token.is_none() && auth.pinned_fingerprint.is_none() {
        return Err(TransportError::NoAuth { side: "connect" });
    }
    let bind: SocketAddr = if addr.is_ipv6() {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = bind_endpoint(bind, None)?;
    let span = tracing::info_span!("peer", peer = %addr);
    tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        client_handshake(endpoint, addr, auth).instrument(span),
    )
    .await
    .unwrap_or(Err(TransportError::Timeout {
        peer: addr,
        what: "the handshake",
        secs: HANDSHAKE_TIMEOUT.as_secs(),
    }))
}

async fn client_handshake(
    endpoint: quinn::Endpoint,
    peer: SocketAddr,
    auth: Auth,
) -> Result<Session> {
    let verifier = Arc::new(ServerVerifier::new(auth.pinned_fingerprint, provider()));
    let cfg = client_config(verifier.clone())?;
    let connecting = endpoint
        .connect_with(cfg, peer, SERVER_NAME)
        .map_err(|source| TransportError::Connect { peer, source })?;
    let conn = match connecting.await {
        Ok(c) => c,
        Err(source) => {
            if let (Some(expected), Some(actual)) = (verifier.pinned(), verifier.seen()) {
                if expected != actual {
                    return Err(TransportError::FingerprintMismatch {
                        peer,
                        expected: auth::format_fingerprint(&expected),
                        actual: auth::format_fingerprint(&actual),
                    });
                }
            }
            return Err(TransportError::Connection { peer, source });
        }
    };
    let (mut send, mut recv) =
        conn.open_bi()
            .await
            .map_err(|source| TransportError::OpenStream {
                peer,
                what: "control",
                source,
            })?;
    let ekm = exporter(&conn)?;
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        tool_version: TOOL_VERSION.to_owned(),
        capabilities: CAPABILITIES.iter().map(|s| s.to_string()).collect(),
        auth_proof: auth
            .token
            .as_ref()
            .map(|t| auth::proof(t, &ekm, Role::Client).to_vec())
            .unwrap_or_default(),
    };
    let frame = encode_message(peer, FrameKind::Hello, &hello)?;
    let reply = async {
        send.write_all(&frame)
            .await
            .map_err(|source| TransportError::Write {
                peer,
                what: "Hello",
                source,
            })?;
        let p = read_required(&mut recv, peer, FrameKind::HelloReply, MAX_HELLO_LEN).await?;
        decode_hello_reply(peer, &p)
    }
    .await
    .map_err(|e| explain(&conn, peer, e));
    let fail = |close_code: VarInt, e: TransportError| {
        conn.close(close_code, e.to_string().as_bytes());
        e
    };
    let reply = match reply {
        Ok(r) => r,
        Err(e) => return Err(fail(code::PROTOCOL, e)),
    };
    if !reply.accepted {
        let reason = if reply.reason.is_empty() {
            "no reason given".to_owned()
        } else {
            reply.reason
        };
        return Err(fail(
            code::REFUSED,
            TransportError::Refused { peer, reason },
        ));
    }
    if reply.protocol_version < MIN_PROTOCOL_VERSION || reply.protocol_version > PROTOCOL_VERSION {
        let e = TransportError::Version {
            peer,
            theirs: reply.protocol_version,
            min: MIN_PROTOCOL_VERSION,
            max: PROTOCOL_VERSION,
        };
        return Err(fail(code::REFUSED, e));
    }
    if let Some(token) = &auth.token {
        if !auth::verify_proof(token, &ekm, Role::Server, &reply.auth_proof) {
            let e = TransportError::AuthFailed {
                peer,
                reason: "the receiver's authentication proof does not match our token: it does \
                         not know the token (or a man in the middle relays the connection)"
                    .into(),
            };
            return Err(fail(code::REFUSED, e));
        }
    }
    conn.set_max_concurrent_uni_streams(VarInt::from_u32(MAX_PAGE_STREAMS));
    // Pages go on TCP channels when the receiver offers them.
    let channel_secret = if reply
        .capabilities
        .iter()
        .any(|c| c == tcp_channel::CAPABILITY)
    {
        Some(ChannelSecret::new(exporter_with(
            &conn,
            tcp_channel::CHANNEL_EXPORTER_LABEL,
        )?))
    } else {
        None
    };
    let mut session = Session::new(
        conn,
        endpoint,
        true,
        peer,
        reply.protocol_version,
        reply.tool_version,
        reply.capabilities,
        send,
        recv,
        verifier.seen(),
    );
    session.channel_secret = channel_secret;
    Ok(session)
}

/// An authenticated migration session: the control stream and access to the
/// page streams. All methods take `&self`; sends and receives on the control
/// stream are each serialized by a lock, so one task may send while another
/// receives.
pub struct Session {
    conn: quinn::Connection,
    endpoint: quinn::Endpoint,
    /// The client owns its endpoint and drains it on `finish`.
    owns_endpoint: bool,
    peer: SocketAddr,
    version: u32,
    peer_tool_version: String,
    #[allow(dead_code)] // read by `peer_capabilities`
    peer_capabilities: Vec<String>,
    send: Mutex<quinn::SendStream>,
    /// Cancel-safe: `recv_control` may be raced against page batches.
    recv: Mutex<FrameReader<quinn::RecvStream>>,
    /// A control frame write was cut off (its future dropped): the control
    /// stream is torn and nothing more may be written on it.
    send_torn: AtomicBool,
    receiver_taken: AtomicBool,
    server_fingerprint: Option<[u8; 32]>,
    /// Client: the secret of the TCP page channels, when they are used.
    channel_secret: Option<ChannelSecret>,
    /// Server: where this session's TCP page channels arrive.
    channel_registration: std::sync::Mutex<Option<Registration>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("peer", &self.peer)
            .field("version", &self.version)
            .field("peer_tool_version", &self.peer_tool_version)
            .finish_non_exhaustive()
    }
}

impl Session {
    #[allow(clippy::too_many_arguments)]
    fn new(
        conn: quinn::Connection,
        endpoint: quinn::Endpoint,
        owns_endpoint: bool,
        peer: SocketAddr,
        version: u32,
        peer_tool_version: String,
        peer_capabilities: Vec<String>,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        server_fingerprint: Option<[u8; 32]>,
    ) -> Session {
        Session {
            conn,
            endpoint,
            owns_endpoint,
            peer,
            version,
            peer_tool_version,
            peer_capabilities,
            send: Mutex::new(send),
            recv: Mutex::new(FrameReader::new(recv)),
            send_torn: AtomicBool::new(false),
            receiver_taken: AtomicBool::new(false),
            server_fingerprint,
            channel_secret: None,
            channel_registration: std::sync::Mutex::new(None),
        }
    }

    /// The peer's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The protocol version of this session.
    #[allow(dead_code)] // API for the commands and reports; exercised by the tests
    pub fn protocol_version(&self) -> u32 {
        self.version
    }

    /// The peer's cr-migrate version.
    #[allow(dead_code)] // API for the commands and reports; exercised by the tests
    pub fn peer_tool_version(&self) -> &str {
        &self.peer_tool_version
    }

    /// The peer's capabilities.
    #[allow(dead_code)] // API for the commands and reports; exercised by the tests
    pub fn peer_capabilities(&self) -> &[String] {
        &self.peer_capabilities
    }

    /// Client side: fingerprint of the server certificate (to print for
    /// pinning next time). `None` on the server side.
    pub fn server_fingerprint(&self) -> Option<[u8; 32]> {
        self.server_fingerprint
    }

    /// The current path MTU (UDP payload bytes per packet).
    pub fn path_mtu(&self) -> u16 {
        let p = self.conn.stats().path;
        tracing::debug!(
            "path: mtu {} probes sent {} lost {} black holes {} packets {} lost {} cwnd {} congestion events {}",
            p.current_mtu, p.sent_plpmtud_probes, p.lost_plpmtud_probes, p.black_holes_detected,
            p.sent_packets, p.lost_packets, p.cwnd, p.congestion_events
        );
        p.current_mtu
    }

    /// Smoothed round-trip time of the connection.
    #[allow(dead_code)] // API for the commands and reports; exercised by the tests
    pub fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    /// Sends one control message.
    pub async fn send_control(&self, msg: &Control) -> Result<()> {
        let frame = encode_message(self.peer, FrameKind::Control, msg)?;
        let mut send = self.send.lock().await;
        if self.send_torn.load(Ordering::Acquire) {
            return Err(TransportError::InvalidSend {
                peer: self.peer,
                what: format!(
                    "{}: an earlier control message was cut off mid-write",
                    control_kind(msg)
                ),
            });
        }
        // Set while the write is in flight: if this future is dropped
        // halfway, the flag stays set and later sends refuse instead of
        // appending to half a frame.
        self.send_torn.store(true, Ordering::Release);
        send.write_all(&frame).await.map_err(|source| {
            explain(
                &self.conn,
                self.peer,
                TransportError::Write {
                    peer: self.peer,
                    what: control_kind(msg),
                    source,
                },
            )
        })?;
        self.send_torn.store(false, Ordering::Release);
        Ok(())
    }

    /// Receives the next control message. The end of the peer's control
    /// stream is [`TransportError::UnexpectedEnd`]; a closed connection is
    /// [`TransportError::Connection`]. A malformed frame closes the session.
    pub async fn recv_control(&self) -> Result<Control> {
        let mut recv = self.recv.lock().await;
        let r = recv
            .next_required(self.peer, FrameKind::Control, MAX_CONTROL_LEN)
            .await
            .and_then(|p| decode_control(self.peer, &p))
            .map_err(|e| explain(&self.conn, self.peer, e));
        if let Err(
            e @ (TransportError::FrameTooLarge { .. }
            | TransportError::Decode { .. }
            | TransportError::Invalid { .. }),
        ) = &r
        {
            self.conn.close(code::PROTOCOL, e.to_string().as_bytes());
        }
        r
    }

    /// Opens `n_streams` page streams (clamped to 1..=16) and returns their
    /// sender: TCP page channels when the peer is on this host and offers
    /// them ([`tcp_channel`]), QUIC streams otherwise. Waits until the peer
    /// allows the streams.
    pub async fn page_sender(
        &self,
        n_streams: usize,
        compress: Compress,
        transport: PageTransport,
    ) -> Result<PageSender> {
        // Unsealed only to this host (loopback), see `tcp_channel`.
        let channels = match transport {
            PageTransport::Auto => self
                .channel_secret
                .as_ref()
                .map(|s| (s, !self.peer.ip().is_loopback())),
            PageTransport::Sealed => self.channel_secret.as_ref().map(|s| (s, true)),
            PageTransport::Quic => None,
        };
        PageSender::open(self.conn.clone(), self.peer, n_streams, compress, channels).await
    }

    /// Starts receiving the peer's page streams. Only one receiver per
    /// session ([`TransportError::PageReceiverTaken`] otherwise).
    pub fn page_receiver(&self) -> Result<PageReceiver> {
        if self.receiver_taken.swap(true, Ordering::AcqRel) {
            return Err(TransportError::PageReceiverTaken { peer: self.peer });
        }
        let channels = self
            .channel_registration
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
            .and_then(Registration::take_channels);
        Ok(PageReceiver::start(self.conn.clone(), self.peer, channels))
    }

    /// Closes the session at once (abort path): unsent and unacknowledged
    /// data is dropped; the peer sees `reason`.
    pub fn close(&self, reason: &str) {
        self.conn.close(code::ABORT, reason.as_bytes());
    }

    /// Closes the session after a completed migration (the peer sees
    /// "done", not an abort).
    pub fn close_done(&self) {
        self.conn.close(code::DONE, b"done");
    }

    /// [`Session::close`], then waits (2 s at most) until the close has gone
    /// out, so the peer learns at once instead of by idle timeout when this
    /// process exits right after.
    pub async fn close_and_flush(&self, reason: &str) {
        self.close(reason);
        if self.owns_endpoint {
            let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        }
    }

    /// Ends the session cleanly: ends our control stream, waits until the
    /// peer ends its own (both sides call `finish` after the last message),
    /// then closes. A control message that arrives instead is an error.
    #[allow(dead_code)] // a graceful end for peers that both call it; `send` waits for the close instead
    pub async fn finish(self) -> Result<()> {
        let peer = self.peer;
        let _ = self.send.lock().await.finish();
        let r = {
            let mut recv = self.recv.lock().await;
            tokio::time::timeout(
                FINISH_TIMEOUT,
                recv.next(peer, FrameKind::Control, MAX_CONTROL_LEN),
            )
            .await
        };
        let result = match r {
            Ok(Ok(None)) => Ok(()),
            Ok(Ok(Some(p))) => {
                let got = match decode_control(peer, &p) {
                    Ok(c) => control_kind(&c).to_owned(),
                    Err(e) => e.to_string(),
                };
                self.conn
                    .close(code::PROTOCOL, b"unexpected control message");
                Err(TransportError::Unexpected {
                    peer,
                    got,
                    expected: "the end of the control stream",
                })
            }
            Ok(Err(e)) => match self.conn.close_reason() {
                // The peer finished first and already closed: fine.
                Some(quinn::ConnectionError::ApplicationClosed(c))
                    if c.error_code == code::DONE =>
                {
                    Ok(())
                }
                _ => Err(explain(&self.conn, peer, e)),
            },
            Err(_) => Err(TransportError::Timeout {
                peer,
                what: "the end of the session",
                secs: FINISH_TIMEOUT.as_secs(),
            }),
        };
        self.conn.close(code::DONE, b"done");
        if self.owns_endpoint {
            // Let the close frame go out before the endpoint is dropped.
            let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        }
        result
    }
}

#[cfg(test)]
mod tests;
