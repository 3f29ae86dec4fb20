"""Checks of the benchmark scripts' bookkeeping, and of the paper-scale benchmark at a tiny size.

benchmarks/ablation.py turns per-query rankings into paired bootstrap intervals and a verdict on
the paper's claims; benchmarks/speed.py turns measurements into ratio tables. Both are tested here on
hand-made numbers whose answers we know. The expensive parts (training, encoding) are exercised by
running the scripts themselves (`python benchmarks/ablation.py --quick`).
benchmarks/paper_scale.py: its FLOP count on the published 4B config and against the modules of a
built model, and the whole measurement at `--size test` on a CPU (a few seconds).
"""
from __future__ import annotations

import json
import math
import shutil
import sys

import pytest

from conftest import BENCH, load_benchmark  # noqa: E402

ablation = load_benchmark("ablation")
speed = load_benchmark("speed")
paper_scale = load_benchmark("paper_scale")


def test_mean_std_is_the_sample_std():
    m, s = ablation.mean_std([0.1, 0.2, 0.3])
    assert m == pytest.approx(0.2)
    assert s == pytest.approx(0.1)  # sqrt(((0.1)^2 + 0 + (0.1)^2) / 2)
    m1, s1 = ablation.mean_std([0.4])
    assert m1 == pytest.approx(0.4) and math.isnan(s1)  # one seed: no spread known
    assert ablation.fmt_ms(m, s) == "20.0 ± 10.0" and ablation.fmt_ms(m1, s1) == "40.0"


def _run(ranks: dict, missing: int = 0) -> dict:
    """A made-up test result: {subset: [first-positive rank per query]} -> rows as run_one writes them."""
    return {"rows": [{"subset": sub, "task": sub.split("/")[0], "missing": missing, "ranks": list(r)}
                     for sub, r in ranks.items()]}


def _hits(n_hit: int, n: int = 40) -> list:
    """n queries, the first n_hit found at rank 0, the rest beyond the top 10 (-1)."""
    return [0] * n_hit + [-1] * (n - n_hit)


def test_bootstrap_difference_is_the_difference_of_the_tables_numbers():
    import random

    rng = random.Random(0)
    subs = ("t2i/A", "t2i/B", "cir/C")
    runs = {v: [_run({s: [rng.choice([-1, 0, 3, 7, 12]) for _ in range(30)] for s in subs}, missing=5)
                for _ in range(2)] for v in ("x", "y")}

    def overall(run, k):  # evaluate.summarise by hand: mean over tasks of the mean over sub-datasets
        rec = {r["subset"]: sum(0 <= q < k for q in r["ranks"]) / (len(r["ranks"]) + r["missing"])
               for r in run["rows"]}
        return ((rec["t2i/A"] + rec["t2i/B"]) / 2 + rec["cir/C"]) / 2

    boot = ablation.paired_bootstrap(runs["x"], runs["y"], n_boot=500)
    for k in (1, 10):
        want = [overall(a, k) - overall(b, k) for a, b in zip(runs["x"], runs["y"])]
        st = boot["overall"][k]
        assert st["per_seed"] == pytest.approx(want)
        assert st["diff"] == pytest.approx(sum(want) / 2)
        assert st["lo"] <= st["diff"] <= st["hi"] and st["hi"] - st["lo"] > 0
    same = ablation.paired_bootstrap(runs["x"], runs["x"], n_boot=200)["overall"][10]
    assert same["diff"] == same["lo"] == same["hi"] == 0.0  # paired: a variant against itself has no noise


@pytest.mark.parametrize("a_hits, b_hits, verdict", [
    ([30, 31, 29], [10, 11, 12], "holds"),  # 50 points apart on 40 queries, in every seed
    ([10, 11, 12], [30, 31, 29], "contradicted"),
    ([20, 20, 20], [20, 20, 21], "within noise"),  # one query apart
    ([30, 10, 30], [10, 30, 10], "within noise"),  # each seed clear-cut, but the seeds disagree
])
def test_verdicts_from_the_interval(a_hits, b_hits, verdict):
    a = [_run({"t2i/A": _hits(h)}) for h in a_hits]
    b = [_run({"t2i/A": _hits(h)}) for h in b_hits]
    st = ablation.paired_bootstrap(a, b, n_boot=1000)["overall"][1]
    assert ablation.verdict(st) == verdict


def test_claims_and_overall_verdict_on_the_papers_ordering():
    def runs_for(hits: dict) -> dict:
        return {v: [_run({"t2i/A": _hits(h + d)}) for d in (-1, 0, 1)] for v, h in hits.items()}

    paper = {"full": 30, "cal-off": 20, "cal-linear": 25, "samp-uniform": 10, "samp-size": 28}
    checks = ablation.check_claims(runs_for(paper), ks=(1,))
    assert all(c["verdict"] == "holds" for c in checks if c["required"])
    assert ablation.overall_verdict(checks).startswith("MATCHES")
    text = ablation.verdict_table(checks)
    assert "| PGSQC helps: full > calibrator off | R@1 | +25.0 [" in text  # 30 vs 20 of 40 queries
    # PGSQC matters more than GGAS here: that claim is contradicted, and the verdict says so.
    swapped = dict(paper, **{"cal-off": 10, "samp-uniform": 20})
    checks = ablation.check_claims(runs_for(swapped), ks=(1,))
    assert [(c["a"], c["b"]) for c in checks if c["verdict"] == "contradicted"] == [("cal-off", "samp-uniform")]
    assert ablation.overall_verdict(checks).startswith("does NOT match")
    one_seed = {v: r[:1] for v, r in runs_for(paper).items()}
    assert ablation.overall_verdict(ablation.check_claims(one_seed, ks=(1,))).startswith("cannot tell")


