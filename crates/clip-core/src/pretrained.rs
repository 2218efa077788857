//! Pretrained towers: a timm ResNet and a Hugging Face DistilBERT / BERT, named in the config
//! (`image.pretrained`, `text.pretrained`) and loaded into the model's own trainable layers.
//!
//! Three steps, each usable alone:
//! 1. [`apply_configs`] reads each named model's `config.json` and sets the tower's architecture
//!    from it (and, for timm, the image preprocessing of its `pretrained_cfg`), so a user names a
//!    model and nothing else.
//! 2. [`load_pretrained`] copies the weights into the [`ParamStore`](crate::params::ParamStore)
//!    under the tower's own names, after mapping the file's names (`distilbert.` / `bert.`
//!    prefixes, timm's bare names, old `gamma`/`beta`) and skipping what the tower does not use
//!    (classifier `fc`, pooler, masked-LM `vocab_*` / `cls.*`, `num_batches_tracked`,
//!    `position_ids`). Every tower tensor must come from the file with the same shape; the heads
//!    and `logit_scale` start fresh.
//! 3. [`tokenizer`] gives the text model's own tokenizer (`tokenizer.json`, or BERT's WordPiece
//!    pipeline built from `vocab.txt`).
//!
//! Candle-transformers' BERT and ResNet are inference-only, so they are not used: the weights go
//! into clipmine's layers, which train.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde_json::Value;

use crate::config::ClipConfig;
use crate::data::TextTokenizer;
pub use crate::hf_config::{image_config_from_json, text_config_from_json};
use crate::hub::{snapshot_commit, Hub, ModelSource};
use crate::model::ClipModel;
use crate::params::{Group, Misfit};

/// Parameter-name prefixes of the two towers in the [`ClipModel`].
pub const IMAGE_PREFIX: &str = "image_encoder.model.";
pub const TEXT_PREFIX: &str = "text_encoder.model.";

/// Which tower a pretrained model is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TowerKind {
    Image,
    Text,
}

impl TowerKind {
    fn prefix(self) -> &'static str {
        match self {
            TowerKind::Image => IMAGE_PREFIX,
            TowerKind::Text => TEXT_PREFIX,
        }
    }
    fn group(self) -> Group {
        match self {
            TowerKind::Image => Group::ImageTower,
            TowerKind::Text => Group::TextTower,
        }
    }
}

/// The source a tower's config names, if any.
pub fn source(cfg: &ClipConfig, tower: TowerKind) -> Result<Option<ModelSource>> {
    let (spec, rev) = match tower {
        TowerKind::Image => (&cfg.image.pretrained, &cfg.image.revision),
        TowerKind::Text => (&cfg.text.pretrained, &cfg.text.revision),
    };
    spec.as_deref()
        .map(|s| ModelSource::parse(s, rev.as_deref()))
        .transpose()
        .with_context(|| format!("{} tower", tower_name(tower)))
}

fn tower_name(t: TowerKind) -> &'static str {
    match t {
        TowerKind::Image => "image",
        TowerKind::Text => "text",
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Sets the architecture of every tower that names pretrained weights from the model's
/// config.json, then validates the config. A `.safetensors` file without a config.json beside it
/// keeps the architecture the config file gives.
pub fn apply_configs(cfg: &mut ClipConfig, hub: &Hub) -> Result<()> {
    // A whole pretrained CLIP sets everything itself (and refuses tower-level `pretrained`).
    if crate::pretrained_clip::apply_config(cfg, hub)?.is_some() {
        return Ok(());
    }
    for tower in [TowerKind::Image, TowerKind::Text] {
        let Some(src) = source(cfg, tower)? else { continue };
        let file = match &src {
            ModelSource::Local { dir, weights: Some(_) } if !dir.join("config.json").is_file() => continue,
            _ => src.get(hub, "config.json")?,
        };
        let json = read_json(&file)?;
        let r = match tower {
            TowerKind::Image => image_config_from_json(&mut cfg.image, &json),
            TowerKind::Text => text_config_from_json(&mut cfg.text, &json),
        };
        r.with_context(|| {
            format!(
                "reading the {} tower's architecture from {}",
                tower_name(tower),
                file.display()
            )
        })?;
    }
    cfg.validate()?;
    // Every tensor of a pretrained tower comes from its weights: a tower the config makes larger
    // than the file is refused before it is allocated (a file already here; nothing is downloaded
    // for this).
    for tower in [TowerKind::Image, TowerKind::Text] {
        let Some(src) = source(cfg, tower)? else { continue };
        let weights = match &src {
            ModelSource::Local { weights: Some(w), .. } => Some(w.clone()),
            ModelSource::Local { dir, .. } => Some(dir.join("model.safetensors")).filter(|p| p.is_file()),
            ModelSource::Hub { repo, revision } => hub.cached(repo, revision, "model.safetensors"),
        };
        if let Some(w) = weights {
            let size = ClipModel::size(cfg)?;
            let need = if tower == TowerKind::Image {
                size.image
            } else {
                size.text
            };
            let what = format!("the {} tower's config ({})", tower_name(tower), src.describe());
            crate::pretrained_clip::check_weights_hold(need, &what, &w)?;
        }
    }
    Ok(())
}

/// What was loaded into one tower.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TowerLoad {
    pub tower: TowerKind,
    /// `org/name@revision` or the local path.
    pub source: String,
    /// The Hub commit the files came from, when they are in a Hub cache.
    pub commit: Option<String>,
    pub file: PathBuf,
    pub loaded: usize,
    pub ignored: usize,
}

