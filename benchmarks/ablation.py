"""The ablation table: what PGSQC and GGAS each buy, on the synthetic U-FIRE, over several seeds.

What it measures
----------------
FashionLens (Wen et al., 2026) adds two mechanisms to a plain contrastive MLLM retriever: PGSQC
(calibrator.py: slerp of each query toward a proposal) and GGAS (sampler.py: task sampling by
gradient-guided difficulty x data size). The paper's ablations remove each one. This script trains,
at the default job's budget (`python train.py --tasks all`: the `tiny-cpu` recipe, 1400 steps) and
with the same recipe otherwise, six variants, each with several seeds (a seed sets the tiny base's
init, the sampler and the data draws):

    variant        --calibrator  --sampler   what it removes
    full           slerp         ggas        nothing (the method; seed 0 is the default job)
    cal-off        off           ggas        PGSQC
    cal-linear     linear        ggas        the sphere: linear interpolation instead of slerp
    samp-uniform   slerp         uniform     GGAS (every sub-dataset equally likely)
    samp-size      slerp         size        GGAS' gradient term (size prior only)
    baseline       off           uniform     both: the plain contrastive retriever the method builds on

Each run is evaluated on the test split (all 13 sub-datasets; `--ood` adds the two OOD tasks)
with evaluate.evaluate, keeping each test query's rank of its first positive. The tables report
the overall and per-task Recall@1 / @10 as mean ± std over seeds, and, for each variant, what the
piece it removes was worth:

    D = (1/S) sum_s [R_full,s - R_variant,s]      the paired difference (same seed = same init)

with a 95 % interval from a two-level bootstrap (seeds, then the test queries within each seed,
the same queries for both variants: `paired_bootstrap`). The paper's claims (taken from a
secondary summary of the paper; its own tables were not available) are each "A beats B":
    GGAS helps (full > samp-uniform), PGSQC helps (full > cal-off), removing GGAS costs more than
    removing PGSQC (cal-off > samp-uniform), slerp beats linear (full > cal-linear),
    and, for information, GGAS' gradient term helps (full > samp-size) and both ideas together
    help (full > baseline).
A claim "holds" when the interval of A - B lies above 0, is "contradicted" when it lies below,
and is "within noise" otherwise. With one seed nothing is decided.

Run it
------
    python benchmarks/ablation.py --jobs 2            # 6 variants x seeds 0,1,2 at 1400 steps: ~2.5 h on 2 cores
    python benchmarks/ablation.py --quick             # SMOKE TEST (~6 min): 6 variants x 1 seed, few steps
    python benchmarks/ablation.py --seeds 0,1,2,3,4 --ood --out benchmarks/long.json
    python benchmarks/ablation.py --variants full,cal-off --seeds 0 --steps 5 --tasks t2i   # seconds

Each run trains in-process through train.train into runs/ablation/<variant>-s<seed> (git-ignored;
--quick uses runs/ablation-quick) and leaves its test numbers there (ablation_run.json, with the
per-query ranks); a rerun with the same settings reuses finished runs, so an interrupted benchmark
continues where it stopped (`--fresh` retrains all). `--jobs 2` trains two runs at a time, one
thread each (the fastest use of two cores for the tiny model). Results: the markdown tables and
verdict on stdout, everything but the per-query ranks in benchmarks/ablation_results.json
(--quick: runs/ablation-quick/ablation_results.json).

Numbers are Recall in percent on the synthetic U-FIRE: differences between recipes at equal
compute on a tiny random-init model, not the paper's absolute numbers.

Shape legend: S seeds, V variants, T task words.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from support.errors import run_cli  # noqa: E402  (standard library only: --help stays fast)

# variant name -> (calibrator, sampler); "full" is the method, the rest remove one piece each.
VARIANTS = {
    "full": ("slerp", "ggas"),
    "cal-off": ("off", "ggas"),
    "cal-linear": ("linear", "ggas"),
    "samp-uniform": ("slerp", "uniform"),
    "samp-size": ("slerp", "size"),
    "baseline": ("off", "uniform"),
}
DESCRIPTIONS = {
    "full": "full model (slerp PGSQC + GGAS)",
    "cal-off": "calibrator off (no PGSQC)",
    "cal-linear": "linear instead of slerp",
    "samp-uniform": "sampler uniform (no GGAS)",
    "samp-size": "sampler size-prior only",
    "baseline": "baseline: neither idea (calibrator off, sampler uniform)",
}
# The paper's claims as (A, B, statement, required): "A beats B"; `required` ones decide "ordering
# matches". They come from a secondary summary of the paper: its own tables were not available.
CLAIMS = [
    ("full", "samp-uniform", "GGAS helps: full > sampler uniform", True),
    ("full", "cal-off", "PGSQC helps: full > calibrator off", True),
    ("cal-off", "samp-uniform", "removing GGAS costs more than removing PGSQC: cal-off > samp-uniform", True),
    ("full", "cal-linear", "slerp beats linear: full > cal-linear", True),
    ("full", "samp-size", "(info) GGAS' gradient term helps: full > size prior only", False),
    ("full", "baseline", "(info) both ideas together help: full > baseline", False),
]
# The progression notebook 07 walks, one idea at a time: (A, B, label), each step reported as A − B
# with the same paired bootstrap. baseline -> + GGAS (cal-off) -> + PGSQC (full, the method).
PROGRESSION = [("cal-off", "baseline", "+ GGAS"), ("full", "cal-off", "+ PGSQC")]
KS = (1, 10)
N_BOOT = 2000  # bootstrap replicates: the 2.5 / 97.5 % quantiles move by < 0.1 point beyond this
# Per-run budget: by default the default job's own (the tiny-cpu recipe: 1400 steps, validation
# every 200), so every variant gets exactly the compute `python train.py --tasks all` gets.
QUICK_STEPS = 10  # --quick: 6 runs of ~1 min (mostly the test evaluation); a smoke test, not a result


# ================================================================================================
# Statistics: the paired bootstrap over test queries (pure functions: tests/test_benchmarks.py
# runs them on made-up rankings whose answers are known)
# ================================================================================================


def mean_std(xs) -> tuple[float, float]:
    """Mean and sample std (n-1); std is nan for fewer than two values."""
    xs = [float(x) for x in xs if x is not None and not math.isnan(float(x))]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)  # mean over seeds
    if len(xs) < 2:
        return m, float("nan")
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)  # unbiased variance over seeds
    return m, math.sqrt(var)


def fmt_ms(m: float, s: float) -> str:
    """'41.3 ± 2.0' in percent; '41.3' when there is no std (one seed)."""
    if math.isnan(m):
        return "n/a"
    return f"{100 * m:.1f}" if math.isnan(s) else f"{100 * m:.1f} ± {100 * s:.1f}"


def paired_bootstrap(runs_a: list, runs_b: list, ks=KS, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """The difference A - B in Recall@K, per task word and overall, with a 95 % interval.

    runs_a[i] and runs_b[i] are the test results of two variants trained with the same seed (the
    same initial weights and data order up to what the variant changes); each has `rows`, one per
    sub-dataset, with `ranks` (the 0-based rank of each test query's first positive, -1 beyond
    max K, in the same query order for both) and `missing` (queries whose positives are not in the
    gallery: misses for both). Per seed s and sub-dataset j with n queries and m missing:

        d_q      = 1[rank_A(q) < K] - 1[rank_B(q) < K]              per query, in {-1, 0, 1}
        D_sj     = sum_q d_q / (n + m)                               = R_A@K - R_B@K of the sub-dataset
        D_s,task = mean over the task's sub-datasets of D_sj;  D_s = mean over tasks of D_s,task
        D        = (1/S) sum_s D_s                                   the reported difference

    A replicate is a two-level bootstrap: it draws S seeds with replacement (how much D depends on
    the training seed) and, within each, redraws each sub-dataset's n queries with replacement
    (how much it depends on which test queries exist; the same draw for A and B, so the pairing
    removes the queries' own difficulty from the noise), then recomputes D. The interval is the
    2.5 and 97.5 % quantiles of n_boot replicates. With one seed only the queries are redrawn.
    Returns {"overall": {K: stat}, "tasks": {task: {K: stat}}} with
    stat = {"diff", "lo", "hi", "per_seed": [D_s ...]}.
    """
    import numpy as np

    if len(runs_a) != len(runs_b) or not runs_a:
        raise ValueError(f"paired_bootstrap needs the same seeds for both variants, got {len(runs_a)} "
                         f"and {len(runs_b)} runs")
    rng = np.random.default_rng(seed)
    point = {}  # (s, task) -> {K: [D_sj ...]}
    reps = {}  # (s, task) -> {K: [(n_boot,) replicates of D_sj ...]}
    tasks: list[str] = []
    for s, (ra, rb) in enumerate(zip(runs_a, runs_b)):
        rows_b = {r["subset"]: r for r in rb["rows"]}
        for row in ra["rows"]:
            if row["task"] == "ood" or not row.get("ranks"):
                continue  # OOD tasks are not in "overall"; an empty triplet file has no Recall
            if "ranks" not in rows_b.get(row["subset"], {}):
                raise ValueError(f"paired_bootstrap: {row['subset']!r} has no per-query ranks in both runs "
                                 f"(results written before ranks were kept: rerun with --fresh)")
            a = np.asarray(row["ranks"])  # (n,)
            b = np.asarray(rows_b[row["subset"]]["ranks"])  # (n,)
            if a.shape != b.shape:
                raise ValueError(f"paired_bootstrap: {row['subset']!r} has {len(a)} and {len(b)} queries")
            n, denom = len(a), len(a) + row["missing"]
            counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot)  # (n_boot, n) draws per query
            if row["task"] not in tasks:
                tasks.append(row["task"])
            for k in ks:
                d = ((a >= 0) & (a < k)).astype(float) - ((b >= 0) & (b < k)).astype(float)  # (n,) d_q
                point.setdefault((s, row["task"]), {}).setdefault(k, []).append(d.sum() / denom)  # D_sj
                reps.setdefault((s, row["task"]), {}).setdefault(k, []).append(counts @ d / denom)  # (n_boot,)
    seeds = range(len(runs_a))

    n_seeds = len(runs_a)
    seed_draw = rng.integers(0, n_seeds, size=(n_boot, n_seeds))  # (n_boot, S) seeds of each replicate
    cols = np.arange(n_boot)[:, None]  # (n_boot, 1)

    def stat(per_seed_point, per_seed_reps) -> dict:
        rep = np.stack(per_seed_reps)[seed_draw, cols].mean(axis=1)  # (S, n_boot) -> (n_boot,) D
        lo, hi = np.quantile(rep, [0.025, 0.975])
        return {"diff": float(np.mean(per_seed_point)), "lo": float(lo), "hi": float(hi),
                "per_seed": [float(x) for x in per_seed_point]}

    out = {"overall": {}, "tasks": {t: {} for t in sorted(tasks)}}
    for k in ks:
        task_point = {t: [float(np.mean(point[s, t][k])) for s in seeds] for t in tasks}  # D_s,task
        task_reps = {t: [np.mean(reps[s, t][k], axis=0) for s in seeds] for t in tasks}  # (n_boot,) each
        for t in tasks:
            out["tasks"][t][k] = stat(task_point[t], task_reps[t])
        overall_point = [float(np.mean([task_point[t][s] for t in tasks])) for s in seeds]  # D_s
        overall_reps = [np.mean([task_reps[t][s] for t in tasks], axis=0) for s in seeds]  # (n_boot,) each
        out["overall"][k] = stat(overall_point, overall_reps)
    return out


def verdict(st: dict) -> str:
    """'holds' (A > B: the whole 95 % interval above 0), 'contradicted' (below 0), else 'within noise'."""
    if st["lo"] > 0:
        return "holds"
    if st["hi"] < 0:
        return "contradicted"
    return "within noise"


def check_claims(runs_by_variant: dict, ks=KS) -> list[dict]:
    """Every claim whose two variants were run, on overall Recall@K for each K."""
    out = []
    for a, b, text, required in CLAIMS:
        if a not in runs_by_variant or b not in runs_by_variant:
            continue
        boot = paired_bootstrap(runs_by_variant[a], runs_by_variant[b], ks)
        for k in ks:
            st = boot["overall"][k]
            if len(st["per_seed"]) < 2:
                v = "untestable (1 seed)"
            else:
                v = verdict(st)
            wins = sum(1 for d in st["per_seed"] if d > 0)
            out.append({"claim": text, "a": a, "b": b, "metric": f"R@{k}", "required": required,
                        "wins": wins, "n": len(st["per_seed"]), "verdict": v, **st})
    return out


def overall_verdict(checks: list[dict]) -> str:
    """One sentence: does the ordering match the paper's claims (required claims only)?"""
    req = [c for c in checks if c["required"]]
    if not req:
        return "no claim could be checked (a variant is missing)"
    if any(c["verdict"].startswith("untestable") for c in req):
        return "cannot tell: one seed gives no spread between seeds (this is a smoke test, not a result)"
    held = [c for c in req if c["verdict"] == "holds"]
    contra = [c for c in req if c["verdict"] == "contradicted"]
    noise = [c for c in req if c["verdict"] == "within noise"]
    if len(held) == len(req):
        return "MATCHES the paper: every claimed ordering holds (95 % interval above 0)"
    parts = []
    if held:
        parts.append(f"{len(held)}/{len(req)} hold")
    if noise:
        parts.append(f"{len(noise)}/{len(req)} within noise")
    if contra:
        parts.append(f"{len(contra)}/{len(req)} contradicted")
    head = "does NOT match the paper" if contra else "does not clearly match the paper"
    return f"{head}: " + ", ".join(parts)


# ================================================================================================
# Tables
# ================================================================================================


def aggregate(runs: list[dict], variants: list[str], seeds: list[int]) -> dict:
    """Per-run results -> {variant: {"R@1": [per seed], "R@10": [...], "tasks": {task: {"R@1": [...]}}}}."""
    agg: dict = {}
    for v in variants:
        rs = [next((r for r in runs if r["variant"] == v and r["seed"] == s), None) for s in seeds]
        rs = [r for r in rs if r is not None]
        if not rs:
            continue
        entry = {f"R@{k}": [r["overall"][str(k)] for r in rs] for k in KS}
        tasks = sorted({t for r in rs for t in r["task_means"]})
        entry["tasks"] = {t: {f"R@{k}": [r["task_means"][t][str(k)] for r in rs if t in r["task_means"]]
                              for k in KS} for t in tasks}
        entry["seeds"] = [r["seed"] for r in rs]
        entry["run_seconds"] = [r["seconds"] for r in rs]
        agg[v] = entry
    return agg


def summary_table(agg: dict) -> str:
    """Variant | overall R@1 | overall R@10 (mean ± std over seeds) | seeds."""
    lines = ["| variant | overall R@1 | overall R@10 | seeds |", "|---|---|---|---|"]
    for v, e in agg.items():
        lines.append(f"| {DESCRIPTIONS.get(v, v)} (`{v}`) | {fmt_ms(*mean_std(e['R@1']))} | "
                     f"{fmt_ms(*mean_std(e['R@10']))} | {len(e['R@1'])} |")
    return "\n".join(lines)


def task_table(agg: dict, metric: str) -> str:
    """Rows: task words; columns: variants; cells: mean ± std over seeds of the task's `metric`."""
    vs = list(agg)
    tasks = sorted({t for e in agg.values() for t in e["tasks"]}, key=lambda t: (t == "ood", t))
    lines = [f"| task ({metric}) | " + " | ".join(f"`{v}`" for v in vs) + " |", "|---" * (len(vs) + 1) + "|"]
    for t in tasks:
        cells = [fmt_ms(*mean_std(agg[v]["tasks"].get(t, {}).get(metric, []))) for v in vs]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fmt_ci(st: dict) -> str:
    """'+1.2 [-0.4, +2.9]' in points."""
    return f"{100 * st['diff']:+.1f} [{100 * st['lo']:+.1f}, {100 * st['hi']:+.1f}]"


def delta_table(deltas: dict, k: int, head: str = "full − variant", win: str = "full > variant") -> str:
    """Rows: task words and overall; columns: the compared pairs (by default what each variant removes:
    full - variant); cells: A - B in Recall@k with its 95 % interval; A helps where the whole interval
    is above 0."""
    vs = list(deltas)
    tasks = sorted({t for d in deltas.values() for t in d["tasks"]})
    lines = [f"| R@{k}: {head} | " + " | ".join(f"`{v}`" for v in vs) + " |", "|---" * (len(vs) + 1) + "|"]
    for t in tasks:
        lines.append(f"| {t} | " + " | ".join(fmt_ci(deltas[v]["tasks"][t][k]) for v in vs) + " |")
    lines.append("| **overall** | " + " | ".join(f"**{fmt_ci(deltas[v]['overall'][k])}**" for v in vs) + " |")
    lines.append(f"| seeds with {win} | " + " | ".join(
        f"{sum(d > 0 for d in deltas[v]['overall'][k]['per_seed'])}/{len(deltas[v]['overall'][k]['per_seed'])}"
        for v in vs) + " |")
    return "\n".join(lines)


# When a contrast gets more seeds (issue 32): its 95 % interval is wider than WIDE (half-width, in Recall
# points) and contains 0. Up to MAX_SEEDS; beyond that it is reported "unresolved at N seeds".
WIDE, MAX_SEEDS = 0.015, 8


def seed_advice(st: dict, n_seeds: int) -> str:
    """'resolved' | 'add seeds' | 'unresolved at N seeds' for one contrast's statistic (see WIDE)."""
    if st["lo"] > 0 or st["hi"] < 0 or (st["hi"] - st["lo"]) / 2 <= WIDE:
        return "resolved"  # the interval excludes 0, or is narrow: more seeds would not change the reading much
    return "add seeds" if n_seeds < MAX_SEEDS else f"unresolved at {n_seeds} seeds"


def verdict_table(checks: list[dict]) -> str:
    lines = ["| claim | metric | Δ (A − B) [95 % interval] | per seed | verdict |", "|---|---|---|---|---|"]
    for c in checks:
        seeds = " / ".join(f"{100 * d:+.1f}" for d in c["per_seed"])
        lines.append(f"| {c['claim']} | {c['metric']} | {fmt_ci(c)} | {seeds} | {c['verdict']} |")
    return "\n".join(lines)


# ================================================================================================
# Machine description (shared with speed.py)
# ================================================================================================


def machine_info() -> dict:
    """Cores, CPU model, torch threads, versions, the date and the commit: printed above every result."""
    from support import plumbing

    return plumbing.machine_info(REPO)


def machine_line(info: dict) -> str:
    return (f"machine: {info['cores']} cores ({info['cpu_model']}), torch {info.get('torch', '?')} with "
            f"{info.get('torch_threads', '?')} threads, python {info['python']}; date {info['date']}")


# ================================================================================================
# One run: train in-process, evaluate best/ on the test split
# ================================================================================================


def train_defaults() -> dict:
    """The default job's resolved TrainConfig (the tiny-cpu recipe), minus where a run reads and writes.
    It is part of every run's settings, so a run trained before a default changed is redone."""
    import train

    return {k: v for k, v in dataclasses.asdict(train.TrainConfig().resolved()).items()
            if k not in ("out", "data", "device")}


def run_settings(variant: str, seed: int, args) -> dict:
    """Everything that defines one run's result (a finished run is reused only if these match)."""
    cal, samp = VARIANTS[variant]
    defaults = train_defaults()
    return {"variant": variant, "seed": seed, "calibrator": cal, "sampler": samp, "steps": args.steps,
            "eval_every": args.eval_every, "tasks": args.tasks, "ood": bool(args.ood),
            "max_eval_queries": args.max_eval_queries, "train_defaults": defaults}


def finished_record(variant: str, seed: int, args):
    """The committed record of this run if it finished with today's settings, else None."""
    if args.quick:
        return None
    path = Path(args.records) / f"{run_name(variant, seed, args.steps)}.json"
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    return doc if doc.get("settings") == run_settings(variant, seed, args) else None


def check_one_cpu_per_seed(order: list, args) -> None:
    """All variants of one seed must come from one CPU model: another CPU rounds differently, and that
    would leak into their paired difference. Refuse, before anything trains, a seed whose finished runs
    were made on another CPU than this one while some of its variants still have to be trained here."""
    here = machine_info()["cpu_model"]
    for seed in sorted({s for _, s in order}):
        recs = {v: finished_record(v, s, args) for v, s in order if s == seed}
        cpus = {r["machine"]["cpu_model"] for r in recs.values() if r is not None}
        todo = [v for v, r in recs.items() if r is None]
        if len(cpus) > 1 or (todo and cpus - {here}):
            raise SystemExit(f"error: seed {seed}: its finished runs in {args.records} were trained on {sorted(cpus)}"
                             + (f" and {', '.join(todo)} would be trained here on {here!r}" if todo else "")
                             + ": a seed's variants are compared pairwise, so they must share one CPU model. Train "
                             "this seed on such a machine, choose other seeds, or retrain all its variants (--fresh)")


def run_one(variant: str, seed: int, args, ufire) -> dict:
    """Train one variant/seed (or reuse a finished run with the same settings); return its test numbers."""
    import train

    cal, samp = VARIANTS[variant]
    name = run_name(variant, seed, args.steps)
    out = Path(args.runs) / name
    # --jobs > 1 runs one training per core: each keeps to its one thread (two_cores off; the
    # result is the same, tests/test_fast_paths.py).
    cfg = train.TrainConfig(tasks=args.tasks, data=str(ufire.root), out=str(out), steps=args.steps,
                            calibrator=cal, sampler=samp, seed=seed, eval_every=args.eval_every,
                            max_eval_queries=args.max_eval_queries, final_test=False, device=args.device,
                            two_cores="off" if args.jobs > 1 else "auto")
    test = evaluate_subsets(ufire, args.tasks, args.ood)
    record = None if args.quick else Path(args.records) / f"{name}.json"
    return train_and_test(cfg, run_settings(variant, seed, args), test, ufire, args.fresh,
                          {"variant": variant, "seed": seed}, record=record)


def run_name(variant: str, seed: int, steps: int) -> str:
    """A run's folder and record name: budgets differ in name, so a 2,800-step run never replaces a 1,400 one."""
    return f"{variant}-s{seed}-b{steps}"


def evaluate_subsets(ufire, tasks: str, ood: bool) -> list:
    """The test sub-datasets of --tasks (plus the OOD tasks with --ood)."""
    return ufire.select("test", tasks, "include" if ood else "skip")


def train_and_test(cfg, settings: dict, test_subsets: list, ufire, fresh: bool, tags: dict,
                   record: Optional[Path] = None) -> dict:
    """Train `cfg` into cfg.out and test its best/ checkpoint on `test_subsets`; return the numbers.

    A folder holding ablation_run.json with the same `settings` is a finished run: it is reused
    (unless `fresh`). The result keeps, per sub-dataset, each test query's first-positive rank, for
    `paired_bootstrap`. `tags` (e.g. variant and seed) are copied into the result.

    `record` (benchmarks/records/<variant>-s<seed>-b<steps>.json, committed) is the same result plus
    the final step's validation ranks (for the budget rule, benchmarks/convergence.py), the
    validation and λ curves, the machine and the commit: a run finished in one session is reused
    by the next, on a fresh machine, from the record alone.
    Shared with benchmarks/controlled.py (which keeps no record).
    """
    import evaluate
    from support import plumbing
    import train
    from model import FashionLensEmbedder

    out = Path(cfg.out)
    done = out / "ablation_run.json"
    for prev_path in (record, done):
        if prev_path is not None and prev_path.is_file() and not fresh:
            prev = json.loads(prev_path.read_text())
            if prev.get("settings") == settings:
                prev["reused"] = True
                return prev
    if out.exists():  # an unfinished or differently configured run of ours: start it over
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t0 = time.time()
    # train.py prints its resolved config, a progress bar and one line per validation: keep that
    # in the run's folder so the benchmark's own output stays one line per run.
    with open(out / "train_output.txt", "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        summary = train.train(cfg)
    t_train = time.time() - t0

    device = None if cfg.device == "auto" else cfg.device  # None: the checkpoint's own setting
    best = FashionLensEmbedder.from_pretrained(str(out / "best"), device=device)
    res = evaluate.evaluate(best, ufire, test_subsets, split="test", ks=KS, batch_size=64, cache_dir=None,
                            progress=False, keep_per_query=True)
    # Per test query, the 0-based rank of its first positive (-1: not in the top max(KS)), in the
    # test file's order: the paired bootstrap resamples these (the same queries for every variant).
    ranks = first_hit_ranks(res)
    t_total = time.time() - t0
    doc = {**tags, "settings": settings,
           "train_config": dataclasses.asdict(cfg),
           "best": summary.get("best"), "overall": {str(k): v for k, v in res.overall.items()},
           "task_means": {t: {str(k): v for k, v in m.items()} for t, m in res.task_means.items()},
           "rows": [{"subset": r.subset, "task": r.task, "gallery": r.gallery, "missing": r.missing,
                     "chance10": r.chance10, "recall": {str(k): v for k, v in r.recall.items()},
                     "ranks": ranks[r.subset]} for r in res.rows],
           "seconds": t_total, "train_seconds": t_train, "eval_seconds": t_total - t_train}
    del best
    if record is not None:
        doc.update(run_record(out, ufire, test_subsets, device))
        doc["seconds"] = time.time() - t0
        plumbing.atomic_write(record, json.dumps(doc, separators=(",", ":")))
    plumbing.atomic_write(done, json.dumps(doc, indent=1))  # written last: its presence means "finished"
    gc.collect()
    return doc


def first_hit_ranks(res) -> dict:
    """{sub-dataset: [0-based rank of each query's first positive, -1 beyond max K]}, in the file's query order."""
    ranks = {r.subset: [] for r in res.rows}
    for pq in res.per_query:
        ranks[pq["subset"]].append(pq["first_hit_rank"])
    return ranks


def run_record(out: Path, ufire, test_subsets: list, device) -> dict:
    """What a committed record adds to a run's result: the final step's model (last/) on the whole
    validation split, per query; the validation curve and λ's batch mean every 10 steps (from
    log.jsonl); the machine (a paired difference needs both runs on one CPU model) and the commit."""
    import evaluate
    from model import FashionLensEmbedder

    last = FashionLensEmbedder.from_pretrained(str(out / "last"), device=device)
    val_subsets = ufire.select("val", ",".join(sorted({s.split("/")[0] for s in test_subsets})))
    res = evaluate.evaluate(last, ufire, val_subsets, split="val", ks=KS, batch_size=64, cache_dir=None,
                            progress=False, keep_per_query=True)
    ranks = first_hit_ranks(res)
    del last
    curve, lam = [], []
    for line in (out / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") == "val":
            curve.append([rec["step"], rec["sum_recall1"]])
        elif "lam_mean" in rec and rec["step"] % 10 == 0:
            lam.append([rec["step"], rec["lam_mean"]])
    return {"final_val": {"sum_recall1": res.sum_recall(1), "ranks": ranks}, "val_curve": curve,
            "lam_curve": lam, "machine": machine_info()}


def prepare(args):
    """What a benchmark checks before it trains anything (--device exists, --runs and --out are
    writable), then the synthetic U-FIRE it trains on (generated on first use). Shared with
    benchmarks/controlled.py."""
    from support import plumbing  # before torch: it sets OpenMP's wait policy for shared cores
    import data
    from support import synthetic

    plumbing.check_device("--device", args.device)
    plumbing.check_writable("--runs", args.runs)
    plumbing.check_writable("--out", args.out, folder=False)
    return data.UFire(synthetic.ensure_synthetic("data/synthetic"))


def run_workers(ids: list, runs: str, jobs: int, script: Path, argv: list) -> int:
    """Train the runs named by `ids` in `jobs` child processes at once, one CPU thread each.

    Each child is `script` with the same flags plus `--only` (its round-robin share of `ids`); it
    writes each finished run's ablation_run.json, which the parent then reuses to make the table.
    Returns the first non-zero exit status of a child (0 when all finished).
    """
    import subprocess

    shares = [ids[i::jobs] for i in range(jobs)]
    Path(runs).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = []
    for i, share in enumerate(s for s in shares if s):
        # The same flags (so the same --jobs: each child keeps to one thread) plus its share.
        cmd = [sys.executable, str(script), *argv, "--only", ",".join(share)]
        log = open(Path(runs) / f"worker{i}.txt", "a")  # the children's per-run lines
        procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        print(f"worker {i}: {len(share)} runs ({', '.join(share)}); log {Path(runs) / f'worker{i}.txt'}",
              flush=True)
    codes = []
    for p, log in procs:
        codes.append(p.wait())
        log.close()
    return next((c for c in codes if c), 0)


# ================================================================================================
# Command line
# ================================================================================================


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="Defaults are in each flag's help; see the module docstring for the method.")
    ap.add_argument("--quick", action="store_true",
                    help=f"SMOKE TEST: 1 seed, {QUICK_STEPS} steps (unless --seeds/--steps say otherwise), "
                         "~5 min; proves the pipeline runs, says nothing about the claims")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; --quick: 0)")
    ap.add_argument("--steps", type=int, default=None,
                    help=f"optimizer steps per run (default: the default job's, 1400; --quick: {QUICK_STEPS})")
    ap.add_argument("--eval-every", type=int, default=None,
                    help="validate + keep best every N steps (default: the default job's, 200; "
                         "--quick: once, at the end)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="trainings at a time, one CPU thread each (default 1; 2 on a 2-core machine "
                         "halves the wall time)")
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)  # a --jobs worker's share: v-s,v-s
    ap.add_argument("--max-eval-queries", type=int, default=None,
                    help="validation queries per sub-dataset during training (default 0 = all; --quick: 10)")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma-separated subset of " + ", ".join(VARIANTS) + " (default: all five)")
    ap.add_argument("--tasks", default="all", help="task words to train and test on (default all: the 13 sub-datasets)")
    ap.add_argument("--ood", action="store_true", help="also test on the two OOD tasks (~15%% more eval time)")
    ap.add_argument("--runs", default=None, help="where the runs go, one folder per variant/seed "
                                                 "(default runs/ablation; --quick: runs/ablation-quick)")
    ap.add_argument("--records", default="benchmarks/records",
                    help="where each finished run's small result file goes (committed; default benchmarks/records): "
                         "a run with a record of the same settings is not trained again")
    ap.add_argument("--device", default="cpu", help="cpu (default: the budget is for 2 CPU cores) | auto | cuda")
    ap.add_argument("--fresh", action="store_true", help="retrain runs that already finished")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/ablation_results.json; "
                                                "--quick: runs/ablation-quick/ablation_results.json, so a "
                                                "smoke test never overwrites the real table)")
    return ap


