//! `X-Forwarded-For` is believed only from a configured trusted proxy.

use axum::http::{Method, StatusCode};
use keyward_server::service::CreateKeyRequest;

use crate::helpers::{TestApp, request};

#[tokio::test]
async fn forwarded_for_counts_only_from_trusted_proxies() {
    let mut app = TestApp::sqlite().await;
    let (key, _) = app
        .key_with(
            app.default_org.id,
            CreateKeyRequest { name: "walled".into(), allowed_ips: vec!["198.51.100.7".into()], ..Default::default() },
        )
        .await;
    let forwarded = || {
        let mut req = request(Method::GET, "/v1/me", Some(&key), None);
        req.headers_mut().insert("x-forwarded-for", "198.51.100.7".parse().unwrap());
        req
    };
    // The test peer 203.0.113.7 is not a trusted proxy: its header is ignored.
    let r = app.send(forwarded()).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
    assert_eq!(r.body["error"]["code"], "ip_not_allowed");

    app.state.trusted_proxies = vec!["203.0.113.0/24".parse().unwrap()].into();
    let r = app.send(forwarded()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    // A client-supplied address to the left of the real one does not help.
    let mut spoofed = request(Method::GET, "/v1/me", Some(&key), None);
    spoofed.headers_mut().insert("x-forwarded-for", "198.51.100.7, 192.0.2.50".parse().unwrap());
    assert_eq!(app.send(spoofed).await.status, StatusCode::FORBIDDEN);
}
