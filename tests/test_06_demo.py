"""Chapter 6's demo in a real browser: generation through an int8 KV cache, its bytes, and agreement with fp."""
import json

import pytest
import torch

from course_lib.inference import generate, kv_bytes_per_token
from course_lib.model import Decoder, export_hf, get_config


@pytest.mark.browser
def test_inference_demo_int8_cache(launch_demo, page, tmp_path):
    torch.manual_seed(0)
    model = Decoder(get_config("cpu-1m", vocab_size=257, n_layers=2, init_std=0.1)).eval()
    folder = export_hf(model, tmp_path / "pretrain" / "model")
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    prompt = "def main():"
    ids = list(prompt.encode())                                          # no tokenizer.json: UTF-8 bytes
    fp_want = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
    int8_want = generate(model, ids, 12, greedy=True, kv="int8")         # the library, itself checked against HF

    url = launch_demo("inference", "--run", str(tmp_path))
    page.goto(url, wait_until="load")
    box = page.locator("#prompt textarea")
    box.wait_for()
    box.fill(prompt)
    number = page.locator("#max-new input[type=number]")
    number.fill("12")
    number.press("Enter")
    page.locator("#generate").click()                                    # defaults: int8 cache, greedy
    page.wait_for_function("(sel) => document.querySelector(sel) && document.querySelector(sel).value.startsWith('[')",
                           arg="#ids textarea")
    assert json.loads(page.locator("#ids textarea").input_value()) == int8_want
    stats = page.locator("#stats").inner_text()
    positions = len(ids) + 12 - 1                                        # the last token is never fed back
    assert f"{round(positions * kv_bytes_per_token(model.cfg, 'int8')):,} bytes" in stats
    first = next((i for i, (a, b) in enumerate(zip(int8_want, fp_want)) if a != b), None)
    assert ("Identical to the fp run" in stats) == (first is None)
