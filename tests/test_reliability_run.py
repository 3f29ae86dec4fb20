"""Reliability of a run folder: one writer at a time, and no crash that blocks `--resume`.

Issue 29, rows 5-7 (two writers on one folder), 11-13 (a full disk mid-log, a torn or undecodable
last log line), 15 (a full disk while writing a checkpoint), the run killed before its first
checkpoint, a folder reached by two spellings, and a folder removed while training.

Most of it is ONE chain of real command lines on one small run folder (module fixture `chain`,
~35 s on 2 cores); the tests then check what each link left:

    holder  tests/faults.py stop-after-log 1 -- train.py ...   pauses itself (SIGSTOP) after step 1
            while paused: a second fresh train.py (row 5), a --resume (row 6), another seed (row 7),
            and a --resume through a symlink to the folder (in this process): each refused
            SIGKILL the holder: the folder holds config.json and step 1's log line, no last/
            a fresh start there (in this process): refused, naming the --resume that starts it over
    over    faults.py enospc-checkpoint 4 -- train.py --resume R   starts it over (the killed holder
            left no lock), checkpoints step 2, then meets a full disk writing last/ at step 4 (row 15)
            a torn last line with half a UTF-8 character is appended to log.jsonl (rows 12, 13)
    logfull faults.py enospc-log 3 -- train.py --resume R   drops that line with a warning, then
            meets a full disk writing step 3's log line (row 11)

Slow (`python -m pytest -m slow`): the chain's run resumed to its end and SIGKILLs at three points,
each bit-identical to one uninterrupted run, and a real full disk on a small tmpfs.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import plumbing, run_dir  # noqa: I001  before torch: it sets OMP_WAIT_POLICY
from support.errors import TrainingError, WriteError
from clitools import REPO, cli_env, one_error_line, run_cmd, snapshot

SMALL = ["--tasks", "t2i", "--batch-size", "4", "--chunk-size", "0", "--max-eval-queries", "2", "--no-final-test"]
RUN = [*SMALL, "--steps", "4", "--eval-every", "2"]  # checkpoints at steps 2 and 4


def _main(args: list) -> tuple[int, str, str]:
    """train.main(args) in this process -> (exit status, stdout, stderr)."""
    import train

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = train.main([str(a) for a in args])
        except SystemExit as stop:
            rc = 1 if isinstance(stop.code, str) else stop.code
            print(stop.code, file=sys.stderr)
    return rc, out.getvalue(), err.getvalue()


def _popen(args: list) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, env=cli_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_stopped(proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until `proc` has stopped itself (SIGSTOP); fails if it exits or takes too long."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        pid, status = os.waitpid(proc.pid, os.WUNTRACED | os.WNOHANG)
        if pid and os.WIFSTOPPED(status):
            return
        assert not pid, f"the holder ended before pausing (status {status})"
        time.sleep(0.1)
    raise AssertionError("the holder never paused")


def _log_lines(run: Path) -> list:
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]


def _state_step(ckpt: Path) -> int:
    return json.loads((ckpt / "train_state.json").read_text())["step"]


@pytest.fixture(scope="module")
def chain(tiny_root, tmp_path_factory) -> dict:
    """The module docstring's chain of command lines; returns what each link printed and left."""
    tmp = tmp_path_factory.mktemp("chain")
    run, alias = tmp / "run", tmp / "alias"
    alias.symlink_to(run)
    fresh = ["train.py", "--data", tiny_root, *RUN, "--out", run]
    r = {"run": run, "alias": alias, "root": tiny_root, "fresh": fresh}
    holder = _popen(["tests/faults.py", "stop-after-log", "1", "--", *fresh[1:]])
    try:
        _wait_stopped(holder)
        r["lock_text"] = (run / run_dir.LOCK_FILE).read_text()
        before = snapshot(run)
        seconds = [_popen(args) for args in (fresh, ["train.py", "--resume", run], [*fresh, "--seed", "1"])]
        r["alias_refusal"] = _main(["--resume", alias])  # own case: another spelling of the same folder
        r["refusals"] = [(p.wait(timeout=300), *p.communicate()) for p in seconds]
        r["unchanged_while_held"] = snapshot(run) == before
    finally:
        holder.kill()  # SIGKILL: no finally of the holder runs; only the kernel lets the lock go
        holder.communicate()
    r["killed"] = {"files": sorted(p.name for p in run.iterdir()), "log": _log_lines(run)}
    before = snapshot(run)
    r["fresh_on_killed"] = _main(fresh[1:])
    r["fresh_on_killed_unchanged"] = snapshot(run) == before
    r["over"] = run_cmd(["tests/faults.py", "enospc-checkpoint", "4", "--", "--resume", run])
    r["after_over"] = {"last_step": _state_step(run / "last"), "last": snapshot(run / "last"),
                       "best": snapshot(run / "best"), "hidden": sorted(p.name for p in run.glob(".*"))}
    with open(run / "log.jsonl", "ab") as f:  # a kill in the middle of an append: torn, half a UTF-8 character
        f.write('{"step": 5, "loss": 0.25, "subset": "t2i/Syn€'.encode()[:-1])
    r["logfull"] = run_cmd(["tests/faults.py", "enospc-log", "3", "--", "--resume", run])
    r["after_logfull"] = {"last": snapshot(run / "last"), "best": snapshot(run / "best"),
                          "log": (run / "log.jsonl").read_bytes()}
    return r


