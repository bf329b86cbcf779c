//! Pacing, as pure data: the reconnect backoff [iotcored-2] and the publish
//! rate limit [iotcored-bus-publish-4].
//!
//! Nothing here reads the clock or the OS random source: `now` and the seed
//! are passed in, so every schedule is a plain unit test.

use core::time::Duration;

use crate::time::Instant;

/// The shortest wait before a reconnect. AWS IoT Core allows one CONNECT per
/// second per client id, so no two attempts of one connection are closer.
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// The ceiling of the first wait; each failure doubles the ceiling.
pub const BACKOFF_FIRST_CEILING: Duration = Duration::from_secs(2);
/// The largest ceiling by default (`--max-backoff`).
pub const BACKOFF_MAX: Duration = Duration::from_secs(120);
/// A connection that stayed up this long resets the backoff.
pub const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(60);

/// Exponential backoff with full jitter, floored at `BACKOFF_MIN`.
///
/// The n-th consecutive failure (n from 0) waits a uniformly random time in
/// `[BACKOFF_MIN, min(BACKOFF_MAX, BACKOFF_FIRST_CEILING * 2^n)]`: 1–2 s,
/// 1–4 s, 1–8 s, … up to 1–120 s. Full jitter spreads the reconnects of a
/// fleet of gateways that lost the same network at the same moment.
#[derive(Clone, Debug)]
pub struct Backoff {
    failures: u32,
    max: Duration,
    rng: XorShift64,
    up_since: Option<Instant>,
}

impl Backoff {
    /// A backoff with no failures yet; `seed` feeds the jitter.
    pub fn new(seed: u64) -> Self {
        Self::with_max(seed, BACKOFF_MAX)
    }

    /// A backoff whose ceiling stops growing at `max` (at least 1 s).
    pub fn with_max(seed: u64, max: Duration) -> Self {
        Self {
            failures: 0,
            max: max.max(BACKOFF_MIN),
            rng: XorShift64::new(seed),
            up_since: None,
        }
    }

    /// The connection came up at `now`.
    pub fn connected(&mut self, now: Instant) {
        self.up_since = Some(now);
    }

    /// The connection (or the attempt) ended at `now`: the wait before the
    /// next attempt. A connection that stayed up for `BACKOFF_RESET_AFTER`
    /// starts the sequence over.
    pub fn next_delay(&mut self, now: Instant) -> Duration {
        if let Some(up) = self.up_since.take() {
            if now.saturating_since(up) >= BACKOFF_RESET_AFTER {
                self.failures = 0;
            }
        }
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let span = ceiling.saturating_sub(BACKOFF_MIN).as_millis();
        let span = u64::try_from(span).unwrap_or(u64::MAX);
        let jitter = self.rng.next_u64() % span.saturating_add(1);
        BACKOFF_MIN + Duration::from_millis(jitter)
    }

