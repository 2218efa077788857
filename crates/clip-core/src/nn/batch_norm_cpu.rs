//! Training-mode BatchNorm on the CPU as one fused kernel per direction.
//!
//! Written with tensor ops, BatchNorm costs a dozen passes over the activations per direction, most
//! of them strided reductions over (N, H, W) that candle runs element by element; in a small ResNet
//! that was the largest share of a training step. Here the forward is two passes (statistics,
//! normalise) and the backward two (two sums per channel, then the input gradient).
//!
//! A ReLU that follows a BatchNorm (as in every ResNet block but the last) is fused into it: the
//! forward clamps as it writes, and the backward masks the incoming gradient where the output was
//! zero while it reads it. candle's own ReLU backward is six passes and four allocations (a
//! comparison, a cast, a product, and the gradient store's zero-fill and sum).
//!
//! Layout: x (B, C, H, W) contiguous f32; weight and bias (C).

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::vmath;

fn dims(l: &Layout) -> Result<(usize, usize, usize)> {
    let &[b, c, h, w] = l.dims() else {
        candle_core::bail!("batch norm expects (B, C, H, W), got {:?}", l.dims())
    };
    Ok((b, c, h * w))
}

/// Values summed side by side in f32 before a block's total joins the f64 sum.
const LANES: usize = 16;
const BLOCK: usize = 1024;

/// (Σ f(a, b).0, Σ f(a, b).1) over paired slices, in f64 across blocks of [`BLOCK`] values and in
/// [`LANES`] f32 partial sums within one. A single running f64 sum is a dependency chain that the
/// compiler cannot vectorise: the statistics' passes ran at one element per add latency, 12 % of a
/// `tiny` training step.
#[inline(always)]
fn lane_sums(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> (f32, f32)) -> (f64, f64) {
    let (mut t0, mut t1) = (0f64, 0f64);
    for (ab, bb) in a.chunks(BLOCK).zip(b.chunks(BLOCK)) {
        let (mut s0, mut s1) = ([0f32; LANES], [0f32; LANES]);
        for (al, bl) in ab.chunks(LANES).zip(bb.chunks(LANES)) {
            // Zipped, so no index is bounds-checked and the lanes vectorise.
            for ((&a, &b), (s0, s1)) in al.iter().zip(bl).zip(s0.iter_mut().zip(&mut s1)) {
                let (u, v) = f(a, b);
                *s0 += u;
                *s1 += v;
            }
        }
        t0 += s0.iter().map(|&v| v as f64).sum::<f64>();
        t1 += s1.iter().map(|&v| v as f64).sum::<f64>();
    }
    (t0, t1)
}

/// The gradient `g` where a fused ReLU passed its input `v` (v·scale + shift > 0), else 0.
#[inline(always)]
fn passed(g: f32, v: f32, scale: f32, shift: f32) -> f32 {
    if v * scale + shift > 0.0 {
        g
    } else {
        0.0
    }
}

/// Mean and biased variance of channel `ch` (block sums accumulated in f64).
#[inline(always)]
fn channel_stats(x: &[f32], b: usize, c: usize, hw: usize, ch: usize) -> (f32, f32) {
    let n = (b * hw) as f64;
    let plane = |bi: usize| &x[(bi * c + ch) * hw..][..hw];
    let sum: f64 = (0..b)
        .map(|bi| lane_sums(plane(bi), plane(bi), |v, _| (v, 0.0)).0)
        .sum();
    let mean = (sum / n) as f32;
    let sq: f64 = (0..b)
        .map(|bi| lane_sums(plane(bi), plane(bi), |v, _| ((v - mean) * (v - mean), 0.0)).0)
        .sum();
    (mean, (sq / n) as f32)
}

/// Per-channel mean and biased variance, one channel per work item.
fn stats(x: &[f32], b: usize, c: usize, hw: usize) -> (Vec<f32>, Vec<f32>) {
    (0..c)
        .into_par_iter()
        .map(|ch| {
            vmath::vectorized(
                #[inline(always)]
                || channel_stats(x, b, c, hw, ch),
            )
        })
        .unzip()
}

