"""Small diffusion models of real architectures that ComfyUI's own detection classifies (`ARCHS`).

Each spec lists the bare weight keys and shapes of a released diffusion-model file, as `UNETLoader` /
`comfy.sd.load_diffusion_model_state_dict` reads them: BFL names for Flux.1/Flux.2/Chroma (q/k norms as
``.scale``), Tencent's for HunyuanVideo (ComfyUI renames them on load), Wan's own, the diffusers-style names of
the Qwen-Image, LTXV and HiDream releases, Alpha-VLLM's for Lumina 2 and Comfy-Org's for Z-Image, LDM names for
SDXL. Each is shrunk as far as comfy/model_detection.py allows on both tested hosts, ComfyUI 0.3.75 and 0.33.0:
widths detection reads from a shape are small; widths it hard-codes (128-wide heads with a fixed head count,
Chroma's 5120-wide approximator, Qwen-Image's 3072, Lumina 2 / Z-Image dims, HiDream's whole layout, SDXL's
transformer depths) stay real. Archs above `TINY_PARAMS` are too large for CPU tests and are built there on the
meta device (shapes only) for detection and key checks.

Weights are random but deterministic: each tensor comes from `make_fixtures._randn` seeded by (arch, seed,
key), so the same seed gives the same bits on every run with the same torch version. Weights of 2 or more
dimensions are N(0, 1/fan_in), biases N(0, 0.02²), 1-D weights (norm scales) 1 + N(0, 0.02²): a forward pass
stays finite in fp32 and bf16.

CLI:  python scripts/arch_fixtures.py OUT_DIR [ARCH ...]   writes OUT_DIR/<arch>.safetensors (bf16).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import safetensors.torch

from make_fixtures import _randn

Spec = dict[str, tuple[int, ...]]

TINY_PARAMS = 20_000_000
"""Archs with more parameters than this are built only on the meta device in the tests (no values, no forward)."""

# ---------------------------------------------------------------------------------------------------------
# building blocks: each adds keys -> shapes to a spec


def _linear(s: Spec, name: str, n_in: int, n_out: int, bias: bool = True) -> None:
    s[name + ".weight"] = (n_out, n_in)
    if bias:
        s[name + ".bias"] = (n_out,)


def _norm(s: Spec, name: str, n: int, bias: bool = False, param: str = "weight") -> None:
    s[f"{name}.{param}"] = (n,)
    if bias:
        s[name + ".bias"] = (n,)


def _conv(s: Spec, name: str, n_in: int, n_out: int, kernel: tuple[int, ...]) -> None:
    s[name + ".weight"] = (n_out, n_in, *kernel)
    s[name + ".bias"] = (n_out,)


def _mlp(s: Spec, name: str, n_in: int, n_out: int, first: str, second: str, bias: bool = True) -> None:
    """Two linears n_in -> n_out -> n_out (timestep / vector embedders)."""
    _linear(s, f"{name}.{first}", n_in, n_out, bias)
    _linear(s, f"{name}.{second}", n_out, n_out, bias)


# ---------------------------------------------------------------------------------------------------------
# SDXL (UNet, LDM names)


def _sdxl_resblock(s: Spec, p: str, n_in: int, n_out: int, temb: int) -> None:
    _norm(s, p + "in_layers.0", n_in, bias=True)
    _conv(s, p + "in_layers.2", n_in, n_out, (3, 3))
    _linear(s, p + "emb_layers.1", temb, n_out)
    _norm(s, p + "out_layers.0", n_out, bias=True)
    _conv(s, p + "out_layers.3", n_out, n_out, (3, 3))
    if n_in != n_out:
        _conv(s, p + "skip_connection", n_in, n_out, (1, 1))


def _sdxl_transformer(s: Spec, p: str, ch: int, ctx: int, depth: int) -> None:
    _norm(s, p + "norm", ch, bias=True)
    _linear(s, p + "proj_in", ch, ch)
    for i in range(depth):
        t = f"{p}transformer_blocks.{i}."
        for attn, kv in (("attn1", ch), ("attn2", ctx)):
            _linear(s, t + attn + ".to_q", ch, ch, bias=False)
            _linear(s, t + attn + ".to_k", kv, ch, bias=False)
            _linear(s, t + attn + ".to_v", kv, ch, bias=False)
            _linear(s, t + attn + ".to_out.0", ch, ch)
        _linear(s, t + "ff.net.0.proj", ch, 8 * ch)
        _linear(s, t + "ff.net.2", 4 * ch, ch)
        for n in ("norm1", "norm2", "norm3"):
            _norm(s, t + n, ch, bias=True)
    _linear(s, p + "proj_out", ch, ch)


def _sdxl() -> Spec:
    """SDXL: detection wants model_channels 320, context_dim 2048, adm 2816, linear proj_in and transformer_depth
    exactly [0, 0, 2, 2, 10, 10]; the smallest layout is those six ResBlocks in one level (channel_mult [1]),
    seven output ResBlocks without transformers and no middle block."""
    mc, temb = 320, 1280
    s: Spec = {}
    _mlp(s, "time_embed", mc, temb, "0", "2")
    _mlp(s, "label_emb.0", 2816, temb, "0", "2")
    _conv(s, "input_blocks.0.0", 4, mc, (3, 3))
    for i, depth in enumerate((0, 0, 2, 2, 10, 10), start=1):
        _sdxl_resblock(s, f"input_blocks.{i}.0.", mc, mc, temb)
        if depth:
            _sdxl_transformer(s, f"input_blocks.{i}.1.", mc, 2048, depth)
    for i in range(7):
        _sdxl_resblock(s, f"output_blocks.{i}.0.", 2 * mc, mc, temb)
    _norm(s, "out.0", mc, bias=True)
    _conv(s, "out.2", mc, 4, (3, 3))
    return s


# ---------------------------------------------------------------------------------------------------------
# SD3 / SD3.5 (MMDiT)


def _sd3(rms_qk: bool, attn2_blocks: tuple[int, ...], depth: int = 2, ctx: int = 64, adm: int = 64,
         grid: int = 16) -> Spec:
    """MMDiT: detection sets hidden = 64 * depth (from x_embedder) with depth joint blocks; the last context block
    is pre-only. SD3.5 Large adds RMS q/k norms (ln_q/ln_k), SD3.5 Medium also a second x-attention (attn2)."""
    h = 64 * depth
    s: Spec = {"pos_embed": (1, grid * grid, h)}
    _conv(s, "x_embedder.proj", 16, h, (2, 2))
    _mlp(s, "t_embedder.mlp", 256, h, "0", "2")
    _mlp(s, "y_embedder.mlp", adm, h, "0", "2")
    _linear(s, "context_embedder", ctx, h)
    for i in range(depth):
        for block in ("context_block", "x_block"):
            p = f"joint_blocks.{i}.{block}."
            pre_only = block == "context_block" and i == depth - 1
            attns = ("attn", "attn2") if block == "x_block" and i in attn2_blocks else ("attn",)
            for a in attns:
                _linear(s, f"{p}{a}.qkv", h, 3 * h)
                if not pre_only:
                    _linear(s, f"{p}{a}.proj", h, h)
                if rms_qk:
                    _norm(s, f"{p}{a}.ln_q", 64)
                    _norm(s, f"{p}{a}.ln_k", 64)
            if not pre_only:
                _linear(s, p + "mlp.fc1", h, 4 * h)
                _linear(s, p + "mlp.fc2", 4 * h, h)
            _linear(s, p + "adaLN_modulation.1", h, (2 if pre_only else 3 * len(attns) + 3) * h)
    _linear(s, "final_layer.linear", h, 2 * 2 * 16)
    _linear(s, "final_layer.adaLN_modulation.1", h, 2 * h)
    return s


# ---------------------------------------------------------------------------------------------------------
# Flux.1 / Flux.2 / Chroma (BFL names; every head is 128 wide)


def _flux_blocks(s: Spec, h: int, double: int, single: int, mlp: int, gated: bool, bias: bool,
                 block_mod: bool) -> None:
    """Double- and single-stream blocks; ``gated``: SiLU-gated MLP (Flux.2), ``block_mod``: per-block modulation."""
    mlp_in = 2 * mlp if gated else mlp
    for i in range(double):
        for stream in ("img", "txt"):
            p = f"double_blocks.{i}.{stream}_"
            if block_mod:
                _linear(s, p + "mod.lin", h, 6 * h, bias)
            _linear(s, p + "attn.qkv", h, 3 * h, bias)
            _norm(s, p + "attn.norm.query_norm", 128, param="scale")
            _norm(s, p + "attn.norm.key_norm", 128, param="scale")
            _linear(s, p + "attn.proj", h, h, bias)
            _linear(s, p + "mlp.0", h, mlp_in, bias)
            _linear(s, p + "mlp.2", mlp, h, bias)
    for i in range(single):
        p = f"single_blocks.{i}."
        _linear(s, p + "linear1", h, 3 * h + mlp_in, bias)
        _linear(s, p + "linear2", h + mlp, h, bias)
        _norm(s, p + "norm.query_norm", 128, param="scale")
        _norm(s, p + "norm.key_norm", 128, param="scale")
        if block_mod:
            _linear(s, p + "modulation.lin", h, 3 * h, bias)


def _flux1(h: int = 128, double: int = 2, single: int = 2, ctx: int = 64, vec: int = 32) -> Spec:
    """Flux.1 dev: hidden from img_in, heads = hidden / 128 on 0.33 (fixed 24 on 0.3.75), guidance_in present."""
    s: Spec = {}
    _linear(s, "img_in", 64, h)
    _mlp(s, "time_in", 256, h, "in_layer", "out_layer")
    _mlp(s, "vector_in", vec, h, "in_layer", "out_layer")
    _mlp(s, "guidance_in", 256, h, "in_layer", "out_layer")
    _linear(s, "txt_in", ctx, h)
    _flux_blocks(s, h, double, single, 4 * h, gated=False, bias=True, block_mod=True)
    _linear(s, "final_layer.linear", h, 64)
    _linear(s, "final_layer.adaLN_modulation.1", h, 2 * h)
    return s


def _flux2(h: int = 128, double: int = 2, single: int = 2, ctx: int = 64) -> Spec:
    """Flux.2 dev: no biases, global modulation, SiLU-gated MLP of ratio 3, 128 latent channels, patch 1."""
    s: Spec = {}
    _linear(s, "img_in", 128, h, bias=False)
    _mlp(s, "time_in", 256, h, "in_layer", "out_layer", bias=False)
    _mlp(s, "guidance_in", 256, h, "in_layer", "out_layer", bias=False)
    _linear(s, "txt_in", ctx, h, bias=False)
    _linear(s, "double_stream_modulation_img.lin", h, 6 * h, bias=False)
    _linear(s, "double_stream_modulation_txt.lin", h, 6 * h, bias=False)
    _linear(s, "single_stream_modulation.lin", h, 3 * h, bias=False)
    _flux_blocks(s, h, double, single, 3 * h, gated=True, bias=False, block_mod=False)
    _linear(s, "final_layer.linear", h, 128, bias=False)
    _linear(s, "final_layer.adaLN_modulation.1", h, 2 * h, bias=False)
    return s


def _chroma(double: int = 1, single: int = 1, ctx: int = 64) -> Spec:
    """Chroma: Flux blocks without modulation, driven by the distilled_guidance_layer approximator whose sizes
    detection fixes (64 -> 5120 x 5 layers -> 3072), so hidden must be 3072."""
    h, a = 3072, 5120
    s: Spec = {}
    _linear(s, "img_in", 64, h)
    _linear(s, "txt_in", ctx, h)
    _linear(s, "distilled_guidance_layer.in_proj", 64, a)
    for i in range(5):
        _mlp(s, f"distilled_guidance_layer.layers.{i}", a, a, "in_layer", "out_layer")
        _norm(s, f"distilled_guidance_layer.norms.{i}", a, param="scale")
    _linear(s, "distilled_guidance_layer.out_proj", a, h)
    _flux_blocks(s, h, double, single, 4 * h, gated=False, bias=True, block_mod=False)
    _linear(s, "final_layer.linear", h, 64)
    return s


# ---------------------------------------------------------------------------------------------------------
# HunyuanVideo (Tencent's release names; ComfyUI renames them on load)


def _hunyuan_video(h: int = 128, double: int = 2, single: int = 2, ctx: int = 64) -> Spec:
    """HunyuanVideo t2v: heads = hidden / 128, vector_in fixed at 768 (CLIP-L pooled), two token-refiner blocks."""
    s: Spec = {}
    _conv(s, "img_in.proj", 16, h, (1, 2, 2))
    _mlp(s, "time_in.mlp", 256, h, "0", "2")
    _mlp(s, "vector_in", 768, h, "in_layer", "out_layer")
    _mlp(s, "guidance_in.mlp", 256, h, "0", "2")
    r = "txt_in."
    _linear(s, r + "input_embedder", ctx, h)
    _mlp(s, r + "t_embedder.mlp", 256, h, "0", "2")
    _mlp(s, r + "c_embedder", ctx, h, "linear_1", "linear_2")
    for i in range(2):
        p = f"{r}individual_token_refiner.blocks.{i}."
        _norm(s, p + "norm1", h, bias=True)
        _linear(s, p + "self_attn_qkv", h, 3 * h)
        _linear(s, p + "self_attn_proj", h, h)
        _norm(s, p + "norm2", h, bias=True)
        _linear(s, p + "mlp.fc1", h, 4 * h)
        _linear(s, p + "mlp.fc2", 4 * h, h)
        _linear(s, p + "adaLN_modulation.1", h, 2 * h)
    for i in range(double):
        for stream in ("img", "txt"):
            p = f"double_blocks.{i}.{stream}_"
            _linear(s, p + "mod.linear", h, 6 * h)
            _linear(s, p + "attn_qkv", h, 3 * h)
            _norm(s, p + "attn_q_norm", 128)
            _norm(s, p + "attn_k_norm", 128)
            _linear(s, p + "attn_proj", h, h)
            _linear(s, p + "mlp.fc1", h, 4 * h)
            _linear(s, p + "mlp.fc2", 4 * h, h)
    for i in range(single):
        p = f"single_blocks.{i}."
        _linear(s, p + "linear1", h, 3 * h + 4 * h)
        _linear(s, p + "linear2", h + 4 * h, h)
        _norm(s, p + "q_norm", 128)
        _norm(s, p + "k_norm", 128)
        _linear(s, p + "modulation.linear", h, 3 * h)
    _linear(s, "final_layer.linear", h, 16 * 2 * 2)
    _linear(s, "final_layer.adaLN_modulation.1", h, 2 * h)
    return s


# ---------------------------------------------------------------------------------------------------------
# Wan 2.1 / 2.2


def _wan(in_dim: int, out_dim: int, clip_image: bool = False, dim: int = 128, ffn: int = 256,
         layers: int = 2) -> Spec:
    """Wan: heads = dim / 128; text_dim 4096 (umT5) and the 1280-wide CLIP image projection are not read by
    detection, so they keep their real widths; ``clip_image``: Wan 2.1 i2v's img_emb and k_img/v_img."""
    s: Spec = {}
    _conv(s, "patch_embedding", in_dim, dim, (1, 2, 2))
    _mlp(s, "text_embedding", 4096, dim, "0", "2")
    _mlp(s, "time_embedding", 256, dim, "0", "2")
    _linear(s, "time_projection.1", dim, 6 * dim)
    for i in range(layers):
        p = f"blocks.{i}."
        s[p + "modulation"] = (1, 6, dim)
        for attn in ("self_attn", "cross_attn"):
            for proj in ("q", "k", "v", "o"):
                _linear(s, f"{p}{attn}.{proj}", dim, dim)
            _norm(s, f"{p}{attn}.norm_q", dim)
            _norm(s, f"{p}{attn}.norm_k", dim)
        if clip_image:
            _linear(s, p + "cross_attn.k_img", dim, dim)
            _linear(s, p + "cross_attn.v_img", dim, dim)
            _norm(s, p + "cross_attn.norm_k_img", dim)
        _norm(s, p + "norm3", dim, bias=True)
        _linear(s, p + "ffn.0", dim, ffn)
        _linear(s, p + "ffn.2", ffn, dim)
    s["head.modulation"] = (1, 2, dim)
    _linear(s, "head.head", dim, out_dim * 2 * 2)
    if clip_image:
        _norm(s, "img_emb.proj.0", 1280, bias=True)
        _linear(s, "img_emb.proj.1", 1280, 1280)
        _linear(s, "img_emb.proj.3", 1280, dim)
        _norm(s, "img_emb.proj.4", dim, bias=True)
    return s


