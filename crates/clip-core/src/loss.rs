//! Contrastive losses over a batch of B image and B text embeddings, where pair i is (image i, text i).

use anyhow::Result;
use candle_core::{Tensor, D};

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

/// L2-normalises each row.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = (x.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?;
    Ok(x.broadcast_div(&norm)?)
}

/// The CLIP paper's loss: cosine similarities × exp(logit_scale) (scale clamped at ln 100),
/// symmetric cross-entropy against the diagonal.
pub fn clip_loss(image: &Tensor, text: &Tensor, logit_scale: &Tensor) -> Result<Tensor> {
    let b = image.dim(0)?;
    let img = l2_normalize(image)?;
    let txt = l2_normalize(text)?;
    let scale = logit_scale
        .clamp(f64::NEG_INFINITY, CLIP_MAX_LOGIT_SCALE)?
        .exp()?;
    let logits = img.matmul(&txt.t()?)?.broadcast_mul(&scale)?;
    let eye = Tensor::eye(b, candle_core::DType::F32, image.device())?;
    let i2t = soft_cross_entropy(&logits, &eye)?.mean_all()?;
    let t2i = soft_cross_entropy(&logits.t()?, &eye)?.mean_all()?;
    Ok(((i2t + t2i)? / 2.0)?)
}

/// Cosine similarity matrix (B_images × B_texts), for reports and retrieval.
pub fn cosine_similarity(image: &Tensor, text: &Tensor) -> Result<Tensor> {
    Ok(l2_normalize(image)?.matmul(&l2_normalize(text)?.t()?)?)
}
