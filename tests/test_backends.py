"""core.backends with plain torch (and the onediff package from PyPI): weight keys through torch.compile and
OneDiff's NexfortDeployableModule, no recompiles and no stale weights after in-place writes, the oneflow conv
refresh, and clear refusals for quantized weights and frozen compiles."""
from pathlib import Path

import pytest
import torch

from batch_lora.core import (InPlacePatcher, LoraFactors, UnsupportedTarget, frozen_reason, resolve,
                             wrapper_kind)
from batch_lora.core import backends

ROOT = Path(__file__).resolve().parents[1]


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.lin = torch.nn.Linear(8, 6)

    def forward(self, x):
        return self.lin(self.conv(x).mean(dim=(2, 3)))


def stack(scale):
    g = torch.Generator().manual_seed(3)
    conv = LoraFactors.from_tensors(torch.randn(8, 2, 1, 1, generator=g), torch.randn(2, 4, 3, 3, generator=g),
                                    2.0, "conv")
    lin = LoraFactors.from_tensors(torch.randn(6, 2, generator=g), torch.randn(2, 8, generator=g), None, "lin")
    return {"inner.conv.weight": [(scale, conv)], "inner.lin.weight": [(scale, lin)]}


def frames():
    from torch._dynamo.utils import counters
    return counters["frames"]["total"], counters["stats"]["unique_graphs"]


def eager_with(scale):
    net = Net()
    root = torch.nn.Module()
    root.inner = net
    InPlacePatcher(root).apply(stack(scale))
    return net


def test_keys_resolve_through_torch_compile_to_the_real_parameter():
    net = Net()
    root = torch.nn.Module()
    root.inner = torch.compile(net, backend="eager")
    target = resolve(root, "inner.conv.weight")
    assert target.owner is net.conv and target.param is net.conv.weight and target.wrappers == ("torch.compile",)
    assert wrapper_kind(root.inner) == "torch.compile" and wrapper_kind(net) is None
    with pytest.raises(KeyError, match="inner.nope.weight"):
        resolve(root, "inner.nope.weight")


def test_nexfort_deployable_module_sees_new_weights_without_recompiling():
    from onediff.infer_compiler.backends.nexfort.deployable_module import get_deployable_module
    net = Net()
    compiled = torch.compile(net, backend="inductor")
    root = torch.nn.Module()
    root.inner = get_deployable_module(net, compiled)  # what OneDiff's nexfort backend returns
    assert wrapper_kind(root.inner) == "onediff-nexfort"
    target = resolve(root, "inner.conv.weight")
    assert target.owner is net.conv and target.wrappers[0] == "onediff-nexfort"
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_out = root.inner(x)
        before = frames()
        patcher = InPlacePatcher(root)
        outs = {}
        for scale in (1.0, -0.5, 2.0):
            patcher.apply(stack(scale))
            outs[scale] = root.inner(x)
            assert torch.allclose(outs[scale], eager_with(scale)(x), rtol=1e-4, atol=1e-5)
            assert not torch.allclose(outs[scale], base_out, atol=1e-3)
        patcher.reset()
        assert torch.equal(root.inner(x), base_out)  # same kernel, same (restored) weights: same bits
        assert frames() == before  # no recompile, no new graph
    assert len({round(float(o.sum()), 4) for o in outs.values()}) == 3


def test_oneflow_graph_copy_refreshed_after_every_conv_write(monkeypatch):
    refreshed = []
    monkeypatch.setattr(backends, "_oneflow_refresh", lambda: refreshed.append)
    net = Net()
    root = torch.nn.Module()
    root.inner = net
    patcher = InPlacePatcher(root)
    patcher.apply(stack(1.0))
    patcher.apply(stack(0.5))
    patcher.reset()
    assert refreshed == [net.conv] * 3  # apply, re-bake, restore of the conv; never for the Linear


def test_no_oneflow_means_no_refresh_hook():
    backends._oneflow_refresh.cache_clear()
    assert backends._oneflow_refresh() is None  # oneflow is not installable here (CUDA only)


def test_quantized_weights_are_refused_and_nothing_is_left_written():
    net = Net()
    root = torch.nn.Module()
    root.inner = net
    net.q = torch.nn.Linear(8, 6)
    net.q.weight = torch.nn.Parameter(torch.zeros(6, 8, dtype=torch.int8), requires_grad=False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    s = stack(1.0)
    s["inner.q.weight"] = s["inner.lin.weight"]
    with pytest.raises(UnsupportedTarget, match=r"inner.q.weight: the weight is torch.int8 \(quantized\).*before"):
        InPlacePatcher(root).apply(s)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    net.lin._deployable_module_quantized = True
    with pytest.raises(UnsupportedTarget, match="inner.lin.weight: the module is OneDiff-quantized"):
        resolve(root, "inner.lin.weight")


@pytest.mark.parametrize("storage", [torch.uint8, torch.float16], ids=["Q8_0 bytes", "F16"])
def test_gguf_weights_are_refused_naming_the_key_and_what_to_do(storage):
    net = Net()
    weight = torch.nn.Parameter(torch.zeros(6, 8, dtype=storage), requires_grad=False)
    weight.tensor_type, weight.tensor_shape = "Q8_0", (6, 8)  # what ComfyUI-GGUF's GGMLTensor carries (ops.py)
    net.lin.weight = weight
    before = net.lin.weight.detach().clone()
    with pytest.raises(UnsupportedTarget, match=r"lin\.weight: the weight is a GGUF tensor \(ComfyUI-GGUF\).*stock "
                                                r"LoraLoader on the GGUF model"):
        InPlacePatcher(net).apply({"lin.weight": stack(1.0)["inner.lin.weight"]})
    assert torch.equal(net.lin.weight.detach(), before)


def test_frozen_compiles_are_detected():
    net = Net()
    assert frozen_reason(None, [net]) is None
    assert frozen_reason({"backend": "inductor", "options": None, "mode": None}, [net]) is None
    assert "freezing" in frozen_reason({"options": {"freezing": True}})
    assert "freezing" in frozen_reason({"mode": "max-optimize:max-autotune:freezing"})
    root = torch.nn.Module()
    root.inner = torch.compile(net, options={"freezing": True})
    assert "OptimizedModule was compiled with freezing" in frozen_reason(None, [root])
    assert frozen_reason(None, [torch.compile(Net(), mode="max-autotune-no-cudagraphs")]) is None
    import torch._inductor.config as inductor_config
    with inductor_config.patch(freezing=True):
        assert "freezing is on" in frozen_reason(None, [Net()])


def test_gpu_script_checks_pass_on_cpu_with_a_tiny_unet():
    """tests/gpu/test_compile_gpu.py, the same checks on the CPU with a small UNet (the GPU run needs CUDA)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tests" / "gpu" / "test_compile_gpu.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    (row,) = gpu_check.main(["--device", "cpu", "--tiny", "--modes", "default"])
    assert row["recompiles"] == 0 and row["keys"] > 10