# ---------------------------------------------------------------------------------------------------------
# LTXV, Qwen-Image, Lumina 2 / Z-Image, HiDream


def _ltxv(head_dim: int = 4, layers: int = 2) -> Spec:
    """LTX-Video 0.9: detection fixes 32 heads (head_dim = attn2.to_k rows / 32); 128 latent channels, captions
    4096 wide (T5-XXL) through caption_projection."""
    h = 32 * head_dim
    s: Spec = {"scale_shift_table": (2, h)}
    _linear(s, "patchify_proj", 128, h)
    _mlp(s, "adaln_single.emb.timestep_embedder", 256, h, "linear_1", "linear_2")
    _linear(s, "adaln_single.linear", h, 6 * h)
    _linear(s, "caption_projection.linear_1", 4096, h)
    _linear(s, "caption_projection.linear_2", h, h)
    for i in range(layers):
        p = f"transformer_blocks.{i}."
        s[p + "scale_shift_table"] = (6, h)
        for attn in ("attn1", "attn2"):
            _norm(s, f"{p}{attn}.q_norm", h)
            _norm(s, f"{p}{attn}.k_norm", h)
            for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                _linear(s, f"{p}{attn}.{proj}", h, h)
        _linear(s, p + "ff.net.0.proj", h, 4 * h)
        _linear(s, p + "ff.net.2", 4 * h, h)
    _linear(s, "proj_out", h, 128)
    return s


