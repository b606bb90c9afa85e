"""SDXL at the key-map level, inside the real ComfyUI host: an SDXL model built in memory from ComfyUI's own
``supported_models.SDXL`` config class with a shrunken UNet (2 levels, 1 ResBlock each, one linear-proj transformer
block, context_dim 2048, adm 2816: 5.6 M parameters) and ComfyUI's real SDXL text encoders (CLIP-L + CLIP-G,
weights left uninitialised except the ones a test LoRA touches; nothing runs through them).

Checked: kohya ``lora_unet_``/``lora_te1_``/``lora_te2_`` names, PEFT ``unet.`` (including the attention names
the pack adds), ``text_encoder.`` and ``text_encoder_2.`` names land on the expected weight keys, the report says
SDXL, and the merged weights equal a float64 oracle ``W0 + s * alpha/r * up @ down``."""

import pytest
import torch
from safetensors.torch import save_file

from comfy_host import load
from oracle import beyond_one_rounding

pytestmark = pytest.mark.host

UNET_CONFIG = dict(model_channels=64, use_linear_in_transformer=True, transformer_depth=[0, 1],
                   transformer_depth_output=[0, 0, 1, 1], transformer_depth_middle=-1, context_dim=2048,
                   adm_in_channels=2816, use_temporal_attention=False, num_res_blocks=[1, 1], channel_mult=[1, 2],
                   in_channels=4, out_channels=4, num_head_channels=32, num_heads=-1, use_spatial_transformer=True,
                   legacy=False, num_classes="sequential", image_size=32)

# LoRA module name -> weight key, derived by hand for UNET_CONFIG: input_blocks 1 = level-0 ResBlock, 2 = downsample,
# 3 = level-1 ResBlock + transformer (diffusers down_blocks.1.attentions.0); output_blocks 0 and 1 = the level-1
# up blocks (diffusers up_blocks.0.attentions.0 / .1); te1 / text_encoder = CLIP-L, te2 / text_encoder_2 = CLIP-G.
T31 = "diffusion_model.input_blocks.3.1."
KOHYA = {
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": T31 + "transformer_blocks.0.attn2.to_k.weight",
    "lora_unet_down_blocks_1_attentions_0_proj_in": T31 + "proj_in.weight",
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
    "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": "clip_g.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
    "lora_te2_text_model_encoder_layers_31_mlp_fc2": "clip_g.transformer.text_model.encoder.layers.31.mlp.fc2.weight",
}
PEFT = {
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": T31 + "transformer_blocks.0.attn1.to_q.weight",
    "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0":
        "diffusion_model.output_blocks.0.1.transformer_blocks.0.attn2.to_out.0.weight",
    "unet.up_blocks.0.attentions.1.transformer_blocks.0.ff.net.2":
        "diffusion_model.output_blocks.1.1.transformer_blocks.0.ff.net.2.weight",
    "text_encoder.text_model.encoder.layers.1.mlp.fc1": "clip_l.transformer.text_model.encoder.layers.1.mlp.fc1.weight",
    "text_encoder_2.text_model.encoder.layers.1.self_attn.k_proj":
        "clip_g.transformer.text_model.encoder.layers.1.self_attn.k_proj.weight",
}
RANK, ALPHA = 4, 2.0


def _randn(shape, seed, std):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * std


@pytest.fixture(scope="module")
def sdxl(comfy_host):
    """(ModelPatcher, CLIP) of the in-memory SDXL model; every UNet weight and each touched CLIP weight random."""
    h = comfy_host
    import comfy.model_patcher
    import comfy.supported_models
    config = comfy.supported_models.SDXL(dict(UNET_CONFIG))
    config.set_inference_dtype(torch.float16, None)
    model = config.get_model({})
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(_randn(p.shape, i, 0.05))
        clip = h.sd.CLIP(target=config.clip_target(), parameters=0, model_options={"dtype": torch.float16})
        for i, key in enumerate(v for v in {**KOHYA, **PEFT}.values() if not v.startswith("diffusion_model.")):
            p = clip.cond_stage_model.get_parameter(key)
            p.copy_(_randn(p.shape, 1000 + i, 0.05))
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=h.mm.get_torch_device(),
                                               offload_device=h.mm.unet_offload_device())
    return patcher, clip


