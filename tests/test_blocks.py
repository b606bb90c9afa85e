"""Per-block LoRA weights (a row's ``blocks``: nodes/blocks.py, nodes/stack.py) inside the real ComfyUI host.

Parsing (presets, vectors, ``LABEL:``, the refused Inspire syntax) through the loader's own coercion table; the
accepted lengths and block ids per architecture on ComfyUI's models (arch_fixtures, meta device); per-key merges
on the tiny SD1.5 checkpoint (UNet and CLIP), SDXL and the double/single and single-stack DiTs of arch_fixtures:
each key's effective strength comes from this file's own table (regex on the weight key -> weight) and the patched
key must equal the pack's merge of the same file at that strength without blocks bit for bit, equal the base bit
for bit where the weight is 0, and sit within one rounding of a float64 merge from the file's tensors on disk.
Then edits counted on the engine (unchanged blocks: no work; a changed vector: exactly the keys whose strength
changed), bad values leaving the model as it was, and the DynamicVRAM path (0.33; skipped, i.e. not run, elsewhere).
"""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import arch_fixtures as af
import comfy_host
import make_fixtures as fx
from comfy_host import load, load_checkpoint, row, run_loader, weights
from oracle import beyond_one_rounding, same_bits

pytestmark = pytest.mark.host
ROOT = Path(__file__).resolve().parents[1]
B = fx.LORA_KOHYA_B  # UNet: input_blocks.1 (transformer + ResBlock), output_blocks.0 and .1; CLIP: 36 weights
MANIFEST = fx.lora_manifest()
HAS_DYNAMIC = "class ModelPatcherDynamic" in (comfy_host.COMFYUI_PATH / "comfy" / "model_patcher.py").read_text()


def brow(name, sm, sc, blocks):
    """A loader row with ``blocks``."""
    return {**row(name, sm, sc), "blocks": blocks}


def weigher(table, base):
    """The test's own block table: ``weight(key)`` = the weight of the first regex of ``table`` ({regex: weight})
    matching the weight key, else ``base`` (BASE: the text encoder and every key outside the blocks)."""
    compiled = [(re.compile(r), w) for r, w in table.items()]
    return lambda key: next((w for r, w in compiled if r.search(key)), base)


@pytest.fixture(scope="module")
def stack_module(comfy_host):
    import importlib
    return importlib.import_module("batch_lora.nodes.stack")


# ---------------------------------------------------------------------------------------------------------
# parsing


# verbatim lines of Inspire Pack's resources/lbw-preset.txt (ComfyUI-Inspire-Pack at 30974e69)
INSPIRE_LINES = """SD-INALL:1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0
SD-MIDD0.8:1,0,0,0,0,0.5,0.8,0.8,0.4,0,0,0,0,0,0,0,0
SD-LyC-OUTALL:1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1,1,1,1
SDXL-OUTALL:1,0,0,0,0,0,1,1,1,1,1,1
SDXL-LyC-MIDALL:1,0,0,0,0,0,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0""".splitlines()


def entry_of(stack_module, blocks):
    (entry,) = stack_module.parse_entries({"lora_3": brow("x.safetensors", 1.0, 1.0, blocks)})
    return entry


