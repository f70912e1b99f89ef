//! Webhook delivery: the worker that turns outbox events into signed HTTP POSTs.
//!
//! Every change that emits an event writes it to the outbox (`events`) in the change's own
//! transaction, so an event survives a crash right after the change. The worker ([`Worker::tick`],
//! run by [`spawn_worker`] every `poll_interval_ms` and whenever a handler rings
//! [`AppState::events_written`]):
//! 1. dispatches new events: one delivery per active endpoint of the event's organization that
//!    subscribed to it (each event once, also with several nodes);
//! 2. claims due deliveries under a lease (a worker that dies mid-attempt leaves the delivery to be
//!    retried when the lease ends, by any node, after a restart too);
//! 3. POSTs each one with `Keyward-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "t.body">`, within
//!    `timeout_ms`; a 2xx is success, anything else is retried with exponential backoff and jitter
//!    (30 s doubling to at most 1 h) until `retry_for_hours` (24) after the event, then `failed`.
//!    Every attempt is recorded with its status and latency.
//!
//! Delivery is at least once: a receiver de-duplicates by the event id (`id` in every payload, and the
//! `Keyward-Event-Id` header).
//!
//! SECURITY: only `http://` targets are delivered by this build (see [`check_url`]); loopback,
//! private, link-local and other internal addresses are refused (also after DNS resolution, at each
//! attempt) unless `webhooks.allow_private_targets` is set.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{Request, Uri};
use chrono::{DateTime, Utc};
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use keyward_store::{Attempt, AttemptOutcome, DeliveryJob, StoreResult};
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use crate::state::AppState;

/// Every event a webhook can subscribe to.
pub const EVENTS: &[&str] = &[
    "key.created",
    "key.updated",
    "key.rotated",
    "key.revoked",
    "key.expiring",
    "key.expired",
    "quota.threshold",
    "auth.failures_spike",
];

/// `[webhooks]` in the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookSettings {
    /// Extra certificate authorities (PEM) trusted for `https://` targets, beside the bundled Mozilla
    /// roots: for receivers behind a private CA.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<std::path::PathBuf>,
    /// Allow targets on loopback, private and link-local addresses (off: refused). Tests and
    /// single-host setups turn it on.
    pub allow_private_targets: bool,
    /// How long a receiver may take to answer, in milliseconds.
    pub timeout_ms: u64,
    /// Retries stop this long after the event; the delivery is then `failed`.
    pub retry_for_hours: u64,
    /// How often the worker looks for due deliveries without being woken, in milliseconds.
    pub poll_interval_ms: u64,
    /// `auth.failures_spike`: this many failed authentications from one IP, or against one key prefix,
    /// within a minute; 0 turns it off.
    pub failures_spike_per_minute: u64,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            ca_file: None,
            allow_private_targets: false,
            timeout_ms: 10_000,
            retry_for_hours: 24,
            poll_interval_ms: 1_000,
            failures_spike_per_minute: 50,
        }
    }
}

/// Why a target URL is refused; said to the caller (it names no secret).
pub fn check_url(raw: &str, allow_private: bool) -> Result<Uri, String> {
    let uri: Uri = raw.parse().map_err(|_| "must be an absolute http(s) URL".to_owned())?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err("must be an http(s) URL".to_owned()),
    }
    let host = uri.host().filter(|h| !h.is_empty()).ok_or_else(|| "must name a host".to_owned())?;
    if raw.len() > 2_000 {
        return Err("must be at most 2000 characters".to_owned());
    }
    if !allow_private {
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        let internal = match literal.parse::<IpAddr>() {
            Ok(ip) => is_internal(ip),
            Err(_) => {
                let h = literal.to_ascii_lowercase();
                h == "localhost" || h.ends_with(".localhost") || h.ends_with(".local") || h.ends_with(".internal")
            }
        };
        if internal {
            return Err(
                "targets on loopback or private addresses are refused (webhooks.allow_private_targets)".to_owned()
            );
        }
    }
    Ok(uri)
}

/// Loopback, private, link-local, shared (CGNAT), unspecified, multicast and broadcast addresses, and
/// IPv4 addresses mapped into IPv6.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || o[0] == 0
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
        }
    }
}

/// The delay before retry number `attempts` (1 after the first failure): 30 s doubling to at most an
/// hour, with ±20 % jitter so that many deliveries failing together do not retry together.
pub fn backoff(attempts: i64, jitter: u32) -> chrono::Duration {
    let base = 30_i64.saturating_mul(1_i64 << attempts.clamp(1, 8).saturating_sub(1)).min(3_600);
    // jitter in [0, 2^32) maps to a factor in [0.8, 1.2).
    let factor = 0.8 + 0.4 * (f64::from(jitter) / 4_294_967_296.0);
    chrono::Duration::milliseconds((base as f64 * 1_000.0 * factor) as i64)
}

