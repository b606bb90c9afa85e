"""The two ComfyUI nodes: Batch LoRA Loader and Reset Adapters (V1 node API, ComfyUI >= 0.3.75). Glue only."""
from __future__ import annotations

import logging

from ..core import return_freed_memory
from .dynamic import check_finite, is_dynamic
from .info import base_model_note, loaded_loras, lora_info, trigger_words
from .lifecycle import check_not_frozen, describe, release_caches, stack_of, with_stack
from .stack import FILES, NOT_A_ROW, ROW_SHAPES, build_plans, is_row_key, lora_path, parse_entries
from .status import prompt_server

log = logging.getLogger("comfyui-batch-lora")

CATEGORY = "loaders/batch lora"

ROW_TOOLTIP = (f"One LoRA row (a file in models/loras, its strengths, on/off): {ROW_SHAPES}, optionally with "
               "\"blocks\": per-block weights (a preset such as SD-INALL, or comma-separated numbers, BASE first). "
               "The node UI edits these objects; API prompts send the same ones.")


class _LoraRows(dict):
    """INPUT_TYPES "optional" dict that also admits any number of ``lora_N`` row inputs (their values are
    objects, checked by ``BatchLoraLoader.VALIDATE_INPUTS``); ComfyUI only lists the declared keys."""

    def __contains__(self, key):
        return super().__contains__(key) or is_row_key(key)

    def __getitem__(self, key):
        if not super().__contains__(key) and key in self:
            return ("BATCH_LORA_ROW", {"tooltip": ROW_TOOLTIP})
        return super().__getitem__(key)


def _merge(old: dict, new: dict) -> dict:
    merged = {k: list(v) for k, v in old.items()}
    for key, terms in new.items():
        merged.setdefault(key, []).extend(terms)
    return merged


def _stacked(patcher, plan: dict, signature: str, labels: list[str], node: str):
    """Clone ``patcher`` with ``plan`` added after any stack of this pack it already carries."""
    check_not_frozen(patcher, plan, node)
    spec = stack_of(patcher)
    if spec is not None:
        plan = _merge(spec.plan, plan)
        signature = f"{spec.signature}||{signature}"
        labels = list(spec.labels) + labels
    if is_dynamic(patcher):
        check_finite(patcher, plan, node)
    return with_stack(patcher, plan, signature, labels, node=node)


