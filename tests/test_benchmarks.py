"""Fast checks of the benchmark scripts' bookkeeping (no training, no model: well under a second).

benchmarks/ablation.py turns per-seed Recall numbers into mean ± std tables and a verdict on the
paper's claims; benchmarks/speed.py turns measurements into ratio tables. Both are tested here on
hand-made numbers whose answers we know. The expensive parts (training, encoding) are exercised by
running the scripts themselves (`python benchmarks/ablation.py --quick`).
"""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # speed.py imports its machine header from ablation.py
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ablation = _load("ablation")
speed = _load("speed")


def test_mean_std_is_the_sample_std():
    m, s = ablation.mean_std([0.1, 0.2, 0.3])
    assert m == pytest.approx(0.2)
    assert s == pytest.approx(0.1)  # sqrt(((0.1)^2 + 0 + (0.1)^2) / 2)
    m1, s1 = ablation.mean_std([0.4])
    assert m1 == pytest.approx(0.4) and math.isnan(s1)  # one seed: no spread known
    assert ablation.fmt_ms(m, s) == "20.0 ± 10.0" and ablation.fmt_ms(m1, s1) == "40.0"


@pytest.mark.parametrize("a, b, verdict", [
    ([0.50, 0.52, 0.51], [0.40, 0.41, 0.42], "holds"),  # 10 points apart, std ~1 point
    ([0.40, 0.41, 0.42], [0.50, 0.52, 0.51], "contradicted"),
    ([0.50, 0.40, 0.45], [0.46, 0.44, 0.47], "within noise"),  # 0.3 points apart, std ~5 points
    ([0.5], [0.4], "untestable (1 seed)"),
])
def test_compare_verdicts(a, b, verdict):
    c = ablation.compare(a, b)
    assert c["verdict"] == verdict
    assert c["diff"] == pytest.approx(sum(a) / len(a) - sum(b) / len(b))


def test_compare_counts_paired_wins():
    c = ablation.compare([0.5, 0.3, 0.6], [0.4, 0.4, 0.5])
    assert (c["wins"], c["n"]) == (2, 3)


def _scores(means: dict, spread: float) -> dict:
    """Three seeds per variant at mean +- spread, for both metrics."""
    return {v: {"R@1": [m - spread, m, m + spread], "R@10": [m - spread, m, m + spread]} for v, m in means.items()}


def test_overall_verdict_on_the_papers_ordering():
    paper = {"full": 0.60, "cal-off": 0.50, "cal-linear": 0.55, "samp-uniform": 0.40, "samp-size": 0.58}
    checks = ablation.verdicts(_scores(paper, 0.01), "R@1")
    assert all(c["verdict"] == "holds" for c in checks if c["required"])
    assert ablation.overall_verdict(checks).startswith("MATCHES")

    # PGSQC matters more than GGAS here: that claim is contradicted, and the verdict says so.
    swapped = dict(paper, **{"cal-off": 0.40, "samp-uniform": 0.50})
    checks = ablation.verdicts(_scores(swapped, 0.01), "R@1")
    bad = [c for c in checks if c["verdict"] == "contradicted"]
    assert [(c["a"], c["b"]) for c in bad] == [("cal-off", "samp-uniform")]
    assert ablation.overall_verdict(checks).startswith("does NOT match")

    # Same means but seeds 20 points apart: nothing can be claimed.
    checks = ablation.verdicts(_scores(paper, 0.20), "R@1")
    assert all(c["verdict"] == "within noise" for c in checks)
    assert ablation.overall_verdict(checks).startswith("does not clearly match")

    one_seed = {v: {"R@1": [m], "R@10": [m]} for v, m in paper.items()}
    assert ablation.overall_verdict(ablation.verdicts(one_seed, "R@1")).startswith("cannot tell")


def test_tables_from_runs():
    runs = []
    for v, base in (("full", 0.5), ("cal-off", 0.4)):
        for s in (0, 1):
            x = base + 0.02 * s
            runs.append({"variant": v, "seed": s, "seconds": 1.0, "overall": {"1": x / 2, "10": x},
                         "task_means": {"t2i": {"1": x / 2, "10": x}, "cir": {"1": x / 4, "10": x / 2}}})
    agg = ablation.aggregate(runs, ["full", "cal-off"], [0, 1])
    assert agg["full"]["R@10"] == pytest.approx([0.5, 0.52])
    summary = ablation.summary_table(agg)
    assert "| 51.0 ± 1.4 |" in summary  # mean 0.51, std 0.0141 of R@10 for full
    assert "-10.0" in summary  # cal-off's R@10 delta vs full
    table = ablation.task_table(agg, "R@10")
    assert table.splitlines()[0] == "| task (R@10) | `full` | `cal-off` |"
    assert "| t2i | 51.0 ± 1.4 | 41.0 ± 1.4 |" in table


def test_speed_report_ratios():
    mem = [{"batch": b, "chunk": c, "subset": "cir/X", "method": "m", "step_peak_mib": mib, "step_seconds": sec}
           for b, c, mib, sec in ((32, 16, 100, 2.0), (32, 0, 200, 1.0), (64, 16, 110, 4.0), (64, 0, 400, 2.0))]
    text = speed.report({"memory": mem})
    assert "| 32 | 200 | 100 | 0.50 | 1.00x | 1.00x | 2.00 |" in text
    assert "| 64 | 400 | 110 | 0.28 | 2.00x | 1.10x | 2.00 |" in text


def test_peak_memory_probe_sees_an_allocation():
    if speed._status_kib("VmRSS") < 0 or not speed._reset_peak():
        pytest.skip("no /proc/self/status or clear_refs on this system")
    before = speed._status_kib("VmRSS")
    block = b"\x01" * (64 * 1024 * 1024)  # 64 MiB, written byte by byte, so it is resident
    del block
    assert speed._status_kib("VmHWM") - before >= 60 * 1024
def test_step_shares_summary_and_table():
    off = {"input": 40.0, "forward": 150.0, "loss": 2.0, "backward": 190.0, "optimizer": 10.0, "bookkeeping": 8.0,
           "step": 400.0}
    thread = dict(off, input=10.0, step=380.0)  # 20 ms faster, 10 ms still waited for
    sh = speed.share_summary(off, thread, hits=9, misses=1)
    assert sh["hidden_share_unclipped"] == pytest.approx(0.5)  # (400 - 380) / 40
    assert sh["hidden_share"] == pytest.approx(0.5)
    assert sh["off_loop_share"] == pytest.approx(0.75)  # 1 - 10 / 40
    assert sh["hit_rate"] == pytest.approx(0.9)
    assert sh["share"]["off"]["input"] == pytest.approx(0.1)  # 40 / 400
    assert sh["prep_share_of_default_step"] == pytest.approx(40 / 380)
    slower = speed.share_summary(off, dict(thread, step=460.0), hits=1, misses=0)
    assert slower["hidden_share_unclipped"] == pytest.approx(-1.5)  # the worker cost more than it saved
    assert slower["hidden_share"] == 0.0  # clipped to [0, 1]
    text = "\n".join(speed.share_table({**sh, "steps": 10, "warmup": 2, "path": "two_core_step", "torch_threads": 1}))
    assert "| forward: query and target towers (wall) | 150.0 | 37.50 % | 150.0 | 39.47 % |" in text
    assert "= 0.50 (clipped to [0, 1]: 0.50)" in text and "9/10 = 90.00 %" in text
