//! RFC 7512 `pkcs11:` URIs naming the client's private key on a token.
//!
//! What `-k` accepts besides a PEM file: path attributes `token`,
//! `manufacturer`, `serial`, `model` and `slot-id` pick the token, `object`
//! (the key's label), `id` (its CKA_ID, bytes, usually percent-encoded) and
//! `type=private` pick the key; query attributes `module-path`, and
//! `pin-value` or `pin-source`. Values are percent-decoded. Anything else
//! is refused by name, so that a URI never matches more than its writer
//! meant. The parser is in every build (it is small), so a build without
//! the `pkcs11` feature still checks the URI and then says what it lacks.
//!
//! The PIN never reaches a message or the log: `Debug` and `Display` show
//! the URI with `pin-value` hidden, and parse errors name attributes, not
//! values.

use std::fmt;
use std::path::PathBuf;

/// The scheme, compared without regard to case.
pub const SCHEME: &str = "pkcs11:";

/// Whether `-k`'s value is a PKCS#11 URI rather than a file name. A file
/// whose name starts with `pkcs11:` can be given as `./pkcs11:…`.
pub fn is_uri(s: &str) -> bool {
    s.len() >= SCHEME.len() && s.as_bytes()[..SCHEME.len()].eq_ignore_ascii_case(SCHEME.as_bytes())
}

/// A parsed `pkcs11:` URI.
#[derive(Clone, PartialEq, Eq)]
pub struct Uri {
    /// `token`: the token's label.
    pub token: Option<String>,
    /// `manufacturer`: the token's manufacturer id.
    pub manufacturer: Option<String>,
    /// `serial`: the token's serial number.
    pub serial: Option<String>,
    /// `model`: the token's model.
    pub model: Option<String>,
    /// `slot-id`: the slot's number.
    pub slot_id: Option<u64>,
    /// `object`: the key's label (CKA_LABEL).
    pub object: Option<String>,
    /// `id`: the key's CKA_ID.
    pub id: Option<Vec<u8>>,
    /// `module-path`: the PKCS#11 module to load; when absent, p11-kit's
    /// proxy module.
    pub module_path: Option<PathBuf>,
    /// Where the user PIN comes from, if the URI says.
    pub pin: Option<PinSource>,
    /// The URI as given, `pin-value` hidden: for messages.
    shown: String,
}

/// Where the PIN comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum PinSource {
    /// `pin-value=…`: in the URI itself (visible in the process list: for
    /// tests and development only).
    Value(Secret),
    /// `pin-source=file:PATH`: the first line of a file (the production
    /// form: a file only iotcored's user can read).
    File(PathBuf),
}

impl fmt::Debug for PinSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PinSource::Value(_) => f.write_str("Value(hidden)"),
            PinSource::File(p) => f.debug_tuple("File").field(p).finish(),
        }
    }
}

/// A secret string (a PIN): wiped when dropped, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(zeroize::Zeroizing<String>);

impl Secret {
    /// Wraps `s`.
    pub fn new(s: String) -> Secret {
        Secret(zeroize::Zeroizing::new(s))
    }

    /// The secret itself, to hand to the token.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(hidden)")
    }
}

impl fmt::Debug for Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Uri({:?})", self.shown)
    }
}

impl fmt::Display for Uri {
    /// The URI as given, with `pin-value`'s value replaced by `***`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

/// Why a URI was refused; names the attribute, never a value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UriError(pub String);

impl fmt::Display for UriError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn err(msg: impl Into<String>) -> UriError {
    UriError(msg.into())
}

impl Uri {
    /// Parses `text`, which starts with `pkcs11:` (see [`is_uri`]).
    pub fn parse(text: &str) -> Result<Uri, UriError> {
        if !is_uri(text) {
            return Err(err("a PKCS#11 URI starts with \"pkcs11:\""));
        }
        let rest = &text[SCHEME.len()..];
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        if rest.contains('#') {
            return Err(err("a PKCS#11 URI has no fragment (\"#\")"));
        }
        let mut uri = Uri {
            token: None,
            manufacturer: None,
            serial: None,
            model: None,
            slot_id: None,
            object: None,
            id: None,
            module_path: None,
            pin: None,
            shown: masked(text),
        };
        let mut seen: Vec<&str> = Vec::new();
        for attr in path.split(';') {
            if attr.is_empty() && path.is_empty() {
                break;
            }
            let (name, value) = split_attr(attr, "path")?;
            once(&mut seen, name)?;
            if value.contains('&') {
                // Not in RFC 7512's path characters: most likely an "&"
                // typed for the "?" that starts the query. The value is
                // not repeated: it may hold a PIN.
                return Err(err(format!(
                    "{name} has an \"&\": the query (module-path, pin-…) starts \
                     with \"?\" (or write %26 for an \"&\" in the value)"
                )));
            }
            uri.path_attr(name, value)?;
        }
        if let Some(query) = query {
            let mut after_pin = false;
            for attr in query.split('&') {
                let known = attr.split_once('=').is_some_and(|(name, _)| {
                    ["module-path", "module-name", "pin-value", "pin-source"].contains(&name)
                });
                let parsed = split_attr(attr, "query")
                    .and_then(|(name, value)| {
                        once(&mut seen, name)?;
                        uri.query_attr(name, value)?;
                        Ok(name)
                    })
                    .map_err(|e| {
                        if after_pin && !known {
                            // What follows pin-value may be the rest of a
                            // PIN that held an "&": name nothing.
                            err("an attribute after pin-value is malformed (an \"&\" in \
                                 the PIN is written %26)")
                        } else {
                            e
                        }
                    })?;
                after_pin |= parsed == "pin-value";
            }
        }
        Ok(uri)
    }

