"""GPU check: LoRA stacks switched in place on a torch.compile'd full-size SD1.5-architecture UNet (fp16).

    python tests/gpu/test_compile_gpu.py            # on a CUDA machine; < 5 min on one H200
    python -m pytest tests/gpu                      # the same as a test; skipped without CUDA

For each compile mode (``reduce-overhead``: CUDA graphs, which capture static parameter addresses;
``max-autotune-no-cudagraphs``) it compiles once, then applies three LoRA stacks, a strength edit and a switch,
and resets, asserting: the same Parameter storage throughout, zero recompiles after the first call, compiled
outputs equal to the eager module's outputs with the same weights (relative L2 < 2e-3 in fp16), outputs that
differ between stacks, and a bit-exact reset (weights and the compiled output). Prints apply/edit/switch/reset
times and peak GPU memory. ``--device cpu --tiny --modes default`` runs the same checks on a small UNet on the
CPU (a smoke test of this script, part of the CPU test suite).

The UNet is ComfyUI's own ``openaimodel.UNetModel`` with the SD1.5 configuration (COMFYUI_PATH or .comfyui).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import pack_alias  # noqa: E402
from make_fixtures import SD15_UNET_CONFIG as SD15  # noqa: E402

pack_alias.register()
from batch_lora.core import InPlacePatcher, LoraFactors  # noqa: E402

TINY = dict(SD15, model_channels=64, num_heads=4, num_res_blocks=[1, 1], channel_mult=[1, 2],
            transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1)


def build_unet(device, dtype, tiny):
    """ComfyUI's SD1.5 UNet with deterministic random weights (std 1/sqrt(fan_in))."""
    comfy_path = Path(os.environ.get("COMFYUI_PATH") or ROOT / ".comfyui")
    sys.path.insert(0, str(comfy_path))
    import comfy.cli_args
    if device == "cpu":
        comfy.cli_args.args.cpu = True
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    unet = UNetModel(**(TINY if tiny else SD15), dtype=dtype, device=device,
                     operations=comfy.ops.disable_weight_init)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 50
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    return unet.eval()


def make_stacks(unet, seed=0):
    """Three stacks of LoRAs (ranks 16-128) on attention projections, proj_in/out (1x1) and ResBlock 3x3 convs."""
    keys = [n for n, p in unet.named_parameters()
            if n.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "proj_in.weight",
                           "proj_out.weight", "in_layers.2.weight", "out_layers.3.weight"))]
    g = torch.Generator().manual_seed(seed)

    def lora(key, rank, i):
        shape = unet.get_parameter(key).shape
        up = torch.randn(shape[0], rank, generator=g) * 0.2 / math.sqrt(rank)
        down = torch.randn(rank, math.prod(shape[1:]), generator=g) / math.sqrt(math.prod(shape[1:]))
        return LoraFactors.from_tensors(up, down, float(rank), f"lora{i}#{key}")

    loras = [{f"diffusion_model.{k}": lora(k, rank, i) for k in keys[i % 3::2]}
             for i, rank in enumerate((16, 32, 64, 128))]

    def stack(strengths):
        out = {}
        for s, l in zip(strengths, loras):
            for k, f in l.items():
                out.setdefault(k, []).append((s, f))
        return out
    return {"A": stack((0.8, 0.0, 0.6, 0.0)), "B": stack((0.0, 1.0, 0.5, -0.7)),
            "B_edit": stack((0.0, 1.0, 0.9, -0.7)), "C": stack((0.5, 0.5, 0.5, 0.5))}


def cuda_sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    cuda_sync(device)
    t = time.perf_counter()
    out = fn()
    cuda_sync(device)
    return out, (time.perf_counter() - t) * 1e3


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def check_mode(mode, device, dtype, tiny):
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    unet = build_unet(device, dtype, tiny)
    root = torch.nn.Module()
    root.diffusion_model = unet
    stacks = make_stacks(unet)
    g = torch.Generator().manual_seed(1)
    hw = 16 if tiny else 64
    x = torch.randn(2, 4, hw, hw, generator=g).to(device, dtype)
    t = torch.tensor([500.0, 20.0], device=device)
    ctx = (torch.randn(2, 77, 768, generator=g) * 0.5).to(device, dtype)
    compiled = torch.compile(unet, mode=None if mode == "default" else mode)
    ptrs = {n: p.data_ptr() for n, p in unet.named_parameters()}
    base_w = {n: p.detach().clone() for n, p in unet.named_parameters()}
    with torch.no_grad():
        (_, t_compile) = timed(lambda: [compiled(x, t, context=ctx) for _ in range(3)], device)  # + cudagraph warm-up
        base_out = compiled(x, t, context=ctx).clone()
        frames0 = counters["frames"]["total"]
        patcher = InPlacePatcher(root)
        row = {"mode": mode, "compile_s": t_compile / 1e3}
        outs = {}
        for name in ("A", "B", "B_edit", "C"):
            report, ms = timed(lambda: patcher.apply(stacks[name]), device)
            row[{"A": "apply_ms", "B": "switch_ms", "B_edit": "edit_ms", "C": "switch2_ms"}[name]] = ms
            outs[name] = compiled(x, t, context=ctx).clone()
            eager = unet(x, t, context=ctx)
            row[f"err_{name}"] = rel(outs[name], eager)
            assert row[f"err_{name}"] < 2e-3, (mode, name, row[f"err_{name}"])
        _, row["reset_ms"] = timed(patcher.reset, device)
        after_reset = compiled(x, t, context=ctx).clone()
        row["recompiles"] = counters["frames"]["total"] - frames0
    assert row["recompiles"] == 0, row
    assert all(p.data_ptr() == ptrs[n] for n, p in unet.named_parameters()), "storage moved"
    assert all(torch.equal(p, base_w[n]) for n, p in unet.named_parameters()), "reset is not bit-exact"
    assert torch.equal(after_reset, base_out), "compiled output after reset differs from before the first apply"
    names = list(outs)
    for i, a in enumerate(names):
        assert rel(outs[a], base_out) > 10 * row[f"err_{a}"], (mode, a, "LoRA had no visible effect")
        for b in names[i + 1:]:
            assert rel(outs[a], outs[b]) > 5 * max(row[f"err_{a}"], row[f"err_{b}"]), (mode, a, b)
    row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    row["base_cache_mib"] = patcher.cache.nbytes / 2**20
    row["keys"] = len(stacks["C"])
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="small UNet (smoke test of this script)")
    ap.add_argument("--modes", nargs="+", default=["reduce-overhead", "max-autotune-no-cudagraphs"])
    args = ap.parse_args(argv)
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    rows = [check_mode(mode, args.device, dtype, args.tiny) for mode in args.modes]
    cols = ["mode", "keys", "compile_s", "apply_ms", "edit_ms", "switch_ms", "switch2_ms", "reset_ms", "recompiles",
            "err_A", "err_B", "err_B_edit", "err_C", "peak_mem_gib", "base_cache_mib"]
    print("\n" + " | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    return rows


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_unet_switches_stacks_on_gpu():
    main([])


if __name__ == "__main__":
    main()
