//! Transport tests over 127.0.0.1 (port 0): handshake and refusals, page
//! streams end to end, malformed input from an authenticated peer, and a
//! loopback throughput figure.
use super::*;
use crate::transport::frame::{encode_batch_prefix, PAGE_SIZE, PAGE_STREAM_MAGIC};
use crate::transport::pages::SenderStats;
use crm_proto::migrate::{Commit, Compression, PageBatchHeader, RestoreResult, RoundStart};
use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;
use tokio::io::AsyncWriteExt;

const TOKEN: &[u8] = b"correct horse battery staple";
const MIB: usize = 1 << 20;

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("crm-transport-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn token_auth(t: &[u8]) -> Auth {
    Auth {
        token: Some(t.to_vec()),
        pinned_fingerprint: None,
    }
}

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

async fn listener(name: &str) -> (Listener, TempDir) {
    let dir = TempDir::new(name);
    let l = listen(localhost(), token_auth(TOKEN), &dir.0)
        .await
        .unwrap();
    (l, dir)
}

/// (client session, server session, listener, state dir)
async fn pair(name: &str) -> (Session, Session, Listener, TempDir) {
    let (l, dir) = listener(name).await;
    let auth = Auth {
        token: Some(TOKEN.to_vec()),
        pinned_fingerprint: Some(l.fingerprint()),
    };
    let (c, s) = tokio::join!(connect(l.local_addr(), auth), l.accept());
    (c.unwrap(), s.unwrap(), l, dir)
}

