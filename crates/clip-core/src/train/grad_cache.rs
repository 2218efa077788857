//! Big batches in little memory: the gradient cache (Gao et al., 2021, "Scaling Deep
//! Contrastive Learning Batch Size under Memory Limited Setup"; open_clip PR #65).
//!
//! A contrastive loss couples every pair of a batch with every other, so its batch cannot simply
//! be cut in pieces and the gradients summed (that is gradient accumulation, a different loss:
//! each piece sees only its own negatives). But the loss depends on the towers' weights only
//! through the embeddings, which are small (B × 512 for B pairs). So a step of B pairs runs in
//! three passes, the towers seeing `M` pairs at a time:
//!
//! 1. every micro-batch is embedded without a graph (no activations kept);
//! 2. the loss of the whole batch is computed from those embeddings, which are made leaves of
//!    the graph: its backward gives the loss's gradient with respect to each embedding (and to
//!    the loss's own parameters: the logit scale, a student's maps into its teacher's space);
//! 3. each micro-batch is embedded again, with its graph, and backpropagates its rows of the
//!    cached embedding gradient (the backward of Σ e ⊙ g), adding into the weight gradients.
//!
//! The result is the big batch's exact gradient, at the cost of a second forward pass, with the
//! memory of one micro-batch's activations. Two things make it exact:
//! - dropout draws the same masks in both passes: each micro-batch reseeds it from (step,
//!   batch, micro-batch) before each of its two forwards;
//! - BatchNorm's running statistics are updated once per micro-batch, not twice: they are put
//!   back after pass 1. A BatchNorm tower still normalises each micro-batch with its own
//!   statistics (as open_clip's GradCache does), so its gradient is that of the micro-batched
//!   forward, not of one forward over the whole batch: exact for ViTs and text transformers,
//!   not for ResNets with BatchNorm.

use anyhow::{Context, Result};
use candle_core::{Tensor, Var};

use super::{accumulate_and_update, add_grads, check_loss, StepOutcome};
use crate::data::Batch;
use crate::model::{ClipModel, Embeddings};
use crate::optim::{AdamW, Grads};

/// A training loss in the two halves the gradient cache needs: the per-pair embeddings, and the
/// loss of the whole batch computed from them.
pub trait Objective: Sync {
    /// The batch's embeddings, each (B, ·) with one row per pair, in training mode.
    fn embed(&self, model: &ClipModel, b: &Batch) -> Result<Vec<Tensor>>;
    /// The loss of the whole batch `b` from `embeddings` (what [`Objective::embed`] gave for it).
    fn loss(&self, model: &ClipModel, embeddings: &[Tensor], b: &Batch) -> Result<Tensor>;
}

/// The model's own contrastive loss ([`ClipModel::loss`]: `clip` or `soft`) of both towers'
/// embeddings.
pub struct Contrastive;

impl Objective for Contrastive {
    fn embed(&self, model: &ClipModel, b: &Batch) -> Result<Vec<Tensor>> {
        let e = model.forward_batch(b, true)?;
        Ok(vec![e.image, e.text])
    }

    fn loss(&self, model: &ClipModel, e: &[Tensor], b: &Batch) -> Result<Tensor> {
        let e = Embeddings {
            image: e[0].clone(),
            text: e[1].clone(),
        };
        model.loss(&e, Some(&b.positives))
    }
}

/// One optimiser step of `objective` over `batches` (more than one: gradient accumulation), each
/// batch embedded `micro_batch` pairs at a time through the gradient cache ([`grad_cache`]);
/// `micro_batch` 0, or at least a batch's size, runs the batch in one piece.
///
/// Same errors as [`super::train_step`].
pub fn train_step_objective(
    model: &ClipModel,
    opt: &mut AdamW,
    batches: &[Batch],
    clip_grad_norm: f64,
    micro_batch: usize,
    objective: &impl Objective,
) -> Result<StepOutcome> {
    crate::nn::on_compute_pool(|| {
        accumulate_and_update(model, opt, batches, clip_grad_norm, |opt, b, i, k| {
            let step = opt.step;
            if micro_batch == 0 || micro_batch >= b.pairs.len() {
                let loss = objective.loss(model, &objective.embed(model, b)?, b)?;
                let value = loss.to_scalar::<f32>()? as f64;
                check_loss(value, step)?;
                let loss = if k > 1.0 { (loss / k)? } else { loss };
                return Ok((value, opt.grads_by_name(&loss.backward()?)));
            }
            let seed = crate::rng::mix(super::step_seed(model.config.seed, step), i as u64);
            grad_cache(model, opt, b, micro_batch, objective, seed, 1.0 / k)
        })
    })
}

