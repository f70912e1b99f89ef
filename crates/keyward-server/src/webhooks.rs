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
//! SECURITY: `http://` and `https://` targets only (see [`check_url`]). Unless
//! `webhooks.allow_private_targets` is set, loopback, private, link-local and other internal
//! addresses ([`is_internal`]) are refused, by URL when the host is an IP literal or an internal name
//! (`localhost`, `*.local`, `*.internal`), and by address otherwise. A host name is resolved exactly
//! **once per attempt**, by the connector's own resolver ([`Network`]): when any answer is internal
//! the attempt is refused (the attempt's error says so) and nothing is sent; otherwise the connection
//! goes to exactly the addresses that were checked, never to a second lookup's answer, so a name that
//! changes its answer between two lookups (DNS rebinding) cannot reach an internal service. The
//! `Host` header and the TLS server name stay the URL's host. Connections are not pooled, so every
//! attempt resolves and checks again. Redirects are not followed.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{Request, Uri};
use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::TokioExecutor;
use keyward_store::{Attempt, AttemptOutcome, DeliveryJob, StoreResult};
use rustls::pki_types::CertificateDer;

use crate::state::AppState;

/// Why a target URL is refused; said to the caller (it names no secret). An IP-literal host is
/// classified by [`is_internal`]; a name is resolved only when delivering (see [`Network`]).
pub fn check_url(raw: &str, allow_private: bool) -> Result<Uri, String> {
    check_url_with(raw, allow_private, &is_internal)
}

/// [`check_url`] with the classification of addresses given.
fn check_url_with(raw: &str, allow_private: bool, is_internal: &dyn Fn(IpAddr) -> bool) -> Result<Uri, String> {
    let uri: Uri = raw.parse().map_err(|_| "must be an absolute http(s) URL".to_owned())?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err("must be an http(s) URL".to_owned()),
    }
    let host = uri.host().filter(|h| !h.is_empty()).ok_or_else(|| "must name a host".to_owned())?;
    if raw.len() > 2_000 {
        return Err("must be at most 2000 characters".to_owned());
    }
    if is_other_ipv4_spelling(host) {
        return Err("an IPv4 address must be written as four decimal numbers (a.b.c.d)".to_owned());
    }
    if !allow_private {
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        // `127.0.0.1.` is `127.0.0.1` to a resolver, as `localhost.` is `localhost`.
        let internal = match literal.strip_suffix('.').unwrap_or(literal).parse::<IpAddr>() {
            Ok(ip) => is_internal(ip),
            Err(_) => {
                // `localhost.` is `localhost`: a trailing dot only makes the name absolute.
                let h = literal.trim_end_matches('.').to_ascii_lowercase();
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

/// A host that `getaddrinfo` (glibc's `inet_aton`) reads as an IPv4 address without asking DNS, but
/// that is not the dotted quad an [`IpAddr`] parses: one to four parts, each decimal, octal (a
/// leading `0`) or hex (`0x`), as in `2130706433`, `127.1`, `0x7f000001` or `0177.0.0.1`, all
/// 127.0.0.1. A trailing dot is ignored.
///
/// SECURITY: such a host is a name to the URL parser, so the internal-address check would let it
/// pass, and the worker's lookup would then connect to the address it spells. The worker refuses
/// internal addresses again at delivery; this refuses the spelling itself when the URL is given. No
/// top-level domain is numeric, so every host made only of such parts is refused, except the quad.
fn is_other_ipv4_spelling(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    let numeric = |part: &str| match part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
        Some(hex) => hex.bytes().all(|b| b.is_ascii_hexdigit()),
        None => !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()),
    };
    !host.is_empty() && host.split('.').all(numeric) && host.parse::<std::net::Ipv4Addr>().is_err()
}

/// The IPv4 address an IPv6 address carries for a translator or tunnel to reach: NAT64 (the
/// well-known `64:ff9b::/96` and the local-use `64:ff9b:1::/48`, RFC 6052 and 8215), 6to4
/// (`2002::/16`) and the deprecated IPv4-compatible `::/96`.
///
/// SECURITY: a NAT64 gateway (AWS's, in IPv6-only subnets) translates `64:ff9b::a00:1` to
/// `10.0.0.1`, private addresses of the network included, so such an address is as internal as the
/// IPv4 address inside it.
fn embedded_ipv4(v6: std::net::Ipv6Addr) -> Option<std::net::Ipv4Addr> {
    let s = v6.segments();
    let last = |hi: u16, lo: u16| std::net::Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    match s {
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => Some(last(hi, lo)),
        [0x64, 0xff9b, 1, ..] => Some(last(s[6], s[7])),
        [0x2002, hi, lo, ..] => Some(last(hi, lo)),
        [0, 0, 0, 0, 0, 0, hi, lo] if (hi, lo) > (0, 1) => Some(last(hi, lo)),
        _ => None,
    }
}

/// Loopback, private, link-local, shared (CGNAT), unspecified, multicast and broadcast addresses, and
/// IPv4 addresses mapped into IPv6 or carried by an IPv6 address for a translator ([`embedded_ipv4`]).
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
            if let Some(v4) = v6.to_ipv4_mapped().or_else(|| embedded_ipv4(v6)) {
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

/// Looks up the addresses of a webhook target's host name.
pub trait Resolve: Send + Sync + 'static {
    fn lookup(&self, host: &str) -> BoxFuture<'static, std::io::Result<Vec<IpAddr>>>;
}

/// The operating system's resolver (`getaddrinfo`, off the async threads).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn lookup(&self, host: &str) -> BoxFuture<'static, std::io::Result<Vec<IpAddr>>> {
        let host = host.to_owned();
        Box::pin(async move { Ok(tokio::net::lookup_host((host.as_str(), 0)).await?.map(|a| a.ip()).collect()) })
    }
}

