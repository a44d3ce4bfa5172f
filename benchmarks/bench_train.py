"""Training throughput: our decoder vs transformers' LlamaForCausalLM with identical weights.

Same config, same data, same process, same optimiser (torch.optim.AdamW), each model's own training
path for the loss (ours: `model(x, targets=y)`, the loss fused into the head in chunks; transformers:
`model(input_ids=x, labels=y, shift_labels=y).loss`, logits then cross-entropy), at the vocabulary of
the course's chapter-2 tokenizer (8192, trained here on the same text) or on raw bytes (--vocab 256):
tokens/s for fp32 and bf16 autocast, ours / HF ratio, losses of the first steps side by side,
achieved FLOP/s against a measured matmul ceiling (the MFU of this CPU), and torch.compile's effect
on both (ours compiled vs HF compiled is the like-for-like compiled comparison). bf16 is measured only
where the device has fast bf16 kernels (on a CPU: AVX-512), unless --dtypes asks. Measurements are
interleaved (a round of ours, a round of HF, ...) and the median round is reported, so a machine shared
with other jobs slows both alike.

    .venv/bin/python benchmarks/bench_train.py                  # cpu-1m, vocab 8192, batch 16 x 128 tokens
    .venv/bin/python benchmarks/bench_train.py --vocab 256      # byte tokens: the head is small
    .venv/bin/python benchmarks/bench_train.py --preset gpu-25m --batch 8 --seq 256 --no-compile
    .venv/bin/python benchmarks/bench_train.py --device cuda --preset gpu-125m --batch 16 --seq 1024   # on a GPU
Ends with one JSON line.
"""
import argparse
import json
import statistics
import sys
import time
import warnings

import numpy as np
import torch

from course_lib.core import embedded_corpus, fast_bf16
from course_lib.tokenizer import Tokenizer, train_bpe
from course_lib.model import Decoder, get_config, hf_config, flops_per_token, to_hf_state_dict
from course_lib.pretrain import get_batch

warnings.filterwarnings("ignore")


def corpus_tokens(max_bytes: int, vocab_size: int) -> np.ndarray:
    "The embedded corpus as token ids (the same data for both models): UTF-8 bytes, or a BPE tokenizer trained on it."
    texts = [d["text"] for d in embedded_corpus(max_bytes=max_bytes)]
    if vocab_size == 256: return np.frombuffer("".join(texts).encode(), dtype=np.uint8).astype(np.uint16)
    tok = Tokenizer(*train_bpe(texts, vocab_size, ()), ())
    return np.array([i for ids in tok.encode_batch(texts) for i in ids], dtype=np.uint16)


def hf_twin(ours: Decoder):
    "A LlamaForCausalLM holding exactly our weights."
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(**{k: v for k, v in hf_config(ours.cfg).items() if k not in ("architectures", "model_type")})
    hf = LlamaForCausalLM(config)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if ours.cfg.tie_embeddings: hf.tie_weights()
    return hf.train()


class Runner:
    "One model + optimiser; `step()` does forward, loss, backward and an AdamW step on the next batch."
    def __init__(self, name, model, loss_of, batches, dtype):
        self.name, self.model, self.loss_of, self.batches, self.dtype = name, model, loss_of, batches, dtype
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
        self.i = 0

    def step(self) -> float:
        x, y = self.batches[self.i % len(self.batches)]; self.i += 1
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16):
            loss = self.loss_of(self.model, x, y)
        loss.backward()
        self.opt.step(); self.opt.zero_grad(set_to_none=True)
        return loss.item()


def sync(device: torch.device):
    if device.type == "cuda": torch.cuda.synchronize(device)


