"""Reliability of the data and evaluation side: no silently wrong result, no raw traceback.

Every kind of bad input gets exit status 1 and one `error:` line naming the file, record or flag,
without a traceback, and nothing already written is lost; images of every mode load as the picture
they hold; `data.py check` opens what it lists; a damaged gallery cache is caught and replaced;
empty sub-datasets never turn into NaN. Everything runs on a synthetic U-FIRE at scale 0.03 and a
checkpoint of the untrained tiny embedder (saved, not trained).
"""
from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate as ev
from support import cli, fast_infer, synthetic
from support.errors import EvalError
from data import UFireError

REPO = Path(__file__).resolve().parents[1]
TASKS = ["--tasks", "t2i,cir", "--ood", "skip"]  # 5 sub-datasets, 257 gallery images, 40 queries


# ---------------------------------------------------------------------------------------------
# fixtures: the tiny root and the untrained checkpoint come from conftest (session-wide, never modified)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(untrained_ckpt) -> Path:
    """The untrained tiny checkpoint (conftest.untrained_ckpt); never modified."""
    return untrained_ckpt


@pytest.fixture(scope="module")
def embedder(ckpt):
    """The checkpoint, loaded once (as evaluate.py loads it)."""
    from model import FashionLensEmbedder

    emb = FashionLensEmbedder.from_pretrained(str(ckpt), device="cpu")
    emb.eval()
    return emb


def _copy(src: Path, dst: Path) -> Path:
    """A private copy of a root or checkpoint that a test may damage."""
    shutil.copytree(src, dst)
    return dst


