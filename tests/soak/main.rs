//! The soak: `make soak` (`cargo test --release --test soak`), for
//! `SOAK_MINUTES` (default 60).
//!
//! The release daemon (MQTT 5, disk spool, persistent session, keepalive
//! 30 s) runs against a real mosquitto with mutual TLS, through the
//! fault-injecting proxy of the end-to-end tests, while worker processes
//! (`workers.rs`) use the core bus the way a gateway's programs do and the
//! way hostile ones would: thousands of short connections, subscriptions
//! that come and go, QoS 0 and QoS 1 publishes at about AWS's rate, idle
//! sockets, half frames, a flood and a subscriber that never reads. Every
//! `SOAK_FAULT_SECS` (default 60) the link to the broker is cut (RST, then
//! FIN), the broker is restarted, or the link is blackholed for 20 s, in
//! turn.
//!
//! Every `SOAK_SAMPLE_SECS` (default 10) it samples the daemon's RSS,
//! private anonymous and private dirty memory (`/proc/PID/smaps_rollup`),
//! open file descriptors and `stats` (queue depth among them). At the end
//! the workers stop, the queue drains, and it checks:
//!
//! - memory flat after warm-up: in the second half of the run, RSS and
//!   anonymous memory each within 256 KiB;
//! - file descriptors: never above the idle count plus the bus table and
//!   the links, and back to the idle count once the clients are gone;
//! - 0 QoS 1 messages lost end to end: every sequence number the daemon
//!   accepted reached a broker-side subscriber (persistent session, broker
//!   persistence across its restarts);
//! - the well-behaved clients were served: no refusal, no error, no
//!   unanswered call, the `reader` never disconnected, the sampler's own
//!   `stats` call answered every time;
//! - every hostile client contained: the idle one never held more than
//!   half the bus table, every half frame closed within 12 s, the flood's
//!   excess evicted (QoS 0) while QoS 1 kept flowing, the non-reader
//!   disconnected.
//!
//! It writes `target/soak/report.json` (settings, samples, faults, the
//! workers' counts, the checks) and `target/soak/soak.svg` (the series
//! over time, faults marked), and exits 1 if a check failed.
//!
//! Invariants: only 127.0.0.1 and Unix sockets; every process is stopped
//! by its own pid (guards, also on panic); every wait is bounded.

#[path = "../common/mod.rs"]
mod common;
mod svg;
mod workers;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use common::bus::{params, stats_counters, BusClient};
use common::*;

/// The bound of the memory check's second half.
const FLAT_KIB: u64 = 256;
/// How long a partial frame may stay open ([bus-iso-3]: 10 s), with the
/// sampling slack of the worker.
const HALF_FRAME_MS: u64 = 12_000;
/// How long a blackhole lasts.
const BLACKHOLE: Duration = Duration::from_secs(20);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--soak-worker") {
        let secs = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(1.0);
        return ExitCode::from(
            u8::try_from(workers::run(&args[2], Path::new(&args[3]), secs)).unwrap_or(1),
        );
    }
    // libtest-style arguments (`cargo test --test soak -- ...`) are ignored.
    let minutes = env_f64("SOAK_MINUTES", 60.0);
    let settings = Settings {
        run: Duration::from_secs_f64(minutes * 60.0),
        sample: Duration::from_secs_f64(env_f64("SOAK_SAMPLE_SECS", 10.0)),
        fault: Duration::from_secs_f64(env_f64("SOAK_FAULT_SECS", 60.0)),
    };
    let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap_or(Path::new("target"))
        .join("soak");
    fs::create_dir_all(&out).expect("create target/soak");
    println!(
        "soak: {minutes} min, a sample every {:?}, a fault every {:?}; writing {}",
        settings.sample,
        settings.fault,
        out.display()
    );
    let report = soak(&settings, &out);
    let json = report.json(&settings);
    fs::write(out.join("report.json"), json).expect("write report.json");
    fs::write(out.join("soak.svg"), svg::draw(&report, settings.run)).expect("write soak.svg");
    let mut failed = 0;
    for c in &report.checks {
        println!(
            "soak: {} {}: {}",
            if c.pass { "PASS" } else { "FAIL" },
            c.name,
            c.detail
        );
        failed += usize::from(!c.pass);
    }
    println!(
        "soak: {} ({} of {} checks failed); {} and {}",
        if failed == 0 { "passed" } else { "FAILED" },
        failed,
        report.checks.len(),
        out.join("report.json").display(),
        out.join("soak.svg").display()
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|v: &f64| *v > 0.0)
        .unwrap_or(default)
}

