"""Solutions to the notebooks' exercises (open this only after trying).

Each exercise cell in notebooks/ holds a function whose body is `raise NotImplementedError`, for you
to replace. The check cell below it runs your function through `answer(yours, solution)`: while your
body still raises NotImplementedError the check runs the solution from this file instead (and says so),
so the notebook runs top to bottom either way (the notebook test in CI runs it untouched); once you
have written yours, the check tests yours.

One section per notebook, in reading order.
"""
from __future__ import annotations

import functools


def answer(yours, solution):
    """`yours`, or `solution` while `yours` is still the unanswered stub (raises NotImplementedError).

    Returns a function with the stub's signature that the check cell calls. The first call decides:
    a NotImplementedError from `yours` switches to `solution` for good and prints one line saying so.
    """
    state = {"use": None}

    @functools.wraps(yours)
    def call(*args, **kwargs):
        if state["use"] is None:
            try:
                out = yours(*args, **kwargs)
            except NotImplementedError:
                print(f"(no answer in {yours.__name__} yet: checking notebooks/solutions.py's "
                      f"{solution.__name__} instead)")
                state["use"] = solution
            else:
                state["use"] = yours
                return out
        return state["use"](*args, **kwargs)

    return call


# ================================================================================================
# 01 · U-FIRE data
# ================================================================================================


def expected_first_rank(gallery_size: int, n_positives: int) -> float:
    """Notebook 01, exercise 1: the expected 1-based rank of the first correct image when the gallery
    is ranked at random, for a query with P correct images among G.

    Take one wrong image and the P correct ones: a random ranking orders these P + 1 images uniformly,
    so the wrong image comes before all P correct ones with probability 1 / (P + 1). By linearity of
    expectation, E[wrong images ranked before the first correct one] = (G - P) / (P + 1); the first
    correct image comes right after them: E[rank] = 1 + (G - P) / (P + 1) = (G + 1) / (P + 1).
    """
    G, P = gallery_size, n_positives
    return 1 + (G - P) / (P + 1)  # = (G + 1) / (P + 1)


# ================================================================================================
# 02 · The embedding model
# ================================================================================================


def grad_through_normalize(h, g):
    """Exercise 1 of 02: the gradient that reaches the summary state h through q_raw = h / ||h||.

    h: (B, D) summary states; g: (B, D) the upstream gradient dL/dq_raw. Returns dL/dh, (B, D).

    Derivation: q = h / ||h||, and d||h||/dh = h / ||h|| = q, so
        dq_i/dh_j = (delta_ij - q_i q_j) / ||h||       (the Jacobian is symmetric)
        dL/dh     = (g - (g . q) q) / ||h||
    The gradient is g with its component along q removed, divided by ||h||: it is orthogonal to h (the
    loss can turn h but never change its length) and a long h turns slowly.
    """
    norm = h.norm(dim=-1, keepdim=True)                              # (B, 1) ||h||
    q = h / norm                                                     # (B, D) q_raw
    return (g - (g * q).sum(-1, keepdim=True) * q) / norm            # (B, D) tangential part of g, / ||h||


# ================================================================================================
# 03 · PGSQC
# ================================================================================================


def dslerp_dlam(q, p, lam):
    """Exercise 1 of 03: d slerp(q, p; lam) / d lam, for ω away from 0 and π.

    q, p: (B, D) directions (normalised here); lam: (B,). Returns (B, D).

    Derivation: with ω = angle(q, p) fixed (it does not depend on lam),
        slerp = sin((1-lam) ω)/sin ω q + sin(lam ω)/sin ω p
        d/dlam = ω / sin ω * (cos(lam ω) p - cos((1-lam) ω) q)
    Substituting p = cos ω q + sin ω u (u the unit tangent at q towards p) gives
        d/dlam = ω (-sin(lam ω) q + cos(lam ω) u):
    a vector of length ω, tangent to the sphere at the calibrated query: it is the velocity of a walk
    along the great circle at constant angular speed ω. At ω = 0 (the proposal equals q, as at
    initialisation) it is 0: almost no gradient reaches λ until the proposal opens.
    """
    import torch
    import torch.nn.functional as F

    q, p = F.normalize(q, dim=-1), F.normalize(p, dim=-1)           # (B, D) unit vectors
    cos_w = (q * p).sum(-1, keepdim=True).clamp(-1.0, 1.0)           # (B, 1) cos ω
    omega = torch.atan2((p - cos_w * q).norm(dim=-1, keepdim=True), cos_w)  # (B, 1) ω in [0, π]
    lam = lam[:, None]                                               # (B, 1) broadcasts over D
    return omega / torch.sin(omega) * (torch.cos(lam * omega) * p - torch.cos((1 - lam) * omega) * q)  # (B, D)


