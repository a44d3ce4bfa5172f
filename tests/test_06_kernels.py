"""Chapter 6 kernels: reference paths here; the Triton kernels in a child process under TRITON_INTERPRET=1 (CPU)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from course_lib.kernels import (decode_attention, dequantize_mx, int4_matmul, mx_block, pack_bits, quantize_asym, quantize_mx,
                                quantize_store_mx, quantize_zp, unpack_bits)

REPO = Path(__file__).resolve().parents[1]


def test_triton_kernels_under_the_interpreter():
    import triton  # noqa: F401  (required: the [kernels] extra)
    env = os.environ | {"TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0",
                          str(REPO / "tests" / "kernels_interpreted.py")], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_pack_layout_by_hand():
    codes = torch.tensor([1, 2, 3, 0, 3, 1, 2, 3])                       # 2-bit, 4 per byte: byte j = c[j] | c[j+2]<<2 | c[j+4]<<4 | c[j+6]<<6
    assert pack_bits(codes, 2).tolist() == [1 | 3 << 2 | 3 << 4 | 2 << 6, 2 | 0 << 2 | 1 << 4 | 3 << 6]
    for bits in (2, 4, 8):
        c = torch.randint(0, 2**bits, (3, 16))
        assert torch.equal(unpack_bits(pack_bits(c, bits), bits), c.to(torch.uint8))
    with pytest.raises(ValueError, match="unsupported bit-width 3"):
        pack_bits(codes, 3)


def test_quantize_asym_error_is_at_most_half_a_step():
    x = torch.randn(50, 64, dtype=torch.float64) * 4
    for bits in (8, 4, 2):
        c, s, z = quantize_asym(x, bits)
        deq = c.double() * s.double() + z.double()
        assert ((deq - x).abs() <= s.double() / 2 + 1e-2).all()
    c, s, z = quantize_asym(torch.full((2, 8), 1.5), 4)                  # a constant row: scale 0, exact
    assert (s == 0).all() and torch.equal(c.double() * s.double() + z.double(), torch.full((2, 8), 1.5, dtype=torch.float64))


def test_quantize_mx_by_hand_and_against_float64():
    x = torch.tensor([[3.0, -1.0, 0.3, 2.9, 0.01, -0.02, 0.0, 0.015]])  # two blocks of 4: max |x| 3 and 0.02
    codes, exps = quantize_mx(x, 8, block=4)
    assert exps.tolist() == [[128, 121]]                                 # floor(log2 3) = 1, floor(log2 0.02) = -6; + 127
    # 8-bit: step 2^(1-6) = 1/32 and 2^(-6-6) = 1/4096; 0.3*32 = 9.6 -> 10, 2.9*32 = 92.8 -> 93; 0.015*4096 = 61.44 -> 61
    assert (codes.int() - 128).tolist() == [[96, -32, 10, 93, 41, -82, 0, 61]]
    torch.manual_seed(0)
    x = torch.randn(3, 5, 96, dtype=torch.float64) * torch.logspace(-3, 3, 96, dtype=torch.float64)
    for bits in (8, 4):
        codes, exps = quantize_mx(x, bits, block=32)
        g = x.reshape(3, 5, 3, 32)
        step = 2.0 ** (torch.floor(torch.log2(g.abs().amax(-1, keepdim=True))) - (bits - 2))   # OCP's rule, with a logarithm
        want = (torch.floor(g / step + 0.5).clamp(-2**(bits - 1), 2**(bits - 1) - 1) * step).reshape(x.shape)
        assert torch.equal(dequantize_mx(codes, exps, bits, torch.float64), want.float().double())
    with pytest.raises(ValueError, match="supports 8 and 4 bits, got 2"):
        quantize_mx(x, 2, block=32)
    with pytest.raises(ValueError, match="not a multiple of the MX block of 32"):
        mx_block(40)
    assert mx_block(16) == 16 and mx_block(96) == 32                     # a head shorter than 32 is one block
    with pytest.raises(ValueError, match="do not match codes"):
        quantize_store_mx(torch.zeros(1, 1, 1, 64), torch.zeros(1, 1, 2, 64, dtype=torch.uint8), torch.zeros(1, 1, 2, 1, dtype=torch.uint8),
                          0, 8, backend="torch")


def test_quantize_zp_against_float64():
    torch.manual_seed(1)
    x = torch.cat([torch.randn(40, 32) * 3, torch.rand(10, 32) + 2.0]).double()   # 10 rows all positive: the range reaches down to 0
    for bits in (8, 4):
        codes, scale, zp = quantize_zp(x, bits)
        lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
        s = ((hi - lo) / (2**bits - 1)).half().double()
        z = torch.floor(-lo / s + 0.5).clamp(0, 2**bits - 1)
        assert torch.equal(scale.double(), s) and torch.equal(zp.double(), z)
        err = ((codes.double() - z) * s - x).abs()
        assert err.le(s + 1e-5).all()                                     # half a step, plus half where the rounded zero point
        assert (err > s / 2 + 1e-5).float().mean() < 0.05                 # shifts the grid off an end of the range (rare)
        assert (zp[40:] == 0).all()


def test_decode_attention_errors():
    planes = (torch.zeros(1, 1, 4, 8, dtype=torch.uint8), torch.zeros(1, 1, 4, dtype=torch.float16), torch.zeros(1, 1, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="8- and 4-bit"):
        decode_attention(torch.zeros(1, 1, 8), planes, planes, 2, bits=2, backend="torch")
    with pytest.raises(ValueError, match="outside the cache"):
        decode_attention(torch.zeros(1, 1, 8), planes, planes, 5, bits=8, backend="torch")
    with pytest.raises(ValueError, match="backend must be"):
        decode_attention(torch.zeros(1, 1, 8), planes, planes, 2, bits=8, backend="gpu")
    with pytest.raises(ValueError, match="reads 'int', 'zp' or 'mx' caches, got 'kivi'"):
        decode_attention(torch.zeros(1, 1, 8), planes, planes, 2, bits=8, backend="torch", scheme="kivi")
    mx_planes = (torch.zeros(1, 1, 4, 64, dtype=torch.uint8), torch.zeros(1, 1, 4, 1, dtype=torch.uint8))   # 1 exponent, 2 blocks
    with pytest.raises(ValueError, match="needs 2 exponents per token"):
        decode_attention(torch.zeros(1, 1, 64), mx_planes, mx_planes, 2, bits=8, backend="torch", scheme="mx")


def test_int4_matmul_reference_path_and_errors():
    from course_lib.quant import quantize_groupwise
    x, w = torch.randn(3, 64, dtype=torch.float64), torch.randn(5, 64)
    q = quantize_groupwise(w, bits=4, group_size=32)
    assert int4_matmul(x.float(), q, backend="torch").shape == (3, 5)
    with pytest.raises(ValueError, match="expects 64"):
        int4_matmul(torch.randn(3, 63), q, backend="torch")
    with pytest.raises(ValueError, match="4-bit GroupQuant"):
        int4_matmul(x.float(), quantize_groupwise(w, bits=8, group_size=32), backend="torch")
