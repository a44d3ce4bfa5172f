"""Chapter 7's server on a real loopback socket: the official openai client, bad input as clear 4xx, disconnects that
free blocks, and a bounded 64-client load test. The KV block count is checked after every test."""
import asyncio
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn
from hypothesis import given, settings, strategies as st

from course_lib.engine import LLMEngine, SamplingParams
from course_lib.serve import Detokenizer, create_app
from tiny import tiny_chat_model
from course_lib.tokenizer import EOT, Tokenizer, apply_chat_template

KEY = "test-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    model, tok = tiny_chat_model()
    engine = LLMEngine(model, num_blocks=256, block_size=8, max_num_seqs=64, max_num_batched_tokens=512)
    app = create_app(engine, tok, "tiny", api_key=KEY)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True); thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(url + "/health").status_code == 200: break
        except httpx.HTTPError: time.sleep(0.05)
    yield {"url": url, "engine": engine, "tok": tok, "model": model, "runner": app.state.engine}
    srv.should_exit = True; thread.join(timeout=10)


@pytest.fixture
def client(server):
    yield openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)
    _assert_no_leak(server["engine"])


def _assert_no_leak(engine, timeout: float = 10.0):
    "Every KV block back in the pool and no request left, within `timeout` (a cancel is processed between steps)."
    deadline = time.time() + timeout
    while time.time() < deadline and (engine.bm.num_used or engine.has_unfinished()): time.sleep(0.02)
    assert engine.bm.num_used == 0 and not engine.has_unfinished(), engine.metrics()


def _greedy(server, prompt_ids, n):
    "Independent of the server: the same model through a fresh engine of its own."
    tok = server["tok"]
    stops = (tok.special_tokens["<|im_end|>"], tok.special_tokens[EOT])
    return LLMEngine(server["model"], num_blocks=64, block_size=8).generate([prompt_ids], SamplingParams(max_tokens=n, stop_ids=stops))[0]


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models] == ["tiny"]


def test_completion_equals_engine_greedy(client, server):
    got = client.completions.create(model="tiny", prompt="def main():", max_tokens=10, temperature=0)
    want = _greedy(server, server["tok"].encode("def main():"), 10)
    assert got.choices[0].text == server["tok"].decode(want)
    assert got.usage.completion_tokens == len(want) and got.usage.prompt_tokens == len(server["tok"].encode("def main():"))


def test_chat_and_streaming_agree(client, server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    ids = apply_chat_template(server["tok"], messages, add_generation_prompt=True)
    assert whole.choices[0].message.content == server["tok"].decode(_greedy(server, ids, 12))
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_completion_streaming(client):
    whole = client.completions.create(model="tiny", prompt="import os", max_tokens=8, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="tiny", prompt="import os", max_tokens=8,
                                                                             temperature=0, stream=True))
    assert streamed == whole.choices[0].text


# byte tokens: runs of valid UTF-8 text mixed with loose bytes (cut characters, stray continuation bytes)
_byte_ids = st.lists(st.one_of(st.text(max_size=4).map(lambda t: list(t.encode())), st.lists(st.integers(0, 255), max_size=3)),
                     max_size=20).map(lambda parts: [b for part in parts for b in part])


@settings(max_examples=300, deadline=None)
@given(_byte_ids)
def test_detokenizer_pieces_join_to_the_whole_decode(ids):
    "Sent piece by piece, the text equals decoding all the bytes at once (Python's codec, errors replaced)."
    detok = Detokenizer(Tokenizer({i: bytes([i]) for i in range(256)}, []))
    pieces = [detok.add(t) for t in ids]
    assert "".join(pieces) + detok.flush() == bytes(ids).decode("utf-8", errors="replace")


def run_in_own_thread(main, timeout: float, hung: str):
    "asyncio.run(main()) in a fresh thread, which owns its own loop: it works even when a plugin (anyio, pytest-asyncio) left a loop running in this one."
    box = {}
    def target():
        try: box["result"] = asyncio.run(main())
        except BaseException as e: box["error"] = e
    t = threading.Thread(target=target, daemon=True); t.start(); t.join(timeout)
    assert not t.is_alive(), hung
    if "error" in box: raise box["error"]
    return box["result"]


