//! `/openapi.json` says what the server enforces: every status a route answers, the configured plans,
//! and bounds that match the validators at their edges. (`scripts/schemathesis.sh` checks the whole
//! document against the server; these tests keep the parts that are easy to break by hand.)

use axum::http::{Method, StatusCode};
use keyward_server::ErrorCode;
use serde_json::{Value, json};

use crate::helpers::{TestApp, code};

async fn spec(app: &TestApp) -> Value {
    let r = app.call(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    r.body
}

#[tokio::test]
async fn every_route_documents_the_statuses_every_such_route_answers() {
    let app = TestApp::sqlite().await;
    let spec = spec(&app).await;
    let mut checked = 0;
    for (path, item) in spec["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let responses = op["responses"].as_object().unwrap();
            let lacks = |status: &str| !responses.contains_key(status);
            // An operation's own `security` overrides the document's; an empty one takes no key.
            let security = op.get("security").unwrap_or(&spec["security"]);
            if security.as_array().is_some_and(|s| !s.is_empty()) {
                for status in ["401", "403", "429", "503"] {
                    assert!(!lacks(status), "{method} {path} does not document {status}");
                }
            }
            if op["requestBody"]["content"].get("application/json").is_some() {
                for status in ["400", "408", "413", "415", "422"] {
                    assert!(!lacks(status), "{method} {path} takes JSON but does not document {status}");
                }
            }
            if path.contains('{') {
                assert!(!lacks("404"), "{method} {path} does not document 404");
            }
            checked += 1;
        }
    }
    assert!(checked >= 30, "only {checked} operations");
}

#[tokio::test]
async fn request_plans_are_the_configured_plans() {
    let app = TestApp::sqlite().await;
    let spec = spec(&app).await;
    for schema in ["CreateKeyRequest", "UpdateKeyRequest", "CreateOrganizationRequest", "UpdateOrganizationRequest"] {
        assert_eq!(
            spec["components"]["schemas"][schema]["properties"]["plan"]["enum"],
            json!(["enterprise", "free", "pro", null]),
            "{schema}"
        );
    }
}

#[tokio::test]
async fn request_schemas_refuse_unknown_fields() {
    let app = TestApp::sqlite().await;
    let spec = spec(&app).await;
    for (name, schema) in spec["components"]["schemas"].as_object().unwrap() {
        if name.ends_with("Request") && schema["type"] == "object" {
            assert_eq!(schema["additionalProperties"], json!(false), "{name}");
        }
    }
}

/// A name's bounds, as the schema states them, hold at the edges: the whitespace around a name counts
/// toward its 200 characters, and one made of whitespace only (as `str::trim` sees it) is refused.
#[tokio::test]
async fn names_are_bounded_as_the_schema_says() {
    let app = TestApp::sqlite().await;
    let spec = spec(&app).await;
    let name = &spec["components"]["schemas"]["Name"];
    assert_eq!((name["minLength"].as_u64(), name["maxLength"].as_u64()), (Some(1), Some(200)));
    let cases = [
        ("n".repeat(200), true),
        ("n".repeat(201), false),
        (format!(" {} ", "n".repeat(198)), true),
        (format!(" {} ", "n".repeat(199)), false),
        (" \t\u{3000}\u{85}".to_owned(), false),
        ("\u{1c}".to_owned(), true),
    ];
    for (i, (value, ok)) in cases.into_iter().enumerate() {
        let r = app.post("/v1/organizations", &app.admin_key, json!({"name": value, "slug": format!("s{i}")})).await;
        if ok {
            assert_eq!(r.status, StatusCode::CREATED, "{value:?}: {}", r.text);
        } else {
            assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{value:?}: {}", r.text);
            assert_eq!(r.body["error"]["field"], "name");
        }
    }
}

/// serde builds a struct from an array of its fields too; no schema admits that, so neither does the
/// server.
#[tokio::test]
async fn a_body_that_is_not_an_object_is_refused() {
    let app = TestApp::sqlite().await;
    let (_, rec) = app.key(app.default_org.id, &["read:x"]).await;
    let rotate = format!("/v1/keys/{}/rotate", rec.id);
    for body in [json!([null, null]), json!([]), json!(["name"]), json!(null), json!(7), json!("x")] {
        for path in [rotate.as_str(), "/v1/keys", "/v1/organizations", "/v1/webhooks"] {
            let r = app.post(path, &app.admin_key, body.clone()).await;
            assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{path} {body}: {}", r.text);
            assert_eq!(code(&r), "invalid_request", "{path} {body}");
        }
    }
    let r = app.get(&format!("/v1/keys/{}", rec.id), &app.admin_key).await;
    assert!(r.body["replaced_by"].is_null(), "nothing was rotated");
}

/// An unknown `organization_id` is a clear 422 naming the field on every route that takes one (it was
/// a foreign-key failure, 500, for webhooks on SQLite).
#[tokio::test]
async fn an_unknown_organization_is_named() {
    let app = TestApp::sqlite().await;
    let unknown = "e3e70682-c209-1cac-a29f-6fbed82c07cd";
    for (path, body) in [
        ("/v1/webhooks", json!({"url": "https://example.com/hook", "organization_id": unknown})),
        ("/v1/keys", json!({"name": "k", "organization_id": unknown})),
    ] {
        let r = app.post(path, &app.admin_key, body).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{path}: {}", r.text);
        assert_eq!(r.body["error"]["field"], "organization_id", "{path}");
    }
}

/// `error.code` is one of the error table's codes, and a response that names codes in its
/// description names codes of its own status: the document says what is answered.
#[tokio::test]
async fn error_codes_are_the_error_table() {
    let app = TestApp::sqlite().await;
    let spec = spec(&app).await;
    let table: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(spec["components"]["schemas"]["ErrorDetail"]["properties"]["code"]["enum"], json!(table));
    let mut named = 0;
    for (path, item) in spec["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            for (status, response) in op["responses"].as_object().unwrap() {
                let description = response["description"].as_str().unwrap_or_default();
                for word in description.split('`').skip(1).step_by(2) {
                    let Some(code) = ErrorCode::ALL.iter().find(|c| c.as_str() == word) else { continue };
                    assert_eq!(code.status().as_str(), status, "{method} {path}: `{word}` under {status}");
                    named += 1;
                }
            }
        }
    }
    assert!(named > 100, "only {named} codes named");
}
