"""Reading LoRA files: safetensors only, validated once, kept in a byte-bounded LRU cache shared by all nodes."""
from __future__ import annotations

import os
import threading
from collections import OrderedDict

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

__all__ = ["LoraFileCache", "LoraFileError", "shown"]


class LoraFileError(ValueError):
    """A LoRA file cannot be used: missing, not safetensors, corrupted, or holding NaN/Inf. Names the file."""

    __module__ = "batch_lora.core"  # the type's name in ComfyUI's error reports, whatever the install path


def shown(value, limit: int = 120) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters (saying how long it was): names, values
    and file contents are echoed to API clients, never in full."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class LoraFileCache:
    """Parsed LoRA files (``{tensor name: CPU tensor}``), keyed by ``identity``: (resolved path, size, mtime_ns,
    ctime_ns).

    A file changed on disk has a new key and is read again (also one replaced by a copy that kept size and mtime,
    e.g. ``cp -p`` or ``rsync -a``: the change time still moves); least recently used files are evicted once the
    held tensors exceed ``budget_bytes``. Thread-safe.

    Args:
        budget_bytes: cap on the bytes of cached tensors (default 2 GiB); a single larger file is still
            returned, just not kept.
    """

    def __init__(self, budget_bytes: int = 2 << 30):
        self.budget_bytes = budget_bytes
        self._files: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
        self._derived: dict[tuple, dict] = {}  # per file version: values computed from its tensors
        self._lock = threading.Lock()
        self.reads = 0

    @staticmethod
    def identity(path: str, label: str | None = None) -> tuple[str, int, int, int]:
        """``(resolved path, size in bytes, mtime in ns, ctime in ns)`` of ``path`` (ctime: the inode's change
        time, which no copy tool can set). Raises LoraFileError naming ``label`` (the name the user gave, default
        the file's base name; never the server path) if it is missing."""
        real = os.path.realpath(path)
        try:
            st = os.stat(real)
        except OSError as exc:
            raise LoraFileError(f"LoRA file {shown(label or os.path.basename(path))} cannot be read "
                                f"({exc.strerror}); check the name and the loras folder") from exc
        return real, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    @property
    def nbytes(self) -> int:
        """Bytes of all cached tensors."""
        with self._lock:
            return sum(_nbytes(sd) for sd in self._files.values())

    def load(self, path: str, label: str | None = None) -> dict[str, torch.Tensor]:
        """The tensors of the safetensors file at ``path`` (read once per file version; do not mutate them).

        Raises:
            LoraFileError: missing file, a file that is not valid safetensors (bad header length, bad JSON,
                offsets past the end), or a tensor with NaN/Inf values (names the tensor); the file is named as
                ``label`` (default: its base name), never by its server path.
        """
        return self._load(self.identity(path, label), shown(label or os.path.basename(path)))

    def _load(self, ident: tuple[str, int, int, int], label: str) -> dict[str, torch.Tensor]:
        with self._lock:
            cached = self._files.get(ident)
            if cached is not None:
                self._files.move_to_end(ident)
                return cached
        try:
            tensors = load_file(ident[0], device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise LoraFileError(f"LoRA file {label} is not a valid safetensors file ({shown(str(exc), 200)}); "
                                "re-download or re-export it") from exc
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor.float()).all()):
                raise LoraFileError(f"LoRA file {label}: tensor {shown(name)} contains NaN/Inf values; the file "
                                    "is broken (re-export it) and was not applied")
        with self._lock:
            self.reads += 1
            self._files[ident] = tensors
            self._files.move_to_end(ident)
            while len(self._files) > 1 and sum(_nbytes(sd) for sd in self._files.values()) > self.budget_bytes:
                self._derived.pop(self._files.popitem(last=False)[0], None)
            if _nbytes(tensors) > self.budget_bytes:
                self._files.pop(ident, None)
        return tensors

    def derived(self, ident: tuple[str, int, int, int], name, compute, label: str | None = None):
        """A value computed from the tensors of the file version ``ident`` (``identity(path)``, which the caller
        already has; e.g. the file's mapping onto a model's keys), kept with the file's cache entry:
        ``compute(tensors)`` runs once per file version and ``name``, and the value goes when the file is evicted
        or changes on disk. Raises what ``load`` raises (``label`` as there)."""
        tensors = self._load(ident, shown(label or os.path.basename(ident[0])))
        with self._lock:
            values = self._derived.setdefault(ident, {})
            if name in values:
                return values[name]
        value = compute(tensors)
        with self._lock:
            if ident in self._files:
                self._derived.setdefault(ident, {})[name] = value
        return value

    def clear(self) -> None:
        """Drop every cached file."""
        with self._lock:
            self._files.clear()
            self._derived.clear()


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
