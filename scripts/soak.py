"""Soak test: thousands of queued prompts on the real ComfyUI server, every output checked bit for bit.

    python scripts/soak.py [--n 10000] [--seed 0] [--stacks 24] [--threads 1] [--work .work/soak]

1. Generates the tiny SD1.5 checkpoint and LoRA files (scripts/make_fixtures.py), plus one LoRA whose delta
   overflows fp16 (kohya_a x 1000: it fails while baking, possibly after other keys were written).
2. Starts the real server (``--cpu --fp16-unet``, like the main job) and queues ``--n`` prompts through the HTTP
   API, drawn with a seeded RNG (no two consecutive prompts alike, so ComfyUI's cache never answers for the
   sampler). Kinds of prompt:
   - a LoRA stack from a pool of ``--stacks`` seeded stacks (subsets of the fixture LoRAs, strengths from a small
     set, so every stack repeats), with or without the CLIP;
   - the plain path (no loader), an empty stack (every row off) and Reset Adapters after a stack (sometimes with
     ``free_cache``): all three must give the plain path's output;
   - a bad prompt (a missing file, a strength of 1e6 or the fp16-overflow file): it must fail, and the next
     prompts must still give their stack's output.
   Each prompt is cheap: one encode, one sampling step at cfg 1 on a 2x2 latent, no VAE decode.
3. Every output (SaveLatent, read back) is compared bit for bit with the first output of the same stack.
   The server's RSS is sampled after every prompt, and after warm-up and at the end right after a settle prompt
   (all fixture LoRAs on model and CLIP), so both samples hold the same caches. History entries and output
   files are deleted once read.
Prints prompts run, outputs differing, errors, and RSS at start / after warm-up / at end; writes
WORK/soak_report.json. Exits 1 on any differing output, any error, or RSS growth after warm-up >= --rss-limit-mb.
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import make_fixtures as fx  # noqa: E402
from comfy_server import ComfyServer, PromptError, cached_nodes  # noqa: E402

TEMPLATE = json.loads((ROOT / "workflows" / "api" / "batch_lora_txt2img.json").read_text())
LOADER, RESET, SAMPLER, SAVE = "2", "10", "6", "7"
LORAS = (fx.LORA_KOHYA_A, fx.LORA_KOHYA_B, fx.LORA_PEFT_C)
STRENGTHS_MODEL = (-0.5, 0.8, 1.2)
STRENGTHS_CLIP = (0.5, 1.0)
OVERFLOW_LORA = "soak_fp16_overflow.safetensors"
BAD = ("missing_file", "absurd_strength", "fp16_overflow")
PLAIN = ("plain",)  # the stack key of every prompt that must run with the base weights


class PatientServer(ComfyServer):
    """A ComfyServer whose HTTP calls wait up to 10 minutes: a niced soak on a busy machine can stall that long
    between two polls, and a slow answer is not a failure of the pack."""

    def get(self, path, **kw):
        """GET url+path, timeout 600 s unless given."""
        kw.setdefault("timeout", 600)
        return super().get(path, **kw)

    def post(self, path, **kw):
        """POST url+path, timeout 600 s unless given."""
        kw.setdefault("timeout", 600)
        return super().post(path, **kw)


def stack_pool(rng: random.Random, size: int) -> list[tuple]:
    """``size`` distinct stacks: ``((file, strength_model, strength_clip), ...)`` plus whether CLIP is patched."""
    pool, seen = [], set()
    while len(pool) < size:
        files = [f for f in LORAS if rng.random() < 0.6] or [rng.choice(LORAS)]
        stack = (tuple((f, rng.choice(STRENGTHS_MODEL), rng.choice(STRENGTHS_CLIP)) for f in files),
                 rng.random() < 0.5)
        if stack not in seen:
            seen.add(stack)
            pool.append(stack)
    return pool


def prompt_for(kind: str, stack=(), with_clip=True, free_cache=False, tag="soak") -> dict:
    """An API prompt: checkpoint -> [loader] -> [Reset Adapters] -> one encode -> KSampler (1 step, cfg 1,
    2x2 latent) -> SaveLatent. ``kind``: "stack", "plain", "empty", "reset", or one of ``BAD``."""
    p = copy.deepcopy(TEMPLATE)
    del p["8"], p["9"]
    p["5"]["inputs"].update(width=16, height=16)
    del p["4"]  # cfg 1: one encode, one UNet pass per step (the negative is not evaluated)
    p[SAMPLER]["inputs"].update(steps=1, cfg=1.0, negative=["3", 0])
    p[SAVE]["inputs"]["filename_prefix"] = f"soak/{tag}"
    loader = p[LOADER]["inputs"]
    for k in [k for k in loader if k.startswith("lora_")]:
        del loader[k]
    if kind == "missing_file":
        stack = ((fx.LORA_KOHYA_A, 0.8, 1.0), ("soak_no_such_file.safetensors", 1.0, 1.0))
    elif kind == "absurd_strength":
        stack = ((fx.LORA_KOHYA_A, 1e6, 1.0),)
    elif kind == "fp16_overflow":  # the UNet bake fails part way; strength_clip 0 keeps the CLIP out of it
        stack, with_clip = ((fx.LORA_KOHYA_B, 0.8, 1.0), (OVERFLOW_LORA, 5.0, 0.0)), False
    for i, (name, sm, sc) in enumerate(stack):
        loader[f"lora_{i + 1}"] = {"on": kind != "empty", "lora": name, "strength_model": sm, "strength_clip": sc}
    if kind == "empty":
        loader["lora_1"] = {"on": False, "lora": fx.LORA_KOHYA_A, "strength_model": 1.0, "strength_clip": 1.0}
    clip_src = ["2", 1] if with_clip else ["1", 1]
    if kind == "plain":
        del p[LOADER]
        clip_src, model_src = ["1", 1], ["1", 0]
    elif kind == "reset":
        p[RESET] = {"class_type": "BatchLoraResetAdapters",
                    "inputs": {"model": ["2", 0], "clip": ["2", 1], "free_cache": free_cache}}
        clip_src, model_src = ["10", 1], ["10", 0]
    else:
        model_src = ["2", 0]
    if not with_clip and LOADER in p:
        del loader["clip"]
    p["3"]["inputs"]["clip"] = clip_src
    p[SAMPLER]["inputs"]["model"] = model_src
    return p


def draw(rng: random.Random, pool: list, bad_share: float) -> tuple:
    """One prompt: ``(kind, stack key, prompt)``. Stack key: the pool entry, or ``PLAIN``."""
    r = rng.random()
    if r < bad_share:
        kind = BAD[rng.randrange(len(BAD))]
        return kind, kind, prompt_for(kind)
    if r < bad_share + 0.08:
        return "plain", PLAIN, prompt_for("plain")
    if r < bad_share + 0.12:
        return "empty", PLAIN, prompt_for("empty")
    stack, with_clip = pool[rng.randrange(len(pool))]
    if r < bad_share + 0.22:
        free = rng.random() < 0.25
        return f"reset{'+free_cache' if free else ''}", PLAIN, prompt_for("reset", stack, True, free)
    return "stack", (stack, with_clip), prompt_for("stack", stack, with_clip)


def make_overflow_lora(work: Path) -> None:
    """kohya_a with its factors x1000: finite in the file, but its fp16 result overflows while baking."""
    loras = work / "models" / "loras"
    tensors = {k: v.float() * (1000.0 if k.endswith("weight") else 1.0)
               for k, v in load_file(str(loras / fx.LORA_KOHYA_A)).items()}
    save_file(tensors, str(loras / OVERFLOW_LORA))


def settle_prompt() -> tuple:
    """The prompt run right before each RSS sample: all fixture LoRAs on model and CLIP, so both samples are
    taken with the same keys in the base cache and the same files parsed (seed 7: never equal to a drawn one)."""
    stack = tuple((f, 0.8, 1.0) for f in LORAS)
    prompt = prompt_for("stack", stack, True, tag="settle")
    prompt[SAMPLER]["inputs"]["seed"] = 7
    return "settle", ("settle", stack), prompt


def run_soak(work: Path, n: int, seed: int = 0, stacks: int = 24, warmup: int | None = None,
             bad_share: float = 0.03, log_every: int = 100, threads: int | None = 1,
             mmap_threshold: int | None = None) -> dict:
    """Queue ``n`` prompts (plus two settle prompts) on a fresh server over ``work`` (fixtures are generated
    there) and check them. ``threads``: the server's OMP_NUM_THREADS (None: torch's default); one thread keeps a
    long soak steady on a machine whose cores other work shares. ``mmap_threshold`` (bytes): the server's
    glibc MALLOC_MMAP_THRESHOLD_ (None: glibc's dynamic default). glibc raises its threshold each time a large
    block is freed, so after a ``free_cache`` reset the rebuilt base cache (~340 MB) may stay in the heap and
    RSS moves by up to ~80 MB between runs of the same seeded sequence; a fixed threshold hands freed tensors
    back to the OS, so RSS follows live memory within a few MB (README, Robustness).

    Every ``log_every`` prompts the report so far goes to WORK/soak_progress.json (and a line to stdout).
    Returns the report dict: prompts, counts (per kind; queued; compared: outputs checked against an earlier
    one), distinct stacks, differing (list), errors (list),
    expected_failures, rss_bytes (at start, after ``warmup`` prompts (default n // 10, at least 1) and at the
    end, both right after a settle prompt; max), growth_after_warmup_mb (MB = 1e6 bytes), seconds.
    """
    work = Path(work).resolve()
    fx.make_fixtures(work)
    make_overflow_lora(work)
    rng = random.Random(seed)
    pool = stack_pool(rng, stacks)
    warmup = min(n, max(1, n // 10) if warmup is None else warmup)
    first: dict = {}
    counts: dict[str, int] = {}
    differing, errors, rss = [], [], {}
    expected_failures = 0

    def report(done, total, seconds):
        lora_keys = [k for k in first if k != PLAIN]
        return {"prompts": done, "of": total, "seed": seed, "counts": dict(counts),
                "distinct_stacks": len(lora_keys),
                "plain_outputs_distinct_from_stacks": all(not torch.equal(first[k], first[PLAIN])
                                                          for k in lora_keys) if PLAIN in first else None,
                "differing": differing, "errors": errors, "expected_failures": expected_failures,
                "warmup_prompts": warmup, "rss_bytes": dict(rss),
                "growth_after_warmup_mb": (rss["end"] - rss["after_warmup"]) / 1e6 if "end" in rss else None,
                "seconds": seconds}

    def run(server, i, kind, key, prompt):
        nonlocal expected_failures
        counts[kind] = counts.get(kind, 0) + 1
        counts["queued"] = counts.get("queued", 0) + 1
        try:
            entry = server.queue(prompt, timeout=3600)
        except PromptError as exc:
            if kind not in BAD:
                errors.append(f"prompt {i} ({kind}): {exc}"[:2000])
                return
            expected_failures += 1
            if exc.prompt_id:
                server.post("/history", json={"delete": [exc.prompt_id]})
            return
        if kind in BAD:
            errors.append(f"prompt {i} ({kind}): a bad prompt succeeded")
            return
        try:
            if SAMPLER in cached_nodes(entry):
                errors.append(f"prompt {i} ({kind}): KSampler output came from ComfyUI's cache")
            latent = server.read_output_latent(entry, SAVE)
            for path in server.output_files(entry, "latents", SAVE):
                path.unlink()
            server.post("/history", json={"delete": [entry["prompt"][1]]})
        except Exception as exc:  # a malformed result is an error of this prompt, not of the soak
            errors.append(f"prompt {i} ({kind}): {type(exc).__name__}: {exc}"[:2000])
            return
        ref = first.setdefault(key, latent)
        if ref is not latent:
            counts["compared"] = counts.get("compared", 0) + 1
        if not torch.equal(latent, ref):
            diff = float((latent.double() - ref.double()).abs().max()) if latent.shape == ref.shape else None
            differing.append({"prompt": i, "kind": kind, "stack": repr(key), "max_abs_diff": diff})
        rss["max"] = max(rss["max"], server.rss_bytes())

    env = {} if threads is None else {"OMP_NUM_THREADS": str(threads)}
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    with PatientServer(work, extra_args=["--fp16-unet"], env=env, startup_timeout=900) as server:
        rss["start"] = rss["max"] = server.rss_bytes()
        t0 = time.perf_counter()
        previous = None
        for i in range(n):
            kind, key, prompt = draw(rng, pool, bad_share)
            while prompt == previous:  # ComfyUI's cache would answer a repeat without running it
                kind, key, prompt = draw(rng, pool, bad_share)
            previous = prompt
            run(server, i, kind, key, prompt)
            if i + 1 in (warmup, n):
                run(server, i, *settle_prompt())
                previous = None
                for name, at in (("after_warmup", warmup), ("end", n)):
                    if i + 1 == at:
                        rss[name] = server.rss_bytes()
            if (i + 1) % log_every == 0:
                rss["now"] = server.rss_bytes()
                (work / "soak_progress.json").write_text(json.dumps(report(i + 1, n, time.perf_counter() - t0)))
                print(f"  {i + 1}/{n} prompts, {(time.perf_counter() - t0) / (i + 1):.2f} s/prompt, "
                      f"{len(differing)} differing, {len(errors)} errors, RSS {server.rss_bytes() / 2**20:.0f} MiB",
                      flush=True)
        seconds = time.perf_counter() - t0
    return report(n, n, seconds)


def failures(report: dict, rss_limit_mb: float) -> list[str]:
    """The checks a soak run must pass; an empty list means it passed."""
    out = []
    if report["differing"]:
        out.append(f"{len(report['differing'])} outputs differ from their stack's first output")
    if report["errors"]:
        out.append(f"{len(report['errors'])} errors")
    if report["growth_after_warmup_mb"] >= rss_limit_mb:
        out.append(f"RSS grew {report['growth_after_warmup_mb']:.1f} MB after warm-up (limit {rss_limit_mb:g})")
    if report["plain_outputs_distinct_from_stacks"] is False:
        out.append("a LoRA stack gave the plain path's output (the stack had no effect)")
    return out


def main(argv=None) -> int:
    """Run the soak; returns the exit status (1 if any check failed)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10000, help="prompts to queue")
    ap.add_argument("--seed", type=int, default=0, help="seed of the stack pool and the prompt sequence")
    ap.add_argument("--stacks", type=int, default=24, help="distinct LoRA stacks in the pool")
    ap.add_argument("--warmup", type=int, default=None, help="prompts before the warm-up RSS sample (n // 10)")
    ap.add_argument("--rss-limit-mb", type=float, default=50.0, help="max RSS growth after warm-up")
    ap.add_argument("--threads", type=int, default=1, help="server OMP_NUM_THREADS (0: torch's default)")
    ap.add_argument("--mmap-threshold", type=int, default=None,
                    help="server MALLOC_MMAP_THRESHOLD_ in bytes (default: glibc's dynamic threshold)")
    ap.add_argument("--work", type=Path, default=ROOT / ".work" / "soak", help="server base directory")
    args = ap.parse_args(argv)
    print(f"soak: {args.n} prompts on a real ComfyUI server (--cpu --fp16-unet, {args.threads or 'default'} "
          f"threads), seed {args.seed}, "
          f"{args.stacks} stacks, work {args.work}", flush=True)
    report = run_soak(args.work, args.n, args.seed, args.stacks, args.warmup, threads=args.threads or None,
                      mmap_threshold=args.mmap_threshold)
    failed = failures(report, args.rss_limit_mb)
    report["failures"] = failed
    path = args.work.resolve() / "soak_report.json"
    path.write_text(json.dumps(report, indent=2))
    rss = {k: v / 2**20 for k, v in report["rss_bytes"].items()}
    print(f"\nprompts run:        {report['prompts']} (+2 settle prompts) in {report['seconds']:.0f} s "
          f"({report['seconds'] / max(1, report['prompts']):.2f} s/prompt)")
    print(f"kinds:              {json.dumps(report['counts'], sort_keys=True)}")
    print(f"distinct stacks:    {report['distinct_stacks']} (+ the plain path)")
    print(f"outputs differing:  {len(report['differing'])}")
    print(f"errors:             {len(report['errors'])} (bad prompts rejected as expected: "
          f"{report['expected_failures']})")
    print(f"server RSS (MiB):   start {rss['start']:.0f}, after warm-up ({report['warmup_prompts']} prompts) "
          f"{rss['after_warmup']:.0f}, end {rss['end']:.0f}, max {rss['max']:.0f}; growth after warm-up "
          f"{report['growth_after_warmup_mb']:+.1f} MB")
    for line in report["errors"][:5]:
        print("  error: " + line.splitlines()[0])
    print(f"report written to {path}")
    if failed:
        print("FAILED:\n  " + "\n  ".join(failed))
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
