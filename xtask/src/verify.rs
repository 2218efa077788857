//! The gated pipeline: stage 1 → 2 → 3 → 4, then predictions with the trained model.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clip_core::nn::Precision;

const STAGES: [(u8, &str, &str, &str); 4] = [
    (
        1,
        "stage1-build",
        "build",
        "the model builds; parameter counts; a random forward pass is finite",
    ),
    (
        2,
        "stage2-batch",
        "batch",
        "the data loads; a batch has the right shapes; B×B similarities",
    ),
    (
        3,
        "stage3-step",
        "step",
        "one step: loss at chance, every tensor gets a gradient and moves",
    ),
    (
        4,
        "stage4-train",
        "train",
        "the loss falls over epochs; retrieval learned",
    ),
];

/// Run stage 1 (build) → 2 (batch) → 3 (step) → 4 (train) as a gated pipeline, then use the model.
///
/// Runs each stage's binary in order with the same model, data, device and seed, writing every
/// report under one output folder; stops at the first stage whose gate fails. After stage 4 it
/// shows the trained model in use (image → text, text → image) on the same data.
#[derive(Debug, clap::Args)]
#[command(
    verbatim_doc_comment,
    after_help = "Examples:\n  cargo xtask verify                                 the demo set, tiny preset, CPU\n  cargo xtask verify --data ~/photos/herbs           all four stages on your data\n  cargo xtask verify --data ~/photos/herbs --from 4 --epochs 80\n\nExit status: 0 every stage that ran passed, 1 a gate failed, 2 an error."
)]
pub struct Args {
    /// Model/training config (TOML); default: the tiny preset.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// tiny | simple-clip
    #[arg(long, value_name = "NAME")]
    preset: Option<String>,
    /// Dataset (captions file or folder); default: the demo set in assets/demo.
    #[arg(long, value_name = "PATH")]
    data: Option<PathBuf>,
    /// auto | cpu | cuda[:N] | metal
    #[arg(long, value_name = "DEV", default_value = "cpu")]
    device: String,
    /// Seed for every stage (default: the config's).
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    /// Override the number of training epochs (stage 4).
    #[arg(long, value_name = "N")]
    epochs: Option<usize>,
    /// image | text | both: keep towers fixed in stages 3 and 4.
    #[arg(long, value_name = "TOWER", value_parser = ["image", "text", "both"])]
    freeze: Option<String>,
    /// Where reports and the run go (relative paths are under the workspace root).
    #[arg(long, value_name = "DIR", default_value = "target/verify")]
    out: PathBuf,
    /// Start at stage N (later stages reuse nothing from skipped ones).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=4))]
    from: u8,
    /// Run stage N alone.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=4), conflicts_with = "from")]
    only: Option<u8>,
    /// Let stages 2-4 skip bad rows instead of failing.
    #[arg(long)]
    skip_bad: bool,
    /// Build the stages with the release profile.
    #[arg(long)]
    release: bool,
    /// GEMM precision for stages 3 and 4 and the predictions: fp32 (default) or bf16 — mixed
    /// precision as PyTorch autocast: bf16 operands with fp32 accumulation on AMX tiles,
    /// everything else fp32; refused on CPUs without AMX (stage 1 says what this CPU offers).
    #[arg(long, value_name = "fp32|bf16", value_parser = parse_precision)]
    precision: Option<Precision>,
}

/// `--precision`'s parser (as the stages'): fp32 or bf16; the error names both.
pub fn parse_precision(s: &str) -> std::result::Result<Precision, String> {
    s.parse::<Precision>().map_err(|e| e.to_string())
}

/// `--precision P` for a program that runs the model, or nothing (its default: fp32, or the
/// config's `train.precision` for a stage).
pub fn precision_flag(p: Option<Precision>) -> Vec<OsString> {
    p.map(|p| vec!["--precision".into(), p.name().into()])
        .unwrap_or_default()
}

impl Args {
    /// The flags every stage gets: model, seed and device.
    fn shared(&self) -> Vec<OsString> {
        let mut v: Vec<OsString> = vec![];
        if let Some(c) = &self.config {
            v.extend(["--config".into(), c.into()]);
        }
        if let Some(p) = &self.preset {
            v.extend(["--preset".into(), p.into()]);
        }
        if let Some(s) = self.seed {
            v.extend(["--seed".into(), s.to_string().into()]);
        }
        v.extend(["--device".into(), (&self.device).into()]);
        v
    }

