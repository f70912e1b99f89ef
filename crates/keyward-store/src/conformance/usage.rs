//! The usage ledger's cases of the conformance suite ([`crate::UsageStore`]), run by each backend's
//! test file like the others (see `conformance_tests!`).

use chrono::{Duration, NaiveDate};
use keyward_core::OrgId;

use super::{Must, Written, at, insert, key, new_key, org, t0, unique};
use crate::Store;
use crate::usage::{Histogram, QuotaSubject, RawEvents, UsageEvent, UsageKind};

fn verify_event(key: &crate::ApiKey, minutes: i64, outcome: &str, endpoint: &str) -> UsageEvent {
    let mut e = UsageEvent::new(UsageKind::Verify, key.id, key.organization_id, at(minutes));
    e.outcome = Some(outcome.to_owned().into());
    e.endpoint = Some(endpoint.to_owned());
    e.method = Some("GET".to_owned());
    e.ip = Some(std::net::Ipv4Addr::new(10, 0, 0, (minutes % 250) as u8).into());
    if outcome == "VALID" {
        e.quota_subject = Some(QuotaSubject::Org(key.organization_id));
        e.quota_units = 2;
    }
    e
}

fn report(key: &crate::ApiKey, org: OrgId, minutes: i64, id: &str, status: i32, ms: i64) -> UsageEvent {
    let mut e = UsageEvent::new(UsageKind::Report, key.id, org, at(minutes));
    e.idempotency_id = Some(id.to_owned());
    e.status_code = Some(status);
    e.response_time_ms = Some(ms);
    e.tokens_used = 100;
    e.cost_micros = 1_250;
    e.endpoint = Some("/v1/chat".to_owned());
    e
}

fn day(minutes: i64) -> NaiveDate {
    at(minutes).date_naive()
}

/// One batch: events in, and in the same transaction the quota counter; after the fold, the rollups (per
/// day, per endpoint) and the key's counters, which all agree with the raw events.
pub async fn usage_batch_writes_events_rollups_and_counters(store: &dyn Store) {
    let org = org(store, None).await;
    let k = key(store, &org).await;
    let other = key(store, &org).await;
    let mut events = Vec::new();
    for i in 0..8 {
        events.push(verify_event(&k, i, "VALID", if i % 2 == 0 { "/a" } else { "/b" }));
    }
    events.push(verify_event(&k, 8, "RATE_LIMITED", "/a"));
    events.push(verify_event(&k, 9, "VALID", "/a"));
    // The next day, and another key.
    events.push(verify_event(&k, 24 * 60 + 1, "VALID", "/a"));
    events.push(verify_event(&other, 3, "VALID", "/a"));
    events.push(report(&k, org.id, 10, "r-1", 200, 3));
    events.push(report(&k, org.id, 11, "r-2", 503, 700));
    let recorded = store.record_usage_batch(&events).await.must("record_usage_batch");
    assert_eq!((recorded.inserted, recorded.duplicates), (events.len() as u64, 0));
    // Before the fold: the quota counter and the raw events are current, the rollups not yet.
    let subject = format!("quota:org:{}", org.id);
    assert_eq!(store.quota_used(&subject, "2030-01").await.must("quota_used"), 22);
    assert!(store.key_usage_daily(k.id, day(0), day(24 * 60 + 1)).await.must("unfolded").is_empty());
    assert_eq!(store.get_key(k.id).await.must("get_key").total_requests, 0);
    assert_eq!(store.fold_usage().await.must("fold"), 5, "one pending row per (key, day, endpoint)");

    let days = store.key_usage_daily(k.id, day(0), day(24 * 60 + 1)).await.must("key_usage_daily");
    assert_eq!(days.iter().map(|d| d.day).collect::<Vec<_>>(), vec![day(0), day(24 * 60)]);
    let first = &days[0].counts;
    assert_eq!((first.requests, first.denied, first.reports), (10, 1, 2));
    assert_eq!((first.errors_4xx, first.errors_5xx), (0, 1));
    assert_eq!((first.tokens_used, first.cost_micros), (200, 2_500));
    assert_eq!((first.latency_count, first.latency_sum_ms), (2, 703));
    let mut want = Histogram::default();
    want.0[Histogram::bucket_of(3)] = 1;
    want.0[Histogram::bucket_of(700)] = 1;
    assert_eq!(first.latency, want);
    assert_eq!(days[1].counts.requests, 1);

    let endpoints = store.key_usage_endpoints(k.id, day(0), day(24 * 60), 10).await.must("endpoints");
    let names: Vec<(&str, i64)> = endpoints.iter().map(|e| (e.endpoint.as_str(), e.counts.requests)).collect();
    assert_eq!(names, vec![("/a", 7), ("/b", 4), ("/v1/chat", 0)]);
    assert_eq!(store.key_usage_endpoints(k.id, day(0), day(0), 1).await.must("top 1").len(), 1);

    let billing = store.org_usage_by_key(org.id, day(0), day(24 * 60)).await.must("org_usage_by_key");
    let mut ids = vec![k.id, other.id];
    ids.sort();
    assert_eq!(billing.iter().map(|b| b.key_id).collect::<Vec<_>>(), ids);
    let line = billing.iter().find(|b| b.key_id == k.id).map(|b| b.counts.clone()).unwrap_or_default();
    // The organization's days are its keys' days summed.
    let mut summed = std::collections::BTreeMap::<NaiveDate, crate::usage::DailyCounts>::new();
    for id in [k.id, other.id] {
        for d in store.key_usage_daily(id, day(0), day(24 * 60)).await.must("key_usage_daily") {
            summed.entry(d.day).or_default().add(&d.counts);
        }
    }
    let org_days = store.org_usage_daily(org.id, day(0), day(24 * 60)).await.must("org_usage_daily");
    assert_eq!(
        org_days.iter().map(|d| (d.day, d.counts.clone())).collect::<Vec<_>>(),
        summed.into_iter().collect::<Vec<_>>()
    );
    assert!(store.org_usage_daily(org.id, day(2 * 24 * 60), day(3 * 24 * 60)).await.must("no use").is_empty());
    let raw = store.usage_event_totals(k.id, at(0), at(2 * 24 * 60)).await.must("usage_event_totals");
    assert_eq!((line.requests + line.reports, line.requests), (raw.events, raw.requests));
    assert_eq!(
        (line.tokens_used, line.cost_micros, line.latency_sum_ms),
        (raw.tokens_used, raw.cost_micros, raw.latency_sum_ms)
    );

    // Valid requests only: 10 of k's, 2 quota units each, plus one of `other`.
    let got = store.get_key(k.id).await.must("get_key");
    assert_eq!(got.total_requests, 10);
    assert_eq!(got.last_used_at, Some(at(24 * 60 + 1)));
    assert_eq!(got.last_used_ip.as_deref(), Some("10.0.0.191"), "the newest use's address");
    assert_eq!(store.get_key(other.id).await.must("get_key").total_requests, 1);
    assert_eq!(store.quota_used(&subject, "2030-01").await.must("quota_used"), 22);
    assert_eq!(store.quota_used(&subject, "2030-02").await.must("quota_used"), 0);
    assert_eq!(store.quota_used("quota:org:nobody", "2030-01").await.must("quota_used"), 0);
}

