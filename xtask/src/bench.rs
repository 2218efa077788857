//! `cargo xtask bench [train|infer|loader|search|micro]…`: speed measurements as JSON lines, never in tests.
//!
//! `train` times training steps of the `tiny` preset in clipmine and, when PyTorch is installed,
//! in the PyTorch reference of the same recipe (`xtask/reference/simple_clip.py bench`), in the
//! same run on the same machine, and prints their ratio of speed and of peak memory (RSS); `infer`
//! does the same for image and caption embeddings in evaluation mode (`simple_clip.py
//! bench-infer`). The reference runs with clipmine's thread count. With `--precision bf16`
//! clipmine's GEMMs run in bf16 on AMX and the reference in PyTorch's bf16 as its users run it:
//! autocast for training, and for inference both autocast and bf16 matmul precision, the faster
//! taken per metric; every line says which precision it ran in. The
//! programs are built in the release profile. Run it on an idle machine: a build beside a
//! benchmark slows it several times.

use std::process::Command;

use anyhow::{bail, Context, Result};
use clip_core::nn::Precision;
use serde_json::{json, Value};

use crate::verify::workspace_root;

/// Speed as JSON lines: training steps and inference against the PyTorch reference, the loader, an index, search.
///
/// `train` times training steps in clipmine and, when PyTorch is installed, in the PyTorch
/// reference of the same recipe, and prints their ratio; `infer` does the same for image and
/// caption embeddings (evaluation mode). Run it on an idle machine: a build beside
/// a benchmark slows it several times.
#[derive(Debug, clap::Args)]
#[command(
    verbatim_doc_comment,
    after_help = "Examples:\n  cargo xtask bench                          everything\n  cargo xtask bench train --no-reference     clipmine's training steps alone\n  cargo xtask bench infer --preset simple-clip --batch-size 8\n  cargo xtask bench loader search --batch-size 32\n  cargo xtask bench train infer --precision bf16 --preset clip-vit-b-32   bf16 GEMMs on AMX (run it again without --precision for fp32)"
)]
pub struct Args {
    /// What to measure; default: all.
    #[arg(value_enum, value_name = "WHAT")]
    what: Vec<What>,
    /// Model for `train` and `infer`.
    #[arg(long, value_name = "NAME", default_value = "tiny")]
    preset: String,
    /// Batch size for `train`, `infer` and `loader`.
    #[arg(long = "batch-size", value_name = "B", default_value_t = 16)]
    batch_size: usize,
    /// Timed steps for `train` and `infer` [default: 100 for tiny, 10 otherwise]. A `tiny` step
    /// takes ~20 ms: ten of them are over too soon for a ratio to stand out of the machine's noise.
    #[arg(long, value_name = "N")]
    steps: Option<usize>,
    /// Caption tokens for `train` and `infer` [default: 12 for tiny, 32 otherwise].
    #[arg(long = "seq-len", value_name = "L")]
    seq_len: Option<usize>,
    /// Skip the PyTorch reference.
    #[arg(long)]
    no_reference: bool,
    /// Synthetic images for `data`.
    #[arg(long, value_name = "N", default_value_t = 200_000)]
    images: usize,
    /// GEMM precision for `train`, `infer`, `index` and `frozen`: fp32 (default) or bf16 — mixed
    /// precision as PyTorch autocast: bf16 operands with fp32 accumulation on AMX tiles,
    /// everything else fp32; refused on CPUs without AMX. Every line of a model records it
    /// (`"precision"`). With bf16 the PyTorch reference runs autocast (training), and autocast
    /// and bf16 matmul precision (inference: the faster of the two, per metric).
    #[arg(long, value_name = "fp32|bf16", value_parser = crate::verify::parse_precision)]
    precision: Option<Precision>,
    /// Micro-batch for `micro`: the batch of --batch-size pairs runs through the towers this many
    /// pairs at a time (the gradient cache), measured against a plain batch of this size.
    #[arg(long = "micro-batch", value_name = "M", default_value_t = 16)]
    micro_batch: usize,
}

