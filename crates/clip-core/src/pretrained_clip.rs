//! Whole pretrained CLIPs: OpenAI's and open_clip's checkpoints, Hugging Face `CLIPModel` and
//! `ChineseCLIPModel`, named by the config's top-level `pretrained` and loaded into the model's
//! own trainable towers.
//!
//! Three steps, as for single towers ([`crate::pretrained`]):
//! 1. [`apply_config`] reads the checkpoint's config (`config.json`, or open_clip's
//!    `open_clip_config.json`) and sets both towers, the heads, the preprocessing and the caption
//!    length from it: the user names a checkpoint and nothing else.
//! 2. [`load`] reads the weights (`model.safetensors`, `open_clip_model.safetensors` or
//!    `open_clip_pytorch_model.bin`), maps every name to the model's own (open_clip's fused
//!    `in_proj` split into q, k, v; its `x @ proj` matrices transposed to Hugging Face's
//!    `(out, in)`), and fills every tensor of the model — towers, heads and `logit_scale` — or
//!    refuses, naming the file and the tensors that are missing, unexpected or of another shape.
//! 3. [`tokenizer`] gives the checkpoint's own tokenizer: its `tokenizer.json`, a BERT
//!    `vocab.txt` (Chinese-CLIP), or OpenAI's BPE for open_clip checkpoints that bring none.
//!
//! The names the model uses are Hugging Face's, under the model's prefixes
//! (`image_encoder.model.`, `text_encoder.model.`, `image_projection.weight`, …), except the
//! ModifiedResNet's, which only open_clip's layout has.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde_json::Value;

use crate::config::{
    Activation, ClipConfig, HeadKind, ImageArch, ImagePool, Interpolation, LossKind, Pooling, TextKind,
};
use crate::data::TextTokenizer;
use crate::hub::{snapshot_commit, Hub, ModelSource};
use crate::model::ClipModel;
use crate::open_clip_names;
use crate::params::Misfit;

/// OpenAI's image normalisation, which every CLIP checkpoint named here was trained with.
pub const OPENAI_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const OPENAI_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// The file layouts clipmine reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// Hugging Face `CLIPModel` (`config.json` with `model_type: "clip"`).
    HfClip,
    /// Hugging Face `ChineseCLIPModel` (`model_type: "chinese_clip"`).
    HfChineseClip,
    /// open_clip (`open_clip_config.json` + `open_clip_model.safetensors` or
    /// `open_clip_pytorch_model.bin`).
    OpenClip,
}

impl Format {
    pub fn describe(self) -> &'static str {
        match self {
            Format::HfClip => "Hugging Face CLIPModel",
            Format::HfChineseClip => "Hugging Face ChineseCLIPModel (Chinese-CLIP)",
            Format::OpenClip => "open_clip",
        }
    }
}

/// The source the config's `pretrained` names, if any.
pub fn source(cfg: &ClipConfig) -> Result<Option<ModelSource>> {
    cfg.pretrained
        .as_deref()
        .map(|s| ModelSource::parse(s, cfg.revision.as_deref()))
        .transpose()
        .context("the pretrained CLIP (`pretrained`)")
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Which layout a checkpoint has, and its config file: open_clip's config first (open_clip
/// repos may carry a Hugging Face config.json too), then Hugging Face's.
pub fn detect(src: &ModelSource, hub: &Hub) -> Result<(Format, PathBuf, Value)> {
    if let Ok(p) = src.get(hub, "open_clip_config.json") {
        let json = read_json(&p)?;
        return Ok((Format::OpenClip, p, json));
    }
    // The second lookup's error says why (not in the cache and offline, no such file …).
    let path = src.get(hub, "config.json").map_err(|e| {
        anyhow::anyhow!(
            "{} is not a CLIP checkpoint clipmine knows: it has neither an open_clip_config.json nor a config.json ({e:#})",
            src.describe()
        )
    })?;
    let json = read_json(&path)?;
    let format = match json.get("model_type").and_then(Value::as_str) {
        Some("clip") => Format::HfClip,
        Some("chinese_clip") => Format::HfChineseClip,
        other => bail!(
            "{}: model_type {} is not an architecture clipmine loads as a whole CLIP: it reads Hugging Face `clip` (CLIPModel) and `chinese_clip` (ChineseCLIPModel), and open_clip folders (open_clip_config.json); a single image or text model goes in image.pretrained / text.pretrained",
            path.display(),
            other.map_or("(none)".to_string(), |s| format!("{s:?}"))
        ),
    };
    Ok((format, path, json))
}

fn num(json: &Value, key: &str, default: usize) -> Result<usize> {
    match json.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_u64()
            .map(|n| n as usize)
            .with_context(|| format!("`{key}` must be a whole number, got {v}")),
    }
}

fn float(json: &Value, key: &str, default: f64) -> f64 {
    json.get(key).and_then(Value::as_f64).unwrap_or(default)
}

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

