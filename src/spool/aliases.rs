//! MQTT 5 topic aliases for the spool's outgoing publishes [mqtt5-6]:
//! the table of the current connection, and the header a message goes
//! with when it has an alias (written in front of its stored bytes, which
//! are never rewritten for it).

use super::{QoS, Spool, Version, MAX_TOPIC_LEN};

/// Topic aliases the spool uses at most, whatever the broker allows (AWS
/// IoT Core allows 8).
pub const ALIAS_SLOTS: usize = 8;

/// The longest alias header: first byte, remaining length, topic, packet
/// id, property length, Topic Alias; and room behind it for the rest of a
/// small message (`STAGED_TAIL`), which then goes out with its header in
/// one piece: one TLS record, not two (rustls encrypts each write on its
/// own, and its vectored write allocates).
pub(super) const PREFIX_MAX: usize = 1 + 4 + 2 + MAX_TOPIC_LEN + 2 + 4 + 3 + STAGED_TAIL;

const STAGED_TAIL: usize = 1024;

/// The topics that have an alias on the current connection: alias `i + 1`
/// is `topics[i]`; the least recently used is replaced [mqtt5-6].
pub(super) struct Aliases {
    /// How many the broker allows now (0: none), at most `ALIAS_SLOTS`.
    max: usize,
    /// The broker's Maximum Packet Size.
    max_packet: usize,
    topics: [heapless::String<MAX_TOPIC_LEN>; ALIAS_SLOTS],
    used: [u64; ALIAS_SLOTS],
    clock: u64,
}

impl Aliases {
    pub(super) const NONE: Aliases = Aliases {
        max: 0,
        max_packet: usize::MAX,
        topics: [const { heapless::String::new() }; ALIAS_SLOTS],
        used: [0; ALIAS_SLOTS],
        clock: 0,
    };

    /// The alias for `topic`, and whether the broker knows it already;
    /// `None` when aliases are off.
    fn assign(&mut self, topic: &str) -> Option<(u16, bool)> {
        if self.max == 0 {
            return None;
        }
        self.clock += 1;
        let n = self.max;
        let i = match self.topics[..n].iter().position(|t| t == topic) {
            Some(i) => {
                self.used[i] = self.clock;
                return Some((u16::try_from(i + 1).ok()?, true));
            }
            // An unused one (never used: 0), else the least recently used.
            None => (0..n).min_by_key(|&i| self.used[i])?,
        };
        self.topics[i].clear();
        self.topics[i].push_str(topic).ok()?;
        self.used[i] = self.clock;
        Some((u16::try_from(i + 1).ok()?, false))
    }
}

/// Writes an alias header; the buffer is sized for the longest.
struct PrefixWriter<'a> {
    buf: &'a mut [u8; PREFIX_MAX],
    len: usize,
}

impl PrefixWriter<'_> {
    fn put(&mut self, bytes: &[u8]) {
        if let Some(dst) = self.buf.get_mut(self.len..self.len + bytes.len()) {
            dst.copy_from_slice(bytes);
            self.len += bytes.len();
        }
    }

    fn varint(&mut self, mut v: usize) {
        loop {
            let [low, ..] = v.to_le_bytes();
            v >>= 7;
            self.put(&[if v == 0 { low & 0x7F } else { low | 0x80 }]);
            if v == 0 {
                return;
            }
        }
    }
}

impl Spool {
    /// A connection began on which the broker takes `max` topic aliases
    /// (its CONNACK's Topic Alias Maximum; 0 for none, and always with
    /// MQTT 3.1.1): every alias of the last connection is forgotten
    /// [mqtt5-6].
    /// A packet never grows past `max_packet` (the broker's Maximum
    /// Packet Size) for its alias: such a message goes without one.
    pub fn set_topic_aliases(&mut self, max: u16, max_packet: usize) {
        self.aliases = Aliases::NONE;
        if self.version == Version::V5 {
            self.aliases.max = usize::from(max).min(ALIAS_SLOTS);
            self.aliases.max_packet = max_packet;
        }
    }

    /// For the message in `slot`, just started: with topic aliases on and
    /// a first send, the header that carries its alias (and its topic only
    /// if the broker does not know the alias yet) [mqtt5-6], in `prefix`;
    /// else none. A resend always carries its full topic.
    pub(super) fn alias_header(&mut self, slot: usize) {
        self.prefix_len = 0;
        self.skip = 0;
        let e = self.meta[slot];
        if e.props_len_at == 0 || e.sent_before || self.aliases.max == 0 {
            return;
        }
        let skip = e.props_len_at + crate::mqtt::props::varint_len(e.props_len);
        let tail = e.len - skip; // the properties and the payload
        let topic = self.topic_of(&e);
        // The packet with its topic and an alias, the longest this header
        // makes it: past the broker's maximum, it goes as stored [mqtt5-4].
        let id_len = if e.qos == QoS::AtLeastOnce { 2 } else { 0 };
        let props_len = crate::mqtt::props::varint_len(e.props_len + 3);
        let rl_full = 2 + topic.len() + id_len + props_len + 3 + tail;
        if 1 + crate::mqtt::props::varint_len(rl_full) + rl_full > self.aliases.max_packet {
            return;
        }
        let Some((alias, known)) = self.aliases.assign(&topic) else {
            return;
        };
        let topic_part = if known { "" } else { topic.as_str() };
        let new_props_len = e.props_len + 3;
        let rl = 2
            + topic_part.len()
            + id_len
            + crate::mqtt::props::varint_len(new_props_len)
            + 3
            + tail;
        let mut w = PrefixWriter {
            buf: &mut self.prefix,
            len: 0,
        };
        w.put(&[self.buf[e.off]]);
        w.varint(rl);
        w.put(&u16::try_from(topic_part.len()).unwrap_or(0).to_be_bytes());
        w.put(topic_part.as_bytes());
        if e.qos == QoS::AtLeastOnce {
            w.put(&e.packet_id.to_be_bytes());
        }
        w.varint(new_props_len);
        w.put(&[crate::mqtt::props::id::TOPIC_ALIAS]);
        w.put(&alias.to_be_bytes());
        let mut len = w.len;
        let mut skip = skip;
        if tail <= STAGED_TAIL {
            // The rest behind the header (in two parts if it wraps).
            let from = self.wrap(e.off + skip);
            let first = tail.min(self.buf.len() - from);
            self.prefix[len..len + first].copy_from_slice(&self.buf[from..from + first]);
            self.prefix[len + first..len + tail].copy_from_slice(&self.buf[..tail - first]);
            len += tail;
            skip = e.len;
        }
        self.prefix_len = len;
        self.skip = skip;
    }
}
