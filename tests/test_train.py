"""Tests of train.py: the recipes, the loss, GradCache == full batch, and real (tiny) training runs.

The run tests share one small synthetic U-FIRE (scale 0.1, generated once into tmp) and one set of
short runs (module fixture `runs`), each a subprocess exactly as a user would type it:

    B   --steps 8 --eval-every 4                      (uninterrupted)
    A1  --steps 8 --eval-every 4 --stop-at 4          (interrupted after step 4; in this process)
    A2  --resume A, info_nce patched to NaN at step 6  (forced non-finite loss; in this process)
    A3  --resume A                                     (continues to step 8; in this process)
    D   torchrun --nproc_per_node 2 (gloo), 2 steps    (DDP on CPU)

Each test then checks one property of those runs. All of it takes ~1 minute on 2 cores; the slow test
(`python -m pytest -m slow`) adds an exact resume under torchrun (three 2-process runs).
Test-only code lives here, not in train.py: the NaN stop is provoked by monkeypatching
train.info_nce. GradCache is held equal to train.full_batch_step with its forward split into the
same chunks (the reference path, every graph kept).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support import plumbing  # noqa: I001  before torch: it sets OMP_WAIT_POLICY (inherited by our subprocesses)
import torch

from support import cli, config_fields, recipes, run_dir

REPO = Path(__file__).resolve().parents[1]
# Small runs: two tasks (5 sub-datasets), batch 8 in chunks of 4, 4 validation queries each.
COMMON = ["--tasks", "t2i,cir", "--batch-size", "8", "--chunk-size", "4", "--max-eval-queries", "4",
          "--ggas-warmup", "2", "--no-final-test"]


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)  # never inherit a launcher's rank
    return env


def _run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          env=_env(), timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-3000:]}"
    return proc


def _log(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.strip()]


def _steps(run: Path) -> list[dict]:
    return [r for r in _log(run) if r.get("event") is None]


def _weights(ckpt: Path) -> dict:
    """Every tensor of a checkpoint that training changes (embedder extras + LoRA adapter)."""
    from safetensors.torch import load_file

    out = {f"extra.{k}": v for k, v in load_file(str(ckpt / "embedder.safetensors")).items()}
    out.update({f"lora.{k}": v for k, v in load_file(str(ckpt / "adapter" / "adapter_model.safetensors")).items()})
    return out


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> str:
    from support import synthetic

    return synthetic.ensure_synthetic(str(tmp_path_factory.mktemp("ufire_small") / "synthetic"), seed=0, scale=0.1)


# ------------------------------------------------------------------------------------------------
# The loss and the step (in-process, no subprocess)
# ------------------------------------------------------------------------------------------------

def test_info_nce_multi_positive_matches_hand_computation():
    import train

    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)  # (B=4, D=3)
    t = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)  # (4, 3)
    ids = torch.tensor([5, 7, 5, 9])  # targets 0 and 2 are the same image
    tau = 0.1
    got = train.info_nce(q, t, ids, tau)
    s = (q @ t.T) / tau
    by_hand = []
    for i in range(4):
        pos = [j for j in range(4) if ids[j] == ids[i]]
        by_hand.append(-math.log(sum(math.exp(s[i, j]) for j in pos) / sum(math.exp(s[i, j]) for j in range(4))))
    assert abs(float(got) - sum(by_hand) / 4) < 1e-5
    # With all-distinct targets it is plain cross-entropy on the diagonal.
    plain = train.info_nce(q, t, torch.arange(4), tau)
    assert abs(float(plain) - float(torch.nn.functional.cross_entropy(s, torch.arange(4)))) < 1e-5
    # And the duplicate really changes the loss (it is not treated as a negative).
    assert abs(float(got) - float(plain)) > 1e-4


def test_train_state_roundtrip_without_pickle(tmp_path):
    import random

    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.randn(3, 2)
    opt.step()
    rnd = random.Random(3)
    state = {"optimizer": opt.state_dict(), "py": rnd.getstate(), "torch": torch.get_rng_state(), "step": 7}
    plumbing.write_state(tmp_path, state)
    back = plumbing.read_state(tmp_path)
    opt2 = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())], lr=1e-3)
    opt2.load_state_dict(back["optimizer"])  # int keys and tuples survived the JSON round trip
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    rnd2 = random.Random()
    rnd2.setstate(back["py"])
    assert [rnd2.random() for _ in range(3)] == [rnd.random() for _ in range(3)]
    assert torch.equal(back["torch"], state["torch"]) and back["step"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([plumbing.STATE_JSON, plumbing.STATE_TENSORS])
    _assert_pickle_free(tmp_path)


def _assert_pickle_free(folder: Path) -> None:
    """Every file under folder is JSON, safetensors or plain text, and none opens like a pickle or a
    zip archive (torch.save's format). Loading such a checkpoint can never run code."""
    from safetensors.torch import load_file

    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files
    for p in files:
        blob = p.read_bytes()
        assert not _opens_like_pickle(blob), p
        if p.suffix == ".safetensors":
            load_file(str(p))  # raises on anything but safetensors
        elif p.suffix == ".json":
            json.loads(blob)
        else:  # README.md, the chat template: text
            blob.decode("utf-8")


def _opens_like_pickle(blob: bytes) -> bool:
    """A pickle of protocol >= 2 starts with its PROTO opcode 0x80; torch.save writes a zip (PK\\3\\4)
    holding data.pkl, or (legacy) a raw pickle."""
    return blob[:1] == b"\x80" or blob[:4] == b"PK\x03\x04" or b"data.pkl" in blob


def test_pickle_detector_flags_torch_save_files(tmp_path):
    """The check above can fail: both torch.save formats are caught, and neither is JSON."""
    state = {"w": torch.randn(3), "step": 7}
    torch.save(state, tmp_path / "zip.pt")
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("zip.pt", "legacy.pt"):
        blob = (tmp_path / name).read_bytes()
        assert _opens_like_pickle(blob), name
        with pytest.raises(ValueError):
            json.loads(blob)
    with pytest.raises(AssertionError):
        _assert_pickle_free(tmp_path)


@pytest.mark.parametrize("positives,reg_per_chunk", [("multi", False), ("single", True)])
def test_gradcache_equals_full_batch_with_dropout(small_root, positives, reg_per_chunk):
    """Same loss and same gradient on every trainable parameter (fp32, <= 1e-5 relative), for our
    settings and the authors' (one positive per query, the regulariser once per chunk)."""
    import data
    import train
    from model import EmbedderConfig, FashionLensEmbedder

    emb = FashionLensEmbedder(EmbedderConfig(lora_dropout=0.3, seed=1))  # own model: we perturb it
    assert emb.config.lora_dropout == 0.3  # an explicit value is kept (the tiny default is 0)
    with torch.no_grad():  # LoRA B starts at 0, which would hide the dropout: give it weights
        g = torch.Generator().manual_seed(0)
        for name, prm in emb.named_parameters():
            if "lora_B" in name:
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.05)
    emb.train()
    view = data.UFire(small_root).train_view(["cir/SynCIR-Top"], **emb.query_options())
    idx = [0, 1, 2, 3, 4, 0, 5, 1]  # records 0 and 1 twice: duplicate targets -> multi-positive
    batch = train.make_batch(view, "cir/SynCIR-Top", idx, seed=0, step=0)
    assert len(set(batch.keys)) < len(batch.keys)
    params = {n: p for n, p in emb.named_parameters() if p.requires_grad}

    def grads_of(step_fn, seed, chunk):
        emb.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        out = step_fn(emb, batch, 0.07, chunk_size=chunk, positives=positives, reg_per_chunk=reg_per_chunk)
        return out, {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}

    ref, g_ref = grads_of(train.full_batch_step, 11, 3)  # reference: forward in chunks, every graph kept
    gc, g_gc = grads_of(train.gradcache_step, 11, 3)  # GradCache, uneven chunks 3+3+2
    assert abs(ref.loss - gc.loss) <= 1e-5 * abs(ref.loss)
    assert set(g_ref) == set(g_gc) and len(g_ref) >= len(params) - 2
    for n in g_ref:
        err = float((g_ref[n] - g_gc[n]).norm())
        assert err <= 1e-5 * float(g_ref[n].norm()) + 1e-9, f"{n}: |diff| {err:.3e} vs |g| {float(g_ref[n].norm()):.3e}"
    # Dropout is really on: another seed gives other masks, hence another loss.
    other, _ = grads_of(train.full_batch_step, 12, 3)
    assert abs(other.loss - ref.loss) > 1e-5


