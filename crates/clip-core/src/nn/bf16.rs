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
use rayon::prelude::*;

/// What this processor (and OS) offers for bf16 GEMMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Support {
    /// AMX tiles with bf16 (`amx_tile` + `amx_bf16`) and the OS's permission to use them.
    Amx,
    /// AVX512-BF16 (`VDPBF16PS`) only. [`gemm_bf16`] does not use it yet (on Sapphire Rapids it
    /// issues at half the rate of an fp32 FMA, so it pays only through halved memory traffic).
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

fn amx_disabled_by_env() -> bool {
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
/// blocks of 256, row panels of 32 in parallel on rayon. Elsewhere the rounded operands go
/// through the fp32 `gemm` crate: the same numbers, slower than AMX. The two differ only in the
/// order of the fp32 sums (measured ≤ 5e-7·Σ|aᵢbᵢ| per element against an f64 product of the
/// rounded inputs, far below the ~2⁻⁸ relative error of rounding the inputs to bf16) and in
/// subnormal products, which AMX flushes to zero (the fp32 path follows MXCSR: no flushing).
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
    if mn == 0 {
        return Ok(Vec::new());
    }
    if k == 0 {
        return Ok(vec![0.0; mn]);
    }
    if amx {
        if !amx_usable() {
            bail!("gemm_bf16: AMX requested on a CPU or OS without AMX bf16 tiles")
        }
        Ok(amx::gemm(a, b, m, k, n))
    } else {
        Ok(gemm_fallback(a, b, m, k, n))
    }
}

