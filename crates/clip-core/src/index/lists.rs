//! Inverted lists (IVF): the rows of a segment grouped around k-means centroids, so a query
//! scans only the few groups nearest to it.
//!
//! The int8 scan reads every code (256 bytes a photo), so at 10,000,000 photos it still reads
//! 2.5 GB a query; an HNSW graph avoids that but takes hours to build on two cores at a million
//! photos. Lists are the middle way, as in faiss's `IndexIVF`: spherical k-means on a sample
//! (√N centroids) takes seconds, assigning every row is one matrix product per chunk, and a
//! query scores the centroids, then scans the int8 codes of its `probes` nearest lists only,
//! and the caller re-scores the best candidates exactly. The lists keep their own copy of the
//! codes in list order (a quarter of the f32 rows' memory again), so each list is one sequential
//! read: scattered rows cost several times more per byte.
//!
//! Photos cluster (similar shots, the same subjects), which is what makes this work; recall
//! against the exact scan is measured by `cargo xtask bench search` and a test.

use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::quant::{dot_f32, dot_i8, quantize, Int8Rows};
use super::scan::{select, TopK};

/// Segments with at least this many rows get lists; below, the int8 scan takes a few ms.
pub const LISTS_MIN_ROWS: usize = 50_000;

/// k-means rounds over the sample: the assignment barely changes after a handful.
const ROUNDS: usize = 8;
/// Sample rows per centroid for training them.
const SAMPLE_PER_LIST: usize = 32;
/// Rows assigned per matrix product (its scores: CHUNK × lists floats, 200 MB at 3,000 lists).
const CHUNK: usize = 16_384;

/// Centroids and, per centroid, the rows nearest to it.
#[derive(Debug, Clone)]
pub struct Lists {
    dim: usize,
    /// (lists, dim), L2-normalised.
    centroids: Vec<f32>,
    /// `rows[offsets[l]..offsets[l + 1]]` are list l's rows, ascending.
    offsets: Vec<u32>,
    rows: Vec<u32>,
    /// The rows' int8 codes in the order of `rows`.
    codes: Int8Rows,
}

/// Lists for `n` rows: about √n, at least 16 (and at most n).
pub fn list_count(n: usize) -> usize {
    ((n as f64).sqrt().round() as usize).max(16).min(n.max(1))
}

/// Lists a query scans: a quarter, so that its true neighbours are almost always among them.
/// Measured on `bench_search`'s clustered synthetic embeddings (1,000,000 × 256, 1,000 lists),
/// recall@10 after re-ranking: 0.85 probing 16 lists, 0.92 probing 62, 0.96 probing 125, 0.99
/// probing 250.
pub fn default_probes(lists: usize) -> usize {
    lists.div_ceil(4).max(8).min(lists)
}

impl Lists {
    /// Trains centroids on an evenly spaced sample of `data` (row-major, `dim` wide, rows
    /// L2-normalised) and assigns every row; `codes` are the rows' int8 codes.
    pub fn build(data: &[f32], dim: usize, codes: &Int8Rows) -> Result<Self> {
        let n = data.len() / dim.max(1);
        let centroids = train_centroids(data, dim, list_count(n))?;
        let mut assignment = Vec::with_capacity(n);
        for chunk in data.chunks(CHUNK * dim) {
            assignment.extend(assign(&centroids, dim, chunk)?);
        }
        Ok(Self::from_assignment(dim, centroids, &assignment, codes))
    }

    /// From trained centroids and each row's list (for data assigned a chunk at a time).
    pub fn from_assignment(dim: usize, centroids: Vec<f32>, assignment: &[u32], codes: &Int8Rows) -> Self {
        let lists = centroids.len() / dim;
        let mut offsets = vec![0u32; lists + 1];
        for &l in assignment {
            offsets[l as usize + 1] += 1;
        }
        for l in 0..lists {
            offsets[l + 1] += offsets[l];
        }
        let mut next: Vec<u32> = offsets[..lists].to_vec();
        let mut rows = vec![0u32; assignment.len()];
        for (r, &l) in assignment.iter().enumerate() {
            rows[next[l as usize] as usize] = r as u32;
            next[l as usize] += 1;
        }
        let codes = in_order(codes, &rows);
        Self {
            dim,
            centroids,
            offsets,
            rows,
            codes,
        }
    }

    /// From stored parts; `None` when they do not fit together or with the `codes` of the rows.
    pub fn from_parts(centroids: Vec<f32>, offsets: Vec<u32>, rows: Vec<u32>, codes: &Int8Rows) -> Option<Self> {
        let (dim, n) = (codes.dim(), codes.len());
        let lists = centroids.len() / dim.max(1);
        let ok = dim > 0
            && centroids.len() == lists * dim
            && offsets.len() == lists + 1
            && offsets.first() == Some(&0)
            && offsets.windows(2).all(|w| w[0] <= w[1])
            && *offsets.last()? as usize == rows.len()
            && rows.len() == n
            && rows.iter().all(|&r| (r as usize) < n);
        ok.then(|| Self {
            dim,
            centroids,
            codes: in_order(codes, &rows),
            offsets,
            rows,
        })
    }

