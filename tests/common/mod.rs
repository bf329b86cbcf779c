//! End-to-end test harness: a throw-away PKI, a real mosquitto broker, MQTT
//! clients (mosquitto_sub / mosquitto_pub), a fault-injecting TCP proxy, the
//! daemon under test, and a scripted TLS mock broker for protocol corners a
//! real broker cannot produce.
//!
//! Invariants:
//! - Everything listens on and connects to 127.0.0.1 only.
//! - Every wait is bounded; a helper that cannot reach its goal in time
//!   panics with the relevant log, or returns `false` / `None` for the test
//!   to assert on.
//! - Every process is stopped by its own pid when its guard drops (SIGTERM,
//!   SIGKILL after 2 s, then reaped); every thread is joined.
//! - Temporary files live in a per-guard directory under
//!   `CARGO_TARGET_TMPDIR`, removed on drop. When the test is already
//!   panicking, a guard prints the tail of its log to stderr first, so a
//!   failing test shows what the broker and the daemon saw.
#![allow(dead_code)]

pub mod bus;

use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};

/// How long a process gets between SIGTERM and SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(2);
/// How long a broker or a subscriber gets to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one mosquitto_pub run may take.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll period of the waiting helpers and of the proxy's threads.
const POLL: Duration = Duration::from_millis(10);
/// Lines of a log printed when a guard drops during a panic.
const LOG_TAIL_LINES: usize = 80;

// ---------------------------------------------------------------------------
// Waiting

/// Polls `cond` every 10 ms until it holds or `timeout` passes; returns
/// whether it held. `cond` is always evaluated at least once.
pub fn wait_until(timeout: Duration, cond: impl FnMut() -> bool) -> bool {
    wait_every(timeout, POLL, cond)
}

/// Polls `cond` every `period` until it holds or `timeout` passes.
pub fn wait_every(timeout: Duration, period: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(period);
    }
}

// ---------------------------------------------------------------------------
// Temporary directories

/// A directory under `CARGO_TARGET_TMPDIR`, unique per test process, guard
/// and test (`<test>-<what>-<pid>-<counter>`), removed on drop.
///
/// Names are kept short because the daemon may put Unix sockets here
/// (`sun_path` holds 108 bytes).
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    /// Creates a fresh directory; `what` names the guard that owns it.
    pub fn new(what: &str) -> TestDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!(
            "{}-{}-{}-{}",
            sanitize(&current_test_name(), 24),
            sanitize(what, 16),
            std::process::id(),
            n
        );
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TestDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// The running test's name: libtest names each test's thread after it.
fn current_test_name() -> String {
    let name = thread::current().name().unwrap_or("test").to_string();
    // Keep the function name, drop the module path.
    name.rsplit("::").next().unwrap_or("test").to_string()
}

fn sanitize(s: &str, max: usize) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(max)
        .collect()
}

// ---------------------------------------------------------------------------
// Logs and processes

/// Reads a log file as text (lossy: client ids and payloads may be any bytes);
/// a missing file reads as empty.
fn read_log(path: &Path) -> String {
    match fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => String::new(),
    }
}

/// A guard whose process writes a log file (stdout and stderr): the
/// broker's (every run of it) or the daemon's. Reading, counting and
/// waiting for a needle are the same for both.
pub trait Logged {
    /// The log file.
    fn log_path(&self) -> &Path;

    /// Everything written to the log so far.
    fn log(&self) -> String {
        read_log(self.log_path())
    }

    /// How many times `needle` occurs in the log.
    fn count_log(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }

    /// Waits until the log contains `needle`.
    fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        self.wait_log_count(needle, 1, timeout)
    }

    /// Waits until the log contains `needle` at least `n` times.
    fn wait_log_count(&self, needle: &str, n: usize, timeout: Duration) -> bool {
        wait_until(timeout, || self.count_log(needle) >= n)
    }

    /// When the test is already panicking, prints the last lines of the log
    /// to stderr under the title `what`; each guard does as it drops.
    fn dump_tail_if_panicking(&self, what: &str) {
        if thread::panicking() {
            dump_tail(what, self.log_path());
        }
    }
}

/// Prints the last lines of a log to stderr; used by guards dropped in a
/// panicking test (libtest shows a failed test's stderr).
fn dump_tail(what: &str, path: &Path) {
    let text = read_log(path);
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(LOG_TAIL_LINES);
    let mut out = format!(
        "----- {what}: {} (last {} lines) -----\n",
        path.display(),
        lines.len() - start
    );
    for line in &lines[start..] {
        let _ = writeln!(out, "{line}");
    }
    out.push_str("-----\n");
    eprint!("{out}");
}

/// Sends `sig` to `pid`.
fn send_signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) has no memory-safety preconditions. The pid is our
        // own unreaped child, so it cannot have been recycled.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// Waits up to `timeout` for `child` to exit, reaping it.
fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let mut status = None;
    wait_until(timeout, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    status
}

/// Stops `child`: SIGTERM, SIGKILL after [`TERM_GRACE`], then reaps it.
fn terminate(child: &mut Child) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    send_signal(child.id(), libc::SIGTERM);
    if let Some(status) = wait_child(child, TERM_GRACE) {
        return Some(status);
    }
    let _ = child.kill();
    child.wait().ok()
}

/// Opens `path` for appending, for a child's stdout and stderr.
fn log_stdio(path: &Path) -> (Stdio, Stdio) {
    let file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    let err = file.try_clone().expect("dup log file");
    (Stdio::from(file), Stdio::from(err))
}

/// Finds a program that may live in an sbin directory not on PATH.
fn program(name: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    PathBuf::from(name)
}

// ---------------------------------------------------------------------------
// PKI

/// The throw-away PKI from `config/dev/gen-pki.sh`, generated once per test
/// process into `$CARGO_TARGET_TMPDIR/pki` (kept between runs; the script
/// skips work when it is complete and serialises concurrent runs).
pub struct Pki {
    dir: PathBuf,
}

