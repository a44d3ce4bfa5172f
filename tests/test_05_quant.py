"""Chapter 5: NF4, int8 and group-wise quantisation against bitsandbytes (bit for bit) and a float64 reference."""
import warnings

import pytest
import torch
import torch.nn as nn

from course_lib.quant import (GroupQuant, Linear4bit, dequantize_groupwise, dequantize_int8_rows, dequantize_nf4,
                              dynamic_code, nf4_code, quantize_groupwise, quantize_int8_rows, quantize_nf4)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import bitsandbytes as bnb  # required: the [quant] extra
    import bitsandbytes.functional as bnbF
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute as bnb_reference_dequant

SHAPES = [(128, 256), (37, 33), (1000,), (3, 96), (7,), (2, 3, 64)]


def test_codes_equal_bitsandbytes_tables():
    assert torch.equal(nf4_code(), bnbF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_code(), bnbF.create_dynamic_map())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_bit_identical_to_bitsandbytes(shape, dtype, double_quant):
    g = torch.Generator().manual_seed(hash((shape, str(dtype), double_quant)) % 2**31)
    w = (torch.randn(shape, generator=g) * torch.rand(1, generator=g).item() * 4).to(dtype)
    ref, st = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    q = quantize_nf4(w, double_quant=double_quant)
    assert torch.equal(q.data, ref.view(-1))
    assert torch.equal(q.absmax, st.absmax)
    if double_quant:
        assert torch.equal(q.absmax_scale, st.state2.absmax) and torch.equal(q.absmax_offset, st.offset)
    ours = dequantize_nf4(q)
    assert ours.shape == w.shape and ours.dtype == dtype
    absmax = st.absmax if not double_quant else bnbF.dequantize_blockwise(st.absmax, st.state2) + st.offset
    # bitsandbytes' portable reference (any shape) ...
    assert torch.equal(ours.reshape(-1), bnb_reference_dequant(ref.view(-1), absmax, st.code, 64, shape, dtype).reshape(-1))
    # ... and its native CPU kernel where it is right (rows a whole number of blocks, 1-D, or odd rows' fallback)
    if len(shape) == 1 or shape[-1] % 64 == 0 or shape[-1] % 2:
        assert torch.equal(ours.reshape(-1), bnbF.dequantize_4bit(ref, st).reshape(-1))


@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_nf4_other_blocksizes(blocksize):
    w = torch.randn(96, 256)
    ref, st = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    q = quantize_nf4(w, blocksize=blocksize)
    assert torch.equal(q.data, ref.view(-1)) and torch.equal(q.absmax, st.absmax)
    assert torch.equal(dequantize_nf4(q), bnbF.dequantize_4bit(ref, st))


def test_double_quant_error_and_bits_per_param():
    w = torch.randn(1024, 1024) * 0.02
    plain, dq = quantize_nf4(w, double_quant=False), quantize_nf4(w)
    e_plain = (dequantize_nf4(plain) - w).pow(2).mean().sqrt()
    e_dq = (dequantize_nf4(dq) - w).pow(2).mean().sqrt()
    assert e_dq <= 1.01 * e_plain            # double quantisation adds < 1 % error
    assert plain.bits_per_param() == pytest.approx(4.5, abs=1e-3)
    assert dq.bits_per_param() == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-3)
    assert dq.bits_per_param() <= 4.13       # the QLoRA paper's 4.127


def test_nf4_bad_input():
    with pytest.raises(TypeError, match="float32/float16/bfloat16"): quantize_nf4(torch.ones(64, dtype=torch.int32))
    with pytest.raises(ValueError, match="blocksize"): quantize_nf4(torch.ones(64), blocksize=48)
    with pytest.raises(ValueError, match="empty"): quantize_nf4(torch.ones(0))


def test_linear4bit_equals_bitsandbytes():
    torch.manual_seed(0)
    lin = nn.Linear(128, 64)
    ours = Linear4bit.from_linear(lin)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = bnb.nn.Linear4bit(128, 64, quant_type="nf4", compress_statistics=True, compute_dtype=torch.float32)
        ref.load_state_dict(lin.state_dict())
        ref = ref.to("cpu")
    x = torch.randn(5, 128, requires_grad=True)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    ours(x).sum().backward()                 # gradients reach the input through the frozen weight
    assert x.grad is not None and list(ours.parameters()) == []


