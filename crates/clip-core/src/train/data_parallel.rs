//! One step of a data-parallel run: each rank embeds its share of the global batch, and the
//! ranks' collectives make the step the one-process step over the whole batch.
//!
//! On rank r of N, holding pairs [r·B, (r+1)·B) of a global batch of N·B:
//! 1. its share is embedded: in micro-batches without a graph (the gradient cache,
//!    [`super::grad_cache`]), or in one piece with its graph, kept until step 3;
//! 2. the embeddings are all-gathered: every rank holds the N·B embeddings and computes the
//!    whole batch's loss and its gradient with respect to each of them, and to the loss's own
//!    parameters (the same on every rank);
//! 3. its rows of that gradient are backpropagated through its share's embeddings (in
//!    micro-batches, embedded again with their graph);
//! 4. the towers' gradients are summed over the ranks (the loss's own parameters' averaged), in
//!    one all-reduce: every rank gets the same values and applies the same update.
//!
//! This is open_clip's `--gather-with-grad` (the exact big-batch gradient, not 1/N of it).
//! Micro-batch j of rank r draws the dropout masks micro-batch r·(B/M)+j draws in one process,
//! so N ranks × B pairs with micro-batches of M train as one process with a batch of N·B and
//! micro-batches of M. BatchNorm towers normalise per micro-batch in both; their running
//! statistics are rank 0's after each step (as PyTorch DDP's `broadcast_buffers`).

use anyhow::{bail, Result};

use super::grad_cache::{backpropagate_rows, loss_gradients, Chunks, Objective, Pairs};
use super::{add_grads, apply_update, step_seed, StepOutcome};
use crate::data::Batch;
use crate::dist::{all_gather_rows, all_reduce_grads, broadcast_buffers, Collective};
use crate::model::ClipModel;
use crate::optim::{AdamW, Grads};

/// One optimiser step on this rank: `local` is its share of the global batch `global` (every
/// rank's shares are the same size, in rank order), embedded `micro_batch` pairs at a time (0:
/// the whole share at once). Every rank returns the same outcome and holds the same weights
/// after it.
#[allow(clippy::too_many_arguments)]
pub fn train_step_data_parallel(
    model: &ClipModel,
    opt: &mut AdamW,
    local: &Batch,
    global: Pairs<'_>,
    clip_grad_norm: f64,
    micro_batch: usize,
    objective: &impl Objective,
    comm: &dyn Collective,
) -> Result<StepOutcome> {
    crate::nn::on_compute_pool(|| {
        let (value, mut grads) = data_parallel_grads(model, opt, local, global, micro_batch, objective, comm)?;
        let grad_norm = apply_update(opt, &mut grads, clip_grad_norm)?;
        model.clamp_logit_scale()?;
        broadcast_buffers(comm, model)?;
        Ok(StepOutcome {
            loss: value,
            grad_norm,
            grads,
        })
    })
}

/// The whole batch's loss and gradient on this rank (see the module's doc).
fn data_parallel_grads(
    model: &ClipModel,
    opt: &AdamW,
    local: &Batch,
    global: Pairs<'_>,
    micro_batch: usize,
    objective: &impl Objective,
    comm: &dyn Collective,
) -> Result<(f64, Grads)> {
    let (n, rank) = (local.pairs.len(), comm.rank());
    if n * comm.size() != global.pairs.len() {
        bail!(
            "rank {rank}: a share of {n} pairs, {} ranks, and a global batch of {}: the shares must be equal",
            comm.size(),
            global.pairs.len()
        );
    }
    if global.pairs[rank * n..(rank + 1) * n] != local.pairs[..] {
        bail!("rank {rank}: its batch is not its share of the global batch");
    }
    let per_rank = match micro_batch {
        0 => 1,
        m => n.div_ceil(m),
    };
    let seed = crate::rng::mix(step_seed(model.config.seed, opt.step), 0);
    let size = if micro_batch == 0 { n } else { micro_batch };
    let chunks = Chunks::new(local, size, seed, (rank * per_rank) as u64)?;
    // A share in one piece is embedded once, its graph kept while the ranks exchange the values;
    // in micro-batches, without a graph and again with it (the gradient cache).
    let (kept, mine) = match per_rank {
        1 => {
            let (e, values) = chunks.embed_whole(model, objective)?;
            (Some(e), values)
        }
        _ => (None, chunks.embed_without_graph(model, objective)?),
    };
    let all = mine
        .iter()
        .map(|t| all_gather_rows(comm, t))
        .collect::<Result<Vec<_>>>()?;
    let (value, loss_grads, cached) = loss_gradients(model, opt, all, global, objective, 1.0)?;
    let mut grads = match kept {
        Some(e) => backpropagate_rows(opt, &e, &cached, rank * n)?,
        None => chunks.backpropagate(model, opt, objective, &cached, rank * n)?,
    };
    // The loss's own parameters have the whole gradient on every rank: they enter the sum as
    // their mean, so that every rank ends with the very same values.
    let share = 1.0 / comm.size() as f64;
    let loss_grads = loss_grads
        .into_iter()
        .map(|(k, g)| Ok((k, (g * share)?)))
        .collect::<Result<Grads>>()?;
    add_grads(&mut grads, loss_grads)?;
    let names: Vec<String> = opt.names().map(String::from).collect();
    all_reduce_grads(comm, model, &names, &mut grads)?;
    Ok((value, grads))
}
