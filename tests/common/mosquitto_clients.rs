//! The broker's other MQTT clients, standing in for the cloud side:
//! mosquitto_sub, running until its guard drops, and mosquitto_pub, one
//! bounded run per message.
//! Both connect with mutual TLS (client.pem unless told otherwise).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::mosquitto::Mosquitto;
use super::pki::Pki;
use super::process::{log_stdio, program, read_log, terminate, wait_child, Logged, TestDir};
use super::{wait_until, PUBLISH_TIMEOUT, READY_TIMEOUT};

/// A client id unique in this test run: `<prefix>-<pid>-<n>`.
fn next_client_id(prefix: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// TLS options shared by mosquitto_sub and mosquitto_pub (MQTT 3.1.1,
/// the CA and the given identity; 127.0.0.1:`port`).
pub fn tls_args(cmd: &mut Command, port: u16, cert: &Path, key: &Path) {
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
    repeat: Option<usize>,
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
            repeat: None,
        }
    }

    /// Sends the message `n` times in a burst (`--repeat`).
    pub fn repeat(mut self, n: usize) -> Self {
        self.repeat = Some(n);
        self
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
        if let Some(n) = self.repeat {
            cmd.args(["--repeat", &n.to_string()]);
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
