"""SDXL and Flux through the real ComfyUI server: ``UNETLoader`` (small models of the real architectures from
scripts/arch_fixtures.py) -> Batch LoRA Loader -> KSampler -> SaveLatent, queued over HTTP. Their text encoders
(CLIP-G, T5-XXL) are too big for this machine, so a test-only node (tests/comfy_nodes) supplies seeded
conditioning of the right shapes.

Checked per model (the report and the merge itself are checked in-process, tests/test_layouts.py): the LoRA
changes the latent, the same prompt gives the same latent bits every time, Reset Adapters gives the plain path's
latent bit for bit, and the stock ``LoraLoaderModelOnly`` chain's latent is within 2% (of the latent's std) of the
pack's while the LoRA itself moves it by far more (stock and pack round the same fp32 sums in another order).
Flux needs ComfyUI 0.33 (0.3.75 accepts only a 3072-wide Flux); on 0.3.75 that case is skipped, i.e. not run."""
from pathlib import Path

import pytest
import torch

import arch_fixtures as af
from comfy_server import ComfyServer, host_version
from test_layouts import CASES, Case, _m, _write

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[1]

MODELS = {  # arch -> (latent node, conditioning (tokens, width, pooled), LoRA cases of test_layouts)
    "sdxl": ("EmptyLatentImage", (4, 2048, 1280), {"sdxl_kohya.safetensors": {
        "lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k":
            "input_blocks.3.1.transformer_blocks.0.attn2.to_k",
        "lora_unet_input_blocks_3_1_proj_in": "input_blocks.3.1.proj_in"}}),
    "flux1_dev": ("EmptySD3LatentImage", (4, 64, 32), {
        "flux_diffusers.safetensors": "flux1 diffusers (ai-toolkit, diffusers, SimpleTuner)",
        "flux_kohya.safetensors": "flux1 kohya (sd-scripts, musubi-tuner)"}),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("dit_server")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "batch_lora_test_nodes").symlink_to(ROOT / "tests" / "comfy_nodes" /
                                                                 "batch_lora_test_nodes", target_is_directory=True)
    (base / "models" / "diffusion_models").mkdir(parents=True)
    (base / "models" / "loras").mkdir(parents=True)
    with ComfyServer(base) as srv:
        srv.base = base
        yield srv


def _files(server, arch):
    """Write the arch's model and LoRA files into the server's folders (once); returns the LoRA names."""
    latent, _, loras = MODELS[arch]
    model = server.base / "models" / "diffusion_models" / f"{arch}.safetensors"
    if not model.exists():
        af.write(arch, model)
    spec = af.spec(arch)
    for name, what in loras.items():
        case = CASES[what] if isinstance(what, str) else Case(arch, "kohya", 4.0, tuple(
            _m(module, path) for module, path in what.items()))
        shapes = {m.key: spec[m.key[len("diffusion_model."):]] for m in case.modules}
        _write(case, server.base / "models" / "loras" / name, shapes, seed=7)
    return list(loras)


def _prompt(arch, rows=None, stock=None, reset=False, seed=3):
    latent, (tokens, width, pooled), _ = MODELS[arch]
    p = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": f"{arch}.safetensors", "weight_dtype": "default"}},
         "2": {"class_type": "BatchLoraTestConditioning",
               "inputs": {"tokens": tokens, "width": width, "pooled": pooled, "guidance": 3.5, "seed": 1}},
         "3": {"class_type": "BatchLoraTestConditioning",
               "inputs": {"tokens": tokens, "width": width, "pooled": pooled, "guidance": 3.5, "seed": 2}},
         "4": {"class_type": latent, "inputs": {"width": 64, "height": 64, "batch_size": 1}},
         "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"dit_{arch}"}}}
    model = ["1", 0]
    if rows:
        p["10"] = {"class_type": "BatchLoraLoader", "inputs": {"model": model, **{
            f"lora_{i + 1}": {"on": True, "lora": n, "strength_model": s} for i, (n, s) in enumerate(rows)}}}
        model = ["10", 0]
    for i, (n, s) in enumerate(stock or ()):
        p[f"2{i}"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": model, "lora_name": n,
                                                                     "strength_model": s}}
        model = [f"2{i}", 0]
    if reset:
        p["11"] = {"class_type": "BatchLoraResetAdapters", "inputs": {"model": model, "free_cache": False}}
        model = ["11", 0]
    p["5"] = {"class_type": "KSampler", "inputs": {"model": model, "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": seed, "steps": 2, "cfg": 2.0,
                                                   "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
    return p


@pytest.mark.parametrize("arch", list(MODELS))
def test_dit_models_through_the_server(server, arch, capsys):
    version = ".".join(map(str, host_version()[:3]))
    try:
        af.expected_class(arch, version)
    except LookupError as exc:
        pytest.skip(f"not run: {exc}")
    names = _files(server, arch)
    rows = [(n, 0.8 - 0.3 * i) for i, n in enumerate(names)]
    plain = server.read_output_latent(server.queue(_prompt(arch)))
    entry = server.queue(_prompt(arch, rows))
    ours = server.read_output_latent(entry)
    again = server.read_output_latent(server.queue(_prompt(arch, rows)))
    reset = server.read_output_latent(server.queue(_prompt(arch, rows, reset=True)))
    stock = server.read_output_latent(server.queue(_prompt(arch, stock=rows)))
    plain_again = server.read_output_latent(server.queue(_prompt(arch)))
    assert ours.shape == plain.shape and bool(torch.isfinite(ours).all())
    assert torch.equal(ours, again) and torch.equal(reset, plain) and torch.equal(plain_again, plain)
    lora_effect = float((ours - plain).abs().max())
    vs_stock = float((ours - stock).abs().max())
    assert lora_effect > 0.05 * float(plain.std())
    assert vs_stock < 0.02 * float(plain.std()) and vs_stock < 0.1 * lora_effect
    with capsys.disabled():
        print(f"\n[{arch} via server] LoRA moves the latent by {lora_effect:.4g} (max), pack vs stock chain "
              f"{vs_stock:.3g}, plain std {float(plain.std()):.3g}; same bits on repeat; Reset = plain")
