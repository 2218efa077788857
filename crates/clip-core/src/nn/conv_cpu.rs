//! A CPU convolution whose backward pass is as fast as its forward.
//!
//! candle 0.11 computes a convolution's input gradient with a naive transposed-convolution kernel
//! (CPU and CUDA alike); in a ResNet that made the backward pass ~90 % of a training step. Here all
//! three products — forward, input gradient, weight gradient — are one im2col (or col2im) and one
//! GEMM per image, with the batch split across threads; small feature maps (< 256 positions per
//! image) instead go through one GEMM for the whole batch, parallel inside.
//!
//! Layout: x (B, C, H, W), w (O, C, K, K), y (B, O, Ho, Wo), all contiguous f32.
//!
//! The weight gradient needs the same column matrices as the forward pass. When the input will
//! get a backward pass and the columns are small ([`KEEP_COLS_BYTES`]), forward keeps them for it
//! instead of the backward pass building them again: in the `tiny` model im2col was 13 % of a
//! training step. Larger ones (a ResNet50 stem at 224 px: 59 MB at batch 8) are rebuilt, so
//! memory stays below PyTorch's.

use std::mem::MaybeUninit;
use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

#[derive(Debug, Clone, Copy)]
struct Geometry {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    k: usize,
    stride: usize,
    pad: usize,
    ho: usize,
    wo: usize,
}

impl Geometry {
    fn new(x: &[usize], w: &[usize], stride: usize, pad: usize) -> Result<Self> {
        let (&[b, c, h, wd], &[o, cw, k, k2]) = (x, w) else {
            candle_core::bail!("conv2d expects 4-d input and kernel, got {x:?} and {w:?}")
        };
        if c != cw || k != k2 {
            candle_core::bail!("conv2d: input {x:?} does not fit kernel {w:?}")
        }
        if h + 2 * pad < k || wd + 2 * pad < k {
            candle_core::bail!("conv2d: input {h}×{wd} (padding {pad}) is smaller than the {k}×{k} kernel")
        }
        let ho = (h + 2 * pad - k) / stride + 1;
        let wo = (wd + 2 * pad - k) / stride + 1;
        Ok(Self {
            b,
            c,
            h,
            w: wd,
            o,
            k,
            stride,
            pad,
            ho,
            wo,
        })
    }
    fn ckk(&self) -> usize {
        self.c * self.k * self.k
    }
    fn n(&self) -> usize {
        self.ho * self.wo
    }
    /// 1×1, stride 1, no padding: the image already is its column matrix.
    fn is_pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.pad == 0
    }
}

/// Output columns `oj` whose input column `oj·stride + kj − pad` lies inside [0, w): a half-open
/// range, so the loops below copy without a bounds test per element.
fn valid_cols(g: &Geometry, kj: usize) -> (usize, usize) {
    let lo = g.pad.saturating_sub(kj).div_ceil(g.stride);
    // Largest oj with oj·stride + kj − pad ≤ w − 1.
    let hi = if g.w + g.pad > kj {
        ((g.w + g.pad - kj - 1) / g.stride + 1).min(g.wo)
    } else {
        0
    };
    (lo.min(hi), hi)
}

/// cols (C·K·K, Ho·Wo) of one image (C, H, W).
fn im2col(g: &Geometry, x: &[f32], cols: &mut [f32]) {
    let kkn = g.k * g.k * g.n();
    for (c, rows) in cols.chunks_mut(kkn).enumerate() {
        im2col_channel(g, x, c, rows, g.n(), 0);
    }
}

