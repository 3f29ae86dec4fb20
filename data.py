"""U-FIRE data layer (SKELETON - being filled in; the names below are the shared contract).

Shape legend: B batch, L sequence, D hidden, G gallery, r rank, T tasks.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from PIL import Image

# The 9 U-FIRE task words; suffixed variants ("inshop-tryon") map to the word before the "-".
TASK_WORDS = ("t2i", "sketch2i", "street2shop", "inshop", "video2img",
              "sketch&text", "cir", "compatibility", "asfr")
# The 2 manually curated out-of-distribution tasks (folder names under evaluation_only_tasks/).
OOD_TASKS = ("Image(s)+Text 2 Compatible Item", "Street+Modification Text 2 Shop")


class UFireError(ValueError):
    """Bad input: the message always names the file and the record id/index."""


@dataclass
class Record:
    """One U-FIRE triplet, every field of FORMAT.md plus where it came from."""
    id: str
    instruction_text: str
    target_image: list[str]
    task: str = ""
    dataset: str = ""
    split: str = ""
    query_text: Optional[str] = None
    query_image: list[str] = field(default_factory=list)
    query_video: list[str] = field(default_factory=list)
    negative_image: list[str] = field(default_factory=list)
    attribute: Optional[str] = None
    target_label: Optional[str] = None
    category: Optional[str] = None
    # provenance (not in the JSON)
    root: str = ""       # directory the image paths are relative to
    source: str = ""     # JSON file the record was read from
    index: int = -1      # position in that file
    subset: str = ""     # "task/dataset", e.g. "cir/FashionIQ-Dress"; OOD: "ood/<Task name>"


@dataclass
class Query:
    """A query as the model sees it: instruction text, then images, then video frames."""
    instruction: str
    images: list[Image.Image] = field(default_factory=list)
    frames: list[Image.Image] = field(default_factory=list)