# ------------------------------------------------------------------------------------------------
# Rows 5, 6, 7 and own case 1: one writer per run folder
# ------------------------------------------------------------------------------------------------

def test_the_lock_file_names_its_holder(chain):
    assert chain["lock_text"].startswith("pid ") and " since " in chain["lock_text"], chain["lock_text"]


@pytest.mark.parametrize("i,row", [(0, "5: a second fresh run"), (1, "6: --resume while training"),
                                   (2, "7: another seed")])
def test_a_second_writer_is_refused_naming_the_holder(chain, i, row):
    rc, out, err = chain["refusals"][i]
    assert rc == 1, (row, err[-3000:])
    pid = chain["lock_text"].split()[1]
    line = one_error_line(err, chain["run"], f"pid {pid}", "in use")
    assert "Traceback" not in out and "done:" not in out, row
    assert line.count(str(chain["run"])) >= 2, line  # the folder, and the --resume that continues it


def test_the_folder_is_unchanged_by_the_refused_writers(chain):
    assert chain["unchanged_while_held"]


def test_another_spelling_of_the_folder_is_the_same_lock(chain):
    """Own case (path aliasing): flock belongs to the file, so a symlink to the folder is refused too."""
    rc, _, err = chain["alias_refusal"]
    assert rc == 1
    one_error_line(err, chain["alias"], "in use", f"pid {chain['lock_text'].split()[1]}")


# ------------------------------------------------------------------------------------------------
# Killed before the first checkpoint: --resume starts over; the killed holder left no lock
# ------------------------------------------------------------------------------------------------

def test_a_run_killed_before_its_first_checkpoint_leaves_no_last(chain):
    files, log = chain["killed"]["files"], chain["killed"]["log"]
    assert "last" not in files and {"config.json", "log.jsonl", ".lock"} <= set(files), files
    assert [x["step"] for x in log] == [1]


def test_a_fresh_start_there_names_the_resume_that_starts_it_over(chain):
    rc, _, err = chain["fresh_on_killed"]
    assert rc == 1
    line = one_error_line(err, chain["run"], "already holds a run")
    assert f"start it over with --resume {chain['run']}" in line, line
    assert chain["fresh_on_killed_unchanged"]


def test_resume_starts_the_killed_run_over_without_any_flag(chain):
    """The SIGKILLed holder's lock is gone with it: --resume takes the folder, says it starts over,
    and trains from step 1 (it then meets the full disk of the next test at step 4)."""
    proc = chain["over"]
    assert "in use" not in proc.stderr, proc.stderr[-3000:]
    said = [ln for ln in proc.stdout.splitlines() if "starting it over" in ln]
    assert len(said) == 1 and str(chain["run"]) in said[0] and "before its first checkpoint" in said[0], said
    assert chain["after_over"]["last_step"] == 2


