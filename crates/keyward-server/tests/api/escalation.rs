//! No key can be used to gain more than it holds (SECURITY.md, the permission ladder): per-key plans may
//! only tighten the organization's limits unless the caller holds `keyward:admin`; every write on a key
//! (update, revoke, rotate) needs every `keyward:` scope that key holds; and a rotation grants no more
//! than a creation by the same caller could.

use axum::http::StatusCode;
use keyward_core::OrgId;
use keyward_server::service::CreateKeyRequest;
use keyward_store::{Actor, ApiKey, KeyPatch};
use serde_json::{Value, json};

use crate::helpers::{NowUtc, Response, TestApp, code};

fn owned(owner: &str, scopes: &[&str]) -> CreateKeyRequest {
    CreateKeyRequest {
        name: format!("{owner}'s key"),
        owner_id: Some(owner.into()),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

async fn org_with(app: &TestApp, slug: &str, body: Value) -> OrgId {
    let mut b = json!({"name": slug, "slug": slug});
    b.as_object_mut().unwrap().extend(body.as_object().unwrap().clone());
    let r = app.post("/v1/organizations", &app.admin_key, b).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    r.body["id"].as_str().unwrap().parse().unwrap()
}

async fn stored(app: &TestApp, key: &ApiKey) -> ApiKey {
    app.state.store.get_key(key.id).await.unwrap()
}

fn refused_for_limits(r: &Response) {
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
    assert_eq!(code(r), "insufficient_scope", "{}", r.text);
    assert_eq!(r.body["error"]["field"], "plan", "{}", r.text);
}

#[tokio::test]
async fn a_tenant_cannot_give_a_key_a_looser_plan_than_its_organization() {
    let app = TestApp::sqlite().await;
    let free = org_with(&app, "free-org", json!({})).await;
    // Overrides on the organization apply over a key's plan: pro is no looser per minute here, but
    // per hour (20,000 > 1,000) it is.
    let capped = org_with(&app, "capped", json!({"plan": "pro", "rate_limit_per_minute": 100})).await;
    let (writer, _) = app.key(free, &["keyward:keys:write"]).await;
    let (self_key, _) = app.key_with(free, owned("alice", &["keyward:self", "read:projects"])).await;
    let (capped_writer, _) = app.key(capped, &["keyward:keys:write"]).await;

    for (caller, plan) in [(&writer, "enterprise"), (&writer, "pro"), (&self_key, "enterprise"), (&self_key, "pro")] {
        let r = app.post("/v1/keys", caller, json!({"name": "mine", "plan": plan})).await;
        refused_for_limits(&r);
    }
    let r = app.post("/v1/keys", &capped_writer, json!({"name": "mine", "plan": "enterprise"})).await;
    refused_for_limits(&r);
    assert!(r.text.contains("per_hour"), "names the window: {}", r.text);
    // Nothing was written by any refusal.
    let listed = app.get("/v1/keys", &writer).await;
    assert_eq!(listed.body["items"].as_array().unwrap().len(), 2, "{}", listed.text);

    // Equal or tighter is fine, and so is inheriting.
    for (caller, plan) in [(&writer, Some("free")), (&writer, None), (&capped_writer, Some("pro"))] {
        let body = json!({"name": "ok", "plan": plan});
        let r = app.post("/v1/keys", caller, body).await;
        assert_eq!(r.status, StatusCode::CREATED, "{plan:?}: {}", r.text);
    }
    // keyward:admin may give any plan.
    let r = app
        .post("/v1/keys", &app.admin_key, json!({"name": "vip", "plan": "enterprise", "organization_id": free}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let vip_id = r.body["api_key"]["id"].as_str().unwrap().to_owned();
    let vip_secret = r.body["key"].as_str().unwrap().to_owned();
    assert_eq!(app.verify(&vip_secret, json!({})).await["rate_limit"]["limit"], 6000);

    // PATCH: raising is refused, clearing is fine.
    let (_, plain) = app.key(free, &[]).await;
    for plan in ["enterprise", "pro"] {
        let r = app.patch(&format!("/v1/keys/{}", plain.id), &writer, json!({"plan": plan})).await;
        refused_for_limits(&r);
    }
    assert_eq!(stored(&app, &plain).await.plan, None, "not written");
    let r = app.patch(&format!("/v1/keys/{}", plain.id), &writer, json!({"plan": "free"})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = app.patch(&format!("/v1/keys/{vip_id}"), &writer, json!({"plan": null})).await;
    assert_eq!(r.status, StatusCode::OK, "lowering an admin's grant is fine: {}", r.text);
    let r = app.patch(&format!("/v1/keys/{vip_id}"), &app.admin_key, json!({"plan": "enterprise"})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);

    // Rotation would mint a new key with the looser plan: only an admin may.
    let r = app.post(&format!("/v1/keys/{vip_id}/rotate"), &writer, json!({})).await;
    refused_for_limits(&r);
    let r = app.post(&format!("/v1/keys/{vip_id}/rotate"), &app.admin_key, json!({})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
}

#[tokio::test]
async fn keys_write_cannot_touch_a_key_holding_keyward_scopes_it_lacks() {
    let app = TestApp::sqlite().await;
    let org = app.default_org.id;
    let (writer, _) = app.key(org, &["keyward:keys:write"]).await;
    let (_, admin) = app.key(org, &["keyward:admin"]).await;
    let (_, auditor) = app.key(org, &["keyward:audit:read", "read:x"]).await;
    // A disabled admin key an attacker would like back.
    let now = app.clock.now_utc();
    app.state
        .store
        .update_key(admin.id, KeyPatch { is_active: Some(false), ..Default::default() }, &Actor::cli(now))
        .await
        .unwrap()
        .apply(&app.state.keys);

    for target in [&admin, &auditor] {
        let path = format!("/v1/keys/{}", target.id);
        let before = stored(&app, target).await;
        for body in [
            json!({"is_active": true}),
            json!({"scopes": []}),
            json!({"name": "mine now"}),
            json!({"allowed_ips": ["0.0.0.0/0"]}),
            json!({"expires_at": null}),
        ] {
            let r = app.patch(&path, &writer, body.clone()).await;
            assert_eq!(r.status, StatusCode::FORBIDDEN, "PATCH {body}: {}", r.text);
            assert_eq!(code(&r), "insufficient_scope");
        }
        let r = app.delete(&path, &writer).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "DELETE: {}", r.text);
        let r = app.post(&format!("{path}/rotate"), &writer, json!({})).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "rotate: {}", r.text);
        let after = stored(&app, target).await;
        assert_eq!(
            (after.is_active, &after.scopes, after.revoked_at, &after.name, after.replaced_by),
            (before.is_active, &before.scopes, before.revoked_at, &before.name, before.replaced_by),
            "untouched"
        );
    }

    // Holding the target's keyward: scopes is enough; an admin may do anything.
    let (writer_auditor, _) = app.key(org, &["keyward:keys:write", "keyward:audit:read"]).await;
    let r = app.patch(&format!("/v1/keys/{}", auditor.id), &writer_auditor, json!({"name": "renamed"})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let (_, peer) = app.key(org, &["keyward:keys:write"]).await;
    assert_eq!(app.delete(&format!("/v1/keys/{}", peer.id), &writer).await.status, StatusCode::NO_CONTENT);
    let r = app.patch(&format!("/v1/keys/{}", admin.id), &app.admin_key, json!({"is_active": true})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    // A key with no reserved scope stays writable.
    let (_, plain) = app.key(org, &["write:*"]).await;
    assert_eq!(app.delete(&format!("/v1/keys/{}", plain.id), &writer).await.status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn self_service_rotation_grants_no_more_than_self_service_creation() {
    let app = TestApp::sqlite().await;
    let org = app.default_org.id;
    let (alice, _) = app.key_with(org, owned("alice", &["keyward:self", "read:projects", "read:*"])).await;
    let (_, broad) = app.key_with(org, owned("alice", &["admin:all", "write:billing"])).await;
    let (_, partly) = app.key_with(org, owned("alice", &["read:projects", "write:billing"])).await;
    let (_, star) = app.key_with(org, owned("alice", &["*"])).await;
    let (_, narrow) = app.key_with(org, owned("alice", &["read:projects", "read:reports"])).await;

    // Creating them is refused...
    for scopes in [json!(["admin:all", "write:billing"]), json!(["write:billing"]), json!(["*"])] {
        let r = app.post("/v1/keys", &alice, json!({"name": "n", "scopes": scopes})).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "create {scopes}: {}", r.text);
    }
    // ...and so is rotating a same-owner key that holds them.
    for target in [&broad, &partly, &star] {
        let r = app.post(&format!("/v1/keys/{}/rotate", target.id), &alice, json!({"grace_period_seconds": 60})).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "rotate {:?}: {}", target.scopes, r.text);
        assert_eq!(code(&r), "insufficient_scope");
        assert_eq!(stored(&app, target).await.replaced_by, None, "not rotated");
    }
    // Scopes its own cover (exactly or through its wildcard) rotate fine.
    let r = app.post(&format!("/v1/keys/{}/rotate", narrow.id), &alice, json!({})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    // A broader caller still may: keys:write grants customer scopes freely, as on creation.
    let (writer, _) = app.key(org, &["keyward:keys:write"]).await;
    let r = app.post(&format!("/v1/keys/{}/rotate", broad.id), &writer, json!({})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
}
