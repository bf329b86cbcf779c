//! TLS: the rustls client configuration built from the three PEM files, and
//! a non-blocking TLS stream over a mio `TcpStream`.
//!
//! rustls 0.23 allocates one buffer for every record it encrypts (and, on
//! the way in, one copy of every application-data record's plaintext),
//! with its buffered and its unbuffered API alike. So the stream gathers
//! what `send` is given and seals it into a record only when it is flushed
//! (or a record's worth has gathered): a burst of MQTT packets costs one
//! allocation, one AEAD pass and one record header instead of one each.
//!
//! [iotcored-param-rootca-1] the root CA verifies the endpoint (host name via
//! SNI, or an IP literal against IP SANs); [iotcored-param-cert-1] and
//! [iotcored-param-key-1] authenticate us. PEM is read with
//! `rustls::pki_types::pem`, so PKCS#8, PKCS#1 (`RSA PRIVATE KEY`) and SEC1
//! (`EC PRIVATE KEY`) keys, chains, and files without a final newline load.

use std::fmt;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mio::net::TcpStream;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{AlertDescription, ClientConfig, ClientConnection, RootCertStore};

use crate::config::Key;

/// ALPN protocol AWS IoT Core requires for MQTT over port 443.
pub const ALPN_AWS_MQTT_443: &[u8] = b"x-amzn-mqtt-ca";

/// Bytes the stream holds for sending before `send` refuses more: keeps a
/// broker that stops reading from growing our memory. Of it, `SEND_GATHER`
/// is plaintext not yet sealed, the rest TLS records in rustls.
pub const SEND_BUFFER_LIMIT: usize = 64 * 1024;

/// Plaintext gathered before it is sealed into a record: TLS's largest
/// record (2^14 bytes, RFC 8446 section 5.1), so a full gather is one
/// record and rustls never splits one.
pub const SEND_GATHER: usize = 16 * 1024;

/// A start-up error about one of the PEM files; names the file.
#[derive(Debug)]
pub struct FileError {
    /// The file concerned.
    pub path: PathBuf,
    /// What is wrong with it.
    pub what: String,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.what)
    }
}

fn file_error(path: &Path, what: impl Into<String>) -> FileError {
    FileError {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

fn pem_error(path: &Path, e: pem::Error, kind: &str) -> FileError {
    match e {
        pem::Error::Io(io) => file_error(path, format!("cannot read: {io}")),
        pem::Error::NoItemsFound => file_error(path, format!("no {kind} found (not a PEM file?)")),
        other => file_error(path, format!("not a valid PEM file: {other:?}")),
    }
}

/// Reads every certificate of a PEM file; an empty result is an error.
fn read_certs(path: &Path, kind: &str) -> Result<Vec<CertificateDer<'static>>, FileError> {
    // Check readability first so that a missing file says so plainly.
    std::fs::File::open(path).map_err(|e| file_error(path, format!("cannot open: {e}")))?;
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, e, kind))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e, kind))?;
    if certs.is_empty() {
        return Err(file_error(
            path,
            format!("no {kind} found (not a PEM file?)"),
        ));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, FileError> {
    std::fs::File::open(path).map_err(|e| file_error(path, format!("cannot open: {e}")))?;
    PrivateKeyDer::from_pem_file(path).map_err(|e| pem_error(path, e, "private key"))
}

/// A start-up error of the TLS material: a file, or the key on a token.
#[derive(Debug)]
pub enum SetupError {
    /// One of the PEM files.
    File(FileError),
    /// The PKCS#11 key: the URI (PIN hidden) and what is wrong.
    Token {
        /// The URI, as `Key`'s `Display` shows it.
        uri: String,
        /// What is wrong.
        what: String,
    },
}

impl fmt::Display for SetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SetupError::File(e) => e.fmt(f),
            SetupError::Token { uri, what } => write!(f, "key {uri}: {what}"),
        }
    }
}

impl From<FileError> for SetupError {
    fn from(e: FileError) -> Self {
        SetupError::File(e)
    }
}