/// Every file gen-pki.sh produces; a missing one forces regeneration.
const PKI_FILES: &[&str] = &[
    "ca.pem",
    "ca.key",
    "server.pem",
    "server.key",
    "client.pem",
    "client.key",
    "client-rsa.pem",
    "client-rsa.key",
    "client-ec-sec1.key",
    "client-nonl.pem",
    "client-nonl.key",
    "ca-nonl.pem",
    "client-chain.pem",
    "client-chain.key",
    "client-expired.pem",
    "client-expired.key",
    "untrusted-ca.pem",
    "client-untrusted.pem",
    "client-untrusted.key",
    "server-wronghost.pem",
    "server-wronghost.key",
    "other.key",
];

impl Pki {
    /// The shared PKI, generated on first use.
    pub fn get() -> &'static Pki {
        static PKI: OnceLock<Pki> = OnceLock::new();
        PKI.get_or_init(|| {
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("pki");
            run_gen_pki(&dir, false);
            if PKI_FILES.iter().any(|f| !dir.join(f).exists()) {
                // Left by an older version of the script.
                run_gen_pki(&dir, true);
            }
            Pki { dir }
        })
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of one file, e.g. `pki.path("client.pem")`; panics if absent.
    pub fn path(&self, name: &str) -> PathBuf {
        let p = self.dir.join(name);
        assert!(p.exists(), "no PKI file {}", p.display());
        p
    }
}

fn run_gen_pki(dir: &Path, force: bool) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/dev/gen-pki.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(&script);
    if force {
        cmd.arg("--force");
    }
    let out = cmd
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed ({}):\n{}{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bind port 0, read,
/// close). Racy by nature; prefer guards that bind port 0 themselves.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// Whether some socket listens on 127.0.0.1:`port` (or on any address),
/// read from /proc/net/tcp without connecting, so broker logs stay clean.
/// `None` if /proc is unavailable.
fn tcp_listening(port: u16) -> Option<bool> {
    let table = fs::read_to_string("/proc/net/tcp").ok()?;
    let want = [
        format!("0100007F:{port:04X}"),
        format!("00000000:{port:04X}"),
    ];
    Some(table.lines().skip(1).any(|line| {
        let mut cols = line.split_whitespace();
        let local = cols.nth(1).unwrap_or("");
        let state = cols.nth(1).unwrap_or("");
        state == "0A" && want.iter().any(|w| w == local)
    }))
}

// ---------------------------------------------------------------------------
// mosquitto

/// Options for a [`Mosquitto`] broker with one TLS listener on 127.0.0.1.
#[derive(Clone, Debug)]
pub struct MosquittoBuilder {
    port: Option<u16>,
    require_certificate: bool,
    use_identity_as_username: bool,
    password_file: bool,
    server_cert: Option<(PathBuf, PathBuf)>,
    tls_version: Option<String>,
    extra: Vec<String>,
}

impl Default for MosquittoBuilder {
    fn default() -> Self {
        MosquittoBuilder {
            port: None,
            require_certificate: true,
            use_identity_as_username: true,
            password_file: false,
            server_cert: None,
            tls_version: None,
            extra: Vec::new(),
        }
    }
}

impl MosquittoBuilder {
    /// Listen on this port instead of a free one.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Whether clients must present a certificate signed by ca.pem (default true).
    pub fn require_certificate(mut self, yes: bool) -> Self {
        self.require_certificate = yes;
        self
    }

    /// Whether the certificate's CN becomes the username (default true).
    /// When false, clients without a username are let in as anonymous.
    pub fn use_identity_as_username(mut self, yes: bool) -> Self {
        self.use_identity_as_username = yes;
        self
    }

    /// Refuse certificate-only clients with CONNACK 5 (not authorised):
    /// `allow_anonymous false`, a `password_file` holding only an unrelated
    /// user, and no `use_identity_as_username`.
    pub fn password_file_mode(mut self) -> Self {
        self.password_file = true;
        self.use_identity_as_username = false;
        self
    }

    /// Present this certificate and key instead of server.pem/server.key.
    pub fn server_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.server_cert = Some((cert.into(), key.into()));
        self
    }

    /// Allow exactly this TLS version: "tlsv1.2" or "tlsv1.3".
    ///
    /// mosquitto's `tls_version` only sets the minimum, so for "tlsv1.2" the
    /// maximum comes from an OpenSSL config (`MaxProtocol`) passed to the
    /// broker in `OPENSSL_CONF`.
    pub fn tls_version(mut self, version: &str) -> Self {
        self.tls_version = Some(version.to_string());
        self
    }

    /// Append a raw line to the configuration (after the listener, so
    /// listener options apply to it).
    pub fn config_line(mut self, line: &str) -> Self {
        self.extra.push(line.to_string());
        self
    }

    /// Writes the configuration, starts the broker and waits until it listens.
    pub fn start(self) -> Mosquitto {
        let pki = Pki::get();
        let dir = TestDir::new("mosq");
        let log_path = dir.join("mosquitto.log");
        let (cert, key) = self
            .server_cert
            .clone()
            .unwrap_or_else(|| (pki.path("server.pem"), pki.path("server.key")));

        let mut conf = String::new();
        let mut line = |s: String| {
            conf.push_str(&s);
            conf.push('\n');
        };
        line("# written by tests/common/mod.rs".into());
        line("per_listener_settings false".into());
        line("persistence false".into());
        // Started as root, mosquitto would switch to user "mosquitto", which
        // cannot read this test directory; it only switches when root.
        line("user root".into());
        line(format!("log_dest file {}", log_path.display()));
        line("log_type all".into());
        line("connection_messages true".into());
        line("log_timestamp true".into());
        line("log_timestamp_format %Y-%m-%dT%H:%M:%S".into());
        if self.password_file {
            let pw = dir.join("passwd");
            let out = Command::new(program("mosquitto_passwd"))
                .args(["-c", "-b"])
                .arg(&pw)
                .args(["someone-else", "not-the-daemon"])
                .stdin(Stdio::null())
                .output()
                .expect("run mosquitto_passwd");
            assert!(
                out.status.success(),
                "mosquitto_passwd failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            line("allow_anonymous false".into());
            line(format!("password_file {}", pw.display()));
        } else {
            // With use_identity_as_username every client has a username.
            line(format!(
                "allow_anonymous {}",
                !self.use_identity_as_username
            ));
        }
        line(format!("listener {PORT_MARK} 127.0.0.1"));
        line(format!("cafile {}", pki.path("ca.pem").display()));
        line(format!("certfile {}", cert.display()));
        line(format!("keyfile {}", key.display()));
        line(format!("require_certificate {}", self.require_certificate));
        line(format!(
            "use_identity_as_username {}",
            self.use_identity_as_username
        ));
        let mut openssl_conf = None;
        if let Some(v) = &self.tls_version {
            line(format!("tls_version {v}"));
            let max = match v.as_str() {
                "tlsv1.2" => Some("TLSv1.2"),
                "tlsv1.1" => Some("TLSv1.1"),
                _ => None,
            };
            if let Some(max) = max {
                let path = dir.join("openssl.cnf");
                let text = format!(
                    "openssl_conf = conf\n[conf]\nssl_conf = ssl\n[ssl]\n\
                     system_default = tls\n[tls]\nMaxProtocol = {max}\n"
                );
                fs::write(&path, text).expect("write openssl.cnf");
                openssl_conf = Some(path);
            }
        }
        for extra in &self.extra {
            line(extra.clone());
        }
        let mut broker = Mosquitto {
            port: 0,
            conf_path: dir.join("mosquitto.conf"),
            log_path,
            stderr_path: dir.join("mosquitto.stderr"),
            openssl_conf,
            child: None,
            dir,
        };
        // A port from free_port() may be taken before mosquitto binds it:
        // then try another one.
        let attempts = if self.port.is_some() { 1 } else { 3 };
        for attempt in 1..=attempts {
            broker.port = self.port.unwrap_or_else(free_port);
            let text = conf.replace(PORT_MARK, &broker.port.to_string());
            fs::write(&broker.conf_path, text).expect("write mosquitto.conf");
            match broker.spawn() {
                Ok(()) => return broker,
                Err(e) if attempt == attempts => panic!("{e}"),
                Err(_) => {}
            }
        }
        unreachable!("the last attempt panics")
    }
}

/// Stands for the port in the configuration text until a port is chosen.
const PORT_MARK: &str = "@PORT@";

/// A running mosquitto broker (see [`MosquittoBuilder`]).
///
/// Its log file is kept across [`Mosquitto::restart`]: mosquitto appends, so
/// [`Logged::log`] shows every run. Compare [`Mosquitto::count_log`]
/// before and after to look only at what happened since.
pub struct Mosquitto {
    port: u16,
    conf_path: PathBuf,
    log_path: PathBuf,
    stderr_path: PathBuf,
    openssl_conf: Option<PathBuf>,
    child: Option<Child>,
    dir: TestDir,
}

impl Logged for Mosquitto {
    fn log_path(&self) -> &Path {
        &self.log_path
    }
}

impl Mosquitto {
    /// Starts a broker with the default options.
    pub fn start() -> Mosquitto {
        MosquittoBuilder::default().start()
    }

    /// Options for a broker.
    pub fn builder() -> MosquittoBuilder {
        MosquittoBuilder::default()
    }

    /// The listener's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The broker's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the broker process is alive.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The per-broker temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// SIGKILL, as in a crash: no DISCONNECT, no orderly TLS close.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM (SIGKILL after 2 s) and wait.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child);
        }
    }

    /// Stops the broker if it runs, then starts it again on the same port
    /// with the same configuration; the log file is appended to.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(e) = self.spawn() {
            panic!("{e}");
        }
    }

    fn spawn(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "mosquitto already running");
        let ready_before = self.count_running();
        let (out, err) = log_stdio(&self.stderr_path);
        let mut cmd = Command::new(program("mosquitto"));
        if let Some(conf) = &self.openssl_conf {
            cmd.env("OPENSSL_CONF", conf);
        }
        let mut child = cmd
            .arg("-c")
            .arg(&self.conf_path)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn mosquitto (is it installed?)");
        // mosquitto logs "running" after it bound its listeners. The port can
        // be taken again right after a stop (SO_REUSEADDR), but a late loser
        // of a free_port() race would exit, hence the liveness check.
        let ready = wait_until(READY_TIMEOUT, || {
            if !matches!(child.try_wait(), Ok(None)) {
                return true;
            }
            self.count_running() > ready_before && tcp_listening(self.port).unwrap_or(true)
        });
        let alive = matches!(child.try_wait(), Ok(None));
        if !(ready && alive) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "mosquitto on port {} did not start ({}):\nstderr:\n{}\nlog:\n{}",
                self.port,
                if alive { "timeout" } else { "exited" },
                read_log(&self.stderr_path),
                self.log()
            ));
        }
        self.child = Some(child);
        Ok(())
    }

    fn count_running(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("mosquitto version") && l.ends_with(" running"))
            .count()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.dump_tail_if_panicking("mosquitto log");
        self.stop();
    }
}

