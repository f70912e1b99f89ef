#!/usr/bin/env bash
# Benchmark (not a test): `keyward import` of N keys (default 100,000) on SQLite and on PostgreSQL.
#
#   ./scripts/bench-import.sh [ROWS]
#
# Builds the release binary, generates a JSON Lines file (half plaintext legacy keys, half
# `key_sha256`, with names, owners, scopes, metadata and creation times), and times one import into a
# fresh SQLite file and one into a fresh PostgreSQL schema (KEYWARD_TEST_POSTGRES_URL, default
# postgres://postgres@127.0.0.1:5432/test): a dry run first, then the import, then the same file again
# (every row unchanged). Results go in BENCHMARKS.md by hand.
set -euo pipefail
cd "$(dirname "$0")/.."

ROWS="${1:-100000}"
PG_URL="${KEYWARD_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}"
WORK="$(mktemp -d)"
SCHEMA="kw_bench_$$"
trap 'rm -rf "$WORK"; psql "$PG_URL" -qc "DROP SCHEMA IF EXISTS $SCHEMA CASCADE" >/dev/null 2>&1 || true' EXIT

cargo build --release -p keyward >/dev/null 2>&1
BIN="$PWD/target/release/keyward"

awk -v rows="$ROWS" 'BEGIN {
    srand(42);
    for (i = 1; i <= rows; i++) {
        if (i % 2) {
            printf "{\"key\":\"legacy_%08d_%08x%08x\",", i, int(rand() * 4294967296), int(rand() * 4294967296);
        } else {
            h = "";
            for (j = 0; j < 8; j++) h = h sprintf("%08x", int(rand() * 4294967296));
            printf "{\"key_sha256\":\"%s\",", h;
        }
        printf "\"name\":\"customer %d\",\"owner_id\":\"user_%d\",\"scopes\":[\"read:projects\",\"write:projects\"],", i, i % 5000;
        printf "\"metadata\":{\"company\":\"Company %d\",\"plan\":\"legacy\"},\"created_at\":\"2021-03-04T05:06:07Z\"}\n", i % 977;
    }
}' > "$WORK/keys.jsonl"
echo "generated $ROWS rows ($(du -h "$WORK/keys.jsonl" | cut -f1)) on $(nproc) cores"

run() {
    local label=$1 url=$2
    KEYWARD_DATABASE_URL="$url" "$BIN" migrate up >/dev/null
    KEYWARD_DATABASE_URL="$url" "$BIN" orgs create --name Bench --slug bench >/dev/null
    for pass in dry-run first again; do
        local start end flags=()
        [ "$pass" = dry-run ] && flags=(--dry-run)
        start=$(date +%s.%N)
        KEYWARD_DATABASE_URL="$url" "$BIN" import "$WORK/keys.jsonl" --org bench "${flags[@]}" | head -n 1
        end=$(date +%s.%N)
        printf '%-10s %-6s %6.2f s\n' "$label" "$pass" "$(echo "$end - $start" | bc)"
    done
}

run sqlite "sqlite://$WORK/bench.db"
psql "$PG_URL" -qc "CREATE SCHEMA $SCHEMA" >/dev/null
sep='?'; [[ "$PG_URL" == *\?* ]] && sep='&'
run postgres "${PG_URL}${sep}options[search_path]=$SCHEMA"
