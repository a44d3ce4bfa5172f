"""The concept diagrams under nbs/images/ are what nbs/images/make_diagrams.py draws, byte for byte, and each is shown in a lesson."""
import subprocess
import sys


def test_script_reproduces_the_committed_svgs(repo_root, tmp_path):
    images = repo_root / "nbs" / "images"
    subprocess.run([sys.executable, str(images / "make_diagrams.py"), str(tmp_path)], check=True, capture_output=True)
    committed = {p.name for p in images.glob("*.svg")}
    fresh = {p.name for p in tmp_path.glob("*.svg")}
    assert committed and fresh == committed, f"run `python nbs/images/make_diagrams.py`: {sorted(fresh ^ committed)}"
    changed = [n for n in sorted(fresh) if (tmp_path / n).read_bytes() != (images / n).read_bytes()]
    assert not changed, f"committed SVGs differ from the script's output: {changed}; run `python nbs/images/make_diagrams.py`"


def test_every_diagram_is_shown_in_a_lesson(repo_root):
    lessons = "".join(p.read_text() for p in (repo_root / "nbs").glob("*.ipynb"))
    unused = [p.name for p in (repo_root / "nbs" / "images").glob("*.svg") if f"(images/{p.name})" not in lessons]
    assert not unused, f"diagrams no lesson embeds: {unused}"
