//! `POST /v1/keys/import`: keys issued by another system keep working after their import.

use axum::body::Body;
use axum::http::{Method, StatusCode};
use keyward_core::{Environment, HashAlgorithm, KeyHasher, KeyPrefix, PlainKey};
use keyward_store::AuditFilter;
use serde_json::{Value, json};

use crate::helpers::{Response, TestApp, code, on_every_backend, request};

pub async fn import(app: &TestApp, query: &str, content_type: &str, body: &str) -> Response {
    let mut req = request(Method::POST, &format!("/v1/keys/import{query}"), Some(&app.admin_key), None);
    req.headers_mut().insert("content-type", content_type.parse().unwrap());
    *req.body_mut() = Body::from(body.to_owned());
    app.send(req).await
}

fn sha256_hex(s: &str) -> String {
    KeyHasher::default().hash_str(HashAlgorithm::Sha256, s).to_hex()
}

fn rejected(r: &Response) -> Vec<(u64, String)> {
    r.body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["line"].as_u64().unwrap(), e["reason"].as_str().unwrap().to_owned()))
        .collect()
}

on_every_backend!(imported_keys_verify_and_a_second_run_changes_nothing);

async fn imported_keys_verify_and_a_second_run_changes_nothing(app: TestApp) {
    let org = app.org("acme").await;
    let modern = PlainKey::generate(&KeyPrefix::default(), Environment::Test).unwrap();
    let modern = modern.expose_secret();
    let legacy = "acme_legacy_0123456789abcdef";
    // Known to the customer only; the old system kept its SHA-256.
    let hashed = "OLD.key/with+symbols=0123456789";
    let mut typo = modern.to_owned();
    typo.replace_range(12..13, if &modern[12..13] == "a" { "b" } else { "a" });
    let rows = [
        json!({"key": modern, "name": "modern", "scopes": ["read:x"], "environment": "test"}),
        json!({"key": legacy, "owner_id": "u1", "metadata": {"email": "a@acme.test"}, "created_at": "2020-01-01T00:00:00Z"}),
        Value::Null,
        json!({"key_sha256": sha256_hex(hashed).to_uppercase(), "scopes": "read:a write:b", "allowed_ips": ["10.0.0.0/8"],
               "expires_at": "2030-01-01T00:00:00Z"}),
        json!({"key": legacy, "name": "again"}),
        json!({"key": "short-legacy"}),
        json!({"key_sha256": "zz"}),
        json!({"key": "legacy_admin_0123456789", "scopes": ["keyward:admin"]}),
        json!({"key": "legacy_scope_0123456789", "scopes": ["bad scope"]}),
        json!({"key": "legacy_expired_0123456789", "expires_at": "2020-01-01T00:00:00Z"}),
        json!({"key": typo}),
        json!({"name": "no key"}),
        json!({"key": "legacy_both_0123456789", "key_sha256": sha256_hex("x")}),
        json!({"key": "legacy_colour_0123456789", "colour": "red"}),
        json!({"key": "legacy_disabled_0123456789", "is_active": false, "name": "off"}),
        json!({"key": modern.replace("sk_test_", "sk_live_"), "environment": "test"}),
    ];
    let body: String =
        rows.iter().map(|r| if r.is_null() { "\n".to_owned() } else { format!("{r}\n") }).collect::<String>();
    let query = format!("?organization_id={}", org.id);

    let want_rejected: Vec<(u64, &str)> = vec![
        (5, "the same key as line 2"),
        (6, "legacy key must be 16-512"),
        (7, "64 hexadecimal digits"),
        (8, "cannot hold `keyward:` scopes"),
        (9, "must look like `action:resource`"),
        (10, "must be in the future"),
        (11, "checksum does not match"),
        (12, "`key` or `key_sha256` is required"),
        (13, "not both"),
        (14, "colour"),
        (16, "checksum does not match"),
    ];
    let check = |r: &Response, dry_run: bool, imported: u64, unchanged: u64| {
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.body["dry_run"], dry_run);
        assert_eq!((r.body["rows"].as_u64(), r.body["imported"].as_u64()), (Some(15), Some(imported)), "{}", r.text);
        assert_eq!(r.body["unchanged"].as_u64(), Some(unchanged));
        let got = rejected(r);
        assert_eq!(got.len(), want_rejected.len(), "{got:?}");
        for ((line, reason), (want_line, want_reason)) in got.iter().zip(&want_rejected) {
            assert_eq!(line, want_line, "{reason}");
            assert!(reason.contains(want_reason), "line {line}: {reason}");
        }
        // SECURITY: no reason repeats a key.
        for secret in [modern, legacy, hashed, typo.as_str(), "legacy_admin_0123456789"] {
            assert!(!r.text.contains(secret), "the report repeats a key");
        }
    };

    // A dry run reports and changes nothing.
    let r = import(&app, &format!("{query}&dry_run=true"), "application/x-ndjson", &body).await;
    check(&r, true, 4, 0);
    assert_eq!(app.verify(legacy, json!({})).await["code"], "MALFORMED");
    assert!(!app.state.legacy.enabled());
    let audit =
        |action: &str| AuditFilter { organization_id: Some(org.id), action: Some(action.into()), ..Default::default() };
    let page = keyward_store::PageRequest { after: None, limit: 10 };
    assert!(app.state.store.list_audit(&audit("import"), page).await.unwrap().items.is_empty());

    let r = import(&app, &query, "application/x-ndjson", &body).await;
    check(&r, false, 4, 0);
    assert!(app.state.legacy.enabled(), "an import of legacy keys switches legacy lookups on at once");
    assert_eq!(app.verify(modern, json!({"required_scopes": ["read:x"]})).await["code"], "VALID");
    let v = app.verify(legacy, json!({})).await;
    assert_eq!((v["code"].as_str(), v["owner_id"].as_str()), (Some("VALID"), Some("u1")));
    assert_eq!(v["metadata"]["email"], "a@acme.test");
    let v = app.verify(hashed, json!({"ip": "10.1.2.3", "required_scopes": ["write:b"]})).await;
    assert_eq!(v["code"], "VALID", "a key known only by its SHA-256 verifies with its plaintext");
    assert_eq!(app.verify(hashed, json!({"ip": "11.1.2.3"})).await["code"], "IP_NOT_ALLOWED");
    assert_eq!(app.verify("legacy_disabled_0123456789", json!({})).await["code"], "DISABLED");
    assert_eq!(app.verify("never_imported_0123456789", json!({})).await["code"], "MALFORMED");
    assert_eq!(app.verify("legacy_admin_0123456789", json!({})).await["code"], "MALFORMED");

    let keys = app.get("/v1/keys?owner_id=u1&include_inactive=true", &app.admin_key).await;
    let record = &keys.body["items"][0];
    assert_eq!(record["created_at"], "2020-01-01T00:00:00Z");
    assert_eq!((record["prefix"].as_str(), record["hint"].as_str()), (Some(""), Some("cdef")));
    assert_eq!(record["organization_id"], org.id.to_string());
    assert_eq!(record["name"], "imported key");

    // One audit row, with counts and nothing else.
    let rows = app.state.store.list_audit(&audit("import"), page).await.unwrap().items;
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0].details,
        json!({"format": "jsonl", "rows": 15, "imported": 4, "unchanged": 0, "rejected": 11, "complete": true})
    );
    let creations = app.state.store.list_audit(&audit("create"), page).await.unwrap().items;
    assert_eq!(creations.len(), 1, "the organization's own: no audit row per imported key");

    // The same file again: nothing changes, no new audit row.
    let r = import(&app, &query, "application/x-ndjson", &body).await;
    check(&r, false, 0, 4);
    assert_eq!(app.state.store.list_audit(&audit("import"), page).await.unwrap().items.len(), 1);
}

