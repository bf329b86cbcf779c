//! End to end: iotcored as a spooler that loses nothing within its bounds:
//! publishes accepted while the link is down, cut, refused or blackholed
//! are delivered after it comes back, QoS 1 at least once and in order;
//! a full spool evicts QoS 0 first, then answers BUSY, and says so in
//! `stats`; a persistent session brings the broker's queued messages.

mod common;

use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use common::bus::*;
use common::*;
use iotcored::bus::frame::RequestType;

const BIN: &str = env!("CARGO_BIN_EXE_iotcored");
const SECS: fn(u64) -> Duration = Duration::from_secs;

fn start(port: u16, id: &str, extra: &[&str]) -> (Daemon, PathBuf) {
    start_with_bus(BIN.as_ref(), port, id, extra)
}

/// Publishes `count` QoS 1 messages `0..count` on `topic` at about `rate`
/// per second from a thread; returns when all were accepted.
fn publisher(
    sock: PathBuf,
    topic: &'static str,
    count: usize,
    rate: u64,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut c = BusClient::connect(&sock);
        let t0 = Instant::now();
        for i in 0..count {
            let due = t0 + Duration::from_millis(i as u64 * 1000 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
            let answer = c.call(
                "publish",
                &publish_params(topic, i.to_string().as_bytes(), 1),
            );
            assert!(is_null(&answer), "publish {i}: {answer:?}");
        }
    })
}

/// The sequence numbers a `-v` subscriber saw on `topic`, in arrival order.
fn sequence(sub: &Subscriber, topic: &str) -> Vec<usize> {
    sub.lines()
        .iter()
        .filter_map(|l| l.strip_prefix(topic)?.strip_prefix(' ')?.parse().ok())
        .collect()
}

/// Every number below `count` at least once, and in order apart from
/// retransmitted duplicates: after removing repeats of numbers already
/// seen, the sequence is exactly 0..count.
fn assert_complete_in_order(seen: &[usize], count: usize) {
    let mut next = 0;
    for &n in seen {
        if n == next {
            next += 1;
        } else {
            assert!(n < next, "{n} arrived before {next} (out of order or lost)");
        }
    }
    assert_eq!(next, count, "only 0..{next} of 0..{count} arrived");
}

#[test]
fn qos1_survives_cuts_refusals_and_a_blackhole_at_least_once_and_in_order() {
    let broker = Mosquitto::start();
    let sub = Subscriber::start(&broker, "seq/#", 1);
    let proxy = Proxy::start(broker.port());
    // Ten cuts in 20 s would grow the backoff to its 120 s ceiling (the
    // link never stays up the 60 s that resets it); --max-backoff 2 keeps
    // this test short without changing what it checks.
    let args = ["--keepalive", "2", "--max-backoff", "2"];
    let (d, sock) = start(proxy.port(), "gw-faults", &args);
    assert!(d.wait_log("connected (session present", SECS(10)));
    let count = 2000;
    let pubs = publisher(sock.clone(), "seq/a", count, 100);
    // Ten cuts, FIN and RST alternately, each once the link is back up.
    for k in 0..10 {
        thread::sleep(Duration::from_millis(700));
        proxy.cut(if k % 2 == 0 { Cut::Fin } else { Cut::Rst });
        assert!(
            d.wait_log_count("reconnected", k + 1, SECS(10)),
            "{}",
            d.log()
        );
    }
    // Connections refused for 5 s.
    proxy.refuse(true);
    proxy.cut(Cut::Rst);
    thread::sleep(SECS(5));
    proxy.refuse(false);
    assert!(d.wait_log_count("reconnected", 11, SECS(10)), "{}", d.log());
    // Silence for 3 x keepalive: the link is declared dead and replaced.
    proxy.blackhole(true);
    thread::sleep(SECS(6));
    proxy.blackhole(false);
    proxy.cut(Cut::Rst);
    pubs.join().expect("publisher");
    assert!(
        wait_until(SECS(40), || sequence(&sub, "seq/a").iter().max()
            == Some(&(count - 1))),
        "last message never arrived: {:?}",
        stats(&sock)
    );
    thread::sleep(Duration::from_millis(500));
    assert_complete_in_order(&sequence(&sub, "seq/a"), count);
    assert!(
        d.log().contains("no PINGRESP"),
        "the blackhole was detected"
    );
    let s = stats(&sock);
    assert_eq!(s["published"], count as i64);
    assert!(wait_until(SECS(5), || stats(&sock)["spooled"] == 0));
    assert_eq!(s["evicted"] + s["busy"], 0);
}

