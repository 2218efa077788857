//! Rows scaled to unit length, and their cosines: how embeddings are compared. The loss, the
//! evaluation and every search use them ([`crate::embed`] names them for the programs).

use anyhow::Result;
use candle_core::{Tensor, D};

/// L2-normalises each row: embeddings are compared by cosine, as dot products of unit rows.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = (x.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?;
    Ok(x.broadcast_div(&norm)?)
}

/// Cosine similarity matrix (B_images × B_texts), for reports and retrieval.
pub fn cosine_similarity(image: &Tensor, text: &Tensor) -> Result<Tensor> {
    Ok(l2_normalize(image)?.matmul(&l2_normalize(text)?.t()?)?)
}
