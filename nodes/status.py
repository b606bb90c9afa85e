"""GET /batch_lora/status: what this pack holds and did, per patched model (ComfyUI server route).

Numbers come from the engines themselves (``core.InPlacePatcher``: base cache, counters, last reports), so the
route, the logs and the tests read one source.
"""
from __future__ import annotations

import sys

from .dynamic import states
from .lifecycle import engines
from .stack import FILES

__all__ = ["status", "register_routes", "ROUTE"]

ROUTE = "/batch_lora/status"


def _report(report) -> dict | None:
    if report is None:
        return None
    return {"merged": report.merged, "restored": report.restored, "unchanged": report.unchanged,
            "ms": round(report.seconds * 1e3, 3), "finished_at": report.finished_at, "stack": list(report.labels)}


def status() -> dict:
    """The status document (JSON-ready).

    ``lora_file_cache_bytes``: parsed LoRA tensors held (one cache shared by all models and nodes).
    ``models``: one entry per live torch model the pack has loaded (a ComfyUI BaseModel, a text encoder):
    ``model`` (class name), ``patcher`` (``classic``: the pack bakes in place; ``dynamic``: ComfyUI's
    ModelPatcherDynamic evaluates the pack's patches when each layer runs, see nodes/dynamic.py), ``id``,
    ``base_cache`` (``bytes``, ``keys``, ``dtype`` fp32|native, ``device``,
    ``budget_bytes``), ``applied_stack`` (``file@strength_model/strength_clip`` labels baked in now, [] at
    base), ``applied_keys``, ``last_apply`` / ``last_reset`` (keys merged/restored/unchanged, ``ms`` wall time,
    ``finished_at`` Unix time, ``stack``; null before the first) and ``counters`` (merges, writes, restores,
    rollbacks, moves, host_restores: running totals, see ``core.Counters``; keys ComfyUI restored are counted at the pack's next load).
    A ``dynamic`` entry has ``base_cache`` (0 bytes: the checkpoint's own weights are the base), ``applied_stack``
    and ``applied_keys`` as of the last load, and ``counters.merges`` (layer weights built with the stack).
    """
    models = []
    for engine, live in sorted(engines(), key=lambda item: type(item[0].module).__name__):
        cache = engine.cache
        models.append({
            "model": type(engine.module).__name__,
            "patcher": "classic",
            "id": f"{id(engine.module):#x}",
            "base_cache": {"bytes": cache.nbytes, "keys": len(cache), "dtype": cache.dtype,
                           "device": None if cache.device is None else str(cache.device),
                           "budget_bytes": cache.budget_bytes},
            "applied_stack": list(engine.labels) if live else [],
            "applied_keys": len(live),
            "last_apply": _report(engine.last_apply),
            "last_reset": _report(engine.last_reset),
            "counters": dict(vars(engine.counters)),
        })
    for model, state in sorted(states(), key=lambda item: type(item[0]).__name__):
        models.append({"model": type(model).__name__, "patcher": "dynamic", "id": f"{id(model):#x}",
                       "base_cache": {"bytes": 0, "keys": 0}, "applied_stack": list(state.labels),
                       "applied_keys": state.keys, "counters": {"merges": state.merges}})
    return {"lora_file_cache_bytes": FILES.nbytes, "models": models}


def register_routes() -> bool:
    """Add GET ``ROUTE`` to the running ComfyUI server. Returns False (and does nothing) when the pack is imported
    without a server (tests, scripts): the ``server`` module is only looked up, never imported here."""
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return False
    from aiohttp import web

    @instance.routes.get(ROUTE)
    async def batch_lora_status(request):
        return web.json_response(status())

    return True
