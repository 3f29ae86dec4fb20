"""Tests for sampler.py: GGAS probabilities, the floors, draw frequencies, sharding, exact resume, and
the switches between the authors' schedule and ours (refresh, EMA start, floor)."""
import json
import math
import random

import pytest

from sampler import SamplerConfig, TaskBatchSampler, floor_probabilities, renorm_floor

SIZES = {"cir/a": 300, "sketch/b": 40, "text/c": 1000, "video/d": 120}


def _fake_grad_norm(name: str, step: int) -> float:
    """A deterministic, task-dependent 'gradient norm' for simulations."""
    base = {"cir/a": 0.5, "sketch/b": 2.0, "text/c": 0.2, "video/d": 1.0}[name]
    return base * (1.0 + 0.3 * math.sin(step))


def _run(sampler, steps, start=0):
    """Draw `steps` batches, reporting a fake gradient norm after each; return what was drawn."""
    out = []
    for t in range(start, start + steps):
        name, idx = next(sampler)
        out.append((name, list(idx)))
        sampler.update(name, _fake_grad_norm(name, t))
    return out


def test_ggas_is_uniform_during_warmup_then_adaptive():
    s = TaskBatchSampler(SIZES, batch_size=8, warmup_steps=30, min_prob=0.0)
    for _ in range(30):
        assert all(abs(p - 0.25) < 1e-12 for p in s.probabilities().values())
        name, _ = next(s)
        s.update(name, 5.0 if name == "sketch/b" else 0.1)  # very unequal difficulties
    p = s.probabilities()
    assert p["sketch/b"] > 0.5  # adaptive now: the hard task dominates


def test_default_warmup_is_one_epoch():
    s = TaskBatchSampler(SIZES, batch_size=32)
    # drop_last=True: full batches per pass = 9 + 1 + 31 + 3
    assert s.steps_per_epoch() == 300 // 32 + 40 // 32 + 1000 // 32 + 120 // 32
    assert s.warmup_steps == s.steps_per_epoch()
    s2 = TaskBatchSampler(SIZES, batch_size=32, drop_last=False)
    assert s2.steps_per_epoch() == sum(math.ceil(n / 32) for n in SIZES.values())


@pytest.mark.parametrize("lam", [0.5, 1.0])
def test_equal_difficulties_give_size_prior(lam):
    expected_raw = {k: n ** lam for k, n in SIZES.items()}
    z = sum(expected_raw.values())
    expected = {k: v / z for k, v in expected_raw.items()}
    for strategy in ("ggas", "size"):
        s = TaskBatchSampler(SIZES, batch_size=8, strategy=strategy, lam=lam, warmup_steps=0, min_prob=0.0)
        for name in SIZES:
            s.update(name, 0.7)  # equal difficulties: the G_k/T term cancels in the softmax
        got = s.probabilities()
        for k in SIZES:
            assert abs(got[k] - expected[k]) < 1e-12


def test_raising_one_difficulty_raises_its_probability():
    s = TaskBatchSampler(SIZES, batch_size=8, warmup_steps=0)
    for name in SIZES:
        s.update(name, 0.5)
    before = s.probabilities()
    for _ in range(5):
        s.update("cir/a", 2.0)
    after = s.probabilities()
    assert after["cir/a"] > before["cir/a"] + 0.05
    assert all(after[k] < before[k] for k in SIZES if k != "cir/a")
    assert s.difficulties()["cir/a"] > s.difficulties()["text/c"]
    # EMA arithmetic: first report sets G, later ones mix with alpha 0.9.
    g = 0.5
    for _ in range(5):
        g = 0.9 * g + 0.1 * 2.0
    assert abs(s.difficulties()["cir/a"] - g) < 1e-12


def test_temperature_scales_the_difficulty_term():
    def p_hard(t):
        s = TaskBatchSampler(SIZES, batch_size=8, warmup_steps=0, temperature=t, min_prob=0.0)
        for name in SIZES:
            s.update(name, 2.0 if name == "video/d" else 0.0)
        return s.probabilities()["video/d"]
    assert p_hard(0.5) > p_hard(1.0) > p_hard(4.0)


