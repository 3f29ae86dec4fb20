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

Which gallery: on the test split (the paper's tables) the published gallery file, as in the authors'
test.py (0_test_candidates/<name>_candidates.json; asfr its label -> images file; test.py 43-61,
106-130); targets missing from it are dropped from P_i (test.py 83-97), and queries left with none
are the `missing` ones. On val (model selection) the union of the val records' targets (asfr: the val
label pool), as in the authors' evaluate.py 86-112 (data.UFire.gallery), so `missing` is 0 there unless
an asfr label has no image in its pool: a miss here, where the authors' code would crash (evaluate.py 68).

Protocol, step by step
----------------------
1. Gallery: every unique image across all evaluated sub-datasets is encoded once (sub-datasets that
   share images share their embeddings), batched; a disk cache keyed by the checkpoint and the image
   list (support/fast_infer.py) makes a second run on the same checkpoint encode nothing.
2. Queries: one deterministic query per record (data.record_to_query with rng=None), encoded through
   the calibrator (PGSQC), since that is what the model does at test time.
3. Search: exact inner-product search, ties broken by gallery index so results never depend on
   thread scheduling. `search_torch` is the readable reference (one matmul and a stable sort); the
   run uses its faiss twin (support/fast_infer.py), and the tests hold the two equal.
4. Metric: Recall@K per sub-dataset (missing queries as misses), the mean per task word, then the
   overall mean over task words (each task weighs the same, however many sub-datasets it has; OOD
   tasks are reported apart). A sub-dataset without a single record (an empty triplet file) has no
   Recall@K (None in JSON, n/a in the table) and stays out of the means; one whose every record is
   missing has Recall@K = 0 and counts, as in the authors' code.

Run it
------
    python evaluate.py --ckpt runs/fashionlens-tiny/best            # test split of its training data
    python evaluate.py --ckpt runs/X/best --split val --tasks cir,t2i --k 1,10 --max-queries 100
    python evaluate.py --self-check                                   # small demo on hand-made vectors
