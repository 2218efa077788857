//! `clip-predict serve`: a local web page to search an image index, and its JSON API.
//!
//! Routes: `/` the page (serve.html, self-contained); `GET /api/search?q=…&top=…` images for a
//! caption; `POST /api/image?top=…` with an image as the body: the best captions from the list
//! given at start (`--texts`, `--captions`) and the most similar indexed photos; `GET
//! /images/PATH` an indexed image. Only files listed in the index are served: any other path,
//! `..`, absolute paths, and links leading out of the indexed folder are refused. Queries, result
//! counts and uploads are bounded. A few worker threads share one `tiny_http` server, so requests
//! are answered concurrently.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clip_core::data::ImageStore;
use clip_core::index::{ImageIndex, SearchMode};
use clip_core::loss::l2_normalize;
use clip_core::retrieval::softmax;
use serde_json::{json, Value};
use tiny_http::{Header, Method, Request, Response, Server, StatusCode};

/// The longest caption query, in characters.
pub const MAX_QUERY_CHARS: usize = 500;
/// The most results one request returns.
pub const MAX_TOP: usize = 100;
/// The largest image upload, in bytes.
pub const MAX_UPLOAD: usize = 16 << 20;

const PAGE: &str = include_str!("serve.html");

pub struct ServeOptions {
    pub model: crate::ModelChoice,
    pub index: PathBuf,
    pub addr: String,
    pub texts: Vec<String>,
    pub workers: usize,
}

struct State {
    /// The model, and for a student distilled on images alone the teacher answering its captions.
    loaded: crate::commands::Loaded,
    device: Device,
    index: ImageIndex,
    /// The canonical indexed folder: served files must resolve inside it.
    root: PathBuf,
    /// Indexed relative path → entry.
    by_path: HashMap<String, usize>,
    texts: Vec<String>,
    /// (texts, P), L2-normalised, on the CPU.
    text_emb: Vec<Vec<f32>>,
    /// exp(logit scale) (the clip loss) or 1/T (soft): turns cosines into caption probabilities.
    scale: f32,
}

/// An answer to send: status, content type, body.
type Reply = (u16, &'static str, Vec<u8>);

fn json_reply(status: u16, v: &Value) -> Reply {
    (status, "application/json; charset=utf-8", v.to_string().into_bytes())
}

fn error(status: u16, msg: impl Into<String>) -> Reply {
    json_reply(status, &json!({"error": msg.into()}))
}

pub fn serve(opts: ServeOptions, device: &Device) -> Result<()> {
    let state = Arc::new(load_state(&opts, device)?);
    let server = Server::http(&opts.addr).map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", opts.addr))?;
    let server = Arc::new(server);
    // The first line says where to go (tests read the port from it).
    println!(
        "serving {} images ({} captions) at http://{}/",
        state.index.len(),
        state.texts.len(),
        server.server_addr()
    );
    use std::io::Write;
    std::io::stdout().flush()?;
    let workers = opts.workers.max(1);
    supervise(workers, move |_| {
        for req in server.incoming_requests() {
            handle(&state, req);
        }
    })
}

/// Runs `work` on `n` threads and waits for them. A request's panic is caught inside
/// [`handle`], so a worker only ends when the server stops or something outside a request
/// panics: each such end is logged, and once every worker is gone the server is reported as
/// failed (the process exits non-zero) instead of exiting as if it had been stopped.
fn supervise(n: usize, work: impl Fn(usize) + Send + Sync + 'static) -> Result<()> {
    let work = Arc::new(work);
    let workers: Vec<_> = (0..n)
        .map(|i| {
            let work = work.clone();
            std::thread::Builder::new()
                .name(format!("serve-{i}"))
                .spawn(move || work(i))
                .context("starting a server thread")
        })
        .collect::<Result<_>>()?;
    let mut died = vec![];
    for (i, w) in workers.into_iter().enumerate() {
        if let Err(panic) = w.join() {
            let msg = panic_message(&*panic);
            eprintln!("serve: worker {i} died: {msg}");
            died.push(format!("worker {i}: {msg}"));
        }
    }
    if !died.is_empty() {
        bail!(
            "the server stopped: {} of {n} workers died ({})",
            died.len(),
            died.join("; ")
        );
    }
    Ok(())
}

/// What a panic said, when it said it with a string.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Runs one request's `answer`; a panic in it becomes a 500 (logged with the request) and the
/// worker goes on serving.
fn guarded(what: &str, answer: impl FnOnce() -> Reply) -> Reply {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(answer)) {
        Ok(reply) => reply,
        Err(panic) => {
            eprintln!("serve: {what} failed: {}", panic_message(&*panic));
            error(
                500,
                "internal error: the server failed to answer this request (see its log)",
            )
        }
    }
}

fn load_state(opts: &ServeOptions, device: &Device) -> Result<State> {
    let loaded = crate::commands::load(&opts.model, device)?;
    let index = ImageIndex::load(&opts.index)?;
    loaded.check_index(&index, &opts.index)?;
    let root = index
        .root
        .canonicalize()
        .with_context(|| format!("the indexed folder {} is not there", index.root.display()))?;
    let by_path = index
        .entries
        .iter()
        .enumerate()
        .map(|(i, e)| (e.path.clone(), i))
        .collect();
    let text_emb = if opts.texts.is_empty() {
        vec![]
    } else {
        let refs: Vec<&str> = opts.texts.iter().map(String::as_str).collect();
        l2_normalize(&loaded.embed_texts(&refs, 64, device)?)?
            .to_device(&Device::Cpu)?
            .to_vec2::<f32>()?
    };
    let scale = loaded.scale;
    Ok(State {
        loaded,
        device: device.clone(),
        index,
        root,
        by_path,
        texts: opts.texts.clone(),
        text_emb,
        scale,
    })
}