def test_bootstrap_refuses_results_without_ranks():
    a = [_run({"t2i/A": _hits(3)})]
    b = [{"rows": [{"subset": "t2i/A", "task": "t2i", "missing": 0}]}]
    with pytest.raises(ValueError, match="--fresh"):
        ablation.paired_bootstrap(a, b)


def test_tables_from_runs():
    runs = []
    for v, base in (("full", 0.5), ("cal-off", 0.4)):
        for s in (0, 1):
            x = base + 0.02 * s
            runs.append({"variant": v, "seed": s, "seconds": 1.0, "overall": {"1": x / 2, "10": x},
                         "task_means": {"t2i": {"1": x / 2, "10": x}, "cir": {"1": x / 4, "10": x / 2}}})
    agg = ablation.aggregate(runs, ["full", "cal-off"], [0, 1])
    assert agg["full"]["R@10"] == pytest.approx([0.5, 0.52])
    assert "| 51.0 ± 1.4 | 2 |" in ablation.summary_table(agg)  # mean 0.51, std 0.0141 of R@10 for full
    table = ablation.task_table(agg, "R@10")
    assert table.splitlines()[0] == "| task (R@10) | `full` | `cal-off` |"
    assert "| t2i | 51.0 ± 1.4 | 41.0 ± 1.4 |" in table
    deltas = {"cal-off": ablation.paired_bootstrap([_run({"t2i/A": _hits(30)})] * 2,
                                                   [_run({"t2i/A": _hits(20)})] * 2, n_boot=200)}
    text = ablation.delta_table(deltas, 10)
    assert "| **overall** | **+25.0 [" in text and "| seeds with full > variant | 2/2 |" in text


def test_speed_report_ratios():
    mem = [{"batch": b, "chunk": c, "subset": "cir/X", "method": "m", "step_peak_mib": mib, "step_seconds": sec}
           for b, c, mib, sec in ((32, 16, 100, 2.0), (32, 0, 200, 1.0), (64, 16, 110, 4.0), (64, 0, 400, 2.0))]
    text = speed.report({"memory": mem})
    assert "| 32 | 200 | 100 | 0.50 | 1.00x | 1.00x | 2.00 |" in text
    assert "| 64 | 400 | 110 | 0.28 | 2.00x | 1.10x | 2.00 |" in text


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


# ---------------------------------------------------------------------------------------------
# paper_scale.py: the FLOP count, and one tiny run on a CPU
# ---------------------------------------------------------------------------------------------

def test_flop_counts_of_the_published_4b_config():
    from support import hub_layout

    c = paper_scale.flop_counts(hub_layout.qwen_config("qwen3_vl", "4b"), lora_r=8)
    # One text layer of Qwen3-VL-4B: q 2560->4096 (32 heads x 128), k and v 2560->1024 (8 KV heads),
    # o 4096->2560, gate and up 2560->9728, down 9728->2560; 36 layers.
    assert (c.text_layers, c.attn_width) == (36, 4096)
    assert c.p_lin == 36 * (2 * 2560 * 4096 + 2 * 2560 * 1024 + 3 * 2560 * 9728) == 3_633_315_840
    assert c.p_lora == 36 * 8 * (2 * (2560 + 4096) + 2 * (2560 + 1024) + 3 * (2560 + 9728))
    # Vision: a 3 x 2 x 16 x 16 patch to width 1024, 24 blocks (qkv, proj, fc1 and fc2 to 4096), and
    # four mergers (the final one and three deepstack ones) of 4 x 1024 -> 4096 -> 2560.
    assert c.p_patch == 1024 * 3 * 2 * 16 * 16 + 24 * (4 * 1024 ** 2 + 2 * 1024 * 4096)
    assert c.p_merge == 4 * (4096 ** 2 + 4096 * 2560) and c.merge == 2
    # With the embedding table (151936 x 2560) the counted weights are the published ~4.4 B parameters.
    assert 4.40e9 < c.p_lin + 151936 * 2560 + c.p_patch + c.p_merge < 4.46e9


