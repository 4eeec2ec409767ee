#!/bin/sh
# initdb on first start (superuser POSTGRES_USER with POSTGRES_PASSWORD, database POSTGRES_DB),
# then the server on all interfaces of the container; `postgres -c ...` arguments pass through.
set -eu
BIN=/usr/lib/postgresql/15/bin
DATA=/var/lib/postgresql/data
USER_NAME=${POSTGRES_USER:-postgres}
if [ ! -s "$DATA/PG_VERSION" ]; then
    pwfile=$(mktemp)
    printf '%s\n' "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is required}" >"$pwfile"
    "$BIN/initdb" -D "$DATA" -U "$USER_NAME" --pwfile="$pwfile" -E UTF8 --locale=C --no-sync \
        --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >>"$DATA/pg_hba.conf"
    db=${POSTGRES_DB:-$USER_NAME}
    if [ "$db" != postgres ]; then
        echo "CREATE DATABASE \"$db\"" | "$BIN/postgres" --single -D "$DATA" postgres >/dev/null
    fi
fi
[ "${1:-}" = postgres ] && shift
exec "$BIN/postgres" -D "$DATA" -c listen_addresses='*' \
    -c unix_socket_directories=/var/run/postgresql "$@"
