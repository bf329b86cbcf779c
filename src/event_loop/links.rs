//! The MQTT connections ("links") to the broker, each driven through its
//! phases: waiting out a backoff, resolving the endpoint (on a resolver
//! thread that wakes the loop, so a slow DNS server never blocks it), TCP
//! connecting, the TLS handshake, and MQTT. Every phase has a deadline.
//!
//! [iotcored-1] connect at start-up; [iotcored-2] reconnect for ever with
//! backoff; [iotcored-3] an authentication failure ends the daemon;
//! [iotcored-4] extra links while subscriptions need them, with client ids
//! `<id>_N` [iotcored-param-id-1]. Link 0 carries every publish, so their
//! order is the order the bus accepted them.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use mio::net::TcpStream;
use mio::{Interest, Token};

use super::resolver::{Addrs, Lookup};
use super::{EventLoop, Exit, LINK_BASE};
use crate::bus::frame::ErrorCode;
use crate::config::Config;
use crate::consts;
use crate::limits::{Backoff, RateLimiter, BACKOFF_MIN};
use crate::mqtt::packet::{self, Packet, SubackCode, Version};
use crate::mqtt::props::{self, Builder};
use crate::mqtt::session::{self, Event, Limits, Session};
use crate::router::Traffic;
use crate::service::{Mode, PUBLISHING};
use crate::spool::{Dropped, Unsendable};
use crate::time::Instant;
use crate::tls::{self, StreamError, TlsFailure, TlsStream};

mod failure;
use failure::{Failure, RefusalLog, Truncating};

/// How long a DNS lookup may take.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a TCP connect to one address may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long closing a link waits for DISCONNECT and close_notify to go out.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Consecutive connections closed by the broker after a good TLS handshake
/// and our CONNECT, without a CONNACK, that count as an authorization
/// failure: AWS IoT Core answers a CONNECT its policy forbids that way.
pub const CLOSES_WITHOUT_CONNACK_LIMIT: u32 = 3;
/// A connection the broker closes this soon after accepting it, again and
/// again, is probably thrown off by another client with our client id.
pub const EARLY_CLOSE: Duration = Duration::from_secs(10);
/// Consecutive early closes that get the warning.
pub const EARLY_CLOSES_WARNED: u32 = 2;
/// Plaintext read from a link per read, and reads per turn of the loop.
const READ_CHUNK: usize = 16 * 1024;
const READS_PER_TURN: usize = 4;
/// Room the control buffer must have before another received packet is
/// handled (a PUBACK is 4 bytes; this leaves room for PINGREQ too).
const RX_RESUME_ROOM: usize = 64;

/// Bytes kept of why a connection last went down (for `stats`).
const LAST_DISCONNECT_LEN: usize = 200;

/// Room a SUBSCRIBE of 8 maximal filters needs in the control buffer.
const SUBSCRIBE_ROOM: usize = 8 * (2 + 256 + 1) + 8;

/// Where a link is in its life.
// The links table is allocated once at start-up, so a large variant costs
// nothing per attempt; boxing the addresses would allocate on every one.
#[allow(clippy::large_enum_variant)]
enum Phase {
    /// Not wanted (an extra connection with nothing to do, or stopped).
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
    /// DISCONNECT and close_notify being flushed before the socket closes.
    Closing { tls: Box<TlsStream>, until: Instant },
}

impl Phase {
    /// The phase's name, for logs.
    fn name(&self) -> &'static str {
        match self {
            Phase::Unused => "unused",
            Phase::Waiting { .. } => "waiting",
            Phase::Resolving { .. } => "resolving",
            Phase::Connecting { .. } => "tcp-connecting",
            Phase::Handshaking { .. } => "tls-handshaking",
            Phase::Mqtt { .. } => "mqtt",
            Phase::Closing { .. } => "closing",
        }
    }
}

/// How `fill_link` ended.
// A short-lived return value on the stack: boxing the large variant would
// allocate for every dropped message.
#[allow(clippy::large_enum_variant)]
enum Filled {
    Done,
    Failed(Failure),
    Dropped(Dropped),
}

