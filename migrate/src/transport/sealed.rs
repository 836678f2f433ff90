//! Sealed records: how a TCP page channel between two hosts keeps page data
//! secret and unforgeable.
//!
//! Every channel has its own AES-256-GCM key, derived from the session's
//! channel secret (exported from the QUIC TLS session) and the nonce the
//! receiver picked for this connection ([`super::tcp_channel`]), so records
//! of one channel or connection cannot be replayed into another. On the
//! wire a record is `len: u32 LE` followed by `len` bytes of ciphertext and
//! 16-byte tag; `len` is bounded ([`MAX_RECORD`]) before anything is
//! allocated and authenticated as associated data. The GCM nonce is the
//! record's sequence number, so records cannot be dropped, reordered or
//! repeated without the next one failing to open. The sender ends the
//! channel with an empty record: a stream that ends without one was cut
//! short, and is an error, not a clean end.
use std::net::SocketAddr;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::error::{Result, TransportError};
use super::frame::{read_all, FrameKind, MAX_BATCH_BYTES};
use crm_page_server::PageBuf;

/// Bytes of a GCM tag.
pub const TAG_LEN: usize = 16;
/// Largest record (ciphertext and tag) accepted: a full batch (compressed
/// data may exceed the raw size by zstd's bound) plus room for its frames.
pub const MAX_RECORD: usize = MAX_BATCH_BYTES + (MAX_BATCH_BYTES >> 7) + 4096 + TAG_LEN;

fn key(bytes: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).expect("32 bytes is an AES-256 key"))
}

fn nonce(seq: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&seq.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// The sending half: seals records in sequence.
pub struct Sealer {
    // No Debug: it holds a key.
    key: LessSafeKey,
    seq: u64,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    pub fn new(key_bytes: &[u8; 32]) -> Sealer {
        Sealer {
            key: key(key_bytes),
            seq: 0,
        }
    }

    /// Encrypts `data` in place and returns the record's length prefix and
    /// tag: the record on the wire is `prefix ‖ data ‖ tag`.
    pub fn seal(&mut self, data: &mut [u8]) -> ([u8; 4], [u8; TAG_LEN]) {
        let len = u32::try_from(data.len() + TAG_LEN).expect("records are far below 4 GiB");
        let prefix = len.to_le_bytes();
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(self.seq), Aad::from(prefix), data)
            .expect("sealing fails only past 2^36 bytes per record");
        self.seq += 1;
        let mut t = [0u8; TAG_LEN];
        t.copy_from_slice(tag.as_ref());
        (prefix, t)
    }

    /// Seals `data` and writes the record.
    pub async fn write<W: AsyncWrite + Unpin>(
        &mut self,
        w: &mut W,
        data: &mut [u8],
    ) -> std::io::Result<()> {
        let (prefix, tag) = self.seal(data);
        write_parts(w, &[&prefix, data, &tag]).await
    }

    /// Writes the empty record that marks the end of the channel.
    pub async fn write_end<W: AsyncWrite + Unpin>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.write(w, &mut []).await
    }
}

/// Writes all of `parts` in order, vectored where the writer allows.
pub(super) async fn write_parts<W: AsyncWrite + Unpin>(
    w: &mut W,
    parts: &[&[u8]],
) -> std::io::Result<()> {
    use std::io::IoSlice;
    let mut parts: Vec<&[u8]> = parts.iter().copied().filter(|p| !p.is_empty()).collect();
    while !parts.is_empty() {
        let slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        let mut n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            if n >= parts[0].len() {
                n -= parts[0].len();
                parts.remove(0);
            } else {
                parts[0] = &parts[0][n..];
                n = 0;
            }
        }
    }
    Ok(())
}

/// The receiving half: opens records in sequence.
pub struct Opener {
    key: LessSafeKey,
    seq: u64,
}

impl Opener {
    pub fn new(key_bytes: &[u8; 32]) -> Opener {
        Opener {
            key: key(key_bytes),
            seq: 0,
        }
    }

