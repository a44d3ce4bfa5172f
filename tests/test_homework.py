"""Every homework is gradable end to end: its reference solution scores full marks, the untouched notebook scores 0."""
from pathlib import Path

import pytest

from course_lib.grading import Limits, grade

REPO = Path(__file__).resolve().parents[1]
HOMEWORK = sorted(p.name for p in (REPO / "homework").iterdir() if (p / "grading").is_dir())


def test_there_is_homework():
    assert "hw00_core" in HOMEWORK


@pytest.mark.parametrize("hw", HOMEWORK)
def test_solution_scores_full_marks(hw, tmp_path):
    result = grade(REPO / "homework" / hw / "solution.ipynb", limits=Limits(timeout_s=300), out=tmp_path / "grade.json")
    failures = [t for q in result["questions"] for t in q["tests"] if not t["passed"]]
    assert result["max_points"] > 0
    assert result["points"] == result["max_points"], f"{failures}\n{result['problems']}"


@pytest.mark.parametrize("hw", HOMEWORK)
def test_untouched_notebook_scores_zero(hw, tmp_path):
    result = grade(REPO / "homework" / hw / f"{hw}.ipynb", limits=Limits(timeout_s=300), out=tmp_path / "grade.json")
    assert result["max_points"] > 0 and result["points"] == 0, result
    assert all("NotImplementedError" in t["message"] for q in result["questions"] for t in q["tests"])
