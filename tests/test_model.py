"""Tests for model.py: shapes/norms per query kind, the authors' prompts and summary-token start, images
at the recipe's pixel budget, video through Qwen's video input, batch independence with mixed image
sizes, the recipe's defaults, checkpoints (format 2 only), offline build.

The shared `tiny_embedder` fixture (conftest.py) is built once per session; tests that need to
change weights build or load their own copy.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]


def _img(seed: int, size: int = 64) -> Image.Image:
    """A small random 'garment' picture: coloured box/triangle on a light background."""
    g = torch.Generator().manual_seed(seed)
    c = tuple(int(v) for v in torch.randint(0, 256, (3,), generator=g))
    im = Image.new("RGB", (size, size), (240, 240, 240))
    d = ImageDraw.Draw(im)
    x0, y0 = (int(v) for v in torch.randint(2, 24, (2,), generator=g))
    if seed % 2:
        d.rectangle([x0, y0, x0 + 30, y0 + 36], fill=c)
    else:
        d.polygon([(x0 + 15, y0), (x0 + 34, y0 + 38), (x0, y0 + 38)], fill=c)
    return im


def _photo(seed: int, width: int, height: int) -> Image.Image:
    """An _img of another shape: its aspect ratio, not its size, changes the patch grid at a budget."""
    return _img(seed).resize((width, height), Image.BICUBIC)


def _queries():
    from data import Query

    return {
        "text": Query("Find a long red floral dress with short sleeves."),
        "single": Query("Find the shop image of the item in this street photo.", images=[_img(1)]),
        "multi": Query("Find an item that completes this outfit.", images=[_img(2), _img(3), _img(4)]),
        "video": Query("Find the item shown in this video.", frames=[_img(5 + i) for i in range(4)]),
    }


def _unit(x: torch.Tensor) -> bool:
    return torch.allclose(x.norm(dim=-1), torch.ones(x.shape[0]), atol=1e-5)


def test_shapes_and_unit_norm(tiny_embedder):
    emb = tiny_embedder
    qs = _queries()
    for kind, q in qs.items():
        e = emb.encode_queries([q])
        assert e.shape == (1, emb.dim) and e.dtype == torch.float32 and e.device.type == "cpu", kind
        assert _unit(e), kind
    imgs = [_img(i) for i in range(5)]
    t = emb.encode_images(imgs, batch_size=2)
    assert t.shape == (5, emb.dim) and _unit(t)
    # Different inputs give different embeddings (the model does look at its input).
    assert (t[0] - t[1]).abs().max() > 1e-4
    allq = emb.encode_queries(list(qs.values()))
    assert torch.cdist(allq, allq).fill_diagonal_(1).min() > 1e-4
    # A multi-image query keeps at most max_query_images images and video at most num_frames.
    n = emb.config.max_query_images
    many = type(qs["multi"])("outfit", images=[_img(i) for i in range(n + 2)])
    capped = type(qs["multi"])("outfit", images=many.images[:n])
    assert torch.allclose(emb.encode_queries([many]), emb.encode_queries([capped]), atol=1e-6)


def test_forward_grad_and_outputs(tiny_embedder):
    emb = tiny_embedder
    qs = list(_queries().values())
    emb.zero_grad(set_to_none=True)
    out = emb(queries=qs, images=[_img(10), _img(11)])
    assert out["q"].shape == out["q_raw"].shape == (4, emb.dim) and out["t"].shape == (2, emb.dim)
    assert out["lam"].shape == (4,) and out["reg"].dim() == 0
    assert _unit(out["q"].detach()) and _unit(out["q_raw"].detach())
    (out["q"] @ out["t"].T).sum().add(out["reg"]).backward()
    for p in emb.token_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    lora = [p for n, p in emb.named_parameters() if "lora_B" in n]
    assert lora and all(p.requires_grad for p in lora)
    emb.zero_grad(set_to_none=True)
    # Calibrated query stays close to the raw one at initialisation (near-identity calibrator).
    if emb.calibrator is not None:
        cos = (out["q"] * out["q_raw"]).sum(-1)
        assert cos.min() > 0.99


# The chat template Qwen publishes with Qwen2-VL-Instruct (its tokenizer's chat_template), written out
# here so that the prompts are checked against the format the pretrained backbones were trained on,
# not against a second rendering of our own. For the authors' messages (a system turn, so no default
# one) Qwen2.5-VL's and Qwen3-VL's templates render the same string.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _authors_query_messages(instruction: str, n_images: int, video: bool) -> list:
    """prompt_q as the authors' collator builds it (dataset.py FashionCollator), sentences written out."""
    system = {"role": "system", "content": [{"type": "text",
                                             "text": "You are a fashion expert in processing fashion images."}]}
    user = [{"type": "text", "text": instruction}]
    user += [{"type": "image", "image": f"q{i}.jpg", "min_pixels": 224 * 224, "max_pixels": 256 * 256}
             for i in range(n_images)]
    if video:
        user += [{"type": "video", "video": "clip.mp4", "nframes": 8, "resized_height": 224, "resized_width": 224}]
    user += [{"type": "text", "text": "Summarize the semantic feature of the target fashion image in one word."}]
    return [system, {"role": "user", "content": user},
            {"role": "assistant", "content": [{"type": "text", "text": "<|query|>"}]}]


