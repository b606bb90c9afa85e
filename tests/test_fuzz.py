"""Property and fuzz tests of core/ with plain torch (no ComfyUI), run in CI.

- Any sequence of applies, stack switches, strength edits, resets, failing applies (shape mismatch, NaN, out of
  memory in the middle of a write) and interrupted applies leaves every weight equal to a fresh fp32 merge of the
  current stack from the base (bit for bit), within one rounding of a float64 oracle, and bit-exactly at the base
  after a reset; a failed or interrupted apply changes no bit.
- Malformed safetensors bytes (truncated, bad header length, bad JSON, offsets past the end, flipped bytes) never
  crash, hang or leak another exception type from ``LoraFileCache.load``: the file loads or ``LoraFileError``
  names it.
"""
import json
import os
import signal
import struct
import tempfile
from contextlib import contextmanager

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import save, save_file

from oracle import beyond_one_rounding, same_bits

from batch_lora.core import (ApplyInterrupted, BaseCache, FuseError, InPlacePatcher, LoraFactors, LoraFileCache,
                             LoraFileError, fused_weight)
from batch_lora.core import engine as engine_module

CI = settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])


class Mixed(torch.nn.Module):
    """Three weight keys in three dtypes: fp16 linear, bf16 3x3 conv (channels_last), fp32 1x1 conv."""

    KEYS = {"lin.weight": (24, 20, None, torch.float16), "conv.weight": (12, 72, (8, 3, 3), torch.bfloat16),
            "pw.weight": (16, 12, (12, 1, 1), torch.float32)}

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.lin = torch.nn.Linear(20, 24).half()
        self.conv = torch.nn.Conv2d(8, 12, 3).to(torch.bfloat16).to(memory_format=torch.channels_last)
        self.pw = torch.nn.Conv2d(12, 16, 1)
        for key in self.KEYS:
            p = self.get_parameter(key)
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)


def pool_factors(key: str, i: int) -> LoraFactors:
    """Factor set ``i`` (0..3) for ``key``: ranks 1..4, fp16 file tensors, alpha = 2*rank or none."""
    out, inner, conv, _ = Mixed.KEYS[key]
    rank = 1 + i
    g = torch.Generator().manual_seed(1000 * i + len(key))
    up, down = torch.randn(out, rank, generator=g) * 0.1, torch.randn(rank, inner, generator=g) * 0.1
    if conv is not None:
        up, down = up.reshape(out, rank, 1, 1), down.reshape(rank, *conv)
    return LoraFactors.from_tensors(up.half(), down.half(), None if i == 3 else 2.0 * rank, f"{key}/{i}")


POOL = {(k, i): pool_factors(k, i) for k in Mixed.KEYS for i in range(4)}
KEYS = sorted(Mixed.KEYS)
STRENGTHS = st.sampled_from([-2.0, -1.0, -0.5, 0.0, 0.3, 0.8, 1.0, 1.7, 4.0])
STACK = st.dictionaries(st.sampled_from(KEYS), st.lists(st.tuples(STRENGTHS, st.integers(0, 3)), max_size=3),
                        max_size=3)
OPS = st.one_of(
    st.tuples(st.just("apply"), STACK),
    st.tuples(st.just("reset"), st.none()),
    st.tuples(st.just("interrupt"), st.tuples(STACK, st.integers(0, 3))),  # should_stop True at poll n
    st.tuples(st.just("fail"), st.tuples(STACK, st.sampled_from(["shape", "nan", "oom"]), st.sampled_from(KEYS))),
)


def terms_of(spec: dict) -> dict:
    return {k: [(s, POOL[(k, i)]) for s, i in terms] for k, terms in spec.items()}


def float64_oracle(base: torch.Tensor, terms) -> tuple[torch.Tensor, torch.Tensor]:
    """``base + sum s * scale * up @ down`` in float64 and the operand magnitudes for the rounding bound."""
    w, mag = base.double().reshape(base.shape[0], -1), base.double().abs().reshape(base.shape[0], -1)
    for s, f in terms:
        w = w + s * f.scale * (f.up.double() @ f.down.double())
        mag = mag + abs(s * f.scale) * (f.up.double().abs() @ f.down.double().abs())
    return w.reshape(base.shape), mag.reshape(base.shape)