Every flag, and what a bad one prints: support/cli.py (evaluate.py's command line).

Shape legend: B queries, G gallery images, D embedding size, K retrieved per query.
"""
from __future__ import annotations

from support import plumbing  # noqa: F401,I001  first: it sets OMP_WAIT_POLICY before numpy and torch load

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

import data
from support import cli, fast_infer
from support.errors import run_cli

DEFAULT_KS = (1, 5, 10, 50)


# ----------------------------------------------------------------------------------------------
# Search: the readable reference (torch); its fast twin is support/fast_infer.search_faiss.
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
    queries: int  # searched queries: records with a positive in the gallery (--max-queries: the sample)
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
    seconds: dict = field(default_factory=dict)  # wall time of each stage
    max_queries: int = 0  # > 0: at most this many queries were searched per sub-dataset (SAMPLED_NOTE)

    def sum_recall(self, k: int = 1, include_ood: bool = False) -> float:
        """Sum over sub-datasets of Recall@k: the authors' model-selection number (with k = 1)."""
        return float(sum(r.recall[k] for r in self.rows
                         if (include_ood or r.task != "ood") and r.recall[k] is not None))

    @property
    def note(self) -> str:
        """What Recall@K divides by: the JSON's `recall` field and the table's last line."""
        return RECALL_DEFINITION + (f"; {SAMPLED_NOTE}" if self.max_queries else "")

    def to_dict(self) -> dict:
        """Plain JSON types, no NaN anywhere (per_query goes to its own .jsonl file).

        `recall` names the denominator, so a reader of the file alone knows what a row's numbers mean.
        """
        return {"ks": list(self.ks), "recall": self.note, "max_queries": self.max_queries,
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


# ----------------------------------------------------------------------------------------------
# The whole evaluation
# ----------------------------------------------------------------------------------------------

def evaluate(embedder, ufire, subsets: Sequence[str], split: str = "test", ks: Sequence[int] = DEFAULT_KS,
             batch_size: int = 64, cache_dir: Optional[str] = None, progress: bool = True,
             keep_per_query: bool = False, max_queries: int = 0) -> EvalResult:
    """Evaluate `embedder` on `subsets` of a data.UFire and return the table's numbers.

    `subsets` are names from ufire.subsets(split) and/or ufire.ood_subsets() ("ood/<Task name>").
    train.py calls this with split="val" (and no cache, since the weights change between calls).
    batch_size: images per forward pass. cache_dir: where gallery embeddings are kept (None: no
    cache). progress: tqdm bars. keep_per_query: also return top-k ids/scores per query (retrieval
    grids). max_queries > 0 keeps that many evenly spaced queries per sub-dataset, the gallery whole
    (support/fast_infer.few_queries): Recall@K keeps its meaning and only gets noisier.
    """
    ks = tuple(int(k) for k in ks)  # the paper reports Recall@1, 5, 10 and 50
    watch = cli.Stopwatch("parse", "gallery_encode", "query_encode", "search")  # wall time per stage
    was_training = embedder.training
    embedder.eval()
    with watch("parse"):
        full = [ufire.eval_view(s, split=split) for s in subsets]  # parse + de-duplicate
        views = [fast_infer.few_queries(v, max_queries) for v in full]  # the queries to encode and search
        # 1. One gallery for everything: unique absolute paths in first-seen order.
        slot: dict = {}
        for v in views:
            for p in v.gallery:
                slot.setdefault(p, len(slot))
        fast_infer.require_files(views)  # a missing gallery image is named with the gallery file that lists it
        all_paths = list(slot)  # (G_all,)
    with watch("gallery_encode"):
        gal = fast_infer.encode_gallery(embedder, all_paths, batch_size, cache_dir, progress)  # (G_all, D)
        fast_infer.require_finite(gal, all_paths.__getitem__, "gallery image")  # NaN ranks arbitrarily
    # 2. Every sub-dataset's queries in one call: the encoder keeps both cores busy on one long list
    #    better than on many short ones.
    with watch("query_encode"):
        records = [r for v in views for r in v.records]
        q_all = encode_queries(embedder, records, batch_size, progress)  # (sum of B, D)
        fast_infer.require_finite(q_all, lambda i: records[i].where(), "query")
    # 3.-4. Per sub-dataset: search its own gallery, score.
    rows, per_query, start, kmax = [], [], 0, max(ks)
    for v, whole in zip(views, full):
        q = q_all[start:start + len(v.records)]  # (B, D) this sub-dataset's queries
        start += len(v.records)
        with watch("search"):
            rows_of_v = np.fromiter((slot[p] for p in v.gallery), dtype=np.int64, count=len(v.gallery))  # (G,)
            # faiss with ties repaired to search_torch's order (support/fast_infer.py): the same ranking, faster
            scores, ids = fast_infer.search_faiss(q, gal[rows_of_v], kmax, reference=search_torch) if len(
                v.records) else (np.zeros((0, kmax), np.float32), np.zeros((0, kmax), np.int64))  # (B, K), (B, K)
        task = "ood" if v.subset.startswith("ood/") else v.subset.split("/")[0]
        m = fast_infer.missing_weight(v, len(whole.records))  # the missing queries the searched ones stand beside
        rows.append(EvalRow(subset=v.subset, task=task, gallery=len(v.gallery), queries=len(v.records),
                            missing=len(v.missing), recall=recall_at_k(ids, v.positives, ks, m),
                            chance10=chance_recall(len(v.gallery), v.positives, 10, m)))
        if keep_per_query:  # top-k paths and scores per query, for --out's .per_query.jsonl
            per_query += cli.per_query_rows(v, ids, scores, first_hit_rank(ids, v.positives))
    if was_training:
        embedder.train()
    task_means, overall = summarise(rows, ks)
    secs = {**watch.seconds, "total": watch.total(), "gallery_images": len(all_paths),
            "queries": int(sum(r.queries for r in rows)), "missing": int(sum(r.missing for r in rows))}
    return EvalResult(rows=rows, ks=ks, task_means=task_means, overall=overall,
                      per_query=per_query, seconds=secs, max_queries=max_queries)


def encode_queries(embedder, records: Sequence, batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """(B, D) calibrated query embeddings, one deterministic query per record (PGSQC on, as at test time)."""
    return fast_infer.encode_in_parts(embedder.encode_queries, records, embedder.dim, batch_size, progress,
                                      "queries")  # (B, D)


def main(argv=None) -> int:
    """The command line (flags, checks, table, --out files: support/cli.py). Exit 0; 1 with one `error:`
    line for a bad flag, checkpoint or data file; 2 for what argparse refuses (--batch-size abc)."""
    def model():  # model imports transformers: loaded only once the flags and the data are checked
        from model import FashionLensEmbedder
        return FashionLensEmbedder
    return run_cli(lambda a: cli.evaluate_cli(a, description=__doc__.split("\n")[0], ufire_cls=data.UFire,
                                              model=model, evaluate=evaluate, self_check=_self_check), argv)


def _self_check() -> int:
    """A tiny worked example a reader can follow by hand (and a check that faiss == torch)."""
    g = np.eye(4, dtype=np.float32)  # (G=4, D=4) four orthogonal gallery vectors
    q = np.array([[1, 0, 0, 0], [0.6, 0.8, 0, 0], [0, 0, 0.6, 0.8]], np.float32)  # (B=3, D=4)
    positives = [[0], [0], [1]]  # query 1 prefers image 1 but its positive is image 0 (rank 2)
    s_t, i_t = search_torch(q, g, 3)
    s_f, i_f = fast_infer.search_faiss(q, g, 3, reference=search_torch)
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
