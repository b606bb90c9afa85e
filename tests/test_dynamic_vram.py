"""DynamicVRAM (ComfyUI's ``ModelPatcherDynamic``) in a CPU simulation (tests/dynamic_sim.py), on hosts that have
it (ComfyUI 0.33): hundreds of loads cycling stacks, strength edits, chained loaders, plain paths, Reset Adapters,
VRAM evictions, fp16-overflow prompts, demotions to the classic patcher and ComfyUI's own LoraLoader on the same
keys, with and without the read-only memory-mapped checkpoint load. Every step's layer weights
equal the classic patcher's bit for bit, sampled latents too; the plain path and Reset give the checkpoint's
weights; nothing writes the checkpoint's tensors (a write into the mapped pages would kill the process: each run
is a subprocess). On a host without the dynamic patcher (0.3.75) these tests are skipped, i.e. not run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import comfy_host

pytestmark = pytest.mark.host
ROOT = Path(__file__).resolve().parents[1]
HAS_DYNAMIC = "class ModelPatcherDynamic" in (comfy_host.COMFYUI_PATH / "comfy" / "model_patcher.py").read_text()


@pytest.mark.skipif(not HAS_DYNAMIC, reason=f"not run: the ComfyUI at {comfy_host.COMFYUI_PATH.name} has no "
                                            "ModelPatcherDynamic (DynamicVRAM)")
@pytest.mark.parametrize("mapped,steps", [(True, 200), (False, 200)], ids=["mapped", "unmapped"])
def test_dynamic_patcher_equals_classic_over_many_loads(fixtures_dir, tmp_path, mapped, steps, capsys):
    out = tmp_path / "summary.json"
    cmd = [sys.executable, str(ROOT / "tests" / "dynamic_cycle.py"), str(fixtures_dir), "--steps", str(steps),
           "--clip-every", "20", "--sample-every", "40", "--json", str(out)] + (["--mapped"] if mapped else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert proc.returncode >= 0, f"the process died with signal {-proc.returncode}:\n{proc.stderr[-3000:]}"
    assert out.is_file(), proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    with capsys.disabled():
        print(f"\nDynamicVRAM simulation ({'mapped' if mapped else 'unmapped'} checkpoint): {summary['steps']} steps "
              f"{summary['kinds']}, {summary['loads']} loads, {summary['clip_checked']} with the text encoder, "
              f"{len(summary['sampled'])} sampled, {summary['evictions']} evictions; layer weights built with the "
              f"stack: {summary['merges']}; differing from classic: {len(summary['differing'])}; "
              f"{summary['seconds']} s")
    assert proc.returncode == 0, json.dumps(summary)[:3000]
    assert summary["steps"] == steps and summary["loads"] == 2 * steps
    assert summary["differing"] == [] and summary["plain_or_reset_off"] == [] and summary["base_written"] == []
    assert {"stack", "edit", "chain", "plain", "reset", "evict", "demote", "stock"} <= set(summary["kinds"])
    assert len(summary["sampled"]) >= 2 and all(s["equal"] for s in summary["sampled"])
    assert any(s["loras"] and s["differs_from_plain"] for s in summary["sampled"])  # the stack did change them
    assert summary["merges"]["BaseModel"] > 0 and summary["merges"]["SD1ClipModel"] > 0
    # fp16 overflow: refused when the node runs, naming the node and a key (the plain path after it is exact)
    assert len(summary["bad_rejected"]) == steps // 50 and all(
        m.startswith("Batch LoRA Loader: diffusion_model.") and "NaN/Inf" in m for m in summary["bad_rejected"])
    # demoted to the classic patcher (as TorchCompileModel does): no PackPatch left, the classic bake took over
    assert summary["demoted"] == [{"classic": True, "pack_patches_left": 0}] * (steps // 50)
    # ComfyUI's own LoraLoader after the pack's loader on the same keys: both patchers within two fp16 roundings
    # (plus the stock LoRA's own fp16 computation on the cast path) of the float64 oracle
    assert summary["stock_composed"] == [{"dynamic": 0, "classic": 0}] * (steps // 50)
