//! The migration transport: one authenticated QUIC connection (quinn, TLS
//! 1.3) between the source (`cr-migrate send`, the client) and the
//! destination (`cr-migrate receive`, the server), carrying the control
//! messages and the page data of one migration. Message types are in
//! `crm_proto::migrate` (`proto/proto/migrate.proto`); this module owns how
//! they travel: framing and limits ([`frame`]), authentication ([`auth`]),
//! endpoints and the control stream ([`quic`]), page streams and compression
//! ([`pages`]), and TCP page channels ([`tcp_channel`]). It knows nothing
//! about processes: a page batch is `(pid, round, vaddr, bytes)`.
//!
//! # Streams
//!
//! ```text
//!   source (client)                                   destination (server)
//!   ─────────────── control: 1 bidirectional stream, opened by the client ───
//!   page streams:   up to 16 unidirectional streams, opened by the sender of
//!                   pages (normally the source), allowed only after auth
//!   or page channels: up to 16 TCP connections to the receiver's address
//!                   and port number (TCP), each proving it belongs to the
//!                   authenticated session; used when the receiver offers
//!                   them ("tcp-pages") and is on this host (see
//!                   [`tcp_channel`]: QUIC's per-packet cost caps it far
//!                   below what TCP with large segments carries)
//! ```
//!
//! Every message is a frame: `u32` little-endian length + protobuf payload,
//! with a per-kind cap checked before allocation (Hello/HelloReply 64 KiB,
//! Control 64 MiB, PageBatchHeader 128 B, page data ≤ zstd bound of 4 MiB).
//! A page stream starts with the magic `CRMP`, then carries
//! `PageBatchHeader` frame + data frame pairs until the sender finishes it.
//!
//! # Sequence
//!
//! ```text
//!   source                                                  destination
//!     │ QUIC + TLS 1.3 handshake (server cert self-signed;        │
//!     │ client checks its SHA-256 if pinned)                      │
//!     │── Hello{version, tool, caps, proof_c} ───────────────────▶│ verify proof_c
//!     │◀─────────────── HelloReply{accepted, version, proof_s} ──│ (or accepted=false,
//!     │ verify proof_s                                            │  reason; close)
//!     │                 [page streams allowed from here on]       │
//!     │                                                           │
//!     │   ┌── round i = 0, 1, … N (pre-copy; the last one runs     │
//!     │   │   with the tree frozen) ──────────────────────────────│
//!     │── RoundStart{i} ─────────────────────────────────────────▶│
//!     │══ page batches {pid, i, vaddr, pages} on page streams ═══▶│ store newest copy
//!     │── RoundEnd{i, pages, bytes, batches} ────────────────────▶│ round i complete once
//!     │                                                           │ `batches` batches of
//!     │◀──────────────────────────────────────── RoundStored{i} ──│ round i are stored
//!     │   └── (the source waits for it, except in the last round) │
//!     │── FinalState{inventory, core, mm, files, final_round} ───▶│ restore (lazy: the
//!     │◀────── RestoreResult{ok, error, pid, restored_at_unix_us} ─│ tree runs, its memory
//!     │                                                           │ fills in after)
//!     │── Commit{} (source killed)  |  Abort{reason} (source      │
//!     │   resumes) ──────────────────────────────────────────────▶│
//!     │        both: Session::finish (end control stream, close)  │
//! ```
//!
//! Page streams are not ordered with the control stream, which is why
//! `RoundEnd` carries the batch count. `Progress` may be sent by either side
//! at any time; `Abort` by either side at any time before `Commit`, and the
//! source then resumes its tree (nothing lost).
//!
//! # Versions
//!
//! The version travels in the first message. A side speaking versions
//! `MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION` (current and previous) accepts a
//! peer whose highest version is in that range or above it; the session uses
//! `min(ours, theirs)`, announced in `HelloReply.protocol_version`.
//!
//! # Authentication
//!
//! The destination restores code as root, so an unauthenticated session
//! would be remote code execution: [`listen`] refuses to start without a
//! token, and [`Listener::accept`] returns only sessions whose peer proved it
//! knows the token. The proof is `HMAC-SHA256(token, TLS exporter || role)`
//! in both directions, checked in constant time; see [`auth`] for why this
//! defeats a relaying man in the middle. The listener's certificate
//! fingerprint ([`Listener::fingerprint`]) can additionally be pinned by the
//! source ([`Auth::pinned_fingerprint`]).
//!
//! # Compression
//!
//! Per-batch zstd level 1, policy [`Compress`] (`Auto` decides from measured
//! link rate, compression speed and ratio; the rule is in [`pages`]).
pub mod auth;
pub mod error;
pub mod frame;
pub mod pages;
pub mod quic;
pub mod sealed;
pub mod tcp_channel;

#[allow(unused_imports)]
pub use auth::{format_fingerprint, parse_fingerprint, read_token_file, Auth};
#[allow(unused_imports)]
pub use error::{Result, TransportError};
#[allow(unused_imports)]
pub use pages::{
    compression_pays, Compress, LinkSample, PageReceiver, PageSender, PageTransport, ReceivedBatch,
    SenderStats,
};
#[allow(unused_imports)]
pub use quic::{connect, control_kind, listen, Listener, Session};

/// Wire protocol version spoken by this build.
pub const PROTOCOL_VERSION: u32 = 1;
/// Oldest version still accepted (current and previous).
pub const MIN_PROTOCOL_VERSION: u32 = if PROTOCOL_VERSION > 1 {
    PROTOCOL_VERSION - 1
} else {
    1
};
/// Capabilities announced in the Hello.
pub const CAPABILITIES: &[&str] = &["zstd", "page-streams"];
/// Most page streams a peer may have open at once.
pub const MAX_PAGE_STREAMS: u32 = 16;
/// TLS ALPN protocol id.
pub const ALPN: &[u8] = b"cr-migrate/1";

/// QUIC application close and stream stop codes.
pub mod code {
    use quinn::VarInt;
    /// Normal end of session.
    pub const DONE: VarInt = VarInt::from_u32(0);
    /// Handshake refused (authentication, version, timeout).
    pub const REFUSED: VarInt = VarInt::from_u32(1);
    /// The peer broke the protocol (malformed frame, unexpected message).
    pub const PROTOCOL: VarInt = VarInt::from_u32(2);
    /// Migration aborted by the application.
    pub const ABORT: VarInt = VarInt::from_u32(3);
}
