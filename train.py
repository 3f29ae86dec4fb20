"""Contrastive multi-task training of FashionLens: InfoNCE, GradCache, GGAS, DDP.

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
5. Report the norm of the learnable query/target token gradients to GGAS as the sub-dataset's
   difficulty (the authors' signal: these two embeddings are shared by every task, so their gradient
   says how far task k currently pulls the model), read before clipping; then clip (--grad-clip; 0 =
   no clipping, as the authors) and take an AdamW step (constant lr, or warm-up + cosine decay).

Multi-GPU (`torchrun --nproc_per_node N train.py ...`): each rank gets a disjoint shard of the SAME
sub-dataset's batch; representations are all-gathered, so every query sees every rank's targets.
Elsewhere (support/, skip on first read): the recipes that fill every None field (recipes.py), the
loader and the two-core step (fast_train.py), runs/NAME and exact resume (run_dir.py), the flags (cli.py).

Run it: `python train.py --tasks all` (synthetic U-FIRE + tiny backbone, 2 CPU cores, 8-25 min: docs/RESULTS.md),
`--resume runs/NAME`, `--data /path/U-FIRE --backbone Qwen/Qwen3-VL-4B-Instruct` (`paper`).

Shape legend: B batch (queries = targets), b per-rank batch, c chunk, D embedding size,
G gallery, r rank, T tasks (sub-datasets), W world size (processes).
"""
from __future__ import annotations

from support import plumbing  # noqa: I001  first: it sets OMP_WAIT_POLICY before torch loads (see plumbing.py)

import dataclasses
import math
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

import data
import evaluate
import sampler
from model import EmbedderConfig, FashionLensEmbedder
from support import cli, fast_train, recipes, run_dir, synthetic
from support.config_fields import knob
from support.errors import NonFiniteLoss
from support.plumbing import DistInfo, barrier, gather_nograd, gather_with_grad, mean_over_ranks, mix_seed

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
    # (queries, targets) as the model's tensors (two support/qwen.ModelInputs), made ahead by the loader
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
    module = plumbing._unwrap(model)  # pass (a) needs no DDP bookkeeping
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
        with plumbing._sync_ctx(model, last=k == len(parts) - 1):
            queries, images = _rows(batch, s, e)
            out = model(queries=queries, images=images)
            surrogate = ((out["q"].float() * gq[s:e]).sum()  # <q_c, dL/dq_c>
                         + (out["t"].float() * gt[s:e]).sum()  # <t_c, dL/dt_c>
                         + out["reg"].float() * _reg_weight(e - s, n, reg_per_chunk))  # w_c r_c
            surrogate.backward()
    end_state.restore()  # the re-runs drew the same numbers; make the end state explicit
    return StepOut(loss=loss_value, nce=float(nce.detach()), reg=float(reg_mean), lam=float(torch.cat(lams).mean()),
                   angle=float(torch.cat(angles).mean()))


