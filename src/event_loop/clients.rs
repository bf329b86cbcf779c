//! Core bus clients: request frames to the service and its answers back,
//! subscription messages out. What a request means is the service's
//! (`crate::service`); this file only moves bytes between it and the bus
//! slots, and keeps each slot's `Mode` in the slot itself.
//!
//! A connection serves any number of call/notify requests in order
//! [bus-req-4]; the next request is read only once the previous answer has
//! been handed to the kernel, so a client that never reads its answers
//! stops being served instead of growing our memory. A subscribe is the
//! last request of its connection [bus-req-4.2].
//!
//! Slow subscribers [bus-iso-6]: a message frame goes straight to the
//! kernel's socket buffer, and what does not fit waits in the slot's
//! bounded backlog (`IOTCORED_BUS_CLIENT_TX`). A message that finds both
//! full is dropped for that subscriber alone and counted (`dropped`); a
//! subscriber that reads, however slowly, keeps its stream. Only one that
//! has taken nothing for `STALL_TIMEOUT` while output waits is
//! disconnected (logged), so it sees the end of its stream.

use super::EventLoop;
use crate::bus::frame::ErrorCode;
use crate::bus::server::{Input, Overdue, SendError, Server, PARTIAL_TIMEOUT, STALL_TIMEOUT};
use crate::consts;
use crate::mqtt::props::Props;
use crate::router::{Dest, Router, SubId, ENDPOINT_TIMEOUT};
use crate::service::params::Refusal;
use crate::service::{self, answer, Caller, Context, Counters, LinkState, Mode, Reply};
use crate::spool::Spool;
use crate::time::Instant;

/// How often every response endpoint is probed [bus-iso-4]: well within
/// `ENDPOINT_TIMEOUT`, so an endpoint gone for good is removed even when
/// no message comes for it.
const ENDPOINT_PROBE_EVERY: core::time::Duration = core::time::Duration::from_secs(20);

/// Requests handled for one client in one turn of the loop.
const FRAMES_PER_TURN: usize = 32;

/// The bus side of the loop: the slots, and the buffers answers and
/// messages are built in.
pub(super) struct Clients {
    pub(super) bus: Server<Mode>,
    /// Answers, and stream message frames (built once per incoming
    /// message for every subscriber).
    scratch: Box<[u8]>,
    /// The `iotcored_response` notify for endpoint subscribers.
    scratch_notify: Box<[u8]>,
    /// Either, with the MQTT 5 properties, for subscribers that asked.
    scratch_props: Box<[u8]>,
    /// Slots to close after a delivery, allocated once.
    to_close: Vec<usize>,
    /// Endpoint deliveries of one message (delivered or not), allocated once.
    endpoint_results: Vec<(SubId, bool)>,
    /// When the spool's evictions and refusals were last logged.
    spool_log_at: Option<Instant>,
    /// When the response endpoints are next probed.
    probe_at: Instant,
    /// Refused requests, logged with their reasons at a bounded rate.
    refusals: RefusalLines,
    /// A message too large for a subscriber's socket buffer was logged.
    warned_too_large: bool,
}

impl Clients {
    pub(super) fn new(bus: Server<Mode>) -> Self {
        let frame_room = consts::MQTT_MAX_PACKET + 256;
        Self {
            scratch: vec![0u8; frame_room.max(consts::BUS_MAX_FRAME)].into_boxed_slice(),
            scratch_notify: vec![0u8; frame_room].into_boxed_slice(),
            scratch_props: vec![0u8; frame_room].into_boxed_slice(),
            to_close: Vec::with_capacity(bus.capacity()),
            endpoint_results: Vec::with_capacity(consts::MAX_SUBSCRIPTIONS),
            spool_log_at: None,
            probe_at: Instant::default() + ENDPOINT_PROBE_EVERY,
            refusals: RefusalLines::default(),
            warned_too_large: false,
            bus,
        }
    }

    /// Whether slot `i` has input that can be handled now: input may be
    /// waiting, the slot wants it, and (for requests) the previous answer
    /// has left the backlog.
    fn ready(&self, i: usize) -> bool {
        let slot = self.bus.slot(i);
        slot.is_open() && slot.has_input() && self.may_read(i)
    }

