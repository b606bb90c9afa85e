"""LoRA formats inside the real ComfyUI host: PEFT UNet attention names (mapped by this pack), LyCORIS LoHa and
LoKr, full/diff weight patches and DoRA, each checked against an independent float64 oracle computed here from the
file's tensors and against stock ComfyUI's LoraLoader on the same file; the per-LoRA report.

The oracle's formulas are written from the format definitions, not from this pack's code:
- LoRA: ``delta = alpha/r * up @ down`` (kohya sd-scripts networks/lora.py, PEFT ``scaling = lora_alpha / r``).
- LoHa: ``delta = alpha/r * (w1_a @ w1_b) * (w2_a @ w2_b)``; with Tucker cores each factor is
  ``W[p, c, y, x] = sum_ij w_a[i, p] t[i, j, y, x] w_b[j, c]`` (LyCORIS lycoris/modules/loha.py, Hyeon-Woo et al.
  2022 "FedPara" Hadamard product of low-rank matrices).
- LoKr: ``delta = scale * kron(w1, w2)`` with ``w = w_a @ w_b`` for a decomposed factor and the Tucker rebuild
  above for ``lokr_t2``; ``scale = alpha / r`` of the decomposed factor, 1 when both factors are full matrices
  (LyCORIS lycoris/modules/lokr.py: "use_w1 and use_w2: alpha = lora_dim").
- diff: ``delta = diff`` (ComfyUI comfy/lora.py "diff" patches: ``.diff``, ``.diff_b``, ``.w_norm``, ``.b_norm``).
- DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"): ``V = W0 + delta``,
  ``W' = m * V / ||V||`` with the norm on the axis ``m`` spans; the term is ``s * (W' - W0)`` (this pack's stacking
  rule, see README "Formats").
"""

import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import make_fixtures as fx
from comfy_host import load, load_checkpoint, row, run_loader
from oracle import beyond_one_rounding, beyond_one_step

pytestmark = pytest.mark.host

FORMATS = fx.format_manifest()
EPS = torch.finfo(torch.float32).eps  # LyCORIS/ComfyUI add it to DoRA's norm




def _tucker(t, a, b):
    """``W[p, c, y, x] = sum_ij a[i, p] t[i, j, y, x] b[j, c]``, one 2-D product per kernel position."""
    kh, kw = t.shape[2:]
    return torch.stack([torch.stack([a.T @ t[:, :, y, x] @ b for x in range(kw)], -1) for y in range(kh)], -2)


def module_delta(t, name: str, shape, f=lambda x: x):
    """float64 delta at strength 1 of module ``name`` from file tensors ``t`` (``f`` applied to every factor
    first: identity for the value, ``abs`` for the operand magnitude bound). Returns ``{suffix: tensor}``
    with ``"weight"`` and, for bias diffs, ``"bias"``."""
    def g(sfx):
        return f(t[f"{name}.{sfx}"].double())

    def has(sfx):
        return f"{name}.{sfx}" in t
    def scaled(x):
        return abs(x) if f is torch.abs else x
    alpha = t[name + ".alpha"].item() if has("alpha") else None
    if has("lora_up.weight") or has("lora_B.weight"):
        up, down = ((g("lora_up.weight"), g("lora_down.weight")) if has("lora_up.weight")
                    else (g("lora_B.weight"), g("lora_A.weight")))
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        return {"weight": scaled(scale) * (up.flatten(1) @ down.flatten(1)).reshape(shape)}
    if has("hada_w1_a"):
        scale = alpha / g("hada_w1_b").shape[0] if alpha is not None else 1.0
        parts = [(_tucker(g(f"hada_t{j}"), g(f"hada_w{j}_a"), g(f"hada_w{j}_b")) if has(f"hada_t{j}")
                  else g(f"hada_w{j}_a") @ g(f"hada_w{j}_b")).reshape(shape) for j in (1, 2)]
        return {"weight": scaled(scale) * parts[0] * parts[1]}
    if has("lokr_w1") or has("lokr_w1_a"):
        w1 = g("lokr_w1") if has("lokr_w1") else g("lokr_w1_a") @ g("lokr_w1_b")
        if has("lokr_w2"):
            w2 = g("lokr_w2")
        elif has("lokr_t2"):
            w2 = _tucker(g("lokr_t2"), g("lokr_w2_a"), g("lokr_w2_b"))
        else:
            w2 = g("lokr_w2_a") @ g("lokr_w2_b")
        rank = (g("lokr_w2_b").shape[0] if not has("lokr_w2") else
                g("lokr_w1_b").shape[0] if not has("lokr_w1") else None)
        scale = alpha / rank if alpha is not None and rank is not None else 1.0
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        return {"weight": scaled(scale) * torch.kron(w1, w2).reshape(shape)}
    if has("diff"):
        return {"weight": g("diff"), **({"bias": g("diff_b")} if has("diff_b") else {})}
    if has("w_norm"):
        return {"weight": g("w_norm"), "bias": g("b_norm")}
    raise KeyError(name)