def test_gradcache_equals_single_forward_without_dropout(tiny_embedder, small_root):
    """Dropout off: chunking does not matter at all (GradCache chunks of 3 vs one forward of 8)."""
    import data
    import train

    emb = tiny_embedder
    view = data.UFire(small_root).train_view(["t2i/SynGen"], **emb.query_options())
    batch = train.make_batch(view, "t2i/SynGen", list(range(8)), seed=0, step=3)
    params = {n: p for n, p in emb.named_parameters() if p.requires_grad}
    emb.eval()  # eval mode = no dropout; gradients still flow
    try:
        emb.zero_grad(set_to_none=True)
        ref = train.full_batch_step(emb, batch, 0.07)
        g_ref = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
        emb.zero_grad(set_to_none=True)
        gc = train.gradcache_step(emb, batch, 0.07, chunk_size=3)
        g_gc = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    finally:
        emb.zero_grad(set_to_none=True)
    assert abs(ref.loss - gc.loss) <= 1e-5 * abs(ref.loss)
    for n in g_ref:
        assert float((g_ref[n] - g_gc[n]).norm()) <= 1e-4 * float(g_ref[n].norm()) + 1e-9, n


# ------------------------------------------------------------------------------------------------
# The recipes (no model is built)
# ------------------------------------------------------------------------------------------------

REAL = "Qwen/Qwen3-VL-4B-Instruct"


