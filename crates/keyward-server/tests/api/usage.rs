//! The usage ledger over HTTP: events per verification, `POST /v1/usage` (idempotent reports),
//! `GET /v1/keys/{id}/usage`, `GET /v1/organizations/{id}/usage`, durable quotas across a restart, a
//! store outage that loses nothing, and no key in usage rows or metrics.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{Method, StatusCode};
use chrono::{Duration as Days, NaiveDate};
use keyward_server::service::CreateKeyRequest;
use keyward_server::settings::UsageConfig;
use keyward_server::usage::{StoreQuotaSeed, UsageRecorder, UsageWorker};
use keyward_store::usage::RawEvents;
use keyward_store::{Actor, OrganizationPatch};
use serde_json::{Value, json};

use crate::helpers::{Guard, NowUtc, TestApp, code, on_every_backend, settings, t0};

fn day(offset: i64) -> NaiveDate {
    (t0() + Days::days(offset)).date_naive()
}

/// N verifications (valid and refused, over two days) → exactly N events, and the key's usage and the
/// billing summary agree with the raw events to the unit.
async fn verifications_become_events_and_rollups(app: TestApp) {
    let (key, rec) = app.key(app.default_org.id, &["read:a"]).await;
    let mut refused = 0;
    for i in 0..24 {
        if i == 12 {
            app.clock.advance(Days::days(1));
        }
        let scopes = if i % 5 == 0 { json!(["write:a"]) } else { json!([]) };
        let endpoint = if i % 3 == 0 { "/v1/chat" } else { "/v1/embed" };
        let v = app.verify(&key, json!({"endpoint": endpoint, "method": "post", "required_scopes": scopes})).await;
        if v["valid"] == false {
            refused += 1;
        }
    }
    assert_eq!(refused, 5);
    // Reports with tokens, cost and latency for some of those requests.
    let reports: Vec<Value> = (0..4)
        .map(|i| {
            json!({"id": format!("r{i}"), "key_id": rec.id.to_string(), "status_code": 200 + i * 100,
            "response_time_ms": 40 * i, "tokens_used": 1000 + i, "cost_micros": 3_333 * i, "endpoint": "/v1/chat"})
        })
        .collect();
    let r = app.post("/v1/usage", &app.admin_key, json!({"events": reports})).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    assert_eq!(r.body["accepted"], 4);
    assert!(app.state.usage.flush().await);

    let raw = app.state.store.usage_event_totals(rec.id, t0() - Days::days(1), t0() + Days::days(2)).await.unwrap();
    assert_eq!((raw.events, raw.requests), (28, 24), "exactly one event per verification and per report");

    let r = app.get(&format!("/v1/keys/{}/usage?days=30", rec.id), &app.admin_key).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let days = r.body["days"].as_array().unwrap();
    assert_eq!(days.len(), 30);
    assert_eq!(days[29]["day"], day(1).to_string());
    assert_eq!(days[28]["requests"], 12);
    assert_eq!(days[29]["requests"], 12);
    assert_eq!(days[0]["requests"], 0);
    let totals = &r.body["totals"];
    assert_eq!(totals["requests"], raw.requests);
    assert_eq!(totals["denied"], 5);
    assert_eq!(totals["reports"], 4);
    assert_eq!(totals["tokens_used"], raw.tokens_used);
    assert_eq!(totals["cost_micros"], raw.cost_micros);
    assert_eq!((totals["errors_4xx"].clone(), totals["errors_5xx"].clone()), (json!(1), json!(1)));
    assert_eq!(totals["mean_latency_ms"], json!(raw.latency_sum_ms as f64 / 4.0));
    assert_eq!(totals["p95_latency_ms"], 200);
    let top = r.body["top_endpoints"].as_array().unwrap();
    assert_eq!(top[0]["endpoint"], "/v1/embed");
    assert_eq!(top[0]["requests"], 16);
    assert_eq!(top[1]["endpoint"], "/v1/chat");
    assert_eq!(top[1]["requests"], 8);

    let month = t0().format("%Y-%m").to_string();
    let path = format!("/v1/organizations/{}/usage?month={month}", app.default_org.id);
    let r = app.get(&path, &app.admin_key).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let line = r.body["keys"].as_array().unwrap().iter().find(|l| l["key_id"] == rec.id.to_string()).unwrap().clone();
    assert_eq!(line["requests"], raw.requests);
    assert_eq!(line["tokens_used"], raw.tokens_used);
    assert_eq!(line["cost_micros"], raw.cost_micros);
    // The admin key's own calls are not billable events: only the verified key has a line.
    assert_eq!(r.body["totals"]["cost_micros"], raw.cost_micros);

    // total_requests counts valid requests only, as before the ledger.
    assert_eq!(app.state.store.get_key(rec.id).await.unwrap().total_requests, 19);
}

/// A retried report (same id) counts once, in a batch, across batches and as a single object.
async fn duplicate_report_ids_count_once(app: TestApp) {
    let (_, rec) = app.key(app.default_org.id, &[]).await;
    let event = |id: &str| json!({"id": id, "key_id": rec.id.to_string(), "tokens_used": 10, "cost_micros": 7});
    let r = app.post("/v1/usage", &app.admin_key, json!({"events": [event("a"), event("b"), event("a")]})).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    assert!(app.state.usage.flush().await);
    for body in [json!({"events": [event("a"), event("c")]}), event("b"), event("c")] {
        let r = app.post("/v1/usage", &app.admin_key, body).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    }
    assert!(app.state.usage.flush().await);
    let raw = app.state.store.usage_event_totals(rec.id, t0() - Days::days(1), t0() + Days::days(1)).await.unwrap();
    assert_eq!((raw.events, raw.tokens_used, raw.cost_micros), (3, 30, 21));
    let r = app.get(&format!("/v1/keys/{}/usage?days=1", rec.id), &app.admin_key).await;
    assert_eq!((r.body["totals"]["reports"].clone(), r.body["totals"]["cost_micros"].clone()), (json!(3), json!(21)));
}

