//! Training over many epochs: the loop behind stage 4, with validation, schedules, checkpoints
//! and resume.
//!
//! A run folder holds the best model by validation loss (`model.safetensors`, `optimizer.*`,
//! `config.toml`, `tokenizer.json`, `metrics.json`) and the latest epoch under `last/` for
//! `--resume`. Every file is written atomically; `last/` is replaced as a whole, so a crash leaves
//! either the previous epoch's checkpoint or the new one.
//!
//! A frozen tower's features are computed once and cached (in `feature-cache/` of the run folder
//! by default, see [`crate::feature_cache`]); training, validation and recall then use them
//! instead of running the tower, so an epoch costs only what still trains.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{save_weights, write_atomic, CONFIG, LAST, METRICS, OPTIMIZER, STATE, TOKENIZER, WEIGHTS};
use crate::config::{ClipConfig, Schedule};
use crate::data::Batch;
use crate::embed::{embed_store_images, embed_texts};
use crate::feature_cache::{FeatureCache, FrozenFeatures, CACHE_DIR};
use crate::loss::cosine_similarity;
use crate::model::ClipModel;
use crate::optim::AdamW;
use crate::params::Group;
use crate::prepare::Prepared;
use crate::retrieval::{to_rows, Recall};
use crate::schedule::{cosine, Plateau};
use crate::train::{eval_loss, train_step};

/// Recall is computed over at most this many pairs: its similarity matrix grows with the square.
pub const MAX_RECALL_PAIRS: usize = 2000;

/// One line of the training history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: usize,
    pub train_loss: f64,
    pub val_loss: f64,
    pub lr_image: f64,
    pub lr_text: f64,
    pub lr_head: f64,
    pub recall: Recall,
    /// Zero-shot accuracy on validation, for class-folder datasets.
    #[serde(default)]
    pub zero_shot: Option<f64>,
    pub seconds: f64,
    pub pairs_per_second: f64,
}

/// What validation measured after an epoch.
#[derive(Debug, Clone, Copy)]
pub struct Validation {
    pub loss: f64,
    pub recall: Recall,
    /// Zero-shot accuracy, when the dataset has class labels (see [`Trainer::zero_shot`]).
    pub zero_shot: Option<f64>,
}

/// What `--resume` needs besides weights and optimiser state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    /// Epochs completed.
    pub epoch: usize,
    pub best_val_loss: f64,
    pub best_epoch: usize,
    pub plateau: Plateau,
    pub history: Vec<EpochRecord>,
}

pub struct Trainer {
    pub cfg: ClipConfig,
    pub model: ClipModel,
    pub opt: AdamW,
    pub data: Prepared,
    pub out: PathBuf,
    pub state: TrainState,
    /// Where frozen towers' features are cached; `None` runs them on every batch.
    feature_cache: Option<PathBuf>,
    /// The cached features, once computed or read (see [`Trainer::frozen_features`]).
    frozen: Mutex<Option<Arc<FrozenFeatures>>>,
}

impl Trainer {
    /// A fresh run writing into `out` (created; its config and tokenizer are written now).
    pub fn new(cfg: &ClipConfig, data: Prepared, out: &Path) -> Result<Self> {
        let t = Self::build(cfg, data, out)?;
        std::fs::create_dir_all(out).with_context(|| format!("creating run folder {}", out.display()))?;
        write_atomic(&out.join(CONFIG), cfg.to_toml()?.as_bytes())?;
        t.data.tokenizer.save(&out.join(TOKENIZER))?;
        Ok(t)
    }

    /// Continues the run in `out` from its last completed epoch.
    pub fn resume(cfg: &ClipConfig, data: Prepared, out: &Path) -> Result<Self> {
        let mut t = Self::build(cfg, data, out)?;
        let last = last_dir(out)?;
        t.model.params.load_safetensors(&last.join(WEIGHTS))?;
        t.opt.load(&last.join(OPTIMIZER))?;
        let state_path = last.join(STATE);
        t.state = serde_json::from_str(
            &std::fs::read_to_string(&state_path).with_context(|| format!("reading {}", state_path.display()))?,
        )
        .with_context(|| format!("parsing {}", state_path.display()))?;
        Ok(t)
    }