/// The K·K column rows of channel `c` of one image (C, H, W): row r is written to
/// `rows[r·stride + offset..][..Ho·Wo]`, so one image's columns can go straight into a
/// whole-batch matrix (stride B·Ho·Wo, offset b·Ho·Wo) without a copy in between.
fn im2col_channel(g: &Geometry, x: &[f32], c: usize, rows: &mut [f32], stride: usize, offset: usize) {
    if g.stride == 2 {
        return im2col_channel_stride2(g, x, c, rows, stride, offset);
    }
    let n = g.n();
    for ki in 0..g.k {
        for kj in 0..g.k {
            let row = &mut rows[(ki * g.k + kj) * stride + offset..][..n];
            let (lo, hi) = valid_cols(g, kj);
            for oi in 0..g.ho {
                let out = &mut row[oi * g.wo..][..g.wo];
                let i = (oi * g.stride + ki) as isize - g.pad as isize;
                if i < 0 || i as usize >= g.h {
                    out.fill(0.0);
                    continue;
                }
                let src = &x[(c * g.h + i as usize) * g.w..][..g.w];
                out[..lo].fill(0.0);
                out[hi..].fill(0.0);
                let j0 = lo * g.stride + kj - g.pad;
                if g.stride == 1 {
                    out[lo..hi].copy_from_slice(&src[j0..j0 + (hi - lo)]);
                } else {
                    for (o, v) in out[lo..hi].iter_mut().zip(src[j0..].iter().step_by(g.stride)) {
                        *o = *v;
                    }
                }
            }
        }
    }
}

/// [`im2col_channel`] for stride 2 (the stems' 7×7 convolutions and every downsampling 3×3):
/// each input row is split once into its even and odd columns, and every kernel column then
/// copies a contiguous run from one of them, instead of K strided gathers per row (the stem's
/// im2col was 8 % of a `tiny` training step).
fn im2col_channel_stride2(g: &Geometry, x: &[f32], c: usize, rows: &mut [f32], stride: usize, offset: usize) {
    let half = g.w.div_ceil(2);
    let (mut even, mut odd) = (vec![0f32; half], vec![0f32; half]);
    for ki in 0..g.k {
        for oi in 0..g.ho {
            let i = (oi * 2 + ki) as isize - g.pad as isize;
            let inside = i >= 0 && (i as usize) < g.h;
            if inside {
                let src = &x[(c * g.h + i as usize) * g.w..][..g.w];
                for (j, &v) in src.iter().enumerate() {
                    if j.is_multiple_of(2) {
                        even[j / 2] = v;
                    } else {
                        odd[j / 2] = v;
                    }
                }
            }
            for kj in 0..g.k {
                let out = &mut rows[(ki * g.k + kj) * stride + offset + oi * g.wo..][..g.wo];
                if !inside {
                    out.fill(0.0);
                    continue;
                }
                let (lo, hi) = valid_cols(g, kj);
                out[..lo].fill(0.0);
                out[hi..].fill(0.0);
                if lo < hi {
                    // Input column 2·oj + kj − pad: parity and offset fixed for this kj.
                    let j0 = 2 * lo + kj - g.pad;
                    let part = if j0.is_multiple_of(2) { &even } else { &odd };
                    out[lo..hi].copy_from_slice(&part[j0 / 2..j0 / 2 + (hi - lo)]);
                }
            }
        }
    }
}

/// Adds cols (C·K·K, Ho·Wo) into one image gradient (C, H, W), which starts zeroed: the adjoint
/// of `im2col`.
fn col2im(g: &Geometry, cols: &[f32], x: &mut [f32]) {
    let n = g.n();
    for c in 0..g.c {
        for ki in 0..g.k {
            for kj in 0..g.k {
                let row = &cols[((c * g.k + ki) * g.k + kj) * n..][..n];
                let (lo, hi) = valid_cols(g, kj);
                if lo >= hi {
                    continue;
                }
                let j0 = lo * g.stride + kj - g.pad;
                for oi in 0..g.ho {
                    let i = (oi * g.stride + ki) as isize - g.pad as isize;
                    if i < 0 || i as usize >= g.h {
                        continue;
                    }
                    let dst = &mut x[(c * g.h + i as usize) * g.w..][..g.w];
                    let src = &row[oi * g.wo + lo..oi * g.wo + hi];
                    if g.stride == 1 {
                        for (d, v) in dst[j0..j0 + (hi - lo)].iter_mut().zip(src) {
                            *d += *v;
                        }
                    } else {
                        for (d, v) in dst[j0..].iter_mut().step_by(g.stride).zip(src) {
                            *d += *v;
                        }
                    }
                }
            }
        }
    }
}

/// Space for `len` values that a GEMM without accumulation will write in full: zero-filling it
/// first was most of the `memset` in a training step's profile (the allocator's reused memory is
/// not zero).
pub(super) fn uninit(len: usize) -> Vec<MaybeUninit<f32>> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: `MaybeUninit` values need no initialisation.
    unsafe { v.set_len(len) };
    v
}

