"""Chapter 7 benchmark: the paged engine behind the OpenAI-compatible server, over HTTP on loopback.

1. Continuous batching vs one request at a time (the same server with max_num_seqs=1) at 1, 4, 16 and 64
   concurrent streaming clients: generated tokens/s and percentiles of time to first token (TTFT) and of the gap
   between SSE events (ITL; a client that falls behind gets several tokens per event, so tokens/event is printed too).
   Each level sends 8 requests per client (at most 128; --per-client, --max-requests), so most of a run is spent at
   that concurrency rather than draining its last, longest requests; --seed draws another set of requests.
   Two request mixes, the same requests for both modes: "short" (prompts 16-128 tokens, outputs 16-48: prompts
   dominate) and "chat" (prompts 16-128, outputs 48-240: outputs twice the prompt on average, as in chat logs).
2. Prefix caching on vs off: requests that share a 512-token system prompt, one at a time; TTFT.
3. Memory: the paged pool's peak use at the highest level vs a contiguous cache of max_seq_len per request, and the
   same peak in a pool of each of chapter 6's quantised schemes: int8/int4, zp4 and mx8/mx4 (per-token statistics)
   and KIVI-4/KIVI-2 (keys per channel over each block; the partly filled last block of each sequence in float rows,
   counted at their peak), in bytes.
Also in process, no HTTP: the engine alone on the highest level's requests, and decode steps alone at batch 1 and c,
timed in CPU time (time.process_time), which other load on a shared machine moves far less than wall time.

The model is the cpu-1m shape with a 1,024-token context, untrained (speed does not depend on the weights);
byte-level tokens, no stop tokens, so every request runs to its max_tokens. The load generator (httpx streaming
clients) runs in a process of its own, as vLLM's and LMDeploy's serving benchmarks run theirs, so it does not share
the server's GIL (`--client thread` puts it back in the server's process).

    python benchmarks/bench_serving.py [--levels 1,4,16,64] [--mix short,chat] [--repeats 3] [--kv-scheme fp] [--out nbs/images/serving]
With --repeats R each load level runs R times and the table shows the median tokens/s (and the load average
of the machine before and after, since wall-clock figures on a shared machine move with it).
Prints tables, then one line of JSON; with --out, writes OUT.json and OUT.png (throughput and TTFT against concurrency).
"""
import argparse
import asyncio
import json
import multiprocessing
import os
import random
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
import uvicorn

from course_lib.engine import EngineConfig, LLMEngine, PagedKVCache, SamplingParams
from course_lib.inference import KV_SCHEMES
from course_lib.model import Decoder, get_config
from course_lib.serve import create_app, tune_malloc
from course_lib.tokenizer import Tokenizer


def start_server(model, tokenizer, engine_process=True, **engine_args):
    "Serve on a free loopback port in a thread, the engine in a process of its own or on a thread; returns (url, stop function)."
    engine = LLMEngine(model, EngineConfig(**engine_args))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    app = create_app(engine, tokenizer, "bench", engine_process=engine_process)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True); thread.start()
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200: break
        except httpx.HTTPError: time.sleep(0.05)
    def stop():
        server.should_exit = True; thread.join(timeout=10)
    return url, stop


def server_counters(url, engine_process):
    "(generated tokens, engine steps, CPU seconds of the server's processes: this one, plus the engine's if it has its own)."
    m = httpx.get(url + "/metrics").json()
    return m["generated_tokens"], m["steps"], time.process_time() + (m["engine_process_cpu_s"] if engine_process else 0.0)


