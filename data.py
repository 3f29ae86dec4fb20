"""U-FIRE on disk: the task registry, triplet records, the reader, and the training / evaluation views.

Concept
-------
FashionLens (Wen et al., 2026, "Toward Versatile Fashion Image Retrieval via Task-Adaptive
Learning") trains one retriever on U-FIRE, a union of 15 fashion datasets recast as retrieval
*triplets*: (instruction + query, target image(s)). The query may be text, one or more images, a
video, or a mix; the instruction says what to look for, so one model can serve every task. Nine task
words cover every query format (text, sketch, street photo, product photo, video, sketch+text,
image+modification text, outfit, image+attribute); two manually curated out-of-distribution (OOD)
tasks are test-only. ../shared/ufire/FORMAT.md describes the published files.

Where it sits: at the bottom of the core import graph (data -> model -> train / evaluate). It reads a
U-FIRE root exactly as published (no conversion step), loads images at their native size (the
model's processor resizes them within its pixel budget) and hands out
  * training pairs   (query, one target)                                    -- TrainView.pair
  * evaluation views (queries, de-duplicated gallery, positives as indices) -- EvalView
Which root it reads does not matter: the offline default is the synthetic U-FIRE (no images of the
real datasets can be shipped): 13 sub-datasets "task/Syn...", all 9 task words + both OOD tasks,
64x64 RGB PNGs, each video ONE animated GIF (8 frames, 100 ms each); instruction_text already
contains the query text; asfr positives = every gallery image under target_label.

Recall@K, the metric the evaluation views feed (evaluate.py computes it):
    R@K = (1/N) * sum_n 1[ topK(q_n) ∩ P_n != {} ]
where P_n is the positive set of query n (asfr: every gallery image filed under its label). A record
none of whose targets is in the gallery has no P_n: the view lists it in `missing` (not encoded), and
evaluate.py counts it in N as a miss, the authors' denominator (utils.py 113-134).

Run it
------
    python data.py                                   # tour: counts per task, one example record
    python data.py check --root ../shared/ufire      # exit 1 when anything is missing or unreadable
    python data.py check --root R --quick            # only test that the files exist (no decoding)
    python -m support.synthetic --out data/synthetic         # (re)write the synthetic U-FIRE

Decoding (other image modes, frame folders, WebP, mp4), the record type checks and `check` live in
support/ufire_files.py. Dependencies: standard library and Pillow only (no torch).
Shape legend: G gallery images, N scored queries of a view, k frames per video.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import sys
from dataclasses import dataclass, field
from typing import Optional

from PIL import Image

from support.errors import UFireError, run_cli
from support.ufire_files import (FRAME_LIST_FPS, check_file_records, check_record_json, check_root, read_clip,
                                 inside_root, list_dir, parse_data_flags, read_image, read_json,
                                 task_of_file)  # decoding, record checks, `check` and its flags

# --------------------------------------------------------------------------------------------
# Task registry
# --------------------------------------------------------------------------------------------

# The 9 U-FIRE task words; suffixed variants ("inshop-tryon") map to the word before the "-".
TASK_WORDS = ("t2i", "sketch2i", "street2shop", "inshop", "video2img",
              "sketch&text", "cir", "compatibility", "asfr")
# The 2 manually curated out-of-distribution tasks (folder names under evaluation_only_tasks/).
OOD_TASKS = ("Image(s)+Text 2 Compatible Item", "Street+Modification Text 2 Shop")
# How a query's several sketches of one item go into prompts: "one" per prompt | "all" in one prompt.
SKETCH_MODES = ("one", "all")


@dataclass(frozen=True)
class TaskSpec:
    """What a task's query and target look like (the instruction comes with each record)."""
    word: str                      # task word as in file names ("cir") or OOD folder name
    query_kind: str                # e.g. "text", "sketch", "image+text", "video", "images"
    target_kind: str               # "image" for every U-FIRE task
    pick_one_query: bool = False   # several query images are alternatives (sketches): draw one
    ood: bool = False              # evaluation-only task