/// Per-channel (mean, biased variance) of the last forward pass, shared with the caller.
pub type BatchStats = Arc<Mutex<Option<(Vec<f32>, Vec<f32>)>>>;

/// Per channel (scale, shift) so that y = x·scale + shift.
fn affine(gamma: &[f32], beta: &[f32], mean: &[f32], var: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    (0..gamma.len())
        .map(|ch| {
            let scale = gamma[ch] / (var[ch] + eps).sqrt();
            (scale, beta[ch] - mean[ch] * scale)
        })
        .unzip()
}

/// One plane of y = x·a + b (clamped at 0 with `relu`).
#[inline(always)]
fn affine_plane(yc: &mut [std::mem::MaybeUninit<f32>], xc: &[f32], a: f32, b: f32, relu: bool) {
    for (o, &v) in yc.iter_mut().zip(xc) {
        let t = v * a + b;
        o.write(if relu { t.max(0.0) } else { t });
    }
}

/// y = x·scale + shift per channel (clamped at 0 with `relu`), one (B, C) plane per work item.
fn apply_affine(x: &[f32], c: usize, hw: usize, scale: &[f32], shift: &[f32], relu: bool) -> Vec<f32> {
    let mut y = Vec::with_capacity(x.len());
    // Every element is written below before the vector is read.
    y.spare_capacity_mut()
        .par_chunks_mut(hw)
        .zip(x.par_chunks(hw))
        .enumerate()
        .for_each(|(i, (yc, xc))| {
            let (a, b) = (scale[i % c], shift[i % c]);
            vmath::vectorized(
                #[inline(always)]
                || affine_plane(yc, xc, a, b, relu),
            )
        });
    // SAFETY: the loop above wrote all x.len() elements.
    unsafe { y.set_len(x.len()) };
    y
}

/// y = (x − mean) / √(var + eps) · weight + bias with batch statistics, then max(0, ·) when
/// `relu`; the statistics are left in `stats` for the running averages.
pub struct BatchNormTrain {
    pub eps: f32,
    pub relu: bool,
    pub stats: BatchStats,
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "clipmine-batch-norm"
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
        let (b, c, hw) = dims(l1)?;
        let (x, gamma, beta) = (
            super::dispatch::host_f32("batch norm", s1, l1)?,
            super::dispatch::host_f32("batch norm", s2, l2)?,
            super::dispatch::host_f32("batch norm", s3, l3)?,
        );
        let (mean, var) = stats(x, b, c, hw);
        let (scale, shift) = affine(gamma, beta, &mean, &var, self.eps);
        let y = apply_affine(x, c, hw, &scale, &shift, self.relu);
        *self.stats.lock().unwrap() = Some((mean, var));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _y: &Tensor,
        gy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, c, h, w) = x.dims4()?;
        let grad = BatchNormGrad {
            eps: self.eps,
            relu_beta: if self.relu { Some(beta.to_vec1()?) } else { None },
            saved: self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        };
        let packed = x.apply_op3_no_bwd(gamma, &gy.contiguous()?, &grad)?;
        let n = b * c * h * w;
        let gx = packed.narrow(0, 0, n)?.reshape((b, c, h, w))?;
        let ggamma = packed.narrow(0, n, c)?;
        let gbeta = packed.narrow(0, n + c, c)?;
        Ok((Some(gx), Some(ggamma), Some(gbeta)))
    }
}

/// What the backward pass reads, per (B, C) plane.
struct Planes<'a> {
    gy: &'a [f32],
    x: &'a [f32],
    b: usize,
    c: usize,
    hw: usize,
    mean: &'a [f32],
    rstd: &'a [f32],
    /// With a fused ReLU, the forward's affine map (to recompute its mask); else 0 and 1.
    scale: &'a [f32],
    shift: &'a [f32],
}

