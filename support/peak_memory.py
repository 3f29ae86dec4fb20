"""The host memory a block of work adds: its resident-set peak above the resident set at its start.

    with CpuPeak() as p:
        work()
    p.baseline_bytes, p.peak_bytes, p.step_bytes, p.kind   # RSS at entry, peak, peak - RSS, method

On a CPU this is what a training step costs in RAM (activations kept for backward, gradients,
optimizer state, allocator slack); the benchmarks (speed.py's memory worker, paper_scale.py) report it.

Three ways to see the peak, the best this process has (`method="auto"`):
  hwm      the kernel's high-water mark: reset VmHWM to the current RSS (write 5 to
           /proc/self/clear_refs), run the block, read VmHWM. Exact, even for memory allocated and
           freed inside the block.
  sampled  a thread reads VmRSS every ~1 ms while the block runs. A lower bound: a peak shorter than
           a sample interval, or one reached while the block holds the GIL, can be missed.
  ru_maxrss  no /proc at all: the process's lifetime peak (whatever built the model included); the
           block's figure is how much that lifetime peak rose, a lower bound.

Why "auto" checks the kernel instead of trusting clear_refs (CI finding, 2026-12-08): on the project's
CI machine the write to /proc/self/clear_refs succeeded, yet VmHWM did not record a 64 MiB block that
was allocated and freed before VmHWM was read; it stayed at the RSS from before the block, so a
benchmark would have reported a step memory far too small without any error. (On the development
machine it is recorded; the cause on CI was not pinned down.) So `kernel_tracks_peaks()` makes the same
test once per process, on a 32 MiB block, and "auto" uses hwm only where it passes, else samples.

Standard library only (no torch), Linux /proc where there is one. Support code: skip on first read.
"""
from __future__ import annotations

import functools
import resource
import sys
import threading
from pathlib import Path
from typing import Optional

MiB = 2 ** 20
PROBE_BYTES = 32 * MiB  # the block kernel_tracks_peaks allocates and frees
SAMPLE_SECONDS = 0.001  # the sampler's interval
METHODS = ("auto", "hwm", "sampled")
SAMPLER_NAME = "CpuPeak sampler"  # the sampler thread's name (a test looks for it)


def status_bytes(field: str) -> Optional[int]:
    """A memory field of /proc/self/status ("VmRSS", "VmHWM") in bytes; None where there is none."""
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


@functools.lru_cache(maxsize=None)  # once per process: the answer is the kernel's
def kernel_tracks_peaks() -> bool:
    """Whether VmHWM records a block allocated and freed before it is read (see the module docstring)."""
    before = status_bytes("VmRSS")
    if before is None or not reset_hwm():
        return False
    before = status_bytes("VmRSS")  # after the reset, which may itself page something in
    block = b"\x01" * PROBE_BYTES  # written byte by byte, so every page is resident (bytearray(n) may
    del block                      # map shared zero pages and never raise the RSS)
    hwm = status_bytes("VmHWM")
    return hwm is not None and hwm - before >= PROBE_BYTES * 3 // 4


def _maxrss_bytes() -> int:
    """The process's lifetime peak RSS (getrusage: KiB on Linux, bytes on macOS)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


class CpuPeak:
    """Context manager: the resident-set peak of the block it wraps (module docstring).

    method: "auto" (hwm where kernel_tracks_peaks(), else sampled; ru_maxrss without /proc), or force
    "hwm" / "sampled" (a RuntimeError where this system cannot). After the block: `method` (the one
    used), `kind` (a description for result rows), `baseline_bytes` (RSS at entry; None with ru_maxrss),
    `peak_bytes`, `step_bytes` (peak above the baseline; with ru_maxrss, the lifetime peak's rise).
    """

    def __init__(self, method: str = "auto", interval: float = SAMPLE_SECONDS):
        if method not in METHODS:
            raise ValueError(f"CpuPeak method {method!r}: one of {', '.join(METHODS)}")
        self.requested, self.interval = method, interval
        self.method = self.kind = ""
        self.baseline_bytes: Optional[int] = None
        self.peak_bytes: Optional[int] = None
        self.step_bytes: Optional[int] = None
        self._maxrss_before = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "CpuPeak":
        self.method = self._choose()
        if self.method == "ru_maxrss":
            self._maxrss_before = _maxrss_bytes()
            self.kind = "ru_maxrss: the process's lifetime peak (all before the block included); step = its rise, a lower bound"
            return self
        if self.method == "hwm":
            self.kind = "resident-set peak: VmHWM since a clear_refs reset"
            if not kernel_tracks_peaks():  # only when forced: the row says so (the probe runs before the reset)
                self.kind += " (unreliable here: VmHWM missed a transient peak in the probe)"
            if not reset_hwm():
                raise RuntimeError("CpuPeak(method='hwm'): cannot write /proc/self/clear_refs")
        else:
            self.kind = f"resident-set peak: VmRSS sampled every {self.interval * 1000:g} ms (a lower bound)"
            if self.requested == "auto":
                self.kind += "; this kernel's VmHWM misses transient peaks"
        self.baseline_bytes = self.peak_bytes = status_bytes("VmRSS")
        if self.method == "sampled":
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
            self.step_bytes = max(0, self.peak_bytes - self._maxrss_before)
            return False
        last = status_bytes("VmHWM" if self.method == "hwm" else "VmRSS")
        self.peak_bytes = max(self.peak_bytes, last or 0)  # hwm: VmHWM >= the baseline; sampled: one last sample
        self.step_bytes = self.peak_bytes - self.baseline_bytes
        return False  # an exception in the block goes on

    def _choose(self) -> str:
        if status_bytes("VmRSS") is None:
            if self.requested != "auto":
                raise RuntimeError(f"CpuPeak(method={self.requested!r}): no /proc/self/status here")
            return "ru_maxrss"
        if self.requested == "auto":
            return "hwm" if kernel_tracks_peaks() else "sampled"
        return self.requested

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            rss = status_bytes("VmRSS")
            if rss is not None and rss > self.peak_bytes:
                self.peak_bytes = rss
