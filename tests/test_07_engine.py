"""Chapter 7's engine: greedy outputs under random arrival traces equal chapter 3's no-cache generate; no block leaks."""
import os
import random
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from course_lib.engine import BlockManager, LLMEngine, SamplingParams
from course_lib.model import Decoder, generate, get_config

VOCAB = 48
torch.manual_seed(0)
MODEL = Decoder(get_config("cpu-1m", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                           max_seq_len=48, init_std=0.3)).double().eval()   # float64: exact greedy comparison
_ALONE: dict = {}

def alone(prompt: list[int], n: int) -> list[int]:
    "Reference: chapter 3's generate, no cache, one request at a time."
    key = (tuple(prompt), n)
    if key not in _ALONE: _ALONE[key] = generate(MODEL, torch.tensor([prompt]), n, greedy=True)[0, len(prompt):].tolist()
    return _ALONE[key]

request = st.tuples(st.integers(0, 12),                                # arrival step
                    st.integers(0, 2),                                 # which shared prefix (0 = none)
                    st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=14),
                    st.integers(1, 8))                                 # max_tokens

@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trace=st.lists(request, min_size=1, max_size=6), block_size=st.sampled_from([2, 4, 8]),
       num_blocks=st.integers(12, 40), budget=st.sampled_from([3, 8, 64]), max_seqs=st.integers(1, 5),
       prefix_caching=st.booleans())
