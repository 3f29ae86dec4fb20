"""Every saved state is verified (issue 29, rows 1, 2, 3, 16, 17): what a resume or an evaluation reads
is the state, config and data the run was saved with, or one `error:` line naming the file.

- last/train_state.json records the sha256 of the tensors file and of its own document: a flipped byte
  or an edited number in either is refused (plumbing.read_state);
- the state records the TrainConfig fields a resume may not change, and the sha256 of each training
  sub-dataset's triplet file: an edited train_config.json, or training data that lost, gained,
  reordered or edited records, is refused naming the file (run_dir.read_train_config, restore_state);
- a wrongly typed value in a saved config is refused naming the file, field and type (typed_config);
- a checkpoint keeps its embedder config's computed fields in embedder.safetensors' metadata: an edited
  video_size or num_frames is refused naming the field (checkpoint._check_config_digest);
- best/ gone or damaged while the state says one was saved is refused at the start of a resume;
- states and checkpoints written before the digests still load, with one warning line per file.

One run (a subprocess, ~10 s) stopped after its first checkpoint is shared by every test, which damage
copies of it; the real command lines run as subprocesses, the other cases in this process.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
import sys
from pathlib import Path

import pytest

from support import plumbing  # noqa: I001  before torch: it sets OMP_WAIT_POLICY (inherited by our subprocesses)
from clitools import one_error_line, run_cmd, snapshot

SHORT = ["--tasks", "t2i", "--batch-size", "4", "--chunk-size", "0", "--max-eval-queries", "2",
         "--no-final-test", "--steps", "4", "--eval-every", "2"]
SHOES = "0_triplet_files/1_t2i_SynShoes_train_triplet_data.json"


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> dict:
    """A run stopped after step 2 of 4 (best/ and last/ written at step 2), on this module's own synthetic
    root (tests that edit its training data put it back). Never modified: tests damage copies."""
    from support import synthetic

    base = tmp_path_factory.mktemp("state")
    root = Path(synthetic.ensure_synthetic(str(base / "syn"), seed=0, scale=0.03))
    out = base / "run"
    proc = run_cmd(["train.py", "--data", root, *SHORT, "--stop-at", "2", "--out", out])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "out": out}


def _copy(stopped: dict, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(stopped["out"], run)
    return run


def _main(args: list) -> tuple[int, str]:
    """train.main(args) in this process (no imports to pay) -> (exit status, stderr)."""
    import train

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            rc = train.main([str(a) for a in args])
        except SystemExit as stop:
            rc = stop.code if isinstance(stop.code, int) else 1
            print(stop.code, file=sys.stderr)
    return rc, err.getvalue()


def _edit_json(file: Path, change) -> None:
    doc = json.loads(file.read_text())
    change(doc)
    file.write_text(json.dumps(doc, indent=1))


@contextlib.contextmanager
def _edited(file: Path, change):
    """`file` (a JSON list of records) changed for the body, put back byte for byte afterwards."""
    before = file.read_bytes()
    try:
        _edit_json(file, change)
        yield file
    finally:
        file.write_bytes(before)


def strip_digests(ckpt: Path) -> None:
    """Make `ckpt` look as written before the digests: no config copy in embedder.safetensors'
    metadata (its sha256 in embedder_config.json updated) and, in a last/, no digests or records in
    train_state.json."""
    from safetensors.torch import load_file, save_file

    weights = ckpt / "embedder.safetensors"
    save_file(load_file(str(weights)), str(weights))  # no metadata
    _edit_json(ckpt / "embedder_config.json",
               lambda m: m["sha256"].__setitem__("embedder.safetensors", plumbing.file_sha256(weights)))
    if (ckpt / plumbing.STATE_JSON).is_file():
        _edit_json(ckpt / plumbing.STATE_JSON, lambda d: [d.pop(k) for k in (plumbing.STATE_DIGESTS, "config", "data")])


# ------------------------------------------------------------------------------------------------
# Rows 1 and 2: a damaged or edited training state
# ------------------------------------------------------------------------------------------------

def _flip_tensor_bytes(run: Path) -> Path:
    f = run / "last" / plumbing.STATE_TENSORS
    b = bytearray(f.read_bytes())
    for i in (-100, -2000, -4000):  # 3 bytes of the optimizer's moments: still a valid file
        b[i] ^= 0x01
    f.write_bytes(bytes(b))
    return f


def _edit_difficulty(run: Path) -> Path:
    f = run / "last" / plumbing.STATE_JSON
    doc = json.loads(f.read_text())
    difficulty = doc["sampler"]["difficulty"]
    i = next(k for k, v in enumerate(difficulty) if v is not None)
    difficulty[i] = round(difficulty[i] + 0.1, 6)  # one GGAS difficulty, a digit changed
    f.write_text(json.dumps(doc))
    return f


@pytest.mark.parametrize("damage", [_flip_tensor_bytes, _edit_difficulty], ids=["row1-tensors", "row2-json"])
def test_damaged_or_edited_training_state_is_refused_on_resume(damage, stopped, tmp_path):
    run = _copy(stopped, tmp_path)
    f = damage(run)
    before = snapshot(run)
    proc = run_cmd(["train.py", "--resume", run])
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = one_error_line(proc.stderr, f)
    assert "damaged or edited: its sha256 differs from the one saved" in line, line
    assert snapshot(run) == before


# ------------------------------------------------------------------------------------------------
# Row 17 and the config digest: last/train_config.json wrongly typed or edited
# ------------------------------------------------------------------------------------------------

def test_wrongly_typed_saved_config_is_one_error_line_on_the_command_line(stopped, tmp_path):
    run = _copy(stopped, tmp_path)
    f = run / "last" / "train_config.json"
    _edit_json(f, lambda c: c.__setitem__("batch_size", "16"))
    before = snapshot(run)
    proc = run_cmd(["train.py", "--resume", run])
    assert proc.returncode == 1
    line = one_error_line(proc.stderr, f, "batch_size")
    assert line.endswith("field 'batch_size' is \"16\" (str), expected int or null"), line
    assert snapshot(run) == before


@pytest.mark.parametrize("field,value,expected", [
    ("batch_size", [16], "expected int or null"), ("seed", None, "expected int"),
    ("batch_size", True, "expected int or null"), ("lr", "1e-3", "expected float or null"),
    ("final_test", 1, "expected bool"), ("tasks", {"t2i": 1}, "expected str")])
def test_wrongly_typed_saved_config_names_field_and_type(field, value, expected, stopped, tmp_path):
    run = _copy(stopped, tmp_path)
    f = run / "last" / "train_config.json"
    _edit_json(f, lambda c: c.__setitem__(field, value))
    rc, err = _main(["--resume", run])
    assert rc == 1 and expected in one_error_line(err, f, repr(field)), err


@pytest.mark.parametrize("field,value", [("lr", 0.002), ("batch_size", 8), ("seed", 1), ("tasks", "t2i,cir"),
                                         ("video_size", 32)])
def test_edited_training_config_is_refused_naming_file_and_field(field, value, stopped, tmp_path):
    """The fields a resume may not change are recorded in the (digest-checked) state: an edit of
    train_config.json, which would resume silently off the run's trajectory, is refused."""
    run = _copy(stopped, tmp_path)
    f = run / "last" / "train_config.json"
    _edit_json(f, lambda c: c.__setitem__(field, value))
    before = snapshot(run)
    rc, err = _main(["--resume", run])
    line = one_error_line(err, f, f"{field}={value!r} was edited")
    assert rc == 1 and "recorded in train_state.json" in line, line
    assert snapshot(run) == before


