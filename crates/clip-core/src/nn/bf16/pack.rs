//! Packing GEMM operands to bf16 with AVX-512 (`VCVTNE2PS2BF16`, register transposes): the AMX
//! kernel's A panels and VNNI-2 B panels, written from fp32 operands read in place.
//!
//! Why: written as plain loops, packing took 17 % of a ViT-B/32 bf16 training step (`perf`,
//! 2-core Xeon), against 30 % for the AMX kernel itself; the transposed operands (a weight read
//! as Wᵀ in the forward pass, dyᵀ in dW = dyᵀ·x) went one element at a time. Here 16×16 blocks
//! are transposed in registers (four shuffle stages) and converted 32 values per instruction.
//! The conversion is the hardware's: round to nearest even, subnormal inputs to ±0, NaN quiet —
//! exactly [`super::f32_to_bf16_bits`], which the plain-loop packers (and the fallback) use.
//!
//! Every processor with AMX-BF16 has AVX512-BF16; [`usable`] still checks, and the callers keep
//! the plain loops for a processor without it (and for operands with neither stride 1).

#![allow(clippy::missing_safety_doc)]

use super::MatRef;
use std::arch::x86_64::*;

/// Whether this processor has the instructions these packers use.
#[inline]
pub(super) fn usable() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512bf16")
}

/// The low `n` bits set (n ≤ 16).
#[inline(always)]
fn mask16(n: usize) -> __mmask16 {
    if n >= 16 {
        0xffff
    } else {
        ((1u32 << n) - 1) as __mmask16
    }
}

/// The low `n` bits set (n ≤ 32).
#[inline(always)]
fn mask32(n: usize) -> __mmask32 {
    if n >= 32 {
        u32::MAX
    } else {
        (1u32 << n) - 1
    }
}

/// 16 rows of 16 f32 (or u32) transposed in registers: unpack 32-bit and 64-bit pairs within
/// 128-bit lanes, then two rounds of 128-bit lane shuffles.
#[inline]
#[target_feature(enable = "avx512f")]
fn transpose16(r: &mut [__m512; 16]) {
    let mut a = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        a[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    let mut b = [_mm512_setzero_ps(); 16];
    for i in 0..4 {
        let pd = _mm512_castps_pd;
        let ps = _mm512_castpd_ps;
        b[4 * i] = ps(_mm512_unpacklo_pd(pd(a[4 * i]), pd(a[4 * i + 2])));
        b[4 * i + 1] = ps(_mm512_unpackhi_pd(pd(a[4 * i]), pd(a[4 * i + 2])));
        b[4 * i + 2] = ps(_mm512_unpacklo_pd(pd(a[4 * i + 1]), pd(a[4 * i + 3])));
        b[4 * i + 3] = ps(_mm512_unpackhi_pd(pd(a[4 * i + 1]), pd(a[4 * i + 3])));
    }
    // b[4i + c], 128-bit lane L, holds column 4L + c of rows 4i..4i+4.
    for c in 0..4 {
        let s0 = _mm512_shuffle_f32x4::<0x44>(b[c], b[4 + c]);
        let s1 = _mm512_shuffle_f32x4::<0xee>(b[c], b[4 + c]);
        let s2 = _mm512_shuffle_f32x4::<0x44>(b[8 + c], b[12 + c]);
        let s3 = _mm512_shuffle_f32x4::<0xee>(b[8 + c], b[12 + c]);
        r[c] = _mm512_shuffle_f32x4::<0x88>(s0, s2);
        r[4 + c] = _mm512_shuffle_f32x4::<0xdd>(s0, s2);
        r[8 + c] = _mm512_shuffle_f32x4::<0x88>(s1, s3);
        r[12 + c] = _mm512_shuffle_f32x4::<0xdd>(s1, s3);
    }
}

/// 32 values (fewer at the end: `n` ≤ 32, the rest zero) from `src` as bf16, lane i = src[i].
///
/// # Safety
/// `src` readable for `n` f32.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn load32(src: *const f32, n: usize) -> __m512i {
    // SAFETY: masked loads read only the first n values.
    let (lo, hi) = unsafe {
        (
            _mm512_maskz_loadu_ps(mask16(n), src),
            _mm512_maskz_loadu_ps(mask16(n.saturating_sub(16)), src.add(16.min(n))),
        )
    };
    // The second argument fills the low half.
    // SAFETY: both are 512 bits of plain data.
    unsafe { std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo)) }
}

