"""Boolean event conditions (diffrax's boolean ``cond_fn``) and ``steady_state_event`` (diffrax's
``steady_state_event``).

A boolean condition occurs where it turns True (``direction=-1``: where it turns False), located by bisection on the
dense output like any crossing; its time carries no gradient. The steady-state event is a real crossing, so its
time does.
"""

import math

import pytest
import torch

import neuralode

F64 = torch.float64


def oscillator(t, y):
    return torch.stack([y[1], -y[0]])


Y0 = torch.tensor([1.0, 0.0], dtype=F64)
SPAN = torch.tensor([0.0, 10.0], dtype=F64)


def test_a_boolean_condition_stops_where_it_turns_true():
    """y = cos t falls below -1/2 at t = 2 pi / 3: located on the dense output (diffrax's boolean event stops at the
    end of the step instead), through every front end."""
    event = neuralode.Event(lambda t, y: y[0] < -0.5, terminal=True)
    sol = neuralode.solve(oscillator, Y0, SPAN, events=[event])
    assert sol.status == "event" and abs(float(sol.event_t) - 2 * math.pi / 3) < 1e-7
    sol = neuralode.solve(oscillator, Y0, SPAN, event_fn=lambda t, y: y[0] < -0.5)
    assert abs(float(sol.event_t) - 2 * math.pi / 3) < 1e-7
    event_t, ys = neuralode.odeint_event(oscillator, Y0, torch.tensor(0.0, dtype=F64),
                                         event_fn=lambda t, y: y[0] < -0.5)
    assert abs(float(event_t) - 2 * math.pi / 3) < 1e-7 and ys.shape == (2, 2)
    fixed = neuralode.solve(lambda t, y: torch.tensor([1.0, 2.0], dtype=F64).expand_as(y), torch.zeros(2, dtype=F64),
                            SPAN, events=[neuralode.Event(lambda t, y: y > 0.5, terminal=True)], method="rk4",
                            options={"step_size": 0.1})
    assert abs(float(fixed.event_t) - 0.25) < 1e-12   # (the second element turns True first)


def test_direction_and_recorded_occurrences():
    """Recorded (not terminal): every turn to True, or with direction=-1 every turn to False. A condition already
    True at the start is no occurrence (it has not turned True; diffrax would stop at the end of the first step)."""
    turns_true = neuralode.Event(lambda t, y: y[0] < -0.5)
    turns_false = neuralode.Event(lambda t, y: y[0] < -0.5, direction=-1)
    sol = neuralode.solve(oscillator, Y0, torch.tensor([0.0, 13.0], dtype=F64), events=[turns_true, turns_false])
    times = {k: [float(r.t) for r in sol.events if r.index == k] for k in (0, 1)}
    assert times[0] == pytest.approx([2 * math.pi / 3, 2 * math.pi / 3 + 2 * math.pi], abs=1e-7)
    assert times[1] == pytest.approx([4 * math.pi / 3, 4 * math.pi / 3 + 2 * math.pi], abs=1e-7)
    already = neuralode.solve(oscillator, Y0, SPAN, events=[neuralode.Event(lambda t, y: y[0] > -2, terminal=True)])
    assert already.status == "success" and already.events == []


def test_a_boolean_condition_with_an_affect_fires_again_only_after_turning_false():
    """A sawtooth: y' = 1, and when y > 1 it drops by 1/2. After each jump the condition is False again, so the
    occurrences are 1, 1.5, 2, ...; outputs at the jump times get the state after the jump."""
    event = neuralode.Event(lambda t, y: y[0] > 1.0, affect=lambda t, y: y - 0.5)
    sol = neuralode.solve(lambda t, y: torch.ones_like(y), torch.zeros(1, dtype=F64),
                          torch.linspace(0, 3, 7, dtype=F64),
                          events=[event])
    assert [float(r.t) for r in sol.events] == pytest.approx([1.0, 1.5, 2.0, 2.5, 3.0], abs=1e-9)
    assert torch.allclose(sol.ys[1:, 0], torch.full((6,), 0.5, dtype=F64), atol=1e-9)
    # an affect that leaves it True: no new occurrence until it turns False and True again
    stays = neuralode.Event(lambda t, y: y[0] > 1.0, affect=lambda t, y: y + 0.25)
    sol = neuralode.solve(lambda t, y: torch.ones_like(y), torch.zeros(1, dtype=F64), torch.tensor([0.0, 3.0],
                          dtype=F64), events=[stays])
    assert len(sol.events) == 1 and float(sol.ys[-1, 0]) == pytest.approx(3.25)


@pytest.mark.parametrize("gradient", ["direct", "adjoint"])
def test_the_state_at_a_boolean_event_has_gradients_its_time_none(gradient):
    """A condition has no derivative, so the event time is not differentiated (the state at it is, at that time)."""
    y0 = Y0.clone().requires_grad_(True)
    sol = neuralode.solve(oscillator, y0, SPAN, events=[neuralode.Event(lambda t, y: y[0] < -0.5, terminal=True)],
                          gradient=gradient, rtol=1e-10, atol=1e-10)
    assert not sol.event_t.requires_grad
    sol.event_y.sum().backward()
    t_e = 2 * math.pi / 3   # y(t) = (cos t, -sin t) x0 + (sin t, cos t) v0: d(sum)/d(x0, v0) at t_e
    expected = torch.tensor([math.cos(t_e) - math.sin(t_e), math.sin(t_e) + math.cos(t_e)], dtype=F64)
    assert torch.allclose(y0.grad, expected, atol=1e-7)


