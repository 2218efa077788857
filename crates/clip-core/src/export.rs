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
//! An export is written to a temporary folder beside its destination and renamed into place:
//! the destination holds the old export or the new one, never a mix, and a failed export leaves
//! nothing behind.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use crate::config::{Activation, ClipConfig, HeadKind, ImageArch, ImagePool, Pooling, TextKind};
use crate::data::TextTokenizer;
use crate::files::{sync_dir, write_atomic};
use crate::model::ClipModel;
use crate::open_clip_names;

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

/// Every name an export writes, in either format: a folder holding these alone is an export.
const EXPORT_FILES: &[&str] = &[
    "open_clip_config.json",
    "open_clip_model.safetensors",
    "config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
];

/// What the folder an export is asked to write holds now.
enum Existing {
    Nothing,
    Empty,
    /// Files an export writes, and nothing else.
    Export(Vec<String>),
    /// Anything else: what an export would never write.
    Other(Vec<String>),
}

fn existing(out: &Path) -> Result<Existing> {
    let meta = match std::fs::metadata(out) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Existing::Nothing),
        Err(e) => return Err(e).with_context(|| format!("reading {}", out.display())),
    };
    if !meta.is_dir() {
        bail!(
            "{} is not a folder: an export writes a folder; choose another name",
            out.display()
        );
    }
    let mut names = vec![];
    let mut others = vec![];
    for e in std::fs::read_dir(out).with_context(|| format!("reading {}", out.display()))? {
        let e = e.with_context(|| format!("reading {}", out.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let file = e.file_type().map(|t| t.is_file()).unwrap_or(false);
        if file && EXPORT_FILES.contains(&name.as_str()) {
            names.push(name);
        } else {
            others.push(if file { name } else { format!("{name}/") });
        }
    }
    names.sort();
    others.sort();
    Ok(if !others.is_empty() {
        Existing::Other(others)
    } else if names.is_empty() {
        Existing::Empty
    } else {
        Existing::Export(names)
    })
}

/// `path` with its nearest existing ancestor resolved (links, `..`) and the rest joined lexically:
/// where the folder would be once created.
fn resolved(path: &Path) -> Result<PathBuf> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    };
    let mut rest = vec![];
    let mut base = abs.as_path();
    let canonical = loop {
        if let Ok(c) = base.canonicalize() {
            break c;
        }
        match (base.parent(), base.file_name()) {
            (Some(p), Some(n)) => {
                rest.push(n.to_os_string());
                base = p;
            }
            // `..` or the root: resolve what is left lexically.
            _ => match base.parent() {
                Some(p) => {
                    rest.push("..".into());
                    base = p;
                }
                None => break base.to_path_buf(),
            },
        }
    };
    let mut out = canonical;
    for c in rest.iter().rev() {
        if c == ".." {
            out.pop();
        } else if c != "." {
            out.push(c);
        }
    }
    Ok(out)
}

/// Refuses an `out` that is one of `sources` — the folders the model is read from (a run folder,
/// a checkpoint's folder) — or lies inside one: replacing it would destroy the model exported,
/// and an export beside a run's files would be mistaken for them.
pub fn check_out(out: &Path, sources: &[(&str, &Path)]) -> Result<()> {
    let at = resolved(out)?;
    for (what, src) in sources {
        let Ok(src_at) = src.canonicalize() else {
            continue;
        };
        if at.starts_with(&src_at) {
            bail!(
                "{} {} {what} {}: an export there would replace or mix with the model's own files; choose a folder outside it",
                out.display(),
                if at == src_at { "is" } else { "lies inside" },
                src.display()
            );
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
    let cfg = &model.config;
    exportable(cfg, format)?;
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
    // A distilled student's maps into its teacher's space served training only.
    let params: HashMap<String, Tensor> = model
        .params
        .tensors()
        .into_iter()
        .filter(|(k, _)| !k.starts_with("distill."))
        .map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)))
        .collect::<Result<_>>()?;
    let chinese = cfg.text.kind == TextKind::Bert;
    let eos = cfg.text.eos_token_id.unwrap_or(tokenizer.sep_id());
    if format == ExportFormat::Hf && !chinese && eos == 2 && eos as usize + 1 != tokenizer.vocab_size() {
        // transformers' CLIPTextTransformer takes eos_token_id 2 for an old config and pools
        // at the largest id instead.
        bail!("this text tower pools at its end-of-text id 2, which Hugging Face's CLIPModel reads as an old config and replaces by the largest id: export with --format open_clip (pool_type \"eos\")");
    }
    let (layout, tensors, mut files, weights, python) = match format {
        ExportFormat::OpenClip => {
            let tensors = open_clip_tensors(cfg, &params)?;
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
            (class, tensors, files, "model.safetensors", python)
        }
    };
    let n = tensors.len();
    files.push((weights.to_string(), safetensors_pt(&tensors)?));
    std::fs::create_dir_all(&parent).with_context(|| format!("creating folder {}", parent.display()))?;
    let prefix = format!(".{base}-export-");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // The umask applies, as to any folder made: not tempfile's private 0700.
        builder.permissions(std::fs::Permissions::from_mode(0o777));
    }
    // Removed on any error below: a failed export leaves nothing beside `out`.
    let tmp = builder
        .tempdir_in(&parent)
        .with_context(|| format!("creating a temporary folder in {}", parent.display()))?;
    for (name, bytes) in &files {
        write_atomic(&tmp.path().join(name), bytes).with_context(|| format!("exporting to {}", out.display()))?;
    }
    install(tmp, &at, &parent, &base, &before)?;
    Ok(Exported {
        layout,
        files: files.iter().map(|(name, _)| out.join(name)).collect(),
        tensors: n,
        python,
    })
}

