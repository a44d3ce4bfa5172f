"""Grading tests for hw03: the block's pieces and the whole decoder forward against course_lib.model and transformers'
Llama on fresh random configs, inputs and weights; the experiment's artifact is checked for plausible ranges."""
import dataclasses
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from course_lib import model as ref

REFERENCES = ["course_lib.model.RMSNorm", "course_lib.model.SwiGLU", "course_lib.model.apply_rope", "course_lib.model.rope_cos_sin",
              "course_lib.model.rotate_half", "course_lib.model.reference_attention", "course_lib.model.sdpa_attention",
              "course_lib.model.Attention", "course_lib.model.Block", "course_lib.model.Decoder", "course_lib.model.LMHead",
              "course_lib.model.from_hf", "course_lib.model.load_hf_state_dict"]
_ATTENTION, _NORM = "hw03 asks you to write attention yourself", "hw03 asks you to write RMSNorm yourself"
_MATMUL, _HF = "hw03 asks you to write the projections as matrix products", "hw03 asks you to write the forward yourself"
# transformers first: the sandbox imports it to replace these names, and its import subclasses nn.Linear
FORBIDDEN = {"transformers.LlamaForCausalLM": _HF, "transformers.LlamaModel": _HF,
             "torch.nn.functional.scaled_dot_product_attention": _ATTENTION, "torch._C._nn.scaled_dot_product_attention": _ATTENTION,
             "torch.nn.functional.rms_norm": _NORM, "torch.rms_norm": _NORM, "torch.nn.Linear": _MATMUL,
             "torch.nn.functional.linear": _MATMUL, "torch._C._nn.linear": _MATMUL}


def randn(rng, *shape, dtype=torch.float32):
    return torch.from_numpy(rng.standard_normal(shape)).to(dtype)


@pytest.mark.question("q1 rms_norm", points=1)
def test_rms_norm_edge_cases(student):
    y = student.rms_norm(torch.tensor([[3.0, 4.0]]), torch.ones(2), eps=0.0)
    torch.testing.assert_close(y, torch.tensor([[3.0, 4.0]]) / 12.5 ** 0.5)
    x = torch.zeros(2, 3, 8)                                      # all zeros: eps keeps it finite
    assert torch.equal(student.rms_norm(x, torch.ones(8)), x)
    xb, wb = torch.randn(4, 16).bfloat16(), torch.ones(16, dtype=torch.bfloat16)   # a bf16 model: weights and activations
    got = student.rms_norm(xb, wb)
    assert got.dtype == torch.bfloat16, "returns the input's dtype"
    norm = ref.RMSNorm(16).bfloat16()
    with torch.no_grad(): torch.testing.assert_close(got, norm(xb))   # normalised in float32, then rounded once


@pytest.mark.question("q1 rms_norm", points=1)
def test_rms_norm_random(student, rng):
    for _ in range(20):
        d = int(rng.integers(2, 64)); shape = tuple(int(s) for s in rng.integers(1, 5, size=rng.integers(1, 4))) + (d,)
        x, eps = randn(rng, *shape) * float(rng.uniform(0.01, 10)), float(rng.choice([1e-6, 1e-5, 1e-3]))
        norm = ref.RMSNorm(d, eps)
        with torch.no_grad(): norm.weight.copy_(randn(rng, d))
        with torch.no_grad(): want = norm(x)
        torch.testing.assert_close(student.rms_norm(x, norm.weight.detach(), eps), want, atol=1e-5, rtol=1e-5)


@pytest.mark.question("q2 swiglu", points=2)
def test_swiglu_random(student, rng):
    for _ in range(20):
        d, f = int(rng.integers(2, 32)), int(rng.integers(2, 64))
        mlp = ref.SwiGLU(d, f)
        x = randn(rng, int(rng.integers(1, 4)), int(rng.integers(1, 6)), d)
        with torch.no_grad():
            for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj): lin.weight.copy_(randn(rng, *lin.weight.shape))
            want = mlp(x)
        got = student.swiglu(x, mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach())
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.question("q3 apply_rope", points=1)
def test_rope_edge_cases(student):
    x = torch.zeros(1, 1, 1, 4); x[..., 0] = 1.0                   # e_0 at position 1 rotates by 1 radian into dim d/2
    got = student.apply_rope(x, torch.tensor([1]), theta=10000.0)
    torch.testing.assert_close(got[0, 0, 0], torch.tensor([torch.cos(torch.tensor(1.0)), 0.0, torch.sin(torch.tensor(1.0)), 0.0]))
    q = torch.randn(2, 3, 5, 8)
    torch.testing.assert_close(student.apply_rope(q, torch.zeros(5, dtype=torch.long)), q)


