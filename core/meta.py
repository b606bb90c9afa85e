"""What a LoRA file says about itself: title, trigger words, base model, preview image. Read from the file's
safetensors header metadata and from the sidecar files other tools write next to it; never downloaded.

Sources, in priority order (the first one that has a field gives it; trigger words are collected from every
explicit source, see ``read_info``):

=============================  =================================================  ================================
file next to ``NAME.safetensors``  written by (format read)                         fields used
=============================  =================================================  ================================
``NAME.metadata.json``         ComfyUI-Lora-Manager (``model_name``,              title, base model, trigger words
                               ``base_model``, ``civitai.trainedWords``)
``NAME.civitai.info``          Civitai Helper / SD Civitai Browser (Civitai's     title, base model, trigger words
                               model-version JSON: ``model.name``, ``name``,
                               ``baseModel``, ``trainedWords``)
header ``__metadata__``        kohya sd-scripts / musubi-tuner / ai-toolkit /     title, base model, trigger words
                               OneTrainer (SAI ModelSpec 1.0:
                               ``modelspec.title``, ``modelspec.architecture``,
                               ``modelspec.trigger_phrase``; kohya
                               ``ss_output_name``, ``ss_base_model_version``,
                               ``ss_tag_frequency``, ``ss_dataset_dirs``;
                               musubi-tuner ``ss_architecture``)
``NAME.preview.png`` ...       Civitai Helper, Lora-Manager, A1111 (first of      preview image
                               ``PREVIEW_SUFFIXES``)
=============================  =================================================  ================================

kohya's ``ss_tag_frequency`` (``{dataset dir: {tag: captions holding it}}``) gives trigger words only when no
explicit source has any: per dataset, the tags found in every caption of that dataset (count equal to the
dataset's ``img_count`` in ``ss_dataset_dirs``, or to its most frequent tag's count when that is absent), at most
``MAX_TAG_TRIGGERS`` per dataset, most frequent first.

Base models are compared by family (``FAMILIES``): the family of a LoRA's base-model text against the family of
the loaded model's ComfyUI model_config class.
"""
from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass
from typing import Callable

from safetensors import SafetensorError, safe_open

__all__ = ["LoraInfo", "read_info", "dedup_words", "family_of_base", "family_of_model", "FAMILIES",
           "PREVIEW_SUFFIXES"]

PREVIEW_SUFFIXES = (".preview.png", ".preview.jpg", ".preview.jpeg", ".preview.webp", ".preview.gif",
                    ".png", ".jpg", ".jpeg", ".webp", ".gif")
"""Preview image names tried next to ``NAME.safetensors`` (``NAME`` + suffix), in order: Civitai Helper writes
``.preview.png``, Lora-Manager ``.webp`` / ``.preview.*``, A1111 ``.png``/``.preview.png``."""

MAX_TAG_TRIGGERS = 5
"""Trigger words taken from one dataset's kohya tag frequencies, at most."""

MAX_SIDECAR_BYTES = 4 << 20
"""Sidecar JSON files larger than this are ignored (a Civitai info file is a few KB, with images ~100 KB)."""

