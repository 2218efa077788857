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

use clip_core::nn::Precision;

use crate::verify::{build, precision_flag, workspace_root};

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
    /// Then distil the run into a small student (assets/configs/fashion-mnist-student.toml, or
    /// --student), and train the same student alone for the same epochs: the table of teacher,
    /// distilled and undistilled student (test accuracy, multiply-adds, parameters, speed).
    /// Example: cargo xtask fashion-mnist --distill --teacher target/fashion-mnist/run --images-only
    #[arg(long)]
    distill: bool,
    /// The student's config for --distill.
    #[arg(long, value_name = "FILE", requires = "distill")]
    student: Option<PathBuf>,
    /// With --distill: the teacher is this existing run folder (else the default run is trained).
    #[arg(long, value_name = "RUN", requires = "distill")]
    teacher: Option<PathBuf>,
    /// With --distill: also distil the student from the teacher on the training images alone —
    /// a folder of them without labels or captions, the feature term only — its captions then
    /// answered by the teacher's text tower (a fourth row).
    #[arg(long = "images-only", requires = "distill")]
    images_only: bool,
    /// GEMM precision for training (stage 4) and the test evaluation (clip-predict eval): fp32
    /// (default) or bf16 — mixed precision as PyTorch autocast: bf16 operands with fp32
    /// accumulation on AMX tiles, everything else fp32; refused on CPUs without AMX. Each JSON
    /// line records it.
    #[arg(long, value_name = "fp32|bf16", value_parser = crate::verify::parse_precision)]
    precision: Option<Precision>,
}

pub fn run(args: Args) -> Result<bool> {
    let root = workspace_root();
    let config = args
        .config
        .unwrap_or_else(|| root.join("assets/configs/fashion-mnist.toml"));
    let epochs = args.epochs;
    let limit = args.train_limit;
    let precision = args.precision;
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

    // The teacher's run, and whether its stage 4 passed (not known for an existing run).
    let (run, passed) = match &args.teacher {
        Some(run) => (run.clone(), None),
        None => {
            let run = out.join("run");
            let passed = train(&bins, &config, &train_dir, &run, epochs, None, precision)?;
            (run, Some(passed))
        }
    };
    let (eval, eval_secs) = evaluate(&bins, &run, &test_dir, &out.join("confusion.png"), precision)?;
    let line = summary(
        &run,
        &train_dir,
        &eval,
        eval_secs,
        started.elapsed().as_secs_f64(),
        prepared,
        passed,
    )?;
    println!("{line}");
    if !args.distill {
        return Ok(true);
    }

    // Distillation: the same student with the run as its teacher, and alone.
    let student = args
        .student
        .unwrap_or_else(|| root.join("assets/configs/fashion-mnist-student.toml"));
    let mut rows = vec![("teacher".to_string(), run.clone(), line)];
    // (name, run folder, config, training data, teacher)
    let mut students = vec![
        (
            "student, distilled",
            "student-distilled",
            student.clone(),
            train_dir.clone(),
            Some(run.as_path()),
        ),
        (
            "student, alone",
            "student-alone",
            student.clone(),
            train_dir.clone(),
            None,
        ),
    ];
    if args.images_only {
        let flat = out.join(format!("{}-images", train_dir.file_name().unwrap().to_string_lossy()));
        flatten(&train_dir, &flat)?;
        let config = images_only_config(&student, &out)?;
        students.push((
            "student, images only",
            "student-images-only",
            config,
            flat,
            Some(run.as_path()),
        ));
    }
    for (name, folder, config, data, teacher) in students {
        let dir = out.join(folder);
        let t = Instant::now();
        let passed = train(&bins, &config, &data, &dir, epochs, teacher, precision)?;
        let (eval, eval_secs) = evaluate(&bins, &dir, &test_dir, &dir.join("confusion.png"), precision)?;
        let line = summary(
            &dir,
            &data,
            &eval,
            eval_secs,
            t.elapsed().as_secs_f64(),
            0.0,
            Some(passed),
        )?;
        println!("{line}");
        rows.push((name.to_string(), dir, line));
    }
    // Speed: the test set through each model once more, one after the other on an otherwise
    // idle machine (the ratio is what means something, not the absolute figure).
    eprintln!("\ntimed: the 10,000 test images through each model (clip-predict eval), one after the other");
    let mut speed = vec![];
    for (_, dir, _) in &rows {
        let (_, secs) = evaluate(&bins, dir, &test_dir, &dir.join("confusion.png"), precision)?;
        speed.push(count_files(&test_dir) as f64 / secs);
    }
    let table = distill_table(&rows, &speed)?;
    eprintln!("\n{table}");
    println!(
        "{}",
        json!({
            "distillation": rows.iter().zip(&speed).map(|((name, dir, line), s)| json!({
                "model": name,
                "run": dir,
                "test_accuracy": line["test_accuracy"],
                "image_macs": line["image_macs"],
                "parameters": line["parameters"],
                "test_images_per_second": s.round(),
                "precision": line["precision"],
            })).collect::<Vec<_>>(),
            "eval_precision": precision.unwrap_or_default().name(),
            "cpu": crate::bench::cpu_model(),
        })
    );
    Ok(true)
}