@pytest.mark.question("q3 apply_rope", points=2)
def test_rope_random(student, rng):
    for _ in range(20):
        b, h, t, d = int(rng.integers(1, 3)), int(rng.integers(1, 4)), int(rng.integers(1, 12)), 2 * int(rng.integers(1, 16))
        theta = float(rng.choice([500.0, 10_000.0, 1_000_000.0]))
        x = randn(rng, b, h, t, d)
        positions = torch.from_numpy(rng.integers(0, 4096, size=(b, t)) if rng.random() < 0.5 else rng.permutation(t)).long()
        cos, sin = ref.rope_cos_sin(positions, d, theta)
        torch.testing.assert_close(student.apply_rope(x, positions, theta), ref.apply_rope(x, cos, sin), atol=1e-4, rtol=1e-4)


def attention64(q, k, v):
    "The reference: causal softmax attention written out in float64 (not PyTorch's fused kernel), GQA by repeating kv heads."
    return ref.reference_attention(q.double(), k.double(), v.double()).to(q.dtype)   # (b, h, t, d)


def one_head64(q, k, v):
    "Causal attention of one head, every position, in float64: q (b, t, d), k and v (b, t, d)."
    scores = q.double() @ k.double().transpose(-2, -1) / q.shape[-1] ** 0.5           # (b, t, t)
    mask = torch.ones(q.shape[1], q.shape[1], dtype=torch.bool).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v.double()           # (b, t, d)


@pytest.mark.question("q4 causal_attention", points=1)
def test_attention_edge_cases(student):
    q, k, v = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4)
    torch.testing.assert_close(student.causal_attention(q, k, v), v)   # one token attends only to itself
    q, k, v = torch.randn(2, 6, 5, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)
    out = student.causal_attention(q, k, v)
    for head in range(6):                                              # query head h uses kv head h // 2, at every position
        torch.testing.assert_close(out[:, head].double(), one_head64(q[:, head], k[:, head // 2], v[:, head // 2]),
                                   atol=1e-5, rtol=1e-4, msg=f"query head {head} must use kv head {head // 2} at every position")


@pytest.mark.question("q4 causal_attention", points=2)
def test_attention_random(student, rng):
    for _ in range(20):
        kv = int(rng.integers(1, 4)); h = kv * int(rng.integers(1, 4))
        b, t, d = int(rng.integers(1, 3)), int(rng.integers(1, 16)), int(rng.integers(2, 17))
        q, k, v = randn(rng, b, h, t, d), randn(rng, b, kv, t, d), randn(rng, b, kv, t, d)
        torch.testing.assert_close(student.causal_attention(q, k, v), attention64(q, k, v), atol=1e-5, rtol=1e-4)


def random_decoder(rng, tie: bool | None = None) -> ref.Decoder:
    "A library decoder with a freshly drawn shape and weights (norm gains too), routed through the written-out attention."
    kv = int(rng.integers(1, 4)); heads = kv * int(rng.integers(1, 4)); head_dim = 2 * int(rng.integers(1, 9))
    cfg = ref.ModelConfig(vocab_size=int(rng.integers(5, 200)), d_model=heads * head_dim, n_layers=int(rng.integers(1, 4)),
                          n_heads=heads, n_kv_heads=kv, d_ff=int(rng.integers(4, 80)), max_seq_len=64,
                          rope_theta=float(rng.choice([100.0, 10_000.0, 500_000.0])), norm_eps=float(rng.choice([1e-6, 1e-5])),
                          tie_embeddings=bool(rng.random() < 0.5) if tie is None else tie, init_std=float(rng.uniform(0.1, 0.5)))
    model = ref.Decoder(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters(): p.copy_(randn(rng, *p.shape) * (0.3 if p.ndim == 1 else cfg.init_std) + (p.ndim == 1))
    model.set_reference_attention(True)
    return model


def weights_of(model: ref.Decoder) -> tuple[dict, dict]:
    "What crosses the pipe: the library's tensor names (no lm_head.weight when the head is tied) and the config's fields."
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings: del sd["lm_head.weight"]
    return sd, dataclasses.asdict(model.cfg)


def random_ids(rng, vocab: int) -> torch.Tensor:
    return torch.from_numpy(rng.integers(0, vocab, size=(int(rng.integers(1, 4)), int(rng.integers(1, 20))))).long()


@pytest.mark.question("q5 decoder_forward", points=2)
def test_forward_edge_cases(student, rng):
    "Zero projections make every block the identity: logits are the final norm of the embeddings times the head, by hand."
    for tie in (True, False):
        model = random_decoder(rng, tie=tie)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.startswith("layers.") and p.ndim == 2: p.zero_()
        weights, config = weights_of(model)
        idx = random_ids(rng, config["vocab_size"])
        x = weights["embed_tokens.weight"].double()[idx]                                              # (b, t, d)
        x = x / (x.pow(2).mean(-1, keepdim=True) + config["norm_eps"]).sqrt() * weights["norm.weight"].double()
        head = weights["embed_tokens.weight"] if tie else weights["lm_head.weight"]
        want = (x @ head.double().T).float()                                                          # (b, t, vocab)
        got = student.decoder_forward(weights, config, idx)
        assert got.shape == want.shape, f"logits shape {tuple(got.shape)}, expected (batch, time, vocab) {tuple(want.shape)}"
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4,
                                   msg=f"tie_embeddings={tie}: with every block's projections zero the blocks are the identity")


@pytest.mark.question("q5 decoder_forward", points=4)
def test_forward_matches_library(student, rng):
    for _ in range(6):
        model = random_decoder(rng)
        idx = random_ids(rng, model.cfg.vocab_size)
        got = student.decoder_forward(*weights_of(model), idx)
        with torch.no_grad(): want = model(idx)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=f"config {model.cfg}")


@pytest.mark.question("q5 decoder_forward", points=2)
def test_forward_matches_transformers(student, rng):
    "The library's export loaded by transformers, and a Llama transformers initialised itself: both forwards are the reference."
    for exported in (True, False):
        model = random_decoder(rng)
        config, idx = dataclasses.asdict(model.cfg), random_ids(rng, model.cfg.vocab_size)
        if exported:
            got = student.decoder_forward(*weights_of(model), idx)             # the tensors the export writes, Llama's names
            from transformers import AutoModelForCausalLM
            with tempfile.TemporaryDirectory() as folder:
                ref.export_hf(model, folder)
                hf = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
        else:
            from transformers import AutoModelForCausalLM, LlamaConfig
            torch.manual_seed(int(rng.integers(0, 2**31)))
            fields = {k: v for k, v in ref.hf_config(model.cfg).items() if k not in ("architectures", "model_type")}
            hf = AutoModelForCausalLM.from_config(LlamaConfig(**fields), dtype=torch.float32).eval()
            with torch.no_grad():
                for p in hf.parameters(): p.normal_(1.0 if p.ndim == 1 else 0.0, 0.3)
            weights = {k.removeprefix("model."): v.detach().clone() for k, v in hf.state_dict().items()
                       if not (model.cfg.tie_embeddings and k == "lm_head.weight")}
            got = student.decoder_forward(weights, config, idx)
        with torch.no_grad(): want = hf(idx).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4,
                                   msg=f"{'exported' if exported else 'transformers-initialised'} Llama, config {config}")


