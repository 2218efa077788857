//! Measuring a run while it trains: validation loss, retrieval recall, zero-shot accuracy, and
//! the fixed batch whose similarity matrix the report shows before and after training — all in
//! evaluation mode, from cached features where a frozen tower has them.

use std::collections::BTreeSet;
use std::sync::Arc;

use anyhow::Result;
use candle_core::Tensor;

use super::Trainer;
use crate::embed::{cosine_similarity, l2_normalize};
use crate::embed::{embed_store_images, embed_texts};
use crate::feature_cache::{FeatureCache, FeatureRows, FrozenFeatures};
use crate::retrieval::{to_rows, Recall};
use crate::train::eval_loss;

/// Recall is computed over at most this many pairs: its similarity matrix grows with the square.
pub const MAX_RECALL_PAIRS: usize = 2000;

/// What validation measured after an epoch.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Validation {
    #[serde(deserialize_with = "super::state::nan_if_null")]
    pub loss: f64,
    pub recall: Recall,
    /// Zero-shot accuracy, when the dataset has class labels (see [`Trainer::zero_shot`]).
    #[serde(default)]
    pub zero_shot: Option<f64>,
}

impl Validation {
    /// One number to compare models by: zero-shot accuracy for class folders, else the mean of
    /// recall@1 both ways.
    pub fn quality(&self) -> f64 {
        self.zero_shot
            .unwrap_or(0.5 * (self.recall.i2t_r1 + self.recall.t2i_r1))
    }

    /// What [`Validation::quality`] is, in words, with its value.
    pub fn describe(&self) -> String {
        match self.zero_shot {
            Some(a) => format!("zero-shot accuracy {a:.3}"),
            None => format!(
                "recall@1 image→text {:.3}, text→image {:.3}",
                self.recall.i2t_r1, self.recall.t2i_r1
            ),
        }
    }
}

impl Trainer {
    /// The cached features of the frozen towers for the whole dataset, computed (or read from the
    /// cache folder) on first use; `None` when no tower is cached.
    pub fn frozen_features(&self) -> Result<Option<Arc<FrozenFeatures>>> {
        let (image, text) = self.cached_towers();
        let Some(dir) = self.feature_cache.as_deref().filter(|_| image || text) else {
            return Ok(None);
        };
        let mut slot = self.frozen.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = &*slot {
            return Ok(Some(f.clone()));
        }
        let cache = FeatureCache::new(dir);
        let chunk = self.cfg.train.batch_size.max(16);
        let f = Arc::new(FrozenFeatures {
            image: if image {
                Some(cache.image_features(&self.model, &self.data.store, chunk)?)
            } else {
                None
            },
            text: if text {
                Some(cache.text_features(&self.model, &self.data.loader, self.data.dataset.pairs.len(), chunk)?)
            } else {
                None
            },
        });
        *slot = Some(f.clone());
        Ok(Some(f))
    }

    /// Embeddings (N, P) of images of the store, in evaluation mode, from the cached features
    /// when the image tower's are cached: the one way a run embeds its images (validation,
    /// recall, zero-shot, the report).
    pub fn embed_images(&self, images: &[usize]) -> Result<Tensor> {
        let bs = self.cfg.train.batch_size.max(16);
        let frozen = self.frozen_features()?;
        match frozen.as_deref().and_then(|f| f.image.as_ref()) {
            Some(rows) => self.project_rows(rows, images, |x| {
                self.model.answer_image(&self.model.project_image(x, false)?)
            }),
            None => embed_store_images(&self.model, &self.data.store, images, bs, &self.data.device),
        }
    }

    /// Embeddings (N, P) of the captions of some pairs, in evaluation mode, from the cached
    /// features when the text tower's are cached: the one way a run embeds its captions.
    pub fn embed_captions(&self, pairs: &[usize]) -> Result<Tensor> {
        let bs = self.cfg.train.batch_size.max(16);
        let frozen = self.frozen_features()?;
        match frozen.as_deref().and_then(|f| f.text.as_ref()) {
            Some(rows) => self.project_rows(rows, pairs, |x| {
                self.model.answer_text(&self.model.project_text(x, false)?)
            }),
            None => {
                let texts: Vec<&str> = pairs
                    .iter()
                    .map(|&p| self.data.dataset.pairs[p].caption.as_str())
                    .collect();
                embed_texts(&self.model, &self.data.tokenizer, &texts, bs, &self.data.device)
            }
        }
    }

