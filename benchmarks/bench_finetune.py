"""Chapter 5 benchmark: LoRA step time ours vs peft, full / LoRA / QLoRA peak memory and step time, NF4 bits per
parameter, and held-out accuracy of the three synthetic tasks before/after fine-tuning (or accuracy vs steps).

    python benchmarks/bench_finetune.py                       # step time, memory, bits/param (minutes)
    python benchmarks/bench_finetune.py --accuracy [--base runs/X/pretrain/model] [--acc-steps 100,300] [--methods lora,qlora]
    python benchmarks/bench_finetune.py --copy runs/X/pretrain/model[,runs/Y/merged ...]   # can the model copy? (reading)

Ours and the peer run in the same process on the same weights and batch. Peak memory is measured, not estimated:
each variant runs in a fresh subprocess and reports its peak resident set (ru_maxrss) above the RSS it had after
building the model. Ends with one JSON line.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from course_lib.lora import ALL_PROJECTIONS, inject_lora, quantize_base  # noqa: E402
from course_lib.model import Decoder, PRESETS, export_hf, get_config  # noqa: E402
from course_lib.quant import quantize_nf4  # noqa: E402


def _time_steps(step, n: int) -> float:
    step(); step()                                                    # warm-up
    times = []
    for _ in range(n):
        t0 = time.perf_counter(); step(); times.append(time.perf_counter() - t0)
    return statistics.median(times)


def lora_step_time(preset: str, batch: int, seq: int, r: int, n: int) -> dict:
    "Median seconds per LoRA training step (forward, backward, AdamW) for ours and for peft on the same model."
    import tempfile
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    cfg = PRESETS[preset]
    ours = Decoder(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(ours, tmp)
        hf = AutoModelForCausalLM.from_pretrained(tmp)
    inject_lora(ours, ALL_PROJECTIONS, r=r, alpha=2 * r)
    peft_model = get_peft_model(hf, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(ALL_PROJECTIONS)))
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    opt_o = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-3)
    opt_p = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    def step_ours():
        ours(x[:, :-1], targets=x[:, 1:]).backward(); opt_o.step(); opt_o.zero_grad()
    def step_peft():
        peft_model(input_ids=x[:, :-1], labels=x[:, :-1].clone()).loss.backward(); opt_p.step(); opt_p.zero_grad()
    t_o, t_p = _time_steps(step_ours, n), _time_steps(step_peft, n)
    return {"preset": preset, "batch": batch, "seq": seq, "r": r, "ours_s": t_o, "peft_s": t_p, "speedup": t_p / t_o}


def _variant_child(method: str, preset: str, batch: int, seq: int, steps: int):
    "Run in a subprocess: build the model for `method`, train `steps` steps, print peak RSS above the post-build RSS."
    torch.manual_seed(0)
    model = Decoder(get_config(preset))
    if method in ("lora", "qlora"):
        if method == "qlora": quantize_base(model)
        inject_lora(model, r=8, alpha=16)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    with open("/proc/self/statm") as f: rss0 = int(f.read().split()[1]) * resource.getpagesize()
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    x = torch.randint(0, model.cfg.vocab_size, (batch, seq + 1))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        model(x[:, :-1], targets=x[:, 1:]).backward(); opt.step(); opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"method": method, "after_build_mb": rss0 / 2**20, "peak_mb": peak / 2**20,
                      "train_peak_above_build_mb": max(peak, peak0) / 2**20 - rss0 / 2**20,
                      "step_s": statistics.median(times[1:] or times), "trainable": sum(p.numel() for p in params)}))


def memory_and_time(preset: str, batch: int, seq: int, steps: int) -> list[dict]:
    out = []
    for method in ("full", "lora", "qlora"):
        res = subprocess.run([sys.executable, __file__, "--child", method, "--preset", preset, "--batch", str(batch),
                              "--seq", str(seq), "--child-steps", str(steps)], capture_output=True, text=True, check=True)
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return out


def nf4_bits(preset: str) -> dict:
    "Bits per parameter of NF4 + double quantisation over every projection of a randomly initialised preset."
    torch.manual_seed(0)
    model = Decoder(get_config(preset))
    n = nbytes = 0
    for name, p in model.named_parameters():
        if p.ndim == 2 and name.rsplit(".", 2)[-2] in ALL_PROJECTIONS:
            q = quantize_nf4(p.detach()); n += p.numel(); nbytes += q.nbytes()
    return {"preset": preset, "params": n, "bits_per_param": 8 * nbytes / n}


def peft_peer(base: str, cfg, out: Path) -> dict:
    """The peer: peft LoRA on the transformers export of the same base, trained on the very same packed batches
    (transformers keeps packed rows apart when position ids restart and no cache is used), torch's AdamW, transformers'
    cosine-with-floor schedule and torch's clipping; merged by peft, then scored by the same rules."""
    import numpy as np
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, get_cosine_with_min_lr_schedule_with_warmup
    from course_lib.finetune import evaluate_tasks, load_tokenizer_for
    from course_lib.model import from_hf
    from course_lib.sft import SFTBatches, encode_all, make_sft_sets
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer_for(base)
    sets = make_sft_sets(cfg.n_train, cfg.n_test, cfg.seed)
    examples, _ = encode_all(tok, [c["messages"] for s in sets.values() for c in s["train"]], cfg.max_length)
    held, _ = encode_all(tok, [c["messages"] for s in sets.values() for c in s["test"]], cfg.max_length)
    source = SFTBatches(examples, cfg.max_length, held, 0, tok.special_tokens["<|im_end|>"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=list(cfg.targets)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0, foreach=False)
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, min(cfg.warmup_steps, cfg.steps), cfg.steps, min_lr_rate=0.1)
    rng, losses, t0 = np.random.default_rng(cfg.seed), [], time.perf_counter()
    model.train()
    for _ in range(cfg.steps):
        x, y, extra = source.train_batch(cfg.batch_size, rng, "cpu")
        logits = model(input_ids=x, position_ids=extra["positions"], use_cache=False).logits     # (b, t, V)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
        loss.backward(); torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip); opt.step(); sched.step(); opt.zero_grad()
        losses.append(loss.item())
    seconds = time.perf_counter() - t0
    merged = model.merge_and_unload()
    merged.save_pretrained(out / "peft-merged")
    (out / "peft-merged" / "tokenizer.json").write_bytes((Path(base) / "tokenizer.json").read_bytes())
    after = evaluate_tasks(from_hf(out / "peft-merged"), tok, {t: s["test"] for t, s in sets.items()})
    return {"seconds": seconds, "first_loss": losses[0], "final_loss": statistics.mean(losses[-10:]), "after": after}


