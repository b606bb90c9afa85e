#!/usr/bin/env bash
# Soak test: set up the host environment if needed, then queue N prompts (default 10,000) on the real server with
# seeded random LoRA stacks, plain paths, resets and bad prompts; every output is checked bit for bit and the
# server's RSS is sampled.   bash scripts/soak.sh [--n N] [--seed S] [--stacks K] [--work DIR]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/host_env.sh"
exec "$PYTHON" "$root/scripts/soak.py" "$@"
