"""Each fast path of the speed work held equal to the readable computation it replaces.

    fast path                                   reference it must equal
    ------------------------------------------  ------------------------------------------------
    forward(ModelInputs)                        forward(raw items)                  (bit for bit)
    ModelInputs.rows(a, b)                      collate_queries(items[a:b])          (bit for bit)
    collate_images (one cached prompt row)      the generic _collate of prompt_t    (bit for bit)
    merged_lora (W + s B A, one matmul)         W x + s B (A x); W restored bit for bit
    encode with 2 threads                       encode with 1 thread                 (bit for bit)
    two_core_step                               full_batch_step     (float summation order only)
    prefetch.Prefetcher (process/thread/off)    prepare_batch called in the loop    (bit for bit)
    sampler.peek                                (changes nothing; the draws stay those without it)
    train.py --loader thread / --two-cores auto --loader off / --two-cores off
    fused AdamW                                 the per-tensor AdamW loop

Every test computes both sides and compares them, and most also check that the comparison could
fail (e.g. LoRA B is made nonzero so that merging it changes the weights). ~25 s on 2 cores.
"""
from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pytest

from support import plumbing  # noqa: I001  before torch: it sets OMP_WAIT_POLICY
import torch

from support import cli, fast_train

# Reused from the other test files: the scale-0.1 synthetic U-FIRE (module fixture), the in-process
# train.main runner, the stub embedder with hand-written outputs and its batch.
from test_train import REPO, _train_in_process, _weights, small_root  # noqa: F401  (small_root: fixture)
from test_train_step import StubEmbedder, _batch as stub_batch
from test_model import _img, _photo

TAU = 0.07


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------

def _queries():
    """Eight queries of every kind and of different lengths (so padding and row slicing matter), with
    images of different shapes (different patch grids) and two videos (one beside an image)."""
    from data import Query

    return [Query("Find a long red floral dress with short sleeves and a belt, knee length please."),
            Query("Find the shop image of this street photo.", images=[_photo(1, 120, 60)]),
            Query("short"),
            Query("Find the item shown in this video.", frames=[_img(5 + i) for i in range(4)],
                  frame_times=[0.0, 0.3, 0.6, 0.9]),
            Query("Complete this outfit.", images=[_img(2), _photo(3, 40, 90), _img(4)]),
            Query("a much longer text-only instruction with many words " * 3),
            Query("tiny", images=[_img(12)], frames=[_photo(13, 80, 50), _photo(14, 80, 50)]),
            Query("Find this, but in blue.", images=[_img(9)])]


def _assert_same_inputs(got, want, what=""):
    """Two support.qwen.ModelInputs hold the same tensors (shape, dtype, values) and the same Nones."""
    for f in dataclasses.fields(want):
        a, b = getattr(got, f.name), getattr(want, f.name)
        if b is None:
            assert a is None, f"{what} {f.name}: expected None"
            continue
        assert a is not None and a.dtype == b.dtype, f"{what} {f.name}"
        assert torch.equal(a, b), f"{what} {f.name}: {tuple(a.shape)} vs {tuple(b.shape)}"


def _assert_same_batch(got, want):
    """Two train.Batch: same sub-dataset, keys, instructions, pixels and collated tensors."""
    assert got.subset == want.subset and got.keys == want.keys
    assert [q.instruction for q in got.queries] == [q.instruction for q in want.queries]
    assert [im.tobytes() for im in got.images] == [im.tobytes() for im in want.images]
    assert got.inputs is not None and want.inputs is not None
    for g, w, what in zip(got.inputs, want.inputs, ("queries", "targets")):
        _assert_same_inputs(g, w, what)


