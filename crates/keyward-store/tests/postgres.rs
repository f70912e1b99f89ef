//! The store conformance suite against PostgreSQL: every case in a fresh schema of its own (see
//! `keyward_store::testing`), plus the PostgreSQL-only checks (migrating down and up, the status view,
//! two nodes on one database, sweeping the schemas of crashed runs).
//!
//! The server is the one `KEYWARD_TEST_POSTGRES_URL` names (default
//! `postgres://postgres@127.0.0.1:5432/test`). When it cannot be reached the tests fail, unless
//! `KEYWARD_TEST_SKIP_POSTGRES=1` says to skip them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use chrono::Utc;
use keyward_core::Environment;
use keyward_store::conformance::{self, new_key, new_org, t0};
use keyward_store::postgres::PostgresStore;
use keyward_store::testing::{self, PgSchema};
use keyward_store::{Actor, KeyFilter, NewKey, NoCache, PageRequest, Store, StoreError};
use sqlx::Connection;

/// A migrated store in a new schema, or `None` when PostgreSQL tests are skipped.
async fn fresh(test: &str) -> Option<(PgSchema, PostgresStore)> {
    let schema = PgSchema::create(test).await?;
    let store = PostgresStore::connect(schema.url()).await.expect("connect");
    store.migrate_up().await.expect("migrate up");
    Some((schema, store))
}

/// Closes the pool before the schema is dropped, so no connection of ours is left using it.
async fn done(schema: PgSchema, store: PostgresStore) {
    store.pool().close().await;
    drop(schema);
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let Some((schema, store)) = fresh(concat!("postgres::", stringify!($case))).await else { return };
                conformance::$case(&store).await;
                done(schema, store).await;
            }
        )*

        /// A case added to the suite but not to this list would silently never run on PostgreSQL.
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
    let Some((schema, store)) = fresh("postgres::migrate_down_then_up_leaves_a_working_store").await else { return };
    conformance::migrate_down_and_up(&store).await;
    done(schema, store).await;
}

#[tokio::test]
async fn an_empty_schema_lists_pending_migrations_and_open_migrates_it() {
    let Some(schema) = PgSchema::create("postgres::an_empty_schema_lists_pending_migrations").await else { return };
    let store = PostgresStore::connect(schema.url()).await.unwrap();
    let status = store.migration_status().await.unwrap();
    assert!(status.len() >= 2 && status.iter().all(|m| !m.applied), "{status:?}");
    store.pool().close().await;

    // `open` picks the backend by scheme; `postgresql://` is the same as `postgres://`.
    let url = schema.url().replacen("postgres://", "postgresql://", 1);
    let opened = keyward_store::open(&url, true).await.unwrap();
    assert_eq!(opened.backend(), "postgres");
    assert!(opened.migration_status().await.unwrap().iter().all(|m| m.applied));
    assert_eq!(opened.count_orgs().await.unwrap(), 0);
    assert!(!opened.has_legacy_keys().await.unwrap(), "a fresh database has no legacy keys");
    drop(opened);
    drop(schema);
}

#[tokio::test]
async fn an_unreachable_server_is_unavailable_not_a_panic() {
    // Port 1 on loopback: nothing listens there, so the connection is refused at once.
    let r = PostgresStore::connect("postgres://postgres@127.0.0.1:1/test").await;
    assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
}

/// Two nodes, each with its own pool on one database: the organization's row lock must keep the limit
/// check and the insert of one from interleaving with the other's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_one_database_respect_the_limit() {
    let Some((schema, node_a)) = fresh("postgres::two_nodes_on_one_database_respect_the_limit").await else { return };
    let node_b = PostgresStore::connect(schema.url()).await.unwrap();
    for round in 0..5 {
        let org = node_a.insert_org(new_org(Some(1)), &Actor::cli(t0())).await.unwrap();
        let actor = Actor::cli(t0());
        let (a, b) = tokio::join!(
            node_a.insert_key(new_key(&org, Environment::Live).1, &actor),
            node_b.insert_key(new_key(&org, Environment::Live).1, &actor)
        );
        let wins = [&a, &b].iter().filter(|r| r.is_ok()).count();
        assert_eq!(wins, 1, "round {round}: {a:?} / {b:?}");
        assert!(matches!(a.as_ref().err().or(b.as_ref().err()), Some(StoreError::KeyLimitReached(1))));
        let filter = KeyFilter {
            organization_id: Some(org.id),
            owner_id: None,
            environment: None,
            status: None,
            include_inactive: true,
            now: t0(),
        };
        let page = PageRequest { after: None, limit: 10 };
        assert_eq!(node_a.list_keys(&filter, page).await.unwrap().items.len(), 1);
        assert_eq!(node_b.list_keys(&filter, page).await.unwrap().items.len(), 1);
    }
    node_b.pool().close().await;
    done(schema, node_a).await;
}

