//! `cargo xtask bench [train|loader|search]…`: speed measurements as JSON lines, never in tests.
//!
//! `train` times training steps of the `tiny` preset in clipmine and, when PyTorch is installed,
//! in the PyTorch reference of the same recipe (`xtask/reference/simple_clip.py bench`), in the
//! same run on the same machine, and prints their ratio of speed and of peak memory (RSS). The
//! programs are built in the release profile. Run it on an idle machine: a build beside a
//! benchmark slows it several times.

use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::verify::workspace_root;

const USAGE: &str = "\
cargo xtask bench [WHAT…] [OPTIONS]

WHAT: train (clipmine vs the PyTorch reference), loader (data pipeline against training steps),
      index (building an image index), search (a query over 1,000,000 embeddings); default: all.
Options:
  --preset NAME     model for `train` (default tiny)
  --batch-size B    (default 16)
  --steps N         timed steps (default 10)
  --seq-len L       caption tokens for `train` (default 12 for tiny, 32 otherwise)
  --no-reference    skip the PyTorch reference
";

pub fn run(args: &[String]) -> Result<bool> {
    let mut what = vec![];
    let mut preset = "tiny".to_string();
    let mut batch = "16".to_string();
    let mut steps = "10".to_string();
    let mut seq_len = None;
    let mut reference = true;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "-h" | "--help" => {
                print!("{USAGE}");
                return Ok(true);
            }
            "train" | "loader" | "index" | "search" => what.push(a.clone()),
            "--preset" => preset = val()?,
            "--batch-size" => batch = val()?,
            "--steps" => steps = val()?,
            "--seq-len" => seq_len = Some(val()?),
            "--no-reference" => reference = false,
            _ => bail!("unknown argument {a:?}\n\n{USAGE}"),
        }
    }
    if what.is_empty() {
        what = vec!["train".into(), "loader".into(), "index".into(), "search".into()];
    }
    let seq_len = seq_len.unwrap_or_else(|| if preset == "tiny" { "12" } else { "32" }.to_string());
    let root = workspace_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .current_dir(&root)
        .args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "clip-core",
            "--example",
            "bench",
            "--example",
            "bench_loader",
        ])
        .status()?;
    if !status.success() {
        bail!("building the benchmarks failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .map(|t| if t.is_relative() { root.join(t) } else { t })
        .unwrap_or_else(|| root.join("target"));
    let examples = target.join("release/examples");
    let mut steps_per_s = None;
    for w in &what {
        match w.as_str() {
            "train" => {
                let ours = json_line(Command::new(examples.join("bench")).args([
                    "train",
                    "--preset",
                    &preset,
                    "--batch-size",
                    &batch,
                    "--steps",
                    &steps,
                    "--seq-len",
                    &seq_len,
                ]))?;
                println!("{ours}");
                steps_per_s = ours["ms_per_step"].as_f64().map(|ms| 1e3 / ms);
                if reference {
                    let script = root.join("xtask/reference/simple_clip.py");
                    let theirs = Command::new("python3")
                        .arg(&script)
                        .args([
                            "bench",
                            "--preset",
                            &preset,
                            "--batch-size",
                            &batch,
                            "--steps",
                            &steps,
                            "--seq-len",
                            &seq_len,
                        ])
                        .output();
                    match theirs {
                        Ok(o) if o.status.success() => {
                            let theirs: Value =
                                serde_json::from_slice(last_line(&o.stdout)).context("parsing the reference's JSON")?;
                            println!("{theirs}");
                            let num = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
                            let (a, b) = (num(&ours, "pairs_per_s"), num(&theirs, "pairs_per_s"));
                            let (ra, rb) = (num(&ours, "peak_rss_mb"), num(&theirs, "peak_rss_mb"));
                            println!(
                                "{}",
                                json!({
                                    "bench": "train-ratio", "preset": preset, "batch_size": batch, "seq_len": seq_len,
                                    "clipmine_threads": ours["threads"], "pytorch_threads": theirs["threads"],
                                    "clipmine_pairs_per_s": a, "pytorch_pairs_per_s": b, "clipmine_over_pytorch": a / b,
                                    "clipmine_peak_rss_mb": ra, "pytorch_peak_rss_mb": rb, "rss_clipmine_over_pytorch": ra / rb,
                                })
                            );
                        }
                        Ok(o) => eprintln!(
                            "the PyTorch reference did not run (pip install torch timm transformers): {}",
                            String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("")
                        ),
                        Err(e) => eprintln!("the PyTorch reference did not run: {e}"),
                    }
                }
            }
            "loader" => {
                for extra in [vec![], vec!["--synthetic", "1000", "--augment"]] {
                    let l = json_line(
                        Command::new(examples.join("bench_loader"))
                            .args(["--batch-size", &batch])
                            .args(&extra),
                    )?;
                    println!("{l}");
                    // The loader must outpace training: batches it delivers per training step.
                    if let (Some(bps), Some(sps)) = (l["batches_per_second"].as_f64(), steps_per_s) {
                        let line = json!({"bench": "loader-vs-train", "augment": !extra.is_empty(), "loader_batches_per_s": bps, "train_steps_per_s": sps, "headroom": bps / sps});
                        println!("{line}");
                    }
                }
            }
            "index" => println!("{}", json_line(Command::new(examples.join("bench")).args(["index"]))?),
            "search" => println!("{}", json_line(Command::new(examples.join("bench")).args(["search"]))?),
            _ => unreachable!(),
        }
    }
    Ok(true)
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
