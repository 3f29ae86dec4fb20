"""Tests for evaluate.py: the metric by hand, faiss == torch, the gallery cache, end-to-end runs."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate as ev
from support import cli, fast_infer


# ---------------------------------------------------------------- the metric, computed by hand

def test_recall_by_hand_with_ties_multi_positives_and_missing():
    # Gallery of 5 one-hot-ish vectors; queries built so each rank is obvious.
    g = np.eye(5, dtype=np.float32)  # (5, 5)
    q = np.array([
        [0.0, 1.0, 0.0, 0.0, 0.0],   # q0: image 1 first; images 0,2,3,4 tie at 0 -> order 0,2,3,4
        [0.0, 0.0, 0.6, 0.8, 0.0],   # q1: ranks 3, 2, then ties 0,1,4
        [0.5, 0.5, 0.5, 0.5, 0.0],   # q2: four-way tie 0,1,2,3 then 4
        [1.0, 0.0, 0.0, 0.0, 0.0],   # q3: no positive in the gallery -> a miss at every K
    ], np.float32)
    positives = [[2], [4, 2], [3], []]
    scores, ids = fast_infer.search_faiss(q, g, 5, reference=ev.search_torch)
    # Ties broken by gallery index: the lower index ranks first.
    assert ids.tolist() == [[1, 0, 2, 3, 4], [3, 2, 0, 1, 4], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
    # First-hit ranks by hand: q0 -> image 2 at rank 2; q1 -> image 2 at rank 1; q2 -> image 3 at rank 3.
    assert ev.first_hit_rank(ids, positives).tolist() == [2, 1, 3, -1]
    r = ev.recall_at_k(ids, positives, (1, 2, 3, 4))
    # Hits within K are {none}, {q1}, {q0, q1}, {q0, q1, q2}; the authors' denominator is all four
    # queries (utils.py 113-134), q3 included: dropping it would give 0, 1/3, 2/3, 1.
    assert r == pytest.approx({1: 0.0, 2: 1 / 4, 3: 2 / 4, 4: 3 / 4})
    # Queries that were never searched (EvalView.missing) join the denominator the same way.
    assert ev.recall_at_k(ids, positives, (2, 4), missing=2) == pytest.approx({2: 1 / 6, 4: 3 / 6})
    # The authors' loop, transcribed: hits / num_queries, an empty positive list skipped but counted.
    hits = {k: sum(1 for i, pos in enumerate(positives) if pos and set(ids[i][:k]) & set(pos)) for k in (1, 2, 3, 4)}
    assert r == pytest.approx({k: h / len(positives) for k, h in hits.items()})


def test_chance_level_matches_closed_form():
    # One positive: k / G exactly. Many positives: 1 - C(G-P, k) / C(G, k).
    assert ev.chance_recall(100, [[3]], 10) == pytest.approx(0.10)
    from math import comb
    assert ev.chance_recall(50, [list(range(7))], 10) == pytest.approx(1 - comb(43, 10) / comb(50, 10))
    # A query without a positive has chance 0 and counts, like its Recall: (10/50 + 0) / 2, and with
    # two more missing queries (10/50) / 4.
    assert ev.chance_recall(50, [[1], []], 10) == pytest.approx(10 / 50 / 2)
    assert ev.chance_recall(50, [[1], []], 10, missing=2) == pytest.approx(10 / 50 / 4)


def _row(subset: str, r1: float, r10: float) -> "ev.EvalRow":
    task = "ood" if subset.startswith("ood/") else subset.split("/")[0]
    return ev.EvalRow(subset=subset, task=task, gallery=50, queries=10, missing=0, recall={1: r1, 10: r10},
                      chance10=0.2)


def test_summary_numbers_on_hand_made_rows():
    """Task mean = mean over its sub-datasets; overall = mean of the in-distribution task means (OOD
    apart); the model-selection number = sum of Recall@1 over in-distribution sub-datasets."""
    rows = [_row("cir/A", 0.1, 0.5), _row("cir/B", 0.2, 0.9), _row("cir/C", 0.9, 1.0),  # mean != median
            _row("t2i/X", 0.9, 1.0), _row("ood/Y", 0.1, 0.3)]
    task_means, overall = ev.summarise(rows, (1, 10))
    assert set(task_means) == {"cir", "t2i", "ood"}
    assert task_means["cir"] == pytest.approx({1: 0.4, 10: 0.8})
    assert task_means["t2i"] == pytest.approx({1: 0.9, 10: 1.0})
    assert task_means["ood"] == pytest.approx({1: 0.1, 10: 0.3})
    # (0.4 + 0.9) / 2; a mean over rows would give 0.525, one with OOD in 0.44 (R@1)
    assert overall == pytest.approx({1: 0.65, 10: 0.9})
    res = ev.EvalResult(rows=rows, ks=(1, 10), task_means=task_means, overall=overall)
    assert res.sum_recall(1) == pytest.approx(2.1)  # 0.1 + 0.2 + 0.9 + 0.9
    assert res.sum_recall(10) == pytest.approx(3.4)
    assert res.sum_recall(1, include_ood=True) == pytest.approx(2.2)
    # A sub-dataset without a single query (an empty triplet file: recall as recall_at_k reports it)
    # stays out of the sum.
    undefined = ev.recall_at_k(np.zeros((0, 10), np.int64), [], (1, 10))  # no query at all
    empty = ev.EvalResult(rows=rows + [_row("t2i/Empty", undefined[1], undefined[10])], ks=(1, 10))
    assert empty.sum_recall(1) == pytest.approx(2.1)
    assert ev.summarise([_row("ood/Y", 0.1, 0.3)], (1, 10))[1] == {}  # OOD alone: no overall mean
    assert "| **overall** (mean of the task means above) | | | | 65.0 | 90.0 | |" in cli.format_table(res)
    assert "| **cir** (task mean) | | | | 40.0 | 80.0 | |" in cli.format_table(res)
    # the rows above overall are exactly the ones it averages: the OOD mean comes after it, labelled
    lines = cli.format_table(res).splitlines()
    at = {w: next(i for i, x in enumerate(lines) if x.startswith(f"| **{w}**")) for w in ("cir", "t2i", "overall", "ood")}
    assert at["cir"] < at["t2i"] < at["overall"] < at["ood"] and "not in overall" in lines[at["ood"]]
    # The table says what R@K divides by; so does the JSON.
    assert cli.format_table(res).endswith("R@K = " + ev.RECALL_DEFINITION + ".")
    assert res.to_dict()["recall"] == ev.RECALL_DEFINITION and res.to_dict()["max_queries"] == 0


# ---------------------------------------------------------------- faiss path == torch reference

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_faiss_equals_torch_with_many_ties(seed):
    rng = np.random.default_rng(seed)
    # Coordinates in {-2..2}/4: every dot product is exact in float32, and ties are frequent,
    # including ties that straddle the K-th place.
    g = rng.integers(-2, 3, size=(700, 16)).astype(np.float32) / 4  # (G, D)
    q = rng.integers(-2, 3, size=(90, 16)).astype(np.float32) / 4  # (B, D)
    for k in (1, 5, 10, 50):
        s_f, i_f = fast_infer.search_faiss(q, g, k, reference=ev.search_torch)
        s_t, i_t = ev.search_torch(q, g, k)
        assert np.array_equal(i_f, i_t), f"top-{k} ids differ"
        assert np.allclose(s_f, s_t)
    positives = [list(rng.choice(700, size=rng.integers(1, 4), replace=False)) for _ in range(90)]
    ids_f = fast_infer.search_faiss(q, g, 50, reference=ev.search_torch)[1]  # (B, 50)
    assert ev.recall_at_k(ids_f, positives, (1, 5, 10, 50)) == \
        ev.recall_at_k(ev.search_torch(q, g, 50)[1], positives, (1, 5, 10, 50))


def test_faiss_equals_torch_on_unit_float_vectors():
    gen = torch.Generator().manual_seed(0)
    g = torch.nn.functional.normalize(torch.randn(2000, 32, generator=gen), dim=1).numpy()  # (G, D)
    q = torch.nn.functional.normalize(torch.randn(64, 32, generator=gen), dim=1).numpy()  # (B, D)
    _, i_f = fast_infer.search_faiss(q, g, 10, reference=ev.search_torch)
    _, i_t = ev.search_torch(q, g, 10)
    assert np.array_equal(i_f, i_t)


# ---------------------------------------------------------------- gallery: encoded once, then cached

class CountingEmbedder(torch.nn.Module):
    """A stand-in embedder: deterministic vectors from file names, and a log of what it encoded."""

    def __init__(self, dim=16):
        super().__init__()
        self.dim = dim
        self.w = torch.nn.Parameter(torch.zeros(1))  # something trainable for the fingerprint
        self.config = {"kind": "counting", "dim": dim}
        self.image_calls: Counter = Counter()
        self.query_calls = 0

    def _vec(self, key: str) -> torch.Tensor:
        gen = torch.Generator().manual_seed(abs(hash(key)) % (2 ** 31))
        return torch.nn.functional.normalize(torch.randn(self.dim, generator=gen), dim=0)  # (D,)

    def encode_images(self, images, batch_size=32):
        for p in images:
            self.image_calls[str(p)] += 1
        return torch.stack([self._vec(Path(p).name) for p in images])  # (G, D)

    def encode_queries(self, queries, batch_size=16):
        self.query_calls += len(queries)
        # Point each query at its first target so that the metric is far above chance.
        return torch.stack([self._vec(Path(r.target_image[0]).name) for r in queries])  # (B, D)


def test_each_gallery_image_encoded_once_then_cache_reused(synthetic_root, tmp_path):
    import data

    ufire = data.UFire(str(synthetic_root))
    subsets = ufire.subsets("test")
    emb = CountingEmbedder()
    res = ev.evaluate(emb, ufire, subsets, cache_dir=str(tmp_path / "cache"), progress=False)
    union = set()
    for s in subsets:
        union.update(ufire.eval_view(s, "test").gallery)
    assert set(emb.image_calls) == union
    assert max(emb.image_calls.values()) == 1, "a gallery image was encoded twice in one run"
    assert res.seconds["gallery_images"] == len(union)
    # The summary evaluate() returns is the rows' arithmetic: task means of rows, overall without OOD.
    by_task: dict = {}
    for row in res.rows:
        by_task.setdefault(row.task, []).append(row.recall[1])
    assert res.task_means and all(res.task_means[t][1] == pytest.approx(sum(v) / len(v)) for t, v in by_task.items())
    ind = [sum(v) / len(v) for t, v in by_task.items() if t != "ood"]
    assert res.overall[1] == pytest.approx(sum(ind) / len(ind))
    # The cache is one complete .npy, published atomically: no temporary or old copy is left beside it.
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".npy" and not cached[0].name.startswith(".")
    assert np.load(cached[0]).shape == (len(union), emb.dim)
    # The oracle-like stand-in puts the first target on top: Recall@1 must be high everywhere.
    for row in res.rows:
        if row.task != "asfr":
            assert row.recall[1] > 0.9, row
    # Second run, same checkpoint and list: not a single image is encoded.
    emb.image_calls.clear()
    res2 = ev.evaluate(emb, ufire, subsets, cache_dir=str(tmp_path / "cache"), progress=False)
    assert sum(emb.image_calls.values()) == 0
    assert [r.recall for r in res2.rows] == [r.recall for r in res.rows]
    # A changed checkpoint (any trainable byte) must not reuse the cache.
    with torch.no_grad():
        emb.w.add_(1.0)
    ev.evaluate(emb, ufire, subsets[:1], cache_dir=str(tmp_path / "cache"), progress=False)
    assert sum(emb.image_calls.values()) == len(ufire.eval_view(subsets[0], "test").gallery)


def test_max_queries_keeps_evenly_spaced_queries_and_the_whole_gallery(synthetic_root):
    import data

    ufire = data.UFire(str(synthetic_root))
    sub = "cir/SynCIR-Top"
    full = ufire.eval_view(sub, "test")
    few = fast_infer.few_queries(full, 5)
    n = len(full.records)
    # First and last query kept, evenly spaced in between, each with its own positives.
    expect = [round(i * (n - 1) / 4) for i in range(5)]
    assert [r.id for r in few.records] == [full.records[i].id for i in expect]
    assert few.positives == [full.positives[i] for i in expect]
    assert few.gallery == full.gallery  # Recall@K keeps its meaning: same gallery
    assert fast_infer.few_queries(full, 0) is full and fast_infer.few_queries(full, n + 1) is full
    emb = CountingEmbedder()
    res = ev.evaluate(emb, ufire, [sub], cache_dir=None, progress=False, max_queries=5)
    assert emb.query_calls == 5 and res.rows[0].queries == 5
    assert res.rows[0].gallery == len(full.gallery)


class WithMissing:
    """A data.UFire whose eval views list `m` more records without a positive (ids only, as
    data.UFire.eval_view lists them), to check the denominator on real evaluate() runs."""

    def __init__(self, ufire, m: int):
        self.ufire, self.m = ufire, m

    def eval_view(self, subset, split="test"):
        import dataclasses

        v = self.ufire.eval_view(subset, split)
        return dataclasses.replace(v, missing=v.missing + [f"gone-{i}" for i in range(self.m)])


@pytest.mark.parametrize("max_queries", [0, 5])
def test_missing_queries_are_misses_in_the_denominator(synthetic_root, max_queries):
    """Recall@K = hits / (queries + missing); sampled: the sample's hit rate x the share with a positive."""
    import data

    ufire = data.UFire(str(synthetic_root))
    sub, m = "cir/SynCIR-Top", 7
    n = len(ufire.eval_view(sub, "test").records)  # queries with a positive (none missing here)
    kw = dict(ks=(1, 10), cache_dir=None, progress=False, keep_per_query=True, max_queries=max_queries)
    base = ev.evaluate(CountingEmbedder(), ufire, [sub], **kw)
    (row,) = ev.evaluate(CountingEmbedder(), WithMissing(ufire, m), [sub], **kw).rows
    b = base.rows[0].queries  # searched queries: all n, or the 5 sampled
    assert base.rows[0].missing == 0 and (row.queries, row.missing) == (b, m)
    hits = {k: sum(0 <= q["first_hit_rank"] < k for q in base.per_query) for k in (1, 10)}  # by hand
    assert hits[1] > 0 and base.rows[0].recall == pytest.approx({k: h / b for k, h in hits.items()})
    want = {k: h / b * n / (n + m) for k, h in hits.items()}  # equals h / (n + m) when b == n
    assert row.recall == pytest.approx(want)
    if not max_queries:
        assert row.recall == pytest.approx({k: h / (n + m) for k, h in hits.items()})
    # Chance: the missing queries count with chance 0, the same |Q| as Recall.
    assert row.chance10 == pytest.approx(base.rows[0].chance10 * n / (n + m))
    assert base.to_dict()["max_queries"] == max_queries
    assert ("sampled" in base.to_dict()["recall"]) == bool(max_queries)


