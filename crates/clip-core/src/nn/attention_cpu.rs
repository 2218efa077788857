//! Multi-head scaled dot-product attention on the CPU as one op each way.
//!
//! Composed, attention reshapes and transposes q, k and v into heads (three copies, plus one
//! more for kᵀ), runs B·H tiny matmuls one after another for the scores and again for the
//! context (candle loops over the batch, each GEMM starting the thread pool), a softmax, and a
//! transpose back: ~12 graph nodes, each with its own backward. Here one work item per (batch,
//! head) reads q, k and v where the projections left them, (B, L, H·Dh), and writes the context
//! in the same layout; the backward is one pass per batch item that uses the probabilities
//! forward kept (B·H·Lq·L values).
//!
//! Layout: q (B, Lq, D), k and v (B, L, D), D = H·Dh, contiguous f32; `mask` (B·L) is added to
//! every score of its key (0 attended, −1e9 padded).

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::dispatch::host_f32;

struct Dims {
    b: usize,
    lq: usize,
    l: usize,
    d: usize,
    h: usize,
    dh: usize,
}

fn dims(lq: &Layout, lk: &Layout, lv: &Layout, heads: usize, mask: usize) -> Result<Dims> {
    let (&[b, q_len, d], &[bk, l, dk]) = (lq.dims(), lk.dims()) else {
        candle_core::bail!(
            "attention expects (B, L, D) operands, got {:?} and {:?}",
            lq.dims(),
            lk.dims()
        )
    };
    if bk != b || dk != d || lv.dims() != lk.dims() || heads == 0 || d % heads != 0 || mask != b * l {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?}, {heads} heads and a mask of {mask} do not fit",
            lq.dims(),
            lk.dims(),
            lv.dims()
        )
    }
    Ok(Dims {
        b,
        lq: q_len,
        l,
        d,
        h: heads,
        dh: d / heads,
    })
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums, so the compiler vectorises it.
    let mut acc = [0f32; 8];
    for (ca, cb) in a.chunks(8).zip(b.chunks(8)) {
        for ((s, &x), &y) in acc.iter_mut().zip(ca).zip(cb) {
            *s += x * y;
        }
    }
    acc.iter().sum()
}

fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o += a * v;
    }
}

