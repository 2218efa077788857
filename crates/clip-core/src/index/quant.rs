//! Compact embeddings: int8 codes with one f32 scale per vector, and the scan over them.
//!
//! A query reads every stored vector, so the exact f32 scan is bound by memory bandwidth; int8
//! codes are a quarter of the bytes. Each vector is scaled by its own largest magnitude, so a
//! component's rounding error stays under 1/254 of it and int8 scores rank almost exactly like
//! f32 ones; the few best candidates are then re-scored with their exact f32 embeddings, which
//! makes the final order and scores exact.

use rayon::prelude::*;

use super::scan::TopK;

/// Embeddings as int8 codes (row-major, `dim` per row) and a scale per row: row ≈ scale × codes.
#[derive(Debug, Clone, Default)]
pub struct Int8Rows {
    dim: usize,
    codes: Vec<i8>,
    scales: Vec<f32>,
}

/// Quantises one vector into `out`; returns its scale (0 for an all-zero or non-finite vector).
pub fn quantize(row: &[f32], out: &mut [i8]) -> f32 {
    let max = row.iter().fold(0f32, |m, x| m.max(x.abs()));
    if max == 0.0 || !max.is_finite() {
        out.fill(0);
        return 0.0;
    }
    let inv = 127.0 / max;
    for (o, x) in out.iter_mut().zip(row) {
        *o = (x * inv).round().clamp(-127.0, 127.0) as i8;
    }
    max / 127.0
}

impl Int8Rows {
    pub fn new(dim: usize) -> Self {
        Self { dim, ..Self::default() }
    }

    /// Quantises a row-major f32 matrix of `dim`-wide rows.
    pub fn from_f32(data: &[f32], dim: usize) -> Self {
        let mut codes = vec![0i8; data.len()];
        let scales = codes
            .par_chunks_mut(dim)
            .zip(data.par_chunks(dim))
            .map(|(c, r)| quantize(r, c))
            .collect();
        Self { dim, codes, scales }
    }

    /// From stored parts; `None` when their sizes disagree.
    pub fn from_parts(dim: usize, codes: Vec<i8>, scales: Vec<f32>) -> Option<Self> {
        (dim > 0 && codes.len() == scales.len() * dim).then_some(Self { dim, codes, scales })
    }

    /// Adds another set's rows after these.
    pub fn append(&mut self, other: &Int8Rows) {
        assert_eq!(self.dim, other.dim, "appending codes of another width");
        self.codes.extend_from_slice(&other.codes);
        self.scales.extend_from_slice(&other.scales);
    }

    pub fn push(&mut self, row: &[f32]) {
        let start = self.codes.len();
        self.codes.resize(start + self.dim, 0);
        let s = quantize(row, &mut self.codes[start..]);
        self.scales.push(s);
    }

    pub fn len(&self) -> usize {
        self.scales.len()
    }

    pub fn is_empty(&self) -> bool {
        self.scales.is_empty()
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn codes(&self) -> &[i8] {
        &self.codes
    }

    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// Row `i`'s codes and scale.
    pub fn row(&self, i: usize) -> (&[i8], f32) {
        (&self.codes[i * self.dim..(i + 1) * self.dim], self.scales[i])
    }

    /// The `k` rows with the best int8 scores against `q` (approximate scores), best first;
    /// rows for which `keep` is false are skipped (deleted photos).
    pub fn scan_top_k(&self, q: &[f32], k: usize, keep: &(dyn Fn(usize) -> bool + Sync)) -> Vec<(usize, f32)> {
        const ROWS: usize = 4096;
        if self.is_empty() || k == 0 {
            return vec![];
        }
        let mut qc = vec![0i8; self.dim];
        let qs = quantize(q, &mut qc);
        let dim = self.dim;
        self.codes
            .par_chunks(ROWS * dim)
            .enumerate()
            .fold(
                || (TopK::new(k), vec![0i32; ROWS]),
                |(mut top, mut dots), (c, chunk)| {
                    let rows = chunk.len() / dim;
                    dot_rows(chunk, &qc, &mut dots[..rows]);
                    let base = c * ROWS;
                    let mut floor = top.threshold();
                    for (r, &d) in dots[..rows].iter().enumerate() {
                        let s = d as f32 * self.scales[base + r] * qs;
                        if s >= floor && keep(base + r) {
                            top.push(base + r, s);
                            floor = top.threshold();
                        }
                    }
                    (top, dots)
                },
            )
            .map(|(top, _)| top)
            .reduce(|| TopK::new(k), TopK::merge)
            .into_sorted()
    }

    /// The compact search: the best `candidates` rows by int8 score, re-scored with `exact` (the
    /// row's true f32 dot product with the query) and cut to the best `k`, best first.
    pub fn search(
        &self,
        q: &[f32],
        k: usize,
        candidates: usize,
        keep: &(dyn Fn(usize) -> bool + Sync),
        exact: impl FnMut(usize) -> f32,
    ) -> Vec<(usize, f32)> {
        let rough = self.scan_top_k(q, candidates.max(k), keep);
        rerank(rough.into_iter().map(|(i, _)| i), k, exact)
    }
}

/// Re-scores candidate rows with `exact` and keeps the best `k`, best first.
pub fn rerank(
    rows: impl IntoIterator<Item = usize>,
    k: usize,
    mut exact: impl FnMut(usize) -> f32,
) -> Vec<(usize, f32)> {
    let mut top = TopK::new(k);
    for i in rows {
        top.push(i, exact(i));
    }
    top.into_sorted()
}

/// The f32 dot product (re-ranking and exact scores).
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The int8 dot product of two code vectors, with the widest SIMD the CPU has.
pub fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { dot_i8_avx2(a, b) };
    }
    dot_i8_plain(a, b)
}

