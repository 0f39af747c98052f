"""Continuous normalising flows and the planar flow: traces, densities, round trips, gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from neuralode.models.cnf import (
    CNF,
    ConcatSquashMLP,
    PlanarCNFDynamics,
    PlanarFlow,
    standard_normal_log_prob,
    trace_exact,
    trace_hutchinson,
)
from neuralode.nn import sample_probe

D64 = torch.float64


def _scaled(dynamics: nn.Module, factor: float) -> nn.Module:
    """Scale a randomly initialised vector field so that the flow is far from the identity."""
    with torch.no_grad():
        for p in dynamics.parameters():
            p.mul_(factor)
    return dynamics


def _dynamics(kind: str, dim: int) -> nn.Module:
    if kind == "planar":
        return PlanarCNFDynamics(dim, width=6, hidden=8).double()
    return ConcatSquashMLP(dim, (8, 8)).double()


class Linear(nn.Module):
    """f(t, z) = z A^T: every quantity of the CNF is known in closed form."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a.clone())

    def forward(self, t, z):
        return z @ self.a.T


@pytest.mark.parametrize("kind", ["planar", "mlp"])
def test_exact_trace_and_frobenius_equal_those_of_the_full_jacobian(kind):
    torch.manual_seed(0)
    f = _scaled(_dynamics(kind, 3), 2.0)
    z = torch.randn(4, 3, dtype=D64, requires_grad=True)
    t = torch.tensor(0.3, dtype=D64)
    trace, frob = trace_exact(f(t, z), z)
    jac = torch.autograd.functional.jacobian(lambda x: f(t, x), z)  # (N, D, N, D)
    blocks = torch.stack([jac[n, :, n, :] for n in range(4)])
    torch.testing.assert_close(trace, blocks.diagonal(dim1=1, dim2=2).sum(-1))
    torch.testing.assert_close(frob, blocks.pow(2).sum((1, 2)))
    # Samples do not interact: off-diagonal blocks vanish, which the per-sample trace relies on.
    off = jac.clone()
    for n in range(4):
        off[n, :, n, :] = 0
    assert off.abs().max() == 0


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_hutchinson_is_unbiased_for_trace_and_frobenius(probe):
    torch.manual_seed(1)
    f = _scaled(_dynamics("mlp", 3), 2.0)
    t = torch.tensor(0.5, dtype=D64)
    z = torch.randn(2, 3, dtype=D64)
    exact_tr, exact_fr = trace_exact(f(t, z.requires_grad_(True)), z)
    n_probes = 4000
    zr = z.detach().repeat(n_probes, 1).requires_grad_(True)  # one probe per copy, one vjp in all
    eps = sample_probe(zr, probe)
    est_tr, est_fr = trace_hutchinson(f(t, zr), zr, eps)
    for est, exact in ((est_tr, exact_tr), (est_fr, exact_fr)):
        est = est.detach().view(n_probes, 2)
        mean, sem = est.mean(0), est.std(0) / math.sqrt(n_probes)
        # Five standard errors: a false failure has probability below 1e-6 per sample.
        assert torch.all((mean - exact.detach()).abs() < 5 * sem + 1e-12), (mean, exact, sem)


def test_density_of_a_random_cnf_integrates_to_one():
    torch.manual_seed(2)
    cnf = CNF(_scaled(PlanarCNFDynamics(2, width=8, hidden=16), 3.0), 2, rtol=1e-6, atol=1e-6)
    n = 121
    grid = torch.linspace(-8.0, 8.0, n)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    points = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    with torch.no_grad():
        out = cnf(points)
    density = out.log_prob.exp().reshape(n, n)
    mass = torch.trapezoid(torch.trapezoid(density, grid), grid)
    assert abs(mass.item() - 1.0) < 0.02
    # The flow is far from the identity, so the check is not that of the base density.
    assert out.delta_log_prob.abs().mean() > 0.05


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_sample_then_log_prob_round_trip(trace):
    torch.manual_seed(3)
    cnf = CNF(_scaled(_dynamics("mlp", 2), 2.0), 2, trace=trace, rtol=1e-9, atol=1e-10, gradient="direct")
    z = torch.randn(6, 2, dtype=D64)
    probe = sample_probe(z, "rademacher")
    with torch.no_grad():
        x, log_px = cnf.sample(z=z, return_log_prob=True, probe=probe)
        out = cnf(x, probe=probe)  # the same probe on the same (reversed) trajectory
    torch.testing.assert_close(out.z, z, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.log_prob, log_px, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.log_prob, standard_normal_log_prob(z) - out.delta_log_prob, rtol=1e-6, atol=1e-7)
    assert (x - z).abs().max() > 1e-2  # the flow moved the points


