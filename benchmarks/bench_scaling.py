"""A CPU mini scaling study: three decoder sizes trained with the same compute, C = 6·N·D FLOPs.

Each model of N parameters sees D = C / (6N) tokens of the embedded corpus (UTF-8 byte tokens, so the
loss in bits per byte needs no tokenizer: bits/byte = nats/token / ln 2), with the course's own `train`
(AdamW, warm-up + cosine to the run's end, batch 16 x 64). The validation loss is logged along the way
and plotted against the compute spent so far (6·N·tokens seen): the classic IsoFLOP picture. The "peer"
is Chinchilla's rule (Hoffmann et al. 2022): at compute C the best model has about N_opt = sqrt(C / 120)
parameters, i.e. D = 20 tokens per parameter; the table says which of the three came closest and which
won. Writes nbs/images/scaling.json and nbs/images/scaling.png, which the chapter-4 lesson shows.

    .venv/bin/python benchmarks/bench_scaling.py                 # about a minute on 2 quiet cores
    .venv/bin/python benchmarks/bench_scaling.py --flops 1e11    # a bigger budget: N_opt moves up
Ends with one JSON line.
"""
import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from course_lib.core import embedded_corpus
from course_lib.model import Decoder, get_config, n_params
from course_lib.pretrain import TrainConfig, read_log, train
from course_lib.tokens import write_byte_tokens

SIZES = {   # three shapes, each about 5x the parameters of the one before (vocabulary: 256 bytes + end-of-text)
    "S": dict(d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=48),     # 7.2k parameters
    "M": dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=96),     # 33k
    "L": dict(d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=192),    # 164k
}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flops", type=float, default=1e10, help="compute budget per model, 6·N·D")
    ap.add_argument("--corpus-bytes", type=int, default=4_000_000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: tiny models gain nothing from more)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "nbs" / "images" / "scaling"),
                    help="writes OUT.json and OUT.png")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    tokens = write_byte_tokens(embedded_corpus("code,prose", max_bytes=args.corpus_bytes), tmp / "tokens", 0.05)
    per_step = args.batch * args.seq
    rows = []
    for name, shape in SIZES.items():
        model = Decoder(get_config("cpu-1m", vocab_size=257, max_seq_len=args.seq, **shape))
        n = n_params(model)
        steps = max(10, round(args.flops / (6 * n) / per_step))
        cfg = TrainConfig(steps=steps, batch_size=args.batch, seq_len=args.seq, lr=args.lr, warmup_steps=max(1, steps // 20),
                          eval_every=max(1, steps // 8), eval_batches=16, sample_tokens=0, ckpt_every=0, device="cpu", seed=0)
        start = time.perf_counter()
        summary = train(cfg, tokens, tmp / name, model=model, resume=False, export=lambda m, p: None)
        seconds = time.perf_counter() - start
        curve = [(6 * n * step * per_step, loss) for step, loss in read_log(tmp / name / "log.jsonl")["val_loss"]]
        rows.append({"name": name, "params": n, "tokens": summary["tokens"], "tokens_per_param": summary["tokens"] / n,
                     "flops": 6 * n * summary["tokens"], "val_loss": summary["val_loss"],
                     "bits_per_byte": summary["val_loss"] / math.log(2), "tok_per_s": summary["tok_per_s"],
                     "seconds": seconds, "curve": curve, **shape})
        print(f"{name}: {n:,} params, {steps} steps, val {summary['val_loss']:.3f} nats/byte in {seconds:.0f} s", file=sys.stderr)
    n_opt = math.sqrt(args.flops / 120)                                  # C = 6·N·(20N)
    best = min(rows, key=lambda r: r["val_loss"])
    closest = min(rows, key=lambda r: abs(math.log(r["params"] / n_opt)))
    print(f"\nCompute per model C = {args.flops:.2g} FLOPs (6·N·D); Chinchilla's N_opt = sqrt(C/120) = {n_opt:,.0f} params\n")
    print("| model | params | tokens | tokens/param | val loss (nats/byte) | bits/byte | vs best | tok/s | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['params']:,} | {r['tokens']:,} | {r['tokens_per_param']:.1f} | {r['val_loss']:.3f} | "
              f"{r['bits_per_byte']:.3f} | {r['val_loss'] / best['val_loss']:.3f} | {r['tok_per_s']:,.0f} | {r['seconds']:.0f} |")
    result = {"flops": args.flops, "chinchilla_n_opt": n_opt, "best": best["name"], "closest_to_chinchilla": closest["name"],
              "batch": args.batch, "seq_len": args.seq, "corpus_bytes": args.corpus_bytes, "threads": torch.get_num_threads(),
              "models": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in result.items() if k != "models"} |
                     {r["name"]: {"params": r["params"], "val_loss": round(r["val_loss"], 4)} for r in rows}))
    return result


def plot(result: dict, png: Path):
    "Validation loss against compute spent, one curve per model size; the budget's Chinchilla-optimal size in the legend."
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.4, 3.6)); ax = fig.subplots()
    for r in result["models"]:
        xs, ys = zip(*r["curve"])
        ax.plot(xs, [y / math.log(2) for y in ys], "o-", ms=3,
                label=f"{r['name']}: {r['params'] / 1e3:.0f}k params, {r['tokens_per_param']:.2g} tokens/param")
    ax.set_xscale("log"); ax.set_xlabel("training compute so far, 6·N·D (FLOPs)"); ax.set_ylabel("validation bits per byte")
    ax.set_title(f"Equal compute {result['flops']:.1g} FLOPs; Chinchilla N_opt ≈ {result['chinchilla_n_opt'] / 1e3:.0f}k params")
    ax.legend(fontsize=8); fig.tight_layout(); fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()
