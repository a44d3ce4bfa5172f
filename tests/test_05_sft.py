"""Chapter 5: SFT data — loss masks by hand, packing against one-conversation-at-a-time forwards, tool calls."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from course_lib.model import Decoder, ModelConfig, export_hf
from course_lib.pretrain import BatchSource
from course_lib.sft import (IGNORE, TASKS, SFTBatches, ToolCallError, calculate, check_conversation, encode_all,
                            encode_conversation, format_tool_call, make_sft_sets, model_inputs, pack, parse_tool_calls,
                            read_conversations, sft_loss, write_sft_sets)
from course_lib.sft import answer_spans, normalize_span, reading_set, span_scores
from course_lib.tokenizer import DEFAULT_SPECIALS, Tokenizer, render_chat


@pytest.fixture(scope="module")
def tok():
    "A byte-level tokenizer (no merges) with the chat specials: ids are bytes, easy to check by hand."
    return Tokenizer({i: bytes([i]) for i in range(256)}, [], DEFAULT_SPECIALS)


def test_loss_mask_by_hand(tok):
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
            {"role": "user", "content": "?"}, {"role": "assistant", "content": "!"}]
    ids, labels = encode_conversation(tok, conv)
    start, end = tok.special_tokens["<|im_start|>"], tok.special_tokens["<|im_end|>"]
    expected_ids = ([start, *b"user\nHi", end, 10, start, *b"assistant\nYo", end, 10,
                     start, *b"user\n?", end, 10, start, *b"assistant\n!", end, 10])
    assert ids == expected_ids
    trained = [(i, l) for i, l in enumerate(labels) if l != IGNORE]
    # exactly 'Yo<|im_end|>' and '!<|im_end|>' are trained, at their own positions
    assert [l for _, l in trained] == [ord("Y"), ord("o"), end, ord("!"), end]
    assert all(ids[i] == l for i, l in trained)
    assert ids == tok.encode(render_chat(conv))


def test_bad_conversations(tok, tmp_path):
    with pytest.raises(ValueError, match="no assistant turn"): encode_conversation(tok, [{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="unknown role 'human'"): check_conversation([{"role": "human", "content": "x"}])
    with pytest.raises(ValueError, match="content must be a string"): check_conversation([{"role": "assistant", "content": 3}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n"
                   + json.dumps({"messages": [{"role": "user", "content": "only a question"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no assistant turn"): read_conversations(bad)
    xt = tmp_path / "xtuner.jsonl"
    xt.write_text(json.dumps({"conversation": [{"system": "S", "input": "Q", "output": "A"}]}) + "\n")
    assert read_conversations(xt) == [[{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                                       {"role": "assistant", "content": "A"}]]
    with pytest.raises(ValueError, match="no byte-level|lacks the chat special"):
        encode_conversation(Tokenizer({i: bytes([i]) for i in range(256)}, []), [{"role": "assistant", "content": "a"}])


def test_packing_equals_one_at_a_time(tok):
    "The summed loss of a packed batch equals the sum of each conversation's loss computed alone (plain forward)."
    torch.manual_seed(0)
    model = Decoder(ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                max_seq_len=400)).eval()
    sets = make_sft_sets(6, 2)
    convs = [c["messages"] for s in sets.values() for c in s["train"][:3]]
    examples, dropped = encode_all(tok, convs, 390)
    assert len(examples) + dropped == len(convs) and len(examples) >= 6
    batch = pack(examples, 390)
    assert batch["x"].shape[0] < len(examples)              # it did pack
    with torch.no_grad():
        packed = sft_loss(model, batch, reduction="sum")
        alone = sum(F.cross_entropy(model(torch.tensor([ex.ids[:-1]]))[0], torch.tensor(ex.labels[1:]),
                                    ignore_index=IGNORE, reduction="sum") for ex in examples)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def packed(tok):
    "A random GQA model (init_std 0.2: attention far from uniform, so a leak would show) and two rows of packed conversations."
    torch.manual_seed(1)
    model = Decoder(ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                max_seq_len=300, init_std=0.2)).eval()
    sets = make_sft_sets(4, 1)
    convs = [c["messages"] for s in sets.values() for c in s["train"][:3]]
    examples, _ = encode_all(tok, convs, 250)
    batch = pack(examples, 300)
    assert batch["x"].shape[0] < len(examples) and (batch["segment_ids"] == -1).any()   # packed, with padding
    return model, examples, batch


def test_packed_logits_equal_each_example_alone(packed):
    "Every packed example's logits equal those of the example run alone through the model (no mask, positions from 0)."
    model, examples, batch = packed
    with torch.no_grad():
        logits = model(batch["x"], **model_inputs(batch))                 # (b, t, V)
        for j, ex in enumerate(examples):
            alone = model(torch.tensor([ex.ids[:-1]]))[0]                 # (n, V)
            torch.testing.assert_close(logits[batch["segment_ids"] == j], alone, rtol=0, atol=1e-5)
        leaky = model(batch["x"], positions=batch["positions"])          # positions reset, but no segment ids
        later = (batch["positions"] != torch.arange(batch["x"].shape[1])) & (batch["segment_ids"] >= 0)
        assert (leaky[later] - logits[later]).abs().max() > 1e-2           # the test can fail: without the mask it does


def test_packed_logits_equal_transformers(packed, tmp_path):
    "transformers reads position ids that restart, without a cache, as packed sequences (masking_utils.find_packed_sequence_indices)."
    import transformers
    model, _, batch = packed
    export_hf(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="sdpa").eval()
    real = batch["segment_ids"] >= 0
    with torch.no_grad():
        theirs = hf(batch["x"], position_ids=batch["positions"], use_cache=False).logits   # no cache: a training-style call
        ours = model(batch["x"], **model_inputs(batch))
    torch.testing.assert_close(ours[real], theirs[real], rtol=0, atol=1e-5)


def test_segment_ids_with_padding_mask_and_cache(tok):
    "Left padding as a segment of its own equals the padding mask; a cached decode step keeps the segment mask."
    from course_lib.inference import KVCache
    torch.manual_seed(2)
    model = Decoder(ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                max_seq_len=64, init_std=0.2)).eval()
    x = torch.randint(0, 256, (2, 10))
    seg = torch.tensor([[-1, -1, -1] + [0] * 7, [0] * 10])
    pos = (torch.cumsum(seg >= 0, 1) - 1).clamp(min=0)
    with torch.no_grad():
        by_segments = model(x, positions=pos, segment_ids=seg)
        by_padding = model(x, positions=pos, attention_mask=(seg >= 0).long())
        torch.testing.assert_close(by_segments[seg >= 0], by_padding[seg >= 0], rtol=0, atol=1e-6)
        cache = KVCache(model.cfg, 2, 10)                                # prefill 7, then decode 3 one at a time
        steps = [model(x[:, :7], positions=pos[:, :7], cache=cache, segment_ids=seg[:, :7])[:, -1]]
        for i in range(7, 10):
            steps.append(model(x[:, i:i + 1], positions=pos[:, i:i + 1], cache=cache, segment_ids=seg[:, :i + 1])[:, -1])
    torch.testing.assert_close(torch.stack(steps[1:], 1), by_segments[:, 7:], rtol=0, atol=1e-5)
    torch.testing.assert_close(steps[0], by_segments[:, 6], rtol=0, atol=1e-5)


def test_cut_and_drop(tok):
    long = [{"role": "user", "content": "x" * 50}, {"role": "assistant", "content": "y"}]
    examples, dropped = encode_all(tok, [long, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]], 20)
    assert dropped == 1 and len(examples) == 1
    with pytest.raises(ValueError, match="more than seq_len"): pack(examples, 3)


def test_tool_calls():
    text = "sure " + format_tool_call("calculator", {"expression": "2 * (3 + 4)"}) + format_tool_call("search", {"q": "中文"})
    calls = parse_tool_calls(text)
    assert calls == [{"name": "calculator", "arguments": {"expression": "2 * (3 + 4)"}}, {"name": "search", "arguments": {"q": "中文"}}]
    assert parse_tool_calls("no call here") == []
    for bad, msg in [("<tool_call>{\"name\": 1}</tool_call>", "string 'name'"), ("<tool_call>{\"name\": \"x\"", "unclosed"),
                     ("<tool_call>[1]</tool_call>", "string 'name'"), ('<tool_call>{"name": "x", "arguments": 3}</tool_call>', "object")]:
        with pytest.raises(ToolCallError, match=msg): parse_tool_calls(bad)


@pytest.mark.parametrize("expr", ["37 * 12", "(5 + 7) * 3", "96 / 8", "7 / 2", "-4 + 10", "2 - 9"])
def test_calculator_against_python(expr):
    value = eval(expr)  # the reference: Python's own arithmetic on a vetted literal expression
    assert calculate(expr) == (str(int(value)) if float(value).is_integer() else f"{value:.6g}")


def test_calculator_rejects_code():
    for bad in ["__import__('os')", "2 ** 10", "x + 1", "1 / 0", "3 +"]:
        with pytest.raises(ValueError): calculate(bad)


def test_sets_held_out_and_well_formed(tmp_path):
    sets = make_sft_sets(80, 20, seed=3)
    assert set(sets) == set(TASKS)
    for task, splits in sets.items():
        assert len(splits["train"]) == 80 and len(splits["test"]) == 20
        train_q = {c["messages"][0]["content"] for c in splits["train"]}
        assert not any(c["messages"][0]["content"] in train_q for c in splits["test"])
        for c in splits["train"] + splits["test"]: check_conversation(c["messages"])
    for c in sets["tool_use"]["test"]:
        (call,) = parse_tool_calls(c["messages"][1]["content"])
        assert call["name"] == "calculator" and calculate(call["arguments"]["expression"]) == c["expect"]["result"]
    for c in sets["reading"]["test"]:
        passage = c["messages"][0]["content"].split("\n\n")[0]
        assert f'{c["expect"]["cue"]} {c["expect"]["answer"]}' in passage and f'"{c["expect"]["cue"]}"' in c["messages"][0]["content"]
    assert {c["expect"]["passage"] for c in sets["reading"]["test"]}.isdisjoint({c["expect"]["passage"] for c in sets["reading"]["train"]})
    zh = [c for c in sets["self_cognition"]["train"] if any("\u4e00" <= ch <= "\u9fff" for ch in c["messages"][0]["content"])]
    assert zh and all("Camper" in c["messages"][1]["content"] for c in zh)
    paths = write_sft_sets(sets, tmp_path)
    assert len(read_conversations(paths["tool_use_test"])) == 20
    assert make_sft_sets(80, 20, seed=3)["tool_use"]["train"] == sets["tool_use"]["train"]   # deterministic



def test_held_out_self_cognition_questions_stay_unseen_however_many_are_drawn():
    "The question space is a few hundred texts: 3,000 training conversations cover all of their split, none of the other's."
    from course_lib.sft import self_cognition_set
    train = {c["messages"][0]["content"] for c in self_cognition_set(3000, seed=0)}
    test = {c["messages"][0]["content"] for c in self_cognition_set(200, seed=1, split="val")}
    assert len(train) > 100 and len(test) > 10 and train.isdisjoint(test)
    with pytest.raises(ValueError, match="split"): self_cognition_set(5, split="val", val_fraction=0.0)

def test_sft_batches_are_a_batch_source(tok):
    "SFTBatches: a pure function of the generator, rows are a slice of the same global draw, windows full, no example split."
    examples, _ = encode_all(tok, [c["messages"] for s in make_sft_sets(12, 1).values() for c in s["train"]], 200)
    source = SFTBatches(examples, 200, examples[:3], tok.vocab_size, tok.special_tokens["<|im_end|>"])
    assert isinstance(source, BatchSource)
    x, y, extra = source.train_batch(4, np.random.default_rng(5), "cpu")
    x2, y2, extra2 = source.train_batch(4, np.random.default_rng(5), "cpu")
    assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(extra["segment_ids"], extra2["segment_ids"])
    part = source.train_batch(4, np.random.default_rng(5), "cpu", rows=slice(2, 4))
    assert torch.equal(part[0], x[2:]) and torch.equal(part[2]["positions"], extra["positions"][2:])
    seg = extra["segment_ids"]
    assert (seg >= 0).float().mean() > 0.8                                # packed tight
    lengths = {len(ex.ids) - 1 for ex in examples}
    for row in seg:                                                       # each segment is one whole example, once
        ids = [int(j) for j in row.unique() if j >= 0]
        assert all(int((row == j).sum()) in lengths for j in ids)
    assert len(list(source.val_batches(2, 5, "cpu"))) == 1
    with pytest.raises(ValueError, match="more than seq_len"): SFTBatches(examples, 20, examples, 300, 0)
    with pytest.raises(ValueError, match="held-out"): SFTBatches(examples, 200, [], 300, 0)


def test_reading_answer_is_the_rest_of_the_clause_by_hand():
    "Worked by hand: each cue of 3 plain words that occurs once, and the words after it up to the first clause mark."
    text = "The cat sat on the mat, and then it slept. It slept well."
    assert answer_spans(text, cue_words=3) == [("The cat sat", "on the mat"), ("cat sat on", "the mat"), ("sat on the", "mat"),
                                               ("and then it", "slept")]             # no cue holds a mark ('the mat, and')
    assert answer_spans("A b c d e f g h i j k l", cue_words=3) == []                 # no clause mark: where to stop is not decided
    assert answer_spans("One two three four five six seven eight nine.", cue_words=3, max_words=5) == [   # 'One two three': 6 words
        ("two three four", "five six seven eight nine"), ("three four five", "six seven eight nine"),
        ("four five six", "seven eight nine"), ("five six seven", "eight nine"), ("six seven eight", "nine")]
    assert answer_spans('Say "a b" to c d e f, then.', cue_words=2) == [("to c", "d e f"), ("c d", "e f"), ("d e", "f")]   # quoted words: no cue


def test_reading_split_keeps_test_passages_out_of_training():
    paras = [(f"doc#{k}", f"Passage number {k} says that word {k} comes first, and then other words follow it.") for k in range(60)]
    train, test = reading_set(paras, 200, seed=1), reading_set(paras, 50, seed=2, split="val")
    train_ids, test_ids = {c["expect"]["passage"] for c in train}, {c["expect"]["passage"] for c in test}
    assert test_ids and train_ids.isdisjoint(test_ids)
    train_text = " ".join(c["messages"][0]["content"] for c in train)
    assert not any(c["messages"][0]["content"].split("\n\n")[0] in train_text for c in test)   # no test passage leaks, verbatim
    with pytest.raises(ValueError, match="no passages"): reading_set([("x#0", "no clause mark here at all in these words")], 1)


def test_span_scores_by_hand():
    assert normalize_span("  On the\n mat. ") == "on the mat" and normalize_span('"mat",') == "mat"
    assert span_scores("On the mat.", "on the mat") == {"em": 1.0, "f1": 1.0}
    assert span_scores("the mat", "on the mat") == {"em": 0.0, "f1": pytest.approx(0.8)}      # 2 common: P = 1, R = 2/3
    assert span_scores("on a mat", "on the mat") == {"em": 0.0, "f1": pytest.approx(2 / 3)}   # no article dropping, unlike SQuAD
    assert span_scores("", "mat") == {"em": 0.0, "f1": 0.0}
