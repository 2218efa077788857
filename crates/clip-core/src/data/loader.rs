//! Batches of pairs for training and evaluation, built on a background thread.
//!
//! Captions are tokenised once, when the loader is made; images come from the [`ImageStore`]
//! (in memory, mapped from the image cache, or decoded per batch when streaming). While the
//! model works on one batch, the thread prepares the next two (four when images are decoded per
//! batch: streaming or augmenting), so the model never waits; big batches fewer, so that the
//! queue stays under 512 MiB.
//! The worker hands over plain vectors and the tensors are made on the caller's thread, so the
//! device is only ever touched from there.
//!
//! A frozen tower's features may come from a [`FrozenFeatures`] table instead (see
//! [`crate::feature_cache`]): then a batch carries those rows, and cached images are not even
//! normalised.

use std::ops::Range;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;

use super::features::FrozenFeatures;
use super::tokenizer::{pad, pad_to};
use super::{mix, CropSeed, Dataset, ImageStore, TextTokenizer};
use crate::config::ClipConfig;

/// Batches prepared ahead of the one being used.
const PREFETCH: usize = 2;
/// Batches prepared ahead when each one decodes its images from the files (streaming or
/// augmenting): decoding time varies with the files, so a deeper queue evens it out.
const DECODING_PREFETCH: usize = 4;
/// The most the batches waiting in the queue may weigh: a big batch (512 images of 224² are
/// 308 MB in f32, as `--micro-batch` makes them common) waits alone rather than three deep.
const PREFETCH_BYTES: usize = 512 << 20;

/// How many batches of `batch_size` images `side` pixels square to prepare ahead: `depth`, fewer
/// for big batches ([`PREFETCH_BYTES`]), at least one.
fn prefetch_depth(depth: usize, batch_size: usize, side: usize) -> usize {
    let bytes = batch_size.saturating_mul(3 * side * side * 4).max(1);
    (PREFETCH_BYTES / bytes).clamp(1, depth)
}

/// One batch of B pairs: pair k is (image k, caption k). Cloning shares the tensors.
#[derive(Clone)]
pub struct Batch {
    /// (B, 3, S, S) f32, normalised; an empty (B, 0) CPU tensor when `image_features` is set.
    pub images: Tensor,
    /// (B, L) u32, `[CLS] … [SEP] [PAD]…`, L the longest caption of the batch.
    pub input_ids: Tensor,
    /// (B, L) u32: 1 on tokens, 0 on padding.
    pub attention_mask: Tensor,
    /// Indices into `Dataset::pairs`.
    pub pairs: Vec<usize>,
    /// (B, B) f32: 1 where pairs i and j share their image or their caption, so either is a right
    /// answer for the other. The identity when every image and caption in the batch is distinct;
    /// captions made from class labels repeat many times per batch.
    pub positives: Tensor,
    /// (B, D) pooled image-tower features from the cache of a frozen tower, used instead of
    /// running it (see [`crate::model::ClipModel::forward_batch`]).
    pub image_features: Option<Tensor>,
    /// (B, D) pooled text-tower features from the cache of a frozen tower.
    pub text_features: Option<Tensor>,
    /// The global batch this batch is one rank's share of, in data-parallel training
    /// ([`Loader::batches_sharded`]); `None` for a whole batch.
    pub global: Option<GlobalBatch>,
}

/// The global batch a rank's share belongs to: what the loss over the whole batch needs besides
/// the embeddings every rank gathers.
#[derive(Clone)]
pub struct GlobalBatch {
    /// Indices into `Dataset::pairs`, every rank's share in rank order.
    pub pairs: Vec<usize>,
    /// (G, G) f32: [`Batch::positives`] of the whole batch.
    pub positives: Tensor,
}

/// One rank's part of every batch in data-parallel training: rank `rank` of `ranks` takes the
/// `rank`-th of `ranks` equal slices of each global batch, in the one-process order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub ranks: usize,
}

impl Shard {
    /// One process: the whole batch.
    pub const WHOLE: Shard = Shard { rank: 0, ranks: 1 };