pub struct Settings {
    run: Duration,
    sample: Duration,
    fault: Duration,
}

/// One sample of the daemon.
#[derive(Clone, Default)]
pub struct Sample {
    /// Seconds since the workers started.
    pub t: f64,
    pub rss_kib: u64,
    pub anon_kib: u64,
    pub dirty_kib: u64,
    pub fds: u64,
    /// The `stats` counters; empty if the call failed.
    pub stats: HashMap<String, i64>,
}

/// A fault injected at `t`.
pub struct Fault {
    pub t: f64,
    pub kind: &'static str,
}

pub struct Check {
    name: &'static str,
    pass: bool,
    detail: String,
}

#[derive(Default)]
pub struct Report {
    pub samples: Vec<Sample>,
    pub faults: Vec<Fault>,
    pub idle: Sample,
    pub end: Sample,
    workers: Vec<(String, workers::Counts)>,
    audit: Audit,
    checks: Vec<Check>,
    connections: u64,
}

#[derive(Default)]
struct Audit {
    accepted: u64,
    distinct: u64,
    missing: Vec<u64>,
    duplicates: u64,
}

/// A worker process, stopped by its pid on drop.
struct Worker {
    kind: &'static str,
    child: Child,
    out: PathBuf,
}

impl Drop for Worker {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}

/// The broker-side audit subscriber: mosquitto_sub with a persistent
/// session (`-c`), QoS 1, printing each payload.
struct AuditSub {
    child: Child,
    out: PathBuf,
}

impl Drop for AuditSub {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}