def _perturb_lora(emb, seed: int = 0) -> None:
    """LoRA B starts at 0 (the adapters are then a no-op): give it weights so LoRA changes outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, prm in emb.named_parameters():
            if "lora_B" in name:
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.05)


def _grads(model) -> dict:
    """{name: gradient} of every parameter that received one."""
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_close_grads(got: dict, want: dict, rel: float, what: str) -> None:
    assert set(got) == set(want), f"{what}: other parameters got gradients: {set(got) ^ set(want)}"
    for n, g in want.items():
        err = float((got[n] - g).norm())
        assert err <= rel * float(g.norm()) + 1e-9, f"{what} {n}: |diff| {err:.3e} vs |g| {float(g.norm()):.3e}"


@pytest.fixture(scope="module")
def lora_emb():
    """Our own embedder (seed 1) with nonzero LoRA B; tests restore its mode and clear its grads."""
    from model import EmbedderConfig, FashionLensEmbedder

    emb = FashionLensEmbedder(EmbedderConfig(seed=1))
    _perturb_lora(emb)
    emb.eval()
    return emb


@pytest.fixture(scope="module")
def view(small_root, tiny_embedder):  # noqa: F811  (small_root is the fixture imported above)
    import data

    return data.UFire(small_root).train_view(["cir/SynCIR-Top", "t2i/SynGen"], **tiny_embedder.query_options())


# ------------------------------------------------------------------------------------------------
# 1-2. Collators: the tensors given to forward are those it would make itself
# ------------------------------------------------------------------------------------------------

def test_forward_on_collated_inputs_equals_forward_on_raw_items(tiny_embedder):
    emb = tiny_embedder
    qs, imgs = _queries(), [_img(40 + i) for i in range(5)]
    with torch.no_grad():
        raw, pre = emb(queries=qs), emb(queries=emb.collate_queries(qs))
        for key in ("q", "q_raw", "lam", "reg"):
            assert torch.equal(pre[key], raw[key]), key
        t_raw, t_pre = emb(images=imgs)["t"], emb(images=emb.collate_images(imgs))["t"]
    assert torch.equal(t_pre, t_raw)
    assert torch.cdist(raw["q"], raw["q"]).fill_diagonal_(1).min() > 1e-4  # 8 different queries
    assert torch.cdist(t_raw, t_raw).fill_diagonal_(1).min() > 1e-4


@pytest.mark.parametrize("start,end", [(0, 8), (0, 3), (1, 4), (3, 7), (4, 6), (2, 3), (6, 7), (7, 8)])
def test_rows_equal_collating_those_rows_alone(tiny_embedder, start, end):
    """rows(a, b) of the batch == collate_queries(items[a:b]): their images and videos only, padding
    trimmed. (2, 3) holds one text query (no pixels at all), (4, 6) images but no video, (3, 7) starts
    at a video and ends with an image + video row, (6, 7) is that row alone."""
    emb = tiny_embedder
    items = _queries()
    whole = emb.collate_queries(items)
    assert whole.videos_per_row.tolist() == [0, 0, 0, 1, 0, 0, 1, 0]
    assert len({tuple(g) for g in whole.image_grid_thw.tolist()}) == 3  # three patch grids in one batch
    alone = emb.collate_queries(items[start:end])
    _assert_same_inputs(whole.rows(start, end), alone, f"rows({start}, {end})")
    if (start, end) == (2, 3):  # text only: no pixels at all, and padding to trim
        assert alone.pixel_values is None and alone.image_grid_thw is None and alone.pixel_values_videos is None
        assert alone.input_ids.shape[1] < whole.input_ids.shape[1]
    if (start, end) == (4, 6):
        assert alone.pixel_values is not None and alone.pixel_values_videos is None
    if (start, end) == (3, 7):
        # every frame becomes video_size^2 = 64 x 64 whatever its shape (the authors' resized_height =
        # resized_width): 4 frames -> 2 temporal groups, 2 frames -> 1
        assert alone.video_grid_thw.tolist() == [[2, 8, 8], [1, 8, 8]]


def test_target_rows_equal_collating_those_images_alone(tiny_embedder):
    emb = tiny_embedder
    imgs = [_img(60 + i) for i in range(6)]
    whole = emb.collate_images(imgs)
    for s, e in ((0, 2), (1, 4), (5, 6)):
        _assert_same_inputs(whole.rows(s, e), emb.collate_images(imgs[s:e]), f"target rows({s}, {e})")
    mixed = [_img(70), _photo(71, 120, 60), _img(72), _photo(73, 40, 90)]  # row by row (_assemble)
    whole = emb.collate_images(mixed)
    assert whole.input_ids.shape[1] > emb.collate_images(mixed[2:3]).input_ids.shape[1]  # padded rows
    for s, e in ((0, 1), (1, 3), (2, 4), (3, 4)):
        _assert_same_inputs(whole.rows(s, e), emb.collate_images(mixed[s:e]), f"mixed target rows({s}, {e})")


def test_collate_images_equals_the_generic_collation_of_prompt_t(tiny_embedder):
    """The cached, repeated target row == tokenising and laying out every prompt_t one by one; one
    cache entry per patch grid; a batch of mixed grids takes the general path."""
    from model import _Prompt

    emb = tiny_embedder

    def generic(images):
        return emb.collator.collate([_Prompt("target", "", [im], [], []) for im in images])

    imgs = [_img(80 + i) for i in range(4)]
    fast = emb.collate_images(imgs)
    _assert_same_inputs(fast, generic(imgs), "collate_images")
    single = generic(imgs[:1])  # one image, collated alone
    for r in range(len(imgs)):  # every row is the same prompt: the single collation's row
        assert torch.equal(fast.input_ids[r], single.input_ids[0])
        assert torch.equal(fast.position_ids[:, r], single.position_ids[:, 0])
    assert (fast.input_ids == emb.image_token_id).sum(dim=1).tolist() == [emb.image_tokens(64, 64)] * 4 == [16] * 4
    # The cache does not freeze the batch size or the pixels: another call, another batch.
    again = emb.collate_images(imgs[2:][::-1])
    _assert_same_inputs(again, generic(imgs[2:][::-1]), "second call")
    wide = [_photo(90 + i, 120, 60) for i in range(3)]  # another grid: its own cache entry
    _assert_same_inputs(emb.collate_images(wide), generic(wide), "wide images")
    assert {(1, 8, 8), (1, 4, 10)} <= set(emb.collator.target_rows)  # 120 x 60 px -> 80 x 32 px at 64^2
    mixed = imgs[:2] + wide[:1]
    _assert_same_inputs(emb.collate_images(mixed), generic(mixed), "mixed grids")


# ------------------------------------------------------------------------------------------------
# 3. merged_lora
# ------------------------------------------------------------------------------------------------

def _lora_base_weights(emb) -> list:
    """[(frozen W Parameter of each LoRA-adapted linear, s B A of its adapters)]."""
    from peft.tuners.lora import LoraLayer

    out = []
    with torch.no_grad():
        for layer in emb.backbone.modules():
            if isinstance(layer, LoraLayer):
                delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters)  # (out, in)
                out.append((layer.get_base_layer().weight, delta))
    return out


def _assert_weights_unchanged(emb, before: dict, what: str) -> None:
    changed = [n for n, p in emb.named_parameters() if not torch.equal(p, before[n])]
    assert not changed, f"{what}: {len(changed)} weights changed, e.g. {changed[:3]}"


def test_merged_lora_is_the_same_function_and_restores_every_weight(lora_emb):
    emb = lora_emb
    imgs, qs = [_img(100 + i) for i in range(3)], _queries()[:4]
    before = {n: p.detach().clone() for n, p in emb.named_parameters()}
    trainable = {n for n, p in emb.named_parameters() if p.requires_grad}
    layers = _lora_base_weights(emb)
    assert len(layers) >= 7 and all(float(d.abs().max()) > 1e-4 for _, d in layers)  # LoRA is not a no-op

    t_plain = emb.encode_images(imgs, merge_lora=False)
    q_plain = emb.encode_queries(qs, merge_lora=False)
    t_merged = emb.encode_images(imgs, merge_lora=True)
    q_merged = emb.encode_queries(qs, merge_lora=True)
    assert torch.allclose(t_merged, t_plain, atol=1e-5) and torch.allclose(q_merged, q_plain, atol=1e-5)
    with torch.no_grad(), emb.backbone.disable_adapter():  # without LoRA the vectors really move
        t_base = emb(images=imgs)["t"]
    assert float((t_base - t_plain).abs().max()) > 1e-4
    _assert_weights_unchanged(emb, before, "after encode(merge_lora=True)")

    with emb.merged_lora():  # the merge really happens: W + s B A in place of W
        for w, delta in layers[:3]:
            orig = before[next(n for n, p in emb.named_parameters() if p is w)]
            assert not torch.equal(w, orig)
            assert torch.allclose(w, orig + delta, atol=1e-7)
    _assert_weights_unchanged(emb, before, "after merged_lora()")
    assert {n for n, p in emb.named_parameters() if p.requires_grad} == trainable  # adapters re-enabled

    with pytest.raises(RuntimeError, match="inside the context"):
        with emb.merged_lora():
            raise RuntimeError("inside the context")
    _assert_weights_unchanged(emb, before, "after an exception inside merged_lora()")
    assert {n for n, p in emb.named_parameters() if p.requires_grad} == trainable
    assert torch.equal(emb.encode_images(imgs, merge_lora=False), t_plain)  # LoRA path is back, unmerged


def test_nested_merged_lora_merges_once(lora_emb):
    emb = lora_emb
    imgs = [_img(110 + i) for i in range(3)]
    w, _ = _lora_base_weights(emb)[0]
    original = w.detach().clone()
    with emb.merged_lora():
        once_w = w.detach().clone()
        once = emb.encode_images(imgs, merge_lora=False)  # inside: the merged weights, adapters off
    with emb.merged_lora():
        with emb.merged_lora():
            assert torch.equal(w, once_w)  # not W + 2 s B A
            twice = emb.encode_images(imgs, merge_lora=False)
        assert torch.equal(w, once_w)  # the inner exit leaves the outer merge in place
        after_inner = emb.encode_images(imgs, merge_lora=True)
    assert torch.equal(twice, once) and torch.equal(after_inner, once)
    assert torch.equal(w, original)
    assert torch.allclose(once, emb.encode_images(imgs, merge_lora=False), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# 4. Encoding threads
# ------------------------------------------------------------------------------------------------

def test_encode_with_two_threads_equals_one_thread_in_input_order(tiny_embedder, monkeypatch):
    from support import fast_encode

    emb = tiny_embedder
    pools = []

    class RecordingPool(ThreadPoolExecutor):
        def __init__(self, workers, *a, **k):
            pools.append(workers)
            super().__init__(workers, *a, **k)

    monkeypatch.setattr(fast_encode, "ThreadPoolExecutor", RecordingPool)
    imgs, qs = [_img(120 + i) for i in range(7)], _queries()
    out = {}
    for n in (1, 2):
        monkeypatch.setattr(fast_encode, "encode_threads", lambda device, n=n: n)
        pools.clear()
        out[n] = (emb.encode_images(imgs, batch_size=1), emb.encode_images(imgs[::-1], batch_size=1),
                  emb.encode_queries(qs, batch_size=3), emb.encode_queries(qs[::-1], batch_size=3))
        assert pools == [n] * 4  # the monkeypatched thread count reached the pool
    for one, two in zip(out[1], out[2]):
        assert torch.equal(one, two)
    t, t_rev, q, q_rev = out[2]
    assert torch.equal(t_rev.flip(0), t)  # batches of one image: the result order is the input order
    assert torch.allclose(q_rev.flip(0), q, atol=1e-5)  # other batch neighbours: rounding only
    assert torch.cdist(t, t).fill_diagonal_(1).min() > 1e-4 and torch.cdist(q, q).fill_diagonal_(1).min() > 1e-4


# ------------------------------------------------------------------------------------------------
# 5. two_core_step == full_batch_step
# ------------------------------------------------------------------------------------------------

def _two_core(spare):
    """fast_train.two_core_step as a step(model, batch, tau), called as train.train_step calls it."""
    import train

    def step(model, batch, tau, positives="multi"):
        return train.StepOut(**fast_train.two_core_step(
            model, *train._rows(batch, 0, len(batch.keys)),
            lambda q, t: train.info_nce(q, t, train.target_ids(batch.keys, positives, q.device), tau), spare))
    return step


def _step_grads(step, model, batch):
    model.zero_grad(set_to_none=True)
    try:
        out = step(model, batch, TAU)
        return out, _grads(model)
    finally:
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("subset,indices", [("cir/SynCIR-Top", (0, 1, 2, 3, 4, 0, 5, 1)),
                                            ("t2i/SynGen", (7, 3, 11, 2, 5, 8))])
def test_two_core_step_equals_full_batch_step(lora_emb, view, subset, indices):
    import train

    emb = lora_emb
    batch = fast_train.prepare_batch(train.make_batch, view, emb, 0, (subset, indices, 4))
    has_images = batch.inputs[0].pixel_values is not None
    assert has_images == (subset.startswith("cir"))  # one batch with query images, one text-only
    if len(set(indices)) < len(indices):
        assert len(set(batch.keys)) < len(batch.keys)  # duplicate targets: multi-positive rows
    emb.train()
    try:
        ref, g_ref = _step_grads(train.full_batch_step, emb, batch)
        with ThreadPoolExecutor(1) as spare:
            fast, g_fast = _step_grads(_two_core(spare), emb, batch)
    finally:
        emb.eval()
    assert abs(fast.loss - ref.loss) <= 1e-6 * abs(ref.loss)
    assert fast.nce == pytest.approx(ref.nce, rel=1e-6) and fast.reg == pytest.approx(ref.reg, rel=1e-6)
    assert fast.lam == pytest.approx(ref.lam, rel=1e-6) and ref.reg > 0  # the calibrator's R is in L
    assert fast.angle == pytest.approx(ref.angle, rel=1e-5) and ref.angle > 0  # lambda * omega, both paths
    n_trainable = sum(p.requires_grad for p in emb.parameters())
    assert len(g_ref) >= n_trainable - 2 and any("calibrator" in n for n in g_ref)
    _assert_close_grads(g_fast, g_ref, 1e-5, f"two_core_step on {subset}")


def test_two_core_step_on_the_stub_equals_full_batch_step():
    """Raw items (no collator): the step splits lists; R's gradient (only through c) must arrive."""
    import train

    stub, batch = StubEmbedder(), stub_batch()
    ref, g_ref = _step_grads(train.full_batch_step, stub, batch)
    with ThreadPoolExecutor(1) as spare:
        fast, g_fast = _step_grads(_two_core(spare), stub, batch)
    assert fast.loss == pytest.approx(ref.loss, rel=1e-6) and fast.reg == pytest.approx(ref.reg, rel=1e-6)
    assert float(g_ref["c"].norm()) > 0  # c is reached only through R
    _assert_close_grads(g_fast, g_ref, 1e-6, "two_core_step on the stub")


