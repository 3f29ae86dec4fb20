"""Contrastive multi-task training of FashionLens: InfoNCE, GradCache, GGAS, DDP, two recipes.

Where this sits in the method
-----------------------------
FashionLens (Wen et al., 2026) trains one multimodal-LLM retriever for every U-FIRE task. Each step:

1. GGAS (sampler.py) picks ONE sub-dataset k and a batch of its records, so every in-batch negative
   comes from the same gallery as the positive (mixing tasks would make negatives trivially easy).
2. The embedder (model.py) turns the B queries into calibrated unit vectors q_i (PGSQC,
   calibrator.py) and the B target images into unit vectors t_j.
3. The loss is an InfoNCE from queries to targets plus the calibrator's regulariser:

       s_ij  = q_i . t_j / tau                                    (cosine similarity / temperature)
       P(i)  = { i }                           --positives single (the authors: labels = arange,
                                               my_grad_cache.py 48)
       P(i)  = { j : key(t_j) == key(t_i) }    --positives multi (same image as i's target; for
                                               asfr, same label)
       L_nce = (1/B) sum_i [ log sum_j exp(s_ij) - log sum_{j in P(i)} exp(s_ij) ]
       L     = L_nce + R_cal,   R_cal = sum_c w_c r_c,   r_c = (1/|c|) sum_{i in c} [ w_fro L_fro(i)
                                                                              + w_orth L_orth(i) ]
       w_c   = |c| / B   (--no-reg-per-chunk: R_cal is the batch mean, whatever the chunking)
       w_c   = 1         (--reg-per-chunk, the authors: each GradCache chunk c adds its own mean,
                          my_grad_cache.py 246-265, so R_cal's weight grows with the chunk count)

   Under "single", a second query in the batch with the same target image pushes that image away
   as a negative; "multi" counts it as a positive for both (common in small galleries).
4. GradCache (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
   Setup") decouples the contrastive batch from memory: (a) a no-grad pass over chunks gives all
   representations, (b) L and dL/d(representations) are computed on the whole batch, (c) each chunk
   is re-encoded WITH grad and back-propagated with its cached gradient, i.e. we call backward on
   the surrogate  sum_i q_i . dL/dq_i + sum_j t_j . dL/dt_j + R_cal(chunk).  Its parameter gradient
   equals dL/dtheta exactly, as long as the re-run sees the same dropout masks: we restore the RNG
   state (CPU and CUDA) each chunk had in pass (a). `full_batch_step` is the plain reference
   computation (`--chunk-size 0`; given a chunk size, it splits its forward and R_cal by the same
   chunks, keeping every graph); tests/test_train.py holds the two equal with dropout on.
5. Clip the gradient norm (--grad-clip; 0 = no clipping, as the authors), AdamW with weight decay
   on every trainable parameter (a trainable vision tower at lr x vision_lr_scale), a constant lr
   (the authors) or linear warm-up + cosine decay (--lr-schedule); then report the norm of the
   learnable query/target token gradients to GGAS as the sub-dataset's difficulty (the authors'
   signal: these two embeddings are shared by every task, so their gradient says how far task k
   currently pulls the model).

Two recipes (recipes.py) set the optimisation and input values: `paper` (the authors' values, any
real Qwen-VL) and `tiny-cpu` (the offline tiny default). Every TrainConfig field a recipe sets
defaults to None, "the recipe's value"; `TrainConfig.resolved()` fills them in once, and a flag
overrides any of them. The GradCache chunk size may follow the authors' table per sub-dataset
(`--chunk-size -1`, decided for each batch): long prompts (video, outfits) get small chunks.

Speed without changing the method (the CPU default): a loader (prefetch.py) decodes, patchifies and
tokenises step t+1's batch while step t computes, guessing GGAS' next draw (`prepare_batch`); and
`two_core_step` computes the query tower on one core and the target tower on the other. Both are
switches (`--loader off`, `--two-cores off`) back to the plain loop; benchmarks/speed.py times them.

Model selection follows the authors: every --eval-every steps, Recall@1 on each validation
sub-dataset is summed and the best checkpoint is kept in runs/NAME/best; runs/NAME/last holds the
latest weights plus the whole training state, so `--resume runs/NAME` continues exactly (same
batches, same dropout masks, same optimizer state => the same final weights as an uninterrupted run).

Multi-GPU: under `torchrun --nproc_per_node N train.py ...` the model is wrapped in DDP, every rank
gets a disjoint shard of the SAME sub-dataset's batch (GGAS shares its RNG across ranks), and the
representations are all-gathered so every query sees every rank's targets as negatives. Each rank
computes the same global loss; `gradcache_step` and plumbing.gather_with_grad scale the gradients
so that DDP's averaging yields exactly dL/dtheta. On CPU the gloo backend is used, so the path is
tested on a laptop: `torchrun --nproc_per_node 2 train.py --steps 4 ...`.

Run it
------
    python train.py --tasks all                 # synthetic U-FIRE + tiny backbone, 2 CPU cores, ~9 min
    python train.py --tasks t2i,cir --steps 200 --out runs/small
    python train.py --resume runs/small         # continue an interrupted run exactly
    python train.py --data /path/U-FIRE --backbone Qwen/Qwen3-VL-4B-Instruct   # `paper`: one GPU
    torchrun --nproc_per_node 8 train.py --data /path/U-FIRE --backbone Qwen/Qwen3-VL-4B-Instruct

Outputs in runs/NAME: config.json (resolved configuration: the recipe's name and every value it
filled in), log.jsonl (one line per step and per validation), best/ and last/ (checkpoints;
`python evaluate.py --ckpt runs/NAME/best`), test_results.json (final test table).

Shape legend: B batch (queries = targets), b per-rank batch, c chunk, D embedding size,
G gallery, r rank, T tasks (sub-datasets), W world size (processes).
"""
from __future__ import annotations

from support import plumbing  # noqa: I001  first: it sets OMP_WAIT_POLICY before torch loads (see plumbing.py)

import argparse
import concurrent.futures as cf
import contextlib
import dataclasses
import json
import math
import os
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from tqdm import tqdm

import data
from support.errors import FashionLensError, NonFiniteLoss, TrainingError, run_cli
import evaluate
from support import recipes
import sampler
from support import synthetic
from model import SUMMARY_INITS, EmbedderConfig, FashionLensEmbedder
from support.prefetch import MODES as LOADER_MODES, Prefetcher
from support.plumbing import (STATE_JSON, STATE_TENSORS, DistInfo, append_jsonl, atomic_write, barrier, gather_nograd,
                      gather_with_grad, mean_over_ranks, mix_seed)
from support.tiny_backbone import TINY_TYPES

# ================================================================================================
# The loss
# ================================================================================================


def key_ids(keys: list[str], device) -> torch.Tensor:
    """Target keys (absolute image paths) -> (b,) int64 ids, equal iff the paths are equal.

    mix_seed is a stable hash (Python's hash() is salted per process), so ids agree across DDP ranks.
    """
    return torch.tensor([mix_seed(k) for k in keys], dtype=torch.int64, device=device)  # (b,)


POSITIVES = ("single", "multi")  # P(i) = {i} (the authors) | every in-batch copy of i's target


def target_ids(keys: list[str], positives: str, device, di: DistInfo = DistInfo()) -> torch.Tensor:
    """(W*b,) ids of the global batch's targets for info_nce: P(i) = { j : ids_j == ids_i }.

    "multi": the image ids (key_ids), gathered from every rank, so copies of one image share an id.
    "single": the target's row in the global batch, so every id is distinct and P(i) = {i}: the
    authors' cross-entropy with labels = arange (my_grad_cache.py 48).
    """
    if positives == "single":
        return torch.arange(len(keys) * di.world, device=device)  # (W*b,) row r -> id r
    return gather_nograd(key_ids(keys, device), di)  # (W*b,) image ids, rank order


