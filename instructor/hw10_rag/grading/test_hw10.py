"""Grading tests for hw10: size windows, BM25, RRF and the gate's threshold fit against course_lib.rag (and BM25 against
bm25s) on freshly generated corpora, rankings and labelled scores; the chunk-size sweep against the library's own pipeline."""
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from course_lib.rag import BM25, fit_threshold, rrf, size_windows, tokenize

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import bm25s

REFERENCES = ["course_lib.rag.size_windows", "course_lib.rag.BM25", "course_lib.rag.rrf", "course_lib.rag.fit_threshold",
              "course_lib.rag.chunk_text", "course_lib.rag.KnowledgeBase"]
FORBIDDEN = {"bm25s.BM25": "hw10 asks you to write BM25 yourself"}


def _text(rng, words: int) -> str:
    pieces = []
    for _ in range(words):
        w = "".join(rng.choice(list("abcdefghijk"), size=int(rng.integers(1, 12))))
        pieces.append(w + str(rng.choice([" ", " ", " ", "  ", "\n", ". ", ", "])))
    return "".join(pieces)[: int(rng.integers(0, 5 * words + 2))] + ("" if rng.random() < 0.5 else " ")


@pytest.mark.question("q1 size_windows", points=3)
def test_size_windows_random(student, rng):
    for _ in range(60):
        text = _text(rng, int(rng.integers(1, 120)))
        if not text.strip(): continue
        size = int(rng.integers(2, 80)); overlap = int(rng.integers(0, size))
        got = [tuple(w) for w in student.size_windows(text, size, overlap)]
        assert got == size_windows(text, 0, len(text), size, overlap), f"size={size}, overlap={overlap}, text={text[:80]!r}..."
    for size, overlap in ((0, 0), (10, 10), (10, -1)):
        with pytest.raises(ValueError): student.size_windows("some text here", size, overlap)


def _corpus(rng):
    vocab = [f"t{i}" for i in range(int(rng.integers(5, 60)))]
    p = 1 / np.arange(1, len(vocab) + 1); p /= p.sum()
    return vocab, [rng.choice(vocab, size=int(rng.integers(1, 40)), p=p).tolist() for _ in range(int(rng.integers(2, 50)))]


@pytest.mark.question("q2 bm25_scores", points=3)
def test_bm25_against_bm25s_and_the_library(student, rng):
    for _ in range(15):
        vocab, docs = _corpus(rng)
        k1, b = float(rng.uniform(0.5, 2.0)), float(rng.uniform(0, 1))
        ref = bm25s.BM25(k1=k1, b=b); ref.index(docs, show_progress=False)
        ours = BM25(k1=k1, b=b)
        for i, d in enumerate(docs): ours.add(str(i), d)
        for _ in range(4):
            seen = sorted({t for d in docs for t in d})
            query = rng.choice(seen, size=int(rng.integers(1, 5))).tolist()
            got = np.asarray(student.bm25_scores(docs, query, k1, b), float)
            np.testing.assert_allclose(got, ref.get_scores(query), rtol=1e-5, atol=1e-5, err_msg=f"differs from bm25s (k1={k1:.2f}, b={b:.2f})")
            lib = ours.scores(query + ["never-seen"])
            np.testing.assert_allclose(student.bm25_scores(docs, query + ["never-seen"], k1, b),
                                       [lib.get(str(i), 0.0) for i in range(len(docs))], rtol=1e-9, atol=1e-12)


@pytest.mark.question("q3 rrf", points=2)
def test_rrf_random(student, rng):
    tied = [tuple(x) for x in student.rrf([["b", "a"], ["a", "b"]], k=1)]
    assert [d for d, _ in tied] == ["a", "b"] and tied[0][1] == pytest.approx(1 / 2 + 1 / 3), "ranks count from 1; ties go by id"
    for _ in range(40):
        ids = [f"d{i}" for i in range(int(rng.integers(1, 30)))]
        rankings = [rng.permutation(ids)[: int(rng.integers(0, len(ids) + 1))].tolist() for _ in range(int(rng.integers(1, 4)))]
        k = int(rng.choice([1, 10, 60]))
        got, want = [tuple(x) for x in student.rrf(rankings, k)], rrf(rankings, k)
        assert [d for d, _ in got] == [d for d, _ in want], f"order differs for k={k}"
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=1e-12)


