//! Core bus clients: requests in, answers and subscription messages out.
//!
//! A connection serves any number of call/notify requests in order
//! [bus-req-4]; the next request is read only once the previous answer has
//! been handed to the kernel, so a client that never reads its answers
//! stops being served instead of growing our memory. A subscribe is the
//! last request of its connection [bus-req-4.2].
//!
//! Slow subscribers: a message frame goes straight to the kernel's socket
//! buffer, and what does not fit waits in the slot's bounded backlog
//! (`IOTCORED_BUS_CLIENT_TX`). A subscriber whose socket buffer and backlog
//! are both full when a message arrives has stopped reading: the message is
//! dropped and counted, and the subscriber is disconnected (logged), so it
//! sees the end of its stream instead of a silent gap.

use mio::Registry;

use super::links::PUBLISHING;
use super::EventLoop;
use crate::bus::frame::{self, ErrorCode, RequestType};
use crate::bus::object::{self, Encoder};
use crate::bus::server::{Input, SendError, Server};
use crate::router::{Dest, Outcome, Router, SubId};
use crate::service::{self, Method};
use crate::spool::{PushError, Spool};
use crate::time::Instant;

/// Consecutive failed deliveries to a response endpoint after which its
/// subscription is removed.
pub const ENDPOINT_FAILURE_LIMIT: u8 = 3;

/// Requests handled for one client in one turn of the loop.
const FRAMES_PER_TURN: usize = 32;

/// How long a closing slot may take to hand its last bytes to a peer that
/// does not read them before it is closed anyway.
pub const CLOSE_LINGER: core::time::Duration = core::time::Duration::from_secs(5);

/// What a bus connection is doing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum Mode {
    /// Serving requests.
    #[default]
    Requests,
    /// A `subscribe` call (with `response_endpoint`) waits for its SUBACK;
    /// later requests wait behind it.
    AwaitCall(SubId),
    /// A streamed `subscribe` waits for its SUBACK.
    AwaitStream(SubId),
    /// Streaming this subscription's messages.
    Stream(SubId),
    /// Streaming `connection_status`.
    Status,
    /// Our connection to a `response_endpoint`.
    Outbound,
}

/// Per-slot state the loop keeps beside the bus server's slot.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Client {
    mode: Mode,
    /// When the loop first saw the slot closing (its backlog still being
    /// written): it is closed `CLOSE_LINGER` later whatever is left.
    closing_since: Option<Instant>,
}

impl Client {
    /// Whether reading this slot's input is useful now.
    pub(super) fn wants_input(&self) -> bool {
        !matches!(self.mode, Mode::AwaitCall(_))
    }
}

/// What handling one request calls for.
enum Reply {
    /// Nothing: a notify that succeeded.
    Silent,
    /// Nothing: a notify that failed (logged; counted as dropped)
    /// [bus-req-4.1].
    Dropped,
    /// The call's null result.
    Null,
    /// An error answer; the connection stays open [bus-err-3].
    Error(ErrorCode),
    /// A malformed request: the code, then the connection closes [bus-err-1].
    Fatal(ErrorCode),
    /// A subscription was made; its answer comes when it settles (none
    /// for a notify).
    Subscribed {
        id: SubId,
        stream: bool,
        notify: bool,
    },
    /// `connection_status`: accepted and the current state follow.
    Status,
    /// `stats`: the counters.
    Stats,
}

/// Lists a delivery fills, allocated once at start-up with room for every
/// bus slot and every subscription.
pub(super) struct DeliveryLists {
    to_close: Vec<usize>,
    failed: Vec<SubId>,
    delivered: Vec<SubId>,
    /// Consecutive failed deliveries per response-endpoint subscription.
    endpoint_failures: Vec<(SubId, u8)>,
}

impl DeliveryLists {
    pub(super) fn new(slots: usize, subscriptions: usize) -> Self {
        Self {
            to_close: Vec::with_capacity(slots),
            failed: Vec::with_capacity(subscriptions),
            delivered: Vec::with_capacity(subscriptions),
            endpoint_failures: Vec::with_capacity(subscriptions),
        }
    }
}

/// The parts of the loop a message delivery touches.
pub(super) struct Delivery<'a> {
    pub bus: &'a mut Server,
    pub router: &'a mut Router,
    pub registry: &'a Registry,
    pub scratch: &'a mut [u8],
    pub scratch_notify: &'a mut [u8],
    pub dropped: &'a mut u64,
    pub clients: &'a mut [Client],
    pub lists: &'a mut DeliveryLists,
}