def test_greedy_equal_under_random_arrivals(trace, block_size, num_blocks, budget, max_seqs, prefix_caching):
    prefixes = {0: [], 1: list(range(9)), 2: list(range(9, 0, -1)) + [5, 5, 5]}
    engine = LLMEngine(MODEL, num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_seqs,
                       max_num_batched_tokens=budget, enable_prefix_caching=prefix_caching)
    pending = sorted(((t, prefixes[p] + body, n) for t, p, body, n in trace), key=lambda r: r[0])
    for _, prompt, n in pending:                  # a request larger than the whole pool can never be served:
        if -(-(len(prompt) + n) // block_size) > num_blocks:   # the engine must refuse it up front, not hang
            with pytest.raises(ValueError, match="KV blocks"): engine.add_request(prompt, SamplingParams(max_tokens=n))
    pending = [r for r in pending if -(-(len(r[1]) + r[2]) // block_size) <= num_blocks]
    ids, got, step = {}, {}, 0
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= step:
            _, prompt, n = pending.pop(0)
            ids[engine.add_request(prompt, SamplingParams(max_tokens=n))] = (prompt, n)
        for out in engine.step():
            got.setdefault(out.seq_id, []).append(out.token)
        step += 1
        assert step < 2000, "the engine stopped making progress"
    for seq_id, (prompt, n) in ids.items():
        assert got[seq_id] == alone(prompt, n)
    assert engine.bm.num_free == num_blocks and all(r == 0 for r in engine.bm.ref_counts)   # no leaks
    assert not engine.seqs

def test_abort_frees_blocks_and_others_continue():
    engine = LLMEngine(MODEL, num_blocks=16, block_size=4)
    a = engine.add_request(list(range(10)), SamplingParams(max_tokens=20))
    b = engine.add_request(list(range(5)), SamplingParams(max_tokens=5))
    got = [o.token for _ in range(2) for o in engine.step() if o.seq_id == b]
    assert engine.bm.num_used > 0
    engine.abort(a)
    got += [o.token for _ in range(10) for o in engine.step() if o.seq_id == b]
    assert got == alone(list(range(5)), 5)
    assert engine.bm.num_used == 0

def test_stop_ids_end_a_request():
    want = alone([1, 2, 3], 6)
    engine = LLMEngine(MODEL, num_blocks=8, block_size=4)
    got = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=6, stop_ids=(want[2],)))[0]
    assert got == want[:want.index(want[2])]

def test_seeded_sampling_reproduces_and_matches_torch():
    "Temperature sampling with a seed draws what torch.multinomial draws from the filtered distribution."
    from course_lib.model import filter_logits
    engine = LLMEngine(MODEL, num_blocks=8, block_size=4)
    got = engine.generate([[4, 5]], SamplingParams(max_tokens=1, temperature=0.8, top_k=5, seed=7))[0]
    logits = MODEL(torch.tensor([[4, 5]]))[0, -1]
    want = torch.multinomial(filter_logits(logits, 0.8, 5).softmax(-1), 1, generator=torch.Generator().manual_seed(7))
    assert got == [int(want)]

def test_bad_requests_name_the_problem():
    engine = LLMEngine(MODEL, num_blocks=4, block_size=4)
    for prompt, params, words in [([], SamplingParams(), "empty"), ([VOCAB], SamplingParams(), "token ids"),
                                  ([1] * 40, SamplingParams(max_tokens=20), "context"),
                                  ([1] * 10, SamplingParams(max_tokens=10), "KV blocks"),
                                  ([1], SamplingParams(max_tokens=0), "max_tokens")]:
        with pytest.raises(ValueError, match=words): engine.add_request(prompt, params)

def test_fork_copy_on_write_keeps_parent_blocks():
    bm = BlockManager(8, 4)
    parent = []; bm.prepare_append(parent, 0, 6)
    child = bm.fork(parent)
    bm.prepare_append(parent, 6, 7)                                    # parent writes first: it gets the copy
    assert parent[1] != child[1] and bm.pending_copies == [(child[1], parent[1])]
    bm.prepare_append(child, 6, 7)                                     # child is now the block's only holder: no copy
    assert len(bm.pending_copies) == 1
    bm.free_table(parent); bm.free_table(child)
    assert bm.num_free == 8

def test_triton_paged_attention_matches_reference_under_interpreter():
    "Float, int8 and int4 pools (packed codes dequantised in the kernel) against the PyTorch reference path."
    code = ("import torch; from course_lib.paged_attention import paged_attention_reference, paged_attention_triton\n"
            "from course_lib.kernels import quantize_asym, pack_bits\n"
            "torch.manual_seed(0); k = torch.randn(64, 2, 16); v = torch.randn(64, 2, 16); q = torch.randn(3, 4, 16)\n"
            "t = [[5, 1, 7], [0], [2, 3, 4, 6]]; n = [20, 3, 29]\n"
            "d = (paged_attention_triton(q, k, v, t, n, 8) - paged_attention_reference(q, k, v, t, n, 8)).abs().max()\n"
            "assert d < 1e-5, d\n"
            "def pool(x, bits): c, s, z = quantize_asym(x, bits); return pack_bits(c, bits), s[..., 0], z[..., 0]\n"
            "for bits in (8, 4):\n"
            "    kq, vq = pool(k, bits), pool(v, bits)\n"
            "    d = (paged_attention_triton(q, kq, vq, t, n, 8, bits) - paged_attention_reference(q, kq, vq, t, n, 8, bits)).abs().max()\n"
            "    assert d < 1e-5, (bits, d)\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "1"},
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]

DENSE_CHECK = """
import torch
from course_lib.paged_attention import paged_attention_reference, paged_attention_triton

def check_pools(q, kp, vp, k_hat, v_hat, tables, lens, B, bits):
    # the reference vs dense float64 attention on the values dequantised by hand (k_hat, v_hat (slots, h_kv, hd)); Triton vs the reference
    n_heads, h_kv, hd = q.shape[1], k_hat.shape[1], q.shape[2]
    ref = paged_attention_reference(q, kp, vp, tables, lens, B, bits)
    for r, (t, n) in enumerate(zip(tables, lens)):
        slots = torch.tensor([t[i // B] * B + i % B for i in range(n)])
        kk, vv = k_hat[slots].repeat_interleave(n_heads // h_kv, 1), v_hat[slots].repeat_interleave(n_heads // h_kv, 1)   # (n, h, hd)
        w = (torch.einsum('hd,nhd->hn', q[r].double(), kk) / hd ** 0.5).softmax(-1)
        assert (torch.einsum('hn,nhd->hd', w, vv) - ref[r]).abs().max() < 1e-5, (B, bits)
    got = paged_attention_triton(q, kp, vp, tables, lens, B, bits)
    assert torch.isfinite(got).all() and (got - ref).abs().max() < 1e-5, (B, bits, (got - ref).abs().max())
"""

def run_interpreted(check: str):
    "Run a check script (DENSE_CHECK's helper defined) in a child with TRITON_INTERPRET=1, set before Triton is imported; it prints 'ok'."
    out = subprocess.run([sys.executable, "-c", DENSE_CHECK + check], env={**os.environ, "TRITON_INTERPRET": "1"},
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]

KIVI_KERNEL_CHECK = """
from course_lib.kernels import quantize_asym, pack_bits

def kivi_pools(k, v, bits, B, partial):
    # a KIVI layer from float k, v (slots, h_kv, hd): keys per channel over each block, values per token; blocks in partial {block: row} as float rows
    n, h, d = k.shape
    kc, ks, kz = quantize_asym(k.view(n // B, B, h, d), bits, dim=1)             # stats (blocks, 1, h, d)
    vc, vs, vz = quantize_asym(v, bits)                                           # stats (slots, h, 1)
    k_hat = (kc.double() * ks.double() + kz.double()).view(n, h, d)              # what attention should see, by hand
    v_hat = vc.double() * vs.double() + vz.double()
    row_of_block = torch.full((n // B,), -1, dtype=torch.long)
    rows_k, rows_v = torch.full((len(partial) * B, h, d), float('nan')), torch.full((len(partial) * B, h, d), float('nan'))
    for block, row in partial.items():
        row_of_block[block] = row
        rows_k[row * B:(row + 1) * B], rows_v[row * B:(row + 1) * B] = k[block * B:(block + 1) * B], v[block * B:(block + 1) * B]
        k_hat[block * B:(block + 1) * B], v_hat[block * B:(block + 1) * B] = k[block * B:(block + 1) * B], v[block * B:(block + 1) * B]
        ks[block], kz[block] = float('nan'), float('nan')                        # poison: a float row's block statistics are never read
    return ((pack_bits(kc, bits).view(n, h, -1), ks[:, 0], kz[:, 0], rows_k, row_of_block),
            (pack_bits(vc, bits), vs[..., 0], vz[..., 0], rows_v, row_of_block), k_hat, v_hat)

torch.manual_seed(0)
for B, h_kv, n_heads, hd, tables, lens in [(8, 2, 4, 16, [[5, 1, 7], [0], [2, 3, 4, 6]], [20, 3, 29]),   # odd lengths
                                            (2, 1, 3, 8, [[3], [1, 0, 2]], [1, 5])]:                        # tiny blocks, 3 heads on 1
    nb = max(max(t) for t in tables) + 1
    k, v, q = torch.randn(nb * B, h_kv, hd), torch.randn(nb * B, h_kv, hd), torch.randn(len(tables), n_heads, hd)
    partial = {}
    for t, n in zip(tables, lens):
        if n % B: partial[t[n // B]] = len(partial)                               # each sequence's partly filled last block
    for bits in (4, 2):
        kp, vp, k_hat, v_hat = kivi_pools(k, v, bits, B, partial)
        for t, n in zip(tables, lens):                                            # poison: float-row slots past the length
            if n % B:
                r = partial[t[n // B]]; kp[3][r * B + n % B:(r + 1) * B] = float('nan'); vp[3][r * B + n % B:(r + 1) * B] = float('nan')
        check_pools(q, kp, vp, k_hat, v_hat, tables, lens, B, bits)
print('ok')
"""

def test_triton_paged_attention_reads_kivi_pools_under_interpreter():
    "KIVI pools (per-channel key statistics per block, float rows for partly filled blocks, poisoned where never read): reference vs dense float64 on hand-dequantised keys, Triton vs reference."
    run_interpreted(KIVI_KERNEL_CHECK)

ZP_MX_KERNEL_CHECK = """
from course_lib.kernels import pack_bits, quantize_mx, quantize_zp

def by_hand(packed, bits):
    # split-halves unpacking written out: byte j's bit-field i is dimension j + i * (bytes per row)
    return torch.cat([(packed.long() >> (bits * i)) & (2 ** bits - 1) for i in range(8 // bits)], -1).double()

def pools(x, scheme, bits, dead):
    # a zp or MX layer from float x (slots, h_kv, hd), the values it holds dequantised by hand in float64; slots in `dead` poisoned
    if scheme == 'zp':
        c, s, zp = quantize_zp(x, bits)                                           # (slots, h, hd), (slots, h, 1) x 2
        planes, x_hat = [pack_bits(c, bits), s[..., 0], zp[..., 0]], (by_hand(pack_bits(c, bits), bits) - zp.double()) * s.double()
        planes[1][dead] = float('nan')
    else:
        block = min(32, x.shape[-1])
        c, e = quantize_mx(x, bits, block)                                        # (slots, h, hd), (slots, h, hd/block)
        step = torch.pow(2.0, e.double() - 127 - (bits - 2)).repeat_interleave(block, -1)
        planes, x_hat = [pack_bits(c, bits), e], (by_hand(pack_bits(c, bits), bits) - 2 ** (bits - 1)) * step
        planes[1][dead] = 0xFF                                                    # exponent 255: inf/nan steps
    planes[0][dead] = 0xFF
    return tuple(planes), x_hat

torch.manual_seed(0)
for B, h_kv, n_heads, hd, tables, lens in [(8, 2, 4, 16, [[5, 1, 7], [0], [2, 3, 4, 6]], [20, 3, 29]),   # odd lengths
                                            (2, 1, 3, 8, [[3], [1, 0, 2]], [1, 5]),                     # tiny blocks, 3 heads on 1
                                            (4, 2, 2, 64, [[1, 2], [4]], [7, 2])]:                      # MX: two exponents a row
    nb = max(max(t) for t in tables) + 2                                          # the last block is never read
    used = {t[i // B] * B + i % B for t, n in zip(tables, lens) for i in range(n)}
    dead = torch.tensor([s for s in range(nb * B) if s not in used])
    k, v = torch.randn(nb * B, h_kv, hd) * 2 + 1, torch.randn(nb * B, h_kv, hd)  # keys off centre: zp's zero point matters
    q = torch.randn(len(tables), n_heads, hd)
    for scheme, bits in (('zp', 4), ('zp', 8), ('mx', 8), ('mx', 4)):
        (kp, k_hat), (vp, v_hat) = pools(k, scheme, bits, dead), pools(v, scheme, bits, dead)
        check_pools(q, kp, vp, k_hat, v_hat, tables, lens, B, bits)
print('ok')
"""

def test_triton_paged_attention_reads_zp_and_mx_pools_under_interpreter():
    "zp (uint8 zero points) and MX (E8M0 exponents per block of the head) pools, poisoned where never read: reference vs dense float64 on hand-dequantised values, Triton vs reference."
    run_interpreted(ZP_MX_KERNEL_CHECK)

# --- quantised KV in the pool (chapter 6's int8/int4, zp4 and mx8/mx4 schemes) ---

def _prompts(seed: int, n: int = 5) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.randrange(1, 20))] for _ in range(n)]

