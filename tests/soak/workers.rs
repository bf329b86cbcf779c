//! The soak's local clients, each a process of its own (the soak binary
//! run again as `soak --soak-worker KIND SOCKET SECONDS`), so that the
//! per-process rules of core-bus.md §7 see distinct pids. Each runs until
//! its time is up, then prints one line, `result key=value ...`, which
//! the soak reads back ([`Counts`]).
//!
//! Well-behaved kinds (their counts must show they were served):
//! - `qos1`: QoS 1 `publish` calls, 10 a second, payload = a sequence
//!   number, a new connection every 50 calls; the numbers the daemon
//!   accepted are 0..`accepted` (a BUSY answer is retried with the same
//!   number), which the broker-side audit must all receive.
//! - `qos0`: one connection per QoS 0 `publish` call (what Greengrass Lite
//!   clients do), 20 a second: the bulk of the thousands of connections.
//! - `churn`: random short sessions: stream subscriptions that read for a
//!   while, a publish echoed back through the broker, `response_endpoint`
//!   subscriptions ended by `unsubscribe`, `connection_status`, `stats`.
//! - `reader`: one QoS 1 stream subscription to the audited topic, read to
//!   the end; the same filter as the `nonreader`'s.
//!
//! Hostile kinds (their counts show whether they were contained):
//! - `idle`: keeps opening connections that never send a byte, up to the
//!   whole bus table.
//! - `half`: connections that send 7 bytes of a frame and stop.
//! - `flood`: QoS 0 `publish` notifies of 1 KiB, 2000 a second (twenty
//!   times AWS's rate).
//! - `nonreader`: subscribes to the flood and to the audited topic and
//!   never reads.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::bus::{
    is_null, params, publish_params, request, subscribe_params, BusClient, Reply, V,
};
use iotcored::bus::frame::RequestType;

/// The audited QoS 1 topic.
pub const Q1_TOPIC: &str = "soak/q1";
/// The flood's topic.
pub const FLOOD_TOPIC: &str = "soak/flood";
/// The flood's rate, publishes per second.
const FLOOD_PER_SEC: usize = 2000;
/// Every kind, well-behaved first.
pub const KINDS: [&str; 8] = [
    "qos1",
    "qos0",
    "churn",
    "reader",
    "idle",
    "half",
    "flood",
    "nonreader",
];

/// A worker's final counters.
pub type Counts = HashMap<String, u64>;

/// Runs worker `kind` (called by `main` for `--soak-worker`); returns the
/// process's exit status.
pub fn run(kind: &str, socket: &Path, secs: f64) -> i32 {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut c = Counts::new();
    match kind {
        "qos1" => qos1(socket, deadline, &mut c),
        "qos0" => qos0(socket, deadline, &mut c),
        "churn" => churn(socket, deadline, &mut c),
        "reader" => reader(socket, deadline, &mut c),
        "idle" => idle(socket, deadline, &mut c),
        "half" => half(socket, deadline, &mut c),
        "flood" => flood(socket, deadline, &mut c),
        "nonreader" => nonreader(socket, deadline, &mut c),
        _ => {
            eprintln!("soak worker: unknown kind {kind}");
            return 2;
        }
    }
    let mut keys: Vec<_> = c.iter().collect();
    keys.sort();
    let line: Vec<String> = keys.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("result {}", line.join(" "));
    0
}

/// Parses a worker's `result` line.
pub fn parse_result(out: &str) -> Option<Counts> {
    let line = out.lines().rev().find(|l| l.starts_with("result"))?;
    Some(
        line.split_whitespace()
            .skip(1)
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect(),
    )
}

fn add(c: &mut Counts, key: &str, n: u64) {
    *c.entry(key.to_string()).or_insert(0) += n;
}

