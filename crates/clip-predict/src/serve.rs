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

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clip_core::data::ImageStore;
use clip_core::index::{ImageIndex, SearchMode};
use clip_core::loss::l2_normalize;
use clip_core::retrieval::softmax;
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{HeaderMap, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST, ORIGIN, RETRY_AFTER};
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

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

const PAGE: &str = include_str!("serve.html");

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

/// The process's open-file limit (soft), if it has one.
fn open_file_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit into the struct it is given.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 && lim.rlim_cur != libc::RLIM_INFINITY {
            #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 everywhere
            return Some(lim.rlim_cur as u64);
        }
    }
    None
}

/// The most connections held at once under an open-file limit: [`MAX_CONNECTIONS`], less when
/// the limit minus what is kept free ([`RESERVED_FILES`], or a quarter of a small limit) is
/// lower; at least 8.
fn connection_bound(open_files: Option<u64>) -> usize {
    let Some(n) = open_files else {
        return MAX_CONNECTIONS;
    };
    let free = n.saturating_sub((n / 4).min(RESERVED_FILES));
    (free.min(MAX_CONNECTIONS as u64) as usize).max(8)
}

/// The open connections: whether each has a request in flight, since when it is idle, and how to
/// close it.
struct Connections {
    bound: usize,
    table: Mutex<ConnectionTable>,
}

#[derive(Default)]
struct ConnectionTable {
    /// Counts admissions and ends of requests: orders connections by how long they are idle.
    tick: u64,
    open: HashMap<u64, Connection>,
}

struct Connection {
    /// Requests in flight (their answer not yet all handed to hyper).
    busy: usize,
    /// The tick at which it was admitted or its last request ended.
    idle_since: u64,
    /// Closes it (dropping the sender closes it too).
    close: oneshot::Sender<()>,
}

impl Connections {
    fn new(bound: usize) -> Self {
        Connections {
            bound,
            table: Mutex::new(ConnectionTable::default()),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, ConnectionTable> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a new connection: its id, what closes it, and whether another was closed to make
    /// room (at the bound, the connection idle longest); when none is idle, `None` (close the new
    /// one).
    fn admit(&self) -> Option<(u64, oneshot::Receiver<()>, bool)> {
        let mut t = self.table();
        let full = t.open.len() >= self.bound;
        if full {
            let oldest = t
                .open
                .iter()
                .filter(|(_, c)| c.busy == 0)
                .min_by_key(|(_, c)| c.idle_since)
                .map(|(&id, _)| id)?;
            if let Some(c) = t.open.remove(&oldest) {
                let _ = c.close.send(());
            }
        }
        t.tick += 1;
        let id = t.tick;
        let (close, closed) = oneshot::channel();
        t.open.insert(
            id,
            Connection {
                busy: 0,
                idle_since: id,
                close,
            },
        );
        Some((id, closed, full))
    }

    /// Marks a request in flight on connection `id` until the guard is dropped.
    fn busy(self: &Arc<Self>, id: u64) -> Busy {
        if let Some(c) = self.table().open.get_mut(&id) {
            c.busy += 1;
        }
        Busy {
            connections: self.clone(),
            id,
        }
    }

    fn remove(&self, id: u64) {
        self.table().open.remove(&id);
    }

    #[cfg(test)]
    fn ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.table().open.keys().copied().collect();
        ids.sort();
        ids
    }
}

/// A request in flight on a connection (which is then never closed to make room).
struct Busy {
    connections: Arc<Connections>,
    id: u64,
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut t = self.connections.table();
        t.tick += 1;
        let tick = t.tick;
        if let Some(c) = t.open.get_mut(&self.id) {
            c.busy -= 1;
            if c.busy == 0 {
                c.idle_since = tick;
            }
        }
    }
}

/// Removes a connection from the table when its task ends.
struct Registered(Arc<Connections>, u64);

impl Drop for Registered {
    fn drop(&mut self) {
        self.0.remove(self.1);
    }
}

