//! Data-parallel training: the ranks of a run and what they exchange.
//!
//! Every rank holds the whole model and the same weights, and embeds its share of each global
//! batch. Three collectives then make their step the one-process step over the whole batch
//! (`crate::train::train_step_data_parallel`): the embeddings are gathered (every rank computes
//! the whole batch's loss and its gradient with respect to every embedding, keeping its own
//! rows, as open_clip's `gather_with_grad`), the towers' gradients are summed over the ranks, and
//! the BatchNorm statistics are taken from rank 0 (as PyTorch DDP's `broadcast_buffers`).
//!
//! [`Collective`] is what a communication library provides: MPI (feature `mpi`) across
//! processes and machines; [`LocalWorld`] runs ranks as threads of one process, for tests.

mod local;
mod metered;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

pub use local::LocalWorld;
pub use metered::{Metered, Traffic};

use crate::model::ClipModel;
use crate::optim::Grads;

/// The collectives data-parallel training needs, on host f32 buffers. Every rank must call the
/// same collectives in the same order with buffers of the same lengths.
pub trait Collective: Send + Sync {
    /// This process's rank, 0 ≤ rank < size.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// Every rank's `local` (all of one length), concatenated in rank order, on every rank.
    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>>;
    /// `buf` summed element-wise over the ranks, in place on every rank. Every rank gets the
    /// same values, bit for bit.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// Rank 0's `buf` on every rank.
    fn broadcast(&self, buf: &mut [f32]) -> Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()> {
        self.all_reduce_sum(&mut [0.0])
    }
    /// Ends every rank of the job now with `code`: what a rank that cannot go on calls, so that
    /// the others do not wait for it in their next collective for ever. (One process: exits.)
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// One process alone: the collectives are copies.
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>> {
        Ok(local.to_vec())
    }
    fn all_reduce_sum(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
}

/// Every rank's rows of `t` (B, …), stacked in rank order: (size·B, …). f32.
pub fn all_gather_rows(comm: &dyn Collective, t: &Tensor) -> Result<Tensor> {
    let mut dims = t.dims().to_vec();
    let local = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let all = comm.all_gather(&local)?;
    if all.len() != local.len() * comm.size() {
        bail!(
            "rank {}: gathered {} values, expected {} × {} ranks (the ranks' batches differ in size)",
            comm.rank(),
            all.len(),
            local.len(),
            comm.size()
        );
    }
    dims[0] *= comm.size();
    Ok(Tensor::from_vec(all, dims, t.device())?)
}

/// Sums `grads` over the ranks, in place, in one buffer laid out in the order of `names` (the
/// optimiser's, the same on every rank). A tensor that has no gradient on some rank counts as
/// zero there; one that has none on any rank stays absent.
pub fn all_reduce_grads(comm: &dyn Collective, model: &ClipModel, names: &[String], grads: &mut Grads) -> Result<()> {
    let mut shapes = Vec::with_capacity(names.len());
    let mut buf: Vec<f32> = vec![];
    for name in names {
        let Some(entry) = model.params.get(name) else {
            bail!("rank {}: no parameter {name} to reduce", comm.rank());
        };
        let shape = entry.var.as_tensor().dims().to_vec();
        match grads.get(name) {
            Some(g) => buf.extend(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
            None => buf.resize(buf.len() + shape.iter().product::<usize>(), 0.0),
        }
        shapes.push(shape);
    }
    // Which tensors have a gradient on some rank.
    buf.extend(names.iter().map(|n| f32::from(u8::from(grads.contains_key(n)))));
    comm.all_reduce_sum(&mut buf)?;
    let present = buf.split_off(buf.len() - names.len());
    let device = model.device();
    let mut at = 0;
    for ((name, shape), seen) in names.iter().zip(shapes).zip(present) {
        let n: usize = shape.iter().product();
        if seen > 0.0 {
            grads.insert(name.clone(), Tensor::from_slice(&buf[at..at + n], shape, device)?);
        }
        at += n;
    }
    Ok(())
}

/// Makes every rank's buffers (BatchNorm running statistics) rank 0's.
pub fn broadcast_buffers(comm: &dyn Collective, model: &ClipModel) -> Result<()> {
    let buffers: Vec<_> = model
        .params
        .entries()
        .into_iter()
        .filter(|(_, e)| !e.is_param())
        .map(|(_, e)| e.var)
        .collect();
    if buffers.is_empty() || comm.size() == 1 {
        return Ok(());
    }
    let mut buf = vec![];
    for v in &buffers {
        buf.extend(v.as_tensor().to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
    }
    comm.broadcast(&mut buf)?;
    let mut at = 0;
    for v in &buffers {
        let t = v.as_tensor();
        let n = t.elem_count();
        let value = Tensor::from_slice(&buf[at..at + n], t.dims(), t.device())?.to_dtype(t.dtype())?;
        v.set(&value)?;
        at += n;
    }
    Ok(())
}

/// A checksum of the weights, the same on every rank while they hold the same weights: the sum
/// and the sum of squares of every parameter, in f64.
pub fn weights_checksum(model: &ClipModel) -> Result<(f64, f64)> {
    let (mut sum, mut squares) = (0f64, 0f64);
    for (_, e) in model.params.entries() {
        let t = e.var.as_tensor().to_dtype(DType::F64)?;
        sum += t.sum_all()?.to_scalar::<f64>()?;
        squares += t.sqr()?.sum_all()?.to_scalar::<f64>()?;
    }
    Ok((sum, squares))
}
