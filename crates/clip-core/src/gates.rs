//! What "the model learned" means in numbers: stage 4's final gate.
//!
//! A gate that cannot fail teaches nothing, so every threshold here is set against what a model
//! that learned nothing scores: a model whose towers give the same output for every input (all
//! similarities tied), or untrained weights (a random ranking). Each is measured on the training
//! pairs (an evenly spaced sample of at most [`MAX_RECALL_PAIRS`]) of the best model.
//!
//! - Class folders: zero-shot accuracy must reach halfway from chance to 1. Chance is the share of
//!   the most common class, what always answering one class scores (1/classes when balanced).
//! - Captions, up to [`SMALL_DATASET`] images: every image ranks one of its own captions first and
//!   every caption its own image (a few dozen pairs are easy to learn).
//! - Captions, more images: recall@[`RECALL_K`] both ways must reach [`TIMES_CHANCE`] times what a
//!   random ranking of the same sample scores (capped at halfway from chance to 1).

use anyhow::Result;
use serde::Serialize;

use crate::data::Dataset;
use crate::fit::{Trainer, Validation, MAX_RECALL_PAIRS};
use crate::retrieval::Recall;

/// Datasets up to this many images must be learned perfectly (retrieval on the training pairs).
pub const SMALL_DATASET: usize = 64;
/// Recall is judged at this rank on larger datasets: one hit in a thousand images is noise, ten
/// candidates out of thousands is a real ranking.
pub const RECALL_K: usize = 10;
/// How far above a random ranking recall@K must be on larger datasets.
pub const TIMES_CHANCE: f64 = 5.0;

/// One judged number.
#[derive(Debug, Clone, Serialize)]
pub struct Gate {
    /// `zero-shot` or `retrieval`.
    pub name: &'static str,
    pub passed: bool,
    /// What was measured, against what, and (when it failed) what to try.
    pub detail: String,
    /// The measured value, chance and the threshold (for retrieval: the weaker direction's
    /// value, the stricter direction's chance and threshold; the detail gives both).
    pub value: f64,
    pub chance: f64,
    pub threshold: f64,
}

/// Halfway from `chance` to 1.
pub fn halfway(chance: f64) -> f64 {
    chance + 0.5 * (1.0 - chance)
}

/// The retrieval threshold for a chance level: [`TIMES_CHANCE`]× chance, at most halfway to 1.
pub fn recall_threshold(chance: f64) -> f64 {
    (TIMES_CHANCE * chance).min(halfway(chance))
}

/// The evenly spaced sample the recall and zero-shot figures of [`Trainer`] are computed on.
fn sample(pairs: &[usize]) -> Vec<usize> {
    let step = pairs.len().div_ceil(MAX_RECALL_PAIRS).max(1);
    pairs.iter().copied().step_by(step).collect()
}

/// The accuracy of always answering the most common class among the labelled `pairs`' sample.
pub fn zero_shot_chance(ds: &Dataset, pairs: &[usize]) -> f64 {
    let mut counts = vec![0usize; ds.labels.len()];
    let mut n = 0;
    for p in sample(pairs) {
        if let Some(l) = ds.pairs[p].label {
            counts[l] += 1;
            n += 1;
        }
    }
    counts.iter().copied().max().unwrap_or(0) as f64 / n.max(1) as f64
}

/// Recall@`k` (image → text, text → image) of a random ranking, for captions that belong to
/// `text_image[j]` among `text_image.iter().max() + 1` images.
pub fn recall_chance(text_image: &[usize], k: usize) -> (f64, f64) {
    let n = text_image.iter().max().map_or(0, |&m| m + 1);
    let m = text_image.len();
    if n == 0 {
        return (0.0, 0.0);
    }
    let mut per_image = vec![0usize; n];
    for &i in text_image {
        per_image[i] += 1;
    }
    // An image is found when one of its c captions is among the k best of m: 1 − C(m−c, k)/C(m, k).
    let i2t = per_image
        .iter()
        .map(|&c| {
            let miss: f64 = (0..k.min(m))
                .map(|j| (m - c).saturating_sub(j) as f64 / (m - j) as f64)
                .product();
            1.0 - miss
        })
        .sum::<f64>()
        / n as f64;
    let t2i = k.min(n) as f64 / n as f64;
    (i2t, t2i)
}

/// The image of each caption in the sample [`Trainer::recall`] ranks, numbered as it numbers them.
fn recall_text_image(ds: &Dataset, pairs: &[usize]) -> Vec<usize> {
    let s = sample(pairs);
    let mut images: Vec<usize> = s.iter().map(|&p| ds.pairs[p].image).collect();
    images.sort_unstable();
    images.dedup();
    s.iter()
        .map(|&p| images.binary_search(&ds.pairs[p].image).unwrap_or(0))
        .collect()
}

