//! Prometheus metrics, named `keyward_<noun>_<unit>`, with labels from closed sets only: never a key,
//! a key id or an IP as a label; and the layer every request passes (request id, span, route metrics).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue, Method};
use axum::response::Response;
use keyward_core::VerifyOutcome;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tower::{Layer, Service};

/// Latency buckets in seconds: from 50 µs (a warm verify) to 5 s (a stuck store).
const BUCKETS: &[f64] =
    &[0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder once; later calls return the same handle. `None` when another
/// recorder was installed first (an embedding application's): then `/metrics` says so.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), BUCKETS)
                .ok()?;
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            describe();
            Some(handle)
        })
        .clone()
}

/// Every counter Keyward records, with what `/metrics` says of it.
const COUNTERS: &[(&str, &str)] = &[
    ("keyward_verify_total", "Verifications by outcome."),
    ("keyward_auth_failures_total", "Failed authentications, by reason and by path (management API or verify)."),
    ("keyward_http_requests_total", "HTTP requests by method, route and status class."),
    ("keyward_usage_events_written_total", "Usage events inserted into the store."),
    (
        "keyward_usage_duplicates_total",
        "Usage events the store already had (a retried report, a replay): not counted again.",
    ),
    ("keyward_usage_flush_errors_total", "Failed usage writes (kept and retried)."),
    ("keyward_usage_spilled_events_total", "Usage events spilled to the local file."),
    ("keyward_usage_replayed_events_total", "Usage events replayed from the spill file."),
    ("keyward_usage_pruned_events_total", "Raw usage events pruned past the retention."),
    ("keyward_usage_export_events_total", "Usage events written to the export's segment files."),
    ("keyward_usage_export_dropped_total", "Usage events not exported: the export fell behind or failed."),
    ("keyward_usage_export_segments_total", "Export segments completed (renamed from .part)."),
    ("keyward_usage_export_deleted_segments_total", "Oldest export segments deleted past export_max_bytes."),
    ("keyward_usage_export_errors_total", "Failed writes of the usage export."),
    (crate::error::STORE_ERRORS_TOTAL, "Store errors by kind."),
];

/// Every histogram, likewise.
const HISTOGRAMS: &[(&str, &str)] = &[
    ("keyward_verify_duration_seconds", "Time to answer a verification."),
    ("keyward_http_request_duration_seconds", "HTTP request latency by route."),
    ("keyward_usage_flush_duration_seconds", "Time to write one batch of usage events."),
    ("keyward_usage_batch_events", "Usage events per written batch."),
];

/// Every gauge, likewise.
const GAUGES: &[(&str, &str)] =
    &[("keyward_usage_buffer_events", "Usage events held in memory, not yet in the store.")];

fn describe() {
    for &(name, description) in COUNTERS {
        metrics::describe_counter!(name, description);
    }
    for &(name, description) in HISTOGRAMS {
        metrics::describe_histogram!(name, description);
    }
    for &(name, description) in GAUGES {
        metrics::describe_gauge!(name, description);
    }
}

/// The verify path's metrics, registered once: looking a metric up by name and labels costs more than
/// the rest of a cached verification. Taken only once a recorder is installed (a handle taken before
/// would count nothing forever); until then, the path looks them up each time.
struct Hot {
    /// By `VerifyOutcome as usize`.
    verify_total: Vec<metrics::Counter>,
    verify_duration: metrics::Histogram,
    cache_hit: metrics::Counter,
    /// 2xx answers on the hot routes: looking a labelled metric up costs more than recording it.
    routes: Vec<HotRoute>,
}

struct HotRoute {
    method: &'static str,
    route: &'static str,
    ok: metrics::Counter,
    duration: metrics::Histogram,
}

/// The methods and routes whose successful answers [`count_request`] counts through handles made once:
/// a backend's verify and usage calls, and a proxy's forward-auth checks.
const HOT_ROUTES: [(&str, &str); 3] = [("POST", "/v1/verify"), ("POST", "/v1/usage"), ("GET", "/v1/authz")];

static HOT: OnceLock<Hot> = OnceLock::new();

fn hot() -> Option<&'static Hot> {
    HANDLE.get()?;
    Some(HOT.get_or_init(|| {
        Hot {
            verify_total: VerifyOutcome::ALL
                .iter()
                .map(|o| metrics::counter!("keyward_verify_total", "outcome" => o.code()))
                .collect(),
            verify_duration: metrics::histogram!("keyward_verify_duration_seconds"),
            cache_hit: metrics::counter!("keyward_cache_lookups_total", "result" => "hit"),
            routes: HOT_ROUTES
                .iter()
                .map(|&(method, route)| HotRoute {
                    method,
                    route,
                    ok: metrics::counter!("keyward_http_requests_total", "method" => method, "route" => route, "status" => "2xx"),
                    duration: metrics::histogram!("keyward_http_request_duration_seconds", "route" => route),
                })
                .collect(),
        }
    }))
}

pub fn verify_outcome(outcome: VerifyOutcome, elapsed: Duration) {
    match hot().and_then(|hot| Some((hot.verify_total.get(outcome as usize)?, &hot.verify_duration))) {
        Some((total, duration)) => {
            total.increment(1);
            duration.record(elapsed.as_secs_f64());
        }
        None => {
            metrics::counter!("keyward_verify_total", "outcome" => outcome.code()).increment(1);
            metrics::histogram!("keyward_verify_duration_seconds").record(elapsed.as_secs_f64());
        }
    }
}

/// A verify-cache hit.
pub fn cache_hit() {
    match hot() {
        Some(hot) => hot.cache_hit.increment(1),
        None => metrics::counter!("keyward_cache_lookups_total", "result" => "hit").increment(1),
    }
}

