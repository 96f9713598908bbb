# Sourced by .ci/run: start a throw-away PostgreSQL server on loopback for the shared-study test
# and export MEDEMAN_TEST_POSTGRES_URL. Without a server binary the test skips and says why.
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
if [ -n "${MEDEMAN_TEST_POSTGRES_URL:-}" ]; then
  echo "PostgreSQL: using MEDEMAN_TEST_POSTGRES_URL from the environment"
elif [ -n "$PG_BIN" ] && [ -x "$PG_BIN/initdb" ]; then
  PG_DIR=$(mktemp -d /tmp/medeman-pg.XXXXXX)
  PG_PORT=${PG_PORT:-55432}
  if [ "$(id -u)" = 0 ]; then
    chown postgres "$PG_DIR" 2>/dev/null || { useradd -r postgres 2>/dev/null; chown postgres "$PG_DIR"; }
    AS_PG="runuser -u postgres --"
  else
    AS_PG=""
  fi
  $AS_PG "$PG_BIN/initdb" -D "$PG_DIR/data" -U medeman --auth=trust >/dev/null
  $AS_PG "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -o "-p $PG_PORT -k $PG_DIR -c listen_addresses=127.0.0.1" -l "$PG_DIR/log" -w start >/dev/null
  $AS_PG "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U medeman medeman_test
  export MEDEMAN_TEST_POSTGRES_URL="postgresql://medeman@127.0.0.1:$PG_PORT/medeman_test"
  trap '$AS_PG "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast stop >/dev/null 2>&1; rm -rf "$PG_DIR"' EXIT
  echo "PostgreSQL: started on 127.0.0.1:$PG_PORT for the shared-study test"
else
  echo "PostgreSQL: no server binary found; the shared-study test will be skipped"
fi