def _authors_target_messages() -> list:
    """prompt_t as the authors' collator builds it."""
    return [{"role": "system", "content": [{"type": "text",
                                            "text": "You are a fashion expert in processing fashion images."}]},
            {"role": "user", "content": [{"type": "image", "image": "t.jpg"},
                                         {"type": "text", "text": "Summarize the image in one word."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "<|target|>"}]}]


@pytest.mark.parametrize("n_images,n_frames", [(0, 0), (2, 0), (0, 4), (1, 3)])
def test_prompt_matches_chat_template(tiny_embedder, n_images, n_frames):
    """render_query / render_target == Qwen's chat template applied to the authors' message lists, up to
    the summary token (the template then closes the turn with <|im_end|>\n, which causal attention
    keeps from the summary token); the tiny tokenizer's own template renders the same."""
    emb = tiny_embedder
    msgs = _authors_query_messages(" Find this. ", n_images, n_frames > 0)
    qwen = emb.tokenizer.apply_chat_template(msgs, chat_template=QWEN2_VL_CHAT_TEMPLATE, tokenize=False)
    ours = emb.render_query(" Find this. ", n_images, n_frames)  # the instruction goes in verbatim
    assert qwen == ours + "<|im_end|>\n"
    assert emb.tokenizer.apply_chat_template(msgs, tokenize=False) == qwen  # tiny_backbone.CHAT_TEMPLATE
    assert ours.count("<|image_pad|>") == n_images and ours.count("<|video_pad|>") == int(n_frames > 0)
    assert ours.endswith("Find this. " + "<|vision_start|><|image_pad|><|vision_end|>" * n_images
                         + "<|vision_start|><|video_pad|><|vision_end|>" * (n_frames > 0)
                         + "Summarize the semantic feature of the target fashion image in one word.<|im_end|>\n"
                         "<|im_start|>assistant\n<|query|>")
    target = emb.tokenizer.apply_chat_template(_authors_target_messages(), chat_template=QWEN2_VL_CHAT_TEMPLATE,
                                               tokenize=False)
    assert target == emb.render_target() + "<|im_end|>\n"
    assert emb.tokenizer.apply_chat_template(_authors_target_messages(), tokenize=False) == target
    # Collated, each placeholder is expanded to its visual tokens: 64 x 64 images are 8 x 8 patches of
    # 8 px, 16 tokens after the 2 x 2 merge; a 4-frame video is 2 temporal groups of 16 tokens.
    from data import Query

    q = Query(" Find this. ", images=[_img(i) for i in range(n_images)], frames=[_img(9 + i) for i in range(n_frames)])
    x = emb.collate_queries([q])
    ids = x.input_ids[0].tolist()
    assert ids.count(emb.image_token_id) == 16 * n_images
    assert ids.count(emb.video_token_id) == (16 * ((n_frames + 1) // 2) if n_frames else 0)
    assert ids.count(emb.query_token_id) == 1 and ids[-1] == emb.query_token_id


@pytest.mark.parametrize("init", ["im_end", "words"])
def test_summary_tokens_start_where_summary_init_says(init):
    """summary_init "im_end": both summary tokens start as the embedding of <|im_end|> (the authors'
    model.py 148-155, the `paper` recipe); "words": <|query|> at " word", <|target|> at " item"
    (tiny-cpu), two different vectors."""
    from model import EmbedderConfig, FashionLensEmbedder
    emb = FashionLensEmbedder(EmbedderConfig(summary_init=init, device="cpu"))
    table = emb._base().get_input_embeddings().weight                    # (V, D)
    im_end = emb.tokenizer.convert_tokens_to_ids("<|im_end|>")
    word = emb.tokenizer.encode(" word", add_special_tokens=False)[-1]
    item = emb.tokenizer.encode(" item", add_special_tokens=False)[-1]
    want = (im_end, im_end) if init == "im_end" else (word, item)
    assert torch.equal(emb.query_token.detach(), table[want[0]].float())
    assert torch.equal(emb.target_token.detach(), table[want[1]].float())
    assert not torch.equal(table[word], table[im_end]) and not torch.equal(table[word], table[item])


def test_recipes_choose_the_summary_init():
    """The tiny default keeps its two word starts; a real backbone gets the authors' <|im_end|>."""
    from model import EmbedderConfig
    from support.recipes import resolve_embedder_config
    assert resolve_embedder_config(EmbedderConfig()).summary_init == "words"
    assert resolve_embedder_config(EmbedderConfig(recipe="paper")).summary_init == "im_end"


@pytest.fixture(scope="module")
def paper_tiny():
    """The tiny backbone under the `paper` recipe (the authors' pixel budget, 8 frames at 224 x 224)."""
    from model import EmbedderConfig, FashionLensEmbedder

    emb = FashionLensEmbedder(EmbedderConfig(recipe="paper"))
    emb.eval()
    return emb


@pytest.mark.parametrize("recipe,grid", [("tiny-cpu", (6, 8)), ("paper", (26, 36))])
def test_photo_tokens_follow_smart_resize_at_the_budget(tiny_embedder, paper_tiny, recipe, grid):
    """A 640 x 480 photo keeps its landscape shape and gets the token count Qwen's smart_resize gives at
    the recipe's pixel budget: tiny-cpu 64^2 -> 48 x 64 px = 6 x 8 patches, 12 tokens; paper 224^2..256^2
    -> 208 x 288 px = 26 x 36 patches, 234 tokens (8-px patches, 2 x 2 merge)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    emb = tiny_embedder if recipe == "tiny-cpu" else paper_tiny
    c = emb.config
    assert c.recipe == recipe and (c.min_pixels, c.max_pixels) == {"tiny-cpu": (64 * 64, 64 * 64),
                                                                   "paper": (224 * 224, 256 * 256)}[recipe]
    factor = emb.patch_size * emb.merge_size
    h, w = smart_resize(480, 640, factor=factor, min_pixels=c.min_pixels, max_pixels=c.max_pixels)
    assert (h // emb.patch_size, w // emb.patch_size) == grid and grid[1] > grid[0]  # aspect kept
    tokens = grid[0] * grid[1] // emb.merge_size ** 2
    photo = Image.new("RGB", (640, 480), (180, 40, 40))
    x = emb.collate_images([photo])
    assert x.image_grid_thw.tolist() == [[1, *grid]]
    assert int((x.input_ids == emb.image_token_id).sum()) == tokens == emb.image_tokens(640, 480)
    assert x.pixel_values.shape == (grid[0] * grid[1], 3 * emb.temporal_patch_size * emb.patch_size ** 2)
    from data import Query

    q = emb.collate_queries([Query("Find the shop image of this street photo.", images=[photo])])
    assert int((q.input_ids == emb.image_token_id).sum()) == tokens


@pytest.mark.parametrize("recipe", ["tiny-cpu", "paper"])
def test_video_query_goes_through_the_video_input(tiny_embedder, paper_tiny, recipe):
    """A video query: num_frames frames at video_size reach pixel_values_videos as num_frames / 2
    temporal groups, no image placeholder or image patch is made, the video pads in input_ids match the
    grid, and (Qwen3-VL) each group is preceded by its time, the mean of its first and last frame."""
    from data import Query

    emb = tiny_embedder if recipe == "tiny-cpu" else paper_tiny
    c = emb.config
    n, side = c.num_frames, c.video_size // emb.patch_size        # 4 / 8 frames; 8 / 28 patches a side
    assert (n, c.video_size) == {"tiny-cpu": (4, 64), "paper": (8, 224)}[recipe]
    frames = [_img(200 + i, size=50) for i in range(n + 3)]       # more frames than kept, another size
    times = [0.25 * i for i in range(n + 3)]
    x = emb.collate_queries([Query("Find the item shown in this video.", frames=frames, frame_times=times)])
    assert x.pixel_values is None and x.image_grid_thw is None
    assert int((x.input_ids == emb.image_token_id).sum()) == 0
    groups = n // emb.temporal_patch_size
    assert x.video_grid_thw.tolist() == [[groups, side, side]] and x.videos_per_row.tolist() == [1]
    assert x.pixel_values_videos.shape == (groups * side * side, 3 * emb.temporal_patch_size * emb.patch_size ** 2)
    assert int((x.input_ids == emb.video_token_id).sum()) == groups * side * side // emb.merge_size ** 2
    # Kept frames: evenly spaced, first and last included; group g's time = mean of its two frames.
    keep = [round(i * (n + 2) / (n - 1)) for i in range(n)]
    want = [(times[keep[2 * g]] + times[keep[2 * g + 1]]) / 2 for g in range(groups)]
    per_group = side * side // emb.merge_size ** 2
    video = "".join(f"<{s:.1f} seconds><|vision_start|>" + "<|video_pad|>" * per_group + "<|vision_end|>"
                    for s in want)                                # Qwen3-VL: one timed block per group
    assert "this video." + video + "Summarize the semantic" in emb.tokenizer.decode(x.input_ids[0])
    # The video changes the embedding, and which frames it holds matters.
    with torch.no_grad():
        a = emb(queries=x)["q"]
        b = emb(queries=[Query("Find the item shown in this video.", frames=frames[::-1], frame_times=times)])["q"]
    assert (a - b).abs().max() > 1e-4


def test_identical_frames_give_the_image_patches(tiny_embedder, paper_tiny):
    """Qwen's image processor repeats an image over the temporal patch: a video of two copies of a frame
    (or of that one frame, padded by repetition) is patch for patch that frame as an image, when the
    frame already has the size both paths resize to."""
    from data import Query

    for emb, size in ((tiny_embedder, 64), (paper_tiny, 224)):
        frame = _img(300, size=size)
        image = emb.collate_images([frame])
        for clip in ([frame, frame], [frame]):
            video = emb.collate_queries([Query("v", frames=clip)])
            assert video.video_grid_thw.tolist() == image.image_grid_thw.tolist()  # (1, h, w)
            assert torch.equal(video.pixel_values_videos, image.pixel_values), (size, len(clip))
        other = emb.collate_queries([Query("v", frames=[frame, _img(301, size=size)])])
        assert not torch.equal(other.pixel_values_videos, image.pixel_values)  # the second frame counts


def test_batch_independence(tiny_embedder):
    """A query alone == the same query among 7 others of different lengths, image sizes and videos
    (padding, mRoPE, the vision tower's per-image attention); the same for a gallery image among others
    of other sizes (which takes collate_images' row-by-row path)."""
    from data import Query

    emb = tiny_embedder
    probe = Query("Find the item with these changes: is red", images=[_img(20), _photo(24, 90, 40)])
    others = [Query("x"), Query("a much longer instruction with many words " * 3),
              Query("two images", images=[_img(21), _photo(22, 40, 100)]),
              Query("video", frames=[_photo(23 + i, 80, 48) for i in range(4)], frame_times=[0, .4, .8, 1.2]),
              Query("outfit", images=[_img(30 + i) for i in range(4)]),
              Query("short"), Query("one image and a clip", images=[_photo(40, 120, 60)],
                                    frames=[_img(41), _img(42)])]
    alone = emb.encode_queries([probe])
    for pos in (0, 3, 7):
        batch = others[:pos] + [probe] + others[pos:]
        together = emb.encode_queries(batch, batch_size=8)
        assert (together[pos] - alone[0]).abs().max() <= 1e-5
    imgs = [_photo(50 + i, *((64, 64), (40, 90), (120, 60))[i % 3]) for i in range(8)]
    t_alone = emb.encode_images(imgs[3:4])
    t_batch = emb.encode_images(imgs, batch_size=8)
    assert (t_batch[3] - t_alone[0]).abs().max() <= 1e-5
    assert len({tuple(g) for g in emb.collate_images(imgs).image_grid_thw.tolist()}) == 3  # mixed grids


@pytest.fixture(scope="module")
def trained_ckpt(tiny_embedder, tmp_path_factory):
    """Perturb a copy's trainable weights (so a load that ignored them would fail) and save it."""
    from model import FashionLensEmbedder

    src = tmp_path_factory.mktemp("ck") / "orig"
    tiny_embedder.save_pretrained(src)
    emb = FashionLensEmbedder.from_pretrained(src)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in emb.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.dtype))
    out = tmp_path_factory.mktemp("ck") / "trained"
    emb.save_pretrained(out)
    return emb, out


def test_save_load_round_trip(trained_ckpt, tiny_embedder):
    from model import FashionLensEmbedder

    emb, path = trained_ckpt
    qs = list(_queries().values())
    imgs = [_img(60 + i) for i in range(3)]
    loaded = FashionLensEmbedder.from_pretrained(path)
    assert (loaded.encode_queries(qs) - emb.encode_queries(qs)).abs().max() <= 1e-6
    assert (loaded.encode_images(imgs) - emb.encode_images(imgs)).abs().max() <= 1e-6
    # The perturbation mattered: the untouched fixture embeds differently.
    assert (tiny_embedder.encode_images(imgs) - emb.encode_images(imgs)).abs().max() > 1e-4
    meta = json.loads((path / "embedder_config.json").read_text())
    assert meta["config"]["backbone"] == "tiny" and "transformers" in meta["versions"]
    # Saving over an existing dir replaces it and leaves no temp/backup dirs behind.
    loaded.save_pretrained(path)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def test_embedder_config_rules_agree_with_the_choices_in_the_code():
    """EmbedderConfig's knob rules repeat two tuples that live in the concept files (rule 5)."""
    import data
    from model import SUMMARY_INITS, EmbedderConfig
    from support.config_fields import choices_of, rules

    choices = choices_of(EmbedderConfig)
    assert tuple(choices["query_sketches"]) == data.SKETCH_MODES
    assert tuple(choices["summary_init"]) == SUMMARY_INITS
    assert all(rules(EmbedderConfig).values())  # every field says what it accepts


def test_recipe_fills_the_none_fields(trained_ckpt, tiny_embedder, tmp_path, monkeypatch):
    """The None fields resolve to the recipe's values (auto: tiny-cpu for a tiny backbone, paper for a
    real one), explicit values win, bad values are refused naming the field, a local backbone folder
    is saved as an absolute path, and the checkpoint stores the resolved numbers."""
    import pins  # the recipes' values as literals with their sources, not the table under test
    from model import EmbedderConfig
    from support.checkpoint import _same_backbone
    from support.errors import EmbedderConfigError
    from support.recipes import resolve_embedder_config

    cfg = EmbedderConfig()
    assert cfg.lora_dropout is None and cfg.min_pixels is None and cfg.recipe == "auto"
    tiny = resolve_embedder_config(cfg)
    assert tiny.recipe == "tiny-cpu" and tiny.lora_dropout == 0.0
    assert {k: getattr(tiny, k) for k in pins.TINY_EMBEDDER} == pins.TINY_EMBEDDER
    paper = resolve_embedder_config(EmbedderConfig(backbone="Qwen/Qwen3-VL-4B-Instruct"))
    assert paper.recipe == "paper" and paper.lora_dropout == 0.05  # the authors' LoraConfig
    assert (paper.min_pixels, paper.max_pixels, paper.num_frames, paper.video_size, paper.max_query_images,
            paper.query_sketches) == (224 * 224, 256 * 256, 8, 224, 8, "all")
    mixed = resolve_embedder_config(EmbedderConfig(recipe="paper", num_frames=4, lora_dropout=0.0))
    assert (mixed.recipe, mixed.num_frames, mixed.lora_dropout, mixed.video_size) == ("paper", 4, 0.0, 224)
    for bad, field in ((dict(min_pixels=5000, max_pixels=4000), r"max_pixels 4000: must be >= min_pixels \(5000\)"),
                       (dict(query_sketches="some"), "query_sketches 'some': must be one of one, all"),
                       (dict(num_frames=0), "num_frames 0: must be >= 1"), (dict(recipe="fast"), "recipe")):
        with pytest.raises(EmbedderConfigError, match=field):
            resolve_embedder_config(EmbedderConfig(**bad))
    (tmp_path / "qwen").mkdir()
    monkeypatch.chdir(tmp_path)
    local = resolve_embedder_config(EmbedderConfig(backbone="qwen"))
    assert local.backbone == str((tmp_path / "qwen").resolve()) and local.recipe == "paper"
    assert _same_backbone("./qwen", local.backbone) and not _same_backbone("qwen2", local.backbone)
    assert tiny_embedder.config.lora_dropout == 0.0 and tiny_embedder.config.recipe == "tiny-cpu"
    # peft builds an Identity instead of a Dropout for p = 0: the tiny step pays nothing for it.
    drops = [m for n, m in tiny_embedder.backbone.named_modules() if n.endswith("lora_dropout.default")]
    assert drops and all(isinstance(m, torch.nn.Identity) for m in drops)
    _, path = trained_ckpt
    saved = json.loads((path / "embedder_config.json").read_text())
    assert saved["format"] == 2 and saved["config"]["recipe"] == "tiny-cpu"
    assert {k: saved["config"][k] for k in pins.TINY_EMBEDDER} == pins.TINY_EMBEDDER
    assert json.loads((path / "adapter" / "adapter_config.json").read_text())["lora_dropout"] == 0.0


def test_query_options_follow_the_recipe(tiny_embedder, paper_tiny):
    """query_options() are train_view's keyword arguments: one sketch and 4 images for tiny-cpu; every
    sketch, 8 images, 8 frames and the authors' two training caps for paper."""
    assert tiny_embedder.query_options() == {"max_images": 4, "num_frames": 4, "sketches": "one", "image_caps": None}
    # The authors' two 5-sketch caps (dataset.py 15, 17; tests/pins.py TRAIN_QUERY_IMAGE_CAP).
    assert paper_tiny.query_options() == {"max_images": 8, "num_frames": 8, "sketches": "all",
                                          "image_caps": {"sketch2i/ClothesV1": 5, "sketch2i/QMUL-Shoe-V2": 5}}


def test_missing_backbone_is_one_clear_error(tmp_path):
    """A backbone that is neither a folder nor in the local Hugging Face cache: one BackboneError naming
    it, before anything is downloaded (HF_HUB_OFFLINE is also set by conftest.py)."""
    from model import EmbedderConfig, FashionLensEmbedder
    from support.errors import BackboneError

    for name in ("nobody/Qwen3-VL-0B-Missing", str(tmp_path / "not-here")):
        with pytest.raises(BackboneError, match="neither a local folder nor in the local Hugging Face cache"):
            FashionLensEmbedder(EmbedderConfig(backbone=name))
    (tmp_path / "empty").mkdir()  # a folder without config.json: named, not a transformers traceback
    with pytest.raises(BackboneError, match=r"empty/config\.json"):
        FashionLensEmbedder(EmbedderConfig(backbone=str(tmp_path / "empty")))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft calls a deprecated transformers API
def test_adapter_loads_with_plain_peft(trained_ckpt):
    """adapter/ is a normal peft adapter: PeftModel.from_pretrained on the saved base works and
    gives the same LoRA-adapted language model as the embedder."""
    from peft import PeftModel
    from transformers import AutoModel

    emb, path = trained_ckpt
    base = AutoModel.from_pretrained(str(path / "base"))
    peft_model = PeftModel.from_pretrained(base, str(path / "adapter")).eval()
    emb.eval()
    ours = {k: v for k, v in emb.backbone.state_dict().items() if "lora_" in k}
    theirs = peft_model.state_dict()
    assert ours and all(torch.equal(v, theirs[k]) for k, v in ours.items())
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        a = peft_model.get_base_model().language_model(input_ids=ids).last_hidden_state
        b = emb._base().language_model(input_ids=ids).last_hidden_state
    assert (a - b).abs().max() <= 1e-6


def test_bad_checkpoints(trained_ckpt, tmp_path):
    from model import FashionLensEmbedder
    from support.errors import CheckpointError

    _, path = trained_ckpt
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    (broken / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"broken.*missing adapter/adapter_model.safetensors"):
        FashionLensEmbedder.from_pretrained(broken)
    with pytest.raises(CheckpointError, match="missing embedder_config.json"):
        FashionLensEmbedder.from_pretrained(tmp_path)
    # Asking for another backbone, or a dir whose config names another backbone than its base.
    with pytest.raises(CheckpointError, match="trained on backbone 'tiny', not 'tiny-qwen2-vl'"):
        FashionLensEmbedder.from_pretrained(path, backbone="tiny-qwen2-vl")
    other = tmp_path / "other"
    shutil.copytree(path, other)
    meta = json.loads((other / "embedder_config.json").read_text())
    meta["config"]["backbone"] = "tiny-qwen2-vl"
    (other / "embedder_config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"other.*base is 'qwen3_vl'.*tiny-qwen2-vl"):
        FashionLensEmbedder.from_pretrained(other)


def _edit_meta(src, dst, edit) -> None:
    """Copy checkpoint `src` to `dst` and apply `edit` to its embedder_config.json (a dict)."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / "embedder_config.json").read_text())
    edit(meta)
    (dst / "embedder_config.json").write_text(json.dumps(meta))


def test_format_1_and_edited_budget_are_refused(trained_ckpt, tmp_path):
    """A checkpoint of the previous format (other prompts, square images) is refused saying to retrain;
    an edited pixel budget is refused naming the fields and the saved processor."""
    from model import FashionLensEmbedder
    from support.errors import CheckpointError

    _, path = trained_ckpt
    old = tmp_path / "old"
    _edit_meta(path, old, lambda m: (m.pop("format"), m["config"].update(image_size=64)))  # as format 1 wrote it
    with pytest.raises(CheckpointError, match=r"old/embedder_config\.json: checkpoint format 1.*must be retrained"):
        FashionLensEmbedder.from_pretrained(old)
    newer = tmp_path / "newer"
    _edit_meta(path, newer, lambda m: m.update(format=3))
    with pytest.raises(CheckpointError, match="format 3.*newer FashionLens"):
        FashionLensEmbedder.from_pretrained(newer)
    edited = tmp_path / "edited"
    _edit_meta(path, edited, lambda m: m["config"].update(max_pixels=128 * 128))
    # Caught by the config's copy in embedder.safetensors' metadata (tests/test_reliability_state.py).
    with pytest.raises(CheckpointError, match=r"edited/embedder_config\.json: edited after saving: max_pixels=16384 "
                                              r"differs from the saved value .*\(max_pixels=4096\)"):
        FashionLensEmbedder.from_pretrained(edited)


def test_save_into_writes_a_new_folder(trained_ckpt, tmp_path):
    """save_into builds the same files as save_pretrained, and only into a folder that is new."""
    emb, path = trained_ckpt
    dst = tmp_path / "fresh" / "ckpt"
    emb.save_into(dst)
    assert sorted(str(p.relative_to(dst)) for p in dst.rglob("*")) == \
        sorted(str(p.relative_to(path)) for p in path.rglob("*"))
    assert (dst / "embedder.safetensors").read_bytes() == (path / "embedder.safetensors").read_bytes()
    # Byte-identical on every save: the weights' metadata (the config's copy) is one key, since safetensors
    # writes a metadata map in no fixed order (two keys came out in either order, 1 save in 2).
    for i in range(4):
        emb.save_into(tmp_path / f"again{i}")
        assert (tmp_path / f"again{i}" / "embedder.safetensors").read_bytes() == (path / "embedder.safetensors").read_bytes()
    with pytest.raises(FileExistsError):
        emb.save_into(dst)  # never mixes with an older checkpoint's files




def test_failed_save_keeps_old_checkpoint(trained_ckpt, tmp_path, monkeypatch):
    from model import FashionLensEmbedder

    emb, path = trained_ckpt
    dst = tmp_path / "keep"
    shutil.copytree(path, dst)
    before = sorted(p.name for p in dst.rglob("*"))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(emb.processor, "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        emb.save_pretrained(dst)
    assert sorted(p.name for p in dst.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep"]
    FashionLensEmbedder.from_pretrained(dst)  # still loadable


def test_tiny_builds_offline_and_qwen2_variant():
    """The default (and the Qwen2-VL tiny) build with the hub switched off, in a fresh process."""
    code = (
        "import torch, model\n"
        "from data import Query\n"
        "from PIL import Image\n"
        "for b in ('tiny', 'tiny-qwen2-vl'):\n"
        "    e = model.FashionLensEmbedder(model.EmbedderConfig(backbone=b))\n"
        "    q = e.encode_queries([Query('red dress', images=[Image.new('RGB', (64, 64), 'red')])])\n"
        "    assert q.shape == (1, e.dim) and abs(q.norm().item() - 1) < 1e-5\n"
        "    v = e.collate_queries([Query('clip', frames=[Image.new('RGB', (64, 64), 'red')] * 4)])\n"
        "    text = e.tokenizer.decode(v.input_ids[0])\n"
        "    print(b, e.model_type, e.dim, text.count('<|vision_start|>'), text.count(' seconds>'),\n"
        "          text.count('<|video_pad|>'), v.video_grid_thw.tolist())\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME="/nonexistent-hf-home")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    # A 4-frame video: Qwen3-VL writes 2 timed groups of 16 pads; Qwen2-VL one untimed block of 32.
    assert "tiny qwen3_vl 128 2 2 32 [[2, 8, 8]]" in res.stdout, res.stdout
    assert "tiny-qwen2-vl qwen2_vl 128 1 0 32 [[2, 8, 8]]" in res.stdout, res.stdout


def test_tiny_is_deterministic_from_seed():
    """Same seed -> the same random base (and LoRA, tokens, calibrator) bit for bit and the same token
    ids; another seed -> another base (so runs are reproducible, and the seed is what decides)."""
    from model import EmbedderConfig, FashionLensEmbedder
    from support.tiny_backbone import build_tiny_tokenizer

    one, two, other = (FashionLensEmbedder(EmbedderConfig(seed=s)) for s in (0, 0, 1))
    a, b, c = one.state_dict(), two.state_dict(), other.state_dict()
    assert a.keys() == b.keys() == c.keys()
    same = [k for k in a if not torch.equal(a[k], b[k])]
    assert not same, f"seed 0 built twice differs in {same[:3]}"
    # The base's weight matrices (not LoRA, not the tokens or calibrator) are drawn from the seed.
    base = [k for k in a if a[k].dim() == 2 and "lora_" not in k and not k.startswith("calibrator.")]
    assert len(base) > 20 and all(not torch.equal(a[k], c[k]) for k in base)
    fresh = build_tiny_tokenizer(one.config.tiny_vocab_size)
    texts = ["a red floral dress", "Find the item shown in this video.", "Ünïcödé ✓ 42",
             one.render_query("Find this.", 1, 2)]
    for text in texts:
        ids = one.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == two.tokenizer(text, add_special_tokens=False)["input_ids"] == \
            other.tokenizer(text, add_special_tokens=False)["input_ids"], text
        if "<|" not in text:  # the fresh tokenizer lacks the summary tokens; plain text encodes the same
            assert ids == fresh(text, add_special_tokens=False)["input_ids"], text
    assert (one.query_token_id, one.target_token_id) == (two.query_token_id, two.target_token_id)
    assert len(one.tokenizer("a red floral dress", add_special_tokens=False)["input_ids"]) <= 6  # whole words


def test_records_and_paths_are_accepted(tiny_embedder, tmp_path):
    """encode_queries takes a data.Record (loading its images itself) and encode_images takes paths:
    both equal the embeddings of the same content given as PIL images."""
    import data
    from data import Query

    for i in range(2):
        _img(70 + i).save(tmp_path / f"{i}.png")  # PNG is lossless: the files hold exactly these pixels
    instruction = "Find the item in this street photo."
    rec = data.Record(id="r0", instruction_text=instruction, task="street2shop",
                      target_image=["1.png"], query_image=["0.png"], root=str(tmp_path))
    emb = tiny_embedder
    by_record = emb.encode_queries([rec])
    assert torch.allclose(by_record, emb.encode_queries([Query(instruction, images=[_img(70)])]), atol=1e-6)
    assert (by_record - emb.encode_queries([Query(instruction, images=[_img(71)])])).abs().max() > 1e-4
    by_path = emb.encode_images([str(tmp_path / "1.png"), tmp_path / "0.png"])
    assert torch.allclose(by_path, emb.encode_images([_img(71), _img(70)]), atol=1e-6)


def test_video_frames_are_read_in_order_and_subsampled_evenly(tiny_embedder):
    """Same instruction, same number of frames: only the frames differ, so the embedding must move
    when they are reordered or one is swapped; a clip longer than num_frames keeps evenly spaced
    frames and their times, the first and the last included (7 -> frames 0, 2, 4, 6)."""
    from data import Query

    emb = tiny_embedder
    n = emb.config.num_frames
    assert n == 4
    frames = [_img(100 + i) for i in range(7)]
    instruction = "Find the item shown in this video."

    def enc(clip):
        return emb.encode_queries([Query(instruction, frames=list(clip))])

    base = enc(frames[:n])
    assert (enc(frames[:n][::-1]) - base).abs().max() > 1e-3  # the order is seen
    assert (enc([frames[5], *frames[1:n]]) - base).abs().max() > 1e-3  # the first frame is seen
    assert (enc([*frames[:n - 1], frames[5]]) - base).abs().max() > 1e-3  # the last frame is seen
    kept = emb.encode_queries([Query(instruction, frames=[frames[i] for i in (0, 2, 4, 6)],
                                     frame_times=[i / 2 for i in (0, 2, 4, 6)])])  # untimed frames: 2 fps
    assert torch.allclose(enc(frames), kept, atol=1e-6)
    assert (kept - enc([frames[i] for i in (0, 2, 4, 6)])).abs().max() > 1e-4  # Qwen3-VL reads the times
    assert (enc(frames) - base).abs().max() > 1e-3  # not simply the first num_frames frames
    # A video among images: images first, then the frames; moving a picture from one to the other matters.
    mixed = emb.encode_queries([Query(instruction, images=[frames[6]], frames=frames[:n])])
    moved = emb.encode_queries([Query(instruction, images=[frames[0]], frames=[frames[6], *frames[1:n]])])
    assert (mixed - moved).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# issue 30, item 2: clips whose length is not a multiple of the temporal patch; Qwen2.5-VL's time spacing
# ------------------------------------------------------------------------------------------------

def test_a_short_clip_is_padded_with_its_last_frame(tiny_embedder):
    """Qwen cuts a video into groups of T = 2 frames (temporal_patch_size); a clip of 3 frames is padded
    up to 4 by repeating its LAST frame, times included (transformers 5.x video_processing_qwen2_vl.py
    286-288 and video_processing_qwen3_vl.py 236-238: `videos[:, -1:]` repeated): the patches are those
    of [f0, f1, f2, f2], not [f0, f1, f2, f0] or [f0, f0, f1, f2]."""
    import numpy as np

    video = tiny_embedder.collator._video
    assert tiny_embedder.temporal_patch_size == 2
    f = [_img(400 + i) for i in range(3)]  # distinct frames (64 x 64: the tiny video_size, no resize)
    three = video(f, [0.0, 0.5, 1.0])
    assert three.grid[0] == 2 and three.group_times == [0.25, 1.0]  # last group: (1.0 + 1.0) / 2
    assert np.array_equal(three.patches, video([*f, f[2]], [0.0, 0.5, 1.0, 1.0]).patches)
    for other in ([*f, f[0]], [f[0], *f]):
        assert not np.array_equal(three.patches, video(other, [0.0, 0.5, 1.0, 1.5]).patches)


@pytest.mark.parametrize("times,spg,group_times", [
    ([0.0, 0.5, 1.0, 1.5], 1.0, [0.25, 1.25]),   # even 0.5 s spacing x T = 2 frames per group
    ([0.0, 0.2, 1.0, 1.2], 0.8, [0.1, 1.1]),     # uneven: the mean spacing (1.2 - 0) / 3 = 0.4 s, x 2
    ([3.0], 1.0, [3.0]),                         # one frame: untimed frames are 2 per second
    ([0.7, 0.7], 1.0, [0.7]),                    # no time elapses: the same 2-per-second fallback
])
def test_seconds_per_temporal_group(tiny_embedder, times, spg, group_times):
    """Qwen2.5-VL spaces a video's temporal positions by second_per_grid_ts, the seconds one group of
    T frames spans: T x the spacing of the frames (transformers 5.x processing_qwen2_5_vl.py 137:
    second_per_grid_ts = temporal_patch_size / fps). Untimed frames are 2 per second (qwen-vl-utils
    0.0.14 vision_process.py 434, fetch_video on a list of frames: sample_fps = 2.0). A group's time
    (Qwen3-VL's "<t seconds>") is the mean of its first and last frame's times."""
    v = tiny_embedder.collator._video([_img(410 + i) for i in range(len(times))], times)
    assert v.seconds_per_group == pytest.approx(spg, abs=1e-12)
    assert v.group_times == pytest.approx(group_times, abs=1e-12)


# ------------------------------------------------------------------------------------------------
# Issue 31, item 0: the positions and slerp-edge fields
# ------------------------------------------------------------------------------------------------

def test_positions_and_slerp_edge_rules_agree_with_the_code():
    """EmbedderConfig.slerp_edge's rule lists calibrator.SLERP_EDGES; every positions choice resolves to
    one of the two the collator knows ("mrope", "sequential") on every supported architecture."""
    from calibrator import SLERP_EDGES
    from model import EmbedderConfig
    from support.config_fields import choices_of
    from support.qwen import SUPPORTED_TYPES
    from support.recipes import resolve_positions

    choices = choices_of(EmbedderConfig)
    assert tuple(choices["slerp_edge"]) == SLERP_EDGES
    resolved = {resolve_positions(p, t) for p in choices["positions"] for t in SUPPORTED_TYPES}
    assert resolved == {"mrope", "sequential"}
