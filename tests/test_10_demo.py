"""Chapter 10's RAG demo in a real browser: a folder loaded, BM25 passage scores against `bm25s`, citations against the
files' own bytes, an unreadable file skipped, an off-topic question refused by the gate, and an uploaded document found by the next question."""
import re

import pytest

from course_lib.rag import REFUSAL, KnowledgeBase, chunk_text, tokenize

DOCS = {
    "tea.md": "# Green tea\n\nGreen tea is steeped at about 80 degrees for two minutes; boiling water makes it bitter.\n\n"
              "## Storage\n\nKeep the leaves dry, dark and cool, away from spices.\n",
    "lava.md": "# Lava\n\nBasaltic lava is runny and flows far; rhyolitic lava is thick and explodes.\n\n"
               "## Pahoehoe\n\nPahoehoe is smooth, ropy basaltic lava with a glassy skin.\n",
}
GLACIER = "# Glaciers\n\nA glacier is a persistent body of dense ice, formed from compacted snow, that moves under its own weight.\n"


def ask(page, question):
    "Ask and wait for this question's answer (it must differ from the previous question); (verdict, passages, answer, citations)."
    page.locator("#question textarea").fill(question)
    page.locator("#ask").click()
    page.wait_for_function("(q) => document.querySelector('#gate').innerText.includes(q)", arg=question, timeout=60_000)
    verdict = re.search(r"(accepted|rejected): best cosine", page.locator("#gate").inner_text()).group(1)
    return (verdict, page.locator("#passages").inner_text(), page.locator("#answer textarea").input_value(),
            page.locator("#citations").inner_text())


def bm25s_best(docs: dict[str, str], question: str) -> tuple[str, float]:
    "The best chunk id and score by bm25s over the same chunks' indexed text (our tokenizer, their scoring)."
    import bm25s
    chunks = [c for s, t in docs.items() for c in chunk_text(t, s)]
    ref = bm25s.BM25()
    ref.index([tokenize(KnowledgeBase.index_text(c)) for c in chunks], show_progress=False)
    scores = ref.get_scores(tokenize(question))
    best = max(range(len(chunks)), key=lambda i: scores[i])
    return chunks[best].id, float(scores[best])


@pytest.mark.browser
def test_rag_demo_gates_cites_and_learns_an_uploaded_document(launch_demo, page, tmp_path):
    kb = tmp_path / "kb"
    kb.mkdir()
    for name, text in DOCS.items():
        (kb / name).write_text(text)
    (kb / "broken.pdf").write_bytes(b"%PDF-1.4 not really")          # unreadable: skipped and listed, the rest loads
    url = launch_demo("rag")
    page.goto(url, wait_until="load")
    page.locator("#kb-folder textarea").fill(str(kb))
    page.locator("#embedder label", has_text="hashed").click()
    page.locator("#load").click()
    page.wait_for_function("() => document.querySelector('#kb-status textarea').value.startsWith('2 documents')", timeout=60_000)
    assert "skipped broken.pdf: pdf_error" in page.locator("#kb-status textarea").input_value()
    page.locator("#mode label", has_text="bm25").click()

    question = "At what temperature is green tea steeped?"
    gate, passages, answer, cites = ask(page, question)
    best_id, best_score = bm25s_best(DOCS, question)
    assert gate == "accepted"
    assert f"\n[1] {best_id} · score {best_score:.4f}" in "\n" + passages, passages
    source, start, end = re.fullmatch(r"(.+)#(\d+)-(\d+)", cites.strip().splitlines()[0].strip()).groups()
    assert source == "tea.md" and "80 degrees" in DOCS[source][int(start):int(end)] and "[1]" in answer

    gate, passages, answer, cites = ask(page, "How do I change a flat tyre on a bicycle?")
    assert gate == "rejected" and answer == REFUSAL and "rejected" in passages

    gate, passages, answer, cites = ask(page, "What is a glacier made of?")
    assert "glaciers.md" not in passages
    upload = tmp_path / "glaciers.md"
    upload.write_text(GLACIER)
    page.set_input_files("#upload input[type=file]", str(upload))
    page.locator("#upload [aria-label='glaciers.md']").wait_for()   # Gradio lists the uploaded file
    page.locator("#add").click()
    page.wait_for_function("() => document.querySelector('#kb-status textarea').value.startsWith('3 documents')", timeout=60_000)
    assert "added glaciers.md (1 chunks)" in page.locator("#kb-status textarea").input_value()
    question = "What is a glacier formed from?"
    gate, passages, answer, cites = ask(page, question)
    best_id, best_score = bm25s_best({**DOCS, "glaciers.md": GLACIER}, question)
    assert gate == "accepted" and best_id.startswith("glaciers.md#")
    assert f"\n[1] {best_id} · score {best_score:.4f}" in "\n" + passages and "compacted snow" in answer
