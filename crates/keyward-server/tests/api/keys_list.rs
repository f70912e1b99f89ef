use axum::http::StatusCode;
use chrono::Duration;
use keyward_server::service::CreateKeyRequest;
use serde_json::{Value, json};

use crate::helpers::{TestApp, code};

fn names(body: &Value) -> Vec<String> {
    body["items"].as_array().unwrap().iter().map(|k| k["name"].as_str().unwrap().to_owned()).collect()
}

async fn app_with_keys() -> TestApp {
    let app = TestApp::sqlite().await;
    let org = app.default_org.id;
    let mk = |name: &str, owner: Option<&str>, env: &str, days: Option<i64>| CreateKeyRequest {
        name: name.into(),
        owner_id: owner.map(Into::into),
        environment: Some(env.into()),
        expires_in_days: days,
        ..Default::default()
    };
    app.key_with(org, mk("a-live", Some("u1"), "live", None)).await;
    app.key_with(org, mk("b-test", Some("u1"), "test", None)).await;
    app.key_with(org, mk("c-expiring", Some("u2"), "live", Some(1))).await;
    let (_, disabled) = app.key_with(org, mk("d-disabled", Some("u2"), "live", None)).await;
    let (_, revoked) = app.key_with(org, mk("e-revoked", None, "live", None)).await;
    let r = app.patch(&format!("/v1/keys/{}", disabled.id), &app.admin_key, json!({"is_active": false})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = app.delete(&format!("/v1/keys/{}", revoked.id), &app.admin_key).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    app.clock.advance(Duration::days(2));
    app
}

#[tokio::test]
async fn filters_by_owner_environment_status_and_inactive() {
    let app = app_with_keys().await;
    let get = |q: &'static str| {
        let app = &app;
        async move {
            let r = app.get(&format!("/v1/keys{q}"), &app.admin_key).await;
            assert_eq!(r.status, StatusCode::OK, "{q}: {}", r.text);
            names(&r.body)
        }
    };
    assert_eq!(get("").await, vec!["c-expiring", "b-test", "a-live", "bootstrap admin"]);
    assert_eq!(get("?include_inactive=true").await.len(), 6);
    assert_eq!(get("?owner_id=u1").await, vec!["b-test", "a-live"]);
    assert_eq!(get("?environment=test").await, vec!["b-test"]);
    assert_eq!(get("?status=expired").await, vec!["c-expiring"]);
    assert_eq!(get("?status=disabled").await, vec!["d-disabled"]);
    assert_eq!(get("?status=revoked").await, vec!["e-revoked"]);
    assert_eq!(get("?status=active&owner_id=u1&environment=live").await, vec!["a-live"]);
}

#[tokio::test]
async fn cursor_pagination_walks_every_key_once() {
    let app = app_with_keys().await;
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let q = match &cursor {
            Some(c) => format!("/v1/keys?include_inactive=true&limit=4&cursor={c}"),
            None => "/v1/keys?include_inactive=true&limit=4".to_owned(),
        };
        let r = app.get(&q, &app.admin_key).await;
        assert_eq!(r.status, StatusCode::OK);
        seen.extend(names(&r.body));
        match r.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, vec!["e-revoked", "d-disabled", "c-expiring", "b-test", "a-live", "bootstrap admin"]);
}

async fn bad_query(q: &str) {
    let app = TestApp::sqlite().await;
    let r = app.get(&format!("/v1/keys{q}"), &app.admin_key).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{q}: {}", r.text);
    assert_eq!(code(&r), "invalid_query", "{q}");
}

#[tokio::test]
async fn bad_status() {
    bad_query("?status=gone").await;
}

#[tokio::test]
async fn bad_environment() {
    bad_query("?environment=prod").await;
}

#[tokio::test]
async fn bad_include_inactive() {
    bad_query("?include_inactive=maybe").await;
}

#[tokio::test]
async fn bad_cursor() {
    bad_query("?cursor=zzz").await;
}

#[tokio::test]
async fn limit_out_of_range() {
    bad_query("?limit=0").await;
    bad_query("?limit=1000").await;
    bad_query("?limit=-1").await;
}

