"""Terminal events: event times against closed forms, directions, batched event functions, odeint's
event mode and the gradient of the event time (implicit function theorem) against its closed form."""

from __future__ import annotations

import math

import pytest
import torch

import neuralode

F64 = torch.float64
G = 9.81


def falling(t, y):
    """y = (height, velocity) under gravity."""
    return torch.stack([y[1], torch.full_like(y[1], -G)])


def height(t, y):
    return y[0]


def _drop_time(h0, v0=0.0, level=0.0):
    # h0 + v0 t - g t^2 / 2 = level, first positive root
    return (v0 + math.sqrt(v0 * v0 + 2 * G * (h0 - level))) / G


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3", "dopri8"])
def test_falling_ball_event_time(method):
    y0 = torch.tensor([10.0, 0.0], dtype=F64)
    sol = neuralode.solve(falling, y0, torch.tensor([0.0, 10.0], dtype=F64), method=method, event_fn=height)
    assert sol.status == "event" and sol.success
    assert float(sol.event_t) == pytest.approx(_drop_time(10.0), abs=1e-9)
    assert abs(float(sol.event_y[0])) < 1e-8
    assert float(sol.event_y[1]) == pytest.approx(-G * _drop_time(10.0), abs=1e-7)
    assert sol.event_t.dtype == F64


def test_event_with_fixed_step_method():
    y0 = torch.tensor([10.0, 0.0], dtype=F64)
    sol = neuralode.solve(falling, y0, torch.tensor([0.0, 10.0], dtype=F64), method="rk4", event_fn=height,
                          options={"step_size": 0.1, "interp": "cubic"})
    # the trajectory is a quadratic: rk4 and its cubic Hermite interpolant are exact
    assert float(sol.event_t) == pytest.approx(_drop_time(10.0), abs=1e-9)


def test_outputs_stop_at_the_event():
    """Output times after the event are not reported (ts and ys end where the solve stopped)."""
    y0 = torch.tensor([10.0, 0.0], dtype=F64)
    t = torch.linspace(0, 10, 11, dtype=F64)
    sol = neuralode.solve(falling, y0, t, event_fn=height)
    t_e = float(sol.event_t)
    assert t_e == pytest.approx(_drop_time(10.0), abs=1e-9)
    assert (sol.ts <= t_e).all(), sol.ts
    assert sol.ys.shape[0] == sol.ts.shape[0]
    assert torch.equal(sol.ts, t[:2])
    assert float(sol.ys[1, 0]) == pytest.approx(10.0 - G / 2, abs=1e-9)


def test_event_direction():
    """Thrown up from 0 with v0 = 10: height 3 is crossed upwards first, then downwards."""
    y0 = torch.tensor([0.0, 10.0], dtype=F64)
    t = torch.tensor([0.0, 5.0], dtype=F64)
    level = 3.0
    up = (10.0 - math.sqrt(100.0 - 2 * G * level)) / G
    down = (10.0 + math.sqrt(100.0 - 2 * G * level)) / G
    fn = lambda t, y: y[0] - level  # noqa: E731
    for direction, expected in ((0, up), (1, up), (-1, down)):
        sol = neuralode.solve(falling, y0, t, event_fn=fn, event_direction=direction)
        assert float(sol.event_t) == pytest.approx(expected, abs=1e-9), direction


def test_batched_event_function_first_element_to_cross():
    y0 = torch.tensor([0.0, 10.0], dtype=F64)
    t = torch.tensor([0.0, 5.0], dtype=F64)
    # levels 4.0 and 2.0 are both crossed on the way up; 2.0 first
    fn = lambda t, y: torch.stack([y[0] - 4.0, y[0] - 2.0])  # noqa: E731
    sol = neuralode.solve(falling, y0, t, event_fn=fn)
    assert float(sol.event_t) == pytest.approx((10.0 - math.sqrt(100.0 - 2 * G * 2.0)) / G, abs=1e-9)
    # an element that starts on the far side and never crosses does not fire
    fn2 = lambda t, y: torch.stack([y[0] + 1.0, y[0] - 4.0])  # noqa: E731
    sol = neuralode.solve(falling, y0, t, event_fn=fn2)
    assert float(sol.event_t) == pytest.approx((10.0 - math.sqrt(100.0 - 2 * G * 4.0)) / G, abs=1e-9)


