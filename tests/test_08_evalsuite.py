"""Chapter 8, part 2: NIAH bookkeeping, contamination on planted overlaps (brute force as reference), pass@k against
the closed form, HumanEval through the sandbox, judges with position swap, Bradley–Terry on a known ordering, reports."""
import itertools
import json
import math
import random
import re
import time

import numpy as np
import pytest

from course_lib.eval import LM, Task
from course_lib.evalsuite import (NEEDLE, NgramIndex, ScriptedJudge, bootstrap_ratings, bradley_terry, code_scores,
                                  contamination, eval_main, execute, humaneval_problems, judge_battles, judge_pairwise,
                                  judge_single, judge_suite,
                                  needle_grid, pass_at_k, plot_needle_grid, words_of, write_report)


class _ShortMemory(LM):
    "Finds the needle only if it sits within the last `reach` words of the prompt."
    name = "short-memory"
    def __init__(self, reach: int): self.reach = reach
    def generate(self, prompts, max_tokens=32, stop=()):
        out = []
        for p in prompts:
            tail = " ".join(p.split()[-self.reach:])
            m = re.search(r"secret number of the camp is (\d+)\.", tail)
            out.append(f" {m.group(1)}." if m else " unknown")
        return out


def test_needle_grid_bookkeeping():
    "A model that sees only the last 60 words finds the needle exactly where it lies within them."
    lengths, depths = [40, 80, 160], [0.0, 0.5, 1.0]
    got = needle_grid(_ShortMemory(60), lengths, depths)
    # rows: depth; columns: length. At 40 words everything is in reach; at 160 only the needle at the end.
    assert got["grid"] == [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
    ax = plot_needle_grid(got)
    assert ax.get_xlabel().startswith("context length")


def _brute_overlap(item: str, corpus: list[str], n: int = 13) -> tuple[float, bool]:
    "Reference: plain sets of word tuples."
    grams = lambda t: [tuple(w[i:i + n]) for w in [words_of(t)] for i in range(len(w) - n + 1)]
    seen = {g for t in corpus for g in grams(t)}
    mine = grams(item)
    hits = [g in seen for g in mine]
    return (sum(hits) / len(hits) if hits else 0.0), any(hits)


def test_contamination_on_planted_overlaps():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(500)]
    corpus = [" ".join(rng.choices(vocab, k=300)) for _ in range(20)]
    clean = [" ".join(rng.choices(vocab, k=40)) for _ in range(5)]
    planted = [" ".join(corpus[3].split()[50:80]), "Intro words here. " + " ".join(corpus[7].split()[10:23]).upper() + " and more",
               " ".join(corpus[0].split()[:12])]            # 12 words: below the 13-gram unit, not contaminated
    task = Task("t", "gen", [{"question": q, "answer": ""} for q in clean + planted])
    got = contamination(task, NgramIndex(corpus))
    for rec, q in zip(got["records"], clean + planted):
        overlap, any_hit = _brute_overlap(q, corpus)
        assert rec["overlap"] == pytest.approx(overlap) and rec["contaminated"] == any_hit
    assert [r["contaminated"] for r in got["records"]] == [False] * 5 + [True, True, False]
    assert got["records"][5]["overlap"] == 1.0 and got["contaminated"] == pytest.approx(2 / 8)


def test_pass_at_k_closed_form():
    for n, c, k in [(10, 3, 1), (10, 3, 5), (20, 0, 3), (5, 5, 2), (200, 13, 10), (7, 2, 6)]:
        want = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001)
    with pytest.raises(ValueError, match="at least 5 samples"): pass_at_k(3, 1, 5)
    results = [[{"passed": True}, {"passed": False}], [{"passed": False}, {"passed": False}]]
    assert code_scores(results, ks=(1, 2, 3)) == {"pass@1": 0.25, "pass@2": 0.5}


def test_humaneval_canonical_pass_and_bad_solutions_fail_in_bounded_time():
    task = humaneval_problems()
    assert len(task.items) == 164
    items = task.items[:4]
    canonical = [[it["canonical_solution"]] for it in items]
    assert code_scores(execute(items, canonical, workers=2)) == {"pass@1": 1.0}
    first = items[0]
    bad = ["    return None\n",                                              # wrong
           "    while True: pass\n",                                          # loops
           "    x = bytearray(10**10)\n    return x\n",                       # allocates without bound
           "    import os; os._exit(0)\n"]                                    # exits 0 in the first test: must not pass
    start = time.time()
    got = execute([first] * len(bad), [[b] for b in bad], workers=2, timeout_s=3, memory_mb=256)
    assert [r[0]["passed"] for r in got] == [False] * 4
    assert time.time() - start < 30
    assert "time limit" in got[1][0]["reason"] or "CPU" in got[1][0]["reason"]