/// Builds the client configuration from the root CA and certificate files
/// and the key (a PEM file or a key on a token), checking that each loads
/// and that the key matches the certificate.
pub fn client_config(
    rootca: &Path,
    cert: &Path,
    key: &Key,
    port: u16,
) -> Result<Arc<ClientConfig>, SetupError> {
    let mut roots = RootCertStore::empty();
    for ca in read_certs(rootca, "CA certificate")? {
        roots
            .add(ca)
            .map_err(|e| file_error(rootca, format!("unusable CA certificate: {e}")))?;
    }
    let chain = read_certs(cert, "certificate")?;

    let provider = Arc::new(provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| file_error(cert, format!("TLS setup failed: {e}")))?
        .with_root_certificates(roots);
    let mut config = match key {
        Key::File(key) => {
            let key_der = read_key(key)?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| match e {
                    rustls::Error::InconsistentKeys(_) => file_error(
                        key,
                        format!("does not match the certificate in {}", cert.display()),
                    ),
                    rustls::Error::General(msg) => {
                        file_error(key, format!("unusable private key: {msg}"))
                    }
                    other => file_error(cert, format!("unusable certificate: {other}")),
                })?
        }
        Key::Pkcs11(uri) => {
            let token_error = |what: String| SetupError::Token {
                uri: uri.to_string(),
                what,
            };
            builder.with_client_cert_resolver(token_key(uri, chain, cert).map_err(token_error)?)
        }
    };
    config.alpn_protocols = alpn_for_port(port)
        .map(|p| vec![p.to_vec()])
        .unwrap_or_default();
    Ok(Arc::new(config))
}

/// The resolver that hands rustls the certificate and the key on the
/// token, once the key is found and checked against the certificate.
#[cfg(feature = "pkcs11")]
fn token_key(
    uri: &crate::pkcs11::Uri,
    chain: Vec<CertificateDer<'static>>,
    cert: &Path,
) -> Result<Arc<dyn rustls::client::ResolvesClientCert>, String> {
    use crate::pkcs11::TokenError;
    let key = crate::pkcs11::open(uri, &chain[0]).map_err(|e| match e {
        TokenError::Mismatch => format!("does not match the certificate in {}", cert.display()),
        TokenError::Other(what) | TokenError::Pin(what) => what,
    })?;
    Ok(Arc::new(TokenCert(Arc::new(
        rustls::sign::CertifiedKey::new(chain, Arc::new(key)),
    ))))
}

/// Without the `pkcs11` feature a URI cannot be used.
#[cfg(not(feature = "pkcs11"))]
fn token_key(
    _uri: &crate::pkcs11::Uri,
    _chain: Vec<CertificateDer<'static>>,
    _cert: &Path,
) -> Result<Arc<dyn rustls::client::ResolvesClientCert>, String> {
    Err(
        "this iotcored was built without PKCS#11 support (cargo feature pkcs11): \
         give a PEM key file"
            .into(),
    )
}

/// Always the one certificate and token key: what rustls's own resolver
/// does for a key it loaded itself.
#[cfg(feature = "pkcs11")]
#[derive(Debug)]
struct TokenCert(Arc<rustls::sign::CertifiedKey>);

#[cfg(feature = "pkcs11")]
impl rustls::client::ResolvesClientCert for TokenCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// ring's TLS provider with the AES-GCM cipher suites only: what AWS IoT
/// Core's security policies and mosquitto choose, and what the gateways'
/// CPUs accelerate (AES-NI, the ARMv8 crypto extensions, NEON on armv7).
/// Without ChaCha20-Poly1305 its ~45 KiB of code stays out of the binary,
/// which is why the provider is assembled here rather than taken whole
/// from `rustls::crypto::ring::default_provider` (that one names every
/// suite, so the linker keeps them all).
fn provider() -> rustls::crypto::CryptoProvider {
    use rustls::crypto::ring::{cipher_suite as suite, kx_group};
    rustls::crypto::CryptoProvider {
        cipher_suites: vec![
            suite::TLS13_AES_256_GCM_SHA384,
            suite::TLS13_AES_128_GCM_SHA256,
            suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        ],
        kx_groups: vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1],
        signature_verification_algorithms: VERIFY,
        secure_random: &OsRandom,
        key_provider: &KeyLoader,
    }
}