fn max(c: &mut Counts, key: &str, v: u64) {
    let e = c.entry(key.to_string()).or_insert(0);
    *e = (*e).max(v);
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A bus connection with read timeout `t`; `None` if refused.
fn connect(socket: &Path, t: Duration) -> Option<BusClient> {
    let mut c = BusClient::try_connect(socket)?;
    c.timeout(t);
    c.stream()
        .set_write_timeout(Some(Duration::from_secs(30)))
        .ok()?;
    Some(c)
}

/// As [`connect`], counting it in `connections`.
fn connect_c(c: &mut Counts, socket: &Path, t: Duration) -> Option<BusClient> {
    let bus = connect(socket, t);
    if bus.is_some() {
        add(c, "connections", 1);
    }
    bus
}

/// Sleeps until `at` (or not at all if it passed).
fn sleep_until(at: Instant) {
    let now = Instant::now();
    if at > now {
        thread::sleep(at - now);
    }
}

/// A tiny xorshift generator, seeded by the pid.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        Rng(u64::from(std::process::id()).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn qos1(socket: &Path, deadline: Instant, c: &mut Counts) {
    let mut seq: u64 = 0;
    let mut conn: Option<BusClient> = None;
    let mut calls_on_conn = 0;
    let mut next = Instant::now();
    add(c, "accepted", 0);
    while Instant::now() < deadline {
        sleep_until(next);
        next += Duration::from_millis(100);
        if conn.is_none() || calls_on_conn >= 50 {
            conn = connect(socket, Duration::from_secs(30));
            calls_on_conn = 0;
            if conn.is_none() {
                add(c, "refused", 1);
                continue;
            }
            add(c, "connections", 1);
        }
        let Some(bus) = conn.as_mut() else { continue };
        calls_on_conn += 1;
        let started = Instant::now();
        let payload = seq.to_string();
        bus.send(
            "publish",
            RequestType::Call,
            &publish_params(Q1_TOPIC, payload.as_bytes(), 1),
        );
        let reply = bus.read();
        let took = started.elapsed();
        match reply {
            r if is_null(&r) => {
                seq += 1;
                add(c, "accepted", 1);
                max(c, "max_answer_ms", ms(took));
            }
            Some(Reply::Error(code)) if code == crate::common::bus::code::BUSY => {
                add(c, "busy", 1);
            }
            Some(Reply::Error(_)) | Some(_) => add(c, "errors", 1),
            None => {
                // No answer: whether `seq` was accepted is unknown, so it
                // is sent again (the audit allows duplicates). A
                // well-behaved client should never see this.
                add(c, "unanswered", 1);
                conn = None;
            }
        }
    }
}

fn qos0(socket: &Path, deadline: Instant, c: &mut Counts) {
    let payload = [b'x'; 64];
    let topic = format!("soak/q0/{}", std::process::id());
    let mut next = Instant::now();
    while Instant::now() < deadline {
        sleep_until(next);
        next += Duration::from_millis(50);
        let Some(mut bus) = connect_c(c, socket, Duration::from_secs(30)) else {
            add(c, "refused", 1);
            continue;
        };
        let r = bus.call("publish", &publish_params(&topic, &payload, 0));
        if is_null(&r) {
            add(c, "calls", 1);
        } else if r.is_none() {
            add(c, "unanswered", 1);
        } else {
            add(c, "errors", 1);
        }
    }
}

fn churn(socket: &Path, deadline: Instant, c: &mut Counts) {
    let mut rng = Rng::new();
    let pid = std::process::id();
    let mut n: u64 = 0;
    while Instant::now() < deadline {
        n += 1;
        let op = rng.below(5);
        let ok = match op {
            0 => churn_stream(socket, &format!("soak/churn/{pid}/{}", n % 64), &mut rng, c),
            1 => churn_echo(socket, &format!("soak/echo/{pid}/{n}"), c),
            2 => churn_endpoint(socket, &format!("soak/ep/{pid}/{}", n % 64), c),
            3 => churn_status(socket, c),
            _ => churn_stats(socket, c),
        };
        add(c, "ops", 1);
        if !ok {
            add(c, "errors", 1);
        }
        thread::sleep(Duration::from_millis(50 + rng.below(150)));
    }
}

/// Subscribes a stream; the answer may wait for the broker's SUBACK, which
/// a blackholed link delays (counted as `slow_acks`, not an error).
fn subscribe_stream(bus: &mut BusClient, filter: &str, qos: i64, c: &mut Counts) -> bool {
    subscribe_streams(bus, &[filter], qos, c)
}

fn subscribe_streams(bus: &mut BusClient, filters: &[&str], qos: i64, c: &mut Counts) -> bool {
    let started = Instant::now();
    bus.send(
        "subscribe",
        RequestType::Subscribe,
        &subscribe_params(filters, qos),
    );
    let ok = bus.read() == Some(Reply::Accepted);
    if started.elapsed() > Duration::from_secs(2) {
        add(c, "slow_acks", 1);
    }
    ok
}

fn churn_stream(socket: &Path, filter: &str, rng: &mut Rng, c: &mut Counts) -> bool {
    let Some(mut bus) = connect_c(c, socket, Duration::from_secs(60)) else {
        add(c, "refused", 1);
        return false;
    };
    add(c, "subscriptions", 1);
    if !subscribe_stream(&mut bus, filter, 1, c) {
        return false;
    }
    // Also listen to the QoS 0 publishers for a while.
    let mut other = connect_c(c, socket, Duration::from_secs(60));
    if let Some(o) = other.as_mut() {
        if !subscribe_stream(o, "soak/q0/#", 0, c) {
            return false;
        }
        o.timeout(Duration::from_millis(100));
        let until = Instant::now() + Duration::from_millis(200 + rng.below(2000));
        while Instant::now() < until {
            if o.read().is_some() {
                add(c, "stream_messages", 1);
            }
        }
    }
    true
}