def _qwen_image(layers: int = 1) -> Spec:
    """Qwen-Image: detection reads only in_channels and the block count; 24 heads x 128 and the 3584-wide
    Qwen2.5-VL context are the model's fixed defaults."""
    h, ctx = 3072, 3584
    s: Spec = {}
    _mlp(s, "time_text_embed.timestep_embedder", 256, h, "linear_1", "linear_2")
    _norm(s, "txt_norm", ctx)
    _linear(s, "img_in", 64, h)
    _linear(s, "txt_in", ctx, h)
    for i in range(layers):
        p = f"transformer_blocks.{i}."
        for stream in ("img", "txt"):
            _linear(s, f"{p}{stream}_mod.1", h, 6 * h)
            _linear(s, f"{p}{stream}_mlp.net.0.proj", h, 4 * h)
            _linear(s, f"{p}{stream}_mlp.net.2", 4 * h, h)
        for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            _norm(s, f"{p}attn.{n}", 128)
        for proj in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            _linear(s, f"{p}attn.{proj}", h, h)
    _linear(s, "norm_out.linear", h, 2 * h)
    _linear(s, "proj_out", h, 64)
    return s


def _lumina2(z_image: bool, layers: int = 1) -> Spec:
    """NextDiT with its two noise- and two context-refiner blocks. Detection takes only dim and cap_feat_dim from
    cap_embedder and fills heads/rope only for dim 2304 (Lumina 2) or 3840 (Z-Image); any other dim leaves the
    defaults 32 heads and rope axes summing to 128, so the model refuses every dim but 4096."""
    dim, cap, heads, kv_heads, ffn = (3840, 2560, 30, 30, 10240) if z_image else (2304, 2304, 24, 8, 9216)
    head = dim // heads
    t_out = 256 if z_image else 1024  # Z-Image's timestep embedding feeds 256-wide adaLN inputs
    s: Spec = {}
    if z_image:
        s["x_pad_token"] = (1, dim)
        s["cap_pad_token"] = (1, dim)
    _linear(s, "x_embedder", 2 * 2 * 16, dim)
    blocks = [f"noise_refiner.{i}." for i in range(2)] + [f"layers.{i}." for i in range(layers)]
    for p in blocks + [f"context_refiner.{i}." for i in range(2)]:
        _linear(s, p + "attention.qkv", dim, (heads + 2 * kv_heads) * head, bias=False)
        _linear(s, p + "attention.out", dim, dim, bias=False)
        _norm(s, p + "attention.q_norm", head)
        _norm(s, p + "attention.k_norm", head)
        _linear(s, p + "feed_forward.w1", dim, ffn, bias=False)
        _linear(s, p + "feed_forward.w2", ffn, dim, bias=False)
        _linear(s, p + "feed_forward.w3", dim, ffn, bias=False)
        for n in ("attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2"):
            _norm(s, p + n, dim)
        if p in blocks:
            _linear(s, p + ("adaLN_modulation.0" if z_image else "adaLN_modulation.1"), min(dim, t_out), 4 * dim)
    _linear(s, "t_embedder.mlp.0", 256, 1024)
    _linear(s, "t_embedder.mlp.2", 1024, t_out)
    _norm(s, "cap_embedder.0", cap)
    _linear(s, "cap_embedder.1", cap, dim)
    if not z_image:  # Lumina 2's release has this (unused) RMSNorm, Z-Image's does not
        _norm(s, "norm_final", dim)
    _linear(s, "final_layer.linear", dim, 2 * 2 * 16)
    _linear(s, "final_layer.adaLN_modulation.1", t_out, dim)
    return s


