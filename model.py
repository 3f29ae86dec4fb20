"""FashionLens embedding model: one multimodal LLM that turns any fashion query or gallery image
into a unit vector, so retrieval is a dot product.

Concept (Wen et al., 2026, "Toward Versatile Fashion Image Retrieval via Task-Adaptive Learning").
A Qwen-VL chat model reads a prompt and a *learnable summary token* sits in the assistant turn; the
last hidden state at that token, L2-normalised, is the embedding:

    query  prompt = system("fashion expert") + user(instruction, images / video frames in order,
                    "summarise the target in one word") + assistant(<|query|>)
    target prompt = system("fashion expert") + user(gallery image, "summarise it in one word")
                    + assistant(<|target|>)

    h_q = LLM(prompt_q)[pos(<|query|>)]          (B, D)   raw summary state
    q_raw = h_q / ||h_q||                        (B, D)   uncalibrated query
    q = PGSQC(h_q)  (calibrator.py, slerp on the sphere; q = q_raw when off)
    t = h_t / ||h_t||,  h_t = LLM(prompt_t)[pos(<|target|>)]   (G, D)
    score(q, t) = q . t

Only queries pass the calibrator, so the gallery is encoded once and cached (evaluate.py).
The two summary tokens are nn.Parameters initialised from an existing word's embedding
(" word" / " item"); they replace the embedding of two special tokens added to the tokenizer
through `inputs_embeds`, so gradients reach them and the frozen embedding table stays frozen.
Their gradient norm is the task-difficulty signal of GGAS (sampler.py, via token_parameters()).

Where it sits: data.py makes Query objects and images -> **model.py embeds them** -> train.py
(InfoNCE + GradCache + GGAS) and evaluate.py (faiss Recall@K) use the vectors.

Backbones (same code path, detected from the AutoConfig `model_type`):
  * any Qwen2-VL / Qwen2.5-VL / Qwen3-VL hub id or local path (the paper: Qwen3-VL-4B-Instruct);
  * "tiny" (default): the Qwen3-VL architecture from a small config, random init from `seed`,
    with an offline byte-level BPE tokenizer trained deterministically on a fixed fashion corpus;
  * "tiny-qwen2-vl": the same idea on the Qwen2-VL architecture.
What trains: LoRA (peft) on the language model's q/k/v/o/gate/up/down projections, the two summary
tokens and the calibrator, always. A pretrained vision tower stays frozen (it already sees well and
is the part most easily damaged). The *random* tiny vision tower is trainable by default
(train_vision="auto"), but train.py gives it a 10x smaller learning rate (--vision-lr-scale 0.1):
at the adapters' rate it quickly keeps only colour (the cue most tasks share) and forgets the
garment's shape, which sketch, outfit and attribute queries need. The tiny language model gets LoRA
only, like the real one, so the tiny run exercises the paper's recipe. One departure: LoRA dropout is
0.05 (the paper) on a real backbone but 0 on the tiny one (lora_dropout=None resolves per backbone),
because on CPU the dropout masks cost ~30 % of a step and the time buys more steps instead.

Video: the stock Qwen video path needs the torchvision video processor (not allowed here) and, for
Qwen3-VL, timestamp text; so a video is fed as `num_frames` ordered frames through the image path,
each frame its own <|vision_start|>...<|vision_end|> block after the words "Video frames in order:".

Batch independence: sequences are right-padded; the summary token is the last real token and the
attention is causal, so padding never reaches it; mRoPE position ids come from the backbone's own
get_rope_index with the attention mask, and the vision tower attends within each image only.

Run: `python model.py` builds the tiny embedder (no network) and prints a similarity matrix.
Shapes: B batch of queries, G gallery images, L sequence length, D hidden size, N image patches,
r LoRA rank.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

# Special tokens of the Qwen chat format (same strings as the real Qwen-VL tokenizers).
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
# Our two learnable summary tokens (added as special tokens so BPE never splits them).
QUERY_TOKEN, TARGET_TOKEN = "<|query|>", "<|target|>"
SYSTEM_PROMPT = "You are a fashion expert."
QUERY_CLOSING = "Summarize the target fashion item in one word."
TARGET_CLOSING = "Summarize this fashion item in one word."
IMAGE_BLOCK = "<|vision_start|>{pads}<|vision_end|>"
# The ChatML template the Qwen-VL family uses (text and image parts); `render_*` below produce the
# same strings directly, which is faster than running jinja per item (a test checks they agree).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if not (loop.last and message['role'] == 'assistant') %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONFIG_FILE, WEIGHTS_FILE = "embedder_config.json", "embedder.safetensors"
ADAPTER_DIR, PROCESSOR_DIR, BASE_DIR = "adapter", "processor", "base"
SUPPORTED_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
TINY_TYPES = {"tiny": "qwen3_vl", "tiny-qwen2-vl": "qwen2_vl"}


class CheckpointError(ValueError):
    """A checkpoint directory is incomplete or belongs to another backbone (message names the path)."""


@dataclass
class EmbedderConfig:
    """Everything needed to rebuild the embedder; saved as JSON inside each checkpoint."""
    backbone: str = "tiny"          # "tiny" | "tiny-qwen2-vl" | hub id | local path; tiny = offline CPU default
    seed: int = 0                   # seeds the random tiny base, the LoRA init and the calibrator init
    image_size: int = 64            # every image is resized to image_size^2 -> a fixed token count per image
    max_query_images: int = 4       # a query keeps at most this many images (outfits have up to ~4 items)
    num_frames: int = 4             # video queries are this many ordered frames
    lora_r: int = 8                 # LoRA rank (paper: 8)
    lora_alpha: int = 16            # LoRA scale numerator (paper: 16, i.e. scale 2)
    # LoRA dropout. None = auto: 0.05 (the paper) on a real backbone, 0 on the tiny CPU default, where
    # peft's dropout costs ~30 % of a step and a 1 M-parameter model is far from overfitting in 1400
    # steps: the time buys more steps instead. The resolved number is what a checkpoint saves.
    lora_dropout: Optional[float] = None
    calibrator: str = "slerp"       # PGSQC mode: slerp (paper) | linear (ablation) | off (identity)
    calibrator_rank: int = 32       # rank r of the calibrator's per-query low-rank map (paper: 32)
    calibrator_hidden: int = 512    # hidden width of the calibrator's hyper-network (paper: 512)
    dtype: str = "auto"             # auto: float32 on CPU (exactness), bfloat16 on GPU (memory/speed)
    attn_implementation: str = "sdpa"  # torch's fused attention; "eager" for debugging
    device: str = "auto"            # auto: cuda if available else cpu
    # auto: train a random tiny vision tower in full, freeze a pretrained one; "true"/"false" force it
    train_vision: str = "auto"
    tiny_vocab_size: int = 1536     # BPE vocabulary of the offline tokenizer (fashion corpus is small)


def auto_lora_dropout(backbone: str) -> float:
    """EmbedderConfig.lora_dropout=None resolves to this: 0 for a tiny random base, 0.05 (paper) else."""
    return 0.0 if backbone in TINY_TYPES else 0.05


# ----------------------------------------------------------------------------------------------
# Offline tokenizer, processor and tiny backbones
# ----------------------------------------------------------------------------------------------
COLOURS = ("black white grey gray red blue navy green olive yellow orange pink purple violet brown beige "
           "cream ivory khaki tan burgundy maroon teal turquoise gold silver charcoal mint coral lavender "
           "denim camel multicolor dark light pale bright")
CATEGORIES = ("dress shirt t-shirt tshirt top blouse sweater cardigan hoodie jacket coat blazer vest jeans "
              "pants trousers shorts skirt leggings jumpsuit romper suit bag handbag backpack tote clutch "
              "wallet shoe shoes sneaker sneakers boot boots sandal sandals heels loafers hat cap beanie scarf "
              "belt watch sunglasses glasses necklace earrings bracelet ring socks tie gown tunic tank polo "
              "parka trench anorak kimono cape poncho bodysuit swimsuit bikini lingerie pajamas outfit item")
PATTERNS = ("solid striped stripes stripe plaid checked check checkered floral flower dotted dots polka "
            "paisley geometric graphic printed print camouflage camo animal leopard zebra houndstooth "
            "tie-dye gradient logo lettering embroidered sequined lace mesh ribbed quilted knit knitted "
            "denim leather suede silk satin cotton linen wool cashmere velvet chiffon nylon polyester")
ATTRIBUTES = ("long short sleeve sleeves sleeveless neck neckline collar collared v-neck crew round "
              "turtleneck hood hooded zipper zip button buttons pocket pockets slim fit loose oversized "
              "cropped high low waist rise midi maxi mini length fitted flared straight skinny wide leg "
              "casual formal sporty elegant vintage classic modern summer winter spring autumn fall "
              "men women kids unisex small large size style shape texture fabric material color colour "
              "pattern category attribute brand occasion party office beach wedding evening daily")
INSTRUCTIONS = (
    "Find the image that matches the description. Retrieve the fashion item described by the text. "
    "Find the product photo matching this sketch. Find the shop image of the item worn in this street "
    "photo. Find the same item shown in a different view. Find the item shown in this video. Find the "
    "item in the sketch with the following changes. Change the image so that it is more and less with "
    "a different color and pattern. Is shorter, is longer, has no sleeves, make it, replace the, with, "
    "without, instead of, same as, similar to, but, and, or, the, a, an, of, in, on, for, to, this, "
    "that, these, those, is, are, has, have. Find an item that completes this outfit. Find a compatible "
    "item that goes well with these. Find the item with the given attribute value. Try on the garment. "
    "Query target image images video frames sketch street shop photo text description modification "
    "reference candidate gallery retrieve retrieval search find match matching compatible outfit. "
    "You are a fashion expert. Summarize the target fashion item in one word. Summarize this fashion "
    "item in one word. Video frames in order: user assistant system word one two three four. "
    "0 1 2 3 4 5 6 7 8 9 10 #")


def fashion_corpus() -> list[str]:
    """The fixed corpus the offline tokenizer learns from (deterministic: same list every time)."""
    words = " ".join([COLOURS, CATEGORIES, PATTERNS, ATTRIBUTES]).split()
    lines = [INSTRUCTIONS] * 4
    # Word lists alone, then every colour+pattern+category triple a synthetic caption may contain.
    lines += [" ".join(words)] * 4
    for c in COLOURS.split():
        for p in PATTERNS.split()[:12]:
            lines.append(" ".join(f"{c} {p} {k}" for k in CATEGORIES.split()[:30]))
    lines += [w.capitalize() for w in words]
    return lines


def build_tiny_tokenizer(vocab_size: int = 1536):
    """Byte-level BPE trained on `fashion_corpus()`, with Qwen's special tokens, as a fast tokenizer.

    Byte-level means any string (typos, other languages) still encodes; the vocabulary just makes
    the fashion words short. The BPE trainer is deterministic for a fixed corpus and settings.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(fashion_corpus(), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  padding_side="right")
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS[1:]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _processor_class():
    """An image-only Qwen-VL processor (the stock ones also build a torchvision video processor)."""
    from transformers import ProcessorMixin

    class FashionLensProcessor(ProcessorMixin):
        """Tokenizer + Qwen2-VL PIL/numpy image processor; images only, video comes as frames."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, chat_template=chat_template)

    return FashionLensProcessor


def build_image_processor(image_size: int, patch_size: int, merge_size: int, temporal_patch_size: int,
                          mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
    """Qwen's PIL/numpy image processor with min_pixels = max_pixels = image_size^2, so every (square)
    image becomes the same (image_size / patch)^2 patches -> fixed token count, batch-friendly."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pixels = image_size * image_size
    return Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels, patch_size=patch_size,
                                    merge_size=merge_size, temporal_patch_size=temporal_patch_size,
                                    image_mean=list(mean), image_std=list(std))


