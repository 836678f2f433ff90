//! Peer authentication: the shared-token proof bound to the TLS session, the
//! listener's self-signed identity stored in the state directory, and the
//! client's certificate check (signature always, fingerprint when pinned).
//!
//! Why the proof is bound to the TLS session: each side sends
//! `HMAC-SHA256(token, exporter || role)`, where `exporter` is 32 bytes of
//! TLS keying material (RFC 5705, label [`EXPORTER_LABEL`]) that differs for
//! every TLS session. A man in the middle who terminates TLS towards both
//! hosts sits in two sessions with two different exporters, so the proof it
//! relays from one side is wrong on the other, and it cannot compute a right
//! one without the token. The `role` suffix stops a server from reflecting
//! the client's own proof back at it.
use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hmac::{Hmac, Mac};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use super::error::{Result, TransportError};
use super::frame::PROOF_LEN;

/// TLS exporter label of the authentication proof.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-cr-migrate-auth";

/// How a session's peer is authenticated.
///
/// - `token`: a shared secret (read from a file by the caller, see
///   [`read_token_file`]); both sides prove they know it. Required by
///   [`listen`](super::listen): it is the only thing that tells the receiver
///   who the sender is.
/// - `pinned_fingerprint`: SHA-256 of the listener's certificate, as printed
///   by the listener; checked by [`connect`](super::connect) in the TLS
///   handshake. Rejected by `listen` (it says nothing about the client).
#[derive(Clone, Default)]
pub struct Auth {
    pub token: Option<Vec<u8>>,
    pub pinned_fingerprint: Option<[u8; 32]>,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field(
                "pinned_fingerprint",
                &self.pinned_fingerprint.as_ref().map(format_fingerprint),
            )
            .finish()
    }
}

/// Reads a token file: its content minus one trailing newline. An empty token
/// is refused.
pub fn read_token_file(path: &Path) -> Result<Vec<u8>> {
    let mut t = fs::read(path).map_err(|source| TransportError::StateFile {
        what: "reading token file",
        path: path.to_owned(),
        source,
    })?;
    if t.last() == Some(&b'\n') {
        t.pop();
        if t.last() == Some(&b'\r') {
            t.pop();
        }
    }
    if t.is_empty() {
        return Err(TransportError::EmptyToken);
    }
    Ok(t)
}

/// Which end of the connection computes a proof.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

impl Role {
    fn label(self) -> &'static [u8] {
        match self {
            Role::Client => b"client",
            Role::Server => b"server",
        }
    }
}

type HmacSha256 = Hmac<Sha256>;

fn mac(token: &[u8], exporter: &[u8; 32], role: Role) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(token).expect("HMAC accepts keys of any length");
    m.update(exporter);
    m.update(role.label());
    m
}

/// `HMAC-SHA256(token, exporter || role)`.
pub fn proof(token: &[u8], exporter: &[u8; 32], role: Role) -> [u8; PROOF_LEN] {
    mac(token, exporter, role).finalize().into_bytes().into()
}

/// Checks a peer's proof in constant time.
pub fn verify_proof(token: &[u8], exporter: &[u8; 32], role: Role, proof: &[u8]) -> bool {
    mac(token, exporter, role).verify_slice(proof).is_ok()
}

/// SHA-256 of a DER certificate.
pub fn fingerprint(cert_der: &[u8]) -> [u8; 32] {
    Sha256::digest(cert_der).into()
}

/// `AB:CD:...` (32 colon-separated hex pairs), the form users pin.
pub fn format_fingerprint(fp: &[u8; 32]) -> String {
    let hex: Vec<String> = fp.iter().map(|b| format!("{b:02X}")).collect();
    hex.join(":")
}

/// Parses 64 hex digits, with or without colons, any case.
pub fn parse_fingerprint(text: &str) -> Result<[u8; 32]> {
    let bad = || TransportError::BadFingerprint {
        text: text.to_owned(),
    };
    let digits: Vec<u8> = text.bytes().filter(|&b| b != b':').collect();
    if digits.len() != 64 {
        return Err(bad());
    }
    let mut fp = [0u8; 32];
    for (i, pair) in digits.chunks_exact(2).enumerate() {
        let s = std::str::from_utf8(pair).map_err(|_| bad())?;
        fp[i] = u8::from_str_radix(s, 16).map_err(|_| bad())?;
    }
    Ok(fp)
}

/// The listener's TLS identity.
pub struct Identity {
    pub cert: CertificateDer<'static>,
    pub key: PrivatePkcs8KeyDer<'static>,
    pub fingerprint: [u8; 32],
}

fn state_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TransportError {
    let path = path.to_owned();
    move |source| TransportError::StateFile { what, path, source }
}

/// Writes `data` to `path` atomically (temporary file + rename) with `mode`.
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let tmp: PathBuf = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(state_err("creating", &tmp))?;
    // `mode` only applies to new files; a leftover temporary keeps its own.
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(state_err("setting permissions of", &tmp))?;
    f.write_all(data).map_err(state_err("writing", &tmp))?;
    f.sync_all().map_err(state_err("syncing", &tmp))?;
    fs::rename(&tmp, path).map_err(state_err("renaming into place", path))?;
    Ok(())
}

