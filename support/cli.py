"""The command lines of train.py and evaluate.py: parsers, flag help, flag and saved-config
checks, and what a run prints (support code: skip on first read).

A concept file's `main()` is a few lines: parse with this module, call the concept, print. The
parsers build on the concept's own config dataclass, passed in (support never imports a concept file).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

from support import fast_infer, plumbing, recipes, run_dir
from support.checkpoint import CONFIG_FILE
from support.config_fields import check_fields, choices_of
from support.errors import EvalError, TrainingError, UFireError, WriteError, run_cli
from support.ufire_files import read_json


# ================================================================================================
# train.py's command line
# ================================================================================================



# train.py's command line: `main()` there is run_train_cli(TrainConfig, train, argv). One flag per
# TrainConfig field (dashes for underscores); a field's allowed values are its knob rule
# (support/config_fields.py), so argparse's choices and the config check read the same rule.

# Fields a resumed run may change: they do not touch the optimisation trajectory.
RESUME_MAY_CHANGE = {"out", "device", "cpu_threads", "stop_at", "eval_every", "max_eval_queries",
                     "eval_batch_size", "final_test", "loader", "two_cores"}
# An expert DDP switch, left out of --help to keep it readable (the flag works).
TRAIN_HIDDEN_FLAGS = {"find_unused_parameters"}

TRAIN_FLAG_HELP = {  # --help text per TrainConfig field (why each value: docs/FIDELITY.md)
    "tasks": "'all' or task words / task/dataset names, comma or space separated",
    "data": "'synthetic' (generated into data/synthetic) or a U-FIRE root",
    "backbone": "tiny | tiny-qwen2-vl | hub id | local path", "out": "run directory (runs/NAME)",
    "recipe": "defaults of the other flags: auto (tiny-cpu for a tiny backbone, else paper) | paper | tiny-cpu",
    "steps": "optimizer steps (alone: --epochs 0)", "epochs": "train for this many epochs instead (alone: --steps 0)",
    "batch_size": "global contrastive batch",
    "chunk_size": "GradCache chunk per rank; 0 = no GradCache; -1 = the authors' size per sub-dataset",
    "lr": "peak learning rate", "temperature": "InfoNCE temperature",
    "calibrator": "slerp | linear | off", "sampler": "ggas | uniform | size",
    "ggas_warmup": "uniform-sampling steps before GGAS adapts (-1: one epoch, capped at steps/4)",
    "eval_every": "validate + checkpoint every N steps", "seed": "run seed", "device": "auto | cpu | cuda",
    "max_eval_queries": "validation queries per sub-dataset (0 = all)",
    "stop_at": "stop this invocation after this step (resume later with --resume)",
    "final_test": "evaluate best/ on the test split at the end",
    "weight_decay": "AdamW weight decay", "warmup_ratio": "share of steps with linear lr warm-up",
    "vision_lr_scale": "learning rate of a trainable vision tower, as a share of --lr",
    "min_lr_ratio": "final lr as a share of --lr (cosine decay)", "grad_clip": "max global gradient norm; 0 = off",
    "lr_schedule": "constant (after any warm-up) | cosine (warm-up, then cosine decay)",
    "positives": "single: only the query's own target | multi: every in-batch copy of it too",
    "reg_per_chunk": "add the calibrator regulariser once per GradCache chunk instead of once per batch",
    "ggas_refresh": "recompute GGAS probabilities at each epoch start | every step",
    "ggas_ema_start": "GGAS difficulty starts at zero | at the first report",
    "ggas_floor": "renorm: clip at the floor and renormalise once | waterfill: the floor holds exactly",
    "min_pixels": "least pixels per image (aspect ratio kept)", "max_pixels": "most pixels per image",
    "max_query_images": "query images per prompt (0 = all)", "query_sketches": "one | all sketches per prompt",
    "summary_init": "where the summary tokens start: im_end (the authors) | words",
    "num_frames": "frames of a video query", "video_size": "side of a video frame (pixels)",
    "lora_dropout": "LoRA dropout",
    "eval_batch_size": "batch size of validation/test encoding",
    "cpu_threads": "torch CPU threads (0: OMP_NUM_THREADS, else 1 for a tiny backbone on CPU)",
    "loader": "who prepares the next batch: thread, process (a forked worker), or off (in the loop)",
    "two_cores": "auto: share each step between two CPU cores where that is deterministic; off",
}


def build_train_parser(config_cls, description: str) -> argparse.ArgumentParser:
    """One flag per TrainConfig (`config_cls`) field; defaults are SUPPRESSed so we can tell what was
    given. A field the recipes set shows both recipes' values as its default."""
    ap = argparse.ArgumentParser(description=description,
                                 epilog="Defaults: see TrainConfig in train.py (printed at start).")
    choices = choices_of(config_cls)
    by_recipe = {r: dataclasses.asdict(config_cls(recipe=r).resolved()) for r in recipes.RECIPE_NAMES}
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        default = (", ".join(f"{r}: {v[f.name]!r}" for r, v in by_recipe.items()) if f.default is None
                   else repr(f.default))  # None: the recipe's value
        shown = f"{TRAIN_FLAG_HELP.get(f.name, '')} (default: {default})"
        kw = {"default": argparse.SUPPRESS, "help": argparse.SUPPRESS if f.name in TRAIN_HIDDEN_FLAGS else shown}
        kind = str(f.type).removeprefix("Optional[").removesuffix("]")  # "int", "float", "str" or "bool"
        if kind == "bool":
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.name == "tasks":
            ap.add_argument(flag, nargs="+", **kw)
        else:
            typ = {"int": int, "float": float, "str": str}[kind]
            ap.add_argument(flag, type=typ, choices=choices.get(f.name), **kw)
    ap.add_argument("--resume", default=None, help="continue the run in this directory (runs/NAME) exactly")
    return ap


