//! The routes: the page, the two searches, the server's limits, and indexed images; uploads read
//! within their budget, and the model run under the `--workers` permits.

use std::collections::HashMap;

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::CONTENT_LENGTH;
use hyper::{Method, Request};
use serde_json::json;
use tokio::sync::OwnedSemaphorePermit;

use super::files::serve_image;
use super::search::{search_image, search_text};
use super::{
    error, guarded, internal_error, json_reply, mib, App, Reply, State, BODY_TIMEOUT, MAX_QUERY_CHARS, MAX_TOP,
    MAX_UPLOAD, UPLOAD_BUDGET_MIB,
};

/// The page (self-contained: it loads nothing else).
const PAGE: &str = include_str!("serve.html");

impl App {
    /// The answer to one request, and the image budget its body holds until it is sent.
    pub(super) async fn reply(
        &self,
        req: Request<Incoming>,
    ) -> (u16, &'static str, Vec<u8>, Option<OwnedSemaphorePermit>) {
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
