//! Training over many epochs: the loop behind stage 4, with validation, schedules, checkpoints
//! and resume.
//!
//! A run folder holds the best model by validation loss (`model.safetensors`, `optimizer.*`,
//! `config.toml`, `tokenizer.json`, `metrics.json`) and the latest checkpoint under `last/` for
//! `--resume`. Every file is written atomically and checksummed ([`crate::checkpoint`]); `last/` is
//! replaced as a whole, so a crash — even SIGKILL — leaves either the previous checkpoint or the
//! new one. One process writes a folder at a time ([`RunLock`]).
//!
//! `last/` is written after every epoch, and mid-epoch when training is stopped
//! ([`Trainer::set_stop`]): it then records the steps done in the current epoch, and a resumed run
//! skips those batches (the epoch's order is a function of seed and epoch) and continues exactly
//! as an uninterrupted run would.
//!
//! Resuming honours the config it is given: learning rates, weight decay, epochs and the other
//! `train.*` keys may change (the optimiser takes the new rates, `config.toml` records them, and
//! [`Trainer::changes`] lists them); anything that would make another model or another data split
//! (the model's shape, the seed, `data.*` but augmentation) is refused. Under the cosine schedule
//! the decay is always spread over the configured epochs, so raising them stretches the rest of the
//! curve: from the next step the rate follows the cosine of the new total.
//!
//! A frozen tower's features are computed once and cached (in `feature-cache/` of the run folder
//! by default, see [`crate::feature_cache`]); training, validation and recall then use them
//! instead of running the tower, so an epoch costs only what still trains.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Deserializer, Serialize};

use crate::checkpoint::{
    self, optimizer_files, read_checked, weights_bytes, CONFIG, DATASET, LAST, METRICS, OPTIMIZER, STATE, TOKENIZER,
    WEIGHTS,
};
use crate::config::{ClipConfig, Schedule};
use crate::data::Batch;
use crate::embed::{embed_store_images, embed_texts};
use crate::feature_cache::{FeatureCache, FrozenFeatures, CACHE_DIR};
use crate::loss::{cosine_similarity, l2_normalize};
use crate::model::ClipModel;
use crate::optim::AdamW;
use crate::params::Group;
use crate::prepare::Prepared;
use crate::retrieval::{to_rows, Recall};
use crate::run_dir::{is_checkpoint, run_files, DataIdentity, RunLock};
use crate::schedule::{cosine, Plateau};
use crate::train::{eval_loss, train_step};

/// Recall is computed over at most this many pairs: its similarity matrix grows with the square.
pub const MAX_RECALL_PAIRS: usize = 2000;

/// One line of the training history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: usize,
    #[serde(deserialize_with = "nan_if_null")]
    pub train_loss: f64,
    /// NaN (`null` in JSON) when validation had no batch or diverged.
    #[serde(deserialize_with = "nan_if_null")]
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
    /// The loss that picked the best model: validation loss, or training loss when the validation
    /// split is too small for a batch (see [`Trainer::selection_note`]). Infinite (`null` in JSON)
    /// until an epoch has a finite one.
    #[serde(deserialize_with = "inf_if_null")]
    pub best_val_loss: f64,
    /// The epoch of `model.safetensors`; 0 is the untrained model (no epoch had a finite loss yet).
    pub best_epoch: usize,
    #[serde(deserialize_with = "plateau_lenient")]
    pub plateau: Plateau,
    pub history: Vec<EpochRecord>,
    /// The epoch in progress when training was stopped in its middle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial: Option<PartialEpoch>,
}

/// How far into an epoch a stopped run got: its steps and their losses (so the epoch's mean loss
/// comes out as in an uninterrupted run).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PartialEpoch {
    /// Optimiser steps done in the epoch.
    pub steps: usize,
    pub losses: Vec<f64>,
    pub pairs: usize,
    pub seconds: f64,
}