def test_two_core_step_without_a_calibrator(view):
    """calibrator="off": R is a constant 0 without a graph; the step must not try to push it back."""
    import train
    from model import EmbedderConfig, FashionLensEmbedder

    emb = FashionLensEmbedder(EmbedderConfig(calibrator="off", seed=2))
    _perturb_lora(emb, seed=3)
    batch = fast_train.prepare_batch(train.make_batch, view, emb, 0, ("cir/SynCIR-Top", (3, 9, 4, 1), 2))
    emb.train()
    ref, g_ref = _step_grads(train.full_batch_step, emb, batch)
    with ThreadPoolExecutor(1) as spare:
        fast, g_fast = _step_grads(_two_core(spare), emb, batch)
    assert fast.reg == ref.reg == 0.0 and fast.lam == 0.0
    assert abs(fast.loss - ref.loss) <= 1e-6 * abs(ref.loss)
    _assert_close_grads(g_fast, g_ref, 1e-5, "two_core_step, calibrator off")
    assert g_ref and not any("calibrator" in n for n in g_ref)


# ------------------------------------------------------------------------------------------------
# 6. The loader: prepare_batch and the Prefetcher
# ------------------------------------------------------------------------------------------------

def test_prepare_batch_is_pure_and_leaves_the_global_rngs_alone(tiny_embedder, view):
    """Pure: the same request gives the same tensors. The thread loader runs it during a step, so it
    must not draw from the global RNGs (torch's would change that step's dropout masks)."""
    import numpy as np

    import train

    req = ("cir/SynCIR-Top", (5, 2, 7, 2), 9)
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    a = fast_train.prepare_batch(train.make_batch, view, tiny_embedder, 0, req)
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state
    assert all(np.array_equal(x, y) for x, y in zip(np.random.get_state(), np_state))
    b = fast_train.prepare_batch(train.make_batch, view, tiny_embedder, 0, req)
    _assert_same_batch(b, a)
    assert a.keys[1] == a.keys[3] and len(a.queries) == 4 and len(a.inputs[0]) == 4
    c = fast_train.prepare_batch(train.make_batch, view, tiny_embedder, 0, ("cir/SynCIR-Top", (6, 2, 7, 2), 9))
    assert c.keys != a.keys  # the request decides the batch (a constant result would pass above)


