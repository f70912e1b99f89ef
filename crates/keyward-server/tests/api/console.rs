//! The web console through the router: its headers, the session cookie, sign-in counted like any
//! failed authentication, CSRF and origin checks, and sessions that end on expiry or when their key
//! is revoked. (A real browser drives it in `crates/keyward/tests/console.rs`.)

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Method, Request, StatusCode};

use crate::helpers::{Response, TestApp, request};

/// A form POST (or a GET with no `form`) from 203.0.113.7 with these headers.
fn page(method: Method, path: &str, headers: &[(&str, &str)], form: Option<&str>) -> Request<Body> {
    let mut builder = Request::builder().method(method).uri(path);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let body = match form {
        Some(f) => {
            builder = builder.header("content-type", "application/x-www-form-urlencoded");
            Body::from(f.to_owned())
        }
        None => Body::empty(),
    };
    let mut req = builder.body(body).unwrap();
    req.extensions_mut().insert(ConnectInfo(SocketAddr::from(([203, 0, 113, 7], 40000))));
    req
}

/// Signs in with `key`: the `Set-Cookie` of the answer.
async fn sign_in(app: &TestApp, key: &str) -> Response {
    let form = format!("key={}", key);
    app.send(page(Method::POST, "/console/sign-in", &[], Some(&form))).await
}

/// The `name=value` of a session cookie.
fn session(r: &Response) -> String {
    let cookie = r.headers.get("set-cookie").unwrap().to_str().unwrap();
    cookie.split(';').next().unwrap().to_owned()
}

async fn get(app: &TestApp, path: &str, cookie: &str) -> Response {
    app.send(page(Method::GET, path, &[("cookie", cookie)], None)).await
}

/// The value of the first hidden `csrf` field of a page.
fn csrf(html: &str) -> String {
    let at = html.find("name=\"csrf\" value=\"").unwrap() + 19;
    html[at..at + 64].to_owned()
}

fn location(r: &Response) -> &str {
    r.headers.get("location").unwrap().to_str().unwrap()
}

