"""course_lib.sandbox holds its guarantees: limits, isolation, cleanup, and a pipe that takes nothing on trust."""
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from course_lib.sandbox import (CodecError, SandboxDied, SandboxLimits, Session, decode, encode, isolation, run_code)

REPO = Path(__file__).resolve().parents[1]
ISOLATED = not isolation().missing


def test_output_memory_and_file_limits():
    r = run_code("print('x' * 5000)\nimport sys\nsys.stderr.write('y' * 5000)", SandboxLimits(output_bytes=1000))
    assert r.ok and len(r.stdout) == 1000 and len(r.stderr) == 1000
    r = run_code("b = bytearray(2 * 2**30)", SandboxLimits(memory_mb=1024))
    assert not r.ok and "MemoryError" in r.stderr
    r = run_code("open('big', 'wb').write(b'x' * 3 * 2**20)", SandboxLimits(file_mb=1))
    assert not r.ok and "File too large" in r.stderr
    r = run_code("import time\ntime.sleep(30)", SandboxLimits(wall_s=2))
    assert r.timed_out and r.reason == "ran past the time limit of 2 s"


def test_the_environment_is_not_inherited(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "secret-token")
    assert "secret-token" not in run_code("import os; print(dict(os.environ))").stdout


@pytest.mark.skipif(not ISOLATED, reason="this machine gives no namespaces: Isolation.missing says what is not guaranteed")
def test_isolation_holds_where_namespaces_work(tmp_path):
    secret = REPO / "instructor"
    r = run_code(f"""
import os, socket, subprocess, pathlib
def attempt(name, f):
    try: f(); print(name, 'ALLOWED')
    except Exception as e: print(name, 'refused')
attempt('read', lambda: open({str(next(secret.rglob('*.py')))!r}).read())
attempt('list', lambda: os.listdir({str(secret)!r}) or (_ for _ in ()).throw(OSError()))
attempt('git', lambda: open({str(REPO / '.git')!r}).read())
attempt('write', lambda: open({str(tmp_path / 'x')!r}, 'w').write('x'))
attempt('net', lambda: socket.create_connection(('127.0.0.1', 22), timeout=2))
attempt('parent', lambda: os.kill(os.getppid(), 0) if os.getppid() > 1 else (_ for _ in ()).throw(OSError()))
attempt('mount', lambda: subprocess.run(['umount', '/proc'], check=True, capture_output=True))
open('mine.txt', 'w').write('ok'); print('own folder writable')
""")
    assert r.ok, r.stderr
    assert "ALLOWED" not in r.stdout and "own folder writable" in r.stdout, r.stdout
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(not ISOLATED, reason="this machine gives no namespaces: Isolation.missing says what is not guaranteed")
def test_everything_the_code_started_ends_with_it():
    seconds = f"{300 + np.random.default_rng().random():.6f}"   # a command line no other process on this machine has
    with Session(SandboxLimits(wall_s=20)) as s:
        s.run(f"import os, subprocess\nsubprocess.Popen(['sleep', '{seconds}'], start_new_session=True)\n"
              "pid = os.fork()\nif pid == 0:\n    os.setsid()\n    import time\n    time.sleep(300)\n    os._exit(0)")
    time.sleep(1)
    sleepers = [p for p in os.listdir("/proc") if p.isdigit() and _cmdline(p) == f"sleep\x00{seconds}\x00"]
    assert sleepers == []


def _cmdline(pid: str) -> str:
    try: return open(f"/proc/{pid}/cmdline").read()
    except OSError: return ""


def test_session_values_cross_the_pipe_both_ways():
    import torch
    with Session(SandboxLimits(wall_s=30)) as s:
        s.run("import numpy as np\ndef stats(a, t): return {'sum': a.sum(), 'mean': t.float().mean(), 'shape': a.shape}\n"
              "def bump(a): a += 1\ndef gen(n):\n    yield from range(n)\nclass Weird:\n    def __eq__(self, other): return True\n"
              "def weird(): return Weird()\nstate = []\ndef remember(x): state.append(x); return len(state)")
        a = np.arange(6, dtype=np.int32).reshape(2, 3)
        out = s.call("stats", a, torch.ones(4, dtype=torch.bfloat16))
        assert out["sum"] == 15 and type(out["sum"]) is np.int64 and out["shape"] == (2, 3) and float(out["mean"]) == 1.0
        s.call("bump", a); assert a.tolist() == [[1, 2, 3], [4, 5, 6]]        # changed in place, copied back
        assert list(s.call("gen", 4)) == [0, 1, 2, 3]
        w = s.call("weird")
        assert (w == 1) is False and w != 1                                     # an object that stays inside cannot lie about equality
        with pytest.raises(TypeError): bool(w)
        assert s.call("remember", 1) == 1 and s.call("remember", 2) == 2       # state kept across calls
        with pytest.raises(NameError): s.get("nothing")