def test_fields_a_resume_may_change_may_be_edited(stopped, tmp_path):
    """eval_every and max_eval_queries are not recorded: an edit (or the flag) is not refused."""
    from support import cli, run_dir

    import train

    run = _copy(stopped, tmp_path)
    _edit_json(run / "last" / "train_config.json", lambda c: c.update(eval_every=4, max_eval_queries=1))
    cfg, _ = cli.parse_train_config(train.TrainConfig, ["--resume", str(run)])
    assert (cfg.eval_every, cfg.max_eval_queries, cfg.lr) == (4, 1, 0.001)
    recorded = plumbing.read_state(run / "last", tensors=False)["config"]
    assert not set(recorded) & cli.RESUME_MAY_CHANGE and "lr" in recorded and "video_size" in recorded
    assert run_dir.read_train_config(train.TrainConfig, run / "last" / "train_config.json").lr == 0.001


# ------------------------------------------------------------------------------------------------
# Row 3: a checkpoint's embedder config edited after saving
# ------------------------------------------------------------------------------------------------

def test_edited_video_size_is_refused_by_evaluate(stopped, tmp_path):
    ckpt = tmp_path / "best"
    shutil.copytree(stopped["out"] / "best", ckpt)
    f = ckpt / "embedder_config.json"
    _edit_json(f, lambda m: m["config"].update(video_size=32, num_frames=2))
    out = tmp_path / "r.json"
    proc = run_cmd(["evaluate.py", "--ckpt", ckpt, "--tasks", "t2i", "--max-queries", "2", "--out", out])
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = one_error_line(proc.stderr, f, "num_frames=2", "video_size=32", ckpt / "embedder.safetensors")
    assert "num_frames=4, video_size=64" in line, line
    assert not out.exists()


