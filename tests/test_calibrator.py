"""Tests for calibrator.py: slerp's geometry and numerical safety, and PGSQC's modes, init and losses."""
import math

import pytest
import torch
import torch.nn.functional as F

from calibrator import (CalibratorConfig, SphericalQueryCalibrator, count_parameters,
                        lerp_normalized, slerp)


def _pair_at_angle(omega: float, dim: int = 16, batch: int = 8, dtype=torch.float64, seed: int = 0):
    """Unit q and p with angle(q, p) = omega exactly, in random planes."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(batch, dim, generator=g, dtype=dtype), dim=-1)  # (B, D)
    v = torch.randn(batch, dim, generator=g, dtype=dtype)  # (B, D)
    u = F.normalize(v - (v * q).sum(-1, keepdim=True) * q, dim=-1)  # (B, D) orthogonal to q
    p = math.cos(omega) * q + math.sin(omega) * u  # (B, D)
    return q, p


def _angle(a, b):
    """Angle between rows, accurate at 0 and pi (atan2 of sine and cosine)."""
    c = (a * b).sum(-1)
    s = torch.linalg.vector_norm(b - c.unsqueeze(-1) * a, dim=-1)
    return torch.atan2(s, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_slerp_endpoints(dtype):
    q, p = _pair_at_angle(1.3, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(slerp(q, p, 0.0), q, atol=tol, rtol=0)
    torch.testing.assert_close(slerp(q, p, 1.0), p, atol=tol, rtol=0)


def test_slerp_unit_norm_and_constant_angular_speed():
    g = torch.Generator().manual_seed(1)
    for omega in (0.01, 0.5, 1.5, 2.5, 3.1):
        q, p = _pair_at_angle(omega, batch=32, seed=int(omega * 100))
        lam = torch.rand(32, generator=g, dtype=torch.float64)  # (B,)
        lam[:2] = torch.tensor([0.0, 1.0], dtype=torch.float64)  # include both ends
        out = slerp(q, p, lam)
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(32, dtype=torch.float64))
        # Constant speed: angle from q is lam*omega and angle to p is the rest of the arc.
        torch.testing.assert_close(_angle(q, out), lam * omega, atol=1e-9, rtol=0)
        torch.testing.assert_close(_angle(out, p), (1 - lam) * omega, atol=1e-9, rtol=0)


def test_slerp_lam_shapes_broadcast():
    q, p = _pair_at_angle(1.0, batch=4)
    lam = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    torch.testing.assert_close(slerp(q, p, lam), slerp(q, p, lam.unsqueeze(-1)))
    torch.testing.assert_close(slerp(q, p, 0.25), slerp(q, p, torch.full((4,), 0.25, dtype=torch.float64)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["equal", "omega~0", "antipodal", "omega~pi"])
def test_slerp_degenerate_angles_are_finite_unit_with_finite_grads(dtype, case):
    q0, p0 = _pair_at_angle(1.0, dtype=dtype, seed=3)
    tiny = 1e-7 if dtype == torch.float32 else 1e-12
    p0 = {"equal": q0.clone(), "omega~0": F.normalize(q0 + tiny * p0, dim=-1),
          "antipodal": -q0.clone(), "omega~pi": F.normalize(-q0 + tiny * p0, dim=-1)}[case]
    for lam_value in (0.0, 0.3, 0.5, 1.0):
        q = q0.clone().requires_grad_(True)
        p = p0.clone().requires_grad_(True)
        lam = torch.full((q.shape[0],), lam_value, dtype=dtype, requires_grad=True)
        out = slerp(q, p, lam)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(q.shape[0], dtype=dtype),
                                   atol=1e-6, rtol=0)
        # Angle travelled is still lam * omega (omega ~ 0 or ~ pi here).
        omega = _angle(q0, p0)
        atol = 2e-3 if dtype == torch.float32 else 1e-6
        torch.testing.assert_close(_angle(q0, out.detach()), lam_value * omega, atol=atol, rtol=0)
        # A loss touching every output coordinate, so every path is exercised.
        (out * torch.arange(out.shape[-1], dtype=dtype)).sum().backward()
        for t in (q, p, lam):
            assert torch.isfinite(t.grad).all(), f"non-finite grad for {case}, lam={lam_value}"
    # At lam = 1 the output lands on p (within the documented 2*eps near pi).
    torch.testing.assert_close(slerp(q0, p0, 1.0), p0, atol=1e-3 if dtype == torch.float32 else 1e-7, rtol=0)


def test_slerp_gradcheck_general_case():
    q, p = _pair_at_angle(1.2, dim=5, batch=3)
    lam = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    args = (q.requires_grad_(True), p.requires_grad_(True), lam.requires_grad_(True))
    assert torch.autograd.gradcheck(lambda a, b, c: slerp(a, b, c), args)


def test_linear_differs_from_slerp_off_endpoints_and_both_stay_on_sphere():
    q, p = _pair_at_angle(2.0)
    for lam in (0.25, 0.5, 0.75):
        s, l_ = slerp(q, p, lam), lerp_normalized(q, p, lam)
        for out in (s, l_):
            torch.testing.assert_close(out.norm(dim=-1), torch.ones(len(q), dtype=q.dtype))
        if lam != 0.5:  # by symmetry both hit the arc's midpoint at lam = 0.5
            assert (s - l_).norm(dim=-1).min() > 0.1
    for lam in (0.0, 1.0):
        torch.testing.assert_close(slerp(q, p, lam), lerp_normalized(q, p, lam))


def test_calibrator_modes_linear_vs_slerp_share_parameters():
    torch.manual_seed(0)
    cal = SphericalQueryCalibrator(24, rank=4, hidden=32)
    with torch.no_grad():  # make the proposal far from q so the two paths differ visibly
        cal.hyper[-1].weight.normal_(0, 0.5)
        cal.hyper[-1].bias[-1] = 0.0  # lambda ~ 0.5 +- spread
    h = torch.randn(6, 24)
    out_s = cal(h)
    cal.mode = "linear"
    out_l = cal(h)
    torch.testing.assert_close(out_s.lam, out_l.lam)
    for o in (out_s, out_l):
        torch.testing.assert_close(o.query.norm(dim=-1), torch.ones(6))
    assert (out_s.query - out_l.query).norm(dim=-1).max() > 1e-3
    # slerp output sits at lam*omega from q; the linear one does not in general.
    q = F.normalize(h, dim=-1)
    torch.testing.assert_close(_angle(q, out_s.query), out_s.lam * out_s.omega, atol=1e-4, rtol=0)


def test_off_mode_is_identity_without_parameters():
    cal = SphericalQueryCalibrator(16, mode="off")
    assert sum(p.numel() for p in cal.parameters()) == 0
    h = torch.randn(5, 16) * 7
    out = cal(h)
    torch.testing.assert_close(out.query, F.normalize(h, dim=-1))
    assert torch.equal(out.lam, torch.zeros(5))
    assert out.reg.item() == out.loss_fro.item() == out.loss_orth.item() == 0.0


def test_init_is_near_identity():
    torch.manual_seed(0)
    cal = SphericalQueryCalibrator(64)  # default rank 32, hidden 512
    h = torch.randn(16, 64) * 5
    out = cal(h)
    cos = (out.query * F.normalize(h, dim=-1)).sum(-1)
    assert cos.min() >= 0.99
    torch.testing.assert_close(out.lam, torch.full((16,), 1 / (1 + math.exp(3.0))))
    assert out.query.shape == (16, 64) and out.lam.shape == (16,)
    assert out.loss_fro.dim() == out.loss_orth.dim() == out.reg.dim() == 0


def test_regularisers_and_proposal_on_hand_made_factors():
    dim, r = 6, 2
    cal = SphericalQueryCalibrator(dim, rank=r, hidden=8, fro_weight=0.1, orth_weight=0.5)
    A = torch.zeros(dim, r)
    A[0, 0], A[1, 1] = 2.0, 2.0  # columns orthogonal with norm 2: A^T A = 4 I
    Bm = torch.zeros(r, dim)
    Bm[0, 2] = 3.0  # (q A) B moves q_0 mass onto coordinate 2
    with torch.no_grad():  # zero weights: every query gets the same A, B, logit from the bias
        cal.hyper[-1].weight.zero_()
        cal.hyper[-1].bias.copy_(torch.cat([A.flatten(), Bm.flatten(), torch.tensor([0.7])]))
    h = torch.randn(3, dim)
    out = cal(h)
    fro = A.norm() + Bm.norm()  # 2*sqrt(2) + 3
    orth = (A.T @ A - torch.eye(r)).norm()  # ||3 I_2||_F = 3 sqrt(2)
    torch.testing.assert_close(out.loss_fro, fro)
    torch.testing.assert_close(out.loss_orth, orth)
    torch.testing.assert_close(out.reg, 0.1 * fro + 0.5 * orth)
    q = F.normalize(h, dim=-1)
    q_hat = F.normalize(q + q @ A @ Bm, dim=-1)
    torch.testing.assert_close(out.proposal, q_hat)
    lam = torch.sigmoid(torch.tensor(0.7))
    torch.testing.assert_close(out.lam, lam.expand(3))
    torch.testing.assert_close(out.query, slerp(q, q_hat, lam.expand(3)))
    # An A with orthonormal columns has no orthogonality penalty.
    with torch.no_grad():
        cal.hyper[-1].bias[: dim * r].copy_((A / 2).flatten())
    assert cal(h).loss_orth.abs().item() < 1e-6


def test_gradients_reach_the_hyper_network():
    torch.manual_seed(0)
    cal = SphericalQueryCalibrator(32, rank=4, hidden=16)
    h = torch.randn(4, 32, requires_grad=True)
    target = F.normalize(torch.randn(32), dim=0)
    out = cal(h)
    (-(out.query @ target).sum() + out.reg).backward()
    for name, prm in cal.named_parameters():
        assert prm.grad is not None and torch.isfinite(prm.grad).all(), name
    assert cal.hyper[-1].weight.grad.abs().max() > 0  # A, B learn from the first step
    assert torch.isfinite(h.grad).all()
    # At init q_hat == q to float precision, so lambda has nothing to scale yet; once the
    # proposal has moved away from q, the lambda logit gets a gradient too.
    with torch.no_grad():
        cal.hyper[-1].weight.normal_(0, 0.1)
    cal.zero_grad()
    out = cal(h)
    (-(out.query @ target).sum()).backward()
    assert cal.hyper[-1].bias.grad[-1].abs() > 0


def test_parameter_count_matches_module_and_docstring():
    built = SphericalQueryCalibrator(40, rank=3, hidden=20)
    assert sum(p.numel() for p in built.parameters()) == count_parameters(40, 3, 20)["total"]
    big = count_parameters(2560)
    assert big["linear_out"] == 512 * (2 * 2560 * 32 + 1) + (2 * 2560 * 32 + 1)
    assert 83e6 < big["linear_out"] < 85e6  # "the output layer alone is ~84 M"
    import calibrator
    assert f"{big['total']:,}" in calibrator.__doc__
    assert f"{count_parameters(128)['total']:,}" in calibrator.__doc__


def test_from_config_bad_input_and_bf16():
    cfg = CalibratorConfig(dim=16, rank=2, hidden=8, mode="linear")
    cal = SphericalQueryCalibrator.from_config(cfg)
    assert cal.mode == "linear" and cal.config == cfg
    with pytest.raises(ValueError, match="mode"):
        CalibratorConfig(dim=16, mode="cubic")
    with pytest.raises(ValueError, match=r"\(B, 16\)"):
        cal(torch.randn(3, 17))
    out = cal.to(torch.bfloat16)(torch.randn(3, 16, dtype=torch.bfloat16))
    assert out.query.dtype == torch.bfloat16 and torch.isfinite(out.query).all()
    torch.testing.assert_close(out.query.float().norm(dim=-1), torch.ones(3), atol=1e-2, rtol=0)


def test_config_eps_is_the_threshold_the_calibrator_uses():
    """CalibratorConfig.eps reaches slerp: with eps above sin(omega) the calibrator takes the
    small-angle branch (the normalised lerp); with the default it walks the arc at constant speed."""
    dim, r = 6, 2
    A = torch.zeros(dim, r)
    A[0, 0] = 1.0  # q A = (q_0, 0)
    Bm = torch.zeros(r, dim)
    Bm[0, 1] = 3.0  # (q A) B = 3 q_0 e_1: q_hat leans towards e_1, far from q
    h = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0, 0.0],   # omega = atan(3) = 1.25 rad
                      [2.0, 0.5, 0.3, 0.0, 0.0, 0.0],
                      [3.0, 0.5, 0.0, 0.2, 0.0, 0.1]])  # (B, D)

    def built(eps):
        cal = SphericalQueryCalibrator(dim, rank=r, hidden=8, eps=eps)
        with torch.no_grad():  # every query gets the same A, B and logit -1 (lambda = 0.27)
            cal.hyper[-1].weight.zero_()
            cal.hyper[-1].bias.copy_(torch.cat([A.flatten(), Bm.flatten(), torch.tensor([-1.0])]))
        return cal

    q = F.normalize(h, dim=-1)
    exact, loose = built(None)(h), built(0.99)(h)
    assert built(0.99).config.eps == 0.99
    assert (torch.sin(exact.omega) < 0.99).all() and (exact.omega > 0.3).all()  # eps 0.99 covers these angles
    # Default eps: slerp proper, at angle lambda * omega from q.
    torch.testing.assert_close(_angle(q, exact.query), exact.lam * exact.omega, atol=1e-5, rtol=0)
    # eps = 0.99 > sin(omega): the normalised lerp, which lags behind the arc.
    torch.testing.assert_close(loose.query, lerp_normalized(q, loose.proposal, loose.lam), atol=1e-6, rtol=0)
    assert (exact.lam * exact.omega - _angle(q, loose.query)).min() > 0.01


# ------------------------------------------------------------------------------------------------
# Issue 31, item 0: the authors' slerp edge (slerp_edge="authors", the `paper` recipe's)
# ------------------------------------------------------------------------------------------------

def _theirs(q, q_hat, lam):
    """The authors' slerp (code/model.py 30-53) written out: cos clamped to +-0.9995 (line 36), the
    division by sin + 1e-8 (43-44), no normalisation of the sum (46). Their lerp branch (41, 48-51) needs
    sin < 1e-6, which the clamp rules out (sin >= sqrt(1 - 0.9995^2) = 0.0316)."""
    c = torch.clamp((q * q_hat).sum(-1, keepdim=True), -0.9995, 0.9995)  # (B, 1)
    w = torch.acos(c)  # (B, 1)
    lam = lam.unsqueeze(-1)  # (B, 1)
    return torch.sin((1 - lam) * w) / (torch.sin(w) + 1e-8) * q + torch.sin(lam * w) / (torch.sin(w) + 1e-8) * q_hat


def _factored(cal, h):
    """q, q_hat, lambda (B, D), (B, D), (B,) as the calibrator makes them, from its own hyper-network."""
    out = cal.hyper(h).float()  # (B, 2Dr+1)
    d, r, b = cal.dim, cal.rank, h.shape[0]
    A, Bm = out[:, : d * r].reshape(b, d, r), out[:, d * r: 2 * d * r].reshape(b, r, d)  # (B, D, r), (B, r, D)
    q = F.normalize(h.float(), dim=-1)  # (B, D)
    q_hat = F.normalize(q + torch.einsum("br,brd->bd", torch.einsum("bd,bdr->br", q, A), Bm), dim=-1)  # (B, D)
    return q, q_hat, torch.sigmoid(out[:, -1])


@pytest.mark.parametrize("scale,below", [(1.0, True), (10 ** 4.2, True), (10 ** 4.6, False), (10 ** 5.0, False)],
                         ids=["init", "about-1deg", "about-5deg", "about-35deg"])
def test_authors_edge_equals_their_formula_values_and_lambda_gradient(scale, below):
    """At initialisation (scale 1: proposals within 1e-3 deg of q) and with the output layer scaled up
    (proposals at ~1 deg, below the 1.81 deg clamp angle, and at ~4 deg / ~25 deg, above it): the option's
    output and the gradient of lambda's logit equal the authors' formula; exact slerp is untouched."""
    torch.manual_seed(0)
    dim, target = 24, F.normalize(torch.randn(24), dim=0)  # (D,) a fixed direction to pull towards
    h = torch.randn(6, dim) * 3  # (B, D)
    cal = SphericalQueryCalibrator(dim, rank=4, hidden=16, slerp_edge="authors")
    with torch.no_grad():
        cal.hyper[-1].weight.mul_(scale)  # A, B grow with scale: the proposal's angle with scale^2
    out = cal(h)
    deg = out.omega * 180 / math.pi  # (B,)
    assert bool((deg < 1.81).all() if below else (deg > 1.81).all()), deg  # the side of the clamp angle
    (out.query @ target).sum().backward()
    grad_option = cal.hyper[-1].bias.grad[-1].item()  # d/d(lambda logit)

    cal.zero_grad()
    q, q_hat, lam = _factored(cal, h)
    theirs = _theirs(q, q_hat, lam)  # (B, D)
    (theirs @ target).sum().backward()
    grad_theirs = cal.hyper[-1].bias.grad[-1].item()
    torch.testing.assert_close(out.query, theirs.detach(), atol=1e-7, rtol=0)
    assert grad_option == pytest.approx(grad_theirs, rel=1e-5, abs=1e-12)

    # Below the clamp the result leaves the sphere by lambda (1 - lambda) w0^2 / 2 (a Taylor expansion of
    # sin a + sin b - sin(a + b) at w0 = arccos 0.9995): 2.26e-5 at lambda = sigmoid(-3).
    w0 = math.acos(0.9995)
    small = deg < 1.81
    excess = out.query[small].norm(dim=-1) - 1  # (b,)
    predicted = out.lam[small] * (1 - out.lam[small]) * w0 ** 2 / 2  # (b,) at q_hat = q
    if scale == 1.0:
        torch.testing.assert_close(excess, predicted, rtol=2e-2, atol=2e-7)
        assert excess.min() > 2e-5  # the 1 + 2.2e-5
    elif below:
        assert (excess.abs() > 1e-6).all()  # off the sphere below the clamp angle, whatever the angle
    else:
        torch.testing.assert_close(out.query.norm(dim=-1), torch.ones(6), atol=1e-5, rtol=0)  # above it: slerp

    # Exact slerp (the default, tiny-cpu's) is what it was: calibrator.slerp on the same q, q_hat, lambda.
    exact = SphericalQueryCalibrator(dim, rank=4, hidden=16)
    exact.load_state_dict(cal.state_dict())
    assert exact.config.slerp_edge == "exact"
    with torch.no_grad():
        torch.testing.assert_close(exact(h).query, slerp(q, q_hat, lam), atol=0, rtol=0)
        torch.testing.assert_close(exact(h).query.norm(dim=-1), torch.ones(6), atol=1e-6, rtol=0)


def test_slerp_edge_is_checked():
    with pytest.raises(ValueError, match="slerp_edge"):
        CalibratorConfig(dim=4, slerp_edge="clamped")
    assert CalibratorConfig(dim=4).slerp_edge == "exact"