/// A batch written twice (a replay), and a report retried with the same idempotency id, count once;
/// the same idempotency id in another organization is another report.
pub async fn usage_batch_is_idempotent(store: &dyn Store) {
    let org_a = org(store, None).await;
    let org_b = org(store, None).await;
    let a = key(store, &org_a).await;
    let b = key(store, &org_b).await;
    let events = vec![verify_event(&a, 1, "VALID", "/x"), report(&a, org_a.id, 2, "same", 200, 5)];
    store.record_usage_batch(&events).await.must("first");
    let again = store.record_usage_batch(&events).await.must("replay");
    assert_eq!((again.inserted, again.duplicates), (0, 2));
    // A retried report: new event id, same idempotency id; twice in one batch too.
    let retry = vec![report(&a, org_a.id, 3, "same", 200, 5), report(&a, org_a.id, 4, "new", 200, 5)];
    let twice = vec![retry[1].clone(), report(&a, org_a.id, 5, "new", 200, 5)];
    let r = store.record_usage_batch(&retry).await.must("retry");
    assert_eq!((r.inserted, r.duplicates), (1, 1));
    let r = store.record_usage_batch(&twice).await.must("twice");
    assert_eq!((r.inserted, r.duplicates), (0, 2));
    let r = store.record_usage_batch(&[report(&b, org_b.id, 2, "same", 200, 5)]).await.must("other org");
    assert_eq!(r.inserted, 1);
    store.fold_usage().await.must("fold");

    let days = store.key_usage_daily(a.id, day(0), day(0)).await.must("daily");
    assert_eq!((days[0].counts.requests, days[0].counts.reports, days[0].counts.tokens_used), (1, 2, 200));
    assert_eq!(store.get_key(a.id).await.must("get_key").total_requests, 1);
    assert_eq!(store.quota_used(&format!("quota:org:{}", org_a.id), "2030-01").await.must("quota"), 2);
}

/// A large batch (several statements' worth) that repeats part of an earlier one: the known events
/// are skipped, and only the new ones reach the rollups, the key and the quota counter.
pub async fn usage_batch_of_known_and_new_events_counts_the_new_once(store: &dyn Store) {
    let org = org(store, None).await;
    let k = key(store, &org).await;
    let events: Vec<UsageEvent> = (0..2_500).map(|i| verify_event(&k, i % 600, "VALID", "/m")).collect();
    let first = store.record_usage_batch(&events[..1_500]).await.must("first");
    assert_eq!((first.inserted, first.duplicates), (1_500, 0));
    let second = store.record_usage_batch(&events).await.must("overlapping");
    assert_eq!((second.inserted, second.duplicates), (1_000, 1_500));
    let raw = store.usage_event_totals(k.id, at(-1), at(24 * 60)).await.must("totals");
    assert_eq!((raw.events, raw.requests), (2_500, 2_500));
    store.fold_usage().await.must("fold");
    let days = store.key_usage_daily(k.id, day(0), day(0)).await.must("daily");
    assert_eq!(days[0].counts.requests, 2_500);
    assert_eq!(store.get_key(k.id).await.must("get_key").total_requests, 2_500);
    let subject = QuotaSubject::Org(org.id).to_string();
    assert_eq!(store.quota_used(&subject, "2030-01").await.must("quota_used"), 5_000);
}