def parse_train_config(config_cls, argv=None, description: str = "") -> tuple:
    """CLI -> (TrainConfig, resume dir). With --resume, the run's saved config is the base."""
    args = vars(build_train_parser(config_cls, description).parse_args(argv))
    resume = args.pop("resume")
    if "tasks" in args:  # "--tasks t2i cir", "--tasks t2i,cir" and "--tasks 't2i cir'" all work
        args["tasks"] = ",".join(w for a in args["tasks"] for w in a.replace(",", " ").split())
    if resume is None:
        return config_cls(**args), None
    saved_file = run_dir.resume_config(Path(resume))  # train_config.json of last/, or config.json: see open_run
    base = run_dir.read_train_config(config_cls, saved_file)  # typed, and checked against the saved state
    for k, v in args.items():
        if k not in RESUME_MAY_CHANGE and v != getattr(base, k):
            raise SystemExit(f"error: --{k.replace('_', '-')} {v!r} differs from the resumed run's "
                             f"{getattr(base, k)!r}; an exact resume keeps the training configuration "
                             f"(may change: {', '.join(sorted(RESUME_MAY_CHANGE))})")
    base = dataclasses.replace(base, **args)
    if "out" not in args:  # continue in the directory we resume from
        p = Path(resume)
        base.out = str(p.parent if p.name in ("last", ".last.old") else p)
    return base, resume


def check_train_config(cfg) -> None:
    """TrainConfig.check(): refuse values no run can use, before anything is built or created on disk.

    Checks the resolved values (a config with None fields is resolved first) against each field's
    knob rule (NaN and infinities fail every numeric rule), plus what a rule cannot say. Each failure
    is one line `error: --flag value: what it needs` (a SystemExit, as argparse's own errors are).
    """
    c = cfg.resolved()
    if not (c.steps >= 1 or (c.steps == 0 and c.epochs > 0)):  # steps 0 means "set by --epochs"
        raise SystemExit(f"error: --steps {c.steps!r}: must be >= 1 (0 only with --epochs > 0)")
    check_fields(c, error=lambda msg: SystemExit(f"error: {msg}"))
    plumbing.check_device("--device", c.device)
    plumbing.check_writable("--out", run_dir.resolved_out(c))