def _failing(prepare, request):
    """prepare, except for requests naming the sub-dataset "boom" (a ValueError from inside)."""
    if request[0] == "boom":
        raise ValueError("boom")
    return prepare(request)


def test_prefetcher_off_prepares_in_the_caller(tiny_embedder, view):
    import train
    from support.prefetch import Prefetcher

    prepare = partial(fast_train.prepare_batch, train.make_batch, view, tiny_embedder, 0)
    req = ("t2i/SynGen", (1, 2, 3), 0)
    with Prefetcher(prepare, "off") as pf:
        pf.submit(req)  # no worker: nothing happens
        _assert_same_batch(pf.get(req), prepare(req))
        assert (pf.stats.hits, pf.stats.misses) == (0, 1)
    with pytest.raises(ValueError, match="mode must be one of"):
        Prefetcher(prepare, "nope")


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_prefetcher_returns_what_prepare_returns(tiny_embedder, view, mode):
    """Right guess: the worker's batch (a hit). Wrong guess: the asked-for batch, prepared here (a
    miss). A failure inside prepare reaches get() with its message; a wrong guess that fails does not."""
    import train
    from support.prefetch import Prefetcher

    prepare = partial(fast_train.prepare_batch, train.make_batch, view, tiny_embedder, 0)
    a, b = ("cir/SynCIR-Top", (0, 4, 0, 6), 1), ("t2i/SynGen", (9, 1, 4, 3), 2)
    want_a, want_b = prepare(a), prepare(b)
    with Prefetcher(partial(_failing, prepare), mode) as pf:
        pf.submit(a)
        _assert_same_batch(pf.get(a), want_a)
        assert (pf.stats.hits, pf.stats.misses) == (1, 0)
        pf.submit(a)  # the guess was a, the draw is b (a may or may not be finished by then: the forced
        # cases are in test_prefetcher_never_returns_another_requests_result)
        _assert_same_batch(pf.get(b), want_b)
        assert (pf.stats.hits, pf.stats.misses) == (1, 1)
        _assert_same_batch(pf.get(a), want_a)  # nothing submitted: prepared here
        assert (pf.stats.hits, pf.stats.misses) == (1, 2)
        pf.submit(("boom", (0,), 3))
        with pytest.raises(ValueError, match="boom"):
            pf.get(("boom", (0,), 3))
        pf.submit(("nope/Missing", (0,), 4))  # a sub-dataset the view does not hold
        with pytest.raises(KeyError, match="nope/Missing"):
            pf.get(("nope/Missing", (0,), 4))
        pf.submit(("boom", (0,), 5))  # a wrong guess that fails: the right request is unaffected
        _assert_same_batch(pf.get(b), want_b)
        pf.submit(b)  # the worker still works after the failures
        _assert_same_batch(pf.get(b), want_b)
        assert (pf.stats.hits, pf.stats.misses) == (2, 3)  # a failed get is no hit


