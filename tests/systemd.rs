//! The real daemon under systemd's protocols, without systemd as PID 1:
//! socket activation through `systemd-socket-activate` (Debian package
//! `systemd`), and the sd_notify protocol (READY, STATUS, WATCHDOG,
//! STOPPING) on a datagram socket passed as NOTIFY_SOCKET.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::bus::*;
use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_iotcored");
const SECS: fn(u64) -> Duration = Duration::from_secs;

/// systemd-socket-activate's path; fails the test with what to install.
fn socket_activate() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("systemd-socket-activate"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "systemd-socket-activate not found in PATH: install the Debian package \
                 `systemd` (apt-get install -y systemd)"
            )
        })
}

/// `systemd-socket-activate -l SOCK --fdname=NAME iotcored ARGS`, with the
/// daemon's own --socket-dir in a separate empty directory so that a socket
/// it bound itself would show there.
fn activated(args: Vec<String>, fdname: &str) -> (Daemon, PathBuf, TestDir, TestDir) {
    let listen = TestDir::new("listen");
    let sock = listen.join("activated.sock");
    let own = TestDir::new("own");
    let d = Daemon::builder(socket_activate())
        .arg("-l")
        .arg(&sock)
        .arg(format!("--fdname={fdname}"))
        // systemd-socket-activate passes only the variables named here.
        .arg("-E")
        .arg("RUST_LOG=debug")
        .arg(BIN)
        .args(args)
        .arg("--socket-dir")
        .arg(own.path())
        .start();
    assert!(
        wait_until(SECS(5), || sock.exists()),
        "systemd-socket-activate did not listen on {}; log:\n{}",
        sock.display(),
        d.log()
    );
    (d, sock, own, listen)
}

#[test]
fn socket_activated_daemon_serves_a_publish_queued_before_it_started() {
    let broker = Mosquitto::start();
    let sub = Subscriber::start(&broker, "activated/#", 1);
    let args = iotcored_args(Pki::get(), broker.port(), "gw-activated");
    let (mut d, sock, own, _listen) = activated(args, "aws_iot_mqtt");
    // systemd-socket-activate starts iotcored on the first connection: this
    // client connects before iotcored runs, as clients of iotcored.socket
    // do at boot, and its request waits in the socket until it is served.
    let mut c = BusClient::connect(&sock);
    c.send(
        "publish",
        iotcored::bus::frame::RequestType::Call,
        &publish_params("activated/t", b"through the passed socket", 1),
    );
    let reply = c.read();
    assert!(is_null(&reply), "{reply:?}; log:\n{}", d.log());
    assert!(
        sub.wait_lines(1, SECS(10)),
        "{:?}\n{}",
        sub.lines(),
        d.log()
    );
    assert_eq!(sub.lines(), ["activated/t through the passed socket"]);
    // It served the socket it was given and bound none of its own.
    assert!(
        !own.join("aws_iot_mqtt").exists(),
        "iotcored bound its own socket instead of the passed one; log:\n{}",
        d.log()
    );
    // A second client on the same listening socket.
    let mut c2 = BusClient::connect(&sock);
    assert!(is_null(
        &c2.call("publish", &publish_params("activated/u", b"again", 0))
    ));
    assert!(sub.wait_lines(2, SECS(10)), "{:?}", sub.lines());
    d.signal(libc::SIGTERM);
    let status = d
        .wait_exit(SECS(5))
        .expect("iotcored did not stop on SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", d.log());
}

#[test]
fn a_passed_socket_of_another_name_is_not_taken() {
    // LISTEN_FDNAMES must name the interface: a socket passed for another
    // name is left alone and iotcored binds <socket-dir>/aws_iot_mqtt.
    let args = iotcored_args(Pki::get(), free_port(), "gw-other-fd");
    let (d, sock, own, _listen) = activated(args, "not_iotcored");
    // The first connection makes systemd-socket-activate start iotcored.
    let _trigger = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
    let bound = own.join("aws_iot_mqtt");
    assert!(
        wait_until(SECS(5), || bound.exists()),
        "iotcored did not bind its own socket; log:\n{}",
        d.log()
    );
    let mut c = BusClient::connect(&bound);
    assert!(is_null(
        &c.call("publish", &publish_params("x/y", b"queued", 0))
    ));
}

// ---------------------------------------------------------------------------
// sd_notify

/// A NOTIFY_SOCKET: the datagrams the daemon sends, each split into its
/// `KEY=value` lines, with the time they arrived.
struct Notify {
    sock: UnixDatagram,
    path: PathBuf,
    _dir: TestDir,
    got: Vec<(Instant, Vec<String>)>,
}

impl Notify {
    fn new() -> Notify {
        let dir = TestDir::new("notify");
        let path = dir.join("notify");
        let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        Notify {
            sock,
            path,
            _dir: dir,
            got: Vec::new(),
        }
    }

    fn path(&self) -> &Path {
        &self.path
    }