/// Whatever `usage.raw_events` keeps, the rollups, the key's counters and the quota count every event
/// once, and a batch written twice counts once; only the raw rows differ: every report with an
/// idempotency id (`off`), plus every refused request (`denied`), or everything (`all`).
pub async fn usage_raw_events_choice_keeps_counts_exact(store: &dyn Store) {
    for (raw, kept) in [(RawEvents::Off, 1), (RawEvents::Denied, 4), (RawEvents::All, 14)] {
        let org = org(store, None).await;
        let k = key(store, &org).await;
        let mut events: Vec<UsageEvent> = (0..10).map(|i| verify_event(&k, i, "VALID", "/r")).collect();
        events.extend((10..12).map(|i| verify_event(&k, i, "INSUFFICIENT_SCOPE", "/r")));
        events.push(report(&k, org.id, 12, "r-1", 200, 9));
        let mut anonymous = report(&k, org.id, 13, "", 500, 9);
        anonymous.idempotency_id = None;
        events.push(anonymous);
        let first = store.record_usage(&events, raw).await.must("record_usage");
        assert_eq!((first.inserted, first.duplicates), (14, 0), "{raw:?}");
        let again = store.record_usage(&events, raw).await.must("written again");
        assert_eq!((again.inserted, again.duplicates), (0, 14), "{raw:?}: the batch's id is known");
        store.fold_usage().await.must("fold");
        let days = store.key_usage_daily(k.id, day(0), day(0)).await.must("daily");
        let c = &days[0].counts;
        assert_eq!((c.requests, c.denied, c.reports, c.errors_5xx), (12, 2, 2, 1), "{raw:?}");
        assert_eq!((c.tokens_used, c.cost_micros, c.latency_count), (200, 2_500, 2), "{raw:?}");
        let endpoints = store.key_usage_endpoints(k.id, day(0), day(0), 10).await.must("endpoints");
        assert_eq!(endpoints[0].counts.requests, 12, "{raw:?}");
        assert_eq!(store.get_key(k.id).await.must("get_key").total_requests, 10, "{raw:?}");
        let subject = QuotaSubject::Org(org.id).to_string();
        assert_eq!(store.quota_used(&subject, "2030-01").await.must("quota"), 20, "{raw:?}");
        let rows = store.usage_event_totals(k.id, at(-1), at(24 * 60)).await.must("totals");
        assert_eq!(rows.events, kept, "{raw:?}: raw rows kept");
    }
}

/// Batches written at the same time on separate connections (two nodes on one database) add up; a
/// batch id pruned past the window is forgotten, the others are still known.
pub async fn usage_batches_side_by_side_add_up_and_their_ids_expire(store: &dyn Store) {
    let org = org(store, None).await;
    let k = key(store, &org).await;
    let node_a: Vec<UsageEvent> = (0..300).map(|i| verify_event(&k, i % 60, "VALID", "/n")).collect();
    let node_b: Vec<UsageEvent> = (0..200).map(|i| verify_event(&k, 60 + i % 60, "VALID", "/n")).collect();
    let (a, b) = tokio::join!(store.record_usage(&node_a, RawEvents::Off), store.record_usage(&node_b, RawEvents::Off));
    assert_eq!((a.must("node a").inserted, b.must("node b").inserted), (300, 200));
    store.fold_usage().await.must("fold");
    assert_eq!(store.get_key(k.id).await.must("get_key").total_requests, 500);
    let subject = QuotaSubject::Org(org.id).to_string();
    assert_eq!(store.quota_used(&subject, "2030-01").await.must("quota"), 1_000);
    // Node a's batch ends at minute 59, node b's at 119: only a's id is older than minute 60.
    assert!(store.prune_usage_batches(at(60)).await.must("prune") >= 1);
    assert_eq!(store.record_usage(&node_b, RawEvents::Off).await.must("b again").duplicates, 200);
    assert_eq!(store.record_usage(&node_a, RawEvents::Off).await.must("a again").inserted, 300);
}

/// Pruning deletes old raw events only, in bounded steps; rollups stay.
pub async fn usage_prune_keeps_rollups(store: &dyn Store) {
    let org = org(store, None).await;
    let k = key(store, &org).await;
    let events: Vec<UsageEvent> = (0..5).map(|i| verify_event(&k, i, "VALID", "/p")).collect();
    store.record_usage_batch(&events).await.must("record");
    store.fold_usage().await.must("fold");
    let cutoff = t0() + Duration::minutes(3);
    // Other cases' events may be older than the cutoff too: prune until nothing is left before it.
    let mut pruned = 0;
    for _ in 0..100 {
        let n = store.prune_usage_events(cutoff, 2).await.must("prune");
        assert!(n <= 2, "at most the limit: {n}");
        if n == 0 {
            break;
        }
        pruned += n;
    }
    assert!(pruned >= 3, "{pruned}");
    let raw = store.usage_event_totals(k.id, at(0), at(10)).await.must("totals");
    assert_eq!(raw.events, 2);
    let days = store.key_usage_daily(k.id, day(0), day(0)).await.must("daily");
    assert_eq!(days[0].counts.requests, 5, "rollups stay");
}

/// Batches leave pending rows; folds running side by side (two nodes) count each of them exactly once,
/// and a fold with nothing pending changes nothing.
pub async fn usage_fold_counts_each_pending_row_once(store: &dyn Store) {
    let org = org(store, None).await;
    let keys = [key(store, &org).await, key(store, &org).await, key(store, &org).await];
    store.fold_usage().await.must("fold what other cases left");
    for batch in 0..20 {
        let events: Vec<UsageEvent> = (0..30)
            .map(|i| {
                let k = &keys[(batch + i) % keys.len()];
                verify_event(k, i as i64, if i % 10 == 9 { "RATE_LIMITED" } else { "VALID" }, ["/a", "/b"][i % 2])
            })
            .collect();
        store.record_usage_batch(&events).await.must("record");
    }
    let (a, b) = tokio::join!(store.fold_usage(), store.fold_usage());
    let folded = a.must("fold a") + b.must("fold b");
    assert!(folded > 0);
    assert_eq!(store.fold_usage().await.must("nothing left"), 0);
    let mut requests = 0;
    for k in &keys {
        let days = store.key_usage_daily(k.id, day(0), day(0)).await.must("daily");
        let c = &days[0].counts;
        requests += c.requests;
        assert_eq!(store.get_key(k.id).await.must("get_key").total_requests, c.requests - c.denied);
        let endpoints = store.key_usage_endpoints(k.id, day(0), day(0), 10).await.must("endpoints");
        assert_eq!(endpoints.iter().map(|e| e.counts.requests).sum::<i64>(), c.requests);
        assert_eq!(endpoints.iter().map(|e| e.counts.errors).sum::<i64>(), c.denied);
    }
    assert_eq!(requests, 20 * 30);
}

