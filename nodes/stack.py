"""From the node's inputs to a fused plan: entries -> files -> ComfyUI key maps -> ``LoraFactors`` per weight key.

Key mapping and file-format parsing are ComfyUI's own (``comfy.lora.model_lora_keys_unet/_clip`` and
``comfy.lora.load_lora``), so every LoRA naming scheme the host maps (kohya/sd-scripts, diffusers, PEFT, ...) is
accepted exactly as stock LoraLoader accepts it; this pack replaces only the merge and the lifecycle.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import folder_paths
import comfy.lora
import comfy.weight_adapter

from ..core import LoraFactors, LoraFileCache, LoraFileError
from .lifecycle import engine_for

__all__ = ["LoraEntry", "LoraMatch", "parse_entries", "build_plans", "FILES", "MAX_STRENGTH"]

FILES = LoraFileCache()
"""The parsed-LoRA cache shared by every node of this pack."""

MAX_STRENGTH = 100.0
"""Strengths beyond +-MAX_STRENGTH are rejected as input mistakes (a real LoRA is used at |s| <= ~5)."""


@dataclass(frozen=True)
class LoraEntry:
    """One row of the loader: file name (relative to a loras folder), strengths (dimensionless), on/off."""

    name: str
    strength_model: float = 1.0
    strength_clip: float = 1.0
    on: bool = True

    def tag(self) -> str:
        """The entry in A1111 prompt syntax, as A1111 and Civitai write it into image metadata: the file's base
        name without folder or extension, e.g. ``<lora:style:0.8>``. When the strengths differ, A1111's
        two-number form ``<lora:name:strength_clip:strength_model>`` (A1111 reads the first number as the
        text-encoder multiplier, the second as the UNet's; readers that take only one number see the clip
        strength). Source: AUTOMATIC1111 extensions-builtin/Lora/networks.py (``te``/``unet`` multipliers)."""
        stem = os.path.splitext(os.path.basename(self.name.replace("\\", "/")))[0]
        if self.strength_clip == self.strength_model:
            return f"<lora:{stem}:{self.strength_model:g}>"
        return f"<lora:{stem}:{self.strength_clip:g}:{self.strength_model:g}>"


@dataclass
class LoraMatch:
    """What one LoRA file matched: modules mapped to the UNet / text encoder, and tensors left unmatched."""

    entry: LoraEntry
    unet_keys: int = 0
    clip_keys: int = 0
    unmatched: list[str] = field(default_factory=list)

    def line(self) -> str:
        """One report line, e.g. ``style.safetensors  model 0.8 clip 1.0  unet 24 keys, clip 12 keys, 0 unmatched``."""
        e = self.entry
        text = (f"{e.name}  model {e.strength_model:g} clip {e.strength_clip:g}  unet {self.unet_keys} keys, "
                f"clip {self.clip_keys} keys, {len(self.unmatched)} unmatched")
        if self.unmatched:
            text += ": " + ", ".join(self.unmatched[:20]) + (" ..." if len(self.unmatched) > 20 else "")
        return text


def _float(value, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(number) or abs(number) > MAX_STRENGTH:
        raise ValueError(f"{what} = {value!r} is not a usable strength (finite, |s| <= {MAX_STRENGTH:g})")
    return number


ROW_SHAPES = ('{"on": true, "lora": "file.safetensors", "strength_model": 1.0, "strength_clip": 1.0}, or rgthree '
              'Power Lora Loader\'s {"on": true, "lora": "file.safetensors", "strength": 1.0, "strengthTwo": 1.0}')


def _row_strengths(key: str, row: dict) -> tuple[float, float]:
    """(strength_model, strength_clip) of one row in either shape (see ``parse_entries``)."""
    if "strength_model" in row or "strength" not in row:
        sm = _float(row.get("strength_model", 1.0), f"{key}.strength_model")
        return sm, _float(row.get("strength_clip", sm), f"{key}.strength_clip")
    sm = _float(row["strength"], f"{key}.strength")
    two = row.get("strengthTwo")
    return sm, (sm if two is None else _float(two, f"{key}.strengthTwo"))


def parse_entries(rows: dict, lora_stack=None) -> list[LoraEntry]:
    """Normalise the loader's inputs into entries, in order: ``lora_stack`` first, then ``lora_1``, ``lora_2``...

    Args:
        rows: ``{"lora_N": row}``, each row in this pack's shape ``{"on", "lora", "strength_model",
            "strength_clip"}`` or in rgthree Power Lora Loader's ``{"on", "lora", "strength", "strengthTwo"}``
            (rgthree power_lora_loader.py: ``strengthTwo`` is the clip strength). A missing or null clip strength
            means the same as the model strength; rows that are off or name no file are skipped; other keys
            (e.g. rgthree's ``PowerLoraLoaderHeaderWidget``) are ignored.
        lora_stack: optional LORA_STACK list of ``(name, strength_model, strength_clip)`` tuples (Comfyroll /
            Efficiency stackers).
    Raises:
        ValueError: malformed row, non-finite or absurd strength, or the same file listed twice (names it).
    """
    entries = []
    for i, item in enumerate(lora_stack or ()):
        if not isinstance(item, (list, tuple)) or len(item) != 3:
            raise ValueError(f"lora_stack item {i} must be (name, strength_model, strength_clip), got {item!r}")
        entries.append(LoraEntry(str(item[0]), _float(item[1], f"lora_stack[{i}] strength_model"),
                                 _float(item[2], f"lora_stack[{i}] strength_clip")))
    names = sorted((k for k in rows if k.startswith("lora_") and k[5:].isdigit()), key=lambda k: int(k[5:]))
    for key in names:
        row = rows[key]
        if not isinstance(row, dict) or "lora" not in row:
            raise ValueError(f"{key} must be an object like {ROW_SHAPES}; got {row!r}")
        if not row.get("on", True) or row["lora"] in (None, "", "None"):
            continue
        entries.append(LoraEntry(str(row["lora"]), *_row_strengths(key, row)))
    seen = set()
    for e in entries:
        if e.name in seen:
            raise ValueError(f"LoRA {e.name!r} is listed twice; merge the rows into one (strengths add up)")
        seen.add(e.name)
    return entries


def lora_path(name: str) -> str:
    """Full path of ``name`` inside a loras folder. Raises LoraFileError naming the file if there is none."""
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise LoraFileError(f"LoRA {name!r} is not in the loras folder(s) {folder_paths.get_folder_paths('loras')}")
    return path


def build_plans(model, clip, entries: list[LoraEntry]):
    """Map every entry onto the model's and the text encoder's weight keys.

    Args:
        model: a ComfyUI ModelPatcher (or None); clip: a ComfyUI CLIP (or None).
        entries: enabled entries from ``parse_entries``.
    Returns:
        ``(unet_plan, clip_plan, matches, signature)``: plans map weight key -> list of ``(strength, LoraFactors)``;
        ``signature`` is a text naming files (path, size, mtime), and strengths, in order.
    Raises:
        LoraFileError: missing or unreadable file, NaN/Inf tensors, or a file with no key for this model.
        FuseError: a factor's shape does not fit the model weight (the LoRA is for another architecture).
        UnsupportedTarget: a touched weight is quantized (int8), names the key.
        NotImplementedError: an adapter type this pack does not fuse yet (names file and key).
    """
    unet_map = comfy.lora.model_lora_keys_unet(model.model, {}) if model is not None else {}
    clip_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}) if clip is not None else {}
    maps_id = (hash(frozenset(unet_map.items())), hash(frozenset(clip_map.items())))
    unet_plan: dict[str, list] = {}
    clip_plan: dict[str, list] = {}
    matches, signature = [], []
    for entry in entries:
        path = lora_path(entry.name)
        ident = FILES.identity(path)
        mapped, unmatched = FILES.derived(path, ("mapping", maps_id),
                                          lambda tensors: _map_file(entry.name, ident, tensors, unet_map, clip_map))
        match = LoraMatch(entry, unmatched=unmatched)
        for key, factors, in_unet in mapped:
            target, strength = (model, entry.strength_model) if in_unet else (clip.patcher, entry.strength_clip)
            factors.check(key, tuple(engine_for(target.model, target.offload_device).target(key).param.shape))
            if strength != 0.0:
                (unet_plan if in_unet else clip_plan).setdefault(key, []).append((strength, factors))
            if in_unet:
                match.unet_keys += 1
            else:
                match.clip_keys += 1
        matches.append(match)
        signature.append(f"{ident}:{entry.strength_model!r}:{entry.strength_clip!r}")
    return unet_plan, clip_plan, matches, "|".join(signature)


def _map_file(name: str, ident: tuple, tensors: dict, unet_map: dict, clip_map: dict):
    """ComfyUI's mapping of one file onto the model: ``([(weight key, LoraFactors, is_unet)], unmatched tensor
    names)``. Raises LoraFileError when nothing matches, NotImplementedError for adapters not fused here."""
    key_map = {**unet_map, **clip_map}
    patches = comfy.lora.load_lora(tensors, key_map, log_missing=False)
    if not patches:
        raise LoraFileError(f"LoRA {name!r}: none of its {len(tensors)} tensors match this model "
                            f"(e.g. {sorted(tensors)[:3]}); it is for another architecture or not a LoRA")
    unet_keys = set(unet_map.values())
    mapped = [(key, _factors(name, key, adapter, f"{ident[0]}@{ident[1]}:{ident[2]}#{key}"), key in unet_keys)
              for key, adapter in patches.items()]
    matched = {x for x, key in key_map.items() if key in patches}
    return mapped, sorted(k for k in tensors if not _has_prefix(k, matched))


def _has_prefix(tensor_key: str, prefixes: set) -> bool:
    parts = tensor_key.split(".")
    return any(".".join(parts[:i]) in prefixes for i in range(1, len(parts)))


def _factors(name: str, key, adapter, token: str) -> LoraFactors:
    if not isinstance(key, str):
        raise NotImplementedError(f"LoRA {name!r}: key {key!r} patches part of a fused weight, which this pack "
                                  "does not fuse yet; use the stock LoraLoader for this file")
    if not isinstance(adapter, comfy.weight_adapter.LoRAAdapter):
        raise NotImplementedError(f"LoRA {name!r}: {key} is a {type(adapter).__name__} (LyCORIS) patch, which "
                                  "this pack does not fuse yet; use the stock LoraLoader for this file")
    up, down, alpha, mid, dora_scale, reshape = adapter.weights
    if dora_scale is not None or reshape is not None:
        raise NotImplementedError(f"LoRA {name!r}: {key} uses DoRA/reshape, which this pack does not fuse yet")
    return LoraFactors.from_tensors(up, down, alpha, token, mid=mid)