@pytest.mark.parametrize("kv", ["int8", "int4", "zp4", "mx8", "mx4"])
def test_quantised_paged_kv_equals_chapter6_quantised_cache(kv):
    "Greedy through a quantised pool (chunked prefill, prefix cache) equals chapter 6's contiguous quantised cache; bytes match its formula."
    from course_lib.inference import generate as generate6, kv_bytes_per_token
    prompts = _prompts(1)
    prompts += [prompts[0] + [3, 4, 5]]                               # reuses the first prompt's cached blocks
    engine = LLMEngine(MODEL, num_blocks=40, block_size=4, max_num_batched_tokens=8, kv_scheme=kv)
    got = engine.generate(prompts[:-1], SamplingParams(max_tokens=8)) + engine.generate(prompts[-1:], SamplingParams(max_tokens=8))
    want = [generate6(MODEL, p, 8, greedy=True, kv=kv) for p in prompts]
    assert got == want
    if kv != "int4": assert want != [generate6(MODEL, p, 8, greedy=True, kv="int4") for p in prompts]   # the schemes give other tokens
    assert engine.metrics()["cached_prompt_tokens"] > 0
    assert engine.cache.nbytes == kv_bytes_per_token(MODEL.cfg, kv, torch.float64) * 40 * 4
    assert engine.bm.num_used == 0