def test_int8_rows_equal_bitsandbytes():
    w = torch.randn(33, 80)
    codes, scale = quantize_int8_rows(w)
    ref_codes, ref_stats, _ = bnbF.int8_vectorwise_quant(w.clone())
    assert torch.equal(codes, ref_codes)
    torch.testing.assert_close(scale.view(-1) * 127, ref_stats)
    assert (dequantize_int8_rows(codes, scale) - w).abs().max() <= scale.max() / 2 + 1e-6


def reference_groupwise(w: torch.Tensor, bits: int, gs: int, symmetric: bool):
    "Independent float64 round-to-nearest group quantisation: integer codes (unpacked) and dequantised values."
    w64 = w.double().reshape(*w.shape[:-1], -1, gs)
    if symmetric:
        half = 2 ** (bits - 1)
        scale = (w64.abs().amax(-1, keepdim=True) / (half - 1)).clamp(min=1e-12)
        q = torch.clamp(torch.round(w64 / scale), -(half - 1), half - 1)
        return (q + half).reshape(w.shape), (q * scale).reshape(w.shape), scale
    lo, hi = w64.amin(-1, keepdim=True), w64.amax(-1, keepdim=True)
    scale = ((hi - lo) / (2**bits - 1)).clamp(min=1e-12)
    zero = torch.clamp(torch.round(-lo / scale), 0, 2**bits - 1)
    q = torch.clamp(torch.round(w64 / scale) + zero, 0, 2**bits - 1)
    return q.reshape(w.shape), ((q - zero) * scale).reshape(w.shape), scale


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("shape,gs", [((16, 256), 128), ((3, 5, 64), 32), ((8, 96), -1)])
def test_groupwise_against_float64(bits, symmetric, shape, gs):
    torch.manual_seed(bits * 10 + symmetric)
    w = torch.randn(shape) * 0.05 + (0.02 if not symmetric else 0.0)
    q = quantize_groupwise(w, bits=bits, group_size=gs, symmetric=symmetric)
    assert isinstance(q, GroupQuant) and q.data.dtype == torch.uint8 and q.bits == bits and q.shape == w.shape
    cols = shape[-1]
    assert q.group_size == (cols if gs == -1 else gs)
    assert q.data.shape[-1] == (cols // 2 if bits == 4 else cols)
    assert q.scale.shape == (*shape[:-1], cols // q.group_size)
    assert (q.zero is None) == symmetric
    ref_codes, ref_deq, ref_scale = reference_groupwise(w, bits, q.group_size, symmetric)
    codes = q.data if bits != 4 else torch.stack([q.data & 0xF, q.data >> 4], -1).reshape(shape)
    # codes equal except where float32 and float64 disagree on a rounding tie (never more than one step)
    differ = codes.double() != ref_codes
    assert differ.float().mean() < 1e-3 and (codes.double() - ref_codes).abs().max() <= 1
    deq = dequantize_groupwise(q, dtype=torch.float64)
    ok = ~differ
    torch.testing.assert_close(deq[ok], ref_deq[ok], rtol=1e-5, atol=1e-7)
    step = ref_scale.expand(*ref_scale.shape[:-1], q.group_size).reshape(shape)
    assert ((deq - w.double()).abs() <= step * 0.5 + 1e-6).all() or (bits == 2 and not symmetric)  # within half a step
    assert dequantize_groupwise(q, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_groupwise_4bit_packing_layout():
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0, -1.0, 2.0, 0.5, 0.25]])
    q = quantize_groupwise(w, bits=4, group_size=4)
    # codes 0 5 10 15 | 0 15 7 6 (0.5/0.2 = 2.5 rounds half to even: 2 + zero 5); even column in the low nibble
    assert q.data.tolist() == [[0 | 5 << 4, 10 | 15 << 4, 0 | 15 << 4, 7 | 6 << 4]]
    assert q.zero.tolist() == [[0, 5]]


def test_groupwise_bad_input():
    with pytest.raises(ValueError, match="must divide the last dimension"): quantize_groupwise(torch.randn(4, 100), group_size=128)
    with pytest.raises(ValueError, match="bits must be 2..8"): quantize_groupwise(torch.randn(4, 128), bits=9)
    with pytest.raises(TypeError, match="float tensor"): quantize_groupwise(torch.ones(4, 128, dtype=torch.int8))
    with pytest.raises(ValueError, match="even last dimension"): quantize_groupwise(torch.randn(4, 3), group_size=-1)
