//! The event loop: the only owner of `mio::Poll`, the sockets and the clock.
//!
//! One thread drives every MQTT connection ("link") through its phases:
//! waiting out a backoff, resolving the endpoint (on a resolver thread that
//! wakes the loop, so a slow DNS server never blocks it), TCP connecting,
//! the TLS handshake, and MQTT. Every phase has a deadline, and every
//! socket is non-blocking, so no peer can stall the loop.
//!
//! [iotcored-1] connect at start-up; [iotcored-2] reconnect for ever with
//! backoff; [iotcored-3] an authentication failure ends the daemon.

use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use mio::net::TcpStream;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;

use crate::config::Config;
use crate::consts;
use crate::limits::Backoff;
use crate::mqtt::packet;
use crate::mqtt::session::{self, Event, Session};
use crate::sys::{self, SignalFd};
use crate::time::Instant;
use crate::tls::{self, StreamError, TlsFailure, TlsStream};

/// How long a DNS lookup may take.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a TCP connect to one address may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for DISCONNECT and close_notify to be written.
pub const SHUTDOWN_GRACE: Duration = Duration::from_millis(800);
/// Consecutive connections closed by the broker after a good TLS handshake
/// and our CONNECT, without a CONNACK, that count as an authorization
/// failure: AWS IoT Core answers a CONNECT its policy forbids that way.
pub const CLOSES_WITHOUT_CONNACK_LIMIT: u32 = 3;
/// Addresses kept from one DNS answer.
const MAX_ADDRS: usize = 8;

const WAKER: Token = Token(0);
const SIGNALS: Token = Token(1);
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
    /// The loop itself failed (poll error).
    Fatal(String),
}

type Addrs = heapless::Vec<SocketAddr, MAX_ADDRS>;

/// A DNS answer from the resolver thread.
struct Resolved {
    link: usize,
    generation: u64,
    result: Result<Addrs, String>,
}

/// Where a link is in its life.
// The links table is allocated once at start-up, so a large variant costs
// nothing per attempt; boxing the addresses would allocate on every one.
#[allow(clippy::large_enum_variant)]
enum Phase {
    /// Not wanted (an extra connection with nothing to do).
    Unused,
    /// Waiting out the backoff before the next attempt.
    Waiting { until: Instant },
    /// A DNS lookup is on the resolver thread.
    Resolving { until: Instant, generation: u64 },
    /// TCP connect in progress to `addrs[next - 1]`.
    Connecting {
        sock: TcpStream,
        until: Instant,
        addrs: Addrs,
        next: usize,
    },
    /// TLS handshake in progress.
    Handshaking { tls: Box<TlsStream>, until: Instant },
    /// MQTT over TLS; the session knows whether CONNACK came.
    Mqtt { tls: Box<TlsStream> },
    /// Shutting down: DISCONNECT and close_notify being flushed.
    Closing { tls: Box<TlsStream> },
}

/// Why a connection attempt or connection ended.
enum Failure {
    Resolve(String),
    Connect(io::Error),
    Timeout(&'static str),
    Stream(StreamError),
    Closed,
    Session(session::Error),
    TooLarge(usize),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Resolve(e) => write!(f, "DNS lookup failed: {e}"),
            Failure::Connect(e) => write!(f, "TCP connect failed: {e}"),
            Failure::Timeout(what) => write!(f, "{what} timed out"),
            Failure::Stream(e) => write!(f, "{e}"),
            Failure::Closed => f.write_str("connection closed by the broker"),
            Failure::Session(e) => write!(f, "{e}"),
            Failure::TooLarge(n) => write!(
                f,
                "the broker sent a {n}-byte packet, over the {}-byte limit",
                consts::MQTT_MAX_PACKET
            ),
        }
    }
}

/// One MQTT connection to the broker.
struct Link {
    index: usize,
    client_id: String,
    phase: Phase,
    session: Session,
    backoff: Backoff,
    rx: Box<[u8]>,
    rx_len: usize,
    /// More plaintext may be waiting in the socket or TLS buffers.
    rx_pending: bool,
    generation: u64,
    closes_without_connack: u32,
    /// Whether this link was connected before (for "reconnected" logs).
    was_connected: bool,
}

