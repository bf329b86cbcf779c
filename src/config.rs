//! The command line: arguments in, a validated `Config` out (lexopt).
//!
//! [iotcored-param-endpoint-*], [iotcored-param-id-*],
//! [iotcored-param-rootca-*], [iotcored-param-cert-*], [iotcored-param-key-*]:
//! all five are required. Everything else has a default. Validation here is
//! about the values themselves; the files are opened later, by `tls`.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::mqtt::packet::Version;
use crate::pkcs11::{Uri, SCHEME};

use crate::bus::{self, MAX_INTERFACE_NAME_LEN};

/// AWS IoT Core's keepalive range; a value outside it is moved into it by
/// AWS, so iotcored warns when asked for one.
pub const AWS_KEEPALIVE_SECS: core::ops::RangeInclusive<u16> = 30..=1200;

/// AWS IoT Core's limit on the client id, in bytes of UTF-8.
pub const MAX_CLIENT_ID_LEN: usize = 128;

/// A Unix socket path must fit `sockaddr_un.sun_path` with its NUL.
pub const MAX_SOCKET_PATH_LEN: usize = 107;

/// The validated daemon configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Host name or IP literal of the broker [iotcored-param-endpoint-1].
    pub endpoint: String,
    /// TCP port; 443 makes the handshake offer ALPN `x-amzn-mqtt-ca`.
    pub port: u16,
    /// MQTT client id of connection 0 [iotcored-param-id-1].
    pub client_id: String,
    /// Root CA file used to verify the broker [iotcored-param-rootca-1].
    pub rootca: PathBuf,
    /// Client certificate (chain) file [iotcored-param-cert-1].
    pub cert: PathBuf,
    /// The private key of `cert` [iotcored-param-key-1]: a PEM file or a
    /// key on a PKCS#11 token.
    pub key: Key,
    /// MQTT keepalive in seconds (1..=65535).
    pub keepalive: u16,
    /// Bus interface name; the socket is `<socket_dir>/<interface_name>`.
    pub interface_name: String,
    /// Directory of the bus sockets.
    pub socket_dir: PathBuf,
    /// MQTT clean session 0: the broker keeps our subscriptions and queues
    /// QoS 1 messages for us while we are away.
    pub persistent_session: bool,
    /// The longest wait between reconnect attempts, in seconds.
    pub max_backoff: u16,
    /// The MQTT protocol: 5 (default) or 3.1.1 [mqtt5-1].
    pub mqtt: Version,
    /// MQTT 5 Session Expiry Interval with `persistent_session`, seconds
    /// (1..=604800) [mqtt5-2].
    pub session_expiry: u32,
    /// How long SIGTERM waits for queued messages to be sent before the
    /// daemon stops, in seconds (0..=3600) [spool-1].
    pub drain: u16,
    /// The disk spool's directory, if any [spool-2].
    pub spool_dir: Option<PathBuf>,
    /// The disk spool file's size, bytes (1 MiB..=4 GiB).
    pub spool_size: u64,
    /// The longest time between `fsync`s of the disk spool, ms.
    pub spool_sync_ms: u32,
}

impl Config {
    /// The path of this daemon's bus socket.
    pub fn socket_path(&self) -> PathBuf {
        self.socket_dir.join(&self.interface_name)
    }

    /// Whether the keepalive lies outside the range AWS IoT Core honours.
    pub fn keepalive_outside_aws_range(&self) -> bool {
        !AWS_KEEPALIVE_SECS.contains(&self.keepalive)
    }
}

/// Where the client's private key is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key {
    /// A PEM file (PKCS#8, PKCS#1 or SEC1).
    File(PathBuf),
    /// A key on a PKCS#11 token, named by an RFC 7512 URI.
    Pkcs11(Box<Uri>),
}

impl fmt::Display for Key {
    /// The file name, or the URI with any PIN hidden.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::File(p) => write!(f, "{}", p.display()),
            Key::Pkcs11(uri) => write!(f, "{uri}"),
        }
    }
}

