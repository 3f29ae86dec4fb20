"""Issue 30, item 1: every constant the method depends on equals its pin in tests/pins.py, and the pins
reach what is trained.

The pins are literals copied from their sources (the authors' code, docs/FIDELITY.md, docs/RESULTS.md),
so a changed recipe value, chunk size or concept default fails here by name, e.g.
"compatibility/Polyvore: code 32, pin 8". Pure unit tests: no data, no training, no subprocess.
"""
from __future__ import annotations

import dataclasses
import inspect
from types import SimpleNamespace

import pytest

import pins

REAL = "Qwen/Qwen3-VL-4B-Instruct"  # any hub id resolves to `paper`; nothing is downloaded
RECIPE_PINS = {"paper": {"embedder": pins.PAPER_EMBEDDER, "forward": pins.PAPER_FORWARD, "train": pins.PAPER_TRAIN},
               "tiny-cpu": {"embedder": pins.TINY_EMBEDDER, "forward": pins.TINY_FORWARD, "train": pins.TINY_TRAIN}}


def assert_pinned(actual: dict, pinned: dict) -> None:
    """Fail with one readable line per field whose value differs from its pin (type included: 1 is not
    True, 5 is not 5.0), or that only one side has."""
    diff = [f"{k}: only in the code ({actual[k]!r})" for k in actual if k not in pinned]
    diff += [f"{k}: only pinned ({pinned[k]!r})" for k in pinned if k not in actual]
    diff += [f"{k}: code {actual[k]!r}, pin {pinned[k]!r}" for k in pinned
             if k in actual and (actual[k] != pinned[k] or type(actual[k]) is not type(pinned[k]))]
    assert not diff, "\n".join(diff)


@pytest.mark.parametrize("recipe,part", [("paper", "embedder"), ("paper", "forward"), ("paper", "train"),
                                         ("tiny-cpu", "embedder"), ("tiny-cpu", "forward"), ("tiny-cpu", "train")])
def test_recipe_table_equals_its_pins(recipe, part):
    from support import recipes

    assert set(recipes.RECIPES[recipe]) == set(RECIPE_PINS[recipe])  # no part of a recipe goes unpinned
    assert_pinned(recipes.RECIPES[recipe][part], RECIPE_PINS[recipe][part])


def test_chunk_table_and_caps_equal_the_authors():
    from support import recipes

    assert_pinned(recipes.CHUNK_SIZES, pins.CHUNK_SIZES)
    assert recipes.DEFAULT_CHUNK_SIZE == pins.DEFAULT_CHUNK_SIZE
    assert_pinned(recipes.TRAIN_QUERY_IMAGE_CAP, pins.TRAIN_QUERY_IMAGE_CAP)


