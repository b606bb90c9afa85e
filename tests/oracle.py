"""Shared test oracle: how far a rounded merge may sit from the exact (float64) value."""
import torch

MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23, torch.float8_e4m3fn: 3,
                 torch.float8_e5m2: 2}


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` numbers at ``|x|`` (float64), including the fixed spacing of subnormals."""
    min_exp = torch.log2(torch.tensor(torch.finfo(dtype).tiny, dtype=torch.float64))
    exp = torch.maximum(torch.floor(torch.log2(x.double().abs().clamp_min(1e-300))), min_exp)
    return torch.pow(2.0, exp - MANTISSA_BITS[dtype])


def quant_step(q: torch.Tensor, scale) -> torch.Tensor:
    """The quantization step (float64) at each stored value of a quantized weight ``q`` (fp8 or int8 storage)
    whose values mean ``q * scale``: the fp8 ulp at ``|q|`` (subnormals' fixed spacing included), 1 for int8."""
    if q.dtype == torch.int8:
        return torch.ones(q.shape, dtype=torch.float64) * scale
    return ulp(q.double(), q.dtype) * scale


def beyond_one_rounding(result: torch.Tensor, exact: torch.Tensor, operands: torch.Tensor) -> int:
    """Count elements of ``result`` further from ``exact`` than one rounding to ``result.dtype`` (half an ulp)
    plus the fp32 accumulation error of the operands (``operands`` = |base| + sum |s*scale| |up| @ |down|)."""
    bound = ulp(exact, result.dtype) / 2 + 64 * 2.0 ** -24 * operands.double()
    return int(((result.double() - exact.double()).abs() > bound).sum())


def beyond_one_step(a: torch.Tensor, b: torch.Tensor, operands: torch.Tensor) -> int:
    """Count elements where two results of the same merge (other summation order) differ by more than one
    rounding step of their dtype at ``b`` plus the fp32 accumulation error of the operands."""
    bound = ulp(b, a.dtype) + 64 * 2.0 ** -24 * operands.double()
    return int(((a.double() - b.double()).abs() > bound).sum())


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical: same dtype, shape and bytes (NaN payloads included, unlike ``torch.equal``)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
