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

mod eval;
mod open;
mod save;
mod state;
mod teach;
mod wise;
mod world;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};

pub use eval::{Validation, MAX_RECALL_PAIRS};
pub use open::ResumeOptions;
pub use state::{config_changes, Change, EpochRecord, PartialEpoch, Stopped, TrainState};
pub use wise::{WiseFt, WisePoint};

use crate::config::{ClipConfig, Schedule};
use crate::data::Batch;
use crate::feature_cache::{FrozenFeatures, CACHE_DIR};
use crate::model::ClipModel;
use crate::optim::AdamW;
use crate::params::Group;
use crate::prepare::Prepared;
use crate::run_dir::RunLock;
use crate::schedule::{cosine, Plateau};
use crate::train::Contrastive;

/// A run in training: its config, model, optimiser, data, folder and what it remembers. Its
/// fields are private; the programs and the report read it through the accessors below, and
/// change it only through the training methods (`train_epoch`, `end_epoch`, the savers).
pub struct Trainer {
    cfg: ClipConfig,
    model: ClipModel,
    opt: AdamW,
    data: Prepared,
    out: PathBuf,
    state: TrainState,
    /// Where frozen towers' features are cached; `None` runs them on every batch.
    feature_cache: Option<PathBuf>,
    /// The cached features, once computed or read (see [`Trainer::frozen_features`]).
    frozen: Mutex<Option<Arc<FrozenFeatures>>>,
    /// Raised (by a signal handler) to stop at the end of the current step.
    stop: Option<Arc<AtomicBool>>,
    /// A distillation teacher's embeddings of the dataset (`--teacher`).
    teacher: Option<Arc<crate::distill::Targets>>,
    /// What a resumed run's config changed (recorded in `config.toml`), and `data` when it was
    /// resumed on other data ([`ResumeOptions::other_data`]).
    changes: Vec<Change>,
    /// Set when `--resume` found no checkpoint (the run was killed before its first one) and so
    /// started again from epoch 1, with the run's config and data.
    restarted: bool,
    /// Set for a resumed run: its config comes from its folder, which may come from anyone, so
    /// the pretrained checkpoint it names is read from the Hub cache only (never downloaded).
    resumed: bool,
    /// The ranks of a data-parallel run, this one among them ([`Trainer::set_world`]); `None`
    /// for one process.
    world: Option<Arc<dyn crate::dist::Collective>>,
    /// Whether this trainer writes its run folder: every rank but rank 0 of a data-parallel run
    /// trains without writing.
    writes: bool,
    /// The folder's lock, held as long as the trainer lives.
    #[allow(dead_code)]
    lock: RunLock,
}

/// Read-only views of a run, for the programs and the report.
impl Trainer {
    /// The config the run trains with (a resumed run's, with its changes applied).
    pub fn cfg(&self) -> &ClipConfig {
        &self.cfg
    }

    pub fn model(&self) -> &ClipModel {
        &self.model
    }

    pub fn opt(&self) -> &AdamW {
        &self.opt
    }

    /// The dataset, its split, tokenizer, images and loader.
    pub fn data(&self) -> &Prepared {
        &self.data
    }

    /// The run folder.
    pub fn out(&self) -> &std::path::Path {
        &self.out
    }

    /// The history, the best epoch, the schedule, the position in a stopped epoch.
    pub fn state(&self) -> &TrainState {
        &self.state
    }

    /// What a resume changed (see [`ResumeOptions`]).
    pub fn changes(&self) -> &[Change] {
        &self.changes
    }

    /// Whether a resume found no checkpoint and started again from epoch 1.
    pub fn restarted(&self) -> bool {
        self.restarted
    }

    /// Counts the epoch just trained as done without validating, scheduling or saving anything:
    /// for benchmarks that time epochs alone (a real run calls [`Trainer::end_epoch`]).
    pub fn skip_end_of_epoch(&mut self) {
        self.state.epoch += 1;
        self.state.partial = None;
    }

    /// The current learning rate of a parameter group.
    pub fn lr(&self, group: Group) -> f64 {
        self.opt.groups[&group].lr
    }
}

impl Trainer {
    /// Where pretrained weights come from: the Hub as the environment says for a new run (the
    /// user named them), its cache alone for a resumed one (its folder named them).
    pub(crate) fn hub(&self) -> crate::hub::Hub {
        let hub = crate::hub::Hub::from_env();
        if self.resumed {
            crate::hub::Hub::new(hub.cache_dir(), true).with_progress(false)
        } else {
            hub
        }
    }