/// One benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum What {
    /// Training steps: clipmine against the PyTorch reference, as a ratio.
    Train,
    /// Inference: image and caption embeddings, clipmine against the PyTorch reference, as a ratio.
    Infer,
    /// The data pipeline against training steps.
    Loader,
    /// Building an image index.
    Index,
    /// Exact vs compact (int8) vs approximate (HNSW) search over 1M embeddings, compact over 10M.
    Search,
    /// Epochs with both towers frozen: cached features against recomputing them.
    Frozen,
    /// The image cache's starts, memory and the loader against simple-clip (only when named).
    Data,
    /// A big batch through the gradient cache (--batch-size B in micro-batches of --micro-batch
    /// M) against a plain batch of M: peak memory and time per pair, as ratios (only when named).
    Micro,
}

pub fn run(args: Args) -> Result<bool> {
    let Args {
        mut what,
        preset,
        batch_size,
        steps,
        seq_len,
        no_reference,
        images,
        precision,
        micro_batch,
    } = args;
    let bf16 = precision == Some(Precision::Bf16);
    // Passed to every program that runs a model; each line it prints records what it ran in.
    let precision: Vec<String> = precision
        .map(|p| vec!["--precision".to_string(), p.name().to_string()])
        .unwrap_or_default();
    let steps = steps.unwrap_or(if preset == "tiny" { 100 } else { 10 });
    let (batch, steps, reference) = (batch_size.to_string(), steps.to_string(), !no_reference);
    let seq_len = seq_len.map(|l| l.to_string());
    if what.is_empty() && clip_architecture(&preset).is_some() {
        what = vec![What::Train, What::Infer];
    } else if what.is_empty() {
        what = vec![
            What::Train,
            What::Infer,
            What::Loader,
            What::Index,
            What::Search,
            What::Frozen,
        ];
    }
    let root = workspace_root();
    // A pretrained-CLIP preset is benchmarked as its architecture with random weights (no
    // machine here reaches the real ones; the speed does not depend on them), against open_clip.
    let clip_arch = clip_architecture(&preset);
    if let Some((arch, _)) = clip_arch {
        if what
            .iter()
            .any(|w| !matches!(w, What::Infer | What::Train | What::Micro))
        {
            bail!("--preset {preset} (a pretrained CLIP, open_clip's {arch}) is benchmarked with `train`, `infer` and `micro` only");
        }
    }
    // open_clip always runs the whole 77-token context: so does clipmine here, for a fair ratio.
    let seq_len = seq_len.unwrap_or_else(|| {
        match (preset.as_str(), clip_arch) {
            (_, Some(_)) => "77",
            ("tiny", _) => "12",
            _ => "32",
        }
        .to_string()
    });
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(&cargo);
    // As in `verify::build`: xtask's own package variables would make ring rebuild.
    crate::verify::without_package_env(&mut build);
    let status = build
        .current_dir(&root)
        .args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "clip-bench",
            "--bin",
            "bench",
            "--bin",
            "bench_loader",
            "--bin",
            "bench_frozen",
            "--bin",
            "bench_data",
            "--bin",
            "bench_search",
        ])
        .status()?;
    if !status.success() {
        bail!("building the benchmarks failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .map(|t| if t.is_relative() { root.join(t) } else { t })
        .unwrap_or_else(|| root.join("target"));
    let examples = target.join("release");
    // The same model and batch on both sides: `bench train|infer` here, `simple_clip.py
    // bench|bench-infer` there.
    let shape_dir = match clip_arch {
        Some((arch, json)) => {
            let dir = target.join("bench-clip").join(arch);
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("open_clip_config.json"), json)?;
            Some(dir.display().to_string())
        }
        None => None,
    };
    let model_args = |sub: &'static str| {
        let mut args: Vec<String> = [
            sub,
            "--preset",
            &preset,
            "--batch-size",
            &batch,
            "--steps",
            &steps,
            "--seq-len",
            &seq_len,
        ]
        .map(String::from)
        .to_vec();
        if let Some(dir) = &shape_dir {
            args.extend(["--pretrained".to_string(), dir.clone()]);
        }
        args
    };
    // The same, with the precision: for clipmine's `bench` only (the reference takes none).
    let ours_args = |sub: &'static str| {
        let mut args = model_args(sub);
        args.extend(precision.iter().cloned());
        args
    };
    // Runs the reference with clipmine's thread count, prints its line and the ratio line.
    let compare = |ours: &Value, args: &[String], bench: &str, metrics: &[(&str, &str)]| -> Result<()> {
        // open_clip for a pretrained-CLIP preset, else the recipe's PyTorch reference.
        let (script, args): (&str, Vec<String>) = match clip_arch {
            Some((arch, _)) => (
                "clip_bench.py",
                [
                    if args.first().map(String::as_str) == Some("bench") {
                        "bench-train"
                    } else {
                        "bench-infer"
                    },
                    "--model",
                    arch,
                    "--batch-size",
                    &batch,
                    "--steps",
                    &steps,
                ]
                .map(String::from)
                .to_vec(),
            ),
            None => ("simple_clip.py", args.to_vec()),
        };
        let threads = ours["threads"].as_u64().map(|t| t.to_string());
        // Beside clipmine's bf16, PyTorch's bf16 as its users run it (the references'
        // --precision): autocast for training; for inference autocast and bf16 matmul precision
        // both, the faster of the two taken metric by metric. Beside fp32, its default (fp32).
        let training = args.first().map(String::as_str) == Some("bench");
        let modes: &[Option<&str>] = match (bf16, training) {
            (false, _) => &[None],
            (true, true) => &[Some("autocast")],
            (true, false) => &[Some("autocast"), Some("matmul-bf16")],
        };
        let mut lines = vec![];
        for mode in modes {
            let flags = threads
                .iter()
                .flat_map(|t| ["--threads", t.as_str()])
                .chain(mode.iter().flat_map(|m| ["--precision", *m]));
            let Some(theirs) = reference_line(&root, script, args.iter().map(String::as_str).chain(flags))? else {
                return Ok(());
            };
            println!("{theirs}");
            lines.push(theirs);
        }
        let precision_of = |v: &Value| v.get("precision").cloned().unwrap_or_else(|| json!("fp32"));
        let mut line = json!({
            "bench": bench, "preset": preset, "batch_size": batch, "seq_len": seq_len,
            "clipmine_threads": ours["threads"], "pytorch_threads": lines[0]["threads"], "cpu": cpu_model(),
            "clipmine_precision": ours["precision"],
            "pytorch_precision": lines.iter().map(precision_of).collect::<Vec<_>>(),
        });
        let num = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        for (key, ratio) in metrics {
            let theirs = best_of(&lines, key);
            let (a, b) = (num(ours, key), num(theirs, key));
            line[format!("clipmine_{key}")] = json!(a);
            line[format!("pytorch_{key}")] = json!(b);
            line[format!("pytorch_{key}_precision")] = precision_of(theirs);
            line[*ratio] = json!(a / b);
        }
        println!("{line}");
        Ok(())
    };
    let mut steps_per_s = None;
    let mut train_precision = Value::Null;
    for w in what {
        match w {
            What::Train => {
                let ours = json_line(Command::new(examples.join("bench")).args(ours_args("train")))?;
                println!("{ours}");
                steps_per_s = ours["ms_per_step"].as_f64().map(|ms| 1e3 / ms);
                train_precision = ours["precision"].clone();
                if reference {
                    compare(
                        &ours,
                        &model_args("bench"),
                        "train-ratio",
                        &[
                            ("pairs_per_s", "clipmine_over_pytorch"),
                            ("peak_rss_mb", "rss_clipmine_over_pytorch"),
                        ],
                    )?;
                }
            }
            What::Infer => {
                let ours = json_line(Command::new(examples.join("bench")).args(ours_args("infer")))?;
                println!("{ours}");
                if reference {
                    compare(
                        &ours,
                        &model_args("bench-infer"),
                        "infer-ratio",
                        &[
                            ("images_per_s", "images_clipmine_over_pytorch"),
                            ("captions_per_s", "captions_clipmine_over_pytorch"),
                            ("peak_rss_mb", "rss_clipmine_over_pytorch"),
                        ],
                    )?;
                }
            }
            What::Loader => {
                for extra in [vec![], vec!["--synthetic", "1000", "--augment"]] {
                    let l = json_line(
                        Command::new(examples.join("bench_loader"))
                            .args(["--batch-size", &batch])
                            .args(&extra),
                    )?;
                    println!("{l}");
                    // The loader must outpace training: batches it delivers per training step.
                    if let (Some(bps), Some(sps)) = (l["batches_per_second"].as_f64(), steps_per_s) {
                        let line = json!({"bench": "loader-vs-train", "augment": !extra.is_empty(), "loader_batches_per_s": bps, "train_steps_per_s": sps, "headroom": bps / sps, "train_precision": train_precision});
                        println!("{line}");
                    }
                }
            }
            What::Index => println!(
                "{}",
                json_line(Command::new(examples.join("bench")).arg("index").args(&precision))?
            ),
            What::Micro => {
                let micro = micro_batch.to_string();
                // `train`'s arguments with another batch size and step count.
                let with = |all: Vec<String>, b: &str, steps: usize| {
                    let mut args = vec![];
                    let mut it = all.into_iter();
                    while let Some(a) = it.next() {
                        if a == "--batch-size" || a == "--steps" {
                            it.next();
                        } else {
                            args.push(a);
                        }
                    }
                    args.extend(["--batch-size", b, "--warmup", "1"].map(String::from));
                    args.extend(["--steps".to_string(), steps.to_string()]);
                    args
                };
                let n: usize = steps.parse()?;
                let small = json_line(Command::new(examples.join("bench")).args(with(ours_args("train"), &micro, n)))?;
                println!("{small}");
                // As many pairs as the small run's steps, at least one step.
                let big_steps = (n * micro_batch / batch_size).max(1);
                let mut big_args = with(ours_args("train"), &batch, big_steps);
                big_args.extend(["--micro-batch".to_string(), micro.clone()]);
                let big = json_line(Command::new(examples.join("bench")).args(big_args))?;
                println!("{big}");
                let ratio = |a: &Value, b: &Value| match (a.as_f64(), b.as_f64()) {
                    (Some(a), Some(b)) if b > 0.0 => json!(a / b),
                    _ => Value::Null,
                };
                let line = json!({
                    "bench": "micro-ratio", "preset": preset, "batch_size": batch_size, "micro_batch": micro_batch,
                    "precision": big["precision"], "cpu": cpu_model(),
                    "memory_big_over_small": ratio(&big["peak_rss_mb"], &small["peak_rss_mb"]),
                    "time_per_pair_big_over_small": ratio(&small["pairs_per_s"], &big["pairs_per_s"]),
                    "targets": {"memory_big_over_small": 1.3, "time_per_pair_big_over_small": 1.4},
                });
                println!("{line}");
            }
            What::Search => crate::bench_search::run(&examples)?,
            What::Data => crate::bench_data::run(&examples, images)?,
            What::Frozen => {
                for args in [
                    ["--preset", "tiny", "--images", "256"],
                    ["--preset", "simple-clip", "--images", "32"],
                ] {
                    println!(
                        "{}",
                        json_line(Command::new(examples.join("bench_frozen")).args(args).args(&precision))?
                    );
                }
            }
        }
    }
    Ok(true)
}

