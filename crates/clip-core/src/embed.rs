//! Embedding many images or captions in evaluation mode, a batch at a time.
//!
//! Each batch's embeddings are detached: the model's weights are `Var`s, so an undetached output
//! keeps its whole forward graph (every activation of the batch) alive for a backward pass that
//! never comes. Keeping all batches of 10,000 images that way took 16 GB; detached, the
//! embeddings are all that stays.

use anyhow::Result;
use candle_core::{Device, Tensor};

use crate::data::{ImageStore, TextTokenizer};
// Defined beside the layers (the loss uses them too), and named here, where embeddings are made.
use crate::model::ClipModel;
pub use crate::nn::normalize::{cosine_similarity, l2_normalize};

/// Embeddings (N, P) of images of the store, `chunk` at a time.
pub fn embed_store_images(
    model: &ClipModel,
    store: &ImageStore,
    images: &[usize],
    chunk: usize,
    device: &Device,
) -> Result<Tensor> {
    // One `no_grad` scope for all batches: what the layers prepare from their weights is reused.
    crate::nn::no_grad(|| {
        let mut parts = vec![];
        for c in images.chunks(chunk.max(1)) {
            let x = store.batch_tensor(c, None, device)?;
            parts.push(model.embed_images(&x)?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    })
}

/// Embeddings (N, P) of captions, `chunk` at a time.
pub fn embed_texts(
    model: &ClipModel,
    tok: &TextTokenizer,
    texts: &[&str],
    chunk: usize,
    device: &Device,
) -> Result<Tensor> {
    crate::nn::no_grad(|| {
        let mut parts = vec![];
        for c in texts.chunks(chunk.max(1)) {
            let (ids, mask) = tok.encode_batch(c, device)?;
            parts.push(model.embed_texts(&ids, &mask)?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    })
}
