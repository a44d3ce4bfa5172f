"""Issue #11 §1: submissions that try to forge a grade. Each one solves nothing, so the honest grade is 0, and the
instructor's files must be unchanged afterwards (hashed before and after)."""
import hashlib
import http.server
import shutil
import threading
from pathlib import Path

import nbformat
import pytest

from course_lib.grading import Limits, format_grade, grade
from course_lib import core
from course_lib.confine import library_copies
from course_lib.sandbox import isolation

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "instructor" / "hw00_core" / "hw00_core.ipynb"
GRADING = REPO / "instructor" / "hw00_core" / "grading" / "test_hw00.py"


def _hashes() -> dict:
    files = [p for d in ("instructor", "homework") for p in sorted((REPO / d).rglob("*")) if p.is_file() and "__pycache__" not in p.parts]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _grade_with(tmp_path, *cells) -> dict:
    "Grade the untouched student notebook of hw00 with `cells` added at its end."
    folder = tmp_path / "hw00_core"
    shutil.copytree(REPO / "homework" / "hw00_core", folder)
    nb = nbformat.read(folder / "hw00_core.ipynb", as_version=4)
    nb.cells += [nbformat.v4.new_code_cell(c) for c in cells]
    nbformat.write(nb, folder / "hw00_core.ipynb")
    return grade(folder / "hw00_core.ipynb", limits=Limits(timeout_s=240, test_timeout_s=20), out=tmp_path / "grade.json")


WRAP = """
from course_lib import core
def human_bytes(n): return core.human_bytes(n)
def split_of(d, f=0.05): return core.split_of(d, f)
def limit_records(r, a=None, b=None): return core.limit_records(r, a, b)
"""
RUN_SOLUTION = f"""
import json, subprocess
for cell in json.load(open({str(SOURCE)!r}))["cells"]:
    if cell["cell_type"] == "code": exec("".join(cell["source"]))
"""
GIT_HISTORY = f"""
import subprocess
src = subprocess.run(["git", "-C", {str(REPO)!r}, "show", "HEAD:instructor/hw00_core/hw00_core.ipynb"], capture_output=True, text=True).stdout
import json
for cell in json.loads(src)["cells"]:
    if cell["cell_type"] == "code": exec("".join(cell["source"]))
"""
PATCH_LIBRARY = """
import course_lib.core as core, course_lib
core.human_bytes = core.split_of = core.limit_records = lambda *a, **k: None
def human_bytes(n): return None
def split_of(d, f=0.05): return None
def limit_records(r, a=None, b=None): return None
"""
FORGE_RESULTS = """
import gc, json, os
for obj in gc.get_objects():
    if type(obj).__name__ in ("_GradingPlugin", "Session", "_Endpoint"):
        print("found", type(obj).__name__)
line = json.dumps({"type": "test", "nodeid": "x", "passed": True, "message": ""}) + "\\n"
for fd in range(3, 64):
    try: os.write(fd, line.encode() * 50)
    except OSError: pass
for pid in os.listdir("/proc"):
    if pid.isdigit():
        for fd in range(3, 32):
            try:
                with open(f"/proc/{pid}/fd/{fd}", "w") as f: f.write(line * 50)
            except OSError: pass
os._exit(0)
"""
REWRITE_TESTS = f"""
from pathlib import Path
for target in [Path({str(GRADING)!r}), *Path("/tmp").glob("camp-grade-*/tests/test_hw00.py")]:
    try: target.write_text("import pytest\\n@pytest.mark.question('q1 human_bytes', points=10)\\ndef test_free(student): pass\\n")
    except OSError as e: print("refused", target, e)
"""
OPEN_SOCKET = """
import urllib.request
exec(urllib.request.urlopen("http://127.0.0.1:{port}/solution.py", timeout=5).read().decode())
"""
KILL_PARENT = """
import os, signal
for pid in {os.getppid(), *[int(p) for p in os.listdir("/proc") if p.isdigit()]} - {os.getpid(), 0}:
    try: os.kill(pid, signal.SIGKILL)
    except OSError: pass
try: os.kill(os.getppid(), signal.SIGKILL)
except OSError: pass
"""
RELOAD_REFERENCE = """
import importlib, course_lib.core as core
core = importlib.reload(core)
def human_bytes(n): return core.human_bytes(n)
def split_of(d, f=0.05): return core.split_of(d, f)
def limit_records(r, a=None, b=None): return core.limit_records(r, a, b)
"""
FRESH_REFERENCE = f"""
import importlib, importlib.util, sys
for name in [n for n in sys.modules if n.startswith("course_lib")]: del sys.modules[name]
ref = importlib.import_module("course_lib.core")
for path in [*{[str(p / "core.py") for p in library_copies()] + [core.__file__]!r}, *[p + "/course_lib/core.py" for p in sys.path if p]]:
    try:
        spec = importlib.util.spec_from_file_location("core_copy", path)
        copy = importlib.util.module_from_spec(spec); spec.loader.exec_module(copy)
        copy.human_bytes(1); ref = copy; break
    except Exception: pass
def human_bytes(n): return ref.human_bytes(n)
def split_of(d, f=0.05): return ref.split_of(d, f)
def limit_records(r, a=None, b=None): return ref.limit_records(r, a, b)
"""
ATTACKS = {"wrap_the_reference": (WRAP, ()), "run_the_solution": (RUN_SOLUTION, ("hide",)), "read_git_history": (GIT_HISTORY, ("hide",)),
           "patch_course_lib": (PATCH_LIBRARY, ()), "forge_results": (FORGE_RESULTS, ("signals",)),
           "rewrite_grading_tests": (REWRITE_TESTS, ("write", "hide")), "open_a_socket": (OPEN_SOCKET, ("network",)),
           "kill_the_parent": (KILL_PARENT, ("signals",)),
           "reload_the_reference": (RELOAD_REFERENCE, ("hide",)), "fresh_copy_of_the_reference": (FRESH_REFERENCE, ("hide",))}


