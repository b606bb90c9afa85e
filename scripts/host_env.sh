# Sourced by the entry scripts (main_job.sh, soak.sh, test.sh): set up the host environment if needed
# (setup_host.sh), then set PYTHON (the venv's interpreter) and export COMFYUI_PATH (the ComfyUI tree it uses).
env_lines="$(bash "$(dirname "${BASH_SOURCE[0]}")/setup_host.sh")"
PYTHON="$(sed -n 's/^PYTHON=//p' <<<"$env_lines")"
COMFYUI_PATH="$(sed -n 's/^COMFYUI_PATH=//p' <<<"$env_lines")"
export COMFYUI_PATH
