//! The frames iotcored writes to bus clients, each encoded once into a
//! caller's buffer: call results (`null`, `bool`, the `stats` map), error
//! and `accepted` frames, and the two shapes of a subscription message (a
//! stream message frame, or an `iotcored_response` notify to a
//! `response_endpoint`). Every function returns the frame's length, or 0
//! when it does not fit (the caller treats that as NOMEM or a drop).
//!
//! core-bus.md section 3 (response frames), [iotcored-bus-subscribe-3] and
//! [iotcored-bus-subscribe-3.1] (message maps `{topic, payload}`), section 6
//! (`stats` keys in their order).

use crate::bus::frame::{self, ErrorCode, RequestType};
use crate::bus::object::{self, Encoder};
use crate::mqtt::props::{id, Props};
use crate::spool;

/// A call result or stream message whose payload is `null`.
pub fn null(buf: &mut [u8]) -> usize {
    value(buf, |e| e.null().map(|_| ()))
}

/// A call result or stream message whose payload is a bool.
pub fn bool(buf: &mut [u8], v: bool) -> usize {
    value(buf, |e| e.bool(v).map(|_| ()))
}

/// An error frame carrying `code` [bus-err-1..3].
pub fn error(buf: &mut [u8], code: ErrorCode) -> usize {
    frame::emit_error(buf, code).unwrap_or(0)
}

/// The `accepted` frame that opens a subscription stream.
pub fn accepted(buf: &mut [u8]) -> usize {
    frame::emit_accepted(buf).unwrap_or(0)
}

/// A stream message frame `{topic, payload}` [iotcored-bus-subscribe-3.1].
pub fn message(buf: &mut [u8], topic: &str, payload: &[u8], props: Option<&Props<'_>>) -> usize {
    frame::begin_message(buf)
        .ok()
        .and_then(|mut e| {
            let n = message_map(e.payload_mut(), topic, payload, props)?;
            e.finish(n).ok()
        })
        .unwrap_or(0)
}

/// An `iotcored_response` notify carrying `{topic, payload}`, for a
/// `response_endpoint` subscriber [iotcored-bus-subscribe-3].
pub fn notify(buf: &mut [u8], topic: &str, payload: &[u8], props: Option<&Props<'_>>) -> usize {
    frame::begin_request(buf, b"iotcored_response", RequestType::Notify)
        .ok()
        .and_then(|mut e| {
            let n = message_map(e.payload_mut(), topic, payload, props)?;
            e.finish(n).ok()
        })
        .unwrap_or(0)
}

/// One connection as `stats` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkStats<'a> {
    /// Its client id.
    pub id: &'a str,
    /// Whether its CONNACK was accepted.
    pub connected: bool,
    /// Distinct filters placed on it.
    pub subscriptions: usize,
    /// QoS 1 publishes waiting for their PUBACK on it.
    pub inflight: usize,
}

/// Everything the `stats` answer reports.
#[derive(Clone, Copy, Debug)]
pub struct Stats<'a> {
    /// The spool's counters.
    pub spool: spool::Stats,
    /// Messages in the spool now.
    pub spooled: usize,
    /// Their bytes now.
    pub spooled_bytes: usize,
    /// Messages lost other than by eviction or BUSY.
    pub dropped: u64,
    /// PUBLISH packets received from the broker.
    pub received: u64,
    /// Connections re-established after a loss.
    pub reconnects: u64,
    /// One entry per connection, connection 0 first.
    pub links: &'a [LinkStats<'a>],
    /// Messages dropped unsent because their expiry passed.
    pub expired: u64,
    /// Messages the broker refused (MQTT 5 PUBACK failure, or over its
    /// Maximum Packet Size).
    pub rejected: u64,
    /// Messages and filters set aside as poison [bus-iso-2].
    pub quarantined: u64,
    /// How long the oldest message waiting in the spool has waited, ms.
    pub oldest_ms: u64,
    /// The disk spool's messages and bytes now, and the damaged records it
    /// skipped (zeros without one).
    pub stored: (u64, u64, u64),
    /// Why connection 0 last went down; empty if it never did.
    pub last_disconnect: &'a str,
}

