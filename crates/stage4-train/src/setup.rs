//! Everything before the first step: the config (a resumed run's own, with the training flags
//! applied), the WiSE-FT weights and the teacher, the run folder and its trainer, the teacher's
//! targets, the feature cache, the similarity before training, and Ctrl-C.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clip_cli::html_report::Fixed;
use clip_core::config::Schedule;
use clip_core::distill::{Footprint, Teacher};
use clip_core::fit::{ResumeOptions, Trainer};
use clip_core::prepare::{prepare, DataSource};
use clip_core::run_dir::{self, DataIdentity, RunDir, RunLock, LOCK};
use clip_core::{device, ClipConfig};

use crate::ranks::Ranks;
use crate::Args;

/// What the run is set up with before its trainer exists.
pub struct Setup {
    pub cfg: ClipConfig,
    pub dev: Device,
    /// The run folder.
    pub out: PathBuf,
    /// --wise-ft's weights α.
    pub alphas: Option<Vec<f64>>,
    pub teacher: Option<Teacher>,
}

/// The config, the device and the run folder; the WiSE-FT weights; and the teacher (--teacher, or
/// the one a resumed run records), whose width and fingerprint go into the config.
pub fn setup(args: &Args) -> Result<Setup> {
    let (cfg, dev, out) = config(args)?;
    let alphas = match &args.wise_ft {
        Some(spec) if cfg.pretrained.is_none() => bail!(
            "--wise-ft {spec}: WiSE-FT interpolates with the pretrained CLIP a run starts from; start from one (--pretrained, a clip-* preset or `pretrained` in the config)"
        ),
        Some(spec) => Some(clip_core::wise_ft::parse_alphas(spec)?),
        None => None,
    };
    let teacher = clip_cli::distill::open_teacher(&cfg, &dev, args.resume.is_some() && args.teacher.is_none())?;
    let cfg = match &teacher {
        Some(tc) => with_teacher(args, cfg, tc)?,
        None => cfg,
    };
    Ok(Setup {
        cfg,
        dev,
        out,
        alphas,
        teacher,
    })
}

/// The config with the teacher's width, which sizes the student's linear maps into its space, and
/// its fingerprint.
fn with_teacher(args: &Args, cfg: ClipConfig, tc: &Teacher) -> Result<ClipConfig> {
    Ok(ClipConfig {
        distill: clip_core::config::DistillConfig {
            teacher_dim: Some(tc.model.embed_dim()),
            // (A run resumed from before fingerprints were recorded keeps none.)
            teacher_fingerprint: match (&args.resume, &cfg.distill.teacher_fingerprint) {
                (Some(_), None) => None,
                _ => Some(tc.fingerprint()?),
            },
            ..cfg.distill.clone()
        },
        ..cfg
    })
}

/// A resumed run keeps its model, seed and tokenizer: the flags that would change them are
/// refused.
fn refuse_with_resume(args: &Args) -> Result<()> {
    if args.resume.is_none() {
        return Ok(());
    }
    let refused: Vec<&str> = [
        (args.model.config.is_some(), "--config"),
        (args.model.preset.is_some(), "--preset"),
        (args.model.seed.is_some(), "--seed"),
        (args.data.tokenizer.is_some(), "--tokenizer"),
        (args.train.overwrite, "--overwrite"),
    ]
    .into_iter()
    .filter_map(|(given, flag)| given.then_some(flag))
    .collect();
    if !refused.is_empty() {
        bail!(
            "{} cannot be used with --resume: a resumed run keeps the model, seed and tokenizer recorded in its folder (config.toml, tokenizer.json) — start a new run (--out) to change them; --epochs, the learning rates, --weight-decay and the other training flags may change",
            refused.join(", ")
        );
    }
    Ok(())
}