fn churn_echo(socket: &Path, topic: &str, c: &mut Counts) -> bool {
    let Some(mut sub) = connect_c(c, socket, Duration::from_secs(60)) else {
        add(c, "refused", 1);
        return false;
    };
    if !subscribe_stream(&mut sub, topic, 0, c) {
        return false;
    }
    let Some(mut publ) = connect_c(c, socket, Duration::from_secs(30)) else {
        add(c, "refused", 1);
        return false;
    };
    if !is_null(&publ.call("publish", &publish_params(topic, b"echo", 0))) {
        return false;
    }
    // QoS 0 through a link that may be cut or blackholed right now: a
    // missing echo is counted, not an error.
    sub.timeout(Duration::from_secs(5));
    match sub.read() {
        Some(Reply::Payload(_)) => add(c, "echo_ok", 1),
        _ => add(c, "echo_missed", 1),
    }
    true
}

fn churn_endpoint(socket: &Path, filter: &str, c: &mut Counts) -> bool {
    let dir = socket.parent().unwrap_or(Path::new("."));
    let name = format!("soak-ep-{}", std::process::id());
    let path: PathBuf = dir.join(&name);
    let _ = std::fs::remove_file(&path);
    let Ok(_listener) = UnixListener::bind(&path) else {
        return false;
    };
    let Some(mut bus) = connect_c(c, socket, Duration::from_secs(60)) else {
        add(c, "refused", 1);
        let _ = std::fs::remove_file(&path);
        return false;
    };
    let sub = params(&[
        ("topic_filter", V::Buf(filter.as_bytes())),
        ("qos", V::I64(1)),
        ("response_endpoint", V::Buf(name.as_bytes())),
    ]);
    let unsub = params(&[
        ("topic_filter", V::Buf(filter.as_bytes())),
        ("response_endpoint", V::Buf(name.as_bytes())),
    ]);
    let ok = is_null(&bus.call("subscribe", &sub)) && is_null(&bus.call("unsubscribe", &unsub));
    let _ = std::fs::remove_file(&path);
    if ok {
        add(c, "unsubscribes", 1);
    }
    ok
}

fn churn_status(socket: &Path, c: &mut Counts) -> bool {
    let Some(mut bus) = connect_c(c, socket, Duration::from_secs(30)) else {
        add(c, "refused", 1);
        return false;
    };
    bus.send("connection_status", RequestType::Subscribe, &params(&[]));
    bus.read() == Some(Reply::Accepted) && matches!(bus.read(), Some(Reply::Payload(_)))
}

fn churn_stats(socket: &Path, c: &mut Counts) -> bool {
    let Some(mut bus) = connect_c(c, socket, Duration::from_secs(30)) else {
        add(c, "refused", 1);
        return false;
    };
    matches!(bus.call("stats", &params(&[])), Some(Reply::Payload(_)))
}

fn reader(socket: &Path, deadline: Instant, c: &mut Counts) {
    let mut seen: Vec<bool> = Vec::new();
    add(c, "closed_by_daemon", 0);
    'outer: while Instant::now() < deadline {
        let Some(mut bus) = connect_c(c, socket, Duration::from_secs(60)) else {
            add(c, "refused", 1);
            thread::sleep(Duration::from_secs(1));
            continue;
        };
        if !subscribe_stream(&mut bus, Q1_TOPIC, 1, c) {
            add(c, "errors", 1);
            continue;
        }
        bus.timeout(Duration::from_millis(500));
        // Reads past the deadline until quiet for 10 s, so the tail of the
        // run (the queue draining) is counted too.
        let mut last = Instant::now();
        loop {
            if Instant::now() > deadline && last.elapsed() > Duration::from_secs(10) {
                break 'outer;
            }
            match bus.read() {
                Some(Reply::Payload(p)) => {
                    last = Instant::now();
                    add(c, "messages", 1);
                    let n = Reply::Payload(p)
                        .message()
                        .1
                        .iter()
                        .try_fold(0usize, |n, b| {
                            b.is_ascii_digit().then(|| n * 10 + usize::from(b - b'0'))
                        });
                    if let Some(n) = n {
                        if n >= seen.len() {
                            seen.resize(n + 1, false);
                        }
                        seen[n] = true;
                    }
                }
                Some(_) => add(c, "errors", 1),
                None => {
                    // Looks without reading: a byte read here would be
                    // the start of the next frame.
                    if peer_closed(bus.stream()) {
                        add(c, "closed_by_daemon", 1);
                        continue 'outer;
                    }
                }
            }
        }
    }
    add(c, "distinct", seen.iter().filter(|s| **s).count() as u64);
    add(c, "highest", seen.len() as u64);
}