def _one_error_line(err: str, *names: str) -> str:
    """stderr is exactly one `error:` line, without a traceback, naming every one of `names`."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in names:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _strict_json(text: str):
    """json.loads that refuses NaN / Infinity (which Python writes by default, and JSON forbids)."""
    def refuse(c):
        raise AssertionError(f"non-JSON constant {c} in the output")
    return json.loads(text, parse_constant=refuse)


# ---------------------------------------------------------------------------------------------
# 1. images of every mode become the picture they hold
# ---------------------------------------------------------------------------------------------

def _saved(im: Image.Image, path: Path, **kw) -> Path:
    im.save(path, **kw)
    return path


GRADIENT = np.tile(np.arange(256, dtype=np.uint8), (4, 1))  # (4, 256) every grey level once per row


def test_16bit_png_loads_as_its_gradient_not_white(tmp_path):
    # An 8-bit gradient stored with 16 bits per pixel (v * 257, how 8 -> 16 bit export scales):
    # the file's full scale is 0..65535, so it must come back as the same 8-bit gradient.
    p = _saved(Image.fromarray(GRADIENT.astype(np.uint16) * 257), tmp_path / "g16.png")
    with Image.open(p) as im:
        assert im.mode == "I;16"
        clipped = np.asarray(im.convert("RGB"))  # (4, 256, 3) Pillow's plain conversion, for contrast
    assert (clipped == 255).mean() > 0.9  # what the old loader gave: almost all white
    got = np.asarray(data.load_image(p))  # (4, 256, 3)
    assert got.dtype == np.uint8 and got.shape == (4, 256, 3)
    assert np.array_equal(got[..., 0], GRADIENT) and np.array_equal(got[..., 1], got[..., 2])
    # a 12-bit picture in a 16-bit file stays a (dark) gradient: strictly increasing, never clipped
    p12 = _saved(Image.fromarray(np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (2, 1))), tmp_path / "g12.png")
    row = np.asarray(data.load_image(p12))[0, :, 0].astype(int)  # (256,)
    assert row[0] == 0 and row[-1] == round(4080 / 257) and np.all(np.diff(row) >= 0) and row.max() < 255


def test_32bit_integer_and_float_images_are_scaled_not_clipped(tmp_path):
    # 32-bit integers holding 16-bit values (how several TIFF writers store 16-bit grey)
    p_i = _saved(Image.fromarray(GRADIENT.astype(np.int32) * 257), tmp_path / "i32.tif")
    # floats in [0, 1], the usual float-image convention
    p_f = _saved(Image.fromarray(GRADIENT.astype(np.float32) / 255), tmp_path / "f32.tif")
    for p, mode in ((p_i, "I"), (p_f, "F")):
        with Image.open(p) as im:
            assert im.mode == mode
        assert np.array_equal(np.asarray(data.load_image(p))[..., 0], GRADIENT), mode
    # floats outside every usual scale (here -1..1): stretched from their own range, not clipped
    ramp = np.tile(np.linspace(-1, 1, 256, dtype=np.float32), (2, 1))  # (2, 256)
    got = np.asarray(data.load_image(_saved(Image.fromarray(ramp), tmp_path / "signed.tif")))[0, :, 0]
    assert got[0] == 0 and got[-1] == 255 and np.all(np.diff(got.astype(int)) >= 0)
    # NaN has no picture: a clear error naming the file and the record, not a black or white image
    nan = np.zeros((2, 2), np.float32)
    nan[0, 0] = np.nan
    p_nan = _saved(Image.fromarray(nan), tmp_path / "nan.tif")
    rec = data.Record(id="r7", instruction_text="x", target_image=["nan.tif"], source="F.json", index=3)
    with pytest.raises(UFireError, match=r"unreadable image .*nan\.tif \(record 'r7' \(#3\) in F\.json\).*NaN"):
        data.load_image(p_nan, record=rec)


def test_transparency_cmyk_palette_and_bilevel_load_with_their_colours(tmp_path):
    white, black, red = (255, 255, 255), (0, 0, 0), (255, 0, 0)
    px = lambda p, size=None: [tuple(int(c) for c in v) for v in np.asarray(data.load_image(p, size)).reshape(-1, 3)]  # noqa: E731
    # RGBA: opaque red; fully transparent with black stored under it; blue at half opacity
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 255), (0, 0, 0, 0), (0, 0, 255, 128)])
    got = px(_saved(rgba, tmp_path / "rgba.png"))
    assert got[:2] == [red, white]  # the transparent pixel is the white background, not black
    assert got[2][2] == 255 and abs(got[2][0] - 127) <= 1 and got[2][0] == got[2][1]
    # LA: a black-stroke sketch on a transparent background stays a sketch (not a black square)
    la = Image.new("LA", (2, 1))
    la.putdata([(0, 255), (0, 0)])
    assert px(_saved(la, tmp_path / "la.png")) == [black, white]
    # P with a transparent palette index (tRNS)
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 0, 0] + [0] * 762)
    pal.putdata([0, 1])
    assert px(_saved(pal, tmp_path / "p.png", transparency=1)) == [red, white]
    # PA (palette + alpha band): composited the same way
    pa = Image.new("PA", (2, 1))
    pa.putpalette([255, 0, 0] * 256)
    pa.putdata([(0, 255), (0, 0)])
    from support.ufire_files import to_rgb  # the decoder data.load_image calls
    assert to_rgb(pa).getpixel((0, 0)) == red and to_rgb(pa).getpixel((1, 0)) == white
    # CMYK (print files): C=0 M=Y=255 is red, K=255 black, nothing is paper white
    cmyk = Image.new("CMYK", (3, 1))
    cmyk.putdata([(0, 255, 255, 0), (0, 0, 0, 255), (0, 0, 0, 0)])
    assert px(_saved(cmyk, tmp_path / "cmyk.tif")) == [red, black, white]
    jpg = px(_saved(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=95))
    assert all(abs(a - b) <= 3 for a, b in zip(jpg[0], red))  # lossy, but red
    # mode 1 (bi-level)
    one = Image.new("1", (2, 1))
    one.putdata([0, 255])
    assert px(_saved(one, tmp_path / "one.png")) == [black, white]


def test_rgb_and_grey_images_load_exactly_as_before(tiny_root, tmp_path):
    # The synthetic set is RGB (and sketches could be L): these must not change by a single byte,
    # or every result of the project would move. "Before" = Pillow's convert("RGB") + bicubic resize.
    paths = sorted(tiny_root.glob("*_images/*.png"))[:40]
    grey = _saved(Image.fromarray(GRADIENT), tmp_path / "grey.png")
    for p in paths + [grey]:
        with Image.open(p) as im:
            assert im.mode in ("RGB", "L")
            before = im.convert("RGB")
        for size in (None, 32):
            want = before if size is None else before.resize((size, size), Image.BICUBIC)
            assert data.load_image(p, size).tobytes() == want.tobytes(), p


def test_undecodable_image_names_file_and_record(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("this is text, not a PNG\n")
    rec = data.Record(id="cir_9", instruction_text="x", target_image=["notes.png"], source="T.json", index=9)
    with pytest.raises(UFireError, match=r"unreadable image .*notes\.png \(record 'cir_9' \(#9\) in T\.json\)"):
        data.load_image(p, record=rec)


# ---------------------------------------------------------------------------------------------
# 2. `data.py check` opens every image and video
# ---------------------------------------------------------------------------------------------

def _damage_root(root: Path) -> dict:
    """Break one file of four kinds in four sub-datasets; return {kind: (relative path, subset)}."""
    def first_target(sub_file: str) -> str:
        return json.loads((root / "0_triplet_files" / sub_file).read_text())[0]["target_image"][0]

    zero = first_target("1_t2i_SynGen_test_triplet_data.json")
    (root / zero).write_bytes(b"")  # zero bytes
    trunc = first_target("7_cir_SynCIR-Top_test_triplet_data.json")
    raw = (root / trunc).read_bytes()
    (root / trunc).write_bytes(raw[: len(raw) // 2])  # a download cut in half
    text = first_target("3_inshop_SynInshop_test_triplet_data.json")
    (root / text).write_text("<html>404 not found</html>\n")  # a text file named .png
    vid = json.loads((root / "0_triplet_files" / "6_video2img_SynVideo_test_triplet_data.json")
                     .read_text())[0]["query_video"][0]
    raw = (root / vid).read_bytes()
    (root / vid).write_bytes(raw[: len(raw) // 3])  # a truncated GIF clip
    return {"zero": (zero, "t2i/SynGen"), "truncated": (trunc, "cir/SynCIR-Top"),
            "text": (text, "inshop/SynInshop"), "video": (vid, "video2img/SynVideo")}


def test_check_opens_every_file_and_reports_unreadable_ones(tiny_root, tmp_path, capsys):
    root = _copy(tiny_root, tmp_path / "root")
    assert data.main(["check", "--root", str(root)]) == 0  # a sound root passes the full check
    out = capsys.readouterr().out
    assert "OK: nothing missing or unreadable" in out and "opened " in out
    damaged = _damage_root(root)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    # --quick keeps the old existence-only pass: every file exists, so it passes
    assert data.main(["check", "--root", str(root), "--quick"]) == 0
    assert "OK: nothing missing" in capsys.readouterr().out
    # the full check fails and names each file in the row of its sub-dataset
    assert data.main(["check", "--root", str(root)]) == 1
    cap = capsys.readouterr()
    assert "Traceback" not in cap.out + cap.err and "MISSING / PROBLEMS:" in cap.out
    problems = [ln for ln in cap.out.splitlines() if ln.startswith("  - ")]
    for kind, (rel, sub) in damaged.items():
        hit = [ln for ln in problems if rel in ln]
        assert len(hit) >= 1 and all("unreadable image/video file(s)" in ln for ln in hit), (kind, problems)
        assert any(ln.startswith(f"  - {sub} [test]:") for ln in hit), (kind, hit)
    # rows without damage stay clean; `check` changed nothing on disk
    assert not any(ln.startswith("  - cir/SynCIR-Dress") for ln in problems)
    assert before == {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_check_flags_an_empty_triplet_file_and_a_bad_root(tiny_root, tmp_path, capsys):
    root = _copy(tiny_root, tmp_path / "root")
    f = root / "0_triplet_files" / "7_cir_SynCIR-Top_val_triplet_data.json"
    f.write_text("[]\n")
    assert data.main(["check", "--root", str(root), "--quick"]) == 1
    out = capsys.readouterr().out
    assert f"cir/SynCIR-Top [val]: {f} holds no records" in out
    # a root that does not exist: one error line, exit 1
    assert data.main(["check", "--root", str(tmp_path / "nope")]) == 1
    _one_error_line(capsys.readouterr().err, str(tmp_path / "nope"))


def test_check_cli_process_exit_status_and_no_traceback(tiny_root, tmp_path):
    root = _copy(tiny_root, tmp_path / "root")
    _damage_root(root)
    (root / "0_triplet_files" / "1_t2i_SynShoes_test_triplet_data.json").write_text('[{"id": 1,,}]')
    p = subprocess.run([sys.executable, "data.py", "check", "--root", str(root)], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    assert "1_t2i_SynShoes_test_triplet_data.json: malformed JSON at line 1" in p.stdout
    assert "unreadable image/video file(s)" in p.stdout


# ---------------------------------------------------------------------------------------------
# 3. the gallery cache proves its content
# ---------------------------------------------------------------------------------------------

def _swap_rows(raw: bytes) -> bytes:
    a = np.load(io.BytesIO(raw))
    a[[0, 1]] = a[[1, 0]]  # two images trade embeddings: shape and dtype stay right
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _garble_header(raw: bytes) -> bytes:
    a = np.load(io.BytesIO(raw))
    return raw.replace(str(a.shape).encode(), str((a.shape[1], a.shape[0])).encode(), 1)  # (G, D) -> (D, G)


DAMAGE = {
    "random": lambda raw: np.random.default_rng(0).integers(0, 256, len(raw), dtype=np.uint8).tobytes(),
    "zeroed": lambda raw: bytes(len(raw)),
    "swapped_rows": _swap_rows,
    "truncated": lambda raw: raw[: len(raw) // 2],
    "garbled_header": _garble_header,
    "random_data_valid_header": lambda raw: raw[:128] + np.random.default_rng(1).standard_normal(
        (len(raw) - 128) // 4).astype(np.float32).tobytes(),
}


@pytest.fixture(scope="module")
def clean_cache(tiny_root, embedder, tmp_path_factory):
    """One evaluation that fills a cache: (its rows' recalls, the cache file's name, its bytes)."""
    cache = tmp_path_factory.mktemp("cache")
    uf = data.UFire(str(tiny_root))
    subs = uf.select("test", "t2i,cir", "skip")
    res = ev.evaluate(embedder, uf, subs, cache_dir=str(cache), progress=False)
    (f,) = list(cache.iterdir())
    return [r.recall for r in res.rows], f.name, f.read_bytes()


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_cache_is_reported_recomputed_and_replaced(kind, tiny_root, embedder, clean_cache, tmp_path, capsys):
    recalls, name, raw = clean_cache
    assert name.endswith(".npy") and ".sha256-" in name  # the checksum travels with the file
    cache = tmp_path / "cache"
    cache.mkdir()
    bad = DAMAGE[kind](raw)
    assert bad != raw
    (cache / name).write_bytes(bad)
    uf = data.UFire(str(tiny_root))
    subs = uf.select("test", "t2i,cir", "skip")
    res = ev.evaluate(embedder, uf, subs, cache_dir=str(cache), progress=False)
    err = capsys.readouterr().err
    warn = [ln for ln in err.splitlines() if ln.startswith("warning: gallery cache")]
    assert len(warn) == 1 and name in warn[0] and "recomputing" in warn[0], err
    assert "Traceback" not in err
    assert [r.recall for r in res.rows] == recalls  # never trusted: the numbers of a clean run
    assert sorted(f.name for f in cache.iterdir()) == [name]  # replaced, no temporary left behind
    assert (cache / name).read_bytes() == raw
    ev.evaluate(embedder, uf, subs, cache_dir=str(cache), progress=False)  # and now trusted again
    assert "warning" not in capsys.readouterr().err


def test_cache_renamed_to_another_key_or_without_checksum_is_not_trusted(tiny_root, embedder, clean_cache,
                                                                         tmp_path, capsys):
    recalls, name, raw = clean_cache
    key = name.split(".sha256-")[0]
    uf = data.UFire(str(tiny_root))
    subs = uf.select("test", "t2i,cir", "skip")
    cache = tmp_path / "cache"
    cache.mkdir()
    # a file of the old layout (KEY.npy, no checksum) with the right shape but wrong rows
    (cache / f"{key}.npy").write_bytes(_swap_rows(raw))
    res = ev.evaluate(embedder, uf, subs, cache_dir=str(cache), progress=False)
    assert "no checksum" in capsys.readouterr().err
    assert [r.recall for r in res.rows] == recalls and sorted(f.name for f in cache.iterdir()) == [name]
    # a valid file copied under another checkpoint's key: the checksum covers the key, so it fails
    shape = np.load(io.BytesIO(raw)).shape  # (G, D)
    fake_key = "0" * 20 + "-" + key.split("-")[1]
    (cache / name.replace(key, fake_key)).write_bytes(raw)
    assert fast_infer.read_cache(cache, fake_key, shape) is None
    assert "do not match their checksum" in capsys.readouterr().err
    assert fast_infer.read_cache(cache, key, shape) is not None  # the genuine file still proves itself


def test_unwritable_cache_only_warns(tiny_root, embedder, clean_cache, tmp_path, capsys):
    recalls, _, _ = clean_cache
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be\n")
    uf = data.UFire(str(tiny_root))
    subs = uf.select("test", "t2i,cir", "skip")
    res = ev.evaluate(embedder, uf, subs, cache_dir=str(blocker), progress=False)
    err = capsys.readouterr().err
    assert "warning: could not write the gallery cache" in err and "Traceback" not in err
    assert [r.recall for r in res.rows] == recalls
    assert blocker.read_text() == "a file where the cache folder should be\n"


# ---------------------------------------------------------------------------------------------
# 4. empty sub-datasets and queries without positives never become NaN
# ---------------------------------------------------------------------------------------------

def test_metric_of_no_queries_is_none_not_nan():
    assert ev.recall_at_k(np.zeros((0, 3), np.int64), [], (1, 3)) == {1: None, 3: None}
    assert ev.chance_recall(10, []) is None
    # Queries without a positive are queries: misses (the authors' denominator), 0 and not None.
    assert ev.recall_at_k(np.zeros((2, 3), np.int64), [[], []], (1,)) == {1: 0.0}
    assert ev.recall_at_k(np.zeros((0, 3), np.int64), [], (1,), missing=3) == {1: 0.0}
    assert ev.chance_recall(10, [[], []]) == 0.0 and ev.chance_recall(10, [], missing=3) == 0.0
    row = lambda sub, task, q, r: ev.EvalRow(sub, task, 10, q, 0, {1: r}, None if r is None else 0.1)  # noqa: E731
    rows = [row("a/x", "a", 4, 0.5), row("a/y", "a", 0, None), row("b/z", "b", 0, None), row("c/w", "c", 2, 1.0)]
    means, overall = ev.summarise(rows, (1,))
    assert means == {"a": {1: 0.5}, "b": {1: None}, "c": {1: 1.0}}
    assert overall == {1: 0.75}  # tasks a and c; b has no queries at all
    res = ev.EvalResult(rows=rows, ks=(1,), task_means=means, overall=overall)
    assert res.sum_recall(1) == 1.5
    json.dumps(res.to_dict(), allow_nan=False)  # raises on any NaN
    table = cli.format_table(res)
    assert "| a/y (no queries: left out of the means) | 10 | 0 | 0 | n/a | n/a |" in table
    assert "the 2 row(s) without queries left out" in table and "nan" not in table.lower()
    # nothing scorable anywhere: every mean is undefined (None), none is NaN or 0
    means, overall = ev.summarise(rows[1:3], (1,))
    assert means == {"a": {1: None}, "b": {1: None}} and overall == {1: None}
    res = ev.EvalResult(rows=rows[1:3], ks=(1,), task_means=means, overall=overall)
    assert res.sum_recall(1) == 0.0 and "nan" not in cli.format_table(res).lower()
    json.dumps(res.to_dict(), allow_nan=False)


def test_empty_triplet_file_is_left_out_and_all_missing_rows_score_zero(tiny_root, ckpt, tmp_path, capsys):
    root = _copy(tiny_root, tmp_path / "root")
    (root / "0_triplet_files" / "7_cir_SynCIR-Top_test_triplet_data.json").write_text("[]\n")
    # t2i/SynShoes: every record asks for an image the gallery does not hold (all "missing")
    f = root / "0_triplet_files" / "1_t2i_SynShoes_test_triplet_data.json"
    recs = json.loads(f.read_text())
    for r in recs:
        r["target_image"] = ["SynShop_images/not-in-any-gallery.png"]
    f.write_text(json.dumps(recs))
    out = tmp_path / "res" / "r.json"
    rc = ev.main(["--ckpt", str(ckpt), "--data", str(root), *TASKS, "--out", str(out),
                  "--cache-dir", "", "--k", "1,10"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    doc = _strict_json(out.read_text())  # valid JSON: no bare NaN
    rows = {r["subset"]: r for r in doc["rows"]}
    # No record at all: no Recall (None), left out of the means.
    assert rows["cir/SynCIR-Top"]["queries"] == 0 and rows["cir/SynCIR-Top"]["recall"] == {"1": None, "10": None}
    # Every record missing: each one a miss (the authors' hits / num_queries), Recall 0, in the means.
    shoes = rows["t2i/SynShoes"]
    assert shoes["queries"] == 0 and shoes["missing"] == len(recs) and shoes["recall"] == {"1": 0.0, "10": 0.0}
    assert shoes["chance10"] == 0.0
    for task, subs in (("cir", ["cir/SynCIR-Dress", "cir/SynCIR-Shoes"]),
                       ("t2i", ["t2i/SynGen", "t2i/SynShoes"])):
        for k in ("1", "10"):  # each task mean is over its rows with a Recall
            assert doc["task_means"][task][k] == pytest.approx(np.mean([rows[s]["recall"][k] for s in subs]))
    for k in ("1", "10"):
        assert doc["overall"][k] == pytest.approx((doc["task_means"]["cir"][k] + doc["task_means"]["t2i"][k]) / 2)
    assert doc["recall"] == ev.RECALL_DEFINITION
    assert "cir/SynCIR-Top (no queries: left out of the means)" in cap.out
    assert f"| t2i/SynShoes | {shoes['gallery']} | 0 | {len(recs)} | 0.0 | 0.0 | 0.0 |" in cap.out
    assert "the 1 row(s) without queries left out" in cap.out and "nan" not in cap.out.lower()
    assert "R@K = hits@K / (queries + missing)" in cap.out
    for ln in out.with_suffix(".per_query.jsonl").read_text().splitlines():
        _strict_json(ln)


def test_nan_embeddings_are_refused_naming_the_image(tiny_root):
    class NanEmbedder(torch.nn.Module):
        dim = 8

        def encode_images(self, images, batch_size=32):
            out = torch.ones(len(images), self.dim)  # (G, D)
            out[[i for i, p in enumerate(images) if p.endswith(bad)]] = float("nan")
            return out

        def encode_queries(self, queries, batch_size=16):
            return torch.ones(len(queries), self.dim)  # (B, D)

    uf = data.UFire(str(tiny_root))
    view = uf.eval_view("t2i/SynGen")
    bad = Path(view.gallery[5]).name
    with pytest.raises(EvalError, match=f"1 gallery image embedding.*NaN.*{re.escape(bad)}"):
        ev.evaluate(NanEmbedder(), uf, ["t2i/SynGen"], cache_dir=None, progress=False)


# ---------------------------------------------------------------------------------------------
# 5. evaluate.py: flags checked first; every data / checkpoint error is one line, exit 1
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def nothing_loaded(monkeypatch):
    """Fail loudly (a traceback, not an `error:` line) if the data or the checkpoint gets touched."""
    import model

    def touched(*a, **k):
        raise AssertionError("flags must be checked before the data or the checkpoint is loaded")
    monkeypatch.setattr(model.FashionLensEmbedder, "from_pretrained", classmethod(touched))
    monkeypatch.setattr(data, "UFire", touched)


BAD_FLAGS = {
    "k_zero": (["--k", "0"], "--k"),
    "k_negative": (["--k=-1,10"], "--k"),
    "k_word": (["--k", "abc"], "--k"),
    "k_float": (["--k", "1,2.5"], "--k"),
    "k_empty": (["--k", ","], "--k"),
    "batch_zero": (["--batch-size", "0"], "--batch-size"),
    "max_queries_negative": (["--max-queries", "-1"], "--max-queries"),
    "device_unknown": (["--device", "gpu"], "--device"),
}


@pytest.mark.parametrize("name", sorted(BAD_FLAGS))
def test_bad_flag_is_one_line_before_anything_is_built(name, ckpt, tmp_path, capsys, nothing_loaded):
    flags, flag = BAD_FLAGS[name]
    out, cache = tmp_path / "r.json", tmp_path / "cache"
    out.write_text("previous results\n")
    rc = ev.main(["--ckpt", str(ckpt), "--out", str(out), "--cache-dir", str(cache), *flags])
    assert rc == 1
    _one_error_line(capsys.readouterr().err, flag)
    assert out.read_text() == "previous results\n" and not cache.exists()  # nothing written


def test_missing_ckpt_and_unwritable_out_and_absent_cuda(ckpt, tmp_path, capsys, nothing_loaded):
    assert ev.main([]) == 1
    _one_error_line(capsys.readouterr().err, "--ckpt")
    assert ev.main(["--ckpt", str(tmp_path / "no-such-run" / "best")]) == 1
    _one_error_line(capsys.readouterr().err, "--ckpt", "no-such-run")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert ev.main(["--ckpt", str(ckpt), "--out", str(blocker / "r.json")]) == 1  # parent is a file
    _one_error_line(capsys.readouterr().err, "--out", str(blocker))
    assert ev.main(["--ckpt", str(ckpt), "--out", str(tmp_path)]) == 1  # a folder, not a file name
    _one_error_line(capsys.readouterr().err, "--out")
    if not torch.cuda.is_available():
        assert ev.main(["--ckpt", str(ckpt), "--device", "cuda"]) == 1
        _one_error_line(capsys.readouterr().err, "--device", "CUDA")
    assert blocker.read_text() == "x"


def test_argparse_refusals_name_their_flag(ckpt, capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(["--ckpt", str(ckpt), "--batch-size", "abc"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--batch-size" in err and "Traceback" not in err


def _break_checkpoint(ckpt: Path, tmp: Path, how: str) -> Path:
    bad = _copy(ckpt, tmp / f"ckpt-{how}")
    cfg = bad / "embedder_config.json"
    meta = json.loads(cfg.read_text())
    if how == "incomplete":
        (bad / "embedder.safetensors").unlink()
    elif how == "wrong_backbone":
        meta["config"]["backbone"] = "tiny-qwen2-vl"  # the saved base is the qwen3_vl tiny model
        cfg.write_text(json.dumps(meta))
    elif how == "cuda_device":
        meta["config"]["device"] = "cuda"  # trained on a GPU, evaluated here
        cfg.write_text(json.dumps(meta))
    elif how == "not_a_checkpoint":
        cfg.unlink()
    return bad


CKPT_ERRORS = {"incomplete": "embedder.safetensors", "wrong_backbone": "tiny-qwen2-vl",
               "cuda_device": "device", "not_a_checkpoint": "embedder_config.json"}


@pytest.mark.parametrize("how", sorted(CKPT_ERRORS))
def test_checkpoint_errors_are_one_line_naming_the_folder(how, ckpt, tiny_root, tmp_path, capsys):
    if how == "cuda_device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: a checkpoint saved for cuda is fine here")
    bad = _break_checkpoint(ckpt, tmp_path, how)
    out = tmp_path / "r.json"
    out.write_text("previous results\n")
    rc = ev.main(["--ckpt", str(bad), "--data", str(tiny_root), *TASKS, "--out", str(out), "--cache-dir", ""])
    assert rc == 1
    _one_error_line(capsys.readouterr().err, str(bad), CKPT_ERRORS[how])
    assert out.read_text() == "previous results\n"


def _break_data(root: Path, how: str) -> tuple[list, list]:
    """Damage a copied root; return (extra flags, strings the error line must name)."""
    f = root / "0_triplet_files" / "7_cir_SynCIR-Dress_test_triplet_data.json"
    recs = json.loads(f.read_text())
    if how == "missing_query_image":  # a sketch: query images of cir are gallery images too
        sk = root / "0_triplet_files" / "2_sketch2i_SynSketch_test_triplet_data.json"
        r2 = json.loads(sk.read_text())[2]
        (root / r2["query_image"][0]).unlink()
        return ["--tasks", "sketch2i"], ["missing image", r2["query_image"][0], r2["id"], "#2", sk.name]
    if how == "missing_gallery_image":
        g = root / "0_test_candidates" / "7_cir_SynCIR-Dress_test_candidates.json"
        rel = json.loads(g.read_text())[-1]
        (root / rel).unlink()
        return [], ["missing image", rel, g.name, "cir/SynCIR-Dress"]
    if how == "malformed_json":
        f.write_text(f.read_text()[:-20])
        return [], [f.name, "malformed JSON"]
    if how == "record_without_target":
        del recs[3]["target_image"]
        f.write_text(json.dumps(recs))
        return [], [f.name, recs[3]["id"], "#3", "target_image"]
    if how == "unknown_task":
        return ["--tasks", "shirt2i"], ["unknown task", "shirt2i"]
    if how == "unknown_subset":
        return ["--tasks", "cir/SynNope"], ["cir/SynNope", str(root)]
    raise ValueError(how)


DATA_ERRORS = ["malformed_json", "missing_gallery_image", "missing_query_image", "record_without_target",
               "unknown_subset", "unknown_task"]


@pytest.mark.parametrize("how", DATA_ERRORS)
def test_data_errors_are_one_line_naming_file_and_record(how, ckpt, tiny_root, tmp_path, capsys):
    root = _copy(tiny_root, tmp_path / "root")
    extra, names = _break_data(root, how)
    out, cache = tmp_path / "r.json", tmp_path / "cache"
    out.write_text("previous results\n")
    flags = ["--ckpt", str(ckpt), "--data", str(root), *TASKS, "--out", str(out), "--cache-dir", str(cache)]
    assert ev.main(flags + extra) == 1
    _one_error_line(capsys.readouterr().err, *names)
    assert out.read_text() == "previous results\n"
    for f in cache.glob("*") if cache.exists() else []:  # whatever was cached is whole and proven
        assert not f.name.startswith(".") and \
            fast_infer.read_cache(cache, f.name.split(".")[0], np.load(f).shape) is not None


def test_select_errors_are_ufire_errors(tiny_root):
    # train.py calls UFire.select too: its errors must be FashionLensErrors (one line there as well)
    uf = data.UFire(str(tiny_root))
    with pytest.raises(UFireError, match=f"'cir/SynNope' is not in the val split of {uf.root}"):
        uf.select("val", "cir/SynNope", "skip")
    with pytest.raises(UFireError, match="nothing to evaluate in the val split"):
        uf.select("val", "all", "only")  # OOD tasks have no val split


def test_evaluate_process_exit_status_and_no_traceback(ckpt, tiny_root, tmp_path):
    bad = _break_checkpoint(ckpt, tmp_path, "incomplete")
    p = subprocess.run([sys.executable, "evaluate.py", "--ckpt", str(bad), "--data", str(tiny_root), *TASKS],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr
    _one_error_line(p.stderr, str(bad), "incomplete checkpoint")


# ---------------------------------------------------------------------------------------------
# 6. synthetic.py's command line
# ---------------------------------------------------------------------------------------------

def test_synthetic_cli_refuses_bad_flags_and_foreign_folders(tmp_path, capsys):
    mine = tmp_path / "my-data"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me\n")
    assert synthetic.main(["--out", str(mine), "--scale", "0.03"]) == 1
    _one_error_line(capsys.readouterr().err, str(mine), "not a synthetic U-FIRE")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]  # nothing overwritten
    for flags, flag in ((["--scale", "0"], "--scale"), (["--scale", "-1"], "--scale"),
                        (["--scale", "nan"], "--scale"), (["--workers", "0"], "--workers")):
        assert synthetic.main(["--out", str(tmp_path / "new"), *flags]) == 1
        _one_error_line(capsys.readouterr().err, flag)
    assert not (tmp_path / "new").exists()
    assert synthetic.main(["--out", str(mine / "notes.txt")]) == 1  # a file, not a folder
    _one_error_line(capsys.readouterr().err, "notes.txt")
    assert (mine / "notes.txt").read_text() == "keep me\n"
