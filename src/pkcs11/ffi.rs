//! The PKCS#11 module through its C interface: the dozen calls iotcored
//! makes, each behind a safe method, with cryptoki-sys's bindings (the
//! structures and constants generated from the standard's headers for
//! each target, by the cryptoki project).
//!
//! Why not cryptoki's safe layer: it linked 126 KiB into the stripped
//! binary (its own log calls pull in the texts of every error code and the
//! names of every mechanism and attribute), and the binary must stay under
//! 1.5 MiB with PKCS#11 in. This file is the part of it iotcored needs.
//!
//! Like `sys.rs`, this is where `unsafe` is allowed: each block says why
//! it is sound. The module is loaded with `dlopen` and never unloaded
//! (modules start threads and register handlers that do not survive
//! `dlclose`); `C_Finalize` runs when the last user is gone.

use std::ffi::{c_void, CString};
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cryptoki_sys as ck;

pub use ck::{CK_MECHANISM_TYPE as MechanismType, CK_OBJECT_HANDLE as ObjectHandle};
pub use ck::{CK_SLOT_ID as SlotId, CK_ULONG as Ulong};

/// How often a list is asked for again when it grew between the call that
/// sized it and the call that fills it.
const MAX_TRIES: u32 = 4;

/// Absent or unreadable attribute, as `C_GetAttributeValue` reports it.
const UNAVAILABLE: Ulong = !0;

/// A PKCS#11 call that did not return `CKR_OK`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rv {
    /// The `CKR_` value.
    pub code: ck::CK_RV,
    /// The function that returned it.
    pub function: &'static str,
}

impl fmt::Display for Rv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} returned ", self.function)?;
        match rv_name(self.code) {
            Some(name) => f.write_str(name),
            None => write!(f, "CKR 0x{:x}", self.code),
        }
    }
}

/// The names of the return values a client like iotcored meets.
fn rv_name(code: ck::CK_RV) -> Option<&'static str> {
    Some(match code {
        ck::CKR_CANCEL => "CKR_CANCEL",
        ck::CKR_HOST_MEMORY => "CKR_HOST_MEMORY",
        ck::CKR_SLOT_ID_INVALID => "CKR_SLOT_ID_INVALID",
        ck::CKR_GENERAL_ERROR => "CKR_GENERAL_ERROR",
        ck::CKR_FUNCTION_FAILED => "CKR_FUNCTION_FAILED",
        ck::CKR_ARGUMENTS_BAD => "CKR_ARGUMENTS_BAD",
        ck::CKR_ATTRIBUTE_SENSITIVE => "CKR_ATTRIBUTE_SENSITIVE",
        ck::CKR_ATTRIBUTE_TYPE_INVALID => "CKR_ATTRIBUTE_TYPE_INVALID",
        ck::CKR_DATA_INVALID => "CKR_DATA_INVALID",
        ck::CKR_DATA_LEN_RANGE => "CKR_DATA_LEN_RANGE",
        ck::CKR_DEVICE_ERROR => "CKR_DEVICE_ERROR",
        ck::CKR_DEVICE_MEMORY => "CKR_DEVICE_MEMORY",
        ck::CKR_DEVICE_REMOVED => "CKR_DEVICE_REMOVED",
        ck::CKR_FUNCTION_CANCELED => "CKR_FUNCTION_CANCELED",
        ck::CKR_FUNCTION_NOT_SUPPORTED => "CKR_FUNCTION_NOT_SUPPORTED",
        ck::CKR_KEY_HANDLE_INVALID => "CKR_KEY_HANDLE_INVALID",
        ck::CKR_KEY_SIZE_RANGE => "CKR_KEY_SIZE_RANGE",
        ck::CKR_KEY_TYPE_INCONSISTENT => "CKR_KEY_TYPE_INCONSISTENT",
        ck::CKR_KEY_FUNCTION_NOT_PERMITTED => "CKR_KEY_FUNCTION_NOT_PERMITTED",
        ck::CKR_MECHANISM_INVALID => "CKR_MECHANISM_INVALID",
        ck::CKR_MECHANISM_PARAM_INVALID => "CKR_MECHANISM_PARAM_INVALID",
        ck::CKR_OBJECT_HANDLE_INVALID => "CKR_OBJECT_HANDLE_INVALID",
        ck::CKR_OPERATION_ACTIVE => "CKR_OPERATION_ACTIVE",
        ck::CKR_OPERATION_NOT_INITIALIZED => "CKR_OPERATION_NOT_INITIALIZED",
        ck::CKR_PIN_INCORRECT => "CKR_PIN_INCORRECT",
        ck::CKR_PIN_INVALID => "CKR_PIN_INVALID",
        ck::CKR_PIN_LEN_RANGE => "CKR_PIN_LEN_RANGE",
        ck::CKR_PIN_EXPIRED => "CKR_PIN_EXPIRED",
        ck::CKR_PIN_LOCKED => "CKR_PIN_LOCKED",
        ck::CKR_SESSION_CLOSED => "CKR_SESSION_CLOSED",
        ck::CKR_SESSION_COUNT => "CKR_SESSION_COUNT",
        ck::CKR_SESSION_HANDLE_INVALID => "CKR_SESSION_HANDLE_INVALID",
        ck::CKR_TOKEN_NOT_PRESENT => "CKR_TOKEN_NOT_PRESENT",
        ck::CKR_TOKEN_NOT_RECOGNIZED => "CKR_TOKEN_NOT_RECOGNIZED",
        ck::CKR_USER_ALREADY_LOGGED_IN => "CKR_USER_ALREADY_LOGGED_IN",
        ck::CKR_USER_NOT_LOGGED_IN => "CKR_USER_NOT_LOGGED_IN",
        ck::CKR_USER_PIN_NOT_INITIALIZED => "CKR_USER_PIN_NOT_INITIALIZED",
        ck::CKR_USER_TYPE_INVALID => "CKR_USER_TYPE_INVALID",
        ck::CKR_BUFFER_TOO_SMALL => "CKR_BUFFER_TOO_SMALL",
        ck::CKR_CRYPTOKI_NOT_INITIALIZED => "CKR_CRYPTOKI_NOT_INITIALIZED",
        ck::CKR_CRYPTOKI_ALREADY_INITIALIZED => "CKR_CRYPTOKI_ALREADY_INITIALIZED",
        ck::CKR_CANT_LOCK => "CKR_CANT_LOCK",
        _ => return None,
    })
}

