//! Stage 4 — train: does the loss keep falling over many epochs?
//!
//! Trains on the training split, validates after each epoch, keeps the best model by validation
//! loss in a run folder, and checks at the end that it learned: no NaN/Inf at any step, the last
//! epoch's loss well below the first, and — on a small dataset such as the demo — every image's
//! own caption ranked first and every caption's own image ranked first.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Parser;
use clip_cli::html_report::{self, Fixed, Ranking, Thumbnails};
use clip_cli::plot;
use clip_cli::DataArgs;
use clip_cli::Report;
use clip_core::config::Schedule;
use clip_core::distill::Footprint;
use clip_core::fit::{ResumeOptions, Stopped, Trainer, Validation};
use clip_core::params::Group;
use clip_core::prepare::{prepare, DataSource};
use clip_core::run_dir::{self, DataIdentity, RunDir, RunLock, LOCK};
use clip_core::{device, ClipConfig};

#[derive(Parser)]
#[command(
    about = "Stage 4 — train for many epochs, keep the best model, check that it learned.",
    after_help = "Examples:\n  stage4-train                                   the demo set, tiny preset\n  stage4-train --data photos/ --epochs 60 --out runs/mine\n  stage4-train --resume runs/mine --epochs 80     continue where it stopped\n  stage4-train --freeze both --epochs 20          train only the heads (tower features cached)\n\nThe run folder holds model.safetensors (best by validation loss), config.toml, tokenizer.json,\nmetrics.json, loss.csv, loss/lr/quality.png, similarity_before/after.png, report.html\n(open it in a browser: curves, similarity, each image's best captions), and last/ for --resume.\nUse it with clip-predict.\n\nCtrl-C (or SIGTERM) stops at the end of the current step, saves last/ with the position in the\nepoch and prints the command that resumes; a resumed run continues exactly as an uninterrupted\none. With --resume, --epochs, the learning rates, --weight-decay and the other training flags\nreplace the run's values (recorded in its config.toml); --config, --preset, --seed and\n--tokenizer are refused (they would make another model or data split). Under --schedule cosine,\nraising --epochs spreads the decay over the new total: from the next step the learning rate\nfollows the longer curve. One run writes a folder at a time (run.lock); an --out folder that\nholds a run needs --resume or --overwrite."
)]
struct Args {
    #[command(flatten)]
    model: clip_cli::ModelArgs,
    #[command(flatten)]
    data: DataArgs,
    /// The run folder to write (default: a new folder under runs/).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Continue the run in this folder from its last checkpoint (up to --epochs in all); training
    /// flags given with it replace the run's values and are recorded in its config.toml.
    #[arg(long, value_name = "RUN", conflicts_with = "out")]
    resume: Option<PathBuf>,
    #[command(flatten)]
    train: clip_cli::TrainArgs,
    #[command(flatten)]
    precision: clip_cli::PrecisionArg,
    /// Where frozen towers' features are cached [default: RUN/feature-cache]; share one folder
    /// between runs of the same frozen towers to compute them only once.
    #[arg(long, value_name = "DIR")]
    feature_cache: Option<PathBuf>,
    /// Run frozen towers on every batch instead of caching their features.
    #[arg(long, conflicts_with = "feature_cache")]
    no_feature_cache: bool,
    /// With --resume: continue on the data --data names although it is not the run's (another
    /// path, or the run's path with other contents). Without it such a resume is refused, naming
    /// both; a run stopped mid-epoch then starts that epoch over.
    #[arg(long, requires = "resume")]
    other_data: bool,
    /// After fine-tuning a pretrained CLIP: WiSE-FT, the weights (1−α)·checkpoint + α·fine-tuned,
    /// for one α (0.5) or a sweep FROM:TO:STEP (0:1:0.1); each is validated, the best becomes
    /// model.safetensors, and report.html plots the curve. It keeps much of what the checkpoint
    /// knew while keeping most of what the fine-tune learned.
    #[arg(long, value_name = "ALPHA|FROM:TO:STEP")]
    wise_ft: Option<String>,
    /// Distil from a teacher: a run folder of stage 4, or a pretrained CLIP (clip-vit-b-32, a
    /// Hugging Face repo, a folder). Its embeddings of every image and caption are computed once
    /// (each input as the teacher reads it) and cached; the loss adds the config's [distill] terms
    /// (default: feature distillation, weight 2000, beside the contrastive loss).
    #[arg(long, value_name = "RUN|MODEL")]
    teacher: Option<String>,
}

