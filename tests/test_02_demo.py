"""Chapter 2's demo in a real browser: type text, see its tokens; switch vocabulary size."""
import pytest

from course_lib.core import embedded_corpus
from course_lib.tokenizer import DEFAULT_SPECIALS, Tokenizer, save_tokenizer, to_transformers, train_bpe, truncate


@pytest.mark.browser
def test_tokenizer_demo_shows_tokens_and_switches_vocab(launch_demo, page, tmp_path):
    texts = [d["text"] for d in embedded_corpus(max_bytes=200_000)]
    tok = Tokenizer(*train_bpe(texts, 1024, DEFAULT_SPECIALS, processes=1), DEFAULT_SPECIALS)
    (tmp_path / "tokenizer").mkdir()
    save_tokenizer(tok, tmp_path / "tokenizer" / "tokenizer.camp.json")
    text = "def main():\n    print('héllo 你好 🙂')"
    full_ids = to_transformers(tok).encode(text)  # expected ids from Hugging Face, not from the demo's code
    small_ids = to_transformers(truncate(tok, 512 - 256 - 3)).encode(text)
    assert len(small_ids) > len(full_ids)

    url = launch_demo("tokenizer", "--run", str(tmp_path))
    page.goto(url, wait_until="load")
    box = page.locator("#text-in textarea")
    box.wait_for()
    box.fill(text)
    page.locator("#tokenize").click()
    page.wait_for_function("([sel, want]) => document.querySelector(sel) && document.querySelector(sel).value === want",
                           arg=["#ids textarea", str(full_ids)])
    assert page.locator("#token-spans .tok").count() == len(full_ids)
    assert f"{len(full_ids)} tokens" in page.locator("#summary").inner_text()
    assert "你" in page.locator("#token-spans").inner_text() or "\\xe4" in page.locator("#token-spans").inner_text()

    page.locator("#vocab-size input").click()
    page.get_by_role("option", name="512", exact=True).click()
    page.wait_for_function("([sel, want]) => document.querySelector(sel).value === want", arg=["#ids textarea", str(small_ids)])
    assert page.locator("#token-spans .tok").count() == len(small_ids)
