//! Framing of protocol messages on QUIC streams, and panic-free decoders.
//!
//! A frame is a `u32` little-endian payload length followed by the payload.
//! Every [`FrameKind`] has its own size cap, checked on the length prefix
//! *before* any buffer is allocated, so a peer cannot make us allocate more
//! than the cap of the frame it is sending. A page batch is two frames: a
//! [`PageBatchHeader`] frame and a data frame whose cap follows from the
//! (validated) header: exactly `raw_len` bytes when uncompressed, at most
//! zstd's compress bound of `raw_len` when compressed.
//!
//! Everything that touches peer bytes returns [`TransportError`] naming the
//! peer, the frame kind and what was wrong; nothing here panics on any input
//! (see the fuzz-style tests at the bottom).
use std::fmt;
use std::net::SocketAddr;

use crm_page_server::{OwnedPages, PageBuf};
use crm_proto::migrate::{Compression, Control, Hello, HelloReply, PageBatchHeader};
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::error::{Result, TransportError};

/// Page size of the migrated processes (x86-64).
pub const PAGE_SIZE: usize = 4096;
/// Largest page batch, raw: 1024 pages.
pub const MAX_BATCH_BYTES: usize = 4 << 20;
/// First bytes of every page stream: "this unidirectional stream carries
/// page batches" (room for other stream kinds in later versions).
pub const PAGE_STREAM_MAGIC: [u8; 4] = *b"CRMP";

/// Cap on `Hello` and `HelloReply` frames.
pub const MAX_HELLO_LEN: u64 = 64 << 10;
/// Cap on `Control` frames: `FinalState` carries the encoded image records of
/// the whole tree (registers, XSAVE areas, VMAs, files).
pub const MAX_CONTROL_LEN: u64 = 64 << 20;
/// Cap on `PageBatchHeader` frames (the largest valid encoding is ~60 bytes).
pub const MAX_BATCH_HEADER_LEN: u64 = 128;
/// Limits inside `Hello`/`HelloReply`.
const MAX_CAPABILITIES: usize = 64;
const MAX_SHORT_STRING: usize = 1024;
/// Length of an authentication proof (HMAC-SHA256).
pub const PROOF_LEN: usize = 32;

/// Length of the frame length prefix.
pub const LEN_PREFIX: usize = 4;

/// The kinds of frame; each has a size cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    Hello,
    HelloReply,
    Control,
    BatchHeader,
    BatchData,
    StreamMagic,
    /// A sealed record of a TCP page channel between hosts.
    SealedRecord,
}

impl FrameKind {
    /// Static cap of this kind (for `BatchData`, the cap of the largest
    /// batch; the real cap comes from its header, see [`batch_data_cap`]).
    pub fn max_len(self) -> u64 {
        match self {
            FrameKind::Hello | FrameKind::HelloReply => MAX_HELLO_LEN,
            FrameKind::Control => MAX_CONTROL_LEN,
            FrameKind::BatchHeader => MAX_BATCH_HEADER_LEN,
            FrameKind::BatchData => zstd::zstd_safe::compress_bound(MAX_BATCH_BYTES) as u64,
            FrameKind::StreamMagic => PAGE_STREAM_MAGIC.len() as u64,
            FrameKind::SealedRecord => super::sealed::MAX_RECORD as u64,
        }
    }
}

impl fmt::Display for FrameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FrameKind::Hello => "Hello",
            FrameKind::HelloReply => "HelloReply",
            FrameKind::Control => "Control",
            FrameKind::BatchHeader => "PageBatchHeader",
            FrameKind::BatchData => "page data",
            FrameKind::StreamMagic => "page stream preamble",
            FrameKind::SealedRecord => "sealed page channel record",
        })
    }
}

/// Encodes `msg` as one frame (length prefix + payload). Refuses a message
/// over the cap of its kind: the peer would refuse it anyway, and the error
/// is clearer here.
pub fn encode_message<M: Message>(peer: SocketAddr, kind: FrameKind, msg: &M) -> Result<Vec<u8>> {
    let len = msg.encoded_len();
    if len as u64 > kind.max_len() {
        return Err(TransportError::InvalidSend {
            peer,
            what: format!(
                "{kind} message of {len} bytes exceeds the limit of {}",
                kind.max_len()
            ),
        });
    }
    let mut buf = Vec::with_capacity(LEN_PREFIX + len);
    // len <= max_len <= u32::MAX for every kind.
    buf.extend_from_slice(&(len as u32).to_le_bytes());
    msg.encode(&mut buf)
        .map_err(|e| TransportError::InvalidSend {
            peer,
            what: format!("encoding {kind}: {e}"),
        })?;
    Ok(buf)
}

