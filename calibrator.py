"""PGSQC -- the Proposal-Guided Spherical Query Calibrator (Wen et al. 2026, FashionLens).

Concept
-------
A retriever compares unit vectors by cosine, so every embedding lives on the unit sphere.
FashionLens answers very different query formats (text, sketch, street photo, outfit, video,
image + modification text, ...) with one backbone; PGSQC lets each query nudge its own embedding
along the sphere before retrieval.  A small hyper-network reads the query's hidden state and
proposes a new direction q_hat together with a strength lambda; the output walks a fraction
lambda of the great-circle arc from q to q_hat.  Walking on the sphere (slerp) instead of along
the chord (linear interpolation) keeps the norm at exactly 1 and moves the angle at a constant
speed in lambda, so lambda means "share of the way", whatever the angle between q and q_hat.

Where it sits in the method
---------------------------
backbone -> hidden state h of the query token -> **calibrator** -> calibrated unit query -> cosine
against the (uncalibrated) unit target/gallery embeddings -> InfoNCE (train.py) / Recall@K
(evaluate.py).  Only queries pass through it; gallery images do not, so a gallery is encoded
once for every task.  The regularisers it returns are added to the contrastive loss: `reg` is a
mean over the queries it was given, so train.py weighs it either once per batch (the chunk means
weighted by chunk size) or, as the authors do (my_grad_cache.py 246-265), once per GradCache
chunk, which multiplies its weight by the number of chunks (`--reg-per-chunk`).

Equations (per query; all vectors are rows)
-------------------------------------------
    q        = h / ||h||                                            unit query            (D,)
    [a, b, l] = W2 GELU(LayerNorm(W1 h + c1)) + c2                   hyper-network      (2Dr+1,)
    A = reshape(a, D x r),  B = reshape(b, r x D)                    per-query low-rank factors
    q_hat    = normalize(q + (q A) B)                               proposal              (D,)
    lambda   = sigmoid(l)                                           strength in (0, 1)
    omega    = arccos(q . q_hat)                                    angle between them
    slerp(q, q_hat; lambda) = sin((1-lambda) omega)/sin(omega) q + sin(lambda omega)/sin(omega) q_hat
    L_fro    = mean_batch ||A||_F + mean_batch ||B||_F              weight decay on the factors (at 1e-4
                                                                    it does not keep q_hat near q: the
                                                                    proposal may open to ~90 deg; the
                                                                    small lambda keeps the output near q)
    L_orth   = mean_batch ||A^T A - I_r||_F                         a penalty that pulls A's r columns
                                                                    toward orthonormal (the r-dim subspace
                                                                    well used); trained, it is ~0.6, not 0
    reg      = fro_weight * L_fro + orth_weight * L_orth            (1e-4 and 1e-2 by default)

The output of slerp is at angle lambda*omega from q, on the great circle through q and q_hat.
Modes: "slerp" (the method), "linear" (normalize((1-lambda) q + lambda q_hat), the paper's
ablation: same end points, but the angle no longer grows linearly in lambda) and "off" (the
identity: query = q, lambda = 0, losses 0; no parameters are built, so DDP sees no unused ones).

Numerical safety of slerp (see `slerp`):
* omega -> 0: sin(omega) -> 0 and the ratios are 0/0.  We switch to the normalised lerp, which
  agrees with slerp to O(omega^3) there.
* omega -> pi (q_hat ~ -q): every great circle through q passes through -q, so the direction of
  travel is undefined and both formulas blow up (the chord (1-l) q + l q_hat passes through 0).
  We pick ONE deterministic direction u orthogonal to q -- the coordinate axis e_j on which |q_j|
  is smallest, with its q-component removed -- and rotate q towards it:
  out = cos(lambda omega) q + sin(lambda omega) u.  It is unit-norm, differentiable, travels at
  the same constant angular speed, and at lambda = 1 it lands within 2*eps of q_hat.
At init the proposal equals q to ~1e-12, so training starts on the small-angle branch.

The `paper` recipe uses the authors' edge instead (`slerp_edge="authors"`, `slerp_authors`): cos(omega)
clamped at 0.9995 and no renormalisation, so below 1.81 deg (every proposal at initialisation) the
output is slightly off the sphere and lambda's gradient differs (docs/FIDELITY.md).

Parameter cost (computed with `count_parameters`, rank r = 32, hidden = 512):
    D = 2560 (Qwen-VL 3/4B class): Linear D->512 = 1,311,232;  LayerNorm = 1,024;
        Linear 512 -> 2Dr+1 = 163,841 outputs = 84,050,433  (the output layer alone, ~84 M);
        total 85,362,689 (~85.4 M, ~342 MB in fp32).
    D = 128 (tiny size):  66,048 + 1,024 + 4,203,009 (8,193 outputs) = 4,270,081 (~4.3 M).
    D = 64:               33,280 + 1,024 + 2,101,761 (4,097 outputs) = 2,136,065 (~2.1 M).
The cost is dominated by hidden * 2 D r: it is linear in D and in r.

Run `python calibrator.py` for a self-check: slerp vs linear interpolation on one arc, the
behaviour near omega = 0 and pi, the parameter counts above, and a calibrator at initialisation.

Shape legend: B batch, D hidden (embedding) size, r rank of the proposal factors, H hyper-network
hidden width.  Imports only torch and the standard library, so this file can be copied alone.

Credit: the calibrator design, its initialisation and regularisers follow Wen et al. 2026
("Toward Versatile Fashion Image Retrieval via Task-Adaptive Learning", FashionLens); slerp is
Shoemake 1985.  The code and the safety treatment near omega = pi are ours.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

MODES = ("slerp", "linear", "off")


def _lam_column(lam: Union[torch.Tensor, float], q: torch.Tensor) -> torch.Tensor:
    """lambda as a tensor in q's dtype and device, shaped (..., 1) when given per row, to broadcast over D."""
    lam = torch.as_tensor(lam, dtype=q.dtype, device=q.device)
    return lam.unsqueeze(-1) if lam.dim() == q.dim() - 1 and lam.dim() > 0 else lam  # (..., 1) | scalar


