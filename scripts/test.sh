#!/usr/bin/env bash
# README command 2 (and CI): set up the host environment if needed, then run the whole test suite.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
env_lines="$(bash "$root/scripts/setup_host.sh")"
PYTHON="$(sed -n 's/^PYTHON=//p' <<<"$env_lines")"
export COMFYUI_PATH="$(sed -n 's/^COMFYUI_PATH=//p' <<<"$env_lines")"
cd "$root"
exec "$PYTHON" -m pytest -ra "$@"