/// Checks a length prefix against `max` (and against zero when a message
/// must be present), before anything is allocated.
pub fn check_len(peer: SocketAddr, kind: FrameKind, len: u32, max: u64) -> Result<usize> {
    let len64 = u64::from(len);
    if len64 > max {
        return Err(TransportError::FrameTooLarge {
            peer,
            kind,
            len: len64,
            max,
        });
    }
    if len == 0 && matches!(kind, FrameKind::BatchHeader | FrameKind::BatchData) {
        return Err(TransportError::EmptyFrame { peer, kind });
    }
    Ok(len as usize)
}

/// Splits one frame off the front of `buf`: `(payload, rest)`. The in-memory
/// twin of [`read_frame`].
pub fn split_frame(
    peer: SocketAddr,
    kind: FrameKind,
    max: u64,
    buf: &[u8],
) -> Result<(&[u8], &[u8])> {
    let Some((prefix, rest)) = buf.split_first_chunk::<LEN_PREFIX>() else {
        return Err(TransportError::Truncated {
            peer,
            kind,
            got: buf.len() as u64,
            want: LEN_PREFIX as u64,
        });
    };
    let len = check_len(peer, kind, u32::from_le_bytes(*prefix), max)?;
    if rest.len() < len {
        return Err(TransportError::Truncated {
            peer,
            kind,
            got: rest.len() as u64,
            want: len as u64,
        });
    }
    Ok(rest.split_at(len))
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
async fn read_full<R: AsyncRead + Unpin>(
    r: &mut R,
    peer: SocketAddr,
    kind: FrameKind,
    buf: &mut [u8],
) -> Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let n = r
            .read(&mut buf[got..])
            .await
            .map_err(|source| TransportError::Read { peer, kind, source })?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(got)
}

/// Fills `buf` from the stream; a stream that ends first is
/// [`TransportError::Truncated`].
pub(super) async fn read_all<R: AsyncRead + Unpin>(
    r: &mut R,
    peer: SocketAddr,
    kind: FrameKind,
    buf: &mut [u8],
) -> Result<()> {
    let got = read_full(r, peer, kind, buf).await?;
    if got < buf.len() {
        return Err(TransportError::Truncated {
            peer,
            kind,
            got: got as u64,
            want: buf.len() as u64,
        });
    }
    Ok(())
}

/// Reads one frame. `Ok(None)` when the stream ends cleanly before the
/// frame starts; a stream that ends inside the frame is [`TransportError::Truncated`].
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    peer: SocketAddr,
    kind: FrameKind,
    max: u64,
) -> Result<Option<Vec<u8>>> {
    let Some(len) = read_len_prefix(r, peer, kind, max).await? else {
        return Ok(None);
    };
    read_vec(r, peer, kind, len).await.map(Some)
}

/// A frame's length prefix, checked against `max`; `Ok(None)` at a clean
/// end of stream.
async fn read_len_prefix<R: AsyncRead + Unpin>(
    r: &mut R,
    peer: SocketAddr,
    kind: FrameKind,
    max: u64,
) -> Result<Option<usize>> {
    let mut prefix = [0u8; LEN_PREFIX];
    let got = read_full(r, peer, kind, &mut prefix).await?;
    if got == 0 {
        return Ok(None);
    }
    if got < LEN_PREFIX {
        return Err(TransportError::Truncated {
            peer,
            kind,
            got: got as u64,
            want: LEN_PREFIX as u64,
        });
    }
    check_len(peer, kind, u32::from_le_bytes(prefix), max).map(Some)
}

/// A payload of `len` bytes.
async fn read_vec<R: AsyncRead + Unpin>(
    r: &mut R,
    peer: SocketAddr,
    kind: FrameKind,
    len: usize,
) -> Result<Vec<u8>> {
    // Read into the spare capacity: zero-filling a MiB per batch first
    // would be one more pass over every page received.
    let mut payload = Vec::with_capacity(len);
    while payload.len() < len {
        let want = (len - payload.len()) as u64;
        let n = (&mut *r)
            .take(want)
            .read_buf(&mut payload)
            .await
            .map_err(|source| TransportError::Read { peer, kind, source })?;
        if n == 0 {
            return Err(TransportError::Truncated {
                peer,
                kind,
                got: payload.len() as u64,
                want: len as u64,
            });
        }
    }
    Ok(payload)
}

/// A payload of `len` bytes into a [`PageBuf`] (memory faulted in at once
/// and adopted by the page store as is).
async fn read_page_buf<R: AsyncRead + Unpin>(
    r: &mut R,
    peer: SocketAddr,
    kind: FrameKind,
    len: usize,
) -> Result<PageBuf> {
    let mut buf = PageBuf::zeroed(len);
    read_all(r, peer, kind, &mut buf).await?;
    Ok(buf)
}

/// A frame reader whose [`FrameReader::next`] is cancel-safe: bytes already
/// read stay buffered when the future is dropped (say, by `tokio::select!`
/// picking another branch), so the next call resumes mid-frame instead of
/// starting to parse in the middle of one. At most one frame (bounded by its
/// cap) plus one read of [`READ_CHUNK`] bytes is buffered.
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
}

