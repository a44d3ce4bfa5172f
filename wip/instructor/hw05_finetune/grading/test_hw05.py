"""Grading tests for hw05: the student's LoRA layer against course_lib.lora, NF4 against bitsandbytes and course_lib.quant."""
import math
import warnings

import pytest
import torch
import torch.nn as nn

from course_lib.lora import LoRALinear as CourseLoRA
from course_lib.quant import dequantize_nf4, dynamic_code, quantize_nf4

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import bitsandbytes.functional as bnbF


def _pair(student, rng, r=None):
    d_in, d_out = int(rng.integers(2, 40)), int(rng.integers(2, 40))
    r = r or int(rng.integers(1, min(d_in, d_out) + 1))
    alpha = float(rng.uniform(0.5, 32))
    torch.manual_seed(int(rng.integers(0, 2**31)))
    base = nn.Linear(d_in, d_out)
    ref_base = nn.Linear(d_in, d_out); ref_base.load_state_dict(base.state_dict())
    mine, ref = student.LoRALinear(base, r=r, alpha=alpha), CourseLoRA(ref_base, r=r, alpha=alpha)
    a = torch.from_numpy(rng.standard_normal((r, d_in)) * 0.2).float()
    b = torch.from_numpy(rng.standard_normal((d_out, r)) * 0.2).float()
    with torch.no_grad():
        for layer in (mine, ref): layer.lora_A.weight.copy_(a); layer.lora_B.weight.copy_(b)
    x = torch.from_numpy(rng.standard_normal((5, d_in))).float()
    return mine, ref, x


@pytest.mark.question("q1 LoRALinear", points=1)
def test_lora_init_and_freeze(student):
    base = nn.Linear(12, 7)
    layer = student.LoRALinear(base, r=3, alpha=6)
    x = torch.randn(4, 12)
    assert torch.equal(layer(x), base(x)), "B must start at zero"
    assert not any(p.requires_grad for p in base.parameters()), "the base must be frozen"
    assert layer.lora_A.weight.shape == (3, 12) and layer.lora_B.weight.shape == (7, 3)
    with pytest.raises(ValueError): student.LoRALinear(nn.Linear(12, 7), r=8)


@pytest.mark.question("q1 LoRALinear", points=3)
def test_lora_forward_merge_unmerge(student, rng):
    for _ in range(10):
        mine, ref, x = _pair(student, rng)
        w0 = mine.base.weight.detach().clone()
        torch.testing.assert_close(mine(x), ref(x), rtol=1e-5, atol=1e-5)
        mine.merge(); ref.merge()
        torch.testing.assert_close(mine.base.weight, ref.base.weight, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine(x), ref(x), rtol=1e-5, atol=1e-5)
        mine.unmerge()
        torch.testing.assert_close(mine.base.weight, w0, rtol=0, atol=1e-4)


def _random_weight(rng):
    shape = [(int(rng.integers(1, 9)), 64 * int(rng.integers(1, 4))), (int(rng.integers(1, 300)),), (int(rng.integers(2, 20)), int(rng.integers(2, 50)))][int(rng.integers(0, 3))]
    dtype = [torch.float32, torch.float16, torch.bfloat16][int(rng.integers(0, 3))]
    return (torch.from_numpy(rng.standard_normal(shape)) * float(rng.uniform(0.01, 5))).to(dtype)


@pytest.mark.question("q2 nf4_quantize", points=4)
def test_nf4_quantize_bit_identical(student, rng):
    for _ in range(20):
        w = _random_weight(rng)
        bs = int(rng.choice([64, 128]))
        packed, absmax = student.nf4_quantize(w, blocksize=bs)
        ref, st = bnbF.quantize_4bit(w, blocksize=bs, quant_type="nf4")
        assert torch.equal(packed.reshape(-1), ref.view(-1)), f"packed bytes differ from bitsandbytes' for shape {tuple(w.shape)}"
        assert torch.equal(absmax, st.absmax)


@pytest.mark.question("q3 nf4_dequantize", points=2)
def test_nf4_dequantize_matches_library(student, rng):
    for _ in range(20):
        w = _random_weight(rng)
        q = quantize_nf4(w, double_quant=False)
        got = student.nf4_dequantize(q.data, q.absmax, tuple(w.shape), 64, w.dtype)
        assert got.dtype == w.dtype and tuple(got.shape) == tuple(w.shape)
        assert torch.equal(got, dequantize_nf4(q))


@pytest.mark.question("q4 double_quantize", points=3)
def test_double_quantize_within_bitsandbytes_error(student, rng):
    code = dynamic_code()
    for _ in range(10):
        absmax = torch.from_numpy(rng.uniform(0.01, 3, size=int(rng.integers(2, 1200)))).float()
        idx, scale, offset = student.double_quantize(absmax, code)
        ref_idx, st = bnbF.quantize_blockwise(absmax - absmax.mean(), blocksize=256)
        assert torch.equal(offset, absmax.mean()) and torch.equal(scale, st.absmax)
        blocks = torch.arange(absmax.numel()) // 256
        mine = code[idx.long()] * scale[blocks] + offset
        theirs = bnbF.dequantize_blockwise(ref_idx, st) + st.offset if hasattr(st, "offset") and st.offset is not None else \
            bnbF.dequantize_blockwise(ref_idx, st) + absmax.mean()
        assert (mine - absmax).abs().max() <= (theirs - absmax).abs().max() + 1e-7