// ---------------------------------------------------------------------------
// MQTT clients: mosquitto_sub and mosquitto_pub

fn next_client_id(prefix: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// TLS options shared by mosquitto_sub and mosquitto_pub.
fn tls_args(cmd: &mut Command, port: u16, cert: &Path, key: &Path) {
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", "mqttv311"])
        .arg("--cafile")
        .arg(Pki::get().path("ca.pem"))
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key);
}

/// Options for a [`Subscriber`].
pub struct SubscriberBuilder<'a> {
    broker: &'a Mosquitto,
    filter: String,
    qos: u8,
    port: Option<u16>,
    identity: Option<(PathBuf, PathBuf)>,
    client_id: Option<String>,
    extra: Vec<String>,
}

impl SubscriberBuilder<'_> {
    /// Subscription QoS (default 0).
    pub fn qos(mut self, qos: u8) -> Self {
        self.qos = qos;
        self
    }

    /// Connect to this port (e.g. a [`Proxy`]) instead of the broker's.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Client certificate and key (default client.pem/client.key).
    pub fn identity(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.identity = Some((cert.into(), key.into()));
        self
    }

    /// Client id (default `sub-<pid>-<n>`).
    pub fn client_id(mut self, id: &str) -> Self {
        self.client_id = Some(id.to_string());
        self
    }

    /// An extra mosquitto_sub argument (e.g. "-c" for a persistent session).
    pub fn arg(mut self, arg: &str) -> Self {
        self.extra.push(arg.to_string());
        self
    }

    /// Starts mosquitto_sub and waits until the broker sent its SUBACK.
    pub fn start(self) -> Subscriber {
        let pki = Pki::get();
        let dir = TestDir::new("sub");
        let client_id = self.client_id.unwrap_or_else(|| next_client_id("sub"));
        let (cert, key) = self
            .identity
            .unwrap_or_else(|| (pki.path("client.pem"), pki.path("client.key")));
        let out_path = dir.join("out");
        let err_path = dir.join("err");
        let mut cmd = Command::new(program("mosquitto_sub"));
        tls_args(
            &mut cmd,
            self.port.unwrap_or(self.broker.port()),
            &cert,
            &key,
        );
        cmd.args([
            "-i",
            &client_id,
            "-t",
            &self.filter,
            "-q",
            &self.qos.to_string(),
            "-v",
        ])
        .args(&self.extra)
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("create sub output"))
        .stderr(File::create(&err_path).expect("create sub stderr"));
        let child = cmd.spawn().expect("spawn mosquitto_sub");
        let mut sub = Subscriber {
            child,
            client_id,
            out_path,
            err_path,
            dir,
        };
        let suback = format!("Sending SUBACK to {}", sub.client_id);
        if !self.broker.wait_log(&suback, READY_TIMEOUT) {
            let alive = sub.is_running();
            panic!(
                "mosquitto_sub {} not subscribed (running: {alive}); stderr:\n{}",
                sub.client_id,
                read_log(&sub.err_path)
            );
        }
        sub
    }
}

