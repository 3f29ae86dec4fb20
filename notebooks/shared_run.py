"""The trained run notebooks 03-06 look at (support code for the notebooks: skip on a first read).

`python train.py --tasks all` (the default job: 1400 steps, about 8 minutes on two CPU cores) leaves
its run in runs/fashionlens-tiny. When that run is complete, the notebooks show it: lambda per task,
the GGAS curves, the Recall table and the retrieval grids of the method after training. The saved
outputs in the repository come from it. When it is missing (a fresh clone, the notebook tests), they
train a 40-step demo run once (about a minute) into runs/notebook-demo and reuse it: every cell still
runs, but the pictures then show a model that has barely left its random start.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

DEFAULT_RUN = Path("runs") / "fashionlens-tiny"  # where `python train.py --tasks all` writes
DEMO_RUN = Path("runs") / "notebook-demo"
DEMO_STEPS = 40
# The demo: every sub-dataset, 40 steps at the default batch, a validation every 10 steps on 8 queries
# per sub-dataset (so best/ is chosen on something), no test pass.
DEMO_ARGS = ["--tasks", "all", "--steps", str(DEMO_STEPS), "--batch-size", "16", "--chunk-size", "8",
             "--eval-every", "10", "--max-eval-queries", "8", "--no-final-test", "--seed", "0"]


def run_complete(run: Path) -> bool:
    """True when best/ exists and the log reached the run's last validation (a finished run)."""
    log, config = run / "log.jsonl", run / "config.json"
    if not (run / "best").is_dir() or not log.is_file() or not config.is_file():
        return False
    total = json.loads(config.read_text())["resolved"]["total_steps"]
    vals = [json.loads(line) for line in log.read_text().splitlines() if '"event": "val"' in line]
    return bool(vals) and vals[-1]["step"] == total


def notebook_run(repo: Path) -> tuple[Path, str]:
    """(run folder, a one-line description): the default run if complete, else the demo (trained if needed)."""
    default = repo / DEFAULT_RUN
    if run_complete(default):
        return default, f"the default run {DEFAULT_RUN} (python train.py --tasks all)"
    demo = repo / DEMO_RUN
    if not run_complete(demo):
        import train

        shutil.rmtree(demo, ignore_errors=True)  # a half-finished earlier attempt: start clean
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):  # no progress bars in the notebook
            rc = train.main([*DEMO_ARGS, "--out", str(demo)])
        if rc != 0 or not run_complete(demo):
            raise RuntimeError("demo training failed:\n" + buf.getvalue()[-3000:])
    return demo, (f"the {DEMO_STEPS}-step demo run {DEMO_RUN} (no {DEFAULT_RUN} yet: "
                  f"`python train.py --tasks all` makes it, and the notebooks then show it instead)")
