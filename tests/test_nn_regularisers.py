"""Kinetic-energy and Jacobian-Frobenius regularisers (Finlay et al. 2020)."""

import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import torch
from torch import nn

import neuralode
from neuralode.nn import ConcatLinear, ODEBlock, RegularisedDynamics, TimeSequential, regularisation_loss

A = np.array([[-0.4, 1.2, 0.0], [-0.8, 0.1, 0.3], [0.5, 0.0, -0.6]])
T = 1.3


class Linear(nn.Module):
    def __init__(self, a: np.ndarray) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.as_tensor(a))

    def forward(self, t, z):
        return z @ self.a.to(z.dtype).T


def test_kinetic_energy_equals_quadrature_of_the_closed_form_flow():
    z0 = np.array([[1.0, -0.5, 0.25], [0.3, 0.2, -1.0]])
    block = ODEBlock(Linear(A), (0.0, T), rtol=1e-11, atol=1e-12, gradient="direct", kinetic=True)
    block(torch.as_tensor(z0))

    def speed2(s, z):  # ||f(z(s))||^2 with z(s) = expm(s A) z
        return float(np.sum((A @ scipy.linalg.expm(s * A) @ z) ** 2))

    expected = [scipy.integrate.quad(speed2, 0.0, T, args=(z,), epsabs=1e-13, epsrel=1e-12)[0] for z in z0]
    torch.testing.assert_close(block.kinetic_energy, torch.as_tensor(expected, dtype=torch.float64), rtol=1e-8, atol=1e-10)
    assert block.jacobian_frobenius is None


def test_regularisers_are_sizes_when_time_runs_backwards():
    """t = (T, 0): the integrals are over |dt| (they were negative, so a positive weight rewarded large dynamics).
    Running z' = A z from T to 0 is running w' = -A w from 0 to T."""
    z0 = torch.tensor([[1.0, -0.5, 0.25], [0.3, 0.2, -1.0]], dtype=torch.float64)
    backwards = ODEBlock(Linear(A), (T, 0.0), rtol=1e-11, atol=1e-12, gradient="direct", kinetic=True,
                         frobenius=True)
    backwards(z0)
    forwards = ODEBlock(Linear(-A), (0.0, T), rtol=1e-11, atol=1e-12, gradient="direct", kinetic=True)
    forwards(z0)
    torch.testing.assert_close(backwards.kinetic_energy, forwards.kinetic_energy, rtol=1e-8, atol=0)
    assert bool((backwards.jacobian_frobenius > 0).all())


