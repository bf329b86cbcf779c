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
//! - C. one connection per call, what every Greengrass Lite client does:
//!   connect, one QoS 0 `publish` call, read the answer, close; the
//!   rate-unlimited daemon's CPU time per call next to that of
//!   `examples/bench_floor.rs` (the least a bus server can do per call:
//!   accept, read one frame, write the null result, close) under the same
//!   load, in alternating rounds;
//! - D. the disk spool against the memory spool;
//! - E. MQTT 5 against MQTT 3.1.1, alternating in the same run: CPU time
//!   per QoS 0 publish (rate limit off), and bytes written to the broker
//!   per message for a 60-byte topic (topic aliases); and the daemon's CPU
//!   per QoS 0 publish against mosquitto_pub's own when it publishes the
//!   same messages straight to the broker;
//! - memory with every table full (bus clients, subscriptions, the spool,
//!   broker unreachable) and the spool's capacity; the binary's size.
//!
//! It prints a report with each target next to the measured value and writes
//! the figures to `target/bench/report.json`, next to the raw arrival times
//! and the daemon logs of part A. A missed target is reported, not an error:
//! the exit status is 1 only when a section itself broke. `BENCH_ONLY=rate`
//! (or `unlimited`, `call`, `full`, `spool`, `binary`, comma-separated) runs
//! only those sections.
//!
//! Invariants: only 127.0.0.1 and Unix sockets; every loop is bounded in
//! count and in time; every process is a harness guard stopped by its own
//! pid on drop, also when a section panics (each runs under `catch_unwind`);
//! every thread started here is joined.

#[path = "../common/mod.rs"]
mod common;
mod load;
mod probe;
mod report;

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
use load::*;
use probe::*;
use report::*;
// The bench's own `stats` (counters as a map), not the harness's.
use iotcored::bus::frame::RequestType;
use iotcored::consts;
use probe::stats;

/// The default build, as `cargo test --release` built it.
const BIN: &str = env!("CARGO_BIN_EXE_iotcored");
const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");
/// Where the rate-unlimited variant is built, relative to the manifest.
const UNLIMITED_TARGET_DIR: &str = "target/bench-unlimited";
/// Where the JSON report and the raw data (arrival times, daemon logs) go,
/// relative to the manifest.
const REPORT_DIR: &str = "target/bench";
/// Runs only the sections named here (comma-separated keys: binary, rate,
/// unlimited, call, disk, mqtt5, full, spool), e.g. `BENCH_ONLY=rate make bench`.
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

// C. One connection per call.
/// Alternating rounds per server (daemon, floor; then floor, daemon; ...).
const CALL_ROUNDS: usize = 8;
/// Calls per server and round: over all rounds 1–2 s of either server's
/// CPU, so that utime+stime (10 ms ticks) is good to about 1 % (one round
/// alone to 5–10 %: the per-round ratios show the noise, not a figure).
const CALLS_PER_ROUND: usize = 8_000;
const CALL_ROUND_MAX: Duration = Duration::from_secs(10);
/// Calls per server before the rounds (page faults, first slots, caches).
const CALL_WARMUP: usize = 1_000;
/// Client threads, each one call at a time: enough that a server has the
/// next connection waiting, few enough for a 2-core machine.
const CALL_CLIENTS: usize = 4;
const CALL_PAYLOAD: usize = 16;
/// Calls per server under `perf stat`, after the timed rounds.
const CALL_SYSCALL_CALLS: usize = 8_000;
/// The answer to a `publish` call: a result frame whose payload is null.
const NULL_RESULT: [u8; 17] = [
    0x00, 0x00, 0x00, 0x11, 0x00, 0x00, 0x00, 0x00, 0x38, 0xa2, 0x61, 0x5b, 0x00, 0xa1, 0x71, 0xab,
    0x15,
];

// E. MQTT 5.
/// Alternating rounds of each protocol (5, 3.1.1; then 3.1.1, 5).
const V5_ROUNDS: usize = 2;
const V5_MESSAGES: usize = 100_000;
const V5_MAX: Duration = Duration::from_secs(10);
/// Messages of the bytes-on-the-wire run, and its 60-byte topic.
const WIRE_MESSAGES: usize = 2_000;
const WIRE_PAYLOAD: usize = 100;
const WIRE_TOPIC: &str = "dt/acme-industries/plant-0042/line-07/gateway-0001/telemetry";
/// Messages mosquitto_pub publishes straight to the broker (`--repeat`).
const DIRECT_MESSAGES: usize = 100_000;
const DIRECT_MAX: Duration = Duration::from_secs(60);
const TARGET_V5_RATIO: f64 = 1.15;
const TARGET_DIRECT_RATIO: f64 = 1.5;

