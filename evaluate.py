"""Recall@K evaluation of a FashionLens checkpoint on U-FIRE (the paper's test protocol).

Where this sits in the method
-----------------------------
FashionLens turns every query (text, sketch, street photo, outfit, video, image + text, image +
attribute) into one unit vector q and every gallery image into one unit vector t (model.py). Retrieval
is then plain nearest-neighbour search by inner product, which on unit vectors is cosine similarity.
This module measures how often the right image comes back near the top:

    Recall@K = (1 / |Q|) * sum_{i in Q} 1[ top_K(q_i) ∩ P_i ≠ ∅ ]

where top_K(q_i) are the K gallery images with the largest q_i · t_g, P_i is the set of gallery
images that count as correct for query i (every entry of its `target_image`; for `asfr`, every image
filed under its attribute label), and Q is *every* query of the sub-dataset. This is the authors'
definition (utils.py 113-134, `calculate_recall_at_k`: hits / num_queries, where a query whose
positive list is empty is skipped in the loop but stays in num_queries): at least one hit in the
top K, not the "fraction of positives retrieved", and a query whose positives are all absent from
the gallery (P_i = ∅) is a miss at every K. Such queries cannot hit whatever the model does, so they
are not encoded; they are counted in the column `missing`, and the table's Recall@K is

    Recall@K = hits@K / (queries + missing)      queries: those with P_i ≠ ∅ (encoded and searched)

With --max-queries N only N of the `queries` are encoded; the hit rate among them is then scaled by
the sub-dataset's whole share of queries that have a positive, queries / (queries + missing) counted
over all records, which is the same number when nothing is sampled.

Which gallery: the test split (the paper's tables) ranks against the published gallery file, as the
authors' test.py does (0_test_candidates/<name>_candidates.json, asfr its label -> images file;
test.py 43-61, 106-130); targets missing from that file are dropped from P_i (test.py 83-97), so
queries with none left are the `missing` ones. For the val split (model selection during training)
the authors' evaluate.py builds the gallery from the val records themselves (evaluate.py 86-112:
the union of their `target_image`s; asfr: every image of the val label file) and never meets a
missing positive (a target absent from the image folder would stop it: `list.index`, evaluate.py
68). Ours does the same (data.UFire.gallery: the union of the split's targets; asfr: its val label
pool), so `missing` is 0 on val unless an asfr label has no image in its pool, and such a query is
a miss here where the authors' code would have crashed.

Protocol, step by step
----------------------
1. Gallery: every unique image across all evaluated sub-datasets is encoded once (sub-datasets that
   share images share their embeddings), batched, with a progress bar. The (G, D) matrix is cached
   on disk under a key made of the checkpoint's fingerprint and the exact image list, so a second
   run on the same checkpoint encodes nothing. The cache file's name carries a sha256 of its bytes,
   checked before use: a damaged file is reported, recomputed and replaced, never trusted.
2. Queries: one deterministic query per record (data.record_to_query with rng=None), encoded through
   the calibrator (PGSQC), since that is what the model does at test time.
3. Search: exact inner-product search with faiss (IndexFlatIP). Ties are broken by gallery index so
   results never depend on thread scheduling. `search_torch` is the readable reference (one matmul
   and a stable sort) and the tests hold the two equal.
4. Metric: Recall@K per sub-dataset (missing queries included, as misses), then the mean per task
   word, then the overall mean over task words (each task weighs the same, however many
   sub-datasets it has; OOD tasks are reported apart). A sub-dataset without a single record (an
   empty triplet file) has no Recall@K at all: its row says so (None in JSON, n/a in the table) and
   the means are taken over the rows that have queries. One whose every record is missing has
   Recall@K = 0 and counts in the means, as in the authors' code.

Run it
------
    python evaluate.py --ckpt runs/fashionlens-tiny/best            # test split of its training data
    python evaluate.py --ckpt runs/X/best --split val --tasks cir,t2i --k 1,10
    python evaluate.py --ckpt runs/X/best --ood only                 # just the out-of-distribution tasks
    python evaluate.py --ckpt runs/X/best --max-queries 100          # quick look: 100 queries per sub-dataset
    python evaluate.py --self-check                                   # small demo on hand-made vectors

A bad flag, checkpoint or data file stops it with one `error:` line and exit status 1.

Shape legend: B queries, G gallery images, D embedding size, K retrieved per query.
"""
from __future__ import annotations

from support import plumbing  # noqa: I001  first: it sets OMP_WAIT_POLICY before numpy and torch load

import argparse
import dataclasses
import hashlib
import io
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence


import numpy as np
import torch

import data
from support.errors import EvalError, FashionLensError, run_cli

DEFAULT_KS = (1, 5, 10, 50)