/// Renames the written folder `tmp` to `out`, replacing what `before` found there.
fn install(tmp: tempfile::TempDir, out: &Path, parent: &Path, base: &str, before: &Existing) -> Result<()> {
    let renamed = |from: &Path, to: &Path| {
        std::fs::rename(from, to).with_context(|| format!("renaming {} to {}", from.display(), to.display()))
    };
    match before {
        Existing::Nothing => renamed(tmp.path(), out)?,
        Existing::Empty => {
            std::fs::remove_dir(out).with_context(|| format!("replacing the empty folder {}", out.display()))?;
            renamed(tmp.path(), out)?;
        }
        Existing::Export(_) if exchange(tmp.path(), out)? => {
            // One atomic swap: `out` is the new export, `tmp` holds the old one (dropping `tmp`
            // removes it). There is no moment without an `out`.
            sync_dir(parent)?;
            return tmp.close().with_context(|| {
                format!(
                    "the new export is in {}, but the one it replaced could not be removed",
                    out.display()
                )
            });
        }
        Existing::Export(_) => {
            // Where the file system cannot swap two names at once: the old export steps aside
            // under a name of its own, the new one takes its place, and only then is the old one
            // removed (a crash between the two renames leaves the old one beside, named).
            let old = tempfile::Builder::new()
                .prefix(&format!(".{base}-replaced-"))
                .tempdir_in(parent)
                .with_context(|| format!("creating a temporary folder in {}", parent.display()))?
                .keep();
            std::fs::remove_dir(&old).with_context(|| format!("removing {}", old.display()))?;
            renamed(out, &old)?;
            if let Err(e) = renamed(tmp.path(), out) {
                let _ = std::fs::rename(&old, out);
                return Err(e);
            }
            std::fs::remove_dir_all(&old).with_context(|| {
                format!(
                    "the new export is in {}, but the one it replaced could not be removed from {}",
                    out.display(),
                    old.display()
                )
            })?;
        }
        Existing::Other(_) => bail!("internal error: {} holds other files", out.display()),
    }
    // The folder is `out` now: nothing left to clean up.
    let _ = tmp.keep();
    sync_dir(parent)
}

/// Swaps the names `a` and `b` in one step (Linux `renameat2(RENAME_EXCHANGE)`): `Ok(false)`
/// where the system or file system cannot, and the caller falls back to two renames.
fn exchange(a: &Path, b: &Path) -> Result<bool> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).context("a path with a NUL byte");
        let (ca, cb) = (c(a)?, c(b)?);
        // SAFETY: both are valid NUL-terminated paths that outlive the call; renameat2 only reads them.
        let r = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                ca.as_ptr(),
                libc::AT_FDCWD,
                cb.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        if r == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => Ok(false),
            _ => Err(e).with_context(|| format!("swapping {} and {}", a.display(), b.display())),
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (a, b);
        Ok(false)
    }
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
    let renamed = open_clip_names::to_open_clip(open_clip_names::BLOCK, inner)
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

fn act_name(a: Activation) -> &'static str {
    match a {
        Activation::Gelu => "gelu",
        Activation::GeluNew => "gelu_new",
        Activation::Relu => "relu",
        Activation::QuickGelu => "quick_gelu",
    }
}

