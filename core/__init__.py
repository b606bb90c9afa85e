"""comfyui-batch-lora core: pure torch + safetensors + numpy; never imports ComfyUI.

- ``fuse``:   LoRA/LoHa/LoKr/diff/DoRA factors and the fused fp32 merge of a whole stack per weight key.
- ``cache``:  the exact base-weight cache restores copy from.
- ``engine``: in-place, all-or-nothing apply/reset of a stack on a module.
- ``files``:  reading LoRA safetensors files, validated, through a byte-bounded parsed-file cache.
- ``backends``: weight keys through torch.compile / OneDiff wrappers, refusals, compiler refreshes.
"""
from .backends import Target, UnsupportedTarget, frozen_reason, per_tree, resolve, tree_version, wrapper_kind, wrappers
from .cache import BaseCache, CacheBudgetError, return_freed_memory
from .engine import ApplyInterrupted, ApplyReport, Counters, InPlacePatcher
from .files import LoraFileCache, LoraFileError, shown
from .fuse import (DiffFactors, DoraFactors, Factors, FuseError, LoraFactors, LohaFactors, LokrFactors, SliceFactors,
                   Term, fuse_into, fused_weight, surely_finite)

__all__ = [
    "Target", "UnsupportedTarget", "frozen_reason", "per_tree", "resolve", "tree_version", "wrapper_kind", "wrappers",
    "BaseCache", "CacheBudgetError",
    "return_freed_memory", "ApplyInterrupted", "ApplyReport", "Counters", "InPlacePatcher", "LoraFileCache",
    "LoraFileError", "shown", "FuseError", "LoraFactors", "LohaFactors", "LokrFactors", "DiffFactors", "DoraFactors",
    "SliceFactors", "Factors", "Term", "fuse_into", "fused_weight", "surely_finite"
]
