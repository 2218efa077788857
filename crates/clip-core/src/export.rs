//! Hands a CLIP back to Python: a clipmine model written as an open_clip folder or a Hugging Face
//! `CLIPModel` / `ChineseCLIPModel` folder, the layouts [`crate::pretrained_clip`] reads.
//!
//! - open_clip: `open_clip_config.json` (`model_cfg`, `preprocess_cfg`) + `open_clip_model.safetensors`
//!   under open_clip's names (fused `in_proj`, `(in, out)` projections); loads with
//!   `open_clip.create_model_and_transforms("local-dir:DIR")`. The only format that carries a
//!   ModifiedResNet, average pooling, or one GELU for both towers.
//! - Hugging Face: `config.json`, `model.safetensors` (with `{"format": "pt"}` metadata, which some
//!   transformers 4.x releases read without checking), the tokenizer files and
//!   `preprocessor_config.json`; loads with `CLIPModel.from_pretrained(DIR)` (or
//!   `ChineseCLIPModel`).
//!
//! Every file is written atomically; an export never leaves half a folder that looks complete:
//! the weights are written last.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use crate::config::{Activation, ClipConfig, HeadKind, ImageArch, ImagePool, TextKind};
use crate::data::TextTokenizer;
use crate::files::write_atomic;
use crate::model::ClipModel;

/// The layouts an export can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    OpenClip,
    /// `CLIPModel`, or `ChineseCLIPModel` for a model with a BERT text tower.
    Hf,
}

impl std::str::FromStr for ExportFormat {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "open_clip" | "open-clip" | "openclip" => Ok(Self::OpenClip),
            "hf" | "huggingface" | "transformers" => Ok(Self::Hf),
            other => bail!("unknown export format {other:?}: open_clip or hf"),
        }
    }
}

/// What [`export`] wrote.
#[derive(Debug, Clone)]
pub struct Exported {
    /// `open_clip`, `CLIPModel` or `ChineseCLIPModel`.
    pub layout: &'static str,
    pub files: Vec<PathBuf>,
    pub tensors: usize,
    /// The Python lines that load it.
    pub python: String,
}

const IMG: &str = "image_encoder.model.";
const TXT: &str = "text_encoder.model.";

/// Which architectures a format can carry; the error says why not and what can. Needs only the
/// config, so a caller can refuse before loading anything.
pub fn exportable(cfg: &ClipConfig, format: ExportFormat) -> Result<()> {
    // The exported model is the student's towers alone: neither its teacher's text tower nor
    // its maps into the teacher's space travel with it.
    if cfg.distill.images_only {
        bail!(
            "this student was distilled on images without captions: its own text tower learned nothing, and clipmine answers its captions with the teacher's ({}) — an exported model would carry the untrained one. Distil on images with captions to export a student that stands alone",
            cfg.distill.teacher.as_deref().unwrap_or("?")
        );
    }
    if cfg.distill.in_teacher_space() && cfg.distill.maps(cfg.projection_dim).is_some() {
        bail!(
            "this student was distilled by the feature term alone (contrastive = 0, affinity = 0): its embeddings meet only through its maps into the teacher's space, which open_clip and Hugging Face models have no place for — distil with the contrastive term on (the default) to export"
        );
    }
    let i = &cfg.image;
    if cfg.head != HeadKind::Linear || !matches!(i.arch, ImageArch::Vit | ImageArch::ClipResnet) {
        bail!(
            "only a CLIP exports to open_clip or Hugging Face: this model has a {:?} image tower and {} heads (the recipe's); runs started from a pretrained CLIP (--pretrained, a clip-* preset) export",
            i.arch,
            if cfg.head == HeadKind::Mlp { "MLP projection" } else { "linear" }
        );
    }
    let chinese = cfg.text.kind == TextKind::Bert;
    if !matches!(cfg.text.kind, TextKind::Clip | TextKind::Bert) {
        bail!(
            "a {:?} text tower exports to neither open_clip nor Hugging Face CLIP",
            cfg.text.kind
        );
    }
    match format {
        ExportFormat::Hf => {
            if i.arch == ImageArch::ClipResnet {
                bail!("Hugging Face transformers has no ResNet CLIP: export this model with --format open_clip (open_clip.create_model_and_transforms(\"local-dir:…\") loads it)");
            }
            if i.pool == ImagePool::Avg {
                bail!("Hugging Face's CLIPVisionModel reads the class token only; this image tower averages its tokens: export with --format open_clip (pool_type \"avg\")");
            }
        }
        ExportFormat::OpenClip => {
            if chinese {
                bail!("open_clip has no Chinese-CLIP text tower (a BERT): export this model with --format hf (ChineseCLIPModel)");
            }
            if i.arch == ImageArch::Vit && i.activation != cfg.text.activation {
                bail!(
                    "open_clip has one activation for both towers (quick_gelu true or false); this model's image tower uses {} and its text tower {}: export with --format hf",
                    i.activation.name(),
                    cfg.text.activation.name()
                );
            }
        }
    }
    Ok(())
}