impl Planes<'_> {
    /// (Σ dy, Σ dy·x̂) over channel `ch`, dy masked by the fused ReLU.
    #[inline(always)]
    fn sums(&self, ch: usize) -> (f32, f32) {
        let (mut s, mut sx) = (0f64, 0f64);
        let (a, sh, m, r) = (self.scale[ch], self.shift[ch], self.mean[ch], self.rstd[ch]);
        for bi in 0..self.b {
            let off = (bi * self.c + ch) * self.hw;
            let (ds, dsx) = lane_sums(&self.gy[off..off + self.hw], &self.x[off..off + self.hw], |g, v| {
                let g = passed(g, v, a, sh);
                (g, g * ((v - m) * r))
            });
            s += ds;
            sx += dsx;
        }
        (s as f32, sx as f32)
    }

    /// dx of plane `i` (channel i mod C): k·(N·dy − Σdy − x̂·Σ(dy·x̂)).
    #[inline(always)]
    fn dx(&self, dxc: &mut [f32], i: usize, k: f32, n: f32, sum_dy: f32, sum_dy_xhat: f32) {
        let ch = i % self.c;
        let off = i * self.hw;
        let (a, sh, m, r) = (self.scale[ch], self.shift[ch], self.mean[ch], self.rstd[ch]);
        let (gy, x) = (&self.gy[off..off + self.hw], &self.x[off..off + self.hw]);
        for ((d, &g), &v) in dxc.iter_mut().zip(gy).zip(x) {
            let xhat = (v - m) * r;
            *d = k * (n * passed(g, v, a, sh) - sum_dy - xhat * sum_dy_xhat);
        }
    }
}

/// The three gradients of [`BatchNormTrain`], packed as [dx, dweight, dbias] in one vector.
struct BatchNormGrad {
    eps: f32,
    /// The forward pass's (mean, variance), so the backward need not compute them again.
    saved: Option<(Vec<f32>, Vec<f32>)>,
    /// With a fused ReLU: the bias, to recompute where the forward clamped (the same arithmetic,
    /// so the same mask) instead of keeping the output.
    relu_beta: Option<Vec<f32>>,
}

