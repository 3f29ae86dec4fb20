"""FashionLens embedding model: one multimodal LLM turns any fashion query, and any gallery image, into
a unit vector, so that retrieval is a dot product.

Concept (Wen et al., 2026, "Toward Versatile Fashion Image Retrieval via Task-Adaptive Learning").
A Qwen-VL chat model reads a prompt whose assistant turn is a single learnable *summary token*. The
model has been asked to "summarise in one word", so its last hidden state at that token is pushed to
hold the whole request; L2-normalised, that state is the embedding:

    prompt_q = system("fashion expert") + user(instruction, query images, video,
               "summarise the target image in one word") + assistant(<|query|>)
    prompt_t = system("fashion expert") + user(gallery image, "summarise the image in one word")
               + assistant(<|target|>)

    (1)  h_q   = LLM(prompt_q)[pos(<|query|>)]                    (B, D)  query summary state
    (2)  q_raw = h_q / ||h_q||                                    (B, D)  uncalibrated query
    (3)  q     = PGSQC(h_q)   (calibrator.py; q = q_raw when off)  (B, D)  calibrated query
    (4)  t     = h_t / ||h_t||,  h_t = LLM(prompt_t)[pos(<|target|>)]      (G, D)  gallery item
    (5)  score(q, t) = q . t                                      cosine similarity of unit vectors

Only queries pass the calibrator, so the gallery is encoded once and cached (evaluate.py).

Prompts (the authors' own, for every backbone, the tiny one included; dataset.py FashionCollator and
evaluate.py / test.py collators): the system turn "You are a fashion expert in processing fashion
images."; the query's user turn is the instruction, each query image, the video, then "Summarize the
semantic feature of the target fashion image in one word."; the target's user turn is the image, then
"Summarize the image in one word.". The strings are what Qwen-VL's chat template renders for the
authors' message lists (content parts concatenated with no separator). That rendering also ends with
"<|im_end|>\n" after the summary token; under causal attention a token never sees the tokens after
it, so those two cannot change h, and our prompts end at the summary token.

The summary tokens <|query|> and <|target|> are nn.Parameters of width D, both initialised from the
embedding of `<|im_end|>` (the authors' model.py 148-155). They are added to the tokenizer as special
tokens and their slots in the input embeddings are overwritten (`inputs_embeds`), so gradients reach
them while the embedding table itself stays frozen. Their gradient norm is GGAS's task-difficulty
signal (sampler.py, via token_parameters()).

Images go through the backbone's own Qwen image processor at their native size: its smart_resize
rounds both sides to multiples of patch x merge and keeps the aspect ratio, within a pixel budget
[min_pixels, max_pixels] (the recipe's: 224^2..256^2 for `paper`, as the authors' collators). So a
640x480 photo keeps its landscape shape, and images of one batch may have different token counts.

Video goes through Qwen's video input, built here from the frames because the stock video processors
need torchvision: num_frames frames, each resized to video_size x video_size (rounded to patch x
merge; the authors: 8 frames at 224 x 224, dataset.py 362), normalised like an image, padded by
repeating the last frame to a multiple of the temporal patch, then cut into the same patch layout as
Qwen's processors -> pixel_values_videos / video_grid_thw (t = frames / temporal patch). Qwen3-VL's
prompt writes each temporal group's time before it ("<0.2 seconds><|vision_start|>pads<|vision_end|>"
per group, the mean time of the group's first and last frame); Qwen2-VL and Qwen2.5-VL read one
<|vision_start|>pads<|vision_end|> block, Qwen2.5-VL spacing its temporal positions by the seconds
each temporal patch spans.

What trains: LoRA (peft) on the language model's q/k/v/o/gate/up/down projections, the two summary
tokens and the calibrator, always. A pretrained vision tower stays frozen (it already sees well and is
the part most easily damaged). The random tiny vision tower is trainable (train_vision="auto"), at a
10x smaller learning rate (train.py's vision_lr_scale), because at the adapters' rate it soon keeps only
colour (the cue most tasks share) and forgets the garment's shape, which sketch, outfit and attribute
queries need.

Batch independence: sequences are right-padded and attention is causal, and the summary token is the
last real token, so padding never reaches it; mRoPE position ids come from the backbone's own
get_rope_index with the attention mask; the vision tower attends within each image / video only.

Backbones (one code path, told apart by the config's `model_type`): any Qwen2-VL / Qwen2.5-VL /
Qwen3-VL hub id (already in the local Hugging Face cache) or local folder in the hub's layout (the
paper: Qwen3-VL-4B-Instruct), or an offline random "tiny" one (tiny_backbone.py, the default, so
everything runs on a CPU with no download). Nothing here touches the network. Per-recipe defaults
(pixel budget, frames, query images, LoRA dropout) come from recipes.py.

Inputs: collate_queries / collate_images turn items into ModelInputs (token ids, mask, mRoPE
positions, image and video patches), and forward reads those tensors; a plain list is collated on the
spot. The collators touch no trainable weight, so train.py runs them ahead on the spare core.

Where it sits: data.py makes Query objects and images -> **model.py embeds them** -> train.py (InfoNCE
+ GradCache + GGAS) and evaluate.py (faiss Recall@K) use the vectors.
Run: `python model.py` builds the tiny embedder (no network) and prints a similarity matrix.
Shapes: B queries, G gallery images, L sequence length, D hidden size, V vocabulary size,
N image patches (all images of a batch), n_img images in a batch, Nv video patches, n_vid videos,
k frames of a video, T frames per temporal patch, t temporal groups (k / T, rounded up), p pixels per
patch side, m patches merged per token side, C*T*p*p values per patch.
"""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
import hashlib
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import data
from support import plumbing
from support import recipes
from support.errors import BackboneError, CheckpointError, EmbedderConfigError, FashionLensError
from support.tiny_backbone import (CHAT_TEMPLATE, TINY_TYPES, build_image_processor, build_tiny_tokenizer,
                           processor_class, tiny_backbone_config, vision_geometry)

# Architectures the embedder knows how to drive (their get_rope_index and vision tower API).
SUPPORTED_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# Where the summary tokens start (EmbedderConfig.summary_init).
SUMMARY_INITS = ("im_end", "words")
# The checkpoint layout and prompts of this version; older formats are refused (from_pretrained).
CHECKPOINT_FORMAT = 2


@dataclass
class EmbedderConfig:
    """Everything needed to rebuild the embedder; saved as JSON inside each checkpoint.

    A field left at None takes the value of the recipe (recipes.py): `recipe`="auto" picks `tiny-cpu`
    for the tiny backbones and `paper` (the authors' values) for a real Qwen-VL. The embedder resolves
    them when it is built (resolve_config), so a checkpoint's config holds the numbers it used.
    """
    backbone: str = "tiny"          # "tiny" | "tiny-qwen2-vl" | hub id | local path; tiny = offline CPU default
    seed: int = 0                   # seeds the random tiny base (seed), the LoRA init (+1), the calibrator (+2)
    recipe: str = "auto"            # "auto" | "paper" | "tiny-cpu": where the None fields below come from
    # Pixel budget of an image: Qwen's smart_resize keeps the aspect ratio and rounds the sides to
    # multiples of patch x merge; a larger image shrinks to at most max_pixels, a smaller one grows to
    # at least min_pixels. Visual tokens per image = pixels / (patch x merge)^2.
    min_pixels: Optional[int] = None
    max_pixels: Optional[int] = None
    max_query_images: Optional[int] = None  # images per query prompt (the first ones at eval); 0 = all
    query_sketches: Optional[str] = None    # "all": an item's sketches in one prompt; "one": one per prompt
    num_frames: Optional[int] = None        # frames of a video query (sampled evenly over the clip)
    video_size: Optional[int] = None        # each frame resized to video_size^2 (rounded to patch x merge)
    lora_r: int = 8                 # LoRA rank (paper: 8)
    lora_alpha: int = 16            # LoRA scale numerator (paper: 16, i.e. scale alpha / r = 2)
    lora_dropout: Optional[float] = None  # dropout on the LoRA input (0 on a tiny CPU model: see recipes.py)
    # Where the two summary tokens start: "im_end" = both at <|im_end|>'s embedding (the authors), "words"
    # = <|query|> at " word"'s, <|target|> at " item"'s (tiny-cpu: a random model needs them apart)
    summary_init: Optional[str] = None
    calibrator: str = "slerp"       # PGSQC mode: slerp (paper) | linear (ablation) | off (identity)
    calibrator_rank: int = 32       # rank r of the calibrator's per-query low-rank map (paper: 32)
    calibrator_hidden: int = 512    # hidden width of the calibrator's hyper-network (paper: 512)
    dtype: str = "auto"             # auto: float32 on CPU (exactness), bfloat16 on GPU (memory/speed)
    attn_implementation: str = "sdpa"  # torch's fused attention; "eager" for debugging
    device: str = "auto"            # auto: cuda if available else cpu
    # auto: train a random tiny vision tower in full, freeze a pretrained one; "true"/"false" force it
    train_vision: str = "auto"
    tiny_vocab_size: int = 1536     # BPE vocabulary of the offline tokenizer (its fashion corpus is small)


