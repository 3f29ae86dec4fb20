"""evaluate.py's speed and bookkeeping: faiss search with tie repair, the gallery cache, --max-queries
sampling, and the checks before and after encoding (support code: skip on first read).

Search. `search_faiss` is the fast twin of the reference `evaluate.search_torch` (one matmul and a
stable sort): exact inner-product search with faiss (IndexFlatIP), ties broken by gallery index so
results never depend on thread scheduling. The reference is passed in (`reference=`), used for the
rare rows whose tie straddles the K-th place. tests/test_evaluate.py
(test_recall_by_hand_with_ties_multi_positives_and_missing, the faiss == torch tests) holds the two
equal; evaluate.py dispatches to faiss in one commented line.

Gallery cache. The (G, D) gallery matrix is cached on disk under a key made of the checkpoint's
fingerprint and the exact image list, so a second run on the same checkpoint encodes nothing. What
the key trusts about each image (`gallery_key`): its size, mtime (ns), inode and ctime, which any
rewrite of the file changes even when the size and mtime are put back; `--verify-cache`
(`cache_folder(..., verify=True)`) hashes every image's bytes instead (exact, slower). The cache
file's name carries a sha256 of its bytes, checked before use: a damaged file is reported,
recomputed and replaced, never trusted (tests/test_reliability_eval.py, test_reliability_io.py).

Query sampling. With --max-queries N, `few_queries` keeps N evenly spaced queries per sub-dataset
(the gallery stays whole, so Recall@K keeps its meaning and only gets noisier), and `missing_weight`
scales the missing queries to the sample for the denominator (evaluate.py's docstring).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from support import plumbing
from support.errors import EvalError, UFireError


# ----------------------------------------------------------------------------------------------
# Search: faiss, with ties repaired to the reference's order
# ----------------------------------------------------------------------------------------------

def _order_ties(scores: np.ndarray, ids: np.ndarray):
    """Reorder each row by (score descending, gallery index ascending)."""
    order = np.lexsort((ids, -scores), axis=1)  # (B, K) last key (-score) is the primary key
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)  # (B, K) each


def search_faiss(q: np.ndarray, g: np.ndarray, k: int, index=None, *, reference: Callable):
    """Fast exact search with faiss' brute-force inner-product index, ties broken by gallery index.

    faiss returns the right top-K *set* but orders equal scores by whatever its heap did, and when a
    tie straddles the K-th place it may keep a higher gallery index than the reference would. So we
    ask for K+1 results: rows whose K-th and (K+1)-th scores differ are exact after a cheap re-sort;
    the rare rows with a tie across the cut are recomputed with `reference` (evaluate.search_torch).
    The fast twin of evaluate.search_torch: tests/test_evaluate.py holds the two equal, ties included.
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
            s_ref, i_ref = reference(q[rows], g, k)  # (b, K) each
            scores[rows], ids[rows] = s_ref, i_ref
    else:
        scores, ids = _order_ties(scores, ids)  # (B, G) whole gallery, just order the ties
    return scores, ids.astype(np.int64)


# ----------------------------------------------------------------------------------------------
# --max-queries: an evenly spaced sample of each sub-dataset's queries
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


# ----------------------------------------------------------------------------------------------
# Checks before and after encoding
# ----------------------------------------------------------------------------------------------

def require_files(views) -> None:
    """Stop before any encoding when a gallery image is missing, naming the file that lists it
    (the encoder knows only the image's path). Unreadable images are named by data.load_image."""
    for v in views:
        for p in v.gallery:
            if not os.path.isfile(p):
                src = v.gallery_source or f"the targets of its {v.split} records"
                raise UFireError(f"missing image {p} (in the gallery of {v.subset}: {src})")


def require_finite(emb: np.ndarray, name_of, what: str) -> None:
    """Refuse NaN / inf embeddings: a ranking of NaN scores is arbitrary, yet would yield numbers.

    name_of(i) names row i (an image path, a record) in the message.
    """
    bad = np.nonzero(~np.isfinite(emb).all(axis=1))[0]  # (n_bad,) rows with a NaN or inf
    if len(bad):
        raise EvalError(f"{len(bad)} {what} embedding(s) are NaN or infinite (first: {name_of(bad[0])}); "
                        "the checkpoint's weights are damaged or training diverged")


