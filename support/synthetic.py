"""The synthetic U-FIRE: a procedurally drawn stand-in for the real benchmark (support code).

Skip this file on a first read: nothing here is the FashionLens method. It exists because none of the
15 datasets behind U-FIRE (Wen et al., 2026) may be shipped, yet every notebook, test and training run
needs data that behaves like them offline. data.py reads what this file writes exactly as it reads
the real U-FIRE, so no other module knows which of the two it is looking at.

What it writes (U-FIRE's own published layout, under --out):
    0_triplet_files/<n>_<task>_<Dataset>_<split>_triplet_data.json   train / val / test records
    0_test_candidates/<n>_<task>_<Dataset>_test_candidates.json      test galleries
    evaluation_only_tasks/<OOD task>/{triplet_data,candidate_images}.json + its own images
    Syn*_images/*.png (64 x 64 RGB), SynVideo_videos/*.gif (8-frame animated GIF, one per video)
    synthetic_info.json                                                 the completion stamp
13 sub-datasets cover all 9 task words, plus both OOD tasks; training sizes differ by more than 10x
on purpose, so the task-balanced sampler has something to balance.

Run it:
    python -m support.synthetic --out data/synthetic [--seed 0] [--scale 1.0] [--workers N]
The bytes depend only on (seed, scale), never on the worker count; --scale shrinks every split and
gallery (tests use 0.03-0.1).

Why the tasks disagree on "similar": every garment is a tuple of independent factors (category,
colour, pattern, category-specific attributes), and each task defines its positives through a
different subset of them. asfr matches one attribute and ignores colour and category; cir wants the
reference with exactly the modified factor changed, so the reference itself is a hard negative;
compatibility wants a *different* category that obeys the colour rules; a sketch cannot show colour,
so sketch2i galleries never hold two items that differ only in colour, while sketch&text gets the
colour from its text and is filled with colour neighbours. One embedding must serve all of these at
once, which is the paper's point: the instruction has to tell the model which factors matter.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

from PIL import Image, ImageDraw, ImageFilter, ImageOps

from support.errors import FashionLensError, run_cli

# ============================================================================================
# Task words and the instructions written for them
# ============================================================================================

# A copy of data.OOD_TASKS (a support file never imports a core file; a test keeps the two equal).
OOD_TASKS = ("Image(s)+Text 2 Compatible Item", "Street+Modification Text 2 Shop")

# Several phrasings per task, so a model cannot key on one fixed sentence. Real U-FIRE records carry
# their finished instruction_text, so only the generator needs templates; {text}, {category} and
# {attribute} are filled in from the record.
INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    # query: a caption naming every factor
    "t2i": ("Find the fashion product that matches this description: {text}",
            "Retrieve an image of {text}.",
            "Show me the product described as: {text}"),
    # query: 1-3 colourless sketches of one item
    "sketch2i": ("Find the product photo of the item drawn in this sketch.",
                 "Retrieve the fashion item that this sketch depicts.",
                 "Which product matches the given sketch?"),
    # query: 1-3 cluttered street photos of one item
    "street2shop": ("Find the shop image of the item worn in the street photo.",
                    "Retrieve the product shown in the given street photos.",
                    "Match this street snapshot to its online shop listing."),
    # query: one shop or try-on photo
    "inshop": ("Find other photos of the same product.",
               "Retrieve more images of this exact item.",
               "Show another view of the given product."),
    # query: an 8-frame clip of the item being worn
    "video2img": ("Find the product worn in this video.",
                  "Retrieve the shop image of the item shown in the video clip.",
                  "Which product appears in the given video?"),
    # query: a sketch + the colour in words
    "sketch&text": ("Find the item drawn in the sketch, {text}",
                    "Retrieve the product matching the sketch that is {text}",
                    "Using the sketch and the note '{text}', find the product."),
    # query: a reference photo + what to change
    "cir": ("Find an image like the reference one, but {text}",
            "Retrieve the product in the image modified as follows: {text}",
            "Same item as shown, except: {text}"),
    # query: the rest of an outfit
    "compatibility": ("Find a {category} that goes well with these items.",
                      "Complete the outfit with a compatible {category}.",
                      "Which {category} matches the given outfit?"),
    # query: a photo + which attribute to match
    "asfr": ("Find items with the same {attribute} as this one.",
             "Retrieve fashion items sharing this item's {attribute}.",
             "Show products whose {attribute} matches the given image."),
    # query: outfit photos + a caption of the wanted item
    OOD_TASKS[0]: ("find compatible {text} go well with the given images",
                   "Find a {text} that completes the outfit in the given images."),
    # query: a street photo + what to change
    OOD_TASKS[1]: ("Find the shop image of the item in the street photo, but {text}",
                   "Retrieve the product worn in the photo modified as follows: {text}"),
}

# ============================================================================================
# Garments: independent factors, and the texts written from them
# ============================================================================================

ATTRIBUTES = {  # category-specific attributes and their values
    "sleeve length": ("sleeveless", "short", "long"),  # tops, dresses, outerwear
    "neckline": ("round", "v-neck", "square"),         # tops, dresses
    "length": ("short", "medium", "long"),             # bottoms, dresses, outerwear
    "fit": ("slim", "regular", "wide"),                # bottoms
    "height": ("low", "mid", "high"),                  # shoes
    "size": ("small", "medium", "large"),              # bags
}
# Categories of one slot with the same attributes can replace each other ("make it a shirt instead
# of a t-shirt"); an outfit holds at most one item per slot.
CATEGORIES = {  # category -> (outfit slot, attributes)
    "t-shirt": ("top", ("sleeve length", "neckline")),
    "shirt": ("top", ("sleeve length", "neckline")),
    "sweater": ("top", ("sleeve length", "neckline")),
    "trousers": ("bottom", ("length", "fit")),
    "shorts": ("bottom", ("length", "fit")),
    "skirt": ("bottom", ("length", "fit")),
    "dress": ("dress", ("sleeve length", "neckline", "length")),
    "coat": ("outerwear", ("sleeve length", "length")),
    "jacket": ("outerwear", ("sleeve length", "length")),
    "sneakers": ("shoes", ("height",)),
    "boots": ("shoes", ("height",)),
    "heels": ("shoes", ("height",)),
    "bag": ("bag", ("size",)),
}
COLOURS = {  # name -> RGB
    # far apart in RGB, so a 64 x 64 render tells every pair apart
    "red": (200, 30, 40), "navy": (25, 35, 95), "black": (22, 22, 22), "white": (250, 250, 250),
    "grey": (128, 128, 128), "beige": (222, 203, 160), "brown": (120, 72, 32), "green": (35, 140, 60),
    "yellow": (240, 210, 40), "pink": (240, 140, 185), "orange": (240, 130, 20), "purple": (120, 50, 150),
}
PATTERNS = ("plain", "striped", "checked", "dotted", "diagonal", "zigzag")  # PATTERNS[1:] = patterned
# Colour harmony, an explicit rule: neutrals go with anything (except black with navy); at most
# one chromatic colour per outfit unless the two form one of the listed harmonious pairs.
NEUTRALS = ("black", "white", "grey", "navy", "beige", "brown")
HARMONY_PAIRS = (("purple", "yellow"), ("green", "pink"), ("orange", "red"))
OUTFIT_TEMPLATES = (("top", "bottom", "shoes"), ("top", "bottom", "shoes", "outerwear"),  # slots of one outfit
                    ("top", "bottom", "shoes", "bag"), ("dress", "shoes"), ("dress", "shoes", "bag"),
                    ("dress", "shoes", "outerwear"))
# How an attribute value reads in a caption or modification text ("short" alone is ambiguous).
_PHRASE = {("sleeve length", "sleeveless"): "sleeveless", ("sleeve length", "short"): "short-sleeve",
           ("sleeve length", "long"): "long-sleeve", ("neckline", "round"): "round-neck",
           ("neckline", "v-neck"): "v-neck", ("neckline", "square"): "square-neck",
           ("length", "short"): "short", ("length", "medium"): "medium-length", ("length", "long"): "long",
           ("fit", "slim"): "slim-fit", ("fit", "regular"): "regular-fit", ("fit", "wide"): "wide-fit",
           ("height", "low"): "low-cut", ("height", "mid"): "mid-height", ("height", "high"): "high",
           ("size", "small"): "small", ("size", "medium"): "medium-size", ("size", "large"): "large"}
_PATTERN_WORD = {"plain": "plain", "striped": "striped", "checked": "checked", "dotted": "polka-dot",
                 "diagonal": "diagonal-striped", "zigzag": "zigzag"}
SYN_SIZE = 64  # synthetic images are 64 x 64 RGB PNG (the tiny model's default image size)
# Bumped whenever the bytes written for a given (seed, scale) change; ensure_synthetic regenerates
# a folder stamped with another version.
SYN_VERSION = 1


class Garment(NamedTuple):
    """One garment ("item"): the factors every rendering and every text is drawn from.

    A tuple, so equal factors mean one product: it keys sets, dicts and the sprite cache.
    """
    category: str              # a key of CATEGORIES
    colour: str                # a key of COLOURS
    pattern: str               # one of PATTERNS
    attrs: tuple[str, ...]     # the values of CATEGORIES[category]'s attributes, in that order


def random_item(rng: random.Random, cats=None) -> Garment:
    """A garment with every factor drawn uniformly.

    `cats` limits the categories (default: all). The generator draws every random item through this
    function, and notebook 06 uses it to probe what the embedding encodes.
    """
    cat = rng.choice(cats or sorted(CATEGORIES))
    return Garment(cat, rng.choice(sorted(COLOURS)), rng.choice(PATTERNS),
                   tuple(rng.choice(ATTRIBUTES[a]) for a in CATEGORIES[cat][1]))


def colours_compatible(colours) -> bool:
    """The synthetic colour-harmony rule (see HARMONY_PAIRS)."""
    cs = sorted(set(colours))
    if "black" in cs and "navy" in cs:
        return False
    chrom = [c for c in cs if c not in NEUTRALS]  # the chromatic colours
    return len(chrom) <= 1 or (len(chrom) == 2 and (tuple(chrom) in HARMONY_PAIRS
                                                    or tuple(chrom[::-1]) in HARMONY_PAIRS))


def item_code(item: Garment) -> str:
    """'shirt+red+plain+long+round': the garment's file-name stem (one product = one code)."""
    return "+".join((item.category, item.colour, item.pattern) + tuple(item.attrs))


