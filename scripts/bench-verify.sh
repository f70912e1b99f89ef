#!/usr/bin/env bash
# POST /v1/verify over HTTP against the ceiling (a minimal axum server that only SHA-256-hashes the key
# and looks it up in a map), side by side in one run, with 1,000 and with 1,000,000 keys in the store;
# resident memory per cached key; cold start with the store full. Needs wrk (apt-get install wrk).
# Usage: scripts/bench-verify.sh [keys, default 1000000] [seconds per run, default 10]
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-1000000}"
DURATION="${2:-10}"
command -v wrk >/dev/null || { echo "wrk is needed: apt-get install wrk" >&2; exit 1; }
cargo build --release -q -p keyward -p keyward-bench
BIN="${CARGO_TARGET_DIR:-target}/release"
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
wait_http() { for _ in $(seq 1 600); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.01; done; echo "$1 not up" >&2; exit 1; }
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

export KEYWARD_DATABASE_URL="sqlite://$WORK/bench.db"
export KEYWARD_PLANS__BENCH__PER_DAY=1000000000000   # limits on, never reached
# Each cached key is read again from the store once per TTL (30 s by default, the safety net for changes
# made around Keyward; invalidations arrive through Redis or this node's own API). Warming a million keys
# takes longer than 30 s here, so the run keeps them for 10 minutes, as a node with many keys would.
export KEYWARD_CACHE__TTL_MS=600000
# The server runs with its default log level (info: one request span each, no line per request).
echo "generating and importing $N keys..."
"$BIN/bench-keys" "$N" > "$WORK/keys.txt"
# Keys as customers hold them: a name, an owner and two scopes each (every key its own owner).
awk '{printf "{\"key\":\"%s\",\"name\":\"k%d\",\"owner_id\":\"customer-%d\",\"scopes\":[\"read:projects\",\"write:projects\"]}\n", $0, NR, NR}' \
    "$WORK/keys.txt" > "$WORK/keys.jsonl"
"$BIN/keyward" seed >/dev/null
"$BIN/keyward" orgs create --name bench --slug bench --plan bench >/dev/null
IMPORT_START=$(date +%s.%N)
"$BIN/keyward" import "$WORK/keys.jsonl" --org bench >/dev/null
echo "import of $N keys: $(echo "$(date +%s.%N) - $IMPORT_START" | bc) s"
export SERVICE_KEY=$("$BIN/keyward" keys create --org bench --name service --scopes keyward:verify --key-only)
export KEYS_FILE="$WORK/keys.txt"

START=$(date +%s.%N)
"$BIN/keyward" serve --listen 127.0.0.1:18090 >/dev/null 2>"$WORK/serve.err" & PIDS+=($!); KW=$!
wait_http http://127.0.0.1:18090/readyz
echo "cold start with $N keys: $(echo "$(date +%s.%N) - $START" | bc) s to /readyz"
"$BIN/bench-ceiling" 127.0.0.1:19100 "$WORK/keys.txt" >/dev/null & PIDS+=($!); CEIL=$!
for _ in $(seq 1 3000); do curl -s -o /dev/null -X POST http://127.0.0.1:19100/v1/verify -H 'Content-Type: application/json' -d '{"key":"x"}' && break; sleep 0.01; done

# Resident memory per cached key: verify the first half of the keys once (bench-warm, 64 connections),
# then the second half, and take the RSS growth over the second half, each time once the usage writer has
# written what the verifications caused. The first half fills what does not grow with the number of keys
# (the store's page caches, the allocator's pools, the usage buffers); the second half is what each
# further key costs: its cache entry and its rate-limit state.
KEYS_USED=1000 wrk -t2 -c64 -d1s -s scripts/verify.lua http://127.0.0.1:18090 >/dev/null  # page in the code paths
usage_drained() {
    sleep 2
    for _ in $(seq 1 600); do
        curl -s http://127.0.0.1:18090/metrics | grep -q '^keyward_usage_buffer_events 0$' && return 0; sleep 0.2
    done
    echo "usage buffer did not drain" >&2
}
HALF=$(( N / 2 ))
head -n "$HALF" "$WORK/keys.txt" > "$WORK/first.txt"
tail -n +"$(( HALF + 1 ))" "$WORK/keys.txt" > "$WORK/second.txt"
"$BIN/bench-warm" 127.0.0.1:18090 "$WORK/first.txt" "$SERVICE_KEY" 64
usage_drained
BEFORE=$(rss_kb $KW)
"$BIN/bench-warm" 127.0.0.1:18090 "$WORK/second.txt" "$SERVICE_KEY" 64
usage_drained
AFTER=$(rss_kb $KW)
echo "resident memory per cached key: $(( (AFTER - BEFORE) * 1024 / (N - HALF) )) bytes (keys $HALF to $N: RSS ${BEFORE} kB -> ${AFTER} kB)"

ms() { # wrk's latency (e.g. 850.00us, 1.31ms, 2.01s) in milliseconds
    awk '{ v = $1 + 0; if ($1 ~ /us$/) v /= 1000; else if ($1 ~ /[0-9]s$/ && $1 !~ /ms$/) v *= 1000; print v }' <<<"$1"
}
declare -A RPS P99
run() { # name url keys_used tag
    local out rps p50 p99
    out=$(KEYS_USED=$3 wrk -t2 -c64 -d"${DURATION}s" --latency -s scripts/verify.lua "$2")
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out"); p50=$(awk '$1=="50%" {print $2}' <<<"$out"); p99=$(awk '$1=="99%" {print $2}' <<<"$out")
    printf '| %-32s | %12s | %9s | %9s |\n' "$1" "$rps" "$p50" "$p99"
    RPS[$4]=$rps; P99[$4]=$(ms "$p99")
    grep -q "Non-2xx" <<<"$out" && { echo "!! $1: non-2xx responses" >&2; grep "Non-2xx" <<<"$out" >&2; } || true
}
echo "| run                              | requests/s   | p50       | p99       |"
echo "|----------------------------------|--------------|-----------|-----------|"
run "ceiling, 1,000 keys" http://127.0.0.1:19100 1000 ceil_1k
run "keyward, 1,000 keys" http://127.0.0.1:18090 1000 kw_1k
run "ceiling, $N keys" http://127.0.0.1:19100 0 ceil_n
run "keyward, $N keys (warm)" http://127.0.0.1:18090 0 kw_n
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
echo "keyward / ceiling, 1,000 keys: $(ratio "${RPS[kw_1k]}" "${RPS[ceil_1k]}") x requests/s (target >= 0.8), p99 $(ratio "${P99[kw_1k]}" "${P99[ceil_1k]}") x the ceiling's (target <= 1.25)"
echo "keyward, $N keys / 1,000 keys: $(ratio "${RPS[kw_n]}" "${RPS[kw_1k]}") x requests/s (target >= 0.9)"
