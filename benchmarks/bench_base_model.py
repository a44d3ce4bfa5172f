"""Which base model does the `cpu` tier's time buy? Candidate shapes trained for the same wall time.

`camp run` may spend about 15 minutes on the whole chain on 2 cores; the pretrain stage gets a share of it
(`--seconds`). Each candidate decoder is first timed for a few steps on the cpu tier's data (batch 16 x 128,
the course tokenizer's 2,048-token vocabulary), then trained with chapter 4's `train` (AdamW, warm-up + cosine
to the run's end) for as many steps as the budget buys it, with the validation loss in bits per byte logged
along the way. The table says which candidate reached the lowest loss in the budget; the plot shows the loss
against the (quiet-machine) seconds each run stood for. Steps can be fixed instead (`--steps cpu-1m=3000`),
which makes the losses independent of the machine's load: only the seconds column then depends on it.

    .venv/bin/python benchmarks/bench_base_model.py --tokens RUN/tokenizer --seconds 420
Ends with one JSON line; writes OUT.json and OUT.png (default runs/bench-base-model/).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

from course_lib.model import PRESETS, count_params, get_config
from course_lib.pretrain import TrainConfig, read_log, train
from course_lib.tokenizer import load_tokens

CANDIDATES = {   # cpu-1m is today's cpu tier; one shape half as wide, one ~2.5x the parameters
    "cpu-300k": dict(d_model=64, n_layers=4, n_heads=2, n_kv_heads=1, d_ff=192),
    "cpu-1m": {},
    "cpu-3m": dict(d_model=192, n_layers=6, n_heads=6, n_kv_heads=2, d_ff=512),
}


def config(name: str, seq: int, **kw) -> TrainConfig:
    return TrainConfig(preset=name, batch_size=16, seq_len=seq, lr=3e-3, device="cpu", seed=1337, sample_tokens=0,
                       ckpt_every=0, **kw)


def step_seconds(name: str, tokens: Path, out: Path, seq: int, n: int = 12) -> float:
    "Seconds per optimiser step, the average over a short run (chapter 4's `tok_per_s` at its last step)."
    train(config(name, seq, steps=n, warmup_steps=2, eval_every=0), tokens, out, resume=False, export=lambda m, p: None)
    rates = [r for _, r in read_log(out / "log.jsonl")["tok_per_s"]]
    return 16 * seq / rates[-1]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", required=True, help="a tokenizer stage's folder (RUN/tokenizer) or its tokens/ folder")
    ap.add_argument("--seconds", type=float, default=300, help="pretraining budget per candidate (quiet machine)")
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    ap.add_argument("--steps", default="", help="fixed steps per candidate, e.g. cpu-1m=3000,cpu-3m=1000 (skips timing)")
    ap.add_argument("--step-seconds", default="", help="known seconds per step, e.g. cpu-1m=0.135 (skips timing)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--reuse", action="store_true", help="keep a candidate's finished run in OUT (re-tabulate with new --step-seconds)")
    ap.add_argument("--out", default="runs/bench-base-model")
    args = ap.parse_args(argv)
    if args.threads: torch.set_num_threads(args.threads)
    folder = Path(args.tokens)
    tokens = folder / "tokens" if (folder / "tokens" / "meta.json").is_file() else folder
    vocab = load_tokens(tokens).vocab_size
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    for name, shape in CANDIDATES.items():
        PRESETS.setdefault(name, get_config("cpu-1m", **shape))
    fixed = dict(kv.split("=") for kv in args.steps.split(",") if kv)
    known = {k: float(v) for k, v in (kv.split("=") for kv in args.step_seconds.split(",") if kv)}
    rows = []
    for name in args.candidates.split(","):
        params = count_params(get_config(name, vocab_size=vocab))["total"]
        sec = known.get(name) or step_seconds(name, tokens, out / f"{name}-timing", args.seq)
        steps = int(fixed.get(name, 0)) or max(20, int(args.seconds / sec))
        print(f"{name}: {params:,} params, {sec:.3f} s/step -> {steps} steps", file=sys.stderr, flush=True)
        t0, log_file = time.perf_counter(), out / name / "log.jsonl"
        evals = read_log(log_file)["val_bpb"] if args.reuse and log_file.is_file() else []
        reused = bool(evals) and evals[-1][0] == steps                  # a finished run of these steps is there
        if not reused:
            train(config(name, args.seq, steps=steps, warmup_steps=min(20, steps // 10), eval_every=max(1, steps // 12)),
                  tokens, out / name, resume=False, tokenizer_path=folder / "tokenizer.json")
        wall = None if reused else time.perf_counter() - t0
        log = read_log(log_file)
        curve = [(step * sec, bpb) for step, bpb in log["val_bpb"]]
        rows.append({"name": name, "params": params, "sec_per_step": sec, "steps": steps, "tokens": steps * 16 * args.seq,
                     "tokens_per_param": steps * 16 * args.seq / params, "val_bpb": log["val_bpb"][-1][1],
                     "wall_seconds": wall, "curve": curve, "model": str(out / name / "model")})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "curve"}), flush=True)
    best = min(rows, key=lambda r: r["val_bpb"])
    print("\n| candidate | params | s/step | steps | tokens/param | val bits/byte | vs best | wall s |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        wall = "reused" if r["wall_seconds"] is None else f"{r['wall_seconds']:.0f}"
        print(f"| {r['name']} | {r['params']:,} | {r['sec_per_step']:.3f} | {r['steps']:,} | {r['tokens_per_param']:.1f} | "
              f"{r['val_bpb']:.3f} | {r['val_bpb'] - best['val_bpb']:+.3f} | {wall} |")
    result = {"seconds": args.seconds, "best": best["name"], "threads": torch.get_num_threads(), "models": rows}
    (out / "base_model.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / "base_model.png")
    print(json.dumps({"best": best["name"], "seconds": args.seconds} | {r["name"]: round(r["val_bpb"], 4) for r in rows}))
    return result


def plot(result: dict, png: Path):
    "Validation bits/byte against the seconds of training each point stood for, one curve per candidate."
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.4, 3.6)); ax = fig.subplots()
    for r in result["models"]:
        xs, ys = zip(*r["curve"])
        ax.plot(xs, ys, "o-", ms=3, label=f"{r['name']}: {r['params'] / 1e6:.2f} M params, {r['steps']:,} steps")
    ax.set_xlabel("training seconds (quiet 2-core machine)"); ax.set_ylabel("validation bits per byte")
    ax.set_title(f"cpu tier: {result['seconds']:.0f} s of pretraining per candidate"); ax.legend(fontsize=8)
    fig.tight_layout(); fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()
