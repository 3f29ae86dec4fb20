"""A training run's folder, runs/NAME, and the state an exact resume needs (support code: skip on first
read).

Outputs in runs/NAME: config.json (resolved configuration: the recipe's name and every value it
filled in), log.jsonl (one line per step and per validation), best/ and last/ (checkpoints;
`python evaluate.py --ckpt runs/NAME/best`), test_results.json (final test table).

Model selection follows the authors: every --eval-every steps, Recall@1 on each validation
sub-dataset is summed and the best checkpoint is kept in runs/NAME/best; runs/NAME/last holds the
latest weights plus the whole training state, so `--resume runs/NAME` continues exactly (same
batches, same dropout masks, same optimizer state => the same final weights as an uninterrupted run).
Every checkpoint and file is published with plumbing.atomic_write, so a killed run leaves either
the old or the new copy, never half of one (`clean_interrupted_writes`, `find_resume_checkpoint`).

This module also starts the processes (DDP, device, CPU threads) and opens the folder for
train.setup. `run` below is train.Run, passed in (support never imports train.py).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Optional

from safetensors import SafetensorError
from tqdm import tqdm

from support import plumbing, recipes
from support.errors import TrainingError
from support.plumbing import STATE_JSON, STATE_TENSORS, DistInfo, append_jsonl, atomic_write, barrier
from support.tiny_backbone import TINY_TYPES

CONFIG_JSON = "train_config.json"  # the run's TrainConfig, saved in every checkpoint

# Checkpoints and files of the run folder that plumbing.atomic_write publishes; an interrupted
# write leaves its .NAME.tmp (and, between its two renames, .NAME.old) behind.
RUN_OUTPUTS = ("best", "last", "config.json", "log.jsonl", "test_results.json")


def resolved_out(cfg) -> str:
    """The run directory: --out, or runs/fashionlens-<last path part of the backbone>."""
    if cfg.out:
        return cfg.out
    name = cfg.backbone.rstrip("/").split("/")[-1] or "model"
    return f"runs/fashionlens-{name}"


# ================================================================================================
# Opening a run: processes, device, threads, the folder
# ================================================================================================


def start_processes(cfg) -> tuple[DistInfo, int]:
    """(DistInfo, CPU threads): the DDP process group under torchrun, the device, torch's threads."""
    di = plumbing.init_distributed(cfg.device)
    if cfg.batch_size % di.world:
        raise SystemExit(f"error: --batch-size {cfg.batch_size} is not divisible by {di.world} processes")
    threads = plumbing.set_cpu_threads(cfg.cpu_threads, di.device, small_model=cfg.backbone in TINY_TYPES)
    return di, threads


def open_run(cfg, resume: Optional[str], di: DistInfo) -> tuple[Path, Optional[Path]]:
    """(runs/NAME, the checkpoint to resume from or None): refuses to start a new run over an old
    one, creates the folder and tidies an interrupted write; the other ranks wait for rank 0."""
    out = Path(resolved_out(cfg))
    resume_dir = find_resume_checkpoint(Path(resume)) if resume else None
    if di.main:
        if resume_dir is None and ((out / "last").exists() or (out / "log.jsonl").exists()):
            raise SystemExit(f"error: {out} already holds a run; continue it with --resume {out} "
                             f"or choose another --out")
        out.mkdir(parents=True, exist_ok=True)
        clean_interrupted_writes(out)
    barrier(di)
    return out, resume_dir


def restore_state(run, resume_dir: Path) -> None:
    """Put back optimizer, schedule, sampler, RNGs and counters from last/ (an exact resume)."""
    try:
        st = plumbing.read_state(resume_dir)
    except (OSError, ValueError, KeyError, SafetensorError) as e:  # ValueError: JSON; the rest: tensors
        raise TrainingError(f"{resume_dir}: unreadable training state ({STATE_JSON} / {STATE_TENSORS}: "
                            f"{type(e).__name__}: {e}); resume from an intact copy of the run") from None
    if st["world_size"] != run.di.world:
        raise SystemExit(f"error: {resume_dir} was written by {st['world_size']} processes, now {run.di.world}")
    run.optimizer.load_state_dict(st["optimizer"])
    run.scheduler.load_state_dict(st["scheduler"])
    run.task_sampler.load_state_dict(st["sampler"])
    plumbing.rng_restore(st["rng"])
    run.step, run.best, run.elapsed0 = int(st["step"]), dict(st["best"]), float(st.get("elapsed", 0.0))