def dora_factor(v, m):
    """``m / (||V|| + EPS)`` for ``V`` (``[out, in, ...]``): norm per output row for ``m`` of ``[out, 1...]``,
    else per input channel over (out, kh, kw) (LyCORIS ``[1, in, 1...]`` layout)."""
    if m.shape[0] == v.shape[0]:
        norm = v.reshape(v.shape[0], -1).norm(dim=1).reshape(m.shape)
    else:
        norm = v.transpose(0, 1).reshape(v.shape[1], -1).norm(dim=1).reshape(m.shape)
    return m / (norm + EPS)


def oracle(fixtures_dir, stack):
    """float64 ``W0 + sum s * delta`` per model key for ``stack`` = [(format file, strength_model, strength_clip)],
    read from the files on disk. Returns ``{model key: (reference, operand magnitude)}``."""
    ckpt = load_file(str(fixtures_dir / "models" / "checkpoints" / fx.CHECKPOINT_NAME))
    out = {}
    for name, sm, sc in stack:
        t = load_file(str(fixtures_dir / "models" / "loras" / name))
        for m in FORMATS[name].values():
            s = sm if m.model_key.startswith("diffusion_model.") else sc
            value, mag = module_delta(t, m.lora_name, m.shape), module_delta(t, m.lora_name, m.shape, torch.abs)
            for part in value:
                key, ck = (m.model_key, m.checkpoint_key) if part == "weight" else (
                    m.model_key[:-len("weight")] + "bias", m.checkpoint_key[:-len("weight")] + "bias")
                base = ckpt[ck].double()
                ref, bound = out.setdefault(key, [base.clone(), base.abs()])
                delta, delta_mag = value[part], mag[part]
                if m.lora_name + ".dora_scale" in t:  # W' - W0 = V * m / ||V|| - W0
                    factor = dora_factor(base + delta, t[m.lora_name + ".dora_scale"].double())
                    delta, delta_mag = (base + delta) * factor - base, (base.abs() + delta_mag) * factor.abs() + base.abs()
                ref += s * delta
                bound += abs(s) * delta_mag
    return out


def live(patcher_m, patcher_c, key):
    p = patcher_m if key.startswith("diffusion_model.") else patcher_c
    return p.model.get_parameter(key).detach().clone()


def apply_pack(h, rows, dtype=torch.float16):
    model, clip = load_checkpoint(h, fx.CHECKPOINT_NAME, dtype)
    m2, c2, report = run_loader(h, model, clip, *rows)
    with torch.inference_mode():
        load(h, m2, c2.load_model())
    return m2, c2.patcher, report


def apply_stock(h, stack, dtype=torch.float16):
    model, clip = load_checkpoint(h, fx.CHECKPOINT_NAME, dtype)
    for name, sm, sc in stack:
        model, clip = h.nodes.LoraLoader().load_lora(model, clip, name, sm, sc)
    with torch.inference_mode():
        load(h, model, clip.load_model())
    return model, clip.patcher


def peft_processor_twin(fixtures_dir, h):
    """The PEFT attention file renamed to the ``.processor.to_*`` names stock ComfyUI 0.3.75 maps (same tensors)."""
    name = "peft_unet_attn_processor.safetensors"
    tensors = load_file(str(fixtures_dir / "models" / "loras" / fx.LORA_PEFT_ATTN))
    renamed = {re.sub(r"\.to_(q|k|v|out\.0)\.", lambda m: ".processor.to_" + m[1].replace(".0", "") + ".", k): v
               for k, v in tensors.items()}
    save_file(renamed, str(fixtures_dir / "models" / "loras" / name))
    h.folder_paths.filename_list_cache.pop("loras", None)
    return name


