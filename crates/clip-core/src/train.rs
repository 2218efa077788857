//! One training step, and the checks stage 3 makes around it.

use std::collections::HashMap;

use anyhow::{bail, Result};
use candle_core::Tensor;

use crate::data::Batch;
use crate::model::ClipModel;
use crate::optim::{AdamW, Grads};

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
    // SplitMix64 finaliser: decorrelates consecutive steps.
    let mut z = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Forward, backward and one AdamW update over one or more micro-batches (gradient accumulation).
///
/// Errors when the loss is NaN/Inf, before any weight is touched; and when the gradient norm is,
/// before the update with clipping on, after it without.
pub fn train_step(
    model: &ClipModel,
    opt: &mut AdamW,
    micro_batches: &[Batch],
    clip_grad_norm: f64,
) -> Result<StepOutcome> {
    if micro_batches.is_empty() {
        bail!("train_step needs at least one batch");
    }
    model.reseed_dropout(step_seed(model.config.seed, opt.step));
    let k = micro_batches.len() as f64;
    let mut total_loss = 0.0;
    let mut acc: Grads = HashMap::new();
    for b in micro_batches {
        let e = model.forward(&b.images, &b.input_ids, &b.attention_mask, true)?;
        let loss = model.loss(&e, Some(&b.positives))?;
        let value = loss.to_scalar::<f32>()? as f64;
        if !value.is_finite() {
            bail!(
                "the loss is {value} at step {}: lower the learning rates, or check stage 3",
                opt.step + 1
            );
        }
        total_loss += value;
        let loss = if micro_batches.len() > 1 { (loss / k)? } else { loss };
        let grads = opt.grads_by_name(&loss.backward()?);
        for (name, g) in grads {
            match acc.remove(&name) {
                Some(prev) => acc.insert(name, (prev + g)?),
                None => acc.insert(name, g),
            };
        }
    }
    let grad_norm = if clip_grad_norm > 0.0 {
        let grad_norm = AdamW::grad_norm(&acc)?;
        check_grad_norm(grad_norm, opt.step + 1)?;
        if grad_norm > clip_grad_norm {
            let s = clip_grad_norm / (grad_norm + 1e-6);
            for g in acc.values_mut() {
                *g = (&*g * s)?;
            }
        }
        opt.step(&acc)?;
        grad_norm
    } else {
        // Without clipping the norm is only reported: the update computes it in its own pass.
        let grad_norm = opt.step(&acc)?;
        check_grad_norm(grad_norm, opt.step)?;
        grad_norm
    };
    Ok(StepOutcome {
        loss: total_loss / k,
        grad_norm,
        grads: acc,
    })
}

fn check_grad_norm(grad_norm: f64, step: u64) -> Result<()> {
    if !grad_norm.is_finite() {
        bail!("the gradient norm is {grad_norm} at step {step}: lower the learning rates or set train.clip_grad_norm");
    }
    Ok(())
}

/// Loss of a batch in evaluation mode (no dropout, BatchNorm running statistics).
pub fn eval_loss(model: &ClipModel, batch: &Batch) -> Result<f64> {
    let e = model.forward(&batch.images, &batch.input_ids, &batch.attention_mask, false)?;
    Ok(model.loss(&e, Some(&batch.positives))?.to_scalar::<f32>()? as f64)
}

/// Per-variable gradient health: (name, finite, non-zero). A missing gradient counts as zero.
pub fn gradient_coverage(names: &[String], grads: &Grads) -> Result<Vec<(String, bool, bool)>> {
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
pub fn snapshot(model: &ClipModel) -> Result<HashMap<String, Tensor>> {
    model
        .params
        .entries()
        .into_iter()
        .map(|(n, e)| {
            Ok((
                n,
                e.var
                    .as_tensor()
                    .detach()
                    .to_device(&candle_core::Device::Cpu)?
                    .copy()?,
            ))
        })
        .collect()
}

/// Whether two snapshots of a tensor differ anywhere.
pub fn changed(a: &Tensor, b: &Tensor) -> Result<bool> {
    Ok(a.ne(b)?
        .to_dtype(candle_core::DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?
        > 0.0)
}