# ================================================================================================
# 04 · GGAS
# ================================================================================================


def water_fill(p, min_prob: float):
    """04, exercise: the water-filling floor in closed form (the same result as sampler.floor_probabilities).

    The floored distribution is p'_k = max(m, c p_k), m = min(min_prob, 1/K): the free tasks are all scaled by
    one factor c (the water level), the pinned ones sit at m.

    1. The pinned tasks are the j smallest. A task is pinned when c p_k < m; for a common c that holds for
       every task with a smaller p_k too, so the pinned set is a prefix of p sorted ascending (ps).
    2. With the j smallest pinned, the K - j free tasks share what the pinned leave:
       c_j = (1 - j m) / (ps[j] + ... + ps[K-1]).
    3. The right j is the first for which the smallest free task stays at or above the floor,
       c_j ps[j] >= m. Pinning one more task moves the level: c_{j+1} < c_j exactly when c_j ps[j] < m
       (write out c_{j+1} / c_j). So while the condition fails, each further pin lowers c, and every task
       pinned so far stays under the floor at the new level; at the first j where it holds, the tasks above
       are at or over m and those below are under it: a consistent split, and p' sums to 1. The
       pin-and-repeat loop pins prefixes of the same order, each round only tasks below m at a level that
       is still >= the final one, so it stops at this same j. If no j qualifies (m = 1/K, up to rounding),
       every task is pinned: uniform.
    """
    import torch

    k = p.numel()
    m = min(max(min_prob, 0.0), 1.0 / k)                         # the floor
    ps = torch.sort(p).values                                    # (K,) ascending
    free = ps.flip(0).cumsum(0).flip(0)                          # (K,) free[j] = ps[j] + ... + ps[K-1]
    j = torch.arange(k, dtype=p.dtype)                           # (K,) number of pinned tasks
    level = (1.0 - m * j) / free                                 # (K,) c_j for every j at once
    ok = level * ps >= m                                         # (K,) the smallest free task is not under the floor
    if not ok.any():
        return torch.full_like(p, 1.0 / k)                       # everything pinned: uniform
    c = level[ok.nonzero()[0, 0]]                                # () the first consistent j's level
    return torch.clamp(c * p, min=m)                             # (K,) max(m, c p_k)


# ================================================================================================
# 05 · Training
# ================================================================================================


