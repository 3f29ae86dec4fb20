"""Controlled experiments: one small setting per mechanism, built so that the mechanism should matter.

The ablation (benchmarks/ablation.py) asks what PGSQC and GGAS buy on the whole synthetic U-FIRE.
Here each mechanism gets the setting the paper's argument for it describes, small enough to train
in minutes, with its arms trained from the same seeds and compared query by query (the paired
bootstrap of ablation.py: seeds, then test queries within each seed; 95 % intervals).

PGSQC: one product photo, three notions of "similar"
----------------------------------------------------
    sub-dataset        query                          positive
    inshop/SynInshop   a product photo                the very same item: colour, category and every
                                                      attribute must agree
    cir/SynCIR-Dress   a product photo + the change   the item with exactly that factor changed; the
                       to make                        reference itself is a hard negative
    asfr/SynAttr       a product photo + an attribute any item sharing that attribute, whatever
                       name                           its colour and category
The queries look alike and the right answers contradict each other: the photo's own item is the
answer for inshop, a wrong answer for cir, and one of many for asfr, which must ignore the colour
and category inshop depends on. One shared embedding has to serve all three; the calibrator
(calibrator.py) can move each query along the sphere by an amount and in a direction read from its
own hidden state, i.e. from its instruction. Arms, 600 steps each:
    slerp      the method (PGSQC on)
    off        no calibrator: the shared embedding alone
    separate   one model per sub-dataset, each trained alone for 200 steps (the same total
               compute): no sharing, so no conflict; the upper bound on what resolving it can give
Outcome: test Recall@1 / @10 per sub-dataset and their mean; slerp - off (does PGSQC help?) and
separate - off (how much does sharing cost at all: the room PGSQC has). Mechanism, on the test
queries of the slerp models: lambda and the arc lambda*omega per sub-dataset, and the cosines
between the sub-datasets' mean move directions (benchmarks/diagnostics.py).

GGAS: one small hard sub-dataset among large easy ones
------------------------------------------------------
    t2i/SynGen (1,500), inshop/SynInshop (1,200), cir/SynCIR-Top (2,000): large, and learned fast
    sketch2i/SynSketchShoe (150): 8x smaller than the next, and the weakest row of the default job
GGAS draws sub-dataset k with p_k = softmax(lam log N_k + G_k / T) (sampler.py), so its gradient
term G_k (the EMA of k's summary-token gradient norm) can lift a small sub-dataset that stays hard
above what its size alone gives it. Arms, 500 steps each: ggas (the method), size (the size prior
alone: p_k proportional to N_k^lam) and uniform (p_k = 1/4). Outcome: test Recall per sub-dataset
and their mean; ggas - size and ggas - uniform; each sub-dataset's share of the steps it got.

Run it
------
    python benchmarks/controlled.py --jobs 2          # both experiments, seeds 0,1,2: ~45 min on 2 cores
    python benchmarks/controlled.py --experiments pgsqc --seeds 0
    python benchmarks/controlled.py --quick           # SMOKE TEST: 4 steps, seed 0, a minute or two

Runs go to runs/controlled/<experiment>-<arm>[-<sub-dataset>]-s<seed> (git-ignored; a finished run
with the same settings is reused, `--fresh` retrains); the tables go to stdout, the numbers to
benchmarks/controlled_results.json (--quick: runs/controlled-quick/controlled_results.json).
Everything else is the default job's recipe (`tiny-cpu`, support/recipes.py). Shape legend: S seeds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for p in (str(REPO), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

import ablation  # noqa: E402  (standard library at import: --help stays fast)
from support.errors import run_cli  # noqa: E402

# experiment -> its sub-datasets, steps, the arms (TrainConfig overrides), and the comparisons
# (A, B, question) whose paired difference A - B answers the experiment.
EXPERIMENTS = {
    "pgsqc": {
        "subsets": ("inshop/SynInshop", "cir/SynCIR-Dress", "asfr/SynAttr"),
        "steps": 600,
        "arms": {"slerp": {"calibrator": "slerp"}, "off": {"calibrator": "off"},
                 "separate": {"calibrator": "slerp", "separate": True}},
        "comparisons": [("slerp", "off", "does PGSQC help where tasks conflict? (slerp − off)"),
                        ("separate", "off", "how much does sharing one model cost? (separate − off)"),
                        ("separate", "slerp", "what is left after PGSQC? (separate − slerp)")],
    },
    "ggas": {
        "subsets": ("t2i/SynGen", "inshop/SynInshop", "cir/SynCIR-Top", "sketch2i/SynSketchShoe"),
        "steps": 500,
        "arms": {"ggas": {"sampler": "ggas"}, "size": {"sampler": "size"}, "uniform": {"sampler": "uniform"}},
        "comparisons": [("ggas", "size", "does the difficulty term help? (ggas − size)"),
                        ("ggas", "uniform", "does GGAS beat uniform sampling? (ggas − uniform)")],
    },
}
QUICK_STEPS = 4  # --quick: a smoke test of the whole pipeline, not a result


# ================================================================================================
# The runs of one experiment
# ================================================================================================


def run_names(exp: str, arm: str, seed: int) -> list:
    """Folder names of one arm at one seed: one run, or one per sub-dataset for a 'separate' arm."""
    spec = EXPERIMENTS[exp]
    if spec["arms"][arm].get("separate"):
        return [f"{exp}-{arm}-{sub.replace('/', '_')}-s{seed}" for sub in spec["subsets"]]
    return [f"{exp}-{arm}-s{seed}"]


def parse_name(name: str) -> tuple:
    """'pgsqc-separate-asfr_SynAttr-s0' -> ('pgsqc', 'separate', 'asfr/SynAttr', 0); subset None if shared."""
    head, seed = name.rsplit("-s", 1)
    exp, arm, *rest = head.split("-", 2)
    return exp, arm, (rest[0].replace("_", "/", 1) if rest else None), int(seed)


def train_run(name: str, args, ufire) -> dict:
    """Train (or reuse) the run `name` and return its test result (ablation.train_and_test)."""
    import train

    exp, arm, only, seed = parse_name(name)
    spec = EXPERIMENTS[exp]
    overrides = {k: v for k, v in spec["arms"][arm].items() if k != "separate"}
    subsets = [only] if only else list(spec["subsets"])
    steps = args.steps or spec["steps"]
    if only:  # one model per sub-dataset: the arm's compute split evenly between them
        steps = max(1, steps // len(spec["subsets"]))
    cfg = train.TrainConfig(tasks=",".join(subsets), data=str(ufire.root), out=str(Path(args.runs) / name),
                            steps=steps, seed=seed, eval_every=steps, max_eval_queries=0, final_test=False,
                            device=args.device, two_cores="off" if args.jobs > 1 else "auto", **overrides)
    settings = {"name": name, "steps": steps, "subsets": subsets, "overrides": overrides,
                "train_defaults": ablation.train_defaults()}
    return ablation.train_and_test(cfg, settings, subsets, ufire, args.fresh,
                                   {"experiment": exp, "arm": arm, "seed": seed, "name": name})


def merged(names: list, results: dict, runs: str) -> dict:
    """One arm at one seed: the rows of its run(s) (a 'separate' arm has one run per sub-dataset),
    and the steps each sub-dataset was drawn for, from each run's log.jsonl."""
    import diagnostics

    rows, drawn = [], {}
    for n in names:
        rows += results[n]["rows"]
        steps, _ = diagnostics.read_log(Path(runs) / n / "log.jsonl")
        drawn.update(diagnostics.steps_received(steps, [row["subset"] for row in results[n]["rows"]]))
    return {"rows": rows, "steps_by_subset": drawn}


