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

One process writes a run folder at a time: open_run takes an exclusive lock on runs/NAME/.lock
(fcntl.flock; the file is never deleted, it holds the holder's pid, host and start time while
locked) and train.train lets it go however it ends (`one_writer`); the kernel lets it go when the
holder is killed. This module also starts the processes (DDP, device, CPU threads) and opens the
folder for train.setup. `run` below is train.Run, passed in (support never imports train.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Optional

from safetensors import SafetensorError
from tqdm import tqdm

from support import checkpoint, plumbing, recipes
from support.errors import FashionLensError, TrainingError
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
    """(runs/NAME, the checkpoint to resume from or None): creates and locks the folder (refused
    while another process holds it), refuses to start a new run over an old one, and tidies an
    interrupted write; the other ranks wait for rank 0.

    --resume on a run stopped before its first checkpoint (config.json and log.jsonl, no last/)
    starts it over in place, saying so. The decision is taken under the lock, so two processes can
    never both decide to write the folder.
    """
    out = Path(resolved_out(cfg))
    resume_dir = None
    if di.main:
        out.mkdir(parents=True, exist_ok=True)
        key = lock_run(out)
        try:
            resume_dir = find_resume_checkpoint(Path(resume)) if resume else None
            if resume and resume_dir is None and Path(resume).resolve() == out.resolve():
                print(f"{out} holds a run stopped before its first checkpoint (no last/): starting it over "
                      f"from step 0 with its saved configuration", flush=True)
                (out / "log.jsonl").unlink(missing_ok=True)  # its steps are done again
            elif resume_dir is None and ((out / "last").exists() or (out / "log.jsonl").exists()):
                again = (f"start it over with --resume {out} (it stopped before its first checkpoint)"
                         if stopped_before_first_checkpoint(out) else f"continue it with --resume {out}")
                raise TrainingError(f"{out} already holds a run; {again}, or choose another --out")
            _write_holder(key)
        except BaseException:
            unlock_run(key, clear=False)  # refused: the folder is as it was, and free for the next try
            raise
        clean_interrupted_writes(out)
    barrier(di)
    if not di.main and resume:
        resume_dir = find_resume_checkpoint(Path(resume))
    return out, resume_dir


# ================================================================================================
# One writer per run folder: the lock
# ================================================================================================

LOCK_FILE = ".lock"  # in runs/NAME; never deleted (a new file would be a new lock), only locked
_HELD: dict = {}  # (device, inode) of a .lock this process holds -> its open file descriptor


def lock_run(out: Path) -> tuple:
    """Lock runs/NAME for this process (flock, exclusive, without waiting); returns the lock's key.

    flock belongs to the file (its inode): a symlink or another spelling of the folder is the same
    lock, and the kernel releases it when the holder dies, even by SIGKILL. Held by another process:
    a TrainingError naming the folder and the holder. Already held by this process (train.setup
    called twice on one folder): the same lock, not a refusal. A file system without flock gets a
    warning and no lock.
    """
    path = out / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise TrainingError(f"{path}: cannot create the run's lock file ({e.strerror or e})") from None
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    if key in _HELD:
        os.close(fd)
        return key
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "a process still starting"
        os.close(fd)
        raise TrainingError(f"{out} is in use by another training process ({holder}; see {path}): one writer per "
                            f"run folder. Wait for it to end or stop it (then --resume {out} continues the run), "
                            f"or choose another --out") from None
    except OSError as e:  # e.g. a network file system without flock
        print(f"warning: {path}: cannot lock it ({e.strerror or e}); nothing stops a second training process "
              f"from writing {out} at the same time", file=sys.stderr, flush=True)
    _HELD[key] = fd
    return key


def _write_holder(key: tuple) -> None:
    """Write who holds the lock into the lock file (for a refused process's message), in place:
    replacing the file would make a new inode, i.e. a new lock."""
    text = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S %z')}\n"
    with contextlib.suppress(OSError):  # a full disk: the lock holds all the same, without a name
        os.ftruncate(_HELD[key], 0)
        os.pwrite(_HELD[key], text.encode(), 0)


def unlock_run(key: tuple, clear: bool = True) -> None:
    """Let go of a lock this process holds. clear: empty the file first (empty = nobody holds it); a
    refused start never wrote into it, so it leaves it as it found it."""
    fd = _HELD.pop(key, None)
    if fd is None:
        return
    with contextlib.suppress(OSError):
        if clear and os.fstat(fd).st_size:
            os.ftruncate(fd, 0)
    os.close(fd)  # the last descriptor of our open file: the kernel lets the flock go


@contextlib.contextmanager
def one_writer():
    """train.train's scope (a decorator there): every run-folder lock taken inside it (open_run,
    in train.setup) is let go on the way out, by a return, an error or Ctrl-C alike, so a process
    that trains twice (benchmarks, tests, a notebook) never finds its own old lock in the way."""
    before = set(_HELD)
    try:
        yield
    finally:
        for key in set(_HELD) - before:
            unlock_run(key)


def _forget_locks_in_child() -> None:
    """A forked child (the loader's worker process) must not hold the parent's lock: were the parent
    killed, a living child would keep the folder locked. Closing the child's copies leaves the
    parent's lock as it is."""
    for fd in _HELD.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_locks_in_child)


