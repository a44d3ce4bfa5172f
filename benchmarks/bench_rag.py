"""Chapter 10 benchmark: retrieval quality and cost on the Python reference questions.

Ours (BM25, dense MiniLM + FAISS flat IP, hybrid RRF) and the peer `bm25s` on the same chunks and questions:
recall@5, MRR, nDCG@5 at document level, index build time, queries/s and index bytes; the gate's precision/recall.
Run: `nice python benchmarks/bench_rag.py [--hash]` (--hash: the hashed embedder instead of MiniLM, seconds not minutes).
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from course_lib.rag import (OFF_TOPIC, HashEmbedder, KnowledgeBase, MiniLMEmbedder, english_questions, evaluate_retrieval,
                            fit_threshold, gate_report, ndcg_at_k, python_reference_docs, recall_at_k,
                            reciprocal_rank, save_kb, tokenize)


def bm25s_peer(kb: KnowledgeBase, questions: list[dict], k: int = 5, depth: int = 50) -> dict:
    "bm25s over the same chunk texts and tokens: quality, build time and queries/s."
    import bm25s
    ids = list(kb.chunks)
    t0 = time.perf_counter()
    corpus = [tokenize(kb.index_text(kb.chunks[i])) for i in ids]
    r = bm25s.BM25(); r.index(corpus, show_progress=False)
    build = time.perf_counter() - t0
    rec, rr, nd, t0 = [], [], [], time.perf_counter()
    for q in questions:
        s = r.get_scores(tokenize(q["question"]))
        order = np.argsort(-s, kind="stable")[:depth]
        ranked = list(dict.fromkeys(kb.chunks[ids[j]].source for j in order if s[j] > 0))
        rec.append(recall_at_k(ranked, q["relevant"], k)); rr.append(reciprocal_rank(ranked, q["relevant"]))
        nd.append(ndcg_at_k(ranked, q["relevant"], k))
    qps = len(questions) / (time.perf_counter() - t0)
    return {"mode": "bm25s (peer)", "recall@5": float(np.mean(rec)), "mrr": float(np.mean(rr)), "ndcg@5": float(np.mean(nd)),
            "build_s": build, "qps": qps}


def main(argv=None):
    ap = argparse.ArgumentParser(); ap.add_argument("--hash", action="store_true"); args = ap.parse_args(argv)
    docs = python_reference_docs(); qs = english_questions(docs)
    t0 = time.perf_counter(); emb = HashEmbedder() if args.hash else MiniLMEmbedder(); load_s = time.perf_counter() - t0
    t0 = time.perf_counter(); kb = KnowledgeBase(emb)
    for s, t in docs.items(): kb.add(s, t)
    build_s = time.perf_counter() - t0
    rows = []
    for mode in ("bm25", "dense", "hybrid"):
        t0 = time.perf_counter(); r = evaluate_retrieval(kb, qs, mode); r["qps"] = len(qs) / (time.perf_counter() - t0); rows.append(r)
    rows.append(bm25s_peer(kb, qs))
    with tempfile.TemporaryDirectory() as d:
        save_kb(kb, Path(d) / "kb"); disk = sum(f.stat().st_size for f in (Path(d) / "kb").iterdir())
    on = [kb.top_similarity(q["question"]) for q in qs]; off = [kb.top_similarity(q) for q in OFF_TOPIC]
    fit = fit_threshold(on[::2] + off[::2], [True] * len(on[::2]) + [False] * len(off[::2]))
    held = gate_report(on[1::2] + off[1::2], [True] * len(on[1::2]) + [False] * len(off[1::2]), fit["threshold"])
    print(f"{len(docs)} documents, {len(kb)} chunks, {len(qs)} questions, embedder {emb.name} (load {load_s:.1f} s), "
          f"build {build_s:.1f} s (chunk + BM25 + embed + FAISS), index on disk {disk / 1e6:.2f} MB, FAISS vectors {kb.index.ntotal * emb.dim * 4 / 1e6:.2f} MB")
    print("| retriever | recall@5 | MRR | nDCG@5 | queries/s |\n|---|---|---|---|---|")
    for r in rows: print(f"| {r['mode']} | {r['recall@5']:.3f} | {r['mrr']:.3f} | {r['ndcg@5']:.3f} | {r['qps']:.1f} |")
    ours_bm25 = rows[0]
    print(f"BM25 ours vs bm25s: recall ratio {ours_bm25['recall@5'] / rows[3]['recall@5']:.3f}, queries/s ratio {ours_bm25['qps'] / rows[3]['qps']:.2f}")
    print(f"gate: threshold {fit['threshold']:.3f}; held-out precision {held['precision']:.3f}, recall {held['recall']:.3f} "
          f"({held['n']} questions)")
    print(json.dumps({"embedder": emb.name, "chunks": len(kb), "build_s": build_s, "disk_bytes": disk, "retrieval": rows,
                      "gate_fit": fit, "gate_heldout": held}))


if __name__ == "__main__":
    sys.exit(main())
