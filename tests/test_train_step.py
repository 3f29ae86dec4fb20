"""One training step checked against a hand computation, and the flags that must reach the step.

Part 1 (no backbone): a stub embedder whose query/target vectors, calibration strengths and
regulariser are written out below. The test recomputes the loss of a batch by hand, query by query
in float64,

    L = (1/B) sum_i -log( sum_{j in P(i)} exp(q_i . t_j / tau) / sum_j exp(q_i . t_j / tau) ) + R,
    P(i) = {i} ("single") or {j: key_j == key_i} ("multi"),
    R = sum_c w_c mean_{i in c} r_i,  w_c = |c| / B (per batch) or 1 (per chunk),

and each parameter's gradient by autograd on that hand-written L, and holds train.full_batch_step
(one forward, or split into chunks), train.gradcache_step (several chunkings) and
fast_train.two_core_step to both. So the loss is checked against its equation, not only one code path
against another: dropping R, the temperature, the positive sets or the chunk weights of R from
every path would fail here.

Part 2 (tiny runs): four in-process runs of `train.py` on a synthetic U-FIRE at scale 0.03 (a few
seconds each), each with non-default flags, then checks that every flag changed what was computed:
the temperature the loss received (and the logged loss recomputed from the step's own vectors),
the calibrator that ran (slerp / normalised lerp / none), the sampler's probabilities against
their formulas, the learning rate of every step against warm-up + cosine written out here, and
the run length of `--epochs`. The fourth run takes the `paper` recipe's training values on the
tiny backbone (its input values overridden by flags, to stay fast): constant lr, one positive per
query, GGAS refreshed per epoch from a zero EMA with the renormalised floor, and `--chunk-size -1`
with a chunk table that gives each sub-dataset its own size.
"""
from __future__ import annotations

import contextlib
import io
import json
import math

import pytest

from support import plumbing  # noqa: I001  before torch: it sets OMP_WAIT_POLICY
import torch

from support import fast_train
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------------
# Part 1: the step on a stub embedder
# ------------------------------------------------------------------------------------------------

FEAT, DIM = 5, 4  # stub input features, embedding size D
REG_WEIGHT = 0.3  # weight of the stub's regulariser (large, so a dropped R shows at once)


class StubEmbedder(torch.nn.Module):
    """The output contract of model.FashionLensEmbedder.forward, from formulas a reader can check.

    A query is a feature vector x (FEAT,), a target image a feature vector y (FEAT,):
        lam_i = sigmoid(a . x_i + b)                       calibration strength      (B,)
        q_i   = normalize(W_q x_i + lam_i u)               calibrated unit query     (B, D)
        q_raw = normalize(W_q x_i)                         uncalibrated unit query   (B, D)
        t_j   = normalize(W_t y_j)                         unit target               (B, D)
        R     = REG_WEIGHT * mean_i (c . x_i)^2            batch-mean regulariser    ()
    R is a batch mean, as the calibrator's is, so GradCache's chunk weighting must rebuild it.
    """

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w_q = torch.nn.Parameter(torch.randn(DIM, FEAT, generator=g))  # (D, FEAT)
        self.w_t = torch.nn.Parameter(torch.randn(DIM, FEAT, generator=g))  # (D, FEAT)
        self.u = torch.nn.Parameter(torch.randn(DIM, generator=g))  # (D,)
        self.a = torch.nn.Parameter(0.5 * torch.randn(FEAT, generator=g))  # (FEAT,)
        self.b = torch.nn.Parameter(torch.tensor(-0.5))  # ()
        self.c = torch.nn.Parameter(torch.randn(FEAT, generator=g))  # (FEAT,)

    def forward(self, queries=None, images=None) -> dict:
        out = {}
        reg = torch.zeros(())  # () no queries -> no regulariser
        if queries is not None and len(queries):
            x = torch.stack(list(queries))  # (B, FEAT)
            lam = torch.sigmoid(x @ self.a + self.b)  # (B,)
            out["q"] = F.normalize(x @ self.w_q.T + lam[:, None] * self.u, dim=-1)  # (B, D)
            out["q_raw"] = F.normalize(x @ self.w_q.T, dim=-1)  # (B, D)
            out["lam"] = lam  # (B,)
            out["angle"] = (0.5 * lam).detach()  # (B,) lambda * omega with a pretend omega of 0.5 rad
            reg = REG_WEIGHT * ((x @ self.c) ** 2).mean()  # ()
        if images is not None and len(images):
            out["t"] = F.normalize(torch.stack(list(images)) @ self.w_t.T, dim=-1)  # (B, D)
        out["reg"] = reg
        return out


