"""How this pack rides ComfyUI's ModelPatcher lifecycle (ComfyUI 0.3.75 / 0.33.0 comfy/model_patcher.py).

A Batch LoRA Loader output is a ``ModelPatcher`` clone that carries a ``StackSpec`` attachment, a
``PatcherInjection`` under this pack's key and a deterministic ``patches_uuid``. ComfyUI's ``partially_load`` runs
inside ``use_ejected(skip_and_inject_on_exit_only=True)``, so every load of a patcher ends with its injections'
``inject``, whatever else the load did; this pack's ``inject`` (``_inject``) fuses the patcher's stack in place
through ``core.InPlacePatcher`` (only the keys whose terms changed), and its ``eject`` does nothing: the weights
stay baked, as ComfyUI's own patches stay baked while a model is ejected.

On the classic patcher every stack on one base model has the same ``patches_uuid`` (``uuid5(base uuid,
"batch-lora")``). A change of stack (a switch or a strength edit) is then no weight change to ComfyUI: it restores
nothing, does not move the model to its offload device and back, and this pack's ``inject`` writes each key once,
the keys of the new stack baked straight from the base, the keys that leave it restored. A plain path or Reset
Adapters has the base model's own uuid: ComfyUI then restores every entry of the shared ``backup`` dict.

Every key this pack writes is registered in that ``backup`` dict as a ``PackBackup`` whose ``weight`` is the
pack's exact base copy (or, on a key that also carries a stock ComfyUI patch, ComfyUI's own entry), so any
ComfyUI restore (plain path, unload, CheckpointSave's forced re-patch, lowvram partial unload) puts the key back
bit-exactly, and ``isinstance(backup[key], PackBackup)`` tells the pack that the key still holds its terms.
Consequences: an unchanged stack costs one signature comparison per load (no merge, no write); a changed stack
costs one fused write per changed key; the pack holds no second copy of a weight.
"""
from __future__ import annotations

import logging
import os
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Mapping, NamedTuple, Sequence

import psutil
import torch
import comfy.model_management
import comfy.utils
from comfy.patcher_extension import CallbacksMP, PatcherInjection, WrappersMP

from . import dynamic
from ..core import (ApplyInterrupted, BaseCache, InPlacePatcher, Term, UnsupportedTarget, frozen_reason,
                    return_freed_memory, wrappers)

__all__ = ["StackSpec", "PackBackup", "with_stack", "stack_of", "engine_for", "engines", "release_caches", "RELEASED",
           "check_not_frozen", "describe"]

log = logging.getLogger("comfyui-batch-lora")

KEY = "batch_lora"
RELEASE_KEY = "batch_lora_release_cache"  # attachment: drop base copies once this patcher's load restored them
_NAMESPACE = uuid.UUID("5f0c2a9e-9a51-4c53-9a8e-3c0b7a1e0b1d")


@dataclass(frozen=True)
class StackSpec:
    """The stack a patcher carries.

    plan: weight key -> terms ``(strength, factors)`` (``core.fuse`` factor sets).
    signature: text identifying files (path, size, mtime), modules and strengths; equal text = equal weights.
    own_uuid: the ``patches_uuid`` this pack gave the patcher (classic: the same for every stack on one base).
    clean_uuid: the ``patches_uuid`` of the same model without this pack's stack, None if unknown (stock
        patches were added after this pack's stack).
    labels: ``name@strength_model/strength_clip`` per LoRA, for logs; node: the loader node, for errors.
    """

    plan: Mapping[str, Sequence[Term]]
    signature: str
    own_uuid: uuid.UUID
    clean_uuid: uuid.UUID | None = None
    labels: tuple[str, ...] = field(default=())
    node: str = "Batch LoRA Loader"


class PackBackup(NamedTuple):
    """A ComfyUI ``backup`` entry for a key this pack patched (ComfyUI reads ``.weight``/``.inplace_update``).

    weight: the exact base to restore (the pack's base copy, float32 or native dtype, on the offload device);
    inplace_update: always True for the pack's own entries (restores use ``copy_to_param``);
    comfy_entry: ComfyUI's own entry when a stock patch shares the key, else None.
    """

    weight: torch.Tensor
    inplace_update: bool
    comfy_entry: object = None