def gradcache_step_by_hand(model, queries, images, ids, tau, chunk):
    """Exercise 1 of 05: GradCache with the calibrator's regulariser, on chunks of `chunk` rows.

    Leaves dL/dtheta in the parameters' .grad and returns L = L_nce + R (a float), where R is the
    batch mean of the per-query regulariser. No forward with gradients sees more than one chunk.
    """
    import torch

    import train

    n = len(ids)
    parts = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]  # e.g. 8 rows, chunk 3: (0,3) (3,6) (6,8)
    # Pass 1, no graph: keep only the vectors (and each chunk's mean regulariser, for the reported L).
    with torch.no_grad():
        outs = [model(queries=queries[s:e], images=images[s:e]) for s, e in parts]
    q = torch.cat([o["q"].float() for o in outs]).requires_grad_()  # (B, D) leaf: no graph behind it
    t = torch.cat([o["t"].float() for o in outs]).requires_grad_()  # (B, D) leaf
    # The cached gradient: L_nce on the whole batch, differentiated w.r.t. the vectors only.
    nce = train.info_nce(q, t, ids, tau)  # ()
    nce.backward()  # q.grad = g_q (B, D), t.grad = g_t (B, D)
    # R = batch mean = sum_c (|c| / B) * (chunk c's mean): the weight is the chunk's share of the rows,
    # not 1 / (number of chunks), since the chunks are unequal (3, 3, 2).
    weights = [(e - s) / n for s, e in parts]
    reg = sum(w * float(o["reg"]) for w, o in zip(weights, outs))
    # Pass 2, one chunk at a time with a graph: the surrogate's gradient is the chunk's share of dL/dtheta.
    # (A model with dropout would need each chunk's RNG state from pass 1 restored here: the tiny model has none.)
    for (s, e), w in zip(parts, weights):
        out = model(queries=queries[s:e], images=images[s:e])
        surrogate = ((out["q"].float() * q.grad[s:e]).sum()  # <g_q[c], q_c(theta)>
                     + (out["t"].float() * t.grad[s:e]).sum()  # <g_t[c], t_c(theta)>
                     + w * out["reg"].float())  # w_c r_c(theta): R reaches theta outside q and t
        surrogate.backward()  # gradients add up over the chunks
    return float(nce.detach()) + reg