    /// The flags stages 2-4 get: which data, and how strictly to read it.
    fn data(&self) -> Vec<OsString> {
        let mut v: Vec<OsString> = vec![];
        if let Some(d) = &self.data {
            v.extend(["--data".into(), d.into()]);
        }
        if self.skip_bad {
            v.push("--skip-bad".into());
        }
        v
    }
}

/// Returns Ok(true) when every stage that ran passed.
pub fn run(o: Args) -> Result<bool> {
    let root = workspace_root();
    let out = if o.out.is_absolute() {
        o.out.clone()
    } else {
        root.join(&o.out)
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let bin_dir = build(&root, o.release)?;
    let run_dir = out.join("run");

    println!(
        "clipmine verify: reports under {}{}\n",
        out.display(),
        o.precision
            .map(|p| format!("; stages 3 and 4 and the predictions in {p}"))
            .unwrap_or_default()
    );
    let mut rows = vec![];
    let mut all_ok = true;
    for (n, bin, name, what) in STAGES {
        let selected = match o.only {
            Some(k) => k == n,
            None => n >= o.from,
        };
        if !selected {
            continue;
        }
        let json = out.join(format!("stage{n}-{name}.json"));
        let mut cmd = Command::new(bin_dir.join(bin));
        cmd.args(o.shared()).arg("--json").arg(&json);
        if n >= 2 {
            cmd.args(o.data());
        }
        if let (true, Some(f)) = (n >= 3, &o.freeze) {
            cmd.args(["--freeze", f]);
        }
        if n >= 3 {
            cmd.args(precision_flag(o.precision));
        }
        if n == 4 {
            if run_dir.exists() {
                std::fs::remove_dir_all(&run_dir).with_context(|| format!("clearing {}", run_dir.display()))?;
            }
            cmd.arg("--out").arg(&run_dir);
            if let Some(e) = o.epochs {
                cmd.arg("--epochs").arg(e.to_string());
            }
        }
        println!("━━━ stage {n}: {name} ━━━ {}", display(&cmd));
        let t = Instant::now();
        let status = cmd.status().with_context(|| format!("running {bin}"))?;
        let secs = t.elapsed().as_secs_f64();
        let ok = status.success();
        println!();
        rows.push((n, name, what, ok, secs, json));
        if !ok {
            all_ok = false;
            break;
        }
    }

    println!("━━━ summary ━━━");
    println!(
        "{:<7} {:<6} {:<70} {:<6} {:>8}",
        "stage", "name", "checked", "result", "time"
    );
    for (n, name, what, ok, secs, _) in &rows {
        println!(
            "{:<7} {:<6} {:<70} {:<6} {:>7.1}s",
            n,
            name,
            what,
            if *ok { "PASS" } else { "FAIL" },
            secs
        );
    }
    println!("\nreports:");
    for (_, _, _, _, _, json) in &rows {
        if json.exists() {
            println!("  {}", json.display());
        }
    }
    if let Some((n, name, ..)) = rows.iter().find(|r| !r.3) {
        println!("\nstopped: stage {n} ({name}) failed its gate — its output above says what failed and what to try.");
        return Ok(false);
    }
    if rows.iter().any(|r| r.0 == 4) {
        println!("  {} (the trained model)", run_dir.display());
        let page = run_dir.join("report.html");
        if page.is_file() {
            println!(
                "  {} (open it in a browser: curves, similarity, best captions and images)",
                page.display()
            );
        }
        predict(&bin_dir, &run_dir, &o)?;
    }
    if rows.len() == STAGES.len() {
        println!("\nall stages passed.");
    } else {
        let ran: Vec<String> = rows.iter().map(|r| r.0.to_string()).collect();
        println!("\nstage {} passed (the others were not run).", ran.join(", "));
    }
    Ok(all_ok)
}

/// The tutorial's last step: use the model both ways.
fn predict(bin_dir: &Path, run: &Path, o: &Args) -> Result<()> {
    let data = o.data.clone().unwrap_or_else(|| workspace_root().join("assets/demo"));
    println!("\n━━━ the trained model in use ━━━");
    let status = Command::new(bin_dir.join("clip-predict"))
        .args(precision_flag(o.precision))
        .arg("demo")
        .arg("--run")
        .arg(run)
        .arg("--data")
        .arg(&data)
        .status()
        .context("running clip-predict")?;
    if !status.success() {
        bail!("clip-predict failed on the trained run");
    }
    Ok(())
}

/// Drops what `cargo run -p xtask` told this process about its own package (CARGO_PKG_NAME,
/// CARGO_MANIFEST_DIR …) from a nested cargo call. Passed on, they reach build scripts that
/// watch them (ring's), which then rebuild ring, rustls and everything above them (~30 s on 2
/// cores) whenever an ordinary `cargo build` or `cargo test` comes between two runs.
pub fn without_package_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("CARGO_PKG_")
            || matches!(
                k.as_ref(),
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
            )
        {
            cmd.env_remove(&key);
        }
    }
}

