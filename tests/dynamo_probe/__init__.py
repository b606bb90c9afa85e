"""Test-only ComfyUI custom node folder (copied into a test server's custom_nodes, never shipped): exposes
torch._dynamo's compile counters at GET /batch_lora_test/dynamo so tests can count graphs and recompiles."""
from aiohttp import web
from server import PromptServer

NODE_CLASS_MAPPINGS = {}


@PromptServer.instance.routes.get("/batch_lora_test/dynamo")
async def dynamo_counters(request):
    from torch._dynamo.utils import counters
    return web.json_response({group: dict(values) for group, values in counters.items()})