def _hidream() -> Spec:
    """HiDream-I1: detection hard-codes the whole model (16 double + 32 single MoE blocks, 20 heads x 128,
    4 routed experts, 49 caption projections): nothing can shrink."""
    h, expert, shared = 2560, 6912, 3584
    s: Spec = {}
    _mlp(s, "t_embedder.timestep_embedder", 256, h, "linear_1", "linear_2")
    _linear(s, "p_embedder.pooled_embedder.linear_1", 2048, h)
    _linear(s, "p_embedder.pooled_embedder.linear_2", h, h)
    _linear(s, "x_embedder.proj", 64, h)

    def swiglu(p, inner):
        _linear(s, p + "w1", h, inner, bias=False)
        _linear(s, p + "w2", inner, h, bias=False)
        _linear(s, p + "w3", h, inner, bias=False)

    for kind, n, streams in (("double", 16, ("", "_t")), ("single", 32, ("",))):
        for i in range(n):
            p = f"{kind}_stream_blocks.{i}.block."
            _linear(s, p + "adaLN_modulation.1", h, 6 * len(streams) * h)
            for t in streams:
                for proj in ("to_q", "to_k", "to_v", "to_out"):
                    _linear(s, f"{p}attn1.{proj}{t}", h, h)
                _norm(s, f"{p}attn1.q_rms_norm{t}", h)
                _norm(s, f"{p}attn1.k_rms_norm{t}", h)
            swiglu(p + "ff_i.shared_experts.", shared)
            for e in range(4):
                swiglu(f"{p}ff_i.experts.{e}.", expert)
            s[p + "ff_i.gate.weight"] = (4, h)
            if kind == "double":
                swiglu(p + "ff_t.", expert)
    _linear(s, "final_layer.linear", h, 64)
    _linear(s, "final_layer.adaLN_modulation.1", h, 2 * h)
    for i in range(49):
        _linear(s, f"caption_projection.{i}.linear", 4096, h, bias=False)
    return s