def _default_eps(dtype: torch.dtype) -> float:
    """Threshold on sin(omega) below which slerp's ratio formula is replaced (see `slerp`).

    sqrt(machine epsilon) is where sin(omega) stops being computed to a useful relative
    precision from q and p: ~3.5e-4 in float32 (omega ~ 0.02 deg), ~1.5e-8 in float64.
    """
    return math.sqrt(torch.finfo(dtype).eps)


def slerp(q: torch.Tensor, p: torch.Tensor, lam: Union[torch.Tensor, float],
          eps: Optional[float] = None) -> torch.Tensor:
    """Spherical linear interpolation from q towards p, a fraction `lam` of the arc.

        slerp(q, p; lam) = sin((1-lam) w) / sin(w) * q + sin(lam w) / sin(w) * p,  w = angle(q, p)

    Args:
        q, p: (..., D) directions; they are normalised here, so any non-zero vectors work.
        lam:  a float, or a tensor broadcastable to (...,) -- e.g. (B,) for (B, D) inputs -- or
              already shaped (..., 1).  lam = 0 gives q, lam = 1 gives p; values outside [0, 1]
              extrapolate along the same great circle.
        eps:  threshold on sin(w) for the two special cases (default sqrt(machine eps) of the
              compute dtype).

    Returns:
        (..., D) unit vectors, at angle lam * w from q (constant angular speed), in the compute
        dtype (the inputs' dtype promoted to at least float32; half precision loses the sphere).

    Special cases (chosen so values AND gradients stay finite; torch.where alone would still
    back-propagate NaN from the unused branch, so every branch is fed safe inputs):
        sin(w) < eps and w < pi/2: normalised lerp, equal to slerp to O(w^3).
        sin(w) < eps and w > pi/2: p ~ -q, the direction of travel is undefined.  We rotate q
            towards a fixed unit u orthogonal to q (coordinate axis of smallest |q_j|, minus its
            q-component):  out = cos(lam w) q + sin(lam w) u.  Deterministic, unit norm, angle
            lam * w, and within 2*eps of p at lam = 1.
    """
    work = torch.promote_types(torch.promote_types(q.dtype, p.dtype), torch.float32)
    q = F.normalize(q.to(work), dim=-1)  # (..., D) unit start point
    p = F.normalize(p.to(work), dim=-1)  # (..., D) unit end point
    lam = _lam_column(lam, q)  # (..., 1) so it broadcasts over D
    eps = _default_eps(work) if eps is None else eps

    # Angle between q and p, from cos (dot product) and sin (length of p's part orthogonal to q).
    # atan2 stays accurate and differentiable at both ends, unlike arccos near +-1.
    cos_w = (q * p).sum(-1, keepdim=True).clamp(-1.0, 1.0)  # (..., 1) cos(omega)
    tangent = p - cos_w * q  # (..., D) p's component orthogonal to q, length sin(omega)
    sin_w = tangent.pow(2).sum(-1, keepdim=True).clamp_min(1e-30).sqrt()  # (..., 1) sin(omega) >= 0
    omega = torch.atan2(sin_w, cos_w)  # (..., 1) omega in [0, pi]
    small = sin_w < eps  # (..., 1) the ratio formula is unsafe here
    near_zero = small & (cos_w > 0)  # (..., 1) q ~ p
    near_pi = small & (cos_w <= 0)  # (..., 1) q ~ -p

    # General case: the slerp formula.  sin(omega) is replaced by 1 where it is unsafe, so the
    # unused values stay finite and their (masked) gradients are not NaN.
    safe_sin = torch.where(small, torch.ones_like(sin_w), sin_w)  # (..., 1)
    coef_q = torch.sin((1.0 - lam) * omega) / safe_sin  # (..., 1) sin((1-lam) w) / sin w
    coef_p = torch.sin(lam * omega) / safe_sin  # (..., 1) sin(lam w) / sin w
    out_general = coef_q * q + coef_p * p  # (..., D)

    # omega ~ 0: normalised lerp.  Where p ~ -q the chord can pass through 0, so that branch is
    # fed p := q there (its value is discarded, but its gradient must stay finite).
    p_lerp = torch.where(near_pi, q, p)  # (..., D)
    out_lerp = F.normalize((1.0 - lam) * q + lam * p_lerp, dim=-1)  # (..., D)

    # omega ~ pi: rotate towards a fixed orthogonal direction u (the great circle is undefined).
    j = q.abs().argmin(dim=-1, keepdim=True)  # (..., 1) axis least aligned with q
    axis = torch.zeros_like(q).scatter_(-1, j, 1.0)  # (..., D) e_j
    u = axis - (q * axis).sum(-1, keepdim=True) * q  # (..., D) e_j minus its q-part
    u = F.normalize(u, dim=-1)  # (..., D) |q_j| <= 1/sqrt(D) keeps ||u|| >= sqrt(1-1/D) > 0
    out_pi = torch.cos(lam * omega) * q + torch.sin(lam * omega) * u  # (..., D)

    out = torch.where(near_zero, out_lerp, torch.where(near_pi, out_pi, out_general))  # (..., D)
    # One last normalisation removes the rounding drift of the ratio formula (gradient-safe:
    # every branch above has norm ~1).
    return F.normalize(out, dim=-1)  # (..., D)