/// Stage 4 on the class folders (a fresh run folder), distilling from `teacher` when given.
/// Whether its gates passed; an error when it saved no model.
fn train(
    bins: &Path,
    config: &Path,
    data: &Path,
    run: &Path,
    epochs: Option<usize>,
    teacher: Option<&Path>,
    precision: Option<Precision>,
) -> Result<bool> {
    if run.exists() {
        std::fs::remove_dir_all(run)?;
    }
    let mut cmd = Command::new(bins.join("stage4-train"));
    cmd.arg("--config")
        .arg(config)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(run)
        .arg("--device")
        .arg("cpu")
        .arg("--json")
        .arg(run.with_extension("stage4.json"));
    if let Some(e) = epochs {
        cmd.arg("--epochs").arg(e.to_string());
    }
    if let Some(t) = teacher {
        cmd.arg("--teacher").arg(t);
    }
    cmd.args(precision_flag(precision));
    eprintln!("training: {}", crate::verify::display(&cmd));
    let status = cmd.status().context("running stage4-train")?;
    if !run.join("model.safetensors").is_file() {
        bail!("stage 4 failed before saving a model (see its output above)");
    }
    if !status.success() {
        eprintln!(
            "stage 4's gate failed for {} (see above); evaluating the model it saved",
            run.display()
        );
    }
    Ok(status.success())
}

/// The training images in one folder, without their class folders (so without labels or
/// captions): hard links to the class folders' files (a copy where links fail), named by their
/// index as there.
fn flatten(classes: &Path, flat: &Path) -> Result<()> {
    let done = flat.join(".complete");
    if done.is_file() {
        return Ok(());
    }
    std::fs::create_dir_all(flat)?;
    let mut n = 0;
    for class in std::fs::read_dir(classes)? {
        let class = class?.path();
        // Class folders only: not the image cache kept beside them (`.clipmine-cache`).
        if !class.is_dir() || class.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
            continue;
        }
        for f in std::fs::read_dir(&class)? {
            let f = f?.path();
            if f.extension().is_none_or(|x| x != "png") {
                continue;
            }
            let to = flat.join(f.file_name().unwrap());
            if !to.exists() && std::fs::hard_link(&f, &to).is_err() {
                std::fs::copy(&f, &to).with_context(|| format!("copying {} to {}", f.display(), to.display()))?;
            }
            n += 1;
        }
    }
    std::fs::write(&done, format!("{n}\n"))?;
    Ok(())
}

/// The student's config with the feature term alone (the contrastive and affinity terms
/// compare images with captions, which images alone do not have), written beside the runs.
fn images_only_config(student: &Path, out: &Path) -> Result<PathBuf> {
    let mut cfg = clip_core::ClipConfig::from_toml_file(student)?;
    cfg.name = format!("{}-images-only", cfg.name);
    cfg.distill.contrastive = 0.0;
    cfg.distill.affinity = 0.0;
    let path = out.join(format!("{}.toml", cfg.name));
    std::fs::write(&path, cfg.to_toml()?)?;
    Ok(path)
}

