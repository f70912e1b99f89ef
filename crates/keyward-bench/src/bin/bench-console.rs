//! The console's keys pages with many keys in the store: imports `keys` keys into a fresh SQLite file,
//! or a fresh schema on the PostgreSQL server of the tests (`KEYWARD_TEST_POSTGRES_URL`, dropped at the
//! end), with one organization (names, owners, environments, expiries and inactive keys spread over
//! them), signs in with the seeded admin key, then times each page through the real router
//! (`oneshot`, the whole body read): `runs` times after one warm-up, printing p50 and max in
//! milliseconds.
//!
//! Usage: `bench-console [keys] [runs] [sqlite|postgres]`, e.g. `bench-console 100000 20`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Method, Request, StatusCode};
use chrono::Utc;
use keyward_core::{Environment, KeyId};
use keyward_server::service;
use keyward_server::settings::Settings;
use keyward_server::{App, router};
use keyward_store::conformance::new_key;
use keyward_store::testing::PgSchema;
use keyward_store::{Actor, KeyImport};
use tower::ServiceExt;

type Error = Box<dyn std::error::Error>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let keys: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(100_000);
    let runs: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(20).max(1);

    let backend = args.get(3).map_or("sqlite", String::as_str);

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
    let App { state, tasks: _tasks } = App::builder(settings).store(store.clone()).without_jobs().build().await?;
    let now = Utc::now();
    let seeded = service::seed(&state, &Actor::system(now)).await?.ok_or("the database was not empty")?;
    let org = seeded.organization;

    let started = Instant::now();
    let mut ids: Vec<KeyId> = Vec::with_capacity(keys);
    let mut batch = Vec::new();
    for i in 0..keys {
        let environment = if i % 7 == 0 { Environment::Test } else { Environment::Live };
        let (_, mut key) = new_key(&org, environment);
        key.name = format!("Customer {i} production key");
        key.owner_id = Some(format!("cust-{:04}", i % 5_000));
        key.is_active = i % 20 != 0;
        key.expires_at = (i % 50 == 0).then(|| now + chrono::Duration::days(1 + (i % 30) as i64));
        ids.push(key.id);
        batch.push(KeyImport { key, legacy: false, created_at: None });
        if batch.len() == 5_000 || i + 1 == keys {
            store
                .import_keys(org.id, std::mem::take(&mut batch), &Actor::cli(now), false)
                .await?
                .apply(&keyward_store::NoCache);
        }
    }
    println!("imported {keys} keys into {backend} in {:.1} s", started.elapsed().as_secs_f64());

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
            let body = axum::body::to_bytes(response.into_body(), 16 << 20).await?;
            Ok::<_, Error>((status, headers, body))
        }
    };
    let form = format!("key={}", seeded.key.expose_secret());
    let (status, headers, _) = send(Method::POST, "/console/sign-in".into(), None, Some(form)).await?;
    let cookie = headers
        .get("set-cookie")
        .and_then(|c| c.to_str().ok())
        .and_then(|c| c.split(';').next())
        .map(str::to_owned)
        .ok_or(format!("sign-in answered {status} without a session"))?;

    // Newest first: the key imported at position i is at position `keys - 1 - i` of the list.
    let deep = ids[keys / 10];
    let one = ids[keys / 2];
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
    ];
    println!("| page | p50 ms | max ms | runs |");
    println!("|---|---|---|---|");
    for (name, path) in pages {
        let mut times: Vec<Duration> = Vec::with_capacity(runs);
        for run in 0..=runs {
            let t = Instant::now();
            let (status, _, body) = send(Method::GET, path.clone(), Some(cookie.clone()), None).await?;
            let took = t.elapsed();
            if status != StatusCode::OK {
                return Err(format!("{path}: {status}: {}", String::from_utf8_lossy(&body)).into());
            }
            if run > 0 {
                times.push(took);
            }
        }
        times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1_000.0;
        println!("| {name} | {:.2} | {:.2} | {runs} |", ms(times[times.len() / 2]), ms(times[times.len() - 1]));
    }
    drop(app);
    drop(state);
    drop(store);
    drop(schema);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
