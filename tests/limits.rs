//! End to end: AWS IoT Core's per-connection limits. Publishes are paced by
//! the rate limit and never refused for it [iotcored-bus-publish-4*]; extra
//! connections `<id>_N` carry subscriptions past the per-connection maximum
//! [iotcored-4] [iotcored-5] [iotcored-param-id-1].

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use common::bus::*;
use common::*;
use iotcored::bus::frame::RequestType;

const BIN: &str = env!("CARGO_BIN_EXE_iotcored");
const SECS: fn(u64) -> Duration = Duration::from_secs;

/// The tests here run one at a time: the rate test times arrivals at a
/// broker-side subscriber, and daemons, brokers and builds of the other
/// tests running beside it would add scheduling jitter to those times.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The daemon built with 3 connections of 4 subscriptions each (a separate
/// target directory, built once per test run).
fn small_build() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("variant-3x4");
        let status = Command::new(env!("CARGO"))
            .args(["build", "--bin", "iotcored", "--manifest-path"])
            .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
            .env("CARGO_TARGET_DIR", &target)
            .env("IOTCORED_MAX_CONNECTIONS", "3")
            .env("IOTCORED_SUBSCRIPTIONS_PER_CONNECTION", "4")
            .env("IOTCORED_MAX_SUBSCRIPTIONS", "16")
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building the 3x4 variant failed");
        target.join("debug/iotcored")
    })
}

fn start(bin: &std::path::Path, port: u16, id: &str) -> (Daemon, PathBuf) {
    connected_with_bus(bin, port, id, &[])
}

#[test]
fn a_burst_of_500_publishes_arrives_complete_in_order_and_paced_by_the_rate_limit() {
    let _serial = serial();
    // [iotcored-bus-publish-4.1] [iotcored-bus-publish-4.2]
    let broker = Mosquitto::start();
    // QoS 0 to the observer: mosquitto forwards at once, where QoS 1 would
    // pace delivery by the observer's own acknowledgements.
    let sub = Subscriber::builder(&broker, "burst/#")
        .qos(0)
        .arg("-F")
        .arg("%U %p")
        .start();
    let (_d, sock) = start(BIN.as_ref(), broker.port(), "gw-burst");
    let mut c = BusClient::connect(&sock);
    let mut burst = Vec::new();
    for i in 0..500 {
        let p = publish_params("burst/t", format!("{i}").as_bytes(), 1);
        burst.extend(request("publish", RequestType::Call, &p));
    }
    let t0 = std::time::Instant::now();
    c.send_raw(&burst);
    for i in 0..500 {
        assert!(is_null(&c.read()), "publish {i} not accepted at once");
    }
    // Accepted far faster than they may be sent: nothing was refused.
    assert!(t0.elapsed() < SECS(3), "{:?}", t0.elapsed());
    assert!(sub.wait_lines(500, SECS(15)), "{} lines", sub.lines().len());
    let lines = sub.lines();
    let mut times = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let (t, payload) = line.split_once(' ').expect("time and payload");
        assert_eq!(payload, i.to_string(), "in order");
        times.push(t.parse::<f64>().expect("a timestamp"));
    }
    let span = times[499] - times[0];
    assert!(
        span >= 4.0,
        "500 messages at 100/s take 4 s at least, took {span:.2}"
    );
    let mut worst = 0;
    let mut lo = 0;
    for hi in 0..times.len() {
        while times[hi] - times[lo] >= 1.0 {
            lo += 1;
        }
        worst = worst.max(hi - lo + 1);
    }
    assert!(worst <= 100, "{worst} messages in one second");
}

/// `iotcorectl sub -t FILTER` as a process of its own (one process may hold
/// half of the broker filters [bus-iso-4]), its output collected; killed by
/// its pid on drop.
struct CtlSub {
    child: std::process::Child,
    out: std::sync::Arc<std::sync::Mutex<String>>,
}

