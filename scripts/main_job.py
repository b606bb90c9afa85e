"""The main job: a real headless ComfyUI with this pack, hundreds of queued prompts, and a drift report.

    python scripts/main_job.py [--runs 300] [--work .work/main-job]

1. Generates the tiny SD1.5 checkpoint and LoRA files (kohya + PEFT) into the work folder.
2. Starts the real ComfyUI server on 127.0.0.1 with this pack and fp16 UNet weights (``--fp16-unet``).
3. Queues ``--runs`` prompts through the HTTP API, cycling through five cases with fixed seeds: one LoRA; three
   LoRAs mixing kohya and PEFT files; the same three with other strengths; a plain path; Reset Adapters.
4. Prints, per case, the number of distinct latent hashes (must be 1) and the max |difference| from the case's
   first latent (must be 0); checks that Reset Adapters gives the plain path's latent bit for bit; restarts the
   server and checks that a fresh process gives the same latents.
5. Beside it, the naive load/apply/unload cycle (fuse by adding the delta, unfuse by subtracting it, in the
   model's fp16) on the same weights and LoRAs, showing the weight error it accumulates with the cycle count, and
   the same cycles through this pack's core (error 0).
Exits 1 if any case drifted or a check failed. Writes the report as JSON to WORK/drift_report.json.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import make_fixtures as fx  # noqa: E402
import pack_alias  # noqa: E402
from comfy_server import ComfyServer, cached_nodes, device_flags, host_version  # noqa: E402

pack_alias.register()
from batch_lora.core import InPlacePatcher, LoraFactors  # noqa: E402

TEMPLATE = json.loads((ROOT / "workflows" / "api" / "batch_lora_txt2img.json").read_text())
SAMPLER, SAVE = "6", "7"
THREE = [(fx.LORA_KOHYA_A, 0.8, 1.0), (fx.LORA_PEFT_C, 0.6, 0.5), (fx.LORA_KOHYA_B, -0.5, 0.7)]
THREE_OTHER = [(fx.LORA_KOHYA_A, 1.2, 0.4), (fx.LORA_PEFT_C, 0.3, 1.1), (fx.LORA_KOHYA_B, 0.9, 0.2)]


def rows(stack):
    """Loader row inputs ``lora_1..`` for ``[(file, strength_model, strength_clip)]``."""
    return {f"lora_{i + 1}": {"on": True, "lora": n, "strength_model": sm, "strength_clip": sc}
            for i, (n, sm, sc) in enumerate(stack)}


def prompt_for(case: str) -> dict:
    """The API-format prompt of one case, built from workflows/api/batch_lora_txt2img.json (latent only)."""
    p = copy.deepcopy(TEMPLATE)
    del p["8"], p["9"]  # the drift check compares latents; decoding adds nothing to it
    loader = p["2"]["inputs"]
    for k in [k for k in loader if k.startswith("lora_")]:
        del loader[k]
    if case == "one_lora":
        loader.update(rows(THREE[:1]))
    elif case == "three_loras":
        loader.update(rows(THREE))
    elif case == "three_loras_other_strengths":
        loader.update(rows(THREE_OTHER))
    elif case == "plain":  # checkpoint -> KSampler, no loader at all
        del p["2"]
        p["3"]["inputs"]["clip"] = p["4"]["inputs"]["clip"] = ["1", 1]
        p[SAMPLER]["inputs"]["model"] = ["1", 0]
    elif case == "reset":  # the three LoRAs, then Reset Adapters
        loader.update(rows(THREE))
        p["10"] = {"class_type": "BatchLoraResetAdapters",
                   "inputs": {"model": ["2", 0], "clip": ["2", 1], "free_cache": False}}
        p["3"]["inputs"]["clip"] = p["4"]["inputs"]["clip"] = ["10", 1]
        p[SAMPLER]["inputs"]["model"] = ["10", 0]
    else:
        raise ValueError(case)
    p[SAVE]["inputs"]["filename_prefix"] = f"drift/{case}"
    return p


CASES = ["one_lora", "three_loras", "three_loras_other_strengths", "plain", "reset"]


def run_server(work: Path, runs: int, restart_check: bool) -> dict:
    """Queue ``runs`` prompts (cases in turn) on a fresh server over ``work``; with ``restart_check`` run every
    case once more on a second fresh process. Returns latents per case, errors, seconds and server RSS."""
    results = {c: [] for c in CASES}
    errors = []
    with ComfyServer(work, extra_args=["--fp16-unet"]) as server:
        rss_start = server.rss_bytes()
        t0 = time.perf_counter()
        for i in range(runs):
            case = CASES[i % len(CASES)]
            entry = server.queue(prompt_for(case))
            if SAMPLER in cached_nodes(entry):
                errors.append(f"run {i} ({case}): KSampler output came from ComfyUI's cache, not a real run")
            latent = server.read_output_latent(entry, SAVE)
            results[case].append(latent)
            if (i + 1) % 50 == 0 or i + 1 == runs:
                print(f"  {i + 1}/{runs} prompts, {(time.perf_counter() - t0) / (i + 1):.2f} s/prompt", flush=True)
        elapsed = time.perf_counter() - t0
        rss_end = server.rss_bytes()
    fresh = {}
    if restart_check:
        with ComfyServer(work, extra_args=["--fp16-unet"]) as server:
            for case in CASES:
                fresh[case] = server.read_output_latent(server.queue(prompt_for(case)), SAVE)
    return {"latents": results, "fresh": fresh, "errors": errors, "seconds": elapsed,
            "rss_start": rss_start, "rss_end": rss_end}


def digest(t: torch.Tensor) -> str:
    """First 16 hex digits of the sha256 of a tensor's bytes."""
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def drift_table(server: dict) -> tuple[list[dict], list[str]]:
    """Per case: runs, distinct latent hashes, max |diff| from the first latent, fresh-process identity; and the
    list of failed checks (drift, fresh process differs, NaN, Reset != plain, stacks without effect)."""
    table, failures = [], list(server["errors"])
    for case, latents in server["latents"].items():
        first = latents[0]
        hashes = {digest(t) for t in latents}
        max_diff = max(float((t.double() - first.double()).abs().max()) for t in latents)
        fresh = server["fresh"].get(case)
        same_fresh = None if fresh is None else bool(torch.equal(fresh, first))
        table.append({"case": case, "runs": len(latents), "distinct_hashes": len(hashes), "max_abs_diff": max_diff,
                      "fresh_process_identical": same_fresh, "hash": digest(first),
                      "finite": bool(torch.isfinite(first).all())})
        if len(hashes) != 1 or max_diff != 0.0:
            failures.append(f"{case}: {len(hashes)} distinct latents, max |diff| {max_diff:g}")
        if same_fresh is False:
            failures.append(f"{case}: a fresh server process gave a different latent")
        if not table[-1]["finite"]:
            failures.append(f"{case}: latent has NaN/Inf")
    lat = server["latents"]
    if not torch.equal(lat["reset"][0], lat["plain"][0]):
        failures.append("Reset Adapters latent differs from the plain path's latent")
    if torch.equal(lat["three_loras"][0], lat["plain"][0]) or torch.equal(lat["three_loras"][0],
                                                                          lat["three_loras_other_strengths"][0]):
        failures.append("the LoRA stacks did not change the output")
    return table, failures


