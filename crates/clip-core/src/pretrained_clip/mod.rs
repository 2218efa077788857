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

mod fill;
mod hf;
mod open_clip;
mod tokenizer;
mod weights;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde_json::Value;

use crate::config::{ClipConfig, HeadKind, Interpolation, LossKind};
use crate::data::TextTokenizer;
use crate::hub::{snapshot_commit, Hub, ModelSource};
use crate::model::ClipModel;
pub use fill::fill;
use hf::{apply_hf, apply_preprocessor};
use open_clip::apply_open_clip;
pub use open_clip::quick_gelu_by_name;
pub use tokenizer::{tokenizer, TokenizerFile, BUILT_IN_BPE};
use weights::weights_file;
pub use weights::{check_weights_hold, read_tensors, weights_shapes};

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