/// How the worker reaches the network: the resolver its connections use and which addresses count as
/// internal. [`Network::default`] is the system resolver and [`is_internal`]; tests inject their own
/// so that a "public" target is a loopback address and nothing leaves the machine.
#[derive(Clone)]
pub struct Network {
    pub resolver: Arc<dyn Resolve>,
    pub is_internal: Arc<dyn Fn(IpAddr) -> bool + Send + Sync>,
}

impl Default for Network {
    fn default() -> Self {
        Self { resolver: Arc::new(SystemResolver), is_internal: Arc::new(is_internal) }
    }
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network").finish_non_exhaustive()
    }
}

/// Why an attempt did not connect, as the attempt's error records it. It names the problem, never a
/// secret (and not the addresses: they are the receiver's business, and a refusal says enough).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetRefused(pub String);

impl std::fmt::Display for TargetRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TargetRefused {}

/// The resolver hyper's connector calls, and the only one: it resolves the name once, refuses the
/// whole answer when any address in it is internal (unless private targets are allowed), and hands
/// the connector exactly the addresses it checked.
#[derive(Clone, Debug)]
struct CheckedResolver {
    net: Network,
    allow_private: bool,
}

impl CheckedResolver {
    async fn resolve(self, host: String) -> Result<std::vec::IntoIter<SocketAddr>, TargetRefused> {
        let ips = self
            .net
            .resolver
            .lookup(&host)
            .await
            .map_err(|e| TargetRefused(format!("resolving the target's host failed: {e}")))?;
        if ips.is_empty() {
            return Err(TargetRefused("the target's host has no address".to_owned()));
        }
        // SECURITY: one internal answer refuses them all; the connector would otherwise try it when a
        // public one does not answer. What is checked here is what is connected to: hyper connects to
        // these addresses and never resolves the name again.
        if !self.allow_private && ips.iter().any(|ip| (self.net.is_internal)(*ip)) {
            return Err(TargetRefused(
                "the target resolves to an internal address (webhooks.allow_private_targets)".to_owned(),
            ));
        }
        // Port 0: the connector puts the URL's port (or the scheme's) in.
        Ok(ips.into_iter().map(|ip| SocketAddr::new(ip, 0)).collect::<Vec<_>>().into_iter())
    }
}

impl tower::Service<Name> for CheckedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = TargetRefused;
    type Future = BoxFuture<'static, Result<Self::Response, TargetRefused>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), TargetRefused>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        Box::pin(self.clone().resolve(name.as_str().to_owned()))
    }
}

/// The refusal of [`CheckedResolver`] inside a client error, if that is what stopped the attempt.
fn refusal<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a TargetRefused> {
    let mut cause = Some(e);
    while let Some(e) = cause {
        if let Some(r) = e.downcast_ref::<TargetRefused>() {
            return Some(r);
        }
        cause = e.source();
    }
    None
}