_ENGINE_ATTR = "_batch_lora_engine"  # the engine lives on the torch model it patches and dies with it
# engine -> weight keys whose cached base was captured over ComfyUI's own (stock) patches
_OVER_STOCK: "weakref.WeakKeyDictionary[InPlacePatcher, set[str]]" = weakref.WeakKeyDictionary()
# engine -> the ComfyUI ``backup`` dict of the patcher family that last loaded its model (for the status route)
_LOADED: "weakref.WeakKeyDictionary[InPlacePatcher, dict]" = weakref.WeakKeyDictionary()


def _cache_options() -> dict:
    """Base-cache settings from the environment: BATCH_LORA_BASE_CACHE=auto|fp32|native (default auto, see
    ``core.BaseCache``) and BATCH_LORA_BASE_CACHE_BUDGET_MB (default unbounded)."""
    budget = os.environ.get("BATCH_LORA_BASE_CACHE_BUDGET_MB")
    return {"dtype": os.environ.get("BATCH_LORA_BASE_CACHE", "auto"),
            "budget_bytes": int(float(budget) * 2**20) if budget else None}


def _cache_device(patcher):
    """Where the base cache of ``patcher``'s model lives: BATCH_LORA_BASE_CACHE_DEVICE=offload (default: the
    model's offload device, pinned host memory for a CUDA model, so each bake reads the base over PCIe) or load
    (the model's load device: VRAM, so a bake never leaves the GPU). Raises ValueError for another value."""
    place = os.environ.get("BATCH_LORA_BASE_CACHE_DEVICE", "offload")
    if place not in ("offload", "load"):
        raise ValueError(f"BATCH_LORA_BASE_CACHE_DEVICE must be 'offload' or 'load', not {place!r}")
    return patcher.load_device if place == "load" else patcher.offload_device


def stack_of(patcher) -> StackSpec | None:
    """The ``StackSpec`` a ModelPatcher carries, or None."""
    return patcher.get_attachment(KEY)


def _clean_uuid(patcher) -> uuid.UUID | None:
    spec = stack_of(patcher)
    if spec is None:
        return patcher.patches_uuid
    return spec.clean_uuid if patcher.patches_uuid == spec.own_uuid else None


def with_stack(patcher, plan: Mapping[str, Sequence[Term]], signature: str, labels: Sequence[str] = (),
               release_cache: bool = False, node: str = "Batch LoRA Loader"):
    """A clone of ``patcher`` (ModelPatcher) whose weights will be ``base + plan`` when ComfyUI loads it.

    The clone's ``patches_uuid`` is ``uuid5(base uuid, "batch-lora")`` on the classic patcher: every stack on one
    base shares it, so ComfyUI leaves a stack switch to this pack's ``inject``. On the dynamic patcher it is
    ``uuid5(base uuid, signature)``: a new uuid is how ComfyUI learns that its layers' patch lists changed. An
    empty ``plan`` gives a clone without any stack of this pack (Reset Adapters): its uuid is the model's clean uuid
    when known, so it shares baked weights with the plain path; with ``release_cache`` its load also drops the
    pack's base copies of the restored keys. The input patcher is not modified.
    """
    clean = _clean_uuid(patcher)
    clone = patcher.clone()
    if not clone.get_injections(KEY):  # clones inherit these; one call per event is enough
        clone.set_injections(KEY, [PatcherInjection(inject=_inject, eject=_eject)])
        clone.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, KEY, _outer_sample)
    if dynamic.is_dynamic(clone):  # the stack rides ComfyUI's own patch list there (see nodes/dynamic.py)
        dynamic.set_patches(clone, plan)
        if not clone.get_callbacks(CallbacksMP.ON_CLONE, KEY):
            clone.add_callback_with_key(CallbacksMP.ON_CLONE, KEY, dynamic.on_clone)
    clone.attachments.pop(RELEASE_KEY, None)
    if not plan:
        clone.attachments.pop(KEY, None)
        if release_cache:
            clone.set_attachments(RELEASE_KEY, True)
        clone.patches_uuid = clean if clean is not None else uuid.uuid5(_NAMESPACE, f"{patcher.patches_uuid}|none")
        return clone
    native = clean if clean is not None else patcher.patches_uuid
    own = uuid.uuid5(_NAMESPACE, f"{native}|{signature if dynamic.is_dynamic(clone) else 'batch-lora'}")
    clone.set_attachments(KEY, StackSpec(plan, signature, own, clean, tuple(labels), node))
    clone.patches_uuid = own
    return clone


