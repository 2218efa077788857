//! Data pipeline throughput: how fast images decode at load, and how many batches per second
//! the loader delivers afterwards (shuffled, optionally augmented), printed as one JSON object.
//!
//!     cargo run --release -p clip-bench --bin bench_loader                    # the demo set
//!     cargo run --release -p clip-bench --bin bench_loader -- --synthetic 2000 --augment
//!
//! `--synthetic N` writes N 320×240 JPEGs (2 captions each) to a temporary folder first; that
//! time is not measured.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::Parser;
use clip_core::data::{epoch_seed, Dataset, LoadOptions, Loader, TextTokenizer};
use clip_core::ClipConfig;
use image::{Rgb, RgbImage};

#[derive(Parser)]
struct Args {
    /// Benchmark N generated images instead of the demo set.
    #[arg(long, value_name = "N")]
    synthetic: Option<usize>,
    /// Config preset (tiny: 64 px; simple-clip: 224 px).
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Pairs per batch [default: the preset's train.batch_size].
    #[arg(long)]
    batch_size: Option<usize>,
    /// Passes over all pairs.
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    /// Random resized crop + flip on every image.
    #[arg(long)]
    augment: bool,
}

/// A temporary folder removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn synthetic(n: usize) -> Result<TempDir> {
    let dir = TempDir(std::env::temp_dir().join(format!("clipmine-bench-loader-{}", std::process::id())));
    std::fs::create_dir_all(dir.0.join("images")).with_context(|| format!("creating {}", dir.0.display()))?;
    let mut csv = String::from("image,caption\n");
    for i in 0..n {
        // Smooth gradients plus a per-image pattern: compresses and decodes like a photo, not like noise.
        let k = i as u32;
        let img = RgbImage::from_fn(320, 240, |x, y| {
            Rgb([(x + k * 7) as u8, (y * 2 + k * 13) as u8, ((x ^ y) + k) as u8])
        });
        img.save(dir.0.join(format!("images/{i}.jpg")))?;
        csv.push_str(&format!("{i}.jpg,picture number {i}\n{i}.jpg,第{i}張照片\n"));
    }
    std::fs::write(dir.0.join("captions.csv"), csv)?;
    Ok(dir)
}

fn main() -> Result<()> {
    // As the programs run: freed memory reused (clip_cli::memory).
    clip_cli::memory::keep_freed_memory();
    let args = Args::parse();
    let cfg = ClipConfig::preset(&args.preset)?;
    let batch_size = args.batch_size.unwrap_or(cfg.train.batch_size);
    let tmp = args.synthetic.map(synthetic).transpose()?;
    let path = tmp.as_ref().map_or_else(Dataset::demo_dir, |t| t.0.clone());

    let t = Instant::now();
    let (ds, store) = Dataset::load_with_images(&path, &LoadOptions::default(), &cfg, &clip_core::progress::Silent)?;
    let load_seconds = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let tok = TextTokenizer::train(&ds.captions(), cfg.text.vocab_size, cfg.max_tokens())?;
    let tokenizer_seconds = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let loader = Loader::new(&ds, Arc::new(store), &tok, &cfg, &Device::Cpu)?;
    let tokenize_seconds = t.elapsed().as_secs_f64();

    let pairs: Vec<usize> = (0..ds.pairs.len()).collect();
    let t = Instant::now();
    let mut batches = 0;
    let mut seen = 0;
    for epoch in 0..args.epochs {
        for batch in loader.batches(&pairs, batch_size, Some(epoch_seed(cfg.seed, epoch)), args.augment) {
            let batch = batch?;
            seen += batch.pairs.len();
            batches += 1;
        }
    }
    let seconds = t.elapsed().as_secs_f64();
    let report = serde_json::json!({
        "dataset": if args.synthetic.is_some() { "synthetic" } else { "demo" },
        "preset": cfg.name,
        "image_size": cfg.image.image_size,
        "images": ds.images.len(),
        "pairs": ds.pairs.len(),
        "load_seconds": load_seconds,
        "images_decoded_per_second": ds.images.len() as f64 / load_seconds,
        "tokenizer_train_seconds": tokenizer_seconds,
        "tokenize_seconds": tokenize_seconds,
        "batch_size": batch_size,
        "augment": args.augment,
        "epochs": args.epochs,
        "batches": batches,
        "batches_per_second": batches as f64 / seconds,
        "pairs_per_second": seen as f64 / seconds,
        "threads": rayon::current_num_threads(),
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
