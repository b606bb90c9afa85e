"""Quantized weights with one scale per tensor: ``W = qdata * scale``, patched in place.

ComfyUI loads quantized checkpoints (``comfy_quant`` / ``_quantization_metadata`` files; on 0.33 also the older
``scaled_fp8`` ones, comfy/utils.py ``convert_old_quants``) into ``QuantizedTensor`` parameters: the tensor keeps
its storage in ``_qdata`` and its scale in ``_params.scale`` (0.33: comfy-kitchen, comfy_kitchen/tensor/base.py)
or ``_layout_params["scale"]`` (0.3.75: comfy/quant_ops.py). Writing a plain tensor into either copies raw values
into the storage, ignoring the scale, so such weights must go through here. Layouts with one float32 scale per
tensor are handled, by duck typing (nothing imports ComfyUI or comfy-kitchen):

- ``TensorCoreFP8E4M3Layout`` / ``TensorCoreFP8E5M2Layout``: ``qdata`` float8_e4m3fn / float8_e5m2;
- ``TensorWiseINT8Layout``: ``qdata`` int8 (values -127..127; the layout's ``convrot`` variant is refused).

A bake dequantizes the pristine copy exactly in float32 (``qdata`` converts exactly; the product with the scale
is rounded once), merges the stack in float32 (``core.fuse``) and quantizes once, round-to-nearest-even, into the
same ``_qdata`` storage, with the checkpoint's scale. The scale is never changed: ComfyUI restores its backup
entries with ``param.data.copy_(backup)``, and ``.data`` of a comfy-kitchen ``QuantizedTensor`` shares ``_qdata``
but not the scale (measured on 0.33), so only an unchanged scale keeps ComfyUI's restores exact. Merged values
beyond ``scale * max(qdata dtype)`` (the LoRA made a weight larger than the checkpoint's largest) saturate at that
value, as rounding would put them there up to half a step beyond it; further out they are logged as saturated
(key and count). Every bake starts from the pristine copy, so cycles never accumulate, and a restore copies the
pristine ``qdata`` back (bit-exact). Other layouts (block-scaled NVFP4/MXFP8, W4A4/W4A8, ...) are refused with
``UnsupportedTarget``.
"""
from __future__ import annotations

import dataclasses

import torch

from .files import shown
from .fuse import Term, fused_weight

__all__ = ["is_quantized", "unsupported_reason", "dequantize", "write", "restore", "nbytes", "storage_dtype",
           "storage_ptr"]

_QMAX = {torch.float8_e4m3fn: float(torch.finfo(torch.float8_e4m3fn).max),
         torch.float8_e5m2: float(torch.finfo(torch.float8_e5m2).max), torch.int8: 127.0}
"""Storage dtypes handled, and the largest magnitude each holds (448, 57344, 127)."""
_TOP_STEP = {torch.float8_e4m3fn: 32.0, torch.float8_e5m2: 8192.0, torch.int8: 1.0}
"""The spacing of each storage dtype's values just below its largest (e4m3fn 416/448, e5m2 49152/57344)."""


def is_quantized(t) -> bool:
    """Whether ``t`` is a quantized tensor (a ``QuantizedTensor``: ``_qdata`` storage plus layout parameters)."""
    return isinstance(getattr(t, "_qdata", None), torch.Tensor) and (
        hasattr(t, "_params") or isinstance(getattr(t, "_layout_params", None), dict))


def _params(t) -> dict:
    """The layout parameters of a quantized ``t`` by name (comfy-kitchen's dataclass or 0.3.75's dict)."""
    params = getattr(t, "_params", None)
    if params is None:
        return dict(t._layout_params)
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}


def _scale(t) -> torch.Tensor:
    params = getattr(t, "_params", None)
    return t._layout_params["scale"] if params is None else params.scale


def unsupported_reason(t) -> str | None:
    """Why the quantized ``t`` cannot be patched here (its layout has more than one float32 scale per tensor, or
    an unknown storage dtype), or None when it can (or ``t`` is not quantized)."""
    if not is_quantized(t):
        return None
    params = _params(t)
    scale = params.get("scale")
    tensors = sorted(name for name, value in params.items() if isinstance(value, torch.Tensor))
    layout = getattr(t, "_layout_type", None) or getattr(t, "_layout_cls", None)
    layout = layout if isinstance(layout, str) else getattr(layout, "__name__", "unknown")
    if (t._qdata.dtype not in _QMAX or not isinstance(scale, torch.Tensor) or scale.numel() != 1
            or tensors != ["scale"] or params.get("convrot")):
        return (f"a {shown(layout, 40)} quantized weight (only fp8/int8 with one scale per tensor are patched in "
                "place)")
    return None


def dequantize(t) -> torch.Tensor:
    """``qdata * scale`` in float32, shape of the weight (``qdata``'s shape), on its device."""
    return t._qdata.float() * _scale(t).float()


def write(key: str, param, pristine, terms: list[Term]) -> int:
    """Quantize ``dequantize(pristine) + sum_i s_i * delta_i`` into ``param``'s own ``_qdata``, at the
    checkpoint's scale, round-to-nearest-even.

    Args:
        key: the weight key (for errors). param: the live quantized weight (a supported layout).
        pristine: the cached copy of its checkpoint value (same layout). terms: the key's terms.
    Returns:
        How many elements saturated more than half a quantization step beyond the scale's range (0 normally).
    Raises:
        FuseError: shape mismatch or a non-finite fp32 merge (nothing written).
    """
    merged = fused_weight(key, dequantize(pristine), terms, torch.float32)
    qdata, scale = param._qdata, _scale(pristine).float()
    qmax = _QMAX[qdata.dtype]
    values = merged.div_(scale)
    saturated = int((values.abs() > qmax + _TOP_STEP[qdata.dtype] / 2).sum())
    values.clamp_(-qmax, qmax)
    qdata.copy_(values.round_() if qdata.dtype == torch.int8 else values)
    return saturated


def restore(param, pristine) -> None:
    """Copy ``pristine``'s storage back into ``param``'s own (bit-exact, in place; the scale never changes)."""
    param._qdata.copy_(pristine._qdata)


def nbytes(t: torch.Tensor) -> int:
    """Bytes held by ``t``: storage plus scale for a quantized tensor."""
    if is_quantized(t):
        return t._qdata.numel() * t._qdata.element_size() + _scale(t).numel() * 4
    return t.numel() * t.element_size()


def storage_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype of ``t``'s storage (``qdata``'s for a quantized tensor)."""
    return t._qdata.dtype if is_quantized(t) else t.dtype


def storage_ptr(t: torch.Tensor) -> int:
    """Address of ``t``'s storage (``qdata``'s for a quantized tensor), to notice a host that moved it."""
    return t._qdata.data_ptr() if is_quantized(t) else t.data_ptr()
