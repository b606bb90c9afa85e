"""ComfyUI's own LoRA nodes in the same graph as this pack's loader, in-process on the real host: the bypass LoRA
(``LoraLoaderBypass``, ComfyUI 0.33: the LoRA is computed beside the layer, f(x) + h(x), nothing written) before
or after the Batch LoRA Loader. The layer's output is checked against an independent float64 oracle from the
files on disk: x @ (W0 + pack stack)^T + b + s * scale * (x @ down^T) @ up^T. (The stock LoraLoader chain is
tested in test_host.py.) On a host without the bypass node (0.3.75) the test is skipped, i.e. not run."""
import importlib

import pytest
import torch
from safetensors.torch import load_file

import make_fixtures as fx
from comfy_host import load, load_checkpoint, row, run_loader
from test_host import MANIFEST, oracle

pytestmark = pytest.mark.host
A, C = fx.LORA_KOHYA_A, fx.LORA_PEFT_C


def bypass_node():
    try:
        return importlib.import_module("comfy_extras.nodes_lora_debug").LoraLoaderBypass
    except (ImportError, AttributeError):
        return None


def bypass_term(fixtures_dir, key, x, strength):
    """float64 ``s * scale * (x @ down^T) @ up^T`` of peft_c's module on ``key``, from the file on disk."""
    info = MANIFEST[C]
    module = next(m for m in info.modules if m.model_key == key)
    tensors = load_file(str(fixtures_dir / "models" / "loras" / C))
    down_sfx, up_sfx = fx.factor_suffixes(info.style)
    up = tensors[module.lora_name + up_sfx].double()
    down = tensors[module.lora_name + down_sfx].double()
    scale = info.alpha / down.shape[0] if info.alpha is not None else 1.0
    return strength * scale * (x @ down.T) @ up.T


@pytest.mark.parametrize("order", ["bypass after the loader", "bypass before the loader"])
def test_bypass_lora_composes_with_the_pack(comfy_host, fixtures_dir, order):
    h = comfy_host
    node = bypass_node()
    if node is None:
        pytest.skip("not run: this ComfyUI has no LoraLoaderBypass (comfy_extras/nodes_lora_debug.py)")
    model, clip = load_checkpoint(h, fx.CHECKPOINT_NAME, torch.float32)
    keys = sorted(k for k in MANIFEST[A].model_keys & MANIFEST[C].model_keys
                  if k.startswith("diffusion_model.") and len(next(m.shape for m in MANIFEST[C].modules
                                                                   if m.model_key == k)) == 2)
    assert keys, "the fixtures share no UNet linear weight between kohya_a and peft_c"
    with torch.inference_mode():
        if order == "bypass after the loader":
            patched = node().load_lora(run_loader(h, model, None, row(A, 0.8))[0], None, C, 0.6, 0.0)[0]
        else:
            patched = run_loader(h, node().load_lora(model, None, C, 0.6, 0.0)[0], None, row(A, 0.8))[0]
        load(h, patched)
        expected_w = oracle(fixtures_dir, [(A, 0.8, 0.0)])
        g = torch.Generator().manual_seed(0)
        for key in keys:
            layer = patched.model.get_submodule(key[:-len(".weight")])
            x = torch.randn(3, layer.in_features, generator=g)
            y = layer(x).double()
            exact_w = expected_w[key][0]
            bias = layer.bias.double() if layer.bias is not None else 0.0
            expected = x.double() @ exact_w.T + bias + bypass_term(fixtures_dir, key, x.double(), 0.6)
            without_bypass = x.double() @ exact_w.T + bias
            scale = (x.double().abs() @ exact_w.abs().T).max()
            assert float((y - expected).abs().max()) <= 1e-5 * float(scale), key
            assert float((y - without_bypass).abs().max()) > 1e-3 * float(scale), key  # the bypass LoRA is there
        load(h, model)  # and the plain model is untouched by either
        plain = model.model.get_submodule(keys[0][:-len(".weight")])
        x = torch.randn(3, plain.in_features, generator=g)
        base = load_file(str(fixtures_dir / "models" / "checkpoints" / fx.CHECKPOINT_NAME))
        w0 = base["model." + keys[0]].double()
        b0 = base["model." + keys[0][:-len(".weight")] + ".bias"].double() if plain.bias is not None else 0.0
        assert float((plain(x).double() - (x.double() @ w0.T + b0)).abs().max()) <= 1e-5 * float(
            (x.double().abs() @ w0.abs().T).max())
