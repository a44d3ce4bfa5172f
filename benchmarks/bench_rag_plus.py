"""Chapter 10b benchmark: the reranker before vs after, Qdrant vs FAISS, and LlamaIndex's vector retriever, on the same chunks.

English: the Python reference questions (79 topics); Chinese: the news slice questions (60 articles). Chunk vectors are embedded
once (all-MiniLM-L6-v2) and handed to every store, so the stores are compared on search alone.
- reranking: hybrid vs hybrid + MaxSim, and with `--model FOLDER` hybrid + the LLM reranker (UPR query likelihood with the
  course model in that folder, e.g. runs/NAME/pretrain/model or finetune/merged), over the top `pool` (recall@5, MRR, nDCG@5
  at document level);
- vector stores: FAISS flat IP (ours) vs Qdrant local (':memory:') vs LlamaIndex `VectorStoreIndex` with our embedder:
  dense recall@5/MRR, agreement of the top 5 with FAISS, queries/s, load time.
Question vectors are cached after their first use, so queries/s is search (and fusion, and MaxSim's passage encoding), not
embedding the question; the machine was shared while measuring, so timings are noisy.
- knowledge graph, used two ways: BM25 with the query expanded through the keyword co-occurrence graph, and the graph as its
  own ranked list (graph-neighbour retrieval) fused by RRF with BM25 (`--graph-only`: just these, no MiniLM) and with BM25 +
  dense (beside hybrid).
A seeded random order of the pool is the floor every reranker row is read against.
Run: `nice python benchmarks/bench_rag_plus.py [--n-en 79] [--n-zh 60] [--pool 20] [--model FOLDER] [--lang en|zh|both] [--no-maxsim] [--upr-check] [--graph-only]`.
"""
import argparse
import json
import sys
import time

import numpy as np

from course_lib.rag import (KnowledgeBase, MiniLMEmbedder, chinese_news_docs, chinese_questions, english_questions,
                            evaluate_retrieval, python_reference_docs)
from course_lib.rag_plus import (LLMReranker, MaxSimReranker, QdrantIndex, evaluate_reranked, expand_query, keyword_graph,
                                 search_with_graph)


class CachedQueries:
    "The embedder with its single-text encodings (the questions) cached: every retriever then times search, not embedding."
    def __init__(self, emb):
        self.emb, self.name, self.dim, self.model, self.cache = emb, emb.name, emb.dim, emb.model, {}
    def encode(self, texts):
        if len(texts) != 1: return self.emb.encode(texts)
        if texts[0] not in self.cache: self.cache[texts[0]] = self.emb.encode(texts)
        return self.cache[texts[0]]


class RandomReranker:
    "The floor a reranker must beat: a seeded random order of the pool."
    name = "random order"
    def __init__(self, seed: int = 0): self.rng = np.random.default_rng(seed)
    def scores(self, query, texts): return self.rng.random(len(texts))


def build(docs: dict, emb, index=None, vectors: dict | None = None) -> tuple[KnowledgeBase, float]:
    "A knowledge base over docs (vectors per source given: no embedding); seconds taken."
    t0 = time.perf_counter(); kb = KnowledgeBase(emb, index=index)
    for s, t in docs.items(): kb.add(s, t, None if vectors is None else vectors[s])
    return kb, time.perf_counter() - t0


def llama_index_dense(kb: KnowledgeBase, emb, questions: list[dict], depth: int = 50) -> dict:
    "LlamaIndex's VectorStoreIndex (SimpleVectorStore) over the same chunks and vectors, our embedder for the queries."
    from llama_index.core import VectorStoreIndex
    from llama_index.core.embeddings import BaseEmbedding
    from llama_index.core.schema import TextNode

    class Ours(BaseEmbedding):
        def _get_query_embedding(self, query): return emb.encode([query])[0].tolist()
        def _get_text_embedding(self, text): return emb.encode([text])[0].tolist()
        async def _aget_query_embedding(self, query): return self._get_query_embedding(query)

    t0 = time.perf_counter()
    nodes = [TextNode(id_=cid, text=kb.index_text(c), embedding=kb.index.reconstruct(kb._vid[cid]).tolist())
             for cid, c in kb.chunks.items()]
    index = VectorStoreIndex(nodes, embed_model=Ours(model_name=emb.name))
    retriever = index.as_retriever(similarity_top_k=depth)
    load = time.perf_counter() - t0
    search = lambda q, n: [type("H", (), {"chunk": kb.chunks[r.node.node_id], "score": r.score})() for r in retriever.retrieve(q)[:n]]
    t0 = time.perf_counter(); r = evaluate_retrieval(kb, questions, "dense", depth=depth, search=search)
    return r | {"mode": "dense, LlamaIndex VectorStoreIndex", "qps": len(questions) / (time.perf_counter() - t0), "load_s": load,
                "search": search}


