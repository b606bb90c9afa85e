"""comfyui-batch-lora: Batch LoRA Loader and Reset Adapters for ComfyUI (drift-free, in-place LoRA stacks)."""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]

WEB_DIRECTORY = "./web"  # the Batch LoRA Loader's row editor (web/js/batch_lora.js)
