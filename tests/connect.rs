//! End to end: the real iotcored binary against a real mosquitto with
//! mutual TLS on 127.0.0.1 (and, for corners a real broker cannot produce,
//! a scripted TLS mock broker). Requirement IDs are from spec/iotcored.md.

mod common;

use std::time::{Duration, Instant};

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_iotcored");
const SECS: fn(u64) -> Duration = Duration::from_secs;

/// Exit statuses documented in the README.
const EXIT_USAGE: i32 = 2;
const EXIT_ERROR: i32 = 1;
const EXIT_AUTH: i32 = 3;
const EXIT_UNTRUSTED: i32 = 4;

fn start(port: u16, id: &str, extra: &[&str]) -> Daemon {
    let mut args = iotcored_args(Pki::get(), port, id);
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(["--socket-dir".into(), ".".into()]);
    Daemon::start(BIN, &args)
}

fn with_files(port: u16, rootca: &str, cert: &str, key: &str) -> Daemon {
    let pki = Pki::get();
    let p = |n: &str| pki.path(n).display().to_string();
    Daemon::start(
        BIN,
        &[
            "-e",
            "127.0.0.1",
            "-i",
            "files",
            "-r",
            &p(rootca),
            "-c",
            &p(cert),
            "-k",
            &p(key),
            "--port",
            &port.to_string(),
            "--socket-dir",
            ".",
        ],
    )
}

fn exit_code(d: &mut Daemon, within: Duration) -> i32 {
    let status = d
        .wait_exit(within)
        .unwrap_or_else(|| panic!("iotcored still running; log:\n{}", d.log()));
    status.code().expect("exited by a signal")
}

#[test]
fn connects_at_startup_and_the_broker_sees_the_client_id() {
    // [iotcored-1] [iotcored-param-id-1] [iotcored-param-endpoint-1]
    let broker = Mosquitto::start();
    let d = start(broker.port(), "gw-connect", &[]);
    assert!(
        broker.wait_log("New client connected from 127.0.0.1", SECS(10)),
        "broker log:\n{}",
        broker.log()
    );
    assert!(broker.log().contains(" as gw-connect "), "{}", broker.log());
    assert!(d.wait_log("connected (session present: false)", SECS(5)));
}

#[test]
fn host_names_resolve_and_are_verified_against_the_certificate() {
    // [iotcored-param-endpoint-1] "localhost" goes through the resolver and
    // is checked against the server certificate's DNS SAN.
    let broker = Mosquitto::start();
    let mut args = iotcored_args(Pki::get(), broker.port(), "gw-dns");
    args[1] = "localhost".into();
    args.extend(["--socket-dir".into(), ".".into()]);
    let d = Daemon::start(BIN, &args);
    assert!(
        d.wait_log("connected (session present", SECS(10)),
        "{}",
        d.log()
    );
}

#[test]
fn an_idle_connection_is_kept_alive_with_pings() {
    let broker = Mosquitto::start();
    let d = start(broker.port(), "gw-ping", &["--keepalive", "1"]);
    assert!(broker.wait_log_count("Received PINGREQ from gw-ping", 3, SECS(10)));
    assert!(d.log().contains("outside AWS IoT Core's 30-1200 s"));
    assert!(!d.log().contains("disconnected"), "{}", d.log());
}

#[test]
fn sigterm_sends_disconnect_and_exits_zero_within_a_second() {
    let broker = Mosquitto::start();
    let mut d = start(broker.port(), "gw-term", &[]);
    assert!(d.wait_log("connected (session present", SECS(10)));
    let t0 = Instant::now();
    d.signal(libc::SIGTERM);
    assert_eq!(exit_code(&mut d, SECS(2)), 0);
    assert!(t0.elapsed() < SECS(1), "took {:?}", t0.elapsed());
    assert!(broker.wait_log("Received DISCONNECT from gw-term", SECS(2)));
}

#[test]
fn sigint_while_the_broker_is_unreachable_still_exits_zero() {
    let port = free_port(); // nothing listens there
    let mut d = start(port, "gw-int", &[]);
    assert!(d.wait_log("next attempt in", SECS(5)), "{}", d.log());
    d.signal(libc::SIGINT);
    assert_eq!(exit_code(&mut d, SECS(2)), 0);
}

