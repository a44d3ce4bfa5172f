"""Chapter 9: the calculator agent's success with the course model (issue 17's measurements). Chapter 5's recipe
fine-tunes a base model on the tool-use conversations; then ReAct and ReWOO run with the calculator on the held-out
arithmetic questions, with the base model, the fine-tuned model and the scripted back end (the upper bound) side by side:
success, model calls and tokens per question.

Run: python benchmarks/bench_agent_success.py                          (a fresh base: tokenizer + untrained Decoder)
     python benchmarks/bench_agent_success.py --base runs/RUN/pretrain/model   (a pretrained base from `camp run`)
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from course_lib.agent_systems import AGENT_REPLY_TOKENS, agent_success, held_out_arithmetic, scripted_policy
from course_lib.agents import CourseModel, ScriptedModel
from course_lib.core import embedded_corpus
from course_lib.finetune import FinetuneConfig, run_finetune
from course_lib.model import Decoder, export_hf, get_config
from course_lib.tokenizer import DEFAULT_SPECIALS, Tokenizer, save_hf, train_bpe


def fresh_base(folder: Path, d_model: int, n_layers: int, vocab: int = 512) -> Path:
    "A BPE tokenizer on the course prose and an untrained Decoder, as chapter 5's lesson builds its base."
    texts = [r["text"] for r in embedded_corpus("prose", max_bytes=200_000)]
    tok = Tokenizer(*train_bpe(texts, vocab, DEFAULT_SPECIALS, processes=1), DEFAULT_SPECIALS)
    save_hf(tok, folder / "tokenizer")
    torch.manual_seed(0)
    cfg = get_config("cpu-1m", vocab_size=tok.vocab_size, d_model=d_model, n_layers=n_layers, n_heads=4, n_kv_heads=2,
                     d_ff=3 * d_model, max_seq_len=256)
    export_hf(Decoder(cfg), folder / "base", tokenizer=folder / "tokenizer" / "tokenizer.json")
    return folder / "base"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", help="a base model folder (Llama layout + tokenizer.json); default: a fresh untrained one")
    ap.add_argument("--steps", type=int, default=600, help="fine-tuning steps")
    ap.add_argument("--method", default="full", choices=("full", "lora", "qlora"))
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--n-train", type=int, default=600)
    ap.add_argument("--n-test", type=int, default=50)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--work", help="keep the models here (default: a temporary folder)")
    a = ap.parse_args(argv)
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-agents-"))
    work.mkdir(parents=True, exist_ok=True)
    base = Path(a.base) if a.base else fresh_base(work, a.d_model, a.layers)
    t0 = time.perf_counter()
    ft = run_finetune(FinetuneConfig(model=str(base), data=["tool_use"], method=a.method, steps=a.steps, lr=a.lr,
                                     batch_size=8, max_length=192, n_train=a.n_train, n_test=a.n_test, seed=a.seed,
                                     output=str(work / "finetune")))
    train_s = time.perf_counter() - t0
    cases = held_out_arithmetic(a.n_train, a.n_test, a.seed)   # the same held-out questions run_finetune evaluated
    backends = {"scripted (upper bound)": lambda: ScriptedModel([scripted_policy], repeat_last=True)}
    for label, folder in (("base", base), ("fine-tuned", Path(ft["paths"]["merged"]))):
        model = CourseModel.load(folder, max_new_tokens=AGENT_REPLY_TOKENS)
        backends[label] = lambda model=model: model
    rows = {}
    for label, make in backends.items():
        for loop in ("react", "rewoo"):
            t0 = time.perf_counter()
            r = agent_success(make, cases, max_steps=3, loop=loop)
            rows[f"{label} / {loop}"] = r | {"seconds": round(time.perf_counter() - t0, 1)}
    print(f"base: {base}; fine-tuned: {a.method}, {a.steps} steps on {ft['examples']} conversations in {train_s:.0f} s, "
          f"loss {ft['first_loss']:.2f} -> {ft['final_loss']:.2f}; chapter 5's own tool_use metrics before {ft['before']} after {ft['after']}")
    print(f"{'back end / loop':32} {'success':>7} {'calls':>6} {'tokens':>7} {'s':>6}  stops")
    for k, r in rows.items():
        print(f"{k:32} {r['success']:7.0%} {r['model_calls']:6.1f} {r['tokens']:7.0f} {r['seconds']:6.1f}  {r['stops']}")
    out = {"n": len(cases), "finetune": {k: ft[k] for k in ("method", "steps", "examples", "first_loss", "final_loss", "before", "after")},
           "train_s": round(train_s, 1), "rows": rows}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