class PixelEmbedder(torch.nn.Module):
    """A stand-in embedder whose vector is an image's mean colour: editing the file changes it."""

    def __init__(self):
        super().__init__()
        self.dim = 3
        self.w = torch.nn.Parameter(torch.zeros(1))  # something trainable for the fingerprint
        self.config = {"kind": "pixels"}
        self.encoded = 0

    def encode_images(self, images, batch_size=32):
        from PIL import Image

        vecs = []
        for p in images:
            self.encoded += 1
            with Image.open(p) as im:
                vecs.append(torch.tensor(np.asarray(im.convert("RGB"), dtype=np.float32).mean((0, 1))))  # (3,)
        return torch.nn.functional.normalize(torch.stack(vecs), dim=1)  # (G, 3)


def test_gallery_cache_re_encodes_after_an_image_changes(tmp_path):
    import os

    from PIL import Image

    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    paths = []
    for i, c in enumerate(colours):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (8, 8), c).save(paths[-1])
    emb = PixelEmbedder()
    cfg = dict(cache_dir=str(tmp_path / "cache"), progress=False, batch_size=4)
    first = fast_infer.encode_gallery(emb, paths, **cfg)
    again = fast_infer.encode_gallery(emb, paths, **cfg)
    assert emb.encoded == 3 and np.array_equal(first, again)  # the second call is a cache hit
    # Edit image 1 in place (same name, same pixel count), its modification time moved on.
    Image.new("RGB", (8, 8), (200, 200, 30)).save(paths[1])
    st = os.stat(paths[1])
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    edited = fast_infer.encode_gallery(emb, paths, **cfg)
    assert emb.encoded == 6  # re-encoded, not served from the old cache entry
    yellow = np.array([200, 200, 30], np.float32) / np.linalg.norm([200, 200, 30])
    assert np.allclose(edited[1], yellow, atol=1e-6) and not np.allclose(edited[1], first[1], atol=1e-3)
    assert np.allclose(edited[[0, 2]], first[[0, 2]], atol=1e-6)


