"""LoRA metadata for the loader's outputs and the UI: trigger words, base model, preview (``core.meta``), read only
from files inside the loras folders (the containment rules of ``stack.lora_path``), and two server routes:

- ``GET /batch_lora/info?lora=<name>``: ``{"lora", "title", "trigger_words", "base_model", "family", "preview"}``
  (``preview``: the preview route's URL, or null); 400 without ``lora``, 404 with ``{"error"}`` for a name
  ``lora_path`` refuses (absolute, ``..``, missing, a link leading outside the loras folders).
- ``GET /batch_lora/preview?lora=<name>``: the preview image file (``core.meta.PREVIEW_SUFFIXES``), or 404.
"""
from __future__ import annotations

import json
import os
from urllib.parse import quote

from ..core import LoraFileError, shown
from ..core.meta import LoraInfo, dedup_words, family_of_model, read_info
from .stack import LoraEntry, lora_path, within_loras

__all__ = ["lora_info", "info_document", "trigger_words", "loaded_loras", "base_model_note", "add_routes",
           "INFO_ROUTE", "PREVIEW_ROUTE"]

INFO_ROUTE = "/batch_lora/info"
PREVIEW_ROUTE = "/batch_lora/preview"
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
               ".gif": "image/gif"}
"""Content type per preview suffix (``core.meta.PREVIEW_SUFFIXES``; Python's mimetypes may not know WebP)."""


def lora_info(name: str) -> LoraInfo:
    """``core.meta.read_info`` of the LoRA ``name`` (relative to a loras folder); sidecar files are read only when
    they, links resolved, lie inside the loras folders. Raises LoraFileError as ``lora_path`` does."""
    return read_info(lora_path(name), within_loras)


def info_document(name: str) -> dict:
    """The info route's JSON document for ``name``. Raises LoraFileError as ``lora_path`` does."""
    info = lora_info(name)
    preview = None
    if info.preview is not None:
        preview = f"{PREVIEW_ROUTE}?lora={quote(name, safe='')}"
    return {"lora": name, "title": info.title, "trigger_words": list(info.trigger_words),
            "base_model": info.base_model, "family": info.family, "preview": preview}


def trigger_words(infos: list[LoraInfo]) -> str:
    """The loader's ``trigger_words`` output: every row's trigger words in row order, deduplicated (case and spacing
    ignored), joined with ``", "`` (CLIP prompt syntax); "" when there are none."""
    words = dedup_words(word for info in infos for word in info.trigger_words)
    return ", ".join(words)


def loaded_loras(entries: list[LoraEntry], infos: list[LoraInfo]) -> str:
    """The loader's ``loaded_loras`` output: a JSON list, one object per enabled row in order, ``{"name",
    "strength_model", "strength_clip", "base_model", "family", "trigger_words", "row"}`` (``row``: where it came
    from, e.g. ``lora_2`` or ``lora_stack[0]``; ``blocks`` when the row has block weights)."""
    rows = []
    for entry, info in zip(entries, infos):
        row = {"name": entry.name, "strength_model": entry.strength_model, "strength_clip": entry.strength_clip,
               "base_model": info.base_model, "family": info.family, "trigger_words": list(info.trigger_words),
               "row": entry.row}
        if entry.blocks:
            row["blocks"] = entry.blocks
        rows.append(row)
    return json.dumps(rows, ensure_ascii=False)


def base_model_note(info: LoraInfo, model_class: str) -> tuple[str, bool]:
    """``(text, mismatch)``: the report's base-model note for one LoRA on a model of ComfyUI model_config class
    ``model_class``, e.g. ``"trained for SDXL 1.0 (SDXL)"``; ``mismatch`` is True (and the text a warning) when
    both families are known and differ. ``("", False)`` when the LoRA names no base model."""
    if info.base_model is None:
        return "", False
    loaded = family_of_model(model_class)
    text = f"trained for {info.base_model}" + (f" ({info.family})" if info.family else "")
    if info.family is not None and loaded is not None and info.family != loaded:
        return (f"WARNING: {text}, but the loaded model is {loaded} ({model_class}): the LoRA may do nothing or "
                "harm the image; use a LoRA made for this model"), True
    return text, False


def add_routes(routes) -> None:
    """Add GET ``INFO_ROUTE`` and ``PREVIEW_ROUTE`` to an aiohttp route table (the ComfyUI server's)."""
    from aiohttp import web

    def _name(request):
        name = request.query.get("lora")
        if not name:
            raise web.HTTPBadRequest(text=json.dumps({"error": "give the LoRA as ?lora=<file name>"}),
                                     content_type="application/json")
        return name

    @routes.get(INFO_ROUTE)
    async def batch_lora_info(request):
        name = _name(request)
        try:
            return web.json_response(info_document(name))
        except LoraFileError as exc:
            return web.json_response({"error": str(exc)}, status=404)

    @routes.get(PREVIEW_ROUTE)
    async def batch_lora_preview(request):
        name = _name(request)
        try:
            preview = lora_info(name).preview
        except LoraFileError as exc:
            return web.json_response({"error": str(exc)}, status=404)
        if preview is None:
            return web.json_response({"error": f"LoRA {shown(name)} has no preview image"}, status=404)
        return web.FileResponse(preview, headers={"Cache-Control": "no-cache",
                                                  "Content-Type": IMAGE_TYPES[os.path.splitext(preview)[1].lower()]})
