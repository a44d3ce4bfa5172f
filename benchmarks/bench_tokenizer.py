"""Chapter 2 benchmark: course_lib's BPE trainer and encoder vs Hugging Face `tokenizers` (and the naive trainer).

All of the embedded corpus (the standard library's source + pydoc topics, ~32 MB), vocabulary 8192,
GPT-2 pattern, special token <|endoftext|>, in one process (ours uses worker processes for counting
and batch encoding; HF uses its Rust thread pool). The naive recount-every-merge trainer cannot
finish 7,935 merges on 32 MB in reasonable time, so it is measured two honest ways:
  1. to completion on a slice (--naive-slice bytes, vocab --naive-vocab), where ours runs the same job;
  2. on the whole corpus, capped at --naive-cap seconds; its time per merge there is extrapolated
     linearly to 7,935 merges. Later merges rescan shorter words, so this is an upper estimate.

    python benchmarks/bench_tokenizer.py [--vocab 8192] [--naive-cap 60] [--naive-slice 300000]
Prints a table, then one line of JSON.
"""
import argparse
import json
import os
import sys
import time

from course_lib.core import embedded_corpus, human_bytes
from course_lib.tokenizer import (EOT, Tokenizer, build_vocab, bpe_merges, count_pretokens, merge, pair_counts,
                                  train_bpe, train_bpe_naive)


def hf_tokenizer_trained(texts, vocab_size):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    start = time.perf_counter()
    hf.train_from_iterator(texts, trainer)
    return hf, time.perf_counter() - start


