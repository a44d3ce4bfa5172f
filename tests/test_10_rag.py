"""Chapter 10: chunk offsets slice the source back, BM25 against bm25s, FAISS against a float64 brute force, RRF and
the metrics against hand-computed values, the gate on a planted separable set, incremental updates equal a rebuild,
persistence round trip (and a crash mid-save), answers with citations and refusals."""
import math
import random

import numpy as np
import pytest

from course_lib.core import RunContext, load_settings
from course_lib.rag import (BM25, REFUSAL, Gate, HashEmbedder, KnowledgeBase, answer, chinese_news_docs,
                            chinese_questions, chunk_text, cited_ids, evaluate_retrieval, fit_threshold, gate_report,
                            load_kb, ndcg_at_k, oracle_generate, python_reference_docs, rag_stage, recall_at_k,
                            reciprocal_rank, rrf, save_kb, size_windows, tokenize)

DOCS = python_reference_docs()


@pytest.mark.parametrize("max_chars,overlap", [(300, 0), (300, 60), (800, 100)])
def test_chunk_offsets_slice_the_source_back(max_chars, overlap):
    for source, text in DOCS.items():
        chunks = chunk_text(text, source, max_chars, overlap)
        assert chunks and all(text[c.start:c.end] == c.text and c.id == f"{source}#{c.start}-{c.end}" for c in chunks)
        covered = np.zeros(len(text), bool)
        for c in chunks: covered[c.start:c.end] = True
        assert all(covered[i] or text[i].isspace() for i in range(len(text)))   # only whitespace between blocks is left out
        assert all(len(c.text) <= max_chars for c in chunks if not c.text.lstrip().startswith(("```", "~~~")))


def test_chunking_keeps_structure():
    doc = "# A\n\nIntro text.\n\n```py\nx = 1\n\n\ny = 2\n```\n\n## B\n\nOne.\n\n    indented code\n    more\n\nTwo."
    chunks = chunk_text(doc, "d", max_chars=60, overlap=0)
    assert "```py\nx = 1\n\n\ny = 2\n```" in chunks[0].text and chunks[0].kind == "code" and chunks[0].heading == "A"
    assert chunks[1].text.startswith("## B") and chunks[1].heading == "B"
    long = "w" * 10 + " " + "word " * 100
    wins = size_windows(long, 0, len(long), 100, 30)
    assert wins[0][0] == 0 and wins[-1][1] == len(long) and all(b - a <= 100 for a, b in wins)
    assert all(n[0] < p[1] for p, n in zip(wins, wins[1:]))   # consecutive windows overlap
    with pytest.raises(ValueError, match="overlap"): size_windows(long, 0, len(long), 100, 100)


def test_bm25_matches_bm25s_on_a_generated_corpus():
    import bm25s  # required: the [rag] extra
    rng = random.Random(0)
    vocab = [f"t{i}" for i in range(40)]
    docs = [[rng.choice(vocab[:rng.randint(5, 40)]) for _ in range(rng.randint(1, 30))] for _ in range(60)]
    ref = bm25s.BM25(); ref.index(docs, show_progress=False)
    ours = BM25()
    for i, d in enumerate(docs): ours.add(str(i), d)
    for q in (["t1"], ["t3", "t3", "t30"], ["t0", "t7", "t39", "t12"]):
        got = ours.scores(q)
        assert np.allclose([got.get(str(i), 0.0) for i in range(len(docs))], ref.get_scores(q), atol=1e-5)


def test_tokenize_segments_chinese():
    toks = tokenize("Python的列表推导式 snake_case")
    assert toks[0] == "python" and "snake_case" in toks and "列表" in toks


def test_dense_search_equals_a_float64_brute_force():
    emb = HashEmbedder(64)
    kb = KnowledgeBase(emb, max_chars=400)
    for s in list(DOCS)[:10]: kb.add(s, DOCS[s])
    ids = list(kb.chunks)
    m = np.array([emb.encode([kb.index_text(kb.chunks[i])])[0] for i in ids], np.float64)
    for q in ("the break statement in loops", "exceptions raised"):
        sims = m @ emb.encode([q])[0].astype(np.float64)
        order = np.argsort(-sims, kind="stable")[:5]
        hits = kb.search_dense(q, 5)
        assert np.allclose([h.score for h in hits], sims[order], atol=1e-5)
        assert {h.chunk.id for h in hits} == {ids[j] for j in order} or np.isclose(sims[order[-1]], hits[-1].score)


def test_rrf_and_metrics_against_hand_computed_values():
    fused = dict(rrf([["a", "b", "c"], ["c", "a"]], k=60))
    assert math.isclose(fused["a"], 1 / 61 + 1 / 62) and math.isclose(fused["c"], 1 / 63 + 1 / 61) and math.isclose(fused["b"], 1 / 62)
    assert [d for d, _ in rrf([["a", "b", "c"], ["c", "a"]])] == ["a", "c", "b"]
    ranked = ["x", "a", "y", "b"]
    assert recall_at_k(ranked, {"a", "b", "z"}, 2) == 1 / 3 and recall_at_k(ranked, {"a", "b"}, 4) == 1.0
    assert reciprocal_rank(ranked, {"b"}) == 1 / 4 and reciprocal_rank(ranked, {"q"}) == 0.0
    # DCG = 1/log2(3) + 1/log2(5); ideal = 1 + 1/log2(3)
    assert math.isclose(ndcg_at_k(ranked, {"a", "b"}, 4), (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3)))
    with pytest.raises(ValueError): recall_at_k(ranked, set(), 3)


