//! The exact search: every stored f32 embedding scored against the query.
//!
//! This is the reference the compact and approximate searches are measured against (recall and
//! speed), and the fallback for tensors that are not plain CPU f32 storage.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

/// Top-k rows of `matrix` (N, P) by dot product with `query` (P,), best first.
///
/// A search reads every embedding once, so it is bound by memory bandwidth: on the CPU the rows
/// are scanned in parallel straight from the tensor's storage, each thread keeping its own best
/// k; elsewhere it is one matrix–vector product and a partial selection.
pub fn top_k(matrix: &Tensor, query: &Tensor, k: usize) -> Result<Vec<(usize, f32)>> {
    let (n, p) = matrix.dims2()?;
    if n == 0 || k == 0 {
        return Ok(vec![]);
    }
    let k = k.min(n);
    let q = query
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?;
    if q.len() != p {
        bail!("the query has {} values, the index {p} per image", q.len());
    }
    if let Some(hits) = crate::nn::dispatch::with_host_f32(matrix, |data| scan_top_k(data, p, &q, k)) {
        return Ok(hits);
    }
    let qt = Tensor::new(q.as_slice(), matrix.device())?.unsqueeze(1)?;
    let scores = matrix.matmul(&qt)?.squeeze(1)?.to_vec1::<f32>()?;
    Ok(select(scores.into_iter().enumerate().collect(), k))
}

/// Best first; ties by index so results are deterministic.
fn by_score(a: &(usize, f32), b: &(usize, f32)) -> Ordering {
    b.1.partial_cmp(&a.1).unwrap_or(Ordering::Equal).then(a.0.cmp(&b.0))
}

/// The k best (index, score) pairs, best first.
pub fn select(mut v: Vec<(usize, f32)>, k: usize) -> Vec<(usize, f32)> {
    if k == 0 {
        return vec![];
    }
    if k < v.len() {
        v.select_nth_unstable_by(k - 1, by_score);
        v.truncate(k);
    }
    v.sort_by(by_score);
    v
}

/// The exact scan over a row-major slice of `p`-wide rows (today's search, kept as the reference).
pub fn scan_top_k(data: &[f32], p: usize, q: &[f32], k: usize) -> Vec<(usize, f32)> {
    const ROWS: usize = 16_384;
    let best: Vec<(usize, f32)> = data
        .par_chunks(ROWS * p)
        .enumerate()
        .flat_map_iter(|(c, chunk)| {
            let scores: Vec<(usize, f32)> = chunk
                .chunks_exact(p)
                .enumerate()
                .map(|(r, row)| (c * ROWS + r, row.iter().zip(q).map(|(a, b)| a * b).sum::<f32>()))
                .collect();
            select(scores, k)
        })
        .collect();
    select(best, k)
}

/// The best `k` of a stream of (index, score) pairs, kept in a min-heap so a long scan allocates
/// only k slots and rejects most rows with one comparison.
pub struct TopK {
    k: usize,
    heap: BinaryHeap<Worst>,
}

/// Heap order: the worst kept pair on top.
#[derive(PartialEq)]
struct Worst(usize, f32);

impl Eq for Worst {}

impl PartialOrd for Worst {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Worst {
    fn cmp(&self, other: &Self) -> Ordering {
        by_score(&(self.0, self.1), &(other.0, other.1))
    }
}

impl TopK {
    pub fn new(k: usize) -> Self {
        Self {
            k,
            heap: BinaryHeap::with_capacity(k + 1),
        }
    }

    /// The score a new pair must beat to be kept (−∞ until k pairs are held).
    pub fn threshold(&self) -> f32 {
        if self.heap.len() < self.k {
            f32::NEG_INFINITY
        } else {
            self.heap.peek().map_or(f32::NEG_INFINITY, |w| w.1)
        }
    }

    pub fn push(&mut self, index: usize, score: f32) {
        if self.k == 0 || score.is_nan() {
            return;
        }
        if self.heap.len() < self.k {
            self.heap.push(Worst(index, score));
        } else if by_score(&(index, score), &self.heap.peek().map(|w| (w.0, w.1)).unwrap()) == Ordering::Less {
            self.heap.pop();
            self.heap.push(Worst(index, score));
        }
    }

    /// Folds another partial result in (for per-thread heaps).
    pub fn merge(mut self, other: TopK) -> TopK {
        for w in other.heap {
            self.push(w.0, w.1);
        }
        self
    }

    /// Best first.
    pub fn into_sorted(self) -> Vec<(usize, f32)> {
        let mut v: Vec<(usize, f32)> = self.heap.into_iter().map(|w| (w.0, w.1)).collect();
        v.sort_by(by_score);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parallel_scan_agrees_with_a_matrix_product() {
        let (n, p) = (40_000, 8);
        let data: Vec<f32> = (0..n * p)
            .map(|i| ((i * 7919 % 10007) as f32 / 10007.0) - 0.5)
            .collect();
        let m = Tensor::from_vec(data, (n, p), &Device::Cpu).unwrap();
        let q = Tensor::new(&[0.3f32, -0.1, 0.5, 0.2, -0.4, 0.1, 0.0, 0.7], &Device::Cpu).unwrap();
        let fast = top_k(&m, &q, 7).unwrap();
        let scores = m
            .matmul(&q.unsqueeze(1).unwrap())
            .unwrap()
            .squeeze(1)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let slow = select(scores.clone().into_iter().enumerate().collect(), 7);
        assert_eq!(
            fast.iter().map(|x| x.0).collect::<Vec<_>>(),
            slow.iter().map(|x| x.0).collect::<Vec<_>>()
        );
        assert!(fast.windows(2).all(|w| w[0].1 >= w[1].1));
        // A strided (non-contiguous) matrix takes the matmul path and gives the same answer.
        let t = m.t().unwrap().contiguous().unwrap().t().unwrap();
        assert_eq!(
            top_k(&t, &q, 7).unwrap().iter().map(|x| x.0).collect::<Vec<_>>(),
            fast.iter().map(|x| x.0).collect::<Vec<_>>()
        );
        // The heap selection keeps the same best 7 as sorting everything.
        let mut heap = TopK::new(7);
        for (i, s) in scores.iter().enumerate() {
            heap.push(i, *s);
        }
        assert_eq!(heap.into_sorted(), slow);
    }
}