def info_nce(q: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE, query -> target (the equation is in the module docstring).

    q (B, D) unit queries, t (B, D) unit targets (row i is query i's target), ids (B,) target ids
    (`target_ids`): every target with query i's id is a positive of query i. Distinct ids (the
    "single" positives) make it the plain cross-entropy on the diagonal.
    """
    s = (q.float() @ t.float().T) / temperature  # (B, B) s_ij = q_i . t_j / tau
    pos = ids[:, None] == ids[None, :]  # (B, B) j in P(i): t_j is the same image as t_i
    log_all = torch.logsumexp(s, dim=1)  # (B,) log sum_j exp(s_ij)           (all targets)
    log_pos = torch.logsumexp(s.masked_fill(~pos, float("-inf")), dim=1)  # (B,) log sum_{j in P(i)} exp(s_ij)
    return (log_all - log_pos).mean()  # () L_nce: mean over queries of -log p(positive | q_i)


# ================================================================================================
# One training step: the plain reference and GradCache
# ================================================================================================


@dataclass
class Batch:
    """One GGAS batch on this rank: b queries and their b targets, all from sub-dataset `subset`."""

    subset: str
    queries: list  # b data.Query
    images: list  # b PIL target images
    keys: list  # b absolute target paths (duplicate detection)
    # (queries, targets) as the model's tensors (two model.ModelInputs), made ahead by the loader
    # (`prepare_batch`); None: the model collates the raw items itself.
    inputs: Optional[tuple] = None


def _rows(batch: Batch, start: int, end: int) -> tuple:
    """(queries, targets) of rows start:end as the model takes them: tensors if the loader made them."""
    if batch.inputs is not None:
        return batch.inputs[0].rows(start, end), batch.inputs[1].rows(start, end)
    return batch.queries[start:end], batch.images[start:end]


@dataclass
class StepOut:
    """What a step reports (the gradients are left in the parameters' .grad)."""

    loss: float  # L = L_nce + R_cal, the same on every rank
    nce: float  # L_nce
    reg: float  # R_cal, averaged over ranks
    lam: float  # mean calibrator strength lambda over this rank's queries
    angle: float = 0.0  # mean arc lambda * omega (radians) the calibrator moved this rank's queries


def _check_finite(x: float) -> None:
    """Stop before any gradient is touched: one NaN step would poison Adam's moments for good."""
    if not math.isfinite(x):
        raise NonFiniteLoss(f"loss = {x}")


def _reg_weight(rows: int, n: int, reg_per_chunk: bool) -> float:
    """w_c of a chunk of `rows` of this rank's n queries: 1 under reg_per_chunk (the authors: every
    GradCache chunk adds its own mean regulariser), else rows / n (the chunk means add up to the
    batch mean)."""
    return 1.0 if reg_per_chunk else rows / n


def full_batch_step(model, batch: Batch, temperature: float, di: DistInfo = DistInfo(), positives: str = "multi",
                    chunk_size: int = 0, reg_per_chunk: bool = False) -> StepOut:
    """The plain computation: encode the batch with grad, L on it, one backward.

    chunk_size 0 (or >= the batch): one forward. chunk_size > 0: the forward split into GradCache's
    chunks, every graph kept, R_cal = sum_c w_c r_c: the reference `gradcache_step` must equal
    (each chunk draws its dropout masks in the same order, and the regulariser is split by the
    same chunks, under either reg_per_chunk). Memory grows with the batch (every activation is kept
    until backward): that is what GradCache removes. Under DDP train.py calls it with one chunk,
    the one forward per step DDP expects; several forwards there are refused.
    """
    n = len(batch.keys)
    parts = _chunks(n, chunk_size)
    if di.enabled and len(parts) > 1:
        raise ValueError("full_batch_step splits its forward into chunks only in one process; "
                         "under DDP use gradcache_step")
    qs, ts, lams, angles, reg = [], [], [], [], 0.0
    for s, e in parts:
        queries, images = _rows(batch, s, e)
        out = model(queries=queries, images=images)
        qs.append(out["q"].float())  # (c, D)
        ts.append(out["t"].float())  # (c, D)
        lams.append(out["lam"].detach().float())  # (c,)
        angles.append(out["angle"].float())  # (c,)
        reg = reg + out["reg"].float() * _reg_weight(e - s, n, reg_per_chunk)  # () R_cal += w_c r_c
    q = gather_with_grad(torch.cat(qs), di)  # (W*b, D) every rank's queries
    t = gather_with_grad(torch.cat(ts), di)  # (W*b, D) every rank's targets: cross-device negatives
    ids = target_ids(batch.keys, positives, q.device, di)  # (W*b,)
    nce = info_nce(q, t, ids, temperature)  # () L_nce on the global batch, identical on all ranks
    reg_mean = mean_over_ranks(reg.detach(), di)  # () R_cal averaged over ranks (for the reported loss)
    loss_value = float(nce.detach() + reg_mean)  # L = L_nce + R_cal
    _check_finite(loss_value)
    # Each rank adds its own R_cal; DDP averages ranks, which turns them into the global mean.
    (nce + reg).backward()
    return StepOut(loss=loss_value, nce=float(nce.detach()), reg=float(reg_mean), lam=float(torch.cat(lams).mean()),
                   angle=float(torch.cat(angles).mean()))


class RngState:
    """The CPU (and CUDA) RNG state at one moment, so a chunk can be re-run with the same dropout."""

    def __init__(self, device: str):
        self.cpu = torch.get_rng_state()
        self.cuda_device = torch.device(device) if str(device).startswith("cuda") else None
        self.cuda = torch.cuda.get_rng_state(self.cuda_device) if self.cuda_device is not None else None

    def restore(self) -> None:
        """Make the next random draws (dropout masks) repeat the ones drawn after this snapshot."""
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.cuda_device)


def _chunks(n: int, chunk_size: int) -> list[tuple[int, int]]:
    """[(start, end)] covering range(n) in pieces of chunk_size (one piece when chunk_size <= 0)."""
    size = n if chunk_size <= 0 else chunk_size
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _unwrap(model):
    """The FashionLensEmbedder inside a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _sync_ctx(model, last: bool):
    """DDP: skip the gradient all-reduce on every backward but the last one of the step."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not last:
        return model.no_sync()
    return contextlib.nullcontext()


def gradcache_step(model, batch: Batch, temperature: float, di: DistInfo = DistInfo(),
                   chunk_size: int = 8, positives: str = "multi", reg_per_chunk: bool = False) -> StepOut:
    """GradCache (Gao et al., 2021): the same gradient as `full_batch_step`, memory of one chunk.

    (a) no-grad pass over chunks -> all representations, remembering each chunk's RNG state;
    (b) L and dL/d(representations) on the full (gathered) batch, with a tiny autograd graph that
        starts at the representations;
    (c) per chunk: restore its RNG state (same dropout masks), re-encode with grad, backward the
        surrogate  <q_c, dL/dq_c> + <t_c, dL/dt_c> + w_c r_c  whose gradient is the chunk's share
        of dL/dtheta (w_c = c/b, or 1 under reg_per_chunk: see `_reg_weight`). Parameter gradients
        accumulate over chunks.
    DDP: (b) runs on the gathered batch, so dL/dq of our slice already includes what every rank's
    queries owe our targets; DDP then averages ranks, so our slice's gradient is scaled by W. All
    but the last chunk's backward run under no_sync: one all-reduce per step.
    """
    module = _unwrap(model)  # pass (a) needs no DDP bookkeeping
    n = len(batch.keys)
    parts = _chunks(n, chunk_size)
    if len(parts) == 1:  # the batch fits one chunk: GradCache would only add a second forward
        return full_batch_step(model, batch, temperature, di, positives, reg_per_chunk=reg_per_chunk)
    device = str(getattr(module, "device", di.device))

    # (a) representations without a graph.
    states, qs, ts, lams, angles, reg = [], [], [], [], [], torch.zeros((), device=device)
    with torch.no_grad():
        for s, e in parts:
            states.append(RngState(device))  # dropout masks of this chunk are drawn from here
            queries, images = _rows(batch, s, e)
            out = module(queries=queries, images=images)
            qs.append(out["q"].float())  # (c, D)
            ts.append(out["t"].float())  # (c, D)
            lams.append(out["lam"].float())  # (c,)
            angles.append(out["angle"].float())  # (c,)
            reg = reg + out["reg"].float() * _reg_weight(e - s, n, reg_per_chunk)  # () R_cal += w_c r_c
    end_state = RngState(device)  # after pass (a): where the reference path would leave the RNG

    # (b) loss and its gradient w.r.t. the representations, on the global batch.
    q_all = gather_nograd(torch.cat(qs), di).requires_grad_()  # (W*b, D) leaf
    t_all = gather_nograd(torch.cat(ts), di).requires_grad_()  # (W*b, D) leaf
    ids = target_ids(batch.keys, positives, q_all.device, di)  # (W*b,)
    nce = info_nce(q_all, t_all, ids, temperature)  # () L_nce, identical on all ranks
    reg_mean = mean_over_ranks(reg, di)  # () R_cal averaged over ranks (for the reported loss)
    loss_value = float(nce.detach()) + float(reg_mean)  # L = L_nce + R_cal
    _check_finite(loss_value)  # stop before touching any gradient
    nce.backward()
    lo, hi = di.rank * n, (di.rank + 1) * n  # our slice of the gathered batch
    gq = q_all.grad[lo:hi] * di.world  # (b, D) dL/dq for our queries (x W: DDP will average)
    gt = t_all.grad[lo:hi] * di.world  # (b, D) dL/dt for our targets

    # (c) re-run each chunk with grad and push its cached gradient through the model.
    for k, (s, e) in enumerate(parts):
        states[k].restore()  # same dropout masks as in pass (a)
        with _sync_ctx(model, last=k == len(parts) - 1):
            queries, images = _rows(batch, s, e)
            out = model(queries=queries, images=images)
            surrogate = ((out["q"].float() * gq[s:e]).sum()  # <q_c, dL/dq_c>
                         + (out["t"].float() * gt[s:e]).sum()  # <t_c, dL/dt_c>
                         + out["reg"].float() * _reg_weight(e - s, n, reg_per_chunk))  # w_c r_c
            surrogate.backward()
    end_state.restore()  # the re-runs drew the same numbers; make the end state explicit
    return StepOut(loss=loss_value, nce=float(nce.detach()), reg=float(reg_mean), lam=float(torch.cat(lams).mean()),
                   angle=float(torch.cat(angles).mean()))


def two_core_step(model, batch: Batch, temperature: float, spare: cf.Executor, positives: str = "multi") -> StepOut:
    """`full_batch_step` with its work shared by two CPU cores (the tiny default on a laptop CPU).

    The query tower and the target tower share weights but no activations: q depends only on the
    queries, t only on the targets, and they meet only in L. So, as in GradCache's step (b):
    (a) forward: the queries on this thread, the targets on `spare` (one worker thread), at once;
    (b) L, dL/dq and dL/dt on detached copies of q and t (a graph of a few (B, B) ops);
    (c) backward: each thread pushes its cached gradient back through its own tower.
    torch releases the GIL inside its kernels and autograd locks gradient accumulation, so the two
    threads run side by side. The gradient is full_batch_step's up to float summation order (a
    weight used several times in each tower sums its pieces in another order; tests/test_fast_paths.py
    holds them within 1e-5). train.py uses this path only without dropout: two threads would draw
    their masks from one generator in an unpredictable order. The batch is one chunk, so R_cal is
    the batch mean under either reg_per_chunk (w_c = 1 = b/b).
    """
    queries, images = _rows(batch, 0, len(batch.keys))
    target_fwd = spare.submit(model, images=images)  # (a) the target tower, on the other core
    out_q = model(queries=queries)  # (a) the query tower, here
    out_t = target_fwd.result()
    q = out_q["q"].detach().requires_grad_()  # (B, D) leaf: dL/dq lands in q.grad
    t = out_t["t"].detach().requires_grad_()  # (B, D) leaf
    nce = info_nce(q, t, target_ids(batch.keys, positives, q.device), temperature)  # () L_nce
    reg = out_q["reg"].float()  # () R_cal of the queries
    loss_value = float(nce.detach() + reg.detach())  # L = L_nce + R_cal
    _check_finite(loss_value)  # stop before touching any gradient
    nce.backward()  # (b) fills q.grad (B, D) and t.grad (B, D)
    target_bwd = spare.submit(torch.autograd.backward, [out_t["t"]], [t.grad])  # (c) targets, other core
    # (c) queries and R_cal here (R_cal is a constant 0 without a calibrator: nothing to push back)
    outputs, grads = [out_q["q"]], [q.grad]
    if reg.requires_grad:
        outputs, grads = outputs + [reg], grads + [torch.ones_like(reg)]
    torch.autograd.backward(outputs, grads)
    target_bwd.result()
    return StepOut(loss=loss_value, nce=float(nce.detach()), reg=float(reg.detach()),
                   lam=float(out_q["lam"].detach().float().mean()), angle=float(out_q["angle"].float().mean()))


def token_grad_norm(embedder) -> float:
    """||grad|| over the learnable query/target token embeddings: GGAS' difficulty signal.

    It is the gradient of the whole loss, so besides InfoNCE's (p - y) terms, which fade as a
    sub-dataset is fitted (notebook 04 derives it), it holds the calibrator regulariser's share, which
    does not."""
    grads = [p.grad.detach().float().norm() for p in embedder.token_parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0


def clip_gradients(params: list, max_norm: float) -> float:
    """The global gradient norm ||g|| = sqrt(sum_p ||grad_p||^2), measured before any clipping;
    g is then rescaled to max_norm when ||g|| exceeds it. max_norm 0: no clipping (the authors
    never clip), the norm is only measured, for the log and the finiteness check."""
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))  # g <- g * min(1, max_norm / ||g||)
    return float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))  # ||g||


