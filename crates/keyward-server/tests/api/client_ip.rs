//! `X-Forwarded-For` is believed only from a configured trusted proxy.

use axum::http::{Method, StatusCode};

use crate::helpers::{TestApp, request};

#[tokio::test]
async fn forwarded_for_counts_only_from_trusted_proxies() {
    let mut app = TestApp::sqlite().await;
    let key = app.walled_key(app.default_org.id, "198.51.100.7").await;
    let forwarded = || {
        let mut req = request(Method::GET, "/v1/me", Some(&key), None);
        req.headers_mut().insert("x-forwarded-for", "198.51.100.7".parse().unwrap());
        req
    };
    // The test peer 203.0.113.7 is not a trusted proxy: its header is ignored.
    let r = app.send(forwarded()).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
    assert_eq!(r.body["error"]["code"], "ip_not_allowed");

    app.reconfigure(|b| b.trusted_proxies(vec!["203.0.113.0/24".parse().unwrap()]));
    let r = app.send(forwarded()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    // A client-supplied address to the left of the real one does not help.
    let mut spoofed = request(Method::GET, "/v1/me", Some(&key), None);
    spoofed.headers_mut().insert("x-forwarded-for", "198.51.100.7, 192.0.2.50".parse().unwrap());
    assert_eq!(app.send(spoofed).await.status, StatusCode::FORBIDDEN);
}

/// Behind a trusted proxy, a client that puts something unparsable in `X-Forwarded-For` (left of the
/// address its proxy appended, or in a header of its own) is not taken for the proxy itself, which
/// would pass an allow-list written for the proxy's network and share the proxy's per-address limits.
/// The list is read from the right, as far as the first untrusted hop, and what a client wrote to the
/// left of that is never parsed.
#[tokio::test]
async fn an_unparsable_forwarded_for_does_not_make_a_client_the_proxy() {
    let mut app = TestApp::sqlite().await;
    let key = app.walled_key(app.default_org.id, "203.0.113.0/24").await;
    app.reconfigure(|b| b.trusted_proxies(vec!["203.0.113.0/24".parse().unwrap()]));
    let from = |values: &[&[u8]]| {
        let mut req = request(Method::GET, "/v1/me", Some(&key), None);
        for value in values {
            req.headers_mut().append("x-forwarded-for", axum::http::HeaderValue::from_bytes(value).unwrap());
        }
        req
    };
    for values in [
        &[&b"x, 198.51.100.7"[..]][..],
        &[b"unknown, 198.51.100.7"],
        &[b"198.51.100.7:443, 198.51.100.7"],
        &[b"x", b"198.51.100.7"],
        &[b"\xff", b"198.51.100.7"],
        &[b"\xff, 198.51.100.7"],
        &[b"1.2.3.4, ,198.51.100.7"],
    ] {
        let r = app.send(from(values)).await;
        assert_eq!(
            (r.status, r.body["error"]["code"].as_str()),
            (StatusCode::FORBIDDEN, Some("ip_not_allowed")),
            "{values:?}"
        );
    }
    // The proxy's own requests, and clients inside its network, still pass.
    assert_eq!(app.send(from(&[])).await.status, StatusCode::OK);
    assert_eq!(app.send(from(&[b"x, 203.0.113.9"])).await.status, StatusCode::OK);
}