/// Most bytes [`FrameReader`] asks the stream for at once.
const READ_CHUNK: usize = 1 << 20;

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            buf: Vec::new(),
        }
    }

    /// Reads the next frame. `Ok(None)` when the stream ends cleanly between
    /// frames; a stream that ends inside a frame is [`TransportError::Truncated`].
    pub async fn next(
        &mut self,
        peer: SocketAddr,
        kind: FrameKind,
        max: u64,
    ) -> Result<Option<Vec<u8>>> {
        loop {
            let want = match self.buf.split_first_chunk::<LEN_PREFIX>() {
                Some((prefix, rest)) => {
                    let len = check_len(peer, kind, u32::from_le_bytes(*prefix), max)?;
                    if rest.len() >= len {
                        let payload = rest[..len].to_vec();
                        self.buf.drain(..LEN_PREFIX + len);
                        return Ok(Some(payload));
                    }
                    len - rest.len()
                }
                None => LEN_PREFIX - self.buf.len(),
            };
            self.buf.reserve(want.min(READ_CHUNK));
            // `read_buf` is cancel-safe: it appends only what it has read.
            let n = (&mut self.inner)
                .take(want.min(READ_CHUNK) as u64)
                .read_buf(&mut self.buf)
                .await
                .map_err(|source| TransportError::Read { peer, kind, source })?;
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                let (got, want) = match self.buf.split_first_chunk::<LEN_PREFIX>() {
                    Some((prefix, rest)) => {
                        (rest.len() as u64, u64::from(u32::from_le_bytes(*prefix)))
                    }
                    None => (self.buf.len() as u64, LEN_PREFIX as u64),
                };
                return Err(TransportError::Truncated {
                    peer,
                    kind,
                    got,
                    want,
                });
            }
        }
    }

    /// Like [`FrameReader::next`], but the end of the stream is an error.
    pub async fn next_required(
        &mut self,
        peer: SocketAddr,
        kind: FrameKind,
        max: u64,
    ) -> Result<Vec<u8>> {
        self.next(peer, kind, max)
            .await?
            .ok_or(TransportError::UnexpectedEnd { peer, kind })
    }
}

/// Like [`read_frame`], but the end of the stream is an error.
pub async fn read_required<R: AsyncRead + Unpin>(
    r: &mut R,
    peer: SocketAddr,
    kind: FrameKind,
    max: u64,
) -> Result<Vec<u8>> {
    read_frame(r, peer, kind, max)
        .await?
        .ok_or(TransportError::UnexpectedEnd { peer, kind })
}

fn decode<M: Message + Default>(peer: SocketAddr, kind: FrameKind, payload: &[u8]) -> Result<M> {
    M::decode(payload).map_err(|source| TransportError::Decode { peer, kind, source })
}

fn invalid(peer: SocketAddr, kind: FrameKind, what: impl Into<String>) -> TransportError {
    TransportError::Invalid {
        peer,
        kind,
        what: what.into(),
    }
}

fn check_hello_fields(
    peer: SocketAddr,
    kind: FrameKind,
    tool_version: &str,
    capabilities: &[String],
    proof: &[u8],
) -> Result<()> {
    if tool_version.len() > MAX_SHORT_STRING {
        return Err(invalid(peer, kind, "tool_version is too long"));
    }
    if capabilities.len() > MAX_CAPABILITIES {
        return Err(invalid(
            peer,
            kind,
            format!(
                "{} capabilities (limit {MAX_CAPABILITIES})",
                capabilities.len()
            ),
        ));
    }
    if capabilities.iter().any(|c| c.len() > MAX_SHORT_STRING) {
        return Err(invalid(peer, kind, "a capability name is too long"));
    }
    if !proof.is_empty() && proof.len() != PROOF_LEN {
        return Err(invalid(
            peer,
            kind,
            format!("auth_proof of {} bytes (want {PROOF_LEN})", proof.len()),
        ));
    }
    Ok(())
}

/// Decodes and checks a `Hello` payload.
pub fn decode_hello(peer: SocketAddr, payload: &[u8]) -> Result<Hello> {
    let kind = FrameKind::Hello;
    let h: Hello = decode(peer, kind, payload)?;
    check_hello_fields(peer, kind, &h.tool_version, &h.capabilities, &h.auth_proof)?;
    Ok(h)
}

/// Decodes and checks a `HelloReply` payload.
pub fn decode_hello_reply(peer: SocketAddr, payload: &[u8]) -> Result<HelloReply> {
    let kind = FrameKind::HelloReply;
    let h: HelloReply = decode(peer, kind, payload)?;
    check_hello_fields(peer, kind, &h.tool_version, &h.capabilities, &h.auth_proof)?;
    if h.reason.len() > MAX_SHORT_STRING {
        return Err(invalid(peer, kind, "reason is too long"));
    }
    Ok(h)
}

/// Decodes a `Control` payload; a message without a `msg` is invalid.
pub fn decode_control(peer: SocketAddr, payload: &[u8]) -> Result<Control> {
    let kind = FrameKind::Control;
    let c: Control = decode(peer, kind, payload)?;
    if c.msg.is_none() {
        return Err(invalid(
            peer,
            kind,
            "no message set (unknown kind from a newer peer?)",
        ));
    }
    Ok(c)
}

