//! Runs that survive what happens to them: flipped bytes, a second writer, a stop in the middle of
//! an epoch, crash leftovers, changed settings on resume, and validation that cannot measure.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::Device;
use clip_core::config::Schedule;
use clip_core::fit::{Stopped, Trainer, Validation};
use clip_core::params::Group;
use clip_core::prepare::{prepare, DataSource};
use clip_core::run_dir::{RunDir, LAST, STATE, WEIGHTS};
use clip_core::ClipConfig;

fn demo(cfg: &ClipConfig) -> clip_core::prepare::Prepared {
    prepare(cfg, &DataSource::default(), &Device::Cpu, &clip_core::progress::Silent).unwrap()
}

fn train(t: &mut Trainer, epochs: usize) {
    while t.state().epoch < epochs {
        let (loss, pps) = t.train_epoch(|_, _, _| {}).unwrap();
        let v = t.validate().unwrap();
        t.end_epoch(loss, &v, 0.0, pps).unwrap();
    }
}

/// The demo set in small batches: 8 steps per epoch, so an epoch has a middle.
fn small_batches() -> ClipConfig {
    let mut cfg = ClipConfig::tiny();
    cfg.train.batch_size = 4;
    cfg
}

fn losses(t: &Trainer) -> Vec<(f64, f64)> {
    t.state().history.iter().map(|r| (r.train_loss, r.val_loss)).collect()
}