fn soak(settings: &Settings, out: &Path) -> Report {
    let mut report = Report::default();
    let pki = Pki::get();
    let db = TestDir::new("mosqdb");
    let mut broker = Mosquitto::builder()
        .log_types(&[
            "error",
            "warning",
            "notice",
            "information",
            "subscribe",
            "unsubscribe",
        ])
        .config_line("persistence true")
        .config_line(&format!("persistence_location {}/", db.path().display()))
        .start();
    let audit_dir = TestDir::new("audit");
    let audit = start_audit(&broker, &audit_dir);
    let proxy = Proxy::start(broker.port());
    let spool = TestDir::new("spool");
    let mut args = iotcored_args(pki, proxy.port(), "soak");
    args.extend(
        [
            "--socket-dir",
            ".",
            "--spool-dir",
            &spool.path().display().to_string(),
            "--persistent-session",
            "--keepalive",
            "30",
            "--max-backoff",
            "5",
        ]
        .map(String::from),
    );
    let daemon = Daemon::builder(env!("CARGO_BIN_EXE_iotcored"))
        .args(args)
        .env("RUST_LOG", "info")
        .start();
    let sock = daemon.dir().join("aws_iot_mqtt");
    assert!(
        daemon.wait_log("connected (session present", Duration::from_secs(15)),
        "the daemon did not connect:\n{}",
        daemon.log()
    );
    let pid = daemon.pid();
    // Idle: connected, nothing else.
    std::thread::sleep(Duration::from_secs(2));
    report.idle = sample(pid, &sock, 0.0);

    let secs = settings.run.as_secs_f64();
    let work = TestDir::new("workers");
    // The reader first, subscribed at the broker before anything is
    // published, so that it must see every accepted QoS 1 message.
    let mut running = vec![start_worker("reader", 0, &sock, secs, &work)];
    assert!(
        broker.wait_log(
            &format!("soak 1 {}", workers::Q1_TOPIC),
            Duration::from_secs(10)
        ),
        "the reader's subscription did not reach the broker:\n{}",
        daemon.log()
    );
    running.extend(
        workers::KINDS
            .iter()
            .filter(|k| **k != "reader")
            .flat_map(|k| {
                let n = if matches!(*k, "qos0" | "churn") { 2 } else { 1 };
                (0..n).map(move |i| (*k, i))
            })
            .map(|(kind, i)| start_worker(kind, i, &sock, secs, &work)),
    );

    let t0 = Instant::now();
    let end = t0 + settings.run;
    let mut next_sample = t0;
    let mut next_fault = t0 + settings.fault;
    let mut fault_n = 0usize;
    let mut blackhole_until: Option<Instant> = None;
    while Instant::now() < end {
        let now = Instant::now();
        if now >= next_sample {
            let s = sample(pid, &sock, now.duration_since(t0).as_secs_f64());
            println!(
                "soak: t={:>5.0}s rss={} KiB anon={} KiB dirty={} KiB fds={} spooled={} acked={}",
                s.t,
                s.rss_kib,
                s.anon_kib,
                s.dirty_kib,
                s.fds,
                s.stats.get("spooled").copied().unwrap_or(-1),
                s.stats.get("acked").copied().unwrap_or(-1)
            );
            report.samples.push(s);
            next_sample += settings.sample;
        }
        if blackhole_until.is_some_and(|u| now >= u) {
            proxy.blackhole(false);
            blackhole_until = None;
        }
        if now >= next_fault && now + BLACKHOLE < end {
            let kind = ["cut (RST)", "broker restart", "cut (FIN)", "blackhole 20 s"][fault_n % 4];
            match fault_n % 4 {
                0 => proxy.cut(Cut::Rst),
                1 => broker.restart(),
                2 => proxy.cut(Cut::Fin),
                _ => {
                    proxy.blackhole(true);
                    blackhole_until = Some(now + BLACKHOLE);
                }
            }
            report.faults.push(Fault {
                t: now.duration_since(t0).as_secs_f64(),
                kind,
            });
            fault_n += 1;
            next_fault += settings.fault;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    proxy.blackhole(false);
    report.connections = proxy.connections() as u64;

    // The workers stop on their own at the end (the reader 10 s after its
    // last message); bounded here.
    let stop_by = Instant::now() + Duration::from_secs(60);
    for w in &mut running {
        while Instant::now() < stop_by && matches!(w.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    for w in running.drain(..) {
        let text = fs::read_to_string(&w.out).unwrap_or_default();
        let counts = workers::parse_result(&text).unwrap_or_default();
        report.workers.push((w.kind.to_string(), counts));
    }

    // Drain: the queue and the disk spool empty, then the audit caught up.
    let drained = wait_every(Duration::from_secs(120), Duration::from_secs(1), || {
        let st = stats_now(&sock);
        st.get("spooled") == Some(&0) && st.get("stored") == Some(&0)
    });
    let accepted = sum(&report.workers, "qos1", "accepted");
    wait_every(Duration::from_secs(60), Duration::from_secs(1), || {
        audit_counts(&audit.out, accepted).missing.is_empty()
    });
    report.audit = audit_counts(&audit.out, accepted);
    // Idle again: every client gone; give the daemon a moment to notice.
    std::thread::sleep(Duration::from_secs(3));
    report.end = sample(pid, &sock, settings.run.as_secs_f64());
    if !drained {
        println!("soak: the queue did not drain within 120 s");
    }
    let _ = fs::write(out.join("daemon.log"), tail(&daemon.log(), 400));
    let _ = fs::write(out.join("broker.log"), tail(&broker.log(), 400));
    report.checks = checks(&report, settings);
    drop(audit);
    report
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn start_worker(kind: &'static str, i: usize, sock: &Path, secs: f64, dir: &TestDir) -> Worker {
    let out = dir.join(&format!("{kind}-{i}.out"));
    let file = fs::File::create(&out).expect("worker output");
    let err = file.try_clone().expect("worker stderr");
    let child = Command::new(std::env::current_exe().expect("the soak binary"))
        .arg("--soak-worker")
        .arg(kind)
        .arg(sock)
        .arg(secs.to_string())
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .spawn()
        .expect("start a soak worker");
    Worker { kind, child, out }
}

fn start_audit(broker: &Mosquitto, dir: &TestDir) -> AuditSub {
    let out = dir.join("out");
    let pki = Pki::get();
    let mut cmd = Command::new("mosquitto_sub");
    tls_args(
        &mut cmd,
        broker.port(),
        &pki.path("client.pem"),
        &pki.path("client.key"),
    );
    let child = cmd
        .args(["-i", "soak-audit", "-c", "-q", "1", "-t", workers::Q1_TOPIC])
        .args(["-F", "%p"])
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out).expect("audit output"))
        .stderr(fs::File::create(dir.join("err")).expect("audit stderr"))
        .spawn()
        .expect("mosquitto_sub for the audit");
    let a = AuditSub { child, out };
    assert!(
        broker.wait_log(
            &format!("soak-audit 1 {}", workers::Q1_TOPIC),
            Duration::from_secs(10)
        ),
        "the audit subscriber did not subscribe:\n{}",
        broker.log()
    );
    a
}

/// What the audit subscriber received of 0..`accepted`.
fn audit_counts(path: &Path, accepted: u64) -> Audit {
    let text = fs::read_to_string(path).unwrap_or_default();
    let mut seen = vec![0u32; usize::try_from(accepted).unwrap_or(0)];
    for n in text.lines().filter_map(|l| l.trim().parse::<usize>().ok()) {
        if let Some(s) = seen.get_mut(n) {
            *s += 1;
        }
    }
    Audit {
        accepted,
        distinct: seen.iter().filter(|s| **s > 0).count() as u64,
        missing: seen
            .iter()
            .enumerate()
            .filter(|(_, s)| **s == 0)
            .map(|(i, _)| i as u64)
            .collect(),
        duplicates: seen.iter().map(|s| u64::from(s.saturating_sub(1))).sum(),
    }
}

/// The daemon's `stats` (i64 counters) by one call; empty if it failed.
fn stats_now(sock: &Path) -> HashMap<String, i64> {
    let Some(mut c) = BusClient::try_connect(sock) else {
        return HashMap::new();
    };
    c.timeout(Duration::from_secs(5));
    c.call("stats", &params(&[]))
        .and_then(|r| stats_counters(&r))
        .unwrap_or_default()
}

fn sample(pid: u32, sock: &Path, t: f64) -> Sample {
    let field = |text: &str, name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rollup = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let fds = fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    Sample {
        t,
        rss_kib: field(&status, "VmRSS:"),
        anon_kib: field(&rollup, "Anonymous:"),
        dirty_kib: field(&rollup, "Private_Dirty:"),
        fds,
        stats: stats_now(sock),
    }
}

/// The sum of counter `key` over the workers of `kind`.
fn sum(workers: &[(String, workers::Counts)], kind: &str, key: &str) -> u64 {
    workers
        .iter()
        .filter(|(k, _)| k == kind)
        .map(|(_, c)| c.get(key).copied().unwrap_or(0))
        .sum()
}

fn checks(r: &Report, settings: &Settings) -> Vec<Check> {
    let mut out = Vec::new();
    let mut check =
        |name: &'static str, pass: bool, detail: String| out.push(Check { name, pass, detail });
    let half = settings.run.as_secs_f64() / 2.0;
    let second: Vec<&Sample> = r.samples.iter().filter(|s| s.t >= half).collect();
    let spread = |f: fn(&Sample) -> u64| -> (u64, u64) {
        let v = second.iter().map(|s| f(s));
        (v.clone().min().unwrap_or(0), v.max().unwrap_or(0))
    };
    for (name, f) in [
        ("RSS flat", (|s: &Sample| s.rss_kib) as fn(&Sample) -> u64),
        ("anonymous memory flat", |s: &Sample| s.anon_kib),
    ] {
        let (lo, hi) = spread(f);
        check(
            name,
            second.len() >= 2 && hi - lo <= FLAT_KIB,
            format!(
                "second half ({} samples): {lo}–{hi} KiB, spread {} KiB (limit {FLAT_KIB})",
                second.len(),
                hi - lo
            ),
        );
    }
    let max_fds = r.samples.iter().map(|s| s.fds).max().unwrap_or(0);
    let bound = r.idle.fds + iotcored::consts::MAX_BUS_CLIENTS as u64 + 8;
    check(
        "file descriptors bounded",
        max_fds <= bound,
        format!(
            "idle {}, at most {max_fds} during the run (bound {bound}: idle + the bus table + 8)",
            r.idle.fds
        ),
    );
    check(
        "file descriptors back to idle",
        r.end.fds == r.idle.fds,
        format!("idle {}, after the run {}", r.idle.fds, r.end.fds),
    );
    let a = &r.audit;
    check(
        "0 QoS 1 messages lost",
        a.accepted > 0 && a.missing.is_empty(),
        format!(
            "accepted {}, received by the broker-side subscriber {} ({} duplicates){}",
            a.accepted,
            a.distinct,
            a.duplicates,
            if a.missing.is_empty() {
                String::new()
            } else {
                format!(
                    "; missing {} (first {:?})",
                    a.missing.len(),
                    &a.missing[..a.missing.len().min(10)]
                )
            }
        ),
    );
    let w = &r.workers;
    let (reader, highest) = (sum(w, "reader", "distinct"), sum(w, "reader", "highest"));
    check(
        "0 QoS 1 messages lost on the way back",
        a.accepted > 0 && reader == a.accepted && highest == a.accepted,
        format!(
            "a bus subscriber of the same topic (through the broker and the daemon) received {reader} distinct of {}",
            a.accepted
        ),
    );
    let mut served = String::new();
    let mut bad = 0;
    for kind in ["qos1", "qos0", "churn", "reader"] {
        for key in ["refused", "errors", "unanswered"] {
            let n = sum(w, kind, key);
            bad += n;
            if n > 0 {
                let _ = write!(served, "{kind} {key} {n}; ");
            }
        }
    }
    let reader_closed = sum(w, "reader", "closed_by_daemon");
    let stats_failed = r.samples.iter().filter(|s| s.stats.is_empty()).count();
    check(
        "well-behaved clients served",
        bad == 0 && reader_closed == 0 && stats_failed == 0 && !w.is_empty(),
        format!(
            "{served}qos1 accepted {} (busy {}, slowest answer {} ms), qos0 calls {}, churn ops {} \
             (echo {}/{}), reader disconnected {reader_closed}×, stats calls failed {stats_failed}",
            sum(w, "qos1", "accepted"),
            sum(w, "qos1", "busy"),
            sum(w, "qos1", "max_answer_ms"),
            sum(w, "qos0", "calls"),
            sum(w, "churn", "ops"),
            sum(w, "churn", "echo_ok"),
            sum(w, "churn", "echo_ok") + sum(w, "churn", "echo_missed"),
        ),
    );
    let max_held = sum(w, "idle", "max_held");
    let limit = iotcored::consts::MAX_BUS_CLIENTS as u64 / 2;
    check(
        "idle client contained",
        sum(w, "idle", "opened") > 0 && max_held <= limit,
        format!(
            "opened {}, held at most {max_held} at once (limit: half the table, {limit})",
            sum(w, "idle", "opened")
        ),
    );
    let (sent, closed, slowest) = (
        sum(w, "half", "sent"),
        sum(w, "half", "closed"),
        sum(w, "half", "max_close_ms"),
    );
    check(
        "half frames contained",
        sent > 0 && closed == sent && slowest <= HALF_FRAME_MS,
        format!(
            "{sent} sent, {closed} closed, the slowest after {slowest} ms (limit {HALF_FRAME_MS})"
        ),
    );
    let evicted = r.end.stats.get("evicted").copied().unwrap_or(0);
    check(
        "flood contained",
        sum(w, "flood", "sent") > 0 && evicted > 0,
        format!(
            "flood wrote {} publishes, the daemon evicted {evicted} QoS 0 messages; QoS 1 is checked above",
            sum(w, "flood", "sent")
        ),
    );
    let nr = sum(w, "nonreader", "closed_by_daemon");
    check(
        "non-reader contained",
        nr > 0 || settings.run < Duration::from_secs(120),
        format!(
            "subscribed {}×, disconnected by the daemon {nr}× (after at most {} ms); the reader of the same filter: disconnected {reader_closed}×",
            sum(w, "nonreader", "subscribed"),
            sum(w, "nonreader", "max_alive_ms")
        ),
    );
    out
}

impl Report {
    /// Bus connections the workers opened (each counts its own).
    pub fn bus_connections(&self) -> u64 {
        self.workers
            .iter()
            .map(|(_, c)| c.get("connections").copied().unwrap_or(0))
            .sum()
    }

    fn json(&self, settings: &Settings) -> String {
        let mut j = String::from("{\n");
        let _ = writeln!(
            j,
            "  \"settings\": {{\"minutes\": {:.2}, \"sample_secs\": {}, \"fault_secs\": {}}},",
            settings.run.as_secs_f64() / 60.0,
            settings.sample.as_secs_f64(),
            settings.fault.as_secs_f64()
        );
        let _ = writeln!(j, "  \"broker_connections\": {},", self.connections);
        let _ = writeln!(j, "  \"bus_connections\": {},", self.bus_connections());
        let _ = writeln!(j, "  \"idle\": {},", sample_json(&self.idle));
        let _ = writeln!(j, "  \"end\": {},", sample_json(&self.end));
        j.push_str("  \"samples\": [\n");
        let samples: Vec<String> = self
            .samples
            .iter()
            .map(|s| format!("    {}", sample_json(s)))
            .collect();
        j.push_str(&samples.join(",\n"));
        j.push_str("\n  ],\n  \"faults\": [");
        let faults: Vec<String> = self
            .faults
            .iter()
            .map(|f| format!("{{\"t\": {:.1}, \"kind\": \"{}\"}}", f.t, f.kind))
            .collect();
        j.push_str(&faults.join(", "));
        j.push_str("],\n  \"workers\": [\n");
        let workers: Vec<String> = self
            .workers
            .iter()
            .map(|(k, c)| {
                let mut keys: Vec<_> = c.iter().collect();
                keys.sort();
                let fields: Vec<String> =
                    keys.iter().map(|(k, v)| format!("\"{k}\": {v}")).collect();
                format!("    {{\"kind\": \"{k}\", {}}}", fields.join(", "))
            })
            .collect();
        j.push_str(&workers.join(",\n"));
        let _ = write!(
            j,
            "\n  ],\n  \"audit\": {{\"accepted\": {}, \"received\": {}, \"duplicates\": {}, \"missing\": {}}},\n",
            self.audit.accepted,
            self.audit.distinct,
            self.audit.duplicates,
            self.audit.missing.len()
        );
        j.push_str("  \"checks\": [\n");
        let checks: Vec<String> = self
            .checks
            .iter()
            .map(|c| {
                format!(
                    "    {{\"name\": \"{}\", \"pass\": {}, \"detail\": \"{}\"}}",
                    c.name,
                    c.pass,
                    c.detail.replace('\\', "\\\\").replace('"', "\\\"")
                )
            })
            .collect();
        j.push_str(&checks.join(",\n"));
        let pass = self.checks.iter().all(|c| c.pass);
        let _ = write!(j, "\n  ],\n  \"pass\": {pass}\n}}\n");
        j
    }
}

fn sample_json(s: &Sample) -> String {
    let mut keys: Vec<_> = s.stats.iter().collect();
    keys.sort();
    let stats: Vec<String> = keys.iter().map(|(k, v)| format!("\"{k}\": {v}")).collect();
    format!(
        "{{\"t\": {:.1}, \"rss_kib\": {}, \"anon_kib\": {}, \"private_dirty_kib\": {}, \"fds\": {}, \"stats\": {{{}}}}}",
        s.t,
        s.rss_kib,
        s.anon_kib,
        s.dirty_kib,
        s.fds,
        stats.join(", ")
    )
}