def accuracy(base: str | None, steps_list: list[int], methods: list[str], n_train: int, n_test: int, peer: bool,
             batch_size: int, lr: float) -> list[dict]:
    "Held-out accuracy per task after each number of steps, ours (run_finetune, chapter 4's loop) and peft's LoRA beside it."
    from course_lib.finetune import FinetuneConfig, run_finetune
    rows = []
    for method in methods:
        for steps in steps_list:
            out = Path(f"runs/bench-finetune/{method}-{steps}")
            cfg = FinetuneConfig(model=base or "", method=method, steps=steps, n_train=n_train, n_test=n_test,
                                 batch_size=batch_size, lr=lr, output=str(out), device="cpu")
            t0 = time.perf_counter()
            r = run_finetune(cfg)
            row = {"method": method, "steps": steps, "seconds": time.perf_counter() - t0, "train_seconds": r["seconds"],
                   "before": r["before"], "after": r["after"], "first_loss": r["first_loss"], "final_loss": r["final_loss"]}
            if peer and method == "lora": row["peft"] = peft_peer(r["base"], cfg, out)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


@torch.no_grad()
def copy_check(folder: str, n: int = 50, seed: int = 1337) -> dict:
    """Can a model copy from its context, as reading needs? (1) random tokens repeated: loss of the second copy vs the first
    (an induction circuit makes the repeat nearly free); (2) a prose passage read twice; (3) held-out reading answers with
    their own passage vs another passage (no gain: the model does not read). Losses in nats/token."""
    import torch.nn.functional as F
    from course_lib.core import embedded_corpus
    from course_lib.finetune import load_tokenizer_for
    from course_lib.model import from_hf
    from course_lib.sft import encode_all, make_sft_sets, pack, passages
    model, tok = from_hf(folder).eval(), load_tokenizer_for(folder)
    def halves(x: torch.Tensor, half: int) -> tuple[float, float]:      # x (b, 2 * half): mean loss of each copy
        nll = F.cross_entropy(model(x[:, :-1]).float().transpose(1, 2), x[:, 1:], reduction="none")   # (b, 2 * half - 1)
        return nll[:, :half - 1].mean().item(), nll[:, half:].mean().item()
    seq = torch.randint(300, model.cfg.vocab_size, (32, 50), generator=torch.Generator().manual_seed(seed))
    random_first, random_repeat = halves(torch.cat([seq, seq], 1), 50)
    paras = [tok.encode(" " + t)[:64] for _, t in passages(embedded_corpus("prose", max_bytes=400_000))]
    prose = torch.tensor([p + p for p in paras if len(p) == 64][:n])
    prose_first, prose_second = halves(prose, 64)
    test = make_sft_sets(n, n, seed)["reading"]["test"]
    def answer_loss(convs) -> float:
        b = pack(encode_all(tok, convs, model.cfg.max_seq_len)[0], model.cfg.max_seq_len, packed=False)
        logits = model(b["x"], positions=b["positions"], segment_ids=b["segment_ids"]).float()
        return F.cross_entropy(logits.flatten(0, 1), b["y"].flatten(), ignore_index=-100).item()
    def with_passage_of(r, other):                                     # r's question and answer after other's passage
        question = r["messages"][0]["content"].split("\n\n", 1)[1]
        passage = other["messages"][0]["content"].split("\n\n", 1)[0]
        return [{"role": "user", "content": f"{passage}\n\n{question}"}, r["messages"][1]]
    own = answer_loss([r["messages"] for r in test])
    other = answer_loss([with_passage_of(r, test[(i + 7) % len(test)]) for i, r in enumerate(test)])
    return {"model": folder, "random_first": random_first, "random_repeat": random_repeat, "prose_first": prose_first,
            "prose_second": prose_second, "answer_own_passage": own, "answer_other_passage": other}


