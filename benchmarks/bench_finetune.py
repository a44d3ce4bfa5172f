"""Chapter 5 benchmark: LoRA step time ours vs peft, full / LoRA / QLoRA peak memory and step time, NF4 bits per
parameter, and held-out accuracy of the three synthetic tasks before/after fine-tuning (or accuracy vs steps).

    python benchmarks/bench_finetune.py                       # step time, memory, bits/param (minutes)
    python benchmarks/bench_finetune.py --accuracy [--base runs/X/pretrain/model] [--steps 100,300]

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


def accuracy(base: str | None, steps_list: list[int], method: str, n_train: int, n_test: int) -> list[dict]:
    "Held-out accuracy per task after each number of steps (one run per point; before = step 0)."
    from course_lib.finetune import FinetuneConfig, run_finetune
    rows = []
    for steps in steps_list:
        t0 = time.perf_counter()
        r = run_finetune(FinetuneConfig(model=base or "", method=method, steps=steps, n_train=n_train, n_test=n_test,
                                        output=f"runs/bench-finetune/{method}-{steps}"))
        rows.append({"method": method, "steps": steps, "seconds": time.perf_counter() - t0, "before": r["before"],
                     "after": r["after"], "final_loss": r["final_loss"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cpu-1m")
    ap.add_argument("--mem-preset", default="gpu-25m", help="model for the memory comparison")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10, help="timed steps (step time)")
    ap.add_argument("--accuracy", action="store_true")
    ap.add_argument("--base")
    ap.add_argument("--acc-steps", default="0,100,300")
    ap.add_argument("--method", default="lora")
    ap.add_argument("--n-train", type=int, default=600)
    ap.add_argument("--n-test", type=int, default=50)
    ap.add_argument("--child"); ap.add_argument("--child-steps", type=int, default=4)
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    if a.child: _variant_child(a.child, a.mem_preset if a.preset == "cpu-1m" else a.preset, a.batch, a.seq, a.child_steps); return
    result = {"threads": torch.get_num_threads()}
    if a.accuracy:
        result["accuracy"] = accuracy(a.base, [int(s) for s in a.acc_steps.split(",")], a.method, a.n_train, a.n_test)
        print(json.dumps(result)); return
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
