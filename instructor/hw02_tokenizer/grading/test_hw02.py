"""Grading tests for hw02: each compares the student's functions with course_lib.tokenizer on fresh random corpora.
The reference trainer is the library's; this file holds no trainer of its own."""
import json
import time
from pathlib import Path

import pytest

from course_lib import tokenizer as tk

REFERENCES = ["course_lib.tokenizer.count_pretokens", "course_lib.tokenizer.pair_counts", "course_lib.tokenizer.merge",
              "course_lib.tokenizer.bpe_merges", "course_lib.tokenizer.train_bpe", "course_lib.tokenizer.train_bpe_naive",
              "course_lib.tokenizer.Tokenizer", "course_lib.tokenizer.truncate", "course_lib.tokenizer.bytes_per_token",
              "course_lib.tokenizer.compression_curve"]

PIECES = ["a", "b", "ab", "the", " the", " ", "  ", "\n", "\t", "'s", "'ll", "1", "42", "!", "?!", ",", "é", "你", "好", "🙂",
          "<|endoftext|>", "<|end", "|>", "<|im_start|>"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|end"]
TIME_MULTIPLE, TIME_SLACK_S = 30, 0.5   # stated in the notebook: within 30x the reference's time, plus 0.5 s


def _texts(rng, count, max_pieces=40):
    return ["".join(rng.choice(PIECES, size=rng.integers(0, max_pieces))) for _ in range(count)]


def _specials(rng):
    return list(rng.choice(SPECIALS, size=rng.integers(0, 3), replace=False))


@pytest.mark.question("q1 count_pretokens", points=1)
def test_count_pretokens_fixed(student):
    texts = ["Hi hi<|endoftext|>Hi", "", "it's 12345  ok\n\n  x", "<|endoftext|><|endoftext|>"]
    for specials in ([], ["<|endoftext|>"], ["<|endoftext|>", "<|endoftext|><|endoftext|>"]):
        assert dict(student.count_pretokens(texts, specials)) == dict(tk.count_pretokens(texts, "gpt2", specials, processes=1)), specials


@pytest.mark.question("q1 count_pretokens", points=1)
def test_count_pretokens_random(student, rng):
    for _ in range(60):
        texts, specials = _texts(rng, int(rng.integers(1, 6))), _specials(rng)
        assert dict(student.count_pretokens(texts, specials)) == dict(tk.count_pretokens(texts, "gpt2", specials, processes=1)), (texts, specials)


def _apply(word: bytes, merges) -> tuple:
    "A byte word split into tokens after `merges`, applied in order (the trainer's state after those steps)."
    tokens = [bytes([b]) for b in word]
    for a, b in merges:
        i, out = 0, []
        while i < len(tokens):
            if i + 1 < len(tokens) and tokens[i] == a and tokens[i + 1] == b: out.append(a + b); i += 2
            else: out.append(tokens[i]); i += 1
        tokens = out
    return tuple(tokens)


def _random_raw(rng) -> dict:
    "Random pre-token counts over a small alphabet, so pairs repeat and ties happen."
    raw = {}
    for _ in range(int(rng.integers(1, 12))):
        w = bytes(rng.choice(list(b"abcd \xe4"), size=rng.integers(1, 9)).tolist())
        raw[w] = raw.get(w, 0) + int(rng.integers(1, 5))
    return raw


def _trainer_step(raw: dict, done: int):
    "The words after `done` of course_lib's merges, the trainer's next merge (None when none is left) and the words after it."
    merges = tk.bpe_merges(raw, done + 1)
    words = lambda ms: {_apply(w, ms): n for w, n in raw.items()}
    if len(merges) <= done: return words(merges), None, words(merges)
    return words(merges[:done]), merges[done], words(merges)


@pytest.mark.question("q2 merge_step", points=1)
def test_merge_step_matches_the_trainer(student, rng):
    "Words of single bytes: the pair must be the first merge course_lib's trainer learns."
    for raw in [{b"x": 3}, {b"aaa": 1}, {b"aaaa": 2, b"a": 1}] + [_random_raw(rng) for _ in range(50)]:
        words, want_pair, _ = _trainer_step(raw, 0)
        pair, _ = student.merge_step(dict(words))
        assert pair == want_pair, words


@pytest.mark.question("q2 merge_step", points=2)
def test_merge_step_random(student, rng):
    "Words part-way through training: the next pair and the merged words both equal the trainer's next step."
    for _ in range(150):
        raw = _random_raw(rng)
        words, want_pair, want_new = _trainer_step(raw, int(rng.integers(0, 8)))
        pair, new = student.merge_step(dict(words))
        assert pair == want_pair, words
        assert dict(new) == want_new, words


def _check_trained(student, texts, vocab_size, specials):
    want_vocab, want_merges = tk.train_bpe(texts, vocab_size, specials, processes=1)
    vocab, merges = student.train_bpe(texts, vocab_size, specials)
    merges = [tuple(m) for m in merges]
    for k, (got, want) in enumerate(zip(merges, want_merges)):
        assert got == want, f"merge {k} is {got}, the reference learns {want} (vocab_size {vocab_size}, specials {specials})"
    assert len(merges) == len(want_merges), f"{len(merges)} merges, the reference learns {len(want_merges)} (vocab_size {vocab_size})"
    assert dict(vocab) == want_vocab, "the merges are right but the vocabulary is not: ids 0-255 bytes, then merges, then specials"


@pytest.mark.question("q3 train_bpe", points=1)
def test_train_bpe_fixed(student):
    for texts, size, specials in [(["low lower lowest newest widest"] * 3, 270, []), (["aaaa aa a"], 300, []),
                                  (["", " "], 260, ["<|endoftext|>"]), (["你好你好 🙂🙂 héllo"], 280, ["<|endoftext|>", "<|im_start|>"])]:
        _check_trained(student, texts, size, specials)
    with pytest.raises(ValueError):
        student.train_bpe(["abc"], 256, ["<|endoftext|>"])


@pytest.mark.question("q3 train_bpe", points=3)
def test_train_bpe_random(student, rng):
    for _ in range(12):
        texts, specials = _texts(rng, int(rng.integers(1, 30)), 80), _specials(rng)
        _check_trained(student, texts, 256 + len(specials) + int(rng.integers(0, 150)), specials)


@pytest.mark.question("q3 train_bpe", points=1)
def test_train_bpe_never_merges_special_tokens(student, rng):
    "A corpus where the special token is the most frequent string: no merge may touch it."
    specials = ["<|endoftext|>", "<|im_start|>"]
    texts = ["".join(rng.choice(["<|endoftext|>", "<|im_start|>", "ab", " cd", "|>", "<|"], size=200)) for _ in range(5)]
    vocab, merges = student.train_bpe(texts, 300, specials)
    joined = [a + b for a, b in merges]
    assert not any(b"endoftext" in t or b"im_start" in t for t in joined), "a merge crossed into a special token: cut the text at them first"
    assert [vocab[i] for i in sorted(vocab)[-2:]] == [s.encode() for s in specials], "special tokens take the last ids, in order"
    _check_trained(student, texts, 300, specials)


def _timing_corpus(rng, n_words=3000, n_texts=200):
    "About 200 kB of Zipf-distributed random words (and a little Chinese and emoji), documents ended by <|endoftext|>."
    letters = list("abcdefghijklmnopqrstuvwxyz")
    words = ["".join(rng.choice(letters, size=rng.integers(1, 10))) for _ in range(n_words)] + ["你好", "世界", "🙂", "é"]
    p = 1 / (1 + rng.permutation(len(words))); p = p / p.sum()
    return [" ".join(rng.choice(words, size=rng.integers(50, 250), p=p)) + str(rng.choice([".", "!", "\n\n", "<|endoftext|>"]))
            for _ in range(n_texts)]


@pytest.mark.question("q3 train_bpe", points=1)
def test_train_bpe_time(student, rng):
    texts, size, specials = _timing_corpus(rng), 1256, ["<|endoftext|>"]
    reference = []
    for _ in range(2):
        start = time.perf_counter(); want = tk.train_bpe(texts, size, specials, processes=1)[1]; reference.append(time.perf_counter() - start)
    start = time.perf_counter()
    _, merges = student.train_bpe(texts, size, specials)
    took, limit = time.perf_counter() - start, TIME_MULTIPLE * min(reference) + TIME_SLACK_S
    assert [tuple(m) for m in merges] == want, "on the timing corpus the merges differ from the reference"
    assert took <= limit, f"train_bpe took {took:.1f} s, over the limit of {limit:.1f} s ({TIME_MULTIPLE}x the reference's {min(reference):.2f} s + {TIME_SLACK_S:g} s)"


def _trained(rng, specials=("<|endoftext|>", "<|im_start|>")):
    vocab, merges = tk.train_bpe(_texts(rng, 20, 60), 256 + len(specials) + int(rng.integers(1, 80)), list(specials), processes=1)
    return vocab, merges, list(specials), tk.Tokenizer(vocab, merges, list(specials))


@pytest.mark.question("q4 encode and decode", points=1)
def test_encode_fixed(student):
    merges = [(b"a", b"b"), (b"ab", b"c"), (b" ", b"ab"), (b"b", b"c")]
    vocab = tk.build_vocab(merges, ["<|endoftext|>"])
    ref = tk.Tokenizer(vocab, merges, ["<|endoftext|>"])
    for text in ["abc ab", "abcbc", "bcabc", "", "a", "aaa", "你好", "ab<|endoftext|>ab", "<|endoftext|><|endoftext|>", "<|endoftext"]:
        assert list(student.encode(text, vocab, merges, ["<|endoftext|>"])) == ref.encode(text), text


@pytest.mark.question("q4 encode and decode", points=1)
def test_encode_random(student, rng):
    for _ in range(15):
        vocab, merges, specials, ref = _trained(rng)
        for text in _texts(rng, 5):
            assert list(student.encode(text, vocab, merges, specials)) == ref.encode(text), (text, len(merges))


@pytest.mark.question("q4 encode and decode", points=1)
def test_round_trip_random(student, rng):
    "decode(encode(text)) == text on random text with Chinese, emoji and special tokens; each special token is one id."
    for _ in range(10):
        vocab, merges, specials, _ = _trained(rng)
        for text in _texts(rng, 5, 60):
            ids = list(student.encode(text, vocab, merges, specials))
            assert student.decode(ids, vocab) == text, text
            special_ids = {vocab[i].decode(): i for i in vocab if i >= len(vocab) - len(specials)}
            assert ids.count(special_ids["<|endoftext|>"]) == text.count("<|endoftext|>"), f"a special token was split: {text!r}"


@pytest.mark.question("q4 encode and decode", points=1)
def test_decode_invalid_and_unknown(student, rng):
    vocab, merges, specials, ref = _trained(rng)
    for ids in ([0xE4, 0xBD], [0xE4, 0xBD, 0xA0, 0xFF], [0x80], [ord("a"), 0xF0, 0x9F, ord("b")], []):
        assert student.decode(ids, vocab) == ref.decode(ids), ids
    with pytest.raises(KeyError):
        student.decode([len(vocab) + 5], vocab)


@pytest.mark.question("q5 experiment", points=2)
def test_compression_sweep(student, rng):
    docs = _timing_corpus(rng, n_words=800, n_texts=40)
    docs = [d.replace("<|endoftext|>", "") for d in docs]
    train, held_out, sizes = docs[:30], docs[30:], [256, 280, 320, 400, 500]
    out = Path.cwd() / f"sweep-{rng.integers(1 << 30)}"   # the notebook's own folder: the student's process may write there
    result = student.compression_sweep(train, held_out, sizes, str(out))
    written = out / "compression.json"
    assert written.is_file(), "compression_sweep wrote no compression.json in out_dir"
    assert (out / "compression.png").is_file() and (out / "compression.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "no PNG plot in out_dir"
    numbers = json.loads(written.read_text())
    assert numbers == json.loads(json.dumps(result)), "the JSON file and the returned dict differ"
    assert list(numbers["vocab_sizes"]) == sizes and len(numbers["bytes_per_token"]) == len(sizes), numbers
    bpt = numbers["bytes_per_token"]
    assert all(1.0 <= b < 20 for b in bpt), f"bytes per token out of range: {bpt}"
    assert all(x <= y + 1e-12 for x, y in zip(bpt, bpt[1:])), f"compression fell as the vocabulary grew: {bpt}"
    full = tk.Tokenizer(*tk.train_bpe(train, sizes[-1], [], processes=1), [])
    want = [tk.bytes_per_token(tk.truncate(full, size - 256), held_out) for size in sizes]
    assert bpt == pytest.approx(want, rel=1e-9), f"bytes per token {bpt}, the reference tokenizer gives {want}"