fn flip_byte(path: &std::path::Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let mid = bytes.len() - 100;
    bytes[mid] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_flipped_byte_or_a_truncation_is_an_error_naming_the_file() {
    let cfg = ClipConfig::tiny();
    let out = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(&cfg, demo(&cfg), out.path()).unwrap();
    train(&mut t, 1);
    drop(t);

    // One bit of one weight: safetensors' own checks cannot see it.
    let last = out.path().join(LAST).join(WEIGHTS);
    let good = std::fs::read(&last).unwrap();
    flip_byte(&last);
    let err = format!("{:#}", Trainer::resume(&cfg, demo(&cfg), out.path()).err().unwrap());
    assert!(
        err.contains(&last.display().to_string()) && err.contains("checksum mismatch"),
        "{err}"
    );
    std::fs::write(&last, &good[..good.len() / 2]).unwrap();
    let err = format!("{:#}", Trainer::resume(&cfg, demo(&cfg), out.path()).err().unwrap());
    assert!(
        err.contains(&last.display().to_string()) && err.contains("truncated"),
        "{err}"
    );
    std::fs::write(&last, &good).unwrap();
    let state = out.path().join(LAST).join(STATE);
    let text = std::fs::read_to_string(&state).unwrap();
    std::fs::write(&state, text.replacen("\"epoch\": 1", "\"epoch\": 7", 1)).unwrap();
    let err = format!("{:#}", Trainer::resume(&cfg, demo(&cfg), out.path()).err().unwrap());
    assert!(err.contains(&state.display().to_string()), "{err}");
    std::fs::write(&state, text).unwrap();
    assert_eq!(Trainer::resume(&cfg, demo(&cfg), out.path()).unwrap().state().epoch, 1);

    // The best model, as prediction loads it.
    let best = out.path().join(WEIGHTS);
    flip_byte(&best);
    let err = format!(
        "{:#}",
        RunDir::open(out.path()).unwrap().load(&Device::Cpu).err().unwrap()
    );
    assert!(
        err.contains(&best.display().to_string()) && err.contains("checksum mismatch"),
        "{err}"
    );
}

#[test]
fn one_writer_per_run_folder() {
    let cfg = ClipConfig::tiny();
    let out = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(&cfg, demo(&cfg), out.path()).unwrap();
    train(&mut t, 1);
    let err = format!("{:#}", Trainer::resume(&cfg, demo(&cfg), out.path()).err().unwrap());
    assert!(
        err.contains(&format!("in use by process {}", std::process::id())),
        "{err}"
    );
    drop(t);
    // A fresh run never writes over an old one.
    let err = format!("{:#}", Trainer::new(&cfg, demo(&cfg), out.path()).err().unwrap());
    assert!(err.contains("already holds a run") && err.contains("--resume"), "{err}");
    assert_eq!(Trainer::resume(&cfg, demo(&cfg), out.path()).unwrap().state().epoch, 1);
}

#[test]
fn stopped_mid_epoch_then_resumed_matches_an_uninterrupted_run() {
    let cfg = ClipConfig {
        train: clip_core::config::TrainConfig {
            epochs: 3,
            ..small_batches().train
        },
        ..small_batches()
    };
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut full = Trainer::new(&cfg, demo(&cfg), a.path()).unwrap();
    train(&mut full, 3);

    let mut first = Trainer::new(&cfg, demo(&cfg), b.path()).unwrap();
    train(&mut first, 1);
    let stop = Arc::new(AtomicBool::new(false));
    first.set_stop(stop.clone());
    let err = first
        .train_epoch(|step, _, _| {
            if step == 3 {
                stop.store(true, Ordering::SeqCst)
            }
        })
        .unwrap_err();
    let steps = first.steps_per_epoch();
    assert!(steps > 3, "{steps} steps per epoch: no middle");
    assert_eq!(
        err.downcast_ref::<Stopped>(),
        Some(&Stopped {
            epoch: 2,
            step: 3,
            steps
        })
    );
    first.save_checkpoint().unwrap();
    drop(first);

    let mut resumed = Trainer::resume(&cfg, demo(&cfg), b.path()).unwrap();
    assert_eq!(resumed.state().epoch, 1);
    assert_eq!(resumed.state().partial.as_ref().map(|p| p.steps), Some(3));
    train(&mut resumed, 3);
    // Every step's loss is the same; an epoch's mean may differ in its last bit, summed in two parts.
    let (a, b) = (losses(&full), losses(&resumed));
    assert_eq!(a.len(), b.len());
    for ((ta, va), (tb, vb)) in a.iter().zip(&b) {
        assert!(
            (ta - tb).abs() <= 1e-12 * ta.abs() && va == vb,
            "a run stopped mid-epoch must resume exactly: {a:?} vs {b:?}"
        );
    }
    assert_eq!(full.opt().step, resumed.opt().step);
    let weights = |t: &Trainer| {
        t.model()
            .params
            .tensors()
            .into_iter()
            .map(|(n, x)| (n, x.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
            .collect::<Vec<_>>()
    };
    assert!(
        weights(&full) == weights(&resumed),
        "weights differ after a mid-epoch resume"
    );
}

#[test]
fn a_crash_mid_swap_and_stale_temporary_files_are_recovered_on_resume() {
    let cfg = ClipConfig::tiny();
    let out = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(&cfg, demo(&cfg), out.path()).unwrap();
    train(&mut t, 1);
    drop(t);
    let p = out.path();
    // Killed between `last → last.old` and `last.tmp → last`, with temporary files lying about.
    std::fs::rename(p.join(LAST), p.join("last.old")).unwrap();
    std::fs::create_dir(p.join("last.tmp")).unwrap();
    std::fs::write(p.join("last.tmp").join(WEIGHTS), b"half").unwrap();
    let dead = format!(".{WEIGHTS}.tmp-{}", 4_000_000_000u32);
    std::fs::write(p.join(&dead), b"half").unwrap();
    let resumed = Trainer::resume(&cfg, demo(&cfg), p).unwrap();
    assert_eq!(resumed.state().epoch, 1);
    assert!(p.join(LAST).join(STATE).is_file());
    for gone in ["last.old", "last.tmp", &dead] {
        assert!(!p.join(gone).exists(), "{gone} left behind");
    }
}

#[test]
fn resume_applies_and_records_new_rates_and_refuses_a_new_seed() {
    let cfg = ClipConfig::tiny();
    let out = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(&cfg, demo(&cfg), out.path()).unwrap();
    train(&mut t, 1);
    let saved_head = t.opt().groups[&Group::Heads];
    drop(t);

    let mut seeded = cfg.clone();
    seeded.seed += 1;
    let err = format!(
        "{:#}",
        Trainer::resume(&seeded, demo(&seeded), out.path()).err().unwrap()
    );
    assert!(err.contains("cannot change seed"), "{err}");

    let mut faster = cfg.clone();
    faster.train.lr_head = cfg.train.lr_head * 3.0;
    faster.train.weight_decay = 0.5;
    let t = Trainer::resume(&faster, demo(&faster), out.path()).unwrap();
    let keys: Vec<&str> = t.changes().iter().map(|c| c.key.as_str()).collect();
    assert_eq!(keys, ["train.lr_head", "train.weight_decay"]);
    let head = t.opt().groups[&Group::Heads];
    assert_eq!(t.opt().base[&Group::Heads].lr, faster.train.lr_head);
    // The schedule's factor so far is kept on top of the new rate.
    assert!(
        (head.lr - saved_head.lr * 3.0).abs() < 1e-15,
        "{head:?} vs {saved_head:?}"
    );
    assert_eq!(head.weight_decay, 0.5);
    let recorded = ClipConfig::from_toml_file(&out.path().join("config.toml")).unwrap();
    assert_eq!(recorded.train.lr_head, faster.train.lr_head);
    assert_eq!(recorded.train.weight_decay, 0.5);
}

#[test]
fn raising_epochs_under_cosine_stretches_the_decay() {
    let mut cfg = ClipConfig::tiny();
    cfg.train.schedule = Schedule::Cosine;
    cfg.train.epochs = 2;
    let out = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(&cfg, demo(&cfg), out.path()).unwrap();
    train(&mut t, 2);
    let spe = t.steps_per_epoch() as u64;
    drop(t);
    let mut longer = cfg.clone();
    longer.train.epochs = 4;
    let mut t = Trainer::resume(&longer, demo(&longer), out.path()).unwrap();
    train(&mut t, 3);
    // The last step of epoch 3 ran at the rate of a 4-epoch cosine, not at the end of a 2-epoch one.
    let want = cfg.train.lr_head * clip_core::schedule::cosine(3 * spe - 1, 0, 4 * spe);
    let got = t.state().history[2].lr_head;
    assert!(want > 0.0 && (got - want).abs() < 1e-12, "lr {got}, want {want}");
}

#[test]
fn a_one_pair_validation_split_still_leaves_a_usable_model() {
    let cfg = ClipConfig::tiny();
    let out = tempfile::tempdir().unwrap();
    let mut data = demo(&cfg);
    data.split.val.truncate(1);
    let mut t = Trainer::new(&cfg, data, out.path()).unwrap();
    assert!(t.selection_note().unwrap().contains("chosen by training loss"));
    train(&mut t, 2);
    assert!(t.state().history.iter().all(|r| r.val_loss.is_nan()));
    assert!(t.state().best_epoch >= 1, "a model must be picked by training loss");
    t.load_best().unwrap();
    drop(t);
    RunDir::open(out.path()).unwrap().load(&Device::Cpu).unwrap();
    // NaN losses survive the trip through state.json.
    let mut data = demo(&cfg);
    data.split.val.truncate(1);
    let mut t = Trainer::resume(&cfg, data, out.path()).unwrap();
    assert_eq!(t.state().epoch, 2);
    train(&mut t, 3);
}

#[test]
fn a_nan_validation_loss_is_never_the_best_and_the_untrained_model_stays_usable() {
    let cfg = ClipConfig::tiny();
    let out = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(&cfg, demo(&cfg), out.path()).unwrap();
    let (loss, pps) = t.train_epoch(|_, _, _| {}).unwrap();
    let nan = Validation {
        loss: f64::NAN,
        ..t.validate().unwrap()
    };
    assert!(!t.end_epoch(loss, &nan, 0.0, pps).unwrap());
    assert_eq!(t.state().best_epoch, 0);
    t.load_best().unwrap();
    let (loss, pps) = t.train_epoch(|_, _, _| {}).unwrap();
    let v = t.validate().unwrap();
    assert!(t.end_epoch(loss, &v, 0.0, pps).unwrap());
    let (loss, pps) = t.train_epoch(|_, _, _| {}).unwrap();
    assert!(!t.end_epoch(loss, &nan, 0.0, pps).unwrap());
    assert_eq!(t.state().best_epoch, 2);
    drop(t);
    let t = Trainer::resume(&cfg, demo(&cfg), out.path()).unwrap();
    assert!(t.state().history[0].val_loss.is_nan() && t.state().history[2].val_loss.is_nan());
    RunDir::open(out.path()).unwrap().load(&Device::Cpu).unwrap();
}

/// The demo set copied to `dir` (captions and images), optionally with one caption changed.
fn copy_demo(dir: &std::path::Path, change_a_caption: bool) -> std::path::PathBuf {
    let demo = clip_core::data::Dataset::demo_dir();
    let to = dir.join("demo");
    std::fs::create_dir_all(to.join("images")).unwrap();
    for e in std::fs::read_dir(demo.join("images")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join("images").join(p.file_name().unwrap())).unwrap();
    }
    let mut csv = std::fs::read_to_string(demo.join("captions.csv")).unwrap();
    if change_a_caption {
        let line = csv.lines().nth(1).unwrap().to_string();
        csv = csv.replacen(&line, &format!("{line} indeed"), 1);
    }
    std::fs::write(to.join("captions.csv"), csv).unwrap();
    to
}

fn data_at(cfg: &ClipConfig, path: &std::path::Path) -> clip_core::prepare::Prepared {
    let source = DataSource {
        path: Some(path.to_path_buf()),
        image_cache: clip_core::prepare::ImageCache::Off,
        ..DataSource::default()
    };
    prepare(cfg, &source, &Device::Cpu, &clip_core::progress::Silent).unwrap()
}

#[test]
fn resume_on_other_data_is_refused_naming_both_unless_asked_for() {
    let cfg = small_batches();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let mut t = Trainer::new(&cfg, demo(&cfg), &out).unwrap();
    train(&mut t, 1);
    drop(t);
    let recorded: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("dataset.json")).unwrap()).unwrap();
    assert_eq!(recorded["pairs"], 30, "{recorded}");
    assert!(
        recorded["path"].as_str().unwrap().ends_with("assets/demo"),
        "{recorded}"
    );

    // The same listing under another path, and the same path with a caption changed.
    let copy = copy_demo(&tmp.path().join("copy"), false);
    let err = format!("{:#}", Trainer::resume(&cfg, data_at(&cfg, &copy), &out).err().unwrap());
    assert!(
        err.contains("was trained on") && err.contains("assets/demo") && err.contains(&copy.display().to_string()),
        "{err}"
    );
    assert!(
        err.contains("another path, with the same listing") && err.contains("--other-data"),
        "{err}"
    );
    let changed = copy_demo(&tmp.path().join("changed"), true);
    let err = format!(
        "{:#}",
        Trainer::resume(&cfg, data_at(&cfg, &changed), &out).err().unwrap()
    );
    assert!(err.contains("another dataset"), "{err}");

    // Asked for: the change is recorded, and a stopped epoch starts over.
    let mut t = Trainer::resume(&cfg, demo(&cfg), &out).unwrap();
    t.set_stop(Arc::new(AtomicBool::new(true)));
    assert!(t.train_epoch(|_, _, _| {}).unwrap_err().is::<Stopped>());
    t.save_checkpoint().unwrap();
    drop(t);
    let opts = clip_core::fit::ResumeOptions { other_data: true };
    let lock = clip_core::run_dir::RunLock::acquire(&out).unwrap();
    let t = Trainer::resume_with(&cfg, data_at(&cfg, &changed), lock, opts).unwrap();
    assert!(
        t.state().partial.is_none(),
        "the stopped epoch starts over on other data"
    );
    assert_eq!(t.changes().len(), 1);
    assert_eq!(t.changes()[0].key, "data");
    drop(t);
    let now: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("dataset.json")).unwrap()).unwrap();
    assert_eq!(now["path"].as_str().unwrap(), changed.display().to_string());
    // From now on the changed data is the run's.
    assert!(Trainer::resume(&cfg, data_at(&cfg, &changed), &out).is_ok());
}

