//! A run folder: its layout (the file names, the complete list of what a run writes), the rules a
//! run's files obey (every one checksummed), the folder as stage 4 leaves it opened for prediction
//! or resuming, the data it trained on, and the lock that keeps one writer per folder.

mod lock;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Device;
use serde::{Deserialize, Serialize};

pub use crate::files::{process_alive, MANIFEST};
pub use lock::{Holder, RunLock, LOCK};

/// Files of a run folder written by stage 4.
pub const WEIGHTS: &str = "model.safetensors";
pub const CONFIG: &str = "config.toml";
pub const TOKENIZER: &str = "tokenizer.json";
pub const METRICS: &str = "metrics.json";
pub const OPTIMIZER: &str = "optimizer.safetensors";
/// The latest checkpoint (for `--resume`), beside the best model.
pub const LAST: &str = "last";
pub const STATE: &str = "state.json";
/// Which data a run trains on ([`DataIdentity`]). Its presence also marks a run written with
/// every file checksummed: such a run's folders must hold a manifest ([`require_manifests`]).
pub const DATASET: &str = "dataset.json";
/// Written by [`clear_run`] before it deletes anything, removed once the new run's first files
/// are complete: while it is there the folder holds no usable model (an `--overwrite` was
/// interrupted), whatever other files it still has.
pub const OVERWRITING: &str = "overwrite.incomplete";

/// Which data a run trains on, recorded in its `dataset.json`, so that `--resume` on other data
/// (another path, or the same path with other contents) is caught instead of silently skipping
/// the wrong batches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataIdentity {
    /// The dataset as given (made absolute): a folder, a captions file, a shard pattern.
    pub path: PathBuf,
    pub images: usize,
    pub pairs: usize,
    /// [`crate::data::Dataset::listing_fingerprint`].
    pub fingerprint: String,
}

impl DataIdentity {
    pub fn of(data: &crate::prepare::Prepared) -> Self {
        Self {
            path: std::path::absolute(&data.source).unwrap_or_else(|_| data.source.clone()),
            images: data.dataset.images.len(),
            pairs: data.dataset.pairs.len(),
            fingerprint: data.dataset.listing_fingerprint(),
        }
    }

    /// The identity recorded in `run`, verified; `None` for a run written before it was recorded.
    pub fn read(run: &Path) -> Result<Option<Self>> {
        let path = run.join(DATASET);
        if !path.is_file() {
            return Ok(None);
        }
        let bytes = crate::files::read_checked(&path)?;
        Ok(Some(
            serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))?,
        ))
    }

    pub fn to_json(&self) -> Result<Vec<u8>> {
        Ok(serde_json::to_vec_pretty(self)?)
    }

    /// `PATH (N pairs of M images, listing 1234abcd…)`.
    pub fn describe(&self) -> String {
        format!(
            "{} ({} pairs of {} images, listing {})",
            self.path.display(),
            self.pairs,
            self.images,
            // By characters: the file may hold any text, and a byte cut can split one.
            self.fingerprint.chars().take(12).collect::<String>()
        )
    }

    /// How `other` differs from this, in words; `None` when it is the same data.
    pub fn differs(&self, other: &Self) -> Option<String> {
        let same_path = self.path == other.path;
        let same_listing = self.fingerprint == other.fingerprint;
        match (same_path, same_listing) {
            (true, true) => None,
            (false, true) => Some("another path, with the same listing (moved or copied?)".into()),
            (true, false) => Some(format!(
                "the same path, but its listing changed ({} pairs of {} images, was {} of {})",
                other.pairs, other.images, self.pairs, self.images
            )),
            (false, false) => Some("another dataset".into()),
        }
    }
}

