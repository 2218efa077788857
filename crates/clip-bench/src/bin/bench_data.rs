//! Datasets larger than memory: the image cache's first and second start, the memory a loader
//! run takes with the cache, and the loader's headroom over `simple-clip` training steps at
//! 224 px (cached, streaming, streaming with augmentation), printed as one JSON object.
//!
//!     cargo run -p clip-core --example bench_data -- --images 200000 --dir /big/disk/bench
//!
//! It writes N synthetic 224×224 JPEGs (one caption each) to `--dir` (kept, so a second call
//! reuses them; generation is not measured), then:
//!
//! 1. **first start**: loading the dataset and building the image cache (every image decoded);
//! 2. **second start**: the same, now a cache hit (every file only stat-ed);
//! 3. **loader, cached**: `--epochs` epochs of shuffled batches from the mapped cache, then the
//!    process's peak resident memory (VmHWM) — before any model exists, so it is the data's;
//! 4. **loader, streaming** and **streaming + augmentation** (decoding per batch), a few hundred
//!    batches each;
//! 5. **training**: `--train-steps` steps of `simple-clip` on one loader batch; headroom is loader
//!    pairs/s over training pairs/s.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::Parser;
use clip_bench::{cpu_seconds, peak_rss_mib};
use clip_core::data::{epoch_seed, Batch, Dataset, ImageStore, LoadOptions, Loader, StoreMode, TextTokenizer};
use clip_core::optim::AdamW;
use clip_core::progress::Silent;
use clip_core::{ClipConfig, ClipModel};
use image::{Rgb, RgbImage};
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Synthetic images (224×224 JPEGs).
    #[arg(long, default_value_t = 200_000)]
    images: usize,
    /// Where the images and their cache go [default: the temp folder's clipmine-bench-data-N].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Pairs per batch.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Epochs over the cached dataset for the memory measurement.
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Batches timed on the streaming paths.
    #[arg(long, default_value_t = 100)]
    stream_batches: usize,
    /// simple-clip training steps timed (after one warm-up step); 0 skips training.
    #[arg(long, default_value_t = 2)]
    train_steps: usize,
}

fn generate(dir: &std::path::Path, n: usize) -> Result<()> {
    let marker = dir.join("captions.csv");
    if marker.is_file() {
        return Ok(());
    }
    std::fs::create_dir_all(dir.join("images")).with_context(|| format!("creating {}", dir.display()))?;
    use rayon::prelude::*;
    (0..n).into_par_iter().try_for_each(|i| -> Result<()> {
        // Smooth gradients plus a per-image pattern: compresses and decodes like a photo, not noise.
        let k = i as u32;
        let img = RgbImage::from_fn(224, 224, |x, y| {
            Rgb([(x + k * 7) as u8, (y * 2 + k * 13) as u8, ((x ^ y) + k) as u8])
        });
        img.save(dir.join(format!("images/{i}.jpg")))?;
        Ok(())
    })?;
    let mut csv = String::from("image,caption\n");
    for i in 0..n {
        csv.push_str(&format!("{i}.jpg,picture number {i}\n"));
    }
    std::fs::write(&marker, csv)?;
    Ok(())
}

/// Wall and CPU seconds of `f`.
fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, f64, f64)> {
    let (t, c) = (Instant::now(), cpu_seconds().unwrap_or(0.0));
    let r = f()?;
    Ok((r, t.elapsed().as_secs_f64(), cpu_seconds().unwrap_or(0.0) - c))
}

/// Pairs/s of a loader over `limit` batches of each of `epochs` epochs, with the seconds and
/// pairs it took.
fn loader_rate(
    loader: &Loader,
    pairs: &[usize],
    b: usize,
    seed: u64,
    augment: bool,
    epochs: usize,
    limit: usize,
) -> Result<(f64, f64, usize)> {
    let (n, wall, _) = timed(|| {
        let mut n = 0;
        for e in 0..epochs {
            for batch in loader.batches(pairs, b, Some(epoch_seed(seed, e)), augment).take(limit) {
                n += batch?.pairs.len();
            }
        }
        Ok(n)
    })?;
    Ok((n as f64 / wall, wall, n))
}