/// `out[r]` = codes of row r · q, for consecutive rows of `q.len()` codes.
fn dot_rows(codes: &[i8], q: &[i8], out: &mut [i32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { dot_rows_avx2(codes, q, out) };
    }
    dot_rows_plain(codes, q, out)
}

/// Written so the compiler vectorises it (sign-extend, multiply-add pairs): the same code is
/// compiled again below with AVX2 enabled and chosen at run time, since the default x86-64
/// target only assumes SSE2. Wrapping arithmetic (it cannot overflow: 127² × 65,536 < 2³¹ for
/// any embedding width up to 65,536) keeps debug builds' overflow checks from de-vectorising it.
#[inline(always)]
fn dot_i8_plain(a: &[i8], b: &[i8]) -> i32 {
    let mut acc = [0i32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..16 {
            acc[l] = acc[l].wrapping_add((x[l] as i32).wrapping_mul(y[l] as i32));
        }
    }
    let tail = ra
        .iter()
        .zip(rb)
        .fold(0i32, |s, (&x, &y)| s.wrapping_add((x as i32).wrapping_mul(y as i32)));
    acc.iter().fold(tail, |s, &v| s.wrapping_add(v))
}

#[inline(always)]
fn dot_rows_plain(codes: &[i8], q: &[i8], out: &mut [i32]) {
    for (o, row) in out.iter_mut().zip(codes.chunks_exact(q.len())) {
        *o = dot_i8_plain(row, q);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_i8_avx2(a: &[i8], b: &[i8]) -> i32 {
    dot_i8_plain(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_rows_avx2(codes: &[i8], q: &[i8], out: &mut [i32]) {
    dot_rows_plain(codes, q, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int8_codes_keep_dot_products_within_a_percent() {
        let dim = 64;
        let data: Vec<f32> = (0..dim * 50)
            .map(|i| ((i * 7919 % 10007) as f32 / 10007.0) - 0.5)
            .collect();
        let rows = Int8Rows::from_f32(&data, dim);
        assert_eq!(rows.len(), 50);
        let q: Vec<f32> = data[..dim].to_vec();
        let mut qc = vec![0i8; dim];
        let qs = quantize(&q, &mut qc);
        for r in 0..50 {
            let (c, s) = rows.row(r);
            let exact = dot_f32(&data[r * dim..(r + 1) * dim], &q);
            let approx = dot_i8(c, &qc) as f32 * s * qs;
            assert!((exact - approx).abs() < 0.01 * dot_f32(&q, &q), "{exact} vs {approx}");
            assert_eq!(dot_i8(c, &qc), dot_i8_plain(c, &qc));
        }
        // An all-zero vector has scale 0, not NaN.
        let mut z = vec![1i8; 4];
        assert_eq!(quantize(&[0.0; 4], &mut z), 0.0);
        assert_eq!(z, vec![0; 4]);
    }
}