    /// The model, optimiser and state of epoch 0, touching no file.
    fn build(cfg: &ClipConfig, data: Prepared, out: &Path) -> Result<Self> {
        let model = ClipModel::new(cfg, &data.device)?;
        let opt = AdamW::new(&model.params, &cfg.train)?;
        let state = TrainState {
            epoch: 0,
            best_val_loss: f64::INFINITY,
            best_epoch: 0,
            plateau: Plateau::new(cfg.train.patience, cfg.train.factor),
            history: vec![],
        };
        Ok(Self {
            cfg: cfg.clone(),
            model,
            opt,
            data,
            out: out.to_path_buf(),
            state,
            feature_cache: Some(out.join(CACHE_DIR)),
            frozen: Mutex::new(None),
        })
    }

    /// Where frozen towers' features are cached (default: `feature-cache/` in the run folder);
    /// `None` runs the frozen towers on every batch (in evaluation mode), as a baseline.
    pub fn set_feature_cache(&mut self, dir: Option<PathBuf>) {
        self.feature_cache = dir;
        *self.frozen.get_mut().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Which towers' features are cached, (image, text): the frozen ones, and the image tower only
    /// without augmentation (an augmented image is a new input every epoch).
    pub fn cached_towers(&self) -> (bool, bool) {
        if self.feature_cache.is_none() {
            return (false, false);
        }
        let t = &self.cfg.train;
        (t.freeze_image && !self.cfg.data.augment, t.freeze_text)
    }

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

    /// Embeddings (N, P) of images of the store, in evaluation mode (from cached features when
    /// the image tower's are cached).
    fn embed_images(&self, images: &[usize]) -> Result<Tensor> {
        let bs = self.cfg.train.batch_size.max(16);
        let frozen = self.frozen_features()?;
        match frozen.as_deref().and_then(|f| f.image.as_ref()) {
            Some(rows) => {
                let parts = images
                    .chunks(bs)
                    .map(|c| self.model.project_image(&rows.tensor(c, &self.data.device)?, false))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Tensor::cat(&parts, 0)?)
            }
            None => embed_store_images(&self.model, &self.data.store, images, bs, &self.data.device),
        }
    }

