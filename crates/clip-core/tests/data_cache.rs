//! The image cache, WebDataset shards and the streaming loader: a changed file is decoded again,
//! shards are read in place with bad members named, and streaming gives the cached epoch's
//! batches exactly.

use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

use candle_core::Device;
use clip_core::data::{Dataset, ImageStore, LoadOptions, Loader, StoreMode, TextTokenizer};
use clip_core::progress::Silent;
use clip_core::ClipConfig;
use image::{ImageFormat, RgbImage};

/// A w×h picture whose colours depend on `seed`, with a gradient so crops differ.
fn picture(w: u32, h: u32, seed: u8) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            seed.wrapping_mul(40).wrapping_add((x * 255 / w) as u8),
            (y * 255 / h) as u8,
            seed.wrapping_mul(90),
        ])
    })
}

fn png_bytes(img: &RgbImage) -> Vec<u8> {
    let mut out = Cursor::new(vec![]);
    img.write_to(&mut out, ImageFormat::Png).unwrap();
    out.into_inner()
}

fn write_csv(dir: &Path, names: &[&str]) {
    let csv: String = std::iter::once("image,caption\n".to_string())
        .chain(names.iter().map(|n| format!("{n},a picture called {n}\n")))
        .collect();
    std::fs::write(dir.join("captions.csv"), csv).unwrap();
}

fn open(dir: &Path, cache: &Path, skip_bad: bool) -> (Dataset, ImageStore, Vec<String>) {
    let cfg = ClipConfig::tiny();
    let ds = Dataset::load(
        dir,
        &LoadOptions {
            skip_bad,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let (store, bad) = ImageStore::open(
        &ds,
        &cfg,
        &StoreMode::Cache(Some(cache.to_path_buf())),
        skip_bad,
        &Silent,
    )
    .unwrap();
    (ds, store, bad.iter().map(|b| b.to_string()).collect())
}

fn pixels_of(ds: &Dataset, store: &ImageStore, name: &str) -> Vec<u8> {
    let i = ds.images.iter().position(|e| e.name == name).unwrap();
    store.rgb(i).unwrap().unwrap().into_owned()
}

#[test]
fn the_image_cache_decodes_only_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let d = dir.path();
    for (i, n) in ["a.png", "b.png", "c.png"].iter().enumerate() {
        picture(40, 30, i as u8).save(d.join(n)).unwrap();
    }
    std::fs::write(d.join("broken.png"), b"not a png").unwrap();
    write_csv(d, &["a.png", "b.png", "c.png", "broken.png"]);

    let (ds, store, bad) = open(d, &cache, true);
    let r = store.cache().unwrap().clone();
    assert_eq!((r.hits, r.built, r.dropped), (0, 4, 0), "{r}");
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert!(bad[0].contains("broken.png"), "{bad:?}");
    assert_eq!(store.bytes(), 0, "a mapped cache holds no pixels in the process");
    // The cached pixels are the in-memory store's.
    let (mem, _) = ImageStore::open(&ds, &ClipConfig::tiny(), &StoreMode::Memory, true, &Silent).unwrap();
    for n in ["a.png", "b.png", "c.png"] {
        assert_eq!(pixels_of(&ds, &store, n), pixels_of(&ds, &mem, n), "{n}");
    }
    let old_a = pixels_of(&ds, &store, "a.png");

    // Unchanged: a full hit, the broken file remembered (not decoded again) and still reported.
    let (_, again, bad) = open(d, &cache, true);
    let r = again.cache().unwrap();
    assert_eq!((r.hits, r.built, r.dropped), (4, 0, 0), "{r}");
    assert_eq!(bad.len(), 1, "{bad:?}");

    // a.png changes (same size, new content and time), d.png is added, c.png removed.
    picture(40, 30, 7).save(d.join("a.png")).unwrap();
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
    std::fs::File::options()
        .write(true)
        .open(d.join("a.png"))
        .unwrap()
        .set_modified(later)
        .unwrap();
    picture(20, 50, 9).save(d.join("d.png")).unwrap();
    std::fs::remove_file(d.join("c.png")).unwrap();
    write_csv(d, &["a.png", "b.png", "d.png", "broken.png"]);
    let (ds, store, _) = open(d, &cache, true);
    let r = store.cache().unwrap();
    assert_eq!(
        (r.hits, r.built, r.dropped),
        (2, 2, 1),
        "b and broken hit, a and d decoded, c dropped: {r}"
    );
    let (mem, _) = ImageStore::open(&ds, &ClipConfig::tiny(), &StoreMode::Memory, true, &Silent).unwrap();
    let new_a = pixels_of(&ds, &store, "a.png");
    assert_ne!(new_a, old_a, "the changed file was decoded again");
    for n in ["a.png", "b.png", "d.png"] {
        assert_eq!(pixels_of(&ds, &store, n), pixels_of(&ds, &mem, n), "{n}");
    }
    // One data file and one manifest; the manifest no longer names c.png.
    let files: Vec<String> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files.iter().filter(|f| f.ends_with(".bin")).count(), 1, "{files:?}");
    let manifest = std::fs::read_to_string(&r.manifest).unwrap();
    assert!(!manifest.contains("c.png") && manifest.contains("d.png"), "{manifest}");
    assert!(manifest.contains("\"format\":2"), "{manifest}");
}

