"""Chapter 5's demo in a real browser: base and fine-tuned replies side by side, checked against transformers' greedy generate."""
import pytest
import torch

from course_lib.finetune import REPLY_TOKENS
from course_lib.model import Decoder, ModelConfig, export_hf
from course_lib.tokenizer import DEFAULT_SPECIALS, Tokenizer, render_chat, save_hf


@pytest.mark.browser
def test_chat_demo_side_by_side(launch_demo, page, tmp_path):
    tok = Tokenizer({i: bytes([i]) for i in range(256)}, [], DEFAULT_SPECIALS)
    save_hf(tok, tmp_path / "tok")
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=256, init_std=0.2)
    folders = {}
    for seed, name in ((0, "pretrain/model"), (1, "finetune/merged")):
        torch.manual_seed(seed)
        folders[name] = export_hf(Decoder(cfg), tmp_path / "run" / name, tokenizer=tmp_path / "tok" / "tokenizer.json")
    question = "Who are you?"
    from transformers import AutoModelForCausalLM
    ids = torch.tensor([tok.encode(render_chat([{"role": "user", "content": question}], add_generation_prompt=True))])
    end = tok.special_tokens["<|im_end|>"]
    want = {}
    for name, folder in folders.items():
        hf = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
        out = hf.generate(ids, max_new_tokens=REPLY_TOKENS, do_sample=False, eos_token_id=end, pad_token_id=0)[0, ids.shape[1]:].tolist()
        want[name] = "[assistant] " + tok.decode([i for i in out if i != end])

    url = launch_demo("chat", "--run", str(tmp_path / "run"))
    page.goto(url, wait_until="load")
    box = page.locator("#question textarea")
    box.wait_for()
    box.fill(question)
    page.locator("#ask").click()
    for elem in ("#base-reply textarea", "#tuned-reply textarea"):
        page.wait_for_function("(sel) => document.querySelector(sel) && document.querySelector(sel).value.length > 0", arg=elem)
    assert page.locator("#base-reply textarea").input_value() == want["pretrain/model"]
    assert page.locator("#tuned-reply textarea").input_value() == want["finetune/merged"]