LR_SCHEDULES = ("constant", "cosine")  # the authors' fixed lr | ours: warm-up, then cosine decay


def lr_factor(step: int, total: int, warmup: int, min_ratio: float, schedule: str = "cosine") -> float:
    """lr multiplier at optimizer step `step` (0-based): linear warm-up over `warmup` steps, then
    1 ("constant": the authors' AdamW has no scheduler, train.py 98) or a cosine to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup  # warm-up: 1/warmup, 2/warmup, ..., 1
    if schedule == "constant":
        return 1.0  # the peak lr for the rest of the run
    progress = (step - warmup) / max(1, total - warmup)  # 0 -> 1 over the decay phase
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# ================================================================================================
# Configuration
# ================================================================================================


@dataclass
class TrainConfig:
    """Everything that defines a training run; each CLI flag maps onto one field (dashes -> _).

    A field whose default is None takes its value from the recipe (recipes.py: `paper` holds the
    authors' values, `tiny-cpu` the measured choices of the offline tiny default); the comments
    below give both. `resolved()` fills them in once; a run, config.json and every checkpoint hold
    the resolved copy, so a resumed run keeps its values even if a recipe changes later.
    """

    tasks: str = "all"  # "all" or comma-separated task words / "task/dataset" names: the paper trains on all
    data: str = "synthetic"  # "synthetic" = data/synthetic, generated on first use (offline default); or a U-FIRE root
    backbone: str = "tiny"  # "tiny" (offline random Qwen3-VL) | "tiny-qwen2-vl" | hub id | local path
    recipe: str = "auto"  # the defaults of every None field: "paper" | "tiny-cpu" | "auto" = tiny-cpu for the
    #                      tiny backbones, paper for any other (a real Qwen-VL gets the authors' recipe unasked)
    out: str = ""  # run directory; "" = runs/fashionlens-<backbone name>
    steps: Optional[int] = None  # optimizer steps; 0 = set by --epochs. tiny-cpu 1400: enough to leave chance
    #                             behind on every test row, few enough for minutes on a laptop CPU (docs/RESULTS.md).
    #                             Given without --epochs, it sets epochs to 0 (the run is exactly this long)
    epochs: Optional[float] = None  # > 0 replaces --steps by epochs x GGAS' steps per epoch (sum_k N_k // batch).
    #                                paper 5 (the authors' --epochs). Given without --steps, it sets steps to 0
    batch_size: Optional[int] = None  # global contrastive batch (all ranks): each query's negatives are the other
    #                                  B-1 targets. paper 64 (the authors' per-GPU batch, for one GPU); tiny-cpu 16:
    #                                  at a fixed CPU budget more steps beat wider batches (docs/RESULTS.md)
    chunk_size: Optional[int] = None  # GradCache sub-batch per rank; 0 = plain reference path; -1 = the authors'
    #                                  size for each batch's sub-dataset (recipes.CHUNK_SIZES: small for long
    #                                  prompts, so a chunk's activations fit; paper). A batch that fits one chunk
    #                                  skips GradCache's extra forward: tiny-cpu's 16 of 16 does
    lr: Optional[float] = None  # peak AdamW lr: paper 1e-4 (a pretrained Qwen-VL); tiny-cpu 1e-3 (a random model)
    vision_lr_scale: float = 0.1  # a trainable (random tiny) vision tower learns at lr x this: at the full lr it
    #                              soon encodes only colour, and sketches (no colour) become unfindable.
    #                              No effect on a frozen (pretrained) tower
    weight_decay: Optional[float] = None  # AdamW decay of every trainable parameter: paper 1e-3 (the authors);
    #                                      tiny-cpu 0, as the LoRA adapters are small and the runs short
    lr_schedule: Optional[str] = None  # "constant" (paper: the authors use no scheduler) | "cosine" (tiny-cpu:
    #                                   a short run from random weights settles better as the lr decays)
    warmup_ratio: Optional[float] = None  # share of steps with a linear lr warm-up, so Adam's moments settle first;
    #                                      paper 0, tiny-cpu 0.05
    min_lr_ratio: float = 0.05  # cosine ends at lr x this, so the last steps still move the model a bit
    grad_clip: Optional[float] = None  # max global grad norm; 0 = no clipping (paper: the authors never clip; the
    #                                   norm is still logged). tiny-cpu 1.0: one bad batch (a rare task)
    #                                   cannot blow the random LoRA up
    temperature: float = 0.07  # InfoNCE tau: the common value for CLIP-style retrieval, used by the authors
    positives: Optional[str] = None  # "single": a query's only positive is its own target (paper: the authors'
    #                                 labels = arange) | "multi": every in-batch copy of that target image too
    #                                 (tiny-cpu: small synthetic galleries repeat images within a batch)
    reg_per_chunk: Optional[bool] = None  # add the calibrator regulariser once per GradCache chunk, so its weight
    #                                      grows with the chunk count (paper: the authors) | once per batch (tiny-cpu)
    calibrator: str = "slerp"  # PGSQC mode: slerp (the method) | linear | off (ablations)
    sampler: str = "ggas"  # task sampling: ggas (the method) | uniform | size (ablations)
    ggas_warmup: int = -1  # uniform sampling for N steps; -1 = one epoch (the authors) capped at steps/4, so
    #                        a short run still adapts (the CPU default: 350 uniform steps of 1400)
    ggas_refresh: Optional[str] = None  # GGAS recomputes p at each "epoch" start (paper: the authors) or every
    #                                    "step" (tiny-cpu: a run of a few epochs would otherwise hardly adapt)
    ggas_ema_start: Optional[str] = None  # difficulty EMA starts at "zero" (paper) or at the "first" report
    #                                      (tiny-cpu: a rarely drawn sub-dataset does not look easy)
    ggas_floor: Optional[str] = None  # "renorm": clip at the floor, renormalise once (paper) | "waterfill": the
    #                                  floor holds exactly (tiny-cpu); see sampler.py
    # How queries and images become prompts: passed to EmbedderConfig (model.py), which owns them; a
    # resumed run keeps its checkpoint's.
    min_pixels: Optional[int] = None  # pixel budget of one image, the aspect ratio kept by the backbone's processor:
    max_pixels: Optional[int] = None  # paper 224^2 .. 256^2 (the authors' collators), tiny-cpu 64^2 .. 64^2
    max_query_images: Optional[int] = None  # query images per prompt, 0 = all: paper 8, tiny-cpu 4
    query_sketches: Optional[str] = None  # "all" sketches of an item in one prompt (paper) | "one" (tiny-cpu)
    num_frames: Optional[int] = None  # frames of a video query: paper 8, tiny-cpu 4
    video_size: Optional[int] = None  # each frame resized to this square: paper 224, tiny-cpu 64
    lora_dropout: Optional[float] = None  # paper 0.05 (the authors); tiny-cpu 0: masks are a large share of a CPU step
    summary_init: Optional[str] = None  # summary tokens start at "im_end" (paper: the authors) | "words" (tiny-cpu:
    #                                    " word" / " item"; one shared start cost the random model its sketch rows)
    eval_every: Optional[int] = None  # validate (sum of val Recall@1) + checkpoint every N steps: paper 500,
    #                                  tiny-cpu 200
    max_eval_queries: int = 0  # validation queries per sub-dataset (evenly spaced); 0 = all
    eval_batch_size: int = 64  # batch size of validation/test encoding
    final_test: bool = True  # evaluate the best checkpoint on the test split at the end and print the table
    seed: int = 0  # seeds the tiny base, sampler, data draws and dropout (every step re-seeded from it)
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N; under torchrun: cuda:LOCAL_RANK
    cpu_threads: int = 0  # torch CPU threads; 0 = auto: OMP_NUM_THREADS if set, else 1 for a tiny backbone on
    #                      CPU (its 128-wide matmuls are too small to split over threads), else torch's default
    loader: str = "thread"  # who prepares the next batch during a step (prefetch.py): a worker "thread", a
    #                         forked worker "process", or "off" (in the loop); the same batches in each
    two_cores: str = "auto"  # auto: share a step between two CPU cores (two_core_step) when training runs on a
    #                         multi-core CPU with one torch thread, without DDP or dropout, and the step's
    #                         batch fits one GradCache chunk (decided per batch); off: one core computes it
    stop_at: int = 0  # end this invocation after this step (writes last/), e.g. a job time limit; 0 = never
    find_unused_parameters: bool = False  # DDP: every forward embeds queries AND targets, so every trainable
    #                                       parameter gets a gradient each backward; True only for a custom model

    def resolved(self) -> "TrainConfig":
        """This config with its recipe applied; needs no model, and resolving twice changes nothing.

        `recipe` becomes the name it resolves to for this backbone (recipes.recipe_name) and every
        None field takes that recipe's value. Steps and epochs form one pair: given only one of
        them, the other is 0 (`--steps 300` on `paper` trains 300 steps, not 5 epochs); given
        neither, the recipe's pair (paper: 5 epochs; tiny-cpu: 1400 steps).
        """
        try:
            name = recipes.recipe_name(self.recipe, self.backbone)
        except ValueError:
            raise SystemExit(f"error: --recipe {self.recipe!r}: must be auto, "
                             f"{' or '.join(recipes.RECIPE_NAMES)}") from None
        values = {**recipes.recipe_values(name, self.backbone, "embedder"),
                  **recipes.recipe_values(name, self.backbone, "train")}
        length = {"steps": values.pop("steps", 0), "epochs": values.pop("epochs", 0.0)}  # the recipe's pair
        fill = {k: v for k, v in values.items() if getattr(self, k) is None}
        if self.steps is None and self.epochs is None:
            fill.update(length)  # neither given: the recipe decides the run length
        elif self.steps is None:
            fill["steps"] = 0  # --epochs alone: the epochs decide
        elif self.epochs is None:
            fill["epochs"] = 0.0  # --steps alone: exactly that many steps
        return dataclasses.replace(self, recipe=name, **fill)

    def embedder_fields(self) -> dict:
        """The EmbedderConfig fields this config sets (resolved): the recipe's name and the input values."""
        return {"recipe": self.recipe, **{k: getattr(self, k) for k in EMBEDDER_FIELDS}}

    def resolved_out(self) -> str:
        """The run directory: --out, or runs/fashionlens-<last path part of the backbone>."""
        if self.out:
            return self.out
        name = self.backbone.rstrip("/").split("/")[-1] or "model"
        return f"runs/fashionlens-{name}"

    def check(self) -> None:
        """Refuse values no run can use, before anything is built or created on disk.

        Checks the resolved values (`resolved()`: a config with None fields is resolved first).
        Each failure is one line `error: --flag value: what it needs` (a SystemExit, as argparse's
        own errors are). The ranges are written so that NaN fails them too (NaN fails every
        comparison), and a float that must be finite is compared with inf.
        """
        c, inf = self.resolved(), math.inf

        def one_of(values) -> str:
            return f"must be one of {', '.join(values)}"

        rules = {  # field -> (value acceptable?, what the flag needs)
            "steps": (c.steps >= 1 or (c.steps == 0 and c.epochs > 0), "must be >= 1 (0 only with --epochs > 0)"),
            "epochs": (0 <= c.epochs < inf, "must be >= 0 (0: train for --steps)"),
            "batch_size": (c.batch_size >= 1, "must be >= 1"),
            "chunk_size": (c.chunk_size >= -1,
                           "must be >= -1 (-1: the authors' size per sub-dataset; 0: no GradCache)"),
            "lr": (0 < c.lr < inf, "must be > 0"),
            "vision_lr_scale": (0 <= c.vision_lr_scale < inf, "must be >= 0 (0 freezes the tower's updates)"),
            "weight_decay": (0 <= c.weight_decay < inf, "must be >= 0"),
            "lr_schedule": (c.lr_schedule in LR_SCHEDULES, one_of(LR_SCHEDULES)),
            "warmup_ratio": (0 <= c.warmup_ratio <= 1, "must lie in [0, 1]"),
            "min_lr_ratio": (0 <= c.min_lr_ratio <= 1, "must lie in [0, 1]"),
            "grad_clip": (0 <= c.grad_clip < inf, "must be >= 0 (0: no clipping)"),
            "temperature": (0 < c.temperature < inf, "must be > 0"),
            "positives": (c.positives in POSITIVES, one_of(POSITIVES)),
            "reg_per_chunk": (isinstance(c.reg_per_chunk, bool), "must be true or false"),
            "calibrator": (c.calibrator in ("slerp", "linear", "off"), "must be slerp, linear or off"),
            "sampler": (c.sampler in sampler.STRATEGIES, one_of(sampler.STRATEGIES)),
            "ggas_warmup": (c.ggas_warmup >= -1, "must be >= 0, or -1 for one epoch"),
            "ggas_refresh": (c.ggas_refresh in sampler.REFRESH_MODES, one_of(sampler.REFRESH_MODES)),
            "ggas_ema_start": (c.ggas_ema_start in sampler.EMA_STARTS, one_of(sampler.EMA_STARTS)),
            "ggas_floor": (c.ggas_floor in sampler.FLOORS, one_of(sampler.FLOORS)),
            "min_pixels": (c.min_pixels >= 1, "must be >= 1"),
            "max_pixels": (c.max_pixels >= c.min_pixels, f"must be >= --min-pixels ({c.min_pixels})"),
            "max_query_images": (c.max_query_images >= 0, "must be >= 0 (0 = all)"),
            "query_sketches": (c.query_sketches in data.SKETCH_MODES, one_of(data.SKETCH_MODES)),
            "num_frames": (c.num_frames >= 1, "must be >= 1"),
            "video_size": (c.video_size >= 1, "must be >= 1"),
            "lora_dropout": (0 <= c.lora_dropout < 1, "must lie in [0, 1)"),
            "summary_init": (c.summary_init in SUMMARY_INITS, one_of(SUMMARY_INITS)),
            "eval_every": (c.eval_every >= 1, "must be >= 1 (steps between validations)"),
            "max_eval_queries": (c.max_eval_queries >= 0, "must be >= 0 (0 = all)"),
            "eval_batch_size": (c.eval_batch_size >= 1, "must be >= 1"),
            "cpu_threads": (c.cpu_threads >= 0, "must be >= 0 (0 = auto)"),
            "loader": (c.loader in LOADER_MODES, one_of(LOADER_MODES)),
            "two_cores": (c.two_cores in ("auto", "off"), "must be auto or off"),
            "stop_at": (c.stop_at >= 0, "must be >= 0 (0 = never)"),
        }
        for name, (ok, need) in rules.items():
            if not ok:
                raise SystemExit(f"error: --{name.replace('_', '-')} {getattr(c, name)!r}: {need}")
        plumbing.check_device("--device", c.device)
        plumbing.check_writable("--out", c.resolved_out())


# The input fields TrainConfig passes to EmbedderConfig (the recipes' "embedder" part).
EMBEDDER_FIELDS = tuple(recipes.RECIPES["paper"]["embedder"])


# Fields a resumed run may change: they do not touch the optimisation trajectory.
RESUME_MAY_CHANGE = {"out", "device", "cpu_threads", "stop_at", "eval_every", "max_eval_queries",
                     "eval_batch_size", "final_test", "loader", "two_cores"}
# An expert DDP switch, left out of --help to keep it readable (the flag works).
HIDDEN_FLAGS = {"find_unused_parameters"}
CONFIG_JSON = "train_config.json"  # the run's TrainConfig, saved in every checkpoint


# ================================================================================================
# Data for a step
# ================================================================================================


def make_batch(view, subset: str, indices: list[int], seed: int, step: int) -> Batch:
    """Draw one (query, target) pair per record index (a random target/sketch among several).

    Each record gets its own RNG seeded from (seed, step, record index): the draws depend neither
    on the number of ranks nor on anything drawn before, so a resumed run redraws them exactly.
    """
    pairs = [view.pair(subset, i, random.Random(mix_seed(seed, step, i))) for i in indices]
    return Batch(subset=subset, queries=[p.query for p in pairs], images=[p.target for p in pairs],
                 keys=[p.target_key for p in pairs])


def prepare_batch(view, embedder, seed: int, request: tuple) -> Batch:
    """The loader's job for one step: make_batch, then collate queries and targets into tensors
    (GradCache's chunks take rows of them).

    request = (sub-dataset, this rank's record indices, step). Pure: the same request always gives
    the same batch, so it does not matter whether the worker or the loop prepared it.
    """
    subset, indices, step = request
    batch = make_batch(view, subset, list(indices), seed, step)
    if hasattr(embedder, "collate_queries"):  # a model without collators takes the raw items
        batch.inputs = (embedder.collate_queries(batch.queries), embedder.collate_images(batch.images))
    return batch




def resolve_data_root(spec: str, di: DistInfo) -> str:
    """'synthetic' -> generate data/synthetic once (rank 0 first); a path must exist."""
    if spec == "synthetic":
        if di.main:
            root = synthetic.ensure_synthetic("data/synthetic")
        barrier(di)
        if not di.main:
            root = synthetic.ensure_synthetic("data/synthetic")  # already there: just returns the path
        return str(Path(root).resolve())
    if not Path(spec).is_dir():
        raise SystemExit(f"error: --data {spec}: no such directory (a U-FIRE root, or 'synthetic')")
    return str(Path(spec).resolve())


# ================================================================================================
# The loop, part 1: setup (data, model, optimizer, sampler, resume)
# ================================================================================================


@dataclass
class Plan:
    """How long the run is and how its warm-ups are sized, from the data and the config."""

    total: int  # optimizer steps of the whole run
    steps_per_epoch: int  # GGAS' sum_k N_k // batch
    ggas_warmup: int  # uniform-sampling steps before GGAS adapts
    lr_warmup: int  # linear lr warm-up steps
    per_rank: int  # b = B / W


@dataclass
class Run:
    """What the loop functions share: built by `setup`, advanced by `train_step`."""

    cfg: TrainConfig
    di: DistInfo
    out: Path  # runs/NAME
    ufire: data.UFire
    val_subsets: list  # model selection sums Recall@1 over these
    embedder: torch.nn.Module  # the FashionLensEmbedder: checkpoints and validation use it
    model: torch.nn.Module  # what a step calls: the embedder, or DDP around it
    params: list  # the trainable parameters (gradient clipping)
    view: data.TrainView  # (sub-dataset, record index) -> a (query, target) pair
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    task_sampler: object  # sampler.TaskBatchSampler (GGAS)
    plan: Plan
    t_start: float  # wall clock at the start of this invocation
    step: int = 0  # optimizer steps done
    best: dict = dataclasses.field(default_factory=lambda: {"step": 0, "score": -1.0})  # best validation so far
    elapsed0: float = 0.0  # training seconds of earlier invocations (a resumed run)
    t_prev: float = 0.0  # wall clock at the end of the previous step
    batches: object = None  # iterator over (sub-dataset, this rank's record indices), one per step
    loader: object = None  # prefetch.Prefetcher: prepares the next step's batch during this one
    spare: object = None  # the spare core's one-thread executor (two_core_step), or None

    @property
    def log_path(self) -> Path:
        """One JSON line per step and per validation."""
        return self.out / "log.jsonl"


def setup(cfg: TrainConfig, resume: Optional[str]) -> Run:
    """Data, embedder, optimizer and sampler as configured; the saved state when resuming."""
    t_start = time.time()
    cfg = cfg.resolved()  # the recipe's values, once: the run, config.json and checkpoints hold these
    cfg.check()  # flags first: a bad one stops us before anything is built or written
    di = plumbing.init_distributed(cfg.device)
    if cfg.batch_size % di.world:
        raise SystemExit(f"error: --batch-size {cfg.batch_size} is not divisible by {di.world} processes")
    threads = plumbing.set_cpu_threads(cfg.cpu_threads, di.device, small_model=cfg.backbone in TINY_TYPES)
    out = Path(cfg.resolved_out())
    cfg.data = resolve_data_root(cfg.data, di)  # config.json and checkpoints record the resolved root
    ufire = data.UFire(cfg.data)
    train_subsets = ufire.select("train", cfg.tasks)
    val_subsets = ufire.select("val", cfg.tasks)
    check_not_empty(ufire, "train", train_subsets, di.world)  # reads the records now (cached for the view)
    check_not_empty(ufire, "val", val_subsets, 1)

    resume_dir = find_resume_checkpoint(Path(resume)) if resume else None
    if di.main:
        if resume_dir is None and ((out / "last").exists() or (out / "log.jsonl").exists()):
            raise SystemExit(f"error: {out} already holds a run; continue it with --resume {out} "
                             f"or choose another --out")
        out.mkdir(parents=True, exist_ok=True)
        clean_interrupted_writes(out)
    barrier(di)

    torch.manual_seed(cfg.seed)  # the embedder's random initialisation follows from the run seed
    embedder = build_embedder(cfg, di.device, resume_dir)
    embedder.train()
    # Training queries as the embedder takes them: images per prompt, frames, sketches, image caps.
    view = ufire.train_view(train_subsets, **embedder.query_options())
    sizes = dict(view.sizes)  # {sub-dataset: N_k}
    plan = plan_steps(sizes, cfg, di)
    model, params, optimizer, scheduler = build_optimizer(embedder, cfg, plan, di)
    task_sampler = make_sampler(sizes, cfg, plan, di)
    run = Run(cfg=cfg, di=di, out=out, ufire=ufire, val_subsets=val_subsets, embedder=embedder, model=model,
              params=params, view=view, optimizer=optimizer, scheduler=scheduler, task_sampler=task_sampler,
              plan=plan, t_start=t_start)
    if resume_dir is not None:
        restore_state(run, resume_dir)
    run.batches = iter(run.task_sampler)
    # The loader first: in "process" mode it forks here, while this process has a single thread.
    run.loader = Prefetcher(partial(prepare_batch, view, embedder, cfg.seed), cfg.loader)
    if use_two_cores(cfg, embedder, di, threads, sizes):
        run.spare = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="spare-core")
    if di.main:
        write_resolved_config(run, threads, sizes, resume_dir)
    return run


