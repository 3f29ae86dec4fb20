"""plumbing.py: the one atomic writer, the one seed mixer, the one digest, pickle-free run state."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from support import plumbing

REPO = Path(__file__).resolve().parents[1]


# ---- atomic_write ------------------------------------------------------------------------------

def test_atomic_write_file_text_and_bytes(tmp_path):
    p = tmp_path / "sub" / "a.json"
    plumbing.atomic_write(p, '{"x": 1}')
    assert json.loads(p.read_text()) == {"x": 1}
    plumbing.atomic_write(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    assert sorted(x.name for x in p.parent.iterdir()) == ["a.json"]  # no temporary left beside it


def test_atomic_write_folder_replaces_whole_and_keeps_old_on_failure(tmp_path):
    ck = tmp_path / "best"

    def build(files):
        def _build(tmp: Path):
            tmp.mkdir()
            for name, text in files.items():
                (tmp / name).write_text(text)
        return _build

    plumbing.atomic_write(ck, build({"w": "1", "stale": "x"}))
    plumbing.atomic_write(ck, build({"w": "2"}))
    assert sorted(x.name for x in ck.iterdir()) == ["w"]  # the new folder replaced the old one whole
    assert (ck / "w").read_text() == "2"

    def broken(tmp: Path):
        tmp.mkdir()
        (tmp / "w").write_text("half")
        raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError):
        plumbing.atomic_write(ck, broken)
    assert (ck / "w").read_text() == "2"  # the complete old version is untouched
    assert sorted(x.name for x in tmp_path.iterdir()) == ["best"]  # and the half-built one is gone


def test_atomic_write_clears_remains_of_an_interrupted_write(tmp_path):
    ck = tmp_path / "last"
    (tmp_path / ".last.tmp").mkdir()  # a write killed while building
    (tmp_path / ".last.tmp" / "junk").write_text("x")
    (tmp_path / ".last.old").mkdir()  # a write killed between its two renames
    plumbing.atomic_write(ck, lambda tmp: (tmp.mkdir(), (tmp / "w").write_text("new")))
    assert (ck / "w").read_text() == "new"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["last"]


def test_trim_jsonl_keeps_lines_up_to_a_step(tmp_path):
    log = tmp_path / "log.jsonl"
    for s in (1, 2, 3, 4):
        plumbing.append_jsonl(log, {"step": s, "loss": s / 10})
    plumbing.trim_jsonl(log, 2)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2]


# ---- mix_seed and params_digest ----------------------------------------------------------------

def test_mix_seed_is_stable_across_processes_and_in_range():
    code = "from support import plumbing; print(plumbing.mix_seed(0, 17, 'cir/SynCIR-Top', 3))"
    outs = {subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": h}).stdout.strip() for h in ("1", "2")}
    assert len(outs) == 1  # Python's own hash() is salted per process; this must not be
    assert int(outs.pop()) == plumbing.mix_seed(0, 17, "cir/SynCIR-Top", 3)
    seeds = [plumbing.mix_seed(0, step, rank) for step in range(200) for rank in range(4)]
    assert len(set(seeds)) == len(seeds)  # neighbouring steps and ranks get different seeds
    assert all(0 <= s < 2 ** 63 for s in seeds)  # what torch.manual_seed accepts
    torch.manual_seed(max(seeds))


def test_params_digest_sees_trainable_weights_only():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    m[1].weight.requires_grad_(False)
    d0 = plumbing.params_digest(m)
    with torch.no_grad():
        m[1].weight.add_(1.0)  # frozen: not part of the digest
    assert plumbing.params_digest(m) == d0
    with torch.no_grad():
        m[0].bias[0] += 1e-6  # trainable: the smallest change shows
    assert plumbing.params_digest(m) != d0
    assert plumbing.params_digest(m, prefix="config A") != plumbing.params_digest(m, prefix="config B")


# ---- run state ---------------------------------------------------------------------------------

def test_state_round_trip_without_pickle(tmp_path):
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    random.seed(5)
    np.random.seed(6)
    state = {"step": 7, "optimizer": opt.state_dict(), "rng": plumbing.rng_snapshot(), "pair": (1, "a"),
             "nested": {"t": torch.arange(4), "none": None}}
    plumbing.write_state(tmp_path, state)
    # Exactly two files, plain JSON and safetensors: readable without unpickling anything.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([plumbing.STATE_JSON, plumbing.STATE_TENSORS])
    json.loads((tmp_path / plumbing.STATE_JSON).read_text())
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / plumbing.STATE_TENSORS))
    assert not any(_opens_like_pickle(p.read_bytes()) for p in tmp_path.iterdir())
    back = plumbing.read_state(tmp_path)
    assert back["step"] == 7 and back["pair"] == (1, "a") and back["nested"]["none"] is None
    assert torch.equal(back["nested"]["t"], torch.arange(4))
    assert set(back["optimizer"]["state"]) == {0}  # integer keys stay integers
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    expected = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    plumbing.rng_restore(back["rng"])  # the generators continue exactly where the snapshot was taken
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


def _opens_like_pickle(blob: bytes) -> bool:
    """Pickle protocol >= 2 opens with PROTO (0x80); torch.save writes a zip (PK\\3\\4) holding data.pkl."""
    return blob[:1] == b"\x80" or blob[:4] == b"PK\x03\x04" or b"data.pkl" in blob


def test_state_refuses_what_json_cannot_hold_and_the_check_sees_torch_save(tmp_path):
    """No silent fallback to pickle: an object JSON cannot hold is refused, naming where it sits;
    and the pickle check above does fail on what torch.save writes (both of its formats)."""
    with pytest.raises(TypeError, match=r"set at s\.sampler\.seen"):
        plumbing.write_state(tmp_path, {"step": 1, "sampler": {"seen": {1, 2}}})
    state = {"w": torch.randn(3), "step": 7}
    torch.save(state, tmp_path / "zip.pt")
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("zip.pt", "legacy.pt"):
        assert _opens_like_pickle((tmp_path / name).read_bytes()), name


def test_read_state_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_state.json"):
        plumbing.read_state(tmp_path)
