"""Grading tests for hw05: the student's LoRA layer against peft and course_lib.lora, NF4 against bitsandbytes and
course_lib.quant, the SFT ids/labels and packing against course_lib.sft, and the rank sweep against the Eckart-Young bound.
Everything crosses the pipe as tensors or plain data: the student's `LoRALinear` builds its own base from a weight."""
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from course_lib.lora import LoRALinear as CourseLoRA
from course_lib.lora import trainable_parameters
from course_lib.quant import dequantize_nf4, dynamic_code, quantize_nf4
from course_lib.sft import IGNORE, SFTExample, encode_conversation, pack
from course_lib.tokenizer import DEFAULT_SPECIALS, Tokenizer

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import bitsandbytes.functional as bnbF
    from peft import LoraConfig, get_peft_model

REFERENCES = ["course_lib.lora.LoRALinear", "course_lib.quant.quantize_nf4", "course_lib.quant.dequantize_nf4",
              "course_lib.sft.encode_conversation", "course_lib.sft.pack"]
FORBIDDEN = {f"bitsandbytes.functional.{name}": "hw05 asks you to write NF4 yourself"
             for name in ("quantize_4bit", "dequantize_4bit", "quantize_blockwise", "dequantize_blockwise")}


def _tensor(rng, *shape, scale=1.0):
    return torch.from_numpy(rng.standard_normal(shape) * scale).float()


class _Holder(nn.Module):
    "peft adapts named submodules: one linear layer called `lin`."
    def __init__(self, lin): super().__init__(); self.lin = lin
    def forward(self, x): return self.lin(x)


def _peft_layer(weight, bias, r, alpha, A, B):
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None: lin.bias.copy_(bias)
    model = get_peft_model(_Holder(lin), LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"], lora_dropout=0.0))
    layer = model.base_model.model.lin
    with torch.no_grad(): layer.lora_A["default"].weight.copy_(A); layer.lora_B["default"].weight.copy_(B)
    return model, layer


def _case(rng):
    d_in, d_out = int(rng.integers(2, 40)), int(rng.integers(2, 40))
    r = int(rng.integers(1, min(d_in, d_out) + 1))
    weight, bias = _tensor(rng, d_out, d_in, scale=0.3), (_tensor(rng, d_out) if rng.random() < 0.7 else None)
    A, B = _tensor(rng, r, d_in, scale=0.2), _tensor(rng, d_out, r, scale=0.2)
    return weight, bias, r, float(rng.uniform(0.5, 32)), A, B, _tensor(rng, int(rng.integers(1, 6)), d_in)


@pytest.mark.question("q1 LoRALinear", points=1)
def test_lora_init_and_freeze(student, rng):
    weight, bias = _tensor(rng, 7, 12), _tensor(rng, 7)
    layer = student.LoRALinear(weight, bias, r=3, alpha=6)
    x = _tensor(rng, 4, 12)
    torch.testing.assert_close(layer(x), x @ weight.T + bias, msg="a fresh layer must equal its base (B starts at zero)")
    A, B = layer.lora_A.weight, layer.lora_B.weight
    assert A.shape == (3, 12) and B.shape == (7, 3), "lora_A.weight is (r, in) and lora_B.weight is (out, r)"
    assert torch.count_nonzero(B) == 0 and torch.count_nonzero(A) > 0 and A.abs().max() <= 1 / math.sqrt(12) + 1e-6, \
        "A keeps nn.Linear's Kaiming-uniform init (|A| <= 1/sqrt(in)), B is zero"
    assert not layer.base.weight.requires_grad and not layer.base.bias.requires_grad, "the base must be frozen"
    assert A.requires_grad and B.requires_grad, "the adapter must be trainable"
    ref = CourseLoRA(nn.Linear(12, 7), r=3, alpha=6)
    assert tuple(layer.trainable_parameters()) == trainable_parameters(ref)
    for bad_r in (0, 8, 13):
        with pytest.raises(ValueError): student.LoRALinear(weight, bias, r=bad_r)


@pytest.mark.question("q1 LoRALinear", points=4)
def test_lora_forward_merge_unmerge_equal_peft(student, rng):
    for _ in range(8):
        weight, bias, r, alpha, A, B, x = _case(rng)
        mine = student.LoRALinear(weight, bias, r=r, alpha=alpha)
        mine.load_adapter(A, B)
        model, theirs = _peft_layer(weight, bias, r, alpha, A, B)
        with torch.no_grad(): want = model(x)
        torch.testing.assert_close(mine(x), want, rtol=1e-5, atol=1e-5, msg=f"forward differs from peft's (r={r}, alpha={alpha:g})")
        torch.testing.assert_close(mine.delta_weight(), theirs.get_delta_weight("default"), rtol=1e-5, atol=1e-6)
        mine.merge(); mine.merge()                       # a second merge changes nothing
        model.merge_adapter()
        torch.testing.assert_close(mine.base.weight, theirs.base_layer.weight, rtol=1e-5, atol=1e-5, msg="merged weight differs from peft's")
        torch.testing.assert_close(mine(x), want, rtol=1e-5, atol=1e-5, msg="a merged layer must compute the same function")
        mine.unmerge(); mine.unmerge()
        torch.testing.assert_close(mine.base.weight, weight, rtol=0, atol=1e-5, msg="unmerge must restore the base weight")
        torch.testing.assert_close(mine(x), want, rtol=1e-5, atol=1e-5)
        course = CourseLoRA(nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None), r=r, alpha=alpha)
        assert tuple(mine.trainable_parameters()) == trainable_parameters(course)


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
        theirs = bnbF.dequantize_blockwise(ref_idx, st) + absmax.mean()
        assert (mine - absmax).abs().max() <= (theirs - absmax).abs().max() + 1e-7


