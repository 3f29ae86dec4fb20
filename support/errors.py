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

import os
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


class WriteError(FashionLensError, OSError):
    """A file or folder was not written: the disk is full (errno ENOSPC or EDQUOT, kept in .errno),
    or the target is a device, FIFO or socket, never replaced by a regular file. The message names
    the path and what is left intact. An OSError too, so code that tolerates a failed write (the
    gallery cache only warns) still does."""


def run_cli(main: Callable[[Optional[Sequence[str]]], Optional[int]], argv: Optional[Sequence[str]] = None,
            expected: tuple = ()) -> int:
    """Run `main(argv)` and return its exit status; expected failures become one `error:` line.

    expected: further exception types to report the same way (e.g. FileNotFoundError for a path the
    user typed). Ctrl-C stops with status 130 and one line; `main` may catch KeyboardInterrupt first
    to say how to continue (train.py names `--resume`). SystemExit (argparse, explicit exits) passes
    through unchanged.

    What is printed never costs a result: while `main` runs, stdout and stderr write what they cannot
    encode as backslash escapes (a file name that is not UTF-8, under a strict UTF-8 or ASCII
    locale), and a closed pipe (`... | head -n 1`) silences the stream instead of raising
    BrokenPipeError mid-run: the command goes on, writes its files and exits as it would have.
    """
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = guards = _Unbreakable(sys.stdout), _Unbreakable(sys.stderr)
    try:
        return int(main(argv) or 0)
    except (FashionLensError, *expected) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        return 130
    finally:
        for guard in guards:
            guard.restore()  # what is still buffered goes out now, while a closed pipe is still caught
        sys.stdout, sys.stderr = saved


class _Unbreakable:
    """A text stream (sys.stdout or sys.stderr) whose writes cannot fail: characters it cannot encode
    become backslash escapes, and once its reader is gone (EPIPE) its file descriptor is pointed at
    os.devnull, so this write and every later one (Python's own flush at exit included) are dropped.
    Everything else is the wrapped stream's (isatty, fileno, encoding...)."""

    def __init__(self, stream):
        self._stream, self._errors = stream, getattr(stream, "errors", None)
        self._set_errors("backslashreplace")  # only the error handler changes; the encoding stays

    def _set_errors(self, errors) -> None:
        """Switch the wrapped stream's encoding error handler (a stream that has none is left as is)."""
        try:
            if errors and hasattr(self._stream, "reconfigure"):
                self._stream.reconfigure(errors=errors)  # flushes first, so it may meet a closed pipe
        except BrokenPipeError:
            self._drop()
        except (ValueError, OSError):  # a closed or exotic stream: keep its handler
            pass

    def restore(self) -> None:
        """Flush, and give the stream its own error handler back (run_cli may be called in-process)."""
        self.flush()
        self._set_errors(self._errors)

    def __getattr__(self, name):
        return getattr(self._stream, name)

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._drop()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._drop()
        except ValueError:  # the stream was closed (by a test harness): nothing left to flush
            pass

    def _drop(self) -> None:
        """The reader closed the pipe: send this stream's bytes to os.devnull from now on."""
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._stream.fileno())
            os.close(null)
        except (OSError, ValueError, AttributeError):  # no file descriptor: swap the object instead
            self._stream = open(os.devnull, "w")