/// `dst[..n] = bf16(src[..n])`.
///
/// # Safety
/// `src` readable and `dst` writable for `n` elements.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn convert(dst: *mut u16, src: *const f32, n: usize) {
    let mut i = 0;
    while i < n {
        let len = (n - i).min(32);
        // SAFETY: len values from i on, within both.
        unsafe {
            let v = load32(src.add(i), len);
            _mm512_mask_storeu_epi16(dst.add(i).cast(), mask32(len), v);
        }
        i += 32;
    }
}

/// Rows i0..i0+32 of a transposed A (rs = 1: each column's rows contiguous, columns `a.cs`
/// apart) as 32 × kp bf16, row-major, zero past m and k: 16×16 blocks transposed in registers.
///
/// # Safety
/// A readable at (i < m, p < k) as `ptr + i + p·cs`; `dst` holds 32·kp, kp a multiple of 32 ≥ k.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn a_panel_transposed(dst: &mut [u16], a: MatRef, i0: usize, m: usize, k: usize, kp: usize) {
    assert!(dst.len() >= 32 * kp && kp.is_multiple_of(32) && kp >= k && a.rs == 1);
    let rows = (m - i0).min(32);
    for h in 0..2 {
        let r0 = 16 * h;
        let n = rows.saturating_sub(r0).min(16);
        let out = &mut dst[r0 * kp..(r0 + 16) * kp];
        if n == 0 {
            out.fill(0);
            continue;
        }
        for p0 in (0..kp).step_by(16) {
            let mut v = [_mm512_setzero_ps(); 16];
            for (pp, x) in v.iter_mut().enumerate() {
                if p0 + pp < k {
                    // SAFETY: rows i0 + r0 .. + n of column p0 + pp are within A (masked).
                    *x = unsafe { _mm512_maskz_loadu_ps(mask16(n), a.ptr.add(i0 + r0 + (p0 + pp) * a.cs)) };
                }
            }
            transpose16(&mut v);
            for (r, x) in v.iter().enumerate() {
                // SAFETY: 256 bits of plain data; row r of this half, columns p0..p0 + 16 ≤ kp.
                unsafe {
                    let bf = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(*x));
                    _mm256_storeu_si256(out.as_mut_ptr().add(r * kp + p0).cast(), bf)
                };
            }
        }
    }
}

/// Panel `jb` of a row-major B (cs = 1) in the VNNI-2 layout (see `amx::pack_b_panel`): rows
/// 2p and 2p + 1 converted together and interleaved (`VPERMW`).
///
/// # Safety
/// B readable at (p < k, j < n) as `ptr + p·rs + j`; `dst` holds round_up(k, 32)/2 · 32.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn b_panel_rows(dst: &mut [u32], b: MatRef, k: usize, n: usize, jb: usize) {
    assert!(b.cs == 1 && dst.len().is_multiple_of(32) && dst.len() / 32 * 2 >= k);
    let j0 = jb * 32;
    let w = (n - j0).min(32);
    // Lane 2i ← even row's i, lane 2i + 1 ← odd row's i (the odd row is the high half).
    let idx: [i16; 32] = std::array::from_fn(|l| {
        if l % 2 == 0 {
            (l / 2) as i16
        } else {
            (16 + l / 2) as i16
        }
    });
    // SAFETY: 32 i16 values.
    let idx = unsafe { _mm512_loadu_si512(idx.as_ptr().cast()) };
    for (pr, out) in dst.chunks_exact_mut(32).enumerate() {
        let r = 2 * pr;
        for half in 0..2 {
            let c0 = 16 * half;
            let cols = w.saturating_sub(c0).min(16);
            let mut rows = [_mm512_setzero_ps(); 2];
            for (d, x) in rows.iter_mut().enumerate() {
                if r + d < k && cols > 0 {
                    // SAFETY: columns j0 + c0 .. + cols of row r + d are within B (masked).
                    *x = unsafe { _mm512_maskz_loadu_ps(mask16(cols), b.ptr.add((r + d) * b.rs + j0 + c0)) };
                }
            }
            // SAFETY: both are 512 bits of plain data.
            let v = unsafe { std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(rows[1], rows[0])) };
            let v = _mm512_permutexvar_epi16(idx, v);
            // SAFETY: 16 u32 of this pair-row's 32.
            unsafe { _mm512_storeu_si512(out.as_mut_ptr().add(c0).cast(), v) };
        }
    }
}

