//! bf16 matrix multiplication with fp32 accumulation, on Intel AMX where the processor has it
//! (issue #33, first step: the kernel only; no layer calls it yet).
//!
//! Why: on the Xeons this project runs on, a bf16 GEMM on AMX (`TDPBF16PS`, one 16×16×32 tile
//! product per instruction) runs about 6× faster than the best fp32 GEMM (torch `mm` 2048²:
//! 2,042 GFLOP/s bf16 on AMX against 335 GFLOP/s fp32, issue #33), and PyTorch users get that with
//! autocast. Mixed precision as autocast means it keeps fp32 everywhere except the GEMM
//! operands: master weights, optimizer state, the loss, norms, softmax and reductions stay fp32,
//! and a GEMM takes bf16 operands and accumulates and returns fp32. [`gemm_bf16`] is that GEMM:
//! fp32 in, each operand rounded to bf16 (round to nearest even) as it is packed, fp32 out.
//!
//! Dispatch ([`bf16_hardware`]): AMX needs the CPUID bits *and* the Linux permission for the tile
//! data (`arch_prctl(ARCH_REQ_XCOMP_PERM, 18)`, requested once per process); without the
//! permission the first tile instruction kills the process with SIGILL. AMX tile intrinsics are
//! nightly-only in Rust (rust#126622), so the micro-kernel is stable `asm!`. Everywhere else
//! [`gemm_bf16`] computes the same product (the bf16-rounded operands, fp32 accumulation) with the
//! fp32 `gemm` crate, so results agree across machines to within fp32 summation order.
//! `/work/shared/reference/amx-bf16.md` has the checked facts this module relies on.

use candle_core::{bail, Result};

mod detect;
mod operands;
mod round;

pub(crate) use detect::amx_disabled_by_env;
use detect::amx_usable;
pub use detect::{bf16_hardware, Bf16Support, NO_AMX_ENV};
use operands::Dst;
pub(crate) use operands::MatRef;
pub use round::{bf16_bits_to_f32, f32_to_bf16_bits, round_bf16};

