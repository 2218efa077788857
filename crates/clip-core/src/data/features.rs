//! Features of a frozen tower, one row per image or caption: what a batch carries instead of the
//! tower's input when the tower's output is cached ([`crate::feature_cache`] fills them).

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

/// Features of many items, deduplicated: item i's row is `row_of[i]`.
#[derive(Debug, Clone)]
pub struct FeatureRows {
    dim: usize,
    /// Distinct rows back to back, each `dim` long.
    data: Vec<f32>,
    /// Row of each item; `u32::MAX` for an item that has none (an image that was not decoded).
    row_of: Vec<u32>,
    /// Where they are stored, and how many rows were found there vs computed now.
    pub file: PathBuf,
    pub reused: usize,
    pub computed: usize,
    /// Rows found damaged in the file (checksum mismatch) and computed again; every row when the
    /// file itself could not be parsed.
    pub damaged: usize,
}

impl FeatureRows {
    /// Rows as the feature cache found or computed them (see [`crate::feature_cache`]).
    pub(crate) fn new(
        dim: usize,
        data: Vec<f32>,
        row_of: Vec<u32>,
        file: PathBuf,
        reused: usize,
        computed: usize,
        damaged: usize,
    ) -> Self {
        Self {
            dim,
            data,
            row_of,
            file,
            reused,
            computed,
            damaged,
        }
    }

    /// Feature size.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Items covered.
    pub fn len(&self) -> usize {
        self.row_of.len()
    }

    pub fn is_empty(&self) -> bool {
        self.row_of.is_empty()
    }

    /// Distinct rows (items with the same input share one).
    pub fn distinct(&self) -> usize {
        self.data.len() / self.dim.max(1)
    }

    /// The rows of some items, back to back.
    pub fn gather(&self, items: &[usize]) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(items.len() * self.dim);
        for &i in items {
            match self.row_of.get(i) {
                Some(&r) if r != u32::MAX => {
                    let r = r as usize * self.dim;
                    out.extend_from_slice(&self.data[r..r + self.dim]);
                }
                _ => bail!("no cached features for item {i} (of {})", self.row_of.len()),
            }
        }
        Ok(out)
    }

    /// The rows of some items as a (N, dim) tensor.
    pub fn tensor(&self, items: &[usize], device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(self.gather(items)?, (items.len(), self.dim), device)?)
    }
}

/// The cached features of a dataset's frozen towers: image rows by image index, text rows by pair
/// index. A tower without rows runs as usual.
#[derive(Debug, Clone, Default)]
pub struct FrozenFeatures {
    pub image: Option<FeatureRows>,
    pub text: Option<FeatureRows>,
}

impl FrozenFeatures {
    pub fn is_empty(&self) -> bool {
        self.image.is_none() && self.text.is_none()
    }
}
