"""What moves lambda, PGSQC's strength, during training: each step's change of its logit, attributed.

The question (issue 32)
-----------------------
In the default job lambda's batch mean starts at sigmoid(-3) = 0.047, falls to ~0.012 within the
first few hundred steps and then climbs, still steeply at step 1,400. This script trains the
default job (the `tiny-cpu` recipe, `--calibrator slerp --sampler ggas`, seed 0) and, at every
step, splits the change of lambda's mean logit on that step's queries into where it came from.

The calibrator's last layer reads a shared hidden vector and writes lambda's logit from one row:

    z = GELU(LayerNorm(W1 h + c1))                  shared hidden (H,), also read by A's and B's rows
    l = w . z + b                                   lambda's logit; lambda = sigmoid(l)

For one step t -> t+1 on the step's own queries h (the backbone's output at step t, held fixed,
so only the calibrator's own update is measured; how the backbone moves h is left out), the change
of the mean logit is, exactly,

    dl = mean_b [ (w' - w) . z(h) + (b' - b) ]        own row: lambda's weights and bias
       + mean_b [ w' . (z'(h) - z(h)) ]               shared layers: W1, c1, the LayerNorm

The own row's gradient comes from the contrastive loss only (the regulariser L_fro + L_orth reads
A and B, never l: checked at every step, its gradient on the row is exactly 0). The shared layers'
update is split by source with AdamW's own algebra: its first moment m is linear in the gradients,
so m = m_con + m_reg (each an EMA of that loss's gradient, after the same clipping factor) and the
update lr * m_hat / (sqrt(v_hat) + eps) splits into the same two parts (v is shared). Each part's
effect on dl is measured by applying it alone (z(theta + u_con) - z(theta)); the remainder of the
exact shared term is the interaction, reported.

Also logged per step: the clipping factor min(1, 1 / ||g||) that scales every gradient (the loss
gradient is clipped at norm 1 in tiny-cpu), dL/dl (the bias's gradient, summed over the batch),
the share of a full AdamW step the bias gets (sqrt(v_hat) / (sqrt(v_hat) + eps): under 1 where the
gradient is not much larger than eps = 1e-8), and the angle omega between q and its proposal.

Run it
------
    python benchmarks/lambda_dynamics.py                          # ~20 min on one core: 1,400 steps
    python benchmarks/lambda_dynamics.py --slerp-edge authors     # the authors' clamped slerp instead
    python benchmarks/lambda_dynamics.py --steps 50 --out /tmp/l.json   # a quick look

Writes benchmarks/lambda_dynamics[_<edge>].json: per 10-step window the sums of each contribution,
the mean clipping factor, dL/dl and the Adam share; and the totals over the phases.

Shape legend: B queries of the step, D embedding size, H hyper-network width.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

WINDOW = 10  # steps per row of the written table


def shared_z(hyper, h, params=None):
    """z = GELU(LayerNorm(W1 h + c1)), optionally with the shared layers' parameters replaced."""
    import torch.nn.functional as F

    lin, norm = hyper[0], hyper[1]
    p = params or {}
    x = F.linear(h, p.get("w1", lin.weight), p.get("c1", lin.bias))  # (B, H)
    x = F.layer_norm(x, norm.normalized_shape, p.get("g", norm.weight), p.get("beta", norm.bias), norm.eps)
    return F.gelu(x)  # (B, H)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="steps (default: the default job's, 1400)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slerp-edge", default="exact", choices=("exact", "authors"),
                    help="the calibrator's slerp: ours (exact) or the authors' clamped one")
    ap.add_argument("--run-dir", default=None, help="where the traced run trains (default runs/lambda-<edge>-s<seed>)")
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/lambda_dynamics[_authors].json)")
    args = ap.parse_args(argv)
    out_path = Path(args.out or f"benchmarks/lambda_dynamics{'' if args.slerp_edge == 'exact' else '_authors'}.json")

    import warnings

    import torch

    torch.set_num_threads(1)
    # The optimizer's step is wrapped for one call each step (trace); the scheduler notices and warns.
    warnings.filterwarnings("ignore", message="Seems like `optimizer.step\\(\\)` has been overridden")
    import train
    from support import plumbing, run_dir

    cfg = train.TrainConfig(out=args.run_dir or f"runs/lambda-{args.slerp_edge}-s{args.seed}", seed=args.seed, final_test=False,
                            two_cores="off", cpu_threads=1, **({"steps": args.steps} if args.steps else {}))
    out_dir = Path(cfg.out)
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    with run_dir.one_writer():
        run = train.setup(cfg, None)
        try:
            doc = trace(run, args.slerp_edge)
        finally:
            run.loader.close()
    doc["machine"] = plumbing.machine_info(REPO)
    doc["command"] = " ".join(["python", "benchmarks/lambda_dynamics.py", *(argv if argv is not None else sys.argv[1:])])
    plumbing.atomic_write(REPO / out_path, json.dumps(doc, indent=1))
    print(f"wrote {out_path}")
    return 0


