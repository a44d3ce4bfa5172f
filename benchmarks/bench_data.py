"""Chapter 1 benchmark: the cleaning pipeline's throughput with 1 and 2 processes, and our MinHash-LSH vs
datasketch's MinHash + MinHashLSH on the same shingles (speed on the real corpus; recall and precision on
planted near-duplicates against exact Jaccard, and candidate/flag rates over a grid of Jaccard 0.5-1.0
against the theoretical S-curve).

    .venv/bin/python benchmarks/bench_data.py                  # whole embedded corpus (~32 MB)
    .venv/bin/python benchmarks/bench_data.py --max-bytes 4000000
    .venv/bin/python benchmarks/bench_data.py --grid-only      # only the near-threshold grid (seconds)

Prints a table with ratios and ends with one line of JSON.
"""
import argparse
import json
import os
import random
import sys
import tempfile
import time

os.environ.setdefault("CAMP_PROGRESS", "0")
import numpy as np

from course_lib.core import embedded_corpus, human_bytes
from course_lib.data import (CleanConfig, MinHasher, candidate_probability, clean_corpus, language_identifier, lsh_params,
                             near_duplicate_clusters, normalise, pair_rates, planted_pairs, shingles)


def pipeline(docs, workers):
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        stats = clean_corpus(docs, tmp, CleanConfig(), workers=workers)
        seconds = time.perf_counter() - start
    n_bytes = stats["input"]["bytes"]
    return {"workers": workers, "docs": stats["input"]["docs"], "kept": stats["kept"]["docs"], "seconds": round(seconds, 2),
            "docs_per_s": round(stats["input"]["docs"] / seconds, 1), "mb_per_s": round(n_bytes / 1e6 / seconds, 2)}


def ours_lsh(shingle_sets, threshold, num_perm):
    start = time.perf_counter()
    hasher = MinHasher(num_perm, seed=1)
    sigs = np.stack([hasher.signature(s) for s in shingle_sets])          # (n, num_perm)
    t_sig = time.perf_counter() - start
    _, verified = near_duplicate_clusters(sigs, threshold)
    return {(i, j) for i, j, _ in verified}, t_sig, time.perf_counter() - start


def datasketch_lsh(shingle_sets, threshold, num_perm):
    from datasketch import MinHash, MinHashLSH
    start = time.perf_counter()
    mhs = []
    for s in shingle_sets:
        m = MinHash(num_perm=num_perm, seed=1, hashfunc=int)
        m.update_batch(s.tolist())
        mhs.append(m)
    t_sig = time.perf_counter() - start
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, params=lsh_params(threshold, num_perm))  # same bands
    for i, m in enumerate(mhs): lsh.insert(i, m)
    pairs = set()
    for i, m in enumerate(mhs):
        for j in lsh.query(m):
            if j > i and m.jaccard(mhs[j]) >= threshold: pairs.add((i, j))  # verify candidates, as ours does
    return pairs, t_sig, time.perf_counter() - start


def planted(seed=0, n_base=400, words=200):
    "Random documents with lightly edited copies (true near-duplicates) and heavily edited ones (not)."
    rng = random.Random(seed); vocab = [f"w{i}" for i in range(5000)]; docs = []
    def edit(ws, k):
        ws = list(ws)
        for _ in range(k): ws[rng.randrange(len(ws))] = rng.choice(vocab)
        return ws
    for _ in range(n_base):
        base = [rng.choice(vocab) for _ in range(words)]; docs.append(base)
        r = rng.random()
        if r < 0.5: docs += [edit(base, rng.randint(0, 1)) for _ in range(rng.randint(1, 2))]
        elif r < 0.75: docs.append(edit(base, 20))
    rng.shuffle(docs)
    return [" ".join(d) for d in docs]


def datasketch_rates(pairs, threshold, num_perm):
    "datasketch's MinHashLSH (same bands and rows) on each planted pair: candidate, and flagged after the exact check."
    from datasketch import MinHash, MinHashLSH
    candidate, flagged = [], []
    params = lsh_params(threshold, num_perm)
    for a, b, _ in pairs:
        ma, mb = MinHash(num_perm=num_perm, seed=1, hashfunc=int), MinHash(num_perm=num_perm, seed=1, hashfunc=int)
        ma.update_batch(a.tolist())
        mb.update_batch(b.tolist())
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, params=params)
        lsh.insert("a", ma)
        is_candidate = "a" in lsh.query(mb)
        candidate.append(is_candidate)
        flagged.append(is_candidate and ma.jaccard(mb) >= threshold)
    return {"jaccard": np.array([j for _, _, j in pairs]), "candidate": np.array(candidate), "flagged": np.array(flagged)}