def test_step_flops_by_hand():
    c = paper_scale.FlopCounts(text_layers=2, attn_width=8, p_lin=100, p_lora=10, vision_depth=1, vision_width=4,
                               p_patch=50, p_merge=20, merge=2)
    f = paper_scale.step_flops(c, lengths=[3, 5], patches=[8], n_chunks=2)
    attn = 4 * 2 * 8 * (3 ** 2 + 5 ** 2)  # 4 n_layers (H d) L^2, summed over rows = 2176
    assert f["text_forward"] == 2 * 110 * 8 + attn  # 2 (P_lin + P_lora) L + attention = 3936
    assert f["vision_forward"] == 2 * 50 * 8 + 2 * 20 * 8 // 4 + 4 * 1 * 4 * 8 ** 2  # patches, merged, attention
    assert f["text_backward"] == 2 * 100 * 8 + 4 * 10 * 8 + 2 * attn  # dX of frozen W, LoRA x2, attention x2
    assert f["total"] == 2 * (3936 + 1904) + 6272 == 17952  # GradCache: two forwards + one backward
    assert paper_scale.step_flops(c, [3, 5], [8], n_chunks=1)["total"] == 3936 + 1904 + 6272


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    """The test-size Qwen3-VL written in the hub layout and built as the benchmark builds it."""
    folder = tmp_path_factory.mktemp("paper_scale") / "qwen3vl-test"
    cfg = paper_scale.BenchConfig(size="test", device="cpu", batch=4, chunks=(2,), kinds=("cir",), warmup=1,
                                  steps=1, encode_images=4, encode_batch=2, peak_tflops=1.0,
                                  backbone_dir=str(folder))
    embedder, tcfg, qcfg, _, _ = paper_scale.build(cfg)
    return cfg, embedder, tcfg, qcfg


def test_flop_counts_match_the_modules_of_the_built_model(tiny_bench):
    import torch

    _, embedder, _, qcfg = tiny_bench
    c = paper_scale.flop_counts(qcfg, embedder.config.lora_r)
    lin = lora = patch = merge = 0
    for name, m in embedder.backbone.named_modules():  # every weight matrix the FLOP count must cover
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv3d)):
            continue
        if "lora_" in name:
            lora += m.weight.numel()  # r x in (A) + out x r (B)
        elif "language_model" in name:
            lin += m.weight.numel()
        elif "visual" in name:
            if "merger" in name:
                merge += m.weight.numel()
            else:
                patch += m.weight.numel()
        else:
            raise AssertionError(f"a weight matrix the FLOP count does not know: {name}")
    assert (lin, lora, patch, merge) == (c.p_lin, c.p_lora, c.p_patch, c.p_merge)


