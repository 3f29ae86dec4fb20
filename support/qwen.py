"""Qwen-VL glue for the embedder: finding and building the backbone and its processor, and collation
(prompt text + images + video -> the tensors the backbone reads). Support code: skip on first read.

Backbones (one code path, told apart by the config's `model_type`): any Qwen2-VL / Qwen2.5-VL /
Qwen3-VL hub id (already in the local Hugging Face cache) or local folder in the hub's layout (the
paper: Qwen3-VL-4B-Instruct), or an offline random "tiny" one (tiny_backbone.py, the default, so
everything runs on a CPU with no download). Nothing here touches the network (backbone_folder).

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

Collation (Collator): each prompt's placeholders are expanded to one pad token per visual token,
tokenised right-padded, and given positions (EmbedderConfig.positions): mRoPE from the backbone's own
get_rope_index with the attention mask, so padding never changes a row, or the plain 1-D sequence the
authors' call computes on Qwen3-VL. The prompt's text (model.py's sentences) is passed in
as a function, and data.py's image loaders too: this module imports no concept file. The collators
touch no trainable weight, so train.py runs them ahead on the spare core (support/prefetch.py).

Shapes: B rows, L sequence length, N image patches, n_img images, Nv video patches, n_vid videos,
t temporal groups, T frames per temporal patch, p pixels per patch side, m patches merged per token
side, C*T*p*p values per patch.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
from PIL import Image

from support.checkpoint import BASE_DIR, PROCESSOR_DIR, _load_weights, _one_line, _reading
from support import ufire_files
from support.errors import BackboneError, CheckpointError, UFireError
from support.recipes import resolve_positions
from support.tiny_backbone import (CHAT_TEMPLATE, TINY_TYPES, build_image_processor, build_tiny_tokenizer,
                                   processor_class, tiny_backbone_config, vision_geometry)

# Architectures the embedder knows how to drive (their get_rope_index and vision tower API).
SUPPORTED_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# Qwen's visual placeholders: one pad per visual token, between a start and an end marker.
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"   # one visual token's placeholder
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
# The widest aspect ratio (long side / short side) Qwen's smart_resize accepts: transformers' copy and
# qwen-vl-utils' (vision_process.py MAX_RATIO = 200, the authors' preprocessing) both raise a bare
# ValueError above it; Collator._pixels refuses such an image first, naming it.
MAX_ASPECT_RATIO = 200


def device_and_dtype(config) -> tuple[torch.device, torch.dtype]:
    """(device, weight dtype) of an EmbedderConfig: "auto" device = cuda if available else cpu; "auto"
    dtype = float32 on CPU (exact tests), bfloat16 on GPU (memory/speed)."""
    dev = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(dev)
    if config.dtype == "auto":  # float32 on CPU for exact tests; bfloat16 on GPU for memory/speed
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, getattr(torch, config.dtype)


# ================================================================================================
# The collated batch
# ================================================================================================


@dataclass
class ModelInputs:
    """A batch of prompts as the backbone reads them: what the collators (collate_queries /
    collate_images) produce and forward consumes. Plain CPU tensors, so a worker can build them.
    model.py's _summary_states reads input_ids, attention_mask, position_ids, the pixels and grids,
    and summary_index (where to read h)."""
    input_ids: torch.Tensor                 # (B, L) token ids, right-padded
    attention_mask: torch.Tensor            # (B, L) 1 = real token, 0 = padding
    position_ids: torch.Tensor              # (3, B, L) positions (time, height, width; "sequential": 3 equal rows)
    pixel_values: Optional[torch.Tensor]    # (N, C*T*p*p) patches of the batch's images in prompt order; None: none
    image_grid_thw: Optional[torch.Tensor]  # (n_img, 3) each image's patch grid (1, h, w); None: no image
    summary_index: torch.Tensor             # (B,) position of the summary token (<|query|> / <|target|>) per row
    images_per_row: torch.Tensor            # (B,) images in each row's prompt
    pixel_values_videos: Optional[torch.Tensor] = None  # (Nv, C*T*p*p) patches of the batch's videos; None: none
    video_grid_thw: Optional[torch.Tensor] = None       # (n_vid, 3) each video's grid (frames / T, h, w)
    videos_per_row: Optional[torch.Tensor] = None       # (B,) videos in each row's prompt (0 or 1); None: all 0

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device, dtype: torch.dtype) -> "ModelInputs":
        """The batch on `device`, its pixels in the model's `dtype` (ids, masks and grids keep theirs)."""
        def move(t, *dt):
            return None if t is None else t.to(device, *dt)
        return ModelInputs(input_ids=move(self.input_ids), attention_mask=move(self.attention_mask),
                           position_ids=move(self.position_ids), pixel_values=move(self.pixel_values, dtype),
                           image_grid_thw=move(self.image_grid_thw), summary_index=move(self.summary_index),
                           images_per_row=move(self.images_per_row),
                           pixel_values_videos=move(self.pixel_values_videos, dtype),
                           video_grid_thw=move(self.video_grid_thw), videos_per_row=move(self.videos_per_row))

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


