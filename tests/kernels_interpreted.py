"""Chapter 6 kernels under Triton's interpreter; run by tests/test_06_kernels.py in a child process with TRITON_INTERPRET=1."""
import math
import os

import pytest
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_06_kernels.py (needs TRITON_INTERPRET=1 before Triton imports)"
from course_lib.kernels import decode_attention, quantize_store, quantize_store_mx


def float64_quantize(x: torch.Tensor, bits: int):
    "Per-row asymmetric min-max codes computed in float64, statistics rounded to float16 as the scheme stores them."
    x = x.double()
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale, zero = ((hi - lo) / (2**bits - 1)).half().double(), lo.half().double()
    codes = torch.where(scale > 0, torch.floor((x - zero) / torch.where(scale > 0, scale, 1.0) + 0.5), 0.0).clamp(0, 2**bits - 1)
    return codes, scale, zero


def float64_quantize_zero_point(x: torch.Tensor, bits: int):
    "Per-row codes with an integer zero point, x = (q - zp) * scale, in float64: the range stretched to hold 0, scale rounded to float16."
    x = x.double()
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / (2**bits - 1)).half().double()
    zp = torch.floor(-lo / scale + 0.5).clamp(0, 2**bits - 1)
    return (torch.floor(x / scale + 0.5) + zp).clamp(0, 2**bits - 1), scale, zp


