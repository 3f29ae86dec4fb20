"""Checks of benchmarks/diagnostics.py: what PGSQC and GGAS did in one training run.

Its tables are pure functions of a run's log.jsonl; they are tested on made-up log lines whose
answers are known (two sub-datasets, known lambdas per window, known draw counts). The direction
statistics of part 2 are tested on hand-made moves (two groups pushed opposite ways; random moves).
One end-to-end test trains a 4-step run on the small synthetic U-FIRE and runs the script on it.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import load_benchmark  # noqa: E402

diag = load_benchmark("diagnostics")
A, B = "asfr/SynAttr", "t2i/SynGen"  # sorted order: A first


def _step(step: int, subset: str, lam: float, angle=None, p=None, g=None) -> dict:
    """One made-up training-step line, shaped like train.py's."""
    rec = {"step": step, "subset": subset, "loss": 1.0, "lam_mean": lam,
           "probabilities": p or {A: 0.5, B: 0.5}, "difficulties": g or {A: 1.0, B: 1.0}}
    if angle is not None:
        rec["angle_deg"] = angle
    return rec


def _made_up_log(tmp_path: Path, with_angle: bool = True) -> Path:
    """8 steps in two windows (1-4, 5-8): A on 1, 2, 3, 5; B on 4, 6, 7, 8; validations at 4 and 8.

    Known answers: mean lambda A = [0.2, 0.6], B = [0.5, 0.8], all = [0.275, 0.75]; drawn shares
    A = [75 %, 25 %], B = [25 %, 75 %]; steps received at the validations A = [3, 4], B = [1, 4].
    """
    lam = {1: 0.1, 2: 0.2, 3: 0.3, 4: 0.5, 5: 0.6, 6: 0.7, 7: 0.8, 8: 0.9}
    who = {1: A, 2: A, 3: A, 4: B, 5: A, 6: B, 7: B, 8: B}
    lines = []
    for s in range(1, 9):
        p = {A: 0.4, B: 0.6} if s == 4 else ({A: 0.3, B: 0.7} if s == 8 else None)
        g = {A: 2.0, B: 3.0} if s == 4 else ({A: 1.5, B: 0.5} if s == 8 else None)
        lines.append(_step(s, who[s], lam[s], angle=10 * lam[s] if with_angle else None, p=p, g=g))
        if s in (4, 8):
            lines.append({"event": "val", "step": s, "sum_recall1": 0.3,
                          "recall": {A: {"1": 0.1, "10": 0.5 if s == 4 else 0.6},
                                     B: {"1": 0.2, "10": 0.25 if s == 4 else 0.75}}})
    # A resumed run may have logged step 2 twice: the later line is the one that counts.
    lines.insert(1, _step(2, B, 99.0))
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(x) + "\n" for x in lines) + "\n")  # a trailing blank line is fine
    return log


def test_step_windows_split_the_run_evenly():
    assert diag.step_windows(1400, 7) == [(1, 200), (201, 400), (401, 600), (601, 800), (801, 1000),
                                          (1001, 1200), (1201, 1400)]
    assert diag.step_windows(10, 3) == [(1, 3), (4, 7), (8, 10)]
    assert diag.step_windows(3, 7) == [(1, 1), (2, 2), (3, 3)]  # never an empty window