def resolve_config(config: EmbedderConfig) -> EmbedderConfig:
    """`config` with every None field set to its recipe's value and `recipe` to the recipe's name
    (recipes.recipe_values); a value no embedder can use raises EmbedderConfigError naming it."""
    try:
        name = recipes.recipe_name(config.recipe, config.backbone)
    except ValueError as e:
        raise EmbedderConfigError(f"EmbedderConfig.recipe: {e}") from None
    values = recipes.recipe_values(name, config.backbone, "embedder")
    config = replace(config, recipe=name, **{k: v for k, v in values.items() if getattr(config, k) is None})
    if config.backbone not in TINY_TYPES and Path(config.backbone).expanduser().is_dir():
        # A local folder is saved as an absolute path: a checkpoint trained with `--backbone ../qwen`
        # must still find its backbone when evaluated from another working directory.
        config = replace(config, backbone=str(Path(config.backbone).expanduser().resolve()))
    c = config
    problems = [msg for bad, msg in (
        (c.min_pixels < 1 or c.max_pixels < c.min_pixels,
         f"min_pixels={c.min_pixels}, max_pixels={c.max_pixels}: need 1 <= min_pixels <= max_pixels"),
        (c.max_query_images < 0, f"max_query_images={c.max_query_images}: must be >= 0 (0 = all)"),
        (c.query_sketches not in data.SKETCH_MODES, f"query_sketches={c.query_sketches!r}: expected one of {data.SKETCH_MODES}"),
        (c.num_frames < 1, f"num_frames={c.num_frames}: must be >= 1"),
        (c.video_size < 1, f"video_size={c.video_size}: must be >= 1"),
        (not 0 <= c.lora_dropout < 1, f"lora_dropout={c.lora_dropout}: must be in [0, 1)"),
        (c.summary_init not in SUMMARY_INITS, f"summary_init={c.summary_init!r}: expected one of {SUMMARY_INITS}"),
    ) if bad]
    if problems:
        raise EmbedderConfigError("EmbedderConfig: " + "; ".join(problems))
    return config


# The prompt pieces (the authors' sentences, dataset.py FashionCollator). They are part of the model: a
# checkpoint only works with the prompts it was trained on. Our two learnable summary tokens are added
# to the tokenizer as special tokens, so BPE never splits them.
QUERY_TOKEN, TARGET_TOKEN = "<|query|>", "<|target|>"
SYSTEM_PROMPT = "You are a fashion expert in processing fashion images."
QUERY_CLOSING = "Summarize the semantic feature of the target fashion image in one word."
TARGET_CLOSING = "Summarize the image in one word."
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"   # one visual token's placeholder
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
# An image / a video part as the chat template writes it, before the pads are expanded.
IMAGE_PART = VISION_START + IMAGE_PAD + VISION_END
VIDEO_PART = VISION_START + VIDEO_PAD + VISION_END


def _chat(user: str, summary_token: str) -> str:
    """The ChatML prompt: system turn, user turn, then the assistant turn up to the summary token."""
    return (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            f"<|im_start|>assistant\n{summary_token}")


@dataclass
class ModelInputs:
    """A batch of prompts as the backbone reads them: what the collators (collate_queries /
    collate_images) produce and forward consumes. Plain CPU tensors, so a worker can build them."""
    input_ids: torch.Tensor                 # (B, L) token ids, right-padded
    attention_mask: torch.Tensor            # (B, L) 1 = real token, 0 = padding
    position_ids: torch.Tensor              # (3, B, L) mRoPE positions (time, height, width)
    pixel_values: Optional[torch.Tensor]    # (N, C*T*p*p) patches of the batch's images in prompt order; None: none
    image_grid_thw: Optional[torch.Tensor]  # (n_img, 3) each image's patch grid (1, h, w); None: no image
    summary_index: torch.Tensor             # (B,) position of the summary token (<|query|> / <|target|>) per row
    images_per_row: torch.Tensor            # (B,) images in each row's prompt
    pixel_values_videos: Optional[torch.Tensor] = None  # (Nv, C*T*p*p) patches of the batch's videos; None: none
    video_grid_thw: Optional[torch.Tensor] = None       # (n_vid, 3) each video's grid (frames / T, h, w)
    videos_per_row: Optional[torch.Tensor] = None       # (B,) videos in each row's prompt (0 or 1); None: all 0

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, start: int, end: int) -> "ModelInputs":
        """Rows start:end as a batch of their own (their images and videos only, padding cut to their
        longest row): the same tensors that collating those rows alone would give
        (tests/test_fast_paths.py)."""
        if start == 0 and end == len(self):
            return self
        pixels, grid = _slice_visual(self.pixel_values, self.image_grid_thw, self.images_per_row, start, end)
        vpixels, vgrid = _slice_visual(self.pixel_values_videos, self.video_grid_thw, self.videos_per_row,
                                       start, end)
        length = int(self.attention_mask[start:end].sum(dim=1).max())  # the slice's longest real row
        return ModelInputs(input_ids=self.input_ids[start:end, :length],              # (b, L')
                           attention_mask=self.attention_mask[start:end, :length],    # (b, L')
                           position_ids=self.position_ids[:, start:end, :length],     # (3, b, L')
                           pixel_values=pixels, image_grid_thw=grid,
                           summary_index=self.summary_index[start:end],               # (b,)
                           images_per_row=self.images_per_row[start:end],             # (b,)
                           pixel_values_videos=vpixels, video_grid_thw=vgrid,
                           videos_per_row=None if self.videos_per_row is None else self.videos_per_row[start:end])


def _slice_visual(pixels: Optional[torch.Tensor], grid: Optional[torch.Tensor], per_row: Optional[torch.Tensor],
                  start: int, end: int):
    """The patches and grids of rows start:end, from a batch's (N, .) patches, (n, 3) grids and (B,)
    counts per row; (None, None) when those rows hold none."""
    if per_row is None or grid is None:
        return None, None
    counts = per_row.tolist()
    i0, i1 = sum(counts[:start]), sum(counts[:end])                 # this slice's images / videos
    if i1 == i0:
        return None, None
    patches = grid.prod(dim=-1).tolist()                            # (n,) patches of each
    p0, p1 = sum(patches[:i0]), sum(patches[:i1])
    return pixels[p0:p1], grid[i0:i1]                               # (N', .), (n', 3)


class _Prompt(NamedTuple):
    """One row before collation: which prompt, and the pictures that fill its placeholders."""
    kind: str                  # "query" (prompt_q) | "target" (prompt_t)
    instruction: str           # the query's instruction ("" for a target)
    images: list               # PIL images (or paths), in prompt order
    frames: list               # the video's frames ([] = no video)
    frame_times: list          # seconds of each frame in its clip


class _Video(NamedTuple):
    """One video as the backbone reads it (made by FashionLensEmbedder._video)."""
    patches: np.ndarray        # (Nv, C*T*p*p) float32 patches in Qwen's video layout
    grid: tuple                # (t, h, w): temporal groups, patch rows, patch columns
    group_times: list          # (t,) seconds of each temporal group (mean of its first and last frame)
    seconds_per_group: float   # seconds one temporal group spans (Qwen2.5-VL's second_per_grid_ts)


def _slot_index(slot: torch.Tensor) -> torch.Tensor:
    """(B, L) bool with exactly one True per row -> (B,) int64 position of that True."""
    return slot.float().argmax(dim=1)  # (B,) argmax of a 0/1 row = its first (only) 1


def encode_threads(device: torch.device) -> int:
    """Threads that encode batches side by side: one per core when torch itself runs one thread on
    a CPU (a small model, see plumbing.set_cpu_threads); else 1, and torch splits each op instead."""
    if device.type != "cpu" or torch.get_num_threads() > 1:
        return 1
    return max(1, min(2, os.cpu_count() or 1))


