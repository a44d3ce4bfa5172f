"""Issue #11: each homework's stated rules are checked, and its grading tests see what they claim. The grading tests run
in-process here against the source's solution and against a wrong or rule-breaking variant, so each check is fast."""
import ast
import functools
import importlib.util
import math
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import nbformat
import numpy as np
import pytest

from course_lib.grading import Limits, grade, rule_violations
from course_lib.sandbox import Session

REPO = Path(__file__).resolve().parents[1]


def grading_module(hw: str):
    path = next((REPO / "instructor" / hw / "grading").glob("test_*.py"))
    spec = importlib.util.spec_from_file_location(f"grading_{hw}", path)
    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
    return module


EXPERIMENT = "# The experiment"   # the first line of a cell that runs a homework's (slow) experiment: not run here


@functools.lru_cache(maxsize=None)
def _executed(hw: str) -> dict:
    "The source notebook's namespace, its cells run once in a temporary folder (experiment cells that still run write there)."
    ns: dict = {}
    with tempfile.TemporaryDirectory() as folder:
        here = os.getcwd(); os.chdir(folder)
        try:
            for cell in nbformat.read(REPO / "instructor" / hw / f"{hw}.ipynb", as_version=4).cells:
                if cell.cell_type == "code" and not cell.source.lstrip().startswith(("%", "!", EXPERIMENT)): exec(cell.source, ns)
        finally: os.chdir(here)
    return ns


def solution(hw: str, **replace) -> SimpleNamespace:
    "The source notebook's functions, executed in-process, with some replaced."
    return SimpleNamespace(**{**_executed(hw), **replace})


def fails(test, student, **kw) -> bool:
    try: test(student, **kw)
    except AssertionError: return True
    return False


# hw01: 'version 10.0.0.1' is no address, and the random documents contain such text
def test_hw01_version_numbers_are_not_redacted():
    g, good = grading_module("hw01_data"), solution("hw01_data")
    old = solution("hw01_data", redact_emails_ips=lambda text: re_old(good, text))
    assert good.redact_emails_ips("version 10.0.0.1") == "version 10.0.0.1"
    assert not fails(g.test_redaction_table, good) and fails(g.test_redaction_table, old)
    rng = np.random.default_rng(0)
    docs = [g._pii_document(rng) for _ in range(300)]
    assert sum(any(w + " " in d for w in g.VERSION_WORDS) for d in docs) > 30
    assert fails(g.test_redaction_random, old, rng=np.random.default_rng(1))
    assert not fails(g.test_redaction_random, good, rng=np.random.default_rng(1))


def re_old(good, text):
    "The solution before the fix: every valid IPv4 redacted, versions included."
    import re
    octet = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
    ipv4 = re.compile(rf"(?<![\w.]){octet}(?:\.{octet}){{3}}(?![\w]|\.\d)")
    email = re.compile(r"(?<![\w.+%-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-]|\.\w)")
    return ipv4.sub("<IPV4>", email.sub("<EMAIL>", text))


# hw01: the MinHash tolerance fails a correct solution at most once in a million runs
def run_failure(tolerance: float, num_perm: int = 256, trials: int = 20) -> float:
    "Upper bound on P(a correct estimator fails the test once in `trials`), exact binomial tails over a grid of Jaccard values."
    worst = 0.0
    for j in np.linspace(0.0, 1.0, 201):
        p = sum(math.comb(num_perm, x) * j**x * (1 - j)**(num_perm - x) for x in range(num_perm + 1)
                if abs(x / num_perm - j) >= tolerance)
        worst = max(worst, p)
    return min(1.0, trials * worst)


def test_hw01_minhash_tolerance_is_derived():
    g = grading_module("hw01_data")
    assert run_failure(0.12) > 1e-3                        # the old tolerance: about one failing run in 500
    assert run_failure(g.TOLERANCE) < g.FAILURE == 1e-6    # Hoeffding's bound holds for the exact tails
    assert g.TOLERANCE < 0.2                               # and still fails an estimator of 1 - J or of 0.5
    good = solution("hw01_data")
    flipped = solution("hw01_data", estimate_jaccard=lambda a, b: 1 - good.estimate_jaccard(a, b))
    assert fails(g.test_estimate_is_close_to_exact_jaccard, flipped, rng=np.random.default_rng(0))
    assert not fails(g.test_estimate_is_close_to_exact_jaccard, good, rng=np.random.default_rng(0))