# ---------------------------------------------------------------- the real OOD task, end to end

def _placeholder_ood_root(shared_ufire: Path, tmp: Path) -> Path:
    """Copy the real OOD annotations and draw a small placeholder PNG for every image they name."""
    from PIL import Image

    name = "Image(s)+Text 2 Compatible Item"
    src = shared_ufire / "evaluation_only_tasks" / name
    dst = tmp / "ufire" / "evaluation_only_tasks" / name
    dst.mkdir(parents=True)
    for f in ("triplet_data.json", "candidate_images.json"):
        shutil.copy(src / f, dst / f)
    names = set(json.loads((src / "candidate_images.json").read_text()))
    for r in json.loads((src / "triplet_data.json").read_text()):
        names.update(r["query_image"])
        names.update(r["target_image"])
    for i, n in enumerate(sorted(names)):
        p = dst / n
        p.parent.mkdir(parents=True, exist_ok=True)
        # 8x8 images with a colour from the name's index: distinct, tiny, fast to write.
        Image.new("RGB", (8, 8), ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256)).save(p)
    return tmp / "ufire"


def test_real_ood_task_end_to_end(shared_ufire, tmp_path, tiny_embedder):
    import data

    root = _placeholder_ood_root(shared_ufire, tmp_path)
    ufire = data.UFire(str(root))
    oods = ufire.ood_subsets()
    assert oods == ["ood/Image(s)+Text 2 Compatible Item"]
    res = ev.evaluate(tiny_embedder, ufire, oods, split="test", ks=(1, 10, 50), batch_size=64,
                      progress=False)
    (row,) = res.rows
    assert (row.queries, row.gallery, row.missing) == (1000, 2302, 0)
    # A random embedder on placeholder images: every recall is a proper fraction and R@K grows with K.
    assert 0.0 <= row.recall[1] <= row.recall[10] <= row.recall[50] <= 1.0
    assert "ood/Image(s)+Text 2 Compatible Item | 2302 | 1000" in cli.format_table(res)


