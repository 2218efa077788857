//! Learned absolute position embeddings, as both text towers (BERT's family and CLIP's text
//! transformer) add them to the token embeddings.

use anyhow::Result;
use candle_core::{Module, Tensor};

use crate::nn::Embedding;
use crate::params::ParamBuilder;

/// One learned vector per position, up to the checkpoint's `max_position_embeddings`: a caption
/// longer than the table is refused with a hint, not indexed past it.
pub struct PositionEmbedding {
    table: Embedding,
    max_positions: usize,
}

impl PositionEmbedding {
    /// The table `pb` names (`…position_embedding(s).weight`), of `max_positions` rows of `dim`,
    /// drawn from N(0, std²).
    pub fn new(pb: &ParamBuilder, max_positions: usize, dim: usize, std: f64) -> Result<Self> {
        Ok(Self {
            table: Embedding::new(pb, max_positions, dim, std)?,
            max_positions,
        })
    }

    /// The embeddings of positions 0 … L − 1 for every caption of `input_ids` (B, L): (B, L, dim).
    pub fn forward(&self, input_ids: &Tensor) -> candle_core::Result<Tensor> {
        let (b, l) = input_ids.dims2()?;
        if l > self.max_positions {
            candle_core::bail!(
                "captions of {l} tokens exceed the text tower's {} positions: lower data.max_length",
                self.max_positions
            )
        }
        let pos = Tensor::arange(0u32, l as u32, input_ids.device())?
            .unsqueeze(0)?
            .broadcast_as((b, l))?
            .contiguous()?;
        self.table.forward(&pos)
    }
}