/// `-k`'s value: a `pkcs11:` URI, else a file name.
fn key(value: OsString) -> Result<Key, UsageError> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = value.as_bytes();
    let uri = bytes.len() >= SCHEME.len()
        && bytes[..SCHEME.len()].eq_ignore_ascii_case(SCHEME.as_bytes());
    if !uri {
        return Ok(Key::File(PathBuf::from(value)));
    }
    // Never repeated in a message: the URI may hold a PIN.
    let text = value.to_str().ok_or_else(|| {
        UsageError(
            "-k/--key: bad PKCS#11 URI: not UTF-8 (percent-encode other bytes, e.g. %e9)".into(),
        )
    })?;
    Uri::parse(text)
        .map(|uri| Key::Pkcs11(Box::new(uri)))
        .map_err(|e| UsageError(format!("-k/--key: bad PKCS#11 URI: {e}")))
}

/// What the command line asked for.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    /// Run the daemon.
    Run(Box<Config>),
    /// Print the help text and exit 0.
    Help,
    /// Print the version and exit 0.
    Version,
}

/// A usage error: the message says which option is wrong and why.
#[derive(Debug, PartialEq, Eq)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<lexopt::Error> for UsageError {
    /// lexopt's errors in this module's words: a value is quoted the same
    /// way in every message (`{:?}`, double quotes).
    fn from(e: lexopt::Error) -> Self {
        use lexopt::Error as E;
        UsageError(match e {
            E::MissingValue { option: Some(o) } => format!("{o}: a value is missing"),
            E::MissingValue { option: None } => "a value is missing".into(),
            E::UnexpectedOption(o) => format!("unknown option {o:?}"),
            E::UnexpectedArgument(a) => format!("unexpected argument {a:?}"),
            E::UnexpectedValue { option, value } => {
                format!("{option}: takes no value (got {value:?})")
            }
            E::NonUnicodeValue(v) => format!("{v:?} is not valid UTF-8"),
            other => other.to_string(),
        })
    }
}

/// The help text printed by `-h`.
pub const HELP: &str = "\
Usage: iotcored -e ENDPOINT -i CLIENT_ID -r ROOTCA -c CERT -k KEY [OPTIONS]

MQTT spooler daemon for AWS IoT Core, serving the Greengrass Lite core bus.

Required:
  -e, --endpoint HOST         AWS IoT Core endpoint (host name or IP address)
  -i, --id CLIENT_ID          MQTT client id (extra connections add _1, _2, ...)
  -r, --rootca FILE           root CA certificate(s), PEM, to verify the endpoint
  -c, --cert FILE             client certificate (chain), PEM
  -k, --key FILE|URI          private key of the client certificate: a PEM file, or a
                              pkcs11: URI naming a key on a TPM or HSM (see below)

Options:
      --port N                TCP port [default: 8883; 443 offers ALPN x-amzn-mqtt-ca]
      --keepalive SECONDS     MQTT keepalive, 1-65535 [default: 60; AWS honours 30-1200]
  -n, --interface_name NAME   core bus interface name [default: aws_iot_mqtt]
      --socket-dir DIR        directory of core bus sockets [default: /run/greengrass]
      --max-backoff SECONDS   longest wait between reconnect attempts, 1-3600 [default: 120]
      --persistent-session    ask the broker to keep our session (MQTT clean session 0):
                              subscriptions and QoS 1 messages survive a disconnect
      --session-expiry SECONDS  with --persistent-session and MQTT 5, how long the
                              broker keeps the session, 1-604800 [default: 3600]
      --mqtt VERSION          MQTT protocol, 5 or 3.1.1 [default: 5]
      --drain SECONDS         on SIGTERM, keep sending queued messages for up to this
                              long while connected, 0-3600 [default: 2]; what is still
                              queued then is discarded (and logged)
      --spool-dir DIR         keep QoS 1 messages in a file in DIR until the broker
                              acknowledges them: they survive the end of the process
      --spool-size SIZE       the file's size, allocated at start-up: 1M-4G, suffix
                              K, M or G [default: 16M]
      --spool-sync MS         the longest time between syncs of the file to disk,
                              1-60000 [default: 100]
  -h, --help                  print this help
  -V, --version               print the version