TASKS: dict[str, TaskSpec] = {s.word: s for s in (
    TaskSpec("t2i", "text", "image"),
    TaskSpec("sketch2i", "sketch", "image", pick_one_query=True),
    TaskSpec("street2shop", "street photos", "image"),
    TaskSpec("inshop", "product photos", "image"),
    TaskSpec("video2img", "video", "image"),
    TaskSpec("sketch&text", "sketch+text", "image"),
    TaskSpec("cir", "image+modification text", "image"),
    TaskSpec("compatibility", "outfit images", "image"),
    TaskSpec("asfr", "image+attribute", "image"),
    TaskSpec(OOD_TASKS[0], "outfit images+text", "image", ood=True),
    TaskSpec(OOD_TASKS[1], "street photo+modification text", "image", ood=True),
)}


def base_task(task: str) -> str:
    """'inshop-tryon' -> 'inshop', 'sketch&text' -> itself, an OOD name -> itself; else UFireError."""
    if task in TASKS:
        return task
    head = task.split("-", 1)[0]  # the suffix names a variant ("compatibility-outwear")
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
    instruction_text: str          # the full instruction; already contains query_text where there is one
    target_image: list[str]        # every image that counts as a correct answer (paths relative to root)
    task: str = ""                 # task word, possibly suffixed ("street2shop-multi-query")
    dataset: str = ""
    split: str = ""
    query_text: Optional[str] = None
    query_image: list[str] = field(default_factory=list)   # sketches, street photos, outfit items, reference
    query_video: list[str] = field(default_factory=list)   # one clip (file or folder) or its frame files
    negative_image: list[str] = field(default_factory=list)  # hard negatives; read, not used in training
    attribute: Optional[str] = None     # asfr: the attribute the query asks about
    target_label: Optional[str] = None  # asfr: "Dataset+attribute+value"; every image under it is correct
    category: Optional[str] = None      # OOD compatible-item task: the wanted item's category
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
    """A query as the model sees it: instruction text, then images, then one video (its frames)."""
    instruction: str
    images: list[Image.Image] = field(default_factory=list)  # native size: the model's processor resizes
    frames: list[Image.Image] = field(default_factory=list)  # k frames of the one query video, in order
    # Seconds of each frame in its clip (k values, increasing): Qwen3-VL writes them into the prompt
    # and Qwen2.5-VL spaces its temporal positions by them. Empty = unknown: the model then assumes
    # FRAME_LIST_FPS frames per second, as for a frame folder.
    frame_times: list[float] = field(default_factory=list)


def parse_record(obj, source: str, index: int, root: str, subset: str = "",
                 default_task: str = "") -> Record:
    """Turn one JSON object of a triplet file into a Record; any problem -> UFireError naming it.

    Every type and presence rule of FORMAT.md is checked first, in one call (support/ufire_files.py),
    so a bad record fails when its file is read rather than hours into training.
    """
    rid = obj.get("id") if isinstance(obj, dict) else None
    check_record_json(obj, f"record {rid!r} (#{index}) in {source}", default_task, base_task, root)
    paths = lambda name: [obj[name]] if isinstance(obj.get(name), str) else list(obj.get(name, []))  # noqa: E731
    return Record(id=str(rid), instruction_text=obj["instruction_text"],
                  target_image=paths("target_image"),      # a bare string is a one-element list
                  task=obj.get("task") or default_task,    # OOD records carry no task: the folder names it
                  dataset=obj.get("dataset") or "", split=obj.get("split") or "",
                  query_text=obj.get("query_text"), query_image=paths("query_image"),
                  query_video=paths("query_video"), negative_image=paths("negative_image"),
                  attribute=obj.get("attribute"), target_label=obj.get("target_label"),
                  category=obj.get("category"),            # optional strings: absent or null -> None
                  root=root, source=source, index=index, subset=subset)


# --------------------------------------------------------------------------------------------
# Images and videos
# --------------------------------------------------------------------------------------------

def load_image(path, size: Optional[int] = None, record: Optional[Record] = None) -> Image.Image:
    """Open an image as RGB (any mode Pillow reads, see ufire_files.to_rgb) at its native size.

    size=None (what training and evaluation use): the model's own processor resizes it, keeping the
    aspect ratio within a pixel budget (model.py). size given: a size x size bicubic square, for
    notebooks and pictures that want one fixed size.
    """
    img = read_image(str(path), record)  # decode any mode to RGB (support/ufire_files.py)
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)  # the optional square (aspect not kept)
    return img


