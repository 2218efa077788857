//! A checkpoint's weights file: found by its layout, its tensors read (safetensors or a PyTorch
//! `state_dict`), and its header read alone to check it holds what a config describes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde_json::Value;

use super::Format;
use crate::hub::{Hub, ModelSource};

/// Refuses a model of `need` values (parameters and buffers) whose every tensor would come from
/// `weights`, when that file holds far fewer values (under half, less 2^20): `config` then
/// describes another model, and nothing is allocated from its sizes. A model that differs from
/// its file by a few tensors passes here, to be refused by name when the weights are loaded.
/// Reads the file's header only ([`weights_shapes`]).
pub fn check_weights_hold(need: u64, config: &str, weights: &Path) -> Result<()> {
    let held = weights_shapes(weights)?.iter().try_fold(0u64, |a, (name, shape)| {
        let n = crate::params::elem_count(shape).with_context(|| format!("{name} in {}", weights.display()))?;
        a.checked_add(n as u64)
            .with_context(|| format!("{} holds more values than can be counted", weights.display()))
    })?;
    if need > held.saturating_mul(2).saturating_add(1 << 20) {
        bail!(
            "{config} describes a model of {need} values ({} in f32), but its weights {} hold {held} ({}): the config and the weights are not of one model",
            crate::params::gb(need.saturating_mul(4)),
            weights.display(),
            crate::params::gb(held.saturating_mul(4))
        );
    }
    Ok(())
}

/// The largest safetensors header read (the `safetensors` crate's own limit).
const MAX_HEADER: u64 = 100_000_000;

/// The name and shape of every tensor a weights file holds, from its header alone (nothing is
/// allocated for the data): a safetensors file's JSON header, checked against the file's size, or
/// a PyTorch `state_dict` pickle's index.
pub fn weights_shapes(path: &Path) -> Result<Vec<(String, Vec<usize>)>> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ext == "safetensors" {
        return safetensors_shapes(path).with_context(|| format!("reading the header of {}", path.display()));
    }
    let infos = candle_core::pickle::read_pth_tensor_info(path, false, None)
        .with_context(|| format!("reading the tensor index of {} as a PyTorch state_dict", path.display()))?;
    Ok(infos
        .into_iter()
        .map(|i| (i.name, i.layout.shape().dims().to_vec()))
        .collect())
}

fn safetensors_shapes(path: &Path) -> Result<Vec<(String, Vec<usize>)>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .context("the file is too short for a safetensors header")?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER || n > len - 8 {
        bail!("its header length {n} is beyond the file ({len} bytes) or the format's limit");
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)?;
    let json: serde_json::Map<String, Value> = serde_json::from_slice(&header).context("its header is not JSON")?;
    let data = len - 8 - n;
    let mut out = vec![];
    for (name, v) in json {
        if name == "__metadata__" {
            continue;
        }
        let bad = |why: &str| anyhow::anyhow!("tensor {name}: {why}");
        let shape = v
            .get("shape")
            .map(|s| crate::hf_config::usizes(s, "shape"))
            .transpose()?
            .ok_or_else(|| bad("no shape"))?;
        let size: u64 = match v.get("dtype").and_then(Value::as_str).unwrap_or("") {
            "F64" | "I64" | "U64" => 8,
            "F32" | "I32" | "U32" => 4,
            "F16" | "BF16" | "I16" | "U16" => 2,
            "U8" | "I8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
            other => return Err(bad(&format!("dtype {other:?} is not one clipmine reads"))),
        };
        let offsets = v
            .get("data_offsets")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_u64).collect::<Option<Vec<u64>>>())
            .ok_or_else(|| bad("no data_offsets"))?;
        let [start, end] = offsets[..] else {
            return Err(bad("data_offsets is not [start, end]"));
        };
        let bytes = crate::params::elem_count(&shape)
            .ok()
            .and_then(|e| (e as u64).checked_mul(size))
            .ok_or_else(|| bad(&format!("shape {shape:?} overflows")))?;
        if start > end || end > data || end - start != bytes {
            return Err(bad(&format!(
                "shape {shape:?} needs {bytes} bytes but data_offsets [{start}, {end}] give {} of the file's {data}",
                end.saturating_sub(start)
            )));
        }
        out.push((name, shape));
    }
    Ok(out)
}

/// The weights file of a checkpoint, by its layout.
pub(super) fn weights_file(src: &ModelSource, format: Format, hub: &Hub) -> Result<PathBuf> {
    if let ModelSource::Local { weights: Some(w), .. } = src {
        return Ok(w.clone());
    }
    match format {
        Format::OpenClip => src.get_any(hub, &["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]),
        // Older Hub repos (and branches) hold only PyTorch's pickle.
        _ => src.get_any(hub, &["model.safetensors", "pytorch_model.bin"]),
    }
}

/// Every tensor of a safetensors file or a PyTorch `state_dict` pickle (`.bin`, `.pt`).
pub fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ext == "safetensors" {
        return candle_core::safetensors::load(path, &Device::Cpu)
            .with_context(|| format!("reading weights {}", path.display()));
    }
    let tensors = candle_core::pickle::read_all(path).with_context(|| {
        format!(
            "reading weights {} as a PyTorch state_dict (OpenAI's TorchScript .pt archives are not state_dicts: use the Hub's open_clip_model.safetensors)",
            path.display()
        )
    })?;
    Ok(tensors.into_iter().collect())
}