/// What the broker's certificate chain and handshake signature may use
/// (ring's provider verifies the same): ECDSA on P-256 and P-384 (Amazon
/// Root CA 3), RSA of 2048 to 8192 bits with PKCS #1 v1.5 or PSS (Amazon
/// Root CA 1), Ed25519.
static VERIFY: rustls::crypto::WebPkiSupportedAlgorithms = {
    use rustls::SignatureScheme as Scheme;
    use webpki::ring as alg;
    rustls::crypto::WebPkiSupportedAlgorithms {
        all: &[
            alg::ECDSA_P256_SHA256,
            alg::ECDSA_P256_SHA384,
            alg::ECDSA_P384_SHA256,
            alg::ECDSA_P384_SHA384,
            alg::ED25519,
            alg::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
            alg::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
            alg::RSA_PSS_2048_8192_SHA512_LEGACY_KEY,
            alg::RSA_PKCS1_2048_8192_SHA256,
            alg::RSA_PKCS1_2048_8192_SHA384,
            alg::RSA_PKCS1_2048_8192_SHA512,
            alg::RSA_PKCS1_2048_8192_SHA256_ABSENT_PARAMS,
            alg::RSA_PKCS1_2048_8192_SHA384_ABSENT_PARAMS,
            alg::RSA_PKCS1_2048_8192_SHA512_ABSENT_PARAMS,
        ],
        mapping: &[
            (
                Scheme::ECDSA_NISTP384_SHA384,
                &[alg::ECDSA_P384_SHA384, alg::ECDSA_P256_SHA384],
            ),
            (
                Scheme::ECDSA_NISTP256_SHA256,
                &[alg::ECDSA_P256_SHA256, alg::ECDSA_P384_SHA256],
            ),
            (Scheme::ED25519, &[alg::ED25519]),
            (
                Scheme::RSA_PSS_SHA512,
                &[alg::RSA_PSS_2048_8192_SHA512_LEGACY_KEY],
            ),
            (
                Scheme::RSA_PSS_SHA384,
                &[alg::RSA_PSS_2048_8192_SHA384_LEGACY_KEY],
            ),
            (
                Scheme::RSA_PSS_SHA256,
                &[alg::RSA_PSS_2048_8192_SHA256_LEGACY_KEY],
            ),
            (Scheme::RSA_PKCS1_SHA512, &[alg::RSA_PKCS1_2048_8192_SHA512]),
            (Scheme::RSA_PKCS1_SHA384, &[alg::RSA_PKCS1_2048_8192_SHA384]),
            (Scheme::RSA_PKCS1_SHA256, &[alg::RSA_PKCS1_2048_8192_SHA256]),
        ],
    }
};

/// Randomness for TLS from the kernel (`getrandom(2)`).
#[derive(Debug)]
struct OsRandom;

impl rustls::crypto::SecureRandom for OsRandom {
    fn fill(&self, buf: &mut [u8]) -> Result<(), rustls::crypto::GetRandomFailed> {
        crate::sys::fill_random(buf).map_err(|_| rustls::crypto::GetRandomFailed)
    }
}

/// Loads the client's private key, RSA or ECDSA (P-256, P-384), wiping its
/// DER afterwards. Not Ed25519, which ring's provider would also take: AWS
/// IoT Core accepts device certificates with RSA and ECDSA keys only, and
/// leaving Ed25519 signing out keeps 6 KiB out of the binary.
#[derive(Debug)]
struct KeyLoader;

impl rustls::crypto::KeyProvider for KeyLoader {
    fn load_private_key(
        &self,
        key_der: rustls::pki_types::PrivateKeyDer<'static>,
    ) -> Result<Arc<dyn rustls::sign::SigningKey>, rustls::Error> {
        use rustls::crypto::ring::sign::{any_ecdsa_type, RsaSigningKey};
        let der = zeroize::Zeroizing::new(key_der);
        if let Ok(rsa) = RsaSigningKey::new(&der) {
            return Ok(Arc::new(rsa));
        }
        any_ecdsa_type(&der).map_err(|_| {
            rustls::Error::General(
                "not an RSA or ECDSA (P-256, P-384) key, the kinds AWS IoT Core accepts".into(),
            )
        })
    }
}

/// The ALPN protocol to offer: AWS IoT Core serves MQTT on 443 only to a
/// handshake that asks for `x-amzn-mqtt-ca`.
pub fn alpn_for_port(port: u16) -> Option<&'static [u8]> {
    (port == 443).then_some(ALPN_AWS_MQTT_443)
}

/// The name to verify the server against: a DNS name (sent as SNI) or an IP
/// address (checked against IP SANs; no SNI is sent for it).
pub fn server_name(endpoint: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(endpoint.to_owned())
        .map_err(|_| format!("{endpoint:?} is not a valid host name or IP address"))
}

/// How a TLS-level failure is to be treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsFailure {
    /// The broker rejected our certificate [iotcored-3]: fatal.
    AuthRejected,
    /// The broker's certificate failed our verification: fatal.
    ServerUntrusted,
    /// Anything else: retry with backoff.
    Transient,
}

/// Classifies a rustls error.
pub fn classify(e: &rustls::Error) -> TlsFailure {
    use AlertDescription as A;
    match e {
        rustls::Error::AlertReceived(
            A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::AccessDenied
            | A::CertificateRequired
            | A::NoCertificate,
        ) => TlsFailure::AuthRejected,
        rustls::Error::InvalidCertificate(_) => TlsFailure::ServerUntrusted,
        _ => TlsFailure::Transient,
    }
}

