"""The project's shape: six concept files at the root, support code in support/, imports one way.

These are the rules that keep each concept file the whole concept (README "Reading order",
support/README.md): a support module never imports a concept file, calibrator.py and sampler.py stand
on torch and the standard library alone (copy them into another project), and every entry point
imports support.plumbing first so OMP_WAIT_POLICY is set before torch loads.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONCEPT = ("data", "model", "calibrator", "sampler", "train", "evaluate")
SUPPORT = sorted(p.stem for p in (REPO / "support").glob("*.py") if p.stem != "__init__")


def _imported(path: Path) -> set[str]:
    """Top-level names of every module `path` imports, anywhere in the file (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add((node.module or "").split(".")[0])
    return names


def test_the_root_holds_the_six_concept_files_only():
    assert sorted(p.stem for p in REPO.glob("*.py")) == sorted(CONCEPT)
    assert (REPO / "support" / "README.md").is_file() and (REPO / "support" / "__init__.py").is_file()
    listed = (REPO / "support" / "README.md").read_text()
    missing = [m for m in SUPPORT if f"`{m}.py`" not in listed]
    assert not missing, f"support/README.md does not list {missing}"


@pytest.mark.parametrize("module", SUPPORT)
def test_support_never_imports_a_concept_file(module):
    bad = _imported(REPO / "support" / f"{module}.py") & set(CONCEPT)
    assert not bad, f"support/{module}.py imports {bad}: pass the concept object in instead"


def test_importing_all_support_loads_no_concept_file():
    code = ("import sys\n" + "".join(f"import support.{m}\n" for m in SUPPORT) +
            f"core = set({CONCEPT!r}) & set(sys.modules)\nassert not core, core\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("module", ["calibrator", "sampler"])
def test_copyable_concepts_need_torch_and_the_standard_library_only(module):
    ours = _imported(REPO / f"{module}.py") - {"torch", "__future__"}
    assert ours <= set(sys.stdlib_module_names), ours - set(sys.stdlib_module_names)


@pytest.mark.parametrize("entry", ["train", "evaluate"])
def test_entry_points_set_omp_wait_policy_before_torch(entry):
    tree = ast.parse((REPO / f"{entry}.py").read_text())
    first = next(n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)) and
                 not (isinstance(n, ast.ImportFrom) and n.module == "__future__"))
    assert isinstance(first, ast.ImportFrom) and first.module == "support" and \
        [a.name for a in first.names] == ["plumbing"], f"{entry}.py must import support.plumbing first"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = (f"import os, sys\nimport {entry}\nprint(os.environ.get('OMP_WAIT_POLICY'))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "PASSIVE"


def test_every_config_field_declares_its_allowed_values():
    """One line per field, its allowed values beside it (support/config_fields.knob): no rule table."""
    import model
    import train
    from support.config_fields import rules

    for cls in (model.EmbedderConfig, train.TrainConfig):
        missing = [name for name, rule in rules(cls).items() if not rule]
        assert not missing, f"{cls.__name__} fields without a knob rule: {missing}"
