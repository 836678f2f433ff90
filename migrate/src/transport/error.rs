//! The transport's one error type. Every variant that concerns a peer names
//! it (its socket address), and every decoding failure names the message
//! kind and what was wrong with it; underlying errors are kept as `#[source]`
//! and not repeated in the message.
use std::net::SocketAddr;
use std::path::PathBuf;

use super::frame::FrameKind;

/// Result of transport operations.
pub type Result<T, E = TransportError> = std::result::Result<T, E>;

/// What went wrong in the migration transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// `listen`/`connect` without any way to authenticate the peer.
    #[error(
        "refusing to {side} without authentication: pass --token-file FILE \
         (the same secret on both hosts); the destination restores code as root, \
         so an unauthenticated peer would be remote code execution"
    )]
    NoAuth { side: &'static str },

    /// A listener was given only a pinned fingerprint: that authenticates the
    /// listener to the connecting side, never the connecting side to it.
    #[error(
        "the listening side needs --token-file: a pinned certificate fingerprint \
         lets the sender check the receiver, but not the receiver check the sender"
    )]
    ListenerNeedsToken,

    /// The token file content is unusable.
    #[error("the authentication token is empty")]
    EmptyToken,

    /// A fingerprint given by the user does not parse.
    #[error("certificate fingerprint {text:?} is not 64 hex digits (colons allowed)")]
    BadFingerprint { text: String },

    /// Creating or reading the state directory, certificate or key.
    #[error("{what} {}", path.display())]
    StateFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The stored private key can be read by other users.
    #[error(
        "private key {} has mode {mode:o}: it must not be readable by group or others \
         (chmod 600 it, or delete cert.der and key.der to generate a new pair)",
        path.display()
    )]
    KeyPermissions { path: PathBuf, mode: u32 },

    /// Certificate generation or TLS configuration failed.
    #[error("TLS setup: {what}")]
    Tls { what: String },

    /// The UDP socket could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },

    /// The listener's endpoint was closed.
    #[error("the listener on {addr} is closed")]
    ListenerClosed { addr: SocketAddr },

    /// A connection attempt failed before QUIC was established.
    #[error("cannot connect to {peer}")]
    Connect {
        peer: SocketAddr,
        #[source]
        source: quinn::ConnectError,
    },

    /// The QUIC connection failed or was closed.
    #[error("connection with {peer} lost")]
    Connection {
        peer: SocketAddr,
        #[source]
        source: quinn::ConnectionError,
    },

    /// The server's certificate does not match the pinned fingerprint.
    #[error(
        "{peer} presented a certificate with fingerprint {actual}, \
         but {expected} is pinned: not the expected receiver (or a man in the middle)"
    )]
    FingerprintMismatch {
        peer: SocketAddr,
        expected: String,
        actual: String,
    },

    /// The peer refused the session and told us why.
    #[error("{peer} refused the session: {reason}")]
    Refused { peer: SocketAddr, reason: String },

    /// The peer's authentication proof is missing or wrong.
    #[error("{peer} failed authentication: {reason}")]
    AuthFailed { peer: SocketAddr, reason: String },

    /// No common protocol version.
    #[error("{peer} speaks protocol version {theirs}; this build speaks versions {min} to {max}")]
    Version {
        peer: SocketAddr,
        theirs: u32,
        min: u32,
        max: u32,
    },

    /// The peer did not answer in time.
    #[error("{peer} did not complete {what} within {secs} s")]
    Timeout {
        peer: SocketAddr,
        what: &'static str,
        secs: u64,
    },

    /// A frame's length prefix exceeds the cap for its kind.
    #[error("{peer} sent a {kind} frame of {len} bytes; the limit is {max}")]
    FrameTooLarge {
        peer: SocketAddr,
        kind: FrameKind,
        len: u64,
        max: u64,
    },

    /// A frame's length prefix is zero where a message must be present.
    #[error("{peer} sent an empty {kind} frame")]
    EmptyFrame { peer: SocketAddr, kind: FrameKind },

    /// The stream ended inside a frame.
    #[error("{peer}: stream ended inside a {kind} frame ({got} of {want} bytes)")]
    Truncated {
        peer: SocketAddr,
        kind: FrameKind,
        got: u64,
        want: u64,
    },

    /// The stream ended where a frame was required.
    #[error("{peer} closed the stream where a {kind} frame was expected")]
    UnexpectedEnd { peer: SocketAddr, kind: FrameKind },

    /// The frame's payload is not a valid protobuf message of its kind.
    #[error("{peer} sent an undecodable {kind} message")]
    Decode {
        peer: SocketAddr,
        kind: FrameKind,
        #[source]
        source: prost::DecodeError,
    },

    /// The message decoded but its content is invalid.
    #[error("{peer} sent an invalid {kind}: {what}")]
    Invalid {
        peer: SocketAddr,
        kind: FrameKind,
        what: String,
    },

    /// A page batch's data does not match its header.
    #[error("{peer}: page batch of pid {pid} at {vaddr:#x} (round {round}): {what}")]
    BadBatch {
        peer: SocketAddr,
        pid: i32,
        vaddr: u64,
        round: u32,
        what: String,
    },

    /// Reading from a stream failed.
    #[error("{peer}: reading a {kind} frame")]
    Read {
        peer: SocketAddr,
        kind: FrameKind,
        #[source]
        source: std::io::Error,
    },

    /// Writing to a stream failed.
    #[error("{peer}: writing {what}")]
    Write {
        peer: SocketAddr,
        what: &'static str,
        #[source]
        source: quinn::WriteError,
    },

    /// Opening a stream failed.
    #[error("{peer}: opening a {what} stream")]
    OpenStream {
        peer: SocketAddr,
        what: &'static str,
        #[source]
        source: quinn::ConnectionError,
    },

    /// The caller asked to send something that cannot be sent.
    #[error("cannot send to {peer}: {what}")]
    InvalidSend { peer: SocketAddr, what: String },

    /// A message arrived where the protocol does not allow it.
    #[error("{peer} sent {got} where {expected} was expected")]
    Unexpected {
        peer: SocketAddr,
        got: String,
        expected: &'static str,
    },

    /// `Session::page_receiver` was called twice.
    #[error("the page streams of {peer} already have a receiver")]
    PageReceiverTaken { peer: SocketAddr },

    /// A page-stream worker ended early (its error was reported before, or
    /// the connection closed).
    #[error("page stream to {peer} stopped: {what}")]
    PageStreamStopped { peer: SocketAddr, what: String },

    /// A TCP page channel failed.
    #[error("{peer}: {what}")]
    Channel {
        peer: SocketAddr,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },

    /// zstd failed on our side (not on peer data).
    #[error("zstd {what}")]
    Zstd {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}
