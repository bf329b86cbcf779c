//! End to end: the disk spool (`spool.md` [spool-2] [spool-3]) through the
//! real daemon and a real mosquitto: QoS 1 messages answered before a
//! SIGKILL are sent after the restart; a spool directory has one daemon;
//! one that cannot be made is exit 1 naming it.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::bus::*;
use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_iotcored");
const SECS: fn(u64) -> Duration = Duration::from_secs;

/// The daemon on `port` with its disk spool in `spool`.
fn start(port: u16, id: &str, spool: &Path, extra: &[&str]) -> (Daemon, PathBuf) {
    let dir = spool.display().to_string();
    let mut args = vec!["--spool-dir", dir.as_str()];
    args.extend(extra);
    start_with_bus(BIN.as_ref(), port, id, &args)
}

/// The daemon's arguments for `port`, its bus sockets in `sockets`
/// (relative to its own directory) and its disk spool in `spool`, for a
/// daemon started by hand (one that must fail, or share a directory).
fn spool_args(port: u16, id: &str, sockets: &str, spool: &Path) -> Vec<String> {
    let mut args = iotcored_args(Pki::get(), port, id);
    args.extend([
        "--socket-dir".into(),
        sockets.into(),
        "--spool-dir".into(),
        spool.display().to_string(),
    ]);
    args
}

/// Waits for `d` to fail at start-up: exit 1, with `why` in its log.
fn exits_1_saying(mut d: Daemon, why: &str) {
    let status = d.wait_exit(SECS(5)).expect("exits");
    assert_eq!(status.code(), Some(1), "{}", d.log());
    assert!(d.log().contains(why), "{}", d.log());
}

#[test]
fn sigkill_at_random_moments_loses_no_answered_qos1_message() {
    // [spool-3] 50 times: a publisher sends QoS 1 messages as fast as they
    // are answered, the daemon is killed (SIGKILL) at a random moment and
    // started again on the same spool. Every message answered null must
    // reach the broker; duplicates are allowed (at least once).
    let broker = Mosquitto::start();
    let sub = Subscriber::start(&broker, "kill/#", 1);
    let spool = TestDir::new("spool");
    let answered = Arc::new(Mutex::new(BTreeSet::new()));
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut next = 0u64;
    for round in 0..50 {
        let (mut d, sock) = start(broker.port(), "gw-kill", spool.path(), &[]);
        let stop = Arc::new(AtomicBool::new(false));
        let publisher = {
            let (stop, answered) = (Arc::clone(&stop), Arc::clone(&answered));
            let first = next;
            thread::spawn(move || {
                let Some(mut c) = BusClient::try_connect(&sock) else {
                    return first;
                };
                c.timeout(SECS(5));
                let mut n = first;
                while !stop.load(Ordering::Relaxed) {
                    let payload = n.to_string();
                    let frame = request(
                        "publish",
                        iotcored::bus::frame::RequestType::Call,
                        &publish_params("kill/a", payload.as_bytes(), 1),
                    );
                    // The daemon may be gone (killed): then this round ends.
                    if std::io::Write::write_all(c.stream(), &frame).is_err() {
                        break;
                    }
                    n += 1;
                    if !is_null(&c.read()) {
                        break; // killed, or BUSY
                    }
                    answered.lock().unwrap().insert(n - 1);
                    // About 200 a second: what 50 rounds answer must leave
                    // at 100 a second within the wait below.
                    thread::sleep(Duration::from_millis(5));
                }
                n
            })
        };
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        thread::sleep(Duration::from_millis(20 + rng % 400));
        d.signal(libc::SIGKILL);
        assert!(d.wait_exit(SECS(5)).is_some(), "round {round}: not killed");
        stop.store(true, Ordering::Relaxed);
        next = publisher.join().expect("publisher");
    }
    // One last start delivers what is left.
    let (d, sock) = start(broker.port(), "gw-kill", spool.path(), &[]);
    let want = answered.lock().unwrap().clone();
    assert!(want.len() > 100, "only {} answered", want.len());
    let seen = || -> BTreeSet<u64> {
        sub.lines()
            .iter()
            .filter_map(|l| l.strip_prefix("kill/a ")?.parse().ok())
            .collect()
    };
    assert!(
        wait_until(SECS(60), || want.is_subset(&seen())),
        "lost: {:?}\nstats {:?}\n{}",
        want.difference(&seen()).take(20).collect::<Vec<_>>(),
        stats(&sock),
        d.log()
    );
    assert!(
        wait_until(SECS(10), || stats(&sock)["stored"] == 0),
        "{:?}",
        stats(&sock)
    );
}

