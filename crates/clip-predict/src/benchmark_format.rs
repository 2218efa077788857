//! Results as CLIP_benchmark writes them (LAION-AI/CLIP_benchmark, `clip_benchmark eval
//! --output`): `dataset`, `model`, `pretrained`, `task` and `metrics`, so a clipmine model's
//! numbers drop into the tables people already compare (open_clip's results, the
//! CLIP_benchmark leaderboards). `eval --json` adds these fields to its own.
//!
//! - Zero-shot classification (`zeroshot_classification`): `acc1`, `acc5` (null under 5 classes,
//!   where CLIP_benchmark writes NaN, which JSON cannot hold) and `mean_per_class_recall` (the
//!   mean over the classes with images of each one's accuracy: scikit-learn's balanced accuracy,
//!   which CLIP_benchmark calls).
//! - Retrieval (`zeroshot_retrieval`): `image_retrieval_recall@k` — per caption, whether its image
//!   is among the k nearest images — and `text_retrieval_recall@k` — per image, whether one of its
//!   captions is among the k nearest captions — for k = 1, 5, 10 (CLIP_benchmark's default is 5).

use std::path::Path;

use clip_core::retrieval::Recall;
use serde_json::{json, Map, Value};

use crate::ModelChoice;

/// The fields CLIP_benchmark writes around `metrics`: the dataset (the data folder's name), the
/// model (its config's name: an architecture or a clipmine preset) and its weights (the run
/// folder or the checkpoint it was given).
pub(crate) fn result(
    data: &Path,
    config_name: &str,
    choice: &ModelChoice,
    task: &str,
    metrics: Value,
) -> Map<String, Value> {
    let dataset = data
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| data.display().to_string());
    let pretrained = match (&choice.run, &choice.model) {
        (Some(run), _) => run.display().to_string(),
        (None, Some(model)) => model.clone(),
        (None, None) => String::new(),
    };
    let mut m = Map::new();
    m.insert("dataset".into(), json!(dataset));
    m.insert("model".into(), json!(config_name));
    m.insert("pretrained".into(), json!(pretrained));
    m.insert("task".into(), json!(task));
    m.insert("metrics".into(), metrics);
    m
}

/// `acc1`, `acc5` and `mean_per_class_recall` of a zero-shot classification: `confusion[true][predicted]`
/// counts, and how many images had their class among the 5 best.
pub(crate) fn classification(confusion: &[Vec<usize>], top5_hits: usize) -> Value {
    let images: usize = confusion.iter().flatten().sum();
    let correct: usize = confusion.iter().enumerate().map(|(i, r)| r[i]).sum();
    let recalls: Vec<f64> = confusion
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let n: usize = r.iter().sum();
            (n > 0).then(|| r[i] as f64 / n as f64)
        })
        .collect();
    let share = |k: usize| k as f64 / images.max(1) as f64;
    json!({
        "acc1": share(correct),
        "acc5": (confusion.len() >= 5).then(|| share(top5_hits)),
        "mean_per_class_recall": recalls.iter().sum::<f64>() / recalls.len().max(1) as f64,
    })
}

/// CLIP_benchmark's retrieval metrics for k = 1, 5 and 10.
pub(crate) fn retrieval(r: &Recall) -> Value {
    json!({
        "image_retrieval_recall@1": r.t2i_r1,
        "image_retrieval_recall@5": r.t2i_r5,
        "image_retrieval_recall@10": r.t2i_r10,
        "text_retrieval_recall@1": r.i2t_r1,
        "text_retrieval_recall@5": r.i2t_r5,
        "text_retrieval_recall@10": r.i2t_r10,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balanced_accuracy_weighs_each_class_alike() {
        // Class 0: 8 of 10 right; class 1: 1 of 2; class 2 has no image.
        let m = vec![vec![8, 2, 0], vec![1, 1, 0], vec![0, 0, 0]];
        let v = classification(&m, 11);
        assert!((v["acc1"].as_f64().unwrap() - 9.0 / 12.0).abs() < 1e-12);
        assert!((v["mean_per_class_recall"].as_f64().unwrap() - (0.8 + 0.5) / 2.0).abs() < 1e-12);
        assert!(v["acc5"].is_null(), "3 classes: no top-5");
        let five = vec![vec![1, 0, 0, 0, 0]; 5];
        assert!((classification(&five, 4)["acc5"].as_f64().unwrap() - 0.8).abs() < 1e-12);
    }

    #[test]
    fn image_retrieval_is_caption_to_image() {
        let r = Recall {
            i2t_r1: 0.1,
            t2i_r1: 0.2,
            ..Recall::default()
        };
        let v = retrieval(&r);
        assert_eq!(v["image_retrieval_recall@1"], 0.2);
        assert_eq!(v["text_retrieval_recall@1"], 0.1);
    }
}