class _Video(NamedTuple):
    """One video as the backbone reads it (made by Collator._video)."""
    patches: np.ndarray        # (Nv, C*T*p*p) float32 patches in Qwen's video layout
    grid: tuple                # (t, h, w): temporal groups, patch rows, patch columns
    group_times: list          # (t,) seconds of each temporal group (mean of its first and last frame)
    seconds_per_group: float   # seconds one temporal group spans (Qwen2.5-VL's second_per_grid_ts)


def _slot_index(slot: torch.Tensor) -> torch.Tensor:
    """(B, L) bool with exactly one True per row -> (B,) int64 position of that True."""
    return slot.float().argmax(dim=1)  # (B,) argmax of a 0/1 row = its first (only) 1


def read_token_layout(emb, base, query_token: str, target_token: str) -> None:
    """Set on embedder `emb` the token ids, width D and the vision geometry, read off its built
    processor (emb.processor) and backbone `base`."""
    emb.model_type = base.config.model_type
    # positions="authors" means what the authors' call computes on this backbone: made concrete here, so the
    # config (and a checkpoint's copy of it) says "sequential" or "mrope" (recipes.resolve_positions).
    emb.config = dataclasses.replace(emb.config, positions=resolve_positions(emb.config.positions, emb.model_type))
    emb.tokenizer = emb.processor.tokenizer
    emb.image_processor = emb.processor.image_processor
    tok = emb.tokenizer
    emb.query_token_id = tok.convert_tokens_to_ids(query_token)
    emb.target_token_id = tok.convert_tokens_to_ids(target_token)
    emb.image_token_id = tok.convert_tokens_to_ids(IMAGE_PAD)
    emb.video_token_id = tok.convert_tokens_to_ids(VIDEO_PAD)
    emb.pad_token_id = tok.pad_token_id
    emb.dim = int(base.config.text_config.hidden_size)  # D
    # p: pixels per patch side; m: patches merged into one visual token per side; T: frames per
    # temporal patch. The video patches are cut with these, the images by the processor (its own).
    emb.patch_size, emb.merge_size, emb.temporal_patch_size = vision_geometry(base.config)


# ================================================================================================
# Collation: prompt rows -> ModelInputs
# ================================================================================================


