"""Test set-up. The pack is imported as the package ``batch_lora`` (scripts/pack_alias.py), so ``core`` tests never
import ComfyUI and the repo root never lands on ``sys.path``. ``scripts/`` (fixtures, server harness, main job)
and ``tests/`` helpers are importable as plain modules."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))
import pack_alias  # noqa: E402

pack_alias.register()


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