def test_int8_paged_kv_stays_close_to_the_float_path():
    "One batched step's logits with int8 KV are within 2% of the float pool's (and pick the same tokens); int4 drifts more."
    logits = {}
    for kv in ("fp", "int8", "int4"):
        engine = LLMEngine(MODEL, num_blocks=40, block_size=4, kv_scheme=kv)
        for p in _prompts(2): engine.add_request(p)
        logits[kv] = engine._forward(engine.scheduler.schedule())     # (5, V)
    err = {kv: float((logits[kv] - logits["fp"]).abs().max() / logits["fp"].abs().max()) for kv in ("int8", "int4")}
    assert err["int8"] < 0.02 and err["int8"] < err["int4"], err
    assert torch.equal(logits["int8"].argmax(-1), logits["fp"].argmax(-1))

# --- KIVI in the pool: the block is KIVI's group (residual = block_size) ---

def test_paged_cache_refuses_schemes_it_does_not_store():
    "A KV scheme the pool has no layout for is refused by name, never stored as another scheme's codes."
    for kv in ("int3", "mx2", "zp"):
        with pytest.raises(ValueError, match=f"'{kv}'"): LLMEngine(MODEL, num_blocks=4, block_size=4, kv_scheme=kv)

@pytest.mark.parametrize("kv", ["kivi4", "kivi2"])
def test_kivi_paged_kv_equals_chapter6_kivi_cache(kv):
    "Greedy through a KIVI pool (prefix-cache hits, n = 2 forks) equals chapter 6's contiguous KIVICache with residual = block_size."
    from course_lib.inference import generate as generate6, kv_bytes_per_token
    prompts = _prompts(1)
    prompts += [prompts[0] + [3, 4, 5]]                               # reuses the first prompt's cached (quantised) blocks
    want = [generate6(MODEL, p, 8, greedy=True, kv=kv, residual=4) for p in prompts]
    # the comparison tells the schemes apart: int4, or KIVI over groups of 8, give other tokens
    assert want != [generate6(MODEL, p, 8, greedy=True, kv="int4") for p in prompts]
    assert want != [generate6(MODEL, p, 8, greedy=True, kv=kv, residual=8) for p in prompts]
    # budget 64 > every prompt: prefill is not chunked (chunked prefill: test_kivi_chunked_prefill_equals_chapter6_kivi_cache)
    engine = LLMEngine(MODEL, num_blocks=40, block_size=4, max_num_batched_tokens=64, kv_scheme=kv)
    got = engine.generate(prompts[:-1], SamplingParams(max_tokens=8)) + engine.generate(prompts[-1:], SamplingParams(max_tokens=8))
    assert got == want
    assert engine.metrics()["cached_prompt_tokens"] > 0 and engine.bm.num_used == 0
    forked = engine.generate(prompts[1:4], SamplingParams(max_tokens=8, n=2))   # the partly filled block is copied on write
    assert forked == [[w, w] for w in want[1:4]] and engine.metrics()["preemptions"] == 0 and engine.bm.num_used == 0
    rows = engine.cache.k_recent.shape[1] // 4                         # float rows allocated: one per partly filled block at the peak
    assert engine.cache.nbytes == kv_bytes_per_token(MODEL.cfg, kv, torch.float64, residual=4) * 40 * 4 + rows * 2 * (2 * 4 * 2 * 8 * 8)

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kivi_greedy_equal_under_random_arrivals(seed):
    "Requests (some sharing a prefix) arrive at random steps into a KIVI-2 pool; each gets chapter 6's KIVI answer, and every block comes back."
    from course_lib.inference import generate as generate6
    rng = random.Random(seed)
    shared = list(range(9))                                             # a cached prefix: two full blocks of 4
    trace = sorted((rng.randrange(8), rng.choice([[], shared]) + [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 12))],
                    rng.randrange(1, 8)) for _ in range(6))
    engine = LLMEngine(MODEL, num_blocks=48, block_size=4, max_num_seqs=4, max_num_batched_tokens=64, kv_scheme="kivi2")
    ids, got, step = {}, {}, 0
    while trace or engine.has_unfinished():
        while trace and trace[0][0] <= step:
            _, prompt, n = trace.pop(0)
            ids[engine.add_request(prompt, SamplingParams(max_tokens=n))] = (prompt, n)
        for out in engine.step(): got.setdefault(out.seq_id, []).append(out.token)
        step += 1
    assert {i: got[i] for i in ids} == {i: generate6(MODEL, p, n, greedy=True, kv="kivi2", residual=4) for i, (p, n) in ids.items()}
    assert engine.bm.num_free == 48 and engine.metrics()["preemptions"] == 0
    assert engine.stats["cached_prompt_tokens"] > 0                    # the shared prefix was served from the cache

