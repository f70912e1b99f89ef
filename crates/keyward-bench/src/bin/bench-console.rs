//! The console's pages with many keys in the store: imports `keys` keys into a fresh SQLite file,
//! or a fresh schema on the PostgreSQL server of the tests (`KEYWARD_TEST_POSTGRES_URL`, dropped at the
//! end) (one organization; names, owners, environments, expiries and inactive keys spread over them), and
//! [`BIG_OWNER_KEYS`] more of one customer; records `usage_days` days of usage this month for every
//! key through the store's usage ingest (then folds it); makes a webhook endpoint with a page of
//! deliveries of [`ATTEMPTS`] attempts each. Signs in with the seeded admin key (and with two
//! customers' `keyward:self` keys), then times each page through the real router (`oneshot`, the
//! whole body read): `runs` times after one warm-up, printing p50 and max in milliseconds and the
//! body's size.
//!
//! Usage: `bench-console [keys] [runs] [usage_days] [sqlite|postgres] [pages]`, e.g. `bench-console 100000 20 2`;
//! `pages` times only the pages whose name starts with it (e.g. `search`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Method, Request, StatusCode};
use chrono::{Datelike, Utc};
use keyward_core::{Environment, KeyId, OrgId};
use keyward_server::service::{self, CreateKeyRequest, Validator};
use keyward_server::settings::Settings;
use keyward_server::{App, AppState, router};
use keyward_store::conformance::new_key;
use keyward_store::testing::PgSchema;
use keyward_store::usage::{RawEvents, UsageEvent, UsageKind};
use keyward_store::{Actor, Attempt, AttemptOutcome, KeyImport, NewWebhook, PageRequest, WebhookSecret};
use tower::ServiceExt;

type Error = Box<dyn std::error::Error>;

/// Keys of the one big customer (`cust-big`): more than a self-service month used to read.
const BIG_OWNER_KEYS: usize = 2_000;
/// Deliveries on the webhook endpoint's page, and attempts at each.
const DELIVERIES: usize = 50;
const ATTEMPTS: usize = 3;