/// The JSON line of the PyTorch reference (`xtask/reference/simple_clip.py ARGS`), or `None`
/// (said on stderr) when it could not run, e.g. without torch installed.
fn reference_line<'a>(
    root: &std::path::Path,
    script: &str,
    args: impl IntoIterator<Item = &'a str>,
) -> Result<Option<Value>> {
    let script = root.join("xtask/reference").join(script);
    match Command::new("python3").arg(&script).args(args).output() {
        Ok(o) if o.status.success() => Ok(Some(
            serde_json::from_slice(last_line(&o.stdout)).context("parsing the reference's JSON")?,
        )),
        Ok(o) => {
            eprintln!(
                "the PyTorch reference did not run (pip install torch timm transformers open_clip_torch): {}",
                String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("")
            );
            Ok(None)
        }
        Err(e) => {
            eprintln!("the PyTorch reference did not run: {e}");
            Ok(None)
        }
    }
}

/// Of the reference's lines (one per precision mode), the one with the best `key`: the highest
/// throughput, or the lowest peak memory (`*rss*`). A missing or non-numeric value is the worst.
fn best_of<'a>(lines: &'a [Value], key: &str) -> &'a Value {
    let lower_is_better = key.contains("rss");
    let score = |v: &Value| match v[key].as_f64() {
        Some(x) if x.is_finite() => {
            if lower_is_better {
                -x
            } else {
                x
            }
        }
        _ => f64::NEG_INFINITY,
    };
    lines
        .iter()
        .max_by(|a, b| score(a).total_cmp(&score(b)))
        .expect("at least one reference line")
}

