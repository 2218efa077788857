//! The model's tensors under the names of the layout written: Hugging Face's (the model's own,
//! under other prefixes) or open_clip's (renamed by [`crate::open_clip_names`], q/k/v fused,
//! projections transposed).

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

use super::{IMG, TXT};
use crate::config::{ClipConfig, ImageArch};
use crate::open_clip_names;

/// safetensors bytes with PyTorch's `{"format": "pt"}` metadata, names sorted.
pub(super) fn safetensors_pt(tensors: &HashMap<String, Tensor>) -> Result<Vec<u8>> {
    let mut sorted: Vec<(&String, &Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    Ok(safetensors::serialize(sorted, Some(meta))?)
}

/// The model's names → Hugging Face `CLIPModel` / `ChineseCLIPModel`'s.
pub(super) fn hf_tensors(params: &HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for (name, t) in params {
        let to = if let Some(r) = name.strip_prefix(IMG) {
            format!("vision_model.{r}")
        } else if let Some(r) = name.strip_prefix(TXT) {
            format!("text_model.{r}")
        } else if let Some(r) = name.strip_prefix("image_projection.") {
            format!("visual_projection.{r}")
        } else if name.starts_with("text_projection.") || name == "logit_scale" {
            name.clone()
        } else {
            bail!("internal error: no Hugging Face name for {name}");
        };
        out.insert(to, t.clone());
    }
    Ok(out)
}

/// open_clip's block names (under `…transformer.resblocks.N.`), q/k/v fused into `in_proj`.
fn open_clip_block(
    inner: &str,
    to: &str,
    t: &Tensor,
    params: &HashMap<String, Tensor>,
    from: &str,
    out: &mut HashMap<String, Tensor>,
) -> Result<()> {
    for kind in ["weight", "bias"] {
        if inner == format!("self_attn.q_proj.{kind}") {
            let part = |q: &str| -> Result<Tensor> {
                params
                    .get(&format!("{from}self_attn.{q}.{kind}"))
                    .cloned()
                    .with_context(|| format!("internal error: {from}self_attn.{q}.{kind} missing"))
            };
            let fused = Tensor::cat(&[t.clone(), part("k_proj")?, part("v_proj")?], 0)?;
            out.insert(format!("{to}attn.in_proj_{kind}"), fused);
            return Ok(());
        }
        if inner == format!("self_attn.k_proj.{kind}") || inner == format!("self_attn.v_proj.{kind}") {
            return Ok(());
        }
    }
    let renamed = open_clip_names::to_open_clip(open_clip_names::BLOCK, inner)
        .with_context(|| format!("internal error: no open_clip name for {from}{inner}"))?;
    out.insert(format!("{to}{renamed}"), t.clone());
    Ok(())
}

/// The model's names → open_clip's (`CLIP` with a ViT or ModifiedResNet `visual`).
pub(super) fn open_clip_tensors(cfg: &ClipConfig, params: &HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    let resnet = cfg.image.arch == ImageArch::ClipResnet;
    let mut out = HashMap::new();
    for (name, t) in params {
        if let Some(v) = name.strip_prefix(IMG) {
            if resnet {
                out.insert(format!("visual.{v}"), t.clone());
                // PyTorch's BatchNorm keeps a step counter in its state_dict; strict loading wants it.
                if let Some(bn) = v.strip_suffix(".running_mean") {
                    out.insert(
                        format!("visual.{bn}.num_batches_tracked"),
                        Tensor::new(0i64, &Device::Cpu)?,
                    );
                }
                continue;
            }
            if let Some(rest) = v.strip_prefix("encoder.layers.") {
                let (n, inner) = rest.split_once('.').context("internal error: block name")?;
                let from = format!("{IMG}encoder.layers.{n}.");
                open_clip_block(
                    inner,
                    &format!("visual.transformer.resblocks.{n}."),
                    t,
                    params,
                    &from,
                    &mut out,
                )?;
                continue;
            }
            let to = open_clip_names::to_open_clip(open_clip_names::VISION, v)
                .with_context(|| format!("internal error: no open_clip name for {name}"))?;
            out.insert(format!("visual.{to}"), t.clone());
        } else if let Some(v) = name.strip_prefix(TXT) {
            if let Some(rest) = v.strip_prefix("encoder.layers.") {
                let (n, inner) = rest.split_once('.').context("internal error: block name")?;
                let from = format!("{TXT}encoder.layers.{n}.");
                open_clip_block(
                    inner,
                    &format!("transformer.resblocks.{n}."),
                    t,
                    params,
                    &from,
                    &mut out,
                )?;
                continue;
            }
            let to = open_clip_names::to_open_clip(open_clip_names::TEXT, v)
                .with_context(|| format!("internal error: no open_clip name for {name}"))?;
            out.insert(to, t.clone());
        } else if name == "image_projection.weight" {
            out.insert("visual.proj".into(), t.t()?.contiguous()?);
        } else if name == "text_projection.weight" {
            out.insert("text_projection".into(), t.t()?.contiguous()?);
        } else if name == "logit_scale" {
            out.insert(name.clone(), t.clone());
        } else {
            bail!("internal error: no open_clip name for {name}");
        }
    }
    Ok(out)
}