class FashionLensEmbedder(nn.Module):
    """Qwen-VL + LoRA + learnable query/target summary tokens + optional PGSQC calibrator.

    forward(queries=None, images=None) -> dict(q, q_raw, lam, reg, t) with gradients (training);
    encode_queries / encode_images -> float32 CPU tensors, no grad, eval mode, batched (inference).
    Construction (__init__) comes after the computation below; read it second.
    """

    # ==============================================================================================
    # Prompts: the chat strings of prompt_q and prompt_t
    # ==============================================================================================
    def render_query(self, instruction: str, n_images: int = 0, n_frames: int = 0) -> str:
        """prompt_q as the chat template writes it (one placeholder per image, one per video; a query
        has a video when n_frames > 0), ending with the query token. The instruction goes in as
        given, directly followed by the images, the video and the closing sentence."""
        return _chat(instruction + IMAGE_PART * n_images + (VIDEO_PART if n_frames else "") + QUERY_CLOSING,
                     QUERY_TOKEN)

    def render_target(self) -> str:
        """prompt_t as the chat template writes it, ending with the target token."""
        return _chat(IMAGE_PART + TARGET_CLOSING, TARGET_TOKEN)

    def _image_block(self, grid) -> str:
        """One image with its pads expanded: (h x w patches) / merge^2 visual tokens."""
        t, h, w = (int(v) for v in grid)
        return VISION_START + IMAGE_PAD * (t * h * w // self.merge_size ** 2) + VISION_END

    def _video_block(self, video: "_Video") -> str:
        """One video with its pads expanded, as each architecture's processor writes it.

        Qwen3-VL: per temporal group "<t seconds>" + <|vision_start|> + its pads + <|vision_end|>, in
        place of the template's whole <|vision_start|><|video_pad|><|vision_end|>: what transformers'
        Qwen3VLProcessor wrote when Qwen3-VL was released (4.57, the authors' era) and what vLLM
        renders. (transformers 5.x replaces only the <|video_pad|>, leaving the template's outer
        <|vision_start|> ... <|vision_end|> around the groups.) Qwen2-VL / Qwen2.5-VL: one block of
        every group's pads.
        """
        t, h, w = video.grid
        per_group = h * w // self.merge_size ** 2                    # visual tokens of one temporal group
        if self.model_type == "qwen3_vl":
            return "".join(f"<{s:.1f} seconds>" + VISION_START + VIDEO_PAD * per_group + VISION_END
                           for s in video.group_times)
        return VISION_START + VIDEO_PAD * (t * per_group) + VISION_END

    def _prompt_text(self, p: "_Prompt", image_grids, video: Optional["_Video"]) -> str:
        """The expanded text of one row: render_query / render_target with every placeholder replaced
        by its visual tokens (image_grids: (n, 3) grids of the row's images, in order)."""
        images = "".join(self._image_block(g) for g in image_grids)
        if p.kind == "target":
            return _chat(images + TARGET_CLOSING, TARGET_TOKEN)
        return _chat(p.instruction + images + (self._video_block(video) if video else "") + QUERY_CLOSING,
                     QUERY_TOKEN)

    def image_tokens(self, width: int, height: int) -> int:
        """Visual tokens of a width x height image at this embedder's pixel budget (what the processor's
        smart_resize gives, divided by the merge^2 patches each token pools)."""
        patches = self.image_processor.get_number_of_image_patches(height, width, {})  # (h/p) (w/p)
        return patches // self.merge_size ** 2

    def query_options(self) -> dict:
        """The query options of this embedder's recipe, as keyword arguments of data.UFire.train_view:
        max_images, num_frames, sketches, and with sketches="all" the authors' per-sub-dataset training
        caps (recipes.TRAIN_QUERY_IMAGE_CAP). Images stay at their native size (no image_size)."""
        c = self.config
        caps = dict(recipes.TRAIN_QUERY_IMAGE_CAP) if c.query_sketches == "all" else None
        return {"max_images": c.max_query_images, "num_frames": c.num_frames, "sketches": c.query_sketches,
                "image_caps": caps}

    def _prep_image(self, img) -> Image.Image:
        """PIL or path -> RGB at its native size (the image processor resizes it within the budget)."""
        if isinstance(img, (str, os.PathLike)):
            return data.load_image(str(img))
        return img if img.mode == "RGB" else data.to_rgb(img)

    def _as_query(self, item) -> "_Prompt":
        """Query | Record | str -> the query's prompt row within the configured caps.

        A Record becomes its deterministic evaluation query (data.record_to_query, rng=None). A Query
        keeps its first max_query_images images (0: all) and, when its clip has more than num_frames
        frames, num_frames of them evenly spaced (the first and last included). Frames without times
        are taken at data.FRAME_LIST_FPS frames per second.
        """
        c = self.config
        if isinstance(item, str):
            return _Prompt("query", item, [], [], [])
        if not hasattr(item, "instruction"):  # a data.Record: build its deterministic eval query
            item = data.record_to_query(item, None, c.max_query_images, c.num_frames, sketches=c.query_sketches)
        images = list(item.images)[: c.max_query_images or None]
        frames = list(getattr(item, "frames", []) or [])
        times = [float(s) for s in (getattr(item, "frame_times", None) or [])]
        if times and len(times) != len(frames):
            raise ValueError(f"query {item.instruction[:60]!r}: {len(frames)} frames but "
                             f"{len(times)} frame_times")
        times = times or [i / data.FRAME_LIST_FPS for i in range(len(frames))]
        n = c.num_frames
        if len(frames) > n:  # uniform subsample keeps the order and the whole clip's span
            keep = [round(i * (len(frames) - 1) / max(n - 1, 1)) for i in range(n)]
            frames, times = [frames[k] for k in keep], [times[k] for k in keep]
        return _Prompt("query", item.instruction, images, frames, times)

    # ==============================================================================================
    # Collators: prompts + images -> the tensors the backbone reads (ModelInputs). They touch no
    # trainable weight, so train.py prepares the next batch during a step (prefetch.py), and the
    # encoder collates one batch while another computes.
    # ==============================================================================================
    def collate_queries(self, queries: Sequence) -> "ModelInputs":
        """B queries (Query | Record | str) -> ModelInputs of prompt_q; images first, then the video."""
        return self._collate([self._as_query(q) for q in queries])

    def collate_images(self, images: Sequence) -> "ModelInputs":
        """G gallery images (PIL | path) -> ModelInputs of prompt_t, one prompt per image.

        Fast path: when every image of the batch has the same patch grid (the same size after
        smart_resize: every synthetic image, and most photos of one source), every row is the same
        prompt, so its token ids and mRoPE positions are computed once per grid, cached, and repeated;
        only the pixels differ from row to row. Mixed grids are collated row by row (_assemble).
        """
        prompts = [_Prompt("target", "", [im], [], []) for im in images]
        pixels, grid = self._pixels([im for p in prompts for im in p.images])  # (N, C*T*p*p), (G, 3)
        if grid is None or not bool((grid == grid[:1]).all()):
            return self._assemble(prompts, pixels, grid)
        key = tuple(grid[0].tolist())                                # (t, h, w) of every image
        if key not in self._target_rows:
            one = self._assemble(prompts[:1], pixels[: int(grid[0].prod())], grid[:1])
            self._target_rows[key] = (one.input_ids, one.attention_mask, one.position_ids)  # (1, L) x2, (3, 1, L)
        ids, attn, pos = self._target_rows[key]
        g = len(prompts)
        return ModelInputs(input_ids=ids.repeat(g, 1), attention_mask=attn.repeat(g, 1),  # (G, L) each
                           position_ids=pos.repeat(1, g, 1), pixel_values=pixels,          # (3, G, L)
                           image_grid_thw=grid, summary_index=_slot_index(ids == self.target_token_id).repeat(g),
                           images_per_row=torch.ones(g, dtype=torch.int64),          # (G,) one image each
                           videos_per_row=torch.zeros(g, dtype=torch.int64))         # (G,) no video

    def _collate(self, prompts: list) -> "ModelInputs":
        """The general collation of B prompt rows: patchify all their images, then _assemble."""
        pixels, grid = self._pixels([im for p in prompts for im in p.images])  # (N, .), (n_img, 3) or None
        return self._assemble(prompts, pixels, grid)

    def _assemble(self, prompts: list, pixels: Optional[torch.Tensor], grid: Optional[torch.Tensor]) -> "ModelInputs":
        """Rows whose images are already patchified -> ModelInputs: make each row's video, expand each
        prompt with its visual tokens, tokenise (right-padded) and lay out the mRoPE positions."""
        videos = [self._video(p.frames, p.frame_times) if p.frames else None for p in prompts]
        counts = [len(p.images) for p in prompts]
        starts = np.cumsum([0] + counts)                                   # first image of each row
        texts = [self._prompt_text(p, grid[starts[i]:starts[i + 1]] if counts[i] else [], videos[i])
                 for i, p in enumerate(prompts)]
        enc = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        input_ids, attn = enc["input_ids"], enc["attention_mask"]          # (B, L) each; 1 = real token
        vids = [v for v in videos if v is not None]
        vpixels = torch.from_numpy(np.concatenate([v.patches for v in vids])) if vids else None  # (Nv, .)
        vgrid = torch.tensor([v.grid for v in vids], dtype=torch.int64) if vids else None       # (n_vid, 3)
        pos = self._positions(input_ids, attn, grid, vgrid, [v.seconds_per_group for v in vids])  # (3, B, L)
        slot = (input_ids == self.query_token_id) | (input_ids == self.target_token_id)  # (B, L)
        return ModelInputs(input_ids=input_ids, attention_mask=attn, position_ids=pos, pixel_values=pixels,
                           image_grid_thw=grid, summary_index=_slot_index(slot),
                           images_per_row=torch.tensor(counts, dtype=torch.int64),       # (B,)
                           pixel_values_videos=vpixels, video_grid_thw=vgrid,
                           videos_per_row=torch.tensor([int(v is not None) for v in videos], dtype=torch.int64))

    def _positions(self, input_ids: torch.Tensor, attn: torch.Tensor, grid: Optional[torch.Tensor],
                   vgrid: Optional[torch.Tensor], seconds_per_group: list) -> torch.Tensor:
        """mRoPE positions from the backbone's own get_rope_index (it reads only the config, no
        weights). Its token types: text 0, image 1, video 2; padding is excluded by the mask, so a
        row's positions depend only on that row. Qwen2.5-VL also spaces a video's temporal positions
        by the seconds each temporal group spans (second_per_grid_ts)."""
        types = (input_ids == self.image_token_id).int() + 2 * (input_ids == self.video_token_id).int()  # (B, L)
        extra = {}
        if self.model_type == "qwen2_5_vl" and vgrid is not None:
            extra["second_per_grid_ts"] = torch.tensor(seconds_per_group, dtype=torch.float32)  # (n_vid,)
        pos, _ = self._base().get_rope_index(input_ids, mm_token_type_ids=types, image_grid_thw=grid,
                                             video_grid_thw=vgrid, attention_mask=attn, **extra)
        return pos                                                          # (3, B, L)

    def _pixels(self, images: list):
        """Images -> (pixel patches (N, C*T*p*p) float32, grid (n_img, 3)), or (None, None) for none.
        Qwen's image processor resizes each one (smart_resize: aspect kept, within the pixel budget)."""
        if not images:
            return None, None
        pv = self.image_processor([self._prep_image(im) for im in images], return_tensors="np")
        return torch.from_numpy(pv["pixel_values"]), torch.from_numpy(pv["image_grid_thw"])  # (N, .), (n_img, 3)

    def _video(self, frames: list, times: list) -> "_Video":
        """k frames (PIL | path) and their seconds -> one video in Qwen's video input layout.

            side  = round(video_size / (p m)) * (p m)      smart_resize's rounding (qwen-vl-utils
                                                            fetch_video: resized_height = resized_width)
            x_f   = (frame_f / 255 - mean) / std            each frame resized to side x side, then the
                                                            image processor's own rescale / normalize
            pad   : frames repeated from the last one up to a multiple of the temporal patch T
            patch : (t, T, C, h/m, m, p, w/m, m, p) -> (t, h/m, w/m, m, m, C, T, p, p)  (the layout of
                    Qwen2VLVideoProcessor / Qwen3VLVideoProcessor.patchify, so a video of T identical
                    frames gives exactly the patches of that frame as an image)
            time_g = (time of group g's first frame + time of its last) / 2   (Qwen3VLProcessor.
                    _calculate_timestamps, on the padded times)
        """
        ip, p, m, tp = self.image_processor, self.patch_size, self.merge_size, self.temporal_patch_size
        side = max(p * m, round(self.config.video_size / (p * m)) * (p * m))   # pixels per frame side
        arrays = []
        for f in frames:
            img = self._prep_image(f)
            if img.size != (side, side):
                img = img.resize((side, side), Image.BICUBIC)
            x = np.moveaxis(np.asarray(img), -1, 0)                         # (C, side, side) uint8
            x = ip.normalize(ip.rescale(x, ip.rescale_factor), ip.image_mean, ip.image_std)  # (C, side, side)
            arrays.append(x.astype(np.float32))
        pad = -len(arrays) % tp                                             # frames to add: a multiple of T
        arrays += [arrays[-1]] * pad
        times = list(times) + [times[-1]] * pad
        video = np.stack(arrays)                                            # (t T, C, side, side)
        c, g = video.shape[1], side // p                                    # channels, patches per side
        t = len(arrays) // tp                                               # temporal groups
        patches = video.reshape(t, tp, c, g // m, m, p, g // m, m, p)       # (t, T, C, h/m, m, p, w/m, m, p)
        patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)              # (t, h/m, w/m, m, m, C, T, p, p)
        patches = np.ascontiguousarray(patches).reshape(t * g * g, c * tp * p * p)  # (Nv, C*T*p*p)
        group_times = [(times[i * tp] + times[i * tp + tp - 1]) / 2 for i in range(t)]  # (t,) seconds
        # Seconds between sampled frames (their mean spacing; FRAME_LIST_FPS for one frame), x T frames.
        real = times[: len(frames)]
        step = (real[-1] - real[0]) / (len(real) - 1) if len(real) > 1 and real[-1] > real[0] \
            else 1.0 / data.FRAME_LIST_FPS
        return _Video(patches, (t, g, g), group_times, tp * step)

    # ==============================================================================================
    # Summary state: h = LLM(prompt)[pos(summary token)]   (eq. 1 and 4)
    # ==============================================================================================
    def _summary_states(self, x: "ModelInputs", token_id: int, token: torch.Tensor) -> torch.Tensor:
        """Run the backbone on B collated prompts -> (B, D) summary states h."""
        base = self._base()
        input_ids = x.input_ids.to(self._device)                          # (B, L)
        # Embed the prompt, then put the learnable vector into the summary token's slot. Our added
        # token ids lie past the frozen table's end, so they look up the pad row first (overwritten).
        safe_ids = input_ids.masked_fill(input_ids >= base.get_input_embeddings().weight.shape[0],
                                         self.pad_token_id)         # (B, L)
        embeds = base.get_input_embeddings()(safe_ids)              # (B, L, D)
        slot = (input_ids == token_id)                               # (B, L) exactly one per row
        embeds = torch.where(slot[..., None], token.to(embeds.dtype), embeds)  # (B, L, D)
        pixels = None if x.pixel_values is None else x.pixel_values.to(self._device, self.model_dtype)  # (N, .)
        grid = None if x.image_grid_thw is None else x.image_grid_thw.to(self._device)                # (n_img, 3)
        vpixels = None if x.pixel_values_videos is None else x.pixel_values_videos.to(self._device, self.model_dtype)
        vgrid = None if x.video_grid_thw is None else x.video_grid_thw.to(self._device)               # (n_vid, 3)
        # The backbone writes each image's and video's visual tokens into their placeholder slots itself.
        out = base(inputs_embeds=embeds, attention_mask=x.attention_mask.to(self._device),
                   position_ids=x.position_ids.to(self._device), pixel_values=pixels, image_grid_thw=grid,
                   pixel_values_videos=vpixels, video_grid_thw=vgrid, use_cache=False)  # vpixels: (Nv, .)
        hidden = out.last_hidden_state                               # (B, L, D)
        rows = torch.arange(hidden.shape[0], device=hidden.device)   # (B,)
        return hidden[rows, x.summary_index.to(hidden.device)].float()  # (B, D) h at pos(summary token)

    # ==============================================================================================
    # Forward (training) and encode (inference)
    # ==============================================================================================
    def forward(self, queries: Optional[Sequence] = None, images: Optional[Sequence] = None) -> dict:
        """Embed queries and/or gallery images with gradients.

        Returns a dict with, when queries are given: 'q' (B, D) calibrated unit queries,
        'q_raw' (B, D) uncalibrated unit queries, 'lam' (B,) calibration strengths, 'angle' (B,) the
        arc each query travelled, lambda * omega in radians (detached, for the log); when images are
        given: 't' (G, D) unit targets; always 'reg' (scalar calibrator regulariser, 0 when off or
        no queries). All float32.
        """
        out: dict[str, torch.Tensor] = {}
        reg = torch.zeros((), device=self._device)                   # () no calibrator -> no penalty
        if queries is not None and len(queries):
            if not isinstance(queries, ModelInputs):                 # raw items: collate them here
                queries = self.collate_queries(queries)
            h = self._summary_states(queries, self.query_token_id, self.query_token)  # (B, D) eq. 1: h_q
            out["q_raw"] = F.normalize(h, dim=-1)                    # (B, D) eq. 2: q_raw = h_q / ||h_q||
            if self.calibrator is not None:
                cal = self.calibrator(h)                             # eq. 3: q = PGSQC(h_q)
                out["q"], out["lam"], reg = cal.query, cal.lam, cal.reg  # (B, D), (B,), ()
                out["angle"] = (cal.lam * cal.omega).detach()        # (B,) arc travelled: lambda * omega
            else:
                out["q"] = out["q_raw"]                              # (B, D) eq. 3 when off: q = q_raw
                out["lam"] = torch.zeros(h.shape[0], device=h.device)  # (B,)
                out["angle"] = torch.zeros(h.shape[0], device=h.device)  # (B,) no move
        if images is not None and len(images):
            if not isinstance(images, ModelInputs):
                images = self.collate_images(images)
            h_t = self._summary_states(images, self.target_token_id, self.target_token)  # (G, D) eq. 4: h_t
            out["t"] = F.normalize(h_t, dim=-1)                      # (G, D) eq. 4: t = h_t / ||h_t||
        out["reg"] = reg
        return out

    def encode_queries(self, queries: Sequence, batch_size: int = 16, progress: bool = False,
                       merge_lora: Optional[bool] = None) -> torch.Tensor:
        """Queries (Query | Record | str) -> (B, D) calibrated unit float32 CPU tensor, no grad, eval."""
        return self._encode(list(queries), batch_size, "q", progress, merge_lora)

    def encode_images(self, images: Sequence, batch_size: int = 32, progress: bool = False,
                      merge_lora: Optional[bool] = None) -> torch.Tensor:
        """Gallery images (PIL | path) -> (G, D) unit float32 CPU tensor, no grad, eval mode."""
        return self._encode(list(images), batch_size, "t", progress, merge_lora)

    def _encode(self, items: list, batch_size: int, key: str, progress: bool,
                merge_lora: Optional[bool]) -> torch.Tensor:
        """Batched no-grad forward in eval mode, keeping only out[key] (restores the caller's mode).

        Speed without changing the method: on a CPU, LoRA is merged into the weights for the duration
        (merge_lora=None: on a CPU only, see merged_lora), and when torch runs one thread per process
        (the tiny default) one thread per core encodes its own batches: each thread collates a batch
        (Python work) while the other computes (torch releases the GIL inside its kernels).
        """
        collate = self.collate_queries if key == "q" else self.collate_images
        parts = [items[i: i + batch_size] for i in range(0, len(items), batch_size)]

        def encode_part(part) -> torch.Tensor:  # one batch on whichever thread takes it; (b, D)
            with torch.no_grad():  # grad mode is per thread: say it in the worker too
                x = collate(part)
                res = self(queries=x) if key == "q" else self(images=x)
                return res[key].float().cpu()

        workers = encode_threads(self._device) if len(parts) > 1 else 1
        merge = self._device.type == "cpu" if merge_lora is None else merge_lora
        was_training = self.training
        self.eval()
        try:
            with self.merged_lora() if merge else contextlib.nullcontext():
                with ThreadPoolExecutor(workers) as pool:
                    done = pool.map(encode_part, parts)  # results in input order
                    if progress:
                        from tqdm import tqdm
                        done = tqdm(done, total=len(parts), desc=f"encode {key}", unit="batch")
                    chunks = list(done)                             # [(batch, D)]
            return torch.cat(chunks) if chunks else torch.zeros(0, self.dim)  # (B|G, D)
        finally:
            self.train(was_training)

    @contextlib.contextmanager
    def merged_lora(self):
        """Inference with LoRA folded into the weights: each adapted linear computes (W + s B A) x in
        one matmul instead of W x + s B (A x) in three, which on a CPU is mostly per-call overhead.

        The same function up to float rounding (tests hold the two within 1e-5). The original W
        tensors are put back afterwards, untouched: subtracting s B A again would leave rounding
        errors in the frozen weights, and training would no longer be exactly reproducible.
        Costs one extra copy of the adapted weights while active (why it is off on a GPU by default).
        """
        from peft.tuners.lora import LoraLayer

        if self._lora_merged:  # nested use (evaluate.py merges once around many encode calls)
            yield self
            return
        saved = []  # (weight Parameter, its original tensor)
        with torch.no_grad():
            for layer in self.backbone.modules():
                if not isinstance(layer, LoraLayer):
                    continue
                w = layer.get_base_layer().weight                   # (out, in) frozen W
                delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters)  # (out, in) s B A
                saved.append((w, w.data))
                w.data = w.data + delta                              # (out, in) W + s B A, a new tensor
        try:
            self._lora_merged = True
            with self.backbone.disable_adapter():  # peft: adapted layers now run their base layer only
                yield self
        finally:
            self._lora_merged = False
            for w, original in saved:
                w.data = original

    # ==============================================================================================
    # Construction. Each random draw of a fresh build happens inside fork_rng with its own seed
    # (base: seed, LoRA: seed + 1, calibrator: seed + 2), so the same config always gives the same
    # weights and building one leaves the caller's RNG as it was. (Loading a checkpoint does draw from
    # the caller's RNG: peft initialises the LoRA layers before it copies the saved values in.)
    # ==============================================================================================
    def __init__(self, config: Optional[EmbedderConfig] = None, *, _checkpoint: Optional[str] = None):
        """Build from `config`; `_checkpoint` (used by from_pretrained) loads every weight from there."""
        super().__init__()
        # The recipe's values fill the None fields once, so the saved config holds the numbers.
        config = resolve_config(config or EmbedderConfig())
        self.config, self.tiny = config, config.backbone in TINY_TYPES
        dev = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self._device = torch.device(dev)
        if config.dtype == "auto":  # float32 on CPU for exact tests; bfloat16 on GPU for memory/speed
            self.model_dtype = torch.bfloat16 if self._device.type == "cuda" else torch.float32
        else:
            self.model_dtype = getattr(torch, config.dtype)
        ckpt = Path(_checkpoint) if _checkpoint else None

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # the random tiny base's weights
            base, self.processor = self._build_backbone(ckpt)
        self._read_token_layout(base)
        self._target_rows = {}  # collate_images' cache: image grid (t, h, w) -> (ids, mask, positions) of prompt_t
        self._lora_merged = False  # inside merged_lora()
        self.train_vision = config.train_vision == "true" or (config.train_vision == "auto" and self.tiny)
        self.backbone = self._add_lora(base, ckpt)
        if self.train_vision:
            for p in self._base().visual.parameters():
                p.requires_grad_(True)
        self._add_summary_tokens()
        self.calibrator = self._new_calibrator()
        self.backbone.to(self._device, self.model_dtype)
        self.query_token.data = self.query_token.data.to(self._device)   # (D,) tokens/calibrator stay fp32
        self.target_token.data = self.target_token.data.to(self._device)  # (D,)
        if self.calibrator is not None:
            self.calibrator.to(self._device)
        if ckpt is not None:
            self._load_extras(ckpt)

    def _read_token_layout(self, base) -> None:
        """Token ids, width D and the vision geometry, read off the built tokenizer and backbone."""
        self.model_type = base.config.model_type
        self.tokenizer = self.processor.tokenizer
        self.image_processor = self.processor.image_processor
        tok = self.tokenizer
        self.query_token_id = tok.convert_tokens_to_ids(QUERY_TOKEN)
        self.target_token_id = tok.convert_tokens_to_ids(TARGET_TOKEN)
        self.image_token_id = tok.convert_tokens_to_ids(IMAGE_PAD)
        self.video_token_id = tok.convert_tokens_to_ids(VIDEO_PAD)
        self.pad_token_id = tok.pad_token_id
        self.dim = int(base.config.text_config.hidden_size)  # D
        # p: pixels per patch side; m: patches merged into one visual token per side; T: frames per
        # temporal patch. The video patches are cut with these, the images by the processor (its own).
        self.patch_size, self.merge_size, self.temporal_patch_size = vision_geometry(base.config)

    def _add_lora(self, base, ckpt: Optional[Path]):
        """Wrap `base` in LoRA on the language model's linears: a fresh init (seed + 1) or a saved one."""
        from peft import LoraConfig, PeftModel, get_peft_model

        cfg = self.config
        # peft matches module names with this regex: only the language model's projections
        # (Qwen2.5-VL's vision MLP also has gate/up/down_proj, so a bare name list would catch it).
        target = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
        with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
            warnings.simplefilter("ignore", FutureWarning)
            if ckpt is not None:
                # peft's own errors for a damaged adapter (safetensors, JSON) name no file.
                with _reading(ckpt / ADAPTER_DIR / "adapter_model.safetensors", "LoRA adapter"):
                    return PeftModel.from_pretrained(base, str(ckpt / ADAPTER_DIR), is_trainable=True)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed + 1)
                lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                  target_modules=target, bias="none")
                return get_peft_model(base, lora)

    def _add_summary_tokens(self) -> None:
        """The learnable <|query|> / <|target|> vectors, initialised from rows of the frozen table:
        summary_init "im_end" = both from <|im_end|>, the token that ends a turn (the authors'
        model.py 148-155); "words" = from the words " word" and " item" (tiny-cpu, recipes.py)."""
        emb = self._base().get_input_embeddings().weight  # (V, D) the frozen embedding table
        if self.config.summary_init == "im_end":
            q_init = t_init = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        else:  # "words": the last BPE piece of each word
            q_init = self.tokenizer.encode(" word", add_special_tokens=False)[-1]
            t_init = self.tokenizer.encode(" item", add_special_tokens=False)[-1]
        self.query_token = nn.Parameter(emb[q_init].detach().float().clone())   # (D,)
        self.target_token = nn.Parameter(emb[t_init].detach().float().clone())  # (D,)

    def _new_calibrator(self):
        """PGSQC for the queries (eq. 3), initialised from seed + 2; None when calibrator="off"."""
        cfg = self.config
        if cfg.calibrator == "off":
            return None
        from calibrator import SphericalQueryCalibrator  # lazy: model.py imports fine without it

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 2)
            return SphericalQueryCalibrator(self.dim, rank=cfg.calibrator_rank, hidden=cfg.calibrator_hidden,
                                            mode=cfg.calibrator)

    def _base(self):
        """The Qwen-VL base model (with LoRA layers injected in place)."""
        return self.backbone.get_base_model()

    @property
    def device(self) -> torch.device:
        """Where the backbone, the tokens and the calibrator live."""
        return self._device

    def _build_backbone(self, ckpt: Optional[Path]):
        """(base model, processor), the base frozen: a tiny one from config and seed (or its saved
        weights), else a real Qwen-VL from its local folder (backbone_folder). A checkpoint always
        supplies the processor, because its tokenizer holds the added summary tokens."""
        cfg = self.config
        folder = None if self.tiny else backbone_folder(cfg.backbone)
        mcfg = None if self.tiny else _backbone_config(folder, cfg.backbone)  # checked before anything loads
        processor = ref = None
        if ckpt is not None:  # its tokenizer holds our summary tokens: a damaged one is reported, not rebuilt
            with _reading(ckpt / PROCESSOR_DIR, "tokenizer / image processor"):
                processor = processor_class().from_pretrained(str(ckpt / PROCESSOR_DIR))
            tok = processor.tokenizer
        elif self.tiny:
            tok = build_tiny_tokenizer(cfg.tiny_vocab_size)
        else:
            tok, ref = _backbone_processor(folder)
        tok.padding_side = "right"  # the summary token must be each row's last real token
        if ckpt is None:
            tok.add_special_tokens({"additional_special_tokens": [QUERY_TOKEN, TARGET_TOKEN]},
                                   replace_extra_special_tokens=False)
        ids = {"pad": tok.convert_tokens_to_ids("<|endoftext|>"), "eos": tok.convert_tokens_to_ids("<|im_end|>"),
               "image": tok.convert_tokens_to_ids(IMAGE_PAD), "video": tok.convert_tokens_to_ids(VIDEO_PAD),
               "vision_start": tok.convert_tokens_to_ids(VISION_START),
               "vision_end": tok.convert_tokens_to_ids(VISION_END)}
        if tok.pad_token is None:
            tok.pad_token = "<|endoftext|>"
        base = self._build_base(tok, ids, ckpt, folder, mcfg)
        if processor is None:
            processor = self._new_processor(base, tok, ref, folder)
        base.config.use_cache = False
        for p in base.parameters():  # peft freezes the base anyway; be explicit for the vision tower
            p.requires_grad_(False)
        return base, processor

    def _build_base(self, tok, ids: dict, ckpt: Optional[Path], folder: Optional[Path], mcfg):
        """The Qwen-VL base model: tiny (saved weights, or random from the seeded RNG) or pretrained
        (AutoModel from its local folder, whose config `mcfg` is already checked)."""
        from transformers import AutoConfig, AutoModel

        cfg = self.config
        if self.tiny and ckpt is not None:  # a random base cannot be re-drawn reliably: load the saved one
            with _reading(ckpt / BASE_DIR / "config.json", "base model config"):
                mcfg = AutoConfig.from_pretrained(str(ckpt / BASE_DIR))
            mcfg._attn_implementation = cfg.attn_implementation
            base = AutoModel.from_config(mcfg)
            state = _load_weights(ckpt / BASE_DIR / "model.safetensors")
            try:
                missing, unexpected = base.load_state_dict(state, strict=False)
            except RuntimeError as e:  # other shapes: the base config was edited or swapped
                raise CheckpointError(f"{ckpt / BASE_DIR / 'model.safetensors'}: base weights do not fit the "
                                      f"architecture in {ckpt / BASE_DIR / 'config.json'} ({_one_line(e)})") from e
            if missing or unexpected:
                raise CheckpointError(f"{ckpt / BASE_DIR / 'model.safetensors'}: base weights do not fit "
                                      f"the {mcfg.model_type} architecture (missing {missing[:3]}, "
                                      f"unexpected {unexpected[:3]})")
            return base
        if self.tiny:
            mcfg = tiny_backbone_config(cfg.backbone, len(tok), ids, cfg.attn_implementation)
            return AutoModel.from_config(mcfg)  # random weights from the caller's seeded RNG
        # The summary tokens' ids may lie past the end of the embedding table: they are never looked up
        # there (their slots are overwritten, _summary_states), so the table is not resized.
        with _reading(folder, "backbone weights", BackboneError):
            return AutoModel.from_pretrained(str(folder), config=mcfg, attn_implementation=cfg.attn_implementation,
                                             dtype=self.model_dtype, local_files_only=True)

    def _new_processor(self, base, tok, ref, folder: Optional[Path]):
        """Tokenizer + Qwen's PIL image processor with this config's pixel budget and the backbone's
        vision geometry. A pretrained backbone keeps its own pixel normalisation (mean / std of its
        image processor `ref`); the tiny one uses Qwen3-VL's 0.5 / 0.5."""
        patch, merge, tpatch = vision_geometry(base.config)
        mean, std = (0.5,) * 3, (0.5,) * 3
        if ref is not None:
            mean, std = tuple(ref.image_mean), tuple(ref.image_std)
            theirs = (int(ref.patch_size), int(ref.merge_size), int(ref.temporal_patch_size))
            if theirs != (patch, merge, tpatch):  # the processor would cut patches the tower cannot read
                raise BackboneError(f"{folder / 'preprocessor_config.json'}: patch / merge / temporal patch "
                                    f"sizes {theirs} differ from the vision tower's {(patch, merge, tpatch)} "
                                    f"in {folder / 'config.json'}")
        c = self.config
        improc = build_image_processor(c.min_pixels, c.max_pixels, patch, merge, tpatch, mean, std)
        return processor_class()(improc, tok, chat_template=CHAT_TEMPLATE)

    # ==============================================================================================
    # Parameter groups (train.py gives each its own treatment)
    # ==============================================================================================
    def vision_parameters(self) -> list[nn.Parameter]:
        """The trainable vision-tower weights ([] when the tower is frozen): train.py gives them their
        own learning rate (TrainConfig.vision_lr_scale)."""
        if not self.train_vision:
            return []
        return [p for p in self._base().visual.parameters() if p.requires_grad]

    def token_parameters(self) -> list[nn.Parameter]:
        """The learnable query/target summary tokens (GGAS uses their gradient norm)."""
        return [self.query_token, self.target_token]

    def param_counts(self) -> dict:
        """Total and trainable parameter counts (for logs and the README)."""
        total = sum(p.numel() for p in self.parameters())
        train = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"total": total, "trainable": train}

    # ==============================================================================================
    # Save and load. A checkpoint folder holds: the embedder config (JSON), the LoRA adapter in peft's
    # own format, the tokens + calibrator + trained vision tower (safetensors), the processor, and for
    # a tiny backbone its random base (it cannot be downloaded, and re-drawing it is not guaranteed).
    # ==============================================================================================
    def save_into(self, folder: str | os.PathLike) -> None:
        """Write every checkpoint file into `folder`, which must not exist yet (it is created).

        Not atomic on its own: save_pretrained, and train.py's checkpoints, call it through
        plumbing.atomic_write, which builds the folder beside the target and swaps it in.
        """
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True)
        self.backbone.save_pretrained(str(folder / ADAPTER_DIR))  # peft's own format
        save_file(self._extra_state(), str(folder / WEIGHTS_FILE))
        self.processor.save_pretrained(str(folder / PROCESSOR_DIR))
        if self.tiny:  # a random base must travel with its checkpoint
            (folder / BASE_DIR).mkdir()
            self._base().config.save_pretrained(str(folder / BASE_DIR))
            save_file(self._clean_base_state(), str(folder / BASE_DIR / "model.safetensors"))
        # The config goes last, with a sha256 of each weight file: a damaged weight file (truncated,
        # zeroed, overwritten) often still parses, and would load as silently wrong weights.
        weights = [f for f in self.required_files(asdict(self.config)) if f.endswith(".safetensors")]
        meta = {"config": asdict(self.config), "versions": _versions(), "model_type": self.model_type,
                "dim": self.dim, "format": CHECKPOINT_FORMAT,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "sha256": {f: _sha256(folder / f) for f in weights}}
        (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2))

    def save_pretrained(self, path: str | os.PathLike) -> str:
        """Write the checkpoint folder atomically (the old one stays until the new one is complete)."""
        path = Path(path).resolve()
        plumbing.atomic_write(path, self.save_into)
        return str(path)

    def _extra_state(self) -> dict[str, torch.Tensor]:
        """Tokens, calibrator and trained non-LoRA base weights (e.g. the tiny vision tower)."""
        state = {"query_token": self.query_token.detach(), "target_token": self.target_token.detach()}  # (D,) each
        if self.calibrator is not None:
            state.update({f"calibrator.{k}": v for k, v in self.calibrator.state_dict().items()})
        if self.train_vision:
            state.update({f"visual.{k}": v for k, v in self._base().visual.state_dict().items()})
        return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}

    def _clean_base_state(self) -> dict[str, torch.Tensor]:
        """The base model's weights without LoRA (names as the plain architecture expects)."""
        out = {}
        for k, v in self._base().state_dict().items():
            if "lora_" in k:
                continue
            out[k.replace(".base_layer.", ".")] = v.detach().cpu().contiguous().clone()  # v's shape, on CPU
        return out

    @classmethod
    def required_files(cls, meta_config: dict) -> list[str]:
        """The files a complete checkpoint of this config has (checked before loading anything)."""
        files = [CONFIG_FILE, WEIGHTS_FILE, f"{ADAPTER_DIR}/adapter_config.json",
                 f"{ADAPTER_DIR}/adapter_model.safetensors", f"{PROCESSOR_DIR}/tokenizer.json"]
        if meta_config.get("backbone") in TINY_TYPES:
            files += [f"{BASE_DIR}/config.json", f"{BASE_DIR}/model.safetensors"]
        return files

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, backbone: Optional[str] = None,
                        device: Optional[str] = None) -> "FashionLensEmbedder":
        """Load a checkpoint folder. `backbone` (optional) asserts which backbone the caller expects.

        Every way a folder can be wrong (missing files, another backbone, edited configs, weights of
        another shape, damaged files) raises CheckpointError naming the file, and the field when a
        config contradicts what was saved with it, before or while loading. A checkpoint of another
        format (format 1: other prompts and image handling) is refused, saying to retrain it. The
        backbone of a real-Qwen checkpoint is loaded from its folder or the local Hugging Face cache
        (backbone_folder), never downloaded.
        """
        path = Path(path)
        meta, config = _read_meta(path)
        missing = [f for f in cls.required_files(meta["config"]) if not (path / f).is_file()]
        if missing:
            raise CheckpointError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
        if backbone is not None and not _same_backbone(backbone, config.backbone):
            raise CheckpointError(f"{path}: checkpoint was trained on backbone {config.backbone!r}, "
                                  f"not {backbone!r}")
        _check_saved_files(path, meta, config)  # cheap checks first: checksums and JSON files
        if device is not None:
            config.device = device
        emb = cls(config, _checkpoint=str(path))  # loading itself names a file it cannot parse
        _check_built(path, meta, emb)  # what only the built model knows: width, pixel budget
        return emb

    def _load_extras(self, ckpt: Path) -> None:
        """Copy the saved tokens, calibrator and vision tower (WEIGHTS_FILE) into this embedder."""
        file = ckpt / WEIGHTS_FILE
        state = _load_weights(file)
        # Parts the config switches off must not be silently dropped: their weights say the
        # checkpoint was trained with them, so the edited config would change what it computes.
        for prefix, field, on in (("calibrator.", "calibrator", self.calibrator is not None),
                                  ("visual.", "train_vision", self.train_vision)):
            if not on and any(k.startswith(prefix) for k in state):
                raise CheckpointError(f"{ckpt / CONFIG_FILE}: {field}={getattr(self.config, field)!r} "
                                      f"switches off the {prefix[:-1]} weights saved in {file}")
        c = self.config
        with torch.no_grad():
            for name in ("query_token", "target_token"):
                src = state.get(name)                                # (D,)
                if src is None or src.shape != (self.dim,):
                    got = "missing" if src is None else f"of shape {tuple(src.shape)}"
                    raise CheckpointError(f"{file}: {name} is {got}, expected ({self.dim},) (dim of the "
                                          f"{self.model_type} backbone) -- checkpoint of another backbone?")
                getattr(self, name).copy_(src)
            parts = []  # (module, its saved weights, the config fields that shape it)
            if self.calibrator is not None:
                parts.append((self.calibrator, _strip(state, "calibrator."),
                              f"calibrator={c.calibrator!r}, calibrator_rank={c.calibrator_rank}, "
                              f"calibrator_hidden={c.calibrator_hidden}"))
            if self.train_vision:
                parts.append((self._base().visual, {k: v.to(self.model_dtype) for k, v in
                                                    _strip(state, "visual.").items()},
                              f"train_vision={c.train_vision!r}"))
            for module, saved, fields_ in parts:
                try:
                    module.load_state_dict(saved, strict=True)
                except RuntimeError as e:  # missing keys or other shapes: name the fields that decide them
                    raise CheckpointError(f"{file}: the saved weights do not fit {fields_} of "
                                          f"{ckpt / CONFIG_FILE} ({_one_line(e)})") from e