def test_kivi_float_rows_follow_partly_filled_blocks():
    "Hand-worked (B = 4): prompts of 5, 6 and 8 tokens leave 2 partly filled blocks, a decode step 3 (the 8-token one starts a block); freed rows are reused."
    engine = LLMEngine(MODEL, num_blocks=16, block_size=4, max_num_batched_tokens=64, kv_scheme="kivi4")
    for n in (5, 6, 8): engine.add_request(list(range(n)), SamplingParams(max_tokens=4))
    rows = []
    for _ in range(3):
        engine.step(); rows.append(len([b for b in engine.cache.rows if engine.bm.ref_counts[b] > 0]))
    assert rows == [2, 3, 2]                                           # step 3: the 6-token prompt's block fills at its 8th token
    row_bytes = 2 * 2 * 4 * 2 * 8 * 8                                  # K and V x layers x B x h_kv x hd x float64
    assert engine.cache.nbytes == 16 * 4 * 80 + 3 * row_bytes          # 80 bytes a token: 2 layers x (2*2*8/2 codes + 2*4 value stats + 2*8*4/4 key stats)
    while engine.has_unfinished(): engine.step()
    engine.generate([[1, 2]], SamplingParams(max_tokens=2))
    assert engine.cache.k_recent.shape[1] == 3 * 4 and engine.bm.num_used == 0   # rows of freed blocks reclaimed, none added

