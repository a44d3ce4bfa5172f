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