/// An answer's body, handed to hyper [`CHUNK`] bytes at a time, holding what must last until it
/// is sent: its connection's [`Busy`] mark, an image's budget.
struct Answer {
    rest: Bytes,
    _busy: Option<Busy>,
    _budget: Option<OwnedSemaphorePermit>,
}

impl Body for Answer {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut TaskContext<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.rest.is_empty() {
            return Poll::Ready(None);
        }
        let n = this.rest.len().min(CHUNK);
        Poll::Ready(Some(Ok(Frame::data(this.rest.split_to(n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.rest.len() as u64)
    }
}

/// Accepts connections for ever, each served on its own task while it is in the table of
/// [`Connections`] (which closes the one idle longest to admit a new one at the bound). An
/// accept error (out of file descriptors) is logged and retried after a pause.
async fn accept_loop(listener: std::net::TcpListener, app: Arc<App>, connections: Arc<Connections>) -> Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener).context("listening")?;
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES);
    let http = Arc::new(http);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: pass, and try again shortly.
                log(format_args!("accepting a connection failed: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some((id, mut closed, made_room)) = connections.admit() else {
            drop(stream);
            continue;
        };
        let (app, http, connections) = (app.clone(), http.clone(), connections.clone());
        tokio::spawn(async move {
            let _registered = Registered(connections.clone(), id);
            let service = hyper::service::service_fn(move |req| {
                let app = app.clone();
                let busy = connections.busy(id);
                async move {
                    let (status, ctype, body, budget) = app.reply(req).await;
                    Ok::<_, Infallible>(response(status, ctype, body, Some(busy), budget))
                }
            });
            // A client that went away, sent garbage or timed out is not the server's problem.
            let mut conn = std::pin::pin!(http.serve_connection(TokioIo::new(stream), service));
            // Served until it ends or is closed to make room (dropping it closes the socket).
            std::future::poll_fn(|cx| {
                if conn.as_mut().poll(cx).is_ready() || Pin::new(&mut closed).poll(cx).is_ready() {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            })
            .await;
        });
        if made_room {
            // Let the closed connection's task end (and its socket close) before accepting more,
            // so that a burst of connections cannot run the process out of file descriptors.
            tokio::task::yield_now().await;
        }
    }
}

/// The HTTP response for a reply; a 503 asks the client to come back ([`RETRY_AFTER_SECS`]) and
/// closes the connection (its upload is not read).
fn response(
    status: u16,
    ctype: &'static str,
    body: Vec<u8>,
    busy: Option<Busy>,
    budget: Option<OwnedSemaphorePermit>,
) -> Response<Answer> {
    let mut r = Response::builder()
        .status(status)
        .header(CONTENT_TYPE, ctype)
        .header("X-Content-Type-Options", "nosniff");
    if status == 503 {
        r = r.header(RETRY_AFTER, RETRY_AFTER_SECS).header(CONNECTION, "close");
    }
    let body = Answer {
        rest: Bytes::from(body),
        _busy: busy,
        _budget: budget,
    };
    r.body(body).unwrap_or_else(|e| {
        log(format_args!("building a response failed: {e}"));
        Response::new(Answer {
            rest: Bytes::new(),
            _busy: None,
            _budget: None,
        })
    })
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

/// Refuses to serve a canonical indexed folder that would publish far more than photos (see
/// [`too_broad`]), unless the user named that same folder (`--images`). A named folder must be
/// the index's.
fn check_root(root: &Path, named: Option<&Path>, index: &Path) -> Result<()> {
    if let Some(dir) = named {
        let dir = dir
            .canonicalize()
            .with_context(|| format!("--images {}: no such folder", dir.display()))?;
        if dir != root {
            bail!(
                "--images {} is not the folder the index {} was made from ({})",
                dir.display(),
                index.display(),
                root.display()
            );
        }
        return Ok(());
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .and_then(|h| PathBuf::from(h).canonicalize().ok());
    if let Some(why) = too_broad(root, home.as_deref()) {
        bail!(
            "the index {} is of {} ({why}): serving it could publish any file there. If you mean it, name the folder: --images {}",
            index.display(),
            root.display(),
            root.display()
        );
    }
    Ok(())
}

/// Why a canonical folder is too broad to serve without being named: the file system's root,
/// the home folder or one above it, a system folder (or inside one of /etc, /proc, /sys, /dev,
/// /boot).
fn too_broad(root: &Path, home: Option<&Path>) -> Option<&'static str> {
    if root.parent().is_none() {
        return Some("the root of the file system");
    }
    if let Some(home) = home {
        if home == root {
            return Some("your home folder");
        }
        if home.starts_with(root) {
            return Some("a folder holding your home folder");
        }
    }
    let canon = |p: &str| Path::new(p).canonicalize().unwrap_or_else(|_| PathBuf::from(p));
    const INSIDE: [&str; 5] = ["/etc", "/proc", "/sys", "/dev", "/boot"];
    if INSIDE.iter().any(|p| root.starts_with(canon(p))) {
        return Some("a system folder");
    }
    const EXACT: [&str; 17] = [
        "/root", "/home", "/Users", "/usr", "/var", "/opt", "/srv", "/tmp", "/mnt", "/media", "/run", "/bin", "/sbin",
        "/lib", "/lib64", "/System", "/Library",
    ];
    if EXACT.iter().any(|p| root == canon(p)) {
        return Some("a system folder");
    }
    None
}

/// The Host names answered: the listening address (an IP literal; any IP literal when it
/// listens on all addresses), `localhost` on a loopback or unspecified address, and those given
/// with `--allow-host`. Ports are not compared (a forwarded port keeps working): DNS rebinding
/// needs a name, and names are what is checked. An `Origin` must be `http://` + that request's
/// own `Host`, port and all.
struct Hosts {
    names: Vec<String>,
    any_ip: bool,
}

impl Hosts {
    fn new(local: SocketAddr, extra: &[String]) -> Self {
        let ip = local.ip();
        let mut names = vec![ip.to_string()];
        if ip.is_loopback() || ip.is_unspecified() {
            names.push("localhost".into());
        }
        names.extend(extra.iter().map(|h| host_name(h)));
        Hosts {
            names,
            any_ip: ip.is_unspecified(),
        }
    }

    fn allows(&self, host: &str) -> bool {
        let name = host_name(host);
        self.names.contains(&name) || (self.any_ip && name.parse::<IpAddr>().is_ok())
    }

    /// The refusal of a request from a host or a page not allowed.
    fn check(&self, headers: &HeaderMap) -> std::result::Result<(), Reply> {
        let host = headers.get(HOST).and_then(|h| h.to_str().ok());
        let host = match host {
            Some(h) if self.allows(h) => h.trim(),
            Some(h) => {
                return Err(error(
                    421,
                    format!("this server does not answer for the host {h:?} (see --allow-host)"),
                ))
            }
            None => return Err(error(400, "the request has no Host header")),
        };
        // Same origin only: `http://` and the very host[:port] the request was sent to (so with
        // --addr 0.0.0.0, a page at another IP is refused though that IP would pass as a Host).
        for origin in headers.get_all(ORIGIN) {
            let ok = origin
                .to_str()
                .ok()
                .and_then(|o| o.strip_prefix("http://"))
                .is_some_and(|o| o.eq_ignore_ascii_case(host));
            if !ok {
                return Err(error(
                    403,
                    format!("requests from pages of other sites are refused (Origin {origin:?})"),
                ));
            }
        }
        Ok(())
    }
}

/// A Host (or `--allow-host`) value's name: lower case, without the port, the brackets of an
/// IPv6 literal or a final dot.
fn host_name(host: &str) -> String {
    let host = host.trim();
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl App {
    /// The answer to one request, and the image budget its body holds until it is sent.
    async fn reply(&self, req: Request<Incoming>) -> (u16, &'static str, Vec<u8>, Option<OwnedSemaphorePermit>) {
        let ((status, ctype, body), budget) = self.route(req).await;
        (status, ctype, body, budget)
    }

    async fn route(&self, req: Request<Incoming>) -> (Reply, Option<OwnedSemaphorePermit>) {
        if let Err(refused) = self.hosts.check(req.headers()) {
            return (refused, None);
        }
        let path = req.uri().path().to_string();
        let params: HashMap<String, String> = form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
        let what = format!("{} {path}", req.method());
        let reply = match (req.method().clone(), path.as_str()) {
            (Method::GET, "/") | (Method::GET, "/index.html") => {
                (200, "text/html; charset=utf-8", PAGE.as_bytes().to_vec())
            }
            (Method::GET, "/api/search") => self.compute(what, move |s| search_text(s, &params)).await,
            (Method::POST, "/api/image") => self.upload(req, what, params).await,
            (Method::GET, "/api/info") => json_reply(
                200,
                &json!({"images": self.state.index.len(), "captions": self.state.texts.len(), "max_top": MAX_TOP,
                        "max_query_chars": MAX_QUERY_CHARS, "max_upload_bytes": MAX_UPLOAD}),
            ),
            (Method::GET, p) if p.starts_with("/images/") => {
                let rel = p["/images/".len()..].to_string();
                let (state, budget) = (self.state.clone(), self.images.clone());
                let read = tokio::task::spawn_blocking(move || {
                    let mut held = None;
                    let reply = guarded(&what, || serve_image(&state, &rel, &budget, &mut held));
                    (reply, held)
                });
                return read.await.unwrap_or_else(|_| (internal_error(), None));
            }
            (_, "/api/search" | "/api/image" | "/") => error(405, "method not allowed"),
            _ => error(404, "not found"),
        };
        (reply, None)
    }

    /// `POST /api/image`: the upload's declared length (all of [`MAX_UPLOAD`] when it declares
    /// none) is taken from the upload budget before it is read, and held until the model is done
    /// with it; when the budget is spent, 503 at once.
    async fn upload(&self, req: Request<Incoming>, what: String, params: HashMap<String, String>) -> Reply {
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_UPLOAD as u64) {
            return too_big();
        }
        let mib = mib(declared.unwrap_or(MAX_UPLOAD as u64));
        let Ok(permit) = self.uploads.clone().try_acquire_many_owned(mib) else {
            return error(
                503,
                format!("the server is reading {UPLOAD_BUDGET_MIB} MiB of uploads already: try again shortly"),
            );
        };
        match read_body(req, declared).await {
            Ok(body) => {
                self.compute(what, move |s| {
                    let reply = search_image(s, &params, &body);
                    drop(body);
                    drop(permit);
                    reply
                })
                .await
            }
            Err(r) => r,
        }
    }

    /// Runs `f` on a blocking thread once one of the `--workers` permits is free (held until
    /// `f` returns, even if the client went away).
    async fn compute(&self, what: String, f: impl FnOnce(&State) -> Reply + Send + 'static) -> Reply {
        let Ok(permit) = self.workers.clone().acquire_owned().await else {
            return internal_error();
        };
        self.blocking(what, move |s| {
            let reply = f(s);
            drop(permit);
            reply
        })
        .await
    }

    /// Runs `f` on a blocking thread, a panic in it answered 500.
    async fn blocking(&self, what: String, f: impl FnOnce(&State) -> Reply + Send + 'static) -> Reply {
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || guarded(&what, || f(&state)))
            .await
            .unwrap_or_else(|_| internal_error())
    }
}

/// Whole MiB holding `bytes` (at least one): the unit of the upload and image budgets.
fn mib(bytes: u64) -> u32 {
    bytes.div_ceil(1 << 20).clamp(1, u32::MAX as u64) as u32
}

fn too_big() -> Reply {
    error(413, format!("the image is larger than {} MiB", MAX_UPLOAD >> 20))
}

/// The request body, refused (413) beyond [`MAX_UPLOAD`], and (408) when it has not all arrived
/// within [`BODY_TIMEOUT`]; read into one buffer of its declared length.
async fn read_body(req: Request<Incoming>, declared: Option<u64>) -> std::result::Result<Vec<u8>, Reply> {
    let mut body = Limited::new(req.into_body(), MAX_UPLOAD);
    let mut bytes = Vec::with_capacity(declared.unwrap_or(0).min(MAX_UPLOAD as u64) as usize);
    let read = async {
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                bytes.extend_from_slice(&data);
            }
        }
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    };
    match tokio::time::timeout(BODY_TIMEOUT, read).await {
        Ok(Ok(())) => Ok(bytes),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_big()),
        Ok(Err(e)) => Err(error(400, format!("reading the upload: {e}"))),
        Err(_) => Err(error(
            408,
            format!("the upload did not arrive within {} s", BODY_TIMEOUT.as_secs()),
        )),
    }
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
/// `..`, absolute paths and unindexed files never reach the file system), must resolve inside
/// the indexed folder (so a link in it cannot lead elsewhere), must be a regular file and must
/// be an image by its first bytes (its content type is the format found there, not its name's).
/// Its size is taken from the image budget (held in `held` until it is sent); 503 when spent.
fn serve_image(state: &State, raw: &str, budget: &Arc<Semaphore>, held: &mut Option<OwnedSemaphorePermit>) -> Reply {
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
    let real = match state.root.join(p).canonicalize() {
        Ok(real) if real.starts_with(&state.root) => real,
        Ok(_) => return error(403, "the indexed path leads outside the indexed folder"),
        Err(_) => return error(404, "the indexed image is gone"),
    };
    // Only the very file that was indexed: its size, modification time (to the nanosecond) and
    // inode as the index recorded them. A manifest written by someone else cannot know those of
    // this machine's files, so an index pointed at another folder serves nothing from it.
    match clip_core::index::stat_entry(&real, &rel) {
        Ok(now) if state.index.entries[i].unchanged(&now) => {}
        Ok(_) => {
            return error(
                404,
                "this file is not the one the index holds (changed since it was indexed, or the index was not made of this folder): run `clip-predict index` again",
            )
        }
        Err(_) => return error(404, "the indexed image is gone"),
    }
    // Not a device, a FIFO or a folder: those are never opened.
    let len = match std::fs::metadata(&real) {
        Ok(m) if m.is_file() && m.len() <= MAX_IMAGE_BYTES => m.len(),
        Ok(m) if m.is_file() => return error(403, "the indexed file is too large to serve"),
        Ok(_) => return error(403, "the indexed path is not an image file"),
        Err(_) => return error(404, "the indexed image is gone"),
    };
    match budget.clone().try_acquire_many_owned(mib(len)) {
        Ok(permit) => *held = Some(permit),
        Err(_) => {
            return error(
                503,
                format!("the server is sending {IMAGE_BUDGET_MIB} MiB of images already: try again shortly"),
            )
        }
    }
    let read = || -> std::io::Result<Option<(&'static str, Vec<u8>)>> {
        // No more than was measured (and taken from the budget), should the file grow.
        let mut file = std::fs::File::open(&real)?.take(len);
        let mut bytes = Vec::with_capacity(len as usize);
        (&mut file).take(64).read_to_end(&mut bytes)?;
        let Some(ctype) = image_type(&bytes) else {
            return Ok(None);
        };
        file.read_to_end(&mut bytes)?;
        Ok(Some((ctype, bytes)))
    };
    match read() {
        Ok(Some((ctype, bytes))) => (200, ctype, bytes),
        Ok(None) => error(403, "the indexed file is not an image"),
        Err(_) => error(404, "the indexed image cannot be read"),
    }
}