    /// Reads datagrams until `done` holds for what was received, or the
    /// timeout passes; returns whether it held.
    fn wait(
        &mut self,
        timeout: Duration,
        done: impl Fn(&[(Instant, Vec<String>)]) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if done(&self.got) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            let mut buf = [0u8; 4096];
            if let Ok(n) = self.sock.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let lines = text.lines().map(str::to_string).collect();
                self.got.push((Instant::now(), lines));
            }
        }
    }

    /// Waits for a message with a line starting with `prefix`; returns the
    /// line.
    fn wait_line(&mut self, prefix: &str, timeout: Duration) -> Option<String> {
        let has = |got: &[(Instant, Vec<String>)]| {
            got.iter()
                .flat_map(|(_, l)| l.iter())
                .any(|l| l.starts_with(prefix))
        };
        if !self.wait(timeout, has) {
            return None;
        }
        self.lines().into_iter().find(|l| l.starts_with(prefix))
    }

    /// How many lines equal `line`.
    fn count(&self, line: &str) -> usize {
        self.lines().iter().filter(|l| *l == line).count()
    }

    fn lines(&self) -> Vec<String> {
        self.got.iter().flat_map(|(_, l)| l.clone()).collect()
    }
}

fn notified_daemon(port: u16, id: &str, notify: &Notify, dir: &Path) -> Daemon {
    Daemon::builder(BIN)
        .args(iotcored_args(Pki::get(), port, id))
        .arg("--socket-dir")
        .arg(dir)
        .env("NOTIFY_SOCKET", notify.path())
        .env("WATCHDOG_USEC", "1000000")
        .env_remove("WATCHDOG_PID")
        .start()
}

#[test]
fn notify_ready_before_any_broker_then_watchdog_then_stopping() {
    // No broker at all: READY=1 must still come, as soon as the bus is
    // served, because local clients queue publishes while offline.
    let mut notify = Notify::new();
    let bus = TestDir::new("bus");
    let mut d = notified_daemon(free_port(), "gw-notify-offline", &notify, bus.path());
    let sock = bus.join("aws_iot_mqtt");
    assert!(
        notify.wait(SECS(5), |got| got
            .iter()
            .any(|(_, l)| l.iter().any(|l| l == "READY=1"))),
        "no READY=1; got {:?}; log:\n{}",
        notify.lines(),
        d.log()
    );
    // The bus is served when READY=1 arrives: a publish is accepted.
    assert!(sock.exists(), "READY=1 before the bus socket exists");
    let mut c = BusClient::connect(&sock);
    assert!(is_null(
        &c.call("publish", &publish_params("offline/t", b"queued", 1))
    ));
    // WATCHDOG_USEC=1 s: a ping every 0.5 s from the event loop, while it
    // is busy failing to connect.
    let start = Instant::now();
    assert!(
        notify.wait(SECS(3), |got| got
            .iter()
            .flat_map(|(_, l)| l.iter())
            .filter(|l| *l == "WATCHDOG=1")
            .count()
            >= 2),
        "fewer than 2 WATCHDOG=1 in 3 s (after {:?}): {:?}; log:\n{}",
        start.elapsed(),
        notify.lines(),
        d.log()
    );
    d.signal(libc::SIGTERM);
    assert!(
        notify.wait_line("STOPPING=1", SECS(5)).is_some(),
        "no STOPPING=1 after SIGTERM: {:?}; log:\n{}",
        notify.lines(),
        d.log()
    );
    let status = d
        .wait_exit(SECS(5))
        .expect("iotcored did not stop on SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", d.log());
    assert_eq!(notify.count("READY=1"), 1, "{:?}", notify.lines());
}

#[test]
fn notify_status_follows_the_mqtt_link() {
    let mut broker = Mosquitto::start();
    let mut notify = Notify::new();
    let bus = TestDir::new("bus");
    let mut d = notified_daemon(broker.port(), "gw-notify-status", &notify, bus.path());
    assert!(
        notify.wait_line("READY=1", SECS(5)).is_some(),
        "no READY=1: {:?}; log:\n{}",
        notify.lines(),
        d.log()
    );
    let connected = notify.wait_line("STATUS=connected to 127.0.0.1", SECS(10));
    assert!(
        connected.is_some(),
        "no STATUS=connected to 127.0.0.1: {:?}; log:\n{}",
        notify.lines(),
        d.log()
    );
    broker.stop();
    assert!(
        notify
            .wait_line("STATUS=disconnected: ", SECS(10))
            .is_some(),
        "no STATUS=disconnected: after the broker stopped: {:?}; log:\n{}",
        notify.lines(),
        d.log()
    );
    d.signal(libc::SIGTERM);
    assert!(
        notify.wait_line("STOPPING=1", SECS(5)).is_some(),
        "no STOPPING=1: {:?}",
        notify.lines()
    );
    assert_eq!(d.wait_exit(SECS(5)).and_then(|s| s.code()), Some(0));
}