def test_a_slow_reader_gets_every_token_since_its_last_read_at_once(server):
    "AsyncEngine.stream hands a reader that fell behind all outputs waiting for it in one list; nothing lost or reordered."
    tok = server["tok"]
    stops = (tok.special_tokens["<|im_end|>"], tok.special_tokens[EOT])
    prompt = tok.encode("def main():")
    want = _greedy(server, prompt, 24)
    assert len(want) >= 4                                               # enough tokens for a reader to fall behind
    async def read():
        batches = []
        async for outs in server["runner"].stream(prompt, SamplingParams(max_tokens=24, stop_ids=stops)):
            batches.append(outs)
            await asyncio.sleep(0.3)                                    # the engine runs on while this reader sleeps
        return batches
    batches = run_in_own_thread(read, 120, "the slow reader hung")
    assert [o.token for outs in batches for o in outs if o.token is not None] == want
    assert max(len(outs) for outs in batches) > 1 and batches[-1][-1].finished
    _assert_no_leak(server["engine"])


def test_tool_calls_in_openai_shape(client, server, monkeypatch):
    "The model's tagged call text comes back as OpenAI tool_calls (the untrained model is made to say it)."
    call = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    target = server["tok"].encode(call)
    engine = server["engine"]
    original = engine._sample
    def scripted(seq, logits, best):                                    # sample the scripted text, then stop
        i = len(seq.output_ids)
        return target[i] if i < len(target) else server["tok"].special_tokens["<|im_end|>"]
    monkeypatch.setattr(engine, "_sample", scripted)
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "1+2?"}], tools=tools,
                                           max_tokens=len(target) + 2, temperature=0)
    monkeypatch.setattr(engine, "_sample", original)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls[0].function.name == "add"
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {"a": 1, "b": 2}


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "malformed JSON"),
    ({"model": "tiny", "messages": "hi"}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "lots"}, 400, "max_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "does not exist"),
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "word " * 600}]}, 400, "context"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n"),
])
def test_bad_chat_input_is_a_clear_4xx(server, body, status, words):
    headers = {"Authorization": f"Bearer {KEY}"} | ({} if isinstance(body, dict) else {"Content-Type": "application/json"})
    kwargs = {"json": body} if isinstance(body, dict) else {"content": body}
    r = httpx.post(server["url"] + "/v1/chat/completions", headers=headers, timeout=30, **kwargs)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"], r.json()
    assert httpx.get(server["url"] + "/health").status_code == 200    # still up
    _assert_no_leak(server["engine"])


def test_bad_completion_inputs(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    for body, words in [({"model": "tiny", "prompt": ""}, "empty"), ({"model": "tiny", "prompt": [999999]}, "token ids"),
                        ({"model": "tiny"}, "prompt")]:
        r = httpx.post(server["url"] + "/v1/completions", headers=headers, json=body, timeout=30)
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    _assert_no_leak(server["engine"])


def test_api_key_missing_or_wrong(server):
    c = openai.OpenAI(base_url=server["url"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="wrong API key"): c.models.list()
    missing = httpx.get(server["url"] + "/v1/models")                   # the openai client refuses to send no key at all
    assert missing.status_code == 401 and "missing API key" in missing.json()["error"]["message"]
    assert httpx.get(server["url"] + "/health").status_code == 200    # open, as in vLLM


def test_disconnect_mid_stream_frees_blocks(server):
    engine = server["engine"]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "tell me a long story"}], "max_tokens": 100,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as r:
        lines = r.iter_lines()
        seen = [next(lines) for _ in range(6)]                         # a few events, then hang up
        assert any(line.startswith("data: ") for line in seen)
        assert engine.bm.num_used > 0                                   # the request holds blocks mid-stream
    _assert_no_leak(engine)


def test_metrics_and_openapi(server):
    m = httpx.get(server["url"] + "/metrics").json()
    assert {"running", "waiting", "kv_blocks_used", "kv_blocks_total", "tokens_per_s"} <= set(m)
    schema = httpx.get(server["url"] + "/openapi.json").json()
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics"} <= set(schema["paths"])


def concurrent_streaming_chats(url: str, api_key: str, count: int) -> list:
    "`count` streaming chats at once through the openai client, each a list of its chunks; fails if they hang."
    async def one(client, i):
        stream = await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"hi {i}"}],
                                                      max_tokens=8, temperature=0, stream=True)
        return [c async for c in stream]
    async def main():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=60)
        return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(count))), timeout=120)
    results = run_in_own_thread(main, 180, f"the {count} clients hung")
    assert len(results) == count and all(r and r[-1].choices[0].finish_reason in ("stop", "length") for r in results)
    return results


def test_64_concurrent_streaming_clients(server):
    "Bounded load: 64 streaming chats at once on loopback finish with no error and no hang."
    concurrent_streaming_chats(server["url"], KEY, 64)
    assert server["engine"].metrics()["generated_tokens"] >= 64
    _assert_no_leak(server["engine"])


