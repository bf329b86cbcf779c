//! The iotcored benchmark: `make bench` (`cargo test --release --test bench`).
//!
//! Runs the release daemon against a real mosquitto with mutual TLS on
//! 127.0.0.1 and measures, in this order:
//!
//! - A. the publish rate limit of the default build: 15 s of 100-byte QoS 0
//!   messages (the packet count binds; a full queue evicts), then 15 s of
//!   ~10 KiB QoS 1 messages (the byte count binds; a full queue answers
//!   BUSY and the client retries), each offered far above the limit by
//!   pipelined `publish` calls. Arrivals are timed twice: at a broker-side
//!   mosquitto_sub, and at the broker's TCP ingress by a tap relaying the
//!   daemon's TLS stream (the daemon's own output, before the broker's and
//!   the subscriber's queueing, which on a loaded 2-core machine bunch
//!   messages together);
//! - B. with the rate limit built out (`IOTCORED_PUBLISH_RATE=0
//!   IOTCORED_PUBLISH_BYTES_PER_SEC=0`, built here into
//!   `target/bench-unlimited`): QoS 0 and QoS 1 throughput, CPU time per
//!   message, RSS over time, and the bus → broker → bus round trip;
//! - memory with every table full (bus clients, subscriptions, the spool,
//!   broker unreachable) and the spool's capacity; the binary's size.
//!
//! It prints a report with each target next to the measured value and writes
//! the figures to `target/bench/report.json`, next to the raw arrival times
//! and the daemon logs of part A. A missed target is reported, not an error:
//! the exit status is 1 only when a section itself broke. `BENCH_ONLY=rate`
//! (or `unlimited`, `full`, `spool`, `binary`, comma-separated) runs only
//! those sections.
//!
//! Invariants: only 127.0.0.1 and Unix sockets; every loop is bounded in
//! count and in time; every process is a harness guard stopped by its own
//! pid on drop, also when a section panics (each runs under `catch_unwind`);
//! every thread started here is joined.

mod common;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::bus::*;
use common::*;
use iotcored::bus::frame::RequestType;
use iotcored::consts;

/// The default build, as `cargo test --release` built it.
const BIN: &str = env!("CARGO_BIN_EXE_iotcored");
const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");
/// Where the rate-unlimited variant is built, relative to the manifest.
const UNLIMITED_TARGET_DIR: &str = "target/bench-unlimited";
/// Where the JSON report and the raw data (arrival times, daemon logs) go,
/// relative to the manifest.
const REPORT_DIR: &str = "target/bench";
/// Runs only the sections named here (comma-separated keys: binary, rate,
/// unlimited, full, spool), e.g. `BENCH_ONLY=rate make bench`.
const ONLY_VAR: &str = "BENCH_ONLY";

// A. Rate limiting.
/// Length of each of the two load phases.
const RATE_PHASE: Duration = Duration::from_secs(15);
/// Payload of the count-bound phase.
const SMALL_PAYLOAD: usize = 100;
/// Payload of the byte-bound phase, clamped to what one bus frame carries.
const BIG_PAYLOAD: usize = 10 * 1024;
/// Pipelined calls outstanding at once in the rate phases.
const SMALL_WINDOW: usize = 64;
const BIG_WINDOW: usize = 8;
/// Pause after a BUSY answer before offering more.
const BUSY_PAUSE: Duration = Duration::from_millis(1);
/// Arrivals after the load stops that may still belong to it.
const ARRIVAL_GRACE: Duration = Duration::from_millis(300);

// B. Throughput and latency, rate limit off.
const TPUT_PAYLOAD: usize = 64;
const TPUT_QOS0_MESSAGES: usize = 200_000;
const TPUT_QOS0_MAX: Duration = Duration::from_secs(15);
const TPUT_QOS1_MESSAGES: usize = 20_000;
const TPUT_QOS1_MAX: Duration = Duration::from_secs(10);
/// Notifies per write; each batch ends with a `stats` call that paces it.
const TPUT_BATCH: usize = 256;
/// While the spool is over half full the client polls `stats`, first after
/// 2 ms, doubling up to 32 ms: each call costs the daemon CPU time too,
/// which would count against the messages.
const TPUT_POLL_FIRST: Duration = Duration::from_millis(2);
const TPUT_POLL_MAX: Duration = Duration::from_millis(32);
/// How long the spool may take to drain, and deliveries to arrive, after
/// the offered load ends.
const DRAIN_MAX: Duration = Duration::from_secs(30);
const DELIVERY_MAX: Duration = Duration::from_secs(15);
const LATENCY_MESSAGES: usize = 1_000;
const LATENCY_MAX: Duration = Duration::from_secs(30);

// Targets, and Greengrass Lite's C iotcored on these machines.
const TARGET_RSS_KIB: u64 = 6 * 1024;
const TARGET_CPU_US: f64 = 25.0;
const TARGET_BINARY_BYTES: u64 = 1536 * 1024;
const TARGET_SPOOL_MESSAGES: i64 = 2_000;
const TARGET_SPOOL_BYTES: i64 = 1 << 20;
const TARGET_RATE_RATIO: f64 = 0.95;
const GGL_RSS_BYTES: f64 = 7.2e6;
const GGL_CPU_US: f64 = 50.0;

const SECS: fn(u64) -> Duration = Duration::from_secs;

fn main() -> ExitCode {
    let started = Instant::now();
    let mut report = Report::default();
    println!("iotcored benchmark");
    println!(
        "  machine: {} CPUs, load average {} (shared and noisy: compare ratios within this run)",
        thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg()
    );
    report.json("load_average_start", J::Str(loadavg()));

    let built_at = modified(Path::new(BIN));
    report.section("binary", "binary", binary_size);
    let unlimited = report.section(
        "unlimited",
        "build of the rate-unlimited variant",
        build_unlimited,
    );
    let broker = report.section("", "broker", |_| {
        Mosquitto::builder()
            // No broker-side drops towards a subscriber that lags behind.
            .config_line("max_queued_messages 0")
            // TLS 1.3 only, so the tap knows each record's overhead.
            .tls_version("tlsv1.3")
            .start()
    });
    if let Some(broker) = &broker {
        report.section("rate", "A. rate limit, count-bound", |r| {
            rate_phase(r, broker, "small", SMALL_PAYLOAD, 0, SMALL_WINDOW);
        });
        report.section("rate", "A. rate limit, byte-bound", |r| {
            rate_phase(r, broker, "big", BIG_PAYLOAD, 1, BIG_WINDOW);
        });
        if let Some(bin) = &unlimited {
            report.section(
                "unlimited",
                "B. throughput, CPU, latency (rate limit off)",
                |r| {
                    unlimited_run(r, broker, bin);
                },
            );
        }
    }
    report.section("full", "memory with every table full", tables_full);
    report.section("spool", "spool capacity in messages", spool_messages);
    if modified(Path::new(BIN)) != built_at {
        println!(
            "\nWARNING: {BIN} was rebuilt while the benchmark ran (a shared target \
             directory?): the figures above mix two builds"
        );
        report.json("binary_changed_during_run", J::Bool(true));
    }
    report.json("load_average_end", J::Str(loadavg()));
    report.json("bench_seconds", J::Num(started.elapsed().as_secs_f64()));
    if let Some(b) = &broker {
        save_artifact("mosquitto.log", &b.log());
    }
    drop(broker);
    report.finish()
}

// ---------------------------------------------------------------------------
// Sections

/// The stripped release binary's size.
fn binary_size(r: &mut Report) {
    let len = fs::metadata(BIN)
        .unwrap_or_else(|e| panic!("{BIN}: {e}"))
        .len();
    let mib = mib(len);
    println!("  {BIN}: {len} bytes ({mib:.2} MiB)");
    r.json(
        "binary",
        obj(vec![
            ("path", J::Str(BIN.into())),
            ("bytes", ju(len)),
            ("mib", J::Num(mib)),
        ]),
    );
    r.target(
        "stripped release binary",
        format!("{mib:.2} MiB ({len} B)"),
        "≤ 1.5 MiB",
        len <= TARGET_BINARY_BYTES,
        String::new(),
    );
}

