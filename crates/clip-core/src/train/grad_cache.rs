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

use super::{accumulate_and_update, check_loss, StepOutcome};
use crate::data::Batch;
use crate::model::{ClipModel, Embeddings};
use crate::optim::{AdamW, Grads};

/// A training loss in the two halves the gradient cache needs: the per-pair embeddings, and the
/// loss of the whole batch computed from them.
pub trait Objective: Sync {
    /// The batch's embeddings, each (B, ·) with one row per pair, in training mode.
    fn embed(&self, model: &ClipModel, b: &Batch) -> Result<Vec<Tensor>>;
    /// The loss of the whole batch `b` from `embeddings` (what [`Objective::embed`] gave for it).
    fn loss(&self, model: &ClipModel, embeddings: &[Tensor], b: Pairs<'_>) -> Result<Tensor>;
}

/// What the loss of a batch needs besides its embeddings: which pairs of the dataset they are,
/// and which pairs are right answers for each other. Apart from the images and tokens, so that a
/// rank of a data-parallel run, which holds only its share of those, can name the whole batch.
#[derive(Clone, Copy)]
pub struct Pairs<'a> {
    /// Indices into the dataset's pairs, in the order of the embeddings' rows.
    pub pairs: &'a [usize],
    /// (B, B): 1 where pairs i and j share their image or caption ([`Batch::positives`]).
    pub positives: &'a Tensor,
}

impl<'a> From<&'a crate::data::GlobalBatch> for Pairs<'a> {
    fn from(b: &'a crate::data::GlobalBatch) -> Self {
        Pairs {
            pairs: &b.pairs,
            positives: &b.positives,
        }
    }
}

impl<'a> From<&'a Batch> for Pairs<'a> {
    fn from(b: &'a Batch) -> Self {
        Pairs {
            pairs: &b.pairs,
            positives: &b.positives,
        }
    }
}

/// The model's own contrastive loss ([`ClipModel::loss`]: `clip` or `soft`) of both towers'
/// embeddings.
pub struct Contrastive;

impl Objective for Contrastive {
    fn embed(&self, model: &ClipModel, b: &Batch) -> Result<Vec<Tensor>> {
        let e = model.forward_batch(b, true)?;
        Ok(vec![e.image, e.text])
    }

    fn loss(&self, model: &ClipModel, e: &[Tensor], b: Pairs<'_>) -> Result<Tensor> {
        let e = Embeddings {
            image: e[0].clone(),
            text: e[1].clone(),
        };
        model.loss(&e, Some(b.positives))
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
                let loss = objective.loss(model, &objective.embed(model, b)?, b.into())?;
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
    let chunks = Chunks::new(b, size, seed, 0)?;
    let inputs = chunks.embed_without_graph(model, objective)?;
    let (value, mut grads, cached) = loss_gradients(model, opt, inputs, b.into(), objective, scale)?;
    let towers = chunks.backpropagate(model, opt, objective, &cached, 0)?;
    super::add_grads(&mut grads, towers)?;
    Ok((value, grads))
}

/// A batch cut into micro-batches, each with its dropout seed.
pub(super) struct Chunks {
    parts: Vec<Batch>,
    seeds: Vec<u64>,
}

impl Chunks {
    /// `b` in micro-batches of `size` (0: one), micro-batch j seeded from (seed, first + j): a
    /// rank of a data-parallel run numbers its micro-batches from where its share starts in the
    /// whole batch, so each draws the masks it would in one process.
    pub(super) fn new(b: &Batch, size: usize, seed: u64, first: u64) -> Result<Self> {
        let parts = match size {
            0 => vec![b.clone()],
            m => b.split(m)?,
        };
        let seeds = (0..parts.len() as u64)
            .map(|j| crate::rng::mix(seed, first + j))
            .collect();
        Ok(Self { parts, seeds })
    }

