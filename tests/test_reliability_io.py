"""Reliability of what evaluation and the data layer read and write (issue 29, rows 4 8 9 10 14 18 19).

Nothing printed can cost a result: a file name that is not UTF-8 under a strict UTF-8 terminal, or a
reader that stops early (`| head -n 1`), leaves evaluate.py's --out written and train.py's last/
saved, exit status 0. Outputs go to regular files only, outside the checkpoint and the data root,
with names the file system takes. Every data file a run reads is refused in one line naming it when
it cannot be read (a symlink loop, a folder), is absurd (nested 100,000 deep), ambiguous (a key
twice) or names an image outside the root. The gallery cache key follows every rewrite of an image.

Runs use a synthetic U-FIRE at scale 0.03 and the untrained tiny embedder, saved once. Command lines
run as subprocesses where the row is about a command (~25 s in all); the rest runs in this process.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from support import plumbing  # noqa: F401,I001  before torch: it sets OMP_WAIT_POLICY
from support import cli, fast_infer, ufire_files
from support.errors import UFireError, run_cli
from tests.clitools import REPO, cli_env, one_error_line, run_cmd, snapshot

import data

EVAL = ["--tasks", "t2i", "--ood", "skip", "--max-queries", "2", "--k", "1,10"]  # 2 sub-datasets, 118 images
SHORT = ["--tasks", "t2i", "--batch-size", "4", "--chunk-size", "0", "--max-eval-queries", "2",
         "--no-final-test", "--steps", "2", "--eval-every", "2"]  # a 2-step run, ~8 s
FF = os.fsdecode(b"\xff")  # a byte that is not UTF-8, as Python names it in a str (a surrogate escape)


# ---------------------------------------------------------------------------------------------
# fixtures: the tiny root and the untrained checkpoint come from conftest (session-wide, never modified)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(untrained_ckpt) -> Path:
    """The untrained tiny checkpoint (conftest.untrained_ckpt); never modified."""
    return untrained_ckpt


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _triplets(root: Path, name: str) -> Path:
    return root / "0_triplet_files" / name


def _evaluate(args: list, capsys) -> tuple:
    """evaluate.main(args) in this process -> (exit status, stdout, stderr)."""
    import evaluate

    rc = evaluate.main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _nothing_written(folder: Path, before: dict) -> None:
    assert snapshot(folder) == before


# ---------------------------------------------------------------------------------------------
# Row 4: the gallery cache key follows every rewrite of an image; --verify-cache hashes contents
# ---------------------------------------------------------------------------------------------

def _same_size_other_image(path: Path) -> None:
    """Replace `path` by another picture of exactly its size, and put its mtime back (`cp -p`)."""
    from PIL import Image

    st = path.stat()
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (250, 10, 10)).save(buf, "PNG")  # a red square: ~150 bytes
    raw = buf.getvalue()
    assert len(raw) <= st.st_size
    path.write_bytes(raw + b"\0" * (st.st_size - len(raw)))  # bytes after IEND are ignored by readers
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_gallery_key_follows_a_same_size_rewrite_and_verify_hashes_contents(tiny_root, tmp_path):
    paths = sorted((_copy(tiny_root / "SynShop_images", tmp_path / "img")).glob("*.png"))[:5]
    names = [str(p) for p in paths]
    plain, exact = fast_infer.gallery_key(names), fast_infer.gallery_key(names, contents=True)
    assert plain != exact and fast_infer.gallery_key(names) == plain  # stable, and the two kinds differ
    os.utime(paths[0])  # touched, same bytes: the metadata key moves, the contents key does not
    assert fast_infer.gallery_key(names, contents=True) == exact
    plain = fast_infer.gallery_key(names)
    _same_size_other_image(paths[1])  # new bytes, same size, same mtime: ctime tells
    assert fast_infer.gallery_key(names) != plain
    assert fast_infer.gallery_key(names, contents=True) != exact
    assert fast_infer.gallery_key([str(tmp_path / f"x{FF}.png")])  # a non-UTF-8 name hashes as bytes


def test_cache_is_recomputed_after_same_size_rewrites_and_verify_cache_flag(tiny_root, ckpt, tmp_path, capsys):
    """evaluate.py's command line (in this process): a cache made before the gallery images were
    replaced by same-size files with their mtime kept is not used; --verify-cache keys on contents."""
    root, cache = _copy(tiny_root, tmp_path / "root"), tmp_path / "cache"
    flags = ["--ckpt", ckpt, "--data", root, *EVAL, "--cache-dir", cache]

    def run(*extra) -> dict:
        out = tmp_path / "r.json"
        rc, _, err = _evaluate([*flags, "--out", out, *extra], capsys)
        assert rc == 0, err
        return json.loads(out.read_text())["rows"]

    first = run()
    assert len(list(cache.glob("*.npy"))) == 1 and run() == first  # unchanged gallery: the cache serves
    gallery = json.loads((root / "0_test_candidates" / "1_t2i_SynShoes_test_candidates.json").read_text())
    for rel in gallery[:20]:  # the case: same size, mtime restored
        _same_size_other_image(root / rel)
    again = run()
    assert len(list(cache.glob("*.npy"))) == 2  # a new key: recomputed, not read from the old file
    assert again == run("--cache-dir", "")  # the numbers of a run without any cache
    run("--verify-cache")
    assert len(list(cache.glob("*.npy"))) == 3  # the contents key is a key of its own
    for p in (root / rel for rel in gallery[:20]):
        os.utime(p)  # a touch (or a copy of the root) keeps the contents key
    assert run("--verify-cache") == again and len(list(cache.glob("*.npy"))) == 3


# ---------------------------------------------------------------------------------------------
# Row 8 and own case 4: --out is a regular file whose name the file system takes
# ---------------------------------------------------------------------------------------------

def test_out_on_a_character_device_is_refused_before_evaluating(ckpt, tiny_root, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mknod of a character device needs root")
    dev = tmp_path / "full"
    try:
        os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 7))  # what /dev/full is, in a temporary folder
    except OSError as e:
        pytest.skip(f"mknod refused here: {e}")
    p = run_cmd(["evaluate.py", "--ckpt", ckpt, "--data", tiny_root, *EVAL, "--out", dev])
    assert p.returncode == 1
    assert "character device, not a regular file" in one_error_line(p.stderr, "--out", dev)
    assert stat.S_ISCHR(os.lstat(dev).st_mode) and os.lstat(dev).st_rdev == os.makedev(1, 7)
    assert not p.stdout  # refused at flag-check time: nothing was evaluated or printed


@pytest.mark.parametrize("kind", ["fifo", "socket", "long name", "long per-query name"])
def test_out_fifo_socket_or_too_long_is_one_line_at_flag_check(kind, ckpt, tmp_path, capsys):
    out = tmp_path / "r.json"
    if kind == "fifo":
        os.mkfifo(out)
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(out))
    elif kind == "long name":
        out = tmp_path / ("r" * 300 + ".json")  # ENAMETOOLONG on every usual file system
    else:  # the name fits, its .per_query.jsonl sibling (+ atomic_write's temporary) does not
        out = tmp_path / ("r" * 240 + ".json")
    before = os.lstat(out) if os.path.lexists(out) else None
    rc, stdout, err = _evaluate(["--ckpt", ckpt, "--out", out], capsys)  # not even a data root needed
    assert rc == 1 and not stdout
    line = one_error_line(err, "--out")
    assert ("not a regular file" in line) if before else ("bytes long" in line)
    if before is not None:  # the node is left as it was
        assert os.lstat(out).st_mode == before.st_mode and os.lstat(out).st_ino == before.st_ino
    else:
        assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Rows 9 and 10: what is printed never costs a result
# ---------------------------------------------------------------------------------------------

def _non_utf8_root(tiny_root: Path, tmp_path: Path) -> tuple[Path, str]:
    """A copy of the root where the byte 0xff is in the folder's name, in a sub-dataset's file names
    (t2i/SynSho<ff>es) and in one of its gallery images' name; returns (root, that image's path)."""
    root = _copy(tiny_root, tmp_path / f"root{FF}")
    gal = root / "0_test_candidates" / "1_t2i_SynShoes_test_candidates.json"
    paths = json.loads(gal.read_text())
    old, new = paths[0], paths[0].replace(".png", f"{FF}.png")
    (root / old).rename(root / new)
    for f in [gal, *(root / "0_triplet_files").glob("1_t2i_SynShoes_*")]:  # json writes it as \udcff
        f.write_text(f.read_text().replace(json.dumps(old), json.dumps(new)))
        f.rename(f.with_name(f.name.replace("SynShoes", f"SynSho{FF}es")))
    return root, new


def test_evaluate_strict_utf8_non_utf8_names_and_head_keeps_out(ckpt, tiny_root, tmp_path):
    """`evaluate.py ... | head -n 1` on a root with non-UTF-8 names, stdout strictly UTF-8: the header
    reaches head (escaped), evaluation goes on with its reader gone, --out is written, exit 0."""
    root, _ = _non_utf8_root(tiny_root, tmp_path)
    out = tmp_path / f"r{FF}.json"
    env = cli_env(PYTHONIOENCODING="utf-8:strict")
    ev = subprocess.Popen([sys.executable, "evaluate.py", "--ckpt", str(ckpt), "--data", str(root), *EVAL,
                           "--cache-dir", str(tmp_path / "cache"), "--out", str(out)],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = subprocess.run(["head", "-n", "1"], stdin=ev.stdout, capture_output=True, timeout=300)
    ev.stdout.close()  # head holds the only reader: when it exits, the pipe is closed
    err = ev.stderr.read().decode("utf-8", "replace")
    assert ev.wait(timeout=300) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err
    assert head.stdout.decode() == f"checkpoint: {ckpt}   data: {root}   split: test".replace(FF, "\\udcff") \
        + "   at most 2 queries per sub-dataset\n"
    doc = json.loads(out.read_text())  # strict JSON, complete
    assert doc["data"] == str(root) and {r["subset"] for r in doc["rows"]} == {"t2i/SynGen", f"t2i/SynSho{FF}es"}
    rows = [json.loads(ln) for ln in out.with_suffix(".per_query.jsonl").read_text().splitlines()]
    assert len(rows) == 4


def test_check_reports_a_non_utf8_name_under_strict_utf8(tiny_root, tmp_path):
    root, new = _non_utf8_root(tiny_root, tmp_path)
    (root / new).unlink()  # so that `check` has to print its name
    p = run_cmd(["data.py", "check", "--root", root, "--quick"], env=cli_env(PYTHONIOENCODING="utf-8:strict"))
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    bad = [ln for ln in p.stdout.splitlines() if "missing image/video file(s)" in ln]
    assert len(bad) == 1 and bad[0].startswith("  - t2i/SynSho\\udcffes [test]")  # the row's name, escaped


def test_train_into_head_still_saves_last_and_exits_0(tiny_root, tmp_path):
    out = tmp_path / "run"
    tr = subprocess.Popen([sys.executable, "train.py", "--data", str(tiny_root), "--out", str(out), *SHORT],
                          cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = subprocess.run(["head", "-n", "1"], stdin=tr.stdout, capture_output=True, timeout=300)
    tr.stdout.close()
    err = tr.stderr.read().decode("utf-8", "replace")
    assert tr.wait(timeout=300) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert head.stdout.decode().startswith("FashionLens training")
    assert json.loads((out / "last" / "train_state.json").read_text())["step"] == 2
    assert (out / "best" / "embedder.safetensors").is_file()


def test_run_cli_survives_a_closed_pipe_and_unencodable_text(tmp_path, monkeypatch):
    """Every command goes through errors.run_cli: a write to a pipe whose reader is gone, and text the
    stream cannot encode, neither raise nor stop `main`, which goes on and writes its file."""
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first write
    stream = io.TextIOWrapper(os.fdopen(w, "wb"), encoding="ascii", errors="strict", line_buffering=True)
    monkeypatch.setattr(sys, "stdout", stream)
    done = tmp_path / "done.txt"

    def main(argv):
        for i in range(3):
            print(f"line {i} caf\u00e9 {FF}", flush=True)  # EPIPE, and nothing ASCII can hold
        done.write_text("results")
        return 0

    assert run_cli(main, []) == 0 and done.read_text() == "results"
    assert sys.stdout is stream and stream.errors == "strict"  # given back as it was
    stream.write("after\n")  # fd now points at os.devnull: later writes are dropped, not raised
    stream.flush()


# ---------------------------------------------------------------------------------------------
# Rows 14, 18, 19 and own cases 2 and 3: data files that cannot be read, are absurd or leave the root
# ---------------------------------------------------------------------------------------------

def _loop(root: Path) -> tuple:  # row 18: a triplet file that is a symlink loop
    f = _triplets(root, "1_t2i_SynGen_train_triplet_data.json")
    f.unlink()
    f.symlink_to(f.name)
    return f, ["cannot read it", "symbolic links"]


def _deep(root: Path) -> tuple:  # row 19: nested 100,000 lists deep
    f = _triplets(root, "1_t2i_SynGen_val_triplet_data.json")
    f.write_text("[" * 100_000 + "]" * 100_000)
    return f, ["nested too deeply"]


def _dotdot(root: Path) -> tuple:  # row 14: a record's path with '..' leaving the root
    f = _triplets(root, "7_cir_SynCIR-Top_test_triplet_data.json")
    recs = json.loads(f.read_text())
    recs[2]["query_image"] = ["../" + root.name + "/../outside.png"]
    f.write_text(json.dumps(recs))
    return f, [recs[2]["id"], "#2", "../outside.png", "leaves the data root"]


def _absolute(root: Path) -> tuple:  # row 14: an absolute path outside the root, in a gallery file
    f = root / "0_test_candidates" / "1_t2i_SynShoes_test_candidates.json"
    f.write_text(json.dumps(["/etc/passwd", *json.loads(f.read_text())]))
    return f, ["'/etc/passwd'", "leaves the data root"]


def _folder(root: Path) -> tuple:  # own case 2: a folder where a triplet file belongs
    f = _triplets(root, "7_cir_SynCIR-Dress_val_triplet_data.json")
    f.unlink()
    f.mkdir()
    return f, ["cannot read it", "Is a directory"]


def _repeated_key(root: Path) -> tuple:  # own case 3: a key twice in one record (json keeps the last)
    f = _triplets(root, "7_cir_SynCIR-Shoes_test_triplet_data.json")
    text = f.read_text()
    f.write_text(text.replace('"dataset": ', '"dataset": "SynOther", "dataset": ', 1))
    return f, ["key 'dataset' appears twice", "#0", json.loads(text)[0]["id"]]


BREAKS = {"loop": _loop, "deep": _deep, "dotdot": _dotdot, "absolute": _absolute, "folder": _folder,
          "repeated key": _repeated_key}  # each breaks a different sub-dataset/split of the root


def test_check_names_each_broken_data_file_once(tiny_root, tmp_path):
    root = _copy(tiny_root, tmp_path / "root")
    cases = {case: brk(root) for case, brk in BREAKS.items()}
    before = snapshot(root)
    p = run_cmd(["data.py", "check", "--root", root, "--quick"])
    assert p.returncode == 1 and "Traceback" not in p.stdout + p.stderr, p.stderr
    problems = [ln for ln in p.stdout.splitlines() if ln.startswith("  - ")]
    for case, (f, names) in cases.items():
        hit = [ln for ln in problems if str(f) in ln]
        assert len(hit) == 1, (case, problems)
        for n in names:
            assert n in hit[0], (case, n, hit[0])
    assert len(problems) == len(cases), problems  # every other sub-dataset is still clean
    _nothing_written(root, before)


def test_train_refuses_an_unreadable_or_absurd_triplet_file(tiny_root, tmp_path, capsys):
    """train.py as a process on a symlink loop (row 18), and in this process on JSON nested 100,000
    deep (row 19): one line naming the file, before the run folder is made."""
    import train

    root = _copy(tiny_root, tmp_path / "root")
    f, names = _loop(root)
    p = run_cmd(["train.py", "--data", root, "--out", tmp_path / "run", *SHORT])
    assert p.returncode == 1
    one_error_line(p.stderr, f, *names)
    root = _copy(tiny_root, tmp_path / "root2")
    f, names = _deep(root)
    assert train.main(["--data", str(root), "--out", str(tmp_path / "run"), *SHORT]) == 1
    one_error_line(capsys.readouterr().err, f, *names)
    assert not (tmp_path / "run").exists()


def test_evaluate_and_train_views_refuse_paths_outside_the_root(tiny_root, ckpt, tmp_path, capsys):
    root = _copy(tiny_root, tmp_path / "root")
    f, names = _dotdot(root)
    _absolute(root)
    out = tmp_path / "r.json"
    out.write_text("previous results\n")
    rc, _, err = _evaluate(["--ckpt", ckpt, "--data", root, "--tasks", "cir/SynCIR-Top", "--ood", "skip",
                            "--out", out], capsys)
    assert rc == 1 and out.read_text() == "previous results\n"
    one_error_line(err, f, *names)
    with pytest.raises(UFireError, match="leaves the data root"):
        data.UFire(root).gallery("t2i/SynShoes")  # the absolute gallery entry, read by train's validation


def test_listing_folder_that_is_a_symlink_loop_is_one_error_line(tiny_root, tmp_path, capsys):
    root = _copy(tiny_root, tmp_path / "root")
    shutil.rmtree(root / "0_test_candidates")
    (root / "0_test_candidates").symlink_to("0_test_candidates")
    assert data.main(["check", "--root", str(root)]) == 1
    one_error_line(capsys.readouterr().err, root / "0_test_candidates", "cannot list it")


def test_read_json_refusals_name_file_record_and_key(tmp_path):
    f = tmp_path / "t.json"
    f.write_text('[{"id": "a", "x": 1}, {"id": "b", "nested": {"k": 1, "k": 2}}]')
    with pytest.raises(UFireError, match=r"record 'b' \(#1\) in .*t.json: key 'k' appears twice"):
        ufire_files.read_json(str(f))
    f.write_text('{"label": ["a.png"], "label": ["b.png"]}')  # an asfr gallery's label given twice
    with pytest.raises(UFireError, match=r"t.json: key 'label' appears twice"):
        ufire_files.read_json(str(f))
    f.write_text('{"a": ' * 100_000)  # objects inside objects
    with pytest.raises(UFireError, match="t.json: JSON nested too deeply"):
        ufire_files.read_json(str(f))
    f.write_text('[{"id": "a", "tags": {"x": [1, 2]}}]')
    assert ufire_files.read_json(str(f)) == [{"id": "a", "tags": {"x": [1, 2]}}]  # the usual file, unchanged


def test_saved_configs_nested_too_deep_are_skipped_not_a_traceback(tmp_path):
    """The checkpoint JSON files evaluate.py's command line reads itself (checkpoint.py reports them)."""
    (tmp_path / "best").mkdir()
    for name in ("best/train_config.json", "config.json", "best/embedder_config.json"):
        (tmp_path / name).write_text("[" * 100_000)
    assert cli.training_data_root(tmp_path / "best") is None
    assert cli.saved_device(tmp_path / "best" / "embedder_config.json") is None