def parse_args(argv=None):
    """Flags -> (args with every default resolved, seeds, variants), all checked.

    A bad value is one `error: --flag ...` line before any run starts (SystemExit, like argparse).
    """
    args = build_parser().parse_args(argv)
    args.seeds = args.seeds or ("0" if args.quick else "0,1,2")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        raise SystemExit(f"error: --seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2")
    for flag, value, least in (("--steps", args.steps, 1), ("--eval-every", args.eval_every, 1),
                               ("--max-eval-queries", args.max_eval_queries, 0), ("--jobs", args.jobs, 1)):
        if value is not None and value < least:  # None: the default below
            raise SystemExit(f"error: {flag} {value}: must be >= {least}")
    from support import recipes  # the default job's budget (standard library only: --help stays fast)

    tiny = recipes.RECIPES["tiny-cpu"]["train"]
    args.steps = args.steps or (QUICK_STEPS if args.quick else tiny["steps"])
    args.eval_every = args.eval_every or (args.steps if args.quick else min(tiny["eval_every"], args.steps))
    args.runs = args.runs or ("runs/ablation-quick" if args.quick else "runs/ablation")
    args.out = args.out or ("runs/ablation-quick/ablation_results.json" if args.quick
                            else "benchmarks/ablation_results.json")
    if args.max_eval_queries is None:
        args.max_eval_queries = 10 if args.quick else 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise SystemExit(f"error: --variants {args.variants!r}: unknown or none ({unknown}); "
                         f"known: {', '.join(VARIANTS)}")
    return args, seeds, variants


