//! A small upstream API for gateway benchmarks: every path answers a small JSON document.
//! Usage: `bench-upstream 127.0.0.1:19000`

use axum::Router;
use axum::http::header::CONTENT_TYPE;
use axum::routing::any;

const BODY: &str = r#"{"items":[{"id":1,"name":"apollo"},{"id":2,"name":"gemini"}],"next":null}"#;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:19000".to_owned());
    let app = Router::new().fallback(any(|| async { ([(CONTENT_TYPE, "application/json")], BODY) }));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("bench-upstream listening on {}", listener.local_addr()?);
    axum::serve(listener, app).await
}
