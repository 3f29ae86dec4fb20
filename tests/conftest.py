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
from support import plumbing  # noqa: E402,F401
BENCH = REPO / "benchmarks"


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (benchmarks/ is a folder of scripts, not a package)."""
    import importlib.util

    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # the scripts import each other (controlled.py -> ablation.py)
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there (paper_scale's configs)
    spec.loader.exec_module(mod)
    return mod


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
    from support import synthetic

    out = tmp_path_factory.mktemp("ufire") / "synthetic"
    return Path(synthetic.ensure_synthetic(str(out), seed=0, scale=1.0))


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """A synthetic U-FIRE at scale 0.03 (seed 0, 8 test queries per sub-dataset), made once per session
    for the reliability tests. Never modified: a test that damages data works on a copy."""
    from support import synthetic

    return Path(synthetic.ensure_synthetic(str(tmp_path_factory.mktemp("ufire_tiny") / "syn"), seed=0, scale=0.03))


@pytest.fixture(scope="session")
def untrained_ckpt(tmp_path_factory) -> Path:
    """The untrained default tiny embedder saved as a checkpoint folder, once per session. Never
    modified: a test that damages a checkpoint works on a copy."""
    from model import EmbedderConfig, FashionLensEmbedder

    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    FashionLensEmbedder(EmbedderConfig()).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def small_synthetic_root(tmp_path_factory) -> Path:
    """A synthetic U-FIRE at scale 0.1 (seed 0): every task, galleries of 55+ images, ~3 s to make.
    For tests that run whole train/evaluate subprocesses and only need a few records per task."""
    from support import synthetic

    out = tmp_path_factory.mktemp("ufire_small") / "synthetic"
    return Path(synthetic.ensure_synthetic(str(out), seed=0, scale=0.1))


@pytest.fixture(scope="session")
def hub_backbone(tmp_path_factory):
    """hub_backbone(arch) -> the folder of a small random Qwen-VL ("qwen3_vl" | "qwen2_5_vl" |
    "qwen2_vl") in the hub's own layout (hub_layout.write_checkpoint, seed 0), written once per session."""
    from support import hub_layout

    made: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in made:
            folder = tmp_path_factory.mktemp(f"hub_{arch}") / arch
            made[arch] = hub_layout.write_checkpoint(folder, hub_layout.qwen_config(arch))
        return made[arch]

    return make


@pytest.fixture(scope="session")
def tiny_embedder():
    """The default offline tiny embedder (random weights from seed 0), shared by all tests.

    Tests that change its mode (train/eval) or weights must restore them or build their own.
    """
    from model import EmbedderConfig, FashionLensEmbedder

    emb = FashionLensEmbedder(EmbedderConfig())
    emb.eval()
    return emb
