//! The `keyward` binary, run as a user would, on a fresh SQLite file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use serde_json::Value;

mod common;
use common::Cli;

/// `keyward serve` on 127.0.0.1:0 over the test's database with `env` set (JSON logs): the child, the
/// admin key it printed once on stdout, the address from its listening line, its stderr and the log
/// lines read so far.
fn serve(
    cli: &Cli,
    env: &[(&str, &str)],
) -> (std::process::Child, String, String, std::io::BufReader<std::process::ChildStderr>, String) {
    serve_with(cli, &[], env)
}

/// [`serve`] with more arguments after `serve --listen 127.0.0.1:0`.
fn serve_with(
    cli: &Cli,
    args: &[&str],
    env: &[(&str, &str)],
) -> (std::process::Child, String, String, std::io::BufReader<std::process::ChildStderr>, String) {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    let mut child = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .env("KEYWARD_DATABASE_URL", &cli.url)
        .env("KEYWARD_LOG_FORMAT", "json")
        .envs(env.iter().copied())
        .current_dir(cli.dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    // The logs first: at `debug` the migrations alone log more than a pipe holds, and a server
    // blocked on a full stderr never gets to print the key. Its stdout is a few lines.
    let mut logs = String::new();
    let address = listening_address(&mut stderr, &mut logs, "keyward is listening");
    let mut printed = String::new();
    while !printed.contains("not be shown again") {
        assert!(stdout.read_line(&mut printed).unwrap() > 0, "serve exited early: {printed}");
    }
    let key = printed.lines().find_map(|l| l.strip_prefix("Admin key: ")).unwrap().trim().to_owned();
    (child, key, address, stderr, logs)
}

/// The address of the log line saying `message`, reading `stderr` (into `logs`) up to it.
fn listening_address(stderr: &mut impl std::io::BufRead, logs: &mut String, message: &str) -> String {
    loop {
        let mut line = String::new();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "no line `{message}`: {logs}");
        logs.push_str(&line);
        if line.contains(message) {
            let v: Value = serde_json::from_str(&line).unwrap();
            return v["fields"]["address"].as_str().unwrap().to_owned();
        }
    }
}