#[test]
fn a_stored_message_is_sent_after_a_restart_and_counted_in_stats() {
    // [spool-3] Offline: the message waits; SIGKILL; back with a broker.
    let broker = Mosquitto::start();
    let sub = Subscriber::start(&broker, "later/#", 1);
    let spool = TestDir::new("spool");
    let (mut d, sock) = start(free_port(), "gw-later", spool.path(), &[]);
    let mut c = BusClient::connect(&sock);
    for i in 0..3 {
        let payload = format!("m{i}");
        assert!(is_null(&c.call(
            "publish",
            &publish_params("later/x", payload.as_bytes(), 1)
        )));
    }
    assert!(is_null(
        &c.call("publish", &publish_params("later/x", b"q0", 0))
    ));
    let st = stats(&sock);
    assert_eq!((st["stored"], st["spooled"]), (3, 4), "{st:?}");
    assert!(st["stored_bytes"] > 0);
    d.signal(libc::SIGKILL);
    assert!(d.wait_exit(SECS(5)).is_some());
    let (d, sock) = start(broker.port(), "gw-later", spool.path(), &[]);
    assert!(
        sub.wait_lines(3, SECS(10)),
        "{:?}\n{}",
        sub.lines(),
        d.log()
    );
    assert_eq!(sub.lines(), ["later/x m0", "later/x m1", "later/x m2"]);
    assert!(wait_until(SECS(5), || stats(&sock)["stored"] == 0));
    assert_eq!(stats(&sock)["corrupt"], 0);
}

#[test]
fn a_second_daemon_on_the_same_spool_directory_exits_1() {
    let spool = TestDir::new("spool");
    let (d, _sock) = start(free_port(), "gw-first", spool.path(), &[]);
    // Its bus socket exists before it opens (and locks) the spool: only
    // once it says so is the directory its own.
    assert!(d.wait_log("disk spool", SECS(10)), "{}", d.log());
    let args = spool_args(free_port(), "gw-second", ".", spool.path());
    exits_1_saying(Daemon::start(BIN, &args), "in use by another iotcored");
}

#[test]
fn a_spool_directory_that_cannot_be_made_exits_1_naming_it() {
    let spool = TestDir::new("spool");
    let file = spool.join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let dir = file.join("spool");
    let args = spool_args(free_port(), "gw-nodir", ".", &dir);
    exits_1_saying(Daemon::start(BIN, &args), &dir.display().to_string());
}

/// A publish of `payload` on `topic` at QoS 1 asking `confirm`.
fn confirmed(topic: &str, payload: &[u8], confirm: &str) -> Vec<u8> {
    params(&[
        ("topic", V::Buf(topic.as_bytes())),
        ("payload", V::Buf(payload)),
        ("qos", V::I64(1)),
        ("confirm", V::Buf(confirm.as_bytes())),
    ])
}

