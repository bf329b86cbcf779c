//! MQTT 5 properties [MQTT5-2.2.2]: a validated, borrowed view of a
//! packet's property block, and a fixed-capacity builder for the blocks the
//! daemon sends.
//!
//! A `Props` is the block's bytes after its length, checked once when it is
//! parsed (every identifier known and allowed in its packet, every value
//! well-formed and in range, no property twice that may appear once), so
//! reading it later cannot fail and emitting it again writes the same
//! bytes. Nothing here allocates.

use core::fmt;
use core::str;

use super::topic;

/// Property identifiers [MQTT5-2.2.2.2].
pub mod id {
    pub const PAYLOAD_FORMAT: u8 = 0x01;
    pub const MESSAGE_EXPIRY: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SUBSCRIPTION_ID: u8 = 0x0B;
    pub const SESSION_EXPIRY: u8 = 0x11;
    pub const ASSIGNED_CLIENT_ID: u8 = 0x12;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const AUTH_METHOD: u8 = 0x15;
    pub const AUTH_DATA: u8 = 0x16;
    pub const REQUEST_PROBLEM_INFO: u8 = 0x17;
    pub const REQUEST_RESPONSE_INFO: u8 = 0x19;
    pub const RESPONSE_INFO: u8 = 0x1A;
    pub const SERVER_REFERENCE: u8 = 0x1C;
    pub const REASON_STRING: u8 = 0x1F;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const MAXIMUM_QOS: u8 = 0x24;
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub const WILDCARD_AVAILABLE: u8 = 0x28;
    pub const SUBSCRIPTION_ID_AVAILABLE: u8 = 0x29;
    pub const SHARED_AVAILABLE: u8 = 0x2A;
}

/// The packet a property block belongs to: its control packet type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Context(pub u8);

/// How a property's value is encoded [MQTT5-1.5].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Form {
    Byte,
    U16,
    U32,
    Varint,
    Str,
    Bin,
    Pair,
}

/// One property's form, the packet types (bit per type) it may appear in,
/// and whether it may repeat.
fn spec(pid: u8) -> Option<(Form, u16, bool)> {
    const CONNECT: u16 = 1 << 1;
    const CONNACK: u16 = 1 << 2;
    const PUBLISH: u16 = 1 << 3;
    const PUBACK: u16 = 1 << 4;
    const SUBSCRIBE: u16 = 1 << 8;
    const SUBACK: u16 = 1 << 9;
    const UNSUBSCRIBE: u16 = 1 << 10;
    const UNSUBACK: u16 = 1 << 11;
    const DISCONNECT: u16 = 1 << 14;
    const AUTH: u16 = 1 << 15;
    const ACKS: u16 = PUBACK | SUBACK | UNSUBACK | DISCONNECT | AUTH | CONNACK;
    const ALL: u16 = CONNECT | ACKS | PUBLISH | SUBSCRIBE | UNSUBSCRIBE;
    Some(match pid {
        id::PAYLOAD_FORMAT => (Form::Byte, PUBLISH, false),
        id::MESSAGE_EXPIRY => (Form::U32, PUBLISH, false),
        id::CONTENT_TYPE | id::RESPONSE_TOPIC => (Form::Str, PUBLISH, false),
        id::CORRELATION_DATA => (Form::Bin, PUBLISH, false),
        // Repeats only in PUBLISH; `check_value` refuses a second one in
        // SUBSCRIBE.
        id::SUBSCRIPTION_ID => (Form::Varint, PUBLISH | SUBSCRIBE, true),
        id::SESSION_EXPIRY => (Form::U32, CONNECT | CONNACK | DISCONNECT, false),
        id::ASSIGNED_CLIENT_ID | id::RESPONSE_INFO => (Form::Str, CONNACK, false),
        id::SERVER_KEEP_ALIVE => (Form::U16, CONNACK, false),
        id::AUTH_METHOD => (Form::Str, CONNECT | CONNACK | AUTH, false),
        id::AUTH_DATA => (Form::Bin, CONNECT | CONNACK | AUTH, false),
        id::REQUEST_PROBLEM_INFO | id::REQUEST_RESPONSE_INFO => (Form::Byte, CONNECT, false),
        id::SERVER_REFERENCE => (Form::Str, CONNACK | DISCONNECT, false),
        id::REASON_STRING => (Form::Str, ACKS, false),
        id::RECEIVE_MAXIMUM | id::TOPIC_ALIAS_MAXIMUM => (Form::U16, CONNECT | CONNACK, false),
        id::TOPIC_ALIAS => (Form::U16, PUBLISH, false),
        id::MAXIMUM_QOS
        | id::RETAIN_AVAILABLE
        | id::WILDCARD_AVAILABLE
        | id::SUBSCRIPTION_ID_AVAILABLE
        | id::SHARED_AVAILABLE => (Form::Byte, CONNACK, false),
        id::USER_PROPERTY => (Form::Pair, ALL, true),
        id::MAXIMUM_PACKET_SIZE => (Form::U32, CONNECT | CONNACK, false),
        _ => return None,
    })
}

