//! The web console in a real browser: Debian's `chromium`, headless at phone width with a profile of
//! its own, driven through `chromedriver` (WebDriver, on a loopback port of its own) against a real
//! `keyward serve`. Checked: sign in, create a key and read it once, see it in the list, open its usage
//! chart and the organization's billing month (chart, CSV link), rotate it, revoke it after the
//! confirmation step, read the audit log, create an organization, create a webhook endpoint and read
//! its signing secret once, sign out; a `keyward:self` customer sees only their own owner's keys and
//! the links of the pages their key may open; markup typed into a name, owner, metadata or webhook
//! description (or reported as an endpoint) shows as text and never runs; a form posted
//! without its CSRF token is refused; a session ends when its key is revoked through the API.
//!
//! `scripts/test.sh` installs `chromium` and `chromium-driver` and exports `KEYWARD_TEST_CHROMIUM` and
//! `KEYWARD_TEST_CHROMEDRIVER`. Without them the test is skipped with a loud line, and fails under
//! `CI=true`. With `KEYWARD_TEST_SCREENSHOTS=<dir>` it saves a screenshot of each main page there.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};

mod common;
use common::{Cli, Killed, free_port, http, tool, wait_for_port};

/// Typed into every free-text field: it must show as these characters and never run.
const XSS_NAME: &str = "<img src=x onerror=\"window.__xss=1\">";
const XSS_OWNER: &str = "\"><script>window.__xss=1</script>";
const XSS_NOTE: &str = "<img src=x onerror=window.__xss=1>";

/// chromedriver on a free loopback port, and a headless Chromium session through it (a temporary
/// profile, 412 px wide like a phone).
struct Browser {
    client: Client,
    _driver: Killed,
    _profile: tempfile::TempDir,
    base: String,
    shots: Option<PathBuf>,
}