def tiny_backbone_config(kind: str, vocab_size: int, token_ids: dict, attn: str):
    """A ~1 M-parameter Qwen3-VL (or Qwen2-VL) config: text 128 wide x 4 layers, vision 64 wide x 2.

    Constraints the architectures impose: mRoPE sections sum to head_dim/2 (6+5+5 = 16 = 32/2);
    the vision tower's output width equals the text width (128); Qwen3 also needs a square
    num_position_embeddings (64 = 8x8 patches of a 64-px image) and deepstack indexes < depth.
    """
    from transformers import Qwen2VLConfig, Qwen3VLConfig

    text = dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=4, head_dim=32, max_position_embeddings=4096,
                rms_norm_eps=1e-6, tie_word_embeddings=False, pad_token_id=token_ids["pad"])
    specials = dict(bos_token_id=token_ids["pad"], eos_token_id=token_ids["eos"])  # Qwen: no BOS in prompts
    ids = dict(image_token_id=token_ids["image"], video_token_id=token_ids["video"],
               vision_start_token_id=token_ids["vision_start"], vision_end_token_id=token_ids["vision_end"])
    if kind == "tiny":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 5, 5],
                                   "mrope_interleaved": True}
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=8,
                      spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=128,
                      num_position_embeddings=64, deepstack_visual_indexes=[0])
        cfg = Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
    elif kind == "tiny-qwen2-vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 5, 5]}
        vision = dict(depth=2, embed_dim=64, hidden_size=128, mlp_ratio=2, num_heads=2, patch_size=8,
                      spatial_merge_size=2, temporal_patch_size=2)
        text.update(specials)
        cfg = Qwen2VLConfig(text_config=text, vision_config=vision, **ids, **specials)
    else:
        raise ValueError(f"unknown tiny backbone {kind!r}; expected one of {sorted(TINY_TYPES)}")
    cfg._attn_implementation = attn
    return cfg


