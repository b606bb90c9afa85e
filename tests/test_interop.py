"""Row shapes and interop outputs of the Batch LoRA Loader, in the real host in-process: rgthree Power Lora
Loader rows, LORA_STACK and ``<lora:...>`` tag outputs."""
import importlib

import pytest
import torch

import make_fixtures as fx
from comfy_host import load_checkpoint

pytestmark = pytest.mark.host

A, C = fx.LORA_KOHYA_A, fx.LORA_PEFT_C


@pytest.fixture(scope="module")
def stack(comfy_host):
    """The pack's nodes.stack module (imported with the host)."""
    return importlib.import_module("batch_lora.nodes.stack")


def test_rgthree_rows_mean_the_same_as_pack_rows(stack):
    ours = {"lora_1": {"on": True, "lora": A, "strength_model": 0.8, "strength_clip": 1.0},
            "lora_2": {"on": True, "lora": C, "strength_model": 0.6, "strength_clip": 0.6}}
    theirs = {"PowerLoraLoaderHeaderWidget": {"type": "PowerLoraLoaderHeaderWidget"}, "\u2795 Add Lora": "",
              "lora_1": {"on": True, "lora": A, "strength": 0.8, "strengthTwo": 1.0},
              "lora_2": {"on": True, "lora": C, "strength": 0.6},  # no strengthTwo: clip = model strength
              "lora_3": {"on": False, "lora": "anything.safetensors", "strength": 1.0, "strengthTwo": None}}
    expected = [stack.LoraEntry(A, 0.8, 1.0), stack.LoraEntry(C, 0.6, 0.6)]
    assert stack.parse_entries(ours) == expected
    assert stack.parse_entries(theirs) == expected
    assert stack.parse_entries({"lora_1": {"on": True, "lora": C, "strength": -0.5, "strengthTwo": None}}) == [
        stack.LoraEntry(C, -0.5, -0.5)]


@pytest.mark.parametrize("row, message", [
    ({"on": True, "lora": A, "strength": "x"}, r"lora_1\.strength must be a number"),
    ({"on": True, "lora": A, "strength": 1.0, "strengthTwo": float("nan")}, r"lora_1\.strengthTwo = nan"),
    ({"on": True, "strength": 1.0}, r"lora_1 must be an object like .*strength_model.*or rgthree"),
])
def test_bad_rgthree_rows_name_the_field(stack, row, message):
    with pytest.raises(ValueError, match=message):
        stack.parse_entries({"lora_1": row})


def test_tags_in_a1111_syntax(stack):
    assert stack.LoraEntry("style.safetensors", 0.8, 0.8).tag() == "<lora:style:0.8>"
    assert stack.LoraEntry("sub/dir/my lora.v2.safetensors", 1.0, 1.0).tag() == "<lora:my lora.v2:1>"
    assert stack.LoraEntry("sub\\win.pt", 0.5, 0.25).tag() == "<lora:win:0.25:0.5>"  # clip first, as A1111 reads


def test_loader_outputs_stack_and_tags(comfy_host, fixtures_dir):
    h = comfy_host
    model, clip = load_checkpoint(h, fx.CHECKPOINT_NAME, torch.float16)
    out = h.pack.BatchLoraLoader().apply(
        model, clip, lora_stack=[(C, 0.6, 0.5)],
        lora_1={"on": True, "lora": A, "strength": 0.8, "strengthTwo": 1.0},
        lora_2={"on": False, "lora": fx.LORA_KOHYA_B, "strength_model": 1.0, "strength_clip": 1.0})
    assert len(out) == 5
    assert out[3] == [(C, 0.6, 0.5), (A, 0.8, 1.0)]
    assert out[4] == "<lora:peft_c:0.5:0.6> <lora:kohya_a:1:0.8>"
    relayed = h.pack.BatchLoraLoader().apply(model, clip, lora_stack=out[3])
    assert relayed[0].patches_uuid == out[0].patches_uuid  # same files and strengths: the same baked weights
    assert relayed[3:] == out[3:]