/// What [`load_pretrained`] did: per tower, and the tensors that start from fresh values.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LoadReport {
    pub towers: Vec<TowerLoad>,
    /// Model tensors not loaded from any file (heads, `logit_scale`, towers without `pretrained`).
    pub fresh: usize,
    /// The whole CLIP checkpoint loaded, when the config names one (`pretrained`).
    pub clip: Option<crate::pretrained_clip::ClipLoad>,
}

/// Whether a file's tensor is one the tower does not use (and is skipped): classifiers, poolers,
/// masked-LM heads and bookkeeping buffers.
fn ignored(tower: TowerKind, name: &str) -> bool {
    if name.ends_with("num_batches_tracked") || name.ends_with("position_ids") {
        return true;
    }
    match tower {
        TowerKind::Image => name.starts_with("fc.") || name.starts_with("head."),
        TowerKind::Text => [
            "vocab_",
            "cls.",
            "pooler.",
            "classifier.",
            "pre_classifier.",
            "qa_outputs.",
        ]
        .iter()
        .any(|p| name.starts_with(p)),
    }
}

/// A file's tensor name as the tower calls it (without the model prefix).
fn tower_name_of(tower: TowerKind, name: &str) -> String {
    let mut n = name;
    if tower == TowerKind::Text {
        for p in ["distilbert.", "bert."] {
            if let Some(rest) = n.strip_prefix(p) {
                n = rest;
                break;
            }
        }
    }
    // Checkpoints from TensorFlow days call LayerNorm's parameters gamma and beta.
    let mut out = n.to_string();
    for (old, new) in [(".gamma", ".weight"), (".beta", ".bias")] {
        if out.ends_with(old) && out.contains("LayerNorm") {
            out.truncate(out.len() - old.len());
            out.push_str(new);
        }
    }
    out
}

/// Copies `tensors` (a file's, by its names) into the model's `tower`. Returns (loaded, ignored).
pub fn load_tower(model: &ClipModel, tower: TowerKind, tensors: &HashMap<String, Tensor>) -> Result<(usize, usize)> {
    let prefix = tower.prefix();
    let store = &model.params;
    let mut plan = vec![];
    let mut misfit = Misfit::default();
    let mut mismatched_names = std::collections::HashSet::new();
    let mut skipped = 0;
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        let t = &tensors[name];
        let mapped = tower_name_of(tower, name);
        if ignored(tower, &mapped) {
            skipped += 1;
            continue;
        }
        let full = format!("{prefix}{mapped}");
        match store.get(&full) {
            None => misfit.unexpected.push(name.clone()),
            Some(e) if e.var.dims() != t.dims() => {
                misfit.mismatched.push(format!(
                    "{name}: file {:?}, tower {:?} ({full})",
                    t.dims(),
                    e.var.dims()
                ));
                mismatched_names.insert(full);
            }
            Some(e) => plan.push((full, e, t)),
        }
    }
    let loaded: std::collections::HashSet<&str> = plan.iter().map(|(n, _, _)| n.as_str()).collect();
    misfit.missing = store
        .entries()
        .into_iter()
        .filter(|(n, e)| {
            e.group == tower.group()
                && n.starts_with(prefix)
                && !loaded.contains(n.as_str())
                && !mismatched_names.contains(n)
        })
        .map(|(n, e)| format!("{} {:?}", &n[prefix.len()..], e.var.dims()))
        .collect();
    if !misfit.is_empty() {
        bail!(
            "the weights do not fit the {} tower: {} — is it the architecture its config.json describes?",
            tower_name(tower),
            misfit.describe("tower")
        );
    }
    store.set_loaded(&plan)?;
    Ok((plan.len(), skipped))
}

