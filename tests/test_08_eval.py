"""Chapter 8, part 1: back ends, tasks, scoring and perplexity against independent references --
lm-evaluation-harness's per-item log-likelihoods, chapter 7's server, float64 cross-entropy and hand-worked cases."""
import glob
import json
import math
import time

import pytest
import torch
import torch.nn.functional as F

from course_lib.eval import (CourseLM, EndpointError, HFLM, OpenAILM, Task, TaskFileError, circular_scores, cloze_task,
                             evaluate, exact_match, f1_score, load_task, perplexity, rotations, write_task)
from course_lib.model import Decoder, export_hf, get_config
from course_lib.tokenizer import DEFAULT_SPECIALS, EOT, Tokenizer, save_hf, train_bpe


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    "A random 2-layer course model with a 320-token BPE, exported in Hugging Face layout."
    folder = tmp_path_factory.mktemp("tiny")
    vocab, merges = train_bpe([open(json.__file__).read()], 320, special_tokens=DEFAULT_SPECIALS, processes=1)
    tok = Tokenizer(vocab, merges, list(DEFAULT_SPECIALS))
    torch.manual_seed(0)
    model = Decoder(get_config("cpu-1m", vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                               d_ff=64, max_seq_len=256, init_std=0.2)).eval()
    save_hf(tok, folder / "tok")
    export_hf(model, folder / "model", tokenizer=folder / "tok", eos_id=tok.special_tokens[EOT])
    task = cloze_task(8, seed=3)
    write_task(task, folder / "cloze.jsonl")
    return {"folder": folder, "model": model, "tok": tok, "task": task}


