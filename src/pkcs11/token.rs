//! A private key on a PKCS#11 token as a rustls `SigningKey`: the TLS
//! handshake's CertificateVerify is signed by the token, and the key never
//! leaves it.
//!
//! At start-up [`open`] loads the module, finds the one token and the one
//! private key the URI matches, logs in, checks that the key can sign for
//! TLS (RSA of 2048 bits or more with PKCS #1 v1.5 and/or PSS, ECDSA on
//! P-256 or P-384) and that it matches the certificate, by signing a
//! challenge with it and verifying the signature with the certificate's
//! public key. Every failure there is a start-up error naming its cause.
//!
//! One session is kept open. When a signature fails because the token
//! dropped the login (`CKR_USER_NOT_LOGGED_IN`) iotcored logs in again, and
//! when the session or the token went away (a reset, a removal) it finds
//! the token and the key again; either way it then signs once more. A
//! signature that still fails fails the handshake, which the event loop
//! retries with backoff like any other connection failure.
//!
//! The message is hashed here (ring, already in the build through rustls)
//! and the token signs the hash (CKM_RSA_PKCS over a DigestInfo,
//! CKM_RSA_PKCS_PSS, CKM_ECDSA): the mechanisms every token has, TPMs
//! included, rather than the hash-and-sign ones not all of them offer.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::pki_types::CertificateDer;
use rustls::sign::{Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};

use super::ffi::consts::*;
use super::ffi::{Mechanism, MechanismType, Module, ObjectHandle, Rv, Session, SlotId, TokenInfo};
use super::uri::{PinSource, Secret, Uri};

/// Why a token key cannot be used; the message names the cause, never the
/// PIN.
#[derive(Debug)]
pub enum TokenError {
    /// The key is not the certificate's.
    Mismatch,
    /// The token refused the PIN (wrong or locked).
    Pin(String),
    /// Anything else, said in full.
    Other(String),
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenError::Mismatch => f.write_str("the key does not match the certificate"),
            TokenError::Pin(s) => f.write_str(s),
            TokenError::Other(s) => f.write_str(s),
        }
    }
}

fn fail<T>(msg: impl Into<String>) -> Result<T, TokenError> {
    Err(TokenError::Other(msg.into()))
}

/// Where p11-kit's proxy module is installed: Debian's multiarch
/// directory, then the usual libdirs (Yocto, Buildroot, Fedora).
fn proxy_candidates() -> [PathBuf; 3] {
    const MULTIARCH: &str = if cfg!(target_arch = "x86_64") {
        "x86_64-linux-gnu"
    } else if cfg!(target_arch = "aarch64") {
        "aarch64-linux-gnu"
    } else if cfg!(target_arch = "arm") {
        "arm-linux-gnueabihf"
    } else if cfg!(target_arch = "riscv64") {
        "riscv64-linux-gnu"
    } else {
        "."
    };
    [
        Path::new("/usr/lib")
            .join(MULTIARCH)
            .join("p11-kit-proxy.so"),
        PathBuf::from("/usr/lib64/p11-kit-proxy.so"),
        PathBuf::from("/usr/lib/p11-kit-proxy.so"),
    ]
}

/// The longest PIN file read: a PIN is short; anything longer is not one.
const MAX_PIN_FILE: u64 = 4096;

/// RSA keys shorter than this cannot sign for TLS with AWS IoT Core (nor
/// be verified by rustls and webpki).
const MIN_RSA_BITS: u64 = 2048;

/// DER of the curves' OIDs as CKA_EC_PARAMS holds them (namedCurve).
const P256_OID: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const P384_OID: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

/// What the key is, which decides the schemes it offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Rsa,
    P256,
    P384,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Rsa => "RSA",
            Kind::P256 => "EC P-256",
            Kind::P384 => "EC P-384",
        })
    }
}