    /// This rank's rows of a global batch of `n` pairs; `None` when the batch is not trained on.
    /// Shares are equal, so a batch uses a multiple of the ranks (an epoch's last, short batch
    /// loses up to `ranks − 1` pairs) and at least 2 pairs, one per rank.
    pub fn rows(&self, n: usize) -> Option<Range<usize>> {
        let used = n - n % self.ranks.max(1);
        let per = used / self.ranks.max(1);
        (used >= self.ranks.max(2)).then(|| self.rank * per..(self.rank + 1) * per)
    }

    /// The batches of `batch_size` an epoch of `n_pairs` yields to every rank.
    pub fn num_batches(&self, n_pairs: usize, batch_size: usize) -> usize {
        if batch_size < 2 {
            return 0;
        }
        n_pairs / batch_size + usize::from(self.rows(n_pairs % batch_size).is_some())
    }
}

impl Batch {
    /// The batch cut into consecutive micro-batches of `size` pairs (the last one shorter when
    /// `size` does not divide it), for a big batch's loss computed in little memory
    /// ([`crate::train::grad_cache`]). Each keeps its rows of every tensor, the caption padding
    /// of the whole batch, and its diagonal block of `positives`.
    pub fn split(&self, size: usize) -> Result<Vec<Batch>> {
        if size == 0 {
            bail!("a micro-batch needs at least one pair");
        }
        let n = self.pairs.len();
        let rows = |t: &Tensor, start: usize, len: usize| -> Result<Tensor> { Ok(t.narrow(0, start, len)?) };
        (0..n)
            .step_by(size)
            .map(|start| {
                let len = size.min(n - start);
                Ok(Batch {
                    images: rows(&self.images, start, len)?,
                    input_ids: rows(&self.input_ids, start, len)?,
                    attention_mask: rows(&self.attention_mask, start, len)?,
                    pairs: self.pairs[start..start + len].to_vec(),
                    positives: self.positives.narrow(0, start, len)?.narrow(1, start, len)?,
                    image_features: self.image_features.as_ref().map(|f| rows(f, start, len)).transpose()?,
                    text_features: self.text_features.as_ref().map(|f| rows(f, start, len)).transpose()?,
                    global: None,
                })
            })
            .collect()
    }
}

/// A distinct, well-mixed shuffle seed for each epoch of a run.
pub fn epoch_seed(seed: u64, epoch: usize) -> u64 {
    mix(seed, epoch as u64)
}

/// The data of a batch, before it becomes tensors.
struct RawBatch {
    images: Vec<f32>,
    ids: Vec<u32>,
    mask: Vec<u32>,
    len: usize,
    pairs: Vec<usize>,
    positives: Vec<f32>,
    /// Cached rows, (B·D), when the batch uses them.
    image_features: Option<(Vec<f32>, usize)>,
    text_features: Option<(Vec<f32>, usize)>,
    /// A share's global batch: its pairs and (G·G) positives.
    global: Option<(Vec<usize>, Vec<f32>)>,
}

/// How the images of a loader's batches are augmented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Augment {
    Off,
    /// New random crops every epoch (`--augment`).
    Random,
    /// View `v` of every image ([`CropSeed::View`]): the crops a distillation teacher embedded.
    View(u64),
}

impl From<bool> for Augment {
    fn from(on: bool) -> Self {
        if on {
            Augment::Random
        } else {
            Augment::Off
        }
    }
}

/// What the worker thread needs, shared with it.
struct Shared {
    store: Arc<ImageStore>,
    /// Token ids of each pair of the dataset, `[CLS] … [SEP]`.
    tokens: Vec<Vec<u32>>,
    /// Image of each pair.
    images: Vec<usize>,
    pad: u32,
}

impl Shared {
    fn raw_batch(
        &self,
        pairs: &[usize],
        crop: Option<CropSeed>,
        features: Option<&FrozenFeatures>,
    ) -> Result<RawBatch> {
        self.raw_share(pairs, 0..pairs.len(), crop, features)
    }

