//! End to end: what MQTT 5 changes ([mqtt5-1..10], core-bus.md section 6),
//! against the real mosquitto 2.0 with MQTT 5, and a mock broker only for
//! what mosquitto cannot produce (a DISCONNECT with a given reason, a
//! refusal code, a topic alias from the broker). The daemons here choose
//! their protocol themselves (`--mqtt`), whatever the run's default.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::bus::*;
use common::*;
use iotcored::bus::frame::RequestType;

const BIN: &str = env!("CARGO_BIN_EXE_iotcored");
const SECS: fn(u64) -> Duration = Duration::from_secs;

fn start(port: u16, id: &str, extra: &[&str]) -> (Daemon, PathBuf) {
    connected_with_bus(BIN.as_ref(), port, id, extra)
}

/// A daemon expected to exit soon after connecting: not waited for (its
/// bus socket may be gone again before a test could see it).
fn start_to_exit(port: u16, id: &str) -> Daemon {
    let mut args = iotcored_args(Pki::get(), port, id);
    args.extend(["--socket-dir", ".", "--mqtt", "5"].map(String::from));
    Daemon::start(BIN, &args)
}

/// A QoS 1 publish call answered after the broker's verdict.
fn acked(topic: &str, payload: &[u8]) -> Vec<u8> {
    params(&[
        ("topic", V::Buf(topic.as_bytes())),
        ("payload", V::Buf(payload)),
        ("qos", V::I64(1)),
        ("confirm", V::Buf(b"acked")),
    ])
}

fn string_stat(sock: &Path, key: &str) -> String {
    let mut c = BusClient::connect(sock);
    let reply = c.call("stats", &params(&[])).expect("stats answer");
    let map = reply.object().as_map().expect("map");
    let value = map
        .get(key.as_bytes())
        .expect("key")
        .as_buf()
        .expect("buffer");
    String::from_utf8_lossy(value).into_owned()
}

#[test]
fn a_forbidden_publish_is_refused_by_its_puback_and_the_shared_connection_stays() {
    // [mqtt5-7] [bus-confirm-1]: mosquitto's dynamic-security plugin
    // answers PUBACK 0x87; the message is not resent, the call hears
    // UNAUTHORIZED, and the connection everyone shares stays up.
    let broker = Mosquitto::builder().deny_publish("forbidden/#").start();
    let sub = Subscriber::start(&broker, "#", 1);
    let (d, sock) = start(broker.port(), "gw-verdict", &["--mqtt", "5"]);
    let mut c = BusClient::connect(&sock);
    assert_eq!(
        c.call("publish", &acked("forbidden/x", b"no")),
        Some(Reply::Error(code::UNAUTHORIZED))
    );
    assert!(is_null(&c.call("publish", &acked("allowed/x", b"yes"))));
    assert!(sub.wait_lines(1, SECS(5)), "{}", sub.output());
    assert_eq!(sub.lines(), ["allowed/x yes"]);
    let st = stats(&sock);
    assert_eq!((st["rejected"], st["acked"], st["reconnects"]), (1, 1, 0));
    assert_eq!(
        broker.count_log("Denied PUBLISH from gw-verdict"),
        1,
        "not resent"
    );
    let log = d.log();
    assert!(
        log.contains("the broker refused a message on \"forbidden/x\": PUBACK 0x87 not authorized"),
        "{log}"
    );
    assert!(!log.contains("disconnected"), "{log}");
    // A second refusal of the same topic within the minute is not logged.
    assert_eq!(
        c.call("publish", &acked("forbidden/x", b"again")),
        Some(Reply::Error(code::UNAUTHORIZED))
    );
    assert_eq!(d.log().matches("PUBACK 0x87").count(), 1);
}

