#!/usr/bin/env bash
# Runs Schemathesis (every check: scripts/schemathesis.toml) against a fresh Keyward started from the
# debug binary on a free loopback port, with an empty SQLite database in a temporary directory. Fails on
# any failure or error.
# Arguments are passed to `schemathesis run` (e.g. `--include-path /v1/keys --max-examples 500`).
#
# Schemathesis lives in a virtual environment outside the repository, kept between runs
# (KEYWARD_TOOLS_DIR, default ~/.cache/keyward); it is installed from the package registry when
# missing. With CI=true a failed install fails the run; elsewhere it is skipped with a loud line.
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=4.32.5
TOOLS="${KEYWARD_TOOLS_DIR:-$HOME/.cache/keyward}"
VENV="$TOOLS/venv"
ST="$VENV/bin/schemathesis"
BIN="${KEYWARD_BIN:-target/debug/keyward}"
EXAMPLES="${KEYWARD_SCHEMATHESIS_EXAMPLES:-100}"

skip_or_fail() {
    if [ "${CI:-}" = "true" ]; then
        echo "FATAL: $* and CI=true: failing the run" >&2
        exit 1
    fi
    echo "!!!!! WARNING: $*: the Schemathesis run is SKIPPED !!!!!" >&2
    exit 0
}

if [ "$("$ST" --version 2>/dev/null || true)" != "schemathesis, version $SCHEMATHESIS_VERSION" ]; then
    echo "==> installing schemathesis $SCHEMATHESIS_VERSION into $VENV"
    mkdir -p "$TOOLS"
    { [ -x "$VENV/bin/pip" ] || python3 -m venv "$VENV"; } || skip_or_fail "cannot create a Python virtual environment"
    "$VENV/bin/pip" install -q "schemathesis==$SCHEMATHESIS_VERSION" || skip_or_fail "cannot install schemathesis"
fi
# Always: a stale binary would test yesterday's contract (a no-op when it is fresh).
cargo build -q -p keyward --locked

work=$(mktemp -d)
server=
cleanup() {
    if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

# Keyward's protection of itself would answer thousands of requests from one address with 429.
cat >"$work/keyward.toml" <<'TOML'
[protection]
management_per_minute = 100000000
failed_auth_per_minute = 100000000
key_creation_per_minute = 100000000
TOML
(cd "$work" && KEYWARD_LOG_FORMAT=pretty NO_COLOR=1 RUST_LOG=warn,keyward=info exec "$OLDPWD/$BIN" serve \
    --listen 127.0.0.1:0 --database-url "sqlite://$work/keyward.db" >"$work/out.log" 2>&1) &
server=$!
address=
for _ in $(seq 1 100); do
    address=$(grep -o 'address=127\.0\.0\.1:[0-9]*' "$work/out.log" 2>/dev/null | head -n 1 | cut -d= -f2 || true)
    [ -n "$address" ] && break
    kill -0 "$server" 2>/dev/null || break
    sleep 0.1
done
if [ -z "$address" ]; then
    cat "$work/out.log" >&2
    echo "FATAL: keyward did not start" >&2
    exit 1
fi
key=$(sed -n 's/^Admin key: //p' "$work/out.log" | head -n 1)
# The seeded organization, for the hooks (scripts/schemathesis_hooks.py). The key goes by environment,
# not by argument, so that no process listing shows it.
me=$(KEY="$key" python3 -c 'import json, os, sys, urllib.request as u
r = u.Request(sys.argv[1], headers={"Authorization": "Bearer " + os.environ["KEY"]})
me = json.load(u.urlopen(r, timeout=10))
print(me["organization"]["id"], me["key"]["id"])' "http://$address/v1/me")
read -r KEYWARD_SCHEMATHESIS_ORG KEYWARD_SCHEMATHESIS_KEY_ID <<<"$me"
export KEYWARD_SCHEMATHESIS_ORG KEYWARD_SCHEMATHESIS_KEY_ID

echo "==> schemathesis $SCHEMATHESIS_VERSION against http://$address ($EXAMPLES examples per operation)"
started=$(date +%s)
# From the temporary directory: Schemathesis keeps a cache of what it found in its working directory.
repo=$PWD
(cd "$work" && SCHEMATHESIS_HOOKS=scripts.schemathesis_hooks PYTHONPATH="$repo" "$ST" \
    --config-file "$repo/scripts/schemathesis.toml" run "http://$address/openapi.json" \
    --max-examples "$EXAMPLES" --seed 20261203 --generation-database none \
    --workers 1 --request-timeout 10 --no-color \
    -H "Authorization: Bearer $key" "$@" \
    >"$work/schemathesis.log" 2>&1) && status=0 || status=$?
# SECURITY: the report never prints the key (Schemathesis filters Authorization), but be sure.
sed "s/$key/[admin key]/g" "$work/schemathesis.log" | tail -n 200
echo "==> schemathesis took $(( $(date +%s) - started )) s, exit status $status"
exit "$status"