/// A key made as `POST /v1/keys` makes one (with its `key.created` event): its plaintext.
async fn api_key(state: &AppState, org: OrgId, request: CreateKeyRequest) -> Result<String, Error> {
    let now = Utc::now();
    let draft = request.validate(&Validator { plans: &state.plans, now }, org).map_err(|e| format!("{e:?}"))?;
    let (plain, _) = service::create_key(state, draft, &Actor::cli(now)).await.map_err(|e| format!("{e:?}"))?;
    Ok(plain.expose_secret().to_owned())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let keys: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(100_000);
    let runs: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(20).max(1);
    let usage_days: u32 = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(2);

    let backend = args.get(4).map_or("sqlite", String::as_str);

    let dir = std::env::temp_dir().join(format!("bench-console-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir)?;
    let schema = match backend {
        "sqlite" => None,
        "postgres" => Some(PgSchema::create("bench-console").await.ok_or("PostgreSQL is skipped")?),
        other => return Err(format!("unknown backend {other}: sqlite or postgres").into()),
    };
    let url = match &schema {
        Some(schema) => schema.url().to_owned(),
        None => format!("sqlite://{}", dir.join("keyward.db").display()),
    };
    let store = keyward_store::open(&url, true).await?;
    // Every page is timed from one address: the management limit per client would answer 429.
    let mut settings = Settings::default();
    settings.protection.management_per_minute = 1_000_000;
    // The bench folds its usage itself, once recorded: the usage writer's own fold of a month of
    // 100,000 keys would hold the write connection past a batch's wait for it.
    settings.usage.fold_interval = Duration::from_secs(24 * 60 * 60);
    let App { state, tasks: _tasks } = App::builder(settings).store(store.clone()).without_jobs().build().await?;
    let now = Utc::now();
    let seeded = service::seed(&state, &Actor::system(now)).await?.ok_or("the database was not empty")?;
    let org = seeded.organization;

    let started = Instant::now();
    let mut ids: Vec<KeyId> = Vec::with_capacity(keys);
    let mut batch = Vec::new();
    // The big customer's keys first: the oldest, so the list's first pages are as they were.
    let total = keys + BIG_OWNER_KEYS;
    for i in 0..total {
        let environment = if i % 7 == 0 { Environment::Test } else { Environment::Live };
        let (_, mut key) = new_key(&org, environment);
        if i < BIG_OWNER_KEYS {
            key.name = format!("Big customer key {i}");
            key.owner_id = Some("cust-big".to_owned());
        } else {
            let i = i - BIG_OWNER_KEYS;
            key.name = format!("Customer {i} production key");
            key.owner_id = Some(format!("cust-{:04}", i % 5_000));
            key.is_active = !i.is_multiple_of(20);
            key.expires_at = i.is_multiple_of(50).then(|| now + chrono::Duration::days(1 + (i % 30) as i64));
        }
        ids.push(key.id);
        batch.push(KeyImport { key, legacy: false, created_at: None });
        if batch.len() == 5_000 || i + 1 == total {
            store
                .import_keys(org.id, std::mem::take(&mut batch), &Actor::cli(now), false)
                .await?
                .apply(&keyward_store::NoCache);
        }
    }
    // As `keyward import` ends: the planner's statistics on the keys brought up to date.
    store.analyze_keys().await?;
    println!("imported {total} keys into {backend} in {:.1} s", started.elapsed().as_secs_f64());
    let big = ids[..BIG_OWNER_KEYS].to_vec();
    let ids = ids.split_off(BIG_OWNER_KEYS);

    // A verification and a report (tokens, cost) per key on each of the month's first `usage_days`
    // days, through the ingest, then folded into the rollups.
    let started = Instant::now();
    let first_day = now.date_naive().with_day(1).ok_or("no first day")?.and_hms_opt(12, 0, 0).ok_or("noon")?.and_utc();
    // At most the month's days: usage past its end would fall in the next month.
    let month_days = (first_day.date_naive().checked_add_months(chrono::Months::new(1)).ok_or("no next month")?
        - first_day.date_naive())
    .num_days();
    let usage_days = usage_days.clamp(1, u32::try_from(month_days)?);
    let mut events = Vec::new();
    for (n, id) in big.iter().chain(&ids).enumerate() {
        for d in 0..usage_days {
            let at = first_day + chrono::Duration::days(i64::from(d));
            let mut verify = UsageEvent::new(UsageKind::Verify, *id, org.id, at);
            verify.outcome = Some("VALID".into());
            verify.endpoint = Some("/v1/chat".to_owned());
            let mut report = UsageEvent::new(UsageKind::Report, *id, org.id, at);
            report.status_code = Some(200);
            report.response_time_ms = Some(40);
            report.tokens_used = 100 + (n % 900) as i64;
            report.cost_micros = 1_000 * (1 + (n % 5_000) as i64);
            report.endpoint = Some("/v1/chat".to_owned());
            events.extend([verify, report]);
        }
        if events.len() >= 20_000 {
            store.record_usage(&std::mem::take(&mut events), RawEvents::Off).await?;
        }
    }
    store.record_usage(&events, RawEvents::Off).await?;
    let folded = store.fold_usage().await?;
    println!(
        "recorded usage of {total} keys on {usage_days} days ({folded} rollup rows) in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // A webhook endpoint, then keys made through the service (each a `key.created` event), each
    // delivery given its attempts.
    let hook = store
        .insert_webhook(
            NewWebhook {
                id: uuid::Uuid::now_v7(),
                organization_id: org.id,
                url: "http://127.0.0.1:9/hook".to_owned(),
                events: Vec::new(),
                is_active: true,
                secret: WebhookSecret("whsec_bench".to_owned()),
                description: None,
            },
            &Actor::cli(now),
        )
        .await?;
    let self_key = |owner: &str| CreateKeyRequest {
        name: format!("{owner}'s console key"),
        owner_id: Some(owner.to_owned()),
        scopes: vec!["keyward:self".to_owned()],
        ..CreateKeyRequest::default()
    };
    let customer = api_key(&state, org.id, self_key("cust-4242")).await?;
    let big_customer = api_key(&state, org.id, self_key("cust-big")).await?;
    for i in 2..DELIVERIES {
        api_key(&state, org.id, CreateKeyRequest { name: format!("hooked {i}"), ..CreateKeyRequest::default() })
            .await?;
    }
    store.dispatch_events(now, now + chrono::Duration::hours(24), 10_000).await?;
    let deliveries = store.list_deliveries(hook.id, PageRequest { after: None, limit: 100 }).await?.items;
    for d in &deliveries {
        for a in 0..ATTEMPTS {
            let attempt =
                Attempt { attempted_at: now, status_code: Some(503), latency_ms: 12, error: Some(format!("try {a}")) };
            store.record_attempt(d.id, &attempt, AttemptOutcome::RetryAt(now)).await?;
        }
    }
    println!("made {} deliveries of {ATTEMPTS} attempts each", deliveries.len());

    let app = router(state.clone());
    let send = |method: Method, path: String, cookie: Option<String>, form: Option<String>| {
        let app = app.clone();
        async move {
            let mut builder = Request::builder().method(method).uri(path);
            if let Some(cookie) = cookie {
                builder = builder.header("cookie", cookie);
            }
            let body = match form {
                Some(form) => {
                    builder = builder.header("content-type", "application/x-www-form-urlencoded");
                    Body::from(form)
                }
                None => Body::empty(),
            };
            let mut request = builder.body(body)?;
            request.extensions_mut().insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40_000))));
            let response = app.oneshot(request).await?;
            let status = response.status();
            let headers = response.headers().clone();
            let body = axum::body::to_bytes(response.into_body(), 1 << 30).await?;
            Ok::<_, Error>((status, headers, body))
        }
    };
    let sign_in = |key: String| {
        let send = &send;
        async move {
            let (status, headers, _) =
                send(Method::POST, "/console/sign-in".into(), None, Some(format!("key={key}"))).await?;
            headers
                .get("set-cookie")
                .and_then(|c| c.to_str().ok())
                .and_then(|c| c.split(';').next())
                .map(str::to_owned)
                .ok_or_else(|| Error::from(format!("sign-in answered {status} without a session")))
        }
    };
    let cookie = sign_in(seeded.key.expose_secret().to_owned()).await?;
    let customer = sign_in(customer).await?;
    let big_customer = sign_in(big_customer).await?;

    // Newest first: the key imported at position i is at position `keys - 1 - i` of the list.
    let deep = ids[keys / 10];
    let one = ids[keys / 2];
    let month = format!("?month={}", keyward_store::usage::month_of(now));
    let pages = [
        ("keys list, first page", "/console/keys".to_owned()),
        ("search, common (`production`)", "/console/keys?q=production".to_owned()),
        ("search, one owner (`cust-4242`, 20 keys spread over all)", "/console/keys?q=cust-4242".to_owned()),
        ("search, no match (every key of the organization read)", "/console/keys?q=no+such+key".to_owned()),
        ("search, a hint", format!("/console/keys?q={}", store.get_key(one).await?.hint)),
        ("search, an owner prefix (`cust-42`: 2,220 keys)", "/console/keys?q=cust-42".to_owned()),
        ("search, two characters, common (`pr`)", "/console/keys?q=pr".to_owned()),
        ("search, two characters, no match (`zq`)", "/console/keys?q=zq".to_owned()),
        ("filter: expiring within 30 days", "/console/keys?expiring=30".to_owned()),
        ("filter: test environment, disabled", "/console/keys?environment=test&status=disabled".to_owned()),
        ("deep cursor page (90 % down)", format!("/console/keys?cursor={deep}")),
        ("key page", format!("/console/keys/{one}")),
        ("usage: billing month, every key used (the 100 costliest)", format!("/console/usage{month}")),
        ("usage: the month's CSV, every key's line", format!("/console/usage.csv{month}")),
        ("self-serve month (cust-4242: 20 keys)", format!("/console/usage{month}")),
        ("self-serve month (cust-big: 2,000 keys)", format!("/console/usage{month}")),
        ("self-serve month's CSV (cust-big: 2,000 lines)", format!("/console/usage.csv{month}")),
        ("self-serve keys list (cust-big)", "/console/keys".to_owned()),
        ("self-serve key page (cust-big)", format!("/console/keys/{}", big[0])),
        ("webhook endpoint: a page of deliveries with their attempts", format!("/console/webhooks/{}", hook.id)),
        ("audit log, first page", "/console/audit".to_owned()),
        ("audit log, a rare action (`webhook_create`: one row)", "/console/audit?action=webhook_create".to_owned()),
        ("audit log, an action never taken (`rotate`)", "/console/audit?action=rotate".to_owned()),
    ];
    println!("| page | p50 ms | max ms | bytes | runs |");
    println!("|---|---|---|---|---|");
    let only = args.get(5).map_or("", String::as_str);
    for (name, path) in pages.into_iter().filter(|(name, _)| name.starts_with(only)) {
        let who = match name {
            n if n.starts_with("self-serve") && n.contains("cust-4242") => &customer,
            n if n.starts_with("self-serve") && n.contains("cust-big") => &big_customer,
            _ => &cookie,
        };
        let mut times: Vec<Duration> = Vec::with_capacity(runs);
        let mut bytes = 0;
        for run in 0..=runs {
            let t = Instant::now();
            let (status, _, body) = send(Method::GET, path.clone(), Some(who.clone()), None).await?;
            let took = t.elapsed();
            if status != StatusCode::OK {
                return Err(format!("{path}: {status}: {}", String::from_utf8_lossy(&body)).into());
            }
            if run > 0 {
                times.push(took);
            }
            bytes = body.len();
        }
        times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1_000.0;
        let (p50, max) = (ms(times[times.len() / 2]), ms(times[times.len() - 1]));
        println!("| {name} | {p50:.2} | {max:.2} | {bytes} | {runs} |");
    }
    drop(app);
    drop(state);
    drop(store);
    drop(schema);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