def check_not_empty(ufire, split: str, subsets: list, need: int) -> None:
    """Every selected sub-dataset must hold >= `need` records (one per DDP process for training).

    GGAS samples every training sub-dataset, and validation sums Recall@1 over every val one: an
    empty file would fail deep inside the sampler, or turn the model-selection score into NaN.
    """
    for s in subsets:
        n = len(ufire.records(s, split))
        if n < need:
            raise TrainingError(f"{ufire.triplet_file(s, split)}: {split} sub-dataset {s!r} has {n} records "
                                f"(needs at least {need}); fill the file or leave {s} out of --tasks")


@contextlib.contextmanager
def training_progress(run):
    """The training loop's progress bar (yielded: `bar.update(run, so, subset)`); Ctrl-C becomes
    run_dir.Interrupted saying where the run stopped; the loader and the spare core are shut on exit."""
    from tqdm import tqdm

    bar = tqdm(total=run.plan.total, initial=run.step, desc="train", disable=not run.di.main, dynamic_ncols=True)
    run.t_prev = time.time()
    try:
        yield bar
    except KeyboardInterrupt:  # Ctrl-C: the checkpoints on disk are intact (atomic), say which to use
        raise run_dir.Interrupted(run_dir.stopped_message(run) if run.di.main else "") from None
    finally:
        bar.close()
        run.loader.close()
        if run.spare is not None:
            run.spare.shutdown()


def show_step(bar, run, so, subset: str) -> None:
    """One tick of the progress bar: the step, its loss and its sub-dataset."""
    bar.update(1)
    bar.set_postfix(step=run.step, loss=f"{so.loss:.3f}", task=subset, refresh=False)


def stopped_at(bar, run) -> dict:
    """--stop-at reached: say how to continue, and the summary of this invocation."""
    bar.close()
    if run.di.main:
        print(f"stopped after step {run.step} as asked (--stop-at); continue with --resume {run.out}")
    return {"out": str(run.out), "stopped_at": run.step, "best": run.best}


def print_done(run, summary: dict) -> None:
    """The last line of a finished run."""
    out = run.out
    print(f"done: {run.plan.total} steps, best val sum Recall@1 {run.best['score']:.3f} at step "
          f"{run.best['step']}; wall {summary['wall_seconds']:.0f}s, peak RSS {summary['peak_rss_mib']:.0f} MiB; "
          f"checkpoints in {out}/best and {out}/last")


@contextlib.contextmanager
def final_test_interrupt(run):
    """Ctrl-C in the final test: training is complete; say where its checkpoints are."""
    try:
        yield
    except KeyboardInterrupt:
        raise run_dir.Interrupted(f"stopped by Ctrl-C in the final test; training is complete, its checkpoints are "
                                  f"{run.out}/best and {run.out}/last (test: python evaluate.py --ckpt {run.out}/best)"
                                  if run.di.main else "") from None


def run_train_cli(config_cls, train, argv=None, description: str = "") -> int:
    """train.py's CLI: 0 on success; 1 and one `error:` line for bad input or a stopped run (errors.run_cli:
    every FashionLensError, and a missing --resume folder; a full disk names the file and how to
    continue once space is freed); 130 and one line for Ctrl-C."""
    def _main(argv=None) -> int:
        """Parse, train, and leave the process group; Ctrl-C says whether and how the run can continue."""
        import torch.distributed as dist  # loaded late: entry points import plumbing before torch

        resume = out = None
        try:
            cfg, resume = parse_train_config(config_cls, argv, description)
            out = Path(run_dir.resolved_out(cfg))
            train(cfg, resume)
        except WriteError as err:  # a full disk: every file already written is intact, say how to go on
            if out is None or err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise WriteError(f"{err}. Free some space, then {run_dir.continue_hint(out)}") from None
        except KeyboardInterrupt as stop:
            msg = str(stop) if isinstance(stop, run_dir.Interrupted) else (
                "interrupted (Ctrl-C) while starting, before any training step"
                + (f"; the run still continues with --resume {resume}" if resume else ""))
            if msg:  # under torchrun only rank 0 speaks
                print(msg, file=sys.stderr, flush=True)
            return 130
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        return 0

    return run_cli(_main, argv, expected=(FileNotFoundError,))