def test_paper_scale_runs_at_test_size_on_cpu(tiny_bench):
    import torch
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    cfg, embedder, tcfg, qcfg = tiny_bench
    before = {n: p.detach().clone() for n, p in embedder.named_parameters()}
    res = paper_scale.run(cfg, embedder, tcfg, qcfg)
    (row,) = res["rows"]
    # Built with the `paper` recipe, as a user of Qwen3-VL-4B-Instruct gets it: LoRA dropout 0.05,
    # the vision tower frozen, SDPA attention.
    assert embedder.config.recipe == "paper" and embedder.config.lora_dropout == 0.05 and not embedder.train_vision
    assert embedder.config.attn_implementation == "sdpa"
    # The step trained what `paper` trains (LoRA, summary tokens, calibrator) and nothing frozen.
    after = dict(embedder.named_parameters())
    moved = {n for n, p in after.items() if not torch.equal(p.detach(), before[n])}
    trainable = {n for n, p in after.items() if p.requires_grad}
    assert moved and moved <= trainable
    assert any("lora_B" in n for n in moved) and {"query_token", "target_token"} <= moved
    # The counted tokens are those of the batch the step saw: the sum of its attention masks.
    batch = paper_scale.make_batch(embedder, "cir", cfg.batch, cfg)
    assert row["tokens_per_step"] == sum(int(x.attention_mask.sum()) for x in batch.inputs)
    shape = paper_scale.batch_shape(batch)
    assert row["flops_per_step"] == paper_scale.step_flops(paper_scale.flop_counts(qcfg, 8), shape["lengths"],
                                                           shape["patches"], n_chunks=2)
    # A 640x480 photo reaches the vision tower at the paper's pixel budget (224^2 .. 256^2, 16-px
    # patches merged 2 x 2): 192 x 288 px -> 12 x 18 patches -> 54 visual tokens.
    h, w = smart_resize(480, 640, factor=32, min_pixels=224 * 224, max_pixels=256 * 256)
    assert (row["patches_per_photo"], row["visual_tokens_per_photo"]) == (h * w // 256, h * w // 1024) == (216, 54)
    assert row["images_per_step"] == 2 * cfg.batch  # a reference photo per query + a target per row
    # Every figure is there and positive; the MFU is the achieved rate over the given peak.
    for key in ("step_seconds_median", "tokens_per_step", "achieved_tflops", "peak_memory_bytes", "mfu"):
        assert row[key] > 0, key
    assert row["mfu"] == pytest.approx(row["achieved_tflops"] / 1.0)
    assert all(math.isfinite(x) for x in row["losses"]) and len(row["losses"]) == cfg.warmup + cfg.steps
    assert res["encode"]["encode_images_per_s"] > 0 and res["encode"]["encode_dim"] == embedder.dim
    # Trainable parameters by group, counted on the model, equal the counts derived from the config.
    t = res["trainable"]
    assert t["agree"] and t["counted"]["other"] == 0 and t["total"] == embedder.param_counts()["trainable"]
    # Each query text is as long as the median real U-FIRE instruction, in Qwen's own tokens.
    real = json.loads(paper_scale.PROMPT_LENGTHS.read_text())["qwen"]["real"]["instruction_text"]["median"]
    assert {len(embedder.tokenizer.encode(q.instruction, add_special_tokens=False)) for q in batch.queries} == {
        round(real)}
    assert res["header"]["device"] == "cpu" and res["header"]["versions"]["torch"] == torch.__version__


def test_paper_scale_cli_says_cpu_and_writes_json(tiny_bench, tmp_path, capsys):
    import json

    cfg, *_ = tiny_bench
    out = tmp_path / "paper_scale.json"
    rc = paper_scale.main(["--size", "test", "--device", "cpu", "--batch", "2", "--chunks", "1", "--kinds", "t2i",
                           "--steps", "1", "--warmup", "0", "--encode-images", "0",
                           "--backbone-dir", cfg.backbone_dir, "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert text.startswith("*** CPU RUN") and "NOT GPU figures" in text.splitlines()[-2]
    assert "wrote the random" not in text  # the fixture's checkpoint was reused (same size and seed)
    doc = json.loads(out.read_text())
    for key in ("date", "commit", "machine", "versions", "device", "dtype", "attn_implementation"):
        assert key in doc["header"], key
    assert doc["header"]["attn_implementation"] == "sdpa" and doc["peak_tflops"] is None  # no MFU on a CPU
    (row,) = doc["rows"]
    assert row["mfu"] is None and row["chunks_per_step"] == 2 and row["tokens_per_step"] > 0


def test_paper_scale_refuses_bad_flags(capsys):
    # --isolate starts one process per chunk size, each loading the same checkpoint: it needs a folder.
    assert paper_scale.main(["--size", "4b", "--device", "cpu", "--isolate"]) == 1
    assert capsys.readouterr().err.startswith("error: --isolate True: needs --backbone-dir")
    assert paper_scale.main(["--size", "test", "--device", "cpu", "--chunks", "8,x"]) == 1
    assert capsys.readouterr().err.startswith("error: --chunks '8,x'")


controlled = load_benchmark("controlled")


def test_controlled_run_names_round_trip():
    for exp, spec in controlled.EXPERIMENTS.items():
        for arm, over in spec["arms"].items():
            names = controlled.run_names(exp, arm, 3)
            parsed = [controlled.parse_name(n) for n in names]
            assert all(p[:2] == (exp, arm) and p[3] == 3 for p in parsed)
            # a 'separate' arm is one run per sub-dataset, a shared arm one run on all of them
            assert [p[2] for p in parsed] == (list(spec["subsets"]) if over.get("separate") else [None])


def test_controlled_tables_from_runs():
    def run(r1: dict, drawn: dict) -> dict:
        return {"rows": [{"subset": s, "recall": {"1": v, "10": v}} for s, v in r1.items()], "steps_by_subset": drawn}

    by_arm = {"ggas": [run({"t2i/A": 0.5, "sketch2i/B": 0.1}, {"t2i/A": 30, "sketch2i/B": 10}),
                       run({"t2i/A": 0.7, "sketch2i/B": 0.3}, {"t2i/A": 20, "sketch2i/B": 20})],
              "uniform": [run({"t2i/A": 0.4, "sketch2i/B": 0.2}, {"t2i/A": 20, "sketch2i/B": 20})] * 2}
    assert controlled.recall_of(by_arm["ggas"], 1) == pytest.approx({"t2i/A": 0.6, "sketch2i/B": 0.2, "mean": 0.4})
    table = controlled.recall_table(by_arm, 1)
    assert "| sketch2i/B | 20.0 | 20.0 |" in table and "| **mean** | 40.0 | 30.0 |" in table
    shares = controlled.share_table(by_arm)
    assert "| t2i/A | 62.5 | 50.0 |" in shares  # (30/40 + 20/40) / 2 for ggas


def test_ablation_end_to_end_with_two_workers(tmp_path):
    """Two variants x two seeds of 2 steps, trained by two worker processes: every run keeps its
    per-query ranks, and the paired bootstrap in the table is computed from them."""
    import json
    import subprocess

    runs, out, records = tmp_path / "runs", tmp_path / "r.json", tmp_path / "records"
    cmd = [sys.executable, str(BENCH / "ablation.py"), "--variants", "full,cal-off", "--seeds", "0,1", "--steps", "2",
           "--tasks", "t2i", "--jobs", "2", "--runs", str(runs), "--out", str(out), "--records", str(records)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=BENCH.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in runs.glob("worker*.txt")) == ["worker0.txt", "worker1.txt"]
    for name in ("full-s0-b2", "cal-off-s0-b2", "full-s1-b2", "cal-off-s1-b2"):
        run = json.loads((runs / name / "ablation_run.json").read_text())
        for row in run["rows"]:  # one rank per test query, and Recall@10 recomputed from them
            hits = sum(0 <= r < 10 for r in row["ranks"])
            assert row["recall"]["10"] == pytest.approx(hits / (len(row["ranks"]) + row["missing"]))
        # The committed record: the final step's validation ranks give the sum of R@1 train.py logged
        # at that step (the same model, last/), and the machine it ran on.
        rec = json.loads((records / f"{name}.json").read_text())
        final = rec["final_val"]
        assert final["sum_recall1"] == pytest.approx(sum(sum(r == 0 for r in rs) / len(rs)
                                                         for rs in final["ranks"].values()))
        assert rec["val_curve"][-1] == [2, pytest.approx(final["sum_recall1"])]
        assert rec["machine"]["cpu_model"] and rec["settings"] == run["settings"]
    # A fresh machine has the records only: the same command trains nothing and makes the same table.
    first = json.loads(out.read_text())["deltas_vs_full"]
    shutil.rmtree(runs)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=BENCH.parent)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(4 reused)" in again.stdout and not runs.joinpath("full-s0-b2").exists()
    assert json.loads(out.read_text())["deltas_vs_full"] == first
    doc = json.loads(out.read_text())
    delta = doc["deltas_vs_full"]["cal-off"]["overall"]["10"]
    per_seed = [doc["runs"][i]["overall"]["10"] - doc["runs"][i + 1]["overall"]["10"] for i in (0, 2)]  # full - cal-off
    assert delta["per_seed"] == pytest.approx(per_seed)
    assert delta["lo"] <= delta["diff"] <= delta["hi"]
    # the progression's "+ PGSQC" step is the same comparison (full - cal-off); "+ GGAS" needs the baseline
    assert doc["progression"]["+ PGSQC"]["overall"] == doc["deltas_vs_full"]["cal-off"]["overall"]
    assert "+ GGAS" not in doc["progression"]
    assert "What each removed piece was worth" in proc.stdout and "[reused]" in proc.stdout


# ---------------------------------------------------------------------------------------------
# Issue 30, rows 8, 12, 13: the verdict's edges, when a finished run is reused, the separate arm's steps
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lo, hi, want", [
    (0.0, 0.2, "within noise"),  # the interval touches 0: A > B is not shown
    (1e-9, 0.2, "holds"),  # the whole interval above 0
    (-0.2, 0.0, "within noise"),  # touches 0 from below: A < B is not shown either
    (-0.2, -1e-9, "contradicted"),
    (0.0, 0.0, "within noise"),  # a variant against itself
])
def test_verdict_at_the_edges_of_zero(lo, hi, want):
    assert ablation.verdict({"diff": (lo + hi) / 2, "lo": lo, "hi": hi}) == want


