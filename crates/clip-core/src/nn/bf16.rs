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

/// What this processor (and OS) offers for bf16 GEMMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Support {
    /// AMX tiles with bf16 (`amx_tile` + `amx_bf16`) and the OS's permission to use them.
    Amx,
    /// AVX512-BF16 (`VDPBF16PS`) only: refused for `--precision bf16`. Measured on this
    /// project's Sapphire Rapids (`pack::tests::timing_vdpbf16ps_against_fma`, one thread, 12
    /// register accumulators): 49 G bf16 multiply-adds/s against 100 G/s for fp32's
    /// `VFMADD231PS` (0.49×), so a kernel on it would be slower than fp32, not faster.
    Avx512Bf16,
    /// No bf16 arithmetic in hardware.
    None,
}

/// The environment variable that turns AMX off (`CLIPMINE_NO_AMX=1`), to exercise the fallback.
pub const NO_AMX_ENV: &str = "CLIPMINE_NO_AMX";

/// The best bf16 hardware this process may use: [`Bf16Support::Amx`] when CPUID reports
/// `amx_tile` and `amx_bf16` and Linux granted the tile-data permission (asked for once per
/// process, confirmed with `ARCH_GET_XCOMP_PERM`), unless `CLIPMINE_NO_AMX=1`; else
/// [`Bf16Support::Avx512Bf16`] when the CPU has it; else [`Bf16Support::None`] (also on every
/// target other than x86-64 Linux for AMX, and other than x86-64 for AVX512-BF16).
pub fn bf16_hardware() -> Bf16Support {
    if amx_usable() && !amx_disabled_by_env() {
        Bf16Support::Amx
    } else if avx512_bf16() {
        Bf16Support::Avx512Bf16
    } else {
        Bf16Support::None
    }
}

pub(crate) fn amx_disabled_by_env() -> bool {
    std::env::var(NO_AMX_ENV).is_ok_and(|v| !v.is_empty() && v != "0")
}

#[cfg(target_arch = "x86_64")]
fn avx512_bf16() -> bool {
    std::is_x86_feature_detected!("avx512bf16")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx512_bf16() -> bool {
    false
}

/// CPUID reports AMX-TILE and AMX-BF16 and the OS granted this process the tile state (cached:
/// the permission request runs once per process, and permission is per process).
fn amx_usable() -> bool {
    static AMX: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AMX.get_or_init(|| amx_cpuid() && amx::request_permission())
}

#[cfg(target_arch = "x86_64")]
fn amx_cpuid() -> bool {
    use core::arch::x86_64::{__cpuid, __cpuid_count};
    // CPUID leaf 7 exists on every x86-64 processor with AMX; check the maximum leaf first.
    let max_leaf = __cpuid(0).eax;
    if max_leaf < 7 {
        return false;
    }
    let edx = __cpuid_count(7, 0).edx;
    // CPUID.(EAX=7,ECX=0):EDX bit 22 = AMX-BF16, bit 24 = AMX-TILE.
    edx & (1 << 22) != 0 && edx & (1 << 24) != 0
}

#[cfg(not(target_arch = "x86_64"))]
fn amx_cpuid() -> bool {
    false
}

/// f32 → bf16 bits, rounding to nearest even (as `VCVTNEPS2BF16` and `half::bf16::from_f32`).
/// NaN stays NaN (quietened, sign kept), ±∞ stays ±∞, finite values beyond bf16's range round to
/// ±∞. Subnormal f32 inputs become ±0, as the hardware conversion does: AMX treats subnormal bf16
/// inputs as zero anyway, so flushing here makes the AMX and fallback paths see the same operands.
#[inline(always)]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    // Branch-free (selects), so that packing loops vectorise.
    let bits = x.to_bits();
    let abs = bits & 0x7fff_ffff;
    let high = bits >> 16;
    // No overflow: the largest non-NaN pattern is 0xff80_0000 (−∞), and + 0x8000 fits.
    let rounded = bits.wrapping_add(0x7fff + (high & 1)) >> 16;
    let out = if abs > 0x7f80_0000 {
        high | 0x0040 // NaN: keep sign and top payload, set the quiet bit
    } else if abs < 0x0080_0000 {
        high & 0x8000 // ±0 or subnormal: signed zero
    } else {
        rounded
    };
    out as u16
}

/// bf16 bits → f32 (exact).
#[inline(always)]
pub fn bf16_bits_to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// `x` rounded to the nearest bf16 (see [`f32_to_bf16_bits`]), as an f32.
#[inline(always)]
pub fn round_bf16(x: f32) -> f32 {
    bf16_bits_to_f32(f32_to_bf16_bits(x))
}

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

