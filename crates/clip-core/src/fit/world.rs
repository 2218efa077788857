//! A run trained by several ranks at once (data-parallel, [`crate::dist`]).
//!
//! Every rank holds a [`Trainer`] of the same run: the same config, data and initial weights.
//! Each one's loader reads only its share of every global batch ([`crate::data::Shard`]), and
//! [`crate::train::train_step_data_parallel`] makes the step the one-process step over the whole
//! batch, so every rank applies the same update. Rank 0 alone writes the run folder; the others
//! train, validate (the plateau schedule needs the validation loss on every rank) and stop with it:
//!
//! - a stop (Ctrl-C, SIGTERM) raised on any rank stops every rank after the same step, through
//!   a one-value all-reduce after each step;
//! - every [`CHECK_EVERY`] steps and at the end of each epoch the ranks compare a checksum of
//!   their weights, and an error names the rank that differs;
//! - the state records the world size, and a run continues only with as many ranks.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{bail, Result};

use super::Trainer;
use crate::data::{Batch, Shard};
use crate::dist::{weights_checksum, Collective};
use crate::model::ClipModel;
use crate::optim::AdamW;
use crate::train::{train_step_data_parallel, train_step_objective, Objective, StepOutcome};

/// Steps between two comparisons of the ranks' weights.
pub const CHECK_EVERY: u64 = 100;

impl Trainer {
    /// Makes this trainer rank `world.rank()` of `world.size()` (after opening the run, before
    /// training). Refused when the global batch does not cut into equal shares (of whole
    /// micro-batches), with gradient accumulation, or when a run trained by another number of
    /// ranks would continue. Ranks other than 0 stop writing the run folder.
    pub fn set_world(&mut self, world: Arc<dyn Collective>) -> Result<()> {
        let n = world.size();
        let t = &self.cfg.train;
        if n > 1 {
            if !t.batch_size.is_multiple_of(n) {
                bail!(
                    "a batch of {} pairs cannot be shared equally by {n} ranks: choose a --batch-size that is a multiple of {n}",
                    t.batch_size
                );
            }
            let share = t.batch_size / n;
            if t.micro_batch > 0 && !share.is_multiple_of(t.micro_batch) {
                bail!(
                    "each of the {n} ranks embeds {share} pairs of every batch of {}, which micro-batches of {} do not divide: choose a --micro-batch that divides {share}",
                    t.batch_size,
                    t.micro_batch
                );
            }
            if t.accumulate > 1 {
                bail!(
                    "--accumulate {} is not supported with {n} ranks: the ranks already make one big batch (raise --batch-size, with --micro-batch to keep memory)",
                    t.accumulate
                );
            }
        }
        let started = self.state.epoch > 0 || self.state.partial.is_some();
        let before = self.state.world_size.unwrap_or(1);
        if started && before != n {
            bail!(
                "{} was trained by {before} {}; it continues only with {before} (this launch has {n}): a different number of ranks would change its batches' shares and dropout masks",
                self.out.display(),
                if before == 1 { "process" } else { "ranks" }
            );
        }
        self.state.world_size = Some(n);
        self.writes = world.rank() == 0;
        self.world = Some(world);
        Ok(())
    }

    /// The ranks of this run, when several train it.
    pub fn world(&self) -> Option<&dyn Collective> {
        self.world.as_deref().filter(|w| w.size() > 1)
    }

    /// This rank's share of every batch.
    pub fn shard(&self) -> Shard {
        match self.world() {
            Some(w) => Shard {
                rank: w.rank(),
                ranks: w.size(),
            },
            None => Shard::WHOLE,
        }
    }

    /// Whether a stop was asked for, on this rank or any other (every rank must call it after
    /// the same steps).
    pub(super) fn stop_requested(&self) -> Result<bool> {
        let mine = self.stop.as_ref().is_some_and(|f| f.load(Ordering::SeqCst));
        let Some(w) = self.world() else {
            return Ok(mine);
        };
        let mut flag = [f32::from(u8::from(mine))];
        w.all_reduce_sum(&mut flag)?;
        Ok(flag[0] > 0.0)
    }

    /// Errors, naming the rank, when some rank's weights differ from rank 0's (every rank must
    /// call it at the same point). A checksum: the sum and the sum of squares of every weight.
    pub fn check_same_weights(&self) -> Result<()> {
        let Some(w) = self.world() else {
            return Ok(());
        };
        let (sum, squares) = weights_checksum(&self.model)?;
        // The f64s travel as the bits of four f32s: a gather copies, it computes nothing.
        let words = |x: f64| [x.to_bits() as u32, (x.to_bits() >> 32) as u32];
        let mine: Vec<f32> = [sum, squares].into_iter().flat_map(words).map(f32::from_bits).collect();
        let all = w.all_gather(&mine)?;
        let bits: Vec<u32> = all.iter().map(|x| x.to_bits()).collect();
        let ranks: Vec<&[u32]> = bits.chunks(4).collect();
        if let Some(r) = (1..ranks.len()).find(|&r| ranks[r] != ranks[0]) {
            let value = |c: &[u32]| {
                let f = |lo: u32, hi: u32| f64::from_bits(u64::from(lo) | (u64::from(hi) << 32));
                (f(c[0], c[1]), f(c[2], c[3]))
            };
            bail!(
                "after step {}, rank {r}'s weights differ from rank 0's (checksums {:?} and {:?}): the ranks no longer train one model",
                self.opt.step,
                value(ranks[r]),
                value(ranks[0])
            );
        }
        Ok(())
    }
}

/// One optimiser step over `pending`: data-parallel for a rank's share of a global batch, in
/// one process otherwise. `(clip, micro)`: the gradient norm clip and the micro-batch.
pub(super) fn step(
    model: &ClipModel,
    opt: &mut AdamW,
    world: Option<&dyn Collective>,
    pending: &[Batch],
    (clip, micro): (f64, usize),
    objective: &impl Objective,
) -> Result<StepOutcome> {
    match (world, pending) {
        (Some(w), [b]) if w.size() > 1 => {
            let Some(global) = &b.global else {
                bail!("rank {}: a batch that is not a share of a global batch", w.rank());
            };
            train_step_data_parallel(model, opt, b, global.into(), clip, micro, objective, w)
        }
        (Some(w), _) if w.size() > 1 => bail!(
            "rank {}: {} batches in one step; data-parallel steps take one",
            w.rank(),
            pending.len()
        ),
        _ => train_step_objective(model, opt, pending, clip, micro, objective),
    }
}