def test_prefetcher_thread_failure_reaches_get_in_a_fresh_interpreter():
    """The same in a process that never touched a process pool (train.py --loader thread): nothing
    there has imported concurrent.futures.process, so get() must not depend on it."""
    script = ("import sys; sys.path.insert(0, {repo!r})\n"
              "from support.prefetch import Prefetcher\n"
              "def prepare(r):\n"
              "    if r == 'bad':\n"
              "        raise ValueError('boom')\n"
              "    return r * 2\n"
              "with Prefetcher(prepare, 'thread') as pf:\n"
              "    pf.submit(3)\n"
              "    print('ok', pf.get(3))\n"
              "    pf.submit('bad')\n"
              "    try:\n"
              "        pf.get('bad')\n"
              "    except Exception as e:\n"
              "        print(type(e).__name__, e)\n").format(repo=str(REPO))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split("\n")[:2] == ["ok 6", "ValueError boom"], proc.stdout + proc.stderr[-2000:]


# ------------------------------------------------------------------------------------------------
# 7. sampler.peek
# ------------------------------------------------------------------------------------------------

SIZES = {"a": 60, "b": 24, "c": 17, "d": 40}


def _grad_norm(name: str, t: int) -> float:
    """A made-up difficulty signal that moves a lot, so that GGAS's probabilities move between steps."""
    return {"a": 0.2, "b": 0.9, "c": 0.5, "d": 0.3}[name] * (1 + (t * 7919) % 13) / 2


