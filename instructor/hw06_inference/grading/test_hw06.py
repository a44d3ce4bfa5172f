"""Grading tests for hw06: int8 KV quantisation, top-p, the int8 cache and the decode loop against course_lib on fresh random inputs."""
import dataclasses

import pytest
import torch

from course_lib.inference import QuantCache, generate
from course_lib.kernels import quantize_asym
from course_lib.model import Decoder, ModelConfig, filter_logits


def _tensor(rng, *shape, scale=1.0):
    return torch.from_numpy(rng.standard_normal(shape) * scale).float()


@pytest.mark.question("q1 quantize_int8", points=2)
def test_quantize_int8_random(student, rng):
    for _ in range(20):
        shape = tuple(int(s) for s in rng.integers(1, 9, size=int(rng.integers(1, 4))))
        x = _tensor(rng, *shape, scale=float(rng.uniform(0.01, 100)))
        if rng.random() < 0.2: x[..., :] = float(rng.normal())               # constant rows: scale 0
        codes, scale, zero = student.quantize_int8(x)
        want = quantize_asym(x, 8)
        assert codes.dtype == torch.uint8 and scale.dtype == torch.float16 and zero.dtype == torch.float16
        assert torch.equal(scale, want[1]) and torch.equal(zero, want[2]), "scale/zero: (max-min)/255 and min, rounded to float16"
        assert (codes.long() - want[0].long()).abs().max() <= 1 and (codes != want[0]).float().mean() <= 0.01


@pytest.mark.question("q2 top_p_filter", points=2)
def test_top_p_random(student, rng):
    for _ in range(30):
        logits = _tensor(rng, int(rng.integers(1, 5)), int(rng.integers(2, 60)), scale=float(rng.uniform(0.5, 5)))
        p = float(rng.choice([1.0, rng.uniform(0.05, 0.99)]))
        got = student.top_p_filter(logits.clone(), p)
        want = filter_logits(logits, top_p=p)
        assert torch.equal(torch.isinf(got), torch.isinf(want)), f"top_p={p}: wrong set of kept tokens"
        assert torch.allclose(got[~torch.isinf(want)], want[~torch.isinf(want)])


@pytest.mark.question("q3 Int8LayerCache", points=3)
def test_int8_cache_random(student, rng):
    for _ in range(5):
        b, h, d = (int(v) for v in rng.integers(1, 4, size=3)); d *= 4
        max_len = int(rng.integers(4, 12))
        ours, ref = student.Int8LayerCache(b, h, d, max_len), QuantCache(b, h, d, max_len, bits=8)
        length = 0
        while length < max_len - 1:
            t = int(rng.integers(1, max_len - length))
            k, v = _tensor(rng, b, h, t, d), _tensor(rng, b, h, t, d)
            got, want = ours.update(k, v), ref.update(k, v)
            length += t
            for g, w in zip(got, want):
                assert g.shape == (b, h, length, d)
                assert torch.allclose(g.float(), w, atol=0.05), "dequantised keys/values differ from the library's int8 cache"
            assert ours.nbytes == ref.nbytes, f"nbytes {ours.nbytes} != {ref.nbytes}"
        with pytest.raises(ValueError):
            ours.update(_tensor(rng, b, h, max_len, d), _tensor(rng, b, h, max_len, d))


def _model(rng) -> Decoder:
    torch.manual_seed(int(rng.integers(0, 2**31)))
    heads = int(rng.choice([2, 4]))
    cfg = ModelConfig(vocab_size=int(rng.integers(50, 300)), d_model=16 * heads, n_layers=int(rng.integers(1, 3)), n_heads=heads,
                      n_kv_heads=int(rng.choice([1, heads])), d_ff=48, max_seq_len=64, init_std=0.1)
    return Decoder(cfg).eval()


def _weights(model: Decoder) -> tuple[dict, dict]:
    "What crosses to the student's process: the config's fields and the state dict (a model itself cannot)."
    return dataclasses.asdict(model.cfg), {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.question("q4 generate_int8", points=2)
def test_greedy_equals_library_int8(student, rng):
    for _ in range(3):
        model = _model(rng)
        prompt = rng.integers(0, model.cfg.vocab_size, size=int(rng.integers(1, 10))).tolist()
        n = int(rng.integers(1, 25))
        assert student.generate_int8_from_weights(*_weights(model), prompt, n) == generate(model, prompt, n, greedy=True, kv="int8")


@pytest.mark.question("q4 generate_int8", points=1)
def test_top_p_sampling_is_seeded_and_in_nucleus(student, rng):
    model = _model(rng)
    config, state = _weights(model)
    prompt = [1, 2, 3]
    a = student.generate_int8_from_weights(config, state, prompt, 15, top_p=0.5, seed=7)
    b = student.generate_int8_from_weights(config, state, prompt, 15, top_p=0.5, seed=7)
    assert a == b and len(a) == 15
    # with a nucleus of one token (top_p tiny) sampling is greedy
    assert student.generate_int8_from_weights(config, state, prompt, 15, top_p=1e-6, seed=1) == \
        generate(model, prompt, 15, greedy=True, kv="int8")