# The authors' clamp on cos(omega) and their guard on the division (code/model.py 36 and 43-44).
AUTHORS_COS_CLAMP, AUTHORS_SIN_GUARD = 0.9995, 1e-8
SLERP_EDGES = ("exact", "authors")


def slerp_authors(q: torch.Tensor, p: torch.Tensor, lam: Union[torch.Tensor, float]) -> torch.Tensor:
    """The authors' slerp (code/model.py 30-55), for the `paper` recipe: cos(omega) clamped to
    +-0.9995 and sin(omega) + 1e-8 in the denominators, the output not renormalised.

        c = clamp(q . p, -0.9995, 0.9995),  w = arccos(c)
        out = sin((1-lam) w) / (sin w + 1e-8) * q + sin(lam w) / (sin w + 1e-8) * p

    Their normalised-lerp branch (where sin w < 1e-6) is left out: after the clamp sin w >= 0.0316,
    so it never runs.  q and p must already be unit vectors, as theirs are: they are not normalised
    again, since near q the result (and lambda's gradient) depends on their last bits.  Computed in
    at least float32, like `slerp`.  Returns (..., D), of norm 1 only above the clamp angle (1.81 deg).
    """
    work = torch.promote_types(torch.promote_types(q.dtype, p.dtype), torch.float32)
    q, p = q.to(work), p.to(work)  # (..., D) each, unit already (the calibrator's q and q_hat)
    lam = _lam_column(lam, q)  # (..., 1)
    cos_w = (q * p).sum(-1, keepdim=True).clamp(-AUTHORS_COS_CLAMP, AUTHORS_COS_CLAMP)  # (..., 1) clamped cos
    omega = torch.acos(cos_w)  # (..., 1) at least arccos(0.9995) = 0.0316 rad
    denom = torch.sin(omega) + AUTHORS_SIN_GUARD  # (..., 1) sin(omega) + 1e-8
    coef_q = torch.sin((1.0 - lam) * omega) / denom  # (..., 1)
    coef_p = torch.sin(lam * omega) / denom  # (..., 1)
    return coef_q * q + coef_p * p  # (..., D) no renormalisation, as theirs