    /// Whether slot `i`'s mode lets it read now: not while a subscribe call
    /// waits, and for requests not before the previous answer has left.
    fn may_read(&self, i: usize) -> bool {
        let slot = self.bus.slot(i);
        let mode = slot.state();
        mode.wants_input() && !(mode.serves_requests() && (slot.has_backlog() || slot.is_closing()))
    }

    /// When a slot next needs attention: an oversized frame's discard
    /// ending, a closing slot's linger, or input ready now.
    pub(super) fn deadline(&self, now: Instant) -> Option<Instant> {
        let slots = (0..self.bus.capacity())
            .flat_map(|i| {
                let slot = self.bus.slot(i);
                let ready = self.ready(i).then_some(now);
                [
                    slot.discard_deadline(),
                    slot.linger_deadline(),
                    slot.partial_deadline(),
                    slot.stall_deadline(),
                    ready,
                ]
            })
            .flatten()
            .min();
        Some(slots.map_or(self.probe_at, |d| d.min(self.probe_at)))
    }

    /// Probes every response endpoint when due: one gone for
    /// `ENDPOINT_TIMEOUT` loses its subscription [bus-iso-4]. Returns
    /// whether one did (the router owes the broker an UNSUBSCRIBE).
    fn probe_endpoints(&mut self, router: &mut Router, now: Instant) -> bool {
        if now < self.probe_at {
            return false;
        }
        let mut removed = false;
        self.probe_at = now + ENDPOINT_PROBE_EVERY;
        for slot in 0..consts::MAX_SUBSCRIPTIONS {
            let Some((id, name)) = router.endpoint_at(slot) else {
                continue;
            };
            // Fits: a router endpoint name is at most as long.
            let name: heapless::String<{ crate::bus::MAX_INTERFACE_NAME_LEN }> =
                heapless::String::try_from(name).unwrap_or_default();
            let reached = self.bus.endpoint_reachable(&name);
            if router.endpoint_reached(id, reached, now) {
                removed = true;
                log::warn!(
                    "bus: response endpoint {name} unreachable for {} s; subscription removed",
                    ENDPOINT_TIMEOUT.as_secs()
                );
            }
        }
        removed
    }

    /// Writes `reply`'s answer (in `scratch`) to slot `i` and puts the
    /// slot in the reply's mode.
    fn apply(&mut self, i: usize, reply: &Reply) {
        if reply.len > 0 {
            let answer = self.scratch.get(..reply.len).unwrap_or_default();
            if self.bus.send(i, &[answer]).is_err() {
                self.bus.close_after_flush(i);
            }
        }
        self.bus.set_state(i, reply.mode);
        if reply.mode.ignores_input() {
            self.bus.ignore_input(i);
        }
        if reply.close {
            self.bus.close_after_flush(i);
        }
    }

    /// Closes slot `i` and ends whatever subscription it streamed.
    fn close(&mut self, router: &mut Router, i: usize) {
        let slot = self.bus.slot(i);
        if slot.state().streams() {
            if let Ok(client) = u16::try_from(i) {
                router.remove_stream(client, slot.generation());
            }
        }
        self.bus.close(i);
    }

    /// Writes slot `i`'s backlog; closes it if it is done or failed.
    fn flush(&mut self, router: &mut Router, i: usize) {
        if self.bus.flush(i) {
            self.close(router, i);
        }
    }