/// Training stopped at the end of a step because [`Trainer::set_stop`]'s flag was raised; the
/// error [`Trainer::train_epoch`] returns then (save with [`Trainer::save_checkpoint`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    /// 1-based epoch and step.
    pub epoch: usize,
    pub step: usize,
    pub steps: usize,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "stopped after step {} of {} in epoch {}",
            self.step, self.steps, self.epoch
        )
    }
}

impl std::error::Error for Stopped {}

/// What a resume may do beyond what the run recorded.
#[derive(Debug, Clone, Copy, Default)]
pub struct ResumeOptions {
    /// Continue on data other than the run's (`dataset.json`): another path or another listing.
    /// Without it such a resume is refused, naming both. A run stopped mid-epoch then restarts
    /// that epoch (its remaining batches are not those of the other data).
    pub other_data: bool,
}

/// One changed config key on resume: `key: old → new`.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub key: String,
    pub old: String,
    pub new: String,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} → {}", self.key, self.old, self.new)
    }
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
    /// Raised (by a signal handler) to stop at the end of the current step.
    stop: Option<Arc<AtomicBool>>,
    /// What a resumed run's config changed (recorded in `config.toml`), and `data` when it was
    /// resumed on other data ([`ResumeOptions::other_data`]).
    pub changes: Vec<Change>,
    /// Set when `--resume` found no checkpoint (the run was killed before its first one) and so
    /// started again from epoch 1, with the run's config and data.
    pub restarted: bool,
    /// The folder's lock, held as long as the trainer lives.
    pub lock: RunLock,
}

impl Trainer {
    /// A fresh run writing into `out` (created, locked; its config, tokenizer and untrained weights
    /// are written now, so the folder always holds a usable model). A folder that already holds a
    /// run is refused.
    pub fn new(cfg: &ClipConfig, data: Prepared, out: &Path) -> Result<Self> {
        Self::new_locked(cfg, data, RunLock::acquire(out)?)
    }

    /// [`Trainer::new`] in a folder the caller has locked already.
    pub fn new_locked(cfg: &ClipConfig, data: Prepared, lock: RunLock) -> Result<Self> {
        let out = lock.dir.clone();
        let existing = run_files(&out);
        if !existing.is_empty() {
            bail!(
                "{} already holds a run ({}): continue it with --resume {0}, or start over with --overwrite",
                out.display(),
                existing.join(", ")
            );
        }
        checkpoint::clean_stale(&out)?;
        let t = Self::build(cfg, data, lock)?;
        crate::pretrained::load_pretrained(&t.model, &crate::hub::Hub::from_env())?;
        t.start_files()?;
        Ok(t)
    }

    /// The files a run has from its first moment, in one checksummed group — config, tokenizer,
    /// data identity, untrained weights — then the epoch-0 checkpoint `last/`, so that a run
    /// killed at any moment after this can be resumed.
    fn start_files(&self) -> Result<()> {
        let identity = DataIdentity::of(&self.data);
        checkpoint::write_checked(
            &self.out,
            &[
                (CONFIG.into(), self.cfg.to_toml()?.into_bytes()),
                (TOKENIZER.into(), self.data.tokenizer.to_json()?.into_bytes()),
                (DATASET.into(), identity.to_json()?),
                (WEIGHTS.into(), weights_bytes(&self.model.params)?),
            ],
        )?;
        self.save_checkpoint()?;
        Ok(())
    }

    /// Continues the run in `out` from its last checkpoint (the end of an epoch, or the step where
    /// it was stopped), with `cfg` — which may change `train.*` keys and augmentation, recorded
    /// in `config.toml` and listed in [`Trainer::changes`].
    pub fn resume(cfg: &ClipConfig, data: Prepared, out: &Path) -> Result<Self> {
        Self::resume_locked(cfg, data, RunLock::acquire(out)?)
    }

    /// [`Trainer::resume`] in a folder the caller has locked already.
    pub fn resume_locked(cfg: &ClipConfig, data: Prepared, lock: RunLock) -> Result<Self> {
        Self::resume_with(cfg, data, lock, ResumeOptions::default())
    }

