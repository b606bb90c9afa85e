"""core.fuse factor sets beyond plain LoRA (LoHa, LoKr, diff, DoRA, slices of fused weights) with plain torch: the
row-blocked in-place merge against a dense float64 evaluation of each format's definition (see tests/test_formats.py for the sources),
across many row blocks (the DoRA input-channel norm sums over blocks), and shape errors naming the key."""
import dataclasses

import pytest
import torch

from oracle import beyond_one_rounding

import batch_lora.core.fuse as fuse
from batch_lora.core import (DiffFactors, DoraFactors, FuseError, LoraFactors, LohaFactors, LokrFactors,
                             SliceFactors, fuse_into, fused_weight)

OUT, IN, K = 24, 6, 3  # conv weight [24, 6, 3, 3]
SHAPE = (OUT, IN, K, K)
EPS = torch.finfo(torch.float32).eps


def rnd(*shape, seed, std=0.3):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std


def dense(f) -> torch.Tensor:
    """float64 delta of one factor set at strength 1, straight from its definition, shape SHAPE."""
    d = lambda t: t.double()  # noqa: E731
    if isinstance(f, LoraFactors):
        return (f.scale * d(f.up) @ d(f.down)).reshape(SHAPE)
    if isinstance(f, LohaFactors):
        def part(a, b, t):
            if t is None:
                return (d(a) @ d(b)).reshape(SHAPE)
            return torch.stack([torch.stack([d(a).T @ d(t)[:, :, y, x] @ d(b) for x in range(K)], -1)
                                for y in range(K)], -2)
        return f.scale * part(f.w1_a, f.w1_b, f.t1) * part(f.w2_a, f.w2_b, f.t2)
    if isinstance(f, LokrFactors):
        w1 = d(f.w1) if f.w1 is not None else d(f.w1_a) @ d(f.w1_b)
        w2 = d(f.w2) if f.w2 is not None else (d(f.w2_a) @ d(f.w2_b)).reshape(f.w2_a.shape[0], -1, K, K)
        return f.scale * torch.kron(w1[:, :, None, None], w2).reshape(SHAPE)
    return d(f.diff)


FACTORS = {
    "loha": LohaFactors(rnd(OUT, 2, seed=1), rnd(2, IN * 9, seed=2), rnd(OUT, 2, seed=3), rnd(2, IN * 9, seed=4),
                        None, None, 0.5, "loha"),
    "loha-tucker": LohaFactors(rnd(2, OUT, seed=5), rnd(2, IN, seed=6), rnd(2, OUT, seed=7), rnd(2, IN, seed=8),
                               rnd(2, 2, K, K, seed=9), rnd(2, 2, K, K, seed=10), 1.5, "loha-t"),
    "lokr-full": LokrFactors(rnd(4, 2, seed=11), None, None, rnd(6, 3, K, K, seed=12), None, None, None, 1.0, "k1"),
    "lokr-ab": LokrFactors(None, rnd(4, 1, seed=13), rnd(1, 2, seed=14), None, rnd(6, 2, seed=15),
                           rnd(2, 3 * 9, seed=16), None, 0.75, "k2"),
    "diff": DiffFactors(rnd(*SHAPE, seed=17, std=0.05), "diff"),
}
FACTORS["dora-in"] = DoraFactors(LoraFactors.from_tensors(rnd(OUT, 2, 1, 1, seed=18), rnd(2, IN, K, K, seed=19),
                                                          1.0, "l"), rnd(1, IN, 1, 1, seed=20).abs() + 1, "dora-in")
FACTORS["dora-out"] = DoraFactors(FACTORS["loha"], rnd(OUT, 1, 1, 1, seed=21).abs() + 1, "dora-out")


def reference(base, terms):
    w, mag = base.double().clone(), base.double().abs().clone()
    for s, f in terms:
        if isinstance(f, DoraFactors):
            v = base.double() + dense(f.inner)
            m = f.magnitude.double()
            axis = (1, 2, 3) if m.shape[0] == OUT else (0, 2, 3)
            factor = m / (v.pow(2).sum(axis, keepdim=True).sqrt() + EPS)
            delta, dmag = v * factor - base.double(), (v.abs() * factor.abs() + base.double().abs()) * 4
        else:
            delta, dmag = dense(f), dense(f).abs() * 4
        w += s * delta
        mag += abs(s) * dmag
    return w, mag


