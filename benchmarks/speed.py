"""The performance figures: GradCache memory, encode throughput, search speed, where a training
step's time goes, end-to-end wall time.

What it measures (one run, one machine, printed as a markdown table and as ratios)
----------------------------------------------------------------------------------
1. GradCache memory. Peak resident memory of ONE training step (train.gradcache_step with a fixed
   chunk vs train.full_batch_step, the plain path) at batch 32, 64 and 128, on the synthetic
   `cir` sub-dataset (an image + a modification text per query). Each configuration runs in a
   fresh subprocess that builds the tiny embedder, runs a batch-2 warm-up step (so the .grad
   buffers exist), returns freed memory to the OS (malloc_trim) and then measures, with
   support.peak_memory.CpuPeak,

       step peak = highest RssAnon during the step - RssAnon just before it          (MiB)

   (anonymous memory sampled every ~1 ms and at the step's end, a lower bound: file pages, which the
   kernel may reclaim mid-step, do not count; "rss_before_mib" is VmRSS just before the step; the
   row's "method" says which way was used). On CPU this is what the step costs
   in RAM: activations kept for backward, plus allocator slack. GradCache should stay about flat
   as the batch grows (it keeps the graph of one chunk), the full batch grows ~linearly.
2. Encode throughput. items/s of embedder.encode_queries (a mix of every task's test queries) and
   embedder.encode_images (test gallery images, PNG decoding included, as evaluate.py does), at
   evaluate.py's batch size, set up as evaluate.py's command line does (one torch thread for the
   tiny model on a CPU, hence one encoding thread per core; LoRA merged on a CPU). Beside it, the
   same items through the old path in the same run: torch's own thread count, merge_lora=False and
   support.fast_encode.encode_threads patched to 1 (one batch at a time), with the speed-up. Share of the
   machine: the model's matmul work per item, estimated as

       FLOPs/item ~ 2 P_lm L  +  2 P_vis N_patch  +  4 n_layers L^2 D  (+ 2 P_cal for a query)

   (P_lm language-model parameters without the embedding table, L real prompt tokens including the
   visual tokens, P_vis vision-tower parameters, N_patch vision patches before merging, the L^2
   term for attention scores; padding, norms and activations are ignored), times items/s, divided
   by the GFLOP/s of a large fp32 matmul (N x N, best of 5) measured in the same run. A tiny model's
   small matrices reach only a few percent of it: the gap is overhead, not arithmetic.
3. Search. On random unit vectors (1,500 queries x 8,000 gallery x D, K = 50): fast_infer.search_faiss
   (the project's exact, tie-stable search), a bare faiss IndexFlatIP (add + search), a torch
   matmul + topk, and evaluate.search_torch (matmul + full stable sort, the readable reference).
   Best of 3; ratios against the bare faiss index.
4. Step-time shares. Where the time of a default training step goes, and how much of the input
   preparation the loader hides. Two in-process runs of the default setup, built as train.py builds
   it (train.setup on TrainConfig(tasks="all"), so its thread count, two-core step and loader
   apply), same seed, --share-warmup unmeasured then --share-steps measured steps of
   train.train_step: one with the default --loader thread, one with --loader off. Timers wrapped
   around the step's own functions (benchmark-only; train.py is not touched) report, in wall time per step
   (perf_counter on the main thread; the two towers run at once, so CPU time would double count):
       input        loader.get: the whole fast_train.prepare_batch with the loader off (measured there,
                    in the loop, rather than in a separate synchronous pass), the wait when thread
       forward      both towers        loss      train.info_nce
       backward     both towers        optimizer clip + AdamW + scheduler + zero_grad
       bookkeeping  the rest of the step: GGAS peek/update, token-gradient norm, seeding, log line
   and, per run, each as a share of its mean step. The loader's figures:
       hidden share = (mean step off - mean step thread) / preparation per step (also clipped to
                      [0, 1]), and the loader's hit rate hits / (hits + misses) over the measured steps.
5. Wall time of the two documented commands, as subprocesses: `python train.py --tasks all`
   (into runs/speed/train-default, so an existing runs/fashionlens-tiny is left alone; ~10 min)
   and `python evaluate.py --ckpt <run>/best`, cold (empty gallery cache) then warm (cache hit).
   `--skip-train` reuses an existing run (default runs/fashionlens-tiny) and reads its training
   time from its log instead.

Run it
------
    python benchmarks/speed.py                           # everything, ~15 min on 2 cores (10 of them training)
    python benchmarks/speed.py --skip-train              # reuse runs/fashionlens-tiny: ~5 min
    python benchmarks/speed.py --skip-train --run runs/X --batches 8,16 --n-queries 64 --n-images 128
    python benchmarks/speed.py --skip-train --no-wall    # no subprocess timing of train/evaluate
    python benchmarks/speed.py --no-wall --no-memory --share-steps 60   # encode, search, step shares: ~3 min
    python benchmarks/speed.py --no-shares               # without the two step-share runs (~1 min less)

Results: the tables on stdout and benchmarks/speed_results.json (--out; the step shares under
"step_shares"). Timings depend on what else runs on the machine: run it on idle cores. Every ratio
and share compares figures taken within ONE run on ONE machine; compare those, not absolute numbers
across machines or runs.

Shape legend: B batch, c chunk, D embedding size, G gallery, Q queries, K retrieved per query,
L sequence length.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ablation import machine_info, machine_line  # noqa: E402  (same machine header in both scripts)
from support.errors import FashionLensError, run_cli  # noqa: E402
from support.peak_memory import CpuPeak  # noqa: E402  (standard library only)


class BenchmarkError(FashionLensError):
    """A command the benchmark runs (train.py, evaluate.py, a memory worker) failed; names its log."""


# ================================================================================================
# Small helpers
# ================================================================================================


def best_time(fn, repeat: int) -> float:
    """Smallest wall time of `repeat` calls: the least disturbed by other work on the machine."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _malloc_trim() -> None:
    """Hand memory freed by earlier work back to the OS, so the step cannot hide in it."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def pct(x: float) -> str:
    return f"{100 * x:.2f} %"


# ================================================================================================
# 1. GradCache memory (one subprocess per configuration)
# ================================================================================================


def memory_worker(batch: int, chunk: int, subset: str) -> dict:
    """Runs in a fresh process: the memory one training step at (batch, chunk) adds at its peak."""
    import data
    from support import synthetic
    import train
    from model import EmbedderConfig, FashionLensEmbedder

    emb = FashionLensEmbedder(EmbedderConfig(seed=0, device="cpu"))
    emb.train()
    ufire = data.UFire(synthetic.ensure_synthetic("data/synthetic"))
    view = ufire.train_view([subset], **emb.query_options())
    n_rec = len(view.recs[subset])
    if batch > n_rec:
        raise SystemExit(f"error: {subset} has {n_rec} training records, fewer than batch {batch}")
    tau = train.TrainConfig().temperature
    warm = train.make_batch(view, subset, [0, 1], 0, 0)
    train.full_batch_step(emb, warm, tau)  # allocates .grad buffers and warms the kernels
    for p in emb.parameters():
        if p.grad is not None:
            p.grad.zero_()
    batch_data = train.make_batch(view, subset, list(range(batch)), 0, 1)  # images loaded before measuring
    gc.collect()
    _malloc_trim()
    torch_seed = 1234
    import torch

    torch.manual_seed(torch_seed)
    with CpuPeak() as mem:  # baseline: the resident set just before the step (model, data, imports)
        t0 = time.perf_counter()
        if chunk > 0:
            train.gradcache_step(emb, batch_data, tau, chunk_size=chunk)
        else:
            train.full_batch_step(emb, batch_data, tau)
        seconds = time.perf_counter() - t0
    before = None if mem.baseline_bytes is None else mem.baseline_bytes / 2 ** 20
    return {"batch": batch, "chunk": chunk, "subset": subset, "step_peak_mib": mem.step_bytes / 2 ** 20,
            "rss_before_mib": before, "step_seconds": seconds, "method": mem.kind}


def measure_memory(batches: list[int], chunk: int, subset: str) -> list[dict]:
    rows = []
    for b in batches:
        for c in (chunk, 0):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", str(b), str(c),
                   "--memory-subset", subset]
            p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if p.returncode != 0:
                last = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise BenchmarkError(f"memory worker (batch {b}, chunk {c}) failed (exit {p.returncode}): {last}")
            row = json.loads(p.stdout.strip().splitlines()[-1])
            rows.append(row)
            kind = f"GradCache c={c}" if c else "full batch"
            print(f"  memory: batch {b:>4} {kind:<14} step peak {row['step_peak_mib']:8.1f} MiB  "
                  f"step {row['step_seconds']:.1f}s", flush=True)
    return rows


# ================================================================================================
# 2. Encode throughput and its share of the machine's matmul throughput
# ================================================================================================


def matmul_gflops(n: int, repeat: int = 5) -> float:
    """fp32 GFLOP/s of an n x n @ n x n matmul (2 n^3 FLOPs), best of `repeat`."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)  # (n, n) each
    a @ b  # warm-up (thread pool, page faults)
    return 2 * n ** 3 / best_time(lambda: a @ b, repeat) / 1e9


