//! A seeded pseudo-random source for the randomized unit tests (model and
//! mutation tests), built on the backoff's generator.

use crate::limits::XorShift64;

/// Deterministic randomness for tests.
pub struct XorShift(XorShift64);

impl XorShift {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(XorShift64::new(seed))
    }

    /// The next value.
    pub fn next(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// A value in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n.max(1)).unwrap_or(1)).unwrap_or(0)
    }

    /// A random byte.
    pub fn byte(&mut self) -> u8 {
        self.next().to_le_bytes()[0]
    }

    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}