def test_event_with_time_dependent_function():
    """event_fn receives t: stop at t = 0.7 exactly (g = t - 0.7)."""
    sol = neuralode.solve(lambda t, y: -y, torch.ones(2, dtype=F64), torch.tensor([0.0, 3.0], dtype=F64),
                          event_fn=lambda t, y: t - 0.7)
    assert float(sol.event_t) == pytest.approx(0.7, abs=1e-12)
    assert torch.allclose(sol.event_y, torch.full((2,), math.exp(-0.7), dtype=F64), atol=1e-8)


def test_event_backwards_in_time():
    """y' = 1, y(2) = 2, backwards: y = t crosses 0.5 at t = 0.5."""
    sol = neuralode.solve(lambda t, y: torch.ones_like(y), torch.tensor([2.0], dtype=F64),
                          torch.tensor([2.0, -1.0], dtype=F64), event_fn=lambda t, y: y[0] - 0.5)
    assert float(sol.event_t) == pytest.approx(0.5, abs=1e-12)


def test_event_tuple_state():
    y0 = (torch.tensor([10.0], dtype=F64), torch.tensor([0.0], dtype=F64))
    sol = neuralode.solve(lambda t, y: (y[1], torch.full_like(y[1], -G)), y0, torch.tensor([0.0, 10.0], dtype=F64),
                          event_fn=lambda t, y: y[0][0])
    assert float(sol.event_t) == pytest.approx(_drop_time(10.0), abs=1e-9)
    assert isinstance(sol.event_y, tuple) and sol.event_y[0].shape == (1,)


