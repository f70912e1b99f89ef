//! Sustained ingest into the usage ledger: `events` usage events recorded as fast as `writers` tasks
//! can, written by the real batch writer (`keyward_server::usage`) into the real store, then counted
//! back from the daily rollups (count in = count out).
//!
//! Usage: `bench-usage <database-url> [events] [keys] [writers] [batch_size] [concurrent_batches] [owners]`
//! e.g. `bench-usage sqlite:///tmp/bench.db 1000000 100 2 5000`; with `owners` above 0 the keys belong
//! to that many owners in turn (the fold then keeps the owners' rollups too), else to none.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use keyward_core::{Environment, KeyId};
use keyward_server::settings::UsageConfig;
use keyward_server::usage::UsageRecorder;
use keyward_store::conformance::{new_key, new_org};
use keyward_store::usage::{QuotaSubject, UsageEvent, UsageKind};
use keyward_store::{Actor, NewOrganization};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let url = args.get(1).ok_or(
        "usage: bench-usage <database-url> [events] [keys] [writers] [batch_size] [concurrent_batches] [owners]",
    )?;
    let events: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(1_000_000);
    let keys: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(100);
    let writers: usize = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(2);
    let batch_size: usize = args.get(5).map(|s| s.parse()).transpose()?.unwrap_or(5_000);
    let defaults = UsageConfig::new(Duration::from_secs(1), std::path::PathBuf::new());
    let concurrent: usize = args.get(6).map(|s| s.parse()).transpose()?.unwrap_or(defaults.concurrent_batches);
    let owners: usize = args.get(7).map(|s| s.parse()).transpose()?.unwrap_or(0);

    let store = keyward_store::open(url, true).await?;
    let actor = Actor::cli(Utc::now());
    // The conformance suite's records; the plan with the widest limits.
    let org = NewOrganization { name: "bench".into(), plan: "enterprise".into(), email: None, ..new_org(None) };
    let org = store.insert_org(org, &actor).await?;
    let mut ids: Vec<KeyId> = Vec::with_capacity(keys);
    for n in 0..keys {
        let (_, mut key) = new_key(&org, Environment::Live);
        if owners > 0 {
            key.owner_id = Some(format!("owner-{}", n % owners));
        }
        ids.push(store.insert_key(key, &actor).await?.apply(&keyward_store::NoCache).id);
    }
    let ids = Arc::new(ids);
    let spill = std::env::temp_dir().join(format!("bench-usage-spill-{}.jsonl", uuid::Uuid::now_v7()));
    let config = UsageConfig {
        batch_size,
        max_buffered: events.max(batch_size) * 2,
        concurrent_batches: concurrent,
        ..UsageConfig::new(Duration::from_secs(1), spill.clone())
    };
    let (recorder, worker) = UsageRecorder::spawn_with(store.clone(), config);
    let started_at = Utc::now();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (recorder, ids, org_id) = (recorder.clone(), ids.clone(), org.id);
        let share = events / writers + usize::from(w < events % writers);
        tasks.push(tokio::spawn(async move {
            for i in 0..share {
                let key_id = ids[(i * writers + w) % ids.len()];
                let mut e = UsageEvent::new(UsageKind::Verify, key_id, org_id, Utc::now());
                e.outcome = Some("VALID".into());
                e.endpoint = Some(format!("/v1/items/{}", i % 8));
                e.method = Some("GET".into());
                e.status_code = Some(200);
                e.response_time_ms = Some((i % 50) as i64);
                e.ip = Some([203, 0, 113, 7].into());
                e.quota_subject = Some(QuotaSubject::Org(org_id));
                e.quota_units = 1;
                recorder.record(e);
                if i % 1_024 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let recorded = started.elapsed();
    drop(recorder);
    worker.shutdown().await;
    let written = started.elapsed();

    // Counted back from the daily rollups (the shutdown folded everything): with the default
    // `usage.raw_events` a VALID verification keeps no raw row.
    let mut rows = 0i64;
    let (from, to) = (started_at.date_naive(), Utc::now().date_naive());
    for id in ids.iter() {
        rows += store.key_usage_daily(*id, from, to).await?.iter().map(|d| d.counts.requests).sum::<i64>();
    }
    let spilled = std::fs::metadata(&spill).map(|m| m.len()).unwrap_or(0);
    let _ = std::fs::remove_file(&spill);
    println!(
        "backend={} events={events} keys={keys} writers={writers} batch={batch_size} concurrent={concurrent} \
         recorded_in={:.2}s \
         written_in={:.2}s throughput={:.0} events/s rows_out={rows} lost={} spill_bytes={spilled}",
        store.backend(),
        recorded.as_secs_f64(),
        written.as_secs_f64(),
        events as f64 / written.as_secs_f64(),
        events as i64 - rows,
    );
    if rows != events as i64 {
        return Err(format!("lost events: {events} in, {rows} out").into());
    }
    Ok(())
}
