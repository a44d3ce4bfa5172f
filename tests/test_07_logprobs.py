"""Chapter 7's server returns prompt logprobs the way vLLM and OpenAI's legacy completions do (`echo`, `logprobs`,
`max_tokens=0`), through the official openai client, checked against a float64 forward of the same model."""
import httpx
import openai
import pytest
import torch
import torch.nn.functional as F

from course_lib.engine import LLMEngine, SamplingParams
from course_lib.serve import create_app, serve_in_thread
from course_lib.tokenizer import EOT
from tiny import tiny_chat_model


@pytest.fixture(scope="module")
def server():
    model, tok = tiny_chat_model()
    engine = LLMEngine(model, num_blocks=128, block_size=8, max_num_seqs=8, max_num_batched_tokens=256)
    url, stop = serve_in_thread(create_app(engine, tok, "tiny"))
    yield {"url": url, "engine": engine, "model": model, "tok": tok,
           "client": openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)}
    stop()
    assert engine.bm.num_used == 0 and not engine.has_unfinished()


def _reference(model, ids: list[int]) -> torch.Tensor:
    "Float64 log-softmax of one plain forward, (t, V): row i predicts token i + 1."
    with torch.no_grad(): return F.log_softmax(model(torch.tensor([ids]))[0].double(), -1)


@pytest.mark.parametrize("prompt", ["def add(a, b):\n    return a + b", "人民日报：新年贺词。"])
def test_echo_prompt_logprobs_equal_float64(server, prompt):
    "max_tokens=0 + echo: every prompt token's logprob and its top 3, offsets that cut the text into the tokens (multi-byte too)."
    tok, model = server["tok"], server["model"]
    r = server["client"].completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=3)
    choice, ids = r.choices[0], tok.encode(prompt)
    lp, ref = choice.logprobs, _reference(model, ids)
    assert choice.text == prompt and r.usage.completion_tokens == 0 and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(ref[i - 1, ids[i]].item(), abs=1e-5)
        best = {}
        for j in [*ref[i - 1].topk(3).indices.tolist(), ids[i]]: best.setdefault(tok.decode([j]), ref[i - 1, j].item())
        assert lp.top_logprobs[i] == pytest.approx(best, abs=1e-5)       # the top 3 and the chosen token, by text
    assert "".join(lp.tokens) == prompt
    assert [choice.text[o:o + len(t)] for o, t in zip(lp.text_offset, lp.tokens)] == lp.tokens


def test_logprobs_of_a_greedy_completion(server):
    "Without echo, the completion's tokens only: the text is the engine's greedy text, each token the top one at its step."
    tok, model = server["tok"], server["model"]
    ids = tok.encode("import json\n")
    r = server["client"].completions.create(model="tiny", prompt="import json\n", max_tokens=6, temperature=0, logprobs=1)
    want = LLMEngine(model, num_blocks=32, block_size=8).generate(
        [ids], SamplingParams(max_tokens=6, stop_ids=(tok.special_tokens["<|im_end|>"], tok.special_tokens[EOT])))[0]
    lp, ref = r.choices[0].logprobs, _reference(model, ids + want)
    assert r.choices[0].text == tok.decode(want) == "".join(lp.tokens) and r.choices[0].finish_reason == "length"
    assert lp.text_offset[0] == 0 and len(lp.token_logprobs) == len(want) == r.usage.completion_tokens
    for k, t in enumerate(want):
        i = len(ids) + k
        assert lp.token_logprobs[k] == pytest.approx(ref[i - 1, t].item(), abs=1e-5) == pytest.approx(ref[i - 1].max().item(), abs=1e-5)


def test_echo_with_generation_and_stop(server):
    "echo + max_tokens>0: prompt then completion in one text; a stop string cuts both the text and the token list."
    client, tok = server["client"], server["tok"]
    full = client.completions.create(model="tiny", prompt="x = 1\n", max_tokens=8, temperature=0, echo=True, logprobs=0).choices[0]
    assert full.text.startswith("x = 1\n") and len(full.logprobs.tokens) == len(tok.encode("x = 1\n")) + 8 - (full.finish_reason == "stop")
    gen = full.text[len("x = 1\n"):]
    stop = next(gen[k:k + 2] for k in range(1, len(gen) - 1) if gen[k:k + 2].strip() and gen.find(gen[k:k + 2]) == k)
    cut = client.completions.create(model="tiny", prompt="x = 1\n", max_tokens=8, temperature=0, echo=True, logprobs=0,
                                    stop=[stop]).choices[0]
    assert cut.text == "x = 1\n" + gen[:gen.index(stop)] and cut.finish_reason == "stop"
    assert all(o < len(cut.text) for o in cut.logprobs.text_offset)
    # the engine now stops at the stop string, so the scored sequence is shorter: equal up to float rounding
    assert cut.logprobs.token_logprobs == pytest.approx(full.logprobs.token_logprobs[:len(cut.logprobs.token_logprobs)], abs=1e-5)


@pytest.mark.parametrize("body, words", [
    ({"prompt": "x", "max_tokens": 0}, "echo=true"),
    ({"prompt": "x", "echo": True, "logprobs": 1, "stream": True}, "stream"),
    ({"prompt": "x", "echo": True, "logprobs": 21}, "logprobs"),
    ({"prompt": [999999], "echo": True, "max_tokens": 0}, "token ids"),
    ({"prompt": "x", "echo": True, "max_tokens": -1}, "max_tokens"),
])
def test_bad_logprob_requests_are_clear_4xx(server, body, words):
    r = httpx.post(server["url"] + "/v1/completions", json={"model": "tiny", **body}, timeout=30)
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