def _pick_frames(n: int, k: int, rng: Optional[random.Random]) -> list[int]:
    """k frame indices out of n: segment centres (eval) or one random frame per segment (train).

    Segments rather than the first k frames: the whole clip is seen, and at training time the
    random position inside each segment is a cheap temporal augmentation.
    """
    if n <= 0:
        return []
    idx = []
    for j in range(k):
        lo, hi = j * n / k, (j + 1) * n / k  # segment j covers frames [lo, hi)
        i = int(lo + (hi - lo) / 2) if rng is None else int(lo + rng.random() * (hi - lo))
        idx.append(min(max(i, 0), n - 1))  # n < k repeats frames rather than returning fewer
    return idx


def load_video(path, num_frames: int, size: Optional[int] = None, record: Optional[Record] = None,
               rng: Optional[random.Random] = None) -> tuple[list[Image.Image], list[float]]:
    """A video as num_frames RGB frames and the second of each in its clip (a frame folder, an
    animated GIF/WebP, or mp4: ufire_files.read_clip says where each kind's times come from).

    Frames are taken one per equal segment of the clip (segment centre at eval, random position
    in the segment at training), so a short clip yields repeated frames rather than fewer. size
    given: each frame resized to a size x size square (load_image's option); None keeps the native
    size (the model resizes frames itself).
    """
    # decode the clip (support/ufire_files.py) and keep k frames of it, one per segment
    frames, times = read_clip(str(path), record, lambda n: _pick_frames(n, num_frames, rng))
    if size is not None:  # the same square resize as load_image
        frames = [f.resize((size, size), Image.BICUBIC) if f.size != (size, size) else f for f in frames]
    return frames, times


def load_frames(path, num_frames: int, size: Optional[int] = None, record: Optional[Record] = None,
                rng: Optional[random.Random] = None) -> list[Image.Image]:
    """The frames of `load_video` without their times."""
    return load_video(path, num_frames, size, record, rng)[0]


def record_to_query(record: Record, image_size: Optional[int] = None, max_images: int = 4,
                    num_frames: int = 4, rng: Optional[random.Random] = None, sketches: str = "one",
                    image_cap: int = 0) -> Query:
    """Load a record's query: instruction, its query images, num_frames frames of its video.

    rng None -> the deterministic evaluation query; rng given -> a training draw. Which query images,
    rule by rule:
      * sketches="one" on a task whose query images are alternatives (sketch2i): one of them, the
        first at evaluation, a random one at training. sketches="all": all of them in one prompt,
        as the authors feed them (dataset.py FashionDataset / FashionCollator).
      * image_cap > 0: at most image_cap, drawn at random in random order at training (the authors'
        random.sample for two sketch datasets, dataset.py 12-31 and 51-53), the first ones at eval.
      * max_images > 0: at most max_images, the first ones at evaluation (evaluate.py 54 keeps the
        first 8), a random subset in the record's order at training (an outfit keeps its order).
        0 = every image.
    image_size None keeps the images at their native size (the model resizes them); a number gives
    load_image's size x size square.
    """
    if sketches not in SKETCH_MODES:
        raise ValueError(f"sketches={sketches!r}: expected one of {SKETCH_MODES}")
    spec = TASKS[base_task(record.task)]
    paths = list(record.query_image)
    if sketches == "one" and spec.pick_one_query and len(paths) > 1:  # alternatives: one per prompt
        paths = [paths[0] if rng is None else rng.choice(paths)]
    if 0 < image_cap < len(paths):
        paths = paths[:image_cap] if rng is None else rng.sample(paths, image_cap)
    if 0 < max_images < len(paths):  # bounds the prompt length; sorted keeps the outfit's order
        keep = range(max_images) if rng is None else sorted(rng.sample(range(len(paths)), max_images))
        paths = [paths[i] for i in keep]
    images = [load_image(record.path(p), image_size, record) for p in paths]
    frames: list[Image.Image] = []
    times: list[float] = []
    if len(record.query_video) == 1:  # one clip: a file or a frame folder
        frames, times = load_video(record.path(record.query_video[0]), num_frames, image_size, record, rng)
    elif len(record.query_video) > 1:  # the clip given as an ordered list of frame files (untimed)
        idx = _pick_frames(len(record.query_video), num_frames, rng)
        frames = [load_image(record.path(record.query_video[i]), image_size, record) for i in idx]
        times = [i / FRAME_LIST_FPS for i in idx]
    return Query(instruction=record.instruction_text, images=images, frames=frames, frame_times=times)


