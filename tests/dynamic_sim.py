"""A CPU simulation of ComfyUI's DynamicVRAM (``ModelPatcherDynamic`` + comfy-aimdo), for tests only.

Real (ComfyUI's own code, unchanged): ``ModelPatcherDynamic`` (``load``: ``restore_loaded_backups``, ``set_dirty``
on a ``patches_uuid`` change, ``setup_param`` -> ``LowVramPatch`` for patched keys, force-loads of small modules
through ``patch_weight_to_device``; ON_LOAD at every load), the read-only memory-mapped checkpoint load
(``comfy.utils.load_safetensors`` through comfy-aimdo's ``ModelMMAP``, ``assign=True``) and the cast-time code that
builds a layer's weight (``comfy.ops.resolve_cast_module_with_vbar``: dequantize/cast, the ``LowVramPatch``, the
write-back into the VRAM slot, resident reuse), plus ``LowVramPatch.prepare`` staging the patches into a buffer.

Simulated (there is no GPU here): the VRAM. Each module ComfyUI gave a vbar allocation (``_v``) gets a CPU byte
buffer standing for its slot, and a generation number: a slot is resident while its generation matches the
signature ComfyUI stored (``_v_signature``); ``evict()`` bumps every generation, as comfy-aimdo does when it takes
VRAM back. ``comfy.ops.cast_bias_weight`` is replaced, for modules with ``_v`` only, by: fault the slot, copy the
CPU weights into it when not resident (ComfyUI's transfer), then ComfyUI's own ``resolve_cast_module_with_vbar``.
ComfyUI's ``ModelPatcherDynamic.__new__`` (which sends CPU load devices to the classic patcher) and
``_vbar_get`` (None on CPU) are replaced so the dynamic patcher runs with the CPU as its load device.

    import dynamic_sim; dynamic_sim.enable()   # after comfy_aimdo.control.init(), before any model is loaded
    with dynamic_sim.mapped_load(): model, clip, ... = comfy.sd.load_checkpoint_guess_config(...)
"""
from __future__ import annotations

import contextlib
import itertools

import torch
import comfy.memory_management as memory
import comfy.model_patcher as mp
import comfy.ops
import comfy_aimdo.model_vbar

_generation = itertools.count(1)


class FakeVBAR:
    """Stands for one model's ``comfy_aimdo.model_vbar.ModelVBAR`` (the VRAM arena ComfyUI allocates slots from).

    ``alloc(size)`` returns a slot handle ``(vbar, offset, size)`` like aimdo's; ``fault(slot)`` returns the slot's
    signature (its generation) and ``free_memory``/``evict`` drop every slot's contents."""

    def __init__(self):
        self.slots: dict[int, list] = {}  # offset -> [bytes buffer or None, generation]
        self.end = 0

    def alloc(self, size):
        handle = (self, self.end, size)
        self.slots[self.end] = [None, next(_generation)]
        self.end += size
        return handle

    def evict(self) -> int:
        """Forget every slot's contents (a later cast copies and patches again); returns the bytes dropped."""
        freed = 0
        for slot in self.slots.values():
            freed += 0 if slot[0] is None else slot[0].numel()
            slot[0], slot[1] = None, next(_generation)
        return freed

    def free_memory(self, size):
        return self.evict()

    def prioritize(self):
        pass

    def loaded_size(self):
        return sum(0 if s[0] is None else s[0].numel() for s in self.slots.values())


def _cast_with_slot(s, dtype, device, bias_dtype, compute_dtype, want_requant):
    """The vbar branch of ComfyUI's cast_bias_weight, with a CPU buffer for the slot."""
    vbar, offset, _ = s._v
    slot = vbar.slots[offset]
    signature = slot[1]
    resident = slot[0] is not None and s._v_signature == signature
    if not resident:
        geometry = memory.tensors_to_geometries([s.weight, s.bias])
        slot[0] = torch.empty(memory.vram_aligned_size(geometry), dtype=torch.uint8)
        for source, view in zip([s.weight, s.bias], memory.interpret_gathered_like(geometry, slot[0])):
            if view is not None:
                view.copy_(source)  # the host-to-VRAM transfer (with the model-dtype cast aimdo does on the way)
        for param_key in ("weight", "bias"):
            lowvram = getattr(s, param_key + "_lowvram_function", None)
            if lowvram is not None:
                staged = torch.empty(max(1, lowvram.memory_required()), dtype=torch.uint8)
                lowvram.prepare(staged, None, copy=True, commit=True)  # ComfyUI's staging of the patches
    s._prefetch = {"signature": signature, "resident": resident, "xfer_dest": slot[0], "cast_dest": None,
                   "cast_geometry": memory.tensors_to_geometries([s.weight, s.bias]), "needs_cast": False}
    try:
        return comfy.ops.resolve_cast_module_with_vbar(s, dtype, device, bias_dtype, compute_dtype, want_requant)
    finally:
        for param_key in ("weight", "bias"):
            lowvram = getattr(s, param_key + "_lowvram_function", None)
            if lowvram is not None:
                lowvram.clear_prepared()
        del s._prefetch