    /// Pass 1: every micro-batch's embeddings without a graph, concatenated (one tensor per
    /// output of [`Objective::embed`]). The running statistics they moved are put back.
    pub(super) fn embed_without_graph(&self, model: &ClipModel, objective: &impl Objective) -> Result<Vec<Tensor>> {
        let buffers = snapshot_buffers(model)?;
        let embedded = crate::nn::no_grad(|| -> Result<Vec<Vec<Tensor>>> {
            self.parts
                .iter()
                .zip(&self.seeds)
                .map(|(p, &s)| {
                    model.reseed_dropout(s);
                    objective.embed(model, p)
                })
                .collect()
        })
        .context("gradient cache: embedding the micro-batches")?;
        restore_buffers(&buffers)?;
        (0..embedded[0].len())
            .map(|i| {
                let rows: Vec<&Tensor> = embedded.iter().map(|e| &e[i]).collect();
                Ok(Tensor::cat(&rows, 0)?)
            })
            .collect()
    }

    /// Pass 3: each micro-batch again, with its graph, backpropagating its rows of `cached` (the
    /// loss's gradient with respect to each embedding; its rows for this batch start at `row`).
    /// Returns the towers' gradients, summed over the micro-batches.
    pub(super) fn backpropagate(
        &self,
        model: &ClipModel,
        opt: &AdamW,
        objective: &impl Objective,
        cached: &[Option<Tensor>],
        mut row: usize,
    ) -> Result<Grads> {
        let mut grads = Grads::new();
        for (p, &s) in self.parts.iter().zip(&self.seeds) {
            model.reseed_dropout(s);
            let e = objective.embed(model, p)?;
            super::add_grads(&mut grads, backpropagate_rows(opt, &e, cached, row)?)?;
            row += p.pairs.len();
        }
        Ok(grads)
    }

    /// Passes 1 and 3 in one, for a batch in one piece: its embeddings with their graph (kept
    /// until [`backpropagate_rows`]), and their values without it.
    pub(super) fn embed_whole(
        &self,
        model: &ClipModel,
        objective: &impl Objective,
    ) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
        let ([p], [s]) = (&self.parts[..], &self.seeds[..]) else {
            anyhow::bail!(
                "gradient cache: {} micro-batches where one was expected",
                self.parts.len()
            );
        };
        model.reseed_dropout(*s);
        let e = objective.embed(model, p)?;
        let values = e.iter().map(|t| t.detach()).collect();
        Ok((e, values))
    }
}

/// The towers' gradients of embeddings `e` (with their graph), which are rows `row`.. of the
/// embeddings the loss's gradient `cached` is of: the backward of Σ e · cached.
pub(super) fn backpropagate_rows(opt: &AdamW, e: &[Tensor], cached: &[Option<Tensor>], row: usize) -> Result<Grads> {
    let mut surrogate: Option<Tensor> = None;
    for (e, g) in e.iter().zip(cached) {
        let Some(g) = g else { continue };
        let term = (e * g.narrow(0, row, e.dim(0)?)?)?.sum_all()?;
        surrogate = Some(match surrogate {
            Some(s) => (s + term)?,
            None => term,
        });
    }
    Ok(match surrogate {
        Some(s) => opt.grads_by_name(&s.backward()?),
        None => Grads::new(),
    })
}

/// Pass 2: the loss of the whole batch from `inputs` (its embeddings, made leaves of the graph)
/// and its backward, scaled by `scale`. Returns the loss (unscaled), the gradients of the loss's
/// own parameters (the logit scale, a student's maps into its teacher's space) and the loss's
/// gradient with respect to each input (`None` where the loss does not depend on it). Errors
/// when the loss is NaN or infinite.
pub(super) fn loss_gradients(
    model: &ClipModel,
    opt: &AdamW,
    inputs: Vec<Tensor>,
    pairs: Pairs<'_>,
    objective: &impl Objective,
    scale: f64,
) -> Result<(f64, Grads, Vec<Option<Tensor>>)> {
    let leaves = inputs
        .iter()
        .map(|t| Ok(Var::from_tensor(t)?))
        .collect::<Result<Vec<Var>>>()?;
    drop(inputs);
    let inputs: Vec<Tensor> = leaves.iter().map(|v| v.as_tensor().clone()).collect();
    let loss = objective.loss(model, &inputs, pairs)?;
    let value = loss.to_scalar::<f32>()? as f64;
    check_loss(value, opt.step)?;
    let store = (loss * scale)?.backward()?;
    let grads = opt.grads_by_name(&store);
    let cached = inputs.iter().map(|t| store.get(t).map(|g| g.detach())).collect();
    Ok((value, grads, cached))
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
