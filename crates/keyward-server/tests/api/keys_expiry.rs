//! Expiry: `GET /v1/keys/expiring`, `POST /v1/keys/cleanup-expired` and the sweeper, all on the
//! injected clock; `key.expiring` once per key and threshold.

use axum::http::StatusCode;
use chrono::Duration;
use keyward_server::lifecycle::{SweepReport, sweep};
use keyward_server::service::CreateKeyRequest;
use serde_json::{Value, json};

use crate::helpers::{TestApp, code, on_every_backend};

on_every_backend!(expiring_cleanup_and_sweeper);

fn expiring(days: i64, owner: Option<&str>) -> CreateKeyRequest {
    CreateKeyRequest {
        name: format!("expires in {days}d"),
        expires_in_days: Some(days),
        owner_id: owner.map(str::to_owned),
        ..Default::default()
    }
}

fn ids(body: &Value) -> Vec<String> {
    body["items"].as_array().unwrap().iter().map(|k| k["id"].as_str().unwrap().to_owned()).collect()
}

async fn expiring_cleanup_and_sweeper(app: TestApp) {
    let org = app.default_org.id;
    let (_, in1) = app.key_with(org, expiring(1, Some("alice"))).await;
    let (_, in3) = app.key_with(org, expiring(3, Some("bob"))).await;
    let (_, in10) = app.key_with(org, expiring(10, None)).await;
    let other = app.org("other").await;
    let (_, foreign) = app.key_with(other.id, expiring(2, None)).await;
    let (reader, _) = app.key(org, &["keyward:keys:read"]).await;

    // Listing: soonest first, within the window, own organization only (admin: every one).
    let r = app.get("/v1/keys/expiring", &reader).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["days"], 7);
    assert_eq!(ids(&r.body), [in1.id.to_string(), in3.id.to_string()]);
    let r = app.get("/v1/keys/expiring?days=30", &reader).await;
    assert_eq!(ids(&r.body), [in1.id.to_string(), in3.id.to_string(), in10.id.to_string()]);
    let r = app.get("/v1/keys/expiring?days=7", &app.admin_key).await;
    assert!(ids(&r.body).contains(&foreign.id.to_string()), "admin sees every organization");
    // keyward:self: its own owner's keys only.
    let (alice, _) = app
        .key_with(org, CreateKeyRequest { scopes: vec!["keyward:self".into()], ..expiring(300, Some("alice")) })
        .await;
    let r = app.get("/v1/keys/expiring", &alice).await;
    assert_eq!(ids(&r.body), [in1.id.to_string()]);

    // Notices: key.expiring once per key for the 7-day threshold.
    assert_eq!(sweep(&app.state).await.unwrap(), SweepReport { expired: 0, expiring_notices: 3 });
    assert_eq!(sweep(&app.state).await.unwrap(), SweepReport { expired: 0, expiring_notices: 0 }, "once");
    let events = app.state.store.list_events(None, 1000).await.unwrap();
    let notices: Vec<_> = events.iter().filter(|e| e.event.as_str() == "key.expiring").collect();
    assert_eq!(notices.len(), 3);
    assert!(notices.iter().any(|e| e.key_id == Some(foreign.id)));

    // Two days later: in1 has expired. cleanup-expired by a caller of the default organization
    // deactivates it (not the other organization's key), audited with the caller as actor.
    app.clock.advance(Duration::days(2) + Duration::seconds(1));
    let (writer, writer_rec) = app.key(org, &["keyward:keys:write", "keyward:audit:read"]).await;
    let r = app.call(axum::http::Method::POST, "/v1/keys/cleanup-expired", Some(&writer), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body, json!({"deactivated": 1, "key_ids": [in1.id]}));
    let r = app.get(&format!("/v1/audit-logs?key_id={}", in1.id), &writer).await;
    assert_eq!(r.body["items"][0]["action"], "expire");
    assert_eq!(r.body["items"][0]["actor"], writer_rec.id.to_string());
    let r = app.get(&format!("/v1/keys/{}", in1.id), &app.admin_key).await;
    assert_eq!((r.body["is_active"].as_bool(), r.body["status"].as_str()), (Some(false), Some("disabled")));
    let r = app.post("/v1/keys/cleanup-expired", &writer, json!({})).await;
    assert_eq!(r.body["deactivated"], 0, "already done");
    // A self-service key cannot clean up the organization.
    let r = app.post("/v1/keys/cleanup-expired", &alice, json!({})).await;
    assert_eq!((r.status, code(&r)), (StatusCode::FORBIDDEN, "insufficient_scope"));

    // The sweeper deactivates the other organization's expired key, as `system`.
    let report = sweep(&app.state).await.unwrap();
    assert_eq!(report.expired, 1);
    let r = app.get(&format!("/v1/audit-logs?key_id={}", foreign.id), &app.admin_key).await;
    assert_eq!(
        (r.body["items"][0]["action"].as_str(), r.body["items"][0]["actor"].as_str()),
        (Some("expire"), Some("system"))
    );
    let events = app.state.store.list_events(None, 1000).await.unwrap();
    let expired: Vec<_> = events.iter().filter(|e| e.event.as_str() == "key.expired").map(|e| e.key_id).collect();
    assert_eq!(expired, [Some(in1.id), Some(foreign.id)]);
    // The audit chain holds through all of it.
    let r = app.get("/v1/audit-logs/verify", &app.admin_key).await;
    assert_eq!(r.body["intact"], true, "{}", r.text);
}

#[tokio::test]
async fn bad_days_are_refused() {
    let app = TestApp::sqlite().await;
    for q in ["days=0", "days=366", "days=x", "days=-1"] {
        let r = app.get(&format!("/v1/keys/expiring?{q}"), &app.admin_key).await;
        assert_eq!((r.status, code(&r)), (StatusCode::BAD_REQUEST, "invalid_query"), "{q}: {}", r.text);
    }
}
