//! Three `keyward serve` processes on loopback sharing one PostgreSQL and one Redis: a revocation on
//! one node reaches the others within a second, and a 100/minute limit admits exactly 100 across all
//! three under concurrent load. Real processes, real sockets, every wait bounded.
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
    let mut child = keyward(database_url, redis_url)
        .args(["serve", "--listen", "127.0.0.1:0"])
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

#[test]
fn three_nodes_share_revocations_and_limits() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let Some(schema) = runtime.block_on(PgSchema::create("multinode")) else { return };
    let Some(redis) = redis_url() else { return };
    let db = schema.url().to_owned();

    let seeded = keyward(&db, &redis).args(["seed", "--json"]).output().unwrap();
    assert!(seeded.status.success(), "{}", String::from_utf8_lossy(&seeded.stderr));
    let seeded: Value = serde_json::from_slice(&seeded.stdout).unwrap();
    let admin = seeded["key"].as_str().unwrap().to_owned();

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