def recall_of(arm_runs: list, k: int) -> dict:
    """{sub-dataset: mean over seeds of Recall@k} and 'mean' (mean over sub-datasets = over tasks here)."""
    subs = [row["subset"] for row in arm_runs[0]["rows"]]
    out = {s: sum(next(r["recall"][str(k)] for r in run["rows"] if r["subset"] == s) for run in arm_runs)
           / len(arm_runs) for s in subs}
    out["mean"] = sum(out[s] for s in subs) / len(subs)
    return out


# ================================================================================================
# Tables
# ================================================================================================


def recall_table(by_arm: dict, k: int) -> str:
    """Rows: sub-datasets and their mean; columns: arms; cells: Recall@k (%) mean over seeds."""
    arms = list(by_arm)
    rec = {a: recall_of(by_arm[a], k) for a in arms}
    subs = [s for s in rec[arms[0]] if s != "mean"]
    lines = [f"| R@{k} (%) | " + " | ".join(f"`{a}`" for a in arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for s in subs + ["mean"]:
        lines.append(f"| {s if s != 'mean' else '**mean**'} | " + " | ".join(f"{100 * rec[a][s]:.1f}" for a in arms) + " |")
    return "\n".join(lines)


def comparison_table(comparisons: list) -> str:
    lines = ["| question | K | Δ [95 % interval] | per seed | verdict |", "|---|---|---|---|---|"]
    for c in comparisons:
        seeds = " / ".join(f"{100 * d:+.1f}" for d in c["per_seed"])
        lines.append(f"| {c['question']} | {c['k']} | {ablation.fmt_ci(c)} | {seeds} | {c['verdict']} |")
    return "\n".join(lines)


def share_table(by_arm: dict) -> str:
    """Share of the steps each sub-dataset was drawn for, per arm (mean over seeds)."""
    arms = list(by_arm)
    subs = list(by_arm[arms[0]][0]["steps_by_subset"])
    lines = ["| steps drawn (%) | " + " | ".join(f"`{a}`" for a in arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for s in subs:
        cells = []
        for a in arms:
            shares = [run["steps_by_subset"].get(s, 0) / max(1, sum(run["steps_by_subset"].values()))
                      for run in by_arm[a]]
            cells.append(f"{100 * sum(shares) / len(shares):.1f}")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ================================================================================================
# Command line
# ================================================================================================


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="See the module docstring for the design of each experiment.")
    ap.add_argument("--experiments", default="pgsqc,ggas", help="comma-separated subset of pgsqc, ggas (default both)")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; --quick: 0)")
    ap.add_argument("--steps", type=int, default=None,
                    help="steps per arm (default: pgsqc 600, ggas 500; --quick: 4)")
    ap.add_argument("--quick", action="store_true", help="SMOKE TEST: 4 steps, seed 0; says nothing about the claims")
    ap.add_argument("--jobs", type=int, default=1, help="trainings at a time, one CPU thread each (default 1)")
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)  # a --jobs worker's share of run names
    ap.add_argument("--runs", default=None, help="where the runs go (default runs/controlled; --quick: runs/controlled-quick)")
    ap.add_argument("--device", default="cpu", help="cpu (default) | auto | cuda")
    ap.add_argument("--fresh", action="store_true", help="retrain runs that already finished")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/controlled_results.json; "
                                                "--quick: runs/controlled-quick/controlled_results.json)")
    return ap