def _draws(peeks: int, refresh_every: int = 1, rank: int = 0, world: int = 1, steps: int = 40):
    """(draws, guesses made before each update, final state) of a GGAS sampler with `peeks` peek()
    calls before every next() and one after it (before the update, as train.py does)."""
    import sampler

    s = sampler.TaskBatchSampler(SIZES, 8, strategy="ggas", warmup_steps=6, refresh_every=refresh_every,
                                 seed=3, rank=rank, world_size=world)
    draws, guesses = [], []
    for t in range(steps):
        for _ in range(peeks):
            before = s.peek()
            assert s.peek() == before  # a peek changes nothing a second peek could see
        name, idx = next(s)
        if peeks:
            assert before == (name, idx)  # no update between the peek and the draw: exact
            guesses.append(s.peek())  # train.py's guess for step t+1, made before update(step t)
        draws.append((name, idx))
        s.update(name, _grad_norm(name, t))
    return draws, guesses, s.state_dict()


@pytest.mark.parametrize("refresh_every,rank,world", [(1, 0, 1), (3, 0, 1), (1, 1, 2)])
def test_peek_changes_nothing(refresh_every, rank, world):
    plain, _, plain_state = _draws(0, refresh_every, rank, world)
    peeked, guesses, peeked_state = _draws(2, refresh_every, rank, world)
    assert peeked == plain and peeked_state == plain_state
    assert len({name for name, _ in plain}) == len(SIZES)  # every sub-dataset drawn: a real sequence
    # During the warm-up p is uniform whatever the updates: every guess is the next draw.
    assert guesses[:5] == plain[1:6]
    if refresh_every == 1:
        # After it, an update can move the next draw: some guesses miss (the draws above did not).
        misses = sum(g != d for g, d in zip(guesses[6:], plain[7:]))
        assert misses >= 1, "no guess missed: the updates never moved a draw (test signal too weak)"


# ------------------------------------------------------------------------------------------------
# 8. Training end to end: the loader and the two-core step change no result
# ------------------------------------------------------------------------------------------------

TRAIN_ARGS = ["--tasks", "t2i,cir", "--steps", "6", "--eval-every", "6", "--max-eval-queries", "8",
              "--no-final-test", "--batch-size", "8", "--chunk-size", "8"]


@pytest.fixture(scope="module")
def loader_runs(small_root, tmp_path_factory):  # noqa: F811
    """Four 6-step runs in this process: --loader thread (two cores), --loader off, --two-cores off,
    and the defaults; counting two_core_step's calls in each."""
    tmp = tmp_path_factory.mktemp("loader_runs")
    runs = {}
    threads = torch.get_num_threads()
    try:
        for name, flags in (("thread", ["--loader", "thread"]), ("loader_off", ["--loader", "off"]),
                            ("one_core", ["--two-cores", "off"]), ("default", [])):
            calls = [0]

            def counted(*a, _real=fast_train.two_core_step, _calls=calls, **k):
                _calls[0] += 1
                return _real(*a, **k)

            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(fast_train, "two_core_step", counted)
                rc, out, err = _train_in_process(["--data", small_root, *TRAIN_ARGS, *flags,
                                                  "--out", str(tmp / name)])
            assert rc == 0, err[-3000:]
            log = [json.loads(x) for x in (tmp / name / "log.jsonl").read_text().splitlines() if x.strip()]
            runs[name] = {"dir": tmp / name, "log": log, "two_core_calls": calls[0],
                          "config": json.loads((tmp / name / "config.json").read_text())}
    finally:
        torch.set_num_threads(threads)  # train.setup sets 1 thread for the tiny model
    return runs


def _without(records: list, drop=("time", "step_seconds", "prefetched", "seconds")) -> list:
    return [{k: v for k, v in r.items() if k not in drop} for r in records]


def test_thread_loader_gives_the_same_run_as_no_loader(loader_runs):
    fast, ref = loader_runs["thread"], loader_runs["loader_off"]
    assert fast["config"]["resolved"]["loader"] == "thread" and ref["config"]["resolved"]["loader"] == "off"
    steps = [r for r in fast["log"] if r.get("event") is None]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert len({r["subset"] for r in steps}) >= 2  # several sub-datasets: the guesses had work to do
    assert _without(fast["log"]) == _without(ref["log"])  # every step and the validation, exactly
    wf, wr = _weights(fast["dir"] / "last"), _weights(ref["dir"] / "last")
    assert set(wf) == set(wr) and all(torch.equal(wf[k], wr[k]) for k in wr)
    # The worker did the work: step 1 had nothing prepared, most later steps had their batch ready.
    pre = [r["prefetched"] for r in steps]
    assert pre[0] is False and sum(pre[1:]) >= 3, pre
    assert not any(r["prefetched"] for r in ref["log"] if r.get("event") is None)


