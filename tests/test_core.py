"""Unit tests of core/ with plain torch: fused merge vs an independent float64 oracle, exact reset, in-place
writes, all-or-nothing, no drift over many cycles, base cache and parsed-file cache."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import save_file

from oracle import beyond_one_rounding, same_bits

from batch_lora.core import (ApplyInterrupted, BaseCache, CacheBudgetError, FuseError, InPlacePatcher,
                             LoraFactors, LoraFileCache, LoraFileError, fuse_into, fused_weight, per_tree, wrappers)


def factors(out, inner, rank, alpha, seed, token=None, conv=None):
    g = torch.Generator().manual_seed(seed)
    up = torch.randn(out, rank, generator=g) * 0.05
    down = torch.randn(rank, inner, generator=g) * 0.05
    if conv is not None:  # kohya conv layout: down [r, in, kh, kw], up [out, r, 1, 1]
        down = down.reshape(rank, *conv)
        up = up.reshape(out, rank, 1, 1)
    return LoraFactors.from_tensors(up.half(), down.half(), alpha, token or f"lora{seed}")


def oracle(base, terms):
    """float64 reference: base + sum s * (alpha/r) * up @ down, from the factors' own fp16-exact values."""
    w = base.double().reshape(base.shape[0], -1)
    for s, f in terms:
        w = w + s * f.scale * (f.up.double() @ f.down.double())
    return w.reshape(base.shape)


def operand_scale(base, terms):
    mag = base.double().abs().reshape(base.shape[0], -1)
    for s, f in terms:
        mag = mag + abs(s * f.scale) * (f.up.double().abs() @ f.down.double().abs())
    return mag.reshape(base.shape)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(48, 40), (24, 16, 3, 3), (32, 16, 1, 1)])
def test_fused_weight_matches_float64_oracle(dtype, shape):
    torch.manual_seed(0)
    base = (torch.randn(shape) * 0.1).to(dtype)
    inner = math.prod(shape[1:])
    conv = shape[1:] if len(shape) == 4 else None
    terms = [(0.8, factors(shape[0], inner, 4, 2.0, 1, conv=conv)),
             (-1.3, factors(shape[0], inner, 8, None, 2, conv=conv)),
             (2.0, factors(shape[0], inner, 16, 4.0, 3, conv=conv))]
    out = fused_weight("k", base.float(), terms, dtype)
    assert out.dtype == dtype and out.shape == base.shape
    ref = oracle(base, terms)
    assert beyond_one_rounding(out, ref, operand_scale(base, terms)) == 0
    if dtype != torch.float32:
        # Rounded once from fp32: apart from near-ties at a rounding boundary the result is round(ref) exactly.
        exact = (out == ref.to(dtype)).double().mean().item()
        assert exact > 0.99, exact
    assert not torch.equal(out, base)  # the stack really changed the weight


def test_fused_weight_folds_locon_mid_like_lycoris():
    g = torch.Generator().manual_seed(5)
    down, mid, up = torch.randn(4, 6, 1, 1, generator=g), torch.randn(4, 4, 3, 3, generator=g), torch.randn(8, 4, 1, 1, generator=g)
    f = LoraFactors.from_tensors(up, down, 2.0, "mid", mid=mid)
    # Tucker form: delta[o, i, y, x] = sum_{j,k} up[o, j] * mid[j, k, y, x] * down[k, i]
    ref = torch.einsum("oj,jkyx,ki->oiyx", up.flatten(1).double(), mid.double(), down.flatten(1).double()) * 0.5
    out = fused_weight("k", torch.zeros(8, 6, 3, 3), [(1.0, f)], torch.float32)
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_fused_weight_rejects_shape_mismatch_and_overflow():
    base = torch.zeros(8, 6)
    with pytest.raises(FuseError, match="k.weight.*does not fit"):
        fused_weight("k.weight", base, [(1.0, factors(8, 5, 2, None, 1))], torch.float16)
    huge = LoraFactors.from_tensors(torch.full((8, 1), 300.0), torch.full((1, 6), 300.0), None, "huge")
    with pytest.raises(FuseError, match="NaN/Inf"):
        fused_weight("k.weight", base, [(1.0, huge)], torch.float16)  # 90000 > fp16 max