#[test]
fn with_mqtt_3_1_1_the_same_refusal_is_invisible() {
    // Why MQTT 5 is the default: over 3.1.1 mosquitto acknowledges the
    // forbidden publish and drops it; AWS would close the connection.
    let broker = Mosquitto::builder().deny_publish("forbidden/#").start();
    let (_d, sock) = start(broker.port(), "gw-verdict3", &["--mqtt", "3.1.1"]);
    let mut c = BusClient::connect(&sock);
    assert!(is_null(&c.call("publish", &acked("forbidden/x", b"no"))));
    assert!(broker.wait_log("Denied PUBLISH from gw-verdict3", SECS(5)));
    assert_eq!(stats(&sock)["rejected"], 0);
}

#[test]
fn the_connack_limits_of_mosquitto_are_announced_and_honoured() {
    // [mqtt5-4]: mosquitto announces max_packet_size and
    // max_inflight_messages; a publish over the packet size is RANGE before
    // it is queued instead of a closed connection.
    let broker = Mosquitto::builder()
        .max_packet_size(2000)
        .config_line("max_inflight_messages 7")
        .start();
    let (d, sock) = start(broker.port(), "gw-limits", &["--mqtt", "5"]);
    assert!(
        d.log()
            .contains("receive maximum 7, maximum packet size 2000"),
        "{}",
        d.log()
    );
    let mut c = BusClient::connect(&sock);
    assert_eq!(
        c.call("publish", &publish_params("big", &[b'x'; 2000], 1)),
        Some(Reply::Error(code::RANGE))
    );
    assert!(is_null(&c.call("publish", &acked("small", &[b'x'; 1900]))));
    let st = stats(&sock);
    assert_eq!((st["published"], st["acked"], st["reconnects"]), (1, 1, 0));
}

#[test]
fn publish_properties_reach_a_subscriber_and_come_back_to_those_who_ask() {
    // [mqtt5-5] and core-bus.md section 6: the publish keys go out as
    // properties (mosquitto_sub -V 5 prints them); a local subscriber with
    // `properties: true` gets them back, one without sees {topic, payload}.
    let broker = Mosquitto::start();
    let printer = Subscriber::builder(&broker, "props/#")
        .arg("-V")
        .arg("5")
        .arg("-F")
        .arg("%t C=%C R=%R D=%D E=%E P=%P")
        .start();
    let (_d, sock) = start(broker.port(), "gw-props", &["--mqtt", "5"]);
    let mut with = BusClient::connect(&sock);
    with.send(
        "subscribe",
        RequestType::Subscribe,
        &params(&[
            ("topic_filter", V::Buf(b"props/#")),
            ("properties", V::Bool(true)),
        ]),
    );
    assert_eq!(with.read(), Some(Reply::Accepted));
    let mut without = BusClient::connect(&sock);
    without.send(
        "subscribe",
        RequestType::Subscribe,
        &subscribe_params(&["props/#"], 0),
    );
    assert_eq!(without.read(), Some(Reply::Accepted));

    let mut c = BusClient::connect(&sock);
    let p = params(&[
        ("topic", V::Buf(b"props/a")),
        ("payload", V::Buf(b"{}")),
        ("expiry", V::I64(300)),
        (
            "user_properties",
            V::Map(vec![(b"site", b"north"), (b"unit", b"7")]),
        ),
        ("content_type", V::Buf(b"application/json")),
        ("response_topic", V::Buf(b"props/reply")),
        ("correlation_data", V::Buf(b"req-1")),
    ]);
    assert!(is_null(&c.call("publish", &p)));
    assert!(printer.wait_lines(1, SECS(5)), "{}", printer.output());
    let line = &printer.lines()[0];
    assert!(
        line.starts_with("props/a C=application/json R=props/reply D=req-1 E="),
        "{line}"
    );
    assert!(line.ends_with("P=site:north unit:7"), "{line}");
    let expiry: u32 = line
        .split("E=")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .expect("an expiry");
    assert!((290..=300).contains(&expiry), "{line}");

    // Back through mosquitto to the daemon's subscribers.
    let got = with.read().expect("a message with properties");
    let map = got.object().as_map().unwrap();
    let keys: Vec<String> = map
        .iter()
        .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
        .collect();
    assert_eq!(
        keys,
        [
            "topic",
            "payload",
            "user_properties",
            "content_type",
            "response_topic",
            "correlation_data",
            "expiry"
        ]
    );
    let users = map.get(b"user_properties").unwrap().as_map().unwrap();
    let users: Vec<(Vec<u8>, Vec<u8>)> = users
        .iter()
        .map(|(k, v)| (k.to_vec(), v.as_buf().unwrap().to_vec()))
        .collect();
    assert_eq!(
        users,
        [
            (b"site".to_vec(), b"north".to_vec()),
            (b"unit".to_vec(), b"7".to_vec())
        ]
    );
    assert_eq!(
        map.get(b"correlation_data").unwrap().as_buf(),
        Some(&b"req-1"[..])
    );
    let plain = without.read().expect("a message");
    let keys = plain.object().as_map().unwrap().len();
    assert_eq!(keys, 2, "GGL clients see exactly {{topic, payload}}");
}