def test_no_event_means_success():
    sol = neuralode.solve(falling, torch.tensor([10.0, 0.0], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                          event_fn=height)
    assert sol.status == "success" and sol.event_t is None and sol.event_y is None


def test_odeint_event_mode_returns_event_time_and_two_states():
    y0 = torch.tensor([10.0, 0.0], dtype=F64)
    event_t, ys = neuralode.odeint(falling, y0, torch.tensor([0.0, 1.0], dtype=F64), event_fn=height)
    # t[1] only sets the direction: the solve runs past it to the event
    assert float(event_t) == pytest.approx(_drop_time(10.0), abs=1e-9)
    assert ys.shape == (2, 2)
    assert torch.equal(ys[0], y0)
    assert abs(float(ys[1, 0])) < 1e-8


def test_odeint_event_tuple_state():
    y0 = (torch.tensor([10.0], dtype=F64), torch.tensor([0.0], dtype=F64))
    event_t, ys = neuralode.odeint(lambda t, y: (y[1], torch.full_like(y[1], -G)), y0,
                                   torch.tensor([0.0, 1.0], dtype=F64), event_fn=lambda t, y: y[0][0])
    assert isinstance(ys, tuple) and ys[0].shape == (2, 1) and ys[1].shape == (2, 1)
    assert float(event_t) == pytest.approx(_drop_time(10.0), abs=1e-9)


@pytest.mark.parametrize("method", ["dopri5", "tsit5"])
def test_odeint_event_gradient_closed_form(method):
    """t_e = sqrt(2 h0 / g): dt_e/dh0 = 1 / (g t_e); with v0, dt_e/dv0 = (1 + v0 / sqrt(v0^2 + 2 g h0)) / g."""
    h0 = torch.tensor(10.0, dtype=F64, requires_grad=True)
    v0 = torch.tensor(1.5, dtype=F64, requires_grad=True)
    event_t, ys = neuralode.odeint_event(falling, torch.stack([h0, v0]), torch.tensor(0.0, dtype=F64),
                                         event_fn=height, method=method)
    t_e = _drop_time(10.0, 1.5)
    assert float(event_t.detach()) == pytest.approx(t_e, abs=1e-9)
    dh, dv = torch.autograd.grad(event_t, (h0, v0))
    root = math.sqrt(1.5 ** 2 + 2 * G * 10.0)
    assert float(dh) == pytest.approx(1 / root, rel=1e-6)
    assert float(dv) == pytest.approx((1 + 1.5 / root) / G, rel=1e-6)
    assert ys.shape == (2, 2)


def test_odeint_event_gradient_of_event_state():
    """The velocity at impact v_e = -sqrt(2 g h0): dv_e/dh0 = -g / sqrt(2 g h0) (it moves with t_e)."""
    h0 = torch.tensor(10.0, dtype=F64, requires_grad=True)
    y0 = torch.stack([h0, torch.zeros((), dtype=F64)])
    _, ys = neuralode.odeint_event(falling, y0, torch.tensor(0.0, dtype=F64), event_fn=height)
    (dh,) = torch.autograd.grad(ys[-1, 1], h0)
    assert float(dh) == pytest.approx(-G / math.sqrt(2 * G * 10.0), rel=1e-6)


def test_odeint_event_reverse_time():
    """Backwards from t0 = 0 with y' = 1: y = 1 + t crosses 0 at t = -1."""
    event_t, ys = neuralode.odeint_event(lambda t, y: torch.ones_like(y), torch.tensor([1.0], dtype=F64),
                                         torch.tensor(0.0, dtype=F64), event_fn=lambda t, y: y[0],
                                         reverse_time=True)
    assert float(event_t) == pytest.approx(-1.0, abs=1e-12)


def test_fixed_step_event_mode_runs_past_t1():
    """torchdiffeq's event mode: t[1] only sets the direction; fixed steps continue until the event."""
    y0 = torch.ones(1, dtype=torch.float64)
    # The event is located on the grid's interpolant: linear (the default) is O(h^2) accurate, cubic
    # Hermite O(h^4); h = 0.01 here.
    for interp, tol in (("linear", 1e-4), ("cubic", 1e-8)):
        event_t, ys = neuralode.odeint(lambda t, y: -y, y0, torch.tensor([0.0, 1.0], dtype=torch.float64),
                                       method="rk4", options={"step_size": 0.01, "interp": interp},
                                       event_fn=lambda t, y: y[0] - 0.1)
        assert float(event_t) == pytest.approx(math.log(10.0), abs=tol)
        assert float(ys[-1, 0]) == pytest.approx(0.1, abs=1e-12)
    with pytest.raises(ValueError, match="to run until an event it needs options=\\{'step_size': h\\}"):
        neuralode.odeint(lambda t, y: -y, y0, torch.tensor([0.0, 1.0], dtype=torch.float64), method="rk4",
                         event_fn=lambda t, y: y[0] - 0.1)


def test_dense_output_ends_at_the_event():
    y0 = torch.ones(1, dtype=torch.float64)
    sol = neuralode.solve(lambda t, y: -y, y0, torch.tensor([0.0, 5.0], dtype=torch.float64),
                          event_fn=lambda t, y: y[0] - 0.5, dense=True)
    t_e = float(sol.event_t)
    assert float(sol.step_times[-1]) == t_e
    assert torch.equal(sol.evaluate(t_e), sol.event_y)
    with pytest.raises(ValueError, match="outside the solved span"):
        sol.evaluate(t_e + 1e-3)
    with pytest.raises(ValueError, match="t is empty"):
        sol.evaluate(torch.tensor([], dtype=torch.float64))
    # not times: a TypeError naming t (a string was torch's "new(): invalid data type 'str'"; a complex time
    # silently lost its imaginary part)
    for bad in ("0.5", torch.tensor([0.5 + 1j]), 0.5j, [None]):
        with pytest.raises(TypeError, match="t must be a real time or a real tensor of times"):
            sol.evaluate(bad)


def test_an_event_function_whose_shape_changes_is_a_value_error():
    """Each element's sign is compared with its own earlier sign: a shape that changes mid-solve raised torch's
    reshape error from inside the loop."""
    y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"event_fn returned shape \(2,\) at t=.* but \(\) before"):
        neuralode.solve(lambda t, y: torch.stack([y[1], -y[0]]), y0, torch.linspace(0, 5, 11, dtype=torch.float64),
                        event_fn=lambda t, y: y[0] if t < 1 else y)