    /// Rows `rows` of the batch `pairs`: their images (or cached features), cropped as in the
    /// whole batch, and captions, padded to the longest of the whole batch; for a share of it,
    /// the whole batch's pairs and positives too.
    fn raw_share(
        &self,
        pairs: &[usize],
        rows: Range<usize>,
        crop: Option<CropSeed>,
        features: Option<&FrozenFeatures>,
    ) -> Result<RawBatch> {
        if let Some(&p) = pairs.iter().find(|&&p| p >= self.tokens.len()) {
            bail!(
                "pair index {p} is out of range: the dataset has {} pairs",
                self.tokens.len()
            );
        }
        let all_images: Vec<usize> = pairs.iter().map(|&p| self.images[p]).collect();
        let all_seqs: Vec<&[u32]> = pairs.iter().map(|&p| self.tokens[p].as_slice()).collect();
        let (mine, image_indices, seqs) = (&pairs[rows.clone()], &all_images[rows.clone()], &all_seqs[rows.clone()]);
        let crop = match crop {
            Some(CropSeed::Batch(seed)) if rows.start > 0 => Some(CropSeed::BatchFrom {
                seed,
                first: rows.start,
            }),
            c => c,
        };
        let cached_image = features.and_then(|f| f.image.as_ref());
        let cached_text = features.and_then(|f| f.text.as_ref());
        let (images, image_features) = match cached_image {
            Some(rows) => (vec![], Some((rows.gather(image_indices)?, rows.dim()))),
            None => (self.store.crop_pixels(image_indices, crop)?, None),
        };
        let text_features = match cached_text {
            Some(rows) => Some((rows.gather(mine)?, rows.dim())),
            None => None,
        };
        let longest = all_seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        let (ids, mask, len) = pad_to(seqs, self.pad, longest);
        let whole = rows.len() == pairs.len();
        Ok(RawBatch {
            images,
            ids,
            mask,
            len,
            pairs: mine.to_vec(),
            positives: positives(image_indices, seqs),
            image_features,
            text_features,
            global: (!whole).then(|| (pairs.to_vec(), positives(&all_images, &all_seqs))),
        })
    }
}

/// (B·B): 1 where pairs i and j share their image or their caption.
fn positives(images: &[usize], seqs: &[&[u32]]) -> Vec<f32> {
    let n = images.len();
    let mut out = Vec::with_capacity(n * n);
    for i in 0..n {
        for j in 0..n {
            let same = i == j || images[i] == images[j] || seqs[i] == seqs[j];
            out.push(if same { 1.0 } else { 0.0 });
        }
    }
    out
}

fn to_batch(raw: RawBatch, size: usize, device: &Device) -> Result<Batch> {
    let b = raw.pairs.len();
    let features = |f: Option<(Vec<f32>, usize)>| -> Result<Option<Tensor>> {
        Ok(match f {
            Some((rows, dim)) => Some(Tensor::from_vec(rows, (b, dim), device)?),
            None => None,
        })
    };
    Ok(Batch {
        // Kept on the CPU: nothing reads it, and some GPU back-ends reject empty allocations.
        images: if raw.image_features.is_some() {
            Tensor::zeros((b, 0), candle_core::DType::F32, &Device::Cpu)?
        } else {
            Tensor::from_vec(raw.images, (b, 3, size, size), device)?
        },
        image_features: features(raw.image_features)?,
        text_features: features(raw.text_features)?,
        input_ids: Tensor::from_vec(raw.ids, (b, raw.len), device)?,
        attention_mask: Tensor::from_vec(raw.mask, (b, raw.len), device)?,
        positives: Tensor::from_vec(raw.positives, (b, b), device)?,
        global: match raw.global {
            Some((pairs, positives)) => {
                let g = pairs.len();
                Some(GlobalBatch {
                    pairs,
                    positives: Tensor::from_vec(positives, (g, g), device)?,
                })
            }
            None => None,
        },
        pairs: raw.pairs,
    })
}

pub struct Loader {
    shared: Arc<Shared>,
    device: Device,
    seed: u64,
}

impl Loader {
    /// Tokenises every caption of `ds` once (in parallel) and checks the tokenizer fits the model.
    pub fn new(
        ds: &Dataset,
        store: Arc<ImageStore>,
        tok: &TextTokenizer,
        cfg: &ClipConfig,
        device: &Device,
    ) -> Result<Loader> {
        tok.check_fits(cfg)?;
        if store.len() != ds.images.len() || store.size() != cfg.image.image_size {
            bail!(
                "the image store ({} images of {} px) was not made from this dataset and config ({} images of {} px)",
                store.len(),
                store.size(),
                ds.images.len(),
                cfg.image.image_size
            );
        }
        let tokens = ds
            .pairs
            .par_iter()
            .map(|p| tok.encode(&p.caption))
            .collect::<Result<Vec<_>>>()?;
        let images = ds.pairs.iter().map(|p| p.image).collect();
        Ok(Loader {
            shared: Arc::new(Shared {
                store,
                tokens,
                images,
                pad: tok.pad_id(),
            }),
            device: device.clone(),
            seed: cfg.seed,
        })
    }