@pytest.mark.parametrize("value, finite", [(40000.0, True), (65504.0, True), (65536.0, False), (float("inf"), False)])
def test_fuse_into_finiteness_check_is_exact_at_the_fp16_limit(value, finite):
    # fuse_into screens blocks with a cheap sum of squares and falls back to an exact check: large but
    # representable weights pass and equal the out-of-place result; one overflowing element anywhere raises.
    base = torch.full((300, 2000), 0.5)
    base[-1, -1] = value
    param = torch.zeros(300, 2000, dtype=torch.float16)
    tiny = LoraFactors.from_tensors(torch.full((300, 1), 1e-3), torch.full((1, 2000), 1e-3), None, "tiny")
    if finite:
        fuse_into("k.weight", param, base, [(1.0, tiny)])
        assert same_bits(param, fused_weight("k.weight", base, [(1.0, tiny)], torch.float16))
        assert param[-1, -1].item() == value
    else:
        with pytest.raises(FuseError, match="k.weight.*NaN/Inf"):
            fuse_into("k.weight", param, base, [(1.0, tiny)])


class Net(torch.nn.Module):
    def __init__(self, dtype=torch.float16):
        super().__init__()
        torch.manual_seed(1)
        self.lin = torch.nn.Linear(40, 48)
        self.conv = torch.nn.Conv2d(16, 24, 3)
        self.pw = torch.nn.Conv2d(24, 32, 1)
        self.to(dtype)
        self.conv.to(memory_format=torch.channels_last)

    KEYS = {"lin.weight": (48, 40, None), "conv.weight": (24, 144, (16, 3, 3)), "pw.weight": (32, 24, (24, 1, 1))}


def stack_of(net, seed, strengths=(1.0, 0.5)):
    stack = {}
    for i, (key, (out, inner, conv)) in enumerate(Net.KEYS.items()):
        stack[key] = [(s, factors(out, inner, 4 + 4 * j, 8.0, seed * 100 + i * 10 + j, token=f"{seed}-{key}-{j}",
                                  conv=conv)) for j, s in enumerate(strengths)]
    return stack


