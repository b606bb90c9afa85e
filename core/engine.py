"""In-place, transactional application of a LoRA stack to a torch module's weights.

The engine keeps, per weight key, which terms are baked into the live weight. ``apply(stack)`` brings every key
to ``round(base_fp32 + sum s_i * delta_i)`` for the new stack (or back to the exact base for keys the stack no
longer touches), writing only keys whose terms changed. Every write is ``param.data.copy_``: the same
``nn.Parameter`` object and the same storage (``data_ptr``) before and after, whatever the memory format, so
compiled graphs that captured the parameters keep seeing current values. Keys resolve through torch.compile and
OneDiff wrappers, and compiler-held copies are refreshed after each write (``core.backends``).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from . import quant
from .backends import Target, after_write, resolve
from .cache import BaseCache
from .fuse import Term, fuse_into, surely_finite

__all__ = ["InPlacePatcher", "ApplyInterrupted", "ApplyReport", "Counters"]

log = logging.getLogger("comfyui-batch-lora")


class ApplyInterrupted(RuntimeError):
    """``should_stop()`` returned True during an apply; every key already written was rolled back."""

    __module__ = "batch_lora.core"  # the type's name in ComfyUI's error reports, whatever the install path


@dataclass
class Counters:
    """Running totals for one patcher (tests and benchmarks read these).

    merges: keys fused (one fused pass each); writes: in-place parameter writes (fused results, restores and
    rollbacks); restores: keys put back to their exact base, by this engine (a write) or by the host from this
    engine's base copies (``forget``); rollbacks: applies undone after an error;
    moves: applies that found weights this engine wrote on another device or in new storage since its last write
    (the host moved the model, e.g. ComfyUI's normal-VRAM offload round trip; the engine itself never moves
    weights); host_restores: the restores the host did (``forget``: ComfyUI restored them).
    """

    merges: int = 0
    writes: int = 0
    restores: int = 0
    rollbacks: int = 0
    moves: int = 0
    host_restores: int = 0


@dataclass
class ApplyReport:
    """What one ``apply``/``reset`` did: keys merged, restored (written back to base; a caller may add the keys the
    host restored for it, see ``forget``) and left alone, wall time in seconds, when it finished
    (``time.time()``), and the caller's labels of the stack applied."""

    merged: int = 0
    restored: int = 0
    unchanged: int = 0
    seconds: float = 0.0
    keys: list[str] = field(default_factory=list)
    finished_at: float = 0.0
    labels: tuple[str, ...] = ()


def _signature(terms: Sequence[Term]) -> tuple:
    return tuple((float(s), f.token) for s, f in terms)


