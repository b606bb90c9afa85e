"""DynamicVRAM (ComfyUI 0.3x ``ModelPatcherDynamic`` with comfy-aimdo): the stack as one native patch per key.

Under the dynamic patcher nothing is baked when a model loads. The checkpoint's weights stay where they were
loaded (with comfy-aimdo: read-only memory-mapped file pages, ``comfy.utils.load_safetensors`` + ``assign=True``)
and each layer's weight is built when the layer runs: ComfyUI copies the base into the layer's VRAM slot (from a
pinned host copy once it has one), applies the key's patch list (``LowVramPatch`` -> ``comfy.lora.calculate_weight``)
and keeps the result in the slot until the slot is evicted or the patcher's ``patches_uuid`` changes (``set_dirty``
in ``ModelPatcherDynamic.load``; comfy/ops.py ``cast_modules_with_vbar`` / ``resolve_cast_module_with_vbar``).
Modules of at most 16 KiB are force-loaded instead: ``patch_weight_to_device(force_cast=True)`` puts a patched copy
in place of the parameter, keeps the original in ``backup`` and ``restore_loaded_backups`` swaps it back at the next
load. (ComfyUI 0.33.0, comfy/model_patcher.py.)

So on a dynamic patcher this pack writes nothing. Its stack is one ``PackPatch`` per weight key, first in
``patcher.patches[key]``; its ``calculate_weight`` returns ``round_to(model dtype)(base_fp32 + sum s_i*delta_i)``
from ``core.fused_weight``, the row-blocked pass the classic in-place bake runs, so both give the same bits on the
same device. The base is the checkpoint's own weight, which nobody writes: no base cache is kept and no restore
can drift. A model demoted to the classic patcher (``clone(disable_dynamic=True)``, ``get_non_dynamic_delegate()``:
TorchCompileModel, weight hooks) drops its ``PackPatch`` entries in ``ON_CLONE`` and takes the classic in-place
path (``lifecycle``). An fp16/bf16 overflow cannot be found while a layer runs (ComfyUI's cast path has no way back),
so it is ruled out when the node runs (``check_finite``).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import comfy.utils
import comfy.weight_adapter

from ..core import FuseError, Term, fused_weight, resolve, surely_finite

__all__ = ["is_dynamic", "PackPatch", "set_patches", "strip_patches", "on_clone", "check_finite", "note_load",
           "DynamicState", "states"]

_STATE_ATTR = "_batch_lora_dynamic"  # a DynamicState on the torch model (dies with it)
_ABSMAX_ATTR = "_batch_lora_absmax"  # (key, data_ptr) -> max|W0|: the base never changes under this patcher


def is_dynamic(patcher) -> bool:
    """Whether ``patcher`` is ComfyUI's ``ModelPatcherDynamic`` (its ``is_dynamic()``; 0.3.75 has neither)."""
    check = getattr(patcher, "is_dynamic", None)
    return bool(check()) if callable(check) else False


def model_dtype(model: torch.nn.Module, key: str) -> torch.dtype:
    """The dtype ``key``'s weight has in the model: ComfyUI's ``<name>_comfy_model_dtype`` (set by
    ``archive_model_dtypes`` and the aimdo loaders, which keep the file's tensor and cast on the way to the GPU),
    else the parameter's own dtype. The classic patcher stores the weight in this dtype."""
    target = resolve(model, key)
    return getattr(target.owner, f"{target.name}_comfy_model_dtype", None) or target.param.dtype


def _holds(compute: torch.dtype, storage: torch.dtype) -> bool:
    """Whether every ``storage`` value is exactly a ``compute`` value: at least as many mantissa bits, as large a
    maximum and as small a smallest subnormal (e.g. fp8 in fp16/bf16, anything in fp32; not fp16 in bf16)."""
    if compute == storage:
        return True
    c, s = torch.finfo(compute), torch.finfo(storage)
    return c.eps <= s.eps and c.max >= s.max and c.smallest_normal * c.eps <= s.smallest_normal * s.eps


@dataclass
class DynamicState:
    """What the pack knows of one torch model under the dynamic patcher (the status route shows it).

    labels: ``file@strength_model/strength_clip`` of the stack attached at the last load; keys: its weight keys;
    merges: ``PackPatch`` evaluations so far (one per key each time ComfyUI builds that layer's weight).
    """

    labels: tuple[str, ...] = ()
    keys: int = 0
    merges: int = 0


def _state(model: torch.nn.Module) -> DynamicState:
    return model.__dict__.setdefault(_STATE_ATTR, DynamicState())


_MODELS: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


def states() -> list[tuple[torch.nn.Module, DynamicState]]:
    """``(torch model, DynamicState)`` for every live model the pack has patched under the dynamic patcher."""
    return [(model, _state(model)) for model in list(_MODELS)]


