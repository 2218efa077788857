//! Stage 3 — step: does one training step work?
//!
//! One batch, one forward pass, one backward pass, one AdamW step. Then the checks that catch the
//! bugs a loss curve hides: a loss far from its value at chance, a variable whose gradient is
//! missing (a layer with no backward cuts the graph silently), a parameter the optimiser did not
//! move, a frozen one it did, BatchNorm statistics that never update in a trainable image tower
//! (or that move in a frozen one, which must run in evaluation mode).

mod micro;

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use clip_cli::DataArgs;
use clip_cli::Report;
use clip_core::config::LossKind;
use clip_core::data::Batch;
use clip_core::model::Embeddings;
use clip_core::optim::AdamW;
use clip_core::prepare::{prepare, Prepared};
use clip_core::train::{clip_gradients, step_seed, train_step_objective, Contrastive, Objective, Pairs, StepOutcome};
use clip_core::{device, ClipConfig, ClipModel};

#[derive(Parser)]
#[command(
    about = "Stage 3 — one training step: loss at chance, a gradient for every trainable tensor, an update for each."
)]
struct Args {
    #[command(flatten)]
    model: clip_cli::ModelArgs,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    precision: clip_cli::PrecisionArg,
    /// Pairs in the batch (default: the config's train.batch_size).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Keep a tower fixed (image, text or both): it runs in evaluation mode and gets no gradient.
    #[arg(long, value_name = "TOWER", value_parser = ["image", "text", "both"])]
    freeze: Option<String>,
    /// Lock the image tower but its last --unlocked-layers blocks (as stage 4's --lock-image).
    #[arg(long)]
    lock_image: bool,
    /// Lock the text tower but its last --unlocked-layers blocks.
    #[arg(long)]
    lock_text: bool,
    /// Blocks at the top of a locked tower that still train.
    #[arg(long, value_name = "N")]
    unlocked_layers: Option<usize>,
    /// Run the batch through the towers M pairs at a time with the gradient cache, as stage 4's
    /// --micro-batch does: the check then covers the cached step (M must divide the batch size).
    #[arg(long, value_name = "M")]
    micro_batch: Option<usize>,
    /// Deliberately detach a tower's output (image or text) to see the gradient check catch it.
    #[arg(long, value_name = "TOWER", value_parser = ["image", "text"])]
    cut_gradient: Option<String>,
}

fn main() -> ExitCode {
    clip_cli::run_stage(|| run(Args::parse()))
}

fn run(args: Args) -> Result<ExitCode> {
    let mut report = Report::new(3, "step");
    let json = args.model.json.as_deref();
    println!("stage 3 — step: does one training step work?\n");
    let mut cfg = config(&args)?;
    let dev = args.model.device()?;
    // Before the data and the model: a refused bf16 fails at once, and the step runs in it.
    let precision = args.precision.apply(&mut cfg, &dev)?;
    println!(
        "config {} (loss {}), device {}, precision {precision}",
        cfg.name,
        cfg.loss,
        device::describe(&dev)
    );
    report.metric("precision", precision.name());
    report.info("precision", clip_cli::args::describe_precision(precision));
    let data = prepare(&cfg, &args.data.source(), &dev, &clip_core::progress::Silent)?;
    let (model, _) = clip_core::pretrained::build(&cfg, &dev)?;
    let mut opt = AdamW::new(&model.params, &cfg.train)?;
    let Some(batch) = first_batch(&cfg, &data, &mut report)? else {
        return report.finish(json);
    };
    let chance = chance_loss(&model, &batch)?;
    if cfg.train.micro_batch > 0 {
        report.info(
            "gradient cache",
            format!(
                "the batch runs through the towers {} pairs at a time: embedded without a graph, the whole batch's loss, then each micro-batch again with its graph",
                cfg.train.micro_batch
            ),
        );
    }

    // With --micro-batch: the cached gradient against the whole batch's, at the same weights.
    let cut = args.cut_gradient.as_deref();
    if cut.is_none() {
        micro::check(&model, &opt, &batch, &mut report)?;
    }

    // The step, as the tutorial writes it: forward, loss, loss.backward(), optimizer.step().
    let before = snapshot(&model)?;
    let t = Instant::now();
    let outcome = match step(&model, &mut opt, &batch, cut) {
        Ok(o) => o,
        Err(e) => {
            report.check("step", false, format!("{e:#}"));
            return report.finish(json);
        }
    };
    check_loss(&cfg, &outcome, chance, t.elapsed().as_secs_f64() * 1e3, &mut report);
    let missing = check_gradients(&model, &mut opt, &batch, cut, &outcome, &mut report)?;
    check_updates(&model, &before, &missing, &mut report)?;
    report.finish(json)
}