/// `clip-predict eval` zero-shot on the test folders (in `precision`, fp32 unless given): its
/// JSON and the seconds it took.
fn evaluate(
    bins: &Path,
    run: &Path,
    test: &Path,
    confusion: &Path,
    precision: Option<Precision>,
) -> Result<(Value, f64)> {
    let t = Instant::now();
    let o = Command::new(bins.join("clip-predict"))
        .args(["--json", "--device", "cpu"])
        .args(precision_flag(precision))
        .args(["eval", "--run"])
        .arg(run)
        .arg("--data")
        .arg(test)
        .arg("--confusion")
        .arg(confusion)
        .output()
        .context("running clip-predict eval")?;
    if !o.status.success() {
        bail!("clip-predict eval failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    let eval: Value = serde_json::from_slice(&o.stdout).context("parsing clip-predict's JSON")?;
    Ok((eval, t.elapsed().as_secs_f64()))
}

/// One JSON line for a trained run: its config, epochs, times, training speed, test accuracy,
/// size, and whether stage 4 passed (`None`: an existing run, not trained here).
fn summary(
    run: &Path,
    train_dir: &Path,
    eval: &Value,
    eval_secs: f64,
    wall: f64,
    prepared: f64,
    stage4_passed: Option<bool>,
) -> Result<Value> {
    let metrics: Value = serde_json::from_str(&std::fs::read_to_string(run.join("metrics.json"))?)?;
    let history = metrics["history"].as_array().cloned().unwrap_or_default();
    let pps: Vec<f64> = history.iter().filter_map(|h| h["pairs_per_second"].as_f64()).collect();
    let train_secs: f64 = history.iter().filter_map(|h| h["seconds"].as_f64()).sum();
    let cfg = clip_core::ClipConfig::from_toml_file(&run.join(clip_core::run_dir::CONFIG))?;
    // Counted in the saved weights (BatchNorm statistics included; no model to build, nor a
    // pretrained tower to fetch for it),
    // leaving out a distilled student's maps into its teacher's space: they serve training only.
    let weights = run.join("model.safetensors");
    let params: usize = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu)
        .with_context(|| format!("reading {}", weights.display()))?
        .iter()
        .filter(|(name, _)| !name.starts_with("distill."))
        .map(|(_, t)| t.elem_count())
        .sum();
    Ok(json!({
        "preset": metrics["config"],
        "epochs": history.len(),
        "train_images": count_files(train_dir),
        "wall_seconds": (wall * 10.0).round() / 10.0,
        "train_seconds": (train_secs * 10.0).round() / 10.0,
        "prepare_seconds": (prepared * 10.0).round() / 10.0,
        "eval_seconds": (eval_secs * 10.0).round() / 10.0,
        "train_pairs_per_second": (pps.iter().sum::<f64>() / pps.len().max(1) as f64).round(),
        "test_accuracy": eval["accuracy"],
        "best_epoch": metrics["best_epoch"],
        "parameters": params,
        "image_macs": image_macs(&cfg.image),
        "model_bytes": std::fs::metadata(&weights).map(|m| m.len()).ok(),
        "stage4_passed": stage4_passed,
        // The run's, as its config.toml records it; the evaluation's as clip-predict reports it.
        "precision": cfg.train.precision.name(),
        "eval_precision": eval["precision"],
    }))
}

/// The teacher, the distilled and the undistilled student, side by side.
fn distill_table(rows: &[(String, PathBuf, Value)], speed: &[f64]) -> Result<String> {
    let mut s = format!(
        "{:<20} {:>9} {:>12} {:>11} {:>10} {:>14}\n",
        "", "accuracy", "MACs/image", "parameters", "size", "test images/s"
    );
    for ((name, _, line), sp) in rows.iter().zip(speed) {
        s.push_str(&format!(
            "{name:<20} {:>9.3} {:>10.2} M {:>9.2} M {:>7.2} MB {:>14.0}\n",
            line["test_accuracy"].as_f64().unwrap_or(f64::NAN),
            line["image_macs"].as_f64().unwrap_or(f64::NAN) / 1e6,
            line["parameters"].as_f64().unwrap_or(f64::NAN) / 1e6,
            line["model_bytes"].as_f64().unwrap_or(f64::NAN) / 1e6,
            sp
        ));
    }
    let (t, d, a) = (
        rows[0].2["test_accuracy"].as_f64().unwrap_or(0.0),
        rows[1].2["test_accuracy"].as_f64().unwrap_or(0.0),
        rows[2].2["test_accuracy"].as_f64().unwrap_or(0.0),
    );
    if t > a {
        s.push_str(&format!(
            "the teacher closes {:.0}% of the gap the student alone leaves ({a:.3} → {d:.3}, teacher {t:.3}); the student reads {:.1}× fewer multiply-adds per image and embeds {:.1}× faster\n",
            100.0 * (d - a) / (t - a),
            rows[0].2["image_macs"].as_f64().unwrap_or(0.0) / rows[1].2["image_macs"].as_f64().unwrap_or(1.0),
            speed[1] / speed[0]
        ));
    }
    Ok(s)
}

/// Multiply-adds of a ResNet image tower (basic blocks) on one image, conv by conv: the stem,
/// each block's two 3×3 convolutions and its 1×1 shortcut where the shape changes. Batch norms,
/// ReLUs and the pooling are left out (a few % at most). `None` for other towers.
///
/// The fashion-mnist config (28 px, stem 16, stages 16/32/64): 0.34 + 3.61 + 2.81 + 2.81 =
/// 9.57 M; the student (stem 8, stages 8/16/24): 0.17 + 0.90 + 0.70 + 0.44 = 2.22 M.
fn image_macs(cfg: &clip_core::config::ImageConfig) -> Option<u64> {
    use clip_core::config::{Block, ImageArch};
    if cfg.arch != ImageArch::Resnet || cfg.block != Block::Basic {
        return None;
    }
    let out = |s: u64, k: u64, stride: u64| (s + 2 * (k / 2) - k) / stride + 1;
    let k = cfg.stem_kernel as u64;
    let mut s = out(cfg.image_size as u64, k, cfg.stem_stride as u64);
    let mut c = cfg.stem_width as u64;
    let mut macs = s * s * c * 3 * k * k;
    if cfg.stem_pool {
        s = out(s, 3, 2);
    }
    for (i, (&depth, &w)) in cfg.depths.iter().zip(&cfg.widths).enumerate() {
        let w = w as u64;
        for j in 0..depth {
            let stride = if i > 0 && j == 0 { 2 } else { 1 };
            let so = out(s, 3, stride);
            macs += so * so * w * c * 9 + so * so * w * w * 9;
            if stride != 1 || c != w {
                macs += so * so * w * c;
            }
            s = so;
            c = w;
        }
    }
    Some(macs)
}

/// The PNG images of a folder: in its class folders, or in itself (images alone). Caches kept
/// beside them are not counted.
fn count_files(dir: &Path) -> usize {
    let pngs = |d: &Path| {
        std::fs::read_dir(d)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.path().extension().is_some_and(|x| x == "png"))
                    .count()
            })
            .unwrap_or(0)
    };
    let classes: usize = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .map(|e| pngs(&e.path()))
                .sum()
        })
        .unwrap_or(0);
    classes + pngs(dir)
}