# Eight pairs; targets 0/2/6 are one image and 1/5 another: multi-positive rows.
KEYS = ["img/a.png", "img/b.png", "img/a.png", "img/c.png", "img/d.png", "img/b.png", "img/a.png", "img/e.png"]


def _batch():
    import train

    g = torch.Generator().manual_seed(1)
    xs = list(torch.randn(len(KEYS), FEAT, generator=g))  # B queries (FEAT,)
    ys = list(torch.randn(len(KEYS), FEAT, generator=g))  # B targets (FEAT,)
    return train.Batch(subset="stub/Set", queries=xs, images=ys, keys=list(KEYS))


def hand_loss(stub: StubEmbedder, batch, tau: float, positives: str = "multi", chunks=None, per_chunk=False):
    """(L_nce, R, mean lambda) of the batch, one query at a time, in float64, from the formulas above.

    chunks: the (start, end) row ranges R is split by (None: one chunk); per_chunk: w_c = 1, else |c| / B.
    """
    p = {n: v.double() for n, v in stub.named_parameters()}  # float64 views; autograd reaches the originals
    qs, ts, lams, regs = [], [], [], []
    for x in batch.queries:
        x = x.double()
        lam = 1.0 / (1.0 + torch.exp(-(p["a"] @ x + p["b"])))  # () sigmoid
        h = p["w_q"] @ x + lam * p["u"]  # (D,)
        qs.append(h / torch.sqrt((h * h).sum()))  # (D,) unit
        lams.append(lam)
        regs.append(REG_WEIGHT * (p["c"] @ x) ** 2)
    for y in batch.images:
        z = p["w_t"] @ y.double()  # (D,)
        ts.append(z / torch.sqrt((z * z).sum()))  # (D,) unit
    n = len(qs)
    nce = 0.0
    for i in range(n):
        e = [torch.exp((qs[i] * ts[j]).sum() / tau) for j in range(n)]  # exp(s_ij)
        if positives == "single":
            positive = e[i]  # P(i) = {i}
        else:
            positive = sum(e[j] for j in range(n) if batch.keys[j] == batch.keys[i])  # j in P(i)
        nce = nce - torch.log(positive / sum(e))
    reg = 0.0
    for s, end in chunks or [(0, n)]:
        weight = 1.0 if per_chunk else (end - s) / n  # w_c
        reg = reg + weight * sum(regs[s:end]) / (end - s)  # w_c * mean_{i in c} r_i
    return nce / n, reg, float(sum(lams).detach()) / n


def _grads(stub) -> dict:
    """Each parameter's gradient after a step; zeros where the step left none (e.g. R dropped)."""
    return {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            for n, p in stub.named_parameters()}


def _step_runner(kind: str, positives: str = "multi", per_chunk: bool = False):
    """kind -> step(model, batch, tau): "full" (one forward), "full=c" (the forward in chunks of c),
    "gradcache=c", or "two_core" (the two towers on two threads)."""
    import concurrent.futures as cf

    import train

    if kind == "two_core":
        def two_core(m, b, tau):
            with cf.ThreadPoolExecutor(max_workers=1) as spare:
                return train.StepOut(**fast_train.two_core_step(  # train_step's dispatch line
                    m, *train._rows(b, 0, len(b.keys)),
                    lambda q, t: train.info_nce(q, t, train.target_ids(b.keys, positives, q.device), tau), spare))
        return two_core
    name, _, chunk = kind.partition("=")
    step = train.full_batch_step if name == "full" else train.gradcache_step
    return lambda m, b, tau: step(m, b, tau, chunk_size=int(chunk or 0), positives=positives,
                                  reg_per_chunk=per_chunk)


def _chunks_of(kind: str, n: int) -> list:
    """The row ranges a kind's step splits the batch into (what R is split by)."""
    size = int(kind.partition("=")[2] or 0) or n
    return [(s, min(s + size, n)) for s in range(0, n, size)]


