//! The HTTP listener for operations: `GET /metrics` (every metric of the
//! broker, OpenMetrics text), `GET /healthz` (the process is up) and
//! `GET /readyz` (the data directory is open and takes writes: 503 while
//! the broker stops or once a failed sync made a topic read-only). HTTP/1.1
//! only; it reads nothing but the request line and headers, serves at most
//! 64 connections at once, closes one that takes no byte of a response
//! for 10 s, and stops with the server.

use crate::broker::Broker;
use crate::server::deadline::StallGuard;
use crate::server::stopping;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Default address of `spool serve --metrics`.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9411";
/// Longest a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a response may wait for the client to take a byte of it.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; one more is closed at once (scrapers and
/// probes need a few; each holds a descriptor).
const MAX_CONNECTIONS: usize = 64;
const TEXT: &str = "text/plain; charset=utf-8";

/// Serves `listener` until `shutdown` turns true; connections still open
/// then are closed.
pub async fn serve(listener: TcpListener, broker: Broker, mut shutdown: watch::Receiver<bool>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            (stream, peer) = crate::server::accept(&listener, "metrics", &broker) => {
                // Connections that ended count no more.
                while connections.try_join_next().is_some() {}
                if connections.len() >= MAX_CONNECTIONS {
                    tracing::debug!(%peer, "metrics connection refused: {MAX_CONNECTIONS} open");
                    continue;
                }
                let broker = broker.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let broker = broker.clone();
                        async move { Ok::<_, Infallible>(answer(&broker, request).await) }
                    });
                    let served = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(HEADER_TIMEOUT)
                        .serve_connection(
                            TokioIo::new(StallGuard::new(stream, Some(WRITE_TIMEOUT))),
                            service,
                        )
                        .await;
                    if let Err(e) = served {
                        tracing::debug!(%peer, error = %e, "metrics connection ended");
                    }
                });
            }
            () = stopping(&mut shutdown) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.shutdown().await;
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

async fn answer(broker: &Broker, request: Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "use GET\n");
    }
    match request.uri().path() {
        "/metrics" => match broker.encode_metrics().await {
            Ok(text) => reply(StatusCode::OK, crate::metrics::CONTENT_TYPE, text),
            Err(e) => {
                tracing::error!(error = %e, "collecting metrics");
                reply(StatusCode::INTERNAL_SERVER_ERROR, TEXT, format!("{e}\n"))
            }
        },
        "/healthz" => reply(StatusCode::OK, TEXT, "ok\n"),
        "/readyz" => match broker.readiness().await {
            Ok(()) => reply(StatusCode::OK, TEXT, "ready\n"),
            Err(why) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                format!("not ready: {why}\n"),
            ),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: spool serves /metrics, /healthz and /readyz\n",
        ),
    }
}
