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
        let captions = captions_of(n_img, text_image);
        let mut counts = Counts::default();
        for (i, row) in sim.iter().enumerate() {
            counts.image(captions[i].iter().map(|&j| rank_of(row, j)).min());
        }
        for (j, &img) in text_image.iter().enumerate() {
            let col: Vec<f32> = (0..n_img).map(|i| sim[i][j]).collect();
            counts.caption(rank_of(&col, img));
        }
        counts.recall(n_img, text_image.len())
    }

    /// The same from L2-normalised embeddings, `images` (N, P) and `texts` (M, P), taking the
    /// similarity matrix `chunk` rows at a time: memory grows with `chunk` × (N + M), not N × M
    /// (200,000 pairs at once would be 160 GB of similarities).
    pub fn from_embeddings(images: &Tensor, texts: &Tensor, text_image: &[usize], chunk: usize) -> Result<Self> {
        let (n_img, n_txt) = (images.dim(0)?, texts.dim(0)?);
        anyhow::ensure!(
            text_image.len() == n_txt,
            "{} captions but {} caption embeddings",
            text_image.len(),
            n_txt
        );
        let chunk = chunk.max(1);
        let captions = captions_of(n_img, text_image);
        let mut counts = Counts::default();
        let texts_t = texts.t()?.contiguous()?;
        for from in (0..n_img).step_by(chunk) {
            let len = chunk.min(n_img - from);
            let rows = to_rows(&images.narrow(0, from, len)?.matmul(&texts_t)?)?;
            for (r, row) in rows.iter().enumerate() {
                counts.image(captions[from + r].iter().map(|&j| rank_of(row, j)).min());
            }
        }
        let images_t = images.t()?.contiguous()?;
        for from in (0..n_txt).step_by(chunk) {
            let len = chunk.min(n_txt - from);
            let rows = to_rows(&texts.narrow(0, from, len)?.matmul(&images_t)?)?;
            for (r, row) in rows.iter().enumerate() {
                counts.caption(rank_of(row, text_image[from + r]));
            }
        }
        Ok(counts.recall(n_img, n_txt))
    }
}

/// Hits at K = 1, 5, 10 in each direction.
#[derive(Default)]
struct Counts {
    i2t: [usize; 3],
    t2i: [usize; 3],
}

impl Counts {
    const KS: [usize; 3] = [1, 5, 10];

    /// An image whose best caption of its own is at `rank` (none: it has no caption).
    fn image(&mut self, rank: Option<usize>) {
        let rank = rank.unwrap_or(usize::MAX);
        for (c, k) in Self::KS.iter().enumerate() {
            self.i2t[c] += (rank < *k) as usize;
        }
    }

    /// A caption whose image is at `rank`.
    fn caption(&mut self, rank: usize) {
        for (c, k) in Self::KS.iter().enumerate() {
            self.t2i[c] += (rank < *k) as usize;
        }
    }

    fn recall(&self, n_img: usize, n_txt: usize) -> Recall {
        let (ni, nt) = (n_img.max(1) as f64, n_txt.max(1) as f64);
        Recall {
            i2t_r1: self.i2t[0] as f64 / ni,
            i2t_r5: self.i2t[1] as f64 / ni,
            i2t_r10: self.i2t[2] as f64 / ni,
            t2i_r1: self.t2i[0] as f64 / nt,
            t2i_r5: self.t2i[1] as f64 / nt,
            t2i_r10: self.t2i[2] as f64 / nt,
        }
    }
}

/// Each image's captions.
fn captions_of(n_img: usize, text_image: &[usize]) -> Vec<Vec<usize>> {
    let mut captions = vec![vec![]; n_img];
    for (j, &i) in text_image.iter().enumerate() {
        if let Some(c) = captions.get_mut(i) {
            c.push(j);
        }
    }
    captions
}

/// The position of entry `t` in [`argsort_desc`]`(v)`, counted instead of sorted (O(n)): the
/// entries scoring higher, plus the equal ones before it (the sort is stable; NaN sorts last).
pub fn rank_of(v: &[f32], t: usize) -> usize {
    let x = v[t];
    if x.is_nan() {
        return v.iter().filter(|y| !y.is_nan()).count() + v[..t].iter().filter(|y| y.is_nan()).count();
    }
    v.iter().filter(|&&y| y > x).count() + v[..t].iter().filter(|&&y| y == x).count()
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
    fn counted_ranks_match_the_sort() {
        let v = [0.3, f32::NAN, 0.7, 0.3, -1.0, f32::NAN, 0.7];
        let order = argsort_desc(&v);
        for t in 0..v.len() {
            assert_eq!(rank_of(&v, t), order.iter().position(|&i| i == t).unwrap(), "entry {t}");
        }
    }

    #[test]
    fn chunked_recall_equals_the_whole_matrix() {
        // 23 images with 1–3 captions each, embeddings noisy enough that some are ranked wrong.
        let dev = candle_core::Device::Cpu;
        let (n_img, p) = (23, 8);
        let text_image: Vec<usize> = (0..n_img).flat_map(|i| std::iter::repeat_n(i, 1 + i % 3)).collect();
        let value = |i: usize, k: usize| ((i * 31 + k * 17) as f32 * 0.618_034).fract() - 0.5;
        let img: Vec<f32> = (0..n_img * p).map(|x| value(x / p, x % p)).collect();
        let txt: Vec<f32> = text_image
            .iter()
            .enumerate()
            .flat_map(|(j, &i)| (0..p).map(move |k| value(i, k) + 0.6 * (value(j + 100, k))))
            .collect();
        let img = crate::embed::l2_normalize(&Tensor::from_vec(img, (n_img, p), &dev).unwrap()).unwrap();
        let txt = crate::embed::l2_normalize(&Tensor::from_vec(txt, (text_image.len(), p), &dev).unwrap()).unwrap();
        let whole = Recall::compute(&to_rows(&img.matmul(&txt.t().unwrap()).unwrap()).unwrap(), &text_image);
        assert!(
            whole.i2t_r1 < 1.0 && whole.t2i_r1 < 1.0 && whole.t2i_r10 > 0.0,
            "{whole:?}"
        );
        for chunk in [1, 4, 23, 100] {
            assert_eq!(
                Recall::from_embeddings(&img, &txt, &text_image, chunk).unwrap(),
                whole,
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn argsort_and_softmax() {
        assert_eq!(argsort_desc(&[0.1, 0.7, 0.3]), vec![1, 2, 0]);
        let p = softmax(&[1.0, 1.0], 10.0);
        assert!((p[0] - 0.5).abs() < 1e-6);
    }
}
