//! End to end: peers that misbehave in ways that once broke the loop (a
//! review found each of these; each test failed before its fix).

mod common;

use std::io::Read;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::bus::*;
use common::*;
use iotcored::bus::frame::{self, RequestType};

const BIN: &str = env!("CARGO_BIN_EXE_iotcored");
const SECS: fn(u64) -> Duration = Duration::from_secs;

fn start(port: u16, id: &str) -> (Daemon, PathBuf) {
    start_with_bus(BIN.as_ref(), port, id, &[])
}

/// utime + stime of a process, in clock ticks (100 a second).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// A QoS 1 PUBLISH on "f" with packet id `id` and a small payload (with
/// MQTT 5, an empty property block after the id).
fn qos1_publish(id: u16) -> Vec<u8> {
    let v5 = mqtt5();
    let mut p = vec![0x32, 0x08 + u8::from(v5), 0x00, 0x01, b'f'];
    p.extend(id.to_be_bytes());
    if v5 {
        p.push(0);
    }
    p.extend(b"abc");
    p
}

#[test]
fn a_broker_that_floods_and_never_reads_does_not_freeze_the_daemon() {
    // 1,500,000 QoS 1 publishes that each want a PUBACK the broker never
    // reads: the daemon must pause reading that link, not spin on it, and
    // keep serving the bus, its timers and its signals.
    let mut repeat = Vec::new();
    for id in 1..=1000u16 {
        repeat.extend(qos1_publish(id));
    }
    let broker = MockBroker::start(
        Pki::get(),
        Behaviour::Flood {
            first: CONNACK_ACCEPTED.to_vec(),
            repeat,
            count: 1500,
        },
    );
    let (mut d, sock) = start(broker.port(), "gw-flooded");
    assert!(
        d.wait_log("connected (session present", SECS(10)),
        "{}",
        d.log()
    );
    // Once the PUBACKs back up, reading stops: `received` stops growing,
    // the daemon idles (well under half a core) and still answers at once.
    let mut c = BusClient::connect(&sock);
    let received = |c: &mut BusClient| -> i64 {
        let r = c.call("stats", &params(&[])).expect("stats answered");
        let map = r.object().as_map().expect("map");
        map.get(b"received")
            .and_then(|o| o.as_i64())
            .expect("received")
    };
    let mut last = -1;
    assert!(
        wait_until(SECS(30), || {
            thread::sleep(Duration::from_millis(500));
            let now = received(&mut c);
            let stable = now == last && now > 0;
            last = now;
            stable
        }),
        "reading never paused: {last} received"
    );
    let before = cpu_ticks(d.pid());
    thread::sleep(SECS(2));
    let ticks = cpu_ticks(d.pid()) - before;
    assert!(
        ticks < 100,
        "{ticks} ticks of CPU in 2 s while the broker is stuck"
    );
    let t0 = Instant::now();
    let mut c = BusClient::connect(&sock);
    let stats = c.call("stats", &params(&[]));
    assert!(matches!(stats, Some(Reply::Payload(_))), "{stats:?}");
    assert!(t0.elapsed() < SECS(2), "stats took {:?}", t0.elapsed());
    d.signal(libc::SIGTERM);
    let status = d.wait_exit(SECS(3)).expect("exits on SIGTERM");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn thousands_of_pipelined_subscribe_calls_that_settle_at_once_do_not_overflow_the_stack() {
    // A virtual subscribe with a response endpoint settles inside its own
    // request; continuing the pipeline from there used to recurse.
    let broker = Mosquitto::start();
    let (mut d, sock) = start(broker.port(), "gw-deep");
    // The endpoint must be served when subscribed to [bus-iso-4]; this one
    // never accepts (the daemon's probes wait in its backlog).
    let _ep = UnixListener::bind(d.dir().join("ep")).unwrap();
    let sub = params(&[
        ("topic_filter", V::Buf(b"deep/t")),
        ("response_endpoint", V::Buf(b"ep")),
        ("virtual", V::Bool(true)),
    ]);
    let unsub = params(&[
        ("topic_filter", V::Buf(b"deep/t")),
        ("response_endpoint", V::Buf(b"ep")),
    ]);
    let mut pair = request("subscribe", RequestType::Call, &sub);
    pair.extend(request("unsubscribe", RequestType::Call, &unsub));
    let pairs = 20_000;
    let mut c = BusClient::connect(&sock);
    let mut writer = c.stream().try_clone().unwrap();
    let sender = thread::spawn(move || {
        use std::io::Write;
        for _ in 0..pairs {
            if writer.write_all(&pair).is_err() {
                break;
            }
        }
    });
    for i in 0..2 * pairs {
        assert!(is_null(&c.read()), "answer {i}");
    }
    sender.join().unwrap();
    assert!(d.is_running(), "{}", d.log());
}

#[test]
fn a_burst_of_large_qos0_publishes_goes_out_without_waiting_for_the_next_packet() {
    // 40 notifies of 9 KB fill rustls's send buffer mid-PUBLISH; the rest
    // must follow as the socket drains, not at the next keepalive.
    let broker = Mosquitto::start();
    let sub = Subscriber::start(&broker, "big/#", 0);
    let (d, sock) = start(broker.port(), "gw-bigburst");
    assert!(d.wait_log("connected (session present", SECS(10)));
    let payload = vec![b'z'; 9_000];
    let mut burst = Vec::new();
    for i in 0..40 {
        burst.extend(request(
            "publish",
            RequestType::Notify,
            &publish_params(&format!("big/{i}"), &payload, 0),
        ));
    }
    let mut c = BusClient::connect(&sock);
    c.send_raw(&burst);
    assert!(
        sub.wait_lines(40, SECS(10)),
        "{} of 40 arrived",
        sub.lines().len()
    );
}

#[test]
fn a_response_endpoint_that_closes_after_each_notify_gets_every_message() {
    // GGL's servers read one request per connection and close.
    let broker = Mosquitto::start();
    let (d, sock) = start(broker.port(), "gw-ggl-endpoint");
    assert!(d.wait_log("connected (session present", SECS(10)));
    let listener = UnixListener::bind(d.dir().join("ggl_component")).unwrap();
    listener.set_nonblocking(true).unwrap();
    let got = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&got);
    let server = thread::spawn(move || {
        let deadline = Instant::now() + SECS(20);
        while Instant::now() < deadline && counter.load(Ordering::SeqCst) < 20 {
            let Ok((mut s, _)) = listener.accept() else {
                thread::sleep(Duration::from_millis(5));
                continue;
            };
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(SECS(2))).unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // One frame, then close, like GGL.
            loop {
                if let frame::FrameLen::Len(n) = frame::frame_len(&buf, 1 << 20) {
                    if buf.len() >= n {
                        let f = frame::parse(&buf[..n]).unwrap();
                        assert_eq!(f.request().unwrap().method, b"iotcored_response");
                        counter.fetch_add(1, Ordering::SeqCst);
                        break;
                    }
                }
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        }
    });
    let mut caller = BusClient::connect(&sock);
    let p = params(&[
        ("topic_filter", V::Buf(b"ggl/#")),
        ("response_endpoint", V::Buf(b"ggl_component")),
    ]);
    assert!(is_null(&caller.call("subscribe", &p)));
    // Twenty messages in quick succession: published through the daemon
    // itself, they come straight back from the broker.
    let mut burst = Vec::new();
    for i in 0..20 {
        let p = publish_params(&format!("ggl/{i}"), b"m", 0);
        burst.extend(request("publish", RequestType::Notify, &p));
    }
    caller.send_raw(&burst);
    server.join().unwrap();
    assert_eq!(got.load(Ordering::SeqCst), 20, "{}", d.log());
}

