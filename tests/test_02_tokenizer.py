"""Chapter 2: the byte-level BPE tokenizer checked against independent references (training: test_02a_bpe.py).

References used: `transformers`' PreTrainedTokenizerFast (ids, decoding, chat template), Hugging Face
`tokenizers` (long pre-tokens; a tokenizer.json trained by HF itself, imported), hand-made token files.
"""
import json
import random
import string
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import course_lib.tokenizer as tokenizer_module
from course_lib.core import embedded_corpus
from course_lib.tokenizer import (DEFAULT_SPECIALS, EOT, Tokenizer, apply_chat_template, load_tokenizer, save_hf,
                                  save_tokenizer, to_transformers, train_bpe, truncate)


@pytest.fixture(scope="module")
def trained():
    texts = [d["text"] for d in embedded_corpus(max_bytes=250_000)] + ["你好，世界！中文分词。 🙂👍🏽 naïve café"] * 30
    out = {}
    for pattern in ("gpt2", "gpt4"):
        tok = Tokenizer(*train_bpe(texts, 900, DEFAULT_SPECIALS, pattern=pattern), DEFAULT_SPECIALS, pattern=pattern)
        out[pattern] = (tok, to_transformers(tok))
    return out


VARIED = ["def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\r\n",
          "The quick brown fox — it's 12345 miles, isn't it? I'll see; we've, they're.",
          "你好，世界！这是中文。日本語も。한국어.", "🙂👍🏽🇫🇷 emoji", "\x00\x01\x1c\x1f\x7f\x85\u2028\u3000 controls",
          f"{EOT}{EOT}<|endoftext|<|im_start|>user\nhi<|im_end|><|endoftext|>>", "   leading and trailing   ", ""]


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_ids_equal_hf_fast_tokenizer(trained, pattern):
    tok, hf = trained[pattern]
    for text in VARIED + [d["text"][:5000] for d in embedded_corpus(max_docs=30)]:
        assert tok.encode(text) == hf.encode(text), text[:80]
        assert hf.decode(tok.encode(text)) == text


text_strategy = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60) | st.lists(
    st.sampled_from(["你好", "世界", "🙂", "👍🏽", "\x00", "\x1b", "\n", "\r\n", "\t", " ", "  ", "'s", "'ll", "123456",
                     EOT, "<|endoftext|", "|endoftext|>", "<|im_start|>", "<|im_end", "<", "|", ">", "abc", "é"]),
    max_size=30).map("".join)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=text_strategy)
def test_round_trip_and_hf_agreement_property(trained, text):
    for tok, hf in trained.values():
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert ids == hf.encode(text)


def test_long_pre_tokens_equal_hf(trained):
    "Pre-tokens far above LONG_WORD (one 30 kB word, long runs) take the heap route; ids must still be HF's."
    rng = random.Random(5)
    texts = ["".join(rng.choice(string.ascii_lowercase) for _ in range(30_000)), "a" * 5000, " " * 3000 + "x",
             "9" * 2000, "".join(rng.choice(string.ascii_letters + string.digits + "+/") for _ in range(20_000))]
    for tok, hf in trained.values():
        for text in texts:
            assert tok.encode(text) == hf.encode(text), text[:40]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=text_strategy)
def test_heap_route_equals_hf_on_any_text(trained, text, monkeypatch):
    monkeypatch.setattr(tokenizer_module, "LONG_WORD", 0)                # every pre-token takes the heap route
    for tok, hf in trained.values():
        fresh = Tokenizer(tok.vocab, tok.merges, tok.special_tokens, pattern=tok.pattern)   # an empty cache
        assert fresh.encode(text) == hf.encode(text)


def test_special_tokens_longest_first(trained):
    tok, _ = trained["gpt2"]
    double = Tokenizer(tok.vocab, tok.merges, [*DEFAULT_SPECIALS, EOT + EOT])
    hf = to_transformers(double)
    for text in [EOT * 3, "a" + EOT * 2 + "b", EOT]:
        assert double.encode(text) == hf.encode(text)
    assert double.encode(EOT * 3) == [double.special_tokens[EOT + EOT], double.special_tokens[EOT]]


def test_chat_template_matches_transformers(trained, tmp_path):
    tok, _ = trained["gpt2"]
    save_hf(tok, tmp_path)
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2? 你好"},
                {"role": "assistant", "content": "4"}, {"role": "tool", "content": '{"result": 4}'}]
    for gen in (False, True):
        want = list(hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=False))
        assert apply_chat_template(tok, messages, add_generation_prompt=gen) == want
    assert hf.decode(apply_chat_template(tok, messages[:1])) == "<|im_start|>system\nBe brief.<|im_end|>\n"


