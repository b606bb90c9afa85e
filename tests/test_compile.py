"""torch.compile in the real server (ComfyUI's TorchCompileModel, inductor, CPU): LoRA stacks, strength edits and
Reset Adapters switch with zero recompiles, with the Batch LoRA Loader before or after the compile node; every
stack's compiled output matches the eager run of the same stack and differs between stacks; repeated runs are
bit-identical."""
import shutil
from pathlib import Path

import pytest
import torch

import main_job
import make_fixtures as fx
from comfy_server import ComfyServer, cached_nodes

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[1]
A, B, C = fx.LORA_KOHYA_A, fx.LORA_KOHYA_B, fx.LORA_PEFT_C
STACKS = {
    "one": [(A, 0.8, 1.0)],
    "three": [(A, 0.8, 1.0), (C, 0.6, 0.5), (B, -0.5, 0.7)],
    "three_edited": [(A, 0.8, 1.0), (C, 0.9, 0.5), (B, -0.5, 0.7)],  # a strength edit of "three"
    "other": [(C, 1.2, 0.3), (B, 0.4, 1.1)],
}


def prompt(stack, compile_at=None, reset=False):
    """The main job's graph with ``stack``; TorchCompileModel "before" or "after" the loader (or none)."""
    p = main_job.prompt_for("three_loras")
    loader = p["2"]["inputs"]
    for k in [k for k in loader if k.startswith("lora_")]:
        del loader[k]
    loader.update(main_job.rows(stack))
    model = ["2", 0]
    if reset:
        p["10"] = {"class_type": "BatchLoraResetAdapters",
                   "inputs": {"model": model, "clip": ["2", 1], "free_cache": False}}
        model = ["10", 0]
        p["3"]["inputs"]["clip"] = p["4"]["inputs"]["clip"] = ["10", 1]
    if compile_at == "after":  # checkpoint -> compile -> loader -> sampler
        p["11"] = {"class_type": "TorchCompileModel", "inputs": {"model": ["1", 0], "backend": "inductor"}}
        loader["model"] = ["11", 0]
    elif compile_at == "before":  # checkpoint -> loader -> compile -> sampler
        p["11"] = {"class_type": "TorchCompileModel", "inputs": {"model": model, "backend": "inductor"}}
        model = ["11", 0]
    p[main_job.SAMPLER]["inputs"]["model"] = model
    return p


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("compile")
    fx.make_fixtures(base)
    shutil.copytree(ROOT / "tests" / "dynamo_probe", base / "custom_nodes" / "batch_lora_dynamo_probe")
    cache = ROOT / ".cache" / "inductor"  # project folder: later runs reuse compiled kernels
    cache.mkdir(parents=True, exist_ok=True)
    args = ["--fp16-unet", "--use-pytorch-cross-attention"]  # one graph, no breaks (see shared notes)
    with ComfyServer(base, extra_args=args, env={"TORCHINDUCTOR_CACHE_DIR": str(cache)}) as srv:
        yield srv


def run(server, p):
    entry = server.queue(p, timeout=900)
    assert main_job.SAMPLER not in cached_nodes(entry)
    return server.read_output_latent(entry, main_job.SAVE)


def compile_counts(server):
    c = server.get("/batch_lora_test/dynamo").json()
    return c.get("frames", {}).get("total", 0), c.get("stats", {}).get("unique_graphs", 0)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_stack_switches_on_a_compiled_model_never_recompile(server, capsys):
    eager = {name: run(server, prompt(stack)) for name, stack in STACKS.items()}
    eager["reset"] = run(server, prompt(STACKS["three"], reset=True))
    first = run(server, prompt(STACKS["one"], "after"))  # compiles here
    after_first = compile_counts(server)
    assert after_first[1] >= 1
    compiled = {"one": first}
    order = ["three", "other", "three_edited", "one", "three", "other"]
    for name in order:
        latent = run(server, prompt(STACKS[name], "after"))
        if name in compiled:
            assert torch.equal(latent, compiled[name]), f"{name}: repeated run differs"
        compiled[name] = latent
    compiled["reset"] = run(server, prompt(STACKS["three"], "after", reset=True))
    before = {name: run(server, prompt(STACKS[name], "before")) for name in ("three", "other")}
    assert compile_counts(server) == after_first, "a LoRA switch recompiled"
    errors = {name: rel(compiled[name], eager[name]) for name in compiled}
    errors.update({f"before/{n}": rel(before[n], eager[n]) for n in before})
    with capsys.disabled():
        print("\ncompiled vs eager, relative L2 per stack: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
              + f"; graphs {after_first[1]}, frames {after_first[0]}, recompiles after the first prompt: 0")
    assert max(errors.values()) < 1e-3
    names = list(STACKS) + ["reset"]
    for i, x in enumerate(names):  # every stack really changes the output, far beyond compile noise
        for y in names[i + 1:]:
            assert rel(compiled[x], compiled[y]) > 20 * max(errors.values()), (x, y)
    assert torch.equal(compiled["reset"], run(server, prompt(STACKS["one"], "after", reset=True)))