def step_chunk_size(cfg: TrainConfig, subset: str) -> int:
    """The GradCache chunk of a batch of `subset`: --chunk-size, or (-1) the authors' size for it."""
    return recipes.chunk_size_for(subset, cfg.chunk_size)


def fits_one_chunk(chunk: int, rows: int) -> bool:
    """A batch of `rows` per rank is one chunk: no GradCache (chunk 0) or a chunk that holds it all."""
    return chunk == 0 or chunk >= rows


def use_two_cores(cfg: TrainConfig, embedder, di: DistInfo, threads: int, sizes: dict) -> bool:
    """--two-cores auto: keep a spare core for two_core_step where it is faster and deterministic
    (see its docstring): a CPU with a second core and one torch thread, no DDP, no dropout, and a
    sub-dataset whose batch fits one GradCache chunk.

    The chunk may depend on the sub-dataset (--chunk-size -1), so train_step decides per batch:
    two_core_step for a batch that fits one chunk, gradcache_step for the others. The two paths
    give the same gradient up to float summation order, and which one a step takes depends only on
    its sub-dataset, so an exact resume stays exact.
    """
    rows = {k: min(cfg.batch_size, n - n % di.world) // di.world for k, n in sizes.items()}  # b_k per rank
    return (cfg.two_cores == "auto" and di.device == "cpu" and not di.enabled and threads == 1
            and (os.cpu_count() or 1) >= 2
            and any(fits_one_chunk(step_chunk_size(cfg, k), b) for k, b in rows.items())
            and getattr(getattr(embedder, "config", None), "lora_dropout", 0.0) == 0.0)


def build_embedder(cfg: TrainConfig, device: str, resume_from: Optional[Path] = None):
    """A fresh embedder from the config, or the checkpoint's (with its trainable parts trainable)."""
    if resume_from is not None:
        return FashionLensEmbedder.from_pretrained(str(resume_from), backbone=cfg.backbone, device=device)
    return FashionLensEmbedder(EmbedderConfig(backbone=cfg.backbone, seed=cfg.seed, calibrator=cfg.calibrator,
                                              device=device, **cfg.embedder_fields()))


def plan_steps(sizes: dict, cfg: TrainConfig, di: DistInfo) -> Plan:
    """Steps, epochs and warm-ups; --epochs overrides --steps."""
    steps_per_epoch = max(1, sampler.TaskBatchSampler(sizes, cfg.batch_size).steps_per_epoch())
    total = math.ceil(cfg.epochs * steps_per_epoch) if cfg.epochs > 0 else cfg.steps
    return Plan(total=total, steps_per_epoch=steps_per_epoch,
                ggas_warmup=cfg.ggas_warmup if cfg.ggas_warmup >= 0 else min(steps_per_epoch, total // 4),
                lr_warmup=max(1, round(cfg.warmup_ratio * total)), per_rank=cfg.batch_size // di.world)


def build_optimizer(embedder, cfg: TrainConfig, plan: Plan, di: DistInfo):
    """(model, trainable params, AdamW, lr schedule); model = DDP(embedder) under torchrun.

    AdamW decays every trainable parameter by weight_decay, as the authors' (train.py 98: one group
    over every parameter with requires_grad); the schedule is lr_factor's.
    """
    params = [p for p in embedder.parameters() if p.requires_grad]
    # Two parameter groups: the vision tower (if it trains) at lr x vision_lr_scale, the rest at lr.
    # The schedule (LambdaLR) multiplies each group's own base lr, so both follow it.
    vision_ids = {id(p) for p in embedder.vision_parameters()}
    groups = [{"params": [p for p in params if id(p) not in vision_ids], "lr": cfg.lr, "name": "adapters"}]
    if vision_ids:
        groups.append({"params": [p for p in params if id(p) in vision_ids],
                       "lr": cfg.lr * cfg.vision_lr_scale, "name": "vision"})
    model = embedder
    if di.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            embedder, device_ids=[di.local_rank] if di.device.startswith("cuda") else None,
            find_unused_parameters=cfg.find_unused_parameters)
    # fused: one kernel for the whole update instead of ~10 small ops per tensor (the calibrator alone
    # has 4.3 M parameters in many tensors); the same update up to float rounding (docs/RESULTS.md).
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, plan.total, plan.lr_warmup, cfg.min_lr_ratio, cfg.lr_schedule))
    return model, params, optimizer, scheduler