def check_still_there(out: Path) -> None:
    """Before each log write: runs/NAME must still be the folder open_run locked. Removed or moved
    while training, it would otherwise be recreated half (a log without its checkpoints)."""
    try:
        st = os.stat(out / LOCK_FILE)
        if (st.st_dev, st.st_ino) in _HELD:
            return
    except OSError:
        pass
    raise TrainingError(f"{out} disappeared while training (removed or moved away): stopping without writing "
                        f"anything more; a moved run folder continues with --resume NEW_PLACE")


def continue_hint(out: Path) -> str:
    """How to go on with runs/NAME after a stop (e.g. a full disk): --resume when it holds a checkpoint or
    config.json (a run stopped before its first checkpoint starts over), else the same command again."""
    if find_last_good(out) or (out / "config.json").is_file():
        return f"continue with --resume {out}"
    return "run the same command again"


def restore_state(run, resume_dir: Path) -> None:
    """Put back optimizer, schedule, sampler, RNGs and counters from last/ (an exact resume).

    Refused, with one error naming the file, before any step: a damaged or edited state (its digests),
    training data that differ from those the run was trained on, and a run whose best/ checkpoint is
    gone or damaged while the state says one was saved (the final test reads it).
    """
    st = _read_state(resume_dir)
    if st["world_size"] != run.di.world:
        raise SystemExit(f"error: {resume_dir} was written by {st['world_size']} processes, now {run.di.world}")
    _check_same_data(run, st, resume_dir)
    _check_best(run, st)
    run.optimizer.load_state_dict(st["optimizer"])
    run.scheduler.load_state_dict(st["scheduler"])
    try:
        run.task_sampler.load_state_dict(st["sampler"])
    except ValueError as e:  # another batch size, seed or GGAS switch than the state was drawn with
        raise TrainingError(f"{resume_dir / STATE_JSON}: {e}") from None
    plumbing.rng_restore(st["rng"])
    run.step, run.best, run.elapsed0 = int(st["step"]), dict(st["best"]), float(st.get("elapsed", 0.0))


def _read_state(folder: Path, tensors: bool = True) -> dict:
    """plumbing.read_state, every failure one FashionLensError naming the folder or the file."""
    try:
        return plumbing.read_state(folder, tensors)
    except FashionLensError:  # damaged or edited: names its file
        raise
    except (OSError, ValueError, KeyError, SafetensorError) as e:  # ValueError: JSON; the rest: tensors
        raise TrainingError(f"{folder}: unreadable training state ({STATE_JSON} / {STATE_TENSORS}: "
                            f"{type(e).__name__}: {e}); resume from an intact copy of the run") from None