/// Delivers one incoming message to every matching local subscription:
/// the frame is built once and written to each subscriber.
///
/// A response endpoint gets a connection of its own for each message,
/// closed once the notify is written: GGL's servers close a connection
/// after one notify, so a reused connection would lose what follows it.
pub(super) fn deliver(d: &mut Delivery<'_>, topic: &str, payload: &[u8]) {
    let Delivery {
        bus,
        router,
        registry,
        scratch,
        scratch_notify,
        dropped,
        clients,
        lists,
    } = d;
    let DeliveryLists {
        to_close,
        failed,
        delivered,
        endpoint_failures,
    } = lists;
    to_close.clear();
    failed.clear();
    delivered.clear();
    let mut message_len = None;
    let mut notify_len = None;
    router.route(topic, |id, dest| match dest {
        Dest::Stream { client, generation } => {
            let i = usize::from(*client);
            if i >= bus.capacity() || bus.slot(i).generation() != *generation {
                return;
            }
            let len = *message_len.get_or_insert_with(|| message_frame(scratch, topic, payload));
            let Some(frame) = scratch.get(..len).filter(|f| !f.is_empty()) else {
                **dropped += 1;
                return;
            };
            match bus.send(i, &[frame]) {
                Ok(()) => {}
                Err(SendError::Full) => {
                    **dropped += 1;
                    log::warn!("bus: subscriber in slot {i} is not reading; message dropped, disconnecting it");
                    to_close.push(i);
                }
                Err(SendError::Closed) => {
                    **dropped += 1;
                    to_close.push(i);
                }
            }
        }
        Dest::Endpoint(name) => {
            let len = *notify_len.get_or_insert_with(|| notify_frame(scratch_notify, topic, payload));
            let Some(frame) = scratch_notify.get(..len).filter(|f| !f.is_empty()) else {
                **dropped += 1;
                return;
            };
            let sent = match bus.connect_endpoint(registry, name) {
                Ok(i) => {
                    if let Some(c) = clients.get_mut(i) {
                        *c = Client {
                            mode: Mode::Outbound,
                            ..Client::default()
                        };
                    }
                    bus.ignore_input(i);
                    let sent = bus.send(i, &[frame]).map_err(|e| (false, format!("{e:?}")));
                    bus.close_after_flush(i);
                    if bus.flush(i) {
                        to_close.push(i);
                    }
                    sent
                }
                // The endpoint's listen backlog is full (a burst faster than
                // it accepts): this message is lost, but the endpoint is
                // there, so it does not count towards removing it.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    Err((true, "its listen backlog is full".into()))
                }
                Err(e) => Err((false, e.to_string())),
            };
            match sent {
                Ok(()) => delivered.push(id),
                Err((busy, e)) => {
                    **dropped += 1;
                    log::warn!("bus: cannot deliver to response endpoint {name}: {e}; message dropped");
                    if !busy {
                        failed.push(id);
                    }
                }
            }
        }
    });
    endpoint_failures.retain(|(id, _)| !delivered.contains(id) && router.state(*id).is_some());
    for &id in failed.iter() {
        let count = match endpoint_failures.iter_mut().find(|(f, _)| *f == id) {
            Some((_, n)) => {
                *n = n.saturating_add(1);
                *n
            }
            None => {
                // Room is certain: one entry per live subscription at most.
                if endpoint_failures.len() < endpoint_failures.capacity() {
                    endpoint_failures.push((id, 1));
                }
                1
            }
        };
        if count >= ENDPOINT_FAILURE_LIMIT {
            log::warn!(
                "bus: response endpoint unreachable {ENDPOINT_FAILURE_LIMIT} times in a row; subscription removed"
            );
            router.unsubscribe(id);
            endpoint_failures.retain(|(f, _)| *f != id);
        }
    }
    for &i in to_close.iter() {
        let generation = bus.slot(i).generation();
        if matches!(clients.get(i).map(|c| c.mode), Some(Mode::Stream(_))) {
            if let Ok(client) = u16::try_from(i) {
                router.remove_stream(client, generation);
            }
        }
        bus.close(registry, i);
        if let Some(c) = clients.get_mut(i) {
            *c = Client::default();
        }
    }
}

