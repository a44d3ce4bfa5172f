"""The repository's CI gates as functions, so tests can run them on the real tree and on broken copies."""
import shutil
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
NOTEBOOK_DIRS = ("nbs", "labs", "homework", "instructor")


def notebooks(root: Path) -> list[Path]:
    return sorted(p for d in NOTEBOOK_DIRS for p in (root / d).rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def unclean_notebooks(root: Path, scratch: Path) -> list[str]:
    """Notebooks that `nbdev-clean` would change (execution counts, outputs' noise, metadata)."""
    changed = []
    for nb in notebooks(root):
        copy = scratch / nb.relative_to(root)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(nb, copy)
        subprocess.run([BIN / "nbdev-clean", "--fname", str(copy)], check=True, capture_output=True)
        if copy.read_bytes() != nb.read_bytes():
            changed.append(str(nb.relative_to(root)))
    return changed


def out_of_sync_modules(root: Path, scratch: Path) -> list[str]:
    """Files of course_lib/ that `nbdev-export` from nbs/ would create, change or delete."""
    copy = scratch / "repo"
    copy.mkdir(parents=True, exist_ok=True)
    shutil.copy2(root / "pyproject.toml", copy)
    shutil.copytree(root / "nbs", copy / "nbs")
    (copy / "course_lib").mkdir()
    shutil.copy2(root / "course_lib" / "__init__.py", copy / "course_lib")
    out = subprocess.run([BIN / "nbdev-export"], cwd=copy, capture_output=True, text=True)
    if out.returncode != 0:
        return [f"nbdev-export failed: {out.stderr[-2000:]}"]
    ours = {p.relative_to(root / "course_lib").as_posix(): p.read_bytes() for p in (root / "course_lib").rglob("*.py")}
    fresh = {p.relative_to(copy / "course_lib").as_posix(): p.read_bytes() for p in (copy / "course_lib").rglob("*.py")}
    return sorted(n for n in ours.keys() | fresh.keys() if ours.get(n) != fresh.get(n))