def top5_agreement(a, b, questions) -> tuple[float, float]:
    """(mean overlap of the top-5 chunk ids, share of questions whose top-5 scores agree to 1e-5) of two searches; the ids can
    differ where chunks tie exactly (the Python reference repeats text across topics: 244 of 791 chunks share their text)."""
    ids, scores = [], []
    for q in questions:
        x, y = a(q["question"], 5), b(q["question"], 5)
        ids.append(len({h.chunk.id for h in x} & {h.chunk.id for h in y}) / 5)
        scores.append(np.allclose([h.score for h in x], [h.score for h in y], atol=1e-5))
    return float(np.mean(ids)), float(np.mean(scores))


def graph_rows(kb: KnowledgeBase, questions: list[dict], per_chunk: int = 6) -> list[dict]:
    "BM25 alone, then with each query term's 1 or 2 strongest graph neighbours added, then BM25 fused with the graph's own list."
    g = keyword_graph(kb, per_chunk)
    rows = [evaluate_retrieval(kb, questions, "bm25")]
    for n in (1, 2):
        search = lambda q, k: kb.search(expand_query(g, q, n), k, "bm25")
        rows.append(evaluate_retrieval(kb, questions, "bm25", search=search) | {"mode": f"bm25, query + {n} graph neighbour(s)/term"})
    search = lambda q, k: search_with_graph(kb, g, q, k, modes=("bm25",))
    rows.append(evaluate_retrieval(kb, questions, "bm25", search=search) | {"mode": "RRF(bm25, graph list)"})
    return rows


def passage_dependence(llm, docs: dict, questions: list[dict], n: int = 20) -> dict:
    """Does the LLM reranker read the passage? Mean UPR score of each question after its relevant document, after another
    (7 documents on), after an empty passage; how often the relevant one beats the other; the mean gap between them."""
    names, rows = list(docs), []
    for q in questions[:n]:
        rel = sorted(q["relevant"])[0]; other = names[(names.index(rel) + 7) % len(names)]
        rows.append(llm.scores(q["question"], [docs[rel], docs[other], ""]))
    rows = np.array(rows)   # (n, 3)
    return {"relevant": rows[:, 0].mean(), "other": rows[:, 1].mean(), "empty": rows[:, 2].mean(),
            "relevant_wins": (rows[:, 0] > rows[:, 1]).mean(), "mean_gap": np.abs(rows[:, 0] - rows[:, 1]).mean(), "n": len(rows)}