/// Decodes and validates a `PageBatchHeader` payload. On success:
/// `compression` is a known value, `0 < raw_len <= MAX_BATCH_BYTES`,
/// `raw_len == nr_pages * PAGE_SIZE`, `vaddr` is page-aligned and the range
/// does not wrap, and `pid > 0`.
pub fn decode_batch_header(peer: SocketAddr, payload: &[u8]) -> Result<PageBatchHeader> {
    let kind = FrameKind::BatchHeader;
    let h: PageBatchHeader = decode(peer, kind, payload)?;
    if Compression::try_from(h.compression).is_err() {
        return Err(invalid(
            peer,
            kind,
            format!("unknown compression {}", h.compression),
        ));
    }
    if h.pid <= 0 {
        return Err(invalid(peer, kind, format!("pid {}", h.pid)));
    }
    let raw_len = h.raw_len as usize;
    if raw_len == 0 || raw_len > MAX_BATCH_BYTES || !raw_len.is_multiple_of(PAGE_SIZE) {
        return Err(invalid(
            peer,
            kind,
            format!(
                "raw_len {} (must be a positive multiple of {PAGE_SIZE} up to {MAX_BATCH_BYTES})",
                h.raw_len
            ),
        ));
    }
    if h.nr_pages.checked_mul(PAGE_SIZE as u64) != Some(u64::from(h.raw_len)) {
        return Err(invalid(
            peer,
            kind,
            format!(
                "nr_pages {} does not match raw_len {}",
                h.nr_pages, h.raw_len
            ),
        ));
    }
    if !h.vaddr.is_multiple_of(PAGE_SIZE as u64)
        || h.vaddr.checked_add(u64::from(h.raw_len)).is_none()
    {
        return Err(invalid(
            peer,
            kind,
            format!("vaddr {:#x} is unaligned or the range wraps", h.vaddr),
        ));
    }
    Ok(h)
}

/// Cap of the data frame that follows a validated header.
pub fn batch_data_cap(h: &PageBatchHeader) -> u64 {
    match Compression::try_from(h.compression) {
        Ok(Compression::Zstd) => zstd::zstd_safe::compress_bound(h.raw_len as usize) as u64,
        _ => u64::from(h.raw_len),
    }
}

fn bad_batch(peer: SocketAddr, h: &PageBatchHeader, what: impl Into<String>) -> TransportError {
    TransportError::BadBatch {
        peer,
        pid: h.pid,
        vaddr: h.vaddr,
        round: h.round,
        what: what.into(),
    }
}

/// Turns a data frame into raw pages: decompresses when needed (into a buffer
/// of exactly `raw_len`, so a zstd bomb cannot grow it) and checks length and
/// CRC. `h` must come from [`decode_batch_header`].
pub fn decode_batch_data(
    peer: SocketAddr,
    h: &PageBatchHeader,
    payload: OwnedPages,
    dec: &mut zstd::bulk::Decompressor<'static>,
) -> Result<OwnedPages> {
    let raw_len = h.raw_len as usize;
    if raw_len > MAX_BATCH_BYTES {
        return Err(bad_batch(
            peer,
            h,
            format!("raw_len {raw_len} over the limit"),
        ));
    }
    let raw = match Compression::try_from(h.compression) {
        Ok(Compression::None) => {
            if payload.len() != raw_len {
                return Err(bad_batch(
                    peer,
                    h,
                    format!(
                        "{} bytes of uncompressed data, header says {raw_len}",
                        payload.len()
                    ),
                ));
            }
            payload
        }
        Ok(Compression::Zstd) => {
            let mut out = Vec::with_capacity(raw_len);
            let n = dec
                .decompress_to_buffer(&payload, &mut out)
                .map_err(|e| bad_batch(peer, h, format!("zstd data does not decode: {e}")))?;
            if n != raw_len {
                return Err(bad_batch(
                    peer,
                    h,
                    format!("zstd data decodes to {n} bytes, header says {raw_len}"),
                ));
            }
            out.into()
        }
        Err(_) => {
            return Err(bad_batch(
                peer,
                h,
                format!("unknown compression {}", h.compression),
            ))
        }
    };
    if !h.has_crc {
        return Ok(raw);
    }
    let crc = crc32fast::hash(&raw);
    if crc != h.crc32 {
        return Err(bad_batch(
            peer,
            h,
            format!("CRC mismatch: data {crc:#010x}, header {:#010x}", h.crc32),
        ));
    }
    Ok(raw)
}

/// A decompressor for [`decode_batch_data`], limited to windows a valid batch
/// can use.
pub fn batch_decompressor() -> Result<zstd::bulk::Decompressor<'static>> {
    let mut d = zstd::bulk::Decompressor::new().map_err(|source| TransportError::Zstd {
        what: "decompressor setup",
        source,
    })?;
    // 2^23 > MAX_BATCH_BYTES: enough for any batch, refuses larger windows.
    d.window_log_max(23)
        .map_err(|source| TransportError::Zstd {
            what: "decompressor setup",
            source,
        })?;
    Ok(d)
}