    /// Batches of `batch_size` pairs, shuffled with `shuffle_seed` (in the given order with
    /// `None`), augmented when `augment`. The last partial batch is kept when it has at least 2
    /// pairs (a contrastive loss and BatchNorm need 2) and dropped otherwise.
    pub fn batches(
        &self,
        pairs: &[usize],
        batch_size: usize,
        shuffle_seed: Option<u64>,
        augment: impl Into<Augment>,
    ) -> Batches {
        self.batches_with(pairs, batch_size, shuffle_seed, augment, None)
    }

    /// [`Loader::batches`] whose batches carry the cached features of frozen towers, where
    /// `features` has them (cached images are neither normalised nor augmented).
    pub fn batches_with(
        &self,
        pairs: &[usize],
        batch_size: usize,
        shuffle_seed: Option<u64>,
        augment: impl Into<Augment>,
        features: Option<Arc<FrozenFeatures>>,
    ) -> Batches {
        self.batches_sharded(pairs, batch_size, shuffle_seed, augment, features, Shard::WHOLE)
    }

    /// [`Loader::batches_with`] as rank `shard.rank` of `shard.ranks` sees them: each batch is its
    /// share of the one-process batch (the same order, crops and caption padding), carrying the
    /// whole batch's pairs and positives ([`Batch::global`]). `batch_size` is the global batch.
    pub fn batches_sharded(
        &self,
        pairs: &[usize],
        batch_size: usize,
        shuffle_seed: Option<u64>,
        augment: impl Into<Augment>,
        features: Option<Arc<FrozenFeatures>>,
        shard: Shard,
    ) -> Batches {
        let augment = augment.into();
        let mut batches = Batches {
            rx: None,
            worker: None,
            error: None,
            remaining: 0,
            size: self.shared.store.size(),
            device: self.device.clone(),
        };
        if batch_size < 2 || shard.rank >= shard.ranks || !batch_size.is_multiple_of(shard.ranks) {
            batches.error = Some(anyhow::anyhow!(
                "batch size {batch_size} cannot be cut into {} equal shares of at least one pair (a contrastive batch needs at least 2 pairs)",
                shard.ranks
            ));
            return batches;
        }
        let mut order = pairs.to_vec();
        if let Some(seed) = shuffle_seed {
            order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        }
        // Each global batch that is trained on (its pairs a multiple of the ranks) and this rank's rows.
        let chunks: Vec<(Vec<usize>, Range<usize>)> = order
            .chunks(batch_size)
            .filter_map(|c| {
                let rows = shard.rows(c.len())?;
                Some((c[..c.len() - c.len() % shard.ranks].to_vec(), rows))
            })
            .collect();
        batches.remaining = chunks.len();
        let depth = self.depth(augment, &features, batch_size / shard.ranks);
        let (tx, rx) = sync_channel(depth);
        let shared = Arc::clone(&self.shared);
        // Each batch's augmentation seed depends only on the epoch's seed and the batch's position.
        let aug_base = mix(shuffle_seed.unwrap_or(self.seed), 0xa06);
        let worker = std::thread::Builder::new()
            .name("clipmine-loader".into())
            .spawn(move || {
                for (k, (chunk, rows)) in chunks.into_iter().enumerate() {
                    let crop = match augment {
                        Augment::Off => None,
                        Augment::Random => Some(CropSeed::Batch(mix(aug_base, k as u64))),
                        Augment::View(v) => Some(CropSeed::View(v)),
                    };
                    let raw = shared.raw_share(&chunk, rows, crop, features.as_deref());
                    let failed = raw.is_err();
                    if tx.send(raw).is_err() || failed {
                        break;
                    }
                }
            });
        match worker {
            Ok(w) => (batches.rx, batches.worker) = (Some(rx), Some(w)),
            Err(e) => batches.error = Some(anyhow::anyhow!("cannot start the loader thread: {e}")),
        }
        batches
    }

