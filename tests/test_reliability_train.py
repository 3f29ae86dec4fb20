"""Reliability of the training and model side: no silently wrong result, no raw traceback.

Every expected failure of train.py and the benchmarks is exit status 1 (130 for Ctrl-C) with one
line naming the file or flag, no traceback, and nothing already written lost: bad flags are refused
before the run folder exists; Ctrl-C names the step and the `--resume` that continues; an empty
sub-dataset names its file; a damaged or edited checkpoint is refused naming the file and field,
while good checkpoints load unchanged; the temporaries of interrupted writes are cleaned up.

Runs use a synthetic U-FIRE at scale 0.03 and two short training subprocesses (~30 s in all);
everything else runs in this process (train.main returns the exit status run_cli gives it).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import plumbing  # noqa: I001  before torch: it sets OMP_WAIT_POLICY (inherited by our subprocesses)
import torch

REPO = Path(__file__).resolve().parents[1]
# A short run: the two t2i sub-datasets, batch 4, validation (and a checkpoint) every 2 steps.
SMALL = ["--tasks", "t2i", "--batch-size", "4", "--chunk-size", "0", "--max-eval-queries", "2",
         "--no-final-test"]
SHORT = [*SMALL, "--steps", "2", "--eval-every", "2"]  # a flag given again later overrides these


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)  # never inherit a launcher's rank
    return env


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """A command as a user types it, from the repository root."""
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, env=_env(),
                          timeout=timeout)


def _main(args: list[str]) -> tuple[int, str, str]:
    """train.main(args) in this process -> (exit status, stdout, stderr).

    A KeyboardInterrupt that escapes main (a missing Ctrl-C handler) becomes status -2 here rather
    than stopping the whole test session.
    """
    import train

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = train.main(args)
        except KeyboardInterrupt:
            rc = -2
    return rc, out.getvalue(), err.getvalue()


def _one_error_line(err: str) -> str:
    """The stderr of an expected failure: exactly one `error:` line and no traceback; returns it."""
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def _snapshot(folder: Path) -> dict:
    """{relative path: sha256} of every file under folder: 'nothing written is lost or changed'."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _log(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.strip()]


def _root_with(tiny_root: Path, dst: Path, triplets: dict) -> Path:
    """A root that shares tiny_root's images (symlinks) but has its own triplet files, some replaced."""
    dst.mkdir()
    for entry in tiny_root.iterdir():
        if entry.name != "0_triplet_files":
            (dst / entry.name).symlink_to(entry)
    shutil.copytree(tiny_root / "0_triplet_files", dst / "0_triplet_files")
    for name, content in triplets.items():
        (dst / "0_triplet_files" / name).write_text(json.dumps(content))
    return dst


# ------------------------------------------------------------------------------------------------
# Flags: refused before anything is built or written
# ------------------------------------------------------------------------------------------------

BAD_FLAGS = [  # (flag, value): each must be refused naming the flag
    ("--steps", "0"), ("--steps", "-5"), ("--batch-size", "0"), ("--chunk-size", "-2"),
    ("--eval-every", "0"), ("--epochs", "-1"), ("--lr", "0"), ("--lr", "nan"), ("--temperature", "0"),
    ("--max-eval-queries", "-1"), ("--eval-batch-size", "0"), ("--warmup-ratio", "2"),
    ("--min-lr-ratio", "-0.1"), ("--grad-clip", "-1"), ("--grad-clip", "nan"), ("--ggas-warmup", "-2"),
    ("--stop-at", "-1"), ("--weight-decay", "-1"), ("--device", "tpu"), ("--device", "cuda:x"),
    ("--min-pixels", "0"), ("--max-pixels", "100"), ("--max-query-images", "-1"), ("--num-frames", "0"),
    ("--video-size", "0"), ("--lora-dropout", "1"), ("--lora-dropout", "-0.5"),
]
# Flags with a fixed set of values: argparse refuses another value on the command line (status 2);
# a TrainConfig built in code is refused by check() in the same one-line style as the flags above.
CHOICE_FIELDS = {"recipe": "cpu", "lr_schedule": "linear", "positives": "some", "ggas_refresh": "often",
                 "ggas_ema_start": "one", "ggas_floor": "clip", "query_sketches": "two"}