#[test]
fn every_file_of_a_run_is_checksummed_and_a_missing_manifest_is_an_error() {
    let cfg = ClipConfig::tiny();
    let out = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(&cfg, demo(&cfg), out.path()).unwrap();
    train(&mut t, 1);
    drop(t);
    let manifest = |dir: &std::path::Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
    };
    // Every file of the run folder (but the lock, the manifest and the checkpoint folder) and of
    // last/ is listed.
    for dir in [out.path().to_path_buf(), out.path().join(LAST)] {
        let m = manifest(&dir);
        assert_eq!(m["version"], 2);
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            if e.path().is_dir() || name == "run.lock" || name == "manifest.json" {
                continue;
            }
            assert!(
                m["files"].get(&name).is_some(),
                "{} not covered: {m}",
                e.path().display()
            );
        }
    }
    // config.toml and tokenizer.json are verified when a run is opened.
    let run = RunDir::open(out.path()).unwrap();
    for f in ["config.toml", "tokenizer.json"] {
        let p = out.path().join(f);
        let good = std::fs::read(&p).unwrap();
        let mut bad = good.clone();
        let n = bad.len() / 2;
        bad[n] ^= 0x01;
        std::fs::write(&p, &bad).unwrap();
        let err = format!("{:#}", run.load(&Device::Cpu).err().unwrap());
        assert!(
            err.contains(&p.display().to_string()) && err.contains("checksum mismatch"),
            "{f}: {err}"
        );
        std::fs::write(&p, &good).unwrap();
    }
    run.load(&Device::Cpu).unwrap();

    // A file the manifest does not list (copied in) is refused when read.
    let weights = out.path().join(WEIGHTS);
    let good_manifest = std::fs::read(out.path().join("manifest.json")).unwrap();
    let mut m = manifest(out.path());
    m["files"].as_object_mut().unwrap().remove(WEIGHTS);
    std::fs::write(out.path().join("manifest.json"), m.to_string()).unwrap();
    let err = format!("{:#}", run.load(&Device::Cpu).err().unwrap());
    assert!(
        err.contains(&weights.display().to_string()) && err.contains("not listed"),
        "{err}"
    );
    // An unknown hash is an error, not a pass.
    let mut m = manifest(out.path());
    m["hash"] = serde_json::json!("md5");
    std::fs::write(out.path().join("manifest.json"), m.to_string()).unwrap();
    let err = format!("{:#}", run.load(&Device::Cpu).err().unwrap());
    assert!(err.contains("hash \"md5\"") && err.contains("cannot check"), "{err}");
    // A missing manifest is an error for a run that checksums every file, in both folders.
    std::fs::remove_file(out.path().join("manifest.json")).unwrap();
    let err = format!("{:#}", run.load(&Device::Cpu).err().unwrap());
    assert!(
        err.contains("has no manifest.json") && err.contains("cannot be verified"),
        "{err}"
    );
    std::fs::write(out.path().join("manifest.json"), &good_manifest).unwrap();
    std::fs::remove_file(out.path().join(LAST).join("manifest.json")).unwrap();
    let err = format!("{:#}", Trainer::resume(&cfg, demo(&cfg), out.path()).err().unwrap());
    assert!(err.contains("has no manifest.json"), "{err}");

    // An old run (no dataset.json, a version-1 manifest listing only the weights) still loads.
    let old = tempfile::tempdir().unwrap();
    for f in [WEIGHTS, "config.toml", "tokenizer.json"] {
        std::fs::copy(out.path().join(f), old.path().join(f)).unwrap();
    }
    let mut m = manifest(out.path());
    m.as_object_mut().unwrap().remove("version");
    let weights_sum = m["files"][WEIGHTS].clone();
    m["files"] = serde_json::json!({ WEIGHTS: weights_sum });
    std::fs::write(old.path().join("manifest.json"), m.to_string()).unwrap();
    RunDir::open(old.path()).unwrap().load(&Device::Cpu).unwrap();
    std::fs::remove_file(old.path().join("manifest.json")).unwrap();
    RunDir::open(old.path()).unwrap().load(&Device::Cpu).unwrap();
}

