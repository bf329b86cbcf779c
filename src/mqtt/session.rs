//! One MQTT connection's client state machine, sans-I/O (MQTT 3.1.1).
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
//! packet received, death is declared within 1.5 × keepalive.

use core::fmt;
use core::time::Duration;

use heapless::Vec;

use super::packet::{self, Connack, Connect, ConnectReturnCode, Packet, Publish};
use crate::time::Instant;

/// Bytes of control packets that may wait for the transport.
pub const CONTROL_TX_CAPACITY: usize = 4096;

/// How long the broker has to answer CONNECT with CONNACK.
pub const CONNACK_TIMEOUT: Duration = Duration::from_secs(10);

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

/// What a received packet meant to the caller.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// The broker accepted the connection.
    Connected { session_present: bool },
    /// An application message arrived (a QoS 1 one is already PUBACKed).
    Publish(Publish<'a>),
    /// The broker acknowledged our QoS 1 PUBLISH with this packet id.
    Puback { packet_id: u16 },
    /// The broker answered our SUBSCRIBE.
    Suback(packet::Suback<'a>),
    /// The broker answered our UNSUBSCRIBE.
    Unsuback { packet_id: u16 },
}

/// Why the session gave up on the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The broker refused the CONNECT with this return code.
    Refused(ConnectReturnCode),
    /// No CONNACK within `CONNACK_TIMEOUT`.
    ConnackTimeout,
    /// No PINGRESP within half the keepalive.
    PingTimeout,
    /// The broker broke the protocol (a packet out of place).
    Protocol(&'static str),
    /// A packet that did not parse.
    Malformed(packet::Error),
    /// The control buffer has no room: the transport is not draining it.
    TxFull,
}

impl Error {
    /// Whether this is the broker refusing our credentials (CONNACK 4 or 5)
    /// [iotcored-3].
    pub fn is_auth_failure(self) -> bool {
        matches!(
            self,
            Error::Refused(
                ConnectReturnCode::BadUserNameOrPassword | ConnectReturnCode::NotAuthorized
            )
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Refused(code) => write!(f, "broker refused the connection: {code}"),
            Error::ConnackTimeout => write!(f, "no CONNACK within {}s", CONNACK_TIMEOUT.as_secs()),
            Error::PingTimeout => f.write_str("no PINGRESP: the link is dead"),
            Error::Protocol(what) => write!(f, "protocol violation by the broker: {what}"),
            Error::Malformed(e) => write!(f, "malformed packet from the broker: {e}"),
            Error::TxFull => f.write_str("control packets are not being sent"),
        }
    }
}

/// One connection's MQTT state.
#[derive(Debug)]
pub struct Session {
    state: State,
    keepalive: Duration,
    last_tx: Instant,
    last_rx: Instant,
    ping_sent: Option<Instant>,
    tx: Vec<u8, CONTROL_TX_CAPACITY>,
}

impl Session {
    /// A session that will ask the broker for `keepalive_secs` (1..=65535).
    pub fn new(keepalive_secs: u16) -> Self {
        Self {
            state: State::Idle,
            keepalive: Duration::from_secs(u64::from(keepalive_secs.max(1))),
            last_tx: Instant::default(),
            last_rx: Instant::default(),
            ping_sent: None,
            tx: Vec::new(),
        }
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Whether CONNACK was accepted and the connection is usable.
    pub fn is_connected(&self) -> bool {
        self.state == State::Connected
    }

    /// Begins a connection on a fresh transport: queues CONNECT.
    pub fn start(&mut self, now: Instant, connect: &Connect<'_>) -> Result<(), Error> {
        self.tx.clear();
        self.ping_sent = None;
        self.last_rx = now;
        self.last_tx = now;
        self.queue(&Packet::Connect(Connect {
            keepalive: duration_secs_u16(self.keepalive),
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

    /// Queues DISCONNECT (if connected) for an orderly shutdown.
    pub fn disconnect(&mut self) {
        if self.state == State::Connected {
            // Two bytes; if even they do not fit, the link is stuck anyway and
            // the caller closes it without them.
            let _ = self.queue(&Packet::Disconnect);
        }
        self.set_state(State::Disconnecting);
    }

    /// Handles one whole packet received from the broker.
    pub fn handle<'a>(
        &mut self,
        now: Instant,
        bytes: &'a [u8],
    ) -> Result<Option<Event<'a>>, Error> {
        let packet = Packet::parse(bytes).map_err(Error::Malformed)?;
        self.last_rx = now;
        match (self.state, packet) {
            (
                State::AwaitingConnack { .. },
                Packet::Connack(Connack {
                    session_present,
                    code,
                }),
            ) => {
                if code != ConnectReturnCode::Accepted {
                    return Err(Error::Refused(code));
                }
                self.set_state(State::Connected);
                Ok(Some(Event::Connected { session_present }))
            }
            (State::AwaitingConnack { .. }, _) => Err(Error::Protocol("packet before CONNACK")),
            (_, Packet::Connack(_)) => Err(Error::Protocol("second CONNACK")),
            (_, Packet::Pingresp) => {
                self.ping_sent = None;
                Ok(None)
            }
            (_, Packet::Publish(publish)) => {
                if let Some(packet_id) = publish.packet_id {
                    // [MQTT-4.3.2-2] Acknowledge QoS 1 before delivering.
                    self.queue(&Packet::Puback { packet_id })?;
                }
                Ok(Some(Event::Publish(publish)))
            }
            (_, Packet::Puback { packet_id }) => Ok(Some(Event::Puback { packet_id })),
            (_, Packet::Suback(suback)) => Ok(Some(Event::Suback(suback))),
            (_, Packet::Unsuback { packet_id }) => Ok(Some(Event::Unsuback { packet_id })),
            (
                _,
                Packet::Connect(_)
                | Packet::Subscribe(_)
                | Packet::Unsubscribe(_)
                | Packet::Pingreq
                | Packet::Disconnect,
            ) => Err(Error::Protocol("a packet only clients send")),
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
            session_present: false,
            code,
        }))
    }

    /// A session with keepalive 10 s, connected at t = 0.
    fn connected() -> Session {
        let mut s = Session::new(10);
        s.start(t(0), &connect_packet("dev1", true)).unwrap();
        let n = s.pending_tx().len();
        s.consume_tx(t(0), n);
        let ack = connack(ConnectReturnCode::Accepted);
        assert_eq!(
            s.handle(t(5), &ack),
            Ok(Some(Event::Connected {
                session_present: false
            }))
        );
        s
    }

    #[test]
    fn start_queues_a_connect_with_the_client_id_and_keepalive() {
        let mut s = Session::new(60);
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
            let mut s = Session::new(60);
            s.start(t(0), &connect_packet("dev1", true)).unwrap();
            let err = s.handle(t(1), &connack(code)).unwrap_err();
            assert_eq!(err, Error::Refused(code));
            assert_eq!(err.is_auth_failure(), auth, "{code:?}");
        }
    }

    #[test]
    fn no_connack_within_the_timeout_fails_the_attempt() {
        let mut s = Session::new(60);
        s.start(t(0), &connect_packet("dev1", true)).unwrap();
        assert_eq!(s.poll(t(9_999)), Ok(()));
        assert_eq!(s.poll(t(10_000)), Err(Error::ConnackTimeout));
    }

    #[test]
    fn a_packet_before_connack_is_a_protocol_error() {
        let mut s = Session::new(60);
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
        let mut idle = Session::new(10);
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
}
