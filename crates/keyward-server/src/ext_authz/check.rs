//! The `Authorization` service (a `CheckRequest` in, a `CheckResponse` out), the limits of its
//! listener and the connection cap; [`super::server`] speaks gRPC around it.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::IntoResponse;
use prost::bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::answer;

use crate::authz::{self, AuthzRequest, Decision, Routes};
use crate::error::{ApiError, ErrorCode};
use crate::state::AppState;
use crate::telemetry::Via;

/// Largest `CheckRequest` taken: Envoy's request headers are at most 60 KiB by default (its
/// `max_request_headers_kb` goes up to 8 MiB, past any sane key check); the body is never asked for.
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;

/// Limits of the gRPC listener; see [`super::serve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcLimits {
    /// A whole call, from its headers to the answer: a client that sends its message slowly is cut
    /// off here (`DEADLINE_EXCEEDED`, which Envoy treats as an error).
    pub call_timeout: Duration,
    /// Calls open at once on one HTTP/2 connection (Envoy multiplexes many on few connections).
    pub max_streams_per_connection: u32,
    /// Idle connections are pinged this often, and dropped when a ping is not answered within
    /// `call_timeout`: a peer that vanished does not hold its connection.
    pub keepalive: Duration,
    /// How long a graceful shutdown waits for calls in flight.
    pub shutdown_grace: Duration,
    /// Connections served at once; more wait in the kernel's backlog (as on the HTTP listeners).
    pub max_connections: usize,
    /// A new connection's HTTP/2 preface must have arrived within this. Keepalive pings start only
    /// once it has: without this, connections that stay silent (or trickle) would hold every one of
    /// `max_connections` for good, and Envoy could not connect.
    pub preface_timeout: Duration,
    /// Calls open at once over all connections (`authz.grpc_max_in_flight`), each counted from its
    /// headers until its answer is in the peer's flow-control window: more are answered
    /// `RESOURCE_EXHAUSTED` at once. Without it the memory of calls waiting for their message, or
    /// of answers a client does not read, was bounded only by `max_connections` x
    /// `max_streams_per_connection`.
    pub max_in_flight: usize,
}

impl Default for GrpcLimits {
    fn default() -> Self {
        Self {
            call_timeout: Duration::from_secs(5),
            max_streams_per_connection: 1024,
            keepalive: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
            max_connections: 10_000,
            preface_timeout: Duration::from_secs(5),
            max_in_flight: crate::settings::DEFAULT_GRPC_MAX_IN_FLIGHT,
        }
    }
}

/// The `Authorization` service: one node's state and the route → scope rules.
#[derive(Debug, Clone)]
pub struct ExtAuthz {
    state: AppState,
    routes: Routes,
}

impl ExtAuthz {
    pub fn new(state: AppState, routes: Routes) -> Self {
        Self { state, routes }
    }

    /// The answer to one `CheckRequest`: a `CheckResponse` as a gRPC message, its 5-byte prefix
    /// included.
    pub async fn check_request(&self, check: &wire::CheckRequest) -> Bytes {
        let http = check.attributes.as_ref().and_then(|a| a.request.as_ref()).and_then(|r| r.http.as_ref());
        let (method, path) = http.map(|h| (h.method.as_str(), h.path.as_str())).unwrap_or_default();
        // SECURITY: refused whole, never judged on part of its headers (an override past the cut).
        let Some(headers) = http.map_or(Some(HeaderMap::new()), header_map) else {
            let refusal = ApiError::new(ErrorCode::PayloadTooLarge, "the request has more headers than Keyward takes");
            return deny(refusal.into_response()).await;
        };
        let request =
            AuthzRequest { method, path, headers: &headers, client_ip: client_ip(check), via: Via::ExtAuthzGrpc };
        match authz::decide(&self.state, &self.routes, request).await {
            Decision::Allow(allowed) => answer::allow(&allowed),
            Decision::Deny(error) => deny(error.into_response()).await,
        }
    }

    #[tracing::instrument(skip_all, name = "ext_authz")]
    pub(super) async fn check(&self, request: &wire::CheckRequest) -> Bytes {
        self.check_request(request).await
    }
}