/// What went wrong on a TLS stream.
#[derive(Debug)]
pub enum StreamError {
    /// The socket failed.
    Io(io::Error),
    /// TLS failed (bad record, alert, verification, ...).
    Tls(rustls::Error),
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamError::Io(e) => write!(f, "{e}"),
            StreamError::Tls(rustls::Error::AlertReceived(alert)) => {
                write!(f, "TLS alert from the broker: {alert:?}")
            }
            StreamError::Tls(e) => write!(f, "TLS: {e}"),
        }
    }
}

/// The result of draining readable data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Received {
    /// Plaintext bytes written into the caller's buffer.
    pub len: usize,
    /// The peer closed (cleanly or not); no more data will come.
    pub eof: bool,
    /// The caller's buffer filled up before the socket ran dry: call again
    /// once there is room (with edge-triggered readiness no event will come).
    pub more: bool,
}

/// Whether close_notify was asked for and queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CloseNotify {
    /// Not asked for: `send` takes data.
    No,
    /// Asked for: queued once the gathered plaintext is sealed before it.
    Asked,
    /// Queued in rustls.
    Queued,
}

/// A non-blocking TLS client stream.
pub struct TlsStream {
    sock: TcpStream,
    conn: ClientConnection,
    peer_closed: bool,
    /// Plaintext `send` took and not yet sealed. Its capacity is
    /// `SEND_GATHER`, allocated with the stream (once per connection
    /// attempt) and never exceeded, so it never grows; left unzeroed, its
    /// pages are touched only as they are used (idle: one).
    gather: Vec<u8>,
    close_notify: CloseNotify,
}

