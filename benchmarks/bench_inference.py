"""Inference: our KV-cache decode loop vs transformers `generate`, quantised KV caches, int4 weights, speculative decoding.

Trains two small byte-level models on the embedded corpus once (the cpu-1m target and the cpu-draft draft;
cached under --work), then measures, in one process:
  1. decode tokens/s, greedy, fp32: ours (`course_lib.inference.generate`) vs transformers `generate` on the
     exported model, batch 1 and 8, at cpu-1m (trained) and gpu-25m (random weights: speed does not depend
     on them); the tokens must be identical;
  2. the speed-up of the cache over chapter 3's no-cache loop at 128/512/1024 new tokens (cpu-1m shape with
     a 1,100-token window, random weights);
  3. per KV scheme (fp, int8, int4, kivi4, kivi2): bytes/token (vs a 16-bit cache), validation perplexity
     through the cache (teacher-forced in chunks, which is exactly what decoding sees) and its delta, greedy
     agreement with fp over 256 tokens; a trade-off plot;
  4. int4 group-wise weights, plain and AWQ-scaled: bytes and perplexity delta;
  5. speculative decoding with the draft: acceptance rate, tokens per target pass, wall-clock speed-up.
The machine is shared, so timings are noisy: rounds are interleaved and the median is reported.

    .venv/bin/python benchmarks/bench_inference.py                 # everything (~10 min on 2 busy cores)
    .venv/bin/python benchmarks/bench_inference.py --quick         # smaller lengths, fewer rounds
    .venv/bin/python benchmarks/bench_inference.py --threads 2     # a quiet machine
    .venv/bin/python benchmarks/bench_inference.py --parts decode --rounds 7   # decode speed only (random weights, no training)
Ends with one JSON line.
"""
import argparse
import copy
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

from course_lib.core import embedded_corpus
from course_lib.inference import KV_SCHEMES, cache_perplexity, generate, kv_bytes_per_token, quantize_weights, speculative_generate
from course_lib.model import Decoder, export_hf, from_hf, get_config
from course_lib.model import generate as generate_no_cache
from course_lib.pretrain import TrainConfig, train, write_byte_tokens

warnings.filterwarnings("ignore")


def trained(preset: str, work: Path, steps: int) -> Decoder:
    "A byte-level model of `preset` trained for `steps` on the embedded corpus (reused when already trained)."
    tokens = work / "byte_tokens"
    if not (tokens / "meta.json").is_file():
        write_byte_tokens(embedded_corpus(max_bytes=3_000_000), tokens)
    out = work / f"{preset}-{steps}"
    if not (out / "model" / "config.json").is_file():
        train(TrainConfig(preset=preset, steps=steps, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=20, eval_every=steps,
                          ckpt_every=steps, device="cpu", dtype="float32"), tokens, out)
    return from_hf(out / "model").eval()


def val_tokens(work: Path, n: int) -> torch.Tensor:
    import numpy as np
    meta = json.loads((work / "byte_tokens" / "meta.json").read_text())
    ids = np.fromfile(work / "byte_tokens" / "val.bin", dtype=meta["dtype"])[:n]
    return torch.from_numpy(ids.astype("int64"))


