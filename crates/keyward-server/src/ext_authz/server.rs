//! The gRPC listener of [`super`], straight on the `h2` crate: the one hot call (`Check`) and the
//! standard `grpc.health.v1.Health` (`Check` and `Watch`). A gRPC unary call is small: a HEADERS
//! frame, one length-prefixed protobuf in DATA, and an answer of HEADERS, DATA and trailers
//! (`grpc-status`). Serving it through tonic and hyper cost a task per stream, tower layers, a timer
//! per call and codec buffers sized for any message, about a third more CPU per decision than
//! `POST /v1/verify` over HTTP/1.1; here the streams of a connection are driven by the connection's
//! own task and each message is read and written in one buffer.
//!
//! Every bound of [`GrpcLimits`] holds here: the call timeout (a message that trickles in is cut off
//! with `DEADLINE_EXCEEDED`, a `grpc-timeout` from the client can only shorten it), the streams per
//! connection (an HTTP/2 setting h2 enforces), the keepalive ping and its timeout, the preface timeout
//! and the connection cap ([`super::check::limited`]), the calls in flight over all connections (each
//! counted until its answer is in the peer's window), and the shutdown grace; so does a cap of this
//! module's, on the bytes of incomplete messages a connection holds ([`MAX_PARTIAL_BYTES`]). h2
//! itself bounds header lists, frame sizes, flow-control windows, and resets (pending-accept and
//! locally caused ones, the "rapid reset" defence) and closes connections that break them.

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Poll, ready};
use std::time::Duration;

use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderValue, Request, Response};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use h2::server::SendResponse;
use h2::{Ping, PingPong, RecvStream};
use prost::Message;
use prost::bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use super::check::{CHECK_PATH, ExtAuthz, GrpcLimits, MAX_REQUEST_BYTES, Permitted, limited, wire};

const HEALTH_CHECK_PATH: &str = "/grpc.health.v1.Health/Check";
const HEALTH_WATCH_PATH: &str = "/grpc.health.v1.Health/Watch";
/// The services health answers for: the node as a whole (`""`) and the `Authorization` service.
const SERVICES: [&str; 2] = ["", "envoy.service.auth.v3.Authorization"];

/// HTTP/2 settings, as hyper sets them for tonic: 1 MiB windows, 16 KiB frames and header lists, a
/// send buffer of 400 KiB per stream, and at most 1,024 streams reset because of the peer's errors.
const WINDOW: u32 = 1024 * 1024;
const MAX_FRAME: u32 = 16 * 1024;
const MAX_HEADER_LIST: u32 = 16 * 1024;
const MAX_SEND_BUFFER: usize = 400 * 1024;
const MAX_LOCAL_ERROR_RESETS: usize = 1024;
/// Streams the peer opened and reset before they were accepted (h2's default, hyper's too).
const MAX_PENDING_ACCEPT_RESETS: usize = 20;
/// Bytes of messages still incomplete that the calls of one connection hold at once. Flow control
/// does not bound them (what is received is released at once, so a message never waits on its own
/// window): without this a peer could have each of its streams announce a message of
/// [`MAX_REQUEST_BYTES`] and hold all but its last byte until `call_timeout`, some 256 MiB per
/// connection. Four windows: a message arrives in a few frames, so only a peer that holds messages
/// back comes near it.
const MAX_PARTIAL_BYTES: usize = 4 * WINDOW as usize;

/// What every connection shares.
struct Shared {
    service: ExtAuthz,
    limits: GrpcLimits,
    /// `true` once shutdown has begun: connections send GOAWAY and health answers `NOT_SERVING`.
    stopping: watch::Receiver<bool>,
    /// Calls open over all connections, at most `limits.max_in_flight`.
    in_flight: AtomicUsize,
}

