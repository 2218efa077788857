//! Training on the real demo set: the loss falls, retrieval on the training pairs becomes perfect,
//! and a resumed run reproduces an uninterrupted one exactly.

use candle_core::Device;
use clip_core::fit::Trainer;
use clip_core::prepare::{prepare, DataSource};
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

#[test]
fn tiny_learns_the_demo_set() {
    let cfg = ClipConfig::tiny();
    let out = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(&cfg, demo(&cfg), out.path()).unwrap();
    let before = t.recall(&t.data().split.train.clone()).unwrap();
    train(&mut t, cfg.train.epochs);
    let h = &t.state().history;
    let (first, last) = (h[0].train_loss, h.last().unwrap().train_loss);
    assert!(last < 0.5 * first, "loss {first} → {last}");
    t.load_best().unwrap();
    let after = t.recall(&t.data().split.train.clone()).unwrap();
    assert!(
        before.i2t_r1 < 1.0 && before.t2i_r1 < 1.0,
        "untrained model already perfect? {before:?}"
    );
    assert_eq!((after.i2t_r1, after.t2i_r1), (1.0, 1.0), "{after:?}");
    for f in [
        "model.safetensors",
        "optimizer.safetensors",
        "config.toml",
        "tokenizer.json",
        "metrics.json",
        "loss.csv",
        "last/state.json",
    ] {
        assert!(out.path().join(f).is_file(), "missing {f}");
    }
}

#[test]
fn resume_reproduces_the_uninterrupted_losses() {
    let cfg = ClipConfig::tiny();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut full = Trainer::new(&cfg, demo(&cfg), a.path()).unwrap();
    train(&mut full, 4);

    let mut first = Trainer::new(&cfg, demo(&cfg), b.path()).unwrap();
    train(&mut first, 2);
    drop(first);
    let mut resumed = Trainer::resume(&cfg, demo(&cfg), b.path()).unwrap();
    assert_eq!(resumed.state().epoch, 2);
    train(&mut resumed, 4);

    let losses = |t: &Trainer| {
        t.state()
            .history
            .iter()
            .map(|r| (r.train_loss, r.val_loss))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        losses(&full),
        losses(&resumed),
        "a resumed run must match the uninterrupted one exactly"
    );
    assert_eq!(full.opt().step, resumed.opt().step);
}

#[test]
fn resume_of_a_folder_without_a_run_says_why() {
    let cfg = ClipConfig::tiny();
    let empty = tempfile::tempdir().unwrap();
    let err = Trainer::resume(&cfg, demo(&cfg), empty.path()).err().unwrap();
    assert!(format!("{err:#}").contains("holds no run to resume"), "{err:#}");
}

#[test]
fn a_run_killed_before_its_first_checkpoint_resumes_from_epoch_1() {
    let mut cfg = ClipConfig::tiny();
    cfg.train.epochs = 2;
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut full = Trainer::new(&cfg, demo(&cfg), a.path()).unwrap();
    // A new run has its files from its first moment, but no checkpoint until its first epoch ends.
    assert!(a.path().join("model.safetensors").is_file() && a.path().join("dataset.json").is_file());
    assert!(!a.path().join("last").exists());
    train(&mut full, 2);

    // Killed at each point of its start: in epoch 1 (all files, no last/ yet), and after only
    // the config was written.
    for lost in [vec![], vec!["model.safetensors", "dataset.json", "tokenizer.json"]] {
        let t = Trainer::new(&cfg, demo(&cfg), b.path()).unwrap();
        drop(t);
        for f in &lost {
            let p = b.path().join(f);
            if p.is_dir() {
                std::fs::remove_dir_all(&p).unwrap();
            } else {
                std::fs::remove_file(&p).unwrap();
            }
        }
        // Files removed by hand leave the manifest listing them: that is what a kill between
        // the two manifest writes looks like too.
        let mut resumed = Trainer::resume(&cfg, demo(&cfg), b.path()).unwrap();
        assert!(resumed.restarted(), "{lost:?}");
        assert_eq!(resumed.state().epoch, 0);
        train(&mut resumed, 2);
        assert!(b.path().join("last/state.json").is_file());
        let losses = |t: &Trainer| t.state().history.iter().map(|r| r.train_loss).collect::<Vec<_>>();
        assert_eq!(losses(&full), losses(&resumed), "{lost:?}");
        drop(resumed);
        clip_core::run_dir::clear_run(b.path()).unwrap();
    }
}
