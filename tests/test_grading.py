"""The grader survives what student notebooks do: raise, loop, print without end, delete files, hog memory, exit."""
import shutil
from pathlib import Path

import nbformat
import pytest

from course_lib.grading import Limits, grade

REPO = Path(__file__).resolve().parents[1]


def _homework_copy(tmp_path: Path, *bad_cells: str, before: bool = True) -> Path:
    "A student folder for hw00 whose notebook is the reference solution with `bad_cells` added before (or after) its code."
    folder = tmp_path / "hw00_core"
    shutil.copytree(REPO / "homework" / "hw00_core", folder)
    (folder / "data.txt").write_text("a file the notebook may try to delete")
    nb = nbformat.read(REPO / "instructor" / "hw00_core" / "hw00_core.ipynb", as_version=4)
    extra = [nbformat.v4.new_code_cell(src) for src in bad_cells]
    nb.cells = extra + nb.cells if before else nb.cells + extra
    nbformat.write(nb, folder / "student.ipynb")
    return folder


def test_misbehaving_but_correct_notebook_gets_full_marks_and_messages(tmp_path):
    folder = _homework_copy(
        tmp_path,
        "raise RuntimeError('boom')",
        "while True:\n    pass",
        "for _ in range(200):\n    print('x' * 100_000)",
        "import os, shutil\nfor name in os.listdir('.'):\n    shutil.rmtree(name) if os.path.isdir(name) else os.remove(name)",
        "hog = bytearray(8 * 2**30)",
    )
    result = grade(folder / "student.ipynb", limits=Limits(timeout_s=240, cell_timeout_s=3, memory_mb=3072),
                   out=tmp_path / "grade.json")
    assert result["points"] == result["max_points"] == 10, result
    errors = [e["error"] for e in result["notebook_errors"]]
    assert errors[0] == "RuntimeError: boom"
    problems = " | ".join(result["problems"])
    assert "cell 2 stopped: it ran past the time limit of 3 s" in problems
    assert "printed more than" in problems
    assert "ran out of memory" in problems
    # the student's real folder is untouched: the notebook ran in a throw-away copy
    assert (folder / "data.txt").exists() and (REPO / "instructor" / "hw00_core" / "grading" / "test_hw00.py").exists()
    assert (tmp_path / "grade.json").exists()


def test_notebook_that_defeats_cell_limits_is_stopped_and_scores_zero(tmp_path):
    folder = _homework_copy(tmp_path, "import time\nwhile True:\n    try:\n        time.sleep(1)\n    except Exception:\n        pass")
    result = grade(folder / "student.ipynb", limits=Limits(timeout_s=60, cell_timeout_s=2), out=tmp_path / "grade.json")
    assert result["max_points"] == 10 and result["points"] == 0
    assert "ran past the time limit of 2 s" in result["problems"][0], result["problems"]
    assert all("the notebook did not run" in t["message"] for q in result["questions"] for t in q["tests"])


def test_notebook_past_the_whole_run_limit_is_stopped_and_scores_zero(tmp_path):
    folder = _homework_copy(tmp_path, *["import time\ntime.sleep(1.5)"] * 40)   # each cell within its limit, all of them not
    result = grade(folder / "student.ipynb", limits=Limits(timeout_s=40, cell_timeout_s=2), out=tmp_path / "grade.json")
    assert result["max_points"] == 10 and result["points"] == 0
    assert "ran past the time limit of 40 s" in result["problems"][0]
    assert all(t["message"].startswith("not run") for q in result["questions"] for t in q["tests"])


def test_notebook_that_exits_the_process(tmp_path):
    folder = _homework_copy(tmp_path, "import os\nos._exit(3)", before=False)
    result = grade(folder / "student.ipynb", limits=Limits(timeout_s=120), out=tmp_path / "grade.json")
    assert result["max_points"] == 10 and result["points"] == 0
    assert "exited with code 3" in result["problems"][0]


def test_functions_imported_from_course_lib_do_not_count(tmp_path):
    folder = _homework_copy(tmp_path, "from course_lib.core import human_bytes", before=False)
    result = grade(folder / "student.ipynb", limits=Limits(timeout_s=120), out=tmp_path / "grade.json")
    q1 = next(q for q in result["questions"] if q["question"].startswith("q1"))
    assert q1["points"] == 0 and "imported from course_lib" in q1["tests"][0]["message"]
    assert result["points"] == result["max_points"] - q1["max_points"]


def test_bad_input_is_a_clear_error(tmp_path):
    (tmp_path / "broken.ipynb").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable Jupyter notebook"):
        grade(tmp_path / "broken.ipynb")
    with pytest.raises(FileNotFoundError, match="no notebook at"):
        grade(tmp_path / "missing.ipynb")
    nbformat.write(nbformat.v4.new_notebook(), tmp_path / "orphan.ipynb")
    with pytest.raises(FileNotFoundError, match="no grading tests found"):
        grade(tmp_path / "orphan.ipynb")


def test_a_graded_function_that_never_returns_fails_only_its_tests(tmp_path):
    folder = _homework_copy(tmp_path, "def human_bytes(n):\n    while True:\n        pass", before=False)
    result = grade(folder / "student.ipynb", limits=Limits(timeout_s=240, test_timeout_s=2), out=tmp_path / "grade.json")
    q1 = next(q for q in result["questions"] if q["question"].startswith("q1"))
    assert q1["points"] == 0 and all("time limit of 2 s" in t["message"] for t in q1["tests"])
    assert result["points"] == result["max_points"] - q1["max_points"]
