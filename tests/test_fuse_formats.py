"""core.fuse factor sets beyond plain LoRA (LoHa, LoKr, diff, DoRA) with plain torch: the row-blocked in-place
merge against a dense float64 evaluation of each format's definition (see tests/test_formats.py for the sources),
across many row blocks (the DoRA input-channel norm sums over blocks), and shape errors naming the key."""
import dataclasses

import pytest
import torch

from oracle import beyond_one_rounding

import batch_lora.core.fuse as fuse
from batch_lora.core import (DiffFactors, DoraFactors, FuseError, LoraFactors, LohaFactors, LokrFactors, fuse_into,
                             fused_weight)

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