def trace(run, edge: str) -> dict:
    """Train run.plan.total steps as train.train does (no validation), attributing lambda's logit."""
    import torch

    import train

    cal = run.embedder.calibrator
    cal.config.slerp_edge = edge  # forward reads it at every call
    hyper = cal.hyper
    last = hyper[3]
    shared = {"w1": hyper[0].weight, "c1": hyper[0].bias, "g": hyper[1].weight, "beta": hyper[1].bias}
    own = [last.weight, last.bias]  # lambda's row is the last row of each
    watched = list(shared.values()) + own
    group = next(g for g in run.optimizer.param_groups if any(p is hyper[0].weight for p in g["params"]))
    beta1, beta2 = group["betas"]
    eps, wd = group["eps"], group["weight_decay"]
    m_reg = {id(p): torch.zeros_like(p) for p in watched}  # EMA of the clipped regulariser gradient

    captured, clip, probe_h = [], {}, []
    # The calibrator's input h: the step's queries (the pass with gradients), or the probe's.
    hook = cal.register_forward_hook(
        lambda mod, inp, outp: (captured if torch.is_grad_enabled() else probe_h).append(inp[0].detach().float().clone()))
    # A fixed probe, 8 training queries per sub-dataset, re-encoded every PROBE_EVERY steps: it
    # separates the calibrator's own change of lambda from the backbone moving its input h.
    probe = [train.make_batch(run.view, s, list(range(min(8, len(run.view.recs[s])))), 0, 0) for s in sorted(run.view.recs)]
    probes, prev = [], None
    real_clip = train.clip_gradients

    def clip_and_keep(params, max_norm):
        norm = real_clip(params, max_norm)
        clip["norm"] = norm
        clip["factor"] = min(1.0, max_norm / (norm + 1e-6)) if max_norm > 0 else 1.0  # as clip_grad_norm_
        return norm

    train.clip_gradients = clip_and_keep
    rows, cur = [], None
    try:
        while True:
            if run.step % PROBE_EVERY == 0 or run.step == run.plan.total:
                prev = probe_point(run, cal, probe, probe_h, prev, probes)
            if run.step >= run.plan.total:
                break
            captured.clear()
            before = {id(p): p.detach().clone() for p in watched}
            # The step runs as in train.train; the optimizer's step is wrapped to read the gradients
            # after clipping and before the update.
            stash = {}
            real_step = run.optimizer.step

            def step_and_split(*a, **k):
                h = torch.cat(captured)  # (B, D) this step's query states
                with torch.enable_grad():
                    reg = cal(h.to(hyper[0].weight.dtype)).reg  # () the regulariser, weight 1 over the batch
                    g_reg = torch.autograd.grad(reg, watched, allow_unused=True)
                stash["h"], stash["g_reg"] = h, [torch.zeros_like(p) if g is None else g for g, p in zip(g_reg, watched)]
                stash["g_bias"] = float(last.bias.grad[-1])  # dL/dl summed over the batch, after clipping
                stash["lr"] = group["lr"]  # this update's lr (the scheduler moves it right after the step)
                return real_step(*a, **k)

            run.optimizer.step = step_and_split
            try:
                so, subset = train.train_step(run)
            finally:
                run.optimizer.step = real_step
            rec = attribute(run, cal, hyper, last, shared, watched, before, stash, clip["factor"], m_reg,
                            beta1, beta2, eps, wd, group)
            rec.update(step=run.step, subset=subset, lam_logged=float(so.lam), clip=clip["factor"])
            cur = cur or {"first": run.step, **{k: 0.0 for k in SUMS + MAXES}, **{k: [] for k in MEANS}}
            for k in SUMS:
                cur[k] += rec[k]
            for k in MEANS:
                cur[k].append(rec[k])
            for k in MAXES:
                cur[k] = max(cur[k], rec[k])
            if run.step % WINDOW == 0 or run.step == run.plan.total:
                rows.append({"steps": [cur["first"], run.step], **{k: cur[k] for k in SUMS + MAXES},
                             **{k: sum(cur[k]) / len(cur[k]) for k in MEANS}})
                cur = None
            if run.step % 100 == 0:
                print(f"step {run.step}: mean logit {rec['logit_before']:+.3f}  lambda {rec['lam_logged']:.4f}", flush=True)
    finally:
        train.clip_gradients = real_clip
        hook.remove()
    return {"settings": {"steps": run.plan.total, "seed": run.cfg.seed, "slerp_edge": edge,
                         "lr": run.cfg.lr, "grad_clip": run.cfg.grad_clip, "adam_eps": eps, "weight_decay": wd,
                         "dim": cal.dim, "hidden": cal.hidden, "window": WINDOW},
            "windows": rows, "phases": phases(rows), "probe": probes}