def test_floor_holds_after_renormalising():
    sizes = {f"t{i}": n for i, n in enumerate([10, 20, 50, 5000, 100000])}
    s = TaskBatchSampler(sizes, batch_size=4, warmup_steps=0, min_prob=0.05)
    for name in sizes:  # one overwhelming task: the others' raw softmax mass is ~1e-13
        s.update(name, 30.0 if name == "t4" else 0.0)
    p = s.probabilities()
    assert abs(sum(p.values()) - 1.0) < 1e-12
    assert min(p.values()) >= 0.05 - 1e-12
    assert p["t4"] == pytest.approx(1 - 4 * 0.05)
    # Property check of the water-filling floor on random distributions.
    rng = random.Random(0)
    for _ in range(500):
        k = rng.randint(1, 12)
        raw = [rng.random() ** 6 for _ in range(k)]
        z = sum(raw)
        raw = [v / z for v in raw]
        m = rng.choice([0.0, 0.01, 0.05, 0.2, 0.5])
        out = floor_probabilities(raw, m)
        floor = min(m, 1 / k)
        assert abs(sum(out) - 1) < 1e-9 and min(out) >= floor - 1e-12
        # Tasks above the floor keep their relative odds (it is a renormalisation, not a mix).
        free = [(o, r) for o, r in zip(out, raw) if o > floor + 1e-12]
        for (o1, r1), (o2, r2) in zip(free, free[1:]):
            assert abs(o1 * r2 - o2 * r1) < 1e-9
    assert floor_probabilities([0.9, 0.1], 0.7) == [0.5, 0.5]  # floor clamped to 1/K


def test_empirical_frequencies_match_probabilities():
    s = TaskBatchSampler(SIZES, batch_size=4, warmup_steps=0, seed=123)
    for name in SIZES:
        s.update(name, _fake_grad_norm(name, 0))
    probs = s.probabilities()  # no further updates: p stays fixed
    counts = {k: 0 for k in SIZES}
    n = 20_000
    for _ in range(n):
        name, _ = next(s)
        counts[name] += 1
    for k in SIZES:
        assert abs(counts[k] / n - probs[k]) < 0.01, (k, counts[k] / n, probs[k])


def test_batches_come_from_one_subdataset_without_replacement():
    s = TaskBatchSampler(SIZES, batch_size=16, strategy="uniform", drop_last=False, seed=5)
    seen = {k: [] for k in SIZES}
    for _ in range(400):
        name, idx = next(s)
        assert all(0 <= i < SIZES[name] for i in idx) and len(set(idx)) == len(idx)
        seen[name].append(idx)
    # Within a sub-dataset, each pass (epoch) visits every index exactly once.
    for name, batches in seen.items():
        flat = [i for b in batches for i in b]
        n = SIZES[name]
        full = len(flat) // n
        assert full >= 1
        for e in range(full):
            assert sorted(flat[e * n:(e + 1) * n]) == list(range(n))
        assert flat[:n] != flat[n:2 * n]  # reshuffled between passes


def test_drop_last_gives_full_batches_and_small_subdatasets_shrink():
    s = TaskBatchSampler({"big": 100, "small": 6}, batch_size=16, strategy="uniform", world_size=4, rank=1)
    for _ in range(200):
        name, idx = next(s)
        assert len(idx) == (4 if name == "big" else 1)  # 16/4, or 6 -> 4 global -> 1 per rank


def test_two_ranks_same_subdataset_disjoint_shards():
    kw = dict(batch_size=8, warmup_steps=10, seed=7)
    r0 = TaskBatchSampler(SIZES, rank=0, world_size=2, **kw)
    r1 = TaskBatchSampler(SIZES, rank=1, world_size=2, **kw)
    single = TaskBatchSampler(SIZES, rank=0, world_size=1, **kw)
    for t in range(200):
        (n0, i0), (n1, i1), (n, i) = next(r0), next(r1), next(single)
        assert n0 == n1 == n
        assert len(i0) == len(i1) == 4 and not set(i0) & set(i1)
        assert i0 + i1 == i  # rank-order concatenation rebuilds the global batch
        g = _fake_grad_norm(n, t)  # after DDP's all-reduce every rank reports the same norm
        for s in (r0, r1, single):
            s.update(n, g)