/// Reads the page-stream preamble.
pub async fn read_stream_magic<R: AsyncRead + Unpin>(r: &mut R, peer: SocketAddr) -> Result<()> {
    let kind = FrameKind::StreamMagic;
    let mut magic = [0u8; 4];
    read_all(r, peer, kind, &mut magic).await?;
    if magic != PAGE_STREAM_MAGIC {
        return Err(invalid(peer, kind, format!("bad magic {magic:02x?}")));
    }
    Ok(())
}

/// Reads one page batch (header frame + data frame) without decoding the
/// data. `Ok(None)` at a clean end of stream between batches.
pub async fn read_batch<R: AsyncRead + Unpin>(
    r: &mut R,
    peer: SocketAddr,
) -> Result<Option<(PageBatchHeader, OwnedPages)>> {
    let Some(hdr) = read_frame(r, peer, FrameKind::BatchHeader, MAX_BATCH_HEADER_LEN).await? else {
        return Ok(None);
    };
    let h = decode_batch_header(peer, &hdr)?;
    let kind = FrameKind::BatchData;
    let len = read_len_prefix(r, peer, kind, batch_data_cap(&h))
        .await?
        .ok_or(TransportError::UnexpectedEnd { peer, kind })?;
    // Raw pages (whole pages, one chunk of the store at most) go straight
    // into memory the store keeps; anything else is decoded first.
    let data = if h.compression == Compression::None as i32
        && len.is_multiple_of(PAGE_SIZE)
        && len <= crm_page_server::CHUNK_BYTES
    {
        read_page_buf(r, peer, kind, len).await?.into()
    } else {
        read_vec(r, peer, kind, len).await?.into()
    };
    Ok(Some((h, data)))
}

/// The header and the data length of a batch, from the bytes that precede
/// its data ([`encode_batch_prefix`]; a sealed channel carries them as one
/// record): the in-memory twin of the start of [`read_batch`].
pub fn decode_batch_prefix(peer: SocketAddr, prefix: &[u8]) -> Result<(PageBatchHeader, usize)> {
    let (hdr, rest) = split_frame(peer, FrameKind::BatchHeader, MAX_BATCH_HEADER_LEN, prefix)?;
    let h = decode_batch_header(peer, hdr)?;
    let kind = FrameKind::BatchData;
    let Some((len, rest)) = rest.split_first_chunk::<LEN_PREFIX>() else {
        return Err(TransportError::Truncated {
            peer,
            kind,
            got: rest.len() as u64,
            want: LEN_PREFIX as u64,
        });
    };
    let len = check_len(peer, kind, u32::from_le_bytes(*len), batch_data_cap(&h))?;
    if !rest.is_empty() {
        return Err(invalid(peer, kind, "extra bytes after the data length"));
    }
    Ok((h, len))
}

/// The bytes that precede a batch's data on the wire: header frame plus the
/// data frame's length prefix.
pub fn encode_batch_prefix(h: &PageBatchHeader, data_len: usize) -> Vec<u8> {
    let len = h.encoded_len();
    let mut buf = Vec::with_capacity(2 * LEN_PREFIX + len);
    buf.extend_from_slice(&(len as u32).to_le_bytes());
    h.encode(&mut buf)
        .expect("a Vec grows as needed, encoding cannot run out of space");
    buf.extend_from_slice(&(data_len as u32).to_le_bytes());
    buf
}

#[cfg(test)]
mod tests {
    use super::*;
    use crm_proto::migrate::{control, Abort, FinalState, RoundEnd};
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::time::Duration;

    fn peer() -> SocketAddr {
        "192.0.2.7:4433".parse().unwrap()
    }

