"""Chapter 2a: BPE training checked against independent references.

References used: Hugging Face `tokenizers`' BpeTrainer (merges, equal up to the first tie), an independent
pair recount written here (at the first difference the two choices' counts tie), hand-worked training
examples (tie-breaking, where HF's rule differs from ours), and the textbook trainer for the incremental one.
"""
import json
from collections import Counter

import pytest

import course_lib.bpe as bpe_module
from course_lib.core import embedded_corpus
from course_lib.bpe import (EOT, GPT4_PATTERN, _count_file_range, chunk_boundaries, count_pretokens, train_bpe,
                            train_bpe_naive)
from course_lib.tokenizer import _from_unicode   # reading HF's merges needs GPT-2's byte stand-ins (02)


def hf_train_merges(texts, vocab_size, specials, pattern="gpt2"):
    "Merges learned by HF tokenizers' byte-level BpeTrainer, configured like train_bpe."
    from tokenizers import Regex, Tokenizer as HFTokenizer, models, pre_tokenizers, trainers
    hf = HFTokenizer(models.BPE())
    if pattern == "gpt2":
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(GPT4_PATTERN), "isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    merges = json.loads(hf.to_str())["model"]["merges"]
    return [tuple(_from_unicode(t) for t in (m.split(" ") if isinstance(m, str) else m)) for m in merges]


def recount_pairs(texts, pattern, merges):
    "Independent reference: pre-token counts via HF's own pre-tokenizer, merges applied naively, pairs counted."
    from tokenizers import Regex, pre_tokenizers
    pre = (pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True) if pattern == "gpt2" else
           pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(GPT4_PATTERN), "isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]))
    words = Counter()
    for t in texts:
        for piece, _ in pre.pre_tokenize_str(t):
            words[tuple(_from_unicode(c) for c in piece)] += 1
    pairs = Counter()
    for w, n in words.items():
        toks = list(w)
        for a, b in merges:
            i, new = 0, []
            while i < len(toks):
                if i + 1 < len(toks) and toks[i] == a and toks[i + 1] == b: new.append(a + b); i += 2
                else: new.append(toks[i]); i += 1
            toks = new
        for p in zip(toks, toks[1:]): pairs[p] += n
    return pairs


@pytest.mark.parametrize("kind,max_bytes,pattern,min_agree", [("prose", 300_000, "gpt2", 60), ("code", 100_000, "gpt4", 25)])
def test_merges_match_hf_trainer_until_the_first_tie(kind, max_bytes, pattern, min_agree):
    """HF's trainer breaks ties by smallest token ids, ours by the greatest byte strings: the lists must be
    identical up to the first difference, and there the two pairs must tie for the maximum count."""
    texts = [d["text"] for d in embedded_corpus(kinds=[kind], max_bytes=max_bytes)]
    ours = train_bpe(texts, 256 + 1 + 300, [EOT], pattern=pattern)[1]
    theirs = hf_train_merges(texts, 256 + 1 + 300, [EOT], pattern)
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    assert first is not None and first >= min_agree, first   # long agreement (and this corpus does reach a tie)
    pairs = recount_pairs(texts, pattern, ours[:first])
    top = max(pairs.values())
    assert pairs[ours[first]] == pairs[theirs[first]] == top
    assert ours[first] == max(p for p, n in pairs.items() if n == top)  # ours: lexicographically greatest


def test_hand_worked_example():
    # Worked by hand (the CS336 assignment's example): counts low 5, lower 2, widest 3, newest 6.
    text = "low low low low low lower lower widest widest widest newest newest newest newest newest newest"
    want = ["s t", "e st", "o w", "l ow", "w est", "n e", "ne west", "w i", "wi d", "wid est", "low e", "lowe r"]
    for trainer in (train_bpe, train_bpe_naive):
        vocab, merges = trainer([text], 256 + 12, [], pattern=r"\S+")
        assert [(a + b" " + b).decode() for a, b in merges] == want
        assert set(vocab.values()) >= {b"lower", b"widest", b"newest"}


def test_tie_goes_to_the_lexicographically_greatest_pair():
    # every pair occurs once: (b'z', b'y') > (b'c', b'd') > (b'a', b'b'); a longer token beats its prefix
    assert train_bpe(["ab", "cd", "zy"], 257, [], pattern=r"\S+")[1] == [(b"z", b"y")]
    assert train_bpe(["aab aab ab ab"], 258, [], pattern=r"\S+")[1] == [(b"a", b"b"), (b"a", b"ab")]


def test_specials_never_merged_and_never_split():
    text = f"ab{EOT}ab{EOT}ab"
    vocab, merges = train_bpe([text * 50], 300, [EOT], pattern="gpt2")
    assert all(EOT.encode() not in a + b and b">" + b"a" != a + b for a, b in merges)
    assert (b"b", b"<") not in merges and list(vocab.values()).count(EOT.encode()) == 1


def test_fast_trainer_equals_naive_and_file_input_equals_texts(tmp_path):
    texts = [d["text"] for d in embedded_corpus(max_bytes=80_000)]
    fast = train_bpe(texts, 600, [EOT])
    assert fast == train_bpe_naive(texts, 600, [EOT])
    path = tmp_path / "corpus.txt"
    path.write_text(EOT.join(texts), encoding="utf-8")
    assert train_bpe(path, 600, [EOT], processes=2) == fast


def test_file_cut_without_special_tokens_counts_exactly(tmp_path):
    "With no special token to cut at, file chunks end at a space after a printable character; counts are exact."
    text = "".join(d["text"] for d in embedded_corpus(max_bytes=2_500_000))
    path = tmp_path / "plain.txt"
    path.write_text(text, encoding="utf-8")
    cuts = chunk_boundaries(path, 60, None)
    assert len(cuts) > 50
    for pattern in ("gpt2", "gpt4"):
        whole = count_pretokens([text], pattern, [], processes=1)
        assert count_pretokens(path, pattern, [], processes=2) == whole
        pieces = Counter()
        for a, b in zip(cuts, cuts[1:]):
            pieces.update(_count_file_range((str(path), a, b, pattern, ())))
        assert pieces == whole




def test_the_tie_break_rule_is_credited_to_cs336():
    "Ties go to the greatest pair: Stanford CS336's rule (GPT-2's trainer was never published; HF's prefers the smallest ids)."
    doc = bpe_module.__doc__
    assert "CS336" in doc and "GPT-2-trainer" not in doc
