"""Contrastive multi-task training of FashionLens (GradCache, GGAS batches, DDP, exact resume).

Where this sits in the method
-----------------------------
FashionLens (Wen et al., 2026) trains one multimodal-LLM retriever for every U-FIRE task. Each step:

1. GGAS (sampler.py) picks ONE sub-dataset k and a batch of its records, so every in-batch negative
   comes from the same gallery as the positive (mixing tasks would make negatives trivially easy).
2. The embedder (model.py) turns the B queries into calibrated unit vectors q_i (PGSQC,
   calibrator.py) and the B target images into unit vectors t_j.
3. The loss is a multi-positive InfoNCE from queries to targets plus the calibrator's regulariser:

       s_ij  = q_i . t_j / tau                                    (cosine similarity / temperature)
       P(i)  = { j : key(t_j) == key(t_i) }   (same image as i's target; for asfr, same label: positives)
       L_nce = (1/B) sum_i [ log sum_j exp(s_ij) - log sum_{j in P(i)} exp(s_ij) ]
       L     = L_nce + R_cal,     R_cal = (1/B) sum_i [ w_fro L_fro(i) + w_orth L_orth(i) ]

   P(i) always holds i itself; when two queries in a batch share a target image (common in small
   galleries), that image is a positive for both instead of a false negative.
4. GradCache (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
   Setup") decouples the contrastive batch from memory: (a) a no-grad pass over chunks gives all
   representations, (b) L and dL/d(representations) are computed on the whole batch, (c) each chunk
   is re-encoded WITH grad and back-propagated with its cached gradient, i.e. we call backward on
   the surrogate  sum_i q_i . dL/dq_i + sum_j t_j . dL/dt_j + R_cal(chunk).  Its parameter gradient
   equals dL/dtheta exactly, as long as the re-run sees the same dropout masks: we restore the RNG
   state (CPU and CUDA) each chunk had in pass (a). `full_batch_step` is the plain reference
   computation (`--chunk-size 0`) and tests/test_train.py holds the two equal with dropout on.
5. Clip the gradient norm, AdamW (a trainable vision tower at lr x vision_lr_scale), linear warm-up
   + cosine decay; then report the norm of the learnable query/target token gradients to GGAS as the
   sub-dataset's difficulty (the authors' signal: these two embeddings are shared by every task, so
   their gradient says how far task k currently pulls the model).

Model selection follows the authors: every --eval-every steps, Recall@1 on each validation
sub-dataset is summed and the best checkpoint is kept in runs/NAME/best; runs/NAME/last holds the
latest weights plus the whole training state, so `--resume runs/NAME` continues exactly (same
batches, same dropout masks, same optimizer state => the same final weights as an uninterrupted run).

Multi-GPU: under `torchrun --nproc_per_node N train.py ...` the model is wrapped in DDP, every rank
gets a disjoint shard of the SAME sub-dataset's batch (GGAS shares its RNG across ranks), and the
representations are all-gathered so every query sees every rank's targets as negatives. Each rank
computes the same global loss; see `gather_with_grad` and `gradcache_step` for how the gradients
are scaled so that DDP's averaging yields exactly dL/dtheta. On CPU the gloo backend is used, so the
path is tested on a laptop: `torchrun --nproc_per_node 2 train.py --steps 4 ...`.

Run it
------
    python train.py --tasks all                 # synthetic U-FIRE + tiny backbone, CPU, ~10 min
    python train.py --tasks t2i,cir --steps 200 --out runs/small
    python train.py --resume runs/small         # continue an interrupted run exactly
    python train.py --data /path/U-FIRE --backbone Qwen/Qwen3-VL-4B-Instruct --batch-size 256 \\
        --chunk-size 32 --lr 1e-4 --epochs 1   # the real thing, one GPU
    torchrun --nproc_per_node 8 train.py --data /path/U-FIRE --backbone Qwen/Qwen3-VL-4B-Instruct

Outputs in runs/NAME: config.json (resolved configuration), log.jsonl (one line per step and per
validation), best/ and last/ (checkpoints; `python evaluate.py --ckpt runs/NAME/best`),
test_results.json (final test table).

Shape legend: B batch (queries = targets), b per-rank batch, c chunk, D embedding size,
G gallery, r rank, T tasks (sub-datasets), W world size (processes).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# OpenMP threads that busy-wait between ops collapse when the cores are shared (another job, a
# test run, a second torchrun rank): we measured 20 s/step instead of 1.3 s on 2 busy cores.
# Sleeping waiters cost nothing measurable when the machine is ours. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402  (after the OpenMP setting above)
import torch.distributed as dist  # noqa: E402
from tqdm import tqdm  # noqa: E402

import data  # noqa: E402

# ================================================================================================
# Configuration
# ================================================================================================


@dataclass
class TrainConfig:
    """Everything that defines a training run; each CLI flag maps onto one field (dashes -> _)."""

    tasks: str = "all"  # "all" or comma-separated task words / "task/dataset" names: the paper trains on all
    data: str = "synthetic"  # "synthetic" = data/synthetic, generated on first use (offline default); or a U-FIRE root
    backbone: str = "tiny"  # "tiny" (offline random Qwen3-VL) | "tiny-qwen2-vl" | hub id | local path
    out: str = ""  # run directory; "" = runs/fashionlens-<backbone name>
    steps: int = 1400  # optimizer steps: ~0.3 s each for the tiny model at batch 16 on one Xeon core, so
    #                   the default run (data generation, 7 validations, the test table) takes ~8 min.
    #                   600 steps left compatibility at chance; at 1400 every test row is >= 5x chance
    #                   (README "Results"), and val Recall@1 was still rising at the last step
    epochs: float = 0.0  # > 0 replaces --steps by epochs x GGAS' steps per epoch (sum_k N_k // batch)
    batch_size: int = 16  # global contrastive batch (all ranks). On the tiny CPU default, 600 steps of 16
    #                      beat 300 steps of 32 at the same cost (val sum R@1 2.59 vs 2.21)
    chunk_size: int = 16  # GradCache sub-batch per rank; 0 = plain reference path. A batch that fits one
    #                      chunk skips GradCache's extra forward: the tiny CPU default (16/16) does,
    #                      a real run with --batch-size 256 --chunk-size 32 re-encodes 8 chunks
    lr: float = 1e-3  # peak AdamW lr; on the tiny default 3e-3 learned slower (val sum R@1 at step 100:
    #                  0.79 vs 1.23); use ~1e-4 for a pretrained Qwen-VL
    vision_lr_scale: float = 0.1  # the trainable (random tiny) vision tower learns at lr x this. At the full
    #                              lr it soon encodes only colour and the sketch rows sit at chance; at 0.1
    #                              the then 600-step default's overall test R@10 went from 29.3 to 33.9 %
    #                              and the sketch rows to 5.6-6x chance (seed 0; README "Results"). No
    #                              effect on a frozen (pretrained) tower
    weight_decay: float = 0.0  # AdamW decay; 0 as the LoRA adapters are small and the runs short
    warmup_ratio: float = 0.05  # share of steps with a linear lr warm-up, so Adam's moments settle first
    min_lr_ratio: float = 0.05  # cosine ends at lr x this, so the last steps still move the model a bit
    grad_clip: float = 1.0  # max global grad norm: one bad batch (a rare task) cannot blow the LoRA up
    temperature: float = 0.07  # InfoNCE tau: the common value for CLIP-style retrieval, used by the authors
    calibrator: str = "slerp"  # PGSQC mode: slerp (the method) | linear | off (ablations)
    sampler: str = "ggas"  # task sampling: ggas (the method) | uniform | size (ablations)
    ggas_warmup: int = -1  # uniform sampling for N steps; -1 = one epoch (the authors) capped at steps/4, so
    #                        a short run still adapts (the CPU default: 350 uniform steps of 1400, not 736)
    eval_every: int = 200  # validate (sum of val Recall@1) + checkpoint every N steps; ~8 s each on the tiny default
    max_eval_queries: int = 0  # validation queries per sub-dataset (evenly spaced); 0 = all
    eval_batch_size: int = 64  # batch size of validation/test encoding
    final_test: bool = True  # evaluate the best checkpoint on the test split at the end and print the table
    seed: int = 0  # seeds the tiny base, sampler, data draws and dropout (every step re-seeded from it)
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N; under torchrun: cuda:LOCAL_RANK
    cpu_threads: int = 0  # torch CPU threads; 0 = auto: OMP_NUM_THREADS if set, else 1 for a tiny backbone on
    #                      CPU (its 128-wide matmuls are too small to split: a step took 0.28 s on 1 thread
    #                      and 0.34 s on 2), else torch's default
    stop_at: int = 0  # end this invocation after this step (writes last/), e.g. a job time limit; 0 = never
    find_unused_parameters: bool = False  # DDP: every forward embeds queries AND targets, so every trainable
    #                                       parameter gets a gradient each backward; True only for a custom model
    debug_nan_at_step: int = 0  # test hook (hidden flag): poison the loss at this step to test the NaN stop

    def resolved_out(self) -> str:
        """The run directory: --out, or runs/fashionlens-<last path part of the backbone>."""
        if self.out:
            return self.out
        name = self.backbone.rstrip("/").split("/")[-1] or "model"
        return f"runs/fashionlens-{name}"


# Fields a resumed run may change: they do not touch the optimisation trajectory.
RESUME_MAY_CHANGE = {"out", "device", "cpu_threads", "stop_at", "eval_every", "max_eval_queries",
                     "eval_batch_size", "final_test", "debug_nan_at_step"}
# Flags that only tests use: hidden from --help to keep it readable.
HIDDEN_FLAGS = {"debug_nan_at_step", "find_unused_parameters"}


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says where and what is left."""