impl Link {
    fn token(&self) -> Token {
        Token(LINK_BASE + self.index)
    }
}

/// The daemon: configuration, sockets, and every link.
pub struct EventLoop {
    config: Config,
    tls_config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    poll: Poll,
    signals: SignalFd,
    resolve_tx: mpsc::Sender<(usize, u64, String, u16)>,
    resolved_rx: mpsc::Receiver<Resolved>,
    links: Vec<Link>,
    epoch: std::time::Instant,
    stopping: Option<Instant>,
}

impl EventLoop {
    /// Sets up the poll, the signal fd and the resolver thread.
    pub fn new(config: Config, tls_config: Arc<ClientConfig>) -> io::Result<Self> {
        let server_name = tls::server_name(&config.endpoint)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // Block the signals before any thread exists, so all inherit the mask.
        let signals = SignalFd::termination()?;
        let poll = Poll::new()?;
        poll.registry().register(
            &mut SourceFd(&signals.as_raw_fd()),
            SIGNALS,
            Interest::READABLE,
        )?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (resolve_tx, resolved_rx) = spawn_resolver(waker)?;

        let seed = sys::random_seed();
        let links = (0..consts::MAX_CONNECTIONS)
            .map(|index| Link {
                index,
                client_id: client_id(&config.client_id, index),
                phase: Phase::Unused,
                session: Session::new(config.keepalive),
                backoff: Backoff::new(seed ^ (index as u64).wrapping_mul(0x9E37_79B9)),
                rx: vec![0u8; consts::MQTT_MAX_PACKET].into_boxed_slice(),
                rx_len: 0,
                rx_pending: false,
                generation: 0,
                closes_without_connack: 0,
                was_connected: false,
            })
            .collect();

        Ok(Self {
            config,
            tls_config,
            server_name,
            poll,
            signals,
            resolve_tx,
            resolved_rx,
            links,
            epoch: std::time::Instant::now(),
            stopping: None,
        })
    }

    fn now(&self) -> Instant {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        Instant::from_millis(ms)
    }

    /// Runs until a signal or a fatal error.
    pub fn run(&mut self) -> Exit {
        let mut events = Events::with_capacity(64);
        let now = self.now();
        self.begin_attempt(0, now);
        loop {
            let now = self.now();
            if let Err(exit) = self.run_timers(now) {
                return exit;
            }
            if let Some(deadline) = self.stopping {
                if now >= deadline || self.all_closed() {
                    self.close_all();
                    log::info!("stopped");
                    return Exit::Stopped;
                }
            }
            let timeout = self.next_deadline().map(|d| {
                let ms = d.millis().saturating_sub(now.millis());
                Duration::from_millis(ms.saturating_add(1))
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
                    Token(t) if (LINK_BASE..LINK_BASE + self.links.len()).contains(&t) => {
                        self.drive(t - LINK_BASE, now)
                    }
                    _ => Ok(()),
                };
                if let Err(exit) = result {
                    return exit;
                }
            }
        }
    }

    /// The earliest deadline of any link, session or the shutdown.
    fn next_deadline(&self) -> Option<Instant> {
        let mut next = self.stopping;
        let mut consider = |d: Option<Instant>| {
            if let Some(d) = d {
                next = Some(next.map_or(d, |n| n.min(d)));
            }
        };
        for link in &self.links {
            consider(match &link.phase {
                Phase::Waiting { until }
                | Phase::Resolving { until, .. }
                | Phase::Connecting { until, .. }
                | Phase::Handshaking { until, .. } => Some(*until),
                Phase::Mqtt { .. } => link.session.poll_at(),
                Phase::Unused | Phase::Closing { .. } => None,
            });
            if link.rx_pending {
                consider(Some(Instant::default()));
            }
        }
        next
    }