/// A stream message frame `{topic, payload}` [iotcored-bus-subscribe-3.1];
/// its length, or 0 if it does not fit.
fn message_frame(buf: &mut [u8], topic: &str, payload: &[u8]) -> usize {
    frame::begin_message(buf)
        .ok()
        .and_then(|mut e| {
            let n = encode_message(e.payload_mut(), topic, payload)?;
            e.finish(n).ok()
        })
        .unwrap_or(0)
}

/// An `iotcored_response` notify carrying `{topic, payload}`
/// [iotcored-bus-subscribe-3]; its length, or 0 if it does not fit.
fn notify_frame(buf: &mut [u8], topic: &str, payload: &[u8]) -> usize {
    frame::begin_request(buf, b"iotcored_response", RequestType::Notify)
        .ok()
        .and_then(|mut e| {
            let n = encode_message(e.payload_mut(), topic, payload)?;
            e.finish(n).ok()
        })
        .unwrap_or(0)
}

fn encode_message(buf: &mut [u8], topic: &str, payload: &[u8]) -> Option<usize> {
    let mut e = Encoder::new(buf);
    e.map(2).ok()?;
    e.key(b"topic").ok()?.buf(topic.as_bytes()).ok()?;
    e.key(b"payload").ok()?.buf(payload).ok()?;
    Some(e.written())
}

/// Handles one request frame; pure apart from the spool and router it
/// changes.
fn handle_request(
    bytes: &[u8],
    slot: usize,
    generation: u32,
    spool: &mut Spool,
    router: &mut Router,
) -> Reply {
    let parsed = frame::parse(bytes).and_then(|f| f.request());
    let request = match parsed {
        Ok(r) => r,
        Err(e) => {
            log::debug!("bus: slot {slot}: malformed request: {e}");
            return Reply::Fatal(e.code());
        }
    };
    let params = match object::parse_params(request.payload) {
        Ok(p) => p,
        Err(e) => {
            log::debug!("bus: slot {slot}: malformed parameters: {e}");
            return Reply::Fatal(e.code());
        }
    };
    let notify = request.kind == RequestType::Notify;
    let refuse = |code: ErrorCode, what: &str| {
        log::debug!(
            "bus: slot {slot}: {} refused: {} ({what})",
            String::from_utf8_lossy(request.method),
            code.name()
        );
        if notify {
            Reply::Dropped
        } else {
            Reply::Error(code)
        }
    };
    let Some(method) = Method::from_name(request.method) else {
        return refuse(ErrorCode::NoEntry, "unknown method");
    };
    let has_endpoint = params.get(b"response_endpoint").is_some();
    if !method.accepts(request.kind, has_endpoint) {
        return refuse(ErrorCode::Invalid, "wrong request type");
    }
    match method {
        Method::Publish => {
            let p = match service::publish(&params) {
                Ok(p) => p,
                Err(code) => return refuse(code, "bad parameters"),
            };
            match spool.push(p.topic, p.payload, p.qos, p.retain) {
                Ok(_) if notify => Reply::Silent,
                Ok(_) => Reply::Null,
                Err(PushError::Busy) => refuse(ErrorCode::Busy, "outgoing queue full"),
                Err(PushError::TooLong) => refuse(ErrorCode::Range, "too long"),
            }
        }
        Method::Subscribe => {
            let s = match service::subscribe(&params) {
                Ok(s) => s,
                Err(code) => return refuse(code, "bad parameters"),
            };
            let dest = match s.endpoint {
                Some(name) => match Dest::endpoint(name) {
                    Some(d) => d,
                    None => return refuse(ErrorCode::Invalid, "endpoint name"),
                },
                None => Dest::Stream {
                    client: u16::try_from(slot).unwrap_or(u16::MAX),
                    generation,
                },
            };
            match router.subscribe(dest, &s.filters, s.qos, s.virtual_only) {
                Ok(id) => Reply::Subscribed {
                    id,
                    stream: s.endpoint.is_none(),
                    notify,
                },
                Err(e) => {
                    let code = ErrorCode::from_i32(e.code()).unwrap_or(ErrorCode::Failure);
                    log::warn!("bus: slot {slot}: subscribe refused: {e}");
                    refuse(code, "subscribe")
                }
            }
        }
        Method::Unsubscribe => {
            let u = match service::unsubscribe(&params) {
                Ok(u) => u,
                Err(code) => return refuse(code, "bad parameters"),
            };
            match router.find_endpoint(u.endpoint, &u.filters) {
                Some(id) => {
                    router.unsubscribe(id);
                    if notify {
                        Reply::Silent
                    } else {
                        Reply::Null
                    }
                }
                None => refuse(ErrorCode::NoEntry, "no such subscription"),
            }
        }
        Method::ConnectionStatus => Reply::Status,
        Method::Stats if notify => Reply::Silent,
        Method::Stats => Reply::Stats,
    }
}

