"""Tests for data.py and synthetic.py: the real U-FIRE annotations parse, the synthetic U-FIRE
round-trips through the same loader (and is written byte for byte the same by the API and the CLI),
`check` reports what is missing, and every kind of bad input names its file and record."""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import data
from support import synthetic
from data import UFire, UFireError

REPO = Path(__file__).resolve().parents[1]
REAL_GALLERIES = {
    "t2i/FashionGen", "t2i/Shoes", "sketch2i/ClothesV1", "sketch2i/HAIFashion", "sketch2i/QMUL-Shoe-V2",
    "inshop/DeepFashion", "street2shop/DeepFashion2", "compatibility/FashionVC", "compatibility/Polyvore",
    "video2img/MovingFashion", "cir/Fashion200K", "cir/FashionIQ-Dress", "cir/FashionIQ-Shirt",
    "cir/FashionIQ-Toptee", "cir/Shoes", "sketch&text/CSTBIR", "asfr/DARN", "asfr/FashionAI"}


# ---------------------------------------------------------------------------------------------
# the real annotations
# ---------------------------------------------------------------------------------------------

def test_real_galleries_parse(shared_ufire):
    uf = UFire(shared_ufire)
    assert set(uf.gallery_subsets()) == REAL_GALLERIES  # keyed on task words, not the number
    for sub in uf.gallery_subsets():
        g = uf.gallery(sub)
        assert len(g.paths) > 0 and len(set(g.paths)) == len(g.paths), sub
        assert all(os.path.isabs(p) and p.startswith(str(shared_ufire)) for p in g.paths[:50]), sub
        if sub.startswith("asfr/"):
            assert g.labels and all(k.startswith(sub.split("/")[1] + "+") for k in g.labels)
            assert all(0 <= i < len(g.paths) for ix in g.labels.values() for i in ix)
    # the inshop list repeats entries: the gallery is de-duplicated in first-seen order
    raw = json.load(open(shared_ufire / "0_test_candidates" / "3_inshop_DeepFashion_test_candidates.json"))
    g = uf.gallery("inshop/DeepFashion")
    assert g.raw_count == len(raw) > len(g.paths) == len(set(raw))
    # asfr: the special "<Dataset>_asfr_test_candidate" key is the full gallery
    raw = json.load(open(shared_ufire / "0_test_candidates" / "9_asfr_FashionAI_test_candidate_data.json"))
    assert len(uf.gallery("asfr/FashionAI").paths) == len(set(raw["FashionAI_asfr_test_candidate"]))


def test_real_ood_task(shared_ufire):
    uf = UFire(shared_ufire)
    name = "ood/Image(s)+Text 2 Compatible Item"
    assert name in uf.ood_subsets()
    v = uf.eval_view(name)
    assert len(v.records) == 1000 and v.missing == [] and v.targets_outside == 0
    assert len(v.gallery) == 2302
    r = v.records[0]
    assert r.category and r.query_text and r.query_image
    # paths are relative to the task's own folder
    assert os.path.dirname(v.gallery[0]) == str(shared_ufire / "evaluation_only_tasks" / name[4:])
    for rec, pos in zip(v.records, v.positives):
        assert {v.gallery[i] for i in pos} == {rec.path(p) for p in rec.target_image}


