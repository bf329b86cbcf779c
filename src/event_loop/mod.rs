//! The event loop: the only owner of `mio::Poll`, the sockets and the clock.
//!
//! One thread drives every MQTT connection ("link", `links.rs`) and every
//! core bus client (`clients.rs`). The cores it wires together are pure:
//! the MQTT session, the router, the spool and the backoff take `now` and
//! return what to do. Every socket is non-blocking and every wait has a
//! deadline, so no peer — broker or local client — can stall the loop.
//!
//! Data paths: a bus `publish` is copied once into the spool, and the spool's
//! bytes go to link 0's TLS writer as the in-flight window allows. An
//! incoming PUBLISH is encoded once into a scratch frame and written to
//! every matching subscriber.

mod clients;
mod disk;
mod links;
mod resolver;

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;

use crate::bus::server::{self, Server};
use crate::config::Config;
use crate::consts;
use crate::mqtt::session::Limits;
use crate::router::Router;
use crate::service::{Counters, Mode, PUBLISHING};
use crate::spool::Spool;
use crate::sys::{self, Notifier, SignalFd};
use crate::time::Instant;
use crate::tls;

pub use links::{
    client_id, CLOSES_WITHOUT_CONNACK_LIMIT, CONNECT_TIMEOUT, HANDSHAKE_TIMEOUT, RESOLVE_TIMEOUT,
};

/// Whether `record` decodes as a disk spool message record: the decoder
/// `disk.rs` runs on every record it loads, for the fuzz harness
/// (`tests/fuzz`), which has no other way in.
#[doc(hidden)]
pub fn decode_spool_record(record: &[u8]) -> bool {
    disk::decode(record).is_some()
}

use clients::Clients;
use links::Link;
use resolver::{Lookup, Resolved};

/// How long shutdown waits for DISCONNECT and close_notify to be written.
pub const SHUTDOWN_GRACE: Duration = Duration::from_millis(800);

const WAKER: Token = Token(0);
const SIGNALS: Token = Token(1);
const LISTENER: Token = Token(2);
const LINK_BASE: usize = 16;

/// Why the loop ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// SIGTERM or SIGINT: shut down cleanly.
    Stopped,
    /// The broker refused our credentials [iotcored-3].
    AuthFailure(String),
    /// The broker's certificate failed verification.
    ServerUntrusted(String),
    /// The broker refused our client id (MQTT 5 CONNACK 0x85): a usage
    /// problem [mqtt5-3].
    Usage(String),
    /// The loop itself failed (poll error).
    Fatal(String),
}

/// The daemon: configuration, sockets, the cores, and the wiring.
pub struct EventLoop {
    config: Config,
    tls_config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    poll: Poll,
    signals: SignalFd,
    resolve_tx: mpsc::Sender<Lookup>,
    resolved_rx: mpsc::Receiver<Resolved>,
    /// The MQTT connections (`links.rs`).
    links: Vec<Link>,
    /// The bus slots and their buffers (`clients.rs`).
    clients: Clients,
    router: Router,
    spool: Spool,
    /// The disk spool, with `--spool-dir` (`disk.rs`).
    disk: Option<disk::DiskSpool>,
    /// Counters kept by the loop (the spool keeps its own).
    counters: Counters,
    /// What the publishing connection's last CONNACK allows [mqtt5-4].
    broker: Limits,
    /// systemd notifications (READY, STATUS, WATCHDOG, STOPPING).
    notifier: Notifier,
    /// When the next `WATCHDOG=1` is due.
    watchdog_at: Option<Instant>,
    epoch: std::time::Instant,
    /// SIGTERM came while messages were queued and the link was up: they
    /// are sent until this deadline [spool-1].
    draining: Option<Instant>,
    /// Closing the links; the loop ends at this deadline at the latest.
    stopping: Option<Instant>,
}

impl EventLoop {
    /// Sets up the poll, the bus socket, the signal fd and the resolver
    /// thread, and allocates every table.
    pub fn new(config: Config, tls_config: Arc<ClientConfig>) -> Result<Self, String> {
        let server_name = tls::server_name(&config.endpoint)?;
        // Read (and clear) the systemd variables before any thread exists.
        let notifier = Notifier::from_env();
        let mut bus =
            Server::bind(&config.socket_dir, &config.interface_name).map_err(|e| e.to_string())?;
        let io_err = |what: &str, e: io::Error| format!("{what}: {e}");
        // Block the signals before any thread exists, so all inherit the mask.
        let signals = SignalFd::termination().map_err(|e| io_err("signalfd", e))?;
        let poll = Poll::new().map_err(|e| io_err("poll", e))?;
        poll.registry()
            .register(
                &mut SourceFd(&signals.as_raw_fd()),
                SIGNALS,
                Interest::READABLE,
            )
            .map_err(|e| io_err("poll", e))?;
        bus.register(poll.registry(), LISTENER)
            .map_err(|e| io_err("poll", e))?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(|e| io_err("poll", e))?);
        let (resolve_tx, resolved_rx) =
            resolver::spawn(waker).map_err(|e| io_err("resolver thread", e))?;