def token_grad_norm(embedder) -> float:
    """||grad|| over the learnable query/target token embeddings: GGAS' difficulty signal. It is the
    whole loss's gradient: besides InfoNCE's (p - y) terms, which fade as a sub-dataset is fitted
    (notebook 04 derives it), it holds the calibrator regulariser's share, which does not."""
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
    """Everything that defines a training run; one CLI flag per field (dashes -> _). None: the recipe's
    value (support/recipes.py; why each value: docs/FIDELITY.md), filled in once by `resolved()`."""

    tasks: str = knob("all", "any")  # "all" or comma-separated task words / "task/dataset" names
    data: str = knob("synthetic", "any")  # "synthetic" = data/synthetic, made on first use; or a U-FIRE root
    backbone: str = knob("tiny", "any")  # "tiny" | "tiny-qwen2-vl" | hub id | local path
    recipe: str = knob("auto", "auto | paper | tiny-cpu")  # the None fields' values; auto: by backbone
    out: str = knob("", "any")  # run directory; "" = runs/fashionlens-<backbone name>
    steps: Optional[int] = knob(None, ">= 0; 0 only with --epochs > 0")  # optimizer steps; 0 = set by --epochs
    epochs: Optional[float] = knob(None, ">= 0; 0: train for --steps")  # > 0: epochs x GGAS' steps per epoch
    batch_size: Optional[int] = knob(None, ">= 1")  # global contrastive batch B (all ranks): B-1 negatives each
    chunk_size: Optional[int] = knob(None, ">= -1; -1: the authors' size per sub-dataset; 0: no GradCache")
    lr: Optional[float] = knob(None, "> 0")  # peak AdamW learning rate
    vision_lr_scale: float = knob(0.1, ">= 0; 0 freezes the tower's updates")  # trainable vision tower: lr x this
    weight_decay: Optional[float] = knob(None, ">= 0")  # AdamW decay of every trainable parameter
    lr_schedule: Optional[str] = knob(None, "constant | cosine")  # after the warm-up (LR_SCHEDULES)
    warmup_ratio: Optional[float] = knob(None, "[0, 1]")  # share of steps with a linear lr warm-up
    min_lr_ratio: float = knob(0.05, "[0, 1]")  # the cosine ends at lr x this
    grad_clip: Optional[float] = knob(None, ">= 0; 0: no clipping")  # max global gradient norm
    temperature: float = knob(0.07, "> 0")  # InfoNCE tau (the authors' value)
    positives: Optional[str] = knob(None, "single | multi")  # P(i): own target | every in-batch copy (POSITIVES)
    reg_per_chunk: Optional[bool] = knob(None, "bool")  # R_cal once per GradCache chunk (w_c = 1) | per batch
    calibrator: str = knob("slerp", "slerp | linear | off")  # PGSQC mode: slerp (the method); others: ablations
    sampler: str = knob("ggas", "ggas | uniform | size")  # task sampling: ggas (the method); others: ablations
    ggas_warmup: int = knob(-1, ">= -1; -1 = one epoch")  # uniform steps first; -1: one epoch, <= steps/4
    ggas_refresh: Optional[str] = knob(None, "epoch | step")  # when GGAS recomputes p
    ggas_ema_start: Optional[str] = knob(None, "zero | first")  # the difficulty EMA's start
    ggas_floor: Optional[str] = knob(None, "renorm | waterfill")  # how the probability floor holds (sampler.py)
    min_pixels: Optional[int] = knob(None, ">= 1")  # pixel budget of one image (EmbedderConfig, model.py)
    max_pixels: Optional[int] = knob(None, ">= min_pixels")  # (aspect ratio kept by the processor)
    max_query_images: Optional[int] = knob(None, ">= 0; 0 = all")  # query images per prompt
    query_sketches: Optional[str] = knob(None, "one | all")  # sketches of an item in one prompt
    num_frames: Optional[int] = knob(None, ">= 1")  # frames of a video query
    video_size: Optional[int] = knob(None, ">= 1")  # each frame resized to this square
    lora_dropout: Optional[float] = knob(None, "[0, 1)")  # LoRA dropout
    summary_init: Optional[str] = knob(None, "im_end | words")  # where the summary tokens start
    eval_every: Optional[int] = knob(None, ">= 1; steps between validations")  # validate + checkpoint
    max_eval_queries: int = knob(0, ">= 0; 0 = all")  # validation queries per sub-dataset (evenly spaced)
    eval_batch_size: int = knob(64, ">= 1")  # batch size of validation/test encoding
    final_test: bool = knob(True, "bool")  # test best/ on the test split at the end and print the table
    seed: int = knob(0, "any")  # seeds the tiny base, sampler, data draws and dropout (re-seeded every step)
    device: str = knob("auto", "any")  # auto (cuda if available) | cpu | cuda | cuda:N (checked by plumbing)
    cpu_threads: int = knob(0, ">= 0; 0 = auto")  # torch CPU threads; auto: 1 for a tiny backbone on CPU
    loader: str = knob("thread", "process | thread | off")  # who prepares the next batch (support/prefetch.py)
    two_cores: str = knob("auto", "auto | off")  # share a step between two CPU cores (support/fast_train.py)
    stop_at: int = knob(0, ">= 0; 0 = never")  # end this invocation after this step (writes last/)
    find_unused_parameters: bool = knob(False, "bool")  # DDP's flag; True only for a custom model

    def resolved(self) -> "TrainConfig":
        """This config with its recipe applied (support/recipes.py); resolving twice changes nothing."""
        return recipes.resolve_train_config(self)

    def embedder_fields(self) -> dict:
        """The EmbedderConfig fields this config sets (resolved): the recipe's name and the input values."""
        return {"recipe": self.recipe, **{k: getattr(self, k) for k in recipes.EMBEDDER_FIELDS}}

    def check(self) -> None:
        """Refuse values no run can use (each field's knob rule), before anything is built or written."""
        cli.check_train_config(self)


