"""Where the tiny default converges: the budget rule of issue 32, applied to committed runs.

Why
---
The ablation (benchmarks/ablation.py) first ran at the default job's 1,400 steps, where the
validation score was still rising in 8 of 9 runs: a comparison of runs that have not finished
learning says little about what PGSQC and GGAS buy. `tiny-cpu`'s cosine schedule spans the whole
run, so a longer budget is a new run, not a continuation; each candidate budget B is trained from
scratch with the default job's recipe otherwise.

The rule (fixed on 2026-12-08, in this file, before any long run was started)
------------------------------------------------------------------------------
    runs       variant `full` (the method: slerp PGSQC + GGAS), seeds 0 and 1, at
               B in LADDER = 1,400, 2,800, 5,600, 11,200 steps; every run of the rule on one CPU model
    S(B, s)    the validation sum of Recall@1 over the 13 sub-datasets (the number train.py selects
               best/ by; 0..13) of the final step's model (last/), on every validation query
    G(B)       = (1/2) sum_s [S(2B, s) - S(B, s)]               what doubling B gains, mean over seeds
    SE(B)      the standard deviation of G(B) over 2,000 query-bootstrap replicates: each replicate
               resamples, per seed and per sub-dataset, the validation queries with replacement
               (the same draw for B and 2B: the same queries, a paired difference)
    B is converged when G(B) < SE(B); the ablation's budget is the smallest converged B of the
    ladder (11,200 is trained only if 5,600 is not converged; beyond it the rule reports "none").

The default job stays at 1,400 steps (the quick demonstration); the converged budget is the
ablation's. What the bootstrap does not see: the seed-to-seed spread of a run (two seeds measure
it only roughly); it is printed next to the rule's numbers.

Run it
------
    python benchmarks/ablation.py --variants full --seeds 0,1 --steps 1400 --jobs 2 --out runs/conv-1400.json
    (then --steps 2800, 5600: each run leaves benchmarks/records/full-s<seed>-b<steps>.json)
    python benchmarks/convergence.py          # the rule on the records: table, budget, convergence.json

Shape legend: Q validation queries of one sub-dataset, R bootstrap replicates.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

LADDER = (1400, 2800, 5600, 11200)  # candidate budgets, in optimizer steps of the tiny-cpu recipe
SEEDS = (0, 1)
VARIANT = "full"
N_BOOT = 2000


def load_record(records: Path, seed: int, steps: int):
    """The committed record of full-s<seed>-b<steps>, or None while that run has not finished."""
    path = records / f"{VARIANT}-s{seed}-b{steps}.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SystemExit(f"error: {path}: not valid JSON ({err})") from None


def sum_r1(ranks: dict) -> float:
    """Sum over sub-datasets of Recall@1: the share of queries whose first positive is at rank 0."""
    return sum(sum(1 for r in rs if r == 0) / len(rs) for rs in ranks.values())


def gain_with_se(pairs: list, n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float]:
    """G = mean over seeds of S(2B) - S(B), and its query-bootstrap standard deviation.

    pairs: per seed, (ranks at B, ranks at 2B), each {sub-dataset: [rank of the first positive per
    validation query]}, the same queries in the same order (the validation file's).
    """
    point = sum(sum_r1(b2) - sum_r1(b) for b, b2 in pairs) / len(pairs)
    rng = random.Random(seed)
    reps = []
    for _ in range(n_boot):
        g = 0.0
        for b, b2 in pairs:
            for sub, rs in b.items():
                q = len(rs)
                idx = [rng.randrange(q) for _ in range(q)]  # (Q,) one resample, shared by B and 2B
                g += (sum(1 for i in idx if b2[sub][i] == 0) - sum(1 for i in idx if rs[i] == 0)) / q
        reps.append(g / len(pairs))
    mean = sum(reps) / n_boot
    se = (sum((r - mean) ** 2 for r in reps) / (n_boot - 1)) ** 0.5
    return point, se


def apply_rule(records: Path) -> dict:
    """The rule on whatever records exist: per budget S per seed; per step of the ladder G, SE, verdict."""
    rows, steps_done = [], {}
    for b in LADDER:
        recs = {s: load_record(records, s, b) for s in SEEDS}
        if all(recs.values()):
            cpus = {r["machine"]["cpu_model"] for r in recs.values()}
            steps_done[b] = recs
            rows.append({"steps": b, "S": {str(s): r["final_val"]["sum_recall1"] for s, r in recs.items()},
                         "best_step": {str(s): r["best"]["step"] for s, r in recs.items()},
                         "cpu_models": sorted(cpus),
                         "train_hours": sum(r["train_seconds"] for r in recs.values()) / 3600})
    ladder, chosen = [], None
    for b, b2 in zip(LADDER, LADDER[1:]):
        if b not in steps_done or b2 not in steps_done:
            break
        cpus = {r["machine"]["cpu_model"] for d in (steps_done[b], steps_done[b2]) for r in d.values()}
        if len(cpus) > 1:
            raise SystemExit(f"error: the rule's runs at {b} and {b2} steps come from different CPU models "
                             f"({sorted(cpus)}): rerun them on one machine")
        pairs = [(steps_done[b][s]["final_val"]["ranks"], steps_done[b2][s]["final_val"]["ranks"]) for s in SEEDS]
        g, se = gain_with_se(pairs)
        ok = g < se
        ladder.append({"from": b, "to": b2, "gain": g, "se": se, "converged": ok})
        if ok:
            chosen = b
            break
    return {"rule": __doc__.split("The rule")[1].split("Run it")[0].strip(), "budgets": rows,
            "ladder": ladder, "converged_budget": chosen}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", default="benchmarks/records", help="the committed run records (default benchmarks/records)")
    ap.add_argument("--out", default="benchmarks/convergence.json", help="where the result goes")
    args = ap.parse_args(argv)
    doc = apply_rule(REPO / args.records)
    print("| steps | S seed 0 | S seed 1 | best val step | train CPU-hours |\n|---|---|---|---|---|")
    for r in doc["budgets"]:
        print(f"| {r['steps']} | {r['S']['0']:.3f} | {r['S']['1']:.3f} | "
              f"{r['best_step']['0']}, {r['best_step']['1']} | {r['train_hours']:.2f} |")
    for step in doc["ladder"]:
        print(f"{step['from']} -> {step['to']}: G = {step['gain']:+.3f}, SE = {step['se']:.3f}: "
              f"{'converged' if step['converged'] else 'not converged'} at {step['from']}")
    print(f"converged budget: {doc['converged_budget'] or 'not yet decided'}")
    from support import plumbing

    plumbing.atomic_write(REPO / args.out, json.dumps(doc, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
