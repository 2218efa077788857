//! Using embeddings: ranking captions for an image and images for a caption, and recall@K.

use anyhow::Result;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// Recall@1/5/10 in both directions.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Recall {
    pub i2t_r1: f64,
    pub i2t_r5: f64,
    pub i2t_r10: f64,
    pub t2i_r1: f64,
    pub t2i_r5: f64,
    pub t2i_r10: f64,
}

impl Recall {
    /// `sim`: (images × texts) similarities; `text_image[j]`: the image caption j belongs to.
    ///
    /// Image → text: an image is found at K when any of its captions is among its K best.
    /// Text → image: a caption is found at K when its image is among its K best.
    pub fn compute(sim: &[Vec<f32>], text_image: &[usize]) -> Self {
        let n_img = sim.len();
        let mut i2t = [0usize; 3];
        let mut t2i = [0usize; 3];
        let ks = [1usize, 5, 10];
        for (i, row) in sim.iter().enumerate() {
            let order = argsort_desc(row);
            let first = order.iter().position(|&j| text_image[j] == i).unwrap_or(usize::MAX);
            for (c, k) in ks.iter().enumerate() {
                i2t[c] += (first < *k) as usize;
            }
        }
        for (j, &img) in text_image.iter().enumerate() {
            let col: Vec<f32> = (0..n_img).map(|i| sim[i][j]).collect();
            let order = argsort_desc(&col);
            let rank = order.iter().position(|&i| i == img).unwrap_or(usize::MAX);
            for (c, k) in ks.iter().enumerate() {
                t2i[c] += (rank < *k) as usize;
            }
        }
        let (ni, nt) = (n_img.max(1) as f64, text_image.len().max(1) as f64);
        Self {
            i2t_r1: i2t[0] as f64 / ni,
            i2t_r5: i2t[1] as f64 / ni,
            i2t_r10: i2t[2] as f64 / ni,
            t2i_r1: t2i[0] as f64 / nt,
            t2i_r5: t2i[1] as f64 / nt,
            t2i_r10: t2i[2] as f64 / nt,
        }
    }
}

/// Indices sorting `v` from largest to smallest (stable, NaN last).
pub fn argsort_desc(v: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| {
        v[b].partial_cmp(&v[a])
            .unwrap_or_else(|| v[a].is_nan().cmp(&v[b].is_nan()))
    });
    idx
}

/// Softmax of a row of scores scaled by `scale` (CLIP's logit scale), for "probability" columns.
pub fn softmax(scores: &[f32], scale: f32) -> Vec<f32> {
    let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = scores.iter().map(|s| ((s - max) * scale).exp()).collect();
    let z: f32 = e.iter().sum();
    e.iter().map(|x| x / z).collect()
}

/// A (rows × cols) tensor as nested vectors.
pub fn to_rows(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(t.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recall_counts_any_caption_of_an_image() {
        // 2 images, 3 captions: captions 0,1 belong to image 0, caption 2 to image 1.
        let sim = vec![vec![0.1, 0.9, 0.5], vec![0.8, 0.2, 0.3]];
        let r = Recall::compute(&sim, &[0, 0, 1]);
        assert_eq!(r.i2t_r1, 0.5); // image 0 → caption 1 (its own); image 1 → caption 0 (wrong)
        assert_eq!(r.i2t_r5, 1.0);
        // caption 0 → image 1 (wrong), caption 1 → image 0 (right), caption 2 → image 0 (wrong)
        assert!((r.t2i_r1 - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(r.t2i_r5, 1.0);
    }

    #[test]
    fn argsort_and_softmax() {
        assert_eq!(argsort_desc(&[0.1, 0.7, 0.3]), vec![1, 2, 0]);
        let p = softmax(&[1.0, 1.0], 10.0);
        assert!((p[0] - 0.5).abs() < 1e-6);
    }
}