@pytest.mark.parametrize("per_chunk", [False, True])
@pytest.mark.parametrize("positives", ["multi", "single"])
@pytest.mark.parametrize("tau", [0.05, 0.5])
@pytest.mark.parametrize("kind", ["full", "full=3", "gradcache=3", "gradcache=5", "gradcache=8", "two_core"])
def test_step_loss_and_gradients_equal_the_hand_computation(kind, tau, positives, per_chunk):
    """Every step (chunks 3+3+2, 5+3, and one chunk) against the equation, under both positive sets
    and both weightings of R."""
    batch = _batch()
    stub = StubEmbedder()
    nce, reg, lam_mean = hand_loss(stub, batch, tau, positives, _chunks_of(kind, len(KEYS)), per_chunk)
    want = {n: g for n, g in zip(dict(stub.named_parameters()),
                                  torch.autograd.grad(nce + reg, list(stub.parameters())))}
    nce, reg = float(nce.detach()), float(reg.detach())
    stub.zero_grad(set_to_none=True)
    out = _step_runner(kind, positives, per_chunk)(stub, batch, tau)
    assert out.nce == pytest.approx(nce, rel=1e-5)
    assert out.reg == pytest.approx(reg, rel=1e-5) and reg > 0.05  # R really is in the loss
    assert out.loss == pytest.approx(nce + reg, rel=1e-5)
    assert out.lam == pytest.approx(lam_mean, rel=1e-5)
    assert out.angle == pytest.approx(0.5 * lam_mean, rel=1e-5)  # the stub's omega is 0.5 rad
    got = _grads(stub)
    assert set(got) == set(want)
    for name, g in want.items():
        g = g.float()
        err = float((got[name] - g).norm())
        assert err <= 1e-4 * float(g.norm()) + 1e-6, f"{kind} tau={tau} {positives}: d L / d {name} off by {err:.2e}"
    # Every parameter gets a gradient, the regulariser's c only through R: a step without R leaves it 0.
    assert all(float(g.norm()) > 0 for g in want.values())


def test_single_and_multi_positives_on_a_hand_example():
    """Three queries, tau = 1; targets 0 and 2 are the same image "a" (the same vector), target 1 is "b".
        q = (1, 0), (0, 1), (0.6, 0.8);   t = (1, 0), (0, 1), (1, 0)
        s = q t^T = [[1, 0, 1], [0, 1, 0], [0.6, 0.8, 0.6]]
    single (P(i) = {i}):  L = [log(2e + 1) - 1  +  log(e + 2) - 1  +  log(2e^0.6 + e^0.8) - 0.6] / 3
    multi (P(0) = P(2) = {0, 2}):
                          L = [log(2e + 1) - log(2e)  +  log(e + 2) - 1  +  log(2e^0.6 + e^0.8) - log(2e^0.6)] / 3
    Under "single" the duplicate is a negative: query 0 cannot reach p > 1/2 however close it gets."""
    import train

    e = math.e
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])  # (3, 2)
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # (3, 2)
    keys = ["img/a.png", "img/b.png", "img/a.png"]
    single = (math.log(2 * e + 1) - 1 + math.log(e + 2) - 1 + math.log(2 * e ** 0.6 + e ** 0.8) - 0.6) / 3
    multi = (math.log(2 * e + 1) - math.log(2 * e) + math.log(e + 2) - 1
             + math.log(2 * e ** 0.6 + e ** 0.8) - math.log(2 * e ** 0.6)) / 3
    ids = {p: train.target_ids(keys, p, "cpu") for p in train.POSITIVES}
    assert ids["single"].tolist() == [0, 1, 2]  # every target its own id: labels = arange
    assert ids["multi"][0] == ids["multi"][2] != ids["multi"][1]
    assert float(train.info_nce(q, t, ids["single"], 1.0)) == pytest.approx(single, rel=1e-6)
    assert float(train.info_nce(q, t, ids["multi"], 1.0)) == pytest.approx(multi, rel=1e-6)
    assert single - multi == pytest.approx((math.log(2) + math.log(2)) / 3, rel=1e-6)  # rows 0 and 2: log 2 each
    # "single" is exactly the authors' cross-entropy with labels = arange (my_grad_cache.py 48).
    ce = torch.nn.functional.cross_entropy(q @ t.T, torch.arange(3))
    assert float(train.info_nce(q, t, ids["single"], 1.0)) == pytest.approx(float(ce), rel=1e-6)


