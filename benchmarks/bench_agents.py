"""Chapter 9: hostile programs through the interpreter tool (tried / escaped, time to contain), sandbox start-up and
per-call overhead, and ReAct vs ReWOO on the scripted back end. Run: python benchmarks/bench_agents.py"""
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_09_agents import ESCAPES, MARK, _attacks, _host_processes_with   # the attacks the tests run
from course_lib.agents import PythonInterpreter, ScriptedModel, calculator, react, rewoo
from course_lib.sandbox import SandboxLimits, isolation

LIMITS = SandboxLimits(cpu_s=20, wall_s=4, memory_mb=512, output_bytes=20_000, file_mb=4)

def hostile() -> list[dict]:
    import socket, threading
    srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(); srv.settimeout(0.2)
    state = {"accepted": False, "stop": False}
    def loop():
        while not state["stop"]:
            try: srv.accept()[0].close(); state["accepted"] = True
            except OSError: pass
    threading.Thread(target=loop, daemon=True).start()
    rows, tmp = [], Path(tempfile.mkdtemp())
    secret = tmp / "hidden" / "s.txt"; secret.parent.mkdir(); secret.write_text("top secret")
    outside = tmp / "outside.txt"
    for name, (code, needs) in _attacks(secret, outside, srv.getsockname()[1]).items():
        with PythonInterpreter(LIMITS, hidden=[secret.parent]) as interp:
            t0 = time.monotonic(); obs = interp.tool.run({"code": code}); took = time.monotonic() - t0
            after = interp.tool.run({"code": "print(6 * 7)"})
        time.sleep(0.3)
        escaped = ESCAPES.get(name, lambda o, c: False)(obs, {"outside": outside, **state})
        for pid in _host_processes_with(MARK): os.kill(pid, 9)
        rows.append({"attack": name, "seconds": round(took, 2), "escaped": bool(escaped), "tool_ok_after": after == "42",
                     "observation": obs.replace("\n", " ")[:70]})
    state["stop"] = True
    return rows

def overhead(n: int = 20) -> dict:
    t0 = time.perf_counter(); interp = PythonInterpreter(LIMITS); interp.tool.run({"code": "x = 0"}); start = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(n): interp.tool.run({"code": "x += 1"})
    per_call = (time.perf_counter() - t0) / n
    interp.close()
    return {"startup_s": round(start, 3), "per_call_ms": round(per_call * 1000, 2)}

def react_vs_rewoo() -> dict:
    q = "3 apples at 4 and bread at 5: total?"
    ra = react(ScriptedModel(['<tool_call>{"name": "calculator", "arguments": {"expression": "3 * 4"}}</tool_call>',
                              '<tool_call>{"name": "calculator", "arguments": {"expression": "12 + 5"}}</tool_call>', "17"]), [calculator], q)
    rw = rewoo(ScriptedModel(['#E1 = calculator[{"expression": "3 * 4"}]\n#E2 = calculator[{"expression": "#E1 + 5"}]', "17"]), [calculator], q)
    return {k: {"answer": t.answer, "model_calls": t.model_calls, "prompt_words": t.tokens[0], "completion_words": t.tokens[1]}
            for k, t in (("react", ra), ("rewoo", rw))}

if __name__ == "__main__":
    rows = hostile()
    print(f"isolation: {isolation()}")
    print(f"{'attack':18} {'s':>5} {'escaped':>7} {'ok after':>8}  observation")
    for r in rows: print(f"{r['attack']:18} {r['seconds']:5.2f} {str(r['escaped']):>7} {str(r['tool_ok_after']):>8}  {r['observation']}")
    o, c = overhead(), react_vs_rewoo()
    print(f"sandbox start-up {o['startup_s']} s, per call {o['per_call_ms']} ms")
    for k, v in c.items(): print(f"{k:6} {v}")
    print(json.dumps({"tried": len(rows), "escaped": sum(r["escaped"] for r in rows), "max_seconds": max(r["seconds"] for r in rows),
                      **o, "loops": c}))