def test_calibrator_sampler_and_recall_tables_on_a_made_up_log(tmp_path):
    steps, vals = diag.read_log(_made_up_log(tmp_path))
    assert [s["step"] for s in steps] == list(range(1, 9)) and steps[1]["subset"] == A  # later line won
    windows = diag.step_windows(8, 2)
    subsets = diag.subsets_of(steps, {"resolved": {"train_subsets": {A: 300, B: 100}}})
    assert subsets == [A, B]

    cal = diag.calibrator_over_training(steps, windows, subsets)
    assert cal["lam"][A] == pytest.approx([0.2, 0.6])
    assert cal["lam"][B] == pytest.approx([0.5, 0.8])
    assert cal["lam"]["all"] == pytest.approx([0.275, 0.75])
    assert cal["angle_deg"][B] == pytest.approx([5.0, 8.0]) and cal["angle_logged"]
    assert cal["steps"][A] == [3, 1] and cal["init_lambda"] == pytest.approx(1 / (1 + math.exp(3)))

    samp = diag.sampler_over_training(steps, windows, {A: 300, B: 100}, subsets)
    assert samp["size_share"] == pytest.approx({A: 0.75, B: 0.25}) and samp["uniform"] == 0.5
    assert samp["drawn_share"][A] == pytest.approx([0.75, 0.25])
    assert samp["drawn_share"][B] == pytest.approx([0.25, 0.75])
    assert samp["total_steps"] == {A: 4, B: 4}
    assert samp["p_end"][B] == [0.6, 0.7] and samp["G_end"][A] == [2.0, 1.5]  # the windows' last lines

    rec = diag.recall_vs_steps(steps, vals, subsets)
    assert rec["val_steps"] == [4, 8]
    assert rec["received"] == {A: [3, 4], B: [1, 4]}
    assert rec["r10"][B] == [0.25, 0.75]

    # The printed units: lambda 3 decimals, degrees 2, shares and Recall in %.
    text = diag.calibrator_tables(cal) + diag.sampler_tables(samp) + diag.recall_table(rec)
    assert "| asfr/SynAttr | 0.200 | 0.600 |" in text
    assert "| t2i/SynGen | 5.00 | 8.00 |" in text
    assert "| asfr/SynAttr | 300 | 75.0 | 50.0 | 75.0 | 25.0 | 4 |" in text
    assert "| t2i/SynGen | 1: 25.0 | 4: 75.0 |" in text


def test_a_log_without_angles_reports_them_as_na(tmp_path):
    steps, _ = diag.read_log(_made_up_log(tmp_path, with_angle=False))
    cal = diag.calibrator_over_training(steps, diag.step_windows(8, 2), [A, B])
    assert not cal["angle_logged"] and cal["angle_deg"][A] == [None, None]
    assert "Angles: n/a" in diag.calibrator_tables(cal)


def test_direction_statistics_on_hand_made_moves():
    rng = np.random.default_rng(0)
    d, n = 16, 200
    q_raw = rng.normal(size=(2 * n, d))  # (2n, D) any starting points
    e0 = np.eye(d)[0]  # (D,)
    q_up, q_down = q_raw[:n] + 0.1 * e0, q_raw[n:] - 0.1 * e0  # (n, D) pushed +e0 / -e0
    lam, ang = np.full(n, 0.25), np.full(n, math.radians(3.0))  # (n,)
    up = diag.direction_stats(q_raw[:n], q_up, lam, ang)
    down = diag.direction_stats(q_raw[n:], q_down, lam, ang)
    assert up["rbar"] == pytest.approx(1.0) and down["rbar"] == pytest.approx(1.0)
    assert up["lam_mean"] == pytest.approx(0.25) and up["angle_deg_mean"] == pytest.approx(3.0)
    assert up["move_norm_mean"] == pytest.approx(0.1) and up["moved"] == n

    noise = q_raw[:n] + 0.1 * rng.normal(size=(n, d))  # (n, D) moved every which way
    rand = diag.direction_stats(q_raw[:n], noise, lam, ang)
    assert rand["rbar"] < 0.2 and rand["rbar_random"] == pytest.approx(1 / math.sqrt(n))

    still = diag.direction_stats(q_raw[:3], q_raw[:3], lam[:3], ang[:3])  # nothing moved: no direction
    assert still["moved"] == 0 and still["rbar"] is None and still["direction"] is None

    stats = {"asfr/X": up, "cir/Y": down, "t2i/Z": rand, "inshop/W": still}
    cos = diag.direction_cosines(stats)
    assert cos["cos"][0][1] == pytest.approx(-1.0) and cos["cos"][0][0] == pytest.approx(1.0)
    assert cos["cos"][0][3] is None
    pairs = diag.colour_pairs(cos)
    assert [(p["a"], p["b"]) for p in pairs] == [("asfr/X", "cir/Y"), ("asfr/X", "t2i/Z")]
    assert pairs[0]["cos"] == pytest.approx(-1.0)
    json.dumps(stats, allow_nan=False)  # the JSON the CLI writes stays strict