def train_step_by_hand(run, info_nce):
    """Exercise 2 of 05: one whole step of `run` (a train.Run), in train.train_step's order, calling no
    train.py function except the step function train_step would choose. `info_nce(q, t, ids, tau)` is the
    loss. Returns what each piece did."""
    import random

    import torch

    from support import fast_train, recipes
    from support.plumbing import mix_seed

    cfg = run.cfg
    subset, indices = next(run.batches)  # 1. GGAS draws a sub-dataset and this rank's records
    # 2. the batch: one (query, target) pair per record, each from an RNG seeded by (seed, step, record)
    pairs = [run.view.pair(subset, i, random.Random(mix_seed(cfg.seed, run.step, i))) for i in indices]
    queries, images, keys = [p.query for p in pairs], [p.target for p in pairs], [p.target_key for p in pairs]
    q_in, t_in = run.embedder.collate_queries(queries), run.embedder.collate_images(images)
    if cfg.positives == "multi":
        ids = torch.tensor([mix_seed(k) for k in keys], dtype=torch.int64)  # (B,) equal iff same image / label
    else:
        ids = torch.arange(len(keys))  # (B,) P(i) = {i}
    torch.manual_seed(mix_seed(cfg.seed, run.step, run.di.rank))  # 3. dropout's RNG from (seed, step, rank)
    chunk = recipes.step_chunk_size(cfg, subset)
    if run.spare is not None and (chunk == 0 or chunk >= len(keys)):  # 4. the step function train_step takes
        out = fast_train.two_core_step(run.model, q_in, t_in, lambda q, t: info_nce(q, t, ids, cfg.temperature),
                                       run.spare)
    else:
        import train  # a run without a spare core: train_step takes GradCache (one chunk: the plain step)

        batch = train.Batch(subset, queries, images, keys, (q_in, t_in))
        out = vars(train.gradcache_step(run.model, batch, cfg.temperature, run.di, chunk_size=chunk,
                                        positives=cfg.positives, reg_per_chunk=cfg.reg_per_chunk))
    # 5. GGAS's difficulty: the summary tokens' gradient norm, before clipping changes it
    tok = float(torch.linalg.vector_norm(torch.stack(
        [p.grad.detach().float().norm() for p in run.embedder.token_parameters() if p.grad is not None])))
    # 6. clip: g <- g * min(1, c / (||g|| + 1e-6)), the global norm measured first
    grads = [p.grad for p in run.params if p.grad is not None]
    g_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))  # () ||g||
    if cfg.grad_clip > 0:
        coef = torch.clamp(cfg.grad_clip / (g_norm + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef)
    g_clipped = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    lr = run.optimizer.param_groups[0]["lr"]  # the lr this update uses
    run.optimizer.step()  # 7. AdamW
    run.scheduler.step()  # 8. the next step's lr
    run.optimizer.zero_grad(set_to_none=True)
    run.task_sampler.update(subset, tok)  # 9. GGAS: G_k <- EMA of k's reports
    run.step += 1
    return {"subset": subset, "loss": out["loss"], "nce": out["nce"], "reg": out["reg"], "lam": out["lam"],
            "lr": lr, "token_grad_norm": tok, "grad_norm": float(g_norm), "grad_norm_clipped": g_clipped,
            "probabilities": run.task_sampler.probabilities(), "difficulties": run.task_sampler.difficulties()}


# ================================================================================================
# 06 · Evaluation
# ================================================================================================


def wilson(hits: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Notebook 06, exercise 1: the 95 % Wilson score interval of a share of hits out of n queries.

    It is the set of true hit rates p for which the observed share p_hat lies within z standard errors
    of p, the standard error taken at p (not at p_hat): (p_hat - p)^2 <= z^2 p (1 - p) / n. Expanding,
    (1 + z^2/n) p^2 - (2 p_hat + z^2/n) p + p_hat^2 <= 0, a quadratic in p whose two roots are the ends:

        p = (p_hat + z^2/(2n) -+ z sqrt(p_hat (1 - p_hat) / n + z^2 / (4 n^2))) / (1 + z^2/n)
    """
    p_hat = hits / n
    a = 1 + z * z / n                                                    # the quadratic's p^2 coefficient
    centre = (p_hat + z * z / (2 * n)) / a                               # pulled from p_hat toward 1/2
    half = z / a * (p_hat * (1 - p_hat) / n + z * z / (4 * n * n)) ** 0.5
    return max(0.0, centre - half), min(1.0, centre + half)            # clip float rounding at 0 and 1


# ================================================================================================
# 07 · What the ideas buy
# ================================================================================================


def paired_bootstrap(hits_a, hits_b, task_of, seed_draw, counts):
    """Notebook 07, exercise 1: the two-level paired bootstrap of the overall difference A - B.

    hits_a[s][j], hits_b[s][j]: (n_j,) 0/1, query q of sub-dataset j found in the top K by variant A / B
    trained with seed s (the same queries, in the same order, for both). task_of[j]: j's task word.
    seed_draw: (n_boot, S) the seeds each replicate draws (level 1). counts[s][j]: (n_boot, n_j) how
    many times each query of sub-dataset j is drawn in each replicate for seed s (level 2; a seed drawn
    twice in a replicate reuses its redraw, as benchmarks/ablation.py does).
    Returns (D, lo, hi): the mean over seeds of D_s, and the 2.5 / 97.5 % quantiles of the replicates.
    """
    import numpy as np

    tasks = sorted(set(task_of))
    # Overall = mean over tasks of the mean over the task's sub-datasets: row j weighs 1 / (T n_task(j)).
    w = np.array([1 / (len(tasks) * task_of.count(t)) for t in task_of])               # (J,)
    S = len(hits_a)
    point, reps = [], []
    for s in range(S):
        d = [np.asarray(a, float) - np.asarray(b, float) for a, b in zip(hits_a[s], hits_b[s])]  # J x (n_j,) d_q
        point.append(sum(w[j] * d[j].mean() for j in range(len(d))))                 # D_s
        # The pairing: one draw of queries, applied to A and B alike, i.e. to d_q.
        reps.append(sum(w[j] * (counts[s][j] @ d[j]) / len(d[j]) for j in range(len(d))))  # (n_boot,) D_s*
    reps = np.stack(reps)                                                                # (S, n_boot)
    boot = reps[seed_draw, np.arange(len(seed_draw))[:, None]].mean(axis=1)            # (n_boot,) mean over drawn seeds
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return float(np.mean(point)), float(lo), float(hi)
