//! The router's side towards the broker: links coming up and going down,
//! the SUBSCRIBE and UNSUBSCRIBE packets each link owes (8 filters each, or
//! one with its Subscription Identifier under MQTT 5), and their answers.

use super::*;

impl Router {
    /// Link `link` completed CONNACK at `now`. Without a session every
    /// filter of it is subscribed again; with one, granted filters stay
    /// granted and UNSUBSCRIBEs owed from before are sent. Until the
    /// filters owed now are answered (or `RESTORE_HOLD` passes),
    /// `restoring` holds new publishes back [spool-9].
    pub fn link_up(&mut self, link: usize, session_present: bool, now: Instant) {
        if self.links.get(link).is_some_and(|l| l.up) {
            self.link_down(link);
        }
        let Some(l) = self.links.get_mut(link) else {
            return;
        };
        l.up = true;
        l.dirty = true;
        for i in 0..self.entries.len() {
            if let Some(e) = self.entries.get_mut(i).filter(|e| e.on(link)) {
                if !session_present {
                    e.broker = Broker::Absent;
                }
                self.refresh(i);
            }
        }
        let owed = self.owes_subscribe(link);
        if let Some(l) = self.links.get_mut(link) {
            l.restoring = owed.then_some(now + RESTORE_HOLD);
        }
    }

    /// Whether new publishes should wait [spool-9]: a link that came up is
    /// still subscribing again to its filters, so a message published
    /// while it was down, to a topic a local client subscribes to, would
    /// reach the broker before the subscription that brings it back.
    pub fn restoring(&self, now: Instant) -> bool {
        (0..self.links.len()).any(|link| {
            let l = &self.links[link];
            l.up && l.restoring.is_some_and(|until| now < until) && self.owes_subscribe(link)
        })
    }

    /// Whether some filter on `link` with broker users is not granted yet.
    pub(super) fn owes_subscribe(&self, link: usize) -> bool {
        self.entries
            .iter()
            .any(|e| e.on(link) && e.broker_users() > 0 && !matches!(e.broker, Broker::Granted(_)))
    }

    /// Link `link` was lost: outstanding requests are forgotten, and
    /// pending subscriptions waiting only on it are accepted (offline).
    ///
    /// Every filter whose SUBSCRIBE was in flight gets a strike; one at
    /// `QUARANTINE_STRIKES` is dropped, its subscriptions settled
    /// `Quarantined` [bus-iso-2].
    pub fn link_down(&mut self, link: usize) {
        let Some(l) = self.links.get_mut(link) else {
            return;
        };
        if !l.up {
            return;
        }
        l.up = false;
        l.probe = None;
        l.restoring = None;
        let mut poison: Vec<usize, MAX_FILTERS_PER_PACKET> = Vec::new();
        for i in 0..self.entries.len() {
            let Some(e) = self.entries.get_mut(i).filter(|e| e.on(link)) else {
                continue;
            };
            if matches!(e.broker, Broker::Subscribing { .. }) {
                e.strikes = e.strikes.saturating_add(1);
                if e.strikes == 1 {
                    if let Some(l) = self.links.get_mut(link) {
                        l.suspects += 1;
                    }
                }
                // Only a probe, alone in its packet, reaches the limit; a
                // second one in the same loss waits for the next.
                if e.strikes >= QUARANTINE_STRIKES && poison.push(i).is_ok() {
                    continue;
                }
            }
            if e.in_flight().is_some() {
                e.broker = Broker::Uncertain;
            }
            self.refresh(i);
        }
        for i in poison {
            self.quarantine(link, i);
        }
        self.check_pending();
    }

    /// Whether the loop should start no PUBLISH on `link` now: a probe
    /// SUBSCRIBE is out, or suspects wait for the link to be quiet while no
    /// publish is being probed (`publish_probing`) [bus-iso-2].
    pub fn holds_publishes(&self, link: usize, publish_probing: bool) -> bool {
        self.links
            .get(link)
            .is_some_and(|l| l.probe.is_some() || (l.suspects > 0 && !publish_probing))
    }

