"""Chapter 3's demo in a real browser: the attention map, RoPE angles and next-token probabilities it shows,
checked against transformers' eager attention and a float64 formula."""
import json
import math

import pytest
import torch

from course_lib.model import Decoder, export_hf, get_config


@pytest.mark.browser
def test_attention_demo_matches_transformers(launch_demo, page, tmp_path):
    torch.manual_seed(0)
    cfg = get_config("cpu-1m", vocab_size=257, n_layers=2, init_std=0.1)
    folder = export_hf(Decoder(cfg), tmp_path / "pretrain" / "model")
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, attn_implementation="eager").eval()
    prompt = "x = f(y)"
    ids = torch.tensor([list(prompt.encode())])                        # no tokenizer.json: the demo uses UTF-8 bytes
    layer, head, pair = 1, 2, 3
    with torch.no_grad():
        out = hf(ids, output_attentions=True)
    want = out.attentions[layer][0, head]                               # (t, t)
    top_id = out.logits[0, -1].argmax().item()
    freq = cfg.rope_theta ** (-2 * pair / cfg.head_dim)                 # float64: angle = position * freq

    url = launch_demo("attention", "--run", str(tmp_path))
    page.goto(url, wait_until="load")
    box = page.locator("#prompt textarea")
    box.wait_for()
    box.fill(prompt)
    for slider, value in (("#layer", layer), ("#head", head), ("#pair", pair)):
        number = page.locator(f"{slider} input[type=number]")
        number.fill(str(value))
        number.press("Enter")
    page.locator("#show").click()
    page.wait_for_function("(sel) => document.querySelector(sel) && document.querySelector(sel).value.startsWith('[')",
                           arg="#weights textarea")
    shown = torch.tensor(json.loads(page.locator("#weights textarea").input_value()))
    assert shown.shape == want.shape
    assert (shown - want).abs().max() < 1e-3                            # shown rounded to 4 decimals
    assert (shown.triu(1) == 0).all() and not torch.allclose(shown[-1], torch.full_like(shown[-1], 1 / len(shown)), atol=1e-3)
    angles = json.loads(page.locator("#angles textarea").input_value())
    assert len(angles) == ids.shape[1]
    for p, a in enumerate(angles):
        gap = (a - p * freq + math.pi) % (2 * math.pi) - math.pi
        assert abs(gap) < 1e-3, (p, a, p * freq)
    label = page.locator("#probs")
    label.get_by_text(f"(id {top_id})").first.wait_for()
    lines = label.inner_text().splitlines()
    assert any(line.startswith("1. ") and line.endswith(f"(id {top_id})") for line in lines), lines
