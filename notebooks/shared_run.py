"""Which trained run notebooks 03-06 look at (support code for the notebooks: skip on a first read).

Three cases, in this order:

1. `FASHIONLENS_NOTEBOOK_RUN=/path/to/run` (an environment variable, read when the notebook starts):
   that run folder. It must be a *finished default run* (below), else the notebook stops with an error
   that says why; this is how the saved outputs were made and how the slow notebook test shows a run of
   another seed (`tests/test_notebooks.py`).
2. `runs/fashionlens-tiny`, which `python train.py --tasks all` (the default job: 1400 steps, 10-25
   minutes on two CPU cores, docs/RESULTS.md) writes, when it holds a finished default run.
3. Otherwise a 40-step demo trained once (about a minute) into runs/notebook-demo and reused: every
   cell still runs, but the pictures then show a model that has barely left its random start.

A *finished default run* is one whose config.json equals the default job's configuration in every field
that changes what is trained or how `best/` is picked (the seed may differ; where it ran, with how many
threads and into which folder may differ: `EXECUTION_FIELDS`), whose log reached its last validation, and
which has its test results. `python train.py --tasks t2i --steps 200` also writes runs/fashionlens-tiny,
but it is not the default job, so the notebooks fall back to the demo and say why.

What a notebook states about the default run is either rendered from the run in front of it or a
statement that held on every seed measured (docs/RESULTS.md, "the notebooks' claims across seeds"):
the same seed on another CPU rounds differently, so no exact number of one machine is asserted.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
from pathlib import Path

RUN_ENV = "FASHIONLENS_NOTEBOOK_RUN"  # the override: a run folder the notebooks must show
DEFAULT_RUN = Path("runs") / "fashionlens-tiny"  # where `python train.py --tasks all` writes
DEMO_RUN = Path("runs") / "notebook-demo"
DEMO_STEPS = 40
# The demo: every sub-dataset, 40 steps at the default batch, a validation every 10 steps on 8 queries
# per sub-dataset (so best/ is chosen on something), no test pass.
DEMO_ARGS = ["--tasks", "all", "--steps", str(DEMO_STEPS), "--batch-size", "16", "--chunk-size", "8",
             "--eval-every", "10", "--max-eval-queries", "8", "--no-final-test", "--seed", "0"]
# Fields that say where and how fast a run executed, not what it trained: they may differ from the default.
# (`seed` may differ too: a run of another seed is still the default job.)
EXECUTION_FIELDS = {"out", "device", "cpu_threads", "loader", "two_cores", "stop_at", "find_unused_parameters"}


@dataclasses.dataclass
class NotebookRun:
    """The run a notebook shows: its folder, whether it is the default job, and where it came from."""
    path: Path        # the run folder (config.json, log.jsonl, best/, last/)
    is_default: bool  # a finished default run (claims about the default run apply); False: the demo
    kind: str         # one line for the reader: which run this is and why it was picked
    seed: int         # the run's --seed
    machine: str      # "CPU model, commit" as config.json recorded them ("not recorded" for older runs)
    config: dict      # config.json as saved (the fields plus "resolved")


def _finished(run: Path) -> str:
    """'' when `run` holds a finished run (best/, config.json, a log that reached its last validation,
    and test_results.json when the run asked for a test pass); otherwise what is missing."""
    log, config = run / "log.jsonl", run / "config.json"
    for need in (config, log, run / "best"):
        if not need.exists():
            return f"{need} is missing"
    try:
        cfg = json.loads(config.read_text())
        total = cfg["resolved"]["total_steps"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{config} is unreadable ({type(e).__name__}: {e})"
    vals = [json.loads(line) for line in log.read_text().splitlines() if '"event": "val"' in line]
    if not vals or vals[-1]["step"] != total:
        return f"{log} stops before the last validation (step {total}): the run is unfinished"
    if cfg.get("final_test", True) and not (run / "test_results.json").is_file():
        return f"{run / 'test_results.json'} is missing: the run stopped before its test pass"
    return ""


def default_job_differences(config: dict) -> list[str]:
    """The fields in which a saved config.json differs from the default job's (`python train.py --tasks
    all`, resolved by its recipe), ignoring the seed and EXECUTION_FIELDS; [] for a default run."""
    import train  # the notebooks import the concept files anyway; this module is notebook support

    default = dataclasses.asdict(train.TrainConfig().resolved())
    skip = EXECUTION_FIELDS | {"seed", "data"}
    diff = [f"{k}: {config.get(k)!r} (default {v!r})" for k, v in default.items()
            if k not in skip and config.get(k) != v]
    data = Path(str(config.get("data")))  # saved resolved: the synthetic U-FIRE is <repo>/data/synthetic
    if (data.parent.name, data.name) != ("data", "synthetic"):
        diff.insert(0, f"data: {str(data)!r} (default: the synthetic U-FIRE in data/synthetic)")
    return diff


def _machine(config: dict) -> str:
    m = config.get("resolved", {}).get("machine") or {}
    if not m:
        return "machine and commit not recorded (a run from before config.json recorded them)"
    return f"{m.get('cpu_model', '?')} ({m.get('cores', '?')} cores), commit {str(m.get('commit'))[:12]}"


def _describe(run: Path, config: dict, why: str) -> NotebookRun:
    seed = int(config.get("seed", 0))
    return NotebookRun(run, True, f"the default job run {run} (seed {seed}; {_machine(config)}); {why}",
                       seed, _machine(config), config)


def notebook_run(repo: Path) -> NotebookRun:
    """The run notebooks 03-06 show: $FASHIONLENS_NOTEBOOK_RUN, else a finished default run in
    runs/fashionlens-tiny, else the demo (trained on first need). Raises RuntimeError when the
    override names something that is not a finished default run."""
    override = os.environ.get(RUN_ENV)
    if override:
        run = Path(override).expanduser().resolve()
        problem = _finished(run)
        if problem:
            raise RuntimeError(f"{RUN_ENV}={override}: not a finished run: {problem}")
        config = json.loads((run / "config.json").read_text())
        diff = default_job_differences(config)
        if diff:
            raise RuntimeError(f"{RUN_ENV}={override}: not the default job (`python train.py --tasks all`): "
                               + "; ".join(diff))
        return _describe(run, config, f"chosen by {RUN_ENV}")
    default = repo / DEFAULT_RUN
    fallback_reason = f"no {DEFAULT_RUN} yet"
    if default.exists():
        problem = _finished(default)
        if not problem:
            config = json.loads((default / "config.json").read_text())
            diff = default_job_differences(config)
            if not diff:
                return _describe(default, config, "made by `python train.py --tasks all`")
            problem = "it is not the default job (" + "; ".join(diff[:3]) + ")"
        fallback_reason = f"{DEFAULT_RUN} is not used: {problem}"
    demo = repo / DEMO_RUN
    if _finished(demo):
        import train

        shutil.rmtree(demo, ignore_errors=True)  # a half-finished earlier attempt: start clean
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):  # no progress bars in the notebook
            rc = train.main([*DEMO_ARGS, "--out", str(demo)])
        if rc != 0 or _finished(demo):
            raise RuntimeError("demo training failed:\n" + buf.getvalue()[-3000:])
    config = json.loads((demo / "config.json").read_text())
    return NotebookRun(demo, False, f"the {DEMO_STEPS}-step demo run {DEMO_RUN} ({fallback_reason}; "
                       f"`python train.py --tasks all` makes the default run, and the notebooks then show it)",
                       int(config.get("seed", 0)), _machine(config), config)