@pytest.fixture
def no_model(monkeypatch):
    """Resolving a config must not build (or download) anything: building is made to fail."""
    import train

    def refuse(*a, **k):
        raise AssertionError("a model was built while resolving a config")

    monkeypatch.setattr(train, "FashionLensEmbedder", refuse)
    monkeypatch.setattr(train, "EmbedderConfig", refuse)


def _recipe(name: str) -> dict:
    """A recipe's values as pinned against their sources (tests/pins.py), not read from the table itself."""
    import pins

    return {"paper": {**pins.PAPER_EMBEDDER, **pins.PAPER_TRAIN},
            "tiny-cpu": {**pins.TINY_EMBEDDER, **pins.TINY_TRAIN}}[name]


def test_every_recipe_value_is_a_train_config_field_defaulting_to_the_recipe():
    import train

    defaults = {f.name: f.default for f in dataclasses.fields(train.TrainConfig)}
    for name in ("paper", "tiny-cpu"):
        for key in _recipe(name):
            assert key in defaults and defaults[key] is None, (name, key)  # None = "the recipe's value"
    assert set(recipes.EMBEDDER_FIELDS) == {"min_pixels", "max_pixels", "max_query_images", "query_sketches",
                                          "num_frames", "video_size", "lora_dropout", "summary_init"}


@pytest.mark.parametrize("backbone,recipe", [("tiny", "tiny-cpu"), ("tiny-qwen2-vl", "tiny-cpu"),
                                             (REAL, "paper"), ("/models/my-qwen2.5-vl", "paper")])
def test_auto_recipe_follows_the_backbone(backbone, recipe, no_model):
    import train

    cfg = train.TrainConfig(backbone=backbone).resolved()
    assert cfg.recipe == recipe
    want = _recipe(recipe)
    length = (want.pop("steps", 0), want.pop("epochs", 0.0))
    assert {k: getattr(cfg, k) for k in want} == want
    assert (cfg.steps, cfg.epochs) == length == ((0, 5.0) if recipe == "paper" else (1400, 0.0))
    assert cfg.resolved() == cfg  # resolving twice changes nothing
    # The paper values by name (the authors', train.py 29-48, 330-337 and my_grad_cache.py):
    if recipe == "paper":
        assert (cfg.lr, cfg.weight_decay, cfg.lr_schedule, cfg.grad_clip, cfg.batch_size, cfg.chunk_size,
                cfg.eval_every, cfg.positives, cfg.reg_per_chunk) == (1e-4, 1e-3, "constant", 0.0, 64, -1, 500,
                                                                       "single", True)
        assert (cfg.min_pixels, cfg.max_pixels, cfg.num_frames, cfg.lora_dropout) == (224 * 224, 256 * 256, 8, 0.05)
        assert (cfg.ggas_refresh, cfg.ggas_ema_start, cfg.ggas_floor) == ("epoch", "zero", "renorm")


def test_flags_override_the_recipe_and_steps_clear_its_epochs(no_model, tmp_path):
    import train

    def parsed(*argv):
        cfg, resume = cli.parse_train_config(train.TrainConfig, [*argv, "--out", str(tmp_path / "r")])
        assert resume is None
        return cfg.resolved()

    cfg = parsed("--backbone", REAL, "--lr", "3e-4", "--positives", "multi", "--no-reg-per-chunk",
                 "--chunk-size", "16", "--grad-clip", "2", "--max-pixels", "100000")
    assert (cfg.recipe, cfg.lr, cfg.positives, cfg.reg_per_chunk, cfg.chunk_size, cfg.grad_clip,
            cfg.max_pixels) == ("paper", 3e-4, "multi", False, 16, 2.0, 100000)
    assert (cfg.weight_decay, cfg.min_pixels, cfg.ggas_floor) == (1e-3, 224 * 224, "renorm")  # the rest: paper
    assert (cfg.steps, cfg.epochs) == (0, 5.0)  # neither given: the recipe's 5 epochs
    assert (parsed("--backbone", REAL, "--steps", "50").steps, parsed("--backbone", REAL, "--steps", "50").epochs) \
        == (50, 0.0)  # --steps alone: exactly 50 steps, not 5 epochs
    assert (parsed("--epochs", "2").steps, parsed("--epochs", "2").epochs) == (0, 2.0)  # tiny: epochs alone
    assert (parsed("--steps", "7", "--epochs", "2").steps, parsed("--steps", "7", "--epochs", "2").epochs) == (7, 2.0)
    # A named recipe on any backbone: the paper's values on the tiny model, tiny-cpu's on a real one.
    assert parsed("--recipe", "paper").lr == 1e-4 and parsed("--recipe", "paper").backbone == "tiny"
    assert parsed("--backbone", REAL, "--recipe", "tiny-cpu").positives == "multi"
    # The embedder receives the resolved input values and the recipe's name.
    assert parsed("--backbone", REAL, "--num-frames", "6").embedder_fields() == {
        "recipe": "paper", "min_pixels": 224 * 224, "max_pixels": 256 * 256, "max_query_images": 8,
        "query_sketches": "all", "num_frames": 6, "video_size": 224, "lora_dropout": 0.05, "summary_init": "im_end"}
    with pytest.raises(SystemExit, match=r"^error: --recipe 'cpu': must be auto, paper or tiny-cpu$"):
        train.TrainConfig(recipe="cpu").resolved()