# ================================================================================================
# The loop, part 1: the batch of a step, setup (data, model, optimizer, sampler, resume)
# ================================================================================================


def make_batch(view, subset: str, indices: list[int], seed: int, step: int) -> Batch:
    """Draw one (query, target) pair per record index (a random target/sketch among several), each
    with its own RNG seeded from (seed, step, record index): independent of the ranks and of every
    earlier draw, so a resumed run redraws them exactly."""
    pairs = [view.pair(subset, i, random.Random(mix_seed(seed, step, i))) for i in indices]
    return Batch(subset=subset, queries=[p.query for p in pairs], images=[p.target for p in pairs],
                 keys=[p.target_key for p in pairs])


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
    loader: object = None  # support/prefetch.Prefetcher: prepares the next step's batch during this one
    spare: object = None  # the spare core's one-thread executor (two_core_step), or None


def setup(cfg: TrainConfig, resume: Optional[str]) -> Run:
    """Data, embedder, optimizer and sampler as configured; the saved state when resuming."""
    t_start = time.time()
    cfg = cfg.resolved()  # the recipe's values, once: the run, config.json and checkpoints hold these
    cfg.check()  # flags first: a bad one stops us before anything is built or written
    di, threads = run_dir.start_processes(cfg)  # DDP under torchrun, the device, torch's CPU threads
    cfg.data = synthetic.resolve_root(cfg.data, di)  # config.json and checkpoints record the resolved root
    ufire = data.UFire(cfg.data)
    train_subsets, val_subsets = ufire.select("train", cfg.tasks), ufire.select("val", cfg.tasks)
    cli.check_not_empty(ufire, "train", train_subsets, di.world)  # reads the records now (cached for the view)
    cli.check_not_empty(ufire, "val", val_subsets, 1)
    out, resume_dir = run_dir.open_run(cfg, resume, di)  # runs/NAME, new or continued

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
        run_dir.restore_state(run, resume_dir)
    run.batches = iter(run.task_sampler)
    run.loader, run.spare = fast_train.start(make_batch, fits_one_chunk, view, embedder, cfg, di, threads, sizes)
    if di.main:
        run_dir.write_resolved_config(run, threads, sizes, resume_dir)
    return run


def fits_one_chunk(chunk: int, rows: int) -> bool:
    """A batch of `rows` per rank is one chunk: no GradCache (chunk 0) or a chunk that holds it all."""
    return chunk == 0 or chunk >= rows


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


# ================================================================================================
# The loop, part 2: one step
# ================================================================================================


def train_step(run: Run) -> tuple[StepOut, str]:
    """Draw a batch, compute the gradient, clip, update, tell GGAS, log. Returns (result, sub-dataset)."""
    cfg, di = run.cfg, run.di
    subset, indices = next(run.batches)
    batch, prefetched = fast_train.next_batch(run, subset, indices)  # the loader's, and the next one submitted
    # Every step re-seeds torch (dropout) from (seed, step, rank) and the data draws from
    # (seed, step, record): a resumed run replays exactly what the uninterrupted one drew.
    torch.manual_seed(mix_seed(cfg.seed, run.step, di.rank))
    chunk = recipes.step_chunk_size(cfg, subset)  # this batch's GradCache chunk (per sub-dataset under -1)
    try:
        n = len(batch.keys)
        if run.spare is not None and fits_one_chunk(chunk, n):  # full_batch_step's twin, on two CPU cores
            nce = lambda q, t: info_nce(q, t, target_ids(batch.keys, cfg.positives, q.device), cfg.temperature)  # noqa: E731
            so = StepOut(**fast_train.two_core_step(run.model, *_rows(batch, 0, n), nce, run.spare))
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
        raise run_dir.non_finite(err, run, subset) from None  # names the last good checkpoint
    lr = run.optimizer.param_groups[0]["lr"]  # the lr this update uses (for the log)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.task_sampler.update(subset, tok)
    run.step += 1
    run_dir.log_step(run, so, subset, chunk, lr, gnorm, tok, prefetched)  # one log.jsonl line (rank 0)
    return so, subset