def _cli(argv) -> tuple[int, str, str]:
    """diagnostics.main(argv) in this process; returns (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = diag.main(argv)
    return rc, out.getvalue(), err.getvalue()


def test_bad_input_is_one_error_line_naming_the_file(tmp_path):
    rc, _, err = _cli([str(tmp_path / "nope")])
    assert rc == 1 and err.startswith("error:") and "nope" in err

    (tmp_path / "config.json").write_text("{}")
    rc, _, err = _cli([str(tmp_path), "--no-model"])  # a folder without log.jsonl
    assert rc == 1 and f"{tmp_path / 'log.jsonl'}" in err

    (tmp_path / "log.jsonl").write_text(json.dumps(_step(1, A, 0.1)) + "\n{not json\n")
    rc, _, err = _cli([str(tmp_path), "--no-model"])
    assert rc == 1 and f"{tmp_path / 'log.jsonl'}, line 2: not JSON" in err and len(err.splitlines()) == 1

    (tmp_path / "log.jsonl").write_text(json.dumps(_step(1, A, 0.1)) + "\n")
    (tmp_path / "config.json").write_text(json.dumps({"data": str(tmp_path), "resolved": {
        "total_steps": 1, "train_subsets": {A: 10}}}))
    rc, _, err = _cli([str(tmp_path), "--ckpt", "best"])  # the model part needs a checkpoint
    assert rc == 1 and f"--ckpt best: {tmp_path / 'best'}: no such checkpoint folder" in err


def test_cli_on_a_tiny_real_run(small_synthetic_root, tmp_path):
    """Train 4 steps on t2i + asfr, then run the script: every trained sub-dataset is in every part."""
    import train

    run = tmp_path / "run"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = train.main(["--tasks", "t2i,asfr", "--steps", "4", "--eval-every", "2", "--max-eval-queries", "4",
                         "--no-final-test", "--data", str(small_synthetic_root), "--out", str(run)])
    assert rc == 0, buf.getvalue()[-3000:]
    trained = sorted(json.loads((run / "config.json").read_text())["resolved"]["train_subsets"])
    assert {s.split("/")[0] for s in trained} == {"t2i", "asfr"}

    out = tmp_path / "diag.json"
    rc, text, err = _cli([str(run), "--max-queries", "4", "--out", str(out)])
    assert rc == 0, err[-3000:]
    parts = text.split("\n## ")  # the header, then parts 1-4
    assert len(parts) == 5
    for part in parts[1:]:
        for name in trained:
            assert f"| {name} |" in part or f" {name} |" in part, (name, part[:400])
    doc = json.loads(out.read_text())
    assert sorted(doc["held_out"]["stats"]) == trained
    assert all(doc["held_out"]["stats"][k]["queries"] == 4 for k in trained)
    assert doc["held_out"]["pairs"] and all(p["a"].startswith("asfr/") for p in doc["held_out"]["pairs"])
    assert sum(doc["sampler_over_training"]["total_steps"].values()) == 4
    assert doc["recall_vs_steps"]["val_steps"] == [2, 4]
    assert set(doc["calibrator_over_training"]["lam"]) == {*trained, "all"}


def test_initial_lambda_is_the_calibrators():
    """diagnostics.py keeps lambda's start as a constant (so --help needs no torch): the same one."""
    from calibrator import CalibratorConfig, SphericalQueryCalibrator

    import torch

    cal = SphericalQueryCalibrator.from_config(CalibratorConfig(dim=8, rank=2, hidden=4))
    assert diag.INIT_LOGIT == CalibratorConfig(dim=8).init_logit
    with torch.no_grad():
        lam = cal(torch.randn(3, 8)).lam  # (3,) lambda of a fresh calibrator
    assert lam.tolist() == pytest.approx([diag.INIT_LAMBDA] * 3, rel=1e-4)  # init_std 1e-6 nudges the logit