/// The config (the run's own for --resume, with the training flags applied), the device and the
/// run folder.
fn config(args: &Args) -> Result<(ClipConfig, Device, PathBuf)> {
    refuse_with_resume(args)?;
    let mut cfg = match &args.resume {
        Some(run) => resumed_config(run)?,
        None => args.model.load_config()?,
    };
    args.train.apply(&mut cfg)?;
    if let Some(teacher) = &args.teacher {
        cfg.distill.teacher = Some(teacher.clone());
    }
    // A teacher folder is recorded by its absolute path: the run may be used from elsewhere (a
    // student distilled on images alone answers captions with its teacher's text tower).
    if let Some(t) = &cfg.distill.teacher {
        if let Ok(abs) = Path::new(t).canonicalize() {
            cfg.distill.teacher = Some(abs.display().to_string());
        }
    }
    cfg.validate()?;
    let dev = args.model.device()?;
    // Before any model exists (a teacher's included): set for the whole run, recorded in its
    // config.toml; a resumed run keeps its own unless --precision is given (a change then
    // recorded like the other training flags').
    let precision = args.precision.apply(&mut cfg, &dev)?;
    let out = match (&args.resume, &args.out) {
        (Some(r), _) => r.clone(),
        (None, Some(o)) => o.clone(),
        (None, None) => new_run_dir()?,
    };
    println!(
        "config {} (loss {}), device {}, precision {}, run folder {}",
        cfg.name,
        cfg.loss,
        device::describe(&dev),
        clip_cli::args::describe_precision(precision),
        out.display()
    );
    Ok((cfg, dev, out))
}

/// The config of the run `--resume` names, verified against its manifest. A folder stopped
/// before it wrote its config holds nothing to resume, and says how to start it again.
fn resumed_config(run: &Path) -> Result<ClipConfig> {
    if !run.is_dir() {
        bail!(
            "run folder {} does not exist: pass the --out folder of a stage 4 run",
            run.display()
        );
    }
    if !run.join(clip_core::run_dir::CONFIG).is_file() {
        bail!(
            "{} holds no run to resume (it was stopped before writing its config.toml): start it again with your original command and --out {0}",
            run.display()
        );
    }
    RunDir { dir: run.to_path_buf() }.config()
}

/// runs/<timestamp>, unique.
fn new_run_dir() -> Result<PathBuf> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    for i in 0.. {
        let d = PathBuf::from("runs").join(if i == 0 {
            format!("run-{secs}")
        } else {
            format!("run-{secs}-{i}")
        });
        if !d.exists() {
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            return Ok(d);
        }
    }
    unreachable!()
}

/// The run's trainer on this rank: rank 0 opens (or resumes) the run folder first, then the
/// other ranks open theirs ([`crate::ranks`]); each joins the world, and their weights are
/// checked to be the same before the first step.
pub fn open_ranks(args: &Args, s: &Setup, ranks: &mut Ranks) -> Result<Trainer> {
    let mut t = if ranks.leads() {
        let t = open_run(args, &s.cfg, &s.dev, &s.out)?;
        ranks.world.barrier()?;
        t
    } else {
        ranks.world.barrier()?;
        let scratch = ranks.scratch(&s.out, args.resume.is_some())?;
        open_run(args, &s.cfg, &s.dev, &scratch)?
    };
    t.set_world(ranks.world.clone())?;
    t.check_same_weights()?;
    Ok(t)
}

/// The trainer of a new or resumed run. One writer per folder: an existing folder is locked
/// before the data is read, so a second run is refused at once (a new folder is created, and
/// locked, once the data is known to be good).
fn open_run(args: &Args, cfg: &ClipConfig, dev: &Device, out: &Path) -> Result<Trainer> {
    let lock = match (&args.resume, out.exists()) {
        (Some(_), _) => Some(RunLock::acquire(out)?),
        (None, true) => {
            let (lock, removed) = run_dir::open_new(out, args.train.overwrite)?;
            if !removed.is_empty() {
                println!(
                    "--overwrite: removed the previous run's {} from {}",
                    removed.join(", "),
                    out.display()
                );
            }
            Some(lock)
        }
        (None, false) => None,
    };
    let data = prepare(cfg, &data_source(args)?, dev, &clip_cli::progress::Bar::new())?;
    // Refused before a new folder is made: the corrected command can use the same --out.
    clip_core::distill::check_data(&data.dataset, &cfg.distill)?;
    println!(
        "data: {} pairs of {} images; training on {}, validating on {}{}",
        data.dataset.pairs.len(),
        data.dataset.images.len(),
        data.split.train.len(),
        data.split.val.len(),
        data.split
            .note
            .as_deref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default()
    );
    let lock = match lock {
        Some(l) => l,
        None => RunLock::acquire(out)?,
    };
    if let Some(h) = &lock.took_over {
        println!(
            "took over {} left by {h}, which is no longer running",
            out.join(LOCK).display()
        );
    }
    let t = match &args.resume {
        Some(_) => {
            let opts = ResumeOptions {
                other_data: args.other_data,
            };
            Trainer::resume_with(cfg, data, lock, opts)?
        }
        None => Trainer::new_locked(cfg, data, lock)?,
    };
    describe_resume(&t, out);
    Ok(t)
}

