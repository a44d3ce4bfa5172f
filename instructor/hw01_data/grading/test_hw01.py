"""Grading tests for hw01: each compares the student's function with course_lib.data on freshly generated documents."""
import math

import numpy as np
import pytest

from course_lib import data

REFERENCES = ["course_lib.data.quality_signals", "course_lib.data.redact", "course_lib.data.MinHasher"]

VOCAB = ["the", "The", "and", "of", "to", "with", "that", "have", "be", "cat", "river", "model", "token", "data",
         "x", "a", "supercalifragilistic", "42", "3.14", "#tag", "...", "…", "-", "—", "(word)", "'quoted'", "end.", "é", "文字"]


def _document(rng):
    lines = []
    for _ in range(rng.integers(0, 12)):
        words = list(rng.choice(VOCAB, size=rng.integers(0, 15)))
        prefix = rng.choice(["", "", "- ", "• ", "* ", "  ", "1. "])
        suffix = rng.choice(["", "", ".", "...", "…", " ", "!"])
        lines.append(prefix + " ".join(words) + suffix)
    return rng.choice(["\n", "\n\n", "\n \n"]).join(lines)


def _check_signals(got, want, text):
    assert set(got) == set(want), f"keys {sorted(got)} != {sorted(want)}"
    for key in want:
        assert got[key] == pytest.approx(want[key]), f"{key} for {text!r}: {got[key]} != {want[key]}"


@pytest.mark.question("q1 quality_signals", points=1)
def test_quality_signals_edge_cases(student):
    for text in ["", "   \n  ", "The cat sat.", "- a\n- b\n- c", "... … ...", "#a #b the and", "the\n\n\nend...", "(!!) ??"]:
        _check_signals(student.quality_signals(text), data.quality_signals(text, cjk=False), text)


@pytest.mark.question("q1 quality_signals", points=2)
def test_quality_signals_random(student, rng):
    for _ in range(200):
        text = _document(rng)
        _check_signals(student.quality_signals(text), data.quality_signals(text, cjk=False), text)


def _email(rng):
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789")
    local = "".join(rng.choice(letters, size=rng.integers(1, 10))) + rng.choice(["", ".x", "+tag", "_y", "-z"])
    domain = ".".join("".join(rng.choice(letters[:26], size=rng.integers(1, 8))) for _ in range(rng.integers(1, 3)))
    return f"{local}@{domain}.{rng.choice(['com', 'org', 'co.uk', 'io', 'museum'])}"


def _ip(rng, valid=True):
    if valid: return ".".join(str(v) for v in rng.integers(0, 256, size=4))
    kind = rng.integers(0, 5)
    if kind == 0: return ".".join(str(v) for v in rng.integers(0, 256, size=rng.choice([3, 5])))      # versions
    if kind == 1: return ".".join(str(v) for v in [rng.integers(256, 999), *rng.integers(0, 256, size=3)])
    if kind == 2: return "v" + ".".join(str(v) for v in rng.integers(0, 10, size=4))
    if kind == 3: return "0" + ".".join(str(v) for v in rng.integers(1, 10, size=4))                  # leading zero
    return f"{rng.integers(0, 9)}.{rng.integers(0, 9)}"


LOOKALIKES = ["user@localhost", "a@b.T", "@property", "x@y", "name@123.456", "foo@@bar.com", "mail at example dot com"]
VERSION_WORDS = ["version", "Version", "release", "build", "rev.", "ver."]   # 'version 10.0.0.1' is no address


def _pii_document(rng):
    parts = []
    for _ in range(rng.integers(3, 25)):
        r = rng.random()
        piece = (_email(rng) if r < 0.2 else _ip(rng) if r < 0.35 else f"{rng.choice(VERSION_WORDS)} {_ip(rng)}" if r < 0.45
                 else _ip(rng, valid=False) if r < 0.55 else str(rng.choice(LOOKALIKES)) if r < 0.65 else str(rng.choice(VOCAB[:14])))
        parts.append(rng.choice(["", "(", "<", "'"]) + piece + rng.choice(["", ")", ">", ",", ".", ":80", "'"]))
    return " ".join(parts)


@pytest.mark.question("q2 redact_emails_ips", points=1)
def test_redaction_table(student):
    for text in ["mail bob@example.com at 10.0.0.1", "v1.2.3.4 and 1.2.3.4.5 and 256.1.1.1", "<guido@python.org>",
                 "server 192.168.0.12:8080.", "user@localhost a@b.T @property", "first.last+tag@sub.example.co.uk", "0.0.0.0",
                 "version 10.0.0.1", "release 1.2.3.4 at 10.0.0.1", "Build 192.168.0.1"]:
        assert student.redact_emails_ips(text) == data.redact(text, ("EMAIL", "IPV4"))[0], text


@pytest.mark.question("q2 redact_emails_ips", points=2)
def test_redaction_random(student, rng):
    for _ in range(300):
        text = _pii_document(rng)
        assert student.redact_emails_ips(text) == data.redact(text, ("EMAIL", "IPV4"))[0], text


@pytest.mark.question("q3 minhash", points=2)
def test_minhash_signature_matches_reference(student, rng):
    for num_perm in (1, 16, 128):
        hasher = data.MinHasher(num_perm, seed=int(rng.integers(0, 2**31)))
        for size in (0, 1, 7, 5000):
            hashes = np.unique(rng.integers(0, 2**32, size=size, dtype=np.uint64))
            got = np.asarray(student.minhash_signature(hashes, hasher.a, hasher.b))
            assert got.shape == (num_perm,) and np.array_equal(got.astype(np.uint64), hasher.signature(hashes).astype(np.uint64)), (num_perm, size)


@pytest.mark.question("q3 minhash", points=1)
def test_minhash_large_set(student, rng):
    hasher = data.MinHasher(128, seed=1)
    hashes = np.unique(rng.integers(0, 2**32, size=100_000, dtype=np.uint64))
    assert np.array_equal(np.asarray(student.minhash_signature(hashes, hasher.a, hasher.b)).astype(np.uint64),
                          hasher.signature(hashes).astype(np.uint64))


def jaccard_tolerance(num_perm: int, trials: int, failure: float) -> float:
    "Hoeffding: P(|mean of num_perm Bernoulli(J) - J| >= t) <= 2 exp(-2 num_perm t^2); union over `trials` at total `failure`."
    return math.sqrt(math.log(2 * trials / failure) / (2 * num_perm))

NUM_PERM, TRIALS, FAILURE = 256, 20, 1e-6
TOLERANCE = jaccard_tolerance(NUM_PERM, TRIALS, FAILURE)   # 0.185: a correct solution fails one run in a million at most


@pytest.mark.question("q3 minhash", points=1)
def test_estimate_is_close_to_exact_jaccard(student, rng):
    hasher = data.MinHasher(NUM_PERM, seed=2)
    for _ in range(TRIALS):
        universe = rng.choice(2**32 - 1, size=2000, replace=False).astype(np.uint64)
        shared = int(rng.integers(0, 500))
        a, b = universe[:500], np.concatenate([universe[:shared], universe[500:1000 - shared]])
        exact = len(set(a.tolist()) & set(b.tolist())) / len(set(a.tolist()) | set(b.tolist()))
        estimate = student.estimate_jaccard(student.minhash_signature(a, hasher.a, hasher.b), student.minhash_signature(b, hasher.a, hasher.b))
        assert abs(estimate - exact) < TOLERANCE, (exact, estimate)
