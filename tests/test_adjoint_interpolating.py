"""Adjoint(interpolate="checkpoint"): y(t) for the backward solve from square-root checkpoints and replayed
segments instead of the whole forward dense output (issue 13, item 3)."""

from __future__ import annotations

import functools
import math

import pytest
import torch

import neuralode
from neuralode.gradients import adjoint as adjoint_module

F64 = torch.float64


class Field(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()

    def forward(self, t, y):
        return self.net(y) - 2.0 * y + torch.sin(3 * t)


def _gradients(field, y0, t, gradient, **kwargs):
    sol = neuralode.solve(field, y0, t, gradient=gradient, **kwargs)
    inputs = (y0, *field.parameters())
    return sol, torch.autograd.grad((sol.ys ** 2).sum(), inputs)


@pytest.mark.parametrize("method, options", [("dopri5", None), ("tsit5", {"jump_t": [1.3]}),
                                             ("rk4", {"step_size": 0.01, "interp": "cubic"})])
def test_checkpointed_interpolation_matches_the_whole_dense_output(method, options, monkeypatch):
    field = Field()
    y0 = torch.randn(4, 3, dtype=F64, requires_grad=True)
    t = torch.linspace(0.0, 3.0, 7, dtype=F64)
    kwargs = dict(method=method, rtol=1e-9, atol=1e-10, options=options)
    whole, grads_whole = _gradients(field, y0, t, neuralode.Adjoint(interpolate=True), **kwargs)

    replays, held = [], []
    original = adjoint_module._ReplayedForward._replay

    def counting(self, i):
        replays.append(i)
        held.append(len(self.held))
        return original(self, i)

    monkeypatch.setattr(adjoint_module._ReplayedForward, "_replay", counting)
    checkpointed, grads = _gradients(field, y0, t, neuralode.Adjoint(interpolate="checkpoint"), **kwargs)
    for a, b in zip(grads, grads_whole):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    steps = whole.stats["n_accepted"]
    assert steps >= 60
    # O(sqrt(N)) segments, each replayed once as the backward solve walks from the end to the start, with at
    # most three held at a time; the replays cost about one more forward solve.
    assert len(set(replays)) == len(replays) <= 2 * math.sqrt(2 * steps) + 2
    assert max(held) <= 3
    extra = checkpointed.stats["nfe_backward"] - whole.stats["nfe_backward"]
    assert 0.8 * whole.stats["nfe"] <= extra <= 1.3 * whole.stats["nfe"]


def test_checkpointed_interpolation_refuses_what_it_cannot_replay():
    y0 = torch.ones(2, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    for method in ("adams", "auto"):
        with pytest.raises(ValueError, match="cannot be replayed from a checkpoint"):
            neuralode.solve(lambda t, y: -y, y0, t, method=method, gradient=neuralode.Adjoint(interpolate="checkpoint"))
    with pytest.raises(ValueError, match="must be False, True or 'checkpoint'"):
        neuralode.solve(lambda t, y: -y, y0, t, gradient=neuralode.Adjoint(interpolate="yes"))


class _StiffPair(torch.nn.Module):
    """y0' = -k (y0 - cos(w t)) - w sin(w t) + 0.1 y1, y1' = -0.5 y1 + y0^2 (k = 2000): y0 on a slow manifold."""

    def __init__(self):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(2e3, dtype=torch.float64))
        self.w = torch.nn.Parameter(torch.tensor(1.3, dtype=torch.float64))

    def forward(self, t, y):
        return torch.stack([-self.k * (y[0] - torch.cos(self.w * t)) - self.w * torch.sin(self.w * t) + 0.1 * y[1],
                            -0.5 * y[1] + y[0] ** 2])


def _stiff_pair_gradient(method, rtol, gradient):
    field = _StiffPair()
    solution = neuralode.solve(field, torch.tensor([1.0, 0.5], dtype=torch.float64),
                               torch.tensor([0.0, 0.37, 1.3, 2.9, 4.0], dtype=torch.float64), method=method,
                               rtol=rtol, atol=rtol, gradient=gradient)
    solution.ys.pow(2).sum().backward()
    return torch.stack([field.k.grad, field.w.grad])


@functools.lru_cache(maxsize=1)
def _stiff_pair_reference():
    """The exact discrete gradient at rtol 1e-10 (radau5 and rodas5p agree on it to 4e-9 relative): one for both
    methods' cases."""
    return _stiff_pair_gradient("radau5", 1e-10, "direct")


@pytest.mark.parametrize("method", ["rodas5p", "radau5"])
def test_a_stiff_backward_solve_controls_the_parameter_adjoint_by_default(method):
    # The seminorm leaves a_theta out of the backward error norm; a stiff method's steps, as long as a's slow
    # manifold allows, then integrate it badly: 16% (rodas5p) and 1% (radau5) off at rtol 1e-8, with no warning.
    # Implicit and Rosenbrock backward methods default to the full norm (2e-4 and 5e-4).
    reference = _stiff_pair_reference()
    default = _stiff_pair_gradient(method, 1e-8, neuralode.Adjoint(interpolate=True))
    seminorm = _stiff_pair_gradient(method, 1e-8, neuralode.Adjoint(interpolate=True, seminorm=True))
    assert float(((default - reference).abs() / reference.abs()).max()) < 2e-3
    assert float(((seminorm - reference).abs() / reference.abs()).max()) > 5e-3


@pytest.mark.parametrize("interpolate", [True, "checkpoint"])
def test_a_retained_graph_backs_up_twice_with_the_same_gradient(interpolate):
    """backward(retain_graph=True) then backward(): the second pass needs the forward dense output again (it was
    dropped after the first, and the second raised AttributeError); the evaluations count per pass."""
    W = torch.tensor([[-0.3, 1.0], [-0.8, 0.1]], dtype=F64, requires_grad=True)
    y0 = torch.tensor([1.0, 0.5], dtype=F64, requires_grad=True)
    sol = neuralode.solve(lambda t, y: torch.tanh(W @ y), y0, torch.tensor([0.0, 0.5, 1.0], dtype=F64),
                          gradient=neuralode.Adjoint(interpolate=interpolate), adjoint_params=(W,))
    loss = sol.ys.pow(2).sum()
    first = torch.autograd.grad(loss, (y0, W), retain_graph=True)
    nfe_first = sol.stats["nfe_backward"]
    second = torch.autograd.grad(loss, (y0, W))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0.0, atol=0.0)
    if interpolate is True:
        assert sol.stats["nfe_backward"] == 2 * nfe_first
    else:   # (the first pass's last three segments are still held, so the second replays less)
        assert 0 < sol.stats["nfe_backward"] - nfe_first <= nfe_first


