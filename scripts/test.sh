#!/usr/bin/env bash
# README command 2 (and CI): set up the host environment if needed, then run the whole test suite.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/host_env.sh"
cd "$root"
exec "$PYTHON" -m pytest -ra "$@"
