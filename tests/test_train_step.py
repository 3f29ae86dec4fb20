"""One training step checked against a hand computation, and the flags that must reach the step.

Part 1 (no backbone): a stub embedder whose query/target vectors, calibration strengths and
regulariser are written out below. The test recomputes the loss of a batch by hand, query by query
in float64,

    L = (1/B) sum_i -log( sum_{j: key_j == key_i} exp(q_i . t_j / tau) / sum_j exp(q_i . t_j / tau) ) + R,

and each parameter's gradient by autograd on that hand-written L, and holds train.full_batch_step
and train.gradcache_step (several chunkings) to both. So the loss is checked against its equation,
not only one code path against another: dropping R, the temperature or the multi-positive set from
both paths would fail here.

Part 2 (tiny runs): three in-process runs of `train.py` on a synthetic U-FIRE at scale 0.03 (a few
seconds each), each with non-default flags, then checks that every flag changed what was computed:
the temperature the loss received (and the logged loss recomputed from the step's own vectors),
the calibrator that ran (slerp / normalised lerp / none), the sampler's probabilities against
their formulas, the learning rate of every step against warm-up + cosine written out here, and
the run length of `--epochs`.
"""
from __future__ import annotations

import contextlib
import io
import json
import math

import pytest

import plumbing  # noqa: I001  before torch: it sets OMP_WAIT_POLICY
import torch
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


def hand_loss(stub: StubEmbedder, batch, tau: float):
    """(L_nce, R, mean lambda) of the batch, one query at a time, in float64, from the formulas above."""
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
        positive = sum(e[j] for j in range(n) if batch.keys[j] == batch.keys[i])  # j in P(i)
        nce = nce - torch.log(positive / sum(e))
    return nce / n, sum(regs) / n, float(sum(lams).detach()) / n


def _grads(stub) -> dict:
    """Each parameter's gradient after a step; zeros where the step left none (e.g. R dropped)."""
    return {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            for n, p in stub.named_parameters()}


def _step_runner(kind: str):
    import train

    if kind == "full":
        return lambda m, b, tau: train.full_batch_step(m, b, tau)
    chunk = int(kind.split("=")[1])
    return lambda m, b, tau: train.gradcache_step(m, b, tau, chunk_size=chunk)


@pytest.mark.parametrize("tau", [0.05, 0.5])
@pytest.mark.parametrize("kind", ["full", "gradcache=3", "gradcache=5", "gradcache=8"])
def test_step_loss_and_gradients_equal_the_hand_computation(kind, tau):
    """full_batch_step and gradcache_step (chunks 3+3+2, 5+3, and one chunk) against the equation."""
    batch = _batch()
    stub = StubEmbedder()
    nce, reg, lam_mean = hand_loss(stub, batch, tau)
    want = {n: g for n, g in zip(dict(stub.named_parameters()),
                                  torch.autograd.grad(nce + reg, list(stub.parameters())))}
    nce, reg = float(nce.detach()), float(reg.detach())
    stub.zero_grad(set_to_none=True)
    out = _step_runner(kind)(stub, batch, tau)
    assert out.nce == pytest.approx(nce, rel=1e-5)
    assert out.reg == pytest.approx(reg, rel=1e-5) and reg > 0.05  # R really is in the loss
    assert out.loss == pytest.approx(nce + reg, rel=1e-5)
    assert out.lam == pytest.approx(lam_mean, rel=1e-5)
    got = _grads(stub)
    assert set(got) == set(want)
    for name, g in want.items():
        g = g.float()
        err = float((got[name] - g).norm())
        assert err <= 1e-4 * float(g.norm()) + 1e-6, f"{kind} tau={tau}: d L / d {name} off by {err:.2e}"
    # Every parameter gets a gradient, the regulariser's c only through R: a step without R leaves it 0.
    assert all(float(g.norm()) > 0 for g in want.values())


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
}


class Spy:
    """Records every call of info_nce (its vectors, ids, temperature, value) and of the two
    interpolations of the calibrator, while passing each call through unchanged."""

    def __init__(self, train_mod, cal_mod, mp: pytest.MonkeyPatch):
        self.nce_calls, self.counts = [], {"slerp": 0, "lerp_normalized": 0}
        real_nce = train_mod.info_nce

        def info_nce(q, t, ids, temperature):
            value = real_nce(q, t, ids, temperature)
            self.nce_calls.append({"q": q.detach().clone(), "t": t.detach().clone(), "ids": ids.clone(),
                                   "temperature": temperature, "value": float(value.detach())})
            return value

        mp.setattr(train_mod, "info_nce", info_nce)
        for name in self.counts:
            real = getattr(cal_mod, name)

            def counted(*a, _real=real, _name=name, **k):
                self.counts[_name] += 1
                return _real(*a, **k)

            mp.setattr(cal_mod, name, counted)


@pytest.fixture(scope="module")
def flag_runs(tmp_path_factory) -> dict:
    import calibrator
    import synthetic
    import train

    tmp = tmp_path_factory.mktemp("flag_runs")
    root = synthetic.ensure_synthetic(str(tmp / "synthetic"), seed=0, scale=0.03)
    runs = {"root": root}
    for name, flags in RUNS.items():
        out = tmp / name
        with pytest.MonkeyPatch.context() as mp:
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
                                      ("defaults_epochs", 0.07)])
def test_temperature_reaches_the_loss(flag_runs, name, tau):
    run = flag_runs[name]
    calls = run["spy"].nce_calls
    assert len(calls) == len(run["steps"])  # one loss per step (no GradCache at --chunk-size 0)
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
    for epochs in (1.5, 0.31, 1.0):
        plan = train.plan_steps(sizes, train.TrainConfig(batch_size=8, epochs=epochs, steps=5), plumbing.DistInfo())
        assert plan.total == math.ceil(epochs * per_epoch), epochs
    assert train.plan_steps(sizes, train.TrainConfig(batch_size=8, steps=5), plumbing.DistInfo()).total == 5