#[test]
fn confirm_stored_is_answered_once_the_message_is_synced() {
    // [bus-confirm-1] [spool-3] With syncs a minute apart, the call still
    // gets its answer at once: it asks for the sync.
    let spool = TestDir::new("spool");
    let (_d, sock) = start(
        free_port(),
        "gw-stored",
        spool.path(),
        &["--spool-sync", "60000"],
    );
    let mut c = BusClient::connect(&sock);
    c.timeout(SECS(5));
    let t0 = std::time::Instant::now();
    assert!(is_null(
        &c.call("publish", &confirmed("s/x", b"a", "stored"))
    ));
    assert!(t0.elapsed() < SECS(5));
    assert_eq!(stats(&sock)["stored"], 1);
    // Without a disk spool there is nothing to wait for.
    let (_d2, sock2) = start_with_bus(BIN.as_ref(), free_port(), "gw-nodisk", &[]);
    let mut c2 = BusClient::connect(&sock2);
    assert_eq!(
        c2.call("publish", &confirmed("s/x", b"a", "stored")),
        Some(Reply::Error(code::UNSUPPORTED))
    );
}

#[test]
fn confirm_acked_is_answered_after_the_puback_and_holds_the_calls_behind_it() {
    // [bus-confirm-1] [bus-req-4] The link is down: nothing is answered
    // until the broker has the message; then both answers, in order.
    let broker = Mosquitto::start();
    let sub = Subscriber::start(&broker, "ack/#", 1);
    let proxy = Proxy::start(broker.port());
    proxy.refuse(true);
    let (d, sock) = start_with_bus(
        BIN.as_ref(),
        proxy.port(),
        "gw-acked",
        &["--max-backoff", "1"],
    );
    let mut c = BusClient::connect(&sock);
    c.send(
        "publish",
        iotcored::bus::frame::RequestType::Call,
        &confirmed("ack/x", b"first", "acked"),
    );
    c.send(
        "publish",
        iotcored::bus::frame::RequestType::Call,
        &publish_params("ack/x", b"second", 0),
    );
    c.timeout(Duration::from_millis(1500));
    assert_eq!(c.read(), None, "answered before the broker had it");
    proxy.refuse(false);
    c.timeout(SECS(15));
    assert!(is_null(&c.read()), "{}", d.log());
    assert!(is_null(&c.read()));
    assert!(
        sub.wait_lines(2, SECS(5)),
        "{:?} {:?}\n{}",
        sub.lines(),
        stats(&sock),
        d.log()
    );
}

#[test]
fn more_than_the_memory_spool_holds_waits_on_disk_and_leaves_in_order() {
    // [spool-2] [spool-6] The memory spool holds 1 MiB: 130 QoS 1 messages
    // of 9,000 bytes are 1.2 MB. Offline, every one is answered null (none
    // BUSY); the ones memory cannot hold wait on disk, and all leave in
    // order once the broker is there.
    let broker = Mosquitto::start();
    let sub = Subscriber::start(&broker, "big/#", 1);
    let proxy = Proxy::start(broker.port());
    proxy.refuse(true);
    let spool = TestDir::new("spool");
    let (d, sock) = start(
        proxy.port(),
        "gw-big",
        spool.path(),
        &["--max-backoff", "1"],
    );
    let mut c = BusClient::connect(&sock);
    for i in 0..130 {
        let mut payload = format!("{i:04} ").into_bytes();
        payload.resize(9_000, b'.');
        let answer = c.call("publish", &publish_params("big/x", &payload, 1));
        assert!(is_null(&answer), "message {i}: {answer:?}");
    }
    let st = stats(&sock);
    assert_eq!(st["stored"], 130, "{st:?}");
    assert!(st["spooled"] < 130, "memory holds fewer: {st:?}");
    assert_eq!(st["busy"], 0);
    proxy.refuse(false);
    assert!(
        sub.wait_lines(130, SECS(30)),
        "{} of 130\n{}",
        sub.lines().len(),
        d.log()
    );
    let order: Vec<usize> = sub
        .lines()
        .iter()
        .filter_map(|l| l.strip_prefix("big/x ")?.get(..4)?.parse().ok())
        .collect();
    assert_eq!(order, (0..130).collect::<Vec<_>>());
    assert!(wait_until(SECS(5), || stats(&sock)["stored"] == 0));
}

