//! Weights and optimiser state on disk: every parameter, buffer and moment a run writes or reads
//! goes through here, as safetensors bytes written atomically and checksummed ([`crate::files`]).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};

use crate::files::{file_name, parent, read_checked, write_checked};
use crate::optim::{AdamW, OptimMeta};
use crate::params::ParamStore;

/// Serialises tensors to safetensors bytes in memory (so they can be written atomically).
pub fn safetensors_bytes(tensors: &HashMap<String, Tensor>) -> Result<Vec<u8>> {
    let mut sorted: Vec<(&String, &Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    Ok(safetensors::serialize(sorted, None)?)
}

/// The tensors of a safetensors file, on the CPU, after verifying its checksum.
pub fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let bytes = read_checked(path)?;
    candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .with_context(|| format!("{} is not a valid safetensors file", path.display()))
}

/// Every parameter and buffer of a model as safetensors bytes.
pub fn weights_bytes(params: &ParamStore) -> Result<Vec<u8>> {
    let mut tensors = HashMap::new();
    for (name, t) in params.tensors() {
        tensors.insert(name, t.to_device(&Device::Cpu)?);
    }
    safetensors_bytes(&tensors)
}

/// Saves every parameter and buffer to `path`, checksummed in its folder's manifest.
pub fn save_weights(params: &ParamStore, path: &Path) -> Result<()> {
    write_checked(parent(path), &[(file_name(path), weights_bytes(params)?)])
}

/// Loads every parameter and buffer from a (verified) safetensors file.
pub fn load_weights(params: &ParamStore, path: &Path) -> Result<()> {
    let loaded = read_tensors(path).with_context(|| format!("reading weights from {}", path.display()))?;
    params
        .load_map(&loaded)
        .with_context(|| format!("loading weights from {}", path.display()))
}

/// The optimiser's two files: the moments as safetensors at `path`, the rest as JSON beside it.
pub fn optimizer_files(opt: &AdamW, path: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let meta_path = path.with_extension("json");
    Ok(vec![
        (file_name(path), safetensors_bytes(&opt.state_tensors()?)?),
        (file_name(&meta_path), serde_json::to_vec_pretty(&opt.meta())?),
    ])
}

/// Saves the optimiser's state to `path` (and `path` with `.json`), checksummed.
pub fn save_optimizer(opt: &AdamW, path: &Path) -> Result<()> {
    write_checked(parent(path), &optimizer_files(opt, path)?)
}

/// Loads an optimiser state written by [`save_optimizer`], verifying both files.
pub fn load_optimizer(opt: &mut AdamW, path: &Path) -> Result<()> {
    let tensors = read_tensors(path).with_context(|| format!("reading optimiser state {}", path.display()))?;
    let meta_path = path.with_extension("json");
    let meta: OptimMeta = serde_json::from_slice(&read_checked(&meta_path)?)
        .with_context(|| format!("parsing {}", meta_path.display()))?;
    opt.restore(&tensors, meta)
        .with_context(|| format!("optimiser state {}", path.display()))
}