    /// splitmix64: deterministic, good enough to drive a fuzzer.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    fn valid_header(raw: &[u8], compression: Compression) -> PageBatchHeader {
        PageBatchHeader {
            pid: 42,
            round: 3,
            vaddr: 0x7f00_0000_0000,
            nr_pages: (raw.len() / PAGE_SIZE) as u64,
            compression: compression as i32,
            raw_len: raw.len() as u32,
            crc32: crc32fast::hash(raw),
            has_crc: true,
        }
    }

    /// Valid encodings of every message kind, as seeds to mutate.
    fn seeds() -> Vec<(FrameKind, Vec<u8>)> {
        let mut v = Vec::new();
        let hello = Hello {
            protocol_version: 1,
            tool_version: "0.1.0".into(),
            capabilities: vec!["zstd".into()],
            auth_proof: vec![7; 32],
        };
        v.push((FrameKind::Hello, hello.encode_to_vec()));
        let reply = HelloReply {
            accepted: true,
            reason: String::new(),
            auth_proof: vec![9; 32],
            protocol_version: 1,
            tool_version: "0.1.0".into(),
            capabilities: vec![],
        };
        v.push((FrameKind::HelloReply, reply.encode_to_vec()));
        for msg in [
            control::Msg::RoundEnd(RoundEnd {
                round: 2,
                pages: 10,
                bytes: 40960,
                batches: 1,
            }),
            control::Msg::FinalState(FinalState {
                inventory: vec![1, 2, 3],
                core: vec![4; 100],
                mm: vec![],
                files: vec![5],
                final_round: 4,
                resident: vec![0x1000, 0x3000],
                frozen_at_unix_us: 5,
                others: vec![crm_proto::migrate::TaskFinalState {
                    core: vec![6; 10],
                    resident: vec![0x2000, 0x4000],
                    ..Default::default()
                }],
                tree: vec![7, 8],
            }),
            control::Msg::Abort(Abort { reason: "x".into() }),
        ] {
            let c = Control { msg: Some(msg) };
            v.push((FrameKind::Control, c.encode_to_vec()));
        }
        let raw = vec![0xabu8; 2 * PAGE_SIZE];
        v.push((
            FrameKind::BatchHeader,
            valid_header(&raw, Compression::Zstd).encode_to_vec(),
        ));
        v
    }

    fn run_decoder(kind: FrameKind, payload: &[u8]) {
        let p = peer();
        match kind {
            FrameKind::Hello => drop(decode_hello(p, payload)),
            FrameKind::HelloReply => drop(decode_hello_reply(p, payload)),
            FrameKind::Control => drop(decode_control(p, payload)),
            FrameKind::BatchHeader => drop(decode_batch_header(p, payload)),
            FrameKind::BatchData | FrameKind::StreamMagic | FrameKind::SealedRecord => {}
        }
    }

    fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
        let mut b = seed.to_vec();
        match rng.below(4) {
            0 => {
                let n = rng.below(b.len() + 1);
                b.truncate(n);
            }
            1 => {
                for _ in 0..=rng.below(4) {
                    if !b.is_empty() {
                        let i = rng.below(b.len());
                        b[i] ^= 1 << rng.below(8);
                    }
                }
            }
            2 => {
                let i = rng.below(b.len() + 1);
                let n = rng.below(16);
                let extra = rng.bytes(n);
                b.splice(i..i, extra);
            }
            _ => {
                let n = rng.below(256);
                b = rng.bytes(n);
            }
        }
        b
    }

    /// Thousands of random, truncated and bit-flipped inputs to every
    /// decoder, under `catch_unwind`: any panic fails the test.
    #[test]
    fn fuzz_decoders_never_panic() {
        let mut rng = Rng(0x5eed_cafe);
        let seeds = seeds();
        let mut dec = batch_decompressor().unwrap();
        let mut errors = 0usize;
        for case in 0..20_000 {
            let (kind, seed) = &seeds[case % seeds.len()];
            let input = mutate(&mut rng, seed);
            let r = catch_unwind(AssertUnwindSafe(|| {
                for k in [
                    FrameKind::Hello,
                    FrameKind::HelloReply,
                    FrameKind::Control,
                    FrameKind::BatchHeader,
                ] {
                    run_decoder(k, &input);
                }
                // Framed form, with random caps.
                let mut framed = (input.len() as u32).to_le_bytes().to_vec();
                framed.extend_from_slice(&input);
                let cut = rng.below(framed.len() + 1);
                if let Err(_e) = split_frame(peer(), *kind, rng.next() % 512, &framed[..cut]) {
                    errors += 1;
                }
                // Random length prefixes, including huge ones.
                let _ = split_frame(peer(), *kind, kind.max_len(), &input);
            }));
            assert!(r.is_ok(), "decoder panicked on case {case}: {input:02x?}");
        }
        assert!(
            errors > 1000,
            "the fuzzer should hit many errors ({errors})"
        );

        // Page data against valid headers: random, truncated, corrupted zstd.
        let raw: Vec<u8> = (0..4 * PAGE_SIZE).map(|i| (i / 97) as u8).collect();
        let good_zstd = zstd::bulk::compress(&raw, 1).unwrap();
        for case in 0..5_000 {
            let (h, seed) = if case % 2 == 0 {
                (valid_header(&raw, Compression::Zstd), good_zstd.clone())
            } else {
                (valid_header(&raw, Compression::None), raw.clone())
            };
            let data = mutate(&mut rng, &seed);
            let unchanged = data == seed;
            let r = catch_unwind(AssertUnwindSafe(|| {
                decode_batch_data(peer(), &h, data.into(), &mut dec)
            }));
            match r {
                Ok(Ok(out)) => assert!(unchanged || out == raw, "case {case}: bad data accepted"),
                Ok(Err(_)) => assert!(!unchanged, "case {case}: good data refused"),
                Err(_) => panic!("decode_batch_data panicked on case {case}"),
            }
        }
    }

    /// The async stream readers over random and truncated byte streams.
    #[test]
    fn fuzz_stream_readers_never_panic() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut rng = Rng(7);
        // A valid page stream: magic + two batches.
        let raw = vec![0x5au8; 3 * PAGE_SIZE];
        let mut stream = PAGE_STREAM_MAGIC.to_vec();
        for c in [Compression::None, Compression::Zstd] {
            let h = valid_header(&raw, c);
            let data = if c == Compression::Zstd {
                zstd::bulk::compress(&raw, 1).unwrap()
            } else {
                raw.clone()
            };
            stream.extend_from_slice(&encode_batch_prefix(&h, data.len()));
            stream.extend_from_slice(&data);
        }
        let mut full_ok = 0;
        for case in 0..4_000 {
            let input = if case == 0 {
                stream.clone()
            } else {
                mutate(&mut rng, &stream)
            };
            let r = catch_unwind(AssertUnwindSafe(|| {
                rt.block_on(async {
                    let mut r: &[u8] = &input;
                    read_stream_magic(&mut r, peer()).await?;
                    let mut dec = batch_decompressor()?;
                    let mut n = 0;
                    while let Some((h, data)) = read_batch(&mut r, peer()).await? {
                        decode_batch_data(peer(), &h, data, &mut dec)?;
                        n += 1;
                    }
                    Ok::<_, TransportError>(n)
                })
            }));
            match r {
                Ok(Ok(2)) => full_ok += 1,
                Ok(_) => {}
                Err(_) => panic!("stream reader panicked on case {case}"),
            }
            // Control-stream reader on the same bytes.
            let r = catch_unwind(AssertUnwindSafe(|| {
                rt.block_on(async {
                    let mut r: &[u8] = &input;
                    while let Some(p) =
                        read_frame(&mut r, peer(), FrameKind::Control, MAX_CONTROL_LEN).await?
                    {
                        let _ = decode_control(peer(), &p);
                    }
                    Ok::<_, TransportError>(())
                })
            }));
            assert!(r.is_ok(), "control reader panicked on case {case}");
        }
        assert!(full_ok >= 1, "the unmutated stream must decode");
    }

    #[test]
    fn malformed_frames_give_typed_errors() {
        let p = peer();
        // Length over the cap: refused before allocation.
        let huge = u32::MAX.to_le_bytes();
        assert!(matches!(
            split_frame(p, FrameKind::Control, MAX_CONTROL_LEN, &huge),
            Err(TransportError::FrameTooLarge { len, max, .. }) if len == u64::from(u32::MAX) && max == MAX_CONTROL_LEN
        ));
        // Truncated payload.
        let mut f = 10u32.to_le_bytes().to_vec();
        f.extend_from_slice(&[1, 2, 3]);
        assert!(matches!(
            split_frame(p, FrameKind::Hello, MAX_HELLO_LEN, &f),
            Err(TransportError::Truncated {
                got: 3,
                want: 10,
                ..
            })
        ));
        // Undecodable protobuf.
        let e = decode_control(p, &[0xff, 0xff, 0xff]).unwrap_err();
        assert!(matches!(
            e,
            TransportError::Decode {
                kind: FrameKind::Control,
                ..
            }
        ));
        assert!(e.to_string().contains("192.0.2.7:4433"), "{e}");
        // Empty control.
        assert!(matches!(
            decode_control(p, &[]),
            Err(TransportError::Invalid { .. })
        ));
        // Header inconsistencies.
        let raw = vec![1u8; PAGE_SIZE];
        let mut h = valid_header(&raw, Compression::None);
        h.nr_pages = 2;
        let e = decode_batch_header(p, &h.encode_to_vec()).unwrap_err();
        assert!(e.to_string().contains("nr_pages 2"), "{e}");
        let mut h = valid_header(&raw, Compression::None);
        h.compression = 9;
        assert!(decode_batch_header(p, &h.encode_to_vec()).is_err());
        let mut h = valid_header(&raw, Compression::None);
        h.vaddr = u64::MAX - 4095;
        assert!(decode_batch_header(p, &h.encode_to_vec()).is_err());
        let mut h = valid_header(&raw, Compression::None);
        h.raw_len = (MAX_BATCH_BYTES + PAGE_SIZE) as u32;
        h.nr_pages = h.raw_len as u64 / PAGE_SIZE as u64;
        assert!(decode_batch_header(p, &h.encode_to_vec()).is_err());
        // CRC mismatch.
        let h = valid_header(&raw, Compression::None);
        let mut bad = raw.clone();
        bad[100] ^= 1;
        let mut dec = batch_decompressor().unwrap();
        let e = decode_batch_data(p, &h, bad.into(), &mut dec).unwrap_err();
        assert!(e.to_string().contains("CRC mismatch"), "{e}");
        // A zstd frame that expands beyond raw_len (a "bomb") is refused.
        let big = vec![0u8; 2 * PAGE_SIZE];
        let bomb = zstd::bulk::compress(&big, 1).unwrap();
        let h = valid_header(&raw, Compression::Zstd);
        assert!(matches!(
            decode_batch_data(p, &h, bomb.into(), &mut dec),
            Err(TransportError::BadBatch { .. })
        ));
        // Bad stream magic.
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let e = rt
            .block_on(async {
                let mut r: &[u8] = b"HTTP/1.1";
                read_stream_magic(&mut r, p).await
            })
            .unwrap_err();
        assert!(matches!(
            e,
            TransportError::Invalid {
                kind: FrameKind::StreamMagic,
                ..
            }
        ));
        // Too-large outgoing message is refused locally.
        let c = Control {
            msg: Some(control::Msg::FinalState(FinalState {
                core: vec![0; MAX_CONTROL_LEN as usize + 1],
                ..Default::default()
            })),
        };
        assert!(matches!(
            encode_message(p, FrameKind::Control, &c),
            Err(TransportError::InvalidSend { .. })
        ));
    }

    /// A `FrameReader::next` dropped mid-frame (as `select!` does when the
    /// other branch wins) loses nothing: the next call returns the whole
    /// frame, then the following one. Reading a frame with a plain
    /// `read_frame` here would desynchronize the stream.
    #[test]
    fn frame_reader_survives_cancellation_mid_frame() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            use tokio::io::AsyncWriteExt;
            let big = Control {
                msg: Some(control::Msg::FinalState(FinalState {
                    core: vec![0xa5; 300_000],
                    ..Default::default()
                })),
            };
            let small = Control {
                msg: Some(control::Msg::RoundEnd(RoundEnd {
                    round: 7,
                    ..Default::default()
                })),
            };
            let mut wire = encode_message(peer(), FrameKind::Control, &big).unwrap();
            wire.extend(encode_message(peer(), FrameKind::Control, &small).unwrap());
            let (mut tx, rx) = tokio::io::duplex(64 << 10);
            let mut reader = FrameReader::new(rx);
            // Feed the stream in pieces; after each piece, start a read and
            // cancel it as soon as it would block.
            let mut cancelled = 0;
            let mut got = Vec::new();
            for piece in wire.chunks(40_000) {
                tx.write_all(piece).await.unwrap();
                loop {
                    let r = tokio::time::timeout(
                        Duration::from_millis(5),
                        reader.next(peer(), FrameKind::Control, MAX_CONTROL_LEN),
                    )
                    .await;
                    match r {
                        Ok(frame) => {
                            got.push(decode_control(peer(), &frame.unwrap().unwrap()).unwrap())
                        }
                        Err(_) => {
                            cancelled += 1;
                            break;
                        }
                    }
                }
            }
            drop(tx);
            assert!(cancelled >= 8, "only {cancelled} reads were cancelled");
            assert_eq!(got, vec![big, small]);
            assert!(reader
                .next(peer(), FrameKind::Control, MAX_CONTROL_LEN)
                .await
                .unwrap()
                .is_none());
        });
    }

    #[test]
    fn batch_prefix_round_trips() {
        let raw = vec![3u8; 2 * PAGE_SIZE];
        let h = valid_header(&raw, Compression::None);
        let mut wire = encode_batch_prefix(&h, raw.len());
        wire.extend_from_slice(&raw);
        let (hp, rest) =
            split_frame(peer(), FrameKind::BatchHeader, MAX_BATCH_HEADER_LEN, &wire).unwrap();
        let h2 = decode_batch_header(peer(), hp).unwrap();
        assert_eq!(h, h2);
        let (data, rest) =
            split_frame(peer(), FrameKind::BatchData, batch_data_cap(&h2), rest).unwrap();
        assert!(rest.is_empty());
        let mut dec = batch_decompressor().unwrap();
        assert_eq!(
            decode_batch_data(peer(), &h2, data.to_vec().into(), &mut dec).unwrap(),
            raw
        );
        // The prefix alone, as a sealed channel carries it.
        let prefix = encode_batch_prefix(&h, raw.len());
        assert_eq!(
            decode_batch_prefix(peer(), &prefix).unwrap(),
            (h, raw.len())
        );
        // Cut anywhere, one byte too many, or announcing more data than
        // the header allows: typed errors.
        for cut in 0..prefix.len() {
            assert!(
                decode_batch_prefix(peer(), &prefix[..cut]).is_err(),
                "cut {cut}"
            );
        }
        let mut long = prefix.clone();
        long.push(0);
        assert!(decode_batch_prefix(peer(), &long).is_err());
        let over = encode_batch_prefix(&h, raw.len() + 1);
        assert!(matches!(
            decode_batch_prefix(peer(), &over),
            Err(TransportError::FrameTooLarge { .. })
        ));
        // Random bytes never panic.
        let mut rng = Rng(7);
        for _ in 0..5000 {
            let mut v = prefix.clone();
            for _ in 0..=rng.below(4) {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            v.truncate(rng.below(v.len() + 1).max(v.len() - 2));
            let _ = decode_batch_prefix(peer(), &v);
        }
    }
}
