"""Grading tests for hw02: each compares the student's function with course_lib.tokenizer on fresh inputs."""
import pytest

from course_lib import tokenizer as tk

REFERENCES = ["course_lib.tokenizer.count_pretokens", "course_lib.tokenizer.pair_counts", "course_lib.tokenizer.merge",
              "course_lib.tokenizer.bpe_merges", "course_lib.tokenizer.train_bpe", "course_lib.tokenizer.train_bpe_naive",
              "course_lib.tokenizer.Tokenizer"]
REFERENCES += [name.replace("course_lib.tokenizer.", "course_lib.bpe.") for name in REFERENCES]   # the trainer's own module (02a)

PIECES = ["a", "b", "ab", "the", " the", " ", "  ", "\n", "\t", "'s", "'ll", "1", "42", "!", "?!", ",", "é", "你", "好", "🙂",
          "<|endoftext|>", "<|end", "|>", "<|im_start|>"]


def _texts(rng, count, max_pieces=40):
    return ["".join(rng.choice(PIECES, size=rng.integers(0, max_pieces))) for _ in range(count)]


@pytest.mark.question("q1 count_pretokens", points=1)
def test_count_pretokens_fixed(student):
    texts = ["Hi hi<|endoftext|>Hi", "", "it's 12345  ok\n\n  x", "<|endoftext|><|endoftext|>"]
    for specials in ([], ["<|endoftext|>"], ["<|endoftext|>", "<|endoftext|><|endoftext|>"]):
        assert dict(student.count_pretokens(texts, specials)) == dict(tk.count_pretokens(texts, "gpt2", specials, processes=1)), specials


@pytest.mark.question("q1 count_pretokens", points=1)
def test_count_pretokens_random(student, rng):
    for _ in range(60):
        texts = _texts(rng, int(rng.integers(1, 6)))
        specials = list(rng.choice(["<|endoftext|>", "<|im_start|>", "<|end"], size=rng.integers(0, 3), replace=False))
        assert dict(student.count_pretokens(texts, specials)) == dict(tk.count_pretokens(texts, "gpt2", specials, processes=1)), (texts, specials)


@pytest.mark.question("q2 pair_counts", points=1)
def test_pair_counts_fixed(student):
    for ids in ([], [1], [1, 1], [1, 1, 1], [1, 2, 3, 1, 2], [5, 5, 5, 5]):
        assert dict(student.pair_counts(ids)) == tk.pair_counts(ids), ids


@pytest.mark.question("q2 pair_counts", points=1)
def test_pair_counts_random(student, rng):
    for _ in range(200):
        ids = rng.integers(0, int(rng.integers(1, 20)), size=rng.integers(0, 60)).tolist()
        assert dict(student.pair_counts(ids)) == tk.pair_counts(ids), ids


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


@pytest.mark.question("q3 merge_step", points=1)
def test_merge_step_matches_the_trainer(student, rng):
    "Words of single bytes: the pair must be the first merge course_lib's trainer learns."
    for raw in [{b"x": 3}, {b"aaa": 1}, {b"aaaa": 2, b"a": 1}] + [_random_raw(rng) for _ in range(50)]:
        words, want_pair, _ = _trainer_step(raw, 0)
        pair, _ = student.merge_step(dict(words))
        assert pair == want_pair, words


@pytest.mark.question("q3 merge_step", points=2)
def test_merge_step_random(student, rng):
    "Words part-way through training: the next pair and the merged words both equal the trainer's next step."
    for _ in range(150):
        raw = _random_raw(rng)
        words, want_pair, want_new = _trainer_step(raw, int(rng.integers(0, 8)))
        pair, new = student.merge_step(dict(words))
        assert pair == want_pair, words
        assert dict(new) == want_new, words


def _trained_merges(rng):
    corpus = _texts(rng, 20, 60)
    return tk.train_bpe(corpus, 256 + int(rng.integers(1, 60)), [], processes=1)[1]


def _reference_encode(text, merges):
    tok = tk.Tokenizer(tk.build_vocab(merges, []), merges, [])
    return [tok.vocab[i] for i in tok.encode(text)]


@pytest.mark.question("q4 encode", points=1)
def test_encode_fixed(student):
    merges = [(b"a", b"b"), (b"ab", b"c"), (b" ", b"ab"), (b"b", b"c")]
    for text in ["abc ab", "abcbc", "bcabc", "", "a", "aaa", "你好"]:
        assert list(student.encode(text, merges)) == _reference_encode(text, merges), text


@pytest.mark.question("q4 encode", points=2)
def test_encode_random(student, rng):
    for _ in range(30):
        merges = _trained_merges(rng)
        for text in _texts(rng, 5):
            text = text.replace("<|endoftext|>", "").replace("<|im_start|>", "")
            assert list(student.encode(text, merges)) == _reference_encode(text, merges), (text, len(merges))