# ------------------------------------------------------------------------------------------------
# Rows 15, 12, 13, 11: a full disk, then a torn and undecodable last line
# ------------------------------------------------------------------------------------------------

def test_disk_full_while_writing_a_checkpoint_is_one_error_and_keeps_the_old_one(chain):
    """Row 15: safetensors' own SafetensorError for ENOSPC becomes one line naming last/; the last/
    of step 2 is whole, nothing half-written is left behind."""
    proc, run = chain["over"], chain["run"]
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = one_error_line(proc.stderr, run / "last", "no space left on device", "intact",
                          f"--resume {run}")
    assert "Free some space" in line, line
    assert chain["after_over"]["hidden"] == [".lock"]  # no .last.tmp / .last.old left


def test_torn_undecodable_last_log_line_is_dropped_with_a_warning(chain):
    """Rows 12 and 13: the resume drops the torn line (half a UTF-8 character) with one warning."""
    err, log = chain["logfull"].stderr, chain["run"] / "log.jsonl"
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and str(log) in warnings[0] and "last line" in warnings[0], err[-3000:]
    assert "Traceback" not in err


def test_disk_full_while_logging_keeps_the_log_whole(chain):
    """Row 11: half of step 3's line was written when the disk filled up: the line is taken back, the
    error names log.jsonl and the --resume; the checkpoints are untouched, every line parses."""
    proc, run, after = chain["logfull"], chain["run"], chain["after_logfull"]
    assert proc.returncode == 1, proc.stderr[-3000:]
    one_error_line(proc.stderr, run / "log.jsonl", "no space left on device", f"--resume {run}")
    assert after["log"].endswith(b"\n")
    assert [(x.get("event"), x["step"]) for x in _log_lines(run)] == [(None, 1), (None, 2), ("val", 2)]
    assert after["last"] == chain["after_over"]["last"] and after["best"] == chain["after_over"]["best"]


# ------------------------------------------------------------------------------------------------
# In this process: the log, the atomic writer, the lock, a folder removed while training
# ------------------------------------------------------------------------------------------------

def _log_file(tmp_path: Path, tail: bytes) -> Path:
    log = tmp_path / "log.jsonl"
    for s in (1, 2, 3):
        plumbing.append_jsonl(log, {"step": s, "loss": s / 10})
    with open(log, "ab") as f:
        f.write(tail)
    return log


@pytest.mark.parametrize("tail", [b'{"step": 4, "lo', b'{"step": 4, "subset": "\xe2\x82', b"[4]\n", b'"4"',
                                  b'{"step": "4"}\n', b"[" * 100_000, b"\xff\xfe\n"],
                         ids=["torn", "half-utf8", "list", "string", "step-not-int", "deep", "binary"])
def test_trim_drops_a_bad_last_line_with_one_warning(tail, tmp_path, capsys):
    log = _log_file(tmp_path, tail)
    plumbing.trim_jsonl(log, 2)
    assert log.read_text() == '{"step": 1, "loss": 0.1}\n{"step": 2, "loss": 0.2}\n'
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: {log}: dropped its last line 4"), err


@pytest.mark.parametrize("bad", [b'{"step": 2, "lo\n', b'{"x": "\xff"}\n', b"[2]\n"])
def test_a_bad_line_before_the_last_is_an_error_naming_the_line(bad, tmp_path):
    log = _log_file(tmp_path, bad + b'{"step": 4}\n')
    before = log.read_bytes()
    with pytest.raises(TrainingError, match=rf"^{log}: line 4 of 5 is unreadable"):
        plumbing.trim_jsonl(log, 2)
    assert log.read_bytes() == before


def test_append_on_a_full_disk_takes_its_half_line_back(tmp_path, monkeypatch):
    log = _log_file(tmp_path, b"")
    before = log.read_bytes()
    real_write = os.write

    def full(fd, data):
        real_write(fd, data[:7])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(WriteError, match=rf"^{log}: not written, no space left on device") as e:
        plumbing.append_jsonl(log, {"step": 4, "loss": 0.4})
    assert e.value.errno == errno.ENOSPC and isinstance(e.value, OSError)
    assert log.read_bytes() == before


