"""Time the README's installs in a fresh virtual environment and measure its size.

Runs the same steps as `make run` / `make test` (torch first, then the extras) into a throw-away
venv, timing each step; prints a table and one JSON line. Usage: python benchmarks/bench_install.py
"""
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        venv = Path(tmp) / "venv"
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        steps = [("venv", [sys.executable, "-m", "venv", str(venv)]),
                 ("torch==2.13.0", pip + ["torch==2.13.0"]),
                 ("[chain] (make run)", pip + [f"{REPO}[chain]"]),
                 ("[all] (make test)", pip + [f"{REPO}[all]"])]
        for name, cmd in steps:
            start = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            rows.append({"step": name, "seconds": round(time.perf_counter() - start, 1), "venv_mb": round(du(venv) / 1e6)})
    print(f"{'step':<22}{'seconds':>10}{'venv MB':>10}")
    for r in rows:
        print(f"{r['step']:<22}{r['seconds']:>10}{r['venv_mb']:>10}")
    chain = sum(r["seconds"] for r in rows[:3])
    print(f"make run installs in {chain:.0f} s ({rows[2]['venv_mb']} MB); make test in {chain + rows[3]['seconds']:.0f} s ({rows[3]['venv_mb']} MB)")
    print(json.dumps({"install": rows}))


if __name__ == "__main__":
    main()
