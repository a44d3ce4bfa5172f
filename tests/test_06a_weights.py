"""Chapter 6a: int4 weights and AWQ against a float64 model with the dequantised weights, bytes counted by hand."""
import copy

import pytest
import torch

from course_lib.model import Decoder
from course_lib.quant import dequantize_groupwise
from course_lib.weights import Int4Linear, awq_scale, quantize_weights
from test_06_inference import model, tiny   # chapter 6's tiny decoder and its fixture


def test_int4_weights_match_dequantised_float64_model(model):
    q = copy.deepcopy(model)
    sizes = quantize_weights(q, group_size=32)
    assert isinstance(q.layers[1].mlp.down_proj, Int4Linear)
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (96, 64), (96, 64), (64, 96)]     # q, k, v, o, gate, up, down (out, in)
    assert sizes["fp16_bytes"] == 2 * sum(2 * o * i for o, i in shapes)
    assert sizes["int4_bytes"] == 2 * sum(o * i // 2 + o * (i // 32) * (4 + 1) for o, i in shapes)   # codes + fp32 scale + u8 zero
    # the same model with each weight replaced by its dequantised copy, in float64, is the reference
    ref = copy.deepcopy(model).double()
    for block_q, block_ref in zip(q.layers, ref.layers):
        for part in ("self_attn", "mlp"):
            for name, child in getattr(block_q, part).named_children():
                if isinstance(child, Int4Linear):
                    getattr(getattr(block_ref, part), name).weight.data = dequantize_groupwise(child.q, torch.float64)
    idx = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        assert torch.allclose(q(idx).double(), ref(idx), atol=1e-4)


def test_awq_layer_equals_float64_and_beats_plain_int4_on_planted_outliers():
    torch.manual_seed(0)
    x = torch.randn(512, 128)
    x[:, :4] *= 30                                                      # planted outlier channels
    layer = torch.nn.Linear(128, 64, bias=False)
    s, alpha = awq_scale(layer.weight, x[:256], group_size=64)          # calibrate on half, measure on all
    q = Int4Linear(layer, 64, act_scale=s)
    w_s = dequantize_groupwise(q.q).double()                            # (64, 128): W diag(s), quantised
    # the stored weight is W diag(s) within half a quantisation step per group
    step = q.q.scale.double().repeat_interleave(64, dim=1)              # (64, 128)
    assert ((w_s - layer.weight.double() * s.double()).abs() <= step / 2 + 1e-6).all()
    # the layer computes (x / s) (W s)^T, checked in float64
    torch.testing.assert_close(q(x).double(), (x.double() / s.double()) @ w_s.T, rtol=1e-4, atol=1e-4)
    exact = x.double() @ layer.weight.double().T
    err = lambda layer_q: (layer_q(x).double() - exact).pow(2).mean().item()
    assert alpha > 0 and err(q) < 0.7 * err(Int4Linear(layer, 64))
    with pytest.raises(ValueError, match="activations have 100 features"):
        awq_scale(layer.weight, torch.randn(4, 100))


def test_awq_model_is_closer_to_fp_than_plain_int4_with_outlier_channels():
    torch.manual_seed(1)
    m = Decoder(tiny()).eval()
    with torch.no_grad():
        for block in m.layers:                                          # outlier channels at every linear's input
            block.input_layernorm.weight[:3] = 25.0; block.post_attention_layernorm.weight[5:8] = 25.0
    calibration, held_out = torch.randint(0, 97, (4, 48)), torch.randint(0, 97, (4, 48))
    plain, awq = copy.deepcopy(m), copy.deepcopy(m)
    sizes_plain, sizes_awq = quantize_weights(plain, 32), quantize_weights(awq, 32, calibration=calibration)
    assert "awq_alpha" not in sizes_plain and len(sizes_awq["awq_alpha"]) == 14
    assert sizes_awq["int4_bytes"] == sizes_plain["int4_bytes"] + 4 * sum(i for i in (64, 64, 64, 64, 64, 64, 96)) * 2   # + fp32 s
    with torch.no_grad():
        ref = m(held_out)
        assert (awq(held_out) - ref).pow(2).mean() < 0.75 * (plain(held_out) - ref).pow(2).mean()