/// One MQTT connection to the broker.
pub(super) struct Link {
    index: usize,
    client_id: String,
    /// Changed only through `set_phase` (and `take_phase`).
    phase: Phase,
    /// The phase last logged: `take_phase` leaves `Unused` in place for a
    /// moment without it being a change worth a line.
    logged_phase: &'static str,
    session: Session,
    backoff: Backoff,
    rx: Box<[u8]>,
    rx_len: usize,
    /// More plaintext may be waiting in the socket or TLS buffers.
    rx_pending: bool,
    /// Reading is paused: the control buffer is too full to take the
    /// PUBACKs that handling more packets would queue. Cleared once writes
    /// drain it; until then only a writable event moves this link.
    rx_blocked: bool,
    generation: u64,
    closes_without_connack: u32,
    /// When the current connection's CONNACK accepted it.
    connected_at: Option<Instant>,
    /// Consecutive connections the broker closed within `EARLY_CLOSE` of
    /// accepting them, TCP and TLS being fine: the sign of another client
    /// with our client id.
    early_closes: u32,
    /// Whether this link was connected before (for "reconnected" logs).
    was_connected: bool,
    /// When the last connection attempt began (or the link was closed):
    /// AWS allows one CONNECT per second per client id.
    last_attempt: Option<Instant>,
    /// AWS IoT Core's per-connection publish limits.
    limiter: RateLimiter,
    /// The next PUBLISH waits for the limiter until then.
    rate_until: Option<Instant>,
    /// Why the connection last went down (empty: never), for `stats`.
    last_disconnect: heapless::String<LAST_DISCONNECT_LEN>,
    /// What the broker's CONNACK allows on the current connection.
    limits: Limits,
    /// Refusals (PUBACK failures) last logged, by topic and reason, so
    /// that each is logged once a minute [mqtt5-7].
    refusals_logged: RefusalLog,
}

impl Link {
    pub(super) fn new(index: usize, config: &Config, seed: u64) -> Self {
        Self {
            index,
            client_id: client_id(&config.client_id, index),
            phase: Phase::Unused,
            logged_phase: Phase::Unused.name(),
            session: Session::new(config.keepalive, config.mqtt),
            backoff: Backoff::with_max(
                seed ^ (index as u64).wrapping_mul(0x9E37_79B9),
                Duration::from_secs(u64::from(config.max_backoff)),
            ),
            rx: vec![0u8; consts::MQTT_MAX_PACKET].into_boxed_slice(),
            rx_len: 0,
            rx_pending: false,
            rx_blocked: false,
            generation: 0,
            closes_without_connack: 0,
            connected_at: None,
            early_closes: 0,
            was_connected: false,
            limiter: RateLimiter::new(
                consts::PUBLISH_RATE,
                u64::try_from(consts::PUBLISH_BYTES_PER_SEC).unwrap_or(u64::MAX),
            ),
            rate_until: None,
            last_attempt: None,
            last_disconnect: heapless::String::new(),
            limits: Limits::default(),
            refusals_logged: RefusalLog::default(),
        }
    }

    /// QoS 1 messages that may be in flight on this connection: ours and
    /// the broker's Receive Maximum, whichever is lower [mqtt5-4].
    fn inflight_limit(&self) -> usize {
        consts::MAX_INFLIGHT.min(usize::from(self.limits.receive_maximum))
    }

    /// The largest PUBLISH the broker takes on this connection.
    fn max_packet(&self) -> usize {
        self.limits.max_packet()
    }

    fn token(&self) -> Token {
        Token(LINK_BASE + self.index)
    }

    /// Moves the link to `phase`, logging the change at debug.
    fn set_phase(&mut self, phase: Phase) {
        let name = phase.name();
        if name != self.logged_phase {
            log::debug!(
                "connection {} ({}): {} -> {name}",
                self.index,
                self.client_id,
                self.logged_phase
            );
            self.logged_phase = name;
        }
        self.phase = phase;
    }

    /// Takes the current phase out to rebuild it; `set_phase` must follow.
    fn take_phase(&mut self) -> Phase {
        std::mem::replace(&mut self.phase, Phase::Unused)
    }

    /// Forgets the state of the connection that just ended.
    fn forget_connection(&mut self) {
        self.session.reset();
        self.rx_len = 0;
        self.rx_pending = false;
        self.rx_blocked = false;
    }

    /// The client id this link connects with.
    pub(super) fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Why the connection last went down; empty if it never did.
    pub(super) fn last_disconnect(&self) -> &str {
        &self.last_disconnect
    }

    /// Records why the connection went down, cut to what fits.
    fn note_disconnect(&mut self, why: &dyn std::fmt::Display) {
        self.last_disconnect.clear();
        let _ = std::fmt::write(
            &mut Truncating {
                text: &mut self.last_disconnect,
                full: false,
            },
            format_args!("{why}"),
        );
    }