/// Where a key was checked: the `via` of failed-authentication logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The caller's own key, on the management API.
    Management,
    /// A key checked through `POST /v1/verify`.
    Verify,
    /// A request through the gateway.
    Gateway,
    /// A request through the embeddable tower layer.
    Layer,
    /// A proxy asking about its client's request over HTTP: `/v1/authz` (Envoy HTTP ext_authz,
    /// forward-auth, nginx `auth_request`).
    ExtAuthzHttp,
    /// Envoy asking over gRPC (`envoy.service.auth.v3.Authorization/Check`).
    ExtAuthzGrpc,
}

impl Via {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Management => "management",
            Self::Verify => "verify",
            Self::Gateway => "gateway",
            Self::Layer => "layer",
            Self::ExtAuthzHttp => "ext_authz_http",
            Self::ExtAuthzGrpc => "ext_authz_grpc",
        }
    }

    /// Whether the check judges a request to the protected API on its way there (the gateway, the
    /// proxy hooks): its usage event is of kind `gateway`.
    pub const fn judges_requests(self) -> bool {
        matches!(self, Self::Gateway | Self::ExtAuthzHttp | Self::ExtAuthzGrpc)
    }
}

/// `reason` is a verify outcome code or `MISSING_CREDENTIALS`.
pub fn auth_failure(reason: &'static str, via: Via) {
    metrics::counter!("keyward_auth_failures_total", "reason" => reason, "via" => via.as_str()).increment(1);
}

/// A store error no answer carries (the usage writer's); those behind an answer are counted by
/// `ApiError`'s `IntoResponse`.
pub fn store_error(kind: &'static str) {
    metrics::counter!(crate::error::STORE_ERRORS_TOTAL, "kind" => kind).increment(1);
}

/// `x-request-id`: taken from the request when the client (or a proxy) sent one, else made here;
/// echoed on the response.
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What every request gets, in one layer around each route: a request id, one `request` span (method,
/// matched path, request id; the handlers record key id, organization and outcome), and the request
/// metrics by matched route (a closed set), never by raw path. One layer instead of tower-http's
/// request-id, propagation and trace layers plus a metrics middleware, because each layer adds its own
/// future, clone and boxing to every request on the verify path.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestLayer;

impl<S> Layer<S> for RequestLayer {
    type Service = Tracked<S>;

    fn layer(&self, inner: S) -> Tracked<S> {
        Tracked { inner }
    }
}

/// The service [`RequestLayer`] wraps a route in.
#[derive(Debug, Clone)]
pub struct Tracked<S> {
    inner: S,
}

impl<S> Service<Request> for Tracked<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = TrackedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let started = Instant::now();
        let request_id = match request.headers().get(&X_REQUEST_ID) {
            Some(id) => id.clone(),
            None => {
                let id = new_request_id();
                request.headers_mut().insert(X_REQUEST_ID.clone(), id.clone());
                id
            }
        };
        let route = request.extensions().get::<MatchedPath>().cloned();
        let method = method_label(request.method());
        let span = tracing::info_span!(
            "request",
            method,
            path = route.as_ref().map_or("unmatched", MatchedPath::as_str),
            request_id = request_id.to_str().unwrap_or_default(),
            key_id = tracing::field::Empty,
            organization_id = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        let inner = span.in_scope(|| self.inner.call(request));
        TrackedFuture { inner, span, started, route, method, request_id }
    }
}

pin_project_lite::pin_project! {
    /// A route's answer, polled inside the request's span; on completion the metrics are recorded and
    /// the request id is put on the response.
    pub struct TrackedFuture<F> {
        #[pin]
        inner: F,
        span: tracing::Span,
        started: Instant,
        route: Option<MatchedPath>,
        method: &'static str,
        request_id: HeaderValue,
    }
}

impl<F: Future<Output = Result<Response, Infallible>>> Future for TrackedFuture<F> {
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        let Ok(mut response) = ready!(this.inner.poll(cx));
        let elapsed = this.started.elapsed();
        let route = this.route.as_ref().map_or("unmatched", MatchedPath::as_str);
        count_request(this.method, route, response.status().as_u16(), elapsed);
        tracing::debug!(status = response.status().as_u16(), latency_us = elapsed.as_micros(), "answered");
        response.headers_mut().insert(X_REQUEST_ID.clone(), this.request_id.clone());
        Poll::Ready(Ok(response))
    }
}

/// A random (v4) UUID: what a request without an `x-request-id` is known by.
fn new_request_id() -> HeaderValue {
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
    HeaderValue::from_str(id).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PATCH => "PATCH",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// `keyward_http_requests_total` and `keyward_http_request_duration_seconds` for one answered request.
fn count_request(method: &'static str, route: &str, status: u16, elapsed: Duration) {
    let status = match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    let elapsed = elapsed.as_secs_f64();
    if status == "2xx"
        && let Some(hot) = hot().and_then(|hot| hot.routes.iter().find(|r| r.method == method && r.route == route))
    {
        hot.ok.increment(1);
        hot.duration.record(elapsed);
        return;
    }
    let route = route.to_owned();
    metrics::counter!("keyward_http_requests_total", "method" => method, "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("keyward_http_request_duration_seconds", "route" => route).record(elapsed);
}

#[cfg(test)]
mod tests {
    use keyward_core::VerifyOutcome;

    #[test]
    fn outcomes_index_their_counters() {
        for (i, outcome) in VerifyOutcome::ALL.into_iter().enumerate() {
            assert_eq!(outcome as usize, i, "{outcome:?}");
        }
    }
}