def test_reg_per_chunk_gradcache_equals_the_chunked_reference():
    """Chunks 3+3+2: per chunk (the authors) R = sum of the three chunk means; per batch R = the batch
    mean. GradCache and the reference full_batch_step split R by the same chunks and give the same
    loss and gradients under each; the per-chunk R is close to 3x the per-batch one here."""
    batch = _batch()
    results = {}
    for per_chunk in (False, True):
        for kind in ("full=3", "gradcache=3"):
            stub = StubEmbedder()
            out = _step_runner(kind, "single", per_chunk)(stub, batch, 0.1)
            results[per_chunk, kind] = (out, _grads(stub))
    for per_chunk in (False, True):
        (ref, g_ref), (gc, g_gc) = results[per_chunk, "full=3"], results[per_chunk, "gradcache=3"]
        assert gc.loss == pytest.approx(ref.loss, rel=1e-6) and gc.reg == pytest.approx(ref.reg, rel=1e-6)
        for name in g_ref:
            assert float((g_gc[name] - g_ref[name]).norm()) <= 1e-5 * float(g_ref[name].norm()) + 1e-7, name
    stub = StubEmbedder()
    with torch.no_grad():
        _, reg_batch, _ = hand_loss(stub, batch, 0.1, "single", [(0, 3), (3, 6), (6, 8)], False)
        _, reg_chunks, _ = hand_loss(stub, batch, 0.1, "single", [(0, 3), (3, 6), (6, 8)], True)
    assert results[False, "gradcache=3"][0].reg == pytest.approx(float(reg_batch), rel=1e-5)
    assert results[True, "gradcache=3"][0].reg == pytest.approx(float(reg_chunks), rel=1e-5)
    assert 2.0 < float(reg_chunks) / float(reg_batch) < 4.0  # the weight grows with the chunk count
    g_batch, g_chunks = results[False, "gradcache=3"][1]["c"], results[True, "gradcache=3"][1]["c"]
    assert float((g_chunks - g_batch).norm()) > 0.5 * float(g_batch.norm())  # c is reached only through R


def test_full_batch_step_refuses_several_forwards_under_ddp():
    import train

    with pytest.raises(ValueError, match="under DDP use gradcache_step"):
        train.full_batch_step(StubEmbedder(), _batch(), 0.1, plumbing.DistInfo(rank=0, world=2), chunk_size=3)


def test_clip_zero_leaves_gradients_unclipped():
    """||g|| = sqrt(3^2 + 4^2 + 12^2) = 13: max_norm 0 reports 13 and leaves g alone; max_norm 1 reports
    13 and scales g by 1/13 (to norm 1, up to torch's 1e-6 in the denominator)."""
    import train

    def params():
        a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
        a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([12.0])
        return [a, b]

    free = params()
    assert train.clip_gradients(free, 0.0) == pytest.approx(13.0)
    assert free[0].grad.tolist() == [3.0, 4.0] and free[1].grad.tolist() == [12.0]  # untouched
    clipped = params()
    assert train.clip_gradients(clipped, 1.0) == pytest.approx(13.0)
    assert clipped[0].grad.tolist() == pytest.approx([3 / 13, 4 / 13], rel=1e-5)
    assert clipped[1].grad.tolist() == pytest.approx([12 / 13], rel=1e-5)


def test_hand_loss_sees_the_positives_and_the_temperature():
    """The hand computation itself is sensitive to what it must check (else the test above proves little)."""
    batch = _batch()
    stub = StubEmbedder()
    with torch.no_grad():
        base = float(hand_loss(stub, batch, 0.05)[0])
        assert abs(float(hand_loss(stub, batch, 0.5)[0]) - base) > 0.1  # temperature matters
        distinct = type(batch)(subset=batch.subset, queries=batch.queries, images=batch.images,
                               keys=[f"{k}#{i}" for i, k in enumerate(batch.keys)])
        assert abs(float(hand_loss(stub, distinct, 0.05)[0]) - base) > 0.1  # shared targets are positives


# ------------------------------------------------------------------------------------------------
# Part 2: the flags reach what a run computes
# ------------------------------------------------------------------------------------------------

TASKS = "t2i,cir"  # 5 small sub-datasets at scale 0.03
COMMON = ["--tasks", TASKS, "--batch-size", "8", "--chunk-size", "0", "--max-eval-queries", "2",
          "--eval-every", "100", "--no-final-test", "--device", "cpu"]
RUNS = {  # name -> the flags that differ from the defaults
    "hot_off_uniform": ["--steps", "3", "--temperature", "0.5", "--calibrator", "off", "--sampler", "uniform"],
    "linear_size_lr": ["--steps", "4", "--calibrator", "linear", "--sampler", "size", "--lr", "2e-3",
                       "--warmup-ratio", "0.5", "--min-lr-ratio", "0.1"],
    "defaults_epochs": ["--epochs", "0.12"],  # 0.12 x 17 batches per epoch = 2.04 -> ceil: 3 steps
    # The paper recipe's training values; its input values (224^2 images, 8 frames, dropout) are
    # overridden by flags so the tiny run stays fast (flags override a recipe). --steps alone: epochs 0.
    "paper": ["--recipe", "paper", "--steps", "4", "--chunk-size", "-1", "--min-pixels", "4096",
              "--max-pixels", "4096", "--max-query-images", "4", "--query-sketches", "one", "--num-frames", "4",
              "--video-size", "64", "--lora-dropout", "0"],
}
# The paper run's chunk table: the t2i sub-datasets get chunks of 3 (3 chunks of the batch of 8), the
# cir ones 5, except SynCIR-Top, left out of the table: the default 8 (one chunk, no GradCache).
PAPER_CHUNKS = {"t2i": 3, "cir": 5}


