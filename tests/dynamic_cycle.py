"""Hundreds of loads under simulated DynamicVRAM (tests/dynamic_sim.py), each checked against the classic patcher.

    python tests/dynamic_cycle.py BASE_DIR --steps 200 [--mapped] [--clip-every 25] [--seed 0] --json OUT

BASE_DIR holds the generated fixtures (models/checkpoints, models/loras). One process loads the tiny SD1.5
checkpoint twice: as ComfyUI's classic ``ModelPatcher`` (the reference: the pack bakes in place) and as
``ModelPatcherDynamic`` (with ``--mapped``: from read-only memory-mapped file pages, as comfy-aimdo loads it; a
write into them kills the process, which is a result).

Then a seeded sequence of steps. Each is one of: a random stack of the fixture LoRAs (kohya, PEFT, LoHa, LoKr,
diff, DoRA) through the Batch LoRA Loader, a strength edit of the previous stack, a second loader chained on it,
the plain path, Reset Adapters on the previous stack (a quarter with free_cache), or a simulated VRAM eviction
followed by the previous step again. At fixed steps it is instead an fp16-overflow prompt (refused when the node
runs, then the plain path), a demotion to the classic patcher (``clone(disable_dynamic=True)``, as
TorchCompileModel does), or ComfyUI's own LoraLoader chained after the pack's loader on the same keys (checked
against the float64 oracle on both patchers).

Every step loads both patchers through ``load_models_gpu`` and compares, for every weighted module of the UNet
(and, every ``--clip-every`` steps, of the text encoder), the weight and bias the layer runs with: dynamic
(through the simulated VRAM slot and ComfyUI's own cast code) against classic, bit for bit. Every
``--sample-every`` steps it also encodes a prompt and samples with both: the latents must be equal bit for bit,
and differ from the plain path's when a stack is on. The plain path and Reset must give the weights as loaded, and
at the end the dynamic model's own tensors must still be those (nobody wrote them). Writes a JSON summary; exits
1 on any difference.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMFYUI_PATH = Path(os.environ.get("COMFYUI_PATH") or ROOT / ".comfyui")
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "tests"), str(COMFYUI_PATH)]

import comfy_aimdo.control  # noqa: E402  (before ComfyUI, as main.py does)

comfy_aimdo.control.init()
import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True
comfy.cli_args.args.fp16_unet = True  # fp16 UNet weights, as GPU users have them
import importlib  # noqa: E402

import torch  # noqa: E402

import comfy.model_management as mm  # noqa: E402
import comfy.sd  # noqa: E402
import folder_paths  # noqa: E402

import dynamic_sim as sim  # noqa: E402
import make_fixtures as fx  # noqa: E402
import pack_alias  # noqa: E402
from comfy_host import UNINITIALISED  # noqa: E402
from soak import OVERFLOW_LORA, make_overflow_lora  # noqa: E402
from oracle import same_bits, ulp  # noqa: E402
from test_host import MANIFEST, oracle  # noqa: E402

pack_alias.register()
pack = importlib.import_module("batch_lora.nodes.nodes")
FuseError = importlib.import_module("batch_lora.core").FuseError
PackPatch = importlib.import_module("batch_lora.nodes.dynamic").PackPatch
comfy_nodes = importlib.import_module("nodes")  # ComfyUI's own top-level nodes module
LORAS = [fx.LORA_KOHYA_A, fx.LORA_KOHYA_B, fx.LORA_PEFT_C, fx.LORA_LOHA, fx.LORA_LOKR, fx.LORA_DIFF, "dora.safetensors"]
STRENGTHS = [-1.0, -0.5, 0.3, 0.6, 0.8, 1.0, 1.3]


def row(name, sm, sc):
    return {"on": True, "lora": name, "strength_model": sm, "strength_clip": sc}


def loader(model, clip, stack):
    out = pack.BatchLoraLoader().apply(model, clip, **{f"lora_{i + 1}": row(*e) for i, e in enumerate(stack)})
    return out[0], out[1]


def layers(torch_model):
    """(name, module) of every module with a weight tensor, except the ones ComfyUI leaves uninitialised (they
    differ between two loads of the same file: ``comfy_host.UNINITIALISED``)."""
    return [(n, m) for n, m in torch_model.named_modules()
            if isinstance(getattr(m, "weight", None), torch.Tensor) and f"{n}.weight" not in UNINITIALISED]


def compare(dyn_model, classic_model) -> list[str]:
    """Names of modules whose weight or bias the layer runs with differs between the two patchers."""
    bad = []
    classic = dict(classic_model.named_modules())
    for name, module in layers(dyn_model):
        ref = classic[name]
        weight, bias = sim.effective(module)
        ref_weight = ref.weight.to(weight.dtype)
        ref_bias = None if ref.bias is None else ref.bias.to(bias.dtype)
        if not same_bits(weight, ref_weight) or (bias is None) != (ref_bias is None) or (
                bias is not None and not same_bits(bias, ref_bias)):
            bad.append(name)
    return bad


def sample(model, clip, seed: int) -> torch.Tensor:
    """ComfyUI's own text encode + KSampler (euler, 2 steps, cfg 2) on a 1x4x8x8 latent: the latent it returns."""
    positive = comfy_nodes.CLIPTextEncode().encode(clip, "a watercolor fox")[0]
    negative = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    return comfy_nodes.common_ksampler(model, seed, 2, 2.0, "euler", "normal", positive, negative, latent)[0]["samples"]


