//! `image-to-text` and `demo`: captions ranked for images, and the demo set both ways.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clip_core::data::{Dataset, ImageStore, LoadOptions};
use clip_core::embed::l2_normalize;
use clip_core::index::embed_image_files;
use clip_core::progress::Silent;
use clip_core::retrieval::{argsort_desc, softmax, to_rows};
use serde_json::json;

use crate::model::{load, Loaded};
use crate::table::fit;
use crate::ModelChoice;

pub(crate) fn image_to_text(
    choice: &ModelChoice,
    images: &[PathBuf],
    texts: Vec<String>,
    captions: Option<&Path>,
    top: usize,
    json: bool,
    device: &Device,
) -> Result<ExitCode> {
    let m = load(choice, device)?;
    let texts = candidate_texts(texts, captions)?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let text_emb = m.embed_texts(&refs, 64, device)?;
    let (img_emb, ok, failed) = embed_image_files(&m.model, &m.model.config, images, 32, |_| {})?;
    for (i, reason) in &failed {
        eprintln!("error: {}: {reason}", images[*i].display());
    }
    let mut out = vec![];
    if let Some(img_emb) = img_emb {
        let cos = to_rows(&img_emb.matmul(&l2_normalize(&text_emb)?.t()?)?)?;
        let logits = logit_rows(&m, &img_emb, &text_emb)?;
        for (row, &i) in ok.iter().enumerate() {
            let order = argsort_desc(&logits[row]);
            let probs = softmax(&logits[row], 1.0);
            let ranked: Vec<_> = order
                .iter()
                .take(top)
                .map(|&j| json!({"caption": texts[j], "score": cos[row][j], "probability": probs[j]}))
                .collect();
            out.push(json!({"image": images[i].display().to_string(), "captions": ranked}));
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"results": out, "errors": failed.iter().map(|(i, r)| json!({"image": images[*i].display().to_string(), "error": r})).collect::<Vec<_>>()})
            )?
        );
    } else {
        for r in &out {
            println!("{}", r["image"].as_str().unwrap_or_default());
            println!("  {:<4} {:>7} {:>7}  caption", "rank", "cosine", "prob");
            for (k, c) in r["captions"].as_array().unwrap().iter().enumerate() {
                println!(
                    "  {:<4} {:>7.3} {:>7.3}  {}",
                    k + 1,
                    c["score"].as_f64().unwrap_or(0.0),
                    c["probability"].as_f64().unwrap_or(0.0),
                    c["caption"].as_str().unwrap_or("")
                );
            }
        }
    }
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Candidate captions from --texts, or a file: a dataset's captions file (its caption column) or
/// plain lines.
pub(crate) fn candidate_texts(texts: Vec<String>, file: Option<&Path>) -> Result<Vec<String>> {
    if let Some(f) = file {
        let ds = Dataset::load(
            f,
            &LoadOptions {
                skip_bad: true,
                ..LoadOptions::default()
            },
        );
        let mut seen = BTreeSet::new();
        let list: Vec<String> = match ds {
            Ok(ds) => ds
                .pairs
                .iter()
                .map(|p| p.caption.clone())
                .filter(|c| seen.insert(c.clone()))
                .collect(),
            Err(_) => std::fs::read_to_string(f)
                .with_context(|| format!("reading captions {}", f.display()))?
                .lines()
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty() && seen.insert(l.clone()))
                .collect(),
        };
        if list.is_empty() {
            bail!("{} holds no captions", f.display());
        }
        return Ok(list);
    }
    if texts.is_empty() {
        bail!("give candidate captions with --texts \"…\" \"…\" or --captions FILE");
    }
    Ok(texts)
}

/// The loss's own logits between (normalised) image embeddings and raw text embeddings.
fn logit_rows(m: &Loaded, img_norm: &Tensor, text_emb: &Tensor) -> Result<Vec<Vec<f32>>> {
    let t = l2_normalize(text_emb)?;
    to_rows(&(img_norm.matmul(&t.t()?)? * m.scale as f64)?)
}

/// Each image's best caption and each caption's best image, marked right (✓) or wrong (✗).
pub(crate) fn demo(choice: &ModelChoice, data: &Path, device: &Device) -> Result<ExitCode> {
    let m = load(choice, device)?;
    let ds = Dataset::load(data, &LoadOptions::default())?;
    let (store, _) = ImageStore::load(&ds, &m.model.config, false, &Silent)?;
    let all: Vec<usize> = (0..ds.images.len()).collect();
    let img = l2_normalize(&clip_core::embed::embed_store_images(
        &m.model, &store, &all, 32, device,
    )?)?;
    let texts: Vec<&str> = ds.pairs.iter().map(|p| p.caption.as_str()).collect();
    let txt = l2_normalize(&m.embed_texts(&texts, 64, device)?)?;
    let sim = to_rows(&img.matmul(&txt.t()?)?)?;
    println!("image → text: the best of all {} captions for each image", texts.len());
    let mut right = 0;
    for (i, e) in ds.images.iter().enumerate() {
        let j = argsort_desc(&sim[i])[0];
        let ok = ds.pairs[j].image == i;
        right += ok as usize;
        println!(
            "  {} {} {:.3}  {}",
            if ok { "✓" } else { "✗" },
            fit(&e.name, 18),
            sim[i][j],
            texts[j]
        );
    }
    println!("  {right}/{} images got one of their own captions\n", ds.images.len());
    println!(
        "text → image: the best of all {} images for each caption",
        ds.images.len()
    );
    let mut right_t = 0;
    for (j, p) in ds.pairs.iter().enumerate() {
        let col: Vec<f32> = sim.iter().map(|r| r[j]).collect();
        let i = argsort_desc(&col)[0];
        let ok = i == p.image;
        right_t += ok as usize;
        println!(
            "  {} {} → {} {:.3}",
            if ok { "✓" } else { "✗" },
            fit(&p.caption, 40),
            fit(&ds.images[i].name, 18),
            col[i]
        );
    }
    println!("  {right_t}/{} captions found their own image", ds.pairs.len());
    Ok(ExitCode::SUCCESS)
}