# ================================================================================================
# evaluate.py's command line
# ================================================================================================
# `python evaluate.py --ckpt runs/X/best [--split val] [--tasks cir,t2i] [--k 1,10] [--ood only]
# [--max-queries 100] [--out results.json]`, or `--self-check`. evaluate.main passes the concept objects
# in: data.UFire, a function that imports the embedder class, evaluate.evaluate and its self-check.
# A bad flag, checkpoint or data file stops it with one `error:` line and exit status 1.




def evaluate_cli(argv, *, description: str, ufire_cls, model: Callable, evaluate: Callable,
                 self_check: Callable) -> int:
    """Every flag is checked before the data, the checkpoint or any output is touched.

    ufire_cls: data.UFire. model(): the FashionLensEmbedder class, called only after the flags and
    the data were checked (model.py imports transformers). evaluate: evaluate.evaluate.
    The --out files are written before the table is printed: a terminal that cannot show a file
    name, or a reader that stopped reading (`| head`), never costs the results (errors.run_cli).
    """
    args = parse_flags(argv, description)
    if args.self_check:
        return self_check()
    ckpt = Path(args.ckpt)
    root = args.data or training_data_root(ckpt) or "data/synthetic"
    if root == "synthetic":  # a run trained on `--data synthetic`: generate it if this clone lacks it
        from support import synthetic  # the generator is needed only here: keep it off every other path

        root = synthetic.ensure_synthetic("data/synthetic")
    if args.out:  # never write over what this evaluation reads
        check_not_inside("--out", [args.out, per_query_file(args.out)], {"checkpoint": ckpt, "data root": root})
    ufire = ufire_cls(root)
    subsets = ufire.select(args.split, args.tasks, args.ood)  # unknown tasks fail before loading
    FashionLensEmbedder = model()  # model imports transformers: keep it off the metric path

    if args.device is None:  # the device saved in the checkpoint (where it was trained) must exist here
        saved = saved_device(ckpt / CONFIG_FILE)
        if saved:
            plumbing.check_device(f"{ckpt / CONFIG_FILE} (field 'device'; override it with --device cpu)", saved)
    kw = {"device": args.device} if args.device else {}
    embedder = FashionLensEmbedder.from_pretrained(str(ckpt), **kw)
    # A tiny model on a CPU: one torch thread per process, and one encoding thread per core
    # (support/fast_encode.encode_threads): its small matmuls gain nothing from splitting, batches side by side do.
    plumbing.set_cpu_threads(0, embedder.device.type, small_model=embedder.tiny)
    some = f"   at most {args.max_queries} queries per sub-dataset" if args.max_queries > 0 else ""
    print(f"checkpoint: {ckpt}   data: {root}   split: {args.split}{some}", flush=True)  # what is measured
    res = evaluate(embedder, ufire, subsets, split=args.split, ks=args.ks, batch_size=args.batch_size,
                   cache_dir=fast_infer.cache_folder(args.cache_dir, verify=args.verify_cache),
                   progress=sys.stderr.isatty(), keep_per_query=bool(args.out), max_queries=args.max_queries)
    if args.out:  # first: the results are safe on disk before anything is printed
        out = Path(args.out)
        doc = {"checkpoint": str(ckpt), "data": str(root), "split": args.split, **res.to_dict()}
        text = json.dumps(doc, indent=1, allow_nan=False)  # strict JSON: a NaN here is a bug, not output
        plumbing.atomic_write(out, text)  # a reader never sees half a file
        plumbing.atomic_write(per_query_file(out),
                              "".join(json.dumps(r, allow_nan=False) + "\n" for r in res.per_query))
    print(format_table(res))
    s = res.seconds
    print(f"\n{s['gallery_images']} unique gallery images, {s['queries']} queries searched, "
          f"{s['missing']} missing (misses); "
          f"encode gallery {s['gallery_encode']:.1f}s, queries {s['query_encode']:.1f}s, "
          f"search {s['search']:.2f}s, total {s['total']:.1f}s")
    if args.out:
        print(f"wrote {args.out} and {per_query_file(args.out)}")
    return 0


