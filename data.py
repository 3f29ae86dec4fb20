"""U-FIRE data layer and the synthetic U-FIRE benchmark.

Concept
-------
FashionLens (Wen et al., 2026, "Toward Versatile Fashion Image Retrieval via Task-Adaptive
Learning") trains one retriever on U-FIRE, a union of 15 fashion datasets recast as retrieval
*triplets*: (instruction + query, target image(s)). Nine task words cover every query format
(text, sketch, street photo, product photo, video, sketch+text, image+modification text, outfit,
image+attribute); two manually curated out-of-distribution (OOD) tasks are test-only.

Where it sits: at the bottom of the import graph (data -> model -> train/evaluate). It reads a
U-FIRE root exactly as published (no conversion step) and hands out
  * training pairs  (query, one target)           -- TrainView.pair
  * evaluation views (queries, de-duplicated gallery G, positives as gallery indices) -- EvalView
and it writes the *synthetic U-FIRE*: a procedurally drawn benchmark in U-FIRE's own layout that is
the project's offline default (no images of the real datasets can be shipped).

Recall@K, the metric the views feed:  R@K = (1/N) * sum_n 1[ topK(q_n) ∩ P_n != {} ]
where P_n is the positive set of query n (asfr: every gallery image under its label).

Run it
------
    python data.py                                   # tour: counts per task, one example
    python data.py synth --out data/synthetic [--seed 0] [--scale 1.0]
    python data.py check --root ../shared/ufire      # exit 1 when anything is missing

Synthetic U-FIRE (what other modules should know): 13 sub-datasets named "task/Syn...", all 9 task
words + both OOD tasks; 64x64 RGB PNGs; a video is ONE animated GIF (8 frames) in query_video
(load_frames also reads frame folders, animated WebP, and mp4 when `av`/`imageio` is installed);
instruction_text already contains the query text; asfr positives = every gallery image under
target_label. Written atomically (temp dir + rename) with synthetic_info.json as the completion stamp.

Dependencies: standard library, numpy, Pillow only (no torch here, on purpose).
Shape legend: B batch, L sequence, D hidden, G gallery, r rank, T tasks.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from PIL import Image, ImageDraw, ImageFilter, ImageOps, UnidentifiedImageError

# --------------------------------------------------------------------------------------------
# Task registry
# --------------------------------------------------------------------------------------------

# The 9 U-FIRE task words; suffixed variants ("inshop-tryon") map to the word before the "-".
TASK_WORDS = ("t2i", "sketch2i", "street2shop", "inshop", "video2img",
              "sketch&text", "cir", "compatibility", "asfr")
# The 2 manually curated out-of-distribution tasks (folder names under evaluation_only_tasks/).
OOD_TASKS = ("Image(s)+Text 2 Compatible Item", "Street+Modification Text 2 Shop")


class UFireError(ValueError):
    """Bad input: the message always names the file and the record id/index."""


@dataclass(frozen=True)
class TaskSpec:
    """What a task's query and target look like, and how its instruction may be phrased."""
    word: str                      # task word as in file names ("cir") or OOD folder name
    query_kind: str                # e.g. "text", "sketch", "image+text", "video", "images"
    target_kind: str               # "image" for every U-FIRE task
    instructions: tuple[str, ...]  # templates; {text}/{category}/{attribute} are filled in
    pick_one_query: bool = False   # several query images are alternatives (sketches): draw one
    ood: bool = False              # evaluation-only task


# Several phrasings per task, so a model cannot key on one fixed sentence. Real U-FIRE records
# already carry their full instruction_text; these templates are used by the synthetic generator
# and by anyone building a query from raw fields.
TASKS: dict[str, TaskSpec] = {s.word: s for s in (
    TaskSpec("t2i", "text", "image", (
        "Find the fashion product that matches this description: {text}",
        "Retrieve an image of {text}.",
        "Show me the product described as: {text}")),
    TaskSpec("sketch2i", "sketch", "image", (
        "Find the product photo of the item drawn in this sketch.",
        "Retrieve the fashion item that this sketch depicts.",
        "Which product matches the given sketch?"), pick_one_query=True),
    TaskSpec("street2shop", "street photos", "image", (
        "Find the shop image of the item worn in the street photo.",
        "Retrieve the product shown in the given street photos.",
        "Match this street snapshot to its online shop listing.")),
    TaskSpec("inshop", "product photos", "image", (
        "Find other photos of the same product.",
        "Retrieve more images of this exact item.",
        "Show another view of the given product.")),
    TaskSpec("video2img", "video", "image", (
        "Find the product worn in this video.",
        "Retrieve the shop image of the item shown in the video clip.",
        "Which product appears in the given video?")),
    TaskSpec("sketch&text", "sketch+text", "image", (
        "Find the item drawn in the sketch, {text}",
        "Retrieve the product matching the sketch that is {text}",
        "Using the sketch and the note '{text}', find the product.")),
    TaskSpec("cir", "image+modification text", "image", (
        "Find an image like the reference one, but {text}",
        "Retrieve the product in the image modified as follows: {text}",
        "Same item as shown, except: {text}")),
    TaskSpec("compatibility", "outfit images", "image", (
        "Find a {category} that goes well with these items.",
        "Complete the outfit with a compatible {category}.",
        "Which {category} matches the given outfit?")),
    TaskSpec("asfr", "image+attribute", "image", (
        "Find items with the same {attribute} as this one.",
        "Retrieve fashion items sharing this item's {attribute}.",
        "Show products whose {attribute} matches the given image.")),
    TaskSpec(OOD_TASKS[0], "outfit images+text", "image", (
        "find compatible {text} go well with the given images",
        "Find a {text} that completes the outfit in the given images."), ood=True),
    TaskSpec(OOD_TASKS[1], "street photo+modification text", "image", (
        "Find the shop image of the item in the street photo, but {text}",
        "Retrieve the product worn in the photo modified as follows: {text}"), ood=True),
)}


def base_task(task: str) -> str:
    """'inshop-tryon' -> 'inshop', 'sketch&text' -> itself, an OOD name -> itself; else UFireError."""
    if task in TASKS:
        return task
    head = task.split("-", 1)[0]
    if head in TASK_WORDS:
        return head
    raise UFireError(f"unknown task {task!r}; known task words: {', '.join(TASK_WORDS)} "
                     f"and OOD tasks {', '.join(OOD_TASKS)}")


# --------------------------------------------------------------------------------------------
# Records and queries
# --------------------------------------------------------------------------------------------

@dataclass
class Record:
    """One U-FIRE triplet, every field of FORMAT.md plus where it came from."""
    id: str
    instruction_text: str
    target_image: list[str]
    task: str = ""
    dataset: str = ""
    split: str = ""
    query_text: Optional[str] = None
    query_image: list[str] = field(default_factory=list)
    query_video: list[str] = field(default_factory=list)
    negative_image: list[str] = field(default_factory=list)
    attribute: Optional[str] = None
    target_label: Optional[str] = None
    category: Optional[str] = None
    # provenance (not in the JSON)
    root: str = ""       # directory the image paths are relative to
    source: str = ""     # JSON file the record was read from
    index: int = -1      # position in that file
    subset: str = ""     # "task/dataset", e.g. "cir/FashionIQ-Dress"; OOD: "ood/<Task name>"

    def where(self) -> str:
        """'record <id> (#index) in <file>' -- used by every error about this record."""
        return f"record {self.id!r} (#{self.index}) in {self.source or '<memory>'}"

    def path(self, rel: str) -> str:
        """Absolute, normalised path of an image path as written in this record."""
        return os.path.normpath(os.path.join(self.root, rel))


@dataclass
class Query:
    """A query as the model sees it: instruction text, then images, then video frames."""
    instruction: str
    images: list[Image.Image] = field(default_factory=list)
    frames: list[Image.Image] = field(default_factory=list)


_LIST_FIELDS = ("target_image", "query_image", "query_video", "negative_image")
_STR_FIELDS = ("query_text", "attribute", "target_label", "category", "task", "dataset", "split")


def parse_record(obj, source: str, index: int, root: str, subset: str = "",
                 default_task: str = "") -> Record:
    """Validate one JSON object and turn it into a Record; any problem -> UFireError naming it."""
    rid = obj.get("id") if isinstance(obj, dict) else None
    where = f"record {rid!r} (#{index}) in {source}"
    if not isinstance(obj, dict):
        raise UFireError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if not isinstance(rid, (str, int)) or rid == "":
        raise UFireError(f"{where}: missing or invalid 'id'")
    kw = {"id": str(rid)}
    for name in _LIST_FIELDS:  # a bare string is accepted as a one-element list
        val = obj.get(name, [])
        val = [val] if isinstance(val, str) else val
        if not isinstance(val, list) or not all(isinstance(v, str) and v for v in val):
            raise UFireError(f"{where}: field {name!r} must be a list of non-empty path strings")
        kw[name] = list(val)
    for name in _STR_FIELDS:
        val = obj.get(name)
        if val is not None and not isinstance(val, str):
            raise UFireError(f"{where}: field {name!r} must be a string")
        kw[name] = val
    instr = obj.get("instruction_text")
    if not isinstance(instr, str) or not instr.strip():
        raise UFireError(f"{where}: missing or empty 'instruction_text'")
    kw["instruction_text"] = instr
    task = kw.pop("task") or default_task
    try:
        btask = base_task(task)
    except UFireError as e:
        raise UFireError(f"{where}: {e}") from None
    # asfr positives may come from the label alone; every other task needs explicit targets.
    if "target_image" not in obj or not (kw["target_image"] or (btask == "asfr" and kw["target_label"])):
        raise UFireError(f"{where}: record has no target_image")
    if not (kw["query_text"] or kw["query_image"] or kw["query_video"]):
        raise UFireError(f"{where}: record has no query (query_text, query_image or query_video)")
    return Record(task=task, dataset=kw.pop("dataset") or "", split=kw.pop("split") or "",
                  root=root, source=source, index=index, subset=subset, **kw)


