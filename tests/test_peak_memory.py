"""support/peak_memory.py: the CPU step-memory probe of the benchmarks (speed.py, paper_scale.py).

Each method on a block of known size (64 MiB of non-zero bytes, so every page is resident), the
sampler's exit sample and end, and the fallbacks. No test asserts one machine's numbers: only that a
64 MiB block is seen as at least 56 MiB (the bound leaves 8 MiB for memory freed meanwhile). The
default method reads RssAnon, which the kernel's reclaim of file pages does not lower, so these bounds
hold under memory pressure too; the "hwm" test adds the RssFile the kernel took back during the block.
"""
from __future__ import annotations

import threading
import time

import pytest

from support import peak_memory
from support.peak_memory import CpuPeak

MiB = peak_memory.MiB
BLOCK = 64 * MiB
SEEN = 56 * MiB

needs_proc = pytest.mark.skipif(peak_memory.status_bytes("VmRSS") is None, reason="no /proc/self/status here")
needs_anon = pytest.mark.skipif(peak_memory.status_bytes("RssAnon") is None, reason="no RssAnon (Linux < 4.5)")


def _parts() -> str:
    """Where the resident set is, for a failure's message: RssAnon that did not rise by the block means
    reused memory (or swap); VmRSS that did not while RssAnon did, file pages taken back meanwhile."""
    return ", ".join(f"{f} {(peak_memory.status_bytes(f) or 0) / MiB:.0f} MiB" for f in ("VmRSS", "RssAnon", "RssFile"))


def _sampler_alive() -> bool:
    return any(t.name == peak_memory.SAMPLER_NAME and t.is_alive() for t in threading.enumerate())


def _why(p: CpuPeak, before: str, held: str) -> str:
    return f"{p.method}: step {p.step_bytes / MiB:.1f} MiB; before: {before}; held: {held}"


@needs_anon
def test_the_default_sees_a_block_held_inside_it():
    before = _parts()
    with CpuPeak() as p:
        block = b"\x01" * BLOCK  # written byte by byte: resident
        time.sleep(0.2)  # held for many samples
        held = _parts()
    del block
    assert p.method == "anon-sampled"
    assert p.kind == ("anonymous memory (RssAnon) sampled every 1 ms: the step's own allocations; a peak "
                      "shorter than 1 ms can be missed; file pages (mapped libraries, an mmapped checkpoint) excluded")
    assert p.step_bytes >= SEEN, _why(p, before, held)
    assert p.peak_bytes == p.baseline_bytes + p.step_bytes  # VmRSS at entry + the block's own share


@needs_anon
def test_the_sampler_sees_a_block_freed_before_the_end():
    before = _parts()
    with CpuPeak() as p:
        block = b"\x01" * BLOCK
        time.sleep(0.1)  # held 100 ms: dozens of 1 ms intervals
        held, anon_held = _parts(), peak_memory.status_bytes("RssAnon")
        del block  # freed (munmap) before the exit's own sample: only the thread can have seen it
        anon_gone = peak_memory.status_bytes("RssAnon")
        time.sleep(0.05)
    assert anon_held - anon_gone >= SEEN, f"the block was not given back, the test proves nothing: held: {held}"
    assert p.step_bytes >= SEEN, _why(p, before, held)


@needs_anon
def test_the_exit_sample_sees_a_block_still_held():
    before = _parts()
    with CpuPeak(interval=60.0) as p:  # the thread never samples: only the exit's sample can see the block
        block = b"\x01" * BLOCK
        held = _parts()
    del block
    assert p.step_bytes >= SEEN, _why(p, before, held)


@needs_anon
def test_the_sampler_thread_ends_with_the_block_even_when_it_raises():
    with CpuPeak() as p:
        assert _sampler_alive()
    assert not _sampler_alive() and p.step_bytes is not None
    with pytest.raises(KeyError):  # the block's exception goes on, not swallowed
        with CpuPeak() as p:
            assert _sampler_alive()
            raise KeyError("step failed")
    assert not _sampler_alive()
    assert p.step_bytes is not None and p.peak_bytes is not None  # the figures are still filled in


@needs_proc
def test_without_rss_anon_it_samples_vmrss(monkeypatch):
    real = peak_memory.status_bytes
    monkeypatch.setattr(peak_memory, "status_bytes", lambda field: None if field == "RssAnon" else real(field))
    with CpuPeak() as p:
        assert _sampler_alive()
    assert not _sampler_alive()
    assert p.method == "rss-sampled" and p.kind.startswith("resident set (VmRSS; no RssAnon")
    assert p.step_bytes >= 0 and p.peak_bytes == p.baseline_bytes + p.step_bytes
    with pytest.raises(RuntimeError, match="no RssAnon"):  # a forced method it cannot honour is an error
        with CpuPeak(method="anon-sampled"):
            pass


def test_without_proc_it_falls_back_to_ru_maxrss(monkeypatch):
    monkeypatch.setattr(peak_memory, "status_bytes", lambda field: None)
    with CpuPeak() as p:
        assert not _sampler_alive()
    assert p.method == "ru_maxrss" and "lifetime peak" in p.kind
    assert p.baseline_bytes is None and p.peak_bytes > 0 and p.step_bytes >= 0
    for forced in ("anon-sampled", "rss-sampled", "hwm"):
        with pytest.raises(RuntimeError, match="no /proc"):
            with CpuPeak(method=forced):
                pass
    with pytest.raises(ValueError, match="one of auto, anon-sampled, rss-sampled, hwm"):
        CpuPeak(method="sampled")


@needs_proc
def test_hwm_sees_a_transient_block_with_the_file_pages_reclaimed_meanwhile():
    """VmHWM counts file pages too: what the kernel took back of them while the block was held lowers the
    resident set it records, so the bound is on the HWM's rise plus that drop, read just before the free."""
    if not peak_memory.reset_hwm():
        pytest.skip("/proc/self/clear_refs is not writable here")
    before = _parts()
    with CpuPeak(method="hwm") as p:
        file_start = peak_memory.status_bytes("RssFile") or 0
        block = b"\x01" * BLOCK
        held = _parts()
        file_held = peak_memory.status_bytes("RssFile") or 0
        del block  # gone (munmap, which records the high-water mark) before VmHWM is read
    reclaimed = max(0, file_start - file_held)
    assert p.method == "hwm" and "counts file pages" in p.kind and "reclaim" in p.kind
    assert p.step_bytes + reclaimed >= SEEN, f"{_why(p, before, held)}; RssFile reclaimed {reclaimed / MiB:.1f} MiB"
    assert p.peak_bytes == p.baseline_bytes + p.step_bytes
