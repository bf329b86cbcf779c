//! How a link's attempt or connection ends: why (`Failure`), what it
//! means (an exit for an authentication failure, a bad client id or an
//! untrusted server; a reason logged and kept for `stats`; at least 30 s
//! for a quota or rate the broker says we exceed), and the next attempt.

use super::*;

/// Why a connection attempt or connection ended.
pub(super) enum Failure {
    Resolve(String),
    Connect(io::Error),
    Timeout(&'static str),
    Stream(StreamError),
    Closed,
    Session(session::Error),
    TooLarge(usize),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Resolve(e) => write!(f, "DNS lookup failed: {e}"),
            Failure::Connect(e) => write!(f, "TCP connect failed: {e}"),
            Failure::Timeout(what) => write!(f, "{what} timed out"),
            Failure::Stream(e) => write!(f, "{e}"),
            Failure::Closed => f.write_str("connection closed by the broker"),
            Failure::Session(e) => write!(f, "{e}"),
            Failure::TooLarge(n) => write!(
                f,
                "the broker sent a {n}-byte packet, over the {}-byte limit",
                consts::MQTT_MAX_PACKET
            ),
        }
    }
}

/// ": <the broker's Reason String>", or nothing without one.
pub(super) fn reason_text(text: &str) -> String {
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    }
}

/// The refusals (PUBACK failures) logged in the last minute, by topic and
/// reason [mqtt5-7]: a fixed table; the oldest entry makes room.
#[derive(Default)]
pub(super) struct RefusalLog {
    /// (hash of topic and reason, when logged)
    entries: [(u64, Option<Instant>); 16],
}

impl RefusalLog {
    /// Whether a refusal of `topic` with `reason` should be logged now,
    /// recording it if so.
    pub(super) fn due(&mut self, topic: &str, reason: u8, now: Instant) -> bool {
        const EVERY: Duration = Duration::from_secs(60);
        let key = crate::crc::crc32(topic.as_bytes()) as u64 | u64::from(reason) << 32;
        if let Some(e) = self
            .entries
            .iter_mut()
            .find(|e| e.0 == key && e.1.is_some())
        {
            if e.1.is_some_and(|at| now < at + EVERY) {
                return false;
            }
            e.1 = Some(now);
            return true;
        }
        // The free or the oldest entry.
        if let Some(e) = self
            .entries
            .iter_mut()
            .min_by_key(|e| e.1.map_or(0, |at| at.millis() + 1))
        {
            *e = (key, Some(now));
        }
        true
    }
}

/// A `fmt::Write` into a fixed string that keeps what fits (whole
/// characters) and drops the rest instead of failing.
pub(super) struct Truncating<'a, const N: usize> {
    pub(super) text: &'a mut heapless::String<N>,
    pub(super) full: bool,
}

impl<const N: usize> std::fmt::Write for Truncating<'_, N> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        for c in s.chars() {
            if self.full || self.text.push(c).is_err() {
                self.full = true;
                break;
            }
        }
        Ok(())
    }
}