def test_a_condition_must_keep_its_kind():
    flips_to_real = neuralode.Event(lambda t, y: (y[0] > 0.5) if float(t) < 0.2 else y[0] - 0.5, terminal=True)
    with pytest.raises(TypeError, match="returned booleans at the start of the solve and torch.float64"):
        neuralode.solve(lambda t, y: torch.ones_like(y), torch.zeros(1, dtype=F64), SPAN, events=[flips_to_real])
    flips_to_bool = neuralode.Event(lambda t, y: (y[0] > 0.5) if float(t) > 0.2 else y[0] - 0.5, terminal=True)
    with pytest.raises(TypeError, match="or booleans from the start of the solve"):
        neuralode.solve(lambda t, y: torch.ones_like(y), torch.zeros(1, dtype=F64), SPAN, events=[flips_to_bool])


def test_steady_state_event_and_its_time_gradient():
    """y' = -k (y - 2) from 0: the RMS of f is 2 k e^{-k t}, the threshold atol + rtol RMS(y) about 2.0e-4 + 1e-6,
    so the steady state is at t = ln(2 k / 2.01e-4) / k. The time is a real crossing, differentiable through the field
    the event function calls: dt/dk = 1 / k^2 - t / k at k = 1, -8.2055 (checked by a central difference; the
    gradient was -t / k, -9.2055, while the search for the tensors an event function uses stopped at its closure)."""
    def event_time(k_value, differentiate=False):
        k = torch.tensor(k_value, dtype=F64, requires_grad=differentiate)

        def field(t, y):
            return -k * (y - 2.0)
        event = neuralode.steady_state_event(field, rtol=1e-4, atol=1e-6)
        sol = neuralode.solve(field, torch.zeros(3, dtype=F64), torch.tensor([0.0, 100.0], dtype=F64),
                              events=[event], rtol=1e-12, atol=1e-14)
        assert sol.status == "event" and event.terminal is True and event.direction == -1 and event.samples == 0
        if differentiate:
            sol.event_t.backward()
            return float(sol.event_t), float(k.grad)
        return float(sol.event_t)
    t_event, gradient = event_time(1.0, differentiate=True)
    assert abs(t_event - math.log(2 / (1e-6 + 1e-4 * (2 - 2 * math.exp(-t_event))))) < 1e-6
    central = (event_time(1 + 1e-5) - event_time(1 - 1e-5)) / 2e-5
    assert abs(gradient - central) < 1e-4 and abs(gradient + 8.2055) < 1e-3
    # a PyTree state and a custom norm (the largest element)
    tree = neuralode.solve(lambda t, y: {"a": -(y["a"] - 1.0)}, {"a": torch.zeros(2, dtype=F64)},
                           torch.tensor([0.0, 50.0], dtype=F64), events=[neuralode.steady_state_event(
                               lambda t, y: {"a": -(y["a"] - 1.0)}, rtol=0.0, atol=1e-3, norm=lambda x: x.abs().max())],
                           rtol=1e-10, atol=1e-12)
    assert abs(float(tree.event_t) - math.log(1e3)) < 1e-5


def test_an_event_function_that_calls_the_field_differentiates_through_it():
    """y' = -k (y - 2), the event where f = 1/2 written through the field: t = ln(4 k) / k, dt/dk = (1 - ln 4) at
    k = 1 (the same as the inline event function gives); it was -ln 4 while the tensors the field closes over were
    not found through the event function's call."""
    k = torch.tensor(1.0, dtype=F64, requires_grad=True)

    def field(t, y):
        return -k * (y - 2.0)

    def above_half(t, y):
        return field(t, y)[0] - 0.5
    sol = neuralode.solve(field, torch.zeros(1, dtype=F64), torch.tensor([0.0, 100.0], dtype=F64),
                          events=[neuralode.Event(lambda t, y: above_half(t, y), terminal=True)], rtol=1e-12,
                          atol=1e-14)
    sol.event_t.backward()
    assert abs(float(sol.event_t) - math.log(4.0)) < 1e-8 and abs(float(k.grad) - (1 - math.log(4.0))) < 1e-6


def test_steady_state_event_arguments():
    with pytest.raises(TypeError, match="needs the vector field"):
        neuralode.steady_state_event(None, rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="rtol must be a finite number >= 0"):
        neuralode.steady_state_event(oscillator, rtol=-1.0, atol=1e-6)
    with pytest.raises(ValueError, match="atol must be a finite number >= 0"):
        neuralode.steady_state_event(oscillator, rtol=1e-3, atol=float("inf"))
    with pytest.raises(TypeError):
        neuralode.steady_state_event(oscillator)   # (rtol and atol are required: no controller to take them from)
