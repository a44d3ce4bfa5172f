"""Chapter 9's agents demo in a real browser: the scripted back end's traces (calculator under ReAct, the sandboxed
interpreter under ReWOO, plan-and-reflect recovering from a failed calculator step by searching the corpus, the planner's
graph of two calculator nodes) against values computed here, the course model's reply against transformers' greedy
generation, and an endpoint that does not answer reported as an error."""
import pytest
import torch

from course_lib.serve import chat_prompt

DONE = "() => document.querySelector('#totals textarea').value.startsWith('stop:')"


def ask(page, url, question, backend=None, loop=None, extra=None):
    "Open the demo, set the back end and loop, ask, wait for the run to end; (trace text, answer, totals)."
    page.goto(url, wait_until="load")
    box = page.locator("#question textarea")
    box.wait_for()
    if backend:
        page.locator("#backend label", has_text=backend).click()
    if loop:
        page.locator("#loop label", has_text=loop).click()
    for selector, value in (extra or {}).items():
        page.locator(f"{selector} textarea, {selector} input").first.fill(value)
    box.fill(question)
    page.locator("#ask").click()
    page.wait_for_function(DONE, timeout=90_000)
    return (page.locator("#trace").inner_text(), page.locator("#answer textarea").input_value(),
            page.locator("#totals textarea").input_value())


@pytest.mark.browser
def test_scripted_back_end_under_each_loop_and_a_dead_endpoint(launch_demo, page):
    import socket
    url = launch_demo("agents")
    trace, answer, totals = ask(page, url, "What is (12 + 30) * 7?")
    assert 'calculator({"expression": "(12 + 30) * 7"})' in trace and "thought" in trace
    assert answer == f"(12 + 30) * 7 = {(12 + 30) * 7}."
    assert totals.startswith("stop: answer · 2 model calls · 1 tool calls")

    code = "xs = [i * i for i in range(10)]\nprint(sum(xs), max(xs))"
    trace, answer, totals = ask(page, url, f"python: {code}", loop="ReWOO")
    want = f"{sum(i * i for i in range(10))} {9 * 9}"
    assert "plan" in trace and "python(" in trace and want in trace
    assert answer == f"The code printed:\n{want}"
    assert totals.startswith("stop: answer · 2 model calls · 1 tool calls")

    trace, answer, totals = ask(page, url, "What is 1 / 0?", loop="plan-and-reflect")
    assert 'calculator({"expression": "1 / 0"})' in trace and "reflect: #E1 failed: error: calculator raised ValueError: division by zero" in trace
    second = trace.split('search({"query": "What is 1 / 0?"})', 1)[1]       # the new plan's step and what follows it
    assert "the last plan failed" in trace and answer.startswith("The corpus says: [pydoc/")
    assert answer.removeprefix("The corpus says: ").splitlines()[0] in second   # the answer states the search's observation
    assert totals.startswith("stop: answer · 3 model calls · 2 tool calls")  # plan, new plan, solver; the failed call and the search

    trace, answer, totals = ask(page, url, "What is 6 * 7 and what is (1 + 2) * 3", loop="planner")
    graph = page.locator("#graph").inner_text()
    assert f"Q1 What is 6 * 7 → ✅ 6 * 7 = {6 * 7}." in graph and f"Q2 what is (1 + 2) * 3 → ✅ (1 + 2) * 3 = {(1 + 2) * 3}." in graph
    assert answer == f"6 * 7 = {6 * 7}. [Q1] (1 + 2) * 3 = {(1 + 2) * 3}. [Q2]"
    assert totals.startswith("stop: answer · 2 model calls · 2 tool calls")   # the planner's plan and merge; one searcher per node

    with socket.socket() as s:                                # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    trace, answer, totals = ask(page, url, "What is 1 + 1?", backend="endpoint",
                                extra={"#endpoint-url": f"http://127.0.0.1:{port}/v1"})
    assert answer.startswith("error: the back end failed: APIConnectionError") and totals == "stop: error"


@pytest.mark.browser
@pytest.mark.slow
def test_course_model_back_end_matches_transformers_greedy(launch_demo, page, tiny_run):
    from transformers import AutoModelForCausalLM
    tok, question = tiny_run.tok, "What is 2 + 3?"
    end = tok.special_tokens["<|im_end|>"]
    hf = AutoModelForCausalLM.from_pretrained(tiny_run.folder, local_files_only=True).eval()
    ids = tok.encode(chat_prompt([{"role": "user", "content": question}]))
    out = hf.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False, eos_token_id=end, pad_token_id=0)[0, len(ids):].tolist()
    want = tok.decode([t for t in out if t != end]).strip()
    assert "<tool_call>" not in want                          # the untrained model answers at once: one model turn

    url = launch_demo("agents", "--run", str(tiny_run.run))
    trace, answer, totals = ask(page, url, question, backend="course model", extra={"#max-steps": "1"})
    printable = lambda s: "".join(ch for ch in s if ch.isprintable())
    assert printable(answer) == printable(want)
    assert f"· 1 model calls · 0 tool calls · {len(ids)} + {len(out)} tokens" in totals