/// C = bf16(A) · bf16(B) with fp32 accumulation: A is m×k, B is k×n, C is m×n, all row-major
/// f32; each operand element is rounded to bf16 (nearest even, [`f32_to_bf16_bits`]) and every
/// product is summed in fp32 (the product of two bf16 values is exact in fp32).
///
/// On AMX ([`Bf16Support::Amx`]) the operands are packed to bf16 (B in the VNNI-2 pair layout)
/// and multiplied by a 32×32-output tile micro-kernel (four 16×16 f32 C tiles, two A tiles of
/// 16×32 bf16, two B tiles of 16 pair-rows × 16 pairs), C accumulated in the tiles over K
/// blocks of 256, (row panel of 32, column group) tasks in parallel on rayon. Elsewhere the
/// rounded operands go through the fp32 `gemm` crate: the same numbers, slower than AMX. The two
/// differ only in the order of the fp32 sums (measured ≤ 5e-7·Σ|aᵢbᵢ| per element against an
/// f64 product of the rounded inputs, far below the ~2⁻⁸ relative error of rounding the inputs
/// to bf16) and in subnormal products, which AMX flushes to zero (the fp32 path follows MXCSR:
/// no flushing).
pub fn gemm_bf16(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Result<Vec<f32>> {
    gemm_bf16_on(a, b, m, k, n, bf16_hardware() == Bf16Support::Amx)
}

/// [`gemm_bf16`] on the chosen path (tests run both): `amx` requires AMX and its permission (an
/// error otherwise); `CLIPMINE_NO_AMX` is not consulted here.
pub(crate) fn gemm_bf16_on(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, amx: bool) -> Result<Vec<f32>> {
    let (Some(mk), Some(kn), Some(mn)) = (m.checked_mul(k), k.checked_mul(n), m.checked_mul(n)) else {
        bail!("gemm_bf16: {m}×{k} · {k}×{n} overflows usize")
    };
    if a.len() != mk || b.len() != kn {
        bail!(
            "gemm_bf16: A has {} elements for {m}×{k}, B has {} for {k}×{n}",
            a.len(),
            b.len()
        )
    }
    if amx && !amx_usable() {
        bail!("gemm_bf16: AMX requested on a CPU or OS without AMX bf16 tiles")
    }
    let mut c = vec![0.0f32; mn];
    // SAFETY: A is m×k and B k×n row-major (lengths checked above), C m×n, owned here.
    unsafe {
        gemm_bf16_into(
            m,
            n,
            k,
            c.as_mut_ptr(),
            n,
            false,
            1.0,
            MatRef::new(a.as_ptr(), k, 1),
            MatRef::new(b.as_ptr(), n, 1),
            true,
            amx,
        )
    };
    Ok(c)
}

/// Whether an m×k · k×n GEMM runs faster in bf16 on AMX than in fp32: at least 2²¹
/// multiply-adds and 32 rows and columns. Below that, packing the operands and configuring the
/// tiles cost more than the tiles save (measured, 2-core Xeon, `timing_layer_shapes`: attention
/// scores 50×64×50 0.40× fp32's speed, 77×64×77 0.61×, a 64×128×128 linear 0.50×, an 8-row
/// projection 8×2048×256 0.69× as it pads to 32 rows; 197×197×64 1.26×, ViT-B/32's linear layers
/// 2.0–2.4×), so those GEMMs stay fp32 under `--precision bf16` — more accurate, and under 2 %
/// of a CLIP step's multiply-adds.
pub(crate) fn bf16_pays(m: usize, n: usize, k: usize) -> bool {
    m >= 32 && n >= 32 && m.saturating_mul(n).saturating_mul(k) >= 1 << 21
}

/// dst (m×n at `dst`, row stride `dst_rs`, column stride 1) = alpha · bf16(A) · bf16(B)
/// [+ dst when `accumulate`], A m×k and B k×n read in place through their strides: the one bf16
/// GEMM every layer calls under `--precision bf16` (through `conv_cpu::matmul` and the attention
/// kernel). `parallel` spreads (row panel, column group) tasks over rayon; without it the call
/// runs on the calling thread (the callers that already split work over threads). Without
/// `accumulate`, dst is only written (it may be uninitialised); k = 0 gives alpha · 0 [+ dst].
///
/// # Safety
/// `a` must be readable at every (i < m, p < k), `b` at every (p < k, j < n), `dst` readable (when
/// accumulating) and writable at every (i < m, j < n) through `dst_rs`, no other thread touching
/// it meanwhile; `amx` only where AMX is usable (`amx_usable`).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_bf16_into(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    alpha: f32,
    a: MatRef,
    b: MatRef,
    parallel: bool,
    amx: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                // SAFETY: (i, j) is within dst (the caller's contract).
                unsafe {
                    let d = dst.add(i * dst_rs + j);
                    *d = if accumulate { *d } else { 0.0 };
                }
            }
        }
        return;
    }
    if amx {
        // SAFETY: the caller's contract, passed on.
        unsafe { amx::gemm_into(m, n, k, Dst(dst), dst_rs, accumulate, alpha, a, b, parallel, amx::KC) }
    } else {
        // SAFETY: as above.
        unsafe { gemm_fallback(m, n, k, dst, dst_rs, accumulate, alpha, a, b, parallel) }
    }
}

/// A k×n GEMM operand B packed once for many products (an inference scope's weight: see
/// `nn::pool`): bf16, in the AMX kernel's VNNI-2 panels.
#[derive(Debug)]
pub(crate) struct PackedB {
    k: usize,
    n: usize,
    panels: Vec<u32>,
}

impl PackedB {
    /// B (k×n through its strides) packed; `None` where AMX is not usable.
    ///
    /// # Safety
    /// `b` readable at every (p < k, j < n).
    pub(crate) unsafe fn new(b: MatRef, k: usize, n: usize) -> Option<Self> {
        if !amx_usable() || k == 0 || n == 0 {
            return None;
        }
        let mut panels = vec![0u32; k.div_ceil(32) * 16 * n.div_ceil(32) * 32];
        // SAFETY: the caller's contract.
        unsafe { amx::pack_b(&mut panels, b, k, n, true) };
        Some(Self { k, n, panels })
    }

    /// (k, n) of the B it packs.
    pub(crate) fn shape(&self) -> (usize, usize) {
        (self.k, self.n)
    }
}