def naive_capped(texts, n_merges, cap_s):
    "The naive trainer's loop (recount everything each merge), stopped after cap_s seconds: (merges done, seconds)."
    words = [(list(w.encode("utf-8")), n) for w, n in count_pretokens(texts, "gpt2", [EOT], processes=1).items()]
    token_bytes = [bytes([i]) for i in range(256)]
    start = time.perf_counter()
    done = 0
    for new_id in range(256, 256 + n_merges):
        counts = {}
        for ids, n in words: pair_counts(ids, counts, n)
        best = max(counts, key=lambda p: (counts[p], token_bytes[p[0]], token_bytes[p[1]]))
        token_bytes.append(token_bytes[best[0]] + token_bytes[best[1]])
        words = [(merge(ids, best, new_id), n) for ids, n in words]
        done += 1
        if time.perf_counter() - start > cap_s: break
    return done, time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--naive-cap", type=float, default=60.0)
    ap.add_argument("--naive-slice", type=int, default=300_000)
    ap.add_argument("--naive-vocab", type=int, default=1024)
    ap.add_argument("--processes", type=int, default=os.cpu_count())
    args = ap.parse_args()

    texts = [d["text"] for d in embedded_corpus()]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    print(f"corpus: {len(texts)} documents, {human_bytes(n_bytes)}; vocab {args.vocab}; {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    r = {"corpus_bytes": n_bytes, "vocab_size": args.vocab, "cpus": os.cpu_count(), "load_avg": round(os.getloadavg()[0], 2)}

    # --- training: ours (timed by phase; train_bpe is exactly these two calls) vs HF
    start = time.perf_counter()
    counts = count_pretokens(texts, "gpt2", [EOT], processes=args.processes)
    r["ours_count_s"] = time.perf_counter() - start
    start = time.perf_counter()
    merges = bpe_merges({w.encode("utf-8"): n for w, n in counts.items()}, args.vocab - 257)
    r["ours_merge_s"] = time.perf_counter() - start
    r["ours_train_s"] = r["ours_count_s"] + r["ours_merge_s"]
    tok = Tokenizer(build_vocab(merges, [EOT]), merges, [EOT])
    hf, r["hf_train_s"] = hf_tokenizer_trained(texts, args.vocab)
    hf_merges = json.loads(hf.to_str())["model"]["merges"]
    r["distinct_pretokens"] = len(counts)
    print(f"train ours {r['ours_train_s']:.1f} s (count {r['ours_count_s']:.1f} + merges {r['ours_merge_s']:.1f}), "
          f"HF {r['hf_train_s']:.1f} s", flush=True)

    # --- naive: complete on a slice (ours on the same slice), then capped on the whole corpus
    sl = [d["text"] for d in embedded_corpus(max_bytes=args.naive_slice)]
    start = time.perf_counter(); naive_slice = train_bpe_naive(sl, args.naive_vocab, [EOT]); r["naive_slice_s"] = time.perf_counter() - start
    start = time.perf_counter(); ours_slice = train_bpe(sl, args.naive_vocab, [EOT], processes=1); r["ours_slice_s"] = time.perf_counter() - start
    assert naive_slice == ours_slice, "naive and incremental trainers disagree"
    done, secs = naive_capped(texts, args.vocab - 257, args.naive_cap)
    r["naive_full_merges_done"], r["naive_full_measured_s"] = done, secs
    r["naive_full_extrapolated_s"] = secs / done * (args.vocab - 257)
    print(f"naive: slice {r['naive_slice_s']:.1f} s vs ours {r['ours_slice_s']:.2f} s; whole corpus {done} merges in "
          f"{secs:.0f} s -> ~{r['naive_full_extrapolated_s'] / 60:.0f} min extrapolated", flush=True)

    # --- encoding throughput: whole corpus, batch (parallel) and one process / one thread
    start = time.perf_counter(); ours_ids = tok.encode_batch(texts, processes=args.processes); r["ours_encode_batch_s"] = time.perf_counter() - start
    start = time.perf_counter(); hf_ids = [e.ids for e in hf.encode_batch(texts)]; r["hf_encode_batch_s"] = time.perf_counter() - start
    sample = texts[: len(texts) // 4]
    sample_bytes = sum(len(t.encode("utf-8")) for t in sample)
    fresh = Tokenizer(tok.vocab, tok.merges, [EOT])  # cold cache
    start = time.perf_counter(); [fresh.encode(t) for t in sample]; r["ours_encode_1proc_s"] = time.perf_counter() - start
    start = time.perf_counter(); [hf.encode(t) for t in sample]; r["hf_encode_sequential_s"] = time.perf_counter() - start
    r["n_tokens"] = sum(map(len, ours_ids))
    r["same_token_count_as_hf"] = r["n_tokens"] == sum(map(len, hf_ids))

    mb = n_bytes / 1e6
    r["ours_encode_batch_MBps"] = mb / r["ours_encode_batch_s"]
    r["hf_encode_batch_MBps"] = mb / r["hf_encode_batch_s"]
    r["ours_encode_1proc_MBps"] = sample_bytes / 1e6 / r["ours_encode_1proc_s"]
    r["hf_encode_sequential_MBps"] = sample_bytes / 1e6 / r["hf_encode_sequential_s"]
    r["train_ours_over_hf"] = r["ours_train_s"] / r["hf_train_s"]
    r["naive_over_ours_slice"] = r["naive_slice_s"] / r["ours_slice_s"]
    r["naive_over_ours_full_extrapolated"] = r["naive_full_extrapolated_s"] / r["ours_train_s"]
    r["encode_batch_ours_over_hf"] = r["ours_encode_batch_MBps"] / r["hf_encode_batch_MBps"]
    r["encode_1proc_ours_over_hf"] = r["ours_encode_1proc_MBps"] / r["hf_encode_sequential_MBps"]

    rows = [
        ("train, whole corpus", f"{r['ours_train_s']:.1f} s", f"{r['hf_train_s']:.1f} s (HF)", f"{r['train_ours_over_hf']:.2f}x HF's time (goal <= 3)"),
        (f"train, {human_bytes(args.naive_slice)} slice, vocab {args.naive_vocab}", f"{r['ours_slice_s']:.2f} s", f"{r['naive_slice_s']:.1f} s (naive)", f"naive {r['naive_over_ours_slice']:.0f}x slower"),
        ("train, whole corpus, naive", f"{r['ours_train_s']:.1f} s", f"~{r['naive_full_extrapolated_s']:.0f} s (naive, extrapolated)", f"naive ~{r['naive_over_ours_full_extrapolated']:.0f}x slower (goal >= 20)"),
        ("encode, batch (2 procs / HF threads)", f"{r['ours_encode_batch_MBps']:.1f} MB/s", f"{r['hf_encode_batch_MBps']:.1f} MB/s (HF)", f"{r['encode_batch_ours_over_hf']:.2f}x HF (goal >= 0.33)"),
        ("encode, one process / sequential", f"{r['ours_encode_1proc_MBps']:.1f} MB/s", f"{r['hf_encode_sequential_MBps']:.1f} MB/s (HF)", f"{r['encode_1proc_ours_over_hf']:.2f}x HF"),
    ]
    print(f"\n| task | ours | peer | ratio |\n|---|---|---|---|")
    for row in rows: print("| " + " | ".join(row) + " |")
    print(f"\n{r['distinct_pretokens']:,} distinct pre-tokens; token count equal to HF's: {r['same_token_count_as_hf']} "
          f"(merge lists differ after the first tie, so counts may differ slightly)")
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}))


if __name__ == "__main__":
    sys.exit(main())