Keys on a PKCS#11 token (RFC 7512 URI; quote it for the shell):
  -k 'pkcs11:token=LABEL;object=KEY?pin-source=file:/etc/iotcored/pin'
  The token: token=, serial=, model=, manufacturer=, slot-id=; the key: object=
  (its label) and/or id= (e.g. id=%01); module-path=/path/to/module.so (default:
  p11-kit's proxy module); the PIN: pin-source=file:PATH (its first line) or
  pin-value=PIN (visible to other processes: for tests only).

Logging: RUST_LOG=error|warn|info|debug|trace (default info), to stderr.
Exit status: 0 stopped by SIGTERM/SIGINT, 1 error, 2 usage,
             3 authentication failure, 4 server certificate not trusted.
";

/// Parses the command line (without the program name).
pub fn parse<I>(args: I) -> Result<Command, UsageError>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    use lexopt::prelude::*;

    let mut endpoint = None;
    let mut client_id = None;
    let mut rootca = None;
    let mut cert = None;
    let mut key = None;
    let mut port: u16 = 8883;
    let mut keepalive: u16 = 60;
    let mut interface_name = String::from("aws_iot_mqtt");
    let mut socket_dir = PathBuf::from("/run/greengrass");
    let mut persistent_session = false;
    let mut max_backoff: u16 = 120;
    let mut mqtt = Version::V5;
    let mut session_expiry: u32 = 3600;
    let mut drain: u16 = 2;
    let mut spool_dir = None;
    let mut spool_size: u64 = 16 << 20;
    let mut spool_sync_ms: u32 = 100;

    let mut parser = lexopt::Parser::from_args(args);
    while let Some(arg) = parser.next()? {
        match arg {
            Short('e') | Long("endpoint") => endpoint = Some(string(&mut parser, "endpoint")?),
            Short('i') | Long("id") => client_id = Some(string(&mut parser, "id")?),
            Short('r') | Long("rootca") => rootca = Some(PathBuf::from(parser.value()?)),
            Short('c') | Long("cert") => cert = Some(PathBuf::from(parser.value()?)),
            Short('k') | Long("key") => key = Some(self::key(parser.value()?)?),
            Long("port") => port = number(&mut parser, "port", 1, u16::MAX)?,
            Long("keepalive") => keepalive = number(&mut parser, "keepalive", 1, u16::MAX)?,
            Short('n') | Long("interface_name") | Long("interface-name") => {
                interface_name = string(&mut parser, "interface_name")?
            }
            Long("socket-dir") => socket_dir = PathBuf::from(parser.value()?),
            Long("persistent-session") => persistent_session = true,
            Long("max-backoff") => max_backoff = number(&mut parser, "max-backoff", 1, 3600)?,
            Long("mqtt") => {
                mqtt = match string(&mut parser, "mqtt")?.as_str() {
                    "5" | "5.0" => Version::V5,
                    "3.1.1" | "3" | "311" => Version::V311,
                    other => {
                        return Err(UsageError(format!("--mqtt: {other:?} is not 5 or 3.1.1")))
                    }
                }
            }
            Long("session-expiry") => {
                session_expiry = number(&mut parser, "session-expiry", 1, 604_800)?;
            }
            Long("drain") => drain = number(&mut parser, "drain", 0, 3600)?,
            Long("spool-dir") => spool_dir = Some(PathBuf::from(parser.value()?)),
            Long("spool-size") => spool_size = size(&mut parser, "spool-size")?,
            Long("spool-sync") => {
                spool_sync_ms = number(&mut parser, "spool-sync", 1u32, 60_000)?;
            }
            Short('h') | Long("help") => return Ok(Command::Help),
            Short('V') | Long("version") => return Ok(Command::Version),
            _ => return Err(arg.unexpected().into()),
        }
    }

    // Every missing required option in one message.
    let missing: Vec<&str> = [
        (endpoint.is_none(), "-e/--endpoint"),
        (client_id.is_none(), "-i/--id"),
        (rootca.is_none(), "-r/--rootca"),
        (cert.is_none(), "-c/--cert"),
        (key.is_none(), "-k/--key"),
    ]
    .iter()
    .filter_map(|&(absent, name)| absent.then_some(name))
    .collect();
    let (Some(endpoint), Some(client_id), Some(rootca), Some(cert), Some(key)) =
        (endpoint, client_id, rootca, cert, key)
    else {
        let plural = if missing.len() > 1 { "s" } else { "" };
        return Err(UsageError(format!(
            "missing required option{plural} {}",
            missing.join(", ")
        )));
    };
    let config = Config {
        endpoint,
        port,
        client_id,
        rootca,
        cert,
        key,
        keepalive,
        interface_name,
        socket_dir,
        persistent_session,
        max_backoff,
        mqtt,
        session_expiry,
        drain,
        spool_dir,
        spool_size,
        spool_sync_ms,
    };
    validate(&config)?;
    Ok(Command::Run(Box::new(config)))
}