def test_a_variant_against_itself_is_within_noise():
    """The real paired bootstrap of identical runs: every difference is exactly 0, so no claim may hold."""
    runs = [_run({"t2i/A": _hits(h), "cir/B": _hits(h + 5)}) for h in (10, 20, 30)]
    checks = ablation.check_claims({"full": runs, "cal-off": runs, "samp-uniform": runs}, ks=(1, 10))
    assert checks and all(c["lo"] == c["hi"] == 0.0 and c["verdict"] == "within noise" for c in checks)


def _ablation_args():
    import types

    return types.SimpleNamespace(steps=2, eval_every=1, tasks="t2i", ood=False, max_eval_queries=2)


def test_run_settings_hold_the_default_jobs_training_config(monkeypatch):
    """A stored run is reused only if its settings match; they hold the default job's resolved
    TrainConfig (where it reads and writes aside), so a changed default (here the tiny-cpu recipe's
    lr) redoes every run instead of mixing runs of two configurations in one table."""
    import dataclasses

    import train
    from support import recipes

    settings = ablation.run_settings("full", 0, _ablation_args())
    want = {k: v for k, v in dataclasses.asdict(train.TrainConfig().resolved()).items()
            if k not in ("out", "data", "device")}
    assert settings["train_defaults"] == want and want["lr"] != 5e-4
    monkeypatch.setitem(recipes.RECIPES["tiny-cpu"]["train"], "lr", 5e-4)
    changed = ablation.run_settings("full", 0, _ablation_args())
    assert changed["train_defaults"] == {**want, "lr": 5e-4}
    assert {k: v for k, v in changed.items() if k != "train_defaults"} == \
        {k: v for k, v in settings.items() if k != "train_defaults"}


def test_a_finished_run_is_reused_only_with_the_same_settings(tmp_path, monkeypatch):
    """ablation.train_and_test's decision, without training: train.train is replaced by a function
    that says it was called. The stored file is written as train_and_test writes it (JSON, indent 1),
    so the settings also survive the round trip through JSON."""
    import json

    import train
    from support import recipes

    class Retrained(Exception):
        pass

    def no_training(cfg):
        raise Retrained(cfg.out)

    monkeypatch.setattr(train, "train", no_training)
    out = tmp_path / "full-s0"
    cfg = train.TrainConfig(out=str(out))
    settings = ablation.run_settings("full", 0, _ablation_args())

    def store():
        out.mkdir(exist_ok=True)
        (out / "ablation_run.json").write_text(json.dumps({"settings": settings, "overall": {"1": 0.25}}, indent=1))

    store()
    got = ablation.train_and_test(cfg, settings, [], None, False, {})
    assert got["reused"] is True and got["overall"] == {"1": 0.25}
    with pytest.raises(Retrained):  # --fresh retrains whatever is stored
        ablation.train_and_test(cfg, settings, [], None, True, {})
    store()
    monkeypatch.setitem(recipes.RECIPES["tiny-cpu"]["train"], "lr", 5e-4)  # a default changed since
    with pytest.raises(Retrained):
        ablation.train_and_test(cfg, ablation.run_settings("full", 0, _ablation_args()), [], None, False, {})
    assert not (out / "ablation_run.json").exists()  # the stale run is gone, not mixed in