class Spy:
    """Records every call of info_nce (its vectors, ids, temperature, value) and of the two
    interpolations of the calibrator, while passing each call through unchanged."""

    def __init__(self, train_mod, cal_mod, mp: pytest.MonkeyPatch):
        self.nce_calls, self.counts, self.chunk_sizes = [], {"slerp": 0, "lerp_normalized": 0}, []
        real_nce, real_gradcache = train_mod.info_nce, train_mod.gradcache_step

        def info_nce(q, t, ids, temperature):
            value = real_nce(q, t, ids, temperature)
            self.nce_calls.append({"q": q.detach().clone(), "t": t.detach().clone(), "ids": ids.clone(),
                                   "temperature": temperature, "value": float(value.detach())})
            return value

        def gradcache_step(*args, **kwargs):  # records the chunk size each GradCache step received
            self.chunk_sizes.append((args[1].subset, kwargs["chunk_size"]))
            return real_gradcache(*args, **kwargs)

        mp.setattr(train_mod, "info_nce", info_nce)
        mp.setattr(train_mod, "gradcache_step", gradcache_step)
        for name in self.counts:
            real = getattr(cal_mod, name)

            def counted(*a, _real=real, _name=name, **k):
                self.counts[_name] += 1
                return _real(*a, **k)

            mp.setattr(cal_mod, name, counted)


@pytest.fixture(scope="module")
def flag_runs(tmp_path_factory) -> dict:
    import calibrator
    from support import recipes
    from support import synthetic
    import train

    tmp = tmp_path_factory.mktemp("flag_runs")
    root = synthetic.ensure_synthetic(str(tmp / "synthetic"), seed=0, scale=0.03)
    runs = {"root": root}
    table = {k: PAPER_CHUNKS[k.split("/")[0]] for k in _train_sizes(root) if k != "cir/SynCIR-Top"}
    for name, flags in RUNS.items():
        out = tmp / name
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(recipes, "CHUNK_SIZES", table)
            spy = Spy(train, calibrator, mp)
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                rc = train.main(["--data", root, *COMMON, *flags, "--out", str(out)])
        assert rc == 0, buf.getvalue()[-3000:]
        lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if x.strip()]
        runs[name] = {"out": out, "spy": spy, "steps": [r for r in lines if r.get("event") is None],
                      "config": json.loads((out / "config.json").read_text())}
    return runs


def _train_sizes(root: str) -> dict:
    """N_k of every training sub-dataset of TASKS, counted from the records (not from the run's log)."""
    import data

    uf = data.UFire(root)
    return {s: len(uf.records(s, "train")) for s in uf.subsets("train") if s.split("/")[0] in TASKS.split(",")}


def _nce_by_hand(call: dict, tau: float) -> float:
    """Multi-positive InfoNCE of the vectors a step passed to info_nce, row by row in float64."""
    q, t, ids = call["q"].double(), call["t"].double(), call["ids"].tolist()
    s = (q @ t.T / tau).tolist()
    total = 0.0
    for i, row in enumerate(s):
        top = max(row)  # shift for exp's range; cancels in the ratio
        pos = sum(math.exp(v - top) for j, v in enumerate(row) if ids[j] == ids[i])
        total -= math.log(pos / sum(math.exp(v - top) for v in row))
    return total / len(s)


@pytest.mark.parametrize("name,tau", [("hot_off_uniform", 0.5), ("linear_size_lr", 0.07),
                                      ("defaults_epochs", 0.07), ("paper", 0.07)])
def test_temperature_reaches_the_loss(flag_runs, name, tau):
    run = flag_runs[name]
    calls = run["spy"].nce_calls
    assert len(calls) == len(run["steps"])  # one loss per step (GradCache too computes L once)
    for call, step in zip(calls, run["steps"]):
        assert call["temperature"] == tau
        by_hand = _nce_by_hand(call, tau)
        assert call["value"] == pytest.approx(by_hand, rel=1e-5)
        assert step["nce"] == pytest.approx(by_hand, rel=1e-5)  # the logged L_nce is that loss
        assert step["loss"] == pytest.approx(step["nce"] + step["reg"], rel=1e-6)


