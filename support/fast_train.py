"""Speed for train.py without changing the method: the two-core step, the loader's job, the look-ahead
(support code: skip on first read).

Two switches, both on by default on a CPU and both with a plain loop behind them (`--loader off`,
`--two-cores off`); benchmarks/speed.py times them:

* the loader (support/prefetch.py) decodes, patchifies and tokenises step t+1's batch while step t
  computes, guessing GGAS' next draw (`prepare_batch`, `next_batch`);
* `two_core_step` computes the query tower on one core and the target tower on the other. It is the
  fast twin of train.full_batch_step (the reference); tests/test_fast_paths.py and
  tests/test_train_step.py hold the two equal. train.train_step dispatches to it in one line.

Support code never imports train.py: train_step passes the loss as a closure over train.info_nce,
and `prepare_batch` gets train.make_batch.
"""
from __future__ import annotations

import concurrent.futures as cf
import math
import os
from functools import partial
from typing import Callable

import torch

from support import recipes
from support.errors import NonFiniteLoss
from support.plumbing import DistInfo
from support.prefetch import Prefetcher


def two_core_step(model, queries, images, loss: Callable, spare: cf.Executor) -> dict:
    """train.full_batch_step with its work shared by two CPU cores (the tiny default on a laptop CPU).

    `queries` / `images`: the whole batch as the model takes them (train._rows); `loss(q, t)`: L_nce of
    the batch (train_step's closure over train.info_nce). Returns StepOut's fields as a dict.

    The query tower and the target tower share weights but no activations: q depends only on the
    queries, t only on the targets, and they meet only in L. So, as in GradCache's step (b):
    (a) forward: the queries on this thread, the targets on `spare` (one worker thread), at once;
    (b) L, dL/dq and dL/dt on detached copies of q and t (a graph of a few (B, B) ops);
    (c) backward: each thread pushes its cached gradient back through its own tower.
    torch releases the GIL inside its kernels and autograd locks gradient accumulation, so the two
    threads run side by side. The gradient is full_batch_step's up to float summation order (a
    weight used several times in each tower sums its pieces in another order; tests/test_fast_paths.py
    holds them within 1e-5). Only without dropout (use_two_cores for train.py; a model with a dropout
    in training mode is refused here, ValueError): two threads would draw their masks from one
    generator in an unpredictable order. The batch is one chunk, so R_cal is
    the batch mean under either reg_per_chunk (w_c = 1 = b/b).
    """
    _refuse_active_dropout(model)
    target_fwd = spare.submit(model, images=images)  # (a) the target tower, on the other core
    out_q = model(queries=queries)  # (a) the query tower, here
    out_t = target_fwd.result()
    q = out_q["q"].detach().requires_grad_()  # (B, D) leaf: dL/dq lands in q.grad
    t = out_t["t"].detach().requires_grad_()  # (B, D) leaf
    nce = loss(q, t)  # () L_nce
    reg = out_q["reg"].float()  # () R_cal of the queries
    loss_value = float(nce.detach() + reg.detach())  # L = L_nce + R_cal
    if not math.isfinite(loss_value):  # stop before touching any gradient (as train._check_finite)
        raise NonFiniteLoss(f"loss = {loss_value}")
    nce.backward()  # (b) fills q.grad (B, D) and t.grad (B, D)
    target_bwd = spare.submit(torch.autograd.backward, [out_t["t"]], [t.grad])  # (c) targets, other core
    # (c) queries and R_cal here (R_cal is a constant 0 without a calibrator: nothing to push back)
    outputs, grads = [out_q["q"]], [q.grad]
    if reg.requires_grad:
        outputs, grads = outputs + [reg], grads + [torch.ones_like(reg)]
    torch.autograd.backward(outputs, grads)
    target_bwd.result()
    return dict(loss=loss_value, nce=float(nce.detach()), reg=float(reg.detach()),
                lam=float(out_q["lam"].detach().float().mean()), angle=float(out_q["angle"].float().mean()))


