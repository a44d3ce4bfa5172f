"""Chapter 4's demo in a real browser: greedy generation and the next-token chart, checked against transformers."""
import json

import pytest
import torch

from course_lib.model import Decoder, export_hf, get_config


@pytest.mark.browser
def test_generate_demo_matches_transformers_greedy(launch_demo, page, tmp_path):
    torch.manual_seed(0)
    folder = export_hf(Decoder(get_config("cpu-1m", vocab_size=257, n_layers=2, init_std=0.1)), tmp_path / "pretrain" / "model")
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    prompt = "def main():"
    ids = torch.tensor([list(prompt.encode())])                        # no tokenizer.json: the demo uses UTF-8 bytes
    want = hf.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    with torch.no_grad():
        top_id = hf(ids).logits[0, -1].argmax().item()

    url = launch_demo("generate", "--run", str(tmp_path))
    page.goto(url, wait_until="load")
    box = page.locator("#prompt textarea")
    box.wait_for()
    box.fill(prompt)
    for slider, value in (("#max-new", "12"), ("#top-k", "1")):           # top-k = 1: greedy
        number = page.locator(f"{slider} input[type=number]")
        number.fill(value)
        number.press("Enter")
    page.locator("#generate").click()
    page.wait_for_function("(sel) => document.querySelector(sel) && document.querySelector(sel).value.startsWith('[')",
                           arg="#ids textarea")
    assert json.loads(page.locator("#ids textarea").input_value()) == want
    # with top-k = 1 the whole probability sits on transformers' argmax token
    label = page.locator("#probs")
    label.get_by_text(f"(id {top_id})").first.wait_for()
    assert f"(id {top_id})" in label.inner_text()