        let seed = sys::random_seed();
        let links = (0..consts::MAX_CONNECTIONS)
            .map(|index| Link::new(index, &config, seed))
            .collect();
        let start = Instant::from_millis(0);
        let mut spool = Spool::new(consts::SPOOL_BYTES, consts::SPOOL_MESSAGES);
        spool.set_version(config.mqtt);
        let mut router = Router::new();
        let disk = match &config.spool_dir {
            Some(dir) => {
                let mut disk =
                    disk::DiskSpool::open(dir, config.spool_size, config.spool_sync_ms, start)?;
                // Stored messages are queued before anything new [spool-6].
                disk.load(&mut spool, start);
                let n = disk.restore_subscriptions(&mut router);
                if n > 0 {
                    log::info!("disk spool: {n} response-endpoint subscription(s) restored");
                }
                Some(disk)
            }
            None => None,
        };
        Ok(Self {
            server_name,
            tls_config,
            poll,
            signals,
            resolve_tx,
            resolved_rx,
            links,
            clients: Clients::new(bus),
            router,
            spool,
            disk,
            counters: Counters::default(),
            broker: Limits::default(),
            notifier,
            watchdog_at: None,
            epoch: std::time::Instant::now(),
            draining: None,
            stopping: None,
            config,
        })
    }

    fn now(&self) -> Instant {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        Instant::from_millis(ms)
    }

    /// Runs until a signal or a fatal error.
    pub fn run(&mut self) -> Exit {
        let mut events = Events::with_capacity(256);
        let now = self.now();
        // Ready once the bus is served, before the first MQTT connect:
        // local clients may publish (into the spool) while we connect.
        self.notifier.notify(&format!(
            "READY=1\nSTATUS=connecting to {}:{}",
            self.config.endpoint, self.config.port
        ));
        self.watchdog_at = self.notifier.watchdog_interval().map(|d| now + d);
        self.begin_attempt(PUBLISHING, now);
        loop {
            let now = self.now();
            if let (Some(at), Some(every)) = (self.watchdog_at, self.notifier.watchdog_interval()) {
                if now >= at {
                    // From the loop itself, so a stuck loop gets restarted.
                    self.notifier.notify("WATCHDOG=1");
                    self.watchdog_at = Some(now + every);
                }
            }
            if let Err(exit) = self.run_timers(now) {
                return exit;
            }
            if let Some(synced) = self.disk.as_mut().and_then(|d| d.sync_if_due(now)) {
                self.answer_stored(synced);
            }
            if let Some(deadline) = self.draining {
                let done = self.spool.is_empty() || !self.links[PUBLISHING].is_connected();
                if done || now >= deadline {
                    self.draining = None;
                    self.begin_stop(now);
                }
            }
            if let Some(deadline) = self.stopping {
                if now >= deadline || self.all_closed() {
                    self.close_all();
                    log::info!("stopped");
                    return Exit::Stopped;
                }
            }
            // Work due now: poll without sleeping. Otherwise sleep until
            // the deadline (rounded up, so it has passed on waking).
            let timeout = self.next_deadline(now).map(|d| {
                if d <= now {
                    Duration::ZERO
                } else {
                    Duration::from_millis(d.millis() - now.millis() + 1)
                }
            });
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Exit::Fatal(format!("poll failed: {e}"));
            }
            let now = self.now();
            for event in events.iter() {
                let result = match event.token() {
                    WAKER => self.take_resolved(now),
                    SIGNALS => {
                        self.take_signals(now);
                        Ok(())
                    }
                    LISTENER => {
                        self.accept_clients(now);
                        Ok(())
                    }
                    Token(t) if (LINK_BASE..LINK_BASE + self.links.len()).contains(&t) => {
                        self.drive(t - LINK_BASE, now)
                    }
                    Token(t) if t >= server::CLIENT_TOKEN_BASE => {
                        let i = t - server::CLIENT_TOKEN_BASE;
                        if i < self.clients.bus.capacity() {
                            // A writable-only edge (the peer read part of a
                            // backlog) brings no input: no read is tried.
                            if event.is_readable()
                                || event.is_read_closed()
                                || event.is_error()
                                || !event.is_writable()
                            {
                                self.clients.bus.set_readable(i, event.is_read_closed());
                            }
                            if event.is_writable() {
                                self.clients.bus.set_writable(i);
                            }
                            self.drive_client(i, now);
                        }
                        Ok(())
                    }
                    _ => Ok(()),
                };
                if let Err(exit) = result {
                    return exit;
                }
            }
            // Work that readiness events made possible elsewhere (answers
            // owed, SUBSCRIBEs to send, extra links to open or close).
            // A fresh reading: handling the events may have taken a while,
            // and the rate limiter records send times from it.
            let now = self.now();
            if let Err(exit) = self.pump(now) {
                return exit;
            }
        }
    }

    /// The earliest deadline of any link, session, bus slot or the shutdown.
    fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let mut next = None;
        let mut consider = |d: Option<Instant>| {
            if let Some(d) = d {
                next = Some(next.map_or(d, |n: Instant| n.min(d)));
            }
        };
        consider(self.stopping);
        consider(self.draining);
        consider(self.disk.as_ref().and_then(disk::DiskSpool::deadline));
        consider(self.watchdog_at);
        for link in &self.links {
            consider(link.deadline());
        }
        consider(self.clients.deadline(now));
        next
    }

    fn take_signals(&mut self, now: Instant) {
        while let Some(signo) = self.signals.read() {
            if self.stopping.is_some() || self.draining.is_some() {
                continue;
            }
            let name = if signo == libc::SIGINT {
                "SIGINT"
            } else {
                "SIGTERM"
            };
            self.notifier.notify("STOPPING=1\nSTATUS=stopping");
            let drain = Duration::from_secs(u64::from(self.config.drain));
            let queued = self.spool.len();
            if queued > 0 && !drain.is_zero() && self.links[PUBLISHING].is_connected() {
                // [spool-1] What is queued is sent first, for a while.
                log::info!(
                    "{name}: sending the {queued} queued message(s) for up to {} s, then stopping",
                    drain.as_secs()
                );
                self.draining = Some(now + drain);
            } else {
                log::info!("{name}: disconnecting and stopping");
                self.begin_stop(now);
            }
        }
    }

    /// Answers the `confirm: stored` calls whose record is below `synced`,
    /// all durable now [bus-confirm-1].
    fn answer_stored(&mut self, synced: u64) {
        self.clients.answer_waiting(
            &mut self.router,
            |m| matches!(m, Mode::AwaitStored(seq) if seq < synced),
            None,
        );
    }

    /// Closes every link (DISCONNECT, close_notify), and says what the
    /// spool still holds: it ends with the process [spool-1].
    fn begin_stop(&mut self, now: Instant) {
        let (qos0, qos1) = self.spool.waiting_by_qos();
        if let Some(disk) = self.disk.as_mut() {
            // QoS 1 stays in the file, sent after the next start.
            let synced = disk.sync(now);
            self.answer_stored(synced);
            if qos0 > 0 {
                log::warn!(
                    "stopping with messages not sent: discarding {qos0} QoS 0 message(s); {qos1} QoS 1 message(s) kept in the disk spool"
                );
            }
        } else if qos0 + qos1 > 0 {
            log::warn!(
                "stopping with messages not sent: discarding {qos0} QoS 0 and {qos1} QoS 1 message(s) (QoS 1 ones may have reached the broker unacknowledged)"
            );
        }
        self.stopping = Some(now + SHUTDOWN_GRACE);
        for i in 0..self.links.len() {
            self.close_link(i, now);
        }
    }

    /// Everything that follows from a change: answers owed to subscribers,
    /// broker requests to send, extra links to open or close, and writes.
    pub(super) fn pump(&mut self, now: Instant) -> Result<(), Exit> {
        self.settle_subscriptions();
        // Stored messages waiting on disk take the room that freed up, and
        // the response-endpoint subscriptions are kept if they changed.
        if let Some(disk) = self.disk.as_mut() {
            disk.load(&mut self.spool, now);
            disk.save_subscriptions(&self.router);
        }
        self.sync_links(now);
        for i in 0..self.links.len() {
            self.queue_broker_requests(i);
            self.write_link(i, now)?;
        }
        Ok(())
    }
}
