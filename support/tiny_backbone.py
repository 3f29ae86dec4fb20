"""The offline tiny backbone: a random Qwen3-VL (or Qwen2-VL) with a home-made tokenizer and processor.

Skip this file on a first read: it is support, not FashionLens. It exists so that the whole project
(tests, notebooks, the default training run) works on a CPU with no downloads at all. The embedder
(model.py) treats the tiny backbone exactly like a real Qwen-VL from the hub; only its pieces come
from here instead of `from_pretrained`:

    build_tiny_tokenizer(vocab)   byte-level BPE trained on a fixed fashion corpus, with Qwen's special
                                  tokens and chat template (deterministic: same vocabulary every time)
    tiny_backbone_config(kind, ...)   a ~1 M-parameter Qwen3-VL ("tiny") or Qwen2-VL ("tiny-qwen2-vl")
                                  config; model.py draws its weights at random from EmbedderConfig.seed
    build_image_processor(...)    Qwen's PIL/numpy image processor with a pixel budget (min/max pixels)
    processor_class()             a tokenizer + image-processor Qwen-VL processor (used for every
                                  backbone: the stock ones also build a torchvision video processor,
                                  which we do not ship; model.py patchifies video frames itself)

Architecture constraints a tiny config must respect (or the Qwen code fails at build or forward):
  * the mRoPE sections (temporal, height, width) sum to head_dim / 2  (6 + 5 + 5 = 16 = 32 / 2);
  * the vision tower's output width equals the language model's width (128), because visual
    tokens are written straight into the text sequence;
  * Qwen3-VL learns a position embedding per patch on a square grid, so num_position_embeddings is a
    square (64 = 8 x 8 patches of a 64-px image), and its deepstack layer indexes are < vision depth.

Used by model.py (`EmbedderConfig(backbone="tiny")`, the default) and by train.py (TINY_TYPES, to
pick CPU settings for a tiny run). Imports no FashionLens file. Try it:
`python -c "from support import tiny_backbone as t; print(t.build_tiny_tokenizer().tokenize('a red floral dress'))"`.
"""
from __future__ import annotations

# Tiny backbone names accepted by EmbedderConfig.backbone -> the Qwen architecture each one builds.
TINY_TYPES = {"tiny": "qwen3_vl", "tiny-qwen2-vl": "qwen2_vl"}

# Special tokens of the Qwen chat format (the same strings as the real Qwen-VL tokenizers), so the
# prompts model.py renders are identical for the tiny and the real backbones.
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
# The ChatML template of the Qwen-VL family, as Qwen publishes it for Qwen2-VL / Qwen2.5-VL / Qwen3-VL
# without the tool-calling and reasoning branches: every message is "<|im_start|>role\n" + its content
# + "<|im_end|>\n"; a list content concatenates its parts with no separator, an image part as
# <|vision_start|><|image_pad|><|vision_end|>, a video part as <|vision_start|><|video_pad|><|vision_end|>
# (the processor later expands each pad to the visual tokens). model.py renders the same strings
# directly, which is faster than running jinja per item; a test checks that the two agree.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# ------------------------------------------------------------------------------------------------
# The fixed corpus the tokenizer learns from: fashion words and the project's prompt sentences, so
# that the words queries actually use become one or two tokens each.
# ------------------------------------------------------------------------------------------------
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
    "You are a fashion expert in processing fashion images. Summarize the semantic feature of the "
    "target fashion image in one word. Summarize the image in one word. user assistant system word one "
    "two three four. 0 1 2 3 4 5 6 7 8 9 10 #")
# Qwen3-VL writes each temporal group's time before its visual tokens ("<0.5 seconds>", model.py).
TIMESTAMPS = "".join(f"<{i / 10:.1f} seconds>" for i in range(100))


def fashion_corpus() -> list[str]:
    """The fixed corpus the offline tokenizer learns from (deterministic: the same list every time).

    Repetition weights the BPE merge counts: the prompt sentences and word lists appear 4 times, the
    video timestamps twice, and every colour + pattern + category triple a synthetic caption may
    contain once.
    """
    words = " ".join([COLOURS, CATEGORIES, PATTERNS, ATTRIBUTES]).split()
    lines = [INSTRUCTIONS] * 4 + [TIMESTAMPS] * 2
    lines += [" ".join(words)] * 4
    for c in COLOURS.split():
        for p in PATTERNS.split()[:12]:
            lines.append(" ".join(f"{c} {p} {k}" for k in CATEGORIES.split()[:30]))
    lines += [w.capitalize() for w in words]  # sentence-initial spellings ("Red dress ...")
    return lines