/// What is wrong with a property block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PropError {
    /// An identifier this version does not define (Malformed Packet).
    Unknown(u8),
    /// A property its packet may not carry (Malformed Packet).
    NotAllowed(u8),
    /// A value cut short, or the block longer than the packet (Malformed
    /// Packet).
    Truncated(u8),
    /// A string that is not UTF-8 or holds U+0000 (Malformed Packet).
    BadString(u8),
    /// A property given twice that may appear once (Protocol Error).
    Duplicate(u8),
    /// A value out of its range, e.g. Receive Maximum 0 (Protocol Error).
    BadValue(u8),
}

impl PropError {
    /// The MQTT 5 reason code for a packet carrying it: 0x81 Malformed
    /// Packet or 0x82 Protocol Error [MQTT5-4.13].
    pub fn reason_code(self) -> u8 {
        match self {
            PropError::Duplicate(_) | PropError::BadValue(_) => 0x82,
            _ => 0x81,
        }
    }
}

impl fmt::Display for PropError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PropError::Unknown(p) => write!(f, "unknown property 0x{p:02X}"),
            PropError::NotAllowed(p) => write!(f, "property 0x{p:02X} not allowed in this packet"),
            PropError::Truncated(p) => write!(f, "property 0x{p:02X} cut short"),
            PropError::BadString(p) => write!(f, "property 0x{p:02X}: not a valid string"),
            PropError::Duplicate(p) => write!(f, "property 0x{p:02X} given twice"),
            PropError::BadValue(p) => write!(f, "property 0x{p:02X}: value out of range"),
        }
    }
}

/// A property's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Value<'a> {
    Byte(u8),
    U16(u16),
    U32(u32),
    Varint(u32),
    Str(&'a str),
    Bin(&'a [u8]),
    Pair(&'a str, &'a str),
}

/// A validated property block (the bytes after its length).
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Props<'a> {
    bytes: &'a [u8],
}

impl fmt::Debug for Props<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<'a> Props<'a> {
    /// No properties.
    pub const EMPTY: Props<'static> = Props { bytes: &[] };

    /// Checks `bytes` as the property block of a packet of type `ctx`.
    pub fn parse(bytes: &'a [u8], ctx: Context) -> Result<Props<'a>, PropError> {
        let mut seen = 0u64;
        let mut rest = bytes;
        while let Some((&pid, after)) = rest.split_first() {
            let (form, allowed, repeats) = spec(pid).ok_or(PropError::Unknown(pid))?;
            if allowed & (1u16 << (ctx.0 & 0x0F)) == 0 {
                return Err(PropError::NotAllowed(pid));
            }
            let bit = 1u64 << (pid & 0x3F);
            let twice_in_subscribe = pid == id::SUBSCRIPTION_ID && ctx.0 == 8;
            if seen & bit != 0 && (!repeats || twice_in_subscribe) {
                return Err(PropError::Duplicate(pid));
            }
            seen |= bit;
            let (value, after) = read_value(pid, form, after)?;
            check_value(pid, value)?;
            rest = after;
        }
        Ok(Props { bytes })
    }

    /// Wraps bytes a `Builder` wrote (valid by construction) or the
    /// caller validated.
    pub fn trusted(bytes: &'a [u8]) -> Props<'a> {
        Props { bytes }
    }

    /// The block's bytes, without its length.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The properties in order.
    pub fn iter(&self) -> PropIter<'a> {
        PropIter { rest: self.bytes }
    }

    /// The first value of property `pid`.
    pub fn get(&self, pid: u8) -> Option<Value<'a>> {
        self.iter().find(|&(p, _)| p == pid).map(|(_, v)| v)
    }

