"""The base cache: an exact copy of every base weight this pack has touched, taken before the first write.

Restores copy from here (never subtract a delta), so any number of apply/reset cycles is bit-exact.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import lru_cache
from typing import Iterable

import torch

from . import quant

__all__ = ["BaseCache", "CacheBudgetError", "return_freed_memory", "available_bytes", "FP32_SHARE"]


class CacheBudgetError(MemoryError):
    """Capturing one more base weight would exceed the base cache's byte budget."""

    __module__ = "batch_lora.core"  # the type's name in ComfyUI's error reports, whatever the install path


FP32_SHARE = 0.25
"""``dtype="auto"``: float32 copies may take up to this share of the memory available when the cache (re)starts
filling; keys beyond it are kept in their own dtype. A full-linear stack on a 12 B-parameter bf16 model (Flux)
would need 48 GB of float32 copies, 24 GB native."""


def available_bytes(device: torch.device) -> int:
    """Memory available for new allocations on ``device``: CUDA's free memory, or the host's ``MemAvailable``
    (/proc/meminfo; free physical pages elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class BaseCache:
    """Exact copies of base weights, keyed by weight key, captured on first touch.

    A float16/bfloat16/float32 weight is stored as float32 (``dtype="fp32"``: the fused merge then reads its fp32
    operand without a cast), or in its own dtype (``dtype="native"``: half the bytes for fp16/bf16; the upcast at
    merge time is exact, so restores stay bit-exact either way), or (``dtype="auto"``, the default) as float32
    while the float32 copies stay within ``FP32_SHARE`` of the memory available when the cache starts filling,
    natively beyond (big models: see ``FP32_SHARE``). Other dtypes (fp8)
    are always stored natively, and a quantized weight (``core.quant``: scaled fp8/int8) as a clone of itself
    (its storage and scale: 1 byte per parameter for fp8).

    Args:
        dtype: ``"auto"``, ``"fp32"`` or ``"native"``.
        device: where copies live (the model's offload device; default: the weight's own device).
        budget_bytes: optional cap on ``nbytes``; ``None`` means unbounded.
        pin_memory: copies of CUDA weights kept on the CPU go to pinned (page-locked) memory, so restores and
            bakes copy them to the GPU by DMA.
    Raises:
        ValueError: for an unknown ``dtype`` option.
    """

    def __init__(self, dtype: str = "auto", device: torch.device | str | None = None,
                 budget_bytes: int | None = None, pin_memory: bool = True):
        if dtype not in ("auto", "fp32", "native"):
            raise ValueError(f"base cache dtype must be 'auto', 'fp32' or 'native', not {dtype!r}")
        self.dtype = dtype
        self.device = None if device is None else torch.device(device)
        self.budget_bytes = budget_bytes
        self.pin_memory = pin_memory
        self._copies: dict[str, torch.Tensor] = {}
        self._fp32_room: int | None = None  # "auto": bytes of float32 copies allowed, set when filling starts
        self._upcast: dict[str, int] = {}  # key -> bytes, for float32 copies of fp16/bf16 weights
        self._fp32_bytes = 0  # their sum
        self._absmax: dict[str, float] = {}  # key -> max|base|, computed on first request

    def __contains__(self, key: str) -> bool:
        return key in self._copies

    def __len__(self) -> int:
        return len(self._copies)

    def keys(self) -> list[str]:
        """The weight keys that have a cached base."""
        return list(self._copies)

    @property
    def dtypes(self) -> list[str]:
        """The dtypes the copies are held in, e.g. ``["float32"]``, or ``["float32", "float8_e4m3fn"]`` when fp8
        weights (always kept natively) are cached too; [] when empty."""
        return sorted({str(quant.storage_dtype(t)).removeprefix("torch.") for t in self._copies.values()})

    @property
    def nbytes(self) -> int:
        """Bytes held by all copies."""
        return sum(quant.nbytes(t) for t in self._copies.values())

    def capture(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        """Return the cached base of ``key``, copying ``weight`` first if the key is new.

        Args:
            key: weight key.
            weight: the current (base) value, any shape/dtype/device/memory format.
        Returns:
            The cached copy (contiguous; float32 or the weight's dtype, see the class docstring).
        Raises:
            CacheBudgetError: the copy would exceed ``budget_bytes`` (names the key and the figures).
        """
        cached = self._copies.get(key)
        if cached is not None:
            return cached
        if quant.is_quantized(weight):
            self._check_budget(key, quant.nbytes(weight))
            copy = weight.detach().clone()
        else:
            device = self.device or weight.device
            store = self._store_dtype(weight, device)
            size = weight.numel() * torch.empty((), dtype=store).element_size()
            self._check_budget(key, size)
            pin = self.pin_memory and weight.is_cuda and device.type == "cpu"
            copy = torch.empty(weight.shape, dtype=store, device=device, pin_memory=pin)
            copy.copy_(weight.detach())
            if store != weight.dtype:
                self._upcast[key] = size
                self._fp32_bytes += size
        self._copies[key] = copy
        return copy

    def _store_dtype(self, weight: torch.Tensor, device: torch.device) -> torch.dtype:
        if weight.dtype not in (torch.float16, torch.bfloat16, torch.float32) or self.dtype == "native":
            return weight.dtype
        if self.dtype == "fp32" or weight.dtype == torch.float32:
            return torch.float32
        if not self._copies or self._fp32_room is None:
            self._fp32_room = int(FP32_SHARE * available_bytes(device))
        return torch.float32 if self._fp32_bytes + weight.numel() * 4 <= self._fp32_room else weight.dtype

    def _check_budget(self, key: str, size: int) -> None:
        """Raise CacheBudgetError if ``size`` more bytes would exceed ``budget_bytes``."""
        if self.budget_bytes is not None and self.nbytes + size > self.budget_bytes:
            raise CacheBudgetError(
                f"base cache budget of {self.budget_bytes} bytes exceeded while caching {key} ({size} bytes, "
                f"{self.nbytes} already held): raise the budget or use dtype='native'")

    def get(self, key: str) -> torch.Tensor:
        """The cached base of ``key``. Raises KeyError if it was never captured."""
        return self._copies[key]

    def absmax(self, key: str) -> float:
        """``max|base|`` of ``key``'s cached base (float; NaN if the base has a NaN), computed once (one read of
        the copy) and kept until the key is dropped. Not for quantized copies. Raises KeyError if never captured."""
        value = self._absmax.get(key)
        if value is None:
            copy = self._copies[key].detach()
            low, high = torch.aminmax(copy if copy.element_size() > 1 else copy.half())  # fp8: exact in fp16
            value = self._absmax[key] = max(-float(low), float(high))  # NaN propagates to both
        return value

    def drop(self, keys: Iterable[str] | None = None) -> None:
        """Forget the copies of ``keys`` (all when None). Callers must not drop a key that is still patched."""
        for key in list(self._copies) if keys is None else keys:
            self._copies.pop(key, None)
            self._absmax.pop(key, None)
            self._fp32_bytes -= self._upcast.pop(key, 0)


@lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return getattr(libc, "malloc_trim", None)


def return_freed_memory() -> bool:
    """Give the memory of dropped caches back to the operating system, now.

    glibc keeps freed blocks mapped: heap blocks, and large ones too once its mmap threshold has grown (it grows
    each time a large block is freed), so freeing a few hundred MB of cached tensors lowered a server's RSS by
    only ~28 MB. ``malloc_trim(0)`` returns every free page of every arena. Returns True when it ran (glibc),
    False elsewhere: a no-op, other allocators returning memory on their own terms.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
