"""GGAS -- Gradient-Guided Adaptive Sampling over sub-datasets (Wen et al. 2026, FashionLens).

Concept
-------
U-FIRE mixes 18 sub-datasets of very different sizes and difficulty.  Training draws ONE
sub-dataset per step and a batch of its examples only (batches never mix sub-datasets, so the
in-batch negatives of a contrastive step come from the same kind of gallery).  Which sub-dataset?
GGAS favours the large ones (more data to learn from) and the hard ones (large gradients = the
model is still far from fitting them), with a floor so no sub-dataset is starved.

Where it sits in the method
---------------------------
train.py:  name, idx = next(sampler)  ->  encode + GradCache InfoNCE on sub-dataset `name`  ->
backward  ->  sampler.update(name, ||grad of the learnable query/target tokens||)  ->  optimizer.

Equations (K sub-datasets, sizes N_k, reported gradient norms g_k)
------------------------------------------------------------------
    G_k   <- alpha * G_k + (1 - alpha) * g_k          difficulty: EMA of k's gradient norms (alpha 0.9)
    log s_k = lam * log N_k + G_k / T                 score: size prior (lam 0.5) + difficulty (T 1.0)
    p      = softmax(log s)                           sampling distribution over sub-datasets
    floor m = min(min_prob, 1/K), then either
      "waterfill": p_k = max(m, c * p_k), sum_k p_k = 1   c found so the floor holds exactly
      "renorm":    p_k = max(m, p_k) / sum_j max(m, p_j)  the authors' one pass (dataset.py 241-246);
                                                         a clipped p_k may end a little below m
`ggas_probabilities` computes these equations; `TaskBatchSampler` keeps the G_k, the warm-up and the
draws.  During the warm-up (the authors: the first epoch) p is uniform, which also gives every
sub-dataset a first difficulty estimate.  The authors draw that uniform choice with
random.randint over the K sub-datasets (dataset.py, __iter__): the same distribution as our
inverse-CDF draw on p_k = 1/K, from another random stream.

Three switches choose between the authors' schedule and ours (the authors' value first):
    refresh    "epoch": p is recomputed at the start of each epoch (dataset.py set_epoch), so it is
               fixed for a whole epoch; "step": recomputed before every draw.  Both recompute at
               the end of the warm-up.
    ema_start  "zero": every G_k starts at 0, so the first report moves it only to (1 - alpha) g
               (dataset.py 137, 200-202); "first": the first report sets G_k = g, and a sub-dataset
               with no report yet counts as the mean of the reported ones.
    floor      "renorm" | "waterfill", as above.
Strategies for the ablations:
    "ggas"    the above;
    "size"    p proportional to N_k^lam (the same score without the difficulty term);
    "uniform" p_k = 1/K.
The floor is applied to every strategy (it is a no-op for "uniform").

Batches and streams
-------------------
Each sub-dataset has its own index stream: a seeded shuffle of range(N_k) without replacement,
reshuffled with a new seed when exhausted (one "epoch" of that sub-dataset).  The random choices
are counter-based: the draw at step t uses a torch.Generator seeded from (seed, t), and the
permutation of sub-dataset k in its e-th pass is seeded from (seed, k, e).  So the whole state
is a handful of integers and floats, a resumed run draws exactly the batches of an
uninterrupted one, and every rank makes the same choice without communicating.

Distributed: `batch_size` is the GLOBAL contrastive batch (all ranks together; train.py
all-gathers representations so negatives cross devices).  Every rank draws the same sub-dataset
and the same global batch, and keeps the contiguous shard [rank*b/W, (rank+1)*b/W), so an
all-gather in rank order rebuilds the global batch, and the global batches do not depend on the
number of ranks (a 1-GPU and a 4-GPU run see the same data in the same order).

Run `python sampler.py` for a simulation printing probabilities over steps for ggas, size and
uniform on tasks of different sizes whose difficulty fades as they are trained.

Shape legend: T tasks (here K sub-datasets; the T in G_k / T is the temperature), B batch.
Imports only torch and the standard library, so this file can be copied alone.

Credit: GGAS (difficulty from gradient norms, size prior, floor, warm-up) is from Wen et al. 2026
("Toward Versatile Fashion Image Retrieval via Task-Adaptive Learning"); the counter-based
seeding, the water-filling floor, the per-step refresh, the first-report EMA start and the
sharding are our implementation choices.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Dict, Iterator, List, Optional, Tuple

import torch

STRATEGIES = ("ggas", "uniform", "size")
REFRESH_MODES = ("epoch", "step")  # when p is recomputed: at each epoch start (authors) | every step
EMA_STARTS = ("zero", "first")  # G_k before the first report: 0 (authors) | set by that report
FLOORS = ("renorm", "waterfill")  # the floor: clip + one renormalisation (authors) | exact water-filling
_MASK64 = (1 << 64) - 1


def _mix(*values: int) -> int:
    """Hash a tuple of non-negative ints into a 63-bit seed (splitmix64 steps).

    Seeding generators with seed+t directly would give neighbouring steps related streams;
    mixing decorrelates them and keeps the result reproducible across Python runs (unlike hash()).
    """
    z = 0x9E3779B97F4A7C15
    for v in values:
        z = (z + (v & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
    return z >> 1  # torch.Generator.manual_seed takes up to 2**63 - 1 safely


def ggas_probabilities(sizes: List[int], difficulties: Optional[List[float]], lam: float, temperature: float,
                       min_prob: float, floor: str = "waterfill") -> List[float]:
    """The GGAS equations as one function: p over K sub-datasets from their sizes N_k and
    difficulties G_k (None: the size prior alone, the "size" strategy).  No warm-up, no state: the
    sampler below decides when to call it and with which G_k."""
    log_s = [lam * math.log(n) for n in sizes]  # (K,) lam * log N_k: the size prior
    if difficulties is not None:
        log_s = [ls + gk / temperature for ls, gk in zip(log_s, difficulties)]  # (K,) + G_k / T
    top = max(log_s)
    e = [math.exp(v - top) for v in log_s]  # (K,) softmax numerators, shifted for stability
    z = sum(e)
    p = [v / z for v in e]  # (K,) p = softmax(log s)
    if floor == "renorm":
        return renorm_floor(p, min_prob)  # p_k = max(m, p_k) / sum_j max(m, p_j)
    return floor_probabilities(p, min_prob)  # p_k >= min(min_prob, 1/K) exactly, sum 1


def renorm_floor(p: List[float], min_prob: float) -> List[float]:
    """The authors' floor (dataset.py 241-246): raise every p_k to m = min(min_prob, 1/K), then
    divide by the new sum once.

    The division scales the clipped entries down too, so a sub-dataset that was raised to m ends
    at m / sum_j max(m, p_j) < m whenever anything was clipped: the floor holds only approximately.
    """
    m = min(max(min_prob, 0.0), 1.0 / len(p))
    clipped = [max(pk, m) for pk in p]  # max(m, p_k)
    total = sum(clipped)  # >= 1: the clipping only adds mass
    return [c / total for c in clipped]  # renormalised once


def floor_probabilities(p: List[float], min_prob: float) -> List[float]:
    """Raise every p_k to at least m = min(min_prob, 1/K) and renormalise so the floor still holds.

    Water-filling: the sub-datasets below the floor are pinned at m; the rest share the remaining
    mass 1 - m*|pinned| in proportion to their p.  Scaling the rest down may push another below
    m, so pin it too and repeat (at most K rounds).  Plain "clip then divide by the sum" would
    break the floor again, which is why this is iterative.
    """
    k = len(p)
    m = min(max(min_prob, 0.0), 1.0 / k)
    pinned = [False] * k
    while True:
        free_mass = 1.0 - m * sum(pinned)
        free_sum = sum(pk for pk, pin in zip(p, pinned) if not pin)
        if free_sum <= 0.0:  # everything pinned (m = 1/K) or nothing left: uniform
            return [1.0 / k] * k
        scaled = [m if pin else pk * free_mass / free_sum for pk, pin in zip(p, pinned)]
        new = [pin or s < m for s, pin in zip(scaled, pinned)]
        if new == pinned:
            return scaled
        pinned = new


@dataclass
class SamplerConfig:
    """Knobs of the task sampler.  Defaults are the authors' unless said otherwise."""

    batch_size: int = 32  # GLOBAL contrastive batch (all ranks together); each rank gets batch_size/W
    strategy: str = "ggas"  # "ggas" | "uniform" | "size": the paper's method and its two ablations
    lam: float = 0.5  # exponent of the size prior N_k^lam: 0.5 tempers big sub-datasets (1 = proportional)
    temperature: float = 1.0  # T in G_k / T: lower T makes difficulty matter more
    ema: float = 0.9  # alpha of the difficulty EMA: ~10 reports of memory smooths noisy grad norms
    min_prob: float = 0.02  # floor on every p_k (clamped to 1/K) so no sub-dataset is forgotten
    warmup_steps: Optional[int] = None  # uniform for this many steps; None = one epoch (steps_per_epoch),
    #                                     as the authors do; 0 = adaptive from the start
    # When p is recomputed: "epoch" (the authors) holds it fixed for a whole epoch (steps_per_epoch
    # draws); "step" follows every report.  The default "step" is ours: see TaskBatchSampler.
    refresh: str = "step"
    refresh_every: int = 1  # under refresh="step": recompute p every this many steps (1 = every step)
    # G_k before its first report: "zero" (the authors) starts the EMA at 0; "first" (ours, the
    # default) lets the first report set it, so a rarely drawn sub-dataset does not look easy.
    ema_start: str = "first"
    # The floor: "renorm" (the authors) clips and renormalises once; "waterfill" (ours, the default)
    # renormalises so that the floor holds exactly.
    floor: str = "waterfill"
    seed: int = 0  # all randomness (sub-dataset choice, shuffles) derives from it
    drop_last: bool = True  # True: a tail shorter than a batch is skipped (batches always full, no
    #                         duplicates); False: the tail is yielded as a smaller batch