@pytest.mark.parametrize("steps, per_subset", [(10, 3), (2, 1)])  # 10 // 3 sub-datasets; at least 1 step
def test_controlled_separate_arm_splits_the_step_budget(tmp_path, monkeypatch, steps, per_subset):
    """The 'separate' arm trains one model per sub-dataset; together they get the shared arm's
    compute (steps // n each), else separate models would win by training n times longer."""
    import types

    got = {}
    def train_and_test(cfg, settings, subsets, ufire, fresh, tags):  # records what would be trained
        got[settings["name"]] = (cfg, settings)

    monkeypatch.setattr(controlled.ablation, "train_and_test", train_and_test)
    args = types.SimpleNamespace(steps=steps, runs=str(tmp_path), device="cpu", jobs=1, fresh=False)
    subsets = ["inshop/SynInshop", "cir/SynCIR-Dress", "asfr/SynAttr"]  # the pgsqc experiment's three
    for arm in ("slerp", "separate"):
        for name in controlled.run_names("pgsqc", arm, 0):
            controlled.train_run(name, args, types.SimpleNamespace(root="/u-fire"))
    cfg, settings = got["pgsqc-slerp-s0"]
    assert (cfg.steps, settings["steps"], cfg.tasks) == (steps, steps, ",".join(subsets))
    for sub in subsets:
        cfg, settings = got[f"pgsqc-separate-{sub.replace('/', '_')}-s0"]
        assert (cfg.steps, settings["steps"], cfg.eval_every, cfg.tasks) == (per_subset, per_subset, per_subset, sub)
    assert len(got) == 4


# ------------------------------------------------------------------------------------------------
# issue 31: the GPU memory projection and the real prompt lengths
# ------------------------------------------------------------------------------------------------

def test_project_memory_fits_the_chunk_tokens_and_sums_the_parts():
    from support import recipes

    # Two measured chunk sizes whose step memory is exactly 1000 + 10 x (tokens in the chunk).
    rows = [{"chunk": c, "tokens_per_step": 100 * (c + 1), "batch": c + 1, "step_memory_bytes": 1000 + 10 * 100 * c}
            for c in (1, 4)]
    res = {"rows": rows, "param_bytes": {"all": 5000, "trainable": 200}}
    proj = paper_scale.project_memory(res)
    assert proj["bytes_per_chunk_token"] == pytest.approx(10) and proj["intercept_bytes"] == pytest.approx(1000)
    lengths = json.loads(paper_scale.PROMPT_LENGTHS.read_text())["qwen"]
    # compatibility/Polyvore: chunk 8 (the authors' train.py), up to 8 images of 64 tokens + markers.
    q = lengths["prompt_frame"]["query"] + lengths["real"]["instruction_text"]["max"] + 8 * 66
    t = lengths["prompt_frame"]["target"] + 66
    row = proj["per_subset"]["compatibility/Polyvore"]
    assert row["chunk"] == recipes.CHUNK_SIZES["compatibility/Polyvore"] == 8 and row["pair_tokens"] == q + t
    assert row["gib"] * 2 ** 30 == pytest.approx(5000 + 3 * 200 + 1000 + 10 * 8 * (q + t))
    assert proj["largest"]["gib"] == max(r["gib"] for r in proj["per_subset"].values())
    assert set(paper_scale.QUERY_IMAGES) == set(recipes.CHUNK_SIZES)  # every sub-dataset of the table is sized
    assert paper_scale.query_visual_tokens("video2img/MovingFashion") == 4 * (49 + 2 + 6)  # 8 frames at 224^2
    assert "needs two" in paper_scale.project_memory({"rows": rows[:1], "param_bytes": res["param_bytes"]})["note"]


def test_prompt_lengths_json_is_what_the_script_measures(shared_ufire):
    """benchmarks/prompt_lengths.json (read by paper_scale.py) holds what prompt_lengths.py measures on the
    real U-FIRE text now, and its prompt frames are the token counts of model.py's own prompt strings."""
    import model
    from support import hub_layout

    prompt_lengths = load_benchmark("prompt_lengths")
    got = prompt_lengths.measure(shared_ufire)
    saved = json.loads(paper_scale.PROMPT_LENGTHS.read_text())
    for name in ("qwen", "tiny"):
        assert saved[name] == json.loads(json.dumps(got[name])), name
    tok = hub_layout.build_tokenizer("qwen3_vl")
    frame = model._chat(model.QUERY_CLOSING, "")  # the summary token is one more token
    assert saved["qwen"]["prompt_frame"]["query"] == len(tok.encode(frame, add_special_tokens=False)) + 1
    records = json.loads((shared_ufire / "evaluation_only_tasks" / prompt_lengths.REAL_TASK
                          / "triplet_data.json").read_text())
    n = sorted(len(tok.encode(r["instruction_text"], add_special_tokens=False)) for r in records)
    assert saved["qwen"]["real"]["instruction_text"]["max"] == n[-1] and len(n) == 1000


