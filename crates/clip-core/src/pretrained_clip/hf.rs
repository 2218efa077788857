//! A Hugging Face checkpoint's architecture: `config.json` (`CLIPModel`, `ChineseCLIPModel`) and
//! `preprocessor_config.json`.

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::{float, num, Format};
use crate::config::{Activation, ClipConfig, ImageArch, ImagePool, Interpolation, Pooling, TextKind};

fn hf_activation(json: &Value) -> Result<Activation> {
    Ok(
        match json.get("hidden_act").and_then(Value::as_str).unwrap_or("quick_gelu") {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluNew,
            "relu" => Activation::Relu,
            other => bail!("hidden_act {other:?} is not one of quick_gelu, gelu, gelu_new, relu"),
        },
    )
}

/// A Hugging Face `vision_config` (CLIP's and Chinese-CLIP's are the same), with
/// `CLIPVisionConfig`'s defaults for keys a file leaves out.
fn hf_vision(cfg: &mut ClipConfig, v: &Value) -> Result<()> {
    let i = &mut cfg.image;
    i.arch = ImageArch::Vit;
    i.width = num(v, "hidden_size", 768)?;
    i.mlp_dim = num(v, "intermediate_size", 3072)?;
    i.layers = num(v, "num_hidden_layers", 12)?;
    i.heads = num(v, "num_attention_heads", 12)?;
    i.image_size = num(v, "image_size", 224)?;
    i.patch_size = num(v, "patch_size", 32)?;
    i.layer_norm_eps = float(v, "layer_norm_eps", 1e-5);
    i.activation = hf_activation(v).context("vision_config")?;
    i.pool = ImagePool::Tok;
    if num(v, "num_channels", 3)? != 3 {
        bail!("vision_config.num_channels must be 3 (RGB)");
    }
    Ok(())
}

/// A sub-config as transformers reads it: `NAME` updated by `NAME_dict`, whose keys win. Hub
/// configs saved by old transformers (openai/clip-vit-large-patch14's, for one) keep stale
/// defaults in `text_config` and the real sizes in `text_config_dict`.
fn sub_config(json: &Value, name: &str) -> Value {
    let mut merged = match json.get(name) {
        Some(Value::Object(o)) => o.clone(),
        _ => serde_json::Map::new(),
    };
    if let Some(Value::Object(o)) = json.get(format!("{name}_dict").as_str()) {
        for (k, v) in o {
            merged.insert(k.clone(), v.clone());
        }
    }
    Value::Object(merged)
}

pub(super) fn apply_hf(cfg: &mut ClipConfig, format: Format, json: &Value) -> Result<()> {
    let text = &sub_config(json, "text_config");
    let vision = &sub_config(json, "vision_config");
    cfg.projection_dim = num(json, "projection_dim", 512)?;
    hf_vision(cfg, vision)?;
    let t = &mut cfg.text;
    if format == Format::HfChineseClip {
        // Chinese-CLIP's text tower is a BERT read at [CLS], post-LN, with BERT's defaults.
        let mut bert = text.clone();
        if let Some(o) = bert.as_object_mut() {
            o.insert("model_type".into(), "bert".into());
            for (k, d) in [
                ("vocab_size", 21128),
                ("hidden_size", 768),
                ("num_hidden_layers", 12),
                ("num_attention_heads", 12),
                ("intermediate_size", 3072),
                ("max_position_embeddings", 512),
            ] {
                o.entry(k).or_insert(d.into());
            }
        }
        crate::hf_config::text_config_from_json(t, &bert).context("text_config")?;
        t.pooling = Pooling::Cls;
        // cn_clip's tokenize() default.
        cfg.data.max_length = 52.min(t.max_position_embeddings);
    } else {
        t.kind = TextKind::Clip;
        t.pooling = Pooling::Eot;
        t.vocab_size = num(text, "vocab_size", 49408)?;
        t.dim = num(text, "hidden_size", 512)?;
        t.hidden_dim = num(text, "intermediate_size", 2048)?;
        t.n_layers = num(text, "num_hidden_layers", 12)?;
        t.n_heads = num(text, "num_attention_heads", 8)?;
        t.max_position_embeddings = num(text, "max_position_embeddings", 77)?;
        t.layer_norm_eps = float(text, "layer_norm_eps", 1e-5);
        t.activation = hf_activation(text).context("text_config")?;
        t.dropout = 0.0;
        t.attention_dropout = 0.0;
        // OpenAI's hub configs still carry the legacy eos_token_id 2; their end-of-text token
        // is 49407, the largest id (transformers then pools at argmax, which is the same).
        let eos = num(text, "eos_token_id", 2)? as u32;
        t.eos_token_id = Some(if eos == 2 && t.vocab_size >= 49408 { 49407 } else { eos });
        cfg.data.max_length = t.max_position_embeddings;
    }
    Ok(())
}

/// Hugging Face's `preprocessor_config.json`: mean, std, and the crop size.
pub(super) fn apply_preprocessor(cfg: &mut ClipConfig, p: &Value) -> Result<()> {
    if let Some(m) = p.get("image_mean") {
        cfg.image.mean = crate::hf_config::floats3(m, "image_mean")?;
    }
    if let Some(s) = p.get("image_std") {
        cfg.image.std = crate::hf_config::floats3(s, "image_std")?;
    }
    // `size: {height, width}` (Chinese-CLIP's processor) resizes to the square itself, aspect
    // ratio not kept; `shortest_edge` (CLIP's) resizes the shorter side, then crops the centre.
    let mut shortest_edge = None;
    match p.get("size") {
        Some(Value::Object(size)) => {
            if size.contains_key("height") && !size.contains_key("shortest_edge") {
                cfg.data.center_crop = false;
            }
            shortest_edge = size.get("shortest_edge").and_then(Value::as_u64);
        }
        // Older processors: `size: 224`, the shortest edge.
        Some(v) => shortest_edge = v.as_u64(),
        None => {}
    }
    let crop = p.get("crop_size").and_then(|c| match c {
        Value::Object(o) => o.get("height").and_then(Value::as_u64),
        v => v.as_u64(),
    });
    if let Some(c) = crop {
        if c as usize != cfg.image.image_size {
            bail!(
                "crop_size {c} differs from the vision tower's image_size {}: the position table fits one size",
                cfg.image.image_size
            );
        }
    }
    // The shorter side resized to E, then the centre C×C cropped, in that order (cropping first
    // samples other positions: a tenth of the normalised range off on a detailed photo).
    if let (Some(e), true) = (shortest_edge, cfg.data.center_crop) {
        let c = cfg.image.image_size as u64;
        if e < c {
            bail!("size.shortest_edge {e} is smaller than the crop ({c}): the processor would pad the crop, which clipmine does not");
        }
        if e > crate::config::MAX_PREPARED_SIDE as u64 {
            bail!(
                "size.shortest_edge {e} is larger than any image clipmine resizes to (at most {})",
                crate::config::MAX_PREPARED_SIDE
            );
        }
        cfg.image.resize = Some(e as usize);
    }
    // PIL's filter codes, as transformers' processors record them.
    if let Some(r) = p.get("resample") {
        cfg.image.interpolation = match r.as_u64() {
            Some(0) => Interpolation::Nearest,
            Some(2) => Interpolation::Bilinear,
            Some(3) => Interpolation::Bicubic,
            _ => bail!(
                "resample {r}: clipmine resizes with nearest (0), bilinear (2) or bicubic (3), not PIL's filter {r} (1 Lanczos, 4 box, 5 Hamming)"
            ),
        };
    }
    Ok(())
}