def grid(threshold, num_perm, pairs_per_level=200):
    "Candidate and flag rates per planted Jaccard level, recall and precision at the threshold, ours and datasketch's."
    levels = np.round(np.arange(0.5, 1.0001, 0.05), 2)
    pairs = planted_pairs(levels, pairs_per_level=pairs_per_level, set_size=200, seed=0)
    bands, rows = lsh_params(threshold, num_perm)
    results, timings = {}, {}
    for name, fn in (("ours", lambda: pair_rates(pairs, threshold, num_perm)),
                     ("datasketch", lambda: datasketch_rates(pairs, threshold, num_perm))):
        start = time.perf_counter()
        rates = fn()
        timings[name] = time.perf_counter() - start
        jac, truth = rates["jaccard"], rates["jaccard"] >= threshold - 1e-9
        per_level = [{"jaccard": float(lv), "candidate": float(rates["candidate"][np.isclose(jac, lv, atol=0.01)].mean()),
                      "flagged": float(rates["flagged"][np.isclose(jac, lv, atol=0.01)].mean())} for lv in levels]
        true_flags = (rates["flagged"] & truth).sum()
        results[name] = {"recall": round(float(true_flags / truth.sum()), 4),
                         "precision": round(float(true_flags / max(rates["flagged"].sum(), 1)), 4),
                         "levels": per_level, "seconds": round(timings[name], 2)}
    print(f"\nNear-threshold grid: {pairs_per_level} planted pairs per Jaccard level, threshold {threshold}, "
          f"{num_perm} permutations, {bands} bands x {rows} rows")
    print("| Jaccard | S-curve | ours candidate | ours flagged | datasketch candidate | datasketch flagged |\n|---|---|---|---|---|---|")
    for o, d in zip(results["ours"]["levels"], results["datasketch"]["levels"]):
        print(f"| {o['jaccard']:.2f} | {candidate_probability(o['jaccard'], bands, rows):.3f} | {o['candidate']:.3f} | "
              f"{o['flagged']:.3f} | {d['candidate']:.3f} | {d['flagged']:.3f} |")
    for name in ("ours", "datasketch"):
        r = results[name]
        print(f"{name}: recall {r['recall']}, precision {r['precision']} at Jaccard >= {threshold}; {r['seconds']} s")
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-bytes", type=int, default=0, help="corpus slice (0 = the whole embedded corpus)")
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--num-perm", type=int, default=128)
    parser.add_argument("--grid-only", action="store_true", help="only the near-threshold grid, not the corpus runs")
    args = parser.parse_args()
    near = grid(args.threshold, args.num_perm)
    if args.grid_only:
        print(json.dumps({"bench": "data", "grid": {k: {m: v[m] for m in ("recall", "precision", "seconds")} for k, v in near.items()}}))
        return
    docs = list(embedded_corpus(max_bytes=args.max_bytes or None))
    size = sum(d["meta"]["bytes"] for d in docs)
    print(f"corpus: {len(docs)} documents, {human_bytes(size)}; {os.cpu_count()} CPUs", flush=True)

    language_identifier()  # load langid's model (~2 s) before timing, so both runs start warm
    runs = [pipeline(docs, w) for w in (1, 2)]
    print("\n| pipeline | docs | kept | seconds | docs/s | MB/s |\n|---|---|---|---|---|---|")
    for r in runs: print(f"| {r['workers']} process(es) | {r['docs']} | {r['kept']} | {r['seconds']} | {r['docs_per_s']} | {r['mb_per_s']} |")
    speedup = runs[0]["seconds"] / runs[1]["seconds"]
    print(f"2 processes vs 1: {speedup:.2f}x")

    cfg = CleanConfig()
    texts = [normalise(d, cfg)["text"] for d in docs if d["text"].strip()]
    sets = [shingles(t) for t in texts]
    n_shingles = sum(len(s) for s in sets)
    ours_pairs, ours_sig, ours_total = ours_lsh(sets, args.threshold, args.num_perm)
    ds_pairs, ds_sig, ds_total = datasketch_lsh(sets, args.threshold, args.num_perm)
    agree = len(ours_pairs & ds_pairs) / max(len(ours_pairs | ds_pairs), 1)

    ptexts = planted()
    psets = [shingles(t) for t in ptexts]
    py = [set(s.tolist()) for s in psets]
    truth = {(i, j) for i in range(len(py)) for j in range(i + 1, len(py)) if len(py[i] & py[j]) / len(py[i] | py[j]) >= args.threshold}
    quality = {}
    for name, fn in (("ours", ours_lsh), ("datasketch", datasketch_lsh)):
        found = fn(psets, args.threshold, args.num_perm)[0]
        quality[name] = {"recall": round(len(found & truth) / len(truth), 4), "precision": round(len(found & truth) / max(len(found), 1), 4)}

    print(f"\nMinHash-LSH on the corpus's shingles: {len(sets)} documents, {n_shingles:,} shingles, threshold {args.threshold}, "
          f"{args.num_perm} permutations, bands x rows = {lsh_params(args.threshold, args.num_perm)}")
    print("| | signatures s | total s | pairs found | planted recall | planted precision |\n|---|---|---|---|---|---|")
    print(f"| ours (NumPy) | {ours_sig:.2f} | {ours_total:.2f} | {len(ours_pairs)} | {quality['ours']['recall']} | {quality['ours']['precision']} |")
    print(f"| datasketch | {ds_sig:.2f} | {ds_total:.2f} | {len(ds_pairs)} | {quality['datasketch']['recall']} | {quality['datasketch']['precision']} |")
    print(f"datasketch / ours time: {ds_total / ours_total:.2f}x; pair sets agree on {agree:.1%} (different random permutations)")
    print(f"planted set: {len(ptexts)} documents, {len(truth)} true pairs (exact Jaccard >= {args.threshold})")

    print(json.dumps({"bench": "data", "corpus_docs": len(docs), "corpus_bytes": size, "pipeline": runs,
                      "speedup_2_vs_1": round(speedup, 3),
                      "lsh": {"ours_s": round(ours_total, 3), "datasketch_s": round(ds_total, 3),
                              "datasketch_over_ours": round(ds_total / ours_total, 3), "pair_agreement": round(agree, 4),
                              "planted": quality, "docs": len(sets), "shingles": n_shingles},
                      "grid": {k: {m: v[m] for m in ("recall", "precision", "seconds")} for k, v in near.items()}}))


if __name__ == "__main__":
    sys.exit(main())