def test_save_restore_mid_run_reproduces_the_sequence():
    kw = dict(batch_size=16, warmup_steps=25, refresh_every=3, seed=11)
    ref = TaskBatchSampler(SIZES, **kw)
    full = _run(ref, 120)

    first = TaskBatchSampler(SIZES, **kw)
    head = _run(first, 60)
    state = json.loads(json.dumps(first.state_dict()))  # must survive plain JSON (no pickle)
    resumed = TaskBatchSampler(SIZES, **kw)
    resumed.load_state_dict(state)
    tail = _run(resumed, 60, start=60)
    assert head + tail == full
    assert resumed.state_dict() == ref.state_dict()
    assert len({name for name, _ in tail}) > 1  # the check covered several sub-datasets


def test_load_state_dict_rejects_other_setup():
    s = TaskBatchSampler(SIZES, batch_size=8)
    other = TaskBatchSampler({**SIZES, "text/c": 999}, batch_size=8)
    with pytest.raises(ValueError, match="sizes"):
        other.load_state_dict(s.state_dict())


def test_refresh_every_holds_probabilities_between_refreshes():
    s = TaskBatchSampler(SIZES, batch_size=8, warmup_steps=0, refresh_every=10)
    for name in SIZES:
        s.update(name, 0.1)
    next(s)  # step 0 computes p
    held = s.probabilities()
    for t in range(1, 10):
        s.update("sketch/b", 3.0)  # big change in difficulty...
        assert s.probabilities() == held  # ...ignored until the next refresh
        next(s)
    assert s.probabilities()["sketch/b"] > held["sketch/b"]  # step 10: refreshed


def test_bad_input_is_reported_clearly():
    with pytest.raises(ValueError, match="strategy"):
        TaskBatchSampler(SIZES, batch_size=8, strategy="greedy")
    with pytest.raises(ValueError, match="multiple of world_size"):
        TaskBatchSampler(SIZES, batch_size=9, world_size=2)
    with pytest.raises(ValueError, match="'empty'"):
        TaskBatchSampler({"empty": 0, "ok": 10}, batch_size=4)
    s = TaskBatchSampler(SIZES, batch_size=8)
    with pytest.raises(ValueError, match="unknown sub-dataset 'nope'"):
        s.update("nope", 1.0)
    with pytest.raises(ValueError, match="sketch/b"):
        s.update("sketch/b", float("nan"))


def test_config_round_trip_and_strategies():
    cfg = SamplerConfig(batch_size=8, strategy="size", warmup_steps=5, seed=3)
    s = TaskBatchSampler.from_config(SIZES, cfg)
    assert s.config == cfg
    u = TaskBatchSampler(SIZES, batch_size=8, strategy="uniform", warmup_steps=0)
    for name in SIZES:
        u.update(name, 10.0 if name == "cir/a" else 0.0)
    assert set(u.probabilities().values()) == {0.25}


def test_unreported_subdataset_gets_neutral_difficulty():
    s = TaskBatchSampler(SIZES, batch_size=8, warmup_steps=0, min_prob=0.0)
    s.update("cir/a", 1.0)
    s.update("text/c", 3.0)
    d = s.difficulties()
    assert d["sketch/b"] == d["video/d"] == 2.0  # mean of the reported ones
    assert TaskBatchSampler(SIZES, batch_size=8).difficulties() == {k: 0.0 for k in SIZES}


def test_resume_on_another_world_size_sees_the_same_global_batches():
    kw = dict(batch_size=8, warmup_steps=5, seed=2)
    one = TaskBatchSampler(SIZES, **kw)
    _run(one, 20)
    state = one.state_dict()
    ranks = [TaskBatchSampler(SIZES, rank=r, world_size=2, **kw) for r in range(2)]
    for s in ranks:
        s.load_state_dict(state)
    for t in range(20, 40):
        name, idx = next(one)
        (n0, i0), (n1, i1) = next(ranks[0]), next(ranks[1])
        assert n0 == n1 == name and i0 + i1 == idx
        for s in (one, *ranks):
            s.update(name, _fake_grad_norm(name, t))