/// A tower's LayerNorm epsilon and GELU variant where they are not open_clip's defaults
/// (`nn.LayerNorm`'s 1e-5, exact GELU or `quick_gelu`): a student trained from scratch has
/// BERT's 1e-12.
fn tower_kwargs(tower: &mut Value, eps: f64, act: Activation) {
    if eps != 1e-5 {
        tower["norm_kwargs"] = json!({ "eps": eps });
    }
    if act == Activation::GeluNew {
        tower["act_kwargs"] = json!({ "approximate": "tanh" });
    }
}

/// `open_clip_config.json`: `model_cfg` as open_clip's model JSONs spell it, and `preprocess_cfg`.
fn open_clip_config(cfg: &ClipConfig, tok: &TextTokenizer) -> Value {
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
    let mut vision = vision;
    if i.arch == ImageArch::Vit {
        tower_kwargs(&mut vision, i.layer_norm_eps, i.activation);
    }
    let mut text = json!({
        "context_length": t.max_position_embeddings,
        "vocab_size": t.vocab_size,
        "width": t.dim,
        "heads": t.n_heads,
        "layers": t.n_layers,
        "mlp_ratio": t.hidden_dim as f64 / t.dim.max(1) as f64,
    });
    tower_kwargs(&mut text, t.layer_norm_eps, t.activation);
    if !clip_bpe(tok) {
        // Not OpenAI's BPE: open_clip's own tokenizer would give other ids. Any
        // `hf_tokenizer_name` makes `get_tokenizer("local-dir:…")` read this folder's
        // tokenizer files with transformers (from the Hub, name the repository here).
        text["hf_tokenizer_name"] = json!(".");
        text["pad_id"] = json!(tok.pad_id());
    }
    // clipmine pools at the first end-of-text id; open_clip's default (`argmax`) pools at the
    // largest id, which is the same place only for OpenAI's vocabulary (49407).
    let eos = t.eos_token_id.unwrap_or(tok.sep_id());
    if eos != 49407 || !clip_bpe(tok) {
        text["pool_type"] = json!("eos");
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
    // The shorter side before the centre crop: as read from a processor, else the crop over
    // `crop_pct`; and the filter the model was prepared with (PIL's codes).
    let edge = i
        .resize
        .unwrap_or_else(|| (s as f64 / i.crop_pct.clamp(1e-3, 1.0)).round() as usize);
    let resample = match i.interpolation {
        crate::config::Interpolation::Nearest => 0,
        crate::config::Interpolation::Bilinear => 2,
        crate::config::Interpolation::Bicubic => 3,
    };
    json!({
        "image_processor_type": if chinese { "ChineseCLIPImageProcessor" } else { "CLIPImageProcessor" },
        "processor_class": if chinese { "ChineseCLIPProcessor" } else { "CLIPProcessor" },
        "do_resize": true,
        "size": if cfg.data.center_crop { json!({"shortest_edge": edge}) } else { json!({"height": s, "width": s}) },
        "do_center_crop": cfg.data.center_crop,
        "crop_size": {"height": s, "width": s},
        "resample": resample,
        "do_rescale": true,
        "rescale_factor": 1.0 / 255.0,
        "do_normalize": true,
        "image_mean": i.mean,
        "image_std": i.std,
        "do_convert_rgb": true,
    })
}

/// Whether `tok` is a CLIP byte-level BPE (OpenAI's vocabulary, or a checkpoint's own with its
/// `<|startoftext|>` … `<|endoftext|>`), which Hugging Face's `CLIPTokenizer` and open_clip's
/// `SimpleTokenizer` reproduce; a WordPiece trained on the captions is not.
fn clip_bpe(tok: &TextTokenizer) -> bool {
    tok.token(tok.cls_id()).as_deref() == Some("<|startoftext|>")
        && tok.token(tok.sep_id()).as_deref() == Some("<|endoftext|>")
}

fn tokenizer_config(cfg: &ClipConfig, tok: &TextTokenizer) -> Value {
    if cfg.text.kind == TextKind::Clip && !clip_bpe(tok) {
        // A CLIP text transformer over a tokenizer of its own (a student's WordPiece):
        // `tokenizer.json` as it is, with its own special tokens.
        let name = |id: u32| tok.token(id).map(Value::String).unwrap_or(Value::Null);
        let mut c = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": cfg.data.max_length.min(cfg.text.max_position_embeddings),
            "bos_token": name(tok.cls_id()),
            "cls_token": name(tok.cls_id()),
            "eos_token": name(tok.sep_id()),
            "sep_token": name(tok.sep_id()),
            "pad_token": name(tok.pad_id()),
        });
        if let Some(unk) = tok.unk_id() {
            c["unk_token"] = name(unk);
        }
        return c;
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
