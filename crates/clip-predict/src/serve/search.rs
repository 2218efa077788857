//! The searches: a caption against the indexed photos, and an uploaded photo against the
//! captions given at start and the indexed photos.

use std::collections::HashMap;

use anyhow::{Context, Result};
use candle_core::Device;
use clip_core::data::ImageStore;
use clip_core::embed::l2_normalize;
use clip_core::index::SearchMode;
use clip_core::retrieval::softmax;
use serde_json::{json, Value};

use super::{error, json_reply, Reply, State, MAX_QUERY_CHARS, MAX_TOP};

/// `top` from the query string: 1 ..= [`MAX_TOP`] (default 12).
fn top_param(params: &HashMap<String, String>) -> std::result::Result<usize, Reply> {
    match params.get("top") {
        None => Ok(12),
        Some(t) => match t.parse::<usize>() {
            Ok(n) if (1..=MAX_TOP).contains(&n) => Ok(n),
            _ => Err(error(
                400,
                format!("top must be a number from 1 to {MAX_TOP}, not {t:?}"),
            )),
        },
    }
}

fn mode_param(params: &HashMap<String, String>) -> std::result::Result<SearchMode, Reply> {
    match params.get("mode") {
        None => Ok(SearchMode::Approx),
        Some(m) => m.parse().map_err(|e| error(400, format!("{e}"))),
    }
}

/// The indexed photos best matching `q`, as JSON rows.
fn photo_rows(state: &State, q: &[f32], top: usize, mode: SearchMode) -> Result<Vec<Value>> {
    let hits = state.index.search_with(q, top, mode)?;
    Ok(hits
        .iter()
        .enumerate()
        .map(|(rank, &(i, score))| {
            let path = &state.index.entries[i].path;
            json!({"rank": rank + 1, "path": path, "url": image_url(path), "score": score})
        })
        .collect())
}

/// What a URL path segment keeps as it is (RFC 3986's unreserved characters).
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `/images/` + the path, each segment percent-encoded.
fn image_url(path: &str) -> String {
    let parts: Vec<String> = path
        .split('/')
        .map(|s| percent_encoding::utf8_percent_encode(s, SEGMENT).to_string())
        .collect();
    format!("/images/{}", parts.join("/"))
}

pub(super) fn search_text(state: &State, params: &HashMap<String, String>) -> Reply {
    let q = params.get("q").map(|s| s.trim()).unwrap_or("");
    if q.is_empty() {
        return error(400, "give a caption: /api/search?q=…");
    }
    let chars = q.chars().count();
    if chars > MAX_QUERY_CHARS {
        return error(
            400,
            format!("the query has {chars} characters; at most {MAX_QUERY_CHARS}"),
        );
    }
    let (top, mode) = match (top_param(params), mode_param(params)) {
        (Ok(t), Ok(m)) => (t, m),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    let started = std::time::Instant::now();
    let run = || -> Result<Value> {
        let e = l2_normalize(&state.loaded.embed_texts(&[q], 1, &state.device)?)?;
        let v = e.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
        let results = photo_rows(state, &v, top, mode)?;
        Ok(
            json!({"query": q, "top": top, "indexed": state.index.len(), "results": results,
                  "ms": started.elapsed().as_secs_f64() * 1e3}),
        )
    };
    match run() {
        Ok(v) => json_reply(200, &v),
        Err(e) => error(500, format!("{e:#}")),
    }
}

pub(super) fn search_image(state: &State, params: &HashMap<String, String>, body: &[u8]) -> Reply {
    if body.is_empty() {
        return error(400, "send an image (JPEG, PNG or WebP) as the request body");
    }
    let (top, mode) = match (top_param(params), mode_param(params)) {
        (Ok(t), Ok(m)) => (t, m),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    let started = std::time::Instant::now();
    let emb = match embed_upload(state, body) {
        Ok(e) => e,
        Err(e) => return error(400, format!("{e:#}")),
    };
    let run = || -> Result<Value> {
        let cos: Vec<f32> = state
            .text_emb
            .iter()
            .map(|t| clip_core::index::dot_f32(t, &emb))
            .collect();
        let logits: Vec<f32> = cos.iter().map(|c| c * state.scale).collect();
        let probs = softmax(&logits, 1.0);
        let order = clip_core::retrieval::argsort_desc(&cos);
        let captions: Vec<Value> = order
            .iter()
            .take(top)
            .enumerate()
            .map(|(rank, &j)| json!({"rank": rank + 1, "caption": state.texts[j], "score": cos[j], "probability": probs[j]}))
            .collect();
        let photos = photo_rows(state, &emb, top, mode)?;
        Ok(
            json!({"top": top, "captions": captions, "photos": photos, "indexed": state.index.len(),
                  "ms": started.elapsed().as_secs_f64() * 1e3}),
        )
    };
    match run() {
        Ok(v) => json_reply(200, &v),
        Err(e) => error(500, format!("{e:#}")),
    }
}

/// The L2-normalised embedding of an uploaded image (decoded as the training images are).
fn embed_upload(state: &State, body: &[u8]) -> Result<Vec<f32>> {
    image::guess_format(body).context("the upload is not an image this server reads (JPEG, PNG, WebP)")?;
    let mut file = tempfile::NamedTempFile::new().context("a temporary file for the upload")?;
    std::io::Write::write_all(&mut file, body)?;
    let x = ImageStore::load_one(file.path(), &state.loaded.model.config).map_err(|e| {
        anyhow::anyhow!(
            "{}",
            format!("{e:#}").replace(&file.path().display().to_string(), "upload")
        )
    })?;
    let x = x.unsqueeze(0)?.to_device(&state.device)?;
    let e = l2_normalize(&state.loaded.model.embed_images(&x)?)?;
    Ok(e.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?)
}
