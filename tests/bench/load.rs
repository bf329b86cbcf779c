//! Load generators: pipelined publishes at a window, throughput runs, the
//! round-trip latency probe.

use super::*;

#[derive(Default)]
pub(crate) struct Offered {
    pub(crate) calls: u64,
    pub(crate) accepted: u64,
    pub(crate) busy: u64,
}

/// Pipelined `publish` calls, `window` outstanding, for `RATE_PHASE`; after
/// a BUSY answer, a short pause before offering more.
pub(crate) fn offer_load(
    sock: &Path,
    topic: &str,
    payload: &[u8],
    qos: i64,
    window: usize,
) -> Offered {
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
    pub(crate) fn answer(c: &mut BusClient, o: &mut Offered) {
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
pub(crate) struct Throughput {
    pub(crate) qos: i64,
    pub(crate) offered: usize,
    pub(crate) published: i64,
    pub(crate) evicted: i64,
    pub(crate) busy: i64,
    pub(crate) dropped: i64,
    pub(crate) accept_secs: f64,
    pub(crate) drain_secs: f64,
    pub(crate) drained: bool,
    pub(crate) stats_calls: usize,
    pub(crate) delivered: usize,
    pub(crate) deliver_secs: f64,
    pub(crate) max_window: usize,
    pub(crate) cpu_secs: Option<f64>,
    pub(crate) cpu_us_stat: Option<f64>,
    pub(crate) cpu_us_sched: Option<f64>,
    pub(crate) rss: Vec<u64>,
    pub(crate) hwm_kib: u64,
}

impl Throughput {
    pub(crate) fn rate(n: f64, secs: f64) -> f64 {
        if secs > 0.0 {
            n / secs
        } else {
            0.0
        }
    }

    pub(crate) fn print(&self) {
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

    pub(crate) fn json(&self) -> J {
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
pub(crate) fn throughput(
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
pub(crate) fn latency(sock: &Path) -> J {
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
    let pct = percentile_us;
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

/// What one run of [`calls_per_connection`] did.
#[derive(Default, Clone, Copy)]
pub(crate) struct Calls {
    /// Calls answered with exactly the expected frame.
    pub(crate) answered: u64,
    /// Calls that failed: connect, write, read, or a different answer.
    pub(crate) failed: u64,
    pub(crate) secs: f64,
}

/// What every Greengrass Lite client does: connect to the bus socket, send
/// one request, read the answer, close. `n` such calls shared by `clients`
/// threads, each one call at a time, for at most `max`; every answer must
/// be `answer`, byte for byte.
pub(crate) fn calls_per_connection(
    sock: &Path,
    frame: &[u8],
    answer: &[u8],
    n: usize,
    clients: usize,
    max: Duration,
) -> Calls {
    let clients = clients.max(1);
    let t0 = Instant::now();
    let deadline = t0 + max;
    let per_client = |k: usize| n / clients + usize::from(k < n % clients);
    let counts: Vec<(u64, u64)> = thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|k| {
                s.spawn(move || {
                    let (mut answered, mut failed) = (0u64, 0u64);
                    let mut got = vec![0u8; answer.len()];
                    for _ in 0..per_client(k) {
                        if Instant::now() >= deadline {
                            break;
                        }
                        if one_call(sock, frame, &mut got) && got == answer {
                            answered += 1;
                        } else {
                            failed += 1;
                        }
                    }
                    (answered, failed)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or((0, 1)))
            .collect()
    });
    Calls {
        answered: counts.iter().map(|c| c.0).sum(),
        failed: counts.iter().map(|c| c.1).sum(),
        secs: t0.elapsed().as_secs_f64(),
    }
}

/// Connect, write `frame`, read `got.len()` bytes (at most 5 s), close.
fn one_call(sock: &Path, frame: &[u8], got: &mut [u8]) -> bool {
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(sock) else {
        return false;
    };
    s.set_read_timeout(Some(SECS(5))).is_ok()
        && s.write_all(frame).is_ok()
        && s.read_exact(got).is_ok()
}

/// The `per_mille`th of `sorted` durations, in µs (0 when empty).
pub(crate) fn percentile_us(sorted: &[Duration], per_mille: usize) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = (sorted.len() * per_mille).div_ceil(1000).saturating_sub(1);
    sorted[idx.min(sorted.len() - 1)].as_secs_f64() * 1e6
}
