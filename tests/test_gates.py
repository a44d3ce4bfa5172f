"""CI gates: notebooks clean, library in sync with notebooks, README rendered from the index, CI runs the README."""
import json
import re
import shutil

from gates import notebooks, out_of_sync_modules, unclean_notebooks

from course_lib.camp import render_readme


def test_notebooks_are_clean(repo_root, tmp_path):
    assert notebooks(repo_root), "no notebooks found"
    assert unclean_notebooks(repo_root, tmp_path) == [], "run nbdev-clean on these notebooks"


def test_library_in_sync_with_notebooks(repo_root, tmp_path):
    assert out_of_sync_modules(repo_root, tmp_path) == [], "run nbdev-export and commit course_lib/"


def _copy_repo(repo_root, dest):
    dest.mkdir(parents=True)
    for part in ("pyproject.toml", "nbs", "course_lib", "labs", "homework"):
        src = repo_root / part
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dest / part)


def test_sync_gate_fails_on_a_notebook_edit_not_exported(repo_root, tmp_path):
    _copy_repo(repo_root, tmp_path / "edited")
    nb_path = tmp_path / "edited" / "nbs" / "00_core.ipynb"
    nb = json.loads(nb_path.read_text())
    cell = next(c for c in nb["cells"] if "".join(c["source"]).startswith("#| export\ndef human_bytes"))
    cell["source"] = "".join(cell["source"]).replace("Bytes for people", "Bytes for humans")
    nb_path.write_text(json.dumps(nb, indent=1))
    assert out_of_sync_modules(tmp_path / "edited", tmp_path / "scratch") == ["core.py"]


def test_sync_gate_fails_on_a_hand_edited_module(repo_root, tmp_path):
    _copy_repo(repo_root, tmp_path / "edited")
    with open(tmp_path / "edited" / "course_lib" / "core.py", "a") as f:
        f.write("\nHAND_EDIT = 1\n")
    assert out_of_sync_modules(tmp_path / "edited", tmp_path / "scratch") == ["core.py"]


def test_sync_gate_sees_modules_in_subpackages(repo_root, tmp_path):
    _copy_repo(repo_root, tmp_path / "edited")
    with open(tmp_path / "edited" / "course_lib" / "data" / "pii.py", "a") as f:
        f.write("\nHAND_EDIT = 1\n")
    (tmp_path / "edited" / "course_lib" / "data" / "stale.py").write_text("# a module no notebook exports\n")
    assert out_of_sync_modules(tmp_path / "edited", tmp_path / "scratch") == ["data/pii.py", "data/stale.py"]


def test_clean_gate_fails_on_execution_noise(repo_root, tmp_path):
    _copy_repo(repo_root, tmp_path / "edited")
    nb_path = tmp_path / "edited" / "nbs" / "00_core.ipynb"
    nb = json.loads(nb_path.read_text())
    code = next(c for c in nb["cells"] if c["cell_type"] == "code")
    code["execution_count"] = 7
    nb["metadata"]["widgets"] = {"state": {}}
    nb_path.write_text(json.dumps(nb, indent=1))
    assert "nbs/00_core.ipynb" in unclean_notebooks(tmp_path / "edited", tmp_path / "scratch")


def test_readme_is_rendered_from_index(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    assert (repo_root / "README.md").read_text() == render_readme(), "run `camp readme` after editing nbs/index.ipynb"


def test_readme_zh_is_rendered_from_index_zh(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    assert (repo_root / "README_zh.md").read_text() == render_readme("nbs/index_zh.ipynb"), \
        "run `camp readme` after editing nbs/index_zh.ipynb"


def test_readme_zh_is_a_front_door(repo_root):
    """README_zh.md gives the same two set-up commands, a row per lesson, the bootcamp's lessons and the glossary."""
    zh = (repo_root / "README_zh.md").read_text()
    commands = [c.strip() for c in re.findall(r"```(?:bash|sh)\n(.*?)\n```", zh, re.S)]
    assert commands == ["make run", "make test"], commands
    lessons = sorted(p.name for p in (repo_root / "nbs").glob("[0-9]*.ipynb"))
    missing = [name for name in lessons if (f"\n| {int(name[:2])} " not in zh if int(name[:2]) < 10 else f"`nbs/{name}`" not in zh)]
    assert not missing, f"README_zh.md's chapter table lacks {missing}"
    for lesson in ("XTuner", "LMDeploy", "OpenCompass", "Lagent", "HuixiangDou", "InternEvo"):
        assert lesson in zh, f"README_zh.md does not map a chapter onto the bootcamp's {lesson} lesson"
    assert "docs/glossary.md" in zh and "docs/glossary.md" in (repo_root / "README.md").read_text()


def test_glossary_has_every_core_term_with_a_chapter(repo_root):
    rows = [l for l in (repo_root / "docs" / "glossary.md").read_text().splitlines() if l.startswith("| ") and "---" not in l][1:]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert all(len(c) == 4 and c[0] and c[1] and c[2] and re.fullmatch(r"\d+(, \d+)*", c[3]) for c in cells), \
        [c for c in cells if len(c) != 4 or not re.fullmatch(r"\d+(, \d+)*", c[3])]
    chinese = {c[1] for c in cells}
    for term in ("词元", "分词器", "预训练", "微调", "量化", "KV 缓存", "连续批处理", "评测", "智能体", "检索增强生成"):
        assert any(term in zh for zh in chinese), f"glossary lacks {term}"
    assert any(c[0] == "LoRA" for c in cells)


def test_ci_runs_the_readme_test_command(repo_root):
    ci = [l for l in (repo_root / ".ci" / "run").read_text().splitlines() if l.strip() and not l.startswith("#")]
    readme = (repo_root / "README.md").read_text()
    commands = re.findall(r"```(?:bash|sh)\n(.*?)\n```", readme, re.S)
    assert ci[-1].strip() in [c.strip() for c in commands], f"README has no command block `{ci[-1]}`"
    assert len([c for c in commands if c.strip().startswith("make ")]) == 2, "README must give exactly two set-up commands"


def test_gpu_and_slow_cells_are_skipped_unless_flagged(repo_root, tmp_path):
    import subprocess, sys
    import nbformat
    (tmp_path / "nbs").mkdir()
    shutil.copy2(repo_root / "pyproject.toml", tmp_path)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1"),
                                         nbformat.v4.new_code_cell("#| gpu\nraise SystemError('needs a GPU')"),
                                         nbformat.v4.new_code_cell("#| slow\nraise SystemError('takes long')")])
    nbformat.write(nb, tmp_path / "nbs" / "flags.ipynb")
    nbdev_test = str(__import__("pathlib").Path(sys.executable).with_name("nbdev-test"))
    run = lambda *flags: subprocess.run([nbdev_test, "nbs/flags.ipynb", *flags], cwd=tmp_path, capture_output=True, text=True)
    assert run().returncode == 0
    gpu = run("--flags", "gpu")
    assert gpu.returncode != 0 and "needs a GPU" in gpu.stdout + gpu.stderr
    assert run("--flags", "slow").returncode != 0