/// [`gemm_bf16_into`] on AMX with B packed already: dst (m×n) = alpha · bf16(A) · B [+ dst].
///
/// # Safety
/// As [`gemm_bf16_into`] for A and dst; `b` made by [`PackedB::new`] (so AMX is usable).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_bf16_packed(
    m: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    alpha: f32,
    a: MatRef,
    b: &PackedB,
    parallel: bool,
) {
    if m == 0 {
        return;
    }
    // SAFETY: the caller's contract; `b.panels` is B packed for (b.k, b.n).
    unsafe {
        amx::gemm_packed(
            m,
            b.n,
            b.k,
            Dst(dst),
            dst_rs,
            accumulate,
            alpha,
            a,
            &b.panels,
            parallel,
            amx::KC,
        )
    }
}

/// The fallback: round both operands to bf16 values (kept in f32, gathered row-major) and
/// multiply in fp32 with the `gemm` crate.
///
/// # Safety
/// As [`gemm_bf16_into`].
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_fallback(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    alpha: f32,
    a: MatRef,
    b: MatRef,
    parallel: bool,
) {
    // SAFETY: (i, p) < (m, k) and (p, j) < (k, n): the caller's contract.
    let ra: Vec<f32> = (0..m * k).map(|x| round_bf16(unsafe { a.at(x / k, x % k) })).collect();
    let rb: Vec<f32> = (0..k * n).map(|x| round_bf16(unsafe { b.at(x / n, x % n) })).collect();
    let par = if parallel && m * n * k >= 1 << 18 {
        gemm::Parallelism::Rayon(rayon::current_num_threads().max(1))
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: `ra` is m×k and `rb` k×n, row-major and contiguous; dst is the caller's m×n at
    // row stride dst_rs, read only when accumulating.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            ra.as_ptr(),
            1,
            k as isize,
            rb.as_ptr(),
            1,
            n as isize,
            if accumulate { 1.0 } else { 0.0 },
            alpha,
            false,
            false,
            false,
            par,
        )
    };
}

/// A buffer kept per thread between calls (packing buffers: allocating and first-touching them
/// on every GEMM cost as much as packing). Taken out while used, so a nested call on the same
/// thread (rayon may run another task while this one waits) just allocates its own.
struct Scratch<T: Copy + Default + 'static> {
    cell: &'static std::thread::LocalKey<std::cell::Cell<Vec<T>>>,
    buf: Vec<T>,
}

impl<T: Copy + Default + 'static> Scratch<T> {
    fn take(cell: &'static std::thread::LocalKey<std::cell::Cell<Vec<T>>>, len: usize) -> Self {
        let mut buf = cell.with(|c| c.take());
        if buf.len() < len {
            buf.resize(len, T::default());
        }
        Self { cell, buf }
    }
}