    /// A numeric property (byte, two- or four-byte integer, varint).
    pub fn number(&self, pid: u8) -> Option<u32> {
        match self.get(pid)? {
            Value::Byte(v) => Some(u32::from(v)),
            Value::U16(v) => Some(u32::from(v)),
            Value::U32(v) | Value::Varint(v) => Some(v),
            _ => None,
        }
    }

    /// A string property.
    pub fn string(&self, pid: u8) -> Option<&'a str> {
        match self.get(pid)? {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// A binary property.
    pub fn binary(&self, pid: u8) -> Option<&'a [u8]> {
        match self.get(pid)? {
            Value::Bin(b) => Some(b),
            _ => None,
        }
    }

    /// The Reason String, if any.
    pub fn reason_string(&self) -> Option<&'a str> {
        self.string(id::REASON_STRING)
    }

    /// The User Properties in order.
    pub fn user_properties(&self) -> impl Iterator<Item = (&'a str, &'a str)> {
        self.iter().filter_map(|(_, v)| match v {
            Value::Pair(k, v) => Some((k, v)),
            _ => None,
        })
    }
}

/// Iterates a validated block.
#[derive(Clone, Debug)]
pub struct PropIter<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for PropIter<'a> {
    type Item = (u8, Value<'a>);

    fn next(&mut self) -> Option<(u8, Value<'a>)> {
        let (&pid, after) = self.rest.split_first()?;
        let (form, _, _) = spec(pid)?;
        let (value, rest) = read_value(pid, form, after).ok()?;
        self.rest = rest;
        Some((pid, value))
    }
}

fn take(pid: u8, bytes: &[u8], n: usize) -> Result<(&[u8], &[u8]), PropError> {
    if bytes.len() < n {
        return Err(PropError::Truncated(pid));
    }
    Ok(bytes.split_at(n))
}

fn read_binary(pid: u8, bytes: &[u8]) -> Result<(&[u8], &[u8]), PropError> {
    let (len, rest) = take(pid, bytes, 2)?;
    let n = usize::from(u16::from_be_bytes([len[0], len[1]]));
    take(pid, rest, n)
}

fn read_string(pid: u8, bytes: &[u8]) -> Result<(&str, &[u8]), PropError> {
    let (raw, rest) = read_binary(pid, bytes)?;
    let s = str::from_utf8(raw).map_err(|_| PropError::BadString(pid))?;
    if s.contains('\0') {
        return Err(PropError::BadString(pid));
    }
    Ok((s, rest))
}

fn read_value(pid: u8, form: Form, bytes: &[u8]) -> Result<(Value<'_>, &[u8]), PropError> {
    Ok(match form {
        Form::Byte => {
            let (b, rest) = take(pid, bytes, 1)?;
            (Value::Byte(b[0]), rest)
        }
        Form::U16 => {
            let (b, rest) = take(pid, bytes, 2)?;
            (Value::U16(u16::from_be_bytes([b[0], b[1]])), rest)
        }
        Form::U32 => {
            let (b, rest) = take(pid, bytes, 4)?;
            (
                Value::U32(u32::from_be_bytes([b[0], b[1], b[2], b[3]])),
                rest,
            )
        }
        Form::Varint => {
            let (v, n) = read_varint(bytes).ok_or(PropError::Truncated(pid))?;
            (Value::Varint(v), &bytes[n..])
        }
        Form::Str => {
            let (s, rest) = read_string(pid, bytes)?;
            (Value::Str(s), rest)
        }
        Form::Bin => {
            let (b, rest) = read_binary(pid, bytes)?;
            (Value::Bin(b), rest)
        }
        Form::Pair => {
            let (k, rest) = read_string(pid, bytes)?;
            let (v, rest) = read_string(pid, rest)?;
            (Value::Pair(k, v), rest)
        }
    })
}

/// A Variable Byte Integer in its shortest form [MQTT5-1.5.5]: (value,
/// bytes used); `None` if cut short, longer than four bytes or not minimal.
pub fn read_varint(bytes: &[u8]) -> Option<(u32, usize)> {
    let mut value = 0u32;
    for (i, &b) in bytes.iter().take(4).enumerate() {
        value |= u32::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            if i > 0 && b == 0 {
                return None;
            }
            return Some((value, i + 1));
        }
    }
    None
}

