"""What PGSQC and GGAS did in one training run: four tables read from a finished run folder.

What it measures
----------------
FashionLens (Wen et al., 2026) adds two mechanisms to a contrastive MLLM retriever. Their effect on
Recall is what benchmarks/ablation.py measures; this script shows what they *did* in one run:

1. **Calibrator over training** (PGSQC, calibrator.py). Each step's log line (train.py,
   `run_dir.log_step(run, ...)`) holds the sub-dataset of that step's batch, the mean strength
   lambda of its queries (`lam_mean`) and the mean arc lambda * omega they moved (`angle_deg`). Per
   sub-dataset and per step window: the mean of both. At initialisation lambda = sigmoid(-3) = 0.047
   (calibrator.CalibratorConfig.init_logit), so a row that stays there was never calibrated.
2. **Calibration direction on held-out queries** (PGSQC, needs the model). The checkpoint encodes each
   sub-dataset's queries twice over (model.FashionLensEmbedder.forward returns both): q_raw, the unit
   query before the calibrator, and q, after it. The move m_i = q_i - q_raw_i, its unit direction
   u_i = m_i / ||m_i||, and per sub-dataset the mean resultant length

       Rbar = || (1/n) sum_i u_i ||      1: every query moved the same way; ~1/sqrt(n): no common way

   and the unit mean direction. The cosine between two sub-datasets' mean directions says whether
   the calibrator pushes them the same way (+1), unrelatedly (0) or apart (-1). The pairs printed
   last put asfr (retrieval by attribute: colour must be ignored) against t2i and cir (colour
   matters), the tasks one would expect a shared backbone to fight over.
3. **GGAS over training** (sampler.py). Per step window: each sub-dataset's share of the steps it
   was actually drawn, against its size share N_k / sum_j N_j and the uniform 1/K; the sampling
   probability p_k and difficulty G_k logged on the window's last step (p_k there is the one the
   NEXT draw uses: train.py logs it after sampler.update); the total steps each one received.
4. **Validation Recall against steps received**. At every validation (the log's "event": "val"
   lines): how many steps each sub-dataset had been drawn for so far, and its val Recall@10.

Parts 1, 3 and 4 are pure functions of the parsed log (tests/test_diagnostics.py feeds them made-up
lines); part 2 loads the checkpoint and is skipped for a run trained with `--calibrator off`.

Run it
------
    python benchmarks/diagnostics.py runs/NAME                      # best/ checkpoint, test split
    python benchmarks/diagnostics.py runs/NAME --ckpt last --split val --max-queries 40
    python benchmarks/diagnostics.py runs/NAME --no-model           # parts 1, 3, 4 only (no torch)
    python benchmarks/diagnostics.py runs/NAME --out /tmp/diag.json --windows 4

It prints markdown tables (lambda 3 decimals, angles in degrees with 2, shares and Recall in %) and
writes every number to --out (default RUN_DIR/diagnostics.json). A missing or damaged input (no
log.jsonl, a log line that is not JSON, no checkpoint) stops it with one `error:` line naming the file.

Shape legend: B queries of one sub-dataset, D embedding size, K sub-datasets, W step windows,
V validations.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the flat modules (errors, plumbing, model, ...) sit at the root
    sys.path.insert(0, str(REPO))

from support.errors import FashionLensError, run_cli  # noqa: E402  (standard library only: --help stays fast)

# lambda at initialisation: sigmoid(init_logit) with calibrator.CalibratorConfig.init_logit = -3.
INIT_LOGIT = -3.0
INIT_LAMBDA = 1.0 / (1.0 + math.exp(-INIT_LOGIT))  # 0.0474
DEFAULT_WINDOWS = 7  # 1400 steps (the tiny-cpu recipe) -> windows of 200, one per validation
# Moves shorter than this are float32 rounding of q - q_raw, not a direction (a unit vector's
# components are exact to ~1e-7): such queries count in the means of lambda and angle, not in Rbar.
MIN_MOVE = 1e-6
# asfr ignores colour (its positives share an attribute label, whatever their colour); t2i and cir
# must match it. Their mean directions are the ones the question is about.
COLOUR_BLIND, COLOUR_BOUND = ("asfr",), ("t2i", "cir")


class DiagnosticsError(FashionLensError, ValueError):
    """A run folder, log or checkpoint this script cannot read (the message names the file)."""


# ================================================================================================
# Reading the run (standard library only)
# ================================================================================================

def read_log(path: Path) -> tuple[list[dict], list[dict]]:
    """log.jsonl -> (step lines sorted by step, validation lines sorted by step).

    A step line is any line without "event"; it must have "step" and "subset". Should a step appear
    twice (a resume that did not trim the log), the later line wins, as the later run is the one
    the checkpoint continued. Blank lines are skipped; anything else unreadable names file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise DiagnosticsError(f"{path}: no training log here (is this a run folder written by train.py?)")
    steps: dict[int, dict] = {}  # step -> its line (the last one written)
    vals: dict[int, dict] = {}  # step -> the validation made after it
    with open(path, encoding="utf-8") as f:
        for lineno, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as err:
                raise DiagnosticsError(f"{path}, line {lineno}: not JSON ({err.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                raise DiagnosticsError(f"{path}, line {lineno}: expected an object with an integer 'step'")
            if rec.get("event") == "val":
                vals[int(rec["step"])] = rec
            elif rec.get("event") is None:
                if "subset" not in rec:
                    raise DiagnosticsError(f"{path}, line {lineno}: a step line without 'subset'")
                steps[int(rec["step"])] = rec
            # other events (none today) are not ours to interpret: skipped
    if not steps:
        raise DiagnosticsError(f"{path}: no training step in this log")
    return [steps[s] for s in sorted(steps)], [vals[s] for s in sorted(vals)]


def read_config(run_dir: Path) -> dict:
    """RUN_DIR/config.json (train.py's resolved configuration) as a dict."""
    path = Path(run_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DiagnosticsError(f"{path}: missing (train.py writes it when a run starts)") from None
    except (OSError, json.JSONDecodeError) as err:
        raise DiagnosticsError(f"{path}: unreadable ({err})") from None
    if not isinstance(config, dict) or not isinstance(config.get("resolved", {}), dict):
        raise DiagnosticsError(f"{path}: expected train.py's object with a 'resolved' object in it")
    return config


# ================================================================================================
# Pure functions over the parsed log (tests/test_diagnostics.py checks them on made-up lines)
# ================================================================================================

def step_windows(total_steps: int, n: int = DEFAULT_WINDOWS) -> list[tuple[int, int]]:
    """Split steps 1..total_steps into min(n, total_steps) consecutive windows of (almost) equal
    length, as inclusive (first, last) pairs: step_windows(1400, 7) = [(1, 200), ..., (1201, 1400)]."""
    n = max(1, min(n, total_steps))
    ends = [round(i * total_steps / n) for i in range(1, n + 1)]  # last step of each window
    return [(prev + 1, end) for prev, end in zip([0] + ends[:-1], ends)]


def window_label(w: tuple[int, int]) -> str:
    """(201, 400) -> '201-400' (a one-step window is just its step)."""
    return f"{w[0]}" if w[0] == w[1] else f"{w[0]}-{w[1]}"


def _in_window(steps: list[dict], w: tuple[int, int]) -> list[dict]:
    """The step lines whose step lies in window w (inclusive)."""
    return [s for s in steps if w[0] <= s["step"] <= w[1]]


def _mean(xs: list) -> Optional[float]:
    """Mean of the numbers in xs that are not None; None when there are none (shown as n/a)."""
    xs = [float(x) for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def subsets_of(steps: list[dict], config: Optional[dict] = None) -> list[str]:
    """Sub-datasets of the run, sorted: the config's training sub-datasets plus any in the log."""
    known = set((config or {}).get("resolved", {}).get("train_subsets", {}) or {})
    return sorted(known | {s["subset"] for s in steps})


def calibrator_over_training(steps: list[dict], windows: list[tuple[int, int]],
                             subsets: Sequence[str]) -> dict:
    """Part 1: mean lambda and mean angle per sub-dataset and window.

    Each step line carries its batch's mean lambda (`lam_mean`) and mean arc lambda*omega in degrees
    (`angle_deg`; absent in logs from before it was logged). A cell averages the steps of that
    sub-dataset in that window (steps, not queries: every batch has the same size). The "all" row
    averages every step of the window.
    Returns {"windows", "init_lambda", "angle_logged", "lam": {name: [W]}, "angle_deg": {name: [W]},
    "steps": {name: [W]}} with None where a sub-dataset had no step (or no angle) in a window.
    """
    out = {"windows": [list(w) for w in windows], "init_lambda": INIT_LAMBDA,
           "angle_logged": any(s.get("angle_deg") is not None for s in steps),
           "lam": {}, "angle_deg": {}, "steps": {}}
    for name in [*subsets, "all"]:
        lam, ang, cnt = [], [], []  # one value per window
        for w in windows:
            mine = [s for s in _in_window(steps, w) if name == "all" or s["subset"] == name]
            lam.append(_mean([s.get("lam_mean") for s in mine]))
            ang.append(_mean([s.get("angle_deg") for s in mine]))
            cnt.append(len(mine))
        out["lam"][name], out["angle_deg"][name], out["steps"][name] = lam, ang, cnt
    return out


def steps_received(steps: list[dict], subsets: Sequence[str], until: Optional[int] = None) -> dict:
    """{name: optimizer steps drawn on it} (up to and including step `until`; None = all logged steps)."""
    return {k: sum(1 for s in steps if s["subset"] == k and (until is None or s["step"] <= until))
            for k in subsets}


def sampler_over_training(steps: list[dict], windows: list[tuple[int, int]], sizes: dict,
                          subsets: Sequence[str]) -> dict:
    """Part 3: what GGAS drew, against the size prior and the uniform choice.

    sizes: {name: N_k} training records per sub-dataset (config.json's resolved.train_subsets).
    Per window: drawn share = steps on k / steps in the window; p_k and G_k are the values on the
    window's last step line (p_k there is what the next draw uses). Returns {"windows", "size",
    "size_share", "uniform", "drawn_share": {name: [W]}, "p_end": {name: [W]}, "G_end": {name: [W]},
    "total_steps": {name: int}}; shares are fractions (the tables print %).
    """
    total_n = sum(sizes.get(k, 0) for k in subsets)
    out = {"windows": [list(w) for w in windows], "size": {k: sizes.get(k) for k in subsets},
           "size_share": {k: (sizes[k] / total_n if total_n and k in sizes else None) for k in subsets},
           "uniform": 1.0 / len(subsets) if subsets else None,
           "drawn_share": {k: [] for k in subsets}, "p_end": {k: [] for k in subsets},
           "G_end": {k: [] for k in subsets},
           "total_steps": steps_received(steps, subsets)}
    for w in windows:
        mine = _in_window(steps, w)
        last = mine[-1] if mine else {}  # the window's last logged step (lines are sorted by step)
        for k in subsets:
            drawn = sum(1 for s in mine if s["subset"] == k)
            out["drawn_share"][k].append(drawn / len(mine) if mine else None)
            out["p_end"][k].append((last.get("probabilities") or {}).get(k))
            out["G_end"][k].append((last.get("difficulties") or {}).get(k))
    return out


def recall_vs_steps(steps: list[dict], vals: list[dict], subsets: Sequence[str]) -> dict:
    """Part 4: at each validation, the steps each sub-dataset had received and its val Recall.

    Returns {"val_steps": [V], "received": {name: [V]}, "r1": {name: [V]}, "r10": {name: [V]}}
    (Recall as fractions, None where the validation did not score that sub-dataset). Names are
    `subsets` plus any the validations scored.
    """
    names = sorted(set(subsets) | {k for v in vals for k in (v.get("recall") or {})})
    out = {"val_steps": [int(v["step"]) for v in vals], "received": {k: [] for k in names},
           "r1": {k: [] for k in names}, "r10": {k: [] for k in names}}
    for v in vals:
        rec = v.get("recall") or {}  # {name: {"1": r1, "10": r10}}
        got = steps_received(steps, names, until=v["step"])
        for k in names:
            out["received"][k].append(got[k])
            out["r1"][k].append((rec.get(k) or {}).get("1"))
            out["r10"][k].append((rec.get(k) or {}).get("10"))
    return out


def direction_stats(q_raw: np.ndarray, q: np.ndarray, lam: np.ndarray, angle: np.ndarray,
                    min_move: float = MIN_MOVE) -> dict:
    """Part 2 for one sub-dataset: how far and which way the calibrator moved its B queries.

    q_raw (B, D) unit queries before the calibrator, q (B, D) after it, lam (B,), angle (B,) the arc
    lambda*omega in radians. Returns mean lambda, mean angle in degrees, mean ||m||, how many queries
    moved by more than min_move (the others have no direction), Rbar over those, and the unit mean
    direction (D,) as a list (None when no query moved).
    """
    q_raw = np.asarray(q_raw, dtype=np.float64)  # (B, D) float64: the moves are small differences
    q = np.asarray(q, dtype=np.float64)  # (B, D)
    move = q - q_raw  # (B, D) m_i = q_i - q_raw_i
    norm = np.linalg.norm(move, axis=1)  # (B,) ||m_i|| = 2 sin(angle_i / 2) for unit q, q_raw
    keep = norm > min_move  # (B,) the queries whose move has a direction
    unit = move[keep] / norm[keep, None]  # (n, D) u_i = m_i / ||m_i||
    resultant = unit.mean(axis=0) if len(unit) else np.zeros(q.shape[1])  # (D,) (1/n) sum_i u_i
    rbar = float(np.linalg.norm(resultant))  # () mean resultant length in [0, 1]
    return {"queries": int(len(q)), "moved": int(keep.sum()),
            "lam_mean": float(np.mean(lam)) if len(lam) else None,
            "angle_deg_mean": float(np.degrees(np.mean(angle))) if len(angle) else None,
            "move_norm_mean": float(norm.mean()) if len(norm) else None,
            "rbar": rbar if len(unit) else None,
            # Rbar of n directions drawn uniformly at random in D dims is ~1/sqrt(n): the noise level
            "rbar_random": 1.0 / math.sqrt(len(unit)) if len(unit) else None,
            "direction": (resultant / rbar).tolist() if len(unit) and rbar > 0 else None}  # (D,) unit


def direction_cosines(stats: dict) -> dict:
    """{name: direction_stats(...)} -> {"names": [K], "cos": [[K x K]]}: cosine between the unit
    mean directions (None where a sub-dataset has no direction)."""
    names = list(stats)
    dirs = {k: (np.asarray(stats[k]["direction"]) if stats[k].get("direction") is not None else None)
            for k in names}  # name -> (D,) unit mean direction
    cos = [[(float(dirs[a] @ dirs[b]) if dirs[a] is not None and dirs[b] is not None else None)
            for b in names] for a in names]  # (K, K)
    return {"names": names, "cos": cos}


def colour_pairs(cosines: dict) -> list[dict]:
    """The pairs the question is about: each asfr sub-dataset (colour ignored) against each t2i and
    cir one (colour needed), with the cosine of their mean directions."""
    names = cosines["names"]
    out = []
    for i, a in enumerate(names):
        if a.split("/")[0] not in COLOUR_BLIND:
            continue
        for j, b in enumerate(names):
            if b.split("/")[0] in COLOUR_BOUND:
                out.append({"a": a, "b": b, "cos": cosines["cos"][i][j]})
    return out


# ------------------------------------------------------------------------------------------------
# Markdown tables (the units of the brief: lambda 3 decimals, degrees 2, shares and Recall in %)
# ------------------------------------------------------------------------------------------------

def _fmt(x, kind: str) -> str:
    """One cell: kind 'lam' -> 0.047, 'deg' -> 1.23, 'pct' -> 12.5 (x is a fraction), 'g' -> 0.123."""
    if x is None:
        return "n/a"
    return {"lam": f"{x:.3f}", "deg": f"{x:.2f}", "pct": f"{100 * x:.1f}", "g": f"{x:.3f}",
            "cos": f"{x:+.2f}"}[kind]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A markdown table from a header and rows of already formatted cells."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def calibrator_tables(cal: dict) -> str:
    """Part 1 as two tables (lambda, then angle), rows = sub-datasets, columns = step windows."""
    head = ["sub-dataset", *[window_label(w) for w in cal["windows"]]]
    out = [f"Mean lambda of the batch's queries (init sigmoid({INIT_LOGIT:g}) = {cal['init_lambda']:.3f}); "
           f"n/a: not drawn in that window.\n",
           markdown_table(head, [[k, *[_fmt(x, "lam") for x in v]] for k, v in cal["lam"].items()])]
    if cal["angle_logged"]:
        out += ["\nMean arc lambda*omega the calibrator moved the queries, degrees:\n",
                markdown_table(head, [[k, *[_fmt(x, "deg") for x in v]] for k, v in cal["angle_deg"].items()])]
    else:
        out.append("\nAngles: n/a (this log has no angle_deg: it predates train.py logging it).")
    return "\n".join(out)


def sampler_tables(samp: dict) -> str:
    """Part 3 as three tables: drawn share per window (with size share, uniform and total steps),
    then p_k and G_k at the end of each window."""
    wl = [window_label(w) for w in samp["windows"]]
    names = list(samp["total_steps"])
    rows = [[k, samp["size"][k] if samp["size"][k] is not None else "n/a", _fmt(samp["size_share"][k], "pct"),
             _fmt(samp["uniform"], "pct"), *[_fmt(x, "pct") for x in samp["drawn_share"][k]],
             samp["total_steps"][k]] for k in names]
    out = ["Share of the window's steps drawn on each sub-dataset, % (size share = N_k / sum N; "
           "uniform = 1/K):\n",
           markdown_table(["sub-dataset", "N_k", "size share", "uniform", *wl, "steps received"], rows),
           "\nGGAS sampling probability p_k on the window's last step (the next draw's), %:\n",
           markdown_table(["sub-dataset", *wl], [[k, *[_fmt(x, "pct") for x in samp["p_end"][k]]] for k in names]),
           "\nGGAS difficulty G_k (EMA of the summary tokens' gradient norm) on the window's last step:\n",
           markdown_table(["sub-dataset", *wl], [[k, *[_fmt(x, "g") for x in samp["G_end"][k]]] for k in names])]
    return "\n".join(out)


def recall_table(rec: dict) -> str:
    """Part 4: rows = sub-datasets, columns = validations, cells 'steps received: val R@10 %'."""
    if not rec["val_steps"]:
        return "No validation in this log."
    rows = [[k, *[f"{n}: {_fmt(r, 'pct')}" for n, r in zip(rec["received"][k], rec["r10"][k])]]
            for k in rec["received"]]
    return ("Steps received so far : val Recall@10 %, at each validation:\n\n"
            + markdown_table(["sub-dataset", *[f"step {s}" for s in rec["val_steps"]]], rows))


def direction_tables(held: dict) -> str:
    """Part 2: per sub-dataset statistics, the cosine matrix of mean directions, the colour pairs."""
    st = held["stats"]
    rows = [[k, s["queries"], s["moved"], _fmt(s["lam_mean"], "lam"), _fmt(s["angle_deg_mean"], "deg"),
             _fmt(s["move_norm_mean"], "g"), _fmt(s["rbar"], "g"), _fmt(s["rbar_random"], "g")]
            for k, s in st.items()]
    at = f" (step {held['checkpoint_step']})" if held.get("checkpoint_step") is not None else ""
    out = [f"Checkpoint {held['checkpoint']}{at}, {held['split']} split"
           + (f", at most {held['max_queries']} queries per sub-dataset" if held["max_queries"] else "")
           + f"; calibrator {held['calibrator']}. Rbar: 1 = every query moved the same way; "
             "'random' is the Rbar of as many random directions (1/sqrt(moved)).\n",
           markdown_table(["sub-dataset", "queries", "moved", "mean lambda", "mean angle (deg)", "mean move norm",
                           "Rbar", "Rbar random"], rows)]
    cos = held["cosines"]
    idx = {k: i + 1 for i, k in enumerate(cos["names"])}  # short column labels keep the matrix narrow
    matrix = [[f"{idx[k]} {k}", *[_fmt(c, "cos") for c in row]] for k, row in zip(cos["names"], cos["cos"])]
    out += ["\nCosine between the sub-datasets' mean move directions (columns numbered as the rows):\n",
            markdown_table(["sub-dataset", *map(str, idx.values())], matrix)]
    if held["pairs"]:
        out += ["\nasfr (colour ignored) against t2i / cir (colour needed):\n",
                markdown_table(["pair", "cos"], [[f"cos({p['a']}, {p['b']})", _fmt(p["cos"], "cos")]
                                                 for p in held["pairs"]])]
    else:
        out.append("\nNo asfr and t2i/cir sub-datasets in this run: no colour pairs.")
    return "\n".join(out)


# ================================================================================================
# Model I/O: part 2 (imports torch, transformers and the model only here)
# ================================================================================================

def checkpoint_folder(run_dir: Path, ckpt: str) -> Path:
    """--ckpt best|last (a folder of the run) or a path to a checkpoint folder; must exist."""
    inside = Path(run_dir) / ckpt  # "best" / "last": a folder of the run
    path = inside if inside.is_dir() or ckpt in ("best", "last") else Path(ckpt)
    if not path.is_dir():
        where = f"{inside}" if path == inside else f"neither {inside} nor {path}"
        raise DiagnosticsError(f"--ckpt {ckpt}: {where}: no such checkpoint folder (train.py writes best/ "
                               f"at the first validation and last/ at every one)")
    return path


def encode_moves(embedder, records: list, batch_size: int = 16) -> dict:
    """Encode `records` as queries, before and after the calibrator, no gradients, eval mode.

    Returns numpy arrays q_raw (B, D), q (B, D), lam (B,), angle (B,) radians. On a CPU, LoRA is
    merged into the weights for the duration, as model.FashionLensEmbedder._encode does (the same
    function up to float rounding, faster).
    """
    import contextlib

    import torch

    parts: dict[str, list] = {"q_raw": [], "q": [], "lam": [], "angle": []}  # key -> [(b, ...)]
    was_training = embedder.training
    embedder.eval()  # no dropout: the model as evaluate.py runs it
    merge = embedder.merged_lora() if embedder.device.type == "cpu" else contextlib.nullcontext()
    try:
        with torch.no_grad(), merge:
            for s in range(0, len(records), batch_size):
                x = embedder.collate_queries(records[s:s + batch_size])  # b prompts -> ModelInputs
                out = embedder(queries=x)  # q_raw, q (b, D); lam, angle (b,); reg ()
                for key in parts:  # (b, D) for q_raw and q, (b,) for lam and angle
                    parts[key].append(out[key].float().cpu().numpy())
    finally:
        embedder.train(was_training)
    dim = embedder.dim
    return {k: (np.concatenate(v) if v else np.zeros((0, dim) if k in ("q_raw", "q") else (0,)))
            for k, v in parts.items()}  # (B, D) / (B,)


def held_out_directions(run_dir: Path, ckpt: str, split: str, max_queries: int,
                        subsets: Sequence[str]) -> dict:
    """Part 2: load the checkpoint, encode each trained sub-dataset's `split` queries as evaluate.py
    builds them, and compute direction_stats per sub-dataset, their cosines and the colour pairs.

    Returns {"skipped": reason} for a checkpoint trained without a calibrator.
    """
    from support import cli, fast_infer, plumbing  # the model comes after the cheap checks

    folder = checkpoint_folder(run_dir, ckpt)
    from model import FashionLensEmbedder
    from support.checkpoint import CONFIG_FILE

    try:
        mode = json.loads((folder / CONFIG_FILE).read_text())["config"]["calibrator"]
    except (OSError, ValueError, KeyError, TypeError):
        mode = None  # from_pretrained below names what is wrong with the file
    if mode == "off":
        return {"skipped": f"the checkpoint {folder} was trained with calibrator 'off': no query moves"}
    root = cli.training_data_root(folder)  # the run's data root, as evaluate.py finds it
    if root is None:
        raise DiagnosticsError(f"{folder}: neither train_config.json in it nor {folder.parent / 'config.json'} "
                               f"names the data root the run was trained on")
    import data

    ufire = data.UFire(root)
    known = set(ufire.subsets(split))
    names = [k for k in subsets if k in known]  # the trained sub-datasets this split has
    if not names:
        raise DiagnosticsError(f"{root}: none of the run's sub-datasets ({', '.join(subsets)}) has "
                               f"a {split} split")
    saved = cli.saved_device(folder / CONFIG_FILE)  # a cuda-trained checkpoint on a CPU machine
    if saved:
        plumbing.check_device(f"{folder / CONFIG_FILE} (field 'device')", saved)
    embedder = FashionLensEmbedder.from_pretrained(str(folder))
    plumbing.set_cpu_threads(0, embedder.device.type, small_model=embedder.tiny)
    stats = {}
    for name in names:
        view = fast_infer.few_queries(ufire.eval_view(name, split), max_queries)  # evaluate.py's queries
        enc = encode_moves(embedder, view.records)  # (B, D) x2, (B,) x2
        stats[name] = direction_stats(enc["q_raw"], enc["q"], enc["lam"], enc["angle"])
    cosines = direction_cosines(stats)
    try:  # which validation made best/ (train.py saves it in metrics.json); last/ has none
        ckpt_step = json.loads((folder / "metrics.json").read_text())["val"]["step"]
    except (OSError, ValueError, KeyError, TypeError):
        ckpt_step = None
    return {"checkpoint": str(folder), "checkpoint_step": ckpt_step, "data": str(root), "split": split,
            "max_queries": max_queries,
            "calibrator": embedder.config.calibrator, "stats": stats, "cosines": cosines,
            "pairs": colour_pairs(cosines)}


# ================================================================================================
# Command line
# ================================================================================================

def build_parser() -> argparse.ArgumentParser:
    """The flags (checked by `_main` before anything is loaded)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("run_dir", help="a run folder written by train.py (log.jsonl, config.json, best/, last/)")
    ap.add_argument("--ckpt", default="best", help="checkpoint for part 2: best, last, or a folder path")
    ap.add_argument("--split", default="test", choices=["test", "val"], help="queries of part 2")
    ap.add_argument("--max-queries", type=int, default=0,
                    help="part 2: at most N evenly spaced queries per sub-dataset (0 = all)")
    ap.add_argument("--windows", type=int, default=DEFAULT_WINDOWS, help="step windows of parts 1 and 3")
    ap.add_argument("--no-model", action="store_true", help="skip part 2 (no checkpoint is loaded)")
    ap.add_argument("--out", default=None, help="JSON with every number (default RUN_DIR/diagnostics.json)")
    return ap


def main(argv=None) -> int:
    """The command line, through errors.run_cli: bad input gives one `error:` line, exit status 1."""
    return run_cli(_main, argv)


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise DiagnosticsError(f"{run_dir}: no such run folder")
    if args.max_queries < 0 or args.windows < 1:
        raise SystemExit("error: --max-queries must be >= 0 and --windows >= 1")
    out_path = Path(args.out) if args.out else run_dir / "diagnostics.json"
    from support import plumbing  # imports torch (for its other helpers): after the flags, so --help stays fast

    plumbing.check_writable("--out", out_path, folder=False)  # fail now, not after the model ran
    if not args.no_model:
        checkpoint_folder(run_dir, args.ckpt)  # a missing checkpoint, too, before any table is printed
    steps, vals = read_log(run_dir / "log.jsonl")
    config = read_config(run_dir)
    subsets = subsets_of(steps, config)
    resolved = config.get("resolved", {})
    total = int(resolved.get("total_steps") or steps[-1]["step"])  # the planned run, or what the log holds
    windows = step_windows(max(total, steps[-1]["step"]), args.windows)
    sizes = dict(resolved.get("train_subsets") or {})
    if not sizes:  # an older config without the sizes: count the training records
        import data

        ufire = data.UFire(config["data"])
        sizes = {k: len(ufire.records(k, "train")) for k in subsets}

    cal = calibrator_over_training(steps, windows, subsets)
    samp = sampler_over_training(steps, windows, sizes, subsets)
    rec = recall_vs_steps(steps, vals, subsets)
    print(f"# What PGSQC and GGAS did in {run_dir}\n\n{steps[-1]['step']} steps logged (of {total}); "
          f"calibrator {config.get('calibrator', '?')}, sampler {config.get('sampler', '?')}"
          + (f", GGAS uniform warm-up {resolved['ggas_warmup_steps']} steps" if "ggas_warmup_steps" in resolved else "")
          + f"; {len(vals)} validations.\n")
    print("## 1. Calibrator (PGSQC) over training\n")
    print(calibrator_tables(cal))
    print("\n## 2. Calibration direction on held-out queries\n")
    if args.no_model:
        held = {"skipped": "--no-model"}
    else:
        held = held_out_directions(run_dir, args.ckpt, args.split, args.max_queries, subsets)
    print(f"Skipped: {held['skipped']}." if "skipped" in held else direction_tables(held))
    print("\n## 3. Sampler (GGAS) over training\n")
    print(sampler_tables(samp))
    print("\n## 4. Validation Recall against steps received\n")
    print(recall_table(rec))

    doc = {"run": str(run_dir), "steps_logged": steps[-1]["step"], "total_steps": total,
           "calibrator": config.get("calibrator"), "sampler": config.get("sampler"),
           "calibrator_over_training": cal, "held_out": held, "sampler_over_training": samp,
           "recall_vs_steps": rec}
    plumbing.atomic_write(out_path, json.dumps(doc, indent=1, allow_nan=False))  # strict JSON: NaN is a bug
    print(f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
