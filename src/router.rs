//! The subscription router, sans-I/O: the table of distinct broker filters
//! (checked and matched by `mqtt::topic`), the links (MQTT connections)
//! holding them, and the local subscriptions they serve [iotcored-4],
//! [iotcored-5], [iotcored-bus-subscribe-*].
//!
//! Invariants:
//! - Each distinct filter string has one entry. An entry is *placed* on one
//!   link while it has broker users or the broker may hold it (a request in
//!   flight, granted, or unknown after a lost link); a link never has more
//!   than `SUBSCRIPTIONS_PER_CONNECTION` placed entries, so AWS's
//!   per-connection limit holds even while UNSUBSCRIBEs are owed.
//! - An entry's user counts equal the number of live local subscriptions
//!   naming it; the first broker user causes a SUBSCRIBE, the last one
//!   leaving an UNSUBSCRIBE (or nothing, if the broker never had it).
//! - Virtual subscriptions (GGL's local-only matching) use entries for
//!   matching but never place them; the table has `MAX_SUBSCRIPTIONS` spare
//!   entries beyond the links' capacity for them.
//! - Packet ids come from `packet_id::SUBSCRIBE` (32768..=65535; the spool's
//!   publishes use the other half), unique among one link's outstanding
//!   SUBSCRIBE and UNSUBSCRIBE.
//! - Answers flow only through `take_settled`, in order; a subscription is
//!   routed to only after its `Accepted` was taken, so no message frame can
//!   overtake the `accepted` frame.
//!
//! Poison filters [bus-iso-2]: a filter whose SUBSCRIBE was in flight when
//! its link was lost gets a strike and becomes a *suspect*; suspects are
//! then subscribed one per SUBSCRIBE packet, alone on their link (the
//! *probe*: nothing else is requested while it waits for its SUBACK, and
//! it goes only when the caller says the link is otherwise quiet,
//! `Traffic::Quiet`; while the caller probes a publish, no SUBSCRIBE goes
//! at all). Any SUBACK clears a filter's strikes; at
//! `QUARANTINE_STRIKES` in a row the filter is dropped: its subscriptions
//! end with `Outcome::Quarantined`, nothing more is sent for it, and it is
//! counted (`quarantined`). While a link has suspects or a probe out,
//! `holds_publishes` asks the loop to start no PUBLISH on it, so a close
//! is never blamed on the wrong packet.
//!
//! After a reconnect [spool-9]: until the filters owed at `link_up` are
//! answered (at most `RESTORE_HOLD`), `restoring` asks the loop to start
//! no new PUBLISH, so a message queued while the link was down cannot
//! reach the broker before the subscription of a local client that wants
//! it back.
//!
//! Tables are allocated once in `new`; nothing allocates afterwards.

use core::fmt;
use core::str;

use heapless::{Deque, String, Vec};

use crate::bus::MAX_INTERFACE_NAME_LEN;
use crate::consts::{MAX_CONNECTIONS, MAX_SUBSCRIPTIONS, SUBSCRIPTIONS_PER_CONNECTION};
use crate::mqtt::packet::{Filters, Packet, QoS, SubackCode, Subscribe, Unsubscribe, Version};
use crate::mqtt::packet_id::SUBSCRIBE as IDS;
use crate::mqtt::props::Props;

mod broker;
use crate::mqtt::topic::{matches, validate_filter, TopicError, MAX_TOPIC_LEN};
use crate::spool::QUARANTINE_STRIKES;
use crate::time::Instant;

/// Most filters in one SUBSCRIBE or UNSUBSCRIBE packet (AWS, hard).
pub const MAX_FILTERS_PER_PACKET: usize = 8;
/// Most distinct filters in one local subscribe request.
pub const MAX_FILTERS_PER_REQUEST: usize = 16;
/// How long a response endpoint may stay unreachable (deliveries and
/// probes failing) before its subscription is removed [bus-iso-4].
pub const ENDPOINT_TIMEOUT: core::time::Duration = core::time::Duration::from_secs(60);
/// Distinct filters the links can hold at the broker.
pub const BROKER_FILTERS: usize = MAX_CONNECTIONS * SUBSCRIPTIONS_PER_CONNECTION;

/// Entries: the links' capacity plus room for virtual-only filters.
const FILTER_SLOTS: usize = BROKER_FILTERS + MAX_SUBSCRIPTIONS;
/// Words of the per-topic match bitset over the entries.
const MATCH_WORDS: usize = FILTER_SLOTS.div_ceil(64);

// Entry and slot indices are stored as u32 (slots are fewer than entries).
const _: () = assert!(FILTER_SLOTS <= u32::MAX as usize);

// ---- public types -----------------------------------------------------------

/// Where a local subscription's messages go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dest {
    /// The subscribe stream of a bus client connection (GGL style).
    Stream { client: u16, generation: u32 },
    /// `iotcored_response` notifies to this bus interface.
    Endpoint(String<MAX_INTERFACE_NAME_LEN>),
}

impl Dest {
    /// An endpoint destination; `None` if the name is too long.
    pub fn endpoint(name: &str) -> Option<Dest> {
        String::try_from(name).ok().map(Dest::Endpoint)
    }
}

/// A local subscription; stale once it is removed (slots are reused).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SubId {
    slot: u32,
    generation: u32,
}

/// Where a local subscription is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubState {
    /// Waiting for SUBACKs.
    Pending,
    /// Granted (or accepted while its links were down).
    Active,
    /// Refused by the broker; reported by `take_settled`, then freed.
    Failed,
    /// A filter of it was dropped as poison [bus-iso-2]; reported by
    /// `take_settled`, then freed.
    Quarantined,
}

/// What to tell a subscriber.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Answer `accepted` (or the call's null result); messages may follow.
    Accepted,
    /// The broker refused a filter before the client was answered: answer
    /// REMOTE. The subscription is gone.
    Refused,
    /// The broker refused a filter of a subscription already answered
    /// `Accepted` (made offline, or re-made after a reconnect): close the
    /// stream or drop the endpoint subscription. The subscription is gone.
    Dropped,
    /// A filter was dropped as poison [bus-iso-2], answered or not: REMOTE
    /// (a stream gets the error frame, then closes). The subscription is
    /// gone.
    Quarantined,
}

/// One answer owed to a subscriber.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settled {
    pub id: SubId,
    pub dest: Dest,
    pub outcome: Outcome,
}

/// Why a subscribe request is refused; nothing changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubscribeError {
    /// A filter failed `validate_filter`.
    Filter(TopicError),
    /// No filters at all.
    NoFilters,
    /// More than `MAX_FILTERS_PER_REQUEST` distinct filters.
    TooManyFilters,
    /// Every local subscription slot is taken.
    TableFull,
    /// The process holds half of the local subscriptions, or would hold
    /// more than half of the distinct broker filters [bus-iso-4].
    ProcessQuota,
    /// The new distinct filters do not fit on the links.
    NoRoom,
}

impl fmt::Display for SubscribeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubscribeError::Filter(e) => e.fmt(f),
            SubscribeError::NoFilters => f.write_str("no topic filters"),
            SubscribeError::TooManyFilters => write!(
                f,
                "more than {MAX_FILTERS_PER_REQUEST} topic filters in one request"
            ),
            SubscribeError::TableFull => f.write_str("local subscription table is full"),
            SubscribeError::ProcessQuota => f.write_str(
                "this process holds half of the subscription table or of the broker filters, the most one process may",
            ),
            SubscribeError::NoRoom => f.write_str("every connection's subscription table is full"),
        }
    }
}

impl std::error::Error for SubscribeError {}

/// What the caller has in flight on a link besides broker requests (the
/// publishes of link 0), for `next_request` [bus-iso-2].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Traffic {
    /// Nothing: a suspect filter may be probed.
    Quiet,
    /// Publishes in flight: SUBSCRIBEs may go, probes wait.
    Busy,
    /// A publish is being probed: no SUBSCRIBE goes until it is answered.
    Probing,
}

/// The kind of a broker request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    Subscribe,
    Unsubscribe,
}

/// A SUBSCRIBE or UNSUBSCRIBE the loop must send on a link now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerRequest<'a> {
    pub kind: RequestKind,
    pub packet_id: u16,
    /// Filters with their QoS (QoS 0, ignored, for UNSUBSCRIBE).
    pub filters: Vec<(&'a str, QoS), MAX_FILTERS_PER_PACKET>,
    /// The MQTT 5 Subscription Identifier of a one-filter SUBSCRIBE (see
    /// `Router::use_subscription_ids`), encoded as its property.
    subscription_id: Vec<u8, 5>,
}

impl BrokerRequest<'_> {
    /// The packet to emit in protocol `version` (MQTT 5: the Subscription
    /// Identifier, if any, as its one property).
    pub fn packet(&self, version: Version) -> Packet<'_> {
        let packet_id = self.packet_id;
        let filters = Filters::List(&self.filters);
        let properties = (version == Version::V5).then(|| Props::trusted(&self.subscription_id));
        match self.kind {
            RequestKind::Subscribe => Packet::Subscribe(Subscribe {
                packet_id,
                filters,
                properties,
            }),
            RequestKind::Unsubscribe => Packet::Unsubscribe(Unsubscribe {
                packet_id,
                filters,
                properties,
            }),
        }
    }
}

/// One link as `stats` and the logs see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkStats {
    /// Broker filters placed on it (including UNSUBSCRIBEs still owed).
    pub filters: usize,
    /// Whether the loop should keep it connected (link 0 always).
    pub wanted: bool,
    /// Whether `link_up` was called last.
    pub up: bool,
}

// ---- internal state ---------------------------------------------------------

/// What the broker session holds of an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Broker {
    /// Known not to hold it.
    Absent,
    /// SUBSCRIBE at this QoS in flight.
    Subscribing { id: u16, qos: QoS },
    /// Granted for a SUBSCRIBE at this QoS.
    Granted(QoS),
    /// UNSUBSCRIBE in flight.
    Unsubscribing { id: u16 },
    /// A request was in flight when the link went down: may hold it or not.
    Uncertain,
}

/// One distinct filter.
#[derive(Debug)]
struct Entry {
    live: bool,
    text: String<MAX_TOPIC_LEN>,
    /// Broker users by requested QoS (index 0 and 1).
    users: [u32; 2],
    virtual_users: u32,
    /// Counted on `link`.
    placed: bool,
    link: usize,
    broker: Broker,
    /// Links lost in a row while its SUBSCRIBE was in flight; a suspect
    /// while non-zero (counted in its link's `suspects`).
    strikes: u8,
}

impl Entry {
    const FREE: Entry = Entry {
        live: false,
        text: String::new(),
        users: [0; 2],
        virtual_users: 0,
        placed: false,
        link: 0,
        broker: Broker::Absent,
        strikes: 0,
    };

    fn broker_users(&self) -> u32 {
        self.users[0].saturating_add(self.users[1])
    }

    fn users_mut(&mut self, qos: QoS) -> &mut u32 {
        match qos {
            QoS::AtMostOnce => &mut self.users[0],
            QoS::AtLeastOnce => &mut self.users[1],
        }
    }

    /// The QoS to hold it at: the highest its users asked for.
    fn want(&self) -> QoS {
        if self.users[1] > 0 {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        }
    }

    fn on(&self, link: usize) -> bool {
        self.live && self.placed && self.link == link
    }

    fn in_flight(&self) -> Option<u16> {
        match self.broker {
            Broker::Subscribing { id, .. } | Broker::Unsubscribing { id } => Some(id),
            _ => None,
        }
    }

    fn needs_unsubscribe(&self) -> bool {
        self.broker_users() == 0 && matches!(self.broker, Broker::Granted(_) | Broker::Uncertain)
    }

    fn needs_subscribe(&self) -> bool {
        self.broker_users() > 0
            && match self.broker {
                Broker::Absent | Broker::Uncertain => true,
                Broker::Granted(q) => (q as u8) < (self.want() as u8),
                Broker::Subscribing { .. } | Broker::Unsubscribing { .. } => false,
            }
    }
}

