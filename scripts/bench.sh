#!/usr/bin/env bash
# Every performance figure of BENCHMARKS.md's verify-path sections, from one command: in-process verify
# and limiter decisions (criterion), POST /v1/verify vs the ceiling with 1,000 and N keys, memory per
# cached key, cold start, gateway overhead, and revocation across three nodes (needs PostgreSQL and
# Redis, as the test suite does). Needs wrk (apt-get install wrk).
# Usage: scripts/bench.sh [keys, default 1000000] [seconds per load run, default 10]
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-1000000}"
DURATION="${2:-10}"

echo "== in-process verify (criterion)"
cargo bench -q -p keyward-server --bench verify 2>/dev/null | grep -E "^verify/|time:" || true
# The median of the samples beside criterion's estimate: the bench verifies ~3x faster than any store
# ingests, so the usage writer runs flat out on the other core, and a mean far above the median says it
# got in the way.
for b in warm_one_key warm_1000_keys malformed; do
    f="${CARGO_TARGET_DIR:-target}/criterion/verify/$b/new/estimates.json"
    if [ -f "$f" ]; then
        echo "verify/$b median: $(grep -o '"median":{"confidence_interval":{[^}]*},"point_estimate":[0-9.e+-]*' "$f" \
            | sed 's/.*point_estimate"://' | awk '{ printf "%.0f ns", $1 }')"
    fi
done
echo "== limiter decisions (criterion)"
cargo bench -q -p keyward-limit --bench limiter 2>/dev/null | grep -E "^(memory|redis)/|time:|thrpt:" || true
echo "== POST /v1/verify vs the ceiling, memory per cached key, cold start"
scripts/bench-verify.sh "$N" "$DURATION"
echo "== gateway vs the upstream direct"
scripts/bench-gateway.sh "$DURATION"
echo "== revocation across three nodes (PostgreSQL + Redis)"
cargo test -q -p keyward --test multinode -- --nocapture 2>&1 | grep -E "revocation reached|test result"