/// Loads every tower whose config names `pretrained` weights into `model`.
pub fn load_pretrained(model: &ClipModel, hub: &Hub) -> Result<LoadReport> {
    let mut report = LoadReport::default();
    if let Some(clip) = crate::pretrained_clip::load(model, hub)? {
        report.clip = Some(clip);
        return Ok(report);
    }
    let mut loaded = 0;
    for tower in [TowerKind::Image, TowerKind::Text] {
        let Some(src) = source(&model.config, tower)? else {
            continue;
        };
        let file = src.weights(hub)?;
        if file.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            bail!("{}: clipmine reads safetensors weights only", file.display());
        }
        let tensors = candle_core::safetensors::load(&file, &Device::Cpu)
            .with_context(|| format!("reading weights {}", file.display()))?;
        let (n, ignored) = load_tower(model, tower, &tensors)
            .with_context(|| format!("loading {} into the {} tower", file.display(), tower_name(tower)))?;
        loaded += n;
        report.towers.push(TowerLoad {
            tower,
            source: src.describe(),
            commit: snapshot_commit(&file),
            file,
            loaded: n,
            ignored,
        });
    }
    report.fresh = model.params.entries().len() - loaded;
    Ok(report)
}

/// A new model with its pretrained towers loaded (the Hub settings from the environment).
pub fn build(cfg: &ClipConfig, device: &Device) -> Result<(ClipModel, LoadReport)> {
    let model = ClipModel::new(cfg, device)?;
    let report = load_pretrained(&model, &Hub::from_env())?;
    Ok((model, report))
}

/// The pretrained text model's tokenizer, and the file it came from; `None` when the text tower
/// has no `pretrained`.
pub fn tokenizer(cfg: &ClipConfig, hub: &Hub) -> Result<Option<(TextTokenizer, PathBuf)>> {
    if let Some((tok, origin)) = crate::pretrained_clip::tokenizer(cfg, hub)? {
        let file = match origin {
            crate::pretrained_clip::TokenizerFile::File(p) => p,
            crate::pretrained_clip::TokenizerFile::OpenAiBpe => PathBuf::from(crate::pretrained_clip::BUILT_IN_BPE),
        };
        return Ok(Some((tok, file)));
    }
    let Some(src) = source(cfg, TowerKind::Text)? else {
        return Ok(None);
    };
    let max_len = cfg.max_tokens();
    let json_err = match src.get(hub, "tokenizer.json") {
        Ok(p) => return Ok(Some((TextTokenizer::from_file(&p, max_len)?, p))),
        Err(e) => e,
    };
    let vocab = src.get(hub, "vocab.txt").map_err(|e| {
        anyhow::anyhow!(
            "{} has neither a tokenizer.json nor a vocab.txt: {json_err:#}; {e:#}",
            src.describe()
        )
    })?;
    // Lower-casing as the model was trained: tokenizer_config.json says; else the name does.
    let lowercase = src
        .get(hub, "tokenizer_config.json")
        .ok()
        .and_then(|p| read_json(&p).ok())
        .and_then(|j| j.get("do_lower_case").and_then(Value::as_bool))
        .unwrap_or_else(|| {
            let n = src.name().to_ascii_lowercase();
            // "…-cased" keeps case; "…-uncased" and names saying neither lower-case, as BERT.
            !n.contains("cased") || n.contains("uncased")
        });
    Ok(Some((TextTokenizer::from_vocab(&vocab, lowercase, max_len)?, vocab)))
}

/// First values of each tower's pooled output on fixed inputs, in evaluation mode, so anyone
/// can compare with PyTorch: the caption `a photo of a cat`, and an all-grey image (0.5 in
/// every channel before normalisation, `torch.full((1, 3, S, S), 0.5)` then Normalize(mean, std)).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Probe {
    pub caption: &'static str,
    pub token_ids: Option<Vec<u32>>,
    pub text: Option<Vec<f32>>,
    pub image_size: usize,
    pub image: Vec<f32>,
}

pub const PROBE_CAPTION: &str = "a photo of a cat";

pub fn probe(model: &ClipModel, tokenizer: Option<&TextTokenizer>) -> Result<Probe> {
    let dev = model.device();
    let cfg = &model.config.image;
    let s = cfg.image_size;
    let plane = s * s;
    let mut grey = vec![0f32; 3 * plane];
    for c in 0..3 {
        let v = ((0.5 - cfg.mean[c]) / cfg.std[c]) as f32;
        grey[c * plane..(c + 1) * plane].fill(v);
    }
    let images = Tensor::from_vec(grey, (1, 3, s, s), dev)?;
    let image = candle_core::ModuleT::forward_t(model.image_tower(), &images, false)?;
    let first8 = |t: Tensor| -> Result<Vec<f32>> {
        let v = t.flatten_all()?.to_vec1::<f32>()?;
        Ok(v.into_iter().take(8).collect())
    };
    let (token_ids, text) = match tokenizer {
        Some(tok) => {
            let (ids, mask) = tok.encode_batch(&[PROBE_CAPTION], dev)?;
            let pooled = model.text_tower().forward(&ids, &mask, false)?;
            (Some(ids.flatten_all()?.to_vec1::<u32>()?), Some(first8(pooled)?))
        }
        None => (None, None),
    };
    Ok(Probe {
        caption: PROBE_CAPTION,
        token_ids,
        text,
        image_size: s,
        image: first8(image)?,
    })
}