def test_prefill_chunks_end_on_block_boundaries():
    """Hand-worked, blocks of 4, max_tokens 1: a 10-token prompt, budget 7 -> chunks 4, 6 (the last); budget 3 cannot reach a
    boundary from 0 and runs alone -> 3, 1, 3, 3. Prompts of 10 and 5, budget 6: the 5-token one would get 2 tokens beside
    the first chunk (no boundary in reach), so it waits until a step has room for all of it."""
    for prompts, budget, want in (([10], 7, [[(0, 4)], [(0, 6)]]), ([10], 3, [[(0, 3)], [(0, 1)], [(0, 3)], [(0, 3)]]),
                                  ([10, 5], 6, [[(0, 4)], [(0, 6)], [(1, 5)]])):
        engine = LLMEngine(MODEL, num_blocks=8, block_size=4, max_num_batched_tokens=budget, enable_prefix_caching=False)
        log, schedule = [], engine.scheduler.schedule
        def logged():
            batch = schedule(); log.append([(s.seq_id, n) for s, n in batch]); return batch
        engine.scheduler.schedule = logged
        engine.generate([list(range(n)) for n in prompts], SamplingParams(max_tokens=1))
        assert log == want, (prompts, budget, log)
        assert engine.bm.num_used == 0

@pytest.mark.parametrize("kv", ["kivi4", "kivi2"])
def test_kivi_chunked_prefill_equals_chapter6_kivi_cache(kv):
    """Chunks of a long prefill end on block boundaries, so a KIVI pool quantises each block as it fills, as chapter 6's
    KIVICache does (a chunk ending inside a block would see that block's keys in float): greedy tokens equal it exactly."""
    from course_lib.inference import generate as generate6
    prompts = [p + list(range(10)) for p in _prompts(5, 4)]             # long enough for several chunks
    want = [generate6(MODEL, p, 6, greedy=True, kv=kv, residual=4) for p in prompts]
    # budget 9, at most 3 decodes beside a prefill: every non-final chunk ends on a boundary (8 tokens, or 4)
    engine = LLMEngine(MODEL, num_blocks=40, block_size=4, max_num_batched_tokens=9, kv_scheme=kv)
    assert engine.generate(prompts, SamplingParams(max_tokens=6)) == want
    assert engine.stats["steps"] > len(prompts) + 6 and engine.bm.num_used == 0   # prefills were chunked