/// Judges zero-shot accuracy against chance (see the module's notes).
pub fn judge_zero_shot(accuracy: f64, chance: f64, on: &str) -> Gate {
    let threshold = halfway(chance);
    let passed = accuracy.is_finite() && accuracy >= threshold;
    Gate {
        name: "zero-shot",
        passed,
        detail: format!(
            "accuracy {accuracy:.3} on {on}, needs ≥ {threshold:.3} (halfway from chance, {chance:.3}, to 1){}",
            if passed {
                ""
            } else {
                " — the model barely tells the classes apart: train longer, raise the learning rates, or check stage 3"
            }
        ),
        value: accuracy,
        chance,
        threshold,
    }
}

/// Judges recall on the training pairs: perfect R@1 for [`SMALL_DATASET`] images or fewer, else
/// R@[`RECALL_K`] against a random ranking of the same sample.
pub fn judge_retrieval(r: &Recall, text_image: &[usize], on: &str) -> Gate {
    let n = text_image.iter().max().map_or(0, |&m| m + 1);
    if n <= SMALL_DATASET {
        let value = r.i2t_r1.min(r.t2i_r1);
        let passed = value == 1.0;
        return Gate {
            name: "retrieval",
            passed,
            detail: format!(
                "on {on}: R@1 image→text {:.3}, text→image {:.3}, needs 1 both ways{}",
                r.i2t_r1,
                r.t2i_r1,
                if passed {
                    ""
                } else {
                    " — a small dataset should be learned perfectly: train longer or raise the learning rates"
                }
            ),
            value,
            chance: recall_chance(text_image, 1).1,
            threshold: 1.0,
        };
    }
    let (ci, ct) = recall_chance(text_image, RECALL_K);
    let (ti, tt) = (recall_threshold(ci), recall_threshold(ct));
    let passed = r.i2t_r10 >= ti && r.t2i_r10 >= tt;
    Gate {
        name: "retrieval",
        passed,
        detail: format!(
            "on {on} ({n} images): R@{RECALL_K} image→text {:.3} (chance {ci:.3}, needs ≥ {ti:.3}), text→image {:.3} (chance {ct:.3}, needs ≥ {tt:.3}); R@1 {:.3} / {:.3}{}",
            r.i2t_r10,
            r.t2i_r10,
            r.i2t_r1,
            r.t2i_r1,
            if passed {
                ""
            } else {
                " — ranking barely better than chance: train longer, raise the learning rates, or check stage 3"
            }
        ),
        value: r.i2t_r10.min(r.t2i_r10),
        chance: ci.max(ct),
        threshold: ti.max(tt),
    }
}

/// Stage 4's gate on the trainer's current model (call [`Trainer::load_best`] first to judge the
/// best one): zero-shot accuracy for class folders, retrieval for captions.
pub fn learned(t: &Trainer) -> Result<Gate> {
    let train = &t.data().split.train;
    let ds = &t.data().dataset;
    let n = train.len();
    let on = if n > MAX_RECALL_PAIRS {
        format!("a sample of {MAX_RECALL_PAIRS} of the {n} training pairs")
    } else {
        format!("all {n} training pairs")
    };
    if let Some(acc) = t.zero_shot(train)? {
        return Ok(judge_zero_shot(acc, zero_shot_chance(ds, train), &on));
    }
    let r = t.recall(train)?;
    Ok(judge_retrieval(&r, &recall_text_image(ds, train), &on))
}

/// A fine-tune's gate: the final model against the untouched checkpoint it started from, on the
/// validation split, by [`Validation::quality`] (zero-shot accuracy, or mean recall@1). It fails
/// when fine-tuning made the model worse, which is what "forgetting" looks like on the user's
/// own data.
pub fn not_below_start(start: &Validation, last: &Validation) -> Gate {
    let (q0, q1) = (start.quality(), last.quality());
    let what = if start.zero_shot.is_some() {
        "zero-shot accuracy"
    } else {
        "mean recall@1"
    };
    let passed = q1 >= q0;
    Gate {
        name: "not below the start",
        passed,
        detail: if passed {
            format!(
                "{what} {q0:.3} (checkpoint) → {q1:.3} (final), validation loss {:.4} → {:.4}",
                start.loss, last.loss
            )
        } else {
            format!(
                "{what} fell from {q0:.3} (checkpoint) to {q1:.3} (final): the fine-tune lost more than it learned — lower the learning rates, train fewer epochs, lock most of a tower (--lock-image --unlocked-layers 2), or blend with the checkpoint (--wise-ft 0:1:0.1)"
            )
        },
        value: q1,
        chance: q0,
        threshold: q0,
    }
}