    fn path_attr(&mut self, name: &str, value: &str) -> Result<(), UriError> {
        let text = || decode_text(value, name);
        match name {
            "token" => self.token = Some(text()?),
            "manufacturer" => self.manufacturer = Some(text()?),
            "serial" => self.serial = Some(text()?),
            "model" => self.model = Some(text()?),
            "object" => self.object = Some(text()?),
            "id" => self.id = Some(decode(value, name)?),
            "slot-id" => {
                let n = text()?;
                let n = n
                    .parse::<u64>()
                    .map_err(|_| err("slot-id must be a decimal number"))?;
                self.slot_id = Some(n);
            }
            "type" => {
                let t = text()?;
                if t != "private" {
                    return Err(err(format!(
                        "type={t}: -k names the private key (type=private); the \
                         certificate comes from -c, as a PEM file"
                    )));
                }
            }
            "library-manufacturer"
            | "library-description"
            | "library-version"
            | "slot-manufacturer"
            | "slot-description" => {
                return Err(err(format!(
                    "iotcored does not match on {name}: pick the module with \
                     module-path and the token with token, serial, model, \
                     manufacturer or slot-id"
                )))
            }
            _ => return Err(err(format!("unknown path attribute {name:?}"))),
        }
        Ok(())
    }

    fn query_attr(&mut self, name: &str, value: &str) -> Result<(), UriError> {
        match name {
            "module-path" => {
                let p = decode_text(value, name)?;
                if p.is_empty() {
                    return Err(err("module-path is empty"));
                }
                self.module_path = Some(PathBuf::from(p));
            }
            "pin-value" | "pin-source" if self.pin.is_some() => {
                return Err(err("give the PIN once: pin-value or pin-source"))
            }
            "pin-value" => {
                // Not decode_text: its errors would not quote a PIN, but
                // keep even the PIN's shape out of messages.
                let bytes = decode(value, name)?;
                let pin = String::from_utf8(bytes)
                    .map_err(|_| err("pin-value is not UTF-8 once decoded"))?;
                self.pin = Some(PinSource::Value(Secret::new(pin)));
            }
            "pin-source" => {
                let source = decode_text(value, name)?;
                let path = source
                    .strip_prefix("file://")
                    .or_else(|| source.strip_prefix("file:"))
                    .unwrap_or(&source);
                if path.is_empty() || path.starts_with('|') {
                    return Err(err(
                        "pin-source must name a file: pin-source=file:/path/to/pin",
                    ));
                }
                self.pin = Some(PinSource::File(PathBuf::from(path)));
            }
            "module-name" => {
                return Err(err(
                    "iotcored does not look modules up by module-name: give module-path",
                ))
            }
            _ => return Err(err(format!("unknown query attribute {name:?}"))),
        }
        Ok(())
    }
}

/// `text` with the value of every `pin-value=` hidden, wherever it is:
/// what messages show of a URI.
fn masked(text: &str) -> String {
    const KEY: &str = "pin-value=";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.to_ascii_lowercase().find(KEY) {
        let value = at + KEY.len();
        out.push_str(&rest[..value]);
        out.push_str("***");
        let end = rest[value..]
            .find([';', '&', '?', '#'])
            .map_or(rest.len(), |n| value + n);
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

fn split_attr<'a>(attr: &'a str, part: &str) -> Result<(&'a str, &'a str), UriError> {
    match attr.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name, value)),
        _ => Err(err(format!(
            "every {part} attribute is name=value; found one without \"=\" or a name"
        ))),
    }
}