/// Sets the towers, heads, preprocessing and caption length from the checkpoint's config.
pub fn apply_config(cfg: &mut ClipConfig, hub: &Hub) -> Result<Option<Format>> {
    let Some(src) = source(cfg)? else { return Ok(None) };
    if cfg.image.pretrained.is_some() || cfg.text.pretrained.is_some() {
        bail!("`pretrained` loads a whole CLIP: leave image.pretrained and text.pretrained unset");
    }
    let (format, path, json) = detect(&src, hub)?;
    let r = match format {
        Format::HfClip | Format::HfChineseClip => apply_hf(cfg, format, &json),
        Format::OpenClip => apply_open_clip(cfg, &json, &src.name()),
    };
    r.with_context(|| format!("reading the CLIP architecture from {}", path.display()))?;
    // Both heads are CLIP's projections and the loss is CLIP's, with the checkpoint's scale.
    cfg.head = HeadKind::Linear;
    cfg.loss = LossKind::Clip;
    cfg.image.crop_pct = 1.0;
    cfg.image.interpolation = Interpolation::Bicubic;
    cfg.data.center_crop = true;
    if format != Format::OpenClip {
        if let Ok(p) = src.get(hub, "preprocessor_config.json") {
            apply_preprocessor(cfg, &read_json(&p)?).with_context(|| format!("in {}", p.display()))?;
        }
    }
    cfg.validate()?;
    // Before any model is built from these sizes: a config that describes more values than its
    // weights hold is not of those weights (a file in the cache or the folder; nothing is
    // downloaded for this).
    if let Some(weights) = present_weights(&src, format, hub) {
        let mut plain = cfg.clone();
        plain.distill.teacher = None;
        let need = ClipModel::size(&plain)?.total();
        check_weights_hold(need, &path.display().to_string(), &weights)?;
    }
    Ok(Some(format))
}

/// The checkpoint's weights file when it is already here (a local file, or in the Hub cache).
fn present_weights(src: &ModelSource, format: Format, hub: &Hub) -> Option<PathBuf> {
    let names: &[&str] = match format {
        Format::OpenClip => &["open_clip_model.safetensors", "open_clip_pytorch_model.bin"],
        _ => &["model.safetensors", "pytorch_model.bin"],
    };
    match src {
        ModelSource::Local { weights: Some(w), .. } => Some(w.clone()),
        ModelSource::Local { dir, .. } => names.iter().map(|n| dir.join(n)).find(|p| p.is_file()),
        ModelSource::Hub { repo, revision } => names.iter().find_map(|n| hub.cached(repo, revision, n)),
    }
}

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

