//! The captions layouts of public datasets load into the right pairs; class folders too.

use std::path::{Path, PathBuf};

use clip_core::data::{CaptionFormat, Dataset, LoadOptions, Source};
use image::{Rgb, RgbImage};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/data")
        .join(name)
}

/// A small picture (its format from the extension), different for each `seed`.
fn draw(path: &Path, seed: u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    RgbImage::from_fn(40, 30, |x, y| Rgb([x as u8 * 6, y as u8 * 8, seed.wrapping_mul(37)]))
        .save(path)
        .unwrap();
}

/// Copies a fixture folder into a temporary directory and draws the images it names in
/// `images_subdir` (or next to the captions), so the fixtures need no committed binaries.
fn setup(name: &str, images_subdir: Option<&str>, images: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let base = images_subdir.map_or(dir.path().to_path_buf(), |s| dir.path().join(s));
    for (i, img) in images.iter().enumerate() {
        draw(&base.join(img), i as u8);
    }
    dir
}

fn captions_of(ds: &Dataset, image: &str) -> Vec<String> {
    let i = ds
        .images
        .iter()
        .position(|e| e.name == image)
        .unwrap_or_else(|| panic!("no image {image}"));
    ds.pairs
        .iter()
        .filter(|p| p.image == i)
        .map(|p| p.caption.clone())
        .collect()
}

#[test]
fn the_demo_set_loads() {
    let ds = Dataset::load(&Dataset::demo_dir(), &LoadOptions::default()).unwrap();
    assert_eq!((ds.images.len(), ds.pairs.len()), (10, 30));
    assert_eq!(ds.captions_per_image(), vec![3; 10]);
    assert!(ds.image_root.ends_with("assets/demo/images"));
    assert_eq!(ds.images[0].name, "astronaut.jpg");
    assert_eq!(ds.pairs[0].caption, "穿橙色太空衣的太空人");
    assert_eq!(ds.pairs[2].caption, "an astronaut in an orange suit, with a helmet");
    assert_eq!(
        ds.pairs.iter().map(|p| p.line).collect::<Vec<_>>(),
        (2..32).collect::<Vec<_>>()
    );
    assert!(ds.pairs.iter().all(|p| p.label.is_none()));
    assert!(ds.bad.is_empty());
}

#[test]
fn flickr8k_captions_txt_with_quoted_commas() {
    // Kaggle's Flickr8k layout: captions.txt next to an `Images/` folder.
    let dir = setup(
        "flickr8k",
        Some("Images"),
        &["1000_aa.jpg", "1001_bb.jpg", "1002_cc.jpg"],
    );
    let ds = Dataset::load(dir.path(), &LoadOptions::default()).unwrap();
    assert_eq!((ds.images.len(), ds.pairs.len()), (3, 15));
    assert_eq!(ds.captions_per_image(), vec![5, 5, 5]);
    assert!(matches!(
        &ds.source,
        Source::Captions {
            format: CaptionFormat::Csv,
            ..
        }
    ));
    assert!(ds.bad.is_empty() && ds.labels.is_empty());

    let first = captions_of(&ds, "1000_aa.jpg");
    assert_eq!(first[2], "A small child, dressed in red, climbs stairs .");
    assert_eq!(
        captions_of(&ds, "1001_bb.jpg")[3],
        "A dog says \"woof\" to another dog ."
    );
    assert_eq!(
        captions_of(&ds, "1002_cc.jpg")[1],
        "A cyclist, in a helmet, on a steep road ."
    );
    // Lines are 1-based and count the header.
    assert_eq!(ds.pairs[0].line, 2);
    assert_eq!(ds.pairs[14].line, 16);
    let img = &ds.images[ds.pairs[0].image];
    assert!(
        img.path.is_absolute() && img.path.ends_with("Images/1000_aa.jpg"),
        "{}",
        img.path.display()
    );

    // The captions file itself gives the same pairs.
    let by_file = Dataset::load(&dir.path().join("captions.txt"), &LoadOptions::default()).unwrap();
    assert_eq!(by_file.pairs, ds.pairs);
    assert_eq!(by_file.images, ds.images);
}

#[test]
fn tsv_with_an_id_column_and_chinese_captions() {
    let dir = setup("tsv", None, &["cat.png", "dog.png"]);
    let ds = Dataset::load(dir.path(), &LoadOptions::default()).unwrap();
    assert!(matches!(
        &ds.source,
        Source::Captions {
            format: CaptionFormat::Tsv,
            ..
        }
    ));
    assert_eq!(ds.captions(), ["一隻貓", "a cat, sitting", "一隻狗", "a dog"]);
    assert_eq!(ds.images.len(), 2);
    assert_eq!(ds.pairs.iter().map(|p| p.image).collect::<Vec<_>>(), [0, 0, 1, 1]);
}