def test_camp_serve_command(server, tmp_path):
    "`camp serve MODEL_DIR` on loopback with an API key, driven by the openai client, then stopped."
    import subprocess, sys
    from pathlib import Path
    from course_lib.model import export_hf
    from course_lib.tokenizer import save_hf
    folder = tmp_path / "model"
    save_hf(server["tok"], folder)
    export_hf(server["model"], folder, tokenizer=folder)
    import copy
    from course_lib.lora import inject_lora, save_adapter
    adapted = copy.deepcopy(server["model"]); inject_lora(adapted, ["q_proj"], r=2)   # B = 0: the base's answers
    save_adapter(adapted, tmp_path / "ad")
    port = _free_port()
    camp = Path(sys.executable).with_name("camp")
    proc = subprocess.Popen([str(camp), "serve", str(folder), "--port", str(port), "--api-key", "k2", "--num-blocks", "64",
                             "--lora", f"ad={tmp_path / 'ad'}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200: break
            except httpx.HTTPError: time.sleep(0.1)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k2", max_retries=0, timeout=60)
        assert [m.id for m in c.models.list()] == ["model", "ad"]
        for name in ("model", "ad"):
            got = c.completions.create(model=name, prompt="def main():", max_tokens=6, temperature=0).choices[0].text
            assert got == server["tok"].decode(_greedy(server, server["tok"].encode("def main():"), 6))
    finally:
        proc.terminate(); proc.wait(timeout=20)


def test_serve_stage_reports_and_leaks_nothing(server, tmp_path):
    from course_lib.core import RunContext, load_settings
    from course_lib.model import export_hf
    from course_lib.serve import serve_stage
    from course_lib.tokenizer import save_hf
    folder = tmp_path / "pretrain" / "model"
    save_hf(server["tok"], folder)
    export_hf(server["model"], folder, tokenizer=folder)
    ctx = RunContext(tmp_path, load_settings("ci"))
    report = serve_stage(ctx)
    assert "time to first token" in report and "0 of 128 KV blocks held" in report
    assert ctx.summary["serve"]["models"] == ["camp"] and ctx.summary["serve"]["metrics"]["generated_tokens"] > 0
    assert json.loads((tmp_path / "serve" / "smoke.json").read_text())["models"] == ["camp"]


# --- n > 1 choices (one prefill, the prompt's blocks shared by fork) ---

def _sampled(server, prompt_ids, n, seed):
    "Independent of the server: a lone seeded request through a fresh engine."
    tok = server["tok"]
    stops = (tok.special_tokens["<|im_end|>"], tok.special_tokens[EOT])
    params = SamplingParams(max_tokens=n, temperature=1.0, seed=seed, stop_ids=stops)
    return LLMEngine(server["model"], num_blocks=64, block_size=8).generate([prompt_ids], params)[0]


def test_n_completions_equal_lone_seeded_requests(client, server):
    "n=3 through the openai client: choice i is what a lone request seeded seed + i samples; usage counts all choices."
    got = client.completions.create(model="tiny", prompt="def main():", max_tokens=8, temperature=1.0, seed=5, n=3)
    assert [c.index for c in got.choices] == [0, 1, 2]
    want = [_sampled(server, server["tok"].encode("def main():"), 8, 5 + i) for i in range(3)]
    assert [c.text for c in got.choices] == [server["tok"].decode(w) for w in want]
    assert got.usage.completion_tokens == sum(len(w) for w in want)
    assert len({c.text for c in got.choices}) > 1


def test_n_chat_streaming_reassembles_to_the_whole_answer(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=10, temperature=1.0, seed=11, n=2)
    whole = client.chat.completions.create(**kw)
    texts = ["", ""]
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices: texts[c.index] += c.delta.content or ""
    assert texts == [c.message.content or "" for c in whole.choices]


def test_n_too_large_is_a_clear_4xx(server):
    r = httpx.post(server["url"] + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "tiny", "prompt": "x", "n": 17})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n" and "16" in r.json()["error"]["message"]
    _assert_no_leak(server["engine"])


# --- LoRA adapters named through `model` ---

def _adapter_server(tmp_path):
    "A served tiny model with a LoRA adapter 'sql' (B drawn large, so it changes the answers) and its merged-weights twin."
    import copy
    from course_lib.lora import inject_lora, lora_layers, merge_lora, save_adapter
    from course_lib.serve import serve_in_thread
    model, tok = tiny_chat_model()
    m = copy.deepcopy(model); torch.manual_seed(0)
    inject_lora(m, ["q_proj", "v_proj", "up_proj"], r=4, alpha=8)
    for layer in lora_layers(m).values(): torch.nn.init.normal_(layer.lora_B.weight, std=0.5)
    folder = save_adapter(m, tmp_path / "sql")
    merged = merge_lora(_loaded(model, folder))
    engine = LLMEngine(copy.deepcopy(model), num_blocks=64, block_size=8, adapters={"sql": folder})
    return (model, tok, merged, engine, *serve_in_thread(create_app(engine, tok, "tiny")))


def test_lora_adapter_named_by_model_equals_merged_model(tmp_path):
    "The openai client asks for model='sql' (an adapter): the answer is the merged-weights model's; the base stays the base."
    model, tok, merged, engine, url, stop = _adapter_server(tmp_path)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        listed = {m.id: getattr(m, "parent", None) for m in client.models.list()}
        assert listed == {"tiny": None, "sql": "tiny"}
        ids = tok.encode("SELECT")
        stops = (tok.special_tokens["<|im_end|>"], tok.special_tokens[EOT])
        def greedy(mdl): return tok.decode(LLMEngine(mdl, num_blocks=64, block_size=8).generate([ids], SamplingParams(max_tokens=10, stop_ids=stops))[0])
        got = {name: client.completions.create(model=name, prompt="SELECT", max_tokens=10, temperature=0).choices[0].text
               for name in ("sql", "tiny")}
        assert got == {"sql": greedy(merged), "tiny": greedy(model)} and got["sql"] != got["tiny"]
        with pytest.raises(openai.NotFoundError, match="'tiny', 'sql'"):
            client.completions.create(model="nope", prompt="x", max_tokens=2)
        _assert_no_leak(engine)
    finally: stop()


def _loaded(model, folder):
    "A fresh copy of `model` with the adapter in `folder` loaded (chapter 5)."
    import copy
    from course_lib.lora import load_adapter
    m = copy.deepcopy(model); load_adapter(m, folder); return m


def test_prompt_logprobs_of_an_adapter_are_the_merged_models(tmp_path):
    "echo + logprobs for model='sql' scores with that adapter (on the engine's thread, its rows set), not with the base."
    import torch.nn.functional as F
    model, tok, merged, engine, url, stop = _adapter_server(tmp_path)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        ids = tok.encode("SELECT name FROM users")
        for name, reference in (("sql", merged), ("tiny", model)):
            lp = client.completions.create(model=name, prompt="SELECT name FROM users", max_tokens=0, echo=True, logprobs=0).choices[0].logprobs
            with torch.no_grad(): ref = F.log_softmax(reference(torch.tensor([ids]))[0].double(), -1)
            assert max(abs(lp.token_logprobs[i] - ref[i - 1, ids[i]].item()) for i in range(1, len(ids))) < 1e-4, name
        _assert_no_leak(engine)
    finally: stop()


def test_n_choices_stop_on_their_own_stop_string(client, server):
    "n=2 with a stop string only choice 0 reaches early: it ends there (text, finish reason, tokens) as a lone request seeded 3 would, choice 1 goes on as seed 4 alone, and the engine computes no token past either stop."
    tok, prompt = server["tok"], server["tok"].encode("def main():")
    lone = [_sampled(server, prompt, 40, 3 + i) for i in range(2)]
    texts = [tok.decode(ids) for ids in lone]
    # a 2-character ASCII stop string that first occurs in choice 0 at character 4 or later, and never in choice 1
    stop = next(texts[0][p:p + 2] for p in range(4, len(texts[0]) - 1) if texts[0][p:p + 2].isascii()
                and texts[0][p:p + 2].isprintable() and texts[0].find(texts[0][p:p + 2]) == p and texts[0][p:p + 2] not in texts[1])

    def upto_stop(ids):                                                 # (tokens generated, text, reason) of a lone request with the stop
        k = next((k for k in range(1, len(ids) + 1) if stop in tok.decode(ids[:k])), None)
        if k is None: return len(ids), tok.decode(ids), "stop" if len(ids) < 40 else "length"
        return k, tok.decode(ids[:k]).split(stop)[0], "stop"

    want = [upto_stop(ids) for ids in lone]
    before = server["engine"].stats["generated_tokens"]
    got = client.completions.create(model="tiny", prompt="def main():", max_tokens=40, temperature=1.0, seed=3, n=2, stop=[stop])
    assert [(c.text, c.finish_reason) for c in got.choices] == [(t, r) for _, t, r in want]
    assert want[0][0] < 40 and got.usage.completion_tokens == sum(k for k, _, _ in want)
    assert server["engine"].stats["generated_tokens"] - before == got.usage.completion_tokens   # no token computed after a stop