def test_presets_and_vectors_parse(stack_module):
    from batch_lora.nodes import blocks as bw
    for line in INSPIRE_LINES:
        name, values = line.split(":")
        parsed = bw.parse(name, "f")
        assert parsed.weights == tuple(float(v) for v in values.split(",")) and parsed.preset == name, name
    lengths = {}
    for name, values in bw.PRESETS.items():
        family = re.match(r"(SDXL-LyC|SDXL|SD-LyC|SD|FLUX)-", name)[1]
        lengths.setdefault(family, set()).add(len(values.split(",")))
    assert lengths == {"SD": {17}, "SD-LyC": {27}, "SDXL": {12}, "SDXL-LyC": {21}, "FLUX": {3}}
    assert bw.parse("FLUX-DOUBLE", "f").weights == (1.0, 1.0, 0.0)
    assert bw.parse("FLUX-SINGLE", "f").weights == (1.0, 0.0, 1.0)
    assert entry_of(stack_module, " SD-INALL ").blocks == "SD-INALL"
    assert entry_of(stack_module, "MINE: SDXL-ALL").blocks == "MINE:SDXL-ALL"
    assert entry_of(stack_module, " MINE : 0.5, 1.5 ,-0.25,0 ").blocks == "MINE:0.5,1.5,-0.25,0"
    parsed = bw.parse("MINE:0.5, 1.5 ,-0.25,0", "f")
    assert parsed.weights == (0.5, 1.5, -0.25, 0.0) and parsed.base == 0.5 and parsed.preset is None
    for empty in (None, "", "   "):
        assert entry_of(stack_module, empty).blocks == ""
    (plain,) = stack_module.parse_entries({"lora_1": row("x.safetensors")})
    assert plain.blocks == ""
    assert entry_of(stack_module, "SD-ALL").tag() == "<lora:x:1>"  # tags are the same with or without blocks


@pytest.mark.parametrize("value,message", [
    (5, "lora_3.blocks must be a string (a preset name such as SD-INALL, or comma-separated numbers), got 5"),
    (["1", "0"], "lora_3.blocks must be a string"),
    (True, "lora_3.blocks must be a string"),
    ("SD-FOO", "lora_3.blocks: unknown preset 'SD-FOO'; use one of SD-NONE, SD-ALL,"),
    ("1,R,1", "lora_3.blocks: value 2 is 'R' (random values in Inspire's LoRA Block Weight), which is not "
              "supported; write a number"),
    ("1,u", "lora_3.blocks: value 2 is 'u' (random values"),
    ("A,1", "lora_3.blocks: value 1 is 'A' (Inspire's A input"),
    ("1,b", "lora_3.blocks: value 2 is 'b' (Inspire's B input"),
    ("1,1 0.5,1", "lora_3.blocks: value 2 ('1 0.5') is a space-separated sub-vector, which is not supported"),
    ("%base=1,in=0", "lora_3.blocks: Inspire's '%' block spec syntax is not supported"),
    ("FLUX-DBL-FRONT", "lora_3.blocks: Inspire's preset FLUX-DBL-FRONT is not supported here: Inspire gives its "
                       "18 values to the blocks a LoRA happens to touch"),
    ("SD-ROUT", "lora_3.blocks: Inspire's preset SD-ROUT is not supported here: it draws random values (R)"),
    ("SD-AB", "lora_3.blocks: Inspire's preset SD-AB is not supported here: it uses Inspire's A and B inputs"),
    ("@SD-FULL-TEST", "lora_3.blocks: unknown preset '@SD-FULL-TEST'"),
    ("1,,1", "lora_3.blocks: value 2 ('') is not a number (e.g. 0, 1, 0.5, -0.25)"),
    ("1,0.5,", "lora_3.blocks: value 3 ('') is not a number"),
    ("1,.5", "lora_3.blocks: value 2 ('.5') is not a number"),
    ("1e3,1", "lora_3.blocks: value 1 ('1e3') is not a number"),
    ("1,nan", "lora_3.blocks: value 2 ('nan') is not a number"),
    ("1,-11", "lora_3.blocks: value 2 (-11) is beyond +-10"),
    ("A:B:1,0", "lora_3.blocks has more than one ':' ('A:B:1,0')"),
    ("MINE:", "lora_3.blocks has nothing after 'MINE:'"),
])
def test_bad_values_name_the_field(comfy_host, stack_module, value, message):
    with pytest.raises(ValueError) as err:
        entry_of(stack_module, value)
    assert str(err.value).startswith(message)
    rows = {"lora_3": brow("x.safetensors", 1.0, 1.0, value)}
    assert comfy_host.pack.BatchLoraLoader.VALIDATE_INPUTS(**rows) == str(err.value)  # refused at POST /prompt
    off = {"lora_3": {**rows["lora_3"], "on": False}}  # checked like the strengths, also on a row that is off
    assert comfy_host.pack.BatchLoraLoader.VALIDATE_INPUTS(**off) == str(err.value)