/// An open session with the key found in it.
struct Open {
    session: Session,
    key: ObjectHandle,
    /// What the start-up log says about the key.
    what: String,
    kind: Kind,
    slot: SlotId,
    /// CKA_ALWAYS_AUTHENTICATE: every signature needs the PIN again.
    always_auth: bool,
}

/// The state every signer shares.
struct Shared {
    module: Arc<Module>,
    uri: Uri,
    pin: Option<Secret>,
    kind: Kind,
    /// The schemes offered to the broker, in order of preference.
    schemes: Vec<SignatureScheme>,
    state: Mutex<State>,
}

/// What signatures change, behind the lock.
struct State {
    /// The session, once open.
    open: Option<Open>,
    /// A fresh session failed too: initialize the module again first.
    restart: bool,
    /// The token refused the PIN after start-up. It is never offered again:
    /// a TPM's dictionary-attack protection or a card would lock it.
    pin_refused: bool,
}

/// The key on the token, for rustls.
pub struct TokenKey(Arc<Shared>);

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenKey({}, {})", self.0.uri, self.0.kind)
    }
}

/// Opens the key `uri` names and checks it against `cert` (the first
/// certificate of `-c`).
pub fn open(uri: &Uri, cert: &CertificateDer<'_>) -> Result<TokenKey, TokenError> {
    let module = match &uri.module_path {
        Some(p) => p.clone(),
        None => {
            let candidates = proxy_candidates();
            match candidates.iter().find(|p| p.exists()) {
                Some(p) => p.clone(),
                None => {
                    return fail(format!(
                        "no module-path in the URI, and p11-kit's proxy module is not \
                         installed (looked for {})",
                        candidates
                            .iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                }
            }
        }
    };
    let loaded = Module::load(&module).map_err(|e| {
        TokenError::Other(format!(
            "cannot load the PKCS#11 module {}: {e}",
            module.display()
        ))
    })?;
    let pin = match &uri.pin {
        None => None,
        Some(PinSource::Value(s)) => Some(s.clone()),
        Some(PinSource::File(path)) => Some(read_pin(path)?),
    };
    let open = find(&loaded, uri, pin.as_ref())?;
    let schemes = schemes(&loaded, open.slot, open.kind)?;
    let shared = Shared {
        module: loaded,
        uri: uri.clone(),
        pin,
        kind: open.kind,
        schemes,
        state: Mutex::new(State {
            open: None,
            restart: false,
            pin_refused: false,
        }),
    };
    // Every scheme offered is tried once, so that a token that lists a
    // mechanism it cannot use fails here rather than in a handshake.
    for &scheme in &shared.schemes {
        let challenge = challenge(scheme)?;
        let sig = sign_with(&open, scheme, &challenge, shared.pin.as_ref()).map_err(|e| {
            TokenError::Other(format!(
                "{}: the token cannot sign with {scheme:?}: {e}",
                open.what
            ))
        })?;
        check_signature(cert, scheme, &challenge, &sig)?;
    }
    log::info!(
        "client key: {} on module {}; TLS signatures: {:?}",
        open.what,
        module.display(),
        shared.schemes
    );
    lock(&shared.state).open = Some(open);
    Ok(TokenKey(Arc::new(shared)))
}

/// A fresh random message to sign at start-up.
fn challenge(scheme: SignatureScheme) -> Result<[u8; 32], TokenError> {
    let mut buf = [0u8; 32];
    crate::sys::fill_random(&mut buf).map_err(|e| {
        TokenError::Other(format!("no randomness for the key check ({scheme:?}): {e}"))
    })?;
    Ok(buf)
}

/// Verifies a start-up signature with the certificate's public key.
fn check_signature(
    cert: &CertificateDer<'_>,
    scheme: SignatureScheme,
    msg: &[u8],
    sig: &[u8],
) -> Result<(), TokenError> {
    use webpki::ring as alg;
    let ee = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| TokenError::Other(format!("the certificate cannot be parsed: {e}")))?;
    let verify: &dyn rustls::pki_types::SignatureVerificationAlgorithm = match scheme {
        SignatureScheme::RSA_PSS_SHA256 => alg::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
        SignatureScheme::RSA_PSS_SHA384 => alg::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
        SignatureScheme::RSA_PSS_SHA512 => alg::RSA_PSS_2048_8192_SHA512_LEGACY_KEY,
        SignatureScheme::RSA_PKCS1_SHA256 => alg::RSA_PKCS1_2048_8192_SHA256,
        SignatureScheme::RSA_PKCS1_SHA384 => alg::RSA_PKCS1_2048_8192_SHA384,
        SignatureScheme::RSA_PKCS1_SHA512 => alg::RSA_PKCS1_2048_8192_SHA512,
        SignatureScheme::ECDSA_NISTP256_SHA256 => alg::ECDSA_P256_SHA256,
        _ => alg::ECDSA_P384_SHA384,
    };
    ee.verify_signature(verify, msg, sig)
        .map_err(|_| TokenError::Mismatch)
}

/// Reads the PIN from the first line of `path`.
fn read_pin(path: &Path) -> Result<Secret, TokenError> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let file = std::fs::File::open(path).map_err(|e| {
        TokenError::Other(format!("cannot open the PIN file {}: {e}", path.display()))
    })?;
    let meta = file.metadata().map_err(|e| {
        TokenError::Other(format!("cannot read the PIN file {}: {e}", path.display()))
    })?;
    if !meta.is_file() {
        return fail(format!("the PIN file {} is not a file", path.display()));
    }
    if meta.mode() & 0o077 != 0 {
        log::warn!(
            "the PIN file {} can be read by other users (mode {:o}): make it 0400 or \
             0600, owned by iotcored's user",
            path.display(),
            meta.mode() & 0o777
        );
    }
    let mut text = zeroize::Zeroizing::new(String::new());
    file.take(MAX_PIN_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|e| {
            TokenError::Other(format!("cannot read the PIN file {}: {e}", path.display()))
        })?;
    if text.len() as u64 > MAX_PIN_FILE {
        return fail(format!(
            "the PIN file {} is longer than {MAX_PIN_FILE} bytes: not a PIN",
            path.display()
        ));
    }
    let line = text.split('\n').next().unwrap_or("");
    let line = line.strip_suffix('\r').unwrap_or(line);
    if line.is_empty() {
        return fail(format!(
            "the PIN file {} is empty (the PIN is its first line)",
            path.display()
        ));
    }
    Ok(Secret::new(line.to_owned()))
}