def test_chunk_size_minus_one_follows_the_authors_table():
    import pins
    from support import recipes
    import train

    cfg = train.TrainConfig(backbone=REAL).resolved()
    assert cfg.chunk_size == -1
    want = {"video2img/MovingFashion": 2, "asfr/DARN": 4, "t2i/FashionGen": 8, "t2i/Shoes": 32,
            "sketch2i/QMUL-Shoe-V2": 16, "cir/FashionIQ-Dress": 32, "t2i/SynGen": 8}  # not in the table: 8
    assert {k: recipes.step_chunk_size(cfg, k) for k in want} == want
    # All 18 of the authors' sizes (train.py 29-48) as literals, not the table compared with itself.
    assert {k: recipes.step_chunk_size(cfg, k) for k in pins.CHUNK_SIZES} == pins.CHUNK_SIZES
    fixed = train.TrainConfig(backbone=REAL, chunk_size=16).resolved()
    assert {recipes.step_chunk_size(fixed, k) for k in want} == {16}
    # A batch per rank smaller than the table's chunk is one chunk (no GradCache re-run).
    assert train.fits_one_chunk(32, 16) and train.fits_one_chunk(0, 64) and not train.fits_one_chunk(8, 64)


# ------------------------------------------------------------------------------------------------
# Real runs (subprocesses)
# ------------------------------------------------------------------------------------------------

def _train_in_process(args: list[str]) -> tuple[int, str, str]:
    """train.main(args) in this process (saves ~10 s of imports per run); returns (rc, out, err)."""
    import contextlib
    import io

    import train

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = train.main(args)
        except SystemExit as stop:  # a refused flag: "error: ..." as the exit message, status 1
            rc = stop.code if isinstance(stop.code, int) else 1
            if not isinstance(stop.code, int):
                print(stop.code, file=sys.stderr)
    return rc, out.getvalue(), err.getvalue()


def _nan_on_call(info_nce, k: int):
    """info_nce, except that its k-th call (one per step) returns NaN: a diverged step."""
    calls = [0]

    def poisoned(*args, **kwargs):
        calls[0] += 1
        loss = info_nce(*args, **kwargs)
        return loss + float("nan") if calls[0] == k else loss

    return poisoned


@pytest.fixture(scope="module")
def runs(small_root, tmp_path_factory) -> dict:
    import train

    tmp = tmp_path_factory.mktemp("runs")
    data_args = ["--data", small_root, *COMMON]
    r = {"tmp": tmp, "B": tmp / "B", "A": tmp / "A"}
    # B: the uninterrupted run, as a user types it (subprocess).
    r["B_proc"] = _ok(_run(["train.py", *data_args, "--steps", "8", "--eval-every", "4", "--out", str(r["B"])]))
    # A: the same run in three sittings, in this process (resume reads everything back from disk).
    r["A1"] = _train_in_process([*data_args, "--steps", "8", "--eval-every", "4", "--stop-at", "4",
                                 "--out", str(r["A"])])
    assert r["A1"][0] == 0, r["A1"][2][-3000:]
    with pytest.MonkeyPatch.context() as mp:  # A resumes after step 4: its 2nd loss is step 6's
        mp.setattr(train, "info_nce", _nan_on_call(train.info_nce, 2))
        r["A2"] = _train_in_process(["--resume", str(r["A"])])
    # What the forced non-finite loss left behind, before A3 writes over it.
    r["A_after_nan"] = tmp / "A_after_nan"
    if (r["A"] / "last").is_dir():
        shutil.copytree(r["A"] / "last", r["A_after_nan"])
    r["A3"] = _train_in_process(["--resume", str(r["A"])])
    assert r["A3"][0] == 0, r["A3"][2][-3000:]
    return r


def test_config_json_holds_the_resolved_recipe(runs):
    """config.json and every checkpoint's train config hold numbers (no None) and the recipe's name;
    a resume reads them back as they are."""
    import train

    b = runs["B"]
    saved = json.loads((b / "config.json").read_text())
    assert saved["recipe"] == "tiny-cpu" and None not in saved.values()
    assert (saved["steps"], saved["epochs"], saved["chunk_size"], saved["lr_schedule"]) == (8, 0.0, 4, "cosine")
    assert saved["resolved"]["chunk_sizes"] == {k: 4 for k in saved["resolved"]["train_subsets"]}
    ckpt = json.loads((b / "last" / run_dir.CONFIG_JSON).read_text())
    assert ckpt == {k: v for k, v in saved.items() if k != "resolved"}
    emb = json.loads((b / "last" / "embedder_config.json").read_text())["config"]
    assert {k: emb[k] for k in ("recipe", *recipes.EMBEDDER_FIELDS)} == {
        k: saved[k] for k in ("recipe", *recipes.EMBEDDER_FIELDS)}
    cfg, _ = cli.parse_train_config(train.TrainConfig, ["--resume", str(b)])
    assert dataclasses.asdict(cfg) == {**ckpt, "out": str(b)} and cfg.resolved() == cfg


