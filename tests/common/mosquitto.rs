//! A real mosquitto broker with one TLS listener on 127.0.0.1, configured by
//! [`MosquittoBuilder`], ready once its log says it runs and its port
//! listens, and stopped by its own pid on drop. On request it loads the
//! dynamic-security plugin to refuse publishes on some topics
//! ([`MosquittoBuilder::deny_publish`]).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::net::{free_port, tcp_listening};
use super::pki::Pki;
use super::process::{log_stdio, program, read_log, terminate, Logged, TestDir};
use super::{wait_until, READY_TIMEOUT};

/// Options for a [`Mosquitto`] broker with one TLS listener on 127.0.0.1.
#[derive(Clone, Debug)]
pub struct MosquittoBuilder {
    port: Option<u16>,
    require_certificate: bool,
    use_identity_as_username: bool,
    password_file: bool,
    server_cert: Option<(PathBuf, PathBuf)>,
    tls_version: Option<String>,
    client_sigalgs: Option<String>,
    max_packet_size: Option<usize>,
    deny_publish: Vec<String>,
    dynsec_clients: Vec<String>,
    log_types: Option<Vec<String>>,
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
            client_sigalgs: None,
            max_packet_size: None,
            deny_publish: Vec::new(),
            dynsec_clients: Vec::new(),
            log_types: None,
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

    /// The signature algorithms the broker accepts from a client
    /// certificate's key (OpenSSL's `ClientSignatureAlgorithms`, e.g.
    /// "RSA+SHA256" for PKCS #1 v1.5 only), through the OpenSSL config.
    pub fn client_sigalgs(mut self, list: &str) -> Self {
        self.client_sigalgs = Some(list.to_string());
        self
    }

    /// Close the connection of a client that sends a packet of more than
    /// `bytes` bytes (mosquitto's `max_packet_size`; it applies to every
    /// protocol version and to every client, the broker-side ones too).
    pub fn max_packet_size(mut self, bytes: usize) -> Self {
        self.max_packet_size = Some(bytes);
        self
    }

    /// Refuse publishes to topics matching `pattern` (a topic filter, `+`
    /// and `#` allowed); may be called several times. Loads mosquitto's
    /// dynamic-security plugin, which otherwise allows everything:
    /// connecting, subscribing, receiving, publishing elsewhere.
    ///
    /// mosquitto drops a denied message and logs `Denied PUBLISH from
    /// <client id>`; the connection stays open. It answers QoS 1 with PUBACK
    /// 0x87 (not authorized) under MQTT 5 and with a plain PUBACK under
    /// MQTT 3.1.1, QoS 2 with PUBREC 0x87 (MQTT 5) or the usual PUBREC.
    ///
    /// The plugin denies everything to a username it does not know, so it
    /// knows the CNs of the PKI's client certificates
    /// ([`DYNSEC_PKI_CLIENTS`]) and those given to
    /// [`MosquittoBuilder::dynsec_client`]; a client without a username
    /// (with `use_identity_as_username(false)`) gets the same rules through
    /// the plugin's anonymous group.
    pub fn deny_publish(mut self, pattern: &str) -> Self {
        self.deny_publish.push(pattern.to_string());
        self
    }

    /// Make a username (a certificate CN) outside [`DYNSEC_PKI_CLIENTS`]
    /// known to the dynamic-security plugin, with the same rules; only
    /// matters with [`MosquittoBuilder::deny_publish`].
    pub fn dynsec_client(mut self, username: &str) -> Self {
        self.dynsec_clients.push(username.to_string());
        self
    }