/// `CheckRequest` as Keyward reads it: only the fields it uses, under their numbers in
/// `envoy.service.auth.v3` (prost skips every other field without decoding it), and the `headers`
/// map as the repeated entries a protobuf map is on the wire, in the order sent, so that no hash map
/// is built for headers that are read once.
pub mod wire {
    /// `envoy.service.auth.v3.CheckRequest`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CheckRequest {
        #[prost(message, optional, tag = "1")]
        pub attributes: Option<AttributeContext>,
    }

    /// `envoy.service.auth.v3.AttributeContext`: the peer Envoy saw and its request.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AttributeContext {
        #[prost(message, optional, tag = "1")]
        pub source: Option<Peer>,
        #[prost(message, optional, tag = "4")]
        pub request: Option<Request>,
    }

    /// `AttributeContext.Peer`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Peer {
        #[prost(message, optional, tag = "1")]
        pub address: Option<Address>,
    }

    /// `envoy.config.core.v3.Address`, of which only the socket address (a pipe or an internal
    /// address has no client IP).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Address {
        #[prost(message, optional, tag = "1")]
        pub socket_address: Option<SocketAddress>,
    }

    /// `envoy.config.core.v3.SocketAddress`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SocketAddress {
        #[prost(string, tag = "2")]
        pub address: String,
    }

    /// `AttributeContext.Request`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Request {
        #[prost(message, optional, tag = "2")]
        pub http: Option<HttpRequest>,
    }

    /// `AttributeContext.HttpRequest`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HttpRequest {
        #[prost(string, tag = "2")]
        pub method: String,
        /// `map<string, string> headers`.
        #[prost(message, repeated, tag = "3")]
        pub headers: Vec<MapEntry>,
        #[prost(string, tag = "4")]
        pub path: String,
        #[prost(message, optional, tag = "13")]
        pub header_map: Option<HeaderMap>,
    }

    /// One entry of a `map<string, string>`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct MapEntry {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(string, tag = "2")]
        pub value: String,
    }

    /// `envoy.config.core.v3.HeaderMap`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HeaderMap {
        #[prost(message, repeated, tag = "1")]
        pub headers: Vec<HeaderValue>,
    }

    /// `envoy.config.core.v3.HeaderValue`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HeaderValue {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(string, tag = "2")]
        pub value: String,
        #[prost(bytes = "vec", tag = "3")]
        pub raw_value: Vec<u8>,
    }
}

/// The one method's path.
pub(super) const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

/// The request's headers as Envoy saw them: `header_map` (sent with `encode_raw_headers`, values as
/// bytes) or else the `headers` map (repeated headers joined with commas). Pseudo-headers (`:path`)
/// and what is not a valid header are left out: the key is read from ordinary headers only. `None`
/// when there are more names than a `HeaderMap` holds (tens of thousands; no proxy sends that many).
fn header_map(http: &wire::HttpRequest) -> Option<HeaderMap> {
    let mut map = HeaderMap::new();
    let mut full = false;
    let mut add = |name: &str, value: &[u8]| {
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_bytes(value)) {
            full |= map.try_append(name, value).is_err();
        }
    };
    match &http.header_map {
        Some(raw) => {
            for h in &raw.headers {
                let value = if h.raw_value.is_empty() { h.value.as_bytes() } else { &h.raw_value };
                add(&h.key, value);
            }
        }
        None => {
            // Last first: of a map key sent twice (no encoder does), the value read is the last one,
            // as a protobuf map keeps it.
            for entry in http.headers.iter().rev() {
                add(&entry.key, entry.value.as_bytes());
            }
        }
    }
    (!full).then_some(map)
}

/// The address of the peer that connected to Envoy (`attributes.source.address`).
fn client_ip(check: &wire::CheckRequest) -> Option<IpAddr> {
    let socket = check.attributes.as_ref()?.source.as_ref()?.address.as_ref()?.socket_address.as_ref()?;
    socket.address.parse().ok()
}

/// Keyward's error answer (status, JSON body, `Retry-After` and rate-limit headers), as Envoy sends
/// it to the client.
async fn deny(response: axum::response::Response) -> Bytes {
    let (parts, body) = response.into_parts();
    // An error body is a few hundred bytes of JSON; the bound only keeps a fault from growing it.
    let body = axum::body::to_bytes(body, 64 * 1024).await.unwrap_or_default();
    answer::deny(parts.status, &parts.headers, &body)
}

/// The connections `listener` accepts, each holding one of `cap` permits until it closes: past the
/// cap, new connections wait in the kernel's backlog instead of costing memory ([`crate::listen`]
/// does the same for HTTP).
pub(super) fn limited(
    listener: tokio::net::TcpListener,
    cap: usize,
    preface_timeout: Duration,
) -> impl futures_util::Stream<Item = std::io::Result<Permitted>> {
    let permits = Arc::new(Semaphore::new(cap.max(1)));
    futures_util::stream::unfold((listener, permits), move |(listener, permits)| async move {
        let permit = permits.clone().acquire_owned().await.ok()?;
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let preface = Some((PREFACE_LEN, Box::pin(tokio::time::sleep(preface_timeout))));
                    return Some((Ok(Permitted { stream, preface, _permit: permit }), (listener, permits)));
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "accepting a gRPC connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
}

/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`, what every HTTP/2 client sends first (RFC 9113 §3.4).
const PREFACE_LEN: usize = 24;

/// A connection and its permit, given back when the connection is dropped.
#[derive(Debug)]
pub(super) struct Permitted {
    stream: TcpStream,
    /// Until the preface is in: how many of its bytes are still to come, and by when.
    preface: Option<(usize, Pin<Box<tokio::time::Sleep>>)>,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for Permitted {
    /// Fails the read once the preface is late, which closes the connection and frees its permit.
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some((_, deadline)) = &mut this.preface
            && deadline.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no HTTP/2 preface in time")));
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some((left, _))) = (&read, &mut this.preface) {
            *left = left.saturating_sub(buf.filled().len() - before);
            if *left == 0 {
                this.preface = None;
            }
        }
        read
    }
}

impl AsyncWrite for Permitted {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    /// No, so that h2 copies every DATA payload under 1 KiB (an answer) into its write buffer: with
    /// vectored writes it keeps each payload over 256 bytes aside and must write it out before it
    /// takes the next frame, a write per answer where one write can carry a dozen.
    fn is_write_vectored(&self) -> bool {
        false
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