/// softmax(q·kᵀ·scale + mask)·v per head; with `probs`, the probabilities are kept there
/// (B, H, Lq, L) for the backward pass.
pub struct Attention {
    pub heads: usize,
    pub scale: f32,
    pub mask: Vec<f32>,
    pub probs: Option<Mutex<Vec<f32>>>,
    /// A query sees only keys at or before its own position (the CLIP text transformer); the
    /// queries are the last Lq positions. Masked probabilities are exactly 0, so the backward
    /// needs nothing more.
    pub causal: bool,
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "clipmine-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = dims(l1, l2, l3, self.heads, self.mask.len())?;
        let (q, k, v) = (
            host_f32("attention", s1, l1)?,
            host_f32("attention", s2, l2)?,
            host_f32("attention", s3, l3)?,
        );
        let mut ctx = vec![0f32; g.b * g.lq * g.d];
        let mut probs = vec![0f32; g.b * g.h * g.lq * g.l];
        // One batch item per work item: its context rows and its heads' probabilities.
        ctx.par_chunks_mut(g.lq * g.d)
            .zip(probs.par_chunks_mut(g.h * g.lq * g.l))
            .enumerate()
            .for_each(|(bi, (cb, pb))| {
                let mask = &self.mask[bi * g.l..][..g.l];
                for hi in 0..g.h {
                    let col = hi * g.dh;
                    for i in 0..g.lq {
                        let p = &mut pb[(hi * g.lq + i) * g.l..][..g.l];
                        let qi = &q[(bi * g.lq + i) * g.d + col..][..g.dh];
                        // Keys this query sees: all, or those up to its own position.
                        let seen = if self.causal { i + 1 + (g.l - g.lq) } else { g.l };
                        let (p, _hidden) = p.split_at_mut(seen);
                        let mut top = f32::NEG_INFINITY;
                        for (j, s) in p.iter_mut().enumerate() {
                            let kj = &k[(bi * g.l + j) * g.d + col..][..g.dh];
                            *s = dot(qi, kj) * self.scale + mask[j];
                            top = top.max(*s);
                        }
                        let mut sum = 0f32;
                        for s in p.iter_mut() {
                            *s = (*s - top).exp();
                            sum += *s;
                        }
                        let out = &mut cb[i * g.d + col..][..g.dh];
                        for (j, s) in p.iter_mut().enumerate() {
                            *s /= sum;
                            axpy(out, *s, &v[(bi * g.l + j) * g.d + col..][..g.dh]);
                        }
                    }
                }
            });
        if let Some(slot) = &self.probs {
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = probs;
        }
        Ok((CpuStorage::F32(ctx), Shape::from((g.b, g.lq, g.d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _ctx: &Tensor,
        gctx: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let probs = match &self.probs {
            Some(slot) => std::mem::take(&mut *slot.lock().unwrap_or_else(|e| e.into_inner())),
            None => candle_core::bail!("attention: backward of a forward that kept no probabilities"),
        };
        let grad = AttentionGrad {
            heads: self.heads,
            scale: self.scale,
            probs,
            gctx: gctx.contiguous()?,
        };
        let packed = q.apply_op3_no_bwd(k, v, &grad)?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        Ok((
            Some(packed.narrow(0, 0, nq)?.reshape(q.dims())?),
            Some(packed.narrow(0, nq, nk)?.reshape(k.dims())?),
            Some(packed.narrow(0, nq + nk, nk)?.reshape(v.dims())?),
        ))
    }
}

/// [dq, dk, dv] packed in one vector.
struct AttentionGrad {
    heads: usize,
    scale: f32,
    probs: Vec<f32>,
    gctx: Tensor,
}

impl CustomOp3 for AttentionGrad {
    fn name(&self) -> &'static str {
        "clipmine-attention-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = dims(l1, l2, l3, self.heads, l2.dims()[0] * l2.dims()[1])?;
        let (q, k, v) = (
            host_f32("attention", s1, l1)?,
            host_f32("attention", s2, l2)?,
            host_f32("attention", s3, l3)?,
        );
        let (gs, gl) = self.gctx.storage_and_layout();
        let candle_core::Storage::Cpu(gs) = &*gs else {
            candle_core::bail!("attention: the gradient is not on the CPU")
        };
        let gctx = host_f32("attention", gs, gl)?;
        if gctx.len() != g.b * g.lq * g.d || self.probs.len() != g.b * g.h * g.lq * g.l {
            candle_core::bail!("attention backward: gradient or probabilities of the wrong size")
        }
        let (nq, nk) = (q.len(), k.len());
        let mut out = vec![0f32; nq + 2 * nk];
        let (dq, rest) = out.split_at_mut(nq);
        let (dk, dv) = rest.split_at_mut(nk);
        dq.par_chunks_mut(g.lq * g.d)
            .zip(dk.par_chunks_mut(g.l * g.d).zip(dv.par_chunks_mut(g.l * g.d)))
            .enumerate()
            .for_each(|(bi, (dqb, (dkb, dvb)))| {
                let mut ds = vec![0f32; g.l];
                for hi in 0..g.h {
                    let col = hi * g.dh;
                    for i in 0..g.lq {
                        let p = &self.probs[((bi * g.h + hi) * g.lq + i) * g.l..][..g.l];
                        let gi = &gctx[(bi * g.lq + i) * g.d + col..][..g.dh];
                        // dP_ij = dctx_i · v_j; dv_j += P_ij · dctx_i.
                        for (j, d) in ds.iter_mut().enumerate() {
                            let vj = &v[(bi * g.l + j) * g.d + col..][..g.dh];
                            *d = dot(gi, vj);
                            axpy(&mut dvb[j * g.d + col..][..g.dh], p[j], gi);
                        }
                        // dS_ij = P_ij (dP_ij − Σ_j' P_ij' dP_ij'), then through the scale.
                        let centre = dot(p, &ds);
                        let qi = &q[(bi * g.lq + i) * g.d + col..][..g.dh];
                        for (j, d) in ds.iter_mut().enumerate() {
                            *d = p[j] * (*d - centre) * self.scale;
                            let kj = &k[(bi * g.l + j) * g.d + col..][..g.dh];
                            axpy(&mut dqb[i * g.d + col..][..g.dh], *d, kj);
                            axpy(&mut dkb[j * g.d + col..][..g.dh], *d, qi);
                        }
                    }
                }
            });
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}