#[test]
fn qos1_survives_a_broker_restart_at_least_once_and_in_order() {
    // The broker is stopped (SIGTERM, saving its persistence) and started
    // again; the broker-side subscriber has a persistent session, so what
    // the broker accepted reaches it even if it reconnects late.
    let dir = TestDir::new("persist");
    let mut broker = Mosquitto::builder()
        .config_line("persistence true")
        .config_line(&format!("persistence_location {}/", dir.path().display()))
        .start();
    let sub = Subscriber::builder(&broker, "seq/#")
        .qos(1)
        .client_id("seq-observer")
        .arg("-c")
        .start();
    let (d, sock) = start(broker.port(), "gw-restart-seq", &[]);
    assert!(d.wait_log("connected (session present", SECS(10)));
    let count = 1000;
    let pubs = publisher(sock.clone(), "seq/b", count, 100);
    thread::sleep(SECS(3));
    broker.stop();
    thread::sleep(SECS(3));
    broker.restart();
    pubs.join().expect("publisher");
    assert!(
        wait_until(SECS(40), || sequence(&sub, "seq/b").iter().max()
            == Some(&(count - 1))),
        "last message never arrived: {:?}",
        stats(&sock)
    );
    thread::sleep(Duration::from_millis(500));
    assert_complete_in_order(&sequence(&sub, "seq/b"), count);
    assert!(stats(&sock)["reconnects"] >= 1);
}

#[test]
fn messages_published_before_the_broker_ever_came_up_are_all_delivered() {
    let port = free_port();
    let (d, sock) = start(port, "gw-late-broker", &[]);
    let mut c = BusClient::connect(&sock);
    let mut burst = Vec::new();
    for i in 0..1000 {
        let qos = (i % 2) as i64;
        burst.extend(request(
            "publish",
            RequestType::Call,
            &publish_params("late/t", i.to_string().as_bytes(), qos),
        ));
    }
    c.send_raw(&burst);
    for i in 0..1000 {
        assert!(is_null(&c.read()), "publish {i} refused while offline");
    }
    assert_eq!(stats(&sock)["spooled"], 1000);
    // Offline with a full queue, the loop sleeps until the next attempt.
    let before = wakeups(d.pid());
    std::thread::sleep(SECS(2));
    let woke = wakeups(d.pid()) - before;
    assert!(woke < 50, "woke {woke} times in 2 s while offline");
    let broker = Mosquitto::builder().port(port).start();
    let sub = Subscriber::start(&broker, "late/#", 1);
    assert!(
        d.wait_log("connected (session present", SECS(15)),
        "{}",
        d.log()
    );
    assert!(
        sub.wait_lines(1000, SECS(30)),
        "{} arrived",
        sub.lines().len()
    );
    // MQTT keeps order per QoS level: the broker forwards QoS 0 at once
    // and QoS 1 behind its in-flight window, so the two interleave.
    let seen = sequence(&sub, "late/t");
    let qos0: Vec<usize> = seen.iter().copied().filter(|n| n % 2 == 0).collect();
    let qos1: Vec<usize> = seen.iter().copied().filter(|n| n % 2 == 1).collect();
    assert_eq!(qos0, (0..1000).step_by(2).collect::<Vec<_>>());
    assert_eq!(qos1, (1..1000).step_by(2).collect::<Vec<_>>());
    // The subscriber can see the last messages before their PUBACKs reach
    // the daemon (under qemu, by a second): wait for the counters.
    let mut counts = (-1, -1, -1);
    assert!(
        wait_until(SECS(10), || {
            let s = stats(&sock);
            counts = (s["spooled"], s["sent"], s["acked"]);
            counts == (0, 1000, 500)
        }),
        "spooled, sent, acked: {counts:?}"
    );
}

