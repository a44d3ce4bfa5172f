"""Every homework is gradable end to end: its source (the solution) scores full marks, the generated student notebook scores 0,
and the committed student notebook is exactly what `camp assign` generates from the source."""
from pathlib import Path

import nbformat
import pytest

from course_lib.grading import Limits, assign, grade

REPO = Path(__file__).resolve().parents[1]
HOMEWORK = sorted(p.name for p in (REPO / "instructor").iterdir() if (p / "grading").is_dir())


def test_there_is_homework():
    assert "hw00_core" in HOMEWORK


def test_no_solutions_or_grading_tests_in_the_students_folders():
    leaks = [str(p.relative_to(REPO)) for p in (REPO / "homework").rglob("*") if p.name == "grading" or p.name.startswith("solution")]
    assert leaks == [], f"move these to instructor/ with `camp assign homework/NAME`: {leaks}"


@pytest.mark.parametrize("hw", HOMEWORK)
def test_student_notebook_is_generated_from_the_source(hw, tmp_path):
    generated = assign(REPO / "instructor" / hw, out=tmp_path / f"{hw}.ipynb")
    committed = REPO / "homework" / hw / f"{hw}.ipynb"
    assert committed.exists(), f"run `camp assign instructor/{hw}`"
    assert nbformat.read(committed, as_version=4) == nbformat.read(generated, as_version=4), f"run `camp assign instructor/{hw}`"


@pytest.mark.parametrize("hw", HOMEWORK)
def test_source_scores_full_marks(hw, tmp_path):
    result = grade(REPO / "instructor" / hw / f"{hw}.ipynb", limits=Limits(timeout_s=300), out=tmp_path / "grade.json")
    failures = [t for q in result["questions"] for t in q["tests"] if not t["passed"]]
    assert result["max_points"] > 0
    assert result["points"] == result["max_points"], f"{failures}\n{result['problems']}"


@pytest.mark.parametrize("hw", HOMEWORK)
def test_untouched_notebook_scores_zero(hw, tmp_path):
    result = grade(REPO / "homework" / hw / f"{hw}.ipynb", limits=Limits(timeout_s=300), out=tmp_path / "grade.json")
    assert result["max_points"] > 0 and result["points"] == 0, result
    assert all("NotImplementedError" in t["message"] for q in result["questions"] for t in q["tests"])