impl CtlSub {
    fn start(sock: &std::path::Path, filter: &str) -> CtlSub {
        use std::io::Read as _;
        let dir = sock.parent().expect("socket dir");
        let mut child = Command::new(env!("CARGO_BIN_EXE_iotcorectl"))
            .arg("--socket-dir")
            .arg(dir)
            .args(["sub", "-t", filter, "-W", "60"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn iotcorectl sub");
        let out = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        for mut pipe in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let sink = std::sync::Arc::clone(&out);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    sink.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push_str(&text);
                }
            });
        }
        CtlSub { child, out }
    }

    fn output(&self) -> String {
        self.out.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn wait_output(&self, text: &str) -> bool {
        wait_until(SECS(10), || self.output().contains(text))
    }
}

impl Drop for CtlSub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn subscriptions_past_one_connections_maximum_open_extra_connections() {
    let _serial = serial();
    // 3 connections x 4 subscriptions: 10 filters give gw, gw_1, gw_2 with
    // 4 + 4 + 2; 12 fit; the 13th is refused; emptying gw_2 closes it.
    // This process subscribes f/0..f/5 (one process holds at most 6 of the
    // 12 [bus-iso-4]); iotcorectl processes subscribe the others.
    let bin = small_build();
    let broker = Mosquitto::start();
    let (d, sock) = start(bin, broker.port(), "gw");
    // mosquitto logs "<client> <qos> <filter>" for every filter granted.
    let subscribes = |client: &str| broker.count_log(&format!(" {client} 0 f/"));
    let mut streams = Vec::new();
    for i in 0..6 {
        let mut s = BusClient::connect(&sock);
        s.send(
            "subscribe",
            RequestType::Subscribe,
            &subscribe_params(&[&format!("f/{i}")], 0),
        );
        assert_eq!(s.read(), Some(Reply::Accepted), "filter {i}: {}", d.log());
        streams.push(s);
    }
    let mut others = Vec::new();
    for i in 6..10 {
        others.push(CtlSub::start(&sock, &format!("f/{i}")));
        let total = i + 1;
        assert!(
            wait_until(SECS(10), || subscribes("gw")
                + subscribes("gw_1")
                + subscribes("gw_2")
                == total),
            "filter {i}: {}",
            d.log()
        );
    }
    assert!(broker.wait_log("as gw_1 ", SECS(10)), "{}", broker.log());
    assert!(broker.wait_log("as gw_2 ", SECS(10)), "{}", broker.log());
    assert!(!broker.log().contains("as gw_3 "));
    assert!(
        wait_until(SECS(5), || subscribes("gw") == 4
            && subscribes("gw_1") == 4
            && subscribes("gw_2") == 2),
        "gw {} gw_1 {} gw_2 {}",
        subscribes("gw"),
        subscribes("gw_1"),
        subscribes("gw_2")
    );
    // Messages on every filter reach their subscriber, whichever
    // connection carries the filter.
    for i in 0..10 {
        publish(
            &broker,
            &format!("f/{i}"),
            format!("m{i}").as_bytes(),
            0,
            false,
        );
    }
    for (i, s) in streams.iter_mut().enumerate() {
        assert_eq!(
            s.read().unwrap().message(),
            (format!("f/{i}"), format!("m{i}").into_bytes())
        );
    }
    for (k, o) in others.iter().enumerate() {
        assert!(o.wait_output(&format!("m{}\n", k + 6)), "{}", o.output());
    }
    // Two more fit on gw_2; the 13th distinct filter does not.
    for i in 10..12 {
        others.push(CtlSub::start(&sock, &format!("f/{i}")));
    }
    assert!(
        wait_until(SECS(10), || subscribes("gw_2") == 4),
        "{}",
        d.log()
    );
    let refused = CtlSub::start(&sock, "f/12");
    assert!(refused.wait_output("NOMEM"), "{}", refused.output());
    assert!(
        d.log()
            .contains("every connection's subscription table is full"),
        "{}",
        d.log()
    );
    // Nothing already subscribed was disturbed.
    publish(&broker, "f/0", b"still", 0, false);
    assert_eq!(streams[0].read().unwrap().message().1, b"still");
    // gw_2 holds f/8..f/11: when their subscribers leave, it closes.
    others.truncate(2);
    assert!(
        d.wait_log(
            "connection 2 (gw_2): no subscriptions left; closing",
            SECS(5)
        ),
        "{}",
        d.log()
    );
    assert!(broker.wait_log("Received DISCONNECT from gw_2", SECS(5)));
    // The 13th filter fits again now, on gw_2 reopened.
    let _again = CtlSub::start(&sock, "f/12");
    assert!(broker.wait_log_count("as gw_2 ", 2, SECS(10)));
}