class Collator:
    """Turns prompt rows (model.py's _Prompt: kind, instruction, images, frames, frame_times) into
    ModelInputs for one built embedder.

    `text(prompt, images, video)` writes a row's prompt with its visual blocks already expanded (model.py);
    `load_image(path)` comes from data.py (passed in); images already in memory are converted by
    ufire_files.to_rgb, and untimed frames are spaced at ufire_files.FRAME_LIST_FPS.
    """

    def __init__(self, emb, base, text: Callable, load_image: Callable):
        self.tokenizer, self.image_processor, self.model_type = emb.tokenizer, emb.image_processor, emb.model_type
        self.patch_size, self.merge_size, self.temporal_patch_size = (emb.patch_size, emb.merge_size,
                                                                      emb.temporal_patch_size)
        self.query_token_id, self.target_token_id = emb.query_token_id, emb.target_token_id
        self.image_token_id, self.video_token_id = emb.image_token_id, emb.video_token_id
        self.video_size = emb.config.video_size
        self.rope_index = base.get_rope_index  # reads only the config, no weights (LoRA wraps base in place)
        self.positions = emb.config.positions  # "mrope" | "sequential" (made concrete by read_token_layout)
        self.text, self.load_image = text, load_image
        self.target_rows = {}  # collate_images' cache: image grid (t, h, w) -> (ids, mask, positions) of prompt_t

    def image_block(self, grid) -> str:
        """One image with its pads expanded: (h x w patches) / merge^2 visual tokens."""
        t, h, w = (int(v) for v in grid)
        return VISION_START + IMAGE_PAD * (t * h * w // self.merge_size ** 2) + VISION_END

    def video_block(self, video: _Video) -> str:
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

    def image_tokens(self, width: int, height: int) -> int:
        """Visual tokens of a width x height image at this embedder's pixel budget (what the processor's
        smart_resize gives, divided by the merge^2 patches each token pools)."""
        patches = self.image_processor.get_number_of_image_patches(height, width, {})  # (h/p) (w/p)
        return patches // self.merge_size ** 2

    def _prep_image(self, img) -> Image.Image:
        """PIL or path -> RGB at its native size (the image processor resizes it within the budget)."""
        if isinstance(img, (str, os.PathLike)):
            return self.load_image(str(img))
        return img if img.mode == "RGB" else ufire_files.to_rgb(img)

    def collate_images(self, prompts: list) -> ModelInputs:
        """G prompt_t rows (one image each) -> ModelInputs.

        Fast path: when every image of the batch has the same patch grid (the same size after
        smart_resize: every synthetic image, and most photos of one source), every row is the same
        prompt, so its token ids and mRoPE positions are computed once per grid, cached, and repeated;
        only the pixels differ from row to row. Mixed grids are collated row by row (_assemble).
        Reference: collate (tests/test_fast_paths.py holds the two bit for bit equal).
        """
        pixels, grid = self._pixels([im for p in prompts for im in p.images])  # (N, C*T*p*p), (G, 3)
        if grid is None or not bool((grid == grid[:1]).all()):
            return self._assemble(prompts, pixels, grid)
        key = tuple(grid[0].tolist())                                # (t, h, w) of every image
        if key not in self.target_rows:
            one = self._assemble(prompts[:1], pixels[: int(grid[0].prod())], grid[:1])
            self.target_rows[key] = (one.input_ids, one.attention_mask, one.position_ids)  # (1, L) x2, (3, 1, L)
        ids, attn, pos = self.target_rows[key]
        g = len(prompts)
        return ModelInputs(input_ids=ids.repeat(g, 1), attention_mask=attn.repeat(g, 1),  # (G, L) each
                           position_ids=pos.repeat(1, g, 1), pixel_values=pixels,          # (3, G, L)
                           image_grid_thw=grid, summary_index=_slot_index(ids == self.target_token_id).repeat(g),
                           images_per_row=torch.ones(g, dtype=torch.int64),          # (G,) one image each
                           videos_per_row=torch.zeros(g, dtype=torch.int64))         # (G,) no video

    def collate(self, prompts: list) -> ModelInputs:
        """The general collation of B prompt rows: patchify all their images, then _assemble."""
        pixels, grid = self._pixels([im for p in prompts for im in p.images])  # (N, .), (n_img, 3) or None
        return self._assemble(prompts, pixels, grid)

    def _assemble(self, prompts: list, pixels: Optional[torch.Tensor], grid: Optional[torch.Tensor]) -> ModelInputs:
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

    def _prompt_text(self, p, image_grids, video: Optional[_Video]) -> str:
        """The expanded text of one row: model.py's prompt with every placeholder replaced by its
        visual tokens (image_grids: (n, 3) grids of the row's images, in order)."""
        images = "".join(self.image_block(g) for g in image_grids)
        return self.text(p, images, self.video_block(video) if video else "")

    def _positions(self, input_ids: torch.Tensor, attn: torch.Tensor, grid: Optional[torch.Tensor],
                   vgrid: Optional[torch.Tensor], seconds_per_group: list) -> torch.Tensor:
        """The (3, B, L) positions of a collated batch; every collation path (and the cached prompt_t
        rows) comes through here.

        "sequential" (the authors' call on Qwen3-VL: with no input_ids, transformers cannot build 3-D
        positions and uses the plain sequence): the same 0 .. len-1 over each row's real tokens in all
        three rows, visual tokens included; padding gets 1, as get_rope_index gives it.
        "mrope": the backbone's own get_rope_index (it reads only the config, no weights). Its token
        types: text 0, image 1, video 2; padding is excluded by the mask, so a row's positions depend
        only on that row. Qwen2.5-VL also spaces a video's temporal positions by the seconds each
        temporal group spans (second_per_grid_ts)."""
        if self.positions == "sequential":
            seq = (attn.long().cumsum(dim=1) - 1).masked_fill(attn == 0, 1)      # (B, L) 0 .. len-1, pads 1
            return seq.unsqueeze(0).expand(3, -1, -1).contiguous()              # (3, B, L)
        types = (input_ids == self.image_token_id).int() + 2 * (input_ids == self.video_token_id).int()  # (B, L)
        extra = {}
        if self.model_type == "qwen2_5_vl" and vgrid is not None:
            extra["second_per_grid_ts"] = torch.tensor(seconds_per_group, dtype=torch.float32)  # (n_vid,)
        pos, _ = self.rope_index(input_ids, mm_token_type_ids=types, image_grid_thw=grid,
                                 video_grid_thw=vgrid, attention_mask=attn, **extra)
        return pos                                                          # (3, B, L)

    def _pixels(self, images: list):
        """Images -> (pixel patches (N, C*T*p*p) float32, grid (n_img, 3)), or (None, None) for none.
        Qwen's image processor resizes each one (smart_resize: aspect kept, within the pixel budget)."""
        if not images:
            return None, None
        rgb = [self._prep_image(im) for im in images]
        for i, (src, im) in enumerate(zip(images, rgb)):  # smart_resize's own refusal names no image
            if max(im.size) / min(im.size) > MAX_ASPECT_RATIO:
                what = f"image {src}" if isinstance(src, (str, os.PathLike)) else f"image #{i} of the batch"
                raise UFireError(f"{what} is {im.size[0]}x{im.size[1]} pixels: aspect ratio "
                                 f"{max(im.size) / min(im.size):.1f} is above {MAX_ASPECT_RATIO}, which Qwen's "
                                 "smart_resize (and qwen-vl-utils, the authors' preprocessing) refuse; "
                                 "crop or pad it")
        pv = self.image_processor(rgb, return_tensors="np")
        return torch.from_numpy(pv["pixel_values"]), torch.from_numpy(pv["image_grid_thw"])  # (N, .), (n_img, 3)

    def _video(self, frames: list, times: list) -> _Video:
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
        side = max(p * m, round(self.video_size / (p * m)) * (p * m))   # pixels per frame side
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
            else 1.0 / ufire_files.FRAME_LIST_FPS
        return _Video(patches, (t, g, g), group_times, tp * step)


# ================================================================================================
# Building the backbone and its processor
# ================================================================================================


def build_backbone(config, model_dtype: torch.dtype, ckpt: Optional[Path], summary_tokens: tuple):
    """(base model, processor), the base frozen: a tiny one from config and seed (or its saved
    weights), else a real Qwen-VL from its local folder (backbone_folder). A checkpoint always
    supplies the processor, because its tokenizer holds the added summary tokens; a fresh tokenizer
    gets `summary_tokens` (model.py's <|query|>, <|target|>) as special tokens."""
    cfg = config
    tiny = cfg.backbone in TINY_TYPES
    folder = None if tiny else backbone_folder(cfg.backbone)
    mcfg = None if tiny else _backbone_config(folder, cfg.backbone)  # checked before anything loads
    processor = ref = None
    if ckpt is not None:  # its tokenizer holds our summary tokens: a damaged one is reported, not rebuilt
        with _reading(ckpt / PROCESSOR_DIR, "tokenizer / image processor"):
            processor = processor_class().from_pretrained(str(ckpt / PROCESSOR_DIR))
        tok = processor.tokenizer
    elif tiny:
        tok = build_tiny_tokenizer(cfg.tiny_vocab_size)
    else:
        tok, ref = _backbone_processor(folder)
    tok.padding_side = "right"  # the summary token must be each row's last real token
    if ckpt is None:
        tok.add_special_tokens({"additional_special_tokens": list(summary_tokens)},
                               replace_extra_special_tokens=False)
    ids = {"pad": tok.convert_tokens_to_ids("<|endoftext|>"), "eos": tok.convert_tokens_to_ids("<|im_end|>"),
           "image": tok.convert_tokens_to_ids(IMAGE_PAD), "video": tok.convert_tokens_to_ids(VIDEO_PAD),
           "vision_start": tok.convert_tokens_to_ids(VISION_START),
           "vision_end": tok.convert_tokens_to_ids(VISION_END)}
    if tok.pad_token is None:
        tok.pad_token = "<|endoftext|>"
    base = _build_base(cfg, model_dtype, tok, ids, ckpt, folder, mcfg)
    if processor is None:
        processor = _new_processor(cfg, base, tok, ref, folder)
    base.config.use_cache = False
    for p in base.parameters():  # peft freezes the base anyway; be explicit for the vision tower
        p.requires_grad_(False)
    return base, processor


def _build_base(cfg, model_dtype: torch.dtype, tok, ids: dict, ckpt: Optional[Path], folder: Optional[Path], mcfg):
    """The Qwen-VL base model: tiny (saved weights, or random from the seeded RNG) or pretrained
    (AutoModel from its local folder, whose config `mcfg` is already checked)."""
    from transformers import AutoConfig, AutoModel

    tiny = cfg.backbone in TINY_TYPES
    if tiny and ckpt is not None:  # a random base cannot be re-drawn reliably: load the saved one
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
    if tiny:
        mcfg = tiny_backbone_config(cfg.backbone, len(tok), ids, cfg.attn_implementation)
        return AutoModel.from_config(mcfg)  # random weights from the caller's seeded RNG
    # The summary tokens' ids may lie past the end of the embedding table: they are never looked up
    # there (their slots are overwritten, model.py _summary_states), so the table is not resized.
    with _reading(folder, "backbone weights", BackboneError):
        return AutoModel.from_pretrained(str(folder), config=mcfg, attn_implementation=cfg.attn_implementation,
                                         dtype=model_dtype, local_files_only=True)


def _new_processor(c, base, tok, ref, folder: Optional[Path]):
    """Tokenizer + Qwen's PIL image processor with config `c`'s pixel budget and the backbone's
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
    improc = build_image_processor(c.min_pixels, c.max_pixels, patch, merge, tpatch, mean, std)
    return processor_class()(improc, tok, chat_template=CHAT_TEMPLATE)


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