def test_import_a_tokenizer_trained_by_hf(tmp_path):
    "A tokenizer.json made by HF (its own id order: specials first, bytes by code point) loads and encodes identically."
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, trainers, decoders
    texts = [d["text"] for d in embedded_corpus(max_bytes=150_000)]
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=700, special_tokens=[EOT], show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.save(str(tmp_path / "tokenizer.json"))
    ours = load_tokenizer(tmp_path / "tokenizer.json")
    assert ours.special_tokens == {EOT: 0}
    for text in VARIED + texts[:10]:
        assert ours.encode(text) == hf.encode(text).ids
        assert ours.decode(hf.encode(text).ids) == hf.decode(hf.encode(text).ids, skip_special_tokens=False)


def test_save_load_and_truncate(trained, tmp_path):
    tok, _ = trained["gpt4"]
    again = load_tokenizer(save_tokenizer(tok, tmp_path / "t.json"))
    assert (again.vocab, again.merges, again.special_tokens, again.pattern) == (tok.vocab, tok.merges, tok.special_tokens, tok.pattern)
    texts = [d["text"] for d in embedded_corpus(max_bytes=250_000)] + ["你好，世界！中文分词。 🙂👍🏽 naïve café"] * 30
    small = train_bpe(texts, 256 + 3 + 100, DEFAULT_SPECIALS, pattern="gpt4")[1]
    assert truncate(tok, 100).merges == small  # greedy training: a prefix of merges is a smaller training


def test_encode_iterable_memory_is_bounded(tmp_path):
    texts = [d["text"] for d in embedded_corpus(max_bytes=300_000)]
    tok = Tokenizer(*train_bpe(texts, 1000, DEFAULT_SPECIALS), DEFAULT_SPECIALS, cache_size=5_000)
    big = "".join(d["text"] for d in embedded_corpus(kinds=["code"], max_bytes=3_500_000))
    path = tmp_path / "big.txt"
    path.write_text(big, encoding="utf-8")
    n_bytes = path.stat().st_size
    want = tok.encode(big)
    del big
    tracemalloc.start()
    n, mismatch = 0, 0
    with open(path, encoding="utf-8", newline="") as f:
        for i, token in enumerate(tok.encode_iterable(f)):
            mismatch += token != want[i]; n += 1
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == len(want) and mismatch == 0
    assert n_bytes > 3_000_000 and peak < 2_000_000, (n_bytes, peak)  # < 2 MB while streaming 3+ MB


def test_encode_batch_equals_encode(trained):
    tok, _ = trained["gpt2"]
    texts = [d["text"] for d in embedded_corpus(max_bytes=1_500_000)]
    assert tok.encode_batch(texts, processes=2) == [tok.encode(t) for t in texts]


def test_bad_inputs(tmp_path, trained):
    with pytest.raises(ValueError, match="at least 259"):
        train_bpe(["abc"], 258, DEFAULT_SPECIALS)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train_bpe(tmp_path / "missing.txt", 300)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("naïve".encode("utf-8") + b" caf\xe9")
    with pytest.raises(ValueError, match=r"not valid UTF-8: byte offset 10"):
        train_bpe(bad, 300)
    tok, _ = trained["gpt2"]
    with pytest.raises(KeyError, match="token id 99999 is not in the vocabulary"):
        tok.decode([5, 99999])
    assert tok.decode(list("é".encode())[:1]) == "\ufffd"  # invalid UTF-8 is replaced, documented
    with pytest.raises(TypeError):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="unknown pattern"):
        train_bpe(["abc"], 300, pattern="gpt9")
    with pytest.raises(ValueError, match="unknown role"):
        apply_chat_template(tok, [{"role": "robot", "content": "x"}])
    # training stops early, without hanging, when no pair is left
    vocab, merges = train_bpe(["ab"], 400, [EOT])
    assert merges == [(b"a", b"b")] and len(vocab) == 258


def test_stage_reads_data_shards_and_token_files_match_transformers(tmp_path):
    "The stage's token files hold, per document in order, transformers' ids of it followed by <|endoftext|>."
    import numpy as np
    from transformers import AutoTokenizer
    from course_lib.core import RunContext, load_settings, split_of, write_jsonl
    from course_lib.tokenizer import tokenizer_stage
    docs = list(embedded_corpus(max_bytes=200_000))
    (tmp_path / "data" / "shards").mkdir(parents=True)
    write_jsonl(docs[:20], tmp_path / "data" / "shards" / "shard-00000.jsonl")
    write_jsonl(docs[20:], tmp_path / "data" / "shards" / "shard-00001.jsonl")
    settings = load_settings("ci", {"vocab_size": "700", "val_fraction": "0.2"})
    ctx = RunContext(tmp_path, settings)
    report = tokenizer_stage(ctx)
    assert "data/shards" in report and (tmp_path / "tokenizer" / "compression.png").is_file()
    meta = json.loads((tmp_path / "tokenizer" / "tokens" / "meta.json").read_text())
    hf = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert meta["vocab_size"] == 700 and meta["dtype"] == "uint16" and meta["eos_id"] == hf.convert_tokens_to_ids(EOT)
    for split in ("train", "val"):
        want = [i for d in docs if split_of(d["id"], 0.2) == split for i in hf.encode(d["text"]) + [meta["eos_id"]]]
        got = np.memmap(tmp_path / "tokenizer" / "tokens" / f"{split}.bin", dtype=meta["dtype"], mode="r")
        assert len(want) > 0 and got.tolist() == want and meta["n_tokens"][split] == len(want)
    assert ctx.summary["tokenizer"]["vocab_size"] == 700