def test_the_pipe_refuses_what_a_sandbox_could_forge():
    for bad in [b"P" + struct.pack("<Q", 4) + b"junk",                          # pickle from the sandbox: never
                b"L" + struct.pack("<Q", 2**40),                               # a list longer than the message
                b"M" + struct.pack("<Q", 1) + b"L" + struct.pack("<Q", 0) + b"N",   # an unhashable key
                b"X" + struct.pack("<Q", 6) + b"object" + struct.pack("<Q", 9) + b"[[1], false]" + struct.pack("<Q", 8) + b"x" * 8,
                b"L" + struct.pack("<Q", 1) * 1 + b"L" * 1000]:
        with pytest.raises(CodecError): decode(bad)
    nested = [1]
    for _ in range(500): nested = [nested]
    with pytest.raises(CodecError): encode(nested)


def test_a_sandbox_that_dies_says_so():
    with Session(SandboxLimits(wall_s=20)) as s:
        s.run("def die():\n    import os\n    os._exit(7)")
        with pytest.raises(SandboxDied, match="exited with code 7"): s.call("die")
        with pytest.raises(SandboxDied): s.run("1")


UNPRIVILEGED_PROBE = """
import json, os, sys
from course_lib.grading import Limits, grade
from course_lib.sandbox import SandboxLimits, Session, isolation, run_code
iso = isolation()
attempts = run_code('''
import os, socket
def attempt(name, f):
    try: f(); print(name, 'ALLOWED')
    except Exception: print(name, 'refused')
attempt('read', lambda: open(%(secret)r).read())
attempt('write', lambda: open(%(outside)r, 'w').write('x'))
attempt('net', lambda: socket.create_connection(('127.0.0.1', 22), timeout=2))
attempt('parent', lambda: os.kill(os.getppid(), 0) if os.getppid() > 1 else (_ for _ in ()).throw(OSError()))
''')
with Session(SandboxLimits(wall_s=60)) as s:
    s.run("def double(x): return 2 * x")
    call = s.call("double", 21)
result = grade(%(source)r, limits=Limits(timeout_s=300), out=%(out)r)
print(json.dumps({"uid": os.geteuid(), "namespaces": iso.namespaces, "missing": list(iso.missing), "reason": iso.reason,
                  "stdout": attempts.stdout, "stderr": attempts.stderr[-2000:], "call": call, "points": result["points"],
                  "grade_missing": result["isolation_missing"], "problems": result["problems"]}))
"""