/// Whether the daemon closed `s` (EOF or reset); `s` is non-blocking.
fn is_closed(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

fn idle(socket: &Path, deadline: Instant, c: &mut Counts) {
    let mut held: Vec<UnixStream> = Vec::new();
    let want = iotcored::consts::MAX_BUS_CLIENTS;
    while Instant::now() < deadline {
        // What the daemon let us keep since the last round (2 s ago).
        held.retain_mut(|s| !is_closed(s));
        max(c, "max_held", held.len() as u64);
        while held.len() < want {
            match UnixStream::connect(socket) {
                Ok(s) => {
                    let _ = s.set_nonblocking(true);
                    held.push(s);
                    add(c, "opened", 1);
                    add(c, "connections", 1);
                }
                Err(_) => {
                    add(c, "refused", 1);
                    break;
                }
            }
        }
        thread::sleep(Duration::from_secs(2));
    }
}

fn half(socket: &Path, deadline: Instant, c: &mut Counts) {
    let frame = request(
        "publish",
        RequestType::Call,
        &publish_params("soak/half", b"x", 0),
    );
    while Instant::now() < deadline {
        let mut open: Vec<(UnixStream, Instant)> = Vec::new();
        for _ in 0..2 {
            if let Ok(mut s) = UnixStream::connect(socket) {
                if s.write_all(&frame[..7]).is_ok() {
                    let _ = s.set_nonblocking(true);
                    open.push((s, Instant::now()));
                    add(c, "sent", 1);
                    add(c, "connections", 1);
                }
            }
        }
        let give_up = Instant::now() + Duration::from_secs(20);
        while !open.is_empty() && Instant::now() < give_up {
            thread::sleep(Duration::from_millis(100));
            open.retain_mut(|(s, at)| {
                if is_closed(s) {
                    max(c, "max_close_ms", ms(at.elapsed()));
                    add(c, "closed", 1);
                    false
                } else {
                    true
                }
            });
        }
        add(c, "unclosed", open.len() as u64);
        thread::sleep(Duration::from_secs(2));
    }
}

fn flood(socket: &Path, deadline: Instant, c: &mut Counts) {
    let frame = request(
        "publish",
        RequestType::Notify,
        &publish_params(FLOOD_TOPIC, &[b'f'; 1024], 0),
    );
    // FLOOD_PER_SEC in bursts every 10 ms: twenty times AWS's rate, without
    // making the soak a CPU benchmark of the machine it runs on.
    let burst = FLOOD_PER_SEC / 100;
    while Instant::now() < deadline {
        let Ok(mut s) = UnixStream::connect(socket) else {
            add(c, "refused", 1);
            thread::sleep(Duration::from_secs(1));
            continue;
        };
        let _ = s.set_nonblocking(true);
        add(c, "connections", 1);
        let mut off = 0;
        let mut next = Instant::now();
        'conn: while Instant::now() < deadline {
            sleep_until(next);
            next += Duration::from_millis(10);
            let mut written = 0;
            while written < burst {
                match s.write(&frame[off..]) {
                    Ok(n) => {
                        off += n;
                        if off == frame.len() {
                            off = 0;
                            written += 1;
                            add(c, "sent", 1);
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        add(c, "blocked", 1);
                        break;
                    }
                    Err(_) => {
                        add(c, "closed", 1);
                        break 'conn;
                    }
                }
            }
        }
    }
}

fn nonreader(socket: &Path, deadline: Instant, c: &mut Counts) {
    add(c, "closed_by_daemon", 0);
    while Instant::now() < deadline {
        let Some(mut bus) = connect_c(c, socket, Duration::from_secs(60)) else {
            add(c, "refused", 1);
            thread::sleep(Duration::from_secs(1));
            continue;
        };
        // One request: after an `accepted`, messages may come first.
        if !subscribe_streams(&mut bus, &[FLOOD_TOPIC, Q1_TOPIC], 1, c) {
            add(c, "errors", 1);
            thread::sleep(Duration::from_secs(1));
            continue;
        }
        add(c, "subscribed", 1);
        // Never read; look (without reading) whether it was closed.
        let started = Instant::now();
        let s = bus.stream();
        let _ = s.set_nonblocking(true);
        loop {
            if Instant::now() >= deadline {
                return;
            }
            thread::sleep(Duration::from_millis(500));
            if peer_closed(s) {
                add(c, "closed_by_daemon", 1);
                max(c, "max_alive_ms", ms(started.elapsed()));
                break;
            }
        }
    }
}

/// Whether the peer hung up, without reading the queued data: POLLHUP or
/// POLLRDHUP from poll(2).
#[allow(unsafe_code)]
fn peer_closed(s: &UnixStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, a zero timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0
}
