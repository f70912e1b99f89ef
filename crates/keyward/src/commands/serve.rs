//! `keyward serve`: the API (and the gateway, when an upstream is set, and Envoy's ext_authz over gRPC,
//! when its address is) until SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use keyward_server::ext_authz::{self, ExtAuthz, GrpcLimits};
use keyward_server::{App, service};
use keyward_store::Actor;

use super::print_admin_key;
use crate::config::Config;

pub async fn run(config: Config) -> anyhow::Result<()> {
    // Listeners first: a port in use is found before the first start creates the database and prints
    // an admin key that an operator reading only the error would lose.
    let listener = bind(config.listen).await?;
    let gateway_config = config.gateway.build()?;
    let gateway_listener = match &gateway_config {
        Some(_) => Some(bind(config.gateway.listen).await?),
        None => None,
    };
    let grpc_listener = match config.authz.grpc_listen {
        Some(address) => Some(bind(address).await?),
        None => None,
    };
    let App { state, tasks } = App::builder(config.settings()?).routes(config.gateway.routes()?).build().await?;
    if let Some(seeded) = service::seed(&state, &Actor::system(state.clock.now())).await? {
        print_admin_key(&seeded.key);
    }
    tracing::info!(address = %listener.local_addr()?, database = state.store.backend(), "keyward is listening");
    // One shutdown signal, seen by every listener.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let gateway = match (gateway_config, gateway_listener) {
        (Some(gw), Some(listener)) => {
            tracing::info!(address = %listener.local_addr()?, upstream = %gw.upstream, "gateway is listening");
            // The node's route table: the gateway and `/v1/authz` judge by the same one.
            let gateway = keyward_server::gateway::Gateway::with_routes(gw.upstream, gw.timeout, state.routes.clone());
            let app = keyward_server::gateway::router(state.clone(), gateway);
            let shutdown = stopped(stop_rx.clone());
            let limits = config.server;
            Some(tokio::spawn(async move { keyward_server::listen::serve(listener, app, limits, shutdown).await }))
        }
        _ => None,
    };
    let ext_authz = match grpc_listener {
        Some(listener) => {
            tracing::info!(address = %listener.local_addr()?, "ext_authz gRPC is listening");
            let service = ExtAuthz::new(state.clone(), state.routes.clone());
            let limits = GrpcLimits {
                shutdown_grace: Duration::from_millis(config.server.shutdown_grace_ms),
                max_connections: config.server.max_connections,
                max_in_flight: config.authz.grpc_max_in_flight,
                ..GrpcLimits::default()
            };
            Some(tokio::spawn(ext_authz::serve(listener, service, limits, stopped(stop_rx.clone()))))
        }
        None => None,
    };
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    keyward_server::serve(listener, state, config.server, stopped(stop_rx)).await?;
    if let Some(gateway) = gateway {
        gateway.await??;
    }
    if let Some(ext_authz) = ext_authz {
        ext_authz.await??;
    }
    tracing::info!("shutting down: writing pending usage");
    tasks.shutdown().await;
    Ok(())
}

async fn bind(address: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(address).await.with_context(|| format!("cannot listen on {address}"))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