def _system_venv(folder: Path) -> str | None:
    "A venv over a system Python of this version (readable by any user) that sees this venv's packages; None if there is none."
    import subprocess, sys
    system = next((p for p in (f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}",) if os.path.exists(p)), None)
    if system is None or subprocess.run([system, "-m", "venv", "--without-pip", str(folder)], capture_output=True).returncode: return None
    site = next(folder.glob("lib/python*/site-packages"))
    (site / "course.pth").write_text(next(p for p in sys.path if p.endswith("site-packages")) + "\n")
    return str(folder / "bin" / "python")


@pytest.mark.slow
@pytest.mark.parametrize("namespaces", ["1", "0"])
def test_the_unprivileged_path(namespaces):
    """Issue #11: the sandbox and the grader as a user without privileges (as root: under `setpriv` as nobody, with a venv
    over the system Python, since this venv's interpreter lives in root's ~/.pyenv, which nobody may execute). With
    namespaces every guarantee must hold; without them (CAMP_SANDBOX_NAMESPACES=0) the grade must say why and which
    guarantees are gone, and still grade."""
    import json, pwd, shutil, subprocess, sys, tempfile
    root = os.geteuid() == 0
    if root and not (shutil.which("setpriv") and any(p.pw_uid == 65534 for p in pwd.getpwall())):
        pytest.skip("running as root on a machine without `setpriv` or a `nobody` user (uid 65534): no unprivileged user to become")
    shared = Path(tempfile.mkdtemp(prefix="camp-nobody-")); shared.chmod(0o777)   # a folder the unprivileged user may write
    try:
        python = _system_venv(shared / "venv") if root else sys.executable
        if python is None: pytest.skip(f"no system Python {sys.version_info.major}.{sys.version_info.minor} in /usr/bin to build a venv on")
        subprocess.run(["chmod", "-R", "a+rX", str(shared)], check=True)
        code = UNPRIVILEGED_PROBE % {"secret": str(next((REPO / "instructor").rglob("*.py"))), "outside": str(shared / "escaped"),
                                     "source": str(REPO / "instructor" / "hw00_core" / "hw00_core.ipynb"), "out": str(shared / "grade.json")}
        command = (["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"] if root else []) + [python, "-c", code]
        env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(shared), "TMPDIR": str(shared), "CAMP_SANDBOX_NAMESPACES": namespaces}
        run = subprocess.run(command, capture_output=True, text=True, env=env, cwd=shared, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        got = json.loads(run.stdout.strip().splitlines()[-1])
        assert got["uid"] != 0 and got["call"] == 42 and got["points"] == 10, got
        if got["namespaces"]:   # this user may create namespaces and start the interpreter in them: every guarantee holds
            assert got["missing"] == got["grade_missing"] == [] and "ALLOWED" not in got["stdout"], got
            assert got["stdout"].split() == ["read", "refused", "write", "refused", "net", "refused", "parent", "refused"], got
            assert not (shared / "escaped").exists()
        else:                   # it may not: the grade says why, and which guarantees are gone
            assert got["reason"], got
            assert set(got["grade_missing"]) == {"network", "hide", "write", "signals", "cleanup"}, got
            assert "stdout" in got and "write ALLOWED" in got["stdout"]   # and indeed it could write outside its folder
        if namespaces == "0": assert got["reason"] == "CAMP_SANDBOX_NAMESPACES=0 turned them off", got
        else:   # where this user may create a user namespace at all, the sandbox must have used it
            user_ns = subprocess.run(command[:-3] + ["unshare", "--user", "--map-root-user", "--mount", "--net", "--pid", "--fork", "true"]).returncode == 0
            assert got["namespaces"] == user_ns, (user_ns, got)
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_a_reference_re_exported_by_a_package_is_refused_under_every_import_path(tmp_path):
    "hw01 names `course_lib.data.quality_signals`; it is defined in `course_lib.data.filters`, and both spellings must refuse."
    from course_lib.sandbox import Session
    with Session(redact={"course_lib.data.quality_signals": "write it yourself"}) as s:
        out = s.run("import course_lib.data as d, course_lib.data.filters as f\n"
                    "for g in (d.quality_signals, f.quality_signals):\n"
                    "    try: g('a b c'); print('ALLOWED')\n"
                    "    except PermissionError: print('refused')\n")
        printed, _ = s.output()
    assert out["error"] is None and printed.split() == ["refused", "refused"], (out, printed)


def test_a_bare_top_level_module_can_be_forbidden():
    from course_lib.sandbox import Session
    with Session() as s:
        assert s.forbid({"json": "write your own serialiser"}) == []
        s.run("import json\ntry: json.dumps(1); print('ALLOWED')\nexcept PermissionError as e: print('refused:', e)")
        printed, _ = s.output()
    assert "refused: json is not allowed here: write your own serialiser" in printed and "ALLOWED" not in printed


def test_a_forbidden_class_can_still_be_subclassed_by_a_library_but_never_built():
    "hw03 forbids nn.Linear; transformers subclasses it at import, which must still work, while building one refuses."
    from course_lib.sandbox import Session
    with Session() as s:
        assert s.forbid({"torch.nn.Linear": "write the matmul yourself"}) == []
        out = s.run("import torch\nclass Mine(torch.nn.Linear): pass\n"
                    "for build in (lambda: torch.nn.Linear(2, 2), lambda: Mine(2, 2)):\n"
                    "    try: build(); print('ALLOWED')\n    except PermissionError as e: print('refused:', e)")
        printed, _ = s.output()
    assert out["error"] is None and printed.count("refused: torch.nn.Linear is not allowed here") == 2 and "ALLOWED" not in printed


def test_a_sandbox_that_cannot_start_says_why():
    "A process that dies before it can answer leaves its last line of stderr in the error, not a bare EOFError."
    with pytest.raises(SandboxDied, match="did not start.*MemoryError"):
        Session(SandboxLimits(memory_mb=1))   # too little to import IPython


MASKED_PROC = """
from course_lib.sandbox import Session, isolation
with Session() as s:
    s.run("import os; print(sorted(os.listdir('/proc')))")
    print(isolation().missing, s.missing, s.output()[0].strip())
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="masking /proc in a mount namespace takes root")
def test_a_container_that_masks_proc_still_gets_every_guarantee():
    """Docker-style containers cover parts of /proc, and the kernel then refuses a fresh /proc to a user namespace:
    the sandbox, as nobody, must still start, hide the machine's processes and keep every guarantee."""
    import shutil, subprocess, tempfile
    masked = next((p for p in ("/proc/keys", "/proc/timer_list", "/proc/sysrq-trigger", "/proc/kcore") if os.path.exists(p)), None)
    shared = Path(tempfile.mkdtemp(prefix="camp-masked-")); shared.chmod(0o777)   # pytest's tmp_path is root's alone
    python = _system_venv(shared / "venv") if masked else None
    if python is None: pytest.skip("no /proc file to mask or no system Python to build a venv for nobody on")
    subprocess.run(["chmod", "-R", "a+rX", str(shared)], check=True)
    nobody = f"setpriv --reuid 65534 --regid 65534 --clear-groups {python} -c \"$CODE\""
    run = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", f"mount --bind /dev/null {masked} && {nobody}"],
                         capture_output=True, text=True, cwd=shared, timeout=300,
                         env={**os.environ, "CODE": MASKED_PROC, "PYTHONPATH": str(REPO), "HOME": str(shared), "TMPDIR": str(shared)})
    shutil.rmtree(shared, ignore_errors=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split("\n")[-2] == "() () []", run.stdout
