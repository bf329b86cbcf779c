//! Pacing, as pure data: the reconnect backoff [iotcored-2].
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
/// The largest ceiling.
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
    rng: XorShift64,
    up_since: Option<Instant>,
}

impl Backoff {
    /// A backoff with no failures yet; `seed` feeds the jitter.
    pub fn new(seed: u64) -> Self {
        Self {
            failures: 0,
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
        // 2^6 * 2 s = 128 s is past BACKOFF_MAX already; cap the shift.
        let doubled = BACKOFF_FIRST_CEILING * (1u32 << self.failures.min(6));
        doubled.min(BACKOFF_MAX)
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
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

    #[test]
    fn failure_count_saturates_without_overflow() {
        let mut b = Backoff::new(3);
        b.failures = u32::MAX - 1;
        for _ in 0..3 {
            assert!(b.next_delay(Instant::from_secs(0)) <= BACKOFF_MAX);
        }
    }
}
