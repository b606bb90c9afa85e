"""Lifecycle costs in the real ComfyUI host, in-process, on the tiny fp16 SD1.5 fixture: this pack vs a chain of
stock LoraLoader nodes, for the events a queued prompt causes (first bake, unchanged re-run, strength edit, plain
path), plus what a lifecycle that restores on eject would pay per run. Prints a table; figures for the README's
design section. Usage: python benchmarks/lifecycle.py [--repeat 5]   (run via scripts/setup_host.sh's python)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "tests")]
import comfy_host as ch  # noqa: E402
import make_fixtures as fx  # noqa: E402
import pack_alias  # noqa: E402

pack_alias.register()

STACK = [(fx.LORA_KOHYA_A, 0.8, 1.0), (fx.LORA_PEFT_C, 0.6, 0.5), (fx.LORA_KOHYA_B, -0.5, 0.7)]


def ms(f, repeat):
    """Median wall time of ``f()`` over ``repeat`` calls, in ms."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main(argv=None):
    """Measure and print the table (see the module docstring)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="batch-lora-bench-"))
    fx.make_fixtures(base)
    h = ch.host(base / "models")
    from batch_lora.nodes.lifecycle import engine_for
    model, clip = ch.load_checkpoint(h, fx.CHECKPOINT_NAME, torch.float16)
    loader, stock = h.pack.BatchLoraLoader(), h.nodes.LoraLoader()

    def ours(strength_scale=1.0):
        """The pack's loader on STACK (model strengths scaled)."""
        rows = {f"lora_{i + 1}": {"on": True, "lora": n, "strength_model": sm * strength_scale, "strength_clip": sc}
                for i, (n, sm, sc) in enumerate(STACK)}
        m, c = loader.apply(model, clip, **rows)[:2]
        return m, c

    def stock_chain(strength_scale=1.0):
        """Three stock LoraLoader nodes on STACK (model strengths scaled)."""
        m, c = model, clip
        for n, sm, sc in STACK:
            m, c = stock.load_lora(m, c, n, sm * strength_scale, sc)
        return m, c

    def load(mc):
        """Load (model, clip) as sampling and text encoding do."""
        ch.load(h, mc[0], mc[1].load_model())

    rows = []
    with torch.inference_mode():
        load((model, clip))
        for name, build in (("this pack", ours), ("stock LoraLoader x3", stock_chain)):
            scales = iter(1.0 + 0.01 * i for i in range(1, 10 ** 6))
            first = build()
            t_first = ms(lambda: load(first), 1)
            same = build()  # the node re-executed with the same inputs (e.g. --cache-none)
            t_same = ms(lambda: load(same), args.repeat)
            t_edit = ms(lambda: load(build(next(scales))), args.repeat)
            t_plain = ms(lambda: (load(build(next(scales))), load((model, clip))), args.repeat)
            rows.append((name, t_first, t_same, t_edit, t_plain))
        engine = engine_for(model.model, create=False)
        clip_engine = engine_for(clip.patcher.model, create=False)
        # A lifecycle that restores on eject and re-bakes on inject would do so ~3x per KSampler run and 1x per
        # CLIP encode even when nothing changed (../shared/notes/comfyui-lifecycle.md, probe pack).
        plan_m, plan_c = ours()
        spec_m = plan_m.get_attachment("batch_lora").plan
        spec_c = plan_c.patcher.get_attachment("batch_lora").plan
        cycle_m = ms(lambda: (engine.apply(spec_m), engine.reset()), args.repeat)
        cycle_c = ms(lambda: (clip_engine.apply(spec_c), clip_engine.reset()), args.repeat)
    print(f"\nLifecycle costs, tiny SD1.5 (fp16 UNet, CLIP-L), 3 LoRAs ({len(spec_m)} UNet + {len(spec_c)} CLIP keys), median of "
          f"{args.repeat}, ms, CPU")
    print(f"{'':<22}{'first bake':>12}{'unchanged':>12}{'strength edit':>15}{'edit + plain':>14}")
    for name, *vals in rows:
        print(f"{name:<22}" + "".join(f"{v:>{w}.1f}" for v, w in zip(vals, (12, 12, 15, 14))))
    print(f"restore-on-eject lifecycle, unchanged stack: ~{3 * cycle_m + cycle_c:.1f} ms of restore+re-bake per "
          f"prompt (3 x {cycle_m:.1f} UNet + 1 x {cycle_c:.1f} CLIP), vs 0 writes for this pack")
    print(f"this pack's base caches (fp32): UNet {engine.cache.nbytes / 2**20:.1f} MiB, CLIP "
          f"{clip_engine.cache.nbytes / 2**20:.1f} MiB; ComfyUI's backup holds no second copy of these keys")


if __name__ == "__main__":
    main()
