//! In-process verification, the whole path as `/v1/verify` runs it minus HTTP: parse and checksum,
//! SHA-256, the verify cache, status/IP/scope checks, rate limits and quota (in memory), and the
//! usage note. Target: < 2 µs per verification. Runs with the server binary's allocator (mimalloc).
//!
//! `cargo bench -p keyward-server --bench verify`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use keyward_core::{Limits, Plans, SystemClock};
use keyward_server::AppState;
use keyward_server::service::{self, CreateKeyRequest, Validator};
use keyward_server::usage::UsageRecorder;
use keyward_server::verifier::{self, Check};
use keyward_store::Actor;

// The allocator the `keyward` binary runs with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn bench(c: &mut Criterion) {
    // Metrics recorded as in a server (Prometheus recorder installed).
    keyward_server::telemetry::install();
    // Background work (the usage writer) runs on the runtime's worker, as in a server; the measured
    // verifications run on the bench thread.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let dir = tempfile::TempDir::new().unwrap();
    let (state, keys) = rt.block_on(async {
        let url = format!("sqlite://{}", dir.path().join("bench.db").display());
        let store = keyward_store::open(&url, true).await.unwrap();
        let clock = Arc::new(SystemClock);
        let (usage, _worker) = UsageRecorder::spawn(store.clone(), Duration::from_secs(1));
        // Limits on, high enough that the benchmark measures deciding, not refusing.
        let huge = Limits {
            per_minute: Some(1 << 40),
            per_hour: Some(1 << 40),
            per_day: Some(1 << 40),
            per_month: Some(1 << 40),
        };
        let state =
            AppState::builder(store, clock, usage).plans(Plans::defaults().with([("bench".to_owned(), huge)])).build();
        let seeded = service::seed(&state, &Actor::cli(state.clock.now())).await.unwrap().unwrap();
        let mut keys = Vec::new();
        for i in 0..1_000 {
            let v = Validator { plans: &state.plans, now: state.clock.now() };
            let draft = CreateKeyRequest {
                name: format!("k{i}"),
                scopes: vec!["read:*".into()],
                plan: Some("bench".into()),
                ..Default::default()
            }
            .validate(&v, seeded.organization.id)
            .unwrap();
            let (plain, _) = service::create_key(&state, draft, &Actor::cli(state.clock.now())).await.unwrap();
            keys.push(plain.expose_secret().to_owned());
        }
        (state, keys)
    });
    let required = [keyward_core::Scope::parse("read:projects").unwrap()];
    let verify = |key: &str| {
        let check = Check {
            presented: key,
            client_ip: None,
            required_scopes: &required,
            organization: None,
            user_agent: "",
            via: keyward_server::telemetry::Via::Verify,
            cost: 1,
            failures: keyward_server::limits::FailureScope::Edge,
        };
        rt.block_on(verifier::verify(&state, check)).unwrap().outcome
    };
    for key in &keys {
        assert!(verify(key).is_valid());
    }
    let mut group = c.benchmark_group("verify");
    group.bench_function("warm_one_key", |b| b.iter(|| verify(&keys[0])));
    let mut i = 0;
    group.bench_function("warm_1000_keys", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            verify(&keys[i])
        })
    });
    group.bench_function("malformed", |b| b.iter(|| verify("sk_live_not-a-key")));
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(Duration::from_secs(4));
    targets = bench
}
criterion_main!(benches);