/// Builds the variant with both publish limits at 0 (cargo skips the work
/// when `make bench` or an earlier run built it already).
fn build_unlimited(r: &mut Report) -> PathBuf {
    let dir = Path::new(MANIFEST_DIR).join(UNLIMITED_TARGET_DIR);
    let t = Instant::now();
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "--release", "--quiet", "--bin", "iotcored"])
        .current_dir(MANIFEST_DIR)
        .env("CARGO_TARGET_DIR", &dir)
        .env("IOTCORED_PUBLISH_RATE", "0")
        .env("IOTCORED_PUBLISH_BYTES_PER_SEC", "0");
    // What cargo set for this test process; some build scripts (ring's)
    // track e.g. CARGO_MANIFEST_DIR, and would rebuild from scratch what
    // `make bench` built a moment ago.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        let set_by_cargo = key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_EXE_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
                "OUT_DIR",
            ]
            .contains(&key.as_str());
        if set_by_cargo {
            cmd.env_remove(&key);
        }
    }
    let status = cmd.status().expect("run cargo build");
    assert!(status.success(), "cargo build of the variant: {status}");
    let bin = dir.join("release/iotcored");
    assert!(bin.exists(), "no {}", bin.display());
    println!("  {} ({:.1} s)", bin.display(), t.elapsed().as_secs_f64());
    r.json("unlimited_binary", J::Str(bin.display().to_string()));
    bin
}

/// A: a fresh default daemon, load far above the limit for `RATE_PHASE`,
/// arrivals timed at the broker.
fn rate_phase(
    r: &mut Report,
    broker: &Mosquitto,
    name: &str,
    want_payload: usize,
    qos: i64,
    window: usize,
) {
    let topic = format!("bench/rate/{name}");
    let payload_len = largest_payload(&topic, qos, want_payload);
    let packet = publish_packet_len(topic.len(), payload_len, qos);
    let max_count = consts::PUBLISH_RATE;
    let max_bytes = consts::PUBLISH_BYTES_PER_SEC;
    assert!(
        max_count > 0 || max_bytes > 0,
        "this build has no rate limit"
    );
    // Which limit binds: the one allowing fewer packets per second.
    let by_bytes = u64::try_from(max_bytes).unwrap_or(u64::MAX) / packet.max(1);
    let bytes_bind = max_bytes > 0 && (max_count == 0 || by_bytes < as_u64(max_count));
    println!(
        "  payload {payload_len} B, QoS {qos}, PUBLISH packet {packet} B, {} offered for {} s; \
         limits {max_count}/s and {} B/s ({} binds)",
        if qos == 0 {
            "pipelined calls (a full queue evicts, so no BUSY)"
        } else {
            "pipelined calls retried after BUSY"
        },
        RATE_PHASE.as_secs(),
        max_bytes,
        if bytes_bind { "bytes" } else { "count" },
    );

    let tap = Tap::start(broker.port());
    let (daemon, sock) = start_daemon(Path::new(BIN), tap.port, &format!("bench-{name}"));
    wait_connected(&daemon);
    let sub = timed_subscriber(broker, &topic);
    let pid = daemon.pid();
    if name == "small" {
        // The default build connected and idle: the "idle" figure.
        thread::sleep(SECS(1));
        let m = mem(pid).expect("daemon memory");
        println!(
            "  daemon idle after connecting: VmRSS {} KiB, VmHWM {} KiB",
            m.rss_kib, m.hwm_kib
        );
        r.json("memory_idle_default", m.json());
        r.target(
            "RSS idle (default build, connected)",
            format!("{:.2} MiB", kib_mib(m.rss_kib)),
            "≤ 6 MiB",
            m.rss_kib <= TARGET_RSS_KIB,
            ggl_rss_ratio(m.rss_kib),
        );
    }
    let sampler = Sampler::start(pid);
    let cpu0 = cpu_secs(pid);
    let t0_unix = unix_now();
    let t0 = Instant::now();
    let offered = offer_load(&sock, &topic, &vec![b'r'; payload_len], qos, window);
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu1 = cpu_secs(pid);
    let samples = sampler.finish();
    let st = stats(&mut BusClient::connect(&sock));
    thread::sleep(ARRIVAL_GRACE);
    save_artifact(&format!("daemon-rate-{name}.log"), &daemon.log());
    drop(daemon);
    let ingress = tap.packets(t0_unix, packet, RATE_PHASE.as_secs_f64());
    drop(tap);
    let mut arrivals: Vec<(f64, u64)> = arrivals(&sub, t0_unix)
        .into_iter()
        .filter(|a| a.t >= 0.0 && a.t < RATE_PHASE.as_secs_f64())
        .map(|a| (a.t, publish_packet_len(a.topic_len, a.len, qos)))
        .collect();
    drop(sub);
    arrivals.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut raw = String::from("# seconds since the load started, PUBLISH packet bytes\n");
    for (t, b) in &arrivals {
        let _ = writeln!(raw, "{t:.6} {b}");
    }
    save_artifact(&format!("rate-{name}-arrivals.txt"), &raw);

    let w = Windows::of(&arrivals, RATE_PHASE.as_secs());
    let secs = RATE_PHASE.as_secs_f64();
    let avg_count = as_f64(w.total_count) / secs;
    let avg_bytes = w.total_bytes as f64 / secs;
    let count_ratio = ratio(avg_count, max_count);
    let bytes_ratio = ratio(avg_bytes, max_bytes);
    let cpu = cpu0.zip(cpu1).map(|(a, b)| b - a);
    let accepted_per_s = offered.accepted as f64 / elapsed;
    let cpu_per_call = cpu.map(|c| c * 1e6 / offered.calls.max(1) as f64);
    println!(
        "  offered {} calls in {elapsed:.1} s: {} accepted, {} BUSY; daemon: published {}, \
         sent {}, evicted {}, busy {}, CPU {}",
        offered.calls,
        offered.accepted,
        offered.busy,
        st.get("published").unwrap_or(&-1),
        st.get("sent").unwrap_or(&-1),
        st.get("evicted").unwrap_or(&-1),
        st.get("busy").unwrap_or(&-1),
        cpu.map_or("?".into(), |c| format!(
            "{c:.2} s ({:.0} % of one core)",
            100.0 * c / elapsed
        )),
    );
    if qos == 0 {
        println!(
            "  the daemon took {accepted_per_s:.0} publishes/s from one pipelining client, {} µs \
             CPU per call answered (queued, evicting the oldest)",
            opt(cpu_per_call, 1)
        );
    }
    let wi = Windows::of(&ingress, RATE_PHASE.as_secs());
    println!(
        "  per second:    at the broker-side subscriber   |  at the broker's TCP ingress (tap)"
    );
    for (i, ((n, b), (ni, bi))) in w.per_second.iter().zip(&wi.per_second).enumerate() {
        println!(
            "    {:>2}–{:<2} s  {:>4} msgs {:>8} B {:>6.1} KiB  |  {:>4} msgs {:>8} B {:>6.1} KiB",
            i,
            i + 1,
            n,
            b,
            *b as f64 / 1024.0,
            ni,
            bi,
            *bi as f64 / 1024.0
        );
    }
    println!(
        "  busiest 1 s sliding window: {} msgs (limit {max_count}), {} B (limit {max_bytes})",
        w.max_count, w.max_bytes
    );
    let b = Bursts::of(&arrivals);
    println!(
        "  shape: {} bursts (arrivals > {} ms apart start a new one) of {}–{} msgs, each \
         spread over {:.0}–{:.0} ms first to last; longest silence {:.0} ms (from {:.2} s)",
        b.count,
        BURST_GAP * 1000.0,
        b.min_len,
        b.max_len,
        b.min_spread * 1000.0,
        b.max_spread * 1000.0,
        b.longest_gap * 1000.0,
        b.longest_gap_at
    );
    println!(
        "  average: {avg_count:.1} msgs/s = {:.1} % of {max_count}/s; {:.0} B/s = {:.1} % of {max_bytes} B/s",
        100.0 * count_ratio,
        avg_bytes,
        100.0 * bytes_ratio
    );
    println!(
        "  RSS during the load: {} (spool full of {} KiB)",
        rss_range(&samples),
        st.get("spooled_bytes").copied().unwrap_or(0) / 1024
    );

    let bi = Bursts::of(&ingress);
    println!(
        "  the same at the broker's TCP ingress (a tap between daemon and broker, reading \
         TLS 1.3 records): {} packets ({:.1} % of the binding limit); busiest 1 s window {} \
         packets, {} B; bursts spread over {:.0}–{:.0} ms; longest silence {:.0} ms (from \
         {:.2} s)",
        wi.total_count,
        100.0
            * if bytes_bind {
                ratio(wi.total_bytes as f64 / secs, max_bytes)
            } else {
                ratio(as_f64(wi.total_count) / secs, max_count)
            },
        wi.max_count,
        wi.max_bytes,
        bi.min_spread * 1000.0,
        bi.max_spread * 1000.0,
        bi.longest_gap * 1000.0,
        bi.longest_gap_at
    );

    let label = format!("rate, {payload_len} B QoS {qos}");
    let notes = [
        "with the broker's and subscriber's queueing",
        "the daemon's own output",
    ];
    for ((place, w), note) in [("subscriber", &w), ("broker ingress", &wi)]
        .into_iter()
        .zip(notes)
    {
        if max_count > 0 {
            r.target(
                &format!("{label}: max msgs in any 1 s at the {place}"),
                format!("{}", w.max_count),
                &format!("≤ {max_count}"),
                w.max_count <= max_count,
                note.into(),
            );
        }
        if max_bytes > 0 {
            r.target(
                &format!("{label}: max bytes in any 1 s at the {place}"),
                format!("{}", w.max_bytes),
                &format!("≤ {max_bytes}"),
                w.max_bytes <= as_u64(max_bytes),
                note.into(),
            );
        }
    }
    let (binding, binding_ratio) = if bytes_bind {
        ("bytes", bytes_ratio)
    } else {
        ("msgs", count_ratio)
    };
    r.target(
        &format!("{label}: average {binding}/s vs limit"),
        format!("{:.1} %", 100.0 * binding_ratio),
        "≥ 95 %",
        binding_ratio >= TARGET_RATE_RATIO,
        String::new(),
    );
    r.push_json(
        "rate_limit",
        obj(vec![
            ("phase", J::Str(name.into())),
            ("payload_bytes", ju(as_u64(payload_len))),
            ("packet_bytes", ju(packet)),
            ("qos", J::Int(qos)),
            ("seconds", J::Num(secs)),
            ("limit_count_per_s", ju(as_u64(max_count))),
            ("limit_bytes_per_s", ju(as_u64(max_bytes))),
            ("binding_limit", J::Str(binding.into())),
            ("offered_calls", ju(offered.calls)),
            ("accepted", ju(offered.accepted)),
            ("busy_answers", ju(offered.busy)),
            ("accepted_per_s", J::Num(accepted_per_s)),
            (
                "daemon_cpu_us_per_call",
                cpu_per_call.map_or(J::Null, J::Num),
            ),
            ("daemon_stats", stats_json(&st)),
            ("daemon_cpu_seconds", cpu.map_or(J::Null, J::Num)),
            (
                "per_second",
                J::Arr(
                    w.per_second
                        .iter()
                        .map(|(n, b)| obj(vec![("count", ju(*n)), ("bytes", ju(*b))]))
                        .collect(),
                ),
            ),
            ("max_window_count", ju(as_u64(w.max_count))),
            ("max_window_bytes", ju(w.max_bytes)),
            ("burst_spread_ms_max", J::Num(b.max_spread * 1000.0)),
            ("longest_silence_ms", J::Num(b.longest_gap * 1000.0)),
            ("ingress_packets", ju(as_u64(wi.total_count))),
            (
                "ingress_per_second",
                J::Arr(
                    wi.per_second
                        .iter()
                        .map(|(n, b)| obj(vec![("count", ju(*n)), ("bytes", ju(*b))]))
                        .collect(),
                ),
            ),
            (
                "ingress_longest_silence_ms",
                J::Num(bi.longest_gap * 1000.0),
            ),
            ("ingress_max_window_count", ju(as_u64(wi.max_count))),
            ("ingress_max_window_bytes", ju(wi.max_bytes)),
            (
                "ingress_burst_spread_ms_max",
                J::Num(bi.max_spread * 1000.0),
            ),
            ("avg_count_per_s", J::Num(avg_count)),
            ("avg_bytes_per_s", J::Num(avg_bytes)),
            ("avg_count_ratio", J::Num(count_ratio)),
            ("avg_bytes_ratio", J::Num(bytes_ratio)),
            ("rss_kib_min_max", samples_json(&samples)),
        ]),
    );
}