#[test]
fn json_lines_with_mixed_keys_and_caption_lists() {
    let dir = setup("jsonl", Some("images"), &["cat.png", "dog.webp"]);
    let ds = Dataset::load(dir.path(), &LoadOptions::default()).unwrap();
    assert!(matches!(
        &ds.source,
        Source::Captions {
            format: CaptionFormat::JsonLines,
            ..
        }
    ));
    assert_eq!(ds.captions(), ["一隻貓", "a cat, \"sitting\"", "一隻狗", "a dog"]);
    assert_eq!(ds.pairs.iter().map(|p| p.line).collect::<Vec<_>>(), [1, 2, 4, 4]);
    assert_eq!(ds.captions_per_image(), vec![2, 2]);
}

#[test]
fn flickr30k_pipe_separated_results() {
    let dir = setup("flickr30k", None, &["10_a.jpg", "11_b.jpg"]);
    let ds = Dataset::load(&dir.path().join("results.csv"), &LoadOptions::default()).unwrap();
    assert!(matches!(
        &ds.source,
        Source::Captions {
            format: CaptionFormat::Pipe,
            ..
        }
    ));
    assert_eq!(ds.captions()[0], "Two young men , one in a hat , stand near a wall .");
    assert_eq!(ds.images[1].name, "11_b.jpg");
    assert_eq!(ds.pairs.len(), 4);
}

#[test]
fn image_paths_may_include_the_images_folder() {
    let dir = tempfile::tempdir().unwrap();
    draw(&dir.path().join("images/a.png"), 1);
    draw(&dir.path().join("images/sub/b.png"), 2);
    std::fs::write(
        dir.path().join("captions.csv"),
        "file,comment\nimages/a.png,one\na.png,two\n./sub/b.png,three\n",
    )
    .unwrap();
    let ds = Dataset::load(dir.path(), &LoadOptions::default()).unwrap();
    assert_eq!(ds.pairs.len(), 3);
    assert_eq!(ds.images.len(), 2, "`a.png` and `images/a.png` are one picture");
    for p in &ds.pairs {
        assert!(ds.images[p.image].path.is_file());
    }
    assert!(ds.images[ds.pairs[2].image].path.ends_with("images/sub/b.png"));
}

#[test]
fn quoted_header_crlf_and_bom() {
    let dir = tempfile::tempdir().unwrap();
    draw(&dir.path().join("a.png"), 1);
    std::fs::write(
        dir.path().join("captions.csv"),
        "\u{feff}\"Image\",\" Caption \"\r\na.png,\"紅色的, 杯子\"\r\n",
    )
    .unwrap();
    let ds = Dataset::load(dir.path(), &LoadOptions::default()).unwrap();
    assert_eq!(ds.captions(), ["紅色的, 杯子"]);
}

#[test]
fn class_folders_with_templates_keep_labels() {
    let dir = tempfile::tempdir().unwrap();
    draw(&dir.path().join("人蔘/1.png"), 1);
    draw(&dir.path().join("人蔘/2.jpg"), 2);
    draw(&dir.path().join("枸杞/1.webp"), 3);
    std::fs::write(dir.path().join("枸杞/notes.txt"), "not an image").unwrap();
    std::fs::create_dir_all(dir.path().join(".cache/x")).unwrap();
    std::fs::create_dir_all(dir.path().join("empty")).unwrap();

    let ds = Dataset::load(dir.path(), &LoadOptions::default()).unwrap();
    assert_eq!(ds.labels, ["人蔘", "枸杞"]);
    assert_eq!(ds.images.len(), 3);
    assert_eq!(
        ds.captions(),
        ["a photo of a 人蔘", "a photo of a 人蔘", "a photo of a 枸杞"]
    );
    assert_eq!(
        ds.pairs.iter().map(|p| p.label).collect::<Vec<_>>(),
        [Some(0), Some(0), Some(1)]
    );
    assert!(ds.pairs.iter().all(|p| p.line == 0));
    assert_eq!(ds.images[2].name, "枸杞/1.webp");

    let opts = LoadOptions {
        templates: vec!["一張{label}的照片".into(), "a photo of {label}".into()],
        ..Default::default()
    };
    let ds = Dataset::load(dir.path(), &opts).unwrap();
    assert_eq!(ds.pairs.len(), 6);
    assert_eq!(ds.pairs[4].caption, "一張枸杞的照片");
    assert_eq!(ds.pairs[5].caption, "a photo of 枸杞");
    assert_eq!(ds.pairs[5].image, 2);
    assert!(matches!(&ds.source, Source::ClassFolders { templates } if templates.len() == 2));

    let opts = LoadOptions {
        templates: vec!["a photo".into()],
        ..Default::default()
    };
    let err = Dataset::load(dir.path(), &opts).unwrap_err().to_string();
    assert!(err.contains("{label}"), "{err}");
}

#[test]
fn a_folder_with_nothing_to_train_on() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("readme.txt"), "hello").unwrap();
    let err = Dataset::load(dir.path(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no captions file") && err.contains("class folders"),
        "{err}"
    );
    let err = Dataset::load(&dir.path().join("nope"), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope") && err.contains("not found"), "{err}");
}