def float64_quantize_mx(x: torch.Tensor, bits: int, block: int):
    "OCP MX in float64 with log2: per block, E8M0 = floor(log2 max|x|) + 127, step 2^(E - 127 - (bits - 2)), codes + 2^(bits-1)."
    g = x.double().reshape(*x.shape[:-1], -1, block)
    exps = torch.floor(torch.log2(g.abs().amax(-1))) + 127                   # (..., nb)
    step = torch.pow(2.0, exps - 127 - (bits - 2))[..., None]
    codes = torch.floor(g / step + 0.5).clamp(-2**(bits - 1), 2**(bits - 1) - 1) + 2**(bits - 1)
    return codes.reshape(x.shape), exps, step


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    "Split-halves layout written out: byte j's bit-field i is element j + i*p."
    fields = [((packed.long() >> (bits * i)) & (2**bits - 1)) for i in range(8 // bits)]
    return torch.cat(fields, dim=-1)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("shape,start", [((1, 1, 1, 8), 0), ((2, 3, 5, 24), 2), ((3, 2, 7, 40), 4)])
def test_quantize_store_kernel_matches_float64(bits, shape, start):
    torch.manual_seed(bits + start)
    b, h, t, d = shape
    x = (torch.randn(b, t, h, d) * 3).transpose(1, 2)                 # strided, like a projected key
    L = start + t + 2
    codes = torch.full((b, h, L, d * bits // 8), 0xAB, dtype=torch.uint8)     # poisoned
    scale = torch.full((b, h, L), float("nan"), dtype=torch.float16)
    zero = torch.full((b, h, L), float("nan"), dtype=torch.float16)
    quantize_store(x, codes, scale, zero, start, bits, backend="triton")
    want_codes, want_scale, want_zero = float64_quantize(x, bits)
    got = unpack(codes[:, :, start:start + t], bits)
    assert (got != want_codes.long()).float().mean() <= 0.002          # a rounding tie may land either side
    assert torch.equal(scale[:, :, start:start + t].double(), want_scale[..., 0])
    assert torch.equal(zero[:, :, start:start + t].double(), want_zero[..., 0])
    assert (codes[:, :, :start] == 0xAB).all() and (codes[:, :, start + t:] == 0xAB).all()   # nothing else written
    deq = got.double() * want_scale + want_zero
    assert ((deq - x.double()).abs() <= want_scale / 2 + 2e-3 * x.abs().amax()).all()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape,start", [((1, 1, 1, 16), 0), ((2, 3, 5, 24), 2), ((1, 2, 3, 40), 1)])
def test_zero_point_store_kernel_matches_float64(bits, shape, start):
    torch.manual_seed(bits + start)
    b, h, t, d = shape
    x = (torch.randn(b, t, h, d) * 3 + torch.tensor([0.0, 4.0, -4.0])[:h, None]).transpose(1, 2)   # a head all positive, one all negative
    L = start + t + 2
    codes = torch.full((b, h, L, d * bits // 8), 0xAB, dtype=torch.uint8)     # poisoned
    scale = torch.full((b, h, L), float("nan"), dtype=torch.float16)
    zp = torch.full((b, h, L), 0xAB, dtype=torch.uint8)
    quantize_store(x, codes, scale, zp, start, bits, backend="triton", scheme="zp")
    want_codes, want_scale, want_zp = float64_quantize_zero_point(x, bits)
    got = unpack(codes[:, :, start:start + t], bits)
    assert (got != want_codes.long()).float().mean() <= 0.002          # a rounding tie may land either side
    assert torch.equal(scale[:, :, start:start + t].double(), want_scale[..., 0])
    assert torch.equal(zp[:, :, start:start + t].double(), want_zp[..., 0])
    assert (zp[:, :, :start] == 0xAB).all() and (zp[:, :, start + t:] == 0xAB).all() and (codes[:, :, start + t:] == 0xAB).all()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape,start", [((1, 1, 1, 16), 0), ((2, 3, 5, 24), 2), ((1, 2, 3, 96), 1)])
def test_mx_store_kernel_matches_float64(bits, shape, start):
    torch.manual_seed(bits + start)
    b, h, t, d = shape
    block = min(32, d)                                                  # d=96: three blocks (padded to four lanes in the kernel)
    x = (torch.randn(b, t, h, d) * torch.logspace(-2, 2, d)).transpose(1, 2)   # blocks of very different magnitude, strided
    L = start + t + 2
    codes = torch.full((b, h, L, d * bits // 8), 0xAB, dtype=torch.uint8)     # poisoned
    exps = torch.full((b, h, L, d // block), 0xAB, dtype=torch.uint8)
    quantize_store_mx(x, codes, exps, start, bits, backend="triton")
    want_codes, want_exps, step = float64_quantize_mx(x, bits, block)
    got = unpack(codes[:, :, start:start + t], bits)
    assert (got != want_codes.long()).float().mean() <= 0.002          # a rounding tie may land either side
    assert torch.equal(exps[:, :, start:start + t].double(), want_exps)
    assert (exps[:, :, :start] == 0xAB).all() and (exps[:, :, start + t:] == 0xAB).all() and (codes[:, :, start + t:] == 0xAB).all()
    deq = ((got.double() - 2**(bits - 1)).reshape(step.shape[:-1] + (-1,)) * step).reshape(x.shape)
    assert ((deq - x.double()).abs().reshape(step.shape[:-1] + (-1,)) <= step).all()   # half a step, one where the top code clips


def float64_planes(x: torch.Tensor, bits: int, scheme: str):
    "A cache's planes from the torch path and the values they hold, dequantised by hand in float64."
    b, h_kv, L, d = x.shape
    codes = torch.zeros(b, h_kv, L, d * bits // 8, dtype=torch.uint8)
    if scheme == "mx":
        exps = torch.zeros(b, h_kv, L, d // min(32, d), dtype=torch.uint8)
        quantize_store_mx(x, codes, exps, 0, bits, backend="torch")
        step = torch.pow(2.0, exps.double() - 127 - (bits - 2)).repeat_interleave(min(32, d), -1)
        return (codes, exps), (unpack(codes, bits).double() - 2**(bits - 1)) * step
    scale = torch.zeros(b, h_kv, L, dtype=torch.float16)
    zero = torch.zeros(b, h_kv, L, dtype=torch.float16 if scheme == "int" else torch.uint8)
    quantize_store(x, codes, scale, zero, 0, bits, backend="torch", scheme=scheme)
    s, z = scale.double()[..., None], zero.double()[..., None]
    return (codes, scale, zero), unpack(codes, bits).double() * s + z if scheme == "int" else (unpack(codes, bits).double() - z) * s


@pytest.mark.parametrize("scheme,bits", [("int", 8), ("int", 4), ("zp", 4), ("mx", 8), ("mx", 4)])
@pytest.mark.parametrize("b,h,h_kv,S,d,splits", [(1, 1, 1, 1, 16, 1), (2, 5, 1, 37, 32, 4), (1, 4, 2, 19, 8, 3), (1, 2, 1, 13, 64, 2)])
def test_decode_attention_kernel_matches_float64(scheme, bits, b, h, h_kv, S, d, splits):
    torch.manual_seed(S)
    L = S + 3
    (k_planes, k), (v_planes, v) = (float64_planes(torch.randn(b, h_kv, L, d), bits, scheme) for _ in range(2))   # keys, values
    planes = [k_planes, v_planes]
    q = torch.randn(b, h, d)
    valid = torch.ones(b, L, dtype=torch.bool)
    if b > 1: valid[1, :5] = False
    rep = h // h_kv
    kk, vv = k[:, :, :S].repeat_interleave(rep, 1), v[:, :, :S].repeat_interleave(rep, 1)
    scores = torch.einsum("bhd,bhsd->bhs", q.double(), kk) / math.sqrt(d)
    scores = scores.masked_fill(~valid[:, None, :S], float("-inf"))
    want = torch.einsum("bhs,bhsd->bhd", scores.softmax(-1), vv)
    got = decode_attention(q, planes[0], planes[1], S, bits, valid=valid, n_splits=splits, backend="triton", scheme=scheme)
    assert got.shape == (b, h, d) and torch.isfinite(got).all()
    assert ((got.double() - want).norm() / want.norm()).item() <= 1e-3


@pytest.mark.parametrize("m,n,k,group,symmetric", [(1, 1, 32, 32, False), (7, 45, 96, 32, False), (5, 33, 64, 64, True), (3, 17, 128, 128, False)])
def test_int4_matmul_kernel_matches_float64(m, n, k, group, symmetric):
    from course_lib.kernels import int4_matmul
    from course_lib.quant import quantize_groupwise
    torch.manual_seed(m * n)
    x, w = torch.randn(m, k), torch.randn(n, k)
    q = quantize_groupwise(w, bits=4, group_size=group, symmetric=symmetric)
    # dequantised by hand in float64 from the documented layout (even column = low nibble)
    codes = torch.stack([q.data & 0xF, q.data >> 4], dim=-1).reshape(n, k).double()
    zero = q.zero.double() if q.zero is not None else torch.full_like(q.scale, 8, dtype=torch.float64)
    w_deq = (codes - zero.repeat_interleave(group, 1)) * q.scale.double().repeat_interleave(group, 1)
    want = x.double() @ w_deq.T
    y = torch.full((m, n), float("nan"))                                 # poisoned: the kernel must write every element
    got = int4_matmul(x, q, backend="triton", out=y)
    assert got.shape == (m, n) and torch.isfinite(got).all()
    assert ((got.double() - want).norm() / want.norm()).item() <= 1e-3