def test_short_run_writes_best_and_last_and_evaluate_loads_them(runs):
    b = runs["B"]
    for ckpt in ("best", "last"):
        assert (b / ckpt / "embedder_config.json").is_file() and (b / ckpt / "train_config.json").is_file()
    assert (b / "last" / "train_state.json").is_file() and (b / "last" / "train_state.safetensors").is_file()
    assert json.loads((b / "config.json").read_text())["resolved"]["total_steps"] == 8
    # auto threads: OMP_NUM_THREADS when the caller set it, else 1 for the tiny model on CPU
    want = int(os.environ["OMP_NUM_THREADS"]) if os.environ.get("OMP_NUM_THREADS") else 1
    assert json.loads((b / "config.json").read_text())["resolved"]["cpu_threads"] == want
    steps = _steps(b)
    assert [s["step"] for s in steps] == list(range(1, 9))
    for key in ("loss", "lr", "subset", "probabilities", "difficulties", "lam_mean", "angle_deg", "time"):
        assert all(key in s for s in steps), key
    assert all(math.isfinite(s["loss"]) for s in steps)
    assert abs(sum(steps[-1]["probabilities"].values()) - 1) < 1e-6
    vals = [r for r in _log(b) if r.get("event") == "val"]
    assert [v["step"] for v in vals] == [4, 8]
    best_step = json.loads((b / "best" / "metrics.json").read_text())["val"]["step"]
    assert best_step == max(vals, key=lambda v: v["sum_recall1"])["step"]  # best = argmax, first on ties
    # The evaluation CLI loads best/ (finding the data root in the run's saved config) ...
    p = _ok(_run(["evaluate.py", "--ckpt", str(b / "best"), "--split", "val", "--tasks", "t2i", "--k", "1,10",
                  "--ood", "skip", "--cache-dir", ""]))
    assert "t2i/SynGen" in p.stdout and "R@10" in p.stdout
    # ... and last/ loads and evaluates through the same code path, in this process.
    _load_and_evaluate(b / "last", "t2i")
    # best/ holds the weights that were scored: the same validation gives the logged numbers again.
    import data
    import evaluate
    from model import FashionLensEmbedder

    logged = json.loads((b / "best" / "metrics.json").read_text())["val"]
    uf = data.UFire(json.loads((b / "best" / "train_config.json").read_text())["data"])
    res = evaluate.evaluate(FashionLensEmbedder.from_pretrained(str(b / "best")), uf,
                            uf.select("val", "t2i,cir", "skip"), split="val", ks=(1, 10),
                            progress=False, max_queries=4)
    assert {r.subset: {str(k): v for k, v in r.recall.items()} for r in res.rows} == logged["recall"]
    assert res.sum_recall(1) == pytest.approx(logged["sum_recall1"], abs=1e-12)
    for ckpt in ("best", "last"):
        _assert_pickle_free(b / ckpt)


def _load_and_evaluate(ckpt: Path, tasks: str):
    import data
    import evaluate
    from model import FashionLensEmbedder

    emb = FashionLensEmbedder.from_pretrained(str(ckpt))
    root = json.loads((ckpt / "train_config.json").read_text())["data"]
    uf = data.UFire(root)
    res = evaluate.evaluate(emb, uf, uf.select("val", tasks, "skip"), split="val", ks=(1, 10),
                            progress=False)
    assert res.rows and all(0.0 <= r.recall[10] <= 1.0 for r in res.rows)
    return res


def test_cpu_threads_auto_is_one_for_the_tiny_model_only(monkeypatch):
    """--cpu-threads 0 (auto): 1 thread for a tiny backbone on CPU; an explicit count or
    OMP_NUM_THREADS wins; other backbones and devices keep torch's choice; negative is refused."""
    import train
    from support.tiny_backbone import TINY_TYPES

    def threads(cfg: train.TrainConfig, device: str) -> int:  # exactly as train.setup calls it
        return plumbing.set_cpu_threads(cfg.cpu_threads, device, small_model=cfg.backbone in TINY_TYPES)

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(3)
        assert threads(train.TrainConfig(), "cpu") == 1
        torch.set_num_threads(3)
        assert threads(train.TrainConfig(backbone="Qwen/Qwen3-VL-4B-Instruct"), "cpu") == 3
        assert threads(train.TrainConfig(), "cuda:0") == 3
        assert threads(train.TrainConfig(cpu_threads=2), "cpu") == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's own setting is kept
        torch.set_num_threads(3)
        assert threads(train.TrainConfig(), "cpu") == 3
        with pytest.raises(SystemExit, match="--cpu-threads -1"):
            train.TrainConfig(cpu_threads=-1).check()
    finally:
        torch.set_num_threads(before)