@pytest.mark.parametrize("names", [[n] for n in FACTORS] + [list(FACTORS)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_row_blocked_fuse_matches_float64_definition(monkeypatch, names, dtype):
    monkeypatch.setattr(fuse, "BLOCK_ELEMENTS", 2 * IN * K * K)  # 2 rows per block: 12 blocks
    monkeypatch.setattr(fuse, "BLOCK_MIN_ROWS", 1)
    base = rnd(*SHAPE, seed=0).to(dtype)
    terms = [(0.7 - 0.3 * i, FACTORS[n]) for i, n in enumerate(names)]
    lora = LoraFactors.from_tensors(rnd(OUT, 3, seed=30), rnd(3, IN * 9, seed=31), 2.0, "plain")
    terms.append((1.1, lora))  # batched LoRA matmul first, dense terms added after
    param = torch.nn.Parameter(base.clone(), requires_grad=False)
    fuse_into("k.weight", param, base.float(), terms)
    expected, mag = reference(base, [(s, f) for s, f in terms if f is not lora])
    expected += 1.1 * lora.scale * (lora.up.double() @ lora.down.double()).reshape(SHAPE)
    mag += 1.1 * lora.scale * (lora.up.double().abs() @ lora.down.double().abs()).reshape(SHAPE)
    assert beyond_one_rounding(param.data, expected, mag) == 0
    assert beyond_one_rounding(fused_weight("k.weight", base.float(), terms, dtype), expected, mag) == 0
    assert not torch.equal(param.data, base)


def test_shape_errors_name_the_key_and_never_the_token():
    """The key and the shapes; never the factors' internal token (in the pack it holds a server path)."""
    base = torch.zeros(SHAPE)
    loha = FACTORS["loha-tucker"]
    half = LokrFactors(None, None, None, FACTORS["lokr-full"].w2, None, None, None, 1.0, "only-w2")
    bad = DoraFactors(FACTORS["loha"], torch.ones(1, 5), "bad-dora")
    cases = [
        (torch.zeros(12, IN, K, K), FACTORS["lokr-full"],
         r"k\.weight: LokrFactors has kron\(w1, w2\) of shape \(24, 54\).*\(12, 6, 3, 3\)"),
        (torch.zeros(OUT, IN, 1, 1), FACTORS["diff"], r"k\.weight: diff has shape"),
        (base, bad, r"k\.weight: DoRA has dora_scale \(1, 5\)"),
        (torch.zeros(OUT, IN, 1, 1), loha, r"k\.weight: LoHa has hada factors \(2, 24\) / \(2, 6\) / core"),
        (base, half, r"k\.weight: LoKr has neither lokr_w1 nor both"),
    ]
    for weight, factors, pattern in cases:
        factors = dataclasses.replace(factors, token="/srv/private/models/loras/x.safetensors@123:456#k.weight")
        with pytest.raises(FuseError, match=pattern) as info:
            fused_weight("k.weight", weight, [(1.0, factors)], torch.float32)
        assert "/srv/private" not in str(info.value)


H = 8  # a Flux-like single_blocks.N.linear1 weight: q, k, v (H rows each), then the MLP (4H rows), [7H, H]
LINEAR1 = (7 * H, H)


def _slice_oracle(base, terms):
    """float64 ``base + sum s * delta`` for 2-D ``SliceFactors``/whole terms, each slice's delta padded with 0;
    and the operand magnitudes for ``beyond_one_rounding``."""
    w, mag = base.double().clone(), base.double().abs().clone()
    for s, f in terms:
        lo, inner = (f.start, f.inner) if isinstance(f, SliceFactors) else (0, f)
        rows = slice(lo, lo + inner.rows_cols[0])
        w0 = base.double()[rows]
        if isinstance(inner, DoraFactors):
            v = w0 + inner.inner.scale * inner.inner.up.double() @ inner.inner.down.double()
            factor = inner.magnitude.double().reshape(-1, 1) / (v.norm(dim=1, keepdim=True) + EPS)
            delta, dmag = v * factor - w0, (v.abs() * factor.abs() + w0.abs()) * 4
        elif isinstance(inner, LohaFactors):
            delta = (inner.scale * (inner.w1_a.double() @ inner.w1_b.double())
                     * (inner.w2_a.double() @ inner.w2_b.double()))
            dmag = delta.abs() * 4
        elif isinstance(inner, DiffFactors):
            delta, dmag = inner.diff.double(), inner.diff.double().abs()
        else:
            delta = inner.scale * inner.up.double() @ inner.down.double()
            dmag = abs(inner.scale) * inner.up.double().abs() @ inner.down.double().abs()
        w[rows] += s * delta
        mag[rows] += abs(s) * dmag
    return w, mag


def _lora(out, rank, seed, alpha=None):
    return LoraFactors.from_tensors(rnd(out, rank, seed=seed), rnd(rank, H, seed=seed + 1), alpha, f"lora{seed}")


@pytest.mark.parametrize("rows_per_block", [3, 7 * H])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_slices_of_a_fused_weight_match_float64_and_leave_other_rows_alone(monkeypatch, rows_per_block, dtype):
    """diffusers-layout q/k/v LoRAs on slices of one fused weight, two files on the same slices, a whole-weight
    LoRA, DoRA / LoHa / diff on slices: one pass (blocks of 3 rows cut across the slice boundaries), equal to the
    float64 oracle within one rounding, ``fuse_into`` == ``fused_weight`` bit for bit, and rows no term touches
    keep the base's bits."""
    monkeypatch.setattr(fuse, "BLOCK_ELEMENTS", rows_per_block * H)
    monkeypatch.setattr(fuse, "BLOCK_MIN_ROWS", 1)
    q, k, v = (SliceFactors(_lora(H, 2, 40 + 2 * i, 1.0), i * H, H, f"a#{i}") for i in range(3))
    q2, v2 = SliceFactors(_lora(H, 3, 50), 0, H, "b#q"), SliceFactors(_lora(H, 3, 52, 6.0), 2 * H, H, "b#v")
    dora = SliceFactors(DoraFactors(_lora(H, 2, 54), rnd(H, 1, seed=56).abs() + 1, "dora"), H, H, "c#k")
    loha = SliceFactors(LohaFactors(rnd(4 * H, 2, seed=57), rnd(2, H, seed=58), rnd(4 * H, 2, seed=59),
                                    rnd(2, H, seed=60), None, None, 0.5, "loha"), 3 * H, 4 * H, "d#mlp")
    diff = SliceFactors(DiffFactors(rnd(2, H, seed=61, std=0.05), "diff"), 5, 2, "e#rows5-6")
    whole = _lora(7 * H, 4, 62, 2.0)
    base = rnd(*LINEAR1, seed=63).to(dtype)
    for terms in ([(0.8, q), (0.8, k), (0.8, v)],  # one ai-toolkit file: the MLP rows untouched
                  [(0.8, q), (0.8, k), (0.8, v), (-0.6, q2), (-0.6, v2), (1.1, whole), (0.7, dora), (1.3, loha),
                   (-0.9, diff)]):
        param = torch.nn.Parameter(base.clone(), requires_grad=False)
        fuse_into("single_blocks.0.linear1.weight", param, base.float(), terms)
        expected, mag = _slice_oracle(base, terms)
        assert beyond_one_rounding(param.data, expected, mag) == 0
        out = fused_weight("single_blocks.0.linear1.weight", base.float(), terms, dtype)
        assert torch.equal(out.view(torch.int16), param.data.view(torch.int16))
        touched = torch.zeros(7 * H, dtype=torch.bool)
        for _, f in terms:
            touched[slice(f.start, f.start + f.length) if isinstance(f, SliceFactors) else slice(None)] = True
        assert touched.any() and not torch.equal(param.data[touched], base[touched])
        assert torch.equal(param.data[~touched].view(torch.int16), base[~touched].view(torch.int16))


def test_slice_errors_name_the_key():
    base = torch.zeros(LINEAR1)
    with pytest.raises(FuseError, match=r"k\.weight: a patch of rows 50:58 does not fit the model weight \(56, 8\)"):
        fused_weight("k.weight", base, [(1.0, SliceFactors(_lora(H, 2, 70), 50, H, "x"))], torch.float32)
    with pytest.raises(FuseError, match=r"k\.weight: LoraFactors has up \(16, 2\).*\(8, 8\)"):
        fused_weight("k.weight", base, [(1.0, SliceFactors(_lora(2 * H, 2, 72), 0, H, "x"))], torch.float32)