def beyond_two_roundings(patcher, base_dir) -> int:
    """Elements of the weights the layers run with, on the keys kohya_a (pack, 0.8) and peft_c (stock, 0.6)
    share, further from the float64 oracle than two fp16 roundings plus an fp16 computation of the stock LoRA
    (ComfyUI computes it in the weight's dtype on this patcher's cast path)."""
    exact = oracle(base_dir, [(fx.LORA_KOHYA_A, 0.8, 0.0), (fx.LORA_PEFT_C, 0.6, 0.0)])
    rank = fx.LORA_SPECS[fx.LORA_PEFT_C].rank
    count = 0
    for key in MANIFEST[fx.LORA_KOHYA_A].model_keys & MANIFEST[fx.LORA_PEFT_C].model_keys:
        if key.startswith("diffusion_model."):
            weight = sim.effective(patcher.model.get_submodule(key[:-len(".weight")]))[0].double()
            ref, operands = exact[key]
            bound = 2 * ulp(ref, torch.float16) + (rank + 2) * 2.0 ** -11 * operands
            count += int(((weight - ref).abs() > bound).sum())
    return count


def snapshot(torch_model) -> dict:
    """Copies of every module's weight as loaded, before this pack ran (the base)."""
    return {name: module.weight.detach().clone() for name, module in layers(torch_model)}