def test_gate_threshold_on_a_planted_separable_set():
    rng = np.random.default_rng(0)
    on, off = rng.uniform(0.6, 0.9, 30), rng.uniform(0.1, 0.45, 40)
    fit = fit_threshold(np.r_[on, off], [True] * 30 + [False] * 40)
    assert off.max() < fit["threshold"] <= on.min() and fit["precision"] == fit["recall"] == 1.0
    rep = gate_report([0.9, 0.5, 0.2], [True, False, True], 0.4)   # accepts 0.9 (tp) and 0.5 (fp), misses 0.2
    assert rep["precision"] == 0.5 and rep["recall"] == 0.5
    with pytest.raises(ValueError, match="both"): fit_threshold([0.1, 0.2], [True, True])


def _final_state(kb):
    names = ["assert", "break", "continue", "del", "pass", "return"]
    for s in names[:5]: kb.add(s, DOCS[s])
    kb.replace("del", DOCS["del"] + "\n\nA new paragraph about deleting names from a namespace.")
    kb.delete("pass")
    kb.add("return", DOCS["return"])
    return kb


def test_incremental_updates_equal_a_rebuild():
    emb = HashEmbedder(128)
    live = _final_state(KnowledgeBase(emb, max_chars=300))
    fresh = KnowledgeBase(emb, max_chars=300)
    for s in ["assert", "break", "continue", "return"]: fresh.add(s, DOCS[s])
    fresh.add("del", live.docs["del"])
    assert set(live.chunks) == set(fresh.chunks) and live.bm25.df == fresh.bm25.df and live.index.ntotal == len(live)
    for q in ("deleting names from a namespace", "leave the loop", "assertion error", "the pass statement"):
        for mode in ("bm25", "dense", "hybrid"):
            a, b = live.search(q, 6, mode), fresh.search(q, 6, mode)
            assert [(h.chunk.id, round(h.score, 6)) for h in a] == [(h.chunk.id, round(h.score, 6)) for h in b]
    assert not any(c.source == "pass" for c in live.chunks.values())


def test_bad_input_is_refused_and_nothing_is_lost():
    kb = KnowledgeBase(HashEmbedder(32))
    kb.add("a", DOCS["assert"])
    with pytest.raises(ValueError, match="empty"): kb.add("b", "   ")
    with pytest.raises(KeyError, match="exists"): kb.add("a", "other text")
    with pytest.raises(ValueError, match="empty"): kb.replace("a", "")
    assert kb.docs["a"] == DOCS["assert"]
    kb.delete("a")
    with pytest.raises(KeyError, match="not in the knowledge base"): kb.delete("a")
    assert kb.search_bm25("anything") == [] and kb.search_dense("anything") == []
    with pytest.raises(ValueError, match="no embedder"): KnowledgeBase(None).search_dense("x")


def test_persistence_round_trip_and_a_crash_mid_save(tmp_path, monkeypatch):
    emb = HashEmbedder(64)
    kb = _final_state(KnowledgeBase(emb, max_chars=300))
    save_kb(kb, tmp_path / "kb")
    back = load_kb(tmp_path / "kb", emb)
    assert back.docs == kb.docs and list(back.chunks) == list(kb.chunks)
    q = "what does the return statement do"
    assert [(h.chunk.id, h.score) for h in back.search(q, 5)] == [(h.chunk.id, h.score) for h in kb.search(q, 5)]
    with pytest.raises(ValueError, match="built with embedder"): load_kb(tmp_path / "kb", HashEmbedder(32))
    kb.add("pass", DOCS["pass"])
    monkeypatch.setattr(np, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError): save_kb(kb, tmp_path / "kb")
    assert "pass" not in load_kb(tmp_path / "kb", emb).docs   # the last good save is intact


def test_answer_cites_passages_and_refuses_off_topic():
    emb = HashEmbedder(256)
    kb = KnowledgeBase(emb)
    for s in ["assert", "break", "del", "global", "while"]: kb.add(s, DOCS[s])
    a = answer(kb, "What does the global statement declare?", oracle_generate, Gate(-1.0))
    assert not a.refused and a.citations and kb.chunks[a.citations[0]].source == "global" and "[" in a.text
    calls = []
    r = answer(kb, "anything", lambda p: calls.append(p) or "x", Gate(2.0))   # a cosine never reaches 2
    assert r.refused and r.text == REFUSAL and not calls
    assert cited_ids("see [2] and [9] and [2]", a.hits) == [a.hits[1].chunk.id]


def test_chinese_retrieval_through_jieba():
    import jieba  # noqa: F401  (required: the [data] and [rag] extras)
    docs = chinese_news_docs(15)
    kb = KnowledgeBase(None)
    for s, t in docs.items(): kb.add(s, t)
    assert evaluate_retrieval(kb, chinese_questions(docs), "bm25")["recall@5"] >= 0.8


def test_rag_stage_at_the_ci_tier(tmp_path):
    ctx = RunContext(tmp_path, load_settings("ci"))
    report = rag_stage(ctx)
    assert "| hybrid |" in report and (tmp_path / "rag" / "kb" / "meta.json").exists()
    assert {r["mode"] for r in ctx.summary["rag"]["retrieval"]} == {"bm25", "dense", "hybrid"}