EXPERIMENT = Path("attention_scaling.json"), Path("attention_scaling.png")


@pytest.mark.question("q6 experiment: attention cost vs sequence length", points=1)
def test_attention_scaling_function(student):
    result = student.attention_scaling([8, 16], batch=2, heads=2, head_dim=4, repeats=1)
    assert [int(t) for t in result["seq_len"]] == [8, 16]
    assert [int(b) for b in result["score_bytes"]] == [2 * 2 * 8 * 8 * 4, 2 * 2 * 16 * 16 * 4], "one float32 (b, h, t, t) score matrix"
    assert all(0 < s < 10 for s in result["seconds"]), result["seconds"]


@pytest.mark.question("q6 experiment: attention cost vs sequence length", points=2)
def test_attention_scaling_artifact(student):
    student.attention_scaling([8], batch=1, heads=1, head_dim=2, repeats=1)   # the function runs (an untouched one says so)
    data, png = EXPERIMENT
    assert data.is_file() and png.is_file(), f"the experiment cell writes {data} and {png} next to the notebook"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000, f"{png} is not a plot saved as PNG"
    result = json.loads(data.read_text())
    t, s = np.array(result["seq_len"], dtype=float), np.array(result["seconds"], dtype=float)
    assert len(t) >= 4 and np.all(np.diff(t) > 0) and t.max() >= 1024, "at least 4 increasing lengths, up to 1024 or more"
    assert np.all(np.isfinite(s)) and np.all(s > 0) and s.max() < 60, f"seconds out of range: {s}"
    long = t >= 256
    slope = np.polyfit(np.log(t[long]), np.log(s[long]), 1)[0]
    assert 1.0 < slope < 3.5, f"time grows like T^{slope:.2f} from 256 tokens on; written-out attention is close to T^2"
