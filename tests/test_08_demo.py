"""Chapter 8's evaluation demo in a real browser: the leaderboard it shows equals an in-process evaluation of the same model."""
import json

import pytest
import torch

from course_lib.eval import CourseLM, cloze_task, evaluate
from course_lib.model import Decoder, export_hf, get_config
from course_lib.tokenizer import DEFAULT_SPECIALS, Tokenizer, save_hf, train_bpe


@pytest.mark.browser
def test_eval_demo_shows_the_leaderboard(launch_demo, page, tmp_path):
    vocab, merges = train_bpe([open(json.__file__).read()], 320, special_tokens=DEFAULT_SPECIALS, processes=1)
    tok = Tokenizer(vocab, merges, list(DEFAULT_SPECIALS))
    torch.manual_seed(0)
    model = Decoder(get_config("cpu-1m", vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                               d_ff=64, max_seq_len=128, init_std=0.2)).eval()
    folder = tmp_path / "pretrain" / "model"
    save_hf(tok, folder)
    export_hf(model, folder, tokenizer=folder)
    want = evaluate(CourseLM(model, tok), cloze_task(8))["metrics"]["acc"]

    url = launch_demo("eval", "--run", str(tmp_path))
    page.goto(url, wait_until="load")
    number = page.locator("#n-items input[type=number]")
    number.fill("8")
    number.press("Enter")
    page.locator("#run").click()
    page.wait_for_function("() => document.querySelector('#leaderboard').innerText.includes('cloze_en/acc')", timeout=90_000)
    text = page.locator("#leaderboard").inner_text()
    assert f"{want:.3f}" in text, text
    page.wait_for_selector("#heatmap img", timeout=60_000)