    /// Whether CONNACK was accepted on the current connection.
    pub(super) fn is_connected(&self) -> bool {
        matches!(self.phase, Phase::Mqtt { .. }) && self.session.is_connected()
    }

    /// When this link next needs attention.
    pub(super) fn deadline(&self) -> Option<Instant> {
        // More to read (or reading paused but now possible again): at once.
        let can_read = !self.rx_blocked || self.session.tx_free() >= RX_RESUME_ROOM;
        if can_read && (self.rx_pending || self.rx_blocked) {
            return Some(Instant::default());
        }
        match &self.phase {
            Phase::Waiting { until }
            | Phase::Resolving { until, .. }
            | Phase::Connecting { until, .. }
            | Phase::Handshaking { until, .. }
            | Phase::Closing { until, .. } => Some(*until),
            Phase::Mqtt { .. } => match (self.session.poll_at(), self.rate_until) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
            Phase::Unused => None,
        }
    }
}

impl EventLoop {
    pub(super) fn run_timers(&mut self, now: Instant) -> Result<(), Exit> {
        enum Due {
            Nothing,
            Attempt,
            Fail(Failure),
            NextAddress,
            Drop,
            Drive,
        }
        for i in 0..self.links.len() {
            let link = &mut self.links[i];
            let due = match &mut link.phase {
                Phase::Waiting { until } if now >= *until => Due::Attempt,
                Phase::Resolving { until, .. } if now >= *until => {
                    Due::Fail(Failure::Timeout("DNS lookup"))
                }
                Phase::Connecting { until, .. } if now >= *until => Due::NextAddress,
                Phase::Handshaking { until, .. } if now >= *until => {
                    Due::Fail(Failure::Timeout("TLS handshake"))
                }
                Phase::Closing { tls, until } => {
                    let _ = tls.flush();
                    if now >= *until || !tls.wants_write() {
                        Due::Drop
                    } else {
                        Due::Nothing
                    }
                }
                Phase::Mqtt { .. } => match link.session.poll(now) {
                    Err(e) => Due::Fail(Failure::Session(e)),
                    Ok(())
                        if link.deadline().is_some_and(|d| d <= now)
                            || !link.session.pending_tx().is_empty() =>
                    {
                        Due::Drive
                    }
                    Ok(()) => Due::Nothing,
                },
                _ => Due::Nothing,
            };
            match due {
                Due::Nothing => {}
                Due::Attempt => self.begin_attempt(i, now),
                Due::Fail(f) => self.fail(i, now, f)?,
                Due::NextAddress => {
                    let e = io::Error::new(io::ErrorKind::TimedOut, "timed out");
                    self.next_address(i, now, e)?
                }
                Due::Drop => self.drop_link(i),
                Due::Drive => self.drive(i, now)?,
            }
        }
        if self.drive_pending_clients(now) {
            self.pump(now)?;
        }
        Ok(())
    }

    pub(super) fn all_closed(&self) -> bool {
        self.links
            .iter()
            .all(|l| !matches!(l.phase, Phase::Closing { .. } | Phase::Mqtt { .. }))
    }

    pub(super) fn close_all(&mut self) {
        for i in 0..self.links.len() {
            self.drop_link(i);
        }
    }

    /// Closes link `i` in an orderly way: DISCONNECT, close_notify, then
    /// the socket once they are written (or after `CLOSE_TIMEOUT`).
    pub(super) fn close_link(&mut self, i: usize, now: Instant) {
        let was_up = self.links[i].is_connected();
        let link = &mut self.links[i];
        link.last_attempt = Some(now);
        let next = match link.take_phase() {
            Phase::Mqtt { mut tls } => {
                // A PUBLISH already started must end before DISCONNECT, or
                // the broker would read DISCONNECT inside it.
                let mut clean = true;
                if i == PUBLISHING && was_up {
                    if let Some(out) = self.spool.next(consts::MAX_INFLIGHT, false) {
                        let n = send_parts(&mut tls, out.prefix, out.first, out.second);
                        clean = self.spool.advance(n);
                    }
                }
                if clean {
                    link.session.disconnect();
                    let n = tls.send(link.session.pending_tx());
                    link.session.consume_tx(now, n);
                }
                tls.close_notify();
                let _ = tls.flush();
                Phase::Closing {
                    tls,
                    until: now + CLOSE_TIMEOUT,
                }
            }
            Phase::Connecting { mut sock, .. } => {
                let _ = self.poll.registry().deregister(&mut sock);
                Phase::Unused
            }
            Phase::Handshaking { mut tls, .. } => {
                let _ = self.poll.registry().deregister(tls.socket());
                tls.shutdown();
                Phase::Unused
            }
            other @ Phase::Closing { .. } => other,
            _ => Phase::Unused,
        };
        link.set_phase(next);
        link.forget_connection();
        if was_up {
            link.note_disconnect(&"closed by iotcored");
            self.link_lost(i, now);
        }
    }