@dataclass
class EvalConfig:
    """Knobs of one evaluation run (the CLI flags map one to one onto these)."""

    split: str = "test"  # "test" (the paper's tables) or "val" (model selection during training)
    ks: tuple = DEFAULT_KS  # the paper reports Recall@1, 5, 10 and 50
    batch_size: int = 64  # images per forward pass; 64 keeps the tiny model's matmuls efficient on CPU
    cache_dir: Optional[str] = ".cache/gallery"  # where gallery embeddings are kept; None = no cache
    progress: bool = True  # tqdm bars while encoding (off inside training and tests)
    keep_per_query: bool = False  # also return top-k ids/scores per query (for retrieval grids)
    max_queries: int = 0  # score at most this many evenly spaced queries per sub-dataset; 0 = all.
    #                       The gallery stays whole, so Recall@K keeps its meaning and only gets
    #                       noisier (validation during training; a quick look at a real test split)


# ----------------------------------------------------------------------------------------------
# Search: the readable reference (torch) and the fast path (faiss), equal by construction and test.
# ----------------------------------------------------------------------------------------------

def search_torch(q: np.ndarray | torch.Tensor, g: np.ndarray | torch.Tensor, k: int):
    """Reference exact search: all scores, then a *stable* descending sort.

    Stability is what breaks ties by gallery index: among equal scores, the lower index stays first.
    Returns (scores (B, K) float32, ids (B, K) int64) as numpy arrays.
    """
    q = torch.as_tensor(q, dtype=torch.float32)  # (B, D)
    g = torch.as_tensor(g, dtype=torch.float32)  # (G, D)
    k = min(k, g.shape[0])
    sims = q @ g.T  # (B, G) inner products = cosines on unit vectors
    order = torch.sort(sims, dim=1, descending=True, stable=True)  # (B, G) sorted scores and ids
    return order.values[:, :k].numpy(), order.indices[:, :k].numpy()  # (B, K), (B, K)


def _order_ties(scores: np.ndarray, ids: np.ndarray):
    """Reorder each row by (score descending, gallery index ascending)."""
    order = np.lexsort((ids, -scores), axis=1)  # (B, K) last key (-score) is the primary key
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)  # (B, K) each


def search_faiss(q: np.ndarray, g: np.ndarray, k: int, index=None):
    """Fast exact search with faiss' brute-force inner-product index, ties broken by gallery index.

    faiss returns the right top-K *set* but orders equal scores by whatever its heap did, and when a
    tie straddles the K-th place it may keep a higher gallery index than the reference would. So we
    ask for K+1 results: rows whose K-th and (K+1)-th scores differ are exact after a cheap re-sort;
    the rare rows with a tie across the cut are recomputed with the reference path.
    Returns (scores (B, K) float32, ids (B, K) int64).
    """
    import faiss  # imported here so `import evaluate` stays light for readers of the metric code

    q = np.ascontiguousarray(q, dtype=np.float32)  # (B, D)
    g = np.ascontiguousarray(g, dtype=np.float32)  # (G, D)
    k = min(k, g.shape[0])
    if index is None:
        index = faiss.IndexFlatIP(g.shape[1])  # exact inner product, no training, no compression
        index.add(g)
    extra = 1 if k < g.shape[0] else 0  # one look past the cut, unless K already covers the gallery
    scores, ids = index.search(q, k + extra)  # (B, K+1), (B, K+1)
    if extra:
        straddle = scores[:, k - 1] == scores[:, k]  # (B,) a tie crosses the K-th place
        scores, ids = scores[:, :k], ids[:, :k]  # (B, K), (B, K)
        scores, ids = _order_ties(scores, ids)  # (B, K) deterministic order inside the top K
        if straddle.any():
            rows = np.nonzero(straddle)[0]  # (b,) the few rows to redo exactly
            s_ref, i_ref = search_torch(q[rows], g, k)  # (b, K) each
            scores[rows], ids[rows] = s_ref, i_ref
    else:
        scores, ids = _order_ties(scores, ids)  # (B, G) whole gallery, just order the ties
    return scores, ids.astype(np.int64)


# ----------------------------------------------------------------------------------------------
# The metric
# ----------------------------------------------------------------------------------------------

def first_hit_rank(ids: np.ndarray, positives: Sequence[Sequence[int]]) -> np.ndarray:
    """0-based rank of the first positive in each row of `ids` (B, K); -1 when none is in the top K.

    A query with an empty positive list also gets -1: it can never hit, and `recall_at_k` counts it
    as a miss (the authors' denominator, see the module docstring).
    """
    ranks = np.full(len(positives), -1, dtype=np.int64)  # (B,)
    for i, pos in enumerate(positives):
        hit = np.isin(ids[i], np.asarray(list(pos), dtype=np.int64))  # (K,) bool
        if hit.any():
            ranks[i] = int(np.argmax(hit))  # argmax of a bool row = first True
    return ranks