fn main() -> ExitCode {
    clip_cli::run_stage(|| run(Args::parse()))
}

fn run(args: Args) -> Result<ExitCode> {
    let mut report = Report::new(4, "train");
    let json = args.model.json.as_deref();
    println!("stage 4 — train: does the loss keep falling over many epochs?\n");
    let (cfg, dev, out) = setup(&args)?;
    report.metric("precision", cfg.train.precision.name());
    let alphas = match &args.wise_ft {
        Some(spec) if cfg.pretrained.is_none() => bail!(
            "--wise-ft {spec}: WiSE-FT interpolates with the pretrained CLIP a run starts from; start from one (--pretrained, a clip-* preset or `pretrained` in the config)"
        ),
        Some(spec) => Some(clip_core::wise_ft::parse_alphas(spec)?),
        None => None,
    };
    let teacher = clip_cli::distill::open_teacher(&cfg, &dev, args.resume.is_some() && args.teacher.is_none())?;
    let cfg = match &teacher {
        // The teacher's width sizes the student's linear maps into its space.
        Some(tc) => ClipConfig {
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
        },
        None => cfg,
    };
    let mut t = open_run(&args, &cfg, &dev, &out)?;
    let footprints = match teacher {
        Some(tc) => Some(teach(&args, &mut t, tc)?),
        None => None,
    };
    let mut fixed = before_training(&args, &mut t)?;
    let mut thumbs = Thumbnails::default();

    // The loop: train an epoch, validate, schedule, checkpoint.
    while t.state().epoch < cfg.train.epochs {
        let lr = t.lr(Group::Heads);
        let started = Instant::now();
        let (train_loss, pps) = match train_epoch(&mut t, lr) {
            Ok(v) => v,
            Err(e) if e.is::<Stopped>() => return stopped(&t, &args, e),
            Err(e) => {
                report.check("finite", false, format!("{e:#}"));
                return report.finish(json);
            }
        };
        let v = t.validate()?;
        let secs = started.elapsed().as_secs_f64();
        let best = t.end_epoch(train_loss, &v, secs, pps)?;
        plot_curves(&t)?;
        // Cheap: curves and the before matrix, no embedding; the rankings come at the end.
        html_report::write(&t, &fixed, None, &mut thumbs)?;
        print_epoch(&t, train_loss, &v, lr, pps, secs, best);
    }
    judge(
        &mut t,
        &mut fixed,
        &mut thumbs,
        &mut report,
        alphas.as_deref(),
        footprints.as_ref(),
    )?;
    report.finish(json)
}