# --------------------------------------------------------------------------------------------
# Reading a U-FIRE root
# --------------------------------------------------------------------------------------------

# File names carry the task WORD, never trust the leading number (it is ordering only and does not
# match the task numbering in prose); datasets contain "-" and "_", so the task is the first field.
# <n>_<task>[-suffix]_<dataset>_<split>_triplet_data.json
_TRIPLET_RE = re.compile(r"^\d+_(?P<task>[^_]+)_(?P<dataset>.+)_(?P<split>train|val|test)_triplet_data\.json$")
# <n>_<task>_<dataset>_test_candidates.json: a JSON list of gallery paths
_GALLERY_RE = re.compile(r"^\d+_(?P<task>[^_]+)_(?P<dataset>.+)_test_candidates\.json$")
# <n>_asfr_<dataset>_<split>_candidate_data.json: a JSON object label -> paths (asfr's galleries)
_POOL_RE = re.compile(r"^\d+_(?P<task>[^_]+)_(?P<dataset>.+)_(?P<split>val|test)_candidate_data\.json$")


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
    records: list[Record]          # (N,) the scored queries (records with >= 1 positive in the gallery)
    gallery: list[str]             # (G,) absolute normalised image paths, de-duplicated
    positives: list[list[int]]     # (N,) per scored record: gallery indices counted as hits (P_n)
    missing: list[str]             # ids of records none of whose targets is in the gallery
    root: str = ""                 # directory the records' paths are relative to
    gallery_source: str = ""       # gallery file ('' when built from the split's targets)
    targets_outside: int = 0       # target paths (over all records) not found in the gallery


@dataclass
class TrainPair:
    """One training sample: the loaded query, one loaded target, and the target's identity."""
    query: Query
    target: Image.Image
    target_key: str                # what makes two targets the same positive: the image's absolute
                                   # path, or "label:<target_label>" for asfr (every image under a label is correct)