def recall_at_k(ids: np.ndarray, positives: Sequence[Sequence[int]], ks: Iterable[int],
                missing: float = 0) -> dict:
    """Recall@K for each K: hits@K / (B + missing), the authors' denominator (utils.py 113-134).

    ids: (B, K_max) gallery indices in rank order. positives: per query, its gallery indices; an
    empty list is a query that cannot hit (a miss at every K, still in the denominator). missing:
    further queries without a positive that were not searched at all (EvalView.missing), counted
    as misses; a float when it stands for a sample's share of them (see `evaluate`). With no query
    at all, Recall@K is undefined: None (never NaN, which would poison every mean over it).
    """
    ranks = first_hit_rank(ids, positives)  # (B,) -1 for no hit in the top K_max
    n = len(positives) + missing  # |Q|: every query, searched or not
    out = {}
    for k in ks:
        hits = (ranks >= 0) & (ranks < k)  # (B,) first positive within the top k
        out[int(k)] = float(hits.sum() / n) if n else None  # (1/|Q|) sum_i 1[hit_i]
    return out


def chance_recall(gallery_size: int, positives: Sequence[Sequence[int]], k: int = 10,
                  missing: float = 0) -> Optional[float]:
    """Expected Recall@k of a random ranking over the same queries as `recall_at_k` (None without any).

    With P positives among G images, a random top-k misses them all with probability
    C(G-P, k) / C(G, k) = prod_{j<k} (G-P-j) / (G-j). For one positive this is the familiar k / G;
    for `asfr`, where a label holds many images, chance is far higher, and the table says so.
    A query without a positive (an empty list, or one of the `missing`) has chance 0, and counts.
    """
    total = 0.0  # sum over queries of P(at least one positive in a random top k)
    for pos in positives:
        p = len(pos)
        miss = 1.0
        for j in range(min(k, gallery_size)):
            miss *= max(gallery_size - p - j, 0) / (gallery_size - j)  # prod_{j<k} (G-P-j) / (G-j)
        total += 1.0 - miss  # 0 when p == 0: the product stays 1
    n = len(positives) + missing  # the same |Q| as recall_at_k
    return float(total / n) if n else None


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------

RECALL_DEFINITION = ("hits@K / (queries + missing): a query whose positives are not in the gallery "
                     "counts as a miss (the authors' denominator, utils.py 113-134)")  # the JSON's and table's note
SAMPLED_NOTE = ("queries were sampled (--max-queries): R@K = the hit rate among them x the share of all "
                "records with a positive in the gallery")  # added to the note when sampling was on


@dataclass
class EvalRow:
    """One line of the table: a sub-dataset ("cir/FashionIQ-Dress") or an OOD task ("ood/...")."""

    subset: str
    task: str  # task word, or "ood" for the evaluation-only tasks
    gallery: int  # unique images in this sub-dataset's gallery
    queries: int  # searched queries (records with at least one positive in the gallery; with
    #               --max-queries, the sample of them that was encoded)
    missing: int  # records whose positives are not in the gallery: misses, in the denominator
    recall: dict  # {K: hits@K / (queries + missing)}; every value None for an empty triplet file
    chance10: Optional[float]  # expected Recall@10 of a random ranking (see chance_recall)


@dataclass
class EvalResult:
    """Everything one evaluation produced; `to_dict` is what `--out` writes."""

    rows: list
    ks: tuple
    task_means: dict = field(default_factory=dict)  # {task word: {K: mean over its sub-datasets}}
    overall: dict = field(default_factory=dict)  # {K: mean over in-distribution task words}
    per_query: list = field(default_factory=list)  # optional: top-k ids/scores per searched query
    #                                                 (a missing query has no ranking: it is a row's count)
    seconds: dict = field(default_factory=dict)  # wall time of each stage
    max_queries: int = 0  # > 0: at most this many queries were searched per sub-dataset (SAMPLED_NOTE)

    def sum_recall(self, k: int = 1, include_ood: bool = False) -> float:
        """Sum over sub-datasets of Recall@k: the authors' model-selection number (with k = 1)."""
        return float(sum(r.recall[k] for r in self.rows
                         if (include_ood or r.task != "ood") and r.recall[k] is not None))

    def to_dict(self) -> dict:
        """Plain JSON types, no NaN anywhere (per_query goes to its own .jsonl file).

        `recall` names the denominator, so a reader of the file alone knows what a row's numbers mean.
        """
        note = RECALL_DEFINITION + (f"; {SAMPLED_NOTE}" if self.max_queries else "")
        return {"ks": list(self.ks), "recall": note, "max_queries": self.max_queries,
                "rows": [dataclasses.asdict(r) for r in self.rows],
                "task_means": self.task_means, "overall": self.overall, "seconds": self.seconds}


