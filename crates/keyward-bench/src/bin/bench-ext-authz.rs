//! Load for Envoy ext_authz over gRPC: `callers` concurrent callers send
//! `envoy.service.auth.v3.Authorization/Check` for `seconds`, each with the next key of a file, over
//! `connections` HTTP/2 connections (Envoy multiplexes its checks on a few); prints decisions per
//! second, allowed/denied and p50/p99/max latency as the caller saw it.
//!
//! Usage: bench-ext-authz <host:port> <keys-file> [seconds, 10] [callers, 64] [connections, 4]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use envoy_types::ext_authz::v3::pb::{Address, CheckRequest};
use envoy_types::pb::envoy::config::core::v3::{self as core, SocketAddress};
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use tonic::transport::Channel;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// A check as Envoy sends one for `GET /v1/projects/7?page=2` with the key in `x-api-key`.
fn check_request(key: &str) -> CheckRequest {
    let headers = [
        (":method", "GET"),
        (":path", "/v1/projects/7?page=2"),
        (":authority", "api.example.com"),
        ("user-agent", "bench-ext-authz"),
        ("x-api-key", key),
    ];
    let http = HttpRequest {
        method: "GET".into(),
        path: "/v1/projects/7?page=2".into(),
        host: "api.example.com".into(),
        headers: headers.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        ..HttpRequest::default()
    };
    let socket = SocketAddress { address: "192.0.2.10".into(), ..SocketAddress::default() };
    let source =
        Peer { address: Some(core::Address { address: Some(Address::SocketAddress(socket)) }), ..Peer::default() };
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(source),
            request: Some(Request { http: Some(http), ..Request::default() }),
            ..AttributeContext::default()
        }),
    }
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    allowed: u64,
    denied: u64,
    failed: u64,
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let [_, addr, file, rest @ ..] = args.as_slice() else {
        return Err("usage: bench-ext-authz <host:port> <keys-file> [seconds] [callers] [connections]".into());
    };
    let number =
        |i: usize, default: u64| rest.get(i).map(|s| s.parse::<u64>()).transpose().map(|n| n.unwrap_or(default));
    let seconds = number(0, 10)?;
    let callers = usize::try_from(number(1, 64)?)?.max(1);
    let connections = usize::try_from(number(2, 4)?)?.max(1);
    let keys: Arc<Vec<String>> = Arc::new(std::fs::read_to_string(file)?.lines().map(str::to_owned).collect());
    if keys.is_empty() {
        return Err("the keys file is empty".into());
    }
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        channels.push(Channel::from_shared(format!("http://{addr}"))?.timeout(Duration::from_secs(5)).connect().await?);
    }
    let next = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(callers);
    for caller in 0..callers {
        let mut client = AuthorizationClient::new(channels[caller % connections].clone());
        let (keys, next) = (keys.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            while Instant::now() < deadline {
                let key = &keys[next.fetch_add(1, Ordering::Relaxed) % keys.len()];
                let sent = Instant::now();
                let answer = client.check(check_request(key)).await;
                tally.latencies_us.push(u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX));
                match answer.map(|r| r.into_inner().status.map_or(-1, |s| s.code)) {
                    Ok(0) => tally.allowed += 1,
                    Ok(_) => tally.denied += 1,
                    Err(_) => tally.failed += 1,
                }
            }
            tally
        }));
    }
    let mut all = Tally::default();
    for task in tasks {
        let tally = task.await?;
        all.latencies_us.extend(tally.latencies_us);
        all.allowed += tally.allowed;
        all.denied += tally.denied;
        all.failed += tally.failed;
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.latencies_us.sort_unstable();
    let n = all.latencies_us.len();
    let at = |q: f64| all.latencies_us.get(((n as f64 * q) as usize).min(n.saturating_sub(1))).copied().unwrap_or(0);
    println!(
        "ext_authz gRPC: {n} checks in {elapsed:.1} s = {:.0} decisions/s ({callers} callers, {connections} connections); \
         allowed {}, denied {}, failed {}; p50 {} us, p99 {} us, max {} us",
        n as f64 / elapsed,
        all.allowed,
        all.denied,
        all.failed,
        at(0.50),
        at(0.99),
        at(1.0),
    );
    Ok(())
}