def test_kivi_preemption_recomputes_without_leaks():
    "A pool small enough to preempt forked KIVI choices: every choice completes, every block and float row comes back."
    engine = LLMEngine(MODEL, num_blocks=14, block_size=4, max_num_seqs=8, kv_scheme="kivi2")
    got = engine.generate(_prompts(3, 3), SamplingParams(max_tokens=10, n=2))
    assert [[len(c) for c in r] for r in got] == [[10, 10]] * 3
    assert engine.metrics()["preemptions"] > 0 and engine.bm.num_used == 0
    assert all(engine.bm.ref_counts[b] == 0 for b in engine.cache.rows)   # what rows remain belong to free blocks: reclaimable

# --- n > 1 choices: one prefill, blocks shared by fork, copy-on-write ---

def test_n_choices_share_prompt_blocks_and_equal_separate_seeded_requests():
    "n = 3: one prefill, three block tables over the same blocks; choice i draws what a lone request seeded seed + i draws."
    prompt, params = list(range(10)), dict(max_tokens=6, temperature=1.0)   # 3 blocks of 4, the last one partly filled
    engine = LLMEngine(MODEL, num_blocks=20, block_size=4)
    rid = engine.add_request(prompt, SamplingParams(**params, seed=3, n=3))
    got = [[] for _ in range(3)]
    outs = engine.step()                                               # prefill once, then fork into 3
    assert sorted(o.index for o in outs) == [0, 1, 2] and {o.seq_id for o in outs} == {rid}
    assert engine.bm.num_used == 3 and engine.stats["prompt_tokens"] == 10
    for o in outs: got[o.index].append(o.token)
    for o in engine.step(): got[o.index].append(o.token)              # each writes into the shared last block:
    assert engine.bm.num_used == 3 + 2                                 # two copy it, the last holder writes in place
    while engine.has_unfinished():
        for o in engine.step(): got[o.index].append(o.token)
    assert engine.bm.num_used == 0 and not engine.seqs
    alone_engine = LLMEngine(MODEL, num_blocks=20, block_size=4)
    assert got == [alone_engine.generate([prompt], SamplingParams(**params, seed=3 + i))[0] for i in range(3)]
    assert len({tuple(g) for g in got}) > 1                            # the choices differ

def test_n_greedy_choices_with_int8_kv_and_preemption():
    "Greedy choices are all the lone greedy answer, through an int8 pool small enough to preempt forked choices."
    from course_lib.inference import generate as generate6
    prompts = _prompts(3, 3)
    engine = LLMEngine(MODEL, num_blocks=14, block_size=4, max_num_seqs=8, kv_scheme="int8")
    got = engine.generate(prompts, SamplingParams(max_tokens=10, n=2))
    want = [generate6(MODEL, p, 10, greedy=True, kv="int8") for p in prompts]
    assert got == [[w, w] for w in want]
    assert engine.metrics()["preemptions"] > 0 and engine.bm.num_used == 0

def test_abort_frees_every_choice_and_n_is_checked():
    engine = LLMEngine(MODEL, num_blocks=20, block_size=4, max_num_seqs=4)
    rid = engine.add_request(list(range(9)), SamplingParams(max_tokens=8, n=4))
    engine.step(); engine.step()
    assert len(engine.seqs) == 4 and engine.bm.num_used > 3
    engine.abort(rid)
    assert engine.bm.num_used == 0 and not engine.seqs and not engine.has_unfinished()
    with pytest.raises(ValueError, match="n .choices"): engine.add_request([1], SamplingParams(n=5))
    with pytest.raises(ValueError, match="n .choices"): engine.add_request([1], SamplingParams(n=0))