def test_ggas_adapts_at_the_end_of_warmup_between_refreshes():
    """The first draw after the warm-up uses GGAS' p even when refresh_every would hold the
    warm-up's uniform p a few steps longer (p is recomputed at step warmup_steps)."""
    s = TaskBatchSampler(SIZES, batch_size=8, warmup_steps=5, refresh_every=4, min_prob=0.0, seed=0)
    for _ in range(5):  # the warm-up: uniform draws; p refreshed at step 4 (4 % 4 == 0) -> uniform
        next(s)
    for _ in range(200):  # sketch/b is by far the hardest: G ~ 50 against ~0
        for name in SIZES:
            s.update(name, 50.0 if name == "sketch/b" else 0.0)
    assert s.step == 5 and s.step % s.refresh_every != 0  # no scheduled refresh until step 8
    assert s.probabilities()["sketch/b"] > 0.999  # what the next draw will use
    drawn = [next(s)[0] for _ in range(3)]  # steps 5, 6, 7
    assert drawn == ["sketch/b"] * 3  # a uniform p would pick another sub-dataset 3 times in 4
    held = dict(zip(s.names, s.state_dict()["probs"]))  # the p those draws used
    assert held["sketch/b"] > 0.999


# ------------------------------------------------------------------------------------------------
# The GGAS switches: floor, EMA start, refresh (the authors' values against ours)
# ------------------------------------------------------------------------------------------------

def test_renorm_and_waterfill_floors_on_a_hand_example():
    """p = (0.97, 0.02, 0.01), floor 0.05.
    renorm (the authors): clip -> (0.97, 0.05, 0.05), sum 1.07, divide once -> (0.97, 0.05, 0.05) / 1.07:
    the clipped two end at 0.0467, below the floor.  waterfill: the two are pinned at 0.05 and the
    rest (0.9) goes to the first: (0.9, 0.05, 0.05)."""
    p = [0.97, 0.02, 0.01]
    assert renorm_floor(p, 0.05) == pytest.approx([0.97 / 1.07, 0.05 / 1.07, 0.05 / 1.07], abs=1e-15)
    assert renorm_floor(p, 0.05)[1] < 0.05  # the authors' floor does not hold exactly
    assert floor_probabilities(p, 0.05) == pytest.approx([0.9, 0.05, 0.05], abs=1e-15)
    # Nothing below the floor: both leave p as it is.
    assert renorm_floor([0.5, 0.3, 0.2], 0.1) == pytest.approx([0.5, 0.3, 0.2], abs=1e-15)
    assert floor_probabilities([0.5, 0.3, 0.2], 0.1) == pytest.approx([0.5, 0.3, 0.2], abs=1e-15)
    # A floor above 1/K is clamped to 1/K = 0.5 by both: waterfill then gives uniform; renorm clips
    # (0.9, 0.1) to (0.9, 0.5) and divides by 1.4, so it stays far from uniform.
    assert floor_probabilities([0.9, 0.1], 0.7) == [0.5, 0.5]
    assert renorm_floor([0.9, 0.1], 0.7) == pytest.approx([0.9 / 1.4, 0.5 / 1.4], abs=1e-15)


@pytest.mark.parametrize("floor", ["renorm", "waterfill"])
def test_the_sampler_applies_the_chosen_floor(floor):
    """lam = 0 switches the size prior off, so p = softmax(G / T) with G set by the reports:
    G = (log 0.97, log 0.02, log 0.01) gives p = (0.97, 0.02, 0.01) exactly, floored as above."""
    s = TaskBatchSampler({"a": 10, "b": 10, "c": 10}, batch_size=2, lam=0.0, warmup_steps=0, min_prob=0.05,
                         floor=floor)
    for name, pk in zip("abc", (0.97, 0.02, 0.01)):
        s.update(name, math.log(pk) + 10.0)  # the first report sets G_k; +10 keeps it >= 0 (cancels in softmax)
    want = {"renorm": [0.97 / 1.07, 0.05 / 1.07, 0.05 / 1.07], "waterfill": [0.9, 0.05, 0.05]}[floor]
    assert list(s.probabilities().values()) == pytest.approx(want, abs=1e-12)


