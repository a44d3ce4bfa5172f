"""Grading tests for hw01: each compares the student's function with course_lib.data on freshly generated documents.
q4 and q5 write fresh random folders of messy documents into the notebook's own folder (the current directory while
grading), which the student's process can read, and compare the student's pass with course_lib.data.clean_corpus."""
import functools
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest

from course_lib import data
from course_lib.core import embedded_corpus, read_corpus

REFERENCES = ["course_lib.data.quality_signals", "course_lib.data.redact", "course_lib.data.MinHasher",
              "course_lib.data.clean_corpus", "course_lib.data.apply_steps", "course_lib.data.explain", "course_lib.data.dedup_plan",
              "course_lib.data.near_duplicate_clusters", "course_lib.data.lsh_candidates", "course_lib.data.shingles",
              "course_lib.data.check_readable", "course_lib.data.normalise", "course_lib.data.identify_language",
              "course_lib.data.gopher_quality", "course_lib.data.quality_verdict", "course_lib.data.redact_pii",
              "course_lib.data.find_pii", "course_lib.data.words_of", "course_lib.data.content_hash", "course_lib.data.UnionFind"]

VOCAB = ["the", "The", "and", "of", "to", "with", "that", "have", "be", "cat", "river", "model", "token", "data",
         "x", "a", "supercalifragilistic", "42", "3.14", "#tag", "...", "…", "-", "—", "(word)", "'quoted'", "end.", "é", "文字"]


def _document(rng):
    lines = []
    for _ in range(rng.integers(0, 12)):
        words = list(rng.choice(VOCAB, size=rng.integers(0, 15)))
        prefix = rng.choice(["", "", "- ", "• ", "* ", "  ", "1. "])
        suffix = rng.choice(["", "", ".", "...", "…", " ", "!"])
        lines.append(prefix + " ".join(words) + suffix)
    return rng.choice(["\n", "\n\n", "\n \n"]).join(lines)


def _check_signals(got, want, text):
    assert set(got) == set(want), f"keys {sorted(got)} != {sorted(want)}"
    for key in want:
        assert got[key] == pytest.approx(want[key]), f"{key} for {text!r}: {got[key]} != {want[key]}"


@pytest.mark.question("q1 quality_signals", points=1)
def test_quality_signals_edge_cases(student):
    for text in ["", "   \n  ", "The cat sat.", "- a\n- b\n- c", "... … ...", "#a #b the and", "the\n\n\nend...", "(!!) ??"]:
        _check_signals(student.quality_signals(text), data.quality_signals(text, cjk=False), text)


@pytest.mark.question("q1 quality_signals", points=2)
def test_quality_signals_random(student, rng):
    for _ in range(200):
        text = _document(rng)
        _check_signals(student.quality_signals(text), data.quality_signals(text, cjk=False), text)


def _email(rng):
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789")
    local = "".join(rng.choice(letters, size=rng.integers(1, 10))) + rng.choice(["", ".x", "+tag", "_y", "-z"])
    domain = ".".join("".join(rng.choice(letters[:26], size=rng.integers(1, 8))) for _ in range(rng.integers(1, 3)))
    return f"{local}@{domain}.{rng.choice(['com', 'org', 'co.uk', 'io', 'museum'])}"


def _ip(rng, valid=True):
    if valid: return ".".join(str(v) for v in rng.integers(0, 256, size=4))
    kind = rng.integers(0, 5)
    if kind == 0: return ".".join(str(v) for v in rng.integers(0, 256, size=rng.choice([3, 5])))      # versions
    if kind == 1: return ".".join(str(v) for v in [rng.integers(256, 999), *rng.integers(0, 256, size=3)])
    if kind == 2: return "v" + ".".join(str(v) for v in rng.integers(0, 10, size=4))
    if kind == 3: return "0" + ".".join(str(v) for v in rng.integers(1, 10, size=4))                  # leading zero
    return f"{rng.integers(0, 9)}.{rng.integers(0, 9)}"


LOOKALIKES = ["user@localhost", "a@b.T", "@property", "x@y", "name@123.456", "foo@@bar.com", "mail at example dot com"]
VERSION_WORDS = ["version", "Version", "release", "build", "rev.", "ver."]   # 'version 10.0.0.1' is no address


def _pii_document(rng):
    parts = []
    for _ in range(rng.integers(3, 25)):
        r = rng.random()
        piece = (_email(rng) if r < 0.2 else _ip(rng) if r < 0.35 else f"{rng.choice(VERSION_WORDS)} {_ip(rng)}" if r < 0.45
                 else _ip(rng, valid=False) if r < 0.55 else str(rng.choice(LOOKALIKES)) if r < 0.65 else str(rng.choice(VOCAB[:14])))
        parts.append(rng.choice(["", "(", "<", "'"]) + piece + rng.choice(["", ")", ">", ",", ".", ":80", "'"]))
    return " ".join(parts)