def _check_same_data(run, st: dict, resume_dir: Path) -> None:
    """Each training sub-dataset's triplet file is the one the run was trained on: the sha256 saved in
    the state (a state written before it: the record count the sampler saved). Records dropped,
    added, reordered or edited would silently change every later batch of an "exact" resume."""
    then = dict(zip(st["sampler"].get("names", []), st["sampler"].get("sizes", [])))
    now = data_digests(run)
    for subset, n in run.view.sizes.items():
        file = run.ufire.triplet_file(subset, "train")
        digest = (st.get("data") or {}).get(subset)
        if (digest is not None and now[subset] != digest) or then.get(subset, n) != n:
            raise TrainingError(f"{file}: the training data of {subset!r} differ from those the run in "
                                f"{resume_dir} was trained on ({then.get(subset, '?')} records then, {n} now"
                                f"{'' if digest is None else '; the file sha256 differs'}); resume with the "
                                f"same data, or start a new run")


# runs/NAME -> {sub-dataset: sha256 of its train triplet file}, taken when the run opens (write_resolved_config,
# right after the records were read), so every checkpoint records the data the run read, at no cost per save.
_DATA_SHA: dict = {}


def data_digests(run) -> dict:
    """{sub-dataset: sha256 of its training triplet file} for the run's training view (file_sha256)."""
    return {s: plumbing.file_sha256(run.ufire.triplet_file(s, "train")) for s in run.view.sizes}


def _check_best(run, st: dict) -> None:
    """A state that saved a best step needs runs/NAME/best intact: else the final test would fail only
    after all the remaining training (or, with --no-final-test, the run would end with no best/)."""
    best = run.out / "best"
    if st["best"].get("step", 0) <= 0:  # no validation yet: best/ is written by the first one
        return
    try:
        checkpoint.check_files(best)
    except FashionLensError as e:
        raise TrainingError(f"{best}: the run's best checkpoint (step {st['best']['step']}) is missing or "
                            f"damaged ({e}); put back an intact copy, or start a new run") from None


def write_resolved_config(run, threads: int, sizes: dict, resume_dir: Optional[Path]) -> None:
    """Print and save config.json (the config plus what it resolved to); on resume, trim the log; note the
    training data's digests for the checkpoints (train_state)."""
    _DATA_SHA[str(run.out)] = data_digests(run)
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
        check_still_there(run.out)
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
    check_still_there(run.out)
    append_jsonl(run.out / "log.jsonl", rec)
    tqdm.write(f"step {run.step}: val sum of Recall@1 = {score:.3f} over {len(res.rows)} sub-datasets "
               f"(best so far {run.best['score']:.3f} @ {run.best['step']}) [{rec['seconds']:.0f}s]")
    return rec


def write_test_results(out: Path, cfg, res) -> dict:
    """test_results.json: the final test table of best/ (an evaluate.EvalResult), returned as written."""
    doc = {"checkpoint": str(out / "best"), "data": cfg.data, "split": "test", **res.to_dict()}
    check_still_there(out)  # the final test is long: the folder may have been moved meanwhile
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
    """The checkpoint a stopped run can resume from, for the error message ("" when there is none):
    its state files must match their saved digests."""
    for cand in (out / "last", out / ".last.old"):
        try:
            return f"{cand} (step {plumbing.read_state(cand, tensors=False)['step']})"
        except (OSError, ValueError, KeyError, TypeError):  # absent, unreadable or damaged: not resumable
            continue
    return ""


def save_last(run) -> None:
    """Refresh last/ without validating (--stop-at); other ranks wait."""
    if run.di.main:
        save_checkpoint(run.out / "last", run.embedder, run.cfg, state=train_state(run))
    barrier(run.di)