def snapshot(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def assert_same_bits(a, b):
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_apply_reset_in_place_and_bit_exact():
    net = Net()
    before = snapshot(net)
    params = {k: (net.get_parameter(k), net.get_parameter(k).data_ptr()) for k in Net.KEYS}
    strides = net.conv.weight.stride()
    patcher = InPlacePatcher(net)
    stack = stack_of(net, 1)
    report = patcher.apply(stack)
    assert report.merged == 3
    for key, terms in stack.items():
        param = net.get_parameter(key)
        assert param is params[key][0] and param.data_ptr() == params[key][1]
        assert torch.equal(param, fused_weight(key, before[key].float(), terms, torch.float16))
    assert net.conv.weight.stride() == strides  # channels_last kept
    patcher.reset()
    assert_same_bits(snapshot(net), before)
    assert all(net.get_parameter(k) is params[k][0] and net.get_parameter(k).data_ptr() == params[k][1]
               for k in Net.KEYS)


def test_unchanged_stack_does_no_work_and_edit_rebakes_only_touched_keys():
    net = Net()
    patcher = InPlacePatcher(net)
    stack = stack_of(net, 1)
    patcher.apply(stack)
    merges, writes = patcher.counters.merges, patcher.counters.writes
    report = patcher.apply(stack)
    assert (report.merged, report.restored, report.unchanged) == (0, 0, 3)
    assert (patcher.counters.merges, patcher.counters.writes) == (merges, writes)
    edited = dict(stack)
    edited["lin.weight"] = [(0.25, stack["lin.weight"][0][1])]
    report = patcher.apply(edited)
    assert (report.merged, report.unchanged) == (1, 2)
    assert patcher.counters.writes == writes + 1
    assert patcher.counters.moves == 0


def test_signature_skips_an_unchanged_stack_until_a_key_is_forgotten():
    net = Net()
    patcher = InPlacePatcher(net)
    stack = stack_of(net, 1)
    patcher.apply(stack, signature="s1")
    writes, baked = patcher.counters.writes, snapshot(net)
    edited = dict(stack)
    edited["lin.weight"] = [(0.25, stack["lin.weight"][0][1])]
    report = patcher.apply(edited, signature="s1")  # the caller vouches: same signature = same terms
    assert (report.merged, report.unchanged, patcher.counters.writes) == (0, 3, writes)
    assert_same_bits(snapshot(net), baked)
    patcher.forget(["lin.weight"])  # the host restored a key: the signature no longer describes the weights
    assert patcher.signature is None
    with torch.no_grad():
        net.lin.weight.copy_(patcher.cache.get("lin.weight"))
    report = patcher.apply(stack, signature="s1")
    assert (report.merged, report.unchanged) == (1, 2)
    assert_same_bits(snapshot(net), baked)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bake_skips_the_nan_screen_only_where_bounds_prove_the_key_finite(monkeypatch, dtype):
    import batch_lora.core.fuse as fuse
    screened = []
    real = fuse._block_finite
    monkeypatch.setattr(fuse, "_block_finite", lambda block, limit: screened.append(block.shape) or real(block, limit))
    net = Net(dtype)
    patcher = InPlacePatcher(net)
    stack = stack_of(net, 1)
    for key in stack:
        base = net.get_parameter(key).detach()
        assert patcher.cache.capture(key, base) is not None
        assert patcher.cache.absmax(key) == float(base.double().abs().max())
    patcher.apply(stack)
    assert screened == []
    for key, terms in stack.items():
        expected = fused_weight(key, patcher.cache.get(key), terms, dtype)
        assert same_bits(net.get_parameter(key).detach().contiguous(), expected), key
    # A factor set whose bound reaches half the dtype's range is screened, and an overflow is refused, rolled back.
    before = snapshot(net)
    huge = LoraFactors.from_tensors(torch.full((48, 1), 600.0), torch.full((1, 40), 600.0), None, "huge")
    with pytest.raises(FuseError, match="lin.weight.*NaN/Inf"):
        patcher.apply({**stack, "lin.weight": [(1.0 if dtype == torch.float16 else 1e33, huge)]})
    assert screened and screened[0][1] == 40
    assert_same_bits(snapshot(net), before)


def test_base_cache_absmax_is_nan_for_a_nan_base():
    cache = BaseCache()
    weight = torch.tensor([[1.0, float("nan")], [-3.0, 2.0]], dtype=torch.float16)
    cache.capture("k", weight)
    assert math.isnan(cache.absmax("k"))
    cache.drop(["k"])
    cache.capture("k", torch.tensor([[1.0, -5.0]], dtype=torch.float8_e4m3fn))
    assert cache.absmax("k") == 5.0


def test_moves_counts_applies_after_the_host_moved_the_weights():
    # What a device round trip (Module.to: same Parameter, new storage) looks like to the engine, on the CPU.
    net = Net()
    patcher = InPlacePatcher(net)
    patcher.apply(stack_of(net, 1))
    patcher.reset()
    assert patcher.counters.moves == 0
    net.lin.weight.data = net.lin.weight.data.clone()
    patcher.apply(stack_of(net, 2))
    assert patcher.counters.moves == 1
    patcher.apply(stack_of(net, 1))  # nothing moved since the last write
    assert patcher.counters.moves == 1


def test_thousand_cycles_never_drift():
    net = Net()
    base = snapshot(net)
    patcher = InPlacePatcher(net)
    a, b = stack_of(net, 1), stack_of(net, 2, strengths=(-0.7, 1.9))
    patcher.apply(a)
    first_a = snapshot(net)
    patcher.apply(b)
    first_b = snapshot(net)
    for _ in range(1000):
        patcher.apply(a)
        patcher.apply(b)
        patcher.reset()
    assert_same_bits(snapshot(net), base)
    patcher.apply(a)
    assert_same_bits(snapshot(net), first_a)
    patcher.apply(b)
    assert_same_bits(snapshot(net), first_b)


def test_naive_add_subtract_cycle_drifts_in_fp16():
    """The bug this pack removes: W += delta; W -= delta in fp16 does not return to W."""
    net = Net()
    w0 = net.lin.weight.detach().clone()
    f = factors(48, 40, 8, 8.0, 3)
    delta = (f.up @ f.down * f.scale).half()
    w = w0.clone()
    for _ in range(100):
        w += delta
        w -= delta
    assert (w.float() - w0.float()).abs().max().item() > 0


@pytest.mark.parametrize("from_state", ["base", "applied"])
def test_failure_mid_apply_rolls_back_every_written_key(from_state):
    net = Net()
    patcher = InPlacePatcher(net)
    if from_state == "applied":
        patcher.apply(stack_of(net, 7))
    before = snapshot(net)
    bad = stack_of(net, 1)
    bad["pw.weight"] = [(1.0, factors(32, 23, 4, None, 9))]  # wrong inner size: fails after two keys were written
    with pytest.raises(FuseError, match="pw.weight"):
        patcher.apply(bad)
    assert_same_bits(snapshot(net), before)
    nan = stack_of(net, 1)
    nan["pw.weight"] = [(1.0, LoraFactors.from_tensors(torch.full((32, 1), float("nan")), torch.ones(1, 24), None, "nan"))]
    with pytest.raises(FuseError, match="NaN"):
        patcher.apply(nan)
    assert_same_bits(snapshot(net), before)
    assert patcher.counters.rollbacks == 2
    patcher.reset()  # the engine's state stayed consistent: reset still lands on the exact base
    fresh = Net()
    assert_same_bits(snapshot(net), snapshot(fresh))


def test_interrupt_rolls_back():
    net = Net()
    before = snapshot(net)
    patcher = InPlacePatcher(net)
    polls = iter([False, False, True])
    with pytest.raises(ApplyInterrupted):
        patcher.apply(stack_of(net, 1), should_stop=lambda: next(polls))
    assert_same_bits(snapshot(net), before)
    assert patcher.applied_keys == set()


@pytest.mark.parametrize("mode", ["fp32", "native"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_base_cache_modes_restore_exactly(mode, dtype):
    net = Net(dtype)
    before = snapshot(net)
    cache = BaseCache(dtype=mode)
    patcher = InPlacePatcher(net, cache)
    patcher.apply(stack_of(net, 1))
    itemsize = 4 if mode == "fp32" else torch.empty((), dtype=dtype).element_size()
    assert cache.nbytes == sum(net.get_parameter(k).numel() for k in Net.KEYS) * itemsize
    patcher.reset()
    assert_same_bits(snapshot(net), before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_auto_base_cache_keeps_fp32_copies_within_a_share_of_free_memory(monkeypatch, dtype):
    """``auto`` (the default): float32 copies while they fit ``FP32_SHARE`` of the memory available when filling
    starts, native copies beyond (here: room for lin.weight's 1920 float32 elements only), bit-exact either way;
    an emptied cache measures again."""
    import batch_lora.core.cache as cache_mod
    monkeypatch.setattr(cache_mod, "available_bytes", lambda device: int(48 * 40 * 4 / cache_mod.FP32_SHARE))
    net = Net(dtype)
    before = snapshot(net)
    cache = BaseCache()
    patcher = InPlacePatcher(net, cache)
    patcher.apply(stack_of(net, 1))
    assert {k: cache.get(k).dtype for k in Net.KEYS} == {"lin.weight": torch.float32, "conv.weight": dtype,
                                                         "pw.weight": dtype}
    merged = snapshot(net)
    patcher.reset()
    assert_same_bits(snapshot(net), before)
    patcher.release_cache()
    monkeypatch.setattr(cache_mod, "available_bytes", lambda device: 1 << 40)
    patcher.apply(stack_of(net, 1))
    assert {cache.get(k).dtype for k in Net.KEYS} == {torch.float32}
    assert_same_bits(snapshot(net), merged)  # the same merge from either copy: the upcast is exact
    patcher.reset()
    assert_same_bits(snapshot(net), before)


def test_base_cache_budget_error_leaves_model_unchanged():
    net = Net()
    before = snapshot(net)
    patcher = InPlacePatcher(net, BaseCache(budget_bytes=48 * 40 * 4 + 10))
    with pytest.raises(CacheBudgetError, match="conv.weight|pw.weight"):
        patcher.apply(stack_of(net, 1))
    assert_same_bits(snapshot(net), before)


KEYS = list(Net.KEYS)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(
    st.none(),  # reset
    st.dictionaries(st.sampled_from(KEYS), st.lists(st.tuples(
        st.floats(-3, 3, allow_nan=False).map(lambda x: round(x, 2)), st.integers(0, 3)), max_size=3), max_size=3)),
    min_size=1, max_size=6))
def test_any_sequence_equals_fresh_merge_from_base(ops):
    net = Net()
    base = snapshot(net)
    pool = {(k, i): factors(Net.KEYS[k][0], Net.KEYS[k][1], 2 + i, 4.0, 50 + i, token=f"{k}/{i}",
                            conv=Net.KEYS[k][2]) for k in KEYS for i in range(4)}
    patcher = InPlacePatcher(net)
    for op in ops:
        if op is None:
            patcher.reset()
            expected = {}
        else:
            expected = {k: [(s, pool[(k, i)]) for s, i in terms] for k, terms in op.items()}
            patcher.apply(expected)
        for key in KEYS:
            terms = expected.get(key)
            want = fused_weight(key, base[key].float(), terms, torch.float16) if terms else base[key]
            assert torch.equal(net.get_parameter(key).detach(), want), key


def test_lora_file_cache_rereads_changed_files_and_names_bad_ones(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file({"x.lora_up.weight": torch.ones(2, 1)}, str(path))
    cache = LoraFileCache()
    first = cache.load(str(path))
    assert cache.load(str(path)) is first and cache.reads == 1
    save_file({"x.lora_up.weight": torch.full((2, 1), 2.0), "x.lora_down.weight": torch.ones(1, 3)}, str(path))
    second = cache.load(str(path))
    assert cache.reads == 2 and torch.equal(second["x.lora_up.weight"], torch.full((2, 1), 2.0))
    with pytest.raises(LoraFileError, match="missing.safetensors"):
        cache.load(str(tmp_path / "missing.safetensors"))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(LoraFileError, match="broken.safetensors.*not a valid safetensors"):
        cache.load(str(broken))
    nan = tmp_path / "nan.safetensors"
    save_file({"m.lora_down.weight": torch.tensor([[float("nan")]])}, str(nan))
    with pytest.raises(LoraFileError, match="m.lora_down.weight.*NaN"):
        cache.load(str(nan))


def test_lora_file_cache_evicts_least_recently_used(tmp_path):
    for name in "abc":
        save_file({"t": torch.zeros(256)}, str(tmp_path / f"{name}.safetensors"))  # 1 KiB each
    cache = LoraFileCache(budget_bytes=2048)
    for name in "abca":
        cache.load(str(tmp_path / f"{name}.safetensors"))
    assert cache.nbytes == 2048
    cache.load(str(tmp_path / "c.safetensors"))
    assert cache.reads == 4  # a was re-read after eviction; c stayed cached


def test_blocked_in_place_fuse_matches_oracle_and_rolls_back_a_half_written_key(monkeypatch):
    from batch_lora.core import fuse as fuse_module
    monkeypatch.setattr(fuse_module, "BLOCK_ELEMENTS", 64)  # many row blocks per weight
    monkeypatch.setattr(fuse_module, "BLOCK_MIN_ROWS", 1)
    net = Net()
    before = snapshot(net)
    patcher = InPlacePatcher(net)
    stack = stack_of(net, 4)
    patcher.apply(stack)
    for key, terms in stack.items():
        live = net.get_parameter(key).detach()
        assert beyond_one_rounding(live, oracle(before[key], terms), operand_scale(before[key], terms)) == 0, key
    patcher.reset()
    assert_same_bits(snapshot(net), before)
    # NaN only in the last output rows of lin.weight: the first blocks are written before the check fails.
    up = torch.ones(48, 1)
    up[-1, 0] = float("nan")
    bad = stack_of(net, 5)
    bad["lin.weight"] = [(1.0, LoraFactors.from_tensors(up, torch.ones(1, 40), None, "late-nan"))]
    patcher.apply(stack)
    applied = snapshot(net)
    with pytest.raises(FuseError, match="lin.weight"):
        patcher.apply(bad)
    assert_same_bits(snapshot(net), applied)


def test_per_tree_values_are_recomputed_when_a_submodule_is_assigned_anywhere():
    net = Net()
    calls = []
    names = lambda: per_tree(net, "_test_names", lambda m: calls.append(1) or sorted(n for n, _ in m.named_modules()))
    assert names() == ["", "conv", "lin", "pw"] and names() == ["", "conv", "lin", "pw"] and len(calls) == 1
    assert wrappers(net) == []
    compiled = torch.compile(net.pw)  # an OptimizedModule wrapper (nothing is compiled until it runs)
    net.pw = compiled
    assert names() == ["", "conv", "lin", "pw", "pw._orig_mod"] and len(calls) == 2
    assert wrappers(net) == [("torch.compile", compiled)]
