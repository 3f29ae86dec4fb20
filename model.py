"""FashionLens embedding model: one multimodal LLM turns any fashion query, and any gallery image, into
a unit vector, so that retrieval is a dot product.

Concept (Wen et al., 2026, "Toward Versatile Fashion Image Retrieval via Task-Adaptive Learning").
A Qwen-VL chat model reads a prompt whose assistant turn is a single learnable *summary token*. The
model has been asked to "summarise the item in one word", so its last hidden state at that token is
pushed to hold the whole request; L2-normalised, that state is the embedding:

    prompt_q = system("fashion expert") + user(instruction, images / video frames in order,
               "summarise the target item in one word") + assistant(<|query|>)
    prompt_t = system("fashion expert") + user(gallery image, "summarise this item in one word")
               + assistant(<|target|>)

    (1)  h_q   = LLM(prompt_q)[pos(<|query|>)]                    (B, D)  query summary state
    (2)  q_raw = h_q / ||h_q||                                    (B, D)  uncalibrated query
    (3)  q     = PGSQC(h_q)   (calibrator.py; q = q_raw when off)  (B, D)  calibrated query
    (4)  t     = h_t / ||h_t||,  h_t = LLM(prompt_t)[pos(<|target|>)]      (G, D)  gallery item
    (5)  score(q, t) = q . t                                      cosine similarity of unit vectors

Only queries pass the calibrator, so the gallery is encoded once and cached (evaluate.py).

The summary tokens <|query|> and <|target|> are nn.Parameters of width D, initialised from the
embeddings of the words " word" and " item". They are added to the tokenizer as special tokens and
their slots in the input embeddings are overwritten (`inputs_embeds`), so gradients reach them while
the embedding table itself stays frozen. Their gradient norm is GGAS's task-difficulty signal
(sampler.py, via token_parameters()).

What trains: LoRA (peft) on the language model's q/k/v/o/gate/up/down projections, the two summary
tokens and the calibrator, always. A pretrained vision tower stays frozen (it already sees well and is
the part most easily damaged). The random tiny vision tower is trainable (train_vision="auto"), at a
10x smaller learning rate (train.py's vision_lr_scale), because at the adapters' rate it soon keeps only
colour (the cue most tasks share) and forgets the garment's shape, which sketch, outfit and attribute
queries need.

Video: the stock Qwen video path needs torchvision's video processor and, for Qwen3-VL, timestamp
text; so a video is fed as `num_frames` ordered frames through the image path, each frame its own
<|vision_start|>...<|vision_end|> block after the words "Video frames in order:".

Batch independence: sequences are right-padded and attention is causal, and the summary token is the
last real token, so padding never reaches it; mRoPE position ids come from the backbone's own
get_rope_index with the attention mask; the vision tower attends within each image only.

Backbones (one code path, told apart by the config's `model_type`): any Qwen2-VL / Qwen2.5-VL /
Qwen3-VL hub id or local path (the paper: Qwen3-VL-4B-Instruct), or an offline random "tiny" one
(tiny_backbone.py, the default, so everything runs on a CPU with no download).

Inputs: collate_queries / collate_images turn items into ModelInputs (token ids, mask, mRoPE
positions, image patches), and forward reads those tensors; a plain list is collated on the spot.
The collators touch no trainable weight, so train.py runs them ahead on the spare core.

Where it sits: data.py makes Query objects and images -> **model.py embeds them** -> train.py (InfoNCE
+ GradCache + GGAS) and evaluate.py (faiss Recall@K) use the vectors.
Run: `python model.py` builds the tiny embedder (no network) and prints a similarity matrix.
Shapes: B queries, G gallery images, L sequence length, D hidden size, V vocabulary size,
N image patches (all images of a batch), n_img images in a batch, C*T*p*p values per patch.
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
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import plumbing
from errors import FashionLensError
from tiny_backbone import (CHAT_TEMPLATE, TINY_TYPES, build_image_processor, build_tiny_tokenizer,
                           processor_class, tiny_backbone_config, vision_geometry)

# Architectures the embedder knows how to drive (their get_rope_index and vision tower API).
SUPPORTED_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@dataclass
class EmbedderConfig:
    """Everything needed to rebuild the embedder; saved as JSON inside each checkpoint."""
    backbone: str = "tiny"          # "tiny" | "tiny-qwen2-vl" | hub id | local path; tiny = offline CPU default
    seed: int = 0                   # seeds the random tiny base (seed), the LoRA init (+1), the calibrator (+2)
    image_size: int = 64            # every image is resized to image_size^2 -> a fixed token count per image
    max_query_images: int = 4       # a query keeps at most this many images (outfits have up to ~4 items)
    num_frames: int = 4             # video queries are this many ordered frames
    lora_r: int = 8                 # LoRA rank (paper: 8)
    lora_alpha: int = 16            # LoRA scale numerator (paper: 16, i.e. scale alpha / r = 2)
    # LoRA dropout. None = auto (auto_lora_dropout): the paper's 0.05 on a real backbone, 0 on the tiny
    # CPU default, where the dropout masks are a sizeable share of a step's time and a model this small,
    # trained this briefly, is far from overfitting, so the time buys more steps instead.
    # A checkpoint saves the resolved number.
    lora_dropout: Optional[float] = None
    calibrator: str = "slerp"       # PGSQC mode: slerp (paper) | linear (ablation) | off (identity)
    calibrator_rank: int = 32       # rank r of the calibrator's per-query low-rank map (paper: 32)
    calibrator_hidden: int = 512    # hidden width of the calibrator's hyper-network (paper: 512)
    dtype: str = "auto"             # auto: float32 on CPU (exactness), bfloat16 on GPU (memory/speed)
    attn_implementation: str = "sdpa"  # torch's fused attention; "eager" for debugging
    device: str = "auto"            # auto: cuda if available else cpu
    # auto: train a random tiny vision tower in full, freeze a pretrained one; "true"/"false" force it
    train_vision: str = "auto"
    tiny_vocab_size: int = 1536     # BPE vocabulary of the offline tokenizer (its fashion corpus is small)


def auto_lora_dropout(backbone: str) -> float:
    """EmbedderConfig.lora_dropout=None resolves to this: 0 for a tiny random base, 0.05 (paper) else."""
    return 0.0 if backbone in TINY_TYPES else 0.05


# The prompt pieces. The strings are part of the model: a checkpoint only works with the prompts it
# was trained on, so they never change. Our two learnable summary tokens are added to the tokenizer
# as special tokens, so BPE never splits them.
QUERY_TOKEN, TARGET_TOKEN = "<|query|>", "<|target|>"
SYSTEM_PROMPT = "You are a fashion expert."
QUERY_CLOSING = "Summarize the target fashion item in one word."
TARGET_CLOSING = "Summarize this fashion item in one word."
IMAGE_PAD = "<|image_pad|>"                           # one visual token's placeholder
IMAGE_BLOCK = "<|vision_start|>{pads}<|vision_end|>"  # one image: its placeholders between markers


@dataclass
class ModelInputs:
    """A batch of prompts as the backbone reads them: what the collators (collate_queries /
    collate_images) produce and forward consumes. Plain CPU tensors, so a worker can build them."""
    input_ids: torch.Tensor                 # (B, L) token ids, right-padded
    attention_mask: torch.Tensor            # (B, L) 1 = real token, 0 = padding
    position_ids: torch.Tensor              # (3, B, L) mRoPE positions (time, height, width)
    pixel_values: Optional[torch.Tensor]    # (N, C*T*p*p) patches of the batch's images in prompt order; None: text only
    image_grid_thw: Optional[torch.Tensor]  # (n_img, 3) each image's patch grid; None: text only
    summary_index: torch.Tensor             # (B,) position of the summary token (<|query|> / <|target|>) per row
    images_per_row: torch.Tensor            # (B,) images (and video frames) in each row's prompt

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, start: int, end: int) -> "ModelInputs":
        """Rows start:end as a batch of their own (their images only, padding cut to their longest
        row): the same tensors that collating those rows alone would give (tests/test_fast_paths.py)."""
        if start == 0 and end == len(self):
            return self
        per_row = self.images_per_row.tolist()
        img0, img1 = sum(per_row[:start]), sum(per_row[:end])      # this slice's images
        pixels = grid = None
        if img1 > img0:
            patches = self.image_grid_thw.prod(dim=-1).tolist()     # (n_img,) patches per image
            p0, p1 = sum(patches[:img0]), sum(patches[:img1])
            pixels, grid = self.pixel_values[p0:p1], self.image_grid_thw[img0:img1]  # (N', .), (n', 3)
        length = int(self.attention_mask[start:end].sum(dim=1).max())  # the slice's longest real row
        return ModelInputs(input_ids=self.input_ids[start:end, :length],              # (b, L')
                           attention_mask=self.attention_mask[start:end, :length],    # (b, L')
                           position_ids=self.position_ids[:, start:end, :length],     # (3, b, L')
                           pixel_values=pixels, image_grid_thw=grid,
                           summary_index=self.summary_index[start:end],               # (b,)
                           images_per_row=self.images_per_row[start:end])             # (b,)


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
    def _image_block(self) -> str:
        """One image in a prompt: tokens_per_image placeholders, later replaced by its visual tokens."""
        return IMAGE_BLOCK.format(pads=IMAGE_PAD * self.tokens_per_image)

    def render_query(self, instruction: str, n_images: int, n_frames: int, expand: bool = True) -> str:
        """prompt_q as text, ending with the query token. expand=False writes one placeholder per image
        (the chat template's form, used to check the two agree)."""
        block = self._image_block() if expand else IMAGE_BLOCK.format(pads=IMAGE_PAD)
        user = instruction.strip()
        if n_images:
            user += "\n" + block * n_images
        if n_frames:
            user += "\nVideo frames in order:" + block * n_frames
        user += "\n" + QUERY_CLOSING
        return (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
                f"<|im_start|>assistant\n{QUERY_TOKEN}")

    def render_target(self, expand: bool = True) -> str:
        """prompt_t as text, ending with the target token (the same string for every gallery image)."""
        block = self._image_block() if expand else IMAGE_BLOCK.format(pads=IMAGE_PAD)
        return (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{block}\n{TARGET_CLOSING}"
                f"<|im_end|>\n<|im_start|>assistant\n{TARGET_TOKEN}")

    def _prep_image(self, img) -> Image.Image:
        """PIL or path -> RGB image_size x image_size (square, so every image has the same tokens)."""
        s = self.config.image_size
        if isinstance(img, (str, os.PathLike)):
            import data  # lazy: only path inputs need data.py's image loader
            img = data.load_image(str(img), s)
        if img.mode != "RGB":
            img = img.convert("RGB")
        if img.size != (s, s):
            img = img.resize((s, s), Image.BICUBIC)
        return img

    def _as_query(self, item):
        """Query | Record | str -> (instruction, images, frames) within the configured caps."""
        if isinstance(item, str):
            return item, [], []
        if not hasattr(item, "instruction"):  # a data.Record: build its deterministic eval query
            import data
            item = data.record_to_query(item, self.config.image_size, self.config.max_query_images,
                                        self.config.num_frames)
        images = list(item.images)[: self.config.max_query_images]
        frames = list(getattr(item, "frames", []) or [])
        n = self.config.num_frames
        if len(frames) > n:  # uniform subsample keeps the order and the whole clip's span
            frames = [frames[round(i * (len(frames) - 1) / max(n - 1, 1))] for i in range(n)]
        return item.instruction, images, frames

    # ==============================================================================================
    # Collators: prompts + images -> the tensors the backbone reads (ModelInputs). They touch no
    # trainable weight, so train.py prepares the next batch during a step (prefetch.py), and the
    # encoder collates one batch while another computes.
    # ==============================================================================================
    def collate_queries(self, queries: Sequence) -> "ModelInputs":
        """B queries (Query | Record | str) -> ModelInputs of prompt_q; images first, then video frames."""
        texts, imgs, counts = [], [], []
        for q in queries:
            instr, images, frames = self._as_query(q)
            texts.append(self.render_query(instr, len(images), len(frames)))
            imgs += images + frames  # prompt order: images first, then the video frames
            counts.append(len(images) + len(frames))
        return self._collate(texts, imgs, counts)

    def collate_images(self, images: Sequence) -> "ModelInputs":
        """G gallery images (PIL | path) -> ModelInputs of prompt_t, one prompt per image.

        Every row is the same prompt with one image of the same size, so its token ids and mRoPE
        positions are computed once and repeated; only the pixels differ from row to row.
        """
        if self._target_row is None:
            probe = self._collate([self.render_target()], [Image.new("RGB", (self.config.image_size,) * 2)], [1])
            self._target_row = (probe.input_ids, probe.attention_mask, probe.position_ids)  # (1, L) x2, (3, 1, L)
        ids, attn, pos = self._target_row
        g = len(images)
        pixels, grid = self._pixels(list(images))                                   # (N, C*T*p*p), (G, 3)
        return ModelInputs(input_ids=ids.repeat(g, 1), attention_mask=attn.repeat(g, 1),  # (G, L) each
                           position_ids=pos.repeat(1, g, 1), pixel_values=pixels,          # (3, G, L)
                           image_grid_thw=grid, summary_index=_slot_index(ids == self.target_token_id).repeat(g),
                           images_per_row=torch.ones(g, dtype=torch.int64))          # (G,) one image each

    def _collate(self, texts: list[str], images: list, counts: list[int]) -> "ModelInputs":
        """Tokenise B prompts (right-padded), patchify their images (counts[i] of them in prompt i),
        and lay out the mRoPE positions."""
        enc = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        input_ids, attn = enc["input_ids"], enc["attention_mask"]          # (B, L) each; 1 = real token
        pixels, grid = self._pixels(images)                                # (N, C*T*p*p), (n_img, 3) or None
        # mRoPE positions from the backbone's own rule (it reads only the config, no weights); padding
        # is excluded by the mask, so a row's positions depend only on that row.
        pos, _ = self._base().get_rope_index(input_ids, mm_token_type_ids=(input_ids == self.image_token_id).int(),
                                             image_grid_thw=grid, attention_mask=attn)  # (3, B, L)
        slot = (input_ids == self.query_token_id) | (input_ids == self.target_token_id)  # (B, L)
        return ModelInputs(input_ids=input_ids, attention_mask=attn, position_ids=pos, pixel_values=pixels,
                           image_grid_thw=grid, summary_index=_slot_index(slot),
                           images_per_row=torch.tensor(counts, dtype=torch.int64))  # (B,)

    def _pixels(self, images: list):
        """Images -> (pixel patches (N, C*T*p*p) float32, grid (n_img, 3)), or (None, None) for none."""
        if not images:
            return None, None
        pv = self.image_processor([self._prep_image(im) for im in images], return_tensors="np")
        return torch.from_numpy(pv["pixel_values"]), torch.from_numpy(pv["image_grid_thw"])  # (N, .), (n_img, 3)

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
        # The backbone writes each image's visual tokens into its placeholder slots itself.
        out = base(inputs_embeds=embeds, attention_mask=x.attention_mask.to(self._device),
                   position_ids=x.position_ids.to(self._device), pixel_values=pixels, image_grid_thw=grid,
                   use_cache=False)
        hidden = out.last_hidden_state                               # (B, L, D)
        rows = torch.arange(hidden.shape[0], device=hidden.device)   # (B,)
        return hidden[rows, x.summary_index.to(hidden.device)].float()  # (B, D) h at pos(summary token)

    # ==============================================================================================
    # Forward (training) and encode (inference)
    # ==============================================================================================
    def forward(self, queries: Optional[Sequence] = None, images: Optional[Sequence] = None) -> dict:
        """Embed queries and/or gallery images with gradients.

        Returns a dict with, when queries are given: 'q' (B, D) calibrated unit queries,
        'q_raw' (B, D) uncalibrated unit queries, 'lam' (B,) calibration strengths; when images are
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
            else:
                out["q"] = out["q_raw"]                              # (B, D) eq. 3 when off: q = q_raw
                out["lam"] = torch.zeros(h.shape[0], device=h.device)  # (B,)
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
        config = config or EmbedderConfig()
        if config.lora_dropout is None:  # resolve "auto" once, so the saved config holds the number
            config = replace(config, lora_dropout=auto_lora_dropout(config.backbone))
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
        self._target_row = None  # collate_images' cached (ids, mask, positions) of the one target prompt
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
        """Token ids, width D and visual tokens per image, read off the built tokenizer and processor."""
        self.model_type = base.config.model_type
        self.tokenizer = self.processor.tokenizer
        self.image_processor = self.processor.image_processor
        tok = self.tokenizer
        self.query_token_id = tok.convert_tokens_to_ids(QUERY_TOKEN)
        self.target_token_id = tok.convert_tokens_to_ids(TARGET_TOKEN)
        self.image_token_id = tok.convert_tokens_to_ids(IMAGE_PAD)
        self.pad_token_id = tok.pad_token_id
        self.dim = int(base.config.text_config.hidden_size)  # D
        # Ask the processor once (its smart_resize rounds to patch * merge), then divide the patch
        # grid by the merge^2 patches each visual token pools.
        probe = self.image_processor([Image.new("RGB", (self.config.image_size,) * 2)], return_tensors="np")
        merge = self.image_processor.merge_size
        self.tokens_per_image = int(probe["image_grid_thw"][0].prod()) // merge ** 2  # 16 for the tiny default

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
        """The learnable <|query|> / <|target|> vectors, initialised from the words " word" / " item"."""
        emb = self._base().get_input_embeddings().weight  # (V, D) the frozen embedding table
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
        weights), else a hub id / local path. A checkpoint always supplies the processor, because
        its tokenizer holds the added summary tokens."""
        from transformers import AutoTokenizer

        cfg = self.config
        processor = None
        if ckpt is not None:  # its tokenizer holds our summary tokens: a damaged one is reported, not rebuilt
            with _reading(ckpt / PROCESSOR_DIR, "tokenizer / image processor"):
                processor = processor_class().from_pretrained(str(ckpt / PROCESSOR_DIR))
        if processor is not None:
            tok = processor.tokenizer
        elif self.tiny:
            tok = build_tiny_tokenizer(cfg.tiny_vocab_size)
        else:
            tok = AutoTokenizer.from_pretrained(cfg.backbone, padding_side="right")
        tok.padding_side = "right"  # the summary token must be each row's last real token
        if ckpt is None:
            tok.add_special_tokens({"additional_special_tokens": [QUERY_TOKEN, TARGET_TOKEN]},
                                   replace_extra_special_tokens=False)
        ids = {"pad": tok.convert_tokens_to_ids("<|endoftext|>"), "eos": tok.convert_tokens_to_ids("<|im_end|>"),
               "image": tok.convert_tokens_to_ids(IMAGE_PAD), "video": tok.convert_tokens_to_ids("<|video_pad|>"),
               "vision_start": tok.convert_tokens_to_ids("<|vision_start|>"),
               "vision_end": tok.convert_tokens_to_ids("<|vision_end|>")}
        if tok.pad_token is None:
            tok.pad_token = "<|endoftext|>"
        base = self._build_base(tok, ids, ckpt)
        if processor is None:
            processor = self._new_processor(base, tok)
        base.config.use_cache = False
        for p in base.parameters():  # peft freezes the base anyway; be explicit for the vision tower
            p.requires_grad_(False)
        return base, processor

    def _build_base(self, tok, ids: dict, ckpt: Optional[Path]):
        """The Qwen-VL base model: tiny (saved weights, or random from the seeded RNG) or pretrained."""
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
        mcfg = AutoConfig.from_pretrained(cfg.backbone)
        if mcfg.model_type not in SUPPORTED_TYPES:
            raise ValueError(f"backbone {cfg.backbone!r} has model_type {mcfg.model_type!r}; "
                             f"supported: {SUPPORTED_TYPES}")
        base = AutoModel.from_pretrained(cfg.backbone, attn_implementation=cfg.attn_implementation,
                                         dtype=self.model_dtype)
        if len(tok) > base.get_input_embeddings().weight.shape[0]:
            base.resize_token_embeddings(len(tok))  # only if the added tokens overflow the table
        return base

    def _new_processor(self, base, tok):
        """Tokenizer + an image processor fixed to image_size^2; a pretrained backbone keeps its own
        pixel normalisation (0.5 / 0.5, Qwen3-VL's, when it cannot be read)."""
        patch, merge, tpatch = vision_geometry(base.config)
        mean, std = (0.5,) * 3, (0.5,) * 3
        if not self.tiny:
            try:
                from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
                ref = Qwen2VLImageProcessorPil.from_pretrained(self.config.backbone)
                mean, std = tuple(ref.image_mean), tuple(ref.image_std)
            except Exception:  # noqa: BLE001 -- fall back to Qwen3-VL's 0.5/0.5
                pass
        improc = build_image_processor(self.config.image_size, patch, merge, tpatch, mean, std)
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
                "dim": self.dim, "tokens_per_image": self.tokens_per_image, "format": 1,
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
        config contradicts what was saved with it, before or while loading. Checkpoints written
        before the sha256 field existed load as before (their files are not verified).
        """
        path = Path(path)
        meta, config = _read_meta(path)
        missing = [f for f in cls.required_files(meta["config"]) if not (path / f).is_file()]
        if missing:
            raise CheckpointError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
        if backbone is not None and backbone != config.backbone:
            raise CheckpointError(f"{path}: checkpoint was trained on backbone {config.backbone!r}, "
                                  f"not {backbone!r}")
        _check_saved_files(path, meta, config)  # cheap checks first: checksums and JSON files
        if device is not None:
            config.device = device
        emb = cls(config, _checkpoint=str(path))  # loading itself names a file it cannot parse
        _check_built(path, meta, emb)  # what only the built model knows: width, image geometry
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


class CheckpointError(FashionLensError, ValueError):
    """A checkpoint folder is incomplete or belongs to another backbone (the message names the path)."""


# ================================================================================================
# Checkpoint checks: each way a folder can be damaged or edited is refused naming file and field.
# ================================================================================================


def _read_meta(path: Path) -> tuple[dict, EmbedderConfig]:
    """(the saved embedder_config.json, its EmbedderConfig), or CheckpointError naming the file."""
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: not a FashionLens checkpoint (missing {CONFIG_FILE})")
    try:
        meta = json.loads(cfg_file.read_text())
        known = {f.name for f in fields(EmbedderConfig)}  # tolerate fields a newer version added
        config = EmbedderConfig(**{k: v for k, v in meta["config"].items() if k in known})
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # ValueError: bad JSON or UTF-8
        raise CheckpointError(f"{cfg_file}: unreadable embedder config ({_one_line(e)})") from e
    return meta, config


def _check_saved_files(path: Path, meta: dict, config: EmbedderConfig) -> None:
    """Before building: the weight files are the ones saved, and the JSON files agree with the config."""
    cfg_file = path / CONFIG_FILE
    # A truncated or overwritten weight file is named here, before any library tries to parse it.
    for rel, digest in (meta.get("sha256") or {}).items():  # checkpoints written before sha256: skipped
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
    """After building: the backbone, width and image geometry are the ones the config was saved with."""
    cfg_file = path / CONFIG_FILE
    for field, built in (("model_type", emb.model_type), ("dim", emb.dim)):
        if meta.get(field, built) != built:
            raise CheckpointError(f"{cfg_file}: {field}={meta[field]!r}, but the backbone built from "
                                  f"this checkpoint has {field}={built!r}")
    # The saved processor resizes every image to a fixed pixel budget (min = max = image_size^2 at
    # save time); an edited image_size would shrink the images first and blur every embedding.
    budget = _pixel_budget(emb.image_processor)
    size = emb.config.image_size
    if budget is not None and budget != size * size:
        raise CheckpointError(f"{cfg_file}: image_size={size} contradicts the saved image processor in "
                              f"{path / PROCESSOR_DIR} ({budget} pixels per image = {budget ** 0.5:g}^2)")
    if meta.get("tokens_per_image", emb.tokens_per_image) != emb.tokens_per_image:
        raise CheckpointError(f"{cfg_file}: tokens_per_image={meta['tokens_per_image']}, but the saved "
                              f"processor gives {emb.tokens_per_image} visual tokens per image")


def _pixel_budget(image_processor) -> Optional[int]:
    """The processor's fixed pixels per image (Qwen's min_pixels == max_pixels), or None if unset."""
    size = getattr(image_processor, "size", None)
    for key in ("shortest_edge", "min_pixels"):  # transformers 5 names it shortest_edge, 4 min_pixels
        value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
        value = value if value is not None else getattr(image_processor, key, None)
        if value is not None:
            return int(value)
    return None


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
def _reading(file: Path, what: str):
    """Turn any failure to parse a checkpoint file (JSON, safetensors, tokenizer: each library raises
    its own types) into one CheckpointError naming the file; CheckpointErrors pass unchanged."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 -- third-party parsers; the message keeps their reason
        raise CheckpointError(f"{file}: cannot load the {what} (damaged, truncated or not this "
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
          f"{emb.tokens_per_image} tokens/image")
    colours = {"red dress": (200, 30, 30), "blue shirt": (30, 60, 200), "green dress": (30, 160, 60),
               "yellow shirt": (230, 200, 40)}
    size = emb.config.image_size
    swatches = [Image.new("RGB", (size, size), c) for c in colours.values()]
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