def test_frobenius_is_the_probe_jacobian_product_for_a_fixed_probe():
    # J = A everywhere, so the integral is exactly T * ||eps^T A||^2 per sample.
    z0 = torch.randn(4, 3, dtype=torch.float64)
    eps = torch.randn(4, 3, dtype=torch.float64)
    dyn = RegularisedDynamics(Linear(A), eps, kinetic=False, frobenius=True)
    zeros = torch.zeros(4, dtype=torch.float64)
    sol = neuralode.solve(dyn, (z0, zeros, zeros), torch.tensor([0.0, T], dtype=torch.float64), rtol=1e-10, atol=1e-12)
    expected = T * (eps @ torch.as_tensor(A)).square().sum(1)
    torch.testing.assert_close(sol.ys[2][-1], expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(sol.ys[1][-1], zeros)


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_hutchinson_estimate_averages_to_the_exact_frobenius_norm(probe):
    # Every sample of the batch gets its own probe: n samples = n independent estimates.
    torch.manual_seed(0)
    n = 20_000
    # The integrand ||eps^T A||^2 is constant in time, so any Runge-Kutta step integrates it exactly
    # and loose tolerances (cheap steps for z) do not bias the estimate.
    block = ODEBlock(Linear(A), (0.0, T), rtol=1e-4, atol=1e-6, gradient="direct", frobenius=True, probe=probe)
    block(torch.randn(n, 3, dtype=torch.float64))
    est = block.jacobian_frobenius / T
    exact = float(np.sum(A**2))
    est = est.detach()
    stderr = float(est.std()) / n**0.5
    assert abs(float(est.mean()) - exact) < 4 * stderr
    assert stderr < 0.02 * exact  # the check above is not vacuous


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_regularisation_loss_and_gradients(dtype):
    torch.manual_seed(0)
    field = TimeSequential(ConcatLinear(2, 16), nn.Tanh(), ConcatLinear(16, 2)).to(dtype)
    model = nn.Sequential(nn.Linear(2, 2), ODEBlock(field, kinetic=True, frobenius=True)).to(dtype)
    y = model(torch.randn(5, 2, dtype=dtype))
    block = model[1]
    assert block.kinetic_energy.shape == (5,) and block.jacobian_frobenius.shape == (5,)
    assert block.kinetic_energy.dtype == dtype
    reg = regularisation_loss(model, kinetic=0.1, frobenius=0.2)
    expected = 0.1 * block.kinetic_energy.mean() + 0.2 * block.jacobian_frobenius.mean()
    torch.testing.assert_close(reg, expected)
    (y.square().mean() + reg).backward()
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_copies_drop_the_graph_of_the_last_call():
    import copy
    import pickle

    block = ODEBlock(TimeSequential(ConcatLinear(2, 4), nn.Tanh(), ConcatLinear(4, 2)), kinetic=True, frobenius=True)
    block(torch.randn(3, 2))
    for clone in (copy.deepcopy(block), pickle.loads(pickle.dumps(block))):
        assert clone.kinetic_energy is None and clone.jacobian_frobenius is None
        assert clone.nfe_forward == block.nfe_forward
        clone(torch.randn(3, 2))
        assert clone.kinetic_energy.shape == (3,)
    assert block.kinetic_energy is not None


@pytest.mark.parametrize("gradient", ["direct", "adjoint"])
def test_regularisers_under_inference_mode_equal_no_grad(gradient):
    """The Frobenius term's vjp works under torch.inference_mode() (enable_grad alone does not lift it: it raised
    "element 0 of tensors does not require grad"), with the values of no_grad."""
    torch.manual_seed(0)
    block = ODEBlock(TimeSequential(ConcatLinear(2, 4), nn.Tanh(), ConcatLinear(4, 2)), kinetic=True, frobenius=True,
                     gradient=gradient)
    x = torch.randn(3, 2)
    results = []
    for mode in (torch.no_grad, torch.inference_mode):
        torch.manual_seed(1)   # the same Hutchinson probe
        with mode():
            results.append((block(x), block.kinetic_energy, block.jacobian_frobenius))
    for a, b in zip(*results):
        torch.testing.assert_close(a.clone(), b.clone(), rtol=0.0, atol=0.0)
    assert float(results[1][2].abs().sum()) > 0


def test_regularised_adjoint_gradients_match_direct():
    field = TimeSequential(ConcatLinear(3, 8), nn.Tanh(), ConcatLinear(8, 3)).double()
    x = torch.randn(4, 3, dtype=torch.float64)

    def grads(gradient):
        field.zero_grad()
        torch.manual_seed(1)  # same probe in both solves
        block = ODEBlock(field, rtol=1e-10, atol=1e-12, gradient=gradient, kinetic=True, frobenius=True)
        y = block(x)
        (y.square().sum() + regularisation_loss(block, kinetic=0.5, frobenius=0.5)).backward()
        return [p.grad.clone() for p in field.parameters()]

    for g_adj, g_dir in zip(grads("adjoint"), grads("direct")):
        torch.testing.assert_close(g_adj, g_dir, rtol=1e-6, atol=1e-8)


def test_errors():
    block = ODEBlock(Linear(A), kinetic=True)
    with pytest.raises(ValueError, match="no kinetic value yet: call the model"):
        regularisation_loss(block, kinetic=1.0)
    with pytest.raises(ValueError, match=r"no ODEBlock in the model accumulates the frobenius.*frobenius=True"):
        regularisation_loss(block, frobenius=1.0)
    with pytest.raises(ValueError, match="kinetic must be a non-negative weight"):
        regularisation_loss(block, kinetic=-1.0)
    with pytest.raises(ValueError, match="probe must be a tensor shaped like z"):
        RegularisedDynamics(Linear(A), None, frobenius=True)