def test_default_run_is_the_thread_loader_run(loader_runs):
    """The defaults are the thread loader beside the two-core step (as config.json records)."""
    resolved = loader_runs["default"]["config"]["resolved"]
    assert resolved["loader"] == "thread" and resolved["two_core_step"] is True
    assert loader_runs["one_core"]["config"]["resolved"]["two_core_step"] is False
    assert _without(loader_runs["default"]["log"]) == _without(loader_runs["thread"]["log"])


def test_two_core_steps_give_the_losses_of_one_core(loader_runs):
    two, one = loader_runs["default"], loader_runs["one_core"]
    assert two["two_core_calls"] == 6 and one["two_core_calls"] == 0  # the paths compared really ran
    s2 = [r for r in two["log"] if r.get("event") is None]
    s1 = [r for r in one["log"] if r.get("event") is None]
    assert [r["subset"] for r in s2] == [r["subset"] for r in s1]
    for a, b in zip(s2, s1):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(b["loss"]), (a["step"], a["loss"], b["loss"])
        assert a["token_grad_norm"] == pytest.approx(b["token_grad_norm"], rel=1e-3)
    assert len({r["loss"] for r in s1}) == len(s1)  # the steps did differ (not one repeated number)


def test_loader_and_two_cores_flags(tmp_path, capsys):
    import train

    cfg, _ = cli.parse_train_config(train.TrainConfig, ["--loader", "process", "--two-cores", "off", "--out", str(tmp_path / "r")])
    assert (cfg.loader, cfg.two_cores) == ("process", "off")
    cfg.check()  # accepted
    assert train.TrainConfig().loader == "thread" and train.TrainConfig().two_cores == "auto"
    for flag, value in (("--loader", "nope"), ("--two-cores", "maybe")):
        with pytest.raises(SystemExit) as stop:  # argparse refuses a value outside the choices
            train.main([flag, value, "--out", str(tmp_path / "r")])
        assert stop.value.code == 2
        lines = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
        assert len(lines) == 1 and f"argument {flag}" in lines[0] and repr(value) in lines[0], lines
        field = flag[2:].replace("-", "_")
        with pytest.raises(SystemExit, match=f"^error: {flag} {value!r}: must be"):  # the config's own check
            dataclasses.replace(train.TrainConfig(out=str(tmp_path / "r")), **{field: value}).check()
    assert not (tmp_path / "r").exists()
    assert {"loader", "two_cores"} <= cli.RESUME_MAY_CHANGE  # neither changes the trajectory


# ------------------------------------------------------------------------------------------------
# 9. Fused AdamW
# ------------------------------------------------------------------------------------------------

