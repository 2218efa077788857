//! An open_clip checkpoint's architecture: `open_clip_config.json` (`model_cfg`,
//! `preprocess_cfg`), for the OpenAI-style ViT and ModifiedResNet with the CLIP text transformer.

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::{float, num, OPENAI_MEAN, OPENAI_STD};
use crate::config::{Activation, ClipConfig, ImageArch, ImageConfig, ImagePool, Pooling, TextKind};

/// Whether an open_clip checkpoint without a `quick_gelu` flag was trained with QuickGELU. open_clip
/// keeps that flag with the pretrained tag, not always in the file: OpenAI's weights and those
/// trained in their image (LAION-400M, MetaCLIP, YFCC-15M, CC12M) use QuickGELU; LAION-2B and
/// DataComp use erf GELU ([OC] `pretrained.py`). The repo or folder name tells which.
pub fn quick_gelu_by_name(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    ["openai", "quickgelu", "laion400m", "metaclip", "yfcc15m", "cc12m"]
        .iter()
        .any(|k| n.contains(k))
}

/// Sets the towers, the projection width and the preprocessing from open_clip's config.
pub(super) fn apply_open_clip(cfg: &mut ClipConfig, json: &Value, name: &str) -> Result<()> {
    let m = json
        .get("model_cfg")
        .context("no `model_cfg`: open_clip_config.json should hold {\"model_cfg\": …, \"preprocess_cfg\": …}")?;
    let null = Value::Null;
    let v = m.get("vision_cfg").unwrap_or(&null);
    let t = m.get("text_cfg").unwrap_or(&null);
    refuse_options(v, t)?;
    let embed = num(m, "embed_dim", 512)?;
    let quick = match m.get("quick_gelu").and_then(Value::as_bool) {
        Some(q) => q,
        None => quick_gelu_by_name(name),
    };
    let act = if quick { Activation::QuickGelu } else { Activation::Gelu };
    cfg.projection_dim = embed;
    apply_vision(&mut cfg.image, v, embed, act)?;
    apply_text(cfg, t, act)?;
    if let Some(p) = json.get("preprocess_cfg") {
        if let Some(mean) = p.get("mean") {
            cfg.image.mean = crate::hf_config::floats3(mean, "preprocess_cfg.mean")?;
        }
        if let Some(std) = p.get("std") {
            cfg.image.std = crate::hf_config::floats3(std, "preprocess_cfg.std")?;
        }
    } else {
        (cfg.image.mean, cfg.image.std) = (OPENAI_MEAN, OPENAI_STD);
    }
    Ok(())
}

/// Refuses the options of architectures clipmine does not reproduce (a timm tower, attentional
/// pooling, layer scale …), naming the option.
fn refuse_options(v: &Value, t: &Value) -> Result<()> {
    let truthy = |j: &Value, k: &str| j.get(k).is_some_and(|x| !x.is_null() && x.as_bool() != Some(false));
    for (part, key) in [
        (v, "timm_model_name"),
        (v, "attentional_pool"),
        (v, "final_ln_after_pool"),
        (v, "no_ln_pre"),
        (v, "ls_init_value"),
        (t, "hf_model_name"),
        (t, "no_causal_mask"),
        (t, "proj_bias"),
        (t, "embed_cls"),
        (t, "ls_init_value"),
    ] {
        if truthy(part, key) {
            bail!(
                "open_clip option {key} = {} is an architecture clipmine does not reproduce (it loads OpenAI-style ViT and ModifiedResNet image towers with the CLIP text transformer)",
                part[key]
            );
        }
    }
    Ok(())
}

/// The image tower from `vision_cfg`: a ModifiedResNet when `layers` is a list of stage depths
/// (its attention pool ends in the `embed`-wide projection), else a ViT.
fn apply_vision(i: &mut ImageConfig, v: &Value, embed: usize, act: Activation) -> Result<()> {
    i.image_size = num(v, "image_size", 224)?;
    i.width = num(v, "width", 768)?;
    let head_width = num(v, "head_width", 64)?;
    match v.get("layers") {
        Some(Value::Array(_)) => {
            i.arch = ImageArch::ClipResnet;
            i.depths = crate::hf_config::usizes(&v["layers"], "vision_cfg.layers")?;
            i.heads = i.width.saturating_mul(32) / head_width.max(1);
            i.output_dim = embed;
        }
        other => {
            i.arch = ImageArch::Vit;
            i.layers = other.and_then(Value::as_u64).unwrap_or(12) as usize;
            i.patch_size = num(v, "patch_size", 16)?;
            i.heads = i.width / head_width.max(1);
            i.mlp_dim = (i.width as f64 * float(v, "mlp_ratio", 4.0)) as usize;
            i.activation = tower_act(v, act);
            i.layer_norm_eps = norm_eps(v);
            let pool = v.get("pool_type").and_then(Value::as_str);
            i.pool = match (pool, v.get("global_average_pool").and_then(Value::as_bool)) {
                (Some("avg"), _) | (None, Some(true)) => ImagePool::Avg,
                (Some("tok") | None, _) => ImagePool::Tok,
                (Some(other), _) => bail!("vision_cfg.pool_type {other:?} is not tok or avg"),
            };
        }
    }
    Ok(())
}

/// The CLIP text transformer from `text_cfg`, and the caption length its positions allow.
fn apply_text(cfg: &mut ClipConfig, t: &Value, act: Activation) -> Result<()> {
    let tx = &mut cfg.text;
    tx.kind = TextKind::Clip;
    tx.pooling = Pooling::Eot;
    match t.get("pool_type").and_then(Value::as_str) {
        None | Some("argmax") | Some("eos") => {}
        Some(other) => bail!("text_cfg.pool_type {other:?} is not one clipmine reproduces (argmax / eos)"),
    }
    tx.vocab_size = num(t, "vocab_size", 49408)?;
    tx.dim = num(t, "width", 512)?;
    tx.n_heads = num(t, "heads", 8)?;
    tx.n_layers = num(t, "layers", 12)?;
    tx.hidden_dim = (tx.dim as f64 * float(t, "mlp_ratio", 4.0)) as usize;
    tx.max_position_embeddings = num(t, "context_length", 77)?;
    tx.layer_norm_eps = norm_eps(t);
    tx.activation = tower_act(t, act);
    tx.dropout = 0.0;
    tx.attention_dropout = 0.0;
    tx.eos_token_id = Some(num(t, "eos_id", 49407)? as u32);
    cfg.data.max_length = tx.max_position_embeddings;
    Ok(())
}

/// A tower's LayerNorm epsilon: `norm_kwargs.eps` (clipmine writes it for students trained from
/// scratch, with BERT's 1e-12), else `nn.LayerNorm`'s 1e-5.
fn norm_eps(tower: &Value) -> f64 {
    tower
        .get("norm_kwargs")
        .and_then(|k| k.get("eps"))
        .and_then(Value::as_f64)
        .filter(|e| e.is_finite() && *e > 0.0)
        .unwrap_or(1e-5)
}

/// A tower's activation: `act_kwargs.approximate = "tanh"` makes open_clip's GELU the tanh form.
fn tower_act(tower: &Value, act: Activation) -> Activation {
    let tanh = tower
        .get("act_kwargs")
        .and_then(|k| k.get("approximate"))
        .and_then(Value::as_str)
        == Some("tanh");
    if tanh && act == Activation::Gelu {
        Activation::GeluNew
    } else {
        act
    }
}