# The checkpoint folder's layout (names other tools, e.g. plain peft, can open directly).
CONFIG_FILE, WEIGHTS_FILE = "embedder_config.json", "embedder.safetensors"
ADAPTER_DIR, PROCESSOR_DIR, BASE_DIR = "adapter", "processor", "base"


# ================================================================================================
# Real backbones: found on disk only (a folder, or the local Hugging Face cache), never downloaded.
# ================================================================================================


def backbone_folder(name: str) -> Path:
    """The local folder of a real backbone: `name` itself when it is a folder, else the snapshot of
    hub id `name` in the local Hugging Face cache. Nothing is downloaded: a backbone found in neither
    place is one BackboneError saying how to get it."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(name, "config.json")  # a path, None, or a "known missing" marker
    except ValueError:  # not a hub id either (HFValidationError), e.g. a folder path with a typo
        hit = None
    if isinstance(hit, str):
        return Path(hit).parent
    hub_id = not name.startswith(("/", ".", "~")) and name.count("/") == 1  # "org/name"
    how = (f"fetch it first (e.g. `hf download {name}`) or pass the folder that holds it" if hub_id else
           "no folder is there (moved or deleted?); pass the folder that holds it")
    raise BackboneError(f"backbone {name!r} is neither a local folder nor in the local Hugging Face cache "
                        f"({constants.HF_HUB_CACHE}); FashionLens never downloads: {how}")


def _backbone_config(folder: Path, name: str):
    """The transformers config of a real backbone's folder, checked to be a supported Qwen-VL."""
    from transformers import AutoConfig

    with _reading(folder / "config.json", "backbone config", BackboneError):
        mcfg = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    if mcfg.model_type not in SUPPORTED_TYPES:
        raise BackboneError(f"{folder / 'config.json'}: backbone {name!r} has model_type {mcfg.model_type!r}; "
                            f"supported: {', '.join(SUPPORTED_TYPES)}")
    return mcfg