/// Writes `model` (and its tokenizer) to the folder `out` in `format`. Files already there under
/// the names it writes are refused unless `overwrite`.
pub fn export(
    model: &ClipModel,
    tokenizer: &TextTokenizer,
    format: ExportFormat,
    out: &Path,
    overwrite: bool,
) -> Result<Exported> {
    let cfg = &model.config;
    exportable(cfg, format)?;
    // A distilled student's maps into its teacher's space served training only.
    let params: HashMap<String, Tensor> = model
        .params
        .tensors()
        .into_iter()
        .filter(|(k, _)| !k.starts_with("distill."))
        .map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)))
        .collect::<Result<_>>()?;
    let chinese = cfg.text.kind == TextKind::Bert;
    let (layout, tensors, mut files, weights, python) = match format {
        ExportFormat::OpenClip => {
            let tensors = open_clip_tensors(cfg, &params)?;
            let config = serde_json::to_vec_pretty(&open_clip_config(cfg))?;
            let files = vec![
                ("open_clip_config.json".to_string(), config),
                ("tokenizer.json".into(), tokenizer.to_json()?.into_bytes()),
            ];
            let python = format!(
                "import open_clip\nmodel, _, preprocess = open_clip.create_model_and_transforms(\"local-dir:{0}\")\ntokenizer = open_clip.get_tokenizer(\"local-dir:{0}\")",
                out.display()
            );
            ("open_clip", tensors, files, "open_clip_model.safetensors", python)
        }
        ExportFormat::Hf => {
            let tensors = hf_tensors(&params)?;
            let mut files = vec![
                (
                    "config.json".to_string(),
                    serde_json::to_vec_pretty(&hf_config(cfg, tokenizer))?,
                ),
                (
                    "preprocessor_config.json".into(),
                    serde_json::to_vec_pretty(&preprocessor_config(cfg))?,
                ),
                ("tokenizer.json".into(), tokenizer.to_json()?.into_bytes()),
                (
                    "tokenizer_config.json".into(),
                    serde_json::to_vec_pretty(&tokenizer_config(cfg))?,
                ),
            ];
            if chinese {
                files.push(("vocab.txt".into(), vocab_txt(tokenizer).into_bytes()));
            }
            let class = if chinese { "ChineseCLIPModel" } else { "CLIPModel" };
            let processor = if chinese {
                "ChineseCLIPProcessor"
            } else {
                "CLIPProcessor"
            };
            let python = format!(
                "from transformers import {class}, {processor}\nmodel = {class}.from_pretrained(\"{0}\")\nprocessor = {processor}.from_pretrained(\"{0}\")",
                out.display()
            );
            (class, tensors, files, "model.safetensors", python)
        }
    };
    let mut names: Vec<String> = files.iter().map(|(n, _)| n.clone()).collect();
    names.push(weights.to_string());
    if !overwrite {
        let existing: Vec<&String> = names.iter().filter(|n| out.join(n).exists()).collect();
        if !existing.is_empty() {
            bail!(
                "{} already holds {}: pass --overwrite to replace them, or choose another folder",
                out.display(),
                existing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            );
        }
    }
    let n = tensors.len();
    // The weights last: a folder whose weights file exists is complete.
    files.push((weights.to_string(), safetensors_pt(&tensors)?));
    let mut written = vec![];
    for (name, bytes) in &files {
        let path = out.join(name);
        write_atomic(&path, bytes).with_context(|| format!("exporting to {}", out.display()))?;
        written.push(path);
    }
    Ok(Exported {
        layout,
        files: written,
        tensors: n,
        python,
    })
}