#[test]
fn an_interrupted_overwrite_never_leaves_an_old_model_beside_a_new_config() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let cfg = ClipConfig::tiny();
    let mut t = Trainer::new(&cfg, demo(&cfg), &run).unwrap();
    train(&mut t, 1);
    drop(t);
    let old_weights = std::fs::read(run.join(WEIGHTS)).unwrap();
    let tokenizer = std::fs::read(run.join("tokenizer.json")).unwrap();
    RunDir::open(&run).unwrap().load(&Device::Cpu).unwrap();

    // `stage4-train --overwrite` clears the folder, then writes the new run's first files. A
    // crash in between, at its worst, leaves the new config beside the old weights: what a crash
    // mid-clear or mid-write looks like, with checksums that verify.
    let (lock, removed) = clip_core::run_dir::open_new(&run, true).unwrap();
    assert!(removed.contains(&WEIGHTS), "{removed:?}");
    drop(lock);
    let mut other = ClipConfig::tiny();
    other.seed += 1;
    clip_core::files::write_checked(
        &run,
        &[
            ("config.toml".into(), other.to_toml().unwrap().into_bytes()),
            (WEIGHTS.into(), old_weights),
            ("tokenizer.json".into(), tokenizer),
        ],
    )
    .unwrap();
    let refused = |what: &str, e: anyhow::Error| {
        let e = format!("{e:#}");
        assert!(e.contains("--overwrite") && e.contains("interrupted"), "{what}: {e}");
    };
    refused(
        "open",
        RunDir::open(&run)
            .and_then(|r| r.load(&Device::Cpu).map(|_| ()))
            .unwrap_err(),
    );
    refused("resume", Trainer::resume(&cfg, demo(&cfg), &run).err().unwrap());
    // Starting over again finishes the job: the marker goes once the new run's files are there.
    let (lock, _) = clip_core::run_dir::open_new(&run, true).unwrap();
    let t = Trainer::new_locked(&other, demo(&other), lock).unwrap();
    drop(t);
    assert!(!run.join(clip_core::run_dir::OVERWRITING).exists());
    RunDir::open(&run).unwrap().load(&Device::Cpu).unwrap();
}