# ---------------------------------------------------------------- random ≈ chance, trained > chance

@pytest.mark.slow  # ~30-50 s on 2 cores: 60 training steps and two test-split evaluations
def test_random_near_chance_and_briefly_trained_clearly_above(synthetic_root, tmp_path, tiny_embedder):
    """The metric must separate a model that knows nothing from one that learned something.

    inshop (same product, another photo) is the quickest task for the tiny model to pick up, so
    60 steps on it alone are enough to leave chance far behind; a random embedder must not.
    """
    import data
    import train
    from model import FashionLensEmbedder

    ufire = data.UFire(str(synthetic_root))
    subset = ["inshop/SynInshop"]
    before = ev.evaluate(tiny_embedder, ufire, subset, ks=(10,), progress=False).rows[0]
    cfg = train.TrainConfig(tasks="inshop", data=str(synthetic_root), out=str(tmp_path / "run"),
                            steps=60, batch_size=16, chunk_size=16, eval_every=60, max_eval_queries=20,
                            final_test=False, device="cpu", seed=0)
    train.train(cfg)
    trained = FashionLensEmbedder.from_pretrained(str(tmp_path / "run" / "best"))
    after = ev.evaluate(trained, ufire, subset, ks=(10,), progress=False).rows[0]
    chance = after.chance10  # same split, same gallery: the same chance level for both
    # Random weights: within noise of chance (120 queries: a few hits either way).
    assert before.recall[10] < 3 * chance, (before.recall, chance)
    # Briefly trained: several times chance, and clearly better than the random model.
    assert after.recall[10] > 4 * chance and after.recall[10] > before.recall[10] + 0.08, (after.recall, chance)