/// One call counted in [`Shared::in_flight`] until it is dropped.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    /// `None` when `max` calls are open already.
    fn take(count: &'a AtomicUsize, max: usize) -> Option<Self> {
        let open = InFlight(count);
        (count.fetch_add(1, Ordering::Relaxed) < max).then_some(open)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves `Authorization/Check` and `grpc.health.v1.Health` on `listener` until `shutdown` resolves;
/// health answers `SERVING` until then, and `NOT_SERVING` while calls in flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: ExtAuthz,
    limits: GrpcLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop_tx, stopping) = watch::channel(false);
    let shared = Arc::new(Shared { service, limits, stopping, in_flight: AtomicUsize::new(0) });
    let mut incoming = Box::pin(limited(listener, limits.max_connections, limits.preface_timeout));
    let mut shutdown = pin!(shutdown);
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = incoming.next() => match accepted {
                Some(Ok(stream)) => {
                    connections.spawn(connection(stream, shared.clone()));
                }
                Some(Err(_)) | None => break,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    // The listener closes; open connections get GOAWAY and finish the calls they have.
    drop(incoming);
    let _ = stop_tx.send(true);
    let grace = limits.shutdown_grace;
    let drained = tokio::time::timeout(grace, async { while connections.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            grace_ms = grace.as_millis(),
            "shutdown: gRPC calls still open after the grace period were dropped"
        );
        connections.shutdown().await;
    }
    Ok(())
}

fn settings(limits: &GrpcLimits) -> h2::server::Builder {
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(WINDOW)
        .initial_connection_window_size(WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESETS)
        .max_concurrent_streams(limits.max_streams_per_connection);
    builder
}

/// One connection: its streams are futures of this task, not tasks of their own.
async fn connection(stream: Permitted, shared: Arc<Shared>) {
    let limits = shared.limits;
    let mut stopping = shared.stopping.clone();
    let mut stopped = pin!(async move {
        let _ = stopping.wait_for(|stop| *stop).await;
    });
    // The preface is read here; `Permitted` fails the read once it is late. A connection still
    // without it when shutdown begins has no call to finish.
    let mut conn = tokio::select! {
        handshake = settings(&limits).handshake::<_, Bytes>(stream) => match handshake {
            Ok(conn) => conn,
            Err(_) => return,
        },
        () = stopped.as_mut() => return,
    };
    let mut keepalive = pin!(keepalive(conn.ping_pong(), limits.keepalive, limits.call_timeout));
    let mut draining = false;
    let partial = AtomicUsize::new(0);
    let mut calls = FuturesUnordered::new();
    poll_fn(|cx| {
        if !draining && stopped.as_mut().poll(cx).is_ready() {
            conn.graceful_shutdown();
            draining = true;
        }
        if keepalive.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        loop {
            // Calls first: what they answer waits in h2's queue, and the connection's next poll
            // (inside `poll_accept`) writes all of it at once. Every stream that came in is accepted
            // before any is answered: answering each as it is accepted cost a write per call.
            while let Poll::Ready(Some(())) = calls.poll_next_unpin(cx) {}
            let mut accepted = false;
            loop {
                match conn.poll_accept(cx) {
                    Poll::Ready(Some(Ok((request, respond)))) => {
                        calls.push(call(shared.clone(), &partial, request, respond));
                        accepted = true;
                    }
                    Poll::Ready(Some(Err(_)) | None) => return Poll::Ready(()),
                    Poll::Pending => break,
                }
            }
            // Nothing new: what the calls wrote is flushed, and the connection waits.
            if !accepted {
                return Poll::Pending;
            }
        }
    })
    .await;
}

/// Pings the peer every `every` and resolves when a ping is not answered `within`: the connection
/// is then dropped, so a peer that vanished does not hold it.
async fn keepalive(ping_pong: Option<PingPong>, every: Duration, within: Duration) {
    let Some(mut ping_pong) = ping_pong else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(every).await;
        match tokio::time::timeout(within, ping_pong.ping(Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return,
        }
    }
}

/// The methods served.
#[derive(Clone, Copy)]
enum Method {
    Check,
    HealthCheck,
    HealthWatch,
}

