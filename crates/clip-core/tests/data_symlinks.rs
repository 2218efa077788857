//! Symlinks: a link inside a dataset (or an indexed folder) that leads outside it is refused with
//! the file and the reason; links that stay inside work; a link cycle cannot hang the index.
#![cfg(unix)]

use std::os::unix::fs::symlink;
use std::path::Path;

use clip_core::data::{image_files, Dataset, LoadOptions};
use image::{Rgb, RgbImage};

fn draw(path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    RgbImage::from_fn(8, 8, |x, y| Rgb([x as u8 * 30, y as u8 * 30, 9]))
        .save(path)
        .unwrap();
}

fn skip() -> LoadOptions {
    LoadOptions {
        skip_bad: true,
        ..LoadOptions::default()
    }
}

#[test]
fn a_captions_row_through_a_link_out_of_the_dataset_is_a_bad_row() {
    let outside = tempfile::tempdir().unwrap();
    draw(&outside.path().join("secret.png"));
    let dir = tempfile::tempdir().unwrap();
    draw(&dir.path().join("images/a.png"));
    symlink(outside.path().join("secret.png"), dir.path().join("images/link.png")).unwrap();
    symlink(dir.path().join("images/a.png"), dir.path().join("images/inner.png")).unwrap();
    std::fs::write(
        dir.path().join("captions.csv"),
        "image,caption\na.png,one\nlink.png,two\ninner.png,three\n",
    )
    .unwrap();
    let err = format!("{:#}", Dataset::load(dir.path(), &LoadOptions::default()).unwrap_err());
    assert!(
        err.contains("captions.csv:3:") && err.contains("leads outside the dataset folder"),
        "{err}"
    );
    assert!(err.contains("secret.png"), "says where it leads: {err}");
    let ds = Dataset::load(dir.path(), &skip()).unwrap();
    assert_eq!(ds.pairs.len(), 2, "a link that stays inside works");
    assert_eq!(ds.bad.len(), 1);
    assert!(ds
        .images
        .iter()
        .all(|i| !i.path.starts_with(outside.path().canonicalize().unwrap())));
    // A link inside to a file inside is the same picture: one image, so a split keeps it whole.
    assert_eq!(ds.images.len(), 1, "{:?}", ds.images);
}

#[test]
fn an_images_folder_linked_from_elsewhere_is_refused_row_by_row() {
    let outside = tempfile::tempdir().unwrap();
    draw(&outside.path().join("a.png"));
    let dir = tempfile::tempdir().unwrap();
    symlink(outside.path(), dir.path().join("images")).unwrap();
    std::fs::write(dir.path().join("captions.csv"), "image,caption\na.png,one\n").unwrap();
    let err = format!("{:#}", Dataset::load(dir.path(), &skip()).unwrap_err());
    assert!(
        err.contains("captions.csv:2:") && err.contains("leads outside"),
        "{err}"
    );
}

#[test]
fn class_folders_follow_links_inside_and_report_links_out() {
    let outside = tempfile::tempdir().unwrap();
    draw(&outside.path().join("dogs/1.png"));
    draw(&outside.path().join("stolen.png"));
    let dir = tempfile::tempdir().unwrap();
    draw(&dir.path().join("cats/1.png"));
    draw(&dir.path().join("cats/2.png"));
    symlink(outside.path().join("dogs"), dir.path().join("dogs")).unwrap();
    symlink(outside.path().join("stolen.png"), dir.path().join("cats/3.png")).unwrap();
    symlink(dir.path().join("cats"), dir.path().join("kittens")).unwrap();

    let err = format!("{:#}", Dataset::load(dir.path(), &LoadOptions::default()).unwrap_err());
    // The link out in cats/ is listed under both names it is reached by.
    assert!(err.contains("3 bad rows"), "{err}");
    assert!(err.contains("dogs: leads outside"), "{err}");
    assert!(err.contains("cats/3.png: leads outside"), "{err}");
    assert!(err.contains("kittens/3.png: leads outside"), "{err}");
    assert!(err.contains("leads outside the dataset folder"), "{err}");

    let ds = Dataset::load(dir.path(), &skip()).unwrap();
    assert_eq!(
        ds.labels,
        ["cats", "kittens"],
        "a folder linked inside is a class of its own"
    );
    assert_eq!(ds.images.len(), 4);
    assert_eq!(ds.bad.len(), 3);
    let root = dir.path().canonicalize().unwrap();
    assert!(ds.images.iter().all(|i| i.path.starts_with(&root)), "{:?}", ds.images);
}

#[test]
fn a_class_folder_that_only_links_out_is_no_silent_empty_dataset() {
    let outside = tempfile::tempdir().unwrap();
    draw(&outside.path().join("dogs/1.png"));
    let dir = tempfile::tempdir().unwrap();
    symlink(outside.path().join("dogs"), dir.path().join("dogs")).unwrap();
    let err = format!("{:#}", Dataset::load(dir.path(), &skip()).unwrap_err());
    assert!(err.contains("no usable rows") && err.contains("leads outside"), "{err}");
}

#[test]
fn the_index_listing_contains_links_and_survives_a_cycle() {
    let outside = tempfile::tempdir().unwrap();
    draw(&outside.path().join("secret.png"));
    draw(&outside.path().join("more/x.png"));
    let dir = tempfile::tempdir().unwrap();
    draw(&dir.path().join("a.png"));
    draw(&dir.path().join("sub/b.jpg"));
    symlink(dir.path(), dir.path().join("sub/loop")).unwrap();
    symlink("..", dir.path().join("sub/up")).unwrap();
    symlink(outside.path().join("secret.png"), dir.path().join("sub/secret.png")).unwrap();
    symlink(outside.path().join("more"), dir.path().join("more")).unwrap();
    symlink(dir.path().join("a.png"), dir.path().join("sub/alias.png")).unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not an image").unwrap();

    let l = image_files(dir.path()).unwrap();
    assert_eq!(l.files, ["a.png", "sub/alias.png", "sub/b.jpg"]);
    let skipped: Vec<&str> = l.skipped.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(skipped, ["more", "sub/loop", "sub/secret.png", "sub/up"]);
    let reason = |p: &str| l.skipped.iter().find(|(s, _)| s == p).unwrap().1.clone();
    assert!(reason("more").contains("leads outside"), "{}", reason("more"));
    assert!(reason("sub/secret.png").contains("leads outside"));
    assert!(reason("sub/loop").contains("not followed"), "{}", reason("sub/loop"));
    assert_eq!(clip_core::index::list_images(dir.path()).unwrap(), l.files);
}