/// The content type of an image a browser shows, from the file's first bytes; `None` for
/// anything else.
fn image_type(head: &[u8]) -> Option<&'static str> {
    use image::ImageFormat as F;
    match image::guess_format(head).ok()? {
        f @ (F::Jpeg | F::Png | F::WebP | F::Gif | F::Bmp) => Some(f.to_mime_type()),
        _ => None,
    }
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

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn only_the_listening_address_and_allowed_names_are_answered() {
        let local: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let hosts = Hosts::new(local, &["photos.lan:9000".into(), "Box.Local".into()]);
        for ok in [
            "127.0.0.1",
            "127.0.0.1:8080",
            "127.0.0.1:9999",
            "localhost",
            "LOCALHOST:8080",
            "photos.lan",
            "box.local.",
            "box.local:1",
        ] {
            assert!(hosts.check(&headers(&[("host", ok)])).is_ok(), "{ok}");
        }
        for bad in [
            "evil.attacker.example",
            "evil.attacker.example:8080",
            "127.0.0.2",
            "localhost.evil.example",
            "[::1]",
            "",
        ] {
            assert_eq!(hosts.check(&headers(&[("host", bad)])).unwrap_err().0, 421, "{bad}");
        }
        assert_eq!(hosts.check(&HeaderMap::new()).unwrap_err().0, 400);
        // The page's own origin (http, an allowed host) is answered; any other is refused.
        assert!(hosts
            .check(&headers(&[
                ("host", "127.0.0.1:8080"),
                ("origin", "http://127.0.0.1:8080")
            ]))
            .is_ok());
        assert!(hosts
            .check(&headers(&[
                ("host", "localhost:8080"),
                ("origin", "http://localhost:8080")
            ]))
            .is_ok());
        for origin in [
            "http://evil.attacker.example",
            "https://127.0.0.1:8080",
            "null",
            "http://127.0.0.1:8080/x",
            "file://",
        ] {
            let h = headers(&[("host", "127.0.0.1:8080"), ("origin", origin)]);
            assert_eq!(hosts.check(&h).unwrap_err().0, 403, "{origin}");
        }
        // IPv6, and all addresses: any IP literal and localhost, never a name.
        let v6 = Hosts::new("[::1]:80".parse().unwrap(), &[]);
        assert!(v6.allows("[::1]:80") && v6.allows("[::1]") && v6.allows("localhost") && !v6.allows("127.0.0.1"));
        let all = Hosts::new("0.0.0.0:80".parse().unwrap(), &[]);
        assert!(all.allows("192.0.2.7:80") && all.allows("localhost") && !all.allows("evil.attacker.example"));
        let lan = Hosts::new("192.0.2.7:80".parse().unwrap(), &[]);
        assert!(lan.allows("192.0.2.7") && !lan.allows("localhost"));
    }

    #[test]
    fn an_origin_must_be_the_request_s_own_host_even_on_all_addresses() {
        let all = Hosts::new("0.0.0.0:8080".parse().unwrap(), &[]);
        // Any IP literal passes as a Host on 0.0.0.0, but a page at another IP cannot post.
        for (host, origin) in [
            ("192.0.2.7:8080", "http://203.0.113.9"),
            ("192.0.2.7:8080", "http://203.0.113.9:8080"),
            ("192.0.2.7:8080", "http://192.0.2.7:9999"),
            ("192.0.2.7:8080", "http://192.0.2.7"),
            ("192.0.2.7:8080", "https://192.0.2.7:8080"),
            ("localhost:8080", "http://127.0.0.1:8080"),
            ("192.0.2.7:8080", "http://192.0.2.7:8080/"),
        ] {
            let h = headers(&[("host", host), ("origin", origin)]);
            assert_eq!(all.check(&h).unwrap_err().0, 403, "{host} {origin}");
        }
        for (host, origin) in [
            ("192.0.2.7:8080", "http://192.0.2.7:8080"),
            ("localhost:8080", "http://LocalHost:8080"),
            ("[::1]:8080", "http://[::1]:8080"),
            ("192.0.2.7", "http://192.0.2.7"),
        ] {
            let h = headers(&[("host", host), ("origin", origin)]);
            assert!(all.check(&h).is_ok(), "{host} {origin}");
        }
        // Two Origins: each must match.
        let h = headers(&[
            ("host", "192.0.2.7:8080"),
            ("origin", "http://192.0.2.7:8080"),
            ("origin", "http://203.0.113.9"),
        ]);
        assert_eq!(all.check(&h).unwrap_err().0, 403);
    }

    #[test]
    fn the_connection_bound_stays_below_the_open_file_limit() {
        assert_eq!(connection_bound(None), MAX_CONNECTIONS);
        assert_eq!(connection_bound(Some(1 << 20)), MAX_CONNECTIONS);
        assert_eq!(connection_bound(Some(1024)), 768);
        assert_eq!(connection_bound(Some(256)), 192);
        assert_eq!(connection_bound(Some(4)), 8);
        for n in [64, 256, 1000, 4096, 4352, 65536] {
            let b = connection_bound(Some(n)) as u64;
            assert!(b < n && b <= MAX_CONNECTIONS as u64, "{n}: {b}");
        }
    }

    #[test]
    fn at_the_bound_the_connection_idle_longest_is_closed_never_one_with_a_request() {
        let c = Arc::new(Connections::new(3));
        let (a, mut a_closed, _) = c.admit().unwrap();
        let (b, mut b_closed, _) = c.admit().unwrap();
        let (d, mut d_closed, made_room) = c.admit().unwrap();
        assert!(!made_room);
        // `a` has a request in flight: `b`, idle longest of the others, makes room.
        let busy_a = c.busy(a);
        let (e, _e_closed, made_room) = c.admit().unwrap();
        assert!(made_room);
        assert_eq!(c.ids(), vec![a, d, e]);
        assert!(!c.ids().contains(&b));
        assert!(b_closed.try_recv().is_ok());
        assert!(a_closed.try_recv().is_err() && d_closed.try_recv().is_err());
        // `d` is served a request and kept alive: now `e` is idle longest.
        drop(c.busy(d));
        let (f, _f_closed, _) = c.admit().unwrap();
        assert_eq!(c.ids(), vec![a, d, f]);
        // Every connection busy: the new one is refused, none is closed.
        let (_busy_d, _busy_f) = (c.busy(d), c.busy(f));
        assert!(c.admit().is_none());
        assert_eq!(c.ids(), vec![a, d, f]);
        assert!(a_closed.try_recv().is_err() && d_closed.try_recv().is_err());
        // `a`'s request answered: it can make room again.
        drop(busy_a);
        let (g, _, _) = c.admit().unwrap();
        assert_eq!(c.ids(), vec![d, f, g]);
        assert!(a_closed.try_recv().is_ok());
        // A connection whose task ended leaves the table.
        Registered(c.clone(), g);
        assert_eq!(c.ids(), vec![d, f]);
    }

    #[test]
    fn broad_folders_are_refused_unless_named() {
        let home = Path::new("/home/ann");
        for (p, broad) in [
            ("/", true),
            ("/home", true),
            ("/home/ann", true),
            ("/etc", true),
            ("/etc/ssl", true),
            ("/proc/self", true),
            ("/usr", true),
            ("/home/ann/photos", false),
            ("/usr/share/backgrounds", false),
        ] {
            assert_eq!(too_broad(Path::new(p), Some(home)).is_some(), broad, "{p}");
        }
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let other = tempfile::tempdir().unwrap();
        assert!(check_root(&root, None, Path::new("idx")).is_ok());
        assert!(check_root(&root, Some(tmp.path()), Path::new("idx")).is_ok());
        let err = check_root(&root, Some(other.path()), Path::new("idx"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not the folder the index"), "{err}");
        let err = check_root(Path::new("/"), None, Path::new("idx"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--images /") && err.contains("root of the file system"),
            "{err}"
        );
        assert!(check_root(Path::new("/"), Some(Path::new("/")), Path::new("idx")).is_ok());
    }

    #[test]
    fn served_files_are_images_by_their_bytes() {
        assert_eq!(image_type(b"\xff\xd8\xff\xe0\0\x10JFIF"), Some("image/jpeg"));
        assert_eq!(image_type(b"\x89PNG\r\n\x1a\n\0\0"), Some("image/png"));
        assert_eq!(image_type(b"root:x:0:0:root:/root:/bin/bash\n"), None);
        assert_eq!(image_type(b""), None);
    }
}
