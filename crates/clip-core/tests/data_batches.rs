//! Images and batches: every pixel layout becomes normalised 3-channel input, batches have the
//! shapes and padding the model expects, and shuffling and augmentation are reproducible.

use std::sync::Arc;

use candle_core::{Device, IndexOp, Tensor};
use clip_core::data::{
    epoch_seed, normalised_range, Batch, Dataset, ImageStore, LoadOptions, Loader, TextTokenizer, IMAGENET_MEAN,
    IMAGENET_STD,
};
use clip_core::ClipConfig;
use image::{GrayImage, ImageBuffer, Luma, LumaA, Rgb, RgbImage, Rgba, RgbaImage};

struct Demo {
    ds: Dataset,
    store: Arc<ImageStore>,
    loader: Loader,
    tok: TextTokenizer,
    cfg: ClipConfig,
}

fn demo() -> Demo {
    let cfg = ClipConfig::tiny();
    let (ds, store) = Dataset::load_with_images(
        &Dataset::demo_dir(),
        &LoadOptions::default(),
        &cfg,
        &clip_core::progress::Silent,
    )
    .unwrap();
    let tok = TextTokenizer::train(&ds.captions(), cfg.text.vocab_size, cfg.max_tokens()).unwrap();
    let store = Arc::new(store);
    let loader = Loader::new(&ds, store.clone(), &tok, &cfg, &Device::Cpu).unwrap();
    Demo {
        ds,
        store,
        loader,
        tok,
        cfg,
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn sizes(batches: impl Iterator<Item = anyhow::Result<Batch>>) -> Vec<usize> {
    batches.map(|b| b.unwrap().pairs.len()).collect()
}

fn pair_order(d: &Demo, pairs: &[usize], seed: Option<u64>) -> Vec<usize> {
    d.loader
        .batches(pairs, 8, seed, false)
        .flat_map(|b| b.unwrap().pairs)
        .collect()
}

#[test]
fn every_pixel_layout_becomes_rgb() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    GrayImage::from_fn(30, 20, |x, _| Luma([x as u8 * 8]))
        .save(p("grey.png"))
        .unwrap();
    GrayImage::from_fn(30, 20, |x, _| Luma([x as u8 * 8]))
        .save(p("grey.jpg"))
        .unwrap();
    ImageBuffer::<Luma<u16>, _>::from_pixel(20, 20, Luma([65535u16]))
        .save(p("grey16.png"))
        .unwrap();
    ImageBuffer::<Rgb<u16>, _>::from_pixel(20, 20, Rgb([65535u16, 0, 32896]))
        .save(p("rgb16.png"))
        .unwrap();
    ImageBuffer::<LumaA<u8>, _>::from_pixel(20, 20, LumaA([0, 0]))
        .save(p("grey_alpha.png"))
        .unwrap();
    // Left half transparent (black underneath), right half opaque red.
    RgbaImage::from_fn(40, 20, |x, _| {
        if x < 20 {
            Rgba([0, 0, 0, 0])
        } else {
            Rgba([255, 0, 0, 255])
        }
    })
    .save(p("rgba.png"))
    .unwrap();
    RgbImage::from_pixel(20, 20, Rgb([10, 200, 30]))
        .save(p("rgb.webp"))
        .unwrap();
    // The demo's horse is a 1-bit PNG (bit depth is byte 24 of a PNG).
    let horse = std::fs::read(Dataset::demo_dir().join("images/horse.png")).unwrap();
    assert_eq!(horse[24], 1, "horse.png should be a 1-bit PNG");
    std::fs::write(p("horse.png"), horse).unwrap();
    let names = [
        "grey.png",
        "grey.jpg",
        "grey16.png",
        "rgb16.png",
        "grey_alpha.png",
        "rgba.png",
        "rgb.webp",
        "horse.png",
    ];
    let csv: String = std::iter::once("image,caption\n".to_string())
        .chain(names.iter().map(|n| format!("{n},{n}\n")))
        .collect();
    std::fs::write(p("captions.csv"), csv).unwrap();

    let cfg = ClipConfig::tiny();
    let s = cfg.image.image_size;
    let (ds, store) =
        Dataset::load_with_images(dir.path(), &LoadOptions::default(), &cfg, &clip_core::progress::Silent).unwrap();
    assert_eq!(ds.images.len(), names.len());
    let px = |name: &str, x: usize, y: usize| {
        let i = ds.images.iter().position(|e| e.name == name).unwrap();
        let rgb = store.rgb(i).unwrap().unwrap();
        assert_eq!(rgb.len(), 3 * s * s);
        let o = (y * s + x) * 3;
        [rgb[o], rgb[o + 1], rgb[o + 2]]
    };
    for grey in ["grey.png", "grey.jpg", "horse.png"] {
        for (x, y) in [(0, 0), (20, 30), (63, 63)] {
            let [r, g, b] = px(grey, x, y);
            assert!(r == g && g == b, "{grey} at ({x},{y}): {r} {g} {b}");
        }
    }
    assert_eq!(px("grey16.png", 5, 5), [255, 255, 255]);
    assert_eq!(px("rgb16.png", 5, 5), [255, 0, 128]);
    assert_eq!(
        px("grey_alpha.png", 5, 5),
        [255, 255, 255],
        "transparent is laid on white"
    );
    assert_eq!(px("rgba.png", 2, 30), [255, 255, 255]);
    assert_eq!(px("rgba.png", 60, 30), [255, 0, 0]);
    let [r, g, b] = px("rgb.webp", 30, 30);
    assert!(r < 20 && g > 190 && b < 40, "{r} {g} {b}");
    let horse: Vec<u8> = (0..s).flat_map(|x| px("horse.png", x, s / 2)).collect();
    assert!(
        horse.contains(&0) && horse.contains(&255),
        "the silhouette is black on white"
    );

    let all: Vec<usize> = (0..names.len()).collect();
    let t = store.batch_tensor(&all, None, &Device::Cpu).unwrap();
    assert_eq!(t.dims(), [names.len(), 3, s, s]);
}

#[test]
fn pixels_are_normalised_with_imagenet_statistics() {
    let (lo, hi) = normalised_range();
    assert!((lo + 2.1179).abs() < 1e-3 && (hi - 2.64).abs() < 1e-3, "{lo} {hi}");

    let dir = tempfile::tempdir().unwrap();
    RgbImage::from_pixel(10, 10, Rgb([255, 255, 255]))
        .save(dir.path().join("white.png"))
        .unwrap();
    RgbImage::from_pixel(10, 10, Rgb([0, 0, 0]))
        .save(dir.path().join("black.png"))
        .unwrap();
    let cfg = ClipConfig::tiny();
    for (name, v) in [("white.png", 1.0), ("black.png", 0.0)] {
        let t = ImageStore::load_one(&dir.path().join(name), &cfg).unwrap();
        assert_eq!(t.dims(), [3, 64, 64]);
        for c in 0..3 {
            let want = (v - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
            assert!(
                values(&t.i(c).unwrap()).iter().all(|x| (x - want).abs() < 1e-5),
                "{name} channel {c}"
            );
        }
    }

    let d = demo();
    let all: Vec<usize> = (0..d.ds.images.len()).collect();
    let v = values(&d.store.batch_tensor(&all, None, &Device::Cpu).unwrap());
    assert!(v.iter().all(|x| (lo - 1e-5..=hi + 1e-5).contains(x)));
    let (min, max) = v.iter().fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    assert!(
        min < -1.5 && max > 2.0,
        "the demo images span dark and bright: {min} {max}"
    );
}

#[test]
fn plain_resize_or_centre_crop() {
    // 90×30: red, green and blue thirds. A plain resize keeps all three; a centre crop only green.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("thirds.png");
    RgbImage::from_fn(90, 30, |x, _| {
        [Rgb([255, 0, 0]), Rgb([0, 255, 0]), Rgb([0, 0, 255])][x as usize / 30]
    })
    .save(&path)
    .unwrap();
    let mut cfg = ClipConfig::tiny();
    let green = (1.0 - IMAGENET_MEAN[1]) / IMAGENET_STD[1];
    let at = |t: &Tensor, c: usize, x: usize| t.i((c, 32, x)).unwrap().to_scalar::<f32>().unwrap();
    let plain = ImageStore::load_one(&path, &cfg).unwrap();
    assert!(at(&plain, 0, 0) > 2.0 && at(&plain, 2, 63) > 2.0 && (at(&plain, 1, 32) - green).abs() < 1e-5);
    cfg.data.center_crop = true;
    let crop = ImageStore::load_one(&path, &cfg).unwrap();
    for x in [0, 32, 63] {
        assert!((at(&crop, 1, x) - green).abs() < 1e-5, "x = {x}");
    }
}

#[test]
fn load_one_prepares_an_image_as_training_does() {
    let d = demo();
    let i = d.ds.images.iter().position(|e| e.name == "coffee.jpg").unwrap();
    let one = ImageStore::load_one(&d.ds.images[i].path, &d.cfg).unwrap();
    let stored = d
        .store
        .batch_tensor(&[i], None, &Device::Cpu)
        .unwrap()
        .squeeze(0)
        .unwrap();
    assert_eq!(values(&one), values(&stored));
}

#[test]
fn batches_have_the_shapes_and_padding_the_model_expects() {
    let d = demo();
    let split = d.ds.split(d.cfg.data.val_fraction, d.cfg.seed);
    let (pad, cls, sep) = (d.tok.pad_id(), d.tok.cls_id(), d.tok.sep_id());
    let mut seen = vec![];
    for batch in d.loader.batches(&split.train, 8, None, false) {
        let batch = batch.unwrap();
        let b = batch.pairs.len();
        assert_eq!(batch.images.dims(), [b, 3, 64, 64]);
        let longest = batch
            .pairs
            .iter()
            .map(|&p| d.tok.encode(&d.ds.pairs[p].caption).unwrap().len())
            .max()
            .unwrap();
        assert_eq!(batch.input_ids.dims(), [b, longest]);
        assert_eq!(batch.attention_mask.dims(), [b, longest]);
        assert!(longest <= d.cfg.max_tokens());
        let ids = batch.input_ids.to_vec2::<u32>().unwrap();
        let mask = batch.attention_mask.to_vec2::<u32>().unwrap();
        for (k, (row, m)) in ids.iter().zip(&mask).enumerate() {
            assert_eq!(row[0], cls);
            let end = row.iter().position(|&t| t == sep).unwrap();
            assert_eq!(row[..=end], d.loader.tokens(batch.pairs[k])[..]);
            for j in 0..longest {
                assert_eq!(m[j] == 0, j > end, "mask of row {k} at {j}");
                assert_eq!(row[j] == pad, j > end, "padding of row {k} at {j}");
            }
        }
        seen.extend(batch.pairs);
    }
    assert_eq!(
        seen, split.train,
        "without a shuffle seed, pairs come in the given order"
    );
}

#[test]
fn shuffling_is_deterministic_per_seed() {
    let d = demo();
    let pairs: Vec<usize> = (0..24).collect();
    let a = pair_order(&d, &pairs, Some(epoch_seed(42, 0)));
    assert_eq!(a, pair_order(&d, &pairs, Some(epoch_seed(42, 0))));
    assert_ne!(a, pair_order(&d, &pairs, Some(epoch_seed(42, 1))));
    assert_ne!(a, pair_order(&d, &pairs, Some(epoch_seed(43, 0))));
    assert_ne!(a, pairs);
    let mut sorted = a.clone();
    sorted.sort();
    assert_eq!(sorted, pairs, "an epoch uses every pair once");
}

#[test]
fn the_last_partial_batch_is_kept_only_with_two_pairs() {
    let d = demo();
    let ten: Vec<usize> = (0..10).collect();
    assert_eq!(sizes(d.loader.batches(&ten, 4, None, false)), [4, 4, 2]);
    assert_eq!(sizes(d.loader.batches(&ten[..9], 4, None, false)), [4, 4]);
    assert_eq!(
        sizes(d.loader.batches(&ten[..1], 4, Some(1), false)),
        Vec::<usize>::new()
    );
    assert_eq!(
        (
            Loader::num_batches(10, 4),
            Loader::num_batches(9, 4),
            Loader::num_batches(1, 4)
        ),
        (3, 2, 0)
    );
    assert_eq!(d.loader.batches(&ten, 4, None, false).len(), 3);
    let errs: Vec<_> = d.loader.batches(&ten, 1, None, false).collect();
    assert_eq!(errs.len(), 1);
    assert!(errs[0].as_ref().err().unwrap().to_string().contains("at least 2 pairs"));
}

#[test]
fn augmentation_is_seeded_and_stays_in_range() {
    let d = demo();
    let pairs: Vec<usize> = (0..16).collect();
    let images = |seed: u64, augment: bool| -> Vec<f32> {
        d.loader
            .batches(&pairs, 8, Some(seed), augment)
            .flat_map(|b| values(&b.unwrap().images))
            .collect()
    };
    let a = images(5, true);
    assert_eq!(a, images(5, true));
    assert_ne!(a, images(5, false));
    assert_ne!(a, images(6, true));
    let (lo, hi) = normalised_range();
    assert!(a.iter().all(|x| (lo - 1e-5..=hi + 1e-5).contains(x)));
    // The same image twice in a batch gets two different crops.
    let twice = d.store.batch_tensor(&[0, 0], Some(9), &Device::Cpu).unwrap();
    assert_ne!(values(&twice.i(0).unwrap()), values(&twice.i(1).unwrap()));
}

#[test]
fn a_fixed_batch_may_repeat_an_image() {
    let d = demo();
    // Pairs 0, 1 and 2 are the three captions of the astronaut.
    let b = d.loader.batch(&[0, 1, 2]).unwrap();
    assert_eq!(b.images.dims()[0], 3);
    assert_eq!(values(&b.images.i(0).unwrap()), values(&b.images.i(2).unwrap()));
    assert!(d.loader.batch(&[0, 999]).is_err());
}

#[test]
fn dropping_the_batches_early_stops_the_loader() {
    let d = demo();
    let pairs: Vec<usize> = (0..30).collect();
    for _ in 0..20 {
        let mut batches = d.loader.batches(&pairs, 2, Some(1), true);
        assert!(batches.next().unwrap().is_ok());
        // Dropped with 14 batches to go: the worker must notice and end (or this test hangs).
    }
}

#[test]
fn the_loader_refuses_a_store_or_tokenizer_that_does_not_fit() {
    let d = demo();
    let mut cfg = d.cfg.clone();
    cfg.text.vocab_size = 20;
    let err = Loader::new(&d.ds, d.store.clone(), &d.tok, &cfg, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("text.vocab_size = 20"), "{err}");
    let mut cfg = d.cfg.clone();
    cfg.image.image_size = 32;
    let err = Loader::new(&d.ds, d.store.clone(), &d.tok, &cfg, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not made from this dataset and config"), "{err}");
}

#[test]
fn batches_and_the_loader_can_move_between_threads() {
    fn is_send<T: Send>() {}
    is_send::<Batch>();
    is_send::<Loader>();
    is_send::<clip_core::data::Batches>();
}

/// Embeddings for an index or an evaluation carry no autograd graph: with the model's weights as
/// `Var`s, an undetached output keeps every activation of its batch alive, and `clip-predict eval`
/// on 10,000 images grew to 16 GB that way.
#[test]
fn embeddings_hold_no_forward_graph() {
    let d = demo();
    let model = clip_core::ClipModel::new(&d.cfg, &Device::Cpu).unwrap();
    let images: Vec<usize> = (0..d.ds.images.len()).collect();
    let img = clip_core::embed::embed_store_images(&model, &d.store, &images, 2, &Device::Cpu).unwrap();
    assert_eq!(img.dims()[0], images.len());
    assert!(!img.track_op(), "image embeddings keep their forward graph");
    let caps = d.ds.captions();
    let refs: Vec<&str> = caps.iter().map(String::as_str).collect();
    let txt = clip_core::embed::embed_texts(&model, &d.tok, &refs, 2, &Device::Cpu).unwrap();
    assert_eq!(txt.dims()[0], refs.len());
    assert!(!txt.track_op(), "caption embeddings keep their forward graph");
}

#[test]
fn each_ranks_share_is_its_slice_of_the_one_process_batch() {
    use clip_core::data::{Augment, Shard};
    let d = demo();
    let all: Vec<usize> = (0..d.ds.pairs.len()).collect();
    let seed = Some(epoch_seed(7, 1));
    // 30 pairs in batches of 8: 8, 8, 8 and 6 (3 per rank) — augmented, so the crops count too.
    let whole: Vec<Batch> = d
        .loader
        .batches(&all, 8, seed, Augment::Random)
        .map(|b| b.unwrap())
        .collect();
    let shares = |rank| -> Vec<Batch> {
        d.loader
            .batches_sharded(&all, 8, seed, Augment::Random, None, Shard { rank, ranks: 2 })
            .map(|b| b.unwrap())
            .collect()
    };
    let (r0, r1) = (shares(0), shares(1));
    assert_eq!((r0.len(), r1.len()), (4, 4));
    for ((w, a), b) in whole.iter().zip(&r0).zip(&r1) {
        let half = w.pairs.len() / 2;
        let global = a.global.as_ref().expect("a share carries its global batch");
        assert_eq!(global.pairs, w.pairs);
        assert_eq!(values(&global.positives), values(&w.positives));
        assert_eq!([&a.pairs[..], &b.pairs[..]].concat(), w.pairs);
        for (share, start) in [(a, 0), (b, half)] {
            assert_eq!(values(&share.images), values(&w.images.narrow(0, start, half).unwrap()));
            // Captions padded to the whole batch's longest.
            let ids = |t: &Tensor| t.to_dtype(candle_core::DType::F32).unwrap();
            assert_eq!(
                values(&ids(&share.input_ids)),
                values(&ids(&w.input_ids.narrow(0, start, half).unwrap()))
            );
            assert_eq!(
                values(&ids(&share.attention_mask)),
                values(&ids(&w.attention_mask.narrow(0, start, half).unwrap()))
            );
        }
    }
    assert!(whole[0].global.is_none());
    // An odd last batch loses a pair, one that is too small to share is dropped.
    let three = Shard { rank: 0, ranks: 3 };
    assert_eq!((three.rows(5), three.rows(2)), (Some(0..1), None));
    assert_eq!((three.num_batches(30, 9), three.num_batches(29, 9)), (4, 3));
    assert_eq!(Shard::WHOLE.num_batches(30, 8), 4);
    assert_eq!(Shard { rank: 1, ranks: 2 }.num_batches(31, 10), 3);
    // A batch the ranks cannot share equally is an error, not a wrong split.
    let odd = d
        .loader
        .batches_sharded(&all, 9, seed, Augment::Off, None, Shard { rank: 0, ranks: 2 })
        .next()
        .unwrap();
    assert!(odd.err().unwrap().to_string().contains("2 equal shares"));
}
