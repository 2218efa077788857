//! Stage 4's run folder under what users do to it: Ctrl-C, kill -9, a second run on the same
//! folder, an old folder reused, and flags given with --resume.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn cmd(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_stage4-train"));
    c.args(["--device", "cpu"]).args(args);
    c
}

fn run(args: &[&str]) -> (Option<i32>, String) {
    let o = cmd(args).output().unwrap();
    (o.status.code(), clipmine_tests::log(&o))
}

fn spawn(args: &[&str]) -> Child {
    cmd(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

fn finish(child: Child) -> (Option<i32>, String) {
    let o = child.wait_with_output().unwrap();
    (o.status.code(), clipmine_tests::log(&o))
}

/// Waits until the run's first epoch is over (its checkpoint and loss.csv are written; a run
/// has an epoch-0 checkpoint from its start).
fn wait_for_checkpoint(out: &Path, child: &mut Child) {
    let started = Instant::now();
    while !out.join("loss.csv").is_file() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before its first checkpoint"
        );
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no checkpoint after 5 minutes"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

/// (train_loss, val_loss) per epoch, as loss.csv writes them.
fn losses(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out.join("loss.csv"))
        .unwrap()
        .lines()
        .map(|l| l.split(',').take(3).collect::<Vec<_>>().join(","))
        .collect()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn ctrl_c_mid_epoch_saves_and_the_resumed_run_matches_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let (full, cut) = (dir.path().join("full"), dir.path().join("cut"));
    // Batches of 2: 15 steps per epoch, so the signal lands inside an epoch.
    let args = |out: &PathBuf| ["--epochs", "3", "--batch-size", "2", "--out", path(out)].map(String::from);
    let (code, log) = run(&args(&full).each_ref().map(String::as_str));
    assert!(matches!(code, Some(0 | 1)), "{log}");

    let mut child = spawn(&args(&cut).each_ref().map(String::as_str));
    wait_for_checkpoint(&cut, &mut child);
    signal(&child, "-INT");
    let (code, log) = finish(child);
    assert_eq!(code, Some(130), "{log}");
    assert!(
        log.contains("stopped after step") && log.contains("checkpoint saved"),
        "{log}"
    );
    let resume_line = log
        .lines()
        .skip_while(|l| !l.starts_with("resume with:"))
        .nth(1)
        .unwrap_or_else(|| panic!("no resume command in {log}"));
    assert!(
        resume_line.contains(&format!("--resume {}", cut.display())),
        "{resume_line}"
    );

    let (code, log) = run(&["--resume", path(&cut)]);
    assert!(matches!(code, Some(0 | 1)), "{log}");
    assert!(log.contains("resuming in epoch"), "{log}");
    assert_eq!(losses(&full), losses(&cut), "{log}");
}

#[test]
fn kill_9_at_any_moment_leaves_a_resumable_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut child = spawn(&["--epochs", "40", "--batch-size", "4", "--out", path(&out)]);
    wait_for_checkpoint(&out, &mut child);
    // Somewhere in the next epochs: mid-step, mid-validation or mid-checkpoint.
    std::thread::sleep(Duration::from_millis(150));
    signal(&child, "-KILL");
    let (code, _) = finish(child);
    assert_eq!(code, None, "killed by a signal");
    let (code, log) = run(&["--resume", path(&out), "--epochs", "3"]);
    assert!(matches!(code, Some(0 | 1)), "{log}");
    assert!(log.contains("took over") && log.contains("no longer running"), "{log}");
    assert!(log.contains("resuming"), "{log}");
}

#[test]
fn a_second_run_on_a_folder_is_refused_and_an_old_run_needs_resume_or_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let (code, log) = run(&["--epochs", "1", "--out", path(&out)]);
    assert!(matches!(code, Some(0 | 1)), "{log}");
    // Everything the run wrote is a run file, so --overwrite (clear_run) leaves none of it behind.
    let leftovers = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != clip_core::run_dir::LOCK && n != "feature-cache")
            .filter(|n| !clip_core::run_dir::RUN_FILES.contains(&n.as_str()))
            .collect()
    };
    assert_eq!(
        leftovers(&out),
        Vec::<String>::new(),
        "files a run writes but RUN_FILES does not list"
    );
    for f in ["report.html", "lr.png", "quality.png", "similarity.json", "loss.png"] {
        assert!(out.join(f).is_file(), "{f}");
    }

    let held = clip_core::run_dir::RunLock::acquire(&out).unwrap();
    let (code, log) = run(&["--resume", path(&out)]);
    assert_eq!(code, Some(2), "{log}");
    assert!(
        log.contains(&format!("in use by process {}", std::process::id())),
        "{log}"
    );
    drop(held);

    let (code, log) = run(&["--epochs", "1", "--out", path(&out)]);
    assert_eq!(code, Some(2), "{log}");
    assert!(
        log.contains("already holds a run") && log.contains("--overwrite"),
        "{log}"
    );
    // --overwrite removes every file of the previous run, and says which.
    let (code, log) = run(&["--epochs", "1", "--out", path(&out), "--overwrite"]);
    assert!(matches!(code, Some(0 | 1)), "{log}");
    assert!(log.contains("--overwrite: removed"), "{log}");
    for f in ["report.html", "lr.png", "quality.png", "similarity.json"] {
        assert!(log.contains(f), "{f} not removed: {log}");
    }
}

