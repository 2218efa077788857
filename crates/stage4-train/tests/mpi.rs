//! Stage 4 as 2 ranks of a real `mpirun -np 2` on this machine (issue #35): built with feature
//! `mpi` only (`cargo test -p stage4-train --features mpi --test mpi`, which `.ci/run` runs).
//!
//! - 2 ranks × 8 pairs train as one process with batches of 16: the same losses, epoch by epoch,
//!   and the same final weights (≤ 1e-5 relative); rank 0 alone prints and writes.
//! - SIGTERM to rank 1 alone stops both after the same step, rank 0 saves `last/`, and the
//!   resumed job ends as the uninterrupted one; one process may not continue it.
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

/// One job at a time: two ranks already fill two cores.
static JOBS: Mutex<()> = Mutex::new(());

/// A small ViT CLIP without dropout nor BatchNorm: one process and N ranks compute the same
/// thing, up to rounding.
const CONFIG: &str = r#"name = "vit-dp"
projection_dim = 16
head = "linear"
loss = "clip"
[image]
arch = "vit"
image_size = 32
patch_size = 8
width = 32
layers = 2
heads = 2
mlp_dim = 64
pool = "tok"
[text]
kind = "clip"
pooling = "eot"
vocab_size = 2048
dim = 32
n_layers = 2
n_heads = 2
hidden_dim = 64
max_position_embeddings = 64
dropout = 0.0
attention_dropout = 0.0
[train]
batch_size = 16
"#;

fn stage4(ranks: usize) -> Command {
    let exe = env!("CARGO_BIN_EXE_stage4-train");
    let mut c = if ranks == 1 {
        Command::new(exe)
    } else {
        let mut c = Command::new("mpirun");
        c.args(["--oversubscribe", "-np", &ranks.to_string(), exe])
            // As root (CI runs so), Open MPI refuses to start without these.
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
        c
    };
    c.args(["--device", "cpu"]);
    c
}

/// Runs `c` to its end, or kills it after 5 minutes and fails: a rank left waiting in a
/// collective must fail the test, not hang it.
fn output(c: &mut Command) -> Output {
    let child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    within(child)
}

fn within(mut child: Child) -> Output {
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(300) {
            // SIGTERM first: mpirun then ends its ranks, which SIGKILL would leave running.
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            std::thread::sleep(Duration::from_secs(5));
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!("still running after 5 minutes (a rank waiting for ever?):\n{}", log(&o));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn log(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// (train_loss, val_loss) per epoch, from loss.csv.
fn losses(out: &Path) -> Vec<(f64, f64)> {
    std::fs::read_to_string(out.join("loss.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<f64> = l.split(',').skip(1).take(2).map(|x| x.parse().unwrap()).collect();
            (f[0], f[1])
        })
        .collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-5 * a.abs().max(b.abs())
}

/// Asserts two runs' `last/` weights agree: all of them within 1e-5 relative (the norm of the
/// difference over the norm), and each tensor within 1e-5 relative or 1e-7 per value (a
/// ten-thousandth of one AdamW step at the default rate: a bias that starts at 0 and whose
/// gradient is near 0 holds mostly rounding noise, which AdamW scales up). The key biases are
/// left out of the second check: their gradient is 0 in exact arithmetic.
fn same_weights(a: &Path, b: &Path) {
    let load = |d: &Path| candle_core::safetensors::load(d.join("last/model.safetensors"), &Device::Cpu).unwrap();
    let (a, b) = (load(a), load(b));
    assert_eq!(a.len(), b.len());
    let sq = |t: &Tensor| f64::from(t.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap());
    let (mut diff, mut all) = (0f64, 0f64);
    for (name, x) in &a {
        let d = sq(&(x - &b[name]).unwrap());
        (diff, all) = (diff + d, all + sq(x));
        let floor = 1e-7 * (x.elem_count() as f64).sqrt();
        assert!(
            name.ends_with("k_proj.bias") || d.sqrt() <= 1e-5 * sq(x).sqrt() + floor,
            "{name}: {:.2e} relative",
            (d / sq(x)).sqrt()
        );
    }
    assert!((diff / all).sqrt() <= 1e-5, "{:.2e} relative", (diff / all).sqrt());
}

#[test]
fn two_ranks_of_eight_train_as_one_process_of_sixteen() {
    let _one = JOBS.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vit.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let args = |out: &PathBuf| ["--config", path(&cfg), "--epochs", "2", "--out", path(out)].map(String::from);
    let o = output(stage4(1).env("RAYON_NUM_THREADS", "1").args(args(&one)));
    let (code_one, log_one) = (o.status.code(), log(&o));
    assert!(matches!(code_one, Some(0 | 1)), "{log_one}");
    let o = output(stage4(2).args(args(&two)));
    let log_two = log(&o);
    assert!(o.status.code().is_some_and(|c| c != 2), "{log_two}");
    // Rank 0 alone speaks, for the whole job; each rank computes on its share of the cores.
    assert!(log_two.contains("on 2 ranks (8 pairs each)"), "{log_two}");
    assert_eq!(log_two.matches("epoch   1:").count(), 1, "{log_two}");
    assert!(log_two.contains("per rank)"), "{log_two}");
    let threads = (std::thread::available_parallelism().unwrap().get() / 2).max(1);
    assert!(log_two.contains(&format!("cpu ({threads} threads)")), "{log_two}");
    let (a, b) = (losses(&one), losses(&two));
    assert_eq!(a.len(), 2, "{log_one}");
    for (x, y) in a.iter().zip(&b) {
        assert!(close(x.0, y.0) && close(x.1, y.1), "one process {a:?}, two ranks {b:?}");
    }
    same_weights(&one, &two);
    let page = std::fs::read_to_string(two.join("report.html")).unwrap();
    assert!(
        page.contains("16 pairs per step, on 2 ranks (8 pairs each)"),
        "report.html records the ranks"
    );
    assert!(two.join("loss.png").is_file());
}

/// The pid of rank `rank` of the job whose command line names `out`.
fn rank_pid(out: &Path, rank: usize) -> Option<u32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let environ = std::fs::read(e.path().join("environ")).ok()?;
        let has = |hay: &[u8], needle: &str| hay.split(|&b| b == 0).any(|w| w == needle.as_bytes());
        (has(&cmdline, path(out)) && has(&environ, &want) && !has(&cmdline, "mpirun")).then_some(pid)
    })
}