# ================================================================================================
# Distributed helpers (all no-ops in a single process)
# ================================================================================================


@dataclass
class DistInfo:
    """Where this process sits: rank r of W processes, and the device it computes on."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistInfo:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if world > 1:
        if device.startswith("cuda"):
            device = f"cuda:{local}"  # one GPU per process
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return DistInfo(rank=rank, world=world, local_rank=local, device=device)


def barrier(di: DistInfo) -> None:
    if di.enabled:
        dist.barrier()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the gradient of ITS slice, summed over ranks.

    Every rank computes the same global loss L from the gathered (W*b, D) tensor, so rank s's slice
    receives dL/dx_s from every rank: the sum is W * dL/dx_s, and DDP's gradient averaging (/W)
    brings it back to exactly dL/dtheta. all_reduce + slicing works on every backend (gloo has no
    reduce_scatter), and at (W*b, D) floats it costs nothing next to the model.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(world)]  # W x (b, D)
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.b = dist.get_rank(), x.shape[0]
        return torch.cat(parts, 0)  # (W*b, D)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()  # (W*b, D) all_reduce works in place
        dist.all_reduce(grad)  # sum over ranks of dL/d(gathered)
        return grad[ctx.rank * ctx.b:(ctx.rank + 1) * ctx.b]  # (b, D) this rank's slice


def gather_with_grad(x: torch.Tensor, di: DistInfo) -> torch.Tensor:
    """(b, ...) per rank -> (W*b, ...) in rank order, differentiable. Identity in one process."""
    return _GatherWithGrad.apply(x) if di.enabled else x


def gather_nograd(x: torch.Tensor, di: DistInfo) -> torch.Tensor:
    """(b, ...) per rank -> (W*b, ...) in rank order, no autograd (GradCache pass a, keys)."""
    if not di.enabled:
        return x
    parts = [torch.empty_like(x) for _ in range(di.world)]  # W x (b, ...)
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)  # (W*b, ...)


def mean_over_ranks(x: torch.Tensor, di: DistInfo) -> torch.Tensor:
    """Average of a detached scalar over ranks (for logging the calibrator term)."""
    if not di.enabled:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / di.world


# ================================================================================================
# The loss
# ================================================================================================


def key_ids(keys: list[str], device) -> torch.Tensor:
    """Target keys (absolute image paths) -> (b,) int64 ids equal iff the paths are equal.

    A stable hash (not Python's salted hash()) so that ids agree across DDP ranks.
    """
    ids = [int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little") >> 1 for k in keys]
    return torch.tensor(ids, dtype=torch.int64, device=device)  # (b,)


def info_nce(q: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """Multi-positive InfoNCE, query -> target (see the module docstring for the equation).

    q (B, D) unit queries, t (B, D) unit targets (row i is query i's target), ids (B,) target
    image ids: targets with the same id are the same image, so all of them are positives of query i.
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


@dataclass
class StepOut:
    """What a step reports (gradients are left in the parameters' .grad)."""

    loss: float  # L = L_nce + R_cal, the same on every rank
    nce: float  # L_nce
    reg: float  # R_cal, averaged over ranks
    lam: float  # mean calibrator strength lambda over this rank's queries


class RngState:
    """The CPU (and CUDA) RNG state at one moment, so a chunk can be re-run with the same dropout."""

    def __init__(self, device: str):
        self.cpu = torch.get_rng_state()
        self.cuda_device = torch.device(device) if str(device).startswith("cuda") else None
        self.cuda = torch.cuda.get_rng_state(self.cuda_device) if self.cuda_device is not None else None

    def restore(self) -> None:
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


def full_batch_step(model, batch: Batch, temperature: float, di: DistInfo = DistInfo(),
                    chunk_size: int = 0, poison: bool = False) -> StepOut:
    """The plain computation: encode the whole batch with grad, L on it, one backward.

    Memory grows with the batch (every activation is kept until backward): that is what GradCache
    removes. `chunk_size` > 0 only splits the forward calls (all graphs are still kept) so that the
    dropout masks are drawn exactly as in GradCache: the equality test needs that.
    Under DDP only one forward per step is allowed (chunk_size must be 0).
    """
    n = len(batch.queries)
    parts = _chunks(n, chunk_size)
    if di.enabled and len(parts) > 1:
        raise ValueError("full_batch_step under DDP needs chunk_size=0 (one forward per step)")
    qs, ts, reg, lams = [], [], 0.0, []
    for s, e in parts:
        out = model(queries=batch.queries[s:e], images=batch.images[s:e])
        qs.append(out["q"].float())  # (c, D)
        ts.append(out["t"].float())  # (c, D)
        reg = reg + out["reg"].float() * (e - s) / n  # () R_cal: chunk means -> batch mean
        lams.append(out["lam"].detach().float())  # (c,)
    q = gather_with_grad(torch.cat(qs), di)  # (W*b, D) every rank's queries
    t = gather_with_grad(torch.cat(ts), di)  # (W*b, D) every rank's targets: cross-device negatives
    ids = gather_nograd(key_ids(batch.keys, q.device), di)  # (W*b,)
    nce = info_nce(q, t, ids, temperature)  # () L_nce on the global batch, identical on all ranks
    if poison:
        nce = nce + float("nan")  # test hook (--debug-nan-at-step)
    reg_mean = mean_over_ranks(reg.detach() if torch.is_tensor(reg) else torch.tensor(reg), di)
    loss_value = float(nce.detach() + reg_mean)  # () L = L_nce + R_cal
    _check_finite(loss_value)
    # Each rank adds its own R_cal; DDP averages ranks, which turns them into the global mean.
    (nce + reg).backward()
    return StepOut(loss=loss_value, nce=float(nce.detach()), reg=float(reg_mean), lam=float(torch.cat(lams).mean()))


def gradcache_step(model, batch: Batch, temperature: float, di: DistInfo = DistInfo(),
                   chunk_size: int = 8, poison: bool = False) -> StepOut:
    """GradCache (Gao et al., 2021): the same gradient as `full_batch_step`, memory of one chunk.

    (a) no-grad pass over chunks -> all representations, remembering each chunk's RNG state;
    (b) L and dL/d(representations) on the full (gathered) batch, with a tiny autograd graph that
        starts at the representations;
    (c) per chunk: restore its RNG state (same dropout masks), re-encode with grad, backward the
        surrogate  <q_c, dL/dq_c> + <t_c, dL/dt_c> + (c/b) R_cal(chunk)  whose gradient is the
        chunk's share of dL/dtheta. Parameter gradients accumulate over chunks.
    DDP: (b) runs on the gathered batch, so dL/dq of our slice already includes what every rank's
    queries owe our targets; DDP then averages ranks, so our slice's gradient is scaled by W. All
    but the last chunk's backward run under no_sync: one all-reduce per step.
    """
    module = _unwrap(model)  # pass (a) needs no DDP bookkeeping
    n = len(batch.queries)
    parts = _chunks(n, chunk_size)
    if len(parts) == 1:  # the batch fits one chunk: GradCache would only add a second forward
        return full_batch_step(model, batch, temperature, di, chunk_size=0, poison=poison)
    device = str(getattr(module, "device", di.device))

    # (a) representations without a graph.
    states, qs, ts, lams, reg = [], [], [], [], torch.zeros((), device=device)
    with torch.no_grad():
        for s, e in parts:
            states.append(RngState(device))  # dropout masks of this chunk are drawn from here
            out = module(queries=batch.queries[s:e], images=batch.images[s:e])
            qs.append(out["q"].float())  # (c, D)
            ts.append(out["t"].float())  # (c, D)
            lams.append(out["lam"].float())  # (c,)
            reg = reg + out["reg"].float() * (e - s) / n  # () R_cal, batch mean of chunk means
    end_state = RngState(device)  # after pass (a): where the reference path would leave the RNG

    # (b) loss and its gradient w.r.t. the representations, on the global batch.
    q_all = gather_nograd(torch.cat(qs), di).requires_grad_()  # (W*b, D) leaf
    t_all = gather_nograd(torch.cat(ts), di).requires_grad_()  # (W*b, D) leaf
    ids = gather_nograd(key_ids(batch.keys, q_all.device), di)  # (W*b,)
    nce = info_nce(q_all, t_all, ids, temperature)  # () L_nce, identical on all ranks
    if poison:
        nce = nce + float("nan")  # test hook (--debug-nan-at-step)
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
            out = model(queries=batch.queries[s:e], images=batch.images[s:e])
            surrogate = ((out["q"].float() * gq[s:e]).sum()  # <q_c, dL/dq_c>
                         + (out["t"].float() * gt[s:e]).sum()  # <t_c, dL/dt_c>
                         + out["reg"].float() * (e - s) / n)  # this chunk's share of R_cal (a batch mean)
            surrogate.backward()
    end_state.restore()  # the re-runs drew the same numbers; make the end state explicit
    return StepOut(loss=loss_value, nce=float(nce.detach()), reg=float(reg_mean), lam=float(torch.cat(lams).mean()))


class NonFiniteLoss(FloatingPointError):
    """Raised inside a step; the training loop turns it into a TrainingError naming step and task."""


def _check_finite(x: float) -> None:
    if not math.isfinite(x):
        raise NonFiniteLoss(f"loss = {x}")


def token_grad_norm(embedder) -> float:
    """||grad|| over the learnable query/target token embeddings: GGAS' difficulty signal."""
    grads = [p.grad.detach().float().norm() for p in embedder.token_parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0


# ================================================================================================
# Schedule, seeding
# ================================================================================================


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """lr multiplier at optimizer step `step` (0-based): linear warm-up, then cosine to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup  # warm-up: 1/warmup, 2/warmup, ..., 1
    progress = (step - warmup) / max(1, total - warmup)  # 0 -> 1 over the decay phase
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def mix_seed(*parts: int) -> int:
    """A seed from integers, e.g. (run seed, step, rank): a step's randomness replays from its number."""
    h = hashlib.blake2b("fashionlens/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1  # non-negative 63-bit int for torch.manual_seed


# ================================================================================================
# Training state without pickle: tensors -> safetensors, everything else -> JSON
# ================================================================================================


def _to_json(obj, tensors: dict, path: str):
    """Turn a nested state (dicts with any keys, tuples, tensors, numpy arrays) into JSON + tensors."""
    if torch.is_tensor(obj):
        tensors[path] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": path}
    if type(obj).__module__ == "numpy":  # numpy scalars/arrays (numpy's RNG state)
        import numpy as np

        arr = np.asarray(obj)
        return {"__ndarray__": arr.tolist(), "dtype": str(arr.dtype)}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _to_json(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        # e.g. the optimizer's {param index: state}: keep the key types exactly
        return {"__items__": [[_to_json(k, tensors, f"{path}.k{i}"), _to_json(v, tensors, f"{path}.{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_to_json(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_to_json(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {path} in the training state")


def _from_json(obj, tensors: dict):
    """Inverse of _to_json."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            import numpy as np

            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
        if "__items__" in obj:
            return {_from_json(k, tensors): _from_json(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(_from_json(v, tensors) for v in obj["__tuple__"])
        return {k: _from_json(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_json(v, tensors) for v in obj]
    return obj


STATE_JSON, STATE_TENSORS, CONFIG_JSON = "train_state.json", "train_state.safetensors", "train_config.json"


def write_train_state(folder: Path, state: dict) -> None:
    """state -> folder/train_state.json + folder/train_state.safetensors (no pickle anywhere)."""
    from safetensors.torch import save_file

    tensors: dict = {}
    doc = _to_json(state, tensors, "s")
    save_file(tensors, str(folder / STATE_TENSORS))
    (folder / STATE_JSON).write_text(json.dumps(doc))


def read_train_state(folder: Path) -> dict:
    from safetensors.torch import load_file

    for name in (STATE_JSON, STATE_TENSORS):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing: {folder} is not a resumable checkpoint "
                                    f"(runs/NAME/last holds the training state; best/ holds weights only)")
    try:
        doc = json.loads((folder / STATE_JSON).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{folder / STATE_JSON} is not valid JSON: {err}") from None
    return _from_json(doc, load_file(str(folder / STATE_TENSORS)))


def rng_snapshot() -> dict:
    """Every global RNG a step could touch (the loop also re-seeds torch per step)."""
    import numpy as np

    snap = {"python": random.getstate(), "torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        snap["cuda"] = torch.cuda.get_rng_state_all()
    return snap


def rng_restore(snap: dict) -> None:
    import numpy as np

    random.setstate(snap["python"])
    torch.set_rng_state(snap["torch"])
    np.random.set_state(snap["numpy"])
    if "cuda" in snap and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(snap["cuda"])


def save_checkpoint(folder: Path, embedder, cfg: TrainConfig, state: Optional[dict] = None,
                    extra: Optional[dict] = None) -> None:
    """Write folder/ atomically: build it as a hidden sibling, then swap it in with os.replace.

    A directory cannot be os.replace'd over a non-empty one, so the swap is: old -> .NAME.old,
    new -> NAME, delete .NAME.old. At every moment either NAME or .NAME.old is a complete
    checkpoint; `find_resume_checkpoint` looks at both.
    """
    folder = Path(folder)
    tmp = folder.parent / f".{folder.name}.tmp"
    old = folder.parent / f".{folder.name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    embedder.save_pretrained(str(tmp))  # weights, adapter, tokens, calibrator, tokenizer, config
    (tmp / CONFIG_JSON).write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    if extra is not None:
        (tmp / "metrics.json").write_text(json.dumps(extra, indent=1))
    if state is not None:
        write_train_state(tmp, state)
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def find_resume_checkpoint(run: Path) -> Path:
    """runs/NAME (or runs/NAME/last) -> the directory holding the latest complete training state."""
    run = Path(run)
    for cand in (run, run / "last", run / ".last.old"):
        if (cand / STATE_JSON).is_file() and (cand / STATE_TENSORS).is_file():
            return cand
    raise FileNotFoundError(f"--resume {run}: no training state found in {run}/last "
                            f"(expected {STATE_JSON} and {STATE_TENSORS})")


# ================================================================================================
# Data plumbing
# ================================================================================================


def resolve_data_root(spec: str, di: DistInfo) -> str:
    """'synthetic' -> generate data/synthetic once (rank 0 first); a path must exist."""
    if spec == "synthetic":
        if di.main:
            root = data.ensure_synthetic("data/synthetic")
        barrier(di)
        if not di.main:
            root = data.ensure_synthetic("data/synthetic")  # already there: just returns the path
        return str(Path(root).resolve())
    if not Path(spec).is_dir():
        raise SystemExit(f"error: --data {spec}: no such directory (a U-FIRE root, or 'synthetic')")
    return str(Path(spec).resolve())


def select_subsets(ufire, split: str, tasks: str) -> list[str]:
    """Sub-datasets of `split` for --tasks (same rules as evaluate.py: task words or task/dataset)."""
    import evaluate

    return evaluate.select_subsets(ufire, split, tasks, "skip")


def make_batch(view, subset: str, indices: list[int], seed: int, step: int) -> Batch:
    """Draw one (query, target) pair per record index (a random target/sketch among several).

    Each record gets its own RNG seeded from (seed, step, record index): the draws depend neither
    on the number of ranks nor on anything drawn before, so a resumed run redraws them exactly.
    """
    pairs = [view.pair(subset, i, random.Random(mix_seed(seed, step, i))) for i in indices]
    return Batch(subset=subset, queries=[p.query for p in pairs], images=[p.target for p in pairs],
                 keys=[p.target_key for p in pairs])


def make_sampler(sizes: dict, cfg: TrainConfig, warmup: int, di: DistInfo):
    """GGAS over the training sub-datasets; batch_size is GLOBAL, each rank gets its shard."""
    import sampler

    return sampler.TaskBatchSampler(sizes, cfg.batch_size, strategy=cfg.sampler, warmup_steps=warmup,
                                    seed=cfg.seed, rank=di.rank, world_size=di.world)


# ================================================================================================
# The training loop
# ================================================================================================


def _write_jsonl(path: Path, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def _trim_log(path: Path, upto_step: int) -> None:
    """On resume: drop log lines written after the checkpoint's step (they will be redone)."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= upto_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_embedder(cfg: TrainConfig, device: str, resume_from: Optional[Path] = None):
    """A fresh embedder from the config, or the checkpoint's (with its trainable parts trainable)."""
    from model import EmbedderConfig, FashionLensEmbedder

    if resume_from is not None:
        return FashionLensEmbedder.from_pretrained(str(resume_from), backbone=cfg.backbone, device=device)
    return FashionLensEmbedder(EmbedderConfig(backbone=cfg.backbone, seed=cfg.seed, calibrator=cfg.calibrator,
                                              device=device))


def set_cpu_threads(cfg: TrainConfig, device: str) -> int:
    """Apply --cpu-threads (0 = auto, see TrainConfig) and return the thread count torch now uses.

    The tiny model's ops are so small that splitting them over threads costs more in hand-offs than
    it gains (a default step: 0.28 s on 1 thread, 0.34 s on 2, 2-core Xeon), so auto picks 1 thread
    there. An explicit OMP_NUM_THREADS, or any other backbone or device, keeps torch's own choice.
    """
    from model import TINY_TYPES  # deferred: importing model pulls in transformers

    if cfg.cpu_threads < 0:
        raise SystemExit(f"error: --cpu-threads {cfg.cpu_threads} is negative (0 = auto)")
    if cfg.cpu_threads > 0:
        torch.set_num_threads(cfg.cpu_threads)
    elif not os.environ.get("OMP_NUM_THREADS") and device == "cpu" and cfg.backbone in TINY_TYPES:
        torch.set_num_threads(1)
    return torch.get_num_threads()


def train(cfg: TrainConfig, resume: Optional[str] = None) -> dict:
    """Run training as configured; returns a summary (best step/score, test result, wall time)."""
    t_start = time.time()
    if cfg.vision_lr_scale < 0:  # checked before anything is created on disk
        raise SystemExit(f"error: --vision-lr-scale {cfg.vision_lr_scale} is negative (0 freezes the tower's updates)")
    di = init_distributed(cfg.device)
    threads = set_cpu_threads(cfg, di.device)
    out = Path(cfg.resolved_out())
    cfg.data = resolve_data_root(cfg.data, di)
    ufire = data.UFire(cfg.data)
    train_subsets = select_subsets(ufire, "train", cfg.tasks)
    val_subsets = select_subsets(ufire, "val", cfg.tasks)

    resume_dir = find_resume_checkpoint(Path(resume)) if resume else None
    if di.main:
        if resume_dir is None and ((out / "last").exists() or (out / "log.jsonl").exists()):
            raise SystemExit(f"error: {out} already holds a run; continue it with --resume {out} "
                             f"or choose another --out")
        out.mkdir(parents=True, exist_ok=True)
    barrier(di)

    torch.manual_seed(cfg.seed)
    embedder = build_embedder(cfg, di.device, resume_dir)
    embedder.train()
    if hasattr(embedder, "config") and hasattr(embedder.config, "image_size"):
        ecfg = embedder.config
        view = ufire.train_view(train_subsets, image_size=ecfg.image_size,
                                max_images=ecfg.max_query_images, num_frames=ecfg.num_frames)
    else:
        view = ufire.train_view(train_subsets, image_size=64)
    sizes = dict(view.sizes)

    # Steps, epochs, warm-ups.
    if cfg.batch_size % di.world:
        raise SystemExit(f"error: --batch-size {cfg.batch_size} is not divisible by {di.world} processes")
    per_rank = cfg.batch_size // di.world
    import sampler

    steps_per_epoch = max(1, sampler.TaskBatchSampler(sizes, cfg.batch_size).steps_per_epoch())
    total = math.ceil(cfg.epochs * steps_per_epoch) if cfg.epochs > 0 else cfg.steps
    ggas_warmup = cfg.ggas_warmup if cfg.ggas_warmup >= 0 else min(steps_per_epoch, total // 4)
    lr_warmup = max(1, round(cfg.warmup_ratio * total))

    params = [p for p in embedder.parameters() if p.requires_grad]
    # Two parameter groups: the vision tower (if it trains) at lr x vision_lr_scale, the rest at lr.
    # The schedule (LambdaLR) multiplies each group's own base lr, so both follow warm-up + cosine.
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
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, lr_warmup, cfg.min_lr_ratio))
    task_sampler = make_sampler(sizes, cfg, ggas_warmup, di)

    start, best = 0, {"step": 0, "score": -1.0}
    elapsed0 = 0.0
    if resume_dir is not None:
        st = read_train_state(resume_dir)
        if st["world_size"] != di.world:
            raise SystemExit(f"error: {resume_dir} was written by {st['world_size']} processes, now {di.world}")
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        task_sampler.load_state_dict(st["sampler"])
        rng_restore(st["rng"])
        start, best, elapsed0 = int(st["step"]), dict(st["best"]), float(st.get("elapsed", 0.0))
    batches = iter(task_sampler)

    log_path = out / "log.jsonl"
    if di.main:
        resolved = {**dataclasses.asdict(cfg), "resolved": {
            "out": str(out), "total_steps": total, "steps_per_epoch": steps_per_epoch,
            "ggas_warmup_steps": ggas_warmup, "lr_warmup_steps": lr_warmup, "world_size": di.world,
            "per_rank_batch": per_rank, "device": di.device, "cpu_threads": threads, "train_subsets": sizes,
            "val_subsets": val_subsets, "resumed_from": str(resume_dir) if resume_dir else None,
            "resumed_at_step": start}}
        print("FashionLens training, resolved configuration:\n" + json.dumps(resolved, indent=1), flush=True)
        _atomic_write_text(out / "config.json", json.dumps(resolved, indent=1))
        if resume_dir is not None:
            _trim_log(log_path, start)

    def state_at(step: int) -> dict:
        return {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "sampler": task_sampler.state_dict(), "rng": rng_snapshot(), "best": best,
                "world_size": di.world, "elapsed": elapsed0 + time.time() - t_start}

    def validate_and_save(step: int) -> None:
        """Val Recall@1/10 on rank 0, keep best/, refresh last/. Other ranks wait."""
        nonlocal best
        if di.main:
            import evaluate

            t0 = time.time()
            with torch.random.fork_rng(devices=[di.device] if di.device.startswith("cuda") else []):
                res = evaluate.evaluate(embedder, ufire, val_subsets, split="val", ks=(1, 10),
                                        batch_size=cfg.eval_batch_size, cache_dir=None, progress=False,
                                        max_queries=cfg.max_eval_queries)
            embedder.train()
            score = res.sum_recall(1)  # the authors' model-selection number
            rec = {"event": "val", "step": step, "sum_recall1": score,
                   "recall": {r.subset: {str(k): v for k, v in r.recall.items()} for r in res.rows},
                   "seconds": time.time() - t0}
            _write_jsonl(log_path, rec)
            tqdm.write(f"step {step}: val sum of Recall@1 = {score:.3f} over {len(res.rows)} sub-datasets "
                       f"(best so far {best['score']:.3f} @ {best['step']}) [{rec['seconds']:.0f}s]")
            if score > best["score"]:
                best = {"step": step, "score": score}
                save_checkpoint(out / "best", embedder, cfg, extra={"val": rec})
            save_checkpoint(out / "last", embedder, cfg, state=state_at(step))
        barrier(di)

    bar = tqdm(total=total, initial=start, desc="train", disable=not di.main, dynamic_ncols=True)
    step_fn = gradcache_step if cfg.chunk_size > 0 else full_batch_step
    t_prev = time.time()
    step = start
    try:
        while step < total:
            subset, indices = next(batches)
            # Every step re-seeds torch (dropout) from (seed, step, rank) and the data draws from
            # (seed, step, record): a resumed run replays exactly what the uninterrupted one drew.
            torch.manual_seed(mix_seed(cfg.seed, step, di.rank))
            batch = make_batch(view, subset, list(indices), cfg.seed, step)
            try:
                so = step_fn(model, batch, cfg.temperature, di, chunk_size=cfg.chunk_size,
                             poison=(step + 1 == cfg.debug_nan_at_step))
                tok = token_grad_norm(embedder)  # GGAS difficulty (before clipping: the raw signal)
                gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
                if not math.isfinite(gnorm):
                    raise NonFiniteLoss(f"gradient norm = {gnorm}")
            except NonFiniteLoss as err:
                last = find_last_good(out)
                raise TrainingError(
                    f"non-finite training signal ({err}) at step {step + 1} on sub-dataset {subset!r}; "
                    f"stopping without an update. Last good checkpoint: {last}") from None
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            task_sampler.update(subset, tok)
            step += 1
            now = time.time()
            if di.main:
                _write_jsonl(log_path, {
                    "step": step, "loss": so.loss, "nce": so.nce, "reg": so.reg, "lr": lr, "subset": subset,
                    "grad_norm": gnorm, "token_grad_norm": tok, "lam_mean": so.lam,
                    "probabilities": task_sampler.probabilities(), "difficulties": _difficulties(task_sampler),
                    "time": elapsed0 + now - t_start, "step_seconds": now - t_prev})
            t_prev = now
            bar.update(1)
            bar.set_postfix(step=step, loss=f"{so.loss:.3f}", task=subset, refresh=False)
            if step % cfg.eval_every == 0 or step == total:
                validate_and_save(step)
            elif cfg.stop_at and step == cfg.stop_at:
                if di.main:
                    save_checkpoint(out / "last", embedder, cfg, state=state_at(step))
                barrier(di)
            if cfg.stop_at and step == cfg.stop_at and step < total:
                bar.close()
                if di.main:
                    print(f"stopped after step {step} as asked (--stop-at); continue with --resume {out}")
                return {"out": str(out), "stopped_at": step, "best": best}
    finally:
        bar.close()

    if di.enabled:
        check_ranks_agree(embedder, di)
    summary = {"out": str(out), "steps": total, "best": best, "train_seconds": time.time() - t_start}
    if di.main and cfg.final_test:
        summary["test"] = final_test(cfg, out, ufire, di.device)
    summary["wall_seconds"] = time.time() - t_start
    summary["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if di.main:
        print(f"done: {total} steps, best val sum Recall@1 {best['score']:.3f} at step {best['step']}; "
              f"wall {summary['wall_seconds']:.0f}s, peak RSS {summary['peak_rss_mib']:.0f} MiB; "
              f"checkpoints in {out}/best and {out}/last")
    barrier(di)
    return summary


def params_digest(module) -> str:
    """sha256 over the trainable parameters' bytes: equal digests = identical weights."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_ranks_agree(module, di: DistInfo) -> None:
    """DDP must keep every rank's weights identical; verify it at the end of a run (cheap)."""
    digest = params_digest(module)
    mine = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8, device=di.device)  # (32,)
    parts = [torch.empty_like(mine) for _ in range(di.world)]  # W x (32,)
    dist.all_gather(parts, mine)
    if di.main:  # one process prints every rank's digest: lines from several processes can interleave
        for r, p in enumerate(parts):
            print(f"[rank {r}] trainable parameters sha256 {bytes(p.tolist()).hex()}", flush=True)
    if any(not torch.equal(p, parts[0]) for p in parts):
        raise TrainingError("DDP ranks ended with different parameters (digests differ): "
                            + ", ".join(bytes(p.tolist()).hex()[:12] for p in parts))


def _difficulties(task_sampler) -> dict:
    """GGAS' per-sub-dataset difficulty (EMA of gradient norms), whatever the sampler calls it."""
    for name in ("difficulties", "difficulty"):
        d = getattr(task_sampler, name, None)
        if callable(d):
            d = d()
        if isinstance(d, dict):
            return {k: float(v) for k, v in d.items()}
    return {}


def find_last_good(out: Path) -> str:
    for cand in (out / "last", out / ".last.old"):
        if (cand / STATE_JSON).is_file():
            st = json.loads((cand / STATE_JSON).read_text())
            return f"{cand} (step {st.get('step')})"
    return "none yet (no checkpoint was written before this step)"


def final_test(cfg: TrainConfig, out: Path, ufire, device: str) -> dict:
    """Reload best/ from disk (also proving it loads) and print the test Recall@K table."""
    import evaluate
    from model import FashionLensEmbedder

    best = FashionLensEmbedder.from_pretrained(str(out / "best"), device=device)
    subsets = select_subsets(ufire, "test", cfg.tasks)
    res = evaluate.evaluate(best, ufire, subsets, split="test", ks=(1, 5, 10, 50),
                            batch_size=cfg.eval_batch_size, cache_dir=None, progress=sys.stderr.isatty())
    print(f"\nTest Recall@K of {out / 'best'} (data: {cfg.data})")
    print(evaluate.format_table(res))
    doc = {"checkpoint": str(out / "best"), "data": cfg.data, "split": "test", **res.to_dict()}
    _atomic_write_text(out / "test_results.json", json.dumps(doc, indent=1))
    return doc


# ================================================================================================
# Command line
# ================================================================================================


def build_parser() -> argparse.ArgumentParser:
    """One flag per TrainConfig field; defaults are SUPPRESSed so we can tell what was given."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="Defaults: see TrainConfig in train.py (printed at start).")
    helps = {
        "tasks": "'all' or task words / task/dataset names, comma or space separated",
        "data": "'synthetic' (generated into data/synthetic) or a U-FIRE root",
        "backbone": "tiny | tiny-qwen2-vl | hub id | local path", "out": "run directory (runs/NAME)",
        "steps": "optimizer steps", "epochs": "train for this many epochs instead of --steps",
        "batch_size": "global contrastive batch", "chunk_size": "GradCache chunk per rank; 0 = no GradCache",
        "lr": "peak learning rate", "temperature": "InfoNCE temperature",
        "calibrator": "slerp | linear | off", "sampler": "ggas | uniform | size",
        "ggas_warmup": "uniform-sampling steps before GGAS adapts (-1: one epoch, capped at steps/4)",
        "eval_every": "validate + checkpoint every N steps", "seed": "run seed", "device": "auto | cpu | cuda",
        "max_eval_queries": "validation queries per sub-dataset (0 = all)",
        "stop_at": "stop this invocation after this step (resume later with --resume)",
        "final_test": "evaluate best/ on the test split at the end",
        "weight_decay": "AdamW weight decay", "warmup_ratio": "share of steps with linear lr warm-up",
        "vision_lr_scale": "learning rate of a trainable vision tower, as a share of --lr",
        "min_lr_ratio": "final lr as a share of --lr (cosine decay)", "grad_clip": "max global gradient norm",
        "eval_batch_size": "batch size of validation/test encoding",
        "cpu_threads": "torch CPU threads (0: OMP_NUM_THREADS, else 1 for a tiny backbone on CPU)",
    }
    choices = {"calibrator": ["slerp", "linear", "off"], "sampler": ["ggas", "uniform", "size"]}
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        shown = f"{helps.get(f.name, '')} (default: {f.default!r})"
        kw = {"default": argparse.SUPPRESS, "help": argparse.SUPPRESS if f.name in HIDDEN_FLAGS else shown}
        if f.type in ("bool", bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.name == "tasks":
            ap.add_argument(flag, nargs="+", **kw)
        else:
            typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
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
    saved = json.loads((find_resume_checkpoint(Path(resume)) / CONFIG_JSON).read_text())
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    base = TrainConfig(**{k: v for k, v in saved.items() if k in names})
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
    try:
        cfg, resume = parse_config(argv)
        train(cfg, resume)
    except Exception as err:  # bad input and stopped runs: one clear line, no traceback
        model_mod = sys.modules.get("model")
        expected = (TrainingError, data.UFireError, FileNotFoundError,
                    getattr(model_mod, "CheckpointError", TrainingError))
        if not isinstance(err, expected):
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