/// The `stats` call result: the counters in core-bus.md section 6's order,
/// then `connections`, `expired`, `rejected`, `quarantined`, `oldest_ms`, `stored`,
/// `stored_bytes`, `corrupt` and `last_disconnect`
/// (the spec's keys this daemon has, in the spec's order).
pub fn stats(buf: &mut [u8], s: &Stats<'_>) -> usize {
    let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let size = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
    let counters: [(&[u8], i64); 11] = [
        (b"published", int(s.spool.published)),
        (b"sent", int(s.spool.sent)),
        (b"resent", int(s.spool.resent)),
        (b"acked", int(s.spool.acked)),
        (b"spooled", size(s.spooled)),
        (b"spooled_bytes", size(s.spooled_bytes)),
        (b"evicted", int(s.spool.evicted)),
        (b"busy", int(s.spool.busy)),
        (b"dropped", int(s.dropped)),
        (b"received", int(s.received)),
        (b"reconnects", int(s.reconnects)),
    ];
    let encode = |buf: &mut [u8]| -> Option<usize> {
        let mut e = Encoder::new(buf);
        e.map(counters.len() + 9).ok()?;
        for (k, v) in counters {
            e.key(k).ok()?.i64(v).ok()?;
        }
        e.key(b"connections").ok()?.list(s.links.len()).ok()?;
        for link in s.links {
            e.map(4).ok()?;
            e.key(b"id").ok()?.buf(link.id.as_bytes()).ok()?;
            e.key(b"connected").ok()?.bool(link.connected).ok()?;
            e.key(b"subscriptions")
                .ok()?
                .i64(size(link.subscriptions))
                .ok()?;
            e.key(b"inflight").ok()?.i64(size(link.inflight)).ok()?;
        }
        e.key(b"expired").ok()?.i64(int(s.expired)).ok()?;
        e.key(b"rejected").ok()?.i64(int(s.rejected)).ok()?;
        e.key(b"quarantined").ok()?.i64(int(s.quarantined)).ok()?;
        e.key(b"oldest_ms").ok()?.i64(int(s.oldest_ms)).ok()?;
        e.key(b"stored").ok()?.i64(int(s.stored.0)).ok()?;
        e.key(b"stored_bytes").ok()?.i64(int(s.stored.1)).ok()?;
        e.key(b"corrupt").ok()?.i64(int(s.stored.2)).ok()?;
        e.key(b"last_disconnect")
            .ok()?
            .buf(s.last_disconnect.as_bytes())
            .ok()?;
        Some(e.written())
    };
    frame::begin_result(buf)
        .ok()
        .and_then(|mut e| {
            let n = encode(e.payload_mut())?;
            e.finish(n).ok()
        })
        .unwrap_or(0)
}

/// A result frame whose payload is one object written by `write` (a result
/// and a stream message are the same frame on the wire).
fn value(
    buf: &mut [u8],
    write: impl FnOnce(&mut Encoder<'_>) -> Result<(), object::Error>,
) -> usize {
    frame::begin_result(buf)
        .ok()
        .and_then(|mut e| {
            let mut enc = Encoder::new(e.payload_mut());
            write(&mut enc).ok()?;
            let n = enc.written();
            e.finish(n).ok()
        })
        .unwrap_or(0)
}

/// `{topic, payload}`, then, for a subscriber that asked (`props`), the
/// MQTT 5 properties the message came with, each only when present:
/// `user_properties` (a map, in arrival order), `content_type`,
/// `response_topic`, `correlation_data`, `expiry` (seconds left)
/// (core-bus.md section 6, subscribe `properties`).
fn message_map(
    buf: &mut [u8],
    topic: &str,
    payload: &[u8],
    props: Option<&Props<'_>>,
) -> Option<usize> {
    let props = props.copied().unwrap_or(Props::EMPTY);
    let users = props.user_properties().count();
    let content_type = props.string(id::CONTENT_TYPE);
    let response_topic = props.string(id::RESPONSE_TOPIC);
    let correlation = props.binary(id::CORRELATION_DATA);
    let expiry = props.number(id::MESSAGE_EXPIRY);
    let extra = usize::from(users > 0)
        + usize::from(content_type.is_some())
        + usize::from(response_topic.is_some())
        + usize::from(correlation.is_some())
        + usize::from(expiry.is_some());
    let mut e = Encoder::new(buf);
    e.map(2 + extra).ok()?;
    e.key(b"topic").ok()?.buf(topic.as_bytes()).ok()?;
    e.key(b"payload").ok()?.buf(payload).ok()?;
    if users > 0 {
        e.key(b"user_properties").ok()?.map(users).ok()?;
        for (k, v) in props.user_properties() {
            e.key(k.as_bytes()).ok()?.buf(v.as_bytes()).ok()?;
        }
    }
    if let Some(t) = content_type {
        e.key(b"content_type").ok()?.buf(t.as_bytes()).ok()?;
    }
    if let Some(t) = response_topic {
        e.key(b"response_topic").ok()?.buf(t.as_bytes()).ok()?;
    }
    if let Some(d) = correlation {
        e.key(b"correlation_data").ok()?.buf(d).ok()?;
    }
    if let Some(s) = expiry {
        e.key(b"expiry").ok()?.i64(i64::from(s)).ok()?;
    }
    Some(e.written())
}