/// The gradient of `objective` over the whole batch `b`, scaled by `scale`, computed `size`
/// pairs at a time (see the module's doc). Returns the loss (unscaled) and the gradients by
/// parameter name. `seed` seeds dropout: micro-batch j of the batch draws from (seed, j) in both
/// of its forward passes.
///
/// Errors, before anything is backpropagated through the towers, when the loss is NaN or
/// infinite.
pub fn grad_cache(
    model: &ClipModel,
    opt: &AdamW,
    b: &Batch,
    size: usize,
    objective: &impl Objective,
    seed: u64,
    scale: f64,
) -> Result<(f64, Grads)> {
    let parts = b.split(size)?;
    let seeds: Vec<u64> = (0..parts.len() as u64).map(|j| crate::rng::mix(seed, j)).collect();
    // 1. Embeddings without a graph; the running statistics they moved are put back.
    let buffers = snapshot_buffers(model)?;
    let embedded = crate::nn::no_grad(|| -> Result<Vec<Vec<Tensor>>> {
        parts
            .iter()
            .zip(&seeds)
            .map(|(p, &s)| {
                model.reseed_dropout(s);
                objective.embed(model, p)
            })
            .collect()
    })
    .context("gradient cache: embedding the micro-batches")?;
    restore_buffers(&buffers)?;
    // 2. The whole batch's loss, with the embeddings as leaves.
    let leaves = (0..embedded[0].len())
        .map(|i| {
            let rows: Vec<&Tensor> = embedded.iter().map(|e| &e[i]).collect();
            Ok(Var::from_tensor(&Tensor::cat(&rows, 0)?)?)
        })
        .collect::<Result<Vec<Var>>>()?;
    drop(embedded);
    let inputs: Vec<Tensor> = leaves.iter().map(|v| v.as_tensor().clone()).collect();
    let loss = objective.loss(model, &inputs, b)?;
    let value = loss.to_scalar::<f32>()? as f64;
    check_loss(value, opt.step)?;
    let store = (loss * scale)?.backward()?;
    // The loss's own parameters (logit scale, maps into a teacher's space) have their gradients.
    let mut grads = opt.grads_by_name(&store);
    let cached: Vec<Option<Tensor>> = inputs.iter().map(|t| store.get(t).map(|g| g.detach())).collect();
    drop(store);
    // 3. Each micro-batch again, with its graph, backpropagating its rows of the cached gradient.
    let mut row = 0;
    for (p, &s) in parts.iter().zip(&seeds) {
        model.reseed_dropout(s);
        let e = objective.embed(model, p)?;
        let n = p.pairs.len();
        let mut surrogate: Option<Tensor> = None;
        for (e, g) in e.iter().zip(&cached) {
            let Some(g) = g else { continue };
            let term = (e * g.narrow(0, row, n)?)?.sum_all()?;
            surrogate = Some(match surrogate {
                Some(s) => (s + term)?,
                None => term,
            });
        }
        if let Some(s) = surrogate {
            add_grads(&mut grads, opt.grads_by_name(&s.backward()?))?;
        }
        row += n;
    }
    Ok((value, grads))
}

/// The model's buffers (BatchNorm running statistics) as they are now.
fn snapshot_buffers(model: &ClipModel) -> Result<Vec<(Var, Tensor)>> {
    model
        .params
        .entries()
        .into_iter()
        .filter(|(_, e)| !e.is_param())
        .map(|(_, e)| Ok((e.var.clone(), e.var.as_tensor().copy()?)))
        .collect()
}

fn restore_buffers(saved: &[(Var, Tensor)]) -> Result<()> {
    for (var, value) in saved {
        var.set(value)?;
    }
    Ok(())
}