impl Browser {
    async fn start(chromium: &PathBuf, chromedriver: &PathBuf, base: &str) -> Self {
        let port = free_port();
        let profile = tempfile::TempDir::new().unwrap();
        let log = profile.path().join("chromedriver.log");
        let mut child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for_port(&format!("127.0.0.1:{port}"), &mut child, &log);
        let driver = Killed(child);
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--no-first-run", "--window-size=412,915",
                         format!("--user-data-dir={}", profile.path().join("profile").display())],
            },
        });
        let Value::Object(capabilities) = capabilities else { unreachable!() };
        let client = tokio::time::timeout(
            Duration::from_secs(60),
            ClientBuilder::new(HttpConnector::new())
                .capabilities(capabilities)
                .connect(&format!("http://127.0.0.1:{port}")),
        )
        .await
        .expect("chromium did not start within 60 s")
        .unwrap();
        let shots = std::env::var_os("KEYWARD_TEST_SCREENSHOTS").map(PathBuf::from);
        Self { client, _driver: driver, _profile: profile, base: format!("http://{base}"), shots }
    }

    async fn open(&self, path: &str) {
        self.client.goto(&format!("{}{path}", self.base)).await.unwrap();
    }

    async fn path(&self) -> String {
        self.client.current_url().await.unwrap().path().to_owned()
    }

    async fn text(&self) -> String {
        self.client.find(Locator::Css("body")).await.unwrap().text().await.unwrap()
    }

    async fn source(&self) -> String {
        self.client.source().await.unwrap()
    }

    async fn fill(&self, id: &str, value: &str) {
        let field = self.client.find(Locator::Id(id)).await.unwrap();
        field.clear().await.unwrap();
        field.send_keys(value).await.unwrap();
    }

    /// Clicks what loads another page, and waits (at most 10 s) until that page has loaded.
    async fn click(&self, css: &str) {
        let old = self.client.find(Locator::Css("html")).await.unwrap();
        self.client.find(Locator::Css(css)).await.unwrap().click().await.unwrap();
        let started = std::time::Instant::now();
        loop {
            let ready = self.client.execute("return document.readyState;", vec![]).await.ok();
            if old.tag_name().await.is_err() && ready == Some(Value::from("complete")) {
                return;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "clicking {css} loaded no page");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn sign_in(&self, key: &str) {
        self.open("/console").await;
        self.fill("key", key).await;
        self.click("main form button[type=submit]").await;
    }

    /// No script typed by a user ran, and no alert is open.
    async fn nothing_ran(&self) {
        let flag = self.client.execute("return window.__xss === undefined;", vec![]).await.unwrap();
        assert_eq!(flag, Value::Bool(true), "a payload ran on {}", self.path().await);
        assert!(self.client.get_alert_text().await.is_err(), "an alert is open");
    }

    async fn shot(&self, name: &str) {
        if let Some(dir) = &self.shots {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(dir.join(format!("{name}.png")), self.client.screenshot().await.unwrap()).unwrap();
        }
    }
}

/// The key shown once on the page just answered.
async fn shown_key(b: &Browser) -> String {
    let field = b.client.find(Locator::Id("new-key")).await.unwrap();
    field.prop("value").await.unwrap().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_a_real_browser() {
    let (Some(chromium), Some(chromedriver)) =
        (tool("console", "chromium", "/usr/bin/chromium"), tool("console", "chromedriver", "/usr/bin/chromedriver"))
    else {
        return;
    };
    let cli = Cli::new();
    let seeded = cli.ok(&["seed"]);
    let admin = seeded.split_whitespace().find(|w| w.starts_with("sk_live_")).unwrap().to_owned();
    let created = |args: &[&str]| cli.json(&[&["keys", "create", "--json"][..], args].concat());
    let customer = created(&["--name", "alice portal", "--owner-id", "alice", "--scopes", "keyward:self"]);
    let bobs =
        created(&["--name", XSS_NAME, "--owner-id", "bob", "--metadata", &json!({"note": XSS_NOTE}).to_string()]);
    // Usage reaches the rollups the key's chart reads within a fraction of a second.
    let env = [
        ("KEYWARD_CONSOLE__PRODUCT_NAME", "Acme API"),
        ("KEYWARD_USAGE_FLUSH_INTERVAL_MS", "50"),
        ("KEYWARD_USAGE__FOLD_INTERVAL_MS", "100"),
    ];
    let (_node, address) = common::serve(&cli, &env);
    let b = Browser::start(&chromium, &chromedriver, &address).await;

    // Sign in with the admin key.
    b.open("/console").await;
    b.shot("sign-in").await;
    b.sign_in(&admin).await;
    assert_eq!(b.path().await, "/console/keys", "{}", b.text().await);
    assert!(b.text().await.contains("Acme API"));

    // Create a key with markup in every free-text field: shown once, as text.
    b.open("/console/keys/new").await;
    b.fill("name", XSS_NAME).await;
    b.fill("owner_id", XSS_OWNER).await;
    b.fill("metadata", &json!({"note": XSS_NOTE}).to_string()).await;
    b.click("main form button[type=submit]").await;
    let secret = shown_key(&b).await;
    assert!(secret.starts_with("sk_live_"), "{secret}");
    assert_eq!(b.client.find(Locator::Css("h1")).await.unwrap().text().await.unwrap(), XSS_NAME);
    assert!(b.text().await.contains(XSS_OWNER));
    b.nothing_ran().await;
    b.shot("created").await;
    let action = b.client.find(Locator::Css("form[action$='/active']")).await.unwrap().attr("action").await.unwrap();
    let id = action.unwrap().split('/').nth(3).unwrap().to_owned();

    // Its page, loaded again, never shows the key.
    b.open(&format!("/console/keys/{id}")).await;
    b.client.refresh().await.unwrap();
    assert!(!b.source().await.contains(&secret));
    assert!(b.text().await.contains(XSS_NOTE), "metadata shows as text: {}", b.text().await);
    b.nothing_ran().await;

    // Edit its settings: the form holds what the key has, markup as text; saving changes one field.
    b.click("a[href$='/edit']").await;
    assert_eq!(b.path().await, format!("/console/keys/{id}/edit"));
    let name = b.client.find(Locator::Id("name")).await.unwrap().prop("value").await.unwrap();
    assert_eq!(name.as_deref(), Some(XSS_NAME));
    b.nothing_ran().await;
    b.fill("description", XSS_NOTE).await;
    b.click("main form button[type=submit]").await;
    assert_eq!(b.path().await, format!("/console/keys/{id}"));
    let key = http(&address, "GET", &format!("/v1/keys/{id}"), &admin, None).1;
    assert_eq!(key["description"], XSS_NOTE);
    assert_eq!(key["name"], XSS_NAME, "what was not changed stays");
    b.nothing_ran().await;

    // Its usage: the chart drawn on the server, its table, the endpoints as text.
    let verified = json!({"key": secret, "endpoint": "/v1/chat"});
    assert_eq!(http(&address, "POST", "/v1/verify", &admin, Some(verified)).1["valid"], true);
    let report = json!({"id": "r1", "key_id": id, "endpoint": XSS_NOTE, "tokens_used": 42, "cost_micros": 1500});
    assert_eq!(http(&address, "POST", "/v1/usage", &admin, Some(report)).0, 202);
    let started = std::time::Instant::now();
    loop {
        let usage = http(&address, "GET", &format!("/v1/keys/{id}/usage?days=1"), &admin, None).1;
        if usage["totals"]["reports"] == 1 && usage["totals"]["requests"] == 1 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the usage never reached the rollups: {usage}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.client.refresh().await.unwrap();
    let chart = b.client.find(Locator::Css("svg.chart")).await.unwrap();
    assert_eq!(chart.attr("role").await.unwrap().as_deref(), Some("img"));
    let bars = b.client.find_all(Locator::Css("svg.chart rect.requests")).await.unwrap();
    assert_eq!(bars.len(), 30, "a bar a day");
    assert_eq!(bars[29].attr("height").await.unwrap().as_deref(), Some("160"), "today's request is the highest bar");
    b.client.find(Locator::Css("details summary")).await.unwrap().click().await.unwrap();
    let text = b.text().await;
    assert!(text.contains("/v1/chat") && text.contains(XSS_NOTE) && text.contains("$0.001500"), "{text}");
    b.nothing_ran().await;
    b.client.execute("document.getElementById('usage').scrollIntoView();", vec![]).await.unwrap();
    b.shot("usage").await;

    // The organization's billing month: its days as a chart, a line per key, the CSV to download.
    b.click("header a[href='/console/usage']").await;
    let chart = b.client.find(Locator::Css("svg.chart")).await.unwrap();
    assert_eq!(chart.attr("role").await.unwrap().as_deref(), Some("img"));
    let text = b.text().await;
    assert!(text.contains(XSS_NAME) && text.contains("$0.001500") && text.contains("Totals"), "{text}");
    let csv = b.client.find(Locator::Id("csv")).await.unwrap();
    assert!(csv.attr("href").await.unwrap().unwrap().starts_with("/console/usage.csv?month="));
    assert!(csv.attr("download").await.unwrap().is_some(), "a download");
    b.nothing_ran().await;
    b.client.execute("document.getElementById('usage').scrollIntoView();", vec![]).await.unwrap();
    b.shot("billing").await;

    // In the list, with bob's key made by the CLI.
    b.open("/console/keys").await;
    let names: Vec<String> = {
        let mut names = Vec::new();
        for link in b.client.find_all(Locator::Css("tbody td a")).await.unwrap() {
            names.push(link.text().await.unwrap());
        }
        names
    };
    assert_eq!(names.iter().filter(|n| *n == XSS_NAME).count(), 2, "{names:?}");
    assert!(!b.source().await.contains(&secret));
    b.nothing_ran().await;
    b.shot("keys").await;

    // Searched in the store from the search box; the search stays in the box.
    b.fill("q", "ALICE").await;
    b.click("form.filters button[type=submit]").await;
    let listed = b.client.find_all(Locator::Css("tbody tr")).await.unwrap();
    assert_eq!(listed.len(), 1, "{}", b.text().await);
    assert!(b.text().await.contains("alice portal"));
    let kept = b.client.find(Locator::Id("q")).await.unwrap().prop("value").await.unwrap();
    assert_eq!(kept.as_deref(), Some("ALICE"));

    // At a phone's 390 × 844 the list and a key's page are no wider than the screen: the table
    // scrolls inside its own box.
    b.client.set_window_size(390, 844).await.unwrap();
    for path in ["/console/keys?status=all".to_owned(), format!("/console/keys/{id}")] {
        b.open(&path).await;
        let widths = b
            .client
            .execute("return [document.documentElement.scrollWidth, window.innerWidth];", vec![])
            .await
            .unwrap();
        let (page, screen) = (widths[0].as_u64().unwrap(), widths[1].as_u64().unwrap());
        assert!(screen <= 390, "the window is a phone's: {screen} px");
        assert!(page <= screen, "{path} is {page} px wide on a {screen} px screen");
    }
    b.client.set_window_size(412, 915).await.unwrap();

    b.open(&format!("/console/keys/{}", bobs["api_key"]["id"].as_str().unwrap())).await;
    b.nothing_ran().await;

    // Rotate with a grace period: a new key, shown once.
    b.open(&format!("/console/keys/{id}")).await;
    b.shot("key").await;
    b.fill("grace", "60").await;
    b.click("form[action$='/rotate'] button").await;
    let rotated = shown_key(&b).await;
    assert!(rotated.starts_with("sk_live_") && rotated != secret);
    let (status, _, _) = http(&address, "GET", "/v1/me", &secret, None);
    assert_eq!(status, 200, "the old key works during its grace period");

    // Revoke the new key, after the confirmation step.
    b.click("a.danger").await;
    assert!(b.path().await.ends_with("/revoke"));
    assert!(b.text().await.contains("Revoke"));
    b.click("form button.danger").await;
    assert!(b.text().await.contains("revoked"));
    let (status, _, _) = http(&address, "GET", "/v1/me", &rotated, None);
    assert_eq!(status, 401);

    // The audit log: the chain intact, the key's rows newest first, markup in diffs as text; filtered
    // by action through the form.
    b.click("header a[href='/console/audit']").await;
    b.click("#check-chain").await;
    let text = b.text().await;
    assert!(text.contains("Audit chain intact"), "{text}");
    assert!(text.contains("revoke") && text.contains("rotate") && text.contains(XSS_NAME), "{text}");
    b.nothing_ran().await;
    b.shot("audit").await;
    b.fill("action", "revoke").await;
    b.click("form.filters button").await;
    let actions = b.client.find_all(Locator::Css("table.audit tbody tr td:nth-child(2)")).await.unwrap();
    assert!(!actions.is_empty());
    for action in actions {
        assert_eq!(action.text().await.unwrap(), "revoke");
    }

    // Organizations (admin): create one named with markup; it is listed, as text.
    b.click("header a[href='/console/organizations']").await;
    b.fill("name", XSS_NAME).await;
    b.fill("slug", "acme-co").await;
    b.fill("rate_limit_per_minute", "120").await;
    b.click("main form button[type=submit]").await;
    assert!(b.path().await.starts_with("/console/organizations/"), "{}", b.text().await);
    assert_eq!(b.client.find(Locator::Css("h1")).await.unwrap().text().await.unwrap(), XSS_NAME);
    let limit = b.client.find(Locator::Id("rate_limit_per_minute")).await.unwrap();
    assert_eq!(limit.prop("value").await.unwrap().as_deref(), Some("120"));
    b.nothing_ran().await;
    b.open("/console/organizations").await;
    assert!(b.text().await.contains("acme-co"));
    b.nothing_ran().await;
    b.shot("organizations").await;

    // Webhooks: an endpoint made with markup in its description, its signing secret shown once (to a
    // receiver of `key.expiring` only, which nothing here emits: nothing is ever sent off this machine).
    b.click("header a[href='/console/webhooks']").await;
    b.fill("url", "https://hooks.example.com/keyward").await;
    b.fill("description", XSS_NOTE).await;
    b.client.find(Locator::Css("input[value='key.expiring']")).await.unwrap().click().await.unwrap();
    b.click("main form[method=post] button[type=submit]").await;
    let field = b.client.find(Locator::Id("signing-secret")).await.unwrap();
    let signing = field.prop("value").await.unwrap().unwrap();
    assert!(signing.starts_with("whsec_"), "{signing}");
    assert!(b.text().await.contains(XSS_NOTE));
    b.nothing_ran().await;
    b.shot("webhook-created").await;
    b.click("main a[href^='/console/webhooks/']").await;
    let text = b.text().await;
    assert!(text.contains("https://hooks.example.com/keyward") && text.contains("key.expiring"), "{text}");
    assert!(text.contains("No deliveries yet.") && !b.source().await.contains(&signing), "{text}");
    b.nothing_ran().await;
    b.open("/console/webhooks").await;
    assert!(b.text().await.contains("https://hooks.example.com/keyward"));
    assert!(!b.source().await.contains(&signing), "the secret is shown once");
    b.shot("webhooks").await;

    // A form posted without its CSRF token is refused.
    b.open("/console/keys/new").await;
    b.client.execute("document.querySelector('main input[name=csrf]').remove();", vec![]).await.unwrap();
    b.fill("name", "forged").await;
    b.click("main form button[type=submit]").await;
    assert!(b.text().await.contains("This form has expired"), "{}", b.text().await);

    // Sign out: the session is gone.
    b.open("/console/keys").await;
    b.click("header form button").await;
    assert_eq!(b.path().await, "/console");
    b.open("/console/keys").await;
    assert_eq!(b.path().await, "/console", "signed out");

    // A self-service customer sees only their owner's keys, and not bob's even by its id.
    b.sign_in(customer["key"].as_str().unwrap()).await;
    assert_eq!(b.path().await, "/console/keys");
    let mut links = Vec::new();
    for link in b.client.find_all(Locator::Css("header nav a")).await.unwrap() {
        links.push(link.attr("href").await.unwrap().unwrap());
    }
    assert_eq!(links, ["/console/keys", "/console/keys/new", "/console/usage"], "only the pages the key may open");
    let text = b.text().await;
    assert!(text.contains("alice portal"), "{text}");
    assert!(!text.contains(XSS_NAME) && !text.contains("bob"), "{text}");
    b.open(&format!("/console/keys/{}", bobs["api_key"]["id"].as_str().unwrap())).await;
    assert!(b.text().await.contains("Not Found"));

    // Revoking the customer's key through the API ends the session.
    let customer_id = customer["api_key"]["id"].as_str().unwrap();
    let (status, _, _) = http(&address, "DELETE", &format!("/v1/keys/{customer_id}"), &admin, None);
    assert_eq!(status, 204);
    b.open("/console/keys").await;
    assert_eq!(b.path().await, "/console", "the session ended with its key");

    b.client.close().await.unwrap();
}