/// B: one rate-unlimited daemon: idle memory, QoS 0 and QoS 1 throughput,
/// memory after the load, then the round-trip latency.
fn unlimited_run(r: &mut Report, broker: &Mosquitto, bin: &Path) {
    let (daemon, sock) = start_daemon(bin, broker.port(), "bench-unlimited");
    wait_connected(&daemon);
    let pid = daemon.pid();
    thread::sleep(SECS(1));
    let idle = mem(pid).expect("daemon memory");
    println!(
        "  variant idle after connecting: VmRSS {} KiB, VmHWM {} KiB",
        idle.rss_kib, idle.hwm_kib
    );
    r.json("memory_idle_unlimited", idle.json());

    let q0 = throughput(broker, &daemon, &sock, 0, TPUT_QOS0_MESSAGES, TPUT_QOS0_MAX);
    q0.print();
    thread::sleep(SECS(1));
    let after = mem(pid).expect("daemon memory");
    println!(
        "  after the QoS 0 load (spool drained, 1 s later): VmRSS {} KiB, VmHWM {} KiB",
        after.rss_kib, after.hwm_kib
    );
    if let Some(us) = q0.cpu_us_stat {
        r.target(
            "CPU per QoS 0 publish (rate limit off)",
            format!(
                "{us:.1} µs at {:.0}/s",
                Throughput::rate(q0.published as f64, q0.drain_secs)
            ),
            "≤ 25 µs",
            us <= TARGET_CPU_US,
            format!("GGL C ~50 µs: ×{:.2}", us / GGL_CPU_US),
        );
    }
    let q1 = throughput(broker, &daemon, &sock, 1, TPUT_QOS1_MESSAGES, TPUT_QOS1_MAX);
    q1.print();
    // Even with both limits at 0 the limiter keeps a window of 1024 sends,
    // which the loads above filled: let it empty first.
    thread::sleep(iotcored::limits::RATE_WINDOW + Duration::from_millis(200));
    let lat = latency(&sock);
    let end = mem(pid).expect("daemon memory");
    println!(
        "  at the end: VmRSS {} KiB, VmHWM {} KiB",
        end.rss_kib, end.hwm_kib
    );
    let flat = q0.rss.iter().chain(&q1.rss).copied();
    let (lo, hi) = flat.fold((u64::MAX, 0), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if hi > 0 {
        println!(
            "  RSS sampled every second under load: {lo}–{hi} KiB ({} KiB spread)",
            hi - lo
        );
    }
    r.json(
        "throughput",
        obj(vec![
            ("qos0", q0.json()),
            ("qos1", q1.json()),
            ("memory_after_qos0", after.json()),
            ("memory_end", end.json()),
        ]),
    );
    r.json("latency", lat);
}

/// Memory with every table full: bus clients, local subscriptions (broker
/// filters, shared filters and virtual ones), and the spool filled to its
/// byte capacity while the broker is unreachable.
fn tables_full(r: &mut Report) {
    let port = free_port(); // nothing listens there
    let (daemon, sock) = start_daemon(Path::new(BIN), port, "bench-full");
    let pid = daemon.pid();
    thread::sleep(Duration::from_millis(500));
    let start = mem(pid).expect("daemon memory");
    println!(
        "  offline daemon at start: VmRSS {} KiB, VmHWM {} KiB",
        start.rss_kib, start.hwm_kib
    );
    let mut ctl = BusClient::connect(&sock);
    set_write_timeout(&mut ctl);

    // Subscriptions: distinct broker filters up to the broker table, then
    // shared copies of those, then virtual ones; about 60 % streamed (one
    // bus connection each), the rest delivered to response endpoints.
    let total = consts::MAX_SUBSCRIPTIONS;
    let broker_table = consts::SUBSCRIPTIONS_PER_CONNECTION * consts::MAX_CONNECTIONS;
    let distinct = broker_table.min(total / 2).max(1);
    let shared = (total - distinct) / 2;
    let mut streams = Vec::new();
    let mut endpoint_subs = 0;
    for i in 0..total {
        let (filter, virt) = if i < distinct {
            (format!("bench/full/{i}"), false)
        } else if i < distinct + shared {
            (format!("bench/full/{}", i % distinct), false)
        } else {
            (format!("bench/virt/{i}"), true)
        };
        // Keep a bus slot for `ctl` and one for the over-capacity probe.
        let streamed = i % 5 < 3 && streams.len() + 2 < consts::MAX_BUS_CLIENTS;
        if streamed {
            let mut c = BusClient::connect(&sock);
            c.send(
                "subscribe",
                RequestType::Subscribe,
                &params(&[
                    ("topic_filter", V::Buf(filter.as_bytes())),
                    ("qos", V::I64(0)),
                    ("virtual", V::Bool(virt)),
                ]),
            );
            let reply = c.read();
            assert_eq!(reply, Some(Reply::Accepted), "subscription {i} ({filter})");
            streams.push(c);
        } else {
            let endpoint = format!("bench_ep{i}");
            let reply = ctl.call(
                "subscribe",
                &params(&[
                    ("topic_filter", V::Buf(filter.as_bytes())),
                    ("qos", V::I64(0)),
                    ("virtual", V::Bool(virt)),
                    ("response_endpoint", V::Buf(endpoint.as_bytes())),
                ]),
            );
            assert!(is_null(&reply), "subscription {i} ({filter}): {reply:?}");
            endpoint_subs += 1;
        }
    }
    let over = ctl.call(
        "subscribe",
        &params(&[
            ("topic_filter", V::Buf(b"bench/full/extra")),
            ("response_endpoint", V::Buf(b"bench_ep_extra")),
        ]),
    );
    let over_nomem = over == Some(Reply::Error(code::NOMEM));
    // Idle bus clients up to the table's size.
    let mut idle = Vec::new();
    for _ in 0..consts::MAX_BUS_CLIENTS.saturating_sub(1 + streams.len()) {
        idle.push(BusClient::connect(&sock));
    }
    let st = stats(&mut ctl);
    let extra_closed = match BusClient::try_connect(&sock) {
        Some(mut c) => {
            c.timeout(SECS(2));
            c.closed()
        }
        None => true,
    };
    let clients = 1 + streams.len() + idle.len();
    println!(
        "  {total} subscriptions ({distinct} broker filters, {shared} shared, {} virtual; \
         {} streamed, {endpoint_subs} to response endpoints); one more: {}",
        total - distinct - shared,
        streams.len(),
        match &over {
            Some(Reply::Error(c)) =>
                format!("error {c}{}", if over_nomem { " (NOMEM)" } else { "" }),
            other => format!("{other:?}"),
        }
    );
    println!(
        "  {clients} bus clients connected; client {} closed at once: {extra_closed}",
        clients + 1
    );
    let before_spool = mem(pid).expect("daemon memory");

    // The spool: QoS 1 (never evicted) until BUSY, large messages first,
    // then smaller ones into what is left.
    let big = largest_payload("bench/spool", 1, BIG_PAYLOAD);
    let mut held = 0usize;
    for size in [big, 1000, 100, 10, 0] {
        let frame = publish_params("bench/spool", &vec![b's'; size], 1);
        for _ in 0..=consts::SPOOL_MESSAGES {
            match ctl.call("publish", &frame) {
                Some(Reply::Payload(p)) if p == [0] => held += 1,
                Some(Reply::Error(code::BUSY)) => break,
                other => panic!("publish of {size} B to a filling spool: {other:?}"),
            }
        }
    }
    let st_full = stats(&mut ctl);
    let full = mem(pid).expect("daemon memory");
    let spooled = st_full.get("spooled").copied().unwrap_or(-1);
    let spooled_bytes = st_full.get("spooled_bytes").copied().unwrap_or(-1);
    println!(
        "  spool filled with QoS 1 until BUSY ({big} B payloads, then smaller): {held} accepted; \
         stats: spooled {spooled}, spooled_bytes {spooled_bytes} ({:.3} MiB)",
        spooled_bytes as f64 / 1_048_576.0
    );
    println!(
        "  VmRSS: {} KiB with clients and subscriptions, {} KiB with the spool full too \
         (VmHWM {} KiB)",
        before_spool.rss_kib, full.rss_kib, full.hwm_kib
    );
    let alive = stats(&mut ctl).contains_key("published");
    drop(streams);
    drop(idle);
    drop(ctl);
    drop(daemon);

    r.target(
        "RSS with every table full",
        format!("{:.2} MiB", kib_mib(full.rss_kib)),
        "≤ 6 MiB",
        full.rss_kib <= TARGET_RSS_KIB && clients == consts::MAX_BUS_CLIENTS,
        ggl_rss_ratio(full.rss_kib),
    );
    r.target(
        "spool capacity in bytes",
        format!("{spooled_bytes} B"),
        "≥ 1 MiB (to within one 7 B packet)",
        spooled_bytes >= TARGET_SPOOL_BYTES - 7,
        String::new(),
    );
    r.json(
        "memory_tables_full",
        obj(vec![
            ("bus_clients", ju(as_u64(clients))),
            ("extra_client_closed", J::Bool(extra_closed)),
            ("subscriptions", ju(as_u64(total))),
            ("broker_filters", ju(as_u64(distinct))),
            ("shared", ju(as_u64(shared))),
            ("virtual", ju(as_u64(total - distinct - shared))),
            ("extra_subscription_nomem", J::Bool(over_nomem)),
            ("spool_accepted", ju(as_u64(held))),
            ("spooled", J::Int(spooled)),
            ("spooled_bytes", J::Int(spooled_bytes)),
            ("memory_start", start.json()),
            ("memory_clients_subscriptions", before_spool.json()),
            ("memory_full", full.json()),
            ("still_answering", J::Bool(alive)),
            ("stats_before_spool", stats_json(&st)),
        ]),
    );
}

/// The spool's capacity in messages: small QoS 1 publishes to an offline
/// daemon until BUSY.
fn spool_messages(r: &mut Report) {
    let (daemon, sock) = start_daemon(Path::new(BIN), free_port(), "bench-spool");
    let mut c = BusClient::connect(&sock);
    set_write_timeout(&mut c);
    let frame = publish_params("bench/spool", &[b'm'; SMALL_PAYLOAD], 1);
    let mut held = 0usize;
    let mut busy = false;
    for _ in 0..=2 * consts::SPOOL_MESSAGES {
        match c.call("publish", &frame) {
            Some(Reply::Payload(p)) if p == [0] => held += 1,
            Some(Reply::Error(code::BUSY)) => {
                busy = true;
                break;
            }
            other => panic!("publish to a filling spool: {other:?}"),
        }
    }
    let st = stats(&mut c);
    let m = mem(daemon.pid()).expect("daemon memory");
    let spooled = st.get("spooled").copied().unwrap_or(-1);
    let spooled_bytes = st.get("spooled_bytes").copied().unwrap_or(-1);
    println!(
        "  {SMALL_PAYLOAD} B QoS 1 publishes to an offline daemon: {held} accepted, then {}; \
         spooled {spooled}, {spooled_bytes} B; VmRSS {} KiB",
        if busy { "BUSY" } else { "no BUSY (!)" },
        m.rss_kib
    );
    r.target(
        "spool capacity in messages",
        format!("{spooled}"),
        "≥ 2000",
        spooled >= TARGET_SPOOL_MESSAGES,
        String::new(),
    );
    r.json(
        "spool_messages",
        obj(vec![
            ("payload_bytes", ju(as_u64(SMALL_PAYLOAD))),
            ("accepted", ju(as_u64(held))),
            ("busy", J::Bool(busy)),
            ("spooled", J::Int(spooled)),
            ("spooled_bytes", J::Int(spooled_bytes)),
            ("memory", m.json()),
        ]),
    );
}

// ---------------------------------------------------------------------------
// Load generators

#[derive(Default)]
struct Offered {
    calls: u64,
    accepted: u64,
    busy: u64,
}

/// Pipelined `publish` calls, `window` outstanding, for `RATE_PHASE`; after
/// a BUSY answer, a short pause before offering more.
fn offer_load(sock: &Path, topic: &str, payload: &[u8], qos: i64, window: usize) -> Offered {
    let mut c = BusClient::connect(sock);
    set_write_timeout(&mut c);
    let frame = request(
        "publish",
        RequestType::Call,
        &publish_params(topic, payload, qos),
    );
    let mut o = Offered::default();
    let mut outstanding = 0usize;
    let mut batch = Vec::with_capacity(frame.len() * window);
    fn answer(c: &mut BusClient, o: &mut Offered) {
        match c.read() {
            Some(Reply::Payload(p)) if p == [0] => o.accepted += 1,
            Some(Reply::Error(code::BUSY)) => {
                o.busy += 1;
                thread::sleep(BUSY_PAUSE);
            }
            other => panic!("publish answer: {other:?}"),
        }
    }
    let deadline = Instant::now() + RATE_PHASE;
    while Instant::now() < deadline {
        batch.clear();
        while outstanding < window {
            batch.extend_from_slice(&frame);
            outstanding += 1;
            o.calls += 1;
        }
        if !batch.is_empty() {
            c.send_raw(&batch);
        }
        answer(&mut c, &mut o);
        outstanding -= 1;
    }
    for _ in 0..outstanding {
        answer(&mut c, &mut o);
    }
    o
}

/// One throughput run's figures.
struct Throughput {
    qos: i64,
    offered: usize,
    published: i64,
    evicted: i64,
    busy: i64,
    dropped: i64,
    accept_secs: f64,
    drain_secs: f64,
    drained: bool,
    stats_calls: usize,
    delivered: usize,
    deliver_secs: f64,
    max_window: usize,
    cpu_secs: Option<f64>,
    cpu_us_stat: Option<f64>,
    cpu_us_sched: Option<f64>,
    rss: Vec<u64>,
    hwm_kib: u64,
}

impl Throughput {
    fn rate(n: f64, secs: f64) -> f64 {
        if secs > 0.0 {
            n / secs
        } else {
            0.0
        }
    }

    fn print(&self) {
        println!(
            "  QoS {}: {} offered, {} accepted in {:.1} s = {:.0} msgs/s accepted; \
             all sent{} after {:.1} s = {:.0} msgs/s",
            self.qos,
            self.offered,
            self.published,
            self.accept_secs,
            Self::rate(self.published as f64, self.accept_secs),
            if self.qos == 1 { " and acked" } else { "" },
            self.drain_secs,
            Self::rate(self.published as f64, self.drain_secs),
        );
        println!(
            "    delivered at the broker-side subscriber: {} ({:.2} % of accepted) at {:.0} msgs/s; \
             busiest 1 s window there {} msgs; evicted {}, busy {}, dropped {}{}",
            self.delivered,
            100.0 * as_f64(self.delivered) / (self.published.max(1) as f64),
            Self::rate(as_f64(self.delivered), self.deliver_secs),
            self.max_window,
            self.evicted,
            self.busy,
            self.dropped,
            if self.drained { "" } else { "; the spool did NOT drain in time" },
        );
        println!(
            "    daemon CPU: {} s ({} % of one core) = {} µs per message (utime+stime), {} µs \
             (schedstat), {} pacing `stats` calls included; RSS {}, VmHWM {} KiB",
            opt(self.cpu_secs, 2),
            opt(self.cpu_secs.map(|c| 100.0 * c / self.drain_secs), 0),
            opt(self.cpu_us_stat, 1),
            opt(self.cpu_us_sched, 1),
            self.stats_calls,
            rss_range(&self.rss),
            self.hwm_kib
        );
        let sent_rate = Self::rate(self.published as f64, self.drain_secs);
        if (950.0..1100.0).contains(&sent_rate) {
            println!(
                "    note: ≈ 1024 sends per 1.02 s, the daemon far from busy: with \
                 IOTCORED_PUBLISH_RATE=0 the limiter still keeps a window of 1024 slots \
                 (UNLIMITED_COUNT_SLOTS, src/limits.rs) and waits for a free one"
            );
        }
    }

    fn json(&self) -> J {
        obj(vec![
            ("qos", J::Int(self.qos)),
            ("payload_bytes", ju(as_u64(TPUT_PAYLOAD))),
            ("offered", ju(as_u64(self.offered))),
            ("accepted", J::Int(self.published)),
            ("evicted", J::Int(self.evicted)),
            ("busy", J::Int(self.busy)),
            ("dropped", J::Int(self.dropped)),
            ("accept_seconds", J::Num(self.accept_secs)),
            (
                "accepted_per_s",
                J::Num(Self::rate(self.published as f64, self.accept_secs)),
            ),
            ("drained", J::Bool(self.drained)),
            ("drain_seconds", J::Num(self.drain_secs)),
            ("stats_calls", ju(as_u64(self.stats_calls))),
            (
                "sent_per_s",
                J::Num(Self::rate(self.published as f64, self.drain_secs)),
            ),
            ("delivered", ju(as_u64(self.delivered))),
            (
                "delivered_per_s",
                J::Num(Self::rate(as_f64(self.delivered), self.deliver_secs)),
            ),
            ("max_window_count", ju(as_u64(self.max_window))),
            ("cpu_seconds", self.cpu_secs.map_or(J::Null, J::Num)),
            ("cpu_us_per_msg", self.cpu_us_stat.map_or(J::Null, J::Num)),
            (
                "cpu_us_per_msg_schedstat",
                self.cpu_us_sched.map_or(J::Null, J::Num),
            ),
            ("rss_kib_min_max", samples_json(&self.rss)),
            ("vm_hwm_kib", ju(self.hwm_kib)),
        ])
    }
}

/// Up to `n` notifies of `TPUT_PAYLOAD` bytes, as fast as the daemon takes
/// them for at most `max`: batches of `TPUT_BATCH` written at once, each
/// followed by a `stats` call whose answer (in order, so after the batch)
/// says how full the spool is; past half full the client waits, so nothing
/// is evicted (QoS 0) or refused (QoS 1).
fn throughput(
    broker: &Mosquitto,
    daemon: &Daemon,
    sock: &Path,
    qos: i64,
    n: usize,
    max: Duration,
) -> Throughput {
    let topic = format!("bench/tput/q{qos}");
    let sub = timed_subscriber(broker, &topic);
    let pid = daemon.pid();
    let mut c = BusClient::connect(sock);
    set_write_timeout(&mut c);
    let s0 = stats(&mut c);
    let one = request(
        "publish",
        RequestType::Notify,
        &publish_params(&topic, &[b't'; TPUT_PAYLOAD], qos),
    );
    let stats_call = request("stats", RequestType::Call, &params(&[]));
    let mut batch = one.repeat(TPUT_BATCH);
    batch.extend_from_slice(&stats_call);
    let high_water = i64::try_from(consts::SPOOL_MESSAGES / 2).unwrap_or(i64::MAX);

    let sampler = Sampler::start(pid);
    let cpu0 = cpu_secs(pid);
    let ns0 = sched_ns(pid);
    let t0_unix = unix_now();
    let t0 = Instant::now();
    let mut offered = 0usize;
    let mut stats_calls = 0usize;
    while offered < n && t0.elapsed() < max {
        c.send_raw(&batch);
        offered += TPUT_BATCH;
        stats_calls += 1;
        let mut spooled = read_stats(&mut c).get("spooled").copied().unwrap_or(0);
        let mut pause = TPUT_POLL_FIRST;
        for _ in 0..10_000 {
            if spooled <= high_water || t0.elapsed() >= max {
                break;
            }
            thread::sleep(pause);
            pause = (pause * 2).min(TPUT_POLL_MAX);
            stats_calls += 1;
            spooled = stats(&mut c).get("spooled").copied().unwrap_or(0);
        }
    }
    let accept_secs = t0.elapsed().as_secs_f64();
    stats_calls += 1;
    let mut s1 = stats(&mut c);
    let delta = |s: &HashMap<String, i64>, k: &str| {
        s.get(k).copied().unwrap_or(0) - s0.get(k).copied().unwrap_or(0)
    };
    let published = delta(&s1, "published");
    let done_key = if qos == 0 { "sent" } else { "acked" };
    let drained = wait_every(DRAIN_MAX, Duration::from_millis(20), || {
        stats_calls += 1;
        s1 = stats(&mut c);
        delta(&s1, done_key) >= published
    });
    let cpu1 = cpu_secs(pid);
    let ns1 = sched_ns(pid);
    let drain_secs = t0.elapsed().as_secs_f64();
    let rss = sampler.finish();
    let hwm_kib = mem(pid).map_or(0, |m| m.hwm_kib);
    let want = usize::try_from(delta(&s1, "sent")).unwrap_or(0);
    wait_every(DELIVERY_MAX, Duration::from_millis(200), || {
        sub.output().lines().count() >= want
    });
    let arr = arrivals(&sub, t0_unix);
    drop(sub);
    let deliver_secs = arr.iter().map(|a| a.t).fold(0.0, f64::max);
    let times: Vec<(f64, u64)> = arr.iter().map(|a| (a.t, 0)).collect();
    let max_window = Windows::of(&times, 0).max_count;

    let per_msg = |total: Option<f64>| {
        total
            .filter(|_| published > 0)
            .map(|t| t * 1e6 / published as f64)
    };
    let cpu_secs = cpu0.zip(cpu1).map(|(a, b)| b - a);
    let sched = ns0.zip(ns1).map(|(a, b)| (b - a) as f64 / 1e9);
    Throughput {
        qos,
        offered,
        published,
        evicted: delta(&s1, "evicted"),
        busy: delta(&s1, "busy"),
        dropped: delta(&s1, "dropped"),
        accept_secs,
        drain_secs,
        drained,
        stats_calls,
        delivered: arr.len(),
        deliver_secs,
        max_window,
        cpu_secs,
        cpu_us_stat: per_msg(cpu_secs),
        cpu_us_sched: per_msg(sched),
        rss,
        hwm_kib,
    }
}

/// Sequential QoS 0 publishes to a topic a bus client of the same daemon
/// subscribes to: the publish call → message received round trip, through
/// TLS and mosquitto and back.
fn latency(sock: &Path) -> J {
    let topic = "bench/latency";
    let mut sub = BusClient::connect(sock);
    sub.send(
        "subscribe",
        RequestType::Subscribe,
        &subscribe_params(&[topic], 0),
    );
    assert_eq!(sub.read(), Some(Reply::Accepted), "latency subscription");
    sub.timeout(SECS(5));
    let mut publisher = BusClient::connect(sock);
    set_write_timeout(&mut publisher);
    publisher.timeout(SECS(5));
    let mut round_trips = Vec::with_capacity(LATENCY_MESSAGES);
    let mut answers = Vec::with_capacity(LATENCY_MESSAGES);
    let mut lost = 0usize;
    let deadline = Instant::now() + LATENCY_MAX;
    for i in 0..LATENCY_MESSAGES {
        if Instant::now() >= deadline {
            break;
        }
        let mut payload = format!("{i:010}").into_bytes();
        payload.resize(TPUT_PAYLOAD, b'.');
        let frame = publish_params(topic, &payload, 0);
        let t = Instant::now();
        let reply = publisher.call("publish", &frame);
        assert!(is_null(&reply), "latency publish: {reply:?}");
        answers.push(t.elapsed());
        let mut got = false;
        // Bounded: each read waits at most 5 s, and a stale message (from a
        // lost round) is skipped at most a few times.
        for _ in 0..8 {
            match sub.read() {
                Some(reply) => {
                    if reply.message().1 == payload {
                        got = true;
                        break;
                    }
                }
                None => break,
            }
        }
        if got {
            round_trips.push(t.elapsed());
        } else {
            lost += 1;
        }
    }
    round_trips.sort();
    answers.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let pct = |v: &[Duration], per_mille: usize| -> f64 {
        if v.is_empty() {
            return 0.0;
        }
        let idx = (v.len() * per_mille).div_ceil(1000).saturating_sub(1);
        us(v[idx.min(v.len() - 1)])
    };
    let max = round_trips.last().copied().map_or(0.0, us);
    println!(
        "  round trip bus → daemon → TLS → mosquitto → daemon → bus, {} sequential QoS 0 \
         messages of {TPUT_PAYLOAD} B: p50 {:.0} µs, p99 {:.0} µs, max {max:.0} µs{}",
        round_trips.len(),
        pct(&round_trips, 500),
        pct(&round_trips, 990),
        if lost > 0 {
            format!(", {lost} lost")
        } else {
            String::new()
        }
    );
    println!(
        "  publish call answered (queued): p50 {:.0} µs, p99 {:.0} µs",
        pct(&answers, 500),
        pct(&answers, 990)
    );
    obj(vec![
        ("messages", ju(as_u64(round_trips.len()))),
        ("lost", ju(as_u64(lost))),
        ("p50_us", J::Num(pct(&round_trips, 500))),
        ("p99_us", J::Num(pct(&round_trips, 990))),
        ("max_us", J::Num(max)),
        ("call_answer_p50_us", J::Num(pct(&answers, 500))),
        ("call_answer_p99_us", J::Num(pct(&answers, 990))),
    ])
}

// ---------------------------------------------------------------------------
// The daemon, the subscriber and /proc

/// `bin` against 127.0.0.1:`port`, its bus socket in its own directory,
/// logging at the production level (info).
fn start_daemon(bin: &Path, port: u16, id: &str) -> (Daemon, PathBuf) {
    let mut args = iotcored_args(Pki::get(), port, id);
    args.extend(["--socket-dir".into(), ".".into()]);
    let d = Daemon::builder(bin)
        .args(args)
        .env("RUST_LOG", "info")
        .start();
    let sock = d.dir().join("aws_iot_mqtt");
    assert!(
        wait_until(SECS(5), || sock.exists()),
        "no bus socket; log:\n{}",
        d.log()
    );
    (d, sock)
}

fn wait_connected(d: &Daemon) {
    assert!(
        d.wait_log("connected (session present", SECS(10)),
        "the daemon did not connect; log:\n{}",
        d.log()
    );
}

fn set_write_timeout(c: &mut BusClient) {
    c.stream()
        .set_write_timeout(Some(SECS(10)))
        .expect("set a write timeout");
}

/// A mosquitto_sub printing `<unix time with ns> <payload length> <topic>`.
fn timed_subscriber(broker: &Mosquitto, filter: &str) -> Subscriber {
    Subscriber::builder(broker, filter)
        .arg("-F")
        .arg("%U %l %t")
        .start()
}

struct Arrival {
    /// Seconds since the load started.
    t: f64,
    len: usize,
    topic_len: usize,
}

/// The subscriber's complete lines, timed relative to `t0_unix`.
fn arrivals(sub: &Subscriber, t0_unix: f64) -> Vec<Arrival> {
    let out = sub.output();
    let complete = out.rfind('\n').map_or("", |end| &out[..end]);
    complete
        .lines()
        .filter_map(|line| {
            let mut f = line.splitn(3, ' ');
            let t = f.next()?.parse::<f64>().ok()? - t0_unix;
            let len = f.next()?.parse().ok()?;
            let topic_len = f.next()?.len();
            Some(Arrival { t, len, topic_len })
        })
        .collect()
}

/// Per-second bins of (time, bytes) events and the busiest 1 s sliding
/// window.
struct Windows {
    per_second: Vec<(u64, u64)>,
    max_count: usize,
    max_bytes: u64,
    total_count: usize,
    total_bytes: u64,
}

impl Windows {
    /// `events` need not be sorted; `bins` seconds of per-second counts.
    fn of(events: &[(f64, u64)], bins: u64) -> Windows {
        let mut ev = events.to_vec();
        ev.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut per_second = vec![(0u64, 0u64); usize::try_from(bins).unwrap_or(0)];
        for &(t, b) in &ev {
            let bin = per_second.iter().enumerate().position(|(i, _)| {
                let start = as_f64(i);
                t >= start && t < start + 1.0
            });
            if let Some(i) = bin {
                per_second[i].0 += 1;
                per_second[i].1 += b;
            }
        }
        // Two pointers: the window [t_i, t_i + 1 s) for every event i.
        let (mut max_count, mut max_bytes) = (0usize, 0u64);
        let (mut j, mut bytes) = (0usize, 0u64);
        for i in 0..ev.len() {
            while j < ev.len() && ev[j].0 < ev[i].0 + 1.0 {
                bytes += ev[j].1;
                j += 1;
            }
            max_count = max_count.max(j - i);
            max_bytes = max_bytes.max(bytes);
            bytes -= ev[i].1;
        }
        Windows {
            per_second,
            max_count,
            max_bytes,
            total_count: ev.len(),
            total_bytes: ev.iter().map(|e| e.1).sum(),
        }
    }
}

/// TLS 1.3 record overhead with an AEAD cipher and no padding (what rustls
/// sends): the inner content type byte and a 16-byte tag.
const TLS13_RECORD_OVERHEAD: usize = 17;
/// TLS content type of application data records.
const TLS_APPLICATION_DATA: u8 = 23;

/// (unix time a record was complete, its content type, plaintext bytes).
type Records = Arc<Mutex<Vec<(f64, u8, usize)>>>;

/// A TCP relay 127.0.0.1:`port` → the broker that timestamps every TLS
/// record the daemon sends: the daemon's output as the broker receives it,
/// before the broker and the subscriber add their own queueing.
///
/// One accept thread; per connection two pump threads. All poll a stop flag
/// every 10 ms, so drop joins them in bounded time.
struct Tap {
    port: u16,
    stop: Arc<AtomicBool>,
    records: Records,
    accept: Option<JoinHandle<()>>,
}

impl Tap {
    fn start(target: u16) -> Tap {
        let listener = TcpListener::bind("127.0.0.1:0").expect("tap: bind 127.0.0.1:0");
        listener.set_nonblocking(true).expect("tap: nonblocking");
        let port = listener.local_addr().expect("tap: address").port();
        let stop = Arc::new(AtomicBool::new(false));
        let records = Arc::new(Mutex::new(Vec::new()));
        let (flag, log) = (Arc::clone(&stop), Arc::clone(&records));
        let accept = thread::spawn(move || {
            let mut pumps = Vec::new();
            // At most 10 minutes.
            for _ in 0..60_000 {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                match listener.accept() {
                    Ok((client, _)) => {
                        if let Ok(upstream) = TcpStream::connect(("127.0.0.1", target)) {
                            pumps.extend(tap_pumps(client, upstream, &flag, &log));
                        }
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
            for p in pumps {
                let _ = p.join();
            }
        });
        Tap {
            port,
            stop,
            records,
            accept: Some(accept),
        }
    }

    /// The PUBLISH packets of `packet` bytes each that reached the broker in
    /// `[t0, t0 + secs)`, as (seconds since t0, bytes): a packet is complete
    /// when the cumulative plaintext of the daemon's application-data
    /// records passes a multiple of `packet` (during the load nothing else
    /// goes upstream: a PINGREQ only follows a keepalive without sending).
    fn packets(&self, t0_unix: f64, packet: u64, secs: f64) -> Vec<(f64, u64)> {
        let records = self.records.lock().map(|r| r.clone()).unwrap_or_default();
        let mut out = Vec::new();
        let mut bytes = 0u64;
        for (t, kind, len) in records {
            let t = t - t0_unix;
            if kind != TLS_APPLICATION_DATA || t < 0.0 || t >= secs {
                continue;
            }
            let before = bytes / packet.max(1);
            bytes += as_u64(len);
            for _ in before..bytes / packet.max(1) {
                out.push((t, packet));
            }
        }
        out
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(a) = self.accept.take() {
            let _ = a.join();
        }
    }
}

/// Two threads relaying `client` ⇄ `upstream`; the upward one records TLS
/// records as they complete.
fn tap_pumps(
    client: TcpStream,
    upstream: TcpStream,
    stop: &Arc<AtomicBool>,
    records: &Records,
) -> Vec<JoinHandle<()>> {
    let mut handles = Vec::new();
    for upward in [true, false] {
        let (Ok(from), Ok(to)) = (
            if upward {
                client.try_clone()
            } else {
                upstream.try_clone()
            },
            if upward {
                upstream.try_clone()
            } else {
                client.try_clone()
            },
        ) else {
            continue;
        };
        let _ = from.set_nonblocking(false);
        let _ = from.set_read_timeout(Some(Duration::from_millis(10)));
        let _ = to.set_write_timeout(Some(SECS(5)));
        let _ = to.set_nodelay(true);
        let stop = Arc::clone(stop);
        let records = upward.then(|| Arc::clone(records));
        handles.push(thread::spawn(move || tap_pump(from, to, &stop, records)));
    }
    handles
}

fn tap_pump(mut from: TcpStream, mut to: TcpStream, stop: &AtomicBool, records: Option<Records>) {
    let mut buf = vec![0u8; 64 * 1024];
    // The record being read: its 5-byte header, then the body left.
    let (mut header, mut have, mut left) = ([0u8; 5], 0usize, 0usize);
    // Bounded by the stop flag; at most 10 minutes of 10 ms timeouts.
    for _ in 0..60_000 {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => break,
        };
        let now = unix_now();
        if let Some(records) = &records {
            let mut done = Vec::new();
            let mut i = 0;
            while i < n {
                if left == 0 && have < 5 {
                    let take = (5 - have).min(n - i);
                    header[have..have + take].copy_from_slice(&buf[i..i + take]);
                    have += take;
                    i += take;
                    if have == 5 {
                        left = usize::from(u16::from_be_bytes([header[3], header[4]]));
                        if left == 0 {
                            have = 0;
                        }
                    }
                } else {
                    let take = left.min(n - i);
                    left -= take;
                    i += take;
                    if left == 0 {
                        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
                        done.push((now, header[0], len.saturating_sub(TLS13_RECORD_OVERHEAD)));
                        have = 0;
                    }
                }
            }
            if let Ok(mut r) = records.lock() {
                r.extend(done);
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// A silence longer than this between two arrivals separates bursts.
const BURST_GAP: f64 = 0.1;

/// How arrivals bunch: the daemon's sliding window lets a window's worth
/// through as soon as the oldest sends expire, so sends come in bursts.
struct Bursts {
    count: usize,
    min_len: usize,
    max_len: usize,
    min_spread: f64,
    max_spread: f64,
    longest_gap: f64,
    longest_gap_at: f64,
}

impl Bursts {
    /// `events` sorted by time.
    fn of(events: &[(f64, u64)]) -> Bursts {
        let mut b = Bursts {
            count: 0,
            min_len: 0,
            max_len: 0,
            min_spread: 0.0,
            max_spread: 0.0,
            longest_gap: 0.0,
            longest_gap_at: 0.0,
        };
        let mut start = 0;
        for i in 1..=events.len() {
            let gap = events.get(i).map(|e| e.0 - events[i - 1].0);
            if let Some(g) = gap {
                if g > b.longest_gap {
                    b.longest_gap = g;
                    b.longest_gap_at = events[i - 1].0;
                }
                if g <= BURST_GAP {
                    continue;
                }
            }
            let len = i - start;
            let spread = events[i - 1].0 - events[start].0;
            if b.count == 0 {
                (b.min_len, b.max_len, b.min_spread, b.max_spread) = (len, len, spread, spread);
            }
            b.count += 1;
            b.min_len = b.min_len.min(len);
            b.max_len = b.max_len.max(len);
            b.min_spread = b.min_spread.min(spread);
            b.max_spread = b.max_spread.max(spread);
            start = i;
        }
        b
    }
}

#[derive(Clone, Copy)]
struct Mem {
    rss_kib: u64,
    hwm_kib: u64,
}

impl Mem {
    fn json(self) -> J {
        obj(vec![
            ("vm_rss_kib", ju(self.rss_kib)),
            ("vm_hwm_kib", ju(self.hwm_kib)),
        ])
    }
}

/// VmRSS and VmHWM from /proc/<pid>/status.
fn mem(pid: u32) -> Option<Mem> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        line[name.len()..].split_whitespace().next()?.parse().ok()
    };
    Some(Mem {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:")?,
    })
}

/// utime + stime of every thread, from /proc/<pid>/stat, in seconds.
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after it do not.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    // A read-only libc query; Cargo.toml denies `unsafe` by default.
    #[allow(unsafe_code)]
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks <= 0 {
        return None;
    }
    Some((utime + stime) as f64 / ticks as f64)
}

/// Nanoseconds on a CPU, summed over the threads (/proc/<pid>/task/*/schedstat).
fn sched_ns(pid: u32) -> Option<u64> {
    let mut total = 0u64;
    for entry in fs::read_dir(format!("/proc/{pid}/task")).ok()?.take(64) {
        let path = entry.ok()?.path().join("schedstat");
        let text = fs::read_to_string(path).ok()?;
        total += text.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// Samples a process's VmRSS every second on a thread, until `finish`.
struct Sampler {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Vec<u64>>>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = thread::spawn(move || {
            let mut samples = Vec::new();
            // At most 10 minutes, checking the flag every 50 ms.
            for _ in 0..600 {
                if let Some(m) = mem(pid) {
                    samples.push(m.rss_kib);
                }
                for _ in 0..20 {
                    if flag.load(Ordering::SeqCst) {
                        return samples;
                    }
                    thread::sleep(Duration::from_millis(50));
                }
            }
            samples
        });
        Sampler {
            stop,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

// ---------------------------------------------------------------------------
// Bus helpers

/// The integer counters of a `stats` answer.
fn read_stats(c: &mut BusClient) -> HashMap<String, i64> {
    let reply = c.read().expect("stats answer");
    let map = reply.object().as_map().expect("stats map");
    map.iter()
        .filter_map(|(k, v)| Some((String::from_utf8_lossy(k).into_owned(), v.as_i64()?)))
        .collect()
}

fn stats(c: &mut BusClient) -> HashMap<String, i64> {
    c.send("stats", RequestType::Call, &params(&[]));
    read_stats(c)
}

fn stats_json(st: &HashMap<String, i64>) -> J {
    let mut keys: Vec<&String> = st.keys().collect();
    keys.sort();
    J::Obj(
        keys.into_iter()
            .map(|k| (k.clone(), J::Int(st[k])))
            .collect(),
    )
}

/// The largest payload up to `want` whose `publish` call fits one bus frame.
fn largest_payload(topic: &str, qos: i64, want: usize) -> usize {
    let overhead = request(
        "publish",
        RequestType::Call,
        &publish_params(topic, b"", qos),
    )
    .len();
    want.min(consts::BUS_MAX_FRAME.saturating_sub(overhead))
}

/// A PUBLISH packet's length on the wire [MQTT 3.3]: fixed header, topic,
/// packet id (QoS 1) and payload; what the daemon's rate limiter counts.
fn publish_packet_len(topic: usize, payload: usize, qos: i64) -> u64 {
    let rest = 2 + topic + if qos > 0 { 2 } else { 0 } + payload;
    let len_bytes = match rest {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    as_u64(1 + len_bytes + rest)
}

// ---------------------------------------------------------------------------
// Numbers and text

fn as_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

fn as_f64(n: usize) -> f64 {
    n as f64
}

fn ratio(avg: f64, limit: usize) -> f64 {
    if limit == 0 {
        0.0
    } else {
        avg / as_f64(limit)
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1_048_576.0
}

fn kib_mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn ggl_rss_ratio(kib: u64) -> String {
    format!(
        "GGL C 7.2 MB: ×{:.2}",
        (kib as f64 * 1024.0) / GGL_RSS_BYTES
    )
}

fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or("?".into(), |v| format!("{v:.decimals$}"))
}

fn rss_range(samples: &[u64]) -> String {
    match (samples.iter().min(), samples.iter().max()) {
        (Some(lo), Some(hi)) => format!("{lo}–{hi} KiB over {} samples", samples.len()),
        _ => "no samples".into(),
    }
}

fn samples_json(samples: &[u64]) -> J {
    match (samples.iter().min(), samples.iter().max()) {
        (Some(lo), Some(hi)) => J::Arr(vec![ju(*lo), ju(*hi)]),
        _ => J::Null,
    }
}

/// Writes `text` to `target/bench/<name>` for a closer look; a failure is
/// only printed.
fn save_artifact(name: &str, text: &str) {
    let dir = Path::new(MANIFEST_DIR).join(REPORT_DIR);
    if let Err(e) = fs::create_dir_all(&dir).and_then(|()| fs::write(dir.join(name), text)) {
        println!("  cannot write {}: {e}", dir.join(name).display());
    }
}

/// A file's modification time, to notice a rebuild during the run.
fn modified(path: &Path) -> Option<SystemTime> {
    fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

// ---------------------------------------------------------------------------
// The report

/// A JSON value, written by hand (no serde in this crate).
enum J {
    Null,
    Bool(bool),
    Int(i64),
    Num(f64),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

fn obj(entries: Vec<(&str, J)>) -> J {
    J::Obj(entries.into_iter().map(|(k, v)| (k.into(), v)).collect())
}

fn ju(n: u64) -> J {
    J::Int(i64::try_from(n).unwrap_or(i64::MAX))
}

impl J {
    fn write(&self, out: &mut String, indent: usize) {
        let pad = "  ".repeat(indent + 1);
        let end = "  ".repeat(indent);
        match self {
            J::Null => out.push_str("null"),
            J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            J::Int(i) => {
                let _ = write!(out, "{i}");
            }
            J::Num(f) if f.is_finite() => {
                let _ = write!(out, "{}", (f * 1000.0).round() / 1000.0);
            }
            J::Num(_) => out.push_str("null"),
            J::Str(s) => write_json_str(out, s),
            J::Arr(items) if items.iter().all(|i| matches!(i, J::Int(_) | J::Num(_))) => {
                out.push('[');
                for (n, item) in items.iter().enumerate() {
                    if n > 0 {
                        out.push_str(", ");
                    }
                    item.write(out, indent + 1);
                }
                out.push(']');
            }
            J::Arr(items) => {
                out.push_str("[\n");
                for (n, item) in items.iter().enumerate() {
                    out.push_str(&pad);
                    item.write(out, indent + 1);
                    out.push_str(if n + 1 < items.len() { ",\n" } else { "\n" });
                }
                out.push_str(&end);
                out.push(']');
            }
            J::Obj(entries) => {
                out.push_str("{\n");
                for (n, (k, v)) in entries.iter().enumerate() {
                    out.push_str(&pad);
                    write_json_str(out, k);
                    out.push_str(": ");
                    v.write(out, indent + 1);
                    out.push_str(if n + 1 < entries.len() { ",\n" } else { "\n" });
                }
                out.push_str(&end);
                out.push('}');
            }
        }
    }
}

fn write_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

struct Target {
    what: String,
    measured: String,
    target: String,
    pass: bool,
    note: String,
}

/// What the sections found: JSON entries, targets, and sections that broke.
#[derive(Default)]
struct Report {
    json: Vec<(String, J)>,
    targets: Vec<Target>,
    errors: Vec<String>,
}

impl Report {
    /// Runs one section; a panic inside it is reported (its guards have
    /// stopped their processes while unwinding) and the next one runs.
    /// `key` selects it in `BENCH_ONLY` (an empty key always runs).
    fn section<T>(&mut self, key: &str, name: &str, f: impl FnOnce(&mut Report) -> T) -> Option<T> {
        if let Ok(only) = std::env::var(ONLY_VAR) {
            if !key.is_empty() && !only.split(',').any(|k| k.trim() == key) {
                return None;
            }
        }
        println!("\n== {name} ==");
        let t = Instant::now();
        let result = panic::catch_unwind(AssertUnwindSafe(|| f(self)));
        match result {
            Ok(v) => {
                println!("  ({:.1} s)", t.elapsed().as_secs_f64());
                Some(v)
            }
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_string()))
                    .unwrap_or_else(|| "panic".into());
                println!("  SECTION FAILED: {msg}");
                self.errors.push(format!("{name}: {msg}"));
                None
            }
        }
    }

    fn json(&mut self, key: &str, value: J) {
        self.json.push((key.into(), value));
    }

    /// Appends to the array `key`, creating it.
    fn push_json(&mut self, key: &str, value: J) {
        if let Some((_, J::Arr(items))) = self.json.iter_mut().find(|(k, _)| k == key) {
            items.push(value);
        } else {
            self.json.push((key.into(), J::Arr(vec![value])));
        }
    }

    fn target(&mut self, what: &str, measured: String, target: &str, pass: bool, note: String) {
        self.targets.push(Target {
            what: what.into(),
            measured,
            target: target.into(),
            pass,
            note,
        });
    }

    /// Prints the summary, writes the JSON file, and gives the exit status.
    fn finish(mut self) -> ExitCode {
        println!("\n== Summary ==");
        let w = self.targets.iter().map(|t| t.what.len()).max().unwrap_or(0);
        let m = self
            .targets
            .iter()
            .map(|t| t.measured.chars().count())
            .max()
            .unwrap_or(0);
        for t in &self.targets {
            println!(
                "  {:<w$}  {:>m$}  {:<34} {}  {}",
                t.what,
                t.measured,
                format!("(target {})", t.target),
                if t.pass { "PASS" } else { "MISS" },
                t.note
            );
        }
        println!(
            "  reference, Greengrass Lite's C iotcored on these machines: 7.2 MB RSS, \
             ~{GGL_CPU_US:.0} µs CPU per QoS 0 publish"
        );
        let missed = self.targets.iter().filter(|t| !t.pass).count();
        println!(
            "  {} targets, {} met, {missed} missed",
            self.targets.len(),
            self.targets.len() - missed
        );
        for e in &self.errors {
            println!("  BROKEN: {e}");
        }
        let targets = J::Arr(
            self.targets
                .iter()
                .map(|t| {
                    obj(vec![
                        ("what", J::Str(t.what.clone())),
                        ("measured", J::Str(t.measured.clone())),
                        ("target", J::Str(t.target.clone())),
                        ("pass", J::Bool(t.pass)),
                        ("note", J::Str(t.note.clone())),
                    ])
                })
                .collect(),
        );
        self.json.push(("targets".into(), targets));
        self.json.push((
            "reference_ggl_c_iotcored".into(),
            obj(vec![
                ("rss_bytes", J::Num(GGL_RSS_BYTES)),
                ("cpu_us_per_qos0_publish", J::Num(GGL_CPU_US)),
            ]),
        ));
        self.json.push((
            "errors".into(),
            J::Arr(self.errors.iter().map(|e| J::Str(e.clone())).collect()),
        ));
        let mut text = String::new();
        J::Obj(std::mem::take(&mut self.json)).write(&mut text, 0);
        text.push('\n');
        let path = Path::new(MANIFEST_DIR).join(REPORT_DIR).join("report.json");
        match fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))
            .and_then(|()| fs::write(&path, text))
        {
            Ok(()) => println!("  figures written to {}", path.display()),
            Err(e) => {
                println!("  cannot write {}: {e}", path.display());
                self.errors.push("report".into());
            }
        }
        if self.errors.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }
}