class InPlacePatcher:
    """Apply/reset LoRA stacks on one module's parameters, in place, from an exact base cache.

    Args:
        module: the ``nn.Module`` whose parameters are patched (weight keys are parameter paths, e.g.
            ``diffusion_model.input_blocks.1.1.proj_in.weight``; wrappers on the way are stepped through).
        cache: the base cache (default: a float32 ``BaseCache`` on each weight's device).
    """

    def __init__(self, module: torch.nn.Module, cache: BaseCache | None = None):
        self.module = module
        self.cache = cache if cache is not None else BaseCache()
        self.counters = Counters()
        self.last_apply: ApplyReport | None = None  # the last successful apply of a non-empty stack
        self.last_reset: ApplyReport | None = None  # the last successful apply of an empty stack (a reset)
        self.labels: tuple[str, ...] = ()  # labels of the stack baked into the weights now (empty: at base)
        self.signature: str | None = None  # the caller's identity of the whole stack baked now (see ``apply``)
        # key -> (signature, terms) of what is baked into the live weight; absent = the weight is at its base.
        self._applied: dict[str, tuple[tuple, Sequence[Term]]] = {}
        self._targets: dict[str, Target] = {}
        self._placed: dict[str, int] = {}  # key -> data_ptr() of its parameter at this engine's last write

    @property
    def applied_keys(self) -> set[str]:
        """Weight keys whose live value currently includes LoRA terms."""
        return set(self._applied)

    def target(self, key: str) -> Target:
        """Where ``key``'s parameter lives (see ``core.backends.resolve``; its KeyError/UnsupportedTarget)."""
        target = self._targets.get(key)
        if target is None:
            target = self._targets[key] = resolve(self.module, key)
        return target

    def forget(self, keys) -> set[str]:
        """Record that ``keys`` were put back to their base by someone else (the host restored them, from this
        engine's base copies): each counts as a restore (``counters.restores``) done by the host
        (``counters.host_restores``). Returns the keys that held terms."""
        forgotten = {key for key in keys if self._applied.pop(key, None) is not None}
        if forgotten:
            self.signature = None
        self.counters.restores += len(forgotten)
        self.counters.host_restores += len(forgotten)
        if not self._applied:
            self.labels = ()
        return forgotten

    def apply(self, stack: Mapping[str, Sequence[Term]], *, should_stop: Callable[[], bool] | None = None,
              progress: Callable[[int, int], None] | None = None, labels: Sequence[str] = (),
              signature: str | None = None) -> ApplyReport:
        """Make the module's weights equal ``base + stack`` on the touched keys, all or nothing.

        Keys in ``stack`` get ``round(base_fp32 + sum s_i*delta_i)`` (see ``core.fuse``); keys that
        were applied before but are not in ``stack`` (or have no terms) are restored from the base cache; keys
        whose terms did not change are not touched (no merge, no write).

        Args:
            stack: weight key -> terms ``(strength, factors)`` (``core.fuse`` factor sets).
            should_stop: polled before each key; True aborts with ``ApplyInterrupted``.
            progress: ``progress(done, total)`` after each key written.
            labels: names for the stack (e.g. ``file@strength_model/strength_clip``), kept in the report and in
                ``self.labels`` for status displays.
            signature: the caller's identity of the whole stack (equal text = equal terms on every key). When it
                equals the signature of the stack baked now and no key was ``forget``-ed since, nothing is
                compared or written (the report counts every key unchanged); None always compares per key.
        Returns:
            An ``ApplyReport``, also kept as ``self.last_apply`` (non-empty stack) or ``self.last_reset``.
        Raises:
            FuseError (shape mismatch, NaN/Inf result), CacheBudgetError, KeyError (unknown key),
            UnsupportedTarget (quantized weight), ApplyInterrupted, or anything raised while writing. Before any of these propagates, every key
            written by this call is put back to the value it had before the call (same bits).
        """
        start = time.perf_counter()
        report = ApplyReport(labels=tuple(labels))
        if signature is not None and signature == self.signature:
            report.unchanged = len(stack)
            return report
        moved = {k: now for k, ptr in self._placed.items()
                 if (now := quant.storage_ptr(self._targets[k].param)) != ptr}
        if moved:
            self.counters.moves += 1
            self._placed.update(moved)
        work: list[tuple[str, Sequence[Term]]] = [(k, ()) for k in self._applied if not stack.get(k)]
        for key, terms in stack.items():
            if not terms:
                continue
            if key in self._applied and self._applied[key][0] == _signature(terms):
                report.unchanged += 1
            else:
                work.append((key, terms))
        done: list[tuple[str, tuple | None]] = []  # (key, previous _applied entry) in write order
        try:
            for key, terms in work:
                if should_stop is not None and should_stop():
                    raise ApplyInterrupted(f"interrupted after {len(done)} of {len(work)} weight keys")
                previous = self._applied.get(key)
                target, base = self._prepare(key)  # may raise; nothing is written yet
                done.append((key, previous))  # before writing: a key that fails half-written is restored too
                self._write(key, target, base, terms)
                if terms:
                    report.merged += 1
                else:
                    report.restored += 1
                report.keys.append(key)
                if progress is not None:
                    progress(len(done), len(work))
        except BaseException:
            for key, previous in reversed(done):
                self._write(key, *self._prepare(key), () if previous is None else previous[1])
            if done:
                self.counters.rollbacks += 1
            raise
        report.seconds = time.perf_counter() - start
        report.finished_at = time.time()
        self.labels = report.labels if self._applied else ()
        self.signature = signature
        if any(stack.values()):
            self.last_apply = report
        else:
            self.last_reset = report
        return report

    def release_cache(self) -> int:
        """Drop the base copies of keys that are at their base now (a later apply re-captures them); keys that
        still hold terms keep theirs, which their restore needs. Returns the bytes released."""
        before = self.cache.nbytes
        self.cache.drop([key for key in self.cache.keys() if key not in self._applied])
        return before - self.cache.nbytes

    def reset(self) -> ApplyReport:
        """Restore every applied key to its exact base (bit-identical to before the first apply)."""
        return self.apply({})

    def _prepare(self, key: str) -> tuple[Target, torch.Tensor]:
        """Resolve ``key`` and get its base copy (captured now if the weight is at its base). Writes nothing."""
        target = self.target(key)
        base = self.cache.get(key) if key in self._applied else self.cache.capture(key, target.param)
        return target, base

    def _write(self, key: str, target: Target, base: torch.Tensor, terms: Sequence[Term]) -> None:
        """Write ``base + terms`` (or the exact base when ``terms`` is empty) into ``key``'s parameter."""
        param = target.param
        if terms:
            if quant.is_quantized(param):
                saturated = quant.write(key, param, base, terms)
                if saturated:
                    log.warning("batch-lora: %s: %d merged values beyond the range of the checkpoint's scale were "
                                "saturated (lower the strength, or load the model unquantized)", key, saturated)
            else:  # the per-block NaN/Inf screen only where bounds cannot prove the result finite
                fuse_into(key, param, base, terms,
                          check=not surely_finite(self.cache.absmax(key), terms, param.dtype))
            self.counters.merges += 1
        else:
            if quant.is_quantized(param):
                quant.restore(param, base)
            else:
                param.data.copy_(base)
            self.counters.restores += 1
        self.counters.writes += 1
        self._placed[key] = quant.storage_ptr(param)
        if terms:
            self._applied[key] = (_signature(terms), terms)
        else:
            self._applied.pop(key, None)
        after_write(target)