/// Finds the token and the key, opens a session and logs in.
fn find(module: &Arc<Module>, uri: &Uri, pin: Option<&Secret>) -> Result<Open, TokenError> {
    let slots = module
        .slots()
        .map_err(|e| TokenError::Other(format!("cannot list the tokens: {e}")))?;
    let mut tokens = Vec::new();
    let mut matching = Vec::new();
    for slot in slots {
        // A slot whose token cannot be read is not one we can use.
        let Ok(info) = module.token_info(slot) else {
            continue;
        };
        if !info.initialized() {
            continue;
        }
        tokens.push(describe_token(slot, &info));
        if token_matches(uri, slot, &info) {
            matching.push((slot, info));
        }
    }
    let (slot, info) = match matching.len() {
        1 => matching.swap_remove(0),
        0 if tokens.is_empty() => return fail("the module has no initialized token"),
        0 => {
            return fail(format!(
                "no token matches the URI; the module has {}",
                tokens.join(", ")
            ))
        }
        n => {
            return fail(format!(
                "{n} tokens match the URI; pick one with token=, serial= or slot-id= \
                 (the module has {})",
                tokens.join(", ")
            ))
        }
    };
    let label = &info.label;
    let session = module.open_session(slot).map_err(|e| {
        TokenError::Other(format!("cannot open a session with token {label:?}: {e}"))
    })?;
    login(&session, pin, &info)?;

    let found = session
        .private_keys(uri.object.as_deref().map(str::as_bytes), uri.id.as_deref())
        .map_err(|e| TokenError::Other(format!("cannot search token {label:?}: {e}")))?;
    let key = match found.as_slice() {
        [key] => *key,
        [] => {
            return fail(format!(
                "no private key on token {label:?} matches the URI{}; the token has {}",
                if pin.is_none() && info.login_required() {
                    " (and without a PIN none is visible)"
                } else {
                    ""
                },
                list_keys(&session)
            ))
        }
        many => {
            return fail(format!(
                "{} private keys on token {label:?} match the URI; pick one with \
                 object= or id= (the token has {})",
                many.len(),
                list_keys(&session)
            ))
        }
    };
    let (kind, what) = key_kind(&session, key, label)?;
    let always_auth = always_authenticate(&session, key, &what, pin)?;
    Ok(Open {
        session,
        key,
        what,
        kind,
        slot,
        always_auth,
    })
}

