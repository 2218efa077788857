//! Options every stage shares, so `cargo xtask verify` can pass the same flags to each.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::Device;

use crate::config::ClipConfig;

/// Model and device selection, flattened into each stage's `--help`.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// A TOML config (see assets/configs/); wins over --preset.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A named preset: tiny (CPU-sized, the default) or simple-clip (the tutorial's ResNet50 + DistilBERT).
    #[arg(long, value_name = "NAME")]
    pub preset: Option<String>,
    /// Where to run: auto (a GPU if compiled in and present), cpu, cuda, cuda:N, metal.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Seed for weights, data order and dropout (overrides the config's).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Write this stage's report as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

impl ModelArgs {
    pub fn load_config(&self) -> Result<ClipConfig> {
        let mut cfg = ClipConfig::resolve(self.config.as_deref(), self.preset.as_deref())?;
        if let Some(s) = self.seed {
            cfg.seed = s;
        }
        Ok(cfg)
    }

    pub fn device(&self) -> Result<Device> {
        crate::device::parse_device(&self.device)
    }
}

/// Runs a stage's body: an error becomes a message and exit code 2 (a gate failure is 1).
pub fn run_stage(f: impl FnOnce() -> Result<std::process::ExitCode>) -> std::process::ExitCode {
    match f() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

/// Formats 90724928 as "90,724,928".
pub fn fmt_count(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