#[test]
fn a_full_spool_evicts_qos0_first_then_answers_busy_and_counts_both() {
    // The default spool: 2048 messages, 1 MiB. With the broker down:
    // 2048 QoS 0 fill it; 2048 QoS 1 then evict every QoS 0; one more
    // QoS 1 finds nothing to evict: BUSY.
    let port = free_port();
    let (_d, sock) = start(port, "gw-full-spool", &[]);
    let mut c = BusClient::connect(&sock);
    let send_all = |c: &mut BusClient, qos: i64, from: usize, n: usize| {
        let mut burst = Vec::new();
        for i in from..from + n {
            let p = publish_params("full/t", format!("{i}").as_bytes(), qos);
            burst.extend(request("publish", RequestType::Call, &p));
        }
        c.send_raw(&burst);
        (0..n)
            .map(|_| c.read().expect("an answer"))
            .collect::<Vec<_>>()
    };
    let answers = send_all(&mut c, 0, 0, 2048);
    assert!(answers.iter().all(|a| is_null(&Some(a.clone()))));
    let answers = send_all(&mut c, 1, 2048, 2048);
    assert!(
        answers.iter().all(|a| is_null(&Some(a.clone()))),
        "QoS 1 evicts QoS 0"
    );
    let s = stats(&sock);
    assert_eq!((s["spooled"], s["evicted"], s["busy"]), (2048, 2048, 0));
    let answers = send_all(&mut c, 1, 4096, 1);
    assert_eq!(answers, [Reply::Error(code::BUSY)]);
    let answers = send_all(&mut c, 0, 4097, 1);
    assert_eq!(
        answers,
        [Reply::Error(code::BUSY)],
        "QoS 0 cannot evict QoS 1"
    );
    let s = stats(&sock);
    assert_eq!(
        (s["published"], s["spooled"], s["evicted"], s["busy"]),
        (4096, 2048, 2048, 2)
    );
    // Once the broker comes up, exactly the 2048 QoS 1 messages arrive.
    let broker = Mosquitto::builder().port(port).start();
    let sub = Subscriber::start(&broker, "full/#", 1);
    assert!(
        sub.wait_lines(2048, SECS(40)),
        "{} arrived",
        sub.lines().len()
    );
    assert_eq!(sequence(&sub, "full/t"), (2048..4096).collect::<Vec<_>>());
}

#[test]
fn a_persistent_session_brings_the_messages_queued_while_we_were_away() {
    let broker = Mosquitto::start();
    let proxy = Proxy::start(broker.port());
    let (d, sock) = start(proxy.port(), "gw-persist", &["--persistent-session"]);
    assert!(
        d.wait_log("connected (session present: false)", SECS(10)),
        "{}",
        d.log()
    );
    let mut s = BusClient::connect(&sock);
    s.send(
        "subscribe",
        RequestType::Subscribe,
        &subscribe_params(&["away/#"], 1),
    );
    assert_eq!(s.read(), Some(Reply::Accepted));
    proxy.refuse(true);
    proxy.cut(Cut::Rst);
    assert!(d.wait_log("disconnected:", SECS(5)));
    for i in 0..5 {
        publish(&broker, "away/x", format!("q{i}").as_bytes(), 1, false);
    }
    proxy.refuse(false);
    assert!(
        d.wait_log("reconnected (session present: true)", SECS(15)),
        "{}",
        d.log()
    );
    for i in 0..5 {
        let (topic, payload) = s.read().expect("a queued message").message();
        assert_eq!(
            (topic.as_str(), payload),
            ("away/x", format!("q{i}").into_bytes())
        );
    }
    // The kept session was not subscribed again.
    assert_eq!(broker.count_log("Received SUBSCRIBE from gw-persist"), 1);
}

/// Publishes `qos1` QoS 1 messages `0..qos1` on `topic`, then `qos0` QoS 0
/// ones, pipelined on one connection; returns once every one was answered
/// null (accepted).
fn publish_pipelined(sock: &std::path::Path, topic: &str, qos1: usize, qos0: usize) {
    let mut c = BusClient::connect(sock);
    let messages = (0..qos1)
        .map(|i| (i, 1))
        .chain((qos1..qos1 + qos0).map(|i| (i, 0)));
    for (i, qos) in messages {
        let params = publish_params(topic, i.to_string().as_bytes(), qos);
        c.send("publish", RequestType::Call, &params);
    }
    for i in 0..qos1 + qos0 {
        let answer = c.read();
        assert!(is_null(&answer), "publish {i}: {answer:?}");
    }
}

/// The numbers in a "discarding X QoS 0 and Y QoS 1" log line.
fn discarded(log: &str) -> Option<(usize, usize)> {
    let rest = log.split("discarding ").nth(1)?;
    let words: Vec<&str> = rest.split_whitespace().collect();
    Some((words.first()?.parse().ok()?, words.get(4)?.parse().ok()?))
}

#[test]
fn on_sigterm_what_is_queued_is_sent_before_the_daemon_stops() {
    // [spool-1] 300 QoS 1 messages at 100/s take 3 s; --drain 20 lets
    // them all go, then the daemon exits 0 and discards nothing.
    let broker = Mosquitto::start();
    let sub = Subscriber::start(&broker, "drain/#", 1);
    let (mut d, sock) =
        connected_with_bus(BIN.as_ref(), broker.port(), "gw-drain", &["--drain", "20"]);
    publish_pipelined(&sock, "drain/a", 300, 0);
    d.signal(libc::SIGTERM);
    let status = d.wait_exit(SECS(30)).expect("exits after the drain");
    assert!(status.success(), "{status:?}\n{}", d.log());
    assert!(d.log().contains("sending the"), "{}", d.log());
    assert!(!d.log().contains("discarding"), "{}", d.log());
    assert!(
        wait_until(SECS(5), || sequence(&sub, "drain/a").len() >= 300),
        "{} of 300 arrived",
        sequence(&sub, "drain/a").len()
    );
    assert_complete_in_order(&sequence(&sub, "drain/a"), 300);
}