/// `v_api_keys` derives status against the database clock with the same precedence as the code.
#[tokio::test]
async fn the_status_view_agrees_with_key_state() {
    let Some((schema, store)) = fresh("postgres::the_status_view_agrees_with_key_state").await else { return };
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
    for key in keys {
        let status: String = sqlx::query_scalar("SELECT status FROM v_api_keys WHERE id = $1")
            .bind(key.id.0)
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(status, key.status(Utc::now()).as_str(), "{:?}", key.state());
    }
    done(schema, store).await;
}

/// The lookups the API makes are served by indexes (checked on the plan, with sequential scans off so
/// that an empty table does not hide a missing index).
#[tokio::test]
async fn every_lookup_has_an_index() {
    let Some((schema, store)) = fresh("postgres::every_lookup_has_an_index").await else { return };
    let mut conn = store.pool().acquire().await.unwrap();
    sqlx::query("SET enable_seqscan = off").execute(&mut *conn).await.unwrap();
    for (what, sql) in [
        ("key by hash", "SELECT * FROM api_keys WHERE key_hash = '\\x00'"),
        (
            "keys of an organization",
            "SELECT * FROM api_keys WHERE organization_id = gen_random_uuid() ORDER BY id DESC LIMIT 5",
        ),
        ("keys of an owner", "SELECT * FROM api_keys WHERE owner_id = 'x' ORDER BY id DESC LIMIT 5"),
        ("expiring keys", "SELECT * FROM api_keys WHERE expires_at < now()"),
        ("legacy keys", "SELECT EXISTS (SELECT 1 FROM api_keys WHERE legacy)"),
        ("audit by time", "SELECT * FROM audit_log WHERE created_at >= now() ORDER BY id DESC LIMIT 5"),
        ("audit of a key", "SELECT * FROM audit_log WHERE key_id = gen_random_uuid() ORDER BY id DESC LIMIT 5"),
        (
            "audit of an organization",
            "SELECT * FROM audit_log WHERE organization_id = gen_random_uuid() ORDER BY id DESC LIMIT 5",
        ),
        ("audit by actor", "SELECT * FROM audit_log WHERE actor = 'cli' ORDER BY id DESC LIMIT 5"),
    ] {
        let plan: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN {sql}")).fetch_all(&mut *conn).await.unwrap();
        let plan = plan.join("\n");
        assert!(!plan.contains("Seq Scan"), "{what} needs an index:\n{plan}");
    }
    drop(conn);
    done(schema, store).await;
}

/// Schemas left by crashed runs (older than an hour) are dropped; fresh ones and foreign ones are not.
#[tokio::test]
async fn stale_test_schemas_are_swept() {
    let Some(mine) = PgSchema::create("postgres::stale_test_schemas_are_swept").await else { return };
    let mut conn = sqlx::PgConnection::connect(&testing::base_url()).await.unwrap();
    let two_hours_ago = Utc::now().timestamp() as u64 - 2 * 60 * 60;
    let old = uuid::Uuid::new_v7(uuid::Timestamp::from_unix(uuid::NoContext, two_hours_ago, 0));
    let stale = format!("kw_test_{}", old.simple());
    let foreign = format!("kw_test_not_a_uuid_{}", uuid::Uuid::now_v7().simple());
    for name in [&stale, &foreign] {
        sqlx::query(&format!("CREATE SCHEMA \"{name}\"")).execute(&mut conn).await.unwrap();
    }
    testing::sweep(&mut conn, testing::STALE_AFTER).await.unwrap();
    let exists = |name: String| {
        sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)").bind(name)
    };
    assert!(!exists(stale).fetch_one(&mut conn).await.unwrap(), "the stale schema is dropped");
    assert!(exists(mine.name().to_owned()).fetch_one(&mut conn).await.unwrap(), "a fresh one is kept");
    assert!(exists(foreign.clone()).fetch_one(&mut conn).await.unwrap(), "a name it did not make is kept");
    sqlx::query(&format!("DROP SCHEMA \"{foreign}\"")).execute(&mut conn).await.unwrap();

    // Dropping the guard drops the schema.
    let name = mine.name().to_owned();
    drop(mine);
    assert!(!exists(name).fetch_one(&mut conn).await.unwrap(), "the guard drops its schema");
}

