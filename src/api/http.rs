//! The daemon's HTTP endpoints, beside the pipeline (never inside it):
//! - `GET /metrics`: Prometheus text format;
//! - `GET /healthz`: 200 while the process serves;
//! - `GET /readyz`: 200 once the consumer loop is running, 503 before and while draining;
//! - `GET /customers/{id}`: one customer's features now and last published memberships, a
//!   point read of the store;
//! - `GET /audiences`: with the score stream on, the audience thresholds in force (revision,
//!   pooled, and every product most-scored first, with its readiness, so products with too
//!   little data are listed with what they lack); `GET /audiences/{product}`: one product.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::domain::aging::{AgingState, META_KEY as AGING_KEY};
use crate::domain::event::CustomerId;
use crate::domain::features::{FeatureVector, FEATURES};
use crate::domain::record::CustomerRecord;
use crate::domain::time::EventTime;
use crate::io::store::{json_meta, StateStore};
use crate::model::assign::SharedSnapshot;

use crate::domain::section::Section;
use crate::pipeline::clock::StreamClock;
use crate::telemetry::metrics::Metrics;

/// HTTP settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address to listen on. Loopback by default: the customer endpoint shows personal data.
    pub listen: SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

impl Section for HttpConfig {
    const KEY: &'static str = "http";

    /// Any socket address serves; binding it is the only check, and it happens at start.
    fn problems(&self) -> Result<(), String> {
        Ok(())
    }
}

/// What the handlers read.
pub struct AppState {
    /// Metrics to export.
    pub metrics: Arc<Metrics>,
    /// The customer store.
    pub store: Arc<dyn StateStore>,
    /// The snapshot in use.
    pub snapshot: SharedSnapshot,
    /// Set while the consumer loop runs.
    pub ready: Arc<AtomicBool>,
    /// Partitions assigned whose state is being restored.
    pub restoring: Arc<std::sync::Mutex<std::collections::BTreeSet<i32>>>,
    /// The score stream's thresholds, when it runs.
    pub audiences: Option<crate::audience::stream::SharedReport>,
    /// The stream clock of every partition consumed.
    pub clock: StreamClock,
}

/// The router, for the server and for tests.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/customers/{id}", get(customer))
        .route("/audiences", get(audiences))
        .route("/audiences/{product}", get(audience))
        .with_state(state)
}

/// Serves on a bound listener until `shutdown` is cancelled.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    if let Ok(listen) = listener.local_addr() {
        tracing::info!(%listen, "http endpoints up");
    }
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    state
        .metrics
        .ready
        .set(i64::from(state.ready.load(Ordering::SeqCst)));
    let stats = state.store.stats();
    state.metrics.store_size_bytes.set(stats.size_bytes as i64);
    state
        .metrics
        .store_estimated_keys
        .set(stats.estimated_keys as i64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let restoring: Vec<String> = state
        .restoring
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(i32::to_string)
        .collect();
    if !state.ready.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    } else if !restoring.is_empty() {
        // Serving (other partitions flow), with some partitions' state still on its way.
        (
            StatusCode::OK,
            format!("ready; restoring partitions {}\n", restoring.join(",")),
        )
            .into_response()
    } else {
        (StatusCode::OK, "ready\n").into_response()
    }
}

fn stream_off() -> Response {
    (
        StatusCode::NOT_FOUND,
        "the score stream is off (audiences.enabled = false)\n",
    )
        .into_response()
}

async fn audiences(State(state): State<Arc<AppState>>) -> Response {
    match &state.audiences {
        Some(report) => Json(report.load_full().as_ref().clone()).into_response(),
        None => stream_off(),
    }
}

async fn audience(State(state): State<Arc<AppState>>, Path(product): Path<String>) -> Response {
    let Some(report) = &state.audiences else {
        return stream_off();
    };
    match report
        .load()
        .products
        .iter()
        .find(|p| p.product_id == product)
    {
        Some(p) => Json(p.clone()).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            "no scores for this product since the stream started (or not yet refreshed)\n",
        )
            .into_response(),
    }
}

#[derive(Serialize)]
struct PartitionClock {
    topic: String,
    partition: i32,
    clock: EventTime,
}