fn check(code: ck::CK_RV, function: &'static str) -> Result<(), Rv> {
    if code == ck::CKR_OK {
        Ok(())
    } else {
        Err(Rv { code, function })
    }
}

/// A length for the C interface; lengths here are small (a PIN, a hash,
/// a label), so a failure is a bad argument.
fn ulong(n: usize, function: &'static str) -> Result<Ulong, Rv> {
    Ulong::try_from(n).map_err(|_| Rv {
        code: ck::CKR_ARGUMENTS_BAD,
        function,
    })
}

fn size(n: Ulong, function: &'static str) -> Result<usize, Rv> {
    usize::try_from(n).map_err(|_| Rv {
        code: ck::CKR_GENERAL_ERROR,
        function,
    })
}

/// A loaded and initialized PKCS#11 module.
pub struct Module {
    /// The module's function list: valid for the life of the process, since
    /// the module is never unloaded.
    list: &'static ck::CK_FUNCTION_LIST,
    /// Whether this `Module` initialized the library (and so finalizes it).
    initialized: AtomicBool,
}

// SAFETY: the module was initialized with CKF_OS_LOCKING_OK, which makes
// every call safe from any thread (PKCS#11 v2.40 §5.4); the function list
// is read-only. (When C_Initialize said another part of the process had
// initialized it already, that part chose the locking: iotcored has no
// such part, and calls the module from its event loop thread only.)
#[allow(unsafe_code)]
unsafe impl Send for Module {}
// SAFETY: as for Send.
#[allow(unsafe_code)]
unsafe impl Sync for Module {}

/// What `C_GetTokenInfo` says, the blank-padded strings trimmed.
pub struct TokenInfo {
    pub label: String,
    pub manufacturer: String,
    pub model: String,
    pub serial: String,
    pub flags: ck::CK_FLAGS,
}

impl TokenInfo {
    /// The token needs a login before its private keys can be used.
    pub fn login_required(&self) -> bool {
        self.flags & ck::CKF_LOGIN_REQUIRED != 0
    }

