//! The HTTP endpoints on `listen`: `/healthz` (the process is alive), `/readyz` (the last
//! reconcile succeeded and the peers are reachable) and `/metrics` (Prometheus text format).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::Metrics;

/// What the endpoints read; written by the daemon loop.
pub struct Shared {
    pub metrics: Metrics,
    /// `None` when ready, else why not.
    pub not_ready: Mutex<Option<String>>,
    /// `None` when the order queue (if any) is consumed, else why not.
    pub queue_problem: Mutex<Option<String>>,
    /// Asks the daemon loop for a pass soon (the queue rejected a message whose orderer is to
    /// be told; no file in the order directory changed).
    pub pass_wanted: tokio::sync::Notify,
}

impl Shared {
    pub fn new() -> Shared {
        Shared {
            metrics: Metrics::new(),
            not_ready: Mutex::new(Some("starting: no reconcile yet".to_string())),
            queue_problem: Mutex::new(None),
            pass_wanted: tokio::sync::Notify::new(),
        }
    }

    pub fn set_ready(&self, why_not: Option<String>) {
        if let Ok(mut guard) = self.not_ready.lock() {
            *guard = why_not;
        }
        self.metrics.set_ready(self.why_not_ready().is_none());
    }

    pub fn set_queue_problem(&self, why: Option<String>) {
        self.metrics.set_queue_connected(why.is_none());
        if let Ok(mut guard) = self.queue_problem.lock() {
            *guard = why;
        }
        self.metrics.set_ready(self.why_not_ready().is_none());
    }

    /// Why the daemon is not ready (the last pass, or the order queue), or `None`.
    pub fn why_not_ready(&self) -> Option<String> {
        let read = |m: &Mutex<Option<String>>| {
            m.lock()
                .map(|g| g.clone())
                .unwrap_or_else(|_| Some("state unavailable".to_string()))
        };
        match (read(&self.not_ready), read(&self.queue_problem)) {
            (None, None) => None,
            (Some(a), None) | (None, Some(a)) => Some(a),
            (Some(a), Some(b)) => Some(format!("{a}; {b}")),
        }
    }
}

impl Default for Shared {
    fn default() -> Self {
        Shared::new()
    }
}

/// Binds `addr` and serves until the task is dropped. Binding errors are returned at once.
pub async fn bind(
    addr: SocketAddr,
    shared: Arc<Shared>,
) -> std::io::Result<impl std::future::Future<Output = std::io::Result<()>>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(shared);
    Ok(async move { axum::serve(listener, app).await })
}

async fn readyz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    match shared.why_not_ready() {
        None => (StatusCode::OK, "ready\n".to_string()),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        shared.metrics.encode(),
    )
}