# hw02: the grading file holds no merge_step of its own; the trainer is the reference
def test_hw02_grading_file_has_no_merge_step():
    g = grading_module("hw02_tokenizer")
    tree = ast.parse(Path(g.__file__).read_text())
    helpers = [f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and not f.name.startswith("test_")]
    assert not any("merge_step" in name for name in helpers), helpers
    assert "max(" not in Path(g.__file__).read_text(), "choosing the best pair is the student's job, not the grader's"
    good = solution("hw02_tokenizer")
    def smallest_tie(words):  # ties broken towards the smallest pair: a wrong answer
        counts = {}
        for w, n in words.items():
            for pair in zip(w, w[1:]): counts[pair] = counts.get(pair, 0) + n
        if not counts: return None, dict(words)
        best = min(counts, key=lambda p: (-counts[p], p))
        return best, good.merge_step(words)[1] if good.merge_step(words)[0] == best else words
    wrong = solution("hw02_tokenizer", merge_step=smallest_tie)
    assert fails(g.test_merge_step_random, wrong, rng=np.random.default_rng(0))
    assert not fails(g.test_merge_step_random, good, rng=np.random.default_rng(0))
    assert not fails(g.test_merge_step_matches_the_trainer, good, rng=np.random.default_rng(0))


# hw01: q4's accounts are in file bytes and must balance; the threshold it is given is the one it must use
def test_hw01_clean_folder_wrong_variants_fail(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # the grading tests write their folders into the current directory
    g, good = grading_module("hw01_data"), solution("hw01_data")
    def cleaned_bytes(folder, threshold=0.8):   # books kept documents by their cleaned text: no longer the input's bytes
        result = good.clean_folder(folder, threshold)
        result["accounts"]["kept"]["bytes"] = sum(len(t.encode()) for t in result["kept"].values())
        return result
    fixed = lambda folder, threshold=0.8: good.clean_folder(folder)   # ignores the threshold it is given
    assert fails(g.test_clean_folder_accounts_balance, solution("hw01_data", clean_folder=cleaned_bytes), rng=np.random.default_rng(0))
    assert fails(g.test_clean_folder_thresholds, solution("hw01_data", clean_folder=fixed), rng=np.random.default_rng(0))
    for test in (g.test_clean_folder_accounts_balance, g.test_clean_folder_thresholds, g.test_clean_folder_matches_the_pipeline):
        assert not fails(test, good, rng=np.random.default_rng(0)), test.__name__


# hw02: the trainer's stated rules -- special tokens are never merged, and the time limit fails the textbook trainer
def test_hw02_special_tokens_as_text_fail():
    g, good = grading_module("hw02_tokenizer"), solution("hw02_tokenizer")
    def as_text(texts, vocab_size, specials=()):  # trains on the special tokens' characters, then appends them
        vocab, merges = good.train_bpe(texts, vocab_size - len(specials), [])
        return {**vocab, **{len(vocab) + k: s.encode() for k, s in enumerate(specials)}}, merges
    wrong = solution("hw02_tokenizer", train_bpe=as_text)
    assert fails(g.test_train_bpe_never_merges_special_tokens, wrong, rng=np.random.default_rng(0))
    assert not fails(g.test_train_bpe_never_merges_special_tokens, good, rng=np.random.default_rng(0))


@pytest.mark.slow
def test_hw02_time_limit_fails_the_textbook_trainer():
    "Calling merge_step in a loop (recount everything after each merge) is right but over the stated time limit."
    g, good = grading_module("hw02_tokenizer"), solution("hw02_tokenizer")
    def textbook(texts, vocab_size, specials=()):
        words = {tuple(bytes([x]) for x in w.encode()): n for w, n in good.count_pretokens(texts, specials).items()}
        merges = []
        while len(merges) < vocab_size - 256 - len(specials):
            pair, words = good.merge_step(words)
            if pair is None: break
            merges.append(pair)
        return good.train_bpe(texts, 256 + len(merges) + len(specials), specials)[0], merges
    assert not fails(g.test_train_bpe_random, solution("hw02_tokenizer", train_bpe=textbook), rng=np.random.default_rng(0))
    assert fails(g.test_train_bpe_time, solution("hw02_tokenizer", train_bpe=textbook), rng=np.random.default_rng(0))
    assert not fails(g.test_train_bpe_time, good, rng=np.random.default_rng(0))


# hw03: the reference is not the fused kernel the homework forbids; the repeat-KV edge test probes every position
def test_hw03_reference_is_float64_not_sdpa():
    g = grading_module("hw03_model")
    tree = ast.parse(Path(g.__file__).read_text())   # the code, without the rule's own statement of the forbidden names
    tree.body = [n for n in tree.body if not (isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") in ("FORBIDDEN", "REFERENCES"))]
    assert rule_violations([ast.unparse(tree)], [*g.FORBIDDEN, "course_lib.model.sdpa_attention"]) == []
    assert rule_violations(["from course_lib import model as ref\nref.sdpa_attention(q, k, v)"], ["course_lib.model.sdpa_attention"])
    import torch
    q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    assert g.attention64(q, k, v).dtype == torch.float32
    torch.testing.assert_close(g.attention64(q, k, v)[:, 3].double(), g.one_head64(q[:, 3], k[:, 1], v[:, 1]))


def test_hw03_edge_test_probes_every_position():
    import torch
    g, good = grading_module("hw03_model"), solution("hw03_model")
    def wrong_scale(q, k, v):  # divides by d instead of sqrt(d): right at position 0, wrong after it
        return good.causal_attention(q * q.shape[-1] ** -0.5, k, v)
    assert fails(g.test_attention_edge_cases, solution("hw03_model", causal_attention=wrong_scale))
    assert not fails(g.test_attention_edge_cases, good)


def test_hw03_hw04_forbidden_names_are_found_and_raise_in_the_sandbox():
    hw03, hw04 = grading_module("hw03_model"), grading_module("hw04_pretrain")
    assert rule_violations(["import torch.nn.functional as F\ndef causal_attention(q, k, v):\n    return F.scaled_dot_product_attention(q, k, v)"], hw03.FORBIDDEN)
    assert rule_violations(["import torch\ny = torch.rms_norm(x, (4,))"], hw03.FORBIDDEN)
    assert rule_violations(["from torch.optim import AdamW"], hw04.FORBIDDEN)
    for hw in ("hw03_model", "hw04_pretrain"):   # the sources obey their own rules
        cells = [c.source for c in nbformat.read(REPO / "instructor" / hw / f"{hw}.ipynb", as_version=4).cells if c.cell_type == "code"]
        assert rule_violations(cells, grading_module(hw).FORBIDDEN) == []
    with Session() as s:
        assert s.forbid({**hw03.FORBIDDEN, **hw04.FORBIDDEN}) == []
        out = s.run("import torch, torch.nn.functional as F\nfor f in (lambda: F.scaled_dot_product_attention(*[torch.ones(1, 1, 2, 2)] * 3),\n"
                    "          lambda: torch.rms_norm(torch.ones(2), (2,)), lambda: F.rms_norm(torch.ones(2), (2,)),\n"
                    "          lambda: __import__('torch.optim').optim.AdamW, lambda: getattr(torch, 'optim').SGD):\n"
                    "    try: f(); print('ALLOWED')\n    except PermissionError as e: print('refused')")
        assert out["output"].split() == ["refused"] * 5, out


def test_a_broken_rule_costs_the_whole_grade(tmp_path):
    "A homework whose grading module forbids a name: a notebook using it scores 0 and is told why."
    shutil.copytree(REPO / "instructor" / "hw00_core", tmp_path / "hw00_core")
    tests = tmp_path / "hw00_core" / "grading" / "test_hw00.py"
    tests.write_text(tests.read_text() + '\nFORBIDDEN = {"hashlib.blake2b": "write the hash yourself"}\n')
    result = grade(tmp_path / "hw00_core" / "hw00_core.ipynb", limits=Limits(timeout_s=240), out=tmp_path / "grade.json")
    assert result["max_points"] == 10 and result["points"] == 0
    assert result["rule_violations"] == ["code cell 3, line 8: uses hashlib.blake2b"], result["rule_violations"]
    assert "a rule of this homework was broken" in " ".join(result["problems"])


# hw03/hw04: every spelling that reaches a forbidden kernel or module is refused where it runs
SPELLINGS = {
    "F.scaled_dot_product_attention": "F.scaled_dot_product_attention(q, q, q)",
    "torch._C._nn": "torch._C._nn.scaled_dot_product_attention(q, q, q)",
    "torch.ops.aten": "torch.ops.aten.scaled_dot_product_attention(q, q, q)",
    "torch.ops.aten overload": "torch.ops.aten.scaled_dot_product_attention.default(q, q, q)",
    "flash kernel": "torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, q)",
    "math kernel": "torch.ops.aten._scaled_dot_product_attention_math(q, q, q)",
    "getattr on a built string": "getattr(F, 'scaled_' + 'dot_product_attention')(q, q, q)",
    "torch.rms_norm": "torch.rms_norm(q, (4,))",
    "F.rms_norm": "F.rms_norm(q, (4,))",
    "aten rms_norm": "torch.ops.aten.rms_norm(q, [4])",
    "fused rms_norm kernel": "torch.ops.aten._fused_rms_norm(q, [4], None, None)",
    "_VariableFunctions": "torch._C._VariableFunctions.rms_norm(q, (4,))",
    "nn.RMSNorm": "torch.nn.RMSNorm(4)(q)",
    "from torch.optim import": "__import__('torch.optim', fromlist=['AdamW']).AdamW",
    "getattr(torch, 'optim')": "getattr(torch, 'op' + 'tim').SGD",
    "a submodule": "sys.modules['torch.optim.adamw'].AdamW",
    "re-import after del": "(sys.modules.pop('torch.optim'), importlib.import_module('torch.optim'))",
    "reload": "importlib.reload(sys.modules['torch.optim.sgd'])",
    "load the file by path": "(lambda s: s.loader.exec_module(importlib.util.module_from_spec(s)))("
                             "importlib.util.spec_from_file_location('torch.optim.adamw', os.path.dirname(torch.__file__) + '/optim/adamw.py'))",
}


def test_every_spelling_of_a_forbidden_function_is_refused_in_the_sandbox():
    hw03, hw04 = grading_module("hw03_model"), grading_module("hw04_pretrain")
    rows = "".join(f"    {name!r}: lambda: {code},\n" for name, code in SPELLINGS.items())
    with Session() as s:
        assert s.forbid({**hw03.FORBIDDEN, **hw04.FORBIDDEN}) == []
        out = s.run("import importlib, importlib.util, os, sys, torch, torch.nn.functional as F\nq = torch.randn(1, 1, 3, 4)\n"
                    f"tries = {{\n{rows}}}\nrefused = {{}}\n"
                    "for name, f in tries.items():\n"
                    "    try: f(); refused[name] = 'ALLOWED'\n"
                    "    except (PermissionError, ImportError, TypeError) as e: refused[name] = type(e).__name__\n"
                    "by_hand = ((q @ q.transpose(-1, -2)) * 0.5).softmax(-1) @ q")
        assert out["error"] is None, out
        refused = s.get("refused")[0]
        assert set(refused) == set(SPELLINGS) and "ALLOWED" not in refused.values(), refused
        assert refused["reload"] == "TypeError" and refused["re-import after del"] == "ImportError"   # the stand-in is no module
        assert tuple(s.get("by_hand")[0].shape) == (1, 1, 3, 4)     # attention written by hand still runs
    static = [code for name, code in SPELLINGS.items() if "getattr" not in name and "import" not in name and "sys.modules" not in code
              and "reload" not in name and "path" not in name and name != "nn.RMSNorm"]
    assert len(static) == 11
    for code in static:   # the grader's scan names each plain spelling before anything runs (a module built on one, at runtime only)
        assert rule_violations([f"import torch, torch.nn.functional as F\n{code}"], {**hw03.FORBIDDEN, **hw04.FORBIDDEN}), code
# hw05 and hw10: the experiment questions check the numbers, not just that files exist
def test_hw05_rank_sweep_rejects_impossible_and_untrained_losses(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    g, good = grading_module("hw05_finetune"), solution("hw05_finetune")
    def scaled(factor, floor=0.0):
        def sweep(w0, delta, x, ranks=(1, 2, 4, 8), steps=200, **kw):
            result = good.rank_sweep(w0, delta, x, ranks=ranks, steps=steps, **kw)
            result["relative_loss"] = [max(l * factor, floor) for l in result["relative_loss"]]
            (tmp_path / "rank_sweep.json").write_text(__import__("json").dumps(result))
            return result
        return sweep
    assert not fails(g.test_rank_sweep_reaches_the_eckart_young_bound, good, rng=np.random.default_rng(0))
    assert fails(g.test_rank_sweep_reaches_the_eckart_young_bound, solution("hw05_finetune", rank_sweep=scaled(0.5)), rng=np.random.default_rng(0))
    assert fails(g.test_rank_sweep_reaches_the_eckart_young_bound, solution("hw05_finetune", rank_sweep=scaled(1.0, 0.5)), rng=np.random.default_rng(0))
    assert rule_violations(["import bitsandbytes.functional as F\nq = F.quantize_4bit(w)"], g.FORBIDDEN)


def test_hw10_chunk_sweep_is_recomputed_and_bm25s_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    g, good = grading_module("hw10_rag"), solution("hw10_rag")
    def perfect(docs, questions, sizes=(40,), k=3):
        result = good.chunk_size_sweep(docs, questions, sizes=sizes, k=k)
        result["recall"] = [1.0] * len(result["recall"])
        (tmp_path / "chunk_sweep.json").write_text(__import__("json").dumps(result))
        return result
    assert not fails(g.test_chunk_size_sweep_matches_the_library, good, rng=np.random.default_rng(0))
    assert fails(g.test_chunk_size_sweep_matches_the_library, solution("hw10_rag", chunk_size_sweep=perfect), rng=np.random.default_rng(0))
    assert rule_violations(["import bm25s\nbm25s.BM25().index(docs)"], g.FORBIDDEN)
def variant(hw: str, old: str, new: str) -> SimpleNamespace:
    "The source notebook's functions with one piece of its solution replaced (a plausible student mistake)."
    ns: dict = {}
    cells = [c.source for c in nbformat.read(REPO / "instructor" / hw / f"{hw}.ipynb", as_version=4).cells
             if c.cell_type == "code" and c.source.lstrip().startswith(("def ", "import", "from"))]   # definitions: no checks, no experiment
    assert sum(old in c for c in cells) == 1, f"{old!r} is not in exactly one cell of {hw}"
    for source in cells: exec(source.replace(old, new), ns)
    return SimpleNamespace(**ns)


# hw03: each mistake in the whole forward costs its points
@pytest.mark.parametrize("old,new", [
    ('return rms_norm(x, weights["norm.weight"], eps) @ head.T', "return x @ head.T"),                  # no final norm
    ("q, k = apply_rope(q, positions, config[\"rope_theta\"]), apply_rope(k, positions, config[\"rope_theta\"])",
     "q = apply_rope(q, positions, config[\"rope_theta\"])"),                                            # keys not rotated
    ('head = weights["embed_tokens.weight"] if config["tie_embeddings"] else weights["lm_head.weight"]',
     'head = weights.get("lm_head.weight", weights["embed_tokens.weight"]).flip(0) if not config["tie_embeddings"] '
     'else weights["embed_tokens.weight"]'),                                                             # the untied head misused
])
def test_hw03_forward_mistakes_fail(old, new):
    g = grading_module("hw03_model")
    wrong = variant("hw03_model", old, new)
    assert any(fails(test, wrong, rng=np.random.default_rng(0)) for test in (g.test_forward_matches_library, g.test_forward_edge_cases))
    assert not fails(g.test_forward_matches_library, solution("hw03_model"), rng=np.random.default_rng(0))


def test_hw03_untied_head_is_probed():
    g = grading_module("hw03_model")
    wrong = variant("hw03_model", 'head = weights["embed_tokens.weight"] if config["tie_embeddings"] else weights["lm_head.weight"]',
                    'head = weights["embed_tokens.weight"]')
    assert fails(g.test_forward_edge_cases, wrong, rng=np.random.default_rng(0))


# hw04: each thing a checkpoint must carry is needed, and the reference loop sees the loop's details
HW04_MISTAKES = {
    "data position": ('rng.bit_generator.state = state["rng"]', "pass"),
    "optimizer moments": ('moments = {name: (m, v) for name, (m, v) in state["moments"].items()}', "pass"),
    "step count": ('done = state["step"]', "done = 0; losses_offset = state['step']"),
}


@pytest.mark.parametrize("what", HW04_MISTAKES)
def test_hw04_resume_without_each_part_fails(what, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    g, wrong = grading_module("hw04_pretrain"), variant("hw04_pretrain", *HW04_MISTAKES[what])
    assert fails(g.test_resume_equals_the_uninterrupted_run, wrong, rng=np.random.default_rng(0)), what
    assert not fails(g.test_resume_equals_the_uninterrupted_run, solution("hw04_pretrain"), rng=np.random.default_rng(0))


@pytest.mark.parametrize("old,new", [
    ("decay = weight_decay if p.ndim >= 2 else 0.0", "decay = weight_decay"),              # the norm gains decayed too
    ("torch.nn.utils.clip_grad_norm_(model.parameters(), clip)", "pass"),                 # no clipping
    ("lr = cosine_lr(s, max_lr, warmup_steps, steps)", "lr = max_lr"),                    # no schedule
])
def test_hw04_loop_details_are_checked_against_the_reference(old, new, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    g = grading_module("hw04_pretrain")
    assert fails(g.test_train_matches_the_reference_loop, variant("hw04_pretrain", old, new), rng=np.random.default_rng(0))
    assert not fails(g.test_train_matches_the_reference_loop, solution("hw04_pretrain"), rng=np.random.default_rng(0))