/// Issue #32 (11): a dataset.json whose fingerprint holds multi-byte characters panicked when
/// its first 12 bytes were cut for a message (`--resume R --data other`).
#[test]
fn a_dataset_fingerprint_with_multibyte_characters_is_described() {
    let recorded = clip_core::run_dir::DataIdentity {
        path: "/data/a".into(),
        images: 2,
        pairs: 3,
        // 'é' is two bytes: byte 12 falls inside one.
        fingerprint: format!("a{}", "é".repeat(15)),
    };
    let text = recorded.describe();
    assert!(text.ends_with(&format!("listing a{})", "é".repeat(11))), "{text}");
    let other = clip_core::run_dir::DataIdentity {
        fingerprint: "日本語のリスト".into(),
        ..recorded.clone()
    };
    assert!(other.describe().contains("日本語のリスト"));
    assert!(recorded.differs(&other).unwrap().contains("listing changed"));
}

/// Issue #32 (5): a run's config.toml is read like a checkpoint's config: sizes whose model
/// would not fit the machine's memory are refused in GB when the run is loaded, before
/// anything is allocated (they used to abort the process).
#[test]
fn a_run_whose_config_exceeds_memory_is_refused_in_gb() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = ClipConfig::tiny();
    cfg.text.vocab_size = 1 << 24;
    cfg.text.dim = 1 << 16;
    cfg.text.n_heads = 1;
    std::fs::write(tmp.path().join("config.toml"), cfg.to_toml().unwrap()).unwrap();
    std::fs::write(tmp.path().join(WEIGHTS), b"").unwrap();
    std::fs::write(tmp.path().join("tokenizer.json"), b"{}").unwrap();
    let run = RunDir::open(tmp.path()).unwrap();
    let err = format!("{:#}", run.load(&Device::Cpu).err().unwrap());
    assert!(
        err.contains("the model's parameters take") && err.contains(" GB") && err.contains("memory"),
        "{err}"
    );
}

#[test]
fn a_run_config_larger_than_its_weights_is_refused_before_allocating() {
    // A config.toml describing a model far beyond what model.safetensors holds (yet within this
    // machine's memory): before, the model was allocated and initialised, then the weights
    // failed to load. Now the header is read first.
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let cfg = ClipConfig::tiny();
    let t = Trainer::new(&cfg, demo(&cfg), &run).unwrap();
    drop(t);
    let mut big = cfg.clone();
    big.text.vocab_size = 1 << 20;
    big.text.dim = 256;
    big.text.n_heads = 4;
    clip_core::files::write_checked(&run, &[("config.toml".into(), big.to_toml().unwrap().into_bytes())]).unwrap();
    let err = format!("{:#}", RunDir::open(&run).unwrap().load(&Device::Cpu).err().unwrap());
    assert!(
        err.contains("are not of one model") && err.contains("model.safetensors"),
        "{err}"
    );
}
