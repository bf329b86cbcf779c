//! The daemon under test: a binary run in its own temporary directory with
//! RUST_LOG=debug, its output in one log file, stopped by its own pid on
//! drop; and the command line that points it at a test broker.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use super::pki::Pki;
use super::process::{log_stdio, send_signal, terminate, wait_child, Logged, TestDir};

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
        cmd.args(&self.args);
        // The protocol of the run (`IOTCORED_TEST_MQTT`), for an iotcored
        // started to connect whose test did not choose one [mqtt5-1].
        let has = |a: &str| self.args.iter().any(|x| x == a);
        let is_iotcored = self.bin.file_name().is_some_and(|n| n == "iotcored");
        if is_iotcored && (has("-e") || has("--endpoint")) && !has("--mqtt") {
            cmd.args(["--mqtt", mqtt_version()]);
        }
        cmd.current_dir(dir.path())
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

/// The MQTT protocol this run of the tests uses: `IOTCORED_TEST_MQTT` (5,
/// the daemon's default, or 3.1.1). `make test` runs the end-to-end tests
/// that do not depend on the protocol under both.
pub fn mqtt_version() -> &'static str {
    match std::env::var("IOTCORED_TEST_MQTT").as_deref() {
        Ok("3.1.1") | Ok("3") | Ok("311") => "3.1.1",
        _ => "5",
    }
}

/// Whether this run of the tests uses MQTT 5.
pub fn mqtt5() -> bool {
    mqtt_version() == "5"
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