def train_state(run) -> dict:
    """Everything an exact resume needs besides the weights, and what it must find unchanged: "config",
    the TrainConfig fields a resume may not change (read_train_config checks train_config.json against
    them), and "data", the sha256 of each training sub-dataset's triplet file (restore_state)."""
    from support.cli import RESUME_MAY_CHANGE  # cli imports this module: a top-level import would loop

    fixed = {k: v for k, v in dataclasses.asdict(run.cfg).items() if k not in RESUME_MAY_CHANGE}
    data = _DATA_SHA.get(str(run.out)) or data_digests(run)  # hashed once, when the run opened
    return {"step": run.step, "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
            "sampler": run.task_sampler.state_dict(), "rng": plumbing.rng_snapshot(), "best": run.best,
            "world_size": run.di.world, "elapsed": run.elapsed0 + time.time() - run.t_start,
            "config": fixed, "data": data}


def read_train_config(config_cls, saved_file: Path):
    """The TrainConfig (`config_cls`) saved in a checkpoint's train_config.json, for --resume: each value of
    its declared type (checkpoint.typed_config), and the fields a resume may not change equal to those
    recorded in the training state beside it (an edited lr or batch_size would resume silently off the
    run's trajectory). TrainingError or CheckpointError naming the file and the field."""
    try:
        values = json.loads(Path(saved_file).read_text())
    except (OSError, ValueError, RecursionError) as e:  # missing, bad JSON or UTF-8, absurdly nested
        raise TrainingError(f"{saved_file}: unreadable training config ({type(e).__name__}: {e})") from None
    cfg = checkpoint.typed_config(config_cls, values, saved_file, TrainingError)  # ignores fields it does not know
    # A run stopped before its first checkpoint resumes from its config.json: no state records it then.
    has_state = Path(saved_file).name == CONFIG_JSON
    recorded = _read_state(Path(saved_file).parent, tensors=False).get("config") if has_state else None
    for k, v in (recorded or {}).items():  # a state written before the record: warned by read_state
        if values.get(k, "(absent)") != v:
            raise TrainingError(f"{saved_file}: {k}={values.get(k, '(absent)')!r} was edited: the run was "
                                f"trained with {k}={v!r} (recorded in {STATE_JSON}); put the saved value back")
    return cfg


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


def find_resume_checkpoint(run: Path) -> Optional[Path]:
    """runs/NAME (or runs/NAME/last) -> the directory holding the latest complete training state;
    None for a run stopped before its first checkpoint (its config.json, no last/): --resume starts
    that one over. Neither: FileNotFoundError."""
    run = Path(run)
    for cand in (run, run / "last", run / ".last.old"):
        if (cand / STATE_JSON).is_file() and (cand / STATE_TENSORS).is_file():
            return cand
    if stopped_before_first_checkpoint(run):
        return None
    kept = (f"; {run}/best is there without last/ (a first checkpoint cut short, or last/ removed): move best/ "
            f"away, then --resume {run} starts the run over" if (run / "best").is_dir() else "")
    raise FileNotFoundError(f"--resume {run}: no training state found in {run}/last "
                            f"(expected {STATE_JSON} and {STATE_TENSORS}){kept}")


def stopped_before_first_checkpoint(run: Path) -> bool:
    """runs/NAME holds a run's config.json but no checkpoint at all: nothing of it is worth keeping.
    A best/ without last/ (last/ removed by hand) is a result: never started over, never overwritten."""
    return (run / "config.json").is_file() and not any((run / n).exists() for n in ("last", ".last.old", "best"))


def resume_config(run: Path) -> Path:
    """The saved configuration --resume continues with: the checkpoint's train_config.json, or the
    config.json of a run stopped before its first checkpoint (the TrainConfig fields plus "resolved")."""
    ckpt = find_resume_checkpoint(run)
    return Path(run) / "config.json" if ckpt is None else ckpt / CONFIG_JSON


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
    return (f"{head}, before the first checkpoint (written every {run.cfg.eval_every} steps): no state to "
            f"continue from; --resume {run.out} starts the run over")