def check_state(net: Mixed, base: dict, expected: dict) -> None:
    for key in KEYS:
        live = net.get_parameter(key).detach()
        terms = expected.get(key)
        if not terms:
            assert same_bits(live, base[key]), f"{key} is not at its exact base"
            continue
        fresh = fused_weight(key, base[key].float(), terms, live.dtype)
        assert same_bits(live.contiguous(), fresh), f"{key} differs from a fresh fp32 merge of its stack"
        exact, operands = float64_oracle(base[key], terms)
        assert beyond_one_rounding(live, exact, operands) == 0, key


@CI
@given(mode=st.sampled_from(["fp32", "native"]), ops=st.lists(OPS, min_size=1, max_size=8))
def test_any_sequence_of_apply_switch_reset_failure_and_interrupt_equals_a_fresh_merge(mode, ops):
    net = Mixed()
    base = {k: net.get_parameter(k).detach().clone() for k in KEYS}
    ptrs = {k: net.get_parameter(k).data_ptr() for k in KEYS}
    patcher = InPlacePatcher(net, BaseCache(dtype=mode))
    expected: dict = {}
    for op, arg in ops:
        before = {k: net.get_parameter(k).detach().clone() for k in KEYS}
        if op == "apply":
            expected = terms_of(arg)
            patcher.apply(expected)
        elif op == "reset":
            expected = {}
            patcher.reset()
        elif op == "interrupt":
            spec, at = arg
            polls = iter(range(100))
            try:
                patcher.apply(terms_of(spec), should_stop=lambda: next(polls) >= at)
                expected = terms_of(spec)  # fewer keys to write than polls before the stop: it completed
            except ApplyInterrupted:
                pass
        else:
            spec, how, bad_key = arg
            stack = terms_of(spec)
            out, inner, _, _ = Mixed.KEYS[bad_key]
            if how == "shape":
                stack[bad_key] = stack.get(bad_key, []) + [(1.0, LoraFactors.from_tensors(
                    torch.ones(out, 1), torch.ones(1, inner + 1), None, "wrong-shape"))]
            elif how == "nan":
                up = torch.ones(out, 1)
                up[-1] = float("nan")
                stack[bad_key] = stack.get(bad_key, []) + [(1.0, LoraFactors.from_tensors(
                    up, torch.ones(1, inner), None, "late-nan"))]
            else:  # a fresh token: never applied before, so the key is always written
                f = POOL[(bad_key, 0)]
                stack[bad_key] = stack.get(bad_key, []) + [(1.0, LoraFactors(f.up, f.down, f.scale, "oom"))]
            with oom_once(bad_key if how == "oom" else None):
                with pytest.raises((FuseError, torch.OutOfMemoryError)):
                    patcher.apply(stack)
            for k in KEYS:
                assert same_bits(net.get_parameter(k).detach(), before[k]), f"{op}/{how} changed {k}"
        check_state(net, base, expected)
        assert {k: net.get_parameter(k).data_ptr() for k in KEYS} == ptrs
    patcher.reset()
    check_state(net, base, {})