PROBE_EVERY = 50


def probe_point(run, cal, probe, probe_h, prev, probes):
    """The probe's mean logit now, and since the last probe point its change split into the
    calibrator's (old inputs, new calibrator) and the inputs' (new inputs, new calibrator)."""
    import torch

    probe_h.clear()
    with torch.no_grad():
        for b in probe:
            run.embedder(queries=b.queries)  # the hook keeps each sub-dataset's h
        h = torch.cat(probe_h)  # (P, D)
        logit = lambda x: float(cal.hyper(x.to(cal.hyper[0].weight.dtype))[:, -1].float().mean())  # noqa: E731
        now = logit(h)
        row = {"step": run.step, "logit": now}
        if prev is not None:
            row["calibrator_part"] = logit(prev) - probes[-1]["logit"]  # l(h_old; theta_new) - l(h_old; theta_old)
            row["input_part"] = now - logit(prev)  # l(h_new; theta_new) - l(h_old; theta_new)
    probes.append(row)
    return h


SUMS = ("dl_exact", "own", "own_bias", "own_weights", "shared", "shared_con", "shared_reg", "shared_interaction")
MEANS = ("clip", "g_bias", "adam_share_bias", "adam_share_row_median", "logit_before", "lam_logged", "omega_deg")
MAXES = ("reg_grad_on_row", "update_split_error")  # checks: exactly 0, and a few float32 ulps (rounding only)