def test_vision_tower_has_its_own_learning_rate(runs, tiny_embedder):
    """The random tiny vision tower trains at lr x vision_lr_scale, everything else at lr."""
    import train

    cfg = train.TrainConfig().resolved()  # tiny-cpu: lr 1e-3
    groups = plumbing.read_state(runs["B"] / "last")["optimizer"]["param_groups"]
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"adapters", "vision"}
    assert by_name["adapters"]["initial_lr"] == pytest.approx(cfg.lr)
    assert by_name["vision"]["initial_lr"] == pytest.approx(cfg.lr * cfg.vision_lr_scale)
    # the vision group holds exactly the tower's trainable tensors, and nothing trainable is left out
    n_vision = len(tiny_embedder.vision_parameters())
    n_train = sum(1 for p in tiny_embedder.parameters() if p.requires_grad)
    assert 0 < n_vision < n_train
    assert len(by_name["vision"]["params"]) == n_vision
    assert len(by_name["adapters"]["params"]) == n_train - n_vision


def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(runs):
    a, b = runs["A"], runs["B"]
    assert "--resume" in runs["A1"][1]  # the interrupted run says how to continue
    wa, wb, w4 = _weights(a / "last"), _weights(b / "last"), _weights(runs["A_after_nan"])
    assert set(wa) == set(wb)
    diff = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not diff, f"resumed run differs from the uninterrupted one in {len(diff)} tensors, e.g. {diff[:3]}"
    assert any(not torch.equal(w4[k], wb[k]) for k in wb)  # steps 5-8 did change the weights
    # Same batches, same losses, and the log holds each step exactly once.
    sa, sb = _steps(a), _steps(b)
    assert [s["step"] for s in sa] == list(range(1, 9))
    assert [s["subset"] for s in sa] == [s["subset"] for s in sb]
    assert [s["loss"] for s in sa] == [s["loss"] for s in sb]


def test_nonfinite_loss_stops_with_message_and_keeps_last_checkpoint(runs):
    rc, _, err = runs["A2"]
    assert rc == 1
    expected_subset = _steps(runs["B"])[5]["subset"]  # step 6 of the same trajectory
    assert "non-finite" in err and "at step 6" in err and expected_subset in err, err[-2000:]
    assert "step 4" in err  # names the last good checkpoint
    left = runs["A_after_nan"]
    assert json.loads((left / "train_state.json").read_text())["step"] == 4
    _load_and_evaluate(left, "cir")


def test_torchrun_two_gloo_processes_keep_identical_parameters(runs, small_root):
    out = runs["tmp"] / "D"
    proc = _ok(_run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
                     "--data", small_root, *COMMON, "--steps", "2", "--eval-every", "2", "--device", "cpu",
                     "--chunk-size", "2", "--out", str(out)]))  # 4 per rank in 2 chunks: GradCache + no_sync
    text = proc.stdout + proc.stderr
    digests = {ln.split()[1].rstrip("]"): ln.split()[-1] for ln in text.splitlines()
               if ln.startswith("[rank ") and "sha256" in ln}
    assert set(digests) == {"0", "1"}, text[-2000:]
    assert digests["0"] == digests["1"]
    cfg = json.loads((out / "config.json").read_text())["resolved"]
    assert cfg["world_size"] == 2 and cfg["per_rank_batch"] == 4
    # Negatives cross devices and DDP's gradient is the global one: step 1 sees the same global
    # batch of 8 as the single-process run B. LoRA B = 0 at step 1, so dropout does not touch the
    # forward (same loss) nor the gradient reaching the summary tokens (same token gradient norm:
    # all-gather, x W scaling and DDP averaging cancel out). The total grad norm is not compared:
    # lora_B's own gradient sees the dropout masks, which are drawn per rank.
    d1, b1 = _steps(out)[0], _steps(runs["B"])[0]
    assert d1["subset"] == b1["subset"]
    for key in ("loss", "token_grad_norm"):
        assert abs(d1[key] - b1[key]) <= 1e-4 * abs(b1[key]), (key, d1[key], b1[key])
    assert (out / "best").is_dir() and (out / "last").is_dir()


# ------------------------------------------------------------------------------------------------
# Refusals, the data barrier, the RNG snapshot
# ------------------------------------------------------------------------------------------------

def _listing(run: Path) -> dict:
    """Every file of a run folder with its bytes' length and modification time (to see any write)."""
    return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}


def test_a_new_run_refuses_a_folder_that_holds_a_run(runs, small_root):
    b = runs["B"]
    before = _listing(b)
    rc, _, err = _train_in_process(["--data", small_root, *COMMON, "--steps", "8", "--out", str(b)])
    assert rc == 1 and "already holds a run" in err and f"--resume {b}" in err, err[-2000:]
    assert _listing(b) == before  # nothing written over


