"""Compiled and wrapped models: find the real ``nn.Parameter`` behind a weight key, refuse what cannot be patched
in place, and refresh compiler-held copies after a write.

Wrappers seen on ComfyUI models:
- ``torch._dynamo.eval_frame.OptimizedModule`` (``torch.compile``): shares the parameters of ``_orig_mod``.
  ComfyUI's TorchCompileModel keeps it out of the module tree (it swaps it in around ``apply_model``), so keys
  resolve to the eager module's parameters, which the compiled graph reads: in-place writes are seen.
- OneDiff ``DeployableModule`` (onediff/infer_compiler/backends): ``NexfortDeployableModule`` shares
  ``_modules``/``_parameters`` of the OptimizedModule's ``_orig_mod``; ``OneflowDeployableModule`` shares
  ``_modules`` of ``_torch_module``. The oneflow graph shares parameter memory too, except conv weights it
  constant-folded into a transposed copy, which must be refreshed after every write
  (``onediff.infer_compiler.backends.oneflow.param_utils.update_graph_related_tensor``).
- Weights that are not floating point (OneDiff int8 quantization) and compilers that freeze weights into
  constants (inductor/nexfort ``freezing``) cannot take in-place LoRA writes: ``UnsupportedTarget`` is raised.

Nothing here imports onediff or oneflow unless they are already importable.
"""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from functools import lru_cache

import torch

from . import quant

__all__ = ["Target", "UnsupportedTarget", "resolve", "wrapper_kind", "wrappers", "frozen_reason", "after_write",
           "tree_version", "per_tree"]

_TREE_VERSION = [0]


def _count_registration(module, name, submodule):
    _TREE_VERSION[0] += 1


torch.nn.modules.module.register_module_module_registration_hook(_count_registration)


def tree_version() -> int:
    """A counter that moves whenever any ``nn.Module`` in the process gets a submodule (assignment,
    ``add_module``/``register_module``: torch's global module registration hook), e.g. when a compiler wrapper
    replaces ``diffusion_model``. Values computed from a module tree stay valid while it is unchanged."""
    return _TREE_VERSION[0]


def per_tree(root: torch.nn.Module, name: str, compute):
    """``compute(root)``, kept in ``root.__dict__`` under ``name`` until ``tree_version()`` moves."""
    version = tree_version()
    held = root.__dict__.get(name)
    if held is None or held[0] != version:
        held = root.__dict__[name] = (version, compute(root))
    return held[1]

_FIX = ("put the Batch LoRA Loader before the node that compiles or quantizes the model, or compile without "
        "freezing")


class UnsupportedTarget(RuntimeError):
    """A weight cannot be patched in place (quantized, or frozen into a compiled graph). Names the key and what
    to do."""

    __module__ = "batch_lora.core"  # the type's name in ComfyUI's error reports, whatever the install path


@dataclass(frozen=True)
class Target:
    """The real parameter behind a weight key.

    key: the weight key as given; owner: the innermost real torch module holding the parameter (a Conv2d, a
    Linear...); name: the parameter's attribute name on ``owner``; wrappers: kinds of the wrappers crossed on
    the way (see ``wrapper_kind``), outermost first.
    """

    key: str
    owner: torch.nn.Module
    name: str
    wrappers: tuple[str, ...] = ()

    @property
    def param(self) -> torch.nn.Parameter:
        """The live ``nn.Parameter`` (looked up on every access, so a replaced Parameter is never stale)."""
        return self.owner._parameters[self.name]


def wrapper_kind(module) -> str | None:
    """``"torch.compile"``, ``"onediff-nexfort"``, ``"onediff-oneflow"``, ``"onediff"`` or None (plain module)."""
    if isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
        return "torch.compile"
    for cls in type(module).__mro__:
        if cls.__name__ == "NexfortDeployableModule":
            return "onediff-nexfort"
        if cls.__name__ == "OneflowDeployableModule":
            return "onediff-oneflow"
        if cls.__name__ == "DeployableModule" and cls.__module__.startswith("onediff"):
            return "onediff"
    return None


