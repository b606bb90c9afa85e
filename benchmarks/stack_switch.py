"""Stack-switch benchmark: this pack vs stock ComfyUI, in the real host, in one process and one run.

    <host python> benchmarks/stack_switch.py [--model sd15|sdxl|flux] [--ks 1 4 8 16] [--repeat 3]
                                             [--host-argv "--highvram"] [--forward]

Models (random weights built in memory, not committed; std 1/sqrt(fan_in)):
  sd15  full-size SD1.5 UNet + CLIP-L, fp16 (the CPU default); each LoRA touches every UNet attention projection,
        a quarter of the ResBlock 3x3 convs and the CLIP attention projections; ranks cycle 16, 32, 64, 128;
  sdxl  full-size SDXL UNet (2.6 B), fp16, the same selection of keys, no text encoder;
  flux  a Flux.1-size DiT (hidden 3072, context 4096; --flux-blocks double,single, default 8,16), bf16; each
        LoRA touches every linear weight of the blocks (as ai-toolkit and musubi-tuner train them).
For K LoRAs it times the events a queued prompt causes, end to end through ComfyUI's load_models_gpu:
  apply      clean model -> stack A
  edit       stack A -> A with one strength changed
  switch     stack A -> stack B (other files or other strengths)
  reset      stack A -> base (this pack: Reset Adapters; stock: the plain checkpoint output)
  unchanged  the loader node re-executes with the same stack (e.g. --cache-none)
for this pack (Batch LoRA Loader; with the float32 and the native-dtype base cache, BATCH_LORA_BASE_CACHE) and
stock ComfyUI (a chain of K LoraLoader nodes), as medians and ratios. With --forward every event also runs one
forward pass of the diffusion model (DynamicVRAM builds patched weights only then); a steady-state forward is
timed and printed beside. Beside each figure: the machine's measured bounds (copy bandwidth, fp32 matmul rate; on
CUDA also pinned host-to-device bandwidth), the fused apply against its roofline, reset against its copy bound
and the switch's bound. Also RSS (and peak VRAM), cache bytes. Writes benchmarks/results/stack_switch_<model>.json.
--host-argv imports the host's own main.py with those options (GPU: "" for ComfyUI's defaults, DynamicVRAM on
0.33; "--highvram"); without it the host runs with --cpu. benchmarks/gpu.py runs the GPU matrix in one command.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
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
import arch_fixtures as af  # noqa: E402
import comfy_host as ch  # noqa: E402
import make_fixtures as fx  # noqa: E402
import pack_alias  # noqa: E402

pack_alias.register()
RANKS = (16, 32, 64, 128)
EVENTS = ("apply", "edit", "switch", "reset", "unchanged")
SDXL_UNET_CONFIG = dict(
    in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4],
    transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
    transformer_depth_middle=10, context_dim=2048, num_heads=-1, num_head_channels=64, adm_in_channels=2816,
    num_classes="sequential", use_linear_in_transformer=True, use_spatial_transformer=True, legacy=False,
    image_size=32, use_temporal_attention=False, use_temporal_resblock=False)
"""The full-size SDXL base UNet (ComfyUI openaimodel.UNetModel keyword arguments, 2.57 B parameters)."""
SD_KEYS = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "q_proj.weight", "k_proj.weight",
           "v_proj.weight", "out_proj.weight")
SD_CONVS = ("in_layers.2.weight", "out_layers.3.weight")


def sync():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn) -> float:
    """Wall time of ``fn()`` in ms (CUDA work included)."""
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - t) * 1e3


def _fill(modules):
    """Random weights, std 1/sqrt(fan_in) (norm scales ~1), filled in place (uniform, fast on many cores)."""
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                fan_in = p[0].numel() if p.ndim > 1 else 50
                p.uniform_(-math.sqrt(3 / fan_in), math.sqrt(3 / fan_in))


def build(h, name: str, flux_blocks: tuple[int, int]):
    """(ModelPatcher, CLIP or None, forward inputs) of benchmark model ``name`` (see the module docstring)."""
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.supported_models
    clip = None
    if name in ("sd15", "sdxl"):
        cls, config = ((comfy.supported_models.SD15, fx.SD15_UNET_CONFIG) if name == "sd15"
                       else (comfy.supported_models.SDXL, SDXL_UNET_CONFIG))
        mc = cls(dict(config))
        mc.set_inference_dtype(torch.float16, torch.float32 if h.mm.get_torch_device().type == "cpu" else None)
        model = mc.get_model({})
        if name == "sd15":
            clip = h.sd.CLIP(mc.clip_target(), model_options={"dtype": torch.float16})
        inputs = {"x": torch.randn(1, 4, 8, 8), "t": torch.tensor([0.5]),
                  "c_crossattn": torch.randn(1, 77, 768 if name == "sd15" else 2048)}
        if name == "sdxl":
            inputs["y"] = torch.randn(1, 2816)
    else:  # ComfyUI's own detection picks the Flux config from the key layout (shapes only: meta tensors)
        spec = af._flux1(h=3072, double=flux_blocks[0], single=flux_blocks[1], ctx=4096, vec=768)
        meta = {k: torch.empty(shape, device="meta") for k, shape in spec.items()}
        mc = comfy.model_detection.model_config_from_unet(meta, "")
        mc.set_inference_dtype(torch.bfloat16, None)
        model = mc.get_model({})
        inputs = {"x": torch.randn(1, 16, 16, 16), "t": torch.tensor([0.5]), "c_crossattn": torch.randn(1, 64, 4096),
                  "y": torch.randn(1, 768), "guidance": torch.tensor([3.5])}
    _fill([model] + ([clip.cond_stage_model] if clip is not None else []))
    # the patcher class the host's loaders use: 0.33's main.py makes it ModelPatcherDynamic under DynamicVRAM
    patcher_class = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
    patcher = patcher_class(model, h.mm.get_torch_device(), h.mm.unet_offload_device())
    return patcher, clip, inputs


def write_loras(h, model, clip, folder: Path, count: int, name: str) -> list[str]:
    """``count`` kohya-format LoRA files for the model (see the module docstring), named lora_00..; returns the
    names."""
    import comfy.lora
    names = comfy.lora.model_lora_keys_unet(model.model, {})
    if clip is not None:
        names.update(comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}))
    kohya = {key: n for n, key in names.items() if isinstance(key, str) and n.startswith(("lora_unet_", "lora_te_"))}
    params = {**dict(model.model.named_parameters()),
              **(dict(clip.cond_stage_model.named_parameters()) if clip is not None else {})}
    if name == "flux":
        every = sorted(k for k in kohya if "_blocks." in k and params[k].ndim == 2)
        per_file = [every] * count
    else:
        attn = sorted(k for k in kohya if k.endswith(SD_KEYS))
        convs = sorted(k for k in kohya if k.endswith(SD_CONVS))
        per_file = [attn + convs[i % 4::4] for i in range(count)]
    g = torch.Generator().manual_seed(1)
    files = []
    for i, keys in enumerate(per_file):
        rank = RANKS[i % len(RANKS)]
        tensors = {}
        for key in keys:
            shape = params[key].shape
            fan_in = math.prod(shape[1:])
            down = torch.randn(rank, *shape[1:], generator=g) / math.sqrt(fan_in)
            up = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=g) * 0.02
            tensors[f"{kohya[key]}.lora_down.weight"] = down.half()
            tensors[f"{kohya[key]}.lora_up.weight"] = up.half()
            tensors[f"{kohya[key]}.alpha"] = torch.tensor(float(rank / 2), dtype=torch.float16)
        file = f"lora_{i:02d}.safetensors"
        save_file(tensors, str(folder / file))
        files.append(file)
    return files


def measure_machine(device: torch.device) -> dict:
    """Best of 3: copy bandwidth on ``device`` (GB/s, read + write), fp32 matmul rate (GFLOP/s); on CUDA also the
    pinned host-to-device copy bandwidth (GB/s)."""
    src = torch.randn(64 * 2**20, device=device)  # 256 MiB
    dst = torch.empty_like(src)
    copy_s = min(timed(lambda: dst.copy_(src)) for _ in range(3)) / 1e3
    a, b = torch.randn(4096, 4096, device=device), torch.randn(4096, 4096, device=device)
    mm_s = min(timed(lambda: a @ b) for _ in range(3)) / 1e3
    out = {"device": str(device), "copy_gb_s": 2 * src.numel() * 4 / copy_s / 1e9,
           "matmul_gflop_s": 2 * 4096 ** 3 / mm_s / 1e9}
    if device.type == "cuda":
        host = torch.empty(src.shape, pin_memory=True)
        h2d_s = min(timed(lambda: dst.copy_(host, non_blocking=True)) for _ in range(3)) / 1e3
        out["h2d_gb_s"] = src.numel() * 4 / h2d_s / 1e9
    return out


def bounds(plan: dict, params: dict, cache_bytes_per: dict, machine: dict, cache_on_host: bool) -> dict:
    """Lower bounds for one fused apply and one reset of ``plan``'s keys. Apply: read each key's cached base and
    write the weight, and ``2*out*in*R`` FLOPs (R = summed ranks); reset: the same bytes without the FLOPs. Bytes
    cross the device's copy bandwidth, and the cache's bytes the host-to-device link when the cache is in host
    memory and the model on CUDA."""
    read = sum(params[k].numel() * cache_bytes_per[k] for k in plan)
    write = sum(params[k].numel() * params[k].element_size() for k in plan)
    flops = sum(2 * params[k].numel() * sum(f.rank for _, f in terms) for k, terms in plan.items())
    copy = machine["copy_gb_s"] * 1e9
    mem_s = (read / (machine["h2d_gb_s"] * 1e9) + write / copy) if cache_on_host and "h2d_gb_s" in machine \
        else (read + write) / copy
    return {"bytes": read + write, "flops": flops, "reset_ms": mem_s * 1e3,
            "apply_ms": max(mem_s, flops / (machine["matmul_gflop_s"] * 1e9)) * 1e3}


def main(argv=None):
    """Run the benchmark; print the table and write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("sd15", "sdxl", "flux"), default="sd15")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--host-argv", default=None, help="options for the host's main.py (default: --cpu only)")
    ap.add_argument("--forward", action="store_true", help="one diffusion-model forward per event")
    ap.add_argument("--flux-blocks", default="8,16", help="flux: double,single block counts")
    ap.add_argument("--caches", nargs="+", default=["fp32", "native"], help="BATCH_LORA_BASE_CACHE values to run")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="batch-lora-bench-"))
    (base / "models" / "loras").mkdir(parents=True)
    (base / "models" / "checkpoints").mkdir(parents=True)
    h = ch.host(base / "models", None if args.host_argv is None else shlex.split(args.host_argv))
    from batch_lora.nodes.dynamic import is_dynamic
    from batch_lora.nodes.lifecycle import _ENGINE_ATTR, engine_for
    from batch_lora.nodes.stack import FILES
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    model, clip, inputs = build(h, args.model, tuple(int(x) for x in args.flux_blocks.split(",")))
    files = write_loras(h, model, clip, base / "models" / "loras", max(args.ks) * 2 if max(args.ks) < 16 else 16,
                        args.model)
    h.folder_paths.filename_list_cache.pop("loras", None)
    device = h.mm.get_torch_device()
    machine = measure_machine(device)
    params = {**dict(model.model.named_parameters()),
              **(dict(clip.cond_stage_model.named_parameters()) if clip is not None else {})}
    dynamic = is_dynamic(model)
    pack, resetter = h.pack.BatchLoraLoader(), h.pack.ResetAdapters()
    stock_nodes = [h.nodes.LoraLoader() for _ in files]

    def ours(stack):
        rows = {f"lora_{i + 1}": {"on": True, "lora": n, "strength_model": s, "strength_clip": s}
                for i, (n, s) in enumerate(stack)}
        return tuple(pack.apply(model, clip, **rows)[:2])

    def stock(stack):
        m, c = model, clip
        for node, (n, s) in zip(stock_nodes, stack):
            m, c = node.load_lora(m, c, n, s, s)
        return m, c

    def forward(m):
        with torch.inference_mode():
            m.model.apply_model(**{k: v.to(device) for k, v in inputs.items()})

    def load(mc):
        ch.load(h, *([mc[0]] if mc[1] is None else [mc[0], mc[1].load_model()]))
        if args.forward:
            forward(mc[0])

    def engines():
        return [e for e in (engine_for(model.model, create=False),
                            engine_for(clip.patcher.model, create=False) if clip is not None else None) if e]

    impls = [("stock", "")] + [("pack", c) for c in (args.caches if not dynamic else args.caches[:1])]
    results = []
    with torch.inference_mode():
        load((model, clip))
        steady = statistics.median(timed(lambda: forward(model)) for _ in range(3)) if args.forward else 0.0
        rss_loaded = proc.memory_info().rss
        for k in args.ks:
            a = [(files[i], 0.5 + 0.05 * i) for i in range(k)]
            a_edit = [(n, s + 0.25 if i == 0 else s) for i, (n, s) in enumerate(a)]
            b = [(files[-1 - i], 0.7 - 0.03 * i) for i in range(k)]
            row = {"k": k, "ranks": [RANKS[i % 4] for i in range(k)], "impls": {}}
            for impl, cache in impls:
                os.environ["BATCH_LORA_BASE_CACHE"] = cache or "auto"
                load((model, clip))
                for target in (model.model, clip.cond_stage_model if clip is not None else None):
                    if target is not None:  # each cache setting starts from a fresh engine
                        target.__dict__.pop(_ENGINE_ATTR, None)
                FILES.clear()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                build_stack = ours if impl == "pack" else stock
                ev = {e: [] for e in EVENTS}
                for _ in range(args.repeat):
                    load((model, clip))
                    ev["apply"].append(timed(lambda: load(build_stack(a))))
                    ev["edit"].append(timed(lambda: load(build_stack(a_edit))))
                    load(build_stack(a))
                    ev["switch"].append(timed(lambda: load(build_stack(b))))
                    load(build_stack(a))
                    base_mc = resetter.reset(False, *build_stack(a)) if impl == "pack" else (model, clip)
                    ev["reset"].append(timed(lambda: load(base_mc)))  # the graph's outputs already exist
                    load(build_stack(a))
                    ev["unchanged"].append(timed(lambda: load(build_stack(a))))
                name = impl if impl == "stock" else f"pack[{cache}]"
                out = {"ms": {e: statistics.median(v) for e, v in ev.items()}, "rss_bytes": proc.memory_info().rss}
                if device.type == "cuda":
                    out["peak_vram_bytes"] = torch.cuda.max_memory_allocated()
                if impl == "pack" and not dynamic:
                    engine = engines()[0]
                    load(ours(a))
                    before = (engine.counters.merges, engine.counters.writes)
                    load(ours(a))  # unchanged stack: no merge, no write
                    out["unchanged_merges_writes"] = (engine.counters.merges - before[0],
                                                      engine.counters.writes - before[1])
                    plan = dict(ours(a)[0].get_attachment("batch_lora").plan)
                    plan_b = dict(ours(b)[0].get_attachment("batch_lora").plan)
                    per = {key: engine.cache.get(key).element_size() for key in {**plan, **plan_b}}  # all captured
                    on_host = engine.cache.get(next(iter(plan))).device.type == "cpu"
                    out["bounds"] = bounds(plan, params, per, machine, on_host)
                    gone = {key: () for key in plan if key not in plan_b}
                    out["switch_bound_ms"] = (bounds(plan_b, params, per, machine, on_host)["apply_ms"]
                                              + bounds(gone, params, per, machine, on_host)["reset_ms"])
                    engine.reset()
                    out["fused_unet_apply_ms"] = timed(lambda: engine.apply(plan))
                    out["unet_reset_ms"] = timed(engine.reset)
                    load(ours(a))
                    out["base_cache_bytes"] = sum(e.cache.nbytes for e in engines())
                    out["lora_cache_bytes"] = FILES.nbytes
                    out["moves"] = sum(e.counters.moves for e in engines())
                row["impls"][name] = out
            results.append(row)
            print(f"K={k} done", flush=True)
    import comfyui_version  # the host's root is on sys.path once comfy_host imported it
    report = {"model": args.model, "comfyui": comfyui_version.__version__, "machine": machine,
              "host_argv": args.host_argv, "forward": args.forward, "steady_forward_ms": steady,
              "dynamic_vram": dynamic, "rss_start": rss0, "rss_model_loaded": rss_loaded, "rows": results,
              "repeat": args.repeat, "torch": torch.__version__, "threads": torch.get_num_threads()}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"stack_switch_{args.model}.json"
    path.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"results: {path}")