/// The config with this stage's flags applied (batch size, frozen towers).
fn config(args: &Args) -> Result<ClipConfig> {
    let mut cfg = args.model.load_config()?;
    if let Some(b) = args.batch_size {
        cfg.train.batch_size = b;
    }
    if let Some(towers) = &args.freeze {
        cfg.train.freeze(towers)?;
    }
    cfg.train.lock_image |= args.lock_image;
    cfg.train.lock_text |= args.lock_text;
    if let Some(n) = args.unlocked_layers {
        cfg.train.unlocked_layers = n;
    }
    if let Some(m) = args.micro_batch {
        cfg.train.micro_batch = m;
    }
    cfg.validate()?;
    Ok(cfg)
}

/// One batch: the first training pairs (at least 2, for a contrastive loss).
fn first_batch(cfg: &ClipConfig, data: &Prepared, report: &mut Report) -> Result<Option<Batch>> {
    let n = cfg.train.batch_size.min(data.split.train.len());
    if n < 2 {
        report.check(
            "batch",
            false,
            format!("only {n} training pair(s): a contrastive step needs at least 2"),
        );
        return Ok(None);
    }
    let batch = data.loader.batch(&data.split.train[..n])?;
    report.check(
        "batch",
        true,
        format!(
            "{n} pairs, images {:?}, tokens {:?}",
            batch.images.dims(),
            batch.input_ids.dims()
        ),
    );
    Ok(Some(batch))
}

/// The loss an untrained model should have: ln B for the clip loss (uniform over B captions);
/// for the soft loss, the same loss with the pairs shuffled (what no learning looks like).
fn chance_loss(model: &ClipModel, batch: &Batch) -> Result<f64> {
    Ok(match model.config.loss {
        LossKind::Clip => clip_core::loss::clip_chance(&batch.positives)?,
        LossKind::Soft => {
            let e = model.forward(&batch.images, &batch.input_ids, &batch.attention_mask, false)?;
            let n = batch.pairs.len() as u32;
            let perm: Vec<u32> = (0..n).map(|i| (i + 1) % n).collect();
            let idx = Tensor::new(perm.as_slice(), e.text.device())?;
            let shuffled = Embeddings {
                image: e.image.clone(),
                text: e.text.index_select(&idx, 0)?,
            };
            model.loss(&shuffled, None)?.to_scalar::<f32>()? as f64
        }
    })
}

/// The model's own training forward pass, with the tower named by `cut` (--cut-gradient)
/// detached before its projection head: a deliberate bug, to see the gradient check catch it.
fn forward(model: &ClipModel, b: &Batch, cut: Option<&str>) -> Result<Embeddings> {
    let mut image = model.image_features(&b.images, true)?;
    let mut text = model.text_features(&b.input_ids, &b.attention_mask, true)?;
    match cut {
        Some("image") => image = image.detach(),
        Some("text") => text = text.detach(),
        _ => {}
    }
    Ok(Embeddings {
        image: model.project_image(&image, true)?,
        text: model.project_text(&text, true)?,
    })
}

/// One training step, as the tutorial writes it: forward (training mode), loss,
/// `loss.backward()`, gradient clipping when the config asks for it, `optimizer.step()` — on the
/// compute threads, as stage 4 runs it.
fn step(model: &ClipModel, opt: &mut AdamW, batch: &Batch, cut: Option<&str>) -> Result<StepOutcome> {
    let t = &model.config.train;
    if t.micro_batch > 0 && t.micro_batch < batch.pairs.len() {
        // The gradient cache: the same loss and gradient, the towers seeing M pairs at a time.
        return train_step_objective(
            model,
            opt,
            std::slice::from_ref(batch),
            t.clip_grad_norm,
            t.micro_batch,
            &Cut(cut),
        );
    }
    clip_core::nn::on_compute_pool(|| {
        model.reseed_dropout(step_seed(model.config.seed, opt.step));
        let e = forward(model, batch, cut)?;
        let loss = model.loss(&e, Some(&batch.positives))?;
        let value = loss.to_scalar::<f32>()? as f64;
        if !value.is_finite() {
            anyhow::bail!(
                "the loss is {value} at step {}: check the loss, the temperature and the inputs",
                opt.step + 1
            );
        }
        let mut grads = opt.grads_by_name(&loss.backward()?); // loss.backward()
        let clipped = clip_gradients(&mut grads, model.config.train.clip_grad_norm, opt.step + 1)?;
        let norm = opt.step(&grads)?; // optimizer.step()
        let grad_norm = clipped.unwrap_or(norm);
        Ok(StepOutcome {
            loss: value,
            grad_norm,
            grads,
        })
    })
}