def build_tiny_tokenizer(vocab_size: int = 1536):
    """Byte-level BPE trained on `fashion_corpus()`, with Qwen's special tokens, as a fast tokenizer.

    Byte-level means any string (typos, other languages) still encodes; the vocabulary only makes the
    fashion words short. The BPE trainer is deterministic for a fixed corpus and settings, so a tiny
    model rebuilt from the same seed sees the same token ids.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(fashion_corpus(), trainer=trainer)
    # Qwen conventions: no BOS, <|im_end|> ends a turn, <|endoftext|> pads, padding on the right.
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  padding_side="right")
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS[1:]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def processor_class():
    """The class of a tokenizer + image-processor Qwen-VL processor (built lazily: transformers loads
    on first use).

    The stock Qwen-VL processors also build a torchvision video processor, which is not installed;
    model.py turns video frames into Qwen's video patches itself, so tokenizer + image processor is
    all a checkpoint needs to save.
    """
    from transformers import ProcessorMixin

    class FashionLensProcessor(ProcessorMixin):
        """Tokenizer + Qwen2-VL PIL/numpy image processor (video patches: model.py)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, chat_template=chat_template)

    return FashionLensProcessor


def build_image_processor(min_pixels: int, max_pixels: int, patch_size: int, merge_size: int,
                          temporal_patch_size: int, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
    """Qwen's PIL/numpy image processor with a pixel budget: each image is resized by Qwen's
    smart_resize to sides that are multiples of patch * merge, its aspect ratio kept as closely as
    possible, and its area within [min_pixels, max_pixels] (when it starts outside that range)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch_size,
                                    merge_size=merge_size, temporal_patch_size=temporal_patch_size,
                                    image_mean=list(mean), image_std=list(std))


def vision_geometry(cfg) -> tuple[int, int, int]:
    """(patch_size, spatial_merge_size, temporal_patch_size) of any Qwen-VL config's vision tower."""
    v = cfg.vision_config
    return int(v.patch_size), int(v.spatial_merge_size), int(v.temporal_patch_size)


def tiny_backbone_config(kind: str, vocab_size: int, token_ids: dict, attn: str):
    """A ~1 M-parameter Qwen3-VL ("tiny") or Qwen2-VL ("tiny-qwen2-vl") config.

    Text: 128 wide x 4 layers (4 heads of 32); vision: 64 wide x 2 layers, 8-px patches merged 2 x 2,
    projected to the text width 128. token_ids maps pad / eos / image / video / vision_start /
    vision_end to the tokenizer's ids; attn is the attention implementation ("sdpa" | "eager").
    """
    from transformers import Qwen2VLConfig, Qwen3VLConfig

    text = dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=4, head_dim=32, max_position_embeddings=4096,
                rms_norm_eps=1e-6, tie_word_embeddings=False, pad_token_id=token_ids["pad"])
    specials = dict(bos_token_id=token_ids["pad"], eos_token_id=token_ids["eos"])  # Qwen: no BOS in prompts
    ids = dict(image_token_id=token_ids["image"], video_token_id=token_ids["video"],
               vision_start_token_id=token_ids["vision_start"], vision_end_token_id=token_ids["vision_end"])
    if kind == "tiny":
        # mrope_section: 6 + 5 + 5 = 16 = head_dim / 2 (temporal, height, width rotary frequencies).
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 5, 5],
                                   "mrope_interleaved": True}
        # out_hidden_size = text width; num_position_embeddings = 8 x 8 patches; deepstack index < depth.
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=8,
                      spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=128,
                      num_position_embeddings=64, deepstack_visual_indexes=[0])
        cfg = Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
    elif kind == "tiny-qwen2-vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 5, 5]}
        # Qwen2-VL names the widths differently: embed_dim inside the tower, hidden_size = its output.
        vision = dict(depth=2, embed_dim=64, hidden_size=128, mlp_ratio=2, num_heads=2, patch_size=8,
                      spatial_merge_size=2, temporal_patch_size=2)
        text.update(specials)
        cfg = Qwen2VLConfig(text_config=text, vision_config=vision, **ids, **specials)
    else:
        raise ValueError(f"unknown tiny backbone {kind!r}; expected one of {sorted(TINY_TYPES)}")
    cfg._attn_implementation = attn
    return cfg
