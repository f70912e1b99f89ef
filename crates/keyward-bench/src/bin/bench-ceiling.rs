//! The ceiling for `POST /v1/verify`: a minimal axum server that only SHA-256-hashes the key and
//! looks it up in a map, answering `{"valid": true|false}`. Whatever Keyward does on top of that is
//! what the verify benchmark compares against.
//! Usage: `bench-ceiling 127.0.0.1:19100 keys.txt`

use std::collections::HashSet;
use std::sync::Arc;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

#[derive(Deserialize)]
struct Body {
    key: String,
}

async fn verify(State(keys): State<Arc<HashSet<[u8; 32]>>>, Json(body): Json<Body>) -> Json<Value> {
    let hash: [u8; 32] = Sha256::digest(body.key.as_bytes()).into();
    Json(json!({ "valid": keys.contains(&hash) }))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:19100".to_owned());
    let file = args.next().unwrap_or_else(|| "keys.txt".to_owned());
    let keys: HashSet<[u8; 32]> =
        std::fs::read_to_string(&file)?.lines().map(|k| Sha256::digest(k.trim().as_bytes()).into()).collect();
    let app = Router::new().route("/v1/verify", post(verify)).with_state(Arc::new(keys));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("bench-ceiling listening on {}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