def _accuracy_table(rows: list[dict]) -> str:
    "A Markdown table: one line per method and steps, each task's accuracy after (peft's beside ours)."
    head = ("| method | steps | train s | loss | self-cognition | tool call well-formed | right expression | reading EM | reading F1 |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    def cells(acc): return (f"{acc['self_cognition']['correct']:.0%} | {acc['tool_use']['well_formed']:.0%} | "
                            f"{acc['tool_use']['correct']:.0%} | {acc['reading']['correct']:.0%} | {acc['reading']['f1']:.2f}")
    lines = [f"| before | 0 | | | {cells(rows[0]['before'])} |"] if rows else []
    for r in rows:
        lines.append(f"| {r['method']} (ours) | {r['steps']} | {r['train_seconds']:.0f} | {r['final_loss']:.2f} | {cells(r['after'])} |")
        if "peft" in r:
            p = r["peft"]
            lines.append(f"| lora (peft) | {r['steps']} | {p['seconds']:.0f} | {p['final_loss']:.2f} | {cells(p['after'])} |")
    return head + "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cpu-1m")
    ap.add_argument("--mem-preset", default="gpu-25m", help="model for the memory comparison")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10, help="timed steps (step time)")
    ap.add_argument("--accuracy", action="store_true")
    ap.add_argument("--copy", help="comma-separated model folders: the copy check (copy_check) of each")
    ap.add_argument("--base")
    ap.add_argument("--acc-steps", default="100,300")
    ap.add_argument("--methods", default="lora,qlora")
    ap.add_argument("--no-peer", action="store_true", help="skip peft's LoRA run beside ours")
    ap.add_argument("--ft-batch", type=int, default=8, help="packed windows per fine-tuning step")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--n-train", type=int, default=600)
    ap.add_argument("--n-test", type=int, default=50)
    ap.add_argument("--child"); ap.add_argument("--child-steps", type=int, default=4)
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    if a.child: _variant_child(a.child, a.mem_preset if a.preset == "cpu-1m" else a.preset, a.batch, a.seq, a.child_steps); return
    result = {"threads": torch.get_num_threads()}
    if a.copy:
        rows = [copy_check(f) for f in a.copy.split(",")]
        print("| model | random tokens: 1st copy | repeat | prose: 1st reading | 2nd | reading answer: own passage | another |\n"
              "|---|---|---|---|---|---|---|")
        for r in rows: print(f"| {r['model']} | " + " | ".join(f"{v:.2f}" for k, v in r.items() if k != "model") + " |")
        print(json.dumps(result | {"copy": rows})); return
    if a.accuracy:
        rows = accuracy(a.base, [int(s) for s in a.acc_steps.split(",")], a.methods.split(","), a.n_train, a.n_test,
                        not a.no_peer, a.ft_batch, a.lr)
        print(_accuracy_table(rows))
        print(json.dumps(result | {"accuracy": rows})); return
    step = lora_step_time(a.preset, a.batch, a.seq, 8, a.steps)
    print(f"LoRA r=8 step ({a.preset}, batch {a.batch}x{a.seq}): ours {step['ours_s'] * 1e3:.1f} ms, peft {step['peft_s'] * 1e3:.1f} ms "
          f"-> {step['speedup']:.2f}x")
    mem = memory_and_time(a.mem_preset, max(1, a.batch // 2), a.seq, 4)
    print(f"\n{'method':6s} | trainable | peak RSS above model (MB) | step (s)\n" + "-" * 52)
    for m in mem: print(f"{m['method']:6s} | {m['trainable']:9,d} | {m['train_peak_above_build_mb']:25.0f} | {m['step_s']:.3f}")
    bits = [nf4_bits(p) for p in ("cpu-1m", "gpu-25m")]
    for b in bits: print(f"NF4 + double quantisation, {b['preset']}: {b['bits_per_param']:.3f} bits/param over {b['params']:,} parameters")
    result |= {"lora_step": step, "memory": mem, "nf4_bits": bits}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