def _vision_geometry(cfg) -> tuple[int, int, int]:
    """(patch_size, spatial_merge_size, temporal_patch_size) of a Qwen-VL config's vision tower."""
    v = cfg.vision_config
    return int(v.patch_size), int(v.spatial_merge_size), int(v.temporal_patch_size)


def _versions() -> dict:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "numpy": np.__version__}


# ----------------------------------------------------------------------------------------------
# The embedder
# ----------------------------------------------------------------------------------------------
class FashionLensEmbedder(nn.Module):
    """Qwen-VL + LoRA + learnable query/target summary tokens + optional PGSQC calibrator.

    forward(queries=None, images=None) -> dict(q, q_raw, lam, reg, t) with gradients (training);
    encode_queries / encode_images -> float32 CPU tensors, no grad, eval mode, batched (inference).
    """

    def __init__(self, config: Optional[EmbedderConfig] = None, *, _checkpoint: Optional[str] = None):
        super().__init__()
        from peft import LoraConfig, PeftModel, get_peft_model

        config = config or EmbedderConfig()
        self.tiny = config.backbone in TINY_TYPES
        if config.lora_dropout is None:  # resolve "auto" once, so the saved config holds the number
            config = replace(config, lora_dropout=auto_lora_dropout(config.backbone))
        self.config = config
        dev = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self._device = torch.device(dev)
        if config.dtype == "auto":
            self.model_dtype = torch.bfloat16 if self._device.type == "cuda" else torch.float32
        else:
            self.model_dtype = getattr(torch, config.dtype)
        ckpt = Path(_checkpoint) if _checkpoint else None

        # --- backbone + processor ----------------------------------------------------------------
        with torch.random.fork_rng(devices=[]):  # seeded builds must not disturb the caller's RNG
            torch.manual_seed(config.seed)
            base, self.processor = self._build_backbone(ckpt)
        self.model_type = base.config.model_type
        self.tokenizer = self.processor.tokenizer
        self.image_processor = self.processor.image_processor
        tok = self.tokenizer
        self.query_token_id = tok.convert_tokens_to_ids(QUERY_TOKEN)
        self.target_token_id = tok.convert_tokens_to_ids(TARGET_TOKEN)
        self.image_token_id = tok.convert_tokens_to_ids("<|image_pad|>")
        self.pad_token_id = tok.pad_token_id
        self.dim = int(base.config.text_config.hidden_size)  # D
        # Visual tokens per image: ask the processor once (its smart_resize rounds to patch*merge),
        # then divide the patch grid by the merge^2 patches each token pools.
        probe = self.image_processor([Image.new("RGB", (config.image_size,) * 2)], return_tensors="np")
        merge = self.image_processor.merge_size
        self.tokens_per_image = int(probe["image_grid_thw"][0].prod()) // merge ** 2  # 16 for the tiny default

        # --- what trains: LoRA on LM linears; vision tower in full only when random --------------
        train_vision = config.train_vision == "true" or (config.train_vision == "auto" and self.tiny)
        self.train_vision = bool(train_vision)
        # peft matches module names with this regex: only the language model's projections
        # (Qwen2.5-VL's vision MLP also has gate/up/down_proj, so a bare name list would catch it).
        target = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
        if ckpt is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed + 1)
                lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                                  lora_dropout=config.lora_dropout, target_modules=target, bias="none")
                with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
                    warnings.simplefilter("ignore", FutureWarning)
                    self.backbone = get_peft_model(base, lora)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                self.backbone = PeftModel.from_pretrained(base, str(ckpt / ADAPTER_DIR), is_trainable=True)
        if self.train_vision:
            for p in self._base().visual.parameters():
                p.requires_grad_(True)

        # --- learnable summary tokens, initialised from existing word embeddings -----------------
        emb = self._base().get_input_embeddings().weight  # (V, D)
        q_init = tok.encode(" word", add_special_tokens=False)[-1]
        t_init = tok.encode(" item", add_special_tokens=False)[-1]
        self.query_token = nn.Parameter(emb[q_init].detach().float().clone())   # (D,)
        self.target_token = nn.Parameter(emb[t_init].detach().float().clone())  # (D,)

        # --- calibrator (queries only) -----------------------------------------------------------
        self.calibrator = None
        if config.calibrator != "off":
            from calibrator import SphericalQueryCalibrator  # lazy: model.py imports fine without it

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed + 2)
                self.calibrator = SphericalQueryCalibrator(self.dim, rank=config.calibrator_rank,
                                                           hidden=config.calibrator_hidden,
                                                           mode=config.calibrator)
        self.backbone.to(self._device, self.model_dtype)
        self.query_token.data = self.query_token.data.to(self._device)   # tokens/calibrator stay fp32
        self.target_token.data = self.target_token.data.to(self._device)
        if self.calibrator is not None:
            self.calibrator.to(self._device)
        if ckpt is not None:
            self._load_extras(ckpt)

    # ------------------------------------------------------------------------------------------
    def _base(self):
        """The Qwen-VL base model (with LoRA layers injected in place)."""
        return self.backbone.get_base_model()

    @property
    def device(self) -> torch.device:
        return self._device

    def _build_backbone(self, ckpt: Optional[Path]):
        """Return (base model, processor): tiny from config/seed (or its saved weights), else hub/path."""
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        cfg, Proc = self.config, _processor_class()
        if ckpt is not None:  # processor always comes from the checkpoint (it holds the added tokens)
            processor = Proc.from_pretrained(str(ckpt / PROCESSOR_DIR))
            tok = processor.tokenizer
        elif self.tiny:
            tok = build_tiny_tokenizer(cfg.tiny_vocab_size)
        else:
            tok = AutoTokenizer.from_pretrained(cfg.backbone, padding_side="right")
        tok.padding_side = "right"
        if ckpt is None:
            tok.add_special_tokens({"additional_special_tokens": [QUERY_TOKEN, TARGET_TOKEN]},
                                   replace_extra_special_tokens=False)
        ids = {"pad": tok.convert_tokens_to_ids("<|endoftext|>"), "eos": tok.convert_tokens_to_ids("<|im_end|>"),
               "image": tok.convert_tokens_to_ids("<|image_pad|>"),
               "video": tok.convert_tokens_to_ids("<|video_pad|>"),
               "vision_start": tok.convert_tokens_to_ids("<|vision_start|>"),
               "vision_end": tok.convert_tokens_to_ids("<|vision_end|>")}
        if tok.pad_token is None:
            tok.pad_token = "<|endoftext|>"

        if self.tiny:
            if ckpt is not None:  # a random base cannot be re-drawn reliably: load the saved one
                mcfg = AutoConfig.from_pretrained(str(ckpt / BASE_DIR))
                mcfg._attn_implementation = cfg.attn_implementation
                base = AutoModel.from_config(mcfg)
                from safetensors.torch import load_file
                state = load_file(str(ckpt / BASE_DIR / "model.safetensors"))
                missing, unexpected = base.load_state_dict(state, strict=False)
                if missing or unexpected:
                    raise CheckpointError(f"{ckpt / BASE_DIR / 'model.safetensors'}: base weights do not fit "
                                          f"the {mcfg.model_type} architecture (missing {missing[:3]}, "
                                          f"unexpected {unexpected[:3]})")
            else:
                vocab = len(tok)
                mcfg = tiny_backbone_config(cfg.backbone, vocab, ids, cfg.attn_implementation)
                base = AutoModel.from_config(mcfg)
        else:
            mcfg = AutoConfig.from_pretrained(cfg.backbone)
            if mcfg.model_type not in SUPPORTED_TYPES:
                raise ValueError(f"backbone {cfg.backbone!r} has model_type {mcfg.model_type!r}; "
                                 f"supported: {SUPPORTED_TYPES}")
            base = AutoModel.from_pretrained(cfg.backbone, attn_implementation=cfg.attn_implementation,
                                             dtype=self.model_dtype)
            if len(tok) > base.get_input_embeddings().weight.shape[0]:
                base.resize_token_embeddings(len(tok))  # only if the added tokens overflow the table
        if ckpt is None:
            patch, merge, tpatch = _vision_geometry(base.config)
            mean, std = (0.5,) * 3, (0.5,) * 3
            if not self.tiny:  # keep the pretrained normalisation
                try:
                    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import \
                        Qwen2VLImageProcessorPil
                    ref = Qwen2VLImageProcessorPil.from_pretrained(cfg.backbone)
                    mean, std = tuple(ref.image_mean), tuple(ref.image_std)
                except Exception:  # noqa: BLE001 -- fall back to Qwen3-VL's 0.5/0.5
                    pass
            improc = build_image_processor(cfg.image_size, patch, merge, tpatch, mean, std)
            processor = Proc(improc, tok, chat_template=CHAT_TEMPLATE)
        base.config.use_cache = False
        for p in base.parameters():  # peft freezes the base anyway; be explicit for the vision tower
            p.requires_grad_(False)
        return base, processor

    # ------------------------------------------------------------------------------------------
    # Prompt rendering
    # ------------------------------------------------------------------------------------------
    def _image_block(self) -> str:
        return IMAGE_BLOCK.format(pads="<|image_pad|>" * self.tokens_per_image)

    def render_query(self, instruction: str, n_images: int, n_frames: int, expand: bool = True) -> str:
        """Chat-formatted query prompt ending with the learnable query token (expand: image pads)."""
        block = self._image_block() if expand else IMAGE_BLOCK.format(pads="<|image_pad|>")
        user = instruction.strip()
        if n_images:
            user += "\n" + block * n_images
        if n_frames:
            user += "\nVideo frames in order:" + block * n_frames
        user += "\n" + QUERY_CLOSING
        return (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
                f"<|im_start|>assistant\n{QUERY_TOKEN}")

    def render_target(self, expand: bool = True) -> str:
        """Chat-formatted gallery prompt ending with the learnable target token."""
        block = self._image_block() if expand else IMAGE_BLOCK.format(pads="<|image_pad|>")
        return (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{block}\n{TARGET_CLOSING}"
                f"<|im_end|>\n<|im_start|>assistant\n{TARGET_TOKEN}")

    # ------------------------------------------------------------------------------------------
    # Input normalisation
    # ------------------------------------------------------------------------------------------
    def _prep_image(self, img) -> Image.Image:
        """PIL or path -> RGB image_size x image_size (square, so every image has the same tokens)."""
        s = self.config.image_size
        if isinstance(img, (str, os.PathLike)):
            import data
            img = data.load_image(str(img), s)
        if img.mode != "RGB":
            img = img.convert("RGB")
        if img.size != (s, s):
            img = img.resize((s, s), Image.BICUBIC)
        return img

    def _as_query(self, item):
        """Query | Record | str -> (instruction, images, frames) with the configured caps."""
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

    # ------------------------------------------------------------------------------------------
    # Core: prompts + images -> hidden state at the summary token
    # ------------------------------------------------------------------------------------------
    def _summary_states(self, texts: list[str], images: list[Image.Image], token_id: int,
                        token: torch.Tensor) -> torch.Tensor:
        """Run the backbone on B prompts (their images in prompt order) -> (B, D) summary states."""
        enc = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        input_ids = enc["input_ids"].to(self._device)            # (B, L)
        attn = enc["attention_mask"].to(self._device)            # (B, L) 1 = real token, right-padded
        is_img = input_ids == self.image_token_id                  # (B, L) visual placeholder slots
        grid = pixel_values = None
        if images:
            pv = self.image_processor([self._prep_image(im) for im in images], return_tensors="np")
            pixel_values = torch.from_numpy(pv["pixel_values"]).to(self._device, self.model_dtype)  # (N, C*T*p*p)
            grid = torch.from_numpy(pv["image_grid_thw"]).to(self._device)                      # (n_img, 3)
        base = self._base()
        # mRoPE positions (3, B, L) from the backbone's own rule; padding is excluded by the mask,
        # so a row's positions depend only on that row.
        pos, _ = base.get_rope_index(input_ids, mm_token_type_ids=is_img.int(), image_grid_thw=grid,
                                     attention_mask=attn)
        # Embeddings of the prompt; our summary-token slots get the learnable vector instead.
        safe_ids = input_ids.masked_fill(input_ids >= base.get_input_embeddings().weight.shape[0],
                                         self.pad_token_id)         # (B, L)
        embeds = base.get_input_embeddings()(safe_ids)              # (B, L, D)
        slot = (input_ids == token_id)                               # (B, L) exactly one per row
        embeds = torch.where(slot[..., None], token.to(embeds.dtype), embeds)  # (B, L, D)
        out = base(inputs_embeds=embeds, attention_mask=attn, position_ids=pos, pixel_values=pixel_values,
                   image_grid_thw=grid, use_cache=False)
        hidden = out.last_hidden_state                               # (B, L, D)
        idx = slot.float().argmax(dim=1)                             # (B,) position of the summary token
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx].float()  # (B, D)

    def _query_states(self, queries: Sequence) -> torch.Tensor:
        texts, imgs = [], []
        for q in queries:
            instr, images, frames = self._as_query(q)
            texts.append(self.render_query(instr, len(images), len(frames)))
            imgs += images + frames  # prompt order: images first, then the video frames
        return self._summary_states(texts, imgs, self.query_token_id, self.query_token)  # (B, D)

    def _image_states(self, images: Sequence) -> torch.Tensor:
        text = self.render_target()
        return self._summary_states([text] * len(images), list(images), self.target_token_id,
                                    self.target_token)  # (G, D)

    # ------------------------------------------------------------------------------------------
    # Public API
    # ------------------------------------------------------------------------------------------
    def forward(self, queries: Optional[Sequence] = None, images: Optional[Sequence] = None) -> dict:
        """Embed queries and/or gallery images with gradients.

        Returns a dict with, when queries are given: 'q' (B, D) calibrated unit queries,
        'q_raw' (B, D) uncalibrated unit queries, 'lam' (B,) calibration strengths; when images are
        given: 't' (G, D) unit targets; always 'reg' (scalar calibrator regulariser, 0 when off or
        no queries). All float32.
        """
        out: dict[str, torch.Tensor] = {}
        reg = torch.zeros((), device=self._device)
        if queries is not None and len(queries):
            h = self._query_states(queries)                          # (B, D) raw summary states
            out["q_raw"] = F.normalize(h, dim=-1)                    # (B, D) q_raw = h / ||h||
            if self.calibrator is not None:
                cal = self.calibrator(h)
                out["q"], out["lam"], reg = cal.query, cal.lam, cal.reg  # (B, D), (B,), ()
            else:
                out["q"] = out["q_raw"]
                out["lam"] = torch.zeros(h.shape[0], device=h.device)  # (B,)
        if images is not None and len(images):
            out["t"] = F.normalize(self._image_states(images), dim=-1)  # (G, D) t = h_t / ||h_t||
        out["reg"] = reg
        return out

    @torch.no_grad()
    def _encode(self, items: Sequence, batch_size: int, key: str, progress: bool) -> torch.Tensor:
        was_training = self.training
        self.eval()
        try:
            chunks = []
            rng = range(0, len(items), batch_size)
            if progress:
                from tqdm import tqdm
                rng = tqdm(rng, desc=f"encode {key}", unit="batch")
            for i in rng:
                part = items[i: i + batch_size]
                res = self(queries=part) if key == "q" else self(images=part)
                chunks.append(res[key].float().cpu())
            return torch.cat(chunks) if chunks else torch.zeros(0, self.dim)  # (B|G, D)
        finally:
            self.train(was_training)

    def encode_queries(self, queries: Sequence, batch_size: int = 16, progress: bool = False) -> torch.Tensor:
        """Queries (Query | Record | str) -> (B, D) calibrated unit float32 CPU tensor, no grad, eval."""
        return self._encode(list(queries), batch_size, "q", progress)

    def encode_images(self, images: Sequence, batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        """Gallery images (PIL | path) -> (G, D) unit float32 CPU tensor, no grad, eval mode."""
        return self._encode(list(images), batch_size, "t", progress)

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

    # ------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, torch.Tensor]:
        """Tokens, calibrator and trained non-LoRA base weights (e.g. the tiny vision tower)."""
        state = {"query_token": self.query_token.detach(), "target_token": self.target_token.detach()}
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
            out[k.replace(".base_layer.", ".")] = v.detach().cpu().contiguous().clone()
        return out

    def save_pretrained(self, path: str | os.PathLike) -> str:
        """Write the checkpoint directory atomically (temp dir + os.replace; old dir kept until done)."""
        from safetensors.torch import save_file

        path = Path(path).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            meta = {"config": asdict(self.config), "versions": _versions(), "model_type": self.model_type,
                    "dim": self.dim, "tokens_per_image": self.tokens_per_image, "format": 1,
                    "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
            self.backbone.save_pretrained(str(tmp / ADAPTER_DIR))  # peft's own format
            save_file(self._extra_state(), str(tmp / WEIGHTS_FILE))
            self.processor.save_pretrained(str(tmp / PROCESSOR_DIR))
            if self.tiny:  # a random base must travel with its checkpoint
                (tmp / BASE_DIR).mkdir()
                self._base().config.save_pretrained(str(tmp / BASE_DIR))
                save_file(self._clean_base_state(), str(tmp / BASE_DIR / "model.safetensors"))
            backup = None
            if path.exists():  # swap: old -> backup, new -> path, then drop backup
                backup = path.parent / f".{path.name}.old-{os.getpid()}-{time.time_ns()}"
                os.replace(path, backup)
            try:
                os.replace(tmp, path)
            except BaseException:
                if backup is not None:
                    os.replace(backup, path)
                raise
            if backup is not None:
                shutil.rmtree(backup, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return str(path)

    @classmethod
    def required_files(cls, meta_config: dict) -> list[str]:
        files = [CONFIG_FILE, WEIGHTS_FILE, f"{ADAPTER_DIR}/adapter_config.json",
                 f"{ADAPTER_DIR}/adapter_model.safetensors", f"{PROCESSOR_DIR}/tokenizer.json"]
        if meta_config.get("backbone") in TINY_TYPES:
            files += [f"{BASE_DIR}/config.json", f"{BASE_DIR}/model.safetensors"]
        return files

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, backbone: Optional[str] = None,
                        device: Optional[str] = None) -> "FashionLensEmbedder":
        """Load a checkpoint dir. `backbone` (optional) asserts which backbone the caller expects."""
        path = Path(path)
        cfg_file = path / CONFIG_FILE
        if not cfg_file.is_file():
            raise CheckpointError(f"{path}: not a FashionLens checkpoint (missing {CONFIG_FILE})")
        try:
            meta = json.loads(cfg_file.read_text())
            known = {f.name for f in fields(EmbedderConfig)}
            config = EmbedderConfig(**{k: v for k, v in meta["config"].items() if k in known})
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{cfg_file}: unreadable embedder config ({e})") from e
        missing = [f for f in cls.required_files(meta["config"]) if not (path / f).is_file()]
        if missing:
            raise CheckpointError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
        if backbone is not None and backbone != config.backbone:
            raise CheckpointError(f"{path}: checkpoint was trained on backbone {config.backbone!r}, "
                                  f"not {backbone!r}")
        # The saved architecture must be the one the config names (catches swapped/edited dirs).
        expected = TINY_TYPES.get(config.backbone)
        if expected is not None:
            found = json.loads((path / BASE_DIR / "config.json").read_text()).get("model_type")
            if found != expected:
                raise CheckpointError(f"{path / BASE_DIR / 'config.json'}: base is {found!r} but the "
                                      f"checkpoint config names backbone {config.backbone!r} ({expected})")
        if meta.get("model_type") and expected is not None and meta["model_type"] != expected:
            raise CheckpointError(f"{cfg_file}: model_type {meta['model_type']!r} does not match backbone "
                                  f"{config.backbone!r}")
        if device is not None:
            config.device = device
        emb = cls(config, _checkpoint=str(path))
        if emb.model_type != meta.get("model_type", emb.model_type) or emb.dim != meta.get("dim", emb.dim):
            raise CheckpointError(f"{path}: saved for {meta.get('model_type')} (D={meta.get('dim')}), "
                                  f"but the backbone built is {emb.model_type} (D={emb.dim})")
        return emb

    def _load_extras(self, ckpt: Path) -> None:
        from safetensors.torch import load_file

        file = ckpt / WEIGHTS_FILE
        state = load_file(str(file))
        try:
            with torch.no_grad():
                for name in ("query_token", "target_token"):
                    src = state[name]
                    if src.shape != (self.dim,):
                        raise CheckpointError(f"{file}: {name} has shape {tuple(src.shape)}, expected "
                                              f"({self.dim},) -- checkpoint of another backbone?")
                    getattr(self, name).copy_(src)
                if self.calibrator is not None:
                    cal = {k[len("calibrator."):]: v for k, v in state.items() if k.startswith("calibrator.")}
                    self.calibrator.load_state_dict(cal, strict=True)
                if self.train_vision:
                    vis = {k[len("visual."):]: v.to(self.model_dtype) for k, v in state.items()
                           if k.startswith("visual.")}
                    self._base().visual.load_state_dict(vis, strict=True)
        except (KeyError, RuntimeError) as e:
            raise CheckpointError(f"{file}: does not fit this embedder ({e})") from e


# ----------------------------------------------------------------------------------------------
# Demo
# ----------------------------------------------------------------------------------------------
def _demo_images(n: int = 4, size: int = 64) -> list[Image.Image]:
    """Flat-colour garment silhouettes, stand-ins for the synthetic U-FIRE images."""
    from PIL import ImageDraw

    colours = [(200, 30, 30), (30, 60, 200), (30, 160, 60), (230, 200, 40), (120, 40, 160), (20, 20, 20)]
    out = []
    for i in range(n):
        im = Image.new("RGB", (size, size), (245, 245, 245))
        d = ImageDraw.Draw(im)
        c = colours[i % len(colours)]
        if i % 2 == 0:  # a dress-like trapezoid
            d.polygon([(24, 8), (40, 8), (54, 58), (10, 58)], fill=c)
        else:           # a shirt-like box with sleeves
            d.rectangle([18, 12, 46, 56], fill=c)
            d.rectangle([6, 12, 58, 26], fill=c)
        out.append(im)
    return out


if __name__ == "__main__":
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.time()
    emb = FashionLensEmbedder(EmbedderConfig())
    counts = emb.param_counts()
    print(f"built tiny {emb.model_type} embedder in {time.time() - t0:.1f}s: D={emb.dim}, "
          f"{counts['total'] / 1e6:.2f} M params, {counts['trainable'] / 1e6:.2f} M trainable, "
          f"{emb.tokens_per_image} tokens/image")
    imgs = _demo_images(4, emb.config.image_size)
    names = ["red dress", "blue shirt", "green dress", "yellow shirt"]
    try:
        from data import Query
    except ImportError:  # pragma: no cover
        Query = None
    queries = [Query(instruction=f"Find the {n}.", images=[]) for n in names] if Query else names
    q = emb.encode_queries(queries)      # (4, D)
    t = emb.encode_images(imgs)          # (4, D)
    sim = q @ t.T                        # (4, 4) cosine similarities (random weights: no structure yet)
    print("query \\ image  " + "  ".join(f"{n:>12s}" for n in names))
    for n, row in zip(names, sim.tolist()):
        print(f"{n:>13s}  " + "  ".join(f"{v:12.3f}" for v in row))
    gal = _demo_images(6, emb.config.image_size) * 40  # 240 images for a quick throughput figure
    t0 = time.time()
    emb.encode_images(gal, batch_size=64)
    print(f"encode_images: {len(gal) / (time.time() - t0):.0f} images/s (batch 64, "
          f"{torch.get_num_threads()} threads)")
