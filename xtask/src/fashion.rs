//! `cargo xtask fashion-mnist`: a real dataset end to end.
//!
//! Reads Fashion-MNIST from the Debian package `dataset-fashion-mnist`, writes it as class folders
//! (`<label>/*.png`), trains with stage 4 on captions made from the labels, and evaluates the
//! trained model zero-shot on the 10,000 test images with `clip-predict eval`. Prints one JSON line.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::verify::{build, workspace_root};

const SOURCE: &str = "/usr/share/datasets/fashion-mnist";
const LABELS: [&str; 10] = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
];

/// Train on Fashion-MNIST as class folders and report zero-shot test accuracy as one JSON line.
///
/// Reads Fashion-MNIST from the Debian package `dataset-fashion-mnist`, writes it as class folders,
/// trains with stage 4 on captions made from the labels, and evaluates the trained model on the
/// 10,000 test images with `clip-predict eval`.
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Training config (default: assets/configs/fashion-mnist.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Override the config's epochs.
    #[arg(long, value_name = "N")]
    epochs: Option<usize>,
    /// Use only the first N training images (quick checks).
    #[arg(long = "train-limit", value_name = "N")]
    train_limit: Option<usize>,
    /// Working folder (default: target/fashion-mnist).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// The IDX files.
    #[arg(long, value_name = "DIR", default_value = SOURCE)]
    source: PathBuf,
}

pub fn run(args: Args) -> Result<bool> {
    let root = workspace_root();
    let config = args
        .config
        .unwrap_or_else(|| root.join("assets/configs/fashion-mnist.toml"));
    let epochs = args.epochs;
    let limit = args.train_limit;
    let out = args.out.unwrap_or_else(|| root.join("target/fashion-mnist"));
    let source = args.source;
    if !source.join("train-images-idx3-ubyte.gz").is_file() && !source.join("train-images-idx3-ubyte").is_file() {
        bail!(
            "Fashion-MNIST is not in {}: install it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or pass --source DIR holding the IDX files",
            source.display()
        );
    }
    let bins = build(&root, false)?;
    let started = Instant::now();
    let train_dir = out.join(match limit {
        Some(n) => format!("train-{n}"),
        None => "train".into(),
    });
    let test_dir = out.join("test");
    export(&source, "train", &train_dir, limit)?;
    export(&source, "t10k", &test_dir, None)?;
    let prepared = started.elapsed().as_secs_f64();

    let run = out.join("run");
    if run.exists() {
        std::fs::remove_dir_all(&run)?;
    }
    let report = out.join("stage4-train.json");
    let mut cmd = Command::new(bins.join("stage4-train"));
    cmd.arg("--config")
        .arg(&config)
        .arg("--data")
        .arg(&train_dir)
        .arg("--out")
        .arg(&run)
        .arg("--device")
        .arg("cpu")
        .arg("--json")
        .arg(&report);
    if let Some(e) = epochs {
        cmd.arg("--epochs").arg(e.to_string());
    }
    eprintln!("training: {}", crate::verify::display(&cmd));
    let t = Instant::now();
    let status = cmd.status().context("running stage4-train")?;
    let train_secs = t.elapsed().as_secs_f64();
    if !run.join("model.safetensors").is_file() {
        bail!("stage 4 failed before saving a model (see its output above)");
    }

    let t = Instant::now();
    let o = Command::new(bins.join("clip-predict"))
        .args(["--json", "--device", "cpu", "eval", "--run"])
        .arg(&run)
        .arg("--data")
        .arg(&test_dir)
        .arg("--confusion")
        .arg(out.join("confusion.png"))
        .output()
        .context("running clip-predict eval")?;
    if !o.status.success() {
        bail!("clip-predict eval failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    let eval: Value = serde_json::from_slice(&o.stdout).context("parsing clip-predict's JSON")?;
    let metrics: Value = serde_json::from_str(&std::fs::read_to_string(run.join("metrics.json"))?)?;
    let history = metrics["history"].as_array().cloned().unwrap_or_default();
    let pps: Vec<f64> = history.iter().filter_map(|h| h["pairs_per_second"].as_f64()).collect();
    let line = json!({
        "preset": metrics["config"],
        "epochs": history.len(),
        "train_images": count_files(&train_dir),
        "wall_seconds": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        "train_seconds": (train_secs * 10.0).round() / 10.0,
        "prepare_seconds": (prepared * 10.0).round() / 10.0,
        "eval_seconds": (t.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        "train_pairs_per_second": (pps.iter().sum::<f64>() / pps.len().max(1) as f64).round(),
        "test_accuracy": eval["accuracy"],
        "best_epoch": metrics["best_epoch"],
        "stage4_passed": status.success(),
    });
    println!("{line}");
    Ok(true)
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| std::fs::read_dir(e.path()).map(|x| x.count()).unwrap_or(0))
                .sum()
        })
        .unwrap_or(0)
}

fn read_idx(source: &Path, name: &str) -> Result<Vec<u8>> {
    let plain = source.join(name);
    let gz = source.join(format!("{name}.gz"));
    let bytes = if plain.is_file() {
        std::fs::read(&plain)?
    } else {
        let mut out = vec![];
        flate2::read::GzDecoder::new(std::fs::File::open(&gz).with_context(|| format!("opening {}", gz.display()))?)
            .read_to_end(&mut out)
            .with_context(|| format!("decompressing {}", gz.display()))?;
        out
    };
    Ok(bytes)
}

/// Writes `<label>/<index>.png` for one split, once (a marker file records completion).
fn export(source: &Path, prefix: &str, dir: &Path, limit: Option<usize>) -> Result<()> {
    let done = dir.join(".complete");
    if done.is_file() {
        return Ok(());
    }
    let images = read_idx(source, &format!("{prefix}-images-idx3-ubyte"))?;
    let labels = read_idx(source, &format!("{prefix}-labels-idx1-ubyte"))?;
    let be = |b: &[u8], at: usize| u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize;
    if images.len() < 16 || be(&images, 0) != 2051 || labels.len() < 8 || be(&labels, 0) != 2049 {
        bail!("{prefix}: not Fashion-MNIST IDX files (bad magic numbers)");
    }
    let (n, h, w) = (be(&images, 4), be(&images, 8), be(&images, 12));
    if be(&labels, 4) != n || images.len() != 16 + n * h * w || labels.len() != 8 + n {
        bail!("{prefix}: image and label files do not match ({n} images)");
    }
    let n = limit.map_or(n, |l| l.min(n));
    eprintln!("writing {n} {prefix} images to {}", dir.display());
    for l in LABELS {
        std::fs::create_dir_all(dir.join(l))?;
    }
    for i in 0..n {
        let label = labels[8 + i] as usize;
        let px = images[16 + i * h * w..16 + (i + 1) * h * w].to_vec();
        let img = image::GrayImage::from_raw(w as u32, h as u32, px).context("image size")?;
        img.save(dir.join(LABELS[label]).join(format!("{i:05}.png")))?;
    }
    std::fs::write(&done, format!("{n}\n"))?;
    Ok(())
}