def item_attrs(item: Garment) -> dict[str, str]:
    """{attribute name: value} of the garment's category-specific attributes."""
    return dict(zip(CATEGORIES[item.category][1], item.attrs))


def caption(item: Garment, rng: random.Random) -> str:
    """A caption naming every factor (so a one-factor distractor is never also a correct answer)."""
    attrs = " ".join(_PHRASE[(a, v)] for a, v in item_attrs(item).items())
    cat, col, pw = item.category, item.colour, _PATTERN_WORD[item.pattern]
    # three word orders, so the factors are not always at the same token positions
    forms = (f"a {col} {pw} {attrs} {cat}", f"{attrs} {cat} in {col}, {pw}",
             f"a {pw} {cat}, {col}, {attrs}")
    return rng.choice(forms)


def _item_set(item: Garment, factor: str, value: str) -> Garment:
    """The garment with one factor changed to `value`."""
    if factor == "colour":
        return item._replace(colour=value)
    if factor == "pattern":
        return item._replace(pattern=value)
    if factor == "category":  # only within a slot whose categories share their attributes
        return item._replace(category=value)
    names = CATEGORIES[item.category][1]
    return item._replace(attrs=tuple(value if n == factor else v for n, v in zip(names, item.attrs)))


def item_factors(item: Garment) -> list[str]:
    """The factor names this garment has: the three shared ones, then its category's attributes."""
    return ["category", "colour", "pattern"] + list(CATEGORIES[item.category][1])


def factor_values(item: Garment, factor: str) -> tuple[str, ...]:
    """Every value `factor` could take for this garment (the category only within its slot)."""
    if factor == "colour":
        return tuple(COLOURS)
    if factor == "pattern":
        return PATTERNS
    if factor == "category":  # same slot and same attributes, so the other factors stay valid
        slot, names = CATEGORIES[item.category]
        return tuple(c for c, (s, n) in CATEGORIES.items() if s == slot and n == names)
    return ATTRIBUTES[factor]


def item_value(item: Garment, factor: str) -> str:
    """The garment's value of one factor."""
    shared = {"category": item.category, "colour": item.colour, "pattern": item.pattern}
    return shared.get(factor) or item_attrs(item)[factor]


def neighbours(item: Garment, factors=None) -> list[Garment]:
    """Every item that differs from `item` in exactly one factor (of the given factors)."""
    out = []
    for f in (factors or item_factors(item)):
        if f not in item_factors(item):  # e.g. "neckline" asked of a shoe
            continue
        out += [_item_set(item, f, v) for v in factor_values(item, f) if v != item_value(item, f)]
    return out


def modification_text(a: Garment, b: Garment, rng: random.Random) -> str:
    """Text that turns item a into item b (they differ in one or two factors)."""
    parts = []  # one clause per changed factor, joined with "and"
    for f in item_factors(a):
        va, vb = item_value(a, f), item_value(b, f)
        if va == vb:
            continue
        if f == "colour":
            parts.append(rng.choice((f"change the colour from {va} to {vb}", f"make it {vb} instead of {va}",
                                     f"I want it in {vb}")))
        elif f == "pattern":
            parts.append("make it plain, with no pattern" if vb == "plain" else
                         rng.choice((f"make it {_PATTERN_WORD[vb]}", f"change the pattern to {_PATTERN_WORD[vb]}")))
        elif f == "category":
            parts.append(f"make it a {vb} instead of a {va}")
        elif f == "sleeve length":
            parts.append("remove the sleeves" if vb == "sleeveless" else f"make the sleeves {vb}")
        elif f == "neckline":
            parts.append(f"change the neckline to {_PHRASE[(f, vb)]}")
        elif f == "size":
            parts.append(f"make it {vb} in size")
        else:
            parts.append(rng.choice((f"change the {f} from {va} to {vb}", f"make the {f} {vb}")))
    return " and ".join(parts)


# ============================================================================================
# Drawing: a garment as a unit-square shape, a coloured sprite, then one picture per view
# ============================================================================================

