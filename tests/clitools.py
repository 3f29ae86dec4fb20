"""What the reliability tests share: run a command line as a user types it, and judge its failure.

A failure of bad input must be: a non-zero exit status, exactly one `error:` line on stderr naming the
file (or flag) at fault, no Python traceback, and every file already written unchanged (by sha256).
These helpers say so in one place for tests/test_reliability_*.py.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cli_env(**extra: str) -> dict:
    """The environment of a user's shell: offline, no inherited launcher rank, quiet warnings."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)  # never inherit a torchrun rank
    env.update(extra)
    return env


def run_cmd(args: list, timeout: int = 300, cwd: Path = REPO, **popen) -> subprocess.CompletedProcess:
    """`python ARGS...` from the repository root, as a user types it (text output captured)."""
    popen.setdefault("env", cli_env())
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, **popen)


def one_error_line(err: str, *names) -> str:
    """stderr of an expected failure: no traceback and exactly one `error:` line, which names every
    one of `names` (a file, a flag, a pid); returns that line."""
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict:
    """{relative path: sha256} of every regular file under `folder` (symlinks and devices skipped):
    compare two snapshots to prove that nothing already written was lost or changed."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}