/// Loads `cert.der` + `key.der` from `state_dir`, or generates a self-signed
/// pair on first use (the directory is created with mode 0700, the key file
/// with 0600). A key readable by group or others is refused.
pub fn load_or_create_identity(state_dir: &Path) -> Result<Identity> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .map_err(state_err("creating state directory", state_dir))?;
    let cert_path = state_dir.join("cert.der");
    let key_path = state_dir.join("key.der");
    if cert_path.exists() && key_path.exists() {
        let meta = fs::metadata(&key_path).map_err(state_err("reading", &key_path))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(TransportError::KeyPermissions {
                path: key_path,
                mode,
            });
        }
        let cert = fs::read(&cert_path).map_err(state_err("reading", &cert_path))?;
        let key = fs::read(&key_path).map_err(state_err("reading", &key_path))?;
        let fingerprint = fingerprint(&cert);
        return Ok(Identity {
            cert: CertificateDer::from(cert),
            key: PrivatePkcs8KeyDer::from(key),
            fingerprint,
        });
    }
    // First use (or half a pair left by an interrupted first use: its key
    // was never used, so replacing it loses nothing).
    let ck = rcgen::generate_simple_self_signed(vec!["cr-migrate".to_owned()]).map_err(|e| {
        TransportError::Tls {
            what: format!("generating a self-signed certificate: {e}"),
        }
    })?;
    let cert = ck.cert.der().to_vec();
    let key = ck.key_pair.serialize_der();
    write_file(&key_path, &key, 0o600)?;
    write_file(&cert_path, &cert, 0o644)?;
    let fingerprint = fingerprint(&cert);
    Ok(Identity {
        cert: CertificateDer::from(cert),
        key: PrivatePkcs8KeyDer::from(key),
        fingerprint,
    })
}

/// The client's view of the server certificate: no CA chain (the listener's
/// certificate is self-signed), but the handshake signature is always
/// verified against the presented certificate (so the server holds its key),
/// and the certificate's SHA-256 must equal the pinned fingerprint if one is
/// configured. The fingerprint seen is recorded for error messages and for
/// [`Session::server_fingerprint`](super::Session::server_fingerprint).
#[derive(Debug)]
pub struct ServerVerifier {
    pinned: Option<[u8; 32]>,
    provider: Arc<CryptoProvider>,
    seen: Mutex<Option<[u8; 32]>>,
}

impl ServerVerifier {
    pub fn new(pinned: Option<[u8; 32]>, provider: Arc<CryptoProvider>) -> Self {
        ServerVerifier {
            pinned,
            provider,
            seen: Mutex::new(None),
        }
    }

    /// Fingerprint of the certificate the server presented, if any.
    pub fn seen(&self) -> Option<[u8; 32]> {
        *self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn pinned(&self) -> Option<[u8; 32]> {
        self.pinned
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fp = fingerprint(end_entity);
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(fp);
        match self.pinned {
            Some(pinned) if pinned != fp => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_depend_on_token_session_and_role() {
        let e1 = [1u8; 32];
        let e2 = [2u8; 32];
        let p = proof(b"secret", &e1, Role::Client);
        assert!(verify_proof(b"secret", &e1, Role::Client, &p));
        assert!(!verify_proof(b"Secret", &e1, Role::Client, &p));
        assert!(
            !verify_proof(b"secret", &e2, Role::Client, &p),
            "other TLS session"
        );
        assert!(
            !verify_proof(b"secret", &e1, Role::Server, &p),
            "reflected proof"
        );
        assert!(!verify_proof(b"secret", &e1, Role::Client, &p[..31]));
        assert!(!verify_proof(b"secret", &e1, Role::Client, &[]));
    }

    #[test]
    fn fingerprints_round_trip() {
        let fp = fingerprint(b"cert");
        let s = format_fingerprint(&fp);
        assert_eq!(s.len(), 32 * 3 - 1);
        assert_eq!(parse_fingerprint(&s).unwrap(), fp);
        assert_eq!(
            parse_fingerprint(&s.replace(':', "").to_lowercase()).unwrap(),
            fp
        );
        assert!(parse_fingerprint("abc").is_err());
        assert!(parse_fingerprint(&"zz".repeat(32)).is_err());
        assert!(parse_fingerprint(&"é".repeat(32)).is_err());
    }

    #[test]
    fn identity_is_created_once_with_private_key_mode() {
        let dir = std::env::temp_dir().join(format!("crm-transport-id-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let a = load_or_create_identity(&dir).unwrap();
        let mode = fs::metadata(dir.join("key.der"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let b = load_or_create_identity(&dir).unwrap();
        assert_eq!(a.fingerprint, b.fingerprint, "reused, not regenerated");
        fs::set_permissions(dir.join("key.der"), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load_or_create_identity(&dir),
            Err(TransportError::KeyPermissions { .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn token_file_trailing_newline_is_stripped() {
        let p = std::env::temp_dir().join(format!("crm-token-{}", std::process::id()));
        fs::write(&p, b"hunter2\n").unwrap();
        assert_eq!(read_token_file(&p).unwrap(), b"hunter2");
        fs::write(&p, b"\n").unwrap();
        assert!(matches!(
            read_token_file(&p),
            Err(TransportError::EmptyToken)
        ));
        fs::remove_file(&p).unwrap();
        let dbg = format!(
            "{:?}",
            Auth {
                token: Some(b"hunter2".to_vec()),
                pinned_fingerprint: None
            }
        );
        assert!(!dbg.contains("hunter2"), "{dbg}");
    }
}
