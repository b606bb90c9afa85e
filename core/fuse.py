"""Fused merge math: one fp32 pass per weight key, rounded once to the weight's dtype.

For a weight key with base weight ``W0`` (shape ``[out, *in_dims]``) and a stack of terms ``(s_i, factors_i)``
this module computes

    W = round_to_dtype(W0_fp32 + sum_i s_i * delta_i)

where ``delta_i`` is what one LoRA file contributes at strength 1 (every format below is linear in ``s``):

- ``LoraFactors`` (LoRA/LoCon, kohya, diffusers, PEFT): ``delta = alpha/rank * up @ down``. All plain LoRA terms of
  a key are batched into ONE matmul by concatenating ranks: ``U = [s_1*a_1/r_1*up_1 | ... ]`` (``[out, sum r_i]``),
  ``D = [down_1; ...]`` (``[sum r_i, prod(in_dims)]``), ``W = addmm(W0, U, D)``. The scale ``alpha/rank`` is the
  kohya/sd-scripts rule (networks/lora.py: ``self.scale = alpha / self.lora_dim``), also PEFT's
  ``scaling = lora_alpha / r``; a file without alpha uses scale 1.0 (as ComfyUI comfy/weight_adapter/lora.py).
- ``LohaFactors`` (LyCORIS LoHa), ``LokrFactors`` (LyCORIS LoKr), ``DiffFactors`` (full/diff weight patches) and
  ``DoraFactors`` (DoRA magnitude normalisation around any of the others): dense deltas, computed per row block
  and added to the block after the batched LoRA matmul.
- ``SliceFactors``: any of the above on rows ``start:start+length`` of a fused weight (ComfyUI's offset patches,
  e.g. the q/k/v thirds of Flux ``img_attn.qkv``); the delta is 0 outside the slice. A key's rows are cut into
  segments at every slice boundary; in each segment the LoRA terms that cover it (whole-weight and slice alike)
  form one matmul, so several slices and several files on one key are still one pass.

Every factor class has ``token`` (identity of the source), ``check(key, shape)`` and ``delta_rows``; the merge
runs in row blocks (``fuse_into``) so only the base and the weight cross main memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence, Union

import torch

__all__ = ["LoraFactors", "LohaFactors", "LokrFactors", "DiffFactors", "DoraFactors", "SliceFactors", "Factors",
           "Term",
           "fused_weight", "fuse_into", "surely_finite", "FuseError"]


class FuseError(ValueError):
    """A stack cannot be fused into a weight: shape mismatch or a non-finite result. Names the weight key (never
    the internal ``token``, which holds a server path)."""

    __module__ = "batch_lora.core"  # the type's name in ComfyUI's error reports, whatever the install path


def _f32(t: torch.Tensor, device) -> torch.Tensor:
    return t.detach().to(device, torch.float32)


def _inner(shape) -> int:
    n = 1
    for dim in shape[1:]:
        n *= dim
    return n


def _absmax(t: torch.Tensor, dim=None) -> torch.Tensor:
    t = t.detach().float().abs()
    return t.amax() if dim is None else t.amax(dim)


def _lowrank_bound(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None = None) -> float:
    """An upper bound on ``max|a @ b|`` (``a`` ``[out, r]``, ``b`` ``[r, in...]``): ``sum_k max|a[:, k]| *
    max|b[k]|``; with a Tucker core ``t`` ``[r, r, kh, kw]`` (``a`` ``[r, out]``, LyCORIS layout) the bound of
    ``einsum("ijyx,jc,ip->pcyx", t, b, a)``: ``sum_ij max|t[i, j]| * max|b[j]| * max|a[i]|``."""
    b_rows = _absmax(b.flatten(1), 1)
    if t is None:
        return float((_absmax(a.flatten(1), 0) * b_rows).sum())
    t_max = _absmax(t.flatten(2), 2)
    return float((t_max * b_rows[None, :] * _absmax(a.flatten(1), 1)[:, None]).sum())


def _check(factors, key: str, shape: tuple[int, ...], what: str) -> None:
    """Raise FuseError (naming ``key``, the factors and the weight shape) unless ``factors.rows_cols`` fits."""
    if len(shape) < 1 or factors.rows_cols != (shape[0], _inner(shape)):
        raise FuseError(f"{key}: {type(factors).__name__} has {what}, which does not fit the model "
                        f"weight {tuple(shape)}; the LoRA was made for another model")


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

    @property
    def rows_cols(self) -> tuple[int, int]:
        """``(out, prod(in_dims))`` of the delta."""
        return int(self.up.shape[0]), int(self.down.shape[1])

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
            raise FuseError(f"lora_up has rank {up.shape[1]} but lora_down has rank {rank}")
        scale = 1.0 if alpha is None else float(alpha) / rank
        return cls(up, down, scale, token)

    def check(self, key: str, shape: tuple[int, ...]) -> None:
        """Raise FuseError (naming ``key``, the factor and weight shapes) unless ``up @ down`` fits ``shape``."""
        if len(shape) < 2:
            raise FuseError(f"{key}: a LoRA patches a weight of shape {tuple(shape)}, not a matrix")
        _check(self, key, shape, f"up {tuple(self.up.shape)} / down {tuple(self.down.shape)}")

    def context(self, base: torch.Tensor, device):
        """Per-key float32 operands ``(scale * up, down)`` (used when wrapped by ``DoraFactors``; standalone LoRA
        terms are batched by the merge itself). ``base`` is unused."""
        return _f32(self.up, device) * self.scale, _f32(self.down, device)

    def delta_rows(self, ctx, base_rows: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """Rows ``r0:r1`` of ``alpha/r * up @ down``, float32 ``[r1-r0, prod(in_dims)]``."""
        up, down = ctx
        return up[r0:r1] @ down

    def bound(self, base_absmax: float) -> float:
        """An upper bound on ``max|delta|`` at strength 1 (``base_absmax`` unused; computed once per factor set)."""
        return self._unit_bound

    @cached_property
    def _unit_bound(self) -> float:
        return abs(self.scale) * _lowrank_bound(self.up, self.down)


@dataclass(frozen=True, eq=False)
class LohaFactors:
    """LyCORIS LoHa (Hadamard product of two low-rank matrices) for one weight key.

    ``delta = alpha/r * (w1_a @ w1_b) * (w2_a @ w2_b)`` (elementwise product), reshaped to the weight; with the
    Tucker cores ``t1``/``t2`` (conv) each factor is ``einsum("ijyx,jc,ip->pcyx", t, w_b, w_a)``. Source:
    LyCORIS lycoris/modules/loha.py (``diff_weight``/``make_weight_cp``), as read by ComfyUI
    comfy/weight_adapter/loha.py.

    Attributes:
        w1_a, w2_a: ``[out, r]``, or ``[r, out]`` with Tucker; w1_b, w2_b: ``[r, prod(in_dims)]``, or ``[r, in]``
            with Tucker; t1, t2: ``[r, r, kh, kw]`` Tucker cores or None. Views of the file's tensors.
        scale: ``alpha / r`` with ``r = w1_b.shape[0]``, 1.0 without alpha. token: as ``LoraFactors.token``.
    """

    w1_a: torch.Tensor
    w1_b: torch.Tensor
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    t1: torch.Tensor | None
    t2: torch.Tensor | None
    scale: float
    token: str

    @staticmethod
    def _hada_shape(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None) -> tuple[int, int]:
        if t is None:
            return int(a.shape[0]), int(b.shape[1])
        if t.ndim != 4:
            return -1, -1  # a Tucker core is [r, r, kh, kw]; anything else fits no weight
        return int(a.shape[1]), int(b.shape[1] * t.shape[2] * t.shape[3])

    @property
    def rows_cols(self) -> tuple[int, int]:
        """``(out, prod(in_dims))`` of the first Hadamard factor (``check`` requires both to agree)."""
        return self._hada_shape(self.w1_a, self.w1_b, self.t1)

    def check(self, key: str, shape: tuple[int, ...]) -> None:
        """Raise FuseError naming ``key`` unless both Hadamard factors fit ``shape``."""
        for a, b, t in ((self.w1_a, self.w1_b, self.t1), (self.w2_a, self.w2_b, self.t2)):
            if self._hada_shape(a, b, t) != (shape[0], _inner(shape)):
                raise FuseError(f"{key}: LoHa has hada factors {tuple(a.shape)} / {tuple(b.shape)}"
                                f"{'' if t is None else f' / core {tuple(t.shape)}'}, which do not fit the model "
                                f"weight {tuple(shape)}; the LoRA was made for another model")

    def context(self, base: torch.Tensor, device):
        """Per-key float32 copies of the factors."""
        return [None if t is None else _f32(t, device)
                for t in (self.w1_a, self.w1_b, self.w2_a, self.w2_b, self.t1, self.t2)]

    def delta_rows(self, ctx, base_rows: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """Rows ``r0:r1`` of the delta, float32 ``[r1-r0, prod(in_dims)]``."""
        w1a, w1b, w2a, w2b, t1, t2 = ctx
        if t1 is None:
            m1, m2 = w1a[r0:r1] @ w1b, w2a[r0:r1] @ w2b
        else:
            m1 = torch.einsum("ijyx,jc,ip->pcyx", t1, w1b, w1a[:, r0:r1]).flatten(1)
            m2 = torch.einsum("ijyx,jc,ip->pcyx", t2, w2b, w2a[:, r0:r1]).flatten(1)
        return m1.mul_(m2).mul_(self.scale)

    def bound(self, base_absmax: float) -> float:
        """An upper bound on ``max|delta|`` at strength 1: the product of both factors' bounds."""
        return (abs(self.scale) * _lowrank_bound(self.w1_a, self.w1_b, self.t1)
                * _lowrank_bound(self.w2_a, self.w2_b, self.t2))


