//! Softmax over the last dimension on the CPU, with a backward pass.
//!
//! candle 0.11's `softmax_last_dim` kernel has no backward, and the composed softmax is five ops
//! forward and more backward over the (B, heads, L, L) attention scores. Here each direction is
//! one pass per row: y = exp(x − max) / Σ, and dx = y · (dy − Σ dy·y).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::dispatch::host_f32;

/// Elements per parallel work item (whole rows): small tensors stay on one thread.
const CHUNK: usize = 1 << 14;

fn last_dim(op: &str, l: &Layout) -> Result<usize> {
    match l.dims().last() {
        Some(&d) if d > 0 => Ok(d),
        _ => candle_core::bail!("{op}: needs a non-empty last dimension, got {:?}", l.dims()),
    }
}

fn rows_per_task(d: usize) -> usize {
    (CHUNK / d).max(1) * d
}

pub struct SoftmaxLastDim;

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "clipmine-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = host_f32("softmax", s, l)?;
        let d = last_dim("softmax", l)?;
        let mut y = vec![0f32; x.len()];
        let task = rows_per_task(d);
        y.par_chunks_mut(task).zip(x.par_chunks(task)).for_each(|(ys, xs)| {
            for (yr, xr) in ys.chunks_mut(d).zip(xs.chunks(d)) {
                let max = xr.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for (o, &v) in yr.iter_mut().zip(xr) {
                    *o = (v - max).exp();
                    sum += *o;
                }
                let inv = 1.0 / sum;
                yr.iter_mut().for_each(|o| *o *= inv);
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, gy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&gy.contiguous()?, &SoftmaxGrad)?))
    }
}

/// dx = y · (dy − Σ_row dy·y), from the forward's output y.
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "clipmine-softmax-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (y, gy) = (host_f32("softmax", s1, l1)?, host_f32("softmax", s2, l2)?);
        if y.len() != gy.len() {
            candle_core::bail!(
                "softmax backward: gradient {:?} does not match output {:?}",
                l2.dims(),
                l1.dims()
            )
        }
        let d = last_dim("softmax", l1)?;
        let task = rows_per_task(d);
        let mut gx = vec![0f32; y.len()];
        gx.par_chunks_mut(task)
            .zip(y.par_chunks(task).zip(gy.par_chunks(task)))
            .for_each(|(gxs, (ys, gys))| {
                for ((o, yr), gr) in gxs.chunks_mut(d).zip(ys.chunks(d)).zip(gys.chunks(d)) {
                    let dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
                    for ((o, &yv), &g) in o.iter_mut().zip(yr).zip(gr) {
                        *o = yv * (g - dot);
                    }
                }
            });
        Ok((CpuStorage::F32(gx), l1.shape().clone()))
    }
}
