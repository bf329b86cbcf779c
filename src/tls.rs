//! TLS: the rustls client configuration built from the three PEM files, and
//! a non-blocking TLS stream over a mio `TcpStream`.
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

/// Bytes of TLS data rustls may buffer for sending before `write` refuses
/// more: keeps a broker that stops reading from growing our memory.
pub const SEND_BUFFER_LIMIT: usize = 64 * 1024;

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

/// A non-blocking TLS client stream.
pub struct TlsStream {
    sock: TcpStream,
    conn: ClientConnection,
    peer_closed: bool,
}

impl TlsStream {
    /// Starts a handshake over a connected (or connecting) socket.
    pub fn new(
        sock: TcpStream,
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> Result<Self, rustls::Error> {
        let mut conn = ClientConnection::new(config, name)?;
        conn.set_buffer_limit(Some(SEND_BUFFER_LIMIT));
        Ok(Self {
            sock,
            conn,
            peer_closed: false,
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

    /// Whether TLS data is waiting to be written to the socket.
    pub fn wants_write(&self) -> bool {
        self.conn.wants_write()
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

    /// Offers plaintext for sending; returns how much rustls took (it takes
    /// less when its send buffer is at `SEND_BUFFER_LIMIT`).
    pub fn send(&mut self, data: &[u8]) -> usize {
        self.conn.writer().write(data).unwrap_or(0)
    }

    /// Writes buffered TLS data to the socket until it would block.
    pub fn flush(&mut self) -> Result<(), StreamError> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.sock) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(StreamError::Io(e)),
            }
        }
        Ok(())
    }

    /// Queues a TLS close_notify alert; `flush` sends it.
    pub fn close_notify(&mut self) {
        self.conn.send_close_notify();
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
