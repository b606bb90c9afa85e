"""Packaging as ComfyUI and the Comfy Registry read it: pyproject.toml parsed by ComfyUI's own comfy_config
parser, no torch in the pack's requirements, and every UI workflow in workflows/ with its API twin and a JPEG
thumbnail for the template browser."""
import json
import os
import re
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.host
ROOT = Path(__file__).resolve().parents[1]
COMFYUI_PATH = Path(os.environ.get("COMFYUI_PATH") or ROOT / ".comfyui")


def test_pyproject_as_comfyui_reads_it():
    sys.path.insert(0, str(COMFYUI_PATH))
    try:
        from comfy_config import config_parser
    finally:
        sys.path.remove(str(COMFYUI_PATH))
    config = config_parser.extract_node_configuration(str(ROOT))
    assert config.project.name == "comfyui-batch-lora" and config.project.version
    assert config.tool_comfy.publisher_id and config.tool_comfy.display_name == "Batch LoRA Loader"
    assert config.tool_comfy.web is None  # WEB_DIRECTORY in __init__.py declares it, once
    names = {re.match(r"[A-Za-z0-9_.-]+", d).group().lower() for d in config.project.dependencies}
    assert not names & {"torch", "torchvision", "torchaudio"}  # ComfyUI-Manager refuses packs that pin torch


@pytest.mark.parametrize("workflow", sorted((ROOT / "workflows").glob("*.json")), ids=lambda p: p.stem)
def test_each_ui_workflow_has_api_twin_and_thumbnail(workflow):
    ui = json.loads(workflow.read_text())
    api = json.loads((ROOT / "workflows" / "api" / workflow.name).read_text())
    assert {str(n["id"]) for n in ui["nodes"]} == set(api)
    thumbnail = workflow.with_suffix(".jpg")  # what ComfyUI 0.3.75's template browser requests for packs
    assert thumbnail.read_bytes()[:3] == b"\xff\xd8\xff"