// SlotId is a C unsigned long: u64 here, u32 on armv7.
#[allow(clippy::useless_conversion)]
fn token_matches(uri: &Uri, slot: SlotId, info: &TokenInfo) -> bool {
    let eq = |want: &Option<String>, have: &str| want.as_deref().map_or(true, |w| w == have);
    eq(&uri.token, &info.label)
        && eq(&uri.manufacturer, &info.manufacturer)
        && eq(&uri.serial, &info.serial)
        && eq(&uri.model, &info.model)
        && uri.slot_id.map_or(true, |id| u64::from(slot) == id)
}

fn describe_token(slot: SlotId, info: &TokenInfo) -> String {
    format!(
        "token {:?} (serial {:?}, model {:?}, slot-id {slot})",
        info.label, info.serial, info.model
    )
}

fn login(session: &Session, pin: Option<&Secret>, info: &TokenInfo) -> Result<(), TokenError> {
    let label = &info.label;
    let result = match pin {
        Some(pin) => session.login(Some(pin.expose().as_bytes())),
        None if info.protected_path() => session.login(None),
        None if info.login_required() => {
            return fail(format!(
                "token {label:?} needs a PIN: add pin-source=file:PATH to the URI"
            ))
        }
        None => return Ok(()),
    };
    match result.map_err(|e| (e.code, e)) {
        Ok(()) => Ok(()),
        Err((CKR_USER_ALREADY_LOGGED_IN, _)) => Ok(()),
        Err((CKR_PIN_INCORRECT, _)) => {
            Err(TokenError::Pin(format!("wrong PIN for token {label:?}")))
        }
        Err((CKR_PIN_LOCKED, _)) => Err(TokenError::Pin(format!(
            "the PIN of token {label:?} is locked (too many wrong PINs)"
        ))),
        Err((CKR_USER_PIN_NOT_INITIALIZED, _)) => {
            fail(format!("token {label:?} has no user PIN set yet"))
        }
        Err((_, e)) => fail(format!("cannot log in to token {label:?}: {e}")),
    }
}

/// The private keys a session sees, for messages: labels and ids.
fn list_keys(session: &Session) -> String {
    let Ok(keys) = session.private_keys(None, None) else {
        return "private keys that cannot be listed".into();
    };
    if keys.is_empty() {
        return "no private key".into();
    }
    let names: Vec<String> = keys.iter().map(|&k| key_name(session, k)).collect();
    names.join(", ")
}

fn key_name(session: &Session, key: ObjectHandle) -> String {
    let label = session
        .attribute(key, CKA_LABEL)
        .ok()
        .flatten()
        .unwrap_or_default();
    let id = session
        .attribute(key, CKA_ID)
        .ok()
        .flatten()
        .unwrap_or_default();
    let id: String = id.iter().map(|b| format!("%{b:02x}")).collect();
    format!("object={:?} id={id}", String::from_utf8_lossy(&label))
}