def test_calibrator_flag_picks_what_runs(flag_runs):
    from safetensors.torch import load_file

    off, linear, slerp = flag_runs["hot_off_uniform"], flag_runs["linear_size_lr"], flag_runs["defaults_epochs"]
    # off: no calibrator at all: lambda 0, no regulariser, no interpolation, no weights saved.
    assert off["spy"].counts == {"slerp": 0, "lerp_normalized": 0}
    assert all(s["reg"] == 0.0 and s["lam_mean"] == 0.0 for s in off["steps"])
    assert not [k for k in load_file(str(off["out"] / "last" / "embedder.safetensors")) if k.startswith("calibrator.")]
    # linear: the normalised lerp in every step (and in validation), never slerp; slerp (the
    # default): the other way round.
    assert linear["spy"].counts["lerp_normalized"] >= len(linear["steps"]) and linear["spy"].counts["slerp"] == 0
    assert slerp["spy"].counts["slerp"] >= len(slerp["steps"]) and slerp["spy"].counts["lerp_normalized"] == 0
    for run, mode in ((off, "off"), (linear, "linear"), (slerp, "slerp")):
        assert json.loads((run["out"] / "last" / "embedder_config.json").read_text())["config"]["calibrator"] == mode
        if mode != "off":  # near-identity start: lambda = sigmoid(-3), R = 1e-2 * ||A^T A - I||_F ~ 1e-2 sqrt(32)
            assert all(0.02 < s["lam_mean"] < 0.1 and s["reg"] > 0.01 for s in run["steps"])


def test_sampler_flag_sets_the_probabilities(flag_runs):
    sizes = _train_sizes(flag_runs["root"])
    k = len(sizes)
    # uniform: 1/K after every step, whatever the difficulties.
    for s in flag_runs["hot_off_uniform"]["steps"]:
        assert s["probabilities"] == pytest.approx({n: 1 / k for n in sizes}, abs=1e-12)
    # size: p_k = N_k^0.5 / sum_j N_j^0.5 (the floor of 0.02 does not bind for these sizes).
    z = sum(n ** 0.5 for n in sizes.values())
    size_p = {n: v ** 0.5 / z for n, v in sizes.items()}
    assert min(size_p.values()) > 0.02
    for s in flag_runs["linear_size_lr"]["steps"]:
        assert s["probabilities"] == pytest.approx(size_p, abs=1e-12)
    # ggas (default): p = softmax(0.5 log N_k + G_k), G_k the EMA (0.9) of k's token gradient norms.
    run = flag_runs["defaults_epochs"]
    assert run["config"]["resolved"]["ggas_warmup_steps"] == 0  # min(one epoch, 3 // 4): adaptive at once
    ema: dict = {}
    for s in run["steps"]:
        g = s["token_grad_norm"]
        ema[s["subset"]] = g if s["subset"] not in ema else 0.9 * ema[s["subset"]] + 0.1 * g
        fill = sum(ema.values()) / len(ema)  # an unreported sub-dataset gets the mean of the others
        diff = {n: ema.get(n, fill) for n in sizes}
        assert s["difficulties"] == pytest.approx(diff, rel=1e-12)
        logits = {n: 0.5 * math.log(sizes[n]) + diff[n] for n in sizes}
        zz = sum(math.exp(v) for v in logits.values())
        want = {n: math.exp(v) / zz for n, v in logits.items()}
        assert min(want.values()) > 0.02
        assert s["probabilities"] == pytest.approx(want, rel=1e-9)
    assert run["steps"][-1]["probabilities"] != pytest.approx(size_p, abs=1e-6)  # the difficulty term acts