def lerp_normalized(q: torch.Tensor, p: torch.Tensor, lam: Union[torch.Tensor, float]) -> torch.Tensor:
    """normalize((1-lam) q + lam p): the 'linear' ablation.  Same end points as slerp, but the
    angle from q is not proportional to lam, and the chord passes near 0 when p ~ -q (we guard
    the norm with a floor of 1e-12 via F.normalize; the output there is unreliable by nature)."""
    work = torch.promote_types(torch.promote_types(q.dtype, p.dtype), torch.float32)
    q = F.normalize(q.to(work), dim=-1)  # (..., D)
    p = F.normalize(p.to(work), dim=-1)  # (..., D)
    lam = _lam_column(lam, q)  # (..., 1)
    return F.normalize((1.0 - lam) * q + lam * p, dim=-1)  # (..., D)


@dataclass
class CalibratorConfig:
    """Knobs of PGSQC.  Defaults are the authors' unless said otherwise."""

    dim: int  # D, no default: the backbone's hidden size (2560 for a 4B Qwen-VL; small for the tiny model)
    rank: int = 32  # r = 32: rank of the per-query factors A (D x r), B (r x D); the paper's value
    hidden: int = 512  # H = 512: hyper-network width; small next to D, the output layer dominates cost
    mode: str = "slerp"  # "slerp" (the method) | "linear" (ablation) | "off" (identity, no parameters)
    fro_weight: float = 1e-4  # weight of L_fro: a gentle decay of A and B (too weak to hold q_hat near q: lambda does)
    orth_weight: float = 1e-2  # weight of L_orth: pulls A's columns toward orthonormal so all r directions are used
    init_logit: float = -3.0  # lambda bias at init: sigmoid(-3) = 0.047, so training starts near identity
    init_std: float = 1e-6  # std of the output layer's weights: A, B ~ 0 so q_hat = q at init
    eps: Optional[float] = None  # slerp's threshold on sin(omega); None = sqrt(machine eps) of the dtype
    slerp_edge: str = "exact"  # "exact" (slerp, |q'| = 1 everywhere) | "authors" (slerp_authors: cos clamped at 0.9995)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"CalibratorConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.slerp_edge not in SLERP_EDGES:
            raise ValueError(f"CalibratorConfig.slerp_edge must be one of {SLERP_EDGES}, got {self.slerp_edge!r}")
        if self.dim <= 0 or self.rank <= 0 or self.hidden <= 0:
            raise ValueError(f"CalibratorConfig: dim, rank, hidden must be positive, got "
                             f"dim={self.dim} rank={self.rank} hidden={self.hidden}")


