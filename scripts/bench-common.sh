# Sourced by the load benchmarks (bench-verify.sh, bench-authz.sh, bench-gateway.sh): a release build of
# the server and the bench helpers, a scratch directory $WORK, the servers started (their pids in PIDS)
# stopped on exit, waits for a port to open, and one wrk run printed as a table row.
# Not a script of its own: `source "$(dirname "$0")/bench-common.sh"`.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
command -v wrk >/dev/null || { echo "wrk is needed: apt-get install wrk" >&2; exit 1; }
cargo build --release -q -p keyward -p keyward-bench
BIN="${CARGO_TARGET_DIR:-target}/release"
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

wait_http() { for _ in $(seq 1 600); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.01; done; echo "$1 not up" >&2; exit 1; }
wait_port() { for _ in $(seq 1 100); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 did not open" >&2; exit 1; }

ms() { # wrk's latency (850.00us, 1.31ms, 2.01s) in milliseconds
    awk '{ v = $1 + 0; if ($1 ~ /us$/) v /= 1000; else if ($1 ~ /[0-9]s$/ && $1 !~ /ms$/) v *= 1000; print v }' <<<"$1"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

declare -A RPS P50 P99 P99_MS REQUESTS CPU CLIENT
# One wrk run of $DURATION seconds at 64 connections; keeps under `tag` the requests/s, p50 and p99 as
# wrk prints them, p99 in ms (P99_MS) and the number of requests.
# Usage: wrk_run tag [wrk arguments: -s script, -H header, ...] url
wrk_run() {
    local tag=$1 out
    shift
    out=$(wrk -t2 -c64 -d"${DURATION}s" --latency "$@")
    RPS[$tag]=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    P50[$tag]=$(awk '$1=="50%" {print $2}' <<<"$out")
    P99[$tag]=$(awk '$1=="99%" {print $2}' <<<"$out")
    P99_MS[$tag]=$(ms "${P99[$tag]}")
    REQUESTS[$tag]=$(awk '/requests in/ {print $1}' <<<"$out")
    if grep -q "Non-2xx" <<<"$out"; then echo "!! $tag: non-2xx responses" >&2; grep "Non-2xx" <<<"$out" >&2; fi
}
# A table row of what `tag` measured: name, requests/s, p50, p99, and CPU per request when measured
# (the server's, then the load client's).
row() { # name tag
    printf '| %-36s | %12s | %9s | %9s |' "$1" "${RPS[$2]}" "${P50[$2]}" "${P99[$2]}"
    if [ -n "${CPU[$2]:-}" ]; then printf ' %12s |' "${CPU[$2]}"; fi
    if [ -n "${CLIENT[$2]:-}" ]; then printf ' %12s |' "${CLIENT[$2]}"; fi
    echo
}

# CPU time (user + system) process $1 has used so far, in microseconds.
cpu_us() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.0f", ($14 + $15) * 1e6 / hz }' "/proc/$1/stat"; }
# CPU time (user + system) of this script's finished children (a wrk or bench-ext-authz run, and the
# few text tools that read its output), in microseconds.
children_cpu_us() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.0f", ($16 + $17) * 1e6 / hz }' "/proc/$$/stat"; }

# Waits until the usage writer at http://$1 has written every event recorded so far.
usage_drained() {
    sleep 2
    for _ in $(seq 1 600); do
        curl -s "http://$1/metrics" | grep -q '^keyward_usage_buffer_events 0$' && return 0; sleep 0.2
    done
    echo "usage buffer did not drain" >&2
}
