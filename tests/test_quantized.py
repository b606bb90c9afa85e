"""Quantized and low-precision bases inside the real ComfyUI host: ComfyUI's ``QuantizedTensor`` weights (a
``comfy_quant`` checkpoint: fp8 e4m3fn / e5m2 with one scale per tensor, int8 tensor-wise where the host has it)
and plain fp8 weights, on the in-memory SD3 of ``test_offsets`` (its q/k/v slices and whole-weight terms).

Checked: every bake starts from the pristine checkpoint value and is quantized once (``core.quant``: nearest,
at the checkpoint's scale): the live weight equals the float64 oracle rounded once
(within half a quantization step plus fp32 accumulation error); 100 switches between two stacks give each stack's
bits every time;
Reset gives the checkpoint's bits (storage and scale). The LoRA's effective delta against the fp32 ideal is
measured for the pack and for stock ``LoraLoaderModelOnly`` (seeded stochastic rounding) and printed."""
import json

import pytest
import torch

import test_offsets as sd3
from comfy_host import load, run_loader
from oracle import quant_step

pytestmark = pytest.mark.host

QUANTIZED = {  # weight key (without "diffusion_model.") -> format written into the checkpoint
    "joint_blocks.0.x_block.attn.qkv.weight": "float8_e4m3fn",
    "joint_blocks.0.x_block.attn.proj.weight": "float8_e5m2",
    "joint_blocks.1.x_block.attn.qkv.weight": "int8_tensorwise",
    "joint_blocks.0.context_block.attn.qkv.weight": "float8_e4m3fn",
}
STORAGE = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2, "int8_tensorwise": torch.int8}


def _state_dict(host_formats) -> dict:
    """The SD3 diffusion model's state dict (bare names), the QUANTIZED weights stored in their format with a
    ``weight_scale`` and a ``comfy_quant`` entry (ComfyUI's layout, QUANTIZATION.md in the 0.33 tree)."""
    import comfy.supported_models
    config = comfy.supported_models.SD3(dict(sd3.UNET_CONFIG))
    model = config.get_model({})
    sd = {}
    for i, (name, p) in enumerate(model.named_parameters()):
        sd[name[len("diffusion_model."):]] = sd3._randn(p.shape, i, 0.05).to(torch.bfloat16)
    for key, fmt in QUANTIZED.items():
        if fmt not in host_formats:
            continue
        w = sd[key].float()
        qmax = 127.0 if fmt == "int8_tensorwise" else torch.finfo(STORAGE[fmt]).max
        scale = w.abs().amax() / qmax
        q = (w / scale).clamp(-qmax, qmax)
        sd[key] = q.round().to(torch.int8) if fmt == "int8_tensorwise" else q.to(STORAGE[fmt])
        layer = key[:-len(".weight")]
        sd[layer + ".weight_scale"] = scale.reshape(())
        sd[layer + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)
    return sd


def _raw(param):
    """(storage, scale) bits of a quantized weight, or (the tensor, None) of a plain one."""
    if hasattr(param, "_qdata"):
        params = getattr(param, "_params", None)
        scale = param._layout_params["scale"] if params is None else params.scale
        return param._qdata.detach().clone(), scale.detach().clone()
    return param.detach().clone(), None


def _value(param) -> torch.Tensor:
    q, scale = _raw(param)
    return q.double() * (1.0 if scale is None else scale.double())


def _same(a, b) -> bool:
    return all(torch.equal(x.view(torch.uint8) if x.element_size() == 1 else x, y.view(torch.uint8)
                           if y.element_size() == 1 else y) for x, y in zip(a, b) if x is not None)


@pytest.fixture(scope="module")
def quant_host(comfy_host):
    import comfy.quant_ops
    formats = set(getattr(comfy.quant_ops, "QUANT_ALGOS", {}))
    if "float8_e4m3fn" not in formats:
        pytest.skip("not run: this ComfyUI has no comfy_quant float8_e4m3fn layout")
    return comfy_host, formats