/// Pending rows holding i64::MAX (as an older version let `/v1/usage` write, or a spill file it left
/// replays) for one key, normal rows for another key of another organization, in several batches and
/// days: every fold succeeds, the extreme rollups stay at i64::MAX instead of wrapping or failing, the
/// other organization's rollups are exact, and reads that add days up saturate too.
pub async fn usage_extreme_rows_saturate_and_never_stop_the_fold(store: &dyn Store) {
    let (org_a, org_b) = (org(store, None).await, org(store, None).await);
    let (bad, good) = (key(store, &org_a).await, key(store, &org_b).await);
    store.fold_usage().await.must("fold what other cases left");
    let extreme = |minutes: i64| {
        let mut e = report(&bad, org_a.id, minutes, &format!("max-{minutes}"), 200, i64::MAX);
        e.tokens_used = i64::MAX;
        e.cost_micros = i64::MAX;
        e
    };
    let valid_max = |minutes: i64| {
        let mut e = verify_event(&bad, minutes, "VALID", "/x");
        e.quota_units = i64::MAX;
        e
    };
    let subject_a = QuotaSubject::Org(org_a.id).to_string();
    // Two rounds: the first fold creates the rollup rows, the second adds to rows already at the top.
    for round in 0..2 {
        let base = round * 10;
        for batch in 0..2 {
            let m = base + batch;
            // Two extreme events in one batch (the batch's own sum saturates), on two days, beside
            // a normal report of the other key.
            let events = vec![
                extreme(m),
                extreme(m + 100),
                extreme(24 * 60 + m),
                valid_max(m),
                valid_max(m + 200),
                report(&good, org_b.id, m, &format!("ok-{m}"), 200, 5),
            ];
            let r = store.record_usage_batch(&events).await.must("record extreme batch");
            assert_eq!(r.inserted, 6);
        }
        assert!(store.fold_usage().await.must("fold with extreme rows") > 0, "round {round}");
        assert_eq!(store.quota_used(&subject_a, "2030-01").await.must("quota"), i64::MAX);
    }
    assert_eq!(store.fold_usage().await.must("nothing left"), 0);

    let days = store.key_usage_daily(bad.id, day(0), day(24 * 60)).await.must("daily of the extreme key");
    assert_eq!(days.len(), 2);
    for d in &days {
        let c = &d.counts;
        assert_eq!((c.tokens_used, c.cost_micros, c.latency_sum_ms), (i64::MAX, i64::MAX, i64::MAX), "{}", d.day);
        assert_eq!(c.latency.0[15], c.latency_count, "every extreme latency in the open bucket");
    }
    assert_eq!((days[0].counts.reports, days[0].counts.requests), (8, 8));
    let endpoints = store.key_usage_endpoints(bad.id, day(0), day(24 * 60), 10).await.must("endpoints");
    let chat = endpoints.iter().find(|e| e.endpoint == "/v1/chat").map(|e| e.counts.clone()).unwrap_or_default();
    assert_eq!((chat.tokens_used, chat.cost_micros, chat.requests), (i64::MAX, i64::MAX, 0), "two days summed");
    let billing = store.org_usage_by_key(org_a.id, day(0), day(24 * 60)).await.must("billing of the extreme org");
    assert_eq!(billing.len(), 1);
    assert_eq!((billing[0].counts.tokens_used, billing[0].counts.cost_micros), (i64::MAX, i64::MAX));
    let raw = store.usage_event_totals(bad.id, at(-1), at(3 * 24 * 60)).await.must("raw totals");
    assert_eq!((raw.events, raw.tokens_used, raw.cost_micros), (20, i64::MAX, i64::MAX));
    assert_eq!(store.get_key(bad.id).await.must("get_key").total_requests, 8);

    // The other organization's rollups are exact.
    let days = store.key_usage_daily(good.id, day(0), day(24 * 60)).await.must("daily of the normal key");
    assert_eq!(days.len(), 1);
    let c = &days[0].counts;
    assert_eq!((c.reports, c.tokens_used, c.cost_micros, c.latency_sum_ms), (4, 400, 5_000, 20));
    let billing = store.org_usage_by_key(org_b.id, day(0), day(0)).await.must("billing of the normal org");
    assert_eq!((billing[0].counts.tokens_used, billing[0].counts.cost_micros), (400, 5_000));
    let org_days = store.org_usage_daily(org_b.id, day(0), day(24 * 60)).await.must("days of the normal org");
    assert_eq!(org_days.len(), 1, "the other organization's days stay apart");
    assert_eq!((org_days[0].counts.tokens_used, org_days[0].counts.cost_micros), (400, 5_000));
    let org_days = store.org_usage_daily(org_a.id, day(0), day(24 * 60)).await.must("days of the extreme org");
    assert!(org_days.iter().all(|d| d.counts.cost_micros == i64::MAX), "sums saturate");
}