/// Why a call ends without its answer: a gRPC status for the client, or the client is gone.
enum Failure {
    Status(Code, &'static str),
    Gone,
}

/// What a call answers within its deadline: one message, or the first of a `Watch`.
enum Answer {
    Unary(Bytes),
    Watch(ServingStatus),
}

/// One stream, from its headers to its last frame.
async fn call(
    shared: Arc<Shared>,
    partial: &AtomicUsize,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    // SECURITY: every open call holds memory (its stream, its headers, this future, then its
    // answer): past the cap a call costs no more than its refusal.
    let Some(in_flight) = InFlight::take(&shared.in_flight, shared.limits.max_in_flight) else {
        return send_status(&mut respond, Code::ResourceExhausted, "too many calls in flight");
    };
    let (head, mut body) = request.into_parts();
    let method = match head.uri.path() {
        CHECK_PATH => Method::Check,
        HEALTH_CHECK_PATH => Method::HealthCheck,
        HEALTH_WATCH_PATH => Method::HealthWatch,
        _ => return send_status(&mut respond, Code::Unimplemented, ""),
    };
    if head.headers.get("grpc-encoding").is_some_and(|e| e != "identity") {
        return send_status(&mut respond, Code::Unimplemented, "compressed messages are not supported");
    }
    let deadline =
        grpc_timeout(&head.headers).map_or(shared.limits.call_timeout, |t| t.min(shared.limits.call_timeout));
    let deadline = tokio::time::Instant::now() + deadline;
    // SECURITY: a call the client resets ends here, its work dropped (hyper drops a reset stream's
    // handler too). h2 no longer counts a reset stream against the streams per connection, so a
    // client resetting calls in a loop would otherwise keep more of them working than the cap
    // allows ("rapid reset"). Biased: a call answered on its first poll never looks at the reset.
    let answered = tokio::select! {
        biased;
        answered = tokio::time::timeout_at(deadline, answer(&shared, method, &mut body, partial)) => answered,
        _ = poll_fn(|cx| respond.poll_reset(cx)) => return,
    };
    drop(body);
    match answered {
        Ok(Ok(Answer::Unary(message))) => send_message(&mut respond, message, deadline).await,
        Ok(Ok(Answer::Watch(status))) => health_watch(&mut respond, status, shared.stopping.clone(), in_flight).await,
        Ok(Err(Failure::Status(code, message))) => send_status(&mut respond, code, message),
        Ok(Err(Failure::Gone)) => {}
        Err(_) => send_status(&mut respond, Code::DeadlineExceeded, "the call took longer than its deadline"),
    }
}

/// Reads the request message and answers it.
async fn answer(
    shared: &Shared,
    method: Method,
    body: &mut RecvStream,
    partial: &AtomicUsize,
) -> Result<Answer, Failure> {
    let message = read_message(body, Partial { total: partial, held: 0 }).await?;
    match method {
        Method::Check => {
            let check = wire::CheckRequest::decode(message)
                .map_err(|_| Failure::Status(Code::Internal, "the message is not a CheckRequest"))?;
            Ok(Answer::Unary(shared.service.check(&check).await))
        }
        Method::HealthCheck => match health(shared, message)? {
            ServingStatus::ServiceUnknown => Err(Failure::Status(Code::NotFound, "service not registered")),
            status => Ok(Answer::Unary(framed(&HealthCheckResponse { status: status.into() }))),
        },
        Method::HealthWatch => Ok(Answer::Watch(health(shared, message)?)),
    }
}

/// The status of the service a health request names.
fn health(shared: &Shared, message: Bytes) -> Result<ServingStatus, Failure> {
    let request = HealthCheckRequest::decode(message)
        .map_err(|_| Failure::Status(Code::Internal, "the message is not a HealthCheckRequest"))?;
    Ok(if !SERVICES.contains(&request.service.as_str()) {
        ServingStatus::ServiceUnknown
    } else if *shared.stopping.borrow() {
        ServingStatus::NotServing
    } else {
        ServingStatus::Serving
    })
}

/// `Health/Watch`: the status now, then `NOT_SERVING` once shutdown begins, which ends the stream
/// (`UNAVAILABLE`: the client watches again elsewhere). A client that resets the stream ends it too.
///
/// SECURITY: the call leaves the calls in flight once its first answer is out: a watch stays open
/// until shutdown, so a few watchers would otherwise hold every place for good. What it holds
/// after that is its stream, bounded by the streams per connection.
async fn health_watch(
    respond: &mut SendResponse<Bytes>,
    status: ServingStatus,
    mut stopping: watch::Receiver<bool>,
    in_flight: InFlight<'_>,
) {
    let Ok(mut stream) = respond.send_response(grpc_head(), false) else {
        return;
    };
    let sent = stream.send_data(framed(&HealthCheckResponse { status: status.into() }), false);
    drop(in_flight);
    if sent.is_err() {
        return;
    }
    let stopped = async {
        let _ = stopping.wait_for(|stop| *stop).await;
    };
    let reset = poll_fn(|cx| stream.poll_reset(cx));
    tokio::select! {
        () = stopped => {}
        _ = reset => return,
    }
    if status != ServingStatus::ServiceUnknown {
        let _ = stream.send_data(framed(&HealthCheckResponse { status: ServingStatus::NotServing.into() }), false);
    }
    let _ = stream.send_trailers(status_trailers(Code::Unavailable, "the server is shutting down"));
}

/// What one call buffers of a message still incomplete, counted in its connection's total until
/// the call has the whole message or ends.
struct Partial<'a> {
    total: &'a AtomicUsize,
    held: usize,
}