#[test]
fn a_notify_subscribe_is_not_answered_so_later_answers_stay_matched() {
    // [bus-req-4.1]
    let broker = Mosquitto::start();
    let (d, sock) = start(broker.port(), "gw-notify-sub");
    assert!(d.wait_log("connected (session present", SECS(10)));
    let mut c = BusClient::connect(&sock);
    let p = params(&[
        ("topic_filter", V::Buf(b"n/#")),
        ("response_endpoint", V::Buf(b"somewhere")),
    ]);
    c.send("subscribe", RequestType::Notify, &p);
    let stats = c.call("stats", &params(&[])).expect("an answer");
    let map = stats
        .object()
        .as_map()
        .expect("the stats map, not the subscribe's null");
    assert!(map.get(b"published").is_some());
}

#[test]
fn a_client_that_writes_without_pause_starves_neither_timers_nor_other_clients() {
    // One client streams bytes after its subscribe (they are read and
    // discarded) from another core as fast as it can; the loop must still
    // keep the MQTT link alive and answer another client promptly.
    let broker = Mosquitto::start();
    let mut args = iotcored_args(Pki::get(), broker.port(), "gw-firehose");
    args.extend([
        "--socket-dir".into(),
        ".".into(),
        "--keepalive".into(),
        "1".into(),
    ]);
    let d = Daemon::start(BIN, &args);
    let sock = d.dir().join("aws_iot_mqtt");
    assert!(
        d.wait_log("connected (session present", SECS(10)),
        "{}",
        d.log()
    );
    let mut hose = BusClient::connect(&sock);
    hose.send(
        "subscribe",
        RequestType::Subscribe,
        &subscribe_params(&["fh/#"], 0),
    );
    assert_eq!(hose.read(), Some(Reply::Accepted));
    let mut writer = hose.stream().try_clone().unwrap();
    let stop = Arc::new(AtomicUsize::new(0));
    let stop2 = Arc::clone(&stop);
    let firehose = thread::spawn(move || {
        use std::io::Write;
        let junk = vec![0x5A; 64 * 1024];
        while stop2.load(Ordering::SeqCst) == 0 {
            if writer.write_all(&junk).is_err() {
                break;
            }
        }
    });
    thread::sleep(Duration::from_millis(500));
    let pings = broker.count_log("Received PINGREQ from gw-firehose");
    let mut other = BusClient::connect(&sock);
    for i in 0..10 {
        let t0 = Instant::now();
        // A topic nobody here subscribes to: nothing comes back, so the
        // link needs its pings (keepalive 1 s) to stay up.
        assert!(is_null(
            &other.call("publish", &publish_params("other/x", b"y", 0))
        ));
        assert!(t0.elapsed() < SECS(1), "call {i} took {:?}", t0.elapsed());
        thread::sleep(Duration::from_millis(200));
    }
    // Keepalive 1 s: pings went on during the 2 s of flood.
    assert!(
        broker.count_log("Received PINGREQ from gw-firehose") > pings,
        "no PINGREQ while the client flooded"
    );
    stop.store(1, Ordering::SeqCst);
    firehose.join().unwrap();
    assert!(!d.log().contains("disconnected"), "{}", d.log());
}