def lora_file(path, names, style, seed):
    """Write random LoRA tensors (rank RANK, alpha ALPHA, kohya or PEFT suffixes) for ``names`` ({module name:
    weight shape}) to ``path``; returns the tensors."""
    tensors = {}
    for i, (name, shape) in enumerate(names.items()):
        down, up = (".lora_down.weight", ".lora_up.weight") if style == "kohya" else (".lora_A.weight", ".lora_B.weight")
        tensors[name + down] = _randn((RANK, shape[1]), seed + 2 * i, shape[1] ** -0.5).half()
        tensors[name + up] = _randn((shape[0], RANK), seed + 2 * i + 1, 0.05).half()
        tensors[name + ".alpha"] = torch.tensor(ALPHA)
    save_file(tensors, str(path))
    return tensors


def test_sdxl_key_maps_report_and_merge(comfy_host, fixtures_dir, sdxl):
    h = comfy_host
    model, clip = sdxl
    assert type(model.model.model_config).__name__ == "SDXL"
    from batch_lora.nodes.stack import _unet_key_map
    key_map = {**_unet_key_map(model.model), **h.comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})}
    assert {k: key_map.get(k) for k in {**KOHYA, **PEFT}} == {**KOHYA, **PEFT}

    def param(key):
        return (model.model if key.startswith("diffusion_model.") else clip.cond_stage_model).get_parameter(key)
    shapes = {name: tuple(param(key).shape) for name, key in {**KOHYA, **PEFT}.items()}
    loras = fixtures_dir / "models" / "loras"
    files = {"sdxl_kohya.safetensors": (lora_file(loras / "sdxl_kohya.safetensors", {n: shapes[n] for n in KOHYA},
                                                  "kohya", 1), KOHYA, 0.8, 0.6),
             "sdxl_peft.safetensors": (lora_file(loras / "sdxl_peft.safetensors", {n: shapes[n] for n in PEFT},
                                                 "peft", 100), PEFT, -0.7, 1.3)}
    h.folder_paths.filename_list_cache.pop("loras", None)
    base = {key: param(key).detach().clone() for key in {**KOHYA, **PEFT}.values()}
    rows = {f"lora_{i + 1}": {"on": True, "lora": n, "strength_model": sm, "strength_clip": sc}
            for i, (n, (_, _, sm, sc)) in enumerate(files.items())}
    out_m, out_c, report = h.pack.BatchLoraLoader().apply(model, clip, **rows)[:3]
    assert report.split("\n")[1:] == [
        "sdxl_kohya.safetensors  model 0.8 clip 0.6  unet 2 keys, clip 3 keys, 0 unmatched  (for SDXL; lora 5)",
        "sdxl_peft.safetensors  model -0.7 clip 1.3  unet 3 keys, clip 2 keys, 0 unmatched  (for SDXL; lora 5)"]
    with torch.inference_mode():
        load(h, out_m, out_c.load_model())
    for tensors, names, sm, sc in files.values():
        suffix = ("lora_down", "lora_up") if names is KOHYA else ("lora_A", "lora_B")
        for name, key in names.items():
            s = sm if key.startswith("diffusion_model.") else sc
            down, up = (tensors[f"{name}.{sfx}.weight"].double() for sfx in suffix)
            expected = base[key].double() + s * ALPHA / RANK * (up @ down)
            operands = base[key].double().abs() + abs(s) * ALPHA / RANK * (up.abs() @ down.abs())
            live = (out_m.model if key.startswith("diffusion_model.") else out_c.patcher.model).get_parameter(key)
            assert beyond_one_rounding(live, expected, operands) == 0, key
            assert not torch.equal(live, base[key]), key