def test_one_event_value_or_values_that_broadcast_stand_for_every_element():
    """torchdiffeq's learn_physics example returns zeros_like(t) (shape ()) after a time limit and a (1,) value before;
    torchdiffeq broadcasts them (min(c * initial_signs)), so that is one value for every element here too."""
    f = lambda t, y: -0.1 * torch.ones_like(y)  # noqa: E731
    y0 = torch.tensor([1.0, 2.0], dtype=torch.float64)
    t0 = torch.tensor(0.0, dtype=torch.float64)
    for placeholder in (lambda t, y: torch.zeros_like(t), lambda t, y: torch.zeros(1, dtype=y.dtype)):
        event_t, _ = neuralode.odeint_event(f, y0, t0, event_fn=lambda t, y: placeholder(t, y) if t > 2.0 else y,
                                            atol=1e-10, rtol=1e-10)
        assert abs(event_t.item() - 2.0) < 1e-9
    # a (2, 2) state: values of shape (1, 2) broadcast over the rows
    y0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    shift = torch.tensor([0.0, 1.85], dtype=torch.float64)
    event_t, _ = neuralode.odeint_event(f, y0, t0, event_fn=lambda t, y: y if t < 1.0 else y[:1] - shift,
                                        atol=1e-10, rtol=1e-10)
    assert abs(event_t.item() - 1.5) < 1e-9   # y[0, 1] - 1.85 = 0.15 - 0.1 t
    with pytest.raises(ValueError, match=r"event_fn returned shape \(3,\) at t=.* but \(2, 2\) before"):
        neuralode.odeint_event(f, y0, t0, event_fn=lambda t, y: y if t < 1.0 else torch.ones(3, dtype=y.dtype))


@pytest.mark.parametrize("nan_from", [0.0, 1.0])
def test_an_event_function_that_turns_nan_is_an_error_not_a_missed_event(nan_from):
    """NaN never compares, so a NaN event value would silently never fire: it is a ValueError naming the time."""
    def event_fn(t, y):
        return y[0] + (math.nan if float(t) >= nan_from else 0.0) - 0.1

    with pytest.raises(ValueError, match=r"the event function returned nan at t=") as info:
        neuralode.solve(lambda t, y: -y, torch.tensor([1.0], dtype=torch.float64),
                        torch.tensor([0.0, 5.0], dtype=torch.float64), event_fn=event_fn)
    assert float(str(info.value).split("t=")[1].split(";")[0]) >= nan_from


@pytest.mark.parametrize("event_fn, error, message", [
    (lambda t, y: None, TypeError, r"event_fn must return a tensor \(or a number\).*got NoneType"),
    (lambda t, y: y[:0], ValueError, r"event_fn returned no values \(shape \(0,\)\), so no event could ever occur"),
    # (a boolean from the start is a condition, tests/test_event_conditions.py; one that turns up later is an error)
    (lambda t, y: (y[0] > 0.5) if float(t) > 0.3 else y[0], TypeError, r"event_fn must return real values.*torch.bool"),
], ids=["none", "empty", "bool later"])
def test_an_event_function_without_real_values_is_a_clear_error(event_fn, error, message):
    # None raised torch's 'Could not infer dtype of NoneType'; an empty result silently never fired.
    y0, t = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0])
    with pytest.raises(error, match=message):
        neuralode.solve(lambda t, y: -y, y0, t, event_fn=event_fn)
    with pytest.raises(error, match=message):
        neuralode.odeint_event(lambda t, y: -y, y0, torch.tensor(0.0), event_fn=event_fn)


def test_an_event_function_on_a_complex_state_must_return_real_values():
    # (without the check, torch itself failed deep inside: "lt_cpu" not implemented for 'ComplexFloat')
    y0, t = torch.tensor([1.0 + 0.5j]), torch.tensor([0.0, 3.0])
    with pytest.raises(TypeError, match=r"real values.*complex64.*y\[\.\.\., 0\]\.real"):
        neuralode.solve(lambda t, y: -1j * y, y0, t, event_fn=lambda t, y: y[0])
    sol = neuralode.solve(lambda t, y: -1j * y, y0, t, event_fn=lambda t, y: y[0].real)
    # Re(e^{-it} (1 + 0.5i)) = cos t + 0.5 sin t = 0 at t = pi - atan(2)
    assert sol.event_t is not None and abs(float(sol.event_t) - (math.pi - math.atan(2.0))) < 1e-4
