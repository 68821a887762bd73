//! Seeded random-number streams, one per component, so that adding randomness to one component never shifts
//! another's sequence.

use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

/// Returns the seed of the stream `name` under the simulation seed `seed` (FNV-1a of the name mixed with the seed;
/// stable across platforms and releases).
pub fn stream_seed(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A deterministic random stream (ChaCha8).
#[derive(Debug, Clone)]
pub struct RngStream {
    rng: ChaCha8Rng,
}

impl RngStream {
    /// Creates the stream `name` of the simulation seeded with `seed`.
    pub fn new(seed: u64, name: &str) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(stream_seed(seed, name)),
        }
    }

    /// Returns the next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.rng.next_u64()
    }

    /// Returns a value uniformly drawn from `0..n` (Lemire's multiply-shift; `n` must be non-zero).
    ///
    /// # Panics
    /// Panics if `n` is zero.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0)");
        let wide = u128::from(self.next_u64()) * u128::from(n);
        u64::try_from(wide >> 64).expect("the high half of a u64*u64 product fits in u64")
    }

    /// Returns a value uniformly drawn from the inclusive range `[lo, hi]`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        match (hi - lo).checked_add(1) {
            Some(span) => lo + self.below(span),
            None => self.next_u64(),
        }
    }

    /// Returns a float uniformly drawn from `[0, 1)`.
    pub fn unit_f64(&mut self) -> f64 {
        const SCALE: f64 = 1.0 / 9_007_199_254_740_992.0; // 2^-53
        #[expect(
            clippy::cast_precision_loss,
            reason = "53 random bits map exactly onto f64"
        )]
        let v = (self.next_u64() >> 11) as f64;
        v * SCALE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_independent() {
        let mut a1 = RngStream::new(7, "a");
        let mut a2 = RngStream::new(7, "a");
        let mut b = RngStream::new(7, "b");
        let xs: Vec<u64> = (0..4).map(|_| a1.next_u64()).collect();
        let ys: Vec<u64> = (0..4).map(|_| a2.next_u64()).collect();
        let zs: Vec<u64> = (0..4).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs, zs);
    }

    #[test]
    fn between_stays_in_bounds() {
        let mut r = RngStream::new(1, "x");
        for _ in 0..1000 {
            let v = r.between(10, 12);
            assert!((10..=12).contains(&v));
        }
        assert_eq!(r.between(5, 5), 5);
    }
}