def read_json(path: str):
    """json.load with errors that name the file (and line/column for syntax errors)."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UFireError(f"missing file {path}") from None
    except json.JSONDecodeError as e:
        raise UFireError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise UFireError(f"{path}: not UTF-8 text ({e})") from None


def _rec_where(record: Optional[Record]) -> str:
    return f" ({record.where()})" if record is not None else ""


def load_image(path, size: Optional[int] = None, record: Optional[Record] = None) -> Image.Image:
    """Open an image as RGB, resized to size x size when size is given (bicubic)."""
    path = str(path)
    if not os.path.isfile(path):
        raise UFireError(f"missing image {path}{_rec_where(record)}")
    try:
        with Image.open(path) as im:
            im.load()  # force the decode now, so a truncated file fails here and not later
            img = im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UFireError(f"unreadable image {path}{_rec_where(record)}: {e}") from None
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    return img


_FRAME_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _pick_frames(n: int, k: int, rng: Optional[random.Random]) -> list[int]:
    """k frame indices out of n: segment centres (eval) or one random frame per segment (train)."""
    if n <= 0:
        return []
    idx = []
    for j in range(k):
        lo, hi = j * n / k, (j + 1) * n / k  # segment j covers frames [lo, hi)
        i = int(lo + (hi - lo) / 2) if rng is None else int(lo + rng.random() * (hi - lo))
        idx.append(min(max(i, 0), n - 1))
    return idx


def _read_mp4(path: str, record: Optional[Record]) -> list[Image.Image]:
    """Decode a video file with an optional reader (PyAV or imageio); clear error if none."""
    try:
        import av  # type: ignore
        with av.open(path) as c:
            return [fr.to_image().convert("RGB") for fr in c.decode(video=0)]
    except ImportError:
        pass
    try:
        import imageio.v3 as iio  # type: ignore
        return [Image.fromarray(a).convert("RGB") for a in iio.imiter(path)]
    except ImportError:
        raise UFireError(f"cannot read video {path}{_rec_where(record)}: mp4 needs the optional "
                         "package 'av' or 'imageio'; or store the video as a frame folder / "
                         "animated GIF/WebP") from None


def load_frames(path, num_frames: int, size: Optional[int] = None, record: Optional[Record] = None,
                rng: Optional[random.Random] = None) -> list[Image.Image]:
    """A video as num_frames RGB frames: a frame folder, an animated GIF/WebP, or mp4 (optional).

    Frames are taken one per equal segment of the clip (segment centre at eval, random position
    in the segment at training), so a short clip yields repeated frames rather than fewer.
    """
    path = str(path)
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.lower().endswith(_FRAME_EXT))
        if not names:
            raise UFireError(f"video frame folder {path} holds no images{_rec_where(record)}")
        return [load_image(os.path.join(path, names[i]), size, record)
                for i in _pick_frames(len(names), num_frames, rng)]
    if not os.path.isfile(path):
        raise UFireError(f"missing video {path}{_rec_where(record)}")
    if path.lower().endswith((".mp4", ".avi", ".mov", ".mkv", ".webm")):
        frames = _read_mp4(path, record)
    else:
        try:
            with Image.open(path) as im:
                frames = []
                for i in range(getattr(im, "n_frames", 1)):
                    im.seek(i)
                    frames.append(im.convert("RGB"))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise UFireError(f"unreadable video {path}{_rec_where(record)}: {e}") from None
    if not frames:
        raise UFireError(f"video {path} has no frames{_rec_where(record)}")
    out = [frames[i] for i in _pick_frames(len(frames), num_frames, rng)]
    if size is not None:
        out = [f.resize((size, size), Image.BICUBIC) if f.size != (size, size) else f for f in out]
    return out


def record_to_query(record: Record, image_size: int, max_images: int = 4, num_frames: int = 4,
                    rng: Optional[random.Random] = None) -> Query:
    """Load a record's query: instruction, up to max_images images, num_frames video frames.

    rng None -> the deterministic evaluation query (first sketch, first max_images images, centre
    frames). rng given -> a training draw: one random sketch among several (sketch tasks), a random
    ordered subset when there are more images than max_images, random frame positions.
    """
    spec = TASKS[base_task(record.task)]
    paths = list(record.query_image)
    if spec.pick_one_query and len(paths) > 1:  # several sketches are alternatives of one query
        paths = [paths[0] if rng is None else rng.choice(paths)]
    if len(paths) > max_images:
        keep = range(max_images) if rng is None else sorted(rng.sample(range(len(paths)), max_images))
        paths = [paths[i] for i in keep]
    images = [load_image(record.path(p), image_size, record) for p in paths]
    frames: list[Image.Image] = []
    if len(record.query_video) == 1:  # one clip: a file or a frame folder
        frames = load_frames(record.path(record.query_video[0]), num_frames, image_size, record, rng)
    elif len(record.query_video) > 1:  # the clip given as an ordered list of frame files
        frames = [load_image(record.path(record.query_video[i]), image_size, record)
                  for i in _pick_frames(len(record.query_video), num_frames, rng)]
    return Query(instruction=record.instruction_text, images=images, frames=frames)


# --------------------------------------------------------------------------------------------
# Reading a U-FIRE root
# --------------------------------------------------------------------------------------------

_SPLITS = ("train", "val", "test")
# <n>_<task>[-suffix]_<dataset>_<split>_triplet_data.json  (the number is ordering only)
_TRIPLET_RE = re.compile(rf"^\d+_(?P<task>[^_]+)_(?P<dataset>.+)_(?P<split>train|val|test)_triplet_data\.json$")
_GALLERY_RE = re.compile(rf"^\d+_(?P<task>[^_]+)_(?P<dataset>.+)_test_candidates\.json$")
_POOL_RE = re.compile(rf"^\d+_(?P<task>[^_]+)_(?P<dataset>.+)_(?P<split>val|test)_candidate_data\.json$")


def _task_of_file(task_token: str, path: str) -> str:
    try:
        return base_task(task_token)
    except UFireError as e:
        raise UFireError(f"{path}: file name has an unknown task word: {e}") from None


@dataclass
class Gallery:
    """A gallery as published: de-duplicated absolute paths plus (asfr) label -> indices."""
    paths: list[str]                         # (G,) absolute normalised paths, first-seen order
    labels: Optional[dict[str, list[int]]]   # asfr only: label -> gallery indices
    source: str                              # file it came from ('' = union of the split's targets)
    raw_count: int                           # entries before de-duplication


@dataclass
class EvalView:
    """One deterministic query per scored record, the gallery, positives as gallery indices."""
    subset: str
    split: str
    records: list[Record]          # the scored queries (records with >= 1 positive in the gallery)
    gallery: list[str]             # (G,) absolute normalised image paths, de-duplicated
    positives: list[list[int]]     # per scored record: gallery indices counted as hits
    missing: list[str]             # ids of records none of whose targets is in the gallery
    root: str = ""
    gallery_source: str = ""       # gallery file ('' when built from the split's targets)
    targets_outside: int = 0       # target paths (over all records) not found in the gallery


@dataclass
class TrainPair:
    query: Query
    target: Image.Image
    target_key: str                # what makes two targets the same positive: the image's absolute
                                   # path, or "label:<target_label>" for asfr (every image under a label is correct)


class UFire:
    """A U-FIRE root read as published: 0_triplet_files/, 0_test_candidates/, evaluation_only_tasks/."""

    def __init__(self, root):
        self.root = os.path.abspath(str(root))
        if not os.path.isdir(self.root):
            raise UFireError(f"U-FIRE root {self.root} is not a directory")
        self._triplets: dict[tuple[str, str], str] = {}   # (subset, split) -> file
        self._galleries: dict[str, str] = {}               # subset -> test gallery file
        self._pools: dict[tuple[str, str], str] = {}       # (subset, split) -> asfr label pool
        self._cache: dict[tuple[str, str], list[Record]] = {}
        for folder in ("0_triplet_files", "0_test_candidates"):
            d = os.path.join(self.root, folder)
            for name in (sorted(os.listdir(d)) if os.path.isdir(d) else []):
                path = os.path.join(d, name)
                if m := _TRIPLET_RE.match(name):
                    key = (f"{_task_of_file(m['task'], path)}/{m['dataset']}", m["split"])
                    self._triplets[key] = path
                elif m := _POOL_RE.match(name):
                    sub = f"{_task_of_file(m['task'], path)}/{m['dataset']}"
                    self._pools[(sub, m["split"])] = path
                    if m["split"] == "test":
                        self._galleries[sub] = path
                elif m := _GALLERY_RE.match(name):
                    self._galleries[f"{_task_of_file(m['task'], path)}/{m['dataset']}"] = path
        ood = os.path.join(self.root, "evaluation_only_tasks")
        self._ood = sorted(n for n in (os.listdir(ood) if os.path.isdir(ood) else [])
                           if os.path.isfile(os.path.join(ood, n, "triplet_data.json")))

    # ---- listing ----------------------------------------------------------------------------
    def subsets(self, split: str = "test") -> list[str]:
        """Sub-datasets ("task/dataset") that have a triplet file for this split, sorted."""
        return sorted(s for (s, sp) in self._triplets if sp == split)

    def gallery_subsets(self) -> list[str]:
        """Sub-datasets that have a published test gallery file, sorted."""
        return sorted(self._galleries)

    def ood_subsets(self) -> list[str]:
        """OOD tasks present under evaluation_only_tasks/, named "ood/<Task name>"."""
        return [f"ood/{n}" for n in self._ood]

    def triplet_file(self, subset: str, split: str) -> str:
        if subset.startswith("ood/"):
            return os.path.join(self.root, "evaluation_only_tasks", subset[4:], "triplet_data.json")
        if (subset, split) not in self._triplets:
            raise UFireError(f"no {split} triplet file for {subset!r} under {self.root}/0_triplet_files")
        return self._triplets[(subset, split)]

    # ---- records ----------------------------------------------------------------------------
    def records(self, subset: str, split: str = "test") -> list[Record]:
        """Every record of one sub-dataset and split, validated (cached)."""
        key = (subset, "test" if subset.startswith("ood/") else split)
        if key not in self._cache:
            path = self.triplet_file(*key)
            if subset.startswith("ood/"):  # paths are relative to the task's own folder
                root, task = os.path.dirname(path), subset[4:]
            else:
                root, task = self.root, subset.split("/", 1)[0]
            data = read_json(path)
            if not isinstance(data, list):
                raise UFireError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
            recs = [parse_record(o, path, i, root, subset, default_task=task) for i, o in enumerate(data)]
            for r in recs:
                if subset.startswith("ood/"):
                    r.task, r.split = task, "test"
                elif base_task(r.task) != task:
                    raise UFireError(f"{r.where()}: task {r.task!r} does not belong in a {task} file")
            seen: dict[str, int] = {}
            for r in recs:
                if r.id in seen:
                    raise UFireError(f"{r.where()}: duplicate id (first at #{seen[r.id]})")
                seen[r.id] = r.index
            self._cache[key] = recs
        return self._cache[key]

    # ---- galleries --------------------------------------------------------------------------
    def gallery(self, subset: str, split: str = "test") -> Gallery:
        """The gallery: published test file / asfr label pool / OOD candidates / union of targets."""
        if subset.startswith("ood/"):
            path = os.path.join(self.root, "evaluation_only_tasks", subset[4:], "candidate_images.json")
            return self._read_gallery(path, os.path.dirname(path))
        path = self._galleries.get(subset) if split == "test" else self._pools.get((subset, split))
        if path:
            return self._read_gallery(path, self.root)
        # val (and a test split without a published file): the union of the split's targets
        paths, seen = [], set()
        for r in self.records(subset, split):
            for p in r.target_image:
                a = r.path(p)
                if a not in seen:
                    seen.add(a)
                    paths.append(a)
        return Gallery(paths, None, "", len(paths))

    def _read_gallery(self, path: str, root: str) -> Gallery:
        data = read_json(path)
        norm = lambda p: os.path.normpath(os.path.join(root, p))  # noqa: E731
        paths: list[str] = []
        index: dict[str, int] = {}

        def add(entries, what):
            if not isinstance(entries, list) or not all(isinstance(p, str) and p for p in entries):
                raise UFireError(f"{path}: {what} must be a list of image path strings")
            out = []
            for p in entries:
                a = norm(p)
                if a not in index:
                    index[a] = len(paths)
                    paths.append(a)
                out.append(index[a])
            return out

        if isinstance(data, list):
            add(data, "the gallery")
            return Gallery(paths, None, path, len(data))
        if not isinstance(data, dict):
            raise UFireError(f"{path}: expected a list of paths or an object label -> paths")
        # asfr: label -> images, plus a special "<Dataset>_asfr_<split>_candidate" key = full gallery
        special = [k for k in data if k.endswith("_candidate")]
        raw = 0
        for k in special:
            add(data[k], f"entry {k!r}")
            raw += len(data[k])
        labels = {}
        for k in data:
            if k in special:
                continue
            labels[k] = sorted(set(add(data[k], f"label {k!r}")))
            raw += 0 if special else len(data[k])
        return Gallery(paths, labels, path, raw)

    # ---- views ------------------------------------------------------------------------------
    def eval_view(self, subset: str, split: str = "test") -> EvalView:
        """Scored records, de-duplicated gallery and positives; records without a positive are
        listed in `missing` (reported, never scored as misses or hits)."""
        recs = self.records(subset, split)
        gal = self.gallery(subset, split)
        index = {p: i for i, p in enumerate(gal.paths)}
        scored, positives, missing, outside = [], [], [], 0
        for r in recs:
            pos: set[int] = set()
            if base_task(r.task) == "asfr" and r.target_label and gal.labels is not None:
                pos.update(gal.labels.get(r.target_label, []))  # every image under the label
            for p in r.target_image:
                i = index.get(r.path(p))
                if i is None:
                    outside += 1
                else:
                    pos.add(i)
            if pos:
                scored.append(r)
                positives.append(sorted(pos))
            else:
                missing.append(r.id)
        root = os.path.dirname(gal.source) if subset.startswith("ood/") else self.root
        return EvalView(subset, split, scored, gal.paths, positives, missing, root, gal.source, outside)

    def train_view(self, subsets, image_size: int, max_images: int = 4, num_frames: int = 4) -> "TrainView":
        return TrainView(self, list(subsets), image_size, max_images, num_frames)


class TrainView:
    """One (query, target) pair per record; the target (or query sketch) is drawn at random."""

    def __init__(self, ufire: UFire, subsets: list[str], image_size: int, max_images: int = 4,
                 num_frames: int = 4):
        self.ufire, self.image_size = ufire, image_size
        self.max_images, self.num_frames = max_images, num_frames
        self.recs = {s: ufire.records(s, "train") for s in sorted(subsets)}
        self.sizes = {s: len(r) for s, r in self.recs.items()}  # records per subset (sampler's N_k)

    def record(self, subset: str, i: int) -> Record:
        return self.recs[subset][i]

    def pair(self, subset: str, i: int, rng: random.Random) -> TrainPair:
        r = self.recs[subset][i]
        query = record_to_query(r, self.image_size, self.max_images, self.num_frames, rng)
        tgt = r.path(rng.choice(r.target_image))  # one of several targets, fresh each epoch
        # The key decides which in-batch targets count as positives for each other. Usually that is
        # "the same image"; for asfr every image filed under the label is correct, so two queries
        # asking for the same attribute value share their positives instead of repelling each other.
        key = f"label:{r.target_label}" if r.target_label else tgt
        return TrainPair(query, load_image(tgt, self.image_size, r), key)


# --------------------------------------------------------------------------------------------
# check: validate a root
# --------------------------------------------------------------------------------------------

def check_root(root, out=sys.stdout, example_limit: int = 3) -> bool:
    """Print one row per sub-dataset/split and per OOD task; return True when nothing is missing."""
    uf = UFire(root)
    ok, problems = True, []
    rows = [("subset", "split", "records", "gallery", "outside", "missing files")]
    items = [(s, sp) for sp in _SPLITS for s in uf.subsets(sp)]
    items += [(s, "test") for s in uf.gallery_subsets() if s not in uf.subsets("test")]
    items += [(s, "test") for s in uf.ood_subsets()]
    for sub, split in sorted(items, key=lambda x: (x[0].startswith("ood/"), x[0], _SPLITS.index(x[1]))):
        try:
            has_recs = sub.startswith("ood/") or sub in uf.subsets(split)
            gal = uf.gallery(sub, split) if (split == "test" or has_recs) else None
            files = set(gal.paths) if gal else set()
            n_rec, n_out = "-", "-"
            if has_recs:
                view = uf.eval_view(sub, split)
                n_rec, n_out = str(len(view.records) + len(view.missing)), str(view.targets_outside)
                for r in uf.records(sub, split):
                    files.update(r.path(p) for p in r.query_image + r.query_video + r.target_image)
                if view.targets_outside or view.missing:
                    ok = False
                    problems.append(f"{sub} [{split}]: {view.targets_outside} target(s) outside the "
                                    f"gallery; {len(view.missing)} record(s) without a positive "
                                    f"(e.g. {view.missing[:example_limit]})")
            else:
                ok = False
                problems.append(f"{sub} [{split}]: gallery {gal.source} parsed ({len(gal.paths)} "
                                f"images) but no {split} triplet file in 0_triplet_files/")
            absent = sorted(p for p in files if not os.path.exists(p))
            if absent:
                ok = False
                rel = [os.path.relpath(p, uf.root) for p in absent[:example_limit]]
                problems.append(f"{sub} [{split}]: {len(absent)} missing image/video file(s), e.g. {rel}")
            rows.append((sub, split, n_rec, str(len(gal.paths)) if gal else "-", n_out, str(len(absent))))
        except UFireError as e:
            ok = False
            problems.append(f"{sub} [{split}]: ERROR {e}")
            rows.append((sub, split, "ERROR", "-", "-", "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)), file=out)
    if not items:
        ok = False
        problems.append(f"no triplet files, galleries or OOD tasks found under {uf.root}")
    print(("OK: nothing missing" if ok else "MISSING / PROBLEMS:"), file=out)
    for p in problems:
        print("  - " + p, file=out)
    return ok


# ============================================================================================
# Synthetic U-FIRE
# ============================================================================================
# Every garment ("item") is a tuple of independent factors:
#     item = (category, colour, pattern, (value of each category-specific attribute, ...))
# Renderings of one item: product photo, second product view, try-on on a figure, street photo,
# sketch, video. Texts (captions, modification texts, instructions) are written from the factors.
# The tasks deliberately disagree on what "similar" means: asfr ignores colour and category,
# cir keeps everything but the modified factor, compatibility wants a *different* category,
# sketch2i cannot see colour while sketch&text gets the colour from its text.

ATTRIBUTES = {  # category-specific attributes and their values
    "sleeve length": ("sleeveless", "short", "long"),
    "neckline": ("round", "v-neck", "square"),
    "length": ("short", "medium", "long"),
    "fit": ("slim", "regular", "wide"),
    "height": ("low", "mid", "high"),
    "size": ("small", "medium", "large"),
}
CATEGORIES = {  # category -> (outfit slot, attributes)
    "t-shirt": ("top", ("sleeve length", "neckline")),
    "shirt": ("top", ("sleeve length", "neckline")),
    "sweater": ("top", ("sleeve length", "neckline")),
    "trousers": ("bottom", ("length", "fit")),
    "shorts": ("bottom", ("length", "fit")),
    "skirt": ("bottom", ("length", "fit")),
    "dress": ("dress", ("sleeve length", "neckline", "length")),
    "coat": ("outerwear", ("sleeve length", "length")),
    "jacket": ("outerwear", ("sleeve length", "length")),
    "sneakers": ("shoes", ("height",)),
    "boots": ("shoes", ("height",)),
    "heels": ("shoes", ("height",)),
    "bag": ("bag", ("size",)),
}
COLOURS = {
    "red": (200, 30, 40), "navy": (25, 35, 95), "black": (22, 22, 22), "white": (250, 250, 250),
    "grey": (128, 128, 128), "beige": (222, 203, 160), "brown": (120, 72, 32), "green": (35, 140, 60),
    "yellow": (240, 210, 40), "pink": (240, 140, 185), "orange": (240, 130, 20), "purple": (120, 50, 150),
}
PATTERNS = ("plain", "striped", "checked", "dotted", "diagonal", "zigzag")
# Colour harmony, an explicit rule: neutrals go with anything (except black with navy); at most
# one chromatic colour per outfit unless the two form one of the listed harmonious pairs.
NEUTRALS = ("black", "white", "grey", "navy", "beige", "brown")
HARMONY_PAIRS = (("purple", "yellow"), ("green", "pink"), ("orange", "red"))
OUTFIT_TEMPLATES = (("top", "bottom", "shoes"), ("top", "bottom", "shoes", "outerwear"),
                    ("top", "bottom", "shoes", "bag"), ("dress", "shoes"), ("dress", "shoes", "bag"),
                    ("dress", "shoes", "outerwear"))
_PHRASE = {("sleeve length", "sleeveless"): "sleeveless", ("sleeve length", "short"): "short-sleeve",
           ("sleeve length", "long"): "long-sleeve", ("neckline", "round"): "round-neck",
           ("neckline", "v-neck"): "v-neck", ("neckline", "square"): "square-neck",
           ("length", "short"): "short", ("length", "medium"): "medium-length", ("length", "long"): "long",
           ("fit", "slim"): "slim-fit", ("fit", "regular"): "regular-fit", ("fit", "wide"): "wide-fit",
           ("height", "low"): "low-cut", ("height", "mid"): "mid-height", ("height", "high"): "high",
           ("size", "small"): "small", ("size", "medium"): "medium-size", ("size", "large"): "large"}
_PATTERN_WORD = {"plain": "plain", "striped": "striped", "checked": "checked", "dotted": "polka-dot",
                 "diagonal": "diagonal-striped", "zigzag": "zigzag"}
SYN_SIZE = 64  # synthetic images are 64 x 64 RGB PNG (the tiny model's default image size)
SYN_VERSION = 1


def colours_compatible(colours) -> bool:
    """The synthetic colour-harmony rule (see HARMONY_PAIRS)."""
    cs = sorted(set(colours))
    if "black" in cs and "navy" in cs:
        return False
    chrom = [c for c in cs if c not in NEUTRALS]
    return len(chrom) <= 1 or (len(chrom) == 2 and (tuple(chrom) in HARMONY_PAIRS
                                                    or tuple(chrom[::-1]) in HARMONY_PAIRS))


def item_code(item) -> str:
    cat, col, pat, vals = item
    return "+".join((cat, col, pat) + tuple(vals))


def item_attrs(item) -> dict[str, str]:
    return dict(zip(CATEGORIES[item[0]][1], item[3]))


def caption(item, rng: random.Random) -> str:
    """A caption naming every factor (so a one-factor distractor is never also a correct answer)."""
    cat, col, pat, _ = item
    attrs = " ".join(_PHRASE[(a, v)] for a, v in item_attrs(item).items())
    pw = _PATTERN_WORD[pat]
    forms = (f"a {col} {pw} {attrs} {cat}", f"{attrs} {cat} in {col}, {pw}",
             f"a {pw} {cat}, {col}, {attrs}")
    return rng.choice(forms)


def _item_set(item, factor: str, value: str):
    cat, col, pat, vals = item
    if factor == "colour":
        return (cat, value, pat, vals)
    if factor == "pattern":
        return (cat, col, value, vals)
    if factor == "category":  # only within a slot whose categories share their attributes
        return (value, col, pat, vals)
    names = CATEGORIES[cat][1]
    return (cat, col, pat, tuple(value if n == factor else v for n, v in zip(names, vals)))


def item_factors(item) -> list[str]:
    return ["category", "colour", "pattern"] + list(CATEGORIES[item[0]][1])


def factor_values(item, factor: str) -> tuple[str, ...]:
    if factor == "colour":
        return tuple(COLOURS)
    if factor == "pattern":
        return PATTERNS
    if factor == "category":
        slot, names = CATEGORIES[item[0]]
        return tuple(c for c, (s, n) in CATEGORIES.items() if s == slot and n == names)
    return ATTRIBUTES[factor]


def item_value(item, factor: str) -> str:
    return {"category": item[0], "colour": item[1], "pattern": item[2]}.get(factor) or item_attrs(item)[factor]


def neighbours(item, factors=None) -> list:
    """Every item that differs from `item` in exactly one factor (of the given factors)."""
    out = []
    for f in (factors or item_factors(item)):
        if f not in item_factors(item):
            continue
        out += [_item_set(item, f, v) for v in factor_values(item, f) if v != item_value(item, f)]
    return out


def modification_text(a, b, rng: random.Random) -> str:
    """Text that turns item a into item b (they differ in one or two factors)."""
    parts = []
    for f in item_factors(a):
        va, vb = item_value(a, f), item_value(b, f)
        if va == vb:
            continue
        if f == "colour":
            parts.append(rng.choice((f"change the colour from {va} to {vb}", f"make it {vb} instead of {va}",
                                     f"I want it in {vb}")))
        elif f == "pattern":
            parts.append("make it plain, with no pattern" if vb == "plain" else
                         rng.choice((f"make it {_PATTERN_WORD[vb]}", f"change the pattern to {_PATTERN_WORD[vb]}")))
        elif f == "category":
            parts.append(f"make it a {vb} instead of a {va}")
        elif f == "sleeve length":
            parts.append("remove the sleeves" if vb == "sleeveless" else f"make the sleeves {vb}")
        elif f == "neckline":
            parts.append(f"change the neckline to {_PHRASE[(f, vb)]}")
        elif f == "size":
            parts.append(f"make it {vb} in size")
        else:
            parts.append(rng.choice((f"change the {f} from {va} to {vb}", f"make the {f} {vb}")))
    return " and ".join(parts)


# ---- drawing ---------------------------------------------------------------------------------

def _shape(item):
    """Unit-square drawing of an item: (filled polygons, cut-outs, detail lines, extra ellipses)."""
    cat = item[0]
    a = item_attrs(item)
    polys, cuts, lines, rings = [], [], [], []
    mirror = lambda pts: [(1 - u, v) for u, v in pts]  # noqa: E731
    slot = CATEGORIES[cat][0]
    if slot in ("top", "dress", "outerwear"):
        body = {"t-shirt": (0.30, 0.14, 0.70, 0.80), "shirt": (0.28, 0.12, 0.72, 0.90),
                "sweater": (0.24, 0.12, 0.76, 0.86), "dress": (0.34, 0.08, 0.66, 0.40),
                "coat": (0.26, 0.06, 0.74, {"short": .55, "medium": .75, "long": .95}.get(a.get("length"))),
                "jacket": (0.24, 0.10, 0.76, {"short": .50, "medium": .65, "long": .80}.get(a.get("length")))}[cat]
        x0, y0, x1, y1 = body
        polys.append([(x0, y0), (x1, y0), (x1, y1), (x0, y1)])
        sl = a["sleeve length"]
        if sl != "sleeveless":
            reach = 0.62 if cat == "dress" else 0.84
            if sl == "short":
                s = [(x0, y0), (x0 - 0.18, y0 + 0.24), (x0 - 0.09, y0 + 0.32), (x0, y0 + 0.18)]
            else:
                s = [(x0, y0), (x0 - 0.22, reach), (x0 - 0.12, reach + 0.04), (x0, y0 + 0.22)]
            polys += [s, mirror(s)]
        if "neckline" in a:
            n = a["neckline"]
            if n == "round":
                rings.append((0.41, y0 - 0.08, 0.59, y0 + 0.1))
            elif n == "v-neck":
                cuts.append([(0.39, y0 - 0.01), (0.61, y0 - 0.01), (0.5, y0 + 0.24)])
            else:
                cuts.append([(0.41, y0 - 0.01), (0.59, y0 - 0.01), (0.59, y0 + 0.12), (0.41, y0 + 0.12)])
        if cat == "dress":
            L = {"short": .62, "medium": .80, "long": .97}[a["length"]]
            polys.append([(x0, y1), (x1, y1), (0.84, L), (0.16, L)])
            lines.append([(x0, y1), (x1, y1)])
        elif cat == "shirt":
            lines += [[(0.5, y0 + 0.12), (0.5, y1)], [(0.38, y0), (0.46, y0 + 0.1)], [(0.62, y0), (0.54, y0 + 0.1)]]
        elif cat == "sweater":
            lines += [[(x0, y1 - 0.07), (x1, y1 - 0.07)], [(x0, y1 - 0.035), (x1, y1 - 0.035)]]
        elif cat == "coat":
            lines += [[(0.5, 0.3), (0.5, y1)], [(0.38, y0), (0.5, 0.3), (0.62, y0)], [(x0, 0.45), (x1, 0.45)]]
        elif cat == "jacket":
            lines += [[(0.5, y0), (0.5, y1)], [(0.3, y1 - 0.12), (0.42, y1 - 0.12)], [(0.58, y1 - 0.12), (0.7, y1 - 0.12)]]
    elif slot == "bottom":
        polys.append([(0.30, 0.06), (0.70, 0.06), (0.70, 0.14), (0.30, 0.14)])
        lines.append([(0.30, 0.14), (0.70, 0.14)])
        if cat == "skirt":
            L = {"short": .45, "medium": .65, "long": .90}[a["length"]]
            s = {"slim": 0.0, "regular": 0.08, "wide": 0.18}[a["fit"]]
            polys.append([(0.30, 0.14), (0.70, 0.14), (0.70 + s, L), (0.30 - s, L)])
        else:
            L = ({"short": .70, "medium": .82, "long": .96} if cat == "trousers"
                 else {"short": .36, "medium": .46, "long": .56})[a["length"]]
            w = {"slim": 0.12, "regular": 0.17, "wide": 0.24}[a["fit"]] + (0.06 if cat == "shorts" else 0)
            leg = [(0.30, 0.14), (0.50, 0.14), (0.49, L), (0.49 - w, L)]
            polys += [leg, mirror(leg)]
    elif slot == "shoes":
        h = a["height"]
        if cat == "sneakers":
            H = {"low": .52, "mid": .40, "high": .26}[h]
            polys.append([(0.1, 0.8), (0.1, 0.6), (0.3, H), (0.52, H), (0.58, 0.56), (0.9, 0.66), (0.9, 0.8)])
            lines += [[(0.08, 0.84), (0.92, 0.84)], [(0.4, H + 0.08), (0.56, H + 0.1)], [(0.4, H + 0.16), (0.6, H + 0.18)]]
        elif cat == "boots":
            H = {"low": .45, "mid": .30, "high": .12}[h]
            polys.append([(0.2, 0.84), (0.2, H), (0.52, H), (0.52, 0.6), (0.88, 0.68), (0.88, 0.84)])
            polys.append([(0.2, 0.84), (0.34, 0.84), (0.34, 0.9), (0.2, 0.9)])
            lines += [[(0.18, 0.84), (0.9, 0.84)], [(0.2, H + 0.05), (0.52, H + 0.05)]]
        else:  # heels
            hh = {"low": .06, "mid": .14, "high": .24}[h]
            back = 0.8 - hh
            polys.append([(0.12, back - 0.16), (0.14, back), (0.46, 0.74), (0.92, 0.82), (0.92, 0.72),
                          (0.62, 0.62), (0.4, back - 0.08)])
            polys.append([(0.13, back), (0.2, back), (0.18, 0.86), (0.15, 0.86)])
    else:  # bag
        x0, y0, x1, y1 = {"small": (0.32, 0.50, 0.68, 0.80), "medium": (0.25, 0.42, 0.75, 0.85),
                          "large": (0.15, 0.35, 0.85, 0.92)}[a["size"]]
        polys.append([(x0, y0), (x1, y0), (x1, y1), (x0, y1)])
        rings.append(("handle", x0 + 0.08 * (x1 - x0) / 0.5, y0 - 0.22, x1 - 0.08 * (x1 - x0) / 0.5, y0 + 0.12))
        lines.append([(x0, y0 + 0.1), (x1, y0 + 0.1)])
    return polys, cuts, lines, rings


def _pattern_layer(colour: str, pattern: str, n: int) -> Image.Image:
    """An n x n fill of the colour with its pattern drawn in a contrasting shade."""
    c = COLOURS[colour]
    img = Image.new("RGB", (n, n), c)
    lum = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
    k = tuple(int(v * 0.45) for v in c) if lum > 120 else tuple(int(v * 0.45 + 140) for v in c)
    d = ImageDraw.Draw(img)
    if pattern == "striped":
        for y in range(0, n, 6):
            d.rectangle([0, y, n, y + 1], fill=k)
    elif pattern == "checked":
        for t in range(0, n, 8):
            d.rectangle([t, 0, t + 1, n], fill=k)
            d.rectangle([0, t, n, t + 1], fill=k)
    elif pattern == "dotted":
        for y in range(2, n, 7):
            for x in range(2 + (y // 7 % 2) * 3, n, 7):
                d.ellipse([x, y, x + 2, y + 2], fill=k)
    elif pattern == "diagonal":
        for t in range(-n, n, 7):
            d.line([(t, 0), (t + n, n)], fill=k, width=2)
    elif pattern == "zigzag":
        for y in range(3, n, 8):
            d.line([(x, y + (3 if (x // 4) % 2 else 0)) for x in range(0, n + 4, 4)], fill=k, width=1)
    return img


_SPRITES: dict = {}


def garment_sprite(item, n: int = SYN_SIZE) -> tuple[Image.Image, Image.Image]:
    """(RGB garment, L mask) of an item drawn on an n x n canvas (cached per process)."""
    key = (item, n)
    if key in _SPRITES:
        return _SPRITES[key]
    polys, cuts, lines, rings = _shape(item)
    m = 0.08 * n  # margin
    P = lambda pts: [(m + u * (n - 2 * m), m + v * (n - 2 * m)) for u, v in pts]  # noqa: E731
    mask = Image.new("L", (n, n), 0)
    md = ImageDraw.Draw(mask)
    for p in polys:
        md.polygon(P(p), fill=255)
    for r in rings:
        if r[0] == "handle":
            (a, b), (c, d) = P([r[1:3], r[3:5]])
            md.arc([a, b, c, d], 180, 360, fill=255, width=max(2, n // 24))
        else:
            (a, b), (c, d) = P([r[:2], r[2:]])
            md.ellipse([a, b, c, d], fill=0)
    for p in cuts:
        md.polygon(P(p), fill=0)
    img = _pattern_layer(item[1], item[2], n)
    # outline = mask edges, drawn dark so white garments stay visible on a light background
    edge = mask.filter(ImageFilter.FIND_EDGES).point(lambda v: 255 if v > 60 else 0)
    img.paste((45, 45, 45), mask=edge)
    d = ImageDraw.Draw(img)
    for ln in lines:
        d.line(P(ln), fill=(55, 55, 55), width=1)
    _SPRITES[key] = (img, mask)
    if len(_SPRITES) > 4096:
        _SPRITES.clear()
    return img, mask


def _rng_for(seed: int, path: str) -> random.Random:
    """Per-file RNG: the bytes of a file depend only on (seed, its path), not on job order."""
    return random.Random(zlib.crc32(f"{seed}|{path}".encode()))


def _transformed(item, rng: random.Random, scale: float, angle: float, n=SYN_SIZE):
    img, mask = garment_sprite(item, n)
    s = max(4, int(round(n * scale)))
    img, mask = img.resize((s, s), Image.BILINEAR), mask.resize((s, s), Image.BILINEAR)
    if angle:
        img = img.rotate(angle, Image.BILINEAR, fillcolor=(0, 0, 0))
        mask = mask.rotate(angle, Image.BILINEAR, fillcolor=0)
    return img, mask


def render_product(item, view: int = 0) -> Image.Image:
    """Flat product photo on a plain background; view 1 = mirrored, tilted second shot."""
    img, mask = garment_sprite(item)
    bg = Image.new("RGB", (SYN_SIZE, SYN_SIZE), (244, 244, 244) if view == 0 else (226, 232, 238))
    if view:
        img, mask = ImageOps.mirror(img), ImageOps.mirror(mask)
        img = img.rotate(9, Image.BILINEAR, fillcolor=(0, 0, 0))
        mask = mask.rotate(9, Image.BILINEAR, fillcolor=0)
    bg.paste(img, mask=mask)
    return bg


_REGIONS = {"top": (14, 14, 50, 46), "outerwear": (11, 12, 53, 58), "dress": (13, 13, 51, 63),
            "bottom": (15, 32, 49, 64), "shoes": (22, 48, 44, 64), "bag": (36, 30, 62, 56)}


def render_tryon(item, dx: int = 0, dy: int = 0, bg=(226, 229, 222), stripes: int = -1) -> Image.Image:
    """The item worn by a simple figure (head, limbs, neutral filler garments)."""
    im = Image.new("RGB", (SYN_SIZE, SYN_SIZE), bg)
    d = ImageDraw.Draw(im)
    if stripes >= 0:  # moving background for video frames
        for x in range(-16, SYN_SIZE + 16, 16):
            d.rectangle([x + stripes, 0, x + stripes + 5, SYN_SIZE], fill=tuple(max(0, v - 25) for v in bg))
    skin, filler = (222, 184, 152), (150, 150, 158)
    slot = CATEGORIES[item[0]][0]
    d.ellipse([27 + dx, 1 + dy, 37 + dx, 12 + dy], fill=skin)                       # head
    d.line([(22 + dx, 18 + dy), (13 + dx, 44 + dy)], fill=skin, width=3)            # arms
    d.line([(42 + dx, 18 + dy), (51 + dx, 44 + dy)], fill=skin, width=3)
    d.line([(27 + dx, 44 + dy), (25 + dx, 62 + dy)], fill=skin, width=4)            # legs
    d.line([(37 + dx, 44 + dy), (39 + dx, 62 + dy)], fill=skin, width=4)
    if slot not in ("top", "dress", "outerwear"):
        d.rectangle([22 + dx, 13 + dy, 42 + dx, 40 + dy], fill=filler)
    if slot not in ("bottom", "dress"):
        d.rectangle([22 + dx, 38 + dy, 42 + dx, 58 + dy], fill=(90, 90, 100))
    x0, y0, x1, y1 = _REGIONS[slot]
    img, mask = garment_sprite(item)
    w, h = x1 - x0, y1 - y0
    im.paste(img.resize((w, h), Image.BILINEAR), (x0 + dx, y0 + dy), mask.resize((w, h), Image.BILINEAR))
    return im


def random_item(rng: random.Random, cats=None):
    """A garment with every factor drawn uniformly: (category, colour, pattern, attribute values).

    `cats` limits the categories (default: all). The generator draws every random item through this
    function, and notebook 06 uses it to probe what the embedding encodes.
    """
    cat = rng.choice(cats or sorted(CATEGORIES))
    return (cat, rng.choice(sorted(COLOURS)), rng.choice(PATTERNS),
            tuple(rng.choice(ATTRIBUTES[a]) for a in CATEGORIES[cat][1]))


def render_street(item, rng: random.Random) -> Image.Image:
    """Street photo: cluttered background, other garments around, scale/rotation/crop jitter."""
    bgc = tuple(rng.randint(60, 200) for _ in range(3))
    im = Image.new("RGB", (SYN_SIZE, SYN_SIZE), bgc)
    d = ImageDraw.Draw(im)
    for _ in range(rng.randint(6, 12)):  # clutter: walls, windows, cars, people as blobs
        x, y = rng.randint(-10, 60), rng.randint(-10, 60)
        w, h = rng.randint(6, 30), rng.randint(6, 30)
        col = tuple(rng.randint(0, 255) for _ in range(3))
        (d.rectangle if rng.random() < 0.6 else d.ellipse)([x, y, x + w, y + h], fill=col)
    for _ in range(rng.randint(1, 2)):  # other garments (partly visible)
        o = random_item(rng)
        img, mask = _transformed(o, rng, rng.uniform(0.3, 0.5), rng.uniform(-30, 30))
        im.paste(img, (rng.choice((-8, 40)) + rng.randint(-4, 4), rng.randint(-8, 40)), mask)
    img, mask = _transformed(item, rng, rng.uniform(0.62, 0.9), rng.uniform(-22, 22))
    s = img.size[0]
    im.paste(img, ((SYN_SIZE - s) // 2 + rng.randint(-7, 7), (SYN_SIZE - s) // 2 + rng.randint(-7, 7)), mask)
    c = rng.randint(50, 64)  # crop jitter, then back to 64 x 64
    x, y = rng.randint(0, SYN_SIZE - c), rng.randint(0, SYN_SIZE - c)
    return im.crop((x, y, x + c, y + c)).resize((SYN_SIZE, SYN_SIZE), Image.BILINEAR)


def render_sketch(item, rng: random.Random) -> Image.Image:
    """Sketch: grey-level edges only (outline, details, pattern strokes), never the colour."""
    img, mask = _transformed(item, rng, rng.uniform(0.88, 1.0), rng.uniform(-6, 6))
    canvas = Image.new("L", (SYN_SIZE, SYN_SIZE), 0)
    s = img.size[0]
    off = ((SYN_SIZE - s) // 2 + rng.randint(-3, 3), (SYN_SIZE - s) // 2 + rng.randint(-3, 3))
    canvas.paste(img.convert("L"), off, mask)
    m = Image.new("L", (SYN_SIZE, SYN_SIZE), 0)
    m.paste(mask, off)
    # edges of the luminance inside the garment plus the garment outline; binarised so the
    # stroke darkness carries no colour information
    e = canvas.filter(ImageFilter.FIND_EDGES).point(lambda v: 255 if v > 40 else 0)
    o = m.point(lambda v: 255 if v > 127 else 0).filter(ImageFilter.FIND_EDGES)
    lines = Image.eval(Image.composite(Image.new("L", e.size, 255), e, o), lambda v: v)
    ink = rng.randint(20, 90)
    out = Image.new("L", (SYN_SIZE, SYN_SIZE), 255)
    out.paste(ink, mask=lines)
    return out.convert("RGB")


def render_video(item, rng: random.Random, n_frames: int = 8) -> list[Image.Image]:
    """A short clip: the figure wearing the item walks across a panning background."""
    bg = tuple(rng.randint(150, 235) for _ in range(3))
    x0, x1 = sorted((rng.randint(-10, -2), rng.randint(2, 10)))
    if rng.random() < 0.5:
        x0, x1 = x1, x0
    frames = []
    for t in range(n_frames):
        a = t / max(1, n_frames - 1)
        dx = int(round(x0 + (x1 - x0) * a))
        dy = int(round(1.5 * math.sin(a * 2 * math.pi * 2)))  # walking bob
        frames.append(render_tryon(item, dx, dy, bg, stripes=(t * 3) % 16))
    return frames


def _render_job(args) -> None:
    """Render one file of the synthetic set (runs in worker processes)."""
    out, seed, rel, spec = args
    kind, item = spec[0], spec[1]
    rng = _rng_for(seed, rel)
    path = os.path.join(out, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if kind == "video":
        fr = render_video(item, rng)
        pal = [f.quantize(colors=64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE) for f in fr]
        pal[0].save(path, format="GIF", save_all=True, append_images=pal[1:], duration=100, loop=0,
                    optimize=False, disposal=1)
        return
    img = {"product": lambda: render_product(item, 0), "view2": lambda: render_product(item, 1),
           "tryon": lambda: render_tryon(item), "street": lambda: render_street(item, rng),
           "sketch": lambda: render_sketch(item, rng)}[kind]()
    img.save(path, format="PNG", optimize=False, compress_level=6)


def _render_chunk(chunk) -> int:
    for job in chunk:
        _render_job(job)
    return len(chunk)


# ---- the plan: which records, galleries and images make up the synthetic U-FIRE ---------------

@dataclass(frozen=True)
class SynthSpec:
    """One synthetic sub-dataset: task, name, file prefix, item categories, sizes at scale 1."""
    task: str
    dataset: str
    prefix: int          # file-ordering number, as in the real file names (not the task number)
    cats: tuple          # categories its items are drawn from
    train: int           # train records at scale 1.0 (sizes deliberately uneven, >= 10x apart)
    test: int            # test queries at scale 1.0
    val: int = 50        # val queries at scale 1.0
    fill_cats: tuple = ()  # categories for random gallery filler (default: cats)


_CLOTHES = ("t-shirt", "shirt", "sweater", "trousers", "shorts", "skirt", "dress", "coat", "jacket")
_SHOES = ("sneakers", "boots", "heels")
SYNTH_SUBSETS = (
    SynthSpec("t2i", "SynGen", 1, _CLOTHES + _SHOES + ("bag",), 1500, 120),
    SynthSpec("t2i", "SynShoes", 1, _SHOES, 200, 60),
    SynthSpec("sketch2i", "SynSketch", 2, _CLOTHES, 800, 120),
    # a sketch hides colour, so only 54 shoe shapes exist: clothes fill the gallery up to size
    SynthSpec("sketch2i", "SynSketchShoe", 2, _SHOES, 150, 40, 30, fill_cats=tuple(CATEGORIES)),
    SynthSpec("inshop", "SynInshop", 3, _CLOTHES, 1200, 120),
    SynthSpec("street2shop", "SynStreet", 4, _CLOTHES + _SHOES + ("bag",), 1000, 120),
    SynthSpec("compatibility", "SynOutfit", 5, tuple(CATEGORIES), 1200, 120),
    SynthSpec("video2img", "SynVideo", 6, _CLOTHES, 400, 100),
    SynthSpec("cir", "SynCIR-Top", 7, ("t-shirt", "shirt", "sweater"), 2000, 150),
    SynthSpec("cir", "SynCIR-Dress", 7, ("dress",), 1000, 120),
    SynthSpec("cir", "SynCIR-Shoes", 7, _SHOES, 300, 80),
    SynthSpec("sketch&text", "SynSketchText", 8, _CLOTHES, 600, 100),
    SynthSpec("asfr", "SynAttr", 9, _CLOTHES, 1500, 120),
)
GALLERY_MIN = 550  # test gallery size floor at scale 1.0 (>= 500 images per sub-dataset)
SHOP = "SynShop_images"


class _Planner:
    """Builds every record, gallery and image job of the synthetic set (pure Python, seeded)."""

    def __init__(self, seed: int, scale: float):
        self.seed, self.scale = seed, scale
        self.jobs: dict[str, tuple] = {}     # relative path -> render spec
        self.files: dict[str, object] = {}   # relative path -> JSON content

    # items are "held out" (test/val targets only) by a seeded hash, so test products are unseen
    def held_out(self, item) -> bool:
        return zlib.crc32(f"{self.seed}|{item_code(item)}".encode()) % 5 == 0

    def item(self, rng, cats, held: Optional[bool]):
        while True:
            it = random_item(rng, list(cats))
            if held is None or self.held_out(it) == held:
                return it

    def n(self, k: int, lo: int = 4) -> int:
        return max(lo, int(round(k * self.scale)))

    # ---- image paths (registering the render job) ----
    def img(self, kind: str, item, k: int = 0, folder: str = "") -> str:
        code = item_code(item)
        rel = {"product": f"{SHOP}/product+{code}.png", "view2": f"{SHOP}/view2+{code}.png",
               "tryon": f"SynInshop_images/tryon+{code}.png",
               "street": f"SynStreet_images/street+{code}+{k}.png",
               "sketch": f"SynSketch_images/sketch+{code}+{k}.png",
               "video": f"SynVideo_videos/video+{code}+{k}.gif"}[kind]
        if folder:  # OOD tasks keep their images inside their own folder
            rel = f"{folder}/{os.path.basename(rel)}"
        self.jobs[rel] = (kind, item)
        return rel

    def gallery_fill(self, rng, spec, positives_items, n_pos_images, views, factors=None, key=None,
                     per_target=4, exclude=()):
        """Distractor items: one-factor neighbours of each target first, then random items."""
        key = key or (lambda it: it)
        used = {key(t) for t in positives_items} | {key(t) for t in exclude}
        out = []
        for t in positives_items:
            nb = neighbours(t, factors)
            rng.shuffle(nb)
            added = 0
            for it in nb:
                if added >= per_target:
                    break
                if key(it) not in used and it[0] in spec.cats:
                    used.add(key(it))
                    out.append(it)
                    added += 1
        need = self.n(GALLERY_MIN, 16)
        tries = 0
        while n_pos_images + len(out) * len(views) < need and tries < 200000:
            tries += 1
            it = random_item(rng, list(spec.fill_cats or spec.cats))
            if key(it) not in used:
                used.add(key(it))
                out.append(it)
        return out

    def triplets(self, spec: SynthSpec, split: str, recs: list[dict]) -> None:
        for i, r in enumerate(recs):
            r_ordered = {"id": f"{spec.task}_{spec.dataset}_{split}_{i + 1:07d}", "task": r.pop("task", spec.task),
                         "dataset": spec.dataset, "split": split}
            r_ordered.update(r)
            recs[i] = r_ordered
        self.files[f"0_triplet_files/{spec.prefix}_{spec.task}_{spec.dataset}_{split}_triplet_data.json"] = recs

    def gallery_file(self, spec: SynthSpec, paths: list[str], rng) -> None:
        paths = list(paths)
        rng.shuffle(paths)
        self.files[f"0_test_candidates/{spec.prefix}_{spec.task}_{spec.dataset}_test_candidates.json"] = paths

    def instr(self, task: str, rng, **kw) -> str:
        return rng.choice(TASKS[task].instructions).format(**kw)

    # ---- per task -----------------------------------------------------------------------------
    def plan(self) -> None:
        for spec in SYNTH_SUBSETS:
            getattr(self, "plan_" + spec.task.replace("&", "_"))(spec)
        self.plan_ood()

    def _unique_targets(self, rng, spec, count, held, key=None):
        key = key or (lambda it: it)
        seen, out = set(), []
        for _ in range(count * 50):
            if len(out) >= count:
                break
            it = self.item(rng, spec.cats, held)
            if key(it) not in seen:
                seen.add(key(it))
                out.append(it)
        return out

    def _simple(self, spec, make_query, target_views, key=None, factors=None, multi=None):
        """Tasks of the form query(item) -> views of the same item (t2i, sketch2i, street2shop, video)."""
        rng = random.Random(f"{self.seed}|{spec.task}|{spec.dataset}")
        for split, count, held in (("train", self.n(spec.train, 8), False),
                                   ("val", self.n(spec.val, 4), True), ("test", self.n(spec.test, 8), True)):
            items = self._unique_targets(rng, spec, count, held, key) if split != "train" else \
                [self.item(rng, spec.cats, False) for _ in range(count)]
            recs = []
            for it in items:
                r = make_query(it, rng, split)
                r["target_image"] = [self.img(v, it) for v in target_views]
                recs.append(r)
            self.triplets(spec, split, recs)
            if split == "test":
                pos_imgs = [p for r in recs for p in r["target_image"]]
                dis = self.gallery_fill(rng, spec, items, len(pos_imgs), target_views, factors, key)
                self.gallery_file(spec, pos_imgs + [self.img(v, it) for it in dis for v in target_views], rng)

    def plan_t2i(self, spec):
        def q(it, rng, split):
            text = caption(it, rng)
            return {"query_text": text, "instruction_text": self.instr("t2i", rng, text=text)}
        # SynGen: one text, two views (like FashionGen); SynShoes: one view
        self._simple(spec, q, ("product", "view2") if spec.dataset == "SynGen" else ("product",))

    def plan_sketch2i(self, spec):
        def q(it, rng, split):
            k = 3 if split == "train" else rng.choice((1, 2))  # several sketches = one query
            return {"query_image": [self.img("sketch", it, j) for j in range(k)],
                    "instruction_text": self.instr("sketch2i", rng)}
        # a sketch shows no colour: the gallery never holds two items that differ only in colour
        nocol = lambda it: (it[0], it[2], it[3])  # noqa: E731
        self._simple(spec, q, ("product",), key=nocol, factors=["category", "pattern"] + list(ATTRIBUTES))

    def plan_street2shop(self, spec):
        def q(it, rng, split):
            k = rng.choice((1, 1, 2, 3))
            return {"task": "street2shop-one-query" if k == 1 else "street2shop-multi-query",
                    "query_image": [self.img("street", it, j) for j in range(k)],
                    "instruction_text": self.instr("street2shop", rng)}
        self._simple(spec, q, ("product",))

    def plan_video2img(self, spec):
        def q(it, rng, split):
            return {"query_video": [self.img("video", it, 0)], "instruction_text": self.instr("video2img", rng)}
        self._simple(spec, q, ("product",))

    def plan_sketch_text(self, spec):
        def q(it, rng, split):
            text = rng.choice((f"in {it[1]}", f"coloured {it[1]}", f"and it should be {it[1]}"))
            return {"query_image": [self.img("sketch", it, 0)], "query_text": text,
                    "instruction_text": self.instr("sketch&text", rng, text=text)}
        # colour comes from the text: colour neighbours are the hardest distractors here
        self._simple(spec, q, ("product",), factors=["colour", "colour", "category", "pattern"] + list(ATTRIBUTES))

    def plan_inshop(self, spec):
        rng = random.Random(f"{self.seed}|{spec.task}|{spec.dataset}")
        views = ("product", "view2", "tryon")
        variants = (("inshop", "product", ("view2", "tryon")), ("inshop-tryon", "tryon", ("product", "view2")),
                    ("inshop-plain", "view2", ("product",)))
        for split, count, held in (("train", self.n(spec.train, 8), False),
                                   ("val", self.n(spec.val, 4), True), ("test", self.n(spec.test, 8), True)):
            items = self._unique_targets(rng, spec, count, held)
            recs, pos_imgs = [], []
            for it in items:
                task, qv, tv = rng.choice(variants)
                recs.append({"task": task, "query_image": [self.img(qv, it)],
                             "instruction_text": self.instr("inshop", rng),
                             "target_image": [self.img(v, it) for v in tv]})
                pos_imgs += recs[-1]["target_image"]
            self.triplets(spec, split, recs)
            if split == "test":  # the query photo itself is not in the gallery
                dis = self.gallery_fill(rng, spec, items, len(pos_imgs), views, per_target=1)
                self.gallery_file(spec, pos_imgs + [self.img(v, it) for it in dis for v in views], rng)

    def plan_cir(self, spec):
        rng = random.Random(f"{self.seed}|{spec.task}|{spec.dataset}")
        for split, count, held in (("train", self.n(spec.train, 8), False),
                                   ("val", self.n(spec.val, 4), True), ("test", self.n(spec.test, 8), True)):
            targets = self._unique_targets(rng, spec, count, held) if split != "train" else \
                [self.item(rng, spec.cats, False) for _ in range(count)]
            recs, refs = [], []
            for b in targets:
                facs = [f for f in item_factors(b) if len(factor_values(b, f)) > 1]
                a = b
                for f in rng.sample(facs, 2 if rng.random() < 0.25 else 1):  # 1 or 2 modified factors
                    a = _item_set(a, f, rng.choice([v for v in factor_values(b, f) if v != item_value(b, f)]))
                refs.append(a)
                text = modification_text(a, b, rng)
                recs.append({"query_image": [self.img("product", a)], "query_text": text,
                             "instruction_text": self.instr("cir", rng, text=text),
                             "target_image": [self.img("product", b)]})
            self.triplets(spec, split, recs)
            if split == "test":
                # the reference is a hard negative: cir keeps everything except the modified factor
                ref_imgs = [self.img("product", a) for a in refs if a not in set(targets)]
                dis = self.gallery_fill(rng, spec, targets, len(targets) + len(set(ref_imgs)), ("product",),
                                        exclude=refs)
                gal = [self.img("product", b) for b in targets] + ref_imgs + [self.img("product", it) for it in dis]
                self.gallery_file(spec, list(dict.fromkeys(gal)), rng)

    def outfit(self, rng, held_target: Optional[bool]):
        """An outfit that obeys the rules: one item per slot, harmonious colours, <= 1 pattern."""
        while True:
            tmpl = rng.choice(OUTFIT_TEMPLATES)
            cols = [rng.choice(sorted(COLOURS)) for _ in tmpl]
            if not colours_compatible(cols):
                continue
            pat_slot = rng.randrange(len(tmpl)) if rng.random() < 0.6 else -1
            items = []
            for j, slot in enumerate(tmpl):
                cat = rng.choice([c for c, (s, _) in CATEGORIES.items() if s == slot])
                items.append((cat, cols[j], rng.choice(PATTERNS[1:]) if j == pat_slot else "plain",
                              tuple(rng.choice(ATTRIBUTES[a]) for a in CATEGORIES[cat][1])))
            t = rng.randrange(len(items))
            if held_target is None or self.held_out(items[t]) == held_target:
                return items, t

    def incompatible(self, rng, rest, tgt, n):
        """Items of the target's category that break a rule w.r.t. the rest of the outfit."""
        out = []
        bad_cols = [c for c in sorted(COLOURS) if not colours_compatible([i[1] for i in rest] + [c])]
        for c in rng.sample(bad_cols, min(len(bad_cols), n)):
            out.append(_item_set(tgt, "colour", c))
        if any(i[2] != "plain" for i in rest):  # a second pattern clashes
            out.append(_item_set(tgt, "pattern", rng.choice(PATTERNS[1:])))
        return out

    def plan_compatibility(self, spec):
        rng = random.Random(f"{self.seed}|{spec.task}|{spec.dataset}")
        for split, count, held in (("train", self.n(spec.train, 8), False),
                                   ("val", self.n(spec.val, 4), True), ("test", self.n(spec.test, 8), True)):
            recs, targets, dis = [], [], []
            for _ in range(count):
                items, t = self.outfit(rng, held)
                tgt, rest = items[t], items[:t] + items[t + 1:]
                slot = CATEGORIES[tgt[0]][0]
                recs.append({"task": f"compatibility-{slot}", "query_image": [self.img("product", i) for i in rest],
                             "instruction_text": self.instr("compatibility", rng, category=tgt[0]),
                             "target_image": [self.img("product", tgt)]})
                if split == "train":  # rule-breaking hard negatives, as the format allows
                    recs[-1]["negative_image"] = [self.img("product", i) for i in self.incompatible(rng, rest, tgt, 2)]
                targets.append(tgt)
                dis += self.incompatible(rng, rest, tgt, 3)
            self.triplets(spec, split, recs)
            if split == "test":
                tset = set(targets)
                dis = [d for d in dict.fromkeys(dis) if d not in tset]
                extra = self.gallery_fill(rng, spec, [], len(set(targets)) + len(dis), ("product",),
                                          exclude=list(tset) + dis)
                gal = [self.img("product", i) for i in targets + dis + extra]
                self.gallery_file(spec, list(dict.fromkeys(gal)), rng)

    def plan_asfr(self, spec):
        rng = random.Random(f"{self.seed}|{spec.task}|{spec.dataset}")
        attrs = ["pattern"] + [a for a in ATTRIBUTES if any(a in CATEGORIES[c][1] for c in spec.cats)]
        label = lambda a, v: f"{spec.dataset}+{a}+{v}"  # noqa: E731

        def labels_of(it):
            vals = {"pattern": it[2], **item_attrs(it)}
            return [label(a, vals[a]) for a in attrs if a in vals]

        def pool(n_items, held):
            items = self._unique_targets(rng, spec, n_items, held)
            by_label: dict[str, list[str]] = {}
            for it in items:
                for lab in labels_of(it):
                    by_label.setdefault(lab, []).append(self.img("product", it))
            return items, by_label

        for split, count, held in (("train", self.n(spec.train, 8), False),
                                   ("val", self.n(spec.val, 4), True), ("test", self.n(spec.test, 8), True)):
            n_pool = self.n(GALLERY_MIN, 16) if split == "test" else (self.n(200, 16) if split == "val" else self.n(400, 16))
            pitems, by_label = pool(n_pool, None if split == "train" else held)
            recs = []
            pset = set(pitems)
            for _ in range(count):
                q = self.item(rng, spec.cats, None if split == "train" else held)
                while q in pset:
                    q = self.item(rng, spec.cats, None if split == "train" else held)
                a = rng.choice([x for x in attrs if x == "pattern" or x in item_attrs(q)])
                v = q[2] if a == "pattern" else item_attrs(q)[a]
                lab = label(a, v)
                pos = by_label.get(lab, [])
                others = [p for lb in sorted(by_label) if lb.startswith(f"{spec.dataset}+{a}+") and lb != lab
                          for p in by_label[lb]]
                view = rng.choice(("product", "tryon"))
                r = {"query_image": [self.img(view, q)], "attribute": a, "target_label": lab,
                     "instruction_text": self.instr("asfr", rng, attribute=a),
                     "target_image": rng.sample(pos, min(5, len(pos))) if split == "train" else list(pos[:3])}
                if not r["target_image"]:
                    continue
                if others:
                    r["negative_image"] = rng.sample(others, min(3, len(others)))
                recs.append(r)
            self.triplets(spec, split, recs)
            if split != "train":  # label-keyed gallery, plus the special full-gallery key
                gal = {lb: by_label[lb] for lb in sorted(by_label)}
                full = [self.img("product", it) for it in pitems]
                rng.shuffle(full)
                gal[f"{spec.dataset}_asfr_{split}_candidate"] = full
                folder = "0_test_candidates" if split == "test" else "0_triplet_files"
                self.files[f"{folder}/{spec.prefix}_asfr_{spec.dataset}_{split}_candidate_data.json"] = gal

    def plan_ood(self):
        # Image(s)+Text 2 Compatible Item: outfit images + a text describing the wanted item
        name = OOD_TASKS[0]
        folder = f"evaluation_only_tasks/{name}"
        rng = random.Random(f"{self.seed}|ood|{name}")
        recs, gal, targets = [], [], []
        for i in range(self.n(150, 8)):
            items, t = self.outfit(rng, True)
            tgt, rest = items[t], items[:t] + items[t + 1:]
            text = caption(tgt, rng).removeprefix("a ")
            q = [self.img("product", it, folder=folder) for it in rest]
            recs.append({"id": f"{i + 1:07d}", "query_image": [os.path.basename(p) for p in q], "query_text": text,
                         "instruction_text": self.instr(name, rng, text=text),
                         "target_image": [os.path.basename(self.img("product", tgt, folder=folder))],
                         "category": CATEGORIES[tgt[0]][0]})
            gal += recs[-1]["query_image"] + recs[-1]["target_image"]  # real file also lists query items
            targets.append(tgt)
        dis = self.gallery_fill(rng, SynthSpec("", "", 0, tuple(CATEGORIES), 0, 0), targets, len(gal),
                                ("product",), per_target=2)
        gal += [os.path.basename(self.img("product", it, folder=folder)) for it in dis]
        self.files[f"{folder}/triplet_data.json"] = recs
        self.files[f"{folder}/candidate_images.json"] = list(dict.fromkeys(gal))
        # Street+Modification Text 2 Shop: street photo of A + modification text -> shop image of B
        name = OOD_TASKS[1]
        folder = f"evaluation_only_tasks/{name}"
        rng = random.Random(f"{self.seed}|ood|{name}")
        spec = SynthSpec("", "", 0, _CLOTHES, 0, 0)
        recs, targets, refs = [], [], []
        for i, b in enumerate(self._unique_targets(rng, spec, self.n(120, 8), True)):
            f = rng.choice([f for f in item_factors(b) if len(factor_values(b, f)) > 1])
            a = _item_set(b, f, rng.choice([v for v in factor_values(b, f) if v != item_value(b, f)]))
            text = modification_text(a, b, rng)
            recs.append({"id": f"{i + 1:07d}",
                         "query_image": [os.path.basename(self.img("street", a, 0, folder=folder))],
                         "query_text": text, "instruction_text": self.instr(name, rng, text=text),
                         "target_image": [os.path.basename(self.img("product", b, folder=folder))],
                         "category": b[0]})
            targets.append(b)
            refs.append(a)
        dis = self.gallery_fill(rng, spec, targets, len(targets) + len(refs), ("product",), exclude=refs)
        gal = [os.path.basename(self.img("product", it, folder=folder)) for it in targets + refs + dis]
        gal = list(dict.fromkeys(gal))
        rng.shuffle(gal)
        self.files[f"{folder}/triplet_data.json"] = recs
        self.files[f"{folder}/candidate_images.json"] = gal