class _TwoGroups(torch.nn.Module):
    """The part of the embedder's interface build_optimizer reads: parameters and vision_parameters."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.lora = torch.nn.Parameter(torch.randn(6, 5, generator=g))
        self.tok = torch.nn.Parameter(torch.randn(5, generator=g))
        self.vis = torch.nn.Parameter(torch.randn(3, 3, generator=g))
        self.frozen = torch.nn.Parameter(torch.randn(4, generator=g), requires_grad=False)

    def vision_parameters(self):
        return [self.vis]


def test_build_optimizer_uses_fused_adamw_with_the_per_tensor_numbers():
    import train

    cfg = train.TrainConfig(weight_decay=0.01).resolved()  # the recipe fills lr, vision_lr_scale, ...
    plan = train.Plan(total=10, steps_per_epoch=5, ggas_warmup=1, lr_warmup=2, per_rank=8)
    fused_model, ref_model = _TwoGroups(), _TwoGroups()
    _, params, opt, _ = train.build_optimizer(fused_model, cfg, plan, plumbing.DistInfo())
    assert isinstance(opt, torch.optim.AdamW) and len(params) == 3
    assert [g["name"] for g in opt.param_groups] == ["adapters", "vision"]
    assert all(g["fused"] is True for g in opt.param_groups)
    # One step gives the same numbers as torch's per-tensor loop (foreach=False) at the same lr.
    ref = torch.optim.AdamW([{"params": [ref_model.lora, ref_model.tok], "lr": opt.param_groups[0]["lr"]},
                             {"params": [ref_model.vis], "lr": opt.param_groups[1]["lr"]}],
                            lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)
    g = torch.Generator().manual_seed(1)
    for p, q in zip(fused_model.parameters(), ref_model.parameters()):
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
    opt.step()
    ref.step()
    for (n, p), q in zip(fused_model.named_parameters(), ref_model.parameters()):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-7), n
    assert not torch.equal(fused_model.lora, _TwoGroups().lora)  # the step did move the weights


# ------------------------------------------------------------------------------------------------
# Issue 30, row 10: no two-core step with dropout (its masks would not be reproducible)
# ------------------------------------------------------------------------------------------------
# two_core_step runs the two towers on two threads that draw dropout masks from torch's one global
# generator in whichever order the threads get there: the same seed would give other masks, other
# gradients, and an exact resume would not be exact. So train.py must not pick it with LoRA dropout
# (use_two_cores), and two_core_step itself refuses a model with a dropout in training mode.

@pytest.mark.parametrize("lora_dropout, want", [(0.0, True), (0.05, False)])  # 0.05: the paper recipe's
def test_use_two_cores_only_without_lora_dropout(lora_emb, monkeypatch, lora_dropout, want):
    import types

    import train

    monkeypatch.setattr(fast_train.os, "cpu_count", lambda: 2)  # a 2-core CPU, whatever this machine has
    cfg = train.TrainConfig(lora_dropout=lora_dropout, batch_size=8, chunk_size=0).resolved()  # one torch thread,
    emb = types.SimpleNamespace(config=dataclasses.replace(lora_emb.config, lora_dropout=lora_dropout))  # no DDP
    assert fast_train.use_two_cores(cfg, emb, plumbing.DistInfo(), 1, {"t2i/SynGen": 40}, train.fits_one_chunk) is want


def test_two_core_step_refuses_a_model_with_lora_dropout(view):
    import train
    from model import EmbedderConfig, FashionLensEmbedder

    emb = FashionLensEmbedder(EmbedderConfig(lora_dropout=0.05, seed=4))
    batch = fast_train.prepare_batch(train.make_batch, view, emb, 0, ("t2i/SynGen", (0, 1, 2), 0))
    emb.train()
    with ThreadPoolExecutor(1) as spare, pytest.raises(ValueError, match=r"lora_dropout.*dropout \(p = 0.05\)"):
        _two_core(spare)(emb, batch, TAU)
    assert all(p.grad is None for p in emb.parameters())  # refused before any computation


# ------------------------------------------------------------------------------------------------
# Issue 30, item 4: the prefetcher never hands out another request's batch (no timing involved)
# ------------------------------------------------------------------------------------------------
# A stale batch would train a step on the records of another draw, silently. The worker's result
# for a wrong guess may be finished, running or still queued when get() asks for something else;
# which one happens in a real run depends on timing, so each case is forced here with events. The
# events come from the fork context: the same objects work in a worker thread and in the forked
# worker process (which inherits `prepare` with them).

def _gated(events, request):
    """A pure `prepare` that says when it starts and cannot finish before its request's gate opens."""
    started, gate = events[request]
    started.set()
    if not gate.wait(60):
        raise TimeoutError(f"the test never opened the gate of {request!r}")
    return ("prepared", request)


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_prefetcher_never_returns_another_requests_result(mode):
    import concurrent.futures as cf
    import multiprocessing as mp

    from support.prefetch import Prefetcher

    ctx = mp.get_context("fork")
    events = {r: (ctx.Event(), ctx.Event()) for r in "abcdefghi"}  # request -> (started, gate)
    for r in "abdfhi":  # only the gates of c, e and g stay shut until the test opens them
        events[r][1].set()
    with Prefetcher(partial(_gated, events), mode) as pf:
        # 1. A wrong guess whose result is FINISHED when the draw asks for another request.
        pf.submit("a")
        cf.wait([pf._pending[1]])  # the worker's future for "a" is done (prefetch.py keeps it in _pending)
        assert pf.get("b") == ("prepared", "b")  # prepared here, not the finished "a"
        assert (pf.stats.hits, pf.stats.misses) == (0, 1)
        # 2. A wrong guess still RUNNING when the next guess replaces it: only the new guess's
        # result is handed out.
        pf.submit("c")
        assert events["c"][0].wait(60)  # "c" is running on the worker (it cannot finish: its gate is shut)
        pf.submit("d")
        events["c"][1].set()
        assert pf.get("d") == ("prepared", "d")
        assert (pf.stats.hits, pf.stats.misses) == (1, 1)
        # 3. A wrong guess RUNNING (or just finished) when get() asks for another request.
        pf.submit("e")
        assert events["e"][0].wait(60)
        events["e"][1].set()
        assert pf.get("f") == ("prepared", "f")
        assert (pf.stats.hits, pf.stats.misses) == (1, 2)
        # 4. A guess replaced while it waits behind a running one (queued; a process pool may have
        # moved it to its call queue already): the request asked for is the last one submitted.
        pf.submit("g")
        assert events["g"][0].wait(60)  # "g" holds the one worker
        pf.submit("h")
        pf.submit("i")
        events["g"][1].set()
        assert pf.get("i") == ("prepared", "i") and pf.get("h") == ("prepared", "h")
        assert (pf.stats.hits, pf.stats.misses) == (2, 3)