def param_split(emb) -> dict:
    """Parameter counts by role: language model (no embedding table), vision tower, calibrator."""
    lm = vis = table = cal = 0
    for name, p in emb.named_parameters():
        n = p.numel()
        if name.startswith("calibrator."):
            cal += n
        elif ".visual." in name:
            vis += n
        elif "embed_tokens" in name or "lm_head" in name:
            table += n  # a lookup, not a matmul (lm_head is not used by the embedder)
        elif name.startswith("backbone."):
            lm += n
    return {"lm": lm, "vision": vis, "embedding_table": table, "calibrator": cal,
            **{f"total_{k}": v for k, v in emb.param_counts().items()}}


def flops_per_item(emb, params: dict, n_tokens: float, n_images: float, query: bool) -> float:
    """Estimated FLOPs to embed one item (see the module docstring for the formula)."""
    text = emb._base().config.text_config
    vcfg = emb._base().config.vision_config
    merge = int(vcfg.spatial_merge_size)
    patches = emb.image_tokens(64, 64) * merge ** 2  # N_patch of a 64 x 64 synthetic image, before merging
    vis_width = int(getattr(vcfg, "hidden_size", 0) or getattr(vcfg, "embed_dim", 0))
    if vis_width == int(text.hidden_size) and hasattr(vcfg, "embed_dim"):  # Qwen2-VL: hidden_size = output
        vis_width = int(vcfg.embed_dim)
    f = 2 * params["lm"] * n_tokens  # 2 P_lm L: every linear layer once per token
    f += 4 * int(text.num_hidden_layers) * n_tokens ** 2 * int(text.hidden_size)  # attention scores QK^T, AV
    f += n_images * (2 * params["vision"] * patches  # 2 P_vis N_patch
                     + 4 * int(vcfg.depth) * patches ** 2 * vis_width)  # vision attention (within an image)
    if query:
        f += 2 * params["calibrator"]  # PGSQC's hyper-network, once per query
    return float(f)