#[test]
fn one_subscribe_request_is_kept_on_one_connection_when_it_fits() {
    let _serial = serial();
    // 3 + 3 filters in two requests: the second does not fit beside the
    // first on gw (4 max), so it goes whole to gw_1 instead of 1 + 2.
    let bin = small_build();
    let broker = Mosquitto::start();
    let (_d, sock) = start(bin, broker.port(), "gw-place");
    let mut a = BusClient::connect(&sock);
    a.send(
        "subscribe",
        RequestType::Subscribe,
        &subscribe_params(&["a/1", "a/2", "a/3"], 0),
    );
    assert_eq!(a.read(), Some(Reply::Accepted));
    let mut b = BusClient::connect(&sock);
    b.send(
        "subscribe",
        RequestType::Subscribe,
        &subscribe_params(&["b/1", "b/2", "b/3"], 0),
    );
    assert_eq!(b.read(), Some(Reply::Accepted));
    assert!(broker.wait_log("Received SUBSCRIBE from gw-place_1", SECS(10)));
    let log = broker.log();
    for f in ["b/1", "b/2", "b/3"] {
        assert!(
            log.contains(&format!("gw-place_1 0 {f}")),
            "{f} on gw-place_1:\n{log}"
        );
    }
    for f in ["a/1", "a/2", "a/3"] {
        assert!(
            log.contains(&format!("gw-place 0 {f}")),
            "{f} on gw-place:\n{log}"
        );
    }
}

#[test]
fn an_auth_failure_on_an_extra_connection_ends_the_daemon() {
    let _serial = serial();
    // [iotcored-3] on connection 1: the mock broker accepts gw-deny and
    // answers gw-deny_1 with CONNACK 5 (a real broker cannot refuse one
    // client id of a certificate it accepts for another).
    const CONNACK_NOT_AUTHORIZED: [u8; 4] = [0x20, 0x02, 0x00, 0x05];
    let broker = MockBroker::with_script(
        Pki::get(),
        vec![
            Behaviour::Reply(CONNACK_ACCEPTED.to_vec()),
            Behaviour::Reply(CONNACK_NOT_AUTHORIZED.to_vec()),
        ],
    );
    let (mut d, sock) = start(small_build(), broker.port(), "gw-deny");
    // Four filters fill connection 0 (the mock never answers the
    // SUBSCRIBE, so no answer is read); the fifth needs connection 1.
    let mut s = BusClient::connect(&sock);
    s.send(
        "subscribe",
        RequestType::Subscribe,
        &subscribe_params(&["d/1", "d/2", "d/3", "d/4"], 0),
    );
    let mut t = BusClient::connect(&sock);
    t.send(
        "subscribe",
        RequestType::Subscribe,
        &subscribe_params(&["d/5"], 0),
    );
    let status = d.wait_exit(SECS(15)).expect("the daemon exits");
    assert_eq!(status.code(), Some(3), "{}", d.log());
    assert!(
        d.log()
            .contains("connection 1 (gw-deny_1): broker refused the connection"),
        "{}",
        d.log()
    );
    let ids: Vec<_> = broker
        .first_packets()
        .iter()
        .filter_map(|p| connect_client_id(p))
        .collect();
    assert_eq!(ids, ["gw-deny", "gw-deny_1"]);
}