def peak_use(model, requests, concurrency, kv_scheme):
    "The pool's peak blocks (and partly filled blocks: KIVI's float rows) serving `requests` with up to `concurrency` at once."
    engine = LLMEngine(model, EngineConfig(num_blocks=1024, block_size=16, max_num_seqs=concurrency, max_num_batched_tokens=1024,
                                           enable_prefix_caching=False, kv_scheme=kv_scheme))
    peak, bs = {"blocks": 0, "partial": 0}, engine.bm.block_size
    for prompt, n in requests: engine.add_request(prompt, SamplingParams(max_tokens=n))
    while engine.has_unfinished():
        engine.step(); peak["blocks"] = max(peak["blocks"], engine.bm.num_used)
        partial = {s.block_table[s.num_computed // bs] for s in engine.scheduler.running if s.num_computed % bs}
        peak["partial"] = max(peak["partial"], len(partial))
    return peak, engine.cache.nbytes // engine.bm.num_blocks


def peak_bytes_by_scheme(model, peak: dict) -> dict:
    "The peak's blocks (of 16 tokens) stored in each scheme, counted; KIVI adds a float row, an fp block's bytes, per partly filled block."
    block = {kv: PagedKVCache(model, 1, 16, kv).nbytes for kv in KV_SCHEMES}
    return {kv: peak["blocks"] * b + (peak["partial"] * block["fp"] if kv.startswith("kivi") else 0) for kv, b in block.items()}


async def one_request(client, url, prompt, max_tokens):
    "Stream one completion; (TTFT, gaps between SSE events, events)."
    start = time.perf_counter(); times = []
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    async with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]": times.append(time.perf_counter())
    return times[0] - start, list(np.diff(times)), len(times)


async def run_load(url, requests, concurrency):
    "Send `requests` with at most `concurrency` in flight; wall time, TTFTs, gaps between events and the number of events."
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def limited(prompt, n):
            async with sem: return await one_request(client, url, prompt, n)
        start = time.perf_counter()
        results = await asyncio.gather(*(limited(p, n) for p, n in requests))
    return time.perf_counter() - start, [r[0] for r in results], [g for r in results for g in r[1]], sum(r[2] for r in results)


def _client_loop(jobs):
    "The load generator's process: run each (url, requests, concurrency) job sent down the pipe and send back its result."
    while (job := jobs.recv()) is not None: jobs.send(asyncio.run(run_load(*job)))


class LoadGenerator:
    "The streaming clients, in a process of their own (as vLLM's and LMDeploy's serving benchmarks run theirs), or in this one."
    def __init__(self, separate_process: bool = True):
        self.pipe = None
        if separate_process:
            self.pipe, child = multiprocessing.get_context("spawn").Pipe()
            self.process = multiprocessing.get_context("spawn").Process(target=_client_loop, args=(child,), daemon=True)
            self.process.start()

    def run(self, url, requests, concurrency):
        "(wall s, TTFTs, gaps between events, events) of one load run."
        if self.pipe is None: return asyncio.run(run_load(url, requests, concurrency))
        self.pipe.send((url, requests, concurrency)); return self.pipe.recv()

    def close(self):
        if self.pipe is not None: self.pipe.send(None); self.process.join(timeout=10)


MIXES = {                                                               # name: (prompt tokens, output tokens), uniform ranges
    "short": ((16, 128), (16, 48)),                                     # outputs shorter than prompts (means 72 and 32)
    # outputs twice as long as prompts on average (means 72 and 144), as in chat logs: the vLLM paper (Fig. 11) gives
    # means of 161 prompt / 338 output tokens for ShareGPT and 19 / 58 for Alpaca
    "chat": ((16, 128), (48, 240)),
}


def make_requests(rng, mix, count):
    "`count` (prompt ids, max_tokens) pairs of a mix, random byte prompts."
    (p_lo, p_hi), (o_lo, o_hi) = MIXES[mix]
    return [([rng.randrange(256) for _ in range(rng.randint(p_lo, p_hi))], rng.randint(o_lo, o_hi)) for _ in range(count)]


def plot(result: dict, png: Path):
    "Generated tokens/s and median TTFT against concurrent clients, each mix in each mode."
    from matplotlib.figure import Figure
    fig = Figure(figsize=(9, 3.6)); tput, ttft = fig.subplots(1, 2)
    for color, (mix, modes) in enumerate(result["levels"].items()):
        for mode, by_level in modes.items():
            levels = sorted(by_level)
            style = dict(marker="o", color=f"C{color}", ls="-" if mode == "continuous batching" else "--", label=f"{mix}, {mode}")
            tput.plot(levels, [by_level[c]["tokens_per_s"] for c in levels], **style)
            ttft.plot(levels, [by_level[c]["ttft_p50_ms"] for c in levels], **style)
    for ax, label in ((tput, "generated tokens/s"), (ttft, "time to first token, p50 (ms)")):
        ax.set_xscale("log", base=2); ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent streaming clients"); ax.set_ylabel(label); ax.grid(alpha=0.3)
    ttft.set_yscale("log"); tput.legend(fontsize=7)
    fig.suptitle(f"Serving over HTTP: continuous batching vs one request at a time (engine in a {result['engine']})", fontsize=9)
    fig.tight_layout(); fig.savefig(png, dpi=110)


def pct(values, q): return float(np.percentile(values, q) * 1000) if values else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--levels", default="1,4,16,64")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prefix-requests", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per load level; the median tokens/s is reported")
    ap.add_argument("--kv-scheme", default="fp", choices=KV_SCHEMES, help="how the KV pool stores K/V (chapter 6's schemes)")
    ap.add_argument("--mix", default="short,chat", help=f"request mixes, comma-separated: {', '.join(MIXES)}")
    ap.add_argument("--engine", default="process", choices=["process", "thread"],
                    help="where the server's engine steps: a process of its own (as `camp serve` and vLLM run it) or a thread of the server's")
    ap.add_argument("--client", default="process", choices=["process", "thread"],
                    help="where the load generator runs: its own process, or a thread of the server's (one GIL for both)")
    ap.add_argument("--out", help="writes OUT.json and OUT.png, e.g. nbs/images/serving")
    ap.add_argument("--per-client", type=int, default=8, help="requests per concurrent client at each level (at least 8 in all)")
    ap.add_argument("--max-requests", type=int, default=128, help="at most this many requests at a level")
    ap.add_argument("--seed", type=int, default=0, help="seed of the request draw")
    args = ap.parse_args()
    load = LoadGenerator(separate_process=args.client == "process")
    if args.threads: torch.set_num_threads(args.threads)
    tune_malloc()                                                       # as the engine process does: the in-process lines measure the same engine
    torch.manual_seed(0); rng = random.Random(args.seed)
    cfg = get_config("cpu-1m", vocab_size=256, max_seq_len=1024)
    model = Decoder(cfg).to(args.device).eval()
    tokenizer = Tokenizer({i: bytes([i]) for i in range(256)}, [])    # bytes; no special tokens, so no early stops
    levels, mixes = [int(x) for x in args.levels.split(",")], args.mix.split(",")
    if unknown := set(mixes) - set(MIXES): raise SystemExit(f"unknown request mix {unknown}; mixes: {', '.join(MIXES)}")
    # the same requests for both modes: drawn once per (mix, level)
    # subtle: enough requests per client that most of a run is spent at the level's concurrency, not draining its last ones
    requests = {(mix, c): make_requests(rng, mix, max(8, min(args.per_client * c, args.max_requests))) for mix in mixes for c in levels}
    in_process = args.engine == "process"
    result = {"levels": {}, "kv_scheme": args.kv_scheme, "repeats": args.repeats, "client": args.client, "engine": args.engine,
              "load_average_before": os.getloadavg()[0]}
    print(f"model cpu-1m shape, context 1024, device {args.device}, torch threads {torch.get_num_threads()}, "
          f"KV {args.kv_scheme}, repeats {args.repeats}, engine in a {args.engine}, clients in a {args.client}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'mix':<7}{'mode':<22}{'conc':>5}{'reqs':>6}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p95':>10}{'ITL p50':>9}{'ITL p95':>9}"
          f"{'passes':>8}{'tok/event':>10}{'CPU/tok':>8}")
    print("(ms; passes = engine steps; ITL = gap between SSE events; CPU/tok = the server process's CPU time per generated "
          "token in µs, all its threads and the engine's process: less moved by other load on the machine than wall-clock figures)")
    for mode, max_seqs in (("continuous batching", 64), ("one at a time", 1)):
        url, stop = start_server(model, tokenizer, in_process, num_blocks=1024, block_size=16, max_num_seqs=max_seqs,
                                         max_num_batched_tokens=1024, enable_prefix_caching=False, kv_scheme=args.kv_scheme)
        load.run(url, [([1] * 32, 8)] * 2, 2)                          # warm up
        for mix in mixes:
            for c in levels:
                runs = []
                for _ in range(args.repeats):                           # the same requests each time
                    before = server_counters(url, in_process)
                    wall, ttft, itl, events = load.run(url, requests[mix, c], c)
                    tokens, steps, cpu = (b - a for a, b in zip(before, server_counters(url, in_process)))
                    runs.append((tokens / wall, ttft, itl, steps, tokens / events, cpu / tokens * 1e6))
                tps, ttft, itl, steps, per_event, cpu_us = sorted(runs, key=lambda r: r[0])[len(runs) // 2]   # the median run by tokens/s
                print(f"{mix:<7}{mode:<22}{c:>5}{len(requests[mix, c]):>6}{tps:>9.0f}{pct(ttft, 50):>10.1f}{pct(ttft, 95):>10.1f}"
                      f"{pct(itl, 50):>9.1f}{pct(itl, 95):>9.1f}{steps:>8}{per_event:>10.2f}{cpu_us:>8.0f}")
                result["levels"].setdefault(mix, {}).setdefault(mode, {})[c] = {
                    "tokens_per_s": round(tps, 1), "ttft_p50_ms": round(pct(ttft, 50), 1), "ttft_p95_ms": round(pct(ttft, 95), 1),
                    "itl_p50_ms": round(pct(itl, 50), 2), "itl_p95_ms": round(pct(itl, 95), 2), "steps": steps,
                    "tokens_per_event": round(per_event, 2), "server_cpu_us_per_token": round(cpu_us)}
        stop()
    result["speedup"] = {mix: {c: round(result["levels"][mix]["continuous batching"][c]["tokens_per_s"] /
                                        result["levels"][mix]["one at a time"][c]["tokens_per_s"], 2) for c in levels} for mix in mixes}
    for mix in mixes:
        for c in levels:
            print(f"{mix} mix, throughput at {c:>2} concurrent: continuous batching / one at a time = {result['speedup'][mix][c]:.2f}x")
    # the engine alone, no HTTP: the same requests of the highest level through LLMEngine.generate in this thread,
    # all at once vs one at a time; what the HTTP path (uvicorn, SSE, the GIL shared by the server's threads) adds is the difference
    c, result["engine_alone"] = max(levels), {}
    for mix in mixes:
        alone = {}
        for mode, max_seqs in (("continuous batching", c), ("one at a time", 1)):
            engine = LLMEngine(model, EngineConfig(num_blocks=1024, block_size=16, max_num_seqs=max_seqs, max_num_batched_tokens=1024,
                                                   enable_prefix_caching=False, kv_scheme=args.kv_scheme))
            start = time.process_time()
            engine.generate([p for p, _ in requests[mix, c]], [SamplingParams(max_tokens=n) for _, n in requests[mix, c]])
            alone[mode] = engine.stats["generated_tokens"] / (time.process_time() - start)
        print(f"{mix} mix, engine alone (no HTTP, CPU time), {len(requests[mix, c])} requests: {alone['continuous batching']:.0f} tokens/s "
              f"with up to {c} at once, {alone['one at a time']:.0f} one at a time ({alone['continuous batching'] / alone['one at a time']:.2f}x)")
        result["engine_alone"][mix] = {"concurrency": c, **{k: round(v, 1) for k, v in alone.items()},
                                       "ratio": round(alone["continuous batching"] / alone["one at a time"], 2)}
    # decode steps alone: c (or 1) sequences admitted and prefilled, then 40 timed engine.step() calls
    step_ms = {}
    for b in (1, c):
        engine = LLMEngine(model, EngineConfig(num_blocks=1024, block_size=16, max_num_seqs=64, max_num_batched_tokens=4096,
                                               enable_prefix_caching=False, kv_scheme=args.kv_scheme))
        for prompt, _ in requests[mixes[0], c][:b]: engine.add_request(prompt, SamplingParams(max_tokens=200))
        for _ in range(4): engine.step()                                # the prefill, then warm-up decodes
        start = time.process_time()
        for _ in range(40): engine.step()
        step_ms[b] = (time.process_time() - start) / 40 * 1000
    print(f"decode step alone (CPU time): {step_ms[1]:.2f} ms at batch 1, {step_ms[c]:.2f} ms at batch {c} "
          f"({c * step_ms[1] / step_ms[c]:.2f}x the tokens/s)")
    result["decode_step_ms"] = {b: round(v, 2) for b, v in step_ms.items()}
    c, mix = max(levels), mixes[0]                                      # memory: the pool's peak at the highest level, counted
    peak, block_bytes = peak_use(model, requests[mix, c], c, args.kv_scheme)
    contiguous = c * cfg.max_seq_len * block_bytes // 16
    result["memory"] = {"mix": mix, "concurrency": c, "paged_peak_bytes": peak["blocks"] * block_bytes, "contiguous_bytes": contiguous,
                        "ratio": round(contiguous / (peak["blocks"] * block_bytes), 2), "peak_blocks": peak["blocks"],
                        "peak_partial_blocks": peak["partial"], "peak_bytes_by_scheme": peak_bytes_by_scheme(model, peak)}
    m = result["memory"]
    if m: print(f"KV memory at {m['concurrency']} concurrent: paged peak {m['paged_peak_bytes'] / 2**20:.1f} MiB, contiguous "
                f"max-length {m['contiguous_bytes'] / 2**20:.1f} MiB ({m['ratio']}x)")
    if m:
        by = m["peak_bytes_by_scheme"]
        print(f"the same peak of {m['peak_blocks']} blocks ({m['peak_partial_blocks']} partly filled: KIVI's float rows) stored as " +
              ", ".join(f"{kv} {b / 2**20:.2f} MiB ({by['fp'] / b:.2f}x less than fp)" for kv, b in by.items()))
    # prefix caching: a shared 512-token system prompt, requests one at a time
    system = [rng.randrange(256) for _ in range(512)]
    prompts = [system + [rng.randrange(256) for _ in range(16)] for _ in range(args.prefix_requests + 1)]
    ttfts = {}
    for name, on in (("prefix caching on", True), ("prefix caching off", False)):
        url, stop = start_server(model, tokenizer, in_process, num_blocks=512, block_size=16, max_num_seqs=16,
                                         max_num_batched_tokens=1024, enable_prefix_caching=on, kv_scheme=args.kv_scheme)
        load.run(url, [(prompts[0], 2)], 1)                             # the first request fills the cache
        _, ttft, _, _ = load.run(url, [(p, 2) for p in prompts[1:]], 1)
        ttfts[name] = ttft; stop()
    on, off = np.median(ttfts["prefix caching on"]) * 1000, np.median(ttfts["prefix caching off"]) * 1000
    print(f"TTFT with a shared 512-token system prompt: on {on:.1f} ms, off {off:.1f} ms ({off / on:.2f}x lower)")
    result["prefix_caching"] = {"ttft_on_ms": round(on, 1), "ttft_off_ms": round(off, 1), "ratio": round(off / on, 2)}
    load.close()
    result["load_average_after"] = os.getloadavg()[0]
    print(json.dumps(result))
    if args.out:
        out = Path(args.out); out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1))
        plot(result, out.with_suffix(".png")); print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
