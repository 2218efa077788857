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
//! - ONNX: `image_encoder.onnx`, `text_encoder.onnx` (pixels or token ids → unit embeddings),
//!   `clip.json`, `tokenizer.json`, `preprocessor_config.json`; runs in ONNX Runtime without
//!   Python (see [`onnx`]).
//!
//! An export is written to a temporary folder beside its destination and renamed into place:
//! the destination holds the old export or the new one, never a mix, and a failed export leaves
//! nothing behind.

mod configs;
mod folder;
pub mod onnx;
mod tensors;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

use crate::config::{Activation, ClipConfig, HeadKind, ImageArch, ImagePool, Pooling, TextKind};
use crate::data::TextTokenizer;
use crate::model::ClipModel;
use configs::{clip_bpe, hf_config, open_clip_config, preprocessor_config, tokenizer_config, vocab_txt};
pub use folder::check_out;
use folder::{existing, resolved, Existing};
use tensors::{hf_tensors, open_clip_tensors, safetensors_pt};

/// The layouts an export can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    OpenClip,
    /// `CLIPModel`, or `ChineseCLIPModel` for a model with a BERT text tower.
    Hf,
    /// Two ONNX graphs (image and text encoders) and the files a consumer needs beside them.
    Onnx,
}

impl std::str::FromStr for ExportFormat {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "open_clip" | "open-clip" | "openclip" => Ok(Self::OpenClip),
            "hf" | "huggingface" | "transformers" => Ok(Self::Hf),
            "onnx" => Ok(Self::Onnx),
            other => bail!("unknown export format {other:?}: open_clip, hf or onnx"),
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
    // its maps into the teacher's space travel with it (ONNX graphs carry both: the text encoder
    // is then the teacher's, see `export_with_caption_teacher`).
    if cfg.distill.images_only && format != ExportFormat::Onnx {
        bail!(
            "this student was distilled on images without captions: its own text tower learned nothing, and clipmine answers its captions with the teacher's ({}) — an exported model would carry the untrained one. Distil on images with captions to export a student that stands alone, or export it with --format onnx (its text encoder is then the teacher's)",
            cfg.distill.teacher.as_deref().unwrap_or("?")
        );
    }
    if format == ExportFormat::Onnx {
        // The graphs carry every tower kind, and a student's maps into its teacher's space.
        return Ok(());
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
    if chinese && cfg.text.pooling != Pooling::Cls {
        bail!(
            "this BERT text tower averages its tokens (text.pooling = \"mean\"); Hugging Face's ChineseCLIPModel reads the [CLS] token only and open_clip has no BERT text tower, so neither can express it: train with text.pooling = \"cls\" to export"
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
        // Answered above.
        ExportFormat::Onnx => {}
        ExportFormat::OpenClip => {
            if chinese {
                bail!("open_clip has no Chinese-CLIP text tower (a BERT): export this model with --format hf (ChineseCLIPModel)");
            }
            for (tower, act) in [("image", i.activation), ("text", cfg.text.activation)] {
                if act == Activation::Relu && (tower == "text" || i.arch == ImageArch::Vit) {
                    bail!("open_clip's transformers have no ReLU (GELU or QuickGELU only); this model's {tower} tower uses it: export with --format hf");
                }
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

/// A Python string literal for `s` (a JSON string is one: `\"`, `\\` and `\uXXXX` escapes).
fn py_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

/// Writes `model` (and its tokenizer) as the folder `out` in `format`. The export is written to a
/// temporary folder beside `out` and renamed into place, so `out` holds the old export or the new
/// one, never a mix. An `out` that exists must be empty, or hold an earlier export and
/// `overwrite` be set (the whole folder is then replaced); a folder holding anything else is
/// refused, naming it.
pub fn export(
    model: &ClipModel,
    tokenizer: &TextTokenizer,
    format: ExportFormat,
    out: &Path,
    overwrite: bool,
) -> Result<Exported> {
    let options = Options {
        overwrite,
        ..Options::default()
    };
    export_with(model, tokenizer, format, out, options)
}

/// What an export may do beyond writing a model in its format.
#[derive(Clone, Copy, Default)]
pub struct Options<'a> {
    /// Replace an earlier export in `out`.
    pub overwrite: bool,
    /// A student distilled on images alone: the model and tokenizer that answer its captions
    /// (its teacher's, [`crate::distill::caption_teacher`]). ONNX only.
    pub captions_by: Option<(&'a ClipModel, &'a TextTokenizer)>,
    /// Weights (and activations, at run time) in int8. ONNX only.
    pub quantize: Option<onnx::Quantize>,
    /// The ONNX graphs' weights in `.data` files beside them (ONNX's external data), as they
    /// must be for a graph over protobuf's 2 GB limit (then written so without being asked).
    pub external_data: bool,
}

/// [`export`] for a student distilled on images alone, whose captions its teacher answers
/// (`captions_by`: the teacher's model and tokenizer, [`crate::distill::caption_teacher`]): the
/// ONNX text encoder and tokenizer are the teacher's, as `clip-predict` answers with them. The
/// other formats have no place for a second model and refuse it.
pub fn export_with_caption_teacher(
    model: &ClipModel,
    tokenizer: &TextTokenizer,
    captions_by: (&ClipModel, &TextTokenizer),
    format: ExportFormat,
    out: &Path,
    overwrite: bool,
) -> Result<Exported> {
    let options = Options {
        overwrite,
        captions_by: Some(captions_by),
        ..Options::default()
    };
    export_with(model, tokenizer, format, out, options)
}

/// [`export`] with [`Options`].
pub fn export_with(
    model: &ClipModel,
    tokenizer: &TextTokenizer,
    format: ExportFormat,
    out: &Path,
    options: Options,
) -> Result<Exported> {
    let Options {
        overwrite,
        captions_by,
        quantize,
        external_data,
    } = options;
    let cfg = &model.config;
    exportable(cfg, format)?;
    if let (Some(q), false) = (quantize, format == ExportFormat::Onnx) {
        bail!("quantization ({q:?}) applies to ONNX exports only (--format onnx)");
    }
    if external_data && format != ExportFormat::Onnx {
        bail!("external data applies to ONNX exports only (--format onnx)");
    }
    match (cfg.distill.images_only, captions_by.is_some()) {
        (true, false) => bail!(
            "this student was distilled on images without captions: its own text tower learned nothing, and its captions are answered by its teacher's ({}), which this export was not given (clip-predict export --format onnx opens it)",
            cfg.distill.teacher.as_deref().unwrap_or("?")
        ),
        (false, true) => bail!("only a student distilled on images alone has its captions answered by another model"),
        _ => {}
    }
    // Where the folder is (or will be), links and `..` resolved: its parent holds the
    // temporary folder, so that the final rename stays on one file system.
    let at = resolved(out)?;
    let (Some(parent), Some(base)) = (at.parent(), at.file_name()) else {
        bail!(
            "{} names no folder an export can be renamed to: choose another",
            out.display()
        );
    };
    let (parent, base) = (parent.to_path_buf(), base.to_string_lossy().into_owned());
    let before = existing(&at)?;
    match &before {
        Existing::Other(names) => bail!(
            "{} holds files an export does not write ({}): an export replaces only an empty folder or an earlier export; choose another folder",
            out.display(),
            names.join(", ")
        ),
        Existing::Export(names) if !overwrite => bail!(
            "{} already holds an export ({}): pass --overwrite to replace it, or choose another folder",
            out.display(),
            names.join(", ")
        ),
        _ => {}
    }
    // A distilled student's maps into its teacher's space served training only, except where the
    // student answers through them (which only the ONNX graphs can carry).
    let params = cpu_params(model, format == ExportFormat::Onnx)?;
    let mut w = match format {
        ExportFormat::OpenClip => open_clip_files(cfg, tokenizer, &params, out)?,
        ExportFormat::Hf => hf_files(cfg, tokenizer, &params, out)?,
        ExportFormat::Onnx => onnx_files(model, tokenizer, &params, captions_by, (quantize, external_data), out)?,
    };
    let n = w.tensors.len();
    if let Some(weights) = w.weights {
        w.files.push((weights.to_string(), safetensors_pt(&w.tensors)?));
    }
    folder::write(&w.files, out, &at, &parent, &base, &before)?;
    Ok(Exported {
        layout: w.layout,
        files: w.files.iter().map(|(name, _)| out.join(name)).collect(),
        tensors: n,
        python: w.python,
    })
}

/// What an export writes in one layout: its name, the tensors under its names, the other files
/// (name, bytes), the weights file's name (none where the weights live in the other files), and
/// the Python lines that load it.
struct Written {
    layout: &'static str,
    tensors: HashMap<String, Tensor>,
    files: Vec<(String, Vec<u8>)>,
    weights: Option<&'static str>,
    python: String,
}

/// A model's parameters (and buffers) on the CPU in fp32, by name; the maps into a distillation
/// teacher's space only with `maps`.
fn cpu_params(model: &ClipModel, maps: bool) -> Result<HashMap<String, Tensor>> {
    model
        .params
        .tensors()
        .into_iter()
        .filter(|(k, _)| maps || !k.starts_with("distill."))
        .map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)))
        .collect()
}

/// The ONNX folder: both encoders' graphs, `clip.json`, the tokenizer and the preprocessor. The
/// text side is `captions_by`'s where given (a student distilled on images alone).
fn onnx_files(
    model: &ClipModel,
    tokenizer: &TextTokenizer,
    params: &HashMap<String, Tensor>,
    captions_by: Option<(&ClipModel, &TextTokenizer)>,
    onnx_options: (Option<onnx::Quantize>, bool),
    out: &Path,
) -> Result<Written> {
    let text = match captions_by {
        Some((m, tok)) => onnx::TextSide {
            model: m,
            tok,
            params: cpu_params(m, true)?,
        },
        None => onnx::TextSide {
            model,
            tok: tokenizer,
            params: params.clone(),
        },
    };
    let files = onnx::files(model, params, &text, preprocessor_config(&model.config), onnx_options)?;
    let at = |name: &str| py_str(&out.join(name).display().to_string());
    // An int8 export's sessions take clip.json's session_config (its int8 kernels folded at load).
    let (options, so) = match onnx_options.0 {
        Some(_) => {
            let (key, value) = onnx::INT8_SESSION_CONFIG;
            let set = format!(
                "so = ort.SessionOptions()\nso.add_session_config_entry({}, {})\n",
                py_str(key),
                py_str(value)
            );
            (set, ", so")
        }
        None => (String::new(), ""),
    };
    let python = format!(
        "import onnxruntime as ort\n{options}image_encoder = ort.InferenceSession({}{so})\ntext_encoder = ort.InferenceSession({}{so})",
        at("image_encoder.onnx"),
        at("text_encoder.onnx")
    );
    Ok(Written {
        layout: "onnx",
        tensors: params.clone(),
        files,
        weights: None,
        python,
    })
}

/// The open_clip folder: `open_clip_config.json`, the tokenizer, `open_clip_model.safetensors`.
fn open_clip_files(
    cfg: &ClipConfig,
    tokenizer: &TextTokenizer,
    params: &HashMap<String, Tensor>,
    out: &Path,
) -> Result<Written> {
    let tensors = open_clip_tensors(cfg, params)?;
    let config = serde_json::to_vec_pretty(&open_clip_config(cfg, tokenizer))?;
    let mut files = vec![
        ("open_clip_config.json".to_string(), config),
        ("tokenizer.json".into(), tokenizer.to_json()?.into_bytes()),
    ];
    if !clip_bpe(tokenizer) {
        // open_clip's HFTokenizer reads it with transformers' AutoTokenizer.
        files.push((
            "tokenizer_config.json".into(),
            serde_json::to_vec_pretty(&tokenizer_config(cfg, tokenizer))?,
        ));
    }
    let python = format!(
        "import open_clip\nmodel, _, preprocess = open_clip.create_model_and_transforms({0})\ntokenizer = open_clip.get_tokenizer({0})",
        py_str(&format!("local-dir:{}", out.display()))
    );
    Ok(Written {
        layout: "open_clip",
        tensors,
        files,
        weights: Some("open_clip_model.safetensors"),
        python,
    })
}

/// The Hugging Face folder: `config.json`, `preprocessor_config.json`, the tokenizer's files,
/// `model.safetensors`, for `CLIPModel` or (a BERT text tower) `ChineseCLIPModel`.
fn hf_files(
    cfg: &ClipConfig,
    tokenizer: &TextTokenizer,
    params: &HashMap<String, Tensor>,
    out: &Path,
) -> Result<Written> {
    let chinese = cfg.text.kind == TextKind::Bert;
    let eos = cfg.text.eos_token_id.unwrap_or(tokenizer.sep_id());
    if !chinese && eos == 2 && eos as usize + 1 != tokenizer.vocab_size() {
        // transformers' CLIPTextTransformer takes eos_token_id 2 for an old config and pools
        // at the largest id instead.
        bail!("this text tower pools at its end-of-text id 2, which Hugging Face's CLIPModel reads as an old config and replaces by the largest id: export with --format open_clip (pool_type \"eos\")");
    }
    let tensors = hf_tensors(params)?;
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
            serde_json::to_vec_pretty(&tokenizer_config(cfg, tokenizer))?,
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
        "from transformers import {class}, {processor}\nmodel = {class}.from_pretrained({0})\nprocessor = {processor}.from_pretrained({0})",
        py_str(&out.display().to_string())
    );
    Ok(Written {
        layout: class,
        tensors,
        files,
        weights: Some("model.safetensors"),
        python,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// A small ViT student with a CLIP text transformer, from scratch.
    fn student() -> ClipConfig {
        let mut cfg = ClipConfig::preset("student-vit-s").unwrap();
        cfg.projection_dim = 16;
        cfg.image.image_size = 32;
        cfg.image.patch_size = 8;
        cfg.image.width = 16;
        cfg.image.layers = 1;
        cfg.image.heads = 2;
        cfg.image.mlp_dim = 32;
        cfg.text.vocab_size = 64;
        cfg.text.dim = 16;
        cfg.text.n_layers = 1;
        cfg.text.n_heads = 2;
        cfg.text.hidden_dim = 32;
        cfg.text.max_position_embeddings = 16;
        cfg.data.max_length = 16;
        cfg
    }

    #[test]
    fn hf_refuses_an_end_of_text_id_of_2_that_clipmodel_would_read_as_the_largest_id() {
        // A vocabulary whose [SEP] is id 2: transformers' CLIPTextTransformer takes
        // eos_token_id 2 for an old config and pools at the largest id instead.
        let dir = tempfile::tempdir().unwrap();
        let vocab = dir.path().join("vocab.txt");
        std::fs::write(&vocab, "[PAD]\n[UNK]\n[SEP]\n[CLS]\n[MASK]\na\nphoto\nof\ncat\n").unwrap();
        let tok = TextTokenizer::from_vocab(&vocab, true, 16).unwrap();
        assert_eq!(tok.sep_id(), 2);
        let model = ClipModel::new(&student(), &Device::Cpu).unwrap();
        let out = dir.path().join("hf");
        let e = format!("{:#}", export(&model, &tok, ExportFormat::Hf, &out, false).unwrap_err());
        assert!(
            e.contains("end-of-text id 2") && e.contains("--format open_clip"),
            "{e}"
        );
        assert!(!out.exists());
        // open_clip pools at it by name (pool_type "eos").
        let out = dir.path().join("oc");
        export(&model, &tok, ExportFormat::OpenClip, &out, false).unwrap();
        let c: Value = serde_json::from_slice(&std::fs::read(out.join("open_clip_config.json")).unwrap()).unwrap();
        assert_eq!(c["model_cfg"]["text_cfg"]["pool_type"], "eos");
        assert_eq!(c["model_cfg"]["text_cfg"]["eos_id"], 2);
    }

    #[test]
    fn an_out_not_yet_made_is_resolved_through_its_existing_parent() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        std::fs::create_dir(&run).unwrap();
        let src = [("the run folder", run.as_path())];
        for inside in [run.join("a/b"), run.join("x/../y"), dir.path().join("z/../run")] {
            let e = check_out(&inside, &src).unwrap_err().to_string();
            assert!(e.contains("the run folder"), "{}: {e}", inside.display());
        }
        for outside in [
            dir.path().join("run2"),
            dir.path().join("run/../other"),
            dir.path().to_path_buf(),
        ] {
            check_out(&outside, &src).unwrap();
        }
    }
}