class BatchLoraLoader:
    """Batch LoRA Loader: any number of LoRAs, fused into the model/CLIP weights in place once per graph run."""

    DESCRIPTION = ("Applies a stack of LoRAs (each with strength_model, strength_clip and on/off). The weights are "
                   "patched in place once when the model is loaded, as round(base_fp32 + sum of strength x delta) "
                   "from an exact FP32 base cache, so queued runs never drift and an unchanged stack costs nothing.")
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    # New outputs go after the existing ones: saved workflows link outputs by index.
    RETURN_TYPES = ("MODEL", "CLIP", "STRING", "LORA_STACK", "STRING", "STRING", "STRING")
    RETURN_NAMES = ("MODEL", "CLIP", "report", "lora_stack", "lora_tags", "trigger_words", "loaded_loras")
    OUTPUT_TOOLTIPS = ("The model carrying the stack (the input model is not modified).",
                       "The CLIP carrying the stack (None when no CLIP is connected).",
                       "What runs the model (eager, torch.compile, OneDiff), then per LoRA: strengths, UNet/CLIP "
                       "keys matched, tensors not matched, the base model it was trained for, and a warning when "
                       "that is not the loaded model's.",
                       "The enabled LoRAs, input stack first, as a LORA_STACK list of (name, strength_model, "
                       "strength_clip) for other LoRA_STACK nodes.",
                       "The enabled LoRAs in A1111 prompt syntax for image metadata, e.g. <lora:style:0.8>; "
                       "<lora:name:clip:model> when the two strengths differ.",
                       "The enabled LoRAs' trigger words, in row order, without repeats, comma-separated (from "
                       "Lora-Manager .metadata.json, Civitai .civitai.info, the file's modelspec.trigger_phrase, "
                       "else its kohya tag frequencies).",
                       "The enabled LoRAs as JSON: per row its name, strengths, the base model it was trained for "
                       "and its trigger words.")

    @classmethod
    def INPUT_TYPES(cls):
        """MODEL, optional CLIP and LORA_STACK, and any number of ``lora_N`` row objects (see ROW_TOOLTIP)."""
        return {
            "required": {"model": ("MODEL", {"tooltip": "The diffusion model to apply the LoRAs to."})},
            "optional": _LoraRows({
                "clip": ("CLIP", {"tooltip": "The text encoder; its LoRA keys use strength_clip."}),
                "lora_stack": ("LORA_STACK", {"tooltip": "Optional (name, strength_model, strength_clip) list "
                                                         "from a LoRA stacker node; applied before the rows."}),
            }),
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, **inputs):
        """ComfyUI's validation, before anything runs (POST /prompt answers with the error): every ``lora_N``
        row through ``parse_entries``' coercion table. Returns True, or the error text naming the row and field.
        (ComfyUI passes no linked input here: ``lora_stack`` items are checked when the node runs.)"""
        try:
            parse_entries({k: v for k, v in inputs.items() if is_row_key(k)})
        except ValueError as exc:
            return str(exc)
        return True

    @classmethod
    def IS_CHANGED(cls, model, clip=None, lora_stack=None, unique_id=None, **rows):
        """Files changed on disk, and edited sidecar files (trigger words, base model), make the node run again
        (ComfyUI otherwise reuses its cached output)."""
        try:
            return "|".join(f"{FILES.identity(lora_path(e.name))}:{hash(lora_info(e.name))}"
                            for e in parse_entries(rows, lora_stack))
        except Exception as exc:  # the error itself is reported by apply()
            return f"error: {exc}"

    def apply(self, model, clip=None, lora_stack=None, unique_id=None, **rows):
        """Return ``(MODEL, CLIP, report, lora_stack, lora_tags, trigger_words, loaded_loras)``: clones carrying the
        stack (no weight is touched here), the report text, the enabled entries as a LORA_STACK list and as
        ``<lora:...>`` tags, their trigger words and the JSON of ``info.loaded_loras`` (nodes/info.py).

        Raises (before anything changes): ValueError for a malformed row or strength, LoraFileError for a missing
        or broken file or one that matches nothing, FuseError for a factor that does not fit the model,
        UnsupportedTarget for quantized weights or a frozen compile, NotImplementedError for adapter types this
        pack does not fuse (each names the row, file or key)."""
        node = f"Batch LoRA Loader (node {unique_id})" if unique_id is not None else "Batch LoRA Loader"
        entries = parse_entries(rows, lora_stack)
        unet_plan, clip_plan, matches, unet_signature, clip_signature = build_plans(model, clip, entries)
        labels = [f"{e.name}@{e.strength_model:g}/{e.strength_clip:g}" + (f" blocks {e.blocks}" if e.blocks else "")
                  for e in entries]
        out_model = _stacked(model, unet_plan, unet_signature, labels, node)
        out_clip = None
        if clip is not None:
            out_clip = clip.clone()
            out_clip.patcher = _stacked(clip.patcher, clip_plan, clip_signature, labels, node)
        runs_on = f"model: {describe(model)}" + (f"; clip: {describe(clip.patcher)}" if clip is not None else "")
        infos = [lora_info(e.name) for e in entries]
        lines = [runs_on]
        for m, info in zip(matches, infos):
            note, mismatch = base_model_note(info, m.arch)
            lines.append(m.line() + (f"\n  {note}" if note else ""))
            (log.warning if m.unmatched else log.info)("batch-lora: %s", m.line(limit=None))
            if mismatch:
                log.warning("batch-lora: %s: %s", m.entry.name, note.removeprefix("WARNING: "))
        if not matches:
            lines.append("no LoRA enabled")
            log.warning("batch-lora: Batch LoRA Loader ran with no enabled LoRA (is the web extension loaded?)")
        stack = [(e.name, e.strength_model, e.strength_clip) for e in entries]
        return (out_model, out_clip, "\n".join(lines), stack, " ".join(e.tag() for e in entries),
                trigger_words(infos), loaded_loras(entries, infos))


