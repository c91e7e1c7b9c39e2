//! The admin API, on its own listener (loopback by default) and only when a token is
//! configured. Every call needs `Authorization: Bearer <admin.token>`; anything else gets
//! 401 and changes nothing.
//!
//! - `GET /admin/snapshots`: the active version, the stored snapshots and recent rejections;
//! - `POST /admin/snapshots[?activate=if_newer|always|never]`: a snapshot document as the
//!   body, through the same validation as every other source (201 stored, 200 already
//!   stored, 422 rejected with the reason);
//! - `POST /admin/snapshots/{version}/activate`: make a stored version active — a rollback
//!   or a pin (200, 404 unknown, 422 refused).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::control::recluster::{Cause, ReclusterOutcome, Reclusterer};
use crate::control::registry::{Activation, Origin, Registry, Rejection};
use crate::domain::section::Section;

/// Largest snapshot document accepted, in bytes.
const MAX_SNAPSHOT_BYTES: usize = 64 << 20;

/// Admin API settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address to listen on. Loopback by default.
    pub listen: SocketAddr,
    /// Bearer token every call must carry. Empty: the admin API is off.
    pub token: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9465)),
            token: String::new(),
        }
    }
}

impl Section for AdminConfig {
    const KEY: &'static str = "admin";

    fn problems(&self) -> Result<(), String> {
        if !self.token.is_empty() && self.token.len() < 16 {
            return Err(
                "token must be at least 16 characters (or empty to turn the admin API off)".into(),
            );
        }
        Ok(())
    }
}

struct Admin {
    token: String,
    registry: Arc<Registry>,
    reclusterer: Option<Arc<Reclusterer>>,
}

/// The admin router, for the server and for tests.
pub fn router(
    token: String,
    registry: Arc<Registry>,
    reclusterer: Option<Arc<Reclusterer>>,
) -> Router {
    Router::new()
        .route("/admin/snapshots", get(list).post(offer))
        .route("/admin/snapshots/{version}/activate", post(activate))
        .route("/admin/recluster", post(recluster))
        .layer(DefaultBodyLimit::max(MAX_SNAPSHOT_BYTES))
        .with_state(Arc::new(Admin {
            token,
            registry,
            reclusterer,
        }))
}

/// Serves the admin API on a bound listener until `shutdown` is cancelled.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    token: String,
    registry: Arc<Registry>,
    reclusterer: Arc<Reclusterer>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(token, registry, Some(reclusterer)))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Compares the presented token with the configured one in time independent of where they
/// differ.
fn authorised(admin: &Admin, headers: &HeaderMap) -> bool {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let (a, b) = (presented.as_bytes(), admin.token.as_bytes());
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0));
    }
    !admin.token.is_empty() && diff == 0
}

fn unauthorised() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "missing or wrong bearer token\n",
    )
        .into_response()
}

fn refused(error: &Rejection) -> Response {
    let status = match error {
        Rejection::Unknown(_) => StatusCode::NOT_FOUND,
        Rejection::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    };
    (
        status,
        Json(serde_json::json!({ "error": error.to_string() })),
    )
        .into_response()
}

async fn list(State(admin): State<Arc<Admin>>, headers: HeaderMap) -> Response {
    if !authorised(&admin, &headers) {
        return unauthorised();
    }
    Json(admin.registry.listing()).into_response()
}

#[derive(Deserialize)]
struct OfferQuery {
    activate: Option<String>,
}

