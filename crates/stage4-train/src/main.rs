//! Stage 4 — train: does the loss keep falling over many epochs?
//!
//! Trains on the training split, validates after each epoch, keeps the best model by validation
//! loss in a run folder, and checks at the end that it learned: no NaN/Inf at any step, the last
//! epoch's loss well below the first, and — on a small dataset such as the demo — every image's
//! own caption ranked first and every caption's own image ranked first.

mod judge;
mod ranks;
mod setup;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use clip_cli::html_report::{self, Fixed, Thumbnails};
use clip_cli::plot;
use clip_cli::DataArgs;
use clip_cli::Report;
use clip_core::fit::{Stopped, Trainer, Validation};
use clip_core::params::Group;
use clip_core::train::NonFinite;

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
    let mut ranks = ranks::Ranks::join()?;
    run_as(args, &mut ranks).map_err(|e| ranks.fail(e))
}

/// Stage 4 on this rank (the only one, or one of several: see [`ranks`]).
fn run_as(args: Args, ranks: &mut ranks::Ranks) -> Result<ExitCode> {
    let mut report = Report::new(4, "train");
    let json = args.model.json.as_deref();
    println!("stage 4 — train: does the loss keep falling over many epochs?\n");
    ranks::check_args(ranks, args.out.as_deref(), args.resume.as_deref())?;
    let s = setup::setup(&args)?;
    report.metric("precision", s.cfg.train.precision.name());
    report.metric("world_size", ranks.size());
    let mut t = setup::open_ranks(&args, &s, ranks)?;
    let footprints = match s.teacher {
        Some(tc) => Some(setup::teach(&args, &mut t, tc)?),
        None => None,
    };
    // Rank 0 draws and reports; the others only train.
    let mut fixed = match ranks.leads() {
        true => Some(setup::before_training(&args, &mut t)?),
        false => {
            setup::follow(&args, &mut t)?;
            None
        }
    };
    let mut thumbs = Thumbnails::default();
    match train_loop(&mut t, &args, ranks, fixed.as_ref(), &mut thumbs, &mut report)? {
        Ended::Stopped(code) => return Ok(code),
        Ended::NotFinite if ranks.leads() => return report.finish(json),
        Ended::NotFinite => return Ok(ExitCode::from(1)),
        Ended::Trained => {}
    }
    let Some(fixed) = fixed.as_mut() else {
        return Ok(ExitCode::SUCCESS);
    };
    judge::judge(
        &mut t,
        fixed,
        &mut thumbs,
        &mut report,
        s.alphas.as_deref(),
        footprints.as_ref(),
    )?;
    report.finish(json)
}

/// How the training loop ended.
enum Ended {
    /// Every epoch trained.
    Trained,
    /// Stopped by Ctrl-C / SIGTERM, with the stage's exit code.
    Stopped(ExitCode),
    /// A NaN or infinite loss or gradient norm (in the report's "finite" check).
    NotFinite,
}

/// The loop: train an epoch, validate, schedule, checkpoint.
fn train_loop(
    t: &mut Trainer,
    args: &Args,
    ranks: &ranks::Ranks,
    fixed: Option<&Fixed>,
    thumbs: &mut Thumbnails,
    report: &mut Report,
) -> Result<Ended> {
    let (first_step, mut training) = (t.opt().step, 0.0);
    while t.state().epoch < t.cfg().train.epochs {
        let lr = t.lr(Group::Heads);
        let started = Instant::now();
        let trained = train_epoch(t, lr);
        training += started.elapsed().as_secs_f64();
        let (train_loss, pps) = match trained {
            Ok(v) => v,
            Err(e) if e.is::<Stopped>() => return stopped(t, args, ranks, e).map(Ended::Stopped),
            // A NaN loss or gradient norm: every rank meets it at the same step.
            Err(e) if e.is::<NonFinite>() || ranks.size() == 1 => {
                report.check("finite", false, format!("{e:#}"));
                return Ok(Ended::NotFinite);
            }
            // Anything else may have happened on this rank alone: the job ends.
            Err(e) => return Err(e),
        };
        end_epoch(t, (train_loss, pps), lr, started, fixed, thumbs)?;
    }
    if ranks.leads() {
        ranks.describe_traffic(t.opt().step - first_step, training, report);
    }
    Ok(Ended::Trained)
}

/// After an epoch's steps: validate, keep the best model, plot the curves, write the report
/// (cheap: curves and the before matrix, no embedding; the rankings come at the end), and one line.
/// Every rank validates (the plateau schedule needs the loss on each); only rank 0 (`fixed`)
/// draws and writes.
fn end_epoch(
    t: &mut Trainer,
    (train_loss, pps): (f64, f64),
    lr: f64,
    started: Instant,
    fixed: Option<&Fixed>,
    thumbs: &mut Thumbnails,
) -> Result<()> {
    let v = t.validate()?;
    let secs = started.elapsed().as_secs_f64();
    let best = t.end_epoch(train_loss, &v, secs, pps)?;
    let Some(fixed) = fixed else {
        return Ok(());
    };
    plot_curves(t)?;
    html_report::write(t, fixed, None, thumbs)?;
    print_epoch(t, train_loss, &v, lr, pps, secs, best);
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
/// Every rank stops after the same step; rank 0 saves.
fn stopped(t: &Trainer, args: &Args, ranks: &ranks::Ranks, why: anyhow::Error) -> Result<ExitCode> {
    let dir = t.save_checkpoint()?;
    let launcher = ranks.launcher_prefix().map(|p| p + " ").unwrap_or_default();
    println!(
        "{why:#}: checkpoint saved in {}\nresume with:\n  {launcher}{}",
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
    // Big models on CPUs train a few pairs per second: a decimal then.
    let rate = |x: f64| if x < 10.0 { format!("{x:.1}") } else { format!("{x:.0}") };
    let speed = match t.world() {
        Some(w) => format!("{} pairs/s ({} per rank)", rate(pps), rate(pps / w.size() as f64)),
        None => format!("{} pairs/s", rate(pps)),
    };
    println!("epoch {epoch:>3}: train {train_loss:.4}  val {val}  {quality}  lr {lr:.2e}  {speed}  {secs:.1}s{flag}");
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
    parts
        .iter()
        .map(|p| clip_cli::args::shell_quoted(p))
        .collect::<Vec<_>>()
        .join(" ")
}

/// loss.png, lr.png and quality.png: the history so far, one point per epoch.
fn plot_curves(t: &Trainer) -> Result<()> {
    let tr = &t.cfg().train;
    plot::Curves::new(&t.state().history, tr.freeze_image, tr.freeze_text)
        .with_start(t.state().start.as_ref())
        .write_png(t.out())
}