/// A matrix operand read in place: element (i, j) at `ptr[i·rs + j·cs]` — row-major, column-major
/// (a transpose read in place) or any other strides.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MatRef {
    ptr: *const f32,
    rs: usize,
    cs: usize,
}

// SAFETY: a read-only view; the callers of `gemm_bf16_into` keep the data alive and unchanged
// for the call, across whichever threads it uses.
unsafe impl Send for MatRef {}
unsafe impl Sync for MatRef {}

impl MatRef {
    pub(crate) fn new(ptr: *const f32, rs: usize, cs: usize) -> Self {
        Self { ptr, rs, cs }
    }

    /// Element (i, j).
    ///
    /// # Safety
    /// (i, j) lies within the operand.
    #[inline(always)]
    unsafe fn at(self, i: usize, j: usize) -> f32 {
        // SAFETY: the caller's contract.
        unsafe { *self.ptr.add(i * self.rs + j * self.cs) }
    }
}

/// The destination of `gemm_bf16_into`, shared by its tasks, each writing its own rectangle.
#[derive(Clone, Copy)]
struct Dst(*mut f32);
// SAFETY: the tasks write disjoint rectangles (one row panel × one column group each).
unsafe impl Send for Dst {}
unsafe impl Sync for Dst {}

impl Dst {
    /// The element `offset` values in (a method, so a closure captures the whole `Dst`).
    ///
    /// # Safety
    /// `offset` lies within the destination.
    #[inline(always)]
    unsafe fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: the caller's contract.
        unsafe { self.0.add(offset) }
    }
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
mod amx {
    use super::{f32_to_bf16_bits, pack, MatRef, Scratch};
    use crate::nn::vmath::vectorized;
    use rayon::prelude::*;

    /// Whether the AVX-512 packers ([`pack`]) run: every AMX processor has their instructions.
    #[inline]
    fn fast_pack() -> bool {
        static FAST: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *FAST.get_or_init(pack::usable)
    }