/// A mosquitto_sub process printing `topic payload` lines (`-v`) to a file.
/// A payload containing newlines spans several lines.
pub struct Subscriber {
    child: Child,
    client_id: String,
    out_path: PathBuf,
    err_path: PathBuf,
    dir: TestDir,
}

impl Subscriber {
    /// Subscribes to `filter` on `broker` with the client certificate.
    pub fn start(broker: &Mosquitto, filter: &str, qos: u8) -> Subscriber {
        Subscriber::builder(broker, filter).qos(qos).start()
    }

    /// Options for a subscriber; the broker's log is used to wait for SUBACK.
    pub fn builder<'a>(broker: &'a Mosquitto, filter: &str) -> SubscriberBuilder<'a> {
        SubscriberBuilder {
            broker,
            filter: filter.to_string(),
            qos: 0,
            port: None,
            identity: None,
            client_id: None,
            extra: Vec::new(),
        }
    }

    /// The MQTT client id.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether mosquitto_sub still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Everything received so far.
    pub fn output(&self) -> String {
        read_log(&self.out_path)
    }

    /// The received `topic payload` lines.
    pub fn lines(&self) -> Vec<String> {
        self.output().lines().map(str::to_string).collect()
    }

    /// Waits until at least `n` lines arrived.
    pub fn wait_lines(&self, n: usize, timeout: Duration) -> bool {
        wait_until(timeout, || self.output().lines().count() >= n)
    }

    /// mosquitto_sub's stderr so far.
    pub fn stderr(&self) -> String {
        read_log(&self.err_path)
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}

/// The result of one mosquitto_pub run.
#[derive(Debug)]
pub struct PublishOutput {
    /// The exit status; `None` if it did not finish in time and was killed.
    pub status: Option<ExitStatus>,
    /// Its stdout and stderr.
    pub output: String,
}

impl PublishOutput {
    /// Whether mosquitto_pub exited with status 0.
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }
}

/// One mosquitto_pub run (bounded by 10 s), for tests that expect failure or
/// need options [`publish`] does not take.
pub struct Publish {
    port: u16,
    topic: String,
    payload: Vec<u8>,
    qos: u8,
    retain: bool,
    identity: Option<(PathBuf, PathBuf)>,
    username: Option<(String, String)>,
    client_id: Option<String>,
}

impl Publish {
    /// A QoS 0, non-retained message to `topic` on 127.0.0.1:`port`.
    pub fn new(port: u16, topic: &str, payload: impl AsRef<[u8]>) -> Publish {
        Publish {
            port,
            topic: topic.to_string(),
            payload: payload.as_ref().to_vec(),
            qos: 0,
            retain: false,
            identity: None,
            username: None,
            client_id: None,
        }
    }

    /// QoS 0, 1 or 2.
    pub fn qos(mut self, qos: u8) -> Self {
        self.qos = qos;
        self
    }

    /// The retain flag.
    pub fn retain(mut self, retain: bool) -> Self {
        self.retain = retain;
        self
    }

    /// Client certificate and key (default client.pem/client.key).
    pub fn identity(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.identity = Some((cert.into(), key.into()));
        self
    }

    /// Username and password.
    pub fn username(mut self, user: &str, password: &str) -> Self {
        self.username = Some((user.to_string(), password.to_string()));
        self
    }

    /// Client id (default `pub-<pid>-<n>`).
    pub fn client_id(mut self, id: &str) -> Self {
        self.client_id = Some(id.to_string());
        self
    }

    /// Runs mosquitto_pub to completion (killed after 10 s).
    pub fn run(self) -> PublishOutput {
        let pki = Pki::get();
        let (cert, key) = self
            .identity
            .unwrap_or_else(|| (pki.path("client.pem"), pki.path("client.key")));
        let client_id = self.client_id.unwrap_or_else(|| next_client_id("pub"));
        let mut cmd = Command::new(program("mosquitto_pub"));
        tls_args(&mut cmd, self.port, &cert, &key);
        cmd.args([
            "-i",
            &client_id,
            "-t",
            &self.topic,
            "-q",
            &self.qos.to_string(),
        ]);
        if self.retain {
            cmd.arg("-r");
        }
        if let Some((user, password)) = &self.username {
            cmd.args(["-u", user, "-P", password]);
        }
        // The payload goes through stdin so it may hold any bytes.
        cmd.arg(if self.payload.is_empty() { "-n" } else { "-s" });
        let dir = TestDir::new("pub");
        let out_path = dir.join("out");
        let (out, err) = log_stdio(&out_path);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn mosquitto_pub");
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(&self.payload);
        }
        let status = wait_child(&mut child, PUBLISH_TIMEOUT);
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        PublishOutput {
            status,
            output: read_log(&out_path),
        }
    }
}