def make_sampler(sizes: dict, cfg: TrainConfig, plan: Plan, di: DistInfo):
    """GGAS over the training sub-datasets; batch_size is GLOBAL, each rank gets its shard."""
    return sampler.TaskBatchSampler(sizes, cfg.batch_size, strategy=cfg.sampler, warmup_steps=plan.ggas_warmup,
                                    refresh=cfg.ggas_refresh, ema_start=cfg.ggas_ema_start, floor=cfg.ggas_floor,
                                    seed=cfg.seed, rank=di.rank, world_size=di.world)


def restore_state(run: Run, resume_dir: Path) -> None:
    """Put back optimizer, schedule, sampler, RNGs and counters from last/ (an exact resume)."""
    try:
        st = plumbing.read_state(resume_dir)
    except (OSError, ValueError, KeyError, SafetensorError) as e:  # ValueError: JSON; the rest: tensors
        raise TrainingError(f"{resume_dir}: unreadable training state ({STATE_JSON} / {STATE_TENSORS}: "
                            f"{type(e).__name__}: {e}); resume from an intact copy of the run") from None
    if st["world_size"] != run.di.world:
        raise SystemExit(f"error: {resume_dir} was written by {st['world_size']} processes, now {run.di.world}")
    run.optimizer.load_state_dict(st["optimizer"])
    run.scheduler.load_state_dict(st["scheduler"])
    run.task_sampler.load_state_dict(st["sampler"])
    plumbing.rng_restore(st["rng"])
    run.step, run.best, run.elapsed0 = int(st["step"]), dict(st["best"]), float(st.get("elapsed", 0.0))