/// A tar shard with these members (name, bytes).
fn shard(path: &Path, members: &[(&str, Vec<u8>)]) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (name, bytes) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, bytes.as_slice()).unwrap();
    }
    b.finish().unwrap();
}

#[test]
fn webdataset_shards_are_read_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("shards");
    std::fs::create_dir(&d).unwrap();
    let img = |s: u8| png_bytes(&picture(30, 20, s));
    shard(
        &d.join("shard-000.tar"),
        &[
            ("k0.png", img(0)),
            ("k0.txt", b"a red square\n".to_vec()),
            ("k1.png", img(1)),
            ("k1.json", br#"{"caption": "a green one", "width": 30}"#.to_vec()),
            ("sub/k2.png", img(2)),
            ("sub/k2.json", br#"{"text": "from the text field"}"#.to_vec()),
            ("nocap.png", img(3)),
        ],
    );
    shard(
        &d.join("shard-001.tar"),
        &[
            ("k4.txt", "一杯咖啡".as_bytes().to_vec()),
            ("k4.png", img(4)),
            ("bad.png", b"definitely not a png".to_vec()),
            ("bad.txt", b"a broken picture".to_vec()),
            ("orphan.txt", b"no image for me".to_vec()),
            ("k5.png", img(5)),
            ("k5.json", b"{not json".to_vec()),
        ],
    );
    let pattern = d.join("shard-{000..001}.tar");
    let skip = LoadOptions {
        skip_bad: true,
        ..LoadOptions::default()
    };
    let ds = Dataset::load(&pattern, &skip).unwrap();
    let captions = ds.captions();
    assert_eq!(
        captions,
        [
            "a red square",
            "a green one",
            "from the text field",
            "一杯咖啡",
            "a broken picture"
        ]
    );
    let bad: Vec<String> = ds.bad.iter().map(|b| b.to_string()).collect();
    assert_eq!(bad.len(), 3, "{bad:?}");
    for (member, why) in [
        ("nocap.png", "no caption"),
        ("orphan.txt", "without an image"),
        ("k5.png", "invalid JSON"),
    ] {
        assert!(
            bad.iter()
                .any(|b| b.contains(&format!(".tar:{member}: ")) && b.contains(why)),
            "{member}: {bad:?}"
        );
    }
    // Without --skip-bad the bad members stop the load, named.
    let err = format!("{:#}", Dataset::load(&pattern, &LoadOptions::default()).unwrap_err());
    assert!(
        err.contains("shard-000.tar:nocap.png") && err.contains("3 bad rows"),
        "{err}"
    );
    // A folder of shards is the same dataset.
    assert_eq!(Dataset::load(&d, &skip).unwrap().captions(), captions);

    // The images decode straight from the shards; the broken one is reported as shard:member.
    let cfg = ClipConfig::tiny();
    let mut ds = ds;
    let (store, bad) =
        ImageStore::open(&ds, &cfg, &StoreMode::Cache(Some(dir.path().join("c"))), true, &Silent).unwrap();
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert!(
        bad[0]
            .to_string()
            .contains("shard-001.tar:bad.png: cannot decode image"),
        "{}",
        bad[0]
    );
    ds.drop_undecodable(&store, bad).unwrap();
    assert_eq!(ds.pairs.len(), 4);
    let s = cfg.image.image_size as u32;
    let want = image::imageops::resize(&picture(30, 20, 4), s, s, image::imageops::FilterType::Triangle);
    let k4 = ds.images.iter().position(|e| e.name == "k4.png").unwrap();
    assert_eq!(store.rgb(k4).unwrap().unwrap().as_ref(), want.as_raw().as_slice());
    // Unchanged shards hit the cache.
    let (again, _) = ImageStore::open(&ds, &cfg, &StoreMode::Cache(Some(dir.path().join("c"))), true, &Silent).unwrap();
    assert_eq!(again.cache().unwrap().built, 0);
}

#[test]
fn a_streaming_epoch_equals_the_cached_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let names: Vec<String> = (0..14).map(|i| format!("p{i}.png")).collect();
    for (i, n) in names.iter().enumerate() {
        // Different shapes, none of them square: resizing and cropping both matter.
        picture(50 + 7 * i as u32, 90 - 3 * i as u32, i as u8)
            .save(d.join(n))
            .unwrap();
    }
    write_csv(d, &names.iter().map(String::as_str).collect::<Vec<_>>());
    let cfg = ClipConfig::tiny();
    let ds = Dataset::load(d, &LoadOptions::default()).unwrap();
    let tok = TextTokenizer::train(&ds.captions(), cfg.text.vocab_size, cfg.max_tokens()).unwrap();
    let loader = |mode: StoreMode| {
        let (store, bad) = ImageStore::open(&ds, &cfg, &mode, false, &Silent).unwrap();
        assert!(bad.is_empty());
        Loader::new(&ds, Arc::new(store), &tok, &cfg, &Device::Cpu).unwrap()
    };
    let cached = loader(StoreMode::Cache(Some(d.join("cache"))));
    let streaming = loader(StoreMode::Stream);
    let pairs: Vec<usize> = (0..ds.pairs.len()).collect();
    let epoch = |l: &Loader, augment: bool| -> Vec<(Vec<usize>, Vec<f32>)> {
        l.batches(&pairs, 4, Some(17), augment)
            .map(|b| {
                let b = b.unwrap();
                (b.pairs, b.images.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            })
            .collect()
    };
    let plain = epoch(&cached, false);
    assert_eq!(plain.len(), 4);
    assert_eq!(epoch(&streaming, false), plain, "same batches, same pixels");
    let augmented = epoch(&cached, true);
    assert_eq!(
        epoch(&streaming, true),
        augmented,
        "augmentation crops the originals either way"
    );
    assert_ne!(augmented, plain);
    assert_eq!(
        augmented.iter().map(|b| &b.0).collect::<Vec<_>>(),
        plain.iter().map(|b| &b.0).collect::<Vec<_>>()
    );
}

#[test]
fn a_flipped_bit_in_the_image_cache_is_detected_and_the_image_decoded_again() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let d = dir.path();
    for (i, n) in ["a.png", "b.png"].iter().enumerate() {
        picture(40, 30, i as u8).save(d.join(n)).unwrap();
    }
    write_csv(d, &["a.png", "b.png"]);
    let (ds, store, _) = open(d, &cache, false);
    let want_b = pixels_of(&ds, &store, "b.png");
    let b = ds.images.iter().position(|e| e.name == "b.png").unwrap();
    let want_batch = store.batch_pixels(&[b], None).unwrap();
    drop(store);
    let data = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "bin"))
        .unwrap();
    // Slots are image indices at page-aligned strides: flip one bit inside b's.
    let stride = (3 * 64 * 64usize).div_ceil(4096) * 4096;
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[b * stride + 100] ^= 0x04;
    std::fs::write(&data, &bytes).unwrap();

    // A full hit (the files did not change), yet the damaged slot is caught on reading, both by
    // rgb and by a batch, and decoded again from the file.
    let (ds, store, _) = open(d, &cache, false);
    assert_eq!(store.cache().unwrap().built, 0);
    assert_eq!(pixels_of(&ds, &store, "b.png"), want_b);
    assert_eq!(store.repaired(), 1);
    assert_eq!(store.batch_pixels(&[b], None).unwrap(), want_batch);
    drop(store);
    // The repair was written back: the next start reads the slot cleanly.
    let (ds, store, _) = open(d, &cache, false);
    assert_eq!(pixels_of(&ds, &store, "b.png"), want_b);
    assert_eq!(store.repaired(), 0);

    // A read that fails (the data file cut short under a running store) is an error, not a
    // missing image.
    std::fs::File::options()
        .write(true)
        .open(&data)
        .unwrap()
        .set_len(10)
        .unwrap();
    let err = format!("{:#}", store.rgb(b).unwrap_err());
    assert!(err.contains("reading slot") && err.contains("image cache"), "{err}");
    assert!(store.batch_pixels(&[b], None).is_err());
}