/// The fallback: round both operands to bf16 values (kept in f32) and multiply in fp32.
fn gemm_fallback(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let ra: Vec<f32> = a.par_iter().map(|&x| round_bf16(x)).collect();
    let rb: Vec<f32> = b.par_iter().map(|&x| round_bf16(x)).collect();
    let mut c = vec![0.0f32; m * n];
    let par = if m * n * k >= 1 << 18 {
        gemm::Parallelism::Rayon(rayon::current_num_threads().max(1))
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: `c` is m×n, `ra` m×k and `rb` k×n, all row-major and contiguous (column stride 1,
    // row stride n, k, n), so every index gemm forms is in bounds; read_dst is false, so the
    // destination's initial contents are not read.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            ra.as_ptr(),
            1,
            k as isize,
            rb.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    };
    c
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod amx {
    use super::f32_to_bf16_bits;
    use crate::nn::vmath::vectorized;
    use rayon::prelude::*;

    /// `dst[i] = bf16(src[i])` (the rest of `dst` is left as is).
    #[inline(always)]
    fn convert(dst: &mut [u16], src: &[f32]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = f32_to_bf16_bits(s);
        }
    }

    /// Panel `jb` of B (columns 32jb..32jb+32, zero past n and k) in the VNNI-2 layout.
    #[inline(always)]
    fn pack_b_panel(dst: &mut [u32], b: &[f32], k: usize, n: usize, jb: usize) {
        let j0 = jb * 32;
        let w = (n - j0).min(32);
        for (pr, out) in dst.chunks_exact_mut(32).enumerate() {
            let r = 2 * pr;
            if r >= k {
                break;
            }
            let even = &b[r * n + j0..r * n + j0 + w];
            if r + 1 < k {
                let odd = &b[(r + 1) * n + j0..(r + 1) * n + j0 + w];
                for ((o, &x), &y) in out.iter_mut().zip(even).zip(odd) {
                    *o = u32::from(f32_to_bf16_bits(x)) | u32::from(f32_to_bf16_bits(y)) << 16;
                }
            } else {
                for (o, &x) in out.iter_mut().zip(even) {
                    *o = u32::from(f32_to_bf16_bits(x));
                }
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

    /// The 32×32 micro-kernel, C += A·B: C is 32×32 f32 at `c` (row stride `ldc` elements),
    /// A 32 rows × `kc` bf16 at `a` (row stride `lda` elements), B VNNI-2 packed, `kc`/2 pair-rows
    /// of 32 pairs (64 u16) at `b`, row stride `ldb` u16. Tiles: tmm0–3 the four 16×16 C
    /// quadrants (loaded from `c`, stored back), tmm4/5 A rows 0–15 / 16–31, tmm6/7 B columns
    /// 0–15 / 16–31; 4 `tdpbf16ps` (16×16×32 each) per 32 of K, the whole K loop inside.
    ///
    /// # Safety
    /// AMX permission granted ([`request_permission`]); `kc` a non-zero multiple of 32; `a` valid
    /// for 32 rows of `kc` elements at stride `lda`; `b` for `kc / 2` rows of 64 u16 at stride
    /// `ldb`; `c` valid for reads and writes of 32 rows of 32 f32 at stride `ldc`.
    unsafe fn kernel_32x32(a: *const u16, lda: usize, b: *const u16, ldb: usize, kc: usize, c: *mut f32, ldc: usize) {
        let sb = ldb * 2;
        // SAFETY: the caller guarantees the permission and the extents of A, B and C read and
        // written here. The whole configure / compute / store / release sequence is in this one
        // block (tile state is per thread and not preserved across blocks), and every tile is
        // declared clobbered.
        unsafe {
            core::arch::asm!(
                "ldtilecfg [{cfg}]",
                "tileloadd tmm0, [{c} + {sc}*1]",
                "tileloadd tmm1, [{c} + {sc}*1 + 64]",
                "tileloadd tmm2, [{c2} + {sc}*1]",
                "tileloadd tmm3, [{c2} + {sc}*1 + 64]",
                "2:",
                "tileloadd tmm4, [{a} + {sa}*1]",
                "tileloadd tmm5, [{a2} + {sa}*1]",
                "tileloadd tmm6, [{b} + {sb}*1]",
                "tileloadd tmm7, [{b} + {sb}*1 + 64]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "add {a}, 64",
                "add {a2}, 64",
                "add {b}, {bstep}",
                "dec {kb}",
                "jnz 2b",
                "tilestored [{c} + {sc}*1], tmm0",
                "tilestored [{c} + {sc}*1 + 64], tmm1",
                "tilestored [{c2} + {sc}*1], tmm2",
                "tilestored [{c2} + {sc}*1 + 64], tmm3",
                "tilerelease",
                cfg = in(reg) &CFG,
                a = inout(reg) a => _,
                a2 = inout(reg) a.add(16 * lda) => _,
                b = inout(reg) b => _,
                kb = inout(reg) kc / 32 => _,
                sa = in(reg) lda * 2,
                sb = in(reg) sb,
                bstep = in(reg) 16 * sb,
                c = in(reg) c,
                c2 = in(reg) c.add(16 * ldc),
                sc = in(reg) ldc * 4,
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

    /// [`super::gemm_bf16`] on AMX. Requires the permission (checked by the caller), m, k, n ≥ 1.
    pub(super) fn gemm(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        gemm_kc(a, b, m, k, n, KC)
    }

    /// A as mp × kp bf16 (row-major, zero padding) and B as VNNI-2 panels (see below).
    pub(super) fn pack(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> (Vec<u16>, Vec<u32>) {
        let (mp, kp, np) = (round_up(m, 32), round_up(k, 32), round_up(n, 32));
        // A: mp × kp bf16, row-major, zero padding.
        let mut ap = vec![0u16; mp * kp];
        ap.par_chunks_mut(kp).zip(a.par_chunks(k)).for_each(|(dst, src)| {
            vectorized(
                #[inline(always)]
                || convert(dst, src),
            )
        });
        // B: VNNI-2, one contiguous panel per 32 columns (kp/2 pair-rows of 32 pairs), a pair
        // as one u32 with the even row in the low half (the first bf16 in memory): panel jb,
        // pair-row r/2, column j: bp[jb·(kp/2)·32 + (r/2)·32 + (j − 32jb)] = B[r][j] | B[r+1][j] << 16.
        let panel = kp / 2 * 32;
        let mut bp = vec![0u32; np / 32 * panel];
        bp.par_chunks_mut(panel).enumerate().for_each(|(jb, dst)| {
            vectorized(
                #[inline(always)]
                || pack_b_panel(dst, b, k, n, jb),
            )
        });
        (ap, bp)
    }

    /// [`gemm`] with K blocks of `kc` (a non-zero multiple of 32; larger than K means one block).
    pub(super) fn gemm_kc(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, kc: usize) -> Vec<f32> {
        assert!(
            kc > 0 && kc.is_multiple_of(32),
            "K block {kc} not a positive multiple of 32"
        );
        let (kp, np) = (round_up(k, 32), round_up(n, 32));
        let panel = kp / 2 * 32;
        let (ap, bp) = pack(a, b, m, k, n);
        let mut c = vec![0.0f32; m * n];
        c.par_chunks_mut(32 * n).enumerate().for_each(|(ib, rows)| {
            // This row panel's 32 × np f32 result, accumulated over the K blocks.
            let mut acc = vec![0.0f32; 32 * np];
            let a_panel = &ap[ib * 32 * kp..(ib + 1) * 32 * kp];
            for k0 in (0..kp).step_by(kc) {
                let kh = kc.min(kp - k0);
                for (jb, b_panel) in bp.chunks_exact(panel).enumerate() {
                    // SAFETY: permission checked by the caller; kh is a non-zero multiple of 32;
                    // from a_panel[k0..], 32 rows of kh at stride kp (k0 + kh ≤ kp); from
                    // b_panel[k0/2·32..], kh/2 rows of 32 u32 = 64 u16 (the panel has kp/2); from
                    // acc[32·jb..], 32 rows of 32 f32 at stride np (32·jb + 32 ≤ np).
                    unsafe {
                        kernel_32x32(
                            a_panel.as_ptr().add(k0),
                            kp,
                            b_panel.as_ptr().add(k0 / 2 * 32).cast::<u16>(),
                            64,
                            kh,
                            acc.as_mut_ptr().add(32 * jb),
                            np,
                        )
                    };
                }
            }
            for (dst, src) in rows.chunks_exact_mut(n).zip(acc.chunks_exact(np)) {
                dst.copy_from_slice(&src[..n]);
            }
        });
        c
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod amx {
    pub(super) fn request_permission() -> bool {
        false
    }

    pub(super) fn gemm(_: &[f32], _: &[f32], _: usize, _: usize, _: usize) -> Vec<f32> {
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
                let got = amx::gemm_kc(&a, &b, m, k, n, kc);
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
            let t = time(&mut || {
                std::hint::black_box(amx::pack(&a, &b, m, k, n));
            });
            println!("  of which packing A and B to bf16: {:.3} ms", t * 1e3);
            for kc in [amx::KC, 1 << 20] {
                let t = time(&mut || {
                    std::hint::black_box(amx::gemm_kc(&a, &b, m, k, n, kc));
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
