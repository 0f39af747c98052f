"""Hamiltonian fields from learnt energies: neuralode.nn.Hamiltonian and SeparableHamiltonian.

The field of a known energy is the closed form; a learnt separable one runs under every gradient strategy and the
symplectic methods (their gradients equal to rounding), and a general one is refused by those methods.
"""

import math

import pytest
import torch

import neuralode
from neuralode.nn import Hamiltonian, SeparableHamiltonian

F64 = torch.float64


def _pendulum_energy(q, p):
    return (p * p).sum(-1) / 2 - torch.cos(q).sum(-1)


def test_the_field_of_a_known_energy_is_the_closed_form():
    """H = p^2/2 - cos q: (dq/dt, dp/dt) = (p, -sin q), with and without grad mode, both classes."""
    generator = torch.Generator().manual_seed(0)
    q, p = torch.randn(5, 2, dtype=F64, generator=generator), torch.randn(5, 2, dtype=F64, generator=generator)
    general = Hamiltonian(_pendulum_energy)
    separable = SeparableHamiltonian(lambda q: -torch.cos(q).sum(-1))
    with_kinetic = SeparableHamiltonian(lambda q: -torch.cos(q).sum(-1), kinetic=lambda p: (p * p).sum(-1) / 2)
    for field in (general, separable, with_kinetic):
        for grad_mode in (True, False):
            with torch.set_grad_enabled(grad_mode):
                dq, dp = field(torch.tensor(0.0), (q, p))
            assert torch.allclose(dq, p) and torch.allclose(dp, -torch.sin(q))
            if not grad_mode:   # (no graph is kept where no gradient can be asked for)
                assert not dq.requires_grad and not dp.requires_grad
    assert torch.allclose(separable.hamiltonian(q, p), _pendulum_energy(q, p))


def test_a_symplectic_solve_keeps_the_learnt_energy():
    """A separable energy with an MLP potential, integrated by yoshida4 over 600 steps: the energy error stays
    bounded (as large in the second half as in the first) and small."""
    torch.manual_seed(0)
    potential = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()
    field = SeparableHamiltonian(potential)
    q0, p0 = torch.randn(3, 2, dtype=F64), torch.randn(3, 2, dtype=F64)
    t = torch.linspace(0, 60, 601, dtype=F64)
    with torch.no_grad():
        sol = neuralode.solve(field, (q0, p0), t, method="yoshida4", options={"step_size": 0.1})
        energy = field.hamiltonian(*sol.ys)
    error = (energy - energy[0]).abs()
    assert error[300:].max() <= 1.01 * error[:300].max() and error.max() < 1e-4


@pytest.mark.parametrize("method, options", [("leapfrog", {"step_size": 0.05}), ("tsit5", None)])
def test_every_gradient_strategy_differentiates_the_field(method, options):
    """Parameters of the potential and the kinetic energy, and y0, get backpropagation's gradient from checkpoint
    (and reversible, for the leapfrog) to rounding, and from the adjoint to its tolerance."""
    torch.manual_seed(1)
    potential = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    kinetic = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Softplus(), torch.nn.Linear(8, 1)).double()
    field = SeparableHamiltonian(potential, kinetic)
    q0 = torch.randn(4, 2, dtype=F64, requires_grad=True)
    p0 = torch.randn(4, 2, dtype=F64)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    strategies = ["direct", "checkpoint", "adjoint"] + (["reversible"] if method == "leapfrog" else [])
    grads = {}
    for gradient in strategies:
        sol = neuralode.solve(field, (q0, p0), t, method=method, options=options, gradient=gradient,
                              rtol=1e-9, atol=1e-9)
        loss = sol.ys[0].pow(2).sum() + sol.ys[1].sum()
        grads[gradient] = torch.autograd.grad(loss, [q0, *field.parameters()], allow_unused=True)
    for gradient in strategies[1:]:
        for a, b in zip(grads["direct"], grads[gradient]):
            if a is None:
                continue
            bound = 1e-5 if gradient == "adjoint" and method == "leapfrog" else 1e-7
            assert torch.allclose(a, b, rtol=bound, atol=bound), (gradient, (a - b).abs().max())


def test_a_general_energy_is_not_separable_for_the_symplectic_methods():
    coupled = Hamiltonian(lambda q, p: (p * p).sum(-1) / 2 + (q * q).sum(-1) / 2 + 0.3 * (q * p).sum(-1))
    y0 = (torch.ones(2, 1, dtype=F64), torch.zeros(2, 1, dtype=F64))
    with pytest.raises(ValueError, match="needs a separable field"):
        neuralode.solve(coupled, y0, torch.tensor([0.0, 1.0], dtype=F64), method="leapfrog", options={"step_size": 0.1})
    sol = neuralode.solve(coupled, y0, torch.tensor([0.0, 1.0], dtype=F64), method="tsit5")
    energy = coupled.hamiltonian(*sol.ys)
    assert abs(float(energy[-1, 0] - energy[0, 0])) < 1e-6 and not math.isnan(float(energy[-1, 0]))


def test_bad_arguments():
    with pytest.raises(TypeError, match="energy must be callable"):
        Hamiltonian(3)
    with pytest.raises(TypeError, match="give the potential energy"):
        SeparableHamiltonian(None)
    with pytest.raises(TypeError, match="must be a pair"):
        Hamiltonian(_pendulum_energy)(0.0, torch.ones(2))
    with pytest.raises(TypeError, match="energy must be a real floating-point tensor.*got NoneType"):
        Hamiltonian(lambda q, p: None)(0.0, (torch.ones(1), torch.ones(1)))
    with pytest.raises(TypeError, match="got a tensor of dtype torch.int64"):
        Hamiltonian(lambda q, p: torch.tensor(1))(0.0, (torch.ones(1), torch.ones(1)))
