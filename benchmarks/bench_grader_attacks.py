"""The grader's benchmark: the attacks of issue #11 on the grader, with namespaces (the default) and without
(CAMP_SANDBOX_NAMESPACES=0), and what a grade costs. An attack "succeeds" when the untouched hw00 notebook plus the
attack cell scores above 0, or when any instructor or student file changed. Then every spelling of hw03's and hw04's
forbidden functions (tests/test_homework_rules.py) is tried in a sandbox that forbids them: one "succeeds" if it runs.

    .venv/bin/python benchmarks/bench_grader_attacks.py            # both modes, every attack (about 20 grades)
    .venv/bin/python benchmarks/bench_grader_attacks.py --modes namespaces

Prints a table and ends with one line of JSON.
"""
import argparse
import http.server
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_grader_attacks as attacks  # noqa: E402  (the attacks the test suite runs)
import test_homework_rules as rules    # noqa: E402  (the spellings of forbidden functions)


def serve_solution() -> int:
    code = "\n".join(c.source for c in nbformat.read(attacks.SOURCE, as_version=4).cells if c.cell_type == "code")
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self): self.send_response(200); self.end_headers(); self.wfile.write(code.encode())
        def log_message(self, *a): pass
    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1]


def main():
    p = argparse.ArgumentParser(); p.add_argument("--modes", default="namespaces,none")
    p.add_argument("--attacks", default=",".join(attacks.ATTACKS), help="comma-separated subset"); args = p.parse_args()
    port, rows = serve_solution(), []
    for mode in args.modes.split(","):
        os.environ["CAMP_SANDBOX_NAMESPACES"] = "1" if mode == "namespaces" else "0"
        from course_lib.confine import isolation
        isolation(refresh=True)
        for name in args.attacks.split(","):
            code = attacks.ATTACKS[name][0]
            before, start = attacks._hashes(), time.perf_counter()
            result = attacks._grade_with(Path(tempfile.mkdtemp()), code.replace("{port}", str(port)))
            changed = attacks._hashes() != before
            rows.append({"mode": mode, "attack": name, "points": result["points"], "files_changed": changed,
                         "succeeded": bool(result["points"] > 0 or changed), "seconds": round(time.perf_counter() - start, 1),
                         "missing": result["isolation_missing"]})
    print(f"{'mode':<11} {'attack':<22} {'points':>6} {'files changed':>13} {'succeeded':>9} {'seconds':>7}")
    for r in rows:
        print(f"{r['mode']:<11} {r['attack']:<22} {r['points']:>6g} {str(r['files_changed']):>13} {str(r['succeeded']):>9} {r['seconds']:>7}")
    summary = {m: {"tried": sum(r["mode"] == m for r in rows), "succeeded": sum(r["mode"] == m and r["succeeded"] for r in rows)}
               for m in args.modes.split(",")}
    spellings = forbidden_spellings()
    print(f"\n{'forbidden spelling':<32} {'outcome':<16}")
    for name, outcome in spellings.items(): print(f"{name:<32} {outcome:<16}")
    summary["forbidden_spellings"] = {"tried": len(spellings), "succeeded": sum(v == "ALLOWED" for v in spellings.values())}
    print(json.dumps({"bench": "grader_attacks", "summary": summary, "rows": rows, "spellings": spellings}))


def forbidden_spellings() -> dict:
    "Each spelling of a forbidden function, tried in a sandbox that forbids hw03's and hw04's names: what it raised."
    from course_lib.confine import isolation
    from course_lib.sandbox import Session
    os.environ["CAMP_SANDBOX_NAMESPACES"] = "1"; isolation(refresh=True)
    forbidden = {**rules.grading_module("hw03_model").FORBIDDEN, **rules.grading_module("hw04_pretrain").FORBIDDEN}
    rows = "".join(f"    {name!r}: lambda: {code},\n" for name, code in rules.SPELLINGS.items())
    with Session() as s:
        s.forbid(forbidden)
        s.run("import importlib, importlib.util, os, sys, torch, torch.nn.functional as F\nq = torch.randn(1, 1, 3, 4)\n"
              f"tries = {{\n{rows}}}\nrefused = {{}}\n"
              "for name, f in tries.items():\n"
              "    try: f(); refused[name] = 'ALLOWED'\n"
              "    except Exception as e: refused[name] = type(e).__name__")
        return s.get("refused")[0]


if __name__ == "__main__":
    main()
