//! The training section (`[train]`): batch, learning rates, schedule, which towers train, and the
//! precision.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::Precision;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// ReduceLROnPlateau on validation loss (the tutorial's).
    Plateau,
    /// Linear warm-up, then cosine decay to zero over the run.
    Cosine,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub batch_size: usize,
    pub epochs: usize,
    pub lr_image: f64,
    pub lr_text: f64,
    pub lr_head: f64,
    pub weight_decay: f64,
    pub schedule: Schedule,
    pub patience: usize,
    pub factor: f64,
    pub warmup_steps: usize,
    /// Clip gradients to this global L2 norm (0 = off).
    pub clip_grad_norm: f64,
    /// Accumulate gradients over this many micro-batches per optimiser step.
    pub accumulate: usize,
    /// Run each batch through the towers this many pairs at a time (0 = the whole batch at
    /// once), with the gradient cache (`train::grad_cache`): the loss and its gradient are still
    /// the whole batch's, every pair a negative for every other, in the activation memory of
    /// `micro_batch` pairs, for a second forward pass. Must divide `batch_size`.
    pub micro_batch: usize,
    /// Keep the image tower fixed: evaluation mode, no gradient, no optimiser state (and its
    /// features cached when augmentation is off).
    pub freeze_image: bool,
    /// Keep the text tower fixed: evaluation mode, no gradient, no optimiser state, features cached.
    pub freeze_text: bool,
    /// Lock the image tower but its last `unlocked_layers` blocks (open_clip's `--lock-image`):
    /// the locked part gets no gradient and no optimiser state, its BatchNorms keep their
    /// statistics. With `unlocked_layers = 0` the image projection is locked too (LiT).
    pub lock_image: bool,
    /// Lock the text tower but its last `unlocked_layers` blocks (`--lock-text`).
    pub lock_text: bool,
    /// Blocks at the top of a locked tower that still train, with what follows them (the final
    /// LayerNorm or attention pool, and the projection).
    pub unlocked_layers: usize,
    /// Layer-wise learning-rate decay: block i of L trains at lr·decay^(L−i), the embeddings at
    /// lr·decay^(L+1), the final norm and projection at lr (1 = off).
    pub layer_decay: f64,
    /// Weight decay on every weight matrix of both towers and the heads (open_clip's rule:
    /// not on biases, norms, `logit_scale`), as a pretrained start wants; off, only the heads
    /// decay (the tutorial's rule).
    pub decay_towers: bool,
    /// Warm-up as a share of all steps, for the cosine schedule: the longer of this and
    /// `warmup_steps` is used (a pretrained start: 0.1).
    pub warmup_share: f64,
    /// The precision of the GEMMs (`--precision`): fp32, or bf16 mixed precision on AMX
    /// (`nn::precision`). Recorded with the run; a resumed run keeps it.
    pub precision: Precision,
}

impl TrainConfig {
    /// Freezes `image`, `text` or `both` towers (the stages' `--freeze`).
    pub fn freeze(&mut self, towers: &str) -> Result<()> {
        match towers {
            "image" => self.freeze_image = true,
            "text" => self.freeze_text = true,
            "both" => (self.freeze_image, self.freeze_text) = (true, true),
            other => bail!("cannot freeze {other:?}: name image, text or both"),
        }
        Ok(())
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            batch_size: 8,
            epochs: 30,
            lr_image: 1e-4,
            lr_text: 1e-5,
            lr_head: 1e-3,
            weight_decay: 1e-3,
            schedule: Schedule::Plateau,
            patience: 1,
            factor: 0.8,
            warmup_steps: 0,
            clip_grad_norm: 0.0,
            accumulate: 1,
            micro_batch: 0,
            freeze_image: false,
            freeze_text: false,
            lock_image: false,
            lock_text: false,
            unlocked_layers: 0,
            layer_decay: 1.0,
            decay_towers: false,
            warmup_share: 0.0,
            precision: Precision::Fp32,
        }
    }
}