def test_check_on_real_annotations_fails_naming_missing(shared_ufire):
    p = subprocess.run([sys.executable, "data.py", "check", "--root", str(shared_ufire)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "missing image" in p.stdout and "FashionGen_images/" in p.stdout
    assert "no test triplet file" in p.stdout
    for sub in REAL_GALLERIES:  # one row per parsed gallery
        assert sub in p.stdout


# ---------------------------------------------------------------------------------------------
# the synthetic U-FIRE
# ---------------------------------------------------------------------------------------------

def test_synthetic_roundtrip(synthetic_root):
    uf = UFire(synthetic_root)
    subs = uf.subsets("test")
    assert len(subs) >= 12
    assert {data.base_task(s.split("/")[0]) for s in subs} == set(data.TASK_WORDS)
    assert set(uf.ood_subsets()) == {f"ood/{t}" for t in data.OOD_TASKS}
    assert subs == uf.subsets("train") == uf.subsets("val")
    unique = set()
    for sub in subs + uf.ood_subsets():
        v = uf.eval_view(sub, "test")
        assert v.missing == [] and v.targets_outside == 0, sub
        assert len(v.records) > 0 and all(len(p) >= 1 for p in v.positives), sub
        assert len(v.gallery) >= 500, (sub, len(v.gallery))
        assert all(os.path.isfile(p) for p in v.gallery), sub
        for r in v.records:
            assert all(os.path.exists(r.path(p)) for p in r.query_image + r.query_video), r.id
        if not sub.startswith("ood/"):
            unique.update(v.gallery)
            vv = uf.eval_view(sub, "val")
            assert vv.missing == [] and len(vv.records) >= 20, sub
    assert len(unique) <= 9000  # keeps a full test evaluation within its time budget
    sizes = {s: len(uf.records(s, "train")) for s in subs}
    assert max(sizes.values()) >= 10 * min(sizes.values()), sizes
    # images are 64x64 RGB PNGs; the video is an animated GIF with motion
    v = uf.eval_view("video2img/SynVideo")
    im = Image.open(v.gallery[0])
    assert im.format == "PNG" and im.size == (64, 64) and im.mode == "RGB"
    r = v.records[0]
    frames = data.load_frames(r.path(r.query_video[0]), 4, 64)
    assert len(frames) == 4 and frames[0].tobytes() != frames[-1].tobytes()


def test_synthetic_task_semantics(synthetic_root):
    uf = UFire(synthetic_root)
    # asfr: every gallery image under the query's label is a positive, the label names an attribute
    v = uf.eval_view("asfr/SynAttr")
    g = uf.gallery("asfr/SynAttr")
    for r, pos in zip(v.records, v.positives):
        assert r.target_label.split("+")[1] == r.attribute and pos == g.labels[r.target_label]
    # cir: the reference image is in the gallery but is not a positive (hard negative)
    v = uf.eval_view("cir/SynCIR-Top")
    idx = {p: i for i, p in enumerate(v.gallery)}
    hard = sum(idx.get(r.path(r.query_image[0])) is not None for r in v.records)
    assert hard >= len(v.records) // 2
    assert all(idx.get(r.path(r.query_image[0])) not in pos for r, pos in zip(v.records, v.positives))
    # t2i: every distractor differs, yet the captions name every factor of the target
    r = uf.records("t2i/SynGen", "test")[0]
    assert r.query_text in r.instruction_text and len(r.target_image) == 2
    # compatibility: colour rule holds between the outfit and its target
    for r in uf.records("compatibility/SynOutfit", "test")[:50]:
        cols = [os.path.basename(p).split("+")[2] for p in r.query_image + r.target_image]
        assert synthetic.colours_compatible(cols), r.id


def test_train_view_pairs(synthetic_root):
    uf = UFire(synthetic_root)
    subs = uf.subsets("train")
    tv = uf.train_view(subs, image_size=32, max_images=2, num_frames=3)
    assert tv.sizes == {s: len(uf.records(s, "train")) for s in subs}
    rng = random.Random(0)
    for s in subs:
        p = tv.pair(s, 0, rng)
        r = tv.record(s, 0)
        assert p.target.size == (32, 32)
        # The in-batch positive key: the drawn image itself, or for asfr the label (every image
        # under it is correct, so two queries with the same label must not repel each other).
        if r.target_label:
            assert p.target_key == f"label:{r.target_label}"
        else:
            assert p.target_key in {r.path(t) for t in r.target_image}
        assert len(p.query.images) <= 2 and all(im.size == (32, 32) for im in p.query.images)
        assert len(p.query.frames) == (3 if r.query_video else 0)
    # several targets / sketches are drawn at random, the eval query is deterministic
    keys = {tv.pair("t2i/SynGen", 0, random.Random(i)).target_key for i in range(20)}
    assert len(keys) == 2
    r = tv.record("sketch2i/SynSketch", 0)
    assert len(r.query_image) == 3
    q1, q2 = data.record_to_query(r, 32), data.record_to_query(r, 32)
    assert len(q1.images) == 1 and q1.images[0].tobytes() == q2.images[0].tobytes()


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_deterministic(tmp_path):
    a, b, c, d = tmp_path / "a", tmp_path / "b", tmp_path / "c", tmp_path / "d"
    synthetic.generate_synthetic(a, seed=3, scale=0.04, workers=1, verbose=False)
    synthetic.generate_synthetic(b, seed=3, scale=0.04, workers=2, verbose=False)
    ha, hb = _hashes(a), _hashes(b)
    assert len(ha) > 100 and ha == hb  # same seed -> same bytes, whatever the worker count
    synthetic.generate_synthetic(c, seed=4, scale=0.04, workers=2, verbose=False)
    assert _hashes(c) != ha
    # the command line writes the same bytes as the function
    p = subprocess.run([sys.executable, "-m", "support.synthetic", "--out", str(d), "--seed", "3", "--scale", "0.04",
                        "--workers", "1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert _hashes(d) == ha
    # writing over an existing set replaces it whole (atomic_write), leaving no temporary behind
    synthetic.generate_synthetic(c, seed=3, scale=0.04, workers=1, verbose=False)
    assert _hashes(c) == ha
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp / old folders gone


def test_ensure_synthetic_reuses(tmp_path):
    root = synthetic.ensure_synthetic(str(tmp_path / "s"), seed=1, scale=0.03)
    stamp = os.stat(Path(root) / synthetic.INFO_FILE).st_mtime_ns
    assert synthetic.ensure_synthetic(str(tmp_path / "s"), seed=1, scale=0.03) == root
    assert os.stat(Path(root) / synthetic.INFO_FILE).st_mtime_ns == stamp  # not regenerated
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("mine")
    with pytest.raises(synthetic.SyntheticError, match="not a synthetic U-FIRE"):
        synthetic.ensure_synthetic(str(tmp_path / "other"))
    assert (tmp_path / "other" / "x.txt").read_text() == "mine"  # nothing overwritten


def test_synthetic_agrees_with_the_registry():
    # synthetic.py keeps its own copies (a support file imports no core file): they must not drift
    assert synthetic.OOD_TASKS == data.OOD_TASKS
    assert synthetic.TASK_WORDS == data.TASK_WORDS
    assert set(synthetic.PLANNERS) == set(data.TASK_WORDS)  # one planner per task word
    assert set(synthetic.INSTRUCTIONS) == set(data.TASKS)  # phrasings for every task, OOD included
    assert {s.task for s in synthetic.SYNTH_SUBSETS} == set(data.TASK_WORDS)
    imported = set()  # imports flow one way: support -> core, never back
    for node in ast.walk(ast.parse((REPO / "support" / "synthetic.py").read_text())):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert not imported & {"data", "model", "train", "evaluate"}, imported
    # items are named tuples: the fields read as what they are, equality stays a tuple's
    g = synthetic.random_item(random.Random(0))
    assert isinstance(g, synthetic.Garment) and g == tuple(g)
    assert synthetic.item_code(g) == "+".join((g.category, g.colour, g.pattern) + g.attrs)


def test_check_passes_on_synthetic(synthetic_root):
    p = subprocess.run([sys.executable, "data.py", "check", "--root", str(synthetic_root)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "OK: nothing missing" in p.stdout and "cir/SynCIR-Top" in p.stdout


# ---------------------------------------------------------------------------------------------
# bad input -> one error naming the file and the record
# ---------------------------------------------------------------------------------------------

def _mini_root(tmp_path: Path, records, fname="7_cir_Mini-Set_train_triplet_data.json", raw=None) -> Path:
    root = tmp_path / "root"
    (root / "0_triplet_files").mkdir(parents=True)
    (root / "Mini_images").mkdir()
    for n in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), (200, 10, 10)).save(root / "Mini_images" / n)
    f = root / "0_triplet_files" / fname
    f.write_text(raw if raw is not None else json.dumps(records))
    return root


def _rec(**kw):
    r = {"id": "cir_Mini-Set_0000001", "task": "cir", "dataset": "Mini-Set", "split": "train",
         "instruction_text": "Find it, but red", "query_text": "red",
         "query_image": ["Mini_images/a.png"], "target_image": ["Mini_images/b.png"]}
    r.update(kw)
    return {k: v for k, v in r.items() if v is not None}


def test_file_names_keyed_on_task_words(tmp_path):
    root = _mini_root(tmp_path, [_rec()], fname="42_cir_Mini-Set_train_triplet_data.json")
    (root / "0_triplet_files" / "1_sketch&text_CS-TB_IR_val_triplet_data.json").write_text(json.dumps(
        [_rec(id="x", task="sketch&text", dataset="CS-TB_IR", split="val")]))
    uf = UFire(root)
    assert uf.subsets("train") == ["cir/Mini-Set"] and uf.subsets("val") == ["sketch&text/CS-TB_IR"]
    q = data.record_to_query(uf.records("cir/Mini-Set", "train")[0], 16)
    assert q.instruction == "Find it, but red" and q.images[0].size == (16, 16)
    assert data.base_task("inshop-tryon") == "inshop" and data.base_task("sketch&text") == "sketch&text"
    with pytest.raises(UFireError):
        data.base_task("sketch2text")


def test_bad_missing_image(tmp_path):
    root = _mini_root(tmp_path, [_rec(), _rec(id="bad_2", query_image=["Mini_images/nope.png"])])
    r = UFire(root).records("cir/Mini-Set", "train")[1]
    with pytest.raises(UFireError) as e:
        data.record_to_query(r, 16)
    msg = str(e.value)
    assert "missing image" in msg and "nope.png" in msg and "bad_2" in msg and "#1" in msg
    assert "7_cir_Mini-Set_train_triplet_data.json" in msg


def test_bad_corrupt_image(tmp_path):
    root = _mini_root(tmp_path, [_rec(id="corrupt_1")])
    (root / "Mini_images" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    tv = UFire(root).train_view(["cir/Mini-Set"], 16)
    with pytest.raises(UFireError) as e:
        tv.pair("cir/Mini-Set", 0, random.Random(0))
    msg = str(e.value)
    assert "unreadable image" in msg and "b.png" in msg and "corrupt_1" in msg
    assert "7_cir_Mini-Set_train_triplet_data.json" in msg


def test_bad_record_without_target(tmp_path):
    root = _mini_root(tmp_path, [_rec(), _rec(id="no_target", target_image=None)])
    with pytest.raises(UFireError) as e:
        UFire(root).records("cir/Mini-Set", "train")
    msg = str(e.value)
    assert "no target_image" in msg and "no_target" in msg and "#1" in msg
    assert "7_cir_Mini-Set_train_triplet_data.json" in msg


def test_bad_unknown_task(tmp_path):
    root = _mini_root(tmp_path, [_rec(id="weird", task="sketch2text")])
    with pytest.raises(UFireError) as e:
        UFire(root).records("cir/Mini-Set", "train")
    msg = str(e.value)
    assert "unknown task" in msg and "sketch2text" in msg and "weird" in msg
    assert "7_cir_Mini-Set_train_triplet_data.json" in msg
    # an unknown task word in a file name is named with the file
    (root / "0_triplet_files" / "3_shop2shop_X_train_triplet_data.json").write_text("[]")
    with pytest.raises(UFireError, match="3_shop2shop_X_train_triplet_data.json.*unknown task"):
        UFire(root)


def test_bad_malformed_json(tmp_path):
    root = _mini_root(tmp_path, None, raw='[{"id": "a", "task": "cir",,}]')
    with pytest.raises(UFireError) as e:
        UFire(root).records("cir/Mini-Set", "train")
    assert "malformed JSON" in str(e.value) and "7_cir_Mini-Set_train_triplet_data.json" in str(e.value)
    # valid JSON but a malformed record (wrong field type) names the record
    root2 = _mini_root(tmp_path / "2", [_rec(), _rec(id="typed", query_image=[3])])
    with pytest.raises(UFireError, match=r"'typed' \(#1\).*query_image"):
        UFire(root2).records("cir/Mini-Set", "train")


def test_video_readers(tmp_path):
    frames = [Image.new("RGB", (10, 10), (i * 30, 0, 0)) for i in range(6)]
    d = tmp_path / "clip"
    d.mkdir()
    for i, f in enumerate(frames):
        f.save(d / f"{i:03d}.png")
    got = data.load_frames(d, 3, 8)
    assert [f.getpixel((0, 0))[0] for f in got] == [30, 90, 150]  # segment centres, in order
    frames[0].save(tmp_path / "clip.webp", save_all=True, append_images=frames[1:], lossless=True)
    assert len(data.load_frames(tmp_path / "clip.webp", 4, 8)) == 4


def _write_mp4(path: Path, frames: list) -> bool:
    """Encode frames as an mp4 with whichever optional reader/writer is installed; False if none can."""
    try:
        import av
    except ImportError:
        av = None
    if av is not None:
        with av.open(str(path), mode="w") as box:
            stream = box.add_stream("mpeg4", rate=5)
            stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, "yuv420p"
            for f in frames:
                box.mux(stream.encode(av.VideoFrame.from_image(f)))
            box.mux(stream.encode())  # flush the encoder
        return True
    try:
        import imageio.v3 as iio
        import numpy as np

        iio.imwrite(path, np.stack([np.asarray(f) for f in frames]), fps=5)
        return True
    except Exception:  # noqa: BLE001 -- no imageio, or no mp4 plugin for it: nothing can write one
        return False


def test_mp4_frames_with_a_reader_or_a_clear_error_without(tmp_path):
    """With PyAV or imageio: an mp4's frames come back in order, one per segment (6 frames -> 1, 3, 5).
    Without: one UFireError naming the file and the packages to install. Either way a damaged mp4
    is a UFireError naming the file, never a decoder's traceback."""
    frames = [Image.new("RGB", (32, 32), (40 * i, 120, 60)) for i in range(6)]  # red channel 0, 40, ..., 200
    clip = tmp_path / "clip.mp4"
    readers = [m for m in ("av", "imageio") if importlib.util.find_spec(m) is not None]
    if not readers:
        clip.write_bytes(b"\x00" * 16)
        with pytest.raises(UFireError, match=r"clip\.mp4.*mp4 needs the optional package 'av' or 'imageio'"):
            data.load_frames(clip, 4)
        return
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 16)
    with pytest.raises(UFireError, match=r"broken\.mp4"):
        data.load_frames(broken, 4)
    if not _write_mp4(clip, frames):
        pytest.skip(f"{readers} installed but cannot write an mp4 here; the damaged-file check ran")
    got = data.load_frames(clip, 3, 16)
    assert [f.size for f in got] == [(16, 16)] * 3
    reds = [f.getpixel((8, 8))[0] for f in got]
    assert all(abs(r - want) <= 20 for r, want in zip(reds, (40, 120, 200))), reds  # lossy codec: roughly


# ---------------------------------------------------------------------------------------------
# query images and video times (the authors' recipe: all sketches, caps, frame times)
# ---------------------------------------------------------------------------------------------

def _sketch_root(tmp_path: Path, n: int = 6) -> Path:
    """A root with one sketch2i training record whose n query sketches differ (red channel 10 * i)."""
    rec = _rec(id="sk_1", task="sketch2i", query_text=None, instruction_text="Find the product in the sketch",
               query_image=[f"Mini_images/s{i}.png" for i in range(n)])
    root = _mini_root(tmp_path, [rec], fname="2_sketch2i_Mini-Set_train_triplet_data.json")
    for i in range(n):
        Image.new("RGB", (30, 20), (10 * i, 0, 0)).save(root / "Mini_images" / f"s{i}.png")
    return root


def _reds(q) -> list[int]:
    return [im.getpixel((0, 0))[0] // 10 for im in q.images]  # which sketches, in prompt order


def test_query_images_sketches_caps_and_max(tmp_path):
    """sketches="one": one sketch (the first at eval, a random one at training); "all": every sketch
    in one prompt; image_cap: a random sample of that many at training (the authors' random.sample),
    the first ones at eval; max_images: the first ones at eval, 0 = all. Images keep their size."""
    root = _sketch_root(tmp_path)
    r = UFire(root).records("sketch2i/Mini-Set", "train")[0]
    assert _reds(data.record_to_query(r)) == [0]
    assert {tuple(_reds(data.record_to_query(r, rng=random.Random(i)))) for i in range(30)} == {(i,) for i in range(6)}
    assert _reds(data.record_to_query(r, sketches="all", max_images=0)) == [0, 1, 2, 3, 4, 5]
    assert _reds(data.record_to_query(r, sketches="all", max_images=4)) == [0, 1, 2, 3]  # evaluate.py 54
    assert _reds(data.record_to_query(r, sketches="all", max_images=8, image_cap=5)) == [0, 1, 2, 3, 4]
    draws = [_reds(data.record_to_query(r, sketches="all", max_images=8, image_cap=5, rng=random.Random(i)))
             for i in range(20)]
    assert all(len(d) == 5 == len(set(d)) for d in draws)
    assert len({tuple(sorted(d)) for d in draws}) > 1 and any(d != sorted(d) for d in draws)  # random, unordered
    q = data.record_to_query(r, sketches="all", max_images=0)
    assert [im.size for im in q.images] == [(30, 20)] * 6  # native size: the model's processor resizes
    assert [im.size for im in data.record_to_query(r, 16, sketches="all").images] == [(16, 16)] * 4
    with pytest.raises(ValueError, match="sketches='some'"):
        data.record_to_query(r, sketches="some")
    # train_view hands every option on; a sub-dataset's cap comes from image_caps.
    tv = UFire(root).train_view(["sketch2i/Mini-Set"], max_images=8, sketches="all",
                                image_caps={"sketch2i/Mini-Set": 5})
    pair = tv.pair("sketch2i/Mini-Set", 0, random.Random(0))
    assert len(pair.query.images) == 5 and pair.target.size == (8, 8)  # target at its native size too
    tv = UFire(root).train_view(["sketch2i/Mini-Set"], max_images=8, sketches="all", image_caps={"other/X": 2})
    assert len(tv.pair("sketch2i/Mini-Set", 0, random.Random(0)).query.images) == 6


def test_frame_times(tmp_path):
    """Each frame's second in its clip: a GIF from its frame durations (a frame with none counts 1 / 2 s),
    a frame folder and a list of frame files at data.FRAME_LIST_FPS = 2 (qwen-vl-utils' assumption)."""
    frames = [Image.new("RGB", (12, 12), (40 * i, 0, 0)) for i in range(5)]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=[100, 200, 300, 400, 500],
                   loop=0)
    got, times = data.load_video(tmp_path / "clip.gif", 5)
    assert [f.getpixel((0, 0))[0] // 40 for f in got] == [0, 1, 2, 3, 4]
    assert times == pytest.approx([0.0, 0.1, 0.3, 0.6, 1.0])
    got, times = data.load_video(tmp_path / "clip.gif", 2)  # segment centres: frames 1 and 3
    assert [f.getpixel((0, 0))[0] // 40 for f in got] == [1, 3] and times == pytest.approx([0.1, 0.6])
    assert data.load_frames(tmp_path / "clip.gif", 2)[1].tobytes() == got[1].tobytes()
    d = tmp_path / "folder"
    d.mkdir()
    for i, f in enumerate(frames):
        f.save(d / f"{i:03d}.png")
    assert data.load_video(d, 3)[1] == [0.0, 1.0, 2.0]  # frames 0, 2, 4 at 2 per second
    assert data.FRAME_LIST_FPS == 2.0
    # Through a record: one clip (the GIF), or its frames listed one by one (untimed).
    root = _mini_root(tmp_path / "r", [_rec(id="v1", task="video2img", query_image=None, query_text=None,
                                             query_video=["clip.gif"]),
                                        _rec(id="v2", task="video2img", query_image=None, query_text=None,
                                             query_video=[f"folder/{i:03d}.png" for i in range(5)])],
                      fname="6_video2img_Mini-Set_train_triplet_data.json")
    os.replace(tmp_path / "clip.gif", root / "clip.gif")
    os.replace(d, root / "folder")
    v1, v2 = UFire(root).records("video2img/Mini-Set", "train")
    q = data.record_to_query(v1, num_frames=5)
    assert q.frame_times == pytest.approx([0.0, 0.1, 0.3, 0.6, 1.0]) and q.images == []
    assert data.record_to_query(v2, num_frames=2).frame_times == [0.5, 1.5]  # frames 1 and 3
    assert data.Query("text").frame_times == []


def test_relative_synthetic_paths_are_taken_from_the_repository_root(monkeypatch):
    """data/synthetic is the repository's (the default job, the notebooks and evaluate.py share it),
    whichever folder the generator's module sits in."""
    assert synthetic.REPO == REPO and (synthetic.REPO / "train.py").is_file()
    made = []
    monkeypatch.setattr(synthetic, "generate_synthetic", lambda out, *a, **k: made.append(Path(out)))
    monkeypatch.setattr(synthetic, "INFO_FILE", "no-such-info-file.json")
    try:
        synthetic.ensure_synthetic("data/elsewhere-never-written")
    except Exception:
        pass  # the stub writes nothing, so what follows it may fail: only the path it was given matters
    assert made and made[0] == REPO / "data" / "elsewhere-never-written", made


# issue 30, item 2: more query images than the cap (an outfit keeps its order)
# ---------------------------------------------------------------------------------------------

def test_a_training_draw_of_a_long_outfit_keeps_its_order(tmp_path):
    """A compatibility record with 7 outfit images (red channel 10 * i tells them apart), max_images 4:
    evaluation keeps the first 4 (as the authors keep the first ones: their evaluate.py 54, [0:8]); a
    training draw keeps a random 4 of the 7, distinct and in the outfit's order (an outfit is read in
    order: top, bottom, shoes...).
    Over 20 seeds more than one subset is drawn, so the order check is not on one lucky draw."""
    rec = _rec(id="co_1", task="compatibility", query_text=None, instruction_text="Complete the outfit",
               query_image=[f"Mini_images/s{i}.png" for i in range(7)])
    root = _mini_root(tmp_path, [rec], fname="8_compatibility_Mini-Set_train_triplet_data.json")
    for i in range(7):
        Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(root / "Mini_images" / f"s{i}.png")
    r = UFire(root).records("compatibility/Mini-Set", "train")[0]
    assert _reds(data.record_to_query(r, max_images=4)) == [0, 1, 2, 3]
    draws = [_reds(data.record_to_query(r, max_images=4, rng=random.Random(seed))) for seed in range(20)]
    for d in draws:
        assert len(d) == 4 and d == sorted(set(d)) and set(d) <= set(range(7)), d  # ordered, distinct subset
    assert len({tuple(d) for d in draws}) > 1


# ---------------------------------------------------------------------------------------------
# issue 31 item 2: the no-mp4-reader path, now that PyAV (brought by qwen-vl-utils) is installed
# ---------------------------------------------------------------------------------------------

def test_mp4_without_a_reader_is_one_clear_error_even_with_pyav_installed(tmp_path, monkeypatch):
    """PyAV is pinned (requirements.txt, via qwen-vl-utils), so test_mp4_frames_with_a_reader_... takes
    its reader branch; this one hides both optional readers (ufire_files._read_mp4 imports `av`, then
    `imageio.v3`) and holds the documented error: one UFireError naming the file and the packages,
    raised before any decoding (a valid mp4 and a damaged one give the same message)."""
    clip = tmp_path / "clip.mp4"
    assert _write_mp4(clip, [Image.new("RGB", (16, 16), (i * 40, 0, 0)) for i in range(4)])  # PyAV writes it
    assert len(data.load_frames(clip, 4)) == 4  # and data.py reads it while PyAV is visible
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    monkeypatch.setitem(sys.modules, "imageio", None)
    monkeypatch.setitem(sys.modules, "imageio.v3", None)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 16)
    for path in (clip, broken):
        with pytest.raises(UFireError, match=rf"cannot read video .*{path.name}: mp4 needs the optional "
                                             r"package 'av' or 'imageio'; or store the video as a frame folder"):
            data.load_frames(path, 4)