/// One local subscription slot.
#[derive(Debug)]
struct Sub {
    generation: u32,
    /// `None`: free.
    state: Option<SubState>,
    dest: Dest,
    filters: Vec<u32, MAX_FILTERS_PER_REQUEST>,
    qos: QoS,
    is_virtual: bool,
    /// `Accepted` was handed out by `take_settled`.
    answered: bool,
    /// In the settled queue (kept across reuse of the slot).
    queued: bool,
    /// Since when its response endpoint has been unreachable.
    unreachable_since: Option<Instant>,
    /// The pid of the process that made it (0: unknown).
    owner: u32,
    /// Its messages carry their MQTT 5 properties (subscribe `properties`).
    properties: bool,
}

impl Sub {
    const FREE: Sub = Sub {
        generation: 0,
        state: None,
        dest: Dest::Stream {
            client: 0,
            generation: 0,
        },
        filters: Vec::new(),
        qos: QoS::AtMostOnce,
        is_virtual: false,
        answered: false,
        queued: false,
        unreachable_since: None,
        owner: 0,
        properties: false,
    };

    fn is_live(&self) -> bool {
        matches!(self.state, Some(SubState::Pending | SubState::Active))
    }
}

#[derive(Clone, Copy, Debug)]
struct Link {
    up: bool,
    /// Placed entries.
    filters: usize,
    next_id: u16,
    /// Something may be owed to the broker; cleared by a `next_request`
    /// that found nothing.
    dirty: bool,
    /// Entries on it with strikes.
    suspects: usize,
    /// The packet id of the probe SUBSCRIBE in flight.
    probe: Option<u16>,
    /// Until when the filters owed at the last `link_up` hold new
    /// publishes back, if some still are [spool-9].
    restoring: Option<Instant>,
}

impl Link {
    const DOWN: Link = Link {
        up: false,
        filters: 0,
        next_id: IDS.first,
        dirty: false,
        suspects: 0,
        probe: None,
        restoring: None,
    };
}

/// How long a link's restored subscriptions may hold new publishes back:
/// a broker that never answers a SUBSCRIBE must not stop them for ever.
pub const RESTORE_HOLD: core::time::Duration = core::time::Duration::from_secs(10);

/// The router: broker filters, links and local subscriptions.
#[derive(Debug)]
pub struct Router {
    entries: Box<[Entry]>,
    subs: Box<[Sub]>,
    links: [Link; MAX_CONNECTIONS],
    /// Broker filters per link: `SUBSCRIPTIONS_PER_CONNECTION` (tests vary it).
    link_capacity: usize,
    settled: Deque<u32, MAX_SUBSCRIPTIONS>,
    /// Filters dropped as poison [bus-iso-2].
    quarantined: u64,
    /// Grows whenever a subscription for a response endpoint starts or
    /// ends: the disk spool keeps them [spool-7].
    endpoint_changes: u64,
    /// MQTT 5, per link: one filter per SUBSCRIBE, each with the
    /// Subscription Identifier of its entry (`route_copy`).
    subscription_ids: [bool; MAX_CONNECTIONS],
}

impl Default for Router {
    fn default() -> Self {
        Self::new()
    }
}

impl Router {
    /// Empty tables, every link down. The only allocation the router makes.
    pub fn new() -> Self {
        Self {
            entries: (0..FILTER_SLOTS).map(|_| Entry::FREE).collect(),
            subs: (0..MAX_SUBSCRIPTIONS).map(|_| Sub::FREE).collect(),
            links: [Link::DOWN; MAX_CONNECTIONS],
            link_capacity: SUBSCRIPTIONS_PER_CONNECTION,
            settled: Deque::new(),
            quarantined: 0,
            endpoint_changes: 0,
            subscription_ids: [false; MAX_CONNECTIONS],
        }
    }

    /// From now on, SUBSCRIBEs carry one filter each and the Subscription
    /// Identifier of its entry (index + 1), so that `route_copy` can tell
    /// which filters an incoming copy is for. An MQTT 5 broker may send
    /// one copy of a message per matching subscription [MQTT5-3.3.4]
    /// (mosquitto does); without the identifiers, overlapping filters
    /// would deliver a message several times to one subscriber.
    /// Set for link `link` before its `link_up`, from its CONNACK: MQTT 5
    /// and the broker takes them (AWS IoT Core does not: its SUBSCRIBEs
    /// then carry up to 8 filters and no identifier, as with 3.1.1).
    pub fn use_subscription_ids(&mut self, link: usize, yes: bool) {
        if let Some(flag) = self.subscription_ids.get_mut(link) {
            *flag = yes;
        }
    }

    /// A router whose links hold `n` filters each, within the table's size.
    #[cfg(test)]
    fn with_link_capacity(n: usize) -> Self {
        Self {
            link_capacity: n.min(BROKER_FILTERS),
            ..Self::new()
        }
    }

    // ---- local subscriptions ------------------------------------------------

    /// Adds a local subscription to `filters` (duplicates count once). It is
    /// `Pending` until the broker granted every filter, or at once `Active`
    /// when they are granted already, their links are down (made at the
    /// next connect) or it is virtual; either way `take_settled` reports it.
    /// On error nothing changed. Made for no process in particular: no
    /// per-process quota applies (see `subscribe_for`).
    pub fn subscribe(
        &mut self,
        dest: Dest,
        filters: &[&str],
        qos: QoS,
        is_virtual: bool,
    ) -> Result<SubId, SubscribeError> {
        self.subscribe_for(0, dest, filters, qos, is_virtual)
    }

    /// `subscribe` on behalf of process `owner` (its pid; 0: unknown, no
    /// quota), which may hold at most half of the local subscriptions and
    /// half of the distinct filters the links can hold [bus-iso-4]: one
    /// process's subscriptions never leave none for the others.
    pub fn subscribe_for(
        &mut self,
        owner: u32,
        dest: Dest,
        filters: &[&str],
        qos: QoS,
        is_virtual: bool,
    ) -> Result<SubId, SubscribeError> {
        let mut distinct: Vec<&str, MAX_FILTERS_PER_REQUEST> = Vec::new();
        for &f in filters {
            validate_filter(f.as_bytes()).map_err(SubscribeError::Filter)?;
            if !distinct.contains(&f) {
                distinct
                    .push(f)
                    .map_err(|_| SubscribeError::TooManyFilters)?;
            }
        }
        if distinct.is_empty() {
            return Err(SubscribeError::NoFilters);
        }
        if owner != 0 {
            self.check_quota(owner, &distinct, is_virtual)?;
        }
        let slot = self
            .subs
            .iter()
            .position(|s| s.state.is_none())
            .ok_or(SubscribeError::TableFull)?;

        // Plan everything before changing anything.
        let mut found: Vec<Option<usize>, MAX_FILTERS_PER_REQUEST> = Vec::new();
        let (mut new_entries, mut to_place) = (0, 0);
        for f in &distinct {
            let idx = self.find_entry(f);
            new_entries += usize::from(idx.is_none());
            let placed = idx
                .and_then(|i| self.entries.get(i))
                .is_some_and(|e| e.placed);
            to_place += usize::from(!is_virtual && !placed);
            // Cannot fail: as many as `distinct`.
            let _ = found.push(idx);
        }
        let mut free: Vec<usize, MAX_FILTERS_PER_REQUEST> = Vec::new();
        for (i, _) in self.entries.iter().enumerate().filter(|(_, e)| !e.live) {
            if free.len() == new_entries {
                break;
            }
            // Cannot fail: stops at `new_entries` <= the capacity.
            let _ = free.push(i);
        }
        if free.len() < new_entries {
            return Err(SubscribeError::NoRoom);
        }
        let plan = self.place(to_place).ok_or(SubscribeError::NoRoom)?;

        // Commit; nothing below can fail.
        let (mut free, mut plan) = (free.into_iter(), plan.into_iter());
        let mut indices: Vec<u32, MAX_FILTERS_PER_REQUEST> = Vec::new();
        for (f, idx) in distinct.iter().zip(found) {
            let Some(idx) = idx.or_else(|| free.next()) else {
                continue;
            };
            let Some(e) = self.entries.get_mut(idx) else {
                continue;
            };
            if !e.live {
                *e = Entry::FREE;
                e.live = true;
                // Fits: validate_filter allowed at most MAX_TOPIC_LEN bytes.
                let _ = e.text.push_str(f);
            }
            if is_virtual {
                e.virtual_users = e.virtual_users.saturating_add(1);
            } else {
                if !e.placed {
                    e.link = plan.next().unwrap_or(0);
                }
                let n = e.users_mut(qos);
                *n = n.saturating_add(1);
            }
            self.refresh(idx);
            // Both cannot fail: FILTER_SLOTS fits u32; one per distinct filter.
            let _ = indices.push(u32::try_from(idx).unwrap_or(u32::MAX));
        }
        let Some(sub) = self.subs.get_mut(slot) else {
            return Err(SubscribeError::TableFull); // `position` found it
        };
        sub.generation = sub.generation.wrapping_add(1);
        sub.state = Some(SubState::Pending);
        sub.dest = dest;
        sub.filters = indices;
        sub.qos = qos;
        sub.is_virtual = is_virtual;
        sub.answered = false;
        sub.unreachable_since = None;
        sub.owner = owner;
        sub.properties = false;
        let id = SubId {
            slot: u32::try_from(slot).unwrap_or(u32::MAX),
            generation: sub.generation,
        };
        self.activate_if_ready(slot);
        if matches!(self.subs[slot].dest, Dest::Endpoint(_)) {
            self.endpoint_changes += 1;
        }
        Ok(id)
    }

    /// A number that changes whenever a response-endpoint subscription
    /// starts or ends [spool-7].
    pub fn endpoint_changes(&self) -> u64 {
        self.endpoint_changes
    }

    /// Every live response-endpoint subscription: (endpoint, filters, QoS,
    /// virtual), for the disk spool to keep [spool-7].
    pub fn endpoint_subscriptions(
        &self,
    ) -> impl Iterator<Item = (&str, Vec<&str, MAX_FILTERS_PER_REQUEST>, QoS, bool, bool)> {
        self.subs.iter().filter_map(|sub| {
            let Dest::Endpoint(name) = &sub.dest else {
                return None;
            };
            if !matches!(sub.state, Some(SubState::Pending | SubState::Active)) {
                return None;
            }
            let mut filters = Vec::new();
            for &i in &sub.filters {
                if let Some(e) = self.entries.get(i as usize) {
                    // Cannot fail: as many as the subscription has.
                    let _ = filters.push(e.text.as_str());
                }
            }
            Some((
                name.as_str(),
                filters,
                sub.qos,
                sub.is_virtual,
                sub.properties,
            ))
        })
    }

    /// Ends a local subscription; false if `id` is stale.
    pub fn unsubscribe(&mut self, id: SubId) -> bool {
        let Some(slot) = self.slot_of(id) else {
            return false;
        };
        self.release(slot);
        if let Some(sub) = self.subs.get_mut(slot) {
            sub.state = None;
            sub.answered = false;
            if matches!(sub.dest, Dest::Endpoint(_)) {
                self.endpoint_changes += 1;
            }
        }
        true
    }

    /// Records whether subscription `id`'s response endpoint could be
    /// reached at `now` (a delivery or a probe): reached clears it, and
    /// one unreachable for `ENDPOINT_TIMEOUT` is removed [bus-iso-4].
    /// Returns whether it was removed (false too for a stale `id`).
    pub fn endpoint_reached(&mut self, id: SubId, reached: bool, now: Instant) -> bool {
        let Some(sub) = self.slot_of(id).and_then(|i| self.subs.get_mut(i)) else {
            return false;
        };
        if reached {
            sub.unreachable_since = None;
            return false;
        }
        let since = *sub.unreachable_since.get_or_insert(now);
        if now < since + ENDPOINT_TIMEOUT {
            return false;
        }
        self.unsubscribe(id)
    }

    /// The response-endpoint subscription in subscription slot `slot`, if
    /// there is one (for probing each in turn).
    pub fn endpoint_at(&self, slot: usize) -> Option<(SubId, &str)> {
        let sub = self.subs.get(slot).filter(|s| s.is_live())?;
        match &sub.dest {
            Dest::Endpoint(name) => Some((self.id_of(slot), name.as_str())),
            Dest::Stream { .. } => None,
        }
    }