impl Partial<'_> {
    /// Counts `bytes` more; refused past [`MAX_PARTIAL_BYTES`] for the connection.
    fn hold(&mut self, bytes: usize) -> Result<(), Failure> {
        let before = self.total.fetch_add(bytes, Ordering::Relaxed);
        self.held += bytes;
        if before.saturating_add(bytes) > MAX_PARTIAL_BYTES {
            return Err(Failure::Status(Code::ResourceExhausted, "too many incomplete messages on this connection"));
        }
        Ok(())
    }
}

impl Drop for Partial<'_> {
    fn drop(&mut self) {
        self.total.fetch_sub(self.held, Ordering::Relaxed);
    }
}

/// The one message of a unary call, without its 5-byte prefix (compressed flag, length). The length
/// is checked before the rest is read, so no more than [`MAX_REQUEST_BYTES`] is ever buffered for a
/// call, and no more than [`MAX_PARTIAL_BYTES`] for the calls of a connection.
async fn read_message(body: &mut RecvStream, mut partial: Partial<'_>) -> Result<Bytes, Failure> {
    let mut buffer = BytesMut::new();
    loop {
        let chunk = match body.data().await {
            Some(Ok(chunk)) => chunk,
            Some(Err(_)) => return Err(Failure::Gone),
            None if buffer.is_empty() => return Err(Failure::Status(Code::Internal, "Missing request message.")),
            None => return Err(Failure::Status(Code::Internal, "the request message is cut short")),
        };
        let _ = body.flow_control().release_capacity(chunk.len());
        // Nearly always the whole message comes in one chunk: taken as it is, not copied.
        if buffer.is_empty()
            && let Some(length) = message_length(&chunk)?
            && chunk.len() >= 5 + length
        {
            return Ok(chunk.slice(5..5 + length));
        }
        partial.hold(chunk.len())?;
        buffer.extend_from_slice(&chunk);
        if let Some(length) = message_length(&buffer)?
            && buffer.len() >= 5 + length
        {
            return Ok(buffer.freeze().slice(5..5 + length));
        }
    }
}

/// The length a message's prefix announces, once the 5 bytes are in.
fn message_length(prefix: &[u8]) -> Result<Option<usize>, Failure> {
    let Some(&[compressed, a, b, c, d]) = prefix.get(..5) else {
        return Ok(None);
    };
    if compressed != 0 {
        return Err(Failure::Status(
            Code::Internal,
            "protocol error: received message with compressed-flag but no grpc-encoding was specified",
        ));
    }
    let length = u32::from_be_bytes([a, b, c, d]) as usize;
    if length > MAX_REQUEST_BYTES {
        return Err(Failure::Status(Code::OutOfRange, "the message is larger than Keyward takes"));
    }
    Ok(Some(length))
}

/// A gRPC deadline (`grpc-timeout`: at most 8 digits and a unit).
fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `message` with its 5-byte prefix, in one buffer.
fn framed(message: &impl Message) -> Bytes {
    let length = message.encoded_len();
    let mut buffer = BytesMut::with_capacity(5 + length);
    buffer.put_u8(0);
    // An answer is a few KiB at most: far below the 4 GiB a prefix can announce.
    buffer.put_u32(u32::try_from(length).unwrap_or(u32::MAX));
    message.encode_raw(&mut buffer);
    buffer.freeze()
}

