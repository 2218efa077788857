//! Crash-proof files: everything is written to a temporary file in the same folder, flushed, and
//! renamed into place, so a checkpoint is either the old one or the new one, never half of each.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// Writes `bytes` to `path` atomically (temporary file + fsync + rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating folder {}", dir.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

use candle_core::Device;

use crate::params::ParamStore;
pub use crate::run_dir::RunDir;

/// Files of a run folder written by stage 4.
pub const WEIGHTS: &str = "model.safetensors";
pub const CONFIG: &str = "config.toml";
pub const TOKENIZER: &str = "tokenizer.json";
pub const METRICS: &str = "metrics.json";
pub const OPTIMIZER: &str = "optimizer.safetensors";
/// The latest epoch's checkpoint (for `--resume`), beside the best one.
pub const LAST: &str = "last";
pub const STATE: &str = "state.json";

/// Saves every parameter and buffer as safetensors, atomically.
pub fn save_weights(params: &ParamStore, path: &Path) -> Result<()> {
    let mut tensors = std::collections::HashMap::new();
    for (name, t) in params.tensors() {
        tensors.insert(name, t.to_device(&Device::Cpu)?);
    }
    write_atomic(path, &safetensors_bytes(&tensors)?)
}

/// Serialises tensors to safetensors bytes in memory (so they can be written atomically).
pub fn safetensors_bytes(tensors: &std::collections::HashMap<String, candle_core::Tensor>) -> Result<Vec<u8>> {
    let mut sorted: Vec<(&String, &candle_core::Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    Ok(safetensors::serialize(sorted, None)?)
}