# ---------------------------------------------------------------------------------------------------------
# the table


@dataclass(frozen=True)
class Arch:
    """One architecture.

    ``spec`` builds {key: shape}. ``expect`` maps a ComfyUI version to the model_config class
    (comfy.supported_models) its detection picks; ``unsupported`` maps a version to why that host cannot load
    this spec (measured). ``missing`` / ``unexpected``: per version, the keys that host's model has and the
    released files lack / the files have and that host's model drops (ComfyUI reports them on load).
    ``latent`` is the shape of x; ``inputs`` are the other ``apply_model`` arguments besides t: name -> shape
    (filled with N(0, 1)), or a value passed as is."""
    spec: Callable[[], Spec]
    latent: tuple[int, ...]
    inputs: dict[str, tuple[int, ...] | torch.Tensor | int]
    expect: dict[str, str]
    unsupported: dict[str, str] = field(default_factory=dict)
    missing: dict[str, tuple[str, ...]] = field(default_factory=dict)
    unexpected: dict[str, tuple[str, ...]] = field(default_factory=dict)


_FLUX_0375 = ("ComfyUI 0.3.75 detection fixes num_heads=24 with 128-wide heads (axes_dim [16,56,56]), so Flux() "
              "refuses any hidden_size but 3072 ('Hidden size 128 must be divisible by num_heads 24'); the smallest "
              "Flux it loads (1 double block, no single block) has 389 M parameters")