/// The values of a buffer from [`uninit`].
///
/// # Safety
/// Every element of `v` has been written.
pub(super) unsafe fn assume_init(v: Vec<MaybeUninit<f32>>) -> Vec<f32> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: same allocation, length and capacity; `MaybeUninit<f32>` has f32's layout, and the
    // caller guarantees the values are initialised.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<f32>(), v.len(), v.capacity()) }
}

/// An initialised buffer seen as one a GEMM may write (it never writes uninitialised values).
pub(super) fn as_uninit(s: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: same layout; the GEMM only stores initialised f32 values through it.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast(), s.len()) }
}

/// dst (m×n) = [dst +] lhs (m×k) · rhs (k×n), each given by (row stride, column stride). Without
/// `accumulate` dst is only written, so it may be uninitialised; with it dst must hold values.
#[allow(clippy::too_many_arguments)]
pub(super) fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [MaybeUninit<f32>],
    accumulate: bool,
    lhs: &[f32],
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: &[f32],
    rhs_rs: usize,
    rhs_cs: usize,
    par: gemm::Parallelism,
) {
    debug_assert!(dst.len() >= m * n);
    if super::precision::bf16_gemm(m, n, k) {
        // Mixed precision (`--precision bf16`): bf16 operands, fp32 accumulation, on AMX.
        // SAFETY: as below; `set_precision` allows bf16 only where AMX is usable.
        unsafe {
            super::bf16::gemm_bf16_into(
                m,
                n,
                k,
                dst.as_mut_ptr().cast::<f32>(),
                n,
                accumulate,
                1.0,
                super::bf16::MatRef::new(lhs.as_ptr(), lhs_rs, lhs_cs),
                super::bf16::MatRef::new(rhs.as_ptr(), rhs_rs, rhs_cs),
                !matches!(par, gemm::Parallelism::None),
                true,
            )
        };
        return;
    }
    // SAFETY: the slices cover every index the strides reach (checked by the callers' shapes).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr().cast::<f32>(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// Per-image GEMMs run on one thread each (the batch is split across threads instead).
const SERIAL: gemm::Parallelism = gemm::Parallelism::None;

/// Below this many output positions per image the per-image GEMMs are too thin to run well (the
/// 2×2 maps of `tiny`'s last stage give 4 columns): the whole batch then goes through one GEMM of
/// B·Ho·Wo columns, parallel inside.
const BATCHED_BELOW: usize = 256;

fn batched(g: &Geometry) -> bool {
    g.n() < BATCHED_BELOW && g.b > 1
}

pub(super) fn parallel() -> gemm::Parallelism {
    gemm::Parallelism::Rayon(rayon::current_num_threads().max(1))
}

/// The column matrices of the whole batch side by side, (C·K·K, B·Ho·Wo): image b's columns at
/// [b·N, (b+1)·N).
fn im2col_batch(g: &Geometry, x: &[f32]) -> Vec<f32> {
    let (ckk, n, bn) = (g.ckk(), g.n(), g.b * g.n());
    let (img, kk) = (g.c * g.h * g.w, g.k * g.k);
    let mut all = vec![0f32; ckk * bn];
    // A channel's K·K rows per work item; each image writes its band of every row.
    all.par_chunks_mut(kk * bn).enumerate().for_each(|(c, rows)| {
        for b in 0..g.b {
            let xb = &x[b * img..][..img];
            if g.is_pointwise() {
                rows[b * n..][..n].copy_from_slice(&xb[c * n..][..n]);
            } else {
                im2col_channel(g, xb, c, rows, bn, b * n);
            }
        }
    });
    all
}

/// (B, R, N) → (R, B·N), and back with `unbatch`.
fn batch_columns(t: &[f32], b: usize, r: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; t.len()];
    for bi in 0..b {
        for ri in 0..r {
            out[ri * b * n + bi * n..][..n].copy_from_slice(&t[(bi * r + ri) * n..][..n]);
        }
    }
    out
}

fn unbatch_columns(t: &[f32], b: usize, r: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; t.len()];
    for bi in 0..b {
        for ri in 0..r {
            out[(bi * r + ri) * n..][..n].copy_from_slice(&t[ri * b * n + bi * n..][..n]);
        }
    }
    out
}