on_every_backend!(csv_import_and_the_key_limit);

async fn csv_import_and_the_key_limit(app: TestApp) {
    let r = app
        .post("/v1/organizations", &app.admin_key, json!({"name": "Small", "slug": "small", "max_api_keys": 2}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let org = r.body["id"].as_str().unwrap().to_owned();
    let csv = "key,name,scopes,metadata,is_active\n\
               csv_legacy_one_0123456789,one,\"read:a, read:b\",\"{\"\"company\"\": \"\"Small\"\"}\",true\n\
               csv_legacy_two_0123456789,two,,,\n\
               csv_legacy_three_0123456789,three,,,\n\
               csv_legacy_four_0123456789,four,,not json,\n";
    let r = import(&app, &format!("?organization_id={org}"), "text/csv; charset=utf-8", csv).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!((r.body["imported"].as_u64(), r.body["rows"].as_u64()), (Some(2), Some(4)));
    assert_eq!(
        rejected(&r),
        [
            (4, "the organization has reached its limit of 2 API keys".to_owned()),
            (5, "`metadata` must be a JSON object".to_owned()),
        ]
    );
    let v = app.verify("csv_legacy_one_0123456789", json!({"required_scopes": ["read:b"]})).await;
    assert_eq!((v["code"].as_str(), v["metadata"]["company"].as_str()), (Some("VALID"), Some("Small")));
    // `format` overrides the content type.
    let r = import(&app, &format!("?organization_id={org}&format=csv&dry_run=true"), "text/plain", csv).await;
    assert_eq!(r.body["unchanged"].as_u64(), Some(2), "{}", r.text);
}

#[tokio::test]
async fn bad_requests_are_refused_whole() {
    let app = TestApp::sqlite().await;
    let r = import(&app, "", "text/plain", "{}").await;
    assert_eq!((r.status, code(&r)), (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"));
    let r = import(&app, "?format=xml", "text/csv", "key\n").await;
    assert_eq!((r.status, code(&r)), (StatusCode::BAD_REQUEST, "invalid_query"));
    let r = import(&app, "?organization_id=0190c6d1-0000-7000-8000-000000000000", "text/csv", "key\n").await;
    assert_eq!((r.status, code(&r)), (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"), "{}", r.text);
    let r = import(&app, "?organization_id=acme", "text/csv", "key\n").await;
    assert_eq!((r.status, code(&r)), (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"));
    let r = import(&app, "", "text/csv", "key,colour\nx,y\n").await;
    assert_eq!((r.status, code(&r)), (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"));
    assert!(r.text.contains("colour"), "{}", r.text);
    let too_many = "{\"key_sha256\": \"00\"}\n".repeat(10_001);
    let r = import(&app, "", "application/x-ndjson", &too_many).await;
    assert_eq!((r.status, code(&r)), (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"));
    assert!(r.text.contains("10000"), "{}", r.text);
    // An empty file imports nothing and writes no audit row.
    let r = import(&app, "", "text/csv", "key\n").await;
    assert_eq!(r.body, json!({"dry_run": false, "rows": 0, "imported": 0, "unchanged": 0, "rejected": []}));
}

#[tokio::test]
async fn with_a_pepper_plaintexts_are_stored_as_hmac_and_hashes_as_sha256() {
    let mut app = TestApp::sqlite().await;
    app.reconfigure(|b| b.hasher(KeyHasher::new(Some(&[7u8; 32])).unwrap()));
    let body = format!(
        "{}\n{}\n",
        json!({"key": "peppered_legacy_0123456789", "owner_id": "a"}),
        json!({"key_sha256": sha256_hex("hashed_legacy_0123456789"), "owner_id": "b"})
    );
    let r = import(&app, "", "application/x-ndjson", &body).await;
    assert_eq!(r.body["imported"], 2, "{}", r.text);
    for (owner, algorithm) in [("a", HashAlgorithm::HmacSha256), ("b", HashAlgorithm::Sha256)] {
        let filter = keyward_store::KeyFilter {
            organization_id: None,
            owner_id: Some(owner.into()),
            environment: None,
            status: None,
            include_inactive: true,
            search: None,
            expires_by: None,
            now: crate::helpers::t0(),
        };
        let page = app.state.store.list_keys(&filter, keyward_store::PageRequest { after: None, limit: 5 }).await;
        assert_eq!(page.unwrap().items[0].hash_algorithm, algorithm, "owner {owner}");
    }
    assert_eq!(app.verify("peppered_legacy_0123456789", json!({})).await["code"], "VALID");
    assert_eq!(app.verify("hashed_legacy_0123456789", json!({})).await["code"], "VALID");
}
