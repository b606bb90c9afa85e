"""Test-only ComfyUI node (never shipped: the server tests link this folder into their own custom_nodes).

``BatchLoraTestConditioning`` stands in for a text encoder too big for this machine (Flux's T5-XXL, SDXL's CLIP-G):
it returns a CONDITIONING of ComfyUI's shape, ``[[cond [1, tokens, width], {"pooled_output": [1, pooled],
"guidance": g}]]``, filled with seeded N(0, 1) values (float32), so a diffusion model loaded with UNETLoader can be
sampled through the real server."""
import torch


class BatchLoraTestConditioning:
    """Seeded synthetic conditioning (see the module docstring). Raises nothing beyond ComfyUI's input checks."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"tokens": ("INT", {"default": 4, "min": 1, "max": 512}),
                             "width": ("INT", {"default": 64, "min": 1, "max": 8192}),
                             "pooled": ("INT", {"default": 0, "min": 0, "max": 8192}),
                             "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0}),
                             "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, tokens, width, pooled, guidance, seed):
        g = torch.Generator().manual_seed(seed)
        extra = {"guidance": guidance}
        cond = torch.randn(1, tokens, width, generator=g)
        if pooled:
            extra["pooled_output"] = torch.randn(1, pooled, generator=g)
        return ([[cond, extra]],)


NODE_CLASS_MAPPINGS = {"BatchLoraTestConditioning": BatchLoraTestConditioning}