/// The data to train on: the flags', and for --resume the run's tokenizer (verified against its
/// manifest; a run killed before writing it trains it again from the same captions) and, without
/// --data, the run's own dataset (recorded in dataset.json), not the demo set.
fn data_source(args: &Args) -> Result<DataSource> {
    let mut source = args.data.source();
    let Some(run) = &args.resume else {
        return Ok(source);
    };
    let tok = run.join(run_dir::TOKENIZER);
    if tok.is_file() {
        clip_core::files::read_checked(&tok)?;
        source.tokenizer = Some(tok);
    }
    if source.path.is_none() {
        if let Some(id) = DataIdentity::read(run)? {
            println!("data: the run's dataset {}", id.path.display());
            source.path = Some(id.path);
        }
    }
    Ok(source)
}

/// What a resume found and changed.
fn describe_resume(t: &Trainer, out: &Path) {
    if t.restarted() {
        println!(
            "resume: {} had no checkpoint yet (stopped before its first was saved): starting from epoch 1",
            out.display()
        );
    }
    for c in t.changes() {
        let file = if c.key == "data" { "dataset.json" } else { "config.toml" };
        println!("resume: {c} (recorded in {file})");
        if c.key == "train.epochs" && t.cfg().train.schedule == Schedule::Cosine {
            println!(
                "  cosine schedule: the decay now spans {} epochs; from the next step the learning rate follows that curve",
                t.cfg().train.epochs
            );
        }
    }
    if let Some(note) = t.selection_note() {
        println!("note: {note}");
    }
}

/// The teacher's embeddings of the whole dataset (computed once, or read from the feature cache),
/// handed to the trainer; the teacher itself is dropped here.
/// Returns the teacher's and the student's footprints (parameters, weights, embeddings per
/// second), measured one after the other here, on the same device.
pub fn teach(args: &Args, t: &mut Trainer, teacher: Teacher) -> Result<[Footprint; 2]> {
    let cache = args
        .feature_cache
        .clone()
        .unwrap_or_else(|| t.out().join(clip_core::feature_cache::CACHE_DIR));
    let started = Instant::now();
    let views = if t.cfg().data.augment { t.cfg().distill.views } else { 0 };
    let targets = clip_core::distill::targets(&teacher, &data_source(args)?, &t.data().dataset, &cache, views)?;
    if t.cfg().distill.inherit && args.resume.is_none() {
        clip_cli::distill::print_inherited(&t.inherit_from(&teacher.model, &teacher.tokenizer)?);
    }
    // Speed on random inputs of each model's own shapes, one right after the other.
    let footprints = [
        clip_core::distill::footprint(&teacher.model, 16, 16, 1.0)?,
        clip_core::distill::footprint(t.model(), 16, 16, 1.0)?,
    ];
    drop(teacher);
    let reused = targets.image.reused + targets.text.reused + targets.views.iter().map(|v| v.reused).sum::<usize>();
    println!(
        "teacher embeddings: {} images{}, {} distinct captions in {} ({} teacher forward passes, {reused} rows reused, {:.1}s); the teacher is not held in memory while the student trains",
        targets.image.distinct(),
        if views > 0 {
            format!(" and {views} augmented views of each")
        } else {
            String::new()
        },
        targets.text.distinct(),
        cache.display(),
        targets.forwards,
        started.elapsed().as_secs_f64()
    );
    if views > 0 {
        println!(
            "--augment with a teacher: epoch e trains on view e mod {views} of every image (a fixed random crop and flip), against the teacher's embedding of that very crop (distill.views = {views})"
        );
    }
    t.set_teacher(targets)?;
    if t.images_only() {
        println!(
            "images without captions: the image tower learns the teacher's image embeddings (feature term, weight {}); the text tower is left as it is, and clip-predict answers this student's captions with the teacher's text tower ({})",
            t.cfg().distill.feature,
            t.cfg().distill.teacher.as_deref().unwrap_or("?")
        );
    } else {
        println!("distillation loss: {}", t.cfg().distill.describe());
    }
    Ok(footprints)
}

