"""Expected failures, and the one way every entry point reports them (support code: skip on first read).

A user mistake (a missing or damaged file, a malformed record, a bad flag, a checkpoint of another
backbone) is not a bug, so it gets one line that names the file, the record or the flag, and a
non-zero exit status; a traceback is kept for real bugs. Every such error in the project derives from
FashionLensError (the classes below), and every
command line (train.py, evaluate.py, data.py, support.synthetic, the benchmarks) runs its main through
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


# Every expected failure of the project, one class per kind of bad input (raised by the concept files
# and the support code alike; each derives from FashionLensError, so run_cli reports it in one line).

class UFireError(FashionLensError, ValueError):
    """Bad input: the message always names the file and the record id/index."""


class EvalError(FashionLensError, ValueError):
    """A bad evaluate.py flag, or embeddings no number can be computed from (names the flag or file)."""


class EmbedderConfigError(FashionLensError, ValueError):
    """An EmbedderConfig value no embedder can use (the message names the field)."""


class CheckpointError(FashionLensError, ValueError):
    """A checkpoint folder is incomplete or belongs to another backbone (the message names the path)."""


class BackboneError(FashionLensError, ValueError):
    """A real backbone that cannot be loaded offline: not found locally, or its folder is incomplete."""


class NonFiniteLoss(FloatingPointError):
    """Raised inside a step; the training loop turns it into a TrainingError naming step and task."""


class TrainingError(FashionLensError, RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says where and what is left."""


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
