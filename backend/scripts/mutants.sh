#!/usr/bin/env bash
# Planted mutants: each mutation of a fence that matters (listed in scripts/mutants.toml) is
# applied alone to a copy of the code, and its tests must fail. The working tree is never
# modified. Exits non-zero naming every mutant that survived, and before running anything when
# a mutant no longer applies. Callable from any directory:
#
#   bash backend/scripts/mutants.sh            # every mutant (a few minutes on 2 cores)
#   bash backend/scripts/mutants.sh --check    # only check that every mutant still applies
#   bash backend/scripts/mutants.sh --list     # the mutants and the tests that must kill each
#   bash backend/scripts/mutants.sh NAME ...   # the mutants whose name contains NAME
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec uv run python scripts/mutants.py "$@"
