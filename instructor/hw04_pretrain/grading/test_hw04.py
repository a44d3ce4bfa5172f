"""Grading tests for hw04: the schedule and the AdamW step against course_lib.pretrain on fresh random inputs; the training
loop against a reference loop built from the library on a fixed tiny task, its loss judged by the grader's own evaluation,
its resume against the uninterrupted run at random interruption steps; the learning-rate sweep's artifact for plausible ranges."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from course_lib.model import Decoder, ModelConfig
from course_lib.pretrain import AdamW, CosineSchedule, clip_grad_norm, get_batch, param_groups

REFERENCES = ["course_lib.pretrain.AdamW", "course_lib.pretrain.CosineSchedule"]
FORBIDDEN = {"torch.optim": "hw04 asks you to write the optimizer step yourself"}


@pytest.mark.question("q1 cosine_lr", points=1)
def test_cosine_edge_cases(student):
    assert student.cosine_lr(0, 1.0, 4, 100) == pytest.approx(0.0)  # transformers' warm-up: step 0 gets 0
    assert student.cosine_lr(3, 1.0, 4, 100) == pytest.approx(0.75)
    assert student.cosine_lr(4, 1.0, 4, 100) == pytest.approx(1.0)
    assert student.cosine_lr(52, 1.0, 4, 100) == pytest.approx(0.55)   # halfway through the decay: (1 + 0.1) / 2
    assert student.cosine_lr(100, 1.0, 4, 100) == pytest.approx(0.1)
    assert student.cosine_lr(10_000, 2.0, 0, 10, 0.0) == pytest.approx(0.0)
    assert student.cosine_lr(0, 1.0, 0, 10) == pytest.approx(1.0)      # no warm-up


@pytest.mark.question("q1 cosine_lr", points=3)
def test_cosine_random(student, rng):
    for _ in range(100):
        total = int(rng.integers(1, 2000)); warmup = int(rng.integers(0, total + 1))
        max_lr, ratio = float(rng.uniform(1e-5, 1e-2)), float(rng.uniform(0, 0.5))
        schedule = CosineSchedule(max_lr, warmup, total, ratio)
        for step in rng.integers(0, total + 50, size=20):
            assert student.cosine_lr(int(step), max_lr, warmup, total, ratio) == pytest.approx(schedule(int(step)), rel=1e-9, abs=1e-15), \
                (int(step), max_lr, warmup, total, ratio)


def _reference_step(param, grad, m, v, step, lr, betas, eps, wd):
    p = param.clone().requires_grad_()
    opt = AdamW([p], lr=lr, betas=betas, eps=eps, weight_decay=wd)
    opt.state[p] = {"step": step - 1, "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
    p.grad = grad.clone()
    opt.step()
    return p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]


@pytest.mark.question("q2 adamw_step", points=2)
def test_adamw_first_step_and_purity(student):
    param, grad = torch.tensor([1.0, -1.0, 2.0]), torch.tensor([0.5, -3.0, 0.0])
    m, v = torch.zeros(3), torch.zeros(3)
    new_p, new_m, new_v = student.adamw_step(param, grad, m, v, 1, lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.5)
    want = _reference_step(param, grad, m, v, 1, 0.1, (0.9, 0.99), 1e-8, 0.5)
    for got, ref in zip((new_p, new_m, new_v), want):
        torch.testing.assert_close(got, ref)
    assert torch.equal(param, torch.tensor([1.0, -1.0, 2.0])) and torch.equal(m, torch.zeros(3)), "inputs must not change"


@pytest.mark.question("q2 adamw_step", points=4)
def test_adamw_random(student, rng):
    for _ in range(50):
        shape = tuple(int(s) for s in rng.integers(1, 6, size=rng.integers(1, 3)))
        t = lambda scale=1.0: torch.from_numpy(rng.standard_normal(shape) * scale).float()
        param, grad = t(), t(float(rng.uniform(1e-3, 10)))
        m, v = t(0.1), t(0.1).abs() ** 2
        step = int(rng.integers(1, 5000))
        lr, eps, wd = float(rng.uniform(1e-5, 1e-1)), float(rng.choice([1e-8, 1e-6])), float(rng.uniform(0, 0.3))
        betas = (float(rng.uniform(0.8, 0.95)), float(rng.uniform(0.9, 0.9999)))
        got = student.adamw_step(param, grad, m, v, step, lr=lr, betas=betas, eps=eps, weight_decay=wd)
        want = _reference_step(param, grad, m, v, step, lr, betas, eps, wd)
        for name, a, b in zip(("param", "exp_avg", "exp_avg_sq"), got, want):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=f"{name} at step {step}")


def tiny_task(seed: int, vocab: int = 32, n_tokens: int = 8192, segment: int = 48) -> np.ndarray:
    "The fixed tiny task: after token a comes perm[a], restarting at a random token every `segment` tokens."
    rng = np.random.default_rng(seed)
    perm, starts = rng.permutation(vocab), rng.integers(0, vocab, size=n_tokens // segment + 1)
    out = np.empty((len(starts), segment), dtype=np.int64)
    out[:, 0] = starts
    for i in range(1, segment): out[:, i] = perm[out[:, i - 1]]   # (segments, segment)
    return out.reshape(-1)[:n_tokens]


TINY = dict(vocab_size=32, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=64)
TASK, HELD_OUT = np.split(tiny_task(20261130, n_tokens=8192 + 4096), [8192])   # one permutation: train on one part, judge on the other
FLOOR = math.log(32) / 48   # the restarts cannot be predicted: the best possible loss


def reference_train(tokens, config, steps, max_lr=1e-2, warmup_steps=10, batch_size=16, seq_len=32, weight_decay=0.1, clip=1.0,
                    seed=0) -> dict:
    "The loop the homework specifies, from the library's AdamW (equal to torch.optim.AdamW), schedule and clipping."
    torch.manual_seed(seed)
    model, rng = Decoder(ModelConfig(**config)), np.random.default_rng(seed)
    opt = AdamW(param_groups(model, weight_decay), lr=max_lr, betas=(0.9, 0.95), eps=1e-8)
    schedule, losses = CosineSchedule(max_lr, warmup_steps, steps), []
    for step in range(steps):
        x, y = get_batch(tokens, batch_size, seq_len, rng)                       # (b, t) each
        loss = model(x, targets=y)
        opt.zero_grad(); loss.backward(); clip_grad_norm(model.parameters(), clip)
        for group in opt.param_groups: group["lr"] = schedule(step)
        opt.step(); losses.append(loss.item())
    return {"losses": losses, "weights": model.state_dict()}


def held_out_loss(weights: dict, tokens: np.ndarray) -> float:
    "The grader's own measurement: the returned weights in the library's decoder, over every window of held-out tokens."
    model = Decoder(ModelConfig(**TINY)).eval()
    model.load_state_dict(weights)
    windows = torch.from_numpy(tokens[: (len(tokens) - 1) // 32 * 32 + 1])
    x, y = windows[:-1].view(-1, 32), windows[1:].view(-1, 32)                 # (n, 32) each
    with torch.no_grad(): return torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()


def assert_same_run(got: dict, want: dict, what: str, rtol: float = 1e-6, atol: float = 1e-6):
    assert len(got["losses"]) == len(want["losses"]), f"{what}: {len(got['losses'])} losses, expected {len(want['losses'])}"
    for step, (a, b) in enumerate(zip(got["losses"], want["losses"])):
        assert a == pytest.approx(b, rel=rtol, abs=atol), f"{what}: the loss of step {step} is {a:.6f}, expected {b:.6f}"
    assert set(got["weights"]) == set(want["weights"]), "weights: return model.state_dict()"
    for name, w in want["weights"].items():
        torch.testing.assert_close(got["weights"][name], w, rtol=rtol, atol=atol, msg=f"{what}: final {name} differs")


@pytest.mark.question("q3 train", points=3)
def test_train_learns_the_tiny_task(student):
    run = student.train(TASK, TINY, 100)
    assert len(run["losses"]) == 100 and run["losses"][0] > 3.0, "one loss per step, starting near ln 32 = 3.47"
    loss = held_out_loss(run["weights"], HELD_OUT)
    assert loss < 0.6, f"after 100 steps the weights reach {loss:.2f} nats on held-out text of the task (want < 0.6; floor {FLOOR:.2f})"


@pytest.mark.question("q3 train", points=4)
def test_train_matches_the_reference_loop(student, rng):
    "Same init, same batches, same schedule, clipping, decay groups and AdamW: the same losses and weights."
    for _ in range(2):
        kw = dict(max_lr=float(rng.choice([3e-3, 1e-2, 3e-2])), warmup_steps=int(rng.integers(0, 8)),
                  batch_size=int(rng.integers(2, 9)), seq_len=int(rng.integers(4, 33)), weight_decay=float(rng.choice([0.0, 0.1, 0.5])),
                  clip=float(rng.choice([0.1, 1.0, 100.0])), seed=int(rng.integers(0, 2**31)))
        steps = int(rng.integers(10, 25))
        assert_same_run(student.train(TASK, TINY, steps, **kw), reference_train(TASK, TINY, steps, **kw), f"train(steps={steps}, {kw})",
                        rtol=1e-4, atol=1e-5)


def interrupted(student, steps: int, k: int, seed: int, path: str) -> tuple[dict, dict]:
    "Run to step k with a checkpoint, then resume to `steps` from it; the two calls' results."
    Path(path).unlink(missing_ok=True)
    first = student.train(TASK, TINY, steps, seed=seed, checkpoint=path, stop_after=k)
    assert Path(path).is_file(), f"train(..., checkpoint={path!r}, stop_after={k}) wrote no checkpoint file"
    return first, student.train(TASK, TINY, steps, seed=seed, checkpoint=path)


@pytest.mark.question("q4 checkpoint and exact resume", points=3)
def test_resume_equals_the_uninterrupted_run(student, rng):
    for _ in range(2):
        steps, seed = int(rng.integers(14, 30)), int(rng.integers(0, 2**31))
        k = int(rng.integers(11, steps))                              # past the warm-up
        whole = student.train(TASK, TINY, steps, seed=seed)
        first, rest = interrupted(student, steps, k, seed, "grader_ckpt.pt")
        assert len(first["losses"]) == k, f"stop_after={k} ran {len(first['losses'])} steps"
        assert first["losses"] == pytest.approx(whole["losses"][:k], rel=1e-6), "the run up to the interruption is the same run"
        assert len(rest["losses"]) == steps - k, f"resumed from step {k} of {steps}, it ran {len(rest['losses'])} steps"
        assert rest["losses"][0] == pytest.approx(whole["losses"][k], rel=1e-6, abs=1e-6), \
            f"the first step after resuming at {k} differs: restore the weights and the data generator's state"
        assert_same_run({"losses": first["losses"] + rest["losses"], "weights": rest["weights"]}, whole,
                        f"interrupted at step {k} of {steps} (the moments, the step count and the schedule must carry over)")


@pytest.mark.question("q4 checkpoint and exact resume", points=2)
def test_resume_during_the_warm_up_and_twice(student, rng):
    steps, seed = 16, int(rng.integers(0, 2**31))
    whole = student.train(TASK, TINY, steps, seed=seed)
    first, rest = interrupted(student, steps, 1, seed, "grader_ckpt_warm.pt")          # after the very first step
    assert_same_run({"losses": first["losses"] + rest["losses"], "weights": rest["weights"]}, whole, "interrupted after step 1")
    Path("grader_ckpt_twice.pt").unlink(missing_ok=True)
    losses = []
    for k in (3, 9, None):                                                              # killed twice, resumed twice
        losses += student.train(TASK, TINY, steps, seed=seed, checkpoint="grader_ckpt_twice.pt", stop_after=k)["losses"]
    assert losses == pytest.approx(whole["losses"], rel=1e-6, abs=1e-6), "interrupted at steps 3 and 9: the losses differ"


@pytest.mark.question("q4 checkpoint and exact resume", points=1)
def test_resuming_a_finished_run_changes_nothing(student, rng):
    steps, seed = 12, int(rng.integers(0, 2**31))
    Path("grader_ckpt_done.pt").unlink(missing_ok=True)
    done = student.train(TASK, TINY, steps, seed=seed, checkpoint="grader_ckpt_done.pt")
    again = student.train(TASK, TINY, steps, seed=seed, checkpoint="grader_ckpt_done.pt")
    assert again["losses"] == [], f"a finished run resumed ran {len(again['losses'])} more steps"
    assert_same_run({"losses": done["losses"], "weights": again["weights"]}, done, "a finished run resumed")


SWEEP = Path("lr_sweep.json"), Path("lr_sweep.png")


@pytest.mark.question("q5 experiment: learning-rate sweep", points=1)
def test_lr_sweep_function(student):
    sweep = student.lr_sweep(TASK, TINY, [1e-3, 3e-2], steps=12)
    runs = [reference_train(TASK, TINY, 12, max_lr=lr)["losses"] for lr in (1e-3, 3e-2)]
    assert sweep["lr"] == pytest.approx([1e-3, 3e-2])
    assert sweep["final_loss"] == pytest.approx([float(np.mean(r[-10:])) for r in runs], rel=1e-4), "the mean of the last 10 losses"


@pytest.mark.question("q5 experiment: learning-rate sweep", points=2)
def test_lr_sweep_artifact(student):
    student.lr_sweep(TASK, TINY, [1e-2], steps=1)      # the function runs (an untouched one says so)
    data, png = SWEEP
    assert data.is_file() and png.is_file(), f"the experiment cell writes {data} and {png} next to the notebook"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000, f"{png} is not a plot saved as PNG"
    sweep = json.loads(data.read_text())
    lr, loss = np.array(sweep["lr"], dtype=float), np.array(sweep["final_loss"], dtype=float)
    assert len(lr) >= 5 and len(lr) == len(loss) and np.all(np.diff(lr) > 0), "at least 5 increasing rates, one loss each"
    assert lr.min() <= 1e-3 and lr.max() >= 1e-1, "the sweep spans 1e-3 to 1e-1 at least"
    best = int(np.nanargmin(loss))
    assert FLOOR < loss[best] < 1.0, f"the best run reaches {loss[best]:.2f} nats: 60 steps at a good rate get below 1"
    assert 1e-3 <= lr[best] <= 0.3, f"the best peak rate {lr[best]:g} is implausible for this task"
    assert loss[0] > loss[best] + 0.5, "the smallest rate should learn visibly less than the best one"
    assert np.all((loss[np.isfinite(loss)] > FLOOR) & (loss[np.isfinite(loss)] < 20)), f"losses out of range: {loss}"
