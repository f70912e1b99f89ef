//! The store conformance suite against SQLite: every case on a fresh database file of its own, plus the
//! SQLite-only checks (migrating down and up, in-memory databases, two processes on one file).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use chrono::Utc;
use keyward_core::Environment;
use keyward_store::conformance::{self, new_key, new_org, t0};
use keyward_store::sqlite::SqliteStore;
use keyward_store::{Actor, KeyFilter, NewKey, NoCache, PageRequest, Store, StoreError};
use tempfile::TempDir;

/// A migrated store on a new file; the directory lives as long as the returned guard.
async fn fresh() -> (TempDir, SqliteStore) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::connect(&url(&dir)).await.expect("connect");
    store.migrate_up().await.expect("migrate up");
    (dir, store)
}

fn url(dir: &TempDir) -> String {
    format!("sqlite://{}", dir.path().join("keyward.db").display())
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let (_dir, store) = fresh().await;
                conformance::$case(&store).await;
            }
        )*

        /// A case added to the suite but not to this list would silently never run on SQLite.
        #[test]
        fn every_conformance_case_runs() {
            assert_eq!([$(stringify!($case)),*].as_slice(), conformance::CASES);
        }
    };
}

conformance!(
    ping_and_backend,
    migrations_are_all_applied,
    create_find_and_get_a_key,
    unknown_ids_are_not_found,
    list_keys_filters,
    list_keys_paginates_newest_first,
    update_key_records_a_diff,
    deactivate_and_activate_are_named,
    revoke_keeps_the_row,
    audit_list_filters_and_paginates,
    organizations_create_update_and_find,
    list_and_count_orgs,
    max_api_keys_is_enforced,
    duplicate_hash_is_a_conflict,
    record_key_usage_accumulates,
    concurrent_inserts_respect_the_limit,
    audit_rows_never_hold_key_material,
    import_keys_is_idempotent_and_respects_the_limit,
    has_legacy_keys_follows_imports,
    append_audit_writes_one_row,
    every_write_is_seen_by_the_next_verification,
);

#[tokio::test]
async fn migrate_down_then_up_leaves_a_working_store() {
    let (_dir, store) = fresh().await;
    conformance::migrate_down_and_up(&store).await;
}

#[tokio::test]
async fn status_of_an_empty_database_lists_pending_migrations() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::connect(&url(&dir)).await.unwrap();
    let status = store.migration_status().await.unwrap();
    assert!(!status.is_empty() && status.iter().all(|m| !m.applied), "{status:?}");
    assert!(dir.path().join("keyward.db").exists(), "the file is created on connect");
}

#[tokio::test]
async fn an_in_memory_database_keeps_its_data_across_calls() {
    let store = keyward_store::open("sqlite::memory:", true).await.unwrap();
    assert_eq!(store.backend(), "sqlite");
    conformance::create_find_and_get_a_key(store.as_ref()).await;
    conformance::list_keys_paginates_newest_first(store.as_ref()).await;
    conformance::concurrent_inserts_respect_the_limit(store.as_ref()).await;
}

#[tokio::test]
async fn open_migrates_a_file_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let store = keyward_store::open(&url(&dir), true).await.unwrap();
    assert_eq!(store.count_orgs().await.unwrap(), 0);
    assert!(!store.has_legacy_keys().await.unwrap(), "a fresh database has no legacy keys");
    let r = keyward_store::open("mysql://localhost/x", false).await;
    assert!(matches!(r, Err(StoreError::Internal(_))));
}

/// The server and the CLI each hold their own pools on one file: `BEGIN IMMEDIATE` must keep the
/// limit check and the insert of one from interleaving with the other's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_on_one_file_respect_the_limit() {
    let (dir, server) = fresh().await;
    let cli = SqliteStore::connect(&url(&dir)).await.unwrap();
    for round in 0..5 {
        let org = server.insert_org(new_org(Some(1)), &Actor::cli(t0())).await.unwrap();
        let actor = Actor::cli(t0());
        let (a, b) = tokio::join!(
            server.insert_key(new_key(&org, Environment::Live).1, &actor),
            cli.insert_key(new_key(&org, Environment::Live).1, &actor)
        );
        let wins = [&a, &b].iter().filter(|r| r.is_ok()).count();
        assert_eq!(wins, 1, "round {round}: {a:?} / {b:?}");
        assert!(matches!(a.as_ref().err().or(b.as_ref().err()), Some(StoreError::KeyLimitReached(1))));
        // Each sees the other's write at once.
        let filter = KeyFilter {
            organization_id: Some(org.id),
            owner_id: None,
            environment: None,
            status: None,
            include_inactive: true,
            now: t0(),
        };
        let page = PageRequest { after: None, limit: 10 };
        assert_eq!(server.list_keys(&filter, page).await.unwrap().items.len(), 1);
        assert_eq!(cli.list_keys(&filter, page).await.unwrap().items.len(), 1);
    }
}