_FLUX2_0375 = ("ComfyUI 0.3.75 detection fixes num_heads=48 with 128-wide heads, so Flux.2 needs hidden_size 6144 "
               "('Hidden size 128 must be divisible by num_heads 48'); the smallest there (1 double block, no "
               "single block) has 1.70 B parameters")
_BOTH = ("0.3.75", "0.33.0")


def _on(cls: str, hosts=_BOTH) -> dict[str, str]:
    return {v: cls for v in hosts}


ARCHS: dict[str, Arch] = {
    "sdxl": Arch(_sdxl, (1, 4, 8, 8), {"c_crossattn": (1, 4, 2048), "y": (1, 2816)}, _on("SDXL")),
    "sd3": Arch(lambda: _sd3(rms_qk=False, attn2_blocks=()), (1, 16, 8, 8),
                {"c_crossattn": (1, 4, 64), "y": (1, 64)}, _on("SD3")),
    "sd35_medium": Arch(lambda: _sd3(rms_qk=True, attn2_blocks=(0,)), (1, 16, 8, 8),
                        {"c_crossattn": (1, 4, 64), "y": (1, 64)}, _on("SD3")),
    "flux1_dev": Arch(_flux1, (1, 16, 8, 8), {"c_crossattn": (1, 4, 64), "y": (1, 32), "guidance": (1,)},
                      _on("Flux", ("0.33.0",)), {"0.3.75": _FLUX_0375}),
    "flux2_dev": Arch(_flux2, (1, 128, 4, 4), {"c_crossattn": (1, 4, 64), "guidance": (1,)},
                      _on("Flux2", ("0.33.0",)), {"0.3.75": _FLUX2_0375}),
    "chroma": Arch(_chroma, (1, 16, 8, 8), {"c_crossattn": (1, 4, 64), "guidance": (1,)}, _on("Chroma")),
    "qwen_image": Arch(_qwen_image, (1, 16, 1, 8, 8), {"c_crossattn": (1, 4, 3584)}, _on("QwenImage")),
    "lumina2": Arch(lambda: _lumina2(z_image=False), (1, 16, 8, 8), {"c_crossattn": (1, 4, 2304), "num_tokens": 4},
                    _on("Lumina2"), unexpected={"0.33.0": ("norm_final.weight",)}),
    "z_image": Arch(lambda: _lumina2(z_image=True), (1, 16, 8, 8), {"c_crossattn": (1, 4, 2560), "num_tokens": 4},
                    _on("ZImage"), missing={"0.3.75": ("norm_final.weight",)}),
    # HiDream's inputs are read from HiDreamImageTransformer2DModel.forward; at 17 B parameters it never ran here
    "hidream": Arch(_hidream, (1, 16, 8, 8), {"c_crossattn": (1, 4, 4096), "y": (1, 2048),
                                              "encoder_hidden_states_llama3": (1, 32, 4, 4096)}, _on("HiDream")),
    "wan21_t2v": Arch(lambda: _wan(16, 16), (1, 16, 2, 8, 8), {"c_crossattn": (1, 4, 4096)}, _on("WAN21_T2V")),
    "wan21_i2v": Arch(lambda: _wan(36, 16, clip_image=True), (1, 16, 2, 8, 8),
                      {"c_crossattn": (1, 4, 4096), "c_concat": (1, 20, 2, 8, 8), "clip_fea": (1, 257, 1280)},
                      _on("WAN21_I2V")),
    "wan22_i2v": Arch(lambda: _wan(36, 16), (1, 16, 2, 8, 8),
                      {"c_crossattn": (1, 4, 4096), "c_concat": (1, 20, 2, 8, 8)}, _on("WAN21_T2V")),
    "wan22_ti2v": Arch(lambda: _wan(48, 48), (1, 48, 2, 8, 8), {"c_crossattn": (1, 4, 4096)}, _on("WAN22_T2V")),
    "hunyuan_video": Arch(_hunyuan_video, (1, 16, 2, 8, 8),
                          {"c_crossattn": (1, 4, 64), "y": (1, 768), "guidance": (1,)}, _on("HunyuanVideo")),
    "ltxv": Arch(_ltxv, (1, 128, 2, 4, 4), {"c_crossattn": (1, 4, 4096), "attention_mask": torch.ones(1, 4)},
                 _on("LTXV")),
}
"""name -> Arch. Wan 2.2 A14B t2v has Wan 2.1's layout (wan21_t2v); wan22_i2v is A14B i2v (36 input channels, no
CLIP image branch), wan22_ti2v the 5B model (48-channel latents)."""


