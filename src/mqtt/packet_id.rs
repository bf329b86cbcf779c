//! Packet identifiers [MQTT-2.3.1]: the id space split in two halves.
//!
//! One MQTT connection carries both the spool's QoS 1 PUBLISHes and the
//! router's SUBSCRIBEs and UNSUBSCRIBEs, and an id must not be reused while
//! a packet holding it is unacknowledged [MQTT-2.3.1-2]. The spool and the
//! router hand out ids on their own, so each gets its own half and the two
//! can never collide: publishes use 1..=32767, subscriptions
//! 32768..=65535. Id 0 is never used [MQTT-2.3.1-1].

/// A range of packet ids, handed out in turn and wrapping at its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Half {
    pub first: u16,
    pub last: u16,
}

impl Half {
    /// How many ids the half holds.
    pub const fn size(&self) -> usize {
        self.last as usize - self.first as usize + 1
    }

    /// Whether `id` is in the half.
    pub const fn contains(&self, id: u16) -> bool {
        self.first <= id && id <= self.last
    }

    /// The id to try after `id`: the next one, or `first` after `last`
    /// (and for any id outside the half).
    pub const fn after(&self, id: u16) -> u16 {
        if self.first <= id && id < self.last {
            id + 1
        } else {
            self.first
        }
    }
}

/// The ids of QoS 1 PUBLISH packets (the spool's).
pub const PUBLISH: Half = Half {
    first: 1,
    last: 32_767,
};

/// The ids of SUBSCRIBE and UNSUBSCRIBE packets (the router's).
pub const SUBSCRIBE: Half = Half {
    first: 32_768,
    last: u16::MAX,
};

// The halves cover every id but 0, without overlapping.
const _: () = assert!(PUBLISH.first == 1);
const _: () = assert!(PUBLISH.last + 1 == SUBSCRIBE.first);
const _: () = assert!(SUBSCRIBE.last == u16::MAX);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_halves_split_the_nonzero_ids_between_publishes_and_subscriptions() {
        assert_eq!(PUBLISH.size() + SUBSCRIBE.size(), 65_535);
        for id in 1..=u16::MAX {
            assert_ne!(PUBLISH.contains(id), SUBSCRIBE.contains(id), "{id}");
        }
        assert!(!PUBLISH.contains(0) && !SUBSCRIBE.contains(0));
    }

    #[test]
    fn ids_are_handed_out_in_turn_and_wrap_within_their_half() {
        assert_eq!(PUBLISH.after(1), 2);
        assert_eq!(PUBLISH.after(32_766), 32_767);
        assert_eq!(PUBLISH.after(32_767), 1);
        assert_eq!(PUBLISH.after(0), 1);
        assert_eq!(PUBLISH.after(40_000), 1);
        assert_eq!(SUBSCRIBE.after(32_768), 32_769);
        assert_eq!(SUBSCRIBE.after(u16::MAX), 32_768);
        assert_eq!(SUBSCRIBE.after(5), 32_768);
    }
}