fn apply_hf(cfg: &mut ClipConfig, format: Format, json: &Value) -> Result<()> {
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

fn apply_open_clip(cfg: &mut ClipConfig, json: &Value, name: &str) -> Result<()> {
    let m = json
        .get("model_cfg")
        .context("no `model_cfg`: open_clip_config.json should hold {\"model_cfg\": …, \"preprocess_cfg\": …}")?;
    let null = Value::Null;
    let v = m.get("vision_cfg").unwrap_or(&null);
    let t = m.get("text_cfg").unwrap_or(&null);
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
    let embed = num(m, "embed_dim", 512)?;
    let quick = match m.get("quick_gelu").and_then(Value::as_bool) {
        Some(q) => q,
        None => quick_gelu_by_name(name),
    };
    let act = if quick { Activation::QuickGelu } else { Activation::Gelu };
    cfg.projection_dim = embed;
    let i = &mut cfg.image;
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

/// Hugging Face's `preprocessor_config.json`: mean, std, and the crop size.
fn apply_preprocessor(cfg: &mut ClipConfig, p: &Value) -> Result<()> {
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

/// What [`load`] read.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClipLoad {
    pub format: Format,
    /// `org/name@revision` or the local path.
    pub source: String,
    /// The Hub commit the files came from, when they are in a Hub cache.
    pub commit: Option<String>,
    pub config_file: PathBuf,
    pub weights_file: PathBuf,
    /// Tensors copied into the model.
    pub loaded: usize,
    /// Tensors of the file the model has no use for (BatchNorm's counters, position-id buffers).
    pub ignored: usize,
}

/// The weights file of a checkpoint, by its layout.
fn weights_file(src: &ModelSource, format: Format, hub: &Hub) -> Result<PathBuf> {
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

/// Loads the checkpoint the config's `pretrained` names into every tensor of `model`. The
/// config must have been set from the same checkpoint ([`apply_config`]).
pub fn load(model: &ClipModel, hub: &Hub) -> Result<Option<ClipLoad>> {
    let Some(src) = source(&model.config)? else {
        return Ok(None);
    };
    let (format, config_file, _) = detect(&src, hub)?;
    let file = weights_file(&src, format, hub)?;
    let tensors = read_tensors(&file)?;
    let (loaded, ignored) =
        fill(model, format, &tensors).with_context(|| format!("loading the CLIP checkpoint {}", file.display()))?;
    Ok(Some(ClipLoad {
        format,
        source: src.describe(),
        commit: snapshot_commit(&file),
        config_file,
        weights_file: file,
        loaded,
        ignored,
    }))
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

/// How reports name the built-in vocabulary.
pub const BUILT_IN_BPE: &str = "OpenAI's BPE vocabulary (built in: assets/tokenizers/bpe_simple_vocab_16e6.txt.gz)";

/// Where a checkpoint's tokenizer came from.
#[derive(Debug, Clone, serde::Serialize)]
pub enum TokenizerFile {
    /// Its own `tokenizer.json` or `vocab.txt`.
    File(PathBuf),
    /// OpenAI's BPE vocabulary, built in (open_clip checkpoints without tokenizer files).
    OpenAiBpe,
}

impl std::fmt::Display for TokenizerFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenizerFile::File(p) => write!(f, "{}", p.display()),
            TokenizerFile::OpenAiBpe => write!(f, "{BUILT_IN_BPE}"),
        }
    }
}

/// The checkpoint's tokenizer; `None` when the config names no pretrained CLIP. Its ids must fit
/// the text tower's embedding table, or this refuses.
pub fn tokenizer(cfg: &ClipConfig, hub: &Hub) -> Result<Option<(TextTokenizer, TokenizerFile)>> {
    let Some(src) = source(cfg)? else { return Ok(None) };
    let max_len = cfg.max_tokens();
    let (tok, origin) = if let Ok(p) = src.get(hub, "tokenizer.json") {
        (TextTokenizer::from_file(&p, max_len)?, TokenizerFile::File(p))
    } else if let Ok(p) = src.get(hub, "vocab.txt") {
        (TextTokenizer::from_vocab(&p, true, max_len)?, TokenizerFile::File(p))
    } else if cfg.text.kind == TextKind::Clip {
        (TextTokenizer::openai_bpe(max_len)?, TokenizerFile::OpenAiBpe)
    } else {
        bail!("{} has neither a tokenizer.json nor a vocab.txt", src.describe());
    };
    if tok.vocab_size() > cfg.text.vocab_size {
        bail!(
            "the tokenizer ({origin}) gives ids up to {} but the text tower's embedding table has {} rows: the tokenizer is not this checkpoint's",
            tok.vocab_size() - 1,
            cfg.text.vocab_size
        );
    }
    Ok(Some((tok, origin)))
}

/// A pretrained CLIP ready to use as it is: the model with every tensor loaded, its tokenizer,
/// and what was read.
pub struct Opened {
    pub model: ClipModel,
    pub tokenizer: TextTokenizer,
    pub load: ClipLoad,
}

/// Opens the checkpoint `spec` names: a preset that names one (`clip-vit-b-32`, `clip-rn50`,
/// `chinese-clip-vit-b-16`), a Hugging Face repo (`org/name[@revision]`) or a local folder.
pub fn open(spec: &str, hub: &Hub, device: &Device) -> Result<Opened> {
    let clip_presets = || {
        crate::config::PRESETS
            .iter()
            .filter(|p| ClipConfig::preset(p).is_ok_and(|c| c.pretrained.is_some()))
            .copied()
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut cfg = match ClipConfig::preset(spec) {
        Ok(c) if c.pretrained.is_some() => c,
        Ok(_) => bail!(
            "preset {spec} names no pretrained CLIP (it is a recipe to train from): the presets that do are {}; a model you trained is --run DIR",
            clip_presets()
        ),
        // A bare name that is neither a folder nor org/name: most likely a mistyped preset.
        Err(_) if !spec.contains('/') && !Path::new(spec).exists() => bail!(
            "{spec:?} is not a pretrained-CLIP preset ({}), a Hugging Face repo (org/name) or a folder",
            clip_presets()
        ),
        Err(_) => ClipConfig {
            pretrained: Some(spec.to_string()),
            name: spec.to_string(),
            ..ClipConfig::tiny()
        },
    };
    let format = apply_config(&mut cfg, hub)?.context("the config names no pretrained CLIP")?;
    // The weights must be there before the model is allocated, and hold what the config
    // describes (checked here too: a Hub repo not yet cached was downloaded just now, after
    // `apply_config` could look at its header).
    let src = source(&cfg)?.context("the config names no pretrained CLIP")?;
    let weights = weights_file(&src, format, hub)?;
    let mut plain = cfg.clone();
    plain.distill.teacher = None;
    check_weights_hold(ClipModel::size(&plain)?.total(), &src.describe(), &weights)?;
    let model = ClipModel::new(&cfg, device)?;
    let load = load(&model, hub)?.context("the config names no pretrained CLIP")?;
    let (tokenizer, _) = tokenizer(&cfg, hub)?.context("the checkpoint has no tokenizer")?;
    Ok(Opened { model, tokenizer, load })
}
