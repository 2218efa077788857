//! Seeds for every random choice, derived rather than drawn, so runs repeat exactly.
//!
//! One generator for the whole library: SplitMix64's finaliser turns a seed and a counter (an
//! epoch, a step, an image's position in a batch) into a well-spread, independent seed. Resuming
//! a run at step N derives the same seeds an uninterrupted run would have.

/// SplitMix64: the `n`-th seed derived from `seed`. Consecutive `n` give decorrelated values.
pub fn mix(seed: u64, n: u64) -> u64 {
    let mut z = seed ^ n.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::mix;

    #[test]
    fn distinct_and_repeatable() {
        let a: Vec<u64> = (0..1000).map(|n| mix(42, n)).collect();
        let b: Vec<u64> = (0..1000).map(|n| mix(42, n)).collect();
        assert_eq!(a, b);
        let mut sorted = a.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), a.len(), "collisions among 1000 derived seeds");
        assert_ne!(mix(42, 0), mix(43, 0));
    }
}
