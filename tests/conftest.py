"""Shared pytest fixtures.

Importing transformers + peft costs ~10 s and generating the synthetic U-FIRE a few more,
so both are built once per test session and shared by every test file.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The real U-FIRE annotations sit beside the repository (a clean clone has ../shared next to it).
SHARED_UFIRE = REPO.parent / "shared" / "ufire"

# Tests import the flat modules directly (data, model, ...), as a reader of the repo would.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
# plumbing sets OMP_WAIT_POLICY=PASSIVE before torch loads (idle OpenMP threads busy-spin otherwise,
# which crawls on 2 cores shared with a notebook kernel or a torchrun child); import it first.
import plumbing  # noqa: E402,F401
# Nothing in the test suite may touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def shared_ufire() -> Path:
    """Path of the real U-FIRE annotations; skip (loudly) if the checkout has none beside it."""
    if not SHARED_UFIRE.is_dir():
        pytest.skip(f"real U-FIRE annotations not found at {SHARED_UFIRE}")
    return SHARED_UFIRE


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A synthetic U-FIRE at the default scale and seed, generated once per session."""
    import synthetic

    out = tmp_path_factory.mktemp("ufire") / "synthetic"
    return Path(synthetic.ensure_synthetic(str(out), seed=0, scale=1.0))


@pytest.fixture(scope="session")
def tiny_embedder():
    """The default offline tiny embedder (random weights from seed 0), shared by all tests.

    Tests that change its mode (train/eval) or weights must restore them or build their own.
    """
    from model import EmbedderConfig, FashionLensEmbedder

    emb = FashionLensEmbedder(EmbedderConfig())
    emb.eval()
    return emb
