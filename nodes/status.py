"""GET /batch_lora/status: what this pack holds and did, per patched model (ComfyUI server route).

Numbers come from the engines themselves (``core.InPlacePatcher``: base cache, counters, last reports), so the
route, the logs and the tests read one source.
"""
from __future__ import annotations

import sys

from .dynamic import states
from .info import add_routes
from .lifecycle import RELEASED, engines
from .stack import FILES

__all__ = ["status", "register_routes", "prompt_server", "ROUTE"]

ROUTE = "/batch_lora/status"


def _report(report) -> dict | None:
    if report is None:
        return None
    return {"merged": report.merged, "restored": report.restored, "unchanged": report.unchanged,
            "ms": round(report.seconds * 1e3, 3), "finished_at": report.finished_at, "stack": list(report.labels)}


def status() -> dict:
    """The status document (JSON-ready).

    ``lora_file_cache_bytes``: parsed LoRA tensors held (one cache shared by all models and nodes).
    ``free_cache``: running totals of the base copies Reset Adapters' ``free_cache`` released (``releases``,
    ``bytes``) and of the RSS drop measured across each release (``rss_returned_bytes``).
    ``models``: one entry per live torch model the pack has loaded (a ComfyUI BaseModel, a text encoder):
    ``model`` (class name), ``patcher`` (``classic``: the pack bakes in place; ``dynamic``: ComfyUI's
    ModelPatcherDynamic evaluates the pack's patches when each layer runs, see nodes/dynamic.py),
    ``base_cache`` (``bytes``, ``keys``, ``mode`` auto|fp32|native (``BATCH_LORA_BASE_CACHE``), ``dtypes`` the copies
    are really held in (fp8 weights are always kept natively), ``device``, ``budget_bytes``), ``applied_stack``
    (``file@strength_model/strength_clip`` labels baked in now, [] at base), ``applied_keys``, ``last_apply`` / ``last_reset`` (keys merged/restored/unchanged, ``ms`` wall time,
    ``finished_at`` Unix time, ``stack``; null before the first) and ``counters`` (merges, writes, restores,
    rollbacks, moves, host_restores: running totals, see ``core.Counters``; keys ComfyUI restored from the pack's
    base copies are restores too, counted at the pack's next load, and ``last_reset.restored`` includes them). No
    memory address is shown.
    A ``dynamic`` entry has ``base_cache`` (0 bytes: the checkpoint's own weights are the base), ``applied_stack``
    and ``applied_keys`` as of the last load, and ``counters.merges`` (layer weights built with the stack).
    """
    models = []
    for engine, live in sorted(engines(), key=lambda item: type(item[0].module).__name__):
        cache = engine.cache
        models.append({
            "model": type(engine.module).__name__,
            "patcher": "classic",
            "base_cache": {"bytes": cache.nbytes, "keys": len(cache), "mode": cache.dtype,
                           "dtypes": cache.dtypes, "device": None if cache.device is None else str(cache.device),
                           "budget_bytes": cache.budget_bytes},
            "applied_stack": list(engine.labels) if live else [],
            "applied_keys": len(live),
            "last_apply": _report(engine.last_apply),
            "last_reset": _report(engine.last_reset),
            "counters": dict(vars(engine.counters)),
        })
    for model, state in sorted(states(), key=lambda item: type(item[0]).__name__):
        models.append({"model": type(model).__name__, "patcher": "dynamic",
                       "base_cache": {"bytes": 0, "keys": 0}, "applied_stack": list(state.labels),
                       "applied_keys": state.keys, "counters": {"merges": state.merges}})
    return {"lora_file_cache_bytes": FILES.nbytes, "free_cache": dict(RELEASED), "models": models}


def prompt_server():
    """The running ComfyUI ``PromptServer``, or None when the pack is imported without a server (tests,
    scripts): the ``server`` module is only looked up, never imported here."""
    return getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)


def register_routes() -> bool:
    """Add GET ``ROUTE`` and the LoRA info routes (``nodes/info.py``) to the running ComfyUI server. Returns False
    (and does nothing) without a server."""
    instance = prompt_server()
    if instance is None:
        return False
    from aiohttp import web

    @instance.routes.get(ROUTE)
    async def batch_lora_status(request):
        return web.json_response(status())

    add_routes(instance.routes)
    return True