def naive_cycles(work: Path, cycles: int = 1000) -> list[dict]:
    """The load/apply/unload cycle of the server run, on the fp16 UNet weights the LoRA cases touch, done two ways:
    naive (fuse: W16 = round(W16 + delta), unfuse: W16 = round(W16 - delta), fp32 math on fp16 storage, as
    diffusers/PEFT unfuse and OneDiff do) and through this pack's core (W16 = round(base32 + delta), then an exact
    restore). Cycle i uses the stack of LoRA case i mod 3. Errors are against the weights as loaded."""
    ckpt = load_file(str(work / "models" / "checkpoints" / fx.CHECKPOINT_NAME))
    manifest = fx.lora_manifest()
    files = {name: load_file(str(work / "models" / "loras" / name)) for name, _, _ in THREE}
    module, attrs = torch.nn.Module(), {}
    stacks = []
    for case in (THREE[:1], THREE, THREE_OTHER):
        stack = {}
        for name, sm, _ in case:
            info = manifest[name]
            down_sfx, up_sfx = fx.factor_suffixes(info.style)
            for m in info.modules:
                if not m.model_key.startswith("diffusion_model."):
                    continue
                if m.model_key not in attrs:
                    attrs[m.model_key] = f"w{len(attrs)}"
                    module.register_parameter(attrs[m.model_key], torch.nn.Parameter(
                        ckpt[m.checkpoint_key].half(), requires_grad=False))
                t = files[name]
                f = LoraFactors.from_tensors(t[m.lora_name + up_sfx], t[m.lora_name + down_sfx], info.alpha,
                                             f"{name}#{m.model_key}")
                stack.setdefault(attrs[m.model_key], []).append((sm, f))
        stacks.append(stack)
    deltas = [{k: sum(s * f.scale * (f.up.float() @ f.down.float()) for s, f in terms).reshape(
        module.get_parameter(k).shape) for k, terms in stack.items()} for stack in stacks]  # fp32, as the pack
    base = {k: v.detach().clone() for k, v in module.named_parameters()}
    naive = {k: v.clone() for k, v in base.items()}
    patcher = InPlacePatcher(module)
    out, n_elems = [], sum(v.numel() for v in base.values())
    checkpoints = sorted({c for c in (1, 10, 100, 300, 1000, cycles) if c <= cycles})
    for cycle in range(1, cycles + 1):
        delta = deltas[(cycle - 1) % len(deltas)]
        for k, d in delta.items():
            naive[k].copy_((naive[k].float() + d).half())
            naive[k].copy_((naive[k].float() - d).half())
        patcher.apply(stacks[(cycle - 1) % len(stacks)])
        patcher.reset()
        if cycle in checkpoints:
            err = max(float((naive[k].float() - base[k].float()).abs().max()) for k in base)
            mean = sum(float((naive[k].float() - base[k].float()).abs().sum()) for k in base) / n_elems
            changed = sum(int((naive[k] != base[k]).sum()) for k in base)
            ours = max(float((module.get_parameter(k).float() - base[k].float()).abs().max()) for k in base)
            out.append({"cycles": cycle, "naive_max_abs_err": err, "naive_mean_abs_err": mean,
                        "naive_elements_changed": changed, "naive_elements_total": n_elems, "pack_max_abs_err": ours})
    return out