@pytest.fixture
def solution_server():
    "Serves the solution's code on 127.0.0.1, as a student's own server might."
    code = "\n".join(c.source for c in nbformat.read(SOURCE, as_version=4).cells if c.cell_type == "code")
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(code.encode())
        def log_message(self, *a): pass
    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_attack_earns_nothing_and_changes_nothing(attack, tmp_path, solution_server):
    code, needs = ATTACKS[attack]
    before = _hashes()
    result = _grade_with(tmp_path, code.replace("{port}", str(solution_server)))
    assert _hashes() == before, "the instructor's or the students' files changed"
    missing = set(needs) & set(isolation().missing)
    if missing:   # this machine cannot give the guarantee the defence rests on: the grade must say so
        assert set(result["isolation_missing"]) >= missing
    else:
        assert result["max_points"] == 10 and result["points"] == 0, (attack, result["problems"], result["questions"])


def test_next_student_is_graded_by_the_instructors_tests(tmp_path):
    "After a submission tried to rewrite the grading tests, an untouched notebook still scores 0."
    _grade_with(tmp_path / "a", REWRITE_TESTS)
    result = grade(REPO / "homework" / "hw00_core" / "hw00_core.ipynb", limits=Limits(timeout_s=240), out=tmp_path / "grade.json")
    assert result["max_points"] == 10 and result["points"] == 0


def test_without_namespaces_the_grade_names_what_is_not_guaranteed(tmp_path, monkeypatch):
    monkeypatch.setenv("CAMP_SANDBOX_NAMESPACES", "0")
    result = grade(SOURCE, limits=Limits(timeout_s=240), out=tmp_path / "grade.json")
    assert result["points"] == result["max_points"] == 10, result["problems"]
    assert {"network", "hide", "cleanup"} <= set(result["isolation_missing"])
    assert result["isolation_reason"] == "CAMP_SANDBOX_NAMESPACES=0 turned them off"
    text = format_grade(result)
    assert "! namespaces unavailable: CAMP_SANDBOX_NAMESPACES=0 turned them off" in text and "! not guaranteed on this machine: no network access" in text
