#!/usr/bin/env bash
# Runs Keyward's whole test suite: formatting, lints, and every test of every crate.
#
# PostgreSQL and Redis are real servers in tests, never mocks. This script makes sure both answer
# (starting them, or installing them from Debian's packages, when needed). With CI=true an
# unreachable service fails the run; elsewhere the tests that need it are skipped with a loud line.
# nginx and Caddy are installed the same way (never started as system services: the proxy tests run
# their own instances on loopback ports) and their paths exported as KEYWARD_TEST_NGINX/_CADDY; so are
# Chromium and its WebDriver for the console's browser test (KEYWARD_TEST_CHROMIUM/_CHROMEDRIVER); so is
# a Python with DuckDB for the usage export's test (KEYWARD_TEST_PYTHON).
set -euo pipefail
cd "$(dirname "$0")/.."

export KEYWARD_TEST_POSTGRES_URL="${KEYWARD_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}"
export KEYWARD_TEST_REDIS_URL="${KEYWARD_TEST_REDIS_URL:-redis://127.0.0.1:6379}"

say() { printf '\n==> %s\n' "$*"; }

apt_install() {
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        # Packages such as nginx start their system service on install; the tests want only their own
        # instances, so services are kept from starting (unless the machine already says so itself).
        local policy=/usr/sbin/policy-rc.d own_policy=
        if [ ! -e "$policy" ]; then
            printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=1
        fi
        local rc=0
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null || rc=$?
        [ -z "$own_policy" ] || rm -f "$policy"
        return "$rc"
    else
        return 1
    fi
}

postgres_up() { pg_isready -q -h 127.0.0.1 -p 5432 >/dev/null 2>&1; }
# Up is not enough: the tests connect with KEYWARD_TEST_POSTGRES_URL (user, auth, database).
postgres_usable() { psql "$KEYWARD_TEST_POSTGRES_URL" -tAc 'SELECT 1' >/dev/null 2>&1; }
redis_up() { [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = "PONG" ]; }

wait_for() {
    local check=$1
    for _ in $(seq 1 30); do
        if "$check"; then return 0; fi
        sleep 1
    done
    return 1
}

ensure_postgres() {
    if command -v psql >/dev/null 2>&1 && postgres_usable; then return 0; fi
    if ! command -v pg_ctlcluster >/dev/null 2>&1; then
        say "PostgreSQL is not installed: installing it from Debian's packages"
        apt_install postgresql || return 1
    fi
    local version
    version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
    [ -n "$version" ] || return 1
    if ! postgres_up; then
        say "starting PostgreSQL"
        pg_ctlcluster --skip-systemctl-redirect "$version" main start >/dev/null 2>&1 || true
        wait_for postgres_up || return 1
    fi
    postgres_usable && return 0
    # A fresh Debian cluster asks for passwords on 127.0.0.1 and has no `test` database. Make it what
    # the development and CI machines have: trust auth on loopback, and a `test` database.
    [ "$(id -u)" = 0 ] || return 1
    local hba="/etc/postgresql/$version/main/pg_hba.conf" tmp
    if ! grep -qE '^host[[:space:]]+all[[:space:]]+all[[:space:]]+127\.0\.0\.1/32[[:space:]]+trust' "$hba"; then
        say "PostgreSQL: trust auth on loopback (a test machine)"
        tmp=$(mktemp)
        { printf 'host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n'; cat "$hba"; } >"$tmp"
        cat "$tmp" >"$hba" && rm -f "$tmp"
        pg_ctlcluster --skip-systemctl-redirect "$version" main reload >/dev/null 2>&1 || true
    fi
    su postgres -c "psql -tAc \"SELECT 1 FROM pg_database WHERE datname = 'test'\"" 2>/dev/null | grep -q 1 \
        || su postgres -c "createdb test" >/dev/null 2>&1 || true
    postgres_usable
}

ensure_redis() {
    if command -v redis-cli >/dev/null 2>&1 && redis_up; then return 0; fi
    if ! command -v redis-server >/dev/null 2>&1; then
        say "Redis is not installed: installing it from Debian's packages"
        apt_install redis-server || return 1
    fi
    say "starting Redis"
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log >/dev/null 2>&1 || true
    wait_for redis_up
}

# The proxy tests start their own nginx and Caddy, so being installed and able to run is enough.
nginx_usable() { [ -x "$KEYWARD_TEST_NGINX" ] && "$KEYWARD_TEST_NGINX" -V 2>&1 | grep -q -- '--with-http_auth_request_module'; }
caddy_usable() { [ -x "$KEYWARD_TEST_CADDY" ] && "$KEYWARD_TEST_CADDY" version >/dev/null 2>&1; }

ensure_proxy() { # name package default_path
    local var="KEYWARD_TEST_${1^^}"
    export "$var=${!var:-$(command -v "$1" || echo "$3")}"
    "${1}_usable" && return 0
    say "$1 is not installed: installing it from Debian's packages"
    apt_install "$2" || return 1
    export "$var=$(command -v "$1" || echo "$3")"
    "${1}_usable"
}
ensure_nginx() { ensure_proxy nginx nginx /usr/sbin/nginx; }
ensure_caddy() { ensure_proxy caddy caddy /usr/bin/caddy; }
# The console's browser test starts its own chromedriver and headless Chromium.
chromium_usable() { [ -x "$KEYWARD_TEST_CHROMIUM" ] && "$KEYWARD_TEST_CHROMIUM" --headless --no-sandbox --version >/dev/null 2>&1; }
chromedriver_usable() { [ -x "$KEYWARD_TEST_CHROMEDRIVER" ] && "$KEYWARD_TEST_CHROMEDRIVER" --version >/dev/null 2>&1; }
ensure_chromium() { ensure_proxy chromium chromium /usr/bin/chromium; }
ensure_chromedriver() { ensure_proxy chromedriver chromium-driver /usr/bin/chromedriver; }
# The usage export's test has DuckDB count the exported rows: its Python package from the package
# registry, in the tools' virtual environment scripts/schemathesis.sh keeps too (KEYWARD_TOOLS_DIR).
DUCKDB_VERSION=2.0.1
TOOLS="${KEYWARD_TOOLS_DIR:-$HOME/.cache/keyward}"
export KEYWARD_TEST_PYTHON="$TOOLS/venv/bin/python"
duckdb_usable() { "$KEYWARD_TEST_PYTHON" -c "import duckdb; assert duckdb.__version__ == '$DUCKDB_VERSION'" 2>/dev/null; }
ensure_python() {
    duckdb_usable && return 0
    say "installing duckdb $DUCKDB_VERSION into $TOOLS/venv"
    mkdir -p "$TOOLS"
    { [ -x "$TOOLS/venv/bin/pip" ] || python3 -m venv "$TOOLS/venv"; } || return 1
    "$TOOLS/venv/bin/pip" install -q "duckdb==$DUCKDB_VERSION" || return 1
    duckdb_usable
}

for service in postgres redis nginx caddy chromium chromedriver python; do
    if ! "ensure_$service"; then
        if [ "${CI:-}" = "true" ]; then
            echo "FATAL: $service is not reachable and CI=true: failing the run" >&2
            exit 1
        fi
        echo "!!!!! WARNING: $service is not reachable: tests that need it will be SKIPPED !!!!!" >&2
        export "KEYWARD_TEST_SKIP_${service^^}=1"
    fi
done

say "cargo fmt --check"
cargo fmt --all -- --check
say "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
say "cargo test"
cargo test --workspace --locked
say "schemathesis (every check against /openapi.json)"
./scripts/schemathesis.sh