/// Publishes with mosquitto_pub (client.pem) and panics unless it succeeds.
pub fn publish(broker: &Mosquitto, topic: &str, payload: impl AsRef<[u8]>, qos: u8, retain: bool) {
    let out = Publish::new(broker.port(), topic, payload)
        .qos(qos)
        .retain(retain)
        .run();
    assert!(
        out.success(),
        "mosquitto_pub to {topic} failed ({:?}): {}",
        out.status,
        out.output
    );
}

// ---------------------------------------------------------------------------
// Fault-injecting TCP proxy

/// How [`Proxy::cut`] closes connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// An orderly close: both peers read end-of-stream.
    Fin,
    /// An abortive close (SO_LINGER 0): both peers see ECONNRESET.
    Rst,
}

/// A TCP proxy 127.0.0.1:`port()` → 127.0.0.1:target, with faults on demand.
///
/// One accept thread plus two pump threads per connection; they poll every
/// 10 ms, so controls take effect within a few tens of milliseconds and
/// drop joins them all in bounded time.
pub struct Proxy {
    port: u16,
    shared: Arc<ProxyShared>,
    accept_thread: Option<JoinHandle<()>>,
}

struct ProxyShared {
    target: u16,
    listener: Mutex<Option<TcpListener>>,
    conns: Mutex<Vec<ProxyConn>>,
    stop: AtomicBool,
    blackhole: AtomicBool,
    accepted: AtomicUsize,
}

struct ProxyConn {
    link: Arc<Link>,
    pumps: Vec<JoinHandle<()>>,
}

/// The two sockets of one proxied connection; they close when the last
/// owner (the registry or a pump) drops its `Arc`.
struct Link {
    client: TcpStream,
    upstream: TcpStream,
    closed: AtomicBool,
}

impl Proxy {
    /// Proxies a newly bound free port to 127.0.0.1:`target_port`.
    pub fn start(target_port: u16) -> Proxy {
        Proxy::start_on(0, target_port)
    }

    /// Proxies 127.0.0.1:`listen_port` (0: any free port) to 127.0.0.1:`target_port`.
    pub fn start_on(listen_port: u16, target_port: u16) -> Proxy {
        let listener = bind_nonblocking(listen_port)
            .unwrap_or_else(|e| panic!("proxy cannot bind 127.0.0.1:{listen_port}: {e}"));
        let port = listener.local_addr().expect("proxy address").port();
        let shared = Arc::new(ProxyShared {
            target: target_port,
            listener: Mutex::new(Some(listener)),
            conns: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            blackhole: AtomicBool::new(false),
            accepted: AtomicUsize::new(0),
        });
        let accept_shared = Arc::clone(&shared);
        let accept_thread = thread::Builder::new()
            .name("proxy-accept".into())
            .spawn(move || proxy_accept_loop(&accept_shared))
            .expect("spawn proxy thread");
        Proxy {
            port,
            shared,
            accept_thread: Some(accept_thread),
        }
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connections accepted so far (including ones whose upstream connect failed).
    pub fn connections(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections currently open.
    pub fn live_connections(&self) -> usize {
        lock(&self.shared.conns)
            .iter()
            .filter(|c| !c.link.closed.load(Ordering::SeqCst))
            .count()
    }

    /// Closes every live connection on both sides and returns once the
    /// sockets are closed. New connections are still accepted.
    pub fn cut(&self, how: Cut) {
        let conns = std::mem::take(&mut *lock(&self.shared.conns));
        close_conns(conns, how);
    }

    /// While on, no byte is forwarded in either direction; sockets stay open
    /// and bytes already read are held, then delivered when turned off (like
    /// a network partition that heals before TCP gives up). New connections
    /// are still accepted and held the same way.
    pub fn blackhole(&self, on: bool) {
        self.shared.blackhole.store(on, Ordering::SeqCst);
    }

    /// While on, the listening socket is closed, so connects get
    /// ECONNREFUSED; turning it off binds the same port again (std sets
    /// SO_REUSEADDR). Established connections are not touched.
    pub fn refuse(&self, on: bool) {
        let mut listener = lock(&self.shared.listener);
        if on {
            *listener = None;
        } else if listener.is_none() {
            let mut last = None;
            let bound = wait_until(Duration::from_secs(2), || {
                match bind_nonblocking(self.port) {
                    Ok(l) => {
                        *listener = Some(l);
                        true
                    }
                    Err(e) => {
                        last = Some(e);
                        false
                    }
                }
            });
            assert!(bound, "proxy cannot re-bind port {}: {last:?}", self.port);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        *lock(&self.shared.listener) = None;
        let conns = std::mem::take(&mut *lock(&self.shared.conns));
        close_conns(conns, Cut::Fin);
    }
}

/// Locks a mutex, ignoring poisoning (a panicking test must still clean up).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn bind_nonblocking(port: u16) -> io::Result<TcpListener> {
    let l = TcpListener::bind(("127.0.0.1", port))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Sets SO_LINGER to {on, 0 s}, so the last close sends RST instead of FIN.
fn set_linger_zero(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the fd is open for the lifetime of `s`; the option value is a
    // properly sized `linger` on the stack.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::addr_of!(linger).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::linger>()).unwrap_or(8),
        );
    }
}

fn close_conns(conns: Vec<ProxyConn>, how: Cut) {
    for c in &conns {
        match how {
            Cut::Fin => {
                let _ = c.link.client.shutdown(Shutdown::Both);
                let _ = c.link.upstream.shutdown(Shutdown::Both);
            }
            Cut::Rst => {
                set_linger_zero(&c.link.client);
                set_linger_zero(&c.link.upstream);
            }
        }
        c.link.closed.store(true, Ordering::SeqCst);
    }
    for c in conns {
        for p in c.pumps {
            let _ = p.join();
        }
        // Dropping the last Arc closes both sockets here.
    }
}

fn proxy_accept_loop(shared: &Arc<ProxyShared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        let accepted = lock(&shared.listener).as_ref().map(TcpListener::accept);
        match accepted {
            Some(Ok((client, _))) => {
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                proxy_open(shared, client);
            }
            Some(Err(_)) | None => thread::sleep(POLL / 2),
        }
        // Forget connections whose pumps are done, closing their sockets.
        let mut conns = lock(&shared.conns);
        conns.retain(|c| !c.pumps.iter().all(JoinHandle::is_finished));
    }
}