def engine_for(model: torch.nn.Module, cache_device=None, create: bool = True) -> InPlacePatcher | None:
    """The pack's ``InPlacePatcher`` (base cache + applied state) for one torch model (a ComfyUI BaseModel or a
    text-encoder module), created on first use with a base cache on ``cache_device`` (see ``_cache_options``)."""
    engine = model.__dict__.get(_ENGINE_ATTR)
    if engine is None and create:
        cache = BaseCache(device=cache_device, **_cache_options())
        engine = model.__dict__[_ENGINE_ATTR] = InPlacePatcher(model, cache)
    return engine


def engines() -> list[tuple[InPlacePatcher, set[str]]]:
    """``(engine, keys holding the pack's terms now)`` for every live model this pack has loaded.

    Read-only: a key ComfyUI has restored since the pack's last load (its ``PackBackup`` entry is gone) is left
    out here; the engine itself learns of it at the next load (``_sync``)."""
    return [(engine, {k for k in engine.applied_keys if isinstance(backup.get(k), PackBackup)})
            for engine, backup in list(_LOADED.items())]


def _sync(engine: InPlacePatcher, backup: dict) -> set[str]:
    """Tell the engine which of its keys ComfyUI restored (their ``PackBackup`` entry is gone); returns them."""
    return engine.forget([k for k in engine.applied_keys if not isinstance(backup.get(k), PackBackup)])


RELEASED = {"releases": 0, "bytes": 0, "rss_returned_bytes": 0}
"""Running totals of free_cache releases (the status route shows them): base-copy bytes dropped, and how far the
process's RSS fell across each drop and its ``return_freed_memory()`` (measured around the release itself, so
that later work of the prompt does not blur it)."""


def _release(engine: InPlacePatcher) -> int:
    """Drop the engine's base copies of keys at their base, give the memory back to the OS, record both."""
    rss = psutil.Process().memory_info().rss
    freed = engine.release_cache()
    return_freed_memory()
    RELEASED["releases"] += 1
    RELEASED["bytes"] += freed
    RELEASED["rss_returned_bytes"] += rss - psutil.Process().memory_info().rss
    return freed


def release_caches(patcher) -> int:
    """Drop the pack's base copies for the keys of ``patcher``'s model that are at their base now, returning the
    memory to the OS; returns the bytes released. (Keys still patched keep theirs until a load restores them:
    see ``with_stack(release_cache=True)``.)"""
    engine = engine_for(patcher.model, create=False)
    if engine is None:
        return 0
    _sync(engine, patcher.backup)
    return _release(engine)


def describe(patcher) -> str:
    """What runs ``patcher``'s model: ``eager``, or the compilers/wrappers found, e.g.
    ``torch.compile(inductor)`` (ComfyUI's TorchCompileModel), ``onediff-nexfort``, ``onediff-oneflow``."""
    kinds = []
    kwargs = patcher.model_options.get("torch_compile_kwargs")
    if kwargs:
        mode = f", mode={kwargs['mode']}" if kwargs.get("mode") else ""
        kinds.append(f"torch.compile({kwargs.get('backend')}{mode})")
    for kind, _ in wrappers(patcher.model):
        if kind not in kinds:
            kinds.append(kind)
    return ", ".join(kinds) or "eager"


def check_not_frozen(patcher, plan: Mapping[str, Sequence[Term]], node: str) -> None:
    """Raise UnsupportedTarget (naming ``node`` and a key) if ``patcher``'s model is compiled with weight
    freezing: in-place LoRA writes would then be silently ignored by the compiled graph."""
    if not plan:
        return
    reason = frozen_reason(patcher.model_options.get("torch_compile_kwargs"), [patcher.model])
    if reason is not None:
        raise UnsupportedTarget(
            f"{node}: {reason}, so the compiled graph holds its weights as constants and would ignore the LoRA "
            f"written in place (e.g. {next(iter(plan))}). Compile without freezing, or merge the LoRA before "
            "compiling and do not switch stacks afterwards")


def _outer_sample(executor, *args, **kwargs):
    """WrappersMP.OUTER_SAMPLE: take this pack's entries (this wrapper, and ON_CLONE on a dynamic patcher) out of
    the sampler's ``transformer_options`` before the model runs, leaving them as a plain path has them.

    ComfyUI copies a patcher's callbacks and wrappers into the sampling's ``transformer_options``
    (``sampler_helpers.prepare_model_patcher``, before this wrapper runs), and those reach the diffusion model:
    the attention blocks copy every key (comfy/ldm/modules/attention.py), so a torch.compile'd model guards on
    them, and a compiled plain path after a compiled stack recompiled once (guard failure: KeyError on
    ``transformer_options['callbacks']['on_load_after']`` while the pack used ON_LOAD). The patcher keeps its own
    entries; the ones removed here are the sampler's copy."""
    options = getattr(executor.class_obj, "model_options", {}).get("transformer_options", {})
    for group in ("callbacks", "wrappers"):
        kinds = options.get(group, {})
        for kind in [k for k, keyed in kinds.items() if KEY in keyed]:
            del kinds[kind][KEY]
            if not kinds[kind]:
                del kinds[kind]
    return executor(*args, **kwargs)


