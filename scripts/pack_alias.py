"""Import this pack as the package ``batch_lora`` outside ComfyUI (tests, main job, benchmarks).

The repo root is the pack's package, and its ``__init__`` is ComfyUI's entry point (it imports ComfyUI). This
registers the root folder as ``batch_lora`` without running that ``__init__``, so ``batch_lora.core`` imports
with plain torch, and the repo root never goes on ``sys.path``, where it would shadow ComfyUI's top-level
``nodes`` module.
"""
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def register() -> None:
    """Make ``import batch_lora.core`` / ``batch_lora.nodes`` work; idempotent."""
    if "batch_lora" not in sys.modules:
        package = types.ModuleType("batch_lora")
        package.__path__ = [str(ROOT)]
        sys.modules["batch_lora"] = package