// Targets, and Greengrass Lite's C iotcored on these machines.
const TARGET_CALL_RATIO: f64 = 1.25;
const TARGET_RSS_KIB: u64 = 6 * 1024;
/// RSS idle, connected (issue 14: large bus frames must not raise it).
const TARGET_IDLE_RSS_KIB: u64 = 3584;
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
        "unlimited,call,disk,mqtt5",
        "build of the rate-unlimited variant and the floor server",
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
                    unlimited_run(r, broker, &bin.daemon);
                },
            );
            report.section("call", "C. one connection per call", |r| {
                call_per_connection(r, broker, bin);
            });
            report.section("disk", "D. disk spool (rate limit off)", |r| {
                disk_spool(r, broker, &bin.daemon);
            });
            report.section("mqtt5", "E. MQTT 5 (rate limit off)", |r| {
                mqtt5_costs(r, broker, &bin.daemon);
            });
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

/// The binaries `target/bench-unlimited` holds.
struct Unlimited {
    /// iotcored with both publish limits at 0.
    daemon: PathBuf,
    /// `examples/bench_floor.rs`, section C's reference server.
    floor: PathBuf,
}

/// Builds the variant with both publish limits at 0, and the floor server
/// next to it (cargo skips the work when `make bench` or an earlier run
/// built them already; `cargo test --test bench` builds no examples).
fn build_unlimited(r: &mut Report) -> Unlimited {
    let dir = Path::new(MANIFEST_DIR).join(UNLIMITED_TARGET_DIR);
    let t = Instant::now();
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args([
        "build",
        "--release",
        "--quiet",
        "--bin",
        "iotcored",
        "--example",
        "bench_floor",
    ])
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
    let daemon = dir.join("release/iotcored");
    let floor = dir.join("release/examples/bench_floor");
    for bin in [&daemon, &floor] {
        assert!(bin.exists(), "no {}", bin.display());
    }
    println!(
        "  {} and {} ({:.1} s)",
        daemon.display(),
        floor.display(),
        t.elapsed().as_secs_f64()
    );
    r.json("unlimited_binary", J::Str(daemon.display().to_string()));
    Unlimited { daemon, floor }
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
            "≤ 3.5 MiB",
            m.rss_kib <= TARGET_IDLE_RSS_KIB,
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

/// E: MQTT 5 against 3.1.1 and against mosquitto_pub, in alternating
/// rounds on the rate-unlimited variant.
fn mqtt5_costs(r: &mut Report, broker: &Mosquitto, bin: &Path) {
    let mut cpu: HashMap<&str, Vec<f64>> = HashMap::new();
    let mut wire: HashMap<&str, f64> = HashMap::new();
    for round in 0..V5_ROUNDS {
        let order = if round % 2 == 0 {
            ["5", "3.1.1"]
        } else {
            ["3.1.1", "5"]
        };
        for version in order {
            let id = format!("bench-mqtt{}", version.replace('.', ""));
            let extra = ["--mqtt".to_string(), version.to_string()];
            let (d, sock) = start_daemon_with(bin, broker.port(), &id, &extra);
            wait_connected(&d);
            let q0 = throughput(broker, &d, &sock, 0, V5_MESSAGES, V5_MAX);
            if let Some(us) = q0.cpu_us_stat {
                println!(
                    "  round {round}, MQTT {version}: {us:.2} µs CPU per QoS 0 publish ({} messages)",
                    q0.published
                );
                cpu.entry(version).or_default().push(us);
            }
            if round == 0 {
                if let Some(b) = wire_bytes(&d, &sock) {
                    println!("  MQTT {version}: {b:.1} bytes written per message, 60-byte topic");
                    wire.insert(version, b);
                }
            }
        }
    }
    let mean = |v: &str| {
        cpu.get(v)
            .filter(|xs| !xs.is_empty())
            .map(|xs| xs.iter().sum::<f64>() / xs.len() as f64)
    };
    if let (Some(v5), Some(v3)) = (mean("5"), mean("3.1.1")) {
        let ratio = v5 / v3;
        r.target(
            "CPU per QoS 0 publish, MQTT 5 against 3.1.1",
            format!("{v5:.2} µs against {v3:.2} µs: ×{ratio:.2}"),
            "≤ ×1.15",
            ratio <= TARGET_V5_RATIO,
            format!("same run, {V5_ROUNDS} alternating rounds each"),
        );
        r.json(
            "mqtt5_cpu",
            obj(vec![
                ("v5_us", J::Num(v5)),
                ("v311_us", J::Num(v3)),
                ("ratio", J::Num(ratio)),
            ]),
        );
        if let Some(direct) = mosquitto_pub_cpu_us(broker) {
            let ratio = v5 / direct;
            r.target(
                "CPU per QoS 0 publish against mosquitto_pub publishing directly",
                format!("{v5:.2} µs against {direct:.2} µs: ×{ratio:.2}"),
                "≤ ×1.5",
                ratio <= TARGET_DIRECT_RATIO,
                format!(
                    "mosquitto_pub -V 5 --repeat {DIRECT_MESSAGES}, {TPUT_PAYLOAD}-byte payload, its whole life (TLS handshake included)"
                ),
            );
            r.json("mosquitto_pub_cpu_us", J::Num(direct));
        }
    }
    if let (Some(v5), Some(v3)) = (wire.get("5"), wire.get("3.1.1")) {
        println!(
            "  topic aliases: {v5:.1} against {v3:.1} bytes per message to the broker ({:.0} % less; MQTT alone: 108 against 165)",
            100.0 * (1.0 - v5 / v3)
        );
        r.json(
            "wire_bytes_per_message",
            obj(vec![("v5", J::Num(*v5)), ("v311", J::Num(*v3))]),
        );
    }
}

/// Bytes the daemon writes per QoS 0 message of `WIRE_PAYLOAD` bytes to
/// `WIRE_TOPIC` (TLS included: everything it writes goes to the broker
/// but the few `stats` answers).
fn wire_bytes(d: &Daemon, sock: &Path) -> Option<f64> {
    let mut c = BusClient::connect(sock);
    set_write_timeout(&mut c);
    let s0 = stats(&mut c);
    let (w0, _) = io_written(d.pid())?;
    let one = request(
        "publish",
        RequestType::Notify,
        &publish_params(WIRE_TOPIC, &[b'w'; WIRE_PAYLOAD], 0),
    );
    for _ in 0..WIRE_MESSAGES / 100 {
        c.send_raw(&one.repeat(100));
        let _ = stats(&mut c); // paces the client: the spool never fills
    }
    let sent0 = s0.get("sent").copied().unwrap_or(0);
    let want = sent0 + i64::try_from(WIRE_MESSAGES).ok()?;
    wait_every(DRAIN_MAX, Duration::from_millis(20), || {
        stats(&mut c).get("sent").copied().unwrap_or(0) >= want
    });
    let (w1, _) = io_written(d.pid())?;
    Some(w1.saturating_sub(w0) as f64 / WIRE_MESSAGES as f64)
}

/// mosquitto_pub's CPU time per message, publishing `DIRECT_MESSAGES` QoS 0
/// messages of `TPUT_PAYLOAD` bytes with MQTT 5 straight to the broker
/// (its whole life, from `wait4`), or `None` if it failed.
// `wait4` is the one way to a child's CPU time once it has exited;
// Cargo.toml denies `unsafe` by default.
#[allow(unsafe_code)]
fn mosquitto_pub_cpu_us(broker: &Mosquitto) -> Option<f64> {
    let pki = Pki::get();
    let mut child = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port().to_string(),
            "-V",
            "5",
        ])
        .arg("--cafile")
        .arg(pki.path("ca.pem"))
        .arg("--cert")
        .arg(pki.path("client.pem"))
        .arg("--key")
        .arg(pki.path("client.key"))
        .args(["-i", "bench-direct", "-t", "bench/direct", "-q", "0"])
        .args(["--repeat", &DIRECT_MESSAGES.to_string(), "-s"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(&[b'd'; TPUT_PAYLOAD]);
    }
    let pid = libc::pid_t::try_from(child.id()).ok()?;
    let t0 = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: zeroed rusage is a valid value; wait4 fills it.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: our own child's pid, valid pointers.
        let got = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if got == pid {
            let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
            let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
            let cpu = secs(usage.ru_utime) + secs(usage.ru_stime);
            println!(
                "  mosquitto_pub, {DIRECT_MESSAGES} messages straight to the broker: {:.2} s CPU in {:.2} s{}",
                cpu,
                t0.elapsed().as_secs_f64(),
                if ok { "" } else { " (it failed)" }
            );
            return ok.then(|| cpu * 1e6 / DIRECT_MESSAGES as f64);
        }
        if got < 0 || t0.elapsed() > DIRECT_MAX {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// D: the disk spool against the memory spool, same build and load:
/// QoS 1 throughput and CPU, bytes written per message, `confirm: stored`
/// from 8 concurrent publishers, and a restart with a full 64 MiB spool.
fn disk_spool(r: &mut Report, broker: &Mosquitto, bin: &Path) {
    let n = TPUT_QOS1_MESSAGES;
    let (memory, sock) = start_daemon(bin, broker.port(), "bench-mem");
    wait_connected(&memory);
    let m = throughput(broker, &memory, &sock, 1, n, TPUT_QOS1_MAX);
    drop(memory);
    let dir = TestDir::new("disk-spool");
    let spool_arg = |d: &TestDir| vec!["--spool-dir".to_string(), d.path().display().to_string()];
    let (disk, sock) = start_daemon_with(bin, broker.port(), "bench-disk", &spool_arg(&dir));
    wait_connected(&disk);
    let pid = disk.pid();
    let io0 = io_written(pid);
    let d = throughput(broker, &disk, &sock, 1, n, TPUT_QOS1_MAX);
    let io1 = io_written(pid);
    let rate = |t: &Throughput| Throughput::rate(t.published as f64, t.drain_secs);
    let (rm, rd) = (rate(&m), rate(&d));
    println!(
        "  QoS 1, {TPUT_PAYLOAD} B: memory spool {rm:.0}/s, disk spool {rd:.0}/s (×{:.2}); CPU per message {:.1} µs vs {:.1} µs",
        rd / rm.max(1.0),
        m.cpu_us_stat.unwrap_or(f64::NAN),
        d.cpu_us_stat.unwrap_or(f64::NAN)
    );
    r.target(
        "QoS 1 throughput with the disk spool vs the memory spool",
        format!("{rd:.0}/s vs {rm:.0}/s: ×{:.2}", rd / rm.max(1.0)),
        "≥ ×0.8",
        rd >= 0.8 * rm,
        String::new(),
    );
    if let (Some((w0, s0)), Some((w1, s1))) = (io0, io1) {
        let per = |a: u64, b: u64| (b - a) as f64 / d.published.max(1) as f64;
        println!(
            "  bytes written per {TPUT_PAYLOAD} B message: {:.0} to the page cache (write calls), {:.0} to storage (write_bytes)",
            per(w0, w1),
            per(s0, s1)
        );
        r.json(
            "disk_bytes_per_message",
            obj(vec![
                ("write_calls", J::Num(per(w0, w1))),
                ("storage", J::Num(per(s0, s1))),
            ]),
        );
    }
    // confirm: stored, 8 publishers at once, sequential calls each.
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let t0 = Instant::now();
    let threads: Vec<_> = (0..8)
        .map(|k| {
            let (sock, latencies) = (sock.clone(), Arc::clone(&latencies));
            thread::spawn(move || {
                let mut c = BusClient::connect(&sock);
                let params = params(&[
                    ("topic", V::Buf(format!("bench/stored/{k}").as_bytes())),
                    ("payload", V::Buf(&[b's'; 100])),
                    ("qos", V::I64(1)),
                    ("confirm", V::Buf(b"stored")),
                ]);
                let mut mine = Vec::new();
                while t0.elapsed() < SECS(2) {
                    let t = Instant::now();
                    if !is_null(&c.call("publish", &params)) {
                        break;
                    }
                    mine.push(t.elapsed());
                }
                latencies.lock().unwrap().extend(mine);
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    let mut lat: Vec<Duration> = latencies.lock().unwrap().clone();
    lat.sort();
    let pct = |per_mille| percentile_us(&lat, per_mille);
    println!(
        "  confirm: stored, 8 publishers: {} calls in 2 s = {:.0}/s, answered after p50 {:.0} µs, p99 {:.0} µs",
        lat.len(),
        lat.len() as f64 / 2.0,
        pct(500),
        pct(990)
    );
    r.json(
        "confirm_stored",
        obj(vec![
            ("calls_per_s", J::Num(lat.len() as f64 / 2.0)),
            ("p50_us", J::Num(pct(500))),
            ("p99_us", J::Num(pct(990))),
        ]),
    );
    drop(disk);
    // A restart with a full 64 MiB spool: offline, QoS 1 until BUSY (the
    // file is full), SIGKILL.
    let dir = TestDir::new("disk-full");
    let port = free_port();
    let big = |d: &TestDir| [spool_arg(d), vec!["--spool-size".into(), "64M".into()]].concat();
    let (full, sock) = start_daemon_with(bin, port, "bench-full", &big(&dir));
    let mut c = BusClient::connect(&sock);
    let one = publish_params("bench/full", &[b'f'; SMALL_PAYLOAD], 1);
    let mut held = 0;
    while is_null(&c.call("publish", &one)) {
        held += 1;
    }
    let rss_full = mem(full.pid()).map_or(0, |m| m.rss_kib);
    full.signal(libc::SIGKILL);
    drop(full);
    let t = Instant::now();
    let (again, sock) = start_daemon_with(bin, port, "bench-full", &big(&dir));
    let mut c = BusClient::connect(&sock);
    let st = stats(&mut c);
    let ms = t.elapsed().as_secs_f64() * 1e3;
    println!(
        "  restart with {held} stored messages ({} KiB of the file): bus answering after {ms:.0} ms (exec included), {} restored; VmRSS before the kill {rss_full} KiB",
        st.get("stored_bytes").copied().unwrap_or(0) / 1024,
        st.get("stored").copied().unwrap_or(0)
    );
    r.target(
        "restart with a full 64 MiB disk spool: bus served",
        format!("{ms:.0} ms ({held} messages)"),
        "≤ 200 ms",
        ms <= 200.0,
        String::new(),
    );
    drop(again);
}

/// One server's figures over the rounds of section C.
#[derive(Default)]
struct CallCost {
    calls: u64,
    failed: u64,
    secs: f64,
    /// utime+stime, in seconds.
    cpu: f64,
    /// schedstat run time, in seconds.
    sched: f64,
}

impl CallCost {
    fn add(&mut self, pid: u32, run: impl FnOnce() -> Calls) -> Calls {
        let (cpu0, ns0) = (cpu_secs(pid), sched_ns(pid));
        let c = run();
        let (cpu1, ns1) = (cpu_secs(pid), sched_ns(pid));
        self.calls += c.answered;
        self.failed += c.failed;
        self.secs += c.secs;
        self.cpu += cpu0.zip(cpu1).map_or(f64::NAN, |(a, b)| b - a);
        self.sched += ns0.zip(ns1).map_or(f64::NAN, |(a, b)| (b - a) as f64 / 1e9);
        c
    }

    /// µs of utime+stime per answered call.
    fn us(&self) -> f64 {
        self.cpu * 1e6 / self.calls.max(1) as f64
    }

    fn us_sched(&self) -> f64 {
        self.sched * 1e6 / self.calls.max(1) as f64
    }

    fn json(&self) -> J {
        obj(vec![
            ("calls", ju(self.calls)),
            ("failed", ju(self.failed)),
            ("seconds", J::Num(self.secs)),
            (
                "calls_per_s",
                J::Num(self.calls as f64 / self.secs.max(1e-9)),
            ),
            ("cpu_seconds", J::Num(self.cpu)),
            ("cpu_us_per_call", J::Num(self.us())),
            ("cpu_us_per_call_schedstat", J::Num(self.us_sched())),
        ])
    }
}

/// C: the rate-unlimited daemon (connected to the broker) and the floor
/// server, each taking the same load of one-call connections: QoS 0
/// `publish` calls of `CALL_PAYLOAD` bytes from `CALL_CLIENTS` threads, in
/// `CALL_ROUNDS` alternating rounds; each server's CPU time is read from
/// /proc around each of its rounds, so only its own rounds count.
fn call_per_connection(r: &mut Report, broker: &Mosquitto, bins: &Unlimited) {
    let (daemon, sock) = start_daemon(&bins.daemon, broker.port(), "bench-call");
    wait_connected(&daemon);
    let floor = Daemon::builder(&bins.floor).arg("floor.sock").start();
    let floor_sock = floor.dir().join("floor.sock");
    assert!(
        wait_until(SECS(5), || floor_sock.exists()),
        "no floor socket; log:\n{}",
        floor.log()
    );
    let frame = request(
        "publish",
        RequestType::Call,
        &publish_params("bench/call", &[b'c'; CALL_PAYLOAD], 0),
    );
    let servers = [
        ("daemon", daemon.pid(), &sock),
        ("floor", floor.pid(), &floor_sock),
    ];
    for (name, _, path) in servers {
        let c = calls_per_connection(
            path,
            &frame,
            &NULL_RESULT,
            CALL_WARMUP,
            CALL_CLIENTS,
            SECS(10),
        );
        assert!(
            c.failed == 0 && c.answered == as_u64(CALL_WARMUP),
            "{name}: {} of {CALL_WARMUP} warm-up calls answered as expected, {} failed",
            c.answered,
            c.failed
        );
    }
    let s0 = stats(&mut BusClient::connect(&sock));
    let mut cost = [CallCost::default(), CallCost::default()];
    let mut round_ratios = Vec::new();
    for round in 0..CALL_ROUNDS {
        let mut us = [0.0f64; 2];
        // Daemon first in even rounds, floor first in odd ones.
        for k in [round % 2, 1 - round % 2] {
            let (_, pid, path) = servers[k];
            let before = (cost[k].cpu, cost[k].calls);
            let c = cost[k].add(pid, || {
                calls_per_connection(
                    path,
                    &frame,
                    &NULL_RESULT,
                    CALLS_PER_ROUND,
                    CALL_CLIENTS,
                    CALL_ROUND_MAX,
                )
            });
            let cpu = cost[k].cpu - before.0;
            us[k] = cpu * 1e6 / (cost[k].calls - before.1).max(1) as f64;
            println!(
                "  round {}: {:<6} {} calls ({} failed) in {:.2} s = {:.0}/s, {:.2} s CPU = {:.1} µs per call",
                round + 1,
                servers[k].0,
                c.answered,
                c.failed,
                c.secs,
                c.answered as f64 / c.secs.max(1e-9),
                cpu,
                us[k]
            );
        }
        round_ratios.push(us[0] / us[1]);
    }
    let s1 = stats(&mut BusClient::connect(&sock));
    let published =
        s1.get("published").copied().unwrap_or(0) - s0.get("published").copied().unwrap_or(0);
    // Then, outside the timed rounds, what each server asks of the kernel.
    let dir = Path::new(MANIFEST_DIR).join(REPORT_DIR);
    let _ = fs::create_dir_all(&dir);
    let mut syscalls = Vec::new();
    for (name, pid, path) in servers {
        let out = dir.join(format!("call-syscalls-{name}.csv"));
        let Some(counter) = SyscallCounter::start(pid, out) else {
            println!("  {name}: perf stat not available here; no system call counts");
            continue;
        };
        let c = calls_per_connection(
            path,
            &frame,
            &NULL_RESULT,
            CALL_SYSCALL_CALLS,
            CALL_CLIENTS,
            CALL_ROUND_MAX,
        );
        let Some(counts) = counter.finish() else {
            println!("  {name}: perf stat gave no counts");
            continue;
        };
        let per_call = |n: u64| n as f64 / c.answered.max(1) as f64;
        let line: Vec<String> = counts
            .iter()
            .filter(|(k, n)| k != "syscalls" && *n > 0)
            .map(|(k, n)| format!("{k} {:.2}", per_call(*n)))
            .collect();
        let total = counts
            .iter()
            .find(|(k, _)| k == "syscalls")
            .map_or(0, |c| c.1);
        println!(
            "  {name}: {:.2} system calls per call ({}; perf stat over {} calls after the rounds)",
            per_call(total),
            line.join(", "),
            c.answered
        );
        syscalls.push((
            name,
            J::Obj(
                counts
                    .iter()
                    .map(|(k, n)| (k.clone(), J::Num(per_call(*n))))
                    .collect(),
            ),
        ));
    }
    drop(floor);
    drop(daemon);

    let [d, f] = &cost;
    let ratio = d.us() / f.us();
    let ratio_sched = d.us_sched() / f.us_sched();
    let mut sorted = round_ratios.clone();
    sorted.sort_by(f64::total_cmp);
    let (lo, hi) = (sorted[0], sorted[sorted.len() - 1]);
    let median = (sorted[(sorted.len() - 1) / 2] + sorted[sorted.len() / 2]) / 2.0;
    println!(
        "  {CALL_CLIENTS} client threads, one call per connection, QoS 0 publish of {CALL_PAYLOAD} B"
    );
    println!(
        "  daemon: {:.1} µs per call (schedstat {:.1}), {:.0} calls/s; floor: {:.1} µs per call \
         (schedstat {:.1}), {:.0} calls/s",
        d.us(),
        d.us_sched(),
        d.calls as f64 / d.secs.max(1e-9),
        f.us(),
        f.us_sched(),
        f.calls as f64 / f.secs.max(1e-9)
    );
    println!(
        "  daemon / floor: ×{ratio:.2} (schedstat ×{ratio_sched:.2}; rounds ×{lo:.2}–×{hi:.2}, \
         median ×{median:.2}); \
         the daemon's figure includes sending each message to the broker over TLS; \
         `published` grew by {published} for {} calls",
        d.calls
    );
    let failed = d.failed + f.failed;
    r.target(
        "CPU per call, one connection per call (rate limit off)",
        format!("{:.1} µs vs floor {:.1} µs: ×{ratio:.2}", d.us(), f.us()),
        &format!("≤ ×{TARGET_CALL_RATIO:.2} the floor"),
        ratio <= TARGET_CALL_RATIO && failed == 0,
        format!(
            "floor: examples/bench_floor.rs; rounds ×{lo:.2}–×{hi:.2}, median ×{median:.2}{}",
            if failed > 0 {
                format!("; {failed} calls FAILED")
            } else {
                String::new()
            }
        ),
    );
    r.json(
        "call_per_connection",
        obj(vec![
            ("clients", ju(as_u64(CALL_CLIENTS))),
            ("payload_bytes", ju(as_u64(CALL_PAYLOAD))),
            ("rounds", ju(as_u64(CALL_ROUNDS))),
            ("daemon", d.json()),
            ("floor", f.json()),
            ("ratio", J::Num(ratio)),
            ("ratio_schedstat", J::Num(ratio_sched)),
            (
                "round_ratios",
                J::Arr(round_ratios.iter().map(|x| J::Num(*x)).collect()),
            ),
            ("published_delta", J::Int(published)),
            ("syscalls_per_call", obj(syscalls)),
        ]),
    );
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
    // shared copies of those, then virtual ones. One process may hold half
    // of the subscriptions and half of the broker filters [bus-iso-4], so
    // they come from three: two stream holders (processes of their own, one
    // bus connection per subscription), each with half of the distinct
    // filters and copies of its own, and this process's `ctl`, whose
    // virtual ones go to response endpoints.
    let total = consts::MAX_SUBSCRIPTIONS;
    let broker_table = consts::SUBSCRIPTIONS_PER_CONNECTION * consts::MAX_CONNECTIONS;
    let distinct = broker_table.min(total / 2).max(2);
    let shared = (total - distinct) / 2;
    let subscribe = |filter: &str| {
        request(
            "subscribe",
            RequestType::Subscribe,
            &params(&[
                ("topic_filter", V::Buf(filter.as_bytes())),
                ("qos", V::I64(0)),
            ]),
        )
    };
    let mut streams = Vec::new();
    for (half, range) in [(0, 0..distinct / 2), (1, distinct / 2..distinct)] {
        let copies = if half == 0 {
            shared / 2
        } else {
            shared - shared / 2
        };
        let filters: Vec<String> = range
            .clone()
            .chain((0..copies).map(|k| range.start + k % range.len()))
            .map(|i| format!("bench/full/{i}"))
            .collect();
        let frames: Vec<Vec<u8>> = filters.iter().map(|f| subscribe(f)).collect();
        let holder = Holder::start_each(&sock, frames.len(), &frames);
        // A refused subscribe closes its connection: all open, all accepted.
        thread::sleep(Duration::from_millis(300));
        assert_eq!(holder.open(), Some(frames.len()), "stream holder {half}");
        streams.push(holder);
    }
    let streamed: usize = streams.iter().filter_map(Holder::open).sum();
    // Response endpoints must be served when subscribed to [bus-iso-4]:
    // listeners that never accept stand in for them (deliveries are not
    // measured here).
    let dir = sock.parent().expect("socket dir");
    let _endpoints: Vec<std::os::unix::net::UnixListener> = (distinct + shared..total)
        .map(|i| format!("bench_ep{i}"))
        .chain(["bench_ep_extra".to_string()])
        .map(|name| std::os::unix::net::UnixListener::bind(dir.join(name)).expect("endpoint"))
        .collect();
    let mut endpoint_subs = 0;
    for i in distinct + shared..total {
        let filter = format!("bench/virt/{i}");
        let endpoint = format!("bench_ep{i}");
        let reply = ctl.call(
            "subscribe",
            &params(&[
                ("topic_filter", V::Buf(filter.as_bytes())),
                ("qos", V::I64(0)),
                ("virtual", V::Bool(true)),
                ("response_endpoint", V::Buf(endpoint.as_bytes())),
            ]),
        );
        assert!(is_null(&reply), "subscription {i} ({filter}): {reply:?}");
        endpoint_subs += 1;
    }
    let over = ctl.call(
        "subscribe",
        &params(&[
            ("topic_filter", V::Buf(b"bench/full/extra")),
            ("response_endpoint", V::Buf(b"bench_ep_extra")),
        ]),
    );
    let over_nomem = over == Some(Reply::Error(code::NOMEM));
    // Every large receive buffer in use: frames as large as the build
    // takes, all but their last bytes sent, from two processes (one may
    // hold half the buffers). Held until the partial-frame timeout.
    let large_dir = TestDir::new("bench-large");
    let large_path = large_dir.join("frame");
    let large_frame = {
        let overhead = request(
            "publish",
            RequestType::Call,
            &publish_params("bench/large", b"", 0),
        )
        .len();
        let f = request(
            "publish",
            RequestType::Call,
            &publish_params(
                "bench/large",
                &vec![b'l'; consts::BUS_MAX_FRAME - overhead],
                0,
            ),
        );
        assert_eq!(f.len(), consts::BUS_MAX_FRAME);
        f
    };
    std::fs::write(&large_path, &large_frame[..large_frame.len() - 4]).expect("write frame");
    let per_process = (consts::BUS_LARGE_BUFFERS / 2).max(1);
    let large: Vec<Holder> = (0..consts::BUS_LARGE_BUFFERS.div_ceil(per_process))
        .map(|_| Holder::start_file(&sock, per_process, &large_path))
        .collect();
    let large_open: usize = large.iter().filter_map(Holder::open).sum();
    // Idle bus clients up to the table's size, from processes of their own
    // (one process may hold half the slots).
    let mut idle = Vec::new();
    let mut missing = consts::MAX_BUS_CLIENTS.saturating_sub(1 + streamed + large_open);
    while missing > 0 {
        let n = missing.min(consts::MAX_BUS_CLIENTS / 2);
        idle.push(Holder::start(&sock, n, b""));
        missing -= n;
    }
    let idle_open = || idle.iter().filter_map(Holder::open).sum::<usize>();
    // `ctl` is idle too: make it the most recently active, after the
    // daemon has accepted every holder's connection, so that the probe
    // below closes one of those.
    thread::sleep(Duration::from_millis(300));
    let st = stats(&mut ctl);
    let clients = 1 + streamed + large_open + idle_open();
    // A full table of idle connections makes room: the idlest is closed.
    let extra_admitted = BusClient::try_connect(&sock).is_some_and(|mut c| {
        c.timeout(SECS(2));
        matches!(c.call("stats", &params(&[])), Some(Reply::Payload(_)))
    });
    println!(
        "  {total} subscriptions ({distinct} broker filters, {shared} shared, {} virtual; \
         {streamed} streamed from 2 processes, {endpoint_subs} to response endpoints); one more: {}",
        total - distinct - shared,
        match &over {
            Some(Reply::Error(c)) =>
                format!("error {c}{}", if over_nomem { " (NOMEM)" } else { "" }),
            other => format!("{other:?}"),
        }
    );
    println!(
        "  {clients} bus clients connected ({large_open} of them holding {} large receive \
         buffers of {} B); client {} admitted by closing the idlest: {extra_admitted}",
        consts::BUS_LARGE_BUFFERS,
        consts::BUS_MAX_FRAME,
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
    drop(large);
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
            ("extra_client_admitted", J::Bool(extra_admitted)),
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
