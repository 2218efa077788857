//! Embedding many images or captions in evaluation mode, a batch at a time.

use anyhow::Result;
use candle_core::{Device, Tensor};

use crate::data::{ImageStore, TextTokenizer};
use crate::model::ClipModel;

/// Embeddings (N, P) of images of the store, `chunk` at a time.
pub fn embed_store_images(
    model: &ClipModel,
    store: &ImageStore,
    images: &[usize],
    chunk: usize,
    device: &Device,
) -> Result<Tensor> {
    let mut parts = vec![];
    for c in images.chunks(chunk.max(1)) {
        let x = store.batch_tensor(c, None, device)?;
        parts.push(model.encode_image(&x, false)?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// Embeddings (N, P) of captions, `chunk` at a time.
pub fn embed_texts(
    model: &ClipModel,
    tok: &TextTokenizer,
    texts: &[&str],
    chunk: usize,
    device: &Device,
) -> Result<Tensor> {
    let mut parts = vec![];
    for c in texts.chunks(chunk.max(1)) {
        let (ids, mask) = tok.encode_batch(c, device)?;
        parts.push(model.encode_text(&ids, &mask, false)?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}