/// Reads what the key is and whether it may sign.
fn key_kind(
    session: &Session,
    key: ObjectHandle,
    token: &str,
) -> Result<(Kind, String), TokenError> {
    let name = key_name(session, key);
    let read = |e: Rv| {
        TokenError::Other(format!(
            "cannot read the key {name} on token {token:?}: {e}"
        ))
    };
    let key_type = session.ulong_attribute(key, CKA_KEY_TYPE).map_err(read)?;
    let sign = session.attribute(key, CKA_SIGN).map_err(read)?;
    let what = |detail: &str| format!("private key {name} ({detail}) on token {token:?}");
    let (kind, detail) = match key_type {
        Some(CKK_RSA) => {
            // CKA_MODULUS_BITS belongs to public keys; a private key has
            // the modulus itself.
            let modulus = session.attribute(key, CKA_MODULUS).map_err(read)?;
            let bits = modulus.map(|m| {
                let m = &m[m.iter().take_while(|&&b| b == 0).count()..];
                8 * m.len() as u64 - m.first().map_or(0, |b| u64::from(b.leading_zeros()))
            });
            match bits {
                Some(bits) if bits < MIN_RSA_BITS => {
                    return fail(format!(
                        "{}: an RSA key of {bits} bits cannot sign for TLS; AWS IoT Core \
                         needs {MIN_RSA_BITS} bits or more",
                        what("RSA")
                    ))
                }
                Some(bits) => (Kind::Rsa, format!("RSA {bits} bits")),
                // Not shown: the signature checked below tells.
                None => (Kind::Rsa, "RSA".to_string()),
            }
        }
        Some(CKK_EC) => match session
            .attribute(key, CKA_EC_PARAMS)
            .map_err(read)?
            .as_deref()
        {
            Some(P256_OID) => (Kind::P256, Kind::P256.to_string()),
            Some(P384_OID) => (Kind::P384, Kind::P384.to_string()),
            _ => {
                return fail(format!(
                    "{}: iotcored signs for TLS with EC keys on P-256 or P-384 only",
                    what("EC, another curve")
                ))
            }
        },
        Some(other) => {
            let name = match other {
                CKK_DSA => "DSA".to_string(),
                CKK_DH => "DH".to_string(),
                CKK_EC_EDWARDS => "EdDSA".to_string(),
                CKK_EC_MONTGOMERY => "X25519/X448".to_string(),
                n => format!("CKK 0x{n:x}"),
            };
            return fail(format!(
                "{}: iotcored signs for TLS with RSA or EC (P-256, P-384) keys only",
                what(&name)
            ));
        }
        None => return fail(format!("{}: the token does not say its type", what("?"))),
    };
    // CKA_SIGN is a CK_BBOOL; absent counts as allowed (the sign call
    // would say otherwise).
    if sign.as_deref().and_then(|v| v.first()) == Some(&0) {
        return fail(format!(
            "{}: the key is not allowed to sign (CKA_SIGN is false)",
            what(&detail)
        ));
    }
    Ok((kind, what(&detail)))
}

/// CKA_ALWAYS_AUTHENTICATE: the key wants the PIN again for each signature
/// (a context-specific login, which needs the PIN in hand).
fn always_authenticate(
    session: &Session,
    key: ObjectHandle,
    what: &str,
    pin: Option<&Secret>,
) -> Result<bool, TokenError> {
    let always = session
        .attribute(key, CKA_ALWAYS_AUTHENTICATE)
        .map_err(|e| TokenError::Other(format!("cannot read {what}: {e}")))?
        .is_some_and(|v| v.first().is_some_and(|&b| b != 0));
    if always && pin.is_none() {
        return fail(format!(
            "{what} needs the PIN for every signature (CKA_ALWAYS_AUTHENTICATE): add \
             pin-source=file:PATH to the URI"
        ));
    }
    Ok(always)
}