/// SIGTERM, then wait (bounded) for the process to end.
fn terminate(child: &mut std::process::Child, within: std::time::Duration) -> std::process::ExitStatus {
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(started.elapsed() < within, "serve did not stop on SIGTERM");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn seed_is_idempotent() {
    let cli = Cli::new();
    let first = cli.json(&["seed", "--json"]);
    assert_eq!(first["seeded"], true);
    assert!(first["key"].as_str().unwrap().starts_with("sk_live_"));
    assert_eq!(first["api_key"]["scopes"], serde_json::json!(["keyward:admin"]));
    assert_eq!(cli.json(&["seed", "--json"]), serde_json::json!({"seeded": false}));
    assert!(cli.ok(&["seed"]).contains("nothing changed"));
}

#[test]
fn keys_lifecycle_from_the_cli() {
    let cli = Cli::new();
    cli.ok(&["orgs", "create", "--name", "Acme", "--slug", "acme", "--plan", "pro"]);
    let created = cli.json(&[
        "keys",
        "create",
        "--org",
        "acme",
        "--name",
        "backend",
        "--user-id",
        "u1",
        "--environment",
        "test",
        "--scopes",
        "read:x,write:*",
        "--allowed-ips",
        "10.0.0.0/8",
        "--expires-in-days",
        "30",
        "--tier",
        "free",
        "--email",
        "a@acme.test",
        "--company",
        "Acme",
        "--metadata",
        "{\"team\":\"core\"}",
        "--json",
    ]);
    let key = created["key"].as_str().unwrap();
    assert!(key.starts_with("sk_test_"));
    let rec = &created["api_key"];
    assert_eq!(rec["owner_id"], "u1");
    assert_eq!(rec["plan"], "free");
    assert_eq!(rec["scopes"], serde_json::json!(["read:x", "write:*"]));
    assert_eq!(rec["metadata"], serde_json::json!({"team": "core", "email": "a@acme.test", "company": "Acme"}));
    let id = rec["id"].as_str().unwrap();

    let only = cli.ok(&["keys", "create", "--org", "acme", "--name", "second", "--key-only"]);
    assert_eq!(only.trim().len(), key.len());

    let list = cli.json(&["keys", "list", "--org", "acme", "--owner-id", "u1", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    let table = cli.ok(&["keys", "list"]);
    assert!(table.contains("backend") && !table.contains(key), "tables show prefix and hint only");

    let updated = cli.json(&["keys", "update", id, "--deactivate", "--json"]);
    assert_eq!(updated["status"], "disabled");
    let revoked = cli.json(&["keys", "revoke", id, "--json"]);
    assert_eq!(revoked["status"], "revoked");
    assert_eq!(cli.json(&["keys", "list", "--org", "acme", "--json"]).as_array().unwrap().len(), 1);
    assert_eq!(cli.json(&["keys", "list", "--include-inactive", "--json"]).as_array().unwrap().len(), 2);

    let audit = cli.json(&["audit", "list", "--key-id", id, "--json"]);
    let actions: Vec<_> = audit.as_array().unwrap().iter().map(|r| r["action"].as_str().unwrap()).collect();
    assert_eq!(actions, vec!["revoke", "deactivate", "create"]);
    assert!(audit.as_array().unwrap().iter().all(|r| r["actor"] == "cli"));
    assert!(!serde_json::to_string(&audit).unwrap().contains(key));
}

#[test]
fn bad_input_fails_clearly_and_writes_nothing() {
    let cli = Cli::new();
    cli.ok(&["seed"]);
    for args in [
        &["keys", "create", "--name", "x", "--scopes", "bad scope"][..],
        &["keys", "create", "--name", "x", "--org", "nope"],
        &["keys", "create", "--name", "x", "--metadata", "[1]"],
        &["keys", "show", "not-an-id"],
    ] {
        let out = cli.run(args);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: "), "{args:?}");
    }
    assert_eq!(cli.json(&["keys", "list", "--include-inactive", "--json"]).as_array().unwrap().len(), 1);
}

#[test]
fn migrate_down_then_up_leaves_a_working_database() {
    let cli = Cli::new();
    cli.ok(&["migrate", "up"]);
    assert!(cli.ok(&["migrate", "status"]).contains("applied"));
    cli.ok(&["migrate", "down"]);
    assert!(cli.ok(&["migrate", "status"]).contains("pending"));
    cli.ok(&["migrate", "up"]);
    assert_eq!(cli.json(&["seed", "--json"])["seeded"], true);
    assert_eq!(cli.json(&["keys", "list", "--json"]).as_array().unwrap().len(), 1);
}

#[test]
fn config_show_redacts_the_pepper() {
    let cli = Cli::new();
    let out = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args(["config", "show"])
        .env("KEYWARD_PEPPER", "p".repeat(40))
        .current_dir(cli.dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("[redacted]") && !text.contains("pppp"), "{text}");
    let short = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args(["config", "show"])
        .env("KEYWARD_PEPPER", "short")
        .current_dir(cli.dir.path())
        .output()
        .unwrap();
    assert!(!short.status.success());
}

/// `--redis-url` and `--log-format` reach `keyward config show` over their environment variables.
#[test]
fn flags_win_over_the_environment() {
    let cli = Cli::new();
    let out = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args(["config", "show", "--redis-url", "redis://:hunter2@flag.test:6379", "--log-format", "json"])
        .env("KEYWARD_REDIS_URL", "redis://env.test:6379")
        .env("KEYWARD_LOG_FORMAT", "pretty")
        .env_remove("KEYWARD_PEPPER")
        .current_dir(cli.dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("redis_url = \"redis://:[redacted]@flag.test:6379\""), "{text}");
    assert!(text.contains("log_format = \"json\""), "{text}");
}

/// `keyward serve --redis-url` builds the node on that Redis, not on `KEYWARD_REDIS_URL`'s: with the
/// flag naming a port nothing listens on, the node says at start that Redis is unreachable (and still
/// serves, its limits following the failure policy), though the environment names a working one.
#[test]
fn serve_takes_its_redis_from_the_flag() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let flag = format!("redis://127.0.0.1:{closed}");
    let env = std::env::var("KEYWARD_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let cli = Cli::new();
    let (mut child, key, address, _stderr, logs) =
        serve_with(&cli, &["--redis-url", &flag], &[("KEYWARD_REDIS_URL", env.as_str())]);
    assert!(key.starts_with("sk_live_"));
    assert!(logs.contains("Redis unreachable"), "{logs}");
    assert!(!address.is_empty());
    terminate(&mut child, std::time::Duration::from_secs(10));
}

/// `keyward serve --ext-authz-grpc-listen`: Envoy's Authorization/Check and grpc.health.v1 on their own
/// listener, judged by the file's routes, until SIGTERM stops the process cleanly.
#[test]
fn serve_answers_ext_authz_over_grpc_on_its_own_listener() {
    use envoy_types::ext_authz::v3::pb::CheckRequest;
    use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
    use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;

    let cli = Cli::new();
    std::fs::write(
        cli.dir.path().join("keyward.toml"),
        "[[gateway.routes]]\nprefix = \"/v1/projects\"\nscopes = [\"read:projects\"]\n",
    )
    .unwrap();
    let (mut child, key, _, mut stderr, mut logs) = serve_with(&cli, &["--ext-authz-grpc-listen", "127.0.0.1:0"], &[]);
    let grpc = listening_address(&mut stderr, &mut logs, "ext_authz gRPC is listening");
    let check = |path: &str| {
        let headers = [("authorization".to_owned(), format!("Bearer {key}"))].into_iter().collect();
        let http = HttpRequest { method: "GET".into(), path: path.into(), headers, ..HttpRequest::default() };
        let request = Request { http: Some(http), ..Request::default() };
        CheckRequest { attributes: Some(AttributeContext { request: Some(request), ..AttributeContext::default() }) }
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let within = std::time::Duration::from_secs(10);
    let (other, projects, health) = runtime.block_on(async {
        let channel = tonic::transport::Channel::from_shared(format!("http://{grpc}")).unwrap().timeout(within);
        let channel = tokio::time::timeout(within, channel.connect()).await.unwrap().unwrap();
        let mut client = AuthorizationClient::new(channel.clone());
        let other = client.check(check("/v1/other")).await.unwrap().into_inner();
        let projects = client.check(check("/v1//%70rojects/7")).await.unwrap().into_inner();
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let request = tonic_health::pb::HealthCheckRequest { service: String::new() };
        (other, projects, health.check(request).await.unwrap().into_inner().status)
    });
    // The admin key is a usable key, and holds no customer scope.
    assert_eq!(other.status.unwrap().code, 0);
    assert_eq!(projects.status.unwrap().code, i32::from(tonic::Code::PermissionDenied));
    assert_eq!(health, i32::from(tonic_health::pb::health_check_response::ServingStatus::Serving));
    // The client's connection closes with its runtime; shutdown then waits for no call in flight.
    drop(runtime);
    assert!(terminate(&mut child, std::time::Duration::from_secs(5)).success());
}

/// `keyward serve` without an upstream still judges `/v1/authz` by `[[gateway.routes]]` of its file.
#[test]
fn serve_judges_proxy_hooks_by_the_configured_routes_without_an_upstream() {
    let cli = Cli::new();
    std::fs::write(
        cli.dir.path().join("keyward.toml"),
        "[[gateway.routes]]\nprefix = \"/v1/projects\"\nscopes = [\"read:projects\"]\n\
         [[gateway.routes]]\nprefix = \"/public\"\npublic = true\n",
    )
    .unwrap();
    let (mut child, key, address, _stderr, _logs) = serve(&cli, &[]);
    // The admin key holds no customer scope.
    let (status, body, _) = common::http(&address, "GET", "/v1/authz/v1//%70rojects/7", &key, None);
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("insufficient_scope")), "{body}");
    assert_eq!(common::http(&address, "GET", "/v1/authz/v1/other", &key, None).0, 200);
    assert_eq!(common::http(&address, "GET", "/v1/authz/public/x", "not-a-key", None).0, 200);
    assert_eq!(common::http(&address, "GET", "/v1/authz/v1/other", "not-a-key", None).0, 401);
    terminate(&mut child, std::time::Duration::from_secs(10));
}

/// `keyward serve` on a real socket: prints the admin key once on stdout (never in the logs),
/// answers with it, and exits cleanly on SIGTERM.
#[test]
fn serve_seeds_answers_and_stops_on_sigterm() {
    use std::io::Read;
    use std::time::Duration;

    let cli = Cli::new();
    let (mut child, key, address, mut stderr, mut logs) = serve(&cli, &[("RUST_LOG", "debug")]);

    let (status, me, _) = common::http(&address, "GET", "/v1/me", &key, None);
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["organization"]["slug"], "default", "{me}");

    let status = terminate(&mut child, Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    stderr.read_to_string(&mut logs).unwrap();
    assert!(logs.contains("shutting down"), "{logs}");
    assert!(!logs.contains(&key[8..]), "the admin key is in the logs");
}

#[test]
fn rotate_and_verify_the_audit_chain_from_the_cli() {
    let cli = Cli::new();
    cli.ok(&["orgs", "create", "--name", "Acme", "--slug", "acme"]);
    let created = cli.json(&["keys", "create", "--org", "acme", "--name", "backend", "--scopes", "read:x", "--json"]);
    let id = created["api_key"]["id"].as_str().unwrap().to_owned();
    let rotated = cli.json(&["keys", "rotate", &id, "--grace", "1h", "--json"]);
    assert!(rotated["key"].as_str().unwrap().starts_with("sk_live_"));
    assert_ne!(rotated["key"], created["key"]);
    assert_eq!(rotated["api_key"]["rotated_from"], id.as_str());
    assert_eq!(rotated["api_key"]["scopes"], serde_json::json!(["read:x"]));
    assert_eq!(rotated["old_api_key"]["status"], "active", "valid for the grace period");
    assert_eq!(rotated["old_api_key"]["revoke_reason"], "rotated");
    let again = cli.run(&["keys", "rotate", &id]);
    assert!(!again.status.success(), "a rotated key is not rotated again");
    let bad = cli.run(&["keys", "rotate", rotated["api_key"]["id"].as_str().unwrap(), "--grace", "8d"]);
    assert!(!bad.status.success(), "more than 7 days of grace is refused");

    let out = cli.ok(&["audit", "verify"]);
    assert!(out.contains("Audit chain intact"), "{out}");
    let report = cli.json(&["audit", "verify", "--json"]);
    assert_eq!(report["intact"], true);

    // Edit one row behind Keyward's back: verify names it and exits 1.
    let rows = cli.json(&["audit", "list", "--json"]);
    let target = rows[1]["id"].as_i64().unwrap();
    let url = format!("sqlite://{}", cli.dir.path().join("k.db").display());
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
        use sqlx::Connection;
        let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
        sqlx::query("UPDATE audit_log SET details = '{\"forged\":true}' WHERE id = ?")
            .bind(target)
            .execute(&mut conn)
            .await
            .unwrap();
    });
    let out = cli.run(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&format!("BROKEN at row {target}: content_changed")), "{stdout}");
}