/// The open_clip architecture of a pretrained-CLIP preset, and its `open_clip_config.json`
/// (open_clip's own model configs, with OpenAI's QuickGELU).
fn clip_architecture(preset: &str) -> Option<(&'static str, &'static str)> {
    match preset {
        "clip-vit-b-32" => Some((
            "ViT-B-32",
            concat!(
                r#"{"model_cfg": {"embed_dim": 512, "quick_gelu": true, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32}, "#,
                r#""text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}}}"#
            ),
        )),
        "clip-rn50" => Some((
            "RN50",
            concat!(
                r#"{"model_cfg": {"embed_dim": 1024, "quick_gelu": true, "vision_cfg": {"image_size": 224, "layers": [3, 4, 6, 3], "width": 64}, "#,
                r#""text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}}}"#
            ),
        )),
        _ => None,
    }
}

fn last_line(bytes: &[u8]) -> &[u8] {
    let s = bytes.trim_ascii_end();
    match s.iter().rposition(|&b| b == b'\n') {
        Some(i) => &s[i + 1..],
        None => s,
    }
}

fn json_line(cmd: &mut Command) -> Result<Value> {
    let o = cmd
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !o.status.success() {
        bail!("{:?} failed: {}", cmd.get_program(), String::from_utf8_lossy(&o.stderr));
    }
    let text = String::from_utf8_lossy(&o.stdout);
    let start = text.find('{').context("no JSON in the benchmark's output")?;
    Ok(serde_json::from_str(text[start..].trim())?)
}

