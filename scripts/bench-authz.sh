#!/usr/bin/env bash
# Proxy hook decisions against POST /v1/verify, on one server in one run: forward-auth (GET
# /v1/authz?style=forwarded, as Caddy, Traefik and APISIX ask; wrk, 64 connections), Envoy ext_authz
# over gRPC (bench-ext-authz: 64 callers on 4 HTTP/2 connections, as Envoy multiplexes) and POST
# /v1/verify (wrk, 64 connections). Keys picked among 1,000; a route with a scope rule matched on every
# decision. Each run prints decisions/s, p50 and p99 as the client saw them, and the Keyward process's
# CPU time (user + system) per decision, its usage writer included: before and after each run the
# script waits until every usage event is written. The last column is the load client's own CPU per
# decision (wrk's or bench-ext-authz's, from /proc too): both share the cores with the server, so a
# client that costs more per decision leaves the server less of them. Release build; needs wrk
# (apt-get install wrk).
# A last gRPC run with one caller on one connection gives the latency of a check without queueing.
# Usage: scripts/bench-authz.sh [keys, default 1000] [seconds per run, default 10]
set -euo pipefail
N="${1:-1000}"
DURATION="${2:-10}"
source "$(dirname "$0")/bench-common.sh"

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

HTTP=127.0.0.1:18091 GRPC=127.0.0.1:18092
"$BIN/keyward" serve --listen "$HTTP" --ext-authz-grpc-listen "$GRPC" >/dev/null 2>"$WORK/serve.err" & PIDS+=($!); KW=$!
wait_http "http://$HTTP/readyz"; wait_port "${GRPC#*:}"

verify() { wrk_run "$1" -s scripts/verify.lua "http://$HTTP"; }
forward_auth() { wrk_run "$1" -s scripts/authz.lua "http://$HTTP"; }
grpc() { # bench-ext-authz's summary, kept like wrk_run's
    local out
    out=$("$BIN/bench-ext-authz" "$GRPC" "$KEYS_FILE" "$DURATION" "${CALLERS:-64}" "${CONNECTIONS:-4}")
    REQUESTS[$1]=$(grep -o '[0-9]* checks' <<<"$out" | cut -d' ' -f1)
    RPS[$1]=$(grep -o '= [0-9]* decisions/s' <<<"$out" | cut -d' ' -f2)
    P50[$1]=$(grep -o 'p50 [0-9]* us' <<<"$out" | awk '{printf "%.2fms", $2 / 1000}')
    P99[$1]=$(grep -o 'p99 [0-9]* us' <<<"$out" | awk '{printf "%.2fms", $2 / 1000}')
    P99_MS[$1]=$(ms "${P99[$1]}")
    if ! grep -q 'denied 0, failed 0' <<<"$out"; then echo "!! $1: $out" >&2; fi
}
# Runs `$2 $1` with the usage writer idle before and after, and keeps the CPU per decision under $1:
# the server's (CPU) and the client's (CLIENT).
measured() { # tag runner
    usage_drained "$HTTP"
    local before client
    before=$(cpu_us "$KW")
    client=$(children_cpu_us)
    "$2" "$1"
    client=$(( $(children_cpu_us) - client ))
    usage_drained "$HTTP"
    CPU[$1]=$(awk -v c="$(( $(cpu_us "$KW") - before ))" -v n="${REQUESTS[$1]}" 'BEGIN { printf "%.1f", c / n }')
    CLIENT[$1]=$(awk -v c="$client" -v n="${REQUESTS[$1]}" 'BEGIN { printf "%.1f", c / n }')
}
# Warm the cache and the code paths of all three.
DURATION=2 verify warm; DURATION=2 forward_auth warm; DURATION=2 grpc warm

printf '| %-36s | %12s | %9s | %9s | %12s | %12s |\n' "run (64 callers, $N keys)" "decisions/s" "p50" "p99" "CPU us/dec." "client us/d."
echo "|--------------------------------------|--------------|-----------|-----------|--------------|--------------|"
# Twice, in mirrored order, so that none gains from its place on a machine whose load drifts; the
# ratios use the sums.
ORDER=(verify forward_auth grpc grpc forward_auth verify)
declare -A NAMES=([verify]="POST /v1/verify" [forward_auth]="GET /v1/authz?style=forwarded" [grpc]="ext_authz gRPC Check")
declare -A SEEN
for runner in "${ORDER[@]}"; do
    tag="$runner$(( ${SEEN[$runner]:-0} + 1 ))"; SEEN[$runner]=$(( ${SEEN[$runner]:-0} + 1 ))
    measured "$tag" "$runner"
    row "${NAMES[$runner]}" "$tag"
done
# One caller on one connection: no queue behind other callers, so the latency is a check's own time
# at the process, plus the client's and the loopback's.
CALLERS=1 CONNECTIONS=1 measured alone grpc
row "ext_authz gRPC Check, 1 caller" alone
sum() { awk -v a="$1" -v b="$2" 'BEGIN { print a + b }'; }
for hook in forward_auth grpc; do
    echo "${NAMES[$hook]} / ${NAMES[verify]}:" \
        "$(ratio "$(sum "${RPS[${hook}1]}" "${RPS[${hook}2]}")" "$(sum "${RPS[verify1]}" "${RPS[verify2]}")") x decisions/s (target >= 1)," \
        "p99 $(ratio "$(sum "${P99_MS[${hook}1]}" "${P99_MS[${hook}2]}")" "$(sum "${P99_MS[verify1]}" "${P99_MS[verify2]}")") x," \
        "CPU per decision $(ratio "$(sum "${CPU[${hook}1]}" "${CPU[${hook}2]}")" "$(sum "${CPU[verify1]}" "${CPU[verify2]}")") x"
done