def _eject(patcher) -> None:
    """PatcherInjection.eject: nothing. The stack stays baked while the model is ejected, as ComfyUI's own baked
    patches do; ComfyUI's restores go through the ``PackBackup`` entries."""


def _inject(patcher) -> None:
    """PatcherInjection.inject, at the end of every load of ``patcher`` (``partially_load``) and of
    ``use_ejected`` blocks: bring the model's weights to ``base + stack`` on the classic patcher (after ComfyUI
    baked its own patches), or record the stack on the dynamic one (ComfyUI evaluates the ``PackPatch`` entries
    when each layer runs). Does nothing unless the model's weights are this patcher's (``current_weight_patches_uuid``;
    not after a failed load's ``detach``).

    Raises FuseError, CacheBudgetError, UnsupportedTarget (see ``InPlacePatcher.apply``; every key written is
    rolled back first) or ComfyUI's InterruptProcessingException (the user cancelled the bake)."""
    if getattr(patcher.model, "current_weight_patches_uuid", None) != patcher.patches_uuid:
        return
    spec = stack_of(patcher)
    if dynamic.is_dynamic(patcher):
        dynamic.note_load(patcher, spec.labels if spec is not None else (), len(spec.plan) if spec else 0)
        return
    engine = engine_for(patcher.model, _cache_device(patcher), create=spec is not None)
    if engine is None:
        return
    backup = patcher.backup
    _LOADED[engine] = backup
    restored_by_comfy = _sync(engine, backup)
    plan = spec.plan if spec is not None else {}
    signature = f"{patcher.patches_uuid}|{spec.signature}" if spec is not None else None
    if signature is not None and signature == engine.signature:  # unchanged: nothing to compare or write
        return
    if spec is None and not engine.applied_keys and not restored_by_comfy:  # at its base, as at the last call
        return
    check_not_frozen(patcher, plan, spec.node if spec is not None else "")
    # A key that also carries a stock patch may have just been re-baked by ComfyUI: its base for this pack is the
    # live weight, captured anew (any key not holding this pack's terms is at that base).
    over_stock = _OVER_STOCK.setdefault(engine, set())
    stock = {k for k in plan if k in patcher.patches}
    engine.cache.drop([k for k in plan if k not in engine.applied_keys and (k in stock or k in over_stock)])
    over_stock.difference_update(plan)
    over_stock.update(stock)
    bar = comfy.utils.ProgressBar(max(1, len(plan)))
    try:
        report = engine.apply(plan, should_stop=comfy.model_management.processing_interrupted,
                              progress=lambda done, total: bar.update_absolute(done, total),
                              labels=spec.labels if spec is not None else (), signature=signature)
    except BaseException as exc:  # the engine already put back every key it had written
        log.warning("batch-lora: %s: bake of %s stopped (%s); every key written was rolled back",
                    type(patcher.model).__name__, ", ".join(spec.labels) if spec else "no stack",
                    type(exc).__name__)
        if isinstance(exc, ApplyInterrupted):
            raise comfy.model_management.InterruptProcessingException() from exc
        raise
    report.restored += len(restored_by_comfy - set(plan))  # ComfyUI restored them for the pack at this load
    for key in report.keys:
        entry = backup.get(key)
        if key in engine.applied_keys:
            if not isinstance(entry, PackBackup):
                backup[key] = (PackBackup(entry.weight, entry.inplace_update, entry) if entry is not None
                               else PackBackup(engine.cache.get(key), True))
        elif isinstance(entry, PackBackup):
            if entry.comfy_entry is not None:
                backup[key] = entry.comfy_entry
            else:
                del backup[key]
    if patcher.get_attachment(RELEASE_KEY):
        _release(engine)
    if report.keys or report.restored:
        log.info("batch-lora: %s: %d keys merged, %d restored, %d unchanged in %.1f ms (%s)",
                 type(patcher.model).__name__, report.merged, report.restored, report.unchanged,
                 report.seconds * 1e3, ", ".join(spec.labels) if spec else "no stack")