def _changed(value):
    """Another value of the same JSON type."""
    return {bool: lambda v: not v, int: lambda v: v + 1, float: lambda v: v + 0.25,
            str: lambda v: v + "x", type(None): lambda v: 1}[type(value)](value)


def test_every_computed_field_is_verified_and_runtime_fields_are_free(stopped, tmp_path):
    """Each EmbedderConfig field but the runtime ones (device, dtype, attn_implementation) is held by
    the copy in embedder.safetensors' metadata, including any field added later; nothing is built."""
    from model import EmbedderConfig, FashionLensEmbedder
    from support import checkpoint
    from support.errors import CheckpointError

    ckpt = tmp_path / "best"
    shutil.copytree(stopped["out"] / "best", ckpt)
    f = ckpt / "embedder_config.json"
    saved = f.read_bytes()
    names = [field.name for field in dataclasses.fields(EmbedderConfig)]
    assert checkpoint.RUNTIME_FIELDS < set(names)
    for name in sorted(set(names) - checkpoint.RUNTIME_FIELDS):
        _edit_json(f, lambda m: m["config"].__setitem__(name, _changed(m["config"][name])))
        with pytest.raises(CheckpointError) as e:
            FashionLensEmbedder.from_pretrained(ckpt)
        msg = str(e.value)
        assert msg.startswith(f"{ckpt}/") and name in msg and "\n" not in msg, (name, msg)
        f.write_bytes(saved)
    _edit_json(f, lambda m: m["config"].update(attn_implementation="eager"))
    assert FashionLensEmbedder.from_pretrained(ckpt).config.attn_implementation == "eager"


def test_wrongly_typed_embedder_config_names_file_and_field(stopped, tmp_path):
    from model import FashionLensEmbedder
    from support.errors import CheckpointError

    ckpt = tmp_path / "best"
    shutil.copytree(stopped["out"] / "best", ckpt)
    _edit_json(ckpt / "embedder_config.json", lambda m: m["config"].update(num_frames="4"))
    with pytest.raises(CheckpointError, match=r"embedder_config\.json: field 'num_frames' is \"4\" \(str\), "
                                              r"expected int or null$"):
        FashionLensEmbedder.from_pretrained(ckpt)


# ------------------------------------------------------------------------------------------------
# Row 16 and own case 1: the training data changed under a run
# ------------------------------------------------------------------------------------------------

def test_resume_after_the_training_data_lost_records_names_the_triplet_file(stopped, tmp_path):
    run = _copy(stopped, tmp_path)
    before = snapshot(run)
    with _edited(stopped["root"] / SHOES, lambda recs: recs.__delitem__(slice(-2, None))) as f:
        proc = run_cmd(["train.py", "--resume", run])
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = one_error_line(proc.stderr, f, "t2i/SynShoes", "8 records then, 6 now")
    assert "resume with the same data" in line
    assert snapshot(run) == before


@pytest.mark.parametrize("change", ["reordered", "edited"])
def test_resume_on_silently_changed_training_data_is_refused(change, stopped, tmp_path):
    """OWN case 1 (category: data changed under a run, same record count): without the recorded sha256
    the resume would train on other batches than the run it claims to continue."""
    run = _copy(stopped, tmp_path)

    def edit(recs):
        if change == "reordered":
            recs[0], recs[1] = recs[1], recs[0]
        else:
            recs[3]["instruction"] = recs[3].get("instruction", "") + " (edited)"

    with _edited(stopped["root"] / SHOES, edit) as f:
        rc, err = _main(["--resume", run])
    assert rc == 1 and "8 records then, 8 now" in one_error_line(err, f, "t2i/SynShoes"), err