    fn run_timers(&mut self, now: Instant) -> Result<(), Exit> {
        for i in 0..self.links.len() {
            let link = &mut self.links[i];
            match &link.phase {
                Phase::Waiting { until } if now >= *until => self.begin_attempt(i, now),
                Phase::Resolving { until, .. } if now >= *until => {
                    self.fail(i, now, Failure::Timeout("DNS lookup"))?
                }
                Phase::Connecting { until, .. } if now >= *until => {
                    let e = io::Error::new(io::ErrorKind::TimedOut, "timed out");
                    self.next_address(i, now, e)?
                }
                Phase::Handshaking { until, .. } if now >= *until => {
                    self.fail(i, now, Failure::Timeout("TLS handshake"))?
                }
                Phase::Mqtt { .. } => {
                    if let Err(e) = link.session.poll(now) {
                        self.fail(i, now, Failure::Session(e))?;
                    } else if link.rx_pending || !link.session.pending_tx().is_empty() {
                        self.drive(i, now)?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn all_closed(&self) -> bool {
        self.links.iter().all(|l| match &l.phase {
            Phase::Closing { tls } => !tls.wants_write(),
            _ => true,
        })
    }

    fn close_all(&mut self) {
        for link in &mut self.links {
            if let Phase::Closing { tls } | Phase::Mqtt { tls } | Phase::Handshaking { tls, .. } =
                &mut link.phase
            {
                tls.shutdown();
            }
            link.phase = Phase::Unused;
        }
    }

    /// Starts a connection attempt: resolve (or use the IP literal).
    fn begin_attempt(&mut self, i: usize, now: Instant) {
        if self.stopping.is_some() {
            return;
        }
        let host = &self.config.endpoint;
        let port = self.config.port;
        let link = &mut self.links[i];
        link.generation = link.generation.wrapping_add(1);
        log::info!(
            "connection {i} ({}): connecting to {host}:{port}",
            link.client_id
        );
        if let Ok(ip) = host.parse::<IpAddr>() {
            let mut addrs = Addrs::new();
            // A fresh heapless::Vec has room for one address.
            let _ = addrs.push(SocketAddr::new(ip, port));
            self.connect_next(i, now, addrs, 0);
            return;
        }
        let generation = link.generation;
        link.phase = Phase::Resolving {
            until: now + RESOLVE_TIMEOUT,
            generation,
        };
        if self
            .resolve_tx
            .send((i, generation, host.clone(), port))
            .is_err()
        {
            // The resolver thread is gone; treat it as a failed lookup.
            let _ = self.fail(i, now, Failure::Resolve("resolver thread stopped".into()));
        }
    }

    fn take_resolved(&mut self, now: Instant) -> Result<(), Exit> {
        while let Ok(r) = self.resolved_rx.try_recv() {
            let Some(link) = self.links.get(r.link) else {
                continue;
            };
            let current = matches!(link.phase, Phase::Resolving { generation, .. } if generation == r.generation);
            if !current {
                continue; // a late answer for an attempt that timed out
            }
            match r.result {
                Ok(addrs) if !addrs.is_empty() => self.connect_next(r.link, now, addrs, 0),
                Ok(_) => self.fail(r.link, now, Failure::Resolve("no addresses".into()))?,
                Err(e) => self.fail(r.link, now, Failure::Resolve(e))?,
            }
        }
        Ok(())
    }

    /// Tries `addrs[next..]` in order; fails the attempt when none is left.
    fn connect_next(&mut self, i: usize, now: Instant, addrs: Addrs, mut next: usize) {
        let mut last_err = None;
        while let Some(addr) = addrs.get(next).copied() {
            next += 1;
            match TcpStream::connect(addr) {
                Ok(mut sock) => {
                    let token = self.links[i].token();
                    if let Err(e) = self.poll.registry().register(
                        &mut sock,
                        token,
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        last_err = Some(e);
                        continue;
                    }
                    log::debug!("connection {i}: TCP connecting to {addr}");
                    self.links[i].phase = Phase::Connecting {
                        sock,
                        until: now + CONNECT_TIMEOUT,
                        addrs,
                        next,
                    };
                    return;
                }
                Err(e) => last_err = Some(e),
            }
        }
        let e = last_err.unwrap_or_else(|| io::Error::other("no address"));
        // Only network errors reach here: never fatal.
        let _ = self.fail(i, now, Failure::Connect(e));
    }

    /// The current TCP connect failed: try the next address or give up.
    fn next_address(&mut self, i: usize, now: Instant, e: io::Error) -> Result<(), Exit> {
        let phase = std::mem::replace(&mut self.links[i].phase, Phase::Unused);
        if let Phase::Connecting {
            mut sock,
            addrs,
            next,
            ..
        } = phase
        {
            let _ = self.poll.registry().deregister(&mut sock);
            if next < addrs.len() {
                log::debug!("connection {i}: {e}; trying the next address");
                self.connect_next(i, now, addrs, next);
                return Ok(());
            }
        }
        self.fail(i, now, Failure::Connect(e))
    }

    /// Handles readiness (or pending work) on link `i`.
    fn drive(&mut self, i: usize, now: Instant) -> Result<(), Exit> {
        match &mut self.links[i].phase {
            Phase::Connecting { sock, .. } => {
                if let Ok(Some(e)) | Err(e) = sock.take_error() {
                    return self.next_address(i, now, e);
                }
                match sock.peer_addr() {
                    Ok(addr) => {
                        let _ = sock.set_nodelay(true);
                        log::debug!("connection {i}: TCP connected to {addr}");
                        self.start_tls(i, now)
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
                    Err(e) => self.next_address(i, now, e),
                }
            }
            Phase::Handshaking { .. } => self.drive_handshake(i, now),
            Phase::Mqtt { .. } => self.drive_mqtt(i, now),
            Phase::Closing { tls } => {
                let _ = tls.flush();
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn start_tls(&mut self, i: usize, now: Instant) -> Result<(), Exit> {
        let phase = std::mem::replace(&mut self.links[i].phase, Phase::Unused);
        let Phase::Connecting { sock, .. } = phase else {
            return Ok(());
        };
        match TlsStream::new(sock, Arc::clone(&self.tls_config), self.server_name.clone()) {
            Ok(tls) => {
                self.links[i].phase = Phase::Handshaking {
                    tls: Box::new(tls),
                    until: now + HANDSHAKE_TIMEOUT,
                };
                self.drive_handshake(i, now)
            }
            Err(e) => self.fail(i, now, Failure::Stream(StreamError::Tls(e))),
        }
    }

    fn drive_handshake(&mut self, i: usize, now: Instant) -> Result<(), Exit> {
        let link = &mut self.links[i];
        let Phase::Handshaking { tls, .. } = &mut link.phase else {
            return Ok(());
        };
        let step = tls
            .flush()
            .and_then(|()| tls.recv(&mut link.rx[link.rx_len..]))
            .and_then(|got| {
                link.rx_len += got.len;
                tls.flush()?;
                Ok(got.eof)
            });
        match step {
            Err(e) => return self.fail(i, now, Failure::Stream(e)),
            Ok(true) => return self.fail(i, now, Failure::Closed),
            Ok(false) if tls.is_handshaking() => return Ok(()),
            Ok(false) => {}
        }
        log::debug!(
            "connection {i}: TLS established ({:?})",
            tls.version().unwrap_or(rustls::ProtocolVersion::Unknown(0))
        );
        let phase = std::mem::replace(&mut link.phase, Phase::Unused);
        if let Phase::Handshaking { tls, .. } = phase {
            link.phase = Phase::Mqtt { tls };
        }
        let connect = session::connect_packet(&link.client_id, true);
        if let Err(e) = link.session.start(now, &connect) {
            return self.fail(i, now, Failure::Session(e));
        }
        self.drive_mqtt(i, now)
    }

    fn drive_mqtt(&mut self, i: usize, now: Instant) -> Result<(), Exit> {
        let mut events_seen = false;
        loop {
            let link = &mut self.links[i];
            let Phase::Mqtt { tls } = &mut link.phase else {
                return Ok(());
            };
            // Write what is queued, then read.
            let pending = link.session.pending_tx();
            if !pending.is_empty() {
                let n = tls.send(pending);
                link.session.consume_tx(now, n);
            }
            if let Err(e) = tls.flush() {
                return self.fail(i, now, Failure::Stream(e));
            }
            if events_seen && !link.rx_pending {
                return Ok(());
            }
            events_seen = true;
            let got = match tls.recv(&mut link.rx[link.rx_len..]) {
                Ok(got) => got,
                Err(e) => return self.fail(i, now, Failure::Stream(e)),
            };
            link.rx_len += got.len;
            link.rx_pending = got.more;
            self.process_rx(i, now)?;
            if got.eof {
                return self.fail(i, now, Failure::Closed);
            }
        }
    }

    /// Parses and handles every complete packet in link `i`'s buffer.
    fn process_rx(&mut self, i: usize, now: Instant) -> Result<(), Exit> {
        let mut pos = 0;
        let result = loop {
            let link = &mut self.links[i];
            if link.session.tx_free() < 64 {
                // The broker is not reading our PUBACKs: stop reading its
                // packets until the control buffer drains.
                link.rx_pending = true;
                break Ok(());
            }
            let avail = &link.rx[pos..link.rx_len];
            let len = match packet::packet_len(avail) {
                Ok(None) => break Ok(()),
                Ok(Some(n)) if n > link.rx.len() => break Err(Failure::TooLarge(n)),
                Ok(Some(n)) if n > avail.len() => break Ok(()),
                Ok(Some(n)) => n,
                Err(e) => break Err(Failure::Session(session::Error::Malformed(e))),
            };
            let bytes = &link.rx[pos..pos + len];
            pos += len;
            match link.session.handle(now, bytes) {
                Ok(Some(Event::Connected { session_present })) => {
                    link.closes_without_connack = 0;
                    link.backoff.connected(now);
                    let again = if link.was_connected {
                        "reconnected"
                    } else {
                        "connected"
                    };
                    link.was_connected = true;
                    log::info!(
                        "connection {i} ({}): {again} (session present: {session_present})",
                        link.client_id
                    );
                }
                Ok(Some(event)) => on_event(i, event),
                Ok(None) => {}
                Err(e) => break Err(Failure::Session(e)),
            }
        };
        let link = &mut self.links[i];
        link.rx.copy_within(pos..link.rx_len, 0);
        link.rx_len -= pos;
        match result {
            Ok(()) => Ok(()),
            Err(f) => self.fail(i, now, f),
        }
    }

    /// Ends link `i`'s current attempt or connection: a fatal failure ends
    /// the daemon, anything else schedules the next attempt.
    fn fail(&mut self, i: usize, now: Instant, failure: Failure) -> Result<(), Exit> {
        let link = &mut self.links[i];
        let phase = std::mem::replace(&mut link.phase, Phase::Unused);
        let awaiting_connack =
            matches!(link.session.state(), session::State::AwaitingConnack { .. });
        let was_up = link.session.is_connected();
        match phase {
            Phase::Connecting { mut sock, .. } => {
                let _ = self.poll.registry().deregister(&mut sock);
            }
            Phase::Handshaking { mut tls, .. }
            | Phase::Mqtt { mut tls }
            | Phase::Closing { mut tls } => {
                let _ = self.poll.registry().deregister(tls.socket());
                tls.shutdown();
            }
            _ => {}
        }
        link.session.reset();
        link.rx_len = 0;
        link.rx_pending = false;

        let id = &link.client_id;
        match &failure {
            Failure::Stream(StreamError::Tls(e)) => match tls::classify(e) {
                TlsFailure::AuthRejected => {
                    log::error!(
                        "connection {i} ({id}): the broker rejected our certificate: {failure}"
                    );
                    return Err(Exit::AuthFailure(format!(
                        "the broker rejected the client certificate ({failure})"
                    )));
                }
                TlsFailure::ServerUntrusted => {
                    log::error!(
                        "connection {i} ({id}): the broker's certificate is not trusted: {e}"
                    );
                    return Err(Exit::ServerUntrusted(format!(
                        "the certificate of {} is not trusted: {e}",
                        self.config.endpoint
                    )));
                }
                TlsFailure::Transient => {}
            },
            Failure::Session(e) if e.is_auth_failure() => {
                log::error!("connection {i} ({id}): {e}");
                return Err(Exit::AuthFailure(e.to_string()));
            }
            Failure::Stream(StreamError::Io(_)) | Failure::Closed if awaiting_connack => {
                link.closes_without_connack += 1;
                if link.closes_without_connack >= CLOSES_WITHOUT_CONNACK_LIMIT {
                    let msg = format!(
                        "the broker closed the connection after CONNECT {} times in a row \
                         without a CONNACK: the client id {id:?} is probably not authorized \
                         to connect (AWS IoT policy iot:Connect)",
                        link.closes_without_connack
                    );
                    log::error!("connection {i} ({id}): {msg}");
                    return Err(Exit::AuthFailure(msg));
                }
            }
            _ => {}
        }
        if self.stopping.is_some() {
            return Ok(());
        }
        if was_up {
            log::warn!("connection {i} ({id}): disconnected: {failure}");
        } else {
            log::warn!("connection {i} ({id}): connection attempt failed: {failure}");
        }
        let delay = link.backoff.next_delay(now);
        log::info!(
            "connection {i} ({id}): next attempt in {} ms",
            delay.as_millis()
        );
        link.phase = Phase::Waiting { until: now + delay };
        Ok(())
    }

    fn take_signals(&mut self, now: Instant) {
        while let Some(signo) = self.signals.read() {
            if self.stopping.is_some() {
                continue;
            }
            let name = if signo == libc::SIGINT {
                "SIGINT"
            } else {
                "SIGTERM"
            };
            log::info!("{name}: disconnecting and stopping");
            self.stopping = Some(now + SHUTDOWN_GRACE);
            for link in &mut self.links {
                let phase = std::mem::replace(&mut link.phase, Phase::Unused);
                link.phase = match phase {
                    Phase::Mqtt { mut tls } => {
                        link.session.disconnect();
                        let n = tls.send(link.session.pending_tx());
                        link.session.consume_tx(now, n);
                        tls.close_notify();
                        let _ = tls.flush();
                        Phase::Closing { tls }
                    }
                    Phase::Connecting { mut sock, .. } => {
                        let _ = self.poll.registry().deregister(&mut sock);
                        Phase::Unused
                    }
                    Phase::Handshaking { mut tls, .. } => {
                        tls.shutdown();
                        Phase::Unused
                    }
                    other @ Phase::Closing { .. } => other,
                    _ => Phase::Unused,
                };
            }
        }
    }
}

/// The client id of connection `index`: the bare id for 0, then `<id>_N`
/// [iotcored-param-id-1].
pub fn client_id(base: &str, index: usize) -> String {
    if index == 0 {
        base.to_owned()
    } else {
        format!("{base}_{index}")
    }
}

fn on_event(index: usize, event: Event<'_>) {
    match event {
        Event::Connected { .. } => {}
        Event::Publish(p) => {
            log::debug!(
                "connection {index}: PUBLISH on {} ({} bytes)",
                p.topic,
                p.payload.len()
            );
        }
        Event::Puback { packet_id } => log::debug!("connection {index}: PUBACK {packet_id}"),
        Event::Suback(s) => log::debug!("connection {index}: SUBACK {}", s.packet_id),
        Event::Unsuback { packet_id } => log::debug!("connection {index}: UNSUBACK {packet_id}"),
    }
}

/// Starts the resolver thread: lookups in, answers out, the loop woken.
#[allow(clippy::type_complexity)]
fn spawn_resolver(
    waker: Arc<Waker>,
) -> io::Result<(
    mpsc::Sender<(usize, u64, String, u16)>,
    mpsc::Receiver<Resolved>,
)> {
    let (req_tx, req_rx) = mpsc::channel::<(usize, u64, String, u16)>();
    let (res_tx, res_rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("resolver".into())
        .spawn(move || {
            for (link, generation, host, port) in req_rx {
                let result = (host.as_str(), port)
                    .to_socket_addrs()
                    .map(|it| it.take(MAX_ADDRS).collect::<Addrs>())
                    .map_err(|e| e.to_string());
                if res_tx
                    .send(Resolved {
                        link,
                        generation,
                        result,
                    })
                    .is_err()
                {
                    break;
                }
                let _ = waker.wake();
            }
        })?;
    Ok((req_tx, res_rx))
}