impl TrainConfig {
    /// Defaults for fine-tuning a pretrained CLIP (a config with `pretrained`), not training
    /// from scratch: small steps on both towers and the checkpoint's own projections (FLYP's
    /// 1e-5, weight decay 0.1 on every weight matrix, cosine decay after a 10 % warm-up), since
    /// the recipe's 1e-3 on a few hundred pairs wipes out what the checkpoint knew.
    pub fn pretrained_start() -> Self {
        Self {
            batch_size: 32,
            epochs: 10,
            lr_image: 1e-5,
            lr_text: 1e-5,
            lr_head: 1e-5,
            weight_decay: 0.1,
            decay_towers: true,
            schedule: Schedule::Cosine,
            warmup_share: 0.1,
            ..Self::default()
        }
    }

    /// Warm-up steps of a run of `total` steps: the longer of `warmup_steps` and the share.
    pub fn warmup(&self, total: u64) -> u64 {
        (self.warmup_steps as u64).max((self.warmup_share * total as f64).round() as u64)
    }

    /// One line saying how the optimiser will treat a pretrained start (stage 4 prints it).
    pub fn describe(&self) -> String {
        let lrs = if self.lr_image == self.lr_text && self.lr_text == self.lr_head {
            format!("lr {:.0e} for both towers and the projections", self.lr_image)
        } else {
            format!(
                "lr {:.0e} image, {:.0e} text, {:.0e} projections",
                self.lr_image, self.lr_text, self.lr_head
            )
        };
        let decay = if self.decay_towers {
            format!("weight decay {} on every weight matrix", self.weight_decay)
        } else {
            format!("weight decay {} on the heads", self.weight_decay)
        };
        let schedule = match self.schedule {
            Schedule::Cosine => "cosine decay after a warm-up".to_string(),
            Schedule::Plateau => format!("×{} after {} epochs without improvement", self.factor, self.patience),
        };
        let mut parts = vec![lrs, decay, schedule];
        if self.layer_decay != 1.0 {
            parts.push(format!("layer-wise lr decay {}", self.layer_decay));
        }
        for (locked, tower) in [(self.lock_image, "image"), (self.lock_text, "text")] {
            if locked {
                parts.push(match self.unlocked_layers {
                    0 => format!("{tower} tower locked"),
                    n => format!(
                        "{tower} tower locked but its last {n} block{}",
                        if n == 1 { "" } else { "s" }
                    ),
                });
            }
        }
        parts.join(", ")
    }
}

impl TrainConfig {
    /// The knobs' own checks (those against the towers' block counts are
    /// [`super::ClipConfig::validate`]'s).
    pub(super) fn validate(&self, errs: &mut Vec<String>) {
        let tr = self;
        if tr.batch_size < 2 {
            errs.push(format!(
                "train.batch_size must be at least 2 (contrastive loss compares pairs in a batch; got {})",
                tr.batch_size
            ));
        }
        if tr.epochs == 0 {
            errs.push("train.epochs must be at least 1".into());
        }
        if tr.micro_batch > 0 && !tr.batch_size.is_multiple_of(tr.micro_batch) {
            errs.push(format!(
                "train.micro_batch ({}) must divide train.batch_size ({}): every micro-batch of a batch is the same size",
                tr.micro_batch, tr.batch_size
            ));
        }
        if tr.accumulate == 0 {
            errs.push("train.accumulate must be at least 1".into());
        }
        for (name, lr) in [
            ("lr_image", tr.lr_image),
            ("lr_text", tr.lr_text),
            ("lr_head", tr.lr_head),
        ] {
            if !(lr >= 0.0 && lr.is_finite()) {
                errs.push(format!("train.{name} must be a finite number ≥ 0 (got {lr})"));
            }
        }
        if !(tr.layer_decay > 0.0 && tr.layer_decay <= 1.0) {
            errs.push(format!(
                "train.layer_decay must be in (0, 1] (got {}; 1 is off)",
                tr.layer_decay
            ));
        }
        if !(0.0..1.0).contains(&tr.warmup_share) {
            errs.push(format!(
                "train.warmup_share must be in [0, 1) (got {})",
                tr.warmup_share
            ));
        }
        for (lock, freeze, tower) in [
            (tr.lock_image, tr.freeze_image, "image"),
            (tr.lock_text, tr.freeze_text, "text"),
        ] {
            if lock && freeze {
                errs.push(format!(
                    "train.lock_{tower} and train.freeze_{tower} both set: freeze fixes the whole {tower} tower (and caches its features), lock keeps its last unlocked_layers blocks training — choose one"
                ));
            }
        }
    }
}