impl EventLoop {
    /// Ends link `i`'s current attempt or connection: a fatal failure ends
    /// the daemon, anything else schedules the next attempt.
    pub(super) fn fail(&mut self, i: usize, now: Instant, failure: Failure) -> Result<(), Exit> {
        let was_up = self.links[i].is_connected();
        let awaiting_connack = matches!(
            self.links[i].session.state(),
            session::State::AwaitingConnack { .. }
        );
        // MQTT 5: a DISCONNECT says why we close on the broker's mistake
        // (best effort: the socket closes right after).
        let reason = match &failure {
            Failure::Session(e) => e.disconnect_reason(),
            Failure::TooLarge(_) => Some(0x95),
            _ => None,
        };
        // Never inside a packet: not while a PUBLISH or a control packet is
        // part-written (the broker would read the DISCONNECT as its rest).
        let mid_packet = (i == PUBLISHING
            && self.spool.next(consts::MAX_INFLIGHT, false).is_some())
            || !self.links[i].session.pending_tx().is_empty();
        let link = &mut self.links[i];
        if let (Some(reason), Version::V5, Phase::Mqtt { tls }, false) =
            (reason, link.session.version(), &mut link.phase, mid_packet)
        {
            let mut buf = [0u8; 4];
            let disconnect = Packet::Disconnect {
                reason,
                properties: Some(props::Props::EMPTY),
            };
            if let Ok(n) = disconnect.emit(&mut buf) {
                tls.send(&buf[..n]);
                let _ = tls.flush();
            }
        }
        self.drop_link(i);
        let link = &mut self.links[i];
        link.forget_connection();
        if was_up {
            link.note_disconnect(&failure);
            self.link_lost(i, now);
        }

        let link = &mut self.links[i];
        // Closed by the broker (an end of stream, not a reset) soon after
        // it accepted us: with MQTT 3.1.1 that is all a broker says when
        // another client takes our client id (mosquitto says no more with
        // MQTT 5; others say 0x8E, below).
        let lived = link
            .connected_at
            .take()
            .filter(|_| was_up)
            .map(|at| now.saturating_since(at));
        let early = lived.filter(|&d| d < EARLY_CLOSE && matches!(failure, Failure::Closed));
        match (lived, early) {
            (_, Some(_)) => link.early_closes += 1,
            (Some(_), None) => link.early_closes = 0,
            (None, _) => {}
        }
        if let (Some(d), true) = (early, link.early_closes >= EARLY_CLOSES_WARNED) {
            log::warn!(
                "connection {i} ({}): the broker closed the connection {}.{} s after accepting \
                 it, {} times in a row; another client may be using the client id {:?} (a \
                 broker closes the older of two connections with one id, so two clients \
                 sharing it throw each other off for ever), or the broker's policy refuses \
                 a topic this client subscribes or publishes to",
                link.client_id,
                // Not {:.1} of an f64: float formatting would cost the
                // binary 12 KiB for this one line.
                d.as_secs(),
                d.subsec_millis() / 100,
                link.early_closes,
                link.client_id
            );
        }
        let id = &link.client_id;
        match &failure {
            Failure::Stream(StreamError::Tls(e)) => match tls::classify(e) {
                TlsFailure::AuthRejected => {
                    log::error!(
                        "connection {i} ({id}): the broker rejected our certificate: {failure}"
                    );
                    return Err(Exit::AuthFailure(format!(
                        "the broker rejected the client certificate ({failure})"
                    )));
                }
                TlsFailure::ServerUntrusted => {
                    log::error!(
                        "connection {i} ({id}): the broker's certificate is not trusted: {e}"
                    );
                    return Err(Exit::ServerUntrusted(format!(
                        "the certificate of {} is not trusted: {e}",
                        self.config.endpoint
                    )));
                }
                TlsFailure::Transient => {}
            },
            Failure::Session(e) if e.is_auth_failure() => {
                let text = reason_text(link.session.reason_text());
                log::error!("connection {i} ({id}): {e}{text}");
                return Err(Exit::AuthFailure(format!("{e}{text}")));
            }
            Failure::Session(e) if e.is_bad_client_id() => {
                let msg = format!("the broker refused the client id {id:?}: {e}");
                log::error!("connection {i} ({id}): {msg}");
                return Err(Exit::Usage(msg));
            }
            Failure::Session(e @ session::Error::Disconnected(0x8E)) => {
                log::warn!(
                    "connection {i} ({id}): {e}: another client connected with our client id \
                     {id:?} (two devices sharing one client id throw each other off for ever)"
                );
            }
            Failure::Session(
                e @ (session::Error::Disconnected(_) | session::Error::Refused5(_)),
            ) => {
                let text = reason_text(link.session.reason_text());
                log::warn!("connection {i} ({id}): {e}{text}");
                if e.is_unsupported_version() {
                    log::warn!(
                        "connection {i} ({id}): the broker does not speak MQTT 5; \
                         run with --mqtt 3.1.1"
                    );
                }
            }
            Failure::Stream(StreamError::Io(_)) | Failure::Closed if awaiting_connack => {
                link.closes_without_connack += 1;
                if link.closes_without_connack == 2 && link.session.version() == Version::V5 {
                    log::warn!(
                        "connection {i} ({id}): closed before any CONNACK twice in a row; if the \
                         broker does not speak MQTT 5, run with --mqtt 3.1.1"
                    );
                }
                if link.closes_without_connack >= CLOSES_WITHOUT_CONNACK_LIMIT {
                    let msg = format!(
                        "the broker closed the connection after CONNECT {} times in a row \
                         without a CONNACK: the client id {id:?} is probably not authorized \
                         to connect (AWS IoT policy iot:Connect)",
                        link.closes_without_connack
                    );
                    log::error!("connection {i} ({id}): {msg}");
                    return Err(Exit::AuthFailure(msg));
                }
            }
            _ => {}
        }
        if self.stopping.is_some() {
            return Ok(());
        }
        if was_up {
            log::warn!("connection {i} ({id}): disconnected: {failure}");
            if i == PUBLISHING {
                self.notifier
                    .notify(&format!("STATUS=disconnected: {failure}; reconnecting"));
            }
        } else {
            log::warn!("connection {i} ({id}): connection attempt failed: {failure}");
        }
        if i != PUBLISHING && !self.router.link_wanted(i) {
            log::info!("connection {i} ({id}): no subscriptions left; not reconnecting");
            return Ok(());
        }
        let mut delay = link.backoff.next_delay(now);
        // A quota or a rate exceeded: at least 30 s [mqtt5-3] [mqtt5-9].
        if let Failure::Session(e) = &failure {
            if let Some(least) = e.min_backoff() {
                delay = delay.max(least);
            }
        }
        log::info!(
            "connection {i} ({id}): next attempt in {} ms",
            delay.as_millis()
        );
        link.set_phase(Phase::Waiting { until: now + delay });
        Ok(())
    }

    /// Link `i`, which was connected, is gone.
    pub(super) fn link_lost(&mut self, i: usize, now: Instant) {
        self.router.link_down(i);
        if i == PUBLISHING {
            if let Some(q) = self.spool.reset_inflight() {
                self.released(q.stored, now);
                self.clients.answer_waiting(
                    &mut self.router,
                    |m| m == Mode::AwaitAcked(q.ticket),
                    Some(ErrorCode::Remote),
                );
                log::warn!(
                    "connection {i}: lost {} times in a row while a {}-byte QoS 1 message \
                     on {:?} was the only one in flight: quarantined, it will not be sent again",
                    crate::spool::QUARANTINE_STRIKES,
                    q.len,
                    q.topic.as_str()
                );
            }
            self.notify_status(false);
        }
    }
}