/// What a run writes into its folder (besides `run.lock` and the shared feature cache): a folder
/// holding any of these already holds a run, and `--overwrite` removes all of them. A test runs
/// stage 4 and fails on any file it leaves that is not listed here.
pub const RUN_FILES: [&str; 19] = [
    OVERWRITING,
    CONFIG,
    TOKENIZER,
    WEIGHTS,
    OPTIMIZER,
    "optimizer.json",
    MANIFEST,
    METRICS,
    DATASET,
    "loss.csv",
    "loss.png",
    "lr.png",
    "quality.png",
    "similarity_before.png",
    "similarity_after.png",
    "similarity.json",
    "report.html",
    LAST,
    "last.old",
];

/// The run files already in `dir` (empty when it is missing or holds no run).
pub fn run_files(dir: &Path) -> Vec<&'static str> {
    RUN_FILES.into_iter().filter(|f| dir.join(f).exists()).collect()
}

/// Refuses to start a run in `dir` when it already holds one (any of [`RUN_FILES`]): the one copy
/// of this rule, for the library ([`crate::fit::Trainer::new`]) and the programs alike.
pub fn refuse_existing_run(dir: &Path) -> Result<()> {
    // A folder an `--overwrite` emptied (its marker alone) takes a new run.
    let existing: Vec<&str> = run_files(dir).into_iter().filter(|f| *f != OVERWRITING).collect();
    if !existing.is_empty() {
        anyhow::bail!(
            "{} already holds a run ({}): continue it with --resume {0}, or pass --overwrite to start over (its model and checkpoints are deleted)",
            dir.display(),
            existing.join(", ")
        );
    }
    Ok(())
}

/// Makes `dir` ready for a new run, holding its lock: a folder holding a run is refused, or with
/// `overwrite` cleared of that run's files. Returns the lock and the files removed.
pub fn open_new(dir: &Path, overwrite: bool) -> Result<(RunLock, Vec<&'static str>)> {
    let lock = RunLock::acquire(dir)?;
    let existing = run_files(dir);
    if overwrite && !existing.is_empty() {
        clear_run(dir)?;
        return Ok((lock, existing));
    }
    refuse_existing_run(dir)?;
    Ok((lock, vec![]))
}

/// Removes a previous run's files from `dir` (only those in [`RUN_FILES`], and `last.tmp/`: the
/// folder may hold other things). Call it while holding the folder's [`RunLock`].
pub fn clear_run(dir: &Path) -> Result<()> {
    // First the marker (see [`OVERWRITING`]): a crash from here until the new run's first files
    // are written leaves a folder that says so, never an old model beside a new config. Then
    // the weights, so nothing loadable is left while the rest goes.
    crate::files::write_atomic(
        &dir.join(OVERWRITING),
        b"stage 4 --overwrite was replacing the run in this folder and did not finish: its model is gone. Run stage 4 again with --overwrite.\n",
    )?;
    for f in [WEIGHTS]
        .into_iter()
        .chain(RUN_FILES.iter().copied().filter(|f| *f != OVERWRITING && *f != WEIGHTS))
        .chain(["last.tmp"])
    {
        let p = dir.join(f);
        let r = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else if p.exists() {
            std::fs::remove_file(&p)
        } else {
            continue;
        };
        r.with_context(|| format!("removing {}", p.display()))?;
    }
    Ok(())
}

/// Refuses a run folder (and its `last/`) whose manifest is missing, when the run checksums
/// every file (it has [`DATASET`]): its files could then not be verified. A run written before
/// that is read with warnings instead (see [`crate::files::read_checked`]).
pub fn require_manifests(run: &Path) -> Result<()> {
    refuse_interrupted(run)?;
    if !run.join(DATASET).is_file() {
        return Ok(());
    }
    for dir in [run.to_path_buf(), run.join(LAST)] {
        if dir.is_dir() && !dir.join(MANIFEST).is_file() {
            anyhow::bail!(
                "{} has no {MANIFEST}, so its files cannot be verified: the manifest was deleted or lost — restore it from a copy, or resume from the run's last/ checkpoint",
                dir.display()
            );
        }
    }
    Ok(())
}