    /// How many batches of `share` pairs to prepare ahead (see [`prefetch_depth`]).
    fn depth(&self, augment: Augment, features: &Option<Arc<FrozenFeatures>>, share: usize) -> usize {
        let decoding = augment != Augment::Off || self.shared.store.is_streaming();
        let depth = if decoding { DECODING_PREFETCH } else { PREFETCH };
        // Batches that carry the image tower's cached features carry no pixels.
        let pixels = features.as_ref().is_none_or(|f| f.image.is_none());
        if pixels {
            prefetch_depth(depth, share, self.shared.store.size())
        } else {
            depth
        }
    }

    /// One batch of exactly these pairs, in this order, without augmentation (e.g. a fixed
    /// batch to check or to visualise).
    pub fn batch(&self, pairs: &[usize]) -> Result<Batch> {
        self.batch_with(pairs, None)
    }

    /// [`Loader::batch`] carrying the cached features of frozen towers, where `features` has them.
    pub fn batch_with(&self, pairs: &[usize], features: Option<&FrozenFeatures>) -> Result<Batch> {
        to_batch(
            self.shared.raw_batch(pairs, None, features)?,
            self.shared.store.size(),
            &self.device,
        )
    }

    /// Token ids and attention mask (N, L) of some pairs' captions, padded to the longest.
    pub fn text_inputs(&self, pairs: &[usize]) -> Result<(Tensor, Tensor)> {
        if let Some(&p) = pairs.iter().find(|&&p| p >= self.shared.tokens.len()) {
            bail!(
                "pair index {p} is out of range: the dataset has {} pairs",
                self.shared.tokens.len()
            );
        }
        let seqs: Vec<&[u32]> = pairs.iter().map(|&p| self.shared.tokens[p].as_slice()).collect();
        let (ids, mask, len) = pad(&seqs, self.shared.pad);
        Ok((
            Tensor::from_vec(ids, (pairs.len(), len), &self.device)?,
            Tensor::from_vec(mask, (pairs.len(), len), &self.device)?,
        ))
    }

    /// Pairs the loader holds (the dataset's).
    pub fn len(&self) -> usize {
        self.shared.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shared.tokens.is_empty()
    }

    /// Number of batches [`Loader::batches`] yields for `n_pairs` pairs.
    pub fn num_batches(n_pairs: usize, batch_size: usize) -> usize {
        if batch_size < 2 {
            return 0;
        }
        n_pairs / batch_size + usize::from(n_pairs % batch_size >= 2)
    }

    /// Token ids of pair `i`, `[CLS] … [SEP]`.
    pub fn tokens(&self, pair: usize) -> &[u32] {
        &self.shared.tokens[pair]
    }
}

/// The batches of one pass, received from the loader thread. Dropping it stops the thread.
pub struct Batches {
    rx: Option<Receiver<Result<RawBatch>>>,
    worker: Option<JoinHandle<()>>,
    error: Option<anyhow::Error>,
    remaining: usize,
    size: usize,
    device: Device,
}

impl Iterator for Batches {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if let Some(e) = self.error.take() {
            self.remaining = 0;
            return Some(Err(e));
        }
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        let received = self.rx.as_ref()?.recv();
        let result = match received {
            Ok(Ok(raw)) => to_batch(raw, self.size, &self.device),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(anyhow::anyhow!("the loader thread stopped unexpectedly")),
        };
        if result.is_err() {
            self.remaining = 0;
        }
        Some(result)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.remaining + usize::from(self.error.is_some());
        (n, Some(n))
    }
}

impl ExactSizeIterator for Batches {}

impl Drop for Batches {
    fn drop(&mut self) {
        // Closing the channel makes the worker's next send fail, so it stops after the batch in hand.
        self.rx.take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_batches_wait_fewer_in_the_queue() {
        assert_eq!(prefetch_depth(2, 16, 224), 2, "9.6 MB each");
        assert_eq!(prefetch_depth(4, 128, 224), 4, "77 MB each: 6 would fit");
        assert_eq!(prefetch_depth(4, 256, 224), 3, "154 MB each");
        assert_eq!(prefetch_depth(2, 512, 224), 1, "308 MB each");
        assert_eq!(prefetch_depth(2, 4096, 224), 1, "never none");
    }
}