def timed(kb, questions, mode, **kw) -> dict:
    t0 = time.perf_counter(); r = evaluate_retrieval(kb, questions, mode, **kw)
    return r | {"qps": len(questions) / (time.perf_counter() - t0)}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-en", type=int, default=79); ap.add_argument("--n-zh", type=int, default=60)
    ap.add_argument("--pool", type=int, default=20); ap.add_argument("--graph-only", action="store_true")
    ap.add_argument("--model", help="a course model folder (Hugging Face layout) for the LLM reranker")
    ap.add_argument("--lang", choices=["en", "zh", "both"], default="both")
    ap.add_argument("--no-maxsim", action="store_true", help="leave out the MaxSim row (the slowest)")
    ap.add_argument("--upr-check", action="store_true", help="with --model: only whether the LLM reranker reads the passage (no MiniLM)")
    args = ap.parse_args(argv)
    sets = [("en", dict(list(python_reference_docs().items())[:args.n_en]), english_questions),
            ("zh", chinese_news_docs(args.n_zh), chinese_questions)]
    sets = [x for x in sets if args.lang in (x[0], "both")]
    out = {}
    if args.upr_check:
        from course_lib.eval import CourseLM
        llm = LLMReranker(CourseLM.from_dir(args.model))
        print("| set | mean log p/token after: relevant doc | another doc | empty passage | relevant > other | mean gap |\n|---|---|---|---|---|---|")
        for lang, docs, make_qs in sets:
            out[lang] = r = passage_dependence(llm, docs, make_qs(docs))
            print(f"| {lang} ({r['n']} questions) | {r['relevant']:.3f} | {r['other']:.3f} | {r['empty']:.3f} | {r['relevant_wins']:.2f} | {r['mean_gap']:.3f} |")
        print(json.dumps(out, default=float)); return
    for lang, docs, make_qs in sets:
        kb, qs = build(docs, None)[0], make_qs(docs)
        out[f"graph_{lang}"] = rows = graph_rows(kb, qs)
        print(f"\n## {lang}: keyword graph, {len(docs)} documents, {len(kb)} chunks, {len(qs)} questions")
        print("| retriever | recall@5 | MRR | nDCG@5 |\n|---|---|---|---|")
        for r in rows: print(f"| {r['mode']} | {r['recall@5']:.3f} | {r['mrr']:.3f} | {r['ndcg@5']:.3f} |")
    if args.graph_only:
        print(json.dumps(out, default=float)); return
    emb = CachedQueries(MiniLMEmbedder()); maxsim = MaxSimReranker(emb)
    llm = None
    if args.model:
        from course_lib.eval import CourseLM
        llm = LLMReranker(CourseLM.from_dir(args.model), name="UPR, course model")
    for lang, docs, make_qs in sets:
        qs = make_qs(docs)
        for q in qs: emb.encode([q["question"]])   # question vectors first, so no row's queries/s includes embedding them
        kb, build_s = build(docs, emb)
        vectors = {s: np.stack([kb.index.reconstruct(kb._vid[c]) for c in kb.by_source[s]]) for s in docs}
        rows = [timed(kb, qs, m) for m in ("bm25", "dense", "hybrid")]
        if not args.no_maxsim:
            t0 = time.perf_counter(); rr = evaluate_reranked(kb, qs, maxsim, pool=args.pool)
            rows.append(rr | {"qps": len(qs) / (time.perf_counter() - t0)})
        rows.append(evaluate_reranked(kb, qs, RandomReranker(), pool=args.pool) | {"qps": float("nan")})
        if llm is not None:
            t0 = time.perf_counter(); rr = evaluate_reranked(kb, qs, llm, pool=args.pool)
            rows.append(rr | {"qps": len(qs) / (time.perf_counter() - t0)})
        g = keyword_graph(kb)
        t0 = time.perf_counter()
        rr = evaluate_retrieval(kb, qs, "hybrid", search=lambda q, n: search_with_graph(kb, g, q, n))
        rows.append(rr | {"mode": "RRF(bm25, dense, graph list)", "qps": len(qs) / (time.perf_counter() - t0)})
        qkb, q_load = build(docs, emb, QdrantIndex(emb.dim), vectors)
        _, f_load = build(docs, emb, None, vectors)
        qrow = timed(qkb, qs, "dense") | {"mode": "dense, Qdrant local (:memory:)", "load_s": q_load}
        frow = rows[1] | {"mode": "dense, FAISS flat IP (ours)", "load_s": f_load}
        qrow["top5_vs_faiss"], qrow["scores_vs_faiss"] = top5_agreement(kb.search_dense, qkb.search_dense, qs)
        stores = [frow, qrow]
        try:
            lrow = llama_index_dense(kb, emb, qs)
            lrow["top5_vs_faiss"], lrow["scores_vs_faiss"] = top5_agreement(kb.search_dense, lrow.pop("search"), qs)
            stores.append(lrow)
        except ImportError as e:
            print(f"LlamaIndex left out: {e}")
        print(f"\n## {lang}: {len(docs)} documents, {len(kb)} chunks, {len(qs)} questions; embedded in {build_s:.1f} s")
        print("| retriever | recall@5 | MRR | nDCG@5 | queries/s |\n|---|---|---|---|---|")
        for r in rows: print(f"| {r['mode']} | {r['recall@5']:.3f} | {r['mrr']:.3f} | {r['ndcg@5']:.3f} | {r['qps']:.1f} |")
        print("\n| vector store | recall@5 | MRR | top-5 ids = FAISS | top-5 scores = FAISS | load s (vectors given) | queries/s |\n|---|---|---|---|---|---|---|")
        for r in stores:
            print(f"| {r['mode']} | {r['recall@5']:.3f} | {r['mrr']:.3f} | {r.get('top5_vs_faiss', 1.0):.3f} | {r.get('scores_vs_faiss', 1.0):.3f} | {r['load_s']:.2f} | {r['qps']:.1f} |")
        out[lang] = {"chunks": len(kb), "questions": len(qs), "retrieval": rows, "stores": stores}
    print(json.dumps(out, default=float))


if __name__ == "__main__":
    sys.exit(main())
