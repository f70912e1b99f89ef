#!/usr/bin/env bash
# POST /v1/verify over HTTP against the ceiling (a minimal axum server that only SHA-256-hashes the key
# and looks it up in a map), side by side in one run, with 1,000 and with 1,000,000 keys in the store;
# resident memory per cached key; cold start with the store full. Needs wrk (apt-get install wrk).
# Usage: scripts/bench-verify.sh [keys, default 1000000] [seconds per run, default 10]
set -euo pipefail
N="${1:-1000000}"
DURATION="${2:-10}"
source "$(dirname "$0")/bench-common.sh"
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
HALF=$(( N / 2 ))
head -n "$HALF" "$WORK/keys.txt" > "$WORK/first.txt"
tail -n +"$(( HALF + 1 ))" "$WORK/keys.txt" > "$WORK/second.txt"
"$BIN/bench-warm" 127.0.0.1:18090 "$WORK/first.txt" "$SERVICE_KEY" 64
usage_drained 127.0.0.1:18090
BEFORE=$(rss_kb $KW)
"$BIN/bench-warm" 127.0.0.1:18090 "$WORK/second.txt" "$SERVICE_KEY" 64
usage_drained 127.0.0.1:18090
AFTER=$(rss_kb $KW)
echo "resident memory per cached key: $(( (AFTER - BEFORE) * 1024 / (N - HALF) )) bytes (keys $HALF to $N: RSS ${BEFORE} kB -> ${AFTER} kB)"

echo "| run                                  | requests/s   | p50       | p99       |"
echo "|--------------------------------------|--------------|-----------|-----------|"
run() { # name url keys_used tag
    KEYS_USED=$3 wrk_run "$4" -s scripts/verify.lua "$2"
    row "$1" "$4"
}
run "ceiling, 1,000 keys" http://127.0.0.1:19100 1000 ceil_1k
run "keyward, 1,000 keys" http://127.0.0.1:18090 1000 kw_1k
run "ceiling, $N keys" http://127.0.0.1:19100 0 ceil_n
run "keyward, $N keys (warm)" http://127.0.0.1:18090 0 kw_n
echo "keyward / ceiling, 1,000 keys: $(ratio "${RPS[kw_1k]}" "${RPS[ceil_1k]}") x requests/s (target >= 0.8), p99 $(ratio "${P99_MS[kw_1k]}" "${P99_MS[ceil_1k]}") x the ceiling's (target <= 1.25)"
echo "keyward, $N keys / 1,000 keys: $(ratio "${RPS[kw_n]}" "${RPS[kw_1k]}") x requests/s (target >= 0.9)"
