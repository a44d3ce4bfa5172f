"""Chapter 5: the fine-tuning loop, evaluation, DPO (by hand), `camp finetune` and the finetune stage."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from course_lib.core import RunContext, load_settings
from course_lib.finetune import (FinetuneConfig, dpo_loss, finetune_stage, generate_replies, load_finetune_config,
                                 prepare_model, preference_pairs, run_finetune, score_reply, sequence_logprobs, sft_train)
from course_lib.model import Decoder, ModelConfig, export_hf, from_hf
from course_lib.pretrain import read_log
from course_lib.sft import IGNORE, SFTBatches, encode_all, make_sft_sets, pack
from course_lib.tokenizer import DEFAULT_SPECIALS, Tokenizer, render_chat, save_hf

import transformers  # required: the [hf] extra


def byte_tok() -> Tokenizer:
    return Tokenizer({i: bytes([i]) for i in range(256)}, [], DEFAULT_SPECIALS)


@pytest.fixture
def base(tmp_path):
    "A tiny random model in transformers layout with a byte-level chat tokenizer beside it."
    tok = byte_tok()
    torch.manual_seed(0)
    model = Decoder(ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                max_seq_len=512, init_std=0.1))
    folder = tmp_path / "run" / "pretrain" / "model"
    save_hf(tok, tmp_path / "tok")
    export_hf(model, folder, tokenizer=tmp_path / "tok" / "tokenizer.json")
    return folder


def test_dpo_loss_by_hand():
    pc, pr, rc, rr = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0]), torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.5])
    loss, margin = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # pair 1: 0.5 * ((-1 + 1.5) - (-2 + 1.5)) = 0.5; pair 2: 0.5 * ((-3 + 2) - (-1 + 2.5)) = -1.25
    torch.testing.assert_close(margin, torch.tensor([0.5, -1.25]))
    want = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(1.25))) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)


def test_sequence_logprobs_against_plain_forward(base):
    tok, model = byte_tok(), from_hf(base).eval()
    convs = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
             [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4, of course"}]]
    examples, _ = encode_all(tok, convs, 100)
    with torch.no_grad():
        ours = sequence_logprobs(model, pack(examples, 100, packed=False))
        for ex, got in zip(examples, ours):
            logp = model(torch.tensor([ex.ids[:-1]]))[0].double().log_softmax(-1)
            want = sum(logp[i, l] for i, l in enumerate(ex.labels[1:]) if l != IGNORE)
            assert got.item() == pytest.approx(want.item(), abs=1e-3)


def test_batched_greedy_replies_equal_transformers(base):
    tok, model = byte_tok(), from_hf(base)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    convs = [[{"role": "user", "content": q}] for q in ("Who are you?", "What is 3 * 4?", "x")]
    ours = generate_replies(model, tok, convs, max_new_tokens=10, batch_size=3)
    end = tok.special_tokens["<|im_end|>"]
    for conv, reply in zip(convs, ours):
        ids = torch.tensor([tok.encode(render_chat(conv, add_generation_prompt=True))])
        out = hf.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=end, pad_token_id=0)[0, ids.shape[1]:].tolist()
        assert reply == tok.decode([i for i in out if i != end])


def test_score_rules():
    tool = {"task": "tool_use", "expect": {"expression": "6 * 7", "result": "42"}}
    assert score_reply(tool, '<tool_call>{"name": "calculator", "arguments": {"expression": "7*6"}}</tool_call>') == {"well_formed": True, "correct": True}
    assert score_reply(tool, '<tool_call>{"name": "calculator", "arguments": {"expression": "6 + 7"}}</tool_call>') == {"well_formed": True, "correct": False}
    assert score_reply(tool, "42") == {"well_formed": False, "correct": False}
    me = {"task": "self_cognition", "expect": {"name": "Camper", "maker": "LLM Camp"}}
    assert score_reply(me, "I am Camper, an assistant made by LLM Camp.")["correct"] and not score_reply(me, "I am Camper.")["correct"]
    reading = {"task": "reading", "expect": {"answer": "on the mat"}}
    assert score_reply(reading, " On the mat.") == {"correct": 1.0, "f1": 1.0}                 # normalize_span: case, space, end mark
    assert score_reply(reading, "the mat") == {"correct": 0.0, "f1": pytest.approx(0.8)}


def test_sft_runs_through_chapter4_train(base, tmp_path):
    "sft_train is chapter 4's train on packed batches: its first logged loss is the unpacked loss of the drawn conversations."
    tok = byte_tok()
    model = prepare_model(from_hf(base), "lora", r=4, alpha=8)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    convs = [c["messages"] for c in make_sft_sets(8, 1)["self_cognition"]["train"]]
    examples, _ = encode_all(tok, convs, 200)
    source = SFTBatches(examples, 200, examples[:2], model.cfg.vocab_size, tok.special_tokens["<|im_end|>"])
    x, y, extra = source.train_batch(2, np.random.default_rng(7), "cpu")          # the draw train() makes at step 1 (seed 7)
    with torch.no_grad():                                                      # reference: each drawn conversation alone
        total, count = 0.0, 0
        for row_x, row_y, row_seg in zip(x, y, extra["segment_ids"]):
            for j in row_seg.unique():
                if j < 0: continue
                keep = row_seg == j
                logits = model(row_x[keep][None])[0]                           # (n, V), positions from 0, no mask
                total += F.cross_entropy(logits, row_y[keep], ignore_index=IGNORE, reduction="sum").item()
                count += int((row_y[keep] != IGNORE).sum())
    result = sft_train(model, source, tmp_path / "sft", steps=25, batch_size=2, lr=3e-2, warmup_steps=2, seed=7)
    losses = result["losses"]
    assert losses[0] == pytest.approx(total / count, rel=1e-5)
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:3]) / 3
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    log = read_log(tmp_path / "sft" / "log.jsonl")
    assert len(log["loss"]) == 25 and len(log["val_loss"]) == 1 and result["val_loss"] == log["val_loss"][0][1]
    assert (tmp_path / "sft" / "loss.png").is_file() and (tmp_path / "sft" / "checkpoints").is_dir()
    with pytest.raises(ValueError, match="prepare_model"): sft_train(from_hf(base).requires_grad_(False), source, tmp_path / "x", 1)


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_run_finetune_writes_loadable_outputs(base, tmp_path, method):
    cfg = FinetuneConfig(model=str(base), data=["self_cognition", "tool_use"], method=method, steps=2, batch_size=2,
                         max_length=384, n_train=6, n_test=2, output=str(tmp_path / "out"), r=2)
    summary = run_finetune(cfg)
    assert set(summary["after"]) == {"self_cognition", "tool_use"} and "well_formed" in summary["after"]["tool_use"]
    merged = tmp_path / "out" / "merged"
    assert (merged / "tokenizer.json").is_file() and (tmp_path / "out" / "loss.png").is_file()
    idx = torch.randint(0, 259, (1, 20))
    hf = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad(): torch.testing.assert_close(hf(idx).logits, from_hf(merged)(idx), rtol=1e-4, atol=1e-4)
    if method == "lora":                                     # the adapter on the base in peft = the merged model
        from peft import PeftModel
        with torch.no_grad():
            peft_logits = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                                    tmp_path / "out" / "adapter").eval()(idx).logits
            torch.testing.assert_close(peft_logits, hf(idx).logits, rtol=1e-4, atol=1e-4)
    assert (tmp_path / "out" / "adapter").is_dir() == (method != "full")


def test_config_files(tmp_path):
    py = tmp_path / "c.py"
    py.write_text('method = "qlora"\nr, alpha = 4, 8\ndata = ["tool_use"]\nimport os\n')
    cfg = load_finetune_config(py, ["steps=7", "targets=q_proj,v_proj"])
    assert (cfg.method, cfg.r, cfg.alpha, cfg.steps, cfg.targets, cfg.data) == ("qlora", 4, 8, 7, ["q_proj", "v_proj"], ["tool_use"])
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"method": "full", "rank": 3}))
    with pytest.raises(ValueError, match=r"unknown fine-tuning setting\(s\) \['rank'\]"): load_finetune_config(js)
    with pytest.raises(ValueError, match="unknown method"): load_finetune_config(None, ["method=prefix"])
    with pytest.raises(FileNotFoundError): load_finetune_config(tmp_path / "missing.py")
    with pytest.raises(FileNotFoundError, match="neither a task"):
        run_finetune(FinetuneConfig(model=str(tmp_path), data=["nope.jsonl"]))


def test_camp_finetune_command(base, tmp_path):
    from course_lib.camp import main
    rc = main(["finetune", f"model={base}", "data=self_cognition", "steps=1", "batch_size=1", "n_train=2", "n_test=1",
               "max_length=200", f"output={tmp_path / 'cli'}"])
    assert rc == 0 and (tmp_path / "cli" / "summary.json").is_file()
    assert main(["finetune", f"model={base}", "bogus=1"]) == 2


def test_stage(base, tmp_path):
    ctx = RunContext(base.parent.parent, load_settings("ci"))
    report = finetune_stage(ctx)
    assert "| task | metric | before | after |" in report and (base.parent.parent / "finetune" / "merged" / "config.json").is_file()
    empty = RunContext(tmp_path / "empty", load_settings("ci"))
    assert "Skipped" in finetune_stage(empty) and (tmp_path / "empty" / "finetune").is_dir()


def test_preference_pairs_differ():
    sets = make_sft_sets(10, 2)
    pairs = preference_pairs([c for s in sets.values() for c in s["train"]])
    assert len(pairs) >= 25
    for chosen, rejected in pairs:
        assert chosen[:-1] == rejected[:-1] and chosen[-1]["content"] != rejected[-1]["content"]


def test_dpo_train_starts_at_the_reference_and_moves(base):
    from course_lib.finetune import dpo_train
    tok = byte_tok()
    model = prepare_model(from_hf(base), "lora", r=2)
    pairs = preference_pairs(make_sft_sets(4, 1)["self_cognition"]["train"])
    history = dpo_train(model, tok, pairs, steps=3, batch_size=2, lr=1e-2, max_len=200)
    assert len(history) == 3 and abs(history[0]["margin"]) < 1e-6      # adapters start at zero: policy = reference
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)   # -log sigmoid(0)
    assert any(abs(h["margin"]) > 1e-6 for h in history[1:])
    with pytest.raises(ValueError, match="prepare_model"): dpo_train(from_hf(base), tok, pairs, steps=1)


class Parrot(torch.nn.Module):
    "A model that is always right: it answers each known prompt with its reference reply, one greedy token per call."
    def __init__(self, answers: dict[tuple, list[int]], vocab: int):
        super().__init__()
        self.answers, self.vocab, self.w = answers, vocab, torch.nn.Parameter(torch.zeros(1))
        self.cfg = ModelConfig(vocab_size=vocab, max_seq_len=2048)

    def forward(self, x, positions=None, segment_ids=None):
        logits = torch.zeros(*x.shape, self.vocab)
        for i in range(len(x)):
            seen = x[i][segment_ids[i] >= 0].tolist()
            prompt, reply = next((p, r) for p, r in self.answers.items() if tuple(seen[:len(p)]) == p)
            logits[i, -1, reply[min(len(seen) - len(prompt), len(reply) - 1)]] = 1   # a finished row repeats its end
        return logits


def test_a_model_that_is_always_right_scores_every_task_in_full():
    "evaluate_tasks gives each task room for its longest reference reply (a byte-level tool call is ~80 tokens)."
    from course_lib.finetune import evaluate_tasks
    tok = byte_tok()
    text = "\n\n".join(" ".join(f"w{p}x{i}" + ("," if i % 5 == 4 else "") for i in range(30)) + "." for p in range(20))   # cues distinct
    records = [r for s in make_sft_sets(20, 6, seed=2, records=[{"id": "d", "text": text}]).values() for r in s["test"]]
    answers = {}
    for r in records:
        first = next(i for i, m in enumerate(r["messages"]) if m["role"] == "assistant")
        prompt = tuple(tok.encode(render_chat(r["messages"][:first], add_generation_prompt=True)))
        answers[prompt] = tok.encode(r["messages"][first]["content"]) + [tok.special_tokens["<|im_end|>"]]
    assert max(map(len, answers.values())) > 64                     # longer than a fixed reply budget would allow
    test = {t: [r for r in records if r["task"] == t] for t in ("self_cognition", "tool_use", "reading")}
    scores = evaluate_tasks(Parrot(answers, tok.vocab_size), tok, test)
    assert scores == {"self_cognition": {"correct": 1.0}, "tool_use": {"well_formed": 1.0, "correct": 1.0}, "reading": {"correct": 1.0, "f1": 1.0}}
    with pytest.raises(ValueError, match="no held-out records"): evaluate_tasks(Parrot(answers, tok.vocab_size), tok, {"reading": []})