async fn offer(
    State(admin): State<Arc<Admin>>,
    headers: HeaderMap,
    Query(query): Query<OfferQuery>,
    body: Bytes,
) -> Response {
    if !authorised(&admin, &headers) {
        return unauthorised();
    }
    let activation = match query.activate.as_deref() {
        None | Some("if_newer") => Activation::IfNewer,
        Some("always") => Activation::Always,
        Some("never") => Activation::Never,
        Some(other) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("activate={other:?}: expected if_newer, always or never\n"),
            )
                .into_response()
        }
    };
    let registry = admin.registry.clone();
    let result =
        tokio::task::spawn_blocking(move || registry.offer(&body, Origin::Http, activation)).await;
    match result {
        Ok(Ok(outcome)) => {
            let status = match outcome {
                crate::control::registry::Outcome::Unchanged(_) => StatusCode::OK,
                _ => StatusCode::CREATED,
            };
            (status, Json(outcome)).into_response()
        }
        Ok(Err(e)) => refused(&e),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn activate(
    State(admin): State<Arc<Admin>>,
    headers: HeaderMap,
    Path(version): Path<u64>,
) -> Response {
    if !authorised(&admin, &headers) {
        return unauthorised();
    }
    let registry = admin.registry.clone();
    match tokio::task::spawn_blocking(move || registry.activate(version)).await {
        Ok(Ok(())) => Json(serde_json::json!({ "active": version })).into_response(),
        Ok(Err(e)) => refused(&e),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Runs a re-clustering now and answers with its outcome (409 while one is running).
async fn recluster(State(admin): State<Arc<Admin>>, headers: HeaderMap) -> Response {
    if !authorised(&admin, &headers) {
        return unauthorised();
    }
    let Some(reclusterer) = admin.reclusterer.clone() else {
        return (
            StatusCode::NOT_IMPLEMENTED,
            "re-clustering is not available here\n",
        )
            .into_response();
    };
    let cause = Cause {
        reason: "manual".into(),
        readings: Vec::new(),
    };
    match tokio::task::spawn_blocking(move || reclusterer.run(&cause)).await {
        Ok(None) => (StatusCode::CONFLICT, "a re-clustering is already running\n").into_response(),
        Ok(Some(Ok(ReclusterOutcome::Accepted(outcome)))) => {
            (StatusCode::CREATED, Json(outcome)).into_response()
        }
        Ok(Some(Ok(ReclusterOutcome::Rejected { version, reasons }))) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(serde_json::json!({ "rejected": version, "reasons": reasons })),
        )
            .into_response(),
        Ok(Some(Err(e))) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(serde_json::json!({ "error": format!("{e:#}") })),
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::registry::tests::versioned;
    use crate::telemetry::metrics::Metrics;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn call(
        app: &Router,
        method: &str,
        uri: &str,
        token: Option<&str>,
        body: Vec<u8>,
    ) -> (StatusCode, String) {
        let mut request = Request::builder().method(method).uri(uri);
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let response = app
            .clone()
            .oneshot(request.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    #[tokio::test]
    async fn offers_rollbacks_and_refusals_over_http() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::open(
            dir.path(),
            5,
            versioned(1).validate().unwrap(),
            Arc::new(Metrics::new().unwrap()),
        )
        .unwrap();
        let app = router("s3cret".into(), registry.clone(), None);
        let v2 = serde_json::to_vec(&versioned(2)).unwrap();

        // Unauthenticated or wrong token: 401, nothing changes.
        for token in [None, Some("wrong"), Some("")] {
            let (status, _) = call(&app, "POST", "/admin/snapshots", token, v2.clone()).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED);
            let (status, _) =
                call(&app, "POST", "/admin/snapshots/1/activate", token, vec![]).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED);
        }
        assert_eq!(registry.active_version(), 1);
        assert_eq!(registry.listing().snapshots.len(), 1);

        let (status, body) =
            call(&app, "POST", "/admin/snapshots", Some("s3cret"), v2.clone()).await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::CREATED, r#"{"result":"activated","version":2}"#)
        );
        let (status, _) = call(&app, "POST", "/admin/snapshots", Some("s3cret"), v2).await;
        assert_eq!(status, StatusCode::OK);
        // Corrupt, truncated and mismatched documents: 422 each, v2 keeps serving.
        let truncated = serde_json::to_vec(&versioned(5)).unwrap();
        let mut mismatched = versioned(6);
        mismatched.axes[0].scaler.std.pop();
        for bad in [
            b"{}".to_vec(),
            truncated[..truncated.len() - 10].to_vec(),
            serde_json::to_vec(&mismatched).unwrap(),
        ] {
            let (status, body) = call(&app, "POST", "/admin/snapshots", Some("s3cret"), bad).await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
            assert_eq!(registry.active_version(), 2);
        }

        let (status, _) = call(
            &app,
            "POST",
            "/admin/snapshots/1/activate",
            Some("s3cret"),
            vec![],
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(registry.active_version(), 1);
        let (status, _) = call(
            &app,
            "POST",
            "/admin/snapshots/7/activate",
            Some("s3cret"),
            vec![],
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND);

        let (status, body) = call(&app, "GET", "/admin/snapshots", Some("s3cret"), vec![]).await;
        assert_eq!(status, StatusCode::OK);
        let listing: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(listing["active"], 1);
        assert_eq!(listing["snapshots"].as_array().unwrap().len(), 2);
        assert_eq!(listing["rejected"].as_array().unwrap().len(), 3);
    }
}