def write_resolved_config(run: Run, threads: int, sizes: dict, resume_dir: Optional[Path]) -> None:
    """Print and save config.json (the config plus what it resolved to); on resume, trim the log."""
    p = run.plan
    resolved = {**dataclasses.asdict(run.cfg), "resolved": {
        "out": str(run.out), "total_steps": p.total, "steps_per_epoch": p.steps_per_epoch,
        "ggas_warmup_steps": p.ggas_warmup, "lr_warmup_steps": p.lr_warmup, "world_size": run.di.world,
        "per_rank_batch": p.per_rank, "device": run.di.device, "cpu_threads": threads, "train_subsets": sizes,
        "chunk_sizes": {k: step_chunk_size(run.cfg, k) for k in sizes},
        "loader": run.loader.mode, "two_core_step": run.spare is not None,
        "val_subsets": run.val_subsets, "resumed_from": str(resume_dir) if resume_dir else None,
        "resumed_at_step": run.step}}
    print("FashionLens training, resolved configuration:\n" + json.dumps(resolved, indent=1), flush=True)
    atomic_write(run.out / "config.json", json.dumps(resolved, indent=1))
    if resume_dir is not None:
        plumbing.trim_jsonl(run.log_path, run.step)  # the steps after the checkpoint are redone


def check_not_empty(ufire, split: str, subsets: list, need: int) -> None:
    """Every selected sub-dataset must hold >= `need` records (one per DDP process for training).

    GGAS samples every training sub-dataset, and validation sums Recall@1 over every val one: an
    empty file would fail deep inside the sampler, or turn the model-selection score into NaN.
    """
    for s in subsets:
        n = len(ufire.records(s, split))
        if n < need:
            raise TrainingError(f"{ufire.triplet_file(s, split)}: {split} sub-dataset {s!r} has {n} records "
                                f"(needs at least {need}); fill the file or leave {s} out of --tasks")


# Checkpoints and files of the run folder that plumbing.atomic_write publishes; an interrupted
# write leaves its .NAME.tmp (and, between its two renames, .NAME.old) behind.
RUN_OUTPUTS = ("best", "last", "config.json", "log.jsonl", "test_results.json")


def clean_interrupted_writes(out: Path) -> None:
    """Remove the temporaries of writes a killed run left in `out`, and put back a half-swapped best/.

    atomic_write clears .NAME.tmp itself when it writes NAME again, but best/ may never be written
    again, so its temporary (a whole checkpoint) would stay. A run killed between atomic_write's two
    renames has only .best.old: it is the complete best checkpoint, so it becomes best/ again
    (final_test loads best/). last/ is left to find_resume_checkpoint, which reads .last.old.
    """
    for name in RUN_OUTPUTS:
        tmp = out / f".{name}.tmp"
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp)
        elif tmp.exists() or tmp.is_symlink():
            tmp.unlink()
        else:
            continue
        print(f"removed {tmp}, the remains of an interrupted write", flush=True)
    best, old = out / "best", out / ".best.old"
    if old.is_dir() and not best.exists() and (old / "metrics.json").is_file():
        os.replace(old, best)
        print(f"restored {best} from {old} (a write of best/ was interrupted)", flush=True)


# ================================================================================================
# The loop, part 2: one step
# ================================================================================================


