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


# --- the QA round's cases (/tmp/qa61) ------------------------------------------------------------------------------
def test_complex_states_are_solved_in_their_real_form():
    a = torch.tensor([-1 + 2j, -0.5 - 1j], dtype=torch.complex128)
    c = torch.tensor([1 + 1j, 2 - 0.5j], dtype=torch.complex128)
    theta = torch.tensor(0.3, dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 100.0], dtype=D)

    def loss(field, strategy):
        sol = neuralode.solve(field, torch.zeros(2, dtype=torch.complex128), t, gradient=strategy,
                              adjoint_params=(theta,), rtol=1e-11, atol=1e-13)
        return sol.ys[-1].real.sum() + 0.5 * sol.ys[-1].imag.sum()
    # holomorphic: y* = theta c, d/dtheta = sum(Re c) + 0.5 sum(Im c)
    (grad,) = torch.autograd.grad(loss(lambda t, y: a * (y - theta * c), neuralode.ImplicitAdjoint()), theta)
    assert abs(grad.item() - (3.0 + 0.25)) < 1e-9
    # not complex-differentiable (conj): against backpropagation through the solve
    def field(t, y):
        return a * (y - theta * c) - 0.3 * torch.conj(y)
    (implicit,) = torch.autograd.grad(loss(field, neuralode.ImplicitAdjoint()), theta)
    (direct,) = torch.autograd.grad(loss(field, "direct"), theta)
    assert abs(implicit.item() - direct.item()) < 1e-8 * max(1.0, abs(direct.item()))
    with pytest.raises(ValueError, match="real states"):
        loss(field, neuralode.ImplicitAdjoint(linear_solver="krylov"))


def test_batched_blocks_of_coupled_samples_are_refused():
    W, b = _deq()
    x = torch.randn(3, 4, dtype=D)   # (distinct samples: identical ones with a symmetric loss solve alike)

    def coupled(t, y):
        return torch.tanh(y @ W.T + b + x + y.mean(0, keepdim=True)) - y
    sol = neuralode.solve(coupled, torch.zeros(3, 4, dtype=D), torch.tensor([0.0, 100.0], dtype=D),
                          events=[neuralode.steady_state_event(coupled, rtol=1e-9, atol=1e-11)],
                          gradient=neuralode.ImplicitAdjoint(linear_solver="batched"), adjoint_params=(W, b),
                          rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="samples are coupled"):
        sol.event_y.pow(2).sum().backward()


def test_a_sample_still_moving_is_refused():
    # 50 samples y' = -k (y - theta); one is slow: the batch's RMS is steady, that sample is 0.8 from its steady state
    k = torch.ones(50, dtype=D) * 5.0
    k[0] = 0.02
    theta = torch.tensor(1.0, dtype=D, requires_grad=True)

    def field(t, y):
        return -k * (y - theta)
    sol = neuralode.solve(field, torch.zeros(50, dtype=D), torch.tensor([0.0, 100.0], dtype=D),
                          events=[neuralode.steady_state_event(field, rtol=1e-3, atol=1e-4)],
                          gradient=neuralode.ImplicitAdjoint(), adjoint_params=(theta,))
    assert sol.event_y[0] < 0.9   # (its steady state is 1)
    with pytest.raises(ValueError, match="farthest component"):
        sol.event_y.sum().backward()


def test_a_fired_steady_state_event_is_accepted_whichever_side_it_was_located_on():
    for seed in range(12):
        torch.manual_seed(seed)
        W = (0.3 * torch.randn(5, 5, dtype=D)).requires_grad_()
        b = torch.randn(5, dtype=D).requires_grad_()

        def f(t, y):
            return torch.tanh(y @ W.T + b) - y
        sol = neuralode.solve(f, torch.zeros(3, 5, dtype=D), torch.tensor([0.0, 100.0], dtype=D),
                              events=[neuralode.steady_state_event(f, rtol=1e-6, atol=1e-8)],
                              gradient=neuralode.ImplicitAdjoint(), adjoint_params=(W, b))
        sol.event_y.sum().backward()
        assert torch.isfinite(W.grad).all()


def test_inference_and_thresholds_and_the_event_time():
    W, b = _deq()

    def f(t, y):
        return torch.tanh(W @ y + b) - y
    y0 = torch.zeros(4, dtype=D)
    strategy = neuralode.ImplicitAdjoint()
    with torch.no_grad():   # nothing needs a gradient: no steady state is asked for
        neuralode.solve(f, y0, torch.tensor([0.0, 1.0], dtype=D), gradient=strategy, adjoint_params=(W, b))
    # one threshold given keeps the other's default (the event's atol here, not 0 for a steady state at 0)
    decay = torch.tensor(2.0, dtype=D, requires_grad=True)
    sol = neuralode.solve(lambda t, y: -decay * y, torch.ones(3, dtype=D), torch.tensor([0.0, 100.0], dtype=D),
                          events=[neuralode.steady_state_event(lambda t, y: -decay * y, rtol=1e-6, atol=1e-6)],
                          gradient=neuralode.ImplicitAdjoint(rtol=1e-3), adjoint_params=(decay,))
    sol.event_y.sum().backward()
    # the event time has no gradient under the theorem: a loss through it is an error, not a silent zero
    event = neuralode.steady_state_event(f, rtol=1e-8, atol=1e-10)
    sol = neuralode.solve(f, y0, torch.tensor([0.0, 100.0], dtype=D), events=[event], gradient=strategy,
                          adjoint_params=(W, b), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="event_t"):
        (sol.event_t + sol.event_y.sum()).backward()
    with pytest.raises(ValueError, match="affect"):
        neuralode.solve(f, y0, torch.tensor([0.0, 100.0], dtype=D), gradient=strategy, adjoint_params=(W, b),
                        events=[neuralode.Event(lambda t, y: y[0] - 0.1, affect=lambda t, y: y * 0.5)])


def test_an_unstable_steady_state_warns():
    # y' = A (y - theta e), A with an eigenvalue 1 > 0, started exactly at the steady state
    A = torch.tensor([[1.0, 0.2], [0.0, -2.0]], dtype=D)
    theta = torch.tensor(0.5, dtype=D, requires_grad=True)
    e = torch.tensor([1.0, 1.0], dtype=D)
    sol = neuralode.solve(lambda t, y: A @ (y - theta * e), 0.5 * e, torch.tensor([0.0, 1.0], dtype=D),
                          gradient=neuralode.ImplicitAdjoint(), adjoint_params=(theta,))
    with pytest.warns(UserWarning, match="unstable"):
        sol.ys[-1].sum().backward()