fn read_idx(source: &Path, name: &str) -> Result<Vec<u8>> {
    let plain = source.join(name);
    let gz = source.join(format!("{name}.gz"));
    let bytes = if plain.is_file() {
        std::fs::read(&plain)?
    } else {
        // Fashion-MNIST's largest file is 47 MB; a limit keeps a corrupt or hostile .gz from
        // filling memory.
        const MAX_BYTES: u64 = 256 << 20;
        let mut out = vec![];
        flate2::read::GzDecoder::new(std::fs::File::open(&gz).with_context(|| format!("opening {}", gz.display()))?)
            .take(MAX_BYTES + 1)
            .read_to_end(&mut out)
            .with_context(|| format!("decompressing {}", gz.display()))?;
        if out.len() as u64 > MAX_BYTES {
            bail!(
                "{} decompresses to more than {} MiB: not a Fashion-MNIST file",
                gz.display(),
                MAX_BYTES >> 20
            );
        }
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
    let idx = crate::idx::Idx::parse(&images, &labels, LABELS.len())
        .with_context(|| format!("{prefix}: not Fashion-MNIST IDX files"))?;
    let (n, h, w) = (idx.n, idx.h, idx.w);
    let n = limit.map_or(n, |l| l.min(n));
    eprintln!("writing {n} {prefix} images to {}", dir.display());
    for l in LABELS {
        std::fs::create_dir_all(dir.join(l))?;
    }
    for i in 0..n {
        let (label, px) = idx.get(i).context("image past the end")?;
        let img = image::GrayImage::from_raw(w as u32, h as u32, px.to_vec()).context("image size")?;
        img.save(dir.join(LABELS[label]).join(format!("{i:05}.png")))?;
    }
    std::fs::write(&done, format!("{n}\n"))?;
    Ok(())
}

#[cfg(test)]
mod macs_tests {
    use super::*;

    fn image(name: &str) -> clip_core::config::ImageConfig {
        let path = workspace_root().join("assets/configs").join(name);
        clip_core::ClipConfig::from_toml_file(&path).unwrap().image
    }

    #[test]
    fn the_student_reads_at_least_4x_fewer_multiply_adds_per_image() {
        let teacher = image_macs(&image("fashion-mnist.toml")).unwrap();
        let student = image_macs(&image("fashion-mnist-student.toml")).unwrap();
        // By hand: stem 28²·16·27 = 338,688; layer1 2·28²·16·16·9 = 3,612,672; layer2
        // 14²·32·(16 + 32)·9 + 14²·32·16 = 2,809,856; layer3 7²·64·(32 + 64)·9 + 7²·64·32 = 2,809,856.
        assert_eq!(teacher, 338_688 + 3_612_672 + 2_809_856 + 2_809_856);
        assert!(teacher as f64 / student as f64 >= 4.0, "{teacher} / {student}");
    }
}
