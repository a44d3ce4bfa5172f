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


# --- the suite sees what it claims ------------------------------------------------------------

BROWSER_PROBE = '''
import pytest
@pytest.mark.browser
def test_probe(page):
    pass
'''


def _run_probe(tmp_path, env_extra, user=()):
    "Run a one-test suite that needs the browser, with only the venv on PATH (so no Chromium is found)."
    import os
    import shutil
    import tempfile
    probe_dir = Path(tempfile.mkdtemp(prefix="browser-probe-"))            # under /tmp: an unprivileged user can enter it
    probe_dir.chmod(0o777)
    shutil.copy(REPO / "tests" / "conftest.py", probe_dir / "conftest.py")
    (probe_dir / "test_probe.py").write_text(BROWSER_PROBE)
    env = {"PATH": str(Path(sys.executable).parent), "HOME": str(probe_dir), "PYTHONPATH": os.environ.get("PYTHONPATH", "")} | env_extra
    cmd = [*user, sys.executable, "-m", "pytest", "-n", "0", "-rs", "-p", "no:cacheprovider", "--rootdir", str(probe_dir), str(probe_dir)]
    try:
        return subprocess.run(cmd, cwd=probe_dir, capture_output=True, text=True, timeout=120, env=env)
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)


def test_missing_chromium_fails_in_ci_and_for_root(tmp_path):
    import os
    out = _run_probe(tmp_path, {"CI": "1"})
    assert out.returncode == 1 and "1 error" in out.stdout and "no Chromium" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    assert "FAIL here" in out.stdout                                    # the header says so before any test runs
    if os.geteuid() == 0:
        out = _run_probe(tmp_path, {})
        assert out.returncode == 1 and "no Chromium" in out.stdout, out.stdout[-2000:]


def test_missing_chromium_skips_for_a_user_without_root(tmp_path):
    import os
    import shutil
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        assert setpriv, "setpriv (util-linux) runs the probe as an unprivileged user"
        out = _run_probe(tmp_path, {}, user=(setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"))
    else:
        out = _run_probe(tmp_path, {})
    assert out.returncode == 0 and "1 skipped" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    assert "not root and not in CI" in out.stdout                        # the reason is printed


def test_make_browser_does_not_continue_silently_without_chromium(tmp_path):
    "With no chromium and no apt-get on PATH, `make browser` fails for root and in CI."
    make = shutil_which("make")
    env = {"PATH": str(tmp_path / "empty"), "CI": "1"}
    (tmp_path / "empty").mkdir()
    for tool in ("sh", "id"):
        (tmp_path / "empty" / tool).symlink_to(shutil_which(tool))
    out = subprocess.run([make, "-s", "-C", str(REPO), "browser"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode != 0 and "make browser:" in out.stderr, out.stdout + out.stderr


def shutil_which(name):
    import shutil
    found = shutil.which(name)
    assert found, f"{name} not on PATH"
    return found


def test_and_or_are_never_mixed_without_parentheses():
    "`A and B or C` reads as `(A and B) or C`: an `and` inside an `or` must be written in parentheses (the camp notebook had one)."
    import ast
    import io
    import tokenize
    def unbracketed(src):
        tree = ast.parse(src)
        lines = src.splitlines()
        for node in ast.walk(tree):
            if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or):
                for part in node.values:
                    if isinstance(part, ast.BoolOp) and isinstance(part.op, ast.And):
                        before = lines[part.lineno - 1][:part.col_offset].rstrip()
                        if not before.endswith("("):
                            yield f"line {part.lineno}: {ast.get_source_segment(src, node)[:100]}"
    found = []
    for path in [*REPO.glob("nbs/*.ipynb"), *REPO.glob("labs/*.ipynb")]:
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] != "code":
                continue
            src = "\n".join(l for l in "".join(cell["source"]).splitlines() if not l.lstrip().startswith(("%", "!")))
            found += [f"{path.name} cell {cell.get('id')} {hit}" for hit in unbracketed(src)]
    for path in [*REPO.glob("course_lib/**/*.py"), *REPO.glob("tests/*.py"), *REPO.glob("benchmarks/*.py")]:
        found += [f"{path.relative_to(REPO)} {hit}" for hit in unbracketed(path.read_text())]
    assert not found, found


def test_required_dependencies_are_imported_not_skipped():
    "A test of a required package (core dependencies, the chain's data and hf extras) must fail without it, never skip."
    import tomllib
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + project["optional-dependencies"]["data"] + project["optional-dependencies"]["hf"]
    required = {re.split(r"[<>=\[ ]", spec, maxsplit=1)[0].replace("-", "_").lower() for spec in specs}
    skipped = []
    for path in REPO.glob("tests/*.py"):
        for name in re.findall(r"importorskip\(\s*[\"']([\w.]+)[\"']", path.read_text()):
            if name.split(".")[0].lower() in required:
                skipped.append(f"{path.name}: importorskip({name!r})")
    assert "transformers" in required and not skipped, skipped


def test_labs_and_benchmarks_import_only_public_names():
    "Labs and benchmarks use the library as a student would: no `_private` name from course_lib (they used three)."
    pattern = re.compile(r"from course_lib[\w.]* import \(?([^)\n]+(?:\n[^)\n]+)*)\)?")
    private = []
    sources = {p: p.read_text() for p in REPO.glob("benchmarks/*.py")}
    for nb in REPO.glob("labs/*.ipynb"):
        sources[nb] = "\n".join("".join(c["source"]) for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code")
    for path, text in sources.items():
        for names in pattern.findall(text):
            private += [f"{path.name}: {n.strip()}" for n in names.replace("\n", ",").split(",") if n.strip().startswith("_")]
        private += [f"{path.name}: {m}" for m in re.findall(r"course_lib(?:\.\w+)+\._\w+", text)]
    assert not private, private