/// A distillation's gate: the student's top-1 agreement with the teacher on validation must end
/// above where it started (the student learned to answer as the teacher does).
pub fn agreement_rose(start: f64, end: f64) -> Gate {
    let passed = end > start;
    Gate {
        name: "agreement with the teacher",
        passed,
        detail: if passed {
            format!("top-1 agreement with the teacher on validation {start:.3} (start) → {end:.3} (best model)")
        } else {
            format!(
                "top-1 agreement with the teacher on validation did not rise: {start:.3} (start) → {end:.3} (best model) — train longer, raise the learning rates, or weigh the teacher's terms more (distill.feature, distill.affinity)"
            )
        },
        value: end,
        chance: start,
        threshold: start,
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_fine_tune_below_its_start_fails_and_says_what_to_try() {
        let v = |loss: f64, i2t: f64, t2i: f64| Validation {
            loss,
            recall: crate::retrieval::Recall {
                i2t_r1: i2t,
                t2i_r1: t2i,
                ..Default::default()
            },
            zero_shot: None,
        };
        let start = v(2.0, 0.5, 0.5);
        let g = not_below_start(&start, &v(1.5, 0.6, 0.5));
        assert!(g.passed, "{}", g.detail);
        assert!(g.detail.contains("0.500 (checkpoint) → 0.550"), "{}", g.detail);
        let g = not_below_start(&start, &v(1.5, 0.5, 0.4));
        assert!(!g.passed);
        assert!(
            g.detail.contains("fell from 0.500") && g.detail.contains("--wise-ft"),
            "{}",
            g.detail
        );
        // Class folders: zero-shot accuracy decides.
        let zs = |a| Validation {
            zero_shot: Some(a),
            ..start
        };
        assert!(!not_below_start(&zs(0.8), &zs(0.7)).passed);
        assert!(not_below_start(&zs(0.7), &zs(0.7)).passed);
    }

    use super::*;

    /// A model whose towers give one output for every input: all similarities tie.
    fn constant(n_img: usize, text_image: &[usize]) -> Recall {
        Recall::compute(&vec![vec![0.25; text_image.len()]; n_img], text_image)
    }

    #[test]
    fn the_retrieval_threshold_is_five_times_chance_capped_at_halfway() {
        // Text → image recall@10 over n images: chance 10/n. From 90 images on, 5× chance is
        // the threshold (exactly equal at 90); below, 5× chance would pass halfway to 1, and
        // halfway is used.
        for n in [65usize, 80, 89] {
            let chance = RECALL_K as f64 / n as f64;
            assert!(TIMES_CHANCE * chance > halfway(chance));
            assert_eq!(recall_threshold(chance), halfway(chance), "{n}");
        }
        for n in [91usize, 200, 5000] {
            let chance = RECALL_K as f64 / n as f64;
            assert_eq!(recall_threshold(chance), TIMES_CHANCE * chance, "{n}");
        }
    }

    #[test]
    fn a_constant_model_fails_retrieval_small_and_large() {
        for (n, per) in [(10, 3), (64, 1), (65, 1), (300, 5), (2000, 1)] {
            let text_image: Vec<usize> = (0..n * per).map(|j| j / per).collect();
            let g = judge_retrieval(&constant(n, &text_image), &text_image, "test");
            assert!(!g.passed, "{n} images: {}", g.detail);
        }
    }

    #[test]
    fn a_random_ranking_fails_and_a_good_one_passes() {
        let n = 500;
        let text_image: Vec<usize> = (0..n).collect();
        // Scores from a fixed pseudo-random sequence: a ranking that learned nothing.
        let mut x = 1u64;
        let mut rnd = || {
            x = crate::rng::mix(x, 7);
            (x >> 40) as f32
        };
        let random: Vec<Vec<f32>> = (0..n).map(|_| (0..n).map(|_| rnd()).collect()).collect();
        let g = judge_retrieval(&Recall::compute(&random, &text_image), &text_image, "test");
        assert!(!g.passed, "{}", g.detail);
        assert!((g.chance - 10.0 / 500.0).abs() < 1e-9, "{}", g.chance);
        // Each caption's own image ranked first for 30 % of them, the rest random: passes.
        let good: Vec<Vec<f32>> = random
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let mut r = row.clone();
                if i % 10 < 3 {
                    r[i] = f32::MAX;
                }
                r
            })
            .collect();
        let g = judge_retrieval(&Recall::compute(&good, &text_image), &text_image, "test");
        assert!(g.passed, "{}", g.detail);
    }

    #[test]
    fn recall_chance_matches_counting() {
        // 4 images, 2 captions each; k = 1: a caption is its image's with probability 2/8.
        let ti = [0, 0, 1, 1, 2, 2, 3, 3];
        let (i2t, t2i) = recall_chance(&ti, 1);
        assert!((i2t - 0.25).abs() < 1e-12 && (t2i - 0.25).abs() < 1e-12);
        // k = 2: 1 − (6/8)(5/7).
        let (i2t, _) = recall_chance(&ti, 2);
        assert!((i2t - (1.0 - 30.0 / 56.0)).abs() < 1e-12);
    }

    #[test]
    fn zero_shot_needs_halfway_from_the_majority_class() {
        assert!(!judge_zero_shot(0.1, 0.1, "t").passed);
        assert!(!judge_zero_shot(0.5, 0.1, "t").passed);
        assert!(judge_zero_shot(0.55, 0.1, "t").passed);
        assert!(
            !judge_zero_shot(0.8, 0.7, "t").passed,
            "always answering the 70 % class is not learning"
        );
        assert!(!judge_zero_shot(f64::NAN, 0.1, "t").passed);
    }
}
