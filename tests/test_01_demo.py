"""Chapter 1's demo in a real browser: paste a document, see each step's verdict and the redacted text."""
import pytest


def _value(page, selector, predicate_js):
    page.wait_for_function(f"(sel) => {{ const el = document.querySelector(sel); return el && ({predicate_js})(el.value); }}",
                           arg=selector, timeout=60_000)
    return page.locator(selector).input_value()


@pytest.mark.browser
def test_data_demo_redacts_and_drops(launch_demo, page):
    url = launch_demo("data")
    page.goto(url, wait_until="load")
    doc = page.locator("#doc-input textarea")
    doc.wait_for()
    doc.fill("Write to jane.doe@example.com or ping 192.168.1.20 for access. The server is in the basement of the "
             "old building. It runs every night and sends a report to the team. The report lists the jobs that failed. "
             "Nobody reads it on weekends, and that is fine. Version 3.12.1 is installed there.")
    page.get_by_role("button", name="Clean").click()
    cleaned = _value(page, "#cleaned textarea", "v => v.includes('<EMAIL>')")
    assert "<IPV4>" in cleaned and "jane.doe" not in cleaned and "3.12.1" in cleaned   # the version is not an IP
    assert page.locator("#verdict textarea").input_value() == "KEPT"
    assert page.locator("#steps").get_by_text("pii").count() >= 1

    doc.fill("Buy cheap watches online now. " * 20)
    page.get_by_role("button", name="Clean").click()
    verdict = _value(page, "#verdict textarea", "v => v.startsWith('DROPPED')")
    assert verdict.startswith("DROPPED by repetition: top_2_gram_chars")
