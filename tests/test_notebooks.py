"""Execute every notebook in notebooks/ top to bottom (nbclient) and fail on any cell error.

The notebooks are the students' walkthrough: each must run on a CPU with no downloads,
importing the project's modules. They run in reading order: 03-06 show the run notebooks/shared_run.py
picks (the default run runs/fashionlens-tiny when it is complete, else the 40-step demo runs/notebook-demo,
which 03 trains when it does not exist yet and 04-06 reuse); 07 reads only the committed results in
benchmarks/ (the ablation's trained runs take hours, so it trains nothing). Executed copies are
written to a temporary folder; the committed notebooks (with their saved outputs) are not touched.
No timing assertion (flaky on a loaded machine): a generous per-cell timeout instead.

Each notebook checks its own claims with `assert` statements, so a claim that stops being true fails
its run here; `test_every_notebook_asserts` (cheap, no execution) makes sure none is left without one.

The kernel runs with one math thread (OMP_NUM_THREADS=1): the notebooks' tensors are small, and when
several processes share 2 cores (the test suite beside other jobs), two threads per process spin
against each other and one training step went from ~1 s to 20-50 s in our measurements; one thread
costs ~20 % on an idle machine.
"""
from __future__ import annotations

import ast
import json
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
# Reading order; the test ids keep it (pytest runs parametrised cases in list order).
NOTEBOOKS = [
    "01_u_fire_data.ipynb",
    "02_embedding_model.ipynb",
    "03_pgsqc_calibrator.ipynb",
    "04_ggas_sampler.ipynb",
    "05_training.ipynb",
    "06_evaluation.ipynb",
    "07_what_the_ideas_buy.ipynb",
]
CELL_TIMEOUT_S = 300  # per cell; the slowest cell (training the demo run) takes ~1-2 min on 2 cores


def test_notebook_list_is_complete():
    """Every notebook in notebooks/ is executed here, and every listed one exists."""
    on_disk = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb"))
    assert on_disk == sorted(NOTEBOOKS), f"notebooks/ holds {on_disk}; this test lists {NOTEBOOKS}"


def _asserts_in(source: str) -> int:
    """The number of `assert` statements in a code cell (parsed, so a comment or a string does not count).
    IPython's own syntax (`%matplotlib inline`, `!ls`) is first turned into Python, as the kernel does."""
    transformer = pytest.importorskip("IPython.core.inputtransformer2").TransformerManager()
    return sum(isinstance(node, ast.Assert) for node in ast.walk(ast.parse(transformer.transform_cell(source))))


def test_asserts_in_counts_statements_only():
    """The counter behind test_every_notebook_asserts: statements, not the word."""
    assert _asserts_in("x = 1\nassert x == 1, 'x'\n") == 1
    assert _asserts_in("# assert x\ns = 'assert y'\n%matplotlib inline\n!echo assert\n") == 0
    assert _asserts_in("def f(x):\n    assert x > 0\n    return x\n") == 1


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_notebook_asserts(name):
    """Every notebook asserts what it claims: at least one code cell holds an `assert` statement."""
    cells = json.loads((NOTEBOOK_DIR / name).read_text())["cells"]
    n = sum(_asserts_in("".join(c["source"]) if isinstance(c["source"], list) else c["source"])
            for c in cells if c["cell_type"] == "code")
    assert n > 0, f"{name}: no code cell contains an assert statement (a notebook checks its own claims)"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # inherited by the kernel (see the module docstring)
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    path = NOTEBOOK_DIR / name
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})  # cwd = notebooks/
    t0 = time.time()
    try:
        client.execute()
    finally:
        nbformat.write(nb, tmp_path / name)  # the executed copy, for a look after a failure
    print(f"{name}: {time.time() - t0:.0f}s")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, f"{name}: {errors[0]['ename']}: {errors[0]['evalue']}"
    # Saved outputs should show pictures: every notebook draws at least one figure.
    pngs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]
    assert pngs, f"{name}: executed without producing a single figure"