    /// Cached tower features of `items` through a projection head, a batch at a time.
    fn project_rows(
        &self,
        rows: &FeatureRows,
        items: &[usize],
        project: impl Fn(&Tensor) -> anyhow::Result<Tensor>,
    ) -> Result<Tensor> {
        let bs = self.cfg.train.batch_size.max(16);
        let parts = items
            .chunks(bs)
            .map(|c| Ok(project(&rows.tensor(c, &self.data.device)?)?.detach()))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Validates the model as it is before the first step — for a pretrained start, the
    /// untouched checkpoint — and keeps the figures in the run's state and metrics.json, where
    /// every epoch (and stage 4's gate) is compared with them.
    pub fn measure_start(&mut self) -> Result<Validation> {
        let v = self.validate()?;
        self.state.start = Some(v);
        self.write_metrics()?;
        Ok(v)
    }

    /// Validation loss (mean over batches, evaluation mode) and retrieval recall.
    pub fn validate(&self) -> Result<Validation> {
        let val = &self.data.split.val;
        let mut total = 0.0;
        let mut count = 0usize;
        // A fixed shuffle: the same batches every epoch (comparable losses), but not in file order —
        // class folders in order would put one class per batch and make the loss trivial.
        let order = Some(crate::data::epoch_seed(self.cfg.seed ^ 0x7a1, 0));
        let frozen = self.frozen_features()?;
        let images_only = self.images_only();
        for b in self
            .data
            .loader
            .batches_with(val, self.cfg.train.batch_size, order, false, frozen)
        {
            let b = b?;
            let loss = match self.teacher() {
                // No caption to compare with: the validation loss is the distillation's own.
                Some(t) if images_only => crate::nn::no_grad(|| {
                    let (ti, _) = t.batch(&self.data.dataset, &b.pairs, None, &self.data.device)?;
                    let image = match &b.image_features {
                        Some(f) => self.model.project_image(f, false)?,
                        None => self.model.encode_image(&b.images, false)?,
                    };
                    Ok::<f64, anyhow::Error>(
                        crate::distill::image_loss(&self.model, &image, &ti, &self.cfg.distill)?
                            .total
                            .to_scalar::<f32>()? as f64,
                    )
                })?,
                // Taught by the feature term alone: the student's own contrastive loss means
                // nothing (its sides meet only in the teacher's space), so its objective is the
                // validation loss, and picks the best model.
                Some(t) if self.cfg.distill.in_teacher_space() => crate::nn::no_grad(|| {
                    let (ti, tt) = t.batch(&self.data.dataset, &b.pairs, None, &self.data.device)?;
                    let e = self.model.forward_batch(&b, false)?;
                    let l = crate::distill::loss(
                        &self.model,
                        &e,
                        Some(&b.positives),
                        (&ti, &tt),
                        t.logit_scale,
                        &self.cfg.distill,
                    )?;
                    Ok::<f64, anyhow::Error>(l.total.to_scalar::<f32>()? as f64)
                })?,
                _ => eval_loss(&self.model, &b)?,
            };
            total += loss * b.pairs.len() as f64;
            count += b.pairs.len();
        }
        let loss = if count > 0 { total / count as f64 } else { f64::NAN };
        if images_only {
            return Ok(Validation {
                loss,
                recall: Recall::default(),
                zero_shot: None,
            });
        }
        Ok(Validation {
            loss,
            recall: self.recall(val)?,
            zero_shot: self.zero_shot(val)?,
        })
    }

    /// For class-folder datasets: the share of (a sample of) `pairs` whose image is closest to its
    /// own class's caption among one caption per class. Retrieval recall means little there —
    /// thousands of identical captions — while this is the accuracy `clip-predict eval` reports.
    pub fn zero_shot(&self, pairs: &[usize]) -> Result<Option<f64>> {
        self.zero_shot_of(
            pairs,
            |images| self.embed_images(images),
            |pairs| self.embed_captions(pairs),
        )
    }

    /// [`Trainer::zero_shot`] of the distillation teacher, from its cached embeddings (`None`
    /// without a teacher or without classes).
    pub fn teacher_zero_shot(&self, pairs: &[usize]) -> Result<Option<f64>> {
        let Some(t) = self.teacher() else { return Ok(None) };
        let dev = &self.data.device;
        self.zero_shot_of(
            pairs,
            |images| t.image.tensor(images, dev),
            |pairs| t.text.tensor(pairs, dev),
        )
    }

    /// Zero-shot accuracy with image embeddings from `images(indices)` and caption embeddings
    /// from `captions(pair indices)`.
    fn zero_shot_of(
        &self,
        pairs: &[usize],
        images: impl Fn(&[usize]) -> Result<Tensor>,
        captions: impl Fn(&[usize]) -> Result<Tensor>,
    ) -> Result<Option<f64>> {
        let ds = &self.data.dataset;
        if ds.labels.is_empty() {
            return Ok(None);
        }
        // Each class's distinct captions (one per template): their normalised embeddings are
        // averaged, CLIP's prompt ensemble; with one template, its one caption.
        let mut captions_of: Vec<Vec<usize>> = vec![vec![]; ds.labels.len()];
        let mut seen = std::collections::HashSet::new();
        for (i, p) in ds.pairs.iter().enumerate() {
            if let Some(l) = p.label {
                if seen.insert((l, p.caption.as_str())) {
                    captions_of[l].push(i);
                }
            }
        }
        let classes: Vec<usize> = (0..ds.labels.len()).filter(|&l| !captions_of[l].is_empty()).collect();
        let step = pairs.len().div_ceil(MAX_RECALL_PAIRS).max(1);
        let sample: Vec<usize> = pairs
            .iter()
            .copied()
            .step_by(step)
            .filter(|&p| ds.pairs[p].label.is_some())
            .collect();
        if sample.is_empty() {
            return Ok(None);
        }
        let image_rows: Vec<usize> = sample.iter().map(|&p| ds.pairs[p].image).collect();
        let ie = images(&image_rows)?;
        let flat: Vec<usize> = classes.iter().flat_map(|&l| captions_of[l].iter().copied()).collect();
        let te = captions(&flat)?;
        let te = l2_normalize(&te)?;
        let mut means = vec![];
        let mut at = 0;
        for &l in &classes {
            let n = captions_of[l].len();
            means.push(te.narrow(0, at, n)?.mean(0)?);
            at += n;
        }
        let te = Tensor::stack(&means, 0)?;
        let sim = to_rows(&cosine_similarity(&ie, &te)?)?;
        let right = sample
            .iter()
            .zip(&sim)
            .filter(|(&p, row)| classes[crate::retrieval::argsort_desc(row)[0]] == ds.pairs[p].label.unwrap())
            .count();
        Ok(Some(right as f64 / sample.len() as f64))
    }

    /// Recall@K over the given pairs — an evenly spaced sample of at most [`MAX_RECALL_PAIRS`] —
    /// their distinct images against their captions.
    pub fn recall(&self, pairs: &[usize]) -> Result<Recall> {
        self.recall_of(pairs, |images, pairs| {
            Ok((self.embed_images(images)?, self.embed_captions(pairs)?))
        })
    }

    /// [`Trainer::recall`] of the distillation teacher, from its cached embeddings (`None`
    /// without a teacher).
    pub fn teacher_recall(&self, pairs: &[usize]) -> Result<Option<Recall>> {
        let Some(t) = self.teacher() else { return Ok(None) };
        let dev = &self.data.device;
        Ok(Some(self.recall_of(pairs, |images, pairs| {
            Ok((t.image.tensor(images, dev)?, t.text.tensor(pairs, dev)?))
        })?))
    }

    /// Recall over a sample of `pairs` with embeddings from `embed(images, pairs)`.
    fn recall_of(
        &self,
        pairs: &[usize],
        embed: impl Fn(&[usize], &[usize]) -> Result<(Tensor, Tensor)>,
    ) -> Result<Recall> {
        let step = pairs.len().div_ceil(MAX_RECALL_PAIRS).max(1);
        let sample: Vec<usize> = pairs.iter().copied().step_by(step).collect();
        let pairs = &sample[..];
        let ds = &self.data.dataset;
        let images: Vec<usize> = pairs
            .iter()
            .map(|&p| ds.pairs[p].image)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let pos = |img: usize| images.iter().position(|&i| i == img).unwrap();
        let text_image: Vec<usize> = pairs.iter().map(|&p| pos(ds.pairs[p].image)).collect();
        let (ie, te) = embed(&images, pairs)?;
        Recall::from_embeddings(&l2_normalize(&ie)?, &l2_normalize(&te)?, &text_image, 512)
    }

    /// The fixed set of pairs behind [`Trainer::fixed_similarity`]: the first 16 distinct training
    /// images, one caption each (their names and captions label the heat maps).
    pub fn fixed_pairs(&self) -> Vec<usize> {
        let ds = &self.data.dataset;
        let mut seen = BTreeSet::new();
        self.data
            .split
            .train
            .iter()
            .copied()
            .filter(|&p| seen.insert(ds.pairs[p].image))
            .take(16)
            .collect()
    }

    /// Cosine similarities (image rows × caption columns) of the [`Trainer::fixed_pairs`]: the
    /// before/after heat maps.
    pub fn fixed_similarity(&self) -> Result<Vec<Vec<f32>>> {
        let pairs = self.fixed_pairs();
        let frozen = self.frozen_features()?;
        let b = self.data.loader.batch_with(&pairs, frozen.as_deref())?;
        let e = crate::nn::no_grad(|| self.model.forward_batch(&b, false))?;
        to_rows(&cosine_similarity(&e.image, &e.text)?)
    }
}
