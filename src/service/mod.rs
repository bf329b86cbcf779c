//! The `aws_iot_mqtt` interface as a sans-I/O core: one request frame in,
//! the answer bytes and the effects on the spool and the router out. The
//! event loop only moves bytes: it hands `handle` a complete frame, writes
//! the answer it gets back, and puts the connection in the mode the reply
//! names. Subscriptions answer later, when the router settles them
//! (`settled`).
//!
//! core-bus.md sections 3 and 6: [bus-req-1..5], [bus-err-1] (a malformed
//! request gets its code, then the connection closes), [bus-err-3] (a
//! well-formed request that fails gets its code and the connection stays),
//! [bus-req-4.1] (a notify is never answered), [bus-req-4.2] (a subscribe
//! is the last request of its connection).

pub mod answer;
pub mod params;

pub use params::{Method, Publish, Subscribe, Unsubscribe, MAX_PAYLOAD};

use crate::bus::frame::{self, ErrorCode, RequestType};
use crate::bus::object;
use crate::mqtt::packet::{QoS, Version};
use crate::mqtt::props::{Builder, Props};
use crate::mqtt::session::Limits;
use crate::router::{Dest, Outcome, Router, Settled, SubId};
use crate::spool::{Message, PushError, Spool};
use crate::time::Instant;
use params::{Confirm, Refusal};

/// BUSY for a full spool: the caller should try again later.
const QUEUE_FULL: Refusal = Refusal::new(
    ErrorCode::Busy,
    "the outgoing queue is full of unsent messages; try again later",
);

/// The publishing connection: every PUBLISH goes over connection 0 (the
/// bare client id), so publishes leave in the order they were accepted,
/// and its state is what `connection_status` reports. Connections above it
/// carry only subscriptions.
pub const PUBLISHING: usize = 0;

/// What a bus connection is doing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Serving requests, answers in request order [bus-req-4].
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
    /// A `publish` call with `confirm: stored` waits until disk-spool
    /// record `seq` is synced; later requests wait behind it.
    AwaitStored(u64),
    /// A `publish` call with `confirm: acked` waits for the PUBACK of the
    /// spool's message with this ticket; later requests wait behind it.
    AwaitAcked(u64),
}

impl Mode {
    /// Whether reading the connection's input is useful now.
    pub fn wants_input(self) -> bool {
        !matches!(
            self,
            Mode::AwaitCall(_) | Mode::AwaitStored(_) | Mode::AwaitAcked(_)
        )
    }

    /// Whether the connection's input is requests, to be handled in order.
    pub fn serves_requests(self) -> bool {
        self == Mode::Requests
    }

    /// Whether closing the connection ends a streamed subscription.
    pub fn streams(self) -> bool {
        matches!(self, Mode::Stream(_) | Mode::AwaitStream(_))
    }

    /// Whether further input is read and thrown away [bus-req-4.2].
    pub fn ignores_input(self) -> bool {
        matches!(
            self,
            Mode::AwaitStream(_) | Mode::Stream(_) | Mode::Status | Mode::Outbound
        )
    }
}

/// The connection a request came on.
#[derive(Clone, Copy)]
pub struct Caller<'a> {
    /// Its bus slot.
    pub slot: usize,
    /// The slot's generation (a stream subscription names both).
    pub generation: u32,
    /// The peer's pid, for the per-process quotas and publish lanes (0:
    /// unknown): asked only by the requests those apply to, as it costs
    /// the loop a call to the kernel (once per connection).
    pub pid: &'a dyn Fn() -> u32,
}

/// The loop's own counters, for `stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Messages lost other than by spool eviction or BUSY: failed notifies,
    /// slow subscribers, unreachable response endpoints.
    pub dropped: u64,
    /// PUBLISH packets received from the broker.
    pub received: u64,
    /// Connections re-established after a loss.
    pub reconnects: u64,
    /// Stored messages found expired when loaded from the disk spool (the
    /// memory spool counts its own).
    pub expired: u64,
}

/// One connection as the loop sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkState<'a> {
    /// Its client id.
    pub id: &'a str,
    /// Whether its CONNACK was accepted.
    pub connected: bool,
    /// Why it last went down; empty if it never did.
    pub last_disconnect: &'a str,
}

/// What a request may read and change.
pub struct Context<'a> {
    /// The outgoing queue `publish` adds to.
    pub spool: &'a mut Spool,
    /// The subscriptions `subscribe` and `unsubscribe` change.
    pub router: &'a mut Router,
    /// Every connection, `PUBLISHING` first.
    pub links: &'a [LinkState<'a>],
    /// The loop's counters.
    pub counters: Counters,
    /// The loop's clock, read once for the request.
    pub now: Instant,
    /// Whether a bus interface (a `response_endpoint`) accepts
    /// connections now: the loop's probe.
    pub endpoint_reachable: &'a dyn Fn(&str) -> bool,
    /// The disk spool, if there is one: QoS 1 publishes are stored there
    /// before they are answered [spool-3].
    pub store: Option<&'a mut dyn Store>,
    /// The protocol of the connections.
    pub version: Version,
    /// What the broker's last CONNACK on the publishing connection allows
    /// [mqtt5-4] (the defaults before the first).
    pub broker: Limits,
}

/// Where QoS 1 messages are kept across the end of the process (the
/// loop's disk spool).
pub trait Store {
    /// Stores a message that stops being worth sending `expiry` seconds
    /// from now (if given); its record's number, or `None` when there is
    /// no room (or the disk failed, which the store logs).
    fn append(&mut self, pid: u32, m: &Message<'_>, expiry: Option<u32>) -> Option<u64>;
    /// The message of record `seq` is done with (0: none).
    fn release(&mut self, seq: u64);
    /// A call waits for the next sync: make it soon.
    fn sync_soon(&mut self);
    /// Whether stored messages wait on disk only, for room in the memory
    /// spool: new ones then go behind them, on disk only too.
    fn backlogged(&self) -> bool;
    /// The memory spool has no room for record `seq`, just stored: it
    /// waits on disk, to be queued in order as room frees.
    fn keep_on_disk(&mut self, seq: u64);
    /// Messages stored now, the file's bytes in use, and damaged records
    /// skipped since start-up (the `stats` keys `stored`, `stored_bytes`,
    /// `corrupt`).
    fn stats(&self) -> (u64, u64, u64);
}

/// What handling one request calls for. The answer, if any, is the first
/// `len` bytes of the caller's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    /// Answer bytes to write (0: none).
    pub len: usize,
    /// The connection's mode from now on.
    pub mode: Mode,
    /// Close the connection once the answer is written [bus-err-1].
    pub close: bool,
    /// A notify failed: nobody hears of it, so it counts as dropped
    /// [bus-req-4.1].
    pub dropped: bool,
    /// Queued QoS 0 messages evicted to make room for this publish.
    pub evicted: usize,
    /// The publish was refused because the spool is full of QoS 1.
    pub busy: bool,
    /// A request refused: its method, and why (for the log; the answer
    /// carries only the code).
    pub refused: Option<(&'static str, Refusal)>,
}

impl Reply {
    /// `len` answer bytes, then `mode`.
    pub fn answer(len: usize, mode: Mode) -> Self {
        Self {
            len,
            mode,
            close: false,
            dropped: false,
            evicted: 0,
            busy: false,
            refused: None,
        }
    }