def summarise(rows: list, ks: Sequence[int]) -> tuple[dict, dict]:
    """Task means (mean over a task's sub-datasets) and the overall mean (over in-distribution tasks).

    Only rows with a Recall count: a row without a single record has None, and a task none of whose
    rows has any gets None means and stays out of the overall mean (None if no task has any). A row
    whose records are all missing has Recall 0 and counts.
    """
    def mean(vals):  # the mean of the defined values; None when there are none
        vals = [v for v in vals if v is not None]
        return float(np.mean(vals)) if vals else None

    by_task: dict = {}
    for r in rows:
        by_task.setdefault(r.task, []).append(r)
    task_means = {t: {k: mean([r.recall[k] for r in rs]) for k in ks} for t, rs in by_task.items()}
    ind = [t for t in task_means if t != "ood"]  # OOD tasks are reported, never averaged in
    overall = {k: mean([task_means[t][k] for t in ind]) for k in ks} if ind else {}
    return task_means, overall


def format_table(result: EvalResult) -> str:
    """The markdown table the CLI prints: rows, then task means, then the overall mean, then the
    line that says what Recall@K divides by."""
    ks = list(result.ks)
    head = "| sub-dataset | gallery | queries | missing | " + " | ".join(f"R@{k}" for k in ks) + " | chance R@10 |"
    lines = [head, "|" + "---|" * (5 + len(ks))]
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}"  # noqa: E731  (percent, one decimal)
    empty = [r for r in result.rows if r.queries + r.missing == 0]  # no Recall: marked, left out of the means
    for r in result.rows:
        name = f"{r.subset} (no queries: left out of the means)" if r.queries + r.missing == 0 else r.subset
        lines.append(f"| {name} | {r.gallery} | {r.queries} | {r.missing} | "
                     + " | ".join(pct(r.recall[k]) for k in ks) + f" | {pct(r.chance10)} |")
    for t, m in result.task_means.items():
        if t != "ood":  # the OOD mean goes below overall: it is reported, never averaged in
            lines.append(f"| **{t}** (task mean) | | | | " + " | ".join(pct(m[k]) for k in ks) + " | |")
    if result.overall:
        over = f"; the {len(empty)} row(s) without queries left out" if empty else ""
        lines.append(f"| **overall** (mean of the task means above{over}) | | | | "
                     + " | ".join(pct(result.overall[k]) for k in ks) + " | |")
    if "ood" in result.task_means:
        lines.append("| **ood** (task mean; out of distribution, not in overall) | | | | "
                     + " | ".join(pct(result.task_means["ood"][k]) for k in ks) + " | |")
    lines.append(f"\nR@K = {RECALL_DEFINITION}" + (f"; {SAMPLED_NOTE}" if result.max_queries else "") + ".")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The whole evaluation
# ----------------------------------------------------------------------------------------------

def few_queries(view, n: int):
    """The eval view with only n evenly spaced queries (first and last included); n <= 0: all.

    Evenly spaced rather than the first n, because records are often grouped (by category,
    by source file), and the first n would then measure one group only. `missing` (records with no
    positive in the gallery) is left whole: it describes the data, not the sample; `missing_weight`
    scales it to the sample for the denominator.
    """
    if n <= 0 or len(view.records) <= n:
        return view
    keep = [round(i * (len(view.records) - 1) / max(1, n - 1)) for i in range(n)]  # n indices
    return dataclasses.replace(view, records=[view.records[i] for i in keep],
                               positives=[view.positives[i] for i in keep])


def missing_weight(view, scored_total: int) -> float:
    """How many missing queries go into the denominator beside `view`'s searched queries.

    All of them when every query with a positive was searched: Recall@K = hits / (B + M), the
    authors' number. When `few_queries` kept B of the scored_total queries with a positive, the M
    missing ones are scaled by the same fraction, M * B / scored_total, so that
    hits / (B + M * B / scored_total) = (hits / B) * scored_total / (scored_total + M):
    the sample's hit rate times the whole sub-dataset's share of queries that can hit.
    """
    b, m = len(view.records), len(view.missing)
    if b == scored_total or scored_total == 0:  # nothing sampled (or nothing to sample): exact
        return m
    return m * b / scored_total  # M * B / scored_total


