"""Grading tests for hw00: each compares the student's function with course_lib.core on fresh inputs."""
import string

import pytest

from course_lib import core

REFERENCES = ["course_lib.core.human_bytes", "course_lib.core.split_of", "course_lib.core.limit_records"]


@pytest.mark.question("q1 human_bytes", points=1)
def test_human_bytes_edge_cases(student):
    for n in (0, 1, 999, 1000, 999_999, 1_000_000, 10**12, 10**15, -1500):
        assert student.human_bytes(n) == core.human_bytes(n), f"human_bytes({n})"


@pytest.mark.question("q1 human_bytes", points=2)
def test_human_bytes_random(student, rng):
    for exponent in rng.uniform(0, 15, size=300):
        n = int(10**exponent)
        assert student.human_bytes(n) == core.human_bytes(n), f"human_bytes({n})"


def _random_ids(rng, count):
    alphabet = list(string.ascii_letters + string.digits + "/_.-") + ["é", "文", "🙂"]
    return ["".join(rng.choice(alphabet, size=rng.integers(1, 30))) for _ in range(count)]


@pytest.mark.question("q2 split_of", points=1)
def test_split_of_edge_fractions(student, rng):
    for doc_id in _random_ids(rng, 50):
        assert student.split_of(doc_id, 0.0) == "train"
        assert student.split_of(doc_id, 1.0) == "val"


@pytest.mark.question("q2 split_of", points=2)
def test_split_of_random(student, rng):
    for doc_id, fraction in zip(_random_ids(rng, 500), rng.uniform(0, 1, size=500)):
        assert student.split_of(doc_id, float(fraction)) == core.split_of(doc_id, float(fraction)), (doc_id, fraction)


def _records(sizes):
    return [{"id": f"d{i}", "text": "", "meta": {"bytes": int(b)}} for i, b in enumerate(sizes)]


@pytest.mark.question("q3 limit_records", points=1)
def test_limit_records_edge_cases(student):
    recs = _records([5, 3, 4])
    for max_docs, max_bytes in [(None, None), (0, 0), (1, None), (None, 8), (None, 4), (2, 100), (None, 12)]:
        got = [r["id"] for r in student.limit_records(iter(recs), max_docs, max_bytes)]
        want = [r["id"] for r in core.limit_records(iter(recs), max_docs, max_bytes)]
        assert got == want, f"max_docs={max_docs}, max_bytes={max_bytes}"


@pytest.mark.question("q3 limit_records", points=2)
def test_limit_records_random(student, rng):
    for _ in range(200):
        recs = _records(rng.integers(0, 100, size=rng.integers(0, 30)))
        max_docs = int(rng.integers(0, 40)) if rng.random() < 0.5 else None
        max_bytes = int(rng.integers(0, 2000)) if rng.random() < 0.7 else None
        got = [r["id"] for r in student.limit_records(iter(recs), max_docs, max_bytes)]
        want = [r["id"] for r in core.limit_records(iter(recs), max_docs, max_bytes)]
        assert got == want, f"sizes={[r['meta']['bytes'] for r in recs]}, max_docs={max_docs}, max_bytes={max_bytes}"


@pytest.mark.question("q3 limit_records", points=1)
def test_limit_records_is_lazy(student):
    def endless():
        i = 0
        while True:
            yield {"id": i, "meta": {"bytes": 1}}; i += 1
    assert len(list(student.limit_records(endless(), 10, None))) == 10
