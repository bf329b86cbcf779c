//! One MQTT connection's client state machine, sans-I/O (MQTT 3.1.1 and
//! MQTT 5).
//!
//! The caller hands in whole packets received from the broker and the
//! current time; the session answers with events and queues the control
//! packets it must send (CONNECT, PINGREQ, PUBACK, DISCONNECT) in a small
//! fixed buffer that the caller drains into the transport. `poll_at()` says
//! when the session next needs `poll()`.
//!
//! Keepalive [MQTT-3.1.2-23]: a PINGREQ goes out when nothing was sent for
//! the keepalive, and also when nothing was received for it, so that a link
//! that silently died is noticed even while we keep sending. A PINGREQ not
//! answered within half the keepalive means the link is dead: from the last
//! packet received, death is declared within 1.5 × keepalive. With MQTT 5
//! the broker's Server Keep Alive replaces ours for the connection
//! [mqtt5-4].
//!
//! MQTT 5 [mqtt5-3], [mqtt5-4], [mqtt5-9]: the CONNACK's limits come out in
//! `Event::Connected`; a refusal or a broker DISCONNECT is an error that
//! carries its reason code, and its Reason String is kept (`reason_text`)
//! for the caller's log. A Topic Alias from the broker (we allow none) and
//! an AUTH packet are protocol errors.

use core::fmt;
use core::time::Duration;

use heapless::Vec;

use super::packet::{self, Connack, Connect, ConnectReturnCode, Packet, Publish, QoS, Version};
use super::props::{id, Props};
use crate::time::Instant;

/// Bytes of control packets that may wait for the transport.
pub const CONTROL_TX_CAPACITY: usize = 4096;

/// How long the broker has to answer CONNECT with CONNACK.
pub const CONNACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes kept of the broker's last Reason String.
pub const REASON_TEXT_LEN: usize = 128;

/// Where the session is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// No connection; `start` begins one.
    Idle,
    /// CONNECT queued or sent at the given time, CONNACK awaited.
    AwaitingConnack { since: Instant },
    /// CONNACK accepted; packets flow.
    Connected,
    /// DISCONNECT queued; the transport should close once it is written.
    Disconnecting,
}

/// What the broker's CONNACK allows for this connection [mqtt5-4]; MQTT
/// 3.1.1 and absent properties give the defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// QoS 1 PUBLISH packets it takes unacknowledged at once.
    pub receive_maximum: u16,
    /// The largest packet it takes, in bytes.
    pub maximum_packet_size: u32,
    /// The highest QoS it takes.
    pub maximum_qos: QoS,
    /// Whether it takes retained messages.
    pub retain_available: bool,
    /// Topic aliases it takes from us.
    pub topic_alias_maximum: u16,
    /// Its keepalive for us, replacing ours, if it set one.
    pub server_keep_alive: Option<u16>,
    /// Whether it takes Subscription Identifiers (AWS IoT Core does not).
    pub subscription_ids: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            receive_maximum: u16::MAX,
            maximum_packet_size: u32::MAX,
            maximum_qos: QoS::AtLeastOnce,
            retain_available: true,
            topic_alias_maximum: 0,
            server_keep_alive: None,
            subscription_ids: true,
        }
    }
}

impl Limits {
    /// The largest packet the broker takes, in bytes.
    pub fn max_packet(&self) -> usize {
        usize::try_from(self.maximum_packet_size).unwrap_or(usize::MAX)
    }

    /// Reads a CONNACK's properties.
    fn from_props(p: &Props<'_>) -> Limits {
        let d = Limits::default();
        let u16_of = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
        Limits {
            receive_maximum: p
                .number(id::RECEIVE_MAXIMUM)
                .map_or(d.receive_maximum, u16_of),
            maximum_packet_size: p
                .number(id::MAXIMUM_PACKET_SIZE)
                .unwrap_or(d.maximum_packet_size),
            maximum_qos: match p.number(id::MAXIMUM_QOS) {
                Some(0) => QoS::AtMostOnce,
                _ => QoS::AtLeastOnce,
            },
            retain_available: p.number(id::RETAIN_AVAILABLE) != Some(0),
            topic_alias_maximum: p.number(id::TOPIC_ALIAS_MAXIMUM).map_or(0, u16_of),
            server_keep_alive: p.number(id::SERVER_KEEP_ALIVE).map(u16_of),
            subscription_ids: p.number(id::SUBSCRIPTION_ID_AVAILABLE) != Some(0),
        }
    }
}