def matmul_ceiling(dtype: torch.dtype, device: torch.device, n: int = 1024, repeats: int = 20) -> float:
    "FLOP/s of the best of several n x n matmuls: the most this device does in this dtype."
    if device.type == "cuda": n = 8192
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3): a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(device); start = time.perf_counter(); a @ b; sync(device); best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def throughput(runners, rounds: int, steps_per_round: int, tokens_per_step: int, device: torch.device) -> dict[str, float]:
    "Median tokens/s per runner over interleaved rounds."
    per = {r.name: [] for r in runners}
    for _ in range(rounds):
        for r in runners:
            sync(device); start = time.perf_counter()
            for _ in range(steps_per_round): r.step()
            sync(device); per[r.name].append(steps_per_round * tokens_per_step / (time.perf_counter() - start))
    return {name: statistics.median(v) for name, v in per.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cpu-1m")
    p.add_argument("--vocab", type=int, default=8192, help="256: byte tokens; else a BPE tokenizer of this size")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps-per-round", type=int, default=4)
    p.add_argument("--compare-steps", type=int, default=5, help="steps whose losses must agree")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtypes", default="auto", help="comma list of fp32,bf16; auto: bf16 only where it is fast")
    args = p.parse_args(argv)
    if args.threads: torch.set_num_threads(args.threads)

    tokens = corpus_tokens(2_000_000, args.vocab)
    cfg = get_config(args.preset, vocab_size=args.vocab, max_seq_len=max(args.seq, 256))
    rng = np.random.default_rng(0)
    device = torch.device(args.device)
    batches = [get_batch(tokens, args.batch, args.seq, rng, device) for _ in range(16)]
    tokens_per_step = args.batch * args.seq
    flops_token = flops_per_token(cfg, args.seq)["total"]
    ours_fwd = lambda m, x, y: m(x, targets=y)
    hf_fwd = lambda m, x, y: m(input_ids=x, labels=y, shift_labels=y.contiguous(), use_cache=False).loss
    isa = torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else torch.cuda.get_device_name(device)
    bf16_is_fast = fast_bf16(device)
    dtypes = args.dtypes.split(",") if args.dtypes != "auto" else ["fp32"] + (["bf16"] if bf16_is_fast else [])
    results = {"preset": args.preset, "vocab_size": args.vocab, "params": sum(p.numel() for p in Decoder(cfg).parameters()),
               "batch": args.batch, "seq_len": args.seq, "threads": torch.get_num_threads(), "device": str(device), "isa": isa,
               "fast_bf16": bf16_is_fast, "flops_per_token": flops_token}
    rows = []
    for dtype_name in dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        torch.manual_seed(0)
        ours_model = Decoder(cfg).train()
        hf_model = hf_twin(ours_model).to(device)
        ours_model = ours_model.to(device)
        ours = Runner("ours", ours_model, ours_fwd, batches, dtype)
        hf = Runner("hf", hf_model, hf_fwd, batches, dtype)
        # the first steps: identical weights, data and optimiser -> the same losses
        loss_pairs = [(ours.step(), hf.step()) for _ in range(args.compare_steps)]
        max_rel = max(abs(a - b) / abs(b) for a, b in loss_pairs)
        tps = throughput([ours, hf], args.rounds, args.steps_per_round, tokens_per_step, device)
        ceiling = matmul_ceiling(dtype, device)
        row = {"dtype": dtype_name, "ours_tok_s": tps["ours"], "hf_tok_s": tps["hf"], "ratio": tps["ours"] / tps["hf"],
               "first_losses_ours": [a for a, _ in loss_pairs], "first_losses_hf": [b for _, b in loss_pairs],
               "loss_max_rel_diff": max_rel, "matmul_ceiling_flops": ceiling,
               "ours_flops": tps["ours"] * flops_token, "ours_mfu": tps["ours"] * flops_token / ceiling,
               "hf_mfu": tps["hf"] * flops_token / ceiling}
        if not args.no_compile:                                          # fresh twins, compiled (inductor)
            torch.manual_seed(0)
            fresh = Decoder(cfg).train()
            ours_c = Runner("ours_compiled", torch.compile(fresh.to(device)), ours_fwd, batches, dtype)
            hf_c = Runner("hf_compiled", torch.compile(hf_twin(fresh).to(device)), hf_fwd, batches, dtype)
            for r in (ours_c, hf_c):
                start = time.perf_counter(); r.step(); r.step(); row[f"{r.name}_warmup_s"] = time.perf_counter() - start
            tps_c = throughput([ours, ours_c, hf, hf_c], args.rounds, args.steps_per_round, tokens_per_step, device)
            row |= {"compiled_tok_s": tps_c["ours_compiled"], "hf_compiled_tok_s": tps_c["hf_compiled"],
                    "compile_speedup": tps_c["ours_compiled"] / tps_c["ours"],
                    "compiled_ratio": tps_c["ours_compiled"] / tps_c["hf_compiled"]}
        rows.append(row)
        results[dtype_name] = row

    print(f"{args.preset}: vocab {args.vocab}, {results['params'] / 1e6:.2f} M params, batch {args.batch} x {args.seq} tokens, "
          f"{results['threads']} threads, {flops_token / 1e6:.2f} MFLOPs/token (6N + attention), {isa}, fast bf16: {results['fast_bf16']}")
    print(f"{'dtype':>5} | {'ours tok/s':>10} | {'HF tok/s':>9} | {'ours/HF':>7} | {'loss rel diff':>13} | "
          f"{'ceiling GFLOP/s':>15} | {'ours MFU':>8} | {'HF MFU':>6} | {'ours+compile':>12} | {'HF+compile':>10} | "
          f"{'compile x':>9} | {'compiled ours/HF':>16}")
    nan = float("nan")
    for r in rows:
        print(f"{r['dtype']:>5} | {r['ours_tok_s']:>10,.0f} | {r['hf_tok_s']:>9,.0f} | {r['ratio']:>7.2f} | {r['loss_max_rel_diff']:>13.1e} | "
              f"{r['matmul_ceiling_flops'] / 1e9:>15.1f} | {r['ours_mfu']:>8.1%} | {r['hf_mfu']:>6.1%} | "
              f"{r.get('compiled_tok_s', nan):>12,.0f} | {r.get('hf_compiled_tok_s', nan):>10,.0f} | "
              f"{r.get('compile_speedup', nan):>9.2f} | {r.get('compiled_ratio', nan):>16.2f}")
    for r in rows:
        print(f"{r['dtype']} first losses  ours: {[round(v, 5) for v in r['first_losses_ours']]}")
        print(f"{r['dtype']} first losses    HF: {[round(v, 5) for v in r['first_losses_hf']]}")
    print(json.dumps({"bench": "train", **results}))
    if rows[0]["loss_max_rel_diff"] > 1e-4:
        sys.exit(f"fp32 losses differ from transformers by {rows[0]['loss_max_rel_diff']:.1e}")


if __name__ == "__main__":
    main()