    /// [`Trainer::resume_locked`] with [`ResumeOptions`].
    ///
    /// The data must be the run's (`dataset.json`: its path and a fingerprint of its listing)
    /// unless `opts.other_data` says otherwise: a mid-epoch resume skips the batches already
    /// trained on, which are only the same batches on the same data. A run killed before its
    /// first checkpoint starts again from epoch 1 ([`Trainer::restarted`]).
    pub fn resume_with(cfg: &ClipConfig, data: Prepared, lock: RunLock, opts: ResumeOptions) -> Result<Self> {
        let out = lock.dir.clone();
        let last = recover_last(&out)?;
        if !out.join(CONFIG).is_file() {
            bail!(
                "{} holds no run to resume (nothing was written yet, not even its {CONFIG}): start a new run there",
                out.display()
            );
        }
        let saved = crate::run_dir::RunDir { dir: out.clone() }.config()?;
        let mut changes = config_changes(&saved, cfg)?;
        let fixed: Vec<String> = changes
            .iter()
            .filter(|c| !(c.key.starts_with("train.") || c.key == "data.augment"))
            .map(|c| c.to_string())
            .collect();
        if !fixed.is_empty() {
            bail!(
                "a resumed run cannot change {} — they make another model or another data split than the one in {}; start a new run (another --out) for that",
                fixed.join(", "),
                out.display()
            );
        }
        let data_change = check_data(&out, &data, opts)?;
        let mut t = Self::build(cfg, data, lock)?;
        let Some(last) = last else {
            // Killed before the first checkpoint: start again from epoch 1, from the untrained
            // weights it saved when they verify (else from the same seeded initialisation).
            if out.join(WEIGHTS).is_file() {
                checkpoint::load_weights(&t.model.params, &out.join(WEIGHTS))?;
            } else {
                crate::pretrained::load_pretrained(&t.model, &crate::hub::Hub::from_env())?;
            }
            t.start_files()?;
            t.restarted = true;
            t.changes = changes;
            return Ok(t);
        };
        let configured = t.opt.base.clone();
        checkpoint::load_weights(&t.model.params, &last.join(WEIGHTS))?;
        t.opt.load(&last.join(OPTIMIZER))?;
        let state_path = last.join(STATE);
        t.state = serde_json::from_slice(&read_checked(&state_path)?)
            .with_context(|| format!("parsing {}", state_path.display()))?;
        if let Some(p) = &t.state.partial {
            let moved: Vec<String> = changes
                .iter()
                .filter(|c| c.key == "train.batch_size" || c.key == "train.accumulate")
                .map(|c| c.to_string())
                .collect();
            if !moved.is_empty() {
                bail!(
                    "{} was stopped in the middle of epoch {} (step {}): {} would change which batches the rest of the epoch holds — resume with the run's value, then change it",
                    out.display(),
                    t.state.epoch + 1,
                    p.steps,
                    moved.join(", ")
                );
            }
        }
        if let Some(change) = data_change {
            // Other data: the rest of a stopped epoch would be other batches; start it over.
            t.state.partial = None;
            checkpoint::write_checked(&out, &[(DATASET.into(), DataIdentity::of(&t.data).to_json()?)])?;
            changes.push(change);
        }
        // The optimiser's saved rates give way to the config's; the schedule's current factor stays.
        for (g, want) in configured {
            let (base, now) = (t.opt.base[&g], t.opt.groups[&g]);
            if base != want {
                let factor = if base.lr > 0.0 {
                    now.lr / base.lr
                } else {
                    t.state.plateau.scale
                };
                t.opt.base.insert(g, want);
                t.opt.groups.insert(
                    g,
                    crate::optim::GroupSettings {
                        lr: want.lr * factor,
                        weight_decay: want.weight_decay,
                    },
                );
            }
        }
        t.state.plateau.patience = cfg.train.patience;
        t.state.plateau.factor = cfg.train.factor;
        if changes.iter().any(|c| c.key != "data") {
            checkpoint::write_checked(&out, &[(CONFIG.into(), cfg.to_toml()?.into_bytes())])?;
        }
        t.changes = changes;
        Ok(t)
    }