INFO_FILE = "synthetic_info.json"


def generate_synthetic(out, seed: int = 0, scale: float = 1.0, workers: Optional[int] = None,
                       verbose: bool = True) -> dict:
    """Write a synthetic U-FIRE to `out` atomically (temp dir + rename); return its summary.

    The bytes depend only on (seed, scale): every file's random stream is seeded from its own
    path, JSON is written in a fixed order and PNGs with fixed save parameters, so the number of
    worker processes does not matter.
    """
    out = os.path.abspath(str(out))
    t0 = time.time()
    plan = _Planner(seed, scale)
    plan.plan()
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".synthetic-tmp-", dir=parent)
    try:
        jobs = [(tmp, seed, rel, plan.jobs[rel]) for rel in sorted(plan.jobs)]
        for d in sorted({os.path.dirname(os.path.join(tmp, j[2])) for j in jobs}):
            os.makedirs(d, exist_ok=True)
        workers = workers or min(2, os.cpu_count() or 1)
        chunks = [jobs[i::64] for i in range(64)]  # interleaved chunks balance the cost
        if workers > 1:
            import multiprocessing as mp
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            with ctx.Pool(workers) as pool:
                for _ in pool.imap_unordered(_render_chunk, chunks):
                    pass
        else:
            for c in chunks:
                _render_chunk(c)
        for rel in sorted(plan.files):
            p = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "w", encoding="utf-8") as f:
                json.dump(plan.files[rel], f, indent=1, ensure_ascii=False)
                f.write("\n")
        info = {"version": SYN_VERSION, "seed": seed, "scale": scale, "images": len(jobs),
                "subsets": {f"{s.task}/{s.dataset}": {sp: len(plan.files[f"0_triplet_files/{s.prefix}_{s.task}_{s.dataset}_{sp}_triplet_data.json"])
                                                      for sp in _SPLITS} for s in SYNTH_SUBSETS}}
        with open(os.path.join(tmp, INFO_FILE), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1, sort_keys=True)
        # atomic publish: move any old copy aside, rename the finished temp dir into place
        old = None
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix=".synthetic-old-", dir=parent)
            os.replace(out, os.path.join(old, "x"))
        os.replace(tmp, out)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verbose:
        print(f"synthetic U-FIRE (seed {seed}, scale {scale}): {len(jobs)} images, "
              f"{len(plan.files)} JSON files -> {out} in {time.time() - t0:.1f}s")
    return info