def _shape(item: Garment):
    """Unit-square drawing of an item: (filled polygons, cut-outs, detail lines, extra ellipses).

    Every attribute changes the outline (sleeves, neckline, length, fit, height, size), so a sketch,
    which shows no colour, still shows every attribute.
    """
    cat = item.category
    a = item_attrs(item)  # {attribute: value}
    polys, cuts, lines, rings = [], [], [], []  # point lists in (u, v), u right and v down, both in [0, 1]
    mirror = lambda pts: [(1 - u, v) for u, v in pts]  # noqa: E731  (left sleeve/leg -> right)
    slot = CATEGORIES[cat][0]
    if slot in ("top", "dress", "outerwear"):
        body = {"t-shirt": (0.30, 0.14, 0.70, 0.80), "shirt": (0.28, 0.12, 0.72, 0.90),  # torso box
                "sweater": (0.24, 0.12, 0.76, 0.86), "dress": (0.34, 0.08, 0.66, 0.40),
                "coat": (0.26, 0.06, 0.74, {"short": .55, "medium": .75, "long": .95}.get(a.get("length"))),
                "jacket": (0.24, 0.10, 0.76, {"short": .50, "medium": .65, "long": .80}.get(a.get("length")))}[cat]
        x0, y0, x1, y1 = body
        polys.append([(x0, y0), (x1, y0), (x1, y1), (x0, y1)])
        sl = a["sleeve length"]
        if sl != "sleeveless":  # one sleeve from the left shoulder, mirrored to the right
            reach = 0.62 if cat == "dress" else 0.84  # where a long sleeve ends
            if sl == "short":
                s = [(x0, y0), (x0 - 0.18, y0 + 0.24), (x0 - 0.09, y0 + 0.32), (x0, y0 + 0.18)]
            else:
                s = [(x0, y0), (x0 - 0.22, reach), (x0 - 0.12, reach + 0.04), (x0, y0 + 0.22)]
            polys += [s, mirror(s)]
        if "neckline" in a:  # cut out of the body at the top centre
            n = a["neckline"]
            if n == "round":
                rings.append((0.41, y0 - 0.08, 0.59, y0 + 0.1))  # an ellipse's bounding box
            elif n == "v-neck":
                cuts.append([(0.39, y0 - 0.01), (0.61, y0 - 0.01), (0.5, y0 + 0.24)])
            else:
                cuts.append([(0.41, y0 - 0.01), (0.59, y0 - 0.01), (0.59, y0 + 0.12), (0.41, y0 + 0.12)])
        # category details: skirt of a dress, button line and collar, hem ribbing, lapels, pockets
        if cat == "dress":
            L = {"short": .62, "medium": .80, "long": .97}[a["length"]]  # hem height
            polys.append([(x0, y1), (x1, y1), (0.84, L), (0.16, L)])  # the flared skirt
            lines.append([(x0, y1), (x1, y1)])
        elif cat == "shirt":
            lines += [[(0.5, y0 + 0.12), (0.5, y1)], [(0.38, y0), (0.46, y0 + 0.1)], [(0.62, y0), (0.54, y0 + 0.1)]]
        elif cat == "sweater":
            lines += [[(x0, y1 - 0.07), (x1, y1 - 0.07)], [(x0, y1 - 0.035), (x1, y1 - 0.035)]]
        elif cat == "coat":
            lines += [[(0.5, 0.3), (0.5, y1)], [(0.38, y0), (0.5, 0.3), (0.62, y0)], [(x0, 0.45), (x1, 0.45)]]
        elif cat == "jacket":
            lines += [[(0.5, y0), (0.5, y1)], [(0.3, y1 - 0.12), (0.42, y1 - 0.12)], [(0.58, y1 - 0.12), (0.7, y1 - 0.12)]]
    elif slot == "bottom":
        polys.append([(0.30, 0.06), (0.70, 0.06), (0.70, 0.14), (0.30, 0.14)])  # waistband
        lines.append([(0.30, 0.14), (0.70, 0.14)])
        if cat == "skirt":
            L = {"short": .45, "medium": .65, "long": .90}[a["length"]]  # hem height
            s = {"slim": 0.0, "regular": 0.08, "wide": 0.18}[a["fit"]]  # flare
            polys.append([(0.30, 0.14), (0.70, 0.14), (0.70 + s, L), (0.30 - s, L)])
        else:
            L = ({"short": .70, "medium": .82, "long": .96} if cat == "trousers"
                 else {"short": .36, "medium": .46, "long": .56})[a["length"]]  # hem height
            w = {"slim": 0.12, "regular": 0.17, "wide": 0.24}[a["fit"]] + (0.06 if cat == "shorts" else 0)  # hem
            leg = [(0.30, 0.14), (0.50, 0.14), (0.49, L), (0.49 - w, L)]  # the left leg
            polys += [leg, mirror(leg)]
    elif slot == "shoes":
        h = a["height"]
        if cat == "sneakers":
            H = {"low": .52, "mid": .40, "high": .26}[h]  # top of the collar
            polys.append([(0.1, 0.8), (0.1, 0.6), (0.3, H), (0.52, H), (0.58, 0.56), (0.9, 0.66), (0.9, 0.8)])
            lines += [[(0.08, 0.84), (0.92, 0.84)], [(0.4, H + 0.08), (0.56, H + 0.1)], [(0.4, H + 0.16), (0.6, H + 0.18)]]
        elif cat == "boots":
            H = {"low": .45, "mid": .30, "high": .12}[h]  # top of the shaft
            polys.append([(0.2, 0.84), (0.2, H), (0.52, H), (0.52, 0.6), (0.88, 0.68), (0.88, 0.84)])
            polys.append([(0.2, 0.84), (0.34, 0.84), (0.34, 0.9), (0.2, 0.9)])
            lines += [[(0.18, 0.84), (0.9, 0.84)], [(0.2, H + 0.05), (0.52, H + 0.05)]]
        else:  # heels
            hh = {"low": .06, "mid": .14, "high": .24}[h]  # heel height
            back = 0.8 - hh
            polys.append([(0.12, back - 0.16), (0.14, back), (0.46, 0.74), (0.92, 0.82), (0.92, 0.72),
                          (0.62, 0.62), (0.4, back - 0.08)])
            polys.append([(0.13, back), (0.2, back), (0.18, 0.86), (0.15, 0.86)])
    else:  # bag
        x0, y0, x1, y1 = {"small": (0.32, 0.50, 0.68, 0.80), "medium": (0.25, 0.42, 0.75, 0.85),
                          "large": (0.15, 0.35, 0.85, 0.92)}[a["size"]]
        polys.append([(x0, y0), (x1, y0), (x1, y1), (x0, y1)])
        # the handle: an arc over the bag, drawn as a thick line
        rings.append(("handle", x0 + 0.08 * (x1 - x0) / 0.5, y0 - 0.22, x1 - 0.08 * (x1 - x0) / 0.5, y0 + 0.12))
        lines.append([(x0, y0 + 0.1), (x1, y0 + 0.1)])
    return polys, cuts, lines, rings