# ---------------------------------------------------------------------------------------------------------
# public API


def spec(arch: str) -> Spec:
    """{key: shape} of ``arch``'s diffusion model, in file key order. Raises KeyError for an unknown arch."""
    return ARCHS[arch].spec()


def parameters(arch: str) -> int:
    """Number of parameters (elements) of ``arch``'s spec."""
    return sum(math.prod(shape) for shape in spec(arch).values())


def expected_class(arch: str, version: str) -> str:
    """Name of the comfy.supported_models class ComfyUI ``version`` detects for ``arch``.

    Raises LookupError with the measured reason when that host cannot load the arch, or when the version has
    not been measured."""
    a = ARCHS[arch]
    if version in a.expect:
        return a.expect[version]
    raise LookupError(a.unsupported.get(version, f"{arch} not measured on ComfyUI {version}"))


def _init(key: str, shape: tuple[int, ...], arch: str, seed: int) -> torch.Tensor:
    x = _randn(shape, "arch", arch, seed, key)
    if len(shape) >= 2:
        return x / math.sqrt(math.prod(shape[1:]))
    return x * 0.02 if key.endswith(".bias") else 1.0 + 0.02 * x


def state_dict(arch: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
               device: str = "cpu") -> dict[str, torch.Tensor]:
    """The diffusion model's tensors {key: tensor of the spec's shape, ``dtype``}, deterministic in ``seed``.

    ``device="meta"`` gives shape-only tensors (no memory, no values), for archs above `TINY_PARAMS`.
    Raises KeyError for an unknown arch."""
    if device == "meta":
        return {k: torch.empty(shape, dtype=dtype, device="meta") for k, shape in spec(arch).items()}
    return {k: _init(k, shape, arch, seed).to(dtype).contiguous() for k, shape in spec(arch).items()}