    pub fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn centroids(&self) -> &[f32] {
        &self.centroids
    }

    pub fn offsets(&self) -> &[u32] {
        &self.offsets
    }

    pub fn rows(&self) -> &[u32] {
        &self.rows
    }

    /// The best `candidates` rows of the `probes` lists nearest to `q`, by int8 score (the
    /// caller re-scores them exactly); rows for which `keep` is false are skipped.
    pub fn search(
        &self,
        q: &[f32],
        candidates: usize,
        probes: usize,
        keep: &(dyn Fn(usize) -> bool + Sync),
    ) -> Vec<(usize, f32)> {
        let scored: Vec<(usize, f32)> = self
            .centroids
            .chunks_exact(self.dim)
            .map(|c| dot_f32(c, q))
            .enumerate()
            .collect();
        let nearest = select(scored, probes.clamp(1, self.len()));
        let mut qc = vec![0i8; self.dim];
        let qs = quantize(q, &mut qc);
        nearest
            .par_iter()
            .fold(
                || TopK::new(candidates),
                |mut top, &(l, _)| {
                    for p in self.offsets[l] as usize..self.offsets[l + 1] as usize {
                        let (c, s) = self.codes.row(p);
                        let score = dot_i8(c, &qc) as f32 * s * qs;
                        let r = self.rows[p] as usize;
                        if score >= top.threshold() && keep(r) {
                            top.push(r, score);
                        }
                    }
                    top
                },
            )
            .reduce(|| TopK::new(candidates), TopK::merge)
            .into_sorted()
    }
}

/// The codes of `rows`, in that order.
fn in_order(codes: &Int8Rows, rows: &[u32]) -> Int8Rows {
    let dim = codes.dim();
    let mut c = Vec::with_capacity(rows.len() * dim);
    let mut s = Vec::with_capacity(rows.len());
    for &r in rows {
        let (row, scale) = codes.row(r as usize);
        c.extend_from_slice(row);
        s.push(scale);
    }
    Int8Rows::from_parts(dim, c, s).unwrap_or_else(|| Int8Rows::new(dim))
}

/// Spherical k-means: `lists` centroids trained on an evenly spaced sample of the rows, starting
/// from evenly spaced rows of it (deterministic: the same data gives the same lists).
pub fn train_centroids(data: &[f32], dim: usize, lists: usize) -> Result<Vec<f32>> {
    let n = data.len() / dim.max(1);
    ensure!(n > 0 && lists > 0 && lists <= n, "{lists} lists for {n} rows");
    let take = (lists * SAMPLE_PER_LIST).min(n);
    let sample: Vec<f32> = (0..take)
        .flat_map(|i| {
            let r = i * n / take;
            data[r * dim..(r + 1) * dim].iter().copied()
        })
        .collect();
    let mut centroids: Vec<f32> = (0..lists)
        .flat_map(|l| {
            let r = l * take / lists;
            sample[r * dim..(r + 1) * dim].iter().copied()
        })
        .collect();
    for _ in 0..ROUNDS {
        let assignment = assign(&centroids, dim, &sample)?;
        let mut sums = vec![0f32; lists * dim];
        let mut counts = vec![0usize; lists];
        for (row, &l) in sample.chunks_exact(dim).zip(&assignment) {
            counts[l as usize] += 1;
            for (s, x) in sums[l as usize * dim..][..dim].iter_mut().zip(row) {
                *s += x;
            }
        }
        for l in 0..lists {
            // An empty list keeps its centroid (it may win rows in the next round).
            let sum = &sums[l * dim..(l + 1) * dim];
            let norm = sum.iter().map(|x| x * x).sum::<f32>().sqrt();
            if counts[l] > 0 && norm > 0.0 {
                for (c, s) in centroids[l * dim..(l + 1) * dim].iter_mut().zip(sum) {
                    *c = s / norm;
                }
            }
        }
    }
    Ok(centroids)
}

/// Each row's nearest centroid (largest dot product), as one matrix product.
pub fn assign(centroids: &[f32], dim: usize, rows: &[f32]) -> Result<Vec<u32>> {
    let (lists, n) = (centroids.len() / dim, rows.len() / dim);
    if n == 0 {
        return Ok(vec![]);
    }
    let c = Tensor::from_slice(centroids, (lists, dim), &Device::Cpu)?;
    let x = Tensor::from_slice(rows, (n, dim), &Device::Cpu)?;
    Ok(x.matmul(&c.t()?)?.argmax(1)?.to_vec1::<u32>()?)
}