impl EventLoop {
    /// Accepts new bus connections.
    pub(super) fn accept_clients(&mut self, now: Instant) {
        loop {
            let filled = self.bus.accept(self.poll.registry(), now);
            let more = filled.is_full();
            for i in filled {
                self.clients[i] = Client::default();
                self.drive_client(i, now);
            }
            if !more {
                break;
            }
        }
    }

    /// Whether slot `i` has input that can be handled now: input may be
    /// waiting, the slot wants it, and (for requests) the previous answer
    /// has left the backlog.
    pub(super) fn client_ready(&self, i: usize) -> bool {
        let slot = self.bus.slot(i);
        let mode = self.clients[i].mode;
        slot.is_open()
            && slot.readable()
            && self.clients[i].wants_input()
            && !(mode == Mode::Requests && (slot.has_backlog() || slot.is_closing()))
    }

    /// Serves slots that still have input buffered (pipelined requests that
    /// waited for an earlier answer) and ends overdue discards.
    pub(super) fn drive_pending_clients(&mut self, now: Instant) {
        for i in 0..self.clients.len() {
            let slot = self.bus.slot(i);
            if slot.is_open() && slot.is_closing() {
                match self.clients[i].closing_since {
                    None => self.clients[i].closing_since = Some(now),
                    Some(t) if now >= t + CLOSE_LINGER => {
                        log::debug!("bus: slot {i}: peer not reading; closed");
                        self.close_client(i);
                        continue;
                    }
                    Some(_) => {}
                }
            }
            let discarding = self
                .bus
                .slot(i)
                .discard_deadline()
                .is_some_and(|d| now >= d);
            if discarding || self.client_ready(i) {
                self.drive_client(i, now);
            }
        }
    }

    /// When slot `i` must be closed whatever its peer does, if closing.
    pub(super) fn client_deadline(&self, i: usize) -> Option<Instant> {
        let slot = self.bus.slot(i);
        if !(slot.is_open() && slot.is_closing()) {
            return None;
        }
        // Unmarked: the next turn marks it, so wake for that.
        Some(
            self.clients[i]
                .closing_since
                .map_or(Instant::default(), |t| t + CLOSE_LINGER),
        )
    }

    /// Reads, handles and answers what slot `i` has, as far as it can.
    pub(super) fn drive_client(&mut self, i: usize, now: Instant) {
        if !self.bus.slot(i).is_open() {
            return;
        }
        if self.bus.flush(i) {
            self.close_client(i);
            return;
        }
        // A bounded turn: a client that pipelines without pause must not
        // keep the loop from its timers (paced sends, keepalive) or from
        // other clients; what is left is served on the next turn.
        for _ in 0..FRAMES_PER_TURN {
            let mode = self.clients[i].mode;
            if !self.clients[i].wants_input() {
                break;
            }
            let slot = self.bus.slot(i);
            if mode == Mode::Requests && (slot.has_backlog() || slot.is_closing()) {
                break;
            }
            match self.bus.read(i, now) {
                Input::Frame(n) if mode == Mode::Requests => self.handle_frame(i, n, now),
                Input::Frame(n) => self.bus.consume(i, n),
                Input::Idle => break,
                Input::Malformed(code) => {
                    log::debug!("bus: slot {i}: malformed frame: {}", code.name());
                    self.send_error(i, code);
                    self.bus.close_after_flush(i);
                    break;
                }
                Input::Closed => {
                    self.close_client(i);
                    return;
                }
            }
        }
        if self.bus.flush(i) {
            self.close_client(i);
        }
    }

