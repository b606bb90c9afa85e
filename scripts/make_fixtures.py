"""Deterministic test fixtures: a tiny real-architecture SD1.5 checkpoint and LoRA files for it.

Nothing can be downloaded here, so tests, demos and benchmarks generate their models. The weights are random
but fixed by a seed; architecture, key names and file format are real, and stock ComfyUI (0.3.75) loads them
unchanged (detected as SD15, no missing/unexpected keys, every LoRA key mapped).

Checkpoint (`CHECKPOINT_NAME`, original LDM key layout):
  * UNet (`model.diffusion_model.*`, fp16): model_channels 320, context_dim 768, conv proj_in,
    channel_mult [1], num_res_blocks [1], one transformer block (input_blocks.1.1), no middle block,
    two output ResBlocks 640->320 (with a 1x1 skip_connection). ~13.6 M parameters.
  * CLIP-L text encoder (`cond_stage_model.transformer.text_model.*`): full size (the stock loader always
    builds the full model); 2-D weights stored as float8_e4m3fn, 1-D ones fp16. Like real SD1.5 checkpoints
    it has no text_projection: ComfyUI leaves clip_l.transformer.text_projection.weight uninitialised (it is
    not used by SD1.x conditioning), so compare weights across loads without that key.
  * TAESD VAE (`first_stage_model.taesd_encoder.*`, `taesd_decoder.*`, `vae_scale`, `vae_shift`), fp16.

LoRAs (`LORA_NAMES`): two kohya/sd-scripts files and one diffusers/PEFT file, each touching UNet and text
encoder, covering linear layers, 1x1 convs and 3x3 convs; see `lora_manifest()`.
Format files (`FORMAT_NAMES`): PEFT UNet attention names (which stock ComfyUI 0.3.75 leaves unmapped), LyCORIS
LoHa (with and without Tucker) and LoKr (full, decomposed and Tucker factors), full/diff weight patches (incl.
biases and norm layers) and DoRA; see `format_manifest()` and `format_state_dict()`.

Every tensor is drawn from its own generator seeded by (seed, file, tensor name), so files are bit-identical on
every run with the same torch version. safetensors metadata has a single key (more keys are written in random
order).

CLI:  python scripts/make_fixtures.py OUT_DIR [--seed N] [--verify]
      writes OUT_DIR/models/checkpoints/tiny_sd15.safetensors and OUT_DIR/models/loras/*.safetensors;
      files whose content is already identical are not rewritten. --verify loads them with ComfyUI in-process
      (COMFYUI_PATH or <repo>/.comfyui) and checks detection and LoRA key mapping.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import safetensors.torch

REPO_ROOT = Path(__file__).resolve().parent.parent

CHECKPOINT_NAME = "tiny_sd15.safetensors"
LORA_KOHYA_A = "kohya_a.safetensors"
LORA_KOHYA_B = "kohya_b.safetensors"
LORA_PEFT_C = "peft_c.safetensors"
LORA_NAMES = (LORA_KOHYA_A, LORA_KOHYA_B, LORA_PEFT_C)

FIXTURE_VERSION = "1"
VAE_SCALE = 0.005  # random UNet latents have std ~100; this keeps TAESD's input (and the images) unsaturated

# ---------------------------------------------------------------------------------------------------------
# deterministic random numbers


def _tensor_seed(*parts) -> int:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _randn(shape, *seed_parts) -> torch.Tensor:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(_tensor_seed(*seed_parts))
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------
# checkpoint layout: name -> (shape, init kind)
#   ("w", fan_in, gain): N(0, gain^2 / fan_in)   ("b", std): N(0, std^2)   ("norm_w",): 1 + N(0, 0.02^2)
#   ("const", value)

UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model.transformer."
VAE_PREFIX = "first_stage_model."

SD15_UNET_CONFIG = dict(
    in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    transformer_depth_middle=1, context_dim=768, num_heads=8, num_head_channels=-1,
    use_linear_in_transformer=False, use_spatial_transformer=True, legacy=False, image_size=32)
"""The full-size SD1.5 UNet configuration (ComfyUI openaimodel.UNetModel keyword arguments, 860 M parameters),
for benchmarks and GPU checks that build the model in memory instead of from a file."""

MC = 320          # model_channels
TEMB = 4 * MC     # time embedding width
CTX = 768         # context_dim (CLIP-L width)
FF_INNER = 4 * MC


def _linear(spec, name, n_in, n_out, bias=True, gain=1.0):
    spec[name + ".weight"] = ((n_out, n_in), ("w", n_in, gain))
    if bias:
        spec[name + ".bias"] = ((n_out,), ("b", 0.02))


def _conv(spec, name, n_in, n_out, k, bias=True, gain=1.0, bias_std=0.02):
    spec[name + ".weight"] = ((n_out, n_in, k, k), ("w", n_in * k * k, gain))
    if bias:
        spec[name + ".bias"] = ((n_out,), ("b", bias_std))


def _norm(spec, name, n):
    spec[name + ".weight"] = ((n,), ("norm_w",))
    spec[name + ".bias"] = ((n,), ("b", 0.02))


def _resblock(spec, p, n_in, n_out):
    _norm(spec, p + "in_layers.0", n_in)
    _conv(spec, p + "in_layers.2", n_in, n_out, 3)
    _linear(spec, p + "emb_layers.1", TEMB, n_out)
    _norm(spec, p + "out_layers.0", n_out)
    _conv(spec, p + "out_layers.3", n_out, n_out, 3)
    if n_in != n_out:
        _conv(spec, p + "skip_connection", n_in, n_out, 1)


def _spatial_transformer(spec, p, ch):
    _norm(spec, p + "norm", ch)
    _conv(spec, p + "proj_in", ch, ch, 1)
    t = p + "transformer_blocks.0."
    for attn, kv_dim in (("attn1", ch), ("attn2", CTX)):
        _linear(spec, t + attn + ".to_q", ch, ch, bias=False)
        _linear(spec, t + attn + ".to_k", kv_dim, ch, bias=False)
        _linear(spec, t + attn + ".to_v", kv_dim, ch, bias=False)
        _linear(spec, t + attn + ".to_out.0", ch, ch)
    _linear(spec, t + "ff.net.0.proj", ch, 2 * FF_INNER)
    _linear(spec, t + "ff.net.2", FF_INNER, ch)
    for n in ("norm1", "norm2", "norm3"):
        _norm(spec, t + n, ch)
    _conv(spec, p + "proj_out", ch, ch, 1)


def _unet_spec():
    s = {}
    _linear(s, "time_embed.0", MC, TEMB)
    _linear(s, "time_embed.2", TEMB, TEMB)
    _conv(s, "input_blocks.0.0", 4, MC, 3)
    _resblock(s, "input_blocks.1.0.", MC, MC)
    _spatial_transformer(s, "input_blocks.1.1.", MC)
    _resblock(s, "output_blocks.0.0.", 2 * MC, MC)  # input: h (320) + skip from input_blocks.1 (320)
    _resblock(s, "output_blocks.1.0.", 2 * MC, MC)  # input: h (320) + skip from input_blocks.0 (320)
    _norm(s, "out.0", MC)
    _conv(s, "out.2", MC, 4, 3)
    return s


def _clip_spec():
    s = {}
    d, ff = 768, 3072
    tm = "text_model."
    s[tm + "embeddings.token_embedding.weight"] = ((49408, d), ("b", 0.02))
    s[tm + "embeddings.position_embedding.weight"] = ((77, d), ("b", 0.01))
    for i in range(12):
        p = tm + "encoder.layers.{}.".format(i)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _linear(s, p + "self_attn." + proj, d, d)
        _norm(s, p + "layer_norm1", d)
        _norm(s, p + "layer_norm2", d)
        _linear(s, p + "mlp.fc1", d, ff)
        _linear(s, p + "mlp.fc2", ff, d)
    _norm(s, tm + "final_layer_norm", d)
    return s


def _taesd_block(s, p, gain):
    for j in (0, 2, 4):
        _conv(s, p + "conv.{}".format(j), 64, 64, 3, gain=gain)


def _vae_spec():
    s = {}
    e = "taesd_encoder."
    _conv(s, e + "0", 3, 64, 3)
    for i in (1, 3, 4, 5, 7, 8, 9, 11, 12, 13):
        _taesd_block(s, e + "{}.".format(i), gain=1.0)
    for i in (2, 6, 10):
        _conv(s, e + str(i), 64, 64, 3, bias=False, gain=1.0)
    _conv(s, e + "14", 64, 4, 3, gain=0.5)
    d = "taesd_decoder."
    _conv(s, d + "1", 4, 64, 3, gain=1.0)
    for i in (3, 4, 5, 8, 9, 10, 13, 14, 15, 18):
        _taesd_block(s, d + "{}.".format(i), gain=1.0)
    for i in (7, 12, 17):
        _conv(s, d + str(i), 64, 64, 3, bias=False, gain=1.0)
    _conv(s, d + "19", 64, 3, 3, gain=1.0)
    s[d + "19.bias"] = ((3,), ("const", 0.5))  # mid-grey images
    s["vae_scale"] = ((), ("const", VAE_SCALE))
    s["vae_shift"] = ((), ("const", 0.0))
    return s


def checkpoint_spec() -> dict:
    """Return {checkpoint key: shape tuple} of the tiny SD1.5 checkpoint (no tensors are made)."""
    out = {}
    for prefix, spec in ((UNET_PREFIX, _unet_spec()), (CLIP_PREFIX, _clip_spec()), (VAE_PREFIX, _vae_spec())):
        for k, (shape, _init) in spec.items():
            out[prefix + k] = tuple(shape)
    return out


def _init_tensor(shape, init, *seed_parts) -> torch.Tensor:
    kind = init[0]
    if kind == "const":
        return torch.full(tuple(shape), float(init[1]), dtype=torch.float32)
    x = _randn(shape, *seed_parts)
    if kind == "w":
        return x * (init[2] / math.sqrt(init[1]))
    if kind == "b":
        return x * init[1]
    if kind == "norm_w":
        return 1.0 + 0.02 * x
    raise ValueError(kind)


def _stored(prefix: str, shape, init, key: str, seed: int) -> torch.Tensor:
    t = _init_tensor(shape, init, "ckpt", seed, key)
    if prefix == CLIP_PREFIX:
        t = t.to(torch.float8_e4m3fn if t.ndim == 2 else torch.float16)
    elif t.ndim == 0:
        t = t.to(torch.float32)  # vae_scale / vae_shift scalars
    else:
        t = t.to(torch.float16)
    return t.contiguous()


def _prefixed_specs():
    return ((UNET_PREFIX, _unet_spec()), (CLIP_PREFIX, _clip_spec()), (VAE_PREFIX, _vae_spec()))


def checkpoint_state_dict(seed: int = 0) -> dict:
    """Build the tiny SD1.5 checkpoint tensors in memory: {key: tensor} (UNet/TAESD fp16, CLIP fp8/fp16)."""
    return {prefix + k: _stored(prefix, shape, init, prefix + k, seed)
            for prefix, spec in _prefixed_specs() for k, (shape, init) in spec.items()}


def checkpoint_tensor(key: str, seed: int = 0) -> torch.Tensor:
    """One tensor of ``checkpoint_state_dict(seed)`` (same values and dtype), built alone."""
    for prefix, spec in _prefixed_specs():
        if key.startswith(prefix) and key[len(prefix):] in spec:
            shape, init = spec[key[len(prefix):]]
            return _stored(prefix, shape, init, key, seed)
    raise KeyError(key)


# ---------------------------------------------------------------------------------------------------------
# LoRA layout

# diffusers module path -> LDM path (comfy.utils.unet_to_diffusers for this UNet config)
_DIFFUSERS_TO_LDM = {
    "down_blocks.0.resnets.0": "input_blocks.1.0",
    "down_blocks.0.attentions.0": "input_blocks.1.1",
    "up_blocks.0.resnets.0": "output_blocks.0.0",
    "up_blocks.0.resnets.1": "output_blocks.1.0",
}
_RESNET_SUB = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection"}

_ATTN = "down_blocks.0.attentions.0"
_TB = _ATTN + ".transformer_blocks.0"
_ATTN_ALL = [_TB + ".attn{}.{}".format(a, p) for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")]
_TE_ATTN = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"]
_TE_ALL = _TE_ATTN + ["mlp.fc1", "mlp.fc2"]


@dataclass(frozen=True)
class LoraFileSpec:
    """How one generated LoRA file is made: format style, rank, alpha, dtype, modules, delta size."""
    name: str
    style: str              # "kohya" or "peft"
    rank: int
    alpha: float | None     # None: no .alpha keys (ComfyUI then uses scale 1.0)
    dtype: torch.dtype
    unet_modules: tuple     # diffusers module paths
    te_modules: tuple       # (layer index, CLIP sub-module) pairs
    rel_delta: float        # target std(delta W) / std(W) at strength 1


LORA_SPECS = {
    LORA_KOHYA_A: LoraFileSpec(
        LORA_KOHYA_A, "kohya", rank=4, alpha=2.0, dtype=torch.float16,
        unet_modules=tuple(_ATTN_ALL + [_TB + ".ff.net.0.proj", _TB + ".ff.net.2", _ATTN + ".proj_in",
                                        _ATTN + ".proj_out", "down_blocks.0.resnets.0.conv1",
                                        "down_blocks.0.resnets.0.conv2"]),
        te_modules=tuple((i, m) for i in range(12) for m in _TE_ATTN),
        rel_delta=0.25),
    LORA_KOHYA_B: LoraFileSpec(
        LORA_KOHYA_B, "kohya", rank=8, alpha=None, dtype=torch.bfloat16,
        unet_modules=(_TB + ".attn2.to_k", _TB + ".attn2.to_v", _TB + ".ff.net.0.proj",
                      "down_blocks.0.resnets.0.time_emb_proj",
                      "up_blocks.0.resnets.0.conv1", "up_blocks.0.resnets.0.conv2",
                      "up_blocks.0.resnets.0.conv_shortcut",
                      "up_blocks.0.resnets.1.conv1", "up_blocks.0.resnets.1.conv2",
                      "up_blocks.0.resnets.1.conv_shortcut"),
        te_modules=tuple((i, m) for i in range(12) for m in ("self_attn.q_proj", "mlp.fc1", "mlp.fc2")),
        rel_delta=0.25),
    LORA_PEFT_C: LoraFileSpec(
        LORA_PEFT_C, "peft", rank=16, alpha=8.0, dtype=torch.float32,
        unet_modules=tuple(_ATTN_ALL + [_TB + ".ff.net.0.proj", _TB + ".ff.net.2", _ATTN + ".proj_in",
                                        _ATTN + ".proj_out", "down_blocks.0.resnets.0.conv1",
                                        "down_blocks.0.resnets.0.conv2", "up_blocks.0.resnets.0.conv2",
                                        "up_blocks.0.resnets.1.conv_shortcut"]),
        te_modules=tuple((i, m) for i in range(12) for m in _TE_ALL),
        rel_delta=0.25),
}


@dataclass(frozen=True)
class LoraModule:
    """One LoRA module of a generated file and the model weight it patches."""
    lora_name: str          # key prefix in the LoRA file (before .lora_down.weight / .lora_A.weight / .alpha)
    model_key: str          # ComfyUI model state-dict key it patches (diffusion_model.* or clip_l.transformer.*)
    checkpoint_key: str     # the same weight's key in the checkpoint file
    kind: str               # "linear", "conv1x1" or "conv3x3"
    shape: tuple            # shape of the patched weight


@dataclass(frozen=True)
class LoraFileInfo:
    """What a generated LoRA file holds (see ``lora_manifest``)."""
    name: str
    style: str
    rank: int
    alpha: float | None
    dtype: torch.dtype
    modules: tuple                  # LoraModule, in file order
    tensor_keys: frozenset          # every key in the file

    @property
    def model_keys(self) -> frozenset:
        """The ComfyUI model keys the file patches."""
        return frozenset(m.model_key for m in self.modules)

    @property
    def key_map(self) -> dict:
        """{lora module name: ComfyUI model key} - what comfy.lora.load_lora should produce."""
        return {m.lora_name: m.model_key for m in self.modules}

    def count_by_kind(self) -> dict:
        """Modules per kind: linear, conv1x1, conv3x3."""
        out = {"linear": 0, "conv1x1": 0, "conv3x3": 0}
        for m in self.modules:
            out[m.kind] += 1
        return out


def _ldm_path(diffusers_path):
    for dp, lp in _DIFFUSERS_TO_LDM.items():
        if diffusers_path.startswith(dp + "."):
            rest = diffusers_path[len(dp) + 1:]
            return lp + "." + _RESNET_SUB.get(rest, rest)
    raise KeyError(diffusers_path)


def _kind(shape):
    if len(shape) == 2:
        return "linear"
    return "conv{}x{}".format(shape[2], shape[3])


def _lora_modules(spec: LoraFileSpec):
    shapes = checkpoint_spec()
    mods = []
    for dpath in spec.unet_modules:
        ldm = _ldm_path(dpath)
        if spec.style == "kohya":
            name = "lora_unet_" + dpath.replace(".", "_")
        else:
            name = "unet." + dpath.replace(".to_", ".processor.to_")
            if name.endswith(".to_out.0"):
                name = name[:-2]
        ck = UNET_PREFIX + ldm + ".weight"
        mods.append(LoraModule(name, "diffusion_model." + ldm + ".weight", ck, _kind(shapes[ck]), shapes[ck]))
    for i, sub in spec.te_modules:
        if spec.style == "kohya":
            name = "lora_te_text_model_encoder_layers_{}_{}".format(i, sub.replace(".", "_"))
        else:
            name = "text_encoder.text_model.encoder.layers.{}.{}".format(i, sub)
        path = "text_model.encoder.layers.{}.{}.weight".format(i, sub)
        ck = CLIP_PREFIX + path
        mods.append(LoraModule(name, "clip_l.transformer." + path, ck, _kind(shapes[ck]), shapes[ck]))
    return tuple(mods)


def factor_suffixes(style):
    """(down, up) tensor-name suffixes of a LoRA file: kohya ``.lora_down/.lora_up``, PEFT ``.lora_A/.lora_B``."""
    return (".lora_down.weight", ".lora_up.weight") if style == "kohya" else (".lora_A.weight", ".lora_B.weight")


def lora_manifest() -> dict:
    """Return {LoRA file name: LoraFileInfo} for every generated LoRA file (independent of the seed).

    LoraFileInfo.tensor_keys is the exact key set of the file, .modules lists each LoRA module with the ComfyUI
    model key it maps to (.key_map / .model_keys), its kind (linear / conv1x1 / conv3x3) and weight shape.
    """
    out = {}
    for name, spec in LORA_SPECS.items():
        mods = _lora_modules(spec)
        down, up = factor_suffixes(spec.style)
        keys = set()
        for m in mods:
            keys.update((m.lora_name + down, m.lora_name + up))
            if spec.alpha is not None:
                keys.add(m.lora_name + ".alpha")
        out[name] = LoraFileInfo(name, spec.style, spec.rank, spec.alpha, spec.dtype, mods, frozenset(keys))
    return out


def lora_state_dict(name: str, seed: int = 0) -> dict:
    """Build the tensors of LoRA file `name` (one of LORA_NAMES) in memory: {key: tensor}.

    down/A: [rank, in(, kh, kw)] with std 1/sqrt(fan_in); up/B: [out, rank(, 1, 1)], scaled so that
    std(alpha/rank * up @ down) = spec.rel_delta * std(base weight).
    """
    spec = LORA_SPECS[name]
    down_sfx, up_sfx = factor_suffixes(spec.style)
    r = spec.rank
    scale = (spec.alpha / r) if spec.alpha is not None else 1.0
    sd = {}
    for m in _lora_modules(spec):
        out_dim, in_dim = m.shape[0], m.shape[1]
        fan_in = int(math.prod(m.shape[1:]))
        conv = len(m.shape) == 4
        down_shape = (r, in_dim) + tuple(m.shape[2:]) if conv else (r, in_dim)
        up_shape = (out_dim, r, 1, 1) if conv else (out_dim, r)
        down = _randn(down_shape, "lora", seed, name, m.lora_name, "down") / math.sqrt(fan_in)
        # base std is 1/sqrt(fan_in) for every patched weight; delta std = scale * sqrt(r) * std_up * std_down
        up_std = spec.rel_delta / (scale * math.sqrt(r))
        up = _randn(up_shape, "lora", seed, name, m.lora_name, "up") * up_std
        sd[m.lora_name + down_sfx] = down.to(spec.dtype).contiguous()
        sd[m.lora_name + up_sfx] = up.to(spec.dtype).contiguous()
        if spec.alpha is not None:
            sd[m.lora_name + ".alpha"] = torch.tensor(spec.alpha, dtype=spec.dtype)
    return sd


# ---------------------------------------------------------------------------------------------------------
# format fixtures: PEFT UNet attention names, LyCORIS LoHa / LoKr, diff patches, DoRA (FORMAT_NAMES)

LORA_PEFT_ATTN = "peft_unet_attn.safetensors"
LORA_LOHA = "loha.safetensors"
LORA_LOKR = "lokr.safetensors"
LORA_DIFF = "diff.safetensors"
LORA_DORA = "dora.safetensors"
FORMAT_NAMES = (LORA_PEFT_ATTN, LORA_LOHA, LORA_LOKR, LORA_DIFF, LORA_DORA)
FORMAT_RANK = 4
FORMAT_ALPHA = 2.0

# file -> (dtype, [(module naming, target, kind, options)]); target: a diffusers UNet path or ("te", layer, sub);
# naming: "kohya" (lora_unet_<diffusers path>), "ldm" (lora_unet_<LDM path>), "peft" (unet.<diffusers path>),
# "peft-bare" (<diffusers path>); kinds and their options are described in ``format_state_dict``.
_TB0 = _TB + "."
FORMAT_SPECS = {
    LORA_PEFT_ATTN: (torch.float32, [("peft", _TB0 + "attn1." + p, "lora", {}) for p in ("to_q", "to_k", "to_v", "to_out.0")]
                     + [("peft-bare", _TB0 + "attn2." + p, "lora", {}) for p in ("to_q", "to_k", "to_v", "to_out.0")]
                     + [("peft", _TB0 + "ff.net.2", "lora", {})]),
    LORA_LOHA: (torch.float16, [
        ("kohya", _TB0 + "attn1.to_q", "loha", {}),
        ("kohya", _TB0 + "attn2.to_k", "loha", {}),
        ("kohya", _ATTN + ".proj_in", "loha", {}),
        ("kohya", "down_blocks.0.resnets.0.conv1", "loha", {}),
        ("kohya", "down_blocks.0.resnets.0.conv2", "loha", {"tucker": True}),
        ("kohya", ("te", 0, "self_attn.q_proj"), "loha", {})]),
    LORA_LOKR: (torch.float32, [
        ("kohya", _TB0 + "attn1.to_q", "lokr", {"w1": (4, 4)}),                       # w1, w2 full
        ("kohya", _TB0 + "attn2.to_k", "lokr", {"w1": (4, 8), "w2": "ab"}),          # w2 = w2_a @ w2_b
        ("kohya", _ATTN + ".proj_in", "lokr", {"w1": (4, 4), "w1_ab": 2}),           # w1 = w1_a @ w1_b, w2 conv
        ("kohya", "down_blocks.0.resnets.0.conv1", "lokr", {"w1": (4, 4)}),           # conv w2 full
        ("kohya", "down_blocks.0.resnets.0.conv2", "lokr", {"w1": (4, 4), "w2": "tucker"}),
        ("kohya", ("te", 0, "mlp.fc1"), "lokr", {"w1": (8, 4), "w2": "ab"})]),
    LORA_DIFF: (torch.float16, [
        ("ldm", _TB0 + "attn1.to_v", "diff", {}),
        ("ldm", _ATTN + ".proj_out", "diff", {"bias": True}),
        ("ldm", _TB0 + "norm1", "norm", {}),
        ("kohya", ("te", 1, "self_attn.out_proj"), "diff", {"bias": True})]),
    LORA_DORA: (torch.float16, [
        ("kohya", _TB0 + "attn1.to_q", "lora", {"dora": "in"}),
        ("kohya", _TB0 + "attn2.to_k", "lora", {"dora": "in"}),
        ("kohya", "down_blocks.0.resnets.0.conv1", "lora", {"dora": "in"}),
        ("kohya", _TB0 + "attn1.to_k", "loha", {"dora": "in"}),
        ("kohya", ("te", 2, "self_attn.k_proj"), "lora", {"dora": "in"}),
        ("kohya", _TB0 + "attn2.to_v", "lora", {"dora": "out"})]),
}
"""The generated format files. Every module has rank ``FORMAT_RANK`` and alpha ``FORMAT_ALPHA`` where the format
has one; tensors are drawn like the LoRA files above, so deltas are about a quarter of the base weights."""


def _format_module(naming: str, target, is_norm: bool = False) -> LoraModule:
    shapes = checkpoint_spec()
    if isinstance(target, tuple):
        _, i, sub = target
        path = "text_model.encoder.layers.{}.{}.weight".format(i, sub)
        ck = CLIP_PREFIX + path
        name = "lora_te_text_model_encoder_layers_{}_{}".format(i, sub.replace(".", "_"))
        return LoraModule(name, "clip_l.transformer." + path, ck, _kind(shapes[ck]) if not is_norm else "norm",
                          shapes[ck])
    ldm = _ldm_path(target)
    ck = UNET_PREFIX + ldm + ".weight"
    name = {"kohya": "lora_unet_" + target.replace(".", "_"), "ldm": "lora_unet_" + ldm.replace(".", "_"),
            "peft": "unet." + target, "peft-bare": target}[naming]
    kind = "norm" if is_norm else _kind(shapes[ck])
    return LoraModule(name, "diffusion_model." + ldm + ".weight", ck, kind, shapes[ck])


def format_manifest() -> dict:
    """Return {format file name: {LoRA module name: LoraModule}} for every file of FORMAT_NAMES."""
    return {name: {m.lora_name: m for m in (_format_module(n, t, k == "norm") for n, t, k, _ in mods)}
            for name, (_dtype, mods) in FORMAT_SPECS.items()}


def format_state_dict(name: str, seed: int = 0) -> dict:
    """Build the tensors of format file ``name`` (one of FORMAT_NAMES) in memory: {key: tensor}.

    Per module (``W`` = the patched weight ``[out, in(, k, k)]``, ``r = FORMAT_RANK``):
      * "lora": PEFT ``lora_A`` ``[r, in(,k,k)]`` / ``lora_B`` ``[out, r(,1,1)]`` or kohya ``lora_down``/``lora_up``;
      * "loha": ``hada_w1_a``/``hada_w2_a`` ``[out, r]``, ``hada_w1_b``/``hada_w2_b`` ``[r, in*k*k]``; with
        ``tucker``: ``hada_t1``/``hada_t2`` ``[r, r, k, k]``, ``hada_w?_a`` ``[r, out]``, ``hada_w?_b`` ``[r, in]``
        (LyCORIS loha.py layouts);
      * "lokr": ``lokr_w1`` ``[o1, i1]`` (``w1``) or ``lokr_w1_a [o1, 2]``/``lokr_w1_b [2, i1]`` (``w1_ab``), and
        ``lokr_w2`` ``[out/o1, in/i1(, k, k)]``, or ``lokr_w2_a [out/o1, r]``/``lokr_w2_b [r, in/i1*k*k]`` ("ab"),
        or Tucker ``lokr_t2 [r, r, k, k]``, ``lokr_w2_a [r, out/o1]``, ``lokr_w2_b [r, in/i1]`` (LyCORIS lokr.py);
      * "diff": ``.diff`` of ``W``'s shape (and ``.diff_b`` for the bias with ``bias``); "norm": ``.w_norm`` and
        ``.b_norm`` of a norm layer;
      * ``dora``: "in" adds ``.dora_scale`` ``[1, in(, 1, 1)]`` (LyCORIS layout), "out" ``[out, 1(, 1, 1)]``:
        the base weight's column / row norms times ``1 + N(0, 0.05^2)``.
    A ``.alpha`` scalar (FORMAT_ALPHA) is written for every module except diff/norm ones.
    """
    dtype, mods = FORMAT_SPECS[name]
    r = FORMAT_RANK
    scale = FORMAT_ALPHA / r
    sd = {}
    for (naming, target, kind, opt), m in zip(mods, format_manifest()[name].values()):
        def rnd(suffix, shape, std):
            t = _randn(shape, "format", seed, name, m.lora_name, suffix) * std
            sd[m.lora_name + "." + suffix] = t.to(dtype).contiguous()
            return t
        shape = m.shape
        out_dim, in_dim, ks = shape[0], (shape[1] if len(shape) > 1 else 1), tuple(shape[2:])
        fan_in = int(math.prod(shape[1:])) if len(shape) > 1 else 1
        target_std = 0.25 / math.sqrt(fan_in)
        if kind == "lora":
            down_sfx, up_sfx = factor_suffixes("peft" if naming.startswith("peft") else "kohya")
            rnd(down_sfx[1:], (r, in_dim) + ks, 1 / math.sqrt(fan_in))
            rnd(up_sfx[1:], (out_dim, r) + ((1, 1) if ks else ()), target_std / (scale * math.sqrt(r)))
        elif kind == "loha":
            a_std = math.sqrt(target_std / scale)
            for j in ("1", "2"):
                if opt.get("tucker"):
                    rnd("hada_t" + j, (r, r) + ks, 1 / math.sqrt(r))
                    rnd("hada_w{}_a".format(j), (r, out_dim), a_std)
                    rnd("hada_w{}_b".format(j), (r, in_dim), 1 / math.sqrt(r))
                else:
                    rnd("hada_w{}_a".format(j), (out_dim, r), a_std)
                    rnd("hada_w{}_b".format(j), (r, fan_in), 1 / math.sqrt(r))
        elif kind == "lokr":
            o1, i1 = opt["w1"]
            o2, i2 = out_dim // o1, in_dim // i1
            decomposed = "w1_ab" in opt or "w2" in opt
            std2 = target_std / (scale if decomposed else 1.0)
            if "w1_ab" in opt:
                rnd("lokr_w1_a", (o1, opt["w1_ab"]), 1.0)
                rnd("lokr_w1_b", (opt["w1_ab"], i1), 1 / math.sqrt(opt["w1_ab"]))
            else:
                rnd("lokr_w1", (o1, i1), 1.0)
            if opt.get("w2") == "ab":
                rnd("lokr_w2_a", (o2, r), std2)
                rnd("lokr_w2_b", (r, i2 * int(math.prod(ks))), 1 / math.sqrt(r))
            elif opt.get("w2") == "tucker":
                rnd("lokr_t2", (r, r) + ks, 1 / math.sqrt(r))
                rnd("lokr_w2_a", (r, o2), std2)
                rnd("lokr_w2_b", (r, i2), 1 / math.sqrt(r))
            else:
                rnd("lokr_w2", (o2, i2) + ks, std2)
        elif kind == "diff":
            rnd("diff", shape, target_std)
            if opt.get("bias"):
                rnd("diff_b", (out_dim,), 0.005)
        elif kind == "norm":
            rnd("w_norm", shape, 0.01)
            rnd("b_norm", shape, 0.005)
        if kind not in ("diff", "norm"):
            sd[m.lora_name + ".alpha"] = torch.tensor(FORMAT_ALPHA, dtype=dtype)
        if "dora" in opt:
            base = checkpoint_tensor(m.checkpoint_key, seed).float()
            if opt["dora"] == "in":
                norm = base.transpose(0, 1).reshape(in_dim, -1).norm(dim=1).reshape((1, in_dim) + (1,) * len(ks))
            else:
                norm = base.reshape(out_dim, -1).norm(dim=1).reshape((out_dim, 1) + (1,) * len(ks))
            jitter = 1 + 0.05 * _randn(norm.shape, "format", seed, name, m.lora_name, "dora")
            sd[m.lora_name + ".dora_scale"] = (norm * jitter).to(dtype).contiguous()
    return sd


# ---------------------------------------------------------------------------------------------------------
# writing


def _metadata(what, seed):
    return {"fixture": "comfyui-batch-lora {} v{} seed={}".format(what, FIXTURE_VERSION, seed)}


def _write_if_changed(path: Path, tensors: dict, metadata: dict) -> bool:
    """Write tensors to path unless an identical file is already there. Returns True if written."""
    data = safetensors.torch.save(tensors, metadata=metadata)
    path = Path(path)
    if path.is_file() and path.stat().st_size == len(data):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        if h.digest() == hashlib.sha256(data).digest():
            return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp{}".format(os.getpid()))
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return True


def make_sd15_checkpoint(path, seed: int = 0) -> Path:
    """Write the tiny SD1.5 checkpoint to `path` (rewritten only if its content differs). Returns the path."""
    path = Path(path)
    _write_if_changed(path, checkpoint_state_dict(seed), _metadata("tiny_sd15", seed))
    return path


def make_loras(lora_dir, seed: int = 0) -> dict:
    """Write every LoRA file of LORA_NAMES and FORMAT_NAMES into `lora_dir`. Returns {file name: path}."""
    lora_dir = Path(lora_dir)
    out = {}
    for name in LORA_NAMES + FORMAT_NAMES:
        p = lora_dir / name
        tensors = lora_state_dict(name, seed) if name in LORA_NAMES else format_state_dict(name, seed)
        _write_if_changed(p, tensors, _metadata(name[:-len(".safetensors")], seed))
        out[name] = p
    return out


# LoRA files carrying each tool's metadata layout (core/meta.py): the tensors of LORA_KOHYA_A / LORA_PEFT_C, the
# header metadata and sidecar files those tools write. Expected values are spelled out in META_EXPECTED.
META_KOHYA = "meta_kohya.safetensors"        # kohya sd-scripts header: ss_output_name, ss_tag_frequency, ...
META_SPEC = "meta_modelspec.safetensors"     # SAI ModelSpec header (sd-scripts, ai-toolkit, OneTrainer), SDXL
META_CIVITAI = "meta_civitai.safetensors"    # + .civitai.info (Civitai Helper) + .preview.png
META_MANAGER = "meta_manager.safetensors"    # + .metadata.json (ComfyUI-Lora-Manager) + .webp, Flux
META_PREVIEW_SIZE = {META_CIVITAI: (24, 16), META_MANAGER: (12, 20)}  # (width, height) of the preview images
META_HEADERS = {
    META_KOHYA: {"ss_output_name": "kohya_style", "ss_base_model_version": "sd_v1", "ss_network_dim": "4",
                 "ss_tag_frequency": '{"10_zxc style": {"zxc style": 12, "1girl": 7, "outdoors": 12}, '
                                     '"5_other": {"blue sky": 3, "zxc style": 2}}',
                 "ss_dataset_dirs": '{"10_zxc style": {"n_repeats": 10, "img_count": 12}, '
                                    '"5_other": {"n_repeats": 5, "img_count": 3}}'},
    META_SPEC: {"modelspec.sai_model_spec": "1.0.0", "modelspec.title": "Spec Title",
                "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
                "modelspec.trigger_phrase": "spec_trigger, second phrase"},
    META_CIVITAI: {"ss_output_name": "civ_internal", "ss_base_model_version": "sd_v1"},
    META_MANAGER: {},
}
META_SIDECARS = {  # file name -> JSON content
    "meta_civitai.civitai.info": {"id": 101, "modelId": 7, "name": "v1.0", "baseModel": "SD 1.5",
                                  "trainedWords": ["civ_word", "civ phrase, extra"],
                                  "model": {"name": "Civitai Model", "type": "LORA"}},
    "meta_manager.metadata.json": {"file_name": "meta_manager", "model_name": "Manager Model",
                                   "base_model": "Flux.1 D", "preview_url": "/elsewhere/meta_manager.webp",
                                   "civitai": {"trainedWords": ["mgr_word", "CIV_WORD"]}, "tags": ["style"]},
}
META_EXPECTED = {  # name -> (title, trigger words, base model, family)
    META_KOHYA: ("kohya_style", ("zxc style", "outdoors", "blue sky"), "sd_v1", "SD1.x"),
    META_SPEC: ("Spec Title", ("spec_trigger", "second phrase"), "stable-diffusion-xl-v1-base/lora", "SDXL"),
    META_CIVITAI: ("Civitai Model", ("civ_word", "civ phrase", "extra"), "SD 1.5", "SD1.x"),
    META_MANAGER: ("Manager Model", ("mgr_word", "CIV_WORD"), "Flux.1 D", "Flux.1"),
}


def make_metadata_loras(lora_dir, seed: int = 0) -> dict:
    """Write the META_* LoRA files, their sidecars (META_SIDECARS) and preview images (META_PREVIEW_SIZE; PNG for
    Civitai Helper's ``NAME.preview.png``, WebP for Lora-Manager's ``NAME.webp``) into ``lora_dir``. The tensors are
    those of LORA_KOHYA_A (META_KOHYA, META_SPEC, META_MANAGER) and LORA_PEFT_C (META_CIVITAI), so every file
    matches the tiny SD1.5 model. Returns {file name: path} of the LoRA files."""
    from PIL import Image
    lora_dir = Path(lora_dir)
    out = {}
    for name, header in META_HEADERS.items():
        tensors = lora_state_dict(LORA_PEFT_C if name == META_CIVITAI else LORA_KOHYA_A, seed)
        out[name] = lora_dir / name
        _write_if_changed(out[name], tensors, {**_metadata(name[:-len(".safetensors")], seed), **header})
    for name, content in META_SIDECARS.items():
        (lora_dir / name).write_text(json.dumps(content), encoding="utf-8")
    for name, size in META_PREVIEW_SIZE.items():
        stem = name[:-len(".safetensors")]
        path = lora_dir / (stem + (".preview.png" if name == META_CIVITAI else ".webp"))
        Image.new("RGB", size, (200, 40, 90)).save(path)
    return out


def make_fixtures(out_dir, seed: int = 0) -> dict:
    """Write OUT_DIR/models/checkpoints/CHECKPOINT_NAME and OUT_DIR/models/loras/<LORA_NAMES>.

    Returns {"checkpoint": path, "loras": {name: path}}.
    """
    out_dir = Path(out_dir)
    ckpt = make_sd15_checkpoint(out_dir / "models" / "checkpoints" / CHECKPOINT_NAME, seed)
    loras = make_loras(out_dir / "models" / "loras", seed)
    return {"checkpoint": ckpt, "loras": loras}


# ---------------------------------------------------------------------------------------------------------
# verification with ComfyUI itself (in-process)


def default_comfy_path() -> Path:
    """The ComfyUI checkout to use: $COMFYUI_PATH or <repo>/.comfyui."""
    return Path(os.environ.get("COMFYUI_PATH") or REPO_ROOT / ".comfyui")


def import_comfy(path=None):
    """Make ComfyUI's `comfy` package importable in-process, forced to the CPU. Returns the comfy.sd module.

    Puts the ComfyUI root on sys.path (never this repo's root: ComfyUI has its own top-level `nodes`).
    Must run before anything else imports comfy.model_management.
    """
    root = str(Path(path) if path else default_comfy_path())
    if root not in sys.path:
        sys.path.insert(0, root)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import comfy.sd
    import comfy.lora  # noqa: F401
    return comfy.sd


class _CaptureLog(logging.Handler):
    """Collect the tails of root-logger records that start with `prefix` (ComfyUI logs via the root logger)."""

    def __init__(self, prefix):
        super().__init__(logging.WARNING)
        self.prefix = prefix
        self.items = []

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith(self.prefix):
            self.items.append(msg[len(self.prefix):])

    def __enter__(self):
        root = logging.getLogger()
        self._old_level = root.level
        root.setLevel(min(root.level, logging.WARNING) if root.level else logging.WARNING)
        root.addHandler(self)
        return self

    def __exit__(self, *exc):
        root = logging.getLogger()
        root.removeHandler(self)
        root.setLevel(self._old_level)


def comfy_lora_report(checkpoint_path, lora_paths, comfy_root=None) -> dict:
    """Load the checkpoint and each LoRA with ComfyUI's own code and report the key mapping.

    Returns {lora file name: {"patched": {model key, ...}  (keys comfy.lora.load_lora patches),
                              "unmatched": [keys load_lora logged as "lora key not loaded"],
                              "expected": LoraFileInfo.model_keys (None for files not in the manifest)}}.
    Uses model_lora_keys_unet + model_lora_keys_clip on the loaded model, as comfy.sd.load_lora_for_models does.
    """
    comfy_sd = import_comfy(comfy_root)
    import comfy.lora
    import comfy.lora_convert
    import comfy.utils
    manifest = lora_manifest()
    with torch.inference_mode():
        model, clip, _vae, _ = comfy_sd.load_checkpoint_guess_config(
            str(checkpoint_path), output_vae=False, output_clip=True, output_clipvision=False)
        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
        report = {}
        for p in lora_paths:
            p = Path(p)
            lora = comfy.lora_convert.convert_lora(comfy.utils.load_torch_file(str(p), safe_load=True))
            with _CaptureLog("lora key not loaded: ") as cap:
                patches = comfy.lora.load_lora(lora, key_map, log_missing=True)
            info = manifest.get(p.name)
            report[p.name] = {
                "patched": set(patches.keys()),
                "unmatched": sorted(cap.items),
                "expected": info.model_keys if info else None,
            }
    return report


def verify_with_comfy(out_dir, comfy_root=None) -> dict:
    """Check the fixtures under OUT_DIR with ComfyUI in-process; raise AssertionError on any problem.

    Checks: detected as SD15, UNet/CLIP/VAE have no missing or unexpected keys and only finite parameters,
    VAE is TAESD, and every LoRA file maps completely (no unmatched key, patches == manifest model keys).
    Returns the comfy_lora_report() result.
    """
    comfy_sd = import_comfy(comfy_root)
    import comfy.supported_models
    import comfy.utils
    out_dir = Path(out_dir)
    ckpt = out_dir / "models" / "checkpoints" / CHECKPOINT_NAME
    sd = comfy.utils.load_torch_file(str(ckpt), safe_load=True)
    with torch.inference_mode():
        model, clip, vae, _ = comfy_sd.load_state_dict_guess_config(dict(sd), output_vae=True, output_clip=True)
        assert type(model.model.model_config) is comfy.supported_models.SD15, type(model.model.model_config)
        ldm = {k[len(UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}
        m, u = model.model.diffusion_model.load_state_dict(ldm, strict=False)
        assert not m and not u, ("unet", m, u)
        clip_sd = {k.replace("cond_stage_model.", "clip_l.", 1): v for k, v in sd.items()
                   if k.startswith("cond_stage_model.")}
        m, u = clip.cond_stage_model.load_state_dict(clip_sd, strict=False)
        # logit_scale has a built-in value; text_projection is absent from SD1.5 checkpoints (unused there).
        m = [k for k in m if k not in ("clip_l.logit_scale", "clip_l.transformer.text_projection.weight")]
        assert not m and not u, ("clip", m, u)
        assert type(vae.first_stage_model).__name__ == "TAESD", type(vae.first_stage_model)
        vae_sd = {k[len(VAE_PREFIX):]: v for k, v in sd.items() if k.startswith(VAE_PREFIX)}
        m, u = vae.first_stage_model.load_state_dict(vae_sd, strict=False)
        assert not m and not u, ("vae", m, u)
        for what, mod in (("unet", model.model), ("clip", clip.cond_stage_model), ("vae", vae.first_stage_model)):
            for k, v in mod.state_dict().items():
                if k.endswith("text_projection.weight"):
                    continue
                assert torch.isfinite(v.float()).all(), (what, k)
    report = comfy_lora_report(ckpt, [out_dir / "models" / "loras" / n for n in LORA_NAMES], comfy_root)
    for name, r in report.items():
        assert not r["unmatched"], (name, r["unmatched"])
        assert r["patched"] == r["expected"], (name, sorted(r["patched"] ^ r["expected"]))
    return report


def main(argv=None) -> int:
    """CLI entry (see the module docstring); returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", help="writes OUT_DIR/models/checkpoints/ and OUT_DIR/models/loras/")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verify", action="store_true", help="also check the files with ComfyUI in-process")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    paths = make_fixtures(a.out_dir, a.seed)
    print("fixtures in {:.1f} s:".format(time.perf_counter() - t0))
    for p in [paths["checkpoint"], *paths["loras"].values()]:
        print("  {}  {:.1f} MiB".format(p, p.stat().st_size / 2**20))
    if a.verify:
        t0 = time.perf_counter()
        report = verify_with_comfy(a.out_dir)
        for name, r in report.items():
            print("  {}: {} modules patched, 0 unmatched".format(name, len(r["patched"])))
        print("verified with ComfyUI in {:.1f} s".format(time.perf_counter() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