def _pattern_layer(colour: str, pattern: str, n: int) -> Image.Image:
    """An n x n fill of the colour with its pattern drawn in a contrasting shade."""
    c = COLOURS[colour]
    img = Image.new("RGB", (n, n), c)
    lum = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
    # darker strokes on light colours, lighter strokes on dark ones, so every pattern is visible
    k = tuple(int(v * 0.45) for v in c) if lum > 120 else tuple(int(v * 0.45 + 140) for v in c)
    d = ImageDraw.Draw(img)
    if pattern == "striped":  # 2-pixel stripes every 6 pixels
        for y in range(0, n, 6):
            d.rectangle([0, y, n, y + 1], fill=k)
    elif pattern == "checked":  # a grid of 2-pixel lines every 8 pixels
        for t in range(0, n, 8):
            d.rectangle([t, 0, t + 1, n], fill=k)
            d.rectangle([0, t, n, t + 1], fill=k)
    elif pattern == "dotted":  # rows of dots, every other row shifted
        for y in range(2, n, 7):
            for x in range(2 + (y // 7 % 2) * 3, n, 7):
                d.ellipse([x, y, x + 2, y + 2], fill=k)
    elif pattern == "diagonal":  # 45-degree stripes
        for t in range(-n, n, 7):
            d.line([(t, 0), (t + n, n)], fill=k, width=2)
    elif pattern == "zigzag":  # horizontal zigzag lines
        for y in range(3, n, 8):
            d.line([(x, y + (3 if (x // 4) % 2 else 0)) for x in range(0, n + 4, 4)], fill=k, width=1)
    return img


_SPRITES: dict = {}  # (garment, n) -> (RGB, mask); one product is drawn in many views


def garment_sprite(item: Garment, n: int = SYN_SIZE) -> tuple[Image.Image, Image.Image]:
    """(RGB garment, L mask) of an item drawn on an n x n canvas (cached per process)."""
    key = (item, n)
    if key in _SPRITES:
        return _SPRITES[key]
    polys, cuts, lines, rings = _shape(item)
    m = 0.08 * n  # margin
    P = lambda pts: [(m + u * (n - 2 * m), m + v * (n - 2 * m)) for u, v in pts]  # noqa: E731  unit square -> pixels
    mask = Image.new("L", (n, n), 0)  # 255 where the garment is
    md = ImageDraw.Draw(mask)
    for p in polys:
        md.polygon(P(p), fill=255)
    for r in rings:
        if r[0] == "handle":
            (a, b), (c, d) = P([r[1:3], r[3:5]])
            md.arc([a, b, c, d], 180, 360, fill=255, width=max(2, n // 24))
        else:  # a round neckline is cut out of the body
            (a, b), (c, d) = P([r[:2], r[2:]])
            md.ellipse([a, b, c, d], fill=0)
    for p in cuts:  # necklines
        md.polygon(P(p), fill=0)
    img = _pattern_layer(item.colour, item.pattern, n)
    # outline = mask edges, drawn dark so white garments stay visible on a light background
    edge = mask.filter(ImageFilter.FIND_EDGES).point(lambda v: 255 if v > 60 else 0)
    img.paste((45, 45, 45), mask=edge)
    d = ImageDraw.Draw(img)
    for ln in lines:  # seams, buttons, ribbing: they tell categories of one slot apart
        d.line(P(ln), fill=(55, 55, 55), width=1)
    _SPRITES[key] = (img, mask)
    if len(_SPRITES) > 4096:  # bound the memory of a long run
        _SPRITES.clear()
    return img, mask


def _data_seed(seed: int, name: str) -> int:
    """The generator's one hash from (seed, a file path or product code) to an integer.

    crc32 of "seed|name" is part of dataset version 1 (SYN_VERSION): the project's run-time seed mixer,
    plumbing.mix_seed, would draw other streams and so change every street photo, sketch and video.
    """
    return zlib.crc32(f"{seed}|{name}".encode())


def _rng_for(seed: int, path: str) -> random.Random:
    """Per-file RNG: the bytes of a file depend only on (seed, its path), not on job order."""
    return random.Random(_data_seed(seed, path))


def _transformed(item: Garment, rng: random.Random, scale: float, angle: float, n=SYN_SIZE):
    """The sprite and its mask scaled by `scale` and rotated by `angle` degrees."""
    img, mask = garment_sprite(item, n)
    s = max(4, int(round(n * scale)))  # new side in pixels
    img, mask = img.resize((s, s), Image.BILINEAR), mask.resize((s, s), Image.BILINEAR)
    if angle:
        img = img.rotate(angle, Image.BILINEAR, fillcolor=(0, 0, 0))
        mask = mask.rotate(angle, Image.BILINEAR, fillcolor=0)
    return img, mask


def render_product(item: Garment, view: int = 0) -> Image.Image:
    """Flat product photo on a plain background; view 1 = mirrored, tilted second shot."""
    img, mask = garment_sprite(item)
    bg = Image.new("RGB", (SYN_SIZE, SYN_SIZE), (244, 244, 244) if view == 0 else (226, 232, 238))
    if view:  # a second shot of the same product: same garment, other pixels
        img, mask = ImageOps.mirror(img), ImageOps.mirror(mask)
        img = img.rotate(9, Image.BILINEAR, fillcolor=(0, 0, 0))
        mask = mask.rotate(9, Image.BILINEAR, fillcolor=0)
    bg.paste(img, mask=mask)
    return bg


# Where each slot sits on the 64 x 64 figure: (x0, y0, x1, y1) in pixels.
_REGIONS = {"top": (14, 14, 50, 46), "outerwear": (11, 12, 53, 58), "dress": (13, 13, 51, 63),
            "bottom": (15, 32, 49, 64), "shoes": (22, 48, 44, 64), "bag": (36, 30, 62, 56)}


def render_tryon(item: Garment, dx: int = 0, dy: int = 0, bg=(226, 229, 222), stripes: int = -1) -> Image.Image:
    """The item worn by a simple figure (head, limbs, neutral filler garments)."""
    im = Image.new("RGB", (SYN_SIZE, SYN_SIZE), bg)
    d = ImageDraw.Draw(im)
    if stripes >= 0:  # moving background for video frames
        for x in range(-16, SYN_SIZE + 16, 16):
            d.rectangle([x + stripes, 0, x + stripes + 5, SYN_SIZE], fill=tuple(max(0, v - 25) for v in bg))
    skin, filler = (222, 184, 152), (150, 150, 158)
    slot = CATEGORIES[item.category][0]
    d.ellipse([27 + dx, 1 + dy, 37 + dx, 12 + dy], fill=skin)                       # head
    d.line([(22 + dx, 18 + dy), (13 + dx, 44 + dy)], fill=skin, width=3)            # arms
    d.line([(42 + dx, 18 + dy), (51 + dx, 44 + dy)], fill=skin, width=3)
    d.line([(27 + dx, 44 + dy), (25 + dx, 62 + dy)], fill=skin, width=4)            # legs
    d.line([(37 + dx, 44 + dy), (39 + dx, 62 + dy)], fill=skin, width=4)
    if slot not in ("top", "dress", "outerwear"):  # grey filler top, so the figure is dressed
        d.rectangle([22 + dx, 13 + dy, 42 + dx, 40 + dy], fill=filler)
    if slot not in ("bottom", "dress"):  # dark filler bottom
        d.rectangle([22 + dx, 38 + dy, 42 + dx, 58 + dy], fill=(90, 90, 100))
    x0, y0, x1, y1 = _REGIONS[slot]
    img, mask = garment_sprite(item)
    w, h = x1 - x0, y1 - y0  # the sprite is squeezed into the slot's region
    im.paste(img.resize((w, h), Image.BILINEAR), (x0 + dx, y0 + dy), mask.resize((w, h), Image.BILINEAR))
    return im


def render_street(item: Garment, rng: random.Random) -> Image.Image:
    """Street photo: cluttered background, other garments around, scale/rotation/crop jitter."""
    bgc = tuple(rng.randint(60, 200) for _ in range(3))  # a random mid-tone background
    im = Image.new("RGB", (SYN_SIZE, SYN_SIZE), bgc)
    d = ImageDraw.Draw(im)
    for _ in range(rng.randint(6, 12)):  # clutter: walls, windows, cars, people as blobs
        x, y = rng.randint(-10, 60), rng.randint(-10, 60)
        w, h = rng.randint(6, 30), rng.randint(6, 30)
        col = tuple(rng.randint(0, 255) for _ in range(3))
        (d.rectangle if rng.random() < 0.6 else d.ellipse)([x, y, x + w, y + h], fill=col)
    for _ in range(rng.randint(1, 2)):  # other garments (partly visible)
        o = random_item(rng)
        img, mask = _transformed(o, rng, rng.uniform(0.3, 0.5), rng.uniform(-30, 30))
        im.paste(img, (rng.choice((-8, 40)) + rng.randint(-4, 4), rng.randint(-8, 40)), mask)
    # the garment itself: smaller than in the shop photo, tilted, off centre
    img, mask = _transformed(item, rng, rng.uniform(0.62, 0.9), rng.uniform(-22, 22))
    s = img.size[0]
    im.paste(img, ((SYN_SIZE - s) // 2 + rng.randint(-7, 7), (SYN_SIZE - s) // 2 + rng.randint(-7, 7)), mask)
    c = rng.randint(50, 64)  # crop jitter, then back to 64 x 64
    x, y = rng.randint(0, SYN_SIZE - c), rng.randint(0, SYN_SIZE - c)
    return im.crop((x, y, x + c, y + c)).resize((SYN_SIZE, SYN_SIZE), Image.BILINEAR)


def render_sketch(item: Garment, rng: random.Random) -> Image.Image:
    """Sketch: grey-level edges only (outline, details, pattern strokes), never the colour."""
    img, mask = _transformed(item, rng, rng.uniform(0.88, 1.0), rng.uniform(-6, 6))
    canvas = Image.new("L", (SYN_SIZE, SYN_SIZE), 0)  # the garment's luminance
    s = img.size[0]
    off = ((SYN_SIZE - s) // 2 + rng.randint(-3, 3), (SYN_SIZE - s) // 2 + rng.randint(-3, 3))
    canvas.paste(img.convert("L"), off, mask)
    m = Image.new("L", (SYN_SIZE, SYN_SIZE), 0)  # the garment's mask at the same place
    m.paste(mask, off)
    # edges of the luminance inside the garment plus the garment outline; binarised so the
    # stroke darkness carries no colour information
    e = canvas.filter(ImageFilter.FIND_EDGES).point(lambda v: 255 if v > 40 else 0)
    o = m.point(lambda v: 255 if v > 127 else 0).filter(ImageFilter.FIND_EDGES)
    lines = Image.eval(Image.composite(Image.new("L", e.size, 255), e, o), lambda v: v)  # inner edges OR outline
    ink = rng.randint(20, 90)  # one pen darkness per sketch
    out = Image.new("L", (SYN_SIZE, SYN_SIZE), 255)
    out.paste(ink, mask=lines)
    return out.convert("RGB")


def render_video(item: Garment, rng: random.Random, n_frames: int = 8) -> list[Image.Image]:
    """A short clip: the figure wearing the item walks across a panning background."""
    bg = tuple(rng.randint(150, 235) for _ in range(3))  # a light background, one per clip
    x0, x1 = sorted((rng.randint(-10, -2), rng.randint(2, 10)))  # start and end offsets of the walk
    if rng.random() < 0.5:  # walk left or right
        x0, x1 = x1, x0
    frames = []
    for t in range(n_frames):
        a = t / max(1, n_frames - 1)  # 0 -> 1 over the clip
        dx = int(round(x0 + (x1 - x0) * a))
        dy = int(round(1.5 * math.sin(a * 2 * math.pi * 2)))  # walking bob
        frames.append(render_tryon(item, dx, dy, bg, stripes=(t * 3) % 16))
    return frames


def _render_job(args) -> None:
    """Render one file of the synthetic set (runs in worker processes)."""
    out, seed, rel, spec = args  # folder, data seed, relative path, (view kind, Garment)
    kind, item = spec
    rng = _rng_for(seed, rel)  # only street photos, sketches and videos draw from it
    path = os.path.join(out, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if kind == "video":  # one animated GIF; fixed palette and save settings keep the bytes stable
        fr = render_video(item, rng)
        pal = [f.quantize(colors=64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE) for f in fr]
        pal[0].save(path, format="GIF", save_all=True, append_images=pal[1:], duration=100, loop=0,
                    optimize=False, disposal=1)
        return
    img = {"product": lambda: render_product(item, 0), "view2": lambda: render_product(item, 1),
           "tryon": lambda: render_tryon(item), "street": lambda: render_street(item, rng),
           "sketch": lambda: render_sketch(item, rng)}[kind]()
    img.save(path, format="PNG", optimize=False, compress_level=6)  # fixed settings: stable bytes


def _render_chunk(chunk) -> int:
    """Render a list of jobs (one unit of work for a worker process)."""
    for job in chunk:
        _render_job(job)
    return len(chunk)


# ============================================================================================
# The plan: which records, galleries and images make up the synthetic U-FIRE
# ============================================================================================

@dataclass(frozen=True)
class SynthSpec:
    """One synthetic sub-dataset: task, name, file prefix, item categories, sizes at scale 1."""
    task: str
    dataset: str
    prefix: int          # file-ordering number, as in the real file names (not the task number)
    cats: tuple          # categories its items are drawn from
    train: int           # train records at scale 1.0 (sizes deliberately uneven, >= 10x apart)
    test: int            # test queries at scale 1.0
    val: int = 50        # val queries at scale 1.0
    fill_cats: tuple = ()  # categories for random gallery filler (default: cats)


_CLOTHES = ("t-shirt", "shirt", "sweater", "trousers", "shorts", "skirt", "dress", "coat", "jacket")
_SHOES = ("sneakers", "boots", "heels")
SYNTH_SUBSETS = (
    SynthSpec("t2i", "SynGen", 1, _CLOTHES + _SHOES + ("bag",), 1500, 120),
    SynthSpec("t2i", "SynShoes", 1, _SHOES, 200, 60),
    SynthSpec("sketch2i", "SynSketch", 2, _CLOTHES, 800, 120),
    # a sketch hides colour, so only 54 shoe shapes exist: clothes fill the gallery up to size
    SynthSpec("sketch2i", "SynSketchShoe", 2, _SHOES, 150, 40, 30, fill_cats=tuple(CATEGORIES)),
    SynthSpec("inshop", "SynInshop", 3, _CLOTHES, 1200, 120),
    SynthSpec("street2shop", "SynStreet", 4, _CLOTHES + _SHOES + ("bag",), 1000, 120),
    SynthSpec("compatibility", "SynOutfit", 5, tuple(CATEGORIES), 1200, 120),
    SynthSpec("video2img", "SynVideo", 6, _CLOTHES, 400, 100),
    SynthSpec("cir", "SynCIR-Top", 7, ("t-shirt", "shirt", "sweater"), 2000, 150),
    SynthSpec("cir", "SynCIR-Dress", 7, ("dress",), 1000, 120),
    SynthSpec("cir", "SynCIR-Shoes", 7, _SHOES, 300, 80),
    SynthSpec("sketch&text", "SynSketchText", 8, _CLOTHES, 600, 100),
    SynthSpec("asfr", "SynAttr", 9, _CLOTHES, 1500, 120),
)
GALLERY_MIN = 550  # test gallery size floor at scale 1.0 (>= 500 images per sub-dataset)
SHOP = "SynShop_images"
_SPLITS = ("train", "val", "test")


def _same(item: Garment):
    """Gallery key of most tasks: two garments are the same product when every factor is equal."""
    return item


def _without_colour(item: Garment) -> tuple:
    """Gallery key of sketch2i: a sketch cannot tell two garments apart that differ only in colour."""
    return (item.category, item.pattern, item.attrs)


class _Planner:
    """Builds every record, gallery and image job of the synthetic set (pure Python, seeded).

    Each sub-dataset draws from its own random.Random(f"{seed}|{task}|{dataset}"), so adding or
    reordering sub-datasets leaves the others unchanged. Images are only registered here (path ->
    render job); they are drawn later, in parallel, each from its own per-file RNG.
    """

    def __init__(self, seed: int, scale: float):
        self.seed, self.scale = seed, scale
        self.jobs: dict[str, tuple] = {}     # relative path -> (view kind, Garment)
        self.files: dict[str, object] = {}   # relative path -> JSON content

    def held_out(self, item: Garment) -> bool:
        """A fifth of all products are test/val targets only (seeded hash), so test products are unseen."""
        return _data_seed(self.seed, item_code(item)) % 5 == 0

    def item(self, rng, cats, held: Optional[bool]) -> Garment:
        """A random garment of `cats`; held True/False forces held-out / seen products, None either."""
        while True:
            it = random_item(rng, list(cats))
            if held is None or self.held_out(it) == held:
                return it

    def n(self, k: int, lo: int = 4) -> int:
        """A size at scale 1.0 -> the size at this scale, at least `lo`."""
        return max(lo, int(round(k * self.scale)))

    def splits(self, spec: SynthSpec):
        """(split, record count, held-out?) for train / val / test: val and test ask for unseen products."""
        return (("train", self.n(spec.train, 8), False),
                ("val", self.n(spec.val, 4), True), ("test", self.n(spec.test, 8), True))

    # ---- image paths (registering the render job) ----
    def img(self, kind: str, item: Garment, k: int = 0, folder: str = "") -> str:
        """The relative path of one view of a garment; registers the job that draws it."""
        code = item_code(item)
        rel = {"product": f"{SHOP}/product+{code}.png", "view2": f"{SHOP}/view2+{code}.png",
               "tryon": f"SynInshop_images/tryon+{code}.png",
               "street": f"SynStreet_images/street+{code}+{k}.png",
               "sketch": f"SynSketch_images/sketch+{code}+{k}.png",
               "video": f"SynVideo_videos/video+{code}+{k}.gif"}[kind]
        if folder:  # OOD tasks keep their images inside their own folder
            rel = f"{folder}/{os.path.basename(rel)}"
        self.jobs[rel] = (kind, item)
        return rel

    def gallery_fill(self, rng, spec, positives_items, n_pos_images, views, factors=None, key=_same,
                     per_target=4, exclude=()):
        """Distractor items: one-factor neighbours of each target first, then random items.

        Neighbours make the gallery hard (the model must see the one factor that differs); random
        items then fill it up to GALLERY_MIN images. `key` says when two items count as the same.
        """
        used = {key(t) for t in positives_items} | {key(t) for t in exclude}  # never a distractor
        out = []
        for t in positives_items:
            nb = neighbours(t, factors)
            rng.shuffle(nb)
            added = 0
            for it in nb:
                if added >= per_target:
                    break
                if key(it) not in used and it.category in spec.cats:  # stay inside the sub-dataset
                    used.add(key(it))
                    out.append(it)
                    added += 1
        need = self.n(GALLERY_MIN, 16)  # gallery images wanted (each distractor adds len(views))
        tries = 0  # a small category set may run out of unused items: stop rather than loop forever
        while n_pos_images + len(out) * len(views) < need and tries < 200000:
            tries += 1
            it = random_item(rng, list(spec.fill_cats or spec.cats))
            if key(it) not in used:
                used.add(key(it))
                out.append(it)
        return out

    def triplets(self, spec: SynthSpec, split: str, recs: list[dict]) -> None:
        """Give the records their ids and fixed leading fields; register the triplet file."""
        for i, r in enumerate(recs):
            r_ordered = {"id": f"{spec.task}_{spec.dataset}_{split}_{i + 1:07d}", "task": r.pop("task", spec.task),
                         "dataset": spec.dataset, "split": split}
            r_ordered.update(r)  # id, task, dataset, split first, as in the real files
            recs[i] = r_ordered
        self.files[f"0_triplet_files/{spec.prefix}_{spec.task}_{spec.dataset}_{split}_triplet_data.json"] = recs

    def gallery_file(self, spec: SynthSpec, paths: list[str], rng) -> None:
        """Register a test gallery, shuffled so the positives are not the first entries."""
        paths = list(paths)
        rng.shuffle(paths)
        self.files[f"0_test_candidates/{spec.prefix}_{spec.task}_{spec.dataset}_test_candidates.json"] = paths

    def instr(self, task: str, rng, **kw) -> str:
        """One of the task's instruction phrasings, filled in."""
        return rng.choice(INSTRUCTIONS[task]).format(**kw)

    # ---- per task -----------------------------------------------------------------------------
    def plan(self) -> None:
        """Every sub-dataset through its task's planner (PLANNERS below), then the two OOD tasks."""
        for spec in SYNTH_SUBSETS:
            PLANNERS[spec.task](self, spec)
        self.plan_ood()

    def _unique_targets(self, rng, spec, count, held, key=_same) -> list[Garment]:
        """`count` garments that are pairwise different under `key` (a gallery needs distinct targets)."""
        seen, out = set(), []
        for _ in range(count * 50):
            if len(out) >= count:
                break
            it = self.item(rng, spec.cats, held)
            if key(it) not in seen:
                seen.add(key(it))
                out.append(it)
        return out

    def _simple(self, spec, make_query, target_views, key=_same, factors=None):
        """Tasks of the form query(item) -> views of the same item (t2i, sketch2i, street2shop, video)."""
        rng = random.Random(f"{self.seed}|{spec.task}|{spec.dataset}")
        for split, count, held in self.splits(spec):
            # val/test targets are distinct (one positive per gallery); train may repeat a product
            items = self._unique_targets(rng, spec, count, held, key) if split != "train" else \
                [self.item(rng, spec.cats, False) for _ in range(count)]
            recs = []
            for it in items:
                r = make_query(it, rng, split)
                r["target_image"] = [self.img(v, it) for v in target_views]
                recs.append(r)
            self.triplets(spec, split, recs)
            if split == "test":  # gallery = every target view + distractor views
                pos_imgs = [p for r in recs for p in r["target_image"]]
                dis = self.gallery_fill(rng, spec, items, len(pos_imgs), target_views, factors, key)
                self.gallery_file(spec, pos_imgs + [self.img(v, it) for it in dis for v in target_views], rng)

    def plan_t2i(self, spec):
        """Caption -> product photo(s). Distractors differ in one factor, which the caption names."""
        def q(it, rng, split):
            text = caption(it, rng)
            return {"query_text": text, "instruction_text": self.instr("t2i", rng, text=text)}
        # SynGen: one text, two views (like FashionGen); SynShoes: one view
        self._simple(spec, q, ("product", "view2") if spec.dataset == "SynGen" else ("product",))

    def plan_sketch2i(self, spec):
        """Sketches -> product photo. Several sketches of one item are alternatives (the reader
        draws one), and colour is not a distinguishing factor here."""
        def q(it, rng, split):
            k = 3 if split == "train" else rng.choice((1, 2))  # several sketches = one query
            return {"query_image": [self.img("sketch", it, j) for j in range(k)],
                    "instruction_text": self.instr("sketch2i", rng)}
        # a sketch shows no colour: the gallery never holds two items that differ only in colour
        self._simple(spec, q, ("product",), key=_without_colour, factors=["category", "pattern"] + list(ATTRIBUTES))

    def plan_street2shop(self, spec):
        """Street photos (clutter, other garments, jitter) -> the clean product photo."""
        def q(it, rng, split):
            k = rng.choice((1, 1, 2, 3))  # one street photo, or several of the same garment
            return {"task": "street2shop-one-query" if k == 1 else "street2shop-multi-query",
                    "query_image": [self.img("street", it, j) for j in range(k)],
                    "instruction_text": self.instr("street2shop", rng)}
        self._simple(spec, q, ("product",))

    def plan_video2img(self, spec):
        """A clip of the item being worn -> its product photo."""
        def q(it, rng, split):
            return {"query_video": [self.img("video", it, 0)], "instruction_text": self.instr("video2img", rng)}
        self._simple(spec, q, ("product",))

    def plan_sketch_text(self, spec):
        """Sketch + colour in words -> product photo: neither part alone identifies the item."""
        def q(it, rng, split):
            text = rng.choice((f"in {it.colour}", f"coloured {it.colour}", f"and it should be {it.colour}"))
            return {"query_image": [self.img("sketch", it, 0)], "query_text": text,
                    "instruction_text": self.instr("sketch&text", rng, text=text)}
        # colour comes from the text: colour neighbours are the hardest distractors here
        self._simple(spec, q, ("product",), factors=["colour", "colour", "category", "pattern"] + list(ATTRIBUTES))

    def plan_inshop(self, spec):
        """One photo of a product -> its other photos (second view, try-on), never the query itself."""
        rng = random.Random(f"{self.seed}|{spec.task}|{spec.dataset}")
        views = ("product", "view2", "tryon")
        # (task variant, query view, target views): like DeepFashion's shop / try-on / plain shots
        variants = (("inshop", "product", ("view2", "tryon")), ("inshop-tryon", "tryon", ("product", "view2")),
                    ("inshop-plain", "view2", ("product",)))
        for split, count, held in self.splits(spec):
            items = self._unique_targets(rng, spec, count, held)
            recs, pos_imgs = [], []
            for it in items:
                task, qv, tv = rng.choice(variants)
                recs.append({"task": task, "query_image": [self.img(qv, it)],
                             "instruction_text": self.instr("inshop", rng),
                             "target_image": [self.img(v, it) for v in tv]})
                pos_imgs += recs[-1]["target_image"]
            self.triplets(spec, split, recs)
            if split == "test":  # the query photo itself is not in the gallery
                dis = self.gallery_fill(rng, spec, items, len(pos_imgs), views, per_target=1)
                self.gallery_file(spec, pos_imgs + [self.img(v, it) for it in dis for v in views], rng)

    def plan_cir(self, spec):
        """Reference photo + modification text -> the modified product (composed image retrieval)."""
        rng = random.Random(f"{self.seed}|{spec.task}|{spec.dataset}")
        for split, count, held in self.splits(spec):
            # val/test targets are distinct; train may repeat a product
            targets = self._unique_targets(rng, spec, count, held) if split != "train" else \
                [self.item(rng, spec.cats, False) for _ in range(count)]
            recs, refs = [], []
            for b in targets:  # b = the target; a = the reference, b with 1 or 2 factors changed
                facs = [f for f in item_factors(b) if len(factor_values(b, f)) > 1]
                a = b
                for f in rng.sample(facs, 2 if rng.random() < 0.25 else 1):  # 1 or 2 modified factors
                    a = _item_set(a, f, rng.choice([v for v in factor_values(b, f) if v != item_value(b, f)]))
                refs.append(a)
                text = modification_text(a, b, rng)
                recs.append({"query_image": [self.img("product", a)], "query_text": text,
                             "instruction_text": self.instr("cir", rng, text=text),
                             "target_image": [self.img("product", b)]})
            self.triplets(spec, split, recs)
            if split == "test":
                # the reference is a hard negative: cir keeps everything except the modified factor
                ref_imgs = [self.img("product", a) for a in refs if a not in set(targets)]
                dis = self.gallery_fill(rng, spec, targets, len(targets) + len(set(ref_imgs)), ("product",),
                                        exclude=refs)
                gal = [self.img("product", b) for b in targets] + ref_imgs + [self.img("product", it) for it in dis]
                self.gallery_file(spec, list(dict.fromkeys(gal)), rng)

    def outfit(self, rng, held_target: Optional[bool]) -> tuple[list[Garment], int]:
        """An outfit that obeys the rules: one item per slot, harmonious colours, <= 1 pattern.

        Returns (items, index of the target); held_target forces a held-out / seen target.
        """
        while True:
            tmpl = rng.choice(OUTFIT_TEMPLATES)
            cols = [rng.choice(sorted(COLOURS)) for _ in tmpl]  # one colour per slot
            if not colours_compatible(cols):  # rejection sampling: draw again until the colours agree
                continue
            pat_slot = rng.randrange(len(tmpl)) if rng.random() < 0.6 else -1  # the one patterned item, or none
            items = []
            for j, slot in enumerate(tmpl):
                cat = rng.choice([c for c, (s, _) in CATEGORIES.items() if s == slot])
                items.append(Garment(cat, cols[j], rng.choice(PATTERNS[1:]) if j == pat_slot else "plain",
                                     tuple(rng.choice(ATTRIBUTES[a]) for a in CATEGORIES[cat][1])))
            t = rng.randrange(len(items))  # the item the query leaves out
            if held_target is None or self.held_out(items[t]) == held_target:
                return items, t

    def incompatible(self, rng, rest, tgt, n) -> list[Garment]:
        """Items of the target's category that break a rule w.r.t. the rest of the outfit."""
        out = []
        bad_cols = [c for c in sorted(COLOURS) if not colours_compatible([i.colour for i in rest] + [c])]
        for c in rng.sample(bad_cols, min(len(bad_cols), n)):  # same item, a clashing colour
            out.append(_item_set(tgt, "colour", c))
        if any(i.pattern != "plain" for i in rest):  # a second pattern clashes
            out.append(_item_set(tgt, "pattern", rng.choice(PATTERNS[1:])))
        return out

    def plan_compatibility(self, spec):
        """The rest of an outfit -> the missing item; distractors share its category but break a rule."""
        rng = random.Random(f"{self.seed}|{spec.task}|{spec.dataset}")
        for split, count, held in self.splits(spec):
            recs, targets, dis = [], [], []
            for _ in range(count):
                items, t = self.outfit(rng, held)
                tgt, rest = items[t], items[:t] + items[t + 1:]  # the missing item; the query images
                slot = CATEGORIES[tgt.category][0]  # task suffix, like U-FIRE's "compatibility-outwear"
                recs.append({"task": f"compatibility-{slot}", "query_image": [self.img("product", i) for i in rest],
                             "instruction_text": self.instr("compatibility", rng, category=tgt.category),
                             "target_image": [self.img("product", tgt)]})
                # rule-breaking hard negatives, as U-FIRE's format allows; training does not use them
                if split == "train":
                    recs[-1]["negative_image"] = [self.img("product", i) for i in self.incompatible(rng, rest, tgt, 2)]
                targets.append(tgt)
                dis += self.incompatible(rng, rest, tgt, 3)  # gallery distractors: right slot, wrong colours
            self.triplets(spec, split, recs)
            if split == "test":
                tset = set(targets)  # an item that is some query's answer is never a distractor
                dis = [d for d in dict.fromkeys(dis) if d not in tset]
                extra = self.gallery_fill(rng, spec, [], len(set(targets)) + len(dis), ("product",),
                                          exclude=list(tset) + dis)
                gal = [self.img("product", i) for i in targets + dis + extra]
                self.gallery_file(spec, list(dict.fromkeys(gal)), rng)

    def plan_asfr(self, spec):
        """Photo + attribute name -> every gallery image with the same value of that attribute.

        Positives are a label ("SynAttr+neckline+v-neck"), not an image: the gallery file maps each
        label to its images, as the real DARN / FashionAI files do.
        """
        rng = random.Random(f"{self.seed}|{spec.task}|{spec.dataset}")
        # the attributes a query may ask about: the pattern, and every attribute some category here has
        attrs = ["pattern"] + [a for a in ATTRIBUTES if any(a in CATEGORIES[c][1] for c in spec.cats)]
        label = lambda a, v: f"{spec.dataset}+{a}+{v}"  # noqa: E731  (asfr labels: Dataset+attribute+value)

        def labels_of(it):
            vals = {"pattern": it.pattern, **item_attrs(it)}
            return [label(a, vals[a]) for a in attrs if a in vals]

        def pool(n_items, held):  # the label-keyed gallery: every image is filed under each of its labels
            items = self._unique_targets(rng, spec, n_items, held)
            by_label: dict[str, list[str]] = {}
            for it in items:
                for lab in labels_of(it):
                    by_label.setdefault(lab, []).append(self.img("product", it))
            return items, by_label

        for split, count, held in self.splits(spec):
            # pool size per split: the test pool is the gallery and must reach GALLERY_MIN
            n_pool = self.n(GALLERY_MIN, 16) if split == "test" else (self.n(200, 16) if split == "val" else self.n(400, 16))
            pitems, by_label = pool(n_pool, None if split == "train" else held)  # train draws from all products
            recs = []
            pset = set(pitems)
            for _ in range(count):
                q = self.item(rng, spec.cats, None if split == "train" else held)
                while q in pset:  # the query product itself is never in its gallery
                    q = self.item(rng, spec.cats, None if split == "train" else held)
                a = rng.choice([x for x in attrs if x == "pattern" or x in item_attrs(q)])
                v = q.pattern if a == "pattern" else item_attrs(q)[a]
                lab = label(a, v)
                pos = by_label.get(lab, [])  # every pool image with this attribute value
                # same attribute, another value: what the model must not confuse with the answer
                others = [p for lb in sorted(by_label) if lb.startswith(f"{spec.dataset}+{a}+") and lb != lab
                          for p in by_label[lb]]
                view = rng.choice(("product", "tryon"))  # the query photo: flat or worn
                r = {"query_image": [self.img(view, q)], "attribute": a, "target_label": lab,
                     "instruction_text": self.instr("asfr", rng, attribute=a),
                     "target_image": rng.sample(pos, min(5, len(pos))) if split == "train" else list(pos[:3])}
                if not r["target_image"]:  # no pool image has this value: drop the query
                    continue
                if others:  # negative_image: written as the format allows, not used by training
                    r["negative_image"] = rng.sample(others, min(3, len(others)))
                recs.append(r)
            self.triplets(spec, split, recs)
            if split != "train":  # label-keyed gallery, plus the special full-gallery key
                gal = {lb: by_label[lb] for lb in sorted(by_label)}
                full = [self.img("product", it) for it in pitems]
                rng.shuffle(full)
                gal[f"{spec.dataset}_asfr_{split}_candidate"] = full
                folder = "0_test_candidates" if split == "test" else "0_triplet_files"
                self.files[f"{folder}/{spec.prefix}_asfr_{spec.dataset}_{split}_candidate_data.json"] = gal

    def plan_ood(self):
        """The two evaluation-only tasks, each in its own folder with image paths relative to it."""
        # Image(s)+Text 2 Compatible Item: outfit images + a text describing the wanted item
        name = OOD_TASKS[0]
        folder = f"evaluation_only_tasks/{name}"
        rng = random.Random(f"{self.seed}|ood|{name}")
        recs, gal, targets = [], [], []
        for i in range(self.n(150, 8)):
            items, t = self.outfit(rng, True)
            tgt, rest = items[t], items[:t] + items[t + 1:]
            text = caption(tgt, rng).removeprefix("a ")  # fills "find compatible {text} ..."
            q = [self.img("product", it, folder=folder) for it in rest]
            recs.append({"id": f"{i + 1:07d}", "query_image": [os.path.basename(p) for p in q], "query_text": text,
                         "instruction_text": self.instr(name, rng, text=text),
                         "target_image": [os.path.basename(self.img("product", tgt, folder=folder))],
                         "category": CATEGORIES[tgt.category][0]})
            gal += recs[-1]["query_image"] + recs[-1]["target_image"]  # real file also lists query items
            targets.append(tgt)
        # distractors from every category (a throwaway spec), 2 one-factor neighbours per target
        dis = self.gallery_fill(rng, SynthSpec("", "", 0, tuple(CATEGORIES), 0, 0), targets, len(gal),
                                ("product",), per_target=2)
        gal += [os.path.basename(self.img("product", it, folder=folder)) for it in dis]
        self.files[f"{folder}/triplet_data.json"] = recs
        self.files[f"{folder}/candidate_images.json"] = list(dict.fromkeys(gal))
        # Street+Modification Text 2 Shop: street photo of A + modification text -> shop image of B
        name = OOD_TASKS[1]
        folder = f"evaluation_only_tasks/{name}"
        rng = random.Random(f"{self.seed}|ood|{name}")
        spec = SynthSpec("", "", 0, _CLOTHES, 0, 0)  # street photos of clothes only
        recs, targets, refs = [], [], []
        for i, b in enumerate(self._unique_targets(rng, spec, self.n(120, 8), True)):
            f = rng.choice([f for f in item_factors(b) if len(factor_values(b, f)) > 1])  # one factor changes
            a = _item_set(b, f, rng.choice([v for v in factor_values(b, f) if v != item_value(b, f)]))
            text = modification_text(a, b, rng)
            recs.append({"id": f"{i + 1:07d}",
                         "query_image": [os.path.basename(self.img("street", a, 0, folder=folder))],
                         "query_text": text, "instruction_text": self.instr(name, rng, text=text),
                         "target_image": [os.path.basename(self.img("product", b, folder=folder))],
                         "category": b.category})
            targets.append(b)
            refs.append(a)
        # the street item's own shop photo is in the gallery as a hard negative, like cir's reference
        dis = self.gallery_fill(rng, spec, targets, len(targets) + len(refs), ("product",), exclude=refs)
        gal = [os.path.basename(self.img("product", it, folder=folder)) for it in targets + refs + dis]
        gal = list(dict.fromkeys(gal))
        rng.shuffle(gal)
        self.files[f"{folder}/triplet_data.json"] = recs
        self.files[f"{folder}/candidate_images.json"] = gal


# The dispatch table: task word -> the planner that writes that task's sub-datasets.
PLANNERS = {
    "t2i": _Planner.plan_t2i,
    "sketch2i": _Planner.plan_sketch2i,
    "street2shop": _Planner.plan_street2shop,
    "inshop": _Planner.plan_inshop,
    "video2img": _Planner.plan_video2img,
    "sketch&text": _Planner.plan_sketch_text,
    "cir": _Planner.plan_cir,
    "compatibility": _Planner.plan_compatibility,
    "asfr": _Planner.plan_asfr,
}
TASK_WORDS = tuple(PLANNERS)  # equals data.TASK_WORDS (a test checks it)


# ============================================================================================
# Writing the folder
# ============================================================================================

# The repository root (this file sits in support/): relative data paths are taken from here.
REPO = Path(__file__).resolve().parents[1]
INFO_FILE = "synthetic_info.json"  # the completion stamp: (version, seed, scale) and record counts


class SyntheticError(FashionLensError, ValueError):
    """The target folder holds something that is not a synthetic U-FIRE (nothing is overwritten)."""


def generate_synthetic(out, seed: int = 0, scale: float = 1.0, workers: Optional[int] = None,
                       verbose: bool = True) -> dict:
    """Write a synthetic U-FIRE to `out` atomically (plumbing.atomic_write); return its summary.

    The bytes depend only on (seed, scale): every file's random stream is seeded from its own
    path, JSON is written in a fixed order and PNGs with fixed save parameters, so the number of
    worker processes does not matter.
    """
    from support.plumbing import atomic_write  # plumbing loads torch; drawing the set needs only Pillow

    out = os.path.abspath(str(out))
    t0 = time.time()
    plan = _Planner(seed, scale)
    plan.plan()  # every record and gallery in memory, every image as a job; nothing drawn yet
    counts = {f"{s.task}/{s.dataset}":  # records per split, read back from the planned files
              {sp: len(plan.files[f"0_triplet_files/{s.prefix}_{s.task}_{s.dataset}_{sp}_triplet_data.json"])
               for sp in _SPLITS} for s in SYNTH_SUBSETS}
    info = {"version": SYN_VERSION, "seed": seed, "scale": scale, "images": len(plan.jobs), "subsets": counts}

    def build(tmp: Path) -> None:
        """Every image, then every JSON file, then the stamp, into the fresh folder `tmp`."""
        jobs = [(str(tmp), seed, rel, plan.jobs[rel]) for rel in sorted(plan.jobs)]
        for d in sorted({os.path.dirname(os.path.join(tmp, j[2])) for j in jobs}):  # folders first,
            os.makedirs(d, exist_ok=True)                                            # so workers never race
        n_workers = workers or min(2, os.cpu_count() or 1)  # default: at most 2 processes
        chunks = [jobs[i::64] for i in range(64)]  # interleaved chunks balance the cost
        if n_workers > 1:
            import multiprocessing as mp
            # fork: workers start with this module already loaded; spawn where fork does not exist
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            with ctx.Pool(n_workers) as pool:
                for _ in pool.imap_unordered(_render_chunk, chunks):
                    pass
        else:
            for c in chunks:
                _render_chunk(c)
        for rel in sorted(plan.files):  # one JSON layout (indent 1, UTF-8 as is) for every file
            p = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "w", encoding="utf-8") as f:
                json.dump(plan.files[rel], f, indent=1, ensure_ascii=False)
                f.write("\n")
        with open(os.path.join(tmp, INFO_FILE), "w", encoding="utf-8") as f:  # written last: the stamp
            json.dump(info, f, indent=1, sort_keys=True)

    atomic_write(out, build)  # readers see the old folder or the complete new one, never a half
    if verbose:
        print(f"synthetic U-FIRE (seed {seed}, scale {scale}): {len(plan.jobs)} images, "
              f"{len(plan.files)} JSON files -> {out} in {time.time() - t0:.1f}s")
    return info


def ensure_synthetic(path="data/synthetic", seed: int = 0, scale: float = 1.0) -> str:
    """Generate the synthetic U-FIRE once if absent (or made with another seed/scale); return the root.

    A relative path is taken relative to the repository (REPO: so notebooks in notebooks/ and scripts
    run from elsewhere share the same data/synthetic).
    """
    p = Path(path)
    if not p.is_absolute():
        p = REPO / p
    info = p / INFO_FILE
    if info.is_file():  # reuse only a set made by this version with the same seed and scale
        try:
            meta = json.loads(info.read_text())
            if (meta.get("seed"), meta.get("scale"), meta.get("version")) == (seed, scale, SYN_VERSION):
                return str(p)
        except (ValueError, OSError, AttributeError, RecursionError):  # bad JSON, not an object, absurdly nested
            pass  # a damaged stamp: write the set again
    elif p.exists() and any(p.iterdir()):  # never replace a folder this generator did not write
        raise SyntheticError(f"{p} exists but is not a synthetic U-FIRE (no {INFO_FILE}); "
                             "remove it or pick another path")
    generate_synthetic(p, seed, scale)
    return str(p)


def resolve_root(spec: str, di) -> str:
    """train.py's --data: 'synthetic' -> generate data/synthetic once (rank 0 first, `di` a
    plumbing.DistInfo); a path must exist."""
    from support.plumbing import barrier

    if spec == "synthetic":
        if di.main:
            root = ensure_synthetic("data/synthetic")
        barrier(di)
        if not di.main:
            root = ensure_synthetic("data/synthetic")  # already there: just returns the path
        return str(Path(root).resolve())
    if not Path(spec).is_dir():
        raise SystemExit(f"error: --data {spec}: no such directory (a U-FIRE root, or 'synthetic')")
    return str(Path(spec).resolve())


def main(argv=None) -> int:
    """python -m support.synthetic [--out data/synthetic] [--seed 0] [--scale 1.0] [--workers N]

    Exit 0; 1 with one `error:` line for a bad flag or an --out that is not ours to replace
    (errors.run_cli). Only a folder this generator wrote (it holds INFO_FILE) is ever replaced.
    """
    return run_cli(_cli, argv)


def _cli(argv) -> int:
    """Check the flags and the target folder, then write the set (see `main`)."""
    ap = argparse.ArgumentParser(description="Write the synthetic U-FIRE (U-FIRE's layout, drawn offline).")
    ap.add_argument("--out", default="data/synthetic", help="folder to write (replaced atomically)")
    ap.add_argument("--seed", type=int, default=0, help="the data seed; the bytes depend only on seed and scale")
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies every split and gallery size (> 0)")
    ap.add_argument("--workers", type=int, default=None, help="drawing processes (default: min(2, CPUs))")
    a = ap.parse_args(argv)
    if not (math.isfinite(a.scale) and a.scale > 0):  # sizes are floored, so 0 or -1 would "work"
        raise FashionLensError(f"--scale {a.scale}: must be a positive number (1.0 = the default sizes)")
    if a.workers is not None and a.workers < 1:
        raise FashionLensError(f"--workers {a.workers}: must be at least 1")
    out = os.path.abspath(a.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise SyntheticError(f"--out {out} is a file; nothing was overwritten: pick a folder path")
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, INFO_FILE)):
        raise SyntheticError(f"--out {out} exists but is not a synthetic U-FIRE (no {INFO_FILE}); "
                             "nothing was overwritten: remove it or pick another path")
    try:
        generate_synthetic(out, a.seed, a.scale, a.workers)
    except OSError as e:  # e.g. a read-only parent: atomic_write left any old set untouched
        raise SyntheticError(f"--out {out}: cannot write the set ({e.strerror or e})") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