def _encode_seconds(emb, records: list, gallery: list, batch_size: int, merge_lora) -> tuple[float, float]:
    """Wall seconds to encode `records` (queries) and `gallery` (images), each after a 4-item warm-up."""
    emb.encode_queries(records[:4], batch_size=4, merge_lora=merge_lora)  # warm-up (kernels, caches)
    tq = time.perf_counter()
    emb.encode_queries(records, batch_size=batch_size, merge_lora=merge_lora)
    tq = time.perf_counter() - tq
    emb.encode_images(gallery[:4], batch_size=4, merge_lora=merge_lora)
    ti = time.perf_counter()
    emb.encode_images(gallery, batch_size=batch_size, merge_lora=merge_lora)
    return tq, time.perf_counter() - ti


def measure_encode(emb, ufire, n_queries: int, n_images: int, batch_size: int, peak_gflops: float) -> dict:
    """items/s of query and gallery encoding, the share of peak matmul throughput it reaches, and the
    same items through the old path (before merged LoRA and encoding threads) in the same run."""
    import torch

    from support import fast_infer

    test = ufire.subsets("test")
    per = max(1, n_queries // len(test))
    records, gallery = [], []
    for s in test:  # a mix of every task's queries, evenly spaced in each sub-dataset
        v = ufire.eval_view(s, split="test")
        records += fast_infer.few_queries(v, per).records  # the same spacing as evaluate's --max-queries
        gallery += [g for g in v.gallery if g not in gallery][: max(1, n_images // len(test) + 1)]
    records, gallery = records[:n_queries], gallery[:n_images]

    # Tokens per query: the real prompt length (visual tokens included, as collated) and the images it
    # carries (a video counts as its temporal groups: each is one image's worth of vision-tower work).
    n_tok, n_img = [], []
    for r in records:
        x = emb.collate_queries([r])
        n_tok.append(int(x.attention_mask.sum()))
        groups = 0 if x.video_grid_thw is None else int(x.video_grid_thw[:, 0].sum())
        n_img.append(int(x.images_per_row.sum()) + groups)
    tgt_tokens = int(emb.collate_images([gallery[0]]).attention_mask.sum())

    # The default path, set up as evaluate.py's command line does: one torch thread for a tiny model
    # on a CPU (so fast_encode.encode_threads gives one encoding thread per core) and LoRA merged on a CPU.
    from support import fast_encode, plumbing

    threads_before = torch.get_num_threads()
    try:
        default_threads = plumbing.set_cpu_threads(0, emb.device.type, small_model=emb.tiny)
        tq, ti = _encode_seconds(emb, records, gallery, batch_size, merge_lora=None)
        workers = fast_encode.encode_threads(emb.device)
        # The old path, as evaluate.py ran before: torch's own thread count, LoRA unmerged, one batch
        # at a time (encode_threads patched to 1 for the duration; the module's own function is restored).
        torch.set_num_threads(threads_before)
        saved = fast_encode.encode_threads
        fast_encode.encode_threads = lambda device: 1
        try:
            old_q, old_i = _encode_seconds(emb, records, gallery, batch_size, merge_lora=False)
        finally:
            fast_encode.encode_threads = saved
    finally:
        torch.set_num_threads(threads_before)  # what the rest of the benchmark found

    params = param_split(emb)
    mean_tok, mean_img = sum(n_tok) / len(n_tok), sum(n_img) / len(n_img)
    fq = sum(flops_per_item(emb, params, t, i, True) for t, i in zip(n_tok, n_img)) / len(n_tok)
    fi = flops_per_item(emb, params, tgt_tokens, 1, False)
    out = {"params": params, "batch_size": batch_size, "peak_matmul_gflops": peak_gflops,
           "default_path": {"torch_threads": default_threads, "encode_threads": workers,
                            "merge_lora": emb.device.type == "cpu"},
           "old_path": {"torch_threads": threads_before, "encode_threads": 1, "merge_lora": False}}
    for name, n, secs, old, fl, tok, img in (
            ("queries", len(records), tq, old_q, fq, mean_tok, mean_img),
            ("gallery images", len(gallery), ti, old_i, fi, tgt_tokens, 1)):
        ips = n / secs  # items per second
        achieved = ips * fl / 1e9  # GFLOP/s the model's matmuls actually ran at
        out[name] = {"items": n, "seconds": secs, "items_per_s": ips, "tokens_per_item": tok,
                     "images_per_item": img, "gflop_per_item": fl / 1e9, "achieved_gflops": achieved,
                     "share_of_peak": achieved / peak_gflops, "old_path_seconds": old,
                     "old_path_items_per_s": n / old, "speedup_vs_old_path": old / secs}
        print(f"  encode {name}: {ips:.1f} items/s, ~{fl / 1e6:.1f} MFLOP/item -> {achieved:.2f} GFLOP/s "
              f"= {pct(achieved / peak_gflops)} of the {peak_gflops:.1f} GFLOP/s matmul; old path "
              f"{n / old:.1f} items/s ({old / secs:.2f}x)", flush=True)
    return out


# ================================================================================================
# 3. Search
# ================================================================================================


def measure_search(n_q: int, n_g: int, dim: int, k: int, repeat: int = 3) -> dict:
    import faiss
    import numpy as np
    import torch

    import evaluate
    from support import fast_infer

    rng = np.random.default_rng(0)
    q = rng.standard_normal((n_q, dim)).astype(np.float32)  # (Q, D)
    g = rng.standard_normal((n_g, dim)).astype(np.float32)  # (G, D)
    q /= np.linalg.norm(q, axis=1, keepdims=True)  # unit rows: inner product = cosine
    g /= np.linalg.norm(g, axis=1, keepdims=True)

    def bare_faiss():
        index = faiss.IndexFlatIP(dim)
        index.add(g)
        return index.search(q, k)  # (Q, K), (Q, K)

    def torch_topk():
        sims = torch.from_numpy(q) @ torch.from_numpy(g).T  # (Q, G)
        return torch.topk(sims, k, dim=1)  # (Q, K) values, indices

    fns = {"evaluate.search_faiss (project: exact, tie-stable)":  # the label keeps its name in speed_results.json
           lambda: fast_infer.search_faiss(q, g, k, reference=evaluate.search_torch),
           "bare faiss IndexFlatIP (add + search)": bare_faiss,
           "torch matmul + topk": torch_topk,
           "evaluate.search_torch (matmul + stable full sort, reference)": lambda: evaluate.search_torch(q, g, k)}
    times = {}
    for name, fn in fns.items():
        fn()  # warm-up
        times[name] = best_time(fn, repeat)
    base = times["bare faiss IndexFlatIP (add + search)"]
    _, ids_p = fast_infer.search_faiss(q, g, k, reference=evaluate.search_torch)
    _, ids_r = evaluate.search_torch(q, g, k)
    ids_t = torch_topk().indices.numpy()
    out = {"queries": n_q, "gallery": n_g, "dim": dim, "k": k, "faiss_threads": faiss.omp_get_max_threads(),
           "seconds": times, "ratio_to_bare_faiss": {n: t / base for n, t in times.items()},
           "project_equals_reference": bool(np.array_equal(ids_p, ids_r)),
           "topk_sets_equal_reference": bool(all(set(a) == set(b) for a, b in zip(ids_t, ids_r)))}
    for n, t in times.items():
        print(f"  search: {n}: {1000 * t:.1f} ms ({t / base:.2f}x bare faiss)", flush=True)
    return out


# ================================================================================================
# 4. Step-time shares: where a default training step's time goes, and what the loader hides
# ================================================================================================
# Benchmark-only instrumentation: train.py stays as it is; for the duration of a measurement the
# step functions it calls are wrapped in timers (train_step looks them up at call time), and so are
# the optimizer / loader calls. Everything is timed with perf_counter on the main
# thread: the two towers run at once, so a phase's cost is its wall time, not its CPU time.

SHARE_PHASES = (  # (key, what the table row says): they add up to the step's wall time
    ("input", "input preparation (`loader.get`: the whole `prepare_batch` when off, the wait for the worker with a thread)"),
    ("forward", "forward: query and target towers (wall)"),
    ("loss", "loss: InfoNCE (`train.info_nce`)"),
    ("backward", "backward: query and target towers (wall)"),
    ("optimizer", "optimizer: clip + AdamW + scheduler + zero_grad"),
    ("bookkeeping", "bookkeeping: GGAS peek/update, token-gradient norm, loader submit, seeding, log line"),
)


class PhaseClock:
    """Wall seconds per phase of the current training step, added up by the timers below."""

    def __init__(self):
        self.step: dict = {}

    def add(self, phase: str, seconds: float) -> None:
        self.step[phase] = self.step.get(phase, 0.0) + seconds

    def take(self) -> dict:
        """This step's phases, leaving a clean slate for the next step."""
        out, self.step = self.step, {}
        return out


def timed_step(clock: PhaseClock, step_fn):
    """fast_train.two_core_step or train.full_batch_step itself, timed by phase without a copy of it.

    Forward runs from the call to L's first use (train.info_nce: both towers are done by then), the
    loss is info_nce itself, backward is the rest of the step (with L's small backward to q and t).
    """
    import train

    real_nce, marks = train.info_nce, {}

    def nce(*args, **kwargs):  # info_nce, marking when it starts and ends
        marks["loss_start"] = time.perf_counter()
        try:
            return real_nce(*args, **kwargs)
        finally:
            marks["loss_end"] = time.perf_counter()

    @functools.wraps(step_fn)
    def step(*args, **kwargs):
        t0 = time.perf_counter()
        train.info_nce = nce  # the step looks info_nce up in train's namespace at call time
        try:
            out = step_fn(*args, **kwargs)
        finally:
            train.info_nce = real_nce
        clock.add("forward", marks["loss_start"] - t0)
        clock.add("loss", marks["loss_end"] - marks["loss_start"])
        clock.add("backward", time.perf_counter() - marks["loss_end"])
        return out

    return step


def _timed(clock: PhaseClock, phase: str, fn):
    """fn, adding its wall time to `phase` (functools.wraps keeps the attributes torch's lr
    scheduler marks optimizer.step with, so it does not warn about an overridden step)."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            clock.add(phase, time.perf_counter() - t0)

    return call


@contextlib.contextmanager
def instrumented(run, clock: PhaseClock):
    """train.train_step on `run`, timed by phase: the module-level swaps are undone on exit; the
    run's own objects keep their wrappers (the benchmark's runs are thrown away afterwards)."""
    import torch

    import train
    from support import fast_train

    saved = [(fast_train, "two_core_step", fast_train.two_core_step), (train, "full_batch_step", train.full_batch_step),
             (torch.nn.utils, "clip_grad_norm_", torch.nn.utils.clip_grad_norm_)]
    fast_train.two_core_step = timed_step(clock, fast_train.two_core_step)
    train.full_batch_step = timed_step(clock, train.full_batch_step)  # also what a one-chunk gradcache_step calls
    torch.nn.utils.clip_grad_norm_ = _timed(clock, "optimizer", torch.nn.utils.clip_grad_norm_)
    run.optimizer.step = _timed(clock, "optimizer", run.optimizer.step)
    run.optimizer.zero_grad = _timed(clock, "optimizer", run.optimizer.zero_grad)
    run.scheduler.step = _timed(clock, "optimizer", run.scheduler.step)
    run.loader.get = _timed(clock, "input", run.loader.get)
    try:
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def run_default_steps(loader: str, steps: int, warmup: int, folder: Path) -> dict:
    """Build the default training setup as train.py does (loader mode aside), run warmup + steps of
    train.train_step, and return the mean ms per phase over the last `steps` and the loader's counts."""
    import io

    import torch

    import train

    cfg = train.TrainConfig(tasks="all", steps=steps + warmup, out=str(folder / loader), final_test=False,
                            eval_every=10 ** 9, loader=loader)
    with contextlib.redirect_stdout(io.StringIO()):  # setup prints the resolved configuration
        run = train.setup(cfg, None)
    clock, rows, losses, subsets = PhaseClock(), [], [], []
    try:
        with instrumented(run, clock):
            run.t_prev = time.time()
            for i in range(warmup + steps):
                if i == warmup:  # count the loader over the measured steps only
                    hits0, misses0 = run.loader.stats.hits, run.loader.stats.misses
                clock.take()
                t0 = time.perf_counter()
                so, subset = train.train_step(run)
                wall = time.perf_counter() - t0
                phases = clock.take()
                if i >= warmup:
                    rows.append({**phases, "step": wall})
                    losses.append(so.loss)
                    subsets.append(subset)
        stats = run.loader.stats
        out = {"loader": loader, "torch_threads": torch.get_num_threads(),
               "path": "two_core_step" if run.spare is not None else "full_batch_step",
               "hits": stats.hits - hits0, "misses": stats.misses - misses0, "losses": losses, "subsets": subsets}
    finally:
        run.loader.close()
        if run.spare is not None:
            run.spare.shutdown()
    ms = {k: 1000 * sum(r.get(k, 0.0) for r in rows) / len(rows) for k, _ in SHARE_PHASES if k != "bookkeeping"}
    ms["step"] = 1000 * sum(r["step"] for r in rows) / len(rows)
    ms["bookkeeping"] = ms["step"] - sum(ms[k] for k, _ in SHARE_PHASES if k != "bookkeeping")  # the rest
    out["ms"] = ms
    return out


def share_summary(off: dict, thread: dict, hits: int, misses: int) -> dict:
    """Shares of each run's mean step and the loader's figures, from mean ms per phase (with "step").

    prep      = the input time per step with the loader off (the whole prepare_batch, in the loop)
    hidden    = (step_off - step_thread) / prep: the share of preparation the worker takes off a step
                (below 0: the worker costs more than it saves; above 1: more than prep was saved)
    off_loop  = 1 - wait_thread / prep: the share of preparation no longer waited for in the loop;
                off_loop - hidden is what the worker thread costs the other phases (the GIL, the cores)
    """
    prep = off["input"]
    hidden = (off["step"] - thread["step"]) / prep if prep > 0 else float("nan")
    return {"ms": {"off": off, "thread": thread},
            "share": {name: {k: v / run["step"] for k, v in run.items()} for name, run in
                      (("off", off), ("thread", thread))},
            "prep_ms": prep, "prep_share_of_default_step": prep / thread["step"],
            "hidden_share_unclipped": hidden, "hidden_share": min(1.0, max(0.0, hidden)),
            "off_loop_share": 1 - thread["input"] / prep if prep > 0 else float("nan"),
            "loader_hits": hits, "loader_misses": misses,
            "hit_rate": hits / (hits + misses) if hits + misses else float("nan")}


def measure_step_shares(args) -> dict:
    """Where a default training step's time goes, and the share of input preparation the loader hides.

    Two in-process runs of the default setup (train.setup on train.TrainConfig(tasks="all"), so the
    default thread count and the two-core step apply), same seed and steps, into a
    temporary folder under runs/speed: loader "thread" and loader "off". Both run
    --share-warmup steps, then --share-steps measured ones, with the same instrumentation.
    The input preparation a step would cost in the loop is measured in the run with loader "off"
    (where `loader.get` IS `prepare_batch`, in the caller), not by a separate synchronous pass.
    """
    import torch

    threads_before = torch.get_num_threads()  # train.setup sets 1 thread for the tiny model
    root = REPO / "runs" / "speed"
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="step-shares-", dir=root))
    runs = {}
    try:
        for loader in ("thread", "off"):
            runs[loader] = r = run_default_steps(loader, args.share_steps, args.share_warmup, folder)
            gc.collect()
            print(f"  shares: loader {loader}: {args.share_steps} steps ({r['path']}, {r['torch_threads']} "
                  f"torch thread(s)), mean step {r['ms']['step']:.1f} ms, input {r['ms']['input']:.1f} ms",
                  flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        torch.set_num_threads(threads_before)
    th, off = runs["thread"], runs["off"]
    out = share_summary(off["ms"], th["ms"], th["hits"], th["misses"])
    loss_diff = max(abs(a - b) for a, b in zip(th["losses"], off["losses"]))
    out.update(steps=args.share_steps, warmup=args.share_warmup, path=th["path"],
               torch_threads=th["torch_threads"], same_subsets=th["subsets"] == off["subsets"],
               max_loss_difference=loss_diff)
    print(f"  shares: hidden share {out['hidden_share_unclipped']:.2f} (clipped {out['hidden_share']:.2f}), "
          f"loader hit rate {pct(out['hit_rate'])}; the two runs drew the same sub-datasets: "
          f"{out['same_subsets']}, max |loss difference| {loss_diff:.1e}", flush=True)
    return out


# ================================================================================================
# 5. Wall time of the documented commands
# ================================================================================================


def timed(cmd: list[str], log: Path) -> float:
    """Run cmd from the repository root, its output into `log`; wall seconds (raises on failure)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    secs = time.perf_counter() - t0
    if p.returncode != 0:
        raise BenchmarkError(f"`{' '.join(cmd)}` failed (exit {p.returncode}); see {log}")
    return secs


def measure_wall(args) -> dict:
    out: dict = {}
    logs = REPO / "runs" / "speed"
    logs.mkdir(parents=True, exist_ok=True)
    if args.skip_train:
        run = Path(args.run)
        if not (REPO / run / "best").is_dir():
            raise SystemExit(f"error: --skip-train needs an existing run: {run}/best not found "
                             f"(train one with `python train.py --tasks all`, or pass --run)")
        secs = None
        try:  # the run's own clock: the last logged step's time (training only, no final test)
            lines = [json.loads(x) for x in (REPO / run / "log.jsonl").read_text().splitlines() if x.strip()]
            secs = max(float(x["time"]) for x in lines if "time" in x)
        except (OSError, ValueError):
            pass
        steps = "?"
        try:  # say what that run was: a run with other settings is not the default command
            steps = json.loads((REPO / run / "config.json").read_text())["resolved"]["total_steps"]
        except (OSError, ValueError, KeyError):
            pass
        out["train"] = {"command": f"train.py run {run} ({steps} steps; not re-run)", "seconds": secs,
                        "measured": False, "note": "from the run's log.jsonl: training steps + validations, "
                                                   "without data generation, start-up and the final test"}
    else:
        run = Path("runs/speed/train-default")
        shutil.rmtree(REPO / run, ignore_errors=True)  # ours: a previous speed.py run
        extra = args.train_extra.split()  # only for smoke-testing this script (e.g. "--steps 3")
        cmd = [sys.executable, "train.py", "--tasks", "all", "--out", str(run), *extra]
        shown = " ".join(["python train.py --tasks all --out", str(run), *extra])
        print(f"  wall: running `{shown}` (~10 min with the defaults) ...", flush=True)
        out["train"] = {"command": shown, "measured": True, "seconds": timed(cmd, logs / "train_output.txt")}
        print(f"  wall: train {out['train']['seconds']:.0f}s", flush=True)
    cache = Path(tempfile.mkdtemp(prefix="speed-gallery-", dir=REPO / "runs" / "speed"))
    try:
        cmd = [sys.executable, "evaluate.py", "--ckpt", str(run / "best"), "--cache-dir", str(cache)]
        cold = timed(cmd, logs / "evaluate_cold.txt")
        warm = timed(cmd, logs / "evaluate_warm.txt")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    out["evaluate_cold"] = {"command": f"python evaluate.py --ckpt {run}/best  (empty gallery cache)",
                            "seconds": cold, "measured": True}
    out["evaluate_warm"] = {"command": f"python evaluate.py --ckpt {run}/best  (gallery cached)",
                            "seconds": warm, "measured": True}
    print(f"  wall: evaluate cold {cold:.0f}s, warm {warm:.0f}s", flush=True)
    return out


# ================================================================================================
# Report
# ================================================================================================


def report(res: dict) -> str:
    """The markdown tables (memory, encode, search, step shares, wall), each fast path as a ratio to its
    reference."""
    lines = []
    mem = res.get("memory")
    if mem:
        full = {r["batch"]: r for r in mem if r["chunk"] == 0}
        gcr = {r["batch"]: r for r in mem if r["chunk"] > 0}
        b0 = min(full)
        chunk = next(iter(gcr.values()))["chunk"] if gcr else 0
        lines += [f"**GradCache memory** (peak memory one training step allocates, above the process's "
                  f"resident set before it; `{mem[0]['subset']}` batches; {mem[0]['method']})", "",
                  f"| batch | full batch (MiB) | GradCache c={chunk} (MiB) | GradCache / full | "
                  f"full vs batch {b0} | GradCache vs batch {b0} | step time GradCache / full |",
                  "|---|---|---|---|---|---|---|"]
        for b in sorted(full):
            f, g = full[b], gcr.get(b)
            if g is None:
                continue
            lines.append(f"| {b} | {f['step_peak_mib']:.0f} | {g['step_peak_mib']:.0f} | "
                         f"{g['step_peak_mib'] / f['step_peak_mib']:.2f} | "
                         f"{f['step_peak_mib'] / full[b0]['step_peak_mib']:.2f}x | "
                         f"{g['step_peak_mib'] / gcr[b0]['step_peak_mib']:.2f}x | "
                         f"{g['step_seconds'] / f['step_seconds']:.2f} |")
        lines.append("")
    enc = res.get("encode")
    if enc:
        p = enc["params"]
        lines += [f"**Encode throughput** (batch {enc['batch_size']}; fp32 matmul peak "
                  f"{enc['peak_matmul_gflops']:.1f} GFLOP/s; parameters: LM {p['lm'] / 1e6:.2f} M, "
                  f"vision {p['vision'] / 1e6:.2f} M, calibrator {p['calibrator'] / 1e6:.2f} M, "
                  f"embedding table {p['embedding_table'] / 1e6:.2f} M)", "",
                  "| items | items/s | old path items/s | vs old path | tokens/item | images/item | "
                  "est. MFLOP/item | achieved GFLOP/s | share of matmul peak |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name in ("queries", "gallery images"):
            e = enc[name]
            old = (f"{e['old_path_items_per_s']:.1f} | {e['speedup_vs_old_path']:.2f}x" if "old_path_items_per_s" in e
                   else "n/a | n/a")
            lines.append(f"| {name} ({e['items']}) | {e['items_per_s']:.1f} | {old} | {e['tokens_per_item']:.0f} | "
                         f"{e['images_per_item']:.1f} | {1000 * e['gflop_per_item']:.1f} | "
                         f"{e['achieved_gflops']:.2f} | {pct(e['share_of_peak'])} |")
        if "old_path" in enc:
            d, o = enc["default_path"], enc["old_path"]
            lines += ["", f"Default path: {d['torch_threads']} torch thread(s), {d['encode_threads']} encoding "
                          f"thread(s), LoRA merged: {d['merge_lora']}. Old path (evaluate.py before): "
                          f"{o['torch_threads']} torch thread(s), one batch at a time, LoRA unmerged. "
                          f"Same items, same run."]
        lines.append("")
    se = res.get("search")
    if se:
        lines += [f"**Search** ({se['queries']:,} queries x {se['gallery']:,} gallery x D={se['dim']}, "
                  f"K={se['k']}, best of 3; project == reference: {se['project_equals_reference']})", "",
                  "| method | ms | vs bare faiss |", "|---|---|---|"]
        for n, t in se["seconds"].items():
            lines.append(f"| {n} | {1000 * t:.1f} | {se['ratio_to_bare_faiss'][n]:.2f}x |")
        lines.append("")
    sh = res.get("step_shares")
    if sh:
        lines += share_table(sh) + [""]
    wall = res.get("wall")
    if wall:
        lines += ["**Wall time**", "", "| command | seconds | minutes | |", "|---|---|---|---|"]
        for w in wall.values():
            s = w["seconds"]
            cell = "n/a | n/a" if s is None else f"{s:.0f} | {s / 60:.1f}"
            note = "measured now" if w["measured"] else w.get("note", "")
            lines.append(f"| `{w['command']}` | {cell} | {note} |")
        lines.append("")
    return "\n".join(lines)


def share_table(sh: dict) -> list[str]:
    """The step-time shares as markdown lines: the phase table, then the loader's figures."""
    off, th = sh["ms"]["off"], sh["ms"]["thread"]
    lines = [f"**Step-time shares** (default `train.py --tasks all` steps, {sh['path']}, "
             f"{sh['torch_threads']} torch thread(s); mean of {sh['steps']} steps after {sh['warmup']}, "
             f"one run per loader mode, same seed)", "",
             "| phase | loader off: ms per step | share of step | loader thread: ms per step | "
             "share of step |", "|---|---|---|---|---|"]
    for key, label in SHARE_PHASES + (("step", "**step (mean wall time)**"),):
        lines.append(f"| {label} | {off[key]:.1f} | {pct(off[key] / off['step'])} | {th[key]:.1f} | "
                     f"{pct(th[key] / th['step'])} |")
    hits, misses = sh["loader_hits"], sh["loader_misses"]
    lines += ["",
              f"- input preparation (`prepare_batch` in the loop, loader off): {sh['prep_ms']:.1f} ms per step "
              f"= {pct(sh['prep_share_of_default_step'])} of the default step",
              f"- mean step: loader off {off['step']:.1f} ms, loader thread {th['step']:.1f} ms; hidden share "
              f"= (off - thread) / preparation = {sh['hidden_share_unclipped']:.2f} (clipped to [0, 1]: "
              f"{sh['hidden_share']:.2f})",
              f"- preparation taken out of the loop (1 - wait / preparation): {sh['off_loop_share']:.2f}; "
              f"the difference to the hidden share is what the worker costs the other phases",
              f"- loader hit rate {hits}/{hits + misses} = {pct(sh['hit_rate'])} (a miss is prepared in the loop)"]
    return lines


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--batches", default="32,64,128", help="batch sizes for the memory comparison")
    ap.add_argument("--chunk", type=int, default=16, help="GradCache chunk size for the memory comparison")
    ap.add_argument("--memory-subset", default="cir/SynCIR-Top", help="training sub-dataset the batches come from")
    ap.add_argument("--ckpt", default=None, help="checkpoint for the encode benchmark (default: a fresh tiny "
                                                 "embedder; speed does not depend on trained weights)")
    ap.add_argument("--n-queries", type=int, default=260, help="queries to encode (mixed over all tasks)")
    ap.add_argument("--n-images", type=int, default=512, help="gallery images to encode")
    ap.add_argument("--encode-batch", type=int, default=64, help="encode batch size (evaluate.py's default)")
    ap.add_argument("--matmul-n", type=int, default=2048, help="size N of the N x N fp32 reference matmul")
    ap.add_argument("--search", default="1500,8000", help="queries,gallery for the search benchmark")
    ap.add_argument("--search-dim", type=int, default=0, help="embedding size D for search (0 = the model's)")
    ap.add_argument("--k", type=int, default=50, help="K retrieved per query (evaluate.py's largest default K)")
    ap.add_argument("--skip-train", action="store_true", help="do not run train.py; time evaluate.py on --run")
    ap.add_argument("--run", default="runs/fashionlens-tiny", help="existing run for --skip-train")
    ap.add_argument("--train-extra", default="", help="extra train.py flags for the wall-time run, only to "
                                                      "smoke-test this script (e.g. '--steps 3'); '' = the default")
    ap.add_argument("--no-wall", action="store_true", help="skip the train.py / evaluate.py wall times")
    ap.add_argument("--no-memory", action="store_true", help="skip the GradCache memory measurement")
    ap.add_argument("--no-shares", action="store_true", help="skip the step-time shares (two in-process runs "
                                                             "of the default training steps)")
    ap.add_argument("--share-warmup", type=int, default=5, help="step-time shares: unmeasured steps first")
    ap.add_argument("--share-steps", type=int, default=60, help="step-time shares: measured default steps "
                                                                "per loader mode")
    ap.add_argument("--out", default="benchmarks/speed_results.json", help="results JSON")
    ap.add_argument("--memory-worker", nargs=2, type=int, metavar=("BATCH", "CHUNK"), help=argparse.SUPPRESS)
    return ap


def _ints(flag: str, text: str, n: int = 0) -> list[int]:
    """'32,64' -> [32, 64], each >= 1 (and exactly n of them when n > 0), or one `error:` line."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1 or (n and len(values) != n):
        what = f"{n} comma-separated integers >= 1" if n else "comma-separated integers >= 1"
        raise SystemExit(f"error: {flag} {text!r}: expected {what}")
    return values


def check_args(args) -> None:
    """Every flag in range before anything is measured or written (one `error: --flag` line each)."""
    _ints("--batches", args.batches)
    q_g = _ints("--search", args.search, n=2)
    for flag, value, least in (("--chunk", args.chunk, 1), ("--n-queries", args.n_queries, 1),
                               ("--n-images", args.n_images, 1), ("--encode-batch", args.encode_batch, 1),
                               ("--matmul-n", args.matmul_n, 1), ("--search-dim", args.search_dim, 0),
                               ("--k", args.k, 1), ("--share-steps", args.share_steps, 1),
                               ("--share-warmup", args.share_warmup, 0)):
        if value < least:
            raise SystemExit(f"error: {flag} {value}: must be >= {least}")
    if args.k > q_g[1]:
        raise SystemExit(f"error: --k {args.k}: more than the {q_g[1]} gallery items of --search {args.search}")
    if args.skip_train and not args.no_wall and not (REPO / args.run / "best").is_dir():
        raise SystemExit(f"error: --run {args.run}: --skip-train needs an existing run, and {args.run}/best "
                         f"is not there (train one with `python train.py --tasks all`, or pass --run)")
    from support import plumbing  # the project's own checks (imports torch)

    plumbing.check_writable("--out", args.out, folder=False)
    if not (args.no_shares and args.no_wall):  # both write their runs and logs under runs/speed
        plumbing.check_writable("the benchmark's run folder", "runs/speed")


def main(argv=None) -> int:
    """The command line, through errors.run_cli: bad flags, data or checkpoints give one `error:` line."""
    return run_cli(_main, argv)


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.chdir(REPO)
    from support import plumbing  # before torch: it sets OpenMP's wait policy for shared cores

    if args.memory_worker:
        print(json.dumps(memory_worker(*args.memory_worker, subset=args.memory_subset)))
        return 0
    check_args(args)
    import torch  # noqa: F401  (so machine_info reports torch's threads)

    import data
    from support import synthetic

    if not args.no_memory:  # the memory workers read this sub-dataset: check it (and its size) here
        recs = data.UFire(synthetic.ensure_synthetic("data/synthetic")).records(args.memory_subset, "train")
        if max(_ints("--batches", args.batches)) > len(recs):
            raise SystemExit(f"error: --batches {args.batches}: {args.memory_subset} has only {len(recs)} "
                             f"training records")
    info = machine_info()
    print("# FashionLens speed benchmark")
    print(machine_line(info), flush=True)
    given = argv if argv is not None else sys.argv[1:]
    res: dict = {"machine": info, "command": " ".join(["python", "benchmarks/speed.py", *given])}
    t0 = time.time()

    if not args.no_memory:
        print("GradCache memory (one subprocess per configuration):", flush=True)
        res["memory"] = measure_memory([int(b) for b in args.batches.split(",")], args.chunk, args.memory_subset)

    print("Encode throughput:", flush=True)
    from model import EmbedderConfig, FashionLensEmbedder

    emb = (FashionLensEmbedder.from_pretrained(args.ckpt, device="cpu") if args.ckpt
           else FashionLensEmbedder(EmbedderConfig(device="cpu")))
    ufire = data.UFire(synthetic.ensure_synthetic("data/synthetic"))
    peak = matmul_gflops(args.matmul_n)
    print(f"  fp32 matmul {args.matmul_n}x{args.matmul_n}: {peak:.1f} GFLOP/s (best of 5)", flush=True)
    res["encode"] = measure_encode(emb, ufire, args.n_queries, args.n_images, args.encode_batch, peak)
    res["encode"]["matmul_n"] = args.matmul_n

    print("Search:", flush=True)
    n_q, n_g = (int(x) for x in args.search.split(","))
    res["search"] = measure_search(n_q, n_g, args.search_dim or emb.dim, args.k)
    del emb
    gc.collect()

    if not args.no_shares:
        print("Step-time shares of the default training step (in-process, loader thread vs off):", flush=True)
        res["step_shares"] = measure_step_shares(args)

    if not args.no_wall:
        print("Wall time of the documented commands:", flush=True)
        res["wall"] = measure_wall(args)
    res["seconds"] = time.time() - t0

    print("\n" + report(res))
    out = plumbing.atomic_write(args.out, json.dumps(res, indent=1))
    print(f"benchmark took {res['seconds'] / 60:.1f} min; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