def print_table(report: dict) -> None:
    """The report as a table: per K and event, ms per implementation and stock / pack ratios; bounds beside."""
    m = report["machine"]
    extra = f", host->device {m['h2d_gb_s']:.1f} GB/s" if "h2d_gb_s" in m else ""
    print(f"\n{report['model']} on {m['device']}, ComfyUI {report['comfyui']} (host argv {report['host_argv']!r}; "
          f"DynamicVRAM {'on' if report['dynamic_vram'] else 'off'}; {report['threads']} threads); copy "
          f"{m['copy_gb_s']:.1f} GB/s, "
          f"fp32 matmul {m['matmul_gflop_s']:.0f} GFLOP/s{extra}; median ms of {report['repeat']}"
          + (f", each with one forward pass (a steady forward: {report['steady_forward_ms']:.1f} ms)"
             if report["forward"] else "")
          + "; ratio = stock / pack")
    for r in report["rows"]:
        impls = r["impls"]
        packs = [n for n in impls if n != "stock"]
        print(f"K={r['k']} ranks {r['ranks']}")
        print(f"  {'event':<10}{'stock':>10}" + "".join(f"{n:>16}{'ratio':>9}" for n in packs))
        for e in EVENTS:
            s = impls["stock"]["ms"][e]
            print(f"  {e:<10}{s:>10.1f}" + "".join(f"{impls[n]['ms'][e]:>16.1f}{s / impls[n]['ms'][e]:>9.2f}"
                                               for n in packs))
        for n in packs:
            p = impls[n]
            if "bounds" not in p:
                continue
            b = p["bounds"]
            apply_ms = p["fused_unet_apply_ms"]
            print(f"  {n}: fused UNet apply {apply_ms:.0f} ms = {apply_ms / b['apply_ms']:.2f}x "
                  f"its bound ({b['bytes'] / 2**20:.0f} MiB, {b['flops'] / 1e9:.0f} GFLOP -> {b['apply_ms']:.0f} ms); "
                  f"UNet reset {p['unet_reset_ms']:.0f} ms = {p['unet_reset_ms'] / b['reset_ms']:.2f}x its copy bound "
                  f"({b['reset_ms']:.0f} ms); UNet switch bound {p['switch_bound_ms']:.0f} ms (stock's switch "
                  f"{impls['stock']['ms']['switch']:.0f} ms, UNet + CLIP); unchanged merges/writes "
                  f"{tuple(p['unchanged_merges_writes'])}; moves {p['moves']}; base cache "
                  f"{p['base_cache_bytes'] / 2**20:.0f} MiB, LoRA cache {p['lora_cache_bytes'] / 2**20:.0f} MiB; RSS "
                  f"{p['rss_bytes'] / 2**30:.2f} GiB"
                  + (f"; peak VRAM {p['peak_vram_bytes'] / 2**30:.2f} GiB" if "peak_vram_bytes" in p else ""))


if __name__ == "__main__":
    main()
