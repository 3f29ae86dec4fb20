"""Mutation check: does some test fail for each plausible bug in the method? (issue 30, item 5)

What it proves
--------------
A test suite can pass for the right code and still pass for a wrong one. Each entry of MUTANTS is one
small, plausible bug (an edit of the library code that changes what it computes: a recipe value, a
default, an edge size, the place where a value is read). For each, the script copies the repository
(the files git tracks or would track; `data` linked, never runs/) into a temporary folder, plants the
edit there, checks that the copy still compiles, and runs the test files that touch the changed code:

    OMP_NUM_THREADS=1 python -m pytest <tests> -x -q -p no:cacheprovider -m "not slow"

The mutant is *caught* when pytest exits 1 with a failed (or erroring) test; exit 0 is a *survivor*;
any other exit status (2-5: interrupted, internal, usage, nothing collected) or a timeout is reported
as such, never as caught. `--baseline` runs the same test sets on the unmutated copy: all must pass,
or the harness proves nothing. The working tree is never modified.

Each mutant's `old` text must occur exactly once in its file; when the source moves on and it does
not, the script stops before running anything and names the mutant. `edits` holds a mutant with
several edits (one bug written in two places). `tests` is TESTS[file] unless the mutant names its own;
a test file that does not exist (yet) is left out with a note.

Run it (from the repository root; ~1-3 min per mutant on 2 cores):

    python benchmarks/mutants.py --baseline --jobs 1     # the harness is valid: every test set passes
    python benchmarks/mutants.py --jobs 2                # every mutant -> benchmarks/mutants.json
    python benchmarks/mutants.py --only row-3,own-few-queries-one --out /tmp/m.json
    python benchmarks/mutants.py --list                  # the mutants, nothing run
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import py_compile
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("recipe values", "defaults", "edge sizes", "where a value is read")

# The test files that touch each changed file: a mutant of FILE runs TESTS[FILE] (adjust here when
# tests move; a node id "tests/x.py::test" works too).
TESTS = {
    "support/recipes.py": ["tests/test_pins.py", "tests/test_train.py", "tests/test_model.py"],
    "calibrator.py": ["tests/test_pins.py", "tests/test_calibrator.py"],
    "sampler.py": ["tests/test_pins.py", "tests/test_sampler.py"],
    "support/qwen.py": ["tests/test_model.py", "tests/test_hub_backbones.py"],
    "train.py": ["tests/test_pins.py", "tests/test_train_step.py", "tests/test_train.py"],
    "support/fast_train.py": ["tests/test_fast_paths.py"],
    "evaluate.py": ["tests/test_evaluate.py"],
    "support/fast_infer.py": ["tests/test_evaluate.py"],
    "data.py": ["tests/test_data.py"],
    "benchmarks/ablation.py": ["tests/test_benchmarks.py"],
    "benchmarks/controlled.py": ["tests/test_benchmarks.py"],
    "notebooks/shared_run.py": ["tests/test_notebooks.py"],
}


def mutant(id, family, file, old, new, what, edits=None, tests=None) -> dict:
    assert family in FAMILIES, family
    return {"id": id, "family": family, "file": file, "old": old, "new": new, "what": what,
            "edits": edits or [(old, new)], "tests": tests or TESTS[file]}


_TOK = "        tok = token_grad_norm(run.embedder)  # GGAS difficulty (before clipping: the raw signal)\n"
_CLIP = "        gnorm = clip_gradients(run.params, cfg.grad_clip)\n"
_LR = '    lr = run.optimizer.param_groups[0]["lr"]  # the lr this update uses (for the log)\n'
_OPT = "    run.optimizer.step()\n    run.scheduler.step()\n"

MUTANTS = [
    # ---- the 15 survivors (at 5159f83), written against today's code --------------------
    mutant("row-1", "recipe values", "support/recipes.py", '"compatibility/Polyvore": 8',
           '"compatibility/Polyvore": 32', "the authors' GradCache chunk for compatibility/Polyvore 8 -> 32"),
    mutant("row-2", "recipe values", "support/recipes.py", "grad_clip=1.0,", "grad_clip=0.0,",
           "tiny-cpu grad_clip 1.0 -> 0.0 (no clipping)"),
    mutant("row-3", "edge sizes", "sampler.py", "g = self._effective_difficulties() if",
           "g = [x / self.temperature for x in self._effective_difficulties()] if",
           "GGAS temperature applied twice in TaskBatchSampler (G_k / T^2; the same at T = 1)"),
    mutant("row-4", "edge sizes", "support/qwen.py", "arrays += [arrays[-1]] * pad", "arrays += [arrays[0]] * pad",
           "a clip not a multiple of the temporal patch padded with its first frame, not its last"),
    mutant("row-5", "edge sizes", "support/qwen.py", "return _Video(patches, (t, g, g), group_times, tp * step)",
           "return _Video(patches, (t, g, g), group_times, step)",
           "Qwen2.5-VL seconds per temporal group = the frame spacing, not T x it"),
    mutant("row-6", "where a value is read", "train.py", _TOK + _CLIP, _CLIP + _TOK.replace("before", "after"),
           "the GGAS difficulty (token_grad_norm) read after clip_gradients"),
    mutant("row-7", "edge sizes", "evaluate.py", "for j in range(min(k, gallery_size)):", "for j in range(k):",
           "chance_recall with K above the gallery size divides by zero"),
    mutant("row-8", "edge sizes", "benchmarks/ablation.py", 'if st["lo"] > 0:', 'if st["lo"] >= 0:',
           "verdict 'holds' at lo == 0: a variant against itself holds"),
    mutant("row-9", "edge sizes", "data.py",
           "else sorted(rng.sample(range(len(paths)), max_images))", "else rng.sample(range(len(paths)), max_images)",
           "the training subsample of more query images than the cap loses the outfit's order"),
    mutant("row-10", "where a value is read", "support/fast_train.py",
           '\n            and getattr(getattr(embedder, "config", None), "lora_dropout", 0.0) == 0.0)', ")",
           "two_core_step used with LoRA dropout > 0 (use_two_cores forgets the dropout)"),
    mutant("row-11", "defaults", "calibrator.py", None, None, "PGSQC fro_weight default 1e-4 -> 1e-3 (both places)",
           edits=[("fro_weight: float = 1e-4  #", "fro_weight: float = 1e-3  #"),
                  ("fro_weight: float = 1e-4, orth_weight", "fro_weight: float = 1e-3, orth_weight")]),
    mutant("row-12", "where a value is read", "benchmarks/ablation.py",
           '"max_eval_queries": args.max_eval_queries, "train_defaults": defaults}',
           '"max_eval_queries": args.max_eval_queries}',
           "run settings without train_defaults: a stale run is reused after a default changes"),
    mutant("row-13", "edge sizes", "benchmarks/controlled.py", "steps = max(1, steps // len(spec[\"subsets\"]))",
           "steps = max(1, steps)", "the separate arm gets the full step budget per sub-dataset"),
    mutant("row-14", "edge sizes", "train.py", 'if score > run.best["score"]:', 'if score >= run.best["score"]:',
           "on equal validation scores the last becomes best/, not the first"),
    mutant("row-15", "where a value is read", "notebooks/shared_run.py", 'if not vals or vals[-1]["step"] != total:',
           "if not vals:", "run_complete (_finished) accepts a run whose log stops before its last validation"),
    # ---- our own: two or more per family --------------------------------------------------------
    mutant("own-paper-eval-every", "recipe values", "support/recipes.py", "eval_every=500,", "eval_every=1000,",
           "paper eval_every 500 -> 1000 (authors' --eval_steps): validation and best/ at other steps"),
    mutant("own-query-cap", "recipe values", "support/recipes.py", '{"sketch2i/ClothesV1": 5,',
           '{"sketch2i/ClothesV1": 4,', "the authors' training cap of ClothesV1 query sketches 5 -> 4"),
    mutant("own-tiny-warmup", "recipe values", "support/recipes.py", "warmup_ratio=0.05,", "warmup_ratio=0.1,",
           "tiny-cpu lr warm-up 5 % -> 10 % of the steps: every early lr changes"),
    mutant("own-sampler-min-prob", "defaults", "sampler.py", "min_prob: float = 0.02, warmup_steps",
           "min_prob: float = 0.01, warmup_steps",
           "TaskBatchSampler's floor 0.02 -> 0.01 (the one train.make_sampler uses; SamplerConfig keeps 0.02)"),
    mutant("own-sampler-ema", "defaults", "sampler.py", "temperature: float = 1.0, ema: float = 0.9,",
           "temperature: float = 1.0, ema: float = 0.8,",
           "TaskBatchSampler's difficulty EMA 0.9 -> 0.8 (train.make_sampler's; SamplerConfig keeps 0.9)"),
    mutant("own-loss-temperature", "defaults", "train.py", "temperature: float = knob(0.07,",
           "temperature: float = knob(0.05,", "InfoNCE tau 0.07 -> 0.05 (the authors' --temperature)"),
    mutant("own-orth-weight", "defaults", "calibrator.py", "orth_weight: float = 1e-2, init_logit",
           "orth_weight: float = 1e-3, init_logit",
           "the calibrator model.py builds: orth_weight 1e-2 -> 1e-3 (CalibratorConfig keeps 1e-2)"),
    mutant("own-waterfill-cascade", "edge sizes", "sampler.py",
           "new = [pin or s < m for s, pin in zip(scaled, pinned)]",
           "new = [pin or s < m for s, pin in zip(p, pinned)]",
           "waterfill pins by the raw p: when rescaling pushes another task under the floor it stays under"),
    mutant("own-epoch-small-subset", "edge sizes", "sampler.py",
           "return sum(n // b for n, b in zip(self.sizes, self.batch_sizes))",
           "return sum(n // self.batch_size for n in self.sizes)",
           "steps_per_epoch counts 0 batches for a sub-dataset smaller than a batch: a shorter GGAS warm-up"),
    mutant("own-few-queries-one", "edge sizes", "support/fast_infer.py", "/ max(1, n - 1)) for i in range(n)]",
           "/ (n - 1)) for i in range(n)]", "--max-queries 1 divides by zero in few_queries"),
    mutant("own-val-score-r10", "where a value is read", "train.py", "score = res.sum_recall(1)",
           "score = res.sum_recall(10)", "best/ chosen by the sum of val Recall@10, not the authors' Recall@1"),
    mutant("own-val-score-ood", "where a value is read", "train.py", "score = res.sum_recall(1)",
           "score = res.sum_recall(1, include_ood=True)", "best/ chosen with the OOD tasks' val Recall@1 summed in"),
    mutant("own-lr-after-step", "where a value is read", "train.py", _LR + _OPT, _OPT + _LR,
           "the logged lr read after scheduler.step(): the next step's lr, not the one this update used"),
    mutant("own-cal-unnormalised", "where a value is read", "calibrator.py",
           'qa = torch.einsum("bd,bdr->br", q, A)', 'qa = torch.einsum("bd,bdr->br", h.float(), A)',
           "PGSQC's low-rank shift computed from the raw hidden state h, not the unit query q"),
    mutant("own-ggas-total-norm", "where a value is read", "train.py", "run.task_sampler.update(subset, tok)",
           "run.task_sampler.update(subset, gnorm)",
           "GGAS told the global gradient norm (all parameters), not the token embeddings' norm"),
]


def check_plantable(mutants: list) -> None:
    """Every edit's old text occurs exactly once in its file, else stop naming the mutant."""
    for m in mutants:
        text = (REPO / m["file"]).read_text()
        for old, _ in m["edits"]:
            n = text.count(old)
            if n != 1:
                sys.exit(f"error: mutant {m['id']}: its old text occurs {n} times in {m['file']} (must be 1): "
                         f"the source moved; update MUTANTS.\n  old: {old!r}")