BYTE_TOK = Tokenizer({i: bytes([i]) for i in range(256)}, [], DEFAULT_SPECIALS)
START, END = BYTE_TOK.special_tokens["<|im_start|>"], BYTE_TOK.special_tokens["<|im_end|>"]
ALPHABET = list("abcdefghij XYZ.,?!\n0123456789") + ["é", "你", "好", "🙂", "<|", "|>"]


def _conversation(rng) -> list[dict]:
    turns = [{"role": "system", "content": ""}] if rng.random() < 0.3 else []
    for _ in range(int(rng.integers(1, 4))):
        for role in ("user", "assistant") if rng.random() < 0.8 else ("user", "tool", "assistant"):
            turns.append({"role": role, "content": "".join(rng.choice(ALPHABET, size=int(rng.integers(0, 12))))})
    turns[0]["content"] = turns[0]["content"] or "x"
    return turns


@pytest.mark.question("q5 chat_ids_labels", points=2)
def test_chat_ids_labels_random(student, rng):
    for _ in range(30):
        conv = _conversation(rng)
        got = student.chat_ids_labels(conv, START, END)
        assert tuple(map(list, got)) == encode_conversation(BYTE_TOK, conv), f"ids/labels differ from course_lib.sft for {conv}"
    for bad in ([{"role": "user", "content": "only a question"}], [{"role": "human", "content": "x"}, {"role": "assistant", "content": "y"}]):
        with pytest.raises(ValueError): student.chat_ids_labels(bad, START, END)


@pytest.mark.question("q6 pack_examples", points=3)
def test_pack_examples_random(student, rng):
    for _ in range(30):
        seq_len = int(rng.integers(4, 40))
        examples = []
        for _ in range(int(rng.integers(1, 12))):
            n = int(rng.integers(2, seq_len + 2))
            ids = rng.integers(0, 500, size=n).tolist()
            examples.append((ids, [i if rng.random() < 0.5 else IGNORE for i in ids]))
        pad = int(rng.integers(0, 3))
        got = student.pack_examples(examples, seq_len, pad)
        want = pack([SFTExample(*e) for e in examples], seq_len, pad_id=pad)
        for key, ours in (("x", "x"), ("y", "y"), ("positions", "positions"), ("segments", "segment_ids")):
            assert torch.equal(torch.as_tensor(got[key]), want[ours]), f"{key} differs from course_lib.sft.pack (seq_len={seq_len})"
    with pytest.raises(ValueError): student.pack_examples([(list(range(10)), list(range(10)))], 5)


def _sweep_inputs(rng, d: int, n: int, decay: float):
    u = torch.linalg.qr(_tensor(rng, d, d).double())[0]
    v = torch.linalg.qr(_tensor(rng, d, d).double())[0]
    sigma = decay ** torch.arange(d, dtype=torch.float64)
    delta = (u @ torch.diag(sigma) @ v.T).float()
    x = (torch.linalg.qr(_tensor(rng, n, d).double())[0] * math.sqrt(n)).float()   # x.T @ x = n I
    return _tensor(rng, d, d, scale=1 / math.sqrt(d)), delta, x, sigma


@pytest.mark.question("q7 rank_sweep", points=3)
def test_rank_sweep_reaches_the_eckart_young_bound(student, rng):
    d, n, decay = int(rng.choice([16, 24])), 128, float(rng.uniform(0.45, 0.6))
    w0, delta, x, sigma = _sweep_inputs(rng, d, n, decay)
    ranks = [1, 2, 4, 8]
    result = student.rank_sweep(w0, delta, x, ranks=ranks, steps=200)
    energy = sigma ** 2
    bound = [float(energy[r:].sum() / energy.sum()) for r in ranks]   # the best any rank-r update can do, relative
    saved = json.loads(Path("rank_sweep.json").read_text())
    assert saved == json.loads(json.dumps(result)), "rank_sweep.json must hold what rank_sweep returns"
    assert saved["ranks"] == ranks and saved["trainable"] == [r * 2 * d for r in ranks]
    for r, loss, best in zip(ranks, saved["relative_loss"], bound):
        assert loss >= best * (1 - 1e-3) - 1e-6, f"r={r}: relative loss {loss:.4g} beats the Eckart-Young bound {best:.4g}: impossible"
        assert loss <= 1.1 * best + 0.01, f"r={r}: relative loss {loss:.4g} is far above the best possible {best:.4g}: did the adapter train?"
    png = Path("rank_sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000, "rank_sweep.png must be a PNG plot"