    /// The model, optimiser and state of epoch 0, touching no file.
    fn build(cfg: &ClipConfig, data: Prepared, lock: RunLock) -> Result<Self> {
        let model = ClipModel::new(cfg, &data.device)?;
        let opt = AdamW::new(&model.params, &cfg.train)?;
        let state = TrainState {
            epoch: 0,
            best_val_loss: f64::INFINITY,
            best_epoch: 0,
            plateau: Plateau::new(cfg.train.patience, cfg.train.factor),
            history: vec![],
            partial: None,
        };
        let out = lock.dir.clone();
        Ok(Self {
            cfg: cfg.clone(),
            model,
            opt,
            data,
            out: out.clone(),
            state,
            feature_cache: Some(out.join(CACHE_DIR)),
            frozen: Mutex::new(None),
            stop: None,
            changes: vec![],
            restarted: false,
            lock,
        })
    }

    /// Stops training at the end of the step during which `flag` is raised: [`Trainer::train_epoch`]
    /// then returns [`Stopped`] and [`Trainer::save_checkpoint`] saves where it got to.
    pub fn set_stop(&mut self, flag: Arc<AtomicBool>) {
        self.stop = Some(flag);
    }

    /// Whether validation can measure a loss: the contrastive loss needs batches of 2 pairs.
    pub fn validates(&self) -> bool {
        self.data.split.val.len() >= 2
    }