#[derive(Serialize)]
struct CustomerView {
    customer_id: String,
    snapshot_version: u64,
    /// When the customer was last assigned; the features and segments shown are as of then.
    as_of: EventTime,
    /// The stream clock of every partition now.
    clock: Vec<PartitionClock>,
    features: serde_json::Map<String, serde_json::Value>,
    segments: serde_json::Map<String, serde_json::Value>,
    last_published: Option<crate::domain::record::Published>,
}

async fn customer(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    let Ok(id) = CustomerId::parse(&id) else {
        return (StatusCode::BAD_REQUEST, "bad customer id\n").into_response();
    };
    let store = state.store.clone();
    // Stored under their input partition: look in every partition this instance has a
    // clock for (the partitions it owns).
    let mut partitions: Vec<i32> = state
        .clock
        .watermarks()
        .keys()
        .map(|k| k.partition)
        .collect();
    partitions.dedup();
    let keys: Vec<Vec<u8>> = partitions
        .iter()
        .map(|&p| crate::io::store::customer_key(p, id.as_str().as_bytes()))
        .collect();
    let read = tokio::task::spawn_blocking(move || {
        let aging: AgingState = json_meta(store.as_ref(), AGING_KEY)?;
        let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        let found = store
            .get_many(&refs)?
            .into_iter()
            .zip(keys.iter())
            .find_map(|(value, key)| value.map(|v| (key.clone(), v)));
        Ok::<_, crate::io::store::StoreError>((found, aging))
    })
    .await;
    let (found, aging) = match read {
        Ok(Ok(read)) => read,
        Ok(Err(e)) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    };
    let Some((key, bytes)) = found else {
        return (StatusCode::NOT_FOUND, "unknown customer\n").into_response();
    };
    let record = match CustomerRecord::decode(&bytes) {
        Ok(r) => r,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    };
    let loaded = state.snapshot.load_full();
    // As of the customer's last assessment (by an event or by aging), never wall time: what
    // is shown is what the daemon computed (or would, against the snapshot now in use).
    let Some(as_of) = aging.assessed_at(&key, &record) else {
        return (StatusCode::NOT_FOUND, "customer has no event yet\n").into_response();
    };
    let vector = FeatureVector::compute(&record.state, as_of, loaded.snapshot.state_params());
    let features = FEATURES
        .iter()
        .enumerate()
        .map(|(i, def)| {
            let value = vector
                .get(crate::domain::features::FeatureId(i as u16))
                .and_then(serde_json::Number::from_f64)
                .map_or(serde_json::Value::Null, serde_json::Value::Number);
            (def.name.to_owned(), value)
        })
        .collect();
    let assignment = loaded.assigner.assign(&vector);
    let segments = loaded
        .snapshot
        .axes()
        .iter()
        .zip(&assignment.axes)
        .map(|(axis, outcome)| {
            let value = outcome.segment.map_or(serde_json::Value::Null, |s| {
                let seg = &axis.model.segments[s];
                serde_json::json!({"segment": seg.id, "name": seg.name})
            });
            (axis.model.axis.to_string(), value)
        })
        .collect();
    Json(CustomerView {
        customer_id: id.to_string(),
        snapshot_version: loaded.snapshot.version(),
        as_of,
        clock: state
            .clock
            .now()
            .into_iter()
            .map(|(p, clock)| PartitionClock {
                topic: p.topic,
                partition: p.partition,
                clock,
            })
            .collect(),
        features,
        segments,
        last_published: record.published,
    })
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::state::CustomerState;
    use crate::io::store::{MemStore, StoreBatch};
    use crate::model::assign::LoadedSnapshot;
    use crate::model::snapshot::tests::sample_snapshot;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let status = response[9..12].parse().unwrap();
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    #[tokio::test]
    async fn endpoints_answer() {
        let store = Arc::new(MemStore::default());
        let snapshot = sample_snapshot().validate().unwrap();
        let params = *snapshot.state_params();
        let mut state = CustomerState::default();
        state.apply(
            &crate::domain::event::test_order("C1", "o", EventTime::parse("2024-03-01").unwrap()),
            &params,
        );
        let record = CustomerRecord {
            state,
            published: None,
            as_of: None,
            home: Some(2),
            applied: Vec::new(),
        };
        store
            .commit(&StoreBatch {
                records: vec![(crate::io::store::customer_key(2, b"C1"), record.encode())],
                offsets: Default::default(),
                meta: Vec::new(),
            })
            .unwrap();
        let app = Arc::new(AppState {
            metrics: Arc::new(Metrics::new().unwrap()),
            store,
            snapshot: Arc::new(arc_swap::ArcSwap::from_pointee(LoadedSnapshot::new(
                snapshot,
            ))),
            ready: Arc::new(AtomicBool::new(false)),
            restoring: Arc::default(),
            audiences: None,
            clock: {
                // The customer's partition is one the instance has a clock for.
                let clock = StreamClock::default();
                let partition = crate::io::store::PartitionKey {
                    topic: "orders".into(),
                    partition: 2,
                };
                clock.advance(&[(partition, 1_709_251_200)]);
                clock
            },
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve_on(listener, app.clone(), shutdown.clone()));

        assert_eq!(get(addr, "/healthz").await.0, 200);
        assert_eq!(get(addr, "/readyz").await.0, 503);
        app.ready.store(true, Ordering::SeqCst);
        assert_eq!(get(addr, "/readyz").await.0, 200);
        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(body.contains("segmentd_store_estimated_keys 1"), "{body}");
        let (status, body) = get(addr, "/customers/C1").await;
        assert_eq!(status, 200, "{body}");
        let view: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(view["customer_id"], "C1");
        assert!(view["features"]["lifetime_orders_log"].as_f64().unwrap() > 0.0);
        // One order: lifetime_orders_log = ln 2 = 0.69, standardised (0.69 − 2) / 1 = −1.31;
        // monthly_orders_log is at most ln(1 + ln2/90·30.44) = 0.21, standardised at most
        // (0.21 − 1) / 0.5 = −1.58. Both near centroid (−1, −1), segment 2, at any time.
        assert_eq!(
            view["segments"]["purchase_frequency"]["segment"], 2,
            "{view}"
        );
        assert_eq!(view["segments"]["purchase_frequency"]["name"], "infrequent");
        assert_eq!(get(addr, "/customers/nobody").await.0, 404);
        let (status, body) = get(addr, "/audiences").await;
        assert_eq!(status, 404);
        assert!(body.contains("score stream is off"), "{body}");
        shutdown.cancel();
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn audiences_show_the_thresholds_in_force() {
        use crate::audience::{Engine, ThresholdConfig};
        let mut engine = Engine::new(ThresholdConfig::default());
        let t = EventTime::from_unix(1_700_000_000).unwrap();
        for i in 0..100 {
            engine.observe("wide", f64::from(i) / 100.0, t).unwrap();
        }
        engine.observe("rare", 0.5, t).unwrap();
        engine.refresh();
        let mut products: Vec<crate::audience::stream::ProductReport> = engine
            .all_thresholds()
            .map(|(p, t)| crate::audience::stream::ProductReport {
                product_id: p.to_string(),
                thresholds: t.clone(),
            })
            .collect();
        products.sort_by_key(|p| std::cmp::Reverse(p.thresholds.count));
        let report: crate::audience::stream::SharedReport = Default::default();
        report.store(Arc::new(crate::audience::stream::AudienceReport {
            revision: engine.revision(),
            pooled: engine.pooled().cloned(),
            products,
        }));
        let app = Arc::new(AppState {
            metrics: Arc::new(Metrics::new().unwrap()),
            store: Arc::new(MemStore::default()),
            snapshot: Arc::new(arc_swap::ArcSwap::from_pointee(LoadedSnapshot::new(
                sample_snapshot().validate().unwrap(),
            ))),
            ready: Arc::new(AtomicBool::new(true)),
            restoring: Arc::default(),
            audiences: Some(report),
            clock: StreamClock::default(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve_on(listener, app, shutdown.clone()));
        let (status, body) = get(addr, "/audiences").await;
        assert_eq!(status, 200);
        let all: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(all["revision"], 1);
        assert_eq!(all["products"][0]["product_id"], "wide");
        assert_eq!(all["products"][0]["readiness"], "ready");
        assert_eq!(all["products"][1]["readiness"], "too_few_scores");
        let (status, body) = get(addr, "/audiences/wide").await;
        assert_eq!(status, 200);
        let wide: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(wide["cutoffs"]["premium"].as_f64().unwrap() > 0.8);
        assert_eq!(get(addr, "/audiences/none").await.0, 404);
        shutdown.cancel();
        server.await.unwrap().unwrap();
    }
}
