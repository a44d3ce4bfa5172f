"""Grading tests for hw08: circular accuracy, unbiased pass@k and 13-gram overlap against course_lib on fresh random inputs."""
import math

import pytest

from course_lib.eval import Task, circular_scores
from course_lib.evalsuite import NgramIndex, contamination, pass_at_k

REFERENCES = ["course_lib.eval.circular_scores", "course_lib.evalsuite.pass_at_k", "course_lib.evalsuite.contamination",
              "course_lib.evalsuite.NgramIndex"]


@pytest.mark.question("q1 circular_accuracy", points=1)
def test_circular_hand_made(student):
    assert student.circular_accuracy([True, True, True, False], [0, 0, 1, 1]) == pytest.approx((1.0, 0.5))
    assert student.circular_accuracy([False, True, True, True], [0, 0, 0, 0]) == pytest.approx((0.0, 0.0))


@pytest.mark.question("q1 circular_accuracy", points=2)
def test_circular_random(student, rng):
    for _ in range(50):
        n_items, n_rot = int(rng.integers(1, 30)), int(rng.integers(2, 6))
        correct = [bool(x) for x in rng.random(n_items * n_rot) < rng.uniform(0.2, 0.95)]
        group = [i for i in range(n_items) for _ in range(n_rot)]
        want = circular_scores(correct, group)
        assert student.circular_accuracy(correct, group) == pytest.approx((want["acc"], want["circular_acc"]))


@pytest.mark.question("q2 pass_at_k", points=1)
def test_pass_at_k_edges(student):
    assert student.pass_at_k(5, 5, 2) == 1.0 and student.pass_at_k(20, 0, 3) == 0.0
    with pytest.raises(ValueError):
        student.pass_at_k(3, 1, 5)


@pytest.mark.question("q2 pass_at_k", points=2)
def test_pass_at_k_random(student, rng):
    for _ in range(200):
        n = int(rng.integers(1, 300)); c = int(rng.integers(0, n + 1)); k = int(rng.integers(1, n + 1))
        assert student.pass_at_k(n, c, k) == pytest.approx(pass_at_k(n, c, k), abs=1e-9), (n, c, k)
        if n < 60: assert student.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-9)
    assert student.pass_at_k(10_000, 37, 100) == pytest.approx(pass_at_k(10_000, 37, 100), rel=1e-9)


@pytest.mark.question("q3 overlap_fractions", points=4)
def test_overlap_random(student, rng):
    vocab = [f"w{i}" for i in range(int(rng.integers(50, 400)))]
    corpus = [" ".join(rng.choice(vocab, size=int(rng.integers(20, 400)))) for _ in range(30)]
    items = []
    for _ in range(40):
        kind = rng.integers(3)
        if kind == 0: items.append(" ".join(rng.choice(vocab, size=int(rng.integers(5, 60)))))
        else:
            doc = corpus[int(rng.integers(len(corpus)))].split()
            start = int(rng.integers(0, max(1, len(doc) - 20)))
            planted = doc[start:start + int(rng.integers(10, 40))]
            noise = list(rng.choice(vocab, size=int(rng.integers(0, 20))))
            items.append(" ".join(noise + [w.upper() if kind == 2 else w for w in planted] + noise))
    want = contamination(Task("t", "gen", [{"question": q, "answer": ""} for q in items]), NgramIndex(corpus))
    got = student.overlap_fractions(items, corpus)
    assert got == pytest.approx([r["overlap"] for r in want["records"]])
