#!/usr/bin/env bash
# Gateway overhead, measured side by side in one run: the upstream direct vs through `keyward serve
# --upstream`, 64 connections, small JSON response. Needs wrk (apt-get install wrk).
# Usage: scripts/bench-gateway.sh [seconds per run, default 10]
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-10}"
command -v wrk >/dev/null || { echo "wrk is needed: apt-get install wrk" >&2; exit 1; }

cargo build --release -q -p keyward -p keyward-bench
BIN="${CARGO_TARGET_DIR:-target}/release"
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

wait_port() { for _ in $(seq 1 100); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 did not open" >&2; exit 1; }

"$BIN/bench-upstream" 127.0.0.1:19000 >/dev/null & PIDS+=($!)
export KEYWARD_DATABASE_URL="sqlite://$WORK/bench.db"
# A plan with no practical limit: the benchmark measures the gateway, not the free tier's 60/minute.
export KEYWARD_PLANS__BENCH__PER_DAY=1000000000000
"$BIN/keyward" serve --listen 127.0.0.1:18080 --upstream http://127.0.0.1:19000 \
    --gateway-listen 127.0.0.1:18000 >"$WORK/serve.out" 2>"$WORK/serve.err" & PIDS+=($!)
wait_port 19000; wait_port 18000
KEY=$("$BIN/keyward" keys create --org default --name bench --scopes read:items --plan bench --key-only)

run() { # name url [header]
    local out
    if [ -n "${3:-}" ]; then out=$(wrk -t2 -c64 -d"${DURATION}s" --latency -H "$3" "$2"); else out=$(wrk -t2 -c64 -d"${DURATION}s" --latency "$2"); fi
    local rps p50 p99
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    p50=$(awk '$1=="50%" {print $2}' <<<"$out")
    p99=$(awk '$1=="99%" {print $2}' <<<"$out")
    printf '| %-22s | %12s | %9s | %9s |\n' "$1" "$rps" "$p50" "$p99"
    if grep -q "Non-2xx" <<<"$out"; then echo "!! $1 had non-2xx responses:" >&2; grep "Non-2xx" <<<"$out" >&2; fi
}

wrk -t2 -c64 -d2s http://127.0.0.1:19000/items >/dev/null  # warm-up
wrk -t2 -c64 -d2s -H "X-API-Key: $KEY" http://127.0.0.1:18000/items >/dev/null
echo "| run                    | requests/s   | p50       | p99       |"
echo "|------------------------|--------------|-----------|-----------|"
run "upstream direct" http://127.0.0.1:19000/items
run "through the gateway" http://127.0.0.1:18000/items "X-API-Key: $KEY"