    /// The model, optimiser and state of epoch 0, touching no file.
    fn build(cfg: &ClipConfig, data: Prepared, lock: RunLock) -> Result<Self> {
        // Recorded in config.toml: prediction then answers captions with the teacher's text
        // tower, the student's having learned nothing.
        let mut cfg = cfg.clone();
        cfg.distill.images_only = cfg.distill.teacher.is_some() && data.dataset.captionless();
        // Such a run is used later through the teacher it records, opened only as a local folder
        // (see `Teacher::open_recorded`): refuse a Hub teacher now, not after training.
        if let Some(t) = cfg.distill.teacher.as_deref().filter(|_| cfg.distill.images_only) {
            if !Path::new(t).is_absolute() || !Path::new(t).is_dir() {
                bail!("{}", crate::distill::not_local_teacher(t));
            }
        }
        let cfg = &cfg;
        let model = ClipModel::new(cfg, &data.device)?;
        let decay = cfg.train.layer_decay;
        let opt = AdamW::new(&model.params, &cfg.train)?
            .with_lr_scales(|name| crate::model::blocks::lr_scale(cfg, decay, name));
        let state = TrainState {
            epoch: 0,
            best_val_loss: f64::INFINITY,
            best_epoch: 0,
            plateau: Plateau::new(cfg.train.patience, cfg.train.factor),
            history: vec![],
            start: None,
            agreement_start: None,
            wise_ft: None,
            distillation: None,
            partial: None,
            pretrained: None,
            world_size: None,
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
            resumed: false,
            teacher: None,
            world: None,
            writes: true,
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

    /// Optimiser steps in one epoch.
    pub fn steps_per_epoch(&self) -> usize {
        let batches = self
            .shard()
            .num_batches(self.data.split.train.len(), self.cfg.train.batch_size);
        batches.div_ceil(self.cfg.train.accumulate).max(1)
    }

    /// Trains one epoch (or the rest of a stopped one); `on_step(step_in_epoch, loss, pairs_per_s)`
    /// reports progress. Returns (mean loss, pairs per second), or the error [`Stopped`] when the
    /// stop flag was raised (the steps done are kept in `state.partial`). In a data-parallel run
    /// the pairs per second are every rank's together.
    pub fn train_epoch(&mut self, mut on_step: impl FnMut(usize, f64, f64)) -> Result<(f64, f64)> {
        let epoch = self.state.epoch;
        let steps_per_epoch = self.steps_per_epoch();
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
        let (batches, view) = self.epoch_batches(epoch)?;
        let mut step = 0usize;
        let mut iter = batches.into_iter().peekable();
        while let Some(b) = iter.next() {
            pending.push(b?);
            if pending.len() < self.cfg.train.accumulate && iter.peek().is_some() {
                continue;
            }
            if step >= skip {
                // (Steps before `skip` were done before the run was stopped: the same batches.)
                // A rank's share counts as its global batch: the speed is every rank's together.
                let n: usize = pending
                    .iter()
                    .map(|b| b.global.as_ref().map_or(b.pairs.len(), |g| g.pairs.len()))
                    .sum();
                let loss = self
                    .step_on(&pending, view)
                    .with_context(|| format!("epoch {}, step {}", epoch + 1, step + 1))?;
                pairs += n;
                losses.push(loss);
                on_step(step + 1, loss, pairs as f64 / started.elapsed().as_secs_f64().max(1e-9));
            }
            pending.clear();
            step += 1;
            if step > skip && self.opt.step.is_multiple_of(world::CHECK_EVERY) {
                self.check_same_weights()?;
            }
            if step > skip && self.stop_requested()? {
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
        self.check_same_weights()?;
        let mean = losses.iter().sum::<f64>() / losses.len() as f64;
        Ok((mean, pairs as f64 / started.elapsed().as_secs_f64().max(1e-9)))
    }

    /// The batches of epoch `epoch` in their order, and the teacher's view of the images they use
    /// (distilling with augmentation: the crops the teacher embedded at the start).
    fn epoch_batches(&self, epoch: usize) -> Result<(crate::data::Batches, Option<usize>)> {
        let view = match &self.teacher {
            Some(t) if self.cfg.data.augment => t.view_of_epoch(epoch),
            _ => None,
        };
        let augment = match view {
            Some(v) => crate::data::Augment::View(v as u64),
            None => self.cfg.data.augment.into(),
        };
        let batches = self.data.loader.batches_sharded(
            &self.data.split.train,
            self.cfg.train.batch_size,
            Some(crate::data::epoch_seed(self.cfg.seed, epoch)),
            augment,
            self.frozen_features()?,
            self.shard(),
        );
        Ok((batches, view))
    }

    /// One optimiser step over `pending` (the batches it accumulates): the schedule's rate, then
    /// the configured loss, through the gradient cache with `train.micro_batch`. Returns the loss.
    fn step_on(&mut self, pending: &[Batch], view: Option<usize>) -> Result<f64> {
        let t = &self.cfg.train;
        if t.schedule == Schedule::Cosine {
            let total_steps = (t.epochs * self.steps_per_epoch()) as u64;
            self.opt
                .scale_lr(cosine(self.opt.step, t.warmup(total_steps), total_steps));
        }
        let (clip, micro) = (t.clip_grad_norm, t.micro_batch);
        let world = self.world.as_deref();
        let out = match &self.teacher {
            None => world::step(&self.model, &mut self.opt, world, pending, (clip, micro), &Contrastive)?,
            Some(t) => {
                let objective = teach::Distilling {
                    targets: t,
                    dataset: &self.data.dataset,
                    cfg: &self.cfg.distill,
                    view,
                    device: &self.data.device,
                };
                world::step(&self.model, &mut self.opt, world, pending, (clip, micro), &objective)?
            }
        };
        Ok(out.loss)
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
            self.save_best()?;
        }
        self.save_checkpoint()?;
        self.write_metrics()?;
        Ok(best)
    }
}
