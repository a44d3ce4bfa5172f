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
    # a whole-run limit far above the cell's, so that a loaded machine's slow start (the forbidding imports torch) cannot win
    result = grade(folder / "student.ipynb", limits=Limits(timeout_s=300, cell_timeout_s=2), out=tmp_path / "grade.json")
    assert result["max_points"] == 10 and result["points"] == 0
    assert "ran past the time limit of 2 s" in result["problems"][0], result["problems"]
    assert all("the notebook did not run" in t["message"] for q in result["questions"] for t in q["tests"])


def test_notebook_past_the_whole_run_limit_is_stopped_and_scores_zero(tmp_path):
    folder = _homework_copy(tmp_path, *["import time\ntime.sleep(1.5)"] * 60)   # each cell within its limit, all of them not
    result = grade(folder / "student.ipynb", limits=Limits(timeout_s=60, cell_timeout_s=2), out=tmp_path / "grade.json")
    assert result["max_points"] == 10 and result["points"] == 0
    assert "ran past the time limit of 60 s" in result["problems"][0]
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


def test_camp_grades_a_folder_into_a_gradebook_and_assigns(tmp_path):
    "Instructor mode: one row per submission, one column per question; `camp assign` regenerates a student notebook."
    import csv, json, subprocess, sys
    submissions = tmp_path / "submissions"
    (submissions / "bob").mkdir(parents=True)
    shutil.copy2(REPO / "instructor" / "hw00_core" / "hw00_core.ipynb", submissions / "alice.ipynb")
    shutil.copy2(REPO / "homework" / "hw00_core" / "hw00_core.ipynb", submissions / "bob" / "hw00_core.ipynb")
    camp = [sys.executable, "-c", "import sys; from course_lib.camp import main; sys.exit(main())"]
    out = subprocess.run(camp + ["grade", str(submissions), "--homework", str(REPO / "instructor" / "hw00_core"), "--timeout", "240"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    rows = {r["student"]: r for r in csv.DictReader(open(submissions / "gradebook.csv"))}
    assert (rows["alice"]["points"], rows["bob"]["points"]) == ("10.0", "0.0")
    assert rows["alice"]["q3 limit_records"] == "4.0" and rows["bob"]["q1 human_bytes"] == "0.0"
    book = json.loads((submissions / "gradebook.json").read_text())
    assert [b["student"] for b in book] == ["alice", "bob"] and all(len(b["questions"]) == 3 for b in book)
    out = subprocess.run(camp + ["assign", str(REPO / "instructor" / "hw00_core"), "--out", str(tmp_path / "s.ipynb")],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert nbformat.read(tmp_path / "s.ipynb", as_version=4) == nbformat.read(REPO / "homework" / "hw00_core" / "hw00_core.ipynb", as_version=4)


def test_assign_moves_an_old_layout_homework(tmp_path):
    "One command converts a homework written in the old layout (student notebook, solution.ipynb, grading/)."
    from course_lib.grading import assign
    (tmp_path / "settings.ini").write_text("")
    old = tmp_path / "homework" / "hw09_x"
    (old / "grading").mkdir(parents=True)
    (old / "grading" / "test_hw09.py").write_text("")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("def f(x):\n    ### BEGIN SOLUTION\n    return x\n    ### END SOLUTION")])
    nbformat.write(nb, old / "solution.ipynb")
    student = assign(old)
    assert student == tmp_path / "homework" / "hw09_x" / "hw09_x.ipynb"
    assert nbformat.read(student, as_version=4).cells[0].source == "def f(x):\n    raise NotImplementedError()"
    assert (tmp_path / "instructor" / "hw09_x" / "hw09_x.ipynb").exists() and (tmp_path / "instructor" / "hw09_x" / "grading" / "test_hw09.py").exists()
    assert not (old / "solution.ipynb").exists() and not (old / "grading").exists()
    with pytest.raises(ValueError, match="not closed"):
        nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("### BEGIN SOLUTION\nx = 1")]), tmp_path / "bad.ipynb")
        assign(tmp_path / "bad.ipynb", out=tmp_path / "bad_student.ipynb")


def test_a_process_killed_mid_grading_is_restarted_for_the_next_questions(tmp_path):
    "Issue #11: a segfault in a graded function fails its own tests; a fresh process re-runs the notebook for the next ones."
    folder = _homework_copy(tmp_path, "import ctypes\ndef split_of(doc_id, fraction=0.05): ctypes.string_at(0)", before=False)
    result = grade(folder / "student.ipynb", limits=Limits(timeout_s=300), out=tmp_path / "grade.json")
    q = {q["question"][:2]: q for q in result["questions"]}
    assert q["q1"]["points"] == q["q1"]["max_points"] and q["q3"]["points"] == q["q3"]["max_points"] > 0, result["problems"]
    assert q["q2"]["points"] == 0 and all("killed by signal 11" in t["message"] for t in q["q2"]["tests"]), q["q2"]
    died = [p for p in result["problems"] if "died during" in p]
    assert len(died) == 2 and "test_split_of_edge_fractions (the sandboxed process was killed by signal 11)" in died[0], result["problems"]


def test_a_process_that_keeps_dying_stops_after_max_restarts(tmp_path):
    "os._exit and abort() in graded functions: after MAX_RESTARTS fresh processes the remaining tests fail, saying why."
    from course_lib.grading import MAX_RESTARTS
    folder = _homework_copy(tmp_path, "import os\ndef human_bytes(n): os._exit(5)\ndef split_of(doc_id, fraction=0.05): os.abort()",
                            before=False)
    result = grade(folder / "student.ipynb", limits=Limits(timeout_s=300), out=tmp_path / "grade.json")
    tests = [t for q in result["questions"] for t in q["tests"]]
    assert result["points"] == 0 and len(tests) > MAX_RESTARTS + 1
    assert all("exited with code 5" in t["message"] for t in tests[:2]), tests
    assert all("the sandboxed process" in t["message"] and "exited with code 5" not in t["message"] for t in tests[2:4]), tests
    assert all(f"died {MAX_RESTARTS + 1} times" in t["message"] for t in tests[MAX_RESTARTS + 1:]), tests
    assert sum("died during" in p for p in result["problems"]) == MAX_RESTARTS + 1
    assert f"the notebook's process died {MAX_RESTARTS + 1} times; the remaining tests were not run" in result["problems"]


def test_a_reference_that_does_not_exist_stops_the_grade_with_its_name(tmp_path):
    "An instructor's typo in REFERENCES would leave the answer importable: the grade stops and names it instead."
    homework = tmp_path / "instructor" / "hw00_core"
    shutil.copytree(REPO / "instructor" / "hw00_core", homework)
    tests = homework / "grading" / "test_hw00.py"
    tests.write_text(tests.read_text().replace('"course_lib.core.human_bytes"', '"course_lib.core.human_bytez"', 1))
    result = grade(homework / "hw00_core.ipynb", homework, limits=Limits(timeout_s=120), out=tmp_path / "grade.json")
    assert result["points"] == 0
    assert any("course_lib.core.human_bytez" in t["message"] for q in result["questions"] for t in q["tests"]), result