def test_ema_start_zero_against_first_report():
    """Reports 2.0 then 1.0 to cir/a, alpha 0.9.  first: G = 2.0, then 0.9*2.0 + 0.1*1.0 = 1.9; an
    unreported sub-dataset counts as the mean of the reported ones.  zero (the authors): G = 0.1*2.0
    = 0.2, then 0.9*0.2 + 0.1*1.0 = 0.28; an unreported one stays at 0."""
    first = TaskBatchSampler(SIZES, batch_size=8, warmup_steps=0, min_prob=0.0, ema_start="first")
    zero = TaskBatchSampler(SIZES, batch_size=8, warmup_steps=0, min_prob=0.0, ema_start="zero")
    for s in (first, zero):
        s.update("cir/a", 2.0)
    assert first.difficulties()["cir/a"] == pytest.approx(2.0, abs=1e-15)
    assert zero.difficulties()["cir/a"] == pytest.approx(0.2, abs=1e-15)
    for s in (first, zero):
        s.update("cir/a", 1.0)
        s.update("text/c", 0.5)
    assert first.difficulties() == pytest.approx({"cir/a": 1.9, "text/c": 0.5, "sketch/b": 1.2, "video/d": 1.2})
    assert zero.difficulties() == pytest.approx({"cir/a": 0.28, "text/c": 0.05, "sketch/b": 0.0, "video/d": 0.0})
    # The score uses them: p = softmax(0.5 log N_k + G_k), floor off.
    for s in (first, zero):
        logits = {k: 0.5 * math.log(SIZES[k]) + g for k, g in s.difficulties().items()}
        z = sum(math.exp(v) for v in logits.values())
        assert s.probabilities() == pytest.approx({k: math.exp(v) / z for k, v in logits.items()}, rel=1e-12)


EPOCH_SIZES = {"a": 24, "b": 16, "c": 8}  # batch 8: 3 + 2 + 1 = 6 steps per epoch


def test_per_epoch_refresh_holds_p_inside_an_epoch_and_changes_it_at_the_boundary():
    s = TaskBatchSampler(EPOCH_SIZES, batch_size=8, warmup_steps=6, refresh="epoch", min_prob=0.0, seed=3)
    assert s.steps_per_epoch() == 6 and s.refresh_interval == 6
    used = []  # the p of every draw: what probabilities() says just before it
    for t in range(18):
        used.append(s.probabilities())
        name, _ = next(s)
        s.update(name, {"a": 0.1, "b": 0.2, "c": 3.0}[name] * (1 + t))  # difficulties move every step
    # Epoch 0 is the warm-up: uniform.  Epochs 1 and 2: one p each, fixed for their six draws.
    assert all(p == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, abs=1e-15) for p in used[:6])
    assert all(p == used[6] for p in used[6:12]) and all(p == used[12] for p in used[12:18])
    assert used[6] != used[0] and used[12] != used[6]  # recomputed at each epoch start
    # Per step instead: p follows the reports within the epoch.
    t = TaskBatchSampler(EPOCH_SIZES, batch_size=8, warmup_steps=6, refresh="step", min_prob=0.0, seed=3)
    seen = []
    for k in range(12):
        seen.append(t.probabilities())
        name, _ = next(t)
        t.update(name, {"a": 0.1, "b": 0.2, "c": 3.0}[name] * (1 + k))
    assert len({tuple(p.values()) for p in seen[6:12]}) > 1