    /// `dst[i] = bf16(src[i])` (the rest of `dst` is left as is).
    #[inline(always)]
    fn convert(dst: &mut [u16], src: &[f32]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = f32_to_bf16_bits(s);
        }
    }

    /// Rows i0..i0+32 of A (zero past m and k) as 32 × kp bf16, row-major.
    ///
    /// # Safety
    /// A readable at (i < m, p < k).
    #[inline(always)]
    unsafe fn pack_a_panel(dst: &mut [u16], a: MatRef, i0: usize, m: usize, k: usize, kp: usize) {
        let rows = (m - i0).min(32);
        if fast_pack() && (a.cs == 1 || a.rs == 1) {
            if a.cs == 1 {
                for (r, out) in dst.chunks_exact_mut(kp).take(rows).enumerate() {
                    // SAFETY: row i0 + r < m has k elements at unit stride; out holds kp ≥ k.
                    unsafe { pack::convert(out.as_mut_ptr(), a.ptr.add((i0 + r) * a.rs), k) };
                    out[k..].fill(0);
                }
                dst[rows * kp..32 * kp].fill(0);
            } else {
                // SAFETY: the caller's contract; dst holds 32 · kp.
                unsafe { pack::a_panel_transposed(dst, a, i0, m, k, kp) };
            }
            return;
        }
        // SAFETY: the caller's contract.
        unsafe { pack_a_panel_plain(dst, a, i0, m, k, kp) }
    }

    /// [`pack_a_panel`] in plain loops (no AVX-512 needed).
    ///
    /// # Safety
    /// As [`pack_a_panel`].
    #[inline(always)]
    unsafe fn pack_a_panel_plain(dst: &mut [u16], a: MatRef, i0: usize, m: usize, k: usize, kp: usize) {
        let rows = (m - i0).min(32);
        if a.cs == 1 {
            for (r, out) in dst.chunks_exact_mut(kp).take(rows).enumerate() {
                // SAFETY: row i0 + r < m has k elements at unit stride.
                let src = unsafe { std::slice::from_raw_parts(a.ptr.add((i0 + r) * a.rs), k) };
                convert(&mut out[..k], src);
                out[k..].fill(0);
            }
        } else {
            // A transposed operand (rs = 1) has each column's 32 rows contiguous: convert a block
            // of 32 columns into `block` (column-major, vectorised), then write it transposed.
            let mut block = [[0u16; 32]; 32];
            for p0 in (0..k).step_by(32) {
                let pw = (k - p0).min(32);
                for (pp, col) in block.iter_mut().enumerate().take(pw) {
                    if a.rs == 1 {
                        // SAFETY: rows i0..i0 + rows of column p0 + pp are within A.
                        let src = unsafe { std::slice::from_raw_parts(a.ptr.add(i0 + (p0 + pp) * a.cs), rows) };
                        convert(&mut col[..rows], src);
                    } else {
                        for (r, c) in col.iter_mut().enumerate().take(rows) {
                            // SAFETY: (i0 + r, p0 + pp) < (m, k).
                            *c = f32_to_bf16_bits(unsafe { a.at(i0 + r, p0 + pp) });
                        }
                    }
                }
                for r in 0..rows {
                    let out = &mut dst[r * kp + p0..][..pw];
                    for (pp, o) in out.iter_mut().enumerate() {
                        *o = block[pp][r];
                    }
                }
            }
            for out in dst.chunks_exact_mut(kp).take(rows) {
                out[k..].fill(0);
            }
        }
        dst[rows * kp..32 * kp].fill(0);
    }

    /// Panel `jb` of B (columns 32jb..32jb+32, zero past n and k) in the VNNI-2 layout: kp/2
    /// pair-rows of 32 pairs, a pair one u32 with the even row in the low half (the first bf16
    /// in memory): dst[(r/2)·32 + (j − 32jb)] = B[r][j] | B[r+1][j] << 16.
    ///
    /// # Safety
    /// B readable at (p < k, j < n).
    #[inline(always)]
    unsafe fn pack_b_panel(dst: &mut [u32], b: MatRef, k: usize, n: usize, jb: usize) {
        if fast_pack() && b.cs == 1 {
            // SAFETY: the caller's contract.
            return unsafe { pack::b_panel_rows(dst, b, k, n, jb) };
        }
        if fast_pack() && b.rs == 1 {
            // SAFETY: the caller's contract.
            return unsafe { pack::b_panel_transposed(dst, b, k, n, jb) };
        }
        // SAFETY: the caller's contract.
        unsafe { pack_b_panel_plain(dst, b, k, n, jb) }
    }

    /// [`pack_b_panel`] in plain loops (no AVX-512 needed).
    ///
    /// # Safety
    /// As [`pack_b_panel`].
    #[inline(always)]
    unsafe fn pack_b_panel_plain(dst: &mut [u32], b: MatRef, k: usize, n: usize, jb: usize) {
        let j0 = jb * 32;
        let w = (n - j0).min(32);
        if b.cs == 1 {
            for (pr, out) in dst.chunks_exact_mut(32).enumerate() {
                let r = 2 * pr;
                if r >= k {
                    out.fill(0);
                    continue;
                }
                // SAFETY: rows r (and r + 1 when < k) have columns j0..j0 + w at unit stride.
                let even = unsafe { std::slice::from_raw_parts(b.ptr.add(r * b.rs + j0), w) };
                if r + 1 < k {
                    let odd = unsafe { std::slice::from_raw_parts(b.ptr.add((r + 1) * b.rs + j0), w) };
                    for ((o, &x), &y) in out.iter_mut().zip(even).zip(odd) {
                        *o = u32::from(f32_to_bf16_bits(x)) | u32::from(f32_to_bf16_bits(y)) << 16;
                    }
                } else {
                    for (o, &x) in out.iter_mut().zip(even) {
                        *o = u32::from(f32_to_bf16_bits(x));
                    }
                }
                out[w..].fill(0);
            }
        } else {
            let pairs = dst.len() / 32;
            if b.rs == 1 {
                // A transposed operand (a weight W read as Wᵀ): column j is contiguous, and its
                // bf16 values read as u32 are the VNNI pairs (row 2p low, 2p + 1 high) already:
                // convert the column (vectorised), then scatter the pairs.
                let mut col = [0u16; 2 * 256];
                for jj in 0..w {
                    for p0 in (0..pairs).step_by(256) {
                        let pn = (pairs - p0).min(256);
                        let r0 = 2 * p0;
                        let rn = if r0 < k { (k - r0).min(2 * pn) } else { 0 };
                        // SAFETY: rows r0..r0 + rn < k of column j0 + jj are contiguous.
                        let src = unsafe { std::slice::from_raw_parts(b.ptr.add(r0 + (j0 + jj) * b.cs), rn) };
                        convert(&mut col[..rn], src);
                        col[rn..2 * pn].fill(0);
                        for (q, pair) in col[..2 * pn].chunks_exact(2).enumerate() {
                            dst[(p0 + q) * 32 + jj] = u32::from(pair[0]) | u32::from(pair[1]) << 16;
                        }
                    }
                }
            } else {
                for jj in 0..w {
                    for pr in 0..pairs {
                        let r = 2 * pr;
                        // SAFETY: (r, j0 + jj) and (r + 1, j0 + jj) read only when within B.
                        let lo = if r < k {
                            f32_to_bf16_bits(unsafe { b.at(r, j0 + jj) })
                        } else {
                            0
                        };
                        let hi = if r + 1 < k {
                            f32_to_bf16_bits(unsafe { b.at(r + 1, j0 + jj) })
                        } else {
                            0
                        };
                        dst[pr * 32 + jj] = u32::from(lo) | u32::from(hi) << 16;
                    }
                }
            }
            for out in dst.chunks_exact_mut(32) {
                out[w..].fill(0);
            }
        }
    }

    const ARCH_GET_XCOMP_PERM: libc::c_long = 0x1022;
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    /// XSTATE component number of the tile data (XFEATURE_XTILEDATA).
    const XTILEDATA: libc::c_long = 18;

    /// Asks Linux for the AMX tile-data state for this process and confirms the grant (oneDNN's
    /// sequence: GET, REQ if absent, GET again). Call after the CPUID check only.
    pub(super) fn request_permission() -> bool {
        let granted = || {
            let mut mask: u64 = 0;
            // SAFETY: arch_prctl(ARCH_GET_XCOMP_PERM, &mut u64) writes one u64 through the
            // pointer, which points at a live local.
            let rc = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &mut mask as *mut u64) };
            rc == 0 && mask & (1 << XTILEDATA) != 0
        };
        if granted() {
            return true;
        }
        // SAFETY: ARCH_REQ_XCOMP_PERM takes an integer (the highest XSTATE component wanted) and
        // touches no memory of ours; on failure it returns −1 and changes nothing.
        let rc = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XTILEDATA) };
        rc == 0 && granted()
    }

    /// The 64-byte operand of `ldtilecfg` (palette 1).
    #[repr(C, align(64))]
    struct TileCfg {
        palette: u8,
        start_row: u8,
        _reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    /// Every tile 16 rows × 64 bytes: C 16×16 f32, A 16×32 bf16, B 16 pair-rows × 16 pairs.
    const CFG: TileCfg = {
        let mut cfg = TileCfg {
            palette: 1,
            start_row: 0,
            _reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        let mut t = 0;
        while t < 8 {
            cfg.rows[t] = 16;
            cfg.colsb[t] = 64;
            t += 1;
        }
        cfg
    };

    const fn round_up(x: usize, to: usize) -> usize {
        x.div_ceil(to) * to
    }

    /// The micro-kernel over a strip of `panels` 32×32 blocks of C side by side: for each, C
    /// (= 0 first when `zero`) += A·B_j, C_j at `c` + 32·j f32 (row stride `ldc` elements), A 32
    /// rows × `kc` bf16 at `a` (row stride `lda` elements), B_j VNNI-2 packed, `kc`/2 pair-rows of
    /// 32 pairs (64 u16) at `b` + j·`bpanel` u16, row stride `ldb` u16. Tiles: tmm0–3 the four
    /// 16×16 f32 C quadrants, tmm4/5 A rows 0–15 / 16–31, tmm6/7 B columns 0–15 / 16–31; 4
    /// `tdpbf16ps` (16×16×32 each) per 32 of K, the loads placed between them (tiles are not
    /// renamed: a load waits for the products reading its tile) and the tile configuration set
    /// once per strip. Measured on one thread of the 2-core Xeon, operands in L1, K = 256: 672
    /// GFLOP/s with all four loads first and one call per block, 779 with the loads interleaved.
    ///
    /// # Safety
    /// AMX permission granted ([`request_permission`]); `kc` a non-zero multiple of 32, `panels`
    /// ≥ 1; `a` valid for 32 rows of `kc` elements at stride `lda`; each B_j for `kc / 2` rows of
    /// 64 u16 at stride `ldb`; `c` valid for reads and writes of 32 rows of 32·`panels` f32 at
    /// stride `ldc`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel_strip(
        a: *const u16,
        lda: usize,
        b: *const u16,
        bpanel: usize,
        panels: usize,
        kc: usize,
        c: *mut f32,
        ldc: usize,
        zero: bool,
    ) {
        // Read from memory in the loop (too few registers): K steps, B's jump per block, zero.
        let params: [usize; 3] = [kc / 32, bpanel * 2, usize::from(zero)];
        // SAFETY: the caller guarantees the permission and the extents of A, B and C read and
        // written here. The whole configure / compute / store / release sequence is in this one
        // block (tile state is per thread and not preserved across blocks), and every tile is
        // declared clobbered. B's pair-rows are 128 bytes apart (64 u16), 16 of them 2,048.
        unsafe {
            core::arch::asm!(
                "ldtilecfg [{kb}]",
                "3:",
                "lea {ai}, [{c} + {sc}*8]",
                "lea {ai}, [{ai} + {sc}*8]",
                "cmp qword ptr [{p} + 16], 0",
                "je 4f",
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                "jmp 5f",
                "4:",
                "tileloadd tmm0, [{c} + {sc}*1]",
                "tileloadd tmm1, [{c} + {sc}*1 + 64]",
                "tileloadd tmm2, [{ai} + {sc}*1]",
                "tileloadd tmm3, [{ai} + {sc}*1 + 64]",
                "5:",
                "mov {ai}, {a}",
                "lea {a2i}, [{a} + {sa}*8]",
                "lea {a2i}, [{a2i} + {sa}*8]",
                "mov {bi}, {b}",
                "mov {kb}, qword ptr [{p}]",
                "2:",
                "tileloadd tmm4, [{ai} + {sa}*1]",
                "tileloadd tmm6, [{bi} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{bi} + {sb}*1 + 64]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a2i} + {sa}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "add {ai}, 64",
                "add {a2i}, 64",
                "add {bi}, 2048",
                "dec {kb}",
                "jnz 2b",
                "tilestored [{c} + {sc}*1], tmm0",
                "tilestored [{c} + {sc}*1 + 64], tmm1",
                "lea {ai}, [{c} + {sc}*8]",
                "lea {ai}, [{ai} + {sc}*8]",
                "tilestored [{ai} + {sc}*1], tmm2",
                "tilestored [{ai} + {sc}*1 + 64], tmm3",
                "add {c}, 128",
                "add {b}, qword ptr [{p} + 8]",
                "dec {pn}",
                "jnz 3b",
                "tilerelease",
                kb = inout(reg) &CFG => _,
                p = in(reg) params.as_ptr(),
                a = in(reg) a,
                ai = out(reg) _,
                a2i = out(reg) _,
                b = inout(reg) b => _,
                bi = out(reg) _,
                c = inout(reg) c => _,
                sc = in(reg) ldc * 4,
                pn = inout(reg) panels => _,
                sa = in(reg) lda * 2,
                sb = in(reg) 128usize,
                out("tmm0") _,
                out("tmm1") _,
                out("tmm2") _,
                out("tmm3") _,
                out("tmm4") _,
                out("tmm5") _,
                out("tmm6") _,
                out("tmm7") _,
                options(nostack),
            );
        }
    }

    /// K block of the AMX path: a 32×256 bf16 slice of A (16 KiB) stays in L1 while the B panels'
    /// 256×32 slices (16 KiB each) stream past it.
    pub(super) const KC: usize = 256;

    thread_local! {
        static A_PANEL: std::cell::Cell<Vec<u16>> = const { std::cell::Cell::new(Vec::new()) };
        static B_PACK: std::cell::Cell<Vec<u32>> = const { std::cell::Cell::new(Vec::new()) };
        static ACC: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    }

    /// Columns per task at most: 8 panels of 32 (a 32×256 f32 accumulator, 32 KiB).
    const GROUP: usize = 8;

    /// B packed whole (as [`pack_b_panel`], panel after panel), in parallel over panels.
    ///
    /// # Safety
    /// B readable at (p < k, j < n).
    pub(super) unsafe fn pack_b(dst: &mut [u32], b: MatRef, k: usize, n: usize, parallel: bool) {
        let panel = round_up(k, 32) / 2 * 32;
        let one = |(jb, d): (usize, &mut [u32])| {
            vectorized(
                #[inline(always)]
                // SAFETY: the caller's contract.
                || unsafe { pack_b_panel(d, b, k, n, jb) },
            )
        };
        if parallel && n > 32 {
            dst.par_chunks_mut(panel).enumerate().for_each(one);
        } else {
            dst.chunks_mut(panel).enumerate().for_each(one);
        }
    }

    /// [`super::gemm_bf16_into`] on AMX with K blocks of `kc` (a non-zero multiple of 32; more
    /// than K means one block). B is packed once (VNNI-2 panels of 32 columns), A once (row
    /// panels of 32 × kp); then each task — a row panel and a group of up to [`GROUP`] column
    /// panels, group-major so that a thread's consecutive tasks share their B columns in L2 —
    /// accumulates 32 × 32·g in tiles over the K blocks: a whole block with alpha 1 straight in
    /// dst (loaded from it when accumulating), an edge block or alpha ≠ 1 in a scratch
    /// accumulator written back as alpha · acc [+ dst].
    ///
    /// # Safety
    /// As [`super::gemm_bf16_into`], with AMX usable; m, n, k ≥ 1.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm_into(
        m: usize,
        n: usize,
        k: usize,
        dst: super::Dst,
        dst_rs: usize,
        accumulate: bool,
        alpha: f32,
        a: MatRef,
        b: MatRef,
        parallel: bool,
        kc: usize,
    ) {
        assert!(
            kc > 0 && kc.is_multiple_of(32),
            "K block {kc} not a positive multiple of 32"
        );
        let kp = round_up(k, 32);
        let panels = n.div_ceil(32);
        let panel = kp / 2 * 32;
        let mut bp = Scratch::take(&B_PACK, panels * panel);
        let bp = &mut bp.buf[..panels * panel];
        // SAFETY: the caller's contract.
        unsafe { pack_b(bp, b, k, n, parallel) };
        // SAFETY: the caller's contract; `bp` is B packed.
        unsafe { gemm_packed(m, n, k, dst, dst_rs, accumulate, alpha, a, bp, parallel, kc) }
    }

    /// [`gemm_into`] with B packed already ([`pack_b`] of a k×n operand).
    ///
    /// # Safety
    /// As [`gemm_into`]; `bp` is [`pack_b`]'s output for this k and n.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm_packed(
        m: usize,
        n: usize,
        k: usize,
        dst: super::Dst,
        dst_rs: usize,
        accumulate: bool,
        alpha: f32,
        a: MatRef,
        bp: &[u32],
        parallel: bool,
        kc: usize,
    ) {
        let kp = round_up(k, 32);
        let panels = n.div_ceil(32);
        let panel = kp / 2 * 32;
        assert_eq!(bp.len(), panels * panel, "packed B of another shape");
        let row_panels = m.div_ceil(32);
        // A packed whole too (once, not once per column group), 32 × kp per row panel.
        let mut ap = Scratch::take(&A_PANEL, row_panels * 32 * kp);
        let ap = &mut ap.buf[..row_panels * 32 * kp];
        let pack_a = |(ib, d): (usize, &mut [u16])| {
            vectorized(
                #[inline(always)]
                // SAFETY: the caller's contract (rows 32·ib.. of A).
                || unsafe { pack_a_panel(d, a, ib * 32, m, k, kp) },
            )
        };
        if parallel && row_panels > 1 {
            ap.par_chunks_mut(32 * kp).enumerate().for_each(pack_a);
        } else {
            ap.chunks_mut(32 * kp).enumerate().for_each(pack_a);
        }
        let ap: &[u16] = ap;
        let threads = if parallel {
            rayon::current_num_threads().max(1)
        } else {
            1
        };
        // Narrower groups until there are a few tasks per thread (or one panel per group).
        let mut group = GROUP.min(panels);
        while group > 1 && row_panels * panels.div_ceil(group) < 4 * threads {
            group = group.div_ceil(2);
        }
        let groups = panels.div_ceil(group);
        let task = |t: usize| {
            let (gi, ib) = (t / row_panels, t % row_panels);
            let (i0, jb0) = (ib * 32, gi * group);
            let jbs = group.min(panels - jb0);
            let w = jbs * 32;
            let ap = &ap[ib * 32 * kp..][..32 * kp];
            let b_group = &bp[jb0 * panel..][..jbs * panel];
            let (rows, j0) = ((m - i0).min(32), jb0 * 32);
            let cols = (n - j0).min(w);
            // A whole 32 × w block with alpha 1 goes straight from the tiles to dst (loaded from
            // it when accumulating): no scratch accumulator, no copy. Edges and alpha ≠ 1 go
            // through the accumulator.
            let direct = rows == 32 && cols == w && alpha == 1.0;
            let mut acc = Scratch::take(&ACC, if direct { 0 } else { 32 * w });
            let (c, ldc) = if direct {
                // SAFETY: row i0, column j0 of dst, within it (i0 < m, j0 < n).
                (unsafe { dst.at(i0 * dst_rs + j0) }, dst_rs)
            } else {
                (acc.buf.as_mut_ptr(), w)
            };
            for k0 in (0..kp).step_by(kc) {
                let kh = kc.min(kp - k0);
                // SAFETY: permission checked by the caller; kh is a non-zero multiple of 32;
                // from ap[k0..], 32 rows of kh at stride kp (k0 + kh ≤ kp); from each of the jbs
                // panels of b_group (`panel` u32 apart) at k0/2·32, kh/2 rows of 32 u32 = 64 u16
                // (a panel has kp/2); C, 32 rows of w f32 at stride ldc: this task's own
                // rectangle of dst (rows i0..i0 + 32 ≤ m, columns j0..j0 + w ≤ n, the caller's
                // contract; tasks do not overlap), read only after the first K block or when
                // accumulating, or the accumulator (32·w).
                unsafe {
                    kernel_strip(
                        ap.as_ptr().add(k0),
                        kp,
                        b_group.as_ptr().add(k0 / 2 * 32).cast::<u16>(),
                        2 * panel,
                        jbs,
                        kh,
                        c,
                        ldc,
                        k0 == 0 && !(direct && accumulate),
                    )
                };
            }
            if direct {
                return;
            }
            let acc = &acc.buf[..32 * w];
            for (r, src) in acc.chunks_exact(w).take(rows).enumerate() {
                // SAFETY: row i0 + r < m, columns j0..j0 + cols < n of dst: this task's own
                // rectangle (the caller's contract covers dst; tasks do not overlap).
                let out = unsafe { std::slice::from_raw_parts_mut(dst.at((i0 + r) * dst_rs + j0), cols) };
                if accumulate {
                    for (o, &v) in out.iter_mut().zip(src) {
                        *o += alpha * v;
                    }
                } else if alpha == 1.0 {
                    out.copy_from_slice(&src[..cols]);
                } else {
                    for (o, &v) in out.iter_mut().zip(src) {
                        *o = alpha * v;
                    }
                }
            }
        };
        let tasks = row_panels * groups;
        if parallel && tasks > 1 {
            (0..tasks).into_par_iter().for_each(task);
        } else {
            (0..tasks).for_each(task);
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Values that exercise rounding: ties, NaN, ±∞, subnormals, ±0, large and small.
        fn values(len: usize, seed: u32) -> Vec<f32> {
            let special = [
                f32::NAN,
                -f32::NAN,
                f32::INFINITY,
                f32::NEG_INFINITY,
                1e-40,
                -1e-40,
                0.0,
                -0.0,
                f32::from_bits(0x3f80_8000), // a tie, rounds to even (down)
                f32::from_bits(0x3f81_8000), // a tie, rounds up
                f32::MAX,
            ];
            let mut x = seed.wrapping_mul(2_654_435_761).max(1);
            (0..len)
                .map(|i| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    if i % 7 == 3 {
                        special[(x as usize) % special.len()]
                    } else {
                        f32::from_bits(0x3000_0000 + (x % 0x1800_0000)) * if x & 1 == 0 { 1.0 } else { -1.0 }
                    }
                })
                .collect()
        }

        /// The micro-kernel alone on L1-resident operands: its ceiling. Not a test.
        #[test]
        #[ignore]
        fn timing_kernel_in_l1() {
            if !super::super::amx_usable() {
                return;
            }
            for kc in [64usize, 256, 1024] {
                let a = vec![0x3f80u16; 32 * kc];
                let b = vec![0x3f80u16; kc * 32];
                let mut c = vec![0f32; 32 * 128];
                let reps = 50_000 * 64 / kc;
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    // SAFETY: permission granted (amx_usable); extents as declared.
                    unsafe { kernel_strip(a.as_ptr(), kc, b.as_ptr(), 0, 4, kc, c.as_mut_ptr(), 128, false) };
                }
                let s = t.elapsed().as_secs_f64();
                println!(
                    "kc {kc:5}: {:.1} GFLOP/s one thread",
                    2.0 * 32.0 * 128.0 * kc as f64 * reps as f64 / s / 1e9
                );
            }
        }

        /// The AVX-512 packers write exactly what the plain loops write (bit for bit, NaN and
        /// subnormals included), for both layouts of both operands, ragged edges and k = 1.
        #[test]
        fn avx512_packing_equals_the_plain_loops() {
            if !pack::usable() {
                println!("skipped: this processor has no AVX512-BF16");
                return;
            }
            for (m, k) in [(1, 1), (5, 3), (31, 33), (32, 32), (33, 70), (64, 17), (50, 100)] {
                let kp = round_up(k, 32);
                let data = values(m * k, (m * 131 + k) as u32);
                for (rs, cs) in [(k, 1), (1, m)] {
                    let a = MatRef::new(data.as_ptr(), rs, cs);
                    for i0 in (0..m).step_by(32) {
                        let (mut fast, mut plain) = (vec![7u16; 32 * kp], vec![9u16; 32 * kp]);
                        // SAFETY: A is m×k through (rs, cs); both hold 32·kp.
                        unsafe {
                            pack_a_panel(&mut fast, a, i0, m, k, kp);
                            pack_a_panel_plain(&mut plain, a, i0, m, k, kp);
                        }
                        assert_eq!(fast, plain, "A {m}×{k} strides ({rs}, {cs}) panel at {i0}");
                    }
                    // The same data as a k'×n' B with k' = m, n' = k.
                    let (bk, bn) = (m, k);
                    let panel = round_up(bk, 32) / 2 * 32;
                    for jb in 0..bn.div_ceil(32) {
                        let (mut fast, mut plain) = (vec![7u32; panel], vec![9u32; panel]);
                        // SAFETY: B is bk×bn through (rs, cs); both hold one panel.
                        unsafe {
                            pack_b_panel(&mut fast, a, bk, bn, jb);
                            pack_b_panel_plain(&mut plain, a, bk, bn, jb);
                        }
                        assert_eq!(fast, plain, "B {bk}×{bn} strides ({rs}, {cs}) panel {jb}");
                    }
                }
            }
        }
    }
}

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
    fn round_to_nearest_even_edge_cases() {
        // Exactly representable values are unchanged.
        for x in [0.0f32, 1.0, -2.5, 0.15625, 65280.0, f32::MIN_POSITIVE] {
            assert_eq!(round_bf16(x), x);
        }
        // Ties go to the even significand: 1 + 2⁻⁸ is halfway between 1 and 1 + 2⁻⁷.
        assert_eq!(f32_to_bf16_bits(1.0 + 2f32.powi(-8)), 0x3f80);
        // 1 + 3·2⁻⁸ is halfway between 1 + 2⁻⁷ (odd) and 1 + 2·2⁻⁷ (even): up.
        assert_eq!(f32_to_bf16_bits(1.0 + 3.0 * 2f32.powi(-8)), 0x3f82);
        assert_eq!(f32_to_bf16_bits(-(1.0 + 3.0 * 2f32.powi(-8))), 0xbf82);
        // Just above and below a tie round to the nearest.
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3f81_7fff)), 0x3f81);
        // Infinities stay, NaN stays NaN (quiet, sign kept), even a NaN whose payload is only in
        // the low bits (truncation would make it ∞).
        assert_eq!(f32_to_bf16_bits(f32::INFINITY), 0x7f80);
        assert_eq!(f32_to_bf16_bits(f32::NEG_INFINITY), 0xff80);
        assert!(round_bf16(f32::NAN).is_nan());
        assert!(round_bf16(f32::from_bits(0x7f80_0001)).is_nan());
        assert!(round_bf16(f32::from_bits(0xff80_0001)).is_nan());
        assert!(round_bf16(f32::from_bits(0xff80_0001)).is_sign_negative());
        // f32::MAX rounds up past bf16's largest finite value to ∞; bf16's largest value stays.
        assert_eq!(round_bf16(f32::MAX), f32::INFINITY);
        assert_eq!(round_bf16(f32::MIN), f32::NEG_INFINITY);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x7f7f_0000)), 0x7f7f);
        // Signed zeros kept; subnormals flush to signed zero (as VCVTNEPS2BF16).
        assert_eq!(f32_to_bf16_bits(-0.0), 0x8000);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x0000_0001)), 0x0000);
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x807f_ffff)), 0x8000);
    }

    /// The rounding agrees with candle's f32 → bf16 conversion (`half::bf16::from_f32`, RNE) on
    /// every normal, infinite and NaN input class, over a sweep of bit patterns that includes the
    /// ties (low 16 bits 0x8000) on both sides.
    #[test]
    fn rounding_matches_candle_bf16() {
        use candle_core::{DType, Device, Tensor};
        let xs: Vec<f32> = (0u32..1 << 20)
            .map(|i| {
                let bits = i.wrapping_mul(4099);
                // Every other one an exact tie (low 16 bits 0x8000).
                f32::from_bits(if i & 1 == 0 {
                    bits
                } else {
                    (bits & 0xffff_0000) | 0x8000
                })
            })
            .filter(|x| !x.is_subnormal())
            .collect();
        let theirs = Tensor::from_slice(&xs, xs.len(), &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::BF16))
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.to_vec1::<f32>())
            .unwrap();
        for (&x, &t) in xs.iter().zip(&theirs) {
            let ours = round_bf16(x);
            assert!(
                ours.to_bits() == t.to_bits() || (ours.is_nan() && t.is_nan()),
                "{x:e} ({:#x}): {ours:e} vs {t:e}",
                x.to_bits()
            );
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
