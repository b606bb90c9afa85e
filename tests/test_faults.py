"""Faults and bad input on the real ComfyUI server, over HTTP: bad files, names and strengths fail with a message
naming them while the server keeps serving bit-identical results; POST /interrupt in the middle of a bake rolls
the weights back; a LoRA file replaced on disk between prompts is read again. (A fresh server process giving the
same latents is tests/test_server.py::test_short_drift_run_and_fresh_process.)"""
import asyncio
import json

import aiohttp
import pytest
import torch
from safetensors.torch import save_file

import make_fixtures as fx
import soak
from comfy_server import ComfyServer, PromptError, cached_nodes

pytestmark = pytest.mark.server

A, B, C = fx.LORA_KOHYA_A, fx.LORA_KOHYA_B, fx.LORA_PEFT_C
BIG, BIG_RANK = "big.safetensors", 192


def big_lora(path) -> int:
    """A kohya LoRA of rank BIG_RANK on every UNet linear/conv weight of the fixture checkpoint (27 keys, 13.6 M
    parameters): its bake takes long enough to be interrupted between keys. Returns the number of keys."""
    g = torch.Generator().manual_seed(11)
    tensors = {}
    for key, shape in fx.checkpoint_spec().items():
        if not (key.startswith(fx.UNET_PREFIX) and key.endswith(".weight") and len(shape) in (2, 4)):
            continue
        name = "lora_unet_" + key[len(fx.UNET_PREFIX):-len(".weight")].replace(".", "_")
        down = torch.randn(BIG_RANK, *shape[1:], generator=g) * 0.02
        up = (torch.randn(shape[0], BIG_RANK, generator=g) * 0.02).reshape(shape[0], BIG_RANK, *[1] * (len(shape) - 2))
        tensors.update({f"{name}.lora_down.weight": down.half(), f"{name}.lora_up.weight": up.half(),
                        f"{name}.alpha": torch.tensor(float(BIG_RANK))})
    save_file(tensors, str(path))
    return len(tensors) // 3


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    fx.make_fixtures(base)
    loras = base / "models" / "loras"
    raw = (loras / A).read_bytes()
    (loras / "truncated.safetensors").write_bytes(raw[: len(raw) // 3])
    save_file({"emb_params": torch.zeros(2, 768)}, str(loras / "embedding.safetensors"))
    outside = tmp_path_factory.mktemp("outside") / "outside.safetensors"
    outside.write_bytes(raw)
    (loras / "link_outside.safetensors").symlink_to(outside)
    n_keys = big_lora(loras / BIG)
    with ComfyServer(base, extra_args=["--fp16-unet"], startup_timeout=600) as srv:
        srv.big_keys = n_keys
        yield srv


def latent(server, prompt):
    entry = server.queue(prompt, timeout=900)
    assert soak.SAMPLER not in cached_nodes(entry)  # really sampled, not answered from ComfyUI's cache
    return server.read_output_latent(entry, soak.SAVE)


def stack_prompt(*stack, with_clip=True, tag="faults"):
    return soak.prompt_for("stack", stack, with_clip, tag=tag)


def test_bad_input_fails_by_name_and_the_server_keeps_serving(server):
    good = stack_prompt((A, 0.8, 1.0), (C, 0.6, 0.5))
    ref, plain = latent(server, good), latent(server, soak.prompt_for("plain"))
    bad = {  # message: (stack, how the prompt fails: "execution" when the node runs, "validation" at POST /prompt)
        "truncated.safetensors.*not a valid safetensors": ([("truncated.safetensors", 1.0, 1.0)], "execution"),
        "embedding.safetensors.*none of its 1 tensors match": ([("embedding.safetensors", 1.0, 1.0)], "execution"),
        r"'\.\./loras/kohya_a.safetensors' must be a file name relative": ([("../loras/" + A, 1.0, 1.0)], "execution"),
        r"'/etc/hostname' must be a file name relative": ([("/etc/hostname", 1.0, 1.0)], "execution"),
        "link_outside.safetensors.*is a link that leads outside the loras folder": (
            [("link_outside.safetensors", 1., 1.)], "execution"),
        r"lora_3: LoRA 'kohya_a.safetensors' is the same file as lora_2": ([(A, 1.0, 1.0), (A, 0.5, 0.5)],
                                                                            "execution"),
        "lora_3.strength_model = 1000000.0": ([(C, 0.5, 0.5), (A, 1e6, 1.0)], "validation"),
    }
    for pattern, (stack, kind) in bad.items():
        with pytest.raises(PromptError, match=pattern) as info:
            server.queue(stack_prompt((B, 0.7, 0.7), *stack, tag="bad"), timeout=900)
        assert info.value.kind == kind
        assert kind == "validation" or info.value.details["node_type"] == "BatchLoraLoader"
    for value, field in ((float("inf"), "strength_model"), (float("nan"), "strength_clip")):
        prompt = stack_prompt((A, 0.8, 1.0))
        prompt[soak.LOADER]["inputs"]["lora_1"][field] = value  # sent as JSON's Infinity / NaN
        with pytest.raises(PromptError, match=f"lora_1.{field}") as info:
            server.queue(prompt, timeout=900)
        assert info.value.kind == "validation"
    assert torch.equal(latent(server, good), ref)
    assert torch.equal(latent(server, soak.prompt_for("plain")), plain)
    assert torch.equal(latent(server, soak.prompt_for("empty")), plain)  # an empty stack is a no-op


async def _queue_and_interrupt(server, prompt, keys):
    """Queue ``prompt`` and POST /interrupt as soon as the websocket reports the first weight key of a bake with
    ``keys`` keys (the pack's progress bar: value = keys written, max = keys). Returns (prompt id, interrupted)."""
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{server.url}/ws?clientId={server.client_id}") as ws:
            r = await http.post(f"{server.url}/prompt", json={"prompt": prompt, "client_id": server.client_id})
            prompt_id = (await r.json())["prompt_id"]
            sent = False
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                event = json.loads(msg.data)
                data = event.get("data") or {}
                if data.get("prompt_id") != prompt_id:
                    continue
                if event["type"] == "progress" and data.get("max") == keys and data["value"] < keys and not sent:
                    (await http.post(f"{server.url}/interrupt", json={})).raise_for_status()
                    sent = True
                if event["type"] in ("execution_interrupted", "execution_success", "execution_error"):
                    break
            return prompt_id, sent


def test_interrupt_during_a_bake_rolls_back(server):
    """The big LoRA's bake (27 keys) is interrupted after its first key; the pack logs the rollback, and the next
    prompts give exactly the previous stack's, the plain path's and the big stack's own latents."""
    small, big = stack_prompt((A, 0.8, 1.0), with_clip=False), stack_prompt((BIG, 1.0, 1.0), with_clip=False)
    ref_big, ref_small = latent(server, big), latent(server, small)
    plain = latent(server, soak.prompt_for("plain"))
    rollbacks = 0
    for attempt in range(3):  # the interrupt could arrive after the last key; then try again
        latent(server, small)
        before = server.log_path.read_text().count("every key written was rolled back")
        prompt_id, sent = asyncio.run(asyncio.wait_for(_queue_and_interrupt(server, big, server.big_keys), 900))
        assert sent
        with pytest.raises(PromptError) as info:
            server.wait(prompt_id, timeout=900)
        assert info.value.kind == "interrupted"
        log = server.log_path.read_text()
        rollbacks = log.count("every key written was rolled back") - before
        if rollbacks:
            assert f"bake of {BIG}@1/1 stopped (InterruptProcessingException" in log or \
                f"bake of {BIG}@1/1 stopped (ApplyInterrupted" in log
            break
    assert rollbacks == 1, "the interrupt never landed inside the bake"
    assert torch.equal(latent(server, small), ref_small)
    assert torch.equal(latent(server, soak.prompt_for("plain")), plain)
    assert torch.equal(latent(server, big), ref_big)


def test_lora_file_replaced_on_disk_is_read_again(server):
    loras = server.base_dir / "models" / "loras"
    refs = {name: latent(server, stack_prompt((name, 0.9, 0.7))) for name in (A, B)}
    swap = loras / "swap.safetensors"
    for name in (A, B, A):
        swap.write_bytes((loras / name).read_bytes())
        assert torch.equal(latent(server, stack_prompt(("swap.safetensors", 0.9, 0.7))), refs[name]), name
