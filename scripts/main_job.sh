#!/usr/bin/env bash
# README command 1: set up the host environment if needed, then run the main job (a real headless ComfyUI with
# this pack, 300 queued prompts, a drift report).   bash scripts/main_job.sh [--runs N] [--naive-cycles N]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/host_env.sh"
exec "$PYTHON" "$root/scripts/main_job.py" "$@"