# --- LoRA adapters at serve time (chapter 5's peft-layout adapters), checked against merged-weight models ---

@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    "Two peft-layout adapters on MODEL with non-zero B (so they change the outputs), on different projections."
    import copy
    from course_lib.lora import inject_lora, lora_layers, save_adapter
    folders = {}
    for name, targets, seed in [("a1", ["q_proj", "v_proj"], 1), ("a2", ["k_proj", "gate_proj", "down_proj"], 2)]:
        m = copy.deepcopy(MODEL); torch.manual_seed(seed)
        inject_lora(m, targets, r=4, alpha=8)
        for layer in lora_layers(m).values(): torch.nn.init.normal_(layer.lora_B.weight, std=0.5)
        folders[name] = save_adapter(m, tmp_path_factory.mktemp(name))
    return folders

def _merged_greedy(folder, prompt: list[int], n: int) -> list[int]:
    "Reference: chapter 5's load_adapter + merge_lora on a fresh copy, then chapter 3's no-cache generate."
    import copy
    from course_lib.lora import load_adapter, merge_lora
    m = copy.deepcopy(MODEL)
    if folder is not None: load_adapter(m, folder); merge_lora(m)
    return generate(m, torch.tensor([prompt]), n, greedy=True)[0, len(prompt):].tolist()

def test_lora_adapters_in_one_batch_equal_their_merged_models(adapters):
    import copy
    prompts = _prompts(4, 6)
    names = [None, "a1", "a2", "a1", None, "a2"]
    engine = LLMEngine(copy.deepcopy(MODEL), num_blocks=40, block_size=4, max_num_batched_tokens=16, adapters=adapters)
    got = engine.generate(prompts, [SamplingParams(max_tokens=8, adapter=a) for a in names])
    assert got == [_merged_greedy(None if a is None else adapters[a], p, 8) for p, a in zip(prompts, names)]
    assert got[1] != _merged_greedy(None, prompts[1], 8)              # the adapter does change the answer
    assert engine.bm.num_used == 0

def test_lora_prefix_cache_is_per_adapter(adapters):
    "The same prompt under the base, then a1: no blocks reused across adapters, reused within one."
    import copy
    prompt = list(range(13))
    engine = LLMEngine(copy.deepcopy(MODEL), num_blocks=40, block_size=4, adapters=adapters)
    assert engine.generate([prompt], SamplingParams(max_tokens=4))[0] == _merged_greedy(None, prompt, 4)
    assert engine.generate([prompt], SamplingParams(max_tokens=4, adapter="a1"))[0] == _merged_greedy(adapters["a1"], prompt, 4)
    assert engine.stats["cached_prompt_tokens"] == 0
    engine.generate([prompt], SamplingParams(max_tokens=4, adapter="a1"))
    assert engine.stats["cached_prompt_tokens"] == 12
    with pytest.raises(ValueError, match="unknown LoRA adapter 'a3'"): engine.add_request([1], SamplingParams(adapter="a3"))


def test_float32_decode_pass_runs_step_decoder_with_unchanged_greedy_tokens():
    "A float32 model's decode passes go through chapter 6's StepDecoder; greedy tokens still equal chapter 3's no-cache generate."
    import copy
    m32 = copy.deepcopy(MODEL).float()
    engine = LLMEngine(m32, num_blocks=40, block_size=4, max_num_batched_tokens=8)
    assert engine.step_decoder is not None and LLMEngine(MODEL).step_decoder is None   # float64: the module path
    prompts = _prompts(2, 3)
    want = [generate(m32, torch.tensor([p]), 8, greedy=True)[0, len(p):].tolist() for p in prompts]
    assert engine.generate(prompts, SamplingParams(max_tokens=8)) == want and engine.bm.num_used == 0