fn proxy_open(shared: &Arc<ProxyShared>, client: TcpStream) {
    let target = SocketAddr::from(([127, 0, 0, 1], shared.target));
    let Ok(upstream) = TcpStream::connect_timeout(&target, Duration::from_secs(2)) else {
        // As if the far end refused: the client sees its connection close.
        return;
    };
    for s in [&client, &upstream] {
        let _ = s.set_nonblocking(false);
        let _ = s.set_nodelay(true);
        let _ = s.set_read_timeout(Some(POLL));
        let _ = s.set_write_timeout(Some(POLL));
    }
    let link = Arc::new(Link {
        client,
        upstream,
        closed: AtomicBool::new(false),
    });
    // Registered before any byte flows, so a cut() after a round trip
    // always finds it.
    let mut conns = lock(&shared.conns);
    let mut pumps = Vec::new();
    for upward in [true, false] {
        let link = Arc::clone(&link);
        let shared = Arc::clone(shared);
        let name = if upward { "proxy-up" } else { "proxy-down" };
        let pump = thread::Builder::new()
            .name(name.into())
            .spawn(move || proxy_pump(&shared, &link, upward))
            .expect("spawn proxy pump");
        pumps.push(pump);
    }
    conns.push(ProxyConn { link, pumps });
}

/// Copies one direction of a connection until end-of-stream, an error, a
/// cut or the proxy's drop.
fn proxy_pump(shared: &ProxyShared, link: &Link, upward: bool) {
    let (from, to) = if upward {
        (&link.client, &link.upstream)
    } else {
        (&link.upstream, &link.client)
    };
    let done = || link.closed.load(Ordering::SeqCst) || shared.stop.load(Ordering::SeqCst);
    let mut buf = vec![0u8; 16 * 1024];
    while !done() {
        if shared.blackhole.load(Ordering::SeqCst) {
            thread::sleep(POLL / 2);
            continue;
        }
        let n = match (&*from).read(&mut buf) {
            Ok(0) => {
                // Pass the half-close on; the other direction keeps going.
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
            Err(e) if is_timeout(&e) => continue,
            Err(_) => {
                // A reset (or worse) on one side: reset the other one too.
                set_linger_zero(to);
                link.closed.store(true, Ordering::SeqCst);
                return;
            }
        };
        // Bytes read just as a blackhole began are held until it ends.
        while shared.blackhole.load(Ordering::SeqCst) && !done() {
            thread::sleep(POLL / 2);
        }
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            if done() {
                return;
            }
            match (&*to).write(rest) {
                Ok(0) => break,
                Ok(k) => rest = &rest[k..],
                Err(e) if is_timeout(&e) => {}
                Err(_) => {
                    set_linger_zero(from);
                    link.closed.store(true, Ordering::SeqCst);
                    return;
                }
            }
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

// ---------------------------------------------------------------------------
// The daemon under test

/// Options for a [`Daemon`].
pub struct DaemonBuilder {
    bin: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, Option<OsString>)>,
}

impl DaemonBuilder {
    /// Appends one argument.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Appends arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable (RUST_LOG is "debug" unless set here).
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), Some(value.into())));
        self
    }

    /// Removes an environment variable.
    pub fn env_remove(mut self, key: impl Into<OsString>) -> Self {
        self.env.push((key.into(), None));
        self
    }

    /// Spawns the binary in its own temporary directory (its working
    /// directory), stdout and stderr appended to one log file.
    pub fn start(self) -> Daemon {
        let dir = TestDir::new("daemon");
        let log_path = dir.join("daemon.log");
        let (out, err) = log_stdio(&log_path);
        let mut cmd = Command::new(&self.bin);
        cmd.args(&self.args)
            .current_dir(dir.path())
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for (k, v) in &self.env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", self.bin.display()));
        Daemon {
            child,
            status: None,
            log_path,
            dir,
        }
    }
}

/// The daemon process; killed (SIGTERM, then SIGKILL) on drop if still running.
pub struct Daemon {
    child: Child,
    status: Option<ExitStatus>,
    log_path: PathBuf,
    dir: TestDir,
}

impl Logged for Daemon {
    fn log_path(&self) -> &Path {
        &self.log_path
    }
}

impl Daemon {
    /// Spawns `bin` with `args` and RUST_LOG=debug.
    pub fn start<S: AsRef<std::ffi::OsStr>>(bin: impl AsRef<Path>, args: &[S]) -> Daemon {
        Daemon::builder(bin)
            .args(args.iter().map(|a| a.as_ref().to_os_string()))
            .start()
    }

    /// Options for a daemon run of `bin` (e.g. `env!("CARGO_BIN_EXE_iotcored")`).
    pub fn builder(bin: impl AsRef<Path>) -> DaemonBuilder {
        DaemonBuilder {
            bin: bin.as_ref().to_path_buf(),
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The daemon's working directory (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Sends a signal (e.g. `libc::SIGTERM`); does nothing once reaped.
    pub fn signal(&self, sig: libc::c_int) {
        if self.status.is_none() {
            send_signal(self.child.id(), sig);
        }
    }

    /// Waits up to `timeout` for the daemon to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = wait_child(&mut self.child, timeout);
        }
        self.status
    }

    /// Whether the daemon still runs.
    pub fn is_running(&mut self) -> bool {
        self.wait_exit(Duration::ZERO).is_none()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.dump_tail_if_panicking("daemon log");
        if self.status.is_none() {
            terminate(&mut self.child);
        }
    }
}

