"""Inference: our KV-cache decode loop vs transformers `generate`, quantised KV caches, int4 weights, speculative decoding.

Trains two small byte-level models on the embedded corpus once (the cpu-1m target and the cpu-draft draft;
cached under --work), then measures, in one process:
  1. decode tokens/s, greedy, fp32: ours (`course_lib.inference.generate`, eager and `compile=True`) vs
     transformers `generate` on the exported model, batch 1 and 8, and vs llama.cpp (batch 1) on the same weights
     converted to GGUF (f32), at cpu-1m (trained) and gpu-25m (random weights: speed does not depend on them);
     the tokens must be identical. llama.cpp is an optional peer: it needs `llama-cpp-python` (the `llamacpp`
     extra, built from its sdist) and the sdist's `vendor/llama.cpp` folder for `convert_hf_to_gguf.py`
     (`--llama-src`, or the LLAMA_CPP_SRC variable); without them its column is skipped with the reason;
  2. the speed-up of the cache over chapter 3's no-cache loop at 128/512/1024 new tokens (cpu-1m shape with
     a 1,100-token window, random weights);
  3. per KV scheme (`KV_SCHEMES`: fp, int8, int4, zp4, mx8, mx4, kivi4, kivi2): bytes/token (vs a 16-bit cache),
     validation perplexity through the cache (teacher-forced in chunks, which is exactly what decoding sees) and
     its delta, greedy agreement with fp over 200 tokens; a trade-off plot. `--run DIR` measures a `camp run`'s
     model instead (fine-tuned if there is one, else pretrained) on its tokenizer's validation tokens;
  4. int4 group-wise weights, plain and AWQ-scaled: bytes and perplexity delta;
  5. speculative decoding with the draft: acceptance rate, tokens per target pass, wall-clock speed-up.
The machine is shared, so timings are noisy: rounds are interleaved and the median is reported.

    .venv/bin/python benchmarks/bench_inference.py                 # everything (~10 min on 2 busy cores)
    .venv/bin/python benchmarks/bench_inference.py --quick         # smaller lengths, fewer rounds
    .venv/bin/python benchmarks/bench_inference.py --threads 2     # a quiet machine
    .venv/bin/python benchmarks/bench_inference.py --parts decode --rounds 7   # decode speed only (random weights, no training)
    .venv/bin/python benchmarks/bench_inference.py --parts kv --run runs/cpu-...   # KV schemes on a camp run's model (no training)
    pip download llama-cpp-python --no-deps --no-binary :all: -d /tmp/llama && tar xzf /tmp/llama/llama_cpp_python-*.tar.gz -C /tmp/llama
    LLAMA_CPP_SRC=$(echo /tmp/llama/llama_cpp_python-*/vendor/llama.cpp) .venv/bin/python benchmarks/bench_inference.py --parts decode
Ends with one JSON line.
"""
import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from course_lib.core import embedded_corpus
from course_lib.inference import KV_SCHEMES, run_model_folder, cache_perplexity, generate, kv_bytes_per_token, speculative_generate
from course_lib.model import Decoder, export_hf, from_hf, get_config
from course_lib.model import generate as generate_no_cache
from course_lib.pretrain import TrainConfig, train, write_byte_tokens
from course_lib.tokenizer import Tokenizer, save_hf
from course_lib.weights import quantize_weights

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


def run_model_and_val(run: Path, n: int) -> tuple[Decoder, torch.Tensor, str]:
    "A `camp run`'s newest model (fine-tuned, else pretrained), the first n of its tokenizer's validation tokens, and a label."
    import numpy as np
    folder = run_model_folder(run)
    if folder is None: raise SystemExit(f"no model in {run} (finetune/merged or pretrain/model)")
    tokens = run / "tokenizer" / "tokens"
    meta = json.loads((tokens / "meta.json").read_text())
    ids = np.fromfile(tokens / "val.bin", dtype=meta["dtype"])[:n]
    return from_hf(folder).eval(), torch.from_numpy(ids.astype("int64")), f"{run.name}/{folder.relative_to(run)}"


