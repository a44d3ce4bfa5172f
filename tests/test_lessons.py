"""`camp lessons`: committed outputs fit to read, and refresh / html / time end to end on a scratch course.

The scratch course is a copy of the repository's pyproject.toml and settings.ini with three small notebooks,
so the kernel-driven commands run in seconds; nbs/93_lessons.ipynb tests the functions one by one."""
import configparser
import json
import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest
from gates import unclean_notebooks

REPO = Path(__file__).resolve().parents[1]
CAMP = str(Path(sys.executable).with_name("camp"))
LESSONS = sorted(p.name for p in (REPO / "nbs").glob("[0-9]*.ipynb"))
# committed with outputs by hand before `camp lessons refresh` existed: their stderr holds tqdm's warning with
# this machine's paths. Strict: once refreshed (`camp lessons refresh 08 08b`) these pass, and this entry must go.
MAX_PNG_BYTES = 200_000


def _machine_path_patterns() -> list[str]:
    home = str(Path.home())
    return [re.escape(str(REPO)), re.escape(sys.prefix), re.escape(sys.base_prefix),
            re.escape(tempfile.gettempdir().rstrip("/")) + r"/tmp\w+"] + ([re.escape(home)] if len(home) > 1 else [])


@pytest.mark.parametrize("name", LESSONS)
def test_committed_outputs_are_fit_to_read(name):
    "A lesson's outputs carry no stderr, widget view or path of this machine, and no oversized figure."
    nb = nbformat.read(REPO / "nbs" / name, as_version=4)
    outputs = [(c.get("id"), o) for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    problems = [f"{cid}: stderr" for cid, o in outputs if o.output_type == "stream" and o.name == "stderr"]
    problems += [f"{cid}: widget view" for cid, o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    problems += [f"{cid}: a {len(o.data['image/png']) * 3 // 4:,}-byte PNG" for cid, o in outputs
                 if len(o.get("data", {}).get("image/png", "")) * 3 // 4 > MAX_PNG_BYTES]
    text = json.dumps([o for _, o in outputs])
    problems += [f"path {m.group(0)!r}" for pattern in _machine_path_patterns() for m in [re.search(pattern, text)] if m]
    assert not problems, f"{name}: {problems}; run `camp lessons refresh {name[:-6]}`"


def test_core_lesson_reads_without_running():
    "nbs/00_core.ipynb is committed with its outputs: printed values, tables and its figure."
    nb = nbformat.read(REPO / "nbs" / "00_core.ipynb", as_version=4)
    by_id = {c.get("id"): c for c in nb.cells}
    assert any("image/png" in o.get("data", {}) for o in by_id["b35d2619"].outputs)           # the corpus-size histogram
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "| kind | documents | bytes |" in printed and "Chinese documents" in printed
    assert all(c.execution_count is None for c in nb.cells if c.cell_type == "code")


def _scratch_course(root: Path) -> None:
    "pyproject.toml and settings.ini of the course, two lessons (one links the other and an SVG), a tool and a lab."
    shutil.copy2(REPO / "pyproject.toml", root)
    shutil.copy2(REPO / "settings.ini", root)
    (root / "nbs" / "images").mkdir(parents=True)
    (root / "labs").mkdir()
    (root / "nbs" / "images" / "dot.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"><circle r="2"/></svg>')
    cell, md = nbformat.v4.new_code_cell, nbformat.v4.new_markdown_cell
    lessons = {
        "00_first": [md("# First steps\n\nNext: [the second lesson](01_second.ipynb#plots). ![a dot](images/dot.svg)"),
                     cell("import os, sys, warnings\nfrom course_lib.core import load_settings\n"
                          "print(os.environ['CAMP_TIER'], load_settings().steps, sys.prefix)\nwarnings.warn('noise')"),
                     cell("#| slow\nraise SystemError('a slow cell ran')"),
                     cell("import time\ntime.sleep(0.5)")],
        "01_second": [md("# Second\n\n## Plots"), cell("import matplotlib.pyplot as plt\nplt.plot([3, 1, 2]);")],
        "90_tool": [md("# A tool"), cell("6 * 7")],
    }
    for name, cells in lessons.items():
        nbformat.write(nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "python3", "language": "python"}}),
                       root / "nbs" / f"{name}.ipynb")
    nbformat.write(nbformat.v4.new_notebook(cells=[cell("from pathlib import Path\nPath('../runs').mkdir(exist_ok=True)\nprint('PASS: ran')")]),
                   root / "labs" / "00_first.ipynb")


def _camp(*args, cwd):
    return subprocess.run([CAMP, "lessons", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


class _Links(HTMLParser):
    def __init__(self):
        super().__init__(); self.hrefs, self.srcs = [], []
    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "a" and attrs.get("href"): self.hrefs.append(attrs["href"])
        if tag == "img" and attrs.get("src"): self.srcs.append(attrs["src"])


def _links(page: Path) -> _Links:
    parser = _Links(); parser.feed(page.read_text()); return parser


@pytest.mark.slow
def test_refresh_html_and_time_on_a_scratch_course(tmp_path):
    _scratch_course(tmp_path)
    cpu_steps = configparser.ConfigParser()
    cpu_steps.read(REPO / "settings.ini")
    out = _camp("refresh", cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    first = nbformat.read(tmp_path / "nbs" / "00_first.ipynb", as_version=4)
    printed = first.cells[1].outputs
    assert [o.output_type for o in printed] == ["stream"] and printed[0].name == "stdout"          # the warning is gone
    assert printed[0].text.split() == ["cpu", cpu_steps["cpu"]["steps"], "<venv>"]                  # the cpu tier, no path
    assert first.cells[2].outputs == []                                                            # the slow cell did not run
    assert "image/png" in nbformat.read(tmp_path / "nbs" / "01_second.ipynb", as_version=4).cells[1].outputs[-1].data
    assert unclean_notebooks(tmp_path, tmp_path / "scratch") == []                                  # the clean gate passes

    out = _camp("html", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    site = tmp_path / "_site"
    front = _links(site / "index.html").hrefs
    assert front == ["00_first.html", "01_second.html", "90_tool.html"]                              # lessons in order, then tools
    for page in front:
        links = _links(site / page)
        for href in links.hrefs:
            if not href.startswith(("#", "http")): assert (site / href.split("#")[0]).is_file(), (page, href)
        assert all(src.startswith("data:image/") for src in links.srcs), (page, links.srcs)
    assert "01_second.html#plots" in _links(site / "00_first.html").hrefs
    assert any(s.startswith("data:image/svg+xml;base64") for s in _links(site / "00_first.html").srcs)
    assert any(s.startswith("data:image/png;base64") for s in _links(site / "01_second.html").srcs)

    (tmp_path / "B.md").write_text("# B\n\n<!-- camp lessons time: start -->\nMeasured 2026-01-01 00:00 UTC (quiet).\n\n"
                                   "| notebook | kind | seconds at `cpu` | under 2 min | slowest cell |\n|---|---|---|---|---|\n"
                                   "| `nbs/00_first.ipynb` | lesson | 99.0 | yes | old |\n| `nbs/05_other.ipynb` | lesson | 7.0 | yes | kept |\n"
                                   "<!-- camp lessons time: end -->\n<!-- camp labs time: start -->\nold labs\n<!-- camp labs time: end -->\n")
    out = _camp("time", "00", "--out", "times", "--benchmarks", "B.md", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "times.json").read_text())
    rows = {r["notebook"]: r for r in result["rows"]}
    assert set(rows) == {"nbs/00_first.ipynb", "labs/00_first.ipynb"} and result["tier"] == "cpu"
    assert rows["nbs/00_first.ipynb"]["seconds"] >= 0.5 and any(line == "import time" and s >= 0.5 for _, s, line in rows["nbs/00_first.ipynb"]["slowest_cells"])
    assert not (tmp_path / "runs").exists()                                                         # the lab ran in a scratch layout
    bench = (tmp_path / "B.md").read_text()
    assert "99.0" not in bench and "old labs" not in bench                                          # re-timed rows replaced
    assert "| `nbs/05_other.ipynb` | lesson | 7.0 | yes | kept |" in bench                             # a row not timed stays
    assert bench.index("nbs/00_first.ipynb` | lesson") < bench.index("nbs/05_other.ipynb")          # in notebook order
    assert "Measured 2026-01-01 00:00 UTC (quiet); re-timed " in bench and ": nbs/00_first.ipynb." in bench
    assert bench.index("| `nbs/00_first.ipynb` | lesson |") < bench.index("<!-- camp labs time: start -->") < bench.index("| `labs/00_first.ipynb` | lab |")


def test_a_failing_lesson_keeps_its_file_and_names_the_error(tmp_path):
    _scratch_course(tmp_path)
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 / 0")]), tmp_path / "nbs" / "02_broken.ipynb")
    before = (tmp_path / "nbs" / "02_broken.ipynb").read_bytes()
    out = _camp("refresh", "02", cwd=tmp_path)
    assert out.returncode == 1 and "02_broken.ipynb failed" in out.stderr and "ZeroDivisionError" in out.stderr
    assert (tmp_path / "nbs" / "02_broken.ipynb").read_bytes() == before
    out = _camp("html", "07", cwd=tmp_path)
    assert out.returncode == 2 and "no notebook named '07'" in out.stderr


OPENER = {"objectives": r"able to", "目标 (objectives in Chinese)": r"你将能够", "prerequisites": r"Prerequisites|先修",
          "run time": r"[Rr]un time|运行时间"}


@pytest.mark.parametrize("name", [n for n in LESSONS if int(n[:2]) < 90])
def test_a_lesson_opens_with_its_objectives_in_both_languages(name):
    "Issues #9 and #12: before its first section a lesson says what the student will be able to do (in English and"
    " Chinese), what it assumes and how long it runs."
    nb = nbformat.read(REPO / "nbs" / name, as_version=4)
    opener = []
    for cell in nb.cells:
        if cell.cell_type == "markdown" and re.search(r"^## ", cell.source, re.M): break
        if cell.cell_type == "markdown": opener.append(cell.source)
    text = "\n".join(opener)
    missing = [what for what, pattern in OPENER.items() if not re.search(pattern, text)]
    assert not missing, f"{name}'s opening cells lack: {', '.join(missing)}"