FAMILIES = (  # family, base-model text prefixes (normalised: lower case, letters and digits only), model classes
    ("SD1.x", ("sd1", "sdv1", "stablediffusionv1"), r"^SD15"),
    ("SD2.x", ("sd2", "sdv2", "stablediffusionv2"), r"^(SD2|SD_X4)"),
    ("SDXL", ("sdxl", "stablediffusionxl", "pony", "illustrious", "noobai"),
     r"^(SDXL|SSD1B|Segmind_Vega|KOALA)"),
    ("SD3", ("sd3", "stablediffusion3"), r"^SD3"),
    ("Flux.1", ("flux1", "fluxkontext", "fluxkrea"), r"^Flux(?!2)"),
    ("Flux.2", ("flux2",), r"^Flux2"),
    ("Chroma", ("chroma",), r"^Chroma"),
    ("Wan", ("wan",), r"^WAN"),
    ("Qwen-Image", ("qwen",), r"^QwenImage"),
    ("HunyuanVideo", ("hunyuanvideo", "hyv"), r"^HunyuanVideo"),
    ("LTXV", ("ltx",), r"^LTX"),
    ("Lumina 2", ("lumina",), r"^Lumina2"),
    ("Z-Image", ("zimage",), r"^ZImage"),
    ("HiDream", ("hidream",), r"^HiDream"),
)
"""Model families: the prefixes a LoRA's base-model text starts with once normalised (kohya
``ss_base_model_version`` ``sd_v1``/``sdxl_base_v1-0``/``flux1``, SAI ModelSpec architectures
``stable-diffusion-xl-v1-base/lora``/``flux-1-dev/lora`` (sd-scripts library/sai_model_spec.py), musubi-tuner
``ss_architecture`` ``wan``/``hyv``/``qwen_image``, Civitai ``baseModel`` ``SD 1.5``/``SDXL 1.0``/``Pony``/
``Flux.1 D``/``Wan Video 14B t2v``/``Qwen``), and the ComfyUI model_config class names of that family
(comfy/supported_models.py)."""


@dataclass(frozen=True)
class LoraInfo:
    """What is known about one LoRA file (all fields optional).

    title: display name (str or None). trigger_words: words/phrases to put in the prompt, deduplicated, in source
    order. base_model: the base-model text as the source wrote it (e.g. ``SDXL 1.0``, ``sdxl_base_v1-0``) or None.
    family: ``FAMILIES`` name of ``base_model`` or None (unknown text). preview: absolute path of the preview image
    or None. sources: the sidecar/header sources read, e.g. ``("metadata.json", "header")``."""

    title: str | None = None
    trigger_words: tuple[str, ...] = ()
    base_model: str | None = None
    family: str | None = None
    preview: str | None = None
    sources: tuple[str, ...] = ()


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def family_of_base(text: str | None) -> str | None:
    """The ``FAMILIES`` name of a base-model text (any source's spelling), or None when it names none (e.g.
    ``Other``, ``unknown``). Raises nothing."""
    key = _norm(text or "")
    return next((name for name, prefixes, _ in FAMILIES if key.startswith(prefixes)), None)


def family_of_model(model_class: str) -> str | None:
    """The ``FAMILIES`` name of a ComfyUI model_config class name (e.g. ``SDXL``, ``WAN21_T2V``), or None."""
    return next((name for name, _, classes in FAMILIES if re.match(classes, model_class)), None)


def _words(value) -> list[str]:
    """Trigger words from a string (comma-separated) or a list of strings; anything else gives none."""
    items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    return [w.strip() for item in items if isinstance(item, str) for w in item.split(",") if w.strip()]


def _tag_triggers(meta: dict) -> list[str]:
    try:
        freq = json.loads(meta.get("ss_tag_frequency") or "{}")
        dirs = json.loads(meta.get("ss_dataset_dirs") or "{}")
    except ValueError:
        return []
    words = []
    for dataset, tags in freq.items() if isinstance(freq, dict) else ():
        counts = {t.strip(): c for t, c in tags.items() if isinstance(c, int) and t.strip()} \
            if isinstance(tags, dict) else {}
        if not counts:
            continue
        info = dirs.get(dataset) if isinstance(dirs, dict) else None
        every = info.get("img_count") if isinstance(info, dict) and isinstance(info.get("img_count"), int) else None
        every = every or max(counts.values())
        ranked = sorted((t for t, c in counts.items() if c >= every), key=lambda t: -counts[t])
        words += ranked[:MAX_TAG_TRIGGERS]
    return words


def _json_file(path: str) -> dict | None:
    try:
        if os.path.getsize(path) > MAX_SIDECAR_BYTES:
            return None
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _header(path: str) -> dict:
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
    except (SafetensorError, OSError, ValueError):
        return {}
    return {k: v for k, v in (meta or {}).items() if isinstance(v, str)}


