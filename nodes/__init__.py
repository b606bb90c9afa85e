"""ComfyUI glue: the node classes and the ModelPatcher lifecycle hook. The only part of the pack that imports
ComfyUI (``comfy``, ``folder_paths``)."""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
