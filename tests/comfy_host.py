"""The real ComfyUI host imported in-process (from COMFYUI_PATH or .comfyui), set up as the server would be on
``--cpu``: models load on the CPU, everything runs under ``torch.inference_mode()``."""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from oracle import same_bits

ROOT = Path(__file__).resolve().parents[1]
COMFYUI_PATH = Path(os.environ.get("COMFYUI_PATH") or ROOT / ".comfyui")
_HOST = None


def host(models_dir: Path, argv: list[str] | None = None) -> SimpleNamespace:
    """Import ComfyUI once per process and point its checkpoints/loras folders at ``models_dir``.

    ``argv``: None sets only ``--cpu`` (the tests); a list (e.g. ``[]`` or ``["--highvram"]`` on a GPU) imports the
    host's own ``main.py`` with those command-line options, which sets the host up as its server start-up does
    (DynamicVRAM / comfy-aimdo on 0.33) without starting the server. Only the first call's ``argv`` counts.

    Returns a namespace with ``comfy`` (the package), ``mm`` (comfy.model_management), ``sd`` (comfy.sd),
    ``nodes`` (ComfyUI's own top-level nodes module), ``folder_paths`` and ``pack`` (this pack's nodes module).
    """
    global _HOST
    if _HOST is None:
        if not (COMFYUI_PATH / "main.py").is_file():
            raise RuntimeError(f"no ComfyUI at {COMFYUI_PATH}: run scripts/setup_host.sh or set COMFYUI_PATH")
        sys.path.insert(0, str(COMFYUI_PATH))
        if argv is None:
            import comfy.cli_args
            comfy.cli_args.args.cpu = True  # before comfy.model_management: the torch build is a CUDA one
        else:
            saved, sys.argv = sys.argv, [str(COMFYUI_PATH / "main.py"), *argv]
            try:
                importlib.import_module("main")
            finally:
                sys.argv = saved
        import comfy.model_management as mm
        import comfy.sd
        import folder_paths
        comfy_nodes = importlib.import_module("nodes")
        assert Path(comfy_nodes.__file__).parent == COMFYUI_PATH, comfy_nodes.__file__
        pack = importlib.import_module("batch_lora.nodes.nodes")
        _HOST = SimpleNamespace(comfy=sys.modules["comfy"], mm=mm, sd=comfy.sd, nodes=comfy_nodes,
                                folder_paths=folder_paths, pack=pack)
    fp = _HOST.folder_paths
    for kind in ("checkpoints", "loras"):
        fp.folder_names_and_paths[kind] = ([str(models_dir / kind)], fp.supported_pt_extensions)
        fp.filename_list_cache.pop(kind, None)
    return _HOST


def load_checkpoint(h: SimpleNamespace, name: str, dtype: torch.dtype):
    """A fresh (model, clip) from ``models/checkpoints/name`` with the UNet stored in ``dtype``."""
    path = h.folder_paths.get_full_path_or_raise("checkpoints", name)
    model, clip, _vae, _ = h.sd.load_checkpoint_guess_config(path, output_vae=False, model_options={"dtype": dtype})
    return model, clip


def load(h: SimpleNamespace, *patchers) -> None:
    """Load patchers the way sampling / text encoding does (this is when weight patches are baked)."""
    h.mm.load_models_gpu(list(patchers))


UNINITIALISED = {"clip_l.transformer.text_projection.weight"}
"""Parameters stock ComfyUI 0.3.75 leaves uninitialised for SD1.x checkpoints (none has them; SD1.x conditioning
does not use them): they differ between two loads of the same file."""


def weights(patcher, keys=None) -> dict[str, torch.Tensor]:
    """Copies of the live weights of a ModelPatcher's torch model (``keys``, or every parameter except
    ``UNINITIALISED``)."""
    module = patcher.model
    names = keys if keys is not None else [n for n, _ in module.named_parameters() if n not in UNINITIALISED]
    return {k: module.get_parameter(k).detach().clone() for k in names}


def same_weights(patcher, expected: dict[str, torch.Tensor], keys=None) -> bool:
    """Whether the live weights (``keys``, or all but ``UNINITIALISED``) are bit-identical to ``expected``."""
    return all(same_bits(v, expected[k]) for k, v in weights(patcher, keys).items())


def row(name: str, sm: float = 1.0, sc: float = 1.0, on: bool = True) -> dict:
    """One Batch LoRA Loader row as API JSON carries it."""
    return {"on": on, "lora": name, "strength_model": sm, "strength_clip": sc}


def run_loader(h: SimpleNamespace, model, clip, *rows: dict, lora_stack=None):
    """The Batch LoRA Loader's (MODEL, CLIP, report) for these rows (``lora_1``, ``lora_2``, ... in order)."""
    kwargs = {f"lora_{i + 1}": r for i, r in enumerate(rows)}
    return h.pack.BatchLoraLoader().apply(model, clip, lora_stack=lora_stack, **kwargs)[:3]