def median_time(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    return statistics.median(times)


CONVERT = """
import sys
src, model_dir, out = sys.argv[1:]
sys.path[:0] = [src, src + "/gguf-py"]
from conversion.base import TextModel
from conversion.llama import LlamaModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"   # the course tokenizer is GPT-2-style byte-level BPE
LlamaModel.set_vocab = TextModel._set_vocab_gpt2                  # skip the sentencepiece attempt (there is no tokenizer.model)
sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outtype", "f32", "--outfile", out]
import convert_hf_to_gguf
convert_hf_to_gguf.main()
"""


def llama_cpp_missing(src: str | None) -> str | None:
    "Why the llama.cpp column cannot run (None when it can)."
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return f"llama_cpp not importable ({e}); install the `llamacpp` extra (builds from its sdist, ~5 min)"
    if not src or not (Path(src) / "convert_hf_to_gguf.py").is_file():
        return "no convert_hf_to_gguf.py: pass --llama-src (or LLAMA_CPP_SRC) = the sdist's vendor/llama.cpp folder"
    return None


def filler_tokenizer(vocab_size: int) -> Tokenizer:
    "A byte-level BPE tokenizer of exactly vocab_size ids (256 bytes, then byte pairs): GGUF needs a vocabulary; the benchmark feeds ids."
    vocab, merges = {i: bytes([i]) for i in range(256)}, []
    pairs = ((a, b) for a in range(256) for b in range(256))
    while len(vocab) < vocab_size:
        a, b = next(pairs)
        merges.append((bytes([a]), bytes([b]))); vocab[len(vocab)] = bytes([a, b])
    return Tokenizer(vocab, merges)


def to_gguf(folder: Path, model: Decoder, src: str) -> Path:
    "The transformers export in `folder` (with a filler tokenizer) converted to an f32 GGUF by llama.cpp's converter."
    save_hf(filler_tokenizer(model.cfg.vocab_size), folder)
    out = folder / "model-f32.gguf"
    subprocess.run([sys.executable, "-c", CONVERT, src, str(folder), str(out)], check=True, capture_output=True)
    return out


def llama_cpp_runner(gguf: Path, prompt: list[int], new: int, threads: int):
    "A function running llama.cpp greedy from `prompt` for `new` tokens and returning them."
    from llama_cpp import Llama
    llm = Llama(model_path=str(gguf), n_ctx=len(prompt) + new + 8, n_batch=64, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    def run() -> list[int]:
        out = []
        for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):   # greedy; no stop at EOS
            out.append(token)
            if len(out) == new: return out
    run.close = llm.close                                               # free the model before the interpreter shuts down
    return run


def decode_speed(model: Decoder, batch: int, new: int, rounds: int, tmp: Path, llama_src: str | None, threads: int) -> dict:
    "tok/s of ours (eager, compiled), transformers generate and llama.cpp (batch 1, if available) on the same prompts; same tokens?"
    from transformers import AutoModelForCausalLM
    export_hf(model, tmp)
    hf = AutoModelForCausalLM.from_pretrained(tmp, local_files_only=True, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.cfg.vocab_size, (batch, 16), generator=g)
    runs = {"ours": lambda: generate(model, prompts, new, greedy=True),
            "compiled": lambda: generate(model, prompts, new, greedy=True, compile=True)}
    def theirs():
        with torch.no_grad():
            return hf.generate(prompts, max_new_tokens=new, min_new_tokens=new, do_sample=False)[:, 16:].tolist()
    runs["hf"] = theirs
    skipped = llama_cpp_missing(llama_src) if batch == 1 else "batch 1 only (llama-cpp-python decodes one sequence)"
    if skipped is None:
        llama = llama_cpp_runner(to_gguf(tmp, model, llama_src), prompts[0].tolist(), new, threads)
        runs["llama_cpp"] = lambda: [llama()]
    outs = {name: fn() for name, fn in runs.items()}                    # warm-up (and the compilation)
    times = {name: [] for name in runs}
    for _ in range(rounds):                                             # interleaved rounds
        for name, fn in runs.items():
            t0 = time.perf_counter(); outs[name] = fn(); times[name].append(time.perf_counter() - t0)
    if "llama_cpp" in runs: llama.close()
    toks = batch * new
    result = {f"{name}_tok_s": toks / statistics.median(t) for name, t in times.items()}
    return result | {"identical": all(out == outs["hf"] for out in outs.values()), "llama_cpp_skipped": skipped}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/bench_inference", help="trained models and the plot go here")
    p.add_argument("--steps", type=int, default=300, help="training steps of the target and the draft")
    p.add_argument("--new", type=int, default=200, help="new tokens per decode-speed run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch threads (on a shared, busy CPU 1 beats 2 by far)")
    p.add_argument("--parts", default="decode,cache,kv,weights,spec", help="comma-separated: decode,cache,kv,weights,spec")
    p.add_argument("--run", help="kv part: a `camp run` folder whose model and validation tokens to measure (no training)")
    p.add_argument("--llama-src", default=os.environ.get("LLAMA_CPP_SRC"),
                   help="llama-cpp-python's sdist folder vendor/llama.cpp (for convert_hf_to_gguf.py); optional")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()                                   # no "Loading weights" bars between the rows
    work = Path(args.work); work.mkdir(parents=True, exist_ok=True)
    lengths = (128, 256) if args.quick else (128, 512, 1024)
    result = {"load_average_1m_at_start": os.getloadavg()[0]}

    parts = set(args.parts.split(","))
    if unknown := parts - {"decode", "cache", "kv", "weights", "spec"}: p.error(f"unknown parts: {', '.join(sorted(unknown))}")
    torch.manual_seed(0)
    n_val = 4096 if args.quick else 16384
    if parts & {"weights", "spec"} or ("kv" in parts and not args.run):
        target, draft = trained("cpu-1m", work, args.steps), trained("cpu-draft", work, args.steps)
        val = val_tokens(work, n_val + 8 * 128)
        val, calibration = val[:n_val], val[n_val:].view(8, 128)       # AWQ calibrates on tokens the perplexity does not see
    else: target = Decoder(get_config("cpu-1m")).eval()                   # decode speed does not depend on the weights

    # 1. decode speed vs transformers
    if "decode" in parts:
        print(f"{'model':>8} {'batch':>5} {'ours':>7} {'compiled':>8} {'HF':>7} {'llama.cpp':>9} {'ours/HF':>7} {'comp/HF':>7} "
              f"{'comp/llama':>10} {'same tokens':>11}   (tok/s)")
    models = {"cpu-1m": target, "gpu-25m": Decoder(get_config("gpu-25m")).eval()} if "decode" in parts else {}
    for name, m in models.items():
        for batch in (1, 8):
            r = decode_speed(m, batch, args.new if name == "cpu-1m" else args.new // 2, args.rounds, work / f"hf-{name}",
                             args.llama_src, args.threads)
            result[f"decode_{name}_b{batch}"] = r
            llama = r.get("llama_cpp_tok_s")
            print(f"{name:>8} {batch:>5} {r['ours_tok_s']:7.0f} {r['compiled_tok_s']:8.0f} {r['hf_tok_s']:7.0f} "
                  f"{llama or float('nan'):9.0f} {r['ours_tok_s'] / r['hf_tok_s']:7.2f} {r['compiled_tok_s'] / r['hf_tok_s']:7.2f} "
                  f"{r['compiled_tok_s'] / llama if llama else float('nan'):10.2f} {str(r['identical']):>11}")
            if batch == 1 and r["llama_cpp_skipped"]: print(f"         llama.cpp skipped: {r['llama_cpp_skipped']}")

    # 2. cache vs no cache
    if "cache" in parts: cache_speedup(result, lengths, args.rounds)
    if "kv" in parts:
        kv_model, kv_val, label = (run_model_and_val(Path(args.run), n_val) if args.run
                                   else (target, val, f"cpu-1m byte-level, trained {args.steps} steps"))
        kv_schemes(result, kv_model, kv_val, label, work)
    if "weights" in parts: int4_weights(result, target, val, calibration)
    if "spec" in parts: speculative(result, target, draft, val)
    result["load_average_1m_at_end"] = os.getloadavg()[0]              # timings on a shared machine: say how shared
    print(json.dumps(result, default=float))


def cache_speedup(result: dict, lengths, rounds: int):
    long = Decoder(get_config("cpu-1m", max_seq_len=max(lengths) + 8)).eval()
    print(f"\n{'new tokens':>10} {'no cache s':>10} {'cache s':>8} {'speed-up':>8}")
    for n in lengths:
        t_no = median_time(lambda: generate_no_cache(long, torch.tensor([[1]]), n, greedy=True), 1)
        t_kv = median_time(lambda: generate(long, [1], n, greedy=True), max(1, rounds // 2))
        result[f"cache_speedup_{n}"] = t_no / t_kv
        print(f"{n:>10} {t_no:10.2f} {t_kv:8.2f} {t_no / t_kv:7.1f}x")


def kv_schemes(result: dict, target: Decoder, val: torch.Tensor, label: str, work: Path):
    "Per KV scheme: exact bytes/token, perplexity through the cache and its delta, greedy agreement with fp; the trade-off plot."
    base_ppl = cache_perplexity(target, val, None)
    fp16_bytes = kv_bytes_per_token(target.cfg, "fp", torch.float16)
    prompt = val[:32].tolist()
    ref = generate(target, prompt, 200, greedy=True)
    print(f"\n{label}: {target.cfg.n_kv_heads} kv heads x head_dim {target.cfg.head_dim}; plain forward perplexity {base_ppl:.3f} "
          f"over {len(val):,} validation tokens")
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
    result["kv_schemes"] = rows | {"model": label}
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for x, y, goal in ((0.53, 0.5, "int8 goal"), (0.3, 2.0, "int4 goal")):   # the issue's goals: at most x bytes, at most y % worse
        ax.add_patch(plt.Rectangle((0, 0), x, y, fill=False, linestyle=":", edgecolor="grey")); ax.annotate(goal, (x, y), fontsize=7, color="grey")
    for i, (scheme, r) in enumerate(rows.items()):                     # labels above and below in turn: neighbours overlap
        ax.scatter(r["vs_fp16"], r["ppl_delta_pct"])
        ax.annotate(scheme, (r["vs_fp16"], r["ppl_delta_pct"]), xytext=(3, 5 if i % 2 else -11), textcoords="offset points", fontsize=8)
    ax.set_xlabel("KV bytes per token (x 16-bit cache)"); ax.set_ylabel("perplexity change (%)")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_title(f"KV-cache schemes: {label}", fontsize=9); fig.tight_layout()
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