ACCEPTED = {  # arch -> the accepted lengths and block ids, as the error for a 4-value vector states them
    "sdxl": "12 (BASE, IN04, IN05, IN07, IN08, MID, OUT00..OUT05) or 21 (BASE, IN01..IN08, M00..M02, OUT00..OUT08)",
    "sd3": "2 (BASE, BLOCKS) or 3 (BASE, B00, B01)",  # joint_blocks.0, .1
    "sd35_medium": "2 (BASE, BLOCKS) or 3 (BASE, B00, B01)",
    "flux1_dev": "3 (BASE, DOUBLE, SINGLE) or 5 (BASE, D00, D01, S00, S01)",
    "flux2_dev": "3 (BASE, DOUBLE, SINGLE) or 5 (BASE, D00, D01, S00, S01)",
    "chroma": "3 (BASE, D00, S00)",  # 1 double + 1 single: the per-block form has the group form's length
    "qwen_image": "2 (BASE, B00)",  # transformer_blocks.0
    "lumina2": "2 (BASE, B00)",  # layers.0 (noise_refiner / context_refiner get BASE)
    "z_image": "2 (BASE, B00)",
    "hidream": "3 (BASE, DOUBLE, SINGLE) or 49 (BASE, D00..D15, S00..S31)",  # 16 double + 32 single stream blocks
    "wan21_t2v": "2 (BASE, BLOCKS) or 3 (BASE, B00, B01)",
    "wan21_i2v": "2 (BASE, BLOCKS) or 3 (BASE, B00, B01)",
    "wan22_i2v": "2 (BASE, BLOCKS) or 3 (BASE, B00, B01)",
    "wan22_ti2v": "2 (BASE, BLOCKS) or 3 (BASE, B00, B01)",
    "hunyuan_video": "3 (BASE, DOUBLE, SINGLE) or 5 (BASE, D00, D01, S00, S01)",  # not the token refiner's blocks
    "ltxv": "2 (BASE, BLOCKS) or 3 (BASE, B00, B01)",
}


@pytest.fixture(scope="module")
def version(comfy_host):
    import comfyui_version
    return comfyui_version.__version__


def test_every_fixture_arch_has_a_row_in_this_table():
    assert sorted(ACCEPTED) == sorted(af.ARCHS)


@pytest.mark.parametrize("arch", list(af.ARCHS))
def test_wrong_length_names_row_count_arch_and_forms(comfy_host, version, arch):
    try:
        cls = af.expected_class(arch, version)
    except LookupError as e:
        pytest.skip(f"not run: {e}")
    model = af.load(comfy_host.comfy, arch, device="meta")  # ComfyUI's own model (shapes only): its weight keys
    with pytest.raises(ValueError) as err:  # the length is checked before the file is even looked up
        comfy_host.pack.BatchLoraLoader().apply(model, None, lora_7=brow("absent.safetensors", 1.0, 1.0, "1,1,1,1"))
    assert str(err.value) == f"lora_7: blocks '1,1,1,1' has 4 values; for {cls} it takes {ACCEPTED[arch]}"


def test_sd15_forms_and_unsupported_arch(comfy_host):
    h = comfy_host
    model, clip = load_checkpoint(h, fx.CHECKPOINT_NAME, torch.float16)
    with pytest.raises(ValueError) as err:
        run_loader(h, model, clip, brow(B, 1.0, 1.0, "SDXL-ALL"))
    assert str(err.value) == ("lora_1: blocks 'SDXL-ALL' has 12 values; for SD15 it takes 17 (BASE, IN01, IN02, "
                              "IN04, IN05, IN07, IN08, MID, OUT03..OUT11) or 27 (BASE, IN01..IN11, M00..M02, "
                              "OUT00..OUT11)")
    from batch_lora.nodes import blocks as bw
    with pytest.raises(ValueError) as err:  # a model_config class without a block table
        bw.ModelBlocks.of("AuraFlow", ["diffusion_model.double_layers.0.attn.w1q.weight"]).check(bw.parse("1,1", "f"))
    assert str(err.value).startswith("blocks '1,1': per-block weights are not defined for AuraFlow models; they "
                                     "are for SD15, ")
    assert str(err.value).endswith("Clear the row's blocks")