def test_quantized_bases_bake_once_from_pristine_and_reset_exactly(quant_host, fixtures_dir, capsys):
    h, formats = quant_host
    loras = fixtures_dir / "models" / "loras"
    files = sd3._write_files(loras)
    h.folder_paths.filename_list_cache.pop("loras", None)
    model = h.sd.load_diffusion_model_state_dict(_state_dict(formats))
    keys = [f"diffusion_model.{k}" for k, fmt in QUANTIZED.items() if fmt in formats]
    if not any(hasattr(model.model.get_parameter(k), "_qdata") for k in keys):
        pytest.skip("not run: this ComfyUI's load_diffusion_model_state_dict does not read comfy_quant entries "
                    "(0.3.75 loads them as unexpected keys)")
    assert all(hasattr(model.model.get_parameter(k), "_qdata") for k in keys), "some weights were not quantized"
    pristine = {k: _raw(model.model.get_parameter(k)) for k in keys}
    base = {k: _value(model.model.get_parameter(k)) for k in keys}
    exact, mag = sd3._oracle(base, files)
    rows = [{"on": True, "lora": n, "strength_model": s} for n, (*_, s) in sd3.FILES.items()]

    ours, _, report = run_loader(h, model, None, *rows)
    load(h, ours)
    first = {k: _raw(ours.model.get_parameter(k)) for k in keys}
    lines = []
    for key in keys:
        q, scale = first[key]
        live = q.double() * scale.double()
        slack = 64 * 2.0 ** -24 * mag[key]
        far = (live - exact[key]).abs() > quant_step(q, scale.double()) / 2 + slack
        top = float(q.double().abs().max()) * scale.double()  # saturated at the scale's range: only beyond it
        assert bool(((live.abs() == top) & (exact[key].abs() > top))[far].all()), key
        assert torch.equal(scale, pristine[key][1])  # the checkpoint's scale
        lines.append((key, live - base[key], exact[key] - base[key]))

    load(h, run_loader(h, model, None, rows[1])[0])
    second = {k: _raw(model.model.get_parameter(k)) for k in keys}
    for i in range(100):  # 100 switches between the two stacks: each gives its first bits again, every time
        stack, expected = (rows, first) if i % 2 == 0 else ([rows[1]], second)
        load(h, run_loader(h, model, None, *stack)[0])
        assert all(_same(expected[k], _raw(model.model.get_parameter(k))) for k in keys), i

    reset = h.pack.ResetAdapters().reset(False, model=ours)[0]
    load(h, reset)
    assert all(_same(pristine[k], _raw(reset.model.get_parameter(k))) for k in keys)

    stock = model
    for name, (*_, s) in sd3.FILES.items():
        stock = h.nodes.LoraLoaderModelOnly().load_lora_model_only(stock, name, s)[0]
    load(h, stock)
    with capsys.disabled():
        print("\nquantized bases: effective LoRA delta vs the fp32 ideal (gain = <eff, ideal>/<ideal, ideal>, "
              "err = |eff - ideal| / |ideal|)")
        for key, ours_delta, ideal in lines:
            stock_delta = _value(stock.model.get_parameter(key)) - base[key]
            fmt = QUANTIZED[key[len("diffusion_model."):]]
            stats = [f"{who} gain {float((d * ideal).sum() / (ideal * ideal).sum()):.3f} "
                     f"err {float((d - ideal).norm() / ideal.norm()):.3f}"
                     for who, d in (("pack", ours_delta), ("stock", stock_delta))]
            print(f"  {fmt:16s} {key[len('diffusion_model.'):]:44s} " + "; ".join(stats))
    load(h, model)  # stock restores its own patches
    assert all(_same(pristine[k], _raw(model.model.get_parameter(k))) for k in keys)
    assert "0 unmatched" in report