/// Column matrices bigger than this are not kept from forward for the weight gradient.
pub const KEEP_COLS_BYTES: usize = 16 << 20;

/// Whether forward keeps the columns of `g` (asked to, and small enough to be worth it).
fn keeps_cols(g: &Geometry, keep: bool) -> bool {
    keep && !g.is_pointwise() && g.ckk() * g.n() * g.b * 4 <= KEEP_COLS_BYTES
}

/// y, and the columns when [`keeps_cols`]: laid out as `im2col_batch` when [`batched`], else
/// image after image.
fn forward_batched(g: &Geometry, x: &[f32], w: &[f32], keep: bool) -> (Vec<f32>, Option<Vec<f32>>) {
    let (ckk, n, o, bn) = (g.ckk(), g.n(), g.o, g.b * g.n());
    let cols = im2col_batch(g, x);
    let mut yt = uninit(o * bn);
    matmul(o, bn, ckk, &mut yt, false, w, ckk, 1, &cols, bn, 1, parallel());
    // SAFETY: the GEMM wrote all of yt.
    let yt = unsafe { assume_init(yt) };
    (unbatch_columns(&yt, g.b, o, n), keeps_cols(g, keep).then_some(cols))
}

fn grad_input_batched(g: &Geometry, gy: &[f32], w: &[f32]) -> Vec<f32> {
    let (ckk, n, o, bn) = (g.ckk(), g.n(), g.o, g.b * g.n());
    let gyt = batch_columns(gy, g.b, o, n);
    let mut cols = uninit(ckk * bn);
    matmul(ckk, bn, o, &mut cols, false, w, 1, ckk, &gyt, bn, 1, parallel());
    // SAFETY: the GEMM wrote all of cols.
    let cols = unsafe { assume_init(cols) };
    if g.is_pointwise() {
        return unbatch_columns(&cols, g.b, ckk, n);
    }
    let img = g.c * g.h * g.w;
    let mut gx = vec![0f32; g.b * img];
    let mut tmp = vec![0f32; ckk * n];
    for b in 0..g.b {
        for r in 0..ckk {
            tmp[r * n..][..n].copy_from_slice(&cols[r * bn + b * n..][..n]);
        }
        col2im(g, &tmp, &mut gx[b * img..][..img]);
    }
    gx
}

fn grad_weight_batched(g: &Geometry, x: &[f32], gy: &[f32], kept: Option<&[f32]>) -> Vec<f32> {
    let (ckk, n, o, bn) = (g.ckk(), g.n(), g.o, g.b * g.n());
    let built;
    let cols: &[f32] = match kept {
        Some(c) => c,
        None => {
            built = im2col_batch(g, x);
            &built
        }
    };
    let gyt = batch_columns(gy, g.b, o, n);
    let mut gw = uninit(o * ckk);
    // gw (O, CKK) = gy (O, B·N) · colsᵀ (B·N, CKK)
    matmul(o, ckk, bn, &mut gw, false, &gyt, bn, 1, cols, 1, bn, parallel());
    // SAFETY: the GEMM wrote all of gw.
    unsafe { assume_init(gw) }
}

/// Images per work item: enough to keep both GEMM and threads busy.
fn chunks(b: usize) -> usize {
    b.div_ceil(rayon::current_num_threads().max(1)).max(1)
}

