"""Chapter 4: each from-scratch piece against PyTorch's own, exact resume (also after SIGKILL), and
2-process DDP / FSDP / ZeRO-1/2/3 against single-process training on the same global batch."""
import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from course_lib.core import fast_bf16
from course_lib.model import Decoder, from_hf, get_config
from course_lib.pretrain import (AdamW, BatchSource, CosineSchedule, TokenBatches, TrainConfig, clip_grad_norm, cross_entropy,
                                 eval_batches, get_batch, load_checkpoint, param_groups, read_log, save_checkpoint, train)
from course_lib.tokenizer import load_tokens, write_token_files

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tokens(tmp_path) -> Path:
    "Token files with some structure to learn (a repeating pattern plus noise), ids < 256."
    rng = np.random.default_rng(0)
    def text(n):
        base = np.tile(np.arange(40, 104), n // 64 + 1)[:n]
        noise = rng.random(n) < 0.2
        return np.where(noise, rng.integers(0, 256, n), base)
    return write_token_files({"train": text(30_000), "val": text(4_000)}, tmp_path / "tokens", vocab_size=256, eos_id=255)


TINY = TrainConfig(preset="cpu-1m", steps=8, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, eval_every=4,
                   eval_batches=2, sample_tokens=4, ckpt_every=2, device="cpu", seed=7)


def losses(out: Path) -> list[float]:
    return [v for _, v in read_log(out / "log.jsonl")["loss"]]


# --- the from-scratch pieces vs PyTorch -------------------------------------------------------

def test_cross_entropy_matches_torch_values_and_gradients():
    torch.manual_seed(0)
    z = (torch.randn(3, 11, 300) * 20).requires_grad_()                  # large logits: naive exp would overflow
    t = torch.randint(0, 300, (3, 11)); t[1, 2:6] = -100
    ours, ref = cross_entropy(z, t), F.cross_entropy(z.flatten(0, 1), t.flatten())
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, z)[0], torch.autograd.grad(ref, z)[0])
    assert cross_entropy(torch.tensor([[1e4, 0.0]]), torch.tensor([1])).item() == pytest.approx(1e4)


@pytest.mark.parametrize("wd,betas", [(0.0, (0.9, 0.999)), (0.1, (0.9, 0.95)), (0.5, (0.8, 0.9))])
def test_adamw_equals_torch_step_for_step(wd, betas):
    torch.manual_seed(1)
    a = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    b = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)); b.load_state_dict(a.state_dict())
    opt_a = AdamW(param_groups(a, wd), lr=3e-2, betas=betas, eps=1e-8)
    opt_b = torch.optim.AdamW(param_groups(b, wd), lr=3e-2, betas=betas, eps=1e-8, foreach=False)
    for step in range(30):
        for group_a, group_b in zip(opt_a.param_groups, opt_b.param_groups):
            group_a["lr"] = group_b["lr"] = 3e-2 * (1 - step / 40)           # a changing rate, as the schedule does
        x = torch.randn(8, 6)
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad(); model(x).pow(2).mean().backward(); opt.step()
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, atol=1e-7, rtol=1e-6)
    # the state round-trips through state_dict
    fresh = AdamW(param_groups(a, wd), lr=1.0); fresh.load_state_dict(opt_a.state_dict())
    assert fresh.state_dict()["state"][0]["step"] == 30
    with pytest.raises(ValueError, match="invalid AdamW"):
        AdamW(a.parameters(), betas=(1.0, 0.9))


@pytest.mark.parametrize("warmup,total,floor", [(25, 300, 0.05), (1, 50, 0.1), (0, 40, 0.0), (10, 10, 0.1)])
def test_cosine_schedule_matches_transformers(warmup, total, floor):
    "Step for step equal to transformers' cosine-with-floor schedule, step 0 of a warm-up included (lr 0, its convention)."
    from transformers import get_cosine_with_min_lr_schedule_with_warmup
    sched = CosineSchedule(6e-4, warmup_steps=warmup, total_steps=total, min_lr_ratio=floor)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=6e-4)
    ref = get_cosine_with_min_lr_schedule_with_warmup(opt, num_warmup_steps=warmup, num_training_steps=total, min_lr_rate=floor)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    np.testing.assert_allclose([sched(s) for s in range(total)], lrs, rtol=1e-9, atol=1e-15)
    if warmup:
        assert sched(0) == 0.0
    assert sched(10_000) == pytest.approx(6e-4 * floor)
    with pytest.raises(ValueError, match="warmup_steps"):
        CosineSchedule(1e-3, warmup_steps=10, total_steps=5)


