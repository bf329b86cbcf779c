//! What the bench observes: the daemon under test, a timed broker-side
//! subscriber, the TCP tap at the broker's ingress, /proc (memory, CPU),
//! and the daemon's own `stats`.

use super::*;

/// `bin` against 127.0.0.1:`port`, its bus socket in its own directory,
/// logging at the production level (info).
pub(crate) fn start_daemon(bin: &Path, port: u16, id: &str) -> (Daemon, PathBuf) {
    start_daemon_with(bin, port, id, &[])
}

/// As `start_daemon`, with `extra` arguments.
pub(crate) fn start_daemon_with(
    bin: &Path,
    port: u16,
    id: &str,
    extra: &[String],
) -> (Daemon, PathBuf) {
    let mut args = iotcored_args(Pki::get(), port, id);
    args.extend(["--socket-dir".into(), ".".into()]);
    args.extend(extra.iter().cloned());
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

pub(crate) fn wait_connected(d: &Daemon) {
    assert!(
        d.wait_log("connected (session present", SECS(10)),
        "the daemon did not connect; log:\n{}",
        d.log()
    );
}

pub(crate) fn set_write_timeout(c: &mut BusClient) {
    c.stream()
        .set_write_timeout(Some(SECS(10)))
        .expect("set a write timeout");
}

/// A mosquitto_sub printing `<unix time with ns> <payload length> <topic>`.
pub(crate) fn timed_subscriber(broker: &Mosquitto, filter: &str) -> Subscriber {
    Subscriber::builder(broker, filter)
        .arg("-F")
        .arg("%U %l %t")
        .start()
}

pub(crate) struct Arrival {
    /// Seconds since the load started.
    pub(crate) t: f64,
    pub(crate) len: usize,
    pub(crate) topic_len: usize,
}

/// The subscriber's complete lines, timed relative to `t0_unix`.
pub(crate) fn arrivals(sub: &Subscriber, t0_unix: f64) -> Vec<Arrival> {
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
pub(crate) struct Windows {
    pub(crate) per_second: Vec<(u64, u64)>,
    pub(crate) max_count: usize,
    pub(crate) max_bytes: u64,
    pub(crate) total_count: usize,
    pub(crate) total_bytes: u64,
}

impl Windows {
    /// `events` need not be sorted; `bins` seconds of per-second counts.
    pub(crate) fn of(events: &[(f64, u64)], bins: u64) -> Windows {
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
pub(crate) const TLS13_RECORD_OVERHEAD: usize = 17;
/// TLS content type of application data records.
pub(crate) const TLS_APPLICATION_DATA: u8 = 23;

/// (unix time a record was complete, its content type, plaintext bytes).
pub(crate) type Records = Arc<Mutex<Vec<(f64, u8, usize)>>>;

/// A TCP relay 127.0.0.1:`port` → the broker that timestamps every TLS
/// record the daemon sends: the daemon's output as the broker receives it,
/// before the broker and the subscriber add their own queueing.
///
/// One accept thread; per connection two pump threads. All poll a stop flag
/// every 10 ms, so drop joins them in bounded time.
pub(crate) struct Tap {
    pub(crate) port: u16,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) records: Records,
    pub(crate) accept: Option<JoinHandle<()>>,
}

impl Tap {
    pub(crate) fn start(target: u16) -> Tap {
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
    pub(crate) fn packets(&self, t0_unix: f64, packet: u64, secs: f64) -> Vec<(f64, u64)> {
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
pub(crate) fn tap_pumps(
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

pub(crate) fn tap_pump(
    mut from: TcpStream,
    mut to: TcpStream,
    stop: &AtomicBool,
    records: Option<Records>,
) {
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
pub(crate) const BURST_GAP: f64 = 0.1;

/// How arrivals bunch: the daemon's sliding window lets a window's worth
/// through as soon as the oldest sends expire, so sends come in bursts.
pub(crate) struct Bursts {
    pub(crate) count: usize,
    pub(crate) min_len: usize,
    pub(crate) max_len: usize,
    pub(crate) min_spread: f64,
    pub(crate) max_spread: f64,
    pub(crate) longest_gap: f64,
    pub(crate) longest_gap_at: f64,
}

impl Bursts {
    /// `events` sorted by time.
    pub(crate) fn of(events: &[(f64, u64)]) -> Bursts {
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
pub(crate) struct Mem {
    pub(crate) rss_kib: u64,
    pub(crate) hwm_kib: u64,
}

impl Mem {
    pub(crate) fn json(self) -> J {
        obj(vec![
            ("vm_rss_kib", ju(self.rss_kib)),
            ("vm_hwm_kib", ju(self.hwm_kib)),
        ])
    }
}

/// VmRSS and VmHWM from /proc/<pid>/status.
pub(crate) fn mem(pid: u32) -> Option<Mem> {
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
pub(crate) fn cpu_secs(pid: u32) -> Option<f64> {
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
pub(crate) fn sched_ns(pid: u32) -> Option<u64> {
    let mut total = 0u64;
    for entry in fs::read_dir(format!("/proc/{pid}/task")).ok()?.take(64) {
        let path = entry.ok()?.path().join("schedstat");
        let text = fs::read_to_string(path).ok()?;
        total += text.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// The system calls `SyscallCounter` counts, by tracepoint name.
pub(crate) const COUNTED_SYSCALLS: [&str; 12] = [
    "accept4",
    "getsockopt",
    "epoll_ctl",
    "epoll_wait",
    "read",
    "recvfrom",
    "write",
    "writev",
    "sendto",
    "sendmsg",
    "close",
    "clock_gettime",
];

/// `perf stat` attached to a process, counting its system calls (every
/// one, and each of `COUNTED_SYSCALLS`) and context switches until
/// `finish`. Tracepoints cost little next to strace's ptrace stops.
/// `None` where perf is missing or not allowed; stopped by its pid.
pub(crate) struct SyscallCounter {
    perf: std::process::Child,
    out: PathBuf,
}

impl SyscallCounter {
    pub(crate) fn start(pid: u32, out: PathBuf) -> Option<SyscallCounter> {
        let mut events = vec![
            "raw_syscalls:sys_enter".to_string(),
            "context-switches".into(),
        ];
        events.extend(
            COUNTED_SYSCALLS
                .iter()
                .map(|s| format!("syscalls:sys_enter_{s}")),
        );
        let perf = Command::new("perf")
            .args(["stat", "-x", ",", "-e", &events.join(","), "-o"])
            .arg(&out)
            .args(["-p", &pid.to_string()])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let mut c = SyscallCounter { perf, out };
        // Attached by then; an error (no perf_event access) ends it at once.
        thread::sleep(Duration::from_millis(500));
        match c.perf.try_wait() {
            Ok(None) => Some(c),
            _ => None,
        }
    }

    /// Stops perf (SIGINT makes it write its counts) and reads the counts
    /// by event: "syscalls" for all of them, "context-switches", and each
    /// of `COUNTED_SYSCALLS` by name.
    pub(crate) fn finish(mut self) -> Option<Vec<(String, u64)>> {
        if let Ok(pid) = libc::pid_t::try_from(self.perf.id()) {
            // SAFETY: kill(2) has no memory-safety preconditions; the pid
            // is our own unreaped child, so it cannot have been recycled.
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(pid, libc::SIGINT);
            }
        }
        let exited = wait_every(SECS(5), Duration::from_millis(20), || {
            matches!(self.perf.try_wait(), Ok(Some(_)))
        });
        if !exited {
            return None; // Drop kills it
        }
        let text = fs::read_to_string(&self.out).ok()?;
        let counts: Vec<(String, u64)> = text
            .lines()
            .filter_map(|line| {
                let mut f = line.split(',');
                let value = f.next()?.parse::<u64>().ok()?;
                let event = f.nth(1)?;
                let name = match event {
                    "raw_syscalls:sys_enter" => "syscalls",
                    e => e.strip_prefix("syscalls:sys_enter_").unwrap_or(e),
                };
                Some((name.to_string(), value))
            })
            .collect();
        counts
            .iter()
            .any(|(k, _)| k == "syscalls")
            .then_some(counts)
    }
}

impl Drop for SyscallCounter {
    fn drop(&mut self) {
        if let Ok(None) = self.perf.try_wait() {
            let _ = self.perf.kill();
            let _ = self.perf.wait();
        }
    }
}

/// Samples a process's VmRSS every second on a thread, until `finish`.
pub(crate) struct Sampler {
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) handle: Option<JoinHandle<Vec<u64>>>,
}

impl Sampler {
    pub(crate) fn start(pid: u32) -> Sampler {
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

    pub(crate) fn finish(mut self) -> Vec<u64> {
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
pub(crate) fn read_stats(c: &mut BusClient) -> HashMap<String, i64> {
    let reply = c.read().expect("stats answer");
    let map = reply.object().as_map().expect("stats map");
    map.iter()
        .filter_map(|(k, v)| Some((String::from_utf8_lossy(k).into_owned(), v.as_i64()?)))
        .collect()
}

pub(crate) fn stats(c: &mut BusClient) -> HashMap<String, i64> {
    c.send("stats", RequestType::Call, &params(&[]));
    read_stats(c)
}

pub(crate) fn stats_json(st: &HashMap<String, i64>) -> J {
    let mut keys: Vec<&String> = st.keys().collect();
    keys.sort();
    J::Obj(
        keys.into_iter()
            .map(|k| (k.clone(), J::Int(st[k])))
            .collect(),
    )
}

/// The largest payload up to `want` whose `publish` call fits one bus frame.
pub(crate) fn largest_payload(topic: &str, qos: i64, want: usize) -> usize {
    let overhead = request(
        "publish",
        RequestType::Call,
        &publish_params(topic, b"", qos),
    )
    .len();
    want.min(consts::BUS_MAX_FRAME.saturating_sub(overhead))
}

/// A PUBLISH packet's length on the wire [MQTT 3.3]: fixed header, topic,
/// packet id (QoS 1), with MQTT 5 an empty property block, and payload;
/// what the daemon's rate limiter counts. (With MQTT 5 a repeated topic
/// goes as a 3-byte alias instead: for these short topics and 10 KiB
/// payloads a fraction of a percent less.)
pub(crate) fn publish_packet_len(topic: usize, payload: usize, qos: i64) -> u64 {
    let props = usize::from(mqtt5());
    let rest = 2 + topic + if qos > 0 { 2 } else { 0 } + props + payload;
    let len_bytes = match rest {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    as_u64(1 + len_bytes + rest)
}

/// A process's I/O counters (`/proc/<pid>/io`): bytes passed to write
/// calls (`wchar`) and bytes sent to the storage layer (`write_bytes`).
pub(crate) fn io_written(pid: u32) -> Option<(u64, u64)> {
    let io = fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    let field = |name: &str| -> Option<u64> {
        io.lines()
            .find_map(|l| l.strip_prefix(name))?
            .trim()
            .parse()
            .ok()
    };
    Some((field("wchar:")?, field("write_bytes:")?))
}
