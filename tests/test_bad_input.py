"""Bad input to Batch LoRA Loader inside the real ComfyUI host, in-process: every case gives a clear error naming the
file, key or field, and the model (carrying a previous stack) keeps its exact weights. Also: a LoRA that matches
only part of the model (warning listing the rest), an empty stack (a no-op), names that try to leave the loras
folder, and a file replaced on disk with the same size and mtime."""
import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import make_fixtures as fx
from comfy_host import load, load_checkpoint, row, run_loader, same_weights, weights

pytestmark = pytest.mark.host

A, B, C = fx.LORA_KOHYA_A, fx.LORA_KOHYA_B, fx.LORA_PEFT_C
BAD = "robust"  # subfolder of models/loras holding this module's files




def header_file(header, data=b"", length=None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


@pytest.fixture(scope="module")
def files(fixtures_dir, tmp_path_factory):
    """Write the bad files under models/loras/robust/ and one file outside the loras folder (linked from it)."""
    loras = fixtures_dir / "models" / "loras"
    folder = loras / BAD
    folder.mkdir(exist_ok=True)
    a = load_file(str(loras / A))
    raw = (loras / A).read_bytes()
    (folder / "truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    (folder / "header_length.safetensors").write_bytes(struct.pack("<Q", 2**40) + raw[8:])
    (folder / "bad_json.safetensors").write_bytes(header_file(b'{"x": {"dtype": "F16", "shape": [2'))
    (folder / "past_end.safetensors").write_bytes(
        header_file({"x.lora_up.weight": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}}, b"\0" * 16))
    (folder / "text.safetensors").write_text("not a LoRA, just text\n")
    save_file({"emb_params": torch.randn(2, 768)}, str(folder / "embedding.safetensors"))  # a textual inversion
    other = {"lora_unet_output_blocks_8_1_transformer_blocks_9_attn1_to_q" + k: v for k, v in
             {".lora_up.weight": torch.zeros(640, 4), ".lora_down.weight": torch.zeros(4, 640)}.items()}
    save_file(other, str(folder / "other_arch.safetensors"))  # SDXL-style block names the tiny SD1.5 lacks
    save_file({**a, **other}, str(folder / "partly.safetensors"))  # A plus tensors for blocks this model lacks
    up = next(k for k in sorted(a) if k.startswith("lora_unet") and k.endswith("lora_up.weight"))
    save_file({**a, up: torch.zeros(a[up].shape[0] + 3, *a[up].shape[1:], dtype=a[up].dtype)},
              str(folder / "shape.safetensors"))
    module = up[: -len(".lora_up.weight")]
    hada = {f"{module}.hada_{n}": torch.zeros(4, 4) for n in ("w1_a", "w1_b", "w2_a", "w2_b", "t1")}
    save_file(hada, str(folder / "incomplete_loha.safetensors"))  # a Tucker LoHa without its hada_t2
    for what, value in (("nan", float("nan")), ("inf", float("inf"))):
        t = a[up].clone()
        t.view(-1)[0] = value
        save_file({**a, up: t}, str(folder / f"{what}.safetensors"))
    outside = tmp_path_factory.mktemp("outside") / "outside.safetensors"
    outside.write_bytes(raw)
    for link, target in (("link_outside.safetensors", outside), ("link_inside.safetensors", loras / A)):
        if not (folder / link).is_symlink():
            (folder / link).symlink_to(target)
    return {"folder": folder, "up": up, "outside": outside}


@pytest.fixture(scope="module")
def patched(comfy_host, files):
    """A fp16 model + CLIP carrying a previous stack (C), loaded, with copies of their live weights."""
    h = comfy_host
    h.folder_paths.filename_list_cache.pop("loras", None)
    model, clip = load_checkpoint(h, fx.CHECKPOINT_NAME, torch.float16)
    with torch.inference_mode():
        good_m, good_c, _ = run_loader(h, model, clip, row(C, 0.5, 0.5))
        load(h, good_m, good_c.load_model())
        return {"model": model, "clip": clip, "good_m": good_m, "good_c": good_c,
                "unet": weights(good_m), "te": weights(good_c.patcher)}


def bad(name):
    return f"{BAD}/{name}"


NOT_SAFETENSORS = r"not a valid safetensors.*re-download or re-export"
CASES = {  # case: (rows, exception type, message pattern)
    "missing file": ([row(bad("missing.safetensors"))], "LoraFileError",
                     r"robust/missing.safetensors.*not in the loras folder"),
    "truncated": ([row(bad("truncated.safetensors"))], "LoraFileError", "truncated.safetensors.*" + NOT_SAFETENSORS),
    "bad header length": ([row(bad("header_length.safetensors"))], "LoraFileError",
                          "header_length.safetensors.*" + NOT_SAFETENSORS),
    "bad JSON header": ([row(bad("bad_json.safetensors"))], "LoraFileError",
                        "bad_json.safetensors.*" + NOT_SAFETENSORS),
    "offsets past the end": ([row(bad("past_end.safetensors"))], "LoraFileError",
                             "past_end.safetensors.*" + NOT_SAFETENSORS),
    "text file": ([row(bad("text.safetensors"))], "LoraFileError", "text.safetensors.*" + NOT_SAFETENSORS),
    "not a LoRA": ([row(bad("embedding.safetensors"))], "LoraFileError",
                   r"embedding.safetensors.*none of its 1 tensors match.*emb_params"),
    "other architecture": ([row(bad("other_arch.safetensors"))], "LoraFileError",
                           r"other_arch.safetensors.*none of its 2 tensors match.*another architecture"),
    "incomplete LoHa": ([row(bad("incomplete_loha.safetensors"))], "LoraFileError",
                        r"incomplete_loha.safetensors.*not form a complete.*KeyError.*hada_t2.*re-export"),
    "shape mismatch": ([row(bad("shape.safetensors"))], "FuseError", r"does not fit the model weight.*another model"),
    "NaN tensor": ([row(bad("nan.safetensors"))], "LoraFileError", r"nan.safetensors.*lora_unet.*NaN/Inf"),
    "Inf tensor": ([row(bad("inf.safetensors"))], "LoraFileError", r"inf.safetensors.*lora_unet.*NaN/Inf"),
    "NaN strength": ([row(A, float("nan"))], "ValueError", r"lora_1.strength_model"),
    "inf strength_clip": ([row(A, 1.0, float("-inf"))], "ValueError", r"lora_1.strength_clip"),
    "absurd strength": ([row(A), row(B, 1e6)], "ValueError", r"lora_2.strength_model = 1000000.0 is not a usable"),
    "text strength": ([row(A, "strong")], "ValueError", r"lora_1.strength_model must be a number"),
    "duplicate entry": ([row(A), row(C), row(A, 0.3)], "ValueError",
                        r"lora_3: LoRA 'kohya_a.safetensors' is the same file as lora_1 \('kohya_a.safetensors'\)"),
    "duplicate as ./name": ([row(A), row("./" + A)], "ValueError", r"lora_2: .*same file as lora_1.*merge the rows"),
    "duplicate as a//b": ([row(bad("link_inside.safetensors")), row(f"{BAD}//link_inside.safetensors")], "ValueError",
                          r"lora_2: .*same file as lora_1"),
    "duplicate through a link": ([row(A), row(bad("link_inside.safetensors"))], "ValueError",
                                 r"lora_2: LoRA 'robust/link_inside.safetensors' is the same file as lora_1"),
    "malformed row": (["kohya_a.safetensors"], "ValueError", r"lora_1 must be an object"),
    "dot-dot name": ([row("../loras/" + A)], "LoraFileError", r"without '\.\.'"),
    "dot-dot inside": ([row(f"{BAD}/../../loras/{A}")], "LoraFileError", r"without '\.\.'"),
    "windows dot-dot": ([row("..\\" + A)], "LoraFileError", r"without '\.\.'"),
    "absolute name": ([row("/etc/passwd")], "LoraFileError", r"'/etc/passwd' must be a file name relative"),
    "link outside": ([row(bad("link_outside.safetensors"))], "LoraFileError",
                     r"lora_1: LoRA 'robust/link_outside.safetensors' is a link that leads outside the loras folder"
                     r".*extra_model_paths"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_named_and_the_model_keeps_its_weights(comfy_host, patched, files, fixtures_dir, case):
    h, p = comfy_host, patched
    rows, exc_name, pattern = CASES[case]
    with torch.inference_mode():
        load(h, p["good_m"])  # the model carries the previous stack
        with pytest.raises(Exception, match=pattern) as info:
            run_loader(h, p["good_m"], p["good_c"], *rows)
        assert type(info.value).__name__ == exc_name, repr(info.value)
        assert same_weights(p["good_m"], p["unet"])
    message = str(info.value)  # what API clients read: no server path, no internal token
    for secret in (str(fixtures_dir), str(files["outside"].parent), "@"):
        assert secret not in message, (secret, message)


def test_after_bad_input_the_plain_path_and_the_previous_stack_still_work(comfy_host, patched):
    h, p = comfy_host, patched
    with torch.inference_mode():
        for rows, _, _ in CASES.values():
            with pytest.raises(Exception):
                run_loader(h, p["good_m"], p["good_c"], *rows)
        load(h, p["model"], p["clip"].load_model())
        load(h, p["good_m"], p["good_c"].load_model())
        assert same_weights(p["good_m"], p["unet"]) and same_weights(p["good_c"].patcher, p["te"])


def test_lora_stack_input_is_validated_too(comfy_host, patched):
    h, p = comfy_host, patched
    with torch.inference_mode():
        with pytest.raises(ValueError, match=r"lora_stack\[1\] strength_clip"):
            run_loader(h, p["good_m"], p["good_c"], lora_stack=[(A, 1.0, 1.0), (B, 1.0, float("nan"))])
        with pytest.raises(ValueError, match=r"lora_stack\[0\] must be"):
            run_loader(h, p["good_m"], p["good_c"], lora_stack=[A])


def test_partly_matching_lora_warns_with_the_list_and_applies_the_rest(comfy_host, patched, caplog):
    h, p = comfy_host, patched
    with torch.inference_mode():
        full_m, full_c, _ = run_loader(h, p["model"], p["clip"], row(A, 0.7, 0.9))
        load(h, full_m, full_c.load_model())
        expected_u, expected_c = weights(full_m), weights(full_c.patcher)
        with caplog.at_level("WARNING", logger="comfyui-batch-lora"):
            part_m, part_c, report = run_loader(h, p["model"], p["clip"], row(bad("partly.safetensors"), 0.7, 0.9))
        missing = "lora_unet_output_blocks_8_1_transformer_blocks_9_attn1_to_q.lora_up.weight"
        assert missing in report
        assert any(missing in rec.getMessage() for rec in caplog.records if rec.levelname == "WARNING")
        load(h, part_m, part_c.load_model())
        assert same_weights(part_m, expected_u) and same_weights(part_c.patcher, expected_c)


def test_empty_stack_is_a_no_op(comfy_host, patched):
    h, p = comfy_host, patched
    with torch.inference_mode():
        load(h, p["model"], p["clip"].load_model())
        plain_u, plain_c = weights(p["model"]), weights(p["clip"].patcher)
        for rows in ([], [row(A, on=False), row(B, on=False)], [{"on": True, "lora": "None"}]):
            m, c, report = run_loader(h, p["model"], p["clip"], *rows)
            assert "no LoRA enabled" in report
            load(h, m, c.load_model())
            assert same_weights(m, plain_u) and same_weights(c.patcher, plain_c)


def test_link_inside_the_loras_folder_is_followed(comfy_host, patched):
    h, p = comfy_host, patched
    with torch.inference_mode():
        direct_m, _, _ = run_loader(h, p["model"], None, row(A, 0.6))
        load(h, direct_m)
        expected = weights(direct_m)
        linked_m, _, _ = run_loader(h, p["model"], None, row(bad("link_inside.safetensors"), 0.6))
        load(h, linked_m)
        assert same_weights(linked_m, expected)


def test_file_replaced_with_same_size_and_mtime_is_read_again(comfy_host, patched, fixtures_dir):
    """`cp -p` / `rsync -a` keep size and mtime; the inode change time still tells the file changed."""
    h, p = comfy_host, patched
    loras = fixtures_dir / "models" / "loras"
    with safe_open(str(loras / A), "pt") as f:
        a, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    neg = {k: -v if k.endswith("lora_up.weight") else v for k, v in a.items()}
    save_file(neg, str(loras / BAD / "neg.safetensors"), metadata=meta)  # A with its sign flipped: byte for byte the same size
    swap = loras / BAD / "swap.safetensors"
    with torch.inference_mode():
        refs = {}
        for name in (A, bad("neg.safetensors")):  # same shapes and dtypes: same file size
            m, _, _ = run_loader(h, p["model"], None, row(name, 0.9))
            load(h, m)
            refs[name] = weights(m)
        swap.write_bytes((loras / A).read_bytes())
        stamp = swap.stat().st_mtime_ns
        m, _, _ = run_loader(h, p["model"], None, row(bad("swap.safetensors"), 0.9))
        load(h, m)
        assert same_weights(m, refs[A])
        swap.write_bytes((loras / BAD / "neg.safetensors").read_bytes())
        os.utime(swap, ns=(stamp, stamp))
        assert swap.stat().st_size == (loras / A).stat().st_size and swap.stat().st_mtime_ns == stamp
        m, _, _ = run_loader(h, p["model"], None, row(bad("swap.safetensors"), 0.9))
        load(h, m)
        assert same_weights(m, refs[bad("neg.safetensors")])
