"""Chapter 5: SFT data — loss masks by hand, packing against one-conversation-at-a-time forwards, tool calls."""
import json

import pytest
import torch
import torch.nn.functional as F

from course_lib.model import Decoder, ModelConfig
from course_lib.sft import (IGNORE, TASKS, ToolCallError, calculate, check_conversation, encode_all, encode_conversation,
                            format_tool_call, make_sft_sets, pack, parse_tool_calls, read_conversations, sft_loss,
                            write_sft_sets)
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
        assert c["expect"]["answer"] in c["messages"][0]["content"]
    assert {c["expect"]["passage"] for c in sets["reading"]["test"]}.isdisjoint({c["expect"]["passage"] for c in sets["reading"]["train"]})
    zh = [c for c in sets["self_cognition"]["train"] if any("\u4e00" <= ch <= "\u9fff" for ch in c["messages"][0]["content"])]
    assert zh and all("Camper" in c["messages"][1]["content"] for c in zh)
    paths = write_sft_sets(sets, tmp_path)
    assert len(read_conversations(paths["tool_use_test"])) == 20
    assert make_sft_sets(80, 20, seed=3)["tool_use"]["train"] == sets["tool_use"]["train"]   # deterministic
