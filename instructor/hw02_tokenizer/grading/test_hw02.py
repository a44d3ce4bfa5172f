"""Grading tests for hw02: each compares the student's function with course_lib.tokenizer on fresh inputs."""
import pytest

from course_lib import tokenizer as tk

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


def _reference_merge_step(word_counts):
    "One training step built from course_lib's pair_counts and merge, with the library's tie rule."
    vocab = sorted({t for w in word_counts for t in w})
    index = {t: i for i, t in enumerate(vocab)}
    counts = {}
    for w, n in word_counts.items():
        tk.pair_counts([index[t] for t in w], counts, n)
    if not counts:
        return None, word_counts
    best = max(counts, key=lambda p: (counts[p], vocab[p[0]], vocab[p[1]]))
    vocab.append(vocab[best[0]] + vocab[best[1]])
    new = {}
    for w, n in word_counts.items():
        key = tuple(vocab[i] for i in tk.merge([index[t] for t in w], best, len(vocab) - 1))
        new[key] = new.get(key, 0) + n
    return (vocab[best[0]], vocab[best[1]]), new


def _random_words(rng, tokens):
    words = {}
    for _ in range(int(rng.integers(1, 12))):
        w = tuple(rng.choice(tokens, size=rng.integers(1, 8)).tolist())
        words[w] = words.get(w, 0) + int(rng.integers(1, 5))
    return words


@pytest.mark.question("q3 merge_step", points=1)
def test_merge_step_matches_the_trainer(student, rng):
    "Words of single bytes: the pair must be the first merge course_lib's trainer learns."
    for _ in range(50):
        words = _random_words(rng, [bytes([x]) for x in b"abcd "])
        pair, _ = student.merge_step(words)
        raw = {}
        for w, n in words.items():
            raw[b"".join(w)] = raw.get(b"".join(w), 0) + n
        want = tk.bpe_merges(raw, 1)
        assert pair == (want[0] if want else None), words


@pytest.mark.question("q3 merge_step", points=2)
def test_merge_step_random(student, rng):
    tokens = [b"a", b"b", b"ab", b"ba", b"c", b"abc", b" ", b"\xe4"]
    cases = [{(b"x",): 3}, {(b"a", b"a", b"a"): 1}, {(b"a", b"a", b"a", b"a"): 2, (b"a",): 1}]
    for words in cases + [_random_words(rng, tokens) for _ in range(150)]:
        pair, new = student.merge_step(dict(words))
        want_pair, want_new = _reference_merge_step(words)
        assert pair == want_pair, words
        assert dict(new) == want_new, words


def _trained_merges(rng):
    corpus = _texts(rng, 20, 60)
    return tk.train_bpe(corpus, 256 + int(rng.integers(1, 60)), [], processes=1)[1]


def _reference_encode(text, merges):
    tok = tk.Tokenizer(tk._finish_vocab(merges, []), merges, [])
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
