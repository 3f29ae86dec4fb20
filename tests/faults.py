"""Test-only fault injection: run train.py with one fault planted at a chosen step.

    python tests/faults.py FAULT STEP -- train.py's flags...

FAULT (the step is the last one whose log line was written, i.e. run.step):
    stop-after-log       SIGSTOP itself right after step STEP's log line (a holder paused mid-run)
    kill-after-log       SIGKILL itself right after step STEP's log line (between two steps)
    kill-in-checkpoint   SIGKILL itself while last/ of step STEP is being built (.last.tmp half written)
    kill-between-renames SIGKILL itself between atomic_write's two renames of last/ (only .last.old left)
    enospc-log           the log line of step STEP meets a full disk: half of it is written, then ENOSPC
    enospc-checkpoint    the first weights file of last/ at step STEP meets a full disk: a partial file,
                         then safetensors' own SafetensorError (not an OSError), as a real full disk gives

Everything is patched from here (os.write, os.replace, safetensors.torch.save_file, run_dir.log_step):
the project's code holds no test hook. The faults sit at the lowest layer so they hold whatever the code
above them does.
"""
from __future__ import annotations

import errno
import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from support import plumbing, run_dir  # noqa: E402,F401  plumbing first: it sets OMP_WAIT_POLICY before torch

STEP = {"logged": 0}  # the last step whose log line was written


def _suicide(sig: int) -> None:
    sys.stdout.flush(), sys.stderr.flush()
    os.kill(os.getpid(), sig)


def install(fault: str, at: int) -> None:
    """Plant `fault` at step `at` (module docstring)."""
    real_log_step = run_dir.log_step

    def log_step(run, *args, **kwargs):
        real_log_step(run, *args, **kwargs)
        STEP["logged"] = run.step
        if run.step == at and fault in ("stop-after-log", "kill-after-log"):
            _suicide(signal.SIGSTOP if fault == "stop-after-log" else signal.SIGKILL)

    run_dir.log_step = log_step

    if fault == "enospc-log":
        real_write, head = os.write, b'{"step": %d,' % at

        def write(fd, data):
            if bytes(data).startswith(head):
                real_write(fd, bytes(data)[: len(data) // 2])  # a full disk takes part of a write
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(fd, data)

        os.write = write
    elif fault in ("kill-in-checkpoint", "enospc-checkpoint"):
        import safetensors.torch as st
        from safetensors import SafetensorError

        real_save = st.save_file

        def save_file(tensors, filename, metadata=None):
            if ".last.tmp" in str(filename) and STEP["logged"] == at:
                if fault == "kill-in-checkpoint":
                    real_save(tensors, filename, metadata=metadata)
                    _suicide(signal.SIGKILL)
                Path(filename).write_bytes(b"\0" * 4096)  # what the disk took before it was full
                raise SafetensorError("Error while serializing: No space left on device (os error 28)")
            return real_save(tensors, filename, metadata=metadata)

        st.save_file = save_file
    elif fault == "kill-between-renames":
        real_replace = os.replace

        def replace(src, dst, **kw):
            real_replace(src, dst, **kw)
            if Path(dst).name == ".last.old" and STEP["logged"] == at:
                _suicide(signal.SIGKILL)

        os.replace = replace
    elif fault not in ("stop-after-log", "kill-after-log"):
        raise SystemExit(f"unknown fault {fault!r}")


if __name__ == "__main__":
    fault, at, sep, *argv = sys.argv[1:]
    assert sep == "--", "usage: python tests/faults.py FAULT STEP -- train.py flags"
    install(fault, int(at))
    import train

    sys.exit(train.main(argv))