# ---------------------------------------------------------------- issue 30, item 2: galleries smaller than K

@pytest.mark.parametrize("g,p", [(5, 1), (5, 2), (5, 0), (12, 3), (1, 1)])
def test_chance_with_k_near_and_above_the_gallery_size(g, p):
    """A random top K of a G-image gallery holds min(K, G) images, so it misses all P positives with
    probability C(G-P, min(K, G)) / C(G, min(K, G)): at K >= G it holds the whole gallery and chance
    is 1 for a query with a positive (0 without). K = G - 1, G, G + 1 and 10 > G are the edges where
    the product over j < K must stop at G (one more factor divides by G - G = 0)."""
    from math import comb

    for k in sorted({max(g - 1, 1), g, g + 1, 10}):
        kk = min(k, g)
        want = 1 - comb(g - p, kk) / comb(g, kk)
        assert ev.chance_recall(g, [list(range(p))], k) == pytest.approx(want, abs=1e-12), (g, p, k)
        if k >= g:
            assert want == (1.0 if p else 0.0)


def test_recall_with_a_gallery_smaller_than_k():
    """3 gallery images, K up to 10: both searches return the whole gallery (3 columns), so every query
    whose positive is in the gallery is a hit at K = 5 and 10, whatever its rank; a query without
    one stays a miss. By hand: q0 ranks image 0 first (hit at 1), q1 ranks image 2 last (hit from 3)."""
    g = np.eye(3, dtype=np.float32)                                          # (3, 3)
    q = np.array([[1, 0, 0], [0.8, 0.6, 0], [0, 0, 1]], np.float32)           # (3, 3)
    positives = [[0], [2], []]
    for search in (ev.search_torch, lambda a, b, k: fast_infer.search_faiss(a, b, k, reference=ev.search_torch)):
        _, ids = search(q, g, 10)
        assert ids.shape == (3, 3)
        assert ev.recall_at_k(ids, positives, (1, 2, 3, 5, 10)) == \
            pytest.approx({1: 1 / 3, 2: 1 / 3, 3: 2 / 3, 5: 2 / 3, 10: 2 / 3})
    assert ev.chance_recall(3, positives, 10) == pytest.approx(2 / 3)  # chance of the same queries: 1, 1, 0


# ---- issue 30: own mutants ------------------------------------------------------------------------


@pytest.mark.parametrize("n, keep", [(1, [0]), (2, [0, 6]), (3, [0, 3, 6])])
def test_max_queries_of_one_or_two_keeps_the_first_and_the_last(n, keep):
    """--max-queries N keeps round(i (R - 1) / (N - 1)), i < N: the first and the last and evenly
    spaced in between; N = 1 keeps the first (no division by N - 1 = 0). 7 queries, so 3 lands on 3."""
    import data

    view = data.EvalView(subset="cir/X", split="test", records=[f"r{i}" for i in range(7)], gallery=["g"],
                         positives=[[i] for i in range(7)], missing=["m"])
    few = fast_infer.few_queries(view, n)
    assert few.records == [f"r{i}" for i in keep] and few.positives == [[i] for i in keep]
    assert few.gallery == ["g"] and few.missing == ["m"]  # the gallery and the missing count stay whole
    assert fast_infer.missing_weight(few, 7) == pytest.approx(n / 7)  # 1 missing x the sampled share