@pytest.mark.slow
def test_humaneval_all_canonical_solutions_pass():
    task = humaneval_problems()
    assert code_scores(execute(task.items, [[it["canonical_solution"]] for it in task.items], workers=2)) == {"pass@1": 1.0}


def test_judges_with_position_swap():
    judge = ScriptedJudge()                                                  # longer answer wins
    assert judge_pairwise(judge, ["q1", "q2", "q3"], ["long answer", "x", "same"], ["short", "longer one", "same"]) == ["A", "B", "tie"]
    biased = ScriptedJudge(rule=lambda q, a, b: "A")                         # always prefers the first position
    assert judge_pairwise(biased, ["q"], ["x"], ["y"]) == ["tie"]            # the swap exposes it
    assert judge_single(judge, ["q", "q"], ["one two three", "a " * 30]) == [4.0, 10.0]
    assert judge_single(ScriptedJudge(rate=lambda q, a: 42), ["q"], ["a"]) == [None]   # out of range: no rating
    # constrained (verdicts scored by log-likelihood) agrees with generation on the same planted cases
    assert judge_pairwise(judge, ["q1", "q2", "q3"], ["long answer", "x", "same"], ["short", "longer one", "same"],
                          constrained=True) == ["A", "B", "tie"]
    assert judge_pairwise(biased, ["q"], ["x"], ["y"], constrained=True) == ["tie"]
    assert judge_single(judge, ["q", "q"], ["one two three", "a " * 30], constrained=True) == [4.0, 10.0]


QUESTIONS = ["What is 2 + 2?", "Name a colour.", "What does json.dumps return?", "Is 7 prime?"]
GOOD, BAD = ["4", "Blue.", "A string of JSON.", "Yes."], ["5", "Seven.", "A list.", "No, it is even."]


@pytest.fixture(scope="module")
def judge_model():
    from tiny import tiny_chat_model
    return tiny_chat_model(max_seq_len=512)


def _verdict_by_hand(model, tok, prompt: str) -> str:
    "The likeliest of ' [[A]]', ' [[B]]', ' [[C]]' after the prompt: one unbatched float64 forward per option."
    import torch
    import torch.nn.functional as F
    scores = {}
    for v in "ABC":
        ctx, whole = tok.encode(prompt), tok.encode(prompt + f" [[{v}]]")
        with torch.no_grad(): logp = F.log_softmax(model(torch.tensor([whole[:-1]]))[0].double(), -1)   # (t, V)
        cont = whole[len(ctx):]
        scores[v] = sum(logp[len(whole) - 1 - len(cont) + k, t].item() for k, t in enumerate(cont))
    return max(scores, key=scores.get)


def test_course_model_as_constrained_judge(judge_model):
    """The course model judging (an untrained one: only the bookkeeping is checkable): each order's verdict is the likeliest
    of the three by a float64 forward, and a win is kept only when the swapped order agrees."""
    from course_lib.eval import CourseLM
    from course_lib.evalsuite import PAIR_PROMPT, VERDICTS, _pick
    model, tok = judge_model
    lm = CourseLM(model, tok, batch_size=4)
    prompts = [PAIR_PROMPT.format(question=q, a=a, b=b) for q, a, b in zip(QUESTIONS, GOOD, BAD)]
    swapped = [PAIR_PROMPT.format(question=q, a=b, b=a) for q, a, b in zip(QUESTIONS, GOOD, BAD)]
    firsts, seconds = [_verdict_by_hand(model, tok, p) for p in prompts], [_verdict_by_hand(model, tok, p) for p in swapped]
    assert _pick(lm, prompts + swapped, VERDICTS) == [f"[[{v}]]" for v in firsts + seconds]
    back = [{"A": "B", "B": "A", "C": "C"}[v] for v in seconds]               # the swapped verdicts in the original order
    want = [f if f == s and f != "C" else "tie" for f, s in zip(firsts, back)]
    assert judge_pairwise(lm, QUESTIONS, GOOD, BAD, constrained=True) == want
    ratings = judge_single(CourseLM(model, tok), QUESTIONS, GOOD, constrained=True)
    assert all(r in range(1, 11) for r in ratings)                        # constrained: always a rating in the scale