@pytest.mark.question("q2 redact_emails_ips", points=1)
def test_redaction_table(student):
    for text in ["mail bob@example.com at 10.0.0.1", "v1.2.3.4 and 1.2.3.4.5 and 256.1.1.1", "<guido@python.org>",
                 "server 192.168.0.12:8080.", "user@localhost a@b.T @property", "first.last+tag@sub.example.co.uk", "0.0.0.0",
                 "version 10.0.0.1", "release 1.2.3.4 at 10.0.0.1", "Build 192.168.0.1"]:
        assert student.redact_emails_ips(text) == data.redact(text, ("EMAIL", "IPV4"))[0], text


@pytest.mark.question("q2 redact_emails_ips", points=2)
def test_redaction_random(student, rng):
    for _ in range(300):
        text = _pii_document(rng)
        assert student.redact_emails_ips(text) == data.redact(text, ("EMAIL", "IPV4"))[0], text


@pytest.mark.question("q3 minhash", points=2)
def test_minhash_signature_matches_reference(student, rng):
    for num_perm in (1, 16, 128):
        hasher = data.MinHasher(num_perm, seed=int(rng.integers(0, 2**31)))
        for size in (0, 1, 7, 5000):
            hashes = np.unique(rng.integers(0, 2**32, size=size, dtype=np.uint64))
            got = np.asarray(student.minhash_signature(hashes, hasher.a, hasher.b))
            assert got.shape == (num_perm,) and np.array_equal(got.astype(np.uint64), hasher.signature(hashes).astype(np.uint64)), (num_perm, size)


@pytest.mark.question("q3 minhash", points=1)
def test_minhash_large_set(student, rng):
    hasher = data.MinHasher(128, seed=1)
    hashes = np.unique(rng.integers(0, 2**32, size=100_000, dtype=np.uint64))
    assert np.array_equal(np.asarray(student.minhash_signature(hashes, hasher.a, hasher.b)).astype(np.uint64),
                          hasher.signature(hashes).astype(np.uint64))


def jaccard_tolerance(num_perm: int, trials: int, failure: float) -> float:
    "Hoeffding: P(|mean of num_perm Bernoulli(J) - J| >= t) <= 2 exp(-2 num_perm t^2); union over `trials` at total `failure`."
    return math.sqrt(math.log(2 * trials / failure) / (2 * num_perm))

NUM_PERM, TRIALS, FAILURE = 256, 20, 1e-6
TOLERANCE = jaccard_tolerance(NUM_PERM, TRIALS, FAILURE)   # 0.185: a correct solution fails one run in a million at most


@pytest.mark.question("q3 minhash", points=1)
def test_estimate_is_close_to_exact_jaccard(student, rng):
    hasher = data.MinHasher(NUM_PERM, seed=2)
    for _ in range(TRIALS):
        universe = rng.choice(2**32 - 1, size=2000, replace=False).astype(np.uint64)
        shared = int(rng.integers(0, 500))
        a, b = universe[:500], np.concatenate([universe[:shared], universe[500:1000 - shared]])
        exact = len(set(a.tolist()) & set(b.tolist())) / len(set(a.tolist()) | set(b.tolist()))
        estimate = student.estimate_jaccard(student.minhash_signature(a, hasher.a, hasher.b), student.minhash_signature(b, hasher.a, hasher.b))
        assert abs(estimate - exact) < TOLERANCE, (exact, estimate)


# q4 and q5: a whole cleaning pass over a folder, against course_lib.data's pipeline with the same seven steps
STEPS = ("readable", "normalise", "language", "quality", "pii", "exact_dedup", "near_dedup")
FOREIGN = ["Le chat est assis sur le tapis et regarde la pluie tomber doucement sur la ville endormie.",
           "Der Hund läuft schnell über die Straße, weil er den roten Ball im Garten sehen will.",
           "El perro corre por el parque mientras los niños juegan con la pelota bajo el sol.",
           "Il gatto dorme sul divano e sogna di correre nei campi verdi della campagna toscana."]
JUNK = ["Click here", "- home\n- about\n- contact\n- login\n- cart", "### ### ### #tag #tag #news #sale",
        "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15", "buy now ... cheap ... best ... price ... deal ..."]


@functools.lru_cache(maxsize=1)
def _paragraphs() -> tuple[list, list]:
    "The embedded corpus's documents as lists of paragraphs: (English, Chinese)."
    docs = list(embedded_corpus(("prose", "zh"), max_bytes=400_000))
    split = lambda lang: [[p for p in d["text"].split("\n\n") if p.strip()] for d in docs if d["meta"].get("lang") == lang]
    return split("en"), split("zh")


