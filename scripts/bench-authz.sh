#!/usr/bin/env bash
# Forward-auth decisions (GET /v1/authz?style=forwarded, as Caddy, Traefik and APISIX ask) against
# POST /v1/verify, on one server in one run, 64 connections each, keys picked at random among 1,000
# (a route with a scope rule matched on every decision). Release build; needs wrk (apt-get install wrk).
# Usage: scripts/bench-authz.sh [keys, default 1000] [seconds per run, default 10]
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-1000}"
DURATION="${2:-10}"
command -v wrk >/dev/null || { echo "wrk is needed: apt-get install wrk" >&2; exit 1; }
cargo build --release -q -p keyward -p keyward-bench
BIN="${CARGO_TARGET_DIR:-target}/release"
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
wait_http() { for _ in $(seq 1 600); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.01; done; echo "$1 not up" >&2; exit 1; }

export KEYWARD_DATABASE_URL="sqlite://$WORK/bench.db"
export KEYWARD_PLANS__BENCH__PER_DAY=1000000000000   # limits on, never reached
cat >"$WORK/keyward.toml" <<'TOML'
[[gateway.routes]]
prefix = "/v1/projects"
scopes = ["read:projects"]
TOML
export KEYWARD_CONFIG="$WORK/keyward.toml"
"$BIN/bench-keys" "$N" >"$WORK/keys.txt"
awk '{printf "{\"key\":\"%s\",\"name\":\"k%d\",\"owner_id\":\"customer-%d\",\"scopes\":[\"read:projects\"]}\n", $0, NR, NR}' \
    "$WORK/keys.txt" >"$WORK/keys.jsonl"
"$BIN/keyward" seed >/dev/null
"$BIN/keyward" orgs create --name bench --slug bench --plan bench >/dev/null
"$BIN/keyward" import "$WORK/keys.jsonl" --org bench >/dev/null
export SERVICE_KEY=$("$BIN/keyward" keys create --org bench --name service --scopes keyward:verify --key-only)
export KEYS_FILE="$WORK/keys.txt" KEYS_USED="$N"

"$BIN/keyward" serve --listen 127.0.0.1:18091 >/dev/null 2>"$WORK/serve.err" & PIDS+=($!)
wait_http http://127.0.0.1:18091/readyz
# Warm the cache and the code paths of both.
wrk -t2 -c64 -d2s -s scripts/verify.lua http://127.0.0.1:18091 >/dev/null
wrk -t2 -c64 -d2s -s scripts/authz.lua http://127.0.0.1:18091 >/dev/null

declare -A RPS P99
ms() { # wrk's latency (850.00us, 1.31ms, 2.01s) in milliseconds
    awk '{ v = $1 + 0; if ($1 ~ /us$/) v /= 1000; else if ($1 ~ /[0-9]s$/ && $1 !~ /ms$/) v *= 1000; print v }' <<<"$1"
}
run() { # name script tag
    local out rps p50 p99
    out=$(wrk -t2 -c64 -d"${DURATION}s" --latency -s "scripts/$2" http://127.0.0.1:18091)
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out"); p50=$(awk '$1=="50%" {print $2}' <<<"$out"); p99=$(awk '$1=="99%" {print $2}' <<<"$out")
    printf '| %-36s | %12s | %9s | %9s |\n' "$1" "$rps" "$p50" "$p99"
    RPS[$3]=$rps; P99[$3]=$(ms "$p99")
    if grep -q "Non-2xx" <<<"$out"; then echo "!! $1: non-2xx responses" >&2; grep "Non-2xx" <<<"$out" >&2; fi
}
printf '| %-36s | %12s | %9s | %9s |\n' "run (64 connections, $N keys)" "decisions/s" "p50" "p99"
echo "|--------------------------------------|--------------|-----------|-----------|"
# Twice, in mirrored order (verify, authz, authz, verify), so neither gains from running second on a
# machine whose load drifts; the ratios use the sums.
run "POST /v1/verify" verify.lua verify1
run "GET /v1/authz?style=forwarded" authz.lua authz1
run "GET /v1/authz?style=forwarded" authz.lua authz2
run "POST /v1/verify" verify.lua verify2
ratio() { awk -v a="$1" -v b="$2" -v c="$3" -v d="$4" 'BEGIN { printf "%.2f", (a + b) / (c + d) }'; }
echo "authz / verify: $(ratio "${RPS[authz1]}" "${RPS[authz2]}" "${RPS[verify1]}" "${RPS[verify2]}") x decisions/s (target >= 1)," \
    "p99 $(ratio "${P99[authz1]}" "${P99[authz2]}" "${P99[verify1]}" "${P99[verify2]}") x"