    /// The token has been initialized (SoftHSM2, for one, always shows an
    /// empty one, for `softhsm2-util --init-token --free`).
    pub fn initialized(&self) -> bool {
        self.flags & ck::CKF_TOKEN_INITIALIZED != 0
    }

    /// The token has its own PIN pad (or other way to authenticate).
    pub fn protected_path(&self) -> bool {
        self.flags & ck::CKF_PROTECTED_AUTHENTICATION_PATH != 0
    }
}

fn padded(bytes: &[u8]) -> String {
    let end = bytes
        .iter()
        .rposition(|&b| b != b' ' && b != 0)
        .map_or(0, |i| i + 1);
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

impl Module {
    /// Loads the module at `path` and initializes it for use from several
    /// threads (iotcored's event loop, and rustls's callbacks in it).
    pub fn load(path: &Path) -> Result<Arc<Module>, String> {
        let cpath = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| "the path has a NUL byte".to_string())?;
        // SAFETY: `cpath` is a NUL-terminated string. dlopen runs the
        // module's initializers: loading a PKCS#11 module means trusting its
        // code, as the operator who named it does.
        #[allow(unsafe_code)]
        let handle = unsafe { libc::dlopen(cpath.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            return Err(dlerror());
        }
        // SAFETY: `handle` is a live dlopen handle and the name is
        // NUL-terminated.
        #[allow(unsafe_code)]
        let sym = unsafe { libc::dlsym(handle, b"C_GetFunctionList\0".as_ptr().cast()) };
        if sym.is_null() {
            return Err("not a PKCS#11 module: it has no C_GetFunctionList".into());
        }
        // SAFETY: PKCS#11 (§5.2) defines C_GetFunctionList with exactly this
        // signature; `sym` is its address in the module.
        #[allow(unsafe_code)]
        let get: unsafe extern "C" fn(*mut *mut ck::CK_FUNCTION_LIST) -> ck::CK_RV =
            unsafe { std::mem::transmute(sym) };
        let mut list: *mut ck::CK_FUNCTION_LIST = null_mut();
        // SAFETY: `list` is a valid place for the pointer the call writes.
        #[allow(unsafe_code)]
        let rv = unsafe { get(&mut list) };
        if rv != ck::CKR_OK || list.is_null() {
            return Err(format!(
                "C_GetFunctionList failed: {}",
                Rv {
                    code: rv,
                    function: "C_GetFunctionList"
                }
            ));
        }
        // SAFETY: the module owns the list for as long as it is loaded, and
        // it is never unloaded (there is no dlclose); nothing writes to it.
        #[allow(unsafe_code)]
        let list: &'static ck::CK_FUNCTION_LIST = unsafe { &*list };
        let initialized = initialize(list)?;
        Ok(Arc::new(Module {
            list,
            initialized: AtomicBool::new(initialized),
        }))
    }

    /// Finalizes and initializes the module again, so that it looks for
    /// its tokens afresh (a token reset or re-created, a device plugged in
    /// again: many modules only scan at initialization). It closes every
    /// session: the caller (`token.rs`, under its lock) holds none.
    pub(super) fn restart(&self) -> Result<(), String> {
        if let Some(f) = self.list.C_Finalize {
            // SAFETY: the reserved argument must be null.
            #[allow(unsafe_code)]
            let _ = unsafe { f(null_mut()) };
        }
        // Initialized by us now, whoever did it first: ours to finalize.
        initialize(self.list)?;
        self.initialized.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// The slots that have a token.
    pub fn slots(&self) -> Result<Vec<SlotId>, Rv> {
        const F: &str = "C_GetSlotList";
        let f = self.list.C_GetSlotList.ok_or(unsupported(F))?;
        // SAFETY: `list` is null (the count only, written to `n`) or has
        // room for `*n` ids, as `list_of` passes it.
        #[allow(unsafe_code)]
        list_of(F, |list, n| unsafe { f(ck::CK_TRUE, list, n) })
    }

    /// The token in `slot`.
    pub fn token_info(&self, slot: SlotId) -> Result<TokenInfo, Rv> {
        const F: &str = "C_GetTokenInfo";
        let f = self.list.C_GetTokenInfo.ok_or(unsupported(F))?;
        // SAFETY: CK_TOKEN_INFO is plain data (bytes and integers), for
        // which all zeroes is a valid value.
        #[allow(unsafe_code)]
        let mut info: ck::CK_TOKEN_INFO = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid place for the structure the call fills.
        #[allow(unsafe_code)]
        check(unsafe { f(slot, &mut info) }, F)?;
        Ok(TokenInfo {
            label: padded(&info.label),
            manufacturer: padded(&info.manufacturerID),
            model: padded(&info.model),
            serial: padded(&info.serialNumber),
            flags: info.flags,
        })
    }

    /// The mechanisms the token in `slot` offers.
    pub fn mechanisms(&self, slot: SlotId) -> Result<Vec<MechanismType>, Rv> {
        const F: &str = "C_GetMechanismList";
        let f = self.list.C_GetMechanismList.ok_or(unsupported(F))?;
        // SAFETY: as in `slots`.
        #[allow(unsafe_code)]
        list_of(F, |list, n| unsafe { f(slot, list, n) })
    }

    /// Opens a read-only session with the token in `slot`.
    pub fn open_session(self: &Arc<Self>, slot: SlotId) -> Result<Session, Rv> {
        const F: &str = "C_OpenSession";
        let f = self.list.C_OpenSession.ok_or(unsupported(F))?;
        let mut handle: ck::CK_SESSION_HANDLE = 0;
        // SAFETY: no callback (Notify is None, so the null application
        // pointer is never used); `handle` receives the session.
        #[allow(unsafe_code)]
        check(
            unsafe { f(slot, ck::CKF_SERIAL_SESSION, null_mut(), None, &mut handle) },
            F,
        )?;
        Ok(Session {
            module: Arc::clone(self),
            handle,
        })
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        if let (true, Some(f)) = (
            self.initialized.load(Ordering::Relaxed),
            self.list.C_Finalize,
        ) {
            // SAFETY: the reserved argument must be null; every session
            // holds an Arc of this module, so none is left.
            #[allow(unsafe_code)]
            let _ = unsafe { f(null_mut()) };
        }
    }
}

/// C_Initialize for use from several threads; whether this call did it
/// (false: someone in the process, such as p11-kit's proxy, already had).
fn initialize(list: &ck::CK_FUNCTION_LIST) -> Result<bool, String> {
    let init = list
        .C_Initialize
        .ok_or_else(|| "the module has no C_Initialize".to_string())?;
    let mut args = ck::CK_C_INITIALIZE_ARGS {
        CreateMutex: None,
        DestroyMutex: None,
        LockMutex: None,
        UnlockMutex: None,
        flags: ck::CKF_OS_LOCKING_OK,
        pReserved: null_mut(),
    };
    // SAFETY: `args` is a valid CK_C_INITIALIZE_ARGS that lives across the
    // call.
    #[allow(unsafe_code)]
    let rv = unsafe { init((&mut args as *mut ck::CK_C_INITIALIZE_ARGS).cast::<c_void>()) };
    match rv {
        ck::CKR_OK => Ok(true),
        ck::CKR_CRYPTOKI_ALREADY_INITIALIZED => Ok(false),
        code => Err(Rv {
            code,
            function: "C_Initialize",
        }
        .to_string()),
    }
}

/// PKCS#11's two-call list: `call(null, n)` for the count, then
/// `call(buffer, n)` to fill it; asked again (up to `MAX_TRIES`) if the list
/// grew in between (a token arrived).
fn list_of(
    function: &'static str,
    mut call: impl FnMut(*mut Ulong, &mut Ulong) -> ck::CK_RV,
) -> Result<Vec<Ulong>, Rv> {
    let mut tries = 0;
    loop {
        tries += 1;
        let mut n: Ulong = 0;
        check(call(null_mut(), &mut n), function)?;
        let mut list = vec![0; size(n, function)?];
        let rv = call(list.as_mut_ptr(), &mut n);
        if rv == ck::CKR_BUFFER_TOO_SMALL && tries < MAX_TRIES {
            continue;
        }
        check(rv, function)?;
        list.truncate(size(n, function)?);
        return Ok(list);
    }
}

fn unsupported(function: &'static str) -> Rv {
    Rv {
        code: ck::CKR_FUNCTION_NOT_SUPPORTED,
        function,
    }
}

fn dlerror() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated message that stays
    // valid until the next dl call on this thread; it is copied at once.
    #[allow(unsafe_code)]
    unsafe {
        let msg = libc::dlerror();
        if msg.is_null() {
            "dlopen failed".into()
        } else {
            std::ffi::CStr::from_ptr(msg).to_string_lossy().into_owned()
        }
    }
}

/// An open session; closed when dropped.
pub struct Session {
    module: Arc<Module>,
    handle: ck::CK_SESSION_HANDLE,
}

/// How a signature is made (PKCS#11 mechanism and its parameter).
#[derive(Clone, Copy, Debug)]
pub enum Mechanism {
    /// CKM_RSA_PKCS over a DigestInfo.
    RsaPkcs,
    /// CKM_RSA_PKCS_PSS over a hash: hash mechanism, MGF, salt length.
    RsaPss(MechanismType, ck::CK_RSA_PKCS_MGF_TYPE, usize),
    /// CKM_ECDSA over a hash.
    Ecdsa,
}

impl Session {
    /// Logs the user in with `pin`; `None` when the token has its own PIN
    /// pad.
    pub fn login(&self, pin: Option<&[u8]>) -> Result<(), Rv> {
        const F: &str = "C_Login";
        let f = self.module.list.C_Login.ok_or(unsupported(F))?;
        let (ptr, len) = match pin {
            Some(p) => (p.as_ptr().cast_mut(), ulong(p.len(), F)?),
            None => (null_mut(), 0),
        };
        // SAFETY: `ptr` is null or `len` readable bytes; the module only
        // reads the PIN (the C prototype lacks const).
        #[allow(unsafe_code)]
        check(unsafe { f(self.handle, ck::CKU_USER, ptr, len) }, F)
    }

    /// The private keys whose label and id are as given (when given).
    pub fn private_keys(
        &self,
        label: Option<&[u8]>,
        id: Option<&[u8]>,
    ) -> Result<Vec<ObjectHandle>, Rv> {
        const F: &str = "C_FindObjectsInit";
        let list = self.module.list;
        let init = list.C_FindObjectsInit.ok_or(unsupported(F))?;
        let find = list.C_FindObjects.ok_or(unsupported("C_FindObjects"))?;
        let fin = list
            .C_FindObjectsFinal
            .ok_or(unsupported("C_FindObjectsFinal"))?;
        let mut class: ck::CK_OBJECT_CLASS = ck::CKO_PRIVATE_KEY;
        let mut template = vec![ck::CK_ATTRIBUTE {
            type_: ck::CKA_CLASS,
            pValue: (&mut class as *mut ck::CK_OBJECT_CLASS).cast(),
            ulValueLen: ulong(std::mem::size_of::<ck::CK_OBJECT_CLASS>(), F)?,
        }];
        for (type_, value) in [(ck::CKA_LABEL, label), (ck::CKA_ID, id)] {
            if let Some(v) = value {
                template.push(ck::CK_ATTRIBUTE {
                    type_,
                    pValue: v.as_ptr().cast_mut().cast(),
                    ulValueLen: ulong(v.len(), F)?,
                });
            }
        }
        // SAFETY: the template's pointers are to `class`, `label` and `id`,
        // which outlive the search (it ends below); the module only reads
        // them.
        #[allow(unsafe_code)]
        check(
            unsafe {
                init(
                    self.handle,
                    template.as_mut_ptr(),
                    ulong(template.len(), F)?,
                )
            },
            F,
        )?;
        let mut found = Vec::new();
        let mut batch: [ObjectHandle; 16] = [0; 16];
        let result = loop {
            let mut n: Ulong = 0;
            // SAFETY: `batch` has room for the 16 handles asked for.
            #[allow(unsafe_code)]
            let rv = unsafe { find(self.handle, batch.as_mut_ptr(), 16, &mut n) };
            if let Err(e) = check(rv, "C_FindObjects") {
                break Err(e);
            }
            // No `?` between C_FindObjectsInit and C_FindObjectsFinal.
            let n = usize::try_from(n).map_or(batch.len(), |n| n.min(batch.len()));
            found.extend_from_slice(&batch[..n]);
            // A token with this many keys is not one iotcored should guess in.
            if n == 0 || found.len() >= 1024 {
                break Ok(found);
            }
        };
        // SAFETY: ends the search begun above.
        #[allow(unsafe_code)]
        let _ = unsafe { fin(self.handle) };
        result
    }

    /// One attribute's value; `None` when the object has none (or hides it).
    pub fn attribute(
        &self,
        object: ObjectHandle,
        type_: ck::CK_ATTRIBUTE_TYPE,
    ) -> Result<Option<Vec<u8>>, Rv> {
        const F: &str = "C_GetAttributeValue";
        let f = self.module.list.C_GetAttributeValue.ok_or(unsupported(F))?;
        let mut attr = ck::CK_ATTRIBUTE {
            type_,
            pValue: null_mut(),
            ulValueLen: 0,
        };
        // SAFETY: a null pValue asks for the length only, written to `attr`.
        #[allow(unsafe_code)]
        let rv = unsafe { f(self.handle, object, &mut attr, 1) };
        match rv {
            ck::CKR_ATTRIBUTE_SENSITIVE | ck::CKR_ATTRIBUTE_TYPE_INVALID => return Ok(None),
            rv => check(rv, F)?,
        }
        if attr.ulValueLen == UNAVAILABLE {
            return Ok(None);
        }
        let mut value = vec![0u8; size(attr.ulValueLen, F)?];
        attr.pValue = value.as_mut_ptr().cast();
        // SAFETY: `value` has the ulValueLen bytes the module asked for.
        #[allow(unsafe_code)]
        check(unsafe { f(self.handle, object, &mut attr, 1) }, F)?;
        value.truncate(size(attr.ulValueLen, F)?);
        Ok(Some(value))
    }

    /// A CK_ULONG attribute (a key type, a size).
    pub fn ulong_attribute(
        &self,
        object: ObjectHandle,
        type_: ck::CK_ATTRIBUTE_TYPE,
    ) -> Result<Option<Ulong>, Rv> {
        Ok(self.attribute(object, type_)?.and_then(|v| {
            let bytes = v.get(..std::mem::size_of::<Ulong>())?;
            Some(Ulong::from_ne_bytes(bytes.try_into().ok()?))
        }))
    }

    /// Signs `data` with `key`; `context_pin` logs in for this one
    /// signature, as a key with CKA_ALWAYS_AUTHENTICATE requires.
    pub fn sign(
        &self,
        mechanism: Mechanism,
        key: ObjectHandle,
        data: &[u8],
        context_pin: Option<&[u8]>,
    ) -> Result<Vec<u8>, Rv> {
        const F: &str = "C_SignInit";
        let list = self.module.list;
        let init = list.C_SignInit.ok_or(unsupported(F))?;
        let sign = list.C_Sign.ok_or(unsupported("C_Sign"))?;
        let login = list.C_Login.ok_or(unsupported("C_Login"))?;
        let (mechanism, hash_alg, mgf, salt) = match mechanism {
            Mechanism::RsaPkcs => (ck::CKM_RSA_PKCS, 0, 0, 0),
            Mechanism::Ecdsa => (ck::CKM_ECDSA, 0, 0, 0),
            Mechanism::RsaPss(hash, mgf, salt) => (ck::CKM_RSA_PKCS_PSS, hash, mgf, salt),
        };
        // Every conversion before C_SignInit: once it succeeds, only a
        // C_Sign that fails (or succeeds) ends the operation.
        let len = ulong(data.len(), "C_Sign")?;
        let pin_len = ulong(context_pin.map_or(0, <[u8]>::len), "C_Login")?;
        let mut pss = ck::CK_RSA_PKCS_PSS_PARAMS {
            hashAlg: hash_alg,
            mgf,
            sLen: ulong(salt, F)?,
        };
        let mut mech = ck::CK_MECHANISM {
            mechanism,
            pParameter: null_mut(),
            ulParameterLen: 0,
        };
        if mechanism == ck::CKM_RSA_PKCS_PSS {
            mech.pParameter = (&mut pss as *mut ck::CK_RSA_PKCS_PSS_PARAMS).cast();
            mech.ulParameterLen = ulong(std::mem::size_of::<ck::CK_RSA_PKCS_PSS_PARAMS>(), F)?;
        }
        // SAFETY: `mech` and the parameters it points to (`pss`) live across
        // the call.
        #[allow(unsafe_code)]
        check(unsafe { init(self.handle, &mut mech, key) }, F)?;
        if let Some(pin) = context_pin {
            // SAFETY: `pin` is `pin_len` readable bytes, only read.
            #[allow(unsafe_code)]
            let rv = unsafe {
                login(
                    self.handle,
                    ck::CKU_CONTEXT_SPECIFIC,
                    pin.as_ptr().cast_mut(),
                    pin_len,
                )
            };
            check(rv, "C_Login (CKU_CONTEXT_SPECIFIC)")?;
        }
        let mut sig_len: Ulong = 0;
        // SAFETY: `data` is `len` readable bytes (read only, the prototype
        // lacks const); a null signature asks for its length.
        #[allow(unsafe_code)]
        check(
            unsafe {
                sign(
                    self.handle,
                    data.as_ptr().cast_mut(),
                    len,
                    null_mut(),
                    &mut sig_len,
                )
            },
            "C_Sign",
        )?;
        // A c_ulong always fits a usize on Linux: no `?` to leave the
        // operation open.
        let mut sig = vec![0u8; usize::try_from(sig_len).unwrap_or(0)];
        let mut sig_len = ulong(sig.len(), "C_Sign")?;
        // SAFETY: `sig` has the sig_len bytes the module asked for.
        #[allow(unsafe_code)]
        check(
            unsafe {
                sign(
                    self.handle,
                    data.as_ptr().cast_mut(),
                    len,
                    sig.as_mut_ptr(),
                    &mut sig_len,
                )
            },
            "C_Sign",
        )?;
        sig.truncate(size(sig_len, "C_Sign")?);
        Ok(sig)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(f) = self.module.list.C_CloseSession {
            // SAFETY: the handle came from C_OpenSession and is closed once.
            #[allow(unsafe_code)]
            let _ = unsafe { f(self.handle) };
        }
    }
}

/// The constants `token.rs` needs, by their PKCS#11 names.
pub mod consts {
    pub use cryptoki_sys::{
        CKA_ALWAYS_AUTHENTICATE, CKA_EC_PARAMS, CKA_ID, CKA_KEY_TYPE, CKA_LABEL, CKA_MODULUS,
        CKA_SIGN, CKG_MGF1_SHA256, CKG_MGF1_SHA384, CKG_MGF1_SHA512, CKK_DH, CKK_DSA, CKK_EC,
        CKK_EC_EDWARDS, CKK_EC_MONTGOMERY, CKK_RSA, CKM_ECDSA, CKM_RSA_PKCS, CKM_RSA_PKCS_PSS,
        CKM_SHA256, CKM_SHA384, CKM_SHA512, CKR_DEVICE_ERROR, CKR_PIN_INCORRECT, CKR_PIN_LOCKED,
        CKR_USER_ALREADY_LOGGED_IN, CKR_USER_NOT_LOGGED_IN, CKR_USER_PIN_NOT_INITIALIZED,
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn return_values_are_named() {
        let rv = Rv {
            code: ck::CKR_PIN_INCORRECT,
            function: "C_Login",
        };
        assert_eq!(rv.to_string(), "C_Login returned CKR_PIN_INCORRECT");
        let rv = Rv {
            code: 0x8000_0001,
            function: "C_Sign",
        };
        assert_eq!(rv.to_string(), "C_Sign returned CKR 0x80000001");
    }

    #[test]
    fn blank_padded_strings_are_trimmed() {
        assert_eq!(padded(b"iot token      "), "iot token");
        assert_eq!(padded(b"                "), "");
        assert_eq!(padded(b"a\0\0"), "a");
    }

    #[test]
    fn a_missing_module_is_dlopens_message() {
        let e = Module::load(Path::new("/nonexistent/module.so"))
            .err()
            .unwrap_or_default();
        assert!(e.contains("/nonexistent/module.so"), "{e}");
    }

    #[test]
    fn a_library_that_is_not_a_module_is_named_so() {
        // The libc this process runs on (of its architecture, also under
        // qemu-user) has no C_GetFunctionList.
        let maps = std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
        let libc = maps
            .lines()
            .filter_map(|l| l.split_whitespace().nth(5))
            .find(|p| p.contains("/libc.so") || p.contains("/libc-"))
            .expect("libc in /proc/self/maps");
        let e = Module::load(Path::new(libc)).err().unwrap_or_default();
        assert_eq!(e, "not a PKCS#11 module: it has no C_GetFunctionList");
    }
}
