//! The loop every Keyward HTTP listener runs (the API and the gateway): HTTP/1 connections with a
//! deadline for a request's headers and for its body, a cap on connections served at once, and a
//! graceful shutdown that finishes requests in flight but waits for nothing else past a deadline.
//!
//! A client that never finishes its headers (slowloris) is closed at the header deadline; past the
//! connection cap, new connections wait in the kernel's backlog instead of costing memory; a
//! shutdown closes idle and half-sent connections at once and drops what is still open at the end of
//! the grace period, so usage is flushed and the process exits.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tower::ServiceExt;

use crate::settings::ServerLimits;

/// How long the request's body may take to arrive; put in every request's extensions by [`serve`]
/// and read by the body extractors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyReadTimeout(pub Duration);

/// Serves `router` on `listener` until `shutdown` resolves, then lets requests in flight finish for up
/// to `limits.shutdown_grace_ms`. Handlers see the peer as `ConnectInfo<SocketAddr>`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let connections = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(Duration::from_millis(limits.header_read_timeout_ms.max(1)));
    let body_timeout = BodyReadTimeout(Duration::from_millis(limits.body_read_timeout_ms.max(1)));
    // Held so that whatever is left at the end of the grace period can be dropped.
    let mut open = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        while open.try_join_next().is_some() {}
        // A permit before accepting: past the cap, connections wait in the backlog.
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            request.extensions_mut().insert(body_timeout);
            router.clone().oneshot(request.map(Body::new))
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        open.spawn(async move {
            // A client that went away or timed out: nothing to report.
            let _ = connection.await;
            drop(permit);
        });
    }
    drop(listener);
    let grace = Duration::from_millis(limits.shutdown_grace_ms);
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!(
            grace_ms = limits.shutdown_grace_ms,
            "shutdown: requests still open after the grace period were dropped"
        );
    }
    open.shutdown().await;
    Ok(())
}