def _backbone_processor(folder: Path):
    """(tokenizer, image processor) of a real backbone's folder: from its AutoProcessor when that
    loads; else, as happens without torchvision (every Qwen-VL processor builds a video processor,
    and those need torchvision: ImportError), AutoTokenizer + AutoImageProcessor (Qwen's PIL image
    processor) from the same folder. The embedder keeps the image processor's normalisation only;
    its own pixel budget and video patches replace the rest (_new_processor, _video)."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    with _reading(folder, "processor (tokenizer / preprocessor_config.json)", BackboneError):
        try:
            stock = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
            return stock.tokenizer, stock.image_processor
        except ImportError:  # the stock video processor needs torchvision, which is not installed
            tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, padding_side="right")
            return tok, AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)


# ================================================================================================
# Checkpoint checks: each way a folder can be damaged or edited is refused naming file and field.
# ================================================================================================


def _read_meta(path: Path) -> tuple[dict, EmbedderConfig]:
    """(the saved embedder_config.json, its EmbedderConfig), or CheckpointError naming the file.

    A checkpoint of another format is refused first: format 1 (no "format" 2 in the file) was written
    with other prompts and image handling (other sentences, summary tokens from other words, square
    image_size images, video frames as separate images), so its weights do not fit this model.
    """
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: not a FashionLens checkpoint (missing {CONFIG_FILE})")
    try:
        meta = json.loads(cfg_file.read_text())
        fmt = meta.get("format", 1)
        if fmt != CHECKPOINT_FORMAT:
            older = isinstance(fmt, int) and fmt < CHECKPOINT_FORMAT
            raise CheckpointError(
                f"{cfg_file}: checkpoint format {fmt!r}, this version reads format {CHECKPOINT_FORMAT}: "
                + ("it was written with other prompts and image handling (square images, video frames as "
                   "images, other summary-token initialisation) and must be retrained with this version"
                   if older else "it was written by a newer FashionLens"))
        known = {f.name for f in fields(EmbedderConfig)}  # tolerate fields a newer version added
        config = EmbedderConfig(**{k: v for k, v in meta["config"].items() if k in known})
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # ValueError: bad JSON or UTF-8
        raise CheckpointError(f"{cfg_file}: unreadable embedder config ({_one_line(e)})") from e
    return meta, config


def _check_saved_files(path: Path, meta: dict, config: EmbedderConfig) -> None:
    """Before building: the weight files are the ones saved, and the JSON files agree with the config."""
    cfg_file = path / CONFIG_FILE
    # A truncated or overwritten weight file is named here, before any library tries to parse it.
    for rel, digest in (meta.get("sha256") or {}).items():  # every format-2 checkpoint has them
        if _sha256(path / rel) != digest:
            raise CheckpointError(f"{path / rel}: damaged (its sha256 differs from the one saved in "
                                  f"{CONFIG_FILE}: truncated, overwritten or copied incompletely)")
    # The saved architecture must be the one the config names (catches swapped/edited folders).
    expected = TINY_TYPES.get(config.backbone)
    if expected is not None:
        found = _read_json(path / BASE_DIR / "config.json").get("model_type")
        if found != expected:
            raise CheckpointError(f"{path / BASE_DIR / 'config.json'}: base is {found!r} but the "
                                  f"checkpoint config names backbone {config.backbone!r} ({expected})")
    if meta.get("model_type") and expected is not None and meta["model_type"] != expected:
        raise CheckpointError(f"{cfg_file}: model_type {meta['model_type']!r} does not match backbone "
                              f"{config.backbone!r}")
    # peft builds the adapter from its own adapter_config.json, so an edited LoRA field in our config
    # would be ignored while it still keys the gallery cache: the two must agree.
    adapter_file = path / ADAPTER_DIR / "adapter_config.json"
    adapter = _read_json(adapter_file)
    for ours, theirs in (("lora_r", "r"), ("lora_alpha", "lora_alpha"), ("lora_dropout", "lora_dropout")):
        mine = getattr(config, ours)
        if mine is not None and theirs in adapter and adapter[theirs] != mine:
            raise CheckpointError(f"{cfg_file}: {ours}={mine!r} contradicts {adapter_file} "
                                  f"({theirs}={adapter[theirs]!r})")


def _check_built(path: Path, meta: dict, emb: "FashionLensEmbedder") -> None:
    """After building: the backbone, width and pixel budget are the ones the config was saved with."""
    cfg_file = path / CONFIG_FILE
    for field, built in (("model_type", emb.model_type), ("dim", emb.dim)):
        if meta.get(field, built) != built:
            raise CheckpointError(f"{cfg_file}: {field}={meta[field]!r}, but the backbone built from "
                                  f"this checkpoint has {field}={built!r}")
    # The saved image processor resizes every image (it, not the config, is what loading uses); an
    # edited min_pixels / max_pixels would describe a budget the checkpoint does not apply.
    saved = _pixel_budget(emb.image_processor)
    c = emb.config
    if saved != (c.min_pixels, c.max_pixels):
        raise CheckpointError(f"{cfg_file}: min_pixels={c.min_pixels}, max_pixels={c.max_pixels} contradict the "
                              f"saved image processor in {path / PROCESSOR_DIR} (min {saved[0]}, max {saved[1]} "
                              f"pixels per image)")


def _pixel_budget(image_processor) -> tuple:
    """(min_pixels, max_pixels) of a Qwen image processor (transformers 5 names them size's
    shortest_edge / longest_edge, 4 min_pixels / max_pixels); None where unset."""
    size = getattr(image_processor, "size", None)
    out = []
    for keys in (("shortest_edge", "min_pixels"), ("longest_edge", "max_pixels")):
        value = None
        for key in keys:
            value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
            value = value if value is not None else getattr(image_processor, key, None)
            if value is not None:
                break
        out.append(None if value is None else int(value))
    return tuple(out)


def _same_backbone(a: str, b: str) -> bool:
    """Two backbone names mean the same backbone: equal, or the same local folder spelled differently."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.is_dir() and pb.is_dir() and pa.resolve() == pb.resolve()