def _fields(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def _args(fn) -> dict:
    return {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


def _defaults(name: str) -> tuple[dict, dict]:
    """(the code's defaults, their pins) for one place that holds concept defaults. A recipe field's
    default is None ("the recipe's value"); every other field is pinned or listed in pins.ENGINEERING /
    pins.UNSOURCED, so a new field has to be classified."""
    import calibrator
    import evaluate
    import model
    import sampler
    import train

    skip = pins.ENGINEERING.get(name, set()) | pins.UNSOURCED.get(name, set())
    if name == "CalibratorConfig":
        return _fields(calibrator.CalibratorConfig), pins.CALIBRATOR
    if name == "SphericalQueryCalibrator":  # the constructor model.py calls with rank, hidden, mode only
        return _args(calibrator.SphericalQueryCalibrator.__init__), pins.CALIBRATOR
    if name == "SamplerConfig":
        return {k: v for k, v in _fields(sampler.SamplerConfig).items() if k not in skip}, pins.SAMPLER
    if name == "TaskBatchSampler":  # the constructor train.make_sampler calls
        args = _args(sampler.TaskBatchSampler.__init__)
        return {k: v for k, v in args.items() if k not in ("rank", "world_size")}, pins.SAMPLER
    if name == "ggas_probabilities":
        return _args(sampler.ggas_probabilities), {"floor": pins.SAMPLER["floor"]}
    if name == "EmbedderConfig":
        recipe_fields = dict.fromkeys([*pins.PAPER_EMBEDDER, *pins.PAPER_FORWARD])
        return {k: v for k, v in _fields(model.EmbedderConfig).items() if k not in skip}, \
            {**recipe_fields, **pins.EMBEDDER}
    if name == "TrainConfig":
        recipe_fields = dict.fromkeys([*pins.PAPER_EMBEDDER, *pins.PAPER_TRAIN, *pins.TINY_TRAIN])
        return {k: v for k, v in _fields(train.TrainConfig).items() if k not in skip}, {**recipe_fields, **pins.TRAIN}
    assert name == "evaluate.DEFAULT_KS"
    return {"ks": evaluate.DEFAULT_KS}, {"ks": pins.RECALL_KS}


@pytest.mark.parametrize("name", ["CalibratorConfig", "SphericalQueryCalibrator", "SamplerConfig", "TaskBatchSampler",
                                  "ggas_probabilities", "EmbedderConfig", "TrainConfig", "evaluate.DEFAULT_KS"])
def test_concept_defaults_equal_their_pins(name):
    actual, pinned = _defaults(name)
    assert_pinned(actual, pinned)


@pytest.mark.parametrize("backbone,recipe,name", [("tiny", "auto", "tiny-cpu"), ("tiny-qwen2-vl", "auto", "tiny-cpu"),
                                                  (REAL, "auto", "paper"), ("tiny", "paper", "paper")])
def test_the_pins_reach_what_is_trained(backbone, recipe, name, monkeypatch):
    """The resolved TrainConfig, the EmbedderConfig train.build_embedder makes from it (resolved again by
    the embedder), the calibrator model.py builds from that, and the sampler train.make_sampler builds:
    each carries the pinned values (a recipe value or default lost on the way fails here)."""
    import train
    from model import FashionLensEmbedder
    from support.plumbing import DistInfo
    from support.recipes import resolve_embedder_config

    emb_pin, train_pin, fwd_pin = (RECIPE_PINS[name][k] for k in ("embedder", "train", "forward"))
    cfg = train.TrainConfig(backbone=backbone, recipe=recipe).resolved()
    want = {**emb_pin, **train_pin, **dict(zip(("steps", "epochs"), pins.RUN_LENGTH[name])),
            **{k: v for k, v in pins.TRAIN.items() if k not in ("backbone", "recipe")}, "recipe": name}
    assert_pinned({k: getattr(cfg, k) for k in want}, want)

    made = []  # build_embedder's EmbedderConfig, caught before a model is built
    monkeypatch.setattr(train, "FashionLensEmbedder", made.append)
    train.build_embedder(cfg, "cpu")
    ecfg = resolve_embedder_config(made[0])  # what FashionLensEmbedder.__init__ does first
    want = {**emb_pin, **fwd_pin, **{k: v for k, v in pins.EMBEDDER.items() if k != "backbone"}, "recipe": name}
    assert_pinned({k: getattr(ecfg, k) for k in want}, want)

    # model.py's calibrator builder, on a stand-in with the resolved config (dim 8: a small hyper-network).
    cal = FashionLensEmbedder._new_calibrator(SimpleNamespace(config=ecfg, dim=8))
    got = {k: v for k, v in dataclasses.asdict(cal.config).items() if k != "dim"}
    assert_pinned(got, {**pins.CALIBRATOR, "slerp_edge": fwd_pin["slerp_edge"]})  # the recipe's edge reaches it

    sizes = {"t2i/A": 100, "cir/B": 40}
    plan = train.plan_steps(sizes, cfg, DistInfo())
    s = train.make_sampler(sizes, cfg, plan, DistInfo())
    got = {k: getattr(s, k) for k in ("strategy", "lam", "temperature", "ema", "min_prob", "refresh_every",
                                      "drop_last", "seed", "refresh", "ema_start", "floor")}
    assert_pinned(got, {**{k: pins.SAMPLER[k] for k in got}, "refresh": train_pin["ggas_refresh"],
                             "ema_start": train_pin["ggas_ema_start"], "floor": train_pin["ggas_floor"]})
    # ggas_warmup -1: one epoch (the authors' --adaptive_warmup_epochs 1) capped at a quarter of the run.
    assert s.warmup_steps == min(plan.steps_per_epoch, plan.total // 4)


def test_the_built_embedder_has_the_authors_lora(tiny_embedder):
    """LoRA r, alpha and the wrapped projections of a built embedder (the authors' model.py 129-137),
    language model only (the tiny tower trains in full, a real one is frozen)."""
    lora = tiny_embedder.backbone.peft_config["default"]
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (pins.EMBEDDER["lora_r"], pins.EMBEDDER["lora_alpha"],
                                                            pins.TINY_EMBEDDER["lora_dropout"])
    wrapped = [n for n, m in tiny_embedder.backbone.named_modules() if hasattr(m, "lora_A")]
    assert {n.rsplit(".", 1)[-1] for n in wrapped} == pins.LORA_TARGETS
    assert wrapped and not [n for n in wrapped if "visual" in n]
