"""Chapter 6: KV-cache generation against transformers `generate` and chapter 3's no-cache loop; quantised caches against float64."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from course_lib.inference import (FPCache, KIVICache, KVCache, MXCache, QuantCache, ZeroPointCache, generate, kv_bytes_per_token,
                                  left_pad, speculative_generate, stream)
from course_lib.model import Decoder, ModelConfig, export_hf
from course_lib.model import generate as generate_no_cache


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**(dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=96) | kw))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Decoder(tiny()).eval()


def test_greedy_equals_transformers_generate_and_no_cache_loop(model, tmp_path):
    export_hf(model, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True, dtype=torch.float32).eval()
    torch.manual_seed(3)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (7, 3, 11)]
    ours = generate(model, prompts, 40, greedy=True)                     # one left-padded batch
    for p, o in zip(prompts, ours):
        hf_out = hf.generate(torch.tensor([p]), max_new_tokens=40, do_sample=False, min_new_tokens=40)[0, len(p):].tolist()
        assert o == hf_out
        assert o == generate_no_cache(model, torch.tensor([p]), 40, greedy=True)[0, len(p):].tolist()
    # transformers' own left-padded batch agrees too
    ids, mask = left_pad(prompts)
    hf_batch = hf.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, min_new_tokens=40)[:, ids.shape[1]:]
    assert hf_batch.tolist() == ours


def test_sampling_matches_transformers_distribution_and_is_seeded(model):
    p = [5, 6, 7]
    a = generate(model, p, 20, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.2, generator=torch.Generator().manual_seed(1))
    b = generate(model, p, 20, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.2, generator=torch.Generator().manual_seed(1))
    assert a == b and len(a) == 20


def test_eos_and_stop_strings(model):
    class Bytes:
        def decode_bytes(self, ids): return bytes(i % 256 for i in ids)
    full = generate(model, [1, 2, 3], 30, greedy=True)
    eos = full[9]
    out = generate(model, [1, 2, 3], 30, greedy=True, eos_id=eos)
    assert out == full[:full.index(eos) + 1]
    stop = bytes(full[4:6]).decode("latin-1")
    if all(b < 128 for b in full[4:6]):
        cut = generate(model, [1, 2, 3], 30, greedy=True, stop=[stop], tokenizer=Bytes())
        assert bytes(cut).decode("latin-1").endswith(stop) and len(cut) <= 6
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        generate(model, [1], 3, stop=["x"])


@pytest.mark.parametrize("bad,match", [(dict(max_new_tokens=0), "max_new_tokens must be > 0"),
                                       (dict(max_new_tokens=95), "exceeds the context window"),
                                       (dict(top_p=0.0), r"top_p must be in \(0, 1\]"), (dict(top_p=1.01), "top_p"),
                                       (dict(kv="int3"), "unknown KV-cache scheme"), (dict(temperature=0), "temperature")])
def test_bad_requests(model, bad, match):
    kw = dict(max_new_tokens=5) | bad
    with pytest.raises(ValueError, match=match):
        generate(model, [1, 2], **kw)


def test_stream_is_utf8_safe_and_equals_generate(model):
    class Bytes:
        def encode(self, s): return list(s.encode())
        def decode_bytes(self, ids): return bytes(i % 256 for i in ids)
    torch.manual_seed(0)
    m = Decoder(tiny(vocab_size=256)).eval()
    tokens, pieces = zip(*stream(m, Bytes(), "hé", 30, greedy=True))
    tokens = [t for t in tokens if t >= 0]
    assert tokens == generate(m, list("hé".encode()), 30, greedy=True)
    assert "".join(pieces) == bytes(tokens).decode("utf-8", errors="replace")
    assert all("\ufffd" not in p or p == "\ufffd" for p in pieces)


def float64_dequant_per_token(x, bits):
    x = x.double()
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale, zero = ((hi - lo) / (2**bits - 1)).half().double(), lo.half().double()
    q = torch.floor((x - zero) / scale + 0.5).clamp(0, 2**bits - 1)
    return q * scale + zero


@pytest.mark.parametrize("bits", [8, 4])
def test_quant_cache_returns_float64_reference(bits):
    torch.manual_seed(bits)
    cache = QuantCache(2, 3, 16, max_len=9, bits=bits)
    k, v = torch.randn(2, 3, 5, 16), torch.randn(2, 3, 5, 16)
    cache.update(k[:, :, :4], v[:, :, :4])
    kk, vv = cache.update(k[:, :, 4:], v[:, :, 4:])
    for got, x in ((kk, k), (vv, v)):
        want = float64_dequant_per_token(x, bits)
        scale = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / (2**bits - 1)
        assert ((got.double() - want).abs() <= 1e-5 + (scale * 1.01) * ((got.double() - want).abs() > 1e-5)).all()
        assert ((got.double() - want).abs() > 1e-5).float().mean() < 0.01    # codes equal except rare rounding ties
    assert cache.nbytes == 2 * 5 * 2 * 3 * (16 * bits // 8 + 4)         # b x t x (K, V) x heads x (codes + fp16 scale, zero)


def float64_dequant_zero_point(x, bits):
    "x = (q - zp) * scale by hand: the range stretched to hold 0, scale rounded to float16, zp = round(-min / scale)."
    x = x.double()
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / (2**bits - 1)).half().double()
    zp = torch.floor(-lo / scale + 0.5).clamp(0, 2**bits - 1)
    return ((torch.floor(x / scale + 0.5) + zp).clamp(0, 2**bits - 1) - zp) * scale, scale


def float64_dequant_mx(x, bits, block=32):
    "OCP MX by hand: per block of `block` values, X = 2^floor(log2 max|x|), step X / 2^(bits-2), codes clamped to [-2^(bits-1), 2^(bits-1) - 1]."
    import math
    g = x.double().reshape(*x.shape[:-1], -1, block)
    exp = torch.tensor([[math.floor(math.log2(a)) for a in row] for row in g.abs().amax(-1).reshape(-1, g.shape[-2]).tolist()],
                       dtype=torch.float64).reshape(g.shape[:-1])[..., None]
    step = 2.0 ** (exp - (bits - 2))
    return (torch.floor(g / step + 0.5).clamp(-2**(bits - 1), 2**(bits - 1) - 1) * step).reshape(x.shape), step


@pytest.mark.parametrize("bits", [8, 4])
def test_zero_point_and_mx_caches_return_float64_reference(bits):
    torch.manual_seed(bits)
    k, v = torch.randn(2, 3, 5, 64) * 2, torch.randn(2, 3, 5, 64) + 1.5      # v mostly positive: its range stretches to 0
    for cache, by_hand in ((ZeroPointCache(2, 3, 64, max_len=9, bits=bits), float64_dequant_zero_point),
                           (MXCache(2, 3, 64, max_len=9, bits=bits), float64_dequant_mx)):
        cache.update(k[:, :, :2], v[:, :, :2])
        kk, vv = cache.update(k[:, :, 2:], v[:, :, 2:])
        for got, x in ((kk, k), (vv, v)):
            want, step = by_hand(x, bits)
            diff = (got.double() - want).abs()
            assert (diff > 1e-6).float().mean() < 0.01                      # codes equal except rare rounding ties,
            assert (diff.reshape(step.shape[:-1] + (-1,)) <= step * 1.01 + 1e-6).all()   # which land one step off
    assert ZeroPointCache.bytes_per_token(3, 64, bits, torch.float16) == 2 * 3 * (64 * bits / 8 + 2 + 1)
    assert cache.nbytes == 2 * 5 * 2 * 3 * (64 * bits // 8 + 2)         # MX: b x t x (K, V) x heads x (codes + 2 blocks of 32)


def test_compact_cache_errors():
    with pytest.raises(ValueError, match="not a multiple of the MX block of 32"):
        MXCache(1, 2, 48, 4, bits=8)
    with pytest.raises(ValueError, match="MX-style KV quantisation supports 8 and 4 bits, got 2"):
        MXCache(1, 2, 32, 4, bits=2)
    with pytest.raises(ValueError, match="zero-point KV quantisation supports 8 and 4 bits, got 2"):
        ZeroPointCache(1, 2, 32, 4, bits=2)
    with pytest.raises(ValueError, match="not a multiple of the MX block"):
        KVCache(tiny(d_model=96, n_heads=2, n_kv_heads=1), 1, 8, "mx8")        # head_dim 48


def test_kivi_cache_keys_per_channel_values_per_token_recent_exact():
    torch.manual_seed(0)
    R = 4
    cache = KIVICache(1, 2, 8, max_len=16, bits=2, residual=R)
    k, v = torch.randn(1, 2, 10, 8) * torch.tensor([1.0] * 7 + [20.0]), torch.randn(1, 2, 10, 8)   # one outlier key channel
    kk, vv = cache.update(k, v)
    assert cache.n_quant == 8
    assert torch.equal(kk[:, :, 8:], k[:, :, 8:]) and torch.equal(vv[:, :, 8:], v[:, :, 8:])   # newest 10 mod 4 = 2 exact
    for blk in range(2):
        sl = slice(blk * R, blk * R + R)
        want_k = float64_dequant_per_token(k[:, :, sl].transpose(2, 3), 2).transpose(2, 3)     # per channel over the block
        assert torch.allclose(kk[:, :, sl].double(), want_k, atol=1e-5)
        assert torch.allclose(vv[:, :, sl].double(), float64_dequant_per_token(v[:, :, sl], 2), atol=1e-5)
    # bytes: 8 quantised positions x (K+V codes 2*2*8*2/8 + value stats 2*4 + key stats 2*8*4/4) + 2 recent x 2*2*8*4
    assert cache.nbytes == 8 * (8 + 8 + 16) + 2 * 128
    with pytest.raises(ValueError, match="cannot crop into its quantised"):
        cache.crop(5)


def test_bytes_per_token_by_hand():
    cfg = tiny()                                                         # 2 layers, 2 kv heads, head_dim 16
    assert kv_bytes_per_token(cfg, "fp", torch.float16) == 2 * 2 * 2 * 16 * 2
    assert kv_bytes_per_token(cfg, "int8") == 2 * 2 * 2 * (16 + 4)
    assert kv_bytes_per_token(cfg, "int4") == 2 * 2 * 2 * (8 + 4)
    assert kv_bytes_per_token(cfg, "zp4") == 2 * 2 * 2 * (8 + 2 + 1)      # fp16 scale + uint8 zero point
    assert kv_bytes_per_token(cfg, "mx8") == 2 * 2 * 2 * (16 + 1)         # head_dim 16 < 32: one block per head
    assert kv_bytes_per_token(tiny(d_model=256), "mx4") == 2 * 2 * 2 * (32 + 2)   # head_dim 64: two blocks of 32
    assert kv_bytes_per_token(cfg, "kivi2", residual=32) == 2 * (2 * 2 * 16 * 2 / 8 + 2 * 4 + 2 * 16 * 4 / 32)


@pytest.mark.parametrize("scheme", ["int8", "int4", "zp4", "mx8", "mx4", "kivi4", "kivi2"])
def test_quantised_cache_generation_runs_and_int8_agrees(model, scheme):
    out = generate(model, [[1, 2, 3], [4, 5]], 20, greedy=True, kv=scheme, residual=8)
    assert [len(o) for o in out] == [20, 20]
    if scheme in ("int8", "mx8"):
        assert out == generate(model, [[1, 2, 3], [4, 5]], 20, greedy=True)


def test_lean_step_gives_the_tokens_of_decoder_forward(model, monkeypatch):
    "StepDecoder (taken for a float32 Decoder) vs Decoder.forward: sampled with a penalty, left-padded, fp and int8 caches."
    from course_lib.inference import StepDecoder
    assert StepDecoder.supports(model)
    prompts, kw = [[1, 2, 3, 4], [5, 6]], dict(temperature=0.8, top_k=30, top_p=0.9, repetition_penalty=1.3)
    lean = {kv: generate(model, prompts, 25, kv=kv, generator=torch.Generator().manual_seed(2), **kw) for kv in ("fp", "int8")}
    monkeypatch.setattr(StepDecoder, "supports", staticmethod(lambda m: False))      # every step through Decoder.forward
    for kv, out in lean.items():
        assert out == generate(model, prompts, 25, kv=kv, generator=torch.Generator().manual_seed(2), **kw)
    with pytest.raises(ValueError, match="StepDecoder needs a float32 Decoder"):
        StepDecoder(model)

def test_compiled_step_gives_the_tokens_of_decoder_forward_and_transformers(model, tmp_path):
    "generate(compile=True): torch.compile over full-length caches; greedy (left-padded) vs chapter 3's loop and transformers, sampled vs eager."
    export_hf(model, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True, dtype=torch.float32).eval()
    prompts = [[5, 17, 3, 9, 40, 2, 11], [8, 60, 1]]
    compiled = generate(model, prompts, 30, greedy=True, compile=True)   # one compiled graph: batch 2, a 37-position cache
    for p, o in zip(prompts, compiled):
        assert o == generate_no_cache(model, torch.tensor([p]), 30, greedy=True)[0, len(p):].tolist()
    ids, mask = left_pad(prompts)
    assert hf.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, min_new_tokens=30)[:, 7:].tolist() == compiled
    kw = dict(temperature=0.8, top_k=30, top_p=0.9, repetition_penalty=1.3)   # same shapes: no second compilation
    assert (generate(model, prompts, 30, compile=True, generator=torch.Generator().manual_seed(4), **kw)
            == generate(model, prompts, 30, generator=torch.Generator().manual_seed(4), **kw))
    with pytest.raises(ValueError, match="compile=True needs the fp KV cache"):
        generate(model, prompts, 30, kv="int8", compile=True)


def test_speculative_equals_target_greedy(model):
    torch.manual_seed(5)
    draft = Decoder(tiny(n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, d_ff=48)).eval()
    p = [3, 1, 4, 1, 5]
    want = generate(model, p, 30, greedy=True)
    for d, k in ((draft, 3), (model, 5)):
        got, stats = speculative_generate(model, d, p, 30, k=k)
        assert got == want
    assert stats["acceptance_rate"] == 1.0                               # the target as its own draft always agrees
    with pytest.raises(ValueError, match="draft vocabulary"):
        speculative_generate(model, Decoder(tiny(vocab_size=50)), p, 5)


def test_cache_perplexity_through_fp_cache_equals_plain_cross_entropy(model):
    import math

    from course_lib.inference import cache_perplexity
    torch.manual_seed(2)
    text = torch.randint(0, 97, (200,))
    with torch.no_grad():                                               # by hand: one window of 64, plain logits
        windows = [(text[s:s + 64], text[s + 1:s + 65]) for s in range(0, 200 - 64, 64)]
        nll = sum(torch.nn.functional.cross_entropy(model(x[None])[0], y, reduction="sum").item() for x, y in windows)
    want = math.exp(nll / (64 * len(windows)))
    assert abs(cache_perplexity(model, text, "fp", seq_len=64, chunk=16) - want) < 1e-3 * want
    assert cache_perplexity(model, text, "int4", seq_len=64, chunk=16) != want
    with pytest.raises(ValueError, match="need more than"):
        cache_perplexity(model, text[:10], "fp", seq_len=64)


def test_inference_stage_reports_every_scheme(model, tmp_path):
    from course_lib.core import RunContext, load_settings
    from course_lib.inference import KV_SCHEMES, inference_stage
    ctx = RunContext(tmp_path, load_settings(tier="ci"))
    assert "No model in this run" in inference_stage(ctx) and (tmp_path / "inference").is_dir()
    torch.manual_seed(0)
    export_hf(Decoder(tiny(vocab_size=257)), tmp_path / "pretrain" / "model")   # no tokenizer.json: UTF-8 bytes
    report = inference_stage(ctx)
    assert all(f"| {s} |" in report for s in KV_SCHEMES)
    assert ctx.summary["inference"]["fp"]["first_difference"] is None