impl<T: Copy + Default + 'static> Drop for Scratch<T> {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        // Keep at most 64 MiB per thread and buffer kind.
        if buf.len() * std::mem::size_of::<T>() <= 64 << 20 {
            self.cell.with(|c| c.set(buf));
        }
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod pack;

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod amx;

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod amx {
    pub(super) const KC: usize = 256;

    pub(super) fn request_permission() -> bool {
        false
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm_into(
        _: usize,
        _: usize,
        _: usize,
        _: super::Dst,
        _: usize,
        _: bool,
        _: f32,
        _: super::MatRef,
        _: super::MatRef,
        _: bool,
        _: usize,
    ) {
        unreachable!("AMX is only used on x86-64 Linux")
    }

    pub(super) unsafe fn pack_b(_: &mut [u32], _: super::MatRef, _: usize, _: usize, _: bool) {
        unreachable!("AMX is only used on x86-64 Linux")
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm_packed(
        _: usize,
        _: usize,
        _: usize,
        _: super::Dst,
        _: usize,
        _: bool,
        _: f32,
        _: super::MatRef,
        _: &[u32],
        _: bool,
        _: usize,
    ) {
        unreachable!("AMX is only used on x86-64 Linux")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random values in [−1, 1) with varied magnitudes (xorshift).
    fn data(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let u = (s >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
                let scale = [1.0f32, 0.1, 3.7, 0.013][(s & 3) as usize];
                (2.0 * u - 1.0) * scale
            })
            .collect()
    }

    /// f64 reference of A·B and Σ|aᵢbᵢ| per element, from the given (already rounded or not) inputs.
    fn reference(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> (Vec<f64>, Vec<f64>) {
        let mut c = vec![0.0f64; m * n];
        let mut abs = vec![0.0f64; m * n];
        for i in 0..m {
            for p in 0..k {
                let x = f64::from(a[i * k + p]);
                for j in 0..n {
                    let y = f64::from(b[p * n + j]);
                    c[i * n + j] += x * y;
                    abs[i * n + j] += (x * y).abs();
                }
            }
        }
        (c, abs)
    }

    /// The largest error of `got` against `want`, in units of Σ|aᵢbᵢ| (0 where both are 0).
    fn worst_relative(got: &[f32], want: &[f64], abs: &[f64]) -> f64 {
        got.iter()
            .zip(want)
            .zip(abs)
            .map(|((&g, &w), &s)| {
                let e = (f64::from(g) - w).abs();
                if e == 0.0 {
                    0.0
                } else {
                    e / s
                }
            })
            .fold(0.0, f64::max)
    }

    const SHAPES: [(usize, usize, usize); 8] = [
        (1, 1, 1),
        (5, 7, 3),
        (16, 32, 16),
        (33, 65, 47),
        (64, 768, 128),
        (100, 300, 70),
        (32, 33, 1),
        (1, 64, 97),
    ];
    /// Per-element bound relative to Σ|aᵢbᵢ| for the fp32 accumulation of exact bf16 products.
    const TOL: f64 = 1e-5;

    /// The AMX path on row-major A and B with K blocks of `kc`.
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    fn amx_kc(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, kc: usize) -> Vec<f32> {
        let mut c = vec![0.0f32; m * n];
        // SAFETY: AMX usable (the callers check); A m×k, B k×n, C m×n row-major.
        unsafe {
            amx::gemm_into(
                m,
                n,
                k,
                Dst(c.as_mut_ptr()),
                n,
                false,
                1.0,
                MatRef::new(a.as_ptr(), k, 1),
                MatRef::new(b.as_ptr(), n, 1),
                true,
                kc,
            )
        };
        c
    }

    fn rounded(x: &[f32]) -> Vec<f32> {
        x.iter().map(|&v| round_bf16(v)).collect()
    }

    fn check_path(amx: bool) {
        for (s, &(m, k, n)) in SHAPES.iter().enumerate() {
            let a = data(m * k, 2 * s as u64 + 1);
            let b = data(k * n, 2 * s as u64 + 2);
            let (want, abs) = reference(&rounded(&a), &rounded(&b), m, k, n);
            let got = gemm_bf16_on(&a, &b, m, k, n, amx).unwrap();
            assert_eq!(got.len(), m * n);
            let err = worst_relative(&got, &want, &abs);
            eprintln!("amx={amx} {m}×{k}×{n}: worst error {err:.1e}·Σ|ab|");
            assert!(err <= TOL, "amx={amx} {m}×{k}×{n}: error {err:e}·Σ|ab| > {TOL:e}");
        }
    }

    #[test]
    fn amx_matches_f64_reference_of_rounded_inputs() {
        if bf16_hardware() != Bf16Support::Amx {
            eprintln!(
                "skipped: no usable AMX here ({:?}, or {NO_AMX_ENV} set)",
                bf16_hardware()
            );
            return;
        }
        check_path(true);
    }

    /// The AMX path with K split in blocks of every size (C accumulated across blocks in tiles).
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    #[test]
    fn amx_k_blocks_accumulate() {
        if !amx_usable() {
            eprintln!("skipped: no usable AMX here ({:?})", bf16_hardware());
            return;
        }
        for (s, &(m, k, n)) in SHAPES.iter().enumerate() {
            let a = data(m * k, 500 + s as u64);
            let b = data(k * n, 600 + s as u64);
            let (want, abs) = reference(&rounded(&a), &rounded(&b), m, k, n);
            for kc in [32, 64, 96, amx::KC, 1 << 20] {
                let got = amx_kc(&a, &b, m, k, n, kc);
                let err = worst_relative(&got, &want, &abs);
                assert!(err <= TOL, "{m}×{k}×{n}, K blocks of {kc}: error {err:e}·Σ|ab|");
            }
        }
    }

    #[test]
    fn fallback_matches_f64_reference_of_rounded_inputs() {
        check_path(false);
    }

    #[test]
    fn amx_and_fallback_agree() {
        if bf16_hardware() != Bf16Support::Amx {
            eprintln!("skipped: no usable AMX here ({:?})", bf16_hardware());
            return;
        }
        for (s, &(m, k, n)) in SHAPES.iter().enumerate() {
            let a = data(m * k, 100 + s as u64);
            let b = data(k * n, 200 + s as u64);
            let (_, abs) = reference(&rounded(&a), &rounded(&b), m, k, n);
            let x = gemm_bf16_on(&a, &b, m, k, n, true).unwrap();
            let y = gemm_bf16_on(&a, &b, m, k, n, false).unwrap();
            let want: Vec<f64> = y.iter().map(|&v| f64::from(v)).collect();
            let err = worst_relative(&x, &want, &abs);
            assert!(
                err <= 2.0 * TOL,
                "{m}×{k}×{n}: AMX and fallback differ by {err:e}·Σ|ab|"
            );
        }
    }

    /// The check above can fail: against the exact product of the *unrounded* f32 inputs the
    /// error is the bf16 input rounding, far above what fp32 inputs would give (≤ ~K·2⁻²⁴), so the
    /// kernel really multiplied bf16 operands; and a wrong kernel (B transposed) fails the bound.
    #[test]
    fn bf16_rounding_is_visible_and_the_check_catches_a_wrong_kernel() {
        let (m, k, n) = (64, 768, 128);
        let a = data(m * k, 7);
        let b = data(k * n, 8);
        let (exact, abs) = reference(&a, &b, m, k, n);
        for amx in [false, bf16_hardware() == Bf16Support::Amx] {
            let got = gemm_bf16_on(&a, &b, m, k, n, amx).unwrap();
            let err = worst_relative(&got, &exact, &abs);
            eprintln!("amx={amx}: error against the unrounded inputs {err:.1e}·Σ|ab|");
            // fp32 inputs: ≤ K·2⁻²⁴ ≈ 4.6e-5 in the worst case, ~1e-7 in practice; bf16 inputs
            // carry up to 2⁻⁸ per product, ~1e-3 after partial cancellation of random signs.
            assert!(
                err > 1e-4,
                "amx={amx}: error against the unrounded inputs only {err:e}·Σ|ab|"
            );
            assert!(
                err < 2.0f64.powi(-7),
                "amx={amx}: error {err:e}·Σ|ab| beyond bf16's bound"
            );
        }
        // A wrong kernel: the rounded A times the rounded B *transposed* (square case).
        let (m, k, n) = (33, 33, 33);
        let a = data(m * k, 9);
        let b = data(k * n, 10);
        let bt: Vec<f32> = (0..k * n).map(|i| b[(i % n) * n + i / n]).collect();
        let (want, abs) = reference(&rounded(&a), &rounded(&b), m, k, n);
        let wrong = gemm_bf16_on(&a, &bt, m, k, n, bf16_hardware() == Bf16Support::Amx).unwrap();
        assert!(worst_relative(&wrong, &want, &abs) > TOL);
    }

    /// Every combination of row- and column-major A and B read in place, a destination wider than
    /// the product (row stride > n), accumulation into values already there and alpha ≠ 1, on
    /// one thread and on many: each within the bound of the f64 product of the rounded inputs.
    #[test]
    fn strided_operands_accumulate_and_alpha() {
        let paths: Vec<bool> = if bf16_hardware() == Bf16Support::Amx {
            vec![false, true]
        } else {
            eprintln!("AMX path skipped: no usable AMX here ({:?})", bf16_hardware());
            vec![false]
        };
        for amx in paths {
            for (s, &(m, k, n)) in SHAPES.iter().enumerate() {
                let a = data(m * k, 700 + s as u64);
                let b = data(k * n, 800 + s as u64);
                let (want, abs) = reference(&rounded(&a), &rounded(&b), m, k, n);
                // Column-major copies: element (i, j) at i + j·rows.
                let at: Vec<f32> = (0..m * k).map(|x| a[(x % m) * k + x / m]).collect();
                let bt: Vec<f32> = (0..k * n).map(|x| b[(x % k) * n + x / k]).collect();
                for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                    let ar = if ta {
                        MatRef::new(at.as_ptr(), 1, m)
                    } else {
                        MatRef::new(a.as_ptr(), k, 1)
                    };
                    let br = if tb {
                        MatRef::new(bt.as_ptr(), 1, k)
                    } else {
                        MatRef::new(b.as_ptr(), n, 1)
                    };
                    for (accumulate, alpha, parallel) in [
                        (false, 1.0f32, true),
                        (true, 1.0, true),
                        (true, 0.5, false),
                        (true, -2.0, true),
                    ] {
                        let ld = n + 3;
                        let before: Vec<f32> = data(m * ld, 900 + s as u64);
                        let mut c = before.clone();
                        // SAFETY: A m×k and B k×n through their strides, C m×n at row stride ld.
                        unsafe {
                            gemm_bf16_into(m, n, k, c.as_mut_ptr(), ld, accumulate, alpha, ar, br, parallel, amx)
                        };
                        for i in 0..m {
                            for j in 0..ld {
                                let got = f64::from(c[i * ld + j]);
                                let old = f64::from(before[i * ld + j]);
                                if j >= n {
                                    assert_eq!(got, old, "wrote past the {n} columns");
                                    continue;
                                }
                                let x = i * n + j;
                                let exp = f64::from(alpha) * want[x] + if accumulate { old } else { 0.0 };
                                let bound = TOL * f64::from(alpha.abs()) * abs[x] + 1e-6 * old.abs() + 1e-30;
                                assert!(
                                    (got - exp).abs() <= bound,
                                    "amx={amx} {m}×{k}×{n} ta={ta} tb={tb} acc={accumulate} alpha={alpha}: \
                                     ({i},{j}) {got} vs {exp}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn empty_and_k_zero_and_bad_lengths() {
        for amx in [false, bf16_hardware() == Bf16Support::Amx] {
            assert!(gemm_bf16_on(&[], &[], 0, 3, 0, amx).unwrap().is_empty());
            assert_eq!(gemm_bf16_on(&[], &[], 2, 0, 3, amx).unwrap(), vec![0.0; 6]);
            assert!(gemm_bf16_on(&[1.0; 5], &[1.0; 6], 2, 3, 2, amx).is_err());
        }
        if !amx_usable() {
            assert!(gemm_bf16_on(&[1.0], &[1.0], 1, 1, 1, true).is_err());
        }
    }

    #[test]
    fn amx_runs_on_many_threads() {
        if bf16_hardware() != Bf16Support::Amx {
            eprintln!("skipped: no usable AMX here ({:?})", bf16_hardware());
            return;
        }
        // Fresh OS threads (each must configure its own tiles and take its first-use trap).
        let handles: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    let (m, k, n) = (40, 96, 40);
                    let a = data(m * k, 300 + t);
                    let b = data(k * n, 400 + t);
                    let (want, abs) = reference(&rounded(&a), &rounded(&b), m, k, n);
                    let got = gemm_bf16_on(&a, &b, m, k, n, true).unwrap();
                    worst_relative(&got, &want, &abs)
                })
            })
            .collect();
        for h in handles {
            assert!(h.join().unwrap() <= TOL);
        }
    }

    /// GFLOP/s of the GEMMs the layers make (through `conv_cpu::matmul`, both precisions) at
    /// ViT-B/32 and ResNet-50 shapes, batch 16: not a test (`cargo test --release -p clip-core
    /// --lib nn::bf16::tests::timing_layer_shapes -- --ignored --nocapture`, idle machine).
    #[test]
    #[ignore]
    fn timing_layer_shapes() {
        use std::mem::MaybeUninit;
        // (what, m, k, n, A transposed, B transposed, parallel)
        let shapes = [
            ("vit qkv fwd", 800, 768, 2304, false, true, true),
            ("vit fc1 fwd", 800, 768, 3072, false, true, true),
            ("vit fc2 fwd", 800, 3072, 768, false, true, true),
            ("vit fc1 dx", 800, 3072, 768, false, false, true),
            ("vit fc1 dW", 3072, 800, 768, true, false, true),
            ("attn scores", 50, 64, 50, false, true, false),
            ("attn ctx", 50, 50, 64, false, false, false),
            ("text scores", 77, 64, 77, false, true, false),
            ("vit16 scores", 197, 64, 197, false, true, false),
            ("vit16 ctx", 197, 197, 64, false, false, false),
            ("small linear", 64, 128, 128, false, true, true),
            ("b8 proj", 8, 2048, 256, false, true, true),
            ("rn50 3x3 conv", 64, 576, 3136, false, false, false),
            ("rn50 1x1 conv", 256, 64, 3136, false, false, false),
        ];
        println!(
            "hardware {:?}, {} threads",
            bf16_hardware(),
            rayon::current_num_threads()
        );
        for (what, m, k, n, ta, tb, par) in shapes {
            let a = data(m * k, 1);
            let b = data(k * n, 2);
            let (a_rs, a_cs) = if ta { (1, m) } else { (k, 1) };
            let (b_rs, b_cs) = if tb { (1, k) } else { (n, 1) };
            let mut c = vec![MaybeUninit::<f32>::uninit(); m * n];
            let parallel = if par {
                gemm::Parallelism::Rayon(rayon::current_num_threads())
            } else {
                gemm::Parallelism::None
            };
            let flop = 2.0 * (m * k * n) as f64;
            let mut rate = [0.0; 2];
            for (i, bf16) in [false, true].into_iter().enumerate() {
                if bf16 && bf16_hardware() != Bf16Support::Amx {
                    continue;
                }
                crate::nn::precision::set_precision(if bf16 {
                    crate::nn::Precision::Bf16
                } else {
                    crate::nn::Precision::Fp32
                })
                .unwrap();
                let mut go =
                    || crate::nn::conv_cpu::matmul(m, n, k, &mut c, false, &a, a_rs, a_cs, &b, b_rs, b_cs, parallel);
                go();
                let reps = (2e9 / flop).clamp(3.0, 2000.0) as u32;
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    go();
                }
                rate[i] = flop * f64::from(reps) / t.elapsed().as_secs_f64() / 1e9;
            }
            crate::nn::precision::set_precision(crate::nn::Precision::Fp32).unwrap();
            println!(
                "{what:14} {m:5}×{k:5}×{n:5}: fp32 {:7.1} GFLOP/s, bf16 {:7.1} GFLOP/s ({:.2}×)",
                rate[0],
                rate[1],
                rate[1] / rate[0]
            );
        }
    }

    /// GFLOP/s of [`gemm_bf16`] against candle's fp32 matmul at 512×768×768 (a ViT-B/32 linear
    /// layer at batch 10). Not a test: `cargo test -p clip-core --lib nn::bf16 -- --ignored
    /// --nocapture` on an otherwise idle machine.
    #[test]
    #[ignore]
    fn timing_512x768x768() {
        use candle_core::{Device, Tensor};
        let (m, k, n) = (512, 768, 768);
        let a = data(m * k, 1);
        let b = data(k * n, 2);
        let flop = 2.0 * (m * k * n) as f64;
        let time = |f: &mut dyn FnMut()| {
            f();
            let reps = 20;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                f();
            }
            t.elapsed().as_secs_f64() / f64::from(reps)
        };
        let ta = Tensor::from_slice(&a, (m, k), &Device::Cpu).unwrap();
        let tb = Tensor::from_slice(&b, (k, n), &Device::Cpu).unwrap();
        let fp32 = time(&mut || {
            std::hint::black_box(ta.matmul(&tb).unwrap());
        });
        println!(
            "hardware: {:?}, rayon threads {}",
            bf16_hardware(),
            rayon::current_num_threads()
        );
        println!("candle fp32 matmul   {:8.1} GFLOP/s", flop / fp32 / 1e9);
        let fb = time(&mut || {
            std::hint::black_box(gemm_bf16_on(&a, &b, m, k, n, false).unwrap());
        });
        println!("gemm_bf16 fallback   {:8.1} GFLOP/s", flop / fb / 1e9);
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        if amx_usable() {
            let mut bp = vec![0u32; k.div_ceil(32) * 16 * n.div_ceil(32) * 32];
            let t = time(&mut || {
                // SAFETY: B is k×n row-major.
                unsafe { amx::pack_b(&mut bp, MatRef::new(b.as_ptr(), n, 1), k, n, true) };
                std::hint::black_box(&bp);
            });
            println!("  of which packing B to bf16: {:.3} ms", t * 1e3);
            for kc in [amx::KC, 1 << 20] {
                let t = time(&mut || {
                    std::hint::black_box(amx_kc(&a, &b, m, k, n, kc));
                });
                println!(
                    "gemm_bf16 AMX, K blocks of {:4}  {:8.1} GFLOP/s ({:.2}× fp32)",
                    kc.min(k),
                    flop / t / 1e9,
                    fp32 / t
                );
            }
        }
    }
}