    /// Ends every local subscription whose destination satisfies `pred`;
    /// returns how many.
    pub fn remove_dest(&mut self, mut pred: impl FnMut(&Dest) -> bool) -> usize {
        let mut removed = 0;
        for slot in 0..self.subs.len() {
            let id = match self.subs.get(slot) {
                Some(s) if s.state.is_some() && pred(&s.dest) => self.id_of(slot),
                _ => continue,
            };
            removed += usize::from(self.unsubscribe(id));
        }
        removed
    }

    /// Ends the subscriptions of a closed bus stream.
    pub fn remove_stream(&mut self, client: u16, generation: u32) -> usize {
        let target = Dest::Stream { client, generation };
        self.remove_dest(|d| *d == target)
    }

    /// The live endpoint subscription with exactly this filter list (order
    /// and duplicates aside) and endpoint, for the `unsubscribe` method.
    pub fn find_endpoint(&self, endpoint: &str, filters: &[&str]) -> Option<SubId> {
        let mut distinct: Vec<&str, MAX_FILTERS_PER_REQUEST> = Vec::new();
        for &f in filters {
            if !distinct.contains(&f) {
                distinct.push(f).ok()?;
            }
        }
        let slot = self.subs.iter().position(|s| {
            s.is_live()
                && matches!(&s.dest, Dest::Endpoint(e) if e.as_str() == endpoint)
                && s.filters.len() == distinct.len()
                && distinct.iter().all(|f| {
                    s.filters
                        .iter()
                        .any(|&i| self.entry(i).is_some_and(|e| e.text.as_str() == *f))
                })
        })?;
        Some(self.id_of(slot))
    }

    /// The next answer owed to a subscriber, oldest first. Call until `None`
    /// after every call that may settle subscriptions (`subscribe`,
    /// `on_suback`, `link_down`).
    pub fn take_settled(&mut self) -> Option<Settled> {
        while let Some(slot) = self.settled.pop_front() {
            let slot = usize::try_from(slot).unwrap_or(usize::MAX);
            let id = self.id_of(slot);
            let Some(sub) = self.subs.get_mut(slot) else {
                continue;
            };
            sub.queued = false;
            match sub.state {
                Some(SubState::Active) if !sub.answered => {
                    sub.answered = true;
                    let dest = sub.dest.clone();
                    return Some(Settled {
                        id,
                        dest,
                        outcome: Outcome::Accepted,
                    });
                }
                Some(state @ (SubState::Failed | SubState::Quarantined)) => {
                    let outcome = if state == SubState::Quarantined {
                        Outcome::Quarantined
                    } else if sub.answered {
                        Outcome::Dropped
                    } else {
                        Outcome::Refused
                    };
                    sub.state = None;
                    sub.answered = false;
                    if matches!(sub.dest, Dest::Endpoint(_)) {
                        self.endpoint_changes += 1;
                    }
                    return Some(Settled {
                        id,
                        dest: sub.dest.clone(),
                        outcome,
                    });
                }
                _ => {}
            }
        }
        None
    }

    /// Calls `deliver` once per answered active subscription with a filter
    /// matching `topic`; returns how many.
    pub fn route(&self, topic: &str, mut deliver: impl FnMut(SubId, &Dest)) -> usize {
        self.route_copy(topic, &[], |id, dest, _| deliver(id, dest))
    }

    /// Whether subscription `id`'s messages carry their MQTT 5 properties
    /// (core-bus.md section 6, subscribe `properties`): set once, after it
    /// is made.
    pub fn set_properties(&mut self, id: SubId, yes: bool) {
        if let Some(slot) = self.slot_of(id) {
            if let Some(sub) = self.subs.get_mut(slot) {
                sub.properties = yes;
            }
        }
    }

    /// `route` for one copy of a message that carried these Subscription
    /// Identifiers (none: every subscription it matches). With them, a
    /// subscription gets the copy only if the first of its filters that
    /// matches is one the copy names: whether the broker sends one copy
    /// naming every matching filter or one copy per filter, each
    /// subscription gets the message once.
    pub fn route_copy(
        &self,
        topic: &str,
        ids: &[u32],
        mut deliver: impl FnMut(SubId, &Dest, bool),
    ) -> usize {
        let mut bits = [0u64; MATCH_WORDS];
        let mut any = false;
        for (i, e) in self.entries.iter().enumerate() {
            if e.live && matches(&e.text, topic) {
                if let Some(w) = bits.get_mut(i / 64) {
                    *w |= 1 << (i % 64);
                    any = true;
                }
            }
        }
        if !any {
            return 0;
        }
        let hit = |i: u32| {
            let i = usize::try_from(i).unwrap_or(usize::MAX);
            bits.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
        };
        // The matching filters held at the broker: the copies of the message
        // share them out. A subscription's copy is the one naming the first
        // of its own among them, or, for one matching through virtual
        // filters only, the first of them all.
        // (Granted, on a link that is up: what can have brought a copy.)
        let at_broker = |i: u32| {
            usize::try_from(i)
                .ok()
                .and_then(|i| self.entries.get(i))
                .is_some_and(|e| {
                    e.placed
                        && matches!(e.broker, Broker::Granted(_))
                        && self.links.get(e.link).is_some_and(|l| l.up)
                })
        };
        let index = |i: usize| u32::try_from(i).unwrap_or(u32::MAX);
        let first_at_broker = (0..self.entries.len())
            .map(index)
            .find(|&i| hit(i) && at_broker(i));
        let ids = if first_at_broker.is_some() { ids } else { &[] };
        let named = |i: u32| ids.is_empty() || ids.contains(&i.saturating_add(1));
        let mut delivered = 0;
        for (slot, sub) in self.subs.iter().enumerate() {
            let mut matched = sub.filters.iter().copied().filter(|&i| hit(i)).peekable();
            let designated = match matched.peek() {
                None => None,
                Some(&first) => matched
                    .filter(|&i| at_broker(i))
                    .min()
                    .or(first_at_broker)
                    .or(Some(first)),
            };
            if sub.state == Some(SubState::Active) && sub.answered && designated.is_some_and(named)
            {
                deliver(self.id_of(slot), &sub.dest, sub.properties);
                delivered += 1;
            }
        }
        delivered
    }

    // ---- inspection -----------------------------------------------------------

    /// Counters of one link (`None` past `MAX_CONNECTIONS`).
    pub fn link_stats(&self, link: usize) -> Option<LinkStats> {
        let l = self.links.get(link)?;
        Some(LinkStats {
            filters: l.filters,
            wanted: link == 0 || l.filters > 0,
            up: l.up,
        })
    }

    /// Whether the loop should keep link `link` connected: link 0 always,
    /// another while it holds a broker filter.
    pub fn link_wanted(&self, link: usize) -> bool {
        self.link_stats(link).is_some_and(|s| s.wanted)
    }

    /// Local subscriptions held (failed ones until reported).
    pub fn subscriptions(&self) -> usize {
        self.subs.iter().filter(|s| s.state.is_some()).count()
    }

    /// Filters dropped as poison since start [bus-iso-2].
    pub fn quarantined(&self) -> u64 {
        self.quarantined
    }

    /// Distinct filters held, virtual-only ones included.
    pub fn filters(&self) -> usize {
        self.entries.iter().filter(|e| e.live).count()
    }

    /// The state of a subscription; `None` if `id` is stale.
    pub fn state(&self, id: SubId) -> Option<SubState> {
        self.subs.get(self.slot_of(id)?)?.state
    }

    /// The destination of a subscription; `None` if `id` is stale.
    pub fn dest(&self, id: SubId) -> Option<&Dest> {
        Some(&self.subs.get(self.slot_of(id)?)?.dest)
    }

    // ---- internals ------------------------------------------------------------

    fn entry(&self, i: u32) -> Option<&Entry> {
        self.entries.get(usize::try_from(i).ok()?)
    }

    fn find_entry(&self, text: &str) -> Option<usize> {
        self.entries
            .iter()
            .position(|e| e.live && e.text.as_str() == text)
    }

    fn id_of(&self, slot: usize) -> SubId {
        SubId {
            slot: u32::try_from(slot).unwrap_or(u32::MAX),
            generation: self.subs.get(slot).map_or(0, |s| s.generation),
        }
    }

    fn slot_of(&self, id: SubId) -> Option<usize> {
        let slot = usize::try_from(id.slot).ok()?;
        let sub = self.subs.get(slot)?;
        (sub.state.is_some() && sub.generation == id.generation).then_some(slot)
    }

    /// Links for `n` new broker filters: all on the lowest link with room
    /// for all, else spread over the links in order.
    /// [bus-iso-4] Whether `owner` may make one more subscription to
    /// `filters`: it holds fewer than half of the subscription slots, and
    /// the distinct broker filters its subscriptions use, the new ones
    /// counted, stay within half of what the links can hold.
    fn check_quota(
        &self,
        owner: u32,
        filters: &[&str],
        is_virtual: bool,
    ) -> Result<(), SubscribeError> {
        let mine = || self.subs.iter().filter(|s| s.owner == owner && s.is_live());
        if mine().count() >= (MAX_SUBSCRIPTIONS / 2).max(1) {
            return Err(SubscribeError::ProcessQuota);
        }
        if is_virtual {
            return Ok(());
        }
        let mut used = [0u64; MATCH_WORDS];
        let mut set = |i: usize| {
            if let Some(w) = used.get_mut(i / 64) {
                *w |= 1 << (i % 64);
            }
        };
        for s in mine().filter(|s| !s.is_virtual) {
            for &i in &s.filters {
                set(usize::try_from(i).unwrap_or(usize::MAX));
            }
        }
        let held = |used: &[u64; MATCH_WORDS], i: usize| {
            used.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
        };
        let old: usize = used.iter().map(|w| w.count_ones() as usize).sum();
        let new = filters
            .iter()
            .filter(|f| self.find_entry(f).map_or(true, |i| !held(&used, i)))
            .count();
        if old + new > (BROKER_FILTERS / 2).max(1) {
            return Err(SubscribeError::ProcessQuota);
        }
        Ok(())
    }

    fn place(&self, n: usize) -> Option<Vec<usize, MAX_FILTERS_PER_REQUEST>> {
        let room = |l: &Link| self.link_capacity.saturating_sub(l.filters);
        let mut plan = Vec::new();
        if n == 0 {
            return Some(plan);
        }
        if let Some(link) = self.links.iter().position(|l| room(l) >= n) {
            for _ in 0..n {
                plan.push(link).ok()?;
            }
            return Some(plan);
        }
        for (link, l) in self.links.iter().enumerate() {
            for _ in 0..room(l).min(n - plan.len()) {
                plan.push(link).ok()?;
            }
        }
        (plan.len() == n).then_some(plan)
    }

    /// Recomputes entry `i`'s placement and link count after any change to
    /// it, frees it when nothing uses it, and marks its link for
    /// `next_request`.
    fn refresh(&mut self, i: usize) {
        let Some(e) = self.entries.get_mut(i).filter(|e| e.live) else {
            return;
        };
        let place = e.broker_users() > 0 || e.broker != Broker::Absent;
        if let Some(l) = self.links.get_mut(e.link) {
            if place && !e.placed {
                l.filters = l.filters.saturating_add(1);
            } else if !place && e.placed {
                l.filters = l.filters.saturating_sub(1);
            }
            if !place && e.strikes > 0 {
                // Nobody wants it at the broker now: a later user starts
                // with a clean slate, possibly on another link.
                e.strikes = 0;
                l.suspects = l.suspects.saturating_sub(1);
            }
            l.dirty = true;
        }
        e.placed = place;
        if !place && e.virtual_users == 0 {
            *e = Entry::FREE;
        }
    }

    /// Drops subscription `slot`'s uses of its entries.
    fn release(&mut self, slot: usize) {
        let Some(sub) = self.subs.get_mut(slot) else {
            return;
        };
        let filters = core::mem::take(&mut sub.filters);
        let (qos, is_virtual) = (sub.qos, sub.is_virtual);
        for i in filters {
            let i = usize::try_from(i).unwrap_or(usize::MAX);
            if let Some(e) = self.entries.get_mut(i) {
                let n = if is_virtual {
                    &mut e.virtual_users
                } else {
                    e.users_mut(qos)
                };
                *n = n.saturating_sub(1);
                self.refresh(i);
            }
        }
    }

