"""Chapter 7's chat demo in a real browser: it talks to its server through the openai client; the reply is the engine's greedy text."""
import pytest

from course_lib.engine import LLMEngine, SamplingParams
from course_lib.tokenizer import EOT, apply_chat_template


@pytest.mark.browser
def test_chat_demo_streams_the_greedy_reply(launch_demo, page, tiny_run):
    tok, model = tiny_run.tok, tiny_run.model
    ids = apply_chat_template(tok, [{"role": "user", "content": "hello"}], add_generation_prompt=True)
    stops = (tok.special_tokens["<|im_end|>"], tok.special_tokens[EOT])
    want = tok.decode(LLMEngine(model, num_blocks=64, block_size=8).generate([ids], SamplingParams(max_tokens=12, stop_ids=stops))[0])

    assert want.strip()                                                 # a reply to wait for, not the empty start
    url = launch_demo("serve-chat", "--run", str(tiny_run.run))
    page.goto(url, wait_until="load")
    for slider, value in (("#temperature", "0"), ("#max-tokens", "12")):   # greedy, 12 tokens
        number = page.locator(f"{slider} input[type=number]")
        number.fill(value)
        number.press("Enter")
    box = page.locator("#message textarea")
    box.wait_for()
    box.fill("hello")
    box.press("Enter")
    page.wait_for_function("(want) => document.querySelector('#reply textarea').value === want", arg=want, timeout=60_000)
    page.locator("#refresh").click()
    page.wait_for_function("() => document.querySelector('#metrics').innerText.includes('generated_tokens')", timeout=30_000)
    assert "kv_blocks_total" in page.locator("#metrics").inner_text()