/// SIGTERM with a full buffer (a flush interval of an hour, so nothing was written before): every
/// event is in the store once the process has stopped, and `keyward usage` reports them.
#[test]
fn sigterm_writes_every_buffered_usage_event() {
    use std::io::Read;
    use std::time::Duration;

    const N: usize = 60;
    let cli = Cli::new();
    let (mut child, key, address, mut stderr, mut logs) =
        serve(&cli, &[("KEYWARD_USAGE_FLUSH_INTERVAL_MS", "3600000")]);
    let mut key_id = String::new();
    for i in 0..N {
        let body = serde_json::json!({"key": key, "endpoint": format!("/e{}", i % 3), "method": "GET"});
        let (status, json, _) = common::http(&address, "POST", "/v1/verify", &key, Some(body));
        assert_eq!((status, json["code"].as_str()), (200, Some("VALID")), "{json}");
        key_id = json["key_id"].as_str().unwrap().to_owned();
    }

    let status = terminate(&mut child, Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    stderr.read_to_string(&mut logs).unwrap();

    let report = cli.json(&["usage", &key_id, "--days", "1", "--json"]);
    assert_eq!(report["totals"]["requests"], N, "{report}\n{logs}");
    assert_eq!(report["top_endpoints"].as_array().unwrap().len(), 3);
    let table = cli.ok(&["usage", &key_id, "--days", "3"]);
    assert!(table.contains(&format!("total: {N} requests")), "{table}");
    assert!(table.contains('#'), "a chart: {table}");
    let spill = cli.dir.path().join("k.db.usage-spill.jsonl");
    assert!(std::fs::read_to_string(spill).unwrap_or_default().is_empty(), "nothing was left to spill");
    let bad = cli.run(&["usage", &key_id, "--days", "0"]);
    assert!(!bad.status.success());
    let unknown = cli.run(&["usage", "0190a8a8-0000-7000-8000-000000000000"]);
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no key with id"));
}

/// `kill -9` loses at most one flush interval: with a 100 ms interval, events reach the store on their
/// own (no shutdown), so after SIGKILL every event recorded more than an interval earlier is there.
#[test]
fn sigkill_loses_at_most_one_flush_interval() {
    use std::time::{Duration, Instant};

    const N: usize = 20;
    let cli = Cli::new();
    let (mut child, key, address, _stderr, _logs) = serve(&cli, &[("KEYWARD_USAGE_FLUSH_INTERVAL_MS", "100")]);
    let mut key_id = String::new();
    for _ in 0..N {
        let (_, json, _) = common::http(&address, "POST", "/v1/verify", &key, Some(serde_json::json!({"key": key})));
        key_id = json["key_id"].as_str().unwrap().to_owned();
    }
    // Written by the interval alone, within a few intervals (bounded wait).
    let started = Instant::now();
    loop {
        let report = cli.json(&["usage", &key_id, "--days", "1", "--json"]);
        if report["totals"]["requests"] == N {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "events never reached the store: {report}");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    let _ = child.wait();
    let report = cli.json(&["usage", &key_id, "--days", "1", "--json"]);
    assert_eq!(report["totals"]["requests"], N);
}

/// `keyward serve` in `cli`'s directory with these arguments and no config file; it must exit (within
/// the test's bound) by itself.
fn serve_fails(cli: &Cli, args: &[&str], env: &[(&str, &str)]) -> (String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_keyward"));
    command.arg("serve").args(args).current_dir(cli.dir.path()).env_remove("KEYWARD_PEPPER");
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "serve did not exit");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_busy_port_is_found_before_the_first_start_seeds_anything() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().to_string();
    let cli = Cli::new();
    let url = format!("sqlite://{}", cli.dir.path().join("k.db").display());
    for args in [vec!["--listen", port.as_str()], vec!["--upstream", "http://127.0.0.1:9", "--gateway-listen", &port]] {
        let mut all = vec!["--database-url", url.as_str()];
        all.extend(args.iter().copied());
        if !all.contains(&"--listen") {
            all.extend(["--listen", "127.0.0.1:0"]);
        }
        let (stdout, stderr) = serve_fails(&cli, &all, &[]);
        assert!(stderr.contains("cannot listen on"), "{stderr}");
        assert!(!stdout.contains("Admin key"), "a key was printed and lost: {stdout}");
        assert!(!cli.dir.path().join("k.db").exists(), "the database was created before the listener");
    }
    // Once the port is free, the first start still seeds and prints its key.
    drop(busy);
    let (mut child, key, ..) = serve(&cli, &[]);
    assert!(key.starts_with("sk_live_"));
    terminate(&mut child, std::time::Duration::from_secs(10));
}

#[test]
fn an_unreachable_database_is_named_without_its_password_and_says_why() {
    // A port nothing listens on: bound, then closed.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cli = Cli::new();
    for url in [
        format!("postgres://keyward:hunter2-secret@127.0.0.1:{closed}/keyward"),
        format!("postgresql://keyward:hunter2-secret@127.0.0.1:{closed}/keyward?sslmode=disable"),
    ] {
        for how in [["--database-url", url.as_str()], ["--listen", "127.0.0.1:0"]] {
            let env = [("KEYWARD_DATABASE_URL", url.as_str())];
            let (stdout, stderr) = serve_fails(&cli, &how, &env);
            let all = format!("{stdout}{stderr}");
            assert!(!all.contains("hunter2"), "the password was printed: {all}");
            assert!(all.contains("[redacted]"), "{all}");
            assert!(all.to_lowercase().contains("refused"), "says why: {all}");
            assert!(!all.contains("pool timed out"), "{all}");
        }
    }
}

#[test]
fn a_toml_syntax_error_is_one_line_with_file_line_and_column() {
    let cli = Cli::new();
    for (text, line, column) in [
        ("[protection]\nmanagement_per_minute = = 3\n", 2, 25),
        ("listen = \"127.0.0.1:0\"\n[cache\nttl_ms = 1\n", 2, 7),
        ("pepper = 'unterminated\n", 1, 23),
    ] {
        std::fs::write(cli.dir.path().join("keyward.toml"), text).unwrap();
        let out = cli.run(&["config", "show"]);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{stderr}");
        assert!(lines[0].contains(&format!("keyward.toml:{line}:{column}: invalid TOML")), "{stderr}");
    }
}

/// `usage.export`: every verification of a run is a line of a complete `.ndjson.gz` segment once the
/// process stopped (no `.part` left, no key in any line), and DuckDB, an engine that never saw
/// Keyward, counts exactly the verifications made.
#[test]
fn duckdb_counts_every_exported_verification() {
    use std::io::Read;
    use std::time::Duration;

    const N: usize = 41;
    let cli = Cli::new();
    let export = cli.dir.path().join("export");
    let (mut child, key, address, mut stderr, mut logs) =
        serve(&cli, &[("KEYWARD_USAGE__EXPORT", export.to_str().unwrap())]);
    for i in 0..N {
        let body = serde_json::json!({"key": key, "endpoint": format!("/e{}", i % 4), "method": "GET"});
        let (status, json, _) = common::http(&address, "POST", "/v1/verify", &key, Some(body));
        assert_eq!((status, json["code"].as_str()), (200, Some("VALID")), "{json}");
    }
    let status = terminate(&mut child, Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    stderr.read_to_string(&mut logs).unwrap();

    let mut names: Vec<String> =
        std::fs::read_dir(&export).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert!(!names.is_empty() && names.iter().all(|n| n.ends_with(".ndjson.gz")), "{names:?}\n{logs}");
    let mut text = String::new();
    for name in &names {
        flate2::read::GzDecoder::new(std::fs::File::open(export.join(name)).unwrap())
            .read_to_string(&mut text)
            .unwrap();
    }
    assert_eq!(text.lines().count(), N, "{text}");
    // SECURITY: the key, and any run of its body, is in no line.
    let body = key.rsplit('_').next().unwrap();
    assert!(!text.contains(&key) && !text.contains(&body[..12.min(body.len())]), "{text}");

    let Some(python) = common::tool("the DuckDB export test", "python", "") else { return };
    let query = "import duckdb, sys\n\
        print(duckdb.sql(\"SELECT count(*), count(DISTINCT event_id) FROM read_json_auto('\" + sys.argv[1] + \"/*.ndjson.gz') WHERE kind = 'verify' AND outcome = 'VALID'\").fetchall()[0])";
    let out = Command::new(python).args(["-c", query, export.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("({N}, {N})"));
}
