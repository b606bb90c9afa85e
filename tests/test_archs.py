"""Small diffusion models of real architectures (scripts/arch_fixtures.py) inside the real ComfyUI host.

For every arch the running host supports (``arch_fixtures.ARCHS``, keyed by ComfyUI version): detection picks the
expected model_config class and the load keeps every key of the generated state dict (the model's weights equal
the file's, bit for bit; only the per-host key gaps the table records differ). Archs within
``arch_fixtures.TINY_PARAMS`` are also checked for deterministic generation, load from a written file through
``comfy.sd.load_diffusion_model`` (what UNETLoader calls) and run one forward pass through ``apply_model`` on the
CPU in bf16 and fp32. Larger archs, whose smallest detectable size is hundreds of millions
of parameters, are built on the meta device: detection and key checks only. A host that lacks an arch skips it
with the measured reason."""
import pytest
import safetensors.torch
import torch

import arch_fixtures as af
from oracle import same_bits

pytestmark = pytest.mark.host

ARCHS = list(af.ARCHS)
TESTED_HOSTS = ("0.3.75", "0.33.0")


def _device(arch):
    return "cpu" if af.parameters(arch) <= af.TINY_PARAMS else "meta"


def _skip_unless_tiny(arch):
    if _device(arch) == "meta":
        pytest.skip(f"{arch}: smallest detectable size is {af.parameters(arch) / 1e6:.0f} M parameters, over "
                    f"TINY_PARAMS; built on the meta device only")


@pytest.fixture(scope="module")
def version(comfy_host):
    import comfyui_version  # ComfyUI's root is on sys.path once comfy_host has imported it
    return comfyui_version.__version__


@pytest.fixture(scope="module")
def models(comfy_host, version):
    """``get(arch, dtype)``: the arch's ModelPatcher on this host (loaded once per module), or a skip with the
    reason the host cannot load it."""
    cache = {}

    def get(arch, dtype=torch.bfloat16):
        try:
            af.expected_class(arch, version)
        except LookupError as e:
            pytest.skip(str(e))
        if (arch, dtype) not in cache:
            cache[arch, dtype] = af.load(comfy_host.comfy, arch, dtype, device=_device(arch))
        return cache[arch, dtype]
    return get


def test_table_covers_the_tested_hosts():
    for arch, a in af.ARCHS.items():
        assert sorted([*a.expect, *a.unsupported]) == sorted(TESTED_HOSTS), arch
        assert af.parameters(arch) > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_detected_and_every_key_loaded(models, version, arch):
    patcher = models(arch)
    config = patcher.model.model_config
    assert type(config).__name__ == af.expected_class(arch, version)
    file_sd = config.process_unet_state_dict(af.state_dict(arch, device=_device(arch)))
    live = patcher.model.diffusion_model.state_dict()
    assert sorted(set(live) - set(file_sd)) == sorted(af.ARCHS[arch].missing.get(version, ()))
    assert sorted(set(file_sd) - set(live)) == sorted(af.ARCHS[arch].unexpected.get(version, ()))
    common = set(live) & set(file_sd)
    assert {k: tuple(live[k].shape) for k in common} == {k: tuple(file_sd[k].shape) for k in common}
    if _device(arch) == "cpu":
        # bf16 -> fp32 is exact: weights a model keeps in fp32 (Wan's patch_embedding) still hold the file's values
        assert [k for k in common if not same_bits(live[k], file_sd[k].to(live[k].dtype))] == []


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_is_deterministic(tmp_path, arch):
    _skip_unless_tiny(arch)
    a = af.state_dict(arch, seed=0)
    assert {k: tuple(t.shape) for k, t in a.items()} == af.spec(arch)
    assert {t.dtype for t in a.values()} == {torch.bfloat16}
    b = af.state_dict(arch, seed=0)
    assert all(same_bits(a[k], b[k]) for k in a)
    other = af.state_dict(arch, seed=1)
    assert [k for k in a if torch.equal(a[k], other[k])] == []
    fp32 = af.state_dict(arch, torch.float32, seed=0)
    assert all(same_bits(fp32[k].to(torch.bfloat16), a[k]) for k in a)
    written = safetensors.torch.load_file(str(af.write(arch, tmp_path / "m.safetensors", seed=0)))
    assert written.keys() == a.keys() and all(same_bits(written[k], a[k]) for k in a)


@pytest.mark.parametrize("arch", ARCHS)
def test_unet_loader_reads_the_written_file(comfy_host, models, version, tmp_path, arch):
    _skip_unless_tiny(arch)
    in_memory = models(arch)
    path = af.write(arch, tmp_path / f"{arch}.safetensors")
    from_file = comfy_host.sd.load_diffusion_model(str(path), model_options={"dtype": torch.bfloat16})
    assert type(from_file.model.model_config).__name__ == af.expected_class(arch, version)
    a, b = in_memory.model.diffusion_model.state_dict(), from_file.model.diffusion_model.state_dict()
    assert a.keys() == b.keys() and all(same_bits(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_pass(models, arch, dtype):
    _skip_unless_tiny(arch)
    patcher = models(arch, dtype)
    inputs = af.forward_inputs(arch)
    with torch.inference_mode():
        out = patcher.model.apply_model(**inputs)
        other_text = patcher.model.apply_model(**{**inputs, "c_crossattn": inputs["c_crossattn"] + 1.0})
    assert out.shape == af.ARCHS[arch].latent
    assert torch.isfinite(out).all()
    assert out.std() > 0.1
    assert (out - other_text).abs().max() > 1e-3  # the text conditioning reaches the output