/// Refuses a folder whose `--overwrite` was interrupted ([`OVERWRITING`]).
pub fn refuse_interrupted(dir: &Path) -> Result<()> {
    if dir.join(OVERWRITING).exists() {
        anyhow::bail!(
            "{} holds no usable run: stage 4 --overwrite was replacing its run and was interrupted before the new run's first files were written ({OVERWRITING} is there), so its old model is gone — run stage 4 again with --overwrite",
            dir.display()
        );
    }
    Ok(())
}

/// Marks an `--overwrite` complete: the new run's first files are written.
pub fn overwrite_done(dir: &Path) -> Result<()> {
    match std::fs::remove_file(dir.join(OVERWRITING)) {
        Ok(()) => crate::files::sync_dir(dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.join(OVERWRITING).display())),
    }
}

/// Whether `dir` holds a complete checkpoint (training state and weights).
pub fn is_checkpoint(dir: &Path) -> bool {
    dir.join(STATE).is_file() && dir.join(WEIGHTS).is_file()
}
use crate::config::ClipConfig;
use crate::data::TextTokenizer;
use crate::model::ClipModel;

/// A trained model's folder: best weights, config and tokenizer (what prediction needs).
#[derive(Debug, Clone)]
pub struct RunDir {
    pub dir: PathBuf,
}

impl RunDir {
    /// Opens a run folder, naming each file it lacks.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            anyhow::bail!(
                "run folder {} does not exist: pass the --out folder of a stage 4 run",
                dir.display()
            );
        }
        refuse_interrupted(dir)?;
        let missing: Vec<&str> = [WEIGHTS, CONFIG, TOKENIZER]
            .into_iter()
            .filter(|f| !dir.join(f).is_file())
            .collect();
        if !missing.is_empty() {
            anyhow::bail!(
                "run folder {} is incomplete: missing {} — did stage 4 finish its first epoch?",
                dir.display(),
                missing.join(", ")
            );
        }
        Ok(Self { dir: dir.to_path_buf() })
    }

    /// The run's `config.toml`, verified against its manifest.
    pub fn config(&self) -> Result<ClipConfig> {
        let path = self.dir.join(CONFIG);
        require_manifests(&self.dir)?;
        let bytes = crate::files::read_checked(&path)?;
        let text = std::str::from_utf8(&bytes).with_context(|| format!("{} is not UTF-8", path.display()))?;
        ClipConfig::from_toml_str(text).with_context(|| format!("in config {}", path.display()))
    }

    /// The run's `tokenizer.json`, verified against its manifest.
    pub fn tokenizer(&self, cfg: &ClipConfig) -> Result<TextTokenizer> {
        let path = self.dir.join(TOKENIZER);
        require_manifests(&self.dir)?;
        let bytes = crate::files::read_checked(&path)?;
        TextTokenizer::from_json(&bytes, cfg.max_tokens(), &path.display().to_string())
    }

    /// The best model with its tokenizer, ready for prediction.
    pub fn load(&self, device: &Device) -> Result<(ClipModel, TextTokenizer)> {
        let cfg = self.config()?;
        // The config is checked against the weights' header before a tensor is allocated: a
        // config.toml describing a model far larger than model.safetensors holds is refused.
        let need = ClipModel::size(&cfg)?.total();
        crate::params::check_memory(need, "the model's parameters")
            .with_context(|| format!("in {}", self.dir.join(CONFIG).display()))?;
        crate::pretrained_clip::check_weights_hold(
            need,
            &self.dir.join(CONFIG).display().to_string(),
            &self.dir.join(WEIGHTS),
        )?;
        let model = ClipModel::new(&cfg, device)?;
        require_manifests(&self.dir)?;
        crate::checkpoint::load_weights(&model.params, &self.dir.join(WEIGHTS))?;
        let tok = self.tokenizer(&cfg)?;
        Ok((model, tok))
    }
}