    /// Delivers one incoming message to every matching local subscription:
    /// the frame is built once and written to each subscriber. Returns how
    /// many deliveries were lost.
    ///
    /// A response endpoint gets a connection of its own for each message,
    /// closed once the notify is written: GGL's servers close a connection
    /// after one notify, so a reused connection would lose what follows it.
    pub(super) fn deliver(
        &mut self,
        router: &mut Router,
        topic: &str,
        payload: &[u8],
        properties: Option<Props<'_>>,
        subscription_ids: &[u32],
        now: Instant,
    ) -> u64 {
        let Clients {
            bus,
            scratch,
            scratch_notify,
            scratch_props,
            to_close,
            endpoint_results,
            warned_too_large,
            ..
        } = self;
        to_close.clear();
        endpoint_results.clear();
        let mut dropped = 0;
        // Each form is built once, when a subscriber first needs it: the
        // message, the notify, and either with the MQTT 5 properties for
        // the subscribers that asked for them (built in turn in
        // `scratch_props`, so rebuilt if both are needed).
        let mut message_len = None;
        let mut notify_len = None;
        let mut props_form: Option<(bool, usize)> = None;
        router.route_copy(
            topic,
            subscription_ids,
            |id, dest, wants_props| match dest {
                Dest::Stream { client, generation } => {
                    let i = usize::from(*client);
                    if i >= bus.capacity() || bus.slot(i).generation() != *generation {
                        return;
                    }
                    let (buf, len) = if let Some(p) = properties.as_ref().filter(|_| wants_props) {
                        let len =
                            props_frame(scratch_props, &mut props_form, false, topic, payload, p);
                        (&scratch_props[..], len)
                    } else {
                        let len = *message_len
                            .get_or_insert_with(|| answer::message(scratch, topic, payload, None));
                        (&scratch[..], len)
                    };
                    let Some(frame) = buf.get(..len).filter(|f| !f.is_empty()) else {
                        dropped += 1;
                        return;
                    };
                    match bus.send(i, &[frame]) {
                        Ok(()) => {}
                        // Its backlog is full: this message is lost for this
                        // subscriber alone [bus-iso-6]. One that reads goes on;
                        // one that stopped is closed by `drive_pending_clients`.
                        Err(SendError::Full) => {
                            dropped += 1;
                            log::debug!(
                                "bus: subscriber in slot {i} is behind; message dropped for it"
                            );
                        }
                        Err(SendError::Closed) => {
                            dropped += 1;
                            to_close.push(i);
                        }
                        Err(SendError::TooLarge(size)) => {
                            dropped += 1;
                            if !*warned_too_large {
                                *warned_too_large = true;
                                log::warn!(
                                    "bus: a {}-byte message cannot fit a subscriber's socket \
                                     buffer ({size} bytes) and is dropped for it; raise \
                                     net.core.wmem_default or build with a smaller \
                                     IOTCORED_MQTT_MAX_PACKET (logged once)",
                                    frame.len()
                                );
                            }
                        }
                    }
                }
                Dest::Endpoint(name) => {
                    let (buf, len) = if let Some(p) = properties.as_ref().filter(|_| wants_props) {
                        let len =
                            props_frame(scratch_props, &mut props_form, true, topic, payload, p);
                        (&scratch_props[..], len)
                    } else {
                        let len = *notify_len.get_or_insert_with(|| {
                            answer::notify(scratch_notify, topic, payload, None)
                        });
                        (&scratch_notify[..], len)
                    };
                    let Some(frame) = buf.get(..len).filter(|f| !f.is_empty()) else {
                        dropped += 1;
                        return;
                    };
                    let sent = match bus.connect_endpoint(name) {
                        Ok(i) => {
                            bus.set_state(i, Mode::Outbound);
                            bus.ignore_input(i);
                            // A full or too small buffer: the endpoint is there.
                            let sent = bus
                                .send(i, &[frame])
                                .map_err(|e| (e != SendError::Closed, format!("{e:?}")));
                            bus.close_after_flush(i);
                            if bus.flush(i) {
                                to_close.push(i);
                            }
                            sent
                        }
                        // The endpoint's listen backlog is full (a burst faster
                        // than it accepts): this message is lost, but the
                        // endpoint is there, so it does not count towards
                        // removing it.
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            Err((true, "its listen backlog is full".into()))
                        }
                        Err(e) => Err((false, e.to_string())),
                    };
                    match sent {
                        Ok(()) => endpoint_results.push((id, true)),
                        Err((busy, e)) => {
                            dropped += 1;
                            log::warn!(
                            "bus: cannot deliver to response endpoint {name}: {e}; message dropped"
                        );
                            if !busy {
                                endpoint_results.push((id, false));
                            }
                        }
                    }
                }
            },
        );
        for &(id, delivered) in endpoint_results.iter() {
            if router.endpoint_reached(id, delivered, now) {
                log::warn!(
                    "bus: a response endpoint unreachable for {} s; subscription removed",
                    ENDPOINT_TIMEOUT.as_secs()
                );
            }
        }
        for k in 0..self.to_close.len() {
            let i = self.to_close[k];
            self.close(router, i);
        }
        dropped
    }

    /// Answers every subscription the router settled; returns how many
    /// refusals had nobody to tell (counted as dropped).
    pub(super) fn settle(&mut self, router: &mut Router) -> u64 {
        let mut dropped = 0;
        while let Some(s) = router.take_settled() {
            let waiting = match s.dest {
                Dest::Stream { client, generation } => {
                    let i = usize::from(client);
                    (i < self.bus.capacity() && self.bus.slot(i).generation() == generation)
                        .then_some(i)
                }
                // The slot whose `subscribe` call waits for this one.
                Dest::Endpoint(_) => (0..self.bus.capacity())
                    .find(|&i| self.bus.slot(i).state() == Mode::AwaitCall(s.id)),
            };
            let mode = waiting.map(|i| (i, self.bus.slot(i).state()));
            let Some(reply) = service::settled(&s, mode, &mut self.scratch) else {
                continue;
            };
            dropped += u64::from(reply.dropped);
            let Some(i) = waiting else {
                continue;
            };
            self.apply(i, &reply);
            // A stream is flushed now; a call's slot goes on serving its
            // pipelined requests from the loop (`drive_pending_clients`),
            // not from here: settling inside a request must not recurse.
            if matches!(s.dest, Dest::Stream { .. }) {
                self.flush(router, i);
            }
        }
        dropped
    }

    /// Answers every call whose slot waits in a mode `waits_on` picks
    /// [bus-confirm-1]: null, or the error `code`; the slot then serves
    /// its pipelined requests again (from the loop).
    pub(super) fn answer_waiting(
        &mut self,
        router: &mut Router,
        waits_on: impl Fn(Mode) -> bool,
        code: Option<ErrorCode>,
    ) {
        for i in 0..self.bus.capacity() {
            if self.bus.slot(i).is_open() && waits_on(self.bus.slot(i).state()) {
                let len = match code {
                    Some(code) => answer::error(&mut self.scratch, code),
                    None => answer::null(&mut self.scratch),
                };
                self.apply(i, &Reply::answer(len, Mode::Requests));
                self.flush(router, i);
            }
        }
    }

    /// Tells every `connection_status` subscriber the new state.
    pub(super) fn notify_status(&mut self, router: &mut Router, connected: bool) {
        for i in 0..self.bus.capacity() {
            if self.bus.slot(i).state() == Mode::Status {
                let len = answer::bool(&mut self.scratch, connected);
                self.apply(i, &Reply::answer(len, Mode::Status));
                self.flush(router, i);
            }
        }
    }

    /// Logs, at most once a second, that the spool is full and what it cost.
    fn log_spool_pressure(&mut self, spool: &Spool, now: Instant) {
        let quiet = self
            .spool_log_at
            .is_some_and(|t| now.saturating_since(t).as_secs() < 1);
        if quiet {
            return;
        }
        self.spool_log_at = Some(now);
        let s = spool.stats();
        log::warn!(
            "outgoing queue full ({} messages, {} bytes): {} QoS 0 evicted, {} publishes refused BUSY so far",
            spool.len(),
            spool.bytes(),
            s.evicted,
            s.busy
        );
    }
}