def test_combine_merges_rows_and_refuses_what_is_not_one_size(tmp_path):
    """--combine joins chunk sizes measured in separate runs (a 4B CPU step takes many minutes each)."""
    def doc(size, chunk, mem):
        return {"header": {"size": size, "date": "d", "commit": "c", "device": "cpu"},
                "param_bytes": {"all": 10, "trainable": 1},
                "rows": [{"chunk": chunk, "tokens_per_step": 100 * (chunk + 1), "batch": chunk + 1,
                          "step_memory_bytes": mem}], "encode": {} if chunk > 1 else {"encode_images": 4}}
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    a.write_text(json.dumps(doc("4b", 1, 2000)))
    b.write_text(json.dumps(doc("4b", 2, 3000)))
    c.write_text(json.dumps(doc("test", 4, 1)))
    res = paper_scale.combine([a, b])
    assert [r["chunk"] for r in res["rows"]] == [1, 2] and res["encode"] == {"encode_images": 4}
    assert res["gpu_projection"]["bytes_per_chunk_token"] == pytest.approx(10)  # (3000 - 2000) / (200 - 100)
    with pytest.raises(paper_scale.FlagError, match="different sizes"):
        paper_scale.combine([a, c])
    c.write_text("[]")
    with pytest.raises(paper_scale.FlagError, match="not a paper_scale result"):
        paper_scale.combine([a, c])


def test_forward_only_probe_holds_the_graph_and_changes_nothing(tiny_bench):
    """--forward-only measures one chunk's forward with gradients kept (a CPU's memory probe at the 4B
    shape): the chunk's own tokens, forward FLOPs only, and no weight moves (no backward, no update)."""
    import dataclasses

    import torch

    cfg, embedder, _, qcfg = tiny_bench
    before = {n: p.detach().clone() for n, p in embedder.named_parameters()}
    probe = dataclasses.replace(cfg, forward_only=True)
    row = paper_scale.measure_step(embedder, None, paper_scale.flop_counts(qcfg, 8), "cir", 2, probe, None)
    batch = paper_scale.make_batch(embedder, "cir", 2, probe)
    assert row["batch"] == 2 and row["tokens_per_step"] == sum(int(x.attention_mask.sum()) for x in batch.inputs)
    shape = paper_scale.batch_shape(batch)
    f = paper_scale.step_flops(paper_scale.flop_counts(qcfg, 8), shape["lengths"], shape["patches"], n_chunks=1)
    assert row["flops_per_step"]["total"] == f["text_forward"] + f["vision_forward"]
    assert row["mode"].startswith("forward with gradients") and row["peak_memory_bytes"] > 0
    assert all(torch.equal(p.detach(), before[n]) for n, p in embedder.named_parameters())
    assert all(p.grad is None for p in embedder.parameters())


# ================================================================================================
# Issue 32: the budget rule (benchmarks/convergence.py) and lambda's attribution (lambda_dynamics.py)
# ================================================================================================

convergence = load_benchmark("convergence")


def _ranks(hits: int, n: int) -> list:
    """n validation queries of one sub-dataset, the first `hits` of them found at rank 0."""
    return [0] * hits + [5] * (n - hits)


def test_gain_is_the_mean_paired_difference_and_its_se_the_binomial_one():
    same = {"a/X": _ranks(10, 50), "b/Y": _ranks(20, 50)}
    assert convergence.gain_with_se([(same, same)] * 2, n_boot=200) == (0.0, 0.0)  # nothing moved: no noise either
    # Doubling the budget finds 10 more of 100 queries of one sub-dataset, in both seeds: G = 0.1 exactly, and
    # the paired difference per query is 1 for 10 %, 0 for the rest, so its SE is sqrt(0.1 * 0.9 / 100) / sqrt(2).
    before, after = {"a/X": _ranks(30, 100)}, {"a/X": _ranks(40, 100)}
    g, se = convergence.gain_with_se([(before, after)] * 2, n_boot=4000)
    assert g == pytest.approx(0.1)
    assert se == pytest.approx(math.sqrt(0.1 * 0.9 / 100) / math.sqrt(2), rel=0.08)


def _record(path, seed, steps, hits, cpu="AMD EPYC"):
    ranks = {"a/X": _ranks(hits[0], 100), "b/Y": _ranks(hits[1], 100)}
    doc = {"final_val": {"sum_recall1": convergence.sum_r1(ranks), "ranks": ranks}, "best": {"step": steps},
           "machine": {"cpu_model": cpu}, "train_seconds": 60.0 * steps / 1400}
    (path / f"full-s{seed}-b{steps}.json").write_text(json.dumps(doc))