class _Base:
    """The exact base of one key: its dtype in the model, and, when the weight ComfyUI hands to ``PackPatch`` is
    in a dtype that cannot hold it (e.g. bf16 weights cast to fp16 by ``lora_compute_dtype``), the parameter itself
    (the checkpoint's tensor, which nobody writes under this patcher)."""

    def __init__(self, model: torch.nn.Module, key: str):
        self.model = weakref.ref(model)
        self.key = key
        self.dtype = model_dtype(model, key)

    def fetch(self, device) -> torch.Tensor:
        """The base on ``device``, in the model dtype."""
        return comfy.utils.get_attr(self.model(), self.key).detach().to(device).to(self.dtype)

    def count(self) -> None:
        model = self.model()
        if model is not None:
            _state(model).merges += 1


class PackPatch(comfy.weight_adapter.WeightAdapterBase):
    """This pack's whole stack for one weight key, as a ComfyUI weight adapter (comfy/weight_adapter/base.py).

    ``weights`` is ``(base, terms)``: a ``_Base`` and the key's ``(strength, factors)`` terms. It holds no tensor
    at its top level, so ComfyUI's staging (``comfy.lora.prefetch_prepared_value``, which rebuilds an adapter as
    ``type(a)(a.loaded_keys, staged weights)``) copies nothing; the factors move to the weight's device per merge.
    """

    name = "batch_lora"

    def __init__(self, loaded_keys, weights):
        self.loaded_keys = loaded_keys
        self.weights = weights

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        """``round_to(model dtype)(base_fp32 + sum s_i*delta_i)``, returned in ``weight``'s dtype and device.

        Args: ``weight``: the key's base as ComfyUI hands it over (first in the patch list, so no other patch is in
        it), any float dtype; the rest as ComfyUI's ``calculate_weight`` passes them (this pack's entries always
        carry strength 1, no offset, no function). Raises FuseError (non-finite result; ruled out beforehand by
        ``check_finite``)."""
        base, terms = self.weights
        source = weight if _holds(weight.dtype, base.dtype) else base.fetch(weight.device)
        out = fused_weight(key, source, terms, base.dtype)
        base.count()
        return out.to(weight.dtype)


def strip_patches(patcher) -> None:
    """Remove this pack's ``PackPatch`` entries from ``patcher.patches`` (other patches stay, in order)."""
    for key in [k for k, entries in patcher.patches.items() if any(isinstance(p[1], PackPatch) for p in entries)]:
        rest = [p for p in patcher.patches[key] if not isinstance(p[1], PackPatch)]
        if rest:
            patcher.patches[key] = rest
        else:
            del patcher.patches[key]


def set_patches(patcher, plan: Mapping[str, Sequence[Term]]) -> None:
    """Make ``patcher.patches`` carry ``plan`` (weight key -> terms): one ``PackPatch`` per key, first in the key's
    list, so it is evaluated on the plain base; any earlier ``PackPatch`` is replaced. Does not touch
    ``patches_uuid`` (the caller sets it)."""
    strip_patches(patcher)
    for key, terms in plan.items():
        entry = (1.0, PackPatch(set(), (_Base(patcher.model, key), tuple(terms))), 1.0, None, None)
        patcher.patches[key] = [entry] + patcher.patches.get(key, [])
    if plan:
        _MODELS.add(patcher.model)


def on_clone(source, clone) -> None:
    """CallbacksMP.ON_CLONE: a clone demoted to the classic patcher drops this pack's ``PackPatch`` entries; the
    classic in-place bake (``lifecycle``'s injection) applies the same stack instead."""
    if not is_dynamic(clone):
        strip_patches(clone)


def check_finite(patcher, plan: Mapping[str, Sequence[Term]], node: str) -> None:
    """Rule out a non-finite merged weight (fp16/bf16 overflow) before ComfyUI evaluates any ``PackPatch``.

    Each key is proven finite from bounds (``core.surely_finite`` with ``max|W0|``, read once per key and cached:
    the base never changes under this patcher); a key the bounds cannot clear is merged once on the CPU.

    Raises:
        FuseError: ``node`` and the key, when the merged weight has NaN/Inf values.
    """
    cache = patcher.model.__dict__.setdefault(_ABSMAX_ATTR, {})
    for key, terms in plan.items():
        param = resolve(patcher.model, key).param.detach()
        dtype = model_dtype(patcher.model, key)
        absmax = cache.get((key, param.data_ptr()))
        if absmax is None:  # in the model dtype, as the layer gets it (the file may hold e.g. fp8)
            absmax = cache[(key, param.data_ptr())] = float(param.to(dtype).float().abs().amax())
        if not surely_finite(absmax, terms, dtype):
            try:
                fused_weight(key, param.to(dtype), terms, dtype)
            except FuseError as exc:
                raise FuseError(f"{node}: {exc}") from None


def note_load(patcher, labels: Sequence[str], keys: int) -> None:
    """The injection under the dynamic patcher: record the stack now attached to the model (nothing is written)."""
    state = _state(patcher.model)
    state.labels, state.keys = tuple(labels), keys