def _first(*values):
    return next((v.strip() for v in values if isinstance(v, str) and v.strip()), None)


def dedup_words(words) -> tuple[str, ...]:
    """``words`` (strings) without repeats, first occurrence kept; case and spacing are ignored when comparing."""
    seen, out = set(), []
    for word in words:
        key = " ".join(word.split()).casefold()
        if key not in seen:
            seen.add(key)
            out.append(word)
    return tuple(out)


def _stat(path: str):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


_CACHE: dict[tuple, LoraInfo] = {}
_CACHE_LOCK = threading.Lock()
_CACHE_ENTRIES = 1024


def read_info(path: str, allowed: Callable[[str], bool]) -> LoraInfo:
    """The ``LoraInfo`` of the LoRA file at ``path`` (``.safetensors``), from its header and its sidecar files.

    Args:
        path: the LoRA file (already checked by the caller, e.g. inside a loras folder).
        allowed: ``allowed(real_path)`` says whether a sidecar file, links resolved, may be read; sidecars it
            refuses (e.g. a link leading outside the loras folders) are treated as absent.
    Trigger words: those of ``NAME.metadata.json`` (``civitai.trainedWords``), then ``NAME.civitai.info``
    (``trainedWords``), then the header's ``modelspec.trigger_phrase``, deduplicated (case and spacing ignored);
    kohya tag frequencies (module docstring) only when these give none. Broken or oversized sidecars and a
    header without metadata give nothing; raises nothing. Cached per version (size, mtime, ctime) of the file and of
    each sidecar, so an edited sidecar is read again."""
    stem = path[:-len(".safetensors")] if path.lower().endswith(".safetensors") else os.path.splitext(path)[0]
    candidates = {kind: stem + suffix for kind, suffix in
                  (("metadata.json", ".metadata.json"), ("civitai.info", ".civitai.info"))}
    candidates.update({suffix: stem + suffix for suffix in PREVIEW_SUFFIXES})
    present = {}
    for kind, candidate in candidates.items():
        version = _stat(candidate)
        if version is not None and allowed(os.path.realpath(candidate)):
            present[kind] = (candidate, version)
    key = (os.path.realpath(path), _stat(path), tuple(sorted((k, v[1]) for k, v in present.items())))
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
    info = _read(path, present)
    with _CACHE_LOCK:
        if len(_CACHE) >= _CACHE_ENTRIES:
            _CACHE.clear()
        _CACHE[key] = info
    return info


def _read(path: str, present: dict) -> LoraInfo:
    manager = _json_file(present["metadata.json"][0]) if "metadata.json" in present else None
    civitai = _json_file(present["civitai.info"][0]) if "civitai.info" in present else None
    header = _header(path)
    sources = [name for name, data in (("metadata.json", manager), ("civitai.info", civitai), ("header", header))
               if data]
    manager, civitai = manager or {}, civitai or {}
    manager_civitai = manager.get("civitai") if isinstance(manager.get("civitai"), dict) else {}
    civitai_model = civitai.get("model") if isinstance(civitai.get("model"), dict) else {}
    words = (_words(manager_civitai.get("trainedWords")) + _words(civitai.get("trainedWords"))
             + _words(header.get("modelspec.trigger_phrase")))
    bases = [v.strip() for v in (manager.get("base_model"), civitai.get("baseModel"),
                                 header.get("modelspec.architecture"), header.get("ss_base_model_version"),
                                 header.get("ss_architecture")) if isinstance(v, str) and v.strip()]
    base = next((b for b in bases if family_of_base(b)), bases[0] if bases else None)  # "Unknown" gives way
    preview = next((present[s][0] for s in PREVIEW_SUFFIXES if s in present), None)
    return LoraInfo(
        title=_first(header.get("modelspec.title"), manager.get("model_name"), civitai_model.get("name"),
                     header.get("ss_output_name")),
        trigger_words=dedup_words(words or _tag_triggers(header)),
        base_model=base, family=family_of_base(base), preview=preview, sources=tuple(sources))