def median_time(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode_speed(model: Decoder, batch: int, new: int, rounds: int, tmp: Path) -> dict:
    "tok/s of ours and of transformers generate (greedy, same prompts), and whether the tokens agree."
    from transformers import AutoModelForCausalLM
    export_hf(model, tmp)
    hf = AutoModelForCausalLM.from_pretrained(tmp, local_files_only=True, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.cfg.vocab_size, (batch, 16), generator=g)
    ours_out = hf_out = None
    def ours():
        nonlocal ours_out; ours_out = generate(model, prompts, new, greedy=True)
    def theirs():
        nonlocal hf_out
        with torch.no_grad():
            hf_out = hf.generate(prompts, max_new_tokens=new, min_new_tokens=new, do_sample=False)[:, 16:].tolist()
    ours(); theirs()                                                    # warm-up
    t_ours, t_hf = [], []
    for _ in range(rounds):                                             # interleaved rounds
        t_ours.append(median_time(ours, 1)); t_hf.append(median_time(theirs, 1))
    toks = batch * new
    return {"ours_tok_s": toks / statistics.median(t_ours), "hf_tok_s": toks / statistics.median(t_hf),
            "identical": ours_out == hf_out}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/bench_inference", help="trained models and the plot go here")
    p.add_argument("--steps", type=int, default=300, help="training steps of the target and the draft")
    p.add_argument("--new", type=int, default=200, help="new tokens per decode-speed run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch threads (on a shared, busy CPU 1 beats 2 by far)")
    p.add_argument("--parts", default="decode,cache,kv,weights,spec", help="comma-separated: decode,cache,kv,weights,spec")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work); work.mkdir(parents=True, exist_ok=True)
    lengths = (128, 256) if args.quick else (128, 512, 1024)
    result = {}

    parts = set(args.parts.split(","))
    if unknown := parts - {"decode", "cache", "kv", "weights", "spec"}: p.error(f"unknown parts: {', '.join(sorted(unknown))}")
    torch.manual_seed(0)
    if parts & {"kv", "weights", "spec"}:
        target, draft = trained("cpu-1m", work, args.steps), trained("cpu-draft", work, args.steps)
        n_val = 4096 if args.quick else 16384
        val = val_tokens(work, n_val + 8 * 128)
        val, calibration = val[:n_val], val[n_val:].view(8, 128)       # AWQ calibrates on tokens the perplexity does not see
    else: target = Decoder(get_config("cpu-1m")).eval()                   # decode speed does not depend on the weights

    # 1. decode speed vs transformers
    if "decode" in parts: print(f"{'model':>8} {'batch':>5} {'ours tok/s':>11} {'HF tok/s':>9} {'ratio':>6} {'same tokens':>11}")
    models = {"cpu-1m": target, "gpu-25m": Decoder(get_config("gpu-25m")).eval()} if "decode" in parts else {}
    for name, m in models.items():
        for batch in (1, 8):
            r = decode_speed(m, batch, args.new if name == "cpu-1m" else args.new // 2, args.rounds, work / f"hf-{name}")
            result[f"decode_{name}_b{batch}"] = r
            print(f"{name:>8} {batch:>5} {r['ours_tok_s']:11.0f} {r['hf_tok_s']:9.0f} {r['ours_tok_s'] / r['hf_tok_s']:6.2f} {str(r['identical']):>11}")

    # 2. cache vs no cache
    if "cache" in parts: cache_speedup(result, lengths, args.rounds)
    if "kv" in parts: kv_schemes(result, target, val, args.steps, work)
    if "weights" in parts: int4_weights(result, target, val, calibration)
    if "spec" in parts: speculative(result, target, draft, val)
    print(json.dumps(result, default=float))


def cache_speedup(result: dict, lengths, rounds: int):
    long = Decoder(get_config("cpu-1m", max_seq_len=max(lengths) + 8)).eval()
    print(f"\n{'new tokens':>10} {'no cache s':>10} {'cache s':>8} {'speed-up':>8}")
    for n in lengths:
        t_no = median_time(lambda: generate_no_cache(long, torch.tensor([[1]]), n, greedy=True), 1)
        t_kv = median_time(lambda: generate(long, [1], n, greedy=True), max(1, rounds // 2))
        result[f"cache_speedup_{n}"] = t_no / t_kv
        print(f"{n:>10} {t_no:10.2f} {t_kv:8.2f} {t_no / t_kv:7.1f}x")


def kv_schemes(result: dict, target: Decoder, val: torch.Tensor, steps: int, work: Path):
    base_ppl = cache_perplexity(target, val, None)
    fp16_bytes = kv_bytes_per_token(target.cfg, "fp", torch.float16)
    prompt = val[:32].tolist()
    ref = generate(target, prompt, 200, greedy=True)
    print(f"\nplain forward perplexity {base_ppl:.3f} (bytes)")
    print(f"{'scheme':>6} {'bytes/token':>11} {'vs 16-bit':>9} {'perplexity':>10} {'delta':>7} {'greedy agree':>12} {'first diff':>10}")
    rows = {}
    for scheme in KV_SCHEMES:
        ppl = cache_perplexity(target, val, scheme)
        out = generate(target, prompt, 200, greedy=True, kv=scheme)
        agree = sum(a == b for a, b in zip(out, ref)) / len(ref)
        first = next((i for i, (a, b) in enumerate(zip(out, ref)) if a != b), None)
        nbytes = kv_bytes_per_token(target.cfg, scheme, torch.float16)
        rows[scheme] = {"bytes_per_token": nbytes, "vs_fp16": nbytes / fp16_bytes, "ppl": ppl,
                        "ppl_delta_pct": 100 * (ppl / base_ppl - 1), "greedy_agreement": agree, "first_difference": first}
        r = rows[scheme]
        print(f"{scheme:>6} {nbytes:11.0f} {r['vs_fp16']:9.3f} {ppl:10.3f} {r['ppl_delta_pct']:+6.2f}% {agree:12.1%} {str(first):>10}")
    result["kv_schemes"] = rows
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for scheme, r in rows.items():
        ax.scatter(r["vs_fp16"], r["ppl_delta_pct"]); ax.annotate(scheme, (r["vs_fp16"], r["ppl_delta_pct"]))
    ax.set_xlabel("KV bytes per token (x 16-bit cache)"); ax.set_ylabel("perplexity change (%)")
    ax.set_title(f"KV-cache schemes, cpu-1m trained {steps} steps"); fig.tight_layout()
    fig.savefig(work / "kv_tradeoff.png", dpi=120)


def int4_weights(result: dict, target: Decoder, val: torch.Tensor, calibration: torch.Tensor):
    "Plain and AWQ int4 (group 128 and 32): bytes and perplexity delta; AWQ calibrates on tokens outside `val`."
    base_ppl = cache_perplexity(target, val, None)
    print(f"\n{'int4 weights':>16} {'bytes':>10} {'x fp16':>6} {'perplexity':>10} {'delta':>7}")
    for group in (128, 32):
        for awq in (False, True):
            q = copy.deepcopy(target); sizes = quantize_weights(q, group_size=group, calibration=calibration if awq else None)
            q_ppl = cache_perplexity(q, val, None)
            name = f"{'awq' if awq else 'plain'} g{group}"
            result[f"int4_weights_{name.replace(' ', '_')}"] = {k: v for k, v in sizes.items() if k != "awq_alpha"} | {
                "ppl": q_ppl, "ppl_delta_pct": 100 * (q_ppl / base_ppl - 1)}
            print(f"{name:>16} {sizes['int4_bytes']:10,} {sizes['int4_bytes'] / sizes['fp16_bytes']:6.2f} {q_ppl:10.3f} "
                  f"{100 * (q_ppl / base_ppl - 1):+6.2f}%")


def speculative(result: dict, target: Decoder, draft: Decoder, val: torch.Tensor):
    prompts = [val[i:i + 32].tolist() for i in range(0, 32 * 4, 32)]
    t_plain = sum(median_time(lambda: generate(target, p_, 150, greedy=True), 1) for p_ in prompts)
    accepted = proposed = 0; t_spec = 0.0
    for p_ in prompts:
        t0 = time.perf_counter(); out, stats = speculative_generate(target, draft, p_, 150, k=4); t_spec += time.perf_counter() - t0
        assert out == generate(target, p_, 150, greedy=True), "speculative output differs from the target's greedy output"
        accepted += stats["accepted"]; proposed += stats["proposed"]
    result["speculative"] = {"acceptance_rate": accepted / proposed, "speedup": t_plain / t_spec, "k": 4}
    print(f"\nspeculative (draft cpu-draft, k=4): acceptance {accepted / proposed:.1%}, wall-clock speed-up {t_plain / t_spec:.2f}x, "
          f"output identical to the target's greedy output")


if __name__ == "__main__":
    main()
