"""LoRA layouts that ComfyUI's own key maps and converters miss, in one table.

ComfyUI maps a model's weights under many names (comfy/lora.py ``model_lora_keys_unet``: ``diffusion_model.<path>``,
kohya ``lora_unet_<path with _>``, diffusers/PEFT/SimpleTuner names per architecture, q/k/v onto slices of fused
weights) and converts a few whole-file layouts first (comfy/lora_convert.py ``convert_lora``: BFL control, Wan
Fun, USO). What trainers write beyond that, and what the pack adds for it, aliases only (a name ComfyUI already maps
keeps ComfyUI's target):

=======================  ==========================================  =============================================
names                    written by (code read)                       mapped to
=======================  ==========================================  =============================================
``<path>`` (bare)        DiffSynth-Studio (PEFT on ``pipe.dit``:       the weight or slice ComfyUI maps as
                         ``blocks.0.self_attn.q.lora_A.default``)     ``diffusion_model.<path>``
``lora_unet_<path_>``    musubi-tuner (networks/lora.py: prefix        same; e.g. Z-Image ``layers_0_attention_to_q``
                         ``lora_unet`` + module path, dots to ``_``)  onto the q third of ``attention.qkv``
                                                                      (ComfyUI issue 11487)
``transformer.<d>``,     diffusers ``WanTransformer3DModel`` / PEFT    Wan's own names, renamed back with diffusers'
``base_model.model.<d>`` (scripts/convert_wan_to_diffusers.py         table (``attn1.to_q`` = ``self_attn.q``,
                         ``TRANSFORMER_KEYS_RENAME_DICT``)            ``attn2.add_k_proj`` = ``cross_attn.k_img``,
                                                                      ``ffn.net.0.proj`` = ``ffn.0``, norms 2/3
                                                                      swapped)
``transformer.<path>``   diffusers ``LTXVideoTransformer3DModel``      LTXV's names (ComfyUI's are diffusers')
XLabs Flux tensors       x-flux (``DoubleStreamBlockLoraProcessor``:   ``img_attn.qkv``/``txt_attn.qkv``/
``processor.qkv_lora1``  ``qkv_lora1/2``, ``proj_lora1/2``,           ``img_attn.proj``/``txt_attn.proj``, single
``.down/.up.weight``     ``LoRALinearLayer``, no alpha)               ``qkv_lora`` onto ``linear1``'s q/k/v rows
PEFT DoRA tensors        PEFT (``lora_magnitude_vector``, per output   ComfyUI's ``dora_scale`` of the same module
``.lora_magnitude_vector``  row)
=======================  ==========================================  =============================================
"""
from __future__ import annotations

import re

import comfy.lora_convert

__all__ = ["extra_names", "convert_tensors"]

_WAN_DIFFUSERS = {"self_attn": "attn1", "cross_attn": "attn2", "q": "to_q", "k": "to_k", "v": "to_v",
                  "o": "to_out.0", "k_img": "add_k_proj", "v_img": "add_v_proj", "norm_q": "norm_q",
                  "norm_k": "norm_k", "norm_k_img": "norm_added_k", "norm2": "norm3", "norm3": "norm2"}
"""Wan module names -> diffusers' (convert_wan_to_diffusers.py), per dotted component of a block's path."""
_WAN_FFN = {"ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2"}

_NATIVE = "diffusion_model."


def _wan_diffusers(path: str) -> str | None:
    """diffusers' name of the Wan module ``blocks.N.<...>`` (None for modules outside the blocks)."""
    parts = path.split(".")
    if len(parts) < 3 or parts[0] != "blocks":
        return None
    rest = ".".join(parts[2:])
    if rest in _WAN_FFN:
        return f"blocks.{parts[1]}.{_WAN_FFN[rest]}"
    return ".".join(parts[:2] + [_WAN_DIFFUSERS.get(p, p) for p in parts[2:]])


_ARCH_NAMES = {  # model_config class name prefix -> (prefixes, native path -> that layout's path or None)
    "WAN": (("transformer.", "base_model.model."), _wan_diffusers),
    "LTXV": (("transformer.",), lambda path: path),
}


def extra_names(arch: str, key_map: dict) -> dict:
    """The names above for a model whose ComfyUI key map is ``key_map`` (``{LoRA module name: weight key or
    (weight key, (dim, start, length))}``) and whose model_config class is ``arch`` (e.g. ``WAN21_T2V``).

    Returns ``{new name: target}``, never a name already in ``key_map``. Raises nothing."""
    prefixes, rename = next(((p, f) for cls, (p, f) in _ARCH_NAMES.items() if arch.startswith(cls)), ((), None))
    extra = {}
    for name, target in key_map.items():
        if not name.startswith(_NATIVE):
            continue
        path = name[len(_NATIVE):]
        aliases = [path] + ([] if path.endswith(".bias") else ["lora_unet_" + path.replace(".", "_")])
        other = rename(path) if rename is not None else None
        if other is not None:
            aliases += [prefix + other for prefix in prefixes]
        for alias in aliases:
            if alias not in key_map:
                extra.setdefault(alias, target)
    return extra


_XLABS = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.processor\.(qkv|proj)_lora([12]?)\.(down|up)\.weight$")
_XLABS_TARGET = {("double_blocks", "qkv", "1"): "img_attn.qkv", ("double_blocks", "qkv", "2"): "txt_attn.qkv",
                 ("double_blocks", "proj", "1"): "img_attn.proj", ("double_blocks", "proj", "2"): "txt_attn.proj",
                 ("single_blocks", "qkv", ""): "linear1_qkv"}


def convert_tensors(tensors: dict) -> dict:
    """A LoRA file's tensors with the names ComfyUI's parser reads: ComfyUI's own whole-file converters
    (``comfy.lora_convert.convert_lora``, what stock LoraLoader runs first), XLabs Flux names to ComfyUI's
    (``diffusion_model.<block>.<target>.lora_down/up.weight``; unknown XLabs modules keep their names and are
    reported unmatched), PEFT ``X.lora_magnitude_vector[.weight]`` to ``X.dora_scale``. Tensors are not copied."""
    out = {}
    for name, tensor in tensors.items():
        m = _XLABS.match(name)
        target = m and _XLABS_TARGET.get((m[1], m[3], m[4]))
        if target:
            name = f"{_NATIVE}{m[1]}.{m[2]}.{target}.lora_{m[5]}.weight"
        elif name.endswith((".lora_magnitude_vector", ".lora_magnitude_vector.weight")):
            name = name[:name.rindex(".lora_magnitude_vector")] + ".dora_scale"
        out[name] = tensor
    return comfy.lora_convert.convert_lora(out)