impl EventLoop {
    /// Accepts new bus connections.
    pub(super) fn accept_clients(&mut self, now: Instant) {
        loop {
            // A connection serving requests with none in progress holds
            // nothing: it may make room for a new one [bus-iso-3].
            let filled = self.clients.bus.accept(now, Mode::serves_requests);
            let more = filled.is_full();
            for i in filled {
                self.drive_client(i, now);
            }
            if !more {
                break;
            }
        }
    }

    /// Serves slots that still have input buffered (pipelined requests that
    /// waited for an earlier answer), ends overdue discards, and closes
    /// slots whose peer has not taken their last bytes in time.
    /// Returns whether the router or the spool may have changed (a probe
    /// removed an endpoint's subscription, requests were served): the
    /// caller then pumps before the loop sleeps.
    pub(super) fn drive_pending_clients(&mut self, now: Instant) -> bool {
        let mut changed = self.clients.probe_endpoints(&mut self.router, now);
        for i in 0..self.clients.bus.capacity() {
            if !self.clients.may_read(i) {
                // Not read by our choice (an answer awaited, or one not
                // yet taken): part of a frame held meanwhile is not late.
                self.clients.bus.hold_partial(i, now);
            }
            if let Some(why) = self.clients.bus.overdue(i, now) {
                let pid = self.clients.bus.pid(i);
                match why {
                    Overdue::Linger => log::debug!("bus: slot {i}: peer not reading; closed"),
                    Overdue::Stall => log::warn!(
                        "bus: slot {i} (pid {pid}): read nothing for {} s with messages waiting; disconnected",
                        STALL_TIMEOUT.as_secs()
                    ),
                    Overdue::Partial => log::info!(
                        "bus: slot {i} (pid {pid}): part of a frame held for {} s; closed",
                        PARTIAL_TIMEOUT.as_secs()
                    ),
                }
                self.clients.close(&mut self.router, i);
                continue;
            }
            let discarding = self
                .clients
                .bus
                .slot(i)
                .discard_deadline()
                .is_some_and(|d| now >= d);
            if discarding || self.clients.ready(i) {
                self.drive_client(i, now);
                // Requests served here (pipelined behind an answer that
                // waited) may have queued publishes or subscriptions.
                changed = true;
            }
        }
        changed
    }