    /// A malformed request: its code, then close [bus-err-1].
    fn fatal(out: &mut [u8], refusal: Refusal) -> Self {
        Self {
            close: true,
            refused: Some(("request", refusal)),
            ..Self::answer(answer::error(out, refusal.code), Mode::Requests)
        }
    }
}

/// Handles one complete request frame from `caller`, writing the answer
/// into `out` (which must hold a `stats` answer: the loop's scratch).
pub fn handle(bytes: &[u8], caller: Caller<'_>, ctx: &mut Context<'_>, out: &mut [u8]) -> Reply {
    let slot = caller.slot;
    let request = match frame::parse(bytes).and_then(|f| f.request()) {
        Ok(r) => r,
        Err(e) => {
            let why = Refusal {
                code: e.code(),
                why: params::Why::Frame(e),
            };
            return Reply::fatal(out, why);
        }
    };
    let params = match object::parse_params(request.payload) {
        Ok(p) => p,
        Err(e) => {
            let why = Refusal {
                code: e.code(),
                why: params::Why::Object(e),
            };
            return Reply::fatal(out, why);
        }
    };
    let notify = request.kind == RequestType::Notify;
    // Success: `answer` for a call, nothing for a notify.
    let done = |out: &mut [u8], answer: fn(&mut [u8]) -> usize| {
        Reply::answer(if notify { 0 } else { answer(out) }, Mode::Requests)
    };
    // A refusal: the code for a call; a notify's is only logged and counted.
    let method = Method::from_name(request.method);
    let refuse = |out: &mut [u8], refusal: Refusal| {
        let reply = if notify {
            Reply {
                dropped: true,
                ..Reply::answer(0, Mode::Requests)
            }
        } else {
            Reply::answer(answer::error(out, refusal.code), Mode::Requests)
        };
        Reply {
            refused: Some((method.map_or("request", Method::name), refusal)),
            ..reply
        }
    };
    let Some(method) = method else {
        return refuse(
            out,
            Refusal::new(
                ErrorCode::NoEntry,
                "unknown method (publish, subscribe, unsubscribe, connection_status, stats)",
            ),
        );
    };
    // `null` is no value, for this check as for the parameters.
    let has_endpoint = !matches!(
        params.get(b"response_endpoint"),
        None | Some(object::Object::Null)
    );
    if !method.accepts(request.kind, has_endpoint) {
        return refuse(
            out,
            Refusal::invalid("wrong request type for the method (call, notify or subscribe)"),
        );
    }
    match method {
        Method::Publish => {
            let p = match params::publish(&params) {
                Ok(p) => p,
                Err(refusal) => return refuse(out, refusal),
            };
            // What the broker said it does not take [mqtt5-4].
            if p.qos == QoS::AtLeastOnce && ctx.broker.maximum_qos == QoS::AtMostOnce {
                return refuse(
                    out,
                    Refusal::new(ErrorCode::Unsupported, "the broker takes qos 0 only"),
                );
            }
            if p.retain && !ctx.broker.retain_available {
                return refuse(
                    out,
                    Refusal::new(
                        ErrorCode::Unsupported,
                        "the broker takes no retained messages",
                    ),
                );
            }
            // MQTT 5 properties, encoded once here; 3.1.1 sends none
            // [mqtt5-5].
            let mut block = Builder::<{ params::MAX_PROPERTIES }>::new();
            if ctx.version == Version::V5 {
                if let Err(refusal) = p.properties.encode(&mut block) {
                    return refuse(out, refusal);
                }
            }
            let message = Message {
                topic: p.topic,
                payload: p.payload,
                qos: p.qos,
                retain: p.retain,
                properties: Props::trusted(block.props().bytes()),
                expires: p
                    .expiry
                    .map(|s| ctx.now + core::time::Duration::from_secs(u64::from(s))),
            };
            let len = ctx.spool.encoded_len(&message);
            if len > ctx.broker.max_packet() {
                return refuse(
                    out,
                    Refusal::long(
                        "the MQTT packet",
                        len,
                        ctx.broker.max_packet(),
                        "the broker's Maximum Packet Size",
                    ),
                );
            }
            // Each process queues in a lane of its own [bus-iso-5]. Into an
            // empty spool the message leaves first whatever its lane: no
            // need to ask the kernel whose it is.
            let pid = if ctx.spool.is_empty() {
                0
            } else {
                (caller.pid)()
            };
            // With a disk spool, a QoS 1 message is stored before it is
            // answered, and stays stored until it is acknowledged.
            // A notify is never answered, whatever it asks [bus-confirm-1].
            let confirm = if notify { Confirm::Queued } else { p.confirm };
            if confirm == Confirm::Stored && ctx.store.is_none() {
                return refuse(
                    out,
                    Refusal::new(
                        ErrorCode::Unsupported,
                        "confirm \"stored\" needs a disk spool (--spool-dir)",
                    ),
                );
            }
            let mut stored = 0;
            if let (Some(store), QoS::AtLeastOnce) = (ctx.store.as_deref_mut(), p.qos) {
                let backlogged = store.backlogged();
                if backlogged && confirm == Confirm::Acked {
                    // Not in memory, it has no ticket to wait on yet.
                    return Reply {
                        busy: true,
                        ..refuse(out, QUEUE_FULL)
                    };
                }
                match store.append(pid, &message, p.expiry) {
                    Some(seq) => stored = seq,
                    None => {
                        return Reply {
                            busy: true,
                            ..refuse(
                                out,
                                Refusal::new(
                                    ErrorCode::Busy,
                                    "the disk spool is full; try again later",
                                ),
                            )
                        }
                    }
                }
                let room = ctx.spool.fits(&message);
                if backlogged || (!room && confirm != Confirm::Acked) {
                    // Behind the stored ones, or for want of room in memory:
                    // on disk only, answered [spool-6].
                    store.keep_on_disk(stored);
                    return stored_answer(out, confirm, stored, store, done);
                }
            }
            let pushed = ctx.spool.push_message(ctx.now, pid, &message);
            if pushed.is_ok() {
                ctx.spool.store_last(stored);
            } else if let Some(store) = ctx.store.as_deref_mut() {
                store.release(stored);
            }
            match pushed {
                Ok(pushed) => {
                    // The answer waits for the sync, or the PUBACK.
                    let wait = match confirm {
                        Confirm::Queued => None,
                        Confirm::Stored => {
                            if let Some(store) = ctx.store.as_deref_mut() {
                                store.sync_soon();
                            }
                            Some(Mode::AwaitStored(stored))
                        }
                        Confirm::Acked => Some(Mode::AwaitAcked(ctx.spool.last_ticket())),
                    };
                    let reply = match wait {
                        Some(mode) => Reply::answer(0, mode),
                        None => done(out, answer::null),
                    };
                    Reply {
                        evicted: pushed.evicted,
                        ..reply
                    }
                }
                Err(PushError::Busy) => Reply {
                    busy: true,
                    ..refuse(out, QUEUE_FULL)
                },
                Err(PushError::TooLong) => refuse(
                    out,
                    Refusal::new(
                        ErrorCode::Range,
                        "the message is larger than the whole spool",
                    ),
                ),
            }
        }
        Method::Subscribe => {
            let s = match params::subscribe(&params) {
                Ok(s) => s,
                Err(refusal) => return refuse(out, refusal),
            };
            let dest = match s.endpoint {
                // [bus-iso-4] An endpoint nobody serves would only cost
                // dropped messages and a table slot: refused at once.
                Some(name) if !(ctx.endpoint_reachable)(name) => {
                    return refuse(
                        out,
                        Refusal::new(
                            ErrorCode::NoEntry,
                            "nobody serves the response_endpoint's socket",
                        ),
                    );
                }
                Some(name) => match Dest::endpoint(name) {
                    Some(d) => d,
                    None => {
                        return refuse(
                            out,
                            Refusal::invalid("response_endpoint is not an interface name"),
                        )
                    }
                },
                None => Dest::Stream {
                    client: u16::try_from(slot).unwrap_or(u16::MAX),
                    generation: caller.generation,
                },
            };
            let made =
                ctx.router
                    .subscribe_for((caller.pid)(), dest, &s.filters, s.qos, s.virtual_only);
            if let Ok(id) = made {
                ctx.router.set_properties(id, s.properties);
            }
            match made {
                // The answer comes when the router settles it; a notify
                // subscribe is never answered, so its connection goes on.
                Ok(id) if s.endpoint.is_none() => Reply::answer(0, Mode::AwaitStream(id)),
                Ok(_) if notify => Reply::answer(0, Mode::Requests),
                Ok(id) => Reply::answer(0, Mode::AwaitCall(id)),
                Err(e) => refuse(out, Refusal::subscribe(e)),
            }
        }
        Method::Unsubscribe => {
            let u = match params::unsubscribe(&params) {
                Ok(u) => u,
                Err(refusal) => return refuse(out, refusal),
            };
            match ctx.router.find_endpoint(u.endpoint, &u.filters) {
                Some(id) => {
                    ctx.router.unsubscribe(id);
                    done(out, answer::null)
                }
                None => refuse(
                    out,
                    Refusal::new(
                        ErrorCode::NoEntry,
                        "no subscription with these filters for this response_endpoint",
                    ),
                ),
            }
        }
        Method::ConnectionStatus => {
            // `accepted`, then the current state [core-bus.md section 6].
            let connected = ctx.links.get(PUBLISHING).is_some_and(|l| l.connected);
            let first = answer::accepted(out);
            let second = out
                .get_mut(first..)
                .map_or(0, |rest| answer::bool(rest, connected));
            Reply::answer(first + second, Mode::Status)
        }
        Method::Stats if notify => Reply::answer(0, Mode::Requests),
        Method::Stats => {
            let len = stats(ctx, out);
            if len == 0 {
                Reply::answer(answer::error(out, ErrorCode::NoMem), Mode::Requests)
            } else {
                Reply::answer(len, Mode::Requests)
            }
        }
    }
}

/// The `stats` answer; its length (0 if it does not fit).
fn stats(ctx: &Context<'_>, out: &mut [u8]) -> usize {
    let mut links =
        heapless::Vec::<answer::LinkStats<'_>, { crate::consts::MAX_CONNECTIONS }>::new();
    for (i, link) in ctx.links.iter().enumerate() {
        let entry = answer::LinkStats {
            id: link.id,
            connected: link.connected,
            subscriptions: ctx.router.link_stats(i).map_or(0, |l| l.filters),
            inflight: if i == PUBLISHING {
                ctx.spool.inflight()
            } else {
                0
            },
        };
        if links.push(entry).is_err() {
            break;
        }
    }
    answer::stats(
        out,
        &answer::Stats {
            spool: ctx.spool.stats(),
            spooled: ctx.spool.len(),
            spooled_bytes: ctx.spool.bytes(),
            dropped: ctx.counters.dropped,
            received: ctx.counters.received,
            reconnects: ctx.counters.reconnects,
            links: &links,
            expired: ctx.spool.stats().expired + ctx.counters.expired,
            rejected: ctx.spool.stats().rejected,
            quarantined: ctx.spool.stats().quarantined + ctx.router.quarantined(),
            oldest_ms: u64::try_from(ctx.spool.oldest_age(ctx.now).as_millis()).unwrap_or(u64::MAX),
            stored: ctx.store.as_deref().map_or((0, 0, 0), |s| s.stats()),
            last_disconnect: ctx.links.get(PUBLISHING).map_or("", |l| l.last_disconnect),
        },
    )
}

/// The answer to a QoS 1 publish kept on disk only: null now, or, with
/// `confirm: stored`, once the disk spool is synced.
fn stored_answer(
    out: &mut [u8],
    confirm: Confirm,
    seq: u64,
    store: &mut dyn Store,
    done: impl Fn(&mut [u8], fn(&mut [u8]) -> usize) -> Reply,
) -> Reply {
    if confirm == Confirm::Stored {
        store.sync_soon();
        return Reply::answer(0, Mode::AwaitStored(seq));
    }
    done(out, answer::null)
}

/// The answer a settled subscription owes the connection `waiting` on it
/// (a stream's own slot, or the slot whose `subscribe` call waits), if
/// any. A notify subscribe has nobody waiting: a refusal is only logged
/// and counted as dropped.
pub fn settled(s: &Settled, waiting: Option<(usize, Mode)>, out: &mut [u8]) -> Option<Reply> {
    let refused = "the broker refused a topic filter";
    let quarantined =
        "a topic filter was dropped as poison (the broker closes the connection on it)";
    match (&s.dest, waiting) {
        (Dest::Stream { .. }, Some((slot, mode))) => Some(match s.outcome {
            Outcome::Accepted => Reply::answer(answer::accepted(out), Mode::Stream(s.id)),
            Outcome::Refused => {
                log::warn!("bus: slot {slot}: {refused}");
                Reply {
                    close: true,
                    ..Reply::answer(answer::error(out, ErrorCode::Remote), Mode::Requests)
                }
            }
            Outcome::Dropped => {
                log::warn!("bus: slot {slot}: {refused} after a reconnect; ending the stream");
                Reply {
                    close: true,
                    ..Reply::answer(0, mode)
                }
            }
            // [bus-iso-2]: the error frame, then the stream closes.
            Outcome::Quarantined => {
                log::warn!("bus: slot {slot}: {quarantined}; ending the stream");
                Reply {
                    close: true,
                    ..Reply::answer(answer::error(out, ErrorCode::Remote), Mode::Requests)
                }
            }
        }),
        (Dest::Stream { .. }, None) => None,
        (Dest::Endpoint(name), waiting) => match (s.outcome, waiting) {
            (Outcome::Accepted, Some(_)) => Some(Reply::answer(answer::null(out), Mode::Requests)),
            (Outcome::Refused, Some((slot, _))) => {
                log::warn!("bus: slot {slot}: {refused}");
                Some(Reply::answer(
                    answer::error(out, ErrorCode::Remote),
                    Mode::Requests,
                ))
            }
            (Outcome::Refused, None) => {
                log::warn!("bus: {refused} of the subscription for {name}");
                Some(Reply {
                    dropped: true,
                    ..Reply::answer(0, Mode::Requests)
                })
            }
            (Outcome::Dropped, _) => {
                log::warn!("bus: {refused} of the subscription for {name}; removed");
                None
            }
            (Outcome::Quarantined, Some((slot, _))) => {
                log::warn!("bus: slot {slot}: {quarantined}");
                Some(Reply::answer(
                    answer::error(out, ErrorCode::Remote),
                    Mode::Requests,
                ))
            }
            (Outcome::Quarantined, None) => {
                log::warn!("bus: {quarantined}: the subscription for {name} is removed");
                None
            }
            (Outcome::Accepted, None) => None,
        },
    }
}

#[cfg(test)]
mod tests {
    //! Request bytes in, answer bytes out. The answers are golden frames
    //! from core-bus.md section 5 (null, NOENTRY, accepted, `true`) or
    //! computed outside this crate (Python's zlib CRC-32) for the other
    //! codes; requests are built with the bus codecs, whose own tests pin
    //! them to the spec's worked example.

