"""The GPU benchmark in one command: stack switches of this pack vs stock ComfyUI on an NVIDIA GPU.

    COMFYUI_PATH=<host tree> <host python> benchmarks/gpu.py [--ks 1 4 8 16] [--repeat 3] [--out DIR]

Runs benchmarks/stack_switch.py (one process per configuration; ComfyUI's memory mode is process-wide) for the
full-size SDXL UNet (fp16) and a Flux.1-size DiT block stack (bf16, 8 double + 16 single blocks), K = 1/4/8/16,
every event followed by one forward pass (DynamicVRAM builds patched weights only then), in three
configurations:
  default          ComfyUI's default flags: DynamicVRAM on 0.33 with comfy-aimdo (the pack rides ComfyUI's patch
                   list), normal VRAM on 0.3.75 (the classic in-place bake, base cache in pinned host memory);
  highvram         --highvram: the classic patcher, base cache in pinned host memory (read over PCIe per bake);
  highvram+vram    --highvram with BATCH_LORA_BASE_CACHE_DEVICE=load: the base cache in VRAM.
Each prints its table (ms, ratios to stock, bounds, peak VRAM and host RSS) and writes its JSON under --out; this
script prints them all again at the end. Run it once per host (COMFYUI_PATH). Needs CUDA.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
CONFIGS = {"default": ("", {}), "highvram": ("--highvram", {}),
           "highvram+vram": ("--highvram", {"BATCH_LORA_BASE_CACHE_DEVICE": "load"})}


def main(argv=None) -> int:
    """Run every (model, configuration); returns non-zero if one failed."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ks", nargs="+", default=["1", "4", "8", "16"])
    ap.add_argument("--repeat", default="3")
    ap.add_argument("--models", nargs="+", default=["sdxl", "flux"])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu")
    args = ap.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("gpu benchmark: no CUDA device; not run", file=sys.stderr)
        return 2
    failed, reports, start = [], [], time.time()
    for model in args.models:
        for name, (host_argv, env) in CONFIGS.items():
            out = args.out / f"{model}-{name}"
            cmd = [sys.executable, str(ROOT / "benchmarks" / "stack_switch.py"), "--model", model, "--ks", *args.ks,
                   "--repeat", args.repeat, "--forward", "--host-argv", host_argv, "--out", str(out)]
            print(f"=== {model} / {name}: {' '.join(cmd[1:])}", flush=True)
            code = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}).returncode
            if code:
                failed.append(f"{model}/{name} (exit {code})")
            else:
                reports.append((model, name, json.loads((out / f"stack_switch_{model}.json").read_text())))
    import stack_switch
    for model, name, report in reports:
        print(f"\n##### {model} / {name}")
        stack_switch.print_table(report)
    print(f"\ngpu benchmark: {len(reports)} runs in {time.time() - start:.0f} s" +
          (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