/// A batch folded in memory (as the usage writer makes one per flush): a thousand verifications of two
/// keys are one pending row per key, counted once however often the batch is written; its raw events
/// count only when their row is new (a report's idempotency id seen in an earlier batch does not count
/// again), in any batch.
pub async fn usage_folded_batch_counts_once_and_only_new_raw_events(store: &dyn Store) {
    use crate::usage::UsageBatch;
    let org = org(store, None).await;
    let (k, other) = (key(store, &org).await, key(store, &org).await);
    store.fold_usage().await.must("fold what other cases left");
    let mut first = UsageBatch::new();
    for i in 0..1_000 {
        first.add(verify_event(if i % 2 == 0 { &k } else { &other }, i % 60, "VALID", "/f"), RawEvents::Denied);
    }
    first.add(report(&k, org.id, 5, "r-9", 200, 4), RawEvents::Denied);
    assert_eq!((first.events(), first.raw.len()), (1_001, 1));
    let recorded = store.record_batch(&first).await.must("first");
    assert_eq!((recorded.inserted, recorded.duplicates), (1_001, 0));
    assert_eq!(store.fold_usage().await.must("fold"), 3, "a pending row per key and endpoint, not per event");
    let mut second = UsageBatch::new();
    for i in 0..10 {
        second.add(verify_event(&k, 60 + i, "VALID", "/f"), RawEvents::Denied);
    }
    second.add(report(&k, org.id, 70, "r-9", 200, 4), RawEvents::Denied);
    let recorded = store.record_batch(&second).await.must("second");
    assert_eq!((recorded.inserted, recorded.duplicates), (10, 1), "the report was counted in the first batch");
    let again = store.record_batch(&second).await.must("second again");
    assert_eq!((again.inserted, again.duplicates), (0, 11), "the batch's id is known");
    assert_eq!(store.record_batch(&first).await.must("first again").inserted, 0);
    store.fold_usage().await.must("fold");
    let c = &store.key_usage_daily(k.id, day(0), day(0)).await.must("daily")[0].counts;
    assert_eq!((c.requests, c.reports), (510, 1));
    assert_eq!(store.get_key(k.id).await.must("key").total_requests, 510);
    assert_eq!(store.get_key(other.id).await.must("other").total_requests, 500);
    let subject = QuotaSubject::Org(org.id).to_string();
    assert_eq!(store.quota_used(&subject, "2030-01").await.must("quota"), 2 * 1_010);
}

/// A self-service customer's month is summed in the store by owner: every key of the owner in the
/// organization (a revoked one too), none of another owner's, none of the same owner id in another
/// organization; per key as the organization's lines say, per day as those keys' days add up.
pub async fn usage_by_owner_sums_that_owners_keys_only(store: &dyn Store) {
    use keyward_core::Environment;
    let (org_a, org_b) = (org(store, None).await, org(store, None).await);
    let owner = unique("cust");
    let owned = |org: &crate::Organization, owner: &str| {
        let mut k = new_key(org, Environment::Live).1;
        k.owner_id = Some(owner.to_owned());
        k
    };
    let mine = [insert(store, owned(&org_a, &owner)).await, insert(store, owned(&org_a, &owner)).await];
    let other_owner = insert(store, owned(&org_a, &unique("cust"))).await;
    let same_owner_elsewhere = insert(store, owned(&org_b, &owner)).await;
    let no_owner = key(store, &org_a).await;
    let mut events = Vec::new();
    for (i, k) in mine.iter().chain([&other_owner, &same_owner_elsewhere, &no_owner]).enumerate() {
        for m in 0..=i as i64 {
            events.push(verify_event(k, m, "VALID", "/x"));
            events.push(report(k, k.organization_id, 24 * 60 + m, &format!("o-{i}-{m}"), 200, 4));
        }
    }
    store.record_usage_batch(&events).await.must("record");
    store.fold_usage().await.must("fold");
    let revoked = store.revoke_key(mine[1].id, "gone", at(3 * 24 * 60), &crate::Actor::cli(at(3 * 24 * 60))).await;
    revoked.written("revoke");

    let (from, to) = (day(0), day(31 * 24 * 60 - 1));
    let lines = store.owner_month_by_key(org_a.id, &owner, from).await.must("owner_month_by_key");
    let mut want: Vec<_> = store
        .org_usage_by_key(org_a.id, from, to)
        .await
        .must("org_usage_by_key")
        .into_iter()
        .filter(|l| mine.iter().any(|k| k.id == l.key_id))
        .collect();
    want.sort_by_key(|l| l.key_id);
    assert_eq!(lines.len(), 2, "both of the owner's keys, the revoked one too: {lines:?}");
    assert_eq!(lines, want, "by key id, as the organization's lines say");
    assert_eq!(lines.iter().map(|l| l.counts.requests).sum::<i64>(), 1 + 2);

    let days = store.owner_usage_daily(org_a.id, &owner, from..=to).await.must("owner_usage_daily");
    let mut summed = std::collections::BTreeMap::<NaiveDate, crate::usage::DailyCounts>::new();
    for k in &mine {
        for d in store.key_usage_daily(k.id, from, to).await.must("key_usage_daily") {
            summed.entry(d.day).or_default().add(&d.counts);
        }
    }
    assert_eq!(
        days.iter().map(|d| (d.day, d.counts.clone())).collect::<Vec<_>>(),
        summed.into_iter().collect::<Vec<_>>()
    );
    assert_eq!(days.len(), 2);

    let elsewhere = store.owner_month_by_key(org_b.id, &owner, from).await.must("the other organization");
    assert_eq!(elsewhere.iter().map(|l| l.key_id).collect::<Vec<_>>(), [same_owner_elsewhere.id]);
    assert!(store.owner_month_by_key(org_a.id, "", from).await.must("no owner").is_empty(), "no owner: no lines");
    assert!(store.owner_usage_daily(org_a.id, "nobody", from..=to).await.must("nobody").is_empty());
    let later = store.owner_usage_daily(org_a.id, &owner, day(2 * 24 * 60)..=to).await.must("a later span");
    assert!(later.is_empty(), "days outside the span are not summed");
    let next = store.owner_month_by_key(org_a.id, &owner, day(31 * 24 * 60)).await.must("the next month");
    assert!(next.is_empty(), "another month's lines are its own");
}

