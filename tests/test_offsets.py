"""Offset patches (LoRA modules on row slices of fused weights) inside the real ComfyUI host, both hosts.

The model is ComfyUI's own SD3 (``supported_models.SD3``, MMDiT with 2 joint blocks, hidden 128: 1.1 M
parameters) built in memory; its q/k/v projections are one fused ``qkv`` weight per attention (``[3h, h]``).
ComfyUI maps the separate ``to_q``/``to_k``/``to_v`` (``add_q_proj``... for the context stream) that diffusers,
PEFT, ai-toolkit, SimpleTuner and musubi-style kohya names carry onto thirds of it (comfy/utils.py
``mmdit_to_diffusers``). Three files in three trainers' layouts put several slices and whole-weight terms on the
same keys. Checked: the report counts keys and slices, the merge equals a float64 oracle computed from the files
with a hand-written slice table (not ComfyUI's), it agrees with stock ``LoraLoaderModelOnly`` within one rounding
step (identical elements counted), rows no LoRA touches keep their bits, and Reset restores every key exactly."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_host import load, run_loader
from oracle import beyond_one_rounding, beyond_one_step, same_bits

pytestmark = pytest.mark.host

H = 128  # hidden size: MMDiT's is 64 * depth
UNET_CONFIG = dict(in_channels=16, out_channels=16, patch_size=2, depth=2, adm_in_channels=64, num_patches=64,
                   context_embedder_config={"target": "torch.nn.Linear",
                                            "params": {"in_features": 64, "out_features": H}},
                   pos_embed_max_size=8, pos_embed_scaling_factor=None)
QKV = "diffusion_model.joint_blocks.{}.{}_block.attn.qkv.weight"
PROJ = "diffusion_model.joint_blocks.{}.x_block.attn.proj.weight"


def _targets(block: int, names: dict) -> dict:
    """module name -> (weight key, first row, rows) for one joint block, from the MMDiT layout: q, k, v are rows
    ``0:h``, ``h:2h``, ``2h:3h`` of the stream's qkv weight; ``to_out.0`` is the whole x-stream proj."""
    out = {}
    for module, (stream, third) in names.items():
        out[module.format(block)] = ((QKV.format(block, stream), third * H, H) if third is not None
                                     else (PROJ.format(block), 0, H))
    return out


DIFFUSERS = {**_targets(0, {"transformer.transformer_blocks.{}.attn.to_q": ("x", 0),
                            "transformer.transformer_blocks.{}.attn.to_k": ("x", 1),
                            "transformer.transformer_blocks.{}.attn.to_v": ("x", 2),
                            "transformer.transformer_blocks.{}.attn.add_k_proj": ("context", 1),
                            "transformer.transformer_blocks.{}.attn.to_out.0": ("x", None)}),
             **_targets(1, {"transformer.transformer_blocks.{}.attn.to_q": ("x", 0)})}
KOHYA = _targets(0, {"lora_transformer_transformer_blocks_{}_attn_to_q": ("x", 0),
                     "lora_transformer_transformer_blocks_{}_attn_to_v": ("x", 2),
                     "lora_transformer_transformer_blocks_{}_attn_to_out_0": ("x", None)})
LYCORIS = _targets(0, {"lycoris_transformer_blocks_{}_attn_to_k": ("x", 1)})
FILES = {  # name: (modules, tensor suffixes (down, up), rank, alpha, strength)
    "sd3_diffusers.safetensors": (DIFFUSERS, (".lora_A.weight", ".lora_B.weight"), 4, None, 0.9),
    "sd3_kohya.safetensors": (KOHYA, (".lora_down.weight", ".lora_up.weight"), 8, 4.0, -0.6),
    "sd3_lycoris.safetensors": (LYCORIS, (".lora_down.weight", ".lora_up.weight"), 2, 2.0, 1.3),
}


def _randn(shape, seed, std):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * std


def _write_files(loras) -> dict:
    written = {}
    for f, (name, (modules, (down, up), rank, alpha, _)) in enumerate(FILES.items()):
        tensors = {}
        for i, module in enumerate(modules):
            tensors[module + down] = _randn((rank, H), 1000 * f + 2 * i, H ** -0.5).to(torch.bfloat16)
            tensors[module + up] = _randn((H, rank), 1000 * f + 2 * i + 1, 0.05).to(torch.bfloat16)
            if alpha is not None:
                tensors[module + ".alpha"] = torch.tensor(alpha)
        save_file(tensors, str(loras / name))
        written[name] = load_file(str(loras / name))
    return written