#[test]
fn a_killed_and_restarted_broker_is_reconnected_to() {
    // [iotcored-2]
    let mut broker = Mosquitto::start();
    let d = start(broker.port(), "gw-restart", &[]);
    assert!(d.wait_log("connected (session present", SECS(10)));
    broker.kill();
    assert!(d.wait_log("disconnected:", SECS(5)), "{}", d.log());
    // A few refused attempts with backoff while the broker is down.
    assert!(d.wait_log("next attempt in", SECS(5)));
    std::thread::sleep(SECS(2));
    broker.restart();
    assert!(d.wait_log("reconnected", SECS(15)), "{}", d.log());
    assert!(broker.wait_log("as gw-restart", SECS(2)));
}

#[test]
fn refused_connections_back_off_with_growing_jittered_delays() {
    // [iotcored-2] Nothing listens: every attempt is refused.
    let port = free_port();
    let d = start(port, "gw-backoff", &[]);
    assert!(
        d.wait_log_count("next attempt in", 3, SECS(15)),
        "{}",
        d.log()
    );
    let delays: Vec<u64> = d
        .log()
        .lines()
        .filter_map(|l| l.split("next attempt in ").nth(1))
        .filter_map(|s| s.trim_end_matches(" ms").parse().ok())
        .collect();
    assert!(delays.len() >= 3, "{delays:?}");
    let ceilings = [2000, 4000, 8000];
    for (d, c) in delays.iter().zip(ceilings) {
        assert!((1000..=c).contains(d), "delay {d} ms outside 1000..={c}");
    }
    assert!(d.log().contains("TCP connect failed"), "{}", d.log());
}

#[test]
fn a_blackholed_link_is_declared_dead_within_one_and_a_half_keepalives() {
    let broker = Mosquitto::start();
    let proxy = Proxy::start(broker.port());
    let d = start(proxy.port(), "gw-dead", &["--keepalive", "2"]);
    assert!(d.wait_log("connected (session present", SECS(10)));
    proxy.blackhole(true);
    let t0 = Instant::now();
    assert!(d.wait_log("no PINGRESP", SECS(6)), "{}", d.log());
    // From the last packet received (at most when the blackhole began),
    // death within 1.5 x 2 s = 3 s (plus scheduling slack).
    assert!(
        t0.elapsed() < Duration::from_millis(3500),
        "{:?}",
        t0.elapsed()
    );
    proxy.blackhole(false);
    proxy.cut(Cut::Rst);
    assert!(d.wait_log("reconnected", SECS(15)), "{}", d.log());
}

#[test]
fn links_cut_with_fin_or_reset_are_reestablished() {
    let broker = Mosquitto::start();
    let proxy = Proxy::start(broker.port());
    let d = start(proxy.port(), "gw-cut", &[]);
    assert!(d.wait_log("connected (session present", SECS(10)));
    proxy.cut(Cut::Fin);
    assert!(
        d.wait_log_count("connected (session present", 2, SECS(10)),
        "{}",
        d.log()
    );
    proxy.cut(Cut::Rst);
    assert!(
        d.wait_log_count("connected (session present", 3, SECS(10)),
        "{}",
        d.log()
    );
    assert!(broker.wait_log_count("as gw-cut", 3, SECS(2)));
}

#[test]
fn a_refusing_endpoint_is_retried_until_it_accepts() {
    let broker = Mosquitto::start();
    let proxy = Proxy::start(broker.port());
    proxy.refuse(true);
    let d = start(proxy.port(), "gw-refuse", &[]);
    assert!(
        d.wait_log_count("TCP connect failed", 2, SECS(10)),
        "{}",
        d.log()
    );
    proxy.refuse(false);
    assert!(
        d.wait_log("connected (session present", SECS(15)),
        "{}",
        d.log()
    );
}

#[test]
fn connack_not_authorized_exits_with_the_auth_failure_status() {
    // [iotcored-3] CONNACK return code 5.
    let broker = Mosquitto::builder().password_file_mode().start();
    let mut d = start(broker.port(), "gw-noauth", &[]);
    assert_eq!(exit_code(&mut d, SECS(10)), EXIT_AUTH, "{}", d.log());
    assert!(d.log().contains("not authorized"), "{}", d.log());
    assert_eq!(broker.count_log("New connection from"), 1, "no retry");
}

#[test]
fn a_client_certificate_from_an_untrusted_ca_exits_with_the_auth_failure_status() {
    // [iotcored-3] The broker's TLS alert (unknown_ca) after the handshake.
    let broker = Mosquitto::start();
    let mut d = with_files(
        broker.port(),
        "ca.pem",
        "client-untrusted.pem",
        "client-untrusted.key",
    );
    assert_eq!(exit_code(&mut d, SECS(15)), EXIT_AUTH, "{}", d.log());
    assert!(
        d.log().contains("rejected the client certificate"),
        "{}",
        d.log()
    );
}

