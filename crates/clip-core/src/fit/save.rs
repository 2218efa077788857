//! What a run writes as it trains: the best model, the resumable checkpoint `last/` (swapped in
//! as a whole), and the metrics files.

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::Trainer;
use crate::checkpoint::{load_weights, optimizer_files, weights_bytes};
use crate::files::{sync_dir, write_checked};
use crate::run_dir::{LAST, METRICS, OPTIMIZER, STATE, WEIGHTS};

impl Trainer {
    /// Saves the model and optimiser as the run's best (`model.safetensors`, `optimizer.*`).
    pub(super) fn save_best(&self) -> Result<()> {
        if !self.writes {
            return Ok(());
        }
        let mut files = vec![(WEIGHTS.to_string(), weights_bytes(&self.model.params)?)];
        files.extend(optimizer_files(&self.opt, &self.out.join(OPTIMIZER))?);
        write_checked(&self.out, &files)
    }

    /// Saves the resumable checkpoint `last/` (weights, optimiser, training state — with the
    /// position inside the epoch when stopped mid-epoch), replacing the previous one as a whole:
    /// written to `last.tmp/`, then swapped in. Returns its folder.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        if !self.writes {
            return Ok(self.out.join(LAST));
        }
        let tmp = self.out.join(format!("{LAST}.tmp"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
        }
        let mut files = vec![(WEIGHTS.to_string(), weights_bytes(&self.model.params)?)];
        files.extend(optimizer_files(&self.opt, &tmp.join(OPTIMIZER))?);
        files.push((STATE.into(), serde_json::to_vec_pretty(&self.state)?));
        write_checked(&tmp, &files)?;
        let last = self.out.join(LAST);
        let old = self.out.join(format!("{LAST}.old"));
        if old.exists() {
            std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
        }
        if last.exists() {
            std::fs::rename(&last, &old).with_context(|| format!("renaming {}", last.display()))?;
        }
        std::fs::rename(&tmp, &last).with_context(|| format!("renaming {}", tmp.display()))?;
        sync_dir(&self.out)?;
        if old.exists() {
            std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
        }
        Ok(last)
    }

    /// metrics.json and loss.csv from the history (the programs draw the curves).
    pub fn write_metrics(&self) -> Result<()> {
        if !self.writes {
            return Ok(());
        }
        let h = &self.state.history;
        let metrics = serde_json::json!({
            "config": self.cfg.name,
            "epochs": self.state.epoch,
            "best_epoch": self.state.best_epoch,
            "best_val_loss": self.state.best_val_loss,
            "best_by": if self.validates() { "validation loss" } else { "training loss" },
            "start": self.state.start,
            "wise_ft": self.state.wise_ft,
            "agreement_start": self.state.agreement_start,
            "distillation": self.state.distillation,
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
        write_checked(
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
        load_weights(&self.model.params, &self.out.join(WEIGHTS))
    }
}
