//! Client keys on PKCS#11 tokens (TPM 2.0 through tpm2-pkcs11, HSMs, secure
//! elements, SoftHSM2 for tests): `-k pkcs11:…` [RFC 7512].
//!
//! The URI parser is in every build; the token code only with the cargo
//! feature `pkcs11` (on by default), which brings cryptoki-sys's bindings
//! (`ffi.rs` calls the module through them). The module is loaded with
//! dlopen at start-up, and only when `-k` is a URI, so a daemon with a PEM
//! key loads nothing more.

mod uri;

pub use uri::{is_uri, PinSource, Secret, Uri, UriError, SCHEME};

#[cfg(feature = "pkcs11")]
#[allow(unsafe_code)]
mod ffi;
#[cfg(feature = "pkcs11")]
mod token;

#[cfg(feature = "pkcs11")]
pub use token::{open, TokenError, TokenKey};