#[test]
fn an_expired_client_certificate_exits_with_the_auth_failure_status() {
    let broker = Mosquitto::start();
    let mut d = with_files(
        broker.port(),
        "ca.pem",
        "client-expired.pem",
        "client-expired.key",
    );
    assert_eq!(exit_code(&mut d, SECS(15)), EXIT_AUTH, "{}", d.log());
}

#[test]
fn the_auth_failure_is_detected_over_tls_1_2_too() {
    let broker = Mosquitto::builder().tls_version("tlsv1.2").start();
    let mut d = with_files(
        broker.port(),
        "ca.pem",
        "client-untrusted.pem",
        "client-untrusted.key",
    );
    assert_eq!(exit_code(&mut d, SECS(15)), EXIT_AUTH, "{}", d.log());
}

#[test]
fn tls_1_2_brokers_are_supported() {
    let broker = Mosquitto::builder().tls_version("tlsv1.2").start();
    let d = start(broker.port(), "gw-tls12", &[]);
    assert!(
        d.wait_log("TLS established (TLSv1_2)", SECS(10)),
        "{}",
        d.log()
    );
    assert!(d.wait_log("connected (session present", SECS(5)));
}

#[test]
fn a_server_certificate_for_another_host_is_fatal() {
    let pki = Pki::get();
    let broker = Mosquitto::builder()
        .server_cert(
            pki.path("server-wronghost.pem"),
            pki.path("server-wronghost.key"),
        )
        .start();
    let mut d = start(broker.port(), "gw-wronghost", &[]);
    assert_eq!(exit_code(&mut d, SECS(10)), EXIT_UNTRUSTED, "{}", d.log());
    assert!(d.log().contains("is not trusted"), "{}", d.log());
}

#[test]
fn a_server_certificate_from_another_ca_is_fatal() {
    let broker = Mosquitto::start();
    let mut d = with_files(
        broker.port(),
        "untrusted-ca.pem",
        "client.pem",
        "client.key",
    );
    assert_eq!(exit_code(&mut d, SECS(10)), EXIT_UNTRUSTED, "{}", d.log());
}

#[test]
fn every_supported_key_and_certificate_format_connects() {
    // [iotcored-param-rootca-1] no trailing newline; RSA PKCS#1, EC SEC1,
    // PKCS#8, and a chain with an intermediate CA.
    let broker = Mosquitto::start();
    for (ca, cert, key) in [
        ("ca-nonl.pem", "client-nonl.pem", "client-nonl.key"),
        ("ca.pem", "client-rsa.pem", "client-rsa.key"),
        ("ca.pem", "client.pem", "client-ec-sec1.key"),
        ("ca.pem", "client-chain.pem", "client-chain.key"),
    ] {
        let mut d = with_files(broker.port(), ca, cert, key);
        assert!(
            d.wait_log("connected (session present", SECS(10)),
            "{cert} {key}: {}",
            d.log()
        );
        d.signal(libc::SIGTERM);
        assert_eq!(exit_code(&mut d, SECS(3)), 0);
    }
}