    /// Ends every live broker subscription using entry `i` in `state`
    /// (`Failed` or `Quarantined`).
    fn fail_users(&mut self, i: usize, state: SubState) {
        let Ok(i) = u32::try_from(i) else {
            return;
        };
        for slot in 0..self.subs.len() {
            let uses = self
                .subs
                .get(slot)
                .is_some_and(|s| s.is_live() && !s.is_virtual && s.filters.contains(&i));
            if uses {
                self.release(slot);
                if let Some(sub) = self.subs.get_mut(slot) {
                    sub.state = Some(state);
                }
                self.enqueue(slot);
            }
        }
    }

    /// Drops entry `i` as poison: nothing more is sent for it, and every
    /// subscription using it ends `Quarantined`.
    fn quarantine(&mut self, link: usize, i: usize) {
        let Some(e) = self.entries.get_mut(i) else {
            return;
        };
        log::warn!(
            "connection {link}: lost {} times in a row while a SUBSCRIBE to {:?} waited \
             for its SUBACK (the last time alone): filter dropped, its subscribers get REMOTE",
            e.strikes,
            e.text.as_str()
        );
        // The broker closed instead of granting it: it holds nothing.
        e.broker = Broker::Absent;
        self.set_strikes(i, 0);
        self.quarantined += 1;
        self.fail_users(i, SubState::Quarantined);
        self.refresh(i);
    }

    /// Sets entry `i`'s strikes, keeping its link's count of suspects.
    fn set_strikes(&mut self, i: usize, strikes: u8) {
        let Some(e) = self.entries.get_mut(i) else {
            return;
        };
        let (was, link) = (e.strikes > 0, e.link);
        e.strikes = strikes;
        if let Some(l) = self.links.get_mut(link) {
            match (was, strikes > 0) {
                (false, true) => l.suspects += 1,
                (true, false) => l.suspects = l.suspects.saturating_sub(1),
                _ => {}
            }
        }
    }

    /// Whether every filter of `sub` is granted at its QoS or waits for a
    /// link that is down.
    fn satisfied(&self, sub: &Sub) -> bool {
        sub.is_virtual
            || sub.filters.iter().all(|&i| {
                self.entry(i).is_some_and(|e| {
                    !self.links.get(e.link).is_some_and(|l| l.up)
                        || matches!(e.broker, Broker::Granted(q) if q as u8 >= sub.qos as u8)
                })
            })
    }

    fn activate_if_ready(&mut self, slot: usize) {
        let ready = self
            .subs
            .get(slot)
            .is_some_and(|s| s.state == Some(SubState::Pending) && self.satisfied(s));
        if ready {
            if let Some(sub) = self.subs.get_mut(slot) {
                sub.state = Some(SubState::Active);
            }
            self.enqueue(slot);
        }
    }

    fn check_pending(&mut self) {
        for slot in 0..self.subs.len() {
            self.activate_if_ready(slot);
        }
    }

    fn enqueue(&mut self, slot: usize) {
        let Some(sub) = self.subs.get_mut(slot) else {
            return;
        };
        if !sub.queued {
            // Cannot fail: each slot is queued at most once, and the queue
            // holds MAX_SUBSCRIPTIONS.
            if let Ok(s) = u32::try_from(slot) {
                sub.queued = self.settled.push_back(s).is_ok();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet, VecDeque};
    use std::string::String as StdString;
    use std::vec::Vec as StdVec;

    const Q0: QoS = QoS::AtMostOnce;
    const Q1: QoS = QoS::AtLeastOnce;
    const GRANTED: SubackCode = SubackCode::Granted(QoS::AtLeastOnce);
    const REFUSED: SubackCode = SubackCode::Failure;

    fn stream(client: u16) -> Dest {
        Dest::Stream {
            client,
            generation: 1,
        }
    }

    /// A broker request as owned data.
    #[derive(Clone, Debug, PartialEq, Eq)]
    struct Req {
        kind: RequestKind,
        id: u16,
        filters: StdVec<(StdString, QoS)>,
    }

    impl Req {
        fn names(&self) -> StdVec<&str> {
            self.filters.iter().map(|(f, _)| f.as_str()).collect()
        }
    }

    /// The next request on `link`, checked to emit and parse back as
    /// itself.
    fn next(r: &mut Router, link: usize) -> Option<Req> {
        let q = r.next_request(link, Traffic::Quiet)?;
        assert!(!q.filters.is_empty() && q.filters.len() <= MAX_FILTERS_PER_PACKET);
        let mut buf = [0u8; 4096];
        for version in [Version::V311, Version::V5] {
            let packet = q.packet(version);
            let n = packet.emit(&mut buf).unwrap();
            assert_eq!(Packet::parse_as(&buf[..n], version), Ok(packet));
        }
        Some(Req {
            kind: q.kind,
            id: q.packet_id,
            filters: q
                .filters
                .iter()
                .map(|(f, qos)| (StdString::from(*f), *qos))
                .collect(),
        })
    }

    /// Answers `req` on `link` as the broker would: SUBACK codes granting
    /// every filter but those `refuse` picks, or an UNSUBACK. Whether the
    /// router knew the request.
    fn answer(r: &mut Router, link: usize, req: &Req, refuse: impl Fn(&str) -> bool) -> bool {
        match req.kind {
            RequestKind::Subscribe => {
                let codes = req
                    .filters
                    .iter()
                    .map(|(f, _)| if refuse(f) { REFUSED } else { GRANTED });
                r.on_suback(link, req.id, codes)
            }
            RequestKind::Unsubscribe => r.on_unsuback(link, req.id),
        }
    }

    /// Sends every owed request on `link` and answers it at once, refusing
    /// the filters in `refuse`; returns the requests.
    fn exchange(r: &mut Router, link: usize, refuse: &[&str]) -> StdVec<Req> {
        let mut sent = StdVec::new();
        while let Some(req) = next(r, link) {
            assert!(answer(r, link, &req, |f| refuse.contains(&f)), "{req:?}");
            sent.push(req);
        }
        sent
    }

    fn settled(r: &mut Router) -> StdVec<(SubId, Outcome)> {
        core::iter::from_fn(|| r.take_settled())
            .map(|s| (s.id, s.outcome))
            .collect()
    }

    fn routed(r: &Router, topic: &str) -> StdVec<SubId> {
        let mut hits = StdVec::new();
        r.route(topic, |id, _| hits.push(id));
        hits
    }

    fn link_filters(r: &Router) -> [usize; MAX_CONNECTIONS] {
        core::array::from_fn(|l| r.link_stats(l).map_or(0, |s| s.filters))
    }

    fn entry<'r>(r: &'r Router, text: &str) -> Option<&'r Entry> {
        r.find_entry(text).and_then(|i| r.entries.get(i))
    }

    fn sub(r: &mut Router, dest: Dest, filters: &[&str], qos: QoS) -> SubId {
        r.subscribe(dest, filters, qos, false).unwrap()
    }

    #[test]
    fn subscribe_errors_display_as_lower_case_phrases() {
        assert_eq!(
            SubscribeError::NoRoom.to_string(),
            "every connection's subscription table is full"
        );
    }

    #[test]
    fn two_local_subscribers_to_one_filter_share_one_broker_subscription() {
        let mut r = Router::new();
        r.link_up(0, false, Instant::default());
        let a = sub(&mut r, stream(1), &["t/1"], Q0);
        let first = next(&mut r, 0).unwrap();
        assert_eq!(first.kind, RequestKind::Subscribe);
        assert_eq!(first.names(), ["t/1"]);
        // The second user arrives while the SUBSCRIBE is in flight.
        let b = sub(&mut r, stream(2), &["t/1"], Q0);
        assert_eq!(next(&mut r, 0), None);
        assert!(settled(&mut r).is_empty());
        assert!(r.on_suback(0, first.id, [GRANTED]));
        assert_eq!(
            settled(&mut r),
            [(a, Outcome::Accepted), (b, Outcome::Accepted)]
        );
        assert_eq!(routed(&r, "t/1"), [a, b]);
        assert_eq!(routed(&r, "t/2"), []);

        assert!(r.unsubscribe(a));
        assert_eq!(next(&mut r, 0), None);
        assert_eq!(routed(&r, "t/1"), [b]);
        assert!(r.unsubscribe(b));
        let unsub = next(&mut r, 0).unwrap();
        assert_eq!(unsub.kind, RequestKind::Unsubscribe);
        assert_eq!(unsub.names(), ["t/1"]);
        assert_eq!(r.link_stats(0).unwrap().filters, 1);
        assert!(r.on_unsuback(0, unsub.id));
        assert_eq!(r.link_stats(0).unwrap().filters, 0);
        assert_eq!(r.filters(), 0);
        assert_eq!(r.subscriptions(), 0);
    }

    #[test]
    fn publishes_wait_while_a_link_that_came_up_subscribes_again() {
        // [spool-9]
        let t0 = Instant::from_millis(1_000);
        let mut r = Router::new();
        let a = sub(&mut r, stream(1), &["t/1", "t/2"], Q1);
        assert!(!r.restoring(t0), "no link was up: nothing to wait for");
        r.link_up(0, false, t0);
        assert!(r.restoring(t0));
        let req = next(&mut r, 0).unwrap();
        assert!(r.restoring(t0), "until the SUBACK");
        assert!(r.on_suback(0, req.id, [GRANTED, GRANTED]));
        assert!(!r.restoring(t0));
        assert_eq!(settled(&mut r), [(a, Outcome::Accepted)]);
        // A later subscribe on the link that is up holds nothing.
        sub(&mut r, stream(2), &["t/3"], Q0);
        assert!(!r.restoring(t0));
        // Lost and back: every filter is owed again.
        r.link_down(0);
        assert!(!r.restoring(t0));
        r.link_up(0, false, t0);
        assert!(r.restoring(t0));
        // A broker that never answers holds publishes for RESTORE_HOLD only.
        let _ = next(&mut r, 0).unwrap();
        assert!(r.restoring(t0 + RESTORE_HOLD - core::time::Duration::from_millis(1)));
        assert!(!r.restoring(t0 + RESTORE_HOLD));
    }

    #[test]
    fn a_session_the_broker_kept_holds_no_publishes() {
        let mut r = Router::new();
        r.link_up(0, false, Instant::default());
        sub(&mut r, stream(1), &["t/1"], Q0);
        exchange(&mut r, 0, &[]);
        r.link_down(0);
        r.link_up(0, true, Instant::default());
        assert!(!r.restoring(Instant::default()));
    }

    #[test]
    fn overlapping_filters_of_one_subscription_deliver_once() {
        let mut r = Router::new();
        let a = sub(&mut r, stream(1), &["a/+", "a/#", "a/b", "#"], Q0);
        let b = sub(&mut r, stream(2), &["a/b"], Q0);
        settled(&mut r);
        assert_eq!(routed(&r, "a/b"), [a, b]);
        assert_eq!(routed(&r, "a/c"), [a]);
        assert_eq!(routed(&r, "x"), [a]);
        assert_eq!(routed(&r, "$aws/x"), []);
    }