@pytest.mark.parametrize("method", ["kvaerno5", "kencarp4", "rodas5p"])
@pytest.mark.parametrize("interpolate", [True, False])
def test_the_implicit_backward_newton_leaves_the_parameter_cotangents_out(method, interpolate, monkeypatch):
    """The parameter cotangents' derivative depends on y and a only: an implicit backward step solves for those
    (2 n or n unknowns), not for the p parameter cotangents too (a network's p made every Newton system n + p; a
    Rosenbrock step's linear systems likewise)."""
    import neuralode.solvers.implicit as implicit_module
    import neuralode.solvers.rosenbrock as rosenbrock_module
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    p = sum(x.numel() for x in net.parameters())

    def stiff(t, y):
        return -50.0 * y

    if method == "kencarp4":
        field = neuralode.SplitField(explicit=lambda t, y: net(y), implicit=stiff)
    else:
        field = lambda t, y: net(y) + stiff(t, y)   # noqa: E731
    y0 = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0, 1, 4, dtype=torch.float64)

    def gradient(strategy):
        sol = neuralode.solve(field, y0, t, method=method, rtol=1e-9, atol=1e-11, gradient=strategy,
                              adjoint_params=tuple(net.parameters()))
        return torch.autograd.grad(sol.ys.pow(2).sum(), (y0, *net.parameters()))

    sizes = []
    build = implicit_module.build_system
    for module in (implicit_module, rosenbrock_module):
        monkeypatch.setattr(module, "build_system",
                            lambda mode, C, J, *rest: sizes.append(J.shape[-1]) or build(mode, C, J, *rest))
    adjoint = gradient(neuralode.Adjoint(interpolate=interpolate))
    backward_sizes = set(sizes[-3:])
    assert backward_sizes == {3 if interpolate else 6}, (backward_sizes, p)
    direct = gradient("direct")
    for a, d in zip(adjoint, direct):
        torch.testing.assert_close(a, d, rtol=1e-6, atol=1e-9)