@dataclass(frozen=True, eq=False)
class LokrFactors:
    """LyCORIS LoKr (Kronecker product) for one weight key.

    ``delta = scale * kron(w1, w2)`` reshaped to the weight, ``w1 = lokr_w1`` or ``lokr_w1_a @ lokr_w1_b``
    (``[o1, i1]``), ``w2 = lokr_w2`` or ``lokr_w2_a @ lokr_w2_b`` or, with the Tucker core ``lokr_t2``,
    ``einsum("ijyx,jc,ip->pcyx", t2, w2_b, w2_a)`` (``[o2, i2(, kh, kw)]``). Flattened, element
    ``[a*o2 + b, c*n2 + e] = w1[a, c] * w2[b, e]`` with ``n2 = prod(w2.shape[1:])``. Source: LyCORIS
    lycoris/modules/lokr.py (``make_kron``), as read by ComfyUI comfy/weight_adapter/lokr.py.

    Attributes:
        w1, w1_a, w1_b, w2, w2_a, w2_b, t2: the file's tensors (views) or None, as present.
        scale: ``alpha / r`` where ``r`` is the rank of a decomposed factor (``w2_b`` wins over ``w1_b``, as in
            ComfyUI); 1.0 without alpha or when both factors are full matrices (LyCORIS then ignores alpha).
        token: as ``LoraFactors.token``.
    """

    w1: torch.Tensor | None
    w1_a: torch.Tensor | None
    w1_b: torch.Tensor | None
    w2: torch.Tensor | None
    w2_a: torch.Tensor | None
    w2_b: torch.Tensor | None
    t2: torch.Tensor | None
    scale: float
    token: str

    @property
    def rows_cols(self) -> tuple[int, int]:
        """``(o1*o2, i1*n2)`` of the delta."""
        o1, i1 = self.w1.shape if self.w1 is not None else (self.w1_a.shape[0], self.w1_b.shape[1])
        if self.w2 is not None:
            o2, n2 = self.w2.shape[0], _inner(self.w2.shape)
        elif self.t2 is None:
            o2, n2 = self.w2_a.shape[0], self.w2_b.shape[1]
        else:
            o2, n2 = self.w2_a.shape[1], self.w2_b.shape[1] * self.t2.shape[2] * self.t2.shape[3]
        return int(o1 * o2), int(i1 * n2)

    def check(self, key: str, shape: tuple[int, ...]) -> None:
        """Raise FuseError naming ``key`` unless both Kronecker factors are present and ``kron(w1, w2)`` fits
        ``shape``."""
        for j, full, a, b in (("1", self.w1, self.w1_a, self.w1_b), ("2", self.w2, self.w2_a, self.w2_b)):
            if full is None and (a is None or b is None):
                raise FuseError(f"{key}: LoKr has neither lokr_w{j} nor both lokr_w{j}_a and "
                                f"lokr_w{j}_b; the file is incomplete (re-export it)")
        if self.t2 is not None and self.t2.ndim != 4:
            raise FuseError(f"{key}: LoKr has a Tucker core lokr_t2 of shape {tuple(self.t2.shape)}, "
                            "not [r, r, kh, kw]")
        _check(self, key, shape, f"kron(w1, w2) of shape {self.rows_cols}")

    def context(self, base: torch.Tensor, device):
        """Per-key float32 ``(w1 [o1, i1], w2 [o2, n2])``."""
        w1 = _f32(self.w1, device) if self.w1 is not None else _f32(self.w1_a, device) @ _f32(self.w1_b, device)
        if self.w2 is not None:
            w2 = _f32(self.w2, device).flatten(1)
        elif self.t2 is None:
            w2 = _f32(self.w2_a, device) @ _f32(self.w2_b, device)
        else:
            w2 = torch.einsum("ijyx,jc,ip->pcyx", _f32(self.t2, device), _f32(self.w2_b, device),
                              _f32(self.w2_a, device)).flatten(1)
        return w1.flatten(1), w2

    def delta_rows(self, ctx, base_rows: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """Rows ``r0:r1`` of the delta, float32 ``[r1-r0, i1*n2]``."""
        w1, w2 = ctx
        rows = torch.arange(r0, r1, device=w1.device)
        o2 = w2.shape[0]
        return (w1[rows // o2][:, :, None] * w2[rows % o2][:, None, :]).flatten(1).mul_(self.scale)

    def bound(self, base_absmax: float) -> float:
        """An upper bound on ``max|delta|`` at strength 1: ``max|w1| * max|w2|``, each bounded from its factors."""
        w1 = float(_absmax(self.w1)) if self.w1 is not None else _lowrank_bound(self.w1_a, self.w1_b)
        if self.w2 is not None:
            w2 = float(_absmax(self.w2))
        elif self.t2 is None:
            w2 = _lowrank_bound(self.w2_a, self.w2_b)
        else:
            w2 = _lowrank_bound(self.w2_a, self.w2_b, self.t2)
        return abs(self.scale) * w1 * w2


@dataclass(frozen=True, eq=False)
class DiffFactors:
    """A full weight difference for one key (ComfyUI's "diff" patch: ``.diff``, ``.diff_b``, ``.w_norm``,
    ``.b_norm``; comfy/lora.py ``load_lora``): ``delta = diff``, same shape as the weight (any rank, biases
    included). ``diff`` is a view of the file's tensor; token as ``LoraFactors.token``."""

    diff: torch.Tensor
    token: str

    @property
    def rows_cols(self) -> tuple[int, int]:
        """``(shape[0], prod(shape[1:]))`` of the diff."""
        return int(self.diff.shape[0]), _inner(self.diff.shape)

    def check(self, key: str, shape: tuple[int, ...]) -> None:
        """Raise FuseError naming ``key`` unless the diff has exactly the weight's shape."""
        if tuple(self.diff.shape) != tuple(shape):
            raise FuseError(f"{key}: diff has shape {tuple(self.diff.shape)}, which does not fit the "
                            f"model weight {tuple(shape)}; the LoRA was made for another model")

    def context(self, base: torch.Tensor, device):
        """The diff, flattened to ``[out, inner]`` (upcast per block)."""
        return self.diff.detach().reshape(self.diff.shape[0], -1)

    def delta_rows(self, ctx, base_rows: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """Rows ``r0:r1`` of the diff, float32."""
        return _f32(ctx[r0:r1], base_rows.device)

    def bound(self, base_absmax: float) -> float:
        """``max|diff|``."""
        return float(_absmax(self.diff))


EPS = torch.finfo(torch.float32).eps
"""Added to DoRA's norms (as LyCORIS and ComfyUI comfy/weight_adapter/base.py ``weight_decompose`` do)."""


@dataclass(frozen=True, eq=False)
class DoraFactors:
    """DoRA (weight-decomposed low-rank adaptation, Liu et al. 2024) around another factor set, for one key.

    With ``V = W0 + inner_delta`` (``inner``: LoRA/LoHa/LoKr factors at strength 1), the DoRA weight is
    ``W' = V * m / (||V|| + EPS)`` where ``m`` is the file's ``dora_scale`` and ``||V||`` is the L2 norm of ``V`` on
    the axis ``m`` spans: per output row when ``m.shape[0] == out`` (PEFT layout ``[out, 1]``), otherwise per input
    channel over (out, kh, kw) (LyCORIS layout ``[1, in(, 1, 1)]``), as LyCORIS ``apply_weight_decompose``. This
    term's delta at strength ``s`` is ``s * (W' - W0)``, ``W0`` the exact fp32 base, as ComfyUI's
    ``weight_decompose`` applies strength (comfy/weight_adapter/base.py). Note: ComfyUI 0.3.75 divides the
    per-output-row layout by ``||W0||`` instead of ``||V||``; this pack follows the DoRA definition there.

    Attributes:
        inner: the low-rank factors (their ``check``/``delta_rows`` give ``inner_delta``).
        magnitude: ``dora_scale`` (view of the file's tensor), ``out`` or ``in`` elements.
        token: as ``LoraFactors.token``.
    """

    inner: Union[LoraFactors, LohaFactors, LokrFactors]
    magnitude: torch.Tensor
    token: str

    @property
    def rows_cols(self) -> tuple[int, int]:
        """Those of ``inner``."""
        return self.inner.rows_cols

    def _on_rows(self, shape) -> bool:
        return self.magnitude.shape[0] == shape[0] and self.magnitude.numel() == shape[0]

    def check(self, key: str, shape: tuple[int, ...]) -> None:
        """Raise FuseError naming ``key`` unless ``inner`` and the magnitude vector fit ``shape``."""
        self.inner.check(key, shape)
        if len(shape) < 2 or not (self._on_rows(shape) or self.magnitude.numel() == shape[1]):
            raise FuseError(f"{key}: DoRA has dora_scale {tuple(self.magnitude.shape)}, which fits "
                            f"neither the rows nor the input channels of the model weight {tuple(shape)}")

    def context(self, base: torch.Tensor, device):
        """``(inner context, m / (||V|| + EPS) or None)``: for the input-channel layout the column norms of ``V``
        are summed here in one pre-pass over row blocks (the only whole-matrix reduction of any format)."""
        inner = self.inner.context(base, device)
        if self._on_rows(base.shape):
            return inner, None
        out, cols = base.shape
        sq = torch.zeros(cols, dtype=torch.float32, device=device)
        step = max(1, BLOCK_ELEMENTS // cols)
        for r0 in range(0, out, step):
            v = _f32(base[r0:r0 + step], device) + self.inner.delta_rows(inner, None, r0, min(out, r0 + step))
            sq += (v * v).sum(0)
        channels = self.magnitude.numel()
        norm = sq.view(channels, -1).sum(1).sqrt_().add_(EPS)
        factor = (_f32(self.magnitude, device).flatten() / norm).repeat_interleave(cols // channels)
        return inner, factor

    def delta_rows(self, ctx, base_rows: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """Rows ``r0:r1`` of ``W' - W0`` at strength 1, float32."""
        inner, factor = ctx
        v = base_rows + self.inner.delta_rows(inner, base_rows, r0, r1)
        if factor is None:
            factor = _f32(self.magnitude, v.device).flatten()[r0:r1, None] / (v.norm(dim=1, keepdim=True) + EPS)
        return v.mul_(factor).sub_(base_rows)

    def bound(self, base_absmax: float) -> float:
        """An upper bound on ``max|W' - W0|`` at strength 1: ``max|m| + max|W0|`` (every element of ``V`` is at
        most the norm it is divided by)."""
        return float(_absmax(self.magnitude)) + base_absmax


WholeFactors = Union[LoraFactors, LohaFactors, LokrFactors, DiffFactors, DoraFactors]


@dataclass(frozen=True, eq=False)
class SliceFactors:
    """A patch of rows ``start:start+length`` of a fused weight: ``delta[start:start+length] = inner's delta``,
    0 elsewhere.

    This is ComfyUI's offset patch ``((key, (0, start, length)), adapter)``: its LoRA key maps put the separate
    q/k/v (and MLP) projections that diffusers, PEFT, ai-toolkit and SimpleTuner train onto slices of the fused
    weights of the checkpoint, e.g. Flux ``double_blocks.N.img_attn.qkv.weight`` (``[3h, h]``, q/k/v thirds)
    and ``single_blocks.N.linear1.weight`` (``[7h, h]``: q, k, v, then the MLP's ``4h`` rows), SD3
    ``joint_blocks.N.x_block.attn.qkv.weight`` (comfy/utils.py ``flux_to_diffusers``, ``mmdit_to_diffusers``).
    ComfyUI applies the adapter to ``weight.narrow(0, start, length)`` (comfy/lora.py ``calculate_weight``);
    this is the same delta. Only row slices (dim 0) exist in ComfyUI's key maps, so only they are modelled.

    Attributes:
        inner: the factors of the slice (their shapes fit ``[length, *in_dims]``; DoRA norms are the slice's).
        start, length: the slice's first row and row count. token: as ``LoraFactors.token`` (names the slice).
    """

    inner: WholeFactors
    start: int
    length: int
    token: str

    def check(self, key: str, shape: tuple[int, ...]) -> None:
        """Raise FuseError naming ``key`` unless the rows fit the weight and ``inner`` fits the slice."""
        if len(shape) < 1 or self.start < 0 or self.length < 1 or self.start + self.length > shape[0]:
            raise FuseError(f"{key}: a patch of rows {self.start}:{self.start + self.length} does not fit the "
                            f"model weight {tuple(shape)}; the LoRA was made for another model")
        self.inner.check(key, (self.length, *shape[1:]))

    def bound(self, base_absmax: float) -> float:
        """``inner``'s bound (the delta is 0 outside the slice)."""
        return self.inner.bound(base_absmax)


Factors = Union[WholeFactors, SliceFactors]

Term = tuple[float, Factors]
"""``(strength, factors)``: one LoRA's contribution to one weight key; strength is strength_model or
strength_clip (dimensionless)."""


def surely_finite(base_absmax: float, terms: Sequence[Term], dtype: torch.dtype) -> bool:
    """Whether ``round_to(dtype)(base + sum_i s_i * delta_i)`` is surely finite, from bounds alone (no merge):
    ``base_absmax + sum_i |s_i| * bound_i <= max(dtype) / 2`` (each factor set's ``bound``; the margin absorbs
    float32 rounding). False means "not proven" (check by merging), not "overflows".

    Args:
        base_absmax: ``max|W0|`` of the key's base weight. terms: the key's terms. dtype: the weight's dtype.
    """
    total = base_absmax + sum(abs(float(s)) * f.bound(base_absmax) for s, f in terms)
    return math.isfinite(total) and total <= 0.5 * torch.finfo(dtype).max


def _non_finite(key: str) -> FuseError:
    return FuseError(f"{key}: the merged weight has NaN/Inf values (a broken LoRA file or an absurd strength); "
                     "nothing was changed - check the LoRA file and the strengths")


def _rows_of(factors: Factors, rows: int) -> tuple[WholeFactors, int, int]:
    """``(whole-weight factors, first row, end row)`` of a term on a weight with ``rows`` rows."""
    if type(factors) is SliceFactors:
        return factors.inner, factors.start, factors.start + factors.length
    return factors, 0, rows


class _Merge:
    """One key's merge, evaluated per row block: ``base + U @ D`` (the plain LoRA terms covering the block in one
    matmul), then each dense term's ``s * delta_rows`` added, all in float32.

    The rows are cut into segments at every slice boundary (``SliceFactors``); a block never crosses a segment,
    and each segment has its own ``(U, D)`` (``D`` shared by segments with the same LoRA terms)."""

    def __init__(self, key: str, base: torch.Tensor, terms: Sequence[Term], device):
        for _, f in terms:
            f.check(key, tuple(base.shape))
        self.base = base.reshape(base.shape[0], -1)
        self.device = device
        rows = self.base.shape[0]
        placed = [(float(s), *_rows_of(f, rows)) for s, f in terms]
        plain = [type(f) is LoraFactors for _, f, _, _ in placed]
        contexts = [None if plain[i] else f.context(self.base[lo:hi], device)
                    for i, (_, f, lo, hi) in enumerate(placed)]
        cuts = sorted({0, rows, *(lo for *_, lo, _ in placed), *(hi for *_, hi in placed)})
        downs: dict[tuple[int, ...], torch.Tensor] = {}
        self.segments = []  # (r0, r1, (U [r1-r0, R], D [R, inner]) or None, [(s, factors, ctx, first row)])
        for r0, r1 in zip(cuts, cuts[1:]):
            inside = [i for i, (_, _, lo, hi) in enumerate(placed) if lo <= r0 and r1 <= hi]
            lora = [i for i in inside if plain[i]]
            ud = None
            if lora:
                key_set = tuple(lora)
                if key_set not in downs:
                    downs[key_set] = torch.cat([_f32(placed[i][1].down, device) for i in lora], dim=0)
                ud = (torch.cat([_f32(f.up[r0 - lo:r1 - lo], device) * (s * f.scale)
                                 for s, f, lo, _ in (placed[i] for i in lora)], dim=1), downs[key_set])
            dense = [(placed[i][0], placed[i][1], contexts[i], placed[i][2]) for i in inside if i not in lora]
            self.segments.append((r0, r1, ud, dense))

    def blocks(self, step: int):
        """``(r0, r1, segment)`` row blocks of at most ``step`` rows, none crossing a segment boundary."""
        for segment in self.segments:
            for r0 in range(segment[0], segment[1], step):
                yield r0, min(segment[1], r0 + step), segment

    def rows(self, r0: int, r1: int, segment, out: torch.Tensor) -> torch.Tensor:
        """Write rows ``r0:r1`` (inside ``segment``) of the fp32 merge into ``out`` (``[r1-r0, inner]`` float32)
        and return it."""
        start, _, ud, dense = segment
        base = self.base[r0:r1]
        if ud is not None:
            torch.addmm(_f32(base, self.device), ud[0][r0 - start:r1 - start], ud[1], out=out)
        else:
            out.copy_(base)
        if dense:
            base32 = _f32(base, self.device)
            for s, f, ctx, first in dense:
                out.add_(f.delta_rows(ctx, base32, r0 - first, r1 - first), alpha=s)
        return out


def fused_weight(key: str, base: torch.Tensor, terms: Sequence[Term], dtype: torch.dtype,
                 check: bool = True) -> torch.Tensor:
    """Compute ``round_to(dtype)(base + sum_i s_i * delta_i)`` for one weight key, out of place.

    The same row-blocked pass as ``fuse_into`` (one code path, so an out-of-place result and an in-place write of
    the same stack on the same device are equal bit for bit).

    Args:
        key:   the weight key (for error messages).
        base:  base weight ``[out, *in_dims]``, float32 or any float dtype (upcast per block; any device, the
               result is on the same device).
        terms: the stack's terms for this key (must not be empty).
        dtype: the model weight's dtype; the fp32 sum is rounded to it exactly once (round-to-nearest-even).
        check: screen for NaN/Inf (as ``fuse_into``).
    Returns:
        A new contiguous tensor of ``base.shape`` and ``dtype``.
    Raises:
        FuseError: if a factor's shape does not match ``base`` or (with ``check``) the result has NaN/Inf (in
            fp32 or after rounding, e.g. fp16 overflow).
    """
    out = torch.empty(base.shape, dtype=dtype, device=base.device)
    _fuse_blocks(key, out, base, terms, check)
    return out


def _square_limit(dtype: torch.dtype) -> float:
    """A bound on ``sum(x**2)`` of a float32 block below which every element surely rounds to a finite ``dtype``
    value: (half the dtype's max)**2, capped for dtypes with float32's range. The factor 1/2 absorbs the float32
    summation error of the sum of squares (relative error << 1 for any block size used here)."""
    return (0.5 * min(torch.finfo(dtype).max, 1e18)) ** 2


def _block_finite(block32: torch.Tensor, limit: float) -> bool:
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


def fuse_into(key: str, param: torch.Tensor, base: torch.Tensor, terms: Sequence[Term], check: bool = True) -> None:
    """Write ``round_to(param.dtype)(base + sum_i s_i * delta_i)`` into ``param`` in place.

    Computed in row blocks (``BLOCK_ELEMENTS``, ``BLOCK_MIN_ROWS``) so that mostly the base (read) and the weight
    (written) cross main memory; a non-contiguous weight (e.g. channels_last) gets ``fused_weight``'s result in
    one copy.

    Args:
        key: the weight key (for error messages).
        param: the live weight ``[out, *in_dims]`` (float16/bfloat16/float32; written via ``.data``).
        base: its base, ``param``'s shape, float32 or native dtype, any device (upcast per block).
        terms: the stack's terms for this key (must not be empty).
        check: screen each block for NaN/Inf. A caller that proved the result finite from bounds
            (``surely_finite``) passes False and saves a pass over every block.
    Raises:
        FuseError: shape mismatch (nothing written) or NaN/Inf in the result; in the latter case ``param`` may be
            partly written and the caller must restore it.
    """
    data = param.data
    if data.is_contiguous():
        _fuse_blocks(key, data, base, terms, check)
    else:
        data.copy_(fused_weight(key, base.to(data.device), terms, data.dtype, check))


def _fuse_blocks(key: str, data: torch.Tensor, base: torch.Tensor, terms: Sequence[Term], check: bool = True) -> None:
    """The merge itself: row blocks of ``base + terms`` in float32, each rounded into the contiguous ``data``
    and, with ``check``, screened for NaN/Inf (``FuseError``, ``data`` then partly written)."""
    merge = _Merge(key, base, terms, data.device)
    out_rows = data.shape[0]
    flat = data.view(out_rows, -1)
    step = max(BLOCK_MIN_ROWS, BLOCK_ELEMENTS // flat.shape[1])
    scratch = torch.empty(min(step, out_rows), flat.shape[1], dtype=torch.float32, device=data.device)
    limit = _square_limit(data.dtype)
    for r0, r1, segment in merge.blocks(step):
        block, out = flat[r0:r1], merge.rows(r0, r1, segment, scratch[: r1 - r0])
        block.copy_(out)
        if check and not _block_finite(out, limit) and not bool(torch.isfinite(block.sum(dtype=torch.float32))):
            raise _non_finite(key)
