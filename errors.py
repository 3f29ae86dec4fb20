"""Expected failures, and the one way every entry point reports them (support code: skip on first read).

A user mistake (a missing or damaged file, a malformed record, a bad flag, a checkpoint of another
backbone) is not a bug, so it gets one line that names the file, the record or the flag, and a
non-zero exit status; a traceback is kept for real bugs. Every such error in the project derives from
FashionLensError (data.UFireError, model.CheckpointError, train.TrainingError, ...), and every
command line (train.py, evaluate.py, data.py, synthetic.py, the benchmarks) runs its main through
`run_cli`, so they all behave alike.

Standard library only: data.py and synthetic.py import it without pulling in torch.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence


class FashionLensError(Exception):
    """An expected failure; its message says what is wrong and where (file, record, flag)."""


class FlagError(FashionLensError):
    """A command-line value no run can use; the message starts with the flag and its value."""


def run_cli(main: Callable[[Optional[Sequence[str]]], Optional[int]], argv: Optional[Sequence[str]] = None,
            expected: tuple = ()) -> int:
    """Run `main(argv)` and return its exit status; expected failures become one `error:` line.

    expected: further exception types to report the same way (e.g. FileNotFoundError for a path the
    user typed). Ctrl-C stops with status 130 and one line; `main` may catch KeyboardInterrupt first
    to say how to continue (train.py names `--resume`). SystemExit (argparse, explicit exits) passes
    through unchanged.
    """
    try:
        return int(main(argv) or 0)
    except (FashionLensError, *expected) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        return 130
