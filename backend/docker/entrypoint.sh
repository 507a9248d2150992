#!/bin/sh
# Container entrypoint for the GLISK API (also runnable outside a container; tests/deploy/test_deploy.py
# does exactly that).
#
#   no arguments   apply migrations (`glisk db upgrade`), then exec uvicorn on HOST:PORT. `exec`
#                  replaces this shell, so uvicorn is PID 1 in the container and receives
#                  SIGTERM from `docker stop` directly (graceful shutdown, then exit).
#   arguments      run them instead, without migrating: one-off commands such as
#                  `docker compose run --rm backend-api glisk db current`.
#
# Settings come from the environment (compose passes the root .env); see .env.example.
set -eu

if [ "$#" -gt 0 ]; then
    exec "$@"
fi

if [ -z "${DATABASE_URL:-}" ]; then
    echo "entrypoint: DATABASE_URL is not set; the container needs an external PostgreSQL" \
        "(the embedded database is for \`glisk serve\` on a developer machine)" >&2
    exit 2
fi

HOST="${HOST:-0.0.0.0}"
PORT="${PORT:-8000}"

glisk db upgrade

exec uvicorn glisk.app:create_app --factory \
    --host "$HOST" --port "$PORT" \
    --timeout-graceful-shutdown 8