# ----------------------------------------------------------------------------------------------
# Encoding in parts (a moving progress bar), and the gallery cache
# ----------------------------------------------------------------------------------------------

def encode_in_parts(encode, items: Sequence, dim: int, batch_size: int, progress: bool, desc: str) -> np.ndarray:
    """Call `encode` (an embedder's encode_images / encode_queries) on a few batches at a time.

    The embedder batches internally; handing it 8 batches per call just lets the progress bar move.
    """
    from tqdm import tqdm  # a disabled bar is silent and keeps the same update/close

    chunks = []
    step = max(batch_size, 1) * 8
    bar = tqdm(total=len(items), desc=f"encode {desc}", unit="item", leave=False,
               disable=not progress or len(items) == 0)
    for s in range(0, len(items), step):
        part = list(items[s:s + step])
        chunks.append(encode(part, batch_size=batch_size).float().numpy())  # (n, D)
        bar.update(len(part))
    bar.close()
    return np.concatenate(chunks, 0) if chunks else np.zeros((0, dim), np.float32)  # (N, D)


class CacheFolder(str):
    """The gallery cache folder (a str, so it passes through evaluate.evaluate's `cache_dir`), plus
    how far its key trusts the image files: verify=True hashes their contents (`gallery_key`)."""
    verify: bool = False


def cache_folder(path: Optional[str], verify: bool = False) -> Optional[CacheFolder]:
    """evaluate.py's --cache-dir and --verify-cache as one value for `encode_gallery`; None: no cache."""
    if not path:
        return None
    folder = CacheFolder(path)
    folder.verify = verify
    return folder


def encode_gallery(embedder, paths: Sequence[str], batch_size: int = 64, cache_dir: Optional[str] = None,
                   progress: bool = True) -> np.ndarray:
    """(G, D) float32 embeddings of `paths`, from the cache when this checkpoint saw this list before.

    The cache key must change whenever the embeddings could: it is the checkpoint's digest (its
    config, which names a frozen pretrained base, plus the bytes of every trainable tensor: LoRA,
    learnable tokens, calibrator, a tiny model's vision tower) and `gallery_key` of the image list
    (file metadata, or with a CacheFolder(verify=True) the files' contents).
    A cached file is used only once its checksum proves its bytes (see `read_cache`).
    cache_dir None or '': no cache.
    """
    key = None
    if cache_dir:
        conf = getattr(embedder, "config", None)
        conf = json.dumps(dataclasses.asdict(conf) if dataclasses.is_dataclass(conf) else repr(conf),
                          sort_keys=True, default=str)  # the config as text: the digest's prefix
        gal = gallery_key(paths, contents=getattr(cache_dir, "verify", False))
        key = plumbing.params_digest(embedder, prefix=conf)[:20] + "-" + gal[:20]
        emb = read_cache(Path(cache_dir), key, (len(paths), embedder.dim))  # (G, D) or None
        if emb is not None:
            return emb
    emb = encode_in_parts(embedder.encode_images, paths, embedder.dim, batch_size, progress, "gallery")  # (G, D)
    if key is not None:
        write_cache(Path(cache_dir), key, emb)
    return emb


def gallery_key(paths: Sequence[str], contents: bool = False) -> str:
    """A hash of the exact image list and of what each file holds, so that edits invalidate the cache.

    contents=False: each file's size, mtime (ns), inode and ctime. Size and mtime alone miss a file
    replaced by one of the same size whose mtime was put back (cp -p, rsync -t, touch -r): its ctime
    changes whatever is done (no system call sets it), and a new file usually gets a new inode. A
    copy or restore of the whole root changes them too, so the cache is then recomputed once.
    contents=True (--verify-cache): the sha256 of each file's bytes instead; exact, and it survives a
    copy of the root, at the price of reading every image.
    """
    h = hashlib.sha256(b"contents\n" if contents else b"stat\n")  # the two kinds of key never meet
    for p in paths:
        name = os.fsencode(p)  # a file name that is not UTF-8 hashes as its bytes
        try:
            if contents:
                what = plumbing.file_sha256(p)  # the project's one file hash
            else:
                st = os.stat(p)
                what = f"{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{st.st_ctime_ns}"
        except OSError:  # a missing or unreadable file is reported by the encoder with its record
            what = "missing"
        h.update(name + b"\0" + what.encode() + b"\n")
    return h.hexdigest()


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
