"""Every lesson notebook runs top to bottom under nbdev-test (cells flagged gpu/slow are skipped)."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LESSONS = sorted(p.name for p in (REPO / "nbs").glob("*.ipynb"))


@pytest.mark.parametrize("notebook", LESSONS)
def test_lesson_runs(notebook):
    nbdev_test = Path(sys.executable).with_name("nbdev-test")
    out = subprocess.run([str(nbdev_test), f"nbs/{notebook}", "--do-print"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "Success" in out.stdout, f"{notebook} failed:\n{(out.stdout + out.stderr)[-6000:]}"