#[tokio::test]
async fn pages_send_a_strict_policy_and_assets_a_long_cache() {
    let app = TestApp::sqlite().await;
    let r = get(&app, "/console", "").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.headers["content-security-policy"],
        "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; form-action 'self'; \
         frame-ancestors 'none'; base-uri 'none'"
    );
    assert_eq!(r.headers["x-content-type-options"], "nosniff");
    assert_eq!(r.headers["referrer-policy"], "no-referrer");
    assert_eq!(r.headers["cache-control"], "no-store");
    assert!(r.text.contains("<label for=\"key\">"), "{}", r.text);
    assert!(!r.text.contains("<script>") && !r.text.contains("style="), "no inline script or style");
    let css = r.text.split("href=\"").nth(1).unwrap().split('"').next().unwrap();
    let asset = get(&app, css, "").await;
    assert_eq!(asset.status, StatusCode::OK);
    assert!(asset.headers["cache-control"].to_str().unwrap().contains("max-age=31536000"));
    assert_eq!(get(&app, "/console/static/console.0.css", "").await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_console_can_be_turned_off() {
    let mut app = TestApp::sqlite().await;
    let off = keyward_server::settings::ConsoleSettings { enabled: false, ..Default::default() };
    app.reconfigure(|b| b.console(off));
    assert_eq!(get(&app, "/console", "").await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_session_cookie_is_http_only_strict_and_never_the_key() {
    let mut app = TestApp::sqlite().await;
    let r = sign_in(&app, &app.admin_key).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text);
    assert_eq!(location(&r), "/console/keys");
    let cookie = r.headers["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.starts_with("keyward_session="), "{cookie}");
    assert!(
        cookie.contains("; HttpOnly") && cookie.contains("; SameSite=Strict") && cookie.contains("; Path=/console")
    );
    assert!(!cookie.contains("Secure"), "plain HTTP from an untrusted peer");
    assert!(!cookie.contains(&app.admin_key) && !cookie.contains(&app.admin_key[8..20]), "{cookie}");
    let keys = get(&app, "/console/keys", &session(&r)).await;
    assert_eq!(keys.status, StatusCode::OK, "{}", keys.text);
    assert!(keys.text.contains("bootstrap admin"));
    assert!(!keys.text.contains(&app.admin_key));

    // Behind a trusted proxy that says https, the cookie is Secure; from anyone else the header is ignored.
    app.reconfigure(|b| b.trusted_proxies(vec!["203.0.113.0/24".parse().unwrap()]));
    let form = format!("key={}", app.admin_key);
    let proxied =
        app.send(page(Method::POST, "/console/sign-in", &[("x-forwarded-proto", "https")], Some(&form))).await;
    assert!(proxied.headers["set-cookie"].to_str().unwrap().ends_with("; Secure"));
}

#[tokio::test]
async fn failed_sign_ins_count_against_the_failed_authentication_limit() {
    let app = TestApp::sqlite().await;
    let wrong = format!("{}x", &app.admin_key[..app.admin_key.len() - 1]);
    let r = sign_in(&app, &wrong).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.headers.get("set-cookie").is_none());
    for _ in 0..10 {
        sign_in(&app, "sk_live_nope").await;
    }
    // Past the limit even the right key is refused, on the console as on the API.
    let r = sign_in(&app, &app.admin_key).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text);
    assert_eq!(app.get("/v1/me", &app.admin_key).await.status, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn a_key_that_may_not_read_keys_cannot_sign_in() {
    let app = TestApp::sqlite().await;
    let (verify_only, _) = app.key(app.default_org.id, &["keyward:verify"]).await;
    let r = sign_in(&app, &verify_only).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(r.headers.get("set-cookie").is_none());
}

#[tokio::test]
async fn forms_need_their_csrf_token_and_the_same_origin() {
    let app = TestApp::sqlite().await;
    let cookie = session(&sign_in(&app, &app.admin_key).await);
    let token = csrf(&get(&app, "/console/keys/new", &cookie).await.text);
    let post = |headers: Vec<(&'static str, String)>, form: String| {
        let mut all: Vec<(&str, String)> = vec![("cookie", cookie.clone())];
        all.extend(headers);
        let refs: Vec<(&str, &str)> = all.iter().map(|(n, v)| (*n, v.as_str())).collect();
        app.send(page(Method::POST, "/console/keys", &refs, Some(&form)))
    };
    assert_eq!(post(vec![], "name=a".into()).await.status, StatusCode::FORBIDDEN);
    assert_eq!(post(vec![], format!("name=a&csrf={}", "0".repeat(64))).await.status, StatusCode::FORBIDDEN);
    let cross = vec![("sec-fetch-site", "cross-site".to_owned())];
    assert_eq!(post(cross, format!("name=a&csrf={token}")).await.status, StatusCode::FORBIDDEN);
    let foreign = vec![("origin", "http://evil.example".to_owned()), ("host", "keyward.test".to_owned())];
    assert_eq!(post(foreign, format!("name=a&csrf={token}")).await.status, StatusCode::FORBIDDEN);
    let created = post(vec![], format!("name=a&csrf={token}")).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    assert!(created.text.contains("Copy this key now"));
    assert_eq!(created.headers["cache-control"], "no-store");
    let out = app.send(page(Method::POST, "/console/sign-out", &[("cookie", &cookie)], Some(""))).await;
    assert_eq!(out.status, StatusCode::FORBIDDEN, "signing out is a form too");
}

#[tokio::test]
async fn a_session_ends_when_idle_past_its_limit_and_when_its_key_is_revoked() {
    let app = TestApp::sqlite().await;
    let cookie = session(&sign_in(&app, &app.admin_key).await);
    app.clock.advance(chrono::Duration::seconds(1799));
    assert_eq!(get(&app, "/console/keys", &cookie).await.status, StatusCode::OK);
    app.clock.advance(chrono::Duration::seconds(1801));
    let r = get(&app, "/console/keys", &cookie).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(location(&r), "/console");

    let (manager, record) = app.key(app.default_org.id, &["keyward:keys:write"]).await;
    let cookie = session(&sign_in(&app, &manager).await);
    assert_eq!(get(&app, "/console/keys", &cookie).await.status, StatusCode::OK);
    let revoked =
        app.send(request(Method::DELETE, &format!("/v1/keys/{}", record.id), Some(&app.admin_key), None)).await;
    assert_eq!(revoked.status, StatusCode::NO_CONTENT);
    assert_eq!(get(&app, "/console/keys", &cookie).await.status, StatusCode::SEE_OTHER);
    assert_eq!(app.state.console.sessions.len(), 0, "both sessions are gone");
}

#[tokio::test]
async fn a_self_service_session_sees_its_own_owner_s_keys_only() {
    let app = TestApp::sqlite().await;
    let org = app.default_org.id;
    let (customer, _) = app.owned_key(org, "alice", &["keyward:self"]).await;
    let (_, bobs) = app.owned_key(org, "bob", &[]).await;
    let cookie = session(&sign_in(&app, &customer).await);
    let list = get(&app, "/console/keys?owner=bob&status=all", &cookie).await;
    assert_eq!(list.status, StatusCode::OK);
    assert!(list.text.contains("alice&#39;s key") || list.text.contains("alice's key"), "{}", list.text);
    assert!(!list.text.contains("bob&#39;s key") && !list.text.contains("bob's key"), "{}", list.text);
    assert_eq!(get(&app, &format!("/console/keys/{}", bobs.id), &cookie).await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn keys_signed_in_with_or_created_in_the_console_are_never_logged() {
    let capture = crate::secrets::capture_logs();
    let app = TestApp::sqlite().await;
    let mut truncated = app.admin_key.clone();
    truncated.pop();
    assert_eq!(sign_in(&app, &truncated).await.status, StatusCode::UNAUTHORIZED);
    let signed = sign_in(&app, &app.admin_key).await;
    let cookie = session(&signed);
    let token = csrf(&get(&app, "/console/keys/new", &cookie).await.text);
    let form = format!("name=logged&csrf={token}");
    let created = app.send(page(Method::POST, "/console/keys", &[("cookie", &cookie)], Some(&form))).await;
    let at = created.text.find("id=\"new-key\"").unwrap();
    let key = created.text[at..].split("value=\"").nth(1).unwrap().split('"').next().unwrap().to_owned();
    assert!(key.starts_with("sk_live_"), "{key}");
    let id = created.text.split("action=\"/console/keys/").nth(1).unwrap().split('/').next().unwrap().to_owned();
    let again = get(&app, &format!("/console/keys/{id}"), &cookie).await;
    assert!(!again.text.contains(&key[8..40]), "shown once only");
    sign_in(&app, &key).await;

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("console session started"), "the capture works");
    for secret in [&key, &app.admin_key, &truncated] {
        assert!(!logs.contains(&secret[8..40]), "logs contain a key");
        assert!(!signed.headers["set-cookie"].to_str().unwrap().contains(&secret[8..40]));
    }
}

const XSS: &str = "<img src=x onerror=alert(1)>";

/// Signs `key` in and reads `path`: the page's text (asserting 200).
async fn page_of(app: &TestApp, key: &str, path: &str, status: StatusCode) -> String {
    let cookie = session(&sign_in(app, key).await);
    let r = get(app, path, &cookie).await;
    assert_eq!(r.status, status, "{path}: {}", r.text);
    assert!(!r.text.contains("style=") && !r.text.contains("<script>"), "no inline style or script");
    r.text
}

#[tokio::test]
async fn a_key_page_charts_its_usage_with_a_table_and_escaped_endpoints() {
    let app = TestApp::sqlite().await;
    let org = app.default_org.id;
    let (alices, alice) = app.owned_key(org, "alice", &["keyward:self"]).await;
    app.verify(&alices, serde_json::json!({"endpoint": "/v1/chat", "method": "POST"})).await;
    app.verify(&alices, serde_json::json!({"required_scopes": ["admin:all"]})).await;
    let report = serde_json::json!({"id": "r1", "key_id": alice.id.to_string(), "endpoint": XSS,
        "status_code": 500, "tokens_used": 1234, "cost_micros": 2_500_000});
    assert_eq!(app.post("/v1/usage", &app.admin_key, report).await.status, StatusCode::ACCEPTED);
    assert!(app.state.usage.flush().await);

    let text = page_of(&app, &app.admin_key, &format!("/console/keys/{}", alice.id), StatusCode::OK).await;
    assert!(text.contains("<svg class=\"chart\""), "{text}");
    assert!(text.contains("role=\"img\" aria-labelledby=\"usage-title usage-desc\""));
    assert!(text.contains("<title id=\"usage-title\">") && text.contains("<desc id=\"usage-desc\">"));
    assert_eq!(text.matches("<rect class=\"requests\"").count(), 30, "one bar a day for 30 days");
    assert!(text.contains("<caption>Requests, denied requests and errors per day (UTC)</caption>"));
    assert!(text.contains("<dt>Tokens</dt><dd>1234</dd>") && text.contains("$2.500000"), "{text}");
    assert!(text.contains("<code>/v1/chat</code>"));
    assert!(text.contains("&lt;img src=x onerror=alert(1)&gt;") && !text.contains(XSS), "endpoints are text");
    assert!(!text.contains("Where this key stands"), "the API shows standing to the key itself only");

    // The key itself (keyward:self) sees its own usage and where it stands; another owner's key, or
    // another organization's key, is not found, as through the API.
    let own = page_of(&app, &alices, &format!("/console/keys/{}", alice.id), StatusCode::OK).await;
    assert!(own.contains("<svg class=\"chart\"") && own.contains("Where this key stands"), "{own}");
    let (bobs, _) = app.owned_key(org, "bob", &["keyward:self"]).await;
    page_of(&app, &bobs, &format!("/console/keys/{}", alice.id), StatusCode::NOT_FOUND).await;
    let other = app.org("other").await;
    let (outsider, _) = app.key(other.id, &["keyward:keys:read"]).await;
    let text = page_of(&app, &outsider, &format!("/console/keys/{}", alice.id), StatusCode::NOT_FOUND).await;
    assert!(!text.contains("/v1/chat"));
}

#[tokio::test]
async fn a_key_page_shows_its_audit_trail_as_text_to_those_who_may_read_it() {
    let app = TestApp::sqlite().await;
    let org = app.default_org.id;
    let (alices, alice) = app.owned_key(org, "alice", &["keyward:self"]).await;
    let change = serde_json::json!({"name": XSS, "metadata": {"note": XSS}});
    let r = app.patch(&format!("/v1/keys/{}", alice.id), &app.admin_key, change).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let path = format!("/console/keys/{}", alice.id);

    let text = page_of(&app, &app.admin_key, &path, StatusCode::OK).await;
    assert!(text.contains("<h2 id=\"audit\">Audit trail</h2>"), "{text}");
    assert!(
        text.contains(
            "<code>name</code>: from <del>alice&#39;s key</del> to <ins>&lt;img src=x onerror=alert(1)&gt;</ins>"
        ) || text.contains(
            "<code>name</code>: from <del>alice's key</del> to <ins>&lt;img src=x onerror=alert(1)&gt;</ins>"
        ),
        "{text}"
    );
    assert!(
        text.contains("&lt;img src=x onerror=alert(1)&gt;&quot;}") && !text.contains(XSS),
        "metadata diffs are text"
    );

    // The audit log is the audit:read permission's: a key without it sees the key but no trail.
    let (reader, _) = app.key(org, &["keyward:keys:read"]).await;
    let (auditor, _) = app.key(org, &["keyward:keys:read", "keyward:audit:read"]).await;
    for (key, trail) in [(&alices, false), (&reader, false), (&auditor, true)] {
        let text = page_of(&app, key, &path, StatusCode::OK).await;
        assert_eq!(text.contains("Audit trail"), trail, "{text}");
        assert!(!text.contains(XSS));
    }
}

#[tokio::test]
async fn the_audit_log_page_filters_pages_and_shows_the_chain_to_audit_readers_only() {
    let app = TestApp::sqlite().await;
    let org = app.default_org.id;
    let (_, key) = app.key(org, &[]).await;
    for i in 0..51 {
        let rename = serde_json::json!({"name": format!("n{i}")});
        assert_eq!(app.patch(&format!("/v1/keys/{}", key.id), &app.admin_key, rename).await.status, StatusCode::OK);
    }
    let other = app.org("other").await;
    let (_, hidden) = app.key(other.id, &[]).await;
    app.patch(&format!("/v1/keys/{}", hidden.id), &app.admin_key, serde_json::json!({"name": "secret-rename"})).await;

    // An admin: the chain's status on top, newest first, 50 a page, the filters kept on the next page.
    let cookie = session(&sign_in(&app, &app.admin_key).await);
    let filtered = format!("/console/audit?key={}&action=update", key.id);
    let first = get(&app, &filtered, &cookie).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text);
    assert!(!first.text.contains("Audit chain intact"), "checked when asked only: {}", first.text);
    let check = first.text.split("id=\"check-chain\" href=\"").nth(1).unwrap().split('"').next().unwrap();
    let check = check.replace("&amp;", "&");
    assert!(check.contains("check=chain") && check.contains("action=update"), "{check}");
    let checked = get(&app, &check, &cookie).await;
    assert!(checked.text.contains("Audit chain intact"), "{}", checked.text);
    assert_eq!(checked.text.matches("<td data-label=\"Action\">update</td>").count(), 50);
    assert_eq!(first.text.matches("<td data-label=\"Action\">update</td>").count(), 50);
    assert!(first.text.contains("to <ins>n50</ins>") && !first.text.contains("secret-rename"));
    let next = first.text.split(" rel=\"next\"").next().unwrap().rsplit("href=\"/console/audit?").next().unwrap();
    let next = next.trim_end_matches('"').replace("&amp;", "&");
    assert!(next.contains(&format!("key={}", key.id)) && next.contains("action=update") && next.contains("cursor="));
    assert!(!next.contains("check="), "the next page does not check the chain again: {next}");
    let second = get(&app, &format!("/console/audit?{next}"), &cookie).await;
    assert_eq!(second.text.matches("<td data-label=\"Action\">update</td>").count(), 1, "{}", second.text);
    assert!(second.text.contains("to <ins>n0</ins>") && !second.text.contains("rel=\"next\""));

    // Filters are echoed as text; a bad time is the API's 400, said on the page.
    let bad = get(&app, "/console/audit?since=yesterday&actor=%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E", &cookie).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(bad.text.contains("`since` must be an RFC 3339 date-time") && !bad.text.contains(XSS), "{}", bad.text);
    let day = get(&app, "/console/audit?since=2999-01-01", &cookie).await;
    assert!(day.status == StatusCode::OK && day.text.contains("No audit rows."), "{}", day.text);

    // A broken chain says where it breaks.
    app.exec_sql("UPDATE audit_log SET actor = 'someone-else' WHERE id = 3").await;
    let broken = get(&app, "/console/audit?check=chain", &cookie).await;
    assert!(broken.text.contains("Audit chain broken at row 3: content_changed"), "{}", broken.text);

    // An organization's auditor sees its own organization's rows, not the chain (admin's); keys
    // without audit:read get the API's 403; audit:read alone cannot read keys, so cannot sign in.
    let (auditor, _) = app.key(org, &["keyward:audit:read"]).await;
    assert_eq!(sign_in(&app, &auditor).await.status, StatusCode::FORBIDDEN);
    let (auditor, _) = app.key(org, &["keyward:keys:read", "keyward:audit:read"]).await;
    let text = page_of(&app, &auditor, "/console/audit?check=chain", StatusCode::OK).await;
    assert!(text.contains("Only a keyward:admin key may check the audit chain") && text.contains("<ins>n50</ins>"));
    assert!(!text.contains("secret-rename"), "another organization's rows");
    let (reader, _) = app.key(org, &["keyward:keys:read"]).await;
    let (customer, _) = app.owned_key(org, "alice", &["keyward:self"]).await;
    for key in [&reader, &customer] {
        let text = page_of(&app, key, "/console/audit", StatusCode::FORBIDDEN).await;
        assert!(!text.contains("<ins>") && !text.contains("Audit chain"), "{text}");
    }
}

#[tokio::test]
async fn organizations_are_listed_created_and_changed_by_admins_only() {
    let app = TestApp::sqlite().await;
    let cookie = session(&sign_in(&app, &app.admin_key).await);
    let list = get(&app, "/console/organizations", &cookie).await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.text);
    assert!(list.text.contains(&app.default_org.slug) && !list.text.contains("style="));
    let token = csrf(&list.text);
    let post =
        |path: &str, form: String| app.send(page(Method::POST, path, &[("cookie", cookie.as_str())], Some(&form)));
    let name = "%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E";
    let created =
        post("/console/organizations", format!("csrf={token}&name={name}&slug=acme&plan=free&rate_limit_per_minute="))
            .await;
    assert_eq!(created.status, StatusCode::SEE_OTHER, "{}", created.text);
    let at = location(&created).to_owned();
    let id = at.rsplit('/').next().unwrap().to_owned();
    let shown = get(&app, &at, &cookie).await;
    assert!(shown.text.contains("&lt;img src=x onerror=alert(1)&gt;") && !shown.text.contains(XSS), "{}", shown.text);

    // Plan and limits through PATCH /v1/organizations/{id}: a blank limit is the plan's (null).
    let form = format!("csrf={token}&name=Acme&plan=pro&rate_limit_per_minute=5&monthly_request_limit=&is_active=true");
    let changed = post(&at, form).await;
    assert_eq!(changed.status, StatusCode::SEE_OTHER, "{}", changed.text);
    let org = app.get(&format!("/v1/organizations/{id}"), &app.admin_key).await.body;
    assert_eq!((org["name"].clone(), org["plan"].clone()), (serde_json::json!("Acme"), serde_json::json!("pro")));
    assert_eq!(
        (org["rate_limit_per_minute"].clone(), org["monthly_request_limit"].clone()),
        (serde_json::json!(5), serde_json::Value::Null)
    );
    let shown = get(&app, &at, &cookie).await;
    assert!(
        shown.text.contains("value=\"5\"") && shown.text.contains("<option value=\"pro\" selected>"),
        "{}",
        shown.text
    );

    // The API's validation, said on a page; a form without its token or a number that is none.
    let bad = post("/console/organizations", format!("csrf={token}&name=x&slug=Not%20A%20Slug")).await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", bad.text);
    let bad = post(&at, format!("csrf={token}&name=x&rate_limit_per_hour=many")).await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", bad.text);
    assert_eq!(post(&at, "name=x&plan=enterprise".to_owned()).await.status, StatusCode::FORBIDDEN);
    assert_eq!(app.get(&format!("/v1/organizations/{id}"), &app.admin_key).await.body["plan"], "pro");
    assert_eq!(get(&app, "/console/organizations/nope", &cookie).await.status, StatusCode::NOT_FOUND);

    // Not an admin: the API's 403, on the pages and on the forms.
    let (writer, _) = app.key(app.default_org.id, &["keyward:keys:write"]).await;
    let (customer, _) = app.owned_key(app.default_org.id, "alice", &["keyward:self"]).await;
    for key in [&writer, &customer] {
        let cookie = session(&sign_in(&app, key).await);
        let r = get(&app, "/console/organizations", &cookie).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert!(!r.text.contains(&app.default_org.slug));
        assert_eq!(get(&app, &at, &cookie).await.status, StatusCode::FORBIDDEN);
        let form = "name=Mine&plan=enterprise".to_owned();
        let r = app.send(page(Method::POST, &at, &[("cookie", cookie.as_str())], Some(&form))).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
    }
    assert_eq!(app.get(&format!("/v1/organizations/{id}"), &app.admin_key).await.body["plan"], "pro");
}

/// The keys list searches and filters in the store, not within the page shown: a key 60 keys deep
/// is found, and the next page's link keeps the search and every filter.
#[tokio::test]
async fn the_keys_list_searches_the_store_and_its_links_keep_the_filters() {
    let app = TestApp::sqlite().await;
    let org = app.default_org.id;
    let request = |name: String, environment: &str, days: Option<i64>| keyward_server::service::CreateKeyRequest {
        name,
        owner_id: Some("carol".into()),
        environment: Some(environment.into()),
        expires_in_days: days,
        ..Default::default()
    };
    app.key_with(org, request("Deep Needle".into(), "test", Some(5))).await;
    for i in 0..60 {
        app.key_with(org, request(format!("hay {i}"), "live", None)).await;
    }
    for i in 0..55 {
        app.key_with(org, request(format!("needle {i}"), "test", Some(20))).await;
    }
    let cookie = session(&sign_in(&app, &app.admin_key).await);
    let found = get(&app, "/console/keys?q=DEEP&status=all", &cookie).await;
    assert_eq!(found.status, StatusCode::OK, "{}", found.text);
    assert!(found.text.contains("Deep Needle") && !found.text.contains("hay 0<"), "{}", found.text);

    let first = get(&app, "/console/keys?q=needle&environment=test&expiring=30&status=active", &cookie).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text);
    assert_eq!(first.text.matches("<tr>").count(), 1 + 50, "a header row and a page of 50");
    assert!(!first.text.contains("hay "), "{}", first.text);
    for control in ["<label for=\"q\">", "<label for=\"environment\">", "<label for=\"expiring\">"] {
        assert!(first.text.contains(control), "{control}: {}", first.text);
    }
    assert!(first.text.contains("<option value=\"30\" selected>"), "the filter stays selected");
    let next = first.text.split("href=\"/console/keys?").nth(1).unwrap().split('"').next().unwrap();
    let next = next.replace("&amp;", "&");
    for kept in ["q=needle", "environment=test", "expiring=30", "status=active", "cursor="] {
        assert!(next.contains(kept), "{kept} in {next}");
    }
    let second = get(&app, &format!("/console/keys?{next}"), &cookie).await;
    assert_eq!(second.status, StatusCode::OK, "{}", second.text);
    assert_eq!(second.text.matches("<tr>").count(), 1 + 6, "the 5 needles left and the deep one");
    assert!(second.text.contains("Deep Needle") && !second.text.contains("rel=\"next\""), "{}", second.text);

    let soon = get(&app, "/console/keys?expiring=7", &cookie).await;
    assert_eq!(soon.text.matches("<tr>").count(), 1 + 1, "only the key expiring in 5 days: {}", soon.text);
    let long = get(&app, &format!("/console/keys?q={}", "x".repeat(101)), &cookie).await;
    assert_eq!(long.status, StatusCode::BAD_REQUEST);
    assert!(long.text.contains("`q` must be 1-100 characters"), "{}", long.text);
    assert_eq!(get(&app, "/console/keys?expiring=soon", &cookie).await.status, StatusCode::BAD_REQUEST);
}