def _refusal(argv, capsys) -> str:
    """train.main's one error line for a refused value. The flag table raises SystemExit("error: ...");
    the checks shared with evaluate.py (plumbing.check_device / check_writable) raise a FlagError that
    errors.run_cli prints, returning status 1. Either way: one line, no traceback."""
    import train

    try:
        rc = train.main(argv)
    except SystemExit as e:
        return str(e.code)  # a string code: Python prints it to stderr and exits with status 1
    assert rc == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


@pytest.mark.parametrize("flag,value", BAD_FLAGS)
def test_bad_flag_is_refused_before_the_run_folder_exists(flag, value, tiny_root, tmp_path, capsys):
    out = tmp_path / "run"
    msg = _refusal(["--data", str(tiny_root), *SHORT, flag, value, "--out", str(out)], capsys)
    assert msg.startswith(f"error: {flag} ") and value.lstrip("-") in msg and "\n" not in msg, msg
    assert not out.exists()


@pytest.mark.parametrize("field,value", CHOICE_FIELDS.items())
def test_bad_choice_is_refused_on_the_command_line_and_in_code(field, value, tmp_path, capsys):
    import train

    flag = "--" + field.replace("_", "-")
    with pytest.raises(SystemExit) as stop:
        train.main([flag, value, "--out", str(tmp_path / "run")])
    assert stop.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and f"argument {flag}" in lines[0] and repr(value) in lines[0], lines
    with pytest.raises(SystemExit) as stop:
        train.TrainConfig(out=str(tmp_path / "run"), **{field: value}).check()
    msg = str(stop.value.code)
    assert msg.startswith(f"error: {flag} {value!r}: must be") and "\n" not in msg, msg
    assert not (tmp_path / "run").exists()


