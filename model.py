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

Prompts: the authors' own sentences (dataset.py FashionCollator), as Qwen-VL's chat template renders
their message lists. The rendering ends with "<|im_end|>\n" after the summary token; under causal
attention a token never sees the tokens after it, so those cannot change h, and our prompts end at the
summary token. The summary tokens <|query|> and <|target|> are nn.Parameters of width D (initialised
from `<|im_end|>`'s embedding, the authors' model.py 148-155) written into their slots of the input
embeddings, so gradients reach them while the embedding table stays frozen. Their gradient norm is
GGAS's task-difficulty signal (sampler.py, via token_parameters()).

What trains: LoRA (peft) on the language model's q/k/v/o/gate/up/down projections, the two summary
tokens and the calibrator. A pretrained vision tower stays frozen (it already sees well and is the part
most easily damaged); the random tiny one trains (train_vision="auto") at a 10x smaller learning rate
(train.py's vision_lr_scale), or it soon keeps only colour and forgets the garment's shape.

Collation (support/qwen.py) turns a prompt into token ids with one pad per visual token, the images'
and video's pixel patches, and positions (EmbedderConfig.positions: mRoPE from the backbone's own
get_rope_index, or the plain sequence the authors' call computes on Qwen3-VL). Rows are
right-padded, attention is causal and the summary token is each row's last real token, so padding never
reaches h. Backbones: a local Qwen2/2.5/3-VL (paper: Qwen3-VL-4B-Instruct) or the offline "tiny" one.

Where it sits: data.py makes Query objects and images -> **model.py embeds them** -> train.py (InfoNCE
+ GradCache + GGAS) and evaluate.py (faiss Recall@K) use the vectors. Checkpoints: support/checkpoint.py.
Run: `python model.py` builds the tiny embedder (no network) and prints a similarity matrix.
Shapes: B queries, G gallery images, L sequence length, D hidden size, V vocabulary size.
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import data
from support import checkpoint, fast_encode, plumbing, qwen, recipes
from support.config_fields import knob
from support.qwen import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START, ModelInputs
from support.tiny_backbone import TINY_TYPES

# Where the summary tokens start (EmbedderConfig.summary_init; a test holds the field's rule equal).
SUMMARY_INITS = ("im_end", "words")


# The prompt pieces (the authors' sentences, dataset.py FashionCollator). They are part of the model: a
# checkpoint only works with the prompts it was trained on. Our two learnable summary tokens are added
# to the tokenizer as special tokens, so BPE never splits them.
QUERY_TOKEN, TARGET_TOKEN = "<|query|>", "<|target|>"
SYSTEM_PROMPT = "You are a fashion expert in processing fashion images."
QUERY_CLOSING = "Summarize the semantic feature of the target fashion image in one word."
TARGET_CLOSING = "Summarize the image in one word."
# An image / a video part as the chat template writes it, before the pads are expanded.
IMAGE_PART = VISION_START + IMAGE_PAD + VISION_END
VIDEO_PART = VISION_START + VIDEO_PAD + VISION_END


def _chat(user: str, summary_token: str) -> str:
    """The ChatML prompt: system turn, user turn, then the assistant turn up to the summary token."""
    return (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            f"<|im_start|>assistant\n{summary_token}")


@dataclass
class EmbedderConfig:
    """Everything needed to rebuild the embedder; saved as JSON inside each checkpoint. A None field
    takes its recipe's value when the embedder is built (support/recipes.py: `tiny-cpu` for the tiny
    backbones, `paper`, the authors' values, for a real Qwen-VL), so a checkpoint holds the numbers."""
    backbone: str = knob("tiny", "any")       # "tiny" | "tiny-qwen2-vl" | hub id | local folder
    seed: int = knob(0, "any")                # seeds the tiny base (seed), LoRA init (+1), calibrator (+2)
    recipe: str = knob("auto", "auto | paper | tiny-cpu")  # where the None fields below come from
    min_pixels: Optional[int] = knob(None, ">= 1")           # an image's pixel budget, lower end
    max_pixels: Optional[int] = knob(None, ">= min_pixels")  # ... upper end (aspect ratio kept)
    max_query_images: Optional[int] = knob(None, ">= 0; 0 = all")  # images per query prompt
    query_sketches: Optional[str] = knob(None, "one | all")  # an item's sketches: one prompt each | together
    num_frames: Optional[int] = knob(None, ">= 1")           # frames of a video query (evenly spaced)
    video_size: Optional[int] = knob(None, ">= 1")           # each frame resized to video_size^2
    lora_r: int = knob(8, ">= 1")                            # LoRA rank (paper: 8)
    lora_alpha: int = knob(16, "> 0")                        # LoRA scale numerator (scale alpha / r = 2)
    lora_dropout: Optional[float] = knob(None, "[0, 1)")     # dropout on the LoRA input
    summary_init: Optional[str] = knob(None, "im_end | words")  # the summary tokens' first values
    calibrator: str = knob("slerp", "slerp | linear | off")  # PGSQC mode: paper | ablation | identity
    calibrator_rank: int = knob(32, ">= 1")                  # rank r of the per-query low-rank map (paper: 32)
    calibrator_hidden: int = knob(512, ">= 1")               # hyper-network width (paper: 512)
    slerp_edge: Optional[str] = knob(None, "exact | authors")  # PGSQC near q: exact slerp | the authors' clamped one
    positions: Optional[str] = knob(None, "authors | mrope | sequential")  # token positions; authors = as their call
    dtype: str = knob("auto", "any")          # auto: float32 on CPU, bfloat16 on GPU; or a torch dtype name
    attn_implementation: str = knob("sdpa", "any")  # torch's fused attention; "eager" for debugging
    device: str = knob("auto", "any")         # auto: cuda if available else cpu
    train_vision: str = knob("auto", "auto | true | false")  # auto: train a tiny tower, freeze a real one
    tiny_vocab_size: int = knob(1536, ">= 1")  # BPE vocabulary of the offline tokenizer


class _Prompt(NamedTuple):
    """One row before collation: which prompt, and the pictures that fill its placeholders."""
    kind: str                  # "query" (prompt_q) | "target" (prompt_t)
    instruction: str           # the query's instruction ("" for a target)
    images: list               # PIL images (or paths), in prompt order
    frames: list               # the video's frames ([] = no video)
    frame_times: list          # seconds of each frame in its clip


def _prompt_text(p: _Prompt, images: str, video: str) -> str:
    """A row's prompt with its visual tokens already expanded (`images`, `video`: their pad blocks,
    written by support/qwen.py): render_query / render_target with the placeholders filled."""
    if p.kind == "target":
        return _chat(images + TARGET_CLOSING, TARGET_TOKEN)
    return _chat(p.instruction + images + video + QUERY_CLOSING, QUERY_TOKEN)


class FashionLensEmbedder(nn.Module):
    """Qwen-VL + LoRA + learnable query/target summary tokens + optional PGSQC calibrator.

    forward(queries=None, images=None) -> dict(q, q_raw, lam, reg, t) with gradients (training);
    encode_queries / encode_images -> float32 CPU tensors, no grad, eval mode, batched (inference).
    Construction (__init__) comes after the computation below; read it second.
    """

    # ==============================================================================================
    # Summary state: h = LLM(prompt)[pos(summary token)]   (eq. 1 and 4)
    # ==============================================================================================
    def _summary_states(self, x: ModelInputs, token_id: int, token: torch.Tensor) -> torch.Tensor:
        """Run the backbone on B collated prompts -> (B, D) summary states h."""
        base = self._base()
        x = x.to(self._device, self.model_dtype)                    # pixels in the model's dtype
        # Embed the prompt, then put the learnable vector into the summary token's slot. Our added
        # token ids lie past the frozen table's end, so they look up the pad row first (overwritten).
        safe_ids = x.input_ids.masked_fill(x.input_ids >= base.get_input_embeddings().weight.shape[0],
                                           self.pad_token_id)       # (B, L)
        embeds = base.get_input_embeddings()(safe_ids)              # (B, L, D)
        slot = (x.input_ids == token_id)                             # (B, L) exactly one per row
        embeds = torch.where(slot[..., None], token.to(embeds.dtype), embeds)  # (B, L, D)
        # The backbone writes each image's and video's visual tokens into their placeholder slots itself.
        out = base(inputs_embeds=embeds, attention_mask=x.attention_mask, position_ids=x.position_ids,
                   pixel_values=x.pixel_values, image_grid_thw=x.image_grid_thw,
                   pixel_values_videos=x.pixel_values_videos, video_grid_thw=x.video_grid_thw, use_cache=False)
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
        LoRA merged on a CPU and batches on parallel threads: support/fast_encode.py."""
        collate = self.collate_queries if key == "q" else self.collate_images
        parts = [items[i: i + batch_size] for i in range(0, len(items), batch_size)]

        def encode_part(part) -> torch.Tensor:  # one batch on whichever thread takes it; (b, D)
            with torch.no_grad():  # grad mode is per thread: say it in the worker too
                x = collate(part)
                res = self(queries=x) if key == "q" else self(images=x)
                return res[key].float().cpu()

        # Reference: encode_part on each part in turn; the fast loop gives the same (B|G, D) rows.
        return fast_encode.encode_batches(self, parts, encode_part, f"encode {key}", progress, merge_lora)

    def merged_lora(self):
        """Context manager: inference with LoRA folded into the weights (support/fast_encode.py)."""
        return fast_encode.merged_lora(self)

    # ==============================================================================================
    # Prompts: the chat strings of prompt_q and prompt_t, and collation (support/qwen.py)
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

    def collate_queries(self, queries: Sequence) -> ModelInputs:
        """B queries (Query | Record | str) -> ModelInputs of prompt_q; images first, then the video."""
        return self.collator.collate([self._as_query(q) for q in queries])

    def collate_images(self, images: Sequence) -> ModelInputs:
        """G gallery images (PIL | path) -> ModelInputs of prompt_t, one prompt per image."""
        return self.collator.collate_images([_Prompt("target", "", [im], [], []) for im in images])

    def image_tokens(self, width: int, height: int) -> int:
        """Visual tokens of a width x height image at this embedder's pixel budget."""
        return self.collator.image_tokens(width, height)

    def query_options(self) -> dict:
        """This recipe's query options, as keyword arguments of data.UFire.train_view (support/recipes.py)."""
        return recipes.query_options(self.config)

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
        config = recipes.resolve_embedder_config(config or EmbedderConfig())
        self.config, self.tiny = config, config.backbone in TINY_TYPES
        self._device, self.model_dtype = qwen.device_and_dtype(config)  # float32 on CPU, bfloat16 on GPU
        ckpt = Path(_checkpoint) if _checkpoint else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # the random tiny base's weights
            base, self.processor = qwen.build_backbone(config, self.model_dtype, ckpt, (QUERY_TOKEN, TARGET_TOKEN))
        qwen.read_token_layout(self, base, QUERY_TOKEN, TARGET_TOKEN)  # token ids, D, patch geometry
        self.collator = qwen.Collator(self, base, _prompt_text, data.load_image)
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
            checkpoint.load_extras(self, ckpt)

    def _add_lora(self, base, ckpt: Optional[Path]):
        """Wrap `base` in LoRA on the language model's linears: a fresh init (seed + 1) or a saved one."""
        from peft import LoraConfig, get_peft_model

        cfg = self.config
        # peft matches module names with this regex: only the language model's projections
        # (Qwen2.5-VL's vision MLP also has gate/up/down_proj, so a bare name list would catch it).
        target = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
        with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
            warnings.simplefilter("ignore", FutureWarning)
            if ckpt is not None:
                return checkpoint.load_lora(base, ckpt)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed + 1)
                lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                  target_modules=target, bias="none")
                return get_peft_model(base, lora)

    def _add_summary_tokens(self) -> None:
        """The learnable <|query|> / <|target|> vectors, initialised from rows of the frozen table:
        summary_init "im_end" = both from <|im_end|>, the token that ends a turn (the authors'
        model.py 148-155); "words" = from the words " word" and " item" (tiny-cpu, support/recipes.py)."""
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
                                            mode=cfg.calibrator, slerp_edge=cfg.slerp_edge)

    def _base(self):
        """The Qwen-VL base model (with LoRA layers injected in place)."""
        return self.backbone.get_base_model()

    @property
    def device(self) -> torch.device:
        """Where the backbone, the tokens and the calibrator live."""
        return self._device

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
    # Save and load: support/checkpoint.py (the folder's layout, and every check on loading)
    # ==============================================================================================
    def save_into(self, folder: str | os.PathLike) -> None:
        """Write every checkpoint file into `folder`, which must not exist yet (not atomic on its own)."""
        checkpoint.save_into(self, folder)

    def save_pretrained(self, path: str | os.PathLike) -> str:
        """Write the checkpoint folder atomically (the old one stays until the new one is complete)."""
        path = Path(path).resolve()
        plumbing.atomic_write(path, self.save_into)
        return str(path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, backbone: Optional[str] = None,
                        device: Optional[str] = None) -> "FashionLensEmbedder":
        """Load a checkpoint folder (`backbone`: the one the caller expects); a damaged or edited one
        raises CheckpointError naming the file and field, and a real backbone is never downloaded."""
        return checkpoint.load(cls, EmbedderConfig, path, backbone, device)


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