@pytest.mark.parametrize("error", [OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)),
                                   RuntimeError("Error while serializing: No space left on device (os error 28)")],
                         ids=["EDQUOT", "SafetensorError-like"])
def test_atomic_write_on_a_full_disk_keeps_the_old_folder(error, tmp_path):
    ck = tmp_path / "last"
    plumbing.atomic_write(ck, lambda t: (t.mkdir(), (t / "w").write_text("old")))

    def build(t: Path):
        t.mkdir()
        (t / "w").write_text("half")
        raise error

    with pytest.raises(WriteError, match=rf"^{ck}: not written, .*; the copy already there is intact$") as e:
        plumbing.atomic_write(ck, build)
    assert e.value.errno == getattr(error, "errno", errno.ENOSPC)
    assert (ck / "w").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def _device_or_skip(path: Path) -> None:
    try:
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 7))  # the same device as /dev/full
    except (PermissionError, AttributeError) as e:
        pytest.skip(f"cannot make a character device here (needs root): {e}")


@pytest.mark.parametrize("kind", ["char-device", "fifo", "symlink-to-device"])
def test_atomic_write_never_replaces_a_device_fifo_or_socket(kind, tmp_path):
    node = tmp_path / "node"
    if kind == "fifo":
        os.mkfifo(node)
    else:
        _device_or_skip(node)
    target = node
    if kind == "symlink-to-device":
        target = tmp_path / "link"
        target.symlink_to(node)
    with pytest.raises(WriteError, match=rf"^{target}: is a (character device|named pipe \(FIFO\)), not a regular file"):
        plumbing.atomic_write(target, "{}")
    mode = node.lstat().st_mode
    assert stat.S_ISFIFO(mode) if kind == "fifo" else stat.S_ISCHR(mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"node", target.name})


def test_the_lock_is_let_go_on_every_way_out_and_never_blocks_its_own_process(tmp_path):
    """A process that trains twice (train.train twice on one folder) takes the lock again; inside one
    scope it is re-entrant; another process is refused while it is held, and takes it afterwards."""
    lock = tmp_path / run_dir.LOCK_FILE
    probe = [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR)\n"
             "try: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError: sys.exit(3)", str(lock)]
    for attempt in range(2):
        with pytest.raises(KeyError) if attempt else contextlib.nullcontext():
            with run_dir.one_writer():
                key = run_dir.lock_run(tmp_path)
                assert run_dir.lock_run(tmp_path / ".." / tmp_path.name) == key  # same inode: already ours
                assert subprocess.run(probe).returncode == 3  # held: another process is refused
                if attempt:
                    raise KeyError("an error in train.setup after the lock")
        assert key not in run_dir._HELD and lock.read_text() == ""
        assert subprocess.run(probe).returncode == 0  # let go


@pytest.mark.parametrize("how", ["removed", "moved"])
def test_a_folder_gone_while_training_stops_the_next_log_write(how, tmp_path):
    """Own case (the folder removed or moved under a running job): the next log write refuses, naming
    the folder, instead of writing into a recreated half folder. (The whole command: the slow test below.)"""
    import shutil
    from types import SimpleNamespace

    out = tmp_path / "run"
    out.mkdir()
    with run_dir.one_writer():
        run_dir.lock_run(out)
        shutil.rmtree(out) if how == "removed" else out.rename(tmp_path / "moved")
        run = SimpleNamespace(out=out, di=plumbing.DistInfo(), elapsed0=0.0, t_start=0.0, t_prev=0.0)
        with pytest.raises(TrainingError, match=rf"^{out} disappeared while training"):
            run_dir.log_step(run, None, "t2i/SynGen", 0, 1e-3, 1.0, 1.0, False)
        assert not out.exists()


# ------------------------------------------------------------------------------------------------
# Slow: exact resumes (after the chain's full disks, and after SIGKILL at three points); a real tmpfs
# ------------------------------------------------------------------------------------------------

