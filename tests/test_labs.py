"""Every lab runs end to end at the ci tier, executed like a student would run it (a Jupyter kernel, cwd labs/)."""
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = Path(__file__).resolve().parents[1]
LABS = sorted(p.name for p in (REPO / "labs").glob("*.ipynb"))


def test_there_are_labs():
    assert LABS


@pytest.mark.parametrize("lab", LABS)
def test_lab_runs(lab):
    nb = nbformat.read(REPO / "labs" / lab, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO / "labs")}})
    try:
        client.execute()
    except CellExecutionError as e:
        pytest.fail(f"{lab} failed:\n{str(e)[-4000:]}")