/// A QoS 0 PUBLISH.
fn qos0_publish(topic: &str, payload: &[u8]) -> Vec<u8> {
    let v5 = mqtt5();
    let len = 2 + topic.len() + usize::from(v5) + payload.len();
    let mut p = vec![0x30, u8::try_from(len).unwrap()];
    p.extend(u16::try_from(topic.len()).unwrap().to_be_bytes());
    p.extend(topic.as_bytes());
    if v5 {
        p.push(0); // no properties
    }
    p.extend(payload);
    p
}

#[test]
fn a_burst_faster_than_a_response_endpoint_accepts_costs_messages_not_the_subscription() {
    // GGL's servers listen with a backlog of 10 and accept one connection
    // per wake-up: a burst of 30 notifies, one connection each, finds the
    // backlog full. Those messages are dropped and counted; the endpoint
    // is there, so its subscription must stay.
    let mut burst = CONNACK_ACCEPTED.to_vec();
    for i in 0..30 {
        burst.extend(qos0_publish("f", format!("m{i:02}").as_bytes()));
    }
    // First connection closed without CONNACK: the subscription below is
    // in place when the second one brings the burst.
    let broker = MockBroker::with_script(
        Pki::get(),
        vec![Behaviour::CloseAfterConnect, Behaviour::Reply(burst)],
    );
    let (d, sock) = start(broker.port(), "gw-epburst");
    let listener = UnixListener::bind(d.dir().join("ep")).unwrap();
    // SAFETY: a valid listening socket; listen(2) only changes its backlog.
    // (Cargo.toml denies `unsafe` by default; a test may shrink a backlog.)
    #[allow(unsafe_code)]
    let rc = unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 10) };
    assert_eq!(rc, 0);
    listener.set_nonblocking(true).unwrap();
    let mut c = BusClient::connect(&sock);
    let sub = params(&[
        ("topic_filter", V::Buf(b"f")),
        ("response_endpoint", V::Buf(b"ep")),
        ("virtual", V::Bool(true)),
    ]);
    assert!(is_null(&c.call("subscribe", &sub)));
    let got = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&got);
    let server = thread::spawn(move || {
        let deadline = Instant::now() + SECS(10);
        while Instant::now() < deadline {
            let Ok((mut s, _)) = listener.accept() else {
                thread::sleep(Duration::from_millis(2));
                continue;
            };
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(SECS(1))).unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                if let frame::FrameLen::Len(n) = frame::frame_len(&buf, 1 << 20) {
                    if buf.len() >= n {
                        counter.fetch_add(1, Ordering::SeqCst);
                        break;
                    }
                }
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        }
    });
    assert!(
        d.wait_log("connected (session present", SECS(10)),
        "{}",
        d.log()
    );
    server.join().unwrap();
    let stats = c.call("stats", &params(&[])).expect("stats");
    let map = stats.object().as_map().unwrap();
    let dropped = map.get(b"dropped").and_then(|o| o.as_i64()).unwrap();
    let delivered = got.load(Ordering::SeqCst);
    assert_eq!(
        delivered as i64 + dropped,
        30,
        "every message delivered or counted"
    );
    assert!(!d.log().contains("subscription removed"), "{}", d.log());
    // Still there: unsubscribing it succeeds.
    let unsub = params(&[
        ("topic_filter", V::Buf(b"f")),
        ("response_endpoint", V::Buf(b"ep")),
    ]);
    assert!(is_null(&c.call("unsubscribe", &unsub)));
}

#[test]
fn a_broker_flooding_qos0_messages_does_not_hold_the_loop() {
    // Without a bound on what one turn reads from a link, a bus call
    // waited seconds behind a flood of incoming messages.
    let mut repeat = Vec::new();
    for i in 0..1000 {
        repeat.extend(qos0_publish("flood", format!("{i:04}").as_bytes()));
    }
    let broker = MockBroker::start(
        Pki::get(),
        Behaviour::Flood {
            first: CONNACK_ACCEPTED.to_vec(),
            repeat,
            count: 400,
        },
    );
    let (d, sock) = start(broker.port(), "gw-qos0flood");
    assert!(
        d.wait_log("connected (session present", SECS(10)),
        "{}",
        d.log()
    );
    let mut c = BusClient::connect(&sock);
    for _ in 0..5 {
        let t0 = Instant::now();
        assert!(matches!(
            c.call("stats", &params(&[])),
            Some(Reply::Payload(_))
        ));
        assert!(
            t0.elapsed() < SECS(1),
            "a call took {:?} during the flood",
            t0.elapsed()
        );
        thread::sleep(Duration::from_millis(200));
    }
}
