"""The input pipeline's worker: prepares the next batch while the model computes the current one.
(Support code, not the paper's method: skip it on a first read.)

What it does
------------
Turning a step's records into tensors (PNG decoding, resizing, patchifying, tokenising, mRoPE
positions) uses no trainable weight, so it can run ahead of the model. `Prefetcher` holds ONE
worker and a one-deep queue: `submit(request)` starts preparing a request, `get(request)` returns
its result. If the request asked for is not the one submitted (a wrong guess, see below) or none
was submitted, `get` prepares it right there, in the caller: the result is the same either way,
because `prepare(request)` must be a pure function of the request (train.make_batch seeds every
random draw from (seed, step, record)). So the worker changes when a batch is built, never what.

Why a guess: GGAS picks step t+1's sub-dataset from the gradient of step t, which exists only at
the end of step t. train.py therefore submits the batch that step t+1 WOULD draw if step t's report
changed nothing (sampler.TaskBatchSampler.peek); the draw itself is fixed by (seed, t+1), so the
guess is right whenever step t's report leaves the draw where it was: every step of the uniform
warm-up and most GGAS steps. `hits` / `misses` count it; a miss costs what no worker would.

Modes, the same results in each (tests/test_fast_paths.py):
    "process"  a forked worker process, as torch's DataLoader workers are: no GIL shared with
               training; the tensors come back through shared memory (torch's pickler).
    "thread"   a worker thread: no fork, but its Python work takes turns with the training thread's.
    "off"      no worker: every `get` prepares in the caller (the readable reference).
Which mode pays is measured, not assumed: benchmarks/speed.py prints the step-time shares.

Run it: `python -m support.prefetch` prepares a few fake requests in each mode and prints the hit counts.
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Optional

MODES = ("process", "thread", "off")

# The worker process's `prepare` (installed by _install at fork time: it is inherited, never pickled).
_PREPARE: Optional[Callable] = None


def _install(prepare: Callable) -> None:
    """Runs once in a forked worker: keep `prepare`, use one torch thread, leave Ctrl-C to the parent."""
    global _PREPARE
    _PREPARE = prepare
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us; no second traceback on Ctrl-C
    try:
        import torch
        torch.set_num_threads(1)  # the other core is the trainer's; OpenMP teams would fight over it
    except ImportError:  # prepare may not need torch at all
        pass


def _run_installed(request):
    """The worker process's task: prepare one request with the installed function."""
    return _PREPARE(request)


def _ready() -> bool:
    """A no-op task: waiting for it forces the worker process to start now, not mid-training."""
    return True


@dataclass
class PrefetchStats:
    """What the worker saved: hits were ready (or nearly), misses were prepared in the caller."""
    hits: int = 0  # get() found its request submitted
    misses: int = 0  # get() had to prepare in the caller (wrong guess, or nothing submitted)
    wait_seconds: float = 0.0  # time get() spent waiting for the worker's result (hits)
    inline_seconds: float = 0.0  # time get() spent preparing in the caller (misses)


class Prefetcher:
    """One worker preparing `prepare(request)` one request ahead; see the module docstring.

    Use as a context manager (or call close()): the worker process or thread is stopped on exit.
    """

    def __init__(self, prepare: Callable[[Hashable], Any], mode: str = "process"):
        if mode not in MODES:
            raise ValueError(f"Prefetcher: mode must be one of {MODES}, got {mode!r}")
        self.prepare, self.mode, self.stats = prepare, mode, PrefetchStats()
        self._pending: Optional[tuple[Hashable, cf.Future]] = None
        self._pool: Optional[cf.Executor] = None
        if mode == "thread":
            self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        elif mode == "process":
            # fork: the child inherits `prepare` (the data view, the collator) without pickling it.
            self._pool = cf.ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("fork"),
                                                initializer=_install, initargs=(prepare,))
            self._pool.submit(_ready).result()  # fork now, before any training thread exists

    def submit(self, request: Hashable) -> None:
        """Start preparing `request` on the worker (replacing an unclaimed earlier one)."""
        if self._pool is None:
            return
        if self._pending is not None:
            self._pending[1].cancel()  # not started: dropped; running: finishes, result unused
        task = (_run_installed, request) if self.mode == "process" else (self.prepare, request)
        self._pending = (request, self._pool.submit(*task))

    def get(self, request: Hashable):
        """The prepared result for `request`: the worker's if it was submitted, else made here."""
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == request:
            t0 = time.perf_counter()
            try:
                result = pending[1].result()  # a failure inside prepare is raised here, unchanged
            except cf.BrokenExecutor as e:  # the worker process died (e.g. killed for memory)
                raise RuntimeError(f"the loader's worker stopped ({type(e).__name__}: {e}); rerun with another "
                                   f"--loader (thread or off)") from None
            self.stats.hits += 1
            self.stats.wait_seconds += time.perf_counter() - t0
            return result
        if pending is not None:
            pending[1].cancel()
        t0 = time.perf_counter()
        result = self.prepare(request)
        self.stats.misses += 1
        self.stats.inline_seconds += time.perf_counter() - t0
        return result

    def close(self) -> None:
        """Stop the worker (pending work is dropped)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending = None

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    # Demo: a slow pure function, requests 0..9, guessing "the next number" except at 5 (a miss).
    def slow_square(n: int) -> int:
        time.sleep(0.05)
        return n * n

    for mode in MODES:
        t0 = time.perf_counter()
        with Prefetcher(slow_square, mode) as pf:
            out = []
            for n in range(10):
                out.append(pf.get(n))
                pf.submit(n + 1 if n != 4 else 99)  # a wrong guess before request 5
                time.sleep(0.05)  # "the model computing": the worker prepares meanwhile
        print(f"{mode:8s} {out[:4]}... hits {pf.stats.hits} misses {pf.stats.misses} "
              f"in {time.perf_counter() - t0:.2f}s")
