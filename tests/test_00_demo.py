"""Chapter 0's demo in a real browser: browse the embedded corpus."""
import pytest

from course_lib.core import embedded_corpus


@pytest.mark.browser
def test_corpus_demo_shows_the_chosen_document(launch_demo, page):
    url = launch_demo("corpus")
    page.goto(url, wait_until="load")
    doc_id = page.locator("#doc-id textarea")
    doc_id.wait_for()
    first = next(embedded_corpus(max_docs=1))["id"]
    page.wait_for_function("([sel, want]) => document.querySelector(sel).value === want", arg=["#doc-id textarea", first])
    page.get_by_label("prose").check()
    page.get_by_label("document number").fill("2")
    page.get_by_role("button", name="Show").click()
    third_prose = [d["id"] for d in embedded_corpus(kinds=["prose"], max_docs=3)][2]
    page.wait_for_function("([sel, want]) => document.querySelector(sel).value === want", arg=["#doc-id textarea", third_prose])
    assert doc_id.input_value() == third_prose
