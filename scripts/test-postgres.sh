#!/usr/bin/env bash
# Starts a throwaway PostgreSQL server on loopback for the tests and prints
# its admin URL (export it as MESH_TEST_POSTGRES_URL). Installs PostgreSQL
# with apt-get when it is missing. `scripts/test-postgres.sh stop` stops it.
set -euo pipefail

DIR=${MESH_PG_DIR:-/tmp/mesh-shop-pg}
# Below the ephemeral port range, so no test client socket can hold it.
PORT=${MESH_PG_PORT:-25432}

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

as_pg() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "${1:-}" in
    stop)
        [ -d "$DIR/data" ] && as_pg "$(pg_bin)/pg_ctl" -D "$DIR/data" -m fast -w stop >/dev/null 2>&1 || true
        exit 0 ;;
    # An outage of a running test server, and its end (same port and data).
    pause)
        as_pg "$(pg_bin)/pg_ctl" -D "$DIR/data" -m fast -w stop >/dev/null
        exit $? ;;
    resume)
        as_pg "$(pg_bin)/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w start >/dev/null
        exit $? ;;
esac

if [ -z "$(pg_bin)" ]; then
    echo "installing PostgreSQL with apt-get" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >&2
fi
BIN=$(pg_bin)

if [ -d "$DIR/data" ]; then
    as_pg "$BIN/pg_ctl" -D "$DIR/data" -m immediate -w stop >/dev/null 2>&1 || true
fi
rm -rf "$DIR"
mkdir -p "$DIR"
[ "$(id -u)" = 0 ] && chown postgres "$DIR"
as_pg "$BIN/initdb" -A trust -U postgres -D "$DIR/data" >/dev/null
# fsync off: a test server's data is thrown away; durability is not under test here.
for port in "$PORT" $((PORT + 1)) $((PORT + 2)); do
    # Settings go in the config file so `resume` restarts the same server.
    cat >> "$DIR/data/postgresql.conf" <<CONF
port = $port
unix_socket_directories = '$DIR'
listen_addresses = '127.0.0.1'
max_connections = 400
fsync = off
CONF
    if as_pg "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w start >/dev/null; then
        echo "postgres://postgres@127.0.0.1:$port/postgres"
        exit 0
    fi
    echo "port $port is taken; trying the next" >&2
done
echo "PostgreSQL did not start; see $DIR/server.log" >&2
exit 1
