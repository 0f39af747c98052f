"""ImplicitAdjoint: a steady state's gradient by the implicit function theorem, against closed forms and finite
differences."""

import pytest
import torch

import neuralode

D = torch.float64


def _deq():
    torch.manual_seed(0)
    W = (0.5 * torch.randn(4, 4, dtype=D)).requires_grad_()
    b = torch.randn(4, dtype=D).requires_grad_()
    return W, b


def _steady(W, b, y0, gradient, rtol=1e-10, atol=1e-12):
    def f(t, y):
        return torch.tanh(y @ W.T + b) - y
    event = neuralode.steady_state_event(f, rtol=rtol, atol=atol)
    return neuralode.solve(f, y0, torch.tensor([0.0, 100.0], dtype=D), events=[event], gradient=gradient,
                           adjoint_params=(W, b), rtol=rtol, atol=atol)


@pytest.mark.parametrize("linear_solver", ["dense", "batched", "krylov"])
def test_gradient_matches_finite_differences_of_the_steady_state(linear_solver):
    W, b = _deq()
    y0 = torch.zeros(3, 4, dtype=D)
    sol = _steady(W, b, y0, neuralode.ImplicitAdjoint(linear_solver=linear_solver))
    assert sol.status == "event"
    grad_W, grad_b = torch.autograd.grad((sol.event_y ** 2).sum(), (W, b))
    with torch.no_grad():
        for param, grad, index in ((b, grad_b, (1,)), (W, grad_W, (2, 0))):
            step, original = 1e-6, param[index].item()
            values = []
            for sign in (1, -1):
                param[index] = original + sign * step
                values.append((_steady(W, b, y0, "direct", 1e-12, 1e-13).event_y ** 2).sum().item())
            param[index] = original
            numeric = (values[0] - values[1]) / (2 * step)
            assert abs(grad[index].item() - numeric) <= 1e-6 * max(1.0, abs(numeric)), (linear_solver, index)


def test_a_linear_steady_state_in_closed_form():
    # y' = A y + c theta: y* = -A^{-1} c theta, d(w . y*)/dtheta = -w^T A^{-1} c
    A = torch.tensor([[-2.0, 0.5], [0.3, -1.0]], dtype=D)
    c = torch.tensor([1.0, -2.0], dtype=D)
    w = torch.tensor([0.7, 1.3], dtype=D)
    theta = torch.tensor(1.5, dtype=D, requires_grad=True)

    def f(t, y):
        return A @ y + c * theta
    sol = neuralode.solve(f, torch.zeros(2, dtype=D), torch.tensor([0.0, 60.0], dtype=D),
                          gradient=neuralode.ImplicitAdjoint(), adjoint_params=(theta,), rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(w @ sol.ys[-1], theta)
    exact = -(w @ torch.linalg.solve(A, c))
    assert abs(grad.item() - exact.item()) < 1e-12


def test_y0_gets_only_the_start_outputs_cotangent():
    W, b = _deq()
    y0 = torch.full((2, 4), 0.1, dtype=D, requires_grad=True)

    def f(t, y):
        return torch.tanh(y @ W.T + b) - y
    sol = neuralode.solve(f, y0, torch.tensor([0.0, 100.0], dtype=D),
                          events=[neuralode.steady_state_event(f, rtol=1e-9, atol=1e-11)],
                          gradient=neuralode.ImplicitAdjoint(), adjoint_params=(W, b), rtol=1e-10, atol=1e-12)
    (3 * sol.ys[0].sum() + sol.event_y.sum()).backward()
    assert torch.equal(y0.grad, torch.full_like(y0, 3.0))


def test_args_tensors_get_gradients():
    A = torch.tensor([[-2.0, 0.5], [0.3, -1.0]], dtype=D)
    c = torch.tensor([1.0, -2.0], dtype=D, requires_grad=True)
    sol = neuralode.solve(lambda t, y, c: A @ y + c, torch.zeros(2, dtype=D), torch.tensor([0.0, 60.0], dtype=D),
                          args=c, gradient=neuralode.ImplicitAdjoint(), rtol=1e-10, atol=1e-12)
    sol.ys[-1].sum().backward()
    torch.testing.assert_close(c.grad, -torch.linalg.solve(A.T, torch.ones(2, dtype=D)), rtol=1e-10, atol=1e-12)


def test_the_thresholds_come_from_the_fired_steady_state_event():
    W, b = _deq()
    y0 = torch.zeros(4, dtype=D)

    def f(t, y):
        return torch.tanh(W @ y + b) - y
    loose = neuralode.steady_state_event(f, rtol=1e-3, atol=1e-4)
    t = torch.tensor([0.0, 100.0], dtype=D)
    # the solve's own tolerances (1e-10) are far tighter than the event's: its thresholds decide
    sol = neuralode.solve(f, y0, t, events=[loose], gradient=neuralode.ImplicitAdjoint(), adjoint_params=(W, b),
                          rtol=1e-10, atol=1e-12)
    sol.event_y.sum().backward()
    assert b.grad is not None and bool(torch.isfinite(b.grad).all())
    with pytest.raises(ValueError, match=r"not a steady state.*ImplicitAdjoint\(rtol=\.\.\., atol=\.\.\.\)"):
        neuralode.solve(f, y0, t, events=[loose], gradient=neuralode.ImplicitAdjoint(rtol=1e-9, atol=1e-12),
                        adjoint_params=(W, b), rtol=1e-10, atol=1e-12)


def test_refusals():
    W, b = _deq()
    y0 = torch.zeros(4, dtype=D)

    def f(t, y):
        return torch.tanh(W @ y + b) - y
    strategy = neuralode.ImplicitAdjoint()
    with pytest.raises(ValueError, match="not a steady state"):
        neuralode.solve(f, y0, torch.tensor([0.0, 1.0], dtype=D), gradient=strategy, adjoint_params=(W, b))
    with pytest.raises(ValueError, match="the start and the end only"):
        neuralode.solve(f, y0, torch.linspace(0, 50, 3, dtype=D), gradient=strategy, adjoint_params=(W, b))
    with pytest.raises(ValueError, match="linear_solver"):
        neuralode.ImplicitAdjoint(linear_solver="lu")
    # a family of steady states (the mean is conserved): J is singular there
    theta = torch.tensor(2.0, dtype=D, requires_grad=True)
    sol = neuralode.solve(lambda t, y: -theta * (y - y.mean()), torch.tensor([1.0, 0.0, 2.0], dtype=D),
                          torch.tensor([0.0, 50.0], dtype=D), gradient=strategy, adjoint_params=(theta,),
                          rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="singular"):
        sol.ys[-1].sum().backward()
    # a failed solve (throw=False) returns the outputs it reached, here y(t0) only: no steady state is differentiated
    start = y0.clone().requires_grad_()
    sol = neuralode.solve(f, start, torch.tensor([0.0, 100.0], dtype=D), gradient=strategy, adjoint_params=(W, b),
                          throw=False, options={"max_num_steps": 3})
    assert sol.status != "success" and sol.ys.shape[0] == 1
    sol.ys[-1].sum().backward()
    assert torch.equal(start.grad, torch.ones_like(start)) and W.grad is None
    with pytest.raises(ValueError, match="torch.func transform"):
        torch.func.grad(lambda b: neuralode.solve(f, y0, torch.tensor([0.0, 100.0], dtype=D), gradient=strategy,
                                                  adjoint_params=(b,)).ys[-1].sum())(b)
