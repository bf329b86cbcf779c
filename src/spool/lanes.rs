//! The spool's lanes [bus-iso-5]: which lane a publishing process's
//! messages wait in, and the lists through the metadata ring.

use super::{Lane, QoS, Spool, State, NIL, NO_LANE};

impl Spool {
    /// The lane of process `pid`: its own if it has one, else a dedicated
    /// lane nobody is waiting in, else the shared one. A process whose
    /// messages may wait in the shared lane gets no lane of its own until
    /// that lane is empty, so its messages keep their order.
    ///
    /// Pid 0 (unknown) goes to the shared lane, except into an empty spool:
    /// there the message is the next to start whatever lane holds it, so it
    /// takes the first lane with the turn on it, and whatever its process
    /// pushes next cannot overtake it. (So the caller need not ask the
    /// kernel for the pid of a publish into an empty spool.)
    pub(super) fn lane_of(&mut self, pid: u32) -> usize {
        let shared = self.lanes.len() - 1;
        if pid == 0 {
            if self.live == 0 {
                self.turn = 0;
                return 0;
            }
            return shared;
        }
        let own = &self.lanes[..shared];
        if let Some(l) = own.iter().position(|l| l.pid == pid) {
            return l;
        }
        if self.lanes[shared].waiting > 0 {
            return shared;
        }
        match own.iter().position(|l| l.waiting == 0) {
            Some(l) => {
                self.lanes[l].pid = pid;
                l
            }
            None => shared,
        }
    }

    /// Appends the queued entry in `slot` to its lane.
    pub(super) fn enqueue(&mut self, slot: usize) {
        let e = self.meta[slot];
        let lane = &mut self.lanes[e.lane];
        let last = lane.last;
        lane.last = slot;
        if last == NIL {
            lane.first = slot;
        }
        lane.waiting += 1;
        lane.waiting_bytes += e.len;
        if e.qos == QoS::AtMostOnce {
            lane.qos0 += 1;
            lane.qos0_bytes += e.len;
        }
        if let Some(prev) = self.meta.get_mut(last) {
            prev.next = slot;
        }
        self.meta[slot].next = NIL;
    }

    /// Takes the oldest entry out of lane `l` (which has one).
    pub(super) fn dequeue(&mut self, l: usize) {
        let slot = self.lanes[l].first;
        self.unlink(l, NIL, slot);
    }

    /// Takes the entry in `slot`, which follows `prev` (`NIL`: first), out
    /// of lane `l`.
    pub(super) fn unlink(&mut self, l: usize, prev: usize, slot: usize) {
        let e = self.meta[slot];
        let lane = &mut self.lanes[l];
        if prev == NIL {
            lane.first = e.next;
        }
        if lane.last == slot {
            lane.last = prev;
        }
        lane.waiting -= 1;
        lane.waiting_bytes -= e.len;
        if e.qos == QoS::AtMostOnce {
            lane.qos0 -= 1;
            lane.qos0_bytes -= e.len;
        }
        if let Some(p) = self.meta.get_mut(prev) {
            p.next = e.next;
        }
        self.meta[slot].next = NIL;
    }

    /// Empties every lane's list (keeping whose it is) and puts the queued
    /// entries back in ring order: after a reset or a compaction.
    pub(super) fn rebuild_lanes(&mut self) {
        for lane in self.lanes.iter_mut() {
            *lane = Lane {
                pid: lane.pid,
                ..NO_LANE
            };
        }
        for i in 0..self.count {
            let slot = self.slot(i);
            let waits =
                self.meta[slot].state == State::Queued && !(self.current && slot == self.cur);
            if waits {
                self.enqueue(slot);
            }
        }
    }
}
