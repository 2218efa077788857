//! The ResNet stem's max-pool (3×3, stride 2, padding 1) on the CPU, with its backward.
//!
//! Composed from shifted views, it is ~20 tensor ops each way over the stem's largest activation.
//! Here the forward is one pass that also notes each window's arg-max (the first maximum in scan
//! order, as PyTorch picks), and the backward routes each gradient there, one (B, C) plane per
//! work item. When forward runs without a backward to follow, nothing is noted.
//!
//! Layout: x (B, C, H, W) contiguous f32; y (B, C, ⌊(H−1)/2⌋+1, ⌊(W−1)/2⌋+1).

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::dispatch::host_f32;

fn dims(l: &Layout) -> Result<(usize, usize, usize, usize)> {
    let &[b, c, h, w] = l.dims() else {
        candle_core::bail!("max-pool expects (B, C, H, W), got {:?}", l.dims())
    };
    if h == 0 || w == 0 {
        candle_core::bail!("max-pool: empty {h}×{w} input")
    }
    Ok((b, c, h, w))
}

fn out_size(n: usize) -> usize {
    (n - 1) / 2 + 1
}

/// Flat index within the plane of window (i, j)'s first maximum.
fn argmax(x: &[f32], h: usize, w: usize, i: usize, j: usize) -> usize {
    let (r0, c0) = ((2 * i).saturating_sub(1), (2 * j).saturating_sub(1));
    let (r1, c1) = ((2 * i + 2).min(h), (2 * j + 2).min(w));
    if r1 - r0 == 3 && c1 - c0 == 3 {
        // Inside the plane: a fixed 3×3 scan the compiler unrolls.
        let base = r0 * w + c0;
        let win = &x[base..base + 2 * w + 3];
        let (mut best, mut top) = (0, win[0]);
        for k in [0, 1, 2, w, w + 1, w + 2, 2 * w, 2 * w + 1, 2 * w + 2] {
            if win[k] > top {
                (best, top) = (k, win[k]);
            }
        }
        return base + best;
    }
    let mut best = r0 * w + c0;
    for r in r0..r1 {
        for c in c0..c1 {
            if x[r * w + c] > x[best] {
                best = r * w + c;
            }
        }
    }
    best
}

/// The window maxima alone (no backward to follow), separably: each row's maxima over column
/// triples, then the maxima of row triples of those, with no index kept.
fn max_values(x: &[f32], h: usize, w: usize, y: &mut [f32]) {
    let (ho, wo) = (out_size(h), out_size(w));
    let mut rows = vec![0f32; h * wo];
    for (src, dst) in x.chunks_exact(w).zip(rows.chunks_exact_mut(wo)) {
        for (j, d) in dst.iter_mut().enumerate() {
            let (c0, c1) = ((2 * j).saturating_sub(1), (2 * j + 2).min(w));
            *d = src[c0..c1].iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        }
    }
    for (i, out) in y.chunks_exact_mut(wo).enumerate().take(ho) {
        let (r0, r1) = ((2 * i).saturating_sub(1), (2 * i + 2).min(h));
        out.copy_from_slice(&rows[r0 * wo..][..wo]);
        for r in r0 + 1..r1 {
            for (o, &v) in out.iter_mut().zip(&rows[r * wo..][..wo]) {
                *o = o.max(v);
            }
        }
    }
}

/// The pool; `argmax`, when it is `Some`, receives each output's source index within its plane
/// for the backward pass.
pub struct MaxPool3x3S2 {
    pub argmax: Option<Mutex<Vec<u32>>>,
}

impl CustomOp1 for MaxPool3x3S2 {
    fn name(&self) -> &'static str {
        "clipmine-max-pool"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = host_f32("max-pool", s, l)?;
        let (b, c, h, w) = dims(l)?;
        let (ho, wo) = (out_size(h), out_size(w));
        if h * w > u32::MAX as usize {
            candle_core::bail!("max-pool: a {h}×{w} plane is too large")
        }
        let mut y = vec![0f32; b * c * ho * wo];
        let mut at = vec![0u32; if self.argmax.is_some() { y.len() } else { 0 }];
        let pool = |(yp, xp): (&mut [f32], &[f32]), ap: &mut [u32]| {
            for i in 0..ho {
                for j in 0..wo {
                    let k = argmax(xp, h, w, i, j);
                    yp[i * wo + j] = xp[k];
                    ap[i * wo + j] = k as u32;
                }
            }
        };
        let planes = y.par_chunks_mut(ho * wo).zip(x.par_chunks(h * w));
        match &self.argmax {
            Some(slot) => {
                planes.zip(at.par_chunks_mut(ho * wo)).for_each(|(p, a)| pool(p, a));
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = at;
            }
            None => planes.for_each(|(yp, xp)| max_values(xp, h, w, yp)),
        }
        Ok((CpuStorage::F32(y), Shape::from((b, c, ho, wo))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, gy: &Tensor) -> Result<Option<Tensor>> {
        let argmax = match &self.argmax {
            Some(slot) => std::mem::take(&mut *slot.lock().unwrap_or_else(|e| e.into_inner())),
            None => vec![],
        };
        Ok(Some(x.apply_op2_no_bwd(&gy.contiguous()?, &MaxPoolGrad { argmax })?))
    }
}

/// dx: each output's gradient added at its window's arg-max (as forward noted it, or found
/// again when it did not).
struct MaxPoolGrad {
    argmax: Vec<u32>,
}

impl CustomOp2 for MaxPoolGrad {
    fn name(&self) -> &'static str {
        "clipmine-max-pool-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, gy) = (host_f32("max-pool", s1, l1)?, host_f32("max-pool", s2, l2)?);
        let (b, c, h, w) = dims(l1)?;
        let (ho, wo) = (out_size(h), out_size(w));
        if l2.dims() != [b, c, ho, wo] {
            candle_core::bail!(
                "max-pool backward: gradient {:?} does not match output {:?}",
                l2.dims(),
                (b, c, ho, wo)
            )
        }
        let mut gx = vec![0f32; x.len()];
        let planes = gx
            .par_chunks_mut(h * w)
            .zip(x.par_chunks(h * w).zip(gy.par_chunks(ho * wo)));
        if self.argmax.len() == gy.len() {
            planes
                .zip(self.argmax.par_chunks(ho * wo))
                .for_each(|((gp, (_, gyp)), ap)| {
                    for (&k, &g) in ap.iter().zip(gyp) {
                        gp[k as usize] += g;
                    }
                });
        } else {
            planes.for_each(|(gp, (xp, gyp))| {
                for i in 0..ho {
                    for j in 0..wo {
                        gp[argmax(xp, h, w, i, j)] += gyp[i * wo + j];
                    }
                }
            });
        }
        Ok((CpuStorage::F32(gx), l1.shape().clone()))
    }
}