def copy_repo(dest: Path) -> None:
    """The files git tracks or would track, `data` as a link, never runs/; ../shared linked beside it."""
    out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, text=True, check=True).stdout
    for rel in sorted(set(filter(None, out.split("\0")))):
        src = REPO / rel
        if rel == "data" or rel.startswith(("data/", "runs/")) or not os.path.lexists(src):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(src.resolve(), dest / rel)
        else:
            shutil.copy2(src, dest / rel)
    if os.path.lexists(REPO / "data"):
        os.symlink((REPO / "data").resolve(), dest / "data")
    if (REPO.parent / "shared").is_dir():  # tests find the real U-FIRE annotations at ../shared
        os.symlink(REPO.parent / "shared", dest.parent / "shared")


def existing_tests(tests: list) -> list:
    return [t for t in tests if (REPO / t.split("::")[0]).exists()]


def run_one(m: dict, timeout: float, baseline: bool = False) -> dict:
    """Plant m (nothing for a baseline set) in a fresh copy and run its tests; the result record."""
    tests = existing_tests(m["tests"])
    rec = {"id": m["id"], "family": m.get("family"), "file": m.get("file"), "what": m.get("what"), "tests": tests,
           "skipped_tests": [t for t in m["tests"] if t not in tests]}
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix=f"mutant-{m['id']}-") as tmp:
        root = Path(tmp) / "repo"
        copy_repo(root)
        for old, new in m.get("edits", []):
            path = root / m["file"]
            path.write_text(path.read_text().replace(old, new, 1))
        if m.get("file"):
            try:
                py_compile.compile(str(root / m["file"]), cfile=f"{tmp}/compiled.pyc", doraise=True)
            except py_compile.PyCompileError as e:
                return {**rec, "result": "does not compile", "detail": str(e), "seconds": 0.0}
        cmd = [sys.executable, "-m", "pytest", *tests, "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow",
               f"--basetemp={tmp}/pytest"]
        proc = subprocess.Popen(cmd, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # pytest and whatever it started (torchrun, notebooks)
            output, rc = proc.communicate()[0], None
    first = re.search(r"^(FAILED|ERROR) (\S+)", output, re.M)
    if rc is None:
        result = f"timeout ({timeout:.0f} s)"
    else:
        result = {0: "passed" if baseline else "survived", 1: "failed" if baseline else "caught"}.get(
            rc, f"pytest rc {rc}")
    tail = output.strip().splitlines()[-1] if output.strip() else ""
    return {**rec, "result": result, "rc": rc, "first_failure": first.group(2) if first else None,
            "pytest_summary": tail, "seconds": round(time.time() - t0, 1),
            **({"output_tail": output[-3000:]} if rc != 0 and result != "caught" else {})}


def summary(results: list) -> dict:
    out = {}
    for fam in FAMILIES:
        rs = [r for r in results if r["family"] == fam]
        if rs:
            out[fam] = {"caught": sum(r["result"] == "caught" for r in rs), "total": len(rs)}
    out["all"] = {"caught": sum(r["result"] == "caught" for r in results), "total": len(results)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", action="store_true", help="run every mutant's test set WITHOUT the mutant")
    ap.add_argument("--only", default="", help="comma-separated mutant ids (default: all)")
    ap.add_argument("--jobs", type=int, default=2, help="mutants run at once (default 2)")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per pytest run (default 1200)")
    ap.add_argument("--out", default=None, help="JSON written atomically (default benchmarks/mutants.json; "
                    "benchmarks/mutants_baseline.json with --baseline)")
    ap.add_argument("--list", action="store_true", help="print the mutants and their tests, run nothing")
    args = ap.parse_args(argv)
    chosen = MUTANTS
    if args.only:
        ids = args.only.split(",")
        unknown = sorted(set(ids) - {m["id"] for m in MUTANTS})
        if unknown:
            sys.exit(f"error: --only: unknown mutant ids {unknown}")
        chosen = [m for m in MUTANTS if m["id"] in ids]
    check_plantable(chosen)
    for m in chosen:
        missing = [t for t in m["tests"] if t not in existing_tests(m["tests"])]
        if args.list or missing:
            print(f"{m['id']:24} {m['family']:22} {m['file']:24} {' '.join(existing_tests(m['tests']))}"
                  + (f"   (not found, left out: {' '.join(missing)})" if missing else ""))
        if not existing_tests(m["tests"]):
            sys.exit(f"error: mutant {m['id']}: none of its tests exist")
    if args.list:
        return 0
    if args.baseline:  # each distinct test set once, nothing planted
        sets = {tuple(m["tests"]): None for m in chosen}
        chosen = [{"id": f"baseline-{i}", "tests": list(t)} for i, t in enumerate(sets)]
    with cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(run_one, m, args.timeout, args.baseline): m for m in chosen}
        results = []
        for f in cf.as_completed(futures):
            r = f.result()
            results.append(r)
            print(f"  {r['id']:24} {r['result']:14} {r['seconds']:7.1f} s  {r.get('first_failure') or ''}",
                  flush=True)
    order = {m["id"]: i for i, m in enumerate(chosen)}
    results.sort(key=lambda r: order[r["id"]])

    sys.path.insert(0, str(REPO))
    from support import plumbing

    info = plumbing.machine_info(REPO)
    doc = {"date": info["date"], "machine": {k: info[k] for k in ("cpu_model", "cores", "python", "torch")},
           "commit": info["commit"], "command": " ".join(["python", "benchmarks/mutants.py", *sys.argv[1:]]),
           "baseline": args.baseline, "results": results}
    print(f"\n{'mutant':24} {'family':22} {'result':14} {'s':>6}  first failing test")
    for r in results:
        print(f"{r['id']:24} {r['family'] or '-':22} {r['result']:14} {r['seconds']:6.0f}  "
              f"{r.get('first_failure') or r.get('pytest_summary', '')}")
    if args.baseline:
        bad = [r for r in results if r["result"] != "passed"]
        print(f"\nbaseline: {len(results) - len(bad)} of {len(results)} test sets pass"
              + ("" if not bad else " -- the harness is INVALID until they all do"))
    else:
        doc["summary"] = summary(results)
        print("\ncaught / total: " + ", ".join(f"{k} {v['caught']}/{v['total']}" for k, v in doc["summary"].items()))
    out = Path(args.out or REPO / "benchmarks" / ("mutants_baseline.json" if args.baseline else "mutants.json"))
    plumbing.atomic_write(out, json.dumps(doc, indent=1) + "\n")
    print(f"written: {out}")
    return 1 if args.baseline and bad else 0


if __name__ == "__main__":
    sys.exit(main())