    #[test]
    fn with_subscription_ids_each_copy_reaches_each_subscription_once() {
        // [MQTT5-3.3.4] mosquitto sends one copy per matching subscription,
        // each naming its own; a broker may also send one naming all.
        let mut r = Router::new();
        r.use_subscription_ids(0, true);
        r.link_up(0, false, Instant::default());
        let a = sub(&mut r, stream(1), &["down/+", "down/#"], Q0);
        let b = sub(&mut r, stream(2), &["down/#"], Q0);
        // One filter per SUBSCRIBE, with the identifier of its entry.
        let plus = r.find_entry("down/+").unwrap();
        let hash = r.find_entry("down/#").unwrap();
        for _ in 0..2 {
            let mut buf = [0u8; 64];
            let (filter, n, packet_id) = {
                let q = r.next_request(0, Traffic::Quiet).unwrap();
                assert_eq!(q.filters.len(), 1);
                let n = q.packet(Version::V5).emit(&mut buf).unwrap();
                (StdString::from(q.filters[0].0), n, q.packet_id)
            };
            let i = r.find_entry(&filter).unwrap();
            match Packet::parse_as(&buf[..n], Version::V5) {
                Ok(Packet::Subscribe(s)) => assert_eq!(
                    s.properties
                        .unwrap()
                        .number(crate::mqtt::props::id::SUBSCRIPTION_ID),
                    Some(u32::try_from(i + 1).unwrap())
                ),
                other => panic!("{other:?}"),
            }
            r.on_suback(0, packet_id, [SubackCode::Granted(Q0)]);
        }
        settled(&mut r);
        let copy = |ids: &[u32]| {
            let mut hits = StdVec::new();
            r.route_copy("down/x", ids, |id, _, _| hits.push(id));
            hits
        };
        let id = |i: usize| u32::try_from(i + 1).unwrap();
        // One copy per filter: a gets the first, b the second.
        assert_eq!(copy(&[id(plus)]), [a]);
        assert_eq!(copy(&[id(hash)]), [b]);
        // One copy naming both: each once.
        assert_eq!(copy(&[id(plus), id(hash)]), [a, b]);
        // No identifiers (3.1.1, or a broker without them): every match.
        assert_eq!(copy(&[]), [a, b]);
        // A virtual subscription takes the copy of the first broker filter.
        let v = r.subscribe(stream(3), &["down/x"], Q0, true).unwrap();
        settled(&mut r);
        let copy = |ids: &[u32]| {
            let mut hits = StdVec::new();
            r.route_copy("down/x", ids, |id, _, _| hits.push(id));
            hits
        };
        assert_eq!(copy(&[id(plus)]), [a, v]);
        assert_eq!(copy(&[id(hash)]), [b]);
    }

    #[test]
    fn a_subscription_is_routed_only_after_its_answer_was_taken() {
        let mut r = Router::new();
        r.link_up(0, false, Instant::default());
        let a = sub(&mut r, stream(1), &["x"], Q0);
        assert_eq!(r.state(a), Some(SubState::Pending));
        exchange(&mut r, 0, &[]);
        assert_eq!(r.state(a), Some(SubState::Active));
        assert_eq!(routed(&r, "x"), []);
        assert_eq!(settled(&mut r), [(a, Outcome::Accepted)]);
        assert_eq!(routed(&r, "x"), [a]);
    }