def _lr_factor_by_hand(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up (step + 1) / warmup, then min_ratio + (1 - min_ratio) (1 + cos(pi progress)) / 2."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * progress)) / 2


def test_lr_factor_is_warmup_then_cosine():
    import train

    # Hand values: 4 warm-up steps of 10, cosine down to 0.1.
    assert [train.lr_factor(s, 10, 4, 0.1) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert train.lr_factor(4, 10, 4, 0.1) == pytest.approx(1.0)  # the cosine starts at the peak
    assert train.lr_factor(7, 10, 4, 0.1) == pytest.approx(0.55)  # half-way: (1 + 0.1) / 2
    assert train.lr_factor(10, 10, 4, 0.1) == pytest.approx(0.1)  # the end: min ratio
    assert train.lr_factor(25, 10, 4, 0.1) == pytest.approx(0.1)  # and it stays there
    for total, warmup, min_ratio in ((100, 5, 0.05), (7, 1, 0.0), (40, 40, 0.2), (3, 2, 0.5)):
        for s in range(total + 2):
            assert train.lr_factor(s, total, warmup, min_ratio) == pytest.approx(
                _lr_factor_by_hand(s, total, warmup, min_ratio), abs=1e-12), (s, total, warmup, min_ratio)


def test_every_step_uses_the_scheduled_learning_rate(flag_runs):
    run = flag_runs["linear_size_lr"]  # --lr 2e-3, 4 steps, --warmup-ratio 0.5 -> 2 warm-up steps, min 0.1
    res = run["config"]["resolved"]
    assert res["total_steps"] == 4 and res["lr_warmup_steps"] == 2
    lrs = [s["lr"] for s in run["steps"]]  # the lr each update used (the adapters' group)
    assert lrs == pytest.approx([2e-3 * _lr_factor_by_hand(s, 4, 2, 0.1) for s in range(4)], rel=1e-12)
    assert lrs == pytest.approx([1e-3, 2e-3, 2e-3, 1.1e-3], rel=1e-12)
    # After the last update both groups sit at the end of the schedule: lr x 0.1, the vision tower x 0.1 more.
    groups = {g["name"]: g["lr"] for g in plumbing.read_state(run["out"] / "last")["optimizer"]["param_groups"]}
    assert groups == pytest.approx({"adapters": 2e-4, "vision": 2e-5}, rel=1e-9)


def test_epochs_sets_the_run_length(flag_runs):
    import train

    sizes = _train_sizes(flag_runs["root"])
    per_epoch = sum(n // min(8, n) for n in sizes.values())  # full batches of 8 (or of N_k when smaller)
    run = flag_runs["defaults_epochs"]
    res = run["config"]["resolved"]
    assert res["steps_per_epoch"] == per_epoch
    assert res["total_steps"] == math.ceil(0.12 * per_epoch) == len(run["steps"])
    # plan_steps alone, where rounding would differ from ceil: 1.5 and 0.31 epochs, and --steps when 0.
    assert (run["config"]["steps"], run["config"]["epochs"]) == (0, 0.12)  # --epochs alone: steps 0
    for epochs in (1.5, 0.31, 1.0):
        cfg = train.TrainConfig(batch_size=8, epochs=epochs, steps=5).resolved()
        assert train.plan_steps(sizes, cfg, plumbing.DistInfo()).total == math.ceil(epochs * per_epoch), epochs
    cfg = train.TrainConfig(batch_size=8, steps=5).resolved()
    assert train.plan_steps(sizes, cfg, plumbing.DistInfo()).total == 5


def test_constant_schedule_keeps_the_lr_fixed():
    """constant: the warm-up ramp (if any), then the peak lr to the end, whatever min_ratio says."""
    import train

    assert [train.lr_factor(s, 10, 1, 0.1, "constant") for s in range(12)] == [1.0] * 12
    assert [train.lr_factor(s, 10, 4, 0.1, "constant") for s in range(6)] == pytest.approx(
        [0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    assert train.lr_factor(7, 10, 4, 0.1, "cosine") == pytest.approx(0.55)  # the cosine still decays


def test_paper_recipe_run_uses_the_authors_training_values(flag_runs):
    """The paper run: what config.json records, and that each value reached what was computed."""
    import sampler

    run = flag_runs["paper"]
    cfg, res = run["config"], run["config"]["resolved"]
    assert cfg["recipe"] == "paper" and (cfg["steps"], cfg["epochs"]) == (4, 0.0) and res["total_steps"] == 4
    assert {k: cfg[k] for k in ("lr", "weight_decay", "lr_schedule", "warmup_ratio", "grad_clip", "positives",
                                "reg_per_chunk", "ggas_refresh", "ggas_ema_start", "ggas_floor", "chunk_size")} == {
        "lr": 1e-4, "weight_decay": 1e-3, "lr_schedule": "constant", "warmup_ratio": 0.0, "grad_clip": 0.0,
        "positives": "single", "reg_per_chunk": True, "ggas_refresh": "epoch", "ggas_ema_start": "zero",
        "ggas_floor": "renorm", "chunk_size": -1}
    # Flags override the recipe: the input values given on the command line, not the paper's.
    assert (cfg["min_pixels"], cfg["max_pixels"], cfg["num_frames"], cfg["lora_dropout"]) == (4096, 4096, 4, 0.0)
    # The batch (8, COMMON) beats the recipe's 64; --eval-every 100 beats its 500.
    assert (cfg["batch_size"], cfg["eval_every"]) == (8, 100)
    steps = run["steps"]
    # Constant lr: 1e-4 for every update (no warm-up, no decay).
    assert [s["lr"] for s in steps] == [1e-4] * 4
    # One positive per query: every loss got ids 0..7 (labels = arange), duplicates or not.
    assert all(c["ids"].tolist() == list(range(8)) for c in run["spy"].nce_calls)
    # --chunk-size -1: each batch's chunk from the (patched) table, 8 for a sub-dataset it lacks.
    sizes = _train_sizes(flag_runs["root"])
    want_chunk = {k: 8 if k == "cir/SynCIR-Top" else PAPER_CHUNKS[k.split("/")[0]] for k in sizes}
    assert res["chunk_sizes"] == want_chunk
    assert [s["chunk_size"] for s in steps] == [want_chunk[s["subset"]] for s in steps]
    assert all(chunk == want_chunk[subset] for subset, chunk in run["spy"].chunk_sizes)
    assert {s["subset"] for s in steps if s["chunk_size"] < 8} <= {subset for subset, _ in run["spy"].chunk_sizes}
    # GGAS, the authors' way. Warm-up: min(17 steps per epoch, 4 // 4) = 1 uniform step. G_k starts
    # at 0 and moves by 0.1 g per report; an unreported sub-dataset stays at 0.
    assert res["ggas_warmup_steps"] == 1
    g = {k: 0.0 for k in sizes}
    for s in steps:
        g[s["subset"]] = 0.9 * g[s["subset"]] + 0.1 * s["token_grad_norm"]
        assert s["difficulties"] == pytest.approx(g, rel=1e-12, abs=1e-15)
    # p is computed once, at the end of the warm-up (from step 1's report), then held: the next
    # refresh is at the start of epoch 2 (step 17). softmax(0.5 log N + G), then the renormalised floor.
    g1 = {k: 0.0 for k in sizes}
    g1[steps[0]["subset"]] = 0.1 * steps[0]["token_grad_norm"]
    logits = [0.5 * math.log(sizes[k]) + g1[k] for k in sizes]
    z = sum(math.exp(v) for v in logits)
    want_p = dict(zip(sizes, sampler.renorm_floor([math.exp(v) / z for v in logits], 0.02)))
    assert all(s["probabilities"] == pytest.approx(want_p, rel=1e-12) for s in steps)
    assert steps[-1]["difficulties"] != steps[0]["difficulties"]  # the reports went on; p did not follow


# ------------------------------------------------------------------------------------------------
# Issue 30, row 6: GGAS reads the gradient BEFORE clipping
# ------------------------------------------------------------------------------------------------

def test_ggas_difficulty_is_the_token_gradient_before_clipping(tiny_root, tmp_path, monkeypatch):
    """GGAS' difficulty of a sub-dataset is ||dL/d(summary tokens)|| of the step (sampler.py). Read
    after clip_gradients it would be the clipped norm, <= grad_clip: with clipping on (the tiny-cpu
    recipe clips at 1.0) every sub-dataset would then report about the same small number and GGAS
    would sample by size alone. One real step of the tiny model, with a clip (1e-3) far below the
    gradient's norm, so that clipping certainly shrinks the token gradient."""
    import train
    from support import run_dir

    cfg = train.TrainConfig(data=str(tiny_root), out=str(tmp_path / "run"), tasks="t2i", steps=2, batch_size=8,
                            chunk_size=0, grad_clip=1e-3, max_eval_queries=2, final_test=False, device="cpu",
                            loader="off", two_cores="off")
    seen = {}
    real_clip = train.clip_gradients

    def clip_gradients(params, max_norm):
        # ||dL/d(tokens)|| = sqrt(sum_p ||grad_p||^2) over the two summary tokens, written out here
        norm = lambda: math.sqrt(sum(float(p.grad.double().norm()) ** 2  # noqa: E731
                                     for p in run.embedder.token_parameters() if p.grad is not None))
        seen["before"] = norm()
        out = real_clip(params, max_norm)
        seen["after"] = norm()
        return out

    with run_dir.one_writer():  # setup locks the run folder; let it go at the end (as train.train does)
        run = train.setup(cfg, None)
        try:
            monkeypatch.setattr(train, "clip_gradients", clip_gradients)
            monkeypatch.setattr(run.task_sampler, "update", lambda subset, g: seen.update(reported=(subset, g)))
            _, subset = train.train_step(run)
        finally:
            run.loader.close()
    assert seen["after"] <= 1e-3 * (1 + 1e-6) < seen["before"] / 10  # clipping did shrink the token gradient
    assert seen["reported"][0] == subset
    assert seen["reported"][1] == pytest.approx(seen["before"], rel=1e-6)  # GGAS got the unclipped norm