def _refuse_active_dropout(model) -> None:
    """two_core_step's precondition (use_two_cores checks it for train.py; this holds it for every caller):
    no dropout module with p > 0 in training mode. ~1 ms on the tiny model (a walk over its ~400
    modules), against a step of ~0.4 s."""
    for name, m in model.named_modules():
        if m.training and isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0:
            raise ValueError(f"two_core_step: {name or 'the model'} is a dropout (p = {m.p}) in training mode: "
                             f"two threads would draw its masks from one generator in an unpredictable order, "
                             f"so the step would not be reproducible; use train.full_batch_step")


def prepare_batch(make_batch: Callable, view, embedder, seed: int, request: tuple):
    """The loader's job for one step: make_batch (train.make_batch), then collate queries and targets
    into tensors (GradCache's chunks take rows of them).

    request = (sub-dataset, this rank's record indices, step). Pure: the same request always gives
    the same batch, so it does not matter whether the worker or the loop prepared it.
    """
    subset, indices, step = request
    batch = make_batch(view, subset, list(indices), seed, step)
    if hasattr(embedder, "collate_queries"):  # a model without collators takes the raw items
        batch.inputs = (embedder.collate_queries(batch.queries), embedder.collate_images(batch.images))
    return batch


def use_two_cores(cfg, embedder, di: DistInfo, threads: int, sizes: dict, fits_one_chunk: Callable) -> bool:
    """--two-cores auto: keep a spare core for two_core_step where it is faster and deterministic
    (see its docstring): a CPU with a second core and one torch thread, no DDP, no dropout, and a
    sub-dataset whose batch fits one GradCache chunk (`fits_one_chunk`: train.fits_one_chunk).

    The chunk may depend on the sub-dataset (--chunk-size -1), so train_step decides per batch:
    two_core_step for a batch that fits one chunk, gradcache_step for the others. The two paths
    give the same gradient up to float summation order, and which one a step takes depends only on
    its sub-dataset, so an exact resume stays exact.
    """
    rows = {k: min(cfg.batch_size, n - n % di.world) // di.world for k, n in sizes.items()}  # b_k per rank
    return (cfg.two_cores == "auto" and di.device == "cpu" and not di.enabled and threads == 1
            and (os.cpu_count() or 1) >= 2
            and any(fits_one_chunk(recipes.step_chunk_size(cfg, k), b) for k, b in rows.items())
            and getattr(getattr(embedder, "config", None), "lora_dropout", 0.0) == 0.0)


def start(make_batch: Callable, fits_one_chunk: Callable, view, embedder, cfg, di: DistInfo, threads: int,
          sizes: dict) -> tuple:
    """(the loader, the spare core's one-thread executor or None) for a run.

    The loader first: in "process" mode it forks here, while this process has a single thread.
    """
    loader = Prefetcher(partial(prepare_batch, make_batch, view, embedder, cfg.seed), cfg.loader)
    spare = None
    if use_two_cores(cfg, embedder, di, threads, sizes, fits_one_chunk):
        spare = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="spare-core")
    return loader, spare


def next_batch(run, subset: str, indices) -> tuple:
    """(this step's batch, whether the loader had it ready), and the next draw submitted to the loader.

    The loader prepared the batch during the previous step if it guessed this draw, else it is
    prepared now; the same batch either way (prepare_batch is pure). The next draw is guessed with
    sampler.peek: exact unless this step's report moves it.
    """
    hits = run.loader.stats.hits
    batch = run.loader.get((subset, tuple(indices), run.step))
    prefetched = run.loader.stats.hits > hits
    if run.step + 1 < run.plan.total:  # guess the next draw: exact unless this step's report moves it
        guess_subset, guess_indices = run.task_sampler.peek()
        run.loader.submit((guess_subset, tuple(guess_indices), run.step + 1))
    return batch, prefetched