def write_resolved_config(run, threads: int, sizes: dict, resume_dir: Optional[Path]) -> None:
    """Print and save config.json (the config plus what it resolved to); on resume, trim the log."""
    p = run.plan
    resolved = {**dataclasses.asdict(run.cfg), "resolved": {
        "out": str(run.out), "total_steps": p.total, "steps_per_epoch": p.steps_per_epoch,
        "ggas_warmup_steps": p.ggas_warmup, "lr_warmup_steps": p.lr_warmup, "world_size": run.di.world,
        "per_rank_batch": p.per_rank, "device": run.di.device, "cpu_threads": threads, "train_subsets": sizes,
        "chunk_sizes": {k: recipes.step_chunk_size(run.cfg, k) for k in sizes},
        "loader": run.loader.mode, "two_core_step": run.spare is not None,
        "val_subsets": run.val_subsets, "resumed_from": str(resume_dir) if resume_dir else None,
        "resumed_at_step": run.step, "machine": plumbing.machine_info(Path(__file__).resolve().parents[1])}}
    print("FashionLens training, resolved configuration:\n" + json.dumps(resolved, indent=1), flush=True)
    atomic_write(run.out / "config.json", json.dumps(resolved, indent=1))
    if resume_dir is not None:
        plumbing.trim_jsonl(run.out / "log.jsonl", run.step)  # the steps after the checkpoint are redone


def clean_interrupted_writes(out: Path) -> None:
    """Remove the temporaries of writes a killed run left in `out`, and put back a half-swapped best/.

    atomic_write clears .NAME.tmp itself when it writes NAME again, but best/ may never be written
    again, so its temporary (a whole checkpoint) would stay. A run killed between atomic_write's two
    renames has only .best.old: it is the complete best checkpoint, so it becomes best/ again
    (final_test loads best/). last/ is left to find_resume_checkpoint, which reads .last.old.
    """
    for name in RUN_OUTPUTS:
        tmp = out / f".{name}.tmp"
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp)
        elif tmp.exists() or tmp.is_symlink():
            tmp.unlink()
        else:
            continue
        print(f"removed {tmp}, the remains of an interrupted write", flush=True)
    best, old = out / "best", out / ".best.old"
    if old.is_dir() and not best.exists() and (old / "metrics.json").is_file():
        os.replace(old, best)
        print(f"restored {best} from {old} (a write of best/ was interrupted)", flush=True)


# ================================================================================================
# log.jsonl records
# ================================================================================================


def log_step(run, so, subset: str, chunk: int, lr: float, gnorm: float, tok: float, prefetched: bool) -> None:
    """One log.jsonl line for the step just done (rank 0), and the clock for the next step's time."""
    now = time.time()
    if run.di.main:
        append_jsonl(run.out / "log.jsonl", {
            "step": run.step, "loss": so.loss, "nce": so.nce, "reg": so.reg, "lr": lr, "subset": subset,
            "chunk_size": chunk,
            "grad_norm": gnorm, "token_grad_norm": tok, "lam_mean": so.lam,
            "angle_deg": math.degrees(so.angle), "prefetched": prefetched,
            "probabilities": run.task_sampler.probabilities(),
            "difficulties": {k: float(v) for k, v in run.task_sampler.difficulties().items()},
            "time": run.elapsed0 + now - run.t_start, "step_seconds": now - run.t_prev})
    run.t_prev = now


def log_val(run, res, score: float, t0: float) -> dict:
    """The validation's log.jsonl line (returned: best/ keeps it as metrics.json) and its printed line."""
    rec = {"event": "val", "step": run.step, "sum_recall1": score,
           "recall": {r.subset: {str(k): v for k, v in r.recall.items()} for r in res.rows},
           "seconds": time.time() - t0}
    append_jsonl(run.out / "log.jsonl", rec)
    tqdm.write(f"step {run.step}: val sum of Recall@1 = {score:.3f} over {len(res.rows)} sub-datasets "
               f"(best so far {run.best['score']:.3f} @ {run.best['step']}) [{rec['seconds']:.0f}s]")
    return rec