/// The model's contrastive loss over [`forward`]'s embeddings, in the two halves the gradient
/// cache needs.
struct Cut<'a>(Option<&'a str>);

impl Objective for Cut<'_> {
    fn embed(&self, model: &ClipModel, b: &Batch) -> Result<Vec<Tensor>> {
        let e = forward(model, b, self.0)?;
        Ok(vec![e.image, e.text])
    }

    fn loss(&self, model: &ClipModel, e: &[Tensor], b: Pairs<'_>) -> Result<Tensor> {
        Contrastive.loss(model, e, b)
    }
}

/// The step's loss against its value at chance, and its time (information, not a check: no
/// threshold fits every machine and model size).
fn check_loss(cfg: &ClipConfig, outcome: &StepOutcome, chance: f64, ms: f64, report: &mut Report) {
    report.metric("step_ms", ms);
    report.metric("loss", outcome.loss);
    report.metric("chance_loss", chance);
    report.metric("grad_norm", outcome.grad_norm);
    let near = (outcome.loss - chance).abs() <= 0.5 * chance.max(0.1);
    report.check(
        "loss",
        outcome.loss.is_finite() && near,
        format!(
            "{} loss {:.4}; at chance {:.4} ({}){}",
            cfg.loss,
            outcome.loss,
            chance,
            if cfg.loss == LossKind::Clip {
                "uniform over the batch: ln B, less where pairs share an image or caption"
            } else {
                "same embeddings, pairs shuffled"
            },
            if near {
                ""
            } else {
                " — far from chance for an untrained model: check the loss, the temperature and the inputs"
            }
        ),
    );
    report.info(
        "step time",
        format!(
            "{ms:.0} ms for forward + backward + update, gradient norm {:.3}",
            outcome.grad_norm
        ),
    );
}

/// Every trainable variable got a finite, non-zero gradient. Returns the names of those that
/// got none (they are not expected to move).
fn check_gradients(
    model: &ClipModel,
    opt: &mut AdamW,
    batch: &Batch,
    cut: Option<&str>,
    outcome: &StepOutcome,
    report: &mut Report,
) -> Result<Vec<String>> {
    let names: Vec<String> = opt.names().map(String::from).collect();
    let mut coverage = gradient_coverage(&names, &outcome.grads)?;
    // A ResNet whose residual blocks start as the identity (timm's zero_init_last: the last
    // BatchNorm γ of each block is 0) gives the blocks' other weights exactly zero gradient on the
    // first step, as PyTorch does; step 1 moves γ off zero, so step 2 must reach them.
    let second_step = model.config.image.zero_init_last && coverage.iter().any(|(_, _, nz)| !nz);
    if second_step {
        let again = step(model, opt, batch, cut)?;
        for (c, (_, finite, nonzero)) in coverage.iter_mut().zip(gradient_coverage(&names, &again.grads)?) {
            c.1 &= finite;
            c.2 |= nonzero;
        }
    }
    let pick = |f: fn(&(String, bool, bool)) -> bool| -> Vec<&str> {
        coverage.iter().filter(|c| f(c)).map(|(n, _, _)| n.as_str()).collect()
    };
    let (missing, not_finite) = (pick(|c| !c.2), pick(|c| !c.1));
    report.metric("no_gradient", &missing);
    let ok = missing.is_empty() && not_finite.is_empty();
    report.check(
        "gradients",
        ok,
        if ok {
            format!(
                "all {} trainable tensors got a finite, non-zero gradient{}",
                names.len(),
                if second_step {
                    " (over 2 steps: the residual blocks start as the identity, zero_init_last, so their weights get their first gradient on step 2)"
                } else {
                    ""
                }
            )
        } else {
            format!(
                "{} of {} trainable tensors got no gradient{}{}: something between them and the loss cuts the graph (a detached tensor, or an op with no backward such as candle's fused layer_norm / softmax_last_dim)",
                missing.len() + not_finite.len(),
                names.len(),
                list(": ", &missing),
                list("; not finite: ", &not_finite),
            )
        },
    );
    Ok(missing.into_iter().map(String::from).collect())
}