def train_step(run: Run) -> tuple[StepOut, str]:
    """Draw a batch, compute the gradient, clip, update, tell GGAS, log. Returns (result, sub-dataset)."""
    cfg, di = run.cfg, run.di
    subset, indices = next(run.batches)
    # The batch: the loader prepared it during the previous step if it guessed this draw, else it
    # is prepared now; the same batch either way (prepare_batch is pure).
    hits = run.loader.stats.hits
    batch = run.loader.get((subset, tuple(indices), run.step))
    prefetched = run.loader.stats.hits > hits
    if run.step + 1 < run.plan.total:  # guess the next draw: exact unless this step's report moves it
        guess_subset, guess_indices = run.task_sampler.peek()
        run.loader.submit((guess_subset, tuple(guess_indices), run.step + 1))
    # Every step re-seeds torch (dropout) from (seed, step, rank) and the data draws from
    # (seed, step, record): a resumed run replays exactly what the uninterrupted one drew.
    torch.manual_seed(mix_seed(cfg.seed, run.step, di.rank))
    chunk = step_chunk_size(cfg, subset)  # this batch's GradCache chunk (per sub-dataset under -1)
    try:
        if run.spare is not None and fits_one_chunk(chunk, len(batch.keys)):  # two CPU cores (the CPU default)
            so = two_core_step(run.model, batch, cfg.temperature, run.spare, cfg.positives)
        elif chunk > 0:
            so = gradcache_step(run.model, batch, cfg.temperature, di, chunk_size=chunk, positives=cfg.positives,
                                reg_per_chunk=cfg.reg_per_chunk)
        else:
            so = full_batch_step(run.model, batch, cfg.temperature, di, cfg.positives)
        tok = token_grad_norm(run.embedder)  # GGAS difficulty (before clipping: the raw signal)
        gnorm = clip_gradients(run.params, cfg.grad_clip)
        if not math.isfinite(gnorm):
            raise NonFiniteLoss(f"gradient norm = {gnorm}")
    except NonFiniteLoss as err:
        raise TrainingError(
            f"non-finite training signal ({err}) at step {run.step + 1} on sub-dataset {subset!r}; "
            f"stopping without an update. Last good checkpoint: "
            f"{find_last_good(run.out) or 'none yet (no checkpoint was written before this step)'}") from None
    lr = run.optimizer.param_groups[0]["lr"]  # the lr this update uses (for the log)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.task_sampler.update(subset, tok)
    run.step += 1
    now = time.time()
    if di.main:
        append_jsonl(run.log_path, {
            "step": run.step, "loss": so.loss, "nce": so.nce, "reg": so.reg, "lr": lr, "subset": subset,
            "chunk_size": chunk,
            "grad_norm": gnorm, "token_grad_norm": tok, "lam_mean": so.lam,
            "angle_deg": math.degrees(so.angle), "prefetched": prefetched,
            "probabilities": run.task_sampler.probabilities(),
            "difficulties": {k: float(v) for k, v in run.task_sampler.difficulties().items()},
            "time": run.elapsed0 + now - run.t_start, "step_seconds": now - run.t_prev})
    run.t_prev = now
    return so, subset


def find_last_good(out: Path) -> str:
    """The checkpoint a stopped run can resume from, for the error message ("" when there is none)."""
    for cand in (out / "last", out / ".last.old"):
        try:
            return f"{cand} (step {json.loads((cand / STATE_JSON).read_text())['step']})"
        except (OSError, ValueError, KeyError, TypeError):  # absent or unreadable: not resumable
            continue
    return ""


# ================================================================================================
# The loop, part 3: validate and save
# ================================================================================================


def validate_and_save(run: Run) -> None:
    """Val Recall@1/10 on rank 0, keep best/, refresh last/. Other ranks wait."""
    if run.di.main:
        t0 = time.time()
        # Validation must not move the training RNG: the next step's draws stay those of a run
        # validated at other steps (or resumed).
        devices = [run.di.device] if run.di.device.startswith("cuda") else []
        with torch.random.fork_rng(devices=devices):
            res = evaluate.evaluate(run.embedder, run.ufire, run.val_subsets, split="val", ks=(1, 10),
                                    batch_size=run.cfg.eval_batch_size, cache_dir=None, progress=False,
                                    max_queries=run.cfg.max_eval_queries)
        run.embedder.train()
        score = res.sum_recall(1)  # the authors' model-selection number
        rec = {"event": "val", "step": run.step, "sum_recall1": score,
               "recall": {r.subset: {str(k): v for k, v in r.recall.items()} for r in res.rows},
               "seconds": time.time() - t0}
        append_jsonl(run.log_path, rec)
        tqdm.write(f"step {run.step}: val sum of Recall@1 = {score:.3f} over {len(res.rows)} sub-datasets "
                   f"(best so far {run.best['score']:.3f} @ {run.best['step']}) [{rec['seconds']:.0f}s]")
        if score > run.best["score"]:  # strictly better: the first of equal scores stays best
            run.best = {"step": run.step, "score": score}
            save_checkpoint(run.out / "best", run.embedder, run.cfg, extra={"val": rec})
        save_checkpoint(run.out / "last", run.embedder, run.cfg, state=train_state(run))
    barrier(run.di)


def save_last(run: Run) -> None:
    """Refresh last/ without validating (--stop-at); other ranks wait."""
    if run.di.main:
        save_checkpoint(run.out / "last", run.embedder, run.cfg, state=train_state(run))
    barrier(run.di)


def train_state(run: Run) -> dict:
    """Everything an exact resume needs besides the weights."""
    return {"step": run.step, "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
            "sampler": run.task_sampler.state_dict(), "rng": plumbing.rng_snapshot(), "best": run.best,
            "world_size": run.di.world, "elapsed": run.elapsed0 + time.time() - run.t_start}


def save_checkpoint(folder: Path, embedder, cfg: TrainConfig, state: Optional[dict] = None,
                    extra: Optional[dict] = None) -> None:
    """Publish folder/ atomically: the embedder's files, the TrainConfig, and metrics or state.

    plumbing.atomic_write builds it beside the old one and swaps (old -> .NAME.old, new -> NAME),
    so at every moment NAME or .NAME.old is complete; `find_resume_checkpoint` looks at both.
    """
    def build(tmp: Path) -> None:
        embedder.save_into(tmp)  # weights, adapter, tokens, calibrator, tokenizer, embedder config
        (tmp / CONFIG_JSON).write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
        if extra is not None:
            (tmp / "metrics.json").write_text(json.dumps(extra, indent=1))
        if state is not None:
            plumbing.write_state(tmp, state)

    atomic_write(folder, build)


def find_resume_checkpoint(run: Path) -> Path:
    """runs/NAME (or runs/NAME/last) -> the directory holding the latest complete training state."""
    run = Path(run)
    for cand in (run, run / "last", run / ".last.old"):
        if (cand / STATE_JSON).is_file() and (cand / STATE_TENSORS).is_file():
            return cand
    raise FileNotFoundError(f"--resume {run}: no training state found in {run}/last "
                            f"(expected {STATE_JSON} and {STATE_TENSORS})")


# ================================================================================================
# The loop, put together
# ================================================================================================


def train(cfg: TrainConfig, resume: Optional[str] = None) -> dict:
    """Run training as configured; returns a summary (best step/score, test result, wall time)."""
    run = setup(cfg, resume)
    cfg, total = run.cfg, run.plan.total  # the resolved config
    bar = tqdm(total=total, initial=run.step, desc="train", disable=not run.di.main, dynamic_ncols=True)
    run.t_prev = time.time()
    try:
        while run.step < total:
            so, subset = train_step(run)
            bar.update(1)
            bar.set_postfix(step=run.step, loss=f"{so.loss:.3f}", task=subset, refresh=False)
            if run.step % cfg.eval_every == 0 or run.step == total:
                validate_and_save(run)
            elif cfg.stop_at and run.step == cfg.stop_at:
                save_last(run)
            if cfg.stop_at and run.step == cfg.stop_at and run.step < total:
                bar.close()
                if run.di.main:
                    print(f"stopped after step {run.step} as asked (--stop-at); continue with --resume {run.out}")
                return {"out": str(run.out), "stopped_at": run.step, "best": run.best}
    except KeyboardInterrupt:  # Ctrl-C: the checkpoints on disk are intact (atomic), say which to use
        raise Interrupted(stopped_message(run) if run.di.main else "") from None
    finally:
        bar.close()
        run.loader.close()
        if run.spare is not None:
            run.spare.shutdown()
    try:
        return finish(run)
    except KeyboardInterrupt:
        raise Interrupted(f"stopped by Ctrl-C in the final test; training is complete, its checkpoints are "
                          f"{run.out}/best and {run.out}/last (test: python evaluate.py --ckpt {run.out}/best)"
                          if run.di.main else "") from None


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says where the run stopped and how to continue it."""


def stopped_message(run: Run) -> str:
    """One line for a run stopped by Ctrl-C: the step, the checkpoint to resume from, the command."""
    head = f"stopped by Ctrl-C after step {run.step} of {run.plan.total}"
    last = find_last_good(run.out)
    if last:
        return f"{head}; last checkpoint {last}; continue with --resume {run.out}"
    return (f"{head}, before the first checkpoint (written every {run.cfg.eval_every} steps): nothing to "
            f"resume; start again after removing {run.out}, or with another --out")


def finish(run: Run) -> dict:
    """Check the DDP ranks agree, test best/ on rank 0, print and return the summary."""
    di, out = run.di, run.out
    if di.enabled:
        check_ranks_agree(run.embedder, di)
    summary = {"out": str(out), "steps": run.plan.total, "best": run.best, "train_seconds": time.time() - run.t_start}
    if di.main and run.cfg.final_test:
        summary["test"] = final_test(run.cfg, out, run.ufire, di.device)
    summary["wall_seconds"] = time.time() - run.t_start
    summary["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if di.main:
        print(f"done: {run.plan.total} steps, best val sum Recall@1 {run.best['score']:.3f} at step "
              f"{run.best['step']}; wall {summary['wall_seconds']:.0f}s, peak RSS {summary['peak_rss_mib']:.0f} MiB; "
              f"checkpoints in {out}/best and {out}/last")
    barrier(di)
    return summary


def check_ranks_agree(module, di: DistInfo) -> None:
    """DDP must keep every rank's weights identical; verify it at the end of a run (cheap)."""
    digests = plumbing.rank_digests(module, di)
    if di.main:  # one process prints every rank's digest: lines from several processes can interleave
        for r, d in enumerate(digests):
            print(f"[rank {r}] trainable parameters sha256 {d}", flush=True)
    if len(set(digests)) > 1:
        raise TrainingError("DDP ranks ended with different parameters (digests differ): "
                            + ", ".join(d[:12] for d in digests))


