"""Grading tests for hw04: the student's schedule and AdamW step against course_lib.pretrain on fresh random inputs."""
import math

import pytest
import torch

from course_lib.pretrain import AdamW, CosineSchedule

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