def parse_args(argv=None):
    """Flags -> (args with every default resolved, seeds, experiments); a bad value is one error line."""
    args = build_parser().parse_args(argv)
    try:
        seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        raise SystemExit(f"error: --seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2")
    exps = [e.strip() for e in args.experiments.split(",") if e.strip()]
    if not exps or any(e not in EXPERIMENTS for e in exps):
        raise SystemExit(f"error: --experiments {args.experiments!r}: expected some of {', '.join(EXPERIMENTS)}")
    for flag, value in (("--steps", args.steps), ("--jobs", args.jobs)):
        if value is not None and value < 1:
            raise SystemExit(f"error: {flag} {value}: must be >= 1")
    args.steps = args.steps or (QUICK_STEPS if args.quick else None)
    args.runs = args.runs or ("runs/controlled-quick" if args.quick else "runs/controlled")
    args.out = args.out or ("runs/controlled-quick/controlled_results.json" if args.quick
                            else "benchmarks/controlled_results.json")
    return args, seeds, exps


def main(argv=None) -> int:
    return run_cli(_main, argv)


def _main(argv=None) -> int:
    os.chdir(REPO)  # runs/, data/ and the default --out are relative to the repository
    args, seeds, exps = parse_args(argv)
    ufire = ablation.prepare(args)
    from support import plumbing
    names = [n for e in exps for s in seeds for a in EXPERIMENTS[e]["arms"] for n in run_names(e, a, s)]
    if args.only is not None:  # a --jobs worker: train its share, the parent makes the tables
        names = args.only.split(",")
    elif args.jobs > 1:
        code = ablation.run_workers(names, args.runs, args.jobs, Path(__file__).resolve(),
                                    argv if argv is not None else sys.argv[1:])
        if code:
            return code
    info = ablation.machine_info()
    print(f"# FashionLens controlled experiments{' (QUICK SMOKE TEST, not a result)' if args.quick else ''}: "
          f"{', '.join(exps)}; seeds {seeds}")
    print(ablation.machine_line(info), flush=True)
    t0, results = time.time(), {}
    for i, name in enumerate(names):
        r = train_run(name, args, ufire)
        results[name] = r
        tag = "reused" if r.get("reused") else f"{r['seconds']:.0f}s"
        print(f"[{i + 1}/{len(names)}] {name}: test R@1 {100 * r['overall']['1']:.1f}  R@10 "
              f"{100 * r['overall']['10']:.1f}  [{tag}]", flush=True)
    if args.only is not None:
        return 0

    doc = {"kind": "quick smoke test" if args.quick else "controlled experiments", "machine": info,
           "command": " ".join(["python", "benchmarks/controlled.py", *(argv if argv is not None else sys.argv[1:])]),
           "seeds": seeds, "experiments": {}}
    for e in exps:
        spec = EXPERIMENTS[e]
        by_arm = {a: [merged(run_names(e, a, s), results, args.runs) for s in seeds] for a in spec["arms"]}
        comps = []
        for a, b, question in spec["comparisons"]:
            boot = ablation.paired_bootstrap(by_arm[a], by_arm[b])
            for k in ablation.KS:
                st = boot["overall"][k]
                v = ablation.verdict(st) if len(seeds) > 1 else "untestable (1 seed)"
                comps.append({"a": a, "b": b, "question": question, "k": f"R@{k}", "verdict": v, **st,
                              "tasks": {t: boot["tasks"][t][k] for t in boot["tasks"]}})
        print(f"\n## {e}: {', '.join(spec['subsets'])}; {args.steps or spec['steps']} steps per arm, seeds {seeds}\n")
        for k in ablation.KS:
            print(recall_table(by_arm, k) + "\n")
        print(comparison_table(comps) + "\n")
        print(share_table(by_arm))
        mech = mechanism(e, seeds, args.runs) if not args.quick else {}
        doc["experiments"][e] = {
            "subsets": list(spec["subsets"]), "steps": args.steps or spec["steps"], "arms": spec["arms"],
            "recall": {a: {f"R@{k}": recall_of(by_arm[a], k) for k in ablation.KS} for a in by_arm},
            "steps_by_subset": {a: [run["steps_by_subset"] for run in by_arm[a]] for a in by_arm},
            "comparisons": comps, "mechanism": mech,
            "runs": {a: [[{"subset": row["subset"], "recall": row["recall"], "gallery": row["gallery"]}
                          for row in run["rows"]] for run in by_arm[a]] for a in by_arm}}
    doc["wall_seconds"] = time.time() - t0
    out = plumbing.atomic_write(args.out, json.dumps(doc, indent=1, default=float))
    print(f"\nwrote {out}")
    return 0