def effective(module, dtype=None):
    """``(weight, bias)`` as the layer would run with them now: through the simulated slot for modules ComfyUI
    gave one, else the parameters themselves (force-loaded or classic). ``dtype``: the compute dtype (default:
    the weight's model dtype)."""
    if not hasattr(module, "_v"):
        return module.weight, module.bias
    dtype = dtype or getattr(module, "weight_comfy_model_dtype", None) or module.weight.dtype
    return _cast_with_slot(module, dtype, torch.device("cpu"), dtype, None, False)


_ORIGINAL = {}


def enable() -> None:
    """Make ComfyUI build dynamic patchers for the CPU and run their layers through simulated VRAM slots
    (idempotent). Call ``comfy_aimdo.control.init()`` first, before ComfyUI is imported."""
    if _ORIGINAL:
        return
    _ORIGINAL.update(new=mp.ModelPatcherDynamic.__new__, vbar=mp.ModelPatcherDynamic._vbar_get,
                     cast=comfy.ops.cast_bias_weight, unpin=comfy_aimdo.model_vbar.vbar_unpin)
    mp.ModelPatcherDynamic.__new__ = lambda cls, *args, **kwargs: object.__new__(cls)

    def vbar_get(self, create=False):
        vbar = self.model.dynamic_vbars.get(self.load_device)
        if create and vbar is None:
            vbar = self.model.dynamic_vbars[self.load_device] = FakeVBAR()
        return vbar

    def cast_bias_weight(s, input=None, dtype=None, device=None, bias_dtype=None, offloadable=False,
                         compute_dtype=None, want_requant=False):
        if not isinstance(getattr(s, "_v", None), tuple):
            return _ORIGINAL["cast"](s, input, dtype, device, bias_dtype, offloadable, compute_dtype, want_requant)
        dtype = dtype or input.dtype
        weight, bias = _cast_with_slot(s, dtype, device or input.device, bias_dtype or dtype, compute_dtype,
                                       want_requant)
        return (weight, bias, (None, None, None)) if offloadable else (weight, bias)

    def vbar_unpin(handle):
        if not isinstance(handle, tuple):
            _ORIGINAL["unpin"](handle)

    mp.ModelPatcherDynamic._vbar_get = vbar_get
    comfy.ops.cast_bias_weight = cast_bias_weight
    comfy_aimdo.model_vbar.vbar_unpin = vbar_unpin
    mp.CoreModelPatcher = mp.ModelPatcherDynamic


def classic() -> contextlib.AbstractContextManager:
    """Within it, ComfyUI's loaders build classic ``ModelPatcher`` objects (the reference path)."""
    return _core_patcher(mp.ModelPatcher)


@contextlib.contextmanager
def _core_patcher(cls):
    saved = mp.CoreModelPatcher
    mp.CoreModelPatcher = cls
    try:
        yield
    finally:
        mp.CoreModelPatcher = saved


@contextlib.contextmanager
def mapped_load():
    """Within it, checkpoints load as comfy-aimdo does with DynamicVRAM: read-only memory-mapped file pages
    assigned as the parameters (``comfy.memory_management.aimdo_enabled``)."""
    saved = memory.aimdo_enabled
    memory.aimdo_enabled = True
    try:
        yield
    finally:
        memory.aimdo_enabled = saved


def evict(model) -> int:
    """Drop the simulated VRAM contents of a patcher's model (``model.model.dynamic_vbars``)."""
    return sum(v.evict() for v in model.model.dynamic_vbars.values() if isinstance(v, FakeVBAR))


__all__ = ["enable", "classic", "mapped_load", "effective", "evict", "FakeVBAR"]
