"""Shared fixtures: the test tier, a tiny exported chat model, a launched demo, and a headless-Chromium page."""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("CAMP_TIER", "ci")
os.environ.setdefault("CAMP_PROGRESS", "0")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ["CAMP_SETTINGS"] = str(REPO / "settings.ini")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NO_CHROMIUM = "no Chromium: install it with `make browser` (apt-get install chromium, as root)"


def missing_browser_verdict() -> str:
    "'fail' where the suite must drive a browser (CI, or root, who can install one), else 'skip' (a user without root)."
    return "fail" if os.environ.get("CI") or os.geteuid() == 0 else "skip"


def pytest_report_header(config):
    if CHROMIUM:
        return f"browser tests: Chromium at {CHROMIUM}"
    if missing_browser_verdict() == "fail":
        return f"browser tests: {NO_CHROMIUM}; they FAIL here (CI or root)"
    return f"browser tests: {NO_CHROMIUM}; SKIPPED because this user is not root and not in CI"


@pytest.fixture
def repo_root() -> Path:
    return REPO


@pytest.fixture
def tiny_run(tmp_path):
    """A run folder holding a tiny, untrained chat model at pretrain/model (BPE tokenizer with the chat specials, Decoder,
    Hugging Face layout): SimpleNamespace(run, folder, tok, model). Seeded, so a test can recompute what a demo shows."""
    from course_lib.model import export_hf
    from course_lib.tokenizer import save_hf
    from tiny import tiny_chat_model
    model, tok = tiny_chat_model()
    folder = tmp_path / "pretrain" / "model"
    save_hf(tok, folder)
    export_hf(model, folder, tokenizer=folder)
    return SimpleNamespace(run=tmp_path, folder=folder, tok=tok, model=model)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def launch_demo(tmp_path):
    """Start `camp demo NAME ...` in a subprocess; returns its URL once it serves. Killed at teardown."""
    procs = []

    def launch(name: str, *extra_args: str, timeout: float = 120) -> str:
        port = _free_port()
        log = open(tmp_path / f"demo-{name}.log", "w+")
        camp = Path(sys.executable).with_name("camp")
        proc = subprocess.Popen([str(camp), "demo", name, "--port", str(port), *extra_args], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append((proc, log))
        url = f"http://127.0.0.1:{port}/"
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"camp demo {name} exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return url
            except OSError:
                time.sleep(0.5)
        log.seek(0)
        raise TimeoutError(f"camp demo {name} did not serve {url} within {timeout} s:\n{log.read()[-3000:]}")

    yield launch
    for proc, log in procs:
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        proc.wait()
        log.close()


@pytest.fixture(scope="session")
def browser():
    if CHROMIUM is None:
        if missing_browser_verdict() == "fail":
            pytest.fail(f"{NO_CHROMIUM}; CI and root must run the browser tests", pytrace=False)
        pytest.skip(f"{NO_CHROMIUM}; skipped because this user is not root and not in CI")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh Playwright page in headless Chromium (wait for `load`, then for an element)."""
    context = browser.new_context()
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    yield pg
    context.close()