def _window(rng, docs) -> str:
    doc = docs[int(rng.integers(len(docs)))]
    start = int(rng.integers(len(doc)))
    return "\n\n".join(doc[start:start + int(rng.integers(3, 15))])


def _with_pii(rng, text: str) -> str:
    words = text.split(" ")
    for _ in range(int(rng.integers(1, 5))):
        r = rng.random()
        pii = (_email(rng) if r < 0.4 else _ip(rng) if r < 0.8 else f"{rng.choice(VERSION_WORDS)} {_ip(rng)}")
        words.insert(int(rng.integers(len(words) + 1)), pii)
    return " ".join(words)


def _noise(rng, text: str) -> str:
    "What normalisation undoes: CRLF, trailing and odd spaces, zero-width characters, full-width digits, blank runs."
    r = rng.random()
    if r < 0.2: return text.replace("\n", "\r\n")
    if r < 0.4: return text.replace("\n", "  \n").replace(" ", "\u00a0", 3)
    if r < 0.6: return text.replace("a", "a\u200b", 5).replace("1", "\uff11") + "\n\n\n\n"
    return text


def _near(rng, text: str) -> str:
    words = text.split(" ")
    for _ in range(max(1, int(len(words) * rng.uniform(0.0, 0.05)))):
        words[int(rng.integers(len(words)))] = str(rng.choice(["the", "a", "river", "模型", "data"]))
    return " ".join(words)


def _new_folder(prefix: str) -> Path:
    "A new folder in the current directory (the notebook's, while grading) that the student's process can read."
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=Path.cwd()))
    folder.chmod(0o755)
    return folder


def _messy_folder(rng, n: int = 36) -> Path:
    "A fresh folder of n .txt files in the current directory: English and Chinese prose, PII, copies, near-copies, junk, bad bytes."
    en, zh = _paragraphs()
    folder = _new_folder("docs-")
    texts = []
    for i in range(n):
        r = rng.random()
        if texts and r < 0.12: raw = _noise(rng, texts[int(rng.integers(len(texts)))]).encode()          # a copy
        elif texts and r < 0.26: raw = _near(rng, texts[int(rng.integers(len(texts)))]).encode()        # a near-copy
        elif r < 0.31: raw = str(rng.choice(JUNK)).encode()
        elif r < 0.35: raw = " ".join(rng.choice(FOREIGN, size=6)).encode()
        elif r < 0.39: raw = _window(rng, zh).encode("gbk", errors="replace")                             # wrong encoding
        elif r < 0.41: raw = _window(rng, en).encode() + bytes(rng.integers(128, 256, size=40).tolist())  # stray bytes
        elif r < 0.43: raw = [b"", b"  \n\n ", b"\x00\x01binary\x00" * 20][int(rng.integers(3))]
        else:
            text = _window(rng, en if rng.random() < 0.55 else zh)
            if rng.random() < 0.5: text = _with_pii(rng, text)
            texts.append(text)
            raw = _noise(rng, text).encode()
        (folder / f"doc-{i:03d}.txt").write_bytes(raw)
    return folder


def _reference(folder: Path, threshold: float = 0.8) -> dict:
    "course_lib.data's pipeline on `folder`: {kept: {name: text}, dropped: {name: 'step:reason'}, accounts in file bytes}."
    cfg = data.CleanConfig(steps=STEPS, pii_kinds=("EMAIL", "IPV4"), dedup_threshold=threshold)
    size = {p.name: p.stat().st_size for p in folder.glob("*.txt")}
    with tempfile.TemporaryDirectory() as out:
        stats = data.clean_corpus(read_corpus(folder, errors="record"), out, cfg)
        kept = {Path(r["id"]).name: r["text"] for shard in sorted(Path(out, "shards").glob("*.jsonl"))
                for r in map(json.loads, shard.read_text().splitlines())}
        dropped = {Path(r["id"]).name: f"{r['step']}:{r['reason']}"
                   for r in map(json.loads, Path(out, "dropped.jsonl").read_text().splitlines())}
    assert stats["input"]["docs"] == len(size) == len(kept) + len(dropped)
    accounts = {"input": {"docs": len(size), "bytes": sum(size.values())},
                "kept": {"docs": len(kept), "bytes": sum(size[n] for n in kept)}, "dropped": {}}
    for name, reason in sorted(dropped.items()):
        cell = accounts["dropped"].setdefault(reason, {"docs": 0, "bytes": 0})
        cell["docs"] += 1; cell["bytes"] += size[name]
    return {"kept": kept, "dropped": dropped, "accounts": accounts}


