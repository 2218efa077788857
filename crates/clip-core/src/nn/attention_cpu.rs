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

/// A pointer into a buffer that several (batch, head) work items write at once, each its own
/// columns `[h·Dh, (h+1)·Dh)` of its own batch item's rows: disjoint, so no two write one value.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: used only for the disjoint writes described above, within one parallel loop.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// The element `offset` values in (a method, so a closure captures the whole `Shared`).
    ///
    /// # Safety
    /// `offset` must lie within the buffer.
    unsafe fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: the caller's contract.
        unsafe { self.0.add(offset) }
    }
}

/// One head's operand: a (rows × cols) matrix at `ptr` with row and column strides.
#[derive(Clone, Copy)]
struct Mat {
    ptr: *const f32,
    rs: usize,
    cs: usize,
}

impl Mat {
    /// Head `col / Dh` of batch item rows starting at `row0` of a (…, D) buffer: rows of stride D.
    fn head(buf: &[f32], row0: usize, d: usize, col: usize) -> Self {
        Self {
            ptr: buf[row0 * d + col..].as_ptr(),
            rs: d,
            cs: 1,
        }
    }
    /// A contiguous row-major (rows × cols) block.
    fn rows(buf: &[f32], cols: usize) -> Self {
        Self {
            ptr: buf.as_ptr(),
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose, read in place.
    fn t(self) -> Self {
        Self {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// dst (m×n, row stride `dst_rs`) = alpha·(lhs (m×k) · rhs (k×n)), on the calling thread: the
/// (batch, head) work items are the parallelism. B·H small products (Dh = 64, L ≤ 77) in place of
/// the dot products and row updates they replace (4 lanes each, 11 % of ViT-B/32 inference).
///
/// # Safety
/// `dst`, `lhs` and `rhs` must cover every index the sizes and strides reach, and no other thread
/// may touch dst's elements meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_head(m: usize, n: usize, k: usize, dst: *mut f32, dst_rs: usize, lhs: Mat, rhs: Mat, alpha: f32) {
    if super::precision::bf16_gemm(m, n, k) {
        // Mixed precision (`--precision bf16`): the scores and the context in bf16 on AMX.
        // SAFETY: the caller's contract; `set_precision` allows bf16 only where AMX is usable.
        unsafe {
            super::bf16::gemm_bf16_into(
                m,
                n,
                k,
                dst,
                dst_rs,
                false,
                alpha,
                super::bf16::MatRef::new(lhs.ptr, lhs.rs, lhs.cs),
                super::bf16::MatRef::new(rhs.ptr, rhs.rs, rhs.cs),
                false,
                true,
            )
        };
        return;
    }
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            false,
            lhs.ptr,
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.ptr,
            rhs.cs as isize,
            rhs.rs as isize,
            0.0,
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Each row i of scores `p` (Lq × L) becomes softmax(row + mask); with `causal`, row i sees only
/// keys up to `offset + i` (the queries are the last Lq positions), the rest get exactly 0.
#[inline(always)]
fn softmax_rows(p: &mut [f32], mask: &[f32], offset: usize, causal: bool) {
    let l = mask.len();
    for (i, row) in p.chunks_mut(l).enumerate() {
        let seen = if causal { i + 1 + offset } else { l };
        let (row, hidden) = row.split_at_mut(seen);
        hidden.fill(0.0);
        for (s, &m) in row.iter_mut().zip(mask) {
            *s += m;
        }
        let top = super::vmath::max(row);
        for s in row.iter_mut() {
            *s = super::vmath::exp(*s - top);
        }
        let inv = 1.0 / super::vmath::sum(row);
        for s in row.iter_mut() {
            *s *= inv;
        }
    }
}

/// dS = P ⊙ (dP − rowsum(P ⊙ dP)) · scale, in place of dP, for rows of length `l`.
#[inline(always)]
fn softmax_grad_rows(ds: &mut [f32], p: &[f32], l: usize, scale: f32) {
    for (d, pr) in ds.chunks_mut(l).zip(p.chunks(l)) {
        let centre = super::vmath::dot(d, pr);
        for (x, &pv) in d.iter_mut().zip(pr) {
            *x = pv * (*x - centre) * scale;
        }
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
        // Both written in full below (the GEMMs write their whole blocks), never zero-filled.
        let mut ctx = super::conv_cpu::uninit(g.b * g.lq * g.d);
        let mut probs = super::conv_cpu::uninit(g.b * g.h * g.lq * g.l);
        let out = Shared(ctx.as_mut_ptr().cast());
        // One (batch item, head) per work item: its probabilities, a block of their own, and its
        // columns of the context rows.
        probs.par_chunks_mut(g.lq * g.l).enumerate().for_each(|(bh, p)| {
            let (bi, hi) = (bh / g.h, bh % g.h);
            let col = hi * g.dh;
            // SAFETY: q, k, v, probs and ctx cover these (batch, head) blocks; this work item
            // alone writes its head's columns of ctx.
            unsafe {
                // Scores S = scale · q_h · k_hᵀ (Lq × L).
                gemm_head(
                    g.lq,
                    g.l,
                    g.dh,
                    p.as_mut_ptr().cast(),
                    g.l,
                    Mat::head(q, bi * g.lq, g.d, col),
                    Mat::head(k, bi * g.l, g.d, col).t(),
                    self.scale,
                );
            }
            // SAFETY: the GEMM wrote the whole block.
            let p: &mut [f32] = unsafe { &mut *(p as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) };
            let mask = &self.mask[bi * g.l..][..g.l];
            super::vmath::vectorized(
                #[inline(always)]
                || softmax_rows(p, mask, g.l - g.lq, self.causal),
            );
            // SAFETY: as above.
            unsafe {
                // Context c_h = P · v_h (Lq × Dh), into this head's columns.
                gemm_head(
                    g.lq,
                    g.dh,
                    g.l,
                    out.at(bi * g.lq * g.d + col),
                    g.d,
                    Mat::rows(p, g.l),
                    Mat::head(v, bi * g.l, g.d, col),
                    1.0,
                );
            }
        });
        // SAFETY: every (batch, head) block of probs and every head's columns of ctx were written.
        let (ctx, probs) = unsafe { (super::conv_cpu::assume_init(ctx), super::conv_cpu::assume_init(probs)) };
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
        let (dq, dk, dv) = (
            Shared(dq.as_mut_ptr()),
            Shared(dk.as_mut_ptr()),
            Shared(dv.as_mut_ptr()),
        );
        let ops = GradOperands {
            g,
            q,
            k,
            v,
            gctx,
            dq,
            dk,
            dv,
            scale: self.scale,
        };
        // One (batch item, head) per work item, writing its head's columns of dq, dk and dv.
        let block = ops.g.lq * ops.g.l;
        self.probs.par_chunks(block).enumerate().for_each(|(bh, p)| {
            // SAFETY: each (batch item, head) is one work item's alone; every operand covers it.
            unsafe { ops.head(bh, p) }
        });
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

/// One backward call's operands, shared by its work items: the layout, the inputs, the
/// gradient of the context, and where dq, dk and dv go.
struct GradOperands<'a> {
    g: Dims,
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    gctx: &'a [f32],
    dq: Shared,
    dk: Shared,
    dv: Shared,
    scale: f32,
}

impl GradOperands<'_> {
    /// The gradients of (batch item, head) `bh` from its probabilities `p`, written into its
    /// head's columns of dq, dk and dv.
    ///
    /// # Safety
    ///
    /// No other call may run for the same `bh` at the same time (the columns are written
    /// through raw pointers), and dq, dk, dv must cover every (batch, head) block.
    unsafe fn head(&self, bh: usize, p: &[f32]) {
        let g = &self.g;
        let (bi, hi) = (bh / g.h, bh % g.h);
        let col = hi * g.dh;
        let gc = Mat::head(self.gctx, bi * g.lq, g.d, col);
        let mut ds = vec![0f32; g.lq * g.l];
        // SAFETY: every operand covers its (batch, head) block; this work item alone writes
        // its head's columns of dq, dk and dv.
        unsafe {
            // dv_h = Pᵀ · dctx_h (L × Dh).
            gemm_head(
                g.l,
                g.dh,
                g.lq,
                self.dv.at(bi * g.l * g.d + col),
                g.d,
                Mat::rows(p, g.l).t(),
                gc,
                1.0,
            );
            // dP = dctx_h · v_hᵀ (Lq × L).
            gemm_head(
                g.lq,
                g.l,
                g.dh,
                ds.as_mut_ptr(),
                g.l,
                gc,
                Mat::head(self.v, bi * g.l, g.d, col).t(),
                1.0,
            );
        }
        // dS_ij = P_ij (dP_ij − Σ_j' P_ij' dP_ij'), then through the scale.
        super::vmath::vectorized(
            #[inline(always)]
            || softmax_grad_rows(&mut ds, p, g.l, self.scale),
        );
        // SAFETY: as above.
        unsafe {
            // dq_h = dS · k_h (Lq × Dh); dk_h = dSᵀ · q_h (L × Dh).
            gemm_head(
                g.lq,
                g.dh,
                g.l,
                self.dq.at(bi * g.lq * g.d + col),
                g.d,
                Mat::rows(&ds, g.l),
                Mat::head(self.k, bi * g.l, g.d, col),
                1.0,
            );
            gemm_head(
                g.l,
                g.dh,
                g.lq,
                self.dk.at(bi * g.l * g.d + col),
                g.d,
                Mat::rows(&ds, g.l).t(),
                Mat::head(self.q, bi * g.lq, g.d, col),
                1.0,
            );
        }
    }
}