def test_inside_root_accepts_every_relative_path_and_refuses_escapes(tmp_path):
    root = str(tmp_path / "root")
    for rel in ("a.png", "X_images/b/c.png", "X_images/../a.png", "./a.png", f"{root}/a.png"):
        assert ufire_files.inside_root(root, rel, "f").startswith(root + os.sep)
    for rel in ("../a.png", "X/../../a.png", "/etc/passwd", f"{root}x/a.png", "."):
        with pytest.raises(UFireError, match="leaves the data root"):
            ufire_files.inside_root(root, rel, "f")


# ---------------------------------------------------------------------------------------------
# Own case 1: --out never points into what the evaluation reads
# ---------------------------------------------------------------------------------------------

def test_out_inside_the_checkpoint_is_refused_before_evaluating(ckpt, tiny_root, capsys):
    before = snapshot(ckpt)
    target = ckpt / "embedder_config.json"
    rc, stdout, err = _evaluate(["--ckpt", ckpt, "--data", tiny_root, *EVAL, "--out", target], capsys)
    assert rc == 1 and not stdout
    assert "inside the checkpoint" in one_error_line(err, "--out", target)
    assert snapshot(ckpt) == before


def test_out_inside_the_data_root_or_linked_into_it_is_refused(ckpt, tiny_root, tmp_path, capsys):
    root = _copy(tiny_root, tmp_path / "root")
    before = snapshot(root)
    (tmp_path / "link").symlink_to(root / "0_triplet_files")
    for out in (root / "0_triplet_files" / "1_t2i_SynGen_test_triplet_data.json", tmp_path / "link" / "r.json"):
        rc, stdout, err = _evaluate(["--ckpt", ckpt, "--data", root, *EVAL, "--out", out], capsys)
        assert rc == 1 and not stdout
        assert "inside the data root" in one_error_line(err, "--out", out)
    assert snapshot(root) == before
