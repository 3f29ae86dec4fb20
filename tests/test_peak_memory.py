"""support/peak_memory.py: the CPU step-memory probe of the benchmarks (speed.py, paper_scale.py).

Each way of seeing the peak on a block of known size (64 MiB of non-zero bytes, so every page is
resident), "auto"'s choice, and the sampler thread's end. No test asserts one machine's numbers: only
that a 64 MiB block is seen as at least 56 MiB (other threads may free memory meanwhile; the bound
leaves them 8 MiB).
"""
from __future__ import annotations

import threading
import time

import pytest

from support import peak_memory
from support.peak_memory import CpuPeak

BLOCK = 64 * peak_memory.MiB
SEEN = 56 * peak_memory.MiB

needs_proc = pytest.mark.skipif(peak_memory.status_bytes("VmRSS") is None, reason="no /proc/self/status here")


def _parts() -> str:
    """Where the resident set is, for a failure's message: a block that raises RssAnon but not VmRSS means
    the kernel took back file pages (mapped libraries) meanwhile; one that raises neither, reused memory."""
    return ", ".join(f"{f} {(peak_memory.status_bytes(f) or 0) / peak_memory.MiB:.0f} MiB" for f in ("RssAnon", "RssFile"))


def _sampler_alive() -> bool:
    return any(t.name == peak_memory.SAMPLER_NAME and t.is_alive() for t in threading.enumerate())


@needs_proc
def test_sampled_sees_a_block_held_inside_it():
    before = _parts()
    with CpuPeak(method="sampled") as p:
        block = b"\x01" * BLOCK  # written byte by byte: resident
        time.sleep(0.2)  # held long enough for many samples
        held = _parts()
        del block  # freed before the exit's own sample: only the thread can have seen it
    assert p.method == "sampled" and "sampled" in p.kind and "lower bound" in p.kind
    assert p.step_bytes >= SEEN, f"step {p.step_bytes / peak_memory.MiB:.1f} MiB; before: {before}; held: {held}"
    assert p.peak_bytes == p.baseline_bytes + p.step_bytes


@needs_proc
def test_hwm_sees_a_transient_block():
    if not peak_memory.kernel_tracks_peaks():
        pytest.skip("VmHWM misses a block allocated and freed before it is read on this kernel "
                    "(the CI finding of 2026-12-08, support/peak_memory.py); the sampled path covers it")
    before = _parts()
    with CpuPeak(method="hwm") as p:
        block = b"\x01" * BLOCK
        held = _parts()
        del block  # gone before VmHWM is read
    assert p.method == "hwm" and p.kind == "resident-set peak: VmHWM since a clear_refs reset"
    assert p.step_bytes >= SEEN, f"step {p.step_bytes / peak_memory.MiB:.1f} MiB; before: {before}; held: {held}"


@needs_proc
def test_auto_uses_hwm_exactly_where_the_kernel_tracks_peaks(monkeypatch):
    tracks = peak_memory.kernel_tracks_peaks()
    with CpuPeak() as p:
        pass
    assert p.method == ("hwm" if tracks else "sampled")
    assert ("VmHWM since" in p.kind) == tracks and ("sampled" in p.kind) == (not tracks)
    monkeypatch.setattr(peak_memory, "kernel_tracks_peaks", lambda: False)  # the CI kernel
    with CpuPeak() as p:
        assert _sampler_alive()
    assert p.method == "sampled" and "misses transient peaks" in p.kind
    if peak_memory.reset_hwm():  # a kernel that tracks them (needs a writable clear_refs)
        monkeypatch.setattr(peak_memory, "kernel_tracks_peaks", lambda: True)
        with CpuPeak() as p:
            assert not _sampler_alive()
        assert p.method == "hwm" and "VmHWM since" in p.kind


def test_without_proc_it_falls_back_to_ru_maxrss(monkeypatch):
    monkeypatch.setattr(peak_memory, "status_bytes", lambda field: None)
    with CpuPeak() as p:
        pass
    assert p.method == "ru_maxrss" and "lifetime peak" in p.kind
    assert p.baseline_bytes is None and p.peak_bytes > 0 and p.step_bytes >= 0
    with pytest.raises(RuntimeError, match="no /proc"):  # a forced method it cannot honour is an error
        with CpuPeak(method="sampled"):
            pass
    with pytest.raises(ValueError, match="one of auto, hwm, sampled"):
        CpuPeak(method="vmhwm")


@needs_proc
def test_the_sampler_thread_ends_with_the_block_even_when_it_raises():
    with CpuPeak(method="sampled") as p:
        assert _sampler_alive()
    assert not _sampler_alive() and p.step_bytes is not None
    with pytest.raises(KeyError):  # the block's exception goes on, not swallowed
        with CpuPeak(method="sampled") as p:
            assert _sampler_alive()
            raise KeyError("step failed")
    assert not _sampler_alive()
    assert p.step_bytes is not None  # the figures are still filled in
