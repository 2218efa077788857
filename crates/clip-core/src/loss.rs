//! Contrastive losses over a batch of B image and B text embeddings, where pair i is (image i, text i).

use anyhow::Result;
use candle_core::{Tensor, D};

use crate::nn::normalize::l2_normalize;

/// ln(1/0.07): CLIP's initial logit scale.
pub const CLIP_INIT_LOGIT_SCALE: f64 = 2.659_260_036_932_778;
/// ln(100): CLIP clamps the scale so logits stay below 100.
pub const CLIP_MAX_LOGIT_SCALE: f64 = 4.605_170_185_988_092;

/// log-softmax written with differentiable ops (max-shifted for stability).
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

fn softmax(x: &Tensor) -> Result<Tensor> {
    Ok(log_softmax(x)?.exp()?)
}

/// Row-wise cross-entropy against soft targets, (B,) per row: −Σ_j t_ij log softmax(x)_ij.
fn soft_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    Ok((targets * log_softmax(logits)?)?.sum(D::Minus1)?.neg()?)
}

/// The tutorial's loss: logits = text·imageᵀ / T; targets = softmax((image·imageᵀ + text·textᵀ)/2 · T);
/// cross-entropy both ways, averaged. Gradients flow through the targets too, as in the tutorial.
pub fn soft_loss(image: &Tensor, text: &Tensor, temperature: f64) -> Result<Tensor> {
    let logits = (text.matmul(&image.t()?)? / temperature)?;
    let images_similarity = image.matmul(&image.t()?)?;
    let texts_similarity = text.matmul(&text.t()?)?;
    let targets = softmax(&(((images_similarity + texts_similarity)? / 2.0)? * temperature)?)?;
    let texts_loss = soft_cross_entropy(&logits, &targets)?;
    let images_loss = soft_cross_entropy(&logits.t()?, &targets.t()?)?;
    Ok(((images_loss + texts_loss)? / 2.0)?.mean_all()?)
}

/// The CLIP paper's loss: cosine similarities × exp(logit_scale) (scale clamped at ln 100),
/// symmetric cross-entropy against the diagonal.
///
/// `positives` (B×B, 1 where pairs i and j share an image or a caption) makes every right answer
/// count: each row's loss is −log of the probability given to *all* its positives. Without it, a
/// batch of captions made from class labels ("a photo of a shirt" ten times) asks the model to
/// tell identical captions apart — impossible, and it drags the text embeddings of similar
/// classes together. With distinct pairs `positives` is the identity and the loss is CLIP's.
pub fn clip_loss(image: &Tensor, text: &Tensor, logit_scale: &Tensor, positives: Option<&Tensor>) -> Result<Tensor> {
    let b = image.dim(0)?;
    let img = l2_normalize(image)?;
    let txt = l2_normalize(text)?;
    let scale = logit_scale.clamp(f64::NEG_INFINITY, CLIP_MAX_LOGIT_SCALE)?.exp()?;
    let logits = img.matmul(&txt.t()?)?.broadcast_mul(&scale)?;
    let mask = match positives {
        Some(p) => p.detach(),
        None => Tensor::eye(b, candle_core::DType::F32, image.device())?,
    };
    let i2t = positive_nll(&logits, &mask)?.mean_all()?;
    let t2i = positive_nll(&logits.t()?, &mask.t()?)?.mean_all()?;
    Ok(((i2t + t2i)? / 2.0)?)
}

/// Per row: −log Σ_{j positive} softmax(logits)_j, via a masked log-sum-exp.
fn positive_nll(logits: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let lp = log_softmax(logits)?;
    // log(0) for the negatives, as −1e9 so the max-shift below stays finite.
    let masked = (lp + ((mask - 1.0)? * 1e9)?)?;
    let max = masked.max_keepdim(D::Minus1)?.detach();
    let lse = (masked.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + max)?;
    Ok(lse.squeeze(D::Minus1)?.neg()?)
}

/// The `clip` loss of a model that cannot tell pairs apart (uniform predictions): the mean over
/// rows of −ln(k_i / B), k_i the positives of row i — ln B when every pair is distinct.
pub fn clip_chance(positives: &Tensor) -> Result<f64> {
    let b = positives.dim(0)? as f64;
    let k = positives.sum(1)?.to_vec1::<f32>()?;
    Ok(k.iter().map(|&k| -(k as f64 / b).ln()).sum::<f64>() / k.len().max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32], r: usize, c: usize) -> Tensor {
        Tensor::from_vec(v.to_vec(), (r, c), &Device::Cpu).unwrap()
    }

    #[test]
    fn clip_loss_with_identity_positives_is_clip_and_duplicates_lower_it() {
        let img = t(&[1.0, 0.2, 0.1, 0.9, 0.5, 0.5], 3, 2);
        let txt = t(&[0.9, 0.1, 0.2, 1.0, 0.6, 0.4], 3, 2);
        let s = Tensor::new(2.0f32, &Device::Cpu).unwrap();
        let plain = clip_loss(&img, &txt, &s, None).unwrap().to_scalar::<f32>().unwrap();
        let eye = Tensor::eye(3, candle_core::DType::F32, &Device::Cpu).unwrap();
        let same = clip_loss(&img, &txt, &s, Some(&eye))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((plain - same).abs() < 1e-6);
        // By hand: logits = e²·cos, loss = mean of −log softmax diagonal, both ways.
        let ci = l2_normalize(&img)
            .unwrap()
            .matmul(&l2_normalize(&txt).unwrap().t().unwrap())
            .unwrap();
        let l = (ci * 2f64.exp()).unwrap().to_vec2::<f32>().unwrap();
        let mut want = 0.0;
        #[allow(clippy::needless_range_loop)]
        for i in 0..3 {
            let row: f32 = (0..3).map(|j| l[i][j].exp()).sum();
            let col: f32 = (0..3).map(|j| l[j][i].exp()).sum();
            want += -(l[i][i].exp() / row).ln() - (l[i][i].exp() / col).ln();
        }
        assert!((plain - want / 6.0).abs() < 1e-4, "{plain} vs {}", want / 6.0);
        // Pairs 0 and 1 share a caption: either answer is right, so the loss can only fall.
        let dup = t(&[1., 1., 0., 1., 1., 0., 0., 0., 1.], 3, 3);
        let with_dup = clip_loss(&img, &txt, &s, Some(&dup))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(with_dup < plain);
        assert!((clip_chance(&eye).unwrap() - 3f64.ln()).abs() < 1e-9);
        assert!((clip_chance(&dup).unwrap() - (2.0 * (1.5f64).ln() + 3f64.ln()) / 3.0).abs() < 1e-9);
    }
}
