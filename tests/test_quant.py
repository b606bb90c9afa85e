"""core.quant with plain torch: quantized weights in both hosts' shapes (comfy-kitchen's ``_params`` dataclass,
ComfyUI 0.3.75's ``_layout_params`` dict), without ComfyUI. The bake against a float64 oracle (within half a
quantization step at the checkpoint's scale), the scale never changing, saturation counted, the restore exact,
and the layouts refused."""
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from oracle import quant_step

from batch_lora.core import LoraFactors, quant


@dataclasses.dataclass
class Params:  # the fields comfy-kitchen's per-tensor layouts carry
    scale: torch.Tensor
    orig_dtype: torch.dtype = torch.bfloat16


def _weight(dtype, style, seed=0):
    w = torch.randn(32, 16, generator=torch.Generator().manual_seed(seed)) * 0.05
    qmax = 127.0 if dtype == torch.int8 else torch.finfo(dtype).max
    scale = w.abs().amax() / qmax
    q = (w / scale).round().to(dtype) if dtype == torch.int8 else (w / scale).to(dtype)
    if style == "kitchen":
        return SimpleNamespace(_qdata=q, _params=Params(scale.clone()))
    return SimpleNamespace(_qdata=q, _layout_params={"scale": scale.clone(), "orig_dtype": torch.bfloat16})


def _clone(t):
    if hasattr(t, "_params"):
        return SimpleNamespace(_qdata=t._qdata.clone(), _params=Params(t._params.scale.clone()))
    return SimpleNamespace(_qdata=t._qdata.clone(), _layout_params={k: v.clone() if torch.is_tensor(v) else v
                                                                  for k, v in t._layout_params.items()})


def _scale(t):
    return t._params.scale if hasattr(t, "_params") else t._layout_params["scale"]


@pytest.mark.parametrize("style", ["kitchen", "0.3.75"])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.int8])
def test_bake_from_pristine_at_the_checkpoint_scale_and_restore(style, dtype):
    param = _weight(dtype, style)
    pristine = _clone(param)
    g = torch.Generator().manual_seed(1)
    lora = LoraFactors.from_tensors(torch.randn(32, 2, generator=g) * 0.02, torch.randn(2, 16, generator=g) * 0.1,
                                    None, "t")
    scale = float(_scale(pristine))
    base = pristine._qdata.double() * scale
    deq = quant.dequantize(pristine)  # qdata converts exactly; the product with the scale is rounded once to fp32
    assert deq.dtype == torch.float32 and bool(((deq.double() - base).abs() <= 2.0 ** -24 * base.abs()).all())
    qmax = 127.0 if dtype == torch.int8 else torch.finfo(dtype).max
    bits = []
    for strength in (0.5, -1.0, 0.5):  # every bake starts from the pristine copy: 0.5 gives the same bits twice
        saturated = quant.write("k.weight", param, pristine, [(strength, lora)])
        exact = base + strength * lora.up.double() @ lora.down.double()
        live = param._qdata.double() * scale
        far = (live - exact).abs() > quant_step(param._qdata, scale) / 2 + 1e-7
        assert bool((live.abs() == qmax * scale)[far].all())  # only saturated values are further off
        assert saturated == int((exact.abs() / scale > qmax + quant._TOP_STEP[dtype] / 2).sum())
        assert float(_scale(param)) == scale
        bits.append(param._qdata.clone().view(torch.uint8) if dtype != torch.int8 else param._qdata.clone())
    assert torch.equal(bits[0], bits[2]) and not torch.equal(bits[0], bits[1])
    quant.restore(param, pristine)
    assert torch.equal(param._qdata.view(torch.uint8), pristine._qdata.view(torch.uint8))
    assert quant.nbytes(param) == 32 * 16 + 4 and quant.storage_dtype(param) == dtype


def test_saturation_is_counted_beyond_half_aquant_step():
    param = _weight(torch.float8_e4m3fn, "kitchen")
    pristine = _clone(param)
    big = LoraFactors.from_tensors(torch.ones(32, 1), torch.ones(1, 16), None, "big")  # +1.0: far over the range
    assert quant.write("k.weight", param, pristine, [(1.0, big)]) > 0
    assert float(param._qdata.float().max()) == torch.finfo(torch.float8_e4m3fn).max


def test_layouts_that_are_refused():
    ok = _weight(torch.float8_e4m3fn, "kitchen")
    assert quant.unsupported_reason(ok) is None and quant.unsupported_reason(torch.zeros(2)) is None
    block = SimpleNamespace(_qdata=torch.zeros(4, 4, dtype=torch.uint8), _layout_type="TensorCoreNVFP4Layout",
                            _layout_params={"scale": torch.tensor(1.0), "block_scale": torch.ones(4)})
    assert "TensorCoreNVFP4Layout" in quant.unsupported_reason(block)
    convrot = SimpleNamespace(_qdata=torch.zeros(4, 4, dtype=torch.int8),
                              _layout_params={"scale": torch.tensor(1.0), "convrot": True})
    assert "one scale per tensor" in quant.unsupported_reason(convrot)
