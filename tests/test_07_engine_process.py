"""Chapter 7's server with the engine in a process of its own (`create_app(..., engine_process=True)`, what `camp serve`
runs): the same answers as the engine on its own, cancels that free blocks in the other process, the engine's death
reported as a 503 instead of a hang, a clean shutdown; and `tune_malloc`, measured in page faults."""
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

from course_lib.engine import LLMEngine, SamplingParams
from course_lib.serve import EngineCore, chat_prompt, create_app, serve_in_thread
from test_07_serve import _greedy, concurrent_streaming_chats   # _greedy: a fresh engine in this process
from tiny import tiny_chat_model

KEY = "process-key"


@pytest.fixture(scope="module")
def server():
    model, tok = tiny_chat_model()
    engine = LLMEngine(model, num_blocks=128, block_size=8, max_num_seqs=64, max_num_batched_tokens=512)
    app = create_app(engine, tok, "tiny", api_key=KEY, engine_process=True)
    url, stop = serve_in_thread(app)
    yield {"url": url, "tok": tok, "model": model, "runner": app.state.engine}
    stop()


@pytest.fixture
def client(server):
    yield openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)
    _assert_no_leak(server["url"])


def _assert_no_leak(url: str, timeout: float = 10.0):
    "Every KV block back in the engine process's pool and no request left there, within `timeout`."
    deadline = time.time() + timeout
    while True:
        m = httpx.get(url + "/metrics").json()
        if m["kv_blocks_used"] == 0 and m["running"] == m["waiting"] == 0: return
        assert time.time() < deadline, m
        time.sleep(0.02)


def test_the_engine_steps_in_another_process(server):
    runner = server["runner"]
    assert runner.process.is_alive() and runner.process.pid != os.getpid()


def test_completion_and_chat_stream_equal_engine_greedy(client, server):
    tok = server["tok"]
    got = client.completions.create(model="tiny", prompt="def main():", max_tokens=10, temperature=0)
    assert got.choices[0].text == tok.decode(_greedy(server, tok.encode("def main():"), 10))
    messages = [{"role": "user", "content": "hello there"}]
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=12, temperature=0, stream=True) if c.choices)
    prompt = tok.encode(chat_prompt(messages))
    assert streamed == tok.decode(_greedy(server, prompt, 12))


def test_prompt_logprobs_equal_the_engine_on_a_thread(client, server):
    "echo + logprobs run on the engine's side (`AsyncEngine.call`, pickled to the process): the same numbers as in-thread."
    kw = dict(model="tiny", prompt="import json", max_tokens=0, echo=True, logprobs=2)
    remote = client.completions.create(**kw).choices[0].logprobs
    engine = LLMEngine(server["model"], num_blocks=64, block_size=8)
    url, stop = serve_in_thread(create_app(engine, server["tok"], "tiny"))
    try: local = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0).completions.create(**kw).choices[0].logprobs
    finally: stop()
    assert remote.tokens == local.tokens and remote.text_offset == local.text_offset
    assert remote.token_logprobs[1:] == pytest.approx(local.token_logprobs[1:], abs=1e-6)


def test_disconnect_mid_stream_frees_blocks_in_the_engine_process(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "tell me a long story"}], "max_tokens": 120,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as r:
        lines = r.iter_lines()
        assert any(next(lines).startswith("data: ") for _ in range(6))   # a few events, then hang up
        assert httpx.get(server["url"] + "/metrics").json()["kv_blocks_used"] > 0
    _assert_no_leak(server["url"])


def test_32_concurrent_streaming_clients(server):
    "Bounded load through the pipe: 32 streaming chats at once finish with no error, no hang and no leak."
    concurrent_streaming_chats(server["url"], KEY, 32)
    _assert_no_leak(server["url"])


def test_engine_core_reports_a_bad_request_to_its_key():
    "A request the engine refuses becomes (key, ValueError) for that key alone; an abort of an unknown key is a no-op."
    model, tok = tiny_chat_model()
    core = EngineCore(LLMEngine(model, num_blocks=16, block_size=8))
    [(key, error)] = core.handle(("add", 7, [], SamplingParams(max_tokens=2)))
    assert key == 7 and isinstance(error, ValueError) and "empty" in str(error)
    assert core.handle(("abort", 99)) == [] and core.live == {}


def test_a_dead_engine_process_is_a_503_not_a_hang():
    model, tok = tiny_chat_model()
    app = create_app(LLMEngine(model, num_blocks=32, block_size=8), tok, "tiny", engine_process=True)
    url, stop = serve_in_thread(app)
    try:
        assert httpx.get(url + "/health").status_code == 200
        app.state.engine.process.kill(); app.state.engine.process.join(timeout=10)
        deadline = time.time() + 10
        while httpx.get(url + "/health").status_code != 503: assert time.time() < deadline; time.sleep(0.05)
        assert "engine process exited" in httpx.get(url + "/health").json()["error"]["message"]
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 4}, timeout=10)
        assert r.status_code == 503 and "engine process exited" in r.json()["error"]["message"]
    finally: stop()


def test_shutdown_ends_the_engine_process():
    model, tok = tiny_chat_model()
    app = create_app(LLMEngine(model, num_blocks=32, block_size=8), tok, "tiny", engine_process=True)
    url, stop = serve_in_thread(app)
    openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0).completions.create(model="tiny", prompt="x", max_tokens=2)
    stop()
    assert app.state.engine.process.exitcode == 0                       # asked to stop, not terminated


FAULTS = """
import resource, sys, torch
from course_lib.serve import tune_malloc
if sys.argv[1] == "tuned": assert tune_malloc()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for s in range(64, 320):                                                # a decode step's history grows a token a step
    for layer in range(4):
        k, v = torch.ones(16, s, 64), torch.ones(16, s, 64)             # gathered keys and values, ~1 MiB each
        (k * v).sum(); del k, v
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_tune_malloc_stops_page_faults_on_reused_blocks():
    "With glibc's defaults a freed block of a new, larger size goes back to the system and its pages fault in again each step; tuned, memory is reused."
    faults = {mode: int(subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True).stdout)
              for mode in ("default", "tuned")}
    assert faults["default"] > 100_000 and faults["tuned"] < 10_000, faults   # measured: ~316,000 vs ~1,100