/// Everything before the first step: the feature cache, where training starts, the fixed batch's
/// similarity before training (kept in similarity.json for the report, and for a resumed run's
/// report), and Ctrl-C.
pub fn before_training(args: &Args, t: &mut Trainer) -> Result<Fixed> {
    if args.no_feature_cache {
        t.set_feature_cache(None);
    } else if let Some(dir) = &args.feature_cache {
        t.set_feature_cache(Some(dir.clone()));
    }
    describe_frozen(t)?;
    if t.cfg().pretrained.is_some() {
        println!("fine-tuning a pretrained CLIP: {}", t.cfg().train.describe());
        println!("  logit_scale is learned and clamped to ≤ ln 100 after every step, as open_clip");
    }
    let mut fixed = Fixed::load_or_new(t);
    let epochs = t.cfg().train.epochs;
    match &t.state().partial {
        Some(p) => println!(
            "resuming in epoch {} of {epochs} after step {} of {}",
            t.state().epoch + 1,
            p.steps,
            t.steps_per_epoch()
        ),
        None if t.state().epoch > 0 => println!("resuming after epoch {} of {epochs}", t.state().epoch),
        None => {
            if let Some(a) = t.measure_agreement_start()? {
                println!("start: top-1 agreement with the teacher on validation {a:.3}");
            }
            if t.cfg().pretrained.is_some() {
                // What fine-tuning must not lose: the checkpoint, untouched, on the validation split.
                let v = t.measure_start()?;
                println!("start (the checkpoint, untouched): val {:.4}  {}", v.loss, v.describe());
            }
            let before = t.fixed_similarity()?;
            fixed.heat_map(
                &t.out().join("similarity_before.png"),
                &before,
                "Similarity before training",
            )?;
            fixed.before = Some(before);
            fixed.save(t.out())?;
        }
    }
    stop_on_ctrl_c(t)?;
    describe_plan(t);
    Ok(fixed)
}

/// The epochs, steps and batches ahead, with the ranks and micro-batches they go through.
fn describe_plan(t: &Trainer) {
    let epochs = t.cfg().train.epochs;
    let micro = match t.cfg().train.micro_batch {
        0 => String::new(),
        m => format!(", through the towers {m} at a time (gradient cache)"),
    };
    let world = match t.world() {
        Some(w) => format!(
            " on {} ranks ({} pairs each)",
            w.size(),
            t.cfg().train.batch_size / w.size()
        ),
        None => String::new(),
    };
    println!(
        "{epochs} epochs × {} steps of {} pairs{world}{micro}\n",
        t.steps_per_epoch(),
        t.cfg().train.batch_size * t.cfg().train.accumulate
    );
}

/// A follower rank's start: its own feature cache, in its scratch folder (ranks never write one
/// folder at once), or none with --no-feature-cache; and Ctrl-C.
pub fn follow(args: &Args, t: &mut Trainer) -> Result<()> {
    if args.no_feature_cache {
        t.set_feature_cache(None);
    }
    stop_on_ctrl_c(t)
}

/// Says which towers are frozen and where their cached features came from.
fn describe_frozen(t: &Trainer) -> Result<()> {
    let tr = &t.cfg().train;
    if !tr.freeze_image && !tr.freeze_text {
        return Ok(());
    }
    let (image, text) = t.cached_towers();
    let started = Instant::now();
    let frozen = t.frozen_features()?;
    for (tower, is_frozen, cached, rows) in [
        (
            "image",
            tr.freeze_image,
            image,
            frozen.as_ref().and_then(|f| f.image.as_ref()),
        ),
        (
            "text",
            tr.freeze_text,
            text,
            frozen.as_ref().and_then(|f| f.text.as_ref()),
        ),
    ] {
        if !is_frozen {
            continue;
        }
        match rows {
            Some(r) => println!(
                "frozen {tower} tower: features of {} {}s cached in {} ({} reused, {} computed, {:.1}s)",
                r.distinct(),
                if tower == "image" { "image" } else { "distinct caption" },
                r.file.display(),
                r.reused,
                r.computed,
                started.elapsed().as_secs_f64()
            ),
            None if !cached && tower == "image" && t.cfg().data.augment => {
                println!("frozen image tower: runs on every batch (augmented images are new inputs every epoch)")
            }
            None => println!("frozen {tower} tower: runs on every batch (--no-feature-cache)"),
        }
    }
    Ok(())
}

/// Ctrl-C / SIGTERM: finish the step, save, say how to resume; a second one quits at once (the
/// last checkpoint on disk is complete either way).
fn stop_on_ctrl_c(t: &mut Trainer) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("\nstopped without saving; the last checkpoint on disk is intact");
            std::process::exit(130);
        }
        eprintln!("\nstopping at the end of this step to save a checkpoint (Ctrl-C again quits at once)");
    })
    .context("installing the Ctrl-C handler")?;
    t.set_stop(stop);
    Ok(())
}