#[test]
fn flags_given_with_resume_are_applied_and_recorded_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let (code, log) = run(&["--epochs", "1", "--out", path(&out)]);
    assert!(matches!(code, Some(0 | 1)), "{log}");
    for refused in [["--seed", "7"], ["--preset", "tiny"]] {
        let (code, log) = run(&["--resume", path(&out), refused[0], refused[1]]);
        assert_eq!(code, Some(2), "{log}");
        assert!(
            log.contains(&format!("{} cannot be used with --resume", refused[0])),
            "{log}"
        );
    }
    let (code, log) = run(&["--resume", path(&out), "--epochs", "2", "--lr-head", "0.004"]);
    assert!(matches!(code, Some(0 | 1)), "{log}");
    assert!(
        log.contains("resume: train.lr_head: 0.001 → 0.004 (recorded in config.toml)"),
        "{log}"
    );
    assert!(log.contains("epoch   2:"), "{log}");
    let cfg = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(cfg.contains("lr_head = 0.004") && cfg.contains("epochs = 2"), "{cfg}");
}

/// Kills a fresh run as soon as `file` appears in its folder (or it ends), wherever it got to.
fn kill_when(out: &Path, file: &str, epochs: &str) {
    let mut child = spawn(&["--epochs", epochs, "--batch-size", "4", "--out", path(out)]);
    let started = Instant::now();
    while !out.join(file).exists() && child.try_wait().unwrap().is_none() {
        assert!(started.elapsed() < Duration::from_secs(300), "{file} never appeared");
        std::thread::sleep(Duration::from_micros(200));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_run_killed_at_any_point_of_its_start_can_be_resumed_or_rerun() {
    let dir = tempfile::tempdir().unwrap();
    for (i, file) in [
        "run.lock",
        "config.toml",
        "model.safetensors",
        "last",
        "last/state.json",
    ]
    .iter()
    .enumerate()
    {
        let out = dir.path().join(format!("run{i}"));
        kill_when(&out, file, "2");
        if out.join("config.toml").is_file() {
            // Something of the run was written: --resume continues it (from epoch 1 when no
            // checkpoint was saved yet).
            let (code, log) = run(&["--resume", path(&out), "--epochs", "2"]);
            assert!(matches!(code, Some(0 | 1)), "killed at {file}: {log}");
            assert!(log.contains("epoch   2:"), "killed at {file}: {log}");
        } else {
            // Nothing but the lock: --resume says to start again, and starting again works.
            let (code, log) = run(&["--resume", path(&out)]);
            assert_eq!(code, Some(2), "killed at {file}: {log}");
            assert!(log.contains("holds no run to resume"), "{log}");
            let (code, log) = run(&["--epochs", "1", "--batch-size", "4", "--out", path(&out)]);
            assert!(matches!(code, Some(0 | 1)), "killed at {file}: {log}");
        }
    }
}

#[test]
fn resume_trains_on_the_runs_own_data_and_refuses_other_data() {
    let dir = tempfile::tempdir().unwrap();
    // The run's data: a copy of the demo set somewhere else.
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/demo");
    let data = dir.path().join("mine");
    std::fs::create_dir_all(data.join("images")).unwrap();
    for e in std::fs::read_dir(demo.join("images")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, data.join("images").join(p.file_name().unwrap())).unwrap();
    }
    let csv = std::fs::read_to_string(demo.join("captions.csv")).unwrap();
    std::fs::write(data.join("captions.csv"), csv).unwrap();
    let out = dir.path().join("run");
    let (code, log) = run(&["--epochs", "1", "--data", path(&data), "--out", path(&out)]);
    assert!(matches!(code, Some(0 | 1)), "{log}");

    // Without --data: the run's own data, not the demo set.
    let (code, log) = run(&["--resume", path(&out), "--epochs", "2"]);
    assert!(matches!(code, Some(0 | 1)), "{log}");
    assert!(
        log.contains(&format!("data: the run's dataset {}", data.display())),
        "{log}"
    );
    // Other data is refused, naming both; --other-data accepts it and says so.
    let (code, log) = run(&["--resume", path(&out), "--epochs", "3", "--data", path(&demo)]);
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("was trained on") && log.contains("--other-data"), "{log}");
    let (code, log) = run(&[
        "--resume",
        path(&out),
        "--epochs",
        "3",
        "--data",
        path(&demo),
        "--other-data",
    ]);
    assert!(matches!(code, Some(0 | 1)), "{log}");
    assert!(log.contains("resume: data:"), "{log}");
}
