//! Three `keyward serve` processes on loopback sharing one PostgreSQL and one Redis: a revocation on
//! one node reaches the others within a second, a 100/minute limit admits exactly 100 across all
//! three under concurrent load, and verifications spread over the three are counted exactly once in
//! every usage figure. Real processes, real sockets, every wait bounded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keyward_store::testing::PgSchema;

mod common;
use serde_json::{Value, json};

struct Node {
    child: Child,
    address: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
    }
}

fn keyward(database_url: &str, redis_url: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyward"));
    cmd.env("KEYWARD_DATABASE_URL", database_url)
        .env("KEYWARD_REDIS_URL", redis_url)
        .env("KEYWARD_LOG_FORMAT", "json")
        // The test drives everything from 127.0.0.1: lift Keyward's own per-IP protection.
        .env("KEYWARD_PROTECTION__MANAGEMENT_PER_MINUTE", "1000000")
        .env("KEYWARD_PROTECTION__KEY_CREATION_PER_MINUTE", "1000000")
        .env_remove("KEYWARD_PEPPER");
    cmd
}

fn start(database_url: &str, redis_url: &str) -> Node {
    start_with(database_url, redis_url, &[])
}

fn start_with(database_url: &str, redis_url: &str, env: &[(&str, &str)]) -> Node {
    let mut child = keyward(database_url, redis_url)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let address = common::listening_address(&mut child, Instant::now());
    Node { child, address }
}

/// One HTTP/1.1 request, `Connection: close`; status and JSON body.
fn http(address: &str, method: &str, path: &str, key: &str, body: Option<Value>) -> (u16, Value) {
    let (status, json, _) = common::http(address, method, path, key, body);
    (status, json)
}

fn verify(node: &Node, admin: &str, key: &str) -> String {
    let (status, body) = http(&node.address, "POST", "/v1/verify", admin, Some(json!({"key": key})));
    assert_eq!(status, 200, "{body}");
    body["code"].as_str().unwrap().to_owned()
}