    /// Deregisters and drops whatever socket link `i` has.
    fn drop_link(&mut self, i: usize) {
        let link = &mut self.links[i];
        match link.take_phase() {
            Phase::Connecting { mut sock, .. } => {
                let _ = self.poll.registry().deregister(&mut sock);
            }
            Phase::Handshaking { mut tls, .. }
            | Phase::Mqtt { mut tls }
            | Phase::Closing { mut tls, .. } => {
                let _ = self.poll.registry().deregister(tls.socket());
                tls.shutdown();
            }
            _ => {}
        }
        link.set_phase(Phase::Unused);
    }

    /// Opens extra links that subscriptions need and closes the ones they
    /// no longer need [iotcored-4].
    pub(super) fn sync_links(&mut self, now: Instant) {
        if self.stopping.is_some() {
            return;
        }
        for i in PUBLISHING + 1..self.links.len() {
            let wanted = self.router.link_wanted(i);
            let unused = matches!(self.links[i].phase, Phase::Unused);
            if wanted && unused {
                log::info!(
                    "connection {i} ({}): needed for subscriptions",
                    self.links[i].client_id
                );
                // Never sooner than a second after the last attempt.
                let link = &mut self.links[i];
                let earliest = link.last_attempt.map_or(now, |t| t + BACKOFF_MIN);
                if earliest > now {
                    link.set_phase(Phase::Waiting { until: earliest });
                } else {
                    self.begin_attempt(i, now);
                }
            } else if !wanted && !unused && !matches!(self.links[i].phase, Phase::Closing { .. }) {
                log::info!(
                    "connection {i} ({}): no subscriptions left; closing",
                    self.links[i].client_id
                );
                self.close_link(i, now);
            }
        }
    }

    /// Starts a connection attempt: resolve (or use the IP literal).
    pub(super) fn begin_attempt(&mut self, i: usize, now: Instant) {
        if self.stopping.is_some() {
            return;
        }
        let host = &self.config.endpoint;
        let port = self.config.port;
        let link = &mut self.links[i];
        link.generation = link.generation.wrapping_add(1);
        link.last_attempt = Some(now);
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
        link.set_phase(Phase::Resolving {
            until: now + RESOLVE_TIMEOUT,
            generation,
        });
        if self
            .resolve_tx
            .send(Lookup {
                link: i,
                generation,
                host: host.clone(),
                port,
            })
            .is_err()
        {
            // The resolver thread is gone; treat it as a failed lookup.
            let _ = self.fail(i, now, Failure::Resolve("resolver thread stopped".into()));
        }
    }

