//! Prometheus metrics, named `keyward_<noun>_<unit>`, with labels from closed sets only: never a key,
//! a key id or an IP as a label.

use std::sync::OnceLock;
use std::time::Duration;

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use keyward_core::VerifyOutcome;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

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

fn describe() {
    metrics::describe_counter!("keyward_verify_total", "Verifications by outcome.");
    metrics::describe_histogram!("keyward_verify_duration_seconds", "Time to answer a verification.");
    metrics::describe_counter!(
        "keyward_auth_failures_total",
        "Failed authentications, by reason and by path (management API or verify)."
    );
    metrics::describe_counter!("keyward_http_requests_total", "HTTP requests by method, route and status class.");
    metrics::describe_histogram!("keyward_http_request_duration_seconds", "HTTP request latency by route.");
    metrics::describe_histogram!("keyward_usage_flush_duration_seconds", "Time to write one batch of usage events.");
    metrics::describe_histogram!("keyward_usage_batch_events", "Usage events per written batch.");
    metrics::describe_gauge!("keyward_usage_buffer_events", "Usage events held in memory, not yet in the store.");
    metrics::describe_counter!("keyward_usage_events_written_total", "Usage events inserted into the store.");
    metrics::describe_counter!(
        "keyward_usage_duplicates_total",
        "Usage events the store already had (a retried report, a replay): not counted again."
    );
    metrics::describe_counter!("keyward_usage_flush_errors_total", "Failed usage writes (kept and retried).");
    metrics::describe_counter!("keyward_usage_spilled_events_total", "Usage events spilled to the local file.");
    metrics::describe_counter!("keyward_usage_replayed_events_total", "Usage events replayed from the spill file.");
    metrics::describe_counter!("keyward_usage_pruned_events_total", "Raw usage events pruned past the retention.");
    metrics::describe_counter!("keyward_store_errors_total", "Store errors by kind.");
}

/// The verify path's metrics, registered once: looking a metric up by name and labels costs more than
/// the rest of a cached verification. Taken only once a recorder is installed (a handle taken before
/// would count nothing forever); until then, the path looks them up each time.
struct Hot {
    /// By `VerifyOutcome as usize`.
    verify_total: Vec<metrics::Counter>,
    verify_duration: metrics::Histogram,
    cache_hit: metrics::Counter,
    /// `POST` answered 2xx on the hot routes: looking a labelled metric up costs more than recording it.
    routes: Vec<HotRoute>,
}

struct HotRoute {
    route: &'static str,
    ok: metrics::Counter,
    duration: metrics::Histogram,
}

/// The routes whose successful `POST`s [`track`] counts through handles made once.
const HOT_ROUTES: [&str; 2] = ["/v1/verify", "/v1/usage"];

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
                .map(|&route| HotRoute {
                    route,
                    ok: metrics::counter!("keyward_http_requests_total", "method" => "POST", "route" => route, "status" => "2xx"),
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

/// `reason` is a verify outcome code or `MISSING_CREDENTIALS`; `via` is `management` or `verify`.
pub fn auth_failure(reason: &'static str, via: &'static str) {
    metrics::counter!("keyward_auth_failures_total", "reason" => reason, "via" => via).increment(1);
}

pub fn store_error(kind: &'static str) {
    metrics::counter!("keyward_store_errors_total", "kind" => kind).increment(1);
}

/// Counts every request by its matched route (a closed set), never by raw path.
pub async fn track(request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().cloned();
    let method = match *request.method() {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PATCH => "PATCH",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    };
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    let elapsed = started.elapsed().as_secs_f64();
    let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
    let status = match response.status().as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    if (method, status) == ("POST", "2xx")
        && let Some(hot) = hot().and_then(|hot| hot.routes.iter().find(|r| r.route == route))
    {
        hot.ok.increment(1);
        hot.duration.record(elapsed);
        return response;
    }
    let route = route.to_owned();
    metrics::counter!("keyward_http_requests_total", "method" => method, "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("keyward_http_request_duration_seconds", "route" => route).record(elapsed);
    response
}

/// Prometheus metrics (text format). Labels never carry a key, a key id or an IP.
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, content_type = "text/plain", body = String)))]
pub async fn render() -> Response {
    match install() {
        Some(handle) => ([(CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response(),
        None => crate::error::ApiError::internal("another metrics recorder is installed").into_response(),
    }
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