@dataclass
class CalibratorOutput:
    """What the calibrator returns for a batch of B queries."""

    query: torch.Tensor  # (B, D) calibrated unit queries (dtype of the input h)
    lam: torch.Tensor  # (B,) strength lambda in (0, 1); zeros in mode "off"
    loss_fro: torch.Tensor  # () mean ||A||_F + mean ||B||_F (float32)
    loss_orth: torch.Tensor  # () mean ||A^T A - I_r||_F (float32)
    reg: torch.Tensor  # () fro_weight * loss_fro + orth_weight * loss_orth: add it to the loss
    proposal: Optional[torch.Tensor] = None  # (B, D) unit q_hat (None in mode "off"), for plots
    omega: Optional[torch.Tensor] = None  # (B,) angle between q and q_hat in radians, for plots


def count_parameters(dim: int, rank: int = 32, hidden: int = 512) -> dict:
    """Parameter count of the hyper-network, layer by layer, without building it."""
    out = 2 * dim * rank + 1  # A, B and the lambda logit
    first = dim * hidden + hidden  # Linear D -> H (weight + bias)
    norm = 2 * hidden  # LayerNorm gain + bias
    last = hidden * out + out  # Linear H -> 2Dr+1 (weight + bias)
    return {"linear_in": first, "layernorm": norm, "linear_out": last, "outputs": out,
            "total": first + norm + last}