class ResetAdapters:
    """Reset Adapters: the model/CLIP without any stack of this pack, bit-identical to a fresh load."""

    DESCRIPTION = ("Removes every LoRA stack applied by Batch LoRA Loader: the outputs run with the exact base "
                   "weights. With free_cache, also drops this pack's base cache for these models and its cache "
                   "of parsed LoRA files.")
    CATEGORY = CATEGORY
    FUNCTION = "reset"
    RETURN_TYPES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = ("The model with its base weights.", "The CLIP with its base weights.")

    @classmethod
    def INPUT_TYPES(cls):
        """``free_cache`` toggle, optional MODEL and CLIP."""
        return {
            "required": {"free_cache": ("BOOLEAN", {"default": False, "tooltip": (
                "Also free this pack's base-weight cache for these models and its parsed-LoRA cache. The next "
                "stack then re-reads files and re-captures base weights.")})},
            "optional": {"model": ("MODEL", {"tooltip": "Model to reset."}),
                         "clip": ("CLIP", {"tooltip": "CLIP to reset."})},
        }

    def reset(self, free_cache, model=None, clip=None):
        """Return ``(MODEL, CLIP)`` clones without any stack of this pack (None for an input not connected)."""
        out_model = with_stack(model, {}, "", release_cache=free_cache) if model is not None else None
        out_clip = None
        if clip is not None:
            out_clip = clip.clone()
            out_clip.patcher = with_stack(clip.patcher, {}, "", release_cache=free_cache)
        if free_cache:
            freed = sum(release_caches(p) for p in (model, clip and clip.patcher) if p is not None)
            freed += FILES.nbytes
            FILES.clear()  # its memory goes once no cached stack of any node still holds its factors
            return_freed_memory()
            log.info("batch-lora: caches freed (%.1f MiB now; base copies of patched keys go when they are "
                     "restored)", freed / 2**20)
        return (out_model, out_clip)


def guard_prompt(json_data: dict) -> dict:
    """ComfyUI ``on_prompt`` handler (POST /prompt, before validation): a Batch LoRA Loader row given as a list is
    kept as a value, ``{NOT_A_ROW: list}``, which ``VALIDATE_INPUTS`` then refuses, naming the row and showing
    the list.

    ComfyUI takes any input shaped like ``[node id, output index]`` for a link, declared or not. Validation hands
    ``VALIDATE_INPUTS`` no value for it (None), and planning follows it (comfy_execution/graph.py
    ``ExecutionList.add_node``): before this pack validated its rows, a row such as ``["x.safetensors", 1.0]``
    pointed at no node there and killed the prompt worker (NodeNotFoundError: that prompt ran forever and every
    later one hung). Returns ``json_data``, changed in place."""
    prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
    for node in prompt.values() if isinstance(prompt, dict) else ():
        inputs = node.get("inputs") if isinstance(node, dict) and node.get("class_type") == "BatchLoraLoader" else None
        for key, value in inputs.items() if isinstance(inputs, dict) else ():
            if is_row_key(key) and isinstance(value, list):
                inputs[key] = {NOT_A_ROW: value}
    return json_data


def register_prompt_guard() -> bool:
    """Add ``guard_prompt`` to the running ComfyUI server's on_prompt handlers; False (nothing done) without a
    server."""
    instance = prompt_server()
    if instance is None:
        return False
    instance.add_on_prompt_handler(guard_prompt)
    return True


NODE_CLASS_MAPPINGS = {"BatchLoraLoader": BatchLoraLoader, "BatchLoraResetAdapters": ResetAdapters}
NODE_DISPLAY_NAME_MAPPINGS = {"BatchLoraLoader": "Batch LoRA Loader", "BatchLoraResetAdapters": "Reset Adapters"}