/// What a received packet meant to the caller.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// The broker accepted the connection.
    Connected {
        session_present: bool,
        limits: Limits,
    },
    /// An application message arrived (a QoS 1 one is already PUBACKed).
    Publish(Publish<'a>),
    /// The broker answered our QoS 1 PUBLISH with this packet id: `reason`
    /// below 0x80 is success [mqtt5-7] (always 0 with 3.1.1).
    Puback {
        packet_id: u16,
        reason: u8,
        reason_string: Option<&'a str>,
    },
    /// The broker answered our SUBSCRIBE.
    Suback(packet::Suback<'a>),
    /// The broker answered our UNSUBSCRIBE.
    Unsuback { packet_id: u16 },
}

/// Why the session gave up on the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The broker refused the MQTT 3.1.1 CONNECT with this return code.
    Refused(ConnectReturnCode),
    /// The broker refused the MQTT 5 CONNECT with this reason code.
    Refused5(u8),
    /// The broker closed the connection with an MQTT 5 DISCONNECT.
    Disconnected(u8),
    /// No CONNACK within `CONNACK_TIMEOUT`.
    ConnackTimeout,
    /// No PINGRESP within half the keepalive.
    PingTimeout,
    /// The broker broke the protocol (a packet out of place).
    Protocol(&'static str),
    /// The broker used a Topic Alias, which we never allow.
    TopicAlias,
    /// A packet that did not parse.
    Malformed(packet::Error),
    /// The control buffer has no room: the transport is not draining it.
    TxFull,
}

impl Error {
    /// Whether this is the broker refusing our credentials (3.1.1 CONNACK
    /// 4 or 5; MQTT 5 0x86, 0x87, 0x8A, 0x8C) [iotcored-3] [mqtt5-3].
    pub fn is_auth_failure(self) -> bool {
        matches!(
            self,
            Error::Refused(
                ConnectReturnCode::BadUserNameOrPassword | ConnectReturnCode::NotAuthorized
            ) | Error::Refused5(0x86 | 0x87 | 0x8A | 0x8C)
        )
    }

    /// Whether the broker said our client id is not valid (MQTT 5 0x85):
    /// a usage problem [mqtt5-3].
    pub fn is_bad_client_id(self) -> bool {
        self == Error::Refused5(0x85)
    }

    /// Whether the broker said it does not speak MQTT 5 (0x84).
    pub fn is_unsupported_version(self) -> bool {
        self == Error::Refused5(0x84)
    }

    /// The least the next attempt must wait: 30 s for a quota or a rate
    /// the broker says we exceed [mqtt5-3] [mqtt5-9].
    pub fn min_backoff(self) -> Option<Duration> {
        match self {
            Error::Refused5(0x97 | 0x9F) | Error::Disconnected(0x96 | 0x97) => {
                Some(Duration::from_secs(30))
            }
            _ => None,
        }
    }

    /// The reason code of the DISCONNECT an MQTT 5 client sends when it
    /// closes the connection for this error, if it sends one.
    pub fn disconnect_reason(self) -> Option<u8> {
        match self {
            Error::Malformed(e) => Some(e.reason_code()),
            Error::Protocol(_) => Some(0x82),
            Error::TopicAlias => Some(0x94),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Refused(code) => write!(f, "broker refused the connection: {code}"),
            Error::Refused5(code) => write!(
                f,
                "broker refused the connection: 0x{code:02X} {}",
                packet::reason_name(*code)
            ),
            Error::Disconnected(code) => write!(
                f,
                "broker DISCONNECT 0x{code:02X} {}",
                packet::reason_name(*code)
            ),
            Error::ConnackTimeout => write!(f, "no CONNACK within {}s", CONNACK_TIMEOUT.as_secs()),
            Error::PingTimeout => f.write_str("no PINGRESP: the connection is dead"),
            Error::Protocol(what) => write!(f, "protocol error: {what}"),
            Error::TopicAlias => f.write_str("protocol error: the broker used a topic alias"),
            Error::Malformed(e) => write!(f, "malformed packet from the broker: {e}"),
            Error::TxFull => f.write_str("control packets are not being sent"),
        }
    }
}

/// One connection's MQTT state.
#[derive(Debug)]
pub struct Session {
    version: Version,
    state: State,
    /// Ours, as configured; `keepalive` is the one in force.
    own_keepalive: Duration,
    keepalive: Duration,
    last_tx: Instant,
    last_rx: Instant,
    ping_sent: Option<Instant>,
    tx: Vec<u8, CONTROL_TX_CAPACITY>,
    /// The Reason String of the broker's last refusal or DISCONNECT.
    reason_text: heapless::String<REASON_TEXT_LEN>,
}

impl Session {
    /// A session of protocol `version` that will ask the broker for
    /// `keepalive_secs` (1..=65535).
    pub fn new(keepalive_secs: u16, version: Version) -> Self {
        let keepalive = Duration::from_secs(u64::from(keepalive_secs.max(1)));
        Self {
            version,
            state: State::Idle,
            own_keepalive: keepalive,
            keepalive,
            last_tx: Instant::default(),
            last_rx: Instant::default(),
            ping_sent: None,
            tx: Vec::new(),
            reason_text: heapless::String::new(),
        }
    }

    /// The protocol it speaks.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Whether CONNACK was accepted and the connection is usable.
    pub fn is_connected(&self) -> bool {
        self.state == State::Connected
    }

    /// The keepalive in force.
    pub fn keepalive(&self) -> Duration {
        self.keepalive
    }

    /// The Reason String of the broker's last refusal or DISCONNECT (empty
    /// if it gave none).
    pub fn reason_text(&self) -> &str {
        &self.reason_text
    }

    /// Begins a connection on a fresh transport: queues CONNECT (in this
    /// session's protocol: `connect.properties` is used with MQTT 5 only).
    pub fn start(&mut self, now: Instant, connect: &Connect<'_>) -> Result<(), Error> {
        self.tx.clear();
        self.ping_sent = None;
        self.last_rx = now;
        self.last_tx = now;
        self.keepalive = self.own_keepalive;
        self.reason_text.clear();
        let properties = match self.version {
            Version::V311 => None,
            Version::V5 => Some(connect.properties.unwrap_or(Props::EMPTY)),
        };
        self.queue(&Packet::Connect(Connect {
            keepalive: duration_secs_u16(self.keepalive),
            properties,
            ..*connect
        }))?;
        self.set_state(State::AwaitingConnack { since: now });
        Ok(())
    }

    /// The transport closed or failed: back to `Idle`, queued bytes dropped.
    pub fn reset(&mut self) {
        self.tx.clear();
        self.ping_sent = None;
        self.set_state(State::Idle);
    }

    /// Queues DISCONNECT (if connected) for an orderly shutdown; with MQTT
    /// 5 its two bytes mean reason 0x00, normal disconnection [mqtt5-10].
    pub fn disconnect(&mut self) {
        if self.state == State::Connected {
            // Two bytes; if even they do not fit, the link is stuck anyway and
            // the caller closes it without them.
            let _ = self.queue(&Packet::DISCONNECT);
        }
        self.set_state(State::Disconnecting);
    }

    /// Handles one whole packet received from the broker.
    pub fn handle<'a>(
        &mut self,
        now: Instant,
        bytes: &'a [u8],
    ) -> Result<Option<Event<'a>>, Error> {
        // A broker of MQTT 3.1.1 only answers our CONNECT with its own
        // CONNACK, return code 1: unacceptable protocol version [mqtt5-1].
        if let (Version::V5, State::AwaitingConnack { .. }, [0x20, 0x02, 0x00, 0x01]) =
            (self.version, self.state, bytes)
        {
            return Err(Error::Refused5(0x84));
        }
        let packet = Packet::parse_as(bytes, self.version).map_err(Error::Malformed)?;
        self.last_rx = now;
        match (self.state, packet) {
            (
                State::AwaitingConnack { .. },
                Packet::Connack(Connack {
                    session_present,
                    code,
                    properties,
                }),
            ) => {
                let props = properties.unwrap_or(Props::EMPTY);
                if code != 0 {
                    self.keep_reason(&props);
                    return Err(match self.version {
                        // `parse_as` checked the 3.1.1 code.
                        Version::V311 => ConnectReturnCode::from_u8(code)
                            .map_or(Error::Protocol("bad CONNACK code"), Error::Refused),
                        Version::V5 => Error::Refused5(code),
                    });
                }
                let limits = Limits::from_props(&props);
                if let Some(secs) = limits.server_keep_alive.filter(|&s| s > 0) {
                    self.keepalive = Duration::from_secs(u64::from(secs));
                }
                self.set_state(State::Connected);
                Ok(Some(Event::Connected {
                    session_present,
                    limits,
                }))
            }
            (State::AwaitingConnack { .. }, Packet::Disconnect { reason, properties }) => {
                self.keep_reason(&properties.unwrap_or(Props::EMPTY));
                Err(Error::Disconnected(reason))
            }
            (State::AwaitingConnack { .. }, _) => Err(Error::Protocol("packet before CONNACK")),
            (_, Packet::Connack(_)) => Err(Error::Protocol("second CONNACK")),
            (_, Packet::Pingresp) => {
                self.ping_sent = None;
                Ok(None)
            }
            (_, Packet::Publish(publish)) => {
                if publish
                    .properties
                    .is_some_and(|p| p.get(id::TOPIC_ALIAS).is_some())
                {
                    return Err(Error::TopicAlias);
                }
                if let Some(packet_id) = publish.packet_id {
                    // [MQTT-4.3.2-2] Acknowledge QoS 1 before delivering (the
                    // two-byte body means reason 0x00 in MQTT 5 too).
                    self.queue(&Packet::puback(packet_id))?;
                }
                Ok(Some(Event::Publish(publish)))
            }
            (
                _,
                Packet::Puback {
                    packet_id,
                    reason,
                    properties,
                },
            ) => Ok(Some(Event::Puback {
                packet_id,
                reason,
                reason_string: properties.and_then(|p| p.reason_string()),
            })),
            (_, Packet::Suback(suback)) => Ok(Some(Event::Suback(suback))),
            (_, Packet::Unsuback { packet_id, .. }) => Ok(Some(Event::Unsuback { packet_id })),
            (
                _,
                Packet::Disconnect {
                    reason,
                    properties: Some(props),
                },
            ) => {
                self.keep_reason(&props);
                Err(Error::Disconnected(reason))
            }
            (
                _,
                Packet::Connect(_)
                | Packet::Subscribe(_)
                | Packet::Unsubscribe(_)
                | Packet::Pingreq
                | Packet::Disconnect { .. },
            ) => Err(Error::Protocol("a packet only clients send")),
        }
    }

    fn keep_reason(&mut self, props: &Props<'_>) {
        self.reason_text.clear();
        if let Some(text) = props.reason_string() {
            for c in text.chars() {
                if self.reason_text.push(c).is_err() {
                    break;
                }
            }
        }
    }

    /// Runs the timers: CONNACK timeout, keepalive PINGREQ, ping timeout.
    pub fn poll(&mut self, now: Instant) -> Result<(), Error> {
        match self.state {
            State::AwaitingConnack { since } if now >= since + CONNACK_TIMEOUT => {
                Err(Error::ConnackTimeout)
            }
            State::Connected => {
                if let Some(sent) = self.ping_sent {
                    if now >= sent + self.ping_timeout() {
                        return Err(Error::PingTimeout);
                    }
                } else if now >= self.ping_due() {
                    self.queue(&Packet::Pingreq)?;
                    self.ping_sent = Some(now);
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// When `poll` next has something to do.
    pub fn poll_at(&self) -> Option<Instant> {
        match self.state {
            State::AwaitingConnack { since } => Some(since + CONNACK_TIMEOUT),
            State::Connected => Some(match self.ping_sent {
                Some(sent) => sent + self.ping_timeout(),
                None => self.ping_due(),
            }),
            State::Idle | State::Disconnecting => None,
        }
    }

    /// Control bytes waiting for the transport.
    pub fn pending_tx(&self) -> &[u8] {
        &self.tx
    }

    /// The transport took the first `n` pending bytes at `now`.
    pub fn consume_tx(&mut self, now: Instant, n: usize) {
        let n = n.min(self.tx.len());
        if n > 0 {
            self.tx.rotate_left(n);
            self.tx.truncate(self.tx.len() - n);
            self.last_tx = now;
        }
    }

    /// Free room in the control buffer.
    pub fn tx_free(&self) -> usize {
        CONTROL_TX_CAPACITY - self.tx.len()
    }

    /// Other bytes (a spooled PUBLISH) went to the broker at `now`.
    pub fn note_tx(&mut self, now: Instant) {
        self.last_tx = now;
    }

    /// Queues any control packet (SUBSCRIBE, UNSUBSCRIBE, ...).
    pub fn queue(&mut self, packet: &Packet<'_>) -> Result<(), Error> {
        let len = packet.buffer_len();
        let start = self.tx.len();
        if self.tx.resize(start + len, 0).is_err() {
            return Err(Error::TxFull);
        }
        match packet.emit(&mut self.tx[start..]) {
            Ok(_) => Ok(()),
            Err(e) => {
                self.tx.truncate(start);
                Err(Error::Malformed(e))
            }
        }
    }

    fn ping_due(&self) -> Instant {
        let last = self.last_tx.min(self.last_rx);
        last + self.keepalive
    }

    fn ping_timeout(&self) -> Duration {
        (self.keepalive / 2).max(Duration::from_millis(500))
    }

    fn set_state(&mut self, state: State) {
        if self.state != state {
            log::trace!("mqtt session: {:?} -> {:?}", self.state, state);
            self.state = state;
        }
    }
}

fn duration_secs_u16(d: Duration) -> u16 {
    u16::try_from(d.as_secs()).unwrap_or(u16::MAX)
}

/// Convenience for tests and callers: a CONNECT with the given client id.
pub fn connect_packet(client_id: &str, clean_session: bool) -> Connect<'_> {
    Connect {
        client_id,
        keepalive: 0,
        clean_session,
        username: None,
        password: None,
        properties: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::packet::QoS;

    fn t(ms: u64) -> Instant {
        Instant::from_millis(ms)
    }

    fn emit(packet: Packet<'_>) -> std::vec::Vec<u8> {
        let mut buf = vec![0; packet.buffer_len()];
        let n = packet.emit(&mut buf).unwrap();
        buf.truncate(n);
        buf
    }

    fn connack(code: ConnectReturnCode) -> std::vec::Vec<u8> {
        emit(Packet::Connack(Connack {
            properties: None,
            session_present: false,
            code: code as u8,
        }))
    }

    /// A session with keepalive 10 s, connected at t = 0.
    fn connected() -> Session {
        let mut s = Session::new(10, Version::V311);
        s.start(t(0), &connect_packet("dev1", true)).unwrap();
        let n = s.pending_tx().len();
        s.consume_tx(t(0), n);
        let ack = connack(ConnectReturnCode::Accepted);
        assert_eq!(
            s.handle(t(5), &ack),
            Ok(Some(Event::Connected {
                session_present: false,
                limits: Limits::default(),
            }))
        );
        s
    }

    #[test]
    fn start_queues_a_connect_with_the_client_id_and_keepalive() {
        let mut s = Session::new(60, Version::V311);
        s.start(t(0), &connect_packet("dev1", true)).unwrap();
        match Packet::parse(s.pending_tx()) {
            Ok(Packet::Connect(c)) => {
                assert_eq!(c.client_id, "dev1");
                assert_eq!(c.keepalive, 60);
                assert!(c.clean_session);
            }
            other => panic!("expected CONNECT, got {other:?}"),
        }
        assert_eq!(s.state(), State::AwaitingConnack { since: t(0) });
        assert_eq!(s.poll_at(), Some(t(10_000)));
    }

    #[test]
    fn connack_refusals_are_errors_and_only_4_and_5_are_auth_failures() {
        use ConnectReturnCode::*;
        for (code, auth) in [
            (UnacceptableProtocolVersion, false),
            (IdentifierRejected, false),
            (ServerUnavailable, false),
            (BadUserNameOrPassword, true),
            (NotAuthorized, true),
        ] {
            let mut s = Session::new(60, Version::V311);
            s.start(t(0), &connect_packet("dev1", true)).unwrap();
            let err = s.handle(t(1), &connack(code)).unwrap_err();
            assert_eq!(err, Error::Refused(code));
            assert_eq!(err.is_auth_failure(), auth, "{code:?}");
        }
    }

    #[test]
    fn no_connack_within_the_timeout_fails_the_attempt() {
        let mut s = Session::new(60, Version::V311);
        s.start(t(0), &connect_packet("dev1", true)).unwrap();
        assert_eq!(s.poll(t(9_999)), Ok(()));
        assert_eq!(s.poll(t(10_000)), Err(Error::ConnackTimeout));
    }

    #[test]
    fn a_packet_before_connack_is_a_protocol_error() {
        let mut s = Session::new(60, Version::V311);
        s.start(t(0), &connect_packet("dev1", true)).unwrap();
        let resp = emit(Packet::Pingresp);
        assert!(matches!(s.handle(t(1), &resp), Err(Error::Protocol(_))));
    }

    #[test]
    fn an_idle_link_sends_pingreq_after_the_keepalive_and_pingresp_clears_it() {
        let mut s = connected();
        // Last rx at 5 ms, last tx at 0 s: the ping is due at 10 s.
        assert_eq!(s.poll_at(), Some(t(10_000)));
        s.poll(t(9_999)).unwrap();
        assert!(s.pending_tx().is_empty());
        s.poll(t(10_000)).unwrap();
        assert_eq!(s.pending_tx(), [0xC0, 0x00]);
        s.consume_tx(t(10_000), 2);
        assert_eq!(
            s.poll_at(),
            Some(t(15_000)),
            "answer due within keepalive/2"
        );
        s.handle(t(10_100), &emit(Packet::Pingresp)).unwrap();
        // Next ping: 10 s after the older of last tx (10.0) and last rx (10.1).
        assert_eq!(s.poll_at(), Some(t(20_000)));
    }

    #[test]
    fn an_unanswered_ping_declares_the_link_dead_within_one_and_a_half_keepalives() {
        let mut s = connected();
        // The broker goes silent after the CONNACK at 5 ms.
        s.poll(t(10_000)).unwrap();
        s.consume_tx(t(10_000), 2);
        assert_eq!(s.poll(t(14_999)), Ok(()));
        assert_eq!(s.poll(t(15_000)), Err(Error::PingTimeout));
        // 15 s after the last tx at 0 s, within 1.5 x 10 s of the last rx.
    }

    #[test]
    fn a_silent_broker_is_pinged_even_while_we_keep_sending() {
        let mut s = connected(); // last packet received at 5 ms
        for ms in (1_000..=9_000).step_by(1_000) {
            s.note_tx(t(ms)); // publishes going out every second
            s.poll(t(ms)).unwrap();
        }
        assert!(s.pending_tx().is_empty());
        assert_eq!(s.poll_at(), Some(t(10_005)), "keepalive after the last rx");
        s.note_tx(t(10_000));
        s.poll(t(10_005)).unwrap();
        assert_eq!(s.pending_tx(), [0xC0, 0x00], "nothing received since 5 ms");
        s.consume_tx(t(10_005), 2);
        assert_eq!(s.poll(t(15_004)), Ok(()));
        // Dead at 15.005 s: 1.5 x keepalive after the last packet received.
        assert_eq!(s.poll(t(15_005)), Err(Error::PingTimeout));
    }

    #[test]
    fn incoming_qos1_publish_is_acknowledged_and_delivered() {
        let mut s = connected();
        let bytes = emit(Packet::Publish(Publish {
            properties: None,
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "a/b",
            packet_id: Some(7),
            payload: b"hi",
        }));
        match s.handle(t(6), &bytes) {
            Ok(Some(Event::Publish(p))) => {
                assert_eq!((p.topic, p.payload), ("a/b", &b"hi"[..]));
            }
            other => panic!("expected a publish, got {other:?}"),
        }
        assert_eq!(s.pending_tx(), [0x40, 0x02, 0x00, 0x07], "PUBACK for id 7");
    }

    #[test]
    fn malformed_bytes_and_client_only_packets_are_errors() {
        let mut s = connected();
        assert!(matches!(
            s.handle(t(6), &[0x20, 0x03, 0, 0, 0]),
            Err(Error::Malformed(_))
        ));
        assert!(matches!(
            s.handle(t(6), &[0xC0, 0x00]),
            Err(Error::Protocol(_))
        ));
        assert!(matches!(
            s.handle(t(6), &connack(ConnectReturnCode::Accepted)),
            Err(Error::Protocol(_))
        ));
    }

    #[test]
    fn disconnect_queues_disconnect_only_when_connected() {
        let mut s = connected();
        s.disconnect();
        assert_eq!(s.pending_tx(), [0xE0, 0x00]);
        assert_eq!(s.state(), State::Disconnecting);
        let mut idle = Session::new(10, Version::V311);
        idle.disconnect();
        assert!(idle.pending_tx().is_empty());
    }

    #[test]
    fn a_full_control_buffer_is_an_error_not_a_panic() {
        let mut s = connected();
        let mut result = Ok(());
        for _ in 0..=CONTROL_TX_CAPACITY / 2 {
            result = s.queue(&Packet::Pingreq);
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(Error::TxFull));
    }

    #[test]
    fn reset_returns_to_idle_and_forgets_queued_bytes() {
        let mut s = connected();
        s.poll(t(10_000)).unwrap();
        s.reset();
        assert_eq!(s.state(), State::Idle);
        assert!(s.pending_tx().is_empty());
        assert_eq!(s.poll_at(), None);
    }

    // ---- MQTT 5 ------------------------------------------------------------

    fn v5_connected(connack: &[u8]) -> (Session, Result<Option<Event<'_>>, Error>) {
        let mut s = Session::new(60, Version::V5);
        s.start(t(0), &connect_packet("dev1", true)).unwrap();
        let n = s.pending_tx().len();
        s.consume_tx(t(0), n);
        let r = s.handle(t(1), connack);
        (s, r)
    }

    #[test]
    fn an_mqtt5_session_sends_a_level_5_connect_and_reads_the_connack_limits() {
        // [mqtt5-4] mosquitto's CONNACK with max_inflight_messages 7,
        // max_packet_size 2000, and a Server Keep Alive of 20 s added.
        let connack = [
            0x20, 0x11, 0x00, 0x00, 0x0E, 0x22, 0x00, 0x0a, 0x27, 0x00, 0x00, 0x07, 0xd0, 0x21,
            0x00, 0x07, 0x13, 0x00, 0x14,
        ];
        let mut s = Session::new(60, Version::V5);
        s.start(t(0), &connect_packet("dev1", true)).unwrap();
        assert!(matches!(
            Packet::parse_as(s.pending_tx(), Version::V5),
            Ok(Packet::Connect(c)) if c.properties.is_some()
        ));
        let n = s.pending_tx().len();
        s.consume_tx(t(0), n);
        let limits = Limits {
            receive_maximum: 7,
            maximum_packet_size: 2000,
            topic_alias_maximum: 10,
            server_keep_alive: Some(20),
            ..Limits::default()
        };
        assert_eq!(
            s.handle(t(1), &connack),
            Ok(Some(Event::Connected {
                session_present: false,
                limits
            }))
        );
        // The broker's keepalive replaces ours: a ping after 20 s.
        assert_eq!(s.keepalive(), Duration::from_secs(20));
        assert_eq!(s.poll_at(), Some(t(20_000)));
    }

    #[test]
    fn mqtt5_connack_refusals_map_to_exits_and_backoffs() {
        // [mqtt5-3]
        for (code, auth, bad_id, least) in [
            (0x86, true, false, None),
            (0x87, true, false, None),
            (0x8A, true, false, None),
            (0x8C, true, false, None),
            (0x85, false, true, None),
            (0x88, false, false, None),
            (0x89, false, false, None),
            (0x97, false, false, Some(30)),
            (0x9F, false, false, Some(30)),
            (0x84, false, false, None),
        ] {
            let connack = [0x20, 0x08, 0x00, code, 0x05, 0x1F, 0x00, 0x02, b'n', b'o'];
            let (s, r) = v5_connected(&connack);
            let e = r.unwrap_err();
            assert_eq!(e, Error::Refused5(code));
            assert_eq!(e.is_auth_failure(), auth, "{code:#x}");
            assert_eq!(e.is_bad_client_id(), bad_id, "{code:#x}");
            assert_eq!(e.min_backoff(), least.map(Duration::from_secs), "{code:#x}");
            assert_eq!(s.reason_text(), "no");
            assert!(e.to_string().contains(&format!("0x{code:02X}")), "{e}");
        }
    }

    #[test]
    fn a_3_1_1_broker_refusing_level_5_is_unsupported_protocol_version() {
        // [mqtt5-1] Its own CONNACK, return code 1: the hint follows.
        let (_, r) = v5_connected(&[0x20, 0x02, 0x00, 0x01]);
        let e = r.unwrap_err();
        assert_eq!(e, Error::Refused5(0x84));
        assert!(e.is_unsupported_version());
    }

    #[test]
    fn an_mqtt5_broker_disconnect_is_an_error_with_its_reason_kept() {
        // [mqtt5-9]
        let (mut s, r) = v5_connected(&[0x20, 0x03, 0x00, 0x00, 0x00]);
        assert!(r.is_ok());
        let disconnect = [
            0xE0, 0x0C, 0x8E, 0x0A, 0x1F, 0x00, 0x07, b't', b'a', b'k', b'e', b'n', b' ', b'1',
        ];
        assert_eq!(s.handle(t(2), &disconnect), Err(Error::Disconnected(0x8E)));
        assert_eq!(s.reason_text(), "taken 1");
        assert_eq!(
            Error::Disconnected(0x8E).to_string(),
            "broker DISCONNECT 0x8E session taken over"
        );
        assert_eq!(
            Error::Disconnected(0x97).min_backoff(),
            Some(Duration::from_secs(30))
        );
    }

    #[test]
    fn an_mqtt5_puback_carries_its_verdict_and_a_topic_alias_is_refused() {
        let (mut s, _) = v5_connected(&[0x20, 0x03, 0x00, 0x00, 0x00]);
        let refused = [0x40, 0x08, 0x00, 0x07, 0x87, 0x04, 0x1F, 0x00, 0x01, b'x'];
        assert_eq!(
            s.handle(t(2), &refused),
            Ok(Some(Event::Puback {
                packet_id: 7,
                reason: 0x87,
                reason_string: Some("x")
            }))
        );
        // [mqtt5-7] Topic aliases from the broker: we allowed none.
        let aliased = [0x30, 0x07, 0x00, 0x00, 0x03, 0x23, 0x00, 0x01, b'x'];
        let e = s.handle(t(3), &aliased).unwrap_err();
        assert_eq!(e, Error::TopicAlias);
        assert_eq!(e.disconnect_reason(), Some(0x94));
        // A malformed packet: 0x81; AUTH: a protocol error.
        let e = s
            .handle(t(4), &[0x40, 0x04, 0x00, 0x07, 0x87, 0x09])
            .unwrap_err();
        assert_eq!(e.disconnect_reason(), Some(0x81));
        let e = s.handle(t(5), &[0xF0, 0x00]).unwrap_err();
        assert_eq!(e.disconnect_reason(), Some(0x82));
    }

    #[test]
    fn an_incoming_qos1_publish_under_mqtt5_is_acknowledged_in_the_short_form() {
        let (mut s, _) = v5_connected(&[0x20, 0x03, 0x00, 0x00, 0x00]);
        let publish = [0x32, 0x07, 0x00, 0x01, b'a', 0x00, 0x09, 0x00, b'x'];
        assert!(matches!(
            s.handle(t(2), &publish),
            Ok(Some(Event::Publish(_)))
        ));
        assert_eq!(s.pending_tx(), [0x40, 0x02, 0x00, 0x09]);
    }
}