impl TlsStream {
    /// Starts a handshake over a connected (or connecting) socket.
    pub fn new(
        sock: TcpStream,
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> Result<Self, rustls::Error> {
        let mut conn = ClientConnection::new(config, name)?;
        conn.set_buffer_limit(Some(SEND_BUFFER_LIMIT - SEND_GATHER));
        Ok(Self {
            sock,
            conn,
            peer_closed: false,
            gather: Vec::with_capacity(SEND_GATHER),
            close_notify: CloseNotify::No,
        })
    }

    /// The socket, for (re)registering with the poll.
    pub fn socket(&mut self) -> &mut TcpStream {
        &mut self.sock
    }

    /// Whether the handshake is still going on.
    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// Whether data is waiting to be written to the socket: gathered
    /// plaintext, close_notify still to queue, or TLS records.
    pub fn wants_write(&self) -> bool {
        !self.gather.is_empty()
            || self.close_notify == CloseNotify::Asked
            || self.conn.wants_write()
    }

    /// The negotiated protocol version, for the log.
    pub fn version(&self) -> Option<rustls::ProtocolVersion> {
        self.conn.protocol_version()
    }

    /// Reads from the socket until it would block (or `out` is full),
    /// decrypting into `out`.
    pub fn recv(&mut self, out: &mut [u8]) -> Result<Received, StreamError> {
        let mut got = Received::default();
        if out.is_empty() {
            // No room: reading more would only fill rustls's plaintext
            // buffer until it refuses. The caller makes room first.
            got.more = true;
            return Ok(got);
        }
        loop {
            // Drain decrypted data first: rustls refuses to read more while
            // its plaintext buffer is full.
            while got.len < out.len() {
                match self.conn.reader().read(&mut out[got.len..]) {
                    Ok(0) => {
                        got.eof = true;
                        return Ok(got);
                    }
                    Ok(n) => got.len += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        got.eof = true;
                        return Ok(got);
                    }
                    Err(e) => return Err(StreamError::Io(e)),
                }
            }
            if got.len == out.len() && !out.is_empty() {
                got.more = true;
                return Ok(got);
            }
            if self.peer_closed {
                got.eof = true;
                return Ok(got);
            }
            match self.conn.read_tls(&mut self.sock) {
                Ok(0) => self.peer_closed = true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(got),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // A reset can race a TLS alert that is already in our
                    // buffer: let rustls look at what it has before failing.
                    self.conn.process_new_packets().map_err(StreamError::Tls)?;
                    return Err(StreamError::Io(e));
                }
            }
            self.conn.process_new_packets().map_err(StreamError::Tls)?;
        }
    }

    /// Offers plaintext for sending; returns how much the stream took (less
    /// when it holds `SEND_BUFFER_LIMIT` bytes, none after `close_notify`).
    /// The data leaves on the next `flush`.
    pub fn send(&mut self, data: &[u8]) -> usize {
        if self.close_notify != CloseNotify::No {
            return 0;
        }
        let mut took = 0;
        while took < data.len() {
            if self.gather.len() == SEND_GATHER {
                self.seal();
                if self.gather.len() == SEND_GATHER {
                    break;
                }
            }
            let n = (SEND_GATHER - self.gather.len()).min(data.len() - took);
            self.gather.extend_from_slice(&data[took..took + n]);
            took += n;
        }
        took
    }

    /// Hands the gathered plaintext to rustls, which encrypts it as one
    /// record (after the handshake: until then it stays here), then queues
    /// close_notify if it was asked for and nothing is left before it.
    /// Returns whether the gather is empty (rustls takes less when it holds
    /// its share of `SEND_BUFFER_LIMIT`).
    fn seal(&mut self) -> bool {
        if !self.gather.is_empty() && !self.conn.is_handshaking() {
            let n = self.conn.writer().write(&self.gather).unwrap_or(0);
            self.gather.drain(..n.min(self.gather.len()));
        }
        if self.gather.is_empty() && self.close_notify == CloseNotify::Asked {
            self.conn.send_close_notify();
            self.close_notify = CloseNotify::Queued;
        }
        self.gather.is_empty()
    }

    /// Seals what was gathered and writes TLS data to the socket until it
    /// would block or nothing is left.
    pub fn flush(&mut self) -> Result<(), StreamError> {
        loop {
            let sealed = self.seal();
            let mut wrote = false;
            while self.conn.wants_write() {
                match self.conn.write_tls(&mut self.sock) {
                    Ok(_) => wrote = true,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(StreamError::Io(e)),
                }
            }
            // rustls was full and the socket took all of it: seal the rest
            // now, as no writable edge will come. (While the handshake is
            // on, the gather waits for it.)
            if sealed || !wrote {
                return Ok(());
            }
        }
    }

    /// Asks for a TLS close_notify alert, after everything `send` took;
    /// `flush` sends it.
    pub fn close_notify(&mut self) {
        if self.close_notify == CloseNotify::No {
            self.close_notify = CloseNotify::Asked;
        }
        self.seal();
    }

    /// Shuts the socket down in both directions (best effort).
    pub fn shutdown(&mut self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_rejections_are_auth_failures_but_other_alerts_are_not() {
        for alert in [
            AlertDescription::UnknownCA,
            AlertDescription::BadCertificate,
            AlertDescription::CertificateExpired,
            AlertDescription::CertificateRevoked,
            AlertDescription::CertificateRequired,
            AlertDescription::AccessDenied,
        ] {
            let e = rustls::Error::AlertReceived(alert);
            assert_eq!(classify(&e), TlsFailure::AuthRejected, "{alert:?}");
        }
        for alert in [
            AlertDescription::HandshakeFailure,
            AlertDescription::InternalError,
            AlertDescription::DecodeError,
        ] {
            let e = rustls::Error::AlertReceived(alert);
            assert_eq!(classify(&e), TlsFailure::Transient, "{alert:?}");
        }
    }

    #[test]
    fn a_server_certificate_we_reject_is_its_own_failure() {
        let e = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        assert_eq!(classify(&e), TlsFailure::ServerUntrusted);
    }

    #[test]
    fn alpn_is_offered_on_port_443_only() {
        assert_eq!(alpn_for_port(443), Some(&b"x-amzn-mqtt-ca"[..]));
        assert_eq!(alpn_for_port(8883), None);
    }

    #[test]
    fn ip_literals_and_host_names_are_valid_server_names() {
        assert!(matches!(
            server_name("127.0.0.1"),
            Ok(ServerName::IpAddress(_))
        ));
        assert!(matches!(server_name("::1"), Ok(ServerName::IpAddress(_))));
        assert!(matches!(
            server_name("abc-ats.iot.eu-west-1.amazonaws.com"),
            Ok(ServerName::DnsName(_))
        ));
        assert!(server_name("bad host").is_err());
    }

    /// A TLS server in the test's own thread over loopback TCP, facing a
    /// `TlsStream`: the test decides how the server's bytes are cut into
    /// reads, and sees the client's records raw.
    mod peer {
        use super::super::*;
        use rustls::server::WebPkiClientVerifier;
        use rustls::{ServerConfig, ServerConnection};
        use std::io::{Read, Write};
        use std::net::{TcpListener, TcpStream as StdStream};
        use std::path::PathBuf;
        use std::sync::OnceLock;
        use std::time::{Duration, Instant};

        /// The throw-away PKI of `config/dev/gen-pki.sh`, made once per
        /// build directory (not in a /tmp shared with other checkouts).
        fn pki() -> &'static Path {
            static DIR: OnceLock<PathBuf> = OnceLock::new();
            DIR.get_or_init(|| {
                let dir = Path::new(env!("OUT_DIR")).join("tls-unit-pki");
                let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/dev/gen-pki.sh");
                let ok = std::process::Command::new("bash")
                    .arg(script)
                    .arg(&dir)
                    .stdout(std::process::Stdio::null())
                    .status()
                    .map(|s| s.success());
                assert!(matches!(ok, Ok(true)), "gen-pki.sh failed");
                dir
            })
        }

        fn server_config(
            versions: &[&'static rustls::SupportedProtocolVersion],
        ) -> Arc<ServerConfig> {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(pki().join("ca.pem")).unwrap() {
                roots.add(cert.unwrap()).unwrap();
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .unwrap();
            let certs = CertificateDer::pem_file_iter(pki().join("server.pem"))
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_file(pki().join("server.key")).unwrap();
            let config = ServerConfig::builder_with_provider(provider)
                .with_protocol_versions(versions)
                .unwrap()
                .with_client_cert_verifier(verifier)
                .with_single_cert(certs, key)
                .unwrap();
            Arc::new(config)
        }

        /// A connected client stream and the server's end of the socket,
        /// before any TLS.
        pub fn sockets() -> (TlsStream, StdStream) {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let client = StdStream::connect(listener.local_addr().unwrap()).unwrap();
            client.set_nonblocking(true).unwrap();
            client.set_nodelay(true).unwrap();
            let (server, _) = listener.accept().unwrap();
            server.set_nonblocking(true).unwrap();
            server.set_nodelay(true).unwrap();
            let dir = pki();
            let config = client_config(
                &dir.join("ca.pem"),
                &dir.join("client.pem"),
                &Key::File(dir.join("client.key")),
                8883,
            )
            .unwrap();
            let sock = mio::net::TcpStream::from_std(client);
            let tls = TlsStream::new(sock, config, server_name("127.0.0.1").unwrap()).unwrap();
            (tls, server)
        }

        /// Both ends of a finished handshake.
        pub struct Pair {
            pub client: TlsStream,
            pub server: ServerConnection,
            pub sock: StdStream,
            /// Plaintext the server read and the test has not taken.
            received: Vec<u8>,
        }

        /// Connects and runs the handshake with a server speaking `versions`.
        pub fn pair(versions: &[&'static rustls::SupportedProtocolVersion]) -> Pair {
            let (client, sock) = sockets();
            let server = ServerConnection::new(server_config(versions)).unwrap();
            let mut p = Pair {
                client,
                server,
                sock,
                received: Vec::new(),
            };
            let until = Instant::now() + Duration::from_secs(5);
            while p.client.is_handshaking() || p.server.is_handshaking() || p.server.wants_write() {
                assert!(Instant::now() < until, "handshake timed out");
                p.client.flush().unwrap();
                let got = p.client.recv(&mut [0; 16]).unwrap();
                assert_eq!(got, Received::default());
                p.server_read();
                while p.server.wants_write() {
                    p.server.write_tls(&mut p.sock).unwrap();
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            // The client's last flight (TLS 1.3: its Finished) reaches the server.
            p.client.flush().unwrap();
            p
        }

        impl Pair {
            /// What the server reads raw from the socket now, fed to rustls.
            pub fn server_read(&mut self) -> Vec<u8> {
                let mut raw = Vec::new();
                let mut buf = [0; 4096];
                loop {
                    match self.sock.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => raw.extend_from_slice(&buf[..n]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => panic!("server read: {e}"),
                    }
                }
                let mut rd = &raw[..];
                while !rd.is_empty() {
                    self.server.read_tls(&mut rd).unwrap();
                    self.server.process_new_packets().unwrap();
                    let mut buf = [0; 4096];
                    while let Ok(n @ 1..) = self.server.reader().read(&mut buf) {
                        self.received.extend_from_slice(&buf[..n]);
                    }
                }
                raw
            }

            /// The plaintext the server has received (and the raw records it
            /// came in), waiting up to a second for `len` bytes.
            pub fn server_receive(&mut self, len: usize) -> (Vec<u8>, Vec<u8>) {
                let mut raw = Vec::new();
                let until = Instant::now() + Duration::from_secs(1);
                while self.received.len() < len && Instant::now() < until {
                    raw.extend(self.server_read());
                    std::thread::sleep(Duration::from_millis(1));
                }
                (std::mem::take(&mut self.received), raw)
            }

            /// The TLS bytes of `chunks` sent by the server, one record each.
            pub fn server_records(&mut self, chunks: &[&[u8]]) -> Vec<u8> {
                for chunk in chunks {
                    self.server.writer().write_all(chunk).unwrap();
                }
                let mut out = Vec::new();
                while self.server.wants_write() {
                    self.server.write_tls(&mut out).unwrap();
                }
                out
            }

            /// Calls `recv` with `room` bytes of buffer until `len` bytes came
            /// (or a second passed); returns them and the last `Received`.
            pub fn client_receive(&mut self, len: usize, room: usize) -> (Vec<u8>, Received) {
                let mut plain = Vec::new();
                let mut last = Received::default();
                let mut buf = vec![0; room];
                let until = Instant::now() + Duration::from_secs(1);
                while (plain.len() < len || last.more) && Instant::now() < until {
                    last = self.client.recv(&mut buf).unwrap();
                    plain.extend_from_slice(&buf[..last.len]);
                    if last.eof {
                        break;
                    }
                }
                (plain, last)
            }
        }

        /// The content types of the TLS records in `raw`, in order.
        pub fn record_types(raw: &[u8]) -> Vec<u8> {
            let mut types = Vec::new();
            let mut rest = raw;
            while rest.len() >= 5 {
                let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
                types.push(rest[0]);
                rest = &rest[(5 + len).min(rest.len())..];
            }
            types
        }
    }

    use peer::{pair, record_types};
    use rustls::version::{TLS12, TLS13};

    const APPLICATION_DATA: u8 = 23;
    const ALERT: u8 = 21;

    #[test]
    fn sends_between_two_flushes_leave_as_one_record() {
        let mut p = pair(&[&TLS13]);
        let mut sent = Vec::new();
        for i in 0..50u8 {
            let packet = [0x30, 3, 0, 1, i];
            assert_eq!(p.client.send(&packet), packet.len());
            sent.extend_from_slice(&packet);
        }
        assert!(p.client.wants_write());
        p.client.flush().unwrap();
        assert!(!p.client.wants_write());
        let (plain, raw) = p.server_receive(sent.len());
        assert_eq!(plain, sent);
        assert_eq!(record_types(&raw), [APPLICATION_DATA]);
    }

    #[test]
    fn send_takes_less_once_the_stream_holds_its_limit_and_all_of_it_arrives() {
        let mut p = pair(&[&TLS13]);
        let chunk: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let mut sent = Vec::new();
        loop {
            let n = p.client.send(&chunk);
            sent.extend_from_slice(&chunk[..n]);
            if n < chunk.len() {
                break;
            }
        }
        // The gather and rustls's records hold the limit, less a few
        // record headers and tags.
        assert!(sent.len() <= SEND_BUFFER_LIMIT, "{}", sent.len());
        assert!(sent.len() > SEND_BUFFER_LIMIT - 256, "{}", sent.len());
        assert_eq!(p.client.send(&chunk), 0);
        let until = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut plain = Vec::new();
        while p.client.wants_write() || plain.len() < sent.len() {
            assert!(
                std::time::Instant::now() < until,
                "{} of {}",
                plain.len(),
                sent.len()
            );
            p.client.flush().unwrap();
            plain.extend(p.server_receive(1).0);
        }
        assert_eq!(plain, sent);
    }

    #[test]
    fn a_record_split_byte_by_byte_across_reads_is_delivered_whole() {
        let mut p = pair(&[&TLS13]);
        let raw = p.server_records(&[b"one record, cut into single bytes"]);
        let mut plain = Vec::new();
        let mut buf = [0; 64];
        for byte in &raw {
            p.sock.write_all(std::slice::from_ref(byte)).unwrap();
            let got = p.client.recv(&mut buf).unwrap();
            assert!(!got.eof && !got.more);
            plain.extend_from_slice(&buf[..got.len]);
        }
        let want = b"one record, cut into single bytes";
        let (rest, _) = p.client_receive(want.len() - plain.len(), 64);
        plain.extend(rest);
        assert_eq!(plain, want);
    }

    #[test]
    fn many_records_in_one_read_are_all_delivered() {
        let mut p = pair(&[&TLS13]);
        let chunks: Vec<Vec<u8>> = (0..100u8).map(|i| vec![i; 1 + usize::from(i)]).collect();
        let refs: Vec<&[u8]> = chunks.iter().map(|c| &c[..]).collect();
        let raw = p.server_records(&refs);
        assert_eq!(record_types(&raw).len(), 100);
        p.sock.write_all(&raw).unwrap();
        let want = chunks.concat();
        let (plain, last) = p.client_receive(want.len(), 64 * 1024);
        assert_eq!(plain, want);
        assert!(!last.more && !last.eof);
    }

    #[test]
    fn a_buffer_smaller_than_a_record_takes_it_in_pieces_saying_more() {
        let mut p = pair(&[&TLS13]);
        let record: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let raw = p.server_records(&[&record]);
        p.sock.write_all(&raw).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(10));
        let mut buf = [0; 300];
        let got = p.client.recv(&mut buf).unwrap();
        assert_eq!((got.len, got.more, got.eof), (300, true, false));
        // No room at all: nothing read, call again later.
        let got = p.client.recv(&mut []).unwrap();
        assert_eq!((got.len, got.more), (0, true));
        let (rest, last) = p.client_receive(700, 300);
        assert_eq!([&buf[..], &rest[..]].concat(), record);
        assert!(!last.more);
    }

    #[test]
    fn close_notify_follows_what_was_sent_before_it_and_ends_sending() {
        let mut p = pair(&[&TLS13]);
        assert_eq!(p.client.send(b"last words"), 10);
        p.client.close_notify();
        assert_eq!(p.client.send(b"more"), 0);
        assert!(p.client.wants_write());
        p.client.flush().unwrap();
        assert!(!p.client.wants_write());
        let (plain, raw) = p.server_receive(10);
        assert_eq!(plain, b"last words");
        // TLS 1.3 hides the alert's type inside an application-data record.
        assert_eq!(record_types(&raw), [APPLICATION_DATA, APPLICATION_DATA]);
        let mut buf = [0; 8];
        assert_eq!(
            p.server.reader().read(&mut buf).unwrap(),
            0,
            "close_notify seen"
        );
    }

    #[test]
    fn the_brokers_close_notify_ends_the_stream_after_its_data() {
        let mut p = pair(&[&TLS13]);
        p.server.writer().write_all(b"bye").unwrap();
        p.server.send_close_notify();
        while p.server.wants_write() {
            p.server.write_tls(&mut p.sock).unwrap();
        }
        let (plain, last) = p.client_receive(usize::MAX, 64);
        assert_eq!(plain, b"bye");
        assert!(last.eof);
    }

    #[test]
    fn tls_1_2_carries_data_both_ways() {
        let mut p = pair(&[&TLS12]);
        assert_eq!(p.client.version(), Some(rustls::ProtocolVersion::TLSv1_2));
        p.client.send(b"ping");
        p.client.flush().unwrap();
        assert_eq!(p.server_receive(4).0, b"ping");
        let raw = p.server_records(&[b"pong"]);
        p.sock.write_all(&raw).unwrap();
        assert_eq!(p.client_receive(4, 64).0, b"pong");
    }

    #[test]
    fn a_key_update_from_the_broker_is_followed() {
        let mut p = pair(&[&TLS13]);
        p.server.refresh_traffic_keys().unwrap();
        let raw = p.server_records(&[b"new keys"]);
        p.sock.write_all(&raw).unwrap();
        assert_eq!(p.client_receive(8, 64).0, b"new keys");
        p.client.send(b"still here");
        p.client.flush().unwrap();
        assert_eq!(p.server_receive(10).0, b"still here");
    }

    #[test]
    fn an_alert_followed_by_a_reset_is_reported_as_the_alert() {
        let (mut client, mut sock) = peer::sockets();
        client.flush().unwrap();
        // The ClientHello stays unread in the server's socket, so closing
        // it resets the connection; the alert (unknown_ca, in clear
        // before the handshake's keys) is already on its way.
        std::thread::sleep(std::time::Duration::from_millis(10));
        sock.write_all(&[ALERT, 3, 3, 0, 2, 2, 48]).unwrap();
        drop(sock);
        std::thread::sleep(std::time::Duration::from_millis(10));
        match client.recv(&mut [0; 64]) {
            Err(StreamError::Tls(e)) => assert_eq!(classify(&e), TlsFailure::AuthRejected, "{e}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn missing_files_are_named_in_the_error() {
        let e = client_config(
            Path::new("/nonexistent/ca.pem"),
            Path::new("/nonexistent/c.pem"),
            &Key::File("/nonexistent/c.key".into()),
            8883,
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(e.starts_with("/nonexistent/ca.pem: cannot open"), "{e}");
    }
}
