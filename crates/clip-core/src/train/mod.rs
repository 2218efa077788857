//! One training step: forward, backward, one optimiser update.

mod data_parallel;
mod grad_cache;

use std::collections::HashMap;

use anyhow::{bail, Result};

use crate::data::Batch;
use crate::model::{ClipModel, Embeddings};
use crate::optim::{AdamW, Grads};

pub use data_parallel::train_step_data_parallel;
pub use grad_cache::{grad_cache, train_step_objective, Contrastive, Objective, Pairs};

/// What one optimiser step did.
#[derive(Debug, Clone)]
pub struct StepOutcome {
    /// Mean loss over the micro-batches.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// The gradients that were applied (after clipping), by parameter name.
    pub grads: Grads,
}

/// The dropout seed of a step: a pure function of (seed, step) so a resumed run draws the same masks.
pub fn step_seed(seed: u64, step: u64) -> u64 {
    crate::rng::mix(seed, step)
}

/// Forward, backward and one AdamW update over one or more micro-batches (gradient accumulation).
///
/// Errors when the loss is NaN/Inf, before any weight is touched; and when the gradient norm is,
/// before the update with clipping on, after it without.
///
/// One step on a batch of the demo set, with the `tiny` model:
///
/// ```
/// use candle_core::Device;
/// use clip_core::optim::AdamW;
/// use clip_core::prepare::{prepare, DataSource};
/// use clip_core::train::train_step;
/// use clip_core::{ClipConfig, ClipModel};
///
/// let cfg = ClipConfig::tiny();
/// let data = prepare(&cfg, &DataSource::default(), &Device::Cpu, &clip_core::progress::Silent)?;
/// let model = ClipModel::new(&cfg, &Device::Cpu)?;
/// let mut opt = AdamW::new(&model.params, &cfg.train)?;
/// let batch = data.loader.batch(&data.split.train[..8])?;
/// let step = train_step(&model, &mut opt, std::slice::from_ref(&batch), 0.0)?;
/// // An untrained model scores about chance (ln 8 for 8 pairs), every trainable tensor got a
/// // gradient, and the optimiser took its first step.
/// assert!((step.loss - 8f64.ln()).abs() < 1.0, "{}", step.loss);
/// assert_eq!(step.grads.len(), opt.names().count());
/// assert!(step.grad_norm > 0.0 && opt.step == 1);
/// # Ok::<(), anyhow::Error>(())
/// ```
pub fn train_step(
    model: &ClipModel,
    opt: &mut AdamW,
    micro_batches: &[Batch],
    clip_grad_norm: f64,
) -> Result<StepOutcome> {
    train_step_with(model, opt, micro_batches, clip_grad_norm, |m, b| {
        m.forward_batch(b, true)
    })
}

/// [`train_step`] with another training-mode forward pass: stage 3 uses it to cut a tower from
/// the graph on purpose and show that the gradient check names what lost its gradient.
pub fn train_step_with(
    model: &ClipModel,
    opt: &mut AdamW,
    micro_batches: &[Batch],
    clip_grad_norm: f64,
    forward: impl Fn(&ClipModel, &Batch) -> Result<Embeddings> + Sync,
) -> Result<StepOutcome> {
    train_step_loss(model, opt, micro_batches, clip_grad_norm, |m, b| {
        m.loss(&forward(m, b)?, Some(&b.positives))
    })
}

/// [`train_step`] with another loss of a batch (distillation adds the teacher's terms).
pub fn train_step_loss(
    model: &ClipModel,
    opt: &mut AdamW,
    micro_batches: &[Batch],
    clip_grad_norm: f64,
    loss: impl Fn(&ClipModel, &Batch) -> Result<candle_core::Tensor> + Sync,
) -> Result<StepOutcome> {
    crate::nn::on_compute_pool(|| step_on_pool(model, opt, micro_batches, clip_grad_norm, &loss))
}

fn step_on_pool(
    model: &ClipModel,
    opt: &mut AdamW,
    micro_batches: &[Batch],
    clip_grad_norm: f64,
    batch_loss: impl Fn(&ClipModel, &Batch) -> Result<candle_core::Tensor>,
) -> Result<StepOutcome> {
    accumulate_and_update(model, opt, micro_batches, clip_grad_norm, |opt, b, _, k| {
        let loss = batch_loss(model, b)?;
        let value = loss.to_scalar::<f32>()? as f64;
        check_loss(value, opt.step)?;
        let loss = if k > 1.0 { (loss / k)? } else { loss };
        Ok((value, opt.grads_by_name(&loss.backward()?)))
    })
}