/// Panel `jb` of a transposed B (rs = 1: a weight W read as Wᵀ, each column contiguous) in the
/// VNNI-2 layout: a column's bf16 values read as u32 are its pairs already, so 16 columns × 16
/// pairs are converted and transposed as a 16×16 u32 block.
///
/// # Safety
/// B readable at (p < k, j < n) as `ptr + p + j·cs`; `dst` holds round_up(k, 32)/2 · 32.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn b_panel_transposed(dst: &mut [u32], b: MatRef, k: usize, n: usize, jb: usize) {
    assert!(b.rs == 1 && dst.len().is_multiple_of(32 * 16) && dst.len() / 32 * 2 >= k);
    let j0 = jb * 32;
    let w = (n - j0).min(32);
    let pairs = dst.len() / 32;
    for half in 0..2 {
        let c0 = 16 * half;
        let cols = w.saturating_sub(c0).min(16);
        for q0 in (0..pairs).step_by(16) {
            let r0 = 2 * q0;
            let rn = k.saturating_sub(r0).min(32);
            let mut v = [_mm512_setzero_ps(); 16];
            if rn > 0 {
                for (jj, x) in v.iter_mut().enumerate().take(cols) {
                    // SAFETY: rows r0 .. r0 + rn of column j0 + c0 + jj are within B.
                    *x = _mm512_castsi512_ps(unsafe { load32(b.ptr.add(r0 + (j0 + c0 + jj) * b.cs), rn) });
                }
            }
            transpose16(&mut v);
            for (q, x) in v.iter().enumerate() {
                // SAFETY: pair-row q0 + q < pairs, its columns c0..c0 + 16 of 32.
                unsafe { _mm512_storeu_ps(dst.as_mut_ptr().add((q0 + q) * 32 + c0).cast(), *x) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Throughput of `VDPBF16PS` (AVX512-BF16: 16 lanes × 2 bf16 products per instruction)
    /// against `VFMADD231PS` (16 fp32 products), both on 12 independent register accumulators
    /// (enough to cover either's latency on two ports) —
    /// the measurement issue #33 asks for before any AVX512-BF16 kernel: if the bf16 instruction
    /// does not beat fp32's multiply-adds per second, a kernel on it gains only memory traffic.
    /// Not a test: `cargo test --release -p clip-core --lib vdpbf16ps -- --ignored --nocapture`
    /// on an idle machine.
    #[test]
    #[ignore]
    fn timing_vdpbf16ps_against_fma() {
        if !usable() {
            println!("skipped: no AVX512-BF16 here");
            return;
        }
        #[target_feature(enable = "avx512f,avx512bf16")]
        fn dp(iters: usize) -> f32 {
            // SAFETY: 512 bits of plain data either way.
            let a: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi16(std::hint::black_box(0x3f80))) };
            // SAFETY: as above.
            let b: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi16(std::hint::black_box(0x3c00))) };
            let mut acc = [_mm512_setzero_ps(); 12];
            for _ in 0..iters {
                for x in acc.iter_mut() {
                    *x = _mm512_dpbf16_ps(*x, a, b);
                }
            }
            acc.iter().map(|x| _mm512_reduce_add_ps(*x)).sum()
        }
        #[target_feature(enable = "avx512f")]
        fn fma(iters: usize) -> f32 {
            let (a, b) = (
                _mm512_set1_ps(std::hint::black_box(1.0)),
                _mm512_set1_ps(std::hint::black_box(1e-3)),
            );
            let mut acc = [_mm512_setzero_ps(); 12];
            for _ in 0..iters {
                for x in acc.iter_mut() {
                    *x = _mm512_fmadd_ps(a, b, *x);
                }
            }
            acc.iter().map(|x| _mm512_reduce_add_ps(*x)).sum()
        }
        let iters = 20_000_000;
        for _ in 0..2 {
            let t = std::time::Instant::now();
            // SAFETY: the features were checked by `usable`.
            std::hint::black_box(unsafe { dp(iters) });
            let dp_rate = (iters * 12 * 32) as f64 / t.elapsed().as_secs_f64() / 1e9;
            let t = std::time::Instant::now();
            // SAFETY: as above.
            std::hint::black_box(unsafe { fma(iters) });
            let fma_rate = (iters * 12 * 16) as f64 / t.elapsed().as_secs_f64() / 1e9;
            println!(
                "one thread: VDPBF16PS {dp_rate:.1} G multiply-adds/s, VFMADD231PS {fma_rate:.1} G/s ({:.2}×)",
                dp_rate / fma_rate
            );
        }
    }
}