    /// The current ceiling of the wait.
    pub fn ceiling(&self) -> Duration {
        // 2^11 * 2 s is past an hour, the largest `--max-backoff`.
        let doubled = BACKOFF_FIRST_CEILING * (1u32 << self.failures.min(11));
        doubled.min(self.max)
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// The window over which publishes are counted. AWS IoT Core's limits are
/// per second; 20 ms of guard keeps a window measured at the far end (after
/// network jitter has bunched packets together) within them too, at a cost
/// of 2 % of the rate.
pub const RATE_WINDOW: Duration = Duration::from_millis(1020);

/// The packet count is also limited per fifth of the window (25 per 204 ms
/// for AWS's 100/s, a quarter, so a late wake-up can be caught up). The
/// rate is the same, but a burst of 100 cannot leave at once: AWS counts at
/// its end, where network jitter can push a burst into the next second and
/// discard what exceeds 100 there. Bytes are paced the same way, a quarter
/// of the budget per fifth of the window (a packet larger than that goes
/// alone in an empty fifth), so that a whole window's bytes never leave in
/// one burst that queues downstream and arrives together with the next.
const RATE_SUBWINDOWS: usize = 5;
const RATE_SUBWINDOWS_U32: u32 = 5;

/// Slots of the window when the packet count is unlimited (only bytes are).
const UNLIMITED_COUNT_SLOTS: usize = 1024;

/// An exact sliding-window limiter: no window of `RATE_WINDOW` holds more
/// than `max_count` packets or more than `max_bytes` bytes
/// [iotcored-bus-publish-4.2] [iotcored-bus-publish-4.3].
///
/// It remembers the time and size of each send still inside the window, in
/// a ring of `max_count` slots allocated once. (A token bucket with a burst
/// of N lets 2N through across a window boundary; this does not.) Bytes are
/// counted as whole PUBLISH packets: fixed header, topic, packet id and
/// payload. `max_count` 0 means the count is unlimited: bytes are then
/// counted over the last 1024 packets of the window (exact whenever packets
/// average at least `max_bytes / 1024` bytes). `max_bytes` 0 means bytes
/// are unlimited; both 0, the limiter does nothing.
#[derive(Debug)]
pub struct RateLimiter {
    sends: Box<[(Instant, u32)]>,
    head: usize,
    len: usize,
    bytes: u64,
    max_count: usize,
    /// False when the count is unlimited (the ring's size is not a limit
    /// to pace by).
    count_limited: bool,
    max_bytes: u64,
}

impl RateLimiter {
    /// A limiter of `max_count` packets and `max_bytes` bytes per window
    /// (0 = unlimited for either).
    pub fn new(max_count: usize, max_bytes: u64) -> Self {
        let slots = if max_count == 0 {
            UNLIMITED_COUNT_SLOTS
        } else {
            max_count
        };
        Self {
            sends: vec![(Instant::default(), 0); slots].into_boxed_slice(),
            head: 0,
            len: 0,
            bytes: 0,
            max_count: slots,
            count_limited: max_count > 0,
            max_bytes,
        }
    }

    fn entry(&self, i: usize) -> (Instant, u32) {
        self.sends[(self.head + i) % self.sends.len()]
    }

    /// Forgets the sends that left the window by `now`.
    fn expire(&mut self, now: Instant) {
        while self.len > 0 {
            let (t, n) = self.entry(0);
            if t + RATE_WINDOW > now {
                break;
            }
            self.head = (self.head + 1) % self.sends.len();
            self.len -= 1;
            self.bytes -= u64::from(n);
        }
    }

    /// The earliest time a packet of `len` bytes may be sent: `now` if at
    /// once.
    pub fn ready_at(&mut self, now: Instant, len: usize) -> Instant {
        if !self.count_limited && self.max_bytes == 0 {
            return now;
        }
        self.expire(now);
        let mut ready = now;
        // Count: the oldest sends must leave until one slot is free.
        if self.count_limited && self.len >= self.max_count {
            let (t, _) = self.entry(self.len - self.max_count);
            ready = ready.max(t + RATE_WINDOW);
        }
        // Count, paced: at most a quarter of it in any fifth of the window
        // (the quarter leaves room to catch up after a late wake-up).
        let sub_cap = self.max_count.div_ceil(RATE_SUBWINDOWS - 1);
        if self.count_limited && self.len >= sub_cap {
            let (t, _) = self.entry(self.len - sub_cap);
            ready = ready.max(t + RATE_WINDOW / RATE_SUBWINDOWS_U32);
        }
        // Bytes, paced: a quarter of the budget in any fifth of the window.
        if self.max_bytes > 0 {
            let fifth = RATE_WINDOW / RATE_SUBWINDOWS_U32;
            let cap = self.max_bytes.div_ceil(RATE_SUBWINDOWS as u64 - 1);
            let len = u64::try_from(len).unwrap_or(u64::MAX).min(cap);
            // The sends of the last fifth: from `first` on.
            let mut first = self.len;
            let mut recent = 0u64;
            while first > 0 {
                let (t, n) = self.entry(first - 1);
                if t + fifth <= now {
                    break;
                }
                recent += u64::from(n);
                first -= 1;
            }
            let mut excess = (recent + len).saturating_sub(cap);
            let mut i = first;
            while excess > 0 && i < self.len {
                let (t, n) = self.entry(i);
                excess = excess.saturating_sub(u64::from(n));
                ready = ready.max(t + fifth);
                i += 1;
            }
        }
        // Bytes: the oldest sends must leave until this one fits (a packet
        // larger than the whole budget goes alone in an empty window).
        if self.max_bytes > 0 {
            let len = u64::try_from(len).unwrap_or(u64::MAX).min(self.max_bytes);
            let mut excess = (self.bytes + len).saturating_sub(self.max_bytes);
            let mut i = 0;
            while excess > 0 && i < self.len {
                let (t, n) = self.entry(i);
                excess = excess.saturating_sub(u64::from(n));
                ready = ready.max(t + RATE_WINDOW);
                i += 1;
            }
        }
        ready
    }

    /// Records a packet of `len` bytes sent at `now` (after `ready_at`
    /// allowed it).
    pub fn record(&mut self, now: Instant, len: usize) {
        if !self.count_limited && self.max_bytes == 0 {
            return;
        }
        self.expire(now);
        let n = u32::try_from(len).unwrap_or(u32::MAX);
        if self.len == self.sends.len() {
            // With the count unlimited (or a caller that ignored
            // `ready_at`): the oldest send leaves the ring early.
            let (_, old) = self.entry(0);
            self.bytes -= u64::from(old);
            self.head = (self.head + 1) % self.sends.len();
            self.len -= 1;
        }
        let slot = (self.head + self.len) % self.sends.len();
        self.sends[slot] = (now, n);
        self.len += 1;
        self.bytes += u64::from(n);
    }

    /// Packets and bytes inside the window at `now`.
    pub fn in_window(&mut self, now: Instant) -> (usize, u64) {
        self.expire(now);
        (self.len, self.bytes)
    }
}

/// A small PRNG for jitter (Marsaglia xorshift64). Not for secrets.
#[derive(Clone, Debug)]
pub struct XorShift64(u64);

impl XorShift64 {
    /// A generator from `seed` (zero is replaced, since it is a fixed point).
    pub fn new(seed: u64) -> Self {
        Self(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    /// The next pseudo-random value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_from_one_to_two_seconds_up_to_two_minutes() {
        let mut b = Backoff::new(42);
        let now = Instant::from_secs(100);
        let expected_ceilings = [2, 4, 8, 16, 32, 64, 120, 120, 120];
        for ceiling in expected_ceilings {
            assert_eq!(b.ceiling(), Duration::from_secs(ceiling));
            let d = b.next_delay(now);
            assert!(d >= BACKOFF_MIN, "{d:?} under the 1 s floor");
            assert!(d <= Duration::from_secs(ceiling), "{d:?} over {ceiling} s");
        }
    }

    #[test]
    fn jitter_spreads_waits_over_the_whole_range() {
        // Many generators, one failure each: the first wait covers 1-2 s.
        let (mut low, mut high) = (false, false);
        for seed in 1..200 {
            let d = Backoff::new(seed * 7919).next_delay(Instant::from_secs(0));
            low |= d < Duration::from_millis(1250);
            high |= d > Duration::from_millis(1750);
        }
        assert!(low && high, "jitter should reach both ends of 1-2 s");
    }

    #[test]
    fn a_connection_that_stayed_up_resets_the_sequence() {
        let mut b = Backoff::new(1);
        for _ in 0..5 {
            b.next_delay(Instant::from_secs(0));
        }
        assert_eq!(b.ceiling(), Duration::from_secs(64));
        b.connected(Instant::from_secs(10));
        b.next_delay(Instant::from_secs(10) + BACKOFF_RESET_AFTER);
        assert_eq!(
            b.ceiling(),
            Duration::from_secs(4),
            "reset, then one failure"
        );
    }

    #[test]
    fn a_connection_that_dropped_quickly_keeps_backing_off() {
        let mut b = Backoff::new(1);
        for _ in 0..3 {
            b.next_delay(Instant::from_secs(0));
        }
        b.connected(Instant::from_secs(10));
        b.next_delay(Instant::from_secs(15));
        assert_eq!(b.ceiling(), Duration::from_secs(32));
        assert_eq!(b.failures(), 4);
    }

    /// Sends as fast as the limiter allows from `start` for `secs` seconds,
    /// `len` bytes each; returns the send times.
    fn saturate(r: &mut RateLimiter, start: u64, secs: u64, len: usize) -> std::vec::Vec<u64> {
        let mut now = Instant::from_millis(start);
        let end = Instant::from_millis(start + secs * 1000);
        let mut sent = std::vec::Vec::new();
        while now < end {
            let at = r.ready_at(now, len);
            if at > now {
                now = at;
                continue;
            }
            r.record(now, len);
            sent.push(now.millis());
        }
        sent
    }

    /// The most sends in any window of `RATE_WINDOW`, and in any 1 s.
    fn max_in_window(times: &[u64], window_ms: u64) -> usize {
        let mut best = 0;
        let mut lo = 0;
        for hi in 0..times.len() {
            while times[hi] - times[lo] >= window_ms {
                lo += 1;
            }
            best = best.max(hi - lo + 1);
        }
        best
    }

    #[test]
    fn no_window_ever_holds_more_than_the_packet_limit() {
        // [iotcored-bus-publish-4.2] A token bucket would allow 200 across
        // a boundary; the sliding window allows exactly 100.
        let mut r = RateLimiter::new(100, 0);
        let times = saturate(&mut r, 5_000, 60, 10);
        assert_eq!(max_in_window(&times, 1_020), 100);
        assert_eq!(max_in_window(&times, 1_000), 100);
        // As close to the limit as the guard allows: 100 per 1.02 s.
        let rate = times.len() as f64 / 60.0;
        assert!(rate >= 0.97 * 100.0, "{rate}/s");
    }

    #[test]
    fn a_burst_is_paced_over_the_window_in_fifths() {
        let mut r = RateLimiter::new(100, 0);
        let times = saturate(&mut r, 0, 20, 10);
        assert_eq!(max_in_window(&times, 204), 25);
        assert_eq!(max_in_window(&times, 1_020), 100);
        assert!(times.len() as f64 / 20.0 >= 97.0, "{}", times.len());
    }

    #[test]
    fn no_window_ever_holds_more_than_the_byte_limit() {
        // [iotcored-bus-publish-4.3] 10 KiB packets against 512 KiB/s: the
        // byte limit binds (51 per window), not the count.
        let mut r = RateLimiter::new(100, 512 * 1024);
        let times = saturate(&mut r, 0, 30, 10 * 1024);
        let per_window = max_in_window(&times, 1_020);
        assert!(per_window * 10 * 1024 <= 512 * 1024, "{per_window}");
        assert_eq!(per_window, 51);
        // Paced: no fifth of the window holds more than a quarter of the
        // budget (12 packets of 10 KiB).
        assert_eq!(max_in_window(&times, 204), 12);
        let bytes_per_sec = times.len() as f64 * 10.0 * 1024.0 / 30.0;
        assert!(
            bytes_per_sec >= 0.95 * 512.0 * 1024.0 * 1000.0 / 1020.0,
            "{bytes_per_sec}"
        );
    }

    #[test]
    fn a_quiet_limiter_lets_a_quarter_of_the_limit_through_at_once() {
        let mut r = RateLimiter::new(100, 512 * 1024);
        let now = Instant::from_secs(10);
        for _ in 0..25 {
            assert_eq!(r.ready_at(now, 100), now);
            r.record(now, 100);
        }
        let fifth = RATE_WINDOW / 5;
        assert_eq!(r.ready_at(now, 100), now + fifth, "the 26th waits a fifth");
        assert_eq!(r.in_window(now), (25, 2_500));
        assert_eq!(r.in_window(now + RATE_WINDOW), (0, 0));
    }

    #[test]
    fn a_packet_larger_than_the_byte_budget_goes_alone_in_an_empty_window() {
        let mut r = RateLimiter::new(0, 1_000);
        let now = Instant::from_secs(1);
        assert_eq!(r.ready_at(now, 5_000), now);
        r.record(now, 5_000);
        assert_eq!(r.ready_at(now, 1), now + RATE_WINDOW);
    }

    #[test]
    fn unlimited_settings_never_wait() {
        let mut r = RateLimiter::new(0, 0);
        let now = Instant::from_secs(1);
        for _ in 0..10 * UNLIMITED_COUNT_SLOTS {
            assert_eq!(r.ready_at(now, 1_000_000), now);
            r.record(now, 1_000_000);
        }
    }

    #[test]
    fn an_unlimited_count_is_not_capped_by_the_ring() {
        // Bytes limited, count not: 10,000 tiny packets in one window.
        let mut r = RateLimiter::new(0, 512 * 1024);
        let now = Instant::from_secs(1);
        for _ in 0..10_000 {
            assert_eq!(r.ready_at(now, 20), now);
            r.record(now, 20);
        }
    }

    #[test]
    fn a_smaller_maximum_caps_the_waits() {
        let mut b = Backoff::with_max(9, Duration::from_secs(2));
        for _ in 0..20 {
            assert!(b.next_delay(Instant::from_secs(0)) <= Duration::from_secs(2));
        }
        assert_eq!(b.ceiling(), Duration::from_secs(2));
    }

    #[test]
    fn failure_count_saturates_without_overflow() {
        let mut b = Backoff::new(3);
        b.failures = u32::MAX - 1;
        for _ in 0..3 {
            assert!(b.next_delay(Instant::from_secs(0)) <= BACKOFF_MAX);
        }
    }
}
