"""Test set-up. The pack is imported as the package ``batch_lora`` (its root folder, without running its
``__init__``), so ``core`` tests never import ComfyUI and the repo root never lands on ``sys.path`` (ComfyUI has a
top-level module called ``nodes``). ``scripts/`` (fixtures, server harness) is importable as plain modules."""
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if "batch_lora" not in sys.modules:
    package = types.ModuleType("batch_lora")
    package.__path__ = [str(ROOT)]
    sys.modules["batch_lora"] = package
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))


@pytest.fixture(scope="session")
def fixtures_dir(tmp_path_factory):
    """A base directory with the generated tiny SD1.5 checkpoint and LoRA files (models/checkpoints, models/loras)."""
    import make_fixtures
    base = tmp_path_factory.mktemp("fixtures")
    make_fixtures.make_fixtures(base)
    return base


@pytest.fixture(scope="session")
def comfy_host(fixtures_dir):
    """ComfyUI imported in-process with its model folders pointing at ``fixtures_dir/models``."""
    import comfy_host as ch
    return ch.host(fixtures_dir / "models")