/// The config (the run's own for --resume, with the training flags applied), the device and the
/// run folder. A resumed run keeps its model, seed and tokenizer: the flags that would change
/// them are refused.
fn setup(args: &Args) -> Result<(ClipConfig, Device, PathBuf)> {
    if args.resume.is_some() {
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
    }
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

/// The teacher's embeddings of the whole dataset (computed once, or read from the feature cache),
/// handed to the trainer; the teacher itself is dropped here.
/// Returns the teacher's and the student's footprints (parameters, weights, embeddings per
/// second), measured one after the other here, on the same device.
fn teach(args: &Args, t: &mut Trainer, teacher: clip_core::distill::Teacher) -> Result<[Footprint; 2]> {
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

/// Everything before the first step: the feature cache, where training starts, the fixed batch's
/// similarity before training (kept in similarity.json for the report, and for a resumed run's
/// report), and Ctrl-C.
fn before_training(args: &Args, t: &mut Trainer) -> Result<Fixed> {
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
    println!(
        "{epochs} epochs × {} steps of {} pairs\n",
        t.steps_per_epoch(),
        t.cfg().train.batch_size * t.cfg().train.accumulate
    );
    Ok(fixed)
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

/// One epoch (or the rest of a stopped one) under a progress bar.
fn train_epoch(t: &mut Trainer, lr: f64) -> Result<(f64, f64)> {
    let epoch = t.state().epoch + 1;
    let bar = clip_cli::progress::epoch_bar(epoch, t.cfg().train.epochs, t.steps_per_epoch() as u64);
    bar.set_position(t.state().partial.as_ref().map_or(0, |p| p.steps as u64));
    let trained = t.train_epoch(|_, loss, pps| {
        bar.set_message(format!("loss {loss:.4} lr {lr:.2e} {pps:.0} pairs/s"));
        bar.inc(1);
    });
    bar.finish_and_clear();
    trained
}

/// Stopped by Ctrl-C: the checkpoint with the position in the epoch, and the command that resumes.
fn stopped(t: &Trainer, args: &Args, why: anyhow::Error) -> Result<ExitCode> {
    let dir = t.save_checkpoint()?;
    println!(
        "{why:#}: checkpoint saved in {}\nresume with:\n  {}",
        dir.display(),
        resume_command(args, t.out())
    );
    Ok(ExitCode::from(130))
}

/// One line per epoch: losses, quality (zero-shot accuracy for class folders, recall@1 both ways
/// for captions), learning rate, speed, and whether it is the best so far.
fn print_epoch(t: &Trainer, train_loss: f64, v: &Validation, lr: f64, pps: f64, secs: f64, best: bool) {
    let epoch = t.state().epoch;
    let quality = match v.zero_shot {
        Some(acc) => format!("zero-shot acc {acc:.3}"),
        // Images without captions: the losses are the distillation's, nothing to retrieve.
        None if t.images_only() => "feature loss".to_string(),
        None => format!("R@1 i→t {:.2} t→i {:.2}", v.recall.i2t_r1, v.recall.t2i_r1),
    };
    let flag = if best {
        "  *best"
    } else if !v.loss.is_finite() && t.validates() {
        "  (validation loss is not finite: not kept as the best model)"
    } else {
        ""
    };
    let val = if t.validates() {
        format!("{:.4}", v.loss)
    } else {
        "–".into()
    };
    println!(
        "epoch {epoch:>3}: train {train_loss:.4}  val {val}  {quality}  lr {lr:.2e}  {pps:.0} pairs/s  {secs:.1}s{flag}"
    );
}

/// The gate: no NaN or Inf, the loss fell to half its first value, and the best model learned
/// (see clip_core::gates); then the after heat map and the full report.
fn judge(
    t: &mut Trainer,
    fixed: &mut Fixed,
    thumbs: &mut Thumbnails,
    report: &mut Report,
    alphas: Option<&[f64]>,
    footprints: Option<&[Footprint; 2]>,
) -> Result<()> {
    if t.state().best_epoch == 0 {
        println!("no epoch had a finite loss: model.safetensors holds the untrained model");
    }
    let fine_tune = t.cfg().pretrained.is_some();
    judge_losses(t, report, fine_tune);
    t.load_best()?;
    if let Some(alphas) = alphas {
        wise_ft(t, alphas)?;
    }
    if fine_tune {
        judge_fine_tune(t, report)?;
    }
    if t.teacher().is_some() {
        judge_distillation(t, report, footprints)?;
    }
    let after = t.fixed_similarity()?;
    fixed.heat_map(
        &t.out().join("similarity_after.png"),
        &after,
        "Similarity after training (best model)",
    )?;
    fixed.after = Some(after);
    fixed.save(t.out())?;
    let page = html_report::write(t, fixed, Some(&Ranking::compute(t)?), thumbs)?;
    report.metric("train_recall", t.recall(&t.data().split.train)?);
    report.metric("best_epoch", t.state().best_epoch);
    report.metric("best_val_loss", t.state().best_val_loss);
    report.metric("run", t.out().display().to_string());
    if fine_tune || t.images_only() {
        // A fine-tune is judged against its start; images without captions by the agreement
        // with the teacher (nothing to retrieve).
        println!("\nrun folder: {} (model.safetensors, config.toml, tokenizer.json, metrics.json with the start and every epoch, loss.csv, plots)", t.out().display());
        println!("report: {}", page.display());
        report.metric("report", page.display().to_string());
        return Ok(());
    }
    // Zero-shot accuracy (class folders) or retrieval (captions), against what a model that
    // learned nothing scores: see clip_core::gates.
    let gate = clip_core::gates::learned(t)?;
    report.metric("gate", &gate);
    if gate.name == "zero-shot" {
        report.metric("train_zero_shot", gate.value);
    }
    let val = t.state().history.iter().filter_map(|h| h.zero_shot).next_back();
    let detail = match val {
        Some(v) => format!(
            "best model (epoch {}): {}; {v:.3} on validation (last epoch)",
            t.state().best_epoch,
            gate.detail
        ),
        None => format!("best model (epoch {}): {}", t.state().best_epoch, gate.detail),
    };
    report.check(gate.name, gate.passed, detail);
    println!("\nrun folder: {} (model.safetensors, config.toml, tokenizer.json, metrics.json, loss.csv, loss/lr/quality.png, similarity_before/after.png, similarity.json)", t.out().display());
    println!("report: {}", page.display());
    report.metric("report", page.display().to_string());
    Ok(())
}

/// WiSE-FT over `alphas`, one line per α; the best becomes the run's model.
fn wise_ft(t: &mut Trainer, alphas: &[f64]) -> Result<()> {
    println!(
        "\nWiSE-FT: (1−α)·checkpoint + α·fine-tuned (best epoch {}), on the validation split",
        t.state().best_epoch
    );
    let w = t.wise_ft(alphas, |p| {
        println!(
            "  α {:.2}: val {:.4}  {}",
            p.alpha,
            p.validation.loss,
            p.validation.describe()
        )
    })?;
    println!(
        "  kept α = {} as model.safetensors (wise_ft.png, report.html)",
        w.chosen
    );
    plot::wise_ft(&w).write_png(&t.out().join("wise_ft.png"))
}

/// A fine-tune's gate: the final model (the best epoch, or the WiSE-FT blend) validated against
/// the untouched checkpoint, side by side; it fails when the fine-tune made the model worse.
fn judge_fine_tune(t: &Trainer, report: &mut Report) -> Result<()> {
    let Some(start) = t.state().start else {
        report.check(
            "not below the start",
            false,
            "the run has no measurement of its checkpoint before training (started by an older clipmine): start it again to compare",
        );
        return Ok(());
    };
    let last = t.validate()?;
    let label = match &t.state().wise_ft {
        Some(w) => format!("final (epoch {}, WiSE-FT α {})", t.state().best_epoch, w.chosen),
        None => format!("final (best, epoch {})", t.state().best_epoch),
    };
    println!("\nbefore and after, on the validation split:");
    print!("{}", before_after_table(t, &start, &label, &last));
    report.metric("start", start);
    report.metric("final", last);
    let gate = clip_core::gates::not_below_start(&start, &last);
    report.check(gate.name, gate.passed, gate.detail.clone());
    report.metric("gate", &gate);
    Ok(())
}

/// A distillation's gate and the teacher beside the student: parameters, weights, embeddings
/// per second (measured at the start, one after the other), validation recall@1 and zero-shot
/// accuracy, and the student's top-1 agreement with the teacher.
fn judge_distillation(t: &mut Trainer, report: &mut Report, footprints: Option<&[Footprint; 2]>) -> Result<()> {
    let Some(teacher) = t.teacher() else { return Ok(()) };
    let start = t.state().agreement_start.unwrap_or(0.0);
    let end = t.teacher_agreement()?.unwrap_or(0.0);
    let val = &t.data().split.val;
    let images_only = t.images_only();
    let (tr, sr) = if images_only {
        (None, None)
    } else {
        (t.teacher_recall(val)?, Some(t.recall(val)?))
    };
    let (tz, sz) = (t.teacher_zero_shot(val)?, t.zero_shot(val)?);
    let sp = t.model().params.total_params();
    let fp = |i: usize| footprints.map(|f| f[i]);
    println!(
        "\nteacher and student, on the validation {} (speed: random inputs of each model's shapes, batches of 16, measured one after the other at the start):",
        if images_only { "images" } else { "split" }
    );
    let mut head = format!(
        "  {:<8} {:>11} {:>10} {:>10} {:>11}",
        "", "parameters", "weights", "images/s", "captions/s"
    );
    if !images_only {
        head.push_str(&format!(" {:>8} {:>8}", "R@1 i→t", "R@1 t→i"));
    }
    if sz.is_some() {
        head.push_str(&format!(" {:>10}", "zero-shot"));
    }
    head.push_str(&format!(" {:>10}", "agreement"));
    println!("{head}");
    let row = |name: &str,
               params: usize,
               f: Option<Footprint>,
               r: Option<&clip_core::retrieval::Recall>,
               z: Option<f64>,
               a: Option<f64>| {
        let mut line = format!("  {name:<8} {:>9.2} M", params as f64 / 1e6);
        match f {
            Some(f) => line.push_str(&format!(
                " {:>7.1} MB {:>10.1} {:>11.1}",
                f.weight_bytes as f64 / 1e6,
                f.images_per_second,
                f.captions_per_second
            )),
            None => line.push_str(&format!(" {:>10} {:>10} {:>11}", "–", "–", "–")),
        }
        if let Some(r) = r {
            line.push_str(&format!(" {:>8.3} {:>8.3}", r.i2t_r1, r.t2i_r1));
        }
        if sz.is_some() {
            line.push_str(&format!(" {:>10}", z.map_or("–".into(), |z| format!("{z:.3}"))));
        }
        line.push_str(&format!(" {:>10}", a.map_or("–".into(), |a| format!("{a:.3}"))));
        println!("{line}");
    };
    row("teacher", teacher.teacher_params, fp(0), tr.as_ref(), tz, None);
    row(
        "student",
        fp(1).map_or(sp, |f| f.parameters),
        fp(1),
        sr.as_ref(),
        sz,
        Some(end),
    );
    if let (Some(f), Some(g)) = (fp(0), fp(1)) {
        let fewer = f.parameters as f64 / g.parameters.max(1) as f64;
        println!(
            "  the student: {}, {:.1}× the teacher's image speed and {:.1}× its caption speed on this {}; agreement {start:.3} at the start{}",
            if fewer >= 1.0 {
                format!("{fewer:.1}× fewer parameters")
            } else {
                format!("{:.1}× more parameters", 1.0 / fewer)
            },
            g.images_per_second / f.images_per_second.max(1e-9),
            g.captions_per_second / f.captions_per_second.max(1e-9),
            if t.data().device.is_cpu() { "CPU" } else { "device" },
            if images_only {
                " (images only: each image's nearest other image, the student's against the teacher's)"
            } else {
                ""
            }
        );
    }
    report.metric(
        "distillation",
        serde_json::json!({
            "teacher": teacher.teacher, "teacher_params": teacher.teacher_params, "student_params": sp,
            "teacher_recall": tr, "student_recall": sr, "teacher_zero_shot": tz, "student_zero_shot": sz,
            "teacher_footprint": fp(0), "student_footprint": fp(1), "images_only": images_only,
            "agreement_start": t.state().agreement_start, "agreement": end,
        }),
    );
    let summary = clip_core::distill::Summary {
        teacher: teacher.teacher.clone(),
        teacher_footprint: fp(0),
        student_footprint: fp(1),
        teacher_recall: tr,
        student_recall: sr,
        teacher_zero_shot: tz,
        student_zero_shot: sz,
        agreement_start: t.state().agreement_start,
        agreement: end,
        images_only,
    };
    t.set_distillation(summary)?;
    let gate = clip_core::gates::agreement_rose(start, end);
    report.check(gate.name, gate.passed, gate.detail);
    Ok(())
}

/// The start, every epoch and the final model in one table.
fn before_after_table(t: &Trainer, start: &Validation, label: &str, last: &Validation) -> String {
    let zs = start.zero_shot.is_some();
    let mut s = format!(
        "  {:<34} {:>9} {:>8} {:>8}{}\n",
        "",
        "val loss",
        "R@1 i→t",
        "R@1 t→i",
        if zs { "  zero-shot" } else { "" }
    );
    let mut row = |name: &str, v: &Validation| {
        s.push_str(&format!(
            "  {name:<34} {:>9.4} {:>8.3} {:>8.3}{}\n",
            v.loss,
            v.recall.i2t_r1,
            v.recall.t2i_r1,
            v.zero_shot.map(|a| format!("  {a:>9.3}")).unwrap_or_default()
        ));
    };
    row("start (checkpoint)", start);
    for r in &t.state().history {
        let v = Validation {
            loss: r.val_loss,
            recall: r.recall,
            zero_shot: r.zero_shot,
        };
        row(&format!("epoch {}", r.epoch), &v);
    }
    row(label, last);
    s
}

/// No NaN or Inf in any epoch's losses, and (training from scratch) the last epoch's training
/// loss at most half the first; a fine-tune starts low and is judged against its start instead.
fn judge_losses(t: &Trainer, report: &mut Report, fine_tune: bool) {
    let h = &t.state().history;
    let (first, last) = (
        h.first().map(|r| r.train_loss).unwrap_or(f64::NAN),
        h.last().map(|r| r.train_loss).unwrap_or(f64::NAN),
    );
    // Without a validation batch (a one-pair split) there is no validation loss to be finite.
    let validates = t.validates();
    report.check(
        "finite",
        h.iter()
            .all(|r| r.train_loss.is_finite() && (!validates || r.val_loss.is_finite())),
        if validates {
            "no NaN or Inf in any epoch's losses"
        } else {
            "no NaN or Inf in any epoch's training loss (no validation loss: the split is too small)"
        },
    );
    report.metric("first_epoch_loss", first);
    report.metric("last_epoch_loss", last);
    if fine_tune {
        return;
    }
    // The affinity term is a cross-entropy against the teacher's soft targets: it never falls
    // below the teacher's own entropy (about ln 13 with 13 copies of each caption in a batch),
    // so halving it can be impossible; falling at all is the check there.
    let floored = t.teacher().is_some() && t.cfg().distill.affinity > 0.0;
    let (threshold, rule) = if floored {
        (
            first,
            "below the first: the affinity term cannot fall below the teacher's own entropy",
        )
    } else {
        (0.5 * first, "half the first")
    };
    report.metric("loss_threshold", threshold);
    let fell = if floored { last < threshold } else { last <= threshold };
    report.check(
        "loss fell",
        fell,
        format!(
            "mean training loss {first:.4} (epoch 1) → {last:.4} (epoch {}), needs {} {threshold:.4} ({rule}){}",
            h.len(),
            if floored { "<" } else { "≤" },
            if fell {
                ""
            } else {
                " — try more epochs, higher learning rates (--lr-head, --lr-image, --lr-text), or check stage 3"
            }
        ),
    );
}

/// The config of the run `--resume` names, verified against its manifest. A folder stopped
/// before it wrote its config holds nothing to resume, and says how to start it again.
fn resumed_config(run: &Path) -> Result<clip_core::ClipConfig> {
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

/// The command line that resumes this run: the same program, data and device options.
fn resume_command(args: &Args, out: &Path) -> String {
    let exe = std::env::args().next().unwrap_or_else(|| "stage4-train".into());
    let mut parts = vec![exe, "--resume".into(), out.display().to_string()];
    if let Some(d) = &args.data.data {
        parts.extend(["--data".into(), d.display().to_string()]);
    }
    if args.data.skip_bad {
        parts.push("--skip-bad".into());
    }
    if args.model.device != "auto" {
        parts.extend(["--device".into(), args.model.device.clone()]);
    }
    if let Some(d) = &args.feature_cache {
        parts.extend(["--feature-cache".into(), d.display().to_string()]);
    }
    if args.no_feature_cache {
        parts.push("--no-feature-cache".into());
    }
    if let Some(j) = &args.model.json {
        parts.extend(["--json".into(), j.display().to_string()]);
    }
    parts.iter().map(|p| shell_quote(p)).collect::<Vec<_>>().join(" ")
}

/// A word as a POSIX shell reads it back.
fn shell_quote(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=:@%+,".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
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

/// loss.png, lr.png and quality.png: the history so far, one point per epoch.
fn plot_curves(t: &Trainer) -> Result<()> {
    let tr = &t.cfg().train;
    plot::Curves::new(&t.state().history, tr.freeze_image, tr.freeze_text)
        .with_start(t.state().start.as_ref())
        .write_png(t.out())
}