/// Parameters moved; frozen ones and never-trained ones did not; BatchNorm statistics did in a
/// trainable image tower, and did not in a frozen one (it runs in evaluation mode).
fn check_updates(
    model: &ClipModel,
    before: &HashMap<String, Tensor>,
    missing: &[String],
    report: &mut Report,
) -> Result<()> {
    let after = snapshot(model)?;
    let (mut unchanged, mut frozen_moved, mut frozen) = (vec![], vec![], 0);
    let (mut stats_moved, mut stats_total) = (0, 0);
    for (name, e) in model.params.entries() {
        let moved = changed(&before[&name], &after[&name])?;
        frozen += (e.is_param() && !e.is_trainable()) as usize;
        if e.is_trainable() && !moved && !missing.contains(&name) {
            unchanged.push(name);
        } else if e.is_param() && !e.is_trainable() && moved {
            frozen_moved.push(name);
        } else if let Some(bn) = name.strip_suffix("running_mean") {
            // A BatchNorm of a locked block (--lock-image) keeps its statistics, like a frozen one.
            let trainable = model
                .params
                .get(&format!("{bn}weight"))
                .is_some_and(|w| w.is_trainable());
            if trainable || model.config.train.freeze_image {
                stats_total += 1;
                stats_moved += moved as usize;
            } else if moved {
                frozen_moved.push(name);
            }
        }
    }
    report.check(
        "updates",
        unchanged.is_empty(),
        if unchanged.is_empty() {
            "every trainable tensor with a gradient changed".into()
        } else {
            format!(
                "{} tensors did not change{}: is their learning rate 0?",
                unchanged.len(),
                list(": ", &as_strs(&unchanged))
            )
        },
    );
    report.check(
        "frozen",
        frozen_moved.is_empty(),
        if frozen == 0 {
            "no frozen tensors in this config".into()
        } else if frozen_moved.is_empty() {
            format!("all {frozen} frozen tensors unchanged")
        } else {
            format!("frozen tensors changed{}", list(": ", &as_strs(&frozen_moved)))
        },
    );
    check_batch_norm(model.config.train.freeze_image, stats_moved, stats_total, report);
    Ok(())
}

/// BatchNorm running statistics: updated by a trainable image tower, kept by a frozen one.
fn check_batch_norm(frozen_image: bool, moved: usize, total: usize, report: &mut Report) {
    let (ok, detail) = if frozen_image {
        (
            moved == 0,
            if moved == 0 {
                format!("all {total} BatchNorm layers of the frozen image tower kept their running statistics (it runs in evaluation mode)")
            } else {
                format!("{moved} of {total} BatchNorm layers of the frozen image tower changed their running statistics — a frozen tower must run in evaluation mode")
            },
        )
    } else {
        (
            moved == total,
            format!(
                "{moved} of {total} BatchNorm layers of the trainable image tower updated their running statistics{}",
                if moved == total {
                    ""
                } else {
                    " — is training mode reaching the image tower?"
                }
            ),
        )
    };
    report.check("batch norm", ok, detail);
}

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn list(prefix: &str, names: &[&str]) -> String {
    if names.is_empty() {
        return String::new();
    }
    format!("{prefix}{}", clip_core::listing::first_n(names, 12, ", "))
}

/// Per-variable gradient health: (name, finite, non-zero). A missing gradient counts as zero.
fn gradient_coverage(names: &[String], grads: &HashMap<String, Tensor>) -> Result<Vec<(String, bool, bool)>> {
    let mut out = vec![];
    for n in names {
        match grads.get(n) {
            None => out.push((n.clone(), true, false)),
            Some(g) => {
                let v = g.flatten_all()?.to_vec1::<f32>()?;
                let finite = v.iter().all(|x| x.is_finite());
                let nonzero = v.iter().any(|x| *x != 0.0);
                out.push((n.clone(), finite, nonzero));
            }
        }
    }
    Ok(out)
}

/// Copies every tensor of the model to the CPU, by name (to compare before and after a step).
fn snapshot(model: &ClipModel) -> Result<HashMap<String, Tensor>> {
    model
        .params
        .entries()
        .into_iter()
        .map(|(n, e)| Ok((n, e.var.as_tensor().detach().to_device(&Device::Cpu)?.copy()?)))
        .collect()
}

/// Whether two snapshots of a tensor differ anywhere.
fn changed(a: &Tensor, b: &Tensor) -> Result<bool> {
    Ok(a.ne(b)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()? > 0.0)
}
