//! Opening a run folder for training: a new run (refused where a run already is), or a resumed
//! one (its config, data, weights, optimiser and state checked and restored), from any moment a
//! previous run could have been stopped or killed at.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::state::{config_changes, Change};
use super::Trainer;
use crate::checkpoint::{load_optimizer, load_weights, weights_bytes};
use crate::config::ClipConfig;
use crate::files::{clean_stale, read_checked, write_checked};
use crate::prepare::Prepared;
use crate::run_dir::{
    is_checkpoint, refuse_existing_run, require_manifests, DataIdentity, RunDir, RunLock, CONFIG, DATASET, LAST,
    OPTIMIZER, STATE, TOKENIZER, WEIGHTS,
};

/// What a resume may do beyond what the run recorded.
#[derive(Debug, Clone, Copy, Default)]
pub struct ResumeOptions {
    /// Continue on data other than the run's (`dataset.json`): another path or another listing.
    /// Without it such a resume is refused, naming both. A run stopped mid-epoch then restarts
    /// that epoch (its remaining batches are not those of the other data).
    pub other_data: bool,
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
        refuse_existing_run(&out)?;
        clean_stale(&out)?;
        let mut t = Self::build(cfg, data, lock)?;
        let loaded = crate::pretrained::load_pretrained(&t.model, &crate::hub::Hub::from_env())?;
        t.state.pretrained = super::wise::PretrainedPin::of(&loaded)?;
        t.start_files()?;
        // The folder holds a complete new run: an `--overwrite` that emptied it is done.
        crate::run_dir::overwrite_done(&t.out)?;
        Ok(t)
    }

    /// The files a run has from its first moment, in one checksummed group — config, tokenizer,
    /// data identity, untrained weights. No `last/` is written yet: a run killed before its first
    /// checkpoint is resumed by starting again from these (see [`Trainer::restarted`]), which is
    /// what an epoch-0 checkpoint would hold, without writing the weights twice and the zero
    /// optimiser moments (over 1 GB for simple-clip) at every start.
    pub(super) fn start_files(&self) -> Result<()> {
        let identity = DataIdentity::of(&self.data);
        write_checked(
            &self.out,
            &[
                (CONFIG.into(), self.cfg.to_toml()?.into_bytes()),
                (TOKENIZER.into(), self.data.tokenizer.to_json()?.into_bytes()),
                (DATASET.into(), identity.to_json()?),
                (WEIGHTS.into(), weights_bytes(&self.model.params)?),
            ],
        )
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
        require_manifests(&out)?;
        let last = recover_last(&out)?;
        if !out.join(CONFIG).is_file() {
            bail!(
                "{} holds no run to resume (nothing was written yet, not even its {CONFIG}): start a new run there",
                out.display()
            );
        }
        let saved = RunDir { dir: out.clone() }.config()?;
        let mut changes = config_changes(&saved, cfg)?;
        refuse_fixed_changes(&out, &changes)?;
        let data_change = check_data(&out, &data, opts)?;
        let mut t = Self::build(cfg, data, lock)?;
        t.resumed = true;
        let Some(last) = last else {
            t.restart(&out)?;
            t.changes = changes;
            return Ok(t);
        };
        let configured = t.opt.base.clone();
        load_weights(&t.model.params, &last.join(WEIGHTS))?;
        load_optimizer(&mut t.opt, &last.join(OPTIMIZER))?;
        let state_path = last.join(STATE);
        t.state = serde_json::from_slice(&read_checked(&state_path)?)
            .with_context(|| format!("parsing {}", state_path.display()))?;
        t.refuse_moved_batches(&out, &changes)?;
        if let Some(change) = data_change {
            // Other data: the rest of a stopped epoch would be other batches; start it over.
            t.state.partial = None;
            write_checked(&out, &[(DATASET.into(), DataIdentity::of(&t.data).to_json()?)])?;
            changes.push(change);
        }
        t.apply_configured_rates(configured);
        t.state.plateau.patience = cfg.train.patience;
        t.state.plateau.factor = cfg.train.factor;
        if changes.iter().any(|c| c.key != "data") {
            write_checked(&out, &[(CONFIG.into(), cfg.to_toml()?.into_bytes())])?;
        }
        t.changes = changes;
        Ok(t)
    }

    /// Starts a run killed before its first checkpoint again from epoch 1, from the untrained
    /// weights it saved when they verify (else from the same seeded initialisation).
    fn restart(&mut self, out: &Path) -> Result<()> {
        if out.join(WEIGHTS).is_file() {
            load_weights(&self.model.params, &out.join(WEIGHTS))?;
        } else {
            let loaded = crate::pretrained::load_pretrained(&self.model, &self.hub())?;
            self.state.pretrained = super::wise::PretrainedPin::of(&loaded)?;
        }
        self.start_files()?;
        self.restarted = true;
        Ok(())
    }

    /// Refuses a change of batch size or accumulation when the run was stopped mid-epoch: the
    /// rest of the epoch would be other batches than the ones the resume skips past.
    fn refuse_moved_batches(&self, out: &Path, changes: &[Change]) -> Result<()> {
        if let Some(p) = &self.state.partial {
            let moved: Vec<String> = changes
                .iter()
                .filter(|c| c.key == "train.batch_size" || c.key == "train.accumulate")
                .map(|c| c.to_string())
                .collect();
            if !moved.is_empty() {
                bail!(
                    "{} was stopped in the middle of epoch {} (step {}): {} would change which batches the rest of the epoch holds — resume with the run's value, then change it",
                    out.display(),
                    self.state.epoch + 1,
                    p.steps,
                    moved.join(", ")
                );
            }
        }
        Ok(())
    }

    /// The optimiser's saved rates give way to the config's (`configured`, each group's base
    /// settings); the schedule's current factor stays.
    fn apply_configured_rates(
        &mut self,
        configured: std::collections::BTreeMap<crate::params::Group, crate::optim::GroupSettings>,
    ) {
        for (g, want) in configured {
            let (base, now) = (self.opt.base[&g], self.opt.groups[&g]);
            if base != want {
                let factor = if base.lr > 0.0 {
                    now.lr / base.lr
                } else {
                    self.state.plateau.scale
                };
                self.opt.base.insert(g, want);
                self.opt.groups.insert(
                    g,
                    crate::optim::GroupSettings {
                        lr: want.lr * factor,
                        weight_decay: want.weight_decay,
                    },
                );
            }
        }
    }
}

/// Refuses config changes a resume cannot take: anything but `train.*` keys and augmentation
/// makes another model or another data split than the run's.
fn refuse_fixed_changes(out: &Path, changes: &[Change]) -> Result<()> {
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
    Ok(())
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
    clean_stale(out)?;
    clean_stale(&last)?;
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