def test_stage_without_inputs_or_corpus_names_the_problem(tmp_path):
    from course_lib.core import RunContext, load_settings
    from course_lib.tokenizer import tokenizer_stage
    ctx = RunContext(tmp_path, load_settings("ci", {"corpus": str(tmp_path / "nowhere")}))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tokenizer_stage(ctx)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=text_strategy, cuts=st.lists(st.integers(0, 200), max_size=8))
def test_encode_iterable_equals_encode_for_any_chunking(trained, text, cuts):
    "However the text is cut into pieces, streaming gives encode()'s ids (a special token with a space inside included)."
    pieces, last = [], 0
    for c in sorted(c for c in cuts if c <= len(text)) + [len(text)]:
        pieces.append(text[last:c]); last = c
    for tok, _ in trained.values():
        assert list(tok.encode_iterable(iter(pieces))) == tok.encode(text)
    spaced = Tokenizer(trained["gpt4"][0].vocab, trained["gpt4"][0].merges, [*DEFAULT_SPECIALS, "a <|x|>"], pattern="gpt4")
    spaced_text = text.replace("abc", "a <|x|>")
    assert list(spaced.encode_iterable(iter([spaced_text[:c] if i == 0 else spaced_text[c:] for i, c in enumerate([len(spaced_text) // 2] * 2)]))) == spaced.encode(spaced_text)


# --- the token-file contract (one writer, one reader) -------------------------------------------

def test_token_files_round_trip_and_dtype_rule(tmp_path):
    "Written in chunks, read back with plain numpy (an independent reader) and with load_tokens; uint16 exactly while ids fit."
    import numpy as np
    from course_lib.tokenizer import load_tokens, token_dtype, write_byte_tokens, write_token_files
    rng = np.random.default_rng(0)
    for vocab_size, on_disk in ((257, np.uint16), (2**16, np.uint16), (2**16 + 1, np.uint32), (100_000, np.uint32)):
        chunks = [rng.integers(0, vocab_size, n) for n in (5, 0, 1000)]
        folder = write_token_files({"train": iter(chunks), "val": chunks[0]}, tmp_path / str(vocab_size), vocab_size, eos_id=0)
        assert token_dtype(vocab_size) == on_disk
        assert np.fromfile(folder / "train.bin", dtype=on_disk).tolist() == np.concatenate(chunks).tolist()
        data = load_tokens(folder)
        assert data.train.tolist() == np.concatenate(chunks).tolist() and data.val.tolist() == chunks[0].tolist()
        assert json.loads((folder / "meta.json").read_text())["n_tokens"] == {"train": 1005, "val": 5}
    with pytest.raises(ValueError, match="outside"):
        write_token_files({"train": np.array([0, 2**16])}, tmp_path / "bad", 2**16, 0)
    # the byte-level stand-in: ids are the UTF-8 bytes, each document closed by 256
    folder = write_byte_tokens([{"id": "a", "text": "hé"}, {"id": "b", "text": "x"}], tmp_path / "bytes", val_fraction=0.0)
    assert load_tokens(folder).train.tolist() == [104, 0xC3, 0xA9, 256, 120, 256]


def test_load_tokens_names_what_is_wrong(tmp_path):
    import numpy as np
    from course_lib.tokenizer import load_tokens, write_token_files
    with pytest.raises(FileNotFoundError, match="tokenizer stage"):
        load_tokens(tmp_path / "missing")
    folder = write_token_files({"train": np.arange(20), "val": np.arange(20)}, tmp_path / "t", 256, 0)
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps(meta | {"dtype": "uint32"}))
    with pytest.raises(ValueError, match="does not fit vocab_size"):
        load_tokens(folder)
    (folder / "meta.json").write_text(json.dumps(meta | {"n_tokens": {"train": 21}}))
    with pytest.raises(ValueError, match="meta.json says 21"):
        load_tokens(folder)
    (folder / "meta.json").write_text(json.dumps(meta))
    (folder / "val.bin").unlink()
    with pytest.raises(FileNotFoundError, match="val.bin"):
        load_tokens(folder)
