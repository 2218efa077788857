//! With `--micro-batch`: is the gradient cache's gradient the whole batch's?
//!
//! The cached step embeds the batch M pairs at a time, so it only helps when the whole batch
//! does not fit; the check therefore compares the two on the batch's first 2·M pairs (two
//! micro-batches), before the step, at the same weights. The two are equal in exact arithmetic
//! for towers without BatchNorm (which normalises each micro-batch by its own statistics) and
//! without dropout (the cached step draws its masks per micro-batch); for other models the check
//! says why it does not apply.

use anyhow::Result;
use clip_cli::Report;
use clip_core::config::{HeadKind, ImageArch};
use clip_core::data::Batch;
use clip_core::optim::{AdamW, Grads};
use clip_core::train::{grad_cache, step_seed, Contrastive};
use clip_core::{ClipConfig, ClipModel};

/// The most the cached gradient may differ from the whole batch's, relative to its norm
/// (rounding: the two sum in different orders).
const TOLERANCE: f64 = 1e-4;

/// Why the cached gradient is not the whole batch's for this model, if it is not.
fn not_exact(cfg: &ClipConfig) -> Option<&'static str> {
    if matches!(cfg.image.arch, ImageArch::Resnet | ImageArch::ClipResnet) && !cfg.train.freeze_image {
        return Some(
            "the image tower's BatchNorm normalises each micro-batch with its own statistics (as open_clip's)",
        );
    }
    let t = &cfg.text;
    let head_dropout = cfg.head == HeadKind::Mlp && cfg.head_dropout > 0.0;
    if t.dropout > 0.0 || t.attention_dropout > 0.0 || head_dropout {
        return Some("dropout draws its masks per micro-batch");
    }
    None
}

/// Compares the gradient cache's gradient with the whole batch's on the first 2·M pairs of
/// `batch`, and records the check (or why it does not apply).
pub fn check(model: &ClipModel, opt: &AdamW, batch: &Batch, report: &mut Report) -> Result<()> {
    let m = model.config.train.micro_batch;
    if m == 0 || m >= batch.pairs.len() {
        return Ok(());
    }
    if let Some(why) = not_exact(&model.config) {
        report.info(
            "gradient cache",
            format!("not compared with the whole batch's gradient: {why}"),
        );
        return Ok(());
    }
    let n = (2 * m).min(batch.pairs.len());
    let sub = batch.split(n)?.swap_remove(0);
    let seed = step_seed(model.config.seed, opt.step);
    let (_, cached) = clip_core::nn::on_compute_pool(|| grad_cache(model, opt, &sub, m, &Contrastive, seed, 1.0))?;
    let whole = clip_core::nn::on_compute_pool(|| -> Result<Grads> {
        let loss = model.loss(&model.forward_batch(&sub, true)?, Some(&sub.positives))?;
        Ok(opt.grads_by_name(&loss.backward()?))
    })?;
    let (diff, norm) = distance(&cached, &whole)?;
    let relative = diff / norm.max(1e-30);
    report.check(
        "gradient cache",
        relative <= TOLERANCE,
        format!(
            "on the first {n} pairs, in micro-batches of {m}: the cached gradient is the whole batch's within {relative:.1e} (relative; ≤ {TOLERANCE:.0e})"
        ),
    );
    Ok(())
}

/// (‖a − b‖, ‖b‖) over every tensor either has.
fn distance(a: &Grads, b: &Grads) -> Result<(f64, f64)> {
    let sq = |t: &candle_core::Tensor| -> Result<f64> {
        Ok(t.to_dtype(candle_core::DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?)
    };
    let (mut diff, mut norm) = (0.0, 0.0);
    for (name, g) in b {
        norm += sq(g)?;
        diff += match a.get(name) {
            Some(x) => sq(&(x - g)?)?,
            None => sq(g)?,
        };
    }
    for (name, x) in a {
        if !b.contains_key(name) {
            diff += sq(x)?;
        }
    }
    Ok((diff.sqrt(), norm.sqrt()))
}
