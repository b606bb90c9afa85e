#!/usr/bin/env bash
# The stack-switch benchmark on every host: ComfyUI 0.3.75 (embedded default), then every ComfyUI tree in the
# hosts folder ($BATCH_LORA_HOME/hosts, as .ci/run), each with its own venv (set up if needed).
#   bash scripts/bench.sh [benchmarks/stack_switch.py args...]     e.g. --ks 1 8 --repeat 3
# Each host's table is printed and its JSON written to benchmarks/results/<host>/stack_switch_<model>.json.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
hosts="${BATCH_LORA_HOME:-$HOME/.cache/comfyui-batch-lora}/hosts"
status=0
run_host() {  # name, then COMFYUI_PATH ('' for the embedded default), then the benchmark's args
  local name="$1" path="$2"; shift 2
  echo "=== host $name: benchmarks/stack_switch.py $*"
  ( export COMFYUI_PATH="$path"; source "$root/scripts/host_env.sh" && cd "$root" &&
    "$PYTHON" benchmarks/stack_switch.py --out "benchmarks/results/$name" "$@" ) || status=1
}
run_host comfyui-0.3.75 "" "$@"
for tree in "$hosts"/*/; do
  [ -f "$tree/main.py" ] && run_host "$(basename "$tree")" "${tree%/}" "$@"
done
exit $status