    /// Reads, handles and answers what slot `i` has, as far as it can.
    pub(super) fn drive_client(&mut self, i: usize, now: Instant) {
        if !self.clients.bus.slot(i).is_open() {
            return;
        }
        if self.clients.bus.flush(i) {
            self.clients.close(&mut self.router, i);
            return;
        }
        // A bounded turn: a client that pipelines without pause must not
        // keep the loop from its timers (paced sends, keepalive) or from
        // other clients; what is left is served on the next turn.
        for _ in 0..FRAMES_PER_TURN {
            if !self.clients.may_read(i) {
                break;
            }
            let mode = self.clients.bus.slot(i).state();
            match self.clients.bus.read(i, now) {
                Input::Frame(n) if mode.serves_requests() => self.handle_frame(i, n, now),
                Input::Frame(n) => self.clients.bus.consume(i, n, now),
                Input::Idle => break,
                Input::Malformed(code) => {
                    let why = if code == ErrorCode::NoMem {
                        "the frame is larger than this daemon's bus frame limit (IOTCORED_BUS_MAX_FRAME)"
                    } else {
                        "malformed frame (a bad length or CRC, or the connection ended mid-frame)"
                    };
                    let pid = self.clients.bus.pid(i);
                    let refusal = Refusal::new(code, why);
                    self.clients.refusals.log(now, i, pid, "request", &refusal);
                    let len = answer::error(&mut self.clients.scratch, code);
                    let reply = Reply {
                        close: true,
                        ..Reply::answer(len, Mode::Requests)
                    };
                    self.clients.apply(i, &reply);
                    break;
                }
                Input::Closed => {
                    self.clients.close(&mut self.router, i);
                    return;
                }
            }
        }
        self.clients.flush(&mut self.router, i);
    }