def _oracle(base: dict, files: dict) -> tuple[dict, dict]:
    """float64 merged weights and operand magnitudes per key: ``W0 + sum s * alpha/r * up @ down`` on each
    module's rows, from the files' tensors and the slice table above."""
    exact = {k: w.double().clone() for k, w in base.items()}
    mag = {k: w.double().abs() for k, w in base.items()}
    for name, (modules, (down, up), rank, alpha, strength) in FILES.items():
        for module, (key, row0, rows) in modules.items():
            a, b = files[name][module + down].double(), files[name][module + up].double()
            scale = strength * (1.0 if alpha is None else alpha / rank)
            exact[key][row0:row0 + rows] += scale * b @ a
            mag[key][row0:row0 + rows] += abs(scale) * b.abs() @ a.abs()
    return exact, mag


@pytest.fixture(scope="module")
def sd3(comfy_host):
    h = comfy_host
    import comfy.model_patcher
    import comfy.supported_models

    def make(dtype):
        config = comfy.supported_models.SD3(dict(UNET_CONFIG))
        config.set_inference_dtype(dtype, None)
        model = config.get_model({})
        with torch.no_grad():
            for i, p in enumerate(model.parameters()):
                p.copy_(_randn(p.shape, i, 0.05))
        return comfy.model_patcher.ModelPatcher(model, load_device=h.mm.get_torch_device(),
                                                offload_device=h.mm.unet_offload_device())
    return make


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_offset_patches_fused_against_oracle_and_stock(comfy_host, fixtures_dir, sd3, dtype, capsys):
    h = comfy_host
    loras = fixtures_dir / "models" / "loras"
    files = _write_files(loras)
    h.folder_paths.filename_list_cache.pop("loras", None)
    model = sd3(dtype)
    assert type(model.model.model_config).__name__ == "SD3"
    keys = sorted({key for modules, *_ in FILES.values() for key, _, _ in modules.values()})
    base = {k: model.model.get_parameter(k).detach().clone() for k in keys}
    exact, mag = _oracle(base, files)
    rows = [{"on": True, "lora": n, "strength_model": s, "strength_clip": s} for n, (*_, s) in FILES.items()]
    with torch.inference_mode():
        ours, _, report = run_loader(h, model, None, *rows)
        load(h, ours)
        live = {k: ours.model.get_parameter(k).detach().clone() for k in keys}
        stock = model
        for name, (*_, s) in FILES.items():
            stock = h.nodes.LoraLoaderModelOnly().load_lora_model_only(stock, name, s)[0]
        load(h, stock)
        stock_w = {k: stock.model.get_parameter(k).detach().clone() for k in keys}
    assert report.split("\n")[1:] == [
        "sd3_diffusers.safetensors  model 0.9 clip 0.9  unet 4 keys, clip 0 keys, 0 unmatched  "
        "(for SD3; lora 6; 5 on slices of fused weights)",
        "sd3_kohya.safetensors  model -0.6 clip -0.6  unet 2 keys, clip 0 keys, 0 unmatched  "
        "(for SD3; lora 3; 2 on slices of fused weights)",
        "sd3_lycoris.safetensors  model 1.3 clip 1.3  unet 1 keys, clip 0 keys, 0 unmatched  "
        "(for SD3; lora 1; 1 on slices of fused weights)"]
    total = identical = 0
    for key in keys:
        assert beyond_one_rounding(live[key], exact[key], mag[key]) == 0, key
        assert beyond_one_step(live[key], stock_w[key], mag[key]) == 0, key
        total += live[key].numel()
        identical += int((live[key] == stock_w[key]).sum())
        touched = (exact[key] != base[key].double()).any(dim=1)
        assert same_bits(live[key][~touched], base[key][~touched]), key  # e.g. the context qkv's q and v rows
        assert not torch.equal(live[key][touched], base[key][touched]), key
    with capsys.disabled():
        print(f"\n[{dtype}] offset patches vs stock LoraLoaderModelOnly: {identical}/{total} elements identical "
              f"({100 * identical / total:.2f}%), the rest within one rounding step")
    with torch.inference_mode():
        reset = h.pack.ResetAdapters().reset(False, model=ours)[0]
        load(h, reset)
    for key in keys:
        assert same_bits(reset.model.get_parameter(key), base[key]), key