/// How many times a process's main thread went to sleep and woke up
/// (`voluntary_ctxt_switches`): an event loop that spins instead of
/// sleeping in poll shows up here, however cheap each turn is.
pub fn wakeups(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/task/{pid}/status"))
        .expect("read the process status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("voluntary_ctxt_switches")
}

/// `-e 127.0.0.1 -i ID -r ca.pem -c client.pem -k client.key --port PORT`.
pub fn iotcored_args(pki: &Pki, port: u16, client_id: &str) -> Vec<String> {
    let p = |name: &str| pki.path(name).display().to_string();
    vec![
        "-e".into(),
        "127.0.0.1".into(),
        "-i".into(),
        client_id.into(),
        "-r".into(),
        p("ca.pem"),
        "-c".into(),
        p("client.pem"),
        "-k".into(),
        p("client.key"),
        "--port".into(),
        port.to_string(),
    ]
}

// ---------------------------------------------------------------------------
// Scripted TLS mock broker

/// CONNACK, session present 0, return code 0 (accepted).
pub const CONNACK_ACCEPTED: [u8; 4] = [0x20, 0x02, 0x00, 0x00];

/// What [`MockBroker`] does on one connection once TLS is up.
#[derive(Clone, Debug)]
pub enum Behaviour {
    /// Read the CONNECT packet, then close (close_notify and FIN) without CONNACK.
    CloseAfterConnect,
    /// Read the CONNECT packet, write these raw bytes, then read (and
    /// record) until the peer closes.
    Reply(Vec<u8>),
    /// Never write anything; read (and record) until the peer closes.
    Silent,
    /// Write `first`, then `repeat` `count` times, and never read again:
    /// a broker that stops reading while it keeps sending.
    Flood {
        first: Vec<u8>,
        repeat: Vec<u8>,
        count: usize,
    },
}

/// A TLS server on 127.0.0.1 (server.pem, client certificates verified
/// against ca.pem by webpki), a thread per connection: connection `i`
/// (in accept order) follows `script[i]`, the last entry repeating.
pub struct MockBroker {
    port: u16,
    state: Arc<Mutex<MockState>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct MockState {
    connections: usize,
    handshakes: usize,
    closed: usize,
    first_packets: Vec<Vec<u8>>,
    received: Vec<Vec<u8>>,
    errors: Vec<String>,
}

impl MockBroker {
    /// Serves every connection with `behaviour`.
    pub fn start(pki: &Pki, behaviour: Behaviour) -> MockBroker {
        MockBroker::with_script(pki, vec![behaviour])
    }

    /// Serves connection `i` with `script[i]`; the last entry repeats.
    pub fn with_script(pki: &Pki, script: Vec<Behaviour>) -> MockBroker {
        assert!(!script.is_empty(), "empty MockBroker script");
        let config = mock_server_config(pki);
        let listener = bind_nonblocking(0).expect("mock broker bind");
        let port = listener.local_addr().expect("mock broker address").port();
        let state = Arc::new(Mutex::new(MockState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (t_state, t_stop) = (Arc::clone(&state), Arc::clone(&stop));
        let thread = thread::Builder::new()
            .name("mock-broker".into())
            .spawn(move || mock_serve(&listener, &config, &script, &t_state, &t_stop))
            .expect("spawn mock broker");
        MockBroker {
            port,
            state,
            stop,
            thread: Some(thread),
        }
    }

    /// The port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// TCP connections accepted.
    pub fn connections(&self) -> usize {
        lock(&self.state).connections
    }

    /// TLS handshakes completed (client certificate accepted).
    pub fn handshakes(&self) -> usize {
        lock(&self.state).handshakes
    }

    /// Connections finished and closed on our side.
    pub fn closed(&self) -> usize {
        lock(&self.state).closed
    }

    /// The raw bytes of the first complete MQTT packet of each connection
    /// that sent one, in order.
    pub fn first_packets(&self) -> Vec<Vec<u8>> {
        lock(&self.state).first_packets.clone()
    }

    /// Every plaintext byte received, one entry per connection that
    /// completed its handshake.
    pub fn received(&self) -> Vec<Vec<u8>> {
        lock(&self.state).received.clone()
    }

    /// TLS or I/O errors seen, one line each (e.g. a rejected client cert).
    pub fn errors(&self) -> Vec<String> {
        lock(&self.state).errors.clone()
    }
}

impl Drop for MockBroker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The client id of a CONNECT packet (MQTT 3.1.1 section 3.1.3.1), if the
/// bytes are a well-formed CONNECT up to that field.
pub fn connect_client_id(packet: &[u8]) -> Option<String> {
    if packet.first()? >> 4 != 1 {
        return None;
    }
    let (_, len_bytes) = decode_remaining_length(&packet[1..])?;
    let body = packet.get(1 + len_bytes..)?;
    let name_len = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
    // Protocol name, level (1), flags (1), keep alive (2).
    let rest = body.get(2 + name_len + 4..)?;
    let id_len = usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?]));
    let id = rest.get(2..2 + id_len)?;
    String::from_utf8(id.to_vec()).ok()
}

/// Decodes an MQTT remaining length; returns (value, bytes used).
fn decode_remaining_length(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (i, b) in bytes.iter().take(4).enumerate() {
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

fn mock_server_config(pki: &Pki) -> Arc<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(pki.path("ca.pem")).expect("read ca.pem") {
        roots.add(cert.expect("parse ca.pem")).expect("add ca.pem");
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .expect("client verifier");
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(pki.path("server.pem"))
        .expect("read server.pem")
        .collect::<Result<_, _>>()
        .expect("parse server.pem");
    let key = PrivateKeyDer::from_pem_file(pki.path("server.key")).expect("read server.key");
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .expect("server certificate");
    Arc::new(config)
}

fn mock_serve(
    listener: &TcpListener,
    config: &Arc<ServerConfig>,
    script: &[Behaviour],
    state: &Mutex<MockState>,
    stop: &AtomicBool,
) {
    // One thread per connection, so that several connections of one
    // client (its extra MQTT connections) can be open at once; each stops
    // within 50 ms of the stop flag.
    thread::scope(|scope| {
        while !stop.load(Ordering::SeqCst) {
            let sock = match listener.accept() {
                Ok((sock, _)) => sock,
                Err(_) => {
                    thread::sleep(POLL / 2);
                    continue;
                }
            };
            let index = {
                let mut st = lock(state);
                st.connections += 1;
                st.connections - 1
            };
            let behaviour = &script[index.min(script.len() - 1)];
            scope.spawn(move || {
                let result = mock_connection(sock, config, behaviour, state, stop);
                let mut st = lock(state);
                st.closed += 1;
                if let Err(e) = result {
                    st.errors.push(format!("connection {index}: {e}"));
                }
            });
        }
    });
}

/// A server-side TLS connection with blocking reads that time out, so the
/// stop flag is checked at least every 50 ms.
struct MockTls<'a> {
    tls: ServerConnection,
    sock: TcpStream,
    stop: &'a AtomicBool,
    plain: Vec<u8>,
    eof: bool,
}

impl MockTls<'_> {
    fn flush(&mut self) -> io::Result<()> {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.sock) {
                Ok(_) => {}
                Err(e) if is_timeout(&e) => self.check_stop()?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn check_stop(&self) -> io::Result<()> {
        if self.stop.load(Ordering::SeqCst) {
            return Err(io::Error::other("mock broker stopping"));
        }
        Ok(())
    }

    /// Reads TLS records once; sets `eof` at the end of the TCP stream.
    fn read_records(&mut self) -> io::Result<()> {
        match self.tls.read_tls(&mut self.sock) {
            Ok(0) => self.eof = true,
            Ok(_) => {}
            Err(e) if is_timeout(&e) => return self.check_stop(),
            Err(e) => return Err(e),
        }
        let processed = self.tls.process_new_packets();
        // Send whatever that produced, an alert included.
        let flushed = self.flush();
        processed.map_err(|e| io::Error::other(format!("TLS: {e}")))?;
        flushed?;
        // Move the plaintext into our buffer.
        let mut buf = [0u8; 4096];
        loop {
            match self.tls.reader().read(&mut buf) {
                Ok(0) => {
                    self.eof = true; // close_notify
                    break;
                }
                Ok(n) => self.plain.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.eof = true;
                    break;
                }
            }
        }
        Ok(())
    }

    fn handshake(&mut self) -> io::Result<()> {
        while self.tls.is_handshaking() {
            self.flush()?;
            if self.eof {
                return Err(io::Error::other("peer closed during the handshake"));
            }
            self.read_records()?;
        }
        self.flush()
    }

    /// Takes exactly `n` plaintext bytes; `None` at end of stream.
    fn take(&mut self, n: usize) -> io::Result<Option<Vec<u8>>> {
        while self.plain.len() < n {
            if self.eof {
                return Ok(None);
            }
            self.read_records()?;
        }
        Ok(Some(self.plain.drain(..n).collect()))
    }

    /// Reads one MQTT packet by its fixed header; `None` at end of stream.
    fn read_packet(&mut self) -> io::Result<Option<Vec<u8>>> {
        let Some(mut packet) = self.take(1)? else {
            return Ok(None);
        };
        loop {
            let Some(b) = self.take(1)? else {
                return Ok(None);
            };
            packet.extend_from_slice(&b);
            if b[0] & 0x80 == 0 {
                break;
            }
            if packet.len() > 4 {
                return Err(io::Error::other("malformed remaining length"));
            }
        }
        let (len, _) = decode_remaining_length(&packet[1..])
            .ok_or_else(|| io::Error::other("malformed remaining length"))?;
        let Some(body) = self.take(len)? else {
            return Ok(None);
        };
        packet.extend_from_slice(&body);
        Ok(Some(packet))
    }

    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.tls.writer().write_all(bytes)?;
        self.flush()
    }
}