/// `steps` training steps of `cfg`'s model on `batch` of `b` pairs (after one warm-up step):
/// their report and the pairs/s they train.
fn train_rate(cfg: &ClipConfig, batch: &Batch, b: usize, steps: usize) -> Result<(serde_json::Value, f64)> {
    let model = ClipModel::new(cfg, &Device::Cpu)?;
    let mut opt = AdamW::new(&model.params, &cfg.train)?;
    let mut times = vec![];
    for step in 0..=steps {
        let ((), wall, _) = timed(|| {
            clip_core::train::train_step(&model, &mut opt, std::slice::from_ref(batch), cfg.train.clip_grad_norm)?;
            Ok(())
        })?;
        if step > 0 {
            times.push(wall);
        }
    }
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let train_pps = b as f64 / mean;
    let report = json!({"seconds_per_step": mean, "pairs_per_s": train_pps, "steps": times.len()});
    Ok((report, train_pps))
}

fn main() -> Result<()> {
    // As the programs run: freed memory reused (clip_cli::memory).
    clip_cli::memory::keep_freed_memory();
    let args = Args::parse();
    let cfg = ClipConfig::preset("simple-clip")?;
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("clipmine-bench-data-{}", args.images)));
    let (_, generate_s, _) = timed(|| generate(&dir, args.images))?;
    let cache = dir.join(".clipmine-cache");
    let _ = std::fs::remove_dir_all(&cache);
    let start = || -> Result<(Dataset, ImageStore)> {
        let mut ds = Dataset::load(&dir, &LoadOptions::default())?;
        let (store, bad) = ImageStore::open(&ds, &cfg, &StoreMode::Cache(None), false, &Silent)?;
        ds.drop_undecodable(&store, bad)?;
        Ok((ds, store))
    };
    let (_, first_s, first_cpu) = timed(start)?;
    let ((ds, store), second_s, second_cpu) = timed(start)?;
    let report = store.cache().cloned().context("no cache")?;
    let rss_after_start = peak_rss_mib();
    let tok = TextTokenizer::train(&ds.captions(), cfg.text.vocab_size, cfg.max_tokens())?;
    let pairs: Vec<usize> = (0..ds.pairs.len()).collect();
    let b = args.batch_size;

    let run = |loader: &Loader, augment: bool, epochs: usize, limit: usize| {
        loader_rate(loader, &pairs, b, cfg.seed, augment, epochs, limit)
    };
    let cached = Loader::new(&ds, Arc::new(store), &tok, &cfg, &Device::Cpu)?;
    let (cached_pps, cached_s, cached_n) = run(&cached, false, args.epochs, usize::MAX)?;
    let rss_loader = peak_rss_mib();
    drop(cached);
    let (stream_store, _) = ImageStore::open(&ds, &cfg, &StoreMode::Stream, false, &Silent)?;
    let streaming = Loader::new(&ds, Arc::new(stream_store), &tok, &cfg, &Device::Cpu)?;
    let (stream_pps, _, _) = run(&streaming, false, 1, args.stream_batches)?;
    let (augment_pps, _, _) = run(&streaming, true, 1, args.stream_batches)?;

    let (train, train_pps) = if args.train_steps > 0 {
        train_rate(&cfg, &streaming.batch(&pairs[..b])?, b, args.train_steps)?
    } else {
        (serde_json::Value::Null, f64::NAN)
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "bench": "data",
            "images": ds.images.len(),
            "image_size": cfg.image.image_size,
            "batch_size": b,
            "threads": rayon::current_num_threads(),
            "generate_seconds": generate_s,
            "first_start": {"seconds": first_s, "cpu_seconds": first_cpu},
            "second_start": {"seconds": second_s, "cpu_seconds": second_cpu},
            "start_speedup": first_s / second_s,
            "cache": {"hits": report.hits, "built": report.built, "bytes_on_disk": report.bytes_on_disk},
            "peak_rss_mib_after_start": rss_after_start,
            "loader_cached": {"pairs_per_s": cached_pps, "seconds": cached_s, "pairs": cached_n, "epochs": args.epochs},
            "peak_rss_mib_after_cached_epochs": rss_loader,
            "loader_stream_pairs_per_s": stream_pps,
            "loader_stream_augment_pairs_per_s": augment_pps,
            "train_simple_clip": train,
            "headroom": {
                "cached": cached_pps / train_pps,
                "stream": stream_pps / train_pps,
                "stream_augment": augment_pps / train_pps,
            },
        }))?
    );
    Ok(())
}