fn grpc_head() -> Response<()> {
    let mut head = Response::new(());
    head.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    head
}

/// gRPC's status codes as `grpc-status` writes them, so that no answer formats (and allocates) one.
const GRPC_STATUS: [&str; 17] =
    ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16"];

fn status_trailers(code: Code, message: &'static str) -> HeaderMap {
    let mut trailers = HeaderMap::with_capacity(2);
    let status = match GRPC_STATUS.get(usize::try_from(i32::from(code)).unwrap_or(usize::MAX)) {
        Some(text) => HeaderValue::from_static(text),
        None => HeaderValue::from(i32::from(code)),
    };
    trailers.insert("grpc-status", status);
    if !message.is_empty() {
        trailers.insert("grpc-message", HeaderValue::from_static(message));
    }
    trailers
}

/// A unary answer: headers, the message, `grpc-status: 0`. A client that is gone is not an error.
///
/// The message goes to h2 once the peer's flow-control window takes it whole, which it nearly always
/// does at once. Until then the call stays open and counted in flight, and at `deadline` it is reset:
/// a client that reads no answers holds none past it (h2 would have kept them, up to 400 KiB a
/// stream, for as long as the connection lives).
async fn send_message(respond: &mut SendResponse<Bytes>, message: Bytes, deadline: tokio::time::Instant) {
    let Ok(mut stream) = respond.send_response(grpc_head(), false) else {
        return;
    };
    let length = message.len();
    stream.reserve_capacity(length);
    if stream.capacity() < length {
        let window = poll_fn(|cx| {
            while stream.capacity() < length {
                match ready!(stream.poll_capacity(cx)) {
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return Poll::Ready(false),
                }
            }
            Poll::Ready(true)
        });
        match tokio::time::timeout_at(deadline, window).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(_) => return stream.send_reset(h2::Reason::CANCEL),
        }
    }
    if stream.send_data(message, false).is_ok() {
        let _ = stream.send_trailers(status_trailers(Code::Ok, ""));
    }
}

/// A call that ends without a message: "trailers only", the status in the response headers.
fn send_status(respond: &mut SendResponse<Bytes>, code: Code, message: &'static str) {
    let mut head = grpc_head();
    head.headers_mut().extend(status_trailers(code, message));
    let _ = respond.send_response(head, true);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_are_read_as_the_spec_writes_them() {
        let of = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("grpc-timeout", HeaderValue::from_str(v).unwrap());
            grpc_timeout(&h)
        };
        assert_eq!(of("250m"), Some(Duration::from_millis(250)));
        assert_eq!(of("1S"), Some(Duration::from_secs(1)));
        assert_eq!(of("2M"), Some(Duration::from_secs(120)));
        assert_eq!(of("99999999H"), Some(Duration::from_secs(99_999_999 * 3600)));
        assert_eq!(of("5u"), Some(Duration::from_micros(5)));
        assert_eq!(of("7n"), Some(Duration::from_nanos(7)));
        for bad in ["", "m", "123456789m", "1x", "-1m", "+1m", "1.5S"] {
            assert_eq!(of(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn every_grpc_status_is_written_as_its_number() {
        for number in 0..=16 {
            let trailers = status_trailers(Code::from_i32(number), "");
            assert_eq!(trailers["grpc-status"], number.to_string().as_str());
        }
    }

    #[test]
    fn a_prefix_is_checked_before_the_message_is_read() {
        assert!(matches!(message_length(&[0, 0, 0]), Ok(None)));
        assert!(matches!(message_length(&[0, 0, 0, 1, 0]), Ok(Some(256))));
        let too_big = u32::try_from(MAX_REQUEST_BYTES + 1).unwrap().to_be_bytes();
        assert!(matches!(
            message_length(&[0, too_big[0], too_big[1], too_big[2], too_big[3]]),
            Err(Failure::Status(Code::OutOfRange, _))
        ));
        assert!(matches!(message_length(&[1, 0, 0, 0, 0]), Err(Failure::Status(Code::Internal, _))));
    }
}
