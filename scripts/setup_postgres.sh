#!/usr/bin/env bash
# PostgreSQL for the feedback-database tests (crates/prospect-cli/tests/serve.rs): Debian's server, its
# default cluster started, and a role and database `prospect` (password `prospect`) reached over TCP on
# 127.0.0.1. Idempotent; run as root (it installs with apt-get and switches to the `postgres` user). The
# last line it prints is the URL, which scripts/test.sh passes to the tests as PROSPECT_POSTGRES_URL.
set -euo pipefail
if ! command -v pg_ctlcluster >/dev/null; then
  echo "== installing PostgreSQL from Debian" >&2
  apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2
fi
version=$(ls /usr/lib/postgresql | sort -n | tail -1)
if ! pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" { found = 1 } END { exit !found }'; then
  pg_createcluster "$version" main >&2
fi
if ! pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" && $4 == "online" { found = 1 } END { exit !found }'; then
  pg_ctlcluster "$version" main start >&2
fi
port=$(pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" { print $3 }')
psql_as_postgres() { su postgres -c "psql -p $port -q -tA -c \"$1\""; }
if [ "$(psql_as_postgres "SELECT 1 FROM pg_roles WHERE rolname = 'prospect'")" != 1 ]; then
  psql_as_postgres "CREATE ROLE prospect LOGIN PASSWORD 'prospect'" >&2
fi
if [ "$(psql_as_postgres "SELECT 1 FROM pg_database WHERE datname = 'prospect'")" != 1 ]; then
  su postgres -c "createdb -p $port -O prospect prospect" >&2
fi
echo "postgres://prospect:prospect@127.0.0.1:$port/prospect"