fn string(parser: &mut lexopt::Parser, name: &str) -> Result<String, UsageError> {
    let value = parser.value()?;
    value
        .into_string()
        .map_err(|_| UsageError(format!("--{name}: the value is not valid UTF-8")))
}

fn number<T>(parser: &mut lexopt::Parser, name: &str, min: T, max: T) -> Result<T, UsageError>
where
    T: std::str::FromStr + PartialOrd + fmt::Display + Copy,
{
    let text = string(parser, name)?;
    match text.parse::<T>() {
        Ok(v) if (min..=max).contains(&v) => Ok(v),
        _ => Err(UsageError(format!(
            "--{name}: {text:?} is not a whole number from {min} to {max}"
        ))),
    }
}

/// A size: a whole number of bytes, or with a suffix K, M or G (powers of
/// 1024), from 1 MiB to 4 GiB.
fn size(parser: &mut lexopt::Parser, name: &str) -> Result<u64, UsageError> {
    let text = string(parser, name)?;
    let (digits, unit) = match text.char_indices().last() {
        Some((i, 'K' | 'k')) => (&text[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&text[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&text[..i], 1 << 30),
        _ => (text.as_str(), 1),
    };
    match digits.parse::<u64>().ok().and_then(|n| n.checked_mul(unit)) {
        Some(v) if (1 << 20..=4 << 30).contains(&v) => Ok(v),
        _ => Err(UsageError(format!(
            "--{name}: {text:?} is not a size from 1M to 4G (bytes, or with K, M or G)"
        ))),
    }
}

fn validate(config: &Config) -> Result<(), UsageError> {
    let fail = |msg: String| Err(UsageError(msg));
    if config.endpoint.is_empty() {
        return fail("--endpoint: the host name is empty".into());
    }
    if config.endpoint.contains('/') || config.endpoint.contains(':') && !is_ip(&config.endpoint) {
        return fail(format!(
            "--endpoint: {:?} is not a host name (give the port with --port)",
            config.endpoint
        ));
    }
    let id = &config.client_id;
    // Extra connections append "_N"; keep room for the longest suffix.
    let suffix = if crate::consts::MAX_CONNECTIONS > 1 {
        1 + (crate::consts::MAX_CONNECTIONS - 1).to_string().len()
    } else {
        0
    };
    if id.is_empty() || id.len() + suffix > MAX_CLIENT_ID_LEN {
        return fail(format!(
            "--id: the client id must be 1 to {} bytes long (AWS IoT Core allows {MAX_CLIENT_ID_LEN})",
            MAX_CLIENT_ID_LEN - suffix
        ));
    }
    if id.contains('\0') {
        return fail("--id: the client id contains a NUL character".into());
    }
    bus_socket_path(&config.socket_dir, &config.interface_name).map_err(UsageError)?;
    Ok(())
}

/// The socket `<socket_dir>/<interface_name>` [bus-sock-1], checked: the
/// name is an interface name and the path fits a Unix socket address. The
/// error names the option or the path (the daemon's and iotcorectl's).
pub fn bus_socket_path(socket_dir: &Path, interface_name: &str) -> Result<PathBuf, String> {
    if socket_dir.as_os_str().is_empty() {
        // An empty directory would bind in the current directory.
        return Err("--socket-dir: the directory is empty".into());
    }
    if !bus::is_interface_name(interface_name) {
        return Err(format!(
            "--interface_name: {interface_name:?} must be 1 to {MAX_INTERFACE_NAME_LEN} bytes without '/' (nor '.' or '..')"
        ));
    }
    let path = socket_dir.join(interface_name);
    if path.as_os_str().len() > MAX_SOCKET_PATH_LEN {
        return Err(format!(
            "the bus socket path {} is longer than {MAX_SOCKET_PATH_LEN} bytes",
            path.display()
        ));
    }
    Ok(path)
}

fn is_ip(host: &str) -> bool {
    host.parse::<std::net::IpAddr>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: [&str; 10] = [
        "-e",
        "example.com",
        "-i",
        "dev1",
        "-r",
        "ca.pem",
        "-c",
        "c.pem",
        "-k",
        "c.key",
    ];

    fn parse_with(extra: &[&str]) -> Result<Command, UsageError> {
        parse(BASE.iter().chain(extra).copied())
    }

    fn config(extra: &[&str]) -> Config {
        match parse_with(extra) {
            Ok(Command::Run(c)) => *c,
            other => panic!("expected a config, got {other:?}"),
        }
    }

    #[test]
    fn short_options_fill_every_required_field_and_defaults_apply() {
        let c = config(&[]);
        assert_eq!(c.endpoint, "example.com");
        assert_eq!(c.client_id, "dev1");
        assert_eq!(c.rootca, PathBuf::from("ca.pem"));
        assert_eq!(c.cert, PathBuf::from("c.pem"));
        assert_eq!(c.key, Key::File(PathBuf::from("c.key")));
        assert_eq!(c.port, 8883);
        assert_eq!(c.keepalive, 60);
        assert_eq!(
            c.socket_path(),
            PathBuf::from("/run/greengrass/aws_iot_mqtt")
        );
    }

    #[test]
    fn a_key_is_a_file_or_a_pkcs11_uri() {
        let uri = "pkcs11:token=iot;object=k?pin-value=9876";
        let c = config(&["-k", uri]);
        match &c.key {
            Key::Pkcs11(u) => assert_eq!(u.object.as_deref(), Some("k")),
            other => panic!("{other:?}"),
        }
        assert_eq!(c.key.to_string(), "pkcs11:token=iot;object=k?pin-value=***");
        assert!(!format!("{c:?}").contains("9876"));
        // A file whose name starts like a URI is given with a directory.
        assert_eq!(
            config(&["-k", "./pkcs11:k"]).key,
            Key::File(PathBuf::from("./pkcs11:k"))
        );
        // A malformed URI is a usage error naming the attribute, not the PIN.
        let e = parse_with(&["-k", "pkcs11:tokn=a?pin-value=9876"]).unwrap_err();
        assert_eq!(
            e.0,
            "-k/--key: bad PKCS#11 URI: unknown path attribute \"tokn\""
        );
        // Bytes that are not UTF-8: refused, the value not repeated.
        use std::os::unix::ffi::OsStringExt;
        let mut args: Vec<OsString> = BASE.iter().map(OsString::from).collect();
        args.push("-k".into());
        args.push(OsString::from_vec(
            b"PKCS11:token=\xe9?pin-value=9876".to_vec(),
        ));
        let e = parse(args).unwrap_err();
        assert!(e.0.contains("not UTF-8"), "{e}");
        assert!(!e.0.contains("9876"), "{e}");
    }

    #[test]
    fn long_options_are_equivalent_to_short_ones() {
        let long = parse([
            "--endpoint=example.com",
            "--id",
            "dev1",
            "--rootca",
            "ca.pem",
            "--cert",
            "c.pem",
            "--key",
            "c.key",
        ]);
        assert_eq!(long, parse_with(&[]));
    }

    #[test]
    fn each_required_option_missing_is_a_usage_error_naming_it() {
        // [iotcored-param-*-3]: every one of the five is required.
        for (i, name) in ["endpoint", "id", "rootca", "cert", "key"]
            .iter()
            .enumerate()
        {
            let mut args: Vec<&str> = BASE.to_vec();
            args.drain(i * 2..i * 2 + 2);
            let err = parse(args).unwrap_err();
            assert!(err.0.contains(name), "{err} should name --{name}");
        }
    }

    #[test]
    fn every_missing_required_option_is_named_in_one_message() {
        let err = parse(["-e", "example.com", "-c", "cert.pem"]).unwrap_err();
        assert_eq!(
            err.0,
            "missing required options -i/--id, -r/--rootca, -k/--key"
        );
        let err = parse(Vec::<&str>::new()).unwrap_err();
        assert!(err
            .0
            .starts_with("missing required options -e/--endpoint, -i/--id"));
        let mut one: Vec<&str> = BASE.to_vec();
        one.drain(8..10);
        assert_eq!(
            parse(one).unwrap_err().0,
            "missing required option -k/--key"
        );
    }

    #[test]
    fn values_are_quoted_alike_and_ranges_are_the_real_ones() {
        let err = parse_with(&["--max-backoff", "0"]).unwrap_err();
        assert_eq!(
            err.0,
            "--max-backoff: \"0\" is not a whole number from 1 to 3600"
        );
        assert_eq!(
            parse_with(&["--bogus"]).unwrap_err().0,
            "unknown option \"--bogus\""
        );
        assert_eq!(
            parse_with(&["stray"]).unwrap_err().0,
            "unexpected argument \"stray\""
        );
        assert_eq!(
            parse_with(&["--port"]).unwrap_err().0,
            "--port: a value is missing"
        );
        assert_eq!(
            parse_with(&["--persistent-session=yes"]).unwrap_err().0,
            "--persistent-session: takes no value (got \"yes\")"
        );
    }

    #[test]
    fn an_empty_socket_dir_is_refused() {
        let err = parse_with(&["--socket-dir", ""]).unwrap_err();
        assert_eq!(err.0, "--socket-dir: the directory is empty");
    }

    #[test]
    fn optional_settings_are_parsed() {
        let c = config(&[
            "--port",
            "443",
            "--keepalive",
            "5",
            "-n",
            "mqtt2",
            "--socket-dir",
            "/tmp/x",
        ]);
        assert_eq!(c.port, 443);
        assert_eq!(c.keepalive, 5);
        assert!(c.keepalive_outside_aws_range());
        assert_eq!(c.socket_path(), PathBuf::from("/tmp/x/mqtt2"));
        assert!(!c.persistent_session);
        assert!(config(&["--persistent-session"]).persistent_session);
        assert!(!config(&["--keepalive", "1200"]).keepalive_outside_aws_range());
    }

    #[test]
    fn bad_numbers_unknown_options_and_stray_values_are_usage_errors() {
        for extra in [
            &["--port", "0"][..],
            &["--port", "65536"],
            &["--port", "x"],
            &["--keepalive", "0"],
            &["--keepalive", "-5"],
            &["--bogus"],
            &["stray"],
            &["--port"],
        ] {
            assert!(parse_with(extra).is_err(), "{extra:?} should be refused");
        }
    }

    #[test]
    fn help_and_version_win_over_missing_options() {
        assert_eq!(parse(["-h"]), Ok(Command::Help));
        assert_eq!(parse(["--version"]), Ok(Command::Version));
    }

    #[test]
    fn client_id_over_the_aws_limit_is_refused() {
        // consts::MAX_CONNECTIONS is 3 in tests, so "_2" must still fit.
        let long = "x".repeat(MAX_CLIENT_ID_LEN - 2);
        assert!(parse_with(&["-i", &long]).is_ok());
        let too_long = "x".repeat(MAX_CLIENT_ID_LEN - 1);
        assert!(parse_with(&["-i", &too_long]).is_err());
        assert!(parse_with(&["-i", ""]).is_err());
    }

    #[test]
    fn socket_path_that_cannot_fit_a_unix_address_is_refused() {
        let dir = format!("/{}", "d".repeat(100));
        let err = parse_with(&["--socket-dir", &dir]).unwrap_err();
        assert!(err.0.contains("aws_iot_mqtt"), "{err}");
        assert!(parse_with(&["-n", &"n".repeat(51)]).is_err());
        assert!(parse_with(&["-n", "a/b"]).is_err());
    }

    #[test]
    fn endpoint_with_a_port_or_scheme_is_refused_but_ipv6_literals_are_fine() {
        assert!(parse_with(&["-e", "example.com:8883"]).is_err());
        assert!(parse_with(&["-e", "mqtts://example.com"]).is_err());
        assert_eq!(config(&["-e", "::1"]).endpoint, "::1");
    }
}