    fn handle_frame(&mut self, i: usize, n: usize, now: Instant) {
        let generation = self.bus.slot(i).generation();
        let before = self.spool.stats();
        let reply = {
            let bytes = self.bus.slot(i).frame(n);
            handle_request(bytes, i, generation, &mut self.spool, &mut self.router)
        };
        self.bus.consume(i, n);
        let after = self.spool.stats();
        if after.evicted != before.evicted || after.busy != before.busy {
            self.log_spool_pressure(now);
        }
        match reply {
            Reply::Silent => {}
            Reply::Dropped => self.counters.dropped += 1,
            Reply::Null => self.send_null(i),
            Reply::Error(code) => self.send_error(i, code),
            Reply::Fatal(code) => {
                self.send_error(i, code);
                self.bus.close_after_flush(i);
            }
            Reply::Subscribed { id, stream, notify } => {
                if stream {
                    self.clients[i].mode = Mode::AwaitStream(id);
                    self.bus.ignore_input(i);
                } else if !notify {
                    self.clients[i].mode = Mode::AwaitCall(id);
                }
                self.settle_subscriptions();
            }
            Reply::Status => {
                self.clients[i].mode = Mode::Status;
                self.bus.ignore_input(i);
                let mut buf = [0u8; frame::ACCEPTED_FRAME_LEN];
                if let Ok(len) = frame::emit_accepted(&mut buf) {
                    let _ = self.bus.send(i, &[&buf[..len]]);
                }
                let connected = self.links[PUBLISHING].is_connected();
                self.send_bool(i, connected);
            }
            Reply::Stats => {
                let len = self.stats_frame();
                if len == 0 {
                    self.send_error(i, ErrorCode::NoMem);
                } else if self.bus.send(i, &[&self.scratch[..len]]).is_err() {
                    self.bus.close_after_flush(i);
                }
            }
        }
    }

    /// Closes slot `i` and ends whatever subscription it streamed.
    fn close_client(&mut self, i: usize) {
        let generation = self.bus.slot(i).generation();
        if matches!(self.clients[i].mode, Mode::Stream(_) | Mode::AwaitStream(_)) {
            if let Ok(client) = u16::try_from(i) {
                self.router.remove_stream(client, generation);
            }
        }
        self.bus.close(self.poll.registry(), i);
        self.clients[i] = Client::default();
    }

    /// Answers every subscription the router settled.
    pub(super) fn settle_subscriptions(&mut self) {
        while let Some(s) = self.router.take_settled() {
            match s.dest {
                Dest::Stream { client, generation } => {
                    let i = usize::from(client);
                    if i >= self.clients.len() || self.bus.slot(i).generation() != generation {
                        continue;
                    }
                    match s.outcome {
                        Outcome::Accepted => {
                            self.clients[i].mode = Mode::Stream(s.id);
                            let mut buf = [0u8; frame::ACCEPTED_FRAME_LEN];
                            if let Ok(len) = frame::emit_accepted(&mut buf) {
                                let _ = self.bus.send(i, &[&buf[..len]]);
                            }
                        }
                        Outcome::Refused => {
                            log::warn!("bus: slot {i}: the broker refused a topic filter");
                            self.send_error(i, ErrorCode::Remote);
                            self.clients[i].mode = Mode::Requests;
                            self.bus.close_after_flush(i);
                        }
                        Outcome::Dropped => {
                            log::warn!(
                                "bus: slot {i}: the broker refused a topic filter after a reconnect; ending the stream"
                            );
                            self.bus.close_after_flush(i);
                        }
                    }
                    if self.bus.flush(i) {
                        self.close_client(i);
                    }
                }
                Dest::Endpoint(name) => {
                    let waiting = self
                        .clients
                        .iter()
                        .position(|c| c.mode == Mode::AwaitCall(s.id));
                    match (s.outcome, waiting) {
                        // The slot's pipelined requests continue from the
                        // loop (`drive_pending_clients`), not from here:
                        // settling inside a request must not recurse.
                        (Outcome::Accepted, Some(i)) => {
                            self.clients[i].mode = Mode::Requests;
                            self.send_null(i);
                        }
                        (Outcome::Refused, Some(i)) => {
                            log::warn!("bus: slot {i}: the broker refused a topic filter");
                            self.clients[i].mode = Mode::Requests;
                            self.send_error(i, ErrorCode::Remote);
                        }
                        (Outcome::Refused, None) => {
                            // A notify subscribe: nobody to answer.
                            log::warn!("bus: the broker refused a topic filter of the subscription for {name}");
                            self.counters.dropped += 1;
                        }
                        (Outcome::Dropped, _) => log::warn!(
                            "bus: the broker refused a topic filter of the subscription for {name}; removed"
                        ),
                        (_, None) => {}
                    }
                }
            }
        }
    }

