#!/usr/bin/env bash
# How much the store grows per verification: N verifications (POST /v1/verify, 64 connections, through
# bench-warm) cycling over K keys against the release binary, with usage.raw_events at the default
# (`denied`) and at `all` (a raw row per verification, as every verification was written before raw
# events became a choice), on SQLite and on PostgreSQL. Prints, per run: bytes the usage tables grew
# (SQLite: database file plus WAL after a checkpoint; PostgreSQL: pg_total_relation_size of the usage
# tables after a VACUUM of them), per verification, rows stored in the usage tables (of them, batch
# ids), for SQLite the free pages in the file (space the next writes reuse: the pending rows' high-water
# mark), verifications per second, and CPU seconds: of the keyward process (SQLite's work included, as
# it runs inside it) and, on PostgreSQL, of the server's processes (every postgres process, read once
# the usage buffer is drained, before keyward stops and its connections' processes exit; the final
# fold of the graceful stop is not in it). It checks that usage_daily counts every verification.
# Usage: scripts/bench-growth.sh [verifications, default 200000] [keys, default 1000]
# PostgreSQL: KEYWARD_BENCH_POSTGRES_URL (default postgres://postgres@127.0.0.1:5432/test), schema
# bench_growth, dropped and made again for each run.
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-200000}"
K="${2:-1000}"
PG="${KEYWARD_BENCH_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}"
SCHEMA=bench_growth
export PGOPTIONS="-c client_min_messages=warning"
TABLES="usage_events usage_daily usage_daily_endpoints usage_pending usage_batches quota_usage"
cargo build --release -q -p keyward -p keyward-bench
BIN="${CARGO_TARGET_DIR:-target}/release"
WORK=$(mktemp -d)
KW=""
cleanup() { [ -n "$KW" ] && kill "$KW" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
PORT=18190

"$BIN/bench-keys" "$K" > "$WORK/keys.txt"
awk '{printf "{\"key\":\"%s\",\"name\":\"k%d\"}\n", $0, NR}' "$WORK/keys.txt" > "$WORK/keys.jsonl"
awk -v n="$N" '{k[NR] = $0} END {for (i = 0; i < n; i++) print k[i % NR + 1]}' "$WORK/keys.txt" > "$WORK/verify.txt"
export KEYWARD_PLANS__BENCH__PER_MINUTE=1000000000000 KEYWARD_PLANS__BENCH__PER_HOUR=1000000000000
export KEYWARD_PLANS__BENCH__PER_DAY=1000000000000 KEYWARD_PLANS__BENCH__PER_MONTH=1000000000000

cpu_s() { # CPU seconds (user + system) of the given processes
    local pid total=0
    for pid in "$@"; do
        [ -r "/proc/$pid/stat" ] || continue
        total=$(( total + $(awk '{ print $14 + $15 }' "/proc/$pid/stat" 2>/dev/null || echo 0) ))
    done
    echo "scale=2; $total / $(getconf CLK_TCK)" | bc
}
postgres_cpu_s() {
    local procs
    procs=$(pgrep -x postgres || true)
    # shellcheck disable=SC2086
    cpu_s $procs
}
drained() { # until the usage buffer is empty (at most 30 s)
    for _ in $(seq 1 300); do
        curl -s "http://127.0.0.1:$PORT/metrics" | grep -q '^keyward_usage_buffer_events 0$' && return 0
        sleep 0.1
    done
}
sql() { # backend query
    if [ "$1" = sqlite ]; then sqlite3 "$WORK/bench.db" "$2"; else psql -qAt "$PG" -c "SET search_path = $SCHEMA" -c "$2"; fi
}
rows() {
    local q=""
    for t in $TABLES; do q="$q + (SELECT count(*) FROM $t)"; done
    sql "$1" "SELECT 0 $q"
}
bytes() {
    if [ "$1" = sqlite ]; then
        sqlite3 "$WORK/bench.db" 'PRAGMA wal_checkpoint(TRUNCATE)' >/dev/null
        cat "$WORK"/bench.db* | wc -c
    else
        local list="" t
        for t in $TABLES; do list="$list${list:+, }$SCHEMA.$t"; done
        psql -qAt "$PG" -c "VACUUM $list" >/dev/null
        psql -qAt "$PG" -c "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c
            JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = '$SCHEMA' AND c.relkind = 'r' AND c.relname IN ('${TABLES// /\',\'}')"
    fi
}

printf '| %-8s | %-10s | %9s | %12s | %14s | %11s | %11s | %17s | %14s | %12s | %12s |\n' store raw_events verifications \
    "bytes grown" "per verification" "rows stored" "batch ids" "free pages, bytes" "verifications/s" \
    "keyward CPU s" "postgres CPU s"
for backend in sqlite postgres; do
    for raw in denied all; do
        if [ "$backend" = sqlite ]; then
            rm -f "$WORK"/bench.db*
            export KEYWARD_DATABASE_URL="sqlite://$WORK/bench.db"
        else
            psql -qAt "$PG" -c "DROP SCHEMA IF EXISTS $SCHEMA CASCADE" -c "CREATE SCHEMA $SCHEMA" >/dev/null
            export KEYWARD_DATABASE_URL="$PG?options[search_path]=$SCHEMA"
        fi
        export KEYWARD_USAGE__RAW_EVENTS=$raw
        "$BIN/keyward" seed >/dev/null
        "$BIN/keyward" orgs create --name bench --slug bench --plan bench >/dev/null
        "$BIN/keyward" import "$WORK/keys.jsonl" --org bench >/dev/null
        SERVICE_KEY=$("$BIN/keyward" keys create --org bench --name service --scopes keyward:verify --key-only)
        BYTES0=$(bytes "$backend"); ROWS0=$(rows "$backend")
        "$BIN/keyward" serve --listen "127.0.0.1:$PORT" >/dev/null 2>"$WORK/serve.err" & KW=$!
        for _ in $(seq 1 600); do curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break; sleep 0.05; done
        PG0=$(postgres_cpu_s)
        START=$(date +%s.%N)
        "$BIN/bench-warm" "127.0.0.1:$PORT" "$WORK/verify.txt" "$SERVICE_KEY" 64 >/dev/null
        SECONDS_TAKEN=$(echo "$(date +%s.%N) - $START" | bc)
        sleep 1.5; drained
        KW_CPU=$(cpu_s "$KW"); PG_CPU=-
        [ "$backend" = postgres ] && PG_CPU=$(echo "$(postgres_cpu_s) - $PG0" | bc)
        # A graceful stop writes and folds everything buffered.
        kill -TERM "$KW"; wait "$KW" || true; KW=""
        BYTES1=$(bytes "$backend"); ROWS1=$(rows "$backend")
        FREE=-
        [ "$backend" = sqlite ] && FREE=$(sqlite3 "$WORK/bench.db" 'SELECT freelist_count * page_size FROM pragma_freelist_count, pragma_page_size')
        BATCHES=$(sql "$backend" "SELECT count(*) FROM usage_batches")
        COUNTED=$(sql "$backend" "SELECT COALESCE(SUM(requests), 0) FROM usage_daily")
        [ "$COUNTED" = "$N" ] || { echo "usage_daily counts $COUNTED verifications, not $N" >&2; exit 1; }
        GROWN=$(( BYTES1 - BYTES0 ))
        printf '| %-8s | %-10s | %9d | %12d | %14.2f | %11d | %11d | %17s | %14.0f | %12s | %12s |\n' "$backend" "$raw" "$N" "$GROWN" \
            "$(echo "$GROWN / $N" | bc -l)" "$(( ROWS1 - ROWS0 ))" "$BATCHES" "$FREE" "$(echo "$N / $SECONDS_TAKEN" | bc -l)" \
            "$KW_CPU" "$PG_CPU"
    done
done