@pytest.mark.question("q4 fit_threshold", points=3)
def test_fit_threshold_random(student, rng):
    for _ in range(40):
        n = int(rng.integers(2, 40))
        labels = rng.random(n) < 0.5
        labels[0], labels[1] = True, False
        scores = np.round(rng.normal(0.3, 0.2, n) + 0.3 * labels, int(rng.choice([2, 6])))   # rounding makes ties
        got, want = student.fit_threshold(scores.tolist(), labels.tolist()), fit_threshold(scores, labels)
        for key in ("threshold", "precision", "recall", "f1"):
            assert got[key] == pytest.approx(want[key], abs=1e-9), f"{key}: {got[key]} != {want[key]} for scores {scores.tolist()}"
    with pytest.raises(ValueError): student.fit_threshold([0.1, 0.2], [True, True])


def _sweep_corpus(rng):
    vocab = [f"w{i}" for i in range(300)]
    p = 1 / np.arange(1, 301); p /= p.sum()
    docs, questions = {}, []
    for d in range(8):
        sentences = [" ".join(rng.choice(vocab, size=int(rng.integers(6, 14)), p=p)) + "." for _ in range(10)]
        text = " ".join(sentences)
        docs[f"doc{d}"] = text
        for i in rng.choice(len(sentences), 3, replace=False):
            s = sentences[i]; start = text.index(s)
            questions.append({"query": " ".join(rng.choice(s[:-1].split(), 3, replace=False)), "source": f"doc{d}",
                              "start": start, "end": start + len(s)})
    return docs, questions


def _library_recall(docs, questions, size, k):
    "The same measurement through course_lib.rag: its size windows, its tokenizer and its BM25."
    chunks = [(src, a, b) for src, text in docs.items() for a, b in size_windows(text, 0, len(text), size, size // 4)]
    index = BM25()
    for i, (src, a, b) in enumerate(chunks): index.add(str(i), tokenize(docs[src][a:b]))
    hits = 0
    for q in questions:
        scores = index.scores(tokenize(q["query"]))
        ranked = sorted(scores, key=lambda i: (-scores[i], int(i)))[:k]
        hits += any(chunks[int(i)][0] == q["source"] and chunks[int(i)][1] <= q["start"] and q["end"] <= chunks[int(i)][2] for i in ranked)
    return hits / len(questions), len(chunks)


@pytest.mark.question("q5 chunk_size_sweep", points=3)
def test_chunk_size_sweep_matches_the_library(student, rng):
    docs, questions = _sweep_corpus(rng)
    sizes, k = [40, 100, 250, 600], int(rng.choice([2, 3]))
    result = student.chunk_size_sweep(docs, questions, sizes=sizes, k=k)
    saved = json.loads(Path("chunk_sweep.json").read_text())
    assert saved == json.loads(json.dumps(result)), "chunk_sweep.json must hold what chunk_size_sweep returns"
    assert saved["sizes"] == sizes and saved["k"] == k
    for size, recall, n_chunks in zip(sizes, saved["recall"], saved["chunks"]):
        want, want_chunks = _library_recall(docs, questions, size, k)
        assert n_chunks == want_chunks, f"size {size}: {n_chunks} chunks, the library cuts {want_chunks}"
        assert 0 <= recall <= 1 and abs(recall - want) <= 1 / len(questions) + 1e-9, f"size {size}: recall@{k} {recall:.3f}, the library's {want:.3f}"
    png = Path("chunk_sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000, "chunk_sweep.png must be a PNG plot"