/// The processor's model name (Linux), for the ratio lines: the same two programs compare
/// differently on different processors (PyTorch's MKL, for one, is tuned for Intel's).
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
            })
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::{Cli, Task};

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        let argv = ["xtask", "bench"].iter().chain(args);
        match Cli::try_parse_from(argv)?.task {
            Some(Task::Bench(a)) => Ok(a),
            _ => panic!("not the bench task"),
        }
    }

    #[test]
    fn defaults_and_choices() {
        let a = parse(&[]).unwrap();
        assert!(a.what.is_empty());
        assert_eq!(
            (a.preset.as_str(), a.batch_size, a.steps, a.no_reference),
            ("tiny", 16, None, false)
        );
        let a = parse(&["search", "train", "--batch-size", "8", "--no-reference"]).unwrap();
        assert_eq!(a.what, [What::Search, What::Train]);
        assert_eq!((a.batch_size, a.no_reference), (8, true));
        let a = parse(&["infer", "--preset", "simple-clip", "--steps", "2", "--seq-len", "16"]).unwrap();
        assert_eq!(a.what, [What::Infer]);
        assert_eq!(
            (a.preset.as_str(), a.steps, a.seq_len, a.batch_size),
            ("simple-clip", Some(2), Some(16), 16)
        );
        for bad in [
            &["speed"][..],
            &["--steps", "ten"],
            &["--batch-size"],
            &["--precision", "fp16"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be rejected");
        }
        assert_eq!(a.precision, None);
        let a = parse(&["train", "--precision", "bf16", "--preset", "clip-vit-b-32"]).unwrap();
        assert_eq!(
            (a.what.as_slice(), a.precision),
            (&[What::Train][..], Some(Precision::Bf16))
        );
    }

    #[test]
    fn the_best_reference_mode_is_taken_metric_by_metric() {
        let lines = [
            json!({"precision": "autocast", "images_per_s": 11.7, "captions_per_s": 60.0, "peak_rss_mb": 900.0}),
            json!({"precision": "matmul-bf16", "images_per_s": 53.5, "captions_per_s": 52.3, "peak_rss_mb": 800.0}),
            json!({"precision": "broken"}),
        ];
        assert_eq!(best_of(&lines, "images_per_s")["precision"], "matmul-bf16");
        assert_eq!(best_of(&lines, "captions_per_s")["precision"], "autocast");
        assert_eq!(best_of(&lines, "peak_rss_mb")["precision"], "matmul-bf16");
        assert_eq!(best_of(&lines[2..], "images_per_s")["precision"], "broken");
    }
}