def test_cuda_is_refused_where_torch_sees_no_gpu(tiny_root, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is valid here")
    for device in ("cuda", "cuda:0"):
        msg = _refusal(["--data", str(tiny_root), *SHORT, "--device", device, "--out", str(tmp_path / "run")],
                       capsys)
        assert msg.startswith(f"error: --device {device}: CUDA is not available"), msg
    assert not (tmp_path / "run").exists()


def test_out_under_a_regular_file_is_refused(tiny_root, tmp_path, capsys):
    """A path no one can create (a file in the way), refused as such even for root."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    msg = _refusal(["--data", str(tiny_root), *SHORT, "--out", str(blocker / "run")], capsys)
    assert msg == f"error: --out {blocker}/run: {blocker} is not a directory", msg
    assert blocker.read_text() == "not a folder"


def test_out_in_a_read_only_folder_is_refused(tiny_root, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: a read-only mode does not stop us writing")
        msg = _refusal(["--data", str(tiny_root), *SHORT, "--out", str(ro / "run")], capsys)
        assert msg.startswith(f"error: --out {ro}/run: {ro} is not writable"), msg
    finally:
        ro.chmod(0o700)
    assert not (ro / "run").exists()


@pytest.mark.parametrize("flag,value", [("--steps", "0"), ("--eval-every", "0"), ("--device", "cuda"),
                                        ("--out", "/etc/passwd/run")])
def test_bad_flag_on_the_command_line_is_one_line_and_exit_1(flag, value, tiny_root, tmp_path):
    """As a user types it: status 1, one `error: --flag` line, no traceback, no run folder."""
    if flag == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = value if flag == "--out" else str(tmp_path / "run")
    args = ["train.py", "--data", str(tiny_root), *SHORT, "--out", out]
    if flag != "--out":
        args += [flag, value]
    proc = _run(args)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert _one_error_line(proc.stderr).startswith(f"error: {flag} {value}")
    assert not Path(out).exists() and "done" not in proc.stdout


def test_batch_not_divisible_by_processes_is_refused_before_writing(tiny_root, tmp_path, monkeypatch):
    """Under torchrun with W processes the global batch must split evenly; told before any folder."""
    import train

    monkeypatch.setattr(plumbing, "init_distributed", lambda device: plumbing.DistInfo(rank=0, world=2))
    with pytest.raises(SystemExit, match="^error: --batch-size 3 is not divisible by 2 processes"):
        train.main(["--data", str(tiny_root), *SHORT, "--batch-size", "3", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------
# Empty sub-datasets
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["train", "val"])
def test_empty_sub_dataset_is_an_error_naming_its_file(split, tiny_root, tmp_path):
    name = f"1_t2i_SynShoes_{split}_triplet_data.json"
    root = _root_with(tiny_root, tmp_path / "root", {name: []})
    out = tmp_path / "run"
    rc, _, err = _main(["--data", str(root), *SHORT, "--out", str(out)])
    assert rc == 1
    line = _one_error_line(err)
    assert str(root / "0_triplet_files" / name) in line and "t2i/SynShoes" in line and "0 records" in line
    assert not out.exists()  # refused before the run folder is made


def test_sub_dataset_smaller_than_the_world_is_refused(tiny_root, tmp_path, monkeypatch):
    """With W processes every training sub-dataset needs W records (one per rank)."""
    name = "1_t2i_SynShoes_train_triplet_data.json"
    one = json.loads((tiny_root / "0_triplet_files" / name).read_text())[:1]
    root = _root_with(tiny_root, tmp_path / "root", {name: one})
    monkeypatch.setattr(plumbing, "init_distributed", lambda device: plumbing.DistInfo(rank=0, world=2))
    rc, _, err = _main(["--data", str(root), *SHORT, "--out", str(tmp_path / "run")])
    assert rc == 1 and "has 1 records (needs at least 2)" in _one_error_line(err)
    assert name in err and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------
# Ctrl-C, resuming, and the temporaries of interrupted writes
# ------------------------------------------------------------------------------------------------

def _sigint_default():
    """In the child: SIGINT -> KeyboardInterrupt even when the test runner was started in the
    background (a shell starts background jobs with SIGINT ignored, and children inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def interrupted(tiny_root, tmp_path_factory) -> dict:
    """A long run sent SIGINT as soon as its first last/ checkpoint exists, as Ctrl-C would."""
    out = tmp_path_factory.mktemp("ctrl_c") / "run"
    proc = subprocess.Popen([sys.executable, "train.py", "--data", str(tiny_root), *SMALL, "--steps", "1000",
                             "--eval-every", "2", "--out", str(out)], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_default)
    t0 = time.time()
    while not (out / "last" / "train_state.json").is_file() and proc.poll() is None and time.time() - t0 < 300:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    return {"out": out, "rc": proc.returncode, "stdout": stdout, "stderr": stderr}


def test_ctrl_c_stops_cleanly_and_names_the_resume(interrupted):
    out, err = interrupted["out"], interrupted["stderr"]
    assert interrupted["rc"] == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    last_line = err.strip().splitlines()[-1]
    saved = json.loads((out / "last" / "train_state.json").read_text())["step"]
    steps = [r["step"] for r in _log(out) if r.get("event") is None]  # every log line still parses
    assert last_line.startswith(f"stopped by Ctrl-C after step {steps[-1]} of 1000"), last_line
    assert f"last checkpoint {out / 'last'} (step {saved})" in last_line
    assert last_line.endswith(f"continue with --resume {out}")
    assert 2 <= saved <= steps[-1] and steps == list(range(1, steps[-1] + 1))


def test_resume_after_ctrl_c_cleans_interrupted_writes_and_continues(interrupted, tmp_path):
    """The temporaries a killed write leaves are removed at the next start; a best/ caught between
    atomic_write's two renames (only .best.old left) is put back; the run continues one step."""
    from model import FashionLensEmbedder

    run = tmp_path / "run"
    shutil.copytree(interrupted["out"], run)
    saved = json.loads((run / "last" / "train_state.json").read_text())["step"]
    best_files = _snapshot(run / "best")
    for junk in (".best.tmp", ".last.tmp"):  # half-written checkpoint folders
        (run / junk).mkdir()
        (run / junk / "embedder.safetensors").write_bytes(b"half")
    (run / ".config.json.tmp").write_text("{")
    os.replace(run / "best", run / ".best.old")
    proc = _run(["train.py", "--resume", str(run), "--stop-at", str(saved + 1)])  # odd: no validation
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == [".lock"]  # the run's lock, let go
    assert "removed" in proc.stdout and "restored" in proc.stdout
    assert _snapshot(run / "best") == best_files  # the best checkpoint is back, byte for byte
    FashionLensEmbedder.from_pretrained(str(run / "best"))
    assert json.loads((run / "last" / "train_state.json").read_text())["step"] == saved + 1
    steps = [r["step"] for r in _log(run) if r.get("event") is None]
    assert steps == list(range(1, saved + 2))  # steps after the checkpoint were redone, once each


def test_bad_flag_on_resume_leaves_the_run_untouched(interrupted):
    import train

    before = _snapshot(interrupted["out"])
    with pytest.raises(SystemExit, match="^error: --eval-every 0"):
        train.main(["--resume", str(interrupted["out"]), "--stop-at", "1", "--eval-every", "0"])
    assert _snapshot(interrupted["out"]) == before


@pytest.mark.parametrize("rel,what", [("last/embedder.safetensors", "embedder.safetensors"),
                                      ("last/adapter/adapter_model.safetensors", "adapter_model.safetensors"),
                                      ("last/train_state.safetensors", "train_state.safetensors: damaged"),
                                      ("last/train_config.json", "unreadable training config")])
def test_resume_from_a_damaged_checkpoint_names_the_file(rel, what, interrupted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(interrupted["out"], run)
    f = run / rel
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated, as by a full disk
    before = _snapshot(run)
    rc, _, err = _main(["--resume", str(run)])
    assert rc == 1
    line = _one_error_line(err)
    assert what in line and str(run / "last") in line, line
    assert _snapshot(run) == before  # the run folder (log, best/, the damaged last/) is as it was


def test_ctrl_c_before_the_first_checkpoint_says_there_is_nothing_to_resume(tiny_root, tmp_path, monkeypatch):
    import train

    real_step, calls = train.train_step, []

    def step_then_ctrl_c(run):
        calls.append(run.step)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_step(run)

    monkeypatch.setattr(train, "train_step", step_then_ctrl_c)
    out = tmp_path / "run"
    rc, _, err = _main(["--data", str(tiny_root), *SMALL, "--steps", "50", "--eval-every", "10", "--out", str(out)])
    assert rc == 130 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("stopped by Ctrl-C after step 1 of 50, before the first checkpoint"), line
    assert line.endswith(f"--resume {out} starts the run over"), line
    assert len(_log(out)) == 1  # the one finished step is logged


# ------------------------------------------------------------------------------------------------
# Checkpoints: damaged files and edited configs are refused; good ones load unchanged
# ------------------------------------------------------------------------------------------------

WEIGHTS = ["embedder.safetensors", "adapter/adapter_model.safetensors", "base/model.safetensors"]


@pytest.fixture(scope="module")
def ckpt(tiny_embedder, tmp_path_factory) -> Path:
    """The default tiny embedder saved as a checkpoint; never modified (tests damage copies)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    tiny_embedder.save_pretrained(path)
    return path


def _copy(ckpt: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ck"
    shutil.copytree(ckpt, dst)
    return dst


def _edit_meta(path: Path, change) -> None:
    meta = json.loads((path / "embedder_config.json").read_text())
    change(meta)
    (path / "embedder_config.json").write_text(json.dumps(meta, indent=2))


def test_checkpoint_records_the_sha256_of_its_weights_and_loads_unchanged(ckpt, tiny_embedder, tmp_path):
    from model import FashionLensEmbedder

    meta = json.loads((ckpt / "embedder_config.json").read_text())
    assert meta["sha256"] == {f: hashlib.sha256((ckpt / f).read_bytes()).hexdigest() for f in WEIGHTS}
    texts = ["a red floral dress", "black leather boots"]
    want = tiny_embedder.encode_queries(texts)
    assert torch.equal(FashionLensEmbedder.from_pretrained(ckpt).encode_queries(texts), want)
    old = _copy(ckpt, tmp_path)  # a checkpoint written before the sha256 field still loads
    _edit_meta(old, lambda m: m.pop("sha256"))
    assert torch.equal(FashionLensEmbedder.from_pretrained(old).encode_queries(texts), want)


@pytest.mark.parametrize("rel", WEIGHTS)
@pytest.mark.parametrize("damage", ["truncate", "zero-middle", "garble-header"])
def test_damaged_weight_file_is_refused_naming_it(rel, damage, ckpt, tmp_path):
    """Zeroed bytes parse as valid (wrong) weights: only the saved sha256 catches them."""
    from model import FashionLensEmbedder
    from support.errors import CheckpointError

    path = _copy(ckpt, tmp_path)
    f = path / rel
    b = bytearray(f.read_bytes())
    if damage == "truncate":
        b = b[: len(b) // 2]
    elif damage == "zero-middle":
        b[len(b) // 2: len(b) // 2 + 4096] = bytes(4096)
    else:
        b[10:40] = b"\xff" * 30
    f.write_bytes(bytes(b))
    with pytest.raises(CheckpointError) as e:
        FashionLensEmbedder.from_pretrained(path)
    assert str(e.value).startswith(f"{f}: damaged") and "\n" not in str(e.value)
    assert f.read_bytes() == bytes(b)  # reported, not deleted or rewritten


@pytest.mark.parametrize("rel", WEIGHTS)
def test_truncated_weights_without_a_saved_sha256_still_name_the_file(rel, ckpt, tmp_path):
    from model import FashionLensEmbedder
    from support.errors import CheckpointError

    path = _copy(ckpt, tmp_path)
    _edit_meta(path, lambda m: m.pop("sha256"))
    f = path / rel
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=rf"^{f}: cannot load the .*SafetensorError"):
        FashionLensEmbedder.from_pretrained(path)


@pytest.mark.parametrize("rel", ["base/config.json", "adapter/adapter_config.json", "processor/tokenizer.json",
                                 "embedder_config.json"])
def test_garbled_json_in_a_checkpoint_is_refused_naming_it(rel, ckpt, tmp_path):
    from model import FashionLensEmbedder
    from support.errors import CheckpointError

    path = _copy(ckpt, tmp_path)
    (path / rel).write_text('{"model_type": ')
    with pytest.raises(CheckpointError) as e:
        FashionLensEmbedder.from_pretrained(path)
    named = path / rel if rel != "processor/tokenizer.json" else path / "processor"  # transformers reads the folder
    assert str(e.value).startswith(f"{named}: ") and "\n" not in str(e.value), str(e.value)


EDITS = [  # (where, field, new value, text the error must hold): each contradicts the saved files
    ("config", "min_pixels", 1024, "min_pixels=1024, max_pixels=4096 contradict the saved image processor"),
    ("config", "max_pixels", 16384, "min_pixels=4096, max_pixels=16384 contradict the saved image processor"),
    ("config", "lora_r", 4, "lora_r=4 contradicts"),
    ("config", "lora_alpha", 8, "lora_alpha=8 contradicts"),
    ("config", "calibrator", "off", "calibrator='off' switches off the calibrator weights"),
    ("config", "calibrator_rank", 16, "calibrator_rank=16"),
    ("config", "calibrator_hidden", 256, "calibrator_hidden=256"),
    ("config", "train_vision", "false", "train_vision='false' switches off the visual weights"),
    ("config", "backbone", "tiny-qwen2-vl", "base is 'qwen3_vl' but the checkpoint config names backbone"),
    ("meta", "dim", 64, "dim=64, but the backbone built from this checkpoint has dim=128"),
    ("meta", "model_type", "qwen2_vl", "model_type 'qwen2_vl' does not match backbone 'tiny'"),
]


@pytest.mark.parametrize("where,field,value,says", EDITS, ids=[f"{e[1]}={e[2]}" for e in EDITS])
def test_config_contradicting_its_weights_or_processor_is_refused(where, field, value, says, ckpt, tmp_path):
    """An edited config is refused naming the field (an edited pixel budget would describe images the
    saved processor does not make, lowering Recall without a word). Checked on a checkpoint written
    before the config's copy in embedder.safetensors' metadata (which now catches these edits first,
    tests/test_reliability_state.py): the checks against the saved files still hold such a one."""
    from safetensors.torch import load_file, save_file

    from model import FashionLensEmbedder
    from support.errors import CheckpointError

    path = _copy(ckpt, tmp_path)
    weights = path / "embedder.safetensors"
    save_file(load_file(str(weights)), str(weights))  # without the metadata, as written before it
    _edit_meta(path, lambda m: m["sha256"].__setitem__("embedder.safetensors", plumbing.file_sha256(weights)))
    _edit_meta(path, lambda m: (m["config"] if where == "config" else m).__setitem__(field, value))
    with pytest.raises(CheckpointError) as e:
        FashionLensEmbedder.from_pretrained(path)
    assert says in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value), str(e.value)


# ------------------------------------------------------------------------------------------------
# The benchmarks' command lines
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script,flag,value", [
    ("ablation", "--seeds", "a"), ("ablation", "--steps", "0"), ("ablation", "--eval-every", "-1"),
    ("ablation", "--variants", "nope"), ("ablation", "--device", "cuda:x"), ("ablation", "--jobs", "0"),
    ("controlled", "--experiments", "nope"), ("controlled", "--seeds", "a"), ("controlled", "--steps", "0"),
    ("controlled", "--jobs", "0"), ("controlled", "--device", "cuda:x"),
    ("speed", "--batches", "a"), ("speed", "--chunk", "0"), ("speed", "--search", "10"), ("speed", "--k", "0"),
    ("speed", "--n-images", "0"),
])
def test_benchmark_flags_are_one_error_line(script, flag, value, tmp_path):
    out = tmp_path / "results.json"
    args = [f"benchmarks/{script}.py", "--out", str(out)]
    args += {"ablation": ["--runs", str(tmp_path / "runs"), "--variants", "full", "--seeds", "0", "--steps", "1",
                          "--tasks", "t2i"],
             "controlled": ["--runs", str(tmp_path / "runs"), "--experiments", "pgsqc", "--seeds", "0",
                            "--steps", "1"],
             "speed": ["--no-memory", "--no-wall", "--n-queries", "8", "--n-images", "8", "--search", "8,64",
                       "--k", "5"]}[script]
    proc = _run([*args, flag, value], timeout=120)  # the flag last: it overrides the short defaults above
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert _one_error_line(proc.stderr).startswith(f"error: {flag} ")
    assert not out.exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script", ["ablation", "speed"])
def test_benchmark_output_under_a_file_is_refused(script, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = _run([f"benchmarks/{script}.py", "--out", str(blocker / "r.json"), "--no-memory" if script == "speed"
                 else "--quick"], timeout=120)
    assert proc.returncode == 1
    assert _one_error_line(proc.stderr) == f"error: --out {blocker}/r.json: {blocker} is not a directory"


def test_ablation_ctrl_c_keeps_finished_runs_and_says_how_to_continue(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("ablation_rel", REPO / "benchmarks" / "ablation.py")
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    finished = {"variant": "full", "seed": 0, "seconds": 1.0, "train_seconds": 1.0, "best": {"step": 1},
                "overall": {"1": 0.1, "10": 0.2}}

    def run_one(variant, seed, args, ufire):
        if variant == "full":
            return finished
        raise KeyboardInterrupt

    monkeypatch.chdir(REPO)  # ablation.main changes to the repository; this puts the old cwd back after
    monkeypatch.setattr(ablation, "run_one", run_one)
    runs = tmp_path / "runs"
    rc = ablation.main(["--variants", "full,cal-off", "--seeds", "0", "--tasks", "t2i", "--runs", str(runs),
                        "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert rc == 130 and "Traceback" not in err
    assert f"stopped by Ctrl-C in run cal-off-s0; 1 finished runs are kept in {runs}" in err
    assert not (tmp_path / "r.json").exists()