def evaluate(embedder, ufire, subsets: Sequence[str], split: str = "test", ks: Sequence[int] = DEFAULT_KS,
             batch_size: int = 64, cache_dir: Optional[str] = None, progress: bool = True,
             keep_per_query: bool = False, max_queries: int = 0) -> EvalResult:
    """Evaluate `embedder` on `subsets` of a data.UFire and return the table's numbers.

    `subsets` are names from ufire.subsets(split) and/or ufire.ood_subsets() ("ood/<Task name>").
    train.py calls this with split="val" (and no cache, since the weights change between calls).
    max_queries > 0 keeps that many evenly spaced queries per sub-dataset (see `few_queries`).
    """
    cfg = EvalConfig(split=split, ks=tuple(int(k) for k in ks), batch_size=batch_size,
                     cache_dir=cache_dir, progress=progress, keep_per_query=keep_per_query,
                     max_queries=max_queries)
    t0 = time.perf_counter()
    was_training = embedder.training
    embedder.eval()
    full = [ufire.eval_view(s, split=split) for s in subsets]  # parse + de-duplicate
    views = [few_queries(v, cfg.max_queries) for v in full]  # the queries to encode and search

    # 1. One gallery for everything: unique absolute paths in first-seen order.
    slot: dict = {}
    for v in views:
        for p in v.gallery:
            slot.setdefault(p, len(slot))
    _require_files(views)  # a missing gallery image is named with the gallery file that lists it
    all_paths = list(slot)  # (G_all,)
    t1 = time.perf_counter()
    gal = encode_gallery(embedder, all_paths, cfg)  # (G_all, D)
    _require_finite(gal, all_paths.__getitem__, "gallery image")
    t2 = time.perf_counter()

    # 2. Every sub-dataset's queries in one call: the encoder keeps both cores busy on one long list
    #    better than on many short ones.
    records = [r for v in views for r in v.records]
    q_all = encode_queries(embedder, records, cfg)  # (sum of B, D)
    _require_finite(q_all, lambda i: records[i].where(), "query")
    t_query = time.perf_counter() - t2

    # 3.-4. Per sub-dataset: search its own gallery, score.
    rows, per_query, t_search, start = [], [], 0.0, 0
    kmax = max(cfg.ks)
    for v, whole in zip(views, full):
        q = q_all[start:start + len(v.records)]  # (B, D) this sub-dataset's queries
        start += len(v.records)
        tb = time.perf_counter()
        rows_of_v = np.fromiter((slot[p] for p in v.gallery), dtype=np.int64, count=len(v.gallery))  # (G,)
        scores, ids = search_faiss(q, gal[rows_of_v], kmax) if len(v.records) else (
            np.zeros((0, kmax), np.float32), np.zeros((0, kmax), np.int64))  # (B, K), (B, K)
        t_search += time.perf_counter() - tb
        task = "ood" if v.subset.startswith("ood/") else v.subset.split("/")[0]
        m = missing_weight(v, len(whole.records))  # the missing queries the searched ones stand beside
        rows.append(EvalRow(subset=v.subset, task=task, gallery=len(v.gallery), queries=len(v.records),
                            missing=len(v.missing), recall=recall_at_k(ids, v.positives, cfg.ks, m),
                            chance10=chance_recall(len(v.gallery), v.positives, 10, m)))
        if cfg.keep_per_query:
            ranks = first_hit_rank(ids, v.positives)  # (B,)
            for i, rec in enumerate(v.records):
                per_query.append({"subset": v.subset, "id": rec.id,
                                  "topk": [v.gallery[j] for j in ids[i]], "scores": scores[i].tolist(),
                                  "positives": [v.gallery[j] for j in v.positives[i]],
                                  "first_hit_rank": int(ranks[i])})
    if was_training:
        embedder.train()
    task_means, overall = summarise(rows, cfg.ks)
    secs = {"parse": t1 - t0, "gallery_encode": t2 - t1, "query_encode": t_query, "search": t_search,
            "total": time.perf_counter() - t0, "gallery_images": len(all_paths),
            "queries": int(sum(r.queries for r in rows)), "missing": int(sum(r.missing for r in rows))}
    return EvalResult(rows=rows, ks=cfg.ks, task_means=task_means, overall=overall,
                      per_query=per_query, seconds=secs, max_queries=cfg.max_queries)


# ----------------------------------------------------------------------------------------------
# Encoding, and the gallery cache
# ----------------------------------------------------------------------------------------------

def encode_gallery(embedder, paths: Sequence[str], cfg: EvalConfig) -> np.ndarray:
    """(G, D) float32 embeddings of `paths`, from the cache when this checkpoint saw this list before.

    The cache key must change whenever the embeddings could: it is the checkpoint's digest (its
    config, which names a frozen pretrained base, plus the bytes of every trainable tensor: LoRA,
    learnable tokens, calibrator, a tiny model's vision tower) and the digest of the image list.
    A cached file is used only once its checksum proves its bytes (see `read_cache`).
    """
    key = None
    if cfg.cache_dir:
        conf = getattr(embedder, "config", None)
        conf = json.dumps(dataclasses.asdict(conf) if dataclasses.is_dataclass(conf) else repr(conf),
                          sort_keys=True, default=str)  # the config as text: the digest's prefix
        key = plumbing.params_digest(embedder, prefix=conf)[:20] + "-" + gallery_key(paths)[:20]
        emb = read_cache(Path(cfg.cache_dir), key, (len(paths), embedder.dim))  # (G, D) or None
        if emb is not None:
            return emb
    emb = _encode_in_parts(embedder.encode_images, paths, embedder.dim, cfg, "gallery")  # (G, D)
    if key is not None:
        write_cache(Path(cfg.cache_dir), key, emb)
    return emb