@pytest.mark.parametrize("max_norm", [0.1, 1.0, 1e6])
def test_clipping_matches_torch(max_norm):
    torch.manual_seed(2)
    shapes = [(4, 5), (5,), (3, 3, 2)]
    a = [torch.zeros(s, requires_grad=True) for s in shapes]
    b = [torch.zeros(s, requires_grad=True) for s in shapes]
    for pa, pb in zip(a, b):
        pa.grad = torch.randn(pa.shape); pb.grad = pa.grad.clone()
    torch.testing.assert_close(clip_grad_norm(a, max_norm), torch.nn.utils.clip_grad_norm_(b, max_norm))
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa.grad, pb.grad)


# --- data ---------------------------------------------------------------------------------------

def test_batches_and_bad_token_files(tokens, tmp_path):
    data = load_tokens(tokens)
    x, y = get_batch(data.train, 3, 16, np.random.default_rng(0))
    assert x.dtype == torch.int64 and x.shape == (3, 16) and torch.equal(x[:, 1:], y[:, :-1])
    starts = np.random.default_rng(0).integers(0, len(data.train) - 16, size=3)
    assert x[1].tolist() == data.train[starts[1]:starts[1] + 16].tolist()
    windows = [xb for xb, _ in eval_batches(data.val, 4, 50)]
    assert sum(len(w) for w in windows) == (len(data.val) - 1) // 50
    assert windows[0][1, 0].item() == data.val[50]
    with pytest.raises(ValueError, match="fewer than one window"):
        get_batch(data.train[:10], 2, 16, np.random.default_rng(0))
    small = write_token_files({"train": np.arange(20), "val": np.arange(20)}, tmp_path / "small", 256, 0)
    with pytest.raises(ValueError, match="fewer than one window"):
        train(dataclasses.replace(TINY, seq_len=64), small, tmp_path / "out")
    with pytest.raises(ValueError, match="unknown strategy"):
        TrainConfig(strategy="horovod")


# --- the loop -----------------------------------------------------------------------------------

def test_training_learns_and_our_pieces_equal_torchs_in_the_loop(tokens, tmp_path):
    cfg = dataclasses.replace(TINY, steps=12, eval_every=6)
    summary = train(cfg, tokens, tmp_path / "ours")                       # loss fused into the head (the default)
    train(dataclasses.replace(cfg, fused_loss=False), tokens, tmp_path / "ours_logits")   # our cross_entropy on logits
    ref = train(dataclasses.replace(cfg, impl="torch", fused_loss=False), tokens, tmp_path / "torch")
    for run in ("ours", "ours_logits"):
        np.testing.assert_allclose(losses(tmp_path / run), losses(tmp_path / "torch"), rtol=2e-5)
    assert losses(tmp_path / "ours")[0] == pytest.approx(math.log(256), abs=0.3)
    assert summary["val_loss"] < losses(tmp_path / "ours")[0] - 0.5
    for f in ("log.jsonl", "loss.png", "checkpoints/last.pt", "model/model.safetensors", "model/config.json"):
        assert (tmp_path / "ours" / f).is_file(), f
    assert read_log(tmp_path / "ours" / "log.jsonl")["sample"]
    assert ref["final_loss"] == pytest.approx(summary["final_loss"], rel=2e-5)


def test_grad_accumulation_equals_one_big_batch(tokens, tmp_path):
    # two micro-batches of 4 draw the same 8 windows as one batch of 8 (one generator, consumed in order),
    # so accumulation must reproduce the big batch's losses and weights
    train(dataclasses.replace(TINY, steps=4, batch_size=8, eval_every=0), tokens, tmp_path / "big")
    train(dataclasses.replace(TINY, steps=4, batch_size=4, grad_accum=2, eval_every=0), tokens, tmp_path / "acc")
    np.testing.assert_allclose(losses(tmp_path / "acc"), losses(tmp_path / "big"), rtol=1e-5)
    a, b = from_hf(tmp_path / "big" / "model"), from_hf(tmp_path / "acc" / "model")
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-4)