#[test]
fn a_message_that_expires_while_offline_is_dropped_unsent_in_both_protocols() {
    // [bus-expiry-1]
    for version in ["5", "3.1.1"] {
        let port = free_port();
        let (d, sock) = start_with_bus(
            BIN.as_ref(),
            port,
            &format!("gw-expiry-{}", version.len()),
            &["--mqtt", version],
        );
        let mut waiting = BusClient::connect(&sock);
        let short = params(&[
            ("topic", V::Buf(b"exp/short")),
            ("qos", V::I64(1)),
            ("expiry", V::I64(1)),
            ("confirm", V::Buf(b"acked")),
        ]);
        waiting.send("publish", RequestType::Call, &short);
        let mut c = BusClient::connect(&sock);
        let long = params(&[
            ("topic", V::Buf(b"exp/long")),
            ("payload", V::Buf(b"kept")),
            ("qos", V::I64(1)),
            ("expiry", V::I64(600)),
        ]);
        assert!(is_null(&c.call("publish", &long)));
        std::thread::sleep(Duration::from_millis(1500));
        let broker = Mosquitto::builder().port(port).start();
        let sub = Subscriber::start(&broker, "exp/#", 1);
        assert!(
            d.wait_log("connected (session present", SECS(10)),
            "{}",
            d.log()
        );
        assert!(sub.wait_lines(1, SECS(5)), "{}", sub.output());
        assert_eq!(waiting.read(), Some(Reply::Error(code::TIMEOUT)));
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(sub.lines(), ["exp/long kept"], "{version}");
        assert_eq!(stats(&sock)["expired"], 1, "{version}");
    }
}

/// A mock broker's MQTT 5 CONNACK followed by `then`.
fn connack_then(then: &[u8]) -> Vec<u8> {
    let mut bytes = CONNACK_ACCEPTED_V5.to_vec();
    bytes.extend_from_slice(then);
    bytes
}

#[test]
fn a_session_taken_over_is_logged_naming_the_client_id_and_kept_in_stats() {
    // [mqtt5-9] mosquitto closes the older connection without a
    // DISCONNECT, so the mock sends the one AWS sends: 0x8E with a reason.
    let disconnect = [
        0xE0, 0x0B, 0x8E, 0x09, 0x1F, 0x00, 0x06, b'o', b't', b'h', b'e', b'r', b'!',
    ];
    let broker = MockBroker::with_script(
        Pki::get(),
        vec![
            Behaviour::ReplyRaw(connack_then(&disconnect)),
            Behaviour::ReplyRaw(CONNACK_ACCEPTED_V5.to_vec()),
        ],
    );
    let (d, sock) = start_with_bus(BIN.as_ref(), broker.port(), "gw-taken", &["--mqtt", "5"]);
    assert!(
        d.wait_log(
            "another client connected with our client id \"gw-taken\"",
            SECS(10)
        ),
        "{}",
        d.log()
    );
    assert!(d
        .log()
        .contains("broker DISCONNECT 0x8E session taken over"));
    assert!(
        d.wait_log_count("connected (session present", 2, SECS(10)),
        "{}",
        d.log()
    );
    assert_eq!(
        string_stat(&sock, "last_disconnect"),
        "broker DISCONNECT 0x8E session taken over"
    );
}

