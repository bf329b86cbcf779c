//! End to end: the client key on a PKCS#11 token. SoftHSM2 is the token (a
//! real PKCS#11 module, loaded by the real binary), `pkcs11-tool` (OpenSC)
//! imports the keys, and the real mosquitto checks the TLS client
//! signature over TLS 1.2 and 1.3. No mock of the module anywhere.
//!
//! Each test has a SoftHSM2 configuration and token directory of its own
//! (SOFTHSM2_CONF), so tests run in parallel without seeing each other's
//! tokens.
//!
//! Built without the `pkcs11` feature (`make test` runs this file that way
//! too) only the tests of what such a build does with a URI run.

// Helpers the build without the feature does not use.
#![cfg_attr(not(feature = "pkcs11"), allow(dead_code, unused_imports))]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::bus::{is_null, publish_params, BusClient};
use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_iotcored");
const SECS: fn(u64) -> Duration = Duration::from_secs;
const EXIT_ERROR: i32 = 1;
const EXIT_USAGE: i32 = 2;

/// The user PIN of every test token: distinctive, so that a test can tell
/// it never appears in what iotcored prints.
const PIN: &str = "71932468";
const SO_PIN: &str = "5678";

/// SoftHSM2's module, where Debian installs it.
fn softhsm_module() -> PathBuf {
    [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib/arm-linux-gnueabihf/softhsm/libsofthsm2.so",
        "/usr/lib64/pkcs11/libsofthsm2.so",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .expect("SoftHSM2 is installed (apt-get install softhsm2; make deps does it)")
}

/// A SoftHSM2 of the test's own.
struct Hsm {
    dir: TestDir,
    conf: PathBuf,
    module: PathBuf,
}

impl Hsm {
    fn new() -> Hsm {
        let dir = TestDir::new("softhsm");
        let tokens = dir.join("tokens");
        std::fs::create_dir_all(&tokens).expect("tokens dir");
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .expect("write softhsm2.conf");
        Hsm {
            dir,
            conf,
            module: softhsm_module(),
        }
    }

    fn run(&self, program: &str, args: &[&str]) -> String {
        let out = Command::new(program)
            .args(args)
            .env("SOFTHSM2_CONF", &self.conf)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{program} {args:?} failed:\n{text}");
        text
    }

    /// A new token with the test PIN.
    fn init_token(&self, label: &str) {
        self.init_token_with_pin(label, PIN);
    }

    fn init_token_with_pin(&self, label: &str, pin: &str) {
        self.run(
            "softhsm2-util",
            &[
                "--init-token",
                "--free",
                "--label",
                label,
                "--pin",
                pin,
                "--so-pin",
                SO_PIN,
            ],
        );
    }

    fn delete_token(&self, label: &str) {
        self.run("softhsm2-util", &["--delete-token", "--token", label]);
    }

    /// Imports a PEM private key with pkcs11-tool.
    fn import(&self, token: &str, key: &Path, id: &str, label: &str) {
        self.import_with(token, key, id, label, &[]);
    }

    /// `import` with more pkcs11-tool options (e.g. `--always-auth`).
    fn import_with(&self, token: &str, key: &Path, id: &str, label: &str, more: &[&str]) {
        let module = self.module.display().to_string();
        let key = key.display().to_string();
        let mut args = vec![
            "--module",
            &module,
            "--token-label",
            token,
            "--login",
            "--pin",
            PIN,
            "--write-object",
            &key,
            "--type",
            "privkey",
            "--id",
            id,
            "--label",
            label,
        ];
        args.extend_from_slice(more);
        self.run("pkcs11-tool", &args);
    }

    /// A URI with `path` attributes, this module and the PIN in it.
    fn uri(&self, path: &str) -> String {
        format!(
            "pkcs11:{path}?module-path={}&pin-value={PIN}",
            self.module.display()
        )
    }

    /// The daemon with the certificate `cert` of the PKI and `key`.
    fn daemon(&self, port: u16, id: &str, cert: &str, key: &str) -> Daemon {
        let pki = Pki::get();
        Daemon::builder(BIN)
            .args([
                "-e".to_string(),
                "127.0.0.1".into(),
                "-i".into(),
                id.into(),
                "-r".into(),
                pki.path("ca.pem").display().to_string(),
                "-c".into(),
                pki.path(cert).display().to_string(),
                "-k".into(),
                key.into(),
                "--port".into(),
                port.to_string(),
                "--socket-dir".into(),
                ".".into(),
                "--max-backoff".into(),
                "2".into(),
            ])
            .env("SOFTHSM2_CONF", &self.conf)
            .start()
    }
}

/// A token "iot" with the PKI's client keys: EC P-256 (id 01, "ec"), RSA
/// 2048 (id 02, "rsa"), EC P-384 (id 03, "p384").
fn hsm_with_keys() -> Hsm {
    let hsm = Hsm::new();
    let pki = Pki::get();
    hsm.init_token("iot");
    hsm.import("iot", &pki.path("client.key"), "01", "ec");
    hsm.import("iot", &pki.path("client-rsa.key"), "02", "rsa");
    hsm.import("iot", &pki.path("client-p384.key"), "03", "p384");
    hsm
}

fn exit_code(d: &mut Daemon) -> i32 {
    let status = d
        .wait_exit(SECS(15))
        .unwrap_or_else(|| panic!("iotcored still running; log:\n{}", d.log()));
    status.code().expect("exited by a signal")
}

/// Publishes through the daemon's bus and sees the message at a broker-side
/// subscriber.
fn publish_end_to_end(broker: &Mosquitto, d: &Daemon, topic: &str) {
    let sub = Subscriber::start(broker, topic, 1);
    let mut c = BusClient::connect(&d.dir().join("aws_iot_mqtt"));
    assert!(is_null(&c.call(
        "publish",
        &publish_params(topic, b"signed by the token", 1)
    )));
    assert!(
        sub.wait_lines(1, SECS(10)),
        "{:?}\n{}",
        sub.lines(),
        d.log()
    );
    assert_eq!(sub.lines(), [format!("{topic} signed by the token")]);
}

#[test]
#[cfg(feature = "pkcs11")]
fn rsa_and_ec_keys_on_a_token_authenticate_over_tls_1_2_and_1_3() {
    // [iotcored-param-key-1] with the key on a token: mosquitto verifies
    // the signature the token made, in both TLS versions, for each key
    // type; the key is picked by label or by id.
    let hsm = hsm_with_keys();
    for (tls, version) in [("tlsv1.2", "TLSv1_2"), ("tlsv1.3", "TLSv1_3")] {
        let broker = Mosquitto::builder().tls_version(tls).start();
        for (n, (cert, path, key_line)) in [
            (
                "client.pem",
                "token=iot;object=ec",
                "object=\"ec\" id=%01 (EC P-256)",
            ),
            (
                "client-rsa.pem",
                "token=iot;id=%02",
                "object=\"rsa\" id=%02 (RSA 2048 bits)",
            ),
            (
                "client-p384.pem",
                "object=p384;type=private",
                "object=\"p384\" id=%03 (EC P-384)",
            ),
        ]
        .into_iter()
        .enumerate()
        {
            let id = format!("gw-hsm-{n}-{}", &tls[4..]);
            let d = hsm.daemon(broker.port(), &id, cert, &hsm.uri(path));
            assert!(
                d.wait_log("connected (session present", SECS(15)),
                "{tls} {path}:\n{}\nbroker:\n{}",
                d.log(),
                broker.log()
            );
            let log = d.log();
            assert!(log.contains(key_line), "{log}");
            assert!(
                log.contains(&format!("TLS established ({version})")),
                "{log}"
            );
            assert!(
                broker.log().contains(&format!(" as {id} ")),
                "{}",
                broker.log()
            );
            publish_end_to_end(&broker, &d, &format!("hsm/{n}/{}", &tls[4..]));
            assert!(!d.log().contains(PIN));
        }
    }
}

#[test]
#[cfg(feature = "pkcs11")]
fn rsa_pkcs1_v1_5_signs_when_the_broker_accepts_nothing_else() {
    // OpenSSL prefers PSS; a broker that takes only PKCS #1 v1.5 (TLS 1.2)
    // gets a CKM_RSA_PKCS signature.
    let hsm = hsm_with_keys();
    let broker = Mosquitto::builder()
        .tls_version("tlsv1.2")
        .client_sigalgs("RSA+SHA256:ECDSA+SHA256")
        .start();
    let d = hsm.daemon(
        broker.port(),
        "gw-pkcs1",
        "client-rsa.pem",
        &hsm.uri("token=iot;object=rsa"),
    );
    assert!(
        d.wait_log("connected (session present", SECS(15)),
        "{}\nbroker:\n{}",
        d.log(),
        broker.log()
    );
    assert!(
        d.log()
            .contains("the token signs the handshake with RSA_PKCS1_SHA256"),
        "{}",
        d.log()
    );
    publish_end_to_end(&broker, &d, "hsm/pkcs1");
}

#[test]
#[cfg(feature = "pkcs11")]
fn a_key_that_wants_the_pin_for_every_signature_gets_it() {
    // CKA_ALWAYS_AUTHENTICATE: a context-specific login after each
    // C_SignInit; every reconnect signs again.
    let hsm = Hsm::new();
    hsm.init_token("iot");
    hsm.import_with(
        "iot",
        &Pki::get().path("client.key"),
        "01",
        "ec",
        &["--always-auth"],
    );
    let mut broker = Mosquitto::builder().tls_version("tlsv1.3").start();
    let d = hsm.daemon(
        broker.port(),
        "gw-always",
        "client.pem",
        &hsm.uri("token=iot;object=ec"),
    );
    assert!(
        d.wait_log("connected (session present", SECS(15)),
        "{}",
        d.log()
    );
    broker.restart();
    assert!(
        d.wait_log("reconnected (session present", SECS(20)),
        "{}",
        d.log()
    );
    publish_end_to_end(&broker, &d, "hsm/always");
}

#[test]
#[cfg(feature = "pkcs11")]
fn the_pin_can_come_from_a_file() {
    let hsm = hsm_with_keys();
    let broker = Mosquitto::start();
    let pin = hsm.dir.join("pin");
    // The first line is the PIN; a newline and more lines are allowed.
    std::fs::write(&pin, format!("{PIN}\nnot the pin\n")).unwrap();
    set_mode(&pin, 0o400);
    let uri = format!(
        "pkcs11:token=iot;object=ec?module-path={}&pin-source=file:{}",
        hsm.module.display(),
        pin.display()
    );
    let d = hsm.daemon(broker.port(), "gw-pinfile", "client.pem", &uri);
    assert!(
        d.wait_log("connected (session present", SECS(15)),
        "{}",
        d.log()
    );
    assert!(
        !d.log().contains("can be read by other users"),
        "{}",
        d.log()
    );
    publish_end_to_end(&broker, &d, "hsm/pinfile");
    drop(d);

    // A file others can read works, with a warning.
    set_mode(&pin, 0o644);
    let d = hsm.daemon(broker.port(), "gw-pinfile2", "client.pem", &uri);
    assert!(
        d.wait_log("connected (session present", SECS(15)),
        "{}",
        d.log()
    );
    assert!(
        d.log().contains("can be read by other users (mode 644)"),
        "{}",
        d.log()
    );
}

#[test]
#[cfg(feature = "pkcs11")]
fn without_module_path_p11_kits_proxy_finds_the_token() {
    // The proxy module loads the modules p11-kit is configured with, here
    // SoftHSM2's (/usr/share/p11-kit/modules/softhsm2.module), which reads
    // SOFTHSM2_CONF from the environment it inherits.
    let proxy = [
        "/usr/lib/x86_64-linux-gnu/p11-kit-proxy.so",
        "/usr/lib/aarch64-linux-gnu/p11-kit-proxy.so",
        "/usr/lib/arm-linux-gnueabihf/p11-kit-proxy.so",
        "/usr/lib64/p11-kit-proxy.so",
        "/usr/lib/p11-kit-proxy.so",
    ]
    .iter()
    .find(|p| Path::new(p).exists())
    .expect("p11-kit's proxy module is installed (p11-kit-modules)");
    let hsm = hsm_with_keys();
    let broker = Mosquitto::start();
    let uri = format!("pkcs11:token=iot;object=rsa?pin-value={PIN}");
    let d = hsm.daemon(broker.port(), "gw-proxy", "client-rsa.pem", &uri);
    assert!(
        d.wait_log("connected (session present", SECS(15)),
        "{}",
        d.log()
    );
    assert!(
        d.log().contains(&format!("on module {proxy}")),
        "{}",
        d.log()
    );
}

#[test]
#[cfg(feature = "pkcs11")]
fn start_up_errors_exit_1_naming_the_cause_and_never_the_pin() {
    let hsm = hsm_with_keys();
    hsm.init_token("spare");
    // A P-521 key: a curve TLS here cannot sign with.
    hsm.import("iot", &Pki::get().path("p521.key"), "05", "p521");
    // An RSA key too short for TLS.
    let short = hsm.dir.join("rsa1024.key");
    let out = Command::new("openssl")
        .args(["genrsa", "-out"])
        .arg(&short)
        .arg("1024")
        .stdin(Stdio::null())
        .output()
        .expect("openssl");
    assert!(out.status.success());
    hsm.import("iot", &short, "06", "rsa1024");
    // A P-256 key, like client.pem's, but not its.
    hsm.import("iot", &Pki::get().path("other.key"), "07", "other");
    let m = hsm.module.display().to_string();
    let pin_file = hsm.dir.join("empty-pin");
    std::fs::write(&pin_file, "\n").unwrap();
    // A shared library that is not a PKCS#11 module: zlib, which Debian
    // always has, in the multiarch directory of this build's architecture
    // (a machine with foreign architectures added has several).
    let multiarch = if cfg!(target_arch = "x86_64") {
        "x86_64-linux-gnu"
    } else if cfg!(target_arch = "aarch64") {
        "aarch64-linux-gnu"
    } else {
        "arm-linux-gnueabihf"
    };
    let not_module = ["/lib", "/usr/lib"]
        .iter()
        .map(|d| Path::new(d).join(multiarch).join("libz.so.1"))
        .find(|p| p.exists())
        .expect("zlib (libz.so.1) in this architecture's multiarch directory")
        .display()
        .to_string();

    let mut cases = vec![
        (
            "client.pem".to_string(),
            format!("pkcs11:token=iot;object=ec?module-path=/nonexistent/module.so&pin-value={PIN}"),
            "cannot load the PKCS#11 module /nonexistent/module.so: /nonexistent/module.so: cannot open shared object file".to_string(),
        ),
        (
            "client.pem".into(),
            hsm.uri("token=nope;object=ec"),
            "no token matches the URI; the module has token ".into(),
        ),
        (
            "client.pem".into(),
            hsm.uri("object=ec"),
            "2 tokens match the URI; pick one with token=, serial= or slot-id=".into(),
        ),
        (
            "client.pem".into(),
            format!("pkcs11:token=iot;object=ec?module-path={m}&pin-value={PIN}0"),
            "wrong PIN for token \"iot\"".into(),
        ),
        (
            "client.pem".into(),
            format!("pkcs11:token=iot;object=ec?module-path={m}"),
            "token \"iot\" needs a PIN: add pin-source=file:PATH to the URI".into(),
        ),
        (
            "client.pem".into(),
            format!(
                "pkcs11:token=iot;object=ec?module-path={m}&pin-source=file:{}",
                pin_file.display()
            ),
            format!("the PIN file {} is empty", pin_file.display()),
        ),
        (
            "client.pem".into(),
            format!(
                "pkcs11:token=iot;object=ec?module-path={m}&pin-source=file:/nonexistent/pin"
            ),
            "cannot open the PIN file /nonexistent/pin".into(),
        ),
        (
            "client.pem".into(),
            hsm.uri("token=iot;object=nope"),
            "no private key on token \"iot\" matches the URI; the token has ".into(),
        ),
        (
            "client.pem".into(),
            hsm.uri("token=iot;id=%01;object=rsa"),
            "no private key on token \"iot\" matches the URI".into(),
        ),
        (
            "client.pem".into(),
            hsm.uri("token=iot"),
            "6 private keys on token \"iot\" match the URI; pick one with object= or id=".into(),
        ),
        (
            "client.pem".into(),
            hsm.uri("token=iot;object=p521"),
            "iotcored signs for TLS with EC keys on P-256 or P-384 only".into(),
        ),
        (
            "client.pem".into(),
            hsm.uri("token=iot;object=rsa1024"),
            "an RSA key of 1024 bits cannot sign for TLS".into(),
        ),
        (
            "client.pem".into(),
            hsm.uri("token=iot;object=rsa"),
            format!(
                "does not match the certificate in {}",
                Pki::get().path("client.pem").display()
            ),
        ),
        (
            "client-rsa.pem".into(),
            hsm.uri("token=iot;object=p384"),
            "does not match the certificate".into(),
        ),
        (
            "client.pem".into(),
            hsm.uri("token=iot;object=other"),
            format!(
                "does not match the certificate in {}",
                Pki::get().path("client.pem").display()
            ),
        ),
    ];
    cases.push((
        "client.pem".into(),
        format!("pkcs11:token=iot?module-path={not_module}&pin-value={PIN}"),
        "not a PKCS#11 module: it has no C_GetFunctionList".into(),
    ));
    let token_listed = "token \"iot\" (serial ";
    for (cert, uri, want) in cases {
        let mut d = hsm.daemon(free_port(), "gw-hsm-err", &cert, &uri);
        let code = exit_code(&mut d);
        let log = d.log();
        assert_eq!(code, EXIT_ERROR, "{uri}: {log}");
        assert!(log.contains("iotcored: key pkcs11:"), "{uri}: {log}");
        assert!(log.contains(&want), "{uri}: wanted {want:?} in\n{log}");
        if want.contains("the module has token") {
            assert!(log.contains(token_listed), "{log}");
        }
        assert!(!log.contains(PIN), "{uri}: the PIN is in\n{log}");
        assert!(
            log.contains("pin-value=***") || !uri.contains("pin-value"),
            "{log}"
        );
    }
}

#[test]
fn a_malformed_uri_is_a_usage_error_that_names_the_attribute() {
    let hsm = Hsm::new();
    for (uri, want) in [
        ("pkcs11:token=iot;tokn=x", "unknown path attribute \"tokn\""),
        (
            "pkcs11:token=iot;type=cert",
            "type=cert: -k names the private key",
        ),
        (
            "pkcs11:id=%zz",
            "id: \"%\" must be followed by two hex digits",
        ),
        (
            "pkcs11:token=iot?pin-value=71932468&pin-value=71932468",
            "pin-value is given twice",
        ),
        (
            "pkcs11:token=iot?pin-value=71932468&pin-source=file:/p",
            "give the PIN once",
        ),
    ] {
        let mut d = hsm.daemon(free_port(), "gw-hsm-uri", "client.pem", uri);
        let code = exit_code(&mut d);
        let log = d.log();
        assert_eq!(code, EXIT_USAGE, "{uri}: {log}");
        assert!(log.contains("-k/--key: bad PKCS#11 URI: "), "{log}");
        assert!(log.contains(want), "{uri}: wanted {want:?} in\n{log}");
        assert!(!log.contains(PIN), "{log}");
    }
}

#[test]
#[cfg(feature = "pkcs11")]
fn a_token_that_goes_away_is_a_connection_failure_and_iotcored_carries_on_when_it_is_back() {
    // A signature that fails during a handshake is retried with backoff
    // (not an authentication failure, which would exit 3); once the token
    // is back, the module is initialized again, the session reopened, the
    // user logged in again, and the connection made.
    let hsm = hsm_with_keys();
    let mut broker = Mosquitto::start();
    let mut d = hsm.daemon(
        broker.port(),
        "gw-hsm-reset",
        "client.pem",
        &hsm.uri("token=iot;object=ec"),
    );
    assert!(
        d.wait_log("connected (session present", SECS(15)),
        "{}",
        d.log()
    );

    hsm.delete_token("iot");
    broker.restart();
    assert!(
        d.wait_log_count("PKCS#11 signature failed", 2, SECS(20)),
        "{}",
        d.log()
    );
    assert!(d.is_running(), "{}", d.log());
    assert!(
        d.log().contains("PKCS#11: the session failed"),
        "{}",
        d.log()
    );
    assert!(!d.log().contains("authentication failed"), "{}", d.log());

    // The same token again: a token reset, as far as iotcored can tell.
    hsm.init_token("iot");
    hsm.import("iot", &Pki::get().path("client.key"), "01", "ec");
    assert!(
        d.wait_log("reconnected (session present", SECS(20)),
        "{}",
        d.log()
    );
    assert!(
        d.log()
            .contains("PKCS#11: session opened again; private key object=\"ec\""),
        "{}",
        d.log()
    );
    publish_end_to_end(&broker, &d, "hsm/after-reset");
    assert!(d.is_running());
}

#[test]
#[cfg(not(feature = "pkcs11"))]
fn a_build_without_the_feature_refuses_a_uri_at_start_up() {
    // The URI is checked (a malformed one is still a usage error, above),
    // then refused with what to do instead; the PEM path works as ever.
    let hsm = Hsm::new();
    let mut d = hsm.daemon(
        free_port(),
        "gw-nohsm",
        "client.pem",
        &hsm.uri("token=iot;object=ec"),
    );
    assert_eq!(exit_code(&mut d), EXIT_ERROR, "{}", d.log());
    let log = d.log();
    assert!(
        log.contains("this iotcored was built without PKCS#11 support (cargo feature pkcs11): give a PEM key file"),
        "{log}"
    );
    assert!(log.contains("pin-value=***"), "{log}");
    assert!(!log.contains(PIN), "{log}");
    let broker = Mosquitto::start();
    let pem = Pki::get().path("client.key").display().to_string();
    let d = hsm.daemon(broker.port(), "gw-nohsm-pem", "client.pem", &pem);
    assert!(
        d.wait_log("connected (session present", SECS(15)),
        "{}",
        d.log()
    );
}

#[test]
#[cfg(feature = "pkcs11")]
fn a_pin_the_token_refuses_after_start_up_is_not_offered_again() {
    // The token comes back with another PIN (re-provisioned): one login is
    // refused, and iotcored then stops offering the PIN (a TPM or a card
    // would lock it after a few), says so at every attempt, and keeps
    // running.
    let hsm = hsm_with_keys();
    let mut broker = Mosquitto::start();
    let d = hsm.daemon(
        broker.port(),
        "gw-hsm-repin",
        "client.pem",
        &hsm.uri("token=iot;object=ec"),
    );
    assert!(
        d.wait_log("connected (session present", SECS(15)),
        "{}",
        d.log()
    );
    hsm.delete_token("iot");
    hsm.init_token_with_pin("iot", "24681357");
    broker.restart();
    assert!(
        d.wait_log_count("does not offer it again", 2, SECS(30)),
        "{}",
        d.log()
    );
    let log = d.log();
    // One login refused, then none tried.
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("PKCS#11 signature failed: wrong PIN for token \"iot\""))
        .collect();
    assert_eq!(refused.len(), 1, "{refused:#?}");
    assert!(!log.contains("authentication failed"), "{log}");
    assert!(!log.contains(PIN), "{log}");
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}