    /// Embeddings (N, P) of the captions of some pairs, in evaluation mode.
    fn embed_captions(&self, pairs: &[usize]) -> Result<Tensor> {
        let bs = self.cfg.train.batch_size.max(16);
        let frozen = self.frozen_features()?;
        match frozen.as_deref().and_then(|f| f.text.as_ref()) {
            Some(rows) => {
                let parts = pairs
                    .chunks(bs)
                    .map(|c| self.model.project_text(&rows.tensor(c, &self.data.device)?, false))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Tensor::cat(&parts, 0)?)
            }
            None => {
                let texts: Vec<&str> = pairs
                    .iter()
                    .map(|&p| self.data.dataset.pairs[p].caption.as_str())
                    .collect();
                embed_texts(&self.model, &self.data.tokenizer, &texts, bs, &self.data.device)
            }
        }
    }

    /// Optimiser steps in one epoch.
    pub fn steps_per_epoch(&self) -> usize {
        let b = self.cfg.train.batch_size;
        let n = self.data.split.train.len();
        let batches = n / b + usize::from(n % b >= 2);
        batches.div_ceil(self.cfg.train.accumulate).max(1)
    }

    /// Trains one epoch; `on_step(step_in_epoch, loss, pairs_per_s)` reports progress.
    /// Returns (mean loss, pairs per second).
    pub fn train_epoch(&mut self, mut on_step: impl FnMut(usize, f64, f64)) -> Result<(f64, f64)> {
        let epoch = self.state.epoch;
        let total_steps = (self.cfg.train.epochs * self.steps_per_epoch()) as u64;
        let started = Instant::now();
        let mut losses = vec![];
        let mut pairs = 0usize;
        let mut pending: Vec<Batch> = vec![];
        let batches = self.data.loader.batches_with(
            &self.data.split.train,
            self.cfg.train.batch_size,
            Some(crate::data::epoch_seed(self.cfg.seed, epoch)),
            self.cfg.data.augment,
            self.frozen_features()?,
        );
        let mut step = 0usize;
        let mut iter = batches.into_iter().peekable();
        while let Some(b) = iter.next() {
            pending.push(b?);
            if pending.len() < self.cfg.train.accumulate && iter.peek().is_some() {
                continue;
            }
            if self.cfg.train.schedule == Schedule::Cosine {
                self.opt
                    .scale_lr(cosine(self.opt.step, self.cfg.train.warmup_steps as u64, total_steps));
            }
            let n: usize = pending.iter().map(|b| b.pairs.len()).sum();
            let out = train_step(&self.model, &mut self.opt, &pending, self.cfg.train.clip_grad_norm)
                .with_context(|| format!("epoch {}, step {}", epoch + 1, step + 1))?;
            pending.clear();
            pairs += n;
            losses.push(out.loss);
            step += 1;
            on_step(step, out.loss, pairs as f64 / started.elapsed().as_secs_f64().max(1e-9));
        }
        if losses.is_empty() {
            bail!(
                "no training batch of at least 2 pairs: the training split has {} pairs",
                self.data.split.train.len()
            );
        }
        let mean = losses.iter().sum::<f64>() / losses.len() as f64;
        Ok((mean, pairs as f64 / started.elapsed().as_secs_f64().max(1e-9)))
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
        for b in self
            .data
            .loader
            .batches_with(val, self.cfg.train.batch_size, order, false, frozen)
        {
            let b = b?;
            total += eval_loss(&self.model, &b)? * b.pairs.len() as f64;
            count += b.pairs.len();
        }
        let loss = if count > 0 { total / count as f64 } else { f64::NAN };
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
        let ds = &self.data.dataset;
        if ds.labels.is_empty() {
            return Ok(None);
        }
        // One caption per class: its first pair's.
        let mut caption_of: Vec<Option<usize>> = vec![None; ds.labels.len()];
        for (i, p) in ds.pairs.iter().enumerate() {
            if let Some(l) = p.label {
                caption_of[l].get_or_insert(i);
            }
        }
        let classes: Vec<usize> = (0..ds.labels.len()).filter(|&l| caption_of[l].is_some()).collect();
        let class_pairs: Vec<usize> = classes.iter().filter_map(|&l| caption_of[l]).collect();
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
        let images: Vec<usize> = sample.iter().map(|&p| ds.pairs[p].image).collect();
        let ie = self.embed_images(&images)?;
        let te = self.embed_captions(&class_pairs)?;
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
        let ie = self.embed_images(&images)?;
        let te = self.embed_captions(pairs)?;
        Ok(Recall::compute(&to_rows(&cosine_similarity(&ie, &te)?)?, &text_image))
    }

    /// Cosine similarities of a fixed set of pairs (up to 16 distinct training images, one caption
    /// each): the before/after heat maps.
    pub fn fixed_similarity(&self) -> Result<Vec<Vec<f32>>> {
        let ds = &self.data.dataset;
        let mut seen = BTreeSet::new();
        let pairs: Vec<usize> = self
            .data
            .split
            .train
            .iter()
            .copied()
            .filter(|&p| seen.insert(ds.pairs[p].image))
            .take(16)
            .collect();
        let frozen = self.frozen_features()?;
        let b = self.data.loader.batch_with(&pairs, frozen.as_deref())?;
        let e = self.model.forward_batch(&b, false)?;
        to_rows(&cosine_similarity(&e.image, &e.text)?)
    }

    /// Records an epoch: schedule, history, checkpoints. Returns whether it is the best so far.
    pub fn end_epoch(&mut self, train_loss: f64, v: &Validation, seconds: f64, pairs_per_second: f64) -> Result<bool> {
        let val_loss = v.loss;
        let lr = |g| self.opt.groups[&g].lr;
        self.state.history.push(EpochRecord {
            epoch: self.state.epoch + 1,
            train_loss,
            val_loss,
            lr_image: lr(Group::ImageTower),
            lr_text: lr(Group::TextTower),
            lr_head: lr(Group::Heads),
            recall: v.recall,
            zero_shot: v.zero_shot,
            seconds,
            pairs_per_second,
        });
        self.state.epoch += 1;
        if self.cfg.train.schedule == Schedule::Plateau {
            let scale = self.state.plateau.observe(val_loss);
            self.opt.scale_lr(scale);
        }
        let best = val_loss < self.state.best_val_loss;
        if best {
            self.state.best_val_loss = val_loss;
            self.state.best_epoch = self.state.epoch;
            save_weights(&self.model.params, &self.out.join(WEIGHTS))?;
            self.opt.save(&self.out.join(OPTIMIZER))?;
        }
        self.save_last()?;
        self.write_metrics()?;
        Ok(best)
    }

    /// Replaces `last/` as a whole: written to `last.tmp/`, then swapped in.
    fn save_last(&self) -> Result<()> {
        let tmp = self.out.join(format!("{LAST}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        save_weights(&self.model.params, &tmp.join(WEIGHTS))?;
        self.opt.save(&tmp.join(OPTIMIZER))?;
        write_atomic(&tmp.join(STATE), serde_json::to_string_pretty(&self.state)?.as_bytes())?;
        let last = self.out.join(LAST);
        let old = self.out.join(format!("{LAST}.old"));
        let _ = std::fs::remove_dir_all(&old);
        if last.exists() {
            std::fs::rename(&last, &old)?;
        }
        std::fs::rename(&tmp, &last)?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }

    /// metrics.json and loss.csv from the history (the programs draw the curves).
    pub fn write_metrics(&self) -> Result<()> {
        let h = &self.state.history;
        let metrics = serde_json::json!({
            "config": self.cfg.name,
            "epochs": self.state.epoch,
            "best_epoch": self.state.best_epoch,
            "best_val_loss": self.state.best_val_loss,
            "history": h,
        });
        write_atomic(
            &self.out.join(METRICS),
            serde_json::to_string_pretty(&metrics)?.as_bytes(),
        )?;
        let mut csv =
            String::from("epoch,train_loss,val_loss,lr_image,lr_text,lr_head,i2t_r1,t2i_r1,seconds,pairs_per_second\n");
        for r in h {
            csv.push_str(&format!(
                "{},{:.6},{:.6},{:e},{:e},{:e},{:.4},{:.4},{:.3},{:.1}\n",
                r.epoch,
                r.train_loss,
                r.val_loss,
                r.lr_image,
                r.lr_text,
                r.lr_head,
                r.recall.i2t_r1,
                r.recall.t2i_r1,
                r.seconds,
                r.pairs_per_second
            ));
        }
        write_atomic(&self.out.join("loss.csv"), csv.as_bytes())
    }

    /// Loads the best weights saved so far into the model (cached features are looked up again,
    /// for the frozen towers' weights they were computed with).
    pub fn load_best(&self) -> Result<()> {
        *self.frozen.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.model.params.load_safetensors(&self.out.join(WEIGHTS))
    }
}

/// The `last/` checkpoint of a run, or the one being swapped in if a crash hit mid-swap.
fn last_dir(out: &Path) -> Result<PathBuf> {
    for name in [LAST.to_string(), format!("{LAST}.old")] {
        let d = out.join(&name);
        if d.join(STATE).is_file() && d.join(WEIGHTS).is_file() {
            return Ok(d);
        }
    }
    bail!(
        "{} has no checkpoint to resume from (no {LAST}/{STATE}): did its first epoch finish?",
        out.display()
    )
}