#[test]
fn response_endpoint_subscriptions_survive_a_restart() {
    // [spool-7] Subscribed for an endpoint, then the daemon restarts: the
    // subscription is made at the broker again and the endpoint gets the
    // messages, with nobody subscribing anew.
    use std::io::Read as _;
    use std::os::unix::net::UnixListener;
    let broker = Mosquitto::start();
    let spool = TestDir::new("spool");
    let sockets = TestDir::new("sockets");
    let listener = UnixListener::bind(sockets.join("ep")).unwrap();
    listener.set_nonblocking(true).unwrap();
    let got = Arc::new(Mutex::new(Vec::<u8>::new()));
    let sink = Arc::clone(&got);
    let done = Arc::new(AtomicBool::new(false));
    let stop = Arc::clone(&done);
    let server = thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(Duration::from_millis(500)))
                        .unwrap();
                    let mut buf = Vec::new();
                    let _ = s.read_to_end(&mut buf);
                    sink.lock().unwrap().extend(buf);
                }
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    let daemon = || {
        let sockets = sockets.path().display().to_string();
        let args = spool_args(broker.port(), "gw-ep", &sockets, spool.path());
        let d = Daemon::start(BIN, &args);
        assert!(
            d.wait_log("connected (session present", SECS(10)),
            "{}",
            d.log()
        );
        d
    };
    let sock = sockets.join("aws_iot_mqtt");
    let mut d = daemon();
    let mut c = BusClient::connect(&sock);
    let p = params(&[
        ("topic_filter", V::Buf(b"ep/#")),
        ("qos", V::I64(1)),
        ("response_endpoint", V::Buf(b"ep")),
    ]);
    assert!(is_null(&c.call("subscribe", &p)), "{}", d.log());
    drop(c);
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(SECS(10)).is_some());
    let d = daemon();
    assert!(
        d.wait_log("1 response-endpoint subscription(s) restored", SECS(5)),
        "{}",
        d.log()
    );
    assert!(
        wait_until(SECS(10), || {
            publish(&broker, "ep/after-restart", b"still-here", 1, false);
            let g = got.lock().unwrap();
            String::from_utf8_lossy(&g).contains("still-here")
        }),
        "{}",
        d.log()
    );
    done.store(true, Ordering::Relaxed);
    server.join().unwrap();
}

#[test]
fn a_spool_larger_than_the_daemon_may_write_exits_1_naming_the_size() {
    // [spool-2] A file size limit below --spool-size stands in for a full
    // disk: the allocation at start-up fails, and says so.
    let spool = TestDir::new("spool");
    let mut args = vec!["--fsize=8388608".to_string(), "--".into(), BIN.into()];
    args.extend(spool_args(free_port(), "gw-fsize", ".", spool.path()));
    args.extend(["--spool-size".into(), "64M".into()]);
    exits_1_saying(
        Daemon::start("prlimit", &args),
        "cannot allocate 67108864 bytes",
    );
}

#[test]
fn a_spool_file_that_is_not_ours_is_moved_aside_not_deleted() {
    // [spool-5] A foreign or damaged header: renamed aside, logged, and a
    // new spool started; the old bytes are all still there.
    let spool = TestDir::new("spool");
    let junk: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(7) + 3).to_le_bytes()[0])
        .collect();
    std::fs::write(spool.join("spool"), &junk).unwrap();
    let (d, sock) = start(free_port(), "gw-aside", spool.path(), &[]);
    assert!(d.wait_log("moved aside", SECS(5)), "{}", d.log());
    let aside: Vec<_> = std::fs::read_dir(spool.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("spool.corrupt-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "{}", d.log());
    assert_eq!(std::fs::read(aside[0].path()).unwrap(), junk);
    let mut c = BusClient::connect(&sock);
    assert!(is_null(&c.call("publish", &publish_params("a/b", b"x", 1))));
    assert_eq!(stats(&sock)["stored"], 1);
}