def final_test(cfg: TrainConfig, out: Path, ufire, device: str) -> dict:
    """Reload best/ from disk (also proving it loads) and print the test Recall@K table."""
    best = FashionLensEmbedder.from_pretrained(str(out / "best"), device=device)
    subsets = ufire.select("test", cfg.tasks)
    res = evaluate.evaluate(best, ufire, subsets, split="test", ks=(1, 5, 10, 50),
                            batch_size=cfg.eval_batch_size, cache_dir=None, progress=sys.stderr.isatty())
    print(f"\nTest Recall@K of {out / 'best'} (data: {cfg.data})")
    print(evaluate.format_table(res))
    doc = {"checkpoint": str(out / "best"), "data": cfg.data, "split": "test", **res.to_dict()}
    atomic_write(out / "test_results.json", json.dumps(doc, indent=1))
    return doc


# ================================================================================================
# Command line
# ================================================================================================

FLAG_HELP = {  # --help text per TrainConfig field (the field comments above say why)
    "tasks": "'all' or task words / task/dataset names, comma or space separated",
    "data": "'synthetic' (generated into data/synthetic) or a U-FIRE root",
    "backbone": "tiny | tiny-qwen2-vl | hub id | local path", "out": "run directory (runs/NAME)",
    "recipe": "defaults of the other flags: auto (tiny-cpu for a tiny backbone, else paper) | paper | tiny-cpu",
    "steps": "optimizer steps (alone: --epochs 0)", "epochs": "train for this many epochs instead (alone: --steps 0)",
    "batch_size": "global contrastive batch",
    "chunk_size": "GradCache chunk per rank; 0 = no GradCache; -1 = the authors' size per sub-dataset",
    "lr": "peak learning rate", "temperature": "InfoNCE temperature",
    "calibrator": "slerp | linear | off", "sampler": "ggas | uniform | size",
    "ggas_warmup": "uniform-sampling steps before GGAS adapts (-1: one epoch, capped at steps/4)",
    "eval_every": "validate + checkpoint every N steps", "seed": "run seed", "device": "auto | cpu | cuda",
    "max_eval_queries": "validation queries per sub-dataset (0 = all)",
    "stop_at": "stop this invocation after this step (resume later with --resume)",
    "final_test": "evaluate best/ on the test split at the end",
    "weight_decay": "AdamW weight decay", "warmup_ratio": "share of steps with linear lr warm-up",
    "vision_lr_scale": "learning rate of a trainable vision tower, as a share of --lr",
    "min_lr_ratio": "final lr as a share of --lr (cosine decay)", "grad_clip": "max global gradient norm; 0 = off",
    "lr_schedule": "constant (after any warm-up) | cosine (warm-up, then cosine decay)",
    "positives": "single: only the query's own target | multi: every in-batch copy of it too",
    "reg_per_chunk": "add the calibrator regulariser once per GradCache chunk instead of once per batch",
    "ggas_refresh": "recompute GGAS probabilities at each epoch start | every step",
    "ggas_ema_start": "GGAS difficulty starts at zero | at the first report",
    "ggas_floor": "renorm: clip at the floor and renormalise once | waterfill: the floor holds exactly",
    "min_pixels": "least pixels per image (aspect ratio kept)", "max_pixels": "most pixels per image",
    "max_query_images": "query images per prompt (0 = all)", "query_sketches": "one | all sketches per prompt",
    "summary_init": "where the summary tokens start: im_end (the authors) | words",
    "num_frames": "frames of a video query", "video_size": "side of a video frame (pixels)",
    "lora_dropout": "LoRA dropout",
    "eval_batch_size": "batch size of validation/test encoding",
    "cpu_threads": "torch CPU threads (0: OMP_NUM_THREADS, else 1 for a tiny backbone on CPU)",
    "loader": "who prepares the next batch: thread, process (a forked worker), or off (in the loop)",
    "two_cores": "auto: share each step between two CPU cores where that is deterministic; off",
}


def build_parser() -> argparse.ArgumentParser:
    """One flag per TrainConfig field; defaults are SUPPRESSed so we can tell what was given.
    A field the recipes set shows both recipes' values as its default."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="Defaults: see TrainConfig in train.py (printed at start).")
    choices = {"calibrator": ["slerp", "linear", "off"], "sampler": list(sampler.STRATEGIES),
               "loader": list(LOADER_MODES), "two_cores": ["auto", "off"], "recipe": ["auto", *recipes.RECIPE_NAMES],
               "lr_schedule": list(LR_SCHEDULES), "positives": list(POSITIVES), "query_sketches": list(data.SKETCH_MODES),
               "summary_init": list(SUMMARY_INITS),
               "ggas_refresh": list(sampler.REFRESH_MODES), "ggas_ema_start": list(sampler.EMA_STARTS),
               "ggas_floor": list(sampler.FLOORS)}
    by_recipe = {r: dataclasses.asdict(TrainConfig(recipe=r).resolved()) for r in recipes.RECIPE_NAMES}
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = (", ".join(f"{r}: {v[f.name]!r}" for r, v in by_recipe.items()) if f.default is None
                   else repr(f.default))  # None: the recipe's value
        shown = f"{FLAG_HELP.get(f.name, '')} (default: {default})"
        kw = {"default": argparse.SUPPRESS, "help": argparse.SUPPRESS if f.name in HIDDEN_FLAGS else shown}
        kind = str(f.type).removeprefix("Optional[").removesuffix("]")  # "int", "float", "str" or "bool"
        if kind == "bool":
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.name == "tasks":
            ap.add_argument(flag, nargs="+", **kw)
        else:
            typ = {"int": int, "float": float, "str": str}[kind]
            ap.add_argument(flag, type=typ, choices=choices.get(f.name), **kw)
    ap.add_argument("--resume", default=None, help="continue the run in this directory (runs/NAME) exactly")
    return ap


def parse_config(argv=None) -> tuple[TrainConfig, Optional[str]]:
    """CLI -> (TrainConfig, resume dir). With --resume, the run's saved config is the base."""
    args = vars(build_parser().parse_args(argv))
    resume = args.pop("resume")
    if "tasks" in args:  # "--tasks t2i cir", "--tasks t2i,cir" and "--tasks 't2i cir'" all work
        args["tasks"] = ",".join(w for a in args["tasks"] for w in a.replace(",", " ").split())
    if resume is None:
        return TrainConfig(**args), None
    saved_file = find_resume_checkpoint(Path(resume)) / CONFIG_JSON
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    try:  # fields a newer version dropped are ignored
        base = TrainConfig(**{k: v for k, v in json.loads(saved_file.read_text()).items() if k in names})
    except (OSError, ValueError, TypeError, AttributeError) as e:  # missing, bad JSON, not an object
        raise TrainingError(f"{saved_file}: unreadable training config ({type(e).__name__}: {e})") from None
    for k, v in args.items():
        if k not in RESUME_MAY_CHANGE and v != getattr(base, k):
            raise SystemExit(f"error: --{k.replace('_', '-')} {v!r} differs from the resumed run's "
                             f"{getattr(base, k)!r}; an exact resume keeps the training configuration "
                             f"(may change: {', '.join(sorted(RESUME_MAY_CHANGE))})")
    base = dataclasses.replace(base, **args)
    if "out" not in args:  # continue in the directory we resume from
        p = Path(resume)
        base.out = str(p.parent if p.name in ("last", ".last.old") else p)
    return base, resume


def main(argv=None) -> int:
    """The CLI: 0 on success; 1 and one `error:` line for bad input or a stopped run (errors.run_cli:
    every FashionLensError, and a missing --resume folder); 130 and one line for Ctrl-C."""
    return run_cli(_main, argv, expected=(FileNotFoundError,))


def _main(argv=None) -> int:
    """Parse, train, and leave the process group; Ctrl-C says whether and how the run can continue."""
    resume = None
    try:
        cfg, resume = parse_config(argv)
        train(cfg, resume)
    except KeyboardInterrupt as stop:
        msg = str(stop) if isinstance(stop, Interrupted) else (
            "interrupted (Ctrl-C) while starting, before any training step"
            + (f"; the run still continues with --resume {resume}" if resume else ""))
        if msg:  # under torchrun only rank 0 speaks
            print(msg, file=sys.stderr, flush=True)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