def stock_gaps(fixtures_dir, name):
    """Keys of format file ``name`` where stock ComfyUI 0.3.75 differs from the format's definition:
    ``(DoRA keys with a per-output-row magnitude, LoKr keys with a Tucker core)``.

    - ComfyUI's ``weight_decompose`` divides the per-output-row DoRA layout by ``||W0||`` instead of
      ``||W0 + delta||``; those keys are checked against the oracle only.
    - On LoKr with ``lokr_t2`` its ``torch.kron`` (torch 2.14.1) rejects the non-contiguous Tucker rebuild: it
      logs "ERROR lokr <key> view size is not compatible ..." and leaves the weight at its base; this pack applies
      it (checked against the oracle)."""
    tensors = load_file(str(fixtures_dir / "models" / "loras" / name))
    mods = FORMATS[name].values()
    out_axis = {m.model_key for m in mods if m.lora_name + ".dora_scale" in tensors
                and tensors[m.lora_name + ".dora_scale"].shape[0] == m.shape[0]}
    return out_axis, {m.model_key for m in mods if m.lora_name + ".lokr_t2" in tensors}


CASES = [(fx.LORA_PEFT_ATTN, 0.8, 0.6), (fx.LORA_LOHA, 0.8, 0.6), (fx.LORA_LOKR, -0.9, 1.2),
         (fx.LORA_DIFF, 0.7, 0.5), (fx.LORA_DORA, 0.8, 0.6)]


@pytest.mark.parametrize("name,sm,sc", CASES)
def test_format_matches_float64_oracle_and_stock(comfy_host, fixtures_dir, name, sm, sc, capsys):
    h = comfy_host
    ref = oracle(fixtures_dir, [(name, sm, sc)])
    ours_m, ours_c, report = apply_pack(h, [row(name, sm, sc)])
    manifest = FORMATS[name]
    unet = sum(1 for k in ref if k.startswith("diffusion_model."))
    kind = {fx.LORA_PEFT_ATTN: "lora", fx.LORA_DIFF: "diff", fx.LORA_DORA: "dora"}.get(name, name.split(".")[0])
    assert (f"{name}  model {sm:g} clip {sc:g}  unet {unet} keys, clip {len(ref) - unet} keys, 0 unmatched  "
            f"(for SD15; {kind} {len(ref)})") in report, report
    for key, (expected, mag) in ref.items():
        got = live(ours_m, ours_c, key)
        assert beyond_one_rounding(got, expected, mag) == 0, key
    stock_stack = [(peft_processor_twin(fixtures_dir, h) if name == fx.LORA_PEFT_ATTN else name, sm, sc)]
    stock_m, stock_c = apply_stock(h, stock_stack)
    ckpt = load_file(str(fixtures_dir / "models" / "checkpoints" / fx.CHECKPOINT_NAME))
    out_axis, stock_fails = stock_gaps(fixtures_dir, name)  # where stock differs by design or fails (see there)
    total = identical = 0
    for key, (_, mag) in ref.items():
        if key in out_axis:
            continue
        got, stock = live(ours_m, ours_c, key), live(stock_m, stock_c, key)
        if key in stock_fails:
            assert torch.equal(stock, ckpt[next(m.checkpoint_key for m in manifest.values() if m.model_key == key)])
            continue
        assert beyond_one_step(got, stock, mag) == 0, key
        total += got.numel()
        identical += int((got == stock).sum())
    with capsys.disabled():
        print(f"\n[{name}] vs stock LoraLoader: {identical}/{total} elements identical "
              f"({100 * identical / total:.2f}%), the rest within one rounding step")
    assert identical / total > 0.9


def test_peft_attention_names_are_the_ones_stock_comfyui_leaves_unmapped(comfy_host, fixtures_dir):
    """Stock 0.3.75 maps only the non-attention module of the PEFT file; the pack maps all of them (to the same
    weight keys as the ``.processor.`` names stock does map) and adds no name ComfyUI already has. Besides those,
    the only names added are the bare native paths of ``nodes/layouts.py`` (DiffSynth), each with the target
    ComfyUI gives ``diffusion_model.<path>``."""
    h = comfy_host
    from batch_lora.nodes.stack import _unet_key_map
    model, _ = load_checkpoint(h, fx.CHECKPOINT_NAME, torch.float16)
    stock_map = h.comfy.lora.model_lora_keys_unet(model.model, {})
    ours = _unet_key_map(model.model)
    added = {k: v for k, v in ours.items() if k not in stock_map}
    assert all(stock_map[k] == v for k, v in ours.items() if k in stock_map)
    bare = {k for k, v in added.items() if stock_map.get("diffusion_model." + k) == v}
    assert bare == {k[len("diffusion_model."):] for k in stock_map if k.startswith("diffusion_model.")}
    added = {k: v for k, v in added.items() if k not in bare}
    # 8 attention projections x 2 prefixes on this UNet (one transformer block), nothing else
    assert len(added) == 16 and all(".to_" in k and ".processor." not in k for k in added), sorted(added)
    tensors = load_file(str(fixtures_dir / "models" / "loras" / fx.LORA_PEFT_ATTN))
    stock_patches = h.comfy.lora.load_lora(tensors, stock_map, log_missing=False)
    expected = {m.lora_name: m.model_key for m in FORMATS[fx.LORA_PEFT_ATTN].values()}
    assert set(stock_patches) == {expected["unet." + fx._TB0 + "ff.net.2"]}
    assert {k: ours[k] for k in expected} == expected