/// Keys are looked up by id in batches: more ids than one statement takes, ids of several
/// organizations, an unknown id (left out), an id given twice, and none at all.
pub async fn keys_by_id_reads_many_at_once(store: &dyn Store) {
    use crate::usage::KEY_LOOKUP_CHUNK;
    use crate::{Actor, KeyImport};
    use keyward_core::{Environment, KeyId};
    let (org_a, org_b) = (org(store, None).await, org(store, None).await);
    let imports: Vec<KeyImport> = (0..KEY_LOOKUP_CHUNK + 3)
        .map(|i| {
            let mut key = new_key(&org_a, Environment::Live).1;
            key.name = format!("key {i}");
            KeyImport { key, legacy: false, created_at: None }
        })
        .collect();
    let ids: Vec<KeyId> = imports.iter().map(|i| i.key.id).collect();
    let imported = store.import_keys(org_a.id, imports, &Actor::cli(t0()), false).await;
    imported.written("import");
    let foreign = key(store, &org_b).await;

    let mut asked = ids.clone();
    asked.extend([foreign.id, KeyId::new(), ids[0]]);
    let found = store.keys_by_id(&asked).await.must("keys_by_id");
    let mut got: Vec<KeyId> = found.iter().map(|k| k.id).collect();
    got.sort();
    got.dedup();
    let mut want = ids.clone();
    want.push(foreign.id);
    want.sort();
    assert_eq!(got, want, "every known id, whatever its organization; the unknown one left out");
    for k in found.iter().filter(|k| [ids[7], foreign.id].contains(&k.id)) {
        assert_eq!(*k, store.get_key(k.id).await.must("get_key"), "the whole key, as get_key reads it");
    }
    assert!(store.keys_by_id(&[]).await.must("none").is_empty());
}

/// An organization's month from the keys' monthly rollup, costliest first, checked against its count.
async fn billed(store: &dyn Store, org: OrgId, month: NaiveDate) -> Vec<crate::usage::KeyTotals> {
    let lines = store.org_month_by_cost(org, month, None).await.must("org_month_by_cost");
    let count = store.org_month_keys(org, month).await.must("org_month_keys");
    assert_eq!(count, lines.len() as u64, "the count of the month's keys");
    lines
}

/// The daily rollups of `keys` in January and February 2030, summed per day and per key and month.
type Sums = (
    std::collections::BTreeMap<NaiveDate, crate::usage::DailyCounts>,
    std::collections::BTreeMap<NaiveDate, Vec<crate::usage::KeyTotals>>,
);

async fn daily_sums(store: &dyn Store, keys: &[crate::ApiKey]) -> Sums {
    use std::collections::BTreeMap;

    use crate::usage::{DailyCounts, KeyTotals};
    let (jan, feb) = (day(0), day(31 * 24 * 60));
    let end = day(59 * 24 * 60 - 1);
    let mut per_day = BTreeMap::<NaiveDate, DailyCounts>::new();
    let mut per_month = BTreeMap::<NaiveDate, Vec<KeyTotals>>::new();
    for k in keys {
        let mut month = BTreeMap::<NaiveDate, DailyCounts>::new();
        for d in store.key_usage_daily(k.id, jan, end).await.must("key_usage_daily") {
            per_day.entry(d.day).or_default().add(&d.counts);
            month.entry(if d.day < feb { jan } else { feb }).or_default().add(&d.counts);
        }
        for (m, counts) in month {
            per_month.entry(m).or_default().push(KeyTotals { key_id: k.id, counts });
        }
    }
    (per_day, per_month)
}

/// Reverts the applied migrations numbered `version` and up, then applies them again: a database
/// upgraded with usage in it.
async fn migrate_again_from(store: &dyn Store, version: i64) {
    let status = store.migration_status().await.must("migration_status");
    let newer = status.iter().filter(|m| m.applied && m.version >= version).count();
    store.migrate_down(u32::try_from(newer).unwrap_or(0)).await.must("down");
    store.migrate_up().await.must("up again");
}

/// `org`'s days and its `keys`' months in January and February 2030 equal the sums of those keys'
/// daily rollups.
async fn billing_equals_daily_sums(store: &dyn Store, org: OrgId, keys: &[crate::ApiKey]) {
    let (jan, feb) = (day(0), day(31 * 24 * 60));
    let end = day(59 * 24 * 60 - 1);
    let (per_day, mut per_month) = daily_sums(store, keys).await;
    let org_days = store.org_usage_daily(org, jan, end).await.must("org_usage_daily");
    let org_days: Vec<_> = org_days.into_iter().map(|d| (d.day, d.counts)).collect();
    assert_eq!(org_days, per_day.into_iter().collect::<Vec<_>>(), "an organization's days");
    for m in [jan, feb] {
        let mut want = per_month.remove(&m).unwrap_or_default();
        want.sort_by(|a, b| {
            (b.counts.cost_micros, b.counts.requests, a.key_id).cmp(&(
                a.counts.cost_micros,
                a.counts.requests,
                b.key_id,
            ))
        });
        assert_eq!(want.len(), keys.len(), "every key was used in {m}");
        assert_eq!(billed(store, org, m).await, want, "the keys' month {m}, costliest first");
        let top = store.org_month_by_cost(org, m, Some(1)).await.must("the costliest");
        assert_eq!(top, want[..1], "the top of {m}");
    }
}