def test_judge_through_chapter7_server_equals_local(judge_model):
    """The same judge behind chapter 7's server (prompt logprobs over HTTP): the same verdict in each order, the same
    1-10 ratings and the same battles as in-process."""
    from course_lib.engine import LLMEngine
    from course_lib.eval import CourseLM, OpenAILM
    from course_lib.evalsuite import PAIR_PROMPT, VERDICTS, _pick
    from course_lib.serve import create_app, serve_in_thread
    model, tok = judge_model
    answers = {"good": GOOD, "bad": BAD, "terse": ["four", "red", "text", "yes"]}
    prompts = [PAIR_PROMPT.format(question=q, a=a, b=b) for q, a, b in zip(QUESTIONS, GOOD, BAD)]
    prompts += [PAIR_PROMPT.format(question=q, a=b, b=a) for q, a, b in zip(QUESTIONS, GOOD, BAD)]
    local_lm = CourseLM(model, tok)
    url, stop = serve_in_thread(create_app(LLMEngine(model, num_blocks=384, block_size=8, max_num_batched_tokens=512), tok, "judge"))
    try:
        remote_lm = OpenAILM(url, "judge", concurrency=4, max_length=512)
        assert _pick(remote_lm, prompts, VERDICTS) == _pick(local_lm, prompts, VERDICTS)
        assert judge_single(remote_lm, QUESTIONS, BAD, constrained=True) == judge_single(local_lm, QUESTIONS, BAD, constrained=True)
        remote = judge_battles(remote_lm, QUESTIONS, answers, constrained=True)
    finally: stop()
    local = judge_battles(local_lm, QUESTIONS, answers, constrained=True)
    assert remote == local
    assert [(a, b) for a, b, _ in local] == [(a, b) for a, b in itertools.combinations(answers, 2) for _ in QUESTIONS]


def test_camp_eval_with_a_judge(judge_model, tmp_path):
    "`camp eval` with a 'judge' entry: every pair of models battles on every question and the report carries the ratings."
    from course_lib.model import export_hf
    from course_lib.tokenizer import EOT, save_hf
    model, tok = judge_model
    save_hf(tok, tmp_path / "tok")
    export_hf(model, tmp_path / "model", tokenizer=tmp_path / "tok", eos_id=tok.special_tokens[EOT])
    spec = {"type": "course", "path": str(tmp_path / "model"), "constrained": True, "questions": QUESTIONS[:2], "max_tokens": 6}
    config = {"models": [{"type": "course", "path": str(tmp_path / "model"), "name": "fp"},
                         {"type": "course", "path": str(tmp_path / "model"), "name": "int4kv", "kv": "int4"}],
              "perplexity": False, "judge": spec, "out": str(tmp_path / "out")}
    (tmp_path / "suite.json").write_text(json.dumps(config))
    report = eval_main(tmp_path / "suite.json")
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [tuple(b[:2]) for b in results["battles"]] == [("fp", "int4kv")] * 2 and set(results["ratings"]) == {"fp", "int4kv"}
    assert "Judge ratings" in report.read_text()
    with pytest.raises(ValueError, match="questions"): judge_suite([], {"type": "course"})


def test_bradley_terry_recovers_known_order():
    rng = np.random.default_rng(0)
    strength = {"p0": 1.5, "p1": 0.7, "p2": 0.0, "p3": -0.8, "p4": -1.4}
    battles = []
    for a, b in itertools.permutations(strength, 2):
        p = 1 / (1 + math.exp(strength[b] - strength[a]))
        battles += [(a, b, "A" if rng.random() < p else "B") for _ in range(60)]
    fit = bradley_terry(battles)
    assert sorted(fit, key=fit.get, reverse=True) == list(strength)
    true = np.array(list(strength.values())); true -= true.mean()
    assert np.abs(np.array([fit[p] for p in strength]) - true).max() < 0.3
    ratings = bootstrap_ratings(battles, rounds=40)
    assert list(ratings) == list(strength)
    assert all(r["lo"] <= r["rating"] <= r["hi"] for r in ratings.values())
    assert ratings["p0"]["lo"] > ratings["p2"]["hi"]                         # clearly separated players do not overlap


def test_report_and_camp_eval(tmp_path):
    suite = {"models": ["m1", "m2"], "results": [
        {"task": "cloze", "model": "m1", "metrics": {"acc": 0.5}}, {"task": "cloze", "model": "m2", "metrics": {"acc": 0.75}}],
        "perplexity": {"m1": {"bits_per_byte": 2.0}}, "niah": {"m1": {"lengths": [10, 20], "depths": [0.0, 1.0], "grid": [[1, 0], [1, 1]], "mean": 0.75}}}
    ratings = bootstrap_ratings([("m1", "m2", "B")] * 5 + [("m1", "m2", "A")] * 2, rounds=20)
    report = write_report(suite, tmp_path / "r", ratings)
    text = report.read_text()
    assert "| m2 | 0.750 |" in text and "![NIAH m1](niah_m1.png)" in text and "Bradley" in text
    assert (tmp_path / "r" / "leaderboard.png").stat().st_size > 1000 and json.loads((tmp_path / "r" / "results.json").read_text())["ratings"]
    from course_lib.camp import main
    (tmp_path / "bad.json").write_text("{")
    assert main(["eval", str(tmp_path / "bad.json")]) == 2
