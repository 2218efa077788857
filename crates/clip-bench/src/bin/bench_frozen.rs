//! Training epochs with both towers frozen: cached features against running the frozen towers on
//! every batch, printed as one JSON object (run through `cargo xtask bench frozen`).
//!
//!     cargo run --release -p clip-bench --bin bench_frozen -- --preset tiny --images 256
//!
//! The same config, data and seed train twice: once with the towers' features computed once and
//! cached (the time to build the cache is reported apart: it is paid once per dataset and tower),
//! once running the frozen towers in every step. `ratio` is how many times faster a cached epoch
//! is, by wall clock; `cpu_ratio` the same by the process's CPU time, which a busy machine
//! disturbs less. Images are generated (64×64 PNGs, one caption each) in a temporary folder.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::Parser;
use clip_bench::cpu_seconds;
use clip_core::fit::Trainer;
use clip_core::prepare::{prepare, DataSource};
use clip_core::ClipConfig;
use image::{Rgb, RgbImage};

#[derive(Parser)]
struct Args {
    /// Config preset (tiny: 64 px, small towers; simple-clip: ResNet50 + DistilBERT, 224 px).
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// Generated images (one caption each).
    #[arg(long, default_value_t = 256)]
    images: usize,
    /// Timed epochs recomputing the towers (cached epochs are timed over ten times as many, so
    /// their short time is measured well).
    #[arg(long, default_value_t = 2)]
    epochs: usize,
    /// Pairs per batch [default: the preset's].
    #[arg(long)]
    batch_size: Option<usize>,
    #[command(flatten)]
    precision: clip_cli::PrecisionArg,
}

/// A temporary folder removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn synthetic(n: usize) -> Result<TempDir> {
    let dir = TempDir(std::env::temp_dir().join(format!("clipmine-bench-frozen-{}", std::process::id())));
    std::fs::create_dir_all(dir.0.join("images")).with_context(|| format!("creating {}", dir.0.display()))?;
    let mut csv = String::from("image,caption\n");
    for i in 0..n {
        let k = i as u32;
        let img = RgbImage::from_fn(64, 64, |x, y| {
            Rgb([(x * 3 + k * 7) as u8, (y * 2 + k * 13) as u8, ((x ^ y) + k) as u8])
        });
        img.save(dir.0.join(format!("images/{i}.png")))?;
        csv.push_str(&format!("{i}.png,picture number {i} of {}\n", n - i));
    }
    std::fs::write(dir.0.join("captions.csv"), csv)?;
    Ok(dir)
}

/// Seconds (wall, CPU) per epoch over `epochs` training epochs, and the first epoch's loss.
fn time_epochs(t: &mut Trainer, epochs: usize) -> Result<(f64, Option<f64>, f64)> {
    let (wall, cpu) = (Instant::now(), cpu_seconds());
    let mut first = f64::NAN;
    for e in 0..epochs {
        let loss = t.train_epoch(|_, _, _| {})?.0;
        if e == 0 {
            first = loss;
        }
        t.skip_end_of_epoch();
    }
    let per_wall = wall.elapsed().as_secs_f64() / epochs as f64;
    let per_cpu = cpu.zip(cpu_seconds()).map(|(a, b)| (b - a) / epochs as f64);
    Ok((per_wall, per_cpu, first))
}

fn main() -> Result<()> {
    // As the programs run: freed memory reused (clip_cli::memory).
    clip_cli::memory::keep_freed_memory();
    let args = Args::parse();
    let mut cfg = ClipConfig::preset(&args.preset)?;
    cfg.train.freeze_image = true;
    cfg.train.freeze_text = true;
    cfg.data.augment = false;
    let cached_epochs = args.epochs * 10;
    cfg.train.epochs = cached_epochs;
    if let Some(b) = args.batch_size {
        cfg.train.batch_size = b;
    }
    args.precision.apply(&mut cfg, &Device::Cpu)?;
    let tmp = synthetic(args.images)?;
    let source = DataSource {
        path: Some(tmp.0.clone()),
        ..DataSource::default()
    };
    let load = || prepare(&cfg, &source, &Device::Cpu, &clip_core::progress::Silent);
    let runs = tmp.0.join("runs");

    let mut cached = Trainer::new(&cfg, load()?, &runs.join("cached"))?;
    let (wall, cpu) = (Instant::now(), cpu_seconds());
    cached.frozen_features()?;
    let build_wall = wall.elapsed().as_secs_f64();
    let build_cpu = cpu.zip(cpu_seconds()).map(|(a, b)| b - a);
    let (cached_wall, cached_cpu, cached_loss) = time_epochs(&mut cached, cached_epochs)?;

    let mut direct = Trainer::new(&cfg, load()?, &runs.join("direct"))?;
    direct.set_feature_cache(None);
    let (direct_wall, direct_cpu, direct_loss) = time_epochs(&mut direct, args.epochs)?;

    let report = serde_json::json!({
        "bench": "frozen",
        "preset": cfg.name,
        "images": args.images,
        "pairs": cached.data().split.train.len(),
        "batch_size": cfg.train.batch_size,
        "cached_epochs": cached_epochs,
        "recomputed_epochs": args.epochs,
        "cache_build_seconds": build_wall,
        "cache_build_cpu_seconds": build_cpu,
        "cached_epoch_seconds": cached_wall,
        "recomputed_epoch_seconds": direct_wall,
        "ratio": direct_wall / cached_wall,
        "cached_epoch_cpu_seconds": cached_cpu,
        "recomputed_epoch_cpu_seconds": direct_cpu,
        "cpu_ratio": direct_cpu.zip(cached_cpu).map(|(d, c)| d / c),
        "first_epoch_loss_cached": cached_loss,
        "first_epoch_loss_recomputed": direct_loss,
        "threads": rayon::current_num_threads(),
        "precision": cfg.train.precision.name(),
    });
    println!("{report}");
    Ok(())
}