/// safetensors bytes with PyTorch's `{"format": "pt"}` metadata, names sorted.
fn safetensors_pt(tensors: &HashMap<String, Tensor>) -> Result<Vec<u8>> {
    let mut sorted: Vec<(&String, &Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    Ok(safetensors::serialize(sorted, Some(meta))?)
}

/// The model's names → Hugging Face `CLIPModel` / `ChineseCLIPModel`'s.
fn hf_tensors(params: &HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
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
    let renamed = [
        ("layer_norm1.", "ln_1."),
        ("layer_norm2.", "ln_2."),
        ("self_attn.out_proj.", "attn.out_proj."),
        ("mlp.fc1.", "mlp.c_fc."),
        ("mlp.fc2.", "mlp.c_proj."),
    ]
    .iter()
    .find_map(|(a, b)| inner.strip_prefix(a).map(|r| format!("{b}{r}")))
    .with_context(|| format!("internal error: no open_clip name for {from}{inner}"))?;
    out.insert(format!("{to}{renamed}"), t.clone());
    Ok(())
}

/// The model's names → open_clip's (`CLIP` with a ViT or ModifiedResNet `visual`).
fn open_clip_tensors(cfg: &ClipConfig, params: &HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
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
            let to = match v {
                "embeddings.patch_embedding.weight" => "conv1.weight".to_string(),
                "embeddings.class_embedding" => "class_embedding".into(),
                "embeddings.position_embedding.weight" => "positional_embedding".into(),
                _ => [("pre_layrnorm.", "ln_pre."), ("post_layernorm.", "ln_post.")]
                    .iter()
                    .find_map(|(a, b)| v.strip_prefix(a).map(|r| format!("{b}{r}")))
                    .with_context(|| format!("internal error: no open_clip name for {name}"))?,
            };
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
            let to = match v {
                "embeddings.token_embedding.weight" => "token_embedding.weight".to_string(),
                "embeddings.position_embedding.weight" => "positional_embedding".into(),
                _ => v
                    .strip_prefix("final_layer_norm.")
                    .map(|r| format!("ln_final.{r}"))
                    .with_context(|| format!("internal error: no open_clip name for {name}"))?,
            };
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

fn act_name(a: Activation) -> &'static str {
    match a {
        Activation::Gelu => "gelu",
        Activation::GeluNew => "gelu_new",
        Activation::Relu => "relu",
        Activation::QuickGelu => "quick_gelu",
    }
}

/// `open_clip_config.json`: `model_cfg` as open_clip's model JSONs spell it, and `preprocess_cfg`.
fn open_clip_config(cfg: &ClipConfig) -> Value {
    let i = &cfg.image;
    let t = &cfg.text;
    let vision = match i.arch {
        ImageArch::ClipResnet => json!({
            "image_size": i.image_size,
            "layers": i.depths,
            "width": i.width,
            "head_width": i.width * 32 / i.heads.max(1),
            "patch_size": null,
        }),
        _ => json!({
            "image_size": i.image_size,
            "layers": i.layers,
            "width": i.width,
            "head_width": i.width / i.heads.max(1),
            "mlp_ratio": i.mlp_dim as f64 / i.width.max(1) as f64,
            "patch_size": i.patch_size,
            "pool_type": if i.pool == ImagePool::Avg { "avg" } else { "tok" },
        }),
    };
    let mut text = json!({
        "context_length": t.max_position_embeddings,
        "vocab_size": t.vocab_size,
        "width": t.dim,
        "heads": t.n_heads,
        "layers": t.n_layers,
        "mlp_ratio": t.hidden_dim as f64 / t.dim.max(1) as f64,
    });
    if let Some(eos) = t.eos_token_id.filter(|&e| e != 49407) {
        text["eos_id"] = json!(eos);
    }
    json!({
        "model_cfg": {
            "embed_dim": cfg.projection_dim,
            "quick_gelu": t.activation == Activation::QuickGelu,
            "vision_cfg": vision,
            "text_cfg": text,
        },
        "preprocess_cfg": {
            "mean": i.mean,
            "std": i.std,
            "interpolation": "bicubic",
            "resize_mode": if cfg.data.center_crop { "shortest" } else { "squash" },
        },
    })
}

/// Hugging Face `config.json` for `CLIPModel`, or `ChineseCLIPModel` with a BERT text tower.
fn hf_config(cfg: &ClipConfig, tok: &TextTokenizer) -> Value {
    let i = &cfg.image;
    let t = &cfg.text;
    let chinese = t.kind == TextKind::Bert;
    let vision = json!({
        "model_type": if chinese { "chinese_clip_vision_model" } else { "clip_vision_model" },
        "hidden_size": i.width,
        "intermediate_size": i.mlp_dim,
        "num_hidden_layers": i.layers,
        "num_attention_heads": i.heads,
        "image_size": i.image_size,
        "patch_size": i.patch_size,
        "num_channels": 3,
        "hidden_act": act_name(i.activation),
        "layer_norm_eps": i.layer_norm_eps,
        "projection_dim": cfg.projection_dim,
    });
    let text = if chinese {
        json!({
            "model_type": "chinese_clip_text_model",
            "vocab_size": t.vocab_size,
            "hidden_size": t.dim,
            "num_hidden_layers": t.n_layers,
            "num_attention_heads": t.n_heads,
            "intermediate_size": t.hidden_dim,
            "hidden_act": act_name(t.activation),
            "max_position_embeddings": t.max_position_embeddings,
            "type_vocab_size": t.type_vocab_size,
            "layer_norm_eps": t.layer_norm_eps,
            "hidden_dropout_prob": t.dropout,
            "attention_probs_dropout_prob": t.attention_dropout,
            "pad_token_id": tok.pad_id(),
        })
    } else {
        json!({
            "model_type": "clip_text_model",
            "vocab_size": t.vocab_size,
            "hidden_size": t.dim,
            "intermediate_size": t.hidden_dim,
            "num_hidden_layers": t.n_layers,
            "num_attention_heads": t.n_heads,
            "max_position_embeddings": t.max_position_embeddings,
            "hidden_act": act_name(t.activation),
            "layer_norm_eps": t.layer_norm_eps,
            // The tokenizer's own ids (49406 / 49407 for OpenAI's vocabulary).
            "bos_token_id": tok.cls_id(),
            "eos_token_id": t.eos_token_id.unwrap_or(tok.sep_id()),
            "pad_token_id": tok.pad_id(),
            "projection_dim": cfg.projection_dim,
        })
    };
    json!({
        "architectures": [if chinese { "ChineseCLIPModel" } else { "CLIPModel" }],
        "model_type": if chinese { "chinese_clip" } else { "clip" },
        "projection_dim": cfg.projection_dim,
        "logit_scale_init_value": crate::loss::CLIP_INIT_LOGIT_SCALE,
        "text_config": text,
        "vision_config": vision,
        "torch_dtype": "float32",
        "exported_by": format!("clipmine {}", env!("CARGO_PKG_VERSION")),
    })
}

/// `preprocessor_config.json`: CLIP's shorter side + centre crop, or Chinese-CLIP's square resize.
fn preprocessor_config(cfg: &ClipConfig) -> Value {
    let i = &cfg.image;
    let chinese = cfg.text.kind == TextKind::Bert;
    let s = i.image_size;
    json!({
        "image_processor_type": if chinese { "ChineseCLIPImageProcessor" } else { "CLIPImageProcessor" },
        "processor_class": if chinese { "ChineseCLIPProcessor" } else { "CLIPProcessor" },
        "do_resize": true,
        "size": if cfg.data.center_crop { json!({"shortest_edge": s}) } else { json!({"height": s, "width": s}) },
        "do_center_crop": cfg.data.center_crop,
        "crop_size": {"height": s, "width": s},
        "resample": 3,
        "do_rescale": true,
        "rescale_factor": 1.0 / 255.0,
        "do_normalize": true,
        "image_mean": i.mean,
        "image_std": i.std,
        "do_convert_rgb": true,
    })
}

fn tokenizer_config(cfg: &ClipConfig) -> Value {
    if cfg.text.kind == TextKind::Bert {
        json!({
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": true,
            "model_max_length": cfg.data.max_length,
            "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
            "cls_token": "[CLS]", "mask_token": "[MASK]",
        })
    } else {
        json!({
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": cfg.text.max_position_embeddings,
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
        })
    }
}

/// BERT's `vocab.txt`: one token per line, in id order.
fn vocab_txt(tok: &TextTokenizer) -> String {
    let mut v: Vec<(u32, String)> = tok.inner().get_vocab(true).into_iter().map(|(k, i)| (i, k)).collect();
    v.sort();
    let mut s = String::new();
    for (_, t) in v {
        s.push_str(&t);
        s.push('\n');
    }
    s
}