impl CustomOp3 for BatchNormGrad {
    fn name(&self) -> &'static str {
        "clipmine-batch-norm-grad"
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
        let (b, c, hw) = dims(l1)?;
        let (x, gamma, gy) = (
            super::dispatch::host_f32("batch norm", s1, l1)?,
            super::dispatch::host_f32("batch norm", s2, l2)?,
            super::dispatch::host_f32("batch norm", s3, l3)?,
        );
        let (mean, var) = match &self.saved {
            Some((m, v)) if m.len() == c && v.len() == c => (m.clone(), v.clone()),
            _ => stats(x, b, c, hw),
        };
        let rstd: Vec<f32> = var.iter().map(|v| 1.0 / (v + self.eps).sqrt()).collect();
        // With a fused ReLU, dy counts only where the forward's output was positive; the mask is
        // recomputed (the same arithmetic as the forward, so the same mask) rather than stored.
        // Without one, scale 0 and shift 1 pass every gradient.
        let (scale, shift) = match &self.relu_beta {
            Some(beta) => affine(gamma, beta, &mean, &var, self.eps),
            None => (vec![0.0; c], vec![1.0; c]),
        };
        // Per channel: Σ dy and Σ dy·x̂.
        let planes = Planes {
            gy,
            x,
            b,
            c,
            hw,
            mean: &mean,
            rstd: &rstd,
            scale: &scale,
            shift: &shift,
        };
        let (sum_dy, sum_dy_xhat): (Vec<f32>, Vec<f32>) = (0..c)
            .into_par_iter()
            .map(|ch| {
                vmath::vectorized(
                    #[inline(always)]
                    || planes.sums(ch),
                )
            })
            .unzip();
        let n = (b * hw) as f32;
        let mut out = vec![0f32; x.len() + 2 * c];
        let (dx, rest) = out.split_at_mut(x.len());
        // dx = γ·rstd/N · (N·dy − Σdy − x̂·Σ(dy·x̂))
        dx.par_chunks_mut(hw).enumerate().for_each(|(i, dxc)| {
            let ch = i % c;
            let k = gamma[ch] * rstd[ch] / n;
            let (sd, sdx) = (sum_dy[ch], sum_dy_xhat[ch]);
            vmath::vectorized(
                #[inline(always)]
                || planes.dx(dxc, i, k, n, sd, sdx),
            )
        });
        rest[..c].copy_from_slice(&sum_dy_xhat);
        rest[c..].copy_from_slice(&sum_dy);
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

/// Evaluation-mode BatchNorm (running statistics, then max(0, ·) when `relu`) as one pass.
///
/// Composed, it is four broadcast ops and a ReLU over each activation: in inference (indexing,
/// evaluation) the largest cost after the convolutions. Its backward (rarely needed: evaluation
/// output is normally detached) is composed from tensor ops.
pub struct BatchNormEval {
    pub eps: f32,
    pub relu: bool,
    pub mean: Vec<f32>,
    pub var: Vec<f32>,
}

impl CustomOp3 for BatchNormEval {
    fn name(&self) -> &'static str {
        "clipmine-batch-norm-eval"
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
        let (_, c, hw) = dims(l1)?;
        let (x, gamma, beta) = (
            super::dispatch::host_f32("batch norm", s1, l1)?,
            super::dispatch::host_f32("batch norm", s2, l2)?,
            super::dispatch::host_f32("batch norm", s3, l3)?,
        );
        if gamma.len() != c || beta.len() != c || self.mean.len() != c || self.var.len() != c {
            candle_core::bail!(
                "batch norm: {c} channels, but parameters of {} and {}",
                gamma.len(),
                self.mean.len()
            )
        }
        let (scale, shift) = affine(gamma, beta, &self.mean, &self.var, self.eps);
        let y = apply_affine(x, c, hw, &scale, &shift, self.relu);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        y: &Tensor,
        gy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = x.dim(1)?;
        let per_channel = |v: &[f32]| Tensor::from_slice(v, (1, c, 1, 1), x.device());
        let gy = if self.relu {
            (gy * y.gt(0f32)?.to_dtype(gy.dtype())?)?
        } else {
            gy.clone()
        };
        let rstd: Vec<f32> = self.var.iter().map(|v| 1.0 / (v + self.eps).sqrt()).collect();
        let rstd = per_channel(&rstd)?;
        let xhat = x.broadcast_sub(&per_channel(&self.mean)?)?.broadcast_mul(&rstd)?;
        let gx = gy.broadcast_mul(&(gamma.reshape((1, c, 1, 1))? * &rstd)?)?;
        let ggamma = (&gy * xhat)?.sum((0, 2, 3))?;
        let gbeta = gy.sum((0, 2, 3))?;
        Ok((Some(gx), Some(ggamma), Some(gbeta)))
    }
}

/// running ← (1 − momentum)·running + momentum·scale·batch, in place: the running statistics'
/// update as one pass instead of four tensor ops and two copies per statistic.
pub struct RunningUpdate<'a> {
    pub momentum: f32,
    /// 1 for the mean; N/(N−1) turns the biased batch variance into PyTorch's unbiased one.
    pub scale: f32,
    pub batch: &'a [f32],
}

impl candle_core::InplaceOp1 for RunningUpdate<'_> {
    fn name(&self) -> &'static str {
        "clipmine-batch-norm-running"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let running = super::dispatch::host_f32_mut("batch norm", s, l)?;
        if running.len() != self.batch.len() {
            candle_core::bail!(
                "batch norm: running statistic of {} channels, batch of {}",
                running.len(),
                self.batch.len()
            )
        }
        let m = self.momentum;
        for (r, &b) in running.iter_mut().zip(self.batch) {
            *r = (1.0 - m) * *r + m * self.scale * b;
        }
        Ok(())
    }
}