fn jitter() -> u32 {
    let mut b = [0u8; 4];
    // No randomness (never expected): no jitter, still a valid delay.
    if getrandom::fill(&mut b).is_err() {
        return 1 << 31;
    }
    u32::from_le_bytes(b)
}

/// What one tick did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TickReport {
    /// Deliveries made from new events.
    pub dispatched: usize,
    /// Attempts made.
    pub attempted: usize,
    /// Of those, successful.
    pub succeeded: usize,
}

/// The webhook worker of one node.
#[derive(Clone, Debug)]
pub struct Worker {
    state: AppState,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

/// The extra CAs of `ca_file`, parsed; an unreadable or empty file is an error (refused at start).
pub fn load_ca_file(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    Ok(certs)
}

/// An HTTP and HTTPS client: TLS by rustls (ring), trusting Mozilla's roots (bundled, nothing is
/// fetched) plus `extra` roots.
fn client(timeout: Duration, extra: &[CertificateDer<'static>]) -> Client<HttpsConnector<HttpConnector>, Full<Bytes>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in extra {
        if let Err(e) = roots.add(cert.clone()) {
            tracing::warn!(error = %e, "an extra webhook CA certificate was not usable");
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = match rustls::ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions() {
        Ok(builder) => builder.with_root_certificates(roots).with_no_client_auth(),
        // ring supports the safe defaults; this branch is unreachable, but never panic here.
        Err(_) => {
            rustls::ClientConfig::builder().with_root_certificates(rustls::RootCertStore::empty()).with_no_client_auth()
        }
    };
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(timeout));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(https)
}

/// Deliveries claimed per tick.
const CLAIM: u32 = 32;
/// Events dispatched per tick.
const DISPATCH: u32 = 500;

impl Worker {
    pub fn new(state: AppState) -> Self {
        let extra = match &state.webhooks.ca_file {
            Some(path) => load_ca_file(path).unwrap_or_else(|e| {
                tracing::error!(error = %e, "webhooks.ca_file unusable: only the bundled roots are trusted");
                Vec::new()
            }),
            None => Vec::new(),
        };
        let client = client(Duration::from_millis(state.webhooks.timeout_ms.max(1)), &extra);
        Self { state, client }
    }

    /// Dispatches new events and makes one attempt at every due delivery, at the clock's `now`.
    pub async fn tick(&self) -> StoreResult<TickReport> {
        let settings = self.state.webhooks.clone();
        let now = self.state.clock.now();
        let give_up = now + chrono::Duration::hours(settings.retry_for_hours.min(24 * 30) as i64);
        let dispatched = self.state.store.dispatch_events(now, give_up, DISPATCH).await?;
        // The lease outlasts an attempt: a delivery is not taken twice while in flight.
        let lease = now + chrono::Duration::milliseconds(settings.timeout_ms as i64 * 2 + 30_000);
        let jobs = self.state.store.claim_deliveries(now, lease, CLAIM).await?;
        let mut set = tokio::task::JoinSet::new();
        for job in jobs {
            let worker = self.clone();
            set.spawn(async move { worker.attempt(job, now).await });
        }
        let mut report = TickReport { dispatched, ..Default::default() };
        while let Some(done) = set.join_next().await {
            report.attempted += 1;
            match done {
                Ok(Ok(true)) => report.succeeded += 1,
                Ok(Ok(false)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "recording a webhook attempt failed"),
                Err(e) => tracing::warn!(error = %e, "a webhook attempt panicked"),
            }
        }
        Ok(report)
    }

    /// One attempt; returns whether it succeeded.
    async fn attempt(&self, job: DeliveryJob, now: DateTime<Utc>) -> StoreResult<bool> {
        let started = Instant::now();
        let result = self.send(&job, now).await;
        let latency_ms = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
        let d = &job.delivery;
        let (status_code, error) = match &result {
            Ok(status) if (200..300).contains(status) => (Some(i64::from(*status)), None),
            Ok(status) => (Some(i64::from(*status)), Some(format!("the receiver answered {status}"))),
            Err(e) => (None, Some(e.clone())),
        };
        let ok = error.is_none();
        let outcome = if ok {
            AttemptOutcome::Succeeded
        } else {
            let next = now + backoff(d.attempts + 1, jitter());
            if next >= d.give_up_at { AttemptOutcome::Failed } else { AttemptOutcome::RetryAt(next) }
        };
        tracing::info!(
            delivery_id = %d.id, event_id = %d.event_id, event = %d.event, status = ?status_code, latency_ms,
            outcome = outcome.status(), "webhook attempt"
        );
        metrics::counter!("keyward_webhook_attempts_total", "outcome" => outcome.status()).increment(1);
        let attempt = Attempt { attempted_at: now, status_code, latency_ms, error };
        self.state.store.record_attempt(d.id, &attempt, outcome).await?;
        Ok(ok)
    }

    /// POSTs the delivery; the receiver's status, or why there is none. Errors name the target's
    /// problem only, never the secret.
    async fn send(&self, job: &DeliveryJob, now: DateTime<Utc>) -> Result<u16, String> {
        let settings = self.state.webhooks.clone();
        let uri = check_url(&job.url, settings.allow_private_targets)?;
        if !settings.allow_private_targets {
            // SECURITY: a public name may resolve to an internal address (or be made to, later).
            let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_owned();
            let port = uri.port_u16().unwrap_or(80);
            let addrs = tokio::net::lookup_host((host.as_str(), port)).await.map_err(|e| format!("resolving: {e}"))?;
            if addrs.into_iter().any(|a| is_internal(a.ip())) {
                return Err("the target resolves to an internal address".to_owned());
            }
        }
        let body = serde_json::to_vec(&job.delivery.payload).map_err(|e| format!("encoding: {e}"))?;
        let signature = keyward_core::webhook::sign(&job.secret.0, now.timestamp(), &body);
        let request = Request::post(uri)
            .header("content-type", "application/json")
            .header("user-agent", "keyward-webhooks")
            .header("keyward-event", job.delivery.event.as_str())
            .header("keyward-event-id", job.delivery.event_id.to_string())
            .header(keyward_core::webhook::SIGNATURE_HEADER, signature)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("building the request: {e}"))?;
        let timeout = Duration::from_millis(settings.timeout_ms.max(1));
        match tokio::time::timeout(timeout, self.client.request(request)).await {
            Err(_) => Err(format!("no answer within {} ms", settings.timeout_ms)),
            Ok(Err(e)) => Err(format!("request failed: {e}")),
            Ok(Ok(response)) => Ok(response.status().as_u16()),
        }
    }
}

/// Runs the worker until the task is aborted: a tick at every `poll_interval_ms`, and at once when a
/// handler says events were written.
pub fn spawn_worker(state: AppState) -> tokio::task::JoinHandle<()> {
    let worker = Worker::new(state.clone());
    let every = Duration::from_millis(state.webhooks.poll_interval_ms.max(10));
    tokio::spawn(async move {
        loop {
            match worker.tick().await {
                // More may be waiting: go again at once.
                Ok(r) if r.attempted >= CLAIM as usize || r.dispatched > 0 => continue,
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "webhook worker tick failed; will retry"),
            }
            tokio::select! {
                _ = state.events.notified() => {}
                _ = tokio::time::sleep(every) => {}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_http_and_public_unless_allowed() {
        for ok in ["http://hooks.example.com/k", "http://203.0.113.5:8080/x", "http://[2001:db8::1]/x"] {
            assert!(check_url(ok, false).is_ok(), "{ok}");
        }
        for bad in [
            "ftp://example.com/",
            "example.com/x",
            "http:///x",
            "http://127.0.0.1:9000/",
            "http://localhost/",
            "http://10.1.2.3/",
            "http://192.168.0.1/",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]/",
            "http://[fd00::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://0.0.0.0/",
        ] {
            assert!(check_url(bad, false).is_err(), "{bad}");
        }
        assert!(check_url("http://127.0.0.1:9000/", true).is_ok());
        assert!(check_url("https://hooks.example.com/", false).is_ok());
    }

    #[test]
    fn backoff_doubles_to_an_hour_with_jitter() {
        let mid = 1 << 31;
        let secs: Vec<i64> = (1..=10).map(|n| backoff(n, mid).num_seconds()).collect();
        assert_eq!(secs, [30, 60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]);
        assert_eq!(backoff(1, 0).num_milliseconds(), 24_000);
        assert!(backoff(1, u32::MAX).num_milliseconds() < 36_000);
        // About a day of retries: the sum of the delays passes 24 h within 30 attempts.
        let total: i64 = (1..=30).map(|n| backoff(n, mid).num_seconds()).sum();
        assert!(total > 24 * 3600, "{total}");
    }
}