#[tokio::test]
async fn a_bad_path_is_unavailable_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no/such/dir/keyward.db");
    let r = SqliteStore::connect(&format!("sqlite://{}", missing.display())).await;
    assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
}

/// `v_api_keys` derives status against the database clock with the same precedence as the code.
#[tokio::test]
async fn the_status_view_agrees_with_key_state() {
    let (dir, store) = fresh().await;
    let org = store.insert_org(new_org(None), &Actor::cli(t0())).await.unwrap();
    let wall = Utc::now();
    let hour = chrono::Duration::hours(1);
    let cli = Actor::cli(wall);
    let mut keys = Vec::new();
    for (is_active, expires_at, revoked_at) in [
        (true, None, None),
        (false, None, None),
        (true, Some(wall - hour), None),
        (true, Some(wall + hour), None),
        (false, Some(wall - hour), None),
        (true, None, Some(wall - hour)),
        (false, Some(wall - hour), Some(wall - hour)),
        (true, None, Some(wall + hour)),
    ] {
        let new = NewKey { is_active, expires_at, ..new_key(&org, Environment::Live).1 };
        let mut key = store.insert_key(new, &cli).await.unwrap().apply(&NoCache);
        if let Some(at) = revoked_at {
            key = store.revoke_key(key.id, "test", at, &cli).await.unwrap().apply(&NoCache);
        }
        keys.push(key);
    }

    let pool = sqlx::SqlitePool::connect(&url(&dir)).await.unwrap();
    for key in keys {
        let status: String = sqlx::query_scalar("SELECT status FROM v_api_keys WHERE id = ?")
            .bind(key.id.to_string())
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(status, key.status(Utc::now()).as_str(), "{:?}", key.state());
    }
}

mod lifecycle {
    use keyward_store::conformance_lifecycle::{self, Tamper};

    use super::*;

    macro_rules! lifecycle_conformance {
        ($($case:ident),* $(,)?) => {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let (_dir, store) = fresh().await;
                    conformance_lifecycle::$case(&store).await;
                }
            )*

            #[test]
            fn every_lifecycle_case_runs() {
                assert_eq!([$(stringify!($case)),*].as_slice(), conformance_lifecycle::CASES);
            }
        };
    }

    lifecycle_conformance!(
        rotation_links_both_keys_and_schedules_revocation,
        revoked_keys_are_not_rotated,
        expiry_lists_notifies_and_deactivates,
        audit_chain_stays_intact,
        webhooks_dispatch_claim_and_record,
    );

    fn tamper_sql(kind: Tamper, a: i64, b: i64) -> Vec<String> {
        match kind {
            Tamper::Change => vec![format!("UPDATE audit_log SET actor = 'mallory' WHERE id = {a}")],
            Tamper::Delete | Tamper::Truncate => vec![format!("DELETE FROM audit_log WHERE id = {a}")],
            Tamper::Reorder => vec![
                format!("UPDATE audit_log SET id = -1 WHERE id = {a}"),
                format!("UPDATE audit_log SET id = {a} WHERE id = {b}"),
                format!("UPDATE audit_log SET id = {b} WHERE id = -1"),
            ],
        }
    }

    /// Two processes appending to one file at once: `BEGIN IMMEDIATE` keeps one chain.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_stores_writing_at_once_keep_one_intact_chain() {
        let (dir, server) = fresh().await;
        let cli = SqliteStore::connect(&url(&dir)).await.unwrap();
        let org = server.insert_org(new_org(None), &Actor::cli(t0())).await.unwrap();
        let actor = Actor::cli(t0());
        for _ in 0..10 {
            let (a, b) = tokio::join!(
                server.insert_key(new_key(&org, Environment::Live).1, &actor),
                cli.append_audit("import", org.id, serde_json::json!({"n": 1}), &actor),
            );
            a.unwrap().apply(&NoCache);
            b.unwrap();
        }
        let report = keyward_store::LifecycleStore::verify_audit_chain(&cli).await.unwrap();
        assert!(report.intact, "{report:?}");
        assert_eq!(report.rows_checked, 21);
    }

    async fn tamper(kind: Tamper) {
        let (dir, store) = fresh().await;
        let pool = sqlx::SqlitePool::connect(&url(&dir)).await.unwrap();
        let exec = move |sql: String| -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
            let pool = pool.clone();
            Box::pin(async move {
                sqlx::query(&sql).execute(&pool).await.unwrap();
            })
        };
        conformance_lifecycle::audit_tampering_is_detected(&store, kind, &exec, tamper_sql).await;
    }

    #[tokio::test]
    async fn a_changed_audit_row_is_named() {
        tamper(Tamper::Change).await;
    }

    #[tokio::test]
    async fn a_deleted_audit_row_is_detected_at_the_next_row() {
        tamper(Tamper::Delete).await;
    }

    #[tokio::test]
    async fn reordered_audit_rows_are_named() {
        tamper(Tamper::Reorder).await;
    }

    #[tokio::test]
    async fn a_truncated_audit_log_is_detected() {
        tamper(Tamper::Truncate).await;
    }
}
/// The usage ledger's cases ([`conformance::usage`]), listed apart from the others.
macro_rules! usage_conformance {
    ($($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let (_dir, store) = fresh().await;
                conformance::usage::$case(&store).await;
            }
        )*

        #[test]
        fn every_usage_conformance_case_runs() {
            assert_eq!([$(stringify!($case)),*].as_slice(), conformance::usage::CASES);
        }
    };
}