class UFire:
    """A U-FIRE root read as published: 0_triplet_files/, 0_test_candidates/, evaluation_only_tasks/.

    A sub-dataset ("subset") is "task/dataset", e.g. "cir/FashionIQ-Dress"; an OOD task is
    "ood/<Task name>". Construction only lists the files; records are read on first use.
    """

    def __init__(self, root):
        self.root = os.path.abspath(str(root))
        if not os.path.isdir(self.root):
            raise UFireError(f"U-FIRE root {self.root} is not a directory")
        self._triplets: dict[tuple[str, str], str] = {}   # (subset, split) -> file
        self._galleries: dict[str, str] = {}               # subset -> test gallery file
        self._pools: dict[tuple[str, str], str] = {}       # (subset, split) -> asfr label pool
        self._cache: dict[tuple[str, str], list[Record]] = {}  # (subset, split) -> parsed records
        for folder in ("0_triplet_files", "0_test_candidates"):
            d = os.path.join(self.root, folder)
            for name in list_dir(d):  # an unlistable folder (a symlink loop...) is a UFireError
                path = os.path.join(d, name)
                if m := _TRIPLET_RE.match(name):
                    key = (f"{task_of_file(m['task'], path, base_task)}/{m['dataset']}", m["split"])
                    self._triplets[key] = path
                elif m := _POOL_RE.match(name):  # asfr: the test pool is also its test gallery
                    sub = f"{task_of_file(m['task'], path, base_task)}/{m['dataset']}"
                    self._pools[(sub, m["split"])] = path
                    if m["split"] == "test":
                        self._galleries[sub] = path
                elif m := _GALLERY_RE.match(name):
                    self._galleries[f"{task_of_file(m['task'], path, base_task)}/{m['dataset']}"] = path
        ood = os.path.join(self.root, "evaluation_only_tasks")  # one folder per OOD task
        self._ood = sorted(n for n in list_dir(ood)  # lexists: a broken triplet file is reported, not skipped
                           if os.path.lexists(os.path.join(ood, n, "triplet_data.json")))

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

    def select(self, split: str, tasks: str = "all", ood: str = "skip") -> list[str]:
        """The sub-datasets a run uses: "all", or comma-separated task words / "task/dataset" names.

        ood: "include" adds the evaluation-only tasks (test split only), "only" keeps just them,
        "skip" leaves them out. An unknown name, or nothing left to use, is a UFireError.
        """
        known = self.subsets(split)
        picked: list[str] = []
        if ood != "only":
            if tasks in ("all", "", None):
                picked = list(known)
            else:
                for t in (x.strip() for x in tasks.split(",") if x.strip()):
                    if "/" in t:
                        if t not in known:
                            raise UFireError(f"sub-dataset {t!r} is not in the {split} split of "
                                             f"{self.root}; known: {', '.join(known)}")
                        picked.append(t)
                    else:
                        base_task(t)  # raises a clear error for an unknown task word
                        picked += [s for s in known if s.split("/")[0] == t]
        if ood in ("include", "only") and split == "test":
            picked += list(self.ood_subsets())
        if not picked:
            raise UFireError(f"nothing to evaluate in the {split} split of {self.root} "
                             f"(tasks={tasks!r}, ood={ood!r})")
        return picked

    def triplet_file(self, subset: str, split: str) -> str:
        """The triplet file of one sub-dataset and split (an OOD task has only its test file)."""
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
            else:  # paths are relative to the root; the task word is the subset's first part
                root, task = self.root, subset.split("/", 1)[0]
            data = read_json(path)
            if not isinstance(data, list):
                raise UFireError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
            recs = [parse_record(o, path, i, root, subset, default_task=task) for i, o in enumerate(data)]
            for r in (recs if subset.startswith("ood/") else []):  # OOD records name no task or split
                r.task, r.split = task, "test"
            check_file_records(recs, None if subset.startswith("ood/") else task, base_task)  # task, unique ids
            self._cache[key] = recs
        return self._cache[key]

    # ---- galleries --------------------------------------------------------------------------
    def gallery(self, subset: str, split: str = "test") -> Gallery:
        """The gallery: published test file / asfr label pool / OOD candidates / union of targets."""
        if subset.startswith("ood/"):
            path = os.path.join(self.root, "evaluation_only_tasks", subset[4:], "candidate_images.json")
            return self._read_gallery(path, os.path.dirname(path))
        # test: the published gallery; val: only asfr publishes one (its label pool)
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
        """A gallery file (a list of paths, or asfr's label -> paths object) -> de-duplicated Gallery.

        Published galleries repeat entries (DeepFashion's inshop list does): an image that appeared
        twice would be ranked twice, so every path is kept once, at its first position.
        """
        data = read_json(path)
        norm = lambda p: inside_root(root, p, path)  # noqa: E731  (one spelling per file, never outside the root)
        paths: list[str] = []        # (G,) unique absolute paths
        index: dict[str, int] = {}   # path -> its position in `paths`

        def add(entries, what):
            """Append the new paths of `entries`; return the gallery index of every entry."""
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

        if isinstance(data, list):  # the common case: a list of paths
            add(data, "the gallery")
            return Gallery(paths, None, path, len(data))
        if not isinstance(data, dict):
            raise UFireError(f"{path}: expected a list of paths or an object label -> paths")
        # asfr: label -> images, plus a special "<Dataset>_asfr_<split>_candidate" key = full gallery
        special = [k for k in data if k.endswith("_candidate")]
        raw = 0  # entries before de-duplication: the special key's if there is one, else the labels'
        for k in special:  # the full gallery first, so its order fixes the indices
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
        listed in `missing` (never encoded: evaluate.py counts each as a miss)."""
        recs = self.records(subset, split)
        gal = self.gallery(subset, split)
        index = {p: i for i, p in enumerate(gal.paths)}  # path -> gallery index
        scored, positives, missing, outside = [], [], [], 0
        for r in recs:
            pos: set[int] = set()  # P_n
            if base_task(r.task) == "asfr" and r.target_label and gal.labels is not None:
                pos.update(gal.labels.get(r.target_label, []))  # every image under the label
            for p in r.target_image:
                i = index.get(r.path(p))
                if i is None:  # a listed target the gallery lacks: counted, never a silent miss
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

    def train_view(self, subsets, image_size: Optional[int] = None, max_images: int = 4, num_frames: int = 4,
                   sketches: str = "one", image_caps: Optional[dict] = None) -> "TrainView":
        """The training records of `subsets`, as (query, target) pairs loaded on demand.

        The query options are record_to_query's; image_caps maps a sub-dataset to its image_cap
        (model.FashionLensEmbedder.query_options() gives all of them for the embedder's recipe).
        """
        return TrainView(self, list(subsets), image_size, max_images, num_frames, sketches, image_caps)


class TrainView:
    """One (query, target) pair per record; the target (or query sketch) is drawn at random.

    A record with several correct targets stays ONE sample (as the published code trains it): each
    use draws one target, so every target is seen over the epochs without over-weighting records
    that list many.
    """

    def __init__(self, ufire: UFire, subsets: list[str], image_size: Optional[int] = None, max_images: int = 4,
                 num_frames: int = 4, sketches: str = "one", image_caps: Optional[dict] = None):
        if sketches not in SKETCH_MODES:
            raise ValueError(f"sketches={sketches!r}: expected one of {SKETCH_MODES}")
        self.ufire, self.image_size = ufire, image_size  # None: native size (the model resizes)
        self.max_images, self.num_frames, self.sketches = max_images, num_frames, sketches
        self.image_caps = dict(image_caps or {})  # subset -> at most this many query images (0 / absent: no cap)
        self.recs = {s: ufire.records(s, "train") for s in sorted(subsets)}  # subset -> records
        self.sizes = {s: len(r) for s, r in self.recs.items()}  # records per subset (sampler's N_k)

    def record(self, subset: str, i: int) -> Record:
        """Record i of a sub-dataset (the sampler hands out (subset, i) pairs)."""
        return self.recs[subset][i]

    def pair(self, subset: str, i: int, rng: random.Random) -> TrainPair:
        """Load record i as a training pair; rng makes every random choice of this draw."""
        r = self.recs[subset][i]
        query = record_to_query(r, self.image_size, self.max_images, self.num_frames, rng, self.sketches,
                                self.image_caps.get(subset, 0))
        tgt = r.path(rng.choice(r.target_image))  # one of several targets, fresh each epoch
        # The key decides which in-batch targets count as positives for each other. Usually that is
        # "the same image"; for asfr every image filed under the label is correct, so two queries
        # asking for the same attribute value share their positives instead of repelling each other.
        key = f"label:{r.target_label}" if r.target_label else tgt
        return TrainPair(query, load_image(tgt, self.image_size, r), key)


# --------------------------------------------------------------------------------------------
# The tour and the command line
# --------------------------------------------------------------------------------------------

def _tour() -> None:
    """Counts per sub-dataset of the synthetic U-FIRE (written on first use) and one record."""
    from support.synthetic import SyntheticError, ensure_synthetic  # support code, needed only here

    try:
        root = ensure_synthetic("data/synthetic")
    except SyntheticError as e:  # data/synthetic holds something else: report it like bad input
        raise UFireError(str(e)) from None
    uf = UFire(root)
    print(f"U-FIRE root: {root}\n")
    print(f"{'sub-dataset':36s} {'train':>6s} {'val':>5s} {'test':>5s} {'gallery':>8s}")
    for s in uf.subsets("test"):
        v = uf.eval_view(s)
        print(f"{s:36s} {len(uf.records(s, 'train')):6d} {len(uf.records(s, 'val')):5d} "
              f"{len(v.records):5d} {len(v.gallery):8d}")
    for s in uf.ood_subsets():  # test-only: no train / val
        v = uf.eval_view(s)
        print(f"{s:36s} {'-':>6s} {'-':>5s} {len(v.records):5d} {len(v.gallery):8d}")
    r = uf.records("cir/SynCIR-Top", "test")[0]  # cir shows every part: image, text, instruction
    q = record_to_query(r)
    print("\nexample record (cir/SynCIR-Top, test #0):")
    print(json.dumps({k: v for k, v in dataclasses.asdict(r).items() if v not in (None, [], "")}, indent=1))
    print(f"-> Query(instruction={q.instruction!r}, images={[im.size for im in q.images]}, frames={len(q.frames)})")
    print("\nNext: `python data.py check --root data/synthetic`, then train.py / evaluate.py.")


def main(argv=None) -> int:
    """python data.py [check --root PATH [--quick]]: exit 0, 1 when anything is missing or unreadable.

    Bad input (an unreadable root, a malformed file) is one `error:` line, exit 1 (errors.run_cli).
    """
    def cli(args) -> int:
        a = parse_data_flags(args)
        if a.cmd == "check":  # open every file the root names (support/ufire_files.py)
            return 0 if check_root(UFire(a.root), open_files=not a.quick, progress=sys.stderr.isatty()) else 1
        _tour()
        return 0
    return run_cli(cli, argv)


if __name__ == "__main__":
    sys.exit(main())
