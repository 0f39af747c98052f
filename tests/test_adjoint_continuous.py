"""The adjoint's backward pass is one solve across all output times (issue "Faster than diffrax", item 1).

At each output time t_i the solve lands on t_i, resets y to its forward value and adds dL/dy(t_i) to
the adjoint; the step size carries across, so no interval pays for a starting-step search and a
small first step again.
"""

from __future__ import annotations

import pytest
import torch

import neuralode


def _mlp_problem(n_outputs, dtype=torch.float64):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8)).to(dtype)
    y0 = torch.randn(16, 8, dtype=dtype, requires_grad=True)
    return net, y0, torch.linspace(0, 1, n_outputs, dtype=dtype)


def test_backward_does_not_restart_at_every_output_time():
    net, y0, t = _mlp_problem(10)
    sol = neuralode.solve(lambda t, y: net(y), y0, t, method="dopri5", rtol=1e-5, atol=1e-5, gradient="adjoint",
                          adjoint_params=tuple(net.parameters()))
    sol.ys.pow(2).mean().backward()
    # Restarting per interval cost each of the 9 intervals a starting-step search (2 evaluations) and a
    # small first step: 126 evaluations here. One solve lands each interval in about one step of 6
    # evaluations, plus one evaluation after each jump.
    assert sol.stats["nfe_backward"] <= 7 * 9 + 10, sol.stats


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3", "dopri8", "adams"])
@pytest.mark.parametrize("decreasing", [False, True])
def test_continuous_backward_gradient_matches_direct(method, decreasing):
    net, y0, t = _mlp_problem(7)
    if decreasing:
        t = t.flip(0)
    params = tuple(net.parameters())
    grads = {}
    for gradient, rtol in (("direct", 1e-12), ("adjoint", 1e-10)):
        for p in params + (y0,):
            p.grad = None
        m = "dopri8" if gradient == "direct" else method
        sol = neuralode.solve(lambda t, y: net(y), y0, t, method=m, rtol=rtol, atol=rtol, gradient=gradient,
                              adjoint_params=params)
        (sol.ys[1:] * torch.linspace(1, 2, t.numel() - 1, dtype=t.dtype)[:, None, None]).pow(2).sum().backward()
        grads[gradient] = torch.cat([y0.grad.reshape(-1)] + [p.grad.reshape(-1) for p in params])
    error = (grads["adjoint"] - grads["direct"]).norm() / grads["direct"].norm()
    assert error < 1e-6, error


def test_a_failure_of_the_backward_solve_says_so():
    """A MaxStepsError from loss.backward() read like the forward solve's; it now names the backward solve and
    its settings, and keeps its class and time."""
    y0 = torch.tensor([1.0, 0.5], dtype=torch.float64, requires_grad=True)
    W = torch.tensor([[-0.3, 5.0], [-5.0, 0.1]], dtype=torch.float64, requires_grad=True)
    sol = neuralode.solve(lambda t, y: W @ y, y0, torch.tensor([0.0, 3.0], dtype=torch.float64),
                          gradient=neuralode.Adjoint(rtol=1e-12, atol=1e-12), adjoint_params=(W,), rtol=1e-8,
                          atol=1e-8, options={"max_num_steps": 125})
    assert sol.status == "success"
    expected = (r"the adjoint's backward solve failed: reached the maximum number of steps "
                r"\(max_num_steps=125\).*Adjoint")
    with pytest.raises(neuralode.MaxStepsError, match=expected) as info:
        sol.ys.sum().backward()
    assert 0.0 < info.value.t < 3.0


def test_a_failed_backsolve_points_at_the_strategies_that_avoid_it():
    """A backsolve's backward solve that collapses where the forward one succeeded (Robertson: y re-integrated
    backwards reached 6e4) blamed only the field and the tolerances; it now names the strategies that do not
    re-integrate y: the interpolating adjoint (joint solves) and checkpointing (per-sample solves have only
    that). The interpolating adjoint's own failures do not send the user to itself."""
    import types

    from neuralode.gradients.base import names_the_backward_solve

    @names_the_backward_solve
    def backward(ctx):
        raise neuralode.StepSizeUnderflowError("step size underflow at t=39.99", 39.99)

    def message(ctx):
        with pytest.raises(neuralode.StepSizeUnderflowError) as info:
            backward(ctx)
        assert info.value.t == 39.99
        return str(info.value)

    backsolve = message(types.SimpleNamespace(strategy=neuralode.Adjoint()))
    assert "Adjoint(interpolate=True) takes y from the forward solve" in backsolve
    assert "gradient='checkpoint'" in backsolve
    interpolating = message(types.SimpleNamespace(strategy=neuralode.Adjoint(interpolate=True)))
    assert "interpolate=True" not in interpolating and "backward solve failed" in interpolating
    per_sample = message(types.SimpleNamespace(run=types.SimpleNamespace(strategy_name="adjoint")))
    assert "gradient='checkpoint' backpropagates" in per_sample and "interpolate=True" not in per_sample
