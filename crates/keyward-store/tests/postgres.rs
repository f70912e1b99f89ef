//! The store conformance suite against PostgreSQL: every case in a fresh schema of its own (see
//! `keyward_store::testing`), plus the PostgreSQL-only checks (an empty schema, the status view, two
//! nodes on one database, the indexes, sweeping the schemas of crashed runs).
//!
//! The server is the one `KEYWARD_TEST_POSTGRES_URL` names (default
//! `postgres://postgres@127.0.0.1:5432/test`). When it cannot be reached the tests fail, unless
//! `KEYWARD_TEST_SKIP_POSTGRES=1` says to skip them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use chrono::Utc;
use keyward_store::conformance;
use keyward_store::conformance_lifecycle::{self, Tamper};
use keyward_store::postgres::PostgresStore;
use keyward_store::testing::{self, PgSchema};
use keyward_store::{Store, StoreError};
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

async fn tamper(kind: Tamper) {
    let Some((schema, store)) = fresh(&format!("postgres::lifecycle::tamper::{kind:?}")).await else { return };
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

keyward_store::conformance_tests!(fresh, done, tamper);

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

/// Two nodes on one fresh schema, each a store with a pool of its own.
async fn two_nodes(test: &str) -> Option<(PgSchema, PostgresStore, PostgresStore)> {
    let (schema, a) = fresh(test).await?;
    let b = PostgresStore::connect(schema.url()).await.unwrap();
    Some((schema, a, b))
}

async fn done_two(schema: PgSchema, a: PostgresStore, b: PostgresStore) {
    b.pool().close().await;
    done(schema, a).await;
}

/// Two nodes, each with its own pool on one database: the organization's row lock must keep the limit
/// check and the insert of one from interleaving with the other's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_one_database_respect_the_limit() {
    let Some((schema, a, b)) = two_nodes("postgres::two_nodes_on_one_database_respect_the_limit").await else { return };
    conformance::two_stores_respect_the_limit(&a, &b).await;
    done_two(schema, a, b).await;
}

/// Two nodes appending at once, many times over: the chain head lock keeps one chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_writing_at_once_keep_one_intact_chain() {
    let Some((schema, a, b)) = two_nodes("postgres::two_nodes_chain").await else { return };
    conformance_lifecycle::two_stores_writing_at_once_keep_one_intact_chain(&a, &b).await;
    done_two(schema, a, b).await;
}

#[tokio::test]
async fn the_status_view_agrees_with_key_state() {
    let Some((schema, store)) = fresh("postgres::the_status_view_agrees_with_key_state").await else { return };
    let pool = store.pool().clone();
    let status_of =
        move |id: keyward_core::KeyId| -> std::pin::Pin<Box<dyn std::future::Future<Output = String> + Send>> {
            let pool = pool.clone();
            Box::pin(async move {
                sqlx::query_scalar("SELECT status FROM v_api_keys WHERE id = $1")
                    .bind(id.0)
                    .fetch_one(&pool)
                    .await
                    .unwrap()
            })
        };
    conformance::status_view_agrees_with_key_state(&store, &status_of).await;
    done(schema, store).await;
}

/// A key's owner never changes, even by hand: the owners' daily rollup is kept by it (migration
/// 0011). Any other column still changes.
#[tokio::test]
async fn a_keys_owner_cannot_be_changed() {
    let Some((schema, store)) = fresh("postgres::a_keys_owner_cannot_be_changed").await else { return };
    let org = conformance::org(&store, None).await;
    let mut new = conformance::new_key(&org, keyward_core::Environment::Live).1;
    new.owner_id = Some("first".to_owned());
    let k = conformance::insert(&store, new).await;
    let pool = store.pool().clone();
    for owner in [Some("someone"), None] {
        let set = sqlx::query("UPDATE api_keys SET owner_id = $1 WHERE id = $2").bind(owner).bind(k.id.0);
        let refused = set.execute(&pool).await.unwrap_err().to_string();
        assert!(refused.contains("owner_id never changes"), "{refused}");
    }
    let same = sqlx::query("UPDATE api_keys SET owner_id = owner_id, name = 'n' WHERE id = $1").bind(k.id.0);
    assert_eq!(same.execute(&pool).await.unwrap().rows_affected(), 1, "the same owner, another name");
    assert_eq!(store.get_key(k.id).await.unwrap().name, "n");
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
        (
            "an owner's days",
            "SELECT * FROM usage_owner_daily WHERE organization_id = gen_random_uuid() AND owner_id = 'x'
             AND day >= '2030-01-01' AND day <= '2030-01-31' ORDER BY day",
        ),
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
