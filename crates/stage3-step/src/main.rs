//! Stage 3 — step: does one training step work?
//!
//! One batch, one forward pass, one backward pass, one AdamW step. Then the checks that catch the
//! bugs a loss curve hides: a loss far from its value at chance, a variable whose gradient is
//! missing (a layer with no backward cuts the graph silently), a parameter the optimiser did not
//! move, a frozen one it did, BatchNorm statistics that never update in a trainable image tower
//! (or that move in a frozen one, which must run in evaluation mode).

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use clip_cli::DataArgs;
use clip_cli::Report;
use clip_core::config::LossKind;
use clip_core::model::Embeddings;
use clip_core::optim::AdamW;
use clip_core::prepare::prepare;
use clip_core::train::train_step_with;
use clip_core::{device, ClipModel};

#[derive(Parser)]
#[command(
    about = "Stage 3 — one training step: loss at chance, a gradient for every trainable tensor, an update for each."
)]
struct Args {
    #[command(flatten)]
    model: clip_cli::ModelArgs,
    #[command(flatten)]
    data: DataArgs,
    /// Pairs in the batch (default: the config's train.batch_size).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Keep a tower fixed (image, text or both): it runs in evaluation mode and gets no gradient.
    #[arg(long, value_name = "TOWER", value_parser = ["image", "text", "both"])]
    freeze: Option<String>,
    /// Deliberately detach a tower's output (image or text) to see the gradient check catch it.
    #[arg(long, value_name = "TOWER", value_parser = ["image", "text"])]
    cut_gradient: Option<String>,
}

fn main() -> ExitCode {
    clip_cli::run_stage(|| run(Args::parse()))
}

