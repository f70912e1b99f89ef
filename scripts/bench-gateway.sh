#!/usr/bin/env bash
# Gateway overhead, measured side by side in one run: the upstream direct vs through `keyward serve
# --upstream`, 64 connections, small JSON response. Needs wrk (apt-get install wrk).
# Usage: scripts/bench-gateway.sh [seconds per run, default 10]
set -euo pipefail
DURATION="${1:-10}"
source "$(dirname "$0")/bench-common.sh"

"$BIN/bench-upstream" 127.0.0.1:19000 >/dev/null & PIDS+=($!)
export KEYWARD_DATABASE_URL="sqlite://$WORK/bench.db"
# A plan with no practical limit: the benchmark measures the gateway, not the free tier's 60/minute.
export KEYWARD_PLANS__BENCH__PER_DAY=1000000000000
"$BIN/keyward" serve --listen 127.0.0.1:18080 --upstream http://127.0.0.1:19000 \
    --gateway-listen 127.0.0.1:18000 >"$WORK/serve.out" 2>"$WORK/serve.err" & PIDS+=($!)
wait_port 19000; wait_port 18000
KEY=$("$BIN/keyward" keys create --org default --name bench --scopes read:items --plan bench --key-only)

wrk -t2 -c64 -d2s http://127.0.0.1:19000/items >/dev/null  # warm-up
wrk -t2 -c64 -d2s -H "X-API-Key: $KEY" http://127.0.0.1:18000/items >/dev/null
echo "| run                                  | requests/s   | p50       | p99       |"
echo "|--------------------------------------|--------------|-----------|-----------|"
wrk_run direct http://127.0.0.1:19000/items
row "upstream direct" direct
wrk_run gateway -H "X-API-Key: $KEY" http://127.0.0.1:18000/items
row "through the gateway" gateway