def test_report_lists_architecture_formats_and_unmatched(comfy_host, fixtures_dir, caplog):
    h = comfy_host
    loras = fixtures_dir / "models" / "loras"
    tensors = load_file(str(loras / fx.LORA_LOHA))
    junk = {f"lora_unet_not_a_module_{i:02d}.hada_w1_a": torch.zeros(2, 2) for i in range(23)}
    save_file({**tensors, **junk}, str(loras / "loha_plus_junk.safetensors"))
    h.folder_paths.filename_list_cache.pop("loras", None)
    model, clip = load_checkpoint(h, fx.CHECKPOINT_NAME, torch.float16)
    with caplog.at_level("INFO", logger="comfyui-batch-lora"):
        _, _, report = run_loader(h, model, clip, row("loha_plus_junk.safetensors", 0.5, 0.25), row(fx.LORA_DORA))
    lines = report.split("\n")
    assert lines[0] == "model: eager; clip: eager"
    head = "loha_plus_junk.safetensors  model 0.5 clip 0.25  unet 5 keys, clip 1 keys, 23 unmatched  (for SD15; loha 6): "
    assert lines[1] == head + ", ".join(sorted(junk)[:20]) + " ... (3 more)"  # the STRING output names 20
    assert lines[2] == f"{fx.LORA_DORA}  model 1 clip 1  unet 5 keys, clip 1 keys, 0 unmatched  (for SD15; dora 6)"
    logged = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "batch-lora: " + head + ", ".join(sorted(junk)) in logged  # the log names all of them
    # Without a CLIP, the file's text-encoder tensors are skipped, not "unmatched".
    _, _, report = run_loader(h, model, None, row(fx.LORA_DORA))
    te = sum(1 for k in load_file(str(loras / fx.LORA_DORA)) if k.startswith("lora_te"))
    assert te > 0
    assert report.split("\n")[1] == (f"{fx.LORA_DORA}  model 1 clip 1  unet 5 keys, clip 0 keys, 0 unmatched  "
                                     f"(for SD15; dora 5), {te} text-encoder tensors skipped (no CLIP connected)")


def test_mixed_stack_equals_oracle_and_stock_chain_with_dora_first(comfy_host, fixtures_dir):
    """Every format at once plus a kohya LoRA on overlapping keys: the pack's ``W0 + sum s*delta`` equals the
    float64 oracle, and equals stock ComfyUI's sequential chain when the DoRA file comes first in the chain (then
    the sequential chain is the same sum; input-channel DoRA keys only, see the single-file test)."""
    h = comfy_host
    stack = [(fx.LORA_DORA, 0.7, 0.9), (fx.LORA_LOHA, 0.8, 0.6), (fx.LORA_LOKR, -0.5, 1.1),
             (fx.LORA_DIFF, 0.4, 0.3), (fx.LORA_PEFT_ATTN, 0.6, 0.6)]
    ref = oracle(fixtures_dir, stack)
    ours_m, ours_c, _ = apply_pack(h, [row(*entry) for entry in reversed(stack)])  # order does not matter here
    for key, (expected, mag) in ref.items():
        assert beyond_one_rounding(live(ours_m, ours_c, key), expected, mag) == 0, key
    twin = peft_processor_twin(fixtures_dir, h)
    stock_m, stock_c = apply_stock(h, [(twin if n == fx.LORA_PEFT_ATTN else n, sm, sc) for n, sm, sc in stack])
    skip = set().union(*(set().union(*stock_gaps(fixtures_dir, n)) for n, _, _ in stack))
    checked = 0
    for key, (_, mag) in ref.items():
        if key not in skip:
            # both round once; only the fp32 summation order differs
            assert beyond_one_step(live(ours_m, ours_c, key), live(stock_m, stock_c, key), mag) == 0, key
            checked += 1
    assert checked >= 15
