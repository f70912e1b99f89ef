//! The store conformance suite against SQLite: every case on a fresh database file of its own, plus the
//! SQLite-only checks (a new file, in-memory databases, two processes on one file).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use chrono::Utc;
use keyward_store::conformance;
use keyward_store::conformance_lifecycle::{self, Tamper};
use keyward_store::sqlite::SqliteStore;
use keyward_store::{Store, StoreError};
use tempfile::TempDir;

/// A migrated store on a new file; the directory lives as long as the returned guard.
async fn fresh(_test: &str) -> Option<(TempDir, SqliteStore)> {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::connect(&url(&dir)).await.expect("connect");
    store.migrate_up().await.expect("migrate up");
    Some((dir, store))
}

async fn done(dir: TempDir, store: SqliteStore) {
    drop(store);
    drop(dir);
}

fn url(dir: &TempDir) -> String {
    format!("sqlite://{}", dir.path().join("keyward.db").display())
}

/// A second store on the file, as the CLI opens it beside a running server.
async fn beside(dir: &TempDir) -> SqliteStore {
    SqliteStore::connect(&url(dir)).await.unwrap()
}

async fn tamper(kind: Tamper) {
    let (dir, store) = fresh("").await.unwrap();
    let pool = sqlx::SqlitePool::connect(&url(&dir)).await.unwrap();
    let exec = move |sql: String| -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        let pool = pool.clone();
        Box::pin(async move {
            sqlx::query(&sql).execute(&pool).await.unwrap();
        })
    };
    conformance_lifecycle::audit_tampering_is_detected(&store, kind, &exec, tamper_sql).await;
}

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

keyward_store::conformance_tests!(fresh, done, tamper);

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
    let (dir, server) = fresh("").await.unwrap();
    conformance::two_stores_respect_the_limit(&server, &beside(&dir).await).await;
}

/// Two processes appending to one file at once: `BEGIN IMMEDIATE` keeps one chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_writing_at_once_keep_one_intact_chain() {
    let (dir, server) = fresh("").await.unwrap();
    conformance_lifecycle::two_stores_writing_at_once_keep_one_intact_chain(&server, &beside(&dir).await).await;
}

#[tokio::test]
async fn a_bad_path_is_unavailable_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no/such/dir/keyward.db");
    let r = SqliteStore::connect(&format!("sqlite://{}", missing.display())).await;
    assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
}

#[tokio::test]
async fn the_status_view_agrees_with_key_state() {
    let (dir, store) = fresh("").await.unwrap();
    let pool = sqlx::SqlitePool::connect(&url(&dir)).await.unwrap();
    let status_of =
        move |id: keyward_core::KeyId| -> std::pin::Pin<Box<dyn std::future::Future<Output = String> + Send>> {
            let pool = pool.clone();
            Box::pin(async move {
                sqlx::query_scalar("SELECT status FROM v_api_keys WHERE id = ?")
                    .bind(id.to_string())
                    .fetch_one(&pool)
                    .await
                    .unwrap()
            })
        };
    conformance::status_view_agrees_with_key_state(&store, &status_of).await;
}

/// A key's owner never changes, even by hand: the owners' daily rollup is kept by it (migration
/// 0011). Any other column still changes.
#[tokio::test]
async fn a_keys_owner_cannot_be_changed() {
    let (dir, store) = fresh("").await.unwrap();
    let org = conformance::org(&store, None).await;
    let mut new = conformance::new_key(&org, keyward_core::Environment::Live).1;
    new.owner_id = Some("first".to_owned());
    let k = conformance::insert(&store, new).await;
    let pool = sqlx::SqlitePool::connect(&url(&dir)).await.unwrap();
    for owner in [Some("someone"), None] {
        let set = sqlx::query("UPDATE api_keys SET owner_id = ? WHERE id = ?").bind(owner).bind(k.id.to_string());
        let refused = set.execute(&pool).await.unwrap_err().to_string();
        assert!(refused.contains("owner_id never changes"), "{refused}");
    }
    let same = sqlx::query("UPDATE api_keys SET owner_id = owner_id, name = 'n' WHERE id = ?").bind(k.id.to_string());
    assert_eq!(same.execute(&pool).await.unwrap().rows_affected(), 1, "the same owner, another name");
    assert_eq!(store.get_key(k.id).await.unwrap().name, "n");
}

/// Every column of a raw usage event comes back as the event held it, whatever its text holds (quotes,
/// backslashes, control characters, any script), and a batch written again inserts nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_event_columns_round_trip() {
    use keyward_core::{KeyId, OrgId};
    use keyward_store::UsageStore;
    use keyward_store::usage::{UsageEvent, UsageKind};
    use sqlx::Row;

    let (dir, store) = fresh("").await.unwrap();
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
