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

/// The links of a page's header navigation.
fn nav_links(html: &str) -> Vec<String> {
    let nav = html.split("<nav>").nth(1).unwrap().split("</nav>").next().unwrap();
    nav.split("<a href=\"").skip(1).map(|a| a.split('"').next().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn the_header_shows_only_the_links_the_session_s_key_may_open() {
    let app = TestApp::sqlite().await;
    let org = app.default_org.id;
    let all = nav_links(&page_of(&app, &app.admin_key, "/console/keys", StatusCode::OK).await);
    for admin_has in [
        "/console/keys",
        "/console/keys/new",
        "/console/usage",
        "/console/audit",
        "/console/organizations",
        "/console/webhooks",
    ] {
        assert!(all.iter().any(|l| l == admin_has), "{admin_has} in {all:?}");
    }
    let (reader, _) = app.key(org, &["keyward:keys:read"]).await;
    let (writer, _) = app.key(org, &["keyward:keys:write"]).await;
    let (auditor, _) = app.key(org, &["keyward:keys:read", "keyward:audit:read"]).await;
    let (customer, _) = app.owned_key(org, "alice", &["keyward:self"]).await;
    let other = app.org("other").await;
    let (outsider, _) = app.key(other.id, &["keyward:keys:read"]).await;
    let cases: [(&str, &str, &[&str]); 6] = [
        ("admin", &app.admin_key, &all.iter().map(String::as_str).collect::<Vec<_>>()),
        ("reader", &reader, &["/console/keys", "/console/usage"]),
        ("writer", &writer, &["/console/keys", "/console/keys/new", "/console/usage", "/console/webhooks"]),
        ("auditor", &auditor, &["/console/keys", "/console/usage", "/console/audit"]),
        ("customer", &customer, &["/console/keys", "/console/keys/new", "/console/usage"]),
        ("another organization's reader", &outsider, &["/console/keys", "/console/usage"]),
    ];
    for (who, key, shown) in cases {
        let cookie = session(&sign_in(&app, key).await);
        let links = nav_links(&get(&app, "/console/keys", &cookie).await.text);
        assert_eq!(links, shown, "{who}");
        // Every link shown opens; every link hidden would have answered 403.
        for link in &all {
            let want = if links.contains(link) { StatusCode::OK } else { StatusCode::FORBIDDEN };
            assert_eq!(get(&app, link, &cookie).await.status, want, "{who}: {link}");
        }
    }
}

/// The body of a CSV answer, after checking it is a download of CSV.
async fn csv_of(app: &TestApp, cookie: &str, path: &str) -> String {
    let r = get(app, path, cookie).await;
    assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text);
    assert_eq!(r.headers["content-type"], "text/csv; charset=utf-8");
    assert!(r.headers["content-disposition"].to_str().unwrap().starts_with("attachment; filename=\"usage-"));
    assert_eq!(r.headers["x-content-type-options"], "nosniff");
    r.text
}

#[tokio::test]
async fn the_usage_page_is_an_organization_s_billing_month_with_a_chart_and_a_csv() {
    let app = TestApp::sqlite().await;
    let org = app.default_org.id;
    let named = |name: &str| keyward_server::service::CreateKeyRequest { name: name.into(), ..Default::default() };
    let (xss, xss_key) = app.key_with(org, named(XSS)).await;
    let formula = "=HYPERLINK(\"http://evil.example\",\"pay\")";
    let (costly, costly_key) = app.key_with(org, named(formula)).await;
    let (_, idle) = app.key_with(org, named("never used")).await;
    for _ in 0..3 {
        app.verify(&xss, serde_json::json!({})).await;
    }
    app.verify(&xss, serde_json::json!({"required_scopes": ["admin:all"]})).await;
    app.verify(&costly, serde_json::json!({})).await;
    let report = serde_json::json!({"events": [
        {"id": "r1", "key_id": costly_key.id.to_string(), "status_code": 500, "tokens_used": 70, "cost_micros": 2_500_000},
        {"id": "r2", "key_id": xss_key.id.to_string(), "status_code": 404, "tokens_used": 5, "cost_micros": 1_000}]});
    assert_eq!(app.post("/v1/usage", &app.admin_key, report).await.status, StatusCode::ACCEPTED);
    let other = app.org("other").await;
    let (outsider, outsiders) = app.key_with(other.id, named("outsider's key")).await;
    app.verify(&outsider, serde_json::json!({})).await;
    assert!(app.state.usage.flush().await);

    // The organization's own reader: its month (June 2026, the test clock's), the costliest key first.
    let (reader, _) = app.key(org, &["keyward:keys:read"]).await;
    let text = page_of(&app, &reader, "/console/usage", StatusCode::OK).await;
    assert!(
        text.contains("<option value=\"2026-06\" selected>") && text.contains("<option value=\"2025-07\">"),
        "{text}"
    );
    assert!(text.contains("<svg class=\"chart\""), "{text}");
    assert_eq!(text.matches("<rect class=\"requests\"").count(), 30, "a bar for every day of June");
    let costly_at = text.find(&costly_key.id.to_string()).unwrap();
    assert!(costly_at < text.find(&xss_key.id.to_string()).unwrap(), "the costliest key first");
    assert!(text.contains("&lt;img src=x onerror=alert(1)&gt;") && !text.contains(XSS), "names are text");
    assert!(text.contains("=HYPERLINK(&quot;http://evil.example&quot;,&quot;pay&quot;)"), "{text}");
    assert!(!text.contains(&idle.id.to_string()) && !text.contains(&outsiders.id.to_string()));
    // Refused verifications are requests too, counted as denied.
    let xss_line = "<td data-label=\"Requests\">4</td><td data-label=\"Denied\">1</td><td data-label=\"Errors\">1</td>\
                    <td data-label=\"Tokens\">5</td><td data-label=\"Cost\">$0.001000</td>";
    assert!(text.contains(xss_line), "{text}");
    let totals = "<td data-label=\"Requests\">5</td><td data-label=\"Denied\">1</td><td data-label=\"Errors\">2</td>\
                  <td data-label=\"Tokens\">75</td><td data-label=\"Cost\">$2.501000</td>";
    assert!(text.contains(&format!("<tfoot><tr><th scope=\"row\" colspan=\"2\">Totals</th>{totals}")), "{text}");
    assert!(text.contains("href=\"/console/usage.csv?month=2026-06\" download"), "{text}");

    // The CSV: the same lines, every text cell quoted, a formula shown as text.
    let cookie = session(&sign_in(&app, &reader).await);
    let csv = csv_of(&app, &cookie, "/console/usage.csv?month=2026-06").await;
    let lines: Vec<&str> = csv.split_terminator("\r\n").collect();
    assert_eq!(lines.len(), 3, "{csv}");
    assert_eq!(lines[0], "month,key_id,name,hint,owner_id,requests,denied,errors,tokens,cost_usd");
    let hint = |k: &keyward_store::ApiKey| format!("{}…{}", k.prefix, k.hint);
    assert_eq!(
        lines[1],
        format!(
            "\"2026-06\",\"{}\",\"'=HYPERLINK(\"\"http://evil.example\"\",\"\"pay\"\")\",\"{}\",\"\",1,0,1,70,2.500000",
            costly_key.id,
            hint(&costly_key)
        )
    );
    assert_eq!(
        lines[2],
        format!("\"2026-06\",\"{}\",\"{XSS}\",\"{}\",\"\",4,1,1,5,0.001000", xss_key.id, hint(&xss_key))
    );
    assert_eq!(csv_of(&app, &cookie, "/console/usage.csv").await, csv, "the current month by default");

    // Another month: none used; a month that is none is the API's 400, said on the page.
    let may = page_of(&app, &reader, "/console/usage?month=2026-05", StatusCode::OK).await;
    assert!(may.contains("No key was used in 2026-05.") && may.matches("<rect class=\"requests\"").count() == 31);
    let bad = page_of(&app, &reader, "/console/usage?month=June", StatusCode::BAD_REQUEST).await;
    assert!(bad.contains("`month` must be YYYY-MM"), "{bad}");

    // Per organization, as GET /v1/organizations/{id}/usage: the admin reaches any; an organization's
    // key its own only (another answers like an unknown one); a customer's keyward:self none.
    let path = format!("/console/organizations/{}/usage", other.id);
    let text = page_of(&app, &app.admin_key, &path, StatusCode::OK).await;
    assert!(text.contains(&outsiders.id.to_string()) && !text.contains(&costly_key.id.to_string()), "{text}");
    assert!(text.contains(&format!("href=\"{path}.csv?month=2026-06\"")), "{text}");
    let admin = session(&sign_in(&app, &app.admin_key).await);
    assert!(csv_of(&app, &admin, &format!("{path}.csv")).await.contains(&outsiders.id.to_string()));
    let org_page = get(&app, &format!("/console/organizations/{}", other.id), &admin).await;
    assert!(org_page.text.contains(&format!("href=\"{path}\"")), "an organization's page links its usage");
    let own = format!("/console/organizations/{org}/usage");
    assert!(page_of(&app, &reader, &own, StatusCode::OK).await.contains(&costly_key.id.to_string()));
    for unseen in [path.clone(), format!("{path}.csv"), format!("/console/organizations/{}/usage", uuid::Uuid::nil())] {
        let text = page_of(&app, &reader, &unseen, StatusCode::NOT_FOUND).await;
        assert!(!text.contains(&outsiders.id.to_string()));
    }
    page_of(&app, &reader, "/console/organizations/nope/usage", StatusCode::NOT_FOUND).await;
    let (outsider_reader, _) = app.key(other.id, &["keyward:keys:read"]).await;
    let text = page_of(&app, &outsider_reader, "/console/usage", StatusCode::OK).await;
    assert!(text.contains(&outsiders.id.to_string()) && !text.contains(&costly_key.id.to_string()), "{text}");
    page_of(&app, &outsider_reader, &own, StatusCode::NOT_FOUND).await;
    let (customer, _) = app.owned_key(org, "alice", &["keyward:self"]).await;
    for path in [own.clone(), format!("{own}.csv")] {
        let text = page_of(&app, &customer, &path, StatusCode::FORBIDDEN).await;
        assert!(!text.contains(&costly_key.id.to_string()));
    }
}

#[tokio::test]
async fn a_self_service_customer_sees_their_own_keys_month_and_their_quota() {
    let app = TestApp::sqlite().await;
    let org = app.default_org.id;
    let (alices, alice) = app.owned_key(org, "alice", &["keyward:self"]).await;
    let request = keyward_server::service::CreateKeyRequest {
        name: format!("-{XSS}"),
        owner_id: Some("alice".into()),
        ..Default::default()
    };
    let (second, second_key) = app.key_with(org, request).await;
    let (bobs, bob) = app.owned_key(org, "bob", &[]).await;
    for key in [&alices, &second, &second, &bobs] {
        app.verify(key, serde_json::json!({})).await;
    }
    assert!(app.state.usage.flush().await);

    let text = page_of(&app, &alices, "/console/usage", StatusCode::OK).await;
    assert!(text.contains("Where your key stands") && text.contains("<dt>Monthly quota</dt>"), "{text}");
    assert!(text.contains(" of 10000 used; resets in "), "the free plan's quota: {text}");
    assert!(text.contains("<svg class=\"chart\"") && text.contains(&alice.id.to_string()), "{text}");
    assert!(text.contains("-&lt;img src=x onerror=alert(1)&gt;") && !text.contains(XSS), "{text}");
    assert!(!text.contains(&bob.id.to_string()) && !text.contains("bob"), "another owner's key: {text}");
    assert!(text.contains("<tfoot><tr><th scope=\"row\" colspan=\"2\">Totals</th><td data-label=\"Requests\">3</td>"));

    let cookie = session(&sign_in(&app, &alices).await);
    let csv = csv_of(&app, &cookie, "/console/usage.csv").await;
    assert_eq!(csv.split_terminator("\r\n").count(), 3, "{csv}");
    assert!(csv.contains(&format!("\"'-{XSS}\",")) && csv.contains(",\"alice\",2,0,0,0,0.000000\r\n"), "{csv}");
    assert!(csv.contains(&second_key.id.to_string()) && !csv.contains(&bob.id.to_string()) && !csv.contains("bob"));
}

/// A self-service customer's month counts every key of theirs, however many they hold: more than the
/// 1,000 (newest first) an earlier version read, with usage on the oldest key and the newest.
#[tokio::test]
async fn a_self_service_month_counts_every_key_of_an_owner_with_many() {
    use crate::helpers::NowUtc;
    use keyward_store::usage::{UsageEvent, UsageKind};
    let app = TestApp::sqlite().await;
    let org = app.default_org.clone();
    let now = app.clock.now_utc();
    let imports: Vec<keyward_store::KeyImport> = (0..1_100)
        .map(|i| {
            let (_, mut key) = keyward_store::conformance::new_key(&org, keyward_core::Environment::Live);
            key.owner_id = Some("carol".into());
            key.name = format!("carol's key {i}");
            keyward_store::KeyImport { key, legacy: false, created_at: None }
        })
        .collect();
    // Ids are made in time order, so the first is the oldest: the one a listing newest first reaches last.
    let (oldest, newest) = (imports[0].key.id, imports[1_099].key.id);
    let store = &app.state.store;
    let imported = store.import_keys(org.id, imports, &keyward_store::Actor::cli(now), false).await.unwrap();
    imported.apply(&keyward_store::NoCache);
    let (carols, _) = app.owned_key(org.id, "carol", &["keyward:self"]).await;
    let (_, bob) = app.owned_key(org.id, "bob", &[]).await;
    let used = [oldest, oldest, newest, bob.id];
    let events: Vec<UsageEvent> = used.iter().map(|id| UsageEvent::new(UsageKind::Verify, *id, org.id, now)).collect();
    store.record_usage_batch(&events).await.unwrap();
    store.fold_usage().await.unwrap();

    let text = page_of(&app, &carols, "/console/usage", StatusCode::OK).await;
    assert!(text.contains(&oldest.to_string()) && text.contains(&newest.to_string()), "{text}");
    assert!(!text.contains(&bob.id.to_string()), "another owner's key: {text}");
    assert!(text.contains("<tfoot><tr><th scope=\"row\" colspan=\"2\">Totals</th><td data-label=\"Requests\">3</td>"));
    let cookie = session(&sign_in(&app, &carols).await);
    let csv = csv_of(&app, &cookie, "/console/usage.csv").await;
    let lines: Vec<&str> = csv.split_terminator("\r\n").collect();
    assert_eq!(lines.len(), 3, "{csv}");
    assert!(lines[1].contains(&oldest.to_string()) && lines[1].ends_with(",\"carol\",2,0,0,0,0.000000"), "{csv}");
    assert!(lines[2].contains(&newest.to_string()), "{csv}");
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

/// The form's field `name=value` pairs, URL-encoded.
fn form(fields: &[(&str, &str)]) -> String {
    serde_urlencoded::to_string(fields).unwrap()
}

#[tokio::test]
async fn a_key_is_created_with_every_field_and_edited_one_field_at_a_time() {
    let app = TestApp::sqlite().await;
    let other = app.org("acme").await;
    let cookie = session(&sign_in(&app, &app.admin_key).await);
    let new = get(&app, "/console/keys/new", &cookie).await;
    for field in [
        "organization_id",
        "owner_id",
        "environment",
        "prefix",
        "scopes",
        "allowed_ips",
        "plan",
        "expires_at",
        "metadata",
    ] {
        assert!(new.text.contains(&format!("name=\"{field}\"")), "{field} on the new key form");
    }
    assert!(new.text.contains(&other.id.to_string()), "the admin chooses among the organizations");
    let expires = (helpers_now(&app) + chrono::Duration::days(30)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let org = other.id.to_string();
    let fields = [
        ("csrf", csrf(&new.text)),
        ("name", XSS.to_owned()),
        ("organization_id", org.clone()),
        ("owner_id", "cust-7".to_owned()),
        ("environment", "test".to_owned()),
        ("prefix", "acme".to_owned()),
        ("description", "for the <b>batch</b> jobs".to_owned()),
        ("scopes", "read:projects write:projects".to_owned()),
        ("allowed_ips", "10.0.0.0/8 2001:db8::/32".to_owned()),
        ("plan", "free".to_owned()),
        ("expires_at", expires.clone()),
        ("metadata", r#"{"tier":"gold"}"#.to_owned()),
    ];
    let refs: Vec<(&str, &str)> = fields.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let created = app.send(page(Method::POST, "/console/keys", &[("cookie", &cookie)], Some(&form(&refs)))).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    let id = created.text.split("action=\"/console/keys/").nth(1).unwrap().split('/').next().unwrap().to_owned();
    let key = app.get(&format!("/v1/keys/{id}"), &app.admin_key).await.body;
    assert_eq!(key["name"], XSS);
    assert_eq!(key["organization_id"], org);
    assert_eq!(key["owner_id"], "cust-7");
    assert_eq!(key["environment"], "test");
    assert_eq!(key["prefix"], "acme_test_");
    assert_eq!(key["scopes"], serde_json::json!(["read:projects", "write:projects"]));
    assert_eq!(key["allowed_ips"], serde_json::json!(["10.0.0.0/8", "2001:db8::/32"]));
    assert_eq!(key["plan"], "free");
    assert_eq!(key["metadata"], serde_json::json!({"tier": "gold"}));
    assert!(key["expires_at"].as_str().unwrap().starts_with(&expires[..19]), "{}", key["expires_at"]);

    let edit = get(&app, &format!("/console/keys/{id}/edit"), &cookie).await;
    assert_eq!(edit.status, StatusCode::OK, "{}", edit.text);
    assert!(!edit.text.contains(XSS) && edit.text.contains("&lt;img"), "the name is text");
    assert!(edit.text.contains("10.0.0.0/8 2001:db8::/32") && edit.text.contains("read:projects write:projects"));
    let audit_path = format!("/v1/audit-logs?key_id={id}&action=update");
    let audited = || async { app.get(&audit_path, &app.admin_key).await.body["items"].as_array().unwrap().clone() };
    let same: Vec<(String, String)> = edit_fields(&edit.text);
    let post_edit = |fields: Vec<(String, String)>| {
        let refs: Vec<(&str, &str)> = fields.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        let body = form(&refs);
        let path = format!("/console/keys/{id}/edit");
        let cookie = cookie.clone();
        let app = &app;
        async move { app.send(page(Method::POST, &path, &[("cookie", &cookie)], Some(&body))).await }
    };
    let unchanged = post_edit(same.clone()).await;
    assert_eq!(unchanged.status, StatusCode::SEE_OTHER, "{}", unchanged.text);
    assert!(audited().await.is_empty(), "saving the form unchanged writes nothing");

    let mut changed = same.clone();
    for (name, value) in &mut changed {
        match name.as_str() {
            "name" => *value = "batch jobs".to_owned(),
            "allowed_ips" => value.clear(),
            _ => {}
        }
    }
    let saved = post_edit(changed.clone()).await;
    assert_eq!(saved.status, StatusCode::SEE_OTHER, "{}", saved.text);
    let key = app.get(&format!("/v1/keys/{id}"), &app.admin_key).await.body;
    assert_eq!(key["name"], "batch jobs");
    assert_eq!(key["allowed_ips"], serde_json::json!([]));
    assert_eq!(key["scopes"], serde_json::json!(["read:projects", "write:projects"]), "the rest stays");
    assert_eq!(key["metadata"], serde_json::json!({"tier": "gold"}));
    let rows = audited().await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let diff = rows[0]["details"].to_string();
    assert!(diff.contains("batch jobs") && diff.contains("allowed_ips") && !diff.contains("scopes"), "{diff}");

    let mut no_token = changed.clone();
    no_token.retain(|(n, _)| n != "csrf");
    assert_eq!(post_edit(no_token).await.status, StatusCode::FORBIDDEN);
    let mut bad = changed;
    for (name, value) in &mut bad {
        if name == "metadata" {
            *value = "[1]".to_owned();
        }
    }
    assert_eq!(post_edit(bad).await.status.as_u16() / 100, 4, "refused, never a 500");
}

/// The current time of the app's clock.
fn helpers_now(app: &TestApp) -> chrono::DateTime<chrono::Utc> {
    use keyward_core::Clock;
    app.clock.now()
}

/// The `name`/`value` pairs of an edit page's form, as a browser would post them unchanged.
fn edit_fields(html: &str) -> Vec<(String, String)> {
    let form = html.split("/edit\">").nth(1).unwrap().split("</form>").next().unwrap();
    let unescape = |s: &str| s.replace("&quot;", "\"").replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&");
    let mut fields = Vec::new();
    for tag in form.split('<').skip(1) {
        let Some(name) = tag.split("name=\"").nth(1).map(|r| r.split('"').next().unwrap().to_owned()) else { continue };
        let value = if tag.starts_with("textarea") {
            tag.split_once('>').unwrap().1.to_owned()
        } else if tag.starts_with("select") {
            let rest = &form[form.find(&format!("name=\"{name}\"")).unwrap()..];
            let options = rest.split("</select>").next().unwrap();
            options
                .split("<option")
                .find(|o| o.contains(" selected"))
                .map_or(String::new(), |o| o.split("value=\"").nth(1).unwrap().split('"').next().unwrap().to_owned())
        } else {
            tag.split("value=\"").nth(1).map_or(String::new(), |v| v.split('"').next().unwrap().to_owned())
        };
        fields.push((name, unescape(&value)));
    }
    fields
}

#[tokio::test]
async fn only_those_who_may_change_a_key_see_its_edit_form() {
    let app = TestApp::sqlite().await;
    let org = app.default_org.id;
    let (customer, own) = app.owned_key(org, "alice", &["keyward:self"]).await;
    let cookie = session(&sign_in(&app, &customer).await);
    let page_text = get(&app, &format!("/console/keys/{}", own.id), &cookie).await.text;
    assert!(!page_text.contains("/edit\""), "no edit link for a self-service key");
    assert_eq!(get(&app, &format!("/console/keys/{}/edit", own.id), &cookie).await.status, StatusCode::FORBIDDEN);
    let new = get(&app, "/console/keys/new", &cookie).await.text;
    assert!(!new.contains("name=\"owner_id\"") && !new.contains("name=\"organization_id\""), "own owner, own org");

    let acme = app.org("acme").await;
    let (manager, _) = app.key(acme.id, &["keyward:keys:write"]).await;
    let cookie = session(&sign_in(&app, &manager).await);
    for path in [format!("/console/keys/{}/edit", own.id)] {
        assert_eq!(get(&app, &path, &cookie).await.status, StatusCode::NOT_FOUND, "another organization's key");
    }
    let token = csrf(&get(&app, "/console/keys/new", &cookie).await.text);
    let body = form(&[("csrf", &token), ("name", "taken over")]);
    let path = format!("/console/keys/{}/edit", own.id);
    assert_eq!(
        app.send(page(Method::POST, &path, &[("cookie", &cookie)], Some(&body))).await.status,
        StatusCode::NOT_FOUND
    );
    assert!(!get(&app, "/console/keys/new", &cookie).await.text.contains("name=\"organization_id\""), "admins only");
}

/// A form POST of `form` to `path` in the session `cookie`.
async fn post_form(app: &TestApp, path: &str, cookie: &str, form: &str) -> Response {
    app.send(page(Method::POST, path, &[("cookie", cookie)], Some(form))).await
}

/// An endpoint made through the API by `key`: its id.
async fn hook_of(app: &TestApp, key: &str, body: serde_json::Value) -> String {
    let r = app.post("/v1/webhooks", key, body).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    r.body["webhook"]["id"].as_str().unwrap().to_owned()
}

const XSS_FORM: &str = "%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E";

#[tokio::test]
async fn webhooks_are_created_in_the_console_with_their_secret_shown_once() {
    let app = TestApp::sqlite().await;
    let cookie = session(&sign_in(&app, &app.admin_key).await);
    let list = get(&app, "/console/webhooks", &cookie).await;
    assert!(list.status == StatusCode::OK && list.text.contains("No webhook endpoints."), "{}", list.text);
    assert!(list.text.contains("href=\"/console/webhooks\""), "in the header's links");
    assert!(list.text.contains("value=\"auth.failures_spike\""), "an admin may subscribe to every event");
    let token = csrf(&list.text);

    let fields = format!(
        "url=https%3A%2F%2Fhooks.example.com%2Fk&description={XSS_FORM}&events=key.created&events=key.revoked\
         &is_active=true"
    );
    assert_eq!(post_form(&app, "/console/webhooks", &cookie, &fields).await.status, StatusCode::FORBIDDEN);
    let created = post_form(&app, "/console/webhooks", &cookie, &format!("csrf={token}&{fields}")).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    assert_eq!(created.headers["cache-control"], "no-store");
    assert!(
        created.text.contains("Copy the signing secret now") && created.text.contains("data-copy=\"signing-secret\"")
    );
    let at = created.text.find("id=\"signing-secret\"").unwrap();
    let secret = created.text[at..].split("value=\"").nth(1).unwrap().split('"').next().unwrap().to_owned();
    assert!(secret.starts_with("whsec_") && secret.len() > 30, "{secret}");
    assert!(!created.text.contains(XSS) && created.text.contains("&lt;img src=x onerror=alert(1)&gt;"));
    let id = created.text.split("href=\"/console/webhooks/").nth(1).unwrap().split('"').next().unwrap().to_owned();
    let hook = app.get(&format!("/v1/webhooks/{id}"), &app.admin_key).await.body;
    assert_eq!(hook["events"], serde_json::json!(["key.created", "key.revoked"]));
    assert_eq!((hook["is_active"].clone(), hook["url"].clone()), (true.into(), "https://hooks.example.com/k".into()));

    // Never again: not in the list, not on the endpoint's page.
    let list = get(&app, "/console/webhooks", &cookie).await;
    assert!(
        list.text.contains("<code>https://hooks.example.com/k</code>")
            && list.text.contains("key.created, key.revoked")
    );
    let shown = get(&app, &format!("/console/webhooks/{id}"), &cookie).await;
    assert_eq!(shown.status, StatusCode::OK, "{}", shown.text);
    for text in [&list.text, &shown.text] {
        assert!(!text.contains(&secret) && !text.contains(&secret[6..20]) && !text.contains(XSS), "{text}");
    }
    assert!(shown.text.contains("No deliveries yet."));

    // The API's validation, on a page; a URL that is script is refused and never a link.
    for url in ["javascript:alert(1)", "https://hooks.example.com/%3Cimg%20src=x%3E", "ftp://x.example/"] {
        let form = format!("csrf={token}&url={}", url.replace(':', "%3A").replace('/', "%2F"));
        let refused = post_form(&app, "/console/webhooks", &cookie, &form).await;
        assert_eq!(refused.status, StatusCode::UNPROCESSABLE_ENTITY, "{url}: {}", refused.text);
        assert!(!refused.text.contains("href=\"javascript") && !refused.text.contains("<img"), "{}", refused.text);
    }
    let description = format!("csrf={token}&url=https%3A%2F%2Fh.example.com%2F&description={}", "d".repeat(2001));
    assert_eq!(
        post_form(&app, "/console/webhooks", &cookie, &description).await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    let list = get(&app, "/console/webhooks", &cookie).await;
    assert_eq!(list.text.matches("<a href=\"/console/webhooks/").count(), 1, "{}", list.text);

    // Change, silence and delete it; a form without its token changes nothing.
    let path = format!("/console/webhooks/{id}");
    let change = "url=https%3A%2F%2Fother.example.com%2F&description=&events=key.rotated";
    assert_eq!(post_form(&app, &path, &cookie, change).await.status, StatusCode::FORBIDDEN);
    let changed = post_form(&app, &path, &cookie, &format!("csrf={token}&{change}")).await;
    assert_eq!((changed.status, location(&changed)), (StatusCode::SEE_OTHER, path.as_str()), "{}", changed.text);
    let off = post_form(&app, &format!("{path}/active"), &cookie, &format!("csrf={token}&active=false")).await;
    assert_eq!(off.status, StatusCode::SEE_OTHER, "{}", off.text);
    let hook = app.get(&format!("/v1/webhooks/{id}"), &app.admin_key).await.body;
    assert_eq!(
        (hook["url"].as_str(), hook["events"].clone(), hook["description"].clone(), hook["is_active"].clone()),
        (Some("https://other.example.com/"), serde_json::json!(["key.rotated"]), serde_json::Value::Null, false.into())
    );
    let confirm = get(&app, &format!("{path}/delete"), &cookie).await;
    assert!(confirm.status == StatusCode::OK && confirm.text.contains("Delete for good"), "{}", confirm.text);
    assert_eq!(post_form(&app, &format!("{path}/delete"), &cookie, "").await.status, StatusCode::FORBIDDEN);
    let deleted = post_form(&app, &format!("{path}/delete"), &cookie, &format!("csrf={token}")).await;
    assert_eq!((deleted.status, location(&deleted)), (StatusCode::SEE_OTHER, "/console/webhooks"));
    assert_eq!(get(&app, &path, &cookie).await.status, StatusCode::NOT_FOUND);
    assert_eq!(get(&app, "/console/webhooks/not-an-id", &cookie).await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn an_endpoint_page_lists_deliveries_with_every_attempt_and_retries_them() {
    use keyward_store::{Attempt, AttemptOutcome};

    use crate::helpers::NowUtc;
    let app = TestApp::sqlite().await;
    let hook = hook_of(
        &app,
        &app.admin_key,
        serde_json::json!({"url": "https://hooks.example.com/k", "events": ["key.updated"]}),
    )
    .await;
    let (_, key) = app.key(app.default_org.id, &[]).await;
    for i in 0..51 {
        let rename = serde_json::json!({"name": format!("{XSS}{i}")});
        assert_eq!(app.patch(&format!("/v1/keys/{}", key.id), &app.admin_key, rename).await.status, StatusCode::OK);
    }
    let now = app.clock.now_utc();
    assert_eq!(app.state.store.dispatch_events(now, now + chrono::Duration::hours(24), 500).await.unwrap(), 51);
    let hook_id: uuid::Uuid = hook.parse().unwrap();
    let page1 = keyward_store::PageRequest { after: None, limit: 1 };
    let newest = app.state.store.list_deliveries(hook_id, page1).await.unwrap().items[0].id;
    let refused = Attempt { attempted_at: now, status_code: None, latency_ms: 7, error: Some(XSS.to_owned()) };
    app.state.store.record_attempt(newest, &refused, AttemptOutcome::RetryAt(now)).await.unwrap();
    let answered = Attempt {
        attempted_at: now,
        status_code: Some(503),
        latency_ms: 12,
        error: Some("the receiver answered 503".into()),
    };
    app.state.store.record_attempt(newest, &answered, AttemptOutcome::Failed).await.unwrap();

    let cookie = session(&sign_in(&app, &app.admin_key).await);
    let path = format!("/console/webhooks/{hook}");
    let first = get(&app, &path, &cookie).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text);
    assert_eq!(first.text.matches("<article class=\"delivery\">").count(), 50, "newest first, 50 a page");
    assert!(first.text.contains("<h3>key.updated: <span class=\"status-failed\">failed</span></h3>"), "{}", first.text);
    assert!(first.text.contains("<caption>2 attempt(s), oldest first</caption>"));
    assert!(
        first.text.contains("<td>none</td><td>7 ms</td><td>&lt;img src=x onerror=alert(1)&gt;</td>"),
        "{}",
        first.text
    );
    assert!(first.text.contains("<td>503</td><td>12 ms</td><td>the receiver answered 503</td>"));
    assert!(first.text.contains("&lt;img src=x onerror=alert(1)&gt;50"), "the payload, as text");
    assert!(!first.text.contains(XSS));
    let next =
        first.text.split(" rel=\"next\"").next().unwrap().rsplit("href=\"").next().unwrap().trim_end_matches('"');
    let second = get(&app, &next.replace("&amp;", "&"), &cookie).await;
    assert_eq!(second.text.matches("<article class=\"delivery\">").count(), 1, "{}", second.text);
    assert!(second.text.contains("&lt;img src=x onerror=alert(1)&gt;0") && !second.text.contains("rel=\"next\""));

    // Retry: a form with its CSRF token; the delivery is pending again, due now.
    let retry = format!("{path}/deliveries/{newest}/retry");
    assert!(first.text.contains(&format!("action=\"{retry}\"")));
    let token = csrf(&first.text);
    assert_eq!(post_form(&app, &retry, &cookie, "").await.status, StatusCode::FORBIDDEN);
    let deliveries = format!("/v1/webhooks/{hook}/deliveries?limit=1");
    assert_eq!(app.get(&deliveries, &app.admin_key).await.body["items"][0]["status"], "failed");
    let retried = post_form(&app, &retry, &cookie, &format!("csrf={token}")).await;
    assert_eq!(retried.status, StatusCode::SEE_OTHER, "{}", retried.text);
    assert_eq!(location(&retried), format!("{path}#deliveries"));
    let listed = app.get(&deliveries, &app.admin_key).await.body;
    assert_eq!(listed["items"][0]["status"], "pending", "{listed}");
    assert!(listed["next_cursor"].is_string(), "{listed}");
    let unknown = post_form(&app, &format!("{path}/deliveries/{hook}/retry"), &cookie, &format!("csrf={token}")).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn webhook_pages_have_exactly_the_api_s_permissions() {
    let app = TestApp::sqlite().await;
    let org = app.default_org.id;
    let other = app.org("other").await;
    let ours = hook_of(&app, &app.admin_key, serde_json::json!({"url": "https://ours.example.com/"})).await;
    let admins = hook_of(
        &app,
        &app.admin_key,
        serde_json::json!({"url": "https://spikes.example.com/", "events": ["auth.failures_spike"]}),
    )
    .await;
    let theirs = hook_of(
        &app,
        &app.admin_key,
        serde_json::json!({"url": "https://theirs.example.com/", "organization_id": other.id.to_string()}),
    )
    .await;

    // An admin sees every organization's, or the one chosen.
    let cookie = session(&sign_in(&app, &app.admin_key).await);
    let all = get(&app, "/console/webhooks", &cookie).await;
    assert!(all.text.contains("ours.example.com") && all.text.contains("theirs.example.com"), "{}", all.text);
    let chosen = get(&app, &format!("/console/webhooks?organization={}", other.id), &cookie).await;
    assert!(!chosen.text.contains("ours.example.com") && chosen.text.contains("theirs.example.com"));

    // An organization's keys:write: its own endpoints; another organization's is unknown; one that only
    // an admin may change is shown, without its deliveries or forms.
    let (writer, _) = app.key(org, &["keyward:keys:write"]).await;
    let cookie = session(&sign_in(&app, &writer).await);
    let list = get(&app, "/console/webhooks", &cookie).await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.text);
    assert!(list.text.contains("ours.example.com") && !list.text.contains("theirs.example.com"));
    assert!(!list.text.contains("value=\"auth.failures_spike\"") && !list.text.contains("organization_id"));
    assert_eq!(get(&app, &format!("/console/webhooks/{theirs}"), &cookie).await.status, StatusCode::NOT_FOUND);
    let token = csrf(&list.text);
    for action in ["", "/active", "/delete"] {
        let r = post_form(
            &app,
            &format!("/console/webhooks/{theirs}{action}"),
            &cookie,
            &format!("csrf={token}&url=https%3A%2F%2Fx.example%2F"),
        )
        .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{action}");
    }
    let shown = get(&app, &format!("/console/webhooks/{admins}"), &cookie).await;
    assert_eq!(shown.status, StatusCode::OK, "{}", shown.text);
    assert!(
        shown.text.contains("needs the scope `keyward:admin`") && !shown.text.contains("Deliveries"),
        "{}",
        shown.text
    );
    assert!(!shown.text.contains("action=\"/console/webhooks/"), "no forms: {}", shown.text);
    let r =
        post_form(&app, &format!("/console/webhooks/{admins}/active"), &cookie, &format!("csrf={token}&active=false"))
            .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(get(&app, &format!("/console/webhooks/{admins}/delete"), &cookie).await.status, StatusCode::FORBIDDEN);
    let ok = get(&app, &format!("/console/webhooks/{ours}"), &cookie).await;
    assert!(ok.status == StatusCode::OK && ok.text.contains("Deliveries, newest first"), "{}", ok.text);
    let spike = format!("csrf={token}&url=https%3A%2F%2Fs.example.com%2F&events=auth.failures_spike");
    assert_eq!(post_form(&app, "/console/webhooks", &cookie, &spike).await.status, StatusCode::FORBIDDEN);

    // Keys that may not write keys (keys:read, a customer's keyward:self) get the API's 403.
    let (reader, _) = app.key(org, &["keyward:keys:read"]).await;
    let (customer, _) = app.owned_key(org, "alice", &["keyward:self"]).await;
    for key in [&reader, &customer] {
        let cookie = session(&sign_in(&app, key).await);
        for path in ["/console/webhooks".to_owned(), format!("/console/webhooks/{ours}")] {
            let r = get(&app, &path, &cookie).await;
            assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}");
            assert!(!r.text.contains("ours.example.com"));
        }
    }
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