    pub(super) fn take_resolved(&mut self, now: Instant) -> Result<(), Exit> {
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
                    self.links[i].set_phase(Phase::Connecting {
                        sock,
                        until: now + CONNECT_TIMEOUT,
                        addrs,
                        next,
                    });
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
        if let Phase::Connecting {
            mut sock,
            addrs,
            next,
            ..
        } = self.links[i].take_phase()
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
    pub(super) fn drive(&mut self, i: usize, now: Instant) -> Result<(), Exit> {
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
            Phase::Closing { tls, .. } => {
                let _ = tls.flush();
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn start_tls(&mut self, i: usize, now: Instant) -> Result<(), Exit> {
        let Phase::Connecting { sock, .. } = self.links[i].take_phase() else {
            self.links[i].set_phase(Phase::Unused);
            return Ok(());
        };
        match TlsStream::new(sock, Arc::clone(&self.tls_config), self.server_name.clone()) {
            Ok(tls) => {
                self.links[i].set_phase(Phase::Handshaking {
                    tls: Box::new(tls),
                    until: now + HANDSHAKE_TIMEOUT,
                });
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
        let next = match link.take_phase() {
            Phase::Handshaking { tls, .. } => Phase::Mqtt { tls },
            other => other,
        };
        link.set_phase(next);
        let clean_session = !self.config.persistent_session;
        // [mqtt5-2] What we ask of the broker (ignored with 3.1.1).
        let mut properties = Builder::<32>::new();
        let session_expiry = if clean_session {
            0
        } else {
            self.config.session_expiry
        };
        let built = properties
            .u32(props::id::SESSION_EXPIRY, session_expiry)
            .and_then(|()| {
                properties.u16(
                    props::id::RECEIVE_MAXIMUM,
                    u16::try_from(consts::MAX_INFLIGHT).unwrap_or(u16::MAX),
                )
            })
            .and_then(|()| {
                properties.u32(
                    props::id::MAXIMUM_PACKET_SIZE,
                    u32::try_from(consts::MQTT_MAX_PACKET).unwrap_or(u32::MAX),
                )
            })
            .and_then(|()| properties.u16(props::id::TOPIC_ALIAS_MAXIMUM, 0))
            .and_then(|()| properties.byte(props::id::REQUEST_PROBLEM_INFO, 1));
        debug_assert!(built.is_ok(), "the CONNECT properties fit 32 bytes");
        let connect = packet::Connect {
            properties: Some(properties.props()),
            ..session::connect_packet(&link.client_id, clean_session)
        };
        link.limits = Limits::default();
        if let Err(e) = link.session.start(now, &connect) {
            return self.fail(i, now, Failure::Session(e));
        }
        self.drive_mqtt(i, now)
    }

    fn drive_mqtt(&mut self, i: usize, now: Instant) -> Result<(), Exit> {
        let mut first = true;
        let mut reads = 0;
        loop {
            self.write_link(i, now)?;
            let link = &mut self.links[i];
            if !matches!(link.phase, Phase::Mqtt { .. }) {
                return Ok(());
            }
            if link.rx_blocked {
                if link.session.tx_free() < RX_RESUME_ROOM {
                    return Ok(()); // wait for a writable event
                }
                // Room again: handle what was already received, then read on.
                link.rx_blocked = false;
                link.rx_pending = true;
                self.process_rx(i, now)?;
                continue;
            }
            if !first && !link.rx_pending {
                return Ok(());
            }
            // A bounded turn: a broker sending without pause must not keep
            // the loop from its timers and the bus; `rx_pending` brings this
            // link back on the next turn.
            if reads == READS_PER_TURN {
                return Ok(());
            }
            first = false;
            reads += 1;
            let Phase::Mqtt { tls } = &mut link.phase else {
                return Ok(());
            };
            let room = (link.rx_len + READ_CHUNK).min(link.rx.len());
            let got = match tls.recv(&mut link.rx[link.rx_len..room]) {
                Ok(got) => got,
                Err(e) => return self.fail(i, now, Failure::Stream(e)),
            };
            link.rx_len += got.len;
            link.rx_pending = got.more;
            self.process_rx(i, now)?;
            if got.eof && matches!(self.links[i].phase, Phase::Mqtt { .. }) {
                return self.fail(i, now, Failure::Closed);
            }
        }
    }

    /// Writes what link `i` owes the broker, in an order that never splits a
    /// packet: the rest of a PUBLISH already started, then control packets,
    /// then new PUBLISH packets from the spool (link 0 only) while the
    /// in-flight window and the TLS send buffer allow. A message that can
    /// no longer be sent (expired, too large) is dropped on the way and its
    /// caller answered.
    pub(super) fn write_link(&mut self, i: usize, now: Instant) -> Result<(), Exit> {
        loop {
            match self.fill_link(i, now) {
                Filled::Done => return Ok(()),
                Filled::Failed(f) => return self.fail(i, now, f),
                Filled::Dropped(d) => self.unsendable(&d, now),
            }
        }
    }

    /// `write_link`'s work until it is done or must drop a message.
    fn fill_link(&mut self, i: usize, now: Instant) -> Filled {
        let link = &mut self.links[i];
        link.rate_until = None;
        let carries_publishes = i == PUBLISHING && link.session.is_connected();
        let inflight_limit = link.inflight_limit();
        let max_packet = link.max_packet();
        let Phase::Mqtt { tls } = &mut link.phase else {
            return Filled::Done;
        };
        loop {
            // Fill the TLS stream's send buffer; `full` when it took less
            // than offered.
            let full = 'fill: loop {
                // 1. Finish a started PUBLISH.
                if carries_publishes {
                    if let Some(out) = self.spool.next(inflight_limit, false) {
                        let n = send_parts(tls, out.prefix, out.first, out.second);
                        let done = self.spool.advance(n);
                        link.session.note_tx(now);
                        if !done {
                            break 'fill true;
                        }
                    }
                }
                // 2. Control packets, whole.
                let pending = link.session.pending_tx();
                if !pending.is_empty() {
                    let len = pending.len();
                    let n = tls.send(pending);
                    link.session.consume_tx(now, n);
                    if n < len {
                        break 'fill true;
                    }
                }
                // 3. A new PUBLISH, when the rate limit allows it
                // [iotcored-bus-publish-4.1]: waiting is never an error.
                // Resends of a lost connection's messages go first; new ones
                // wait until the subscriptions are back [spool-9].
                let probing = self.spool.probing();
                if !carries_publishes
                    || self.router.holds_publishes(i, probing)
                    || (!probing && self.router.restoring(now))
                {
                    break 'fill false;
                }
                if let Some(d) = self.spool.prepare_next(now, inflight_limit, max_packet) {
                    if let Err(e) = tls.flush() {
                        return Filled::Failed(Failure::Stream(e));
                    }
                    return Filled::Dropped(d);
                }
                let Some(len) = self.spool.peek_next_len(inflight_limit) else {
                    break 'fill false;
                };
                let ready = link.limiter.ready_at(now, len);
                if ready > now {
                    link.rate_until = Some(ready);
                    break 'fill false;
                }
                let Some(out) = self.spool.next(inflight_limit, true) else {
                    break 'fill false;
                };
                link.limiter.record(now, out.len);
                let (len, qos, packet_id) = (out.len, out.qos, out.packet_id);
                let n = send_parts(tls, out.prefix, out.first, out.second);
                let done = self.spool.advance(n);
                link.session.note_tx(now);
                if log::log_enabled!(log::Level::Trace) {
                    trace_publish(
                        i,
                        "out",
                        &self.spool.last_started_topic(),
                        qos,
                        len,
                        packet_id,
                    );
                }
                if !done {
                    break 'fill true;
                }
            };
            if let Err(e) = tls.flush() {
                return Filled::Failed(Failure::Stream(e));
            }
            // The stream was full but the socket took all of it: no writable
            // edge will come while the socket has room, so fill again now.
            if !full || tls.wants_write() {
                return Filled::Done;
            }
        }
    }

    /// A message dropped unsent: its record goes, its caller hears, and
    /// the log says why [bus-expiry-1] [mqtt5-4].
    fn unsendable(&mut self, d: &Dropped, now: Instant) {
        self.released(d.stored, now);
        let code = match d.why {
            Unsendable::Expired => ErrorCode::Timeout,
            Unsendable::TooLarge => ErrorCode::Remote,
        };
        self.clients.answer_waiting(
            &mut self.router,
            |m| m == Mode::AwaitAcked(d.ticket),
            Some(code),
        );
        match d.why {
            Unsendable::Expired => log::debug!(
                "a {}-byte message on {:?} expired before it could be sent; dropped",
                d.len,
                d.topic.as_str()
            ),
            Unsendable::TooLarge => log::warn!(
                "a {}-byte message on {:?} is larger than the broker's maximum packet size; \
                 dropped",
                d.len,
                d.topic.as_str()
            ),
        }
    }

    /// Queues the SUBSCRIBE/UNSUBSCRIBE packets the router owes link `i`.
    pub(super) fn queue_broker_requests(&mut self, i: usize) {
        let link = &mut self.links[i];
        if !link.is_connected() {
            return;
        }
        // On link 0, a filter is probed only when no publish is in flight,
        // and no SUBSCRIBE goes while a publish is probed [bus-iso-2].
        let traffic = if i != PUBLISHING || self.spool.is_quiet() {
            Traffic::Quiet
        } else if self.spool.probing() {
            Traffic::Probing
        } else {
            Traffic::Busy
        };
        while link.session.tx_free() >= SUBSCRIBE_ROOM {
            let Some(request) = self.router.next_request(i, traffic) else {
                break;
            };
            if let Err(e) = link.session.queue(&request.packet(link.session.version())) {
                // Cannot happen with the room checked above; the router
                // re-sends it after the next reconnect if it does.
                log::warn!("connection {i}: cannot queue a subscription request: {e}");
                break;
            }
            log::debug!(
                "connection {i}: {:?} {} filter(s), packet id {}",
                request.kind,
                request.filters.len(),
                request.packet_id
            );
        }
    }

    /// Parses and handles every complete packet in link `i`'s buffer.
    fn process_rx(&mut self, i: usize, now: Instant) -> Result<(), Exit> {
        let mut pos = 0;
        let result = loop {
            let link = &mut self.links[i];
            if link.session.tx_free() < RX_RESUME_ROOM {
                // The broker is not reading our PUBACKs: stop reading its
                // packets until the control buffer drains.
                link.rx_blocked = true;
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
                Ok(Some(Event::Connected {
                    session_present,
                    limits,
                })) => {
                    link.closes_without_connack = 0;
                    link.connected_at = Some(now);
                    link.limits = limits;
                    if link.session.version() == Version::V5 {
                        log::info!(
                            "connection {i} ({}): broker limits: receive maximum {}, maximum \
                             packet size {}, maximum qos {}, retain {}, topic aliases {}, \
                             keepalive {} s{}",
                            link.client_id,
                            limits.receive_maximum,
                            limits.maximum_packet_size,
                            limits.maximum_qos as u8,
                            if limits.retain_available {
                                "available"
                            } else {
                                "not available"
                            },
                            limits.topic_alias_maximum,
                            link.session.keepalive().as_secs(),
                            if limits.server_keep_alive.is_some() {
                                " (the broker's Server Keep Alive)"
                            } else {
                                ""
                            }
                        );
                    }
                    self.router.use_subscription_ids(
                        i,
                        link.session.version() == Version::V5 && limits.subscription_ids,
                    );
                    if i == PUBLISHING {
                        self.broker = limits;
                        // [mqtt5-6] Aliases start afresh on every connection.
                        self.spool
                            .set_topic_aliases(limits.topic_alias_maximum, link.max_packet());
                    }
                    link.backoff.connected(now);
                    let again = if link.was_connected {
                        self.counters.reconnects += 1;
                        "reconnected"
                    } else {
                        "connected"
                    };
                    link.was_connected = true;
                    log::info!(
                        "connection {i} ({}): {again} (session present: {session_present})",
                        link.client_id
                    );
                    self.link_established(i, session_present, now);
                }
                Ok(Some(Event::Publish(p))) => {
                    self.counters.received += 1;
                    // Split borrows: the message lives in this link's buffer.
                    let (topic, payload) = (p.topic, p.payload);
                    // MQTT 5: which of our subscriptions this copy is for.
                    // (More than the table holds: every matching one.)
                    let mut ids = heapless::Vec::<u32, 64>::new();
                    for (pid, v) in p.properties.iter().flat_map(|p| p.iter()) {
                        if let (props::id::SUBSCRIPTION_ID, props::Value::Varint(id)) = (pid, v) {
                            if ids.push(id).is_err() {
                                ids.clear();
                                break;
                            }
                        }
                    }
                    trace_publish(i, "in", topic, p.qos, payload.len(), p.packet_id);
                    self.counters.dropped += self.clients.deliver(
                        &mut self.router,
                        topic,
                        payload,
                        p.properties,
                        &ids,
                        now,
                    );
                }
                Ok(Some(Event::Puback {
                    packet_id,
                    reason,
                    reason_string,
                })) => {
                    // [mqtt5-7] 0x80 and above: the broker refused this one
                    // message and kept the connection.
                    let accepted = reason < 0x80;
                    let topic = if accepted || i != PUBLISHING {
                        None
                    } else {
                        self.spool.inflight_topic(packet_id)
                    };
                    match self
                        .spool
                        .ack_with(packet_id, accepted)
                        .filter(|_| i == PUBLISHING)
                    {
                        Some(acked) => {
                            if let Some(topic) = topic {
                                if link.refusals_logged.due(&topic, reason, now) {
                                    log::warn!(
                                        "connection {i}: the broker refused a message on {:?}: \
                                         PUBACK 0x{reason:02X} {}{} (not resent; logged once \
                                         a minute per topic and reason)",
                                        topic.as_str(),
                                        packet::reason_name(reason),
                                        failure::reason_text(reason_string.unwrap_or(""))
                                    );
                                }
                            }
                            self.released(acked.stored, now);
                            // [bus-confirm-1] A call waiting for it is answered.
                            let code = match reason {
                                0..=0x7F => None,
                                0x87 => Some(ErrorCode::Unauthorized),
                                _ => Some(ErrorCode::Remote),
                            };
                            self.clients.answer_waiting(
                                &mut self.router,
                                |m| m == Mode::AwaitAcked(acked.ticket),
                                code,
                            );
                        }
                        None => {
                            log::warn!("connection {i}: PUBACK for unknown packet id {packet_id}");
                        }
                    }
                }
                Ok(Some(Event::Suback(suback))) => {
                    // One code per filter of the SUBSCRIBE [MQTT-3.9.3-1]:
                    // any other count leaves which filter was refused unknown.
                    match self.router.subscribe_len(i, suback.packet_id) {
                        None => log::warn!("connection {i}: SUBACK for unknown packet id"),
                        Some(n) if suback.codes().len() != n => {
                            break Err(Failure::Session(session::Error::Protocol(
                                "a SUBACK whose return codes do not match its SUBSCRIBE's filters",
                            )));
                        }
                        Some(_) => {
                            for &code in suback.raw_codes().iter().filter(|&&c| c >= 0x80) {
                                log::warn!(
                                    "connection {i}: the broker refused a subscription: SUBACK \
                                     0x{code:02X} {}{}",
                                    packet::reason_name(code),
                                    failure::reason_text(
                                        suback
                                            .properties
                                            .and_then(|p| p.reason_string())
                                            .unwrap_or("")
                                    )
                                );
                            }
                            let codes: heapless::Vec<SubackCode, 8> =
                                suback.codes().take(8).collect();
                            self.router.on_suback(i, suback.packet_id, codes);
                        }
                    }
                }
                Ok(Some(Event::Unsuback { packet_id })) => {
                    if !self.router.on_unsuback(i, packet_id) {
                        log::warn!("connection {i}: UNSUBACK for unknown packet id {packet_id}");
                    }
                }
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

    /// Link `i` got its CONNACK.
    fn link_established(&mut self, i: usize, session_present: bool, now: Instant) {
        self.router.link_up(i, session_present, now);
        if i == PUBLISHING {
            self.notifier.notify(&format!(
                "STATUS=connected to {}:{}",
                self.config.endpoint, self.config.port
            ));
            self.notify_status(true);
        }
    }

    /// A message left the memory spool for good (acknowledged,
    /// quarantined): its disk record goes too, and a stored one not yet in
    /// memory may take its place.
    fn released(&mut self, stored: u64, now: Instant) {
        if let Some(disk) = self.disk.as_mut() {
            crate::service::Store::release(disk, stored);
            disk.load(&mut self.spool, now);
        }
    }
}

/// Offers a message's slices to TLS in order; returns how much it took.
fn send_parts(tls: &mut TlsStream, prefix: &[u8], first: &[u8], second: &[u8]) -> usize {
    let mut n = 0;
    for part in [prefix, first, second] {
        if part.is_empty() {
            continue;
        }
        let took = tls.send(part);
        n += took;
        if took < part.len() {
            break;
        }
    }
    n
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

/// One line per message in or out at `RUST_LOG=trace`: the connection, the
/// topic, QoS, size (the whole PUBLISH out, the payload in) and packet id;
/// never the payload.
fn trace_publish(
    link: usize,
    direction: &str,
    topic: &str,
    qos: crate::mqtt::packet::QoS,
    len: usize,
    packet_id: Option<u16>,
) {
    let qos = u8::from(qos == crate::mqtt::packet::QoS::AtLeastOnce);
    match packet_id {
        Some(id) => log::trace!(
            "connection {link} {direction}: PUBLISH {topic:?} qos {qos} {len} bytes id {id}"
        ),
        None => {
            log::trace!("connection {link} {direction}: PUBLISH {topic:?} qos {qos} {len} bytes")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_disconnect_reason_is_cut_at_a_character_boundary() {
        let mut text = heapless::String::<8>::new();
        let mut w = Truncating {
            text: &mut text,
            full: false,
        };
        let _ = std::fmt::write(&mut w, format_args!("{}{}", "TLS: éé", "x"));
        assert_eq!(text.as_str(), "TLS: é");
    }

    #[test]
    fn extra_connections_get_numbered_client_ids() {
        assert_eq!(client_id("gw", 0), "gw");
        assert_eq!(client_id("gw", 1), "gw_1");
        assert_eq!(client_id("gw", 12), "gw_12");
    }
}
