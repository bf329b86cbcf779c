//! The outgoing spool: the bounded queue of encoded PUBLISH packets for the
//! one MQTT connection that carries publishes, sans-I/O.
//!
//! A local client's publish is encoded once, straight into the spool's byte
//! region (its header by the codec's `PublishHeader`, then the payload), and
//! the bus answers the client as soon as it is queued
//! [iotcored-bus-publish-4.1]. The event loop then takes the packets out in
//! the order the lanes give (below), as its rate limiter and the in-flight
//! window allow, and writes them to TLS; that is the only copy between the
//! bus and TLS.
//!
//! Memory is fixed in `new`: a byte region of `capacity_bytes`, a metadata
//! ring of `capacity_messages` entries, a bitmap of the publish packet ids
//! and the lanes; nothing allocates afterwards. The byte region is a ring and messages keep
//! push order in it, so one may straddle the region's end and is then handed
//! out as two slices.
//!
//! Lanes [bus-iso-5]: each publishing process (by peer pid) waits in a lane
//! of its own, `consts::PUBLISH_LANES` of them; the processes beyond share
//! one more. Messages start one lane after another in turn, oldest first
//! within a lane, so a process that publishes once a second is served
//! within a message or two of arriving however long another's backlog is;
//! order is kept per process, not across processes. A lane nobody waits in
//! goes to the next process that needs one, unless the shared lane holds
//! messages (one of them may be that process's, which must not be
//! overtaken). A lane is a list through the metadata ring; the bytes stay
//! where `push` wrote them.
//!
//! Capacity (core bus section 6, publish): QoS 0 and QoS 1 count together, in
//! messages and in bytes. A message that does not fit evicts queued QoS 0
//! messages (never one already started, never a QoS 1), each the oldest of
//! the longest lane that has one, so a flood pays for itself; only as many
//! as it needs; if evicting all of them would not make room, nothing is
//! evicted and the push is refused with `Busy`.
//!
//! Sending: a started message is written to its end before anything else (the
//! write offset lives here, so a short TLS write resumes where it stopped). A
//! QoS 1 message gets its packet id when first started, from the publish
//! half of the id space (`packet_id::PUBLISH`, 1..=32767; the router's
//! SUBSCRIBEs use the other half), never one held by an unacknowledged
//! message [MQTT-2.3.1-2]. After its last byte a QoS 0 is
//! done and a QoS 1 is in flight until its PUBACK. A lane whose oldest is a
//! QoS 1 while the in-flight window is full lets the next lane go.
//!
//! Reconnect: `reset_inflight` puts every unacknowledged QoS 1 back at the
//! front of its lane, with DUP set and the same packet id [MQTT-4.4.0-1]
//! [MQTT-3.3.1-1]; a message cut off mid-write starts again from its first
//! byte. Completed QoS 0 messages are never sent again.
//!
//! Poison quarantine [bus-iso-2]: the broker may close the connection
//! because of one message (a policy that forbids its topic, a size limit),
//! and resending it first on every reconnect would hold every later message
//! for ever. So the QoS 1 messages left unacknowledged by a lost connection
//! become *suspects* (`suspects` counts them; they are exactly the live
//! entries holding a packet id, at the front of their lanes): while any is
//! left, only they start, one at a time, when nothing is in flight, so each
//! suspect is the *probe* of its connection alone. A probe started (in part or
//! whole) and not acknowledged when its connection is lost gets a strike;
//! `QUARANTINE_STRIKES` in a row and it is removed (`Quarantined`, counted
//! in `Stats::quarantined`), never to be sent again. Its PUBACK clears its
//! strikes. A single cut costs a probe one strike and nothing else; the
//! first loss, with many messages in flight, strikes none, since which one
//! was at fault is unknown. Once every suspect is acknowledged or
//! quarantined, pipelining and the newer messages resume. The cost on the
//! per-message path is one flag test in `startable` and one compare when a
//! QoS 1 is released.
//!
//! Holes and compaction: a message that is done (a sent QoS 0, an acked
//! QoS 1) or evicted while an older one is still held leaves a hole. Holes
//! at either end are reclaimed at once; holes in the middle stay. Only when a
//! push finds no room at the tail (or no free metadata slot) although the
//! holes would make room does the spool compact: it rotates the region so the
//! oldest message starts at offset 0, moves every live message down over the
//! holes, and rebuilds the metadata ring and the lanes' lists. This is the one case where a
//! message's bytes move; a message in the middle of being written moves too,
//! which is safe because its write offset is relative to its start. The cost
//! is one pass over the region, paid at most once per push.

use core::fmt;

mod aliases;
mod lanes;

pub use aliases::ALIAS_SLOTS;
use aliases::{Aliases, PREFIX_MAX};

use crate::consts;
use crate::mqtt::packet::{self, PublishHeader, QoS, Version};
use crate::mqtt::packet_id::PUBLISH as IDS;
use crate::mqtt::props::Props;
use crate::mqtt::topic::MAX_TOPIC_LEN;
use crate::time::Instant;

/// Connections in a row lost while a message was the probe, after which it
/// is quarantined [bus-iso-2].
pub const QUARANTINE_STRIKES: u8 = 2;

/// Words of the packet-id bitmap: one bit per id 0..=IDS.last.
const ID_WORDS: usize = (IDS.last as usize + 1) / 64;

/// Why a push was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushError {
    /// No room even after evicting every queued QoS 0; nothing changed.
    Busy,
    /// The topic is over 65,535 bytes or the packet over the MQTT maximum.
    TooLong,
}

impl fmt::Display for PushError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PushError::Busy => "outgoing queue full",
            PushError::TooLong => "topic or publish packet too long",
        })
    }
}

impl std::error::Error for PushError {}

/// A message to queue: what `push_message` encodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message<'a> {
    pub topic: &'a str,
    pub payload: &'a [u8],
    pub qos: QoS,
    pub retain: bool,
    /// MQTT 5 properties to send with it (without a Message Expiry
    /// Interval, which `expires` gives); ignored with MQTT 3.1.1.
    pub properties: Props<'a>,
    /// When it stops being worth sending [bus-expiry-1]: it is dropped
    /// unsent after that, and with MQTT 5 sent with the time it has left.
    pub expires: Option<Instant>,
}

impl<'a> Message<'a> {
    /// A message without properties or expiry.
    pub fn plain(topic: &'a str, payload: &'a [u8], qos: QoS, retain: bool) -> Message<'a> {
        Message {
            topic,
            payload,
            qos,
            retain,
            properties: Props::EMPTY,
            expires: None,
        }
    }
}

/// Why `prepare_next` dropped a message unsent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unsendable {
    /// Its `expires` passed (counted `expired`).
    Expired,
    /// It is larger than the broker takes now (counted `rejected`).
    TooLarge,
}

/// A message `prepare_next` dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dropped {
    pub why: Unsendable,
    pub qos: QoS,
    /// The whole packet's length.
    pub len: usize,
    /// Its topic, for the log.
    pub topic: heapless::String<MAX_TOPIC_LEN>,
    /// Its record in the disk spool, 0 for none: to be released.
    pub stored: u64,
    /// Its ticket.
    pub ticket: u64,
}

/// A message accepted into the spool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pushed {
    /// Older queued QoS 0 messages evicted to make room for it.
    pub evicted: usize,
}

/// Counters since start, for the bus `stats` call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Messages accepted by `push`.
    pub published: u64,
    /// Messages written completely for the first time.
    pub sent: u64,
    /// QoS 1 messages written completely again after a reconnect.
    pub resent: u64,
    /// PUBACKs that matched a message in flight.
    pub acked: u64,
    /// Queued QoS 0 messages evicted to make room.
    pub evicted: u64,
    /// Pushes refused with `Busy`.
    pub busy: u64,
    /// Messages dropped unsent because their expiry passed.
    pub expired: u64,
    /// QoS 1 messages the broker refused with a failure reason code, and
    /// messages too large for the broker's Maximum Packet Size.
    pub rejected: u64,
    /// QoS 1 messages removed as poison [bus-iso-2].
    pub quarantined: u64,
}

/// A message `reset_inflight` removed as poison: what the operator's log
/// line names (never the payload).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quarantined {
    /// Its topic (cut at `MAX_TOPIC_LEN` bytes, which validated topics
    /// never exceed).
    pub topic: heapless::String<MAX_TOPIC_LEN>,
    /// The whole PUBLISH packet's length.
    pub len: usize,
    /// Its record in the disk spool, 0 for none: to be released.
    pub stored: u64,
    /// Its ticket (`last_ticket` when it was pushed).
    pub ticket: u64,
}

/// A message the broker acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Acked {
    /// Its record in the disk spool, 0 for none: to be released.
    pub stored: u64,
    /// Its ticket (`last_ticket` when it was pushed).
    pub ticket: u64,
}

/// The bytes of the current message still to write: `prefix`, then
/// `first`, then `second` (`prefix` is empty unless the message goes with
/// a topic alias, `second` unless it wraps around the end of the region).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outgoing<'a> {
    pub prefix: &'a [u8],
    pub first: &'a [u8],
    pub second: &'a [u8],
    /// The whole packet's length.
    pub len: usize,
    /// Bytes of the packet already written.
    pub written: usize,
    /// Whether this call started the message (the moment to charge the rate
    /// limiter); false when it continues one started earlier.
    pub started: bool,
    pub qos: QoS,
    /// The packet id of a QoS 1 message.
    pub packet_id: Option<u16>,
}

impl Outgoing<'_> {
    /// Bytes still to write: `prefix`, `first` and `second` together.
    pub fn remaining(&self) -> usize {
        self.prefix.len() + self.first.len() + self.second.len()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Waiting to be (re)sent: not yet written completely on this connection.
    Queued,
    /// A QoS 1 written completely, waiting for its PUBACK.
    Inflight,
    /// Done or evicted; its bytes are a hole until reclaimed.
    Dead,
}

/// The end of a lane's list.
const NIL: usize = usize::MAX;

/// One message's metadata. Entries are byte-adjacent in ring order: each
/// starts where the previous one ends, holes included.
#[derive(Clone, Copy, Debug)]
struct Entry {
    /// Start of the packet in the byte region.
    off: usize,
    /// Length of the whole packet.
    len: usize,
    /// Where the packet id sits within the packet (QoS 1 only).
    id_at: usize,
    qos: QoS,
    state: State,
    /// 0 until a QoS 1 is first started.
    packet_id: u16,
    /// Written completely at least once, so the next completion is a resend.
    sent_before: bool,
    /// When `push` took it.
    queued_at: Instant,
    /// The lane it waits in [bus-iso-5].
    lane: usize,
    /// The metadata slot of the next message waiting in the same lane, or
    /// `NIL`; meaningful only while this one waits in its lane.
    next: usize,
    /// Its record in the disk spool (`journal`), 0 for none.
    stored: u64,
    /// Loaded from the disk spool at start-up and not yet started: it
    /// goes before anything new [spool-6].
    restored: bool,
    /// Its number among the messages pushed (1, 2, ...): what a call
    /// waiting for its PUBACK waits on.
    ticket: u64,
    /// When it stops being worth sending.
    expires: Option<Instant>,
    /// Where its Message Expiry Interval's value sits in the packet (MQTT
    /// 5 with an expiry), 0 for none: rewritten before each send.
    expiry_at: usize,
    /// Where its property block's length sits (MQTT 5), 0 for none, and
    /// that length: what a topic alias rewrites.
    props_len_at: usize,
    props_len: usize,
}

const EMPTY: Entry = Entry {
    off: 0,
    len: 0,
    id_at: 0,
    qos: QoS::AtMostOnce,
    state: State::Dead,
    packet_id: 0,
    sent_before: false,
    queued_at: Instant::from_millis(0),
    lane: 0,
    next: NIL,
    stored: 0,
    restored: false,
    ticket: 0,
    expires: None,
    expiry_at: 0,
    props_len_at: 0,
    props_len: 0,
};

/// One publishing process's share of the queue [bus-iso-5]: its messages
/// waiting to be started, oldest first, as a list through `Entry::next`.
#[derive(Clone, Copy, Debug)]
struct Lane {
    /// The process it belongs to; 0 for none yet, and always for the last
    /// lane, which every other process shares.
    pid: u32,
    /// Metadata slots of its oldest and newest waiting message, or `NIL`.
    first: usize,
    last: usize,
    /// Messages waiting in it and their bytes ("how long it is").
    waiting: usize,
    waiting_bytes: usize,
    /// Of those, the QoS 0 ones (evictable) and their bytes.
    qos0: usize,
    qos0_bytes: usize,
}

const NO_LANE: Lane = Lane {
    pid: 0,
    first: NIL,
    last: NIL,
    waiting: 0,
    waiting_bytes: 0,
    qos0: 0,
    qos0_bytes: 0,
};

/// The outgoing queue of encoded PUBLISH packets.
///
/// Invariants (checked by the tests after every step): the `count` entries
/// from `head` are byte-adjacent from `start` and their lengths sum to
/// `span <= capacity_bytes`; the first and last entries are live; every
/// queued entry but the current one is in exactly one lane's list, and each
/// list is in ring (push) order; `current` means the entry in slot `cur` was
/// started, is queued, and `written` bytes of it are out.
pub struct Spool {
    buf: Box<[u8]>,
    /// Offset of the first entry's first byte.
    start: usize,
    /// Bytes from `start` to the tail, holes included.
    span: usize,
    meta: Vec<Entry>,
    /// The number of metadata slots: `meta`'s capacity, allocated at
    /// start-up. Slots are first used in order, and `meta` holds the ones
    /// used so far: an idle daemon does not touch (keep resident) the
    /// metadata of 2048 messages it has never held.
    slots: usize,
    /// Slot of the first entry.
    head: usize,
    /// Entries in the ring, dead ones included.
    count: usize,
    /// The started message must be finished before another starts.
    current: bool,
    /// Its metadata slot.
    cur: usize,
    /// Bytes of the current message already written.
    written: usize,
    /// Publishing processes' lanes, the shared one last [bus-iso-5].
    lanes: Box<[Lane]>,
    /// The lane whose turn comes next.
    turn: usize,
    /// Live (queued or in-flight) messages and their bytes.
    live: usize,
    live_bytes: usize,
    inflight: usize,
    /// Bit per packet id held by a live QoS 1 message.
    ids: Box<[u64]>,
    next_id: u16,
    /// QoS 1 messages unacknowledged at the last loss and still live; while
    /// non-zero, only they start, and only while nothing is in flight.
    suspects: usize,
    /// Messages restored from the disk spool not yet started; while
    /// non-zero, only they start [spool-6].
    restored: usize,
    /// The packet id of the suspect with strikes (0: none), and how many.
    struck_id: u16,
    strikes: u8,
    stats: Stats,
    compactions: u64,
    /// The protocol messages are encoded for.
    version: Version,
    /// Topic aliases for the current connection [mqtt5-6].
    aliases: Aliases,
    /// The current message's header with its topic alias (`prefix_len`
    /// bytes), which replaces its first `skip` stored bytes; both 0 for a
    /// message sent as stored.
    prefix: [u8; PREFIX_MAX],
    prefix_len: usize,
    skip: usize,
}