# ------------------------------------------------------------------------------------------------
# OWN case 2 (category: a companion output lost): best/ gone or damaged before --resume
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["deleted", "weights-truncated"])
def test_resume_with_best_gone_or_damaged_is_refused_at_start(damage, stopped, tmp_path):
    """Before: the resume trained every remaining step, then the final test failed on best/ (or, with
    --no-final-test, the run ended "done" with no best/ at all). Now refused before any step."""
    run = _copy(stopped, tmp_path)
    if damage == "deleted":
        shutil.rmtree(run / "best")
    else:
        f = run / "best" / "embedder.safetensors"
        f.write_bytes(f.read_bytes()[:-64])
    before = snapshot(run)
    rc, err = _main(["--resume", run])
    line = one_error_line(err, f"{run / 'best'}: the run's best checkpoint (step 2) is missing or damaged")
    assert rc == 1 and "put back an intact copy" in line, line
    assert snapshot(run) == before


# ------------------------------------------------------------------------------------------------
# Legacy: written before the digests
# ------------------------------------------------------------------------------------------------

def test_run_written_before_digests_resumes_with_one_warning_per_file(stopped, tmp_path):
    run = _copy(stopped, tmp_path)
    for ckpt in ("last", "best"):
        strip_digests(run / ckpt)
    plumbing._warned.clear()
    rc, err = _main(["--resume", run])
    assert rc == 0, err[-3000:]
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 2 and "Traceback" not in err, warnings
    assert warnings[0].startswith(f"warning: {run / 'last' / 'train_state.json'}: written before"), warnings
    assert warnings[1].startswith(f"warning: {run / 'last' / 'embedder_config.json'}: written before"), warnings
    state = plumbing.read_state(run / "last", tensors=False)  # the resumed run wrote a verified state
    assert state["step"] == 4 and state["config"]["lr"] == 0.001 and set(state["data"]) == {"t2i/SynGen", "t2i/SynShoes"}


def test_legacy_state_with_lost_records_still_names_the_triplet_file(stopped, tmp_path):
    """Without the recorded sha256, the record counts the sampler saved still tell (row 16 of an old run)."""
    run = _copy(stopped, tmp_path)
    strip_digests(run / "last")
    with _edited(stopped["root"] / SHOES, lambda recs: recs.pop()) as f:
        rc, err = _main(["--resume", run])
    assert rc == 1 and "8 records then, 7 now" in one_error_line(err, f), err


def test_read_state_checks_both_files_and_warns_once_for_an_old_state(tmp_path, capsys):
    import torch

    from support.errors import CheckpointError

    plumbing.write_state(tmp_path, {"step": 3, "w": torch.arange(4.0), "best": {"score": 0.5}})
    assert plumbing.read_state(tmp_path)["step"] == 3
    doc = json.loads((tmp_path / plumbing.STATE_JSON).read_text())
    assert set(doc[plumbing.STATE_DIGESTS]) == {plumbing.STATE_JSON, plumbing.STATE_TENSORS}
    edited = json.dumps({**doc, "best": {"score": 0.6}}, indent=2)  # reformatting alone would not matter
    (tmp_path / plumbing.STATE_JSON).write_text(edited)
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / plumbing.STATE_JSON}: damaged or edited"):
        plumbing.read_state(tmp_path)
    (tmp_path / plumbing.STATE_JSON).write_text(json.dumps(doc, indent=2))
    assert plumbing.read_state(tmp_path)["best"] == {"score": 0.5}
    del doc[plumbing.STATE_DIGESTS]
    (tmp_path / plumbing.STATE_JSON).write_text(json.dumps(doc))
    capsys.readouterr()
    for _ in range(2):
        assert torch.equal(plumbing.read_state(tmp_path)["w"], torch.arange(4.0))
    err = capsys.readouterr().err.splitlines()
    assert err == [f"warning: {tmp_path / plumbing.STATE_JSON}: written before training-state digests (no "
                   f"__digests__ in it); train_state.json and train_state.safetensors are not verified"], err


def test_a_moved_backbone_folder_is_the_same_model_and_another_name_is_not():
    """The config copy holds the backbone by its name: a local Qwen folder moved to another disk (the
    config's path edited to follow it) still loads, another model of the same shapes does not."""
    from support.checkpoint import computed_fields

    def name(b):
        return computed_fields({"backbone": b, "device": "cpu"})["backbone"]

    assert name("/data/models/Qwen3-VL-4B-Instruct/") == name("/mnt/b/Qwen3-VL-4B-Instruct") \
        == name("Qwen/Qwen3-VL-4B-Instruct")
    assert name("/mnt/b/Qwen3-VL-4B-Thinking") != name("Qwen/Qwen3-VL-4B-Instruct")
    assert "device" not in computed_fields({"backbone": "tiny", "device": "cpu"})