@contextmanager
def oom_once(key):
    """Within the block, the engine's in-place fuse of ``key`` writes part of the weight and then raises
    torch.OutOfMemoryError, once (as a CUDA allocation failing in the middle of a bake would); the rollback's
    own writes then succeed."""
    real = engine_module.fuse_into
    fired = []

    def fuse_into(k, param, base, terms, check=True):
        if k == key and not fired:
            fired.append(k)
            param.data[: param.shape[0] // 2].fill_(1.0)  # a partial write
            raise torch.OutOfMemoryError(f"simulated: out of memory while baking {k}")
        return real(k, param, base, terms, check)

    engine_module.fuse_into = fuse_into
    try:
        yield
    finally:
        engine_module.fuse_into = real


def test_out_of_memory_in_the_middle_of_a_write_rolls_back():
    net = Mixed()
    patcher = InPlacePatcher(net)
    previous = terms_of({"lin.weight": [(0.8, 1)], "pw.weight": [(1.0, 2)]})
    patcher.apply(previous)
    before = {k: net.get_parameter(k).detach().clone() for k in KEYS}
    stack = terms_of({k: [(1.0, 0), (-0.5, 3)] for k in KEYS})
    with oom_once(KEYS[-1]):  # the last key in write order fails after the others were written
        with pytest.raises(torch.OutOfMemoryError):
            patcher.apply(stack)
    assert all(same_bits(net.get_parameter(k).detach(), before[k]) for k in KEYS)
    assert patcher.counters.rollbacks == 1 and patcher.applied_keys == set(previous)
    patcher.apply(stack)  # and the engine still works: the full stack lands exactly
    for key, terms in stack.items():
        assert same_bits(net.get_parameter(key).detach().contiguous(),
                         fused_weight(key, patcher.cache.get(key).float(), terms, before[key].dtype))


# ---- file loading

def valid_bytes() -> bytes:
    return save({"m.lora_up.weight": torch.randn(4, 2).half(), "m.lora_down.weight": torch.randn(2, 6),
                 "m.alpha": torch.tensor(2.0)})


@contextmanager
def time_limit(seconds: float):
    """Fail (instead of hanging) if the block runs longer than ``seconds``."""
    def fire(signum, frame):
        raise AssertionError(f"LoraFileCache.load did not return within {seconds} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def load_bytes(data: bytes, name="fuzz.safetensors"):
    """Write ``data`` to a temporary file and load it with a fresh ``LoraFileCache``: the tensors, or the
    ``LoraFileError``; any other exception propagates (and fails the test)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, name)
        with open(path, "wb") as f:
            f.write(data)
        with time_limit(10.0):
            try:
                return LoraFileCache().load(path)
            except LoraFileError as exc:
                assert name in str(exc)
                return exc


def with_header(header, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


@pytest.mark.parametrize("data, why", [
    (b"", "empty file"),
    (b"hello", "shorter than the header length"),
    (b"this is a text file, not safetensors at all\n", "text"),
    (with_header(b"{}", length=2**62), "header length past the end"),
    (with_header(b"{}", length=200 * 2**20), "header length over safetensors' limit"),
    (with_header(b"{not json"), "bad JSON"),
    (with_header(b"[1, 2, 3]"), "JSON that is not an object"),
    (with_header({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8), "offsets past the end"),
    (with_header({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8), "shape vs offsets"),
    (with_header({"t": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}, b"\0" * 8),
     "shape overflows"),
    (with_header({"t": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "unknown dtype"),
    (valid_bytes()[:-5], "truncated"),
])
def test_malformed_safetensors_raise_lora_file_error(data, why):
    result = load_bytes(data, "bad.safetensors")
    assert isinstance(result, LoraFileError), why
    assert "bad.safetensors" in str(result) and "re-download or re-export" in str(result)


def test_non_finite_tensors_are_named():
    for value in (float("nan"), float("inf"), -float("inf")):
        result = load_bytes(save({"ok": torch.ones(2), "x.lora_up.weight": torch.tensor([[1.0, value]]).half()}))
        assert isinstance(result, LoraFileError) and "x.lora_up.weight" in str(result) and "NaN/Inf" in str(result)


MUTATION = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 400)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, 400), st.integers(1, 255)), min_size=1,
                                        max_size=4)),
    st.tuples(st.just("length"), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("header"), st.dictionaries(
        st.text(min_size=1, max_size=8),
        st.one_of(st.fixed_dictionaries({
            "dtype": st.sampled_from(["F16", "F32", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "X"]),
            "shape": st.lists(st.integers(-2, 2**33), max_size=3),
            "data_offsets": st.lists(st.integers(-1, 2**33), min_size=0, max_size=3)}),
            st.text(max_size=5), st.integers(), st.none()), max_size=3)),
    st.tuples(st.just("bytes"), st.binary(max_size=200)),
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(MUTATION)
def test_fuzzed_safetensors_load_or_raise_lora_file_error(mutation):
    kind, arg = mutation
    data = bytearray(valid_bytes())
    if kind == "truncate":
        data = data[:arg]
    elif kind == "flip":
        for pos, xor in arg:
            if pos < len(data):
                data[pos] ^= xor
    elif kind == "length":
        data[:8] = struct.pack("<Q", arg)
    elif kind == "append":
        data += arg
    elif kind == "header":
        data = bytearray(with_header(arg, b"\0" * 64))
    else:
        data = bytearray(arg)
    result = load_bytes(bytes(data))
    if not isinstance(result, LoraFileError):
        assert isinstance(result, dict) and all(isinstance(t, torch.Tensor) for t in result.values())


def test_valid_file_round_trips(tmp_path):
    path = tmp_path / "ok.safetensors"
    tensors = {"a.lora_up.weight": torch.randn(3, 2).half(), "a.lora_down.weight": torch.randn(2, 5)}
    save_file(tensors, str(path))
    loaded = LoraFileCache().load(str(path))
    assert set(loaded) == set(tensors) and all(same_bits(loaded[k], tensors[k]) for k in tensors)