def test_resume_refuses_a_changed_training_flag_and_accepts_the_harmless_ones(runs):
    import train

    b = runs["B"]
    before = _listing(b)
    for flag, value, saved in (("--temperature", "0.5", "0.07"), ("--sampler", "uniform", "'ggas'"),
                               ("--batch-size", "16", "8")):
        rc, _, err = _train_in_process(["--resume", str(b), flag, value])
        assert rc == 1 and flag in err and "differs from the resumed run's" in err and saved in err, err[-2000:]
    assert _listing(b) == before
    # Flags that leave the trajectory alone may change; the rest comes from the saved run.
    cfg, resume = cli.parse_train_config(train.TrainConfig, ["--resume", str(b / "last"), "--eval-every", "2", "--max-eval-queries", "3"])
    saved = json.loads((b / "last" / "train_config.json").read_text())
    assert resume == str(b / "last") and cfg.out == str(b)  # continues in the run folder, not in last/
    assert (cfg.eval_every, cfg.max_eval_queries) == (2, 3)
    assert (cfg.temperature, cfg.batch_size, cfg.sampler, cfg.steps) == \
        (saved["temperature"], saved["batch_size"], saved["sampler"], saved["steps"])
    assert {"eval_every", "max_eval_queries"} <= cli.RESUME_MAY_CHANGE
    assert not {"temperature", "sampler", "calibrator", "lr", "batch_size", "seed", "steps"} & cli.RESUME_MAY_CHANGE


def test_rank_0_writes_the_synthetic_data_before_the_other_ranks_look(monkeypatch, tmp_path):
    """--data synthetic under torchrun: rank 0 generates, everyone waits at the barrier, then the
    other ranks only find it (two ranks writing the folder at once would race)."""
    from support import synthetic
    import train

    events = []

    def ensure(path="data/synthetic", *a, **k):
        events.append("ensure")
        return str(tmp_path)

    monkeypatch.setattr(synthetic, "ensure_synthetic", ensure)
    for mod in (train, plumbing):  # whichever name train.py calls it by
        monkeypatch.setattr(mod, "barrier", lambda di: events.append("barrier"), raising=False)
    for rank, order in ((0, ["ensure", "barrier"]), (1, ["barrier", "ensure"])):
        events.clear()
        root = synthetic.resolve_root("synthetic", plumbing.DistInfo(rank=rank, world=2))
        assert events == order, (rank, events)
        assert root == str(tmp_path.resolve())


def _dropout_draws(device: str) -> tuple:
    x = torch.ones(4096, device=device)
    return torch.nn.functional.dropout(x, 0.5), torch.rand(8)  # a dropout mask on device, a CPU draw


def test_rng_state_replays_cpu_dropout_masks():
    """GradCache re-runs a chunk from its RngState: the same masks again (here on CPU)."""
    import train

    snap = train.RngState("cpu")
    assert snap.cuda is None
    first = _dropout_draws("cpu")
    snap.restore()
    again = _dropout_draws("cpu")
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(_dropout_draws("cpu")[0], first[0])  # a later draw is a new mask


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: the CUDA branch of RngState needs one")
def test_rng_state_replays_cuda_dropout_masks():
    import train

    snap = train.RngState("cuda")
    assert snap.cuda is not None
    first = _dropout_draws("cuda")
    snap.restore()
    again = _dropout_draws("cuda")
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # CUDA mask and CPU draw both replayed
    assert not torch.equal(_dropout_draws("cuda")[0], first[0])


# ------------------------------------------------------------------------------------------------
# Slow (python -m pytest -m slow)
# ------------------------------------------------------------------------------------------------