# ---------------------------------------------------------------------------------------------------------
# per-key merges against the pack without blocks and a float64 oracle


def merge64(base, up, down, scale, s):
    """float64 ``(base + s * scale * up @ down, |base| + |s * scale| |up| @ |down|)`` (convs flattened)."""
    up, down = up.double().flatten(1), down.double().flatten(1)
    delta = (up @ down).reshape(base.shape) * (s * scale)
    mag = (up.abs() @ down.abs()).reshape(base.shape) * abs(s * scale)
    return base.double() + delta, base.double().abs() + mag


def check_case(h, model, clip, name, sm, sc, blocks, weight, keys, base, exact):
    """Apply ``name`` at ``sm``/``sc`` with ``blocks``; every key in ``keys`` must follow the test's
    ``weight(key)``: bit for bit the pack's merge of the file at the key's effective strength without blocks, the
    base where that is 0, and within one rounding of ``exact(key, s)`` (float64 merge and operand magnitudes).
    ``base``: the touched keys' weights as loaded. Returns the effective strength per key."""
    def run(rows):
        m, c, report = run_loader(h, model, clip, *rows)
        load(h, m, *([c.load_model()] if c is not None else []))
        got = weights(m, [k for k in keys if k.startswith("diffusion_model.")])
        if c is not None:
            got.update(weights(c.patcher, [k for k in keys if not k.startswith("diffusion_model.")]))
        return got, report

    eff = {k: (sm if k.startswith("diffusion_model.") else sc) * weight(k) for k in keys}
    (clip_s,) = {s for k, s in eff.items() if not k.startswith("diffusion_model.")} or {0.0}
    with torch.inference_mode():
        got, report = run([brow(name, sm, sc, blocks)])
        assert f"  blocks {blocks}  unet " in report
        # without blocks, one run per distinct UNet strength; the text encoder's is the same in each
        reference = {s: run([row(name, s, clip_s)])[0] for s in sorted(
            {s for k, s in eff.items() if k.startswith("diffusion_model.") and s != 0.0})}
    for key, s in eff.items():
        if s == 0.0:
            assert same_bits(got[key], base[key]), key  # weight 0: the term is not applied
            continue
        ref = reference[s] if key.startswith("diffusion_model.") else next(iter(reference.values()))
        assert same_bits(got[key], ref[key]), (key, s)
        assert beyond_one_rounding(got[key], *exact(key, s)) == 0, (key, s)
        assert not torch.equal(got[key], base[key]), key
    return eff


SD1_VECTOR = ",".join(["0.5", "1.5"] + ["0.25"] * 10 + ["2"] * 3 + ["0", "-0.75"] + ["3"] * 10)  # 27 values
SD1_CASES = {  # blocks -> (the test's table {regex: weight}, BASE)
    f"MINE:{SD1_VECTOR}": ({r"^diffusion_model\.input_blocks\.1\.": 1.5, r"^diffusion_model\.output_blocks\.0\.": 0.0,
                            r"^diffusion_model\.output_blocks\.1\.": -0.75}, 0.5),
    # 17 values: input_blocks.1 is IN01 (0); output_blocks.0 / .1 are not among its blocks (OUT03..OUT11): BASE
    "SD-OUTALL": ({r"^diffusion_model\.input_blocks\.1\.": 0.0}, 1.0),
}