#[test]
fn connack_refusals_exit_or_back_off_by_their_reason_code() {
    // [mqtt5-3]
    // 0x9F connection rate exceeded: at least 30 s before the next try.
    let broker = MockBroker::start(
        Pki::get(),
        Behaviour::ReplyRaw(vec![
            0x20, 0x0A, 0x00, 0x9F, 0x07, 0x1F, 0x00, 0x04, b's', b'l', b'o', b'w',
        ]),
    );
    let (d, _sock) = start_with_bus(BIN.as_ref(), broker.port(), "gw-rate", &["--mqtt", "5"]);
    assert!(d.wait_log("next attempt in", SECS(10)), "{}", d.log());
    let log = d.log();
    assert!(
        log.contains("broker refused the connection: 0x9F connection rate exceeded: slow"),
        "{log}"
    );
    let delay: u64 = log
        .split("next attempt in ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .expect("a delay");
    assert!(delay >= 30_000, "{delay} ms");

    // 0x85 client identifier not valid: a usage problem, exit 2.
    let broker = MockBroker::start(
        Pki::get(),
        Behaviour::ReplyRaw(vec![0x20, 0x03, 0x00, 0x85, 0x00]),
    );
    let mut d = start_to_exit(broker.port(), "gw-badid");
    let status = d.wait_exit(SECS(10)).expect("exits");
    assert_eq!(status.code(), Some(2), "{}", d.log());

    // 0x87 not authorized: an authentication failure, exit 3 (the 3.1.1
    // CONNACK 5 of the mock answered in MQTT 5 form).
    let broker = MockBroker::start(Pki::get(), Behaviour::Reply(vec![0x20, 0x02, 0x00, 0x05]));
    let mut d = start_to_exit(broker.port(), "gw-noauth");
    let status = d.wait_exit(SECS(10)).expect("exits");
    assert_eq!(status.code(), Some(3), "{}", d.log());

    // 0x84 unsupported protocol version: the hint, and reconnecting.
    let broker = MockBroker::start(
        Pki::get(),
        Behaviour::ReplyRaw(vec![0x20, 0x03, 0x00, 0x84, 0x00]),
    );
    let (mut d, _) = start_with_bus(BIN.as_ref(), broker.port(), "gw-old", &["--mqtt", "5"]);
    assert!(d.wait_log("run with --mqtt 3.1.1", SECS(10)), "{}", d.log());
    assert!(d.is_running());
}

#[test]
fn a_topic_alias_from_the_broker_is_a_protocol_error_answered_with_disconnect_0x94() {
    // [mqtt5-7]: we allowed no aliases (Topic Alias Maximum 0).
    let aliased = [0x30, 0x07, 0x00, 0x00, 0x03, 0x23, 0x00, 0x01, b'x'];
    let broker = MockBroker::with_script(
        Pki::get(),
        vec![
            Behaviour::ReplyRaw(connack_then(&aliased)),
            Behaviour::ReplyRaw(CONNACK_ACCEPTED_V5.to_vec()),
        ],
    );
    let (d, _sock) = start_with_bus(BIN.as_ref(), broker.port(), "gw-alias", &["--mqtt", "5"]);
    assert!(
        d.wait_log_count("connected (session present", 2, SECS(10)),
        "{}",
        d.log()
    );
    assert!(
        d.log().contains("the broker used a topic alias"),
        "{}",
        d.log()
    );
    let first = broker.received().into_iter().next().unwrap_or_default();
    assert!(
        first.windows(3).any(|w| w == [0xE0, 0x01, 0x94]),
        "DISCONNECT 0x94 in {first:02x?}"
    );
}

#[test]
fn the_connect_asks_for_what_the_spec_says() {
    // [mqtt5-2]: level 5; session expiry 0 without --persistent-session,
    // the configured one with it; receive maximum and maximum packet size
    // from the build; no topic aliases; problem information.
    for (extra, expiry) in [
        (&[][..], 0u32),
        (
            &["--persistent-session", "--session-expiry", "7200"][..],
            7200,
        ),
    ] {
        let broker = MockBroker::start(
            Pki::get(),
            Behaviour::ReplyRaw(CONNACK_ACCEPTED_V5.to_vec()),
        );
        let mut args = vec!["--mqtt", "5"];
        args.extend_from_slice(extra);
        let (d, _) = start_with_bus(BIN.as_ref(), broker.port(), "gw-connect5", &args);
        assert!(
            d.wait_log("connected (session present", SECS(10)),
            "{}",
            d.log()
        );
        let connect = broker.first_packets().into_iter().next().expect("CONNECT");
        assert_eq!(connect_level(&connect), Some(5));
        let mut props = vec![0x11];
        props.extend_from_slice(&expiry.to_be_bytes());
        props.extend_from_slice(&[0x21, 0x00]); // receive maximum, high byte
        assert!(
            connect.windows(props.len()).any(|w| w == props),
            "{connect:02x?}"
        );
        assert!(
            connect.windows(3).any(|w| w == [0x22, 0, 0]),
            "{connect:02x?}"
        );
        assert!(connect.windows(2).any(|w| w == [0x17, 1]), "{connect:02x?}");
        assert!(connect.windows(1).any(|w| w == [0x27]), "{connect:02x?}");
    }
}

#[test]
fn sigterm_sends_disconnect_with_reason_0_under_mqtt5() {
    // [mqtt5-10]: the two-byte DISCONNECT is reason 0x00 with MQTT 5.
    let broker = Mosquitto::start();
    let (mut d, _) = start(broker.port(), "gw-bye5", &["--mqtt", "5"]);
    let t0 = Instant::now();
    d.signal(libc::SIGTERM);
    let status = d.wait_exit(SECS(3)).expect("exits");
    assert_eq!(status.code(), Some(0));
    assert!(t0.elapsed() < SECS(2));
    assert!(
        broker.wait_log("Received DISCONNECT from gw-bye5", SECS(2)),
        "mosquitto saw no DISCONNECT"
    );
}

#[test]
fn a_disconnect_right_after_a_publish_counts_as_a_close_for_the_quarantine() {
    // [mqtt5-9] [bus-iso-2] under MQTT 5: the broker answers one message
    // with DISCONNECT 0x95 every time; after two probes it is set aside and
    // every other message is acknowledged, in order.
    let broker = MockBroker::start(Pki::get(), Behaviour::DisconnectOn("poison/".into()));
    let (d, sock) = start(
        broker.port(),
        "gw-poison5",
        &["--mqtt", "5", "--max-backoff", "2"],
    );
    let mut c = BusClient::connect(&sock);
    assert!(is_null(
        &c.call("publish", &publish_params("good/1", b"1", 1))
    ));
    let mut poison = BusClient::connect(&sock);
    poison.send("publish", RequestType::Call, &acked("poison/x", b"p"));
    for i in 2..=5 {
        let payload = i.to_string();
        let p = publish_params(&format!("good/{i}"), payload.as_bytes(), 1);
        assert!(is_null(&c.call("publish", &p)));
    }
    assert_eq!(poison.read(), Some(Reply::Error(code::REMOTE)));
    assert!(
        wait_until(SECS(20), || stats(&sock)["acked"] == 5),
        "{}",
        d.log()
    );
    let st = stats(&sock);
    assert_eq!((st["quarantined"], st["spooled"]), (1, 0));
    assert!(d.log().contains("broker DISCONNECT 0x95 packet too large"));
    // What the broker received, in order, first sends only.
    let mut seen: Vec<String> = Vec::new();
    for conn in broker.received() {
        for p in publishes_in(&conn) {
            if p.topic.starts_with("good/") && !seen.contains(&p.topic) {
                seen.push(p.topic);
            }
        }
    }
    assert_eq!(seen, ["good/1", "good/2", "good/3", "good/4", "good/5"]);
}

#[test]
fn repeated_topics_go_with_aliases_when_the_broker_allows_them() {
    // [mqtt5-6] Against mosquitto (Topic Alias Maximum 10 in its CONNACK):
    // every message arrives with its topic. Against the mock (8, as AWS):
    // the first of a topic carries topic and alias, the next the alias only.
    let broker = Mosquitto::start();
    let sub = Subscriber::start(&broker, "alias/#", 1);
    let (_d, sock) = start(broker.port(), "gw-alias5", &["--mqtt", "5"]);
    let mut c = BusClient::connect(&sock);
    for i in 0..5 {
        let p = publish_params(
            "alias/site/gateway/temperature",
            i.to_string().as_bytes(),
            1,
        );
        assert!(is_null(&c.call("publish", &p)));
    }
    assert!(sub.wait_lines(5, SECS(5)), "{}", sub.output());
    let want: Vec<String> = (0..5)
        .map(|i| format!("alias/site/gateway/temperature {i}"))
        .collect();
    assert_eq!(sub.lines(), want);

    let mock = MockBroker::start(Pki::get(), Behaviour::DisconnectOn("never/".into()));
    let (_d, sock) = start(mock.port(), "gw-alias-mock", &["--mqtt", "5"]);
    let mut c = BusClient::connect(&sock);
    for t in ["a/1", "a/1", "a/2", "a/1"] {
        assert!(is_null(&c.call("publish", &acked(t, b"x"))));
    }
    let seen = publishes_in(&mock.received()[0]);
    let got: Vec<(&str, Option<u16>)> = seen.iter().map(|p| (p.topic.as_str(), p.alias)).collect();
    assert_eq!(
        got,
        [
            ("a/1", Some(1)),
            ("", Some(1)),
            ("a/2", Some(2)),
            ("", Some(1))
        ]
    );
}

#[test]
fn without_subscription_identifiers_subscribes_go_8_filters_at_a_time_and_bare() {
    // AWS IoT Core's CONNACK says Subscription Identifier Available 0: an
    // identifier would be refused, so SUBSCRIBEs carry none (and up to 8
    // filters, as with 3.1.1).
    let connack = [0x20, 0x08, 0x00, 0x00, 0x05, 0x29, 0x00, 0x22, 0x00, 0x08];
    let broker = MockBroker::start(Pki::get(), Behaviour::ReplyRaw(connack.to_vec()));
    let (d, sock) = start(broker.port(), "gw-noids", &["--mqtt", "5"]);
    let mut s = BusClient::connect(&sock);
    s.send(
        "subscribe",
        RequestType::Subscribe,
        &subscribe_params(&["n/1", "n/2", "n/3"], 0),
    );
    assert!(
        wait_until(SECS(5), || broker
            .received()
            .first()
            .is_some_and(|b| b.contains(&0x82))),
        "{}",
        d.log()
    );
    let bytes = broker.received().remove(0);
    let at = bytes.iter().position(|&b| b == 0x82).expect("a SUBSCRIBE");
    let subscribe = &bytes[at..];
    // 0x82, remaining length 21: packet id, property length 0, three
    // filters of 2 + 3 bytes, each with its options byte.
    assert_eq!(&subscribe[1..2], &[21], "{subscribe:02x?}");
    assert_eq!(subscribe[4], 0x00, "no properties: {subscribe:02x?}");
    assert_eq!(
        &subscribe[5..23],
        b"\x00\x03n/1\x00\x00\x03n/2\x00\x00\x03n/3\x00"
    );
}
