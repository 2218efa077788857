//! The train/validation split is by image, seeded, and falls back openly on tiny datasets.

use std::collections::BTreeSet;
use std::path::Path;

use clip_core::data::{Dataset, LoadOptions, Split, MIN_IMAGES_TO_SPLIT};
use image::{Rgb, RgbImage};

fn demo() -> Dataset {
    Dataset::load(&Dataset::demo_dir(), &LoadOptions::default()).unwrap()
}

fn images_of(ds: &Dataset, pairs: &[usize]) -> BTreeSet<usize> {
    pairs.iter().map(|&p| ds.pairs[p].image).collect()
}

/// Every pair is on exactly one side and no image is on both.
fn assert_partition(ds: &Dataset, s: &Split) {
    let mut all: Vec<usize> = s.train.iter().chain(&s.val).copied().collect();
    all.sort();
    assert_eq!(all, (0..ds.pairs.len()).collect::<Vec<_>>());
    assert!(images_of(ds, &s.train).is_disjoint(&images_of(ds, &s.val)));
}

/// A folder of `n` images with `k` captions each.
fn synthetic(dir: &Path, n: usize, k: usize) -> Dataset {
    let mut csv = String::from("image,caption\n");
    for i in 0..n {
        RgbImage::from_pixel(8, 8, Rgb([i as u8, 0, 0]))
            .save(dir.join(format!("{i}.png")))
            .unwrap();
        for j in 0..k {
            csv.push_str(&format!("{i}.png,picture {i} caption {j}\n"));
        }
    }
    std::fs::write(dir.join("captions.csv"), csv).unwrap();
    Dataset::load(dir, &LoadOptions::default()).unwrap()
}

#[test]
fn a_split_holds_out_whole_images() {
    let dir = tempfile::tempdir().unwrap();
    let ds = synthetic(dir.path(), 25, 3);
    let s = ds.split(0.2, 42);
    assert_eq!(s.note, None);
    assert_partition(&ds, &s);
    // 5 of 25 images, with all 3 captions each.
    assert_eq!(images_of(&ds, &s.val).len(), 5);
    assert_eq!((s.train.len(), s.val.len()), (60, 15));
    assert!(s.train.windows(2).all(|w| w[0] < w[1]), "pairs keep file order");
}

#[test]
fn split_is_seeded() {
    let dir = tempfile::tempdir().unwrap();
    let ds = synthetic(dir.path(), 25, 2);
    assert_eq!(ds.split(0.2, 7), ds.split(0.2, 7));
    let splits: BTreeSet<Vec<usize>> = (0..6).map(|seed| ds.split(0.2, seed).val).collect();
    assert_eq!(splits.len(), 6, "different seeds hold out different images");
}

#[test]
fn captions_of_an_image_stay_together_for_any_seed_and_fraction() {
    let dir = tempfile::tempdir().unwrap();
    let n = MIN_IMAGES_TO_SPLIT.max(20);
    let ds = synthetic(dir.path(), n, 3);
    for seed in 0..20 {
        for fraction in [0.1, 0.2, 0.5] {
            let s = ds.split(fraction, seed);
            assert_partition(&ds, &s);
            assert_eq!(images_of(&ds, &s.val).len(), (n as f64 * fraction).round() as usize);
            assert_eq!(s.val.len() % 3, 0);
        }
    }
}

#[test]
fn the_demo_set_is_too_small_to_hold_images_out() {
    let ds = demo();
    assert!(ds.images.len() < MIN_IMAGES_TO_SPLIT);
    let s = ds.split(0.2, 42);
    assert_eq!(s.train, (0..30).collect::<Vec<_>>());
    assert_eq!(s.val, s.train);
    let note = s.note.unwrap();
    assert!(
        note.contains("only 10 images") && note.contains("all 30 pairs"),
        "{note}"
    );
}

#[test]
fn the_tutorials_four_pairs_train_and_validate_on_everything() {
    let dir = tempfile::tempdir().unwrap();
    let herbs = ["人蔘", "韓國人蔘", "枸杞", "銀川枸杞"];
    let mut csv = String::from("image,caption\n");
    for (i, h) in herbs.iter().enumerate() {
        RgbImage::from_pixel(8, 8, Rgb([0, i as u8 * 50, 0]))
            .save(dir.path().join(format!("{i}.jpg")))
            .unwrap();
        csv.push_str(&format!("{i}.jpg,{h}\n"));
    }
    std::fs::write(dir.path().join("captions.csv"), csv).unwrap();
    let ds = Dataset::load(dir.path(), &LoadOptions::default()).unwrap();
    let s = ds.split(0.2, 42);
    assert_eq!(s.train, [0, 1, 2, 3]);
    assert_eq!(s.val, s.train);
    assert!(s.is_fallback());
    let note = s.note.unwrap();
    assert!(note.contains("only 4 images") && note.contains("all 4 pairs"), "{note}");
}

#[test]
fn an_empty_validation_side_falls_back_too() {
    let dir = tempfile::tempdir().unwrap();
    let n = MIN_IMAGES_TO_SPLIT.max(20);
    let ds = synthetic(dir.path(), n, 2);
    for fraction in [0.0, 0.4 / n as f64] {
        let s = ds.split(fraction, 1);
        assert_eq!((s.train.len(), s.val.len()), (2 * n, 2 * n));
        assert!(s.note.as_deref().unwrap().contains("one side empty"), "{:?}", s.note);
    }
    let s = ds.split(0.2, 1);
    assert_eq!((s.val.len(), s.note), (2 * (n as f64 * 0.2).round() as usize, None));
}
