//! A residual block's ending, max(0, a + b), on the CPU as one pass each way.
//!
//! Composed, the sum and the ReLU are two passes forward, and the ReLU's backward in candle is a
//! comparison, a cast and a product (plus the gradient store's zero-fill and sum). Here the
//! forward writes max(0, a + b) once, and the backward writes dy·[y > 0] once and hands the same
//! tensor to both inputs. The mask is y > 0, as PyTorch's ReLU backward uses (candle's passes the
//! gradient at exactly 0 too).
//!
//! Layout: a, b, y of one shape, contiguous f32.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::dispatch::host_f32;

/// Elements per work item: enough to outweigh handing the work to another thread.
const CHUNK: usize = 1 << 15;

/// One chunk of [`zip_map`] (inlined into `vmath::vectorized`).
#[inline(always)]
fn zip_chunk(o: &mut [std::mem::MaybeUninit<f32>], a: &[f32], b: &[f32], f: &impl Fn(f32, f32) -> f32) {
    for ((o, &x), &y) in o.iter_mut().zip(a).zip(b) {
        o.write(f(x, y));
    }
}

/// out[i] = f(a[i], b[i]) in parallel chunks, written once (never zero-filled first).
fn zip_map(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = Vec::with_capacity(a.len());
    out.spare_capacity_mut()
        .par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(o, (a, b))| {
            super::vmath::vectorized(
                #[inline(always)]
                || zip_chunk(o, a, b, &f),
            )
        });
    // SAFETY: the chunks above cover and write all a.len() elements.
    unsafe { out.set_len(a.len()) };
    out
}

fn same_shape(l1: &Layout, l2: &Layout) -> Result<()> {
    if l1.dims() != l2.dims() {
        candle_core::bail!("add-relu: shapes {:?} and {:?} differ", l1.dims(), l2.dims())
    }
    Ok(())
}

/// y = max(0, a + b).
pub struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "clipmine-add-relu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        same_shape(l1, l2)?;
        let (a, b) = (host_f32("add-relu", s1, l1)?, host_f32("add-relu", s2, l2)?);
        Ok((
            CpuStorage::F32(zip_map(a, b, |x, y| (x + y).max(0.0))),
            l1.shape().clone(),
        ))
    }

    fn bwd(&self, _a: &Tensor, _b: &Tensor, y: &Tensor, gy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = y.apply_op2_no_bwd(&gy.contiguous()?, &ReluGrad)?;
        Ok((Some(g.clone()), Some(g)))
    }
}

/// dy where y > 0, else 0.
struct ReluGrad;

impl CustomOp2 for ReluGrad {
    fn name(&self) -> &'static str {
        "clipmine-relu-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        same_shape(l1, l2)?;
        let (y, gy) = (host_f32("relu", s1, l1)?, host_f32("relu", s2, l2)?);
        Ok((
            CpuStorage::F32(zip_map(y, gy, |y, g| if y > 0.0 { g } else { 0.0 })),
            l1.shape().clone(),
        ))
    }
}