#[test]
fn what_the_drain_cannot_send_is_discarded_and_counted_in_the_log() {
    // [spool-1] One second sends about 100 of 400; the rest, QoS 0 last,
    // are discarded, and the WARN line says how many of each.
    let broker = Mosquitto::start();
    let sub = Subscriber::start(&broker, "short/#", 1);
    let (mut d, sock) =
        connected_with_bus(BIN.as_ref(), broker.port(), "gw-short", &["--drain", "1"]);
    publish_pipelined(&sock, "short/a", 400, 10);
    let t0 = Instant::now();
    d.signal(libc::SIGTERM);
    let status = d.wait_exit(SECS(10)).expect("exits after the drain");
    assert!(status.success(), "{status:?}\n{}", d.log());
    assert!(
        t0.elapsed() >= SECS(1),
        "it drained first: {:?}",
        t0.elapsed()
    );
    assert!(d.log().contains("WARN"), "{}", d.log());
    let (qos0, qos1) = discarded(&d.log()).unwrap_or_else(|| panic!("{}", d.log()));
    assert_eq!(qos0, 10, "{}", d.log());
    assert!((1..400).contains(&qos1), "{}", d.log());
    // Every QoS 1 message arrived or was counted as discarded (one in
    // flight at the stop may be both).
    thread::sleep(Duration::from_millis(500));
    let seen = sequence(&sub, "short/a");
    let arrived = seen.iter().collect::<std::collections::HashSet<_>>().len();
    assert!(arrived + qos1 >= 400, "{arrived} arrived, {qos1} discarded");
    assert!(arrived > 0);
}

#[test]
fn offline_sigterm_does_not_wait_and_says_what_it_discards() {
    // [spool-1] Nothing can be sent without the link: no drain, and the
    // exact count of what is lost.
    let port = free_port(); // nothing listens there
    let (mut d, sock) = start(port, "gw-offline-stop", &["--drain", "30"]);
    publish_pipelined(&sock, "off/a", 2, 3);
    let t0 = Instant::now();
    d.signal(libc::SIGTERM);
    let status = d.wait_exit(SECS(10)).expect("exits at once");
    assert!(status.success(), "{status:?}\n{}", d.log());
    assert!(t0.elapsed() < SECS(10));
    assert_eq!(discarded(&d.log()), Some((3, 2)), "{}", d.log());
}

#[test]
fn a_message_published_offline_reaches_a_local_subscriber_after_the_reconnect() {
    // [spool-9] Without a session the broker forgets our subscription with
    // the connection; the messages queued meanwhile must not reach it
    // before the SUBSCRIBE that brings the subscription back.
    let broker = Mosquitto::start();
    let proxy = Proxy::start(broker.port());
    let (d, sock) = start(proxy.port(), "gw-restore", &["--max-backoff", "2"]);
    assert!(
        d.wait_log("connected (session present", SECS(10)),
        "{}",
        d.log()
    );
    let mut sub = BusClient::connect(&sock);
    sub.send(
        "subscribe",
        RequestType::Subscribe,
        &subscribe_params(&["back/#"], 1),
    );
    assert_eq!(sub.read(), Some(Reply::Accepted));
    proxy.refuse(true);
    proxy.cut(Cut::Rst);
    assert!(
        d.wait_log("connection attempt failed", SECS(10)),
        "{}",
        d.log()
    );
    let mut c = BusClient::connect(&sock);
    for i in 0..5 {
        let payload = format!("m{i}");
        let answer = c.call("publish", &publish_params("back/x", payload.as_bytes(), 1));
        assert!(is_null(&answer), "{answer:?}");
    }
    proxy.refuse(false);
    assert!(d.wait_log("reconnected", SECS(15)), "{}", d.log());
    sub.timeout(SECS(10));
    let got: Vec<String> = (0..5)
        .map_while(|_| sub.read())
        .map(|r| String::from_utf8(r.message().1).unwrap())
        .collect();
    assert_eq!(got, ["m0", "m1", "m2", "m3", "m4"], "{}", d.log());
}