/// The schemes the key offers, given the token's mechanisms.
fn schemes(module: &Module, slot: SlotId, kind: Kind) -> Result<Vec<SignatureScheme>, TokenError> {
    let mechanisms = module
        .mechanisms(slot)
        .map_err(|e| TokenError::Other(format!("cannot list the token's mechanisms: {e}")))?;
    let has = |m: MechanismType| mechanisms.contains(&m);
    let schemes = match kind {
        Kind::P256 if has(CKM_ECDSA) => vec![SignatureScheme::ECDSA_NISTP256_SHA256],
        Kind::P384 if has(CKM_ECDSA) => vec![SignatureScheme::ECDSA_NISTP384_SHA384],
        Kind::P256 | Kind::P384 => {
            return fail("the token cannot sign with its EC key: it lacks CKM_ECDSA")
        }
        Kind::Rsa => {
            let mut s = Vec::new();
            // PSS first: TLS 1.3 allows nothing else for RSA, and OpenSSL
            // peers prefer it in TLS 1.2 too.
            if has(CKM_RSA_PKCS_PSS) {
                s.extend([
                    SignatureScheme::RSA_PSS_SHA256,
                    SignatureScheme::RSA_PSS_SHA384,
                    SignatureScheme::RSA_PSS_SHA512,
                ]);
            } else {
                log::warn!(
                    "the token lacks CKM_RSA_PKCS_PSS: TLS 1.3 needs it for RSA keys, so \
                     only TLS 1.2 brokers will accept this key"
                );
            }
            if has(CKM_RSA_PKCS) {
                s.extend([
                    SignatureScheme::RSA_PKCS1_SHA256,
                    SignatureScheme::RSA_PKCS1_SHA384,
                    SignatureScheme::RSA_PKCS1_SHA512,
                ]);
            }
            if s.is_empty() {
                return fail(
                    "the token cannot sign with its RSA key: it lacks CKM_RSA_PKCS and \
                     CKM_RSA_PKCS_PSS",
                );
            }
            s
        }
    };
    Ok(schemes)
}

impl SigningKey for TokenKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        let scheme = self.0.schemes.iter().copied().find(|s| offered.contains(s));
        if let Some(scheme) = scheme {
            log::debug!("PKCS#11: the token signs the handshake with {scheme:?}");
        } else {
            log::warn!(
                "the broker accepts none of the signatures the token's key makes \
                 (it offers {offered:?}; the key makes {:?})",
                self.0.schemes
            );
        }
        scheme.map(|scheme| {
            Box::new(TokenSigner {
                shared: self.0.clone(),
                scheme,
            }) as Box<dyn Signer>
        })
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        match self.0.kind {
            Kind::Rsa => SignatureAlgorithm::RSA,
            Kind::P256 | Kind::P384 => SignatureAlgorithm::ECDSA,
        }
    }
}

/// One handshake's signature.
struct TokenSigner {
    shared: Arc<Shared>,
    scheme: SignatureScheme,
}

impl fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenSigner({:?})", self.scheme)
    }
}