def test_authors_switches_resume_exactly_mid_epoch_and_ranks_agree():
    """refresh epoch + EMA from zero + renorm floor: a state saved in the middle of an epoch (its
    held p, zero-started G) continues with the same draws, and two ranks draw the same sub-datasets."""
    kw = dict(batch_size=8, warmup_steps=6, refresh="epoch", ema_start="zero", floor="renorm", seed=5)
    ref = TaskBatchSampler(EPOCH_SIZES, **kw)
    want = _run_sizes(ref, 20)
    first = TaskBatchSampler(EPOCH_SIZES, **kw)
    got = _run_sizes(first, 9)  # step 9: inside epoch 1
    state = json.loads(json.dumps(first.state_dict()))  # through JSON, as train.py writes it
    assert (state["refresh"], state["ema_start"], state["floor"]) == ("epoch", "zero", "renorm")
    resumed = TaskBatchSampler(EPOCH_SIZES, **kw)
    resumed.load_state_dict(state)
    got += _run_sizes(resumed, 11, start=9)
    assert got == want
    ranks = [TaskBatchSampler(EPOCH_SIZES, rank=r, world_size=2, **kw) for r in range(2)]
    for t in range(20):
        (n0, i0), (n1, i1) = next(ranks[0]), next(ranks[1])
        assert n0 == n1 and len(i0) == len(i1) and not set(i0) & set(i1)
        for r in ranks:
            r.update(n0, {"a": 0.3, "b": 1.5, "c": 0.7}[n0])


def _run_sizes(sampler, steps, start=0):
    """_run for EPOCH_SIZES: draw, report a per-task gradient norm, return the draws."""
    out = []
    for t in range(start, start + steps):
        name, idx = next(sampler)
        out.append((name, list(idx)))
        sampler.update(name, {"a": 0.3, "b": 1.5, "c": 0.7}[name] * (1 + 0.1 * t))
    return out


def test_switches_are_checked_and_part_of_the_saved_state():
    for field, bad in (("refresh", "often"), ("ema_start", "one"), ("floor", "clip")):
        with pytest.raises(ValueError, match=f"{field} must be one of"):
            TaskBatchSampler(SIZES, batch_size=8, **{field: bad})
    zero = TaskBatchSampler(SIZES, batch_size=8, ema_start="zero")
    with pytest.raises(ValueError, match="ema_start"):  # a state drawn with another switch is refused
        TaskBatchSampler(SIZES, batch_size=8).load_state_dict(zero.state_dict())
    # A state written before the switches existed was drawn with ours (step, first, waterfill).
    old = TaskBatchSampler(SIZES, batch_size=8).state_dict()
    for key in ("refresh", "ema_start", "floor"):
        del old[key]
    TaskBatchSampler(SIZES, batch_size=8).load_state_dict(old)
    with pytest.raises(ValueError, match="floor"):
        TaskBatchSampler(SIZES, batch_size=8, floor="renorm").load_state_dict(old)
    cfg = SamplerConfig(batch_size=8, warmup_steps=5, refresh="epoch", ema_start="zero", floor="renorm")
    assert TaskBatchSampler.from_config(SIZES, cfg).config == cfg


def test_ggas_probabilities_by_hand():
    """The score on numbers small enough to check by hand: N = (100, 400), lam 0.5 gives size
    scores 10 and 20; a difficulty log 2 (T = 1) doubles the first; the two floors differ as described."""
    from sampler import ggas_probabilities

    assert ggas_probabilities([100, 400], None, 0.5, 1.0, 0.0) == pytest.approx([1 / 3, 2 / 3])
    assert ggas_probabilities([100, 400], [math.log(2), 0.0], 0.5, 1.0, 0.0) == pytest.approx([0.5, 0.5])
    assert ggas_probabilities([100, 400], None, 0.5, 1.0, 0.4) == pytest.approx([0.4, 0.6])  # water-filling: exact
    # the authors' one-pass floor: (0.4, 2/3) / (0.4 + 2/3): the raised entry ends below 0.4
    assert ggas_probabilities([100, 400], None, 0.5, 1.0, 0.4, floor="renorm") == pytest.approx([0.375, 0.625])


# ------------------------------------------------------------------------------------------------
# issue 30, item 2: the probabilities at temperatures other than 1 (T = 1 hides a G_k / T applied twice)
# ------------------------------------------------------------------------------------------------

def _ggas_by_hand(sizes, g, lam, t, m, floor):
    """The module docstring's equations written out: p_k ∝ N_k^lam exp(G_k / T), then the floor
    (m <= 1/K here). renorm: max(m, p_k) / sum_j max(m, p_j). waterfill: the entries below m are
    pinned at m and the rest share 1 - m * (pinned) in proportion to p (one round suffices for
    the cases below: the test checks that none of the rest falls under m)."""
    w = [n ** lam * math.exp(gk / t) for n, gk in zip(sizes, g)]
    p = [v / sum(w) for v in w]
    if floor == "renorm":
        return [max(m, pk) / sum(max(m, pj) for pj in p) for pk in p]
    low = [pk < m for pk in p]
    rest = sum(pk for pk, lo in zip(p, low) if not lo)
    out = [m if lo else pk * (1 - m * sum(low)) / rest for pk, lo in zip(p, low)]
    assert all(o >= m for o in out)
    return out