    /// Logs only these mosquitto `log_type`s instead of `all` (a long run
    /// at AWS's rate would log every packet: hundreds of MB an hour).
    /// [`Subscriber`](super::Subscriber) waits for a debug line, so it
    /// needs `all`.
    pub fn log_types(mut self, types: &[&str]) -> Self {
        self.log_types = Some(types.iter().map(|t| t.to_string()).collect());
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
        line("# written by tests/common/mosquitto.rs".into());
        line("per_listener_settings false".into());
        line("persistence false".into());
        // Started as root, mosquitto would switch to user "mosquitto", which
        // cannot read this test directory; it only switches when root.
        line("user root".into());
        line(format!("log_dest file {}", log_path.display()));
        match &self.log_types {
            None => line("log_type all".into()),
            Some(types) => types.iter().for_each(|t| line(format!("log_type {t}"))),
        }
        line("connection_messages true".into());
        line("log_timestamp true".into());
        line("log_timestamp_format %Y-%m-%dT%H:%M:%S".into());
        if let Some(n) = self.max_packet_size {
            line(format!("max_packet_size {n}"));
        }
        if !self.deny_publish.is_empty() {
            let path = dir.join("dynsec.json");
            let json = dynsec_json(&self.deny_publish, &self.dynsec_clients);
            fs::write(&path, json).expect("write dynsec.json");
            line(format!("plugin {}", dynsec_plugin().display()));
            line(format!("plugin_opt_config_file {}", path.display()));
        }
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
        let mut tls_section = String::new();
        if let Some(v) = &self.tls_version {
            line(format!("tls_version {v}"));
            let max = match v.as_str() {
                "tlsv1.2" => Some("TLSv1.2"),
                "tlsv1.1" => Some("TLSv1.1"),
                _ => None,
            };
            if let Some(max) = max {
                tls_section.push_str(&format!("MaxProtocol = {max}\n"));
            }
        }
        if let Some(list) = &self.client_sigalgs {
            tls_section.push_str(&format!("ClientSignatureAlgorithms = {list}\n"));
        }
        if !tls_section.is_empty() {
            let path = dir.join("openssl.cnf");
            let text = format!(
                "openssl_conf = conf\n[conf]\nssl_conf = ssl\n[ssl]\n\
                 system_default = tls\n[tls]\n{tls_section}"
            );
            fs::write(&path, text).expect("write openssl.cnf");
            openssl_conf = Some(path);
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

/// The CNs of the client certificates `config/dev/gen-pki.sh` issues (the
/// expired and the untrusted one never get in), which become usernames.
const DYNSEC_PKI_CLIENTS: &[&str] = &[
    "iotcored-test",
    "iotcored-test-rsa",
    "iotcored-test-p384",
    "iotcored-test-chain",
];

/// Where Debian and Ubuntu install the dynamic-security plugin.
const DYNSEC_PLUGIN_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib",
    "/usr/local/lib",
];

/// The dynamic-security plugin's path; panics if it is not installed.
fn dynsec_plugin() -> PathBuf {
    DYNSEC_PLUGIN_DIRS
        .iter()
        .map(|d| Path::new(d).join("mosquitto_dynamic_security.so"))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!("mosquitto_dynamic_security.so not found in {DYNSEC_PLUGIN_DIRS:?}")
        })
}

/// The dynamic-security plugin's configuration: every access allowed by
/// default, and a role denying `publishClientSend` on each of `deny`, given
/// to every known username and to the anonymous group.
///
/// The clients have no password, which the plugin then checks for no one
/// (with `use_identity_as_username` mosquitto does not ask anyway). A
/// username it does not know is let in but denied everything, hence the
/// list of clients.
fn dynsec_json(deny: &[String], extra_clients: &[String]) -> String {
    let acls: Vec<String> = deny
        .iter()
        .map(|topic| {
            format!(
                r#"{{"acltype": "publishClientSend", "topic": {}, "allow": false}}"#,
                json_string(topic)
            )
        })
        .collect();
    let mut usernames: Vec<&str> = DYNSEC_PKI_CLIENTS.to_vec();
    for name in extra_clients {
        if !usernames.contains(&name.as_str()) {
            usernames.push(name);
        }
    }
    let clients: Vec<String> = usernames
        .iter()
        .map(|name| {
            format!(
                r#"{{"username": {}, "roles": [{{"rolename": "deny"}}]}}"#,
                json_string(name)
            )
        })
        .collect();
    format!(
        r#"{{
  "defaultACLAccess": {{"publishClientSend": true, "publishClientReceive": true, "subscribe": true, "unsubscribe": true}},
  "roles": [{{"rolename": "deny", "acls": [{}]}}],
  "clients": [{}],
  "groups": [{{"groupname": "anonymous", "roles": [{{"rolename": "deny"}}]}}],
  "anonymousGroup": "anonymous"
}}
"#,
        acls.join(", "),
        clients.join(", ")
    )
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

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