def test_linear_flow_matches_closed_form_density_and_regularisers():
    # dz/dt = A z on [0, 1]: x = e^A z, log p(x) = log N(z) - tr(A),
    # frobenius = ||A||_F^2, kinetic = int_0^1 ||A e^{At} z||^2 dt.
    a = torch.tensor([[0.3, -1.0], [0.7, -0.2]], dtype=D64)
    cnf = CNF(Linear(a), 2, rtol=1e-10, atol=1e-10, kinetic=True, frobenius=True)
    z = torch.randn(5, 2, dtype=D64, generator=torch.Generator().manual_seed(4))
    x = z @ torch.linalg.matrix_exp(a).T
    with torch.no_grad():
        out = cnf(x)
    torch.testing.assert_close(out.z, z)
    torch.testing.assert_close(out.log_prob, standard_normal_log_prob(z) - torch.trace(a))
    torch.testing.assert_close(out.frobenius, torch.full((5,), a.pow(2).sum().item(), dtype=D64))
    ts = torch.linspace(0, 1, 2001, dtype=D64)
    flows = a @ torch.linalg.matrix_exp(a * ts[:, None, None])  # (T, 2, 2): A e^{At}
    speed = (z @ flows.transpose(1, 2)).pow(2).sum(-1)  # (T, N)
    torch.testing.assert_close(out.kinetic, torch.trapezoid(speed, ts, dim=0), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_gradients_agree_across_strategies(trace):
    torch.manual_seed(5)
    dyn = _scaled(PlanarCNFDynamics(2, width=3, hidden=4).double(), 2.0)
    x = torch.randn(4, 2, dtype=D64)
    probe = sample_probe(x, "gaussian")
    grads = {}
    for gradient in ("direct", "adjoint", "checkpoint"):
        cnf = CNF(dyn, 2, trace=trace, rtol=1e-9, atol=1e-9, gradient=gradient, kinetic=True, frobenius=True)
        dyn.zero_grad()
        out = cnf(x, probe=probe)
        loss = -out.log_prob.mean() + 0.1 * out.kinetic.mean() + 0.1 * out.frobenius.mean()
        loss.backward()
        grads[gradient] = torch.cat([p.grad.reshape(-1) for p in dyn.parameters()])
        if gradient != "direct":
            assert cnf.last_stats["nfe_backward"] > 0
    assert grads["direct"].abs().max() > 1e-3
    torch.testing.assert_close(grads["adjoint"], grads["direct"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads["checkpoint"], grads["direct"], rtol=1e-7, atol=1e-9)


def test_cnf_default_gradient_is_adjoint_and_float32_trains():
    torch.manual_seed(6)
    cnf = CNF(ConcatSquashMLP(2, (8,)), 2, trace="hutchinson")
    assert cnf.gradient == "adjoint"
    loss = -cnf.log_prob(torch.randn(16, 2)).mean()
    loss.backward()
    grads = [p.grad for p in cnf.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert cnf.last_stats["nfe_backward"] > 0


def test_planar_flow_log_det_matches_autograd_jacobian():
    torch.manual_seed(7)
    flow = PlanarFlow(3, depth=4).double()
    with torch.no_grad():  # large, adversarial u: w^T u << -1 would make a layer non-invertible
        flow.u.copy_(-5.0 * flow.w / flow.w.norm(dim=1, keepdim=True) * 3.0)
        flow.b.normal_()
    assert torch.all((flow.w * flow.u_hat()).sum(1) > -1.0)
    z = torch.randn(5, 3, dtype=D64)
    x, log_det = flow(z)
    for n in range(5):
        jac = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0][0], z[n])
        torch.testing.assert_close(log_det[n], torch.linalg.slogdet(jac)[1])
    xs, log_q = flow.sample(z=z)
    torch.testing.assert_close(log_q, standard_normal_log_prob(z) - log_det)


def test_errors_name_the_argument():
    dyn = ConcatSquashMLP(2, (4,))
    with pytest.raises(ValueError, match="trace"):
        CNF(dyn, 2, trace="stochastic")
    with pytest.raises(ValueError, match="t0 and t1"):
        CNF(dyn, 2, t0=1.0, t1=1.0)
    with pytest.raises(TypeError, match="dynamics"):
        CNF(lambda t, z: z, 2)
    cnf = CNF(dyn, 2)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 2\)"):
        cnf.log_prob(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="exactly one of n"):
        cnf.sample()
    with pytest.raises(ValueError, match="probe must be"):
        CNF(dyn, 2, trace="hutchinson").log_prob(torch.zeros(3, 2), probe=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="activation"):
        ConcatSquashMLP(2, (4,), activation="relu")


@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_log_prob_and_sample_under_inference_mode_equal_no_grad(trace):
    """The trace's vector-Jacobian product inside the field works under torch.inference_mode() (it raised
    "element 0 of tensors does not require grad": enable_grad does not lift inference mode)."""
    torch.manual_seed(0)
    cnf = CNF(ConcatSquashMLP(2, (16,)), 2, trace=trace)
    x = torch.randn(4, 2)
    results = []
    for mode in (torch.no_grad, torch.inference_mode):
        torch.manual_seed(1)
        with mode():
            results.append((cnf.log_prob(x), cnf.sample(3)))
    for a, b in zip(*results):
        torch.testing.assert_close(a.clone(), b.clone(), rtol=0.0, atol=0.0)