def off_base(patcher, base: dict, effective: bool) -> list[str]:
    """Modules whose weight differs from ``base`` bit for bit: the weight the layer runs with (in its dtype), or,
    with ``effective=False``, the original parameter (ComfyUI's ``backup`` entry while a patched copy is in
    place, else the parameter itself)."""
    bad = []
    for name, module in layers(patcher.model):
        if effective:
            weight = sim.effective(module)[0]
        else:
            entry = patcher.backup.get(name + ".weight")
            weight = module.weight if entry is None else entry.weight
        if not same_bits(weight, base[name].to(weight.dtype)):
            bad.append(name)
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("base", type=Path)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--mapped", action="store_true")
    ap.add_argument("--clip-every", type=int, default=25)
    ap.add_argument("--sample-every", type=int, default=50, help="also sample (2 steps, 8x8 latent) with both "
                    "patchers on these steps (multiples of --clip-every) and compare the latents")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)
    sim.enable()
    for kind in ("checkpoints", "loras"):
        folder_paths.folder_names_and_paths[kind] = ([str(args.base / "models" / kind)],
                                                     folder_paths.supported_pt_extensions)
    ckpt = str(args.base / "models" / "checkpoints" / fx.CHECKPOINT_NAME)
    if not (args.base / "models" / "loras" / OVERFLOW_LORA).is_file():
        make_overflow_lora(args.base)
    if args.mapped:
        with sim.mapped_load():
            dyn = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=False)[:2]
    else:
        dyn = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=False)[:2]
    with sim.classic():
        ref = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=False)[:2]
    assert dyn[0].is_dynamic() and dyn[1].patcher.is_dynamic() and not ref[0].is_dynamic()
    bases = [snapshot(dyn[0].model), snapshot(dyn[1].cond_stage_model)]
    rng = random.Random(args.seed)
    summary = {"steps": 0, "loads": 0, "mapped": args.mapped, "kinds": {}, "differing": [], "plain_or_reset_off": [],
               "clip_checked": 0, "evictions": 0, "sampled": [], "bad_rejected": [], "demoted": [],
               "stock_composed": []}
    previous = None  # (stack, classic outputs, dynamic outputs)
    t0 = time.perf_counter()
    with torch.inference_mode():
        plain_latent = sample(ref[0], ref[1], seed=0)  # what every sampled stack must differ from
        for step in range(args.steps):
            with_clip = step % args.clip_every == 0
            kind = rng.choice(["stack"] * 4 + ["edit", "chain", "plain", "reset", "evict"]) if previous else "stack"
            if with_clip and kind in ("chain", "reset", "evict") and previous[1][1] is None:
                kind = "stack"  # those reuse the previous step's outputs, which have no text encoder
            if step % 50 == 25:
                kind = "demote"
            elif step % 50 == 40:
                kind = "stock"
            elif step % 50 == 10:
                kind = "bad"
            if kind in ("stock", "demote"):
                with_clip = False
            if kind == "bad":  # an fp16 overflow: refused when the node runs, nothing changes
                try:
                    loader(dyn[0], None, [(fx.LORA_KOHYA_B, 0.8, 1.0), (OVERFLOW_LORA, 5.0, 0.0)])
                except FuseError as exc:
                    summary["bad_rejected"].append(str(exc)[:200])
                kind = "plain"  # and the plain path right after it must be exact
            clip_pair = (dyn[1], ref[1]) if with_clip else (None, None)
            if kind == "stack":
                names = rng.sample(LORAS, rng.randint(1, 4))
                stack = [(n, rng.choice(STRENGTHS), rng.choice(STRENGTHS)) for n in names]
                outs = [loader(m, c, stack) for m, c in ((dyn[0], clip_pair[0]), (ref[0], clip_pair[1]))]
            elif kind == "edit":
                stack = [(n, sm + 0.25, sc) for n, sm, sc in previous[0]]
                outs = [loader(m, c, stack) for m, c in ((dyn[0], clip_pair[0]), (ref[0], clip_pair[1]))]
            elif kind == "chain":
                extra = [n for n in LORAS if n not in {e[0] for e in previous[0]}][:1]
                stack = previous[0] + [(n, 0.5, 0.5) for n in extra]
                outs = [loader(prev[0], prev[1] if with_clip else None, [(n, 0.5, 0.5) for n in extra])
                        for prev in (previous[2], previous[1])]
            elif kind == "plain":
                stack, outs = [], [(dyn[0], clip_pair[0]), (ref[0], clip_pair[1])]
            elif kind == "reset":
                free = rng.random() < 0.25
                stack = []
                outs = [pack.ResetAdapters().reset(free, prev[0], prev[1] if with_clip else None)
                        for prev in (previous[2], previous[1])]
            elif kind == "stock":  # ComfyUI's own LoraLoader chained after the pack's loader, same keys
                stack = [(fx.LORA_KOHYA_A, 0.8, 0.0)]
                outs = [(comfy_nodes.LoraLoader().load_lora(loader(m, None, stack)[0], None, fx.LORA_PEFT_C, 0.6,
                                                            0.0)[0], None) for m in (dyn[0], ref[0])]
            elif kind == "demote":  # as TorchCompileModel on this host: a classic clone of a fresh model
                stack = previous[0]
                demoted = previous[2][0].clone(disable_dynamic=True)
                summary["demoted"].append({"classic": not demoted.is_dynamic(),
                                           "pack_patches_left": sum(isinstance(p[1], PackPatch)
                                                                    for ps in demoted.patches.values() for p in ps)})
                outs = [(demoted, None), (previous[1][0], None)]
            else:  # evict: drop the simulated VRAM, then run the previous step's patchers again
                summary["evictions"] += 1
                sim.evict(dyn[0])
                sim.evict(dyn[1].patcher)
                stack, outs = previous[0], [previous[2], previous[1]]
            (dyn_model, dyn_clip), (ref_model, ref_clip) = outs
            patchers = [[ref_model], [dyn_model]]
            if with_clip:
                patchers[0].append(ref_clip.patcher)
                patchers[1].append(dyn_clip.patcher)
            mm.load_models_gpu(patchers[0])
            mm.load_models_gpu(patchers[1])
            summary["loads"] += 2
            checked = [(dyn_model, ref_model.model, bases[0])]
            if with_clip:
                checked.append((dyn_clip.patcher, ref_clip.cond_stage_model, bases[1]))
                summary["clip_checked"] += 1
            if kind == "stock":
                summary["stock_composed"].append({"dynamic": beyond_two_roundings(dyn_model, args.base),
                                                  "classic": beyond_two_roundings(ref_model, args.base)})
                checked = []  # stock patches are not the pack's: checked against the oracle instead
            for dyn_patcher, ref_torch, base in checked:
                bad = compare(dyn_patcher.model, ref_torch) if kind != "demote" else [
                    name for name, module in layers(dyn_patcher.model)
                    if not same_bits(module.weight, ref_torch.get_submodule(name).weight)]
                if bad:
                    summary["differing"].append({"step": step, "kind": kind, "modules": bad[:5], "n": len(bad)})
                if not stack:
                    off = off_base(dyn_patcher, base, effective=True)
                    if off:
                        summary["plain_or_reset_off"].append({"step": step, "kind": kind, "modules": off[:5]})
            if with_clip and step % args.sample_every == 0:
                latents = [sample(m, c, seed=0) for m, c in ((dyn_model, dyn_clip), (ref_model, ref_clip))]
                summary["sampled"].append({"step": step, "kind": kind, "loras": len(stack),
                                           "equal": same_bits(*latents),
                                           "differs_from_plain": not same_bits(latents[1], plain_latent)})
            summary["kinds"][kind] = summary["kinds"].get(kind, 0) + 1
            summary["steps"] += 1
            if kind in ("stack", "edit", "chain"):
                previous = (stack, (ref_model, ref_clip), (dyn_model, dyn_clip))
            if (step + 1) % 50 == 0:
                print(f"{step + 1}/{args.steps} steps, {time.perf_counter() - t0:.0f} s", flush=True)
        summary["base_written"] = off_base(dyn[0], bases[0], False) + off_base(dyn[1].patcher, bases[1], False)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["merges"] = {type(m).__name__: s.merges for m, s in pack_states()}
    args.json.write_text(json.dumps(summary, indent=1))
    ok = not (summary["differing"] or summary["plain_or_reset_off"] or summary["base_written"]
              or not all(x["equal"] and x["differs_from_plain"] == bool(x["loras"]) for x in summary["sampled"]))
    print(json.dumps(summary))
    return 0 if ok else 1


def pack_states():
    return importlib.import_module("batch_lora.nodes.dynamic").states()


if __name__ == "__main__":
    sys.exit(main())