impl Signer for TokenSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.shared.sign(self.scheme, message).map_err(|e| {
            log::debug!("the token could not sign the TLS handshake: {e}");
            rustls::Error::General(format!("PKCS#11 signature failed: {e}"))
        })
    }

    fn scheme(&self) -> SignatureScheme {
        self.scheme
    }
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    /// Signs. A session that fails is closed and a new one opened (after
    /// logging in again, if the token only dropped the login); when a fresh
    /// session fails too, the next handshake starts by initializing the
    /// module again.
    fn sign(&self, scheme: SignatureScheme, message: &[u8]) -> Result<Vec<u8>, String> {
        let mut state = lock(&self.state);
        if state.pin_refused {
            return Err(
                "the token refused the PIN after start-up; iotcored does not offer \
                        it again (a TPM or a smart card would lock it): restart iotcored \
                        with the right PIN"
                    .into(),
            );
        }
        for attempt in 0..2 {
            let (current, fresh) = match state.open.take() {
                Some(current) => (current, false),
                None => (self.reopen(&mut state)?, true),
            };
            let err = match sign_with(&current, scheme, message, self.pin.as_ref()) {
                Ok(sig) => {
                    state.open = Some(current);
                    return Ok(sig);
                }
                Err(e) => e,
            };
            match err.code {
                CKR_PIN_INCORRECT | CKR_PIN_LOCKED => {
                    state.pin_refused = true;
                    return Err(format!("the token refused the PIN ({err})"));
                }
                CKR_USER_NOT_LOGGED_IN if attempt == 0 => {
                    log::warn!("PKCS#11: the token dropped the login ({err}); logging in again");
                    let info = self
                        .module
                        .token_info(current.slot)
                        .map_err(|e| e.to_string())?;
                    match login(&current.session, self.pin.as_ref(), &info) {
                        Ok(()) => state.open = Some(current),
                        Err(TokenError::Pin(e)) => {
                            state.pin_refused = true;
                            return Err(e);
                        }
                        // The session is dropped: the next try opens one.
                        Err(e) => return Err(e.to_string()),
                    }
                }
                _ if attempt == 0 && !fresh => {
                    // `current` is dropped here, which closes its session.
                    log::warn!("PKCS#11: the session failed ({err}); opening a new one");
                }
                _ => {
                    state.restart = true;
                    return Err(err.to_string());
                }
            }
        }
        Err("the token failed twice".into())
    }

    /// A new session with the key: after initializing the module again
    /// when the last one asked for it, or when the token is not found
    /// otherwise (many modules see a reset or re-created token only then).
    fn reopen(&self, state: &mut State) -> Result<Open, String> {
        let mut restarted = false;
        if state.restart {
            log::info!("PKCS#11: initializing the module again");
            self.module.restart()?;
            state.restart = false;
            restarted = true;
        }
        let found = loop {
            match find(&self.module, &self.uri, self.pin.as_ref()) {
                Ok(found) => break found,
                Err(TokenError::Pin(e)) => {
                    state.pin_refused = true;
                    return Err(e);
                }
                Err(e) if !restarted => {
                    log::info!("PKCS#11: {e}; initializing the module again");
                    self.module.restart()?;
                    restarted = true;
                }
                Err(e) => return Err(e.to_string()),
            }
        };
        if found.kind != self.kind {
            return Err(format!(
                "{} is no longer the {} key found at start-up",
                found.what, self.kind
            ));
        }
        log::info!("PKCS#11: session opened again; {}", found.what);
        Ok(found)
    }
}

/// The hash, the mechanism and what is given to the token for `scheme`.
fn sign_with(
    open: &Open,
    scheme: SignatureScheme,
    message: &[u8],
    pin: Option<&Secret>,
) -> Result<Vec<u8>, Rv> {
    let context_pin = pin
        .filter(|_| open.always_auth)
        .map(|p| p.expose().as_bytes());
    use ring::digest;
    use SignatureScheme as S;
    let (alg, hash_mech, mgf, digest_info): (_, _, _, &[u8]) = match scheme {
        S::RSA_PSS_SHA256 | S::RSA_PKCS1_SHA256 | S::ECDSA_NISTP256_SHA256 => (
            &digest::SHA256,
            CKM_SHA256,
            CKG_MGF1_SHA256,
            &DIGEST_INFO_SHA256,
        ),
        S::RSA_PSS_SHA384 | S::RSA_PKCS1_SHA384 | S::ECDSA_NISTP384_SHA384 => (
            &digest::SHA384,
            CKM_SHA384,
            CKG_MGF1_SHA384,
            &DIGEST_INFO_SHA384,
        ),
        _ => (
            &digest::SHA512,
            CKM_SHA512,
            CKG_MGF1_SHA512,
            &DIGEST_INFO_SHA512,
        ),
    };
    let hash = digest::digest(alg, message);
    let hash = hash.as_ref();
    match scheme {
        S::RSA_PKCS1_SHA256 | S::RSA_PKCS1_SHA384 | S::RSA_PKCS1_SHA512 => {
            let mut data = Vec::with_capacity(digest_info.len() + hash.len());
            data.extend_from_slice(digest_info);
            data.extend_from_slice(hash);
            open.session
                .sign(Mechanism::RsaPkcs, open.key, &data, context_pin)
        }
        // The salt is as long as the hash, as TLS requires.
        S::RSA_PSS_SHA256 | S::RSA_PSS_SHA384 | S::RSA_PSS_SHA512 => open.session.sign(
            Mechanism::RsaPss(hash_mech, mgf, hash.len()),
            open.key,
            hash,
            context_pin,
        ),
        _ => {
            let raw = open
                .session
                .sign(Mechanism::Ecdsa, open.key, hash, context_pin)?;
            ecdsa_der(&raw).ok_or(Rv {
                code: CKR_DEVICE_ERROR,
                function: "C_Sign (ECDSA signature of an odd length)",
            })
        }
    }
}