def sd1_exact(fixtures_dir):
    ckpt = load_file(str(fixtures_dir / "models" / "checkpoints" / fx.CHECKPOINT_NAME))
    tensors = load_file(str(fixtures_dir / "models" / "loras" / B))
    info = MANIFEST[B]
    down_sfx, up_sfx = fx.factor_suffixes(info.style)
    modules = {m.model_key: m for m in info.modules}
    scale = info.alpha / info.rank if info.alpha is not None else 1.0

    def exact(key, s):
        m = modules[key]
        return merge64(ckpt[m.checkpoint_key], tensors[m.lora_name + up_sfx], tensors[m.lora_name + down_sfx],
                       scale, s)
    return exact


@pytest.mark.parametrize("blocks", list(SD1_CASES))
def test_sd15_per_key(comfy_host, fixtures_dir, blocks):
    h = comfy_host
    model, clip = load_checkpoint(h, fx.CHECKPOINT_NAME, torch.float16)
    keys = sorted(MANIFEST[B].model_keys)
    with torch.inference_mode():
        load(h, model, clip.load_model())
        base = {**weights(model, [k for k in keys if k.startswith("diffusion_model.")]),
                **weights(clip.patcher, [k for k in keys if not k.startswith("diffusion_model.")])}
    table, base_weight = SD1_CASES[blocks]
    eff = check_case(h, model, clip, B, 0.8, 0.6, blocks, weigher(table, base_weight), keys, base,
                     sd1_exact(fixtures_dir))
    clip_keys = [k for k in keys if k.startswith("clip_l.")]
    assert len(clip_keys) == 36 and {eff[k] for k in clip_keys} == {0.6 * base_weight}  # the CLIP follows BASE
    unet = {k: s for k, s in eff.items() if k.startswith("diffusion_model.")}
    assert 0.0 in unet.values() and len(set(unet.values())) >= 2