type WebhookClient = Client<HttpsConnector<HttpConnector<CheckedResolver>>, Full<Bytes>>;

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
    net: Network,
    client: WebhookClient,
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
fn client(timeout: Duration, extra: &[CertificateDer<'static>], resolver: CheckedResolver) -> WebhookClient {
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
    let mut http = HttpConnector::new_with_resolver(resolver);
    http.enforce_http(false);
    http.set_connect_timeout(Some(timeout));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    // SECURITY: no pooled connections: every attempt resolves the name and checks the answer again
    // (webhook rates are low, a handshake per delivery is cheap next to that guarantee).
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(0).build(https)
}

/// Deliveries claimed per tick.
const CLAIM: u32 = 32;
/// Events dispatched per tick.
const DISPATCH: u32 = 500;

impl Worker {
    pub fn new(state: AppState) -> Self {
        Self::with_network(state, Network::default())
    }

    /// A worker that resolves and classifies addresses with `net` (tests: loopback only).
    pub fn with_network(state: AppState, net: Network) -> Self {
        let extra = match &state.webhooks.ca_file {
            Some(path) => load_ca_file(path).unwrap_or_else(|e| {
                tracing::error!(error = %e, "webhooks.ca_file unusable: only the bundled roots are trusted");
                Vec::new()
            }),
            None => Vec::new(),
        };
        let resolver = CheckedResolver { net: net.clone(), allow_private: state.webhooks.allow_private_targets };
        let client = client(Duration::from_millis(state.webhooks.timeout_ms.max(1)), &extra, resolver);
        Self { state, net, client }
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
        // SECURITY: an IP literal is checked here (the connector does not resolve it); a name is
        // resolved and checked by the connector's `CheckedResolver`, once, and connected to as checked.
        let uri = check_url_with(&job.url, settings.allow_private_targets, &*self.net.is_internal)?;
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
            Ok(Err(e)) => match refusal(&e) {
                Some(refused) => Err(refused.to_string()),
                None => Err(format!("request failed: {e}")),
            },
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
            "http://localhost./",
            "http://LOCALHOST:80/",
            "http://api.localhost./",
            "http://metadata.google.internal/",
            "http://10.1.2.3/",
            "http://192.168.0.1/",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]/",
            "http://[fd00::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://0.0.0.0/",
            "http://127.0.0.1./",
            "http://10.0.0.1.:80/",
        ] {
            assert!(check_url(bad, false).is_err(), "{bad}");
        }
        // An IPv6 address that a translator or tunnel turns into an internal
        // IPv4 address is internal; one that carries a public IPv4 address is not.
        for (ip, internal) in [
            ("64:ff9b::a00:1", true),
            ("64:ff9b::7f00:1", true),
            ("64:ff9b::a9fe:a9fe", true),
            ("64:ff9b:1::c0a8:1", true),
            ("64:ff9b:1:2:3:4:a00:1", true),
            ("2002:a00:1::1", true),
            ("2002:7f00:1::", true),
            ("::7f00:1", true),
            ("::a00:1", true),
            ("::1", true),
            ("::", true),
            ("64:ff9b::cb00:7105", false),
            ("2002:cb00:7105::1", false),
            ("::cb00:7105", false),
            ("2001:db8::a00:1", false),
        ] {
            let parsed: IpAddr = ip.parse().unwrap();
            assert_eq!(is_internal(parsed), internal, "{ip}");
            assert_eq!(check_url(&format!("http://[{ip}]/"), false).is_err(), internal, "{ip}");
        }
        assert!(check_url("http://127.0.0.1:9000/", true).is_ok());
        assert!(check_url("http://1.2.3.4.example/", false).is_ok(), "a name ending in a word");
        assert!(check_url("http://8.8.8.8./", false).is_ok(), "the quad with a trailing dot");
    }

    /// Every spelling `inet_aton` takes for 127.0.0.1 or 10.0.0.1 other than the quad, and numeric
    /// hosts with other part counts, are refused whether or not private targets are allowed.
    #[test]
    fn other_spellings_of_ipv4_addresses_are_refused() {
        for host in [
            "2130706433",
            "127.1",
            "127.0.1",
            "0x7f000001",
            "0X7F000001",
            "0x7f.1",
            "0177.0.0.1",
            "0177.0.0.01",
            "0",
            "0x",
            "167772161",
            "012.0.0.1",
            "1.2.3.4.5",
            "134744072",
        ] {
            for allow_private in [false, true] {
                let url = format!("http://{host}:8080/hook");
                let refused = check_url(&url, allow_private).expect_err(&url);
                assert!(refused.contains("four decimal numbers"), "{url}: {refused}");
            }
        }
        for host in ["8.8.8.8", "203.0.113.5", "0x.example", "example.0x", "1e3", "12a", "xn--0"] {
            assert!(check_url(&format!("http://{host}/"), false).is_ok(), "{host}");
        }
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
