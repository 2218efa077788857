//! Bad input: every problem is an error naming the file and line (never a panic), and
//! `skip_bad` leaves the bad rows out, lists them, and keeps the rest.

use std::path::Path;

use clip_core::data::{BadRow, Dataset, ImageStore, LoadOptions};
use clip_core::ClipConfig;
use image::{Rgb, RgbImage};

const SKIP: LoadOptions = LoadOptions {
    skip_bad: true,
    templates: vec![],
};

fn draw(path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    RgbImage::from_fn(24, 16, |x, y| Rgb([x as u8 * 10, y as u8 * 15, 90]))
        .save(path)
        .unwrap();
}

/// A dataset folder with `a.png` and `b.png` in `images/` and this captions.csv.
fn dataset(captions: &[u8]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    draw(&dir.path().join("images/a.png"));
    draw(&dir.path().join("images/b.png"));
    std::fs::write(dir.path().join("captions.csv"), captions).unwrap();
    dir
}

/// Loading fails with a message that names `captions.csv:LINE` and contains `reason`; with
/// `skip_bad` that row alone is reported and the `kept` others load.
fn assert_bad_row(dir: &Path, line: usize, reason: &str, kept: usize) {
    let err = format!("{:#}", Dataset::load(dir, &LoadOptions::default()).unwrap_err());
    assert!(
        err.contains(&format!("captions.csv:{line}: ")),
        "no file:line in: {err}"
    );
    assert!(err.contains(reason), "{reason:?} not in: {err}");
    assert!(err.contains("--skip-bad"), "no hint in: {err}");

    let ds = Dataset::load(dir, &SKIP).unwrap();
    assert_eq!(ds.bad.len(), 1, "{:?}", ds.bad);
    assert_eq!(ds.bad[0].line, line);
    assert!(ds.bad[0].file.ends_with("captions.csv"));
    assert!(
        ds.bad[0].to_string().contains(&format!("captions.csv:{line}: ")),
        "{}",
        ds.bad[0]
    );
    assert_eq!(ds.pairs.len(), kept);
    assert!(ds.pairs.iter().all(|p| p.line != line));
}

#[test]
fn missing_image() {
    let dir = dataset(b"image,caption\na.png,one\nmissing.jpg,two\nb.png,three\n");
    assert_bad_row(dir.path(), 3, "image not found: missing.jpg", 2);
}

#[test]
fn empty_caption() {
    let dir = dataset(b"image,caption\na.png,one\nb.png,\"  \"\nb.png,three\n");
    assert_bad_row(dir.path(), 3, "empty caption", 2);
}

#[test]
fn wrong_number_of_fields() {
    let dir = dataset(b"image,caption\na.png,one\nb.png,a dog, running\nb.png\nb.png,four\n");
    let err = format!("{:#}", Dataset::load(dir.path(), &LoadOptions::default()).unwrap_err());
    assert!(
        err.contains("captions.csv:3: expected 2 fields as in the header, found 3"),
        "{err}"
    );
    assert!(err.contains("quote it"), "{err}");
    assert!(
        err.contains("captions.csv:4: expected 2 fields as in the header, found 1"),
        "{err}"
    );
    assert!(err.contains("2 bad rows (of 4)"), "{err}");
    let ds = Dataset::load(dir.path(), &SKIP).unwrap();
    assert_eq!(ds.bad.iter().map(|b| b.line).collect::<Vec<_>>(), [3, 4]);
    assert_eq!(ds.captions(), ["one", "four"]);
}

#[test]
fn invalid_utf8() {
    let dir = dataset(b"image,caption\na.png,one\nb.png,caf\xe9 au lait\nb.png,three\n");
    assert_bad_row(dir.path(), 3, "invalid UTF-8", 2);
}

#[test]
fn image_paths_that_escape_the_dataset_folder() {
    let dir = dataset(b"image,caption\na.png,one\n../b.png,two\n/etc/passwd,three\nimages/../../x.png,four\n");
    let err = format!("{:#}", Dataset::load(dir.path(), &LoadOptions::default()).unwrap_err());
    for line in [3, 4, 5] {
        assert!(err.contains(&format!("captions.csv:{line}: image path")), "{err}");
    }
    assert!(err.contains("escapes the dataset folder"), "{err}");
    let ds = Dataset::load(dir.path(), &SKIP).unwrap();
    assert_eq!((ds.pairs.len(), ds.bad.len()), (1, 3));
}

#[test]
fn no_usable_rows_is_an_error_even_when_skipping() {
    let dir = dataset(b"image,caption\nmissing.png,one\na.png,\n");
    for opts in [LoadOptions::default(), SKIP] {
        let err = format!("{:#}", Dataset::load(dir.path(), &opts).unwrap_err());
        assert!(err.contains("no usable rows (2 bad)"), "{err}");
        assert!(
            err.contains("captions.csv:2: image not found") && err.contains("captions.csv:3: empty caption"),
            "{err}"
        );
    }
    let dir = dataset(b"image,caption\n");
    let err = format!("{:#}", Dataset::load(dir.path(), &SKIP).unwrap_err());
    assert!(err.contains("captions.csv: no usable rows (0 bad)"), "{err}");
}