class SphericalQueryCalibrator(nn.Module):
    """PGSQC: forward(h (B, D)) -> CalibratorOutput (see the module docstring for the equations).

    Args mirror `CalibratorConfig`; `SphericalQueryCalibrator.from_config(cfg)` builds from one.
    `mode` may be switched between "slerp" and "linear" after construction (same parameters);
    "off" builds no parameters at all.
    """

    def __init__(self, dim: int, rank: int = 32, hidden: int = 512, mode: str = "slerp",
                 fro_weight: float = 1e-4, orth_weight: float = 1e-2, init_logit: float = -3.0,
                 init_std: float = 1e-6, eps: Optional[float] = None, slerp_edge: str = "exact"):
        super().__init__()
        self.config = CalibratorConfig(dim=dim, rank=rank, hidden=hidden, mode=mode,
                                       fro_weight=fro_weight, orth_weight=orth_weight,
                                       init_logit=init_logit, init_std=init_std, eps=eps,
                                       slerp_edge=slerp_edge)
        self.dim, self.rank, self.hidden, self.mode = dim, rank, hidden, mode
        if mode == "off":
            # The ablation without calibration: no parameters, so DDP has none left unused and a
            # checkpoint carries no dead weights.
            self.hyper = None
            return
        # Hyper-network h -> [vec(A), vec(B), logit].
        self.hyper = nn.Sequential(
            nn.Linear(dim, hidden),  # (B, D) -> (B, H)
            nn.LayerNorm(hidden),  # normalises the scale of backbone states, which varies by model
            nn.GELU(),
            nn.Linear(hidden, 2 * dim * rank + 1),  # (B, H) -> (B, 2Dr+1)
        )
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg: CalibratorConfig) -> "SphericalQueryCalibrator":
        return cls(**asdict(cfg))

    def reset_parameters(self) -> None:
        """Near-identity init: tiny output weights make A, B ~ 0 (q_hat = q); the logit bias -3
        makes lambda ~ 0.047.  The first layers keep PyTorch's default init."""
        if self.hyper is None:
            return
        last = self.hyper[-1]
        nn.init.normal_(last.weight, mean=0.0, std=self.config.init_std)
        nn.init.zeros_(last.bias)
        with torch.no_grad():
            last.bias[-1] = self.config.init_logit  # the lambda logit is the last output

    def extra_repr(self) -> str:
        edge = "" if self.config.slerp_edge == "exact" else f", slerp_edge={self.config.slerp_edge!r}"
        return f"dim={self.dim}, rank={self.rank}, hidden={self.hidden}, mode={self.mode!r}{edge}"

    def forward(self, h: torch.Tensor) -> CalibratorOutput:
        if h.dim() != 2 or h.shape[-1] != self.dim:
            raise ValueError(f"SphericalQueryCalibrator expects h of shape (B, {self.dim}), "
                             f"got {tuple(h.shape)}")
        if self.mode not in MODES:
            raise ValueError(f"SphericalQueryCalibrator.mode must be one of {MODES}, got {self.mode!r}")
        bsz, dim, r = h.shape[0], self.dim, self.rank
        zero = h.new_zeros((), dtype=torch.float32)  # () loss placeholder
        if self.mode == "off" or self.hyper is None:
            if self.mode != "off":
                raise RuntimeError("calibrator built with mode='off' has no parameters; "
                                   "rebuild it to use mode " + repr(self.mode))
            query = F.normalize(h.float(), dim=-1).to(h.dtype)  # (B, D) q
            return CalibratorOutput(query=query, lam=h.new_zeros(bsz, dtype=torch.float32),
                                    loss_fro=zero, loss_orth=zero, reg=zero)

        # Hyper-network, run in the parameters' dtype (bf16 on GPU is fine for it).
        w_dtype = self.hyper[0].weight.dtype
        out = self.hyper(h.to(w_dtype)).float()  # (B, 2Dr+1) geometry below in float32
        A = out[:, : dim * r].reshape(bsz, dim, r)  # (B, D, r)
        Bm = out[:, dim * r: 2 * dim * r].reshape(bsz, r, dim)  # (B, r, D)
        logit = out[:, -1]  # (B,)

        q = F.normalize(h.float(), dim=-1)  # (B, D) unit query  q = h / ||h||
        qa = torch.einsum("bd,bdr->br", q, A)  # (B, r) q A
        delta = torch.einsum("br,brd->bd", qa, Bm)  # (B, D) (q A) B
        q_hat = F.normalize(q + delta, dim=-1)  # (B, D) proposal q_hat = normalize(q + qAB)
        lam = torch.sigmoid(logit)  # (B,) strength lambda = sigmoid(l)

        if self.mode == "slerp" and self.config.slerp_edge == "authors":
            query = slerp_authors(q, q_hat, lam)  # (B, D) their clamped slerp (not quite unit near q)
        elif self.mode == "slerp":
            query = slerp(q, q_hat, lam, eps=self.config.eps)  # (B, D) slerp(q, q_hat; lambda)
        else:
            query = lerp_normalized(q, q_hat, lam)  # (B, D) normalize((1-l) q + l q_hat)
        # angle(q, q_hat) for reporting only; atan2 resolves tiny angles that acos rounds to 3e-4.
        cos_w = (q * q_hat).sum(-1)  # (B,)
        sin_w = torch.linalg.vector_norm(q_hat - cos_w.unsqueeze(-1) * q, dim=-1)  # (B,)
        omega = torch.atan2(sin_w, cos_w).detach()  # (B,)

        # Regularisers (means over the batch of per-query Frobenius norms).
        loss_fro = (torch.linalg.vector_norm(A, dim=(1, 2)).mean()
                    + torch.linalg.vector_norm(Bm, dim=(1, 2)).mean())  # () L_fro
        eye = torch.eye(r, dtype=A.dtype, device=A.device)  # (r, r)
        gram = A.transpose(1, 2) @ A  # (B, r, r) A^T A
        loss_orth = torch.linalg.vector_norm(gram - eye, dim=(1, 2)).mean()  # () L_orth
        reg = self.config.fro_weight * loss_fro + self.config.orth_weight * loss_orth  # ()
        return CalibratorOutput(query=query.to(h.dtype), lam=lam, loss_fro=loss_fro,
                                loss_orth=loss_orth, reg=reg, proposal=q_hat.detach(), omega=omega)