def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    return _ok(_run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py", *args]))


@pytest.mark.slow  # three 2-process runs, ~40 s on 2 cores
def test_torchrun_resume_ends_with_the_same_weights_as_an_uninterrupted_torchrun(small_root, tmp_path):
    """Exact resume under DDP: 2 gloo processes, GradCache with 2 chunks per rank, stopped after step 2
    of 4 and resumed, end bit for bit where the uninterrupted 2-process run ends."""
    args = ["--data", small_root, *COMMON, "--steps", "4", "--eval-every", "2", "--device", "cpu", "--chunk-size", "2"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    _torchrun([*args, "--out", str(whole)])
    _torchrun([*args, "--stop-at", "2", "--out", str(parts)])
    assert json.loads((parts / "last" / "train_state.json").read_text())["step"] == 2
    _torchrun(["--resume", str(parts)])
    wa, wb = _weights(parts / "last"), _weights(whole / "last")
    assert set(wa) == set(wb)
    diff = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not diff, f"resumed DDP run differs in {len(diff)} tensors, e.g. {diff[:3]}"
    sa, sb = _steps(parts), _steps(whole)
    assert [s["step"] for s in sa] == [1, 2, 3, 4]
    assert [(s["subset"], s["loss"]) for s in sa] == [(s["subset"], s["loss"]) for s in sb]


def test_train_config_choice_rules_agree_with_the_modules_tuples():
    """TrainConfig's knob rules write their choices literally; they must be the modules' tuples (same order:
    argparse lists them in it)."""
    import calibrator
    import data
    import model
    import sampler
    import train
    from support import prefetch

    want = {"recipe": ("auto", *recipes.RECIPE_NAMES), "lr_schedule": train.LR_SCHEDULES, "positives": train.POSITIVES,
            "sampler": sampler.STRATEGIES, "ggas_refresh": sampler.REFRESH_MODES, "ggas_ema_start": sampler.EMA_STARTS,
            "ggas_floor": sampler.FLOORS, "query_sketches": data.SKETCH_MODES, "summary_init": model.SUMMARY_INITS,
            "loader": prefetch.MODES, "calibrator": calibrator.MODES, "two_cores": ("auto", "off")}
    assert {k: tuple(v) for k, v in config_fields.choices_of(train.TrainConfig).items()} == {k: tuple(v) for k, v in want.items()}


# ------------------------------------------------------------------------------------------------
# issue 30: which validation becomes best/ (equal scores; the number model selection reads)
# ------------------------------------------------------------------------------------------------

def _validate_in_turn(monkeypatch, tmp_path, results):
    """The real train.validate_and_save, once per EvalResult in `results` (steps 1, 2, ...), on a Run
    whose evaluation returns those results and whose log line and checkpoint writes are recorded, not
    written. Returns (run.best after each call, the scores logged, the (folder, step) of each save)."""
    import evaluate
    import train

    results = iter(results)
    saved, logged = [], []  # ("best" | "last", step of the validation best/ records, None for last/)
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: next(results))
    monkeypatch.setattr(run_dir, "log_val", lambda run, res, score, t0: logged.append(score) or {
        "event": "val", "step": run.step})
    monkeypatch.setattr(run_dir, "train_state", lambda run: {})
    monkeypatch.setattr(run_dir, "save_checkpoint", lambda folder, emb, cfg, state=None, extra=None: saved.append(
        (folder.name, extra["val"]["step"] if extra else None)))
    cfg = train.TrainConfig(eval_batch_size=2, max_eval_queries=4)
    run = train.Run(cfg=cfg, di=plumbing.DistInfo(), out=tmp_path, ufire=None, val_subsets=[],
                    embedder=torch.nn.Linear(1, 1), model=None, params=[], view=None, optimizer=None,
                    scheduler=None, task_sampler=None, plan=None, t_start=0.0)
    bests = []
    while len(logged) == run.step:  # a validation per step until `results` runs out
        run.step += 1
        try:
            train.validate_and_save(run)
        except StopIteration:
            break
        bests.append(dict(run.best))
    return bests, logged, saved


def _val_result(*rows):
    """An EvalResult of (name, Recall@1, Recall@10) rows ("ood/..." rows are out-of-distribution)."""
    import evaluate

    return evaluate.EvalResult(rows=[evaluate.EvalRow(n, n.split("/")[0], 10, 4, 0, {1: r1, 10: r10}, None)
                                     for n, r1, r10 in rows], ks=(1, 10))


def test_equal_validation_scores_keep_the_first_as_best(monkeypatch, tmp_path):
    """Model selection is the sum of val Recall@1 over sub-datasets (the authors' rule); only a strictly
    higher sum replaces best/, so of equal sums the FIRST stays (the earlier, less trained checkpoint).
    Two sub-datasets per validation; binary fractions make every sum exact: 0.75, 0.75 (the same sum
    from other rows), 1.0 (better), 1.0, 0.5."""
    r1 = [(0.5, 0.25), (0.25, 0.5), (0.5, 0.5), (0.75, 0.25), (0.25, 0.25)]
    bests, logged, saved = _validate_in_turn(monkeypatch, tmp_path,
                                             [_val_result(("t2i/a", a, a), ("t2i/b", b, b)) for a, b in r1])
    assert logged == [0.75, 0.75, 1.0, 1.0, 0.5]
    assert bests == [{"step": 1, "score": 0.75}, {"step": 1, "score": 0.75}, {"step": 3, "score": 1.0},
                     {"step": 3, "score": 1.0}, {"step": 3, "score": 1.0}]
    assert [s for s in saved if s[0] == "best"] == [("best", 1), ("best", 3)]
    assert [s for s in saved if s[0] == "last"] == [("last", None)] * 5


def test_best_is_chosen_by_the_sum_of_val_recall_at_1_without_ood(monkeypatch, tmp_path):
    """best/ is kept by the sum of val Recall@1 (evaluate.py's model selection), not Recall@10 and not
    with an OOD row. The first validation is better at R@1 (0.5 + 0.25 = 0.75 > 0.5 + 0.125), the
    second at R@10 and on the OOD row, so best/ must stay at the first."""
    first = _val_result(("cir/A", 0.5, 0.5), ("t2i/B", 0.25, 0.5), ("ood/C", 0.0, 0.0))
    second = _val_result(("cir/A", 0.5, 1.0), ("t2i/B", 0.125, 1.0), ("ood/C", 1.0, 1.0))
    bests, logged, saved = _validate_in_turn(monkeypatch, tmp_path, [first, second])
    assert logged == [0.75, 0.625]
    assert bests[-1] == {"step": 1, "score": 0.75} and saved == [("best", 1), ("last", None), ("last", None)]