#[test]
fn bad_files_exit_1_with_a_message_naming_the_file() {
    let pki = Pki::get();
    let dir = TestDir::new("badfiles");
    let empty = dir.join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\n!!!!\n").unwrap();
    let unreadable = dir.join("dir.pem");
    std::fs::create_dir(&unreadable).unwrap();
    // An Ed25519 key: AWS IoT Core takes RSA and ECDSA device keys only.
    let ed25519 = dir.join("ed25519.key");
    let out = std::process::Command::new("openssl")
        .args(["genpkey", "-algorithm", "ED25519", "-out"])
        .arg(&ed25519)
        .output()
        .expect("openssl");
    assert!(out.status.success(), "{out:?}");
    let p = |n: &str| pki.path(n).display().to_string();
    let s = |p: &std::path::Path| p.display().to_string();
    let cases: Vec<([String; 3], String, &str)> = vec![
        (
            [p("ca.pem"), p("client.pem"), s(&ed25519)],
            s(&ed25519),
            "unusable private key: not an RSA or ECDSA (P-256, P-384) key",
        ),
        (
            [p("ca.pem"), p("client.pem"), p("p521.key")],
            p("p521.key"),
            "unusable private key: not an RSA or ECDSA (P-256, P-384) key",
        ),
        (
            [
                s(&dir.join("missing.pem")),
                p("client.pem"),
                p("client.key"),
            ],
            s(&dir.join("missing.pem")),
            "cannot open",
        ),
        (
            [p("ca.pem"), s(&empty), p("client.key")],
            s(&empty),
            "no certificate",
        ),
        (
            [p("ca.pem"), s(&garbage), p("client.key")],
            s(&garbage),
            "not a valid PEM",
        ),
        (
            [p("ca.pem"), p("client.pem"), s(&unreadable)],
            s(&unreadable),
            "cannot",
        ),
        (
            [p("client.key"), p("client.pem"), p("client.key")],
            p("client.key"),
            "no CA certificate",
        ),
        (
            [p("ca.pem"), p("client.key"), p("client.key")],
            p("client.key"),
            "no certificate",
        ),
        (
            [p("ca.pem"), p("client.pem"), p("client.pem")],
            p("client.pem"),
            "no private key",
        ),
        (
            [p("ca.pem"), p("client.pem"), p("other.key")],
            p("other.key"),
            "does not match",
        ),
    ];
    for ([ca, cert, key], named, what) in cases {
        let mut d = Daemon::start(
            BIN,
            &[
                "-e",
                "127.0.0.1",
                "-i",
                "x",
                "-r",
                &ca,
                "-c",
                &cert,
                "-k",
                &key,
            ],
        );
        let code = exit_code(&mut d, SECS(5));
        let log = d.log();
        assert_eq!(code, EXIT_ERROR, "{ca} {cert} {key}: {log}");
        let line = log
            .lines()
            .find(|l| l.starts_with("iotcored: "))
            .unwrap_or("");
        assert!(
            line.contains(&named) && line.contains(what),
            "expected {named} / {what}: {log}"
        );
        assert_eq!(log.lines().count(), 1, "one line: {log}");
    }
}

#[test]
fn bad_command_lines_exit_2_with_a_usage_message() {
    let base = iotcored_args(Pki::get(), 8883, "x");
    let without = |flag: &str| -> Vec<String> {
        let i = base.iter().position(|a| a == flag).unwrap();
        let mut v = base.clone();
        v.drain(i..i + 2);
        v
    };
    let mut cases: Vec<Vec<String>> = ["-e", "-i", "-r", "-c", "-k"]
        .iter()
        .map(|f| without(f))
        .collect();
    for extra in [
        &["--bogus"][..],
        &["--port", "0"],
        &["--port", "70000"],
        &["--keepalive", "0"],
        &["--keepalive", "abc"],
        &["stray"],
        &["--port"],
        // An empty directory would bind in the current one.
        &["--socket-dir", ""],
        &["--max-backoff", "0"],
    ] {
        let mut v = base.clone();
        v.extend(extra.iter().map(|s| s.to_string()));
        cases.push(v);
    }
    for args in cases {
        let mut d = Daemon::start(BIN, &args);
        assert_eq!(
            exit_code(&mut d, SECS(5)),
            EXIT_USAGE,
            "{args:?}: {}",
            d.log()
        );
        assert!(d.log().contains("--help"), "{}", d.log());
    }
    let mut help = Daemon::start(BIN, &["--help"]);
    assert_eq!(exit_code(&mut help, SECS(5)), 0);
    assert!(help.log().contains("--endpoint"));
    let mut version = Daemon::start(BIN, &["-V"]);
    assert_eq!(exit_code(&mut version, SECS(5)), 0);
    assert!(version.log().starts_with("iotcored "));
}

#[test]
fn repeated_closes_after_connect_without_connack_count_as_an_authorization_failure() {
    // AWS IoT Core closes the connection when the policy forbids
    // iot:Connect. Three in a row, no CONNACK in between: exit 3.
    let broker = MockBroker::start(Pki::get(), Behaviour::CloseAfterConnect);
    let mut d = start(broker.port(), "gw-policy", &[]);
    assert_eq!(exit_code(&mut d, SECS(30)), EXIT_AUTH, "{}", d.log());
    assert_eq!(broker.handshakes(), 3);
    assert!(d.log().contains("not authorized to connect"), "{}", d.log());
    for packet in broker.first_packets() {
        assert_eq!(connect_client_id(&packet).as_deref(), Some("gw-policy"));
    }
}