/// Builds every stage binary (and clip-predict) in one cargo call; returns their folder.
pub fn build(root: &Path, release: bool) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    without_package_env(&mut cmd);
    cmd.current_dir(root).args(["build", "--quiet"]);
    for (_, bin, _, _) in STAGES {
        cmd.args(["-p", bin]);
    }
    cmd.args(["-p", "clip-predict"]);
    if release {
        cmd.arg("--release");
    }
    println!("building the stages: {}", display(&cmd));
    let status = cmd.status().context("running cargo build")?;
    if !status.success() {
        bail!("building the stage binaries failed (see cargo's output above)");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let target = if target.is_absolute() {
        target
    } else {
        root.join(target)
    };
    Ok(target.join(if release { "release" } else { "debug" }))
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub fn display(cmd: &Command) -> String {
    let prog = Path::new(cmd.get_program())
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
    format!("{prog} {}", args.join(" "))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::{Cli, Task};

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        let argv = ["xtask", "verify"].iter().chain(args);
        match Cli::try_parse_from(argv)?.task {
            Some(Task::Verify(a)) => Ok(a),
            _ => panic!("not the verify task"),
        }
    }

    fn strings(v: Vec<OsString>) -> Vec<String> {
        v.into_iter().map(|s| s.into_string().unwrap()).collect()
    }

    #[test]
    fn defaults_are_the_demo_set_on_the_cpu_from_stage_1() {
        let a = parse(&[]).unwrap();
        assert_eq!(strings(a.shared()), ["--device", "cpu"]);
        assert!(a.data().is_empty());
        assert_eq!((a.from, a.only, a.epochs), (1, None, None));
        assert_eq!(a.out, PathBuf::from("target/verify"));
        assert!(!a.release);
        assert_eq!(a.precision, None);
        assert!(precision_flag(a.precision).is_empty());
    }

    #[test]
    fn stage_flags_are_passed_on_to_the_stages() {
        let a = parse(&[
            "--config",
            "c.toml",
            "--preset",
            "tiny",
            "--seed",
            "7",
            "--device",
            "cuda:1",
            "--data",
            "d",
            "--skip-bad",
            "--epochs",
            "3",
            "--only",
            "4",
            "--release",
        ])
        .unwrap();
        assert_eq!(
            strings(a.shared()),
            ["--config", "c.toml", "--preset", "tiny", "--seed", "7", "--device", "cuda:1"]
        );
        assert_eq!(strings(a.data()), ["--data", "d", "--skip-bad"]);
        assert_eq!((a.only, a.epochs, a.release), (Some(4), Some(3), true));
    }

    #[test]
    fn precision_is_checked_here_and_passed_on() {
        let a = parse(&["--precision", "bf16"]).unwrap();
        assert_eq!(a.precision, Some(Precision::Bf16));
        assert_eq!(strings(precision_flag(a.precision)), ["--precision", "bf16"]);
        // Not among the flags of stages 1 and 2 (they do not take it).
        assert!(!strings(a.shared()).contains(&"--precision".to_string()));
        let e = parse(&["--precision", "fp16"]).err().unwrap();
        assert!(e.to_string().contains("fp32 or bf16"), "{e}");
    }

    #[test]
    fn stage_numbers_and_values_are_checked() {
        for bad in [
            &["--from", "0"][..],
            &["--from", "5"],
            &["--only", "x"],
            &["--seed", "-1"],
            &["--epochs"],
            &["--from", "2", "--only", "3"],
            &["--nope"],
            &["--precision", "fp16"],
            &["--precision"],
        ] {
            let e = parse(bad).err().unwrap_or_else(|| panic!("{bad:?} should be rejected"));
            assert_eq!(e.exit_code(), 2, "{bad:?}: {e}");
        }
    }
}
