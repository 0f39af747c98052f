"""Gradients through the time of a terminal event (``odeint_event``), as torchdiffeq's ``odeint_event``.

A ball falls from height h0 with speed v0 under gravity g until its height reaches a threshold c:

    t_e = t0 + (v0 + s) / g,   s = sqrt(v0^2 + 2 g (h0 - c)),

so every derivative of t_e (and of the state at the event) is known in closed form. The same
problem is differentiated through ``odeint`` (direct) and ``odeint_adjoint``; a nonlinear problem is
compared with torchdiffeq's ``odeint_event`` and checked with gradcheck.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

import neuralode

DTYPE = torch.float64
H0, V0, G, T0, C = 2.0, 1.0, 9.81, 0.3, 0.5
INTERFACES = {
    "odeint": (neuralode.odeint, False),
    "odeint_adjoint": (neuralode.odeint_adjoint, True),
}


def falling(g):
    def f(t, y):
        return torch.stack([y[1], -g * torch.ones_like(y[1])])
    return f


class Threshold(torch.nn.Module):
    """Event function with a learnable threshold: height minus c."""

    def __init__(self, c=C):
        super().__init__()
        self.c = torch.nn.Parameter(torch.tensor(c, dtype=DTYPE))

    def forward(self, t, y):
        return y[0] - self.c


def fall(interface, y0, g, t0, event_fn=None, **kwargs):
    odeint_interface, adjoint = INTERFACES[interface]
    if adjoint:
        kwargs["adjoint_params"] = (g,)
    event_fn = event_fn if event_fn is not None else (lambda t, y: y[0] - C)
    return neuralode.odeint_event(falling(g), y0, t0, event_fn=event_fn, odeint_interface=odeint_interface,
                                  rtol=1e-10, atol=1e-10, **kwargs)


def expected():
    s = math.sqrt(V0 ** 2 + 2 * G * (H0 - C))
    return {
        "t_e": T0 + (V0 + s) / G,
        "dh0": 1 / s,
        "dv0": (1 + V0 / s) / G,
        "dg": -(V0 + s) / G ** 2 + (H0 - C) / (G * s),
        "dt0": 1.0,
        "dc": -1 / s,
    }


@pytest.mark.parametrize("interface", list(INTERFACES))
def test_event_time_gradient_in_closed_form(interface):
    y0 = torch.tensor([H0, V0], dtype=DTYPE, requires_grad=True)
    g = torch.tensor(G, dtype=DTYPE, requires_grad=True)
    t0 = torch.tensor(T0, dtype=DTYPE, requires_grad=True)
    event_t, ys = fall(interface, y0, g, t0)
    want = expected()
    assert event_t.item() == pytest.approx(want["t_e"], rel=1e-9)
    assert ys.shape == (2, 2)
    d_h0v0, d_g, d_t0 = torch.autograd.grad(event_t, (y0, g, t0))
    assert d_h0v0[0].item() == pytest.approx(want["dh0"], rel=1e-7)
    assert d_h0v0[1].item() == pytest.approx(want["dv0"], rel=1e-7)
    assert d_g.item() == pytest.approx(want["dg"], rel=1e-7)
    assert d_t0.item() == pytest.approx(want["dt0"], rel=1e-7)


@pytest.mark.parametrize("interface", list(INTERFACES))
def test_state_at_event_moves_with_the_event_time(interface):
    """v_e = v0 - g (t_e - t0), so dv_e/dh0 = -g dt_e/dh0 and dv_e/dv0 = 1 - g dt_e/dv0; h_e = c is fixed."""
    y0 = torch.tensor([H0, V0], dtype=DTYPE, requires_grad=True)
    g = torch.tensor(G, dtype=DTYPE, requires_grad=True)
    _, ys = fall(interface, y0, g, torch.tensor(T0, dtype=DTYPE))
    (dv,) = torch.autograd.grad(ys[-1, 1], y0, retain_graph=True)
    (dh,) = torch.autograd.grad(ys[-1, 0], y0)
    want = expected()
    assert dv[0].item() == pytest.approx(-G * want["dh0"], rel=1e-7)
    assert dv[1].item() == pytest.approx(1 - G * want["dv0"], rel=1e-7)
    torch.testing.assert_close(dh, torch.zeros(2, dtype=DTYPE), atol=1e-8, rtol=0)


@pytest.mark.parametrize("interface", list(INTERFACES))
def test_event_function_parameters_get_gradients(interface):
    y0 = torch.tensor([H0, V0], dtype=DTYPE, requires_grad=True)
    g = torch.tensor(G, dtype=DTYPE, requires_grad=True)
    threshold = Threshold()
    event_t, _ = fall(interface, y0, g, torch.tensor(T0, dtype=DTYPE), event_fn=threshold)
    event_t.backward()
    assert threshold.c.grad is not None
    assert threshold.c.grad.item() == pytest.approx(expected()["dc"], rel=1e-7)


@pytest.mark.parametrize("interface", list(INTERFACES))
def test_reverse_time(interface):
    """Backwards in time from t0 the (rising) ball was lower: height 1.5 at t_e = t0 - (s - v0) / g."""
    y0 = torch.tensor([H0, V0], dtype=DTYPE, requires_grad=True)
    g = torch.tensor(G, dtype=DTYPE, requires_grad=True)
    event_t, _ = fall(interface, y0, g, torch.tensor(T0, dtype=DTYPE), reverse_time=True,
                      event_fn=lambda t, y: y[0] - 1.5)
    s = math.sqrt(V0 ** 2 + 2 * G * (H0 - 1.5))
    assert event_t.item() == pytest.approx(T0 - (s - V0) / G, rel=1e-9)
    (grad,) = torch.autograd.grad(event_t, y0)
    assert grad[0].item() == pytest.approx(-1 / s, rel=1e-7)
    assert grad[1].item() == pytest.approx((1 - V0 / s) / G, rel=1e-7)


class Pendulum(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.log_k = torch.nn.Parameter(torch.tensor(0.3, dtype=DTYPE))
        self.damping = torch.nn.Parameter(torch.tensor(0.1, dtype=DTYPE))

    def forward(self, t, y):
        theta, omega = y[..., 0], y[..., 1]
        return torch.stack([omega, -self.log_k.exp() * torch.sin(theta) - self.damping * omega], dim=-1)


def _pendulum_event(t, y):
    return y[..., 0] + 0.2     # the angle passes -0.2


@pytest.mark.parametrize("interface", list(INTERFACES))
def test_matches_torchdiffeq_odeint_event(interface):
    import torchdiffeq  # a test dependency (pip install -e ".[test]")

    def run(odeint_event, odeint_interface):
        func = Pendulum()
        y0 = torch.tensor([0.8, 0.0], dtype=DTYPE, requires_grad=True)
        event_t, ys = odeint_event(func, y0, torch.tensor(0.0, dtype=DTYPE), event_fn=_pendulum_event,
                                   odeint_interface=odeint_interface, rtol=1e-10, atol=1e-10, method="dopri5")
        loss = event_t ** 2 + (ys[-1] * torch.tensor([0.0, 1.5], dtype=DTYPE)).sum()
        loss.backward()
        return [event_t.detach(), y0.grad] + [p.grad for p in func.parameters()]

    ours = run(neuralode.odeint_event, INTERFACES[interface][0])
    reference_interface = torchdiffeq.odeint_adjoint if INTERFACES[interface][1] else torchdiffeq.odeint
    theirs = run(torchdiffeq.odeint_event, reference_interface)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_gradcheck_event_time_and_state():
    """Event time and event state w.r.t. y0 and a parameter of the vector field (direct)."""
    def fn(y0, g):
        event_t, ys = neuralode.odeint_event(falling(g), y0, torch.tensor(0.0, dtype=DTYPE),
                                             event_fn=lambda t, y: y[0] - C, rtol=1e-11, atol=1e-11)
        return event_t, ys[-1]

    inputs = (torch.tensor([H0, V0], dtype=DTYPE, requires_grad=True),
              torch.tensor(G, dtype=DTYPE, requires_grad=True))
    assert gradcheck(fn, inputs, fast_mode=True)


def test_multi_element_event_function():
    """The element that fires first carries the gradient: here the height reaching c, not 10 * v + 100."""
    y0 = torch.tensor([H0, V0], dtype=DTYPE, requires_grad=True)
    g = torch.tensor(G, dtype=DTYPE)
    event_t, _ = neuralode.odeint_event(falling(g), y0, torch.tensor(T0, dtype=DTYPE),
                                        event_fn=lambda t, y: torch.stack([y[0] - C, 10 * y[1] + 100]),
                                        rtol=1e-10, atol=1e-10)
    (grad,) = torch.autograd.grad(event_t, y0)
    want = expected()
    assert grad[0].item() == pytest.approx(want["dh0"], rel=1e-7)
    assert grad[1].item() == pytest.approx(want["dv0"], rel=1e-7)


@pytest.mark.parametrize("gradient", ["checkpoint", "adjoint"])
def test_event_gradients_agree_across_strategies(gradient):
    """The step holding the event must be part of every strategy's backward pass."""
    f = lambda t, y: torch.stack([y[1], -y[0]])
    grads = {}
    for strategy in ("direct", gradient):
        y0 = torch.tensor([1.0, 0.5], dtype=torch.float64, requires_grad=True)
        sol = neuralode.solve(f, y0, torch.tensor([0.0, 5.0], dtype=torch.float64), event_fn=lambda t, y: y[0],
                              gradient=strategy, rtol=1e-10, atol=1e-10)
        (grads[strategy],) = torch.autograd.grad(sol.event_y.pow(2).sum() + sol.event_t, y0)
    assert torch.allclose(grads[gradient], grads["direct"], rtol=1e-6, atol=1e-8)
