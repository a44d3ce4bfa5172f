"""Chapter 8 benchmark: MCQ log-likelihood scoring, items/s, ours batched vs one at a time vs over HTTP (chapter 7's
server, prompt logprobs, 8 requests in flight) vs lm-evaluation-harness's hf back end on the same exported model and the
same requests; HumanEval sandbox throughput (problems/s, 2 workers).

    python benchmarks/bench_eval.py [--items 40] [--problems 20]
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def build_model(folder: Path):
    from course_lib.model import Decoder, export_hf, get_config
    from course_lib.tokenizer import DEFAULT_SPECIALS, EOT, Tokenizer, save_hf, train_bpe
    vocab, merges = train_bpe([open(json.__file__).read() + open(argparse.__file__).read()], 512, special_tokens=DEFAULT_SPECIALS, processes=1)
    tok = Tokenizer(vocab, merges, list(DEFAULT_SPECIALS))
    torch.manual_seed(0)
    model = Decoder(get_config("cpu-1m", vocab_size=tok.vocab_size, max_seq_len=256)).eval()
    save_hf(tok, folder / "tok")
    return export_hf(model, folder / "model", tokenizer=folder / "tok", eos_id=tok.special_tokens[EOT])


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=40)
    ap.add_argument("--problems", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(2)
    from course_lib.eval import CourseLM, cloze_task, mcq_prompt
    from course_lib.evalsuite import code_scores, execute, humaneval_problems
    folder = Path(tempfile.mkdtemp())
    model_dir = build_model(folder)
    task = cloze_task(args.items, seed=1)
    requests = [(mcq_prompt(it)[0], c) for it in task.items for c in mcq_prompt(it)[1]]
    rows = {}
    ours = CourseLM.from_dir(model_dir, batch_size=16)
    ours.loglikelihood(requests[:8])                                      # warm up
    lp_batched, t = timed(lambda: ours.loglikelihood(requests)); rows["ours, batch 16"] = t
    ours.batch_size = 1
    _, t = timed(lambda: ours.loglikelihood(requests)); rows["ours, one at a time"] = t
    from course_lib.engine import LLMEngine
    from course_lib.eval import OpenAILM
    from course_lib.serve import create_app, load_for_serving, serve_in_thread
    served, tok, eos = load_for_serving(model_dir)
    url, stop = serve_in_thread(create_app(LLMEngine(served, num_blocks=512, block_size=16, max_num_batched_tokens=1024), tok, "m", eos_ids=eos))
    try:
        remote = OpenAILM(url, "m", concurrency=8, max_length=256)
        remote.loglikelihood(requests[:8])
        lp_remote, t = timed(lambda: remote.loglikelihood(requests)); rows["ours over HTTP, 8 in flight"] = t
    finally: stop()
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    peer = HFLM(pretrained=str(model_dir), dtype="float32", batch_size=16, device="cpu")
    inst = [Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i) for i, r in enumerate(requests)]
    peer.loglikelihood(inst[:8], disable_tqdm=True)
    lp_peer, t = timed(lambda: peer.loglikelihood(inst, disable_tqdm=True)); rows["lm-eval hf, batch 16"] = t
    diff = max(abs(a[0] - b[0]) for a, b in zip(lp_batched, lp_peer))
    diff_http = max(abs(a[0] - b[0]) for a, b in zip(lp_remote, lp_batched))
    items = len(task.items)
    print(f"MCQ log-likelihood scoring: {items} items, {len(requests)} requests, max |ours - lm-eval| = {diff:.2e}, "
          f"max |over HTTP - in process| = {diff_http:.2e}")
    print(f"{'back end':<30}{'items/s':>10}{'vs lm-eval':>12}")
    for name, t in rows.items():
        print(f"{name:<30}{items / t:>10.1f}{rows['lm-eval hf, batch 16'] / t:>11.2f}x")
    problems = humaneval_problems(args.problems).items
    result, t_code = timed(lambda: execute(problems, [[p["canonical_solution"]] for p in problems], workers=2))
    print(f"HumanEval sandbox: {len(problems)} canonical solutions, 2 workers: {len(problems) / t_code:.2f} problems/s, "
          f"pass@1 = {code_scores(result)['pass@1']:.3f}")
    print(json.dumps({"bench": "eval", "items": items, "items_per_s": {k: round(items / t, 2) for k, t in rows.items()},
                      "batched_vs_lm_eval": round(rows["lm-eval hf, batch 16"] / rows["ours, batch 16"], 3),
                      "max_abs_diff": diff, "max_abs_diff_http": diff_http, "humaneval_problems_per_s": round(len(problems) / t_code, 3)}))


if __name__ == "__main__":
    main()
