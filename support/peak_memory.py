"""The host memory a block of work adds: what it allocates on top of the resident set at its start.

    with CpuPeak() as p:
        work()
    p.baseline_bytes, p.peak_bytes, p.step_bytes, p.kind   # RSS at entry, peak, peak - RSS, method

On a CPU this is what a training step costs in RAM (activations kept for backward, gradients,
optimizer state, allocator slack); the benchmarks (speed.py's memory worker, paper_scale.py) report it.

The methods (`method="auto"` takes the first this process has):
  anon-sampled  a thread reads RssAnon (anonymous memory: the heap, malloc's mmaps) every ~1 ms while
           the block runs, and once more at its exit. step = highest RssAnon - RssAnon at entry,
           baseline = VmRSS at entry, peak = baseline + step. A lower bound: a peak shorter than a sample
           interval (or reached while the block holds the GIL) can be missed; one still held at the exit
           is not.
  rss-sampled  the same with VmRSS, where the kernel has no RssAnon field (before Linux 4.5).
  ru_maxrss  no /proc at all: the process's lifetime peak (whatever built the model included); the
           block's figure is how much that lifetime peak rose, a lower bound.
  hwm      only when asked for: the kernel's exact high-water mark, VmHWM after a reset to the current
           RSS (write 5 to /proc/self/clear_refs).

Why anonymous memory, not the resident set (2026-12-08): on the project's CI machine VmHWM did not
record a 64 MiB block allocated and freed inside the block, so a benchmark would have reported a step
memory far too small without any error; and in a later test run VmRSS did not rise at all while a
written 64 MiB block was held. The likely cause of both: VmRSS, and with it VmHWM, counts file pages
too (mapped libraries, an mmapped checkpoint), and under memory pressure the kernel took this process's
file pages back as fast as the block came in. Reclaiming file pages leaves RssAnon alone (anonymous pages
go only to swap, and there is none here), so it rises by what the step allocates whatever the page cache
does. The "hwm" method stays for who wants the kernel's own figure; its `kind` says it counts file
pages and that reclaim can hide a peak. (The old check that VmHWM records a transient block,
kernel_tracks_peaks, is gone: nothing picks "hwm" by itself any more.)

Standard library only (no torch), Linux /proc where there is one. Support code: skip on first read.
"""
from __future__ import annotations

import resource
import sys
import threading
from pathlib import Path
from typing import Optional

MiB = 2 ** 20
SAMPLE_SECONDS = 0.001  # the sampler's interval
METHODS = ("auto", "anon-sampled", "rss-sampled", "hwm")
SAMPLER_NAME = "CpuPeak sampler"  # the sampler thread's name (a test looks for it)
KINDS = {
    "anon-sampled": "anonymous memory (RssAnon) sampled every {ms:g} ms: the step's own allocations; a peak "
                    "shorter than {ms:g} ms can be missed; file pages (mapped libraries, an mmapped "
                    "checkpoint) excluded",
    "rss-sampled": "resident set (VmRSS; no RssAnon on this kernel) sampled every {ms:g} ms: a lower bound; "
                   "a peak shorter than {ms:g} ms can be missed; file pages counted, and their reclaim "
                   "during the step hides part of it",
    "hwm": "resident-set high-water mark (VmHWM since a clear_refs reset): exact, but counts file pages "
           "(mapped libraries, an mmapped checkpoint) too, so the kernel reclaiming them during the step "
           "can hide part of its peak",
    "ru_maxrss": "ru_maxrss: the process's lifetime peak (all before the block included); step = its rise, "
                 "a lower bound",
}


def status_bytes(field: str) -> Optional[int]:
    """A memory field of /proc/self/status ("VmRSS", "RssAnon", "VmHWM") in bytes; None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # the kernel writes kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_hwm() -> bool:
    """Reset this process's VmHWM to its current RSS (write 5 to /proc/self/clear_refs); False if it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _maxrss_bytes() -> int:
    """The process's lifetime peak RSS (getrusage: KiB on Linux, bytes on macOS)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


class CpuPeak:
    """Context manager: the memory the block it wraps adds (module docstring).

    method: "auto" (anon-sampled, else rss-sampled without RssAnon, else ru_maxrss without /proc), or
    force "anon-sampled" / "rss-sampled" / "hwm" (a RuntimeError where this system cannot). After the
    block: `method` (the one used), `kind` (a description for result rows), `baseline_bytes` (VmRSS at
    entry; None with ru_maxrss), `step_bytes` (what the block added at its highest), `peak_bytes`
    (baseline + step; with ru_maxrss, the lifetime peak).
    """

    def __init__(self, method: str = "auto", interval: float = SAMPLE_SECONDS):
        if method not in METHODS:
            raise ValueError(f"CpuPeak method {method!r}: one of {', '.join(METHODS)}")
        self.requested, self.interval = method, interval
        self.method = self.kind = ""
        self.baseline_bytes: Optional[int] = None
        self.peak_bytes: Optional[int] = None
        self.step_bytes: Optional[int] = None
        self._field = ""  # the /proc/self/status field sampled
        self._start = self._high = 0  # that field at entry, and the highest seen
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "CpuPeak":
        self.method = self._choose()
        self.kind = KINDS[self.method].format(ms=self.interval * 1000)
        if self.method == "ru_maxrss":
            self._start = _maxrss_bytes()
            return self
        if self.method == "hwm" and not reset_hwm():
            raise RuntimeError("CpuPeak(method='hwm'): cannot write /proc/self/clear_refs")
        self._field = {"anon-sampled": "RssAnon", "rss-sampled": "VmRSS", "hwm": "VmHWM"}[self.method]
        self.baseline_bytes = status_bytes("VmRSS")
        self._start = self._high = self.baseline_bytes if self.method == "hwm" else status_bytes(self._field)
        if self.method != "hwm":
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, name=SAMPLER_NAME, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        if self._thread is not None:  # stop the sampler first, whatever the block did
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self.method == "ru_maxrss":
            self.peak_bytes = _maxrss_bytes()
            self.step_bytes = max(0, self.peak_bytes - self._start)
            return False
        self._take()  # the exit's own sample: a block shorter than one interval, still held, is seen
        self.step_bytes = self._high - self._start
        self.peak_bytes = self.baseline_bytes + self.step_bytes
        return False  # an exception in the block goes on

    def _choose(self) -> str:
        if status_bytes("VmRSS") is None:
            if self.requested != "auto":
                raise RuntimeError(f"CpuPeak(method={self.requested!r}): no /proc/self/status here")
            return "ru_maxrss"
        has_anon = status_bytes("RssAnon") is not None
        if self.requested == "auto":
            return "anon-sampled" if has_anon else "rss-sampled"
        if self.requested == "anon-sampled" and not has_anon:
            raise RuntimeError("CpuPeak(method='anon-sampled'): no RssAnon in /proc/self/status (Linux < 4.5)")
        return self.requested

    def _take(self) -> None:
        value = status_bytes(self._field)
        if value is not None and value > self._high:
            self._high = value

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._take()