def main(argv=None) -> int:
    """The command line, through errors.run_cli: bad flags or data give one `error:` line."""
    return run_cli(_main, argv)


def _main(argv=None) -> int:
    os.chdir(REPO)  # runs/, data/ and the default --out are relative to the repository
    args, seeds, variants = parse_args(argv)

    ufire = prepare(args)
    from support import plumbing
    import train  # imports torch; one import of transformers for all runs happens below

    ufire.select("train", args.tasks)  # an unknown task word fails now, not after a run
    if not args.fresh:
        check_one_cpu_per_seed([(v, s) for s in seeds for v in variants], args)
    info = machine_info()
    kind = "QUICK SMOKE TEST (not a result)" if args.quick else "ablation"
    print(f"# FashionLens {kind}: {len(variants)} variants x seeds {seeds}, {args.steps} steps each, "
          f"validation every {args.eval_every}, test on {args.tasks}{' + OOD' if args.ood else ''}")
    print(machine_line(info), flush=True)

    t0, runs = time.time(), []
    order = [(v, s) for s in seeds for v in variants]  # seed-major: an interrupted benchmark still
    #                                                    has every variant at the first seeds
    if args.only is not None:  # a --jobs worker: train its share, the parent makes the table
        order = [(v, int(s)) for v, s in (x.rsplit("-s", 1) for x in args.only.split(","))]
    elif args.jobs > 1:
        code = run_workers([f"{v}-s{s}" for v, s in order], args.runs, args.jobs, Path(__file__).resolve(),
                           argv if argv is not None else sys.argv[1:])
        if code:
            return code
    total = len(order)
    for v, s in order:
        try:
            r = run_one(v, s, args, ufire)
        except KeyboardInterrupt:  # finished runs stay on disk and are reused by the same command
            print(f"stopped by Ctrl-C in run {v}-s{s}; {len(runs)} finished runs are kept in {args.runs}: "
                  f"the same command continues (it reuses them)", file=sys.stderr, flush=True)
            return 130
        runs.append(r)
        tag = "reused" if r.get("reused") else f"{r['seconds']:.0f}s (train {r['train_seconds']:.0f}s)"
        print(f"[{len(runs)}/{total}] {v:<13} seed {s}: test R@1 {100 * r['overall']['1']:.1f}  "
              f"R@10 {100 * r['overall']['10']:.1f}  best val step {r['best']['step']}  [{tag}]  "
              f"elapsed {(time.time() - t0) / 60:.1f} min", flush=True)

    if args.only is not None:
        return 0
    agg = aggregate(runs, variants, seeds)
    by_variant = {v: [r for s in seeds for r in runs if r["variant"] == v and r["seed"] == s] for v in variants}
    # full - variant per task and overall: what the removed piece was worth (paired by seed)
    deltas = {v: paired_bootstrap(by_variant["full"], by_variant[v]) for v in variants
              if v != "full" and "full" in by_variant}
    # the progression: each step adds one idea to the previous variant (A - B, paired by seed)
    steps = {label: {"a": a, "b": b, **paired_bootstrap(by_variant[a], by_variant[b])}
             for a, b, label in PROGRESSION if a in by_variant and b in by_variant}
    # Issue 32's contrasts: the progression's two steps and GGAS inside the full model (full - samp-uniform).
    contrasts = dict(steps)
    if "full" in by_variant and "samp-uniform" in by_variant:
        contrasts["full − uniform"] = {"a": "full", "b": "samp-uniform", **deltas["samp-uniform"]}
    advice = {label: {str(k): seed_advice(d["overall"][k], len(seeds)) for k in KS} for label, d in contrasts.items()}
    checks = check_claims(by_variant)
    verdict_r1 = overall_verdict([c for c in checks if c["metric"] == "R@1"])
    verdict_r10 = overall_verdict([c for c in checks if c["metric"] == "R@10"])
    wall = time.time() - t0

    print(f"\n## Ablation on the synthetic U-FIRE test split ({args.steps} steps, seeds {seeds}; "
          f"Recall in %, mean ± std over seeds)\n")
    print(summary_table(agg))
    for m in ("R@1", "R@10"):
        print(f"\nPer task, {m}:\n")
        print(task_table(agg, m))
    for k in KS if deltas else ():
        print(f"\nWhat each removed piece was worth: full − variant, Recall@{k} in points, mean over seeds "
              f"[95 % paired bootstrap interval over test queries, {N_BOOT} replicates]:\n")
        print(delta_table(deltas, k))
    for k in KS if steps else ():
        print(f"\nThe progression, one idea at a time (A − B, Recall@{k} in points "
              f"[95 % paired bootstrap interval]): " + ", ".join(f"{l} = {d['a']} − {d['b']}" for l, d in steps.items())
              + "\n")
        print(delta_table(steps, k, head="A − B", win="A > B"))
    for label, adv in advice.items():
        print(f"seeds for {label}: " + ", ".join(f"R@{k} {a}" for k, a in adv.items())
              + f"  (more seeds where the 95 % interval is wider than ±{100 * WIDE:.1f} points and contains 0)")
    print("\nThe paper's claims (from a secondary summary of the paper; its tables were not available). "
          "'holds' / 'contradicted': the 95 % interval of Δ lies above / below 0:\n")
    print(verdict_table(checks))
    print(f"\nVerdict on overall R@1: {verdict_r1}.")
    print(f"Verdict on overall R@10: {verdict_r10}.")
    if args.quick:
        print("NOTE: --quick is a smoke test (1 seed, few steps): it shows the pipeline works, nothing more.")
    print(f"Wall time {wall / 60:.1f} min for {total} runs "
          f"({sum(1 for r in runs if r.get('reused'))} reused).")

    doc = {"kind": "quick smoke test" if args.quick else "ablation", "machine": info,
           "command": " ".join(["python", "benchmarks/ablation.py", *(argv if argv is not None else sys.argv[1:])]),
           "settings": {"steps": args.steps, "eval_every": args.eval_every, "seeds": seeds, "variants": variants,
                        "tasks": args.tasks, "ood": bool(args.ood), "max_eval_queries": args.max_eval_queries,
                        "train_defaults": dataclasses.asdict(train.TrainConfig().resolved())},
           "variants": {v: {"calibrator": VARIANTS[v][0], "sampler": VARIANTS[v][1]} for v in variants},
           "aggregate": {v: {**e, **{f"{m}_mean_std": list(mean_std(e[m])) for m in ("R@1", "R@10")}}
                         for v, e in agg.items()},
           "deltas_vs_full": deltas, "progression": steps, "claims": checks, "seed_advice": advice,
           "cpu_models": sorted({r["machine"]["cpu_model"] for r in runs if "machine" in r}),
           "verdict": {"R@1": verdict_r1, "R@10": verdict_r10},
           # per-query ranks stay in each run's ablation_run.json (runs/, not committed): 20k numbers
           "runs": [{**{k: r[k] for k in ("variant", "seed", "overall", "task_means", "best", "seconds",
                                          "train_seconds", "eval_seconds")},
                     "rows": [{k: v for k, v in row.items() if k != "ranks"} for row in r["rows"]]}
                    for r in runs],
           "wall_seconds": wall}
    out = plumbing.atomic_write(args.out, json.dumps(doc, indent=1, default=float))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