/// DER DigestInfo prefixes (RFC 8017 §9.2, note 1) for PKCS #1 v1.5.
const DIGEST_INFO_SHA256: [u8; 19] = [
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];
const DIGEST_INFO_SHA384: [u8; 19] = [
    0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02, 0x05,
    0x00, 0x04, 0x30,
];
const DIGEST_INFO_SHA512: [u8; 19] = [
    0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03, 0x05,
    0x00, 0x04, 0x40,
];

/// PKCS#11's ECDSA signature (r and s, each as long as the order, big
/// endian) as TLS wants it: DER `SEQUENCE { INTEGER r, INTEGER s }`.
pub(super) fn ecdsa_der(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.is_empty() || raw.len() % 2 != 0 || raw.len() > 2 * 66 {
        return None;
    }
    let (r, s) = raw.split_at(raw.len() / 2);
    let int = |v: &[u8], out: &mut Vec<u8>| {
        let first = v.iter().position(|&b| b != 0).unwrap_or(v.len() - 1);
        let v = &v[first..];
        let pad = v[0] & 0x80 != 0;
        out.push(0x02);
        out.push(u8::try_from(v.len() + usize::from(pad)).unwrap_or(0));
        if pad {
            out.push(0);
        }
        out.extend_from_slice(v);
    };
    let mut body = Vec::with_capacity(raw.len() + 6);
    int(r, &mut body);
    int(s, &mut body);
    let mut der = Vec::with_capacity(body.len() + 3);
    der.push(0x30);
    if body.len() >= 0x80 {
        der.push(0x81);
    }
    der.push(u8::try_from(body.len()).ok()?);
    der.extend_from_slice(&body);
    Some(der)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecdsa_signatures_become_der() {
        // Leading zeros are dropped, a high bit gets a zero in front.
        let mut raw = [0u8; 64];
        raw[0] = 0;
        raw[1] = 0x7f;
        raw[32] = 0x80;
        let der = ecdsa_der(&raw).unwrap();
        assert_eq!(der[0], 0x30);
        assert_eq!(usize::from(der[1]), der.len() - 2);
        assert_eq!(&der[2..4], &[0x02, 31]);
        assert_eq!(der[4], 0x7f);
        let s = &der[4 + 31..];
        assert_eq!(&s[..3], &[0x02, 33, 0x00]);
        assert_eq!(s[3], 0x80);
        // All zeros: one zero byte each.
        assert_eq!(ecdsa_der(&[0; 64]).unwrap(), [0x30, 6, 2, 1, 0, 2, 1, 0]);
        // P-384 sizes, and refusals.
        assert!(ecdsa_der(&[0xff; 96]).is_some());
        assert_eq!(ecdsa_der(&[]), None);
        assert_eq!(ecdsa_der(&[1; 63]), None);
    }
}