    #[test]
    fn virtual_subscriptions_match_without_a_broker_filter() {
        let mut r = Router::new();
        r.link_up(0, false, Instant::default());
        let v = r.subscribe(stream(1), &["v/#"], Q0, true).unwrap();
        assert_eq!(settled(&mut r), [(v, Outcome::Accepted)]);
        assert_eq!(next(&mut r, 0), None);
        assert_eq!(r.link_stats(0).unwrap().filters, 0);
        assert_eq!(r.filters(), 1);
        assert_eq!(routed(&r, "v/x"), [v]);

        // A broker user of the same filter places it and subscribes.
        let b = sub(&mut r, stream(2), &["v/#"], Q1);
        assert_eq!(r.filters(), 1);
        assert_eq!(exchange(&mut r, 0, &[])[0].names(), ["v/#"]);
        assert_eq!(settled(&mut r), [(b, Outcome::Accepted)]);
        assert_eq!(routed(&r, "v/x"), [v, b]);
        // When it leaves, the broker filter goes and the virtual one stays.
        r.unsubscribe(b);
        let sent = exchange(&mut r, 0, &[]);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].kind, RequestKind::Unsubscribe);
        assert_eq!(r.link_stats(0).unwrap().filters, 0);
        assert_eq!(routed(&r, "v/x"), [v]);
        // A broker refusal does not touch virtual users.
        let c = sub(&mut r, stream(3), &["v/#"], Q0);
        exchange(&mut r, 0, &["v/#"]);
        assert_eq!(settled(&mut r), [(c, Outcome::Refused)]);
        assert_eq!(r.state(v), Some(SubState::Active));
        r.unsubscribe(v);
        assert_eq!(r.filters(), 0);
    }

    // ---- broker requests ------------------------------------------------------

    #[test]
    fn subscribe_packets_carry_at_most_eight_filters() {
        let mut r = Router::with_link_capacity(12);
        r.link_up(0, false, Instant::default());
        let names: StdVec<StdString> = (0..12).map(|i| format!("f/{i}")).collect();
        let filters: StdVec<&str> = names.iter().map(StdString::as_str).collect();
        let a = sub(&mut r, stream(1), &filters, Q1);
        assert_eq!(link_filters(&r), [12, 0, 0]);
        let first = next(&mut r, 0).unwrap();
        let second = next(&mut r, 0).unwrap();
        assert_eq!(next(&mut r, 0), None);
        assert_eq!(first.filters.len(), 8);
        assert_eq!(second.filters.len(), 4);
        assert_ne!(first.id, second.id);
        assert!(first
            .filters
            .iter()
            .chain(&second.filters)
            .all(|(_, q)| *q == Q1));
        let mut all: StdVec<&str> = first.names();
        all.extend(second.names());
        assert_eq!(all, filters);

        assert!(r.on_suback(0, second.id, [GRANTED; 4]));
        assert!(settled(&mut r).is_empty());
        assert!(r.on_suback(0, first.id, [GRANTED; 8]));
        assert_eq!(settled(&mut r), [(a, Outcome::Accepted)]);
    }

    #[test]
    fn a_suback_refusal_fails_the_subscription_and_releases_its_other_filters() {
        let mut r = Router::new();
        r.link_up(0, false, Instant::default());
        let a = sub(&mut r, stream(1), &["ok/1", "bad/1", "ok/2"], Q0);
        let b = sub(&mut r, stream(2), &["ok/1"], Q0);
        let req = next(&mut r, 0).unwrap();
        assert_eq!(req.names(), ["ok/1", "bad/1", "ok/2"]);
        assert!(r.on_suback(0, req.id, [GRANTED, REFUSED, GRANTED]));
        assert_eq!(
            settled(&mut r),
            [(a, Outcome::Refused), (b, Outcome::Accepted)]
        );
        assert_eq!(r.state(a), None);
        assert_eq!(r.subscriptions(), 1);
        // ok/2 lost its only user; bad/1 was never held by the broker.
        let unsub = next(&mut r, 0).unwrap();
        assert_eq!(unsub.kind, RequestKind::Unsubscribe);
        assert_eq!(unsub.names(), ["ok/2"]);
        assert!(r.on_unsuback(0, unsub.id));
        assert_eq!(r.filters(), 1);
        assert_eq!(routed(&r, "ok/2"), []);
        assert_eq!(routed(&r, "ok/1"), [b]);
    }

    #[test]
    fn a_missing_suback_code_counts_as_a_refusal() {
        let mut r = Router::new();
        r.link_up(0, false, Instant::default());
        let a = sub(&mut r, stream(1), &["x"], Q0);
        let b = sub(&mut r, stream(2), &["y"], Q0);
        let req = next(&mut r, 0).unwrap();
        assert_eq!(req.names(), ["x", "y"]);
        // What the SUBACK must answer; the loop treats any other count as
        // the broker's protocol error before it gets here.
        assert_eq!(r.subscribe_len(0, req.id), Some(2));
        assert_eq!(r.subscribe_len(0, req.id.wrapping_add(1)), None);
        assert_eq!(r.subscribe_len(1, req.id), None);
        assert!(r.on_suback(0, req.id, [GRANTED]));
        assert_eq!(r.subscribe_len(0, req.id), None);
        assert_eq!(
            settled(&mut r),
            [(b, Outcome::Refused), (a, Outcome::Accepted)]
        );
    }

    #[test]
    fn unknown_packet_ids_and_links_are_ignored() {
        let mut r = Router::new();
        r.link_up(0, false, Instant::default());
        let a = sub(&mut r, stream(1), &["x"], Q0);
        let req = next(&mut r, 0).unwrap();
        assert!(!r.on_suback(0, req.id.wrapping_add(1), [GRANTED]));
        assert!(!r.on_unsuback(0, req.id));
        assert!(!r.on_suback(1, req.id, [GRANTED]));
        assert!(!r.on_suback(99, req.id, [GRANTED]));
        r.link_up(99, true, Instant::default());
        r.link_down(99);
        assert_eq!(r.next_request(99, Traffic::Quiet), None);
        assert_eq!(r.link_stats(99), None);
        assert!(!r.link_wanted(99));
        assert_eq!(r.state(a), Some(SubState::Pending));
        assert!(r.on_suback(0, req.id, [GRANTED]));
        assert!(!r.on_suback(0, req.id, [GRANTED]), "answered twice");
    }

    #[test]
    fn packet_ids_are_in_the_upper_half_and_unique_per_link() {
        let mut r = Router::new();
        r.link_up(0, false, Instant::default());
        r.link_up(1, false, Instant::default());
        let mut ids = BTreeSet::new();
        for f in ["a", "b", "c", "d"] {
            sub(&mut r, stream(1), &[f], Q0);
            let req = next(&mut r, 0).unwrap();
            assert!(req.id >= IDS.first);
            assert!(ids.insert(req.id), "{ids:?}");
        }
        // Wrapping skips ids still outstanding.
        r.links[0].next_id = u16::MAX;
        let outstanding = *ids.iter().next().unwrap();
        assert_eq!(outstanding, IDS.first);
        sub(&mut r, stream(1), &["a", "b", "c", "d"], Q1);
        // The QoS upgrade of a waits for its first SUBACK; none is owed yet.
        assert_eq!(next(&mut r, 0), None);
        for id in ids.clone() {
            assert!(r.on_suback(0, id, [GRANTED]));
        }
        let upgrade = next(&mut r, 0).unwrap();
        assert_eq!(upgrade.id, u16::MAX);
        assert_eq!(upgrade.filters.len(), 4);
        // Ids on another link are independent.
        sub(&mut r, stream(2), &["e", "f", "g", "h"], Q0);
        let other = next(&mut r, 1).unwrap();
        assert_eq!(other.id, IDS.first);
        assert_eq!(other.names(), ["e", "f", "g", "h"]);
        // Next on link 0 wraps to the first id, now free again.
        r.links[0].next_id = u16::MAX;
        assert!(r.on_suback(0, u16::MAX, [GRANTED; 4]));
        let s = sub(&mut r, stream(3), &["a"], Q0);
        assert_eq!(r.state(s), Some(SubState::Active));
    }

    #[test]
    fn a_packet_id_still_outstanding_is_skipped() {
        let mut r = Router::new();
        r.link_up(0, false, Instant::default());
        sub(&mut r, stream(1), &["a"], Q0);
        let first = next(&mut r, 0).unwrap();
        assert_eq!(first.id, IDS.first);
        r.links[0].next_id = IDS.first;
        sub(&mut r, stream(1), &["b"], Q0);
        assert_eq!(next(&mut r, 0).unwrap().id, IDS.first + 1);
    }

    #[test]
    fn a_qos_upgrade_resubscribes_the_filter() {
        let mut r = Router::new();
        r.link_up(0, false, Instant::default());
        let a = sub(&mut r, stream(1), &["q"], Q0);
        let first = exchange(&mut r, 0, &[]);
        assert_eq!(first[0].filters, [("q".into(), Q0)]);
        let b = sub(&mut r, stream(2), &["q"], Q1);
        assert_eq!(r.state(b), Some(SubState::Pending));
        assert_eq!(settled(&mut r), [(a, Outcome::Accepted)]);
        let again = exchange(&mut r, 0, &[]);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].kind, RequestKind::Subscribe);
        assert_eq!(again[0].filters, [("q".into(), Q1)]);
        assert_eq!(settled(&mut r), [(b, Outcome::Accepted)]);
        // Nothing is downgraded when the QoS 1 user leaves.
        r.unsubscribe(b);
        assert_eq!(next(&mut r, 0), None);
        // A QoS 0 newcomer on a QoS 1 filter is active at once.
        let c = sub(&mut r, stream(3), &["q"], Q0);
        assert_eq!(settled(&mut r), [(c, Outcome::Accepted)]);
    }

    #[test]
    fn a_new_user_during_an_unsubscribe_resubscribes_after_the_unsuback() {
        let mut r = Router::new();
        r.link_up(0, false, Instant::default());
        let a = sub(&mut r, stream(1), &["x"], Q0);
        exchange(&mut r, 0, &[]);
        r.unsubscribe(a);
        let unsub = next(&mut r, 0).unwrap();
        let b = sub(&mut r, stream(2), &["x"], Q0);
        assert_eq!(next(&mut r, 0), None);
        assert!(r.on_unsuback(0, unsub.id));
        let again = exchange(&mut r, 0, &[]);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].kind, RequestKind::Subscribe);
        assert_eq!(settled(&mut r), [(b, Outcome::Accepted)]);
    }

    // ---- placement ------------------------------------------------------------

    #[test]
    fn filters_fill_the_links_in_order_and_the_thirteenth_is_refused() {
        let mut r = Router::new();
        let names: StdVec<StdString> = (0..13).map(|i| format!("f{i}")).collect();
        let f: StdVec<&str> = names.iter().map(StdString::as_str).collect();
        // Ten filters: two per request, as the test table holds 8 requests.
        let mut ids = StdVec::new();
        for pair in f[..10].chunks(2) {
            ids.push(sub(&mut r, stream(1), pair, Q0));
        }
        assert_eq!(link_filters(&r), [4, 4, 2]);
        assert!((0..3).all(|l| r.link_wanted(l)));
        ids.push(sub(&mut r, stream(1), &[f[10]], Q0));
        ids.push(sub(&mut r, stream(1), &[f[11]], Q0));
        assert_eq!(link_filters(&r), [4, 4, 4]);
        settled(&mut r);

        assert_eq!(
            r.subscribe(stream(1), &[f[12]], Q0, false),
            Err(SubscribeError::NoRoom)
        );
        assert_eq!(
            r.subscribe(stream(1), &[f[0], f[12]], Q1, false),
            Err(SubscribeError::NoRoom)
        );
        assert_eq!(link_filters(&r), [4, 4, 4]);
        assert_eq!(r.subscriptions(), 7);
        assert_eq!(r.filters(), 12);
        assert_eq!(entry(&r, "f0").unwrap().users, [1, 0]);
        assert!(entry(&r, "f12").is_none());
        assert!(settled(&mut r).is_empty());
        // Existing filters still fit.
        let extra = sub(&mut r, stream(2), &[f[0], f[11]], Q0);
        r.unsubscribe(extra);

        // Link 2 holds f8..f11: its users leave, and it is no longer wanted.
        for id in &ids[4..] {
            assert!(r.unsubscribe(*id));
        }
        assert_eq!(link_filters(&r), [4, 4, 0]);
        assert!(!r.link_wanted(2));
        assert!(r.link_wanted(1));
        assert!(r.link_wanted(0));
    }

    #[test]
    fn a_request_goes_whole_to_the_first_link_with_room_for_it() {
        let mut r = Router::new();
        sub(&mut r, stream(1), &["a", "b"], Q0);
        sub(&mut r, stream(1), &["c", "d", "e"], Q0);
        assert_eq!(link_filters(&r), [2, 3, 0]);
        assert_eq!(entry(&r, "c").unwrap().link, 1);
        assert_eq!(entry(&r, "e").unwrap().link, 1);
        sub(&mut r, stream(1), &["f"], Q0);
        assert_eq!(link_filters(&r), [3, 3, 0]);
        sub(&mut r, stream(1), &["g", "h", "i", "j"], Q0);
        assert_eq!(link_filters(&r), [3, 3, 4]);
        assert_eq!(
            r.subscribe(stream(1), &["k", "l", "m"], Q0, false),
            Err(SubscribeError::NoRoom)
        );
        // When no single link has room, the request is spread in order.
        sub(&mut r, stream(1), &["k", "l"], Q0);
        assert_eq!(link_filters(&r), [4, 4, 4]);
        assert_eq!(entry(&r, "k").unwrap().link, 0);
        assert_eq!(entry(&r, "l").unwrap().link, 1);
    }

    #[test]
    fn an_extra_link_stays_wanted_until_its_unsubscribes_are_answered() {
        let mut r = Router::new();
        r.link_up(0, false, Instant::default());
        sub(&mut r, stream(1), &["a", "b", "c", "d"], Q0);
        let e = sub(&mut r, stream(1), &["e"], Q0);
        assert_eq!(link_filters(&r), [4, 1, 0]);
        assert!(r.link_wanted(1));
        assert_eq!(r.state(e), Some(SubState::Active), "link 1 is down");
        r.link_up(1, false, Instant::default());
        exchange(&mut r, 1, &[]);
        r.unsubscribe(e);
        assert!(r.link_wanted(1));
        let unsub = next(&mut r, 1).unwrap();
        assert_eq!(unsub.names(), ["e"]);
        assert!(r.link_wanted(1));
        assert!(r.on_unsuback(1, unsub.id));
        assert!(!r.link_wanted(1));
    }

    // ---- links ------------------------------------------------------------------

    #[test]
    fn an_offline_subscribe_is_accepted_at_once_and_made_after_link_up() {
        let mut r = Router::new();
        let a = sub(&mut r, stream(1), &["x", "y"], Q1);
        assert_eq!(settled(&mut r), [(a, Outcome::Accepted)]);
        assert_eq!(next(&mut r, 0), None);
        r.link_up(0, false, Instant::default());
        let sent = exchange(&mut r, 0, &[]);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].filters, [("x".into(), Q1), ("y".into(), Q1)]);
        assert!(settled(&mut r).is_empty(), "answered once only");
        assert_eq!(routed(&r, "y"), [a]);
    }

    #[test]
    fn a_late_refusal_drops_a_subscription_accepted_offline() {
        let mut r = Router::new();
        let a = sub(&mut r, stream(1), &["x", "deny"], Q0);
        let b = sub(&mut r, stream(2), &["x"], Q0);
        assert_eq!(
            settled(&mut r),
            [(a, Outcome::Accepted), (b, Outcome::Accepted)]
        );
        r.link_up(0, false, Instant::default());
        exchange(&mut r, 0, &["deny"]);
        let out = settled(&mut r);
        assert_eq!(out, [(a, Outcome::Dropped)]);
        assert_eq!(routed(&r, "x"), [b]);
        assert!(entry(&r, "deny").is_none());
    }

    #[test]
    fn a_pending_subscription_is_accepted_when_its_link_goes_down() {
        let mut r = Router::new();
        r.link_up(0, false, Instant::default());
        let a = sub(&mut r, stream(1), &["x"], Q0);
        let req = next(&mut r, 0).unwrap();
        r.link_down(0);
        assert_eq!(settled(&mut r), [(a, Outcome::Accepted)]);
        assert!(!r.on_suback(0, req.id, [GRANTED]), "forgotten");
        r.link_up(0, false, Instant::default());
        assert_eq!(exchange(&mut r, 0, &[])[0].names(), ["x"]);
    }

    #[test]
    fn link_down_and_up_resubscribes_every_filter_without_a_session() {
        let mut r = Router::new();
        r.link_up(0, false, Instant::default());
        let a = sub(&mut r, stream(1), &["a", "b"], Q0);
        let b = sub(&mut r, stream(2), &["c"], Q1);
        exchange(&mut r, 0, &[]);
        settled(&mut r);
        r.link_down(0);
        assert_eq!(next(&mut r, 0), None);
        r.link_up(0, false, Instant::default());
        let sent = exchange(&mut r, 0, &[]);
        assert_eq!(sent.len(), 1);
        assert_eq!(
            sent[0].filters,
            [("a".into(), Q0), ("b".into(), Q0), ("c".into(), Q1)]
        );
        assert!(settled(&mut r).is_empty());
        assert_eq!(r.state(a), Some(SubState::Active));
        assert_eq!(r.state(b), Some(SubState::Active));
        // A refusal after a reconnect drops the subscriptions using it.
        r.link_down(0);
        r.link_up(0, false, Instant::default());
        exchange(&mut r, 0, &["c"]);
        assert_eq!(settled(&mut r), [(b, Outcome::Dropped)]);
    }

    #[test]
    fn a_present_session_keeps_granted_filters_and_resends_uncertain_ones() {
        let mut r = Router::new();
        r.link_up(0, false, Instant::default());
        sub(&mut r, stream(1), &["a", "b"], Q0);
        exchange(&mut r, 0, &[]);
        r.link_down(0);
        r.link_up(0, true, Instant::default());
        assert_eq!(next(&mut r, 0), None);
        // A SUBSCRIBE lost with the link is sent again.
        sub(&mut r, stream(1), &["c"], Q0);
        let lost = next(&mut r, 0).unwrap();
        r.link_down(0);
        r.link_up(0, true, Instant::default());
        let again = next(&mut r, 0).unwrap();
        assert_eq!(again.names(), ["c"]);
        assert_eq!(again.id, lost.id.wrapping_add(1));
        assert_eq!(next(&mut r, 0), None);
    }

    #[test]
    fn a_filter_left_offline_is_unsubscribed_only_if_the_session_persists() {
        for session_present in [false, true] {
            let mut r = Router::new();
            r.link_up(0, false, Instant::default());
            let a = sub(&mut r, stream(1), &["x"], Q0);
            exchange(&mut r, 0, &[]);
            r.link_down(0);
            r.unsubscribe(a);
            assert_eq!(link_filters(&r), [1, 0, 0], "the broker may hold it");
            r.link_up(0, session_present, Instant::default());
            let sent = exchange(&mut r, 0, &[]);
            if session_present {
                assert_eq!(sent.len(), 1);
                assert_eq!(sent[0].kind, RequestKind::Unsubscribe);
                assert_eq!(sent[0].names(), ["x"]);
            } else {
                assert!(sent.is_empty());
            }
            assert_eq!(link_filters(&r), [0, 0, 0]);
            assert_eq!(r.filters(), 0);
        }
    }

    #[test]
    fn a_filter_never_sent_is_forgotten_when_its_last_user_leaves() {
        let mut r = Router::new();
        let a = sub(&mut r, stream(1), &["x"], Q0);
        r.unsubscribe(a);
        assert_eq!(r.filters(), 0);
        r.link_up(0, true, Instant::default());
        assert_eq!(next(&mut r, 0), None);
    }

    // ---- the local table ----------------------------------------------------------

    // ---- poison filters [bus-iso-2] ------------------------------------------

    #[test]
    fn a_filter_lost_twice_in_a_row_alone_is_dropped_and_the_others_carry_on() {
        let mut r = Router::new();
        r.link_up(0, false, Instant::default());
        let a = sub(&mut r, stream(1), &["ok/1", "bad"], Q0);
        let b = sub(&mut r, stream(2), &["ok/2"], Q0);
        // t0: one SUBSCRIBE of three filters; the broker closes.
        assert_eq!(next(&mut r, 0).unwrap().names(), ["ok/1", "bad", "ok/2"]);
        r.link_down(0);
        assert_eq!(
            settled(&mut r),
            [(a, Outcome::Accepted), (b, Outcome::Accepted)],
            "offline, as before"
        );
        assert!(r.holds_publishes(0, false));
        assert!(!r.holds_publishes(0, true), "a publish probe goes first");
        // t1: reconnected. Suspects go alone, and not while publishes are
        // in flight on the link.
        r.link_up(0, false, Instant::default());
        assert_eq!(r.next_request(0, Traffic::Busy), None);
        let p1 = next(&mut r, 0).unwrap();
        assert_eq!(p1.names(), ["ok/1"]);
        assert_eq!(next(&mut r, 0), None, "one probe at a time");
        assert!(r.on_suback(0, p1.id, [GRANTED]));
        let p2 = next(&mut r, 0).unwrap();
        assert_eq!(p2.names(), ["bad"]);
        // The broker closes again: "bad" is dropped, a with it.
        r.link_down(0);
        assert_eq!(r.quarantined(), 1);
        assert_eq!(settled(&mut r), [(a, Outcome::Quarantined)]);
        assert_eq!(r.state(a), None);
        // t2: ok/2 is still a suspect (one strike): probed alone, granted.
        r.link_up(0, false, Instant::default());
        let p3 = next(&mut r, 0).unwrap();
        assert_eq!(p3.names(), ["ok/2"]);
        assert!(r.on_suback(0, p3.id, [GRANTED]));
        assert!(!r.holds_publishes(0, false));
        // Nothing is ever sent for "bad" again; ok/1 lost its user.
        assert!(exchange(&mut r, 0, &[])
            .iter()
            .all(|q| !q.names().contains(&"bad")));
        assert!(entry(&r, "bad").is_none());
        assert_eq!(routed(&r, "ok/2"), [b]);
        assert_eq!(r.quarantined(), 1);
        assert!(settled(&mut r).is_empty());
    }

    #[test]
    fn a_single_close_is_forgiven_by_the_next_suback() {
        let mut r = Router::new();
        r.link_up(0, false, Instant::default());
        let a = sub(&mut r, stream(1), &["x", "y"], Q0);
        // t0: x and y in flight, the link is cut: one strike each.
        next(&mut r, 0).unwrap();
        r.link_down(0);
        assert_eq!(settled(&mut r), [(a, Outcome::Accepted)]);
        // t1: each probe is answered, granted or refused: both cleared.
        r.link_up(0, false, Instant::default());
        let px = next(&mut r, 0).unwrap();
        assert!(r.on_suback(0, px.id, [GRANTED]));
        let py = next(&mut r, 0).unwrap();
        assert!(r.on_suback(0, py.id, [REFUSED]), "refused is an answer too");
        assert_eq!(settled(&mut r), [(a, Outcome::Dropped)]);
        assert!(!r.holds_publishes(0, false));
        // t2: a later close with x in flight again is a first strike.
        let c = sub(&mut r, stream(2), &["x", "z"], Q0);
        next(&mut r, 0).unwrap();
        r.link_down(0);
        assert_eq!(r.quarantined(), 0);
        assert_eq!(r.state(c), Some(SubState::Active));
    }

    #[test]
    fn no_subscribe_goes_while_the_caller_probes_a_publish() {
        let mut r = Router::new();
        r.link_up(0, false, Instant::default());
        let a = sub(&mut r, stream(1), &["old"], Q0);
        exchange(&mut r, 0, &[]);
        r.unsubscribe(a);
        sub(&mut r, stream(2), &["new"], Q0);
        // The UNSUBSCRIBE goes; the SUBSCRIBE waits for the publish probe.
        let (kind, id) = r
            .next_request(0, Traffic::Probing)
            .map(|q| (q.kind, q.packet_id))
            .unwrap();
        assert_eq!(kind, RequestKind::Unsubscribe);
        assert!(r.on_unsuback(0, id));
        assert_eq!(r.next_request(0, Traffic::Probing), None);
        assert_eq!(next(&mut r, 0).unwrap().names(), ["new"]);
    }

    #[test]
    fn a_probe_on_an_extra_link_does_not_hold_link_0() {
        let mut r = Router::new();
        sub(&mut r, stream(1), &["a", "b", "c", "d"], Q0);
        let e = sub(&mut r, stream(1), &["e"], Q0);
        settled(&mut r);
        r.link_up(1, false, Instant::default());
        assert_eq!(next(&mut r, 1).unwrap().names(), ["e"]);
        r.link_down(1);
        r.link_up(1, false, Instant::default());
        assert!(r.holds_publishes(1, false) && !r.holds_publishes(0, false));
        assert_eq!(next(&mut r, 1).unwrap().names(), ["e"]);
        r.link_down(1);
        assert_eq!(settled(&mut r), [(e, Outcome::Quarantined)]);
        assert!(!r.holds_publishes(1, false));
        assert!(!r.link_wanted(1), "nothing left on link 1");
    }

    #[test]
    fn a_full_local_table_is_nomem_and_changes_nothing() {
        let mut r = Router::new();
        for i in 0..MAX_SUBSCRIPTIONS {
            sub(&mut r, stream(1), &["x"], Q0);
            assert_eq!(r.subscriptions(), i + 1);
        }
        assert_eq!(
            r.subscribe(stream(1), &["y"], Q0, false),
            Err(SubscribeError::TableFull)
        );
        assert_eq!(r.filters(), 1);
        assert_eq!(entry(&r, "x").unwrap().users, [8, 0]);
    }

    #[test]
    fn request_sizes_and_filters_are_checked() {
        let mut r = Router::new();
        let names: StdVec<StdString> = (0..17).map(|i| format!("f{i}")).collect();
        let f: StdVec<&str> = names.iter().map(StdString::as_str).collect();
        assert_eq!(
            r.subscribe(stream(1), &f, Q0, true),
            Err(SubscribeError::TooManyFilters)
        );
        // Duplicates count once: 16 distinct of 20.
        let mut dup = f[..16].to_vec();
        dup.extend_from_slice(&f[..4]);
        let v = r.subscribe(stream(1), &dup, Q0, true).unwrap();
        assert_eq!(r.filters(), 16);
        r.unsubscribe(v);
        assert_eq!(
            r.subscribe(stream(1), &[], Q0, false),
            Err(SubscribeError::NoFilters)
        );
        assert_eq!(
            r.subscribe(stream(1), &["ok", "a/#/b"], Q0, false),
            Err(SubscribeError::Filter(TopicError::BadWildcard))
        );
        assert_eq!(
            r.subscribe(stream(1), &["a/b/c/d/e/f/g/h/i"], Q0, false),
            Err(SubscribeError::Filter(TopicError::TooManyLevels))
        );
        assert_eq!(r.filters(), 0);
        assert_eq!(r.subscriptions(), 0);
        // A broker request over the links' total capacity.
        assert_eq!(
            r.subscribe(stream(1), &f[..13], Q0, false),
            Err(SubscribeError::NoRoom)
        );
        let all = sub(&mut r, stream(1), &f[..12], Q0);
        assert_eq!(link_filters(&r), [4, 4, 4]);
        r.unsubscribe(all);
        assert_eq!(r.filters(), 0);
    }

    #[test]
    fn find_endpoint_needs_exactly_this_filter_list_and_endpoint() {
        let mut r = Router::new();
        let ep = Dest::endpoint("my_component").unwrap();
        assert_eq!(Dest::endpoint(&"e".repeat(51)), None);
        let a = sub(&mut r, ep.clone(), &["a", "b"], Q0);
        let s = sub(&mut r, stream(1), &["a", "b"], Q0);
        assert_eq!(r.find_endpoint("my_component", &["a", "b"]), Some(a));
        assert_eq!(r.find_endpoint("my_component", &["b", "a", "a"]), Some(a));
        assert_eq!(r.find_endpoint("my_component", &["a"]), None);
        assert_eq!(r.find_endpoint("my_component", &["a", "b", "c"]), None);
        assert_eq!(r.find_endpoint("other", &["a", "b"]), None);
        assert_eq!(r.dest(a), Some(&ep));
        assert!(r.unsubscribe(a));
        assert_eq!(r.find_endpoint("my_component", &["a", "b"]), None);
        assert_eq!(r.state(s), Some(SubState::Active));
    }

    #[test]
    fn an_endpoint_unreachable_for_sixty_seconds_loses_its_subscription() {
        // [bus-iso-4]
        let mut r = Router::new();
        let t = Instant::from_secs;
        let sink = Dest::endpoint("sink").unwrap();
        let id = sub(&mut r, sink.clone(), &["a"], QoS::AtMostOnce);
        let other = sub(&mut r, sink, &["b"], QoS::AtMostOnce);
        assert_eq!(r.endpoint_at(0), Some((id, "sink")));
        // Reached again within the minute: the time starts over.
        assert!(!r.endpoint_reached(id, false, t(0)));
        assert!(!r.endpoint_reached(id, false, t(59)));
        assert!(!r.endpoint_reached(id, true, t(59)));
        assert!(!r.endpoint_reached(id, false, t(100)));
        assert!(!r.endpoint_reached(id, false, t(159)));
        assert!(r.state(id).is_some());
        assert!(r.endpoint_reached(id, false, t(160)));
        assert_eq!(r.state(id), None);
        assert_eq!(r.endpoint_at(0), None);
        // Stale ids change nothing; the other subscription keeps its own time.
        assert!(!r.endpoint_reached(id, false, t(500)));
        assert!(!r.endpoint_reached(other, false, t(500)));
        assert!(r.state(other).is_some());
        // Streams are not endpoints.
        let s = sub(&mut r, stream(1), &["c"], QoS::AtMostOnce);
        assert!((0..MAX_SUBSCRIPTIONS).all(|i| r.endpoint_at(i).map(|e| e.0) != Some(s)));
    }

    #[test]
    fn removing_a_stream_ends_only_its_subscriptions() {
        let mut r = Router::new();
        let old = Dest::Stream {
            client: 1,
            generation: 1,
        };
        let new = Dest::Stream {
            client: 1,
            generation: 2,
        };
        sub(&mut r, old.clone(), &["a"], Q0);
        sub(&mut r, old, &["b"], Q0);
        let n = sub(&mut r, new, &["a"], Q0);
        let other = sub(&mut r, stream(2), &["c"], Q0);
        assert_eq!(r.remove_stream(1, 1), 2);
        assert_eq!(r.remove_stream(1, 1), 0);
        assert_eq!(r.subscriptions(), 2);
        assert_eq!(r.filters(), 2);
        assert!(entry(&r, "b").is_none());
        assert_eq!(
            r.remove_dest(|d| matches!(d, Dest::Stream { client: 2, .. })),
            1
        );
        assert_eq!(r.state(other), None);
        assert_eq!(r.state(n), Some(SubState::Active));
    }

    #[test]
    fn stale_ids_are_refused_after_their_slot_is_reused() {
        let mut r = Router::new();
        let a = sub(&mut r, stream(1), &["a"], Q0);
        assert!(r.unsubscribe(a));
        assert!(!r.unsubscribe(a));
        let b = sub(&mut r, stream(2), &["b"], Q0);
        assert_eq!(a.slot, b.slot);
        assert_eq!(r.state(a), None);
        assert!(!r.unsubscribe(a));
        assert_eq!(r.state(b), Some(SubState::Active));
        // The answer queued for `a` now belongs to `b`, reported once.
        assert_eq!(settled(&mut r), [(b, Outcome::Accepted)]);
    }

    #[test]
    fn a_subscription_removed_before_its_refusal_is_reported_is_not_reported() {
        let mut r = Router::new();
        r.link_up(0, false, Instant::default());
        let a = sub(&mut r, stream(1), &["deny"], Q0);
        exchange(&mut r, 0, &["deny"]);
        assert_eq!(r.state(a), Some(SubState::Failed));
        assert_eq!(r.subscriptions(), 1);
        assert_eq!(r.remove_stream(1, 1), 1);
        assert!(settled(&mut r).is_empty());
        assert_eq!(r.subscriptions(), 0);
    }

    // ---- randomized -----------------------------------------------------------

    use crate::test_rng::XorShift;

    /// The broker: one session per link and the answers on their way.
    #[derive(Default)]
    struct FakeBroker {
        up: [bool; MAX_CONNECTIONS],
        session: [Option<BTreeMap<StdString, QoS>>; MAX_CONNECTIONS],
        acks: [VecDeque<Req>; MAX_CONNECTIONS],
    }

    const POOL: [&str; 16] = [
        "a",
        "a/b",
        "a/+",
        "a/#",
        "b/c",
        "#",
        "+/c",
        "deny/1",
        "deny/+",
        "c/d",
        "e",
        "f/+/g",
        "h",
        "i",
        "j",
        "$aws/things/t/#",
    ];
    const TOPICS: [&str; 9] = [
        "a",
        "a/b",
        "a/c",
        "b/c",
        "deny/1",
        "c/d",
        "f/x/g",
        "h",
        "$aws/things/t/x",
    ];

    #[derive(Clone, Debug)]
    struct Model {
        filters: BTreeSet<&'static str>,
        qos: QoS,
        is_virtual: bool,
        answered: bool,
    }

    fn check_invariants(r: &Router, model: &BTreeMap<SubId, Model>, b: &FakeBroker) {
        let mut texts = BTreeSet::new();
        let mut placed = [0usize; MAX_CONNECTIONS];
        for (i, e) in r.entries.iter().enumerate() {
            if !e.live {
                continue;
            }
            assert!(texts.insert(e.text.as_str()), "duplicate {}", e.text);
            let idx = u32::try_from(i).unwrap();
            let users = |qos: QoS, virt: bool| {
                r.subs
                    .iter()
                    .filter(|s| s.is_live() && s.is_virtual == virt && s.filters.contains(&idx))
                    .filter(|s| virt || s.qos == qos)
                    .count()
            };
            let counted = [
                usize::try_from(e.users[0]).unwrap(),
                usize::try_from(e.users[1]).unwrap(),
                usize::try_from(e.virtual_users).unwrap(),
            ];
            assert_eq!(
                counted,
                [users(Q0, false), users(Q1, false), users(Q0, true)],
                "{}",
                e.text
            );
            let model_users = model
                .iter()
                .filter(|(id, m)| !ended(r, **id) && m.filters.contains(e.text.as_str()))
                .count();
            assert_eq!(counted.iter().sum::<usize>(), model_users, "{}", e.text);
            assert_eq!(e.placed, e.broker_users() > 0 || e.broker != Broker::Absent);
            if e.placed {
                placed[e.link] += 1;
            }
            if e.broker_users() == 0 && e.virtual_users == 0 {
                // Only while the broker may still hold it.
                assert_ne!(e.broker, Broker::Absent, "{}", e.text);
            }
            if !r.links[e.link].up && e.placed {
                assert!(e.in_flight().is_none(), "in flight on a down link");
            }
        }
        for (l, link) in r.links.iter().enumerate() {
            let suspects = r
                .entries
                .iter()
                .filter(|e| e.on(l) && e.strikes > 0)
                .count();
            assert_eq!(link.suspects, suspects, "link {l}");
            if let Some(probe) = link.probe {
                let out: StdVec<_> = r
                    .entries
                    .iter()
                    .filter(|e| e.on(l) && e.in_flight().is_some())
                    .collect();
                assert_eq!(out.len(), 1, "a probe is alone on its link");
                assert!(matches!(out[0].broker, Broker::Subscribing { id, .. } if id == probe));
            }
            assert_eq!(link.filters, placed[l]);
            assert!(link.filters <= SUBSCRIPTIONS_PER_CONNECTION);
            assert_eq!(link.up, b.up[l]);
            // Every in-flight id is one request of one kind, of at most 8.
            let mut by_id: BTreeMap<u16, (bool, usize)> = BTreeMap::new();
            for e in r.entries.iter().filter(|e| e.on(l)) {
                if let Some(id) = e.in_flight() {
                    assert!(id >= IDS.first);
                    let sub = matches!(e.broker, Broker::Subscribing { .. });
                    let slot = by_id.entry(id).or_insert((sub, 0));
                    assert_eq!(slot.0, sub);
                    slot.1 += 1;
                    assert!(slot.1 <= MAX_FILTERS_PER_PACKET);
                }
            }
        }
        // The router's live subscriptions are the model's.
        let live: BTreeSet<SubId> = (0..r.subs.len())
            .filter(|&s| r.subs[s].is_live())
            .map(|s| r.id_of(s))
            .collect();
        let modelled: BTreeSet<SubId> = model.keys().copied().filter(|id| !ended(r, *id)).collect();
        assert_eq!(live, modelled);
        for (id, m) in model {
            if r.state(*id) == Some(SubState::Failed) {
                // Refused, not yet reported: it held a refused filter.
                assert!(!m.is_virtual && m.filters.iter().any(|f| f.starts_with("deny")));
                continue;
            }
            if ended(r, *id) {
                assert!(!m.is_virtual, "a virtual subscription is never quarantined");
                continue;
            }
            let s = &r.subs[usize::try_from(id.slot).unwrap()];
            let names: BTreeSet<&str> = s
                .filters
                .iter()
                .map(|&i| r.entry(i).unwrap().text.as_str())
                .collect();
            assert_eq!(names, m.filters);
            assert_eq!(s.answered, m.answered);
            assert_eq!((s.qos, s.is_virtual), (m.qos, m.is_virtual));
        }
    }

    /// Failed or quarantined, not yet reported.
    fn ended(r: &Router, id: SubId) -> bool {
        matches!(r.state(id), Some(SubState::Failed | SubState::Quarantined))
    }

    impl PartialOrd for SubId {
        fn partial_cmp(&self, other: &Self) -> Option<core::cmp::Ordering> {
            Some(self.cmp(other))
        }
    }

    impl Ord for SubId {
        fn cmp(&self, other: &Self) -> core::cmp::Ordering {
            (self.slot, self.generation).cmp(&(other.slot, other.generation))
        }
    }

    /// Sends one request on `link`: the broker applies it at once and its
    /// answer travels until `deliver`.
    fn send(r: &mut Router, b: &mut FakeBroker, link: usize) -> bool {
        let Some(req) = next(r, link) else {
            return false;
        };
        let session = b.session[link].get_or_insert_with(BTreeMap::new);
        for (f, qos) in &req.filters {
            match req.kind {
                RequestKind::Subscribe if !f.starts_with("deny") => {
                    session.insert(f.clone(), *qos);
                }
                RequestKind::Subscribe => {}
                RequestKind::Unsubscribe => {
                    session.remove(f);
                }
            }
        }
        b.acks[link].push_back(req);
        true
    }

    fn deliver(r: &mut Router, b: &mut FakeBroker, link: usize) -> bool {
        let Some(req) = b.acks[link].pop_front() else {
            return false;
        };
        let known = answer(r, link, &req, |f| f.starts_with("deny"));
        assert!(known, "{req:?}");
        true
    }

    fn take_all(
        r: &mut Router,
        model: &mut BTreeMap<SubId, Model>,
        seen: &mut BTreeMap<&'static str, usize>,
    ) {
        while let Some(s) = r.take_settled() {
            *seen
                .entry(match s.outcome {
                    Outcome::Accepted => "accepted",
                    Outcome::Refused => "refused",
                    Outcome::Dropped => "dropped",
                    Outcome::Quarantined => "quarantined",
                })
                .or_default() += 1;
            let m = model
                .get_mut(&s.id)
                .expect("a reported subscription is live");
            match s.outcome {
                Outcome::Accepted => {
                    assert!(!m.answered);
                    m.answered = true;
                }
                Outcome::Refused | Outcome::Dropped => {
                    assert_eq!(m.answered, s.outcome == Outcome::Dropped);
                    assert!(m.filters.iter().any(|f| f.starts_with("deny")));
                    model.remove(&s.id);
                }
                Outcome::Quarantined => {
                    model.remove(&s.id);
                }
            }
        }
    }

    fn link_up(r: &mut Router, b: &mut FakeBroker, rng: &mut XorShift, link: usize) {
        let present = b.session[link].is_some() && rng.chance(50);
        if !present {
            b.session[link] = Some(BTreeMap::new());
        }
        b.up[link] = true;
        r.link_up(link, present, Instant::default());
    }

    #[test]
    fn random_operations_keep_the_tables_consistent_with_the_broker() {
        let mut rng = XorShift::new(0x2545_F491_4F6C_DD1D);
        let mut outcomes = BTreeMap::<&str, usize>::new();
        for round in 0..60 {
            let mut r = Router::new();
            let mut b = FakeBroker::default();
            let mut model: BTreeMap<SubId, Model> = BTreeMap::new();
            for _ in 0..400 {
                let link = rng.below(MAX_CONNECTIONS);
                match rng.below(10) {
                    0 | 1 => {
                        let n = 1 + rng.below(4);
                        let filters: StdVec<&'static str> =
                            (0..n).map(|_| POOL[rng.below(POOL.len())]).collect();
                        let qos = if rng.chance(50) { Q0 } else { Q1 };
                        let is_virtual = rng.chance(10);
                        let before = (r.subscriptions(), r.filters(), link_filters(&r));
                        let dest = stream(u16::try_from(rng.below(4)).unwrap());
                        match r.subscribe(dest, &filters, qos, is_virtual) {
                            Ok(id) => {
                                *outcomes.entry("ok").or_default() += 1;
                                let m = Model {
                                    filters: filters.iter().copied().collect(),
                                    qos,
                                    is_virtual,
                                    answered: false,
                                };
                                assert!(model.insert(id, m).is_none());
                            }
                            Err(e) => {
                                *outcomes
                                    .entry(if e == SubscribeError::NoRoom {
                                        "noroom"
                                    } else {
                                        "full"
                                    })
                                    .or_default() += 1;
                                assert!(matches!(
                                    e,
                                    SubscribeError::NoRoom | SubscribeError::TableFull
                                ));
                                let after = (r.subscriptions(), r.filters(), link_filters(&r));
                                assert_eq!(before, after);
                            }
                        }
                    }
                    2 if !model.is_empty() => {
                        let id = *model.keys().nth(rng.below(model.len())).unwrap();
                        assert!(r.unsubscribe(id));
                        model.remove(&id);
                    }
                    3 if b.up[link] && rng.chance(30) => {
                        b.up[link] = false;
                        b.acks[link].clear();
                        let before = r.quarantined();
                        r.link_down(link);
                        if r.quarantined() > before {
                            // A real broker closes instead of granting a
                            // poison filter: it never holds one.
                            let kept = |f: &StdString| {
                                r.entries.iter().any(|e| {
                                    e.on(link) && e.text.as_str() == f && e.broker != Broker::Absent
                                })
                            };
                            if let Some(session) = b.session[link].as_mut() {
                                session.retain(|f, _| kept(f));
                            }
                        }
                    }
                    3 if !b.up[link] => link_up(&mut r, &mut b, &mut rng, link),
                    4..=6 if b.up[link] => {
                        send(&mut r, &mut b, link);
                    }
                    7 | 8 if b.up[link] => {
                        deliver(&mut r, &mut b, link);
                    }
                    9 => {
                        let topic = TOPICS[rng.below(TOPICS.len())];
                        let mut hits = StdVec::new();
                        r.route(topic, |id, _| hits.push(id));
                        let want: StdVec<SubId> = model
                            .iter()
                            .filter(|(id, m)| {
                                m.answered
                                    && r.state(**id) == Some(SubState::Active)
                                    && m.filters.iter().any(|f| matches(f, topic))
                            })
                            .map(|(id, _)| *id)
                            .collect();
                        hits.sort();
                        assert_eq!(hits, want, "{topic}");
                    }
                    _ => {}
                }
                if rng.chance(70) {
                    take_all(&mut r, &mut model, &mut outcomes);
                }
                check_invariants(&r, &model, &b);
            }

            // Quiesce: every link up, every request sent and answered.
            for link in 0..MAX_CONNECTIONS {
                if !b.up[link] {
                    link_up(&mut r, &mut b, &mut rng, link);
                }
            }
            loop {
                let mut busy = false;
                for link in 0..MAX_CONNECTIONS {
                    busy |= send(&mut r, &mut b, link);
                    busy |= deliver(&mut r, &mut b, link);
                }
                take_all(&mut r, &mut model, &mut outcomes);
                if !busy {
                    break;
                }
            }
            check_invariants(&r, &model, &b);
            for (id, m) in &model {
                assert_eq!(r.state(*id), Some(SubState::Active), "round {round}");
                assert!(m.answered);
                assert!(m.is_virtual || !m.filters.iter().any(|f| f.starts_with("deny")));
            }
            // The broker holds exactly the filters with broker users, each
            // at least at the QoS they want.
            for link in 0..MAX_CONNECTIONS {
                let held = b.session[link].clone().unwrap_or_default();
                let mut wanted = BTreeMap::new();
                for e in r.entries.iter().filter(|e| e.on(link)) {
                    assert!(e.broker_users() > 0, "{} owes nothing", e.text);
                    assert!(
                        matches!(e.broker, Broker::Granted(q) if q as u8 >= e.want() as u8),
                        "{}",
                        e.text
                    );
                    wanted.insert(StdString::from(e.text.as_str()), e.want());
                }
                assert_eq!(
                    held.keys().collect::<StdVec<_>>(),
                    wanted.keys().collect::<StdVec<_>>(),
                    "round {round} link {link}"
                );
                for (f, q) in &wanted {
                    assert!(held[f] as u8 >= *q as u8);
                }
                assert_eq!(r.link_wanted(link), link == 0 || !wanted.is_empty());
            }
        }
        // Both refusals and successes must have been exercised.
        assert!(outcomes["ok"] > 1_000, "{outcomes:?}");
        assert!(outcomes["noroom"] > 10, "{outcomes:?}");
        assert!(outcomes["full"] > 10, "{outcomes:?}");
        assert!(outcomes["accepted"] > 1_000, "{outcomes:?}");
        assert!(outcomes["refused"] > 10, "{outcomes:?}");
        assert!(outcomes["dropped"] > 10, "{outcomes:?}");
        assert!(outcomes["quarantined"] > 10, "{outcomes:?}");
    }
}