    /// Logs, at most once a second, that the spool is full and what it cost.
    fn log_spool_pressure(&mut self, now: Instant) {
        let quiet = self
            .spool_log_at
            .is_some_and(|t| now.saturating_since(t).as_secs() < 1);
        if quiet {
            return;
        }
        self.spool_log_at = Some(now);
        let s = self.spool.stats();
        log::warn!(
            "outgoing queue full ({} messages, {} bytes): {} QoS 0 evicted, {} publishes refused BUSY so far",
            self.spool.len(),
            self.spool.bytes(),
            s.evicted,
            s.busy
        );
    }

    /// Tells every `connection_status` subscriber the new state.
    pub(super) fn notify_status(&mut self, connected: bool) {
        for i in 0..self.clients.len() {
            if self.clients[i].mode == Mode::Status {
                self.send_bool(i, connected);
                if self.bus.flush(i) {
                    self.close_client(i);
                }
            }
        }
    }

    fn send_bool(&mut self, i: usize, value: bool) {
        self.send_value(i, |e| e.bool(value).map(|_| ()));
    }

    fn send_null(&mut self, i: usize) {
        self.send_value(i, |e| e.null().map(|_| ()));
    }

    /// Sends a frame whose payload is one small object (a result and a
    /// stream message are the same frame on the wire).
    fn send_value(
        &mut self,
        i: usize,
        write: impl FnOnce(&mut Encoder<'_>) -> Result<(), object::Error>,
    ) {
        let mut buf = [0u8; 32];
        let len = frame::begin_result(&mut buf)
            .ok()
            .and_then(|mut e| {
                let mut enc = Encoder::new(e.payload_mut());
                write(&mut enc).ok()?;
                let n = enc.written();
                e.finish(n).ok()
            })
            .unwrap_or(0);
        self.send_frame(i, &buf[..len]);
    }

    fn send_error(&mut self, i: usize, code: ErrorCode) {
        let mut buf = [0u8; frame::ERROR_FRAME_LEN];
        if let Ok(len) = frame::emit_error(&mut buf, code) {
            self.send_frame(i, &buf[..len]);
        }
    }

    /// Sends a whole frame; a peer that cannot take it is closed once its
    /// backlog is written.
    fn send_frame(&mut self, i: usize, frame: &[u8]) {
        if self.bus.send(i, &[frame]).is_err() {
            self.bus.close_after_flush(i);
        }
    }

    /// The `stats` answer, built in `scratch`; its length (0 if too large).
    fn stats_frame(&mut self) -> usize {
        let s = self.spool.stats();
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let counters: [(&[u8], i64); 11] = [
            (b"published", as_i64(s.published)),
            (b"sent", as_i64(s.sent)),
            (b"resent", as_i64(s.resent)),
            (b"acked", as_i64(s.acked)),
            (b"spooled", as_i64(self.spool.len() as u64)),
            (b"spooled_bytes", as_i64(self.spool.bytes() as u64)),
            (b"evicted", as_i64(s.evicted)),
            (b"busy", as_i64(s.busy)),
            (b"dropped", as_i64(self.counters.dropped)),
            (b"received", as_i64(self.counters.received)),
            (b"reconnects", as_i64(self.counters.reconnects)),
        ];
        let links = &self.links;
        let router = &self.router;
        let inflight0 = self.spool.inflight();
        let Ok(mut e) = frame::begin_result(&mut self.scratch) else {
            return 0;
        };
        let encode = |buf: &mut [u8]| -> Option<usize> {
            let mut enc = Encoder::new(buf);
            enc.map(counters.len() + 1).ok()?;
            for (k, v) in counters {
                enc.key(k).ok()?.i64(v).ok()?;
            }
            enc.key(b"connections").ok()?.list(links.len()).ok()?;
            for (i, link) in links.iter().enumerate() {
                let subs = router.link_stats(i).map_or(0, |l| l.filters);
                let inflight = if i == PUBLISHING { inflight0 } else { 0 };
                enc.map(4).ok()?;
                enc.key(b"id").ok()?.buf(link.client_id().as_bytes()).ok()?;
                enc.key(b"connected").ok()?.bool(link.is_connected()).ok()?;
                enc.key(b"subscriptions")
                    .ok()?
                    .i64(as_i64(subs as u64))
                    .ok()?;
                enc.key(b"inflight")
                    .ok()?
                    .i64(as_i64(inflight as u64))
                    .ok()?;
            }
            Some(enc.written())
        };
        match encode(e.payload_mut()) {
            Some(n) => e.finish(n).unwrap_or(0),
            None => 0,
        }
    }
}
