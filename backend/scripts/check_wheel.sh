#!/usr/bin/env bash
# The installable-package proof. Builds the wheel, installs it (not editable) with the locked
# dependencies into a fresh virtualenv outside the repository, and from a directory with no
# source and no alembic.ini:
#   1. with SERVER_URL: `glisk db upgrade` against DATABASE_URL (a throwaway database created on
#      that server), then `glisk db current` must say the database is at head;
#   2. `glisk db upgrade` and `glisk db current` on the embedded PostgreSQL (no DATABASE_URL);
#   3. `glisk serve` (embedded PostgreSQL) must answer /health with 200, then stop on SIGTERM.
#
#   bash backend/scripts/check_wheel.sh [SERVER_URL]     # postgresql://user:pass@host:port/db
set -euo pipefail

BACKEND_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
SERVER_URL="${1:-}"

WORK="$(mktemp -d /tmp/glisk-wheel-XXXXXX)"
# Traversable, so that as root the embedded server's account can use the virtualenv's binaries and
# the project directory's data in place.
chmod 755 "$WORK"
SERVE_PID=""
cleanup() {
  if [ -n "$SERVE_PID" ]; then kill -KILL "$SERVE_PID" 2>/dev/null || true; fi
  rm -rf -- "$WORK"
}
trap cleanup EXIT

say() { printf '    %s\n' "$*"; }
fail() {
  printf 'check_wheel: %s\n' "$*" >&2
  exit 1
}

(cd "$BACKEND_DIR" && uv build --wheel --out-dir "$WORK/dist" -q)
WHEEL="$(ls "$WORK"/dist/glisk-*.whl)"
say "built $(basename "$WHEEL")"
(cd "$BACKEND_DIR" && uv export --frozen --no-dev --no-emit-project --no-hashes -q \
  -o "$WORK/requirements.txt")
uv venv -q --python 3.11 "$WORK/venv"
uv pip install -q --python "$WORK/venv/bin/python" -r "$WORK/requirements.txt" "$WHEEL"
GLISK="$WORK/venv/bin/glisk"
PY="$WORK/venv/bin/python"

mkdir -m 755 "$WORK/project"
cd "$WORK/project"
location="$("$PY" -c 'import glisk.migrations as m; print(m.SCRIPT_LOCATION)')"
case "$location" in
  "$WORK/venv/"*) say "migrations from the installed package: $location" ;;
  *) fail "glisk.migrations comes from $location, not from the installed wheel" ;;
esac
[ ! -e alembic.ini ] || fail "alembic.ini in the project directory"

# Every command reads an empty settings file: nothing from a developer's .env.
export GLISK_ENV_FILE=/dev/null

if [ -n "$SERVER_URL" ]; then
  url="$("$PY" - "$SERVER_URL" <<'PY'
import sys
import uuid

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

name = f"glisk_wheel_{uuid.uuid4().hex[:8]}"
with psycopg.connect(sys.argv[1], autocommit=True) as conn:
    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
print(make_url(sys.argv[1]).set(database=name).render_as_string(hide_password=False))
PY
)"
  DATABASE_URL="$url" "$GLISK" db upgrade
  current="$(DATABASE_URL="$url" "$GLISK" db current)"
  say "DATABASE_URL: glisk db current: $current"
  case "$current" in *"(up to date)") ;; *) fail "not at head after glisk db upgrade: $current" ;; esac
fi

PG_PORT="$("$PY" -c 'from glisk.embedded import free_port; print(free_port())')"
HTTP_PORT="$("$PY" -c 'from glisk.embedded import free_port; print(free_port())')"
export GLISK_PG_PORT="$PG_PORT"
"$GLISK" db upgrade
current="$("$GLISK" db current)"
say "embedded: glisk db current: $current"
case "$current" in *"(up to date)") ;; *) fail "not at head after glisk db upgrade: $current" ;; esac

HOST=127.0.0.1 PORT="$HTTP_PORT" "$GLISK" serve >"$WORK/serve.log" 2>&1 &
SERVE_PID=$!
started=$SECONDS
until curl -fsS "http://127.0.0.1:$HTTP_PORT/health" 2>/dev/null | grep -q '"healthy"'; do
  if [ $((SECONDS - started)) -ge 30 ] || ! kill -0 "$SERVE_PID" 2>/dev/null; then
    cat "$WORK/serve.log" >&2
    fail "glisk serve from the wheel did not answer /health with 200 within 30 s"
  fi
  sleep 0.2
done
say "glisk serve from the wheel answered /health with 200 after $((SECONDS - started)) s or less"
kill -TERM "$SERVE_PID"
code=0
wait "$SERVE_PID" || code=$?
SERVE_PID=""
[ "$code" -eq 0 ] || { cat "$WORK/serve.log" >&2; fail "glisk serve exited $code on SIGTERM"; }
say "glisk serve stopped cleanly on SIGTERM"