def write(arch: str, path: str | Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """Save ``state_dict(arch, dtype, seed)`` as a safetensors file (no metadata) at ``path``; returns the path."""
    path = Path(path)
    safetensors.torch.save_file(state_dict(arch, dtype, seed), str(path))
    return path


def load(comfy, arch: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0, device: str = "cpu"):
    """ComfyUI's ModelPatcher for ``arch``, loaded the way UNETLoader does.

    ``comfy`` is the imported ComfyUI ``comfy`` package. On ``device="cpu"`` ``state_dict(arch, dtype, seed)``
    goes through ``comfy.sd.load_diffusion_model_state_dict`` with the weights stored in ``dtype`` (a model may
    keep some in fp32, e.g. Wan's patch_embedding). On ``device="meta"`` the same detection
    (``model_config_from_unet``) picks the config, and the model is built and loaded on the meta device (shapes
    only, for archs above `TINY_PARAMS`; it cannot run). Raises ValueError when ComfyUI does not detect the
    architecture; ComfyUI's own errors (e.g. a width its model class refuses) pass through."""
    sd = state_dict(arch, dtype, seed, device)
    if device == "meta":
        config = comfy.model_detection.model_config_from_unet(sd, "")
        if config is None:
            raise ValueError(f"ComfyUI does not detect {arch}")
        config.set_inference_dtype(dtype, None)
        model = config.get_model(sd, "", device="meta")
        model.load_model_weights(sd, "")
        return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("meta"),
                                                offload_device=torch.device("meta"))
    patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": dtype})
    if patcher is None:
        raise ValueError(f"ComfyUI does not detect {arch}")
    return patcher


def forward_inputs(arch: str, seed: int = 0) -> dict:
    """Keyword arguments for ``model.model.apply_model(**inputs)``: ``x`` (the latent, float32, shape
    ``ARCHS[arch].latent``), ``t`` (sigma 0.5, shape [1]) and the conditioning the arch needs (``c_crossattn``
    [B, tokens, context width], pooled ``y``, ``guidance`` [B], ``c_concat`` image latents and mask,
    ``clip_fea``, ``attention_mask``; tensors float32 on the CPU, which ``apply_model`` casts) or plain values
    (Lumina's ``num_tokens``). The output of ``apply_model`` has the latent's shape. Raises KeyError for an
    unknown arch."""
    a = ARCHS[arch]
    out = {"x": _randn(a.latent, "inputs", arch, seed, "x"), "t": torch.tensor([0.5])}
    for name, value in a.inputs.items():
        out[name] = _randn(value, "inputs", arch, seed, name) if isinstance(value, tuple) else value
    return out


def main(argv=None) -> None:
    """CLI: write OUT_DIR/<arch>.safetensors in bf16, seed 0, for the named archs (default: those within
    `TINY_PARAMS`)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("archs", nargs="*", default=[a for a in ARCHS if parameters(a) <= TINY_PARAMS])
    args = p.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for a in args.archs:
        print(write(a, args.out_dir / f"{a}.safetensors"))


if __name__ == "__main__":
    main()