def main(argv=None) -> int:
    """Run the main job; returns the exit status (1 if any check failed)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=300, help="prompts to queue (>= 5; cycles through the 5 cases)")
    ap.add_argument("--work", type=Path, default=ROOT / ".work" / "main-job", help="server base directory")
    ap.add_argument("--naive-cycles", type=int, default=1000, help="cycles of the naive-vs-pack comparison")
    ap.add_argument("--no-restart-check", action="store_true", help="skip the second, fresh server process")
    args = ap.parse_args(argv)
    work = args.work.resolve()
    t0 = time.perf_counter()
    fx.make_fixtures(work)
    print(f"fixtures ready in {time.perf_counter() - t0:.1f} s under {work}/models")
    flags = " ".join(["--fp16-unet"] + device_flags())
    print(f"queueing {args.runs} prompts on a real ComfyUI {'.'.join(map(str, host_version()))} server "
          f"({flags}) ...", flush=True)
    server = run_server(work, args.runs, not args.no_restart_check)
    table, failures = drift_table(server)
    print(f"running {args.naive_cycles} naive and pack fuse/unfuse cycles in-process ...", flush=True)
    naive = naive_cycles(work, args.naive_cycles)

    print(f"\nDrift report: {args.runs} prompts in {server['seconds']:.0f} s, server RSS "
          f"{server['rss_start'] / 2**20:.0f} -> {server['rss_end'] / 2**20:.0f} MiB")
    print(f"{'case':<30}{'runs':>6}{'distinct hashes':>17}{'max |diff|':>12}{'fresh process':>15}  latent sha256")
    for r in table:
        fresh = {None: "-", True: "identical", False: "DIFFERENT"}[r["fresh_process_identical"]]
        print(f"{r['case']:<30}{r['runs']:>6}{r['distinct_hashes']:>17}{r['max_abs_diff']:>12g}{fresh:>15}  {r['hash']}")
    print("\nNaive fuse/unfuse (W16 = round(W16 + delta); W16 = round(W16 - delta)) vs this pack "
          "(W16 = round(base32 + delta); restore base), same fp16 UNet weights and three LoRAs:")
    print(f"{'cycles':>8}{'naive max |W-W0|':>18}{'naive mean |W-W0|':>19}{'naive elements drifted':>26}"
          f"{'pack max |W-W0|':>18}")
    for r in naive:
        print(f"{r['cycles']:>8}{r['naive_max_abs_err']:>18.3e}{r['naive_mean_abs_err']:>19.3e}"
              f"{r['naive_elements_changed']:>14}/{r['naive_elements_total']:<11}{r['pack_max_abs_err']:>18g}")
    if naive[-1]["pack_max_abs_err"] != 0.0:
        failures.append("the pack's own apply/reset cycle drifted")
    report = {"host": ".".join(map(str, host_version())), "server_flags": flags, "runs": args.runs, "cases": table, "naive_vs_pack": naive, "failures": failures,
              "seconds": server["seconds"], "rss_start": server["rss_start"], "rss_end": server["rss_end"]}
    (work / "drift_report.json").write_text(json.dumps(report, indent=2))
    print(f"\nreport written to {work / 'drift_report.json'}")
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("OK: every case gave one latent hash and 0 difference over all its runs; Reset Adapters == plain path.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