impl Default for Spool {
    /// A spool with the build-time capacities.
    fn default() -> Self {
        Spool::new(consts::SPOOL_BYTES, consts::SPOOL_MESSAGES)
    }
}

impl fmt::Debug for Spool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Spool")
            .field("len", &self.live)
            .field("bytes", &self.live_bytes)
            .field("inflight", &self.inflight)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Spool {
    /// An empty spool with `consts::PUBLISH_LANES` lanes and a shared one;
    /// the only allocations it ever makes happen here. A zero capacity makes
    /// a spool that refuses every push.
    pub fn new(capacity_bytes: usize, capacity_messages: usize) -> Spool {
        Spool {
            buf: vec![0; capacity_bytes].into_boxed_slice(),
            start: 0,
            span: 0,
            meta: Vec::with_capacity(capacity_messages),
            slots: capacity_messages,
            head: 0,
            count: 0,
            current: false,
            cur: 0,
            written: 0,
            lanes: vec![NO_LANE; consts::PUBLISH_LANES + 1].into_boxed_slice(),
            turn: 0,
            live: 0,
            live_bytes: 0,
            inflight: 0,
            ids: vec![0; ID_WORDS].into_boxed_slice(),
            next_id: 1,
            suspects: 0,
            restored: 0,
            struck_id: 0,
            strikes: 0,
            stats: Stats::default(),
            compactions: 0,
            version: Version::V311,
            aliases: Aliases::NONE,
            prefix: [0; PREFIX_MAX],
            prefix_len: 0,
            skip: 0,
        }
    }

    /// Encodes messages pushed from now on for protocol `version` (MQTT
    /// 3.1.1 until called); set once, before the first push.
    pub fn set_version(&mut self, version: Version) {
        self.version = version;
    }

    /// Messages waiting now, queued or in flight.
    pub fn len(&self) -> usize {
        self.live
    }

    /// Whether no message is waiting.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Bytes of the messages waiting now.
    pub fn bytes(&self) -> usize {
        self.live_bytes
    }

    /// QoS 1 messages written and not yet acknowledged.
    pub fn inflight(&self) -> usize {
        self.inflight
    }

    /// The messages waiting now (queued or in flight), QoS 0 and QoS 1:
    /// what stopping now would discard [spool-1]. One pass over the queue.
    pub fn waiting_by_qos(&self) -> (usize, usize) {
        (0..self.count)
            .map(|i| self.entry(i))
            .filter(|e| e.state != State::Dead)
            .fold((0, 0), |(q0, q1), e| match e.qos {
                QoS::AtMostOnce => (q0 + 1, q1),
                QoS::AtLeastOnce => (q0, q1 + 1),
            })
    }

    /// How long the oldest message waiting (queued or in flight) has
    /// waited; zero when none does.
    pub fn oldest_age(&self, now: Instant) -> core::time::Duration {
        // The first entry is live whenever there is one (the invariant).
        if self.count == 0 {
            return core::time::Duration::ZERO;
        }
        now.saturating_since(self.entry(0).queued_at)
    }

    /// The counters since start.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Whether messages left unacknowledged by a lost connection are being
    /// resent one at a time [bus-iso-2].
    pub fn probing(&self) -> bool {
        self.suspects > 0
    }

    /// Whether nothing is being written, in flight or probed: a close now
    /// could not be a message's doing [bus-iso-2].
    pub fn is_quiet(&self) -> bool {
        self.suspects == 0 && self.inflight == 0 && !self.current
    }

    /// Encodes a PUBLISH from process `pid` (0: unknown, see `lane_of`)
    /// into the spool, in that process's lane, evicting queued QoS 0 messages from the longest
    /// lanes if that is what it takes to fit. The topic and payload are the
    /// caller's to validate.
    pub fn push(
        &mut self,
        now: Instant,
        pid: u32,
        topic: &str,
        payload: &[u8],
        qos: QoS,
        retain: bool,
    ) -> Result<Pushed, PushError> {
        self.push_message(now, pid, &Message::plain(topic, payload, qos, retain))
    }

    /// The header a message is encoded with: the packet id is written when
    /// it is first started, the time left before each send.
    fn header<'a>(&self, m: &Message<'a>) -> PublishHeader<'a> {
        let v5 = self.version == Version::V5;
        PublishHeader {
            dup: false,
            qos: m.qos,
            retain: m.retain,
            topic: m.topic,
            packet_id: 0,
            payload_len: m.payload.len(),
            properties: v5.then_some(m.properties),
            expiry: (v5 && m.expires.is_some()).then_some(0),
        }
    }

    /// `push` for a message with properties or an expiry.
    pub fn push_message(
        &mut self,
        now: Instant,
        pid: u32,
        m: &Message<'_>,
    ) -> Result<Pushed, PushError> {
        let (qos, payload) = (m.qos, m.payload);
        let header = self.header(m);
        let header_len = header.buffer_len().map_err(|_| PushError::TooLong)?;
        // Cannot overflow: the packet is at most MAX_REMAINING_LEN + 5 bytes.
        let len = header_len + payload.len();

        let Some(evicted) = self.make_room(len) else {
            self.stats.busy += 1;
            return Err(PushError::Busy);
        };
        if self.count >= self.slots || self.span + len > self.buf.len() {
            self.compact();
        }

        // Room is certain now: `make_room` left live_bytes + len <= capacity
        // and live + 1 <= slots, and compaction makes span == live_bytes and
        // count == live.
        let off = self.wrap(self.start + self.span);
        self.put_header(off, &header);
        self.put(self.wrap(off + header_len), payload);
        let id_at = header.packet_id_at().unwrap_or(0);
        let expiry_at = header.expiry_at().unwrap_or(0);
        let (props_len_at, props_len) = header.properties_len_at().unwrap_or((0, 0));

        let lane = self.lane_of(pid);
        let slot = self.slot(self.count);
        if slot == self.meta.len() {
            // First use of this slot: within the capacity, no allocation.
            self.meta.push(EMPTY);
        }
        self.meta[slot] = Entry {
            off,
            len,
            id_at,
            qos,
            state: State::Queued,
            packet_id: 0,
            sent_before: false,
            queued_at: now,
            lane,
            next: NIL,
            stored: 0,
            restored: false,
            ticket: self.stats.published + 1,
            expires: m.expires,
            expiry_at,
            props_len_at,
            props_len,
        };
        self.count += 1;
        self.span += len;
        self.live += 1;
        self.live_bytes += len;
        self.stats.published += 1;
        self.enqueue(slot);
        Ok(Pushed { evicted })
    }

    /// Whether `push` would take a message of this topic, payload length
    /// and QoS now (evicting queued QoS 0 if need be), without pushing it
    /// or counting a refusal.
    pub fn fits(&self, m: &Message<'_>) -> bool {
        let Ok(header_len) = self.header(m).buffer_len() else {
            return false;
        };
        self.room_needed(header_len + m.payload.len()).is_some()
    }

    /// The length `m` would have as a PUBLISH packet (`usize::MAX` past
    /// the MQTT maximum).
    pub fn encoded_len(&self, m: &Message<'_>) -> usize {
        self.header(m)
            .buffer_len()
            .map_or(usize::MAX, |n| n.saturating_add(m.payload.len()))
    }

    /// Before `peek_next_len` and `next`: drops the message `next` would
    /// start if it can no longer be sent (its expiry passed, or it is over
    /// `max_len`, the broker's Maximum Packet Size) and says which it was;
    /// else writes the time it has left into the one that will start
    /// [bus-expiry-1]. Call until it returns `None`.
    pub fn prepare_next(
        &mut self,
        now: Instant,
        inflight_limit: usize,
        max_len: usize,
    ) -> Option<Dropped> {
        let lane = self.startable(inflight_limit)?;
        let slot = self.lanes[lane].first;
        let e = self.meta[slot];
        let why = match e.expires {
            Some(at) if now >= at => Unsendable::Expired,
            _ if e.len > max_len => Unsendable::TooLarge,
            Some(at) => {
                if e.expiry_at != 0 {
                    // Whole seconds left, rounded up: never 0 [bus-expiry-1].
                    let left = at.saturating_since(now);
                    let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
                    let secs = u32::try_from(secs).unwrap_or(u32::MAX).max(1);
                    let at = self.wrap(e.off + e.expiry_at);
                    self.put(at, &secs.to_be_bytes());
                }
                return None;
            }
            None => return None,
        };
        let topic = self.topic_of(&e);
        self.dequeue(lane);
        if e.restored {
            self.meta[slot].restored = false;
            self.restored -= 1;
        }
        self.kill(slot);
        match why {
            Unsendable::Expired => self.stats.expired += 1,
            Unsendable::TooLarge => self.stats.rejected += 1,
        }
        self.settle();
        Some(Dropped {
            why,
            qos: e.qos,
            len: e.len,
            topic,
            stored: e.stored,
            ticket: e.ticket,
        })
    }

    /// The length of the message that `next(inflight_limit, true)` would
    /// start now, for the caller's rate limiter; `None` while a started
    /// message is unfinished (`next` continues it regardless) or when nothing
    /// may start.
    pub fn peek_next_len(&self, inflight_limit: usize) -> Option<usize> {
        let lane = self.startable(inflight_limit)?;
        Some(self.meta[self.lanes[lane].first].len)
    }

    /// The bytes to write next: the rest of the started message, or else, if
    /// `may_start`, the oldest message of the next lane in turn that may
    /// start (a QoS 1 only while the in-flight window has room), which this
    /// call starts (assigning a QoS 1 its packet id). Report what was
    /// written with `advance`.
    pub fn next(&mut self, inflight_limit: usize, may_start: bool) -> Option<Outgoing<'_>> {
        let started = !self.current;
        if started {
            if !may_start {
                return None;
            }
            let lane = self.startable(inflight_limit)?;
            let slot = self.lanes[lane].first;
            let e = self.meta[slot];
            if e.qos == QoS::AtLeastOnce && e.packet_id == 0 {
                let id = self.take_id()?;
                let at = self.wrap(e.off + e.id_at);
                self.put(at, &id.to_be_bytes());
                self.meta[slot].packet_id = id;
            }
            self.dequeue(lane);
            if self.meta[slot].restored {
                self.meta[slot].restored = false;
                self.restored -= 1;
            }
            self.turn = if lane + 1 == self.lanes.len() {
                0
            } else {
                lane + 1
            };
            self.current = true;
            self.cur = slot;
            self.written = 0;
            self.alias_header(slot);
        }
        let e = self.meta[self.cur];
        let len = self.prefix_len + e.len - self.skip;
        // Of the prefix, what is left; then the stored bytes from `skip`.
        let prefix = self
            .prefix
            .get(self.written.min(self.prefix_len)..self.prefix_len)
            .unwrap_or_default();
        let stored_at = self.skip + self.written.saturating_sub(self.prefix_len);
        let pos = self.wrap(e.off + stored_at);
        let rest = e.len.saturating_sub(stored_at);
        let first_len = rest.min(self.buf.len() - pos);
        Some(Outgoing {
            prefix,
            first: self.buf.get(pos..pos + first_len).unwrap_or_default(),
            second: self.buf.get(..rest - first_len).unwrap_or_default(),
            len,
            written: self.written,
            started,
            qos: e.qos,
            packet_id: (e.packet_id != 0).then_some(e.packet_id),
        })
    }

    /// Records that `n` more bytes of the message from `next` were written;
    /// true when that finished it. Without a started message this does
    /// nothing; `n` past the end counts as the end.
    pub fn advance(&mut self, n: usize) -> bool {
        if !self.current {
            return false;
        }
        let slot = self.cur;
        let e = self.meta[slot];
        let len = self.prefix_len + e.len - self.skip;
        self.written = self.written.saturating_add(n).min(len);
        if self.written < len {
            return false;
        }
        self.current = false;
        self.written = 0;
        self.prefix_len = 0;
        self.skip = 0;
        if e.sent_before {
            self.stats.resent += 1;
        } else {
            self.stats.sent += 1;
        }
        match e.qos {
            QoS::AtMostOnce => self.kill(slot),
            QoS::AtLeastOnce => {
                self.meta[slot].state = State::Inflight;
                self.meta[slot].sent_before = true;
                self.inflight += 1;
            }
        }
        self.settle();
        true
    }

    /// The ticket of the message `push` took last.
    pub fn last_ticket(&self) -> u64 {
        self.stats.published
    }

    /// Records that the message `push` took last is record `seq` of the
    /// disk spool, to be released when it is done.
    pub fn store_last(&mut self, seq: u64) {
        if self.count > 0 {
            let slot = self.slot(self.count - 1);
            self.meta[slot].stored = seq;
        }
    }

    /// Marks the message `push` took last as restored from the disk spool
    /// after a restart: restored messages start before any other
    /// [spool-6].
    pub fn restored_last(&mut self) {
        if self.count > 0 {
            let slot = self.slot(self.count - 1);
            if !self.meta[slot].restored {
                self.meta[slot].restored = true;
                self.restored += 1;
            }
        }
    }

    /// A PUBACK: releases the in-flight QoS 1 with this id, and says which
    /// message it was. `None`, and nothing changes, when no
    /// message in flight has it (also for a message put back in the queue
    /// by `reset_inflight`).
    pub fn ack(&mut self, packet_id: u16) -> Option<Acked> {
        self.ack_with(packet_id, true)
    }

    /// A PUBACK with its verdict: `accepted` false for a failure reason
    /// code (MQTT 5), counted `rejected` instead of `acked`. The message
    /// is done either way: a refused one is never resent [mqtt5-7].
    pub fn ack_with(&mut self, packet_id: u16, accepted: bool) -> Option<Acked> {
        if !IDS.contains(packet_id) || !self.id_held(packet_id) {
            return None;
        }
        // Messages in flight are mostly the oldest: search from the front.
        for i in 0..self.count {
            let slot = self.slot(i);
            let e = self.meta[slot];
            if e.state == State::Inflight && e.packet_id == packet_id {
                self.kill(slot);
                self.inflight -= 1;
                if accepted {
                    self.stats.acked += 1;
                } else {
                    self.stats.rejected += 1;
                }
                self.settle();
                return Some(Acked {
                    stored: e.stored,
                    ticket: e.ticket,
                });
            }
        }
        None
    }

    /// The topic of the message `next` started last (for the trace of
    /// each message sent): its bytes stay until the next push.
    pub fn last_started_topic(&self) -> heapless::String<MAX_TOPIC_LEN> {
        self.topic_of(&self.meta[self.cur])
    }

    /// The topic of the in-flight message with this packet id (for the
    /// log of a refusal).
    pub fn inflight_topic(&self, packet_id: u16) -> Option<heapless::String<MAX_TOPIC_LEN>> {
        (0..self.count)
            .map(|i| self.meta[self.slot(i)])
            .find(|e| e.state == State::Inflight && e.packet_id == packet_id)
            .map(|e| self.topic_of(&e))
    }

    /// The connection dropped: every unacknowledged QoS 1 goes back to the
    /// front of its lane with DUP set and its packet id kept
    /// [MQTT-4.4.0-1], and a message cut off mid-write starts again from its
    /// first byte. They are the suspects, resent one at a time before
    /// anything else from now on; the probe of the connection that ended
    /// gets a strike, and is returned, removed, at its
    /// `QUARANTINE_STRIKES`th [bus-iso-2].
    pub fn reset_inflight(&mut self) -> Option<Quarantined> {
        let quarantined = self.strike_probe();
        self.suspects = 0;
        for i in 0..self.count {
            let slot = self.slot(i);
            let e = self.meta[slot];
            if e.state != State::Dead && e.packet_id != 0 {
                // Messages still waiting in their lane that hold an id got
                // DUP at an earlier reset.
                self.meta[slot].state = State::Queued;
                let last = self.buf.len().min(e.off + e.len);
                if let Some(bytes) = self.buf.get_mut(e.off..last) {
                    packet::set_dup(bytes);
                }
                self.suspects += 1;
            }
        }
        self.inflight = 0;
        self.current = false;
        self.written = 0;
        self.prefix_len = 0;
        self.skip = 0;
        self.aliases = Aliases::NONE;
        self.settle();
        self.rebuild_lanes();
        if self.suspects == 0 {
            self.struck_id = 0;
            self.strikes = 0;
        }
        quarantined
    }

    /// While probing, the probe started on the connection just lost (in
    /// flight, or cut off mid-write) gets a strike; at the last one it is
    /// removed and described.
    fn strike_probe(&mut self) -> Option<Quarantined> {
        if self.suspects == 0 {
            return None;
        }
        let slot = (0..self.count).map(|i| self.slot(i)).find(|&slot| {
            let e = &self.meta[slot];
            e.packet_id != 0 && (e.state == State::Inflight || (self.current && slot == self.cur))
        })?;
        let e = self.meta[slot];
        if self.struck_id == e.packet_id {
            self.strikes = self.strikes.saturating_add(1);
        } else {
            self.struck_id = e.packet_id;
            self.strikes = 1;
        }
        if self.strikes < QUARANTINE_STRIKES {
            return None;
        }
        let q = Quarantined {
            topic: self.topic_of(&e),
            len: e.len,
            stored: e.stored,
            ticket: e.ticket,
        };
        if e.state == State::Inflight {
            self.inflight -= 1;
        } else {
            self.current = false;
            self.written = 0;
        }
        self.kill(slot);
        self.stats.quarantined += 1;
        Some(q)
    }

    /// The topic of a stored PUBLISH, read from the ring (it may wrap).
    fn topic_of(&self, e: &Entry) -> heapless::String<MAX_TOPIC_LEN> {
        let byte = |k: usize| self.buf.get(self.wrap(e.off + k)).copied().unwrap_or(0);
        // The fixed header: one byte, then 1..=4 bytes of remaining length.
        let mut at = 1;
        while at < 5 && byte(at) & 0x80 != 0 {
            at += 1;
        }
        at += 1;
        let len = usize::from(u16::from_be_bytes([byte(at), byte(at + 1)]));
        let mut raw = heapless::Vec::<u8, MAX_TOPIC_LEN>::new();
        for k in 0..len.min(MAX_TOPIC_LEN) {
            // Cannot fail: at most MAX_TOPIC_LEN bytes.
            let _ = raw.push(byte(at + 2 + k));
        }
        let mut topic = heapless::String::new();
        let valid = match core::str::from_utf8(&raw) {
            Ok(s) => s,
            // A topic cut inside a character: keep the whole ones.
            Err(err) => core::str::from_utf8(&raw[..err.valid_up_to()]).unwrap_or_default(),
        };
        let _ = topic.push_str(valid); // fits: at most MAX_TOPIC_LEN bytes
        topic
    }

    /// The lane whose oldest message `next` would start now: the first, in
    /// turn from `turn`, whose oldest message may start [bus-iso-5].
    fn startable(&self, inflight_limit: usize) -> Option<usize> {
        if self.current {
            return None;
        }
        // Probing [bus-iso-2]: one message at a time, suspects first.
        if self.suspects > 0 && self.inflight > 0 {
            return None;
        }
        let limit = inflight_limit.min(IDS.size());
        let n = self.lanes.len();
        (0..n)
            .map(|k| {
                let l = self.turn + k;
                l.checked_sub(n).unwrap_or(l)
            })
            .find(|&l| {
                let slot = self.lanes[l].first;
                let Some(e) = self.meta.get(slot) else {
                    return false; // NIL: nothing waits in this lane
                };
                (self.suspects == 0 || e.packet_id != 0)
                    && (self.restored == 0 || e.restored)
                    && (e.qos == QoS::AtMostOnce || self.inflight < limit)
            })
    }

    /// Makes room for a packet of `len` bytes by evicting queued QoS 0
    /// messages, each the oldest of the longest lane that has one
    /// [bus-iso-5]; returns how many. `None`, and nothing is evicted, if
    /// evicting all of them would not make room.
    fn make_room(&mut self, len: usize) -> Option<usize> {
        let (need_msgs, need_bytes) = self.room_needed(len)?;
        if need_msgs == 0 && need_bytes == 0 {
            return Some(0);
        }
        let (mut msgs, mut bytes) = (0, 0);
        while msgs < need_msgs || bytes < need_bytes {
            // Some lane has a QoS 0 left: the totals above cover the need.
            let Some(l) = (0..self.lanes.len())
                .filter(|&l| self.lanes[l].qos0 > 0)
                .max_by_key(|&l| {
                    let lane = &self.lanes[l];
                    (lane.waiting, lane.waiting_bytes, core::cmp::Reverse(l))
                })
            else {
                break;
            };
            bytes += self.evict_oldest_qos0(l);
            msgs += 1;
        }
        self.settle();
        Some(msgs)
    }

    /// What must be evicted (messages, bytes) for a packet of `len` bytes
    /// to fit; `None` if evicting every queued QoS 0 would not do.
    fn room_needed(&self, len: usize) -> Option<(usize, usize)> {
        if len > self.buf.len() {
            return None;
        }
        let need_msgs = (self.live + 1).saturating_sub(self.slots);
        let need_bytes = (self.live_bytes + len).saturating_sub(self.buf.len());
        if need_msgs == 0 && need_bytes == 0 {
            return Some((0, 0));
        }
        let (msgs, bytes) = self
            .lanes
            .iter()
            .fold((0, 0), |(m, b), l| (m + l.qos0, b + l.qos0_bytes));
        (msgs >= need_msgs && bytes >= need_bytes).then_some((need_msgs, need_bytes))
    }

    /// Evicts the oldest QoS 0 waiting in lane `l` (which has one); returns
    /// its length.
    fn evict_oldest_qos0(&mut self, l: usize) -> usize {
        let (mut prev, mut slot) = (NIL, self.lanes[l].first);
        while let Some(e) = self.meta.get(slot) {
            if e.qos == QoS::AtMostOnce {
                let len = e.len;
                self.unlink(l, prev, slot);
                self.kill(slot);
                self.stats.evicted += 1;
                return len;
            }
            (prev, slot) = (slot, e.next);
        }
        0
    }

    /// Marks the entry in `slot` dead and releases what it held, except its
    /// bytes. The caller took it out of its lane first.
    fn kill(&mut self, slot: usize) {
        let e = self.meta[slot];
        self.meta[slot].state = State::Dead;
        self.live -= 1;
        self.live_bytes -= e.len;
        if e.packet_id != 0 {
            self.set_id(e.packet_id, false);
            // Only suspects hold ids while probing: nothing else starts.
            self.suspects = self.suspects.saturating_sub(1);
            if e.packet_id == self.struck_id {
                self.struck_id = 0;
                self.strikes = 0;
            }
        }
    }

    /// Reclaims dead entries at both ends.
    fn settle(&mut self) {
        while self.count > 0 && self.entry(0).state == State::Dead {
            let len = self.entry(0).len;
            self.head = self.slot(1);
            self.count -= 1;
            self.start = self.wrap(self.start + len);
            self.span -= len;
        }
        while self.count > 0 && self.entry(self.count - 1).state == State::Dead {
            self.span -= self.entry(self.count - 1).len;
            self.count -= 1;
        }
    }

    /// Moves every live message down over the holes so that they sit packed
    /// from offset 0, and the live entries from slot 0; the lanes' lists
    /// are made anew.
    fn compact(&mut self) {
        self.compactions += 1;
        self.buf.rotate_left(self.start);
        self.meta.rotate_left(self.head);
        let old_cur = self.slot_index(self.cur);
        let (mut from, mut to, mut kept) = (0, 0, 0);
        for i in 0..self.count {
            let e = self.meta[i];
            if e.state != State::Dead {
                self.buf.copy_within(from..from + e.len, to);
                self.meta[kept] = Entry { off: to, ..e };
                if self.current && i == old_cur {
                    self.cur = kept;
                }
                kept += 1;
                to += e.len;
            }
            from += e.len;
        }
        self.start = 0;
        self.span = to;
        self.head = 0;
        self.count = kept;
        self.rebuild_lanes();
    }

    /// The index (from the first entry) of the entry in `slot`.
    fn slot_index(&self, slot: usize) -> usize {
        (slot + self.slots - self.head) % self.slots.max(1)
    }

    /// Writes `bytes` into the ring at `pos`, wrapping; returns the position
    /// after them. The caller made sure they fit.
    fn put(&mut self, pos: usize, bytes: &[u8]) -> usize {
        let first = bytes.len().min(self.buf.len() - pos);
        let (a, b) = bytes.split_at(first);
        self.buf[pos..pos + first].copy_from_slice(a);
        self.buf[..b.len()].copy_from_slice(b);
        self.wrap(pos + bytes.len())
    }

    /// Writes `header`, as the codec encodes it, into the ring at `pos`,
    /// wrapping at the region's end like `put`.
    fn put_header(&mut self, pos: usize, header: &PublishHeader<'_>) {
        let (start, end) = self.buf.split_at_mut(pos.min(self.buf.len()));
        // Cannot fail: `buffer_len` accepted the header, and `push` made room.
        let _ = header.emit_split(end, start);
    }

    /// A free packet id from the publish space, taken; the search goes on
    /// from the last one handed out.
    fn take_id(&mut self) -> Option<u16> {
        for _ in 0..IDS.size() {
            let id = self.next_id;
            self.next_id = IDS.after(id);
            if !self.id_held(id) {
                self.set_id(id, true);
                return Some(id);
            }
        }
        None
    }

    fn id_held(&self, id: u16) -> bool {
        let i = usize::from(id);
        self.ids.get(i / 64).is_some_and(|w| w >> (i % 64) & 1 != 0)
    }

    fn set_id(&mut self, id: u16, held: bool) {
        let i = usize::from(id);
        if let Some(w) = self.ids.get_mut(i / 64) {
            if held {
                *w |= 1 << (i % 64);
            } else {
                *w &= !(1 << (i % 64));
            }
        }
    }

    /// Position `x` (less than twice the capacity) folded into the region.
    fn wrap(&self, x: usize) -> usize {
        x.checked_sub(self.buf.len()).unwrap_or(x)
    }

    /// The metadata slot of entry `i` (`i` at most the slot count).
    fn slot(&self, i: usize) -> usize {
        let s = self.head + i;
        s.checked_sub(self.slots).unwrap_or(s)
    }

    fn entry(&self, i: usize) -> &Entry {
        &self.meta[self.slot(i)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::packet::{Packet, Publish, MAX_REMAINING_LEN};
    use std::collections::VecDeque;
    use std::time::Duration;

    const Q0: QoS = QoS::AtMostOnce;
    const Q1: QoS = QoS::AtLeastOnce;

    /// The invariants documented on `Spool`, checked from the outside in.
    fn check(s: &Spool) {
        let cap = s.buf.len();
        assert!(s.count <= s.slots && s.meta.len() <= s.slots);
        assert!(s.meta.capacity() == s.slots, "meta never reallocates");
        assert!(s.span <= cap);
        let (mut pos, mut sum, mut live, mut bytes, mut inflight) = (s.start, 0, 0, 0, 0);
        let mut held = [0u64; ID_WORDS];
        // Per lane: the queued entries (not the current one) in ring order.
        let mut want: Vec<Vec<usize>> = vec![Vec::new(); s.lanes.len()];
        for i in 0..s.count {
            let slot = s.slot(i);
            let e = s.entry(i);
            assert_eq!(e.off, pos, "entry {i} is not adjacent to the previous one");
            assert!(e.len > 0);
            assert!(e.lane < s.lanes.len());
            pos = s.wrap(pos + e.len);
            sum += e.len;
            match e.state {
                State::Dead => {}
                State::Inflight => inflight += 1,
                State::Queued if s.current && slot == s.cur => {}
                State::Queued => want[e.lane].push(slot),
            }
            if e.state != State::Dead {
                live += 1;
                bytes += e.len;
                if e.packet_id != 0 {
                    assert_eq!(e.qos, Q1);
                    let (w, b) = (usize::from(e.packet_id) / 64, e.packet_id % 64);
                    assert_eq!(held[w] >> b & 1, 0, "id {} twice", e.packet_id);
                    held[w] |= 1 << b;
                }
            }
        }
        for (l, lane) in s.lanes.iter().enumerate() {
            let mut got = Vec::new();
            let mut slot = lane.first;
            while slot != NIL {
                assert!(got.len() <= s.count, "lane {l} loops");
                got.push(slot);
                slot = s.meta[slot].next;
            }
            assert_eq!(
                got, want[l],
                "lane {l}: its list is its queued entries in ring order"
            );
            assert_eq!(lane.last, got.last().copied().unwrap_or(NIL));
            let of = |q: Option<QoS>| {
                let es = got.iter().map(|&i| s.meta[i]);
                let es: Vec<_> = es.filter(|e| q.map_or(true, |q| e.qos == q)).collect();
                (es.len(), es.iter().map(|e| e.len).sum::<usize>())
            };
            assert_eq!((lane.waiting, lane.waiting_bytes), of(None), "lane {l}");
            assert_eq!((lane.qos0, lane.qos0_bytes), of(Some(Q0)), "lane {l}");
        }
        assert_eq!(
            s.lanes[s.lanes.len() - 1].pid,
            0,
            "the shared lane is nobody's"
        );
        assert_eq!(sum, s.span);
        if s.count > 0 {
            assert_ne!(s.entry(0).state, State::Dead);
            assert_ne!(s.entry(s.count - 1).state, State::Dead);
        }
        assert_eq!((live, bytes, inflight), (s.live, s.live_bytes, s.inflight));
        let restored = (0..s.count).map(|i| s.entry(i)).filter(|e| e.restored);
        assert!(restored.clone().all(|e| e.state == State::Queued));
        assert_eq!(restored.count(), s.restored, "restored, not yet started");
        assert_eq!(&held[..], &s.ids[..], "packet id bitmap");
        if s.suspects > 0 {
            let with_ids = held.iter().map(|w| w.count_ones() as usize).sum::<usize>();
            assert_eq!(s.suspects, with_ids, "only suspects hold ids while probing");
            assert!(s.inflight <= 1, "one probe at a time");
        } else {
            assert_eq!((s.struck_id, s.strikes), (0, 0));
        }
        if s.current {
            let e = &s.meta[s.cur];
            assert_eq!(e.state, State::Queued, "the current message is live");
            assert!((0..s.count).any(|i| s.slot(i) == s.cur));
            assert!(s.written < e.len);
        } else {
            assert_eq!(s.written, 0);
        }
    }

    fn encoded(topic: &str, payload: &[u8], qos: QoS, retain: bool, id: u16, dup: bool) -> Vec<u8> {
        let p = Packet::Publish(Publish {
            properties: None,
            dup,
            qos,
            retain,
            topic,
            packet_id: (qos == Q1).then_some(id),
            payload,
        });
        let mut v = vec![0; p.buffer_len()];
        assert_eq!(p.emit(&mut v), Ok(v.len()));
        v
    }

    fn publish_of(bytes: &[u8]) -> Publish<'_> {
        match Packet::parse(bytes) {
            Ok(Packet::Publish(p)) => p,
            other => panic!("not a publish: {other:?}"),
        }
    }

    fn rest(out: &Outgoing<'_>) -> Vec<u8> {
        let mut v = out.prefix.to_vec();
        v.extend_from_slice(out.first);
        v.extend_from_slice(out.second);
        v
    }

    /// Starts and writes the next message whole.
    fn send(s: &mut Spool, limit: usize) -> Option<Vec<u8>> {
        let out = s.next(limit, true)?;
        assert!(out.started);
        assert_eq!(out.written, 0);
        let bytes = rest(&out);
        assert_eq!(bytes.len(), out.len);
        assert!(s.advance(bytes.len()));
        check(s);
        Some(bytes)
    }

    fn send_all(s: &mut Spool, limit: usize) -> Vec<Vec<u8>> {
        let mut v = Vec::new();
        while let Some(bytes) = send(s, limit) {
            v.push(bytes);
        }
        v
    }

    fn push(s: &mut Spool, topic: &str, payload: &[u8], qos: QoS) -> Result<Pushed, PushError> {
        let r = s.push(Instant::default(), 1, topic, payload, qos, false);
        check(s);
        r
    }

    fn payloads(packets: &[Vec<u8>]) -> Vec<Vec<u8>> {
        packets
            .iter()
            .map(|p| publish_of(p).payload.to_vec())
            .collect()
    }

    #[test]
    fn pushed_qos0_and_qos1_messages_encode_as_publishes_with_the_assigned_id() {
        let mut s = Spool::new(1024, 4);
        s.push(Instant::default(), 1, "a/b", b"zero", Q0, true)
            .unwrap();
        s.push(
            Instant::default(),
            1,
            "$aws/things/t/shadow/update",
            b"{\"one\":1}",
            Q1,
            false,
        )
        .unwrap();
        let big = vec![0xA5; 300]; // two-byte remaining length
        s.push(Instant::default(), 1, "c", &big, Q1, true).unwrap();
        check(&s);
        assert_eq!(s.len(), 3);

        let sent = send_all(&mut s, 10);
        assert_eq!(sent.len(), 3);
        let p = publish_of(&sent[0]);
        assert_eq!(
            (p.topic, p.payload, p.qos, p.retain),
            ("a/b", &b"zero"[..], Q0, true)
        );
        assert_eq!((p.packet_id, p.dup), (None, false));
        assert_eq!(sent[0], encoded("a/b", b"zero", Q0, true, 0, false));

        let p = publish_of(&sent[1]);
        assert_eq!(p.topic, "$aws/things/t/shadow/update");
        assert_eq!(
            (p.payload, p.qos, p.retain),
            (&b"{\"one\":1}"[..], Q1, false)
        );
        assert_eq!((p.packet_id, p.dup), (Some(1), false));

        let p = publish_of(&sent[2]);
        assert_eq!(
            (p.topic, p.payload, p.qos, p.retain),
            ("c", &big[..], Q1, true)
        );
        assert_eq!(p.packet_id, Some(2));
        assert_eq!(sent[2].len(), packet::publish_len(1, 300, Q1));

        assert_eq!(s.inflight(), 2);
        assert_eq!(s.len(), 2); // QoS 1 stay until acked
        assert!(s.ack(1).is_some() && s.ack(2).is_some());
        assert!(s.is_empty());
        assert_eq!(s.bytes(), 0);
        check(&s);
    }

    #[test]
    fn messages_come_out_in_order_across_wraps_with_some_straddling_the_end() {
        let mut s = Spool::new(100, 16);
        let (mut got, mut straddled) = (Vec::new(), 0);
        let mut take_one = |s: &mut Spool, got: &mut Vec<u8>| {
            let out = s.next(1, true).unwrap();
            if !out.second.is_empty() {
                straddled += 1;
            }
            let bytes = rest(&out);
            assert_eq!(bytes.len(), out.len);
            s.advance(bytes.len());
            check(s);
            got.push(publish_of(&bytes).payload[0]);
        };
        for k in 0u8..120 {
            let payload = vec![k; 5 + usize::from(k) % 17];
            let len = packet::publish_len(3, payload.len(), Q0);
            while s.bytes() + len > 100 {
                take_one(&mut s, &mut got);
            }
            assert_eq!(push(&mut s, "t/x", &payload, Q0), Ok(Pushed { evicted: 0 }));
            if k % 3 == 0 {
                take_one(&mut s, &mut got);
            }
        }
        while !s.is_empty() {
            take_one(&mut s, &mut got);
        }
        assert_eq!(got, (0..120).collect::<Vec<_>>());
        assert!(
            straddled >= 5,
            "only {straddled} messages straddled the end"
        );
        assert_eq!(s.stats().evicted, 0);
    }

    #[test]
    fn writing_one_byte_at_a_time_reassembles_the_exact_packets() {
        let mut s = Spool::new(64, 8);
        let mut expected = Vec::new();
        let mut wire = Vec::new();
        for k in 0u8..12 {
            let qos = if k % 2 == 0 { Q0 } else { Q1 };
            let payload = vec![k; usize::from(k) * 2];
            push(&mut s, "one/byte", &payload, qos).unwrap();
            let mut id = 0;
            while let Some(out) = s.next(8, true) {
                assert_eq!(out.started, out.written == 0);
                id = out.packet_id.unwrap_or(0);
                let byte = out.first.first().copied().unwrap();
                let last = out.remaining() == 1;
                wire.push(byte);
                assert_eq!(s.advance(1), last);
                check(&s);
            }
            expected.extend(encoded("one/byte", &payload, qos, false, id, false));
            if qos == Q1 {
                assert!(s.ack(id).is_some());
            }
        }
        assert_eq!(wire, expected);
        assert_eq!(s.stats().sent, 12);
    }

    #[test]
    fn a_started_message_is_finished_before_any_other_and_without_the_rate_limiter() {
        let mut s = Spool::new(256, 8);
        push(&mut s, "a", b"first", Q1).unwrap();
        push(&mut s, "a", b"second", Q0).unwrap();
        assert_eq!(s.peek_next_len(1), Some(packet::publish_len(1, 5, Q1)));
        assert!(s.next(1, false).is_none(), "the rate limiter said no");
        let out = s.next(1, true).unwrap();
        assert!(out.started);
        let full = rest(&out);
        s.advance(3);
        assert_eq!(s.peek_next_len(1), None, "nothing new may start");
        let out = s.next(0, false).unwrap();
        assert!(!out.started);
        assert_eq!((out.written, rest(&out)), (3, full[3..].to_vec()));
        assert!(!s.advance(0));
        assert!(s.advance(usize::MAX), "past the end counts as the end");
        assert!(
            !s.advance(5),
            "advance without a started message does nothing"
        );
        check(&s);
        assert_eq!(
            send(&mut s, 1).map(|p| payloads(&[p])),
            Some(vec![b"second".to_vec()])
        );
    }

    #[test]
    fn oldest_queued_qos0_are_evicted_to_make_room_for_qos0_and_qos1() {
        let len = packet::publish_len(1, 10, Q0); // 15 bytes
        let mut s = Spool::new(4 * len, 16);
        for k in 0..4 {
            assert_eq!(push(&mut s, "t", &[k; 10], Q0), Ok(Pushed { evicted: 0 }));
        }
        assert_eq!(s.bytes(), 4 * len);
        // 15 more bytes: the oldest (0) goes.
        assert_eq!(push(&mut s, "t", &[4; 10], Q0), Ok(Pushed { evicted: 1 }));
        // A QoS 1 of 15 + 2 + 10 bytes needs two to go: 1 and 2.
        assert_eq!(push(&mut s, "t", &[5; 20], Q1), Ok(Pushed { evicted: 2 }));
        let st = s.stats();
        assert_eq!((st.published, st.evicted, st.busy), (6, 3, 0));
        assert_eq!(s.len(), 3);
        assert_eq!(s.bytes(), 2 * len + packet::publish_len(1, 20, Q1));
        let got = payloads(&send_all(&mut s, 4));
        assert_eq!(got, vec![vec![3; 10], vec![4; 10], vec![5; 20]]);
        assert_eq!(s.stats().sent, 3);
    }

    #[test]
    fn qos1_is_never_evicted_and_busy_leaves_the_state_unchanged() {
        let len1 = packet::publish_len(1, 10, Q1);
        let mut s = Spool::new(2 * len1 + 13, 16);
        push(&mut s, "t", &[1; 10], Q1).unwrap();
        send(&mut s, 4).unwrap(); // in flight
        push(&mut s, "t", &[2; 10], Q1).unwrap(); // queued
        push(&mut s, "t", &[3; 3], Q0).unwrap(); // queued, 8 bytes
        let (len, bytes, stats) = (s.len(), s.bytes(), s.stats());
        // Each needs 17 bytes of the 13 free; evicting the QoS 0 frees only 8.
        assert_eq!(push(&mut s, "t", &[4; 10], Q1), Err(PushError::Busy));
        assert_eq!(push(&mut s, "t", &[4; 12], Q0), Err(PushError::Busy));
        assert_eq!((s.len(), s.bytes()), (len, bytes));
        assert_eq!(s.stats(), Stats { busy: 2, ..stats });
        // A message larger than the whole region is busy at once.
        assert_eq!(push(&mut s, "t", &[0; 100], Q0), Err(PushError::Busy));
        assert_eq!(s.stats().busy, 3);
        // Nothing was lost: the queued messages still go out, in order.
        let got = payloads(&send_all(&mut s, 4));
        assert_eq!(got, vec![vec![2; 10], vec![3; 3]]);
        assert!(s.ack(1).is_some() && s.ack(2).is_some());
        assert!(s.is_empty());
    }

    #[test]
    fn a_started_qos0_is_not_evicted() {
        let len = packet::publish_len(1, 10, Q0);
        let mut s = Spool::new(2 * len, 16);
        push(&mut s, "t", &[1; 10], Q0).unwrap();
        push(&mut s, "t", &[2; 10], Q0).unwrap();
        let first = rest(&s.next(1, true).unwrap());
        s.advance(0); // started, nothing written yet: the caller may hold the bytes
        assert_eq!(push(&mut s, "t", &[3; 10], Q0), Ok(Pushed { evicted: 1 }));
        let out = s.next(1, false).unwrap();
        assert_eq!(rest(&out), first);
        s.advance(first.len());
        assert_eq!(payloads(&send_all(&mut s, 1)), vec![vec![3; 10]]);
    }

    /// A full 68-byte spool of four 17-byte messages, A (QoS 1) then B, C
    /// and D (QoS 0), queued after a 13-byte filler moved the start, so the
    /// ring wraps.
    fn four_queued_after_a_filler() -> Spool {
        let mut s = Spool::new(68, 16);
        push(&mut s, "t", &[0; 8], Q0).unwrap();
        send(&mut s, 4).unwrap();
        push(&mut s, "t", b"AAAAAAAAAA", Q1).unwrap();
        push(&mut s, "t", b"BBBBBBBBBBBB", Q0).unwrap();
        push(&mut s, "t", b"CCCCCCCCCCCC", Q0).unwrap();
        push(&mut s, "t", b"DDDDDDDDDDDD", Q0).unwrap();
        assert_eq!(s.bytes(), 68);
        s
    }

    #[test]
    fn eviction_behind_an_inflight_qos1_compacts_and_keeps_the_rest_intact() {
        let mut s = four_queued_after_a_filler();
        let a = send(&mut s, 4).unwrap(); // A in flight at the head
        assert_eq!(s.compactions, 0);
        // E needs 17 bytes: B, behind A, goes and leaves a hole.
        assert_eq!(
            push(&mut s, "t", b"EEEEEEEEEEEE", Q0),
            Ok(Pushed { evicted: 1 })
        );
        assert_eq!(s.compactions, 1);
        assert_eq!(s.start, 0);
        // A's bytes moved but are intact; after a reset they are resent.
        s.reset_inflight();
        let again = send(&mut s, 4).unwrap();
        assert_eq!(again, encoded("t", b"AAAAAAAAAA", Q1, false, 1, true));
        assert_eq!(again[1..], a[1..]);
        assert!(s.ack(1).is_some());
        let got = payloads(&send_all(&mut s, 4));
        assert_eq!(
            got,
            vec![
                b"CCCCCCCCCCCC".to_vec(),
                b"DDDDDDDDDDDD".to_vec(),
                b"EEEEEEEEEEEE".to_vec()
            ]
        );
        assert!(s.is_empty());
    }

    #[test]
    fn compaction_moves_a_message_in_the_middle_of_being_written_safely() {
        let mut s = four_queued_after_a_filler();
        send(&mut s, 4).unwrap();
        let out = s.next(4, true).unwrap();
        let b = rest(&out);
        s.advance(5); // B is half written: C is the oldest evictable
        assert_eq!(
            push(&mut s, "t", b"EEEEEEEEEEEE", Q0),
            Ok(Pushed { evicted: 1 })
        );
        assert_eq!(s.compactions, 1);
        let out = s.next(4, false).unwrap();
        assert_eq!((out.written, rest(&out)), (5, b[5..].to_vec()));
        let n = out.remaining();
        s.advance(n);
        let got = payloads(&send_all(&mut s, 4));
        assert_eq!(
            got,
            vec![b"DDDDDDDDDDDD".to_vec(), b"EEEEEEEEEEEE".to_vec()]
        );
    }

    #[test]
    fn the_message_count_limit_works_independently_of_the_byte_limit() {
        let mut s = Spool::new(10_000, 3);
        for k in 0..3 {
            push(&mut s, "t", &[k], Q0).unwrap();
        }
        assert_eq!(push(&mut s, "t", &[3], Q0), Ok(Pushed { evicted: 1 }));
        assert_eq!(
            payloads(&send_all(&mut s, 1)),
            vec![vec![1], vec![2], vec![3]]
        );
        for k in 0..3 {
            push(&mut s, "t", &[k], Q1).unwrap();
        }
        assert_eq!(push(&mut s, "t", &[3], Q0), Err(PushError::Busy));
        assert_eq!(s.len(), 3);
        assert!(s.bytes() < 100);
        // Message slots taken by holes behind an in-flight QoS 1 come back.
        let mut s = Spool::new(10_000, 3);
        push(&mut s, "t", &[0], Q1).unwrap();
        push(&mut s, "t", &[1], Q0).unwrap();
        push(&mut s, "t", &[2], Q0).unwrap();
        send(&mut s, 1).unwrap();
        send(&mut s, 1).unwrap(); // 1 leaves a hole between 0 and 2
        assert_eq!((s.len(), s.count), (2, 3));
        assert_eq!(push(&mut s, "t", &[3], Q0), Ok(Pushed { evicted: 0 }));
        assert_eq!(s.compactions, 1);
        assert_eq!(push(&mut s, "t", &[4], Q0), Ok(Pushed { evicted: 1 }));
        assert_eq!(payloads(&send_all(&mut s, 1)), vec![vec![3], vec![4]]);
    }

    #[test]
    fn the_byte_limit_works_independently_of_the_message_count_limit() {
        let len = packet::publish_len(1, 10, Q0);
        let mut s = Spool::new(3 * len, 1000);
        for k in 0..3 {
            push(&mut s, "t", &[k; 10], Q0).unwrap();
        }
        assert_eq!(push(&mut s, "t", &[3; 10], Q0), Ok(Pushed { evicted: 1 }));
        assert_eq!(push(&mut s, "t", &[4; 11], Q0), Ok(Pushed { evicted: 2 }));
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn the_inflight_window_is_respected_and_keeps_the_order() {
        let mut s = Spool::new(1024, 16);
        for k in 0..4 {
            push(&mut s, "t", &[k], Q1).unwrap();
        }
        push(&mut s, "t", &[9], Q0).unwrap();
        assert_eq!(send_all(&mut s, 2).len(), 2);
        assert_eq!(s.inflight(), 2);
        assert_eq!(s.peek_next_len(2), None);
        assert!(
            s.next(2, true).is_none(),
            "window full; the QoS 0 waits its turn"
        );
        assert_eq!(s.peek_next_len(3), Some(packet::publish_len(1, 1, Q1)));
        assert!(s.next(0, true).is_none());
        assert!(s.ack(2).is_some());
        assert_eq!(payloads(&send_all(&mut s, 2)), vec![vec![2]]);
        assert!(s.ack(1).is_some());
        assert_eq!(payloads(&send_all(&mut s, 2)), vec![vec![3], vec![9]]);
        assert_eq!(s.inflight(), 2);
    }

    #[test]
    fn acks_of_unknown_ids_are_ignored() {
        let mut s = Spool::new(1024, 16);
        push(&mut s, "t", b"x", Q1).unwrap();
        push(&mut s, "t", b"y", Q1).unwrap();
        send(&mut s, 4).unwrap();
        let (len, stats) = (s.len(), s.stats());
        for id in [0, 2, 3, 32_767, 32_768, 65_535] {
            assert!(s.ack(id).is_none(), "id {id}");
        }
        assert_eq!((s.len(), s.inflight(), s.stats()), (len, 1, stats));
        assert!(s.ack(1).is_some());
        assert!(s.ack(1).is_none(), "a second ack of the same id");
        check(&s);
        // An id held by a QoS 1 queued for resending is not in flight.
        send(&mut s, 4).unwrap();
        s.reset_inflight();
        assert!(s.ack(2).is_none());
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn reset_resends_inflight_qos1_with_dup_and_the_same_ids_before_newer_ones() {
        let mut s = Spool::new(1024, 16);
        push(&mut s, "t", b"a", Q1).unwrap();
        push(&mut s, "t", b"b", Q1).unwrap();
        push(&mut s, "t", b"c", Q0).unwrap();
        push(&mut s, "t", b"d", Q1).unwrap();
        assert_eq!(send_all(&mut s, 2).len(), 3); // a, b in flight; c done
        push(&mut s, "t", b"e", Q0).unwrap();
        s.reset_inflight();
        check(&s);
        assert_eq!(s.inflight(), 0);
        assert_eq!(s.len(), 4);
        // One at a time while they are suspects [bus-iso-2].
        let dup_a = encoded("t", b"a", Q1, false, 1, true);
        assert_eq!(send_all(&mut s, 10), std::slice::from_ref(&dup_a));
        // A second drop resends again, still with the same id.
        assert_eq!(s.reset_inflight(), None);
        assert_eq!(send_all(&mut s, 10), [dup_a]);
        assert!(s.ack(1).is_some());
        assert_eq!(
            send_all(&mut s, 10),
            [encoded("t", b"b", Q1, false, 2, true)]
        );
        assert!(s.ack(2).is_some());
        assert_eq!(
            send_all(&mut s, 10),
            [
                encoded("t", b"d", Q1, false, 3, false),
                encoded("t", b"e", Q0, false, 0, false),
            ]
        );
        let st = s.stats();
        assert_eq!((st.sent, st.resent), (5, 3));
        assert!(s.ack(3).is_some());
        assert!(s.is_empty());
    }

    #[test]
    fn a_partially_written_message_restarts_from_its_first_byte_after_a_reset() {
        let mut s = Spool::new(1024, 16);
        push(&mut s, "t", b"one", Q1).unwrap();
        push(&mut s, "t", b"two", Q0).unwrap();
        s.next(4, true).unwrap();
        s.advance(4);
        s.reset_inflight();
        check(&s);
        assert_eq!(s.peek_next_len(4), Some(packet::publish_len(1, 3, Q1)));
        assert!(
            s.next(4, false).is_none(),
            "a restart needs the rate limiter again"
        );
        let out = s.next(4, true).unwrap();
        assert!(out.started);
        assert_eq!((out.written, out.packet_id), (0, Some(1)));
        assert_eq!(rest(&out), encoded("t", b"one", Q1, false, 1, true));
        let n = out.len;
        s.advance(n);
        assert_eq!(
            s.stats().sent,
            1,
            "its first complete write is a first send"
        );
        assert!(s.ack(1).is_some());
        s.next(4, true).unwrap();
        s.advance(2);
        s.reset_inflight();
        assert_eq!(
            send_all(&mut s, 4),
            [encoded("t", b"two", Q0, false, 0, false)]
        );
        assert_eq!(s.stats().sent, 2);
    }

    #[test]
    fn the_oldest_waiting_message_gives_the_queue_its_age() {
        // core-bus.md section 6, `oldest_ms`.
        let mut s = Spool::new(1024, 16);
        let t = Instant::from_millis;
        assert_eq!(s.oldest_age(t(5_000)), Duration::ZERO);
        s.push(t(1_000), 1, "t", b"a", Q0, false).unwrap();
        s.push(t(2_000), 1, "t", b"b", Q1, false).unwrap();
        assert_eq!(s.oldest_age(t(5_000)), Duration::from_millis(4_000));
        // Sent, the QoS 0 is gone; the QoS 1 waits for its PUBACK.
        send_all(&mut s, 4);
        assert_eq!(s.oldest_age(t(5_000)), Duration::from_millis(3_000));
        let id = s.entry(0).packet_id;
        assert!(s.ack(id).is_some());
        assert_eq!(s.oldest_age(t(5_000)), Duration::ZERO);
    }

    #[test]
    fn sent_qos0_messages_are_not_resent_after_a_reset() {
        let mut s = Spool::new(1024, 16);
        push(&mut s, "t", b"a", Q0).unwrap();
        push(&mut s, "t", b"b", Q0).unwrap();
        send_all(&mut s, 4);
        s.reset_inflight();
        assert!(s.is_empty());
        assert!(s.next(4, true).is_none());
    }

    #[test]
    fn packet_ids_skip_ids_in_flight_and_wrap_within_the_publish_space() {
        let mut s = Spool::new(1024, 16);
        push(&mut s, "t", b"held", Q1).unwrap();
        send(&mut s, 4).unwrap(); // id 1 stays in flight
        for expected in (2..=IDS.last).chain([2, 3]) {
            push(&mut s, "t", b"x", Q1).unwrap();
            let id = publish_of(&send(&mut s, 4).unwrap()).packet_id.unwrap();
            assert_eq!(id, expected);
            assert!(s.ack(id).is_some());
        }
        assert!(s.ack(1).is_some());
        push(&mut s, "t", b"x", Q1).unwrap();
        push(&mut s, "t", b"y", Q1).unwrap();
        assert_eq!(
            send(&mut s, 4).map(|p| publish_of(&p).packet_id.unwrap()),
            Some(4)
        );
        s.next_id = IDS.last;
        assert_eq!(
            send(&mut s, 4).map(|p| publish_of(&p).packet_id.unwrap()),
            Some(IDS.last)
        );
        push(&mut s, "t", b"z", Q1).unwrap();
        assert_eq!(
            send(&mut s, 4).map(|p| publish_of(&p).packet_id.unwrap()),
            Some(1)
        );
    }

    #[test]
    fn a_topic_or_packet_too_long_is_an_error_not_a_panic() {
        let mut s = Spool::new(1024, 16);
        let topic = "a".repeat(65_536);
        assert_eq!(
            s.push(Instant::default(), 1, &topic, b"", Q0, false),
            Err(PushError::TooLong)
        );
        // Zeroed allocations are lazy; the push refuses before reading it.
        let payload = vec![0u8; MAX_REMAINING_LEN];
        assert_eq!(
            s.push(Instant::default(), 1, "t", &payload, Q1, false),
            Err(PushError::TooLong)
        );
        assert_eq!(
            s.push(
                Instant::default(),
                1,
                "t",
                &payload[..MAX_REMAINING_LEN - 3],
                Q0,
                false
            ),
            Err(PushError::Busy)
        );
        assert_eq!(
            s.stats(),
            Stats {
                busy: 1,
                ..Stats::default()
            }
        );
        assert_eq!(PushError::Busy.to_string(), "outgoing queue full");
        assert_eq!(
            PushError::TooLong.to_string(),
            "topic or publish packet too long"
        );
    }

    #[test]
    fn a_spool_of_zero_capacity_refuses_everything_without_panicking() {
        for (bytes, msgs) in [(0, 0), (0, 4), (1024, 0), (3, 3)] {
            let mut s = Spool::new(bytes, msgs);
            assert_eq!(
                s.push(Instant::default(), 1, "t", b"", Q0, false),
                Err(PushError::Busy)
            );
            assert!(s.next(4, true).is_none());
            assert!(!s.advance(1) && s.ack(1).is_none());
            s.reset_inflight();
            check(&s);
        }
    }

    #[test]
    fn messages_at_every_remaining_length_boundary_are_stored_as_the_codec_encodes_them() {
        let payload = vec![0x5A; 2_097_152];
        // Remaining lengths one below and at each step of the header's size;
        // the packet at MAX_REMAINING_LEN is refused unread above.
        for rl in [127, 128, 16_383, 16_384, 2_097_151, 2_097_152] {
            for (qos, fixed) in [(Q0, 3), (Q1, 5)] {
                let body = &payload[..rl - fixed]; // topic "t", its length, the id
                let mut s = Spool::new(2_097_160, 2);
                push(&mut s, "t", body, qos).unwrap();
                let sent = send(&mut s, 1).unwrap();
                assert_eq!(sent.len(), packet::publish_len(1, body.len(), qos));
                assert_eq!(packet::packet_len(&sent), Ok(Some(sent.len())), "{rl}");
                assert_eq!(sent, encoded("t", body, qos, false, 1, false), "{rl}");
            }
        }
    }

    #[test]
    fn a_header_straddling_the_end_of_the_region_is_encoded_whole() {
        // A 15-byte QoS 1 packet (9 bytes of header) starting at each offset
        // from where it just fits before the end to where only its first
        // byte does, the packet id included.
        for off in 49..64 {
            let mut s = Spool::new(64, 4);
            push(&mut s, "f", &vec![0; off - 5], Q0).unwrap();
            send(&mut s, 1).unwrap(); // the next packet starts at `off`
            push(&mut s, "t/x", b"abcdef", Q1).unwrap();
            let out = s.next(1, true).unwrap();
            assert_eq!(out.second.is_empty(), off == 49, "{off}");
            let bytes = rest(&out);
            assert_eq!(bytes, encoded("t/x", b"abcdef", Q1, false, 1, false));
            s.advance(bytes.len());
            assert!(s.ack(1).is_some());
            check(&s);
        }
    }

    // ---- poison quarantine [bus-iso-2] ----------------------------------------

    /// The payloads of `sent`, as text.
    fn texts(sent: &[Vec<u8>]) -> Vec<String> {
        payloads(sent)
            .into_iter()
            .map(|p| String::from_utf8(p).unwrap())
            .collect()
    }

    /// A spool with QoS 1 messages "m0".."m{n-1}" on "t/<k>", all sent and
    /// none acknowledged.
    fn all_in_flight(n: usize) -> Spool {
        let mut s = Spool::new(4096, 16);
        for k in 0..n {
            push(&mut s, &format!("t/{k}"), format!("m{k}").as_bytes(), Q1).unwrap();
        }
        assert_eq!(send_all(&mut s, 10).len(), n);
        s
    }

    #[test]
    fn after_a_loss_the_unacknowledged_are_resent_one_at_a_time_then_pipelining_resumes() {
        // t0: m0..m2 in flight, connection lost. Newer m3, m4 are pushed.
        let mut s = all_in_flight(3);
        assert_eq!(s.reset_inflight(), None, "the first loss strikes nobody");
        assert!(s.probing());
        push(&mut s, "t/3", b"m3", Q1).unwrap();
        push(&mut s, "t/4", b"m4", Q0).unwrap();
        // t1: reconnected. m0 alone, then nothing until its PUBACK.
        assert_eq!(texts(&send_all(&mut s, 10)), ["m0"]);
        assert_eq!(s.peek_next_len(10), None);
        assert!(s.ack(1).is_some());
        assert_eq!(texts(&send_all(&mut s, 10)), ["m1"]);
        assert!(s.ack(2).is_some());
        // m2 is the last suspect: even the QoS 0 behind it waits.
        assert_eq!(texts(&send_all(&mut s, 10)), ["m2"]);
        assert_eq!(s.peek_next_len(10), None);
        assert!(s.ack(3).is_some());
        assert!(!s.probing());
        // t2: pipelining again.
        assert_eq!(texts(&send_all(&mut s, 10)), ["m3", "m4"]);
        assert_eq!(s.inflight(), 1);
        assert_eq!(s.stats().quarantined, 0);
    }

    #[test]
    fn a_probe_lost_twice_in_a_row_is_quarantined_and_the_rest_carry_on_in_order() {
        // t0: m0 (the poison) and m1 in flight; the broker closes.
        let mut s = all_in_flight(2);
        assert_eq!(s.reset_inflight(), None);
        push(&mut s, "t/2", b"m2", Q1).unwrap();
        // t1: m0 is the probe; the broker closes again: one strike.
        assert_eq!(texts(&send_all(&mut s, 10)), ["m0"]);
        assert_eq!(s.reset_inflight(), None);
        // t2: m0 again, closed again: the second strike removes it.
        assert_eq!(texts(&send_all(&mut s, 10)), ["m0"]);
        let bytes_before = s.bytes();
        let q = s.reset_inflight().expect("quarantined");
        assert_eq!(q.topic.as_str(), "t/0");
        assert_eq!(q.len, packet::publish_len(3, 2, Q1));
        assert_eq!(s.bytes(), bytes_before - q.len, "its space is freed");
        assert_eq!(s.stats().quarantined, 1);
        assert_eq!(s.len(), 2);
        // t3: m1 probes and is acknowledged; m2 follows; nothing loops.
        let sent = send_all(&mut s, 10);
        assert_eq!(texts(&sent), ["m1"]);
        assert!(publish_of(&sent[0]).dup);
        assert!(s.ack(2).is_some());
        assert!(!s.probing());
        assert_eq!(texts(&send_all(&mut s, 10)), ["m2"]);
        assert_eq!(s.stats().quarantined, 1);
    }

    #[test]
    fn a_single_cut_while_probing_is_forgiven_once_the_probe_is_acknowledged() {
        let mut s = all_in_flight(2);
        s.reset_inflight();
        // The probe m0 is cut once (one strike), then acknowledged.
        send_all(&mut s, 10);
        assert_eq!(s.reset_inflight(), None);
        send_all(&mut s, 10);
        assert!(s.ack(1).is_some());
        // m1 probes, is cut once: its own first strike, not m0's second.
        assert_eq!(texts(&send_all(&mut s, 10)), ["m1"]);
        assert_eq!(s.reset_inflight(), None);
        assert_eq!(texts(&send_all(&mut s, 10)), ["m1"]);
        assert!(s.ack(2).is_some());
        assert!(s.is_empty());
        assert_eq!(s.stats().quarantined, 0);
    }

    #[test]
    fn a_connection_lost_before_the_probe_started_strikes_nobody() {
        let mut s = all_in_flight(1);
        s.reset_inflight();
        send_all(&mut s, 10);
        assert_eq!(s.reset_inflight(), None); // strike 1
        assert_eq!(s.reset_inflight(), None, "lost before m0 was resent");
        assert_eq!(s.len(), 1);
        send_all(&mut s, 10);
        assert!(s.reset_inflight().is_some(), "strike 2");
        assert!(s.is_empty() && !s.probing());
    }

    #[test]
    fn a_probe_cut_off_mid_write_counts_and_its_topic_is_read_across_the_ring_end() {
        // A 40-byte region: the probe's header straddles its end.
        let mut s = Spool::new(40, 4);
        push(&mut s, "f", &[0; 24], Q0).unwrap(); // 29 bytes
        send(&mut s, 1).unwrap();
        push(&mut s, "abc/def", b"xyz", Q1).unwrap(); // 16 bytes from 29
        send(&mut s, 1).unwrap();
        s.reset_inflight();
        for strike in 1..=2 {
            let out = s.next(1, true).unwrap();
            assert!(!out.second.is_empty());
            s.advance(3);
            check(&s);
            let q = s.reset_inflight();
            assert_eq!(q.is_some(), strike == 2, "strike {strike}");
            if let Some(q) = q {
                assert_eq!((q.topic.as_str(), q.len), ("abc/def", 16));
            }
            check(&s);
        }
        assert!(s.is_empty());
        assert_eq!(s.inflight(), 0);
    }

    // ---- lanes [bus-iso-5] -------------------------------------------------

    /// Pushes a message from process `pid` whose payload names it.
    fn push_from(s: &mut Spool, pid: u32, payload: &str, qos: QoS) -> Result<Pushed, PushError> {
        let r = s.push(Instant::default(), pid, "t", payload.as_bytes(), qos, false);
        check(s);
        r
    }

    /// Pushes `<prefix><i>` for each `i` of `range` from process `pid`.
    fn push_many(
        s: &mut Spool,
        pid: u32,
        prefix: &str,
        range: impl Iterator<Item = u32>,
        qos: QoS,
    ) {
        for i in range {
            push_from(s, pid, &format!("{prefix}{i}"), qos).unwrap();
        }
    }

    fn sent_payloads(s: &mut Spool, limit: usize) -> Vec<String> {
        payloads(&send_all(s, limit))
            .into_iter()
            .map(|p| String::from_utf8(p).unwrap())
            .collect()
    }

    #[test]
    fn processes_are_served_in_turn_and_each_in_its_own_order() {
        let mut s = Spool::new(4096, 16);
        push_many(&mut s, 100, "flood", 1..=6, Q0);
        push_from(&mut s, 200, "quiet1", Q0).unwrap();
        push_from(&mut s, 200, "quiet2", Q1).unwrap();
        assert_eq!(
            sent_payloads(&mut s, 10),
            ["flood1", "quiet1", "flood2", "quiet2", "flood3", "flood4", "flood5", "flood6"]
        );
    }

    #[test]
    fn a_message_pushed_behind_a_flood_is_next_but_one() {
        // The quiet process's message does not wait for the flood ahead of
        // it: at 100 messages a second it leaves within a second.
        let mut s = Spool::new(16_384, 16);
        push_many(&mut s, 100, "f", 0..12, Q0);
        send(&mut s, 10).unwrap(); // the flood's lane just had its turn
        push_from(&mut s, 200, "quiet", Q0).unwrap();
        assert_eq!(sent_payloads(&mut s, 10)[..2], ["quiet", "f1"]);
    }

    #[test]
    fn a_qos1_held_by_the_inflight_window_lets_another_lanes_qos0_go() {
        let mut s = Spool::new(4096, 16);
        push_from(&mut s, 100, "a1", Q1).unwrap();
        push_from(&mut s, 100, "a2", Q1).unwrap();
        push_from(&mut s, 200, "b1", Q0).unwrap();
        push_from(&mut s, 200, "b2", Q0).unwrap();
        // A window of one: a1 goes, a2 must wait for its PUBACK.
        assert_eq!(sent_payloads(&mut s, 1), ["a1", "b1", "b2"]);
        assert!(s.ack(1).is_some());
        assert_eq!(sent_payloads(&mut s, 1), ["a2"]);
    }

    #[test]
    fn a_full_spool_evicts_the_oldest_qos0_of_the_longest_lane() {
        let mut s = Spool::new(16_384, 8);
        push_from(&mut s, 200, "quiet1", Q0).unwrap();
        push_many(&mut s, 100, "flood", 1..=6, Q0);
        push_from(&mut s, 200, "quiet2", Q0).unwrap();
        // Full. Whoever pushes, the flood pays, oldest first.
        assert_eq!(
            push_from(&mut s, 200, "quiet3", Q0),
            Ok(Pushed { evicted: 1 })
        );
        assert_eq!(
            push_from(&mut s, 100, "flood7", Q0),
            Ok(Pushed { evicted: 1 })
        );
        assert_eq!(s.stats().evicted, 2);
        assert_eq!(
            sent_payloads(&mut s, 10),
            ["quiet1", "flood3", "quiet2", "flood4", "quiet3", "flood5", "flood6", "flood7"]
        );
    }

    #[test]
    fn the_longest_lane_without_a_qos0_is_passed_over_for_eviction() {
        let mut s = Spool::new(16_384, 6);
        push_many(&mut s, 100, "q1-", 1..=4, Q1);
        push_from(&mut s, 200, "b1", Q0).unwrap();
        push_from(&mut s, 200, "b2", Q0).unwrap();
        assert_eq!(
            push_from(&mut s, 100, "q1-5", Q1),
            Ok(Pushed { evicted: 1 })
        );
        let sent = sent_payloads(&mut s, 10);
        assert!(!sent.contains(&"b1".to_owned()), "{sent:?}");
        assert!(sent.contains(&"b2".to_owned()), "{sent:?}");
    }

    #[test]
    fn processes_beyond_the_lanes_share_the_last_one_in_order() {
        // consts::PUBLISH_LANES is 3 in unit tests.
        let mut s = Spool::new(16_384, 16);
        for pid in 1..=5 {
            push_from(&mut s, pid, &format!("p{pid}a"), Q0).unwrap();
        }
        push_from(&mut s, 5, "p5b", Q0).unwrap();
        push_from(&mut s, 4, "p4b", Q0).unwrap();
        assert_eq!(s.lanes[3].waiting, 4, "p4 and p5 share the last lane");
        // A message whose pid is unknown waits in the shared lane too.
        push_from(&mut s, 0, "nobody", Q0).unwrap();
        assert_eq!(
            sent_payloads(&mut s, 10),
            ["p1a", "p2a", "p3a", "p4a", "p5a", "p5b", "p4b", "nobody"]
        );
        // Lanes nobody waits in are given to whoever comes next.
        for pid in 6..=8 {
            push_from(&mut s, pid, &format!("p{pid}"), Q0).unwrap();
        }
        assert_eq!(
            s.lanes.iter().map(|l| l.pid).collect::<Vec<_>>(),
            [6, 7, 8, 0]
        );
    }

    #[test]
    fn a_process_in_the_shared_lane_gets_no_lane_of_its_own_until_it_empties() {
        let mut s = Spool::new(16_384, 16);
        for pid in 1..=3 {
            push_from(&mut s, pid, "x", Q0).unwrap();
        }
        push_from(&mut s, 4, "p4-1", Q0).unwrap(); // shared
        send(&mut s, 10).unwrap(); // lane 0 (pid 1) is free now
        push_from(&mut s, 4, "p4-2", Q0).unwrap();
        assert_eq!(s.lanes[3].waiting, 2, "p4's messages stay together");
        let sent = sent_payloads(&mut s, 10);
        let p4: Vec<_> = sent.iter().filter(|p| p.starts_with("p4")).collect();
        assert_eq!(p4, ["p4-1", "p4-2"]);
    }

    #[test]
    fn a_message_of_unknown_pid_into_an_empty_spool_is_not_overtaken_by_its_process() {
        // The service does not ask for the pid of a publish into an empty
        // spool; the next message of the same process, with its pid, must
        // still leave after it.
        let mut s = Spool::new(4096, 16);
        push_from(&mut s, 300, "x", Q0).unwrap(); // pid 300: lane 0
        push_from(&mut s, 100, "p0", Q0).unwrap(); // pid 100: lane 1
        assert_eq!(sent_payloads(&mut s, 10), ["x", "p0"]);
        push_from(&mut s, 300, "x", Q0).unwrap();
        send(&mut s, 10).unwrap(); // the turn is on lane 1 now
        assert!(s.is_empty());
        push_from(&mut s, 0, "a", Q1).unwrap(); // pid 100, not asked
        push_from(&mut s, 100, "b", Q0).unwrap();
        assert_eq!(sent_payloads(&mut s, 10), ["a", "b"]);
        // Into a spool that is not empty, an unknown pid shares the last
        // lane.
        push_from(&mut s, 100, "c", Q0).unwrap();
        push_from(&mut s, 0, "d", Q0).unwrap();
        assert_eq!(s.lanes[3].waiting, 1);
    }

    /// An MQTT 5 message on "e" expiring at `expires` ms, with one user
    /// property.
    fn push_v5(s: &mut Spool, qos: QoS, expires: Option<u64>) -> Result<Pushed, PushError> {
        // A user property "k": "v".
        const USER: &[u8] = &[0x26, 0, 1, b'k', 0, 1, b'v'];
        let m = Message {
            properties: Props::trusted(USER),
            expires: expires.map(Instant::from_millis),
            ..Message::plain("e", b"pay", qos, false)
        };
        s.push_message(Instant::from_millis(0), 1, &m)
    }

    #[test]
    fn mqtt5_messages_carry_their_properties_and_the_time_they_have_left() {
        // [mqtt5-5] [bus-expiry-1]
        let mut s = Spool::new(4096, 8);
        s.set_version(Version::V5);
        push_v5(&mut s, Q1, Some(10_500)).unwrap();
        push_v5(&mut s, Q0, None).unwrap();
        // 10.5 s left at 0: sent as 11 (whole seconds, rounded up).
        assert_eq!(s.prepare_next(Instant::from_millis(0), 4, usize::MAX), None);
        let first = send(&mut s, 4).unwrap();
        let p = match Packet::parse_as(&first, Version::V5) {
            Ok(Packet::Publish(p)) => p,
            other => panic!("{other:?}"),
        };
        let props = p.properties.unwrap();
        assert_eq!(
            props.number(crate::mqtt::props::id::MESSAGE_EXPIRY),
            Some(11)
        );
        assert_eq!(props.user_properties().collect::<Vec<_>>(), [("k", "v")]);
        assert_eq!(
            (p.topic, p.payload, p.packet_id),
            ("e", &b"pay"[..], Some(1))
        );
        // Lost before its PUBACK: resent 4 s later with 7 s left.
        s.reset_inflight();
        assert_eq!(
            s.prepare_next(Instant::from_millis(4000), 4, usize::MAX),
            None
        );
        let again = send(&mut s, 4).unwrap();
        match Packet::parse_as(&again, Version::V5) {
            Ok(Packet::Publish(p)) => {
                assert!(p.dup);
                assert_eq!(
                    p.properties
                        .unwrap()
                        .number(crate::mqtt::props::id::MESSAGE_EXPIRY),
                    Some(7)
                );
            }
            other => panic!("{other:?}"),
        }
        // Without an expiry, no Message Expiry Interval (sent once the
        // resent one, probed alone [bus-iso-2], is acknowledged).
        assert!(s.ack(1).is_some());
        let second = send(&mut s, 4).unwrap();
        match Packet::parse_as(&second, Version::V5) {
            Ok(Packet::Publish(p)) => {
                assert_eq!(
                    p.properties
                        .unwrap()
                        .get(crate::mqtt::props::id::MESSAGE_EXPIRY),
                    None
                )
            }
            other => panic!("{other:?}"),
        }
        check(&s);
    }

    /// The packets the spool writes for `topics`, one message each.
    fn sent_with_aliases(s: &mut Spool, topics: &[&str], qos: QoS) -> Vec<Vec<u8>> {
        for t in topics {
            let m = Message::plain(t, b"payload", qos, false);
            s.push_message(Instant::from_millis(0), 1, &m).unwrap();
        }
        let mut out = Vec::new();
        while let Some(bytes) = send(s, 100) {
            if qos == Q1 {
                let Ok(Packet::Publish(p)) = Packet::parse_as(&bytes, Version::V5) else {
                    panic!("{bytes:02x?}");
                };
                s.ack(p.packet_id.unwrap());
            }
            out.push(bytes);
        }
        check(s);
        out
    }

    #[test]
    fn topic_aliases_replace_repeated_topics_and_are_forgotten_at_a_reconnect() {
        // [mqtt5-6] The broker allows 2: the first PUBLISH of a topic
        // carries topic and alias, later ones the alias and an empty topic;
        // a third topic takes the least recently used alias.
        let topic = "dt/acme/site-0042/gateway-0007/sensors/temperature/ch00";
        for qos in [Q0, Q1] {
            let mut s = Spool::new(1 << 16, 64);
            s.set_version(Version::V5);
            s.set_topic_aliases(2, usize::MAX);
            let sent = sent_with_aliases(&mut s, &[topic, topic, "b", topic, "c", "b"], qos);
            let parsed: Vec<(String, Option<u32>)> = sent
                .iter()
                .map(|b| match Packet::parse_as(b, Version::V5) {
                    Ok(Packet::Publish(p)) => (
                        p.topic.to_string(),
                        p.properties
                            .unwrap()
                            .number(crate::mqtt::props::id::TOPIC_ALIAS),
                    ),
                    other => panic!("{other:?}"),
                })
                .collect();
            let full = |t: &str, a| (t.to_string(), Some(a));
            let alias = |a| (String::new(), Some(a));
            assert_eq!(
                parsed,
                [
                    full(topic, 1),
                    alias(1),
                    full("b", 2),
                    alias(1),
                    full("c", 2), // "b" was the least recently used
                    full("b", 1)
                ],
                "{qos:?}"
            );
            // The first carries the topic and the alias (3 bytes more than
            // without aliases), the next the alias alone.
            assert_eq!(sent[0].len() - sent[1].len(), topic.len());
            // A reconnect forgets them: full topic, alias 1 again.
            s.reset_inflight();
            s.set_topic_aliases(2, usize::MAX);
            let again = sent_with_aliases(&mut s, &[topic], qos);
            match Packet::parse_as(&again[0], Version::V5) {
                Ok(Packet::Publish(p)) => {
                    assert_eq!(p.topic, topic);
                    assert_eq!(
                        p.properties
                            .unwrap()
                            .number(crate::mqtt::props::id::TOPIC_ALIAS),
                        Some(1)
                    );
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn bytes_on_the_wire_with_and_without_an_alias_for_a_60_byte_topic() {
        // The README's figures: QoS 1, a 60-byte topic, a 100-byte payload.
        let topic = "dt/acme-industries/plant-0042/line-07/gateway-0001/telemetry";
        assert_eq!(topic.len(), 60);
        let size = |aliases: u16, n: usize| {
            let mut s = Spool::new(1 << 16, 16);
            s.set_version(Version::V5);
            s.set_topic_aliases(aliases, usize::MAX);
            let mut sizes = Vec::new();
            for _ in 0..n {
                let m = Message::plain(topic, &[0; 100], Q1, false);
                s.push_message(Instant::from_millis(0), 1, &m).unwrap();
                // Three fit the in-flight window of 4 unacknowledged.
                sizes.push(send(&mut s, 4).unwrap().len());
            }
            sizes
        };
        assert_eq!(size(0, 3), [168, 168, 168]);
        assert_eq!(size(8, 3), [171, 110, 110]);
    }

    #[test]
    fn an_alias_never_makes_a_packet_larger_than_the_broker_takes() {
        // [mqtt5-4] The first PUBLISH of a topic with its alias is 3 bytes
        // longer: at the broker's maximum it goes without one.
        let mut s = Spool::new(4096, 8);
        s.set_version(Version::V5);
        let m = Message::plain("t/near", &[0; 100], Q0, false);
        let len = s.encoded_len(&m);
        s.set_topic_aliases(8, len);
        s.push_message(Instant::from_millis(0), 1, &m).unwrap();
        let sent = send(&mut s, 4).unwrap();
        assert_eq!(sent.len(), len);
        match Packet::parse_as(&sent, Version::V5) {
            Ok(Packet::Publish(p)) => assert_eq!(
                p.properties
                    .unwrap()
                    .get(crate::mqtt::props::id::TOPIC_ALIAS),
                None
            ),
            other => panic!("{other:?}"),
        }
        // With room for the header, it has one.
        s.set_topic_aliases(8, len + 8);
        s.push_message(Instant::from_millis(0), 1, &m).unwrap();
        assert_eq!(send(&mut s, 4).unwrap().len(), len + 3);
    }

    #[test]
    fn a_resend_carries_its_full_topic_and_3_1_1_never_aliases() {
        let mut s = Spool::new(4096, 8);
        s.set_version(Version::V5);
        s.set_topic_aliases(8, usize::MAX);
        push(&mut s, "t", b"1", Q1).unwrap();
        let first = send(&mut s, 4).unwrap();
        s.reset_inflight();
        s.set_topic_aliases(8, usize::MAX);
        let again = send(&mut s, 4).unwrap();
        match Packet::parse_as(&again, Version::V5) {
            Ok(Packet::Publish(p)) => {
                assert!(p.dup);
                assert_eq!(p.topic, "t");
                assert_eq!(
                    p.properties
                        .unwrap()
                        .get(crate::mqtt::props::id::TOPIC_ALIAS),
                    None
                );
            }
            other => panic!("{other:?}"),
        }
        assert_ne!(first, again);
        let mut old = Spool::new(4096, 8);
        old.set_topic_aliases(8, usize::MAX); // 3.1.1: ignored
        push(&mut old, "t", b"1", Q0).unwrap();
        push(&mut old, "t", b"2", Q0).unwrap();
        let a = send(&mut old, 4).unwrap();
        let b = send(&mut old, 4).unwrap();
        assert_eq!(a.len(), b.len());
        assert_eq!(publish_of(&b).topic, "t");
    }

    #[test]
    fn an_aliased_message_written_a_byte_at_a_time_is_the_same_packet() {
        let mut s = Spool::new(256, 8);
        s.set_version(Version::V5);
        s.set_topic_aliases(4, usize::MAX);
        // Wrapping around the region's end, with a two-part stored message.
        for i in 0..12 {
            push(&mut s, "wrap/topic", &[i; 40], Q0).unwrap();
            let mut whole = Vec::new();
            loop {
                let out = s.next(4, true).unwrap();
                let byte = [out.prefix, out.first, out.second].concat()[0];
                whole.push(byte);
                if s.advance(1) {
                    break;
                }
            }
            match Packet::parse_as(&whole, Version::V5) {
                Ok(Packet::Publish(p)) => {
                    assert_eq!(p.payload, &[i; 40][..]);
                    assert_eq!(p.topic.is_empty(), i > 0);
                }
                other => panic!("{i}: {other:?}"),
            }
            check(&s);
        }
    }

    #[test]
    fn expired_and_too_large_messages_are_dropped_unsent_and_counted() {
        // [bus-expiry-1] [mqtt5-4], both protocols.
        for version in [Version::V311, Version::V5] {
            let mut s = Spool::new(4096, 8);
            s.set_version(version);
            push_v5(&mut s, Q1, Some(1000)).unwrap();
            push_v5(&mut s, Q0, None).unwrap();
            let small = s.encoded_len(&Message::plain("e", b"pay", Q0, false));
            push(&mut s, "big", &[0; 200], Q1).unwrap();
            // At 1 s the first has expired: dropped, its ticket reported.
            let d = s.prepare_next(Instant::from_millis(1000), 4, 100).unwrap();
            assert_eq!((d.why, d.qos, d.ticket), (Unsendable::Expired, Q1, 1));
            assert_eq!(d.topic.as_str(), "e");
            assert_eq!(s.prepare_next(Instant::from_millis(1000), 4, 100), None);
            let sent = send(&mut s, 4).unwrap();
            assert!(sent.len() <= 100 && sent.len() >= small.min(sent.len()));
            // Over the broker's 100 bytes: rejected, not sent.
            let d = s.prepare_next(Instant::from_millis(1000), 4, 100).unwrap();
            assert_eq!((d.why, d.ticket), (Unsendable::TooLarge, 3));
            assert!(s.is_empty());
            let st = s.stats();
            assert_eq!((st.expired, st.rejected, st.sent), (1, 1, 1), "{version}");
            check(&s);
        }
    }

    #[test]
    fn a_refused_puback_ends_the_message_and_counts_it_rejected() {
        // [mqtt5-7] never resent.
        let mut s = Spool::new(4096, 8);
        push(&mut s, "a", b"1", Q1).unwrap();
        push(&mut s, "b", b"2", Q1).unwrap();
        send(&mut s, 4).unwrap();
        send(&mut s, 4).unwrap();
        assert_eq!(s.inflight_topic(1).as_deref(), Some("a"));
        assert_eq!(s.ack_with(1, false).map(|a| a.ticket), Some(1));
        assert!(s.ack(2).is_some());
        let st = s.stats();
        assert_eq!((st.acked, st.rejected), (1, 1));
        s.reset_inflight();
        assert!(s.is_empty(), "nothing to resend");
        check(&s);
    }

    #[test]
    fn fits_says_what_push_would_do_without_doing_or_counting_it() {
        let mut s = Spool::new(4096, 2);
        assert!(s.fits(&Message::plain("t", &[0; 10], Q1, false)));
        push_from(&mut s, 1, "a", Q0).unwrap();
        push_from(&mut s, 1, "b", Q1).unwrap();
        assert!(
            s.fits(&Message::plain("t", &[0; 10], Q1, false)),
            "the QoS 0 would be evicted"
        );
        assert!(
            !s.fits(&Message::plain("t", &[0; 5000], Q1, false)),
            "larger than the region"
        );
        push_from(&mut s, 1, "c", Q1).unwrap(); // evicts "a"
        assert!(!s.fits(&Message::plain("t", &[0; 1], Q0, false)));
        assert_eq!(s.stats().busy, 0);
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn messages_restored_from_disk_start_before_anything_new() {
        // [spool-6] Restored at start-up (in their lanes), then new ones
        // from other processes, which would otherwise take turns.
        let mut s = Spool::new(4096, 16);
        for (pid, p) in [(100, "r1"), (200, "r2"), (100, "r3")] {
            push_from(&mut s, pid, p, Q1).unwrap();
            s.restored_last();
        }
        push_from(&mut s, 300, "new1", Q0).unwrap();
        push_from(&mut s, 400, "new2", Q1).unwrap();
        check(&s);
        let sent = sent_payloads(&mut s, 10);
        assert_eq!(sent[..3], ["r1", "r2", "r3"]);
        assert_eq!(sent.len(), 5);
    }

    #[test]
    fn unacknowledged_messages_of_every_lane_are_resent_before_anything_new() {
        let mut s = Spool::new(16_384, 16);
        push_from(&mut s, 100, "a1", Q1).unwrap();
        push_from(&mut s, 200, "b1", Q1).unwrap();
        assert_eq!(sent_payloads(&mut s, 10), ["a1", "b1"]);
        push_from(&mut s, 100, "a2", Q0).unwrap();
        push_from(&mut s, 200, "b2", Q0).unwrap();
        assert_eq!(s.reset_inflight(), None);
        // One at a time while probing [bus-iso-2], then the rest in turn.
        let resent = send_all(&mut s, 10);
        assert_eq!(payloads(&resent), [b"a1".to_vec()]);
        assert!(publish_of(&resent[0]).dup);
        assert!(s.ack(1).is_some());
        assert_eq!(sent_payloads(&mut s, 10), ["b1"]);
        assert!(s.ack(2).is_some());
        let rest = sent_payloads(&mut s, 10);
        assert_eq!(rest.len(), 2, "{rest:?}");
    }

    // ---- model -------------------------------------------------------------

    use crate::test_rng::XorShift;

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum MState {
        Queued,
        Inflight,
    }

    struct Msg {
        serial: u32,
        lane: usize,
        topic: String,
        payload: Vec<u8>,
        qos: QoS,
        retain: bool,
        state: MState,
        id: u16,
        dup: bool,
        sent_before: bool,
        suspect: bool,
    }

    impl Msg {
        fn bytes(&self) -> Vec<u8> {
            encoded(
                &self.topic,
                &self.payload,
                self.qos,
                self.retain,
                self.id,
                self.dup,
            )
        }

        fn len(&self) -> usize {
            packet::publish_len(self.topic.len(), self.payload.len(), self.qos)
        }
    }

    /// The spool's rules over a plain deque of live messages in push order:
    /// no ring, no holes, no compaction, no lists; a lane is a number on
    /// each message and its queue is found by looking.
    struct Model {
        q: VecDeque<Msg>,
        /// The started message's serial.
        current: Option<u32>,
        written: usize,
        next_id: u16,
        stats: Stats,
        cap_bytes: usize,
        cap_msgs: usize,
        struck: (u16, u8),
        /// Whose each lane is (the last one is shared, nobody's).
        owners: Vec<u32>,
        turn: usize,
    }

    impl Model {
        fn probing(&self) -> bool {
            self.q.iter().any(|m| m.suspect)
        }

        /// Index of the message with this serial.
        fn at(&self, serial: u32) -> usize {
            self.q.iter().position(|m| m.serial == serial).unwrap()
        }

        /// Whether message `i` waits in its lane: queued, not started.
        fn waits(&self, i: usize) -> bool {
            self.q[i].state == MState::Queued && Some(self.q[i].serial) != self.current
        }

        /// The messages waiting in lane `l`, oldest first.
        fn lane(&self, l: usize) -> Vec<usize> {
            (0..self.q.len())
                .filter(|&i| self.waits(i) && self.q[i].lane == l)
                .collect()
        }

        fn inflight(&self) -> usize {
            self.q
                .iter()
                .filter(|m| m.state == MState::Inflight)
                .count()
        }

        fn bytes(&self) -> usize {
            self.q.iter().map(Msg::len).sum()
        }

        fn lane_of(&mut self, pid: u32) -> usize {
            let shared = self.owners.len() - 1;
            if pid == 0 && self.q.is_empty() {
                self.turn = 0;
                return 0;
            }
            if pid == 0 {
                return shared;
            }
            if let Some(l) = self.owners[..shared].iter().position(|&o| o == pid) {
                return l;
            }
            if !self.lane(shared).is_empty() {
                return shared;
            }
            match (0..shared).find(|&l| self.lane(l).is_empty()) {
                Some(l) => {
                    self.owners[l] = pid;
                    l
                }
                None => shared,
            }
        }

        fn push(&mut self, pid: u32, mut m: Msg) -> Result<Pushed, PushError> {
            let len = m.len();
            let evictable: Vec<usize> = (0..self.q.len())
                .filter(|&i| self.waits(i) && self.q[i].qos == Q0)
                .collect();
            let freed: usize = evictable.iter().map(|&i| self.q[i].len()).sum();
            let (n, bytes) = (self.q.len() + 1, self.bytes() + len);
            if len > self.cap_bytes
                || n - evictable.len() > self.cap_msgs
                || bytes - freed > self.cap_bytes
            {
                self.stats.busy += 1;
                return Err(PushError::Busy);
            }
            let mut evicted = 0;
            while self.q.len() + 1 > self.cap_msgs || self.bytes() + len > self.cap_bytes {
                // The longest lane with a QoS 0 (by messages, then bytes,
                // then the first), loses its oldest QoS 0.
                let l = (0..self.owners.len())
                    .filter(|&l| self.lane(l).iter().any(|&i| self.q[i].qos == Q0))
                    .max_by_key(|&l| {
                        let w = self.lane(l);
                        let b: usize = w.iter().map(|&i| self.q[i].len()).sum();
                        (w.len(), b, core::cmp::Reverse(l))
                    })
                    .unwrap();
                let i = *self.lane(l).iter().find(|&&i| self.q[i].qos == Q0).unwrap();
                self.q.remove(i);
                evicted += 1;
            }
            self.stats.evicted += u64::try_from(evicted).unwrap();
            self.stats.published += 1;
            m.lane = self.lane_of(pid);
            self.q.push_back(m);
            Ok(Pushed { evicted })
        }

        /// The message `next` would start.
        fn startable(&self, limit: usize) -> Option<usize> {
            if self.current.is_some() || (self.probing() && self.inflight() > 0) {
                return None;
            }
            let n = self.owners.len();
            (0..n).find_map(|k| {
                let i = *self.lane((self.turn + k) % n).first()?;
                let m = &self.q[i];
                let may =
                    (!self.probing() || m.id != 0) && (m.qos == Q0 || self.inflight() < limit);
                may.then_some(i)
            })
        }

        /// (bytes still to write, started, written, packet id)
        fn next(&mut self, limit: usize, may_start: bool) -> Option<(Vec<u8>, bool, usize, u16)> {
            let started = self.current.is_none();
            if started {
                if !may_start {
                    return None;
                }
                let i = self.startable(limit)?;
                if self.q[i].qos == Q1 && self.q[i].id == 0 {
                    let mut id = self.next_id;
                    while self.q.iter().any(|m| m.id == id) {
                        id = if id == IDS.last { 1 } else { id + 1 };
                    }
                    self.next_id = if id == IDS.last { 1 } else { id + 1 };
                    self.q[i].id = id;
                }
                self.current = Some(self.q[i].serial);
                self.turn = (self.q[i].lane + 1) % self.owners.len();
            }
            let m = &self.q[self.at(self.current?)];
            Some((
                m.bytes()[self.written..].to_vec(),
                started,
                self.written,
                m.id,
            ))
        }

        fn advance(&mut self, n: usize) -> bool {
            let Some(serial) = self.current else {
                return false;
            };
            let i = self.at(serial);
            self.written = (self.written + n).min(self.q[i].len());
            if self.written < self.q[i].len() {
                return false;
            }
            self.current = None;
            self.written = 0;
            if self.q[i].sent_before {
                self.stats.resent += 1;
            } else {
                self.stats.sent += 1;
            }
            if self.q[i].qos == Q0 {
                self.q.remove(i);
            } else {
                self.q[i].state = MState::Inflight;
                self.q[i].sent_before = true;
            }
            true
        }

        fn ack(&mut self, id: u16) -> bool {
            let found = self
                .q
                .iter()
                .position(|m| m.state == MState::Inflight && m.id == id);
            if let Some(i) = found {
                self.q.remove(i);
                self.stats.acked += 1;
                if self.struck.0 == id {
                    self.struck = (0, 0);
                }
            }
            found.is_some()
        }

        fn reset(&mut self) -> Option<(String, usize)> {
            let mut quarantined = None;
            if self.probing() {
                let current = self.current;
                let probe = self.q.iter().position(|m| {
                    m.id != 0 && (m.state == MState::Inflight || Some(m.serial) == current)
                });
                if let Some(i) = probe {
                    let id = self.q[i].id;
                    self.struck = if self.struck.0 == id {
                        (id, self.struck.1 + 1)
                    } else {
                        (id, 1)
                    };
                    if self.struck.1 >= QUARANTINE_STRIKES {
                        let m = self.q.remove(i).unwrap();
                        quarantined = Some((m.topic.clone(), m.len()));
                        self.stats.quarantined += 1;
                        self.struck = (0, 0);
                    }
                }
            }
            for m in self.q.iter_mut() {
                if m.id != 0 {
                    m.state = MState::Queued;
                    m.dup = true;
                    m.suspect = true;
                }
            }
            if !self.probing() {
                self.struck = (0, 0);
            }
            self.current = None;
            self.written = 0;
            quarantined
        }
    }

    fn run_model(seed: u64, steps: usize, totals: &mut Stats, compactions: &mut u64) {
        let mut rng = XorShift::new(seed);
        let cap_bytes = 40 + rng.below(1500);
        let cap_msgs = 1 + rng.below(12);
        let q1_share = rng.below(100);
        let mut s = Spool::new(cap_bytes, cap_msgs);
        let mut m = Model {
            q: VecDeque::new(),
            current: None,
            written: 0,
            next_id: 1,
            stats: Stats::default(),
            cap_bytes,
            cap_msgs,
            struck: (0, 0),
            owners: vec![0; consts::PUBLISH_LANES + 1],
            turn: 0,
        };
        let mut serial = 0u32;
        // More processes than lanes, so that the shared one is used; 0 is
        // a process whose pid could not be had.
        let processes = 1 + rng.below(2 * consts::PUBLISH_LANES);
        for step in 0..steps {
            let limit = rng.below(6);
            match rng.below(20) {
                0..=6 => {
                    let topic: String = (0..1 + rng.below(16))
                        .map(|_| char::from(b'a' + u8::try_from(rng.below(26)).unwrap()))
                        .collect();
                    let mut payload = serial.to_le_bytes().to_vec();
                    let extra = if rng.below(10) == 0 {
                        rng.below(600)
                    } else {
                        rng.below(120)
                    };
                    payload.extend((0..extra).map(|_| u8::try_from(rng.below(256)).unwrap()));
                    let qos = if rng.below(100) < q1_share { Q1 } else { Q0 };
                    let retain = rng.below(2) == 0;
                    let pid = u32::try_from(rng.below(processes + 1)).unwrap();
                    let got = s.push(Instant::default(), pid, &topic, &payload, qos, retain);
                    let want = m.push(
                        pid,
                        Msg {
                            serial,
                            lane: 0,
                            topic,
                            payload,
                            qos,
                            retain,
                            state: MState::Queued,
                            id: 0,
                            dup: false,
                            sent_before: false,
                            suspect: false,
                        },
                    );
                    assert_eq!(got, want, "seed {seed} step {step}: push");
                    serial += 1;
                }
                7..=14 => {
                    let may_start = rng.below(4) != 0;
                    assert_eq!(
                        s.peek_next_len(limit),
                        m.startable(limit).map(|i| m.q[i].len()),
                        "seed {seed} step {step}: peek"
                    );
                    let want = m.next(limit, may_start);
                    let got = s.next(limit, may_start).map(|o| {
                        assert_eq!(o.len, o.written + o.remaining());
                        (rest(&o), o.started, o.written, o.packet_id.unwrap_or(0))
                    });
                    assert_eq!(got, want, "seed {seed} step {step}: next");
                    if let Some((bytes, ..)) = got {
                        let n = match rng.below(5) {
                            0 => 0,
                            1 => 1,
                            2 => rng.below(bytes.len() + 1),
                            3 => bytes.len(),
                            _ => bytes.len() + rng.below(3),
                        };
                        assert_eq!(
                            s.advance(n),
                            m.advance(n),
                            "seed {seed} step {step}: advance"
                        );
                    }
                }
                15..=17 => {
                    let inflight: Vec<u16> =
                        m.q.iter()
                            .filter(|x| x.state == MState::Inflight)
                            .map(|x| x.id)
                            .collect();
                    let id = if !inflight.is_empty() && rng.below(5) != 0 {
                        inflight[rng.below(inflight.len())]
                    } else {
                        u16::try_from(rng.below(65_536)).unwrap()
                    };
                    assert_eq!(
                        s.ack(id).is_some(),
                        m.ack(id),
                        "seed {seed} step {step}: ack {id}"
                    );
                }
                18 => {
                    let got = s
                        .reset_inflight()
                        .map(|q| (q.topic.as_str().to_owned(), q.len));
                    assert_eq!(got, m.reset(), "seed {seed} step {step}: reset");
                }
                _ => {
                    // A stray advance, with or without a started message.
                    let n = rng.below(4);
                    assert_eq!(
                        s.advance(n),
                        m.advance(n),
                        "seed {seed} step {step}: stray advance"
                    );
                }
            }
            check(&s);
            assert_eq!(s.stats(), m.stats, "seed {seed} step {step}: stats");
            assert_eq!(
                (s.len(), s.bytes(), s.inflight()),
                (m.q.len(), m.bytes(), m.inflight()),
                "seed {seed} step {step}"
            );
        }
        let st = s.stats();
        totals.published += st.published;
        totals.sent += st.sent;
        totals.resent += st.resent;
        totals.acked += st.acked;
        totals.evicted += st.evicted;
        totals.busy += st.busy;
        totals.quarantined += st.quarantined;
        *compactions += s.compactions;
    }

    #[test]
    fn random_operations_match_a_simple_deque_model() {
        let mut totals = Stats::default();
        let mut compactions = 0;
        for seed in 1..=60u64 {
            run_model(
                seed.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                4_000,
                &mut totals,
                &mut compactions,
            );
        }
        // Every path must be exercised for the test to mean anything.
        assert!(totals.sent > 10_000, "{totals:?}");
        assert!(totals.resent > 500 && totals.acked > 1_000, "{totals:?}");
        assert!(totals.evicted > 1_000 && totals.busy > 1_000, "{totals:?}");
        assert!(compactions > 200, "{compactions} compactions");
        assert!(totals.quarantined > 20, "{totals:?}");
    }
}