def _sha256(file: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (weights can be large)."""
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_json(file: Path) -> dict:
    """A JSON object from a checkpoint file, or CheckpointError naming it."""
    with _reading(file, "JSON file"):
        obj = json.loads(file.read_text())
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _load_weights(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file as {name: tensor}, or CheckpointError naming it (truncated, garbled)."""
    from safetensors.torch import load_file

    with _reading(file, "weights"):
        return load_file(str(file))


@contextlib.contextmanager
def _reading(file: Path, what: str, error: type = None):
    """Turn any failure to parse a checkpoint or backbone file (JSON, safetensors, tokenizer: each
    library raises its own types) into one `error` (CheckpointError by default) naming the file;
    FashionLens's own errors pass unchanged."""
    try:
        yield
    except FashionLensError:
        raise
    except Exception as e:  # noqa: BLE001 -- third-party parsers; the message keeps their reason
        raise (error or CheckpointError)(f"{file}: cannot load the {what} (damaged, truncated or not this "
                                         f"model's? {type(e).__name__}: {_one_line(e)})") from e


def _one_line(err: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (torch's load_state_dict errors span many)."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def _strip(state: dict, prefix: str) -> dict:
    """The entries of `state` under `prefix`, with the prefix removed (one sub-module's state dict)."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _versions() -> dict:
    """Library versions, saved with each checkpoint so a mismatch can be diagnosed later."""
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "numpy": np.__version__}


if __name__ == "__main__":
    # Demo: build the offline tiny embedder, embed four text queries and four flat-colour swatches
    # (stand-ins for product photos), print their cosine similarities and the encoding throughput.
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.time()
    emb = FashionLensEmbedder(EmbedderConfig())
    counts = emb.param_counts()
    print(f"built tiny {emb.model_type} embedder in {time.time() - t0:.1f}s: D={emb.dim}, "
          f"{counts['total'] / 1e6:.2f} M params, {counts['trainable'] / 1e6:.2f} M trainable, "
          f"{emb.image_tokens(64, 64)} tokens per 64x64 image")
    colours = {"red dress": (200, 30, 30), "blue shirt": (30, 60, 200), "green dress": (30, 160, 60),
               "yellow shirt": (230, 200, 40)}
    swatches = [Image.new("RGB", (64, 64), c) for c in colours.values()]  # the synthetic images' size
    q = emb.encode_queries([f"Find the {n}." for n in colours])  # (4, D) plain-text queries
    t = emb.encode_images(swatches)                               # (4, D)
    sim = q @ t.T                        # (4, 4) eq. 5 scores (random weights: no structure yet)
    print("query \\ image  " + "  ".join(f"{n:>12s}" for n in colours))
    for n, row in zip(colours, sim.tolist()):
        print(f"{n:>13s}  " + "  ".join(f"{v:12.3f}" for v in row))
    t0 = time.time()
    emb.encode_images(swatches * 60, batch_size=64)  # 240 images for a quick throughput figure
    print(f"encode_images: {240 / (time.time() - t0):.0f} images/s (batch 64, "
          f"{torch.get_num_threads()} threads)")