/// With the default `usage.raw_events` (`denied`), the usage endpoints, the billing summary, the
/// quota and the key's counters count every verification exactly, while raw rows are kept for the
/// refused verifications and the reports only.
async fn default_raw_events_keep_refusals_and_reports_and_count_everything(mut app: TestApp) {
    let config = UsageConfig { flush_interval: Duration::from_secs(3600), ..UsageConfig::default() };
    assert_eq!(config.raw_events, RawEvents::Denied);
    let (usage, _worker) = UsageRecorder::spawn_with(app.state.store.clone(), config);
    app.reconfigure(|b| b.usage(usage));
    let (key, rec) = app.key(app.default_org.id, &["read:a"]).await;
    for i in 0..20 {
        let scopes = if i % 4 == 0 { json!(["write:a"]) } else { json!([]) };
        app.verify(&key, json!({"endpoint": "/v1/embed", "required_scopes": scopes})).await;
    }
    let reports: Vec<Value> = (0..2)
        .map(|i| json!({"id": format!("r{i}"), "key_id": rec.id.to_string(), "tokens_used": 10, "cost_micros": 7}))
        .collect();
    let r = app.post("/v1/usage", &app.admin_key, json!({"events": reports})).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    assert!(app.state.usage.flush().await);

    let r = app.get(&format!("/v1/keys/{}/usage?days=1", rec.id), &app.admin_key).await;
    let totals = &r.body["totals"];
    assert_eq!((totals["requests"].clone(), totals["denied"].clone()), (json!(20), json!(5)), "{}", r.body);
    assert_eq!((totals["reports"].clone(), totals["tokens_used"].clone()), (json!(2), json!(20)));
    assert_eq!(r.body["top_endpoints"][0]["requests"], 20);
    let month = t0().format("%Y-%m").to_string();
    let r = app.get(&format!("/v1/organizations/{}/usage?month={month}", app.default_org.id), &app.admin_key).await;
    assert_eq!(r.body["totals"]["requests"], 20, "{}", r.body);
    assert_eq!(app.state.store.get_key(rec.id).await.unwrap().total_requests, 15);
    let subject = format!("quota:org:{}", app.default_org.id);
    assert_eq!(app.state.store.quota_used(&subject, &month).await.unwrap(), 15);
    let raw = app.state.store.usage_event_totals(rec.id, t0() - Days::days(1), t0() + Days::days(1)).await.unwrap();
    assert_eq!((raw.events, raw.requests), (7, 5), "raw rows: the refusals and the reports");
}

on_every_backend!(
    verifications_become_events_and_rollups,
    duplicate_report_ids_count_once,
    default_raw_events_keep_refusals_and_reports_and_count_everything
);

#[tokio::test]
async fn usage_reports_refuse_each_bad_input_and_write_nothing() {
    let app = TestApp::sqlite().await;
    let (_, rec) = app.key(app.default_org.id, &[]).await;
    let other = app.org("other-usage").await;
    let (_, foreign) = app.key(other.id, &[]).await;
    let (reporter, _) = app.key(app.default_org.id, &["keyward:verify"]).await;
    let ok = || json!({"id": "x", "key_id": rec.id.to_string()});
    let with = |k: &str, v: Value| {
        let mut e = ok();
        e[k] = v;
        e
    };
    let cases: Vec<(Value, &str, Option<&str>)> = vec![
        (json!({"events": []}), "validation_failed", Some("events")),
        (json!({"events": vec![ok(); 1001]}), "validation_failed", Some("events")),
        (json!({"key_id": rec.id.to_string()}), "invalid_request", None),
        (with("id", json!("")), "validation_failed", Some("id")),
        (with("id", json!("x".repeat(129))), "validation_failed", Some("id")),
        (with("key_id", json!("nope")), "validation_failed", Some("key_id")),
        (with("key_id", json!(keyward_core::KeyId::new().to_string())), "validation_failed", Some("key_id")),
        (with("key_id", json!(foreign.id.to_string())), "validation_failed", Some("key_id")),
        (with("status_code", json!(99)), "validation_failed", Some("status_code")),
        (with("status_code", json!(70000)), "invalid_request", None),
        (with("response_time_ms", json!(3_600_001)), "validation_failed", Some("response_time_ms")),
        (with("tokens_used", json!(-1)), "invalid_request", None),
        (with("cost_micros", json!(u64::MAX)), "validation_failed", Some("cost_micros")),
        (with("ip", json!("999.1.1.1")), "validation_failed", Some("ip")),
        (with("method", json!("G3T")), "validation_failed", Some("method")),
        (with("endpoint", json!("/x".repeat(101))), "validation_failed", Some("endpoint")),
        (with("timestamp", json!("2999-01-01T00:00:00Z")), "validation_failed", Some("timestamp")),
        (with("timestamp", json!("yesterday")), "invalid_request", None),
        (with("error_message", json!("e".repeat(1001))), "validation_failed", Some("error_message")),
        (with("surprise", json!(1)), "invalid_request", None),
        (json!({"events": [ok(), with("status_code", json!(99))]}), "validation_failed", Some("events[1].status_code")),
    ];
    for (body, want, field) in cases {
        let r = app.post("/v1/usage", &reporter, body.clone()).await;
        assert_eq!(code(&r), want, "{body}: {}", r.text);
        assert!(r.status.is_client_error());
        if let Some(field) = field {
            assert_eq!(r.body["error"]["field"], field, "{}", r.text);
        }
    }
    let r = app
        .send(
            axum::http::Request::post("/v1/usage")
                .header("authorization", format!("Bearer {reporter}"))
                .header("content-type", "application/json")
                .body(axum::body::Body::from("{not json"))
                .unwrap(),
        )
        .await;
    assert_eq!(code(&r), "invalid_json");
    assert!(app.state.usage.flush().await);
    let raw = app.state.store.usage_event_totals(rec.id, t0() - Days::days(1), t0() + Days::days(1)).await.unwrap();
    assert_eq!(raw.events, 0, "no partial write: a batch with one bad report records nothing");
    // The foreign key's organization sees nothing either.
    let raw = app.state.store.usage_event_totals(foreign.id, t0() - Days::days(1), t0() + Days::days(1)).await.unwrap();
    assert_eq!(raw.events, 0);
}