def gallery_key(paths: Sequence[str]) -> str:
    """A hash of the exact image list, with each file's size and mtime, so edits invalidate it."""
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:  # a missing file is reported by the encoder with its record; hash the name
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()


def _require_files(views) -> None:
    """Stop before any encoding when a gallery image is missing, naming the file that lists it
    (the encoder knows only the image's path). Unreadable images are named by data.load_image."""
    for v in views:
        for p in v.gallery:
            if not os.path.isfile(p):
                src = v.gallery_source or f"the targets of its {v.split} records"
                raise data.UFireError(f"missing image {p} (in the gallery of {v.subset}: {src})")


def _require_finite(emb: np.ndarray, name_of, what: str) -> None:
    """Refuse NaN / inf embeddings: a ranking of NaN scores is arbitrary, yet would yield numbers.

    name_of(i) names row i (an image path, a record) in the message.
    """
    bad = np.nonzero(~np.isfinite(emb).all(axis=1))[0]  # (n_bad,) rows with a NaN or inf
    if len(bad):
        raise EvalError(f"{len(bad)} {what} embedding(s) are NaN or infinite (first: {name_of(bad[0])}); "
                        "the checkpoint's weights are damaged or training diverged")


def encode_queries(embedder, records: Sequence, cfg: EvalConfig) -> np.ndarray:
    """(B, D) calibrated query embeddings, one deterministic query per record."""
    return _encode_in_parts(embedder.encode_queries, records, embedder.dim, cfg, "queries")  # (B, D)


def _encode_in_parts(encode, items: Sequence, dim: int, cfg: EvalConfig, desc: str) -> np.ndarray:
    """Call `encode` (an embedder's encode_images / encode_queries) on a few batches at a time.

    The embedder batches internally; handing it 8 batches per call just lets the progress bar move.
    """
    from tqdm import tqdm  # a disabled bar is silent and keeps the same update/close

    chunks = []
    step = max(cfg.batch_size, 1) * 8
    bar = tqdm(total=len(items), desc=f"encode {desc}", unit="item", leave=False,
               disable=not cfg.progress or len(items) == 0)
    for s in range(0, len(items), step):
        part = list(items[s:s + step])
        chunks.append(encode(part, batch_size=cfg.batch_size).float().numpy())  # (n, D)
        bar.update(len(part))
    bar.close()
    return np.concatenate(chunks, 0) if chunks else np.zeros((0, dim), np.float32)  # (N, D)


def _cache_digest(key: str, raw: bytes) -> str:
    """The checksum in a cache file's name: sha256 of its key and its bytes (header + array).

    Hashing the whole file, not just the array, catches a damaged header (shape, dtype) too; hashing
    the key catches a file copied or renamed to another checkpoint's or gallery's key.
    """
    return hashlib.sha256(key.encode() + b"\0" + raw).hexdigest()[:32]


def read_cache(cache_dir: Path, key: str, shape: tuple) -> Optional[np.ndarray]:
    """The cached (G, D) embeddings for `key` if a file proves them, else None (then: recompute).

    Files are named KEY.sha256-DIGEST.npy. The bytes are checked against DIGEST before numpy parses
    them, so random, zeroed, truncated or reordered bytes are never trusted and never crash the run;
    each such file is reported in one line on stderr and deleted (write_cache puts the new one).
    """
    for f in sorted(cache_dir.glob(f"{key}*.npy")) if cache_dir.is_dir() else []:
        m = re.fullmatch(re.escape(key) + r"\.sha256-([0-9a-f]{32})\.npy", f.name)
        why = "no checksum in its name (an older version wrote it)" if m is None else None
        try:
            raw = f.read_bytes() if m else b""
            if m and _cache_digest(key, raw) != m[1]:
                why = "its bytes do not match their checksum (damaged)"
            if why is None:
                emb = np.load(io.BytesIO(raw), allow_pickle=False)  # (G, D) plain array, no pickle
                if emb.shape == tuple(shape) and emb.dtype == np.float32:
                    return emb
                why = f"shape {emb.shape} {emb.dtype}, expected {tuple(shape)} float32"
        except (OSError, ValueError, EOFError) as e:  # unreadable: the same as damaged
            why = f"unreadable ({e})"
        print(f"warning: gallery cache {f}: {why}; recomputing and replacing it", file=sys.stderr, flush=True)
        try:
            f.unlink(missing_ok=True)
        except OSError:  # a read-only cache folder: the file stays, unused (it is checked every time)
            pass
    return None


