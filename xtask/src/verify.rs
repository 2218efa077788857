//! The gated pipeline: stage 1 → 2 → 3 → 4, then predictions with the trained model.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

const USAGE: &str = "\
cargo xtask verify [OPTIONS]

Runs each stage's binary in order with the same model, data, device and seed, writing every
report under one output folder; stops at the first stage whose gate fails.

Options:
  --config FILE     model/training config (TOML); default: the tiny preset
  --preset NAME     tiny | simple-clip
  --data PATH       dataset (captions file or folder); default: the demo set in assets/demo
  --device DEV      auto | cpu | cuda[:N] | metal (default: cpu)
  --seed N          seed for every stage (default: the config's)
  --epochs N        override the number of training epochs (stage 4)
  --freeze TOWER    image | text | both: keep towers fixed in stages 3 and 4
  --out DIR         where reports and the run go (default: target/verify)
  --from N          start at stage N (later stages reuse nothing from skipped ones)
  --only N          run stage N alone
  --skip-bad        let stage 2-4 skip bad rows instead of failing
  --release         build the stages with the release profile
";

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

struct Opts {
    shared: Vec<String>,
    data: Vec<String>,
    epochs: Option<String>,
    freeze: Vec<String>,
    out: PathBuf,
    from: u8,
    only: Option<u8>,
    release: bool,
}

fn parse(args: &[String]) -> Result<Option<Opts>> {
    let mut o = Opts {
        shared: vec![],
        data: vec![],
        epochs: None,
        freeze: vec![],
        out: PathBuf::from("target/verify"),
        from: 1,
        only: None,
        release: false,
    };
    let mut device = "cpu".to_string();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "-h" | "--help" => {
                print!("{USAGE}");
                return Ok(None);
            }
            "--config" | "--preset" | "--seed" => {
                let v = val()?;
                o.shared.extend([a.clone(), v]);
            }
            "--device" => device = val()?,
            "--data" => {
                let v = val()?;
                o.data.extend([a.clone(), v]);
            }
            "--skip-bad" => o.data.push(a.clone()),
            "--epochs" => o.epochs = Some(val()?),
            "--freeze" => o.freeze = vec![a.clone(), val()?],
            "--out" => o.out = PathBuf::from(val()?),
            "--from" => o.from = val()?.parse().context("--from takes a stage number 1–4")?,
            "--only" => o.only = Some(val()?.parse().context("--only takes a stage number 1–4")?),
            "--release" => o.release = true,
            _ => bail!("unknown option {a:?}\n\n{USAGE}"),
        }
    }
    o.shared.extend(["--device".into(), device]);
    for n in [Some(o.from), o.only].into_iter().flatten() {
        if !(1..=4).contains(&n) {
            bail!("stages are numbered 1 to 4 (got {n})");
        }
    }
    Ok(Some(o))
}

/// Returns Ok(true) when every stage that ran passed.
pub fn run(args: &[String]) -> Result<bool> {
    let Some(o) = parse(args)? else {
        return Ok(true);
    };
    let root = workspace_root();
    let out = if o.out.is_absolute() {
        o.out.clone()
    } else {
        root.join(&o.out)
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let bin_dir = build(&root, o.release)?;
    let run_dir = out.join("run");

    println!("clipmine verify: reports under {}\n", out.display());
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
        cmd.args(&o.shared).arg("--json").arg(&json);
        if n >= 2 {
            cmd.args(&o.data);
        }
        if n >= 3 {
            cmd.args(&o.freeze);
        }
        if n == 4 {
            if run_dir.exists() {
                std::fs::remove_dir_all(&run_dir).with_context(|| format!("clearing {}", run_dir.display()))?;
            }
            cmd.arg("--out").arg(&run_dir);
            if let Some(e) = &o.epochs {
                cmd.args(["--epochs", e]);
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
fn predict(bin_dir: &Path, run: &Path, o: &Opts) -> Result<()> {
    let data = o
        .data
        .iter()
        .position(|a| a == "--data")
        .map(|i| PathBuf::from(&o.data[i + 1]));
    let data = data.unwrap_or_else(|| workspace_root().join("assets/demo"));
    println!("\n━━━ the trained model in use ━━━");
    let status = Command::new(bin_dir.join("clip-predict"))
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

/// Builds every stage binary (and clip-predict) in one cargo call; returns their folder.
pub fn build(root: &Path, release: bool) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
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