    /// Hands one request frame to the service and applies its reply.
    fn handle_frame(&mut self, i: usize, n: usize, now: Instant) {
        let reply = {
            // `take`: the table has MAX_CONNECTIONS links, so collecting
            // cannot overflow (heapless would panic).
            let links: heapless::Vec<LinkState<'_>, { consts::MAX_CONNECTIONS }> = self
                .links
                .iter()
                .take(consts::MAX_CONNECTIONS)
                .map(|l| LinkState {
                    id: l.client_id(),
                    connected: l.is_connected(),
                    last_disconnect: l.last_disconnect(),
                })
                .collect();
            let mut ctx = Context {
                spool: &mut self.spool,
                router: &mut self.router,
                links: &links,
                counters: Counters {
                    expired: self.disk.as_ref().map_or(0, |d| d.expired),
                    ..self.counters
                },
                now,
                endpoint_reachable: &|name| self.clients.bus.endpoint_reachable(name),
                store: self
                    .disk
                    .as_mut()
                    .map(|d| d as &mut dyn crate::service::Store),
                version: self.config.mqtt,
                broker: self.broker,
            };
            let slot = self.clients.bus.slot(i);
            // Asked only by a request that needs it (publish, subscribe),
            // once per connection.
            let pid = || slot.peer_pid();
            let caller = Caller {
                slot: i,
                generation: slot.generation(),
                pid: &pid,
            };
            service::handle(slot.frame(n), caller, &mut ctx, &mut self.clients.scratch)
        };
        self.clients.bus.consume(i, n, now);
        if let Some((method, refusal)) = reply.refused {
            let pid = self.clients.bus.pid(i);
            self.clients.refusals.log(now, i, pid, method, &refusal);
        }
        if reply.evicted > 0 || reply.busy {
            self.clients.log_spool_pressure(&self.spool, now);
        }
        self.counters.dropped += u64::from(reply.dropped);
        self.clients.apply(i, &reply);
        // A subscribe may be settled at once (offline, virtual, or filters
        // already granted): answer it now. The queue is empty otherwise.
        self.settle_subscriptions();
    }

    /// Answers every subscription the router settled.
    pub(super) fn settle_subscriptions(&mut self) {
        self.counters.dropped += self.clients.settle(&mut self.router);
    }

    /// Tells every `connection_status` subscriber the new state.
    pub(super) fn notify_status(&mut self, connected: bool) {
        self.clients.notify_status(&mut self.router, connected);
    }
}

/// Most refusals logged in one second; the rest are counted, and the
/// count is said on the next line.
const REFUSAL_LINES_PER_SEC: u32 = 5;

/// The INFO lines of refused requests, each with its reason: a client
/// that repeats a bad request cannot flood the log.
#[derive(Default)]
struct RefusalLines {
    /// The start of the current second, and the lines logged in it.
    second: Option<(Instant, u32)>,
    /// Refusals not logged since the last line.
    unlogged: u64,
}

impl RefusalLines {
    fn log(&mut self, now: Instant, slot: usize, pid: u32, method: &str, refusal: &Refusal) {
        let lines = match self.second {
            Some((start, lines)) if now.saturating_since(start).as_secs() < 1 => lines,
            _ => 0,
        };
        if lines >= REFUSAL_LINES_PER_SEC {
            self.unlogged += 1;
            return;
        }
        let start = self.second.filter(|_| lines > 0).map_or(now, |(t, _)| t);
        self.second = Some((start, lines + 1));
        let unlogged = core::mem::take(&mut self.unlogged);
        if unlogged > 0 {
            log::info!(
                "bus: pid {pid} (slot {slot}): {method} refused, {}: {refusal} ({unlogged} earlier refusals not logged)",
                refusal.code.name()
            );
        } else {
            log::info!(
                "bus: pid {pid} (slot {slot}): {method} refused, {}: {refusal}",
                refusal.code.name()
            );
        }
    }
}

/// A message frame with the MQTT 5 properties (`notify`: the endpoint's
/// notify, else the stream's message) in `buf`; built only if `built`
/// says `buf` holds something else.
fn props_frame(
    buf: &mut [u8],
    built: &mut Option<(bool, usize)>,
    notify: bool,
    topic: &str,
    payload: &[u8],
    props: &Props<'_>,
) -> usize {
    match *built {
        Some((form, len)) if form == notify => len,
        _ => {
            let len = if notify {
                answer::notify(buf, topic, payload, Some(props))
            } else {
                answer::message(buf, topic, payload, Some(props))
            };
            *built = Some((notify, len));
            len
        }
    }
}
