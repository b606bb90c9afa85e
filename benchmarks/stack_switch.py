"""Stack-switch benchmark: this pack vs stock ComfyUI on a full-size SD1.5-architecture UNet + CLIP-L (fp16,
random weights built in memory, not committed), in the real host, in one process and one run.

    .venv/bin/python benchmarks/stack_switch.py [--ks 1 4 8 16] [--repeat 3]

For K LoRAs (ranks cycling 16, 32, 64, 128; each touching every UNet attention projection, a quarter of the
ResBlock 3x3 convs and the CLIP attention projections), it times the events a queued prompt causes, end to end
through ComfyUI's load_models_gpu (UNet + CLIP):
  apply      clean model -> stack A
  edit       stack A -> A with one strength changed
  switch     stack A -> stack B (other files or other strengths)
  reset      stack A -> base (this pack: Reset Adapters; stock: the plain checkpoint output)
  unchanged  the loader node re-executes with the same stack (e.g. --cache-none)
for this pack (Batch LoRA Loader) and stock ComfyUI (a chain of K LoraLoader nodes), as medians and ratios. Also
peak RSS, base-cache and parsed-LoRA-cache bytes, and a roofline bound for the fused apply (bytes the machine
must move and GEMM FLOPs, against its measured copy bandwidth and fp32 matmul rate). Writes
benchmarks/results/stack_switch.json.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "tests")]
import comfy_host as ch  # noqa: E402
import make_fixtures as fx  # noqa: E402
import pack_alias  # noqa: E402

pack_alias.register()
RANKS = (16, 32, 64, 128)


def timed(fn) -> float:
    """Wall time of ``fn()`` in ms."""
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def build_sd15(h):
    """(ModelPatcher, CLIP) of a full-size SD1.5 architecture with fp16 weights, std 1/sqrt(fan_in)."""
    import comfy.model_patcher
    import comfy.supported_models
    mc = comfy.supported_models.SD15(dict(fx.SD15_UNET_CONFIG))
    mc.set_inference_dtype(torch.float16, torch.float32)  # as --fp16-unet on the CPU: fp16 weights, fp32 compute
    model = mc.get_model({})
    clip = h.sd.CLIP(mc.clip_target(), model_options={"dtype": torch.float16})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in (model, clip.cond_stage_model):
            for p in module.parameters():
                fan_in = p[0].numel() if p.ndim > 1 else 50
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    patcher = comfy.model_patcher.ModelPatcher(model, h.mm.get_torch_device(), h.mm.unet_offload_device())
    return patcher, clip


def write_loras(h, model, clip, folder: Path, count: int) -> list[str]:
    """``count`` kohya-format LoRA files for the model, named lora_00..; returns the names."""
    import comfy.lora
    names = {**comfy.lora.model_lora_keys_unet(model.model, {}), **comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})}
    kohya = {key: name for name, key in names.items() if name.startswith(("lora_unet_", "lora_te_"))}
    attn = sorted(k for k in kohya if k.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight",
                                                   "q_proj.weight", "k_proj.weight", "v_proj.weight",
                                                   "out_proj.weight")))
    convs = sorted(k for k in kohya if k.endswith(("in_layers.2.weight", "out_layers.3.weight")))
    params = {**dict(model.model.named_parameters()), **dict(clip.cond_stage_model.named_parameters())}
    g = torch.Generator().manual_seed(1)
    files = []
    for i in range(count):
        rank = RANKS[i % len(RANKS)]
        tensors = {}
        for key in attn + convs[i % 4::4]:
            shape = params[key].shape
            fan_in = math.prod(shape[1:])
            down = torch.randn(rank, *shape[1:], generator=g) / math.sqrt(fan_in)
            up = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=g) * 0.02
            tensors[f"{kohya[key]}.lora_down.weight"] = down.half()
            tensors[f"{kohya[key]}.lora_up.weight"] = up.half()
            tensors[f"{kohya[key]}.alpha"] = torch.tensor(float(rank / 2), dtype=torch.float16)
        name = f"lora_{i:02d}.safetensors"
        save_file(tensors, str(folder / name))
        files.append(name)
    return files


def measure_machine() -> dict:
    """Copy bandwidth (GB/s, read + write) and fp32 matmul rate (GFLOP/s) of this machine, best of 3."""
    src = torch.randn(64 * 2**20)  # 256 MiB
    dst = torch.empty_like(src)
    copy_s = min(timed(lambda: dst.copy_(src)) for _ in range(3)) / 1e3
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    mm_s = min(timed(lambda: a @ b) for _ in range(3)) / 1e3
    return {"copy_gb_s": 2 * src.numel() * 4 / copy_s / 1e9, "matmul_gflop_s": 2 * 2048 ** 3 / mm_s / 1e9}


def roofline(plan: dict, params: dict, machine: dict) -> dict:
    """Lower bound for one fused apply of ``plan``: read the fp32 base + write the fp16 weight per element, and
    2*out*in*R FLOPs per key (R = summed ranks)."""
    bytes_moved = flops = 0
    for key, terms in plan.items():
        n = params[key].numel()
        bytes_moved += n * (4 + params[key].element_size())
        flops += 2 * n * sum(f.rank for _, f in terms)
    seconds = max(bytes_moved / (machine["copy_gb_s"] * 1e9), flops / (machine["matmul_gflop_s"] * 1e9))
    return {"bytes": bytes_moved, "flops": flops, "bound_ms": seconds * 1e3}


def main(argv=None):
    """Run the benchmark; print the table and write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="batch-lora-bench-"))
    (base / "models" / "loras").mkdir(parents=True)
    (base / "models" / "checkpoints").mkdir(parents=True)
    h = ch.host(base / "models")
    from batch_lora.nodes.lifecycle import engine_for
    from batch_lora.nodes.stack import FILES
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    model, clip = build_sd15(h)
    files = write_loras(h, model, clip, base / "models" / "loras", max(args.ks) * 2 if max(args.ks) < 16 else 16)
    h.folder_paths.filename_list_cache.pop("loras", None)
    machine = measure_machine()
    params = {**dict(model.model.named_parameters()), **dict(clip.cond_stage_model.named_parameters())}
    pack, stock_nodes = h.pack.BatchLoraLoader(), [h.nodes.LoraLoader() for _ in files]
    resetter = h.pack.ResetAdapters()

    def ours(stack):
        rows = {f"lora_{i + 1}": {"on": True, "lora": n, "strength_model": s, "strength_clip": s}
                for i, (n, s) in enumerate(stack)}
        m, c = pack.apply(model, clip, **rows)[:2]
        return m, c

    def stock(stack):
        m, c = model, clip
        for node, (n, s) in zip(stock_nodes, stack):
            m, c = node.load_lora(m, c, n, s, s)
        return m, c

    def load(mc):
        ch.load(h, mc[0], mc[1].load_model())

    results = []
    with torch.inference_mode():
        load((model, clip))
        rss_loaded = proc.memory_info().rss
        for k in args.ks:
            a = [(files[i], 0.5 + 0.05 * i) for i in range(k)]
            a_edit = [(n, s + 0.25 if i == 0 else s) for i, (n, s) in enumerate(a)]
            b = [(files[-1 - i], 0.7 - 0.03 * i) for i in range(k)]
            row = {"k": k, "ranks": [RANKS[i % 4] for i in range(k)]}
            for impl, build in (("pack", ours), ("stock", stock)):
                if impl == "stock":  # the pack's memory, before stock ComfyUI adds its own backups and caches
                    row["rss_after_pack_bytes"] = proc.memory_info().rss
                ev = {e: [] for e in ("apply", "edit", "switch", "reset", "unchanged")}
                for _ in range(args.repeat):
                    load((model, clip))
                    ev["apply"].append(timed(lambda: load(build(a))))
                    ev["edit"].append(timed(lambda: load(build(a_edit))))
                    load(build(a))
                    ev["switch"].append(timed(lambda: load(build(b))))
                    load(build(a))
                    base_mc = resetter.reset(False, *build(a)) if impl == "pack" else (model, clip)
                    ev["reset"].append(timed(lambda: load(base_mc)))  # the graph's outputs already exist
                    load(build(a))
                    ev["unchanged"].append(timed(lambda: load(build(a))))
                row[impl] = {e: statistics.median(v) for e, v in ev.items()}
            engine = engine_for(model.model, create=False)
            load(ours(a))
            merges, writes = engine.counters.merges, engine.counters.writes
            m_a, _ = ours(a)
            load((m_a, clip))  # unchanged stack: no merge, no write
            row["unchanged_merges_writes"] = (engine.counters.merges - merges, engine.counters.writes - writes)
            plan = {**m_a.get_attachment("batch_lora").plan}
            clip_engine = engine_for(clip.patcher.model, create=False)
            engine.reset()
            fused_ms = timed(lambda: engine.apply(plan))
            row["fused_unet_apply_ms"] = fused_ms
            row["roofline"] = roofline(plan, params, machine)
            row["base_cache_bytes"] = engine.cache.nbytes + clip_engine.cache.nbytes
            row["touched_params"] = sum(params[key].numel() for e in (engine, clip_engine) for key in e.cache.keys())
            row["lora_cache_bytes"] = FILES.nbytes
            row["moves"] = engine.counters.moves + clip_engine.counters.moves  # host moves the pack saw, all runs
            row["peak_rss_bytes"] = proc.memory_info().rss
            results.append(row)
            print(f"K={k} done", flush=True)
    report = {"machine": machine, "rss_start": rss0, "rss_model_loaded": rss_loaded, "rows": results,
              "repeat": args.repeat,
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "stack_switch.json").write_text(json.dumps(report, indent=2))
    print(f"\nfull-size SD1.5 UNet + CLIP-L, fp16, CPU ({torch.get_num_threads()} threads); copy "
          f"{machine['copy_gb_s']:.1f} GB/s, fp32 matmul {machine['matmul_gflop_s']:.0f} GFLOP/s; median ms of "
          f"{args.repeat}; ratio = stock / pack")
    print(f"{'K':>3} {'event':<10}{'pack ms':>10}{'stock ms':>10}{'ratio':>8}")
    for r in results:
        for e in ("apply", "edit", "switch", "reset", "unchanged"):
            p, s = r["pack"][e], r["stock"][e]
            print(f"{r['k']:>3} {e:<10}{p:>10.1f}{s:>10.1f}{s / p:>8.2f}")
        rl = r["roofline"]
        print(f"    fused UNet apply {r['fused_unet_apply_ms']:.0f} ms = {r['fused_unet_apply_ms'] / rl['bound_ms']:.2f}x "
              f"roofline ({rl['bytes'] / 2**20:.0f} MiB, {rl['flops'] / 1e9:.0f} GFLOP -> {rl['bound_ms']:.0f} ms); "
              f"unchanged re-run merges/writes {r['unchanged_merges_writes']}; device moves seen {r['moves']}; base cache "
              f"{r['base_cache_bytes'] / 2**20:.0f} MiB for {r['touched_params'] / 1e6:.1f} M touched params "
              f"({r['base_cache_bytes'] / max(1, r['touched_params']):.2f} B/param); LoRA cache "
              f"{r['lora_cache_bytes'] / 2**20:.0f} MiB; RSS growth with the pack only "
              f"{(r['rss_after_pack_bytes'] - rss_loaded) / 2**20:.0f} MiB "
              f"({(r['rss_after_pack_bytes'] - rss_loaded) / max(1, r['base_cache_bytes'] + r['lora_cache_bytes']):.2f}x "
              f"base + LoRA caches); RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB")
    print(f"results: {out / 'stack_switch.json'}")


if __name__ == "__main__":
    main()