fn handle(state: &State, mut req: Request) {
    let url = req.url().to_string();
    let (path, query) = url.split_once('?').unwrap_or((url.as_str(), ""));
    let params: HashMap<String, String> = form_urlencoded::parse(query.as_bytes()).into_owned().collect();
    let what = format!("{} {path}", req.method());
    let reply = guarded(&what, || route(state, &mut req, path, &params));
    let (status, ctype, body) = reply;
    let header = Header::from_bytes("Content-Type", ctype).expect("a valid header");
    let nosniff = Header::from_bytes("X-Content-Type-Options", "nosniff").expect("a valid header");
    let resp = Response::from_data(body)
        .with_status_code(StatusCode(status))
        .with_header(header)
        .with_header(nosniff);
    // A client that went away is not the server's problem.
    let _ = req.respond(resp);
}

/// The answer to one request.
fn route(state: &State, req: &mut Request, path: &str, params: &HashMap<String, String>) -> Reply {
    match (req.method(), path) {
        (Method::Get, "/") | (Method::Get, "/index.html") => {
            (200, "text/html; charset=utf-8", PAGE.as_bytes().to_vec())
        }
        (Method::Get, "/api/search") => search_text(state, params),
        (Method::Post, "/api/image") => match read_body(req) {
            Ok(body) => search_image(state, params, &body),
            Err(r) => r,
        },
        (Method::Get, "/api/info") => json_reply(
            200,
            &json!({"images": state.index.len(), "captions": state.texts.len(), "max_top": MAX_TOP,
                    "max_query_chars": MAX_QUERY_CHARS, "max_upload_bytes": MAX_UPLOAD}),
        ),
        (Method::Get, p) if p.starts_with("/images/") => serve_image(state, &p["/images/".len()..]),
        (_, "/api/search" | "/api/image" | "/") => error(405, "method not allowed"),
        _ => error(404, "not found"),
    }
}

/// The request body, refused (413) beyond [`MAX_UPLOAD`].
fn read_body(req: &mut Request) -> std::result::Result<Vec<u8>, Reply> {
    let too_big = || error(413, format!("the image is larger than {} MiB", MAX_UPLOAD >> 20));
    if req.body_length().is_some_and(|n| n > MAX_UPLOAD) {
        return Err(too_big());
    }
    let mut body = vec![];
    req.as_reader()
        .take(MAX_UPLOAD as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| error(400, format!("reading the upload: {e}")))?;
    if body.len() > MAX_UPLOAD {
        return Err(too_big());
    }
    Ok(body)
}

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

fn search_text(state: &State, params: &HashMap<String, String>) -> Reply {
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

fn search_image(state: &State, params: &HashMap<String, String>, body: &[u8]) -> Reply {
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

/// An indexed image. The URL path is decoded, then must be exactly an indexed relative path (so
/// `..`, absolute paths and unindexed files never reach the file system) and must resolve inside
/// the indexed folder (so a link in it cannot lead elsewhere).
fn serve_image(state: &State, raw: &str) -> Reply {
    let Ok(rel) = percent_encoding::percent_decode_str(raw).decode_utf8() else {
        return error(400, "the path is not UTF-8");
    };
    let rel = rel.into_owned();
    let p = Path::new(&rel);
    if rel.contains('\\') || rel.contains('\0') || p.components().any(|c| !matches!(c, Component::Normal(_))) {
        return error(403, "only indexed images are served");
    }
    let Some(&i) = state.by_path.get(&rel) else {
        return error(404, "not an indexed image");
    };
    let file = state.index.path_of(i);
    match file.canonicalize() {
        Ok(real) if real.starts_with(&state.root) => match std::fs::read(&real) {
            Ok(bytes) => (200, content_type(&rel), bytes),
            Err(_) => error(404, "the indexed image cannot be read"),
        },
        Ok(_) => error(403, "the indexed path leads outside the indexed folder"),
        Err(_) => error(404, "the indexed image is gone"),
    }
}

fn content_type(path: &str) -> &'static str {
    match path.rsplit('.').next().map(|e| e.to_ascii_lowercase()).as_deref() {
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("png") => "image/png",
        Some("webp") => "image/webp",
        Some("gif") => "image/gif",
        Some("bmp") => "image/bmp",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn a_panicking_request_is_answered_500_and_the_worker_goes_on() {
        let (status, _, body) = guarded("GET /boom", || panic!("boom"));
        assert_eq!(status, 500);
        assert!(String::from_utf8(body).unwrap().contains("internal error"));
        // The same thread answers the next request.
        assert_eq!(guarded("GET /", || (200, "text/plain", b"ok".to_vec())).0, 200);
    }

    #[test]
    fn a_pool_whose_workers_all_die_is_an_error_naming_them() {
        let err = format!("{:#}", supervise(3, |i| panic!("worker {i} hit a bug")).unwrap_err());
        assert!(
            err.contains("3 of 3 workers died") && err.contains("hit a bug"),
            "{err}"
        );
        let err = format!(
            "{:#}",
            supervise(2, |i| if i == 1 {
                panic!("only one")
            })
            .unwrap_err()
        );
        assert!(err.contains("1 of 2 workers died") && err.contains("only one"), "{err}");
        // Workers that return (the server stopped) are not a failure.
        let done = Arc::new(AtomicUsize::new(0));
        let d = done.clone();
        supervise(4, move |_| {
            d.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
        assert_eq!(done.load(Ordering::SeqCst), 4);
    }
}
