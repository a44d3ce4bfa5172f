"""Every lab runs end to end at the ci tier, executed like a student would run it (a Jupyter kernel, cwd labs/).

Each lab runs in a private copy of the course layout (tmp/labs/LAB.ipynb, so its `../runs` is tmp/runs, with the course's settings.ini in tmp):
labs never read another lab's outputs while `pytest -n 2` runs them at once, and each builds what it needs
(a lab falls back to the embedded corpus when the earlier lab's run folder is absent). A lab's checks print
PASS or FAIL; the shipped defaults must all pass."""
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = Path(__file__).resolve().parents[1]
LABS = sorted(p.name for p in (REPO / "labs").glob("*.ipynb"))


def test_there_are_labs():
    assert LABS


def _printed(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def _execute(nb, tmp_path, lab: str):
    cwd = tmp_path / "labs"
    cwd.mkdir()
    shutil.copy2(REPO / "settings.ini", tmp_path)          # the course's settings, so $CAMP_TIER picks its tier as in a clone
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    try:
        client.execute()
    except CellExecutionError as e:
        pytest.fail(f"{lab} failed:\n{str(e)[-4000:]}")


@pytest.mark.parametrize("lab", LABS)
def test_lab_runs(lab, tmp_path):
    nb = nbformat.read(REPO / "labs" / lab, as_version=4)
    _execute(nb, tmp_path, lab)
    printed = _printed(nb)
    assert "FAIL:" not in printed, f"{lab}: a check fails with the shipped defaults:\n{printed[printed.index('FAIL:'):][:600]}"
    n_todo = sum(c.cell_type == "code" and c.source.lstrip().startswith("# TODO") for c in nb.cells)
    assert 2 <= n_todo <= 4 and printed.count("PASS:") >= n_todo, f"{lab}: {n_todo} TODO cells, {printed.count('PASS:')} passed checks"


def test_a_wrong_answer_prints_fail_with_its_hint(tmp_path):
    """A student's bytes_by_kind that counts characters instead of bytes: the check says FAIL and gives the hint."""
    nb = nbformat.read(REPO / "labs" / "00_core.ipynb", as_version=4)
    todo = next(c for c in nb.cells if c.cell_type == "code" and "def bytes_by_kind" in c.source)
    todo.source = todo.source.replace('len(d["text"].encode("utf-8"))', 'len(d["text"])')
    _execute(nb, tmp_path, "00_core.ipynb")
    printed = _printed(nb)
    assert "FAIL: bytes_by_kind on three hand-counted documents" in printed and "hint: 'héllo' is 6 bytes" in printed