usage_conformance!(
    usage_batch_writes_events_rollups_and_counters,
    usage_batch_is_idempotent,
    usage_batch_of_known_and_new_events_counts_the_new_once,
    usage_prune_keeps_rollups,
    usage_fold_counts_each_pending_row_once,
    usage_extreme_rows_saturate_and_never_stop_the_fold
);

/// Every column of a raw usage event comes back as the event held it, whatever its text holds (quotes,
/// backslashes, control characters, any script), and a batch written again inserts nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_event_columns_round_trip() {
    use keyward_core::{KeyId, OrgId};
    use keyward_store::UsageStore;
    use keyward_store::usage::{UsageEvent, UsageKind};
    use sqlx::Row;

    let (dir, store) = fresh().await;
    let mut e = UsageEvent::new(UsageKind::Report, KeyId::new(), OrgId::new(), Utc::now());
    e.outcome = Some("VALID".into());
    e.endpoint = Some("/v1/\"quoted\"/\\back\\slash/ünï/日本/🦀".to_owned());
    e.method = Some("POST".to_owned());
    e.status_code = Some(503);
    e.response_time_ms = Some(i64::from(i32::MAX) + 7);
    e.tokens_used = i64::MAX;
    e.cost_micros = -1;
    e.ip = Some("2001:db8::7".parse().unwrap());
    e.user_agent = Some("curl/8.0\n\t\u{1}\u{7f} end".to_owned());
    e.error_code = Some("upstream_timeout".to_owned());
    e.error_message = Some(String::new());
    e.idempotency_id = Some("req-1".to_owned());
    let mut bare = UsageEvent::new(UsageKind::Verify, KeyId::new(), OrgId::new(), Utc::now());
    bare.outcome = Some("NOT_FOUND".into());
    let written = store.record_usage_batch(&[e.clone(), bare.clone()]).await.unwrap();
    assert_eq!((written.inserted, written.duplicates), (2, 0));

    let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url(&dir)).await.unwrap();
    let row = sqlx::query(
        "SELECT key_id, organization_id, kind, outcome, endpoint, method, status_code, response_time_ms, \
         tokens_used, cost_micros, ip, user_agent, error_code, error_message, idempotency_id, typeof(status_code), \
         typeof(tokens_used) FROM usage_events WHERE id = ?",
    )
    .bind(e.id.to_string())
    .fetch_one(&mut conn)
    .await
    .unwrap();
    let text = |i: usize| row.get::<Option<String>, _>(i);
    assert_eq!(text(0), Some(e.key_id.to_string()));
    assert_eq!(text(1), Some(e.organization_id.to_string()));
    assert_eq!(text(2).as_deref(), Some("report"));
    assert_eq!(text(3).as_deref(), Some("VALID"));
    assert_eq!(text(4), e.endpoint);
    assert_eq!(text(5), e.method);
    assert_eq!(row.get::<Option<i64>, _>(6), Some(503));
    assert_eq!(row.get::<Option<i64>, _>(7), e.response_time_ms);
    assert_eq!(row.get::<i64, _>(8), i64::MAX);
    assert_eq!(row.get::<i64, _>(9), -1);
    assert_eq!(text(10).as_deref(), Some("2001:db8::7"));
    assert_eq!(text(11), e.user_agent);
    assert_eq!(text(12), e.error_code);
    assert_eq!(text(13).as_deref(), Some(""));
    assert_eq!(text(14), e.idempotency_id);
    assert_eq!((text(15).as_deref(), text(16).as_deref()), (Some("integer"), Some("integer")));

    let row = sqlx::query(
        "SELECT outcome, endpoint, status_code, ip, user_agent, tokens_used FROM usage_events WHERE id = ?",
    )
    .bind(bare.id.to_string())
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(row.get::<Option<String>, _>(0).as_deref(), Some("NOT_FOUND"));
    assert_eq!((row.get::<Option<String>, _>(1), row.get::<Option<i64>, _>(2)), (None, None));
    assert_eq!((row.get::<Option<String>, _>(3), row.get::<Option<String>, _>(4)), (None, None));
    assert_eq!(row.get::<i64, _>(5), 0);
    // Written again: both known, nothing inserted twice (the checked path).
    let again = store.record_usage_batch(&[e, bare]).await.unwrap();
    assert_eq!((again.inserted, again.duplicates), (0, 2));
}
