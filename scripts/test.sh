#!/usr/bin/env bash
# Runs meterd's whole test suite: formatting, lints, the build and every test.
# Meant for a fresh Debian machine with a Rust toolchain, run as root (CI) or as a developer.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() {
    printf '\n==> %s\n' "$*"
}

# The run's duration, printed at its end whether it passed or not.
started=$(date +%s)
report_duration() {
    local status=$?
    local secs=$(( $(date +%s) - started ))
    printf '\n==> %s after %dm%02ds\n' "$([ "$status" -eq 0 ] && echo passed || echo FAILED)" \
        $((secs / 60)) $((secs % 60))
}
trap report_duration EXIT

# System packages the tests need, beyond Rust: PostgreSQL 15 for the PostgreSQL store,
# ClickHouse (Debian's 18.16; each test starts a private server of its own) for the ClickHouse
# store, Node.js and npm for the TimescaleDB conformance test (TimescaleDB itself comes from npm,
# see tests/timescaledb/README.md), Prometheus for promtool (which checks meterd's /metrics),
# curl for the README's quickstart commands, Python's venv for
# the third-party clients in tests/clients/.
APT_PACKAGES=(postgresql clickhouse-server curl python3-venv prometheus)
if ! command -v npm >/dev/null; then
    APT_PACKAGES+=(nodejs npm)
fi

install_packages() {
    if [ "${#APT_PACKAGES[@]}" -eq 0 ]; then
        step "system packages: none needed"
        return
    fi
    local missing=()
    local pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        step "system packages: already installed (${APT_PACKAGES[*]})"
        return
    fi
    step "installing system packages: ${missing[*]}"
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        sudo=(sudo)
    fi
    "${sudo[@]}" apt-get update -q
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
}

as_postgres() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        sudo -u postgres "$@"
    fi
}

# Starts the Debian PostgreSQL cluster and creates the role the tests connect as. Tests create
# their own databases (and, for outage tests, their own private servers).
start_postgres() {
    step "starting PostgreSQL"
    local version
    version=$(pg_lsclusters --no-header | awk 'NR==1 {print $1}')
    if [ -z "$version" ]; then
        echo "no PostgreSQL cluster found (pg_lsclusters is empty)" >&2
        exit 1
    fi
    if ! pg_lsclusters --no-header | awk 'NR==1 {print $4}' | grep -q online; then
        local sudo=()
        if [ "$(id -u)" -ne 0 ]; then
            sudo=(sudo)
        fi
        "${sudo[@]}" pg_ctlcluster "$version" main start
    fi
    as_postgres psql -q -v ON_ERROR_STOP=1 -c "DO \$\$ BEGIN
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'meterd') THEN
            CREATE ROLE meterd LOGIN SUPERUSER PASSWORD 'meterd';
        END IF;
    END \$\$;"
    local port
    port=$(pg_lsclusters --no-header | awk 'NR==1 {print $3}')
    export METERD_TEST_POSTGRES_URL="postgres://meterd:meterd@127.0.0.1:$port/postgres"
    export METERD_TEST_PG_BIN="/usr/lib/postgresql/$version/bin"
}

# A one-off build keeps no incremental state: it would only cost disk and time.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

step "disk space"
df -h .

install_packages
start_postgres

step "npm ci (TimescaleDB for the conformance test, @grafana/schema for the dashboards)"
npm ci --prefix tests/timescaledb --no-audit --no-fund
npm ci --prefix dashboards/schema-check --no-audit --no-fund

# chDB (ClickHouse 26.9 embedded in Python) for the conformance test of the DDL meterd uses on
# current ClickHouse releases; see tests/it/clickhouse_modern.rs. Only its engine is needed, not
# its pandas and pyarrow extras.
step "chDB (current ClickHouse for the conformance test)"
if [ ! -x tests/clickhouse/.venv/bin/python ]; then
    python3 -m venv tests/clickhouse/.venv
fi
tests/clickhouse/.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps \
    chdb==4.4.0 chdb-core==26.9.0
export METERD_TEST_CHDB_PYTHON="$PWD/tests/clickhouse/.venv/bin/python"

# Third-party clients the tests use as users do: the CloudEvents Python SDK, pyarrow, DuckDB,
# pandas and polars reading the Parquet files, and schemathesis fuzzing the OpenAPI document.
step "Python clients (tests/clients/requirements.txt)"
if [ ! -x tests/clients/.venv/bin/python ]; then
    python3 -m venv tests/clients/.venv
fi
tests/clients/.venv/bin/python -m pip install --quiet --disable-pip-version-check \
    -r tests/clients/requirements.txt
export METERD_TEST_PYTHON="$PWD/tests/clients/.venv/bin/python"

step "cargo fmt --all --check"
cargo fmt --all --check

step "cargo clippy --workspace --all-targets --locked -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

# One build of everything the tests need (the binary included). A separate `cargo build` would
# resolve dependency features without the dev-dependencies and compile them all a second time.
step "cargo test --workspace --locked --no-run"
cargo test --workspace --locked --no-run

step "cargo test --workspace --locked"
cargo test --workspace --locked

step "disk used by the build"
du -sh target 2>/dev/null || true

step "all checks passed"