/// Bytes a Variable Byte Integer of `v` takes (1..=4; 4 past the maximum).
pub fn varint_len(v: usize) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// The range rules of [MQTT5-3.x] for each property's value.
fn check_value(pid: u8, value: Value<'_>) -> Result<(), PropError> {
    let ok = match (pid, value) {
        (
            id::PAYLOAD_FORMAT
            | id::REQUEST_PROBLEM_INFO
            | id::REQUEST_RESPONSE_INFO
            | id::MAXIMUM_QOS
            | id::RETAIN_AVAILABLE
            | id::WILDCARD_AVAILABLE
            | id::SUBSCRIPTION_ID_AVAILABLE
            | id::SHARED_AVAILABLE,
            Value::Byte(b),
        ) => b <= 1,
        (id::SUBSCRIPTION_ID, Value::Varint(v)) => v != 0,
        (id::RECEIVE_MAXIMUM | id::TOPIC_ALIAS, Value::U16(v)) => v != 0,
        (id::MAXIMUM_PACKET_SIZE, Value::U32(v)) => v != 0,
        (id::RESPONSE_TOPIC, Value::Str(s)) => topic::check_name(s).is_ok(),
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(PropError::BadValue(pid))
    }
}

/// Builds a property block into a fixed buffer of `N` bytes.
#[derive(Clone, Debug, Default)]
pub struct Builder<const N: usize> {
    buf: heapless::Vec<u8, N>,
}

/// The block did not fit the builder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Full;

impl<const N: usize> Builder<N> {
    pub fn new() -> Self {
        Self {
            buf: heapless::Vec::new(),
        }
    }

    pub fn props(&self) -> Props<'_> {
        Props::trusted(&self.buf)
    }

    pub fn clear(&mut self) {
        self.buf.clear();
    }

    fn put(&mut self, b: &[u8]) -> Result<(), Full> {
        self.buf.extend_from_slice(b).map_err(|_| Full)
    }

    pub fn byte(&mut self, pid: u8, v: u8) -> Result<(), Full> {
        self.put(&[pid, v])
    }

    pub fn u16(&mut self, pid: u8, v: u16) -> Result<(), Full> {
        let [a, b] = v.to_be_bytes();
        self.put(&[pid, a, b])
    }

    pub fn u32(&mut self, pid: u8, v: u32) -> Result<(), Full> {
        let [a, b, c, d] = v.to_be_bytes();
        self.put(&[pid, a, b, c, d])
    }

    pub fn binary(&mut self, pid: u8, v: &[u8]) -> Result<(), Full> {
        let n = u16::try_from(v.len()).map_err(|_| Full)?;
        let [a, b] = n.to_be_bytes();
        self.put(&[pid, a, b])?;
        self.put(v)
    }

    pub fn string(&mut self, pid: u8, v: &str) -> Result<(), Full> {
        self.binary(pid, v.as_bytes())
    }

    pub fn pair(&mut self, k: &str, v: &str) -> Result<(), Full> {
        let start = self.buf.len();
        let kn = u16::try_from(k.len()).map_err(|_| Full)?;
        let vn = u16::try_from(v.len()).map_err(|_| Full)?;
        let r = self
            .put(&[id::USER_PROPERTY])
            .and_then(|()| self.put(&kn.to_be_bytes()))
            .and_then(|()| self.put(k.as_bytes()))
            .and_then(|()| self.put(&vn.to_be_bytes()))
            .and_then(|()| self.put(v.as_bytes()));
        if r.is_err() {
            self.buf.truncate(start);
        }
        r
    }
}

