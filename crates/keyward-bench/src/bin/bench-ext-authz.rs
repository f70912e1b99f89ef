//! Load for Envoy ext_authz over gRPC: `callers` concurrent callers send
//! `envoy.service.auth.v3.Authorization/Check` for `seconds`, each with the next key of a file, over
//! `connections` HTTP/2 connections (Envoy multiplexes its checks on a few); prints decisions per
//! second, allowed/denied and p50/p99/max latency as the caller saw it.
//!
//! The client shares the machine's cores with the server, so it is kept as lean as wrk is for HTTP:
//! HTTP/2 straight on the `h2` crate (no tonic, no tower), every `CheckRequest` encoded once up front,
//! and of each answer only the `CheckResponse`'s `status.code` and the `grpc-status` trailer are read.
//! A check counts as allowed when both are `OK`, denied when the answer is a `CheckResponse` with
//! another code, failed otherwise (a transport error, a gRPC error, a body that is not an answer).
//!
//! Usage: bench-ext-authz <host:port> <keys-file> [seconds, 10] [callers, 64] [connections, 4]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, Request};
use envoy_types::ext_authz::v3::pb::{Address, CheckRequest};
use envoy_types::pb::envoy::config::core::v3::{self as core, SocketAddress};
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request as Attributes};
use h2::client::SendRequest;
use prost::Message;
use tokio::net::TcpStream;

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
            request: Some(Attributes { http: Some(http), ..Attributes::default() }),
            ..AttributeContext::default()
        }),
    }
}

/// `check_request(key)` as a gRPC message on the wire: the 5-byte prefix (not compressed, length)
/// and the protobuf.
fn framed(key: &str) -> Result<Bytes, Error> {
    let message = check_request(key).encode_to_vec();
    let mut frame = Vec::with_capacity(5 + message.len());
    frame.push(0);
    frame.extend_from_slice(&u32::try_from(message.len())?.to_be_bytes());
    frame.extend_from_slice(&message);
    Ok(Bytes::from(frame))
}

/// The one field of a `CheckResponse` this client reads: `status` (a `google.rpc.Status`, field 1).
/// prost skips every other field (the HTTP response, the metadata) without decoding it.
#[derive(Clone, PartialEq, Message)]
struct CheckStatus {
    #[prost(message, optional, tag = "1")]
    status: Option<RpcCode>,
}

/// `google.rpc.Status` without its message and details.
#[derive(Clone, PartialEq, Message)]
struct RpcCode {
    #[prost(int32, tag = "1")]
    code: i32,
}

enum Outcome {
    Allowed,
    Denied,
    Failed,
}

fn grpc_ok(headers: &HeaderMap) -> bool {
    headers.get("grpc-status").is_some_and(|s| s == "0")
}

/// One check on `sender`'s connection: the request, the answer's body and its trailers.
async fn check(sender: &mut SendRequest<Bytes>, head: &Request<()>, body: Bytes) -> Result<Outcome, Error> {
    let mut request = Request::new(());
    *request.method_mut() = head.method().clone();
    *request.uri_mut() = head.uri().clone();
    *request.headers_mut() = head.headers().clone();
    std::future::poll_fn(|cx| sender.poll_ready(cx)).await?;
    let (answer, mut stream) = sender.send_request(request, false)?;
    stream.send_data(body, true)?;
    let answer = answer.await?;
    if answer.headers().contains_key("grpc-status") {
        // Trailers only: a gRPC error, no message.
        return Ok(Outcome::Failed);
    }
    let mut body = answer.into_body();
    let mut message = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        body.flow_control().release_capacity(chunk.len())?;
        message.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await?.unwrap_or_default();
    let code = match message.get(5..) {
        Some(protobuf) if grpc_ok(&trailers) => CheckStatus::decode(protobuf)?.status.map(|s| s.code),
        _ => return Ok(Outcome::Failed),
    };
    Ok(match code {
        Some(0) => Outcome::Allowed,
        Some(_) => Outcome::Denied,
        None => Outcome::Failed,
    })
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
    let bodies: Vec<Bytes> = std::fs::read_to_string(file)?.lines().map(framed).collect::<Result<_, _>>()?;
    if bodies.is_empty() {
        return Err("the keys file is empty".into());
    }
    let bodies = Arc::new(bodies);
    let head = Arc::new(
        Request::post(format!("http://{addr}/envoy.service.auth.v3.Authorization/Check"))
            .header("content-type", HeaderValue::from_static("application/grpc"))
            .header("te", HeaderValue::from_static("trailers"))
            .body(())?,
    );
    let mut senders = Vec::with_capacity(connections);
    for _ in 0..connections {
        let tcp = TcpStream::connect(addr.as_str()).await?;
        tcp.set_nodelay(true)?;
        let (sender, connection) = h2::client::handshake(tcp).await?;
        tokio::spawn(connection);
        senders.push(sender);
    }
    let next = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(callers);
    for caller in 0..callers {
        let mut sender = senders[caller % connections].clone();
        let (bodies, next, head) = (bodies.clone(), next.clone(), head.clone());
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            while Instant::now() < deadline {
                let body = bodies[next.fetch_add(1, Ordering::Relaxed) % bodies.len()].clone();
                let sent = Instant::now();
                let answer = tokio::time::timeout(Duration::from_secs(5), check(&mut sender, &head, body)).await;
                tally.latencies_us.push(u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX));
                match answer {
                    Ok(Ok(Outcome::Allowed)) => tally.allowed += 1,
                    Ok(Ok(Outcome::Denied)) => tally.denied += 1,
                    Ok(Ok(Outcome::Failed) | Err(_)) | Err(_) => tally.failed += 1,
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