@pytest.mark.parametrize("floor", ["renorm", "waterfill"])
@pytest.mark.parametrize("t,min_prob", [(0.5, 0.0), (2.0, 0.0), (0.5, 0.2), (2.0, 0.25)])
def test_ggas_probabilities_at_other_temperatures(t, min_prob, floor):
    """N = (100, 400, 900), lam 0.5 -> size scores (10, 20, 30); G = (1, 0, 0.5). At T = 0.5 the
    difficulty term is exp(2 G), at T = 2 exp(G / 2); a second division by T would give exp(4 G) and
    exp(G / 4), far from these. The floors 0.2 / 0.25 clip b (T = 0.5: p_b = 0.114) and a (T = 2:
    p_a = 0.220). Checked on the function and on what a TaskBatchSampler hands its draw after the
    reports (warm-up 0, ema_start "first": one report sets G_k)."""
    from sampler import ggas_probabilities

    sizes, g = {"a": 100, "b": 400, "c": 900}, {"a": 1.0, "b": 0.0, "c": 0.5}
    want = _ggas_by_hand(list(sizes.values()), list(g.values()), 0.5, t, min_prob, floor)
    assert ggas_probabilities(list(sizes.values()), list(g.values()), 0.5, t, min_prob, floor) == \
        pytest.approx(want, abs=1e-12)
    s = TaskBatchSampler(sizes, batch_size=4, warmup_steps=0, temperature=t, min_prob=min_prob, floor=floor)
    for name, gk in g.items():
        s.update(name, gk)
    assert list(s.probabilities().values()) == pytest.approx(want, abs=1e-12)
    seen = []  # the p the draw itself receives (next -> _choose)
    choose = s._choose
    s._choose = lambda probs: seen.append(list(probs)) or choose(probs)
    next(s)
    assert seen == [pytest.approx(want, abs=1e-12)]


# ---- issue 30: own mutants ------------------------------------------------------------------------


@pytest.mark.parametrize("world_size, want_batches, want_epoch", [
    (1, [5, 16], 5 // 5 + 40 // 16),   # "a" (5 < 16 examples) is one batch of all 5: 1 + 2 = 3 steps
    (2, [4, 16], 5 // 4 + 40 // 16),   # 5 rounded down to a multiple of 2 ranks: batches of 4, still 1 step
])
def test_a_sub_dataset_smaller_than_a_batch_counts_one_step_per_epoch(world_size, want_batches, want_epoch):
    """An epoch is sum_k N_k // b_k with b_k = min(b, N_k rounded down to the world size), not N_k // b:
    a sub-dataset smaller than the batch is one (smaller) batch, and it counts in the default GGAS
    warm-up (one epoch). Every other test's sub-datasets are larger than their batch."""
    s = TaskBatchSampler({"a": 5, "b": 40}, batch_size=16, world_size=world_size)
    assert s.batch_sizes == want_batches
    assert s.steps_per_epoch() == want_epoch == 3 and s.warmup_steps == 3
    # Without drop_last a tail is one more (smaller) batch, if it can be split over the ranks: "a"'s
    # tail of 1 cannot on 2 ranks (_take skips it), "b"'s tail of 8 can. Counted by drawing one pass.
    loose = TaskBatchSampler({"a": 5, "b": 40}, batch_size=16, world_size=world_size, drop_last=False)
    drawn = 0
    for k in range(2):
        while loose.stream_epoch[k] == 0:
            batch = loose._take(k)
            drawn += loose.stream_epoch[k] == 0  # a batch of the first pass (not of the next shuffle)
            assert batch
    assert loose.steps_per_epoch() == drawn == {1: 1 + 3, 2: 1 + 3}[world_size]