fn once<'a>(seen: &mut Vec<&'a str>, name: &'a str) -> Result<(), UriError> {
    if seen.contains(&name) {
        return Err(err(format!("{name} is given twice")));
    }
    seen.push(name);
    Ok(())
}

/// Percent-decodes `value` (RFC 3986 `%XX`) into bytes.
fn decode(value: &str, name: &str) -> Result<Vec<u8>, UriError> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| err(format!("{name}: \"%\" must be followed by two hex digits")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn decode_text(value: &str, name: &str) -> Result<String, UriError> {
    String::from_utf8(decode(value, name)?)
        .map_err(|_| err(format!("{name} is not UTF-8 once percent-decoded")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Uri {
        Uri::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn refuse(s: &str) -> String {
        match Uri::parse(s) {
            Ok(u) => panic!("{s} parsed as {u:?}"),
            Err(e) => e.0,
        }
    }

    #[test]
    fn is_uri_needs_the_scheme_in_any_case() {
        assert!(is_uri("pkcs11:token=a"));
        assert!(is_uri("PKCS11:"));
        assert!(!is_uri("/etc/iotcored/key.pem"));
        assert!(!is_uri("./pkcs11:token=a"));
        assert!(!is_uri("pkcs1"));
    }

    #[test]
    fn path_and_query_attributes_are_decoded() {
        let u = parse(
            "pkcs11:token=My%20Token;manufacturer=SoftHSM%20project;serial=1a2b;model=SoftHSM%20v2;\
             object=iot%3bkey;id=%01%02%ff;type=private;slot-id=7\
             ?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/iotcored/pin",
        );
        assert_eq!(u.token.as_deref(), Some("My Token"));
        assert_eq!(u.manufacturer.as_deref(), Some("SoftHSM project"));
        assert_eq!(u.serial.as_deref(), Some("1a2b"));
        assert_eq!(u.model.as_deref(), Some("SoftHSM v2"));
        assert_eq!(u.object.as_deref(), Some("iot;key"));
        assert_eq!(u.id.as_deref(), Some(&[1u8, 2, 0xff][..]));
        assert_eq!(u.slot_id, Some(7));
        assert_eq!(
            u.module_path,
            Some(PathBuf::from("/usr/lib/softhsm/libsofthsm2.so"))
        );
        assert_eq!(
            u.pin,
            Some(PinSource::File(PathBuf::from("/etc/iotcored/pin")))
        );
    }

    #[test]
    fn an_empty_uri_matches_everything() {
        let u = parse("pkcs11:");
        assert_eq!(u.token, None);
        assert_eq!(u.object, None);
        assert_eq!(u.id, None);
        assert_eq!(u.pin, None);
        assert_eq!(u.to_string(), "pkcs11:");
        let u = parse("pkcs11:?module-path=/m.so");
        assert_eq!(u.module_path, Some(PathBuf::from("/m.so")));
    }

    #[test]
    fn pin_source_forms() {
        for (s, path) in [
            ("pkcs11:?pin-source=file:/run/pin", "/run/pin"),
            ("pkcs11:?pin-source=file:///run/pin", "/run/pin"),
            ("pkcs11:?pin-source=/run/pin", "/run/pin"),
            ("pkcs11:?pin-source=file:%2Frun%2Fpin", "/run/pin"),
        ] {
            assert_eq!(
                parse(s).pin,
                Some(PinSource::File(PathBuf::from(path))),
                "{s}"
            );
        }
        assert!(refuse("pkcs11:?pin-source=%7C/bin/askpin").contains("must name a file"));
        assert!(refuse("pkcs11:?pin-source=file:").contains("must name a file"));
    }

    #[test]
    fn the_pin_value_is_never_shown() {
        let u = parse("pkcs11:token=t;object=k?pin-value=s3cr%65t&module-path=/m.so");
        match &u.pin {
            Some(PinSource::Value(p)) => assert_eq!(p.expose(), "s3cret"),
            other => panic!("{other:?}"),
        }
        let shown = [u.to_string(), format!("{u:?}"), format!("{:?}", u.pin)];
        for s in &shown {
            assert!(!s.contains("s3cr"), "{s}");
        }
        assert_eq!(
            shown[0],
            "pkcs11:token=t;object=k?pin-value=***&module-path=/m.so"
        );
        // Nor in errors about it, nor where a mistyped URI puts it.
        for bad in [
            "pkcs11:token=t&pin-value=s3cret",
            "pkcs11:?pin-value=s3c&ret=1",
            "pkcs11:?pin-value=s3c&r%zzet",
            "pkcs11:?pin-value=s3cr%zz",
            "pkcs11:?pin-value=s3cr%ff",
            "pkcs11:?pin-value=s3cret&pin-value=s3cret",
            "pkcs11:?pin-value=s3cret&pin-source=/p",
        ] {
            let e = refuse(bad);
            assert!(!e.contains("s3cr"), "{bad}: {e}");
        }
    }

    #[test]
    fn every_pin_value_is_masked_in_what_is_shown() {
        assert_eq!(masked("pkcs11:?pin-value=1234"), "pkcs11:?pin-value=***");
        assert_eq!(
            masked("pkcs11:object=pin-value=12;token=t?PIN-VALUE=34&module-path=/m"),
            "pkcs11:object=pin-value=***;token=t?PIN-VALUE=***&module-path=/m"
        );
        assert_eq!(masked("pkcs11:token=t"), "pkcs11:token=t");
    }

    #[test]
    fn refusals_name_the_attribute() {
        for (s, want) in [
            ("pkcs11:token=a;token=b", "token is given twice"),
            ("pkcs11:tokn=a", "unknown path attribute \"tokn\""),
            ("pkcs11:token", "without \"=\""),
            ("pkcs11:=a", "without \"=\" or a name"),
            ("pkcs11:token=a;", "without \"=\""),
            ("pkcs11:?foo=1", "unknown query attribute \"foo\""),
            ("pkcs11:?module-name=softhsm2", "give module-path"),
            ("pkcs11:?module-path=", "module-path is empty"),
            ("pkcs11:type=cert", "type=cert: -k names the private key"),
            ("pkcs11:type=public", "type=public"),
            ("pkcs11:slot-id=x", "slot-id must be a decimal number"),
            (
                "pkcs11:library-version=1",
                "does not match on library-version",
            ),
            (
                "pkcs11:id=%1",
                "id: \"%\" must be followed by two hex digits",
            ),
            ("pkcs11:id=%g0", "two hex digits"),
            ("pkcs11:token=%ff", "token is not UTF-8"),
            ("pkcs11:token=a#frag", "no fragment"),
            (
                "pkcs11:token=a?pin-value=1&pin-source=/p",
                "give the PIN once",
            ),
            ("file:/key.pem", "starts with \"pkcs11:\""),
            (
                "pkcs11:token=t&pin-value=1",
                "token has an \"&\": the query",
            ),
        ] {
            let e = refuse(s);
            assert!(e.contains(want), "{s}: {e:?} lacks {want:?}");
        }
    }

    #[test]
    fn random_input_never_panics_and_never_leaks_a_pin() {
        // Randomized: URIs built from the characters and attribute names
        // that matter, plus a PIN that must never appear in what comes out.
        let mut rng = crate::test_rng::XorShift::new(0x7512);
        let parts = [
            "token=",
            "object=",
            "id=",
            "type=",
            "slot-id=",
            "?",
            "&",
            ";",
            "=",
            "%",
            "%4",
            "%41",
            "%ff",
            "pin-value=",
            "pin-source=",
            "file:",
            "module-path=",
            "a",
            "7",
            "#",
            "private",
        ];
        for _ in 0..20_000 {
            let mut s = String::from("pkcs11:");
            for _ in 0..rng.below(12) {
                s.push_str(parts[rng.below(parts.len())]);
            }
            // When the random part has no "?", the PIN below is the
            // query's first attribute, whole.
            let pin_is_whole = !s.contains('?');
            s.push_str("?pin-value=XYZZY");
            let (shown, error) = match Uri::parse(&s) {
                Ok(u) => {
                    if let Some(PinSource::Value(p)) = &u.pin {
                        if p.expose().is_empty() {
                            continue;
                        }
                        let shown = [u.to_string(), format!("{u:?}")];
                        for text in &shown {
                            assert!(!text.contains(p.expose()), "{s}: {text}");
                        }
                    }
                    (u.to_string(), String::new())
                }
                Err(e) => (String::new(), e.0),
            };
            if pin_is_whole {
                assert!(!shown.contains("XYZZY"), "{s}: {shown}");
                assert!(!error.contains("XYZZY"), "{s}: {error}");
            }
        }
    }
}