/// y, and the columns when [`keeps_cols`] (see [`forward_batched`]).
fn forward(g: &Geometry, x: &[f32], w: &[f32], keep: bool) -> (Vec<f32>, Option<Vec<f32>>) {
    if batched(g) {
        return forward_batched(g, x, w, keep);
    }
    let (ckk, n, o) = (g.ckk(), g.n(), g.o);
    let mut y = uninit(g.b * o * n);
    let per = chunks(g.b);
    let keep = keeps_cols(g, keep);
    // Kept: every image's columns, image after image; else one buffer per thread.
    let mut kept = if keep { vec![0f32; g.b * ckk * n] } else { vec![] };
    let kept_parts: Vec<Option<&mut [f32]>> = if keep {
        kept.chunks_mut(per * ckk * n).map(Some).collect()
    } else {
        (0..g.b.div_ceil(per)).map(|_| None).collect()
    };
    y.par_chunks_mut(per * o * n)
        .zip(kept_parts.into_par_iter())
        .enumerate()
        .for_each(|(ci, (ys, mut kept))| {
            let mut own = if g.is_pointwise() || kept.is_some() {
                vec![]
            } else {
                vec![0f32; ckk * n]
            };
            for (bi, yb) in ys.chunks_mut(o * n).enumerate() {
                let b = ci * per + bi;
                let xb = &x[b * g.c * g.h * g.w..][..g.c * g.h * g.w];
                let colsb: &[f32] = if g.is_pointwise() {
                    xb
                } else {
                    let buf: &mut [f32] = match kept.as_deref_mut() {
                        Some(k) => &mut k[bi * ckk * n..][..ckk * n],
                        None => &mut own,
                    };
                    im2col(g, xb, buf);
                    buf
                };
                matmul(o, n, ckk, yb, false, w, ckk, 1, colsb, n, 1, SERIAL);
            }
        });
    // SAFETY: the chunks cover y, and each image's GEMM wrote its (O, N) block in full.
    (unsafe { assume_init(y) }, keep.then_some(kept))
}

fn grad_input(g: &Geometry, gy: &[f32], w: &[f32]) -> Vec<f32> {
    if batched(g) {
        return grad_input_batched(g, gy, w);
    }
    let (ckk, n, o) = (g.ckk(), g.n(), g.o);
    let img = g.c * g.h * g.w;
    let mut gx = vec![0f32; g.b * img];
    let per = chunks(g.b);
    // In bf16 every image's GEMM packs its A operand, Wᵀ: transposed once here, it packs as
    // contiguous rows (vectorised) rather than through the transposing path, once per image.
    let wt = super::precision::bf16_gemm(ckk, n, o).then(|| super::linear_cpu::transpose(o, ckk, w));
    let (w, w_rs, w_cs) = match &wt {
        Some(t) => (&t[..], o, 1),
        None => (w, 1, ckk),
    };
    gx.par_chunks_mut(per * img).enumerate().for_each(|(ci, gxs)| {
        let mut cols = if g.is_pointwise() { vec![] } else { uninit(ckk * n) };
        for (bi, gxb) in gxs.chunks_mut(img).enumerate() {
            let b = ci * per + bi;
            let gyb = &gy[b * o * n..][..o * n];
            if g.is_pointwise() {
                // gx_b (C, N) = Wᵀ (C, O) · gy_b (O, N)
                matmul(ckk, n, o, as_uninit(gxb), false, w, w_rs, w_cs, gyb, n, 1, SERIAL);
            } else {
                matmul(ckk, n, o, &mut cols, false, w, w_rs, w_cs, gyb, n, 1, SERIAL);
                // SAFETY: the GEMM just wrote all of cols (it is rewritten for every image).
                let written = unsafe { std::slice::from_raw_parts(cols.as_ptr().cast::<f32>(), cols.len()) };
                col2im(g, written, gxb);
            }
        }
    });
    gx
}

/// `kept`: the columns forward kept, laid out as it left them.
fn grad_weight(g: &Geometry, x: &[f32], gy: &[f32], kept: Option<&[f32]>) -> Vec<f32> {
    if batched(g) {
        return grad_weight_batched(g, x, gy, kept);
    }
    let (ckk, n, o) = (g.ckk(), g.n(), g.o);
    let img = g.c * g.h * g.w;
    let per = chunks(g.b);
    let partials: Vec<Vec<f32>> = (0..g.b.div_ceil(per))
        .into_par_iter()
        .map(|ci| {
            let mut gw = vec![0f32; o * ckk];
            let mut cols = if g.is_pointwise() || kept.is_some() {
                vec![]
            } else {
                vec![0f32; ckk * n]
            };
            for b in ci * per..((ci + 1) * per).min(g.b) {
                let xb = &x[b * img..][..img];
                let colsb: &[f32] = match kept {
                    _ if g.is_pointwise() => xb,
                    Some(k) => &k[b * ckk * n..][..ckk * n],
                    None => {
                        im2col(g, xb, &mut cols);
                        &cols
                    }
                };
                // gw (O, CKK) += gy_b (O, N) · cols_bᵀ (N, CKK)
                matmul(
                    o,
                    ckk,
                    n,
                    as_uninit(&mut gw),
                    true,
                    &gy[b * o * n..][..o * n],
                    n,
                    1,
                    colsb,
                    1,
                    n,
                    SERIAL,
                );
            }
            gw
        })
        .collect();
    let mut gw = vec![0f32; o * ckk];
    for p in partials {
        for (a, b) in gw.iter_mut().zip(p) {
            *a += b;
        }
    }
    gw
}

