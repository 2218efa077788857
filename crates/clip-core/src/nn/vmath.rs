//! Element-wise maths the compiler can vectorise, and a way to run a loop with the processor's
//! widest vector instructions.
//!
//! The crate is built for baseline x86-64 (SSE2), so a plain loop runs four lanes at a time at
//! best, and `f32::exp` is a call into libm per element, which no loop around it vectorises.
//! `perf` on ViT-B/32 inference: QuickGELU's forward (one libm `expf` per activation) took 10 %
//! of the time, the attention kernel's 4-lane dot products 11 %. [`vectorized`] runs a closure
//! compiled for AVX-512 or AVX2+FMA where the processor has them (chosen at run time, as the
//! `gemm` crate does, through the same `pulp` crate), and [`exp`] is plain arithmetic, so a loop
//! calling it becomes 16 (or 8) lanes at a time.

/// Runs `f` compiled with the best vector instruction set this processor has (AVX-512, else
/// AVX2 + FMA, else the baseline). Only code inlined into the dispatching function gets those
/// instructions, and the compiler inlines a closure only when it is small: mark the closure
/// `#[inline(always)]` and make it one call of an `#[inline(always)]` function that holds the
/// loops (`perf` showed a softmax whose closure was not inlined running 4 lanes, not 16).
#[inline(always)]
pub(crate) fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
}

/// e^x in f32, within 2 ulp of `f32::exp` for x in [−87.3, 88.4], exactly 0 below (where e^x is
/// subnormal or 0 in f32) and infinite above; NaN stays NaN. Cephes' `expf`: x = n·ln 2 + r with |r| ≤ ln2 / 2, a
/// degree-6 polynomial for e^r, and 2^n written into the exponent bits. Written without calls or
/// branches so that a loop of it vectorises.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n·LN2_HI is exact for |n| ≤ 128.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2^23 rounds to the nearest integer (no fast-math in Rust, so
    // the compiler keeps both).
    const ROUND: f32 = 12_582_912.0;
    const HI: f32 = 88.376_26;
    const LO: f32 = -87.336_55;
    let xc = x.clamp(LO, HI);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
        * r
        + 0.5;
    let er = p * r * r + r + 1.0;
    // n ∈ [−126, 127]: 2^n is a normal float.
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    let y = er * scale;
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        y
    }
}

/// σ(x) = 1 / (1 + e^(−x)), through [`exp`].
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// Partial sums kept apart, so that a sum vectorises: the compiler may not reorder one f32
/// accumulator's additions, but it maps 16 independent ones onto vector lanes.
const LANES: usize = 16;

/// Σ f(a_i, b_i) over two equally long slices, in [`LANES`] partial sums.
#[inline(always)]
fn lane_sum2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (xa, xb) in ca.zip(cb) {
        for ((s, &x), &y) in acc.iter_mut().zip(xa).zip(xb) {
            *s += f(x, y);
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(&x, &y)| f(x, y)).sum();
    acc.iter().sum::<f32>() + tail
}

/// max a_i (−∞ for none), in lanes; NaN values are skipped.
#[inline(always)]
pub fn max(a: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = a.chunks_exact(LANES);
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    for c in chunks {
        for (m, &x) in acc.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    acc.iter().fold(tail, |m, &x| m.max(x))
}

/// Σ a_i.
#[inline(always)]
pub fn sum(a: &[f32]) -> f32 {
    lane_sum2(a, a, |x, _| x)
}

/// Σ a_i·b_i over the shorter length's worth of both (they should be equally long).
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    lane_sum2(&a[..n], &b[..n], |x, y| x * y)
}

/// Σ (a_i − c)².
#[inline(always)]
pub fn sum_sq_dev(a: &[f32], c: f32) -> f32 {
    lane_sum2(a, a, |x, _| (x - c) * (x - c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_matches_libm_within_two_ulp() {
        let mut worst = (0, 0.0f32);
        let mut x = -87.3f32;
        while x < 88.3 {
            let u = ulps(exp(x), x.exp());
            if u > worst.0 {
                worst = (u, x);
            }
            x += 0.000_37;
        }
        assert!(worst.0 <= 2, "{} ulp at x = {}", worst.0, worst.1);
        for x in [0.0f32, -0.0, 1.0, -1.0, 1e-8, -1e-8, 88.3, -87.3] {
            assert!(ulps(exp(x), x.exp()) <= 2, "x = {x}: {} vs {}", exp(x), x.exp());
        }
    }

    #[test]
    fn exp_at_the_ends() {
        assert_eq!(exp(-1e9), 0.0, "a masked score gets no weight");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(1e9), f32::INFINITY);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(sigmoid(-1e9), 0.0);
        assert_eq!(sigmoid(1e9), 1.0);
    }

    #[test]
    fn lane_sums() {
        let a: Vec<f32> = (0..37).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..37).map(|i| 1.0 - i as f32 * 0.25).collect();
        let close = |x: f32, y: f64| ((x as f64 - y).abs() <= 1e-5 * y.abs().max(1.0), x, y);
        let want_sum: f64 = a.iter().map(|&v| v as f64).sum();
        let want_dot: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
        let want_dev: f64 = a.iter().map(|&v| (v as f64 - 3.0).powi(2)).sum();
        for (got, want) in [
            (sum(&a), want_sum),
            (dot(&a, &b), want_dot),
            (sum_sq_dev(&a, 3.0), want_dev),
        ] {
            assert!(close(got, want).0, "{got} against {want}");
        }
        assert_eq!(sum(&[]), 0.0);
        assert_eq!(max(&b), 1.0);
        assert_eq!(max(&a), 18.0);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        assert_eq!(sum(&a[..5]), 5.0, "shorter than the lanes: the tail alone");
    }

    #[test]
    fn a_vectorized_loop_gives_the_scalar_results() {
        let xs: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.173).collect();
        let mut ys = vec![0f32; xs.len()];
        vectorized(
            #[inline(always)]
            || {
                for (y, &x) in ys.iter_mut().zip(&xs) {
                    *y = exp(x);
                }
            },
        );
        for (&y, &x) in ys.iter().zip(&xs) {
            assert_eq!(y.to_bits(), exp(x).to_bits(), "x = {x}");
        }
    }
}