async fn wait_refused(l: &Listener, n: u64) {
    for _ in 0..100 {
        if l.refused_count() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("listener refused {} peers, expected {n}", l.refused_count());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_ok_and_control_round_trip() {
    let (c, s, l, _dir) = pair("ok").await;
    assert_eq!(c.protocol_version(), PROTOCOL_VERSION);
    assert_eq!(s.protocol_version(), PROTOCOL_VERSION);
    assert_eq!(c.server_fingerprint(), Some(l.fingerprint()));
    assert!(s.peer_capabilities().iter().any(|c| c == "zstd"));
    assert_eq!(s.peer_tool_version(), TOOL_VERSION);

    let start = Control {
        msg: Some(control::Msg::RoundStart(RoundStart { round: 1 })),
    };
    c.send_control(&start).await.unwrap();
    assert_eq!(s.recv_control().await.unwrap(), start);
    let result = Control {
        msg: Some(control::Msg::RestoreResult(RestoreResult {
            ok: true,
            error: String::new(),
            pid: 4242,
            restored_at_unix_us: 1,
            images_dir: String::new(),
        })),
    };
    s.send_control(&result).await.unwrap();
    assert_eq!(c.recv_control().await.unwrap(), result);
    let commit = Control {
        msg: Some(control::Msg::Commit(Commit {})),
    };
    c.send_control(&commit).await.unwrap();
    assert_eq!(control_kind(&s.recv_control().await.unwrap()), "Commit");
    let (a, b) = tokio::join!(c.finish(), s.finish());
    a.unwrap();
    b.unwrap();
    assert_eq!(l.refused_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_or_missing_token_is_refused_on_both_sides() {
    let (l, _dir) = listener("wrong").await;
    let addr = l.local_addr();

    let e = connect(addr, token_auth(b"not the token"))
        .await
        .unwrap_err();
    println!("client sees: {e}");
    match &e {
        TransportError::Refused { reason, .. } => assert!(reason.contains("wrong token"), "{e}"),
        other => panic!("expected Refused, got {other:?}"),
    }
    wait_refused(&l, 1).await;
    // accept() did not return the refused peer and is still waiting.
    assert!(tokio::time::timeout(Duration::from_millis(300), l.accept())
        .await
        .is_err());

    // A source with only a pinned fingerprint has no proof to offer.
    let pinned_only = Auth {
        token: None,
        pinned_fingerprint: Some(l.fingerprint()),
    };
    let e = connect(addr, pinned_only).await.unwrap_err();
    println!("client sees: {e}");
    assert!(
        matches!(&e, TransportError::Refused { reason, .. } if reason.contains("no authentication proof")),
        "{e}"
    );
    wait_refused(&l, 2).await;

    // The listener still serves the right peer afterwards.
    let (c, s) = tokio::join!(connect(addr, token_auth(TOKEN)), l.accept());
    c.unwrap();
    s.unwrap();
}

/// A raw client that knows the wire format but not the token: the server
/// never lets it open a page stream, and refuses it with a reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_peer_cannot_open_page_streams() {
    let (l, _dir) = listener("raw").await;
    let addr = l.local_addr();
    let endpoint = quinn::Endpoint::client(localhost()).unwrap();
    let verifier = Arc::new(ServerVerifier::new(None, provider()));
    let conn = endpoint
        .connect_with(client_config(verifier).unwrap(), addr, SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    // Try to push page data before (and while) authenticating.
    let c2 = conn.clone();
    let pages = tokio::spawn(async move {
        let mut s = c2.open_uni().await?;
        s.write_all(&PAGE_STREAM_MAGIC).await.ok();
        Ok::<_, quinn::ConnectionError>(())
    });
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        tool_version: "evil".into(),
        capabilities: vec![],
        auth_proof: vec![0x42; 32],
    };
    send.write_all(&encode_message(addr, FrameKind::Hello, &hello).unwrap())
        .await
        .unwrap();
    let p = read_required(&mut recv, addr, FrameKind::HelloReply, MAX_HELLO_LEN)
        .await
        .unwrap();
    let reply = decode_hello_reply(addr, &p).unwrap();
    assert!(!reply.accepted);
    assert!(
        reply.auth_proof.is_empty(),
        "no server proof for a refused peer"
    );
    assert!(reply.reason.contains("wrong token"), "{}", reply.reason);
    conn.close(code::REFUSED, b"ok");
    let r = tokio::time::timeout(Duration::from_secs(5), pages)
        .await
        .expect("open_uni must end when the connection closes")
        .unwrap();
    assert!(r.is_err(), "an unauthenticated peer opened a page stream");
    wait_refused(&l, 1).await;
}

/// An impostor server that accepts anything: the client must refuse it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_server_without_valid_proof() {
    let dir = TempDir::new("impostor");
    let id = load_or_create_identity(&dir.0).unwrap();
    let endpoint = quinn::Endpoint::server(server_config(&id).unwrap(), localhost()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let conn = endpoint.accept().await.unwrap().await.unwrap();
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        let _ = read_required(&mut recv, addr, FrameKind::Hello, MAX_HELLO_LEN).await;
        let reply = HelloReply {
            accepted: true,
            auth_proof: vec![0; 32],
            protocol_version: PROTOCOL_VERSION,
            ..Default::default()
        };
        let frame = encode_message(addr, FrameKind::HelloReply, &reply).unwrap();
        send.write_all(&frame).await.unwrap();
        conn.closed().await
    });
    let e = connect(addr, token_auth(TOKEN)).await.unwrap_err();
    println!("client sees: {e}");
    assert!(
        matches!(&e, TransportError::AuthFailed { reason, .. } if reason.contains("does not know the token")),
        "{e}"
    );
    let closed = server.await.unwrap();
    assert!(
        matches!(closed, quinn::ConnectionError::ApplicationClosed(ref c) if c.error_code == code::REFUSED),
        "{closed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_fingerprint_mismatch_is_refused() {
    let (l, _dir) = listener("pin").await;
    let auth = Auth {
        token: Some(TOKEN.to_vec()),
        pinned_fingerprint: Some([0xaa; 32]),
    };
    let e = connect(l.local_addr(), auth).await.unwrap_err();
    println!("client sees: {e}");
    match &e {
        TransportError::FingerprintMismatch { actual, .. } => {
            assert_eq!(actual, &auth::format_fingerprint(&l.fingerprint()))
        }
        other => panic!("expected FingerprintMismatch, got {other:?}"),
    }
    wait_refused(&l, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_and_connect_refuse_to_run_unauthenticated() {
    let dir = TempDir::new("noauth");
    let e = listen(localhost(), Auth::default(), &dir.0)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("--token-file"), "{e}");
    assert!(matches!(e, TransportError::NoAuth { .. }));
    let pinned_only = Auth {
        token: None,
        pinned_fingerprint: Some([1; 32]),
    };
    assert!(matches!(
        listen(localhost(), pinned_only, &dir.0).await,
        Err(TransportError::ListenerNeedsToken)
    ));
    assert!(matches!(
        listen(localhost(), token_auth(b""), &dir.0).await,
        Err(TransportError::EmptyToken)
    ));
    assert!(matches!(
        connect("127.0.0.1:9".parse().unwrap(), Auth::default()).await,
        Err(TransportError::NoAuth { .. })
    ));
}

/// Deterministic page content of `len` bytes at `vaddr`: every fourth word
/// pseudo-random, the rest derived from the address (compressible, ~40 %).
fn page_content(vaddr: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    for w in 0..(len / 8) as u64 {
        let a = vaddr + w * 8;
        let v = if w % 4 == 0 {
            let mut z = a.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 31)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z ^ (z >> 29)
        } else {
            a >> 12
        };
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

const BASE: u64 = 0x7f00_0000_0000;

/// Sends `total` bytes of checkable pages in batches of varying size over
/// `streams` streams and checks every batch on arrival.
async fn transfer_checked(
    name: &str,
    policy: Compress,
    transport: PageTransport,
    total: usize,
) -> SenderStats {
    let (c, s, _l, _dir) = pair(name).await;
    let mut rx = s.page_receiver().unwrap();
    assert!(matches!(
        s.page_receiver(),
        Err(TransportError::PageReceiverTaken { .. })
    ));
    let receiver = tokio::spawn(async move {
        let mut seen = HashSet::new();
        let mut bytes = 0;
        while bytes < total {
            let (h, data) = rx.next().await?.expect("page streams ended early");
            assert_eq!(h.pid, 1234);
            assert_eq!(data.len(), h.raw_len as usize);
            assert!(
                data == page_content(h.vaddr, data.len()),
                "batch at {:#x} corrupted",
                h.vaddr
            );
            assert!(seen.insert(h.vaddr), "batch at {:#x} twice", h.vaddr);
            bytes += data.len();
        }
        // The receiver is handed back, not dropped: dropping it stops the
        // streams, and a stream stopped before the sender saw its end
        // acknowledged fails the sender's `finish`.
        Ok::<_, TransportError>((seen.len(), bytes, rx))
    });
    let mut tx = c.page_sender(4, policy, transport).await.unwrap();
    assert_eq!(tx.streams(), 4);
    // The listener is on loopback: `Auto` takes unsealed TCP page channels.
    assert_eq!(tx.uses_tcp_channels(), transport != PageTransport::Quic);
    assert_eq!(tx.sealed(), transport == PageTransport::Sealed);
    let sizes = [1usize, 7, 64, 256, 1024, 3];
    let (mut sent, mut vaddr, mut i) = (0, BASE, 0);
    while sent < total {
        let len = (sizes[i % sizes.len()] * PAGE_SIZE).min(total - sent);
        tx.send_batch(1234, 1, vaddr, page_content(vaddr, len))
            .await
            .unwrap();
        sent += len;
        vaddr += len as u64 + PAGE_SIZE as u64; // holes, like zero pages left out
        i += 1;
    }
    tx.flush().await.unwrap();
    let (batches, bytes, rx) = receiver.await.unwrap().unwrap();
    let stats = tx.finish().await.unwrap();
    drop(rx);
    assert_eq!(bytes, total);
    assert_eq!(batches as u64, stats.batches);
    assert_eq!(stats.raw_bytes, total as u64);
    let (a, b) = tokio::join!(c.finish(), s.finish());
    a.unwrap();
    b.unwrap();
    stats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_64mib_over_4_streams_raw() {
    let st = transfer_checked("raw64", Compress::Never, PageTransport::Quic, 64 * MIB).await;
    println!("Never: {st:?}");
    assert_eq!(st.compressed_batches, 0);
    assert!(st.wire_bytes > st.raw_bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_64mib_over_4_sealed_tcp_channels_zstd() {
    let st = transfer_checked(
        "sealed64",
        Compress::Always,
        PageTransport::Sealed,
        64 * MIB,
    )
    .await;
    println!("Always over sealed TCP channels: {st:?}");
    assert_eq!(st.compressed_batches, st.batches);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_64mib_over_4_tcp_channels_raw() {
    let st = transfer_checked("tcp64", Compress::Never, PageTransport::Auto, 64 * MIB).await;
    println!("Never over TCP channels: {st:?}");
    assert_eq!(st.compressed_batches, 0);
    assert!(st.wire_bytes > st.raw_bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_64mib_over_4_streams_zstd() {
    let st = transfer_checked("zstd64", Compress::Always, PageTransport::Quic, 64 * MIB).await;
    println!(
        "Always: {st:?}; wire/raw = {:.3}",
        st.wire_bytes as f64 / st.raw_bytes as f64
    );
    assert_eq!(st.compressed_batches, st.batches);
    assert!(st.wire_bytes < st.raw_bytes * 3 / 4);
}

/// Malformed input from an authenticated peer: typed errors, no panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_page_streams_and_control_frames() {
    let (c, s, l, _dir) = pair("malformed").await;
    let mut rx = s.page_receiver().unwrap();
    let peer = c.peer();

    let raw_stream = |bytes: Vec<u8>| {
        let conn = c.conn.clone();
        async move {
            let mut st = conn.open_uni().await.unwrap();
            st.write_all(&bytes).await.unwrap();
            st.finish().unwrap();
        }
    };

    raw_stream(b"GET / HTTP/1.1\r\n".to_vec()).await;
    let e = rx.next().await.unwrap_err();
    println!("{e}");
    assert!(matches!(
        e,
        TransportError::Invalid {
            kind: FrameKind::StreamMagic,
            ..
        }
    ));

    let mut b = PAGE_STREAM_MAGIC.to_vec();
    b.extend_from_slice(&u32::MAX.to_le_bytes());
    raw_stream(b).await;
    let e = rx.next().await.unwrap_err();
    println!("{e}");
    assert!(matches!(
        e,
        TransportError::FrameTooLarge {
            kind: FrameKind::BatchHeader,
            ..
        }
    ));

    let data = vec![7u8; PAGE_SIZE];
    let h = PageBatchHeader {
        pid: 1,
        round: 0,
        vaddr: BASE,
        nr_pages: 1,
        compression: Compression::None as i32,
        raw_len: PAGE_SIZE as u32,
        crc32: crc32fast::hash(&data) ^ 1,
        has_crc: true,
    };
    let mut b = PAGE_STREAM_MAGIC.to_vec();
    b.extend_from_slice(&encode_batch_prefix(&h, data.len()));
    b.extend_from_slice(&data);
    raw_stream(b).await;
    let e = rx.next().await.unwrap_err();
    println!("{e}");
    assert!(matches!(e, TransportError::BadBatch { pid: 1, .. }));
    assert!(e.to_string().contains("CRC mismatch"));

    // Truncated batch: the stream ends inside the data frame.
    let h = PageBatchHeader {
        crc32: crc32fast::hash(&data),
        ..h
    };
    let mut b = PAGE_STREAM_MAGIC.to_vec();
    b.extend_from_slice(&encode_batch_prefix(&h, data.len()));
    b.extend_from_slice(&data[..100]);
    raw_stream(b).await;
    let e = rx.next().await.unwrap_err();
    println!("{e}");
    assert!(matches!(
        e,
        TransportError::Truncated {
            kind: FrameKind::BatchData,
            got: 100,
            ..
        }
    ));

    // A good batch still gets through after all that.
    let mut tx = c
        .page_sender(1, Compress::Never, PageTransport::Quic)
        .await
        .unwrap();
    tx.send_batch(1, 0, BASE, data.clone()).await.unwrap();
    let (h2, d2) = rx.next().await.unwrap().unwrap();
    assert_eq!((h2.vaddr, d2), (BASE, data.clone().into()));
    tx.finish().await.unwrap();

    // The same over a TCP page channel: garbage after a valid channel
    // handshake is a typed error, and good batches still get through.
    let secret = c
        .channel_secret
        .clone()
        .expect("loopback peer: TCP channels");
    let (mut ch, _) = tcp_channel::connect(l.local_addr(), &secret, 7, false)
        .await
        .unwrap();
    ch.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    ch.shutdown().await.unwrap();
    let e = rx.next().await.unwrap_err();
    println!("{e}");
    assert!(matches!(
        e,
        TransportError::Invalid {
            kind: FrameKind::StreamMagic,
            ..
        }
    ));
    let mut tx = c
        .page_sender(1, Compress::Never, PageTransport::Auto)
        .await
        .unwrap();
    assert!(tx.uses_tcp_channels());
    tx.send_batch(1, 0, BASE, data.clone()).await.unwrap();
    let (h2, d2) = rx.next().await.unwrap().unwrap();
    assert_eq!((h2.vaddr, d2), (BASE, data.clone().into()));
    tx.finish().await.unwrap();

    // Caller mistakes are refused before anything is sent.
    let mut tx = c
        .page_sender(1, Compress::Never, PageTransport::Auto)
        .await
        .unwrap();
    assert!(matches!(
        tx.send_batch(1, 0, BASE + 1, data.clone()).await,
        Err(TransportError::InvalidSend { .. })
    ));
    assert!(matches!(
        tx.send_batch(1, 0, BASE, data[..100].to_vec()).await,
        Err(TransportError::InvalidSend { .. })
    ));
    assert!(matches!(
        tx.send_batch(1, 0, BASE, vec![0; 5 * MIB]).await,
        Err(TransportError::InvalidSend { .. })
    ));
    drop(tx);

    // Control stream: an oversized frame closes the session with a typed error.
    c.send
        .lock()
        .await
        .write_all(&[0xff, 0xff, 0xff, 0x7f])
        .await
        .unwrap();
    let e = s.recv_control().await.unwrap_err();
    println!("{e}");
    assert!(matches!(
        e,
        TransportError::FrameTooLarge {
            kind: FrameKind::Control,
            ..
        }
    ));
    let e = c.recv_control().await.unwrap_err();
    println!("client sees: {e}");
    assert!(matches!(e, TransportError::Connection { .. }), "{e:?}");
    let _ = peer;
}

/// Loopback throughput of page batches (4 MiB, 4 streams), printed for the
/// record; numbers depend on the build profile (run with --release for
/// meaningful figures).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_throughput() {
    let total = 256 * MIB;
    let batch = page_content(BASE, 4 * MIB);
    for (policy, transport) in [
        (Compress::Never, PageTransport::Quic),
        (Compress::Always, PageTransport::Quic),
        (Compress::Auto, PageTransport::Quic),
        (Compress::Never, PageTransport::Auto),
        (Compress::Auto, PageTransport::Auto),
        (Compress::Never, PageTransport::Sealed),
    ] {
        let (c, s, _l, _dir) = pair("tput").await;
        let mut rx = s.page_receiver().unwrap();
        let receiver = tokio::spawn(async move {
            let mut bytes = 0;
            while bytes < total {
                let (_, d) = rx.next().await?.expect("ended early");
                bytes += d.len();
            }
            // Handed back, not dropped (see `transfer_checked`).
            Ok::<_, TransportError>((bytes, rx))
        });
        let mut tx = c.page_sender(4, policy, transport).await.unwrap();
        let start = Instant::now();
        let mut vaddr = BASE;
        for _ in 0..total / batch.len() {
            tx.send_batch(1, 0, vaddr, batch.clone()).await.unwrap();
            vaddr += batch.len() as u64;
        }
        let (tx_tcp, tx_sealed) = (tx.uses_tcp_channels(), tx.sealed());
        let (bytes, rx) = receiver.await.unwrap().unwrap();
        assert_eq!(bytes, total);
        let st = tx.finish().await.unwrap();
        drop(rx);
        let secs = start.elapsed().as_secs_f64();
        let stats = c.conn.stats();
        println!(
            "loopback {policy:?} over {}: {} MiB in {secs:.3} s = {:.0} MiB/s raw pages, wire/raw {:.3}, \
             compressed batches {}/{}, compressing at end: {}, last sample: {:?}, \
             path rtt {:?} cwnd {} B mtu {}",
            match (tx_tcp, tx_sealed) {
                (true, true) => "sealed TCP channels",
                (true, false) => "TCP channels",
                _ => "QUIC streams",
            },
            total / MIB,
            total as f64 / MIB as f64 / secs,
            st.wire_bytes as f64 / st.raw_bytes as f64,
            st.compressed_batches,
            st.batches,
            st.compressing,
            st.last_sample,
            stats.path.rtt,
            stats.path.cwnd,
            stats.path.current_mtu,
        );
        let (a, b) = tokio::join!(c.finish(), s.finish());
        a.unwrap();
        b.unwrap();
    }
}