/// The frame of every step: reseeds dropout, sums the gradients `batch_grads(opt, batch, index,
/// batches)` gives for each batch (each already divided by the number of batches), applies them.
fn accumulate_and_update(
    model: &ClipModel,
    opt: &mut AdamW,
    batches: &[Batch],
    clip_grad_norm: f64,
    batch_grads: impl Fn(&AdamW, &Batch, usize, f64) -> Result<(f64, Grads)>,
) -> Result<StepOutcome> {
    if batches.is_empty() {
        bail!("train_step needs at least one batch");
    }
    model.reseed_dropout(step_seed(model.config.seed, opt.step));
    let k = batches.len() as f64;
    let mut total_loss = 0.0;
    let mut acc: Grads = HashMap::new();
    for (i, b) in batches.iter().enumerate() {
        let (value, grads) = batch_grads(opt, b, i, k)?;
        total_loss += value;
        add_grads(&mut acc, grads)?;
    }
    let grad_norm = apply_update(opt, &mut acc, clip_grad_norm)?;
    model.clamp_logit_scale()?;
    Ok(StepOutcome {
        loss: total_loss / k,
        grad_norm,
        grads: acc,
    })
}

/// Adds `grads` into `acc`, name by name.
fn add_grads(acc: &mut Grads, grads: Grads) -> Result<()> {
    for (name, g) in grads {
        match acc.remove(&name) {
            Some(prev) => acc.insert(name, (prev + g)?),
            None => acc.insert(name, g),
        };
    }
    Ok(())
}

/// An error when the loss of step `step` (0-based) is NaN or infinite, before any weight moves.
fn check_loss(value: f64, step: u64) -> Result<()> {
    if !value.is_finite() {
        return Err(NonFinite(format!(
            "the loss is {value} at step {}: lower the learning rates, or check stage 3",
            step + 1
        ))
        .into());
    }
    Ok(())
}

/// The error of a step whose loss or gradient norm is NaN or infinite. In a data-parallel run
/// both are computed from what every rank shares, so every rank meets it at the same step (an
/// error on one rank alone must end the job instead).
#[derive(Debug)]
pub struct NonFinite(pub String);

impl std::fmt::Display for NonFinite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NonFinite {}

/// The optimiser's half of a step: clips the gradients to `clip_grad_norm` (when it is > 0) and
/// applies them. Returns the gradient norm before clipping; errors when it is NaN/Inf (before
/// the update with clipping on, after it without).
pub fn apply_update(opt: &mut AdamW, grads: &mut Grads, clip_grad_norm: f64) -> Result<f64> {
    let clipped = clip_gradients(grads, clip_grad_norm, opt.step + 1)?;
    let norm = opt.step(grads)?;
    match clipped {
        Some(before) => Ok(before),
        None => {
            check_grad_norm(norm, opt.step)?;
            Ok(norm)
        }
    }
}

/// Scales `grads` down to a global norm of `max_norm` when they exceed it (`max_norm` > 0), and
/// returns their norm before clipping; an error when that norm is NaN/Inf (step `step`), before
/// anything is applied. `None` when clipping is off: the update measures the norm in its own pass.
pub fn clip_gradients(grads: &mut Grads, max_norm: f64, step: u64) -> Result<Option<f64>> {
    if max_norm <= 0.0 {
        return Ok(None);
    }
    let grad_norm = AdamW::grad_norm(grads)?;
    check_grad_norm(grad_norm, step)?;
    if grad_norm > max_norm {
        let s = max_norm / (grad_norm + 1e-6);
        for g in grads.values_mut() {
            *g = (&*g * s)?;
        }
    }
    Ok(Some(grad_norm))
}

fn check_grad_norm(grad_norm: f64, step: u64) -> Result<()> {
    if !grad_norm.is_finite() {
        return Err(NonFinite(format!(
            "the gradient norm is {grad_norm} at step {step}: lower the learning rates or set train.clip_grad_norm"
        ))
        .into());
    }
    Ok(())
}

/// Loss of a batch in evaluation mode (no dropout, BatchNorm running statistics).
pub fn eval_loss(model: &ClipModel, batch: &Batch) -> Result<f64> {
    crate::nn::no_grad(|| {
        let e = model.forward_batch(batch, false)?;
        Ok(model.loss(&e, Some(&batch.positives))?.to_scalar::<f32>()? as f64)
    })
}