    /// Why the best model is not chosen by validation loss, when it is not.
    pub fn selection_note(&self) -> Option<String> {
        let n = self.data.split.val.len();
        (!self.validates()).then(|| {
            format!(
                "the validation split has {n} pair{}, too few for a contrastive loss (a batch needs 2): validation loss is not measured and the best model is chosen by training loss",
                if n == 1 { "" } else { "s" }
            )
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
                    .map(|c| -> Result<Tensor> {
                        Ok(self
                            .model
                            .project_image(&rows.tensor(c, &self.data.device)?, false)?
                            .detach())
                    })
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
                    .map(|c| -> Result<Tensor> {
                        Ok(self
                            .model
                            .project_text(&rows.tensor(c, &self.data.device)?, false)?
                            .detach())
                    })
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

    /// Trains one epoch (or the rest of a stopped one); `on_step(step_in_epoch, loss, pairs_per_s)`
    /// reports progress. Returns (mean loss, pairs per second), or the error [`Stopped`] when the
    /// stop flag was raised (the steps done are kept in `state.partial`).
    pub fn train_epoch(&mut self, mut on_step: impl FnMut(usize, f64, f64)) -> Result<(f64, f64)> {
        let epoch = self.state.epoch;
        let steps_per_epoch = self.steps_per_epoch();
        let total_steps = (self.cfg.train.epochs * steps_per_epoch) as u64;
        let started = Instant::now();
        let done = self.state.partial.take().unwrap_or_default();
        let skip = done.steps;
        let PartialEpoch {
            mut losses,
            pairs: pairs_before,
            seconds: seconds_before,
            ..
        } = done;
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
            if step < skip {
                // Done before the run was stopped: the same batches, already trained on.
                pending.clear();
                step += 1;
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
            let pps = pairs as f64 / started.elapsed().as_secs_f64().max(1e-9);
            on_step(step, out.loss, pps);
            if self.stop.as_ref().is_some_and(|f| f.load(Ordering::SeqCst)) {
                self.state.partial = Some(PartialEpoch {
                    steps: step,
                    losses,
                    pairs: pairs_before + pairs,
                    seconds: seconds_before + started.elapsed().as_secs_f64(),
                });
                return Err(Stopped {
                    epoch: epoch + 1,
                    step,
                    steps: steps_per_epoch,
                }
                .into());
            }
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

    /// Records an epoch: schedule, history, checkpoints. Returns whether it is the best so far.
    ///
    /// The best model is the one with the lowest validation loss — or training loss, when the
    /// validation split is too small to measure one ([`Trainer::selection_note`]). An epoch whose
    /// loss is NaN or infinite is never the best: `model.safetensors` keeps the previous best (or
    /// the untrained model), so a diverged run still leaves a usable model.
    pub fn end_epoch(&mut self, train_loss: f64, v: &Validation, seconds: f64, pairs_per_second: f64) -> Result<bool> {
        let val_loss = v.loss;
        let score = if self.validates() { val_loss } else { train_loss };
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
        self.state.partial = None;
        if self.cfg.train.schedule == Schedule::Plateau {
            let scale = self.state.plateau.observe(score);
            self.opt.scale_lr(scale);
        }
        let best = score.is_finite() && score < self.state.best_val_loss;
        if best {
            self.state.best_val_loss = score;
            self.state.best_epoch = self.state.epoch;
            let mut files = vec![(WEIGHTS.to_string(), weights_bytes(&self.model.params)?)];
            files.extend(optimizer_files(&self.opt, &self.out.join(OPTIMIZER))?);
            checkpoint::write_checked(&self.out, &files)?;
        }
        self.save_checkpoint()?;
        self.write_metrics()?;
        Ok(best)
    }

    /// Saves the resumable checkpoint `last/` (weights, optimiser, training state — with the
    /// position inside the epoch when stopped mid-epoch), replacing the previous one as a whole:
    /// written to `last.tmp/`, then swapped in. Returns its folder.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let tmp = self.out.join(format!("{LAST}.tmp"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
        }
        let mut files = vec![(WEIGHTS.to_string(), weights_bytes(&self.model.params)?)];
        files.extend(optimizer_files(&self.opt, &tmp.join(OPTIMIZER))?);
        files.push((STATE.into(), serde_json::to_vec_pretty(&self.state)?));
        checkpoint::write_checked(&tmp, &files)?;
        let last = self.out.join(LAST);
        let old = self.out.join(format!("{LAST}.old"));
        if old.exists() {
            std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
        }
        if last.exists() {
            std::fs::rename(&last, &old).with_context(|| format!("renaming {}", last.display()))?;
        }
        std::fs::rename(&tmp, &last).with_context(|| format!("renaming {}", tmp.display()))?;
        checkpoint::sync_dir(&self.out)?;
        if old.exists() {
            std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
        }
        Ok(last)
    }

    /// metrics.json and loss.csv from the history (the programs draw the curves).
    pub fn write_metrics(&self) -> Result<()> {
        let h = &self.state.history;
        let metrics = serde_json::json!({
            "config": self.cfg.name,
            "epochs": self.state.epoch,
            "best_epoch": self.state.best_epoch,
            "best_val_loss": self.state.best_val_loss,
            "best_by": if self.validates() { "validation loss" } else { "training loss" },
            "history": h,
        });
        let metrics = serde_json::to_string_pretty(&metrics)?;
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
        checkpoint::write_checked(
            &self.out,
            &[
                (METRICS.into(), metrics.into_bytes()),
                ("loss.csv".into(), csv.into_bytes()),
            ],
        )
    }

    /// Loads the best weights saved so far into the model (cached features are looked up again,
    /// for the frozen towers' weights they were computed with).
    pub fn load_best(&self) -> Result<()> {
        *self.frozen.lock().unwrap_or_else(|e| e.into_inner()) = None;
        checkpoint::load_weights(&self.model.params, &self.out.join(WEIGHTS))
    }
}

/// The `last/` checkpoint of a run, after tidying what a crash left: a `last/` lost mid-swap is
/// restored from `last.old/`, and `last.tmp/` (never swapped in) and stale temporary files are
/// removed. `None` when the run has no checkpoint yet (killed before its first was written).
/// Call it while holding the folder's lock.
fn recover_last(out: &Path) -> Result<Option<PathBuf>> {
    let last = out.join(LAST);
    let old = out.join(format!("{LAST}.old"));
    if !is_checkpoint(&last) && is_checkpoint(&old) {
        if last.exists() {
            std::fs::remove_dir_all(&last).with_context(|| format!("removing {}", last.display()))?;
        }
        std::fs::rename(&old, &last).with_context(|| format!("restoring {}", old.display()))?;
    }
    for stale in [old, out.join(format!("{LAST}.tmp"))] {
        if stale.exists() {
            std::fs::remove_dir_all(&stale).with_context(|| format!("removing {}", stale.display()))?;
        }
    }
    checkpoint::clean_stale(out)?;
    checkpoint::clean_stale(&last)?;
    if !is_checkpoint(&last) {
        if last.exists() {
            std::fs::remove_dir_all(&last).with_context(|| format!("removing {}", last.display()))?;
        }
        return Ok(None);
    }
    Ok(Some(last))
}

/// Compares the data a run is resumed on with the run's (`dataset.json`). Returns the change
/// to record when they differ and `opts.other_data` allows it; refuses it otherwise, saying
/// which. A run without `dataset.json` (written before it was recorded) is resumed with a
/// warning.
fn check_data(out: &Path, data: &Prepared, opts: ResumeOptions) -> Result<Option<Change>> {
    let now = DataIdentity::of(data);
    let Some(recorded) = DataIdentity::read(out)? else {
        if out.join(CONFIG).is_file() {
            eprintln!(
                "warning: {} does not record which data it was trained on (written before {DATASET}): make sure --data names the run's dataset",
                out.display()
            );
        }
        return Ok(None);
    };
    let Some(why) = recorded.differs(&now) else {
        return Ok(None);
    };
    if !opts.other_data {
        bail!(
            "{} was trained on {} but is resumed on {}: {why} — pass --data {} to continue on the run's data, or --other-data to continue on this data (a stopped epoch then starts over)",
            out.display(),
            recorded.describe(),
            now.describe(),
            recorded.path.display()
        );
    }
    Ok(Some(Change {
        key: "data".into(),
        old: recorded.describe(),
        new: now.describe(),
    }))
}

/// The keys whose values differ between two configs, as `section.key`.
pub fn config_changes(old: &ClipConfig, new: &ClipConfig) -> Result<Vec<Change>> {
    fn flatten(prefix: &str, v: &toml::Value, out: &mut Vec<(String, toml::Value)>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&key, v, out);
                }
            }
            other => out.push((prefix.to_string(), other.clone())),
        }
    }
    let leaves = |c: &ClipConfig| -> Result<Vec<(String, toml::Value)>> {
        let mut out = vec![];
        flatten("", &toml::Value::try_from(c)?, &mut out);
        Ok(out)
    };
    let (a, b) = (leaves(old)?, leaves(new)?);
    let show = |v: Option<&toml::Value>| v.map(|v| v.to_string()).unwrap_or_else(|| "(none)".into());
    let keys: BTreeSet<&String> = a.iter().chain(&b).map(|(k, _)| k).collect();
    let get = |l: &[(String, toml::Value)], k: &str| l.iter().find(|(x, _)| x == k).map(|(_, v)| v.clone());
    Ok(keys
        .into_iter()
        .filter_map(|k| {
            let (x, y) = (get(&a, k), get(&b, k));
            (x != y).then(|| Change {
                key: k.clone(),
                old: show(x.as_ref()),
                new: show(y.as_ref()),
            })
        })
        .collect())
}

/// JSON has no NaN or infinity (serde_json writes `null`): read `null` back as NaN.
fn nan_if_null<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// A best-so-far loss of `null` was infinite (nothing measured yet).
fn inf_if_null<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::INFINITY))
}

/// The plateau's `best` starts infinite, written as `null`.
fn plateau_lenient<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Plateau, D::Error> {
    let mut v = serde_json::Value::deserialize(d)?;
    let unset = v.get("best").is_some_and(serde_json::Value::is_null);
    if unset {
        v["best"] = serde_json::json!(0.0);
    }
    let mut p: Plateau = serde_json::from_value(v).map_err(serde::de::Error::custom)?;
    if unset {
        p.best = f64::INFINITY;
    }
    Ok(p)
}