def attribute(run, cal, hyper, last, shared, watched, before, stash, factor, m_reg, beta1, beta2, eps, wd, group):
    """One step's change of lambda's mean logit on its own queries, split as the module docstring says."""
    import torch

    h = stash["h"].to(hyper[0].weight.dtype)  # (B, D)
    with torch.no_grad():
        old = {k: before[id(p)] for k, p in shared.items()}
        z0 = shared_z(hyper, h, old)  # (B, H) z at step t
        z1 = shared_z(hyper, h)  # (B, H) z at step t+1
        w0, b0 = before[id(last.weight)][-1], before[id(last.bias)][-1]  # (H,), ()
        w1, b1 = last.weight[-1], last.bias[-1]  # (H,), ()
        l0 = z0 @ w0 + b0  # (B,) logits before
        l1 = z1 @ w1 + b1  # (B,) logits after
        own_w = float(((w1 - w0) @ z0.T).mean())  # (w' - w) . z, batch mean
        own_b = float(b1 - b0)
        shared_exact = float(((z1 - z0) @ w1).mean())  # w' . (z' - z)
        # AdamW's update split by the source of its first moment (the same v for both parts).
        state_step = float(run.optimizer.state[hyper[0].weight]["step"])
        lr = stash["lr"]
        bc1, bc2 = 1 - beta1 ** state_step, 1 - beta2 ** state_step
        parts = {"con": {}, "reg": {}}
        split_err = 0.0  # the parts must add up to AdamW's update: |theta + u_con + u_reg - theta'| in float32 ulps of theta
        for (k, p), g_r in zip(shared.items(), stash["g_reg"]):
            st = run.optimizer.state[p]
            m_reg[id(p)].mul_(beta1).add_(g_r * factor, alpha=1 - beta1)  # EMA of the clipped reg gradient
            denom = (st["exp_avg_sq"] / bc2).sqrt() + eps
            u_reg = -lr / bc1 * m_reg[id(p)] / denom
            u_con = -lr / bc1 * (st["exp_avg"] - m_reg[id(p)]) / denom
            parts["reg"][k] = before[id(p)] * (1 - lr * wd) + u_reg
            parts["con"][k] = before[id(p)] * (1 - lr * wd) + u_con
            scale = p.abs() + before[id(p)].abs() + u_con.abs() + u_reg.abs()  # what the float32 sums round against
            ulp = torch.finfo(torch.float32).eps * scale.clamp_min(1e-30)
            split_err = max(split_err, float(((before[id(p)] * (1 - lr * wd) + u_con + u_reg - p).abs() / ulp).max()))
        shared_con = float(((shared_z(hyper, h, parts["con"]) - z0) @ w1).mean())
        shared_reg = float(((shared_z(hyper, h, parts["reg"]) - z0) @ w1).mean())
        st_b = run.optimizer.state[last.bias]
        vb = float(st_b["exp_avg_sq"][-1]) / bc2
        st_w = run.optimizer.state[last.weight]
        vw = (st_w["exp_avg_sq"][-1] / bc2).sqrt()  # (H,)
        out = cal(h)
        omega = float(out.omega.mean()) * 180 / math.pi
    reg_row = max(float(stash["g_reg"][-2][-1].abs().max()), float(stash["g_reg"][-1][-1].abs()))
    return {"dl_exact": float((l1 - l0).mean()), "own": own_w + own_b, "own_bias": own_b, "own_weights": own_w,
            "shared": shared_exact, "shared_con": shared_con, "shared_reg": shared_reg,
            "shared_interaction": shared_exact - shared_con - shared_reg, "g_bias": stash["g_bias"],
            "adam_share_bias": math.sqrt(vb) / (math.sqrt(vb) + eps),
            "adam_share_row_median": float((vw / (vw + eps)).median()), "logit_before": float(l0.mean()),
            "omega_deg": omega, "reg_grad_on_row": reg_row, "update_split_error": split_err}


def phases(rows: list) -> list:
    """Totals over the fall (up to the lowest mean logit) and the rise (after it)."""
    if not rows:
        return []
    low = min(range(len(rows)), key=lambda i: rows[i]["logit_before"])
    out = []
    for name, part in (("fall", rows[: low + 1]), ("rise", rows[low + 1:])):
        if part:
            out.append({"phase": name, "steps": [part[0]["steps"][0], part[-1]["steps"][1]],
                        **{k: sum(r[k] for r in part) for k in SUMS},
                        "clip_mean": sum(r["clip"] for r in part) / len(part),
                        "adam_share_bias_mean": sum(r["adam_share_bias"] for r in part) / len(part)})
    return out


if __name__ == "__main__":
    sys.exit(main())
