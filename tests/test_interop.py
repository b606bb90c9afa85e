"""Row shapes and interop outputs of the Batch LoRA Loader, in the real host in-process: rgthree Power Lora
Loader rows, LORA_STACK and ``<lora:...>`` tag outputs."""
import importlib
import json

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
    expected = [stack.LoraEntry(A, 0.8, 1.0, row="lora_1"), stack.LoraEntry(C, 0.6, 0.6, row="lora_2")]
    assert stack.parse_entries(ours) == expected
    assert stack.parse_entries(theirs) == expected


NOT_A_ROW = "__batch_lora_not_a_row__"
COERCION = [  # the README's "Row values" table: (lora_1 value, (strength_model, strength_clip) / None = skipped)
    ({"lora": A}, (1.0, 1.0)),
    ({"on": True, "lora": A, "strength_model": 0.8}, (0.8, 0.8)),
    ({"lora": A, "strength_model": 2, "strength_clip": None}, (2.0, 2.0)),  # an int; null clip = model
    ({"lora": A, "strength_model": -0.5, "strength_clip": 0}, (-0.5, 0.0)),
    ({"lora": A, "strength": 0.5, "strengthTwo": None}, (0.5, 0.5)),  # rgthree's null strengthTwo
    ({"lora": A, "strength_clip": None}, (1.0, 1.0)),  # this pack's null strength_clip, the same rule
    ({"lora": A, "strength_model": 0.3, "strength": 9.0}, (0.3, 0.3)),  # both shapes: this pack's wins
    ({"on": False, "lora": A, "strength_model": 1.0}, None),
    ({"lora": None}, None), ({"lora": ""}, None), ({"lora": "None", "on": True}, None),  # empty UI rows
    ({"lora": A, "extra": [1, 2], "type": "x"}, (1.0, 1.0)),  # other keys are ignored
]
REFUSED = [  # (lora_1 value, message)
    ({"on": "false", "lora": A}, r"lora_1\.on must be true or false, got 'false'"),
    ({"on": 0, "lora": A}, r"lora_1\.on must be true or false, got 0"),
    ({"on": None, "lora": A}, r"lora_1\.on must be true or false, got None"),
    ({"lora": A, "strength_model": True}, r"lora_1\.strength_model must be a number, got True"),
    ({"lora": A, "strength_model": "0.8"}, r"lora_1\.strength_model must be a number, got '0\.8'"),
    ({"lora": A, "strength_model": None}, r"lora_1\.strength_model must be a number, got None"),
    ({"lora": A, "strength_model": [1.0]}, r"lora_1\.strength_model must be a number"),
    ({"lora": A, "strength_clip": "x"}, r"lora_1\.strength_clip must be a number, got 'x'"),
    ({"lora": A, "strength": "x"}, r"lora_1\.strength must be a number"),
    ({"lora": A, "strength": 1.0, "strengthTwo": float("nan")}, r"lora_1\.strengthTwo = nan is not a usable"),
    ({"lora": A, "strength_model": 101}, r"lora_1\.strength_model = 101 is not a usable strength"),
    ({"lora": 5}, r"lora_1\.lora must be a file name \(a string\), got 5"),
    ({"lora": {"x": 1}}, r"lora_1\.lora must be a file name"),
    ({"on": True, "strength": 1.0}, r'lora_1 has no "lora" field'),
    (["x.safetensors", 1.0], r"lora_1 must be an object like .*strength_model.*or rgthree"),
    ({NOT_A_ROW: ["1", 0]}, r"lora_1 must be an object like .*; got \['1', 0\]"),  # a link, kept as a value
    ("x.safetensors", r"lora_1 must be an object"),
    (None, r"lora_1 must be an object"),
    (1.0, r"lora_1 must be an object"),
]


@pytest.mark.parametrize("value, expected", COERCION, ids=[str(i) for i in range(len(COERCION))])
def test_row_coercion_table_accepts(stack, value, expected):
    entries = stack.parse_entries({"lora_1": value})
    assert entries == ([] if expected is None else [stack.LoraEntry(A, *expected, row="lora_1")])


@pytest.mark.parametrize("value, message", REFUSED, ids=[str(i) for i in range(len(REFUSED))])
def test_row_coercion_table_refuses_naming_the_field(stack, value, message):
    with pytest.raises(ValueError, match=message):
        stack.parse_entries({"lora_1": value})


def test_lora_stack_items_follow_the_same_table(stack):
    assert stack.parse_entries({}, [(A, 0.8, None), (C, 1, 0.5), (None, 1.0, 1.0)]) == [
        stack.LoraEntry(A, 0.8, 0.8, row="lora_stack[0]"), stack.LoraEntry(C, 1.0, 0.5, row="lora_stack[1]")]
    for item, message in (((A, True, 1.0), r"lora_stack\[0\] strength_model must be a number, got True"),
                          ((A, "1", 1.0), r"lora_stack\[0\] strength_model must be a number, got '1'"),
                          ((A, 1.0, float("inf")), r"lora_stack\[0\] strength_clip = inf"),
                          ((5, 1.0, 1.0), r"lora_stack\[0\] name must be a file name"),
                          (A, r"lora_stack\[0\] must be \(name, strength_model, strength_clip\)"),
                          ((A, 1.0), r"lora_stack\[0\] must be")):
        with pytest.raises(ValueError, match=message):
            stack.parse_entries({}, [item])


def test_long_values_are_cut_in_messages(stack):
    for row in ({"lora": A, "strength_model": "x" * 5000}, {"lora": A, "on": "y" * 5000},
                ["z" * 5000, 1.0]):
        with pytest.raises(ValueError) as info:
            stack.parse_entries({"lora_1": row})
        assert len(str(info.value)) < 600 and "characters)" in str(info.value), str(info.value)[:200]


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
    assert len(out) == 7
    assert out[3] == [(C, 0.6, 0.5), (A, 0.8, 1.0)]
    assert out[4] == "<lora:peft_c:0.5:0.6> <lora:kohya_a:1:0.8>"
    assert out[5] == ""  # the fixture files carry no trigger words (tests/test_meta.py has files that do)
    assert json.loads(out[6]) == [
        {"name": C, "strength_model": 0.6, "strength_clip": 0.5, "base_model": None, "family": None,
         "trigger_words": [], "row": "lora_stack[0]"},
        {"name": A, "strength_model": 0.8, "strength_clip": 1.0, "base_model": None, "family": None,
         "trigger_words": [], "row": "lora_1"}]
    relayed = h.pack.BatchLoraLoader().apply(model, clip, lora_stack=out[3])
    assert relayed[0].patches_uuid == out[0].patches_uuid  # same files and strengths: the same baked weights
    assert relayed[3:6] == out[3:6]  # loaded_loras differs in its rows' origin (lora_stack[1])
