"""Tests for model.py: shapes/norms per query kind, batch independence, checkpoints, offline build.

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
# not against a second rendering of our own.
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


def _query_messages(instruction: str, n_images: int, n_frames: int) -> list:
    """prompt_q as chat messages; the wording is written out, as a checkpoint depends on it."""
    user = [{"type": "text", "text": instruction + "\n" * bool(n_images)}]
    user += [{"type": "image"}] * n_images
    if n_frames:
        user += [{"type": "text", "text": "\nVideo frames in order:"}] + [{"type": "image"}] * n_frames
    user += [{"type": "text", "text": "\nSummarize the target fashion item in one word."}]
    return [{"role": "system", "content": "You are a fashion expert."}, {"role": "user", "content": user}]


@pytest.mark.parametrize("n_images,n_frames", [(0, 0), (2, 0), (0, 4), (1, 3)])
def test_prompt_matches_chat_template(tiny_embedder, n_images, n_frames):
    """render_query / render_target == the tokenizer's apply_chat_template with Qwen's own template,
    then the summary token as the assistant's answer; and the tiny tokenizer's template agrees."""
    emb = tiny_embedder
    msgs = _query_messages("Find this.", n_images, n_frames)
    qwen = emb.tokenizer.apply_chat_template(msgs, chat_template=QWEN2_VL_CHAT_TEMPLATE, tokenize=False,
                                             add_generation_prompt=True)
    assert emb.render_query("  Find this. ", n_images, n_frames, expand=False) == qwen + "<|query|>"
    own = emb.tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": "<|query|>"}], tokenize=False)
    assert own == qwen + "<|query|>"
    target = [{"role": "system", "content": "You are a fashion expert."},
              {"role": "user", "content": [{"type": "image"},
                                           {"type": "text", "text": "\nSummarize this fashion item in one word."}]}]
    assert emb.render_target(expand=False) == emb.tokenizer.apply_chat_template(
        target, chat_template=QWEN2_VL_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True) + "<|target|>"
    # Expanded, each image is (image_size / patch)^2 / merge^2 visual tokens: 64 px, 8-px patches, 2x2 merge.
    vision = emb._base().config.vision_config
    per_image = (emb.config.image_size // vision.patch_size) ** 2 // vision.spatial_merge_size ** 2
    assert per_image == 16
    ids = emb.tokenizer(emb.render_query("Find this.", n_images, n_frames), add_special_tokens=False)["input_ids"]
    assert ids.count(emb.image_token_id) == (n_images + n_frames) * per_image
    assert ids.count(emb.query_token_id) == 1 and ids[-1] == emb.query_token_id


def test_batch_independence(tiny_embedder):
    """A query alone == the same query among 7 others of different lengths (padding, mRoPE)."""
    from data import Query

    emb = tiny_embedder
    probe = Query("Find the item with these changes: is red", images=[_img(20)])
    others = [Query("x"), Query("a much longer instruction with many words " * 3),
              Query("two images", images=[_img(21), _img(22)]),
              Query("video", frames=[_img(23 + i) for i in range(4)]),
              Query("outfit", images=[_img(30 + i) for i in range(4)]),
              Query("short"), Query("one image and text", images=[_img(40)])]
    alone = emb.encode_queries([probe])
    for pos in (0, 3, 7):
        batch = others[:pos] + [probe] + others[pos:]
        together = emb.encode_queries(batch, batch_size=8)
        assert (together[pos] - alone[0]).abs().max() <= 1e-5
    imgs = [_img(50 + i) for i in range(8)]
    t_alone = emb.encode_images(imgs[3:4])
    t_batch = emb.encode_images(imgs, batch_size=8)
    assert (t_batch[3] - t_alone[0]).abs().max() <= 1e-5


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


def test_lora_dropout_auto_is_zero_on_tiny_and_paper_value_elsewhere(trained_ckpt, tiny_embedder):
    """lora_dropout=None resolves per backbone, and the checkpoint stores the resolved number."""
    from model import EmbedderConfig, auto_lora_dropout

    assert EmbedderConfig().lora_dropout is None
    assert auto_lora_dropout("tiny") == auto_lora_dropout("tiny-qwen2-vl") == 0.0
    assert auto_lora_dropout("Qwen/Qwen3-VL-4B-Instruct") == 0.05  # the paper's value
    assert tiny_embedder.config.lora_dropout == 0.0
    # peft builds an Identity instead of a Dropout for p = 0: the tiny step pays nothing for it.
    drops = [m for n, m in tiny_embedder.backbone.named_modules() if n.endswith("lora_dropout.default")]
    assert drops and all(isinstance(m, torch.nn.Identity) for m in drops)
    _, path = trained_ckpt
    assert json.loads((path / "embedder_config.json").read_text())["config"]["lora_dropout"] == 0.0
    assert json.loads((path / "adapter" / "adapter_config.json").read_text())["lora_dropout"] == 0.0


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
    from model import CheckpointError, FashionLensEmbedder

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


def test_save_into_writes_a_new_folder(trained_ckpt, tmp_path):
    """save_into builds the same files as save_pretrained, and only into a folder that is new."""
    emb, path = trained_ckpt
    dst = tmp_path / "fresh" / "ckpt"
    emb.save_into(dst)
    assert sorted(str(p.relative_to(dst)) for p in dst.rglob("*")) == \
        sorted(str(p.relative_to(path)) for p in path.rglob("*"))
    assert (dst / "embedder.safetensors").read_bytes() == (path / "embedder.safetensors").read_bytes()
    with pytest.raises(FileExistsError):
        emb.save_into(dst)  # never mixes with an older checkpoint's files


def test_tiny_backbone_imports_no_core_file():
    """tiny_backbone.py is support: importing it pulls in none of data/model/train/evaluate."""
    code = ("import sys, tiny_backbone\n"
            "core = {'data', 'model', 'train', 'evaluate'} & set(sys.modules)\n"
            "assert not core, core\n"
            "assert tiny_backbone.TINY_TYPES == {'tiny': 'qwen3_vl', 'tiny-qwen2-vl': 'qwen2_vl'}\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]


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
        "    print(b, e.model_type, e.dim)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME="/nonexistent-hf-home")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "tiny qwen3_vl 128" in res.stdout and "tiny-qwen2-vl qwen2_vl 128" in res.stdout


def test_tiny_is_deterministic_from_seed():
    """Same seed -> the same random base (and LoRA, tokens, calibrator) bit for bit and the same token
    ids; another seed -> another base (so runs are reproducible, and the seed is what decides)."""
    from model import EmbedderConfig, FashionLensEmbedder
    from tiny_backbone import build_tiny_tokenizer

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
    frames, the first and the last included (7 -> frames 0, 2, 4, 6)."""
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
    assert torch.allclose(enc(frames), enc([frames[i] for i in (0, 2, 4, 6)]), atol=1e-6)
    assert (enc(frames) - base).abs().max() > 1e-3  # not simply the first num_frames frames
    # A video among images: images first, then the frames; moving a picture from one to the other matters.
    mixed = emb.encode_queries([Query(instruction, images=[frames[6]], frames=frames[:n])])
    moved = emb.encode_queries([Query(instruction, images=[frames[0]], frames=[frames[6], *frames[1:n]])])
    assert (mixed - moved).abs().max() > 1e-3
