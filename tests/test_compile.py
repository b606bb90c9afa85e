"""torch.compile in the real server (ComfyUI's TorchCompileModel, inductor, CPU): LoRA stacks, strength edits,
Reset Adapters and the compiled plain path switch with zero recompiles after the first compiled prompt, in every
order of the three (every ordered pair occurs in the sequence, which starts once with a stack and once with the
plain path), with the Batch LoRA Loader before or after the compile node; every stack's compiled output matches
the eager run of the same stack and differs between stacks; repeated runs are bit-identical."""
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
# After the first compiled prompt ("one" or "plain"): every ordered pair of (stack, plain path, Reset Adapters)
# occurs, with strength edits and switches between stacks; no prompt repeats the one before it (ComfyUI's cache
# would answer it without running the sampler).
SEQUENCE = ["reset", "plain", "three", "reset", "other", "plain", "three_edited", "one", "three", "plain", "reset",
            "one"]


def prompt(stack, compile_at=None, reset=False):
    """The main job's graph with ``stack`` (None: the plain path, no loader); TorchCompileModel "before" or
    "after" the loader (or none)."""
    p = main_job.prompt_for("three_loras")
    loader = p["2"]["inputs"]
    for k in [k for k in loader if k.startswith("lora_")]:
        del loader[k]
    loader.update(main_job.rows(stack or []))
    model = ["2", 0]
    if stack is None:
        del p["2"]
        p["3"]["inputs"]["clip"] = p["4"]["inputs"]["clip"] = ["1", 1]
        model = ["1", 0]
    if reset:
        p["10"] = {"class_type": "BatchLoraResetAdapters",
                   "inputs": {"model": model, "clip": ["2", 1], "free_cache": False}}
        model = ["10", 0]
        p["3"]["inputs"]["clip"] = p["4"]["inputs"]["clip"] = ["10", 1]
    if compile_at == "after":  # checkpoint -> compile -> loader -> sampler
        p["11"] = {"class_type": "TorchCompileModel", "inputs": {"model": ["1", 0], "backend": "inductor"}}
        if stack is None:
            model = ["11", 0]
        else:
            loader["model"] = ["11", 0]
    elif compile_at == "before":  # checkpoint -> loader -> compile -> sampler
        p["11"] = {"class_type": "TorchCompileModel", "inputs": {"model": model, "backend": "inductor"}}
        model = ["11", 0]
    p[main_job.SAMPLER]["inputs"]["model"] = model
    return p


def named(name, compile_at=None):
    """The prompt of a SEQUENCE entry: a stack name, "plain" or "reset" (Reset Adapters after "three")."""
    if name == "plain":
        return prompt(None, compile_at)
    if name == "reset":
        return prompt(STACKS["three"], compile_at, reset=True)
    return prompt(STACKS[name], compile_at)


@pytest.fixture(scope="module", params=["stack first", "plain first"])
def server(request, tmp_path_factory):
    base = tmp_path_factory.mktemp("compile")
    fx.make_fixtures(base)
    shutil.copytree(ROOT / "tests" / "dynamo_probe", base / "custom_nodes" / "batch_lora_dynamo_probe")
    cache = ROOT / ".cache" / "inductor"  # project folder: later runs reuse compiled kernels
    cache.mkdir(parents=True, exist_ok=True)
    args = ["--fp16-unet", "--use-pytorch-cross-attention"]  # one graph, no breaks (see shared notes)
    with ComfyServer(base, extra_args=args, env={"TORCHINDUCTOR_CACHE_DIR": str(cache),
                                                  "TORCH_LOGS": "recompiles"}) as srv:
        srv.first = request.param
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


def test_switches_on_a_compiled_model_never_recompile(server, capsys):
    names = list(STACKS) + ["plain", "reset"]
    eager = {name: run(server, named(name)) for name in names}
    first = "one" if server.first == "stack first" else "plain"
    compiled = {first: run(server, named(first, "after"))}  # compiles here
    after_first = compile_counts(server)
    assert after_first[1] >= 1
    for name in SEQUENCE:
        latent = run(server, named(name, "after"))
        if name in compiled:
            assert torch.equal(latent, compiled[name]), f"{name}: repeated run differs"
        compiled[name] = latent
    before = {name: run(server, named(name, "before")) for name in ("three", "other", "reset")}
    recompiles = server.log_tail(200000).count("[__recompiles]")
    assert compile_counts(server) == after_first and recompiles == 0, "a switch recompiled:\n" + "\n".join(
        line for line in server.log_tail(200000).splitlines() if "__recompiles" in line)
    errors = {name: rel(compiled[name], eager[name]) for name in compiled}
    errors.update({f"before/{n}": rel(before[n], eager[n]) for n in before})
    with capsys.disabled():
        print(f"\ncompiled ({server.first}) vs eager, relative L2 per stack: "
              + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
              + f"; graphs {after_first[1]}, frames {after_first[0]}, recompiles after the first prompt: 0")
    assert max(errors.values()) < 1e-3
    for i, x in enumerate(names):  # every stack really changes the output, far beyond compile noise
        for y in names[i + 1:]:
            if {x, y} != {"plain", "reset"}:
                assert rel(compiled[x], compiled[y]) > 20 * max(errors.values()), (x, y)
    assert torch.equal(compiled["reset"], compiled["plain"])  # Reset Adapters is the plain path, bit for bit