#[tokio::test]
async fn searches_names_owners_and_hints_and_lists_keys_expiring_soon() {
    let app = app_with_keys().await;
    let org = app.default_org.id;
    let mk = |name: &str, days: i64| CreateKeyRequest {
        name: name.into(),
        owner_id: Some("u3".into()),
        expires_in_days: Some(days),
        ..Default::default()
    };
    let (_, soon) = app.key_with(org, mk("f-soon", 3)).await;
    app.key_with(org, mk("g-later", 40)).await;
    let get = |q: String| {
        let app = &app;
        async move {
            let r = app.get(&format!("/v1/keys{q}"), &app.admin_key).await;
            assert_eq!(r.status, StatusCode::OK, "{q}: {}", r.text);
            names(&r.body)
        }
    };
    assert_eq!(get("?q=EXPIRING".into()).await, vec!["c-expiring"]);
    assert_eq!(get("?q=u2&include_inactive=true".into()).await, vec!["d-disabled", "c-expiring"]);
    assert_eq!(get(format!("?q={}", soon.hint)).await, vec!["f-soon"]);
    assert_eq!(get("?q=%25".into()).await, Vec::<String>::new(), "`%` matches only itself");
    assert_eq!(get("?q=_".into()).await, Vec::<String>::new(), "`_` matches only itself");
    assert_eq!(get("?expiring_within_days=7".into()).await, vec!["f-soon"], "not the expired one");
    assert_eq!(get("?expiring_within_days=365".into()).await, vec!["g-later", "f-soon"]);
    assert_eq!(get("?q=later&expiring_within_days=365".into()).await, vec!["g-later"]);
    assert_eq!(get("?q=u3&expiring_within_days=7&environment=live".into()).await, vec!["f-soon"]);
}

#[tokio::test]
async fn bad_search() {
    bad_query("?q=").await;
    bad_query(&format!("?q={}", "a".repeat(101))).await;
}

#[tokio::test]
async fn a_search_of_100_characters_is_taken() {
    let app = TestApp::sqlite().await;
    let r = app.get(&format!("/v1/keys?q={}", "%C3%A9".repeat(100)), &app.admin_key).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
}

#[tokio::test]
async fn bad_expiring_within_days() {
    bad_query("?expiring_within_days=0").await;
    bad_query("?expiring_within_days=366").await;
    bad_query("?expiring_within_days=soon").await;
    bad_query("?expiring_within_days=-1").await;
}

/// A search narrows the caller's own listing and never widens it: a tenant searching for another
/// organization's names, owners or hints finds nothing; a `keyward:self` key finds only its owner's
/// keys, whatever `owner_id` it asks for.
async fn search_stays_within_the_callers_keys(app: TestApp) {
    let acme = app.org("acme-search").await.id;
    let rival = app.org("rival-search").await.id;
    let named = |name: &str, owner: &str| CreateKeyRequest {
        name: name.into(),
        owner_id: Some(owner.into()),
        ..Default::default()
    };
    let (_, secret) = app.key_with(rival, named("Rival secret billing", "rival-user")).await;
    app.key_with(acme, named("Acme billing", "alice")).await;
    app.key_with(acme, named("Acme billing for bob", "bob")).await;
    let (tenant, _) = app.key(acme, &["keyward:keys:read"]).await;
    let (alice, _) = app.owned_key(acme, "alice", &["keyward:self"]).await;
    let get = |key: &str, q: &str| {
        let (app, path) = (&app, format!("/v1/keys?include_inactive=true&{q}"));
        let key = key.to_owned();
        async move {
            let r = app.get(&path, &key).await;
            assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text);
            names(&r.body)
        }
    };
    for q in ["q=Rival", "q=secret", "q=rival-user", &format!("q={}", secret.hint), "q=%25", "q=_"] {
        assert_eq!(get(&tenant, q).await, Vec::<String>::new(), "tenant, {q}");
        assert_eq!(get(&alice, q).await, Vec::<String>::new(), "self, {q}");
    }
    assert_eq!(get(&tenant, "q=BILLING").await, vec!["Acme billing for bob", "Acme billing"]);
    assert_eq!(get(&alice, "q=billing").await, vec!["Acme billing"]);
    assert_eq!(get(&alice, "q=bob").await, Vec::<String>::new());
    assert_eq!(get(&alice, "q=billing&owner_id=bob").await, vec!["Acme billing"], "owner_id cannot widen");
    assert_eq!(get(&app.admin_key, "q=secret").await, vec!["Rival secret billing"], "admin sees every org");
}

#[tokio::test]
async fn search_stays_within_the_callers_keys_sqlite() {
    search_stays_within_the_callers_keys(TestApp::sqlite().await).await;
}

#[tokio::test]
async fn search_stays_within_the_callers_keys_postgres() {
    if let Some(app) = TestApp::postgres("search_stays_within_the_callers_keys").await {
        search_stays_within_the_callers_keys(app).await;
    }
}
