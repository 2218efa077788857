//! Filling a model from a checkpoint's tensors: each name mapped to the model's (open_clip's by
//! [`crate::open_clip_names`], q/k/v split, projections transposed; Hugging Face's by prefix), then
//! every tensor copied, or a refusal naming every one missing, unexpected or of another shape.

use std::collections::HashMap;

use anyhow::{bail, Result};
use candle_core::Tensor;

use super::Format;
use crate::config::ImageArch;
use crate::model::ClipModel;
use crate::open_clip_names;
use crate::params::Misfit;

/// A file name mapped to the model's: the name, and the tensor as the model stores it.
type Mapped = Vec<(String, String, Tensor)>;

/// Splits open_clip's fused `in_proj_{weight,bias}` into q, k, v (rows in that order).
fn split_qkv(file: &str, prefix: &str, kind: &str, t: &Tensor, out: &mut Mapped) -> Result<()> {
    let n = t.dim(0)?;
    if n % 3 != 0 {
        bail!("{file}: {n} rows do not split into q, k, v");
    }
    for (i, q) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
        out.push((
            file.to_string(),
            format!("{prefix}self_attn.{q}.{kind}"),
            t.narrow(0, i * n / 3, n / 3)?.contiguous()?,
        ));
    }
    Ok(())
}

/// open_clip's residual block names (under `transformer.resblocks.N.`) to Hugging Face's
/// (under `encoder.layers.N.`).
fn open_clip_block(file: &str, rest: &str, to: &str, t: &Tensor, out: &mut Mapped) -> Result<bool> {
    let Some((n, inner)) = rest.split_once('.') else {
        return Ok(false);
    };
    let p = format!("{to}encoder.layers.{n}.");
    let renamed = match inner {
        "attn.in_proj_weight" => return split_qkv(file, &p, "weight", t, out).map(|_| true),
        "attn.in_proj_bias" => return split_qkv(file, &p, "bias", t, out).map(|_| true),
        _ => open_clip_names::from_open_clip(open_clip_names::BLOCK, inner),
    };
    match renamed {
        Some(r) => {
            out.push((file.into(), format!("{p}{r}"), t.clone()));
            Ok(true)
        }
        None => Ok(false),
    }
}

const IMG: &str = "image_encoder.model.";

const TXT: &str = "text_encoder.model.";

/// Whether a file tensor is bookkeeping the model does not keep.
fn ignored(name: &str) -> bool {
    name.ends_with("num_batches_tracked")
        || name.ends_with("position_ids")
        || name.starts_with("text_model.pooler.")
        || matches!(name, "input_resolution" | "context_length" | "vocab_size" | "attn_mask")
}

/// open_clip names → the model's. `None`: a name with no place in the model.
fn map_open_clip(name: &str, t: &Tensor, resnet: bool, out: &mut Mapped) -> Result<bool> {
    // CustomTextCLIP keeps the text tower under `text.`.
    let n = name.strip_prefix("text.").unwrap_or(name);
    let simple = |to: String, t: Tensor, out: &mut Mapped| {
        out.push((name.to_string(), to, t));
        Ok(true)
    };
    if let Some(v) = n.strip_prefix("visual.") {
        if resnet {
            return simple(format!("{IMG}{v}"), t.clone(), out);
        }
        if v == "proj" {
            return simple("image_projection.weight".into(), t.t()?.contiguous()?, out);
        }
        if let Some(rest) = v.strip_prefix("transformer.resblocks.") {
            return open_clip_block(name, rest, IMG, t, out);
        }
        return match open_clip_names::from_open_clip(open_clip_names::VISION, v) {
            Some(to) => simple(format!("{IMG}{to}"), t.clone(), out),
            None => Ok(false),
        };
    }
    match n {
        "text_projection" => simple("text_projection.weight".into(), t.t()?.contiguous()?, out),
        "logit_scale" => simple("logit_scale".into(), t.reshape(())?, out),
        _ => {
            if let Some(rest) = n.strip_prefix("transformer.resblocks.") {
                return open_clip_block(name, rest, TXT, t, out);
            }
            match open_clip_names::from_open_clip(open_clip_names::TEXT, n) {
                Some(to) => simple(format!("{TXT}{to}"), t.clone(), out),
                None => Ok(false),
            }
        }
    }
}

/// Hugging Face `CLIPModel` / `ChineseCLIPModel` names → the model's.
fn map_hf(name: &str, t: &Tensor, out: &mut Mapped) -> bool {
    let to = if let Some(r) = name.strip_prefix("vision_model.") {
        format!("{IMG}{r}")
    } else if let Some(r) = name.strip_prefix("text_model.") {
        format!("{TXT}{r}")
    } else if let Some(r) = name.strip_prefix("visual_projection.") {
        format!("image_projection.{r}")
    } else if name.starts_with("text_projection.") {
        name.to_string()
    } else if name == "logit_scale" {
        let t = t.reshape(()).unwrap_or_else(|_| t.clone());
        out.push((name.into(), name.into(), t));
        return true;
    } else {
        return false;
    };
    out.push((name.into(), to, t.clone()));
    true
}

/// Copies a checkpoint's `tensors` into every tensor of `model`, or refuses with every missing,
/// unexpected and mismatched name. Returns (loaded, ignored).
pub fn fill(model: &ClipModel, format: Format, tensors: &HashMap<String, Tensor>) -> Result<(usize, usize)> {
    let resnet = model.config.image.arch == ImageArch::ClipResnet;
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut mapped: Mapped = vec![];
    let (mut unexpected, mut skipped) = (vec![], 0);
    for name in names {
        let t = &tensors[name];
        if ignored(name) {
            skipped += 1;
            continue;
        }
        let placed = match format {
            Format::OpenClip => map_open_clip(name, t, resnet, &mut mapped)?,
            _ => map_hf(name, t, &mut mapped),
        };
        if !placed {
            unexpected.push(format!("{name} {:?}", t.dims()));
        }
    }
    let store = &model.params;
    let mut misfit = Misfit {
        unexpected,
        ..Misfit::default()
    };
    let mut plan = vec![];
    let mut reported = std::collections::HashSet::new();
    for (file_name, to, t) in &mapped {
        // Shapes as the file stores them (before a split or a transpose), once per file tensor.
        let stored = tensors[file_name].dims();
        match store.get(to) {
            None => misfit.unexpected.push(format!("{file_name} {stored:?}")),
            Some(e) if e.var.dims() != t.dims() => {
                if reported.insert(file_name.as_str()) {
                    misfit
                        .mismatched
                        .push(format!("{file_name}: file {stored:?}, model {:?} ({to})", e.var.dims()));
                }
            }
            Some(e) => plan.push((to.as_str(), e, t)),
        }
    }
    let filled: std::collections::HashSet<&str> = mapped.iter().map(|(_, to, _)| to.as_str()).collect();
    misfit.missing = store
        .entries()
        .into_iter()
        .filter(|(n, _)| !filled.contains(n.as_str()))
        .map(|(n, e)| format!("{n} {:?}", e.var.dims()))
        .collect();
    if !misfit.is_empty() {
        bail!(
            "the weights do not fit the {} architecture its config describes: {}",
            format.describe(),
            misfit.describe("model")
        );
    }
    store.set_loaded(&plan)?;
    Ok((plan.len(), skipped))
}
