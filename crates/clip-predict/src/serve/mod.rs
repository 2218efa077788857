//! `clip-predict serve`: a local web page to search an image index, and its JSON API.
//!
//! Routes: `/` the page (serve.html, self-contained); `GET /api/search?q=…&top=…` images for a
//! caption; `POST /api/image?top=…` with an image as the body: the best captions from the list
//! given at start (`--texts`, `--captions`) and the most similar indexed photos; `GET
//! /images/PATH` an indexed image.
//!
//! What it serves: only files listed in the index, inside its folder, that are images by their
//! bytes (any other path, `..`, absolute paths, links leading out of the indexed folder and
//! non-image files are refused); an index whose folder is `/`, the home folder or one above it,
//! or a system folder is refused at start unless that folder is named with `--images`.
//!
//! Whom it answers: only requests whose `Host` is the address it listens on (`localhost` too on a
//! loopback address, or a name given with `--allow-host`), and whose `Origin`, when sent, is that
//! same host over http (`http://` + the request's own `Host`: a page of another site cannot drive
//! it, even through DNS rebinding or, with `--addr 0.0.0.0`, from another IP).
//!
//! What a client can hold: HTTP/1 on a tokio runtime of [`RUNTIME_THREADS`] threads; at most
//! [`MAX_CONNECTIONS`] connections (fewer under a low open-file limit: [`connection_bound`]); at
//! the bound a new connection closes the one idle longest (without a request in flight), so idle
//! connections cannot lock others out; a request head must arrive within [`HEAD_TIMEOUT`] and fit
//! in [`MAX_HEAD_BYTES`]; an upload is read whole (at most [`MAX_UPLOAD`], within
//! [`BODY_TIMEOUT`], while the bytes of all uploads being read stay within [`UPLOAD_BUDGET_MIB`],
//! else 503) before it waits for one of the `--workers` permits under which the model runs (on
//! tokio's blocking threads), so stalled or idle clients never take a worker; images being sent
//! stay within [`IMAGE_BUDGET_MIB`] (else 503).
//!
//! By concern: `connections` (the bound, and which connection makes room), `http` (the accept
//! loop and answers' bodies), `hosts` (whom it answers), `routes` and `search` (what it answers)
//! and `files` (what it serves from disk).

mod connections;
mod files;
mod hosts;
mod http;
mod routes;
mod search;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use candle_core::Device;
use clip_core::embed::l2_normalize;
use clip_core::index::ImageIndex;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use connections::{connection_bound, open_file_limit, Connections};
use files::check_root;
use hosts::Hosts;
use http::accept_loop;

/// The longest caption query, in characters.
pub const MAX_QUERY_CHARS: usize = 500;
/// The most results one request returns.
pub const MAX_TOP: usize = 100;
/// The largest image upload, in bytes.
pub const MAX_UPLOAD: usize = 16 << 20;
/// The most connections open at once (fewer when the open-file limit is low:
/// [`connection_bound`]). At the bound, a new connection closes the one idle longest (one without
/// a request in flight: new, or kept alive between requests); when every one has a request in
/// flight, the new one is closed.
pub const MAX_CONNECTIONS: usize = 4096;
/// File descriptors kept free of connections at most (model files, images, temporary files):
/// a quarter of the open-file limit, up to this many.
pub const RESERVED_FILES: u64 = 256;
/// The bytes (MiB) of uploads being read or waiting for the model at once: each takes its
/// declared length ([`MAX_UPLOAD`] when it declares none) before it is read; beyond, 503.
pub const UPLOAD_BUDGET_MIB: u32 = 64;
/// The bytes (MiB) of images being read or sent at once; beyond, 503.
pub const IMAGE_BUDGET_MIB: u32 = 128;
/// How long a client told 503 is asked to wait, in seconds (`Retry-After`).
pub const RETRY_AFTER_SECS: u32 = 1;
/// The largest request head (request line and headers), in bytes: hyper's read buffer, so a
/// longer head is answered 431 and closed.
pub const MAX_HEAD_BYTES: usize = 16 << 10;
/// How long a request head may take to arrive, counted from when the server waits for it (so an
/// idle connection, new or kept alive, is closed after this long).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a whole upload may take to arrive.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest indexed file served, in bytes.
pub const MAX_IMAGE_BYTES: u64 = 64 << 20;
/// The largest piece of an answer handed to hyper at once (so a connection counts as busy, and
/// an image's budget is held, until all but this much has been written).
const CHUNK: usize = 64 << 10;
/// The runtime's threads (accepting, parsing, reading bodies); the model runs on others.
pub const RUNTIME_THREADS: usize = 2;