    /// The next SUBSCRIBE or UNSUBSCRIBE to send on `link` (UNSUBSCRIBEs
    /// first, to free broker capacity); the filters count as in flight from
    /// now on. `None` while the link is down or nothing is owed.
    ///
    /// Suspect filters go one per packet, each alone on the link, and only
    /// when `traffic` is `Quiet`; until then, and while a probe waits for
    /// its SUBACK, nothing else is sent. While the caller probes a publish
    /// only UNSUBSCRIBEs go [bus-iso-2].
    pub fn next_request(&mut self, link: usize, traffic: Traffic) -> Option<BrokerRequest<'_>> {
        let l = self.links.get(link)?;
        if !l.up || !l.dirty || l.probe.is_some() {
            return None;
        }
        let suspects = l.suspects > 0;
        let mut kind = RequestKind::Unsubscribe;
        let mut picked = self.pick(link, Entry::needs_unsubscribe);
        let mut probe = false;
        if picked.is_empty() && suspects {
            kind = RequestKind::Subscribe;
            picked = self.pick(link, |e| e.needs_subscribe() && e.strikes > 0);
            if !picked.is_empty() {
                let quiet = !self
                    .entries
                    .iter()
                    .any(|e| e.on(link) && e.in_flight().is_some());
                if !(traffic == Traffic::Quiet && quiet) {
                    return None; // still dirty: asked again on the next turn
                }
                picked.truncate(1);
                probe = true;
            }
        }
        if picked.is_empty() {
            if traffic == Traffic::Probing {
                return None; // still dirty: asked again on the next turn
            }
            kind = RequestKind::Subscribe;
            picked = self.pick(link, |e| e.needs_subscribe() && e.strikes == 0);
        }
        let mut subscription_id = Vec::new();
        if self.subscription_ids.get(link) == Some(&true) && kind == RequestKind::Subscribe {
            picked.truncate(1);
            if let Some(&i) = picked.first() {
                let id = u32::try_from(i + 1).unwrap_or(u32::MAX);
                // Cannot fail: an identifier and a varint of at most 4 bytes.
                let _ = subscription_id.push(crate::mqtt::props::id::SUBSCRIPTION_ID);
                let mut v = id;
                loop {
                    let [low, ..] = v.to_le_bytes();
                    v >>= 7;
                    let _ = subscription_id.push(if v == 0 { low & 0x7F } else { low | 0x80 });
                    if v == 0 {
                        break;
                    }
                }
            }
        }
        if picked.is_empty() {
            if let Some(l) = self.links.get_mut(link) {
                l.dirty = false;
            }
            return None;
        }
        let packet_id = self.alloc_packet_id(link)?;
        if probe {
            if let Some(l) = self.links.get_mut(link) {
                l.probe = Some(packet_id);
            }
        }
        for &i in &picked {
            if let Some(e) = self.entries.get_mut(i) {
                e.broker = match kind {
                    RequestKind::Subscribe => Broker::Subscribing {
                        id: packet_id,
                        qos: e.want(),
                    },
                    RequestKind::Unsubscribe => Broker::Unsubscribing { id: packet_id },
                };
            }
        }
        let mut filters = Vec::new();
        for &i in &picked {
            if let Some(e) = self.entries.get(i) {
                let qos = match e.broker {
                    Broker::Subscribing { qos, .. } => qos,
                    _ => QoS::AtMostOnce,
                };
                // Cannot fail: `pick` takes at most MAX_FILTERS_PER_PACKET.
                let _ = filters.push((e.text.as_str(), qos));
            }
        }
        Some(BrokerRequest {
            kind,
            packet_id,
            filters,
            subscription_id,
        })
    }

    /// The broker answered SUBSCRIBE `packet_id` on `link`; false if the id
    /// is unknown. A refused filter (or a missing code) fails every
    /// subscription using it; their other filters are released.
    pub fn on_suback(
        &mut self,
        link: usize,
        packet_id: u16,
        codes: impl IntoIterator<Item = SubackCode>,
    ) -> bool {
        if !self.links.get(link).is_some_and(|l| l.up) {
            return false;
        }
        // Entries in index order are the order of the SUBSCRIBE's filters.
        let mut batch: Vec<usize, MAX_FILTERS_PER_PACKET> = Vec::new();
        for (i, e) in self.entries.iter().enumerate() {
            if e.on(link) && matches!(e.broker, Broker::Subscribing { id, .. } if id == packet_id) {
                // Cannot fail: one request holds at most MAX_FILTERS_PER_PACKET.
                let _ = batch.push(i);
            }
        }
        if batch.is_empty() {
            return false;
        }
        if let Some(l) = self.links.get_mut(link) {
            if l.probe == Some(packet_id) {
                l.probe = None;
            }
        }
        let mut codes = codes.into_iter();
        let mut refused: Vec<usize, MAX_FILTERS_PER_PACKET> = Vec::new();
        for &i in &batch {
            // Answered, granted or not: the broker did not close on it.
            self.set_strikes(i, 0);
            let granted = matches!(
                codes.next(),
                Some(SubackCode::Granted(_) | SubackCode::GrantedExactlyOnce)
            );
            if let Some(e) = self.entries.get_mut(i) {
                if let Broker::Subscribing { qos, .. } = e.broker {
                    e.broker = if granted {
                        Broker::Granted(qos)
                    } else {
                        let _ = refused.push(i); // same bound as `batch`
                        Broker::Absent
                    };
                }
            }
        }
        for &i in &refused {
            self.fail_users(i, SubState::Failed);
        }
        for &i in &batch {
            self.refresh(i);
        }
        if !self.owes_subscribe(link) {
            if let Some(l) = self.links.get_mut(link) {
                l.restoring = None; // restored: a later subscribe holds nothing
            }
        }
        self.check_pending();
        true
    }

    /// How many filters SUBSCRIBE `packet_id` on `link` carried (what its
    /// SUBACK must answer, one code each); `None` if the id is unknown.
    pub fn subscribe_len(&self, link: usize, packet_id: u16) -> Option<usize> {
        let n = self
            .entries
            .iter()
            .filter(|e| {
                e.on(link) && matches!(e.broker, Broker::Subscribing { id, .. } if id == packet_id)
            })
            .count();
        (n > 0).then_some(n)
    }

    /// The broker answered UNSUBSCRIBE `packet_id` on `link`; false if the
    /// id is unknown.
    pub fn on_unsuback(&mut self, link: usize, packet_id: u16) -> bool {
        if !self.links.get(link).is_some_and(|l| l.up) {
            return false;
        }
        let mut known = false;
        for i in 0..self.entries.len() {
            if let Some(e) = self.entries.get_mut(i).filter(|e| e.on(link)) {
                if e.broker == (Broker::Unsubscribing { id: packet_id }) {
                    e.broker = Broker::Absent;
                    known = true;
                    self.refresh(i);
                }
            }
        }
        known
    }

    /// Up to one packet's worth of entries on `link` that satisfy `want`.
    pub(super) fn pick(
        &self,
        link: usize,
        want: fn(&Entry) -> bool,
    ) -> Vec<usize, MAX_FILTERS_PER_PACKET> {
        let mut picked = Vec::new();
        for (i, e) in self.entries.iter().enumerate() {
            if e.on(link) && want(e) && picked.push(i).is_err() {
                break;
            }
        }
        picked
    }

    /// A packet id of the router's half not outstanding on `link`.
    pub(super) fn alloc_packet_id(&mut self, link: usize) -> Option<u16> {
        let mut id = self.links.get(link)?.next_id;
        for _ in 0..IDS.size() {
            let candidate = id;
            id = IDS.after(candidate);
            let in_use = self
                .entries
                .iter()
                .any(|e| e.on(link) && e.in_flight() == Some(candidate));
            if !in_use {
                if let Some(l) = self.links.get_mut(link) {
                    l.next_id = id;
                }
                return Some(candidate);
            }
        }
        None
    }
}