mod lifecycle {
    use keyward_store::conformance_lifecycle::{self, Tamper};

    use super::*;

    macro_rules! lifecycle_conformance {
        ($($case:ident),* $(,)?) => {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some((schema, store)) = fresh(concat!("postgres::lifecycle::", stringify!($case))).await
                    else {
                        return;
                    };
                    conformance_lifecycle::$case(&store).await;
                    done(schema, store).await;
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

    /// `id` is an identity column: rows are reordered by swapping everything but the id, in one
    /// statement (its subqueries see the rows as they were before it).
    fn tamper_sql(kind: Tamper, a: i64, b: i64) -> Vec<String> {
        match kind {
            Tamper::Change => vec![format!("UPDATE audit_log SET actor = 'mallory' WHERE id = {a}")],
            Tamper::Delete | Tamper::Truncate => vec![format!("DELETE FROM audit_log WHERE id = {a}")],
            Tamper::Reorder => vec![format!(
                "UPDATE audit_log AS t SET (action, key_id, organization_id, actor, actor_ip, details, created_at,
                     prev_hash, row_hash) =
                 (SELECT action, key_id, organization_id, actor, actor_ip, details, created_at, prev_hash, row_hash
                  FROM audit_log AS s WHERE s.id = CASE WHEN t.id = {a} THEN {b} ELSE {a} END)
                 WHERE t.id IN ({a}, {b})"
            )],
        }
    }

    /// Two nodes appending at once, many times over: the chain head lock keeps one chain.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_nodes_writing_at_once_keep_one_intact_chain() {
        let Some((schema, node_a)) = fresh("postgres::lifecycle::two_nodes_chain").await else { return };
        let node_b = PostgresStore::connect(schema.url()).await.unwrap();
        let org = node_a.insert_org(new_org(None), &Actor::cli(t0())).await.unwrap();
        let actor = Actor::cli(t0());
        for _ in 0..10 {
            let (a1, b1, a2, b2) = tokio::join!(
                node_a.insert_key(new_key(&org, Environment::Live).1, &actor),
                node_b.insert_key(new_key(&org, Environment::Live).1, &actor),
                node_a.append_audit("import", org.id, serde_json::json!({"n": 1}), &actor),
                node_b.append_audit("import", org.id, serde_json::json!({"n": 2}), &actor),
            );
            a1.unwrap().apply(&NoCache);
            b1.unwrap().apply(&NoCache);
            a2.unwrap();
            b2.unwrap();
        }
        let report = keyward_store::LifecycleStore::verify_audit_chain(&node_b).await.unwrap();
        assert!(report.intact, "{report:?}");
        assert_eq!(report.rows_checked, 41);
        node_b.pool().close().await;
        done(schema, node_a).await;
    }

    async fn tamper(kind: Tamper, test: &str) {
        let Some((schema, store)) = fresh(test).await else { return };
        let pool = store.pool().clone();
        let exec = move |sql: String| -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
            let pool = pool.clone();
            Box::pin(async move {
                sqlx::query(&sql).execute(&pool).await.unwrap();
            })
        };
        conformance_lifecycle::audit_tampering_is_detected(&store, kind, &exec, tamper_sql).await;
        done(schema, store).await;
    }

    #[tokio::test]
    async fn a_changed_audit_row_is_named() {
        tamper(Tamper::Change, "postgres::lifecycle::change").await;
    }

    #[tokio::test]
    async fn a_deleted_audit_row_is_detected_at_the_next_row() {
        tamper(Tamper::Delete, "postgres::lifecycle::delete").await;
    }

    #[tokio::test]
    async fn reordered_audit_rows_are_named() {
        tamper(Tamper::Reorder, "postgres::lifecycle::reorder").await;
    }

    #[tokio::test]
    async fn a_truncated_audit_log_is_detected() {
        tamper(Tamper::Truncate, "postgres::lifecycle::truncate").await;
    }
}
/// The usage ledger's cases ([`conformance::usage`]), listed apart from the others.
macro_rules! usage_conformance {
    ($($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let Some((schema, store)) = fresh(concat!("postgres::usage::", stringify!($case))).await else { return };
                conformance::usage::$case(&store).await;
                done(schema, store).await;
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
