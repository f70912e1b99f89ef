//! `keyward import`, run as an operator would, on SQLite and on PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use keyward_store::testing::PgSchema;
use serde_json::json;

mod common;
use common::Cli;

fn sha256_hex(s: &str) -> String {
    keyward_core::KeyHasher::default().hash_str(keyward_core::HashAlgorithm::Sha256, s).to_hex()
}

/// Dry run, import, import again, a CSV file, the audit row: the same on every backend.
fn import_flow(cli: &Cli) {
    cli.quiet(&["orgs", "create", "--name", "Acme", "--slug", "acme"]);
    let jsonl = [
        json!({"key": "old_system_key_0001_abcdef", "name": "one", "owner_id": "u1", "scopes": ["read:x"]}),
        json!({"key_sha256": sha256_hex("old_system_key_0002_abcdef"), "name": "two"}),
        json!({"key": "tiny"}),
        json!({"key": "old_system_key_0003_abcdef", "expires_at": "not a date"}),
    ]
    .iter()
    .map(|r| format!("{r}\n"))
    .collect::<String>();
    let file = cli.write("keys.jsonl", &jsonl);

    let dry = cli.quiet(&["import", &file, "--org", "acme", "--dry-run"]);
    assert!(
        dry.starts_with("Would import 2 keys into acme: 0 unchanged (already there), 2 rejected, of 4 rows."),
        "{dry}"
    );
    assert!(dry.contains("  line 3: `key` is not a Keyward key") && dry.contains("  line 4: `expires_at`"), "{dry}");
    assert!(dry.contains("Dry run: nothing was changed."));
    assert!(!dry.contains("old_system_key") && !dry.contains("tiny"), "the report repeats a key: {dry}");
    assert_eq!(cli.json(&["keys", "list", "--org", "acme", "--json"]), json!([]));

    let done = cli.json(&["import", &file, "--org", "acme", "--json"]);
    assert_eq!((done["imported"].as_u64(), done["unchanged"].as_u64()), (Some(2), Some(0)), "{done}");
    assert_eq!(done["rejected"].as_array().unwrap().len(), 2);
    let keys = cli.json(&["keys", "list", "--org", "acme", "--json"]);
    let names: Vec<&str> = keys.as_array().unwrap().iter().map(|k| k["name"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 2);
    assert!(names.contains(&"one") && names.contains(&"two"));

    let again = cli.quiet(&["import", &file, "--org", "acme"]);
    assert!(
        again.starts_with("Imported 0 keys into acme: 2 unchanged (already there), 2 rejected, of 4 rows."),
        "{again}"
    );

    let csv = cli.write("more.csv", "key,name,scopes\nold_system_key_0004_abcdef,four,\"read:a read:b\"\n");
    let out = cli.quiet(&["import", &csv, "--org", "acme"]);
    assert!(out.starts_with("Imported 1 keys into acme"), "{out}");

    let audit = cli.json(&["audit", "list", "--action", "import", "--json"]);
    let rows = audit.as_array().unwrap();
    assert_eq!(rows.len(), 2, "one row per import that changed something: {audit}");
    assert_eq!(
        rows[1]["details"],
        json!({"format": "jsonl", "rows": 4, "imported": 2, "unchanged": 0, "rejected": 2, "complete": true})
    );
    assert_eq!(rows[0]["actor"], "cli");
    assert!(!audit.to_string().contains("old_system_key"));

    // Refused whole: an unknown format, an unknown organization, a missing file.
    for args in [
        &["import", &cli.write("keys.txt", "x"), "--org", "acme"][..],
        &["import", &file, "--org", "nope"],
        &["import", "missing.csv"],
    ] {
        let out = cli.run(args);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: "), "{args:?}");
    }
}

#[test]
fn import_on_sqlite() {
    import_flow(&Cli::new());
}

#[tokio::test]
async fn import_on_postgres() {
    let Some(schema) = PgSchema::create("keyward::import_on_postgres").await else { return };
    let cli = Cli::at(schema.url());
    // `migrate` works on PostgreSQL as on SQLite.
    assert!(cli.quiet(&["migrate", "status"]).contains("pending"));
    let up = cli.quiet(&["migrate", "up"]);
    assert!(up.contains("0001 init") && up.contains("0002 import") && !up.contains("pending"), "{up}");
    import_flow(&cli);
    assert!(cli.quiet(&["migrate", "down", "--steps", "100"]).lines().all(|l| l.ends_with("pending")));
    drop(schema);
}
