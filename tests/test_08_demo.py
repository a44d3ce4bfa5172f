"""Chapter 8's evaluation demo in a real browser: the leaderboard it shows equals an in-process evaluation of the same model."""
import pytest

from course_lib.eval import CourseLM, cloze_task, evaluate


@pytest.mark.browser
def test_eval_demo_shows_the_leaderboard(launch_demo, page, tiny_run):
    want = evaluate(CourseLM(tiny_run.model, tiny_run.tok), cloze_task(8))["metrics"]["acc"]

    url = launch_demo("eval", "--run", str(tiny_run.run))
    page.goto(url, wait_until="load")
    number = page.locator("#n-items input[type=number]")
    number.fill("8")
    number.press("Enter")
    page.locator("#run").click()
    page.wait_for_function("() => document.querySelector('#leaderboard').innerText.includes('cloze_en/acc')", timeout=90_000)
    text = page.locator("#leaderboard").inner_text()
    assert f"{want:.3f}" in text, text
    page.wait_for_selector("#heatmap img", timeout=60_000)
