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

__all__ = ["LoraFactors", "Term", "fused_weight", "FuseError"]


class FuseError(ValueError):
    """A stack cannot be fused into a weight: shape mismatch or a non-finite result. Names the weight key."""


@dataclass(frozen=True, eq=False)
class LoraFactors:
    """The low-rank factors of one LoRA module for one weight key, ready to fuse.

    Attributes:
        up:    float32 ``[out, r]`` (the "B" matrix; kohya ``lora_up``, PEFT ``lora_B``), flattened.
        down:  float32 ``[r, prod(in_dims)]`` (the "A" matrix; kohya ``lora_down``, PEFT ``lora_A``), flattened;
               for a LoCon/LyCORIS Tucker ``lora_mid`` the mid factor is already folded in (see ``from_tensors``).
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
        """Build factors from the tensors of a LoRA file, converting to float32 on the CPU.

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
        up32 = up.detach().to("cpu", torch.float32).flatten(1)
        down32 = down.detach().to("cpu", torch.float32)
        rank = down32.shape[0]
        if mid is not None:
            mid32 = mid.detach().to("cpu", torch.float32)
            down32 = torch.einsum("jkyx,ki->jiyx", mid32, down32.flatten(1))
        down32 = down32.flatten(1)
        if up32.shape[1] != rank:
            raise FuseError(f"{token}: lora_up has rank {up32.shape[1]} but lora_down has rank {rank}")
        scale = 1.0 if alpha is None else float(alpha) / rank
        return cls(up32.contiguous(), down32.contiguous(), scale, token)

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


def fused_weight(key: str, base: torch.Tensor, terms: Sequence[Term], dtype: torch.dtype) -> torch.Tensor:
    """Compute ``round_to(dtype)(base + sum_i s_i * scale_i * up_i @ down_i)`` for one weight key.

    Args:
        key:   the weight key (for error messages).
        base:  float32 base weight ``[out, *in_dims]`` (any device; the result is on the same device).
        terms: the stack's terms for this key; an empty sequence returns ``base`` rounded to ``dtype``.
        dtype: the model weight's dtype; the fp32 sum is rounded to it exactly once (round-to-nearest-even).
    Returns:
        A new contiguous tensor of ``base.shape`` and ``dtype``.
    Raises:
        FuseError: if a factor's shape does not match ``base`` or the result has NaN/Inf (in fp32 or after
            rounding, e.g. fp16 overflow).
    """
    out_rows = base.shape[0]
    flat = base.reshape(out_rows, -1)
    if terms:
        for _, f in terms:
            f.check(key, tuple(base.shape))
        device = base.device
        ups = torch.cat([f.up.to(device) * (float(s) * f.scale) for s, f in terms], dim=1)
        downs = torch.cat([f.down.to(device) for _, f in terms], dim=0)
        flat = torch.addmm(flat, ups, downs)
    out = flat.reshape(base.shape).to(dtype)
    # One reduction instead of an elementwise isfinite: any NaN/Inf (also fp16 overflow in the rounding) makes
    # the fp32 sum non-finite, and a sum of finite weights cannot reach fp32's range.
    if not bool(torch.isfinite(out.sum(dtype=torch.float32))):
        raise FuseError(f"{key}: the merged weight has NaN/Inf values (a broken LoRA file or an absurd strength); "
                        "nothing was changed - check the LoRA file and the strengths")
    return out.contiguous()
