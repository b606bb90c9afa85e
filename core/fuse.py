"""Fused LoRA math: one fp32 pass per weight key, rounded once to the weight's dtype.

For a weight key with base weight ``W0`` (shape ``[out, *in_dims]``) and a stack of LoRA terms
``(s_i, up_i, down_i, alpha_i)`` this module computes

    W = round_to_dtype(W0_fp32 + sum_i s_i * (alpha_i / rank_i) * up_i @ down_i)

with every term of the key batched into ONE matmul by concatenating ranks:
``U = [s_1*a_1/r_1*up_1 | ... | s_n*a_n/r_n*up_n]`` (``[out, sum r_i]``), ``D = [down_1; ...; down_n]``
(``[sum r_i, prod(in_dims)]``), ``W = addmm(W0, U, D)``. The scale ``alpha/rank`` is the kohya/sd-scripts rule
(networks/lora.py: ``self.scale = alpha / self.lora_dim``), also PEFT's ``scaling = lora_alpha / r``; a file
without alpha uses scale 1.0 (ComfyUI comfy/weight_adapter/lora.py behaves the same).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["LoraFactors", "Term", "fused_weight", "fuse_into", "FuseError"]


class FuseError(ValueError):
    """A stack cannot be fused into a weight: shape mismatch or a non-finite result. Names the weight key."""


@dataclass(frozen=True, eq=False)
class LoraFactors:
    """The low-rank factors of one LoRA module for one weight key, ready to fuse.

    Attributes:
        up:    ``[out, r]`` (the "B" matrix; kohya ``lora_up``, PEFT ``lora_B``), flattened, in the file's dtype
               (a view of the file's tensor: building factors copies nothing; fusing upcasts to float32).
        down:  ``[r, prod(in_dims)]`` (the "A" matrix; kohya ``lora_down``, PEFT ``lora_A``), flattened, same;
               for a LoCon/LyCORIS Tucker ``lora_mid`` the mid factor is already folded in (float32, see
               ``from_tensors``).
        scale: ``alpha / r`` (dimensionless), 1.0 when the file stores no alpha.
        token: a string identifying the source (file identity + module name); equal tokens mean equal factors.
    """

    up: torch.Tensor
    down: torch.Tensor
    scale: float
    token: str

    @property
    def rank(self) -> int:
        """The rank ``r`` (number of columns of ``up``)."""
        return int(self.up.shape[1])

    @classmethod
    def from_tensors(cls, up: torch.Tensor, down: torch.Tensor, alpha: float | None, token: str,
                     mid: torch.Tensor | None = None) -> "LoraFactors":
        """Build factors from the tensors of a LoRA file (views, no copy, unless a mid factor is folded).

        Args:
            up:    ``[out, r]`` or ``[out, r, 1, 1]`` (conv), any float dtype.
            down:  ``[r, in]`` or ``[r, in, kh, kw]`` (conv); with ``mid``: ``[r, in, 1, 1]``.
            alpha: the file's alpha scalar, or None (scale 1.0). Scale is ``alpha / r`` with ``r = down.shape[0]``.
            token: identity string of the source, used to recognise an unchanged stack.
            mid:   optional LoCon Tucker core ``[r, r, kh, kw]`` (LyCORIS ``lora_mid``); folded into ``down`` as
                   ``down'[j, i, y, x] = sum_k mid[j, k, y, x] * down[k, i]`` (same contraction as LyCORIS
                   locon / ComfyUI weight_adapter/lora.py), giving ``[r, in, kh, kw]``.
        Raises:
            FuseError: if the ranks of ``up`` and ``down`` disagree.
        """
        up = up.detach().flatten(1)
        rank = down.shape[0]
        if mid is not None:
            down = torch.einsum("jkyx,ki->jiyx", mid.detach().float(), down.detach().float().flatten(1))
        down = down.detach().flatten(1)
        if up.shape[1] != rank:
            raise FuseError(f"{token}: lora_up has rank {up.shape[1]} but lora_down has rank {rank}")
        scale = 1.0 if alpha is None else float(alpha) / rank
        return cls(up, down, scale, token)

    def check(self, key: str, shape: tuple[int, ...]) -> None:
        """Raise FuseError (naming ``key``, the factor and weight shapes) unless ``up @ down`` fits ``shape``."""
        inner = 1
        for dim in shape[1:]:
            inner *= dim
        if len(shape) < 2 or self.up.shape[0] != shape[0] or self.down.shape[1] != inner:
            raise FuseError(
                f"{key}: LoRA {self.token} has up {tuple(self.up.shape)} / down {tuple(self.down.shape)}, which "
                f"does not fit the model weight {tuple(shape)}; the LoRA was made for another model")


Term = tuple[float, LoraFactors]
"""``(strength, factors)``: one LoRA's contribution to one weight key; strength is strength_model or
strength_clip (dimensionless)."""


def _factors32(key: str, shape, terms: Sequence[Term], device) -> tuple[torch.Tensor, torch.Tensor]:
    """``U = [s_i*scale_i*up_i]`` (``[out, R]``) and ``D = [down_i]`` (``[R, in]``), float32 on ``device``."""
    for _, f in terms:
        f.check(key, tuple(shape))
    ups = torch.cat([f.up.to(device, torch.float32) * (float(s) * f.scale) for s, f in terms], dim=1)
    downs = torch.cat([f.down.to(device, torch.float32) for _, f in terms], dim=0)
    return ups, downs


def _non_finite(key: str) -> FuseError:
    return FuseError(f"{key}: the merged weight has NaN/Inf values (a broken LoRA file or an absurd strength); "
                     "nothing was changed - check the LoRA file and the strengths")


def fused_weight(key: str, base: torch.Tensor, terms: Sequence[Term], dtype: torch.dtype) -> torch.Tensor:
    """Compute ``round_to(dtype)(base + sum_i s_i * scale_i * up_i @ down_i)`` for one weight key, out of place.

    Args:
        key:   the weight key (for error messages).
        base:  float32 base weight ``[out, *in_dims]`` (any device; the result is on the same device).
        terms: the stack's terms for this key (must not be empty).
        dtype: the model weight's dtype; the fp32 sum is rounded to it exactly once (round-to-nearest-even).
    Returns:
        A new contiguous tensor of ``base.shape`` and ``dtype``.
    Raises:
        FuseError: if a factor's shape does not match ``base`` or the result has NaN/Inf (in fp32 or after
            rounding, e.g. fp16 overflow).
    """
    ups, downs = _factors32(key, base.shape, terms, base.device)
    out = torch.addmm(base.reshape(base.shape[0], -1), ups, downs).reshape(base.shape).to(dtype)
    # One reduction instead of an elementwise isfinite: any NaN/Inf (also fp16 overflow in the rounding) makes
    # the fp32 sum non-finite, and a sum of finite weights cannot reach fp32's range.
    if not bool(torch.isfinite(out.sum(dtype=torch.float32))):
        raise _non_finite(key)
    return out.contiguous()


def _square_limit(dtype: torch.dtype) -> float:
    """A bound on ``sum(x**2)`` of a float32 block below which every element surely rounds to a finite ``dtype``
    value: (half the dtype's max)**2, capped for dtypes with float32's range. The factor 1/2 absorbs the float32
    summation error of the sum of squares (relative error << 1 for any block size used here)."""
    return (0.5 * min(torch.finfo(dtype).max, 1e18)) ** 2


def _surely_finite(block32: torch.Tensor, limit: float) -> bool:
    """True when the contiguous float32 ``block32`` is finite and fits ``limit`` (see ``_square_limit``); one
    vectorised dot product, ~2.5x cheaper than summing the rounded block. False means "check exactly": a NaN/Inf
    makes the dot NaN/Inf, and a legitimately large weight only costs the exact check."""
    flat = block32.view(-1)
    return bool(torch.dot(flat, flat) <= limit)


BLOCK_ELEMENTS = 1 << 18
"""Elements per row block of ``fuse_into`` (1 MiB of float32: the block stays in cache between the matmul, the
rounding copy into the weight and the finiteness check)..."""
BLOCK_MIN_ROWS = 128
"""...but at least this many rows, so the block's matmul ``[rows, R] @ [R, in]`` is tall enough to run near the
GEMM rate: for a 1280 x 11520 conv weight and R = 512 (8 LoRAs of rank 64) 22-row blocks took 1.75x as long as
128-row blocks (one thread, this machine); at R = 16 the two differ by under 10%."""


def fuse_into(key: str, param: torch.Tensor, base: torch.Tensor, terms: Sequence[Term]) -> None:
    """Write ``round_to(param.dtype)(base + sum_i s_i * scale_i * up_i @ down_i)`` into ``param`` in place.

    The same numbers as ``fused_weight``, computed in row blocks (``BLOCK_ELEMENTS``, ``BLOCK_MIN_ROWS``) so that
    mostly the base (read) and the weight (written) cross main memory; a non-contiguous weight (e.g.
    channels_last) is written in one piece.

    Args:
        key: the weight key (for error messages).
        param: the live weight ``[out, *in_dims]`` (float16/bfloat16/float32; written via ``.data``).
        base: its base, ``param``'s shape, float32 or native dtype, any device (upcast per block).
        terms: the stack's terms for this key (must not be empty).
    Raises:
        FuseError: shape mismatch (nothing written) or NaN/Inf in the result; in the latter case ``param`` may be
            partly written and the caller must restore it.
    """
    data = param.data
    if not data.is_contiguous():
        data.copy_(fused_weight(key, base.to(data.device, torch.float32), terms, data.dtype))
        return
    ups, downs = _factors32(key, data.shape, terms, data.device)
    out_rows = data.shape[0]
    flat, base_flat = data.view(out_rows, -1), base.reshape(out_rows, -1)
    step = max(BLOCK_MIN_ROWS, BLOCK_ELEMENTS // flat.shape[1])
    scratch = torch.empty(min(step, out_rows), flat.shape[1], dtype=torch.float32, device=data.device)
    limit = _square_limit(data.dtype)
    for r0 in range(0, out_rows, step):
        r1 = min(out_rows, r0 + step)
        block, out = flat[r0:r1], scratch[: r1 - r0]
        torch.addmm(base_flat[r0:r1].to(data.device, torch.float32), ups[r0:r1], downs, out=out)
        block.copy_(out)
        if not _surely_finite(out, limit) and not bool(torch.isfinite(block.sum(dtype=torch.float32))):
            raise _non_finite(key)