fn run(args: Args) -> Result<ExitCode> {
    let mut report = Report::new(3, "step");
    println!("stage 3 — step: does one training step work?\n");
    let mut cfg = args.model.load_config()?;
    if let Some(b) = args.batch_size {
        cfg.train.batch_size = b;
    }
    if let Some(towers) = &args.freeze {
        cfg.train.freeze(towers)?;
    }
    cfg.validate()?;
    let dev = args.model.device()?;
    println!(
        "config {} (loss {}), device {}",
        cfg.name,
        cfg.loss,
        device::describe(&dev)
    );
    let data = prepare(&cfg, &args.data.source(), &dev, &clip_core::progress::Silent)?;
    let model = ClipModel::new(&cfg, &dev)?;
    let mut opt = AdamW::new(&model.params, &cfg.train)?;

    // One batch: the first training pairs.
    let n = cfg.train.batch_size.min(data.split.train.len());
    if n < 2 {
        report.check(
            "batch",
            false,
            format!("only {n} training pair(s): a contrastive step needs at least 2"),
        );
        return report.finish(args.model.json.as_deref());
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

    // The loss an untrained model should have: ln B for the clip loss (uniform over B captions);
    // for the soft loss, the same loss with the pairs shuffled (what no learning looks like).
    let e = model.forward(&batch.images, &batch.input_ids, &batch.attention_mask, false)?;
    let chance = match cfg.loss {
        LossKind::Clip => clip_core::loss::clip_chance(&batch.positives)?,
        LossKind::Soft => {
            let perm: Vec<u32> = (0..n as u32).map(|i| (i + 1) % n as u32).collect();
            let idx = candle_core::Tensor::new(perm.as_slice(), &dev)?;
            let shuffled = Embeddings {
                image: e.image.clone(),
                text: e.text.index_select(&idx, 0)?,
            };
            model.loss(&shuffled, None)?.to_scalar::<f32>()? as f64
        }
    };

    let before = snapshot(&model)?;
    let t = Instant::now();
    // The model's own training forward pass, with the tower named by --cut-gradient detached
    // before its projection head: a deliberate bug, to see the gradient check catch it.
    let cut = args.cut_gradient.as_deref();
    let forward = |m: &ClipModel, b: &clip_core::data::Batch| -> Result<Embeddings> {
        let mut image = m.image_features(&b.images, true)?;
        let mut text = m.text_features(&b.input_ids, &b.attention_mask, true)?;
        match cut {
            Some("image") => image = image.detach(),
            Some("text") => text = text.detach(),
            _ => {}
        }
        Ok(Embeddings {
            image: m.project_image(&image, true)?,
            text: m.project_text(&text, true)?,
        })
    };
    let batches = std::slice::from_ref(&batch);
    let outcome = match train_step_with(&model, &mut opt, batches, cfg.train.clip_grad_norm, forward) {
        Ok(o) => o,
        Err(e) => {
            report.check("step", false, format!("{e:#}"));
            return report.finish(args.model.json.as_deref());
        }
    };
    let ms = t.elapsed().as_secs_f64() * 1e3;
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
                String::new()
            } else {
                " — far from chance for an untrained model: check the loss, the temperature and the inputs".into()
            }
        ),
    );
    report.check(
        "step time",
        true,
        format!(
            "{ms:.0} ms for forward + backward + update, gradient norm {:.3}",
            outcome.grad_norm
        ),
    );

    // Every trainable variable got a finite, non-zero gradient.
    let names: Vec<String> = opt.names().map(String::from).collect();
    let coverage = gradient_coverage(&names, &outcome.grads)?;
    let missing: Vec<&str> = coverage
        .iter()
        .filter(|(_, _, nz)| !nz)
        .map(|(n, _, _)| n.as_str())
        .collect();
    let not_finite: Vec<&str> = coverage
        .iter()
        .filter(|(_, f, _)| !f)
        .map(|(n, _, _)| n.as_str())
        .collect();
    report.metric("no_gradient", &missing);
    report.check(
        "gradients",
        missing.is_empty() && not_finite.is_empty(),
        if missing.is_empty() && not_finite.is_empty() {
            format!("all {} trainable tensors got a finite, non-zero gradient", names.len())
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

    // Parameters moved; frozen ones and never-trained ones did not; BatchNorm statistics did in a
    // trainable image tower, and did not in a frozen one (it runs in evaluation mode).
    let after = snapshot(&model)?;
    let mut unchanged = vec![];
    let mut frozen_moved = vec![];
    let mut stats_moved = 0;
    let mut stats_total = 0;
    for (name, e) in model.params.entries() {
        let moved = changed(&before[&name], &after[&name])?;
        if e.is_trainable() && !moved && !missing.contains(&name.as_str()) {
            unchanged.push(name);
        } else if e.is_param() && !e.is_trainable() && moved {
            frozen_moved.push(name);
        } else if !e.is_param() && name.ends_with("running_mean") {
            stats_total += 1;
            stats_moved += moved as usize;
        }
    }
    let unchanged_ref: Vec<&str> = unchanged.iter().map(String::as_str).collect();
    report.check(
        "updates",
        unchanged.is_empty(),
        if unchanged.is_empty() {
            "every trainable tensor with a gradient changed".into()
        } else {
            format!(
                "{} tensors did not change{}: is their learning rate 0?",
                unchanged.len(),
                list(": ", &unchanged_ref)
            )
        },
    );
    let frozen: usize = model
        .params
        .entries()
        .iter()
        .filter(|(_, e)| e.is_param() && !e.is_trainable())
        .count();
    let frozen_ref: Vec<&str> = frozen_moved.iter().map(String::as_str).collect();
    report.check(
        "frozen",
        frozen_moved.is_empty(),
        if frozen == 0 {
            "no frozen tensors in this config".into()
        } else if frozen_moved.is_empty() {
            format!("all {frozen} frozen tensors unchanged")
        } else {
            format!("frozen tensors changed{}", list(": ", &frozen_ref))
        },
    );
    let (bn_ok, bn_detail) = if cfg.train.freeze_image {
        (
            stats_moved == 0,
            if stats_moved == 0 {
                format!("all {stats_total} BatchNorm layers of the frozen image tower kept their running statistics (it runs in evaluation mode)")
            } else {
                format!("{stats_moved} of {stats_total} BatchNorm layers of the frozen image tower changed their running statistics — a frozen tower must run in evaluation mode")
            },
        )
    } else {
        (
            stats_moved == stats_total,
            format!(
                "{stats_moved} of {stats_total} BatchNorm layers of the trainable image tower updated their running statistics{}",
                if stats_moved == stats_total {
                    ""
                } else {
                    " — is training mode reaching the image tower?"
                }
            ),
        )
    };
    report.check("batch norm", bn_ok, bn_detail);
    report.finish(args.model.json.as_deref())
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