def _check_outcomes(got: dict, want: dict):
    for name in sorted(set(want["kept"]) | set(want["dropped"])):
        should = want["dropped"].get(name, "kept")
        did = got["dropped"].get(name, "kept" if name in got["kept"] else "missing")
        assert did == should, f"{name}: yours {did}, the pipeline's {should}"
        if should == "kept":
            assert got["kept"][name] == want["kept"][name], f"{name} is kept, but its cleaned text differs from the pipeline's"
    assert set(got["kept"]) | set(got["dropped"]) == set(want["kept"]) | set(want["dropped"]), "files that are not in the folder"


@pytest.mark.question("q4 clean_folder", points=1)
def test_clean_folder_edge_cases(student):
    folder = _new_folder("edge-cases-")
    result = student.clean_folder(str(folder))
    assert result["accounts"]["input"] == {"docs": 0, "bytes": 0} and not result["kept"] and not result["dropped"], "an empty folder"
    for name, raw in {"a.txt": b"", "b.txt": b"\xff" * 300, "c.txt": b"\x00" * 10 + b"text " * 40, "d.csv": b"not a .txt file",
                      "e.txt": "\u200b\u200b\n\r\n".encode(), "f.txt": " ".join(FOREIGN).encode()}.items():
        (folder / name).write_bytes(raw)
    _check_outcomes(student.clean_folder(str(folder)), _reference(folder))


@pytest.mark.question("q4 clean_folder", points=4)
def test_clean_folder_matches_the_pipeline(student, rng):
    "Every document of fresh random folders: kept with the same cleaned text, or dropped by the same step for the same reason."
    for _ in range(2):
        folder = _messy_folder(rng)
        _check_outcomes(student.clean_folder(str(folder)), _reference(folder))


@pytest.mark.question("q4 clean_folder", points=2)
def test_clean_folder_accounts_balance(student, rng):
    "The accounts: kept + dropped per reason == input, in documents and in file bytes, and equal to the pipeline's."
    folder = _messy_folder(rng)
    got, want = student.clean_folder(str(folder)), _reference(folder)
    a = got["accounts"]
    for unit in ("docs", "bytes"):
        dropped = sum(cell[unit] for cell in a["dropped"].values())
        assert a["kept"][unit] + dropped == a["input"][unit], f"{unit}: kept {a['kept'][unit]} + dropped {dropped} != input {a['input'][unit]}"
    assert a["input"] == want["accounts"]["input"], f"input {a['input']}, the folder holds {want['accounts']['input']}"
    assert a["kept"] == want["accounts"]["kept"] and a["dropped"] == want["accounts"]["dropped"], (a, want["accounts"])


@pytest.mark.question("q4 clean_folder", points=1)
def test_clean_folder_thresholds(student, rng):
    "The near-duplicate threshold is honoured: the same folder at a low and a high threshold."
    for _ in range(8):   # a folder where the two thresholds drop different documents, so ignoring the threshold shows
        folder = _messy_folder(rng, 24)
        want = {t: _reference(folder, t) for t in (0.5, 0.95)}
        if want[0.5]["dropped"] != want[0.95]["dropped"]: break
    for threshold in (0.5, 0.95):
        _check_outcomes(student.clean_folder(str(folder), threshold), want[threshold])


@pytest.mark.question("q5 experiment", points=2)
def test_threshold_sweep(student, rng):
    folder, thresholds = _messy_folder(rng, 24), [0.5, 0.95]
    out = Path.cwd() / f"sweep-{rng.integers(1 << 40):x}"
    result = student.threshold_sweep(str(folder), thresholds, str(out))
    written = out / "threshold_sweep.json"
    assert written.is_file(), "threshold_sweep wrote no threshold_sweep.json in out_dir"
    assert (out / "threshold_sweep.png").is_file() and (out / "threshold_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "no PNG plot in out_dir"
    numbers = json.loads(written.read_text())
    assert numbers == json.loads(json.dumps(result)), "the JSON file and the returned dict differ"
    assert list(numbers["thresholds"]) == thresholds and len(numbers["kept_fraction"]) == len(numbers["near_duplicates"]) == len(thresholds), numbers
    assert all(0.0 <= f <= 1.0 for f in numbers["kept_fraction"]), numbers["kept_fraction"]
    for t, fraction, near in zip(thresholds, numbers["kept_fraction"], numbers["near_duplicates"]):
        want = _reference(folder, t)
        assert fraction == pytest.approx(want["accounts"]["kept"]["docs"] / want["accounts"]["input"]["docs"]), (t, fraction)
        assert sorted(near) == sorted(n for n, r in want["dropped"].items() if r == "near_dedup:near_duplicate"), t
