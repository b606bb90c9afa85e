"""Every trainer's LoRA layout on small real-architecture models (scripts/arch_fixtures.py) in the real host.

Each case writes one LoRA file the way a trainer names it (the names below are the ones the trainer's code writes;
``nodes/layouts.py`` lists the code read for the names ComfyUI misses) and a hand-written target per module: the
weight key and its rows, derived from the architecture, not from ComfyUI's key maps. Checked per case: the
per-LoRA report (keys, 0 unmatched), the merge against a float64 oracle computed from the file on disk (within one
rounding), and stock ``LoraLoaderModelOnly`` on the same file: where stock maps a module the two agree within one
rounding step; the modules marked ``pack only`` are ones stock leaves unpatched (its "lora key not loaded"), so the
gap is measured, not assumed. A case whose architecture the host cannot load is skipped with the reason. Qwen-Image,
Chroma and Z-Image cannot be made small (ComfyUI's detection fixes their widths): they run at their smallest
detectable size, 0.4-0.9 B parameters, in bf16."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import save_file

import arch_fixtures as af
from comfy_host import load, run_loader
from oracle import beyond_one_rounding, beyond_one_step

pytestmark = pytest.mark.host

H = 128  # hidden width of the small Flux, Wan, HunyuanVideo models
Z_DIM = 3840  # Z-Image's width, fixed by ComfyUI's detection (its smallest detectable model: 909 M parameters)
SUFFIX = {"kohya": (".lora_down.weight", ".lora_up.weight"), "peft": (".lora_A.weight", ".lora_B.weight"),
          "diffsynth": (".lora_A.default.weight", ".lora_B.default.weight"), "xlabs": (".down.weight", ".up.weight")}


@dataclass(frozen=True)
class Module:
    """One LoRA module: its name in the file, the weight key it patches, the rows (None: all) and what stock
    ComfyUI does with it: ``True`` the same merge, ``False`` nothing, ``"lora only"`` the LoRA without its DoRA
    magnitude (stock reads ``dora_scale`` only, not PEFT's ``lora_magnitude_vector``)."""
    name: str
    key: str
    rows: tuple[int, int] | None = None
    stock: bool | str = True


@dataclass(frozen=True)
class Case:
    """A trainer's file: architecture, tensor style (SUFFIX key, or ``lokr``/``dora``/``diff_b``), alpha, modules."""
    arch: str
    style: str
    alpha: float | None
    modules: tuple[Module, ...]


def _m(name, key, rows=None, stock=True):
    return Module(name, f"diffusion_model.{key}.weight" if not key.endswith(".bias") else f"diffusion_model.{key}",
                  rows, stock)


CASES = {
    "flux1 kohya (sd-scripts, musubi-tuner)": Case("flux1_dev", "kohya", 8.0, (
        _m("lora_unet_double_blocks_0_img_attn_qkv", "double_blocks.0.img_attn.qkv"),
        _m("lora_unet_single_blocks_1_linear2", "single_blocks.1.linear2"))),
    "flux1 diffusers (ai-toolkit, diffusers, SimpleTuner)": Case("flux1_dev", "peft", None, (
        _m("transformer.transformer_blocks.0.attn.to_q", "double_blocks.0.img_attn.qkv", (0, H)),
        _m("transformer.transformer_blocks.0.attn.add_v_proj", "double_blocks.0.txt_attn.qkv", (2 * H, H)),
        _m("transformer.single_transformer_blocks.0.proj_mlp", "single_blocks.0.linear1", (3 * H, 4 * H)),
        _m("transformer.transformer_blocks.1.attn.to_out.0", "double_blocks.1.img_attn.proj"))),
    "flux1 OneTrainer": Case("flux1_dev", "kohya", 4.0, (
        _m("lora_transformer_transformer_blocks_0_attn_to_k", "double_blocks.0.img_attn.qkv", (H, H)),)),
    "flux1 SimpleTuner LyCORIS LoKr": Case("flux1_dev", "lokr", None, (
        _m("lycoris_transformer_blocks_0_attn_to_v", "double_blocks.0.img_attn.qkv", (2 * H, H)),)),
    "flux1 XLabs": Case("flux1_dev", "xlabs", None, (
        _m("double_blocks.0.processor.qkv_lora1", "double_blocks.0.img_attn.qkv", stock=False),
        _m("double_blocks.1.processor.proj_lora2", "double_blocks.1.txt_attn.proj", stock=False),
        _m("single_blocks.0.processor.qkv_lora", "single_blocks.0.linear1", (0, 3 * H), stock=False))),
    "flux1 PEFT DoRA": Case("flux1_dev", "dora", None, (
        _m("transformer.transformer_blocks.1.attn.to_k", "double_blocks.1.img_attn.qkv", (H, H), "lora only"),)),
    "flux2 musubi-tuner (Klein img_attn_proj)": Case("flux2_dev", "kohya", 16.0, (
        _m("lora_unet_double_blocks_0_img_attn_proj", "double_blocks.0.img_attn.proj"),
        _m("lora_unet_double_blocks_1_img_attn_qkv", "double_blocks.1.img_attn.qkv"))),
    "flux2 diffusers (ai-toolkit)": Case("flux2_dev", "peft", None, (
        _m("transformer.transformer_blocks.0.attn.to_q", "double_blocks.0.img_attn.qkv", (0, H)),
        _m("transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj", "single_blocks.0.linear1"))),
    "sd3.5 medium kohya + diffusers": Case("sd35_medium", "kohya", 2.0, (
        _m("lora_unet_joint_blocks_0_x_block_attn_qkv", "joint_blocks.0.x_block.attn.qkv"),
        _m("transformer.transformer_blocks.1.attn.to_k", "joint_blocks.1.x_block.attn.qkv", (H, H)))),
    "wan musubi-tuner": Case("wan21_t2v", "kohya", 4.0, (
        _m("lora_unet_blocks_0_self_attn_q", "blocks.0.self_attn.q"),
        _m("lora_unet_blocks_1_ffn_0", "blocks.1.ffn.0"))),
    "wan ComfyUI/ai-toolkit": Case("wan21_t2v", "peft", None, (
        _m("diffusion_model.blocks.0.cross_attn.o", "blocks.0.cross_attn.o"),)),
    "wan DiffSynth": Case("wan21_t2v", "diffsynth", None, (
        _m("blocks.0.self_attn.k", "blocks.0.self_attn.k", stock=False),
        _m("blocks.1.cross_attn.v", "blocks.1.cross_attn.v", stock=False))),
    "wan diffusers": Case("wan21_t2v", "peft", None, (
        _m("transformer.blocks.1.attn1.to_v", "blocks.1.self_attn.v", stock=False),
        _m("transformer.blocks.0.ffn.net.2", "blocks.0.ffn.2", stock=False),
        _m("transformer.blocks.1.attn2.to_out.0", "blocks.1.cross_attn.o", stock=False))),
    "wan i2v diffusers k_img": Case("wan21_i2v", "peft", None, (
        _m("transformer.blocks.0.attn2.add_k_proj", "blocks.0.cross_attn.k_img", stock=False),)),
    "wan animate k_img.diff_b": Case("wan21_i2v", "diff_b", None, (
        _m("diffusion_model.blocks.0.cross_attn.k_img", "blocks.0.cross_attn.k_img.bias"),)),
    "hunyuan video musubi-tuner": Case("hunyuan_video", "kohya", 2.0, (
        _m("lora_unet_double_blocks_0_img_attn_qkv", "double_blocks.0.img_attn.qkv"),
        _m("lora_unet_single_blocks_1_linear1", "single_blocks.1.linear1"))),
    "qwen-image diffusers (ai-toolkit)": Case("qwen_image", "peft", None, (
        _m("transformer.transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_q"),
        _m("transformer.transformer_blocks.0.img_mlp.net.2", "transformer_blocks.0.img_mlp.net.2"))),
    "qwen-image DiffSynth": Case("qwen_image", "diffsynth", None, (
        _m("transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.attn.add_k_proj"),)),
    "chroma kohya (distilled_guidance_layer)": Case("chroma", "kohya", 8.0, (
        _m("lora_unet_distilled_guidance_layer_layers_0_in_layer", "distilled_guidance_layer.layers.0.in_layer"),
        _m("lora_unet_double_blocks_0_img_attn_qkv", "double_blocks.0.img_attn.qkv"))),
    "z-image musubi-tuner (ComfyUI issue 11487)": Case("z_image", "kohya", 4.0, (
        _m("lora_unet_layers_0_attention_to_q", "layers.0.attention.qkv", (0, Z_DIM), stock=False),
        _m("diffusion_model.layers.0.attention.to_v", "layers.0.attention.qkv", (2 * Z_DIM, Z_DIM)))),
    "ltxv diffusers": Case("ltxv", "peft", None, (
        _m("transformer.transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_q", stock=False),
        _m("transformer.transformer_blocks.1.ff.net.0.proj", "transformer_blocks.1.ff.net.0.proj", stock=False))),
}
STRENGTH = 0.75


def _randn(shape, seed, std):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * std


def _write(case: Case, path, shapes: dict, seed: int) -> dict:
    """Write the case's file; returns ``{module name: float64 delta at strength 1 (slice rows), |operand|}``
    computed from the tensors as written (bf16), by each format's definition."""
    tensors, deltas = {}, {}
    rank = 4
    for i, m in enumerate(case.modules):
        out, n_in = shapes[m.key][0], (shapes[m.key][1] if len(shapes[m.key]) > 1 else None)
        rows = m.rows[1] if m.rows else out
        seed += 10
        if case.style == "diff_b":
            diff = _randn((rows,), seed, 0.02).to(torch.bfloat16)
            tensors[m.name + ".diff_b"] = diff
            deltas[m.name] = (diff.double(), diff.double().abs())
            continue
        if case.style == "lokr":
            w1, w2 = _randn((2, 4), seed, 0.3).to(torch.bfloat16), _randn((rows // 2, n_in // 4), seed + 1, 0.05)
            w2 = w2.to(torch.bfloat16)
            tensors[m.name + ".lokr_w1"], tensors[m.name + ".lokr_w2"] = w1, w2
            d = torch.kron(w1.double(), w2.double())
            deltas[m.name] = (d, torch.kron(w1.double().abs(), w2.double().abs()))
            continue
        down_sfx, up_sfx = SUFFIX["peft" if case.style == "dora" else case.style]
        down = _randn((rank, n_in), seed, n_in ** -0.5).to(torch.bfloat16)
        up = _randn((rows, rank), seed + 1, 0.05).to(torch.bfloat16)
        tensors[m.name + down_sfx], tensors[m.name + up_sfx] = down, up
        scale = 1.0 if case.alpha is None else case.alpha / rank
        if case.alpha is not None:
            tensors[m.name + ".alpha"] = torch.tensor(case.alpha)
        d = scale * up.double() @ down.double()
        deltas[m.name] = (d, scale * up.double().abs() @ down.double().abs())
        if case.style == "dora":
            magnitude = (_randn((rows,), seed + 2, 0.1) + 1.5).to(torch.bfloat16)
            tensors[m.name + ".lora_magnitude_vector"] = magnitude
            deltas[m.name] = (d, magnitude)  # resolved against the base in _oracle
    save_file(tensors, str(path))
    return deltas


def _oracle(case: Case, base: dict, deltas: dict) -> tuple[dict, dict]:
    exact = {k: w.double().clone() for k, w in base.items()}
    mag = {k: w.double().abs() for k, w in base.items()}
    for m in case.modules:
        r0, n = m.rows or (0, base[m.key].shape[0])
        w0 = base[m.key].double()[r0:r0 + n]
        d, dmag = deltas[m.name]
        if case.style == "dora":  # PEFT DoRA: W' = m * V / ||V|| per output row, V = W0 + delta
            v = w0 + d
            d = dmag.double()[:, None] * v / (v.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps) - w0
            dmag = (d.abs() + w0.abs()) * 4
        exact[m.key][r0:r0 + n] += STRENGTH * d
        mag[m.key][r0:r0 + n] += STRENGTH * dmag
    return exact, mag


@pytest.fixture(scope="module")
def version(comfy_host):
    import comfyui_version
    return comfyui_version.__version__


@pytest.mark.parametrize("name", list(CASES))
def test_trainer_layout_report_oracle_and_stock(comfy_host, fixtures_dir, version, name, capsys):
    h = comfy_host
    case = CASES[name]
    try:
        expected = af.expected_class(case.arch, version)
    except LookupError as exc:
        pytest.skip(f"not run: {exc}")
    model = af.load(h.comfy, case.arch, torch.bfloat16)
    assert type(model.model.model_config).__name__ == expected
    keys = sorted({m.key for m in case.modules})
    params = dict(model.model.named_parameters())
    base = {k: params[k].detach().clone() for k in keys}
    index = list(CASES).index(name)
    file = f"layout_{index}_{case.arch}.safetensors"
    deltas = _write(case, fixtures_dir / "models" / "loras" / file, {k: tuple(v.shape) for k, v in base.items()},
                    seed=1000 * index)
    h.folder_paths.filename_list_cache.pop("loras", None)
    exact, mag = _oracle(case, base, deltas)

    ours, _, report = run_loader(h, model, None, {"on": True, "lora": file, "strength_model": STRENGTH})
    load(h, ours)
    live = {k: dict(ours.model.named_parameters())[k].detach().clone() for k in keys}
    stock = h.nodes.LoraLoaderModelOnly().load_lora_model_only(model, file, STRENGTH)[0]
    load(h, stock)
    stock_w = {k: dict(stock.model.named_parameters())[k].detach().clone() for k in keys}
    load(h, model)

    line = report.split("\n")[1]
    assert f"unet {len(keys)} keys, clip 0 keys, 0 unmatched" in line, line
    for key in keys:
        assert beyond_one_rounding(live[key], exact[key], mag[key]) == 0, key
        assert not torch.equal(live[key], base[key]), key
    identical = total = 0
    for m in case.modules:
        r0, n = m.rows or (0, base[m.key].shape[0])
        s, b = stock_w[m.key][r0:r0 + n], base[m.key][r0:r0 + n]
        if m.stock == "lora only":
            plain = b.double() + STRENGTH * deltas[m.name][0]
            assert beyond_one_rounding(s, plain, (b.double().abs() + deltas[m.name][0].abs()) * 4) == 0, m.name
            assert beyond_one_rounding(live[m.key][r0:r0 + n], plain, mag[m.key][r0:r0 + n]) > 0, m.name
        elif m.stock:
            assert beyond_one_step(live[m.key][r0:r0 + n], s, mag[m.key][r0:r0 + n]) == 0, m.name
            identical += int((live[m.key][r0:r0 + n] == s).sum())
            total += s.numel()
        else:
            assert torch.equal(s, b), f"stock now maps {m.name}: mark it stock=True"
    with capsys.disabled():
        pack_only = [m.name for m in case.modules if m.stock is False]
        print(f"\n[{name}] {line.split('  (')[0].split('  ', 2)[-1]}; vs stock: {identical}/{total} identical"
              + (f"; stock leaves {len(pack_only)} of {len(case.modules)} modules unpatched" if pack_only else "")
              + ("; stock applies the LoRA without its DoRA magnitude" if case.style == "dora" else ""))