fn redis_url() -> Option<String> {
    if std::env::var("KEYWARD_TEST_SKIP_REDIS").is_ok_and(|v| v == "1") {
        eprintln!("!!!!! SKIPPED multinode: Redis is not reachable (KEYWARD_TEST_SKIP_REDIS=1) !!!!!");
        return None;
    }
    Some(std::env::var("KEYWARD_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned()))
}

/// A PostgreSQL schema of the test's own, seeded, with Redis: what the nodes share.
struct Cluster {
    runtime: tokio::runtime::Runtime,
    schema: PgSchema,
    db: String,
    redis: String,
    /// The seeded admin key.
    admin: String,
}

impl Cluster {
    /// `None` (the test skips) without PostgreSQL or Redis.
    fn seeded(name: &str) -> Option<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let schema = runtime.block_on(PgSchema::create(name))?;
        let redis = redis_url()?;
        let db = schema.url().to_owned();
        let seeded = keyward(&db, &redis).args(["seed", "--json"]).output().unwrap();
        assert!(seeded.status.success(), "{}", String::from_utf8_lossy(&seeded.stderr));
        let seeded: Value = serde_json::from_slice(&seeded.stdout).unwrap();
        let admin = seeded["key"].as_str().unwrap().to_owned();
        Some(Self { runtime, schema, db, redis, admin })
    }
}

#[test]
fn three_nodes_share_revocations_and_limits() {
    let Some(Cluster { schema: _schema, db, redis, admin, .. }) = Cluster::seeded("multinode") else { return };

    let nodes: Vec<Node> = (0..3).map(|_| start(&db, &redis)).collect();
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);

    // Revocations: 100 keys, each cached on B and C, revoked on A; B and C must answer REVOKED within 1 s.
    let mut latencies = Vec::new();
    for i in 0..100 {
        let (status, created) = http(&a.address, "POST", "/v1/keys", &admin, Some(json!({"name": format!("r{i}")})));
        assert_eq!(status, 201, "{created}");
        let key = created["key"].as_str().unwrap().to_owned();
        let id = created["api_key"]["id"].as_str().unwrap().to_owned();
        assert_eq!(verify(b, &admin, &key), "VALID");
        assert_eq!(verify(c, &admin, &key), "VALID");
        let (status, _) = http(&a.address, "DELETE", &format!("/v1/keys/{id}"), &admin, None);
        assert_eq!(status, 204);
        let revoked_at = Instant::now();
        for node in [b, c] {
            loop {
                if verify(node, &admin, &key) == "REVOKED" {
                    break;
                }
                assert!(
                    revoked_at.elapsed() < Duration::from_secs(1),
                    "a node still answers VALID 1 s after revocation"
                );
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        latencies.push(revoked_at.elapsed());
    }
    latencies.sort();
    println!(
        "revocation reached both other nodes: p50 {:?}, max {:?} over {} revocations",
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1],
        latencies.len()
    );

    // A 100/minute limit, hammered on all three nodes at once, admits exactly 100.
    let (status, org) = http(
        &a.address,
        "POST",
        "/v1/organizations",
        &admin,
        Some(json!({"name": "limited", "slug": "limited", "plan": "pro", "rate_limit_per_minute": 100})),
    );
    assert_eq!(status, 201, "{org}");
    let (status, created) =
        http(&a.address, "POST", "/v1/keys", &admin, Some(json!({"name": "hammered", "organization_id": org["id"]})));
    assert_eq!(status, 201, "{created}");
    let key = created["key"].as_str().unwrap().to_owned();
    let addresses: Vec<String> = nodes.iter().map(|n| n.address.clone()).collect();
    let workers: Vec<_> = (0..30)
        .map(|w| {
            let (address, admin, key) = (addresses[w % 3].clone(), admin.clone(), key.clone());
            std::thread::spawn(move || {
                (0..6)
                    .map(|_| {
                        let (status, body) = http(&address, "POST", "/v1/verify", &admin, Some(json!({"key": key})));
                        assert_eq!(status, 200, "{body}");
                        body["code"].as_str().unwrap().to_owned()
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let codes: Vec<String> = workers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    let valid = codes.iter().filter(|c| *c == "VALID").count();
    let limited = codes.iter().filter(|c| *c == "RATE_LIMITED").count();
    assert_eq!((valid, limited), (100, 80), "180 concurrent verifications over three nodes");
    drop(nodes);
}

/// Verifications spread over three nodes, each folding its own flushes and all of them folding the
/// pending rows side by side; then every figure the product shows agrees exactly with the
/// verifications made: the usage endpoint, `keyward usage`, the billing summary, the keys' counters
/// and the monthly quota counter.
#[test]
fn three_nodes_count_every_verification_once() {
    let Some(Cluster { runtime, schema: _schema, db, redis, admin }) = Cluster::seeded("multinode_usage") else {
        return;
    };

    // Flushes and folds many times a second, so that the nodes' batches and folds interleave.
    let fast = [("KEYWARD_USAGE_FLUSH_INTERVAL_MS", "20"), ("KEYWARD_USAGE__FOLD_INTERVAL_MS", "50")];
    let nodes: Vec<Node> = (0..3).map(|_| start_with(&db, &redis, &fast)).collect();
    let a = &nodes[0];
    let (status, org) = http(
        &a.address,
        "POST",
        "/v1/organizations",
        &admin,
        Some(json!({"name": "metered", "slug": "metered", "plan": "enterprise", "monthly_request_limit": 1_000_000})),
    );
    assert_eq!(status, 201, "{org}");
    let org_id = org["id"].as_str().unwrap().to_owned();
    let mut keys = Vec::new();
    for i in 0..3 {
        let (status, created) = http(
            &a.address,
            "POST",
            "/v1/keys",
            &admin,
            Some(json!({"name": format!("m{i}"), "organization_id": org_id, "scopes": ["read:things"]})),
        );
        assert_eq!(status, 201, "{created}");
        keys.push((created["key"].as_str().unwrap().to_owned(), created["api_key"]["id"].as_str().unwrap().to_owned()));
    }
    // Nine workers, three a node, 60 verifications each over the three keys; every tenth asks for a
    // scope the key lacks (refused, counted as denied, not against the quota).
    let addresses: Vec<String> = nodes.iter().map(|n| n.address.clone()).collect();
    let workers: Vec<_> = (0..9)
        .map(|w| {
            let (address, admin, keys) = (addresses[w % 3].clone(), admin.clone(), keys.clone());
            std::thread::spawn(move || {
                let mut seen = vec![(0i64, 0i64); keys.len()];
                for i in 0..60 {
                    let k = (w + i) % keys.len();
                    let refused = i % 10 == 0;
                    let scopes = if refused { json!(["write:things"]) } else { json!(["read:things"]) };
                    let body = json!({"key": keys[k].0, "required_scopes": scopes, "endpoint": format!("/e{}", i % 2)});
                    let (status, answer) = http(&address, "POST", "/v1/verify", &admin, Some(body));
                    assert_eq!(status, 200, "{answer}");
                    let want = if refused { "INSUFFICIENT_SCOPE" } else { "VALID" };
                    assert_eq!(answer["code"], want, "{answer}");
                    if refused { seen[k].1 += 1 } else { seen[k].0 += 1 }
                }
                seen
            })
        })
        .collect();
    let mut made = vec![(0i64, 0i64); keys.len()];
    for w in workers {
        for (m, s) in made.iter_mut().zip(w.join().unwrap()) {
            m.0 += s.0;
            m.1 += s.1;
        }
    }
    let (valid, denied): (i64, i64) = made.iter().fold((0, 0), |t, m| (t.0 + m.0, t.1 + m.1));
    assert_eq!((valid, denied), (486, 54));
    // A graceful stop writes and folds everything each node holds (the drop waits for the exits).
    drop(nodes);

    let reader = start(&db, &redis);
    for ((_, id), (valid, denied)) in keys.iter().zip(&made) {
        let (status, usage) = http(&reader.address, "GET", &format!("/v1/keys/{id}/usage?days=1"), &admin, None);
        assert_eq!(status, 200, "{usage}");
        assert_eq!(
            (usage["totals"]["requests"].as_i64(), usage["totals"]["denied"].as_i64()),
            (Some(valid + denied), Some(*denied)),
            "{usage}"
        );
        let by_endpoint: i64 =
            usage["top_endpoints"].as_array().unwrap().iter().map(|e| e["requests"].as_i64().unwrap()).sum();
        assert_eq!(by_endpoint, valid + denied, "{usage}");
        let (status, key) = http(&reader.address, "GET", &format!("/v1/keys/{id}"), &admin, None);
        assert_eq!(status, 200, "{key}");
        assert_eq!(key["total_requests"].as_i64(), Some(*valid), "total_requests counts the VALID ones: {key}");
        let cli = keyward(&db, &redis).args(["usage", id, "--days", "1", "--json"]).output().unwrap();
        assert!(cli.status.success(), "{}", String::from_utf8_lossy(&cli.stderr));
        let cli: Value = serde_json::from_slice(&cli.stdout).unwrap();
        assert_eq!(cli["totals"], usage["totals"], "`keyward usage` shows what the API shows");
    }
    let (status, bill) = http(&reader.address, "GET", &format!("/v1/organizations/{org_id}/usage"), &admin, None);
    assert_eq!(status, 200, "{bill}");
    assert_eq!(
        (bill["totals"]["requests"].as_i64(), bill["totals"]["denied"].as_i64()),
        (Some(valid + denied), Some(denied)),
        "{bill}"
    );
    assert_eq!(bill["keys"].as_array().map(Vec::len), Some(3), "{bill}");
    let store = runtime.block_on(keyward_store::open(&db, false)).unwrap();
    let month = chrono::Utc::now().format("%Y-%m").to_string();
    let quota = runtime.block_on(store.quota_used(&format!("quota:org:{org_id}"), &month)).unwrap();
    assert_eq!(quota, valid, "the monthly quota counter holds every VALID verification once");
    drop(reader);
}
