//! A run folder as stage 4 leaves it, opened for prediction or resuming.

use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::Device;

use crate::checkpoint::{CONFIG, TOKENIZER, WEIGHTS};
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
        model.params.load_safetensors(&self.dir.join(WEIGHTS))?;
        let tok = self.tokenizer(&cfg)?;
        Ok((model, tok))
    }
}