/// The billing rollups (an organization's days, a key's months) equal the sums of the keys' daily
/// rollups, over several keys, days on both sides of a month's end, and several batches and folds; a
/// month's keys come costliest first, their count with them; another organization's stay apart. The
/// retention prunes raw events and batch ids only, never a rollup, so the months stay as they were.
pub async fn billing_rollups_equal_the_daily_sums(store: &dyn Store) {
    let (org_a, org_b) = (org(store, None).await, org(store, None).await);
    let keys = [key(store, &org_a).await, key(store, &org_a).await, key(store, &org_a).await];
    let foreign = key(store, &org_b).await;
    // 30 and 31 January, 1 and 3 February 2030.
    let days = [29, 30, 31, 33].map(|d| d * 24 * 60);
    for flush in 0..3 {
        let mut events = Vec::new();
        for (i, k) in keys.iter().chain([&foreign]).enumerate() {
            for (d, start) in days.iter().enumerate() {
                let minute = start + flush * 10;
                events.push(verify_event(k, minute, if i == 1 { "RATE_LIMITED" } else { "VALID" }, "/m"));
                // January's costliest key is February's cheapest.
                let reports = if d < 2 { i + 1 } else { 4 - i.min(3) };
                for r in 0..reports {
                    let id = format!("b-{flush}-{i}-{d}-{r}");
                    events.push(report(k, k.organization_id, minute + 1, &id, 200 + r as i32, 3 * r as i64));
                }
            }
        }
        store.record_usage_batch(&events).await.must("record");
        if flush != 1 {
            // The second batch is folded with the third.
            store.fold_usage().await.must("fold");
        }
    }
    billing_equals_daily_sums(store, org_a.id, &keys).await;
    billing_equals_daily_sums(store, org_b.id, std::slice::from_ref(&foreign)).await;
    let (jan, feb) = (day(0), day(31 * 24 * 60));
    assert_eq!(billed(store, org_a.id, jan).await[0].key_id, keys[2].id, "January's costliest");
    assert_eq!(billed(store, org_a.id, feb).await[0].key_id, keys[0].id, "February's costliest");
    assert!(billed(store, org_a.id, day(59 * 24 * 60)).await.is_empty(), "March");
    // The retention's prunes leave every rollup as it was.
    while store.prune_usage_events(at(60 * 24 * 60), 1_000).await.must("prune events") > 0 {}
    store.prune_usage_batches(at(60 * 24 * 60)).await.must("prune batches");
    billing_equals_daily_sums(store, org_a.id, &keys).await;
    billing_equals_daily_sums(store, org_b.id, std::slice::from_ref(&foreign)).await;
}

/// A database upgraded mid-month shows the same months: migration 0010 fills the billing rollups from
/// the daily ones (here: reverted and applied again over folded usage), and later folds add to them.
pub async fn billing_rollups_are_back_filled_by_their_migration(store: &dyn Store) {
    let org = org(store, None).await;
    let keys = [key(store, &org).await, key(store, &org).await];
    let batch = |flush: i64| {
        let mut events = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            for start in [30, 31, 32].map(|d| d * 24 * 60 + flush) {
                events.push(verify_event(k, start, "VALID", "/u"));
                events.push(report(k, org.id, start, &format!("u-{flush}-{i}-{start}"), 200, 7));
            }
        }
        events
    };
    store.record_usage_batch(&batch(0)).await.must("record");
    store.fold_usage().await.must("fold");
    migrate_again_from(store, 10).await;
    billing_equals_daily_sums(store, org.id, &keys).await;
    assert_eq!(billed(store, org.id, day(0)).await.len(), 2);
    store.record_usage_batch(&batch(1)).await.must("record after the upgrade");
    store.fold_usage().await.must("fold after the upgrade");
    billing_equals_daily_sums(store, org.id, &keys).await;
    let feb = billed(store, org.id, day(31 * 24 * 60)).await;
    assert_eq!(feb.iter().map(|l| l.counts.reports).collect::<Vec<_>>(), [4, 4], "two days, two batches");
}

/// `owner`'s days in `org` and its keys' months in January and February 2030 equal the sums of the
/// daily rollups of `keys` (that owner's keys of that organization).
async fn owner_equals_daily_sums(store: &dyn Store, org: OrgId, owner: &str, keys: &[crate::ApiKey]) {
    let (jan, feb) = (day(0), day(31 * 24 * 60));
    let end = day(59 * 24 * 60 - 1);
    let (per_day, mut per_month) = daily_sums(store, keys).await;
    let days = store.owner_usage_daily(org, owner, jan..=end).await.must("owner_usage_daily");
    let days: Vec<_> = days.into_iter().map(|d| (d.day, d.counts)).collect();
    assert_eq!(days, per_day.into_iter().collect::<Vec<_>>(), "{owner}'s days");
    for m in [jan, feb] {
        let mut want = per_month.remove(&m).unwrap_or_default();
        want.sort_by_key(|l| l.key_id);
        let lines = store.owner_month_by_key(org, owner, m).await.must("owner_month_by_key");
        assert_eq!(lines, want, "{owner}'s keys' month {m}, by key id");
    }
}