/// Bytes a property block takes on the wire: its length, then its bytes.
pub fn encoded_len(props: &Props<'_>) -> usize {
    varint_len(props.bytes.len()) + props.bytes.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PUBLISH: Context = Context(3);
    const CONNACK: Context = Context(2);
    const SUBSCRIBE: Context = Context(8);

    #[test]
    fn a_built_block_parses_back_to_the_same_values() {
        let mut b = Builder::<64>::new();
        b.u32(id::MESSAGE_EXPIRY, 60).unwrap();
        b.string(id::CONTENT_TYPE, "json").unwrap();
        b.pair("k", "v").unwrap();
        b.pair("k", "w").unwrap();
        b.binary(id::CORRELATION_DATA, &[1, 2]).unwrap();
        let p = Props::parse(b.props().bytes(), PUBLISH).unwrap();
        assert_eq!(p.number(id::MESSAGE_EXPIRY), Some(60));
        assert_eq!(p.string(id::CONTENT_TYPE), Some("json"));
        assert_eq!(p.binary(id::CORRELATION_DATA), Some(&[1u8, 2][..]));
        let users: Vec<_> = p.user_properties().collect();
        assert_eq!(users, [("k", "v"), ("k", "w")]);
        assert_eq!(p.iter().count(), 5);
    }

    #[test]
    fn each_rule_has_its_error_and_reason_code() {
        let cases: &[(&[u8], Context, PropError)] = &[
            (&[0x05, 0], PUBLISH, PropError::Unknown(5)),
            (&[0x80, 0], PUBLISH, PropError::Unknown(0x80)),
            (
                &[id::RECEIVE_MAXIMUM, 0, 1],
                PUBLISH,
                PropError::NotAllowed(0x21),
            ),
            (
                &[id::MESSAGE_EXPIRY, 0, 0, 1],
                PUBLISH,
                PropError::Truncated(2),
            ),
            (
                &[id::CONTENT_TYPE, 0, 1, 0xFF],
                PUBLISH,
                PropError::BadString(3),
            ),
            (
                &[id::CONTENT_TYPE, 0, 1, 0],
                PUBLISH,
                PropError::BadString(3),
            ),
            (
                &[id::TOPIC_ALIAS, 0, 1, id::TOPIC_ALIAS, 0, 2],
                PUBLISH,
                PropError::Duplicate(0x23),
            ),
            (&[id::TOPIC_ALIAS, 0, 0], PUBLISH, PropError::BadValue(0x23)),
            (
                &[id::RECEIVE_MAXIMUM, 0, 0],
                CONNACK,
                PropError::BadValue(0x21),
            ),
            (&[id::MAXIMUM_QOS, 2], CONNACK, PropError::BadValue(0x24)),
            (
                &[id::MAXIMUM_PACKET_SIZE, 0, 0, 0, 0],
                CONNACK,
                PropError::BadValue(0x27),
            ),
            (
                &[id::RESPONSE_TOPIC, 0, 1, b'#'],
                PUBLISH,
                PropError::BadValue(0x08),
            ),
            (
                &[id::SUBSCRIPTION_ID, 0x80, 0x00],
                PUBLISH,
                PropError::Truncated(0x0B),
            ),
            (
                &[id::SUBSCRIPTION_ID, 0],
                PUBLISH,
                PropError::BadValue(0x0B),
            ),
            (
                &[id::SUBSCRIPTION_ID, 1, id::SUBSCRIPTION_ID, 2],
                SUBSCRIBE,
                PropError::Duplicate(0x0B),
            ),
        ];
        for (bytes, ctx, want) in cases {
            assert_eq!(Props::parse(bytes, *ctx), Err(*want), "{bytes:02X?}");
            let code = want.reason_code();
            assert!(code == 0x81 || code == 0x82);
        }
        assert_eq!(PropError::Duplicate(1).reason_code(), 0x82);
        assert_eq!(PropError::Unknown(5).reason_code(), 0x81);
        // Repeats that are allowed.
        let twice = [id::SUBSCRIPTION_ID, 1, id::SUBSCRIPTION_ID, 2];
        assert!(Props::parse(&twice, PUBLISH).is_ok());
    }

    #[test]
    fn a_pair_that_does_not_fit_leaves_the_builder_as_it_was() {
        let mut b = Builder::<8>::new();
        b.byte(id::PAYLOAD_FORMAT, 1).unwrap();
        assert_eq!(b.pair("key", "value"), Err(Full));
        assert_eq!(b.props().bytes(), &[1, 1]);
    }

    #[test]
    fn varints_are_read_only_in_their_shortest_form() {
        assert_eq!(read_varint(&[0x7F]), Some((127, 1)));
        assert_eq!(read_varint(&[0x80, 0x01]), Some((128, 2)));
        assert_eq!(
            read_varint(&[0xFF, 0xFF, 0xFF, 0x7F]),
            Some((268_435_455, 4))
        );
        assert_eq!(read_varint(&[0x80, 0x00]), None);
        assert_eq!(read_varint(&[0xFF, 0xFF, 0xFF, 0xFF, 0x01]), None);
        assert_eq!(read_varint(&[0x80]), None);
    }
}