def test_unsupported_quantized_layout_is_refused_naming_node_and_key(quant_host, fixtures_dir):
    h, formats = quant_host
    if "nvfp4" not in formats:
        pytest.skip("not run: this ComfyUI has no nvfp4 layout")
    from batch_lora.core import UnsupportedTarget, resolve
    model = h.sd.load_diffusion_model_state_dict(_state_dict(formats))
    key = next(f"diffusion_model.{k}" for k, fmt in QUANTIZED.items() if fmt in formats)
    import comfy.quant_ops
    shape = model.model.get_parameter(key).shape
    nvfp4 = comfy.quant_ops.QuantizedTensor.from_float(torch.randn(shape, dtype=torch.bfloat16),
                                                       "TensorCoreNVFP4Layout")
    owner = model.model.get_submodule(key[:-len(".weight")])
    owner.weight = torch.nn.Parameter(nvfp4, requires_grad=False)
    with pytest.raises(UnsupportedTarget, match=key.replace(".", r"\.") + r": a .*NVFP4.* quantized weight"):
        resolve(model.model, key)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_plain_fp8_weights_bake_once_and_reset_exactly(comfy_host, fixtures_dir, dtype, capsys):
    """UNETLoader's ``weight_dtype`` fp8 (weights stored in fp8, no scale; computed in the model's manual-cast
    dtype): the same checks on the SD3 model's q/k/v and proj keys, both hosts."""
    h = comfy_host
    loras = fixtures_dir / "models" / "loras"
    files = sd3._write_files(loras)
    h.folder_paths.filename_list_cache.pop("loras", None)
    model = h.sd.load_diffusion_model_state_dict(_state_dict(set()), model_options={"dtype": dtype})
    keys = sorted({key for modules, *_ in sd3.FILES.values() for key, _, _ in modules.values()})
    assert all(model.model.get_parameter(k).dtype == dtype for k in keys)
    pristine = {k: _raw(model.model.get_parameter(k)) for k in keys}
    base = {k: _value(model.model.get_parameter(k)) for k in keys}
    exact, mag = sd3._oracle(base, files)
    rows = [{"on": True, "lora": n, "strength_model": s} for n, (*_, s) in sd3.FILES.items()]
    ours = run_loader(h, model, None, *rows)[0]
    load(h, ours)
    first = {k: _raw(ours.model.get_parameter(k)) for k in keys}
    for key in keys:
        q = first[key][0]
        far = (q.double() - exact[key]).abs() > quant_step(q, 1.0) / 2 + 64 * 2.0 ** -24 * mag[key]
        assert int(far.sum()) == 0, key
    load(h, run_loader(h, model, None, rows[1])[0])
    load(h, run_loader(h, model, None, *rows)[0])
    assert all(_same(first[k], _raw(model.model.get_parameter(k))) for k in keys)
    stock = model
    for name, (*_, s) in sd3.FILES.items():
        stock = h.nodes.LoraLoaderModelOnly().load_lora_model_only(stock, name, s)[0]
    with torch.no_grad():  # stock's stochastic fp8 rounding writes with out=, as the server runs it (no autograd)
        load(h, stock)
    with capsys.disabled():
        for key in keys[:2]:
            ideal = exact[key] - base[key]
            stats = [f"{who} gain {float((d * ideal).sum() / (ideal * ideal).sum()):.3f} "
                     f"err {float((d - ideal).norm() / ideal.norm()):.3f}"
                     for who, d in (("pack", first[key][0].double() - base[key]),
                                    ("stock", _value(stock.model.get_parameter(key)) - base[key]))]
            print(f"\n  plain {str(dtype)[6:]} {key[len('diffusion_model.'):]}: " + "; ".join(stats), end="")
    load(h, h.pack.ResetAdapters().reset(False, model=ours)[0])
    assert all(_same(pristine[k], _raw(model.model.get_parameter(k))) for k in keys)