/// An owner's days (the self-serve chart) and its keys' months (the lines) equal the sums of those
/// keys' daily rollups: over several batches and folds, days on both sides of a month's end, a
/// revoked key, a rotation (the new key has its own months, under the same owner), keys of other
/// owners, the same owner id in another organization, and keys without an owner (no owner's rows).
/// A key's owner never changes: no write moves its days to another owner (an update of every other
/// field leaves it). The retention's prunes leave every rollup as it was.
pub async fn owner_rollups_equal_the_daily_sums(store: &dyn Store) {
    use keyward_core::Environment;

    use crate::{Actor, KeyPatch};
    let (org_a, org_b) = (org(store, None).await, org(store, None).await);
    let (alice, bob) = (unique("alice"), unique("bob"));
    let owned = |org: &crate::Organization, owner: &str| {
        let mut k = new_key(org, Environment::Live).1;
        k.owner_id = Some(owner.to_owned());
        k
    };
    let mut alices = vec![insert(store, owned(&org_a, &alice)).await, insert(store, owned(&org_a, &alice)).await];
    let bobs = [insert(store, owned(&org_a, &bob)).await];
    let alice_elsewhere = [insert(store, owned(&org_b, &alice)).await];
    let nobody = key(store, &org_a).await;
    // 30 and 31 January, 1 and 3 February 2030.
    let days = [29, 30, 31, 33].map(|d| d * 24 * 60);
    for flush in 0..3 {
        if flush == 1 {
            // Between batches: one key revoked, one rotated into a new key of the same owner, one
            // updated in every field an update may change.
            let cli = Actor::cli(at(days[0]));
            store.revoke_key(alices[0].id, "gone", at(days[0]), &cli).await.written("revoke");
            let rotated = store.rotate_key(alices[1].id, owned(&org_a, &alice), at(days[0]), &cli).await;
            alices.push(rotated.written("rotate").new.clone());
            let patch = KeyPatch {
                name: Some("renamed".to_owned()),
                description: Some(Some("described".to_owned())),
                metadata: Some(serde_json::json!({"company": "b"})),
                is_active: Some(false),
                ..KeyPatch::default()
            };
            let updated = store.update_key(bobs[0].id, patch, &cli).await.written("update");
            assert_eq!(updated.owner_id, Some(bob.clone()), "an update leaves the owner");
        }
        let mut events = Vec::new();
        let used = alices.iter().chain(&bobs).chain(&alice_elsewhere).chain([&nobody]);
        for (i, k) in used.enumerate() {
            for (d, start) in days.iter().enumerate() {
                let minute = start + flush * 10;
                events.push(verify_event(k, minute, if i == 1 { "RATE_LIMITED" } else { "VALID" }, "/o"));
                for r in 0..(i + d) % 3 {
                    let id = format!("o-{flush}-{i}-{d}-{r}");
                    events.push(report(k, k.organization_id, minute + 1, &id, 200 + 100 * r as i32, 5 * r as i64));
                }
            }
        }
        store.record_usage_batch(&events).await.must("record");
        if flush != 1 {
            // The second batch is folded with the third.
            store.fold_usage().await.must("fold");
        }
    }
    owner_equals_daily_sums(store, org_a.id, &alice, &alices).await;
    owner_equals_daily_sums(store, org_a.id, &bob, &bobs).await;
    owner_equals_daily_sums(store, org_b.id, &alice, &alice_elsewhere).await;
    let jan = day(0);
    let alice_days = store.owner_usage_daily(org_a.id, &alice, jan..=day(59 * 24 * 60)).await.must("alice");
    assert_eq!(alice_days.len(), days.len(), "a row per day used");
    assert_eq!(alice_days[0].counts.requests, 2 + 3 + 3, "two keys, then a successor too");
    assert!(store.owner_usage_daily(org_a.id, "", jan..=day(59 * 24 * 60)).await.must("none").is_empty());
    while store.prune_usage_events(at(60 * 24 * 60), 1_000).await.must("prune events") > 0 {}
    store.prune_usage_batches(at(60 * 24 * 60)).await.must("prune batches");
    owner_equals_daily_sums(store, org_a.id, &alice, &alices).await;
    owner_equals_daily_sums(store, org_b.id, &alice, &alice_elsewhere).await;
}

/// A database upgraded mid-month shows the same self-serve months: migration 0011 fills the owners'
/// days from the daily rollups (here: reverted and applied again over folded usage), and later folds
/// add to them.
pub async fn owner_rollups_are_back_filled_by_their_migration(store: &dyn Store) {
    use keyward_core::Environment;
    let org = org(store, None).await;
    let owner = unique("carol");
    let mut keys = Vec::new();
    for _ in 0..2 {
        let mut k = new_key(&org, Environment::Live).1;
        k.owner_id = Some(owner.clone());
        keys.push(insert(store, k).await);
    }
    let other = key(store, &org).await;
    let batch = |flush: i64| {
        let mut events = Vec::new();
        for (i, k) in keys.iter().chain([&other]).enumerate() {
            for start in [30, 31, 32].map(|d| d * 24 * 60 + flush) {
                events.push(verify_event(k, start, "VALID", "/u"));
                events.push(report(k, org.id, start, &format!("w-{flush}-{i}-{start}"), 200, 7));
            }
        }
        events
    };
    store.record_usage_batch(&batch(0)).await.must("record");
    store.fold_usage().await.must("fold");
    migrate_again_from(store, 11).await;
    owner_equals_daily_sums(store, org.id, &owner, &keys).await;
    store.record_usage_batch(&batch(1)).await.must("record after the upgrade");
    store.fold_usage().await.must("fold after the upgrade");
    owner_equals_daily_sums(store, org.id, &owner, &keys).await;
    let days = store.owner_usage_daily(org.id, &owner, day(0)..=day(59 * 24 * 60)).await.must("days");
    assert_eq!(days.iter().map(|d| d.counts.reports).collect::<Vec<_>>(), [4, 4, 4], "two keys, two batches");
}
