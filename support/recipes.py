"""The two named recipes: `paper` (the authors' values, for any real Qwen-VL) and `tiny-cpu` (the
offline tiny default, measured on a 2-core CPU).

Skip this file on a first read: it is a table of numbers, not a concept. Every value a recipe sets
is a field of EmbedderConfig (model.py) or TrainConfig (train.py) whose default is None, "the
recipe's value"; a command-line flag or an explicit field overrides it. `--recipe auto` (the
default) picks `tiny-cpu` for the tiny backbones and `paper` for everything else, so a run on
Qwen/Qwen3-VL-4B-Instruct gets the authors' recipe without any flag.

Where each `paper` value comes from (github haokunwen/FashionLens, `code/`), and every departure of
either recipe from the authors' code with its reason: docs/FIDELITY.md.

Also here: filling a config's None fields from its recipe (resolve_embedder_config,
resolve_train_config), the query options a recipe implies, and each batch's GradCache chunk. Why each
field holds its value: docs/FIDELITY.md ("Why each config value"). Standard library and support.errors /
support.config_fields only, so data-free tools can read the table without torch.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from support.config_fields import check_fields
from support.errors import EmbedderConfigError

# Backbone names that get `tiny-cpu` under --recipe auto (the same names as tiny_backbone.TINY_TYPES).
TINY_BACKBONES = ("tiny", "tiny-qwen2-vl")
RECIPE_NAMES = ("paper", "tiny-cpu")

RECIPES: dict[str, dict[str, dict]] = {
    "paper": {
        # EmbedderConfig fields (model.py): how queries and images become prompts.
        "embedder": dict(
            min_pixels=224 * 224,        # Qwen's processor keeps the aspect ratio inside this pixel budget
            max_pixels=256 * 256,        # (evaluate.py / test.py collators: 224^2 .. 256^2)
            max_query_images=8,          # query images per prompt (evaluate.py 54: the first 8)
            query_sketches="all",        # several sketches of one item go into one prompt together
            num_frames=8,                # a video query: 8 frames (dataset.py 362, 'nframes': 8)
            video_size=224,              # each frame resized to 224 x 224 (resized_height / resized_width)
            lora_dropout=0.05,           # model.py LoraConfig
            summary_init="im_end",       # both summary tokens start from <|im_end|>'s embedding (model.py 148-155)
        ),
        # EmbedderConfig fields TrainConfig does not pass (not in EMBEDDER_FIELDS): how the backbone
        # and the calibrator compute.
        "forward": dict(
            positions="authors",         # what the authors' call computes on this backbone (resolve_positions):
                                         # sequential 1-D on Qwen3-VL (model.py 183-192, 216-223: their
                                         # call passes no input_ids / position_ids); mRoPE elsewhere
            slerp_edge="authors",        # their slerp: cos clamped at +-0.9995, no renormalisation (model.py 30-55)
        ),
        # TrainConfig fields (train.py): the optimisation.
        "train": dict(
            lr=1e-4,                     # train.py --lr
            weight_decay=1e-3,           # train.py --weight_decay
            lr_schedule="constant",      # no scheduler in train.py
            warmup_ratio=0.0,
            grad_clip=0.0,               # 0 = no clipping (train.py never clips)
            batch_size=64,               # train.py --batch_size (per GPU: one GPU = 64)
            chunk_size=-1,               # -1 = the authors' GradCache chunk size per sub-dataset (CHUNK_SIZES)
            eval_every=500,              # train.py --eval_steps
            epochs=5.0,                  # train.py --epochs (used when neither --steps nor --epochs is given)
            positives="single",          # one positive per query: labels = arange (my_grad_cache.py 48)
            ggas_refresh="epoch",        # p recomputed at each epoch start (dataset.py set_epoch)
            ggas_ema_start="zero",       # difficulty EMA starts at 0 (dataset.py 137)
            ggas_floor="renorm",         # clip at the floor, renormalise once (dataset.py 241-246)
            reg_per_chunk=True,          # calibrator regulariser added once per GradCache chunk (my_grad_cache.py 260)
        ),
    },
    "tiny-cpu": {
        "embedder": dict(
            min_pixels=64 * 64,          # the synthetic images are 64 x 64: 64 patches -> 16 visual tokens
            max_pixels=64 * 64,
            max_query_images=4,          # outfits have up to 4 items; longer prompts cost CPU time
            query_sketches="one",        # one sketch per prompt (a random one at training)
            num_frames=4,                # 4 frames = 2 temporal patches of the tiny vision tower
            video_size=64,
            lora_dropout=0.0,            # dropout masks are a large share of a tiny CPU step
            summary_init="words",        # <|query|> from " word", <|target|> from " item": two different
                                         # starting vectors; from one shared vector the random tiny model
                                         # lost its sketch rows (docs/RESULTS.md)
        ),
        "forward": dict(
            positions="mrope",           # Qwen's own 3-D positions: the default job's results stay as they were
            slerp_edge="exact",          # exact slerp: |q'| = 1 and the angle lambda * omega at every angle
        ),
        "train": dict(
            lr=1e-3,                     # a random tiny model needs a larger step than a pretrained one
            weight_decay=0.0,
            lr_schedule="cosine",        # linear warm-up, then cosine down to lr x min_lr_ratio
            warmup_ratio=0.05,
            grad_clip=1.0,
            batch_size=16,
            chunk_size=16,               # the whole batch in one chunk: GradCache's extra forward is skipped
            eval_every=200,
            steps=1400,
            positives="multi",           # in-batch duplicates of the target (same image / asfr label) are positives
            ggas_refresh="step",
            ggas_ema_start="first",      # the first report seeds the EMA, so warm-up ends with real estimates
            ggas_floor="waterfill",      # the floor holds exactly after renormalising
            reg_per_chunk=False,         # the regulariser's weight does not depend on the chunk count
        ),
    },
}

# The authors' GradCache chunk size per sub-dataset (train.py 29-48), keyed by our "task/Dataset"
# names; a sub-dataset not listed (the synthetic ones) uses DEFAULT_CHUNK_SIZE. Long prompts (video,
# 8-image outfits, asfr's attribute pools) get small chunks, so one chunk's activations fit memory.
CHUNK_SIZES = {
    "t2i/FashionGen": 8, "t2i/Shoes": 32,
    "sketch2i/ClothesV1": 16, "sketch2i/HAIFashion": 16, "sketch2i/QMUL-Shoe-V2": 16,
    "inshop/DeepFashion": 8, "street2shop/DeepFashion2": 8,
    "compatibility/FashionVC": 32, "compatibility/Polyvore": 8,
    "video2img/MovingFashion": 2,
    "cir/Fashion200K": 8, "cir/FashionIQ-Dress": 32, "cir/FashionIQ-Shirt": 32, "cir/FashionIQ-Toptee": 32,
    "cir/Shoes": 32, "sketch&text/CSTBIR": 32,
    "asfr/DARN": 4, "asfr/FashionAI": 4,
}
DEFAULT_CHUNK_SIZE = 8

# The authors sample at most this many query images of a training record (dataset.py 12-31: the
# first number of num_constrains; 0 there = keep all). Only these two sketch datasets are capped.
TRAIN_QUERY_IMAGE_CAP = {"sketch2i/ClothesV1": 5, "sketch2i/QMUL-Shoe-V2": 5}


def recipe_name(recipe: str, backbone: str) -> str:
    """'auto' -> 'tiny-cpu' for a tiny backbone, 'paper' otherwise; a named recipe is checked."""
    if recipe == "auto":
        return "tiny-cpu" if backbone in TINY_BACKBONES else "paper"
    if recipe not in RECIPE_NAMES:
        raise ValueError(f"unknown recipe {recipe!r}; expected auto, {' or '.join(RECIPE_NAMES)}")
    return recipe


def recipe_values(recipe: str, backbone: str, part: str) -> dict:
    """The values recipe `recipe` (resolved for `backbone`) gives the fields of `part`
    ("embedder" or "train"), as a fresh dict."""
    return dict(RECIPES[recipe_name(recipe, backbone)][part])


# Backbones the authors trained (their model.py 3 and 107: Qwen3VLForConditionalGeneration). On these,
# positions="authors" is the plain 1-D sequence their call computes; elsewhere Qwen's own mRoPE.
AUTHORS_SEQUENTIAL_TYPES = ("qwen3_vl",)


def resolve_positions(positions: str, model_type: str) -> str:
    """EmbedderConfig.positions made concrete once the backbone's model_type is known: "authors" ->
    "sequential" on Qwen3-VL (their `self.qwen.model(inputs_embeds=...)` call passes no input_ids and no
    position_ids, so get_rope_index cannot build 3-D positions and every token, visual ones included,
    gets its place in the sequence), "mrope" on the Qwen2 / Qwen2.5-VL they did not train (so those keep
    Qwen's own positions); "mrope" and "sequential" stay as they are."""
    if positions != "authors":
        return positions
    return "sequential" if model_type in AUTHORS_SEQUENTIAL_TYPES else "mrope"


def chunk_size_for(subset: str, chunk_size: int) -> int:
    """The GradCache chunk size of one sub-dataset: chunk_size itself when >= 0, else (-1) the
    authors' table, DEFAULT_CHUNK_SIZE for a sub-dataset the table does not list."""
    if chunk_size >= 0:
        return chunk_size
    return CHUNK_SIZES.get(subset, DEFAULT_CHUNK_SIZE)


# ================================================================================================
# EmbedderConfig's recipe (model.py)
# ================================================================================================



def resolve_embedder_config(config):
    """`config` (an EmbedderConfig) with every None field set to its recipe's value and `recipe` to the
    recipe's name (recipe_values); a value no embedder can use raises EmbedderConfigError naming it."""
    try:
        name = recipe_name(config.recipe, config.backbone)
    except ValueError as e:
        raise EmbedderConfigError(f"EmbedderConfig.recipe: {e}") from None
    values = {**recipe_values(name, config.backbone, "embedder"), **recipe_values(name, config.backbone, "forward")}
    config = dataclasses.replace(config, recipe=name, **{k: v for k, v in values.items() if getattr(config, k) is None})
    if config.backbone not in TINY_BACKBONES and Path(config.backbone).expanduser().is_dir():
        # A local folder is saved as an absolute path: a checkpoint trained with `--backbone ../qwen`
        # must still find its backbone when evaluated from another working directory.
        config = dataclasses.replace(config, backbone=str(Path(config.backbone).expanduser().resolve()))
    # Every field's allowed values sit beside it (EmbedderConfig's knob rules): one checker reads them.
    check_fields(config, name_of=lambda n: f"EmbedderConfig.{n}", error=EmbedderConfigError)
    return config


def query_options(config) -> dict:
    """The query options of an EmbedderConfig's recipe, as keyword arguments of data.UFire.train_view:
    max_images, num_frames, sketches, and with sketches="all" the authors' per-sub-dataset training
    caps (TRAIN_QUERY_IMAGE_CAP). Images stay at their native size (no image_size)."""
    c = config
    caps = dict(TRAIN_QUERY_IMAGE_CAP) if c.query_sketches == "all" else None
    return {"max_images": c.max_query_images, "num_frames": c.num_frames, "sketches": c.query_sketches,
            "image_caps": caps}



# ================================================================================================
# TrainConfig's recipe (train.py)
# ================================================================================================

# The input fields TrainConfig passes to EmbedderConfig (the recipes' "embedder" part).
EMBEDDER_FIELDS = tuple(RECIPES["paper"]["embedder"])


def resolve_train_config(cfg):
    """TrainConfig.resolved(): `cfg` (a TrainConfig) with its recipe applied; needs no model, and
    resolving twice changes nothing.

    `recipe` becomes the name it resolves to for this backbone (recipe_name) and every None field
    takes that recipe's value. Steps and epochs form one pair: given only one of them, the other is 0
    (`--steps 300` on `paper` trains 300 steps, not 5 epochs); given neither, the recipe's pair
    (paper: 5 epochs; tiny-cpu: 1400 steps). A run, config.json and every checkpoint hold the
    resolved copy, so a resumed run keeps its values even if a recipe changes later.
    """
    try:
        name = recipe_name(cfg.recipe, cfg.backbone)
    except ValueError:
        raise SystemExit(f"error: --recipe {cfg.recipe!r}: must be auto, "
                         f"{' or '.join(RECIPE_NAMES)}") from None
    values = {**recipe_values(name, cfg.backbone, "embedder"),
              **recipe_values(name, cfg.backbone, "train")}
    length = {"steps": values.pop("steps", 0), "epochs": values.pop("epochs", 0.0)}  # the recipe's pair
    fill = {k: v for k, v in values.items() if getattr(cfg, k) is None}
    if cfg.steps is None and cfg.epochs is None:
        fill.update(length)  # neither given: the recipe decides the run length
    elif cfg.steps is None:
        fill["steps"] = 0  # --epochs alone: the epochs decide
    elif cfg.epochs is None:
        fill["epochs"] = 0.0  # --steps alone: exactly that many steps
    return dataclasses.replace(cfg, recipe=name, **fill)


def step_chunk_size(cfg, subset: str) -> int:
    """The GradCache chunk of a batch of `subset`: --chunk-size, or (-1) the authors' size for it."""
    return chunk_size_for(subset, cfg.chunk_size)