/// A raw JSON body (numbers `json!` cannot write, such as 2^64).
async fn post_raw(app: &TestApp, path: &str, key: &str, body: &str) -> crate::helpers::Response {
    app.send(
        axum::http::Request::post(path)
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body.to_owned()))
            .unwrap(),
    )
    .await
}

/// Every counted field of a report, in a single report and as the second of a batch: the bound is
/// accepted, one above it, i64::MAX and u64::MAX are 422 `validation_failed` naming the field; a
/// number past u64, a negative one, a float and a number in a string are 422 `invalid_request`
/// naming the field. Nothing of a refused batch is written, not even its valid first report.
#[tokio::test]
async fn usage_report_counted_fields_are_bounded() {
    let app = TestApp::sqlite().await;
    let (_, rec) = app.key(app.default_org.id, &[]).await;
    let (reporter, _) = app.key(app.default_org.id, &["keyward:verify"]).await;
    let max = |name: &str| match name {
        "status_code" => 599,
        "response_time_ms" => keyward_store::usage::MAX_RESPONSE_TIME_MS,
        "tokens_used" => keyward_store::usage::MAX_TOKENS_PER_EVENT,
        _ => keyward_store::usage::MAX_COST_MICROS_PER_EVENT,
    };
    let fields = ["status_code", "response_time_ms", "tokens_used", "cost_micros"];
    let good = format!(r#"{{"id":"good","key_id":"{}","tokens_used":5}}"#, rec.id);
    let mut refused = 0;
    for name in fields {
        let above = (max(name) + 1).to_string();
        let too_big: Vec<(&str, &str)> = vec![
            (&above, "validation_failed"),
            ("9223372036854775807", if name == "status_code" { "invalid_request" } else { "validation_failed" }),
            ("18446744073709551616", "invalid_request"),
            ("1e30", "invalid_request"),
            ("-1", "invalid_request"),
            ("-9223372036854775808", "invalid_request"),
            ("1.5", "invalid_request"),
            ("\"5\"", "invalid_request"),
            ("true", "invalid_request"),
        ];
        for (value, want) in too_big {
            let report = format!(r#"{{"id":"bad","key_id":"{}","{name}":{value}}}"#, rec.id);
            for (body, field) in [
                (report.clone(), name.to_owned()),
                (format!(r#"{{"events":[{good},{report}]}}"#), format!("events[1].{name}")),
            ] {
                let r = post_raw(&app, "/v1/usage", &reporter, &body).await;
                assert_eq!((r.status, code(&r)), (StatusCode::UNPROCESSABLE_ENTITY, want), "{body}: {}", r.text);
                assert_eq!(r.body["error"]["field"], field.as_str(), "{body}: {}", r.text);
                refused += 1;
            }
        }
        if name == "status_code" {
            let r =
                post_raw(&app, "/v1/usage", &reporter, &format!(r#"{{"id":"s","key_id":"{}","{name}":99}}"#, rec.id))
                    .await;
            assert_eq!((code(&r), r.body["error"]["field"].as_str()), ("validation_failed", Some(name)), "{}", r.text);
        }
    }
    assert!(refused > 60);
    assert!(app.state.usage.flush().await);
    let raw = app.state.store.usage_event_totals(rec.id, t0() - Days::days(1), t0() + Days::days(1)).await.unwrap();
    assert_eq!(raw.events, 0, "no partial write: a batch with one bad report records nothing");

    // The bounds themselves, in a batch as large as the 64 KiB body limit lets them be: accepted and
    // counted to the unit.
    let events: Vec<Value> = (0..300)
        .map(|i| {
            json!({"id": format!("max-{i}"), "key_id": rec.id.to_string(), "status_code": if i % 2 == 0 { 100 } else { 599 },
                "response_time_ms": max("response_time_ms"), "tokens_used": max("tokens_used"),
                "cost_micros": max("cost_micros")})
        })
        .collect();
    let r = app.post("/v1/usage", &reporter, json!({ "events": events })).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let zero =
        json!({"id": "zero", "key_id": rec.id.to_string(), "response_time_ms": 0, "tokens_used": 0, "cost_micros": 0});
    assert_eq!(app.post("/v1/usage", &reporter, zero).await.status, StatusCode::ACCEPTED);
    assert!(app.state.usage.flush().await);
    let n = 300;
    let r = app.get(&format!("/v1/keys/{}/usage?days=1", rec.id), &app.admin_key).await;
    let totals = &r.body["totals"];
    assert_eq!(totals["reports"], n + 1);
    assert_eq!(totals["tokens_used"], n * max("tokens_used"));
    assert_eq!(totals["cost_micros"], n * max("cost_micros"));
    assert_eq!(totals["errors_5xx"], n / 2);
}

/// `cost` on `/v1/verify`: 0 to 1,000,000,000 is a verification; beyond it (also past u64 and i64),
/// negative, fractional or quoted is a 422 naming `cost`, and nothing is counted.
#[tokio::test]
async fn verify_cost_is_bounded() {
    let app = TestApp::sqlite().await;
    // An organization with a monthly quota that the largest cost fits exactly.
    let max = keyward_store::usage::MAX_QUOTA_COST;
    let body = json!({"name": "metered", "slug": "metered", "plan": "pro", "monthly_request_limit": max + 2});
    let r = app.post("/v1/organizations", &app.admin_key, body).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let (key, rec) = app.key(r.body["id"].as_str().unwrap().parse().unwrap(), &[]).await;
    for (cost, want) in [
        ((max + 1).to_string(), "validation_failed"),
        (i64::MAX.to_string(), "validation_failed"),
        (u64::MAX.to_string(), "validation_failed"),
        ("18446744073709551616".to_owned(), "invalid_request"),
        ("-1".to_owned(), "invalid_request"),
        ("1.5".to_owned(), "invalid_request"),
        ("1e9".to_owned(), "invalid_request"),
        ("\"5\"".to_owned(), "invalid_request"),
        ("null".to_owned(), ""),
    ] {
        let body = format!(r#"{{"key":"{key}","cost":{cost}}}"#);
        let r = post_raw(&app, "/v1/verify", &app.admin_key, &body).await;
        if want.is_empty() {
            assert_eq!(r.status, StatusCode::OK, "null is the default: {}", r.text);
            continue;
        }
        assert_eq!((r.status, code(&r)), (StatusCode::UNPROCESSABLE_ENTITY, want), "{cost}: {}", r.text);
        assert_eq!(r.body["error"]["field"], "cost", "{}", r.text);
    }
    for cost in [0, max, 1] {
        assert_eq!(app.verify(&key, json!({ "cost": cost })).await["code"], "VALID", "{cost}");
    }
    let v = app.verify(&key, json!({})).await;
    assert_eq!((v["code"].clone(), v["quota"]["used"].clone()), (json!("QUOTA_EXCEEDED"), json!(max + 2)));
    assert!(app.state.usage.flush().await);
    let raw = app.state.store.usage_event_totals(rec.id, t0() - Days::days(1), t0() + Days::days(1)).await.unwrap();
    assert_eq!(raw.requests, 5, "the null, the three bounds and the refused one; no 422 counted");
}

/// `/openapi.json` states the bounds the server enforces, so generated clients validate the same way.
#[tokio::test]
async fn openapi_states_the_usage_bounds() {
    let app = TestApp::sqlite().await;
    let spec = app.call(Method::GET, "/openapi.json", None, None).await.body;
    let schemas = &spec["components"]["schemas"];
    let report = &schemas["UsageReport"]["properties"];
    let range = |v: &Value| (v["minimum"].as_i64(), v["maximum"].as_i64());
    use keyward_store::usage::{MAX_COST_MICROS_PER_EVENT, MAX_QUOTA_COST, MAX_RESPONSE_TIME_MS, MAX_TOKENS_PER_EVENT};
    assert_eq!(range(&report["status_code"]), (Some(100), Some(599)));
    assert_eq!(range(&report["response_time_ms"]), (Some(0), Some(MAX_RESPONSE_TIME_MS)));
    assert_eq!(range(&report["tokens_used"]), (Some(0), Some(MAX_TOKENS_PER_EVENT)));
    assert_eq!(range(&report["cost_micros"]), (Some(0), Some(MAX_COST_MICROS_PER_EVENT)));
    assert_eq!((report["id"]["minLength"].as_i64(), report["id"]["maxLength"].as_i64()), (Some(1), Some(128)));
    let events = &schemas["UsageReportBatch"]["properties"]["events"];
    assert_eq!(
        (events["minItems"].as_u64(), events["maxItems"].as_u64()),
        (Some(1), Some(keyward_server::routes::usage::MAX_REPORT_EVENTS as u64))
    );
    let cost = &schemas["VerifyKeyRequest"]["properties"]["cost"];
    assert_eq!(range(cost), (Some(0), i64::try_from(MAX_QUOTA_COST).ok()));
}

/// Rows an older version wrote without bounds (i64::MAX tokens and cost, in two batches) for one
/// organization: the writer's fold still succeeds, that key's usage reads as i64::MAX, and another
/// organization's reports reach its rollups exactly.
async fn extreme_rows_of_one_organization_do_not_stop_the_others(app: TestApp) {
    use keyward_store::usage::{UsageEvent, UsageKind};
    let other = app.org("extreme").await;
    let (_, bad) = app.key(other.id, &[]).await;
    let (_, good) = app.key(app.default_org.id, &[]).await;
    for batch in 0..2 {
        let mut e = UsageEvent::new(UsageKind::Report, bad.id, other.id, t0());
        (e.tokens_used, e.cost_micros) = (i64::MAX, i64::MAX);
        e.idempotency_id = Some(format!("old-{batch}"));
        app.state.store.record_usage_batch(&[e]).await.unwrap();
    }
    let report = json!({"id": "fine", "key_id": good.id.to_string(), "tokens_used": 12, "cost_micros": 34});
    assert_eq!(app.post("/v1/usage", &app.admin_key, report).await.status, StatusCode::ACCEPTED);
    assert!(app.state.usage.flush().await, "the fold goes through");
    let r = app.get(&format!("/v1/keys/{}/usage?days=1", good.id), &app.admin_key).await;
    assert_eq!(
        (r.body["totals"]["tokens_used"].clone(), r.body["totals"]["cost_micros"].clone()),
        (json!(12), json!(34))
    );
    let r = app.get(&format!("/v1/keys/{}/usage?days=1", bad.id), &app.admin_key).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["totals"]["cost_micros"], i64::MAX);
    let month = t0().format("%Y-%m").to_string();
    let r = app.get(&format!("/v1/organizations/{}/usage?month={month}", other.id), &app.admin_key).await;
    assert_eq!((r.status, r.body["totals"]["tokens_used"].clone()), (StatusCode::OK, json!(i64::MAX)), "{}", r.text);
}

on_every_backend!(extreme_rows_of_one_organization_do_not_stop_the_others);

#[tokio::test]
async fn verify_refuses_a_bad_endpoint_or_method() {
    let app = TestApp::sqlite().await;
    let (key, _) = app.key(app.default_org.id, &[]).await;
    for (extra, field) in [
        (json!({"endpoint": ""}), "endpoint"),
        (json!({"endpoint": "/a\u{7}"}), "endpoint"),
        (json!({"method": "GE T"}), "method"),
        (json!({"method": "X".repeat(17)}), "method"),
    ] {
        let mut body = json!({"key": key});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let r = app.post("/v1/verify", &app.admin_key, body).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
        assert_eq!(r.body["error"]["field"], field);
    }
}

#[tokio::test]
async fn key_usage_refuses_bad_queries_and_other_organizations() {
    let app = TestApp::sqlite().await;
    let (_, rec) = app.key(app.default_org.id, &[]).await;
    let path = format!("/v1/keys/{}/usage", rec.id);
    for q in ["?days=0", "?days=367", "?days=abc", "?days=-1", "?weeks=2"] {
        let r = app.get(&format!("{path}{q}"), &app.admin_key).await;
        assert_eq!((r.status, code(&r)), (StatusCode::BAD_REQUEST, "invalid_query"), "{q}: {}", r.text);
    }
    let r = app.get(&format!("/v1/keys/{}/usage", keyward_core::KeyId::new()), &app.admin_key).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app.get("/v1/keys/not-an-id/usage", &app.admin_key).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    // Tenant isolation: another organization's reader gets 404, exactly as for an unknown key.
    let other = app.org("other-reader").await;
    let (reader, _) = app.key(other.id, &["keyward:keys:read"]).await;
    let r = app.get(&path, &reader).await;
    assert_eq!((r.status, code(&r)), (StatusCode::NOT_FOUND, "not_found"));
    // A self-service key sees its own owner's keys only.
    let own = CreateKeyRequest { name: "own".into(), owner_id: Some("cust-1".into()), ..Default::default() };
    let (_, own) = app.key_with(app.default_org.id, own).await;
    let me = CreateKeyRequest {
        name: "me".into(),
        owner_id: Some("cust-1".into()),
        scopes: vec!["keyward:self".into()],
        ..Default::default()
    };
    let (me, _) = app.key_with(app.default_org.id, me).await;
    assert_eq!(app.get(&format!("/v1/keys/{}/usage", own.id), &me).await.status, StatusCode::OK);
    assert_eq!(app.get(&path, &me).await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn org_usage_is_for_admins_and_the_organization_itself() {
    let app = TestApp::sqlite().await;
    let other = app.org("billing-other").await;
    let (reader, _) = app.key(other.id, &["keyward:keys:read"]).await;
    let (writer_only, _) = app.key(other.id, &["keyward:verify", "keyward:audit:read"]).await;
    let own = format!("/v1/organizations/{}/usage", other.id);
    let r = app.get(&own, &reader).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["month"], t0().format("%Y-%m").to_string());
    assert_eq!(r.body["keys"], json!([]));
    assert_eq!(app.get(&own, &app.admin_key).await.status, StatusCode::OK);
    let r = app.get(&own, &writer_only).await;
    assert_eq!((r.status, code(&r)), (StatusCode::FORBIDDEN, "insufficient_scope"));
    // Tenant isolation: another organization is not found, like an unknown one.
    let r = app.get(&format!("/v1/organizations/{}/usage", app.default_org.id), &reader).await;
    assert_eq!((r.status, code(&r)), (StatusCode::NOT_FOUND, "not_found"));
    let r = app.get(&format!("/v1/organizations/{}/usage", keyward_core::OrgId::new()), &app.admin_key).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    for q in ["?month=2030-13", "?month=2030-1", "?month=june", "?year=2030"] {
        let r = app.get(&format!("{own}{q}"), &reader).await;
        assert_eq!((r.status, code(&r)), (StatusCode::BAD_REQUEST, "invalid_query"), "{q}");
    }
}

fn monthly_quota_of(limit: i64) -> OrganizationPatch {
    let limits = keyward_store::LimitPatch { monthly_request_limit: Some(Some(limit)), ..Default::default() };
    OrganizationPatch { limits, ..Default::default() }
}

/// The monthly quota survives a restart exactly (one node): a new AppState on the
/// same database seeds the month's count from the durable counters the ledger kept.
#[tokio::test]
async fn monthly_quota_survives_a_restart() {
    let app = TestApp::sqlite().await;
    let org = app.org("quota-restart").await;
    let patch = monthly_quota_of(5);
    app.state.store.update_org(org.id, patch, &Actor::cli(t0())).await.unwrap().apply(&app.state.keys);
    let (key, _) = app.key(org.id, &[]).await;
    for _ in 0..2 {
        assert_eq!(app.verify(&key, json!({"cost": 2})).await["code"], "VALID");
    }
    assert!(app.state.usage.flush().await);

    // "Restart": a new node (new cache, limiter and writer) on the same database and clock.
    let node = app.another_node(settings()).await;
    let restarted = app.with_state(node.state);
    let v = restarted.verify(&key, json!({})).await;
    assert_eq!(v["code"], "VALID");
    assert_eq!(v["quota"]["used"], 5, "4 units before the restart + 1");
    assert_eq!(restarted.verify(&key, json!({})).await["code"], "QUOTA_EXCEEDED");
    // The next month starts from zero.
    restarted.clock.advance(Days::days(31));
    assert_eq!(restarted.verify(&key, json!({})).await["code"], "VALID");
}

/// PostgreSQL refusing every ledger write for a while (a table every batch writes renamed away from
/// under the running server: each batch transaction fails, as it would with the server down, while key
/// lookups still answer so requests keep coming), events past the memory bound spilled to disk: once
/// the table is back, every event is in the store, once. With every raw event kept, the raw rows'
/// table goes away; with the default (no raw row for a VALID verification), the batch ids'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_loses_nothing() {
    store_outage_loses_nothing("usage::a_store_outage_loses_nothing", RawEvents::All, "usage_events").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_loses_nothing_without_raw_rows() {
    let name = "usage::a_store_outage_loses_nothing_without_raw_rows";
    store_outage_loses_nothing(name, RawEvents::default(), "usage_batches").await;
}

async fn store_outage_loses_nothing(name: &str, raw_events: RawEvents, table: &str) {
    let Some(mut app) = TestApp::postgres(name).await else { return };
    let dir = tempfile::tempdir().unwrap();
    let spill = dir.path().join("spill.jsonl");
    let config = UsageConfig {
        batch_size: 10,
        max_buffered: 15,
        retry_initial: Duration::from_millis(1),
        retry_max: Duration::from_millis(5),
        raw_events,
        ..UsageConfig::new(Duration::from_secs(3600), spill.clone())
    };
    let (usage, worker) = UsageRecorder::spawn_with(app.state.store.clone(), config);
    app.reconfigure(|b| b.usage(usage));
    let (key, rec) = app.key(app.default_org.id, &[]).await;
    // Seed the quota counter first: the limiter reads the store once per month and subject.
    assert_eq!(app.verify(&key, json!({})).await["code"], "VALID");
    assert!(app.state.usage.flush().await);

    let schema = schema_of(&app);
    let admin = sqlx::PgPool::connect(&keyward_store::testing::base_url()).await.unwrap();
    let rename = |from: &str, to: &str| {
        let (admin, sql) = (admin.clone(), format!("ALTER TABLE \"{schema}\".{from} RENAME TO {to}"));
        async move { sqlx::query(&sql).execute(&admin).await.unwrap() }
    };
    let away = format!("{table}_away");
    rename(table, &away).await;
    for i in 0..40 {
        assert_eq!(app.verify(&key, json!({"endpoint": format!("/e{}", i % 4)})).await["code"], "VALID");
        if i % 10 == 9 {
            assert!(!app.state.usage.flush().await, "the store is away: the flush must fail, keeping the events");
        }
    }
    // A line per batch, whole: its folded events and its raw ones.
    let spilled: u64 = std::fs::read_to_string(&spill)
        .unwrap_or_default()
        .lines()
        .map(|line| {
            let batch = &serde_json::from_str::<serde_json::Value>(line).unwrap()["fold"];
            batch["folded"]["events"].as_u64().unwrap() + batch["raw"].as_array().unwrap().len() as u64
        })
        .sum();
    assert!(spilled >= 25, "past the memory bound events went to the spill file: {spilled}");
    rename(&away, table).await;

    assert!(app.state.usage.flush().await, "the store is back");
    worker.shutdown().await;
    assert_eq!(std::fs::read_to_string(&spill).unwrap_or_default(), "", "the spill file was replayed and emptied");
    let raw = app.state.store.usage_event_totals(rec.id, t0() - Days::days(1), t0() + Days::days(1)).await.unwrap();
    assert_eq!(raw.events, if raw_events == RawEvents::All { 41 } else { 0 });
    let stored = app.state.store.get_key(rec.id).await.unwrap();
    assert_eq!(stored.total_requests, 41);
    let subject = format!("quota:org:{}", app.default_org.id);
    assert_eq!(app.state.store.quota_used(&subject, &t0().format("%Y-%m").to_string()).await.unwrap(), 41);
    let r = app.get(&format!("/v1/keys/{}/usage?days=1", rec.id), &app.admin_key).await;
    assert_eq!(r.body["totals"]["requests"], 41, "{}", r.body);
    admin.close().await;
}

fn schema_of(app: &TestApp) -> String {
    match app.guard() {
        Guard::Schema(s) => s.name().to_owned(),
        _ => panic!("not a PostgreSQL app"),
    }
}

/// SECURITY: no full key in a usage row (events, rollups, quota counters) or in `/metrics`.
#[tokio::test]
async fn usage_rows_and_metrics_hold_no_key() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("k.db").display());
    let store = keyward_store::open(&url, true).await.unwrap();
    let app = TestApp::with_store(store, Guard::None).await;
    let (key, rec) = app.key(app.default_org.id, &[]).await;
    app.verify(&key, json!({"endpoint": "/v1/x", "method": "GET", "ip": "198.51.100.9"})).await;
    app.verify(&key, json!({"required_scopes": ["admin:all"]})).await;
    let r = app
        .post("/v1/usage", &app.admin_key, json!({"id": "r", "key_id": rec.id.to_string(), "error_message": "boom"}))
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert!(app.state.usage.flush().await);
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    let mut dump = String::new();
    for sql in [
        "SELECT key_id || organization_id || day FROM usage_daily",
        "SELECT key_id || day || endpoint FROM usage_daily_endpoints",
        "SELECT subject || month FROM quota_usage",
    ] {
        let rows: Vec<String> = sqlx::query_scalar(sql).fetch_all(&pool).await.unwrap();
        assert!(!rows.is_empty(), "{sql}");
        dump.push_str(&rows.join("\n"));
    }
    let events: Vec<(String, String, Option<String>)> =
        sqlx::query_as("SELECT key_id, kind, ip FROM usage_events").fetch_all(&pool).await.unwrap();
    assert_eq!(events.len(), 3);
    for (key_id, _, _) in &events {
        assert_eq!(key_id, &rec.id.to_string());
    }
    let all: Vec<String> = sqlx::query_scalar(
        "SELECT id || key_id || organization_id || occurred_at || kind || COALESCE(outcome,'') || COALESCE(endpoint,'') \
         || COALESCE(ip,'') || COALESCE(user_agent,'') || COALESCE(error_message,'') || COALESCE(idempotency_id,'') \
         FROM usage_events",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    dump.push_str(&all.join("\n"));
    let metrics = app.call(Method::GET, "/metrics", None, None).await.text;
    assert!(metrics.contains("keyward_usage_events_written_total"), "{metrics}");
    for secret in [&key, &app.admin_key] {
        let body = &secret[8..];
        assert!(!dump.contains(body), "a key is in a usage row");
        assert!(!metrics.contains(body), "a key is in /metrics");
    }
    pool.close().await;
}

#[tokio::test]
async fn pruning_deletes_old_events_and_keeps_rollups() {
    let app = TestApp::sqlite().await;
    let (key, rec) = app.key(app.default_org.id, &[]).await;
    app.verify(&key, json!({})).await;
    app.clock.advance(Days::days(91));
    app.verify(&key, json!({})).await;
    assert!(app.state.usage.flush().await);
    let before = app.clock.now_utc() - Days::days(90);
    assert_eq!(keyward_server::usage::prune_once(&*app.state.store, before).await, 1);
    let raw = app.state.store.usage_event_totals(rec.id, t0() - Days::days(1), t0() + Days::days(100)).await.unwrap();
    assert_eq!(raw.events, 1);
    let r = app.get(&format!("/v1/keys/{}/usage?days=100", rec.id), &app.admin_key).await;
    assert_eq!(r.body["totals"]["requests"], 2, "rollups stay");
}

/// Swaps the app's usage writer for one flushing every 10 ms and folding every `fold_interval`,
/// keeping every raw event (the raw rows show when a batch was written).
fn writer_folding_every(app: &mut TestApp, fold_interval: Duration) -> UsageWorker {
    let spill = std::env::temp_dir().join(format!("kw-spill-{}", uuid::Uuid::now_v7()));
    let config =
        UsageConfig { fold_interval, raw_events: RawEvents::All, ..UsageConfig::new(Duration::from_millis(10), spill) };
    let (usage, worker) = UsageRecorder::spawn_with(app.state.store.clone(), config);
    app.reconfigure(|b| b.usage(usage));
    worker
}

/// Polls `done` every 10 ms until it holds; fails after 10 s.
async fn eventually<F: std::future::Future<Output = bool>>(what: &str, mut done: impl FnMut() -> F) {
    let polled = tokio::time::timeout(Duration::from_secs(10), async {
        while !done().await {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    assert!(polled.await.is_ok(), "{what}");
}

/// Batches write the events and the quota counter at once; the rollups and the key's counters catch up
/// at the next fold: not before the fold interval, by itself after it, at once on a flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_catch_up_at_each_fold_interval() {
    let mut app = TestApp::sqlite().await;
    let (key, rec) = app.key(app.default_org.id, &[]).await;
    let store = app.state.store.clone();
    let written = || {
        let store = store.clone();
        async move { store.usage_event_totals(rec.id, t0() - Days::days(1), t0() + Days::days(1)).await.unwrap().events }
    };
    let folded = || {
        let store = store.clone();
        async move { store.key_usage_daily(rec.id, day(0), day(0)).await.unwrap().first().map_or(0, |d| d.counts.requests) }
    };
    // A fold interval of an hour: the writer's own writes (every 10 ms) leave the rollups behind.
    let worker = writer_folding_every(&mut app, Duration::from_secs(3600));
    assert_eq!(app.verify(&key, json!({})).await["code"], "VALID");
    eventually("the writer wrote the event by itself", || async { written().await >= 1 }).await;
    assert_eq!(folded().await, 0, "not folded before the interval");
    assert_eq!(store.get_key(rec.id).await.unwrap().total_requests, 0);
    assert!(app.state.usage.flush().await);
    assert_eq!(folded().await, 1, "a flush folds");
    assert_eq!(store.get_key(rec.id).await.unwrap().total_requests, 1);
    worker.shutdown().await;

    // A fold interval of 20 ms: the rollups catch up without a flush.
    let worker = writer_folding_every(&mut app, Duration::from_millis(20));
    assert_eq!(app.verify(&key, json!({})).await["code"], "VALID");
    eventually("the writer folded by itself", || async { folded().await >= 2 }).await;
    assert_eq!(store.get_key(rec.id).await.unwrap().total_requests, 2);
    worker.shutdown().await;
}

/// With Redis: a node whose Redis has no counter for the month (a fresh prefix: Redis flushed or
/// replaced) seeds it from the store's durable count, then counts in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_quota_is_reconciled_with_the_store() {
    if std::env::var("KEYWARD_TEST_SKIP_REDIS").is_ok_and(|v| v == "1") {
        eprintln!("!!!!! SKIPPED redis_quota_is_reconciled_with_the_store: KEYWARD_TEST_SKIP_REDIS=1 !!!!!");
        return;
    }
    let url = std::env::var("KEYWARD_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let app = TestApp::sqlite().await;
    let org = app.org("quota-redis").await;
    let patch = monthly_quota_of(5);
    app.state.store.update_org(org.id, patch, &Actor::cli(t0())).await.unwrap().apply(&app.state.keys);
    let (key, _) = app.key(org.id, &[]).await;
    assert_eq!(app.verify(&key, json!({"cost": 3})).await["code"], "VALID");
    assert!(app.state.usage.flush().await);

    // Another node, limited on Redis under a prefix of the test's own (the Redis is shared).
    let other = app.another_node(settings()).await.state;
    let prefix = format!("keyward:rl:test:{}", uuid::Uuid::new_v4().simple());
    let config = keyward_limit::RedisConfig::new(url).with_key_prefix(prefix);
    let redis = keyward_limit::RedisLimiter::connect(config).await.expect("Redis at 127.0.0.1:6379");
    let limiter = Arc::new(redis.with_quota_seed(Arc::new(StoreQuotaSeed::new(other.store.clone()))));
    let node = app.with_state(other.to_builder().limiter(limiter).build());
    let v = node.verify(&key, json!({})).await;
    assert_eq!((v["code"].clone(), v["quota"]["used"].clone()), (json!("VALID"), json!(4)), "{v}");
    assert_eq!(node.verify(&key, json!({})).await["quota"]["used"], 5);
    assert_eq!(node.verify(&key, json!({})).await["code"], "QUOTA_EXCEEDED");
}

/// `usage.export`: a valid and a refused verification and a report are each a line of a complete
/// segment once the writer has stopped, in the order they were made, with no key in any line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_usage_event_is_exported() {
    let mut app = TestApp::sqlite().await;
    let dir = tempfile::tempdir().unwrap();
    let export = dir.path().join("export");
    let config = UsageConfig {
        export: Some(keyward_server::settings::ExportConfig::new(export.clone())),
        ..UsageConfig::new(Duration::from_secs(3600), dir.path().join("spill.jsonl"))
    };
    let (usage, worker) = UsageRecorder::spawn_with(app.state.store.clone(), config);
    app.reconfigure(|b| b.usage(usage));
    let (key, rec) = app.key(app.default_org.id, &["read:a"]).await;
    let valid = app.verify(&key, json!({"endpoint": "/v1/chat", "method": "post"})).await;
    assert_eq!(valid["code"], "VALID");
    assert_eq!(app.verify(&key, json!({"required_scopes": ["write:a"]})).await["code"], "INSUFFICIENT_SCOPE");
    let report = json!({"id": "r1", "key_id": rec.id.to_string(), "status_code": 201, "response_time_ms": 12,
        "tokens_used": 7, "cost_micros": 30, "endpoint": "/v1/chat"});
    let r = app.post("/v1/usage", &app.admin_key, json!({"events": [report]})).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    worker.shutdown().await;

    let segments = keyward_server::export::complete_segments(&export).unwrap();
    assert_eq!(segments.len(), 1, "one segment, completed at shutdown");
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut flate2::read::GzDecoder::new(std::fs::File::open(&segments[0]).unwrap()),
        &mut text,
    )
    .unwrap();
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let seen: Vec<(&str, &str, &Value, &Value)> = lines
        .iter()
        .map(|l| (l["kind"].as_str().unwrap(), l["key_id"].as_str().unwrap(), &l["outcome"], &l["tokens"]))
        .collect();
    let id = rec.id.to_string();
    assert_eq!(
        seen,
        [
            ("verify", id.as_str(), &json!("VALID"), &json!(0)),
            ("verify", id.as_str(), &json!("INSUFFICIENT_SCOPE"), &json!(0)),
            ("report", id.as_str(), &Value::Null, &json!(7)),
        ]
    );
    assert_eq!((lines[0]["endpoint"].as_str(), lines[2]["status"].as_i64()), (Some("/v1/chat"), Some(201)));
    // SECURITY: neither the key nor its body.
    assert!(!text.contains(&key) && !text.contains(key.rsplit('_').next().unwrap()), "{text}");
}
