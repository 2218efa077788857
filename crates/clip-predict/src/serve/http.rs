//! HTTP/1 over the connections: the accept loop, and answers handed to hyper a piece at a time.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{Context, Result};
use hyper::body::{Body, Bytes, Frame, SizeHint};
use hyper::header::{CONNECTION, CONTENT_TYPE, RETRY_AFTER};
use hyper::Response;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::OwnedSemaphorePermit;

use super::connections::{Busy, Connections, Registered};
use super::{log, App, CHUNK, HEAD_TIMEOUT, MAX_HEAD_BYTES, RETRY_AFTER_SECS};

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
pub(super) async fn accept_loop(
    listener: std::net::TcpListener,
    app: Arc<App>,
    connections: Arc<Connections>,
) -> Result<()> {
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