class TaskBatchSampler:
    """Infinite sampler of single-sub-dataset batches: iterate to get (name, indices).

    Args:
        sizes: {sub-dataset name: number of examples N_k}.  Names are sorted internally so every
            rank agrees on the order whatever the dict order.
        batch_size: GLOBAL batch size b (see module docstring).  A sub-dataset smaller than b
            gives batches of N_k rounded down to a multiple of world_size.
        strategy, lam, temperature, ema, min_prob, warmup_steps, refresh, refresh_every, ema_start,
            floor, seed, drop_last: see `SamplerConfig`.
        rank, world_size: this process's shard; all ranks must use the same other arguments
            and report the same gradient norms (they do after DDP's all-reduce).

    refresh defaults to "step", where the authors recompute once per epoch ("epoch"): computing p
    costs microseconds for K ~ 20, difficulties move every step, and a short run (the synthetic
    default trains for less than a few epochs) would otherwise hardly adapt at all.

    One epoch, for warmup_steps=None and steps_per_epoch: the number of batches a full pass over
    every sub-dataset would take, sum_k ceil(N_k / b_k) (floor with drop_last).  Sub-datasets are
    not visited in proportion to size, so this is a step count, not a guarantee that each
    example has been seen.
    """

    def __init__(self, sizes: Dict[str, int], batch_size: int, strategy: str = "ggas",
                 lam: float = 0.5, temperature: float = 1.0, ema: float = 0.9,
                 min_prob: float = 0.02, warmup_steps: Optional[int] = None, refresh: str = "step",
                 refresh_every: int = 1, ema_start: str = "first", floor: str = "waterfill",
                 seed: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = True):
        if not sizes:
            raise ValueError("TaskBatchSampler: `sizes` is empty; give at least one sub-dataset")
        if strategy not in STRATEGIES:
            raise ValueError(f"TaskBatchSampler: strategy must be one of {STRATEGIES}, got {strategy!r}")
        for what, value, allowed in (("refresh", refresh, REFRESH_MODES), ("ema_start", ema_start, EMA_STARTS),
                                     ("floor", floor, FLOORS)):
            if value not in allowed:
                raise ValueError(f"TaskBatchSampler: {what} must be one of {allowed}, got {value!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"TaskBatchSampler: need 0 <= rank < world_size, got rank={rank} "
                             f"world_size={world_size}")
        if batch_size < world_size or batch_size % world_size:
            raise ValueError(f"TaskBatchSampler: the global batch_size={batch_size} must be a positive "
                             f"multiple of world_size={world_size}")
        if temperature <= 0 or not 0.0 <= ema < 1.0 or min_prob < 0 or refresh_every < 1:
            raise ValueError(f"TaskBatchSampler: need temperature > 0, 0 <= ema < 1, min_prob >= 0, "
                             f"refresh_every >= 1; got {temperature}, {ema}, {min_prob}, {refresh_every}")
        self.names: List[str] = sorted(sizes)
        self.sizes: List[int] = []
        for name in self.names:
            n = sizes[name]
            if not isinstance(n, int) or n < world_size:
                raise ValueError(f"TaskBatchSampler: sub-dataset {name!r} has {n!r} examples; it needs "
                                 f"an int >= world_size={world_size}")
            self.sizes.append(n)
        self.index = {name: k for k, name in enumerate(self.names)}
        self.batch_size, self.strategy, self.lam = batch_size, strategy, lam
        self.temperature, self.ema, self.min_prob = temperature, ema, min_prob
        self.refresh, self.refresh_every, self.seed, self.drop_last = refresh, refresh_every, seed, drop_last
        self.ema_start, self.floor = ema_start, floor
        self.rank, self.world_size = rank, world_size
        # Per-sub-dataset global batch: b, or N_k rounded down to a multiple of the world size.
        self.batch_sizes = [min(batch_size, n - n % world_size) for n in self.sizes]
        self.warmup_steps = self.steps_per_epoch() if warmup_steps is None else int(warmup_steps)
        # Steps between two recomputations of p: one epoch of draws, or refresh_every.
        self.refresh_interval = max(1, self.steps_per_epoch()) if refresh == "epoch" else refresh_every

        # --- mutable state (everything in state_dict) ---
        self.step = 0  # number of batches drawn so far
        # G_k; None = never reported (ema_start "first"); "zero" starts every G_k at 0 instead.
        self.difficulty: List[Optional[float]] = [0.0 if ema_start == "zero" else None] * len(self.names)
        self.num_updates = [0] * len(self.names)  # reports received per sub-dataset
        self.stream_epoch = [0] * len(self.names)  # which shuffle of sub-dataset k is in use
        self.stream_pos = [0] * len(self.names)  # next position in that shuffle
        self._probs: Optional[List[float]] = None  # cached p (recomputed every refresh_interval steps)
        self._perm_cache: Dict[int, Tuple[int, List[int]]] = {}  # k -> (epoch, permutation); derived

    @classmethod
    def from_config(cls, sizes: Dict[str, int], cfg: SamplerConfig, rank: int = 0,
                    world_size: int = 1) -> "TaskBatchSampler":
        return cls(sizes, rank=rank, world_size=world_size, **asdict(cfg))

    @property
    def config(self) -> SamplerConfig:
        return SamplerConfig(**{f.name: getattr(self, f.name) for f in fields(SamplerConfig)})

    # ------------------------------------------------------------------ probabilities
    def steps_per_epoch(self) -> int:
        """Batches in one pass over every sub-dataset: sum_k floor(N_k / b_k), plus, without drop_last,
        one for each tail that can be shared by the W ranks ((N_k mod b_k) >= W; _take skips a smaller
        one). With one rank that is sum_k ceil(N_k / b_k)."""
        full = sum(n // b for n, b in zip(self.sizes, self.batch_sizes))  # whole batches
        if self.drop_last:
            return full
        return full + sum(n % b >= self.world_size for n, b in zip(self.sizes, self.batch_sizes))  # + tails

    def in_warmup(self, step: Optional[int] = None) -> bool:
        return (self.step if step is None else step) < self.warmup_steps

    def _effective_difficulties(self) -> List[float]:
        """G_k used in the score; under ema_start "first" a sub-dataset with no report yet gets the
        mean of the others (neutral: neither favoured nor starved before its first measurement), 0
        if none has one.  Under "zero" every G_k is a number from the start (0 until reported)."""
        seen = [g for g in self.difficulty if g is not None]
        fill = sum(seen) / len(seen) if seen else 0.0
        return [fill if g is None else g for g in self.difficulty]

    def _compute_probabilities(self) -> List[float]:
        k = len(self.names)
        if self.strategy == "uniform" or (self.strategy == "ggas" and self.in_warmup()):
            return [1.0 / k] * k  # uniform strategy, or GGAS warm-up
        g = self._effective_difficulties() if self.strategy == "ggas" else None  # "size": no G_k term
        return ggas_probabilities(self.sizes, g, self.lam, self.temperature, self.min_prob, self.floor)

    def _refresh_due(self) -> bool:
        """Is p recomputed before the draw at self.step?  At a refresh boundary (every step, every
        refresh_every steps, or each epoch start) and at the end of the warm-up."""
        return (self._probs is None or self.step % self.refresh_interval == 0
                or self.step == self.warmup_steps)

    def _current_probabilities(self) -> List[float]:
        """p for the draw at self.step, recomputed on schedule and at the end of the warm-up."""
        if self._refresh_due():
            self._probs = self._compute_probabilities()
        return self._probs

    def probabilities(self) -> Dict[str, float]:
        """{name: p_k} that the NEXT draw will use (recomputed now; does not change the state)."""
        cached = self._compute_probabilities() if self._refresh_due() else self._probs
        return dict(zip(self.names, cached))

    def difficulties(self) -> Dict[str, float]:
        """{name: G_k} as used in the score (unreported sub-datasets show the fill-in value)."""
        return dict(zip(self.names, self._effective_difficulties()))

    # ------------------------------------------------------------------ feedback
    def update(self, name: str, grad_norm) -> None:
        """Report the gradient norm measured on a step of sub-dataset `name` (float or 0-d tensor).

        G_k <- ema * G_k + (1 - ema) * g.  With ema_start "first" the first report sets G_k = g
        (starting the EMA at 0 would make a sub-dataset look easy merely because it was rarely
        drawn); with "zero" (the authors) G_k starts at 0 and the first report gives (1 - ema) g.
        """
        if name not in self.index:
            raise ValueError(f"TaskBatchSampler.update: unknown sub-dataset {name!r}; "
                             f"known: {self.names}")
        g = float(grad_norm.detach().float().item() if isinstance(grad_norm, torch.Tensor) else grad_norm)
        if not math.isfinite(g) or g < 0:
            raise ValueError(f"TaskBatchSampler.update: gradient norm {g} reported for {name!r} at "
                             f"step {self.step} is not a finite non-negative number")
        k = self.index[name]
        old = self.difficulty[k]
        self.difficulty[k] = g if old is None else self.ema * old + (1.0 - self.ema) * g  # G_k EMA
        self.num_updates[k] += 1

    # ------------------------------------------------------------------ drawing
    def _permutation(self, k: int, epoch: int) -> List[int]:
        """The epoch-th shuffle of sub-dataset k (seeded from (seed, k, epoch); cached)."""
        hit = self._perm_cache.get(k)
        if hit is not None and hit[0] == epoch:
            return hit[1]
        gen = torch.Generator().manual_seed(_mix(self.seed, 1, k, epoch))
        perm = torch.randperm(self.sizes[k], generator=gen).tolist()  # (N_k,)
        self._perm_cache[k] = (epoch, perm)
        return perm

    def _choose(self, probs: List[float]) -> int:
        """Inverse-CDF draw of a sub-dataset with a uniform seeded from (seed, step): every rank
        computes the same number without communicating, and resuming needs only the step."""
        gen = torch.Generator().manual_seed(_mix(self.seed, 0, self.step))
        u = torch.rand((), generator=gen, dtype=torch.float64).item()  # U(0, 1)
        acc = 0.0
        for k, pk in enumerate(probs):
            acc += pk
            if u < acc:
                return k
        return max(k for k, pk in enumerate(probs) if pk > 0)  # u beyond a rounded-down total

    def _take(self, k: int) -> List[int]:
        """Next global batch of sub-dataset k from its stream (reshuffling when exhausted)."""
        b, n = self.batch_sizes[k], self.sizes[k]
        remaining = n - self.stream_pos[k]
        if remaining <= 0 or (self.drop_last and remaining < b):
            # Exhausted (or only a short tail left and drop_last): next shuffle of k.
            self.stream_epoch[k] += 1
            self.stream_pos[k] = 0
            remaining = n
        size = min(b, remaining)
        size -= size % self.world_size  # equal shards on every rank
        if size == 0:  # a tail smaller than the world size cannot be shared: skip it
            self.stream_epoch[k] += 1
            self.stream_pos[k] = 0
            size = b
        perm = self._permutation(k, self.stream_epoch[k])
        start = self.stream_pos[k]
        self.stream_pos[k] = start + size
        return perm[start:start + size]

    def next_global(self) -> Tuple[str, List[int]]:
        """Draw the next step's sub-dataset and its GLOBAL batch (all ranks' indices)."""
        k = self._choose(self._current_probabilities())
        batch = self._take(k)
        self.step += 1
        return self.names[k], batch

    def __next__(self) -> Tuple[str, List[int]]:
        name, batch = self.next_global()
        per_rank = len(batch) // self.world_size
        return name, batch[self.rank * per_rank:(self.rank + 1) * per_rank]  # this rank's shard

    def peek(self) -> Tuple[str, List[int]]:
        """What next() would return now, without drawing it (nothing changes).

        train.py prepares this batch ahead of time. It is exactly the next draw unless an update()
        comes first and moves the probabilities across this step's uniform u (never during the
        warm-up, rarely after it, as difficulties move a little per report).
        """
        saved = (self.step, list(self.stream_epoch), list(self.stream_pos), self._probs)
        try:
            return next(self)
        finally:  # put the state back; _perm_cache is derived from (seed, k, epoch), so it may stay
            self.step, self.stream_epoch, self.stream_pos, self._probs = saved

    def __iter__(self) -> Iterator[Tuple[str, List[int]]]:
        return self  # infinite: train.py stops after --steps

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """Everything needed to continue exactly, as plain ints/floats/str/lists/None (JSON-safe;
        floats survive json round trips exactly).  rank/world_size are not state: a run may
        resume on a different number of ranks and still see the same global batches."""
        return {
            "version": 1,
            "names": list(self.names),
            "sizes": list(self.sizes),
            "batch_size": self.batch_size,
            "seed": self.seed,
            "strategy": self.strategy,
            "refresh": self.refresh,
            "ema_start": self.ema_start,
            "floor": self.floor,
            "step": self.step,
            "difficulty": list(self.difficulty),
            "num_updates": list(self.num_updates),
            "stream_epoch": list(self.stream_epoch),
            "stream_pos": list(self.stream_pos),
            "probs": None if self._probs is None else list(self._probs),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` output.  Refuses a state from a different data/batch/seed setup,
        which would silently draw different batches.  A state saved before the GGAS switches
        existed holds none of them: it was drawn with ours (step, first, waterfill)."""
        older = {"refresh": "step", "ema_start": "first", "floor": "waterfill"}  # absent: these
        for key in ("names", "sizes", "batch_size", "seed", "refresh", "ema_start", "floor"):
            mine = getattr(self, key)
            theirs = state.get(key, older.get(key))
            if (list(theirs) if isinstance(theirs, (list, tuple)) else theirs) != mine:
                raise ValueError(f"TaskBatchSampler.load_state_dict: saved {key}={theirs!r} differs from "
                                 f"this sampler's {mine!r}; resume with the same data and settings")
        if state.get("version") != 1:
            raise ValueError(f"TaskBatchSampler.load_state_dict: unknown state version {state.get('version')!r}")
        k = len(self.names)
        self.step = int(state["step"])
        self.difficulty = [None if g is None else float(g) for g in state["difficulty"]]
        self.num_updates = [int(v) for v in state["num_updates"]]
        self.stream_epoch = [int(v) for v in state["stream_epoch"]]
        self.stream_pos = [int(v) for v in state["stream_pos"]]
        self._probs = None if state["probs"] is None else [float(v) for v in state["probs"]]
        if not (len(self.difficulty) == len(self.num_updates) == len(self.stream_epoch)
                == len(self.stream_pos) == k):
            raise ValueError("TaskBatchSampler.load_state_dict: per-sub-dataset lists have the wrong length")
        self._perm_cache.clear()


def _simulate(strategy: str, steps: int = 1500, report_every: int = 250) -> None:
    """Four synthetic tasks: sizes differ, and each has a difficulty that fades the more it is
    trained (grad norm = d_k * exp(-visits_k / 150) + noise)."""
    sizes = {"tiny-hard": 400, "small-easy": 2_000, "mid": 8_000, "big-easy": 40_000}
    hardness = {"tiny-hard": 3.0, "small-easy": 0.5, "mid": 1.5, "big-easy": 0.5}
    s = TaskBatchSampler(sizes, batch_size=64, strategy=strategy, warmup_steps=200, seed=0)
    noise = torch.Generator().manual_seed(1)
    visits = {name: 0 for name in sizes}
    header = "  ".join(f"{n:>10}" for n in s.names)
    print(f"--- {strategy} (warm-up 200 steps; one epoch would be {s.steps_per_epoch()} steps) ---")
    print(f"{'step':>5}  {header}   (probabilities; then difficulties G_k)")
    for step in range(steps + 1):
        if step % report_every == 0:
            probs = "  ".join(f"{v:10.3f}" for v in s.probabilities().values())
            diffs = " ".join(f"{v:5.2f}" for v in s.difficulties().values())
            print(f"{step:5d}  {probs}   G = {diffs}")
        name, _ = next(s)
        visits[name] += 1
        g = hardness[name] * math.exp(-visits[name] / 150) + 0.05 * torch.rand((), generator=noise).item()
        s.update(name, g)
    print("visits:", visits, "\n")


if __name__ == "__main__":
    for strategy in ("ggas", "size", "uniform"):
        _simulate(strategy)
    print("GGAS starts uniform, then favours the hard and the big tasks; as a task's gradients "
          "fade it loses its boost and the size prior takes over.  'size' is fixed at N^0.5; "
          "the floor (0.02) keeps every task alive.")
