"""Chapter 6 kernels: reference paths here; the Triton kernels in a child process under TRITON_INTERPRET=1 (CPU)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from course_lib.kernels import decode_attention, int4_matmul, pack_bits, quantize_asym, unpack_bits

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


def test_decode_attention_errors():
    planes = (torch.zeros(1, 1, 4, 8, dtype=torch.uint8), torch.zeros(1, 1, 4, dtype=torch.float16), torch.zeros(1, 1, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="8- and 4-bit"):
        decode_attention(torch.zeros(1, 1, 8), planes, planes, 2, bits=2, backend="torch")
    with pytest.raises(ValueError, match="outside the cache"):
        decode_attention(torch.zeros(1, 1, 8), planes, planes, 5, bits=8, backend="torch")
    with pytest.raises(ValueError, match="backend must be"):
        decode_attention(torch.zeros(1, 1, 8), planes, planes, 2, bits=8, backend="gpu")


def test_int4_matmul_reference_path_and_errors():
    from course_lib.quant import quantize_groupwise
    x, w = torch.randn(3, 64, dtype=torch.float64), torch.randn(5, 64)
    q = quantize_groupwise(w, bits=4, group_size=32)
    assert int4_matmul(x.float(), q, backend="torch").shape == (3, 5)
    with pytest.raises(ValueError, match="expects 64"):
        int4_matmul(torch.randn(3, 63), q, backend="torch")
    with pytest.raises(ValueError, match="4-bit GroupQuant"):
        int4_matmul(x.float(), quantize_groupwise(w, bits=8, group_size=32), backend="torch")