def ensure_synthetic(path="data/synthetic", seed: int = 0, scale: float = 1.0) -> str:
    """Generate the synthetic U-FIRE once if absent (or made with another seed/scale); return the root.

    A relative path is taken relative to this repository (so notebooks in notebooks/ and scripts
    run from elsewhere share the same data/synthetic).
    """
    p = Path(path)
    if not p.is_absolute():
        p = Path(__file__).resolve().parent / p
    info = p / INFO_FILE
    if info.is_file():
        try:
            meta = json.loads(info.read_text())
            if (meta.get("seed"), meta.get("scale"), meta.get("version")) == (seed, scale, SYN_VERSION):
                return str(p)
        except (json.JSONDecodeError, OSError):
            pass
    elif p.exists() and any(p.iterdir()):
        raise UFireError(f"{p} exists but is not a synthetic U-FIRE (no {INFO_FILE}); "
                         "remove it or pick another path")
    generate_synthetic(p, seed, scale)
    return str(p)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def _tour() -> None:
    root = ensure_synthetic("data/synthetic")
    uf = UFire(root)
    print(f"U-FIRE root: {root}\n")
    print(f"{'sub-dataset':36s} {'train':>6s} {'val':>5s} {'test':>5s} {'gallery':>8s}")
    for s in uf.subsets("test"):
        v = uf.eval_view(s)
        print(f"{s:36s} {len(uf.records(s, 'train')):6d} {len(uf.records(s, 'val')):5d} "
              f"{len(v.records):5d} {len(v.gallery):8d}")
    for s in uf.ood_subsets():
        v = uf.eval_view(s)
        print(f"{s:36s} {'-':>6s} {'-':>5s} {len(v.records):5d} {len(v.gallery):8d}")
    r = uf.records("cir/SynCIR-Top", "test")[0]
    q = record_to_query(r, 64)
    print("\nexample record (cir/SynCIR-Top, test #0):")
    print(json.dumps({k: v for k, v in dataclasses.asdict(r).items() if v not in (None, [], "")}, indent=1))
    print(f"-> Query(instruction={q.instruction!r}, images={[im.size for im in q.images]}, frames={len(q.frames)})")
    print("\nNext: `python data.py check --root data/synthetic`, then train.py / evaluate.py.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="U-FIRE data layer: check a root, write the synthetic set, or tour.")
    sub = ap.add_subparsers(dest="cmd")
    c = sub.add_parser("check", help="validate a U-FIRE root (exit 1 when anything is missing)")
    c.add_argument("--root", required=True)
    s = sub.add_parser("synth", help="write the synthetic U-FIRE")
    s.add_argument("--out", default="data/synthetic")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--scale", type=float, default=1.0)
    s.add_argument("--workers", type=int, default=None)
    a = ap.parse_args(argv)
    try:
        if a.cmd == "check":
            return 0 if check_root(a.root) else 1
        if a.cmd == "synth":
            generate_synthetic(os.path.abspath(a.out), a.seed, a.scale, a.workers)
            return 0
        _tour()
        return 0
    except UFireError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