#[test]
fn a_header_without_the_needed_columns() {
    let dir = dataset(b"picture,words\na.png,one\n");
    let err = format!("{:#}", Dataset::load(dir.path(), &SKIP).unwrap_err());
    assert!(
        err.contains("captions.csv:1: the header \"picture,words\" must name an image column"),
        "{err}"
    );
}

#[test]
fn invalid_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    draw(&dir.path().join("a.png"));
    std::fs::write(dir.path().join("captions.jsonl"), "{\"image\": \"a.png\", \"caption\": \"one\"}\n{\"image\": \"a.png\", caption: two}\n[1]\n{\"image\": \"a.png\"}\n").unwrap();
    let err = format!("{:#}", Dataset::load(dir.path(), &LoadOptions::default()).unwrap_err());
    assert!(err.contains("captions.jsonl:2: invalid JSON"), "{err}");
    assert!(err.contains("captions.jsonl:3: expected a JSON object"), "{err}");
    assert!(err.contains("captions.jsonl:4: no caption field"), "{err}");
    assert_eq!(Dataset::load(dir.path(), &SKIP).unwrap().pairs.len(), 1);
}

/// The image store decodes the images: a corrupt or truncated file is a bad row at the first
/// line that uses it.
fn assert_undecodable(bytes: impl FnOnce(Vec<u8>) -> Vec<u8>) {
    let dir = dataset(b"image,caption\na.png,one\nb.png,two\nb.png,three\na.png,four\n");
    let b = dir.path().join("images/b.png");
    std::fs::write(&b, bytes(std::fs::read(&b).unwrap())).unwrap();
    let cfg = ClipConfig::tiny();
    let ds = Dataset::load(dir.path(), &LoadOptions::default()).unwrap();
    let err = format!(
        "{:#}",
        ImageStore::load(&ds, &cfg, false, &clip_core::progress::Silent)
            .err()
            .unwrap()
    );
    assert!(
        err.contains("captions.csv:3: cannot decode image b.png (used by 2 captions)"),
        "{err}"
    );
    assert!(err.contains("--skip-bad"), "{err}");

    let (ds, store) = Dataset::load_with_images(dir.path(), &SKIP, &cfg, &clip_core::progress::Silent).unwrap();
    assert!(store.contains(0) && !store.contains(1));
    assert_eq!(ds.captions(), ["one", "four"]);
    assert_eq!(ds.bad.len(), 1);
    assert_eq!(ds.bad[0].line, 3);
}

#[test]
fn undecodable_image() {
    assert_undecodable(|_| b"this is not a picture".to_vec());
}

#[test]
fn truncated_image() {
    assert_undecodable(|bytes| bytes[..bytes.len() / 2].to_vec());
}

#[test]
fn truncated_jpeg() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.jpg");
    RgbImage::from_fn(64, 64, |x, y| Rgb([x as u8 * 4, y as u8 * 4, 7]))
        .save(&path)
        .unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 3]).unwrap();
    let err = format!("{:#}", ImageStore::load_one(&path, &ClipConfig::tiny()).unwrap_err());
    assert!(err.contains("a.jpg: cannot decode image"), "{err}");
}

#[test]
fn undecodable_image_in_class_folders_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    draw(&dir.path().join("cat/1.png"));
    draw(&dir.path().join("dog/1.png"));
    std::fs::write(dir.path().join("dog/2.jpg"), b"garbage").unwrap();
    let cfg = ClipConfig::tiny();
    let err = format!(
        "{:#}",
        Dataset::load_with_images(dir.path(), &LoadOptions::default(), &cfg, &clip_core::progress::Silent)
            .err()
            .unwrap()
    );
    assert!(err.contains("dog/2.jpg: cannot decode image"), "{err}");
    let opts = LoadOptions {
        skip_bad: true,
        ..Default::default()
    };
    let (ds, _) = Dataset::load_with_images(dir.path(), &opts, &cfg, &clip_core::progress::Silent).unwrap();
    assert_eq!(ds.pairs.len(), 2);
    assert_eq!(ds.labels, ["cat", "dog"]);
}

#[test]
fn many_bad_rows_are_summarised() {
    let mut csv = b"image,caption\na.png,fine\n".to_vec();
    for i in 0..25 {
        csv.extend(format!("gone{i}.png,x\n").bytes());
    }
    let dir = dataset(&csv);
    let err = format!("{:#}", Dataset::load(dir.path(), &LoadOptions::default()).unwrap_err());
    assert!(err.contains("25 bad rows (of 26)"), "{err}");
    assert_eq!(err.matches("image not found").count(), 10, "{err}");
    assert!(err.contains("… and 15 more"), "{err}");
}

#[test]
fn bad_rows_display_like_compiler_messages() {
    let row = BadRow::new(Path::new("data/captions.csv"), 7, "empty caption for a.png");
    assert_eq!(row.to_string(), "data/captions.csv:7: empty caption for a.png");
    assert_eq!(
        BadRow::new(Path::new("cat/1.png"), 0, "cannot decode image").to_string(),
        "cat/1.png: cannot decode image"
    );
}