# ================================================================================================
# The loop, part 3: validate and save, and the whole loop
# ================================================================================================


def validate_and_save(run: Run) -> None:
    """Val Recall@1/10 on rank 0, keep best/, refresh last/. Other ranks wait."""
    if run.di.main:
        t0 = time.time()
        # Validation must not move the training RNG: the next step's draws stay those of a run
        # validated at other steps (or resumed).
        with torch.random.fork_rng(devices=[run.di.device] if run.di.device.startswith("cuda") else []):
            res = evaluate.evaluate(run.embedder, run.ufire, run.val_subsets, split="val", ks=(1, 10),
                                    batch_size=run.cfg.eval_batch_size, cache_dir=None, progress=False,
                                    max_queries=run.cfg.max_eval_queries)
        run.embedder.train()
        score = res.sum_recall(1)  # the authors' model-selection number
        rec = run_dir.log_val(run, res, score, t0)  # log.jsonl line and one printed line
        if score > run.best["score"]:  # strictly better: the first of equal scores stays best
            run.best = {"step": run.step, "score": score}
            run_dir.save_checkpoint(run.out / "best", run.embedder, run.cfg, extra={"val": rec})
        run_dir.save_checkpoint(run.out / "last", run.embedder, run.cfg, state=run_dir.train_state(run))
    barrier(run.di)


@run_dir.one_writer()  # the run folder's lock, taken in setup, is let go however training ends
def train(cfg: TrainConfig, resume: Optional[str] = None) -> dict:
    """Run training as configured; returns a summary (best step/score, test result, wall time)."""
    run = setup(cfg, resume)
    cfg, total = run.cfg, run.plan.total  # the resolved config
    with cli.training_progress(run) as bar:  # Ctrl-C says where to resume; closes the loader
        while run.step < total:
            so, subset = train_step(run)
            cli.show_step(bar, run, so, subset)
            if run.step % cfg.eval_every == 0 or run.step == total:
                validate_and_save(run)
            elif cfg.stop_at and run.step == cfg.stop_at:
                run_dir.save_last(run)  # --stop-at: last/ for --resume, no validation
            if cfg.stop_at and run.step == cfg.stop_at and run.step < total:
                return cli.stopped_at(bar, run)
    with cli.final_test_interrupt(run):
        return finish(run)


def finish(run: Run) -> dict:
    """Check the DDP ranks agree, test best/ on rank 0, print and return the summary."""
    di, out = run.di, run.out
    if di.enabled:
        plumbing.check_ranks_agree(run.embedder, di)
    summary = {"out": str(out), "steps": run.plan.total, "best": run.best, "train_seconds": time.time() - run.t_start}
    if di.main and run.cfg.final_test:
        summary["test"] = final_test(run.cfg, out, run.ufire, di.device)
    summary["wall_seconds"] = time.time() - run.t_start
    summary["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if di.main:
        cli.print_done(run, summary)  # one line: steps, best score, wall time, memory, checkpoints
    barrier(di)
    return summary


def final_test(cfg: TrainConfig, out: Path, ufire, device: str) -> dict:
    """Reload best/ from disk (also proving it loads) and print the test Recall@K table."""
    best = FashionLensEmbedder.from_pretrained(str(out / "best"), device=device)
    subsets = ufire.select("test", cfg.tasks)
    res = evaluate.evaluate(best, ufire, subsets, split="test", ks=(1, 5, 10, 50),
                            batch_size=cfg.eval_batch_size, cache_dir=None, progress=sys.stderr.isatty())
    print(f"\nTest Recall@K of {out / 'best'} (data: {cfg.data})")
    print(cli.format_table(res))
    return run_dir.write_test_results(out, cfg, res)  # test_results.json


def main(argv=None) -> int:
    """The CLI (support/cli.py): 0 on success; 1 and one `error:` line for bad input; 130 for Ctrl-C."""
    return cli.run_train_cli(TrainConfig, train, argv, description=__doc__.split("\n")[0])


if __name__ == "__main__":
    sys.exit(main())