def _weights(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    out = {f"extra.{k}": v for k, v in load_file(str(ckpt / "embedder.safetensors")).items()}
    out.update({f"lora.{k}": v for k, v in load_file(str(ckpt / "adapter" / "adapter_model.safetensors")).items()})
    return out


def _same_weights(a: Path, b: Path) -> bool:
    import torch

    wa, wb = _weights(a), _weights(b)
    return set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def reference(tiny_root, tmp_path_factory) -> Path:
    """The uninterrupted 4-step run every interrupted one must end equal to."""
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = run_cmd(["train.py", "--data", tiny_root, *RUN, "--out", out])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _steps_once(run: Path) -> None:
    assert [x["step"] for x in _log_lines(run) if x.get("event") is None] == [1, 2, 3, 4]


@pytest.mark.slow
def test_resume_after_the_full_disks_ends_exactly_where_an_uninterrupted_run_does(chain, reference):
    run = chain["run"]
    proc = run_cmd(["train.py", "--resume", run])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _same_weights(run / "last", reference / "last") and _same_weights(run / "best", reference / "best")
    _steps_once(run)


@pytest.mark.slow
@pytest.mark.parametrize("fault,at", [("kill-after-log", 3), ("kill-in-checkpoint", 4), ("kill-between-renames", 4)])
def test_sigkill_then_resume_ends_bit_identical(fault, at, tiny_root, reference, tmp_path):
    """(a) between steps after a log line, (b) while .last.tmp is being built, (c) between atomic_write's
    two renames (only .last.old holds the state): each resumes to the uninterrupted run's weights."""
    out = tmp_path / "run"
    killed = run_cmd(["tests/faults.py", fault, str(at), "--", "--data", tiny_root, *RUN, "--out", out])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    left = {"kill-after-log": "last", "kill-in-checkpoint": ".last.tmp", "kill-between-renames": ".last.old"}[fault]
    assert (out / left).exists() and (fault != "kill-between-renames" or not (out / "last").exists())
    resumed = run_cmd(["train.py", "--resume", out])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _same_weights(out / "last", reference / "last") and _same_weights(out / "best", reference / "best")
    assert sorted(p.name for p in out.glob(".*")) == [".lock"]
    _steps_once(out)


@pytest.fixture
def tmpfs(tmp_path):
    """A 256 MiB tmpfs (root only): a disk that really fills up (a checkpoint with its training state is ~60 MB)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


@pytest.mark.slow
def test_a_real_full_disk_then_resume_continues_exactly(tiny_root, reference, tmpfs):
    """A tmpfs filled up after step 2's checkpoint, all but 64 KiB (config.json and log lines fit, a
    checkpoint does not): one error line naming the checkpoint; space freed, --resume ends exactly."""
    out = tmpfs / "run"
    first = run_cmd(["train.py", "--data", tiny_root, *RUN, "--stop-at", "2", "--out", out])
    assert first.returncode == 0, first.stderr[-3000:]
    filler = tmpfs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    for chunk in (1 << 20, 4096):  # until the disk is full, to the last page
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, bytes(chunk))
    os.close(fd)
    os.truncate(filler, filler.stat().st_size - (64 << 10))
    kept = snapshot(out / "last")
    full = run_cmd(["train.py", "--resume", out])
    assert full.returncode == 1, full.stderr[-3000:]
    line = one_error_line(full.stderr, out, "no space left on device", f"--resume {out}")
    assert str(out / "last") in line or str(out / "best") in line, line
    assert snapshot(out / "last") == kept
    filler.unlink()
    again = run_cmd(["train.py", "--resume", out])
    assert again.returncode == 0, again.stderr[-3000:]
    assert _same_weights(out / "last", reference / "last") and _same_weights(out / "best", reference / "best")
    _steps_once(out)


@pytest.mark.slow
def test_a_folder_removed_while_training_stops_with_one_line_and_is_not_recreated(tiny_root, tmp_path, monkeypatch):
    """The own case above through train.main: rm -rf after step 1, one error line, no folder again."""
    import shutil

    import train

    out = tmp_path / "run"
    real_step = train.train_step

    def step_then_remove(run):
        result = real_step(run)
        if run.step == 1:
            shutil.rmtree(out)
        return result

    monkeypatch.setattr(train, "train_step", step_then_remove)
    rc, _, err = _main(["--data", tiny_root, *RUN, "--out", out])
    assert rc == 1
    one_error_line(err, out, "disappeared while training")
    assert not out.exists() and not run_dir._HELD