    /// Reads and opens the next record: `Ok(Some(plaintext))`, or
    /// `Ok(None)` for the end record (after which the stream must end).
    /// A stream that ends without the end record, an oversized length and
    /// a record that fails authentication are typed errors.
    pub async fn read<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
        peer: SocketAddr,
    ) -> Result<Option<Vec<u8>>> {
        let opened = self.read_into(r, peer, |len| vec![0u8; len]).await?;
        Ok(opened.map(|(mut buf, len)| {
            buf.truncate(len);
            buf
        }))
    }

    /// [`Opener::read`] into a [`PageBuf`] (page data: memory the page
    /// store adopts as is).
    pub async fn read_pages<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
        peer: SocketAddr,
    ) -> Result<Option<PageBuf>> {
        let opened = self.read_into(r, peer, PageBuf::zeroed).await?;
        Ok(opened.map(|(mut buf, len)| {
            buf.truncate(len);
            buf
        }))
    }

    /// Reads the next record into `make(record length)` and opens it in
    /// place: the buffer and the length of the plaintext at its start.
    async fn read_into<R: AsyncRead + Unpin, B: AsMut<[u8]>>(
        &mut self,
        r: &mut R,
        peer: SocketAddr,
        make: impl FnOnce(usize) -> B,
    ) -> Result<Option<(B, usize)>> {
        let kind = FrameKind::SealedRecord;
        let mut prefix = [0u8; 4];
        read_all(r, peer, kind, &mut prefix).await?;
        let len = u32::from_le_bytes(prefix) as usize;
        if len > MAX_RECORD {
            return Err(TransportError::FrameTooLarge {
                peer,
                kind,
                len: len as u64,
                max: MAX_RECORD as u64,
            });
        }
        if len < TAG_LEN {
            return Err(TransportError::Invalid {
                peer,
                kind,
                what: format!("record of {len} bytes is shorter than its tag"),
            });
        }
        let mut buf = make(len);
        read_all(r, peer, kind, buf.as_mut()).await?;
        let plain_len = self
            .key
            .open_in_place(nonce(self.seq), Aad::from(prefix), buf.as_mut())
            .map_err(|_| TransportError::Invalid {
                peer,
                kind,
                what: format!(
                    "record {} failed authentication (tampered, replayed or out of order)",
                    self.seq
                ),
            })?
            .len();
        self.seq += 1;
        if plain_len == 0 {
            return Ok(None);
        }
        Ok(Some((buf, plain_len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> SocketAddr {
        "192.0.2.1:7070".parse().unwrap()
    }

    async fn sealed_stream(records: &[&[u8]], end: bool) -> Vec<u8> {
        let mut s = Sealer::new(&[3; 32]);
        let mut out = Vec::new();
        for r in records {
            let mut d = r.to_vec();
            s.write(&mut out, &mut d).await.unwrap();
        }
        if end {
            s.write_end(&mut out).await.unwrap();
        }
        out
    }

    #[tokio::test]
    async fn records_round_trip_and_end() {
        let wire = sealed_stream(&[b"hello", &[7u8; 100_000]], true).await;
        let mut o = Opener::new(&[3; 32]);
        let mut r = &wire[..];
        assert_eq!(o.read(&mut r, peer()).await.unwrap().unwrap(), b"hello");
        assert_eq!(
            o.read(&mut r, peer()).await.unwrap().unwrap(),
            vec![7u8; 100_000]
        );
        assert!(o.read(&mut r, peer()).await.unwrap().is_none());
        assert!(r.is_empty());
    }

    #[tokio::test]
    async fn tampering_truncation_and_wrong_keys_are_errors() {
        let wire = sealed_stream(&[b"one", b"two"], true).await;
        // A flipped bit anywhere in the first record.
        for i in 4..wire.len().min(4 + 3 + TAG_LEN) {
            let mut w = wire.clone();
            w[i] ^= 1;
            let e = Opener::new(&[3; 32]).read(&mut &w[..], peer()).await;
            assert!(
                matches!(e, Err(TransportError::Invalid { .. })),
                "byte {i}: {e:?}"
            );
        }
        // Another key (another channel or session).
        let e = Opener::new(&[4; 32]).read(&mut &wire[..], peer()).await;
        assert!(matches!(e, Err(TransportError::Invalid { .. })));
        // Records out of order: the second record first.
        let first_len = 4 + 3 + TAG_LEN;
        let e = Opener::new(&[3; 32])
            .read(&mut &wire[first_len..], peer())
            .await;
        assert!(matches!(e, Err(TransportError::Invalid { .. })), "{e:?}");
        // Cut inside a record, and cut before the end record.
        let mut o = Opener::new(&[3; 32]);
        let cut = &wire[..first_len + 5];
        let mut r = cut;
        assert!(o.read(&mut r, peer()).await.unwrap().is_some());
        assert!(matches!(
            o.read(&mut r, peer()).await,
            Err(TransportError::Truncated { .. })
        ));
        let no_end = sealed_stream(&[b"one"], false).await;
        let mut o = Opener::new(&[3; 32]);
        let mut r = &no_end[..];
        assert!(o.read(&mut r, peer()).await.unwrap().is_some());
        assert!(matches!(
            o.read(&mut r, peer()).await,
            Err(TransportError::Truncated { got: 0, .. })
        ));
        // An absurd length is refused before allocating.
        let mut huge = u32::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(&[0; 32]);
        assert!(matches!(
            Opener::new(&[3; 32]).read(&mut &huge[..], peer()).await,
            Err(TransportError::FrameTooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn random_bytes_never_panic() {
        let mut x: u64 = 0x1234_5678;
        for _ in 0..2000 {
            let len = (x % 64) as usize;
            let mut v = Vec::with_capacity(len);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                v.push(x as u8);
            }
            // Keep lengths small so the fuzzer exercises the checks.
            if v.len() >= 4 {
                v[2] = 0;
                v[3] = 0;
            }
            let _ = Opener::new(&[1; 32]).read(&mut &v[..], peer()).await;
        }
    }
}
