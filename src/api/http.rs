//! The HTTP/JSON API on a unix socket (axum), and the Prometheus endpoint.
//!
//! Every handler runs the [`Manager`] call on a blocking thread: attaching opens files and
//! starts threads, and detaching drains requests. Errors are JSON `{"error": "..."}` with
//! a 4xx status for anything the caller can fix.

use std::path::Path;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use super::{ApiError, Attach, CreateVolume, Manager};
use crate::server::SocketAccess;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(serde_json::json!({ "error": self.message }))).into_response()
    }
}

fn rejected(r: JsonRejection) -> ApiError {
    ApiError::new(400, format!("bad request body: {}", r.body_text()))
}

type Reply = Result<Response, ApiError>;

async fn blocking<T: serde::Serialize + Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
    created: bool,
) -> Reply {
    let v = tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(500, format!("handler failed: {e}")))??;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(v)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Resize {
    size: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddImage {
    /// A directory on the daemon's host with `manifest.json`, the module and, if signed,
    /// `manifest.sig`.
    path: std::path::PathBuf,
}

/// The routes (see `docs/api.md`).
pub fn router(m: Arc<Manager>) -> Router {
    Router::new()
        .route(
            "/v1/volumes",
            get(|State(m): State<Arc<Manager>>| async move { blocking(move || Ok(m.volumes()), false).await })
                .post(
                    |State(m): State<Arc<Manager>>, body: Result<Json<CreateVolume>, JsonRejection>| async move {
                        let Json(req) = body.map_err(rejected)?;
                        blocking(move || m.create_volume(req), true).await
                    },
                ),
        )
        .route(
            "/v1/volumes/{name}",
            axum::routing::delete(
                |State(m): State<Arc<Manager>>, UrlPath(name): UrlPath<String>| async move {
                    blocking(move || m.delete_volume(&name).map(|()| serde_json::json!({})), false).await
                },
            ),
        )
        .route(
            "/v1/volumes/{name}/resize",
            post(
                |State(m): State<Arc<Manager>>,
                 UrlPath(name): UrlPath<String>,
                 body: Result<Json<Resize>, JsonRejection>| async move {
                    let Json(req) = body.map_err(rejected)?;
                    blocking(move || m.resize_volume(&name, &req.size), false).await
                },
            ),
        )
        .route(
            "/v1/attachments",
            get(|State(m): State<Arc<Manager>>| async move { blocking(move || Ok(m.attachments()), false).await })
                .post(
                    |State(m): State<Arc<Manager>>, body: Result<Json<Attach>, JsonRejection>| async move {
                        let Json(req) = body.map_err(rejected)?;
                        blocking(move || m.attach(req), true).await
                    },
                ),
        )
        .route(
            "/v1/attachments/{id}",
            axum::routing::delete(
                |State(m): State<Arc<Manager>>, UrlPath(id): UrlPath<String>| async move {
                    blocking(move || m.detach(&id).map(|()| serde_json::json!({})), false).await
                },
            ),
        )
        .route(
            "/v1/attachments/{id}/upgrade",
            post(
                |State(m): State<Arc<Manager>>, UrlPath(id): UrlPath<String>| async move {
                    blocking(move || m.upgrade(&id), false).await
                },
            ),
        )
        .route(
            "/v1/images",
            get(|State(m): State<Arc<Manager>>| async move { blocking(move || Ok(m.images()), false).await })
                .post(
                    |State(m): State<Arc<Manager>>, body: Result<Json<AddImage>, JsonRejection>| async move {
                        let Json(req) = body.map_err(rejected)?;
                        blocking(move || m.add_image(&req.path), true).await
                    },
                ),
        )
        .route(
            "/v1/images/{name}/{version}",
            axum::routing::delete(
                |State(m): State<Arc<Manager>>, UrlPath((name, version)): UrlPath<(String, String)>| async move {
                    blocking(move || m.remove_image(&name, &version).map(|()| serde_json::json!({})), false).await
                },
            ),
        )
        .route(
            "/v1/stats",
            get(|State(m): State<Arc<Manager>>| async move { blocking(move || m.stats(None), false).await }),
        )
        .route(
            "/v1/stats/{id}",
            get(
                |State(m): State<Arc<Manager>>, UrlPath(id): UrlPath<String>| async move {
                    blocking(move || m.stats(Some(&id)), false).await
                },
            ),
        )
        .route(
            "/metrics",
            get(|State(m): State<Arc<Manager>>| async move { metrics_response(&m) }),
        )
        .fallback(|| async { ApiError::new(404, "no such endpoint (see docs/api.md)") })
        .with_state(m)
}

fn metrics_response(m: &Manager) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics_text(m),
    )
        .into_response()
}

/// The Prometheus exposition of every disk.
pub fn metrics_text(m: &Manager) -> String {
    let disks = m.disks();
    let views: Vec<crate::metrics::DiskView<'_>> = disks
        .iter()
        .map(|(labels, d)| crate::metrics::DiskView {
            labels: labels.clone(),
            counters: d.stats.totals(),
            metrics: &d.metrics,
        })
        .collect();
    crate::metrics::encode(&views)
}

/// Serves the API on a unix socket at `path` (mode and owner from `access`) and, with
/// `metrics`, Prometheus on a TCP address, in a thread of their own.
pub fn spawn(
    m: Arc<Manager>,
    path: &Path,
    access: SocketAccess,
    metrics: Option<std::net::TcpListener>,
) -> Result<std::thread::JoinHandle<()>, String> {
    if let Some(l) = &metrics {
        l.set_nonblocking(true).map_err(|e| e.to_string())?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .thread_name("api")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the API runtime: {e}"))?;
    let std_listener =
        crate::server::listen_unix(path, access).map_err(|e| crate::api::chain(&e))?;
    // Published: a failure from here on removes the socket again.
    let unpublish = |e: String| {
        let _ = std::fs::remove_file(path);
        e
    };
    std_listener
        .set_nonblocking(true)
        .map_err(|e| unpublish(e.to_string()))?;
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            rt.block_on(async move {
                let listener = match tokio::net::UnixListener::from_std(std_listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!("API socket: {e}");
                        return;
                    }
                };
                if let Some(l) = metrics {
                    let mm = Arc::clone(&m);
                    let app = Router::new().route(
                        "/metrics",
                        get(move || {
                            let mm = Arc::clone(&mm);
                            async move { metrics_response(&mm) }
                        }),
                    );
                    match tokio::net::TcpListener::from_std(l) {
                        Ok(l) => {
                            tokio::spawn(async move {
                                if let Err(e) = axum::serve(l, app).await {
                                    tracing::error!("metrics endpoint: {e}");
                                }
                            });
                        }
                        Err(e) => tracing::error!("metrics endpoint: {e}"),
                    }
                }
                if let Err(e) = axum::serve(listener, router(m)).await {
                    tracing::error!("API server: {e}");
                }
            })
        })
        .map_err(|e| unpublish(format!("cannot start the API thread: {e}")))
}
