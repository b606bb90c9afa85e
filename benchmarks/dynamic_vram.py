"""The DynamicVRAM design decision, measured: this pack's native patches vs demoting the model to the classic patcher.

    COMFYUI_PATH=<ComfyUI 0.33 tree> <its venv>/bin/python benchmarks/dynamic_vram.py [--repeat 3]

On the CPU simulation of ``ModelPatcherDynamic`` (tests/dynamic_sim.py: ComfyUI's own patcher and cast code, a CPU
buffer standing for each layer's VRAM slot), the tiny SD1.5 checkpoint loaded as comfy-aimdo loads it (read-only
memory-mapped pages), the main job's three LoRAs (kohya + PEFT + kohya) on the UNet and the text encoder:

  native patches  what the pack does: the stack rides ComfyUI's patch list; a load marks every slot stale and
                  each layer's weight is built (base + stack) when it is next cast;
  demotion        what core does for TorchCompileModel and weight hooks: ``get_non_dynamic_delegate()`` (a second
                  model, loaded again from the file without DynamicVRAM), then the pack's classic in-place bake.

For each: extra host memory (growth of resident anonymous memory, less the simulated VRAM slots, against the model's
own bytes; the mapped checkpoint's pages are page cache and not counted), the base-cache
bytes the pack holds, and the time of a first apply, a stack switch and the plain path (load + building every
layer's weight once, as the first sampling step would). Writes benchmarks/results/dynamic_vram.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMFYUI_PATH = Path(os.environ.get("COMFYUI_PATH") or ROOT / ".comfyui")
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "tests"), str(COMFYUI_PATH)]
import comfy_aimdo.control  # noqa: E402

comfy_aimdo.control.init()
import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True
comfy.cli_args.args.fp16_unet = True
import importlib  # noqa: E402

import psutil  # noqa: E402
import torch  # noqa: E402

import comfy.model_management as mm  # noqa: E402
import comfy.sd  # noqa: E402
import folder_paths  # noqa: E402

import dynamic_sim as sim  # noqa: E402
import main_job  # noqa: E402
import make_fixtures as fx  # noqa: E402
import pack_alias  # noqa: E402

pack_alias.register()
pack = importlib.import_module("batch_lora.nodes.nodes")
lifecycle = importlib.import_module("batch_lora.nodes.lifecycle")
OTHER = main_job.THREE_OTHER


def anon() -> int:
    """Resident anonymous memory (RSS less file-backed pages: the memory-mapped checkpoint's pages are page cache,
    which the OS can drop), in bytes."""
    info = psutil.Process().memory_info()
    return info.rss - info.shared


def slots(*patchers) -> int:
    """Bytes in the simulated VRAM slots (they stand for GPU memory: not host memory)."""
    return sum(v.loaded_size() for p in patchers for v in getattr(p.model, "dynamic_vbars", {}).values())


def build_all(*patchers) -> None:
    """Build every layer's weight once, as the first sampling step / text encode does."""
    for p in patchers:
        for module in p.model.modules():
            if isinstance(getattr(module, "weight", None), torch.Tensor):
                sim.effective(module)


def apply(model, clip, stack):
    out = pack.BatchLoraLoader().apply(model, clip, **main_job.rows(stack))
    return out[0], out[1].patcher


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def model_bytes(*patchers) -> int:
    return sum(t.numel() * t.element_size() for p in patchers for t in p.model.state_dict().values())


def base_cache_bytes(*patchers) -> int:
    return sum(e.cache.nbytes for p in patchers if (e := lifecycle.engine_for(p.model, create=False)) is not None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    sim.enable()
    base = Path(tempfile.mkdtemp(prefix="dynamic-vram-bench-"))
    fx.make_fixtures(base)
    for kind in ("checkpoints", "loras"):
        folder_paths.folder_names_and_paths[kind] = ([str(base / "models" / kind)],
                                                     folder_paths.supported_pt_extensions)
    ckpt = str(base / "models" / "checkpoints" / fx.CHECKPOINT_NAME)
    results = {}
    with torch.inference_mode():
        for variant in ("native patches", "demotion"):
            r0 = anon()
            with sim.mapped_load():
                model, clip = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=False)[:2]
            loaded = model.model, clip.patcher
            size = model_bytes(model, clip.patcher)
            times = {"apply": [], "switch": [], "plain": []}
            t_delegate = 0.0
            if variant == "demotion":
                t0 = time.perf_counter()
                model = model.get_non_dynamic_delegate()
                clip.patcher = clip.patcher.get_non_dynamic_delegate()
                t_delegate = (time.perf_counter() - t0) * 1e3
            after_load = anon()
            for _ in range(args.repeat):
                for event, stack in (("apply", main_job.THREE), ("switch", OTHER), ("plain", None)):
                    patchers = (model, clip.patcher) if stack is None else apply(model, clip, stack)
                    times[event].append(timed(lambda: (mm.load_models_gpu(list(patchers)), build_all(*patchers))))
            extra = anon() - slots(model, clip.patcher) - r0
            results[variant] = {
                "model_bytes": size, "delegate_ms": round(t_delegate, 1),
                "host_bytes_after_load": after_load - r0, "host_bytes_after_runs": extra,
                "host_bytes_vs_model": round(extra / size, 2),
                "base_cache_bytes": base_cache_bytes(model, clip.patcher),
                **{f"{k}_ms": round(statistics.median(v), 1) for k, v in times.items()}}
            del model, clip, patchers, loaded
            mm.unload_all_models()
            mm.soft_empty_cache()
    print(f"{'':<16}{'model MiB':>10}{'host MiB':>10}{'x model':>9}{'base cache MiB':>16}{'delegate ms':>13}"
          f"{'apply ms':>10}{'switch ms':>11}{'plain ms':>10}")
    for variant, r in results.items():
        print(f"{variant:<16}{r['model_bytes'] / 2**20:>10.0f}{r['host_bytes_after_runs'] / 2**20:>10.0f}"
              f"{r['host_bytes_vs_model']:>9.2f}{r['base_cache_bytes'] / 2**20:>16.0f}{r['delegate_ms']:>13.0f}"
              f"{r['apply_ms']:>10.0f}{r['switch_ms']:>11.0f}{r['plain_ms']:>10.0f}")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "dynamic_vram.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
