"""Reading U-FIRE's files: JSON, record type checks, any image or video file, and `check` of a root
(support code: skip on first read).

data.py holds what a record, a query, a gallery and a view ARE; this module holds how the bytes on
disk become them, and what is wrong when they do not:
  * read_json (any unreadable, ambiguous or absurd JSON file is one error naming it), list_dir,
    check_record_json (every type and presence rule of FORMAT.md, one error naming the record),
    inside_root (no path leaves the root), task_of_file (the task word of a file name).
  * read_image: any image Pillow opens, as the RGB picture a viewer would show (alpha on white,
    16/32-bit grey scaled, not clipped); data.load_image calls it.
  * read_clip: a video as frames and the second of each in its clip -- a frame folder, an animated
    GIF/WebP (Pillow), or mp4/avi/mov/mkv/webm when the optional `av` or `imageio` is installed;
    data.load_video calls it and keeps num_frames of them.
  * check_root: `python data.py check --root PATH`; opens every file a run would read, so a broken
    root fails in seconds rather than mid-training.
It never imports data.py: the UFire reader, the base_task rule and the frame picker are passed in.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Callable, Optional

from PIL import Image, UnidentifiedImageError

from support.errors import UFireError

# --------------------------------------------------------------------------------------------
# JSON files and records
# --------------------------------------------------------------------------------------------

LIST_FIELDS = ("target_image", "query_image", "query_video", "negative_image")
STR_FIELDS = ("query_text", "attribute", "target_label", "category", "task", "dataset", "split")


class _Repeated(dict):
    """A JSON object in which a key appeared twice (json.load alone would keep the last value silently)."""

    def __init__(self, pairs: list):
        super().__init__(pairs)
        seen: set = set()
        for k, _ in pairs:  # the first key seen twice names the problem
            if k in seen:
                self.key = k
                break
            seen.add(k)


def read_json(path: str):
    """json.load of a data file; anything wrong is one UFireError naming the file (and the line and
    column of a syntax error, the record and key of a key given twice).

    Also refused, each naming the file: an OSError opening it (a symlink loop, a folder where a file
    belongs, no permission), text that is not UTF-8, nesting too deep for the parser (RecursionError
    escapes json.load), and a key given twice in one object (json would silently keep the last one).
    """
    repeated = []  # the objects read with a key twice, in the order the parser closed them

    def pairs_hook(pairs: list) -> dict:
        obj = dict(pairs)
        if len(obj) < len(pairs):  # rare: only then the slower _Repeated
            obj = _Repeated(pairs)
            repeated.append(obj)
        return obj

    try:
        with open(path, "r", encoding="utf-8") as f:  # explicit: the platform default may not be UTF-8
            data = json.load(f, object_pairs_hook=pairs_hook)
    except FileNotFoundError:
        raise UFireError(f"missing file {path}") from None
    except json.JSONDecodeError as e:
        raise UFireError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise UFireError(f"{path}: not UTF-8 text ({e})") from None
    except RecursionError:
        raise UFireError(f"{path}: JSON nested too deeply to read (lists or objects inside each other "
                         f"thousands of levels deep); no U-FIRE file nests more than three") from None
    except OSError as e:  # ELOOP, EISDIR, EACCES, EIO...: what the system says, and about which file
        raise UFireError(f"{path}: cannot read it ({e.strerror or e})") from None
    if repeated:
        raise UFireError(f"{_holder(data, repeated[0], path)}: key {repeated[0].key!r} appears twice in one "
                         "object; JSON readers keep only one of the values, so the file is ambiguous")
    return data


def _holder(data, obj: dict, path: str) -> str:
    """'record <id> (#i) in <path>' for the record of a list that holds `obj`, else just `path`."""
    def holds(o) -> bool:  # o is obj, or contains it (records nest only a level or two)
        return o is obj or any(holds(v) for v in (o.values() if isinstance(o, dict) else
                                                  o if isinstance(o, list) else ()))

    try:
        for i, rec in enumerate(data if isinstance(data, list) else []):
            if holds(rec):
                return f"record {rec.get('id') if isinstance(rec, dict) else None!r} (#{i}) in {path}"
    except RecursionError:  # deep enough to parse, too deep to search: the file is named all the same
        pass
    return path


def list_dir(folder: str) -> list:
    """The sorted names in `folder` ([] when absent); one that cannot be listed is a UFireError."""
    try:  # lexists, not isdir: a symlink loop or a file in the folder's place is an error, not "empty"
        return sorted(os.listdir(folder)) if os.path.lexists(folder) else []
    except OSError as e:
        raise UFireError(f"{folder}: cannot list it ({e.strerror or e})") from None


def inside_root(root: str, rel: str, where: str) -> str:
    """The normalised absolute path of `rel` (as written in a data file) under `root`; UFireError
    naming `where` (the file, and the record) when it leaves the root.

    Paths in U-FIRE's files are relative to the root (an OOD task: its folder), and the published
    files never use '..' or absolute paths; one that leaves the root would silently score or train
    on an image of another dataset, or of no dataset at all. The check is on the text (normpath),
    not on symlinks: a root may well hold its image folders as links to another disk.
    """
    path = os.path.normpath(os.path.join(root, rel))  # an absolute `rel` replaces the root
    if not path.startswith(os.path.normpath(root).rstrip(os.sep) + os.sep):  # a prefix test: fast on 10^5 paths
        raise UFireError(f"{where}: image path {rel!r} leaves the data root {root}")
    return path


def check_record_json(obj, where: str, default_task: str, base_task: Callable[[str], str],
                      root: Optional[str] = None) -> None:
    """Every rule a U-FIRE record's JSON object must follow; the first one broken -> UFireError.

    where: 'record <id> (#index) in <file>', the prefix of every error. base_task: data.base_task
    (raises UFireError for an unknown task). root: the folder the record's paths are relative to;
    given, every path must stay inside it (`inside_root`). Checking every record when a file is read
    means a bad one fails at once, naming its file and position, instead of hours into training when
    the sampler first reaches it.
    """
    if not isinstance(obj, dict):
        raise UFireError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    rid = obj.get("id")
    if not isinstance(rid, (str, int)) or rid == "":
        raise UFireError(f"{where}: missing or invalid 'id'")
    kw = {}
    for name in LIST_FIELDS:  # a bare string is accepted as a one-element list
        val = obj.get(name, [])
        val = [val] if isinstance(val, str) else val
        if not isinstance(val, list) or not all(isinstance(v, str) and v for v in val):
            raise UFireError(f"{where}: field {name!r} must be a list of non-empty path strings")
        kw[name] = list(val)
        for v in (val if root is not None else []):
            inside_root(root, v, where)
    for name in STR_FIELDS:  # optional strings: absent or null -> None
        val = obj.get(name)
        if val is not None and not isinstance(val, str):
            raise UFireError(f"{where}: field {name!r} must be a string")
        kw[name] = val
    instr = obj.get("instruction_text")  # required: the model is always told what to look for
    if not isinstance(instr, str) or not instr.strip():
        raise UFireError(f"{where}: missing or empty 'instruction_text'")
    task = kw.pop("task") or default_task  # OOD records carry no task: the folder names it
    try:
        btask = base_task(task)
    except UFireError as e:
        raise UFireError(f"{where}: {e}") from None
    # asfr positives may come from the label alone; every other task needs explicit targets.
    if "target_image" not in obj or not (kw["target_image"] or (btask == "asfr" and kw["target_label"])):
        raise UFireError(f"{where}: record has no target_image")
    if not (kw["query_text"] or kw["query_image"] or kw["query_video"]):  # an instruction alone is no query
        raise UFireError(f"{where}: record has no query (query_text, query_image or query_video)")


def task_of_file(task_token: str, path: str, base_task: Callable[[str], str]) -> str:
    """The task word in a file name (base_task: data.base_task), or a UFireError naming the file."""
    try:
        return base_task(task_token)
    except UFireError as e:
        raise UFireError(f"{path}: file name has an unknown task word: {e}") from None


def check_file_records(recs: list, task: Optional[str], base_task: Callable[[str], str]) -> None:
    """The rules between the records of one triplet file (recs: data.Records); the first broken ->
    UFireError. task: the file's task word, every record must belong to it (None: an OOD file, whose
    records name no task); no id twice (an id names its query in per-query results)."""
    for r in (recs if task is not None else []):
        if base_task(r.task) != task:  # a record must match its file's task word
            raise UFireError(f"{r.where()}: task {r.task!r} does not belong in a {task} file")
    seen: dict[str, int] = {}  # id -> index of its first record
    for r in recs:
        if r.id in seen:
            raise UFireError(f"{r.where()}: duplicate id (first at #{seen[r.id]})")
        seen[r.id] = r.index


def rec_where(record) -> str:
    """' (record ... in FILE)' for an error message (record: a data.Record), or '' when none is known."""
    return f" ({record.where()})" if record is not None else ""


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------

def read_image(path: str, record=None) -> Image.Image:
    """Open an image file as RGB at its native size (any mode Pillow reads, see `to_rgb`).

    A missing, truncated or foreign file is a UFireError naming it (and `record`, a data.Record).
    """
    if not os.path.isfile(path):
        raise UFireError(f"missing image {path}{rec_where(record)}")
    try:
        with Image.open(path) as im:
            im.load()  # force the decode now, so a truncated file fails here and not later
            return to_rgb(im)  # sketches are grey, GIF frames palettised: one mode for the model
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UFireError(f"unreadable image {path}{rec_where(record)}: {e}") from None


_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")  # modes with an alpha band (a = premultiplied)


def to_rgb(im: Image.Image) -> Image.Image:
    """The RGB image a viewer would show for `im`, whatever its mode; ValueError if there is none.

    * 8-bit colour and grey modes (RGB, L, 1, P, CMYK, YCbCr, LAB, HSV): Pillow's conversion. RGB
      and L files (every synthetic image) go through exactly this line. CMYK uses the plain
      255 - C - K formula: no colour profile is applied, to CMYK or to any other file.
    * Transparency (an alpha band, or a palette / grey / RGB value marked transparent): composited
      on white. Dropping alpha would show whatever colour hides under it, usually black, so a
      black-stroke sketch on a transparent background would become a black square. White is the
      background of catalogue product photos (every gallery) and of drawn sketches, so a cut-out
      garment on white matches the images it is compared with.
    * 16-bit and 32-bit grey (I;16*, I, F): scaled to 0..255 (see `_deep_to_grey`); Pillow's own
      conversion clips every value above 255 to white.
    """
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        return _deep_to_grey(im).convert("RGB")
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = (im.convert("LA") if im.mode == "La" else im).convert("RGBA")  # La has no direct path
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")  # out = a * colour + (1 - a) * white
    return im.convert("RGB")


def _deep_to_grey(im: Image.Image) -> Image.Image:
    """A 16/32-bit integer or float grey image as 8-bit 'L': v -> round(255 * (v - a) / (b - a)).

    [a, b] is the image's full scale, so that the same picture stored with more bits loads the
    same (an 8-bit image saved as 16-bit, v * 257, comes back byte for byte):
      I;16*  [0, 65535], what the file format defines.
      I, F   no defined scale: the smallest usual one holding every pixel ([0, 1] floats,
             [0, 255], [0, 65535]); when none does (negative or larger values), the pixels'
             own range, so the picture is stretched rather than clipped.
    """
    lo, hi = im.getextrema()  # the pixels' actual range
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{im.mode} image holds NaN or infinite values; there is no picture to show")
    if im.mode.startswith("I;16"):
        scale = (0.0, 65535.0)
    else:
        usual = ([(0.0, 1.0)] if im.mode == "F" else []) + [(0.0, 255.0), (0.0, 65535.0)]
        scale = next(((a, b) for a, b in usual if a <= lo and hi <= b), (lo, max(hi, lo + 1)))
    gain = 255.0 / (scale[1] - scale[0])
    # F -> L truncates and clips to 0..255, so + 0.5 turns the truncation into rounding
    offset = 0.5 - scale[0] * gain
    return im.convert("F").point(lambda v: v * gain + offset).convert("L")  # (v - a) * gain, rounded


# --------------------------------------------------------------------------------------------
# Videos
# --------------------------------------------------------------------------------------------

_FRAME_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # files a frame folder may hold

# A frame folder, a list of frame files, or a frame with no duration carries no timing: such frames
# are taken as FRAME_LIST_FPS per second, what Qwen's own loader assumes for a list of frames
# (qwen-vl-utils fetch_video: sample_fps = 2.0, frame i at i / 2 s). The times only reach the model
# as Qwen3-VL's "<t seconds>" text and Qwen2.5-VL's temporal position spacing (model.py).
FRAME_LIST_FPS = 2.0


def read_clip(path: str, record=None, pick: Optional[Callable[[int], list]] = None
              ) -> tuple[list[Image.Image], list[float]]:
    """A video's frames (RGB, native size) and the second of each in its clip; pick(n) -> the indices
    of the frames wanted out of n (data._pick_frames), None = every frame.

    A frame folder (file-name order, FRAME_LIST_FPS) opens only the picked files; an animated
    GIF/WebP (times from the frame durations) or an mp4 (optional reader, times from the stream's
    timestamps) is decoded whole, then picked. Any problem is a UFireError naming the file (and
    `record`, a data.Record).
    """
    pick = pick or (lambda n: list(range(n)))
    if os.path.isdir(path):  # a folder of frame images, in file-name order
        names = [n for n in list_dir(path) if n.lower().endswith(_FRAME_EXT)]
        if not names:
            raise UFireError(f"video frame folder {path} holds no images{rec_where(record)}")
        idx = pick(len(names))
        return ([read_image(os.path.join(path, names[i]), record) for i in idx],
                [i / FRAME_LIST_FPS for i in idx])
    if not os.path.isfile(path):
        raise UFireError(f"missing video {path}{rec_where(record)}")
    if path.lower().endswith((".mp4", ".avi", ".mov", ".mkv", ".webm")):  # needs an optional decoder
        frames, times = _read_mp4(path, record)
    else:  # an animated image (GIF, WebP): Pillow walks its frames
        frames, times = _read_animated(path, record)
    if not frames:
        raise UFireError(f"video {path} has no frames{rec_where(record)}")
    idx = pick(len(frames))  # k frame indices
    return [frames[i] for i in idx], [times[i] for i in idx]


def _read_mp4(path: str, record) -> tuple[list[Image.Image], list[float]]:
    """Decode a video file with an optional reader (PyAV, else imageio) -> (frames, seconds of each
    frame from the first); a clear error if neither is installed or the file does not decode."""
    try:
        import av  # type: ignore
    except ImportError:
        av = None
    try:
        import imageio.v3 as iio  # type: ignore
    except ImportError:
        iio = None
    if av is None and iio is None:
        raise UFireError(f"cannot read video {path}{rec_where(record)}: mp4 needs the optional "
                         "package 'av' or 'imageio'; or store the video as a frame folder / "
                         "animated GIF/WebP")
    try:
        if av is not None:
            with av.open(path) as c:
                rate = float(c.streams.video[0].average_rate or FRAME_LIST_FPS)  # frames per second
                decoded = list(c.decode(video=0))
                frames = [fr.to_image().convert("RGB") for fr in decoded]
                # a frame's presentation time; a frame without one sits at its index / frame rate
                times = [fr.time if fr.time is not None else i / rate for i, fr in enumerate(decoded)]
        else:
            frames = [Image.fromarray(a).convert("RGB") for a in iio.imiter(path)]
            rate = float(iio.immeta(path).get("fps") or FRAME_LIST_FPS)
            times = [i / rate for i in range(len(frames))]  # qwen-vl-utils: frame index / video fps
    except Exception as e:  # noqa: BLE001 -- any decoder failure means a damaged or foreign file
        raise UFireError(f"unreadable video {path}{rec_where(record)}: {e}") from None
    return frames, [t - times[0] for t in times] if times else []  # the clip starts at 0 s


def _read_animated(path: str, record) -> tuple[list[Image.Image], list[float]]:
    """An animated GIF/WebP -> (frames, seconds at which each frame appears).

    Frame i appears when the frames before it have been shown: t_i = sum of their durations
    (Pillow's per-frame info["duration"], in ms); a frame with no or zero duration counts 1 /
    FRAME_LIST_FPS s.
    """
    try:
        with Image.open(path) as im:
            frames, times, clock = [], [], 0.0
            for i in range(getattr(im, "n_frames", 1)):
                im.seek(i)
                frames.append(to_rgb(im))  # a new image: the frame survives the next seek
                times.append(clock)
                ms = im.info.get("duration") or 0
                clock += ms / 1000.0 if ms > 0 else 1.0 / FRAME_LIST_FPS
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UFireError(f"unreadable video {path}{rec_where(record)}: {e}") from None
    return frames, times


# --------------------------------------------------------------------------------------------
# check: validate a root
# --------------------------------------------------------------------------------------------

SPLITS = ("train", "val", "test")


def check_root(uf, out=None, example_limit: int = 3, open_files: bool = True,
               progress: bool = False) -> bool:
    """Print one row per sub-dataset/split and per OOD task of `uf` (a data.UFire); return True when
    nothing is wrong.

    Reads every file a run would read (records, galleries), then opens every image and video they
    name the way training and evaluation will (`read_image`, `read_clip`), so a half-downloaded
    root, a zero-byte or truncated image, or a text file named .png fails here in seconds rather
    than mid-training. open_files=False (`check --quick`) only tests that the files exist.
    out: where the table goes (None: sys.stdout at call time, so redirections are honoured).
    """
    out = out or sys.stdout
    ok, problems = True, []
    items = [(s, sp) for sp in SPLITS for s in uf.subsets(sp)]
    items += [(s, "test") for s in uf.gallery_subsets() if s not in uf.subsets("test")]  # gallery only
    items += [(s, "test") for s in uf.ood_subsets()]
    # sort: regular sub-datasets first, by name, then train / val / test
    items.sort(key=lambda x: (x[0].startswith("ood/"), x[0], SPLITS.index(x[1])))
    # Pass 1: parse every row and list the files it needs (images, and videos apart: they decode
    # differently). A parse error becomes that row's problem; the other rows are still checked.
    rows = []  # (sub, split, cells or None, images, videos, own problems)
    for sub, split in items:
        try:
            rows.append((sub, split, *_check_parse(uf, sub, split, example_limit)))
        except UFireError as e:  # one broken file: report it and keep checking the others
            rows.append((sub, split, None, set(), set(), [f"ERROR {e}"]))
    # Pass 2: open each file once, however many rows share it (galleries overlap).
    videos = set().union(*(r[4] for r in rows))
    todo = sorted(p for p in set().union(*(r[3] | r[4] for r in rows)) if os.path.exists(p))
    t0 = time.perf_counter()
    unreadable = _open_all(todo, videos, progress) if open_files else {}  # path -> reason
    # Pass 3: the table and the problems, row by row.
    table = [("subset", "split", "records", "gallery", "outside", "missing files", "unreadable")]
    for sub, split, cells, images, vids, own in rows:
        files = images | vids
        absent = sorted(p for p in files if not os.path.exists(p))
        bad = sorted(p for p in files if p in unreadable)
        if absent:
            rel = [os.path.relpath(p, uf.root) for p in absent[:example_limit]]
            own.append(f"{len(absent)} missing image/video file(s), e.g. {rel}")
        if bad:
            eg = [f"{os.path.relpath(p, uf.root)}: {unreadable[p]}" for p in bad[:example_limit]]
            own.append(f"{len(bad)} unreadable image/video file(s), e.g. {eg}")
        ok = ok and not own
        problems += [f"{sub} [{split}]: {msg}" for msg in own]
        cells = cells or ("ERROR", "-", "-")
        table.append((sub, split, *cells, str(len(absent)) if cells[0] != "ERROR" else "-",
                      (str(len(bad)) if open_files else "not opened") if cells[0] != "ERROR" else "-"))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]  # column widths
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)), file=out)
    if not items:
        ok = False
        problems.append(f"no triplet files, galleries or OOD tasks found under {uf.root}")
    if open_files:
        print(f"opened {len(todo)} image/video files in {time.perf_counter() - t0:.1f}s", file=out)
    verdict = "OK: nothing missing" + (" or unreadable" if open_files else " (files not opened: --quick)")
    print(verdict if ok else "MISSING / PROBLEMS:", file=out)
    for p in problems:
        print("  - " + p, file=out)
    return ok


def _check_parse(uf, sub: str, split: str, example_limit: int):
    """One row of `check` before any image is opened: (cells, image paths, video paths, problems).

    cells = (records, gallery size, targets outside the gallery) as text; "-" where the row has no
    records (a published gallery without its triplet file, itself a problem).
    """
    has_recs = sub.startswith("ood/") or sub in uf.subsets(split)
    gal = uf.gallery(sub, split) if (split == "test" or has_recs) else None
    images, videos, own = set(gal.paths) if gal else set(), set(), []
    n_rec, n_out = "-", "-"
    if has_recs:
        view = uf.eval_view(sub, split)
        recs = uf.records(sub, split)
        n_rec, n_out = str(len(recs)), str(view.targets_outside)
        for r in recs:
            images.update(r.path(p) for p in r.query_image + r.target_image)
            # one entry is a clip (file or frame folder); several are its frame images
            (videos if len(r.query_video) == 1 else images).update(r.path(p) for p in r.query_video)
        if not recs:  # train would have nothing to draw from, evaluate nothing to score
            own.append(f"{uf.triplet_file(sub, split)} holds no records")
        if view.targets_outside or view.missing:
            own.append(f"{view.targets_outside} target(s) outside the gallery; {len(view.missing)} "
                       f"record(s) without a positive (e.g. {view.missing[:example_limit]})")
    else:  # a published gallery whose triplet file is absent (the annotations-only checkout)
        own.append(f"gallery {gal.source} parsed ({len(gal.paths)} images) but no {split} triplet "
                   f"file in 0_triplet_files/")
    return (n_rec, str(len(gal.paths)) if gal else "-", n_out), images, videos, own


def _open_all(paths: list, videos: set, progress: bool) -> dict:
    """{path: why it cannot be read} for the paths that fail to decode (with a progress bar).

    A video is a file (every frame decoded) or a folder of frame images (each one opened).
    """
    from tqdm import tqdm  # only `check` needs it: keep `import data` light

    bad = {}
    for p in tqdm(paths, desc="open images/videos", unit="file", disable=not progress, file=sys.stderr):
        try:
            if p in videos:
                read_clip(p)  # every frame of the clip, or every file of the frame folder
            else:
                read_image(p)
        except UFireError as e:  # keep the reason; the row names the file relative to the root
            bad[p] = str(e).split(f"{p}: ", 1)[-1].replace(p, os.path.basename(p))
    return bad


# ------------------------------------------------------------------------------------------------
# data.py's command line
# ------------------------------------------------------------------------------------------------

def parse_data_flags(argv):
    """`python data.py` (the tour: cmd None) or `python data.py check --root PATH [--quick]` -> the
    argparse Namespace (cmd, root, quick)."""
    ap = argparse.ArgumentParser(description="U-FIRE data layer: check a root, or tour the synthetic set.")
    sub = ap.add_subparsers(dest="cmd")
    c = sub.add_parser("check", help="validate a U-FIRE root (exit 1 when anything is missing or unreadable)")
    c.add_argument("--root", required=True)
    c.add_argument("--quick", action="store_true",
                   help="only test that every image and video exists (skip opening them)")
    return ap.parse_args(argv)