def mechanism(exp: str, seeds: list, runs: str) -> dict:
    """What the mechanism itself did in the arm that has it (printed and returned; diagnostics.py)."""
    import diagnostics

    subsets = list(EXPERIMENTS[exp]["subsets"])
    if exp == "pgsqc":  # the calibrator's moves on the test queries of each slerp model
        per_seed = []
        print("\nPGSQC's moves on the test queries (slerp arm): mean lambda (init 0.047), mean arc "
              "lambda*omega, Rbar (1 = all queries of a sub-dataset moved the same way), and the cosine "
              "between sub-datasets' mean move directions\n")
        for s in seeds:
            run_dir = Path(runs) / run_names(exp, "slerp", s)[0]
            held = diagnostics.held_out_directions(run_dir, "best", "test", 0, subsets)
            st, cos = held["stats"], held["cosines"]
            pairs = {f"{a} | {b}": cos["cos"][i][j] for i, a in enumerate(cos["names"])
                     for j, b in enumerate(cos["names"]) if i < j}
            per_seed.append({"stats": {k: {f: v[f] for f in ("lam_mean", "angle_deg_mean", "rbar")}
                                       for k, v in st.items()}, "cosines": pairs})
            print(f"seed {s}: " + "; ".join(f"{k} λ {v['lam_mean']:.3f}, arc {v['angle_deg_mean']:.2f}°, "
                                             f"Rbar {v['rbar']:.2f}" for k, v in st.items()))
            print("        cos " + "; ".join(f"{p} {c:+.2f}" for p, c in pairs.items()))
        return {"calibration": per_seed}
    # ggas: the sampler's difficulty G_k and probability p_k at the last step of each ggas run
    ends = []
    print("\nGGAS at the last step (ggas arm): difficulty G_k / probability p_k of the next draw\n")
    for s in seeds:
        run_dir = Path(runs) / run_names(exp, "ggas", s)[0]
        steps, _ = diagnostics.read_log(run_dir / "log.jsonl")
        last = diagnostics.sampler_over_training(steps, [(1, steps[-1]["step"])], {}, subsets)
        ends.append({k: {"difficulty": last["G_end"][k][0], "probability": last["p_end"][k][0]} for k in subsets})
        print(f"seed {s}: " + ", ".join(f"{k} {v['difficulty']:.2f} / {100 * v['probability']:.0f} %"
                                        for k, v in ends[-1].items()))
    return {"sampler_end": ends}


if __name__ == "__main__":
    sys.exit(main())