/// y = conv2d(x, w), differentiable in both arguments.
struct Conv2dOp {
    stride: usize,
    pad: usize,
    /// Whether a backward pass will follow (either input tracks gradients).
    keep: bool,
    /// The columns forward kept for the weight gradient (taken by the backward pass).
    cols: Mutex<Option<Vec<f32>>>,
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "clipmine-conv2d"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(l1.dims(), l2.dims(), self.stride, self.pad)?;
        let (y, cols) = forward(
            &g,
            super::dispatch::host_f32("conv2d", s1, l1)?,
            super::dispatch::host_f32("conv2d", s2, l2)?,
            self.keep,
        );
        *self.cols.lock().unwrap_or_else(|e| e.into_inner()) = cols;
        Ok((CpuStorage::F32(y), Shape::from((g.b, g.o, g.ho, g.wo))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, gy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let gy = gy.contiguous()?;
        // The images entering the first convolution need no gradient: skip its GEMM and col2im.
        let gx = if x.track_op() {
            Some(gy.apply_op2_no_bwd(
                w,
                &GradInput {
                    stride: self.stride,
                    pad: self.pad,
                    x_dims: x.dims().to_vec(),
                },
            )?)
        } else {
            None
        };
        let gw = x.apply_op2_no_bwd(
            &gy,
            &GradWeight {
                stride: self.stride,
                pad: self.pad,
                w_dims: w.dims().to_vec(),
                cols: self.cols.lock().unwrap_or_else(|e| e.into_inner()).take(),
            },
        )?;
        Ok((gx, Some(gw)))
    }
}

struct GradInput {
    stride: usize,
    pad: usize,
    x_dims: Vec<usize>,
}

impl CustomOp2 for GradInput {
    fn name(&self) -> &'static str {
        "clipmine-conv2d-grad-input"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(&self.x_dims, l2.dims(), self.stride, self.pad)?;
        if l1.dims() != [g.b, g.o, g.ho, g.wo] {
            candle_core::bail!(
                "conv2d backward: gradient {:?} does not match output {:?}",
                l1.dims(),
                (g.b, g.o, g.ho, g.wo)
            )
        }
        let gx = grad_input(
            &g,
            super::dispatch::host_f32("conv2d", s1, l1)?,
            super::dispatch::host_f32("conv2d", s2, l2)?,
        );
        Ok((CpuStorage::F32(gx), Shape::from(self.x_dims.clone())))
    }
}

struct GradWeight {
    stride: usize,
    pad: usize,
    w_dims: Vec<usize>,
    /// Forward's columns, when it kept them.
    cols: Option<Vec<f32>>,
}

impl CustomOp2 for GradWeight {
    fn name(&self) -> &'static str {
        "clipmine-conv2d-grad-weight"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(l1.dims(), &self.w_dims, self.stride, self.pad)?;
        if l2.dims() != [g.b, g.o, g.ho, g.wo] {
            candle_core::bail!(
                "conv2d backward: gradient {:?} does not match output {:?}",
                l2.dims(),
                (g.b, g.o, g.ho, g.wo)
            )
        }
        let gw = grad_weight(
            &g,
            super::dispatch::host_f32("conv2d", s1, l1)?,
            super::dispatch::host_f32("conv2d", s2, l2)?,
            self.cols.as_deref(),
        );
        Ok((CpuStorage::F32(gw), Shape::from(self.w_dims.clone())))
    }
}

/// Convolution of f32 tensors on the CPU with this module's forward and backward kernels.
pub fn conv2d_cpu(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let op = Conv2dOp {
        stride,
        pad: padding,
        keep: x.track_op() || w.track_op(),
        cols: Mutex::new(None),
    };
    x.contiguous()?.apply_op2(&w.contiguous()?, op)
}