pub struct ServeOptions {
    pub model: crate::ModelChoice,
    pub index: PathBuf,
    pub addr: String,
    pub texts: Vec<String>,
    pub workers: usize,
    /// Host names answered beside the listening address's (`--allow-host`).
    pub allow_hosts: Vec<String>,
    /// The indexed folder, named by the user (`--images`): allows serving a folder that is
    /// otherwise refused (`/`, home, system folders). Must be the index's folder.
    pub images: Option<PathBuf>,
}

struct State {
    /// The model, and for a student distilled on images alone the teacher answering its captions.
    loaded: crate::model::Loaded,
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
    let listener =
        std::net::TcpListener::bind(&opts.addr).map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", opts.addr))?;
    let local = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let hosts = Hosts::new(local, &opts.allow_hosts);
    // The first line says where to go (tests read the port from it).
    println!(
        "serving {} images ({} captions) at http://{local}/",
        state.index.len(),
        state.texts.len(),
    );
    use std::io::Write;
    std::io::stdout().flush()?;
    let workers = opts.workers.max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(RUNTIME_THREADS)
        // The model's permits, and a few threads for reading image files beside them.
        .max_blocking_threads(workers + 2)
        .thread_name("serve")
        .enable_io()
        .enable_time()
        .build()
        .context("starting the server's runtime")?;
    let bound = connection_bound(open_file_limit());
    log(format_args!("at most {bound} connections at once"));
    log(format_args!(
        "precision {}",
        clip_cli::args::describe_precision(clip_core::nn::precision())
    ));
    let app = Arc::new(App {
        state,
        hosts,
        workers: Arc::new(Semaphore::new(workers)),
        uploads: Arc::new(Semaphore::new(UPLOAD_BUDGET_MIB as usize)),
        images: Arc::new(Semaphore::new(IMAGE_BUDGET_MIB as usize)),
    });
    runtime.block_on(accept_loop(listener, app, Arc::new(Connections::new(bound))))
}

/// What every request shares.
struct App {
    state: Arc<State>,
    hosts: Hosts,
    /// One permit per request running the model (`--workers`).
    workers: Arc<Semaphore>,
    /// One permit per MiB of uploads being read or waiting ([`UPLOAD_BUDGET_MIB`]).
    uploads: Arc<Semaphore>,
    /// One permit per MiB of images being read or sent ([`IMAGE_BUDGET_MIB`]).
    images: Arc<Semaphore>,
}

/// Whole MiB holding `bytes` (at least one): the unit of the upload and image budgets.
fn mib(bytes: u64) -> u32 {
    bytes.div_ceil(1 << 20).clamp(1, u32::MAX as u64) as u32
}

/// A line on stderr; never a panic when stderr is closed (the server goes on).
fn log(line: std::fmt::Arguments) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "serve: {line}");
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
/// server goes on serving.
fn guarded(what: &str, answer: impl FnOnce() -> Reply) -> Reply {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(answer)) {
        Ok(reply) => reply,
        Err(panic) => {
            log(format_args!("{what} failed: {}", panic_message(&*panic)));
            internal_error()
        }
    }
}

fn internal_error() -> Reply {
    error(
        500,
        "internal error: the server failed to answer this request (see its log)",
    )
}

fn load_state(opts: &ServeOptions, device: &Device) -> Result<State> {
    let loaded = crate::model::load(&opts.model, device)?;
    let index = ImageIndex::load(&opts.index)?;
    loaded.check_index(&index, &opts.index)?;
    let root = index
        .root
        .canonicalize()
        .with_context(|| format!("the indexed folder {} is not there", index.root.display()))?;
    check_root(&root, opts.images.as_deref(), &opts.index)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_request_is_answered_500_and_the_server_goes_on() {
        let (status, _, body) = guarded("GET /boom", || panic!("boom"));
        assert_eq!(status, 500);
        assert!(String::from_utf8(body).unwrap().contains("internal error"));
        // The same thread answers the next request.
        assert_eq!(guarded("GET /", || (200, "text/plain", b"ok".to_vec())).0, 200);
    }
}
