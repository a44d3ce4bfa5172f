"""What grading a homework costs: each homework's source (the solution, full marks) graded by `camp grade` in the
sandbox, beside the same notebook executed plainly in a Jupyter kernel (nbclient, no sandbox, no grading tests).
The ratio is the grader's price: a fresh sandboxed process, the notebook run inside it, and the grading tests'
calls across the pipe on fresh random inputs.

    .venv/bin/python benchmarks/bench_grading.py                 # every homework in instructor/
    .venv/bin/python benchmarks/bench_grading.py hw02_tokenizer hw04_pretrain

Prints a table and ends with one line of JSON.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from course_lib.grading import Limits, grade

REPO = Path(__file__).resolve().parents[1]


def plain_run_s(notebook: Path) -> float:
    "Seconds to execute the notebook top to bottom in a fresh kernel, in a scratch folder (its experiments write there)."
    nb = nbformat.read(notebook, as_version=4)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": folder}}).execute()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("homework", nargs="*", help="names under instructor/ (default: all)")
    names = parser.parse_args().homework or sorted(p.name for p in (REPO / "instructor").iterdir() if (p / "grading").is_dir())
    rows = []
    for name in names:
        notebook = REPO / "instructor" / name / f"{name}.ipynb"
        plain = plain_run_s(notebook)
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            result = grade(notebook, limits=Limits(timeout_s=600), seed=0, out=Path(folder) / "grade.json")
            graded = time.perf_counter() - start
        rows.append({"homework": name, "points": result["points"], "max_points": result["max_points"],
                     "plain_s": round(plain, 1), "grade_s": round(graded, 1), "ratio": round(graded / plain, 2)})
        print(f"{name:18} {result['points']:5.1f}/{result['max_points']:<5.1f} plain {plain:6.1f} s   "
              f"graded {graded:6.1f} s   x{graded / plain:.2f}", flush=True)
    load = os.getloadavg()[0]
    print(f"load average {load:.1f} on {os.cpu_count()} CPUs")
    print(json.dumps({"bench": "grading", "load": round(load, 1), "rows": rows}))


if __name__ == "__main__":
    sys.exit(main())
