//! MQTT 3.1.1 packet codec: parse, emit and buffer_len for every packet a
//! client sends or receives, plus a framer for the fixed header.
//!
//! Parsing yields borrowed representations (topic and payload point into the
//! receive buffer); emitting writes into a caller's slice. A representation
//! that parsed can always be emitted again, byte for byte. Nothing here
//! allocates or panics on input. QoS 2 (PUBREC, PUBREL, PUBCOMP) is not
//! supported by AWS IoT Core and is refused with `Error::Unsupported`.
//!
//! References are to the MQTT 3.1.1 OASIS standard, e.g. [MQTT-2.2.2-1].

// API CONTRACT (implemented by the codec task; keep names and signatures):
//
// pub const MAX_REMAINING_LEN: usize = 268_435_455;
//
// #[derive(Clone, Copy, Debug, PartialEq, Eq)] #[repr(u8)]
// pub enum QoS { AtMostOnce = 0, AtLeastOnce = 1 }
// impl QoS { pub fn from_u8(v: u8) -> Option<QoS> }   // 2 and above → None
//
// #[derive(Clone, Copy, Debug, PartialEq, Eq)]
// pub enum ConnectReturnCode { Accepted = 0, UnacceptableProtocolVersion = 1,
//     IdentifierRejected = 2, ServerUnavailable = 3, BadUserNameOrPassword = 4,
//     NotAuthorized = 5 }   // plus Display
//
// #[derive(Clone, Copy, Debug, PartialEq, Eq)]
// pub enum SubackCode { Granted(QoS), GrantedExactlyOnce /* 0x02 */, Failure /* 0x80 */ }
//
// pub struct Connect<'a> { pub client_id: &'a str, pub keepalive: u16,
//     pub clean_session: bool, pub username: Option<&'a str>, pub password: Option<&'a [u8]> }
//     (no will support: a parsed CONNECT with the will flag is Error::Unsupported)
// pub struct Connack { pub session_present: bool, pub code: ConnectReturnCode }
// pub struct Publish<'a> { pub dup: bool, pub qos: QoS, pub retain: bool,
//     pub topic: &'a str, pub packet_id: Option<u16> /* Some iff qos > 0 */, pub payload: &'a [u8] }
// pub struct Subscribe<'a> { pub packet_id: u16, pub filters: Filters<'a> }
// pub struct Unsubscribe<'a> { pub packet_id: u16, pub filters: Filters<'a> }
// pub struct Suback<'a> { pub packet_id: u16, codes: &'a [u8] } + fn codes(&self) -> impl Iterator<Item = SubackCode>
//     + fn new(packet_id, codes: &'a [u8]) validating
// Filters<'a>: either a caller's list for emitting (`Filters::List(&'a [(&'a str, QoS)])`
//     for SUBSCRIBE; for UNSUBSCRIBE the QoS is ignored) or the encoded bytes of a parsed
//     packet; `fn iter(&self) -> impl Iterator<Item = (&'a str, QoS)>`, `fn len(&self) -> usize`.
//
// pub enum Packet<'a> { Connect(Connect<'a>), Connack(Connack), Publish(Publish<'a>),
//     Puback { packet_id: u16 }, Subscribe(Subscribe<'a>), Suback(Suback<'a>),
//     Unsubscribe(Unsubscribe<'a>), Unsuback { packet_id: u16 }, Pingreq, Pingresp, Disconnect }
// impl<'a> Packet<'a> {
//     pub fn parse(buf: &'a [u8]) -> Result<Packet<'a>, Error>;   // buf = exactly one whole packet
//     pub fn buffer_len(&self) -> usize;                           // bytes emit() writes
//     pub fn emit(&self, buf: &mut [u8]) -> Result<usize, Error>;  // Err(BufferTooSmall) if short
// }
//
// /// Framer: looks at the start of a receive buffer. Ok(None): the fixed
// /// header is not complete yet. Ok(Some(n)): the first packet is n bytes long
// /// in total (header included), whether or not n bytes are present yet.
// pub fn packet_len(buf: &[u8]) -> Result<Option<usize>, Error>;
//
// /// Publish helpers used by the spool: emit a PUBLISH from parts without building
// /// a Publish first, and set the DUP flag on an already-encoded QoS 1 PUBLISH.
// pub fn publish_len(topic_len: usize, payload_len: usize, qos: QoS) -> usize;
// pub fn set_dup(encoded_publish: &mut [u8]);
//
// #[derive(Clone, Copy, Debug, PartialEq, Eq)]
// pub enum Error { Truncated, BadRemainingLength, ReservedFlags, UnknownType(u8),
//     Unsupported, InvalidUtf8, InvalidTopic, InvalidQoS, ZeroPacketId, BadConnack,
//     BadSuback, TrailingBytes, BufferTooSmall, TooLong, Protocol(&'static str) }   // + Display