def test_the_rule_picks_the_first_budget_whose_doubling_gains_less_than_one_se(tmp_path):
    # 1400 -> 2800 gains 0.4 (far beyond one SE, ~0.05); 2800 -> 5600 gains 2 queries in one sub-dataset and
    # loses 2 in the other: G = 0, below its SE (~0.014)
    for seed in (0, 1):
        for steps, hits in ((1400, (20, 20)), (2800, (40, 40)), (5600, (42, 38))):
            _record(tmp_path, seed, steps, hits)
    doc = convergence.apply_rule(tmp_path)
    first, second = doc["ladder"]
    assert first["gain"] == pytest.approx(0.4) and not first["converged"] and first["se"] > 0.03
    assert second["gain"] == pytest.approx(0.0, abs=1e-12) and second["converged"] and second["se"] > 0.005
    assert doc["converged_budget"] == 2800 and [r["steps"] for r in doc["budgets"]] == [1400, 2800, 5600]
    (tmp_path / "full-s1-b5600.json").unlink()  # a rung not finished yet: the rule waits for it
    assert convergence.apply_rule(tmp_path)["converged_budget"] is None
    _record(tmp_path, 1, 5600, (42, 38), cpu="Intel Xeon")  # a paired difference across two CPUs is refused
    with pytest.raises(SystemExit, match="different CPU models"):
        convergence.apply_rule(tmp_path)


def test_lambda_attribution_adds_up(tmp_path):
    """Six traced steps of the default job: the own-row and shared-layer parts sum to the exact change of
    lambda's mean logit, the regulariser never reaches lambda's row, AdamW's update splits into its two
    sources to float32 rounding, and the probe's two parts sum to its change."""
    import subprocess

    out = tmp_path / "l.json"
    proc = subprocess.run([sys.executable, str(BENCH / "lambda_dynamics.py"), "--steps", "6", "--run-dir",
                           str(tmp_path / "run"), "--out", str(out)], capture_output=True, text=True, timeout=600,
                          cwd=BENCH.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    (w,) = doc["windows"]
    assert w["steps"] == [1, 6]
    assert w["dl_exact"] == pytest.approx(w["own"] + w["shared"], abs=1e-5)
    assert w["own"] == pytest.approx(w["own_bias"] + w["own_weights"], abs=1e-6)
    assert w["reg_grad_on_row"] == 0.0 and w["update_split_error"] < 4
    first, last = doc["probe"]
    assert first["step"] == 0 and first["logit"] == pytest.approx(-3.0, abs=1e-3)  # the init bias: lambda = 0.047
    assert last["calibrator_part"] + last["input_part"] == pytest.approx(last["logit"] - first["logit"], abs=1e-5)


def test_a_seeds_variants_must_share_one_cpu_model(tmp_path, monkeypatch):
    """Records made on another CPU are reused only where the whole seed was made there: a seed half
    trained on an Intel Xeon is refused on an AMD EPYC before anything trains, naming the seed."""
    import types

    args = types.SimpleNamespace(**vars(_ablation_args()), quick=False, records=str(tmp_path))
    monkeypatch.setattr(ablation, "machine_info", lambda: {"cpu_model": "AMD EPYC"})

    def record(variant, seed, cpu):
        doc = {"settings": ablation.run_settings(variant, seed, args), "machine": {"cpu_model": cpu}}
        (tmp_path / f"{ablation.run_name(variant, seed, args.steps)}.json").write_text(json.dumps(doc))

    order = [(v, s) for s in (0, 1) for v in ("full", "baseline")]
    record("full", 0, "Intel Xeon")
    record("baseline", 0, "Intel Xeon")  # seed 0 complete on the Xeon: reused as it is
    record("full", 1, "AMD EPYC")  # seed 1 started here: its baseline may be trained here
    ablation.check_one_cpu_per_seed(order, args)
    record("full", 1, "Intel Xeon")  # now seed 1's baseline would be trained on another CPU than its full
    with pytest.raises(SystemExit, match="seed 1: .*Intel Xeon.*baseline would be trained here"):
        ablation.check_one_cpu_per_seed(order, args)
    record("baseline", 1, "AMD EPYC")  # complete, but mixed: refused too
    with pytest.raises(SystemExit, match="seed 1: .*AMD EPYC.*Intel Xeon"):
        ablation.check_one_cpu_per_seed(order, args)


def test_seed_advice_follows_the_issue_32_rule():
    st = lambda lo, hi: {"lo": lo, "hi": hi, "diff": (lo + hi) / 2}  # noqa: E731
    assert ablation.seed_advice(st(0.001, 0.05), 3) == "resolved"  # excludes 0
    assert ablation.seed_advice(st(-0.012, 0.012), 3) == "resolved"  # contains 0 but narrow (half-width 1.2)
    assert ablation.seed_advice(st(-0.02, 0.02), 3) == "add seeds"  # wide and contains 0
    assert ablation.seed_advice(st(-0.02, 0.02), 8) == "unresolved at 8 seeds"