fn mock_connection(
    sock: TcpStream,
    config: &Arc<ServerConfig>,
    behaviour: &Behaviour,
    state: &Mutex<MockState>,
    stop: &AtomicBool,
) -> io::Result<()> {
    sock.set_nonblocking(false)?;
    sock.set_read_timeout(Some(Duration::from_millis(50)))?;
    sock.set_write_timeout(Some(Duration::from_millis(50)))?;
    let tls = ServerConnection::new(Arc::clone(config)).map_err(io::Error::other)?;
    let mut conn = MockTls {
        tls,
        sock,
        stop,
        plain: Vec::new(),
        eof: false,
    };
    conn.handshake()?;
    let index = {
        let mut st = lock(state);
        st.handshakes += 1;
        st.received.push(Vec::new());
        st.received.len() - 1
    };
    let result = mock_script(&mut conn, behaviour, state, index);
    let _ = conn.sock.shutdown(Shutdown::Both);
    result
}

fn mock_script(
    conn: &mut MockTls<'_>,
    behaviour: &Behaviour,
    state: &Mutex<MockState>,
    index: usize,
) -> io::Result<()> {
    let record = |bytes: &[u8]| lock(state).received[index].extend_from_slice(bytes);
    let Some(first) = conn.read_packet()? else {
        return Ok(());
    };
    record(&first);
    lock(state).first_packets.push(first);
    match behaviour {
        Behaviour::CloseAfterConnect => {
            conn.tls.send_close_notify();
            conn.flush()
        }
        Behaviour::Reply(bytes) => {
            conn.write_all(bytes)?;
            drain_recording(conn, record)
        }
        Behaviour::Silent => drain_recording(conn, record),
        Behaviour::Flood {
            first,
            repeat,
            count,
        } => {
            // A small receive buffer, so that what we never read backs up
            // into the client quickly.
            let small: libc::c_int = 4096;
            // SAFETY: a valid socket and a c_int option value of its size.
            unsafe {
                libc::setsockopt(
                    conn.sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUF,
                    std::ptr::addr_of!(small).cast(),
                    libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4),
                );
            }
            conn.write_all(first)?;
            for _ in 0..*count {
                let mut rest = repeat.as_slice();
                while !rest.is_empty() {
                    let n = conn.tls.writer().write(rest)?;
                    rest = &rest[n..];
                    conn.flush()?;
                }
            }
            // Hold the connection open without reading until told to stop.
            loop {
                conn.check_stop()?;
                thread::sleep(POLL);
            }
        }
    }
}

fn drain_recording(conn: &mut MockTls<'_>, record: impl Fn(&[u8])) -> io::Result<()> {
    loop {
        record(&conn.plain);
        conn.plain.clear();
        if conn.eof {
            return Ok(());
        }
        conn.read_records()?;
    }
}
