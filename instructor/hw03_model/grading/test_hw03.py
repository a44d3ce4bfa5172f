"""Grading tests for hw03: each compares the student's function with course_lib.model on fresh random inputs and weights."""
import pytest
import torch

from course_lib import model as ref

REFERENCES = ["course_lib.model.RMSNorm", "course_lib.model.SwiGLU", "course_lib.model.apply_rope", "course_lib.model.rope_cos_sin",
              "course_lib.model.rotate_half", "course_lib.model.reference_attention", "course_lib.model.sdpa_attention"]
_ATTENTION, _NORM = "hw03 asks you to write attention yourself", "hw03 asks you to write RMSNorm yourself"
FORBIDDEN = {"torch.nn.functional.scaled_dot_product_attention": _ATTENTION, "torch._C._nn.scaled_dot_product_attention": _ATTENTION,
             "torch.nn.functional.rms_norm": _NORM, "torch.rms_norm": _NORM}


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