def wrappers(root: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(wrapper_kind, module)`` of every torch.compile/OneDiff wrapper in ``root.modules()`` (``root`` included),
    in that order; walked once per module tree (``per_tree``)."""
    return per_tree(root, "_batch_lora_wrappers",
                    lambda r: [(kind, m) for m in r.modules() if (kind := wrapper_kind(m)) is not None])


def _unwrap(module) -> tuple[torch.nn.Module, str | None]:
    kind = wrapper_kind(module)
    if kind == "torch.compile":
        return module._orig_mod, kind
    if kind is not None:
        inner = module.__dict__.get("_torch_module")
        if isinstance(inner, torch.nn.Module):
            return inner, kind
    return module, kind


def resolve(root: torch.nn.Module, key: str) -> Target:
    """Walk ``key`` (``a.b.weight``) from ``root``, stepping through torch.compile and OneDiff wrappers.

    Raises:
        KeyError: no such module or parameter (names the key and the missing part).
        UnsupportedTarget: the weight is not floating point (int8 without a scale), a quantized tensor of a layout
            ``core.quant`` does not patch (block-scaled NVFP4/MXFP8, ...), a GGUF tensor (ComfyUI-GGUF's
            ``GGMLTensor``: ``tensor_type``/``tensor_shape``), an old-style scaled-fp8 layer, or sits in a
            quantized OneDiff module.
    """
    *path, name = key.split(".")
    module, kinds = root, []
    for part in [None, *path]:
        if part is not None:
            child = module._modules.get(part)
            if child is None:
                raise KeyError(f"the model has no module {part!r} on the way to {key!r}")
            module = child
        while True:
            if getattr(module, "_deployable_module_quantized", False):
                raise UnsupportedTarget(f"{key}: the module is OneDiff-quantized (int8); {_FIX}")
            module, kind = _unwrap(module)
            if kind is None:
                break
            kinds.append(kind)
    param = module._parameters.get(name)
    if param is None:
        raise KeyError(f"the model has no parameter {key!r}")
    reason = quant.unsupported_reason(param)
    if hasattr(param, "tensor_type") and hasattr(param, "tensor_shape"):  # ComfyUI-GGUF's GGMLTensor (ops.py)
        raise UnsupportedTarget(f"{key}: the weight is a GGUF tensor (ComfyUI-GGUF), which ComfyUI-GGUF "
                                "dequantizes at every use and this pack cannot write in place; use the stock "
                                "LoraLoader on the GGUF model (ComfyUI-GGUF applies it), or load the "
                                "safetensors model")
    if reason is None and name == "weight" and isinstance(getattr(module, "scale_weight", None), torch.Tensor):
        reason = ("an old-style scaled-fp8 layer (its scale is the module's scale_weight: ComfyUI 0.3.75 "
                  "scaled_fp8_ops; ComfyUI 0.33 loads the same file as a quantized tensor, which is patched)")
    if reason is not None:
        raise UnsupportedTarget(f"{key}: {reason}; load the model unquantized or in scaled fp8/int8, or use the "
                                "stock LoraLoader for this model")
    if not param.is_floating_point() and not quant.is_quantized(param):
        raise UnsupportedTarget(f"{key}: the weight is {param.dtype} (quantized), a LoRA cannot be merged into it; "
                                f"{_FIX}")
    return Target(key, module, name, tuple(kinds))


def _backend_configs(compiled) -> list[dict]:
    """Best effort: the inductor option dicts reachable from an OptimizedModule's dynamo context (torch 2.x
    keeps them on the wrapped backend's ``config``)."""
    configs, seen = [], set()
    node = getattr(getattr(compiled, "dynamo_ctx", None), "callback", None)
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        if isinstance(getattr(node, "config", None), dict):
            configs.append(node.config)
        node = getattr(node, "_torchdynamo_orig_backend", None) or getattr(node, "compiler_fn", None)
    return configs


def frozen_reason(compile_kwargs: dict | None = None, modules=()) -> str | None:
    """Why in-place weight writes would be ignored, or None.

    Args:
        compile_kwargs: ComfyUI's ``model_options["torch_compile_kwargs"]`` (TorchCompileModel), if any.
        modules: modules to inspect for torch.compile/OneDiff wrappers (e.g. the model's top modules).
    Checks inductor's global ``freezing`` flag, ``freezing`` in the compile options or mode, and the options of
    any torch.compile wrapper found (OneDiff nexfort modes such as ``max-optimize:max-autotune:freezing`` land in
    these options).
    """
    inductor = sys.modules.get("torch._inductor.config")
    if inductor is not None and getattr(inductor, "freezing", False):
        return "torch._inductor.config.freezing is on"
    if compile_kwargs:
        if (compile_kwargs.get("options") or {}).get("freezing") or "freezing" in str(compile_kwargs.get("mode")):
            return f"the model is compiled with freezing ({compile_kwargs})"
    for module in modules:
        for kind, sub in wrappers(module):
            if kind in ("torch.compile", "onediff-nexfort"):
                compiled = sub if kind == "torch.compile" else sub.__dict__.get("_deployable_module_model")
                if any(c.get("freezing") for c in _backend_configs(compiled)):
                    return f"{type(sub).__name__} was compiled with freezing"
    return None


@lru_cache(maxsize=1)
def _oneflow_refresh():
    if importlib.util.find_spec("oneflow") is None or importlib.util.find_spec("onediff") is None:
        return None
    from onediff.infer_compiler.backends.oneflow import param_utils
    return param_utils.update_graph_related_tensor


def after_write(target: Target) -> None:
    """Refresh compiler-held copies of ``target``'s weight after an in-place write or restore.

    OneDiff's oneflow backend keeps a transposed copy of constant-folded conv weights: it is refreshed with
    OneDiff's own ``update_graph_related_tensor(conv)``. A no-op when oneflow is not installed or the module has
    no such copy.
    """
    if target.name == "weight" and isinstance(target.owner, torch.nn.Conv2d):
        refresh = _oneflow_refresh()
        if refresh is not None:
            refresh(target.owner)
