//! A run folder as stage 4 leaves it, opened for prediction or resuming, and the lock that keeps
//! one writer per folder.

mod lock;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Device;

pub use lock::{process_alive, Holder, RunLock, LOCK};

use crate::checkpoint::{CONFIG, LAST, MANIFEST, METRICS, OPTIMIZER, STATE, TOKENIZER, WEIGHTS};

/// What a run writes into its folder (besides `run.lock` and the shared feature cache): a folder
/// holding any of these already holds a run.
pub const RUN_FILES: [&str; 13] = [
    CONFIG,
    TOKENIZER,
    WEIGHTS,
    OPTIMIZER,
    "optimizer.json",
    MANIFEST,
    METRICS,
    "loss.csv",
    "loss.png",
    "similarity_before.png",
    "similarity_after.png",
    LAST,
    "last.old",
];

/// The run files already in `dir` (empty when it is missing or holds no run).
pub fn run_files(dir: &Path) -> Vec<&'static str> {
    RUN_FILES.into_iter().filter(|f| dir.join(f).exists()).collect()
}

/// Removes a previous run's files from `dir` (only those in [`RUN_FILES`], and `last.tmp/`: the
/// folder may hold other things). Call it while holding the folder's [`RunLock`].
pub fn clear_run(dir: &Path) -> Result<()> {
    for f in RUN_FILES.iter().copied().chain(["last.tmp"]) {
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

    pub fn config(&self) -> Result<ClipConfig> {
        ClipConfig::from_toml_file(&self.dir.join(CONFIG))
    }

    pub fn tokenizer(&self, cfg: &ClipConfig) -> Result<TextTokenizer> {
        TextTokenizer::from_file(&self.dir.join(TOKENIZER), cfg.max_tokens())
    }

    /// The best model with its tokenizer, ready for prediction.
    pub fn load(&self, device: &Device) -> Result<(ClipModel, TextTokenizer)> {
        let cfg = self.config()?;
        let model = ClipModel::new(&cfg, device)?;
        crate::checkpoint::load_weights(&model.params, &self.dir.join(WEIGHTS))?;
        let tok = self.tokenizer(&cfg)?;
        Ok((model, tok))
    }
}