def write_cache(cache_dir: Path, key: str, emb: np.ndarray) -> None:
    """Publish `emb` as KEY.sha256-DIGEST.npy with plumbing.atomic_write; a failure only warns.

    The cache saves time and nothing else, so a full or read-only disk must not cost the results.
    """
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(emb, dtype=np.float32))  # (G, D) .npy bytes, header included
    raw = buf.getvalue()
    path = cache_dir / f"{key}.sha256-{_cache_digest(key, raw)}.npy"
    try:
        for f in cache_dir.glob(f".{key}*"):  # temporaries of an interrupted earlier write
            f.unlink(missing_ok=True)
        plumbing.atomic_write(path, raw)  # a crash mid-write never leaves a truncated cache
    except OSError as e:
        print(f"warning: could not write the gallery cache {path} ({e}); results are unaffected",
              file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def training_data_root(ckpt: Path) -> Optional[str]:
    """The data root a checkpoint was trained on, from the run's saved configuration, if any."""
    for cand in (ckpt / "train_config.json", ckpt.parent / "config.json"):
        if cand.is_file():
            try:
                root = json.loads(cand.read_text()).get("data")
            except (OSError, json.JSONDecodeError):
                continue
            if root:
                return root
    return None




def main(argv=None) -> int:
    """The command line. Exit 0; 1 with one `error:` line for a bad flag, checkpoint or data file
    (errors.run_cli); 2 for what argparse itself refuses (an unknown flag, --batch-size abc)."""
    return run_cli(_cli, argv)


def _cli(argv) -> int:
    """Every flag is checked before the data, the checkpoint or any output is touched."""
    args = parse_flags(argv)
    if args.self_check:
        return _self_check()
    ckpt = Path(args.ckpt)
    root = args.data or training_data_root(ckpt) or "data/synthetic"
    if root == "synthetic":  # a run trained on `--data synthetic`: generate it if this clone lacks it
        from support import synthetic  # the generator is needed only here: keep it off every other path

        root = synthetic.ensure_synthetic("data/synthetic")
    ufire = data.UFire(root)
    subsets = ufire.select(args.split, args.tasks, args.ood)  # unknown tasks fail before loading
    from model import CONFIG_FILE, FashionLensEmbedder  # model imports transformers: keep it off the metric path

    if args.device is None:  # the device saved in the checkpoint (where it was trained) must exist here
        saved = saved_device(ckpt / CONFIG_FILE)
        if saved:
            plumbing.check_device(f"{ckpt / CONFIG_FILE} (field 'device'; override it with --device cpu)", saved)
    kw = {"device": args.device} if args.device else {}
    embedder = FashionLensEmbedder.from_pretrained(str(ckpt), **kw)
    # A tiny model on a CPU: one torch thread per process, and one encoding thread per core
    # (model.encode_threads): its small matmuls gain nothing from splitting, batches side by side do.
    plumbing.set_cpu_threads(0, embedder.device.type, small_model=embedder.tiny)
    res = evaluate(embedder, ufire, subsets, split=args.split, ks=args.ks, batch_size=args.batch_size,
                   cache_dir=args.cache_dir or None, progress=sys.stderr.isatty(),
                   keep_per_query=bool(args.out), max_queries=args.max_queries)
    some = f"   at most {args.max_queries} queries per sub-dataset" if args.max_queries > 0 else ""
    print(f"checkpoint: {ckpt}   data: {root}   split: {args.split}{some}")
    print(format_table(res))
    s = res.seconds
    print(f"\n{s['gallery_images']} unique gallery images, {s['queries']} queries searched, "
          f"{s['missing']} missing (misses); "
          f"encode gallery {s['gallery_encode']:.1f}s, queries {s['query_encode']:.1f}s, "
          f"search {s['search']:.2f}s, total {s['total']:.1f}s")
    if args.out:
        out = Path(args.out)
        doc = {"checkpoint": str(ckpt), "data": str(root), "split": args.split, **res.to_dict()}
        text = json.dumps(doc, indent=1, allow_nan=False)  # strict JSON: a NaN here is a bug, not output
        plumbing.atomic_write(out, text)  # a reader never sees half a file
        plumbing.atomic_write(out.with_suffix(".per_query.jsonl"),
                              "".join(json.dumps(r, allow_nan=False) + "\n" for r in res.per_query))
        print(f"wrote {out} and {out.with_suffix('.per_query.jsonl')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The flags; their values are checked by `parse_flags`."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--ckpt", help="checkpoint directory written by train.py (runs/NAME/best)")
    ap.add_argument("--data", default=None,
                    help="U-FIRE root; default: the data the checkpoint was trained on")
    ap.add_argument("--tasks", default="all", help="'all' or comma-separated task words / task/dataset names")
    ap.add_argument("--split", default="test", choices=["test", "val"])
    ap.add_argument("--ood", nargs="?", const="only", default="include", choices=["include", "only", "skip"],
                    help="evaluation-only tasks: include them (default), 'only' them (bare --ood), or skip")
    ap.add_argument("--k", default="1,5,10,50", help="comma-separated K values (positive integers)")
    ap.add_argument("--out", default=None, help="write results JSON here (+ .per_query.jsonl beside it)")
    ap.add_argument("--batch-size", type=int, default=64, help="images per forward pass (>= 1)")
    ap.add_argument("--max-queries", type=int, default=0,
                    help="score at most N evenly spaced queries per sub-dataset (0 = all); the gallery stays whole")
    ap.add_argument("--cache-dir", default=".cache/gallery", help="gallery embedding cache ('' to disable)")
    ap.add_argument("--device", default=None, help="cpu | cuda | cuda:N | auto (default: the checkpoint's config)")
    ap.add_argument("--self-check", action="store_true", help="run the small built-in demo and exit")
    return ap


def parse_flags(argv) -> argparse.Namespace:
    """Parse and check every flag (EvalError naming it); adds `ks`, the parsed --k."""
    args = build_parser().parse_args(argv)
    if args.self_check:
        return args
    if not args.ckpt:
        raise EvalError("--ckpt is required (a checkpoint folder such as runs/NAME/best), or --self-check")
    if not Path(args.ckpt).is_dir():
        raise EvalError(f"--ckpt {args.ckpt}: no such checkpoint folder")
    args.ks = parse_ks(args.k)
    if args.batch_size < 1:
        raise EvalError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.max_queries < 0:
        raise EvalError(f"--max-queries {args.max_queries}: must be 0 (all queries) or more")
    if args.device is not None:
        plumbing.check_device("--device", args.device)
    if args.out:
        plumbing.check_writable("--out", args.out, folder=False)
    return args


def parse_ks(text: str) -> tuple:
    """'10,1,5' -> (1, 5, 10): sorted, without repeats; anything but positive integers is an EvalError."""
    ks = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:  # "1,5," : an empty entry is a stray comma, not a K
            continue
        if not re.fullmatch(r"\+?\d+", part) or int(part) < 1:  # R@0 and R@-1 mean nothing
            raise EvalError(f"--k {text!r}: every K must be a positive integer (e.g. --k 1,5,10,50), "
                            f"not {part!r}")
        ks.add(int(part))
    if not ks:
        raise EvalError(f"--k {text!r}: give at least one K (e.g. --k 10)")
    return tuple(sorted(ks))


def saved_device(cfg_file: Path) -> Optional[str]:
    """The device field of a checkpoint's config, or None if it cannot be read (from_pretrained
    then reports the file)."""
    try:
        return json.loads(cfg_file.read_text())["config"].get("device")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _self_check() -> int:
    """A tiny worked example a reader can follow by hand (and a check that faiss == torch)."""
    g = np.eye(4, dtype=np.float32)  # (G=4, D=4) four orthogonal gallery vectors
    q = np.array([[1, 0, 0, 0], [0.6, 0.8, 0, 0], [0, 0, 0.6, 0.8]], np.float32)  # (B=3, D=4)
    positives = [[0], [0], [1]]  # query 1 prefers image 1 but its positive is image 0 (rank 2)
    s_t, i_t = search_torch(q, g, 3)
    s_f, i_f = search_faiss(q, g, 3)
    print("torch top-3 ids:\n", i_t, "\nfaiss top-3 ids:\n", i_f)
    r = recall_at_k(i_f, positives, (1, 2, 3))
    # Query 3 scores 0 against images 0 and 1 alike; the tie goes to the lower index (0), so its
    # positive (image 1) falls out of its top 3 behind images 3, 2 and 0.
    print("Recall@1,2,3 =", r, "(by hand: 1/3, 2/3, 2/3)")
    # A fourth query whose positive is not in the gallery cannot hit, yet counts: 1/4, 2/4, 2/4.
    r4 = recall_at_k(i_f, positives, (1, 2, 3), missing=1)
    print("with one more query whose positive is missing:", r4, "(by hand: 1/4, 2/4, 2/4)")
    ok = (np.array_equal(i_t, i_f) and abs(r[1] - 1 / 3) < 1e-9 and abs(r[2] - 2 / 3) < 1e-9
          and abs(r4[1] - 1 / 4) < 1e-9 and abs(r4[3] - 2 / 4) < 1e-9)
    print("self-check", "passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