def per_query_file(out) -> Path:
    """Where --out's per-query rows go: beside it, as NAME.per_query.jsonl."""
    return Path(out).with_suffix(".per_query.jsonl")


def check_not_inside(flag: str, outputs: list, inputs: dict) -> None:
    """EvalError when an output path lies inside one of the `inputs` folders ({what: path}).

    Writing results into the checkpoint folder or the data root would change what is being measured
    (a checkpoint's files, a data file), or leave strays there that a later run reads; symlinks are
    resolved, so a link into either is caught too.
    """
    for out in outputs:
        real = Path(out).resolve()
        for what, folder in inputs.items():
            if real == Path(folder).resolve() or real.is_relative_to(Path(folder).resolve()):
                raise EvalError(f"{flag} {out}: inside the {what} {folder}, which this evaluation reads; "
                                "write the results elsewhere")


def build_parser(description: str) -> argparse.ArgumentParser:
    """The flags; their values are checked by `parse_flags`. description: evaluate.py's first docstring line."""
    ap = argparse.ArgumentParser(description=description,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--ckpt", help="checkpoint directory written by train.py (runs/NAME/best)")
    ap.add_argument("--data", default=None,
                    help="U-FIRE root; default: the data the checkpoint was trained on")
    ap.add_argument("--tasks", default="all", help="'all' or comma-separated task words / task/dataset names")
    ap.add_argument("--split", default="test", choices=["test", "val"])
    ap.add_argument("--ood", nargs="?", const="only", default="include", choices=["include", "only", "skip"],
                    help="evaluation-only tasks: include them (default), 'only' them (bare --ood), or skip")
    ap.add_argument("--k", default="1,5,10,50", help="comma-separated K values (positive integers)")
    ap.add_argument("--out", default=None, help="write results JSON here (+ .per_query.jsonl beside it)")
    ap.add_argument("--batch-size", type=int, default=64, help="images per forward pass (>= 1)")
    ap.add_argument("--max-queries", type=int, default=0,
                    help="score at most N evenly spaced queries per sub-dataset (0 = all); the gallery stays whole")
    ap.add_argument("--cache-dir", default=".cache/gallery", help="gallery embedding cache ('' to disable)")
    ap.add_argument("--verify-cache", action="store_true",
                    help="key the gallery cache on every image's contents (sha256) rather than its size, "
                         "times and inode: exact, but reads every image")
    ap.add_argument("--device", default=None, help="cpu | cuda | cuda:N | auto (default: the checkpoint's config)")
    ap.add_argument("--self-check", action="store_true", help="run the small built-in demo and exit")
    return ap


def parse_flags(argv, description: str = "") -> argparse.Namespace:
    """Parse and check every flag (EvalError naming it); adds `ks`, the parsed --k."""
    args = build_parser(description).parse_args(argv)
    if args.self_check:
        return args
    if not args.ckpt:
        raise EvalError("--ckpt is required (a checkpoint folder such as runs/NAME/best), or --self-check")
    if not Path(args.ckpt).is_dir():
        raise EvalError(f"--ckpt {args.ckpt}: no such checkpoint folder")
    args.ks = parse_ks(args.k)
    if args.batch_size < 1:
        raise EvalError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.max_queries < 0:
        raise EvalError(f"--max-queries {args.max_queries}: must be 0 (all queries) or more")
    if args.device is not None:
        plumbing.check_device("--device", args.device)
    for out in ([args.out, per_query_file(args.out)] if args.out else []):  # both files evaluate writes
        plumbing.check_writable("--out", out, folder=False)
    return args


def parse_ks(text: str) -> tuple:
    """'10,1,5' -> (1, 5, 10): sorted, without repeats; anything but positive integers is an EvalError."""
    ks = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:  # "1,5," : an empty entry is a stray comma, not a K
            continue
        if not re.fullmatch(r"\+?\d+", part) or int(part) < 1:  # R@0 and R@-1 mean nothing
            raise EvalError(f"--k {text!r}: every K must be a positive integer (e.g. --k 1,5,10,50), "
                            f"not {part!r}")
        ks.add(int(part))
    if not ks:
        raise EvalError(f"--k {text!r}: give at least one K (e.g. --k 10)")
    return tuple(sorted(ks))


def saved_device(cfg_file: Path) -> Optional[str]:
    """The device field of a checkpoint's config, or None if it cannot be read (from_pretrained
    then reports the file)."""
    try:
        return read_json(str(cfg_file))["config"].get("device")
    except (UFireError, KeyError, TypeError, AttributeError):
        return None


def training_data_root(ckpt: Path) -> Optional[str]:
    """The data root a checkpoint was trained on, from the run's saved configuration, if any (an
    unreadable file is skipped: --data names the root then)."""
    for cand in (ckpt / "train_config.json", ckpt.parent / "config.json"):
        if cand.is_file():
            try:
                root = read_json(str(cand)).get("data")
            except (UFireError, AttributeError):  # unreadable, absurd (nested too deep) or not an object
                continue
            if isinstance(root, str) and root:
                return root
    return None


def format_table(result) -> str:
    """The markdown table the CLI prints (an evaluate.EvalResult): rows, then task means, then the
    overall mean, then the line that says what Recall@K divides by (`result.note`)."""
    ks = list(result.ks)
    head = "| sub-dataset | gallery | queries | missing | " + " | ".join(f"R@{k}" for k in ks) + " | chance R@10 |"
    lines = [head, "|" + "---|" * (5 + len(ks))]
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}"  # noqa: E731  (percent, one decimal)
    empty = [r for r in result.rows if r.queries + r.missing == 0]  # no Recall: marked, left out of the means
    for r in result.rows:
        name = f"{r.subset} (no queries: left out of the means)" if r.queries + r.missing == 0 else r.subset
        lines.append(f"| {name} | {r.gallery} | {r.queries} | {r.missing} | "
                     + " | ".join(pct(r.recall[k]) for k in ks) + f" | {pct(r.chance10)} |")
    for t, m in result.task_means.items():
        if t != "ood":  # the OOD mean goes below overall: it is reported, never averaged in
            lines.append(f"| **{t}** (task mean) | | | | " + " | ".join(pct(m[k]) for k in ks) + " | |")
    if result.overall:
        over = f"; the {len(empty)} row(s) without queries left out" if empty else ""
        lines.append(f"| **overall** (mean of the task means above{over}) | | | | "
                     + " | ".join(pct(result.overall[k]) for k in ks) + " | |")
    if "ood" in result.task_means:
        lines.append("| **ood** (task mean; out of distribution, not in overall) | | | | "
                     + " | ".join(pct(result.task_means["ood"][k]) for k in ks) + " | |")
    lines.append(f"\nR@K = {result.note}.")
    return "\n".join(lines)


class Stopwatch:
    """Wall time per stage of evaluate(): `with watch("search"):` adds the block's time to that stage."""

    def __init__(self, *stages: str):
        self.start = time.perf_counter()
        self.seconds = dict.fromkeys(stages, 0.0)  # stage -> seconds, in the order given

    @contextmanager
    def __call__(self, stage: str):
        t = time.perf_counter()
        yield
        self.seconds[stage] += time.perf_counter() - t

    def total(self) -> float:
        return time.perf_counter() - self.start


def per_query_rows(view, ids, scores, ranks) -> list:
    """The per-query dump (`--out`'s .per_query.jsonl) of one sub-dataset's searched queries:
    top-k paths and scores, positives, and the rank of the first positive (-1: none in the top k)."""
    return [{"subset": view.subset, "id": rec.id,
             "topk": [view.gallery[j] for j in ids[i]], "scores": scores[i].tolist(),
             "positives": [view.gallery[j] for j in view.positives[i]],
             "first_hit_rank": int(ranks[i])} for i, rec in enumerate(view.records)]
