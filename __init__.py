"""comfyui-batch-lora: Batch LoRA Loader and Reset Adapters for ComfyUI (drift-free, in-place LoRA stacks)."""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .nodes.nodes import register_prompt_guard
from .nodes.status import register_routes

register_routes()  # GET /batch_lora/status when loaded by the ComfyUI server
register_prompt_guard()  # rows given as lists stay values (nodes.nodes.guard_prompt)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]

WEB_DIRECTORY = "./web"  # the Batch LoRA Loader's row editor (web/js/batch_lora.js)
