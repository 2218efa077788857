//! Train/validation split by image.
//!
//! Splitting by caption would put other captions of a validation image in the training set, and
//! validation would then measure memory rather than generalisation. So whole images go to one side.

use std::collections::BTreeSet;

use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::types::Dataset;

/// Below this many images a split leaves too little on one side to mean anything: two or three
/// held-out photos make a validation loss of pure noise, and a model trained from scratch cannot
/// know what it never saw (the demo set's 10 images, the tutorial's 4).
pub const MIN_IMAGES_TO_SPLIT: usize = 20;

/// Pair indices of each side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    pub train: Vec<usize>,
    pub val: Vec<usize>,
    /// Why the split is not a real hold-out, when it is not.
    pub note: Option<String>,
}

impl Split {
    /// True when validation reuses the training pairs (a dataset too small to split).
    pub fn is_fallback(&self) -> bool {
        self.note.is_some()
    }
}

impl Dataset {
    /// Holds out `round(images × val_fraction)` images, chosen with `seed`, with all their captions.
    /// A dataset with fewer than [`MIN_IMAGES_TO_SPLIT`] images, or whose validation side would be
    /// empty (or everything), trains on every pair and validates on the same pairs, and says so
    /// in `note`. Pair indices on each side are in file order.
    pub fn split(&self, val_fraction: f64, seed: u64) -> Split {
        let used: BTreeSet<usize> = self.pairs.iter().map(|p| p.image).collect();
        let mut images: Vec<usize> = used.into_iter().collect();
        let n = images.len();
        let n_val = (n as f64 * val_fraction.clamp(0.0, 1.0)).round() as usize;
        let all: Vec<usize> = (0..self.pairs.len()).collect();
        let fallback = |why: String| Split {
            train: all.clone(),
            val: all.clone(),
            note: Some(format!(
                "{why}: training and validating on all {} pairs, so validation loss measures fit, not generalisation",
                all.len()
            )),
        };
        if n < MIN_IMAGES_TO_SPLIT {
            return fallback(format!(
                "only {n} images (fewer than {MIN_IMAGES_TO_SPLIT}) is too few to hold any out"
            ));
        }
        if n_val == 0 || n_val >= n {
            return fallback(format!(
                "a validation fraction of {val_fraction} of {n} images leaves one side empty"
            ));
        }
        images.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        let mut is_val = vec![false; self.images.len()];
        for &i in &images[..n_val] {
            is_val[i] = true;
        }
        let (val, train) = all.iter().partition(|&&p| is_val[self.pairs[p].image]);
        Split { train, val, note: None }
    }
}