    use super::*;
    use crate::bus::example;
    use crate::bus::object::Encoder;
    use crate::consts;
    use crate::mqtt::packet::SubackCode;
    use crate::router::{SubState, Traffic};

    const NULL: &str = "000000110000000038a2615b00a171ab15";
    const ACCEPTED: &str = "0000001e0000000e5d4adb8d0861636365707465640400000001f254b2ef";
    const TRUE: &str = "00000012000000007f021b8b0101a3f1cd91";
    const FALSE: &str = "00000012000000007f021b8b0100d4f6fd07";
    const BUSY: &str = "0000001b0000000be5c0a072056572726f720400000003fd7a2499";
    const INVALID: &str = "0000001b0000000be5c0a072056572726f720400000005141981ac";
    const PARSE: &str = "0000001b0000000be5c0a072056572726f720400000007fa17e080";
    const RANGE: &str = "0000001b0000000be5c0a072056572726f7204000000086aa8fd11";
    const NOMEM: &str = "0000001b0000000be5c0a072056572726f7204000000091dafcd87";
    const NOENTRY: &str = "0000001b0000000be5c0a072056572726f72040000000c6dc53908";
    const REMOTE: &str = "0000001b0000000be5c0a072056572726f72040000000e83cb5824";

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// A request frame whose params map is written by `params`.
    fn request(method: &str, kind: RequestType, params: impl FnOnce(&mut Encoder<'_>)) -> Vec<u8> {
        let mut payload = [0u8; 2048];
        let mut e = Encoder::new(&mut payload);
        params(&mut e);
        let n = e.written();
        let mut buf = vec![0u8; frame::request_len(method.as_bytes(), n)];
        let mut em = frame::begin_request(&mut buf, method.as_bytes(), kind).unwrap();
        em.payload_mut()[..n].copy_from_slice(&payload[..n]);
        let len = em.finish(n).unwrap();
        buf.truncate(len);
        buf
    }

    /// A `publish` of `{topic, payload, qos}`.
    fn publish(kind: RequestType, topic: &[u8], payload: &[u8], qos: i64) -> Vec<u8> {
        request("publish", kind, |e| {
            e.map(3).unwrap();
            e.key(b"topic").unwrap().buf(topic).unwrap();
            e.key(b"payload").unwrap().buf(payload).unwrap();
            e.key(b"qos").unwrap().i64(qos).unwrap();
        })
    }

    /// A `subscribe` of one filter, to `endpoint` if given.
    fn subscribe(kind: RequestType, filter: &[u8], endpoint: Option<&[u8]>) -> Vec<u8> {
        request("subscribe", kind, filter_params(filter, endpoint))
    }

    /// An `unsubscribe` call.
    fn unsubscribe(kind: RequestType, filter: &[u8], endpoint: Option<&[u8]>) -> Vec<u8> {
        request("unsubscribe", kind, filter_params(filter, endpoint))
    }

    fn filter_params<'a>(
        filter: &'a [u8],
        endpoint: Option<&'a [u8]>,
    ) -> impl FnOnce(&mut Encoder<'_>) + 'a {
        move |e| {
            e.map(1 + usize::from(endpoint.is_some())).unwrap();
            e.key(b"topic_filter").unwrap().buf(filter).unwrap();
            if let Some(name) = endpoint {
                e.key(b"response_endpoint").unwrap().buf(name).unwrap();
            }
        }
    }

    fn empty(e: &mut Encoder<'_>) {
        e.map(0).unwrap();
    }

    /// The daemon's state as a request sees it.
    struct World {
        spool: Spool,
        router: Router,
        connected: bool,
        last_disconnect: &'static str,
        counters: Counters,
        /// The pid the next requests come from.
        pid: u32,
        /// The clock the next requests see.
        now: Instant,
        /// A disk spool, if the test gives one.
        disk: Option<Disk>,
        /// The protocol, and what the broker allows.
        version: Version,
        broker: Limits,
        /// The last refusal's reason.
        last_refusal: Option<Refusal>,
    }

    impl World {
        fn new() -> Self {
            Self {
                spool: Spool::new(4096, 8),
                router: Router::new(),
                connected: false,
                last_disconnect: "",
                counters: Counters::default(),
                pid: 4242,
                now: Instant::default(),
                disk: None,
                version: Version::V311,
                broker: Limits::default(),
                last_refusal: None,
            }
        }

        /// Handles `bytes` from slot 1; the reply and the answer bytes.
        fn call(&mut self, bytes: &[u8]) -> (Reply, Vec<u8>) {
            let links = [LinkState {
                id: "gw",
                connected: self.connected,
                last_disconnect: self.last_disconnect,
            }];
            let mut ctx = Context {
                spool: &mut self.spool,
                router: &mut self.router,
                links: &links,
                counters: self.counters,
                now: self.now,
                endpoint_reachable: &|name| name != "gone",
                store: self.disk.as_mut().map(|d| d as &mut dyn Store),
                version: self.version,
                broker: self.broker,
            };
            let pid = self.pid;
            let caller = Caller {
                slot: 1,
                generation: 7,
                pid: &move || pid,
            };
            let mut out = vec![0u8; 4096];
            let mut reply = handle(bytes, caller, &mut ctx, &mut out);
            out.truncate(reply.len);
            // Every refusal carries its reason for the log, and only a
            // refusal does: an error answer, or a notify's drop.
            let code = frame::parse(&out).ok().and_then(|f| match f.response() {
                frame::Response::Error(c) => ErrorCode::from_i32(c),
                _ => None,
            });
            match reply.refused.take() {
                Some((_, refusal)) => {
                    assert!(code == Some(refusal.code) || reply.dropped, "{refusal}");
                    assert!(!refusal.to_string().is_empty());
                    self.last_refusal = Some(refusal);
                }
                None => assert!(
                    code.is_none() && !reply.dropped,
                    "a refusal without a reason"
                ),
            }
            (reply, out)
        }

        /// Settles what the router has, as slot 1 waiting in `mode`.
        fn settle(&mut self, mode: Mode) -> (Option<Reply>, Vec<u8>) {
            let s = self.router.take_settled().expect("something settled");
            let mut out = vec![0u8; 64];
            let waiting = match s.dest {
                Dest::Endpoint(_) if mode == Mode::Requests => None,
                _ => Some((1, mode)),
            };
            let reply = settled(&s, waiting, &mut out);
            out.truncate(reply.map_or(0, |r| r.len));
            (reply, out)
        }
    }

    /// A reply that keeps the connection serving requests.
    fn served(len: usize) -> Reply {
        Reply::answer(len, Mode::Requests)
    }

    /// A reply that closes the connection once its answer is written.
    fn closed(len: usize) -> Reply {
        Reply {
            close: true,
            ..served(len)
        }
    }

    #[test]
    fn a_publish_call_is_answered_null_once_the_message_is_queued() {
        // [iotcored-bus-publish-1] core-bus.md section 5's worked example.
        let mut w = World::new();
        let (reply, answer) = w.call(&example::PUBLISH_CALL);
        assert_eq!(answer, hex(NULL));
        assert_eq!(reply, served(answer.len()));
        assert_eq!((w.spool.len(), w.spool.stats().published), (1, 1));
    }

    #[test]
    fn refused_publishes_answer_their_code_queue_nothing_and_keep_the_connection() {
        // [bus-err-3] [iotcored-bus-publish-3.3]
        let long = [b'x'; 257];
        let cases: [(&[u8], i64, &str); 5] = [
            (b"a/+", 0, INVALID),
            (b"", 0, INVALID),
            (&long, 0, RANGE),
            (b"a/b/c/d/e/f/g/h/i", 0, RANGE),
            (b"a/b", 2, INVALID),
        ];
        for (topic, qos, code) in cases {
            let mut w = World::new();
            let bytes = publish(RequestType::Call, topic, b"x", qos);
            let (reply, answer) = w.call(&bytes);
            assert_eq!(
                answer,
                hex(code),
                "topic {:?} qos {qos}",
                String::from_utf8_lossy(topic)
            );
            assert_eq!(reply, served(answer.len()));
            assert!(w.spool.is_empty());
        }
        let mut w = World::new();
        let no_topic = request("publish", RequestType::Call, |e| {
            e.map(1)
                .unwrap()
                .key(b"payload")
                .unwrap()
                .buf(b"x")
                .unwrap();
        });
        assert_eq!(w.call(&no_topic).1, hex(INVALID));
    }

    /// A publish of one byte on "c/t" at `qos` asking `confirm`.
    fn confirmed(kind: RequestType, qos: i64, confirm: &'static [u8]) -> Vec<u8> {
        request("publish", kind, move |e| {
            e.map(3).unwrap();
            e.key(b"topic").unwrap().buf(b"c/t").unwrap();
            e.key(b"qos").unwrap().i64(qos).unwrap();
            e.key(b"confirm").unwrap().buf(confirm).unwrap();
        })
    }

    /// A minimal disk spool: records numbered from 1, synced on demand.
    #[derive(Default)]
    struct Disk {
        appended: u64,
        released: Vec<u64>,
        kept: Vec<u64>,
        soon: bool,
    }

    impl Store for Disk {
        fn append(&mut self, _: u32, _: &Message<'_>, _: Option<u32>) -> Option<u64> {
            self.appended += 1;
            Some(self.appended)
        }
        fn release(&mut self, seq: u64) {
            self.released.push(seq);
        }
        fn sync_soon(&mut self) {
            self.soon = true;
        }
        fn backlogged(&self) -> bool {
            !self.kept.is_empty()
        }
        fn keep_on_disk(&mut self, seq: u64) {
            self.kept.push(seq);
        }
        fn stats(&self) -> (u64, u64, u64) {
            (self.appended, 0, 0)
        }
    }

    #[test]
    fn what_the_broker_said_it_does_not_take_is_refused_before_queueing() {
        // [mqtt5-4] Maximum QoS 0 and Retain Available 0: UNSUPPORTED;
        // over its Maximum Packet Size: RANGE. Nothing is queued.
        let code = |c: ErrorCode| {
            let mut buf = [0u8; 64];
            let n = answer::error(&mut buf, c);
            buf[..n].to_vec()
        };
        let mut w = World::new();
        w.version = Version::V5;
        w.broker = Limits {
            maximum_qos: QoS::AtMostOnce,
            retain_available: false,
            maximum_packet_size: 64,
            ..Limits::default()
        };
        let (_, a) = w.call(&publish(RequestType::Call, b"t", b"x", 1));
        assert_eq!(a, code(ErrorCode::Unsupported));
        let retained = request("publish", RequestType::Call, |e| {
            e.map(2).unwrap();
            e.key(b"topic").unwrap().buf(b"t").unwrap();
            e.key(b"retain").unwrap().bool(true).unwrap();
        });
        let (_, a) = w.call(&retained);
        assert_eq!(a, code(ErrorCode::Unsupported));
        let (_, a) = w.call(&publish(RequestType::Call, b"t", &[0; 60], 0));
        assert_eq!(a, code(ErrorCode::Range));
        assert!(w.spool.is_empty());
        let (_, a) = w.call(&publish(RequestType::Call, b"t", &[0; 50], 0));
        assert_eq!(a, hex(NULL));
        assert_eq!(w.spool.len(), 1);
    }

    #[test]
    fn mqtt5_publish_keys_reach_the_broker_as_properties_and_not_with_3_1_1() {
        // [mqtt5-5]
        let with_props = request("publish", RequestType::Call, |e| {
            e.map(4).unwrap();
            e.key(b"topic").unwrap().buf(b"t").unwrap();
            e.key(b"content_type").unwrap().buf(b"text/plain").unwrap();
            e.key(b"expiry").unwrap().i64(9).unwrap();
            e.key(b"user_properties").unwrap().map(1).unwrap();
            e.key(b"k").unwrap().buf(b"v").unwrap();
        });
        for version in [Version::V5, Version::V311] {
            let mut w = World::new();
            w.version = version;
            w.spool.set_version(version);
            let (_, a) = w.call(&with_props);
            assert_eq!(a, hex(NULL));
            assert_eq!(w.spool.prepare_next(w.now, 4, usize::MAX), None);
            let out = w.spool.next(4, true).unwrap();
            let bytes = [out.prefix, out.first, out.second].concat();
            match crate::mqtt::packet::Packet::parse_as(&bytes, version) {
                Ok(crate::mqtt::packet::Packet::Publish(p)) => {
                    assert_eq!(p.topic, "t");
                    match p.properties {
                        Some(props) => {
                            use crate::mqtt::props::id;
                            assert_eq!(props.number(id::MESSAGE_EXPIRY), Some(9));
                            assert_eq!(props.string(id::CONTENT_TYPE), Some("text/plain"));
                            assert_eq!(props.user_properties().count(), 1);
                        }
                        None => assert_eq!(version, Version::V311),
                    }
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn confirm_says_when_a_publish_call_is_answered() {
        // [bus-confirm-1]
        let code = |c: ErrorCode| {
            let mut buf = [0u8; 64];
            let n = answer::error(&mut buf, c);
            buf[..n].to_vec()
        };
        let mut w = World::new();
        let (reply, answer) = w.call(&confirmed(RequestType::Call, 1, b"queued"));
        assert_eq!((reply, answer), (served(hex(NULL).len()), hex(NULL)));
        // acked: no answer now; the loop answers on the PUBACK of ticket 2.
        let (reply, answer) = w.call(&confirmed(RequestType::Call, 1, b"acked"));
        assert_eq!(
            (reply, answer.len()),
            (Reply::answer(0, Mode::AwaitAcked(2)), 0)
        );
        assert!(!reply.mode.wants_input(), "later calls wait behind it");
        // stored: only with a disk spool.
        let (_, answer) = w.call(&confirmed(RequestType::Call, 1, b"stored"));
        assert_eq!(answer, code(ErrorCode::Unsupported));
        assert_eq!(w.spool.len(), 2, "nothing queued");
        // Only QoS 1 can be acknowledged or stored; unknown values.
        for bad in [&b"acked"[..], b"stored"] {
            let bytes = request("publish", RequestType::Call, |e| {
                e.map(2).unwrap();
                e.key(b"topic").unwrap().buf(b"c/t").unwrap();
                e.key(b"confirm").unwrap().buf(bad).unwrap();
            });
            assert_eq!(w.call(&bytes).1, code(ErrorCode::Invalid));
        }
        assert_eq!(
            w.call(&confirmed(RequestType::Call, 1, b"later")).1,
            code(ErrorCode::Invalid)
        );
        // A notify is never answered, whatever it asks.
        let (reply, answer) = w.call(&confirmed(RequestType::Notify, 1, b"acked"));
        assert_eq!((reply, answer.len()), (served(0), 0));
    }

    #[test]
    fn with_a_disk_spool_a_qos1_publish_is_stored_before_it_is_queued() {
        // [spool-3] [bus-confirm-1]
        let mut w = World {
            disk: Some(Disk::default()),
            ..World::new()
        };
        let (reply, _) = w.call(&confirmed(RequestType::Call, 1, b"stored"));
        assert_eq!(reply, Reply::answer(0, Mode::AwaitStored(1)));
        assert!(w.disk.as_ref().unwrap().soon, "a sync is asked for");
        let (_, answer) = w.call(&publish(RequestType::Call, b"q/0", b"x", 0));
        assert_eq!(answer, hex(NULL));
        assert_eq!(w.disk.as_ref().unwrap().appended, 1, "QoS 0 is not stored");
        // A full memory spool: a message waiting for PUBACK cannot wait on
        // disk (BUSY, its record released); any other waits there,
        // answered, and every later one goes behind it.
        let mut w = World {
            spool: Spool::new(4096, 1),
            disk: Some(Disk::default()),
            ..World::new()
        };
        assert_eq!(
            w.call(&publish(RequestType::Call, b"q/1", b"x", 1)).1,
            hex(NULL)
        );
        let (reply, _) = w.call(&confirmed(RequestType::Call, 1, b"acked"));
        assert!(reply.busy);
        assert_eq!(w.disk.as_ref().unwrap().released, [2]);
        let (reply, answer) = w.call(&publish(RequestType::Call, b"q/1", b"y", 1));
        assert_eq!((answer, reply.busy), (hex(NULL), false));
        assert_eq!(w.disk.as_ref().unwrap().kept, [3]);
        let (reply, _) = w.call(&confirmed(RequestType::Call, 1, b"stored"));
        assert_eq!(reply, Reply::answer(0, Mode::AwaitStored(4)));
        let appended = w.disk.as_ref().unwrap().appended;
        assert_eq!((w.spool.len(), appended), (1, 4), "on disk only");
    }

    #[test]
    fn a_publish_notify_is_never_answered_and_a_refused_one_counts_as_dropped() {
        // [bus-req-3] [bus-req-4.1]
        let mut w = World::new();
        for (topic, dropped, queued) in [(&b"a/b"[..], false, 1), (b"a/#", true, 1)] {
            let (reply, answer) = w.call(&publish(RequestType::Notify, topic, b"x", 0));
            assert!(answer.is_empty());
            assert_eq!(
                reply,
                Reply {
                    dropped,
                    ..served(0)
                }
            );
            assert_eq!(w.spool.len(), queued);
        }
    }

    #[test]
    fn a_full_spool_evicts_queued_qos0_first_then_answers_busy() {
        // core-bus.md section 6: BUSY only when nothing can be evicted.
        let mut w = World::new();
        let qos0 = publish(RequestType::Call, b"t", b"0", 0);
        let qos1 = publish(RequestType::Call, b"t", b"1", 1);
        for _ in 0..8 {
            assert_eq!(w.call(&qos0).1, hex(NULL));
        }
        // The spool holds 8 messages: each QoS 1 evicts one QoS 0.
        for _ in 0..8 {
            let (reply, answer) = w.call(&qos1);
            assert_eq!(answer, hex(NULL));
            assert_eq!(reply.evicted, 1);
        }
        let (reply, answer) = w.call(&qos1);
        assert_eq!(answer, hex(BUSY));
        assert_eq!(
            reply,
            Reply {
                busy: true,
                ..served(answer.len())
            }
        );
        assert_eq!((w.spool.stats().evicted, w.spool.stats().busy), (8, 1));
    }

    #[test]
    fn unknown_methods_are_noentry_and_wrong_request_types_invalid() {
        // [bus-req-5]
        let mut w = World::new();
        let (reply, answer) = w.call(&request("reboot", RequestType::Call, empty));
        assert_eq!(answer, hex(NOENTRY));
        assert_eq!(reply, served(answer.len()));
        let wrong = [
            publish(RequestType::Subscribe, b"a", b"", 0),
            request("stats", RequestType::Subscribe, empty),
            request("connection_status", RequestType::Call, empty),
            subscribe(RequestType::Call, b"a", None),
            unsubscribe(RequestType::Subscribe, b"a", Some(b"x")),
            // `response_endpoint: null` is no endpoint: a subscribe call
            // without one is the wrong type, not a stream on a call
            // connection.
            request("subscribe", RequestType::Call, |e| {
                e.map(2).unwrap();
                e.key(b"topic_filter").unwrap().buf(b"a").unwrap();
                e.key(b"response_endpoint").unwrap().null().unwrap();
            }),
        ];
        for bytes in wrong {
            let (reply, answer) = w.call(&bytes);
            assert_eq!(answer, hex(INVALID));
            assert_eq!(reply, served(answer.len()));
        }
    }

    #[test]
    fn malformed_requests_get_their_code_and_then_the_connection_closes() {
        // [bus-err-1], with GGL's codes for each case (section 3).
        let good = request("stats", RequestType::Call, empty);
        let mut bad_crc = good.clone();
        *bad_crc.last_mut().unwrap() ^= 1;
        let no_type = {
            let mut buf = vec![0u8; 64];
            let em =
                frame::Emitter::new(&mut buf, &[("method", frame::HeaderValue::Str(b"stats"))])
                    .unwrap();
            let n = em.finish(0).unwrap();
            buf.truncate(n);
            buf
        };
        let not_a_map = request("stats", RequestType::Call, |e| {
            e.i64(1).unwrap();
        });
        let too_deep = request("stats", RequestType::Call, |e| {
            for _ in 0..15 {
                e.map(1).unwrap().key(b"k").unwrap();
            }
            e.null().unwrap();
        });
        let cases = [
            (bad_crc, PARSE),
            (no_type, INVALID),
            (not_a_map, INVALID),
            (too_deep, RANGE),
        ];
        for (bytes, code) in cases {
            let (reply, answer) = World::new().call(&bytes);
            assert_eq!(answer, hex(code));
            assert_eq!(reply, closed(answer.len()));
        }
    }

    #[test]
    fn a_streamed_subscribe_waits_for_the_router_then_is_accepted() {
        // [iotcored-bus-subscribe-1] [bus-req-4.2]; offline, the router
        // accepts at once and subscribes after the next connect.
        let mut w = World::new();
        let (reply, answer) = w.call(&subscribe(RequestType::Subscribe, b"a/#", None));
        assert!(answer.is_empty());
        let Mode::AwaitStream(id) = reply.mode else {
            panic!("not waiting: {reply:?}");
        };
        assert!(reply.mode.ignores_input() && reply.mode.streams());
        assert_eq!(
            w.router.dest(id),
            Some(&Dest::Stream {
                client: 1,
                generation: 7
            })
        );
        let (settled, answer) = w.settle(reply.mode);
        assert_eq!(answer, hex(ACCEPTED));
        assert_eq!(settled, Some(Reply::answer(answer.len(), Mode::Stream(id))));
    }

    #[test]
    fn a_subscribe_call_with_an_endpoint_is_answered_null_when_settled() {
        // [iotcored-bus-subscribe-3]
        let mut w = World::new();
        let bytes = subscribe(RequestType::Call, b"a/#", Some(b"sink"));
        let (reply, answer) = w.call(&bytes);
        assert!(answer.is_empty());
        let Mode::AwaitCall(_) = reply.mode else {
            panic!("not waiting: {reply:?}");
        };
        assert!(!reply.mode.wants_input());
        let (settled, answer) = w.settle(reply.mode);
        assert_eq!(answer, hex(NULL));
        assert_eq!(settled, Some(served(answer.len())));
    }

    /// Subscribes `filter` while connection 0 is up, and refuses it in the
    /// SUBACK.
    fn refused(endpoint: Option<&[u8]>, kind: RequestType) -> (World, Reply) {
        let mut w = World::new();
        w.router.link_up(0, false, Instant::default());
        let (reply, _) = w.call(&request(
            "subscribe",
            kind,
            filter_params(b"no/#", endpoint),
        ));
        let packet_id = w
            .router
            .next_request(0, Traffic::Quiet)
            .expect("a SUBSCRIBE")
            .packet_id;
        assert!(w.router.on_suback(0, packet_id, [SubackCode::Failure]));
        (w, reply)
    }

    #[test]
    fn a_filter_the_broker_refuses_is_remote_and_ends_a_stream() {
        // core-bus.md section 6: SUBACK 0x80 is REMOTE, not a silent success.
        let (mut w, reply) = refused(None, RequestType::Subscribe);
        let (settled, answer) = w.settle(reply.mode);
        assert_eq!(answer, hex(REMOTE));
        assert_eq!(settled, Some(closed(answer.len())));
        let (mut w, reply) = refused(Some(b"sink"), RequestType::Call);
        let (settled, answer) = w.settle(reply.mode);
        assert_eq!(answer, hex(REMOTE));
        assert_eq!(settled, Some(served(answer.len())));
        // A notify subscribe has nobody to tell: counted as dropped.
        let (mut w, reply) = refused(Some(b"sink"), RequestType::Notify);
        assert_eq!(reply, served(0));
        let (settled, answer) = w.settle(Mode::Requests);
        assert!(answer.is_empty());
        assert_eq!(
            settled,
            Some(Reply {
                dropped: true,
                ..served(0)
            })
        );
    }

    #[test]
    fn a_quarantined_filter_ends_even_an_answered_stream_with_remote() {
        // [bus-iso-2]: the error frame, then the connection closes.
        let mut w = World::new();
        w.router.link_up(0, false, Instant::default());
        let (reply, _) = w.call(&subscribe(RequestType::Subscribe, b"bad/#", None));
        w.router
            .next_request(0, Traffic::Quiet)
            .expect("a SUBSCRIBE");
        w.router.link_down(0); // first close: accepted offline
        let (settled, answer) = w.settle(reply.mode);
        assert_eq!(answer, hex(ACCEPTED));
        let mode = settled.unwrap().mode;
        w.router.link_up(0, false, Instant::default());
        w.router.next_request(0, Traffic::Quiet).expect("the probe");
        w.router.link_down(0); // second close, the filter alone
        let (settled, answer) = w.settle(mode);
        assert_eq!(answer, hex(REMOTE));
        assert_eq!(settled, Some(closed(answer.len())));
        // An endpoint call waiting for its answer gets REMOTE too.
        let mut w = World::new();
        w.router.link_up(0, false, Instant::default());
        let bytes = subscribe(RequestType::Call, b"bad/#", Some(b"sink"));
        let (reply, _) = w.call(&bytes);
        for _ in 0..2 {
            w.router
                .next_request(0, Traffic::Quiet)
                .expect("a SUBSCRIBE");
            w.router.link_down(0);
            w.router.link_up(0, false, Instant::default());
        }
        let (settled, answer) = w.settle(reply.mode);
        assert_eq!(answer, hex(REMOTE));
        assert_eq!(settled, Some(served(answer.len())));
    }

    #[test]
    fn a_full_subscription_table_is_nomem_and_bad_filters_are_invalid_or_range() {
        let mut w = World::new();
        for i in 0..consts::MAX_SUBSCRIPTIONS {
            // Two processes, each within its half [bus-iso-4].
            w.pid = if i % 2 == 0 { 1 } else { 2 };
            let filter = format!("t/{i}");
            let bytes = subscribe(RequestType::Call, filter.as_bytes(), Some(b"sink"));
            assert!(matches!(w.call(&bytes).0.mode, Mode::AwaitCall(_)));
        }
        let bytes = subscribe(RequestType::Call, b"t/x", Some(b"sink"));
        assert_eq!(w.call(&bytes).1, hex(NOMEM));
        let mut w = World::new();
        let bad = [
            (&b"a/#/b"[..], None, INVALID),
            (b"a/b/c/d/e/f/g/h/i", None, RANGE),
            (b"a", Some(&b"../x"[..]), INVALID),
        ];
        for (filter, endpoint, code) in bad {
            let (reply, answer) = w.call(&subscribe(RequestType::Subscribe, filter, endpoint));
            assert_eq!(answer, hex(code));
            assert_eq!(reply, served(answer.len()));
        }
    }

    /// A subscribe call of `filters` to an endpoint.
    fn subscribe_filters(filters: &[&str]) -> Vec<u8> {
        request("subscribe", RequestType::Call, |e| {
            e.map(2).unwrap();
            e.key(b"topic_filter").unwrap().list(filters.len()).unwrap();
            for f in filters {
                e.buf(f.as_bytes()).unwrap();
            }
            e.key(b"response_endpoint").unwrap().buf(b"sink").unwrap();
        })
    }

    #[test]
    fn one_process_holds_at_most_half_the_subscriptions_and_half_the_broker_filters() {
        // [bus-iso-4] The test build: 8 subscriptions, 3 x 4 broker filters.
        let half_subs = consts::MAX_SUBSCRIPTIONS / 2;
        let mut w = World::new();
        w.pid = 1;
        for i in 0..half_subs {
            let f = format!("s/{i}");
            assert!(matches!(
                w.call(&subscribe_filters(&[&f])).0.mode,
                Mode::AwaitCall(_)
            ));
        }
        assert_eq!(w.call(&subscribe_filters(&["s/x"])).1, hex(NOMEM));
        // Another process is still served.
        w.pid = 2;
        assert!(matches!(
            w.call(&subscribe_filters(&["s/x"])).0.mode,
            Mode::AwaitCall(_)
        ));

        // Distinct broker filters: 6 of the 12 at most, counted over the
        // process's subscriptions; filters it uses already cost nothing.
        let mut w = World::new();
        w.pid = 1;
        let (first, second) = (["a", "b", "c", "d"], ["a", "e", "f"]);
        assert!(matches!(
            w.call(&subscribe_filters(&first)).0.mode,
            Mode::AwaitCall(_)
        ));
        assert!(matches!(
            w.call(&subscribe_filters(&second)).0.mode,
            Mode::AwaitCall(_)
        ));
        assert_eq!(w.call(&subscribe_filters(&["g"])).1, hex(NOMEM));
        assert!(matches!(
            w.call(&subscribe_filters(&["a", "f"])).0.mode,
            Mode::AwaitCall(_)
        ));
        w.pid = 2;
        assert!(matches!(
            w.call(&subscribe_filters(&["g"])).0.mode,
            Mode::AwaitCall(_)
        ));
    }

    #[test]
    fn a_response_endpoint_nobody_serves_is_noentry_at_subscribe_time() {
        // [bus-iso-4] (The test world serves every endpoint but "gone".)
        let mut w = World::new();
        let (reply, answer) = w.call(&subscribe(RequestType::Call, b"a/#", Some(b"gone")));
        assert_eq!(answer, hex(NOENTRY));
        assert_eq!(reply, served(answer.len()));
        assert_eq!(w.router.subscriptions(), 0);
        let (reply, _) = w.call(&subscribe(RequestType::Notify, b"a/#", Some(b"gone")));
        assert!(reply.dropped);
    }

    #[test]
    fn unsubscribe_ends_exactly_one_endpoint_subscription_or_is_noentry() {
        let mut w = World::new();
        let (reply, _) = w.call(&subscribe(RequestType::Call, b"a/#", Some(b"sink")));
        let Mode::AwaitCall(id) = reply.mode else {
            panic!("not waiting: {reply:?}");
        };
        let other = unsubscribe(RequestType::Call, b"a/#", Some(b"other"));
        assert_eq!(w.call(&other).1, hex(NOENTRY));
        assert_eq!(w.router.state(id), Some(SubState::Active));
        let mine = unsubscribe(RequestType::Call, b"a/#", Some(b"sink"));
        assert_eq!(w.call(&mine).1, hex(NULL));
        assert_eq!(w.router.state(id), None);
        assert_eq!(w.call(&mine).1, hex(NOENTRY));
    }

    #[test]
    fn connection_status_is_accepted_then_the_state_of_connection_0() {
        // core-bus.md section 6, connection_status.
        let bytes = request("connection_status", RequestType::Subscribe, empty);
        for (connected, state) in [(false, FALSE), (true, TRUE)] {
            let mut w = World::new();
            w.connected = connected;
            let (reply, answer) = w.call(&bytes);
            assert_eq!(answer, [hex(ACCEPTED), hex(state)].concat());
            assert_eq!(reply, Reply::answer(answer.len(), Mode::Status));
            assert!(reply.mode.ignores_input() && !reply.mode.streams());
        }
    }

    #[test]
    fn stats_answers_every_counter_in_the_spec_order() {
        // core-bus.md section 6, stats: after the worked example's publish
        // (an 11-byte PUBLISH) 1.5 s ago, with the loop's counters 2, 3, 4,
        // then `expired` 5 (stored messages found expired at load),
        // `rejected` 0, `quarantined` 0, `oldest_ms` 1500, `stored`, `stored_bytes`
        // and `corrupt` 0 (no disk spool) and `last_disconnect` as a buffer.
        // (Expected bytes from Python's zlib CRC-32.)
        let mut w = World::new();
        w.connected = true;
        w.last_disconnect = "connection closed by the broker";
        w.counters = Counters {
            dropped: 2,
            received: 3,
            reconnects: 4,
            expired: 5,
        };
        w.call(&example::PUBLISH_CALL);
        w.now = Instant::from_millis(1500);
        let (reply, answer) = w.call(&request("stats", RequestType::Call, empty));
        let golden = concat!(
            "0000022600000000666ba4c60614000000090000007075626c69736865640201",
            "000000000000000400000073656e740200000000000000000600000072657365",
            "6e740200000000000000000500000061636b6564020000000000000000070000",
            "0073706f6f6c65640201000000000000000d00000073706f6f6c65645f627974",
            "6573020b00000000000000070000006576696374656402000000000000000004",
            "000000627573790200000000000000000700000064726f707065640202000000",
            "000000000800000072656365697665640203000000000000000a000000726563",
            "6f6e6e656374730204000000000000000b000000636f6e6e656374696f6e7305",
            "0100000006040000000200000069640402000000677709000000636f6e6e6563",
            "74656401010d000000737562736372697074696f6e7302000000000000000008",
            "000000696e666c69676874020000000000000000070000006578706972656402",
            "05000000000000000800000072656a65637465640200000000000000000b0000",
            "0071756172616e74696e6564020000000000000000090000006f6c646573745f",
            "6d7302dc050000000000000600000073746f7265640200000000000000000c00",
            "000073746f7265645f627974657302000000000000000007000000636f727275",
            "70740200000000000000000f0000006c6173745f646973636f6e6e656374041f",
            "000000636f6e6e656374696f6e20636c6f736564206279207468652062726f6b",
            "6572490a7953",
        );
        assert_eq!(answer, hex(golden));
        assert_eq!(reply, served(answer.len()));
        // A stats notify is pointless but harmless: nothing answered.
        assert_eq!(
            w.call(&request("stats", RequestType::Notify, empty)),
            (served(0), vec![])
        );
    }

    #[test]
    fn a_stats_answer_that_does_not_fit_is_nomem() {
        let mut w = World::new();
        let links = [LinkState {
            id: "gw",
            connected: false,
            last_disconnect: "",
        }];
        let mut ctx = Context {
            spool: &mut w.spool,
            router: &mut w.router,
            links: &links,
            counters: Counters::default(),
            now: Instant::default(),
            endpoint_reachable: &|_| true,
            store: None,
            version: Version::V311,
            broker: Limits::default(),
        };
        let caller = Caller {
            slot: 0,
            generation: 0,
            pid: &|| 0,
        };
        let mut out = [0u8; 64];
        let reply = handle(
            &request("stats", RequestType::Call, empty),
            caller,
            &mut ctx,
            &mut out,
        );
        assert_eq!(out[..reply.len], hex(NOMEM)[..]);
    }
}