def test_activation_checkpointing_and_bf16(tokens, tmp_path):
    plain = train(dataclasses.replace(TINY, steps=3, eval_every=0), tokens, tmp_path / "plain")
    ckpt = train(dataclasses.replace(TINY, steps=3, eval_every=0, activation_checkpointing=True), tokens, tmp_path / "ac")
    np.testing.assert_allclose(losses(tmp_path / "ac"), losses(tmp_path / "plain"), rtol=1e-5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(dataclasses.replace(TINY, steps=3, eval_every=0, dtype="bfloat16"), tokens, tmp_path / "bf16")
    np.testing.assert_allclose(losses(tmp_path / "bf16"), losses(tmp_path / "plain"), rtol=0.02)   # bf16: ~3 digits
    slow_warned = any("without fast bfloat16" in str(w.message) for w in caught)
    assert slow_warned == (not fast_bf16("cpu"))                           # warned exactly on CPUs that crawl in bf16


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file() or os.uname().machine != "x86_64", reason="reads x86 Linux CPU flags")
def test_fast_bf16_agrees_with_the_cpu_flags():
    "oneDNN's bf16 kernels need AVX-512 (F, BW, VL, DQ); the kernel's flag list is an independent reference."
    flags = set(Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split())
    assert fast_bf16("cpu") == ({"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags)


def test_resume_is_exact(tokens, tmp_path):
    train(TINY, tokens, tmp_path / "straight")
    train(TINY, tokens, tmp_path / "resumed", stop_at=5)
    assert len(losses(tmp_path / "resumed")) == 5
    train(TINY, tokens, tmp_path / "resumed")
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    a, b = from_hf(tmp_path / "straight" / "model"), from_hf(tmp_path / "resumed" / "model")
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    # a checkpoint for a different model is refused, naming the mismatch
    with pytest.raises(ValueError, match="was made for model config"):
        train(dataclasses.replace(TINY, preset="gpu-25m"), tokens, tmp_path / "resumed")


KILLED_CHILD = """
import os, signal, sys, dataclasses
from course_lib.pretrain import TrainConfig, train
cfg = TrainConfig(**{cfg})
def hook(step, micro):
    if step == 5 and micro == 1:                       # mid-step: one of two micro-batches accumulated
        os.kill(os.getpid(), signal.SIGKILL)
train(cfg, sys.argv[1], sys.argv[2], on_micro_step=hook)
"""


def test_resume_after_sigkill_mid_step(tokens, tmp_path):
    cfg = dataclasses.replace(TINY, grad_accum=2, steps=9, ckpt_every=2, eval_every=3)
    straight = train(cfg, tokens, tmp_path / "straight")
    child = KILLED_CHILD.replace("{cfg}", repr(dataclasses.asdict(cfg)))
    proc = subprocess.run([sys.executable, "-c", child, str(tokens), str(tmp_path / "killed")], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=os.environ | {"CAMP_PROGRESS": "0"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpt = torch.load(tmp_path / "killed" / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["step"] == 4                                              # the last checkpoint before the kill
    assert len(losses(tmp_path / "killed")) == 5                          # step 6 never finished
    resumed = train(cfg, tokens, tmp_path / "killed")
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")
    assert resumed["val_loss"] == straight["val_loss"]
    assert [s for s, _ in read_log(tmp_path / "killed" / "log.jsonl")["val_loss"]] == [3, 6, 9]


# --- several processes --------------------------------------------------------------------------

def _torchrun(strategy: str, tokens: Path, out: Path, cfg: TrainConfig, port: int, extra=()) -> subprocess.CompletedProcess:
    args = [f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg) if f.name not in ("strategy",)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "course_lib.pretrain", f"data={tokens}", f"out={out}", f"strategy={strategy}", *args, *extra]
    env = os.environ | {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "CAMP_PROGRESS": "0"}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240, env=env)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero1", "zero2", "zero3"])
def test_two_processes_match_single_process(strategy, tokens, tmp_path):
    cfg = dataclasses.replace(TINY, steps=4, batch_size=2, eval_every=0, ckpt_every=0, grad_accum=1)
    single = dataclasses.replace(cfg, batch_size=4)                        # the same global batch in one process
    torch.set_num_threads(1)
    try:
        train(single, tokens, tmp_path / "single")
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    with socket.socket() as sock:                                        # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0)); port = sock.getsockname()[1]
    proc = _torchrun(strategy, tokens, tmp_path / strategy, cfg, port)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads((tmp_path / strategy / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["losses"] == ranks[1]["losses"]                          # every rank logs the same all-reduced loss
    assert ranks[0]["zero_stage"] == (int(strategy[-1]) if strategy.startswith("zero") else None)
    if ranks[0]["local_param_abs_sum"] is not None:                          # replicas (DDP, ZeRO-1/2) hold equal weights
        assert ranks[0]["local_param_abs_sum"] == pytest.approx(ranks[1]["local_param_abs_sum"], rel=1e-12)
    np.testing.assert_allclose(ranks[0]["losses"], losses(tmp_path / "single"), rtol=1e-5)
    a, b = from_hf(tmp_path / "single" / "model"), from_hf(tmp_path / strategy / "model")
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        # Adam divides by sqrt(v): where a gradient is ~0, float rounding (summation order across ranks) can move
        # a weight by a visible fraction of one step (lr = 3e-3), so bound the worst element loosely, the mean tightly
        diff = (pa - pb).abs()
        assert diff.max().item() < 1e-4 and diff.mean().item() < 1e-6, (name, diff.max().item(), diff.mean().item())


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy", ["fsdp", "zero2"])
def test_two_processes_resume_exactly(strategy, tokens, tmp_path):
    "Stopped after 2 of 4 steps (FSDP: gathered one-file checkpoint; ZeRO: DeepSpeed's sharded one), resumed, equal to one process."
    cfg = dataclasses.replace(TINY, steps=4, batch_size=2, eval_every=0, ckpt_every=1, grad_accum=1)
    torch.set_num_threads(1)
    try:
        train(dataclasses.replace(cfg, batch_size=4), tokens, tmp_path / "single")
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    out = tmp_path / strategy
    for extra in (["stop_at=2"], []):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0)); port = sock.getsockname()[1]
        proc = _torchrun(strategy, tokens, out, cfg, port, extra)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        if extra: assert len(losses(out)) == 2
    np.testing.assert_allclose(losses(out), losses(tmp_path / "single"), rtol=1e-5)
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]["losses"]) == 2                                      # the second process ran steps 3 and 4 only


# --- a user's own batches, model and loop -------------------------------------------------------

class HalfMasked:
    "A BatchSource like chapter 5's: windows of a token folder with no loss on the first half (a 'prompt')."
    def __init__(self, folder, seq_len):
        self.inner = TokenBatches(load_tokens(folder), seq_len)
        self.vocab_size, self.eos_id = self.inner.vocab_size, self.inner.eos_id

    def mask(self, x, y):
        y = y.clone()
        y[:, : y.shape[1] // 2] = -100
        return x, y

    def train_batch(self, batch_size, rng, device, rows=None):
        return self.mask(*self.inner.train_batch(batch_size, rng, device, rows))

    def val_batches(self, batch_size, max_batches, device):
        return [self.mask(x, y) for x, y in self.inner.val_batches(batch_size, max_batches, device)]


def test_train_takes_a_batch_source_and_a_frozen_model(tokens, tmp_path):
    source = HalfMasked(tokens, TINY.seq_len)
    assert isinstance(source, BatchSource)
    torch.manual_seed(3)
    model = Decoder(get_config("cpu-1m", vocab_size=256))
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("layers.1.")                   # a frozen base, one trainable block
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    # the first step's loss, computed independently: torch's cross-entropy over the unmasked targets of the first batch
    x, y = source.train_batch(TINY.batch_size, np.random.default_rng(TINY.seed), "cpu")
    with torch.no_grad():
        expected = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100).item()
    exported = []
    summary = train(dataclasses.replace(TINY, steps=4, eval_every=2), source, tmp_path / "sft", model=model,
                    export=lambda m, path: exported.append(path))
    assert losses(tmp_path / "sft")[0] == pytest.approx(expected, rel=1e-5)
    assert summary["tokens"] == 4 * TINY.batch_size * (TINY.seq_len - TINY.seq_len // 2)   # only targets with a loss count
    assert exported == [tmp_path / "sft" / "model"]
    for n, p in model.named_parameters():
        if n in frozen: assert torch.equal(p, frozen[n]), n               # untouched, not even by weight decay
    assert any(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if n in trainable)
    ckpt = torch.load(tmp_path / "sft" / "checkpoints" / "last.pt", weights_only=False)
    assert sum(len(g["params"]) for g in ckpt["optimizer"]["param_groups"]) == len(trainable)
    with pytest.raises(TypeError, match="BatchSource"):
        train(TINY, [1, 2, 3], tmp_path / "bad")


def test_save_and_load_checkpoint_in_a_users_own_loop(tmp_path):
    "Stop after 3 of 6 steps, save, load into fresh objects, finish: the same weights as 6 steps straight."
    def run(model, optimizer, rng, steps):
        for _ in range(steps):
            x = torch.from_numpy(rng.standard_normal((4, 6))).float()
            optimizer.zero_grad()
            (model(x) + 0.01 * torch.randn(4, 3)).pow(2).mean().backward()   # torch's global RNG is part of the state
            optimizer.step()
    def fresh():
        torch.manual_seed(0)
        model = nn.Linear(6, 3)
        return model, torch.optim.AdamW(model.parameters(), lr=0.1), np.random.default_rng(1)
    straight, opt, rng = fresh()
    run(straight, opt, rng, 6)
    model, opt, rng = fresh()
    run(model, opt, rng, 3)
    save_checkpoint(tmp_path / "ck.pt", model, opt, step=3, data_rng=rng, note="mine")
    torch.manual_seed(123); np.random.seed(5)                              # disturb every global generator
    model, opt, rng = fresh()
    rng = np.random.default_rng(99)
    state = load_checkpoint(tmp_path / "ck.pt", model, opt, rng)
    assert (state["step"], state["note"]) == (3, "mine")
    run(model, opt, rng, 3)
    assert torch.equal(model.weight, straight.weight) and torch.equal(model.bias, straight.bias)
    with pytest.raises(ValueError, match="was made for note 'mine'"):
        load_checkpoint(tmp_path / "ck.pt", model, expect={"note": "theirs"})


# --- one settings path --------------------------------------------------------------------------

def test_train_config_from_settings_and_its_defaults_are_the_settings():
    from course_lib.core import Settings, load_settings
    s = load_settings("ci", ["steps=3", "warmup_steps=10", "lr=1e-3", "dtype=float32"])
    cfg = TrainConfig.from_settings(s)
    assert (cfg.preset, cfg.steps, cfg.warmup_steps, cfg.lr, cfg.dtype, cfg.ckpt_every) == (s.model_preset, 3, 3, 1e-3, "float32", s.eval_every)
    assert (cfg.batch_size, cfg.grad_accum, cfg.seq_len, cfg.eval_every, cfg.seed, cfg.device) == (
        s.batch_size, s.grad_accum, s.seq_len, s.eval_every, s.seed, s.device)
    assert TrainConfig.from_settings(s, steps=8).steps == 8
    # no default repeated: a bare TrainConfig is the bare Settings' run
    assert TrainConfig() == TrainConfig.from_settings(Settings(), warmup_steps=Settings.warmup_steps)


def test_command_line_reads_values_by_the_settings_rules():
    "The same words mean the same thing on `camp run` and `python -m course_lib.pretrain` (booleans were read two ways)."
    from course_lib.pretrain import parse_overrides
    cfg, extra = parse_overrides(["data=d", "out=o", "compile=on", "activation_checkpointing=yes", "steps=1_000", "resume=no",
                                  "stop_at=3"])
    assert (cfg.compile, cfg.activation_checkpointing, cfg.steps) == (True, True, 1000)
    assert extra == {"data": "d", "out": "o", "resume": False, "stop_at": 3}
    with pytest.raises(SystemExit, match="did you mean 'steps'"):
        parse_overrides(["setps=3"])


# --- is my model any good: nats/token, bits/byte, perplexity --------------------------------------

class Uniform(nn.Module):
    "A model that knows nothing: equal logits for every id."
    def __init__(self, vocab: int):
        super().__init__(); self.vocab = vocab
    def forward(self, x): return torch.zeros(*x.shape, self.vocab)


def test_loss_report_of_a_uniform_model_is_worked_by_hand():
    from course_lib.pretrain import loss_report
    V = 8
    lengths = np.array([1, 2, 3, 1, 4, 1, 1, 0])                          # id 7 stands for no text (a special token)
    x = torch.zeros(2, 5, dtype=torch.long)
    y = torch.tensor([[0, 1, 2, 7, -100], [4, 4, 7, 3, 5]])               # 9 targets kept; 7 of them text
    r = loss_report(Uniform(V), [(x, y)], lengths)
    text_bytes = 1 + 2 + 3 + 4 + 4 + 1 + 1                                # the text targets' bytes: 16
    assert r["tokens"] == 9 and r["bytes"] == text_bytes
    assert r["nats_per_token"] == pytest.approx(math.log(V))             # ln V nats per token
    assert r["perplexity"] == pytest.approx(V)                           # e^(ln V) = V
    assert r["bits_per_byte"] == pytest.approx(7 * math.log2(V) / text_bytes)   # 3 bits per text token, over 16 bytes
    # byte tokens: every text token is one byte, so bits/byte = nats/token / ln 2 = log2(257) for the uniform model
    y8 = torch.randint(0, 256, (3, 16))
    r8 = loss_report(Uniform(257), [(torch.zeros_like(y8), y8)], np.r_[np.ones(256, int), 0])
    assert r8["bits_per_byte"] == pytest.approx(math.log2(257))


def test_token_bytes_count_the_text_a_tokenizer_encodes(tmp_path):
    "Bytes per id from tokenizer.json sum to the UTF-8 length of any text Hugging Face's tokenizer encodes."
    from tokenizers import Tokenizer as HFTokenizer
    from course_lib.core import embedded_corpus
    from course_lib.pretrain import token_bytes
    from course_lib.tokenizer import DEFAULT_SPECIALS, Tokenizer, save_hf, train_bpe
    texts = [d["text"] for d in embedded_corpus("code,prose", max_bytes=60_000)]
    tok = Tokenizer(*train_bpe(texts, 400, DEFAULT_SPECIALS, processes=1), DEFAULT_SPECIALS)
    save_hf(tok, tmp_path)
    lengths = token_bytes(tok.vocab_size, tmp_path / "tokenizer.json")
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in ["def f(x):\n    return x  # é", "你好，世界 🙂", texts[-1][:500] + "<|endoftext|>"]:
        ids = hf.encode(text).ids
        assert lengths[ids].sum() == len(text.replace("<|endoftext|>", "").encode("utf-8"))


def test_training_logs_bits_per_byte_and_the_stage_reports_them_per_kind(tmp_path):
    "Byte tokens: bits/byte is nats/token over ln 2 (minus the end-of-text targets); the camp report has a row per kind."
    from course_lib.core import RunContext, load_settings
    from course_lib.pretrain import pretrain_stage
    from course_lib.tokens import write_byte_tokens
    docs = [{"id": f"d{i}", "text": ("def f(x):\n    return x\n" if i % 2 else "The cat sat on the mat. ") * 40,
             "meta": {"kind": "code" if i % 2 else "prose"}} for i in range(60)]
    data = write_byte_tokens(docs, tmp_path / "tokens", 0.2)
    summary = train(dataclasses.replace(TINY, steps=4, eval_every=4), data, tmp_path / "run")
    log = read_log(tmp_path / "run" / "log.jsonl")
    assert summary["val_bpb"] == log["val_bpb"][-1][1]
    assert summary["val_bpb"] == pytest.approx(summary["val_loss"] / math.log(2), rel=0.05)   # ~1 eos in 1000 bytes
    ctx = RunContext(tmp_path / "camp", load_settings("ci", {"steps": "4", "eval_every": "4", "target_bits_per_byte": "9.5", "val_fraction": "0.3"}))
    (ctx.run_dir / "corpus").mkdir(parents=True)
    (ctx.run_dir / "corpus" / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    report = pretrain_stage(ctx)
    figures = ctx.summary["pretrain"]
    assert set(figures["by_kind"]) == {"code", "prose"}
    assert "bits/byte" in report and "| code |" in report and "| prose |" in report and "**reached**" in report
    assert figures["target_reached"] is True and figures["val_bits_per_byte"] < math.log2(257) + 0.2