#[test]
fn closes_without_connack_only_count_when_consecutive() {
    // Close, close, CONNACK (then a malformed packet, so we reconnect),
    // close, close, CONNACK: four closes, never three in a row.
    let mut connack_then_garbage = CONNACK_ACCEPTED.to_vec();
    connack_then_garbage.extend([0xF0, 0x00]); // packet type 15: reserved
    let script = vec![
        Behaviour::CloseAfterConnect,
        Behaviour::CloseAfterConnect,
        Behaviour::Reply(connack_then_garbage),
        Behaviour::CloseAfterConnect,
        Behaviour::CloseAfterConnect,
        Behaviour::Reply(CONNACK_ACCEPTED.to_vec()),
    ];
    let broker = MockBroker::with_script(Pki::get(), script);
    let mut d = start(broker.port(), "gw-flaky", &[]);
    assert!(d.wait_log("reconnected", SECS(60)), "{}", d.log());
    assert_eq!(broker.handshakes(), 6);
    d.signal(libc::SIGTERM);
    assert_eq!(exit_code(&mut d, SECS(3)), 0, "{}", d.log());
}

#[test]
fn a_malformed_packet_from_the_broker_causes_a_reconnect_not_a_crash() {
    let mut bad = CONNACK_ACCEPTED.to_vec();
    bad.extend([0x20, 0x03, 0x00, 0x00, 0x00]); // second CONNACK, wrong length
    let broker = MockBroker::with_script(
        Pki::get(),
        vec![
            Behaviour::Reply(bad),
            Behaviour::Reply(vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F]), // bad length
            Behaviour::Reply(CONNACK_ACCEPTED.to_vec()),
        ],
    );
    let mut d = start(broker.port(), "gw-malformed", &[]);
    assert!(
        d.wait_log("malformed packet from the broker", SECS(10)),
        "{}",
        d.log()
    );
    assert!(
        d.wait_log_count("connected (session present", 2, SECS(15)),
        "{}",
        d.log()
    );
    assert!(d.is_running());
    assert!(broker.connections() >= 3, "{}", d.log());
}

#[test]
fn a_broker_that_never_answers_connect_times_out_and_is_retried() {
    let broker = MockBroker::with_script(
        Pki::get(),
        vec![
            Behaviour::Silent,
            Behaviour::Reply(CONNACK_ACCEPTED.to_vec()),
        ],
    );
    let d = start(broker.port(), "gw-silent", &[]);
    assert!(d.wait_log("no CONNACK within 10s", SECS(15)), "{}", d.log());
    assert!(
        d.wait_log("connected (session present", SECS(10)),
        "{}",
        d.log()
    );
}

#[test]
fn a_tls_handshake_that_never_completes_times_out_and_is_retried() {
    // The proxy accepts TCP but forwards nothing: the ClientHello is never
    // answered. The loop must not block; after 10 s the attempt fails.
    let broker = Mosquitto::start();
    let proxy = Proxy::start(broker.port());
    proxy.blackhole(true);
    let d = start(proxy.port(), "gw-hstimeout", &[]);
    assert!(
        d.wait_log("TLS handshake timed out", SECS(15)),
        "{}",
        d.log()
    );
    proxy.blackhole(false);
    proxy.cut(Cut::Rst);
    assert!(
        d.wait_log("connected (session present", SECS(15)),
        "{}",
        d.log()
    );
}

#[test]
fn two_daemons_sharing_a_client_id_are_told_why_they_keep_being_disconnected() {
    // Issue 14: the broker closes the older of two connections with one
    // client id; with MQTT 3.1.1 it says nothing more, so the daemon names
    // the likely cause once it has happened twice in a row.
    let broker = Mosquitto::start();
    let a = start(broker.port(), "gw-twin", &["--max-backoff", "3"]);
    assert!(
        a.wait_log("connected (session present", SECS(10)),
        "{}",
        a.log()
    );
    let b = start(broker.port(), "gw-twin", &["--max-backoff", "3"]);
    // An MQTT 5 broker may say so (DISCONNECT 0x8E, session taken over);
    // mosquitto closes the connection without a word in either protocol.
    let hints = [
        "times in a row; another client may be using the client id \"gw-twin\"",
        "another client connected with our client id \"gw-twin\"",
    ];
    let told = |d: &Daemon| hints.iter().any(|h| d.log().contains(h));
    assert!(
        wait_until(SECS(30), || told(&a) || told(&b)),
        "A:\n{}\nB:\n{}",
        a.log(),
        b.log()
    );
}