def lora_for(path, params, keys, seed, rank=4, alpha=2.0):
    """Write a kohya-suffixed LoRA (``diffusion_model.<path>.lora_up/.lora_down/.alpha``, fp16 factors) on the
    weight ``keys`` (2-D or conv) of ``params`` ({key: tensor}); returns ``exact(key, s)`` from the file on disk
    (``base`` as loaded)."""
    tensors = {}
    g = torch.Generator().manual_seed(seed)
    for key in keys:
        shape = tuple(params[key].shape)
        fan_in = math.prod(shape[1:])
        name = key[:-len(".weight")]
        tensors[name + ".lora_down.weight"] = (torch.randn((rank, *shape[1:]), generator=g) / fan_in ** 0.5).half()
        tensors[name + ".lora_up.weight"] = (torch.randn((shape[0], rank, *[1] * (len(shape) - 2)), generator=g)
                                             * 0.05).half()
        tensors[name + ".alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    on_disk = load_file(str(path))

    def exact(key, s):
        name = key[:-len(".weight")]
        return merge64(params[key], on_disk[name + ".lora_up.weight"], on_disk[name + ".lora_down.weight"],
                       float(on_disk[name + ".alpha"]) / rank, s)
    return exact


def dit_case(h, fixtures_dir, version, arch, keys_of):
    """(model, base weights of the touched keys, file name, exact) for ``arch`` with a LoRA on ``keys_of(model)``."""
    try:
        af.expected_class(arch, version)
    except LookupError as e:
        pytest.skip(f"not run: {e}")
    model = af.load(h.comfy, arch, torch.bfloat16)
    with torch.inference_mode():
        load(h, model)
        keys = keys_of(model)
        base = weights(model, keys)
    name = f"blocks_{arch}.safetensors"
    exact = lora_for(fixtures_dir / "models" / "loras" / name, base, keys, seed=len(arch))
    h.folder_paths.filename_list_cache.pop("loras", None)
    return model, base, name, exact


SDXL_KEYS = [f"diffusion_model.{k}.weight" for k in (
    "time_embed.0", "input_blocks.1.0.emb_layers.1", "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
    "input_blocks.4.1.proj_in", "input_blocks.5.1.transformer_blocks.1.attn2.to_k", "input_blocks.6.0.in_layers.2",
    "output_blocks.0.0.emb_layers.1", "output_blocks.2.0.out_layers.3", "output_blocks.5.0.skip_connection",
    "output_blocks.6.0.emb_layers.1")]
SDXL_CASES = {  # 12 values: IN04 2, IN05 0, OUT00 -1, OUT01 0, OUT02 0.25, OUT05 3; others (BASE) 0.5
    "0.5,2,0,1,1,1,-1,0,0.25,1,1,3": ({r"input_blocks\.4\.": 2.0, r"input_blocks\.5\.": 0.0,
                                       r"output_blocks\.0\.": -1.0, r"output_blocks\.2\.": 0.25,
                                       r"output_blocks\.5\.": 3.0}, 0.5),  # input_blocks.1/.6, output_blocks.6: BASE
    "XL:SDXL-LyC-INALL": ({r"input_blocks\.\d\.": 1.0, r"output_blocks\.": 0.0}, 1.0),
}


@pytest.fixture(scope="module")
def sdxl(comfy_host, fixtures_dir, version):
    return dit_case(comfy_host, fixtures_dir, version, "sdxl", lambda model: SDXL_KEYS)


@pytest.mark.parametrize("blocks", list(SDXL_CASES))
def test_sdxl_per_key(comfy_host, sdxl, blocks):
    model, base, name, exact = sdxl
    table, base_weight = SDXL_CASES[blocks]
    eff = check_case(comfy_host, model, None, name, 0.8, 1.0, blocks, weigher(table, base_weight), SDXL_KEYS,
                     base, exact)
    assert 0.0 in eff.values() and len(set(eff.values())) >= 2


DIT_CASES = {  # arch -> {blocks: (the test's table, BASE)}
    "flux1_dev": {"0.5,2,0,-1,1.5": ({r"^diffusion_model\.double_blocks\.0\.": 2.0,
                                      r"^diffusion_model\.double_blocks\.1\.": 0.0,
                                      r"^diffusion_model\.single_blocks\.0\.": -1.0,
                                      r"^diffusion_model\.single_blocks\.1\.": 1.5}, 0.5),
                  "FLUX-SINGLE": ({r"^diffusion_model\.double_blocks\.": 0.0,
                                   r"^diffusion_model\.single_blocks\.": 1.0}, 1.0)},
    "hunyuan_video": {"0.5,2,0,-1,1.5": ({r"^diffusion_model\.double_blocks\.0\.": 2.0,
                                          r"^diffusion_model\.double_blocks\.1\.": 0.0,
                                          r"^diffusion_model\.single_blocks\.0\.": -1.0,
                                          r"^diffusion_model\.single_blocks\.1\.": 1.5}, 0.5),  # token refiner: BASE
                      "FLUX-DOUBLE": ({r"^diffusion_model\.double_blocks\.": 1.0,
                                       r"^diffusion_model\.single_blocks\.": 0.0}, 1.0)},
    "wan21_t2v": {"0.5,0,2": ({r"^diffusion_model\.blocks\.0\.": 0.0, r"^diffusion_model\.blocks\.1\.": 2.0}, 0.5),
                  "1.5,0.25": ({r"^diffusion_model\.blocks\.": 0.25}, 1.5)},
}


@pytest.fixture(scope="module")
def dits(comfy_host, fixtures_dir, version):
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = dit_case(comfy_host, fixtures_dir, version, arch, lambda model: sorted(
                k for k, p in model.model.named_parameters() if k.endswith(".weight") and p.ndim == 2))
        return cache[arch]
    return get


@pytest.mark.parametrize("arch,blocks", [(a, b) for a, cases in DIT_CASES.items() for b in cases])
def test_dit_per_key(comfy_host, dits, arch, blocks):
    model, base, name, exact = dits(arch)
    table, base_weight = DIT_CASES[arch][blocks]
    eff = check_case(comfy_host, model, None, name, 0.8, 1.0, blocks, weigher(table, base_weight), sorted(base),
                     base, exact)
    assert {0.8 * base_weight} < set(eff.values())  # keys outside the blocks at BASE, others at their weights
    assert any(not k.startswith(("diffusion_model.double_blocks.", "diffusion_model.single_blocks.",
                                 "diffusion_model.blocks.")) for k in eff)


# ---------------------------------------------------------------------------------------------------------
# edits, counted on the engine; bad values


def counts(engine):
    c = engine.counters
    return c.merges, c.writes, c.restores


def keys_matching(keys, pattern):
    return {k for k in keys if re.search(pattern, k)}


def test_edits_rebake_exactly_the_changed_keys(comfy_host):
    h = comfy_host
    from batch_lora.nodes.lifecycle import engine_for
    model, clip = load_checkpoint(h, fx.CHECKPOINT_NAME, torch.float16)
    keys = MANIFEST[B].model_keys
    unet_keys = sorted(k for k in keys if k.startswith("diffusion_model."))
    clip_keys = sorted(k for k in keys if k.startswith("clip_l."))
    in1, out0, out1 = (keys_matching(unet_keys, rf"^diffusion_model\.{b}\.") for b in
                       ("input_blocks\\.1", "output_blocks\\.0", "output_blocks\\.1"))
    assert in1 | out0 | out1 == set(unet_keys) and min(map(len, (in1, out0, out1))) > 0

    def step(blocks):
        r = row(B, 0.8, 0.6) if blocks is None else brow(B, 0.8, 0.6, blocks)
        m, c, _ = run_loader(h, model, clip, r)
        load(h, m, c.load_model())
        return m, c, {**weights(m, unet_keys), **weights(c.patcher, clip_keys)}

    with torch.inference_mode():
        _, _, full = step(None)
        unet, te = engine_for(model.model, create=False), engine_for(clip.patcher.model, create=False)
        before = counts(unet), counts(te)

        def delta():
            now = counts(unet), counts(te)
            return tuple(tuple(a - b for a, b in zip(n, w)) for n, w in zip(now, before))

        v1 = SD1_VECTOR  # input_blocks.1 1.5, output_blocks.0 0, output_blocks.1 -0.75, BASE 0.5
        _, _, w1 = step(v1)
        # merges, writes, restores: every UNet key's strength changed (output_blocks.0 restored); the CLIP at 0.5
        assert delta() == ((len(in1 | out1), len(unet_keys), len(out0)), (len(clip_keys), len(clip_keys), 0))
        before = counts(unet), counts(te)
        _, _, again = step(v1)  # the same blocks again: nothing merged or written
        assert delta() == ((0, 0, 0), (0, 0, 0))
        assert all(same_bits(again[k], w1[k]) for k in keys)
        # input_blocks.1 1.5 -> 0 (restored), output_blocks.0 0 -> 1, M00 2 -> 5 (no key there), the rest as v1
        v2 = ",".join(["0.5", "0"] + ["0.25"] * 10 + ["5", "2", "2"] + ["1", "-0.75"] + ["3"] * 10)
        before = counts(unet), counts(te)
        _, _, w2 = step(v2)
        assert delta() == ((len(out0), len(out0 | in1), len(in1)), (0, 0, 0))
        assert all(same_bits(w2[k], w1[k]) for k in out1 | set(clip_keys))  # untouched keys: the same bits
        assert all(same_bits(w2[k], full[k]) for k in out0)  # weight 1: exactly the strength without blocks
        before = counts(unet), counts(te)
        _, _, w3 = step(None)  # blocks removed: full strength again; output_blocks.0 was already there
        assert delta() == ((len(in1 | out1), len(in1 | out1), 0), (len(clip_keys), len(clip_keys), 0))
        assert all(same_bits(w3[k], full[k]) for k in keys)


def test_bad_blocks_leave_the_model_as_it_was(comfy_host):
    h = comfy_host
    model, clip = load_checkpoint(h, fx.CHECKPOINT_NAME, torch.float16)
    with torch.inference_mode():
        m, c, _ = run_loader(h, model, clip, brow(B, 0.8, 0.6, "SD-OUTALL"))
        load(h, m, c.load_model())
        unet_before, clip_before = weights(model), weights(clip.patcher)
        bad = [("1,0,1", "lora_2: blocks '1,0,1' has 3 values; for SD15 it takes 17 ("),
               (7, "lora_2.blocks must be a string"), ("1,R", "lora_2.blocks: value 2 is 'R'"),
               ("SDXL-ALL", "lora_2: blocks 'SDXL-ALL' has 12 values; for SD15 it takes 17")]
        for value, message in bad:
            with pytest.raises(ValueError) as err:
                run_loader(h, model, clip, row(fx.LORA_KOHYA_A, 1.0, 1.0), brow(B, 0.8, 0.6, value))
            assert str(err.value).startswith(message), str(err.value)
            assert all(same_bits(t, unet_before[k]) for k, t in weights(model).items())
            assert all(same_bits(t, clip_before[k]) for k, t in weights(clip.patcher).items())
        load(h, m, c.load_model())  # the stack that was there still loads as before, with no work
        assert all(same_bits(t, unet_before[k]) for k, t in weights(m).items())


# ---------------------------------------------------------------------------------------------------------
# DynamicVRAM (ComfyUI 0.33): the rows as ComfyUI's own patch list, evaluated when each layer runs

DYNAMIC_RUN = r"""
import json, sys
from pathlib import Path
import dynamic_cycle as dc  # comfy-aimdo initialised, ComfyUI imported on the CPU with fp16 UNet weights
import torch
base, rows = Path(sys.argv[1]), json.loads(sys.argv[2])
dc.sim.enable()
for kind in ("checkpoints", "loras"):
    dc.folder_paths.folder_names_and_paths[kind] = ([str(base / "models" / kind)],
                                                    dc.folder_paths.supported_pt_extensions)
ckpt = str(base / "models" / "checkpoints" / dc.fx.CHECKPOINT_NAME)
dyn = dc.comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=False)[:2]
with dc.sim.classic():
    ref = dc.comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=False)[:2]
plain = dc.snapshot(dyn[0].model)
with torch.inference_mode():
    outs = [dc.pack.BatchLoraLoader().apply(m, c, **rows)[:2] for m, c in (dyn, ref)]
    for m, c in outs:
        dc.mm.load_models_gpu([m, c.patcher])
    (dm, dcl), (rm, rcl) = outs
    weight = lambda name: dc.sim.effective(dm.model.get_submodule(name))[0]
    print(json.dumps({"dynamic": dm.is_dynamic() and not rm.is_dynamic(),
                      "differing": dc.compare(dm.model, rm.model) + dc.compare(dcl.patcher.model, rcl.cond_stage_model),
                      "modules": len(dc.layers(dm.model)) + len(dc.layers(dcl.patcher.model)),
                      "zero_weight_at_base": dc.same_bits(weight("diffusion_model.output_blocks.0.0.in_layers.2"),
                                                          plain["diffusion_model.output_blocks.0.0.in_layers.2"]),
                      "patched": not dc.same_bits(weight("diffusion_model.input_blocks.1.0.emb_layers.1"),
                                                  plain["diffusion_model.input_blocks.1.0.emb_layers.1"])}))
"""


@pytest.mark.skipif(not HAS_DYNAMIC, reason=f"not run: the ComfyUI at {comfy_host.COMFYUI_PATH.name} has no "
                                            "ModelPatcherDynamic (DynamicVRAM)")
def test_dynamic_vram_gives_the_classic_weights(fixtures_dir):
    rows = {"lora_1": brow(B, 0.8, 0.6, SD1_VECTOR), "lora_2": brow(fx.LORA_KOHYA_A, 0.5, 1.0, "SD-OUTALL")}
    proc = subprocess.run([sys.executable, "-c", DYNAMIC_RUN, str(fixtures_dir), json.dumps(rows)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}:{ROOT / 'scripts'}"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["dynamic"] and result["modules"] > 100
    assert result["differing"] == []  # every layer's weight and bias: dynamic == classic, bit for bit
    assert result["zero_weight_at_base"] and result["patched"]