/// Waits for the first epoch's end, then SIGTERM to rank 1 alone.
fn stop_rank_1(out: &Path, child: &mut Child) {
    let started = Instant::now();
    while !out.join("loss.csv").is_file() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the job ended before its first epoch"
        );
        assert!(started.elapsed() < Duration::from_secs(300), "no epoch after 5 minutes");
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = rank_pid(out, 1).expect("rank 1 is running");
    let ok = Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    assert!(ok.success());
}

#[test]
fn sigterm_to_one_rank_stops_all_and_the_job_resumes_exactly() {
    let _one = JOBS.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vit.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let (full, cut) = (dir.path().join("full"), dir.path().join("cut"));
    // Batches of 2, one pair per rank: 15 steps per epoch, so the signal lands inside an epoch.
    let args = |out: &PathBuf| {
        [
            "--config",
            path(&cfg),
            "--epochs",
            "3",
            "--batch-size",
            "2",
            "--out",
            path(out),
        ]
        .map(String::from)
    };
    let o = output(stage4(2).args(args(&full)));
    assert!(o.status.code().is_some_and(|c| c != 2), "{}", log(&o));

    let mut child = stage4(2)
        .args(args(&cut))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    stop_rank_1(&cut, &mut child);
    let o = within(child);
    let stopped = log(&o);
    assert!(!o.status.success(), "{stopped}");
    assert!(stopped.contains("checkpoint saved"), "{stopped}");
    assert!(
        stopped.contains(&format!("mpirun -np 2 {}", env!("CARGO_BIN_EXE_stage4-train"))),
        "the resume command starts the same ranks: {stopped}"
    );
    let state = std::fs::read_to_string(cut.join("last/state.json")).unwrap();
    assert!(
        state.contains("\"partial\"") && state.contains("\"world_size\": 2"),
        "{state}"
    );

    // One process may not continue a run of 2 ranks.
    let o = output(stage4(1).args(["--resume", path(&cut)]));
    let refused = log(&o);
    assert_eq!(o.status.code(), Some(2), "{refused}");
    assert!(
        refused.contains("trained by 2 ranks") && refused.contains("this launch has 1"),
        "{refused}"
    );

    let o = output(stage4(2).args(["--resume", path(&cut)]));
    let resumed = log(&o);
    assert!(o.status.code().is_some_and(|c| c != 2), "{resumed}");
    assert!(resumed.contains("resuming in epoch"), "{resumed}");
    let (a, b) = (losses(&full), losses(&cut));
    assert_eq!(a.len(), 3, "{resumed}");
    for (x, y) in a.iter().zip(&b) {
        assert!(close(x.0, y.0) && close(x.1, y.1), "uninterrupted {a:?}, resumed {b:?}");
    }
    same_weights(&full, &cut);
}

#[test]
fn a_nan_loss_fails_the_finite_check_once_not_the_job() {
    let _one = JOBS.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vit.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let (out, json) = (dir.path().join("nan"), dir.path().join("s4.json"));
    let huge = ["--lr-head", "1e30", "--lr-image", "1e30", "--lr-text", "1e30"];
    let o = output(
        stage4(2)
            .args(["--config", path(&cfg), "--epochs", "2", "--out", path(&out)])
            .args(huge)
            .args(["--json", path(&json)]),
    );
    let log = log(&o);
    // Every rank meets the NaN at the same step: rank 0 reports it, nobody aborts.
    assert_eq!(o.status.code(), Some(1), "{log}");
    assert_eq!(log.matches("[FAIL] finite").count(), 1, "{log}");
    assert!(!log.contains("MPI_ABORT"), "{log}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    assert_eq!(
        (r["passed"].as_bool(), r["metrics"]["world_size"].as_u64()),
        (Some(false), Some(2))
    );
}