@pytest.mark.slow
def test_loglikelihoods_equal_lm_eval(tiny, tmp_path, monkeypatch):
    """lm-eval's hf back end, offline, on the exported model and task YAMLs over our JSONL: every choice within 1e-4, on the
    English cloze and on the Chinese one (no delimiter before the choice: lm-eval's target_delimiter "")."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1"); monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import lm_eval  # required: the [dev] extra
    from lm_eval.tasks import TaskManager
    write_task(cloze_task(8, lang="zh", seed=4), tmp_path / "cloze_zh.jsonl")
    files = {"camp_cloze": (tiny["folder"] / "cloze.jsonl", " "), "camp_cloze_zh": (tmp_path / "cloze_zh.jsonl", "")}
    for name, (path, delimiter) in files.items():
        (tmp_path / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {path}\ntest_split: test\noutput_type: multiple_choice\ntarget_delimiter: {json.dumps(delimiter)}\n"
            'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n')
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tiny['folder'] / 'model'},dtype=float32", tasks=list(files),
                                  device="cpu", log_samples=True, task_manager=TaskManager(include_path=str(tmp_path)))
    for lm in (CourseLM.from_dir(tiny["folder"] / "model"), HFLM(tiny["folder"] / "model")):
        for name, (path, delimiter) in files.items():
            ours = evaluate(lm, load_task(path, delimiter=delimiter))
            for s in out["samples"][name]:
                theirs = [float(r[0][0]) for r in s["resps"]]
                assert ours["records"][s["doc_id"]]["loglikelihoods"] == pytest.approx(theirs, abs=1e-4)
            assert ours["metrics"]["acc"] == pytest.approx(out["results"][name]["acc,none"])


def test_loglikelihood_is_float64_cross_entropy(tiny):
    "Batched, right-padded scoring equals an unbatched float64 sum of token log-probs."
    lm = CourseLM(tiny["model"], tiny["tok"], batch_size=3)
    reqs = [("def f(x):", " return x"), ("import json", "\nprint(json.dumps(1))"), ("a = ", "1"), ("class A:", " pass")]
    got = lm.loglikelihood(reqs)
    for (ctx, cont), (lp, _) in zip(reqs, got):
        c, x = lm.encode_pair(ctx, cont)
        ids = torch.tensor([c + x])
        logp = F.log_softmax(tiny["model"](ids[:, :-1]).double(), -1)[0, -len(x):]
        assert lp == pytest.approx(logp.gather(1, torch.tensor(x)[:, None]).sum().item(), abs=1e-4)


def test_perplexity_and_bits_per_byte(tiny):
    "One short text in one window: ppl = exp(mean NLL) and bits/byte = total NLL / ln 2 / bytes, computed by hand."
    lm = CourseLM(tiny["model"], tiny["tok"])
    text = "for key, value in sorted(items):\n    print(key, value)\n"
    ids = torch.tensor([[lm.prefix_id] + lm.encode(text)])
    nll = F.cross_entropy(tiny["model"](ids[:, :-1])[0].double(), ids[0, 1:], reduction="sum").item()
    got = perplexity(lm, [text])
    assert got["ppl"] == pytest.approx(math.exp(nll / (ids.shape[1] - 1)), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(text.encode()), rel=1e-5)
    # a text longer than the window is scored in windows and still counts every token once
    long = text * 30
    lm.max_length = 64
    assert perplexity(lm, [long])["tokens"] == len(lm.encode(long))


def test_task_file_errors_name_the_line(tmp_path):
    good = {"question": "2+2?", "choices": ["3", "4"], "answer": 1}
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(good) + "\n" + "{not json\n")
    with pytest.raises(TaskFileError, match=r"t.jsonl:2"): load_task(path)
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(good | {"answer": 5}) + "\n")
    with pytest.raises(TaskFileError, match=r"t.jsonl:3: 'answer' 5 is not an index"): load_task(path)
    path.write_text(json.dumps(good) + "\n" + json.dumps({"question": "q", "answer": "x"}) + "\n")
    with pytest.raises(TaskFileError, match=r":2: a gen item in a file of mcq items"): load_task(path)
    path.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(TaskFileError, match=r":1: no 'answer' field"): load_task(path)


def test_loader_accepts_mmlu_ceval_gsm8k_shapes(tmp_path):
    (tmp_path / "ceval.jsonl").write_text(json.dumps({"question": "1+1=", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "B"}) + "\n")
    (tmp_path / "mmlu.jsonl").write_text(json.dumps({"question": "x", "choices": ["a", "b", "c"], "answer": 2}) + "\n")
    (tmp_path / "gsm8k.jsonl").write_text(json.dumps({"question": "Tom has 3...", "answer": "He has 3+4=7\n#### 1,007"}) + "\n")
    assert load_task(tmp_path / "ceval.jsonl").items[0] == {"question": "1+1=", "choices": ["1", "2", "3", "4"], "answer": 1}
    assert load_task(tmp_path / "mmlu.jsonl").kind == "mcq"
    g = load_task(tmp_path / "gsm8k.jsonl", extract="number")
    assert (g.kind, g.items[0]["answer"], g.extract) == ("gen", "1007", "number")


def test_metrics_hand_worked():
    assert exact_match("The Cat.", "cat") == 1.0 and exact_match("cats", "cat") == 0.0
    assert f1_score("the cat sat", "cat sat down") == pytest.approx(0.8)   # 2 common; P = 2/2, R = 2/3
    assert f1_score("", "x") == 0.0 and f1_score("dog", "cat") == 0.0


def test_circular_bookkeeping_hand_made():
    item = {"question": "q", "choices": ["w", "x", "y", "z"], "answer": 2}
    rots = rotations(item)
    assert [r["choices"][r["answer"]] for r in rots] == ["y"] * 4            # the gold text moves with its index
    assert [r["choices"] for r in rots][1] == ["x", "y", "z", "w"]
    # item 0 right in every rotation, item 1 right only in the original order, item 2 wrong in the original only
    correct = [True, True, True, True, True, False, False, False, False, True, True, True]
    group = [0] * 4 + [1] * 4 + [2] * 4
    got = circular_scores(correct, group)
    assert got == {"acc": 2 / 3, "acc_all_rotations": 8 / 12, "circular_acc": 1 / 3}


class _Fixed:
    "A guesser: always picks the first listed option, whatever the question."
    name = "first-option"
    def loglikelihood(self, requests): return [(0.0 if c == " A" else -1.0, False) for _, c in requests]


def test_circular_separates_a_guesser():
    task = Task("t", "mcq", [{"question": f"q{i}", "choices": ["a", "b", "c", "d"], "answer": i % 4} for i in range(8)], style="letters")
    got = evaluate(_Fixed(), task, circular=True)["metrics"]
    assert got["acc"] == 0.25 and got["circular_acc"] == 0.0


@pytest.fixture(scope="module")
def server(tiny):
    from course_lib.engine import LLMEngine
    from course_lib.serve import create_app, serve_in_thread
    engine = LLMEngine(tiny["model"], num_blocks=256, block_size=8, max_num_seqs=16, max_num_batched_tokens=512)
    url, stop = serve_in_thread(create_app(engine, tiny["tok"], "tiny", eos_ids=[tiny["tok"].special_tokens[EOT]]))
    yield url
    stop()


def test_remote_scores_equal_local(tiny, server):
    "A generation task through chapter 7's server (4 requests in flight) scores item for item as the model in-process."
    items = [{"question": q, "answer": "x"} for q in ["def add(a, b):", "import os", "class Point:", "for i in range(3):",
                                                       "with open(path) as f:", "try:"]]
    task = Task("gen", "gen", items, extract="raw", max_tokens=12)
    local = evaluate(CourseLM(tiny["model"], tiny["tok"], batch_size=4), task)
    remote = evaluate(OpenAILM(server, "tiny", concurrency=4), task)
    assert [r["output"] for r in remote["records"]] == [r["output"] for r in local["records"]]
    assert any(r["output"] for r in local["records"]) and remote["metrics"] == local["metrics"]


def test_remote_loglikelihoods_equal_local_on_chapter7_server(tiny, server):
    """MCQ through chapter 7's real server (echo + logprobs, 4 requests in flight): every choice's log-likelihood within
    1e-4 of the in-process model's, same picks and accuracy; English cloze, circular letters, and Chinese cloze from the
    zh corpus (multi-byte characters split across byte tokens, so the text offsets matter)."""
    letters = Task("letters", "mcq", tiny["task"].items[:4], style="letters")
    for task, circular in [(tiny["task"], False), (letters, True), (cloze_task(6, lang="zh", seed=5), False)]:
        local = evaluate(CourseLM(tiny["model"], tiny["tok"], batch_size=4), task, circular=circular)
        remote = evaluate(OpenAILM(server, "tiny", concurrency=4), task, circular=circular)
        for a, b in zip(remote["records"], local["records"], strict=True):
            assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-4) and a["pred"] == b["pred"]
        assert remote["metrics"] == local["metrics"]


def test_remote_loglikelihood_needs_prompt_logprobs(tiny):
    "A server that answers echo requests without logprobs: a clear error, not a wrong score."
    from fastapi import FastAPI
    from course_lib.serve import serve_in_thread
    app = FastAPI()

    @app.post("/v1/completions")
    def completions(body: dict):
        return {"choices": [{"index": 0, "text": body["prompt"] + "x", "logprobs": None, "finish_reason": "length"}]}

    url, stop = serve_in_thread(app)
    try:
        with pytest.raises(EndpointError, match="no prompt logprobs"): OpenAILM(url, "tiny").loglikelihood([("a", " b")])
    finally: stop()


def test_chinese_cloze_from_the_zh_corpus():
    """cloze_zh on the real zh slice (People's Daily 1998, hotel and book reviews): each item is a corpus sentence cut before
    its last two characters; the answer and the distractors are endings that close three or more sentences (words, not halves)."""
    import re
    from course_lib.core import embedded_corpus
    text = "\n".join(r["text"] for r in embedded_corpus("zh", max_bytes=2_000_000))
    task = cloze_task(30, lang="zh", seed=2)
    assert task.name == "cloze_zh" and len(task.items) == 30
    for item in task.items:
        assert item["question"] + item["choices"][item["answer"]] + "。" in text
        assert len(set(item["choices"])) == 4 and all(re.fullmatch(r"[\u4e00-\u9fff]{2}", c) for c in item["choices"])
        assert all(text.count(c + "。") >= 3 for c in item["choices"]), item


def test_unreachable_endpoint_retries_then_fails():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    lm = OpenAILM(f"http://127.0.0.1:{port}", "m", retries=2, backoff_s=0.05, timeout_s=2)
    start = time.time()
    with pytest.raises(EndpointError, match=rf"127.0.0.1:{port}/v1/completions failed after 3 attempt"):
        lm.generate(["hi"])
    assert time.time() - start < 10


def test_generation_is_bounded(tiny):
    "A model that never emits a stop token still ends at max_tokens."
    lm = CourseLM(tiny["model"], tiny["tok"])
    short, longer = lm.generate(["x = "], max_tokens=5)[0], lm.generate(["x = "], max_tokens=20)[0]
    assert longer.startswith(short) and len(longer) > len(short)


def test_camp_eval_and_eval_stage(tiny, tmp_path):
    "`camp eval CONFIG` over the course model and a student JSONL task, and the `eval` stage of `camp run` on a run folder."
    from course_lib.camp import main
    from course_lib.core import RunContext, load_settings
    from course_lib.evalsuite import eval_stage
    (tmp_path / "mine.jsonl").write_text("\n".join(json.dumps({"question": f"{a} + {a} =", "choices": [str(2 * a), str(a)], "answer": 0})
                                                   for a in range(1, 5)))
    config = {"models": [{"type": "course", "path": str(tiny["folder"] / "model"), "name": "fp"},
                         {"type": "course", "path": str(tiny["folder"] / "model"), "name": "int8kv", "kv": "int8"}],
              "tasks": [{"builtin": "cloze_en", "n": 4}, {"path": str(tmp_path / "mine.jsonl"), "style": "letters", "circular": True}],
              "niah": {"lengths": [64, 128], "depths": [0.0, 1.0]}, "ppl_texts": 1, "out": str(tmp_path / "out")}
    (tmp_path / "suite.json").write_text(json.dumps(config))
    assert main(["eval", str(tmp_path / "suite.json")]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["models"] == ["fp", "int8kv"] and len(results["results"]) == 4
    assert "mine/circular_acc" in (tmp_path / "out" / "report.md").read_text()
    run = tmp_path / "run"
    import shutil
    shutil.copytree(tiny["folder"] / "model", run / "pretrain" / "model")
    ctx = RunContext(run, load_settings("ci"))
    section = eval_stage(ctx)
    assert "cloze_en/acc" in section and (run / "eval" / "report.md").is_file() and ctx.summary["eval"]["contaminated"] > 0.5


def test_cloze_task_chinese_records():
    "The Chinese cloze cuts the last two characters before 。, and only endings that close three or more sentences are used."
    rng = __import__("random").Random(0)
    pool = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经"
    words = ["问题", "发展", "工作", "生活", "市场"]
    sentences = ["".join(rng.choice(pool) for _ in range(rng.randint(14, 30))) + words[k % 5] for k in range(15)]
    once = ["".join(rng.choice(pool) for _ in range(20)) + "孤词" for _ in range(2)]             # closes only two sentences
    task = cloze_task(6, records=[{"text": "。".join(sentences + once) + "。"}], lang="zh", seed=1)
    for item in task.items:
        full = item["question"] + item["choices"][item["answer"]]
        assert full in sentences and sorted(item["choices"]) == sorted(set(item["choices"])) and set(item["choices"]) < set(words)
    with pytest.raises(ValueError, match="cloze sentences"):
        cloze_task(4, records=[{"text": "。".join(once) + "。"}], lang="zh")


def test_remote_loglikelihood_from_echo_logprobs(tiny):
    """Against a vLLM-shaped echo endpoint (prompt logprobs with text offsets, first token None), the remote log-likelihoods
    equal the local ones: the offset bookkeeping picks exactly the continuation's tokens."""
    from fastapi import FastAPI
    from course_lib.serve import serve_in_thread
    model, tok = tiny["model"], tiny["tok"]
    app = FastAPI()

    @app.post("/v1/completions")
    def completions(body: dict):
        ids = tok.encode(body["prompt"])
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([ids]))[0].float(), -1)   # (t, V): row i predicts token i + 1
        lps = [None] + [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]
        tops = [None] + [{tok.decode([int(logp[i - 1].argmax())]): logp[i - 1].max().item()} for i in range(1, len(ids))]
        offsets, at = [], 0
        for t in ids:
            offsets.append(at); at += len(tok.decode([t]))
        nxt = int(logp[-1].argmax())                                     # the one generated token (max_tokens=1)
        return {"choices": [{"text": body["prompt"] + tok.decode([nxt]), "index": 0, "finish_reason": "length", "logprobs": {
            "tokens": [tok.decode([t]) for t in ids + [nxt]], "token_logprobs": lps + [logp[-1, nxt].item()],
            "top_logprobs": tops + [{tok.decode([nxt]): logp[-1, nxt].item()}], "text_offset": offsets + [at]}}]}

    url, stop = serve_in_thread(app)
    try:
        reqs = [("def f(x):", " return x"), ("import json", " as j"), ("class A:", " pass"), ("x = ", "1")]
        remote = OpenAILM(url, "tiny", concurrency=2).loglikelihood(reqs)
    finally: stop()
    local = CourseLM(model, tok).loglikelihood(reqs)
    for (a, ga), (b, gb) in zip(remote, local):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
