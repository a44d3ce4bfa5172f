"""`camp` end to end: the whole chain at the ci tier, the doctor, settings errors, grading from the command line."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from course_lib.core import STAGES, discover

REPO = Path(__file__).resolve().parents[1]
CAMP = str(Path(sys.executable).with_name("camp"))


def camp(*args, cwd=REPO, timeout=900):
    return subprocess.run([CAMP, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_every_module_imports():
    assert discover() == {}


@pytest.mark.slow
def test_camp_run_walks_the_whole_chain(tmp_path):
    out = camp("run", "--tier", "ci", "--name", "chain", "--root", str(tmp_path))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    folder = tmp_path / "chain"
    summary = json.loads((folder / "summary.json").read_text())
    report = (folder / "report.md").read_text()
    discover()
    assert summary["failed"] is None
    for name in STAGES:
        assert f"## {name} (" in report, f"stage {name} missing from the report"
        assert (folder / name).is_dir()
    assert "Not run" not in report
    assert (folder / "timeline.png").stat().st_size > 1000
    assert summary["stages"]["corpus"]["bytes"] <= 300_000  # the ci tier's corpus slice


def test_failed_stage_keeps_the_report_and_exits_nonzero(tmp_path):
    out = camp("run", "--tier", "ci", "--name", "bad", "--root", str(tmp_path), "--stages", "corpus",
               "corpus=/no/such/folder")
    assert out.returncode == 1 and "stage 'corpus' failed" in out.stderr
    report = (tmp_path / "bad" / "report.md").read_text()
    assert "corpus: FAILED" in report and "does not exist" in report


def test_settings_errors_are_clear():
    out = camp("run", "--tier", "tpu")
    assert out.returncode == 2 and "unknown tier 'tpu'" in out.stderr and "cpu" in out.stderr
    out = camp("settings", "vocab=5")
    assert out.returncode == 2 and "did you mean 'vocab_size'" in out.stderr
    out = camp("settings", "--tier", "gpu", "steps=7")
    assert out.returncode == 0 and "16384" in out.stdout and " 7 " in out.stdout


def test_doctor_reports_the_machine():
    out = camp("doctor")
    assert out.returncode == 0, out.stderr
    for item in ("torch", "device", "triton interpreter", "free disk"):
        assert item in out.stdout
    assert "2.13.0" in out.stdout
    assert re.search(r"triton interpreter.*│ yes", out.stdout), out.stdout


def test_camp_grade_prints_a_table_and_writes_json(tmp_path):
    out = camp("grade", "instructor/hw00_core/hw00_core.ipynb", "--out", str(tmp_path / "g.json"), "--seed", "7")
    assert out.returncode == 0, out.stderr
    assert "10 / 10 points" in out.stdout and "q3 limit_records" in out.stdout
    grade = json.loads((tmp_path / "g.json").read_text())
    assert grade["seed"] == 7 and grade["points"] == 10