def _demo() -> None:
    torch.manual_seed(0)
    deg = 180.0 / math.pi
    print("== slerp vs normalised lerp on one arc (omega = 150 deg) ==")
    q = torch.tensor([1.0, 0.0, 0.0])  # (D=3,)
    w = 150.0 / deg
    p = torch.tensor([math.cos(w), math.sin(w), 0.0])  # (D,) 150 deg away from q
    print(f"{'lambda':>7} {'slerp angle':>12} {'lambda*omega':>13} {'lerp angle':>11} {'|raw lerp|':>11}")
    for lam in (0.0, 0.25, 0.5, 0.75, 1.0):
        s = slerp(q, p, lam)
        l_ = lerp_normalized(q, p, lam)
        raw = ((1 - lam) * q + lam * p).norm()
        print(f"{lam:7.2f} {torch.acos(s @ q).item() * deg:12.2f} {lam * w * deg:13.2f} "
              f"{torch.acos((l_ @ q).clamp(-1, 1)).item() * deg:11.2f} {raw.item():11.3f}")
    print("slerp moves at constant speed; lerp lags then rushes, and its chord shrinks to "
          "|raw lerp| = 0.26 mid-way, which the normalisation hides.\n")

    print("== the two unsafe ends ==")
    for name, pp in (("omega ~ 0 ", q + 1e-6 * torch.tensor([0.0, 1.0, 0.0])),
                     ("omega = pi", -q)):
        x = q.clone().requires_grad_(True)
        out = slerp(x, pp, torch.tensor(0.5))
        out.sum().backward()
        print(f"{name}: slerp(q, p, 0.5) = {[round(v, 4) for v in out.tolist()]}, norm "
              f"{out.norm().item():.6f}, angle {torch.acos((out @ q).clamp(-1, 1)).item() * deg:.2f} deg, "
              f"grad finite: {bool(torch.isfinite(x.grad).all())}")
    print("near pi the direction is a fixed axis orthogonal to q (documented choice).\n")

    print("== parameter cost (rank 32, hidden 512) ==")
    for d in (2560, 128, 64):
        c = count_parameters(d)
        print(f"D={d:5d}: output layer {c['linear_out']:>12,}  total {c['total']:>12,}")
    built = sum(p.numel() for p in SphericalQueryCalibrator(64).parameters())
    print(f"built at D=64: {built:,} parameters (matches count_parameters: "
          f"{built == count_parameters(64)['total']})\n")

    print("== a calibrator at initialisation, D=64, batch 4 ==")
    cal = SphericalQueryCalibrator(64)
    h = torch.randn(4, 64) * 3  # (B, D) raw hidden states
    o = cal(h)
    cos = (o.query * F.normalize(h, dim=-1)).sum(-1)  # (B,)
    print(f"lambda {[round(v, 4) for v in o.lam.tolist()]} (sigmoid(-3) = {1 / (1 + math.e ** 3):.4f})")
    print(f"cos(query, q) {[round(v, 6) for v in cos.tolist()]}; angle(q, q_hat) max "
          f"{o.omega.max().item():.2e} rad")
    print(f"L_fro {o.loss_fro.item():.3e} (A, B ~ 0)   L_orth {o.loss_orth.item():.4f} "
          f"(= sqrt(r) = {math.sqrt(32):.4f} since A^T A ~ 0)   reg {o.reg.item():.4f}")

    print("\n== 100 Adam steps pulling queries towards a fixed direction ==")
    target = F.normalize(torch.randn(64), dim=0)  # (D,)
    opt = torch.optim.Adam(cal.parameters(), lr=1e-3)
    for step in range(101):
        o = cal(h)
        loss = -(o.query @ target).mean() + o.reg
        if step % 25 == 0:
            print(f"step {step:3d}: cos(query, target) {(o.query @ target).mean().item():+.3f}  "
                  f"mean lambda {o.lam.mean().item():.3f}  mean omega {o.omega.mean().item() * deg:6.1f} deg  "
                  f"angle travelled lambda*omega {(o.lam * o.omega).mean().item() * deg:5.1f} deg")
        opt.zero_grad()
        loss.backward()
        opt.step()


if __name__ == "__main__":
    _demo()