def write_test_results(out: Path, cfg, res) -> dict:
    """test_results.json: the final test table of best/ (an evaluate.EvalResult), returned as written."""
    doc = {"checkpoint": str(out / "best"), "data": cfg.data, "split": "test", **res.to_dict()}
    atomic_write(out / "test_results.json", json.dumps(doc, indent=1))
    return doc


def non_finite(err: Exception, run, subset: str) -> TrainingError:
    """The error for a NaN/inf loss or gradient: where it happened and the checkpoint to resume from."""
    return TrainingError(
        f"non-finite training signal ({err}) at step {run.step + 1} on sub-dataset {subset!r}; "
        f"stopping without an update. Last good checkpoint: "
        f"{find_last_good(run.out) or 'none yet (no checkpoint was written before this step)'}")


# ================================================================================================
# Checkpoints and training state
# ================================================================================================


def find_last_good(out: Path) -> str:
    """The checkpoint a stopped run can resume from, for the error message ("" when there is none)."""
    for cand in (out / "last", out / ".last.old"):
        try:
            return f"{cand} (step {json.loads((cand / STATE_JSON).read_text())['step']})"
        except (OSError, ValueError, KeyError, TypeError):  # absent or unreadable: not resumable
            continue
    return ""


def save_last(run) -> None:
    """Refresh last/ without validating (--stop-at); other ranks wait."""
    if run.di.main:
        save_checkpoint(run.out / "last", run.embedder, run.cfg, state=train_state(run))
    barrier(run.di)


def train_state(run) -> dict:
    """Everything an exact resume needs besides the weights."""
    return {"step": run.step, "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
            "sampler": run.task_sampler.state_dict(), "rng": plumbing.rng_snapshot(), "best": run.best,
            "world_size": run.di.world, "elapsed": run.elapsed0 + time.time() - run.t_start}


def save_checkpoint(folder: Path, embedder, cfg, state: Optional[dict] = None,
                    extra: Optional[dict] = None) -> None:
    """Publish folder/ atomically: the embedder's files, the TrainConfig, and metrics or state.

    plumbing.atomic_write builds it beside the old one and swaps (old -> .NAME.old, new -> NAME),
    so at every moment NAME or .NAME.old is complete; `find_resume_checkpoint` looks at both.
    """
    def build(tmp: Path) -> None:
        embedder.save_into(tmp)  # weights, adapter, tokens, calibrator, tokenizer, embedder config
        (tmp / CONFIG_JSON).write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
        if extra is not None:
            (tmp / "metrics.json").write_text(json.dumps(extra, indent=1))
        if state is not None:
            plumbing.write_state(tmp, state)

    atomic_write(folder, build)


def find_resume_checkpoint(run: Path) -> Path:
    """runs/NAME (or runs/NAME/last) -> the directory holding the latest complete training state."""
    run = Path(run)
    for cand in (run, run / "last", run / ".last.old"):
        if (cand / STATE_JSON).is_file() and (cand / STATE_TENSORS).is_file():
            return cand
    raise FileNotFoundError(f"--resume {run}: no training state found in {run}/last "
                            f"(expected {STATE_JSON} and {STATE_TENSORS})")


# ================================================================================================
# A stopped run
# ================================================================================================


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says where the run stopped and how to continue it."""


def stopped_message(run) -> str:
    """One line for a run stopped by Ctrl-C: the step, the checkpoint to resume from, the command."""
    head = f"stopped by Ctrl-C after step {run.step} of {run.plan.total}"
    last = find_last_good(run.out)
    if last:
        return f"{head}; last checkpoint {last}; continue with --resume {run.out}"
    return (f"{head}, before the first checkpoint (written every {run.cfg.eval_every} steps): nothing to "
            f"resume; start again after removing {run.out}, or with another --out")
