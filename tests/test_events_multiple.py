"""solve(..., events=[Event(...)]): several events per solve, recorded without stopping, terminal after N
occurrences (issue 11, item 4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import neuralode
from neuralode import Event, solve

F64 = torch.float64


def oscillator(t, y):
    return torch.stack([y[1], -y[0]])


Y0 = torch.tensor([1.0, 0.0], dtype=F64)   # x = cos t, v = -sin t


def test_every_crossing_is_recorded_without_stopping():
    t = torch.linspace(0.0, 10.0, 6, dtype=F64)
    sol = neuralode.solve(oscillator, Y0, t, rtol=1e-10, atol=1e-12,
                          events=[Event(lambda t, y: y[0], name="x"), Event(lambda t, y: y[1], direction=1, name="v")])
    assert sol.status == "success" and sol.ts.shape == (6,)
    x_times = [r.t.item() for r in sol.events if r.name == "x"]
    assert x_times == pytest.approx([math.pi / 2 + k * math.pi for k in range(3)], abs=1e-8)
    assert [r.direction for r in sol.events if r.index == 0] == [-1, 1, -1]
    # v = -sin t rises through zero at t = pi and 3 pi only (direction=1).
    assert [r.t.item() for r in sol.events if r.index == 1] == pytest.approx([math.pi, 3 * math.pi], abs=1e-8)
    times = [r.t.item() for r in sol.events]
    assert times == sorted(times)
    for record in sol.events:
        torch.testing.assert_close(record.y, torch.stack([torch.cos(record.t), -torch.sin(record.t)]),
                                   rtol=0, atol=1e-8)
        assert not record.y.requires_grad


def test_terminal_after_n_occurrences_stops_there():
    t = torch.linspace(0.0, 10.0, 5, dtype=F64)
    sol = neuralode.solve(oscillator, Y0, t, rtol=1e-10, atol=1e-12,
                          events=[Event(lambda t, y: y[1], name="v"), Event(lambda t, y: y[0], terminal=3)])
    assert sol.status == "event"
    assert sol.event_t.item() == pytest.approx(math.pi / 2 + 2 * math.pi, abs=1e-8)
    assert sol.ts.tolist() == [0.0, 2.5, 5.0, 7.5]   # outputs past the event are not part of the solution
    assert [r.index for r in sol.events] == [1, 0, 1, 0, 1]   # pi/2, pi, 3pi/2, 2pi, 5pi/2: v at pi and 2pi
    assert sol.events[-1].t.item() == pytest.approx(sol.event_t.item())


def test_occurrences_in_one_step_are_ordered_and_cut_at_a_terminal_one():
    # One rk4 step covers [0, 1]: both events occur inside it; the terminal one comes first.
    sol = neuralode.solve(lambda t, y: torch.ones_like(y), torch.zeros(1, dtype=F64),
                          torch.tensor([0.0, 1.0], dtype=F64), method="rk4", options={"step_size": 1.0},
                          events=[Event(lambda t, y: y - 0.5, name="late"),
                                  Event(lambda t, y: y - 0.3, terminal=True, name="early")])
    assert [r.name for r in sol.events] == ["early"]
    assert sol.event_t.item() == pytest.approx(0.3, abs=1e-12)


def test_a_terminal_event_matches_event_fn_and_its_time_gradient():
    def run(**kwargs):
        y0 = torch.tensor([1.0, 0.3], dtype=F64, requires_grad=True)
        sol = neuralode.solve(oscillator, y0, torch.tensor([0.0, 5.0], dtype=F64), rtol=1e-10, atol=1e-12, **kwargs)
        (grad,) = torch.autograd.grad(sol.event_t, y0)
        return sol.event_t.detach(), grad

    fn = lambda t, y: y[0]   # noqa: E731
    t_a, g_a = run(event_fn=fn)
    t_b, g_b = run(events=[Event(fn, terminal=True)])
    assert t_a.item() == t_b.item()
    torch.testing.assert_close(g_a, g_b)
    assert float(g_a.abs().max()) > 0.1


def test_tuple_states_and_the_adjoint():
    def field(t, y):
        x, v = y
        return v, -x

    y0 = (torch.tensor([1.0], dtype=F64, requires_grad=True), torch.tensor([0.0], dtype=F64))
    t = torch.linspace(0.0, 5.0, 3, dtype=F64)
    events = [Event(lambda t, y: y[0].sum(), name="x")]
    direct = neuralode.solve(field, y0, t, rtol=1e-10, atol=1e-12, events=events)
    adjoint = neuralode.solve(field, y0, t, rtol=1e-10, atol=1e-12, events=events, gradient="adjoint")
    assert [r.t.item() for r in direct.events] == pytest.approx([math.pi / 2, 3 * math.pi / 2], abs=1e-8)
    assert isinstance(direct.events[0].y, tuple) and direct.events[0].y[0].shape == (1,)
    assert [r.t.item() for r in adjoint.events] == [r.t.item() for r in direct.events]
    g_direct = torch.autograd.grad(direct.ys[0].sum(), y0[0])[0]
    g_adjoint = torch.autograd.grad(adjoint.ys[0].sum(), y0[0])[0]
    torch.testing.assert_close(g_adjoint, g_direct, rtol=1e-7, atol=1e-9)


def test_bad_events_are_refused_with_the_fix():
    t = torch.tensor([0.0, 1.0], dtype=F64)
    fn = lambda t, y: y[0]   # noqa: E731
    with pytest.raises(TypeError, match="wrap one event in a list"):
        neuralode.solve(oscillator, Y0, t, events=Event(fn))
    with pytest.raises(TypeError, match=r"events\[1\] must be a neuralode.Event"):
        neuralode.solve(oscillator, Y0, t, events=[Event(fn), fn])
    with pytest.raises(ValueError, match="either event_fn"):
        neuralode.solve(oscillator, Y0, t, event_fn=fn, events=[Event(fn)])
    with pytest.raises(ValueError, match="direction must be 0, 1 or -1"):
        Event(fn, direction=2)
    with pytest.raises(ValueError, match="positive integer"):
        Event(fn, terminal=0)
    with pytest.raises(TypeError, match="must be callable"):
        Event(3)


# --- the event-time gradient at an N-th occurrence, for every strategy; the root tolerance ------------------


def _oscillator_event_time(w, gradient, terminal, vector=False, tol=None):
    """y'' = -w^2 y, y(0) = 1: position crossings at t = (pi/2 + k pi) / w. Returns the terminal event time."""
    def field(t, y):
        return torch.stack([y[1], -w * w * y[0]])

    def fn(t, y):
        return torch.stack([y[0], y[0] + 2.0]) if vector else y[0]

    solution = solve(field, torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 20.0], dtype=torch.float64),
                     method="dopri5", rtol=1e-11, atol=1e-11, gradient=gradient, adjoint_params=[w] if w.requires_grad else None,
                     events=[Event(fn, terminal=terminal, tol=tol)])
    return solution.event_t


@pytest.mark.parametrize("gradient", ["direct", "adjoint", "checkpoint"])
@pytest.mark.parametrize("vector", [False, True])
def test_the_event_time_of_an_nth_occurrence_is_differentiable(gradient, vector):
    w = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    t_event = _oscillator_event_time(w, gradient, terminal=3, vector=vector)
    assert abs(float(t_event) - 2.5 * math.pi / 1.3) < 1e-8          # the third crossing: (pi/2 + 2 pi) / w
    t_event.backward()
    assert abs(float(w.grad) - (-2.5 * math.pi / 1.3 ** 2)) < 1e-6     # d/dw of 5 pi / (2 w)


def test_the_root_tolerance_stops_the_bisection_early():
    calls = {"n": 0}

    def fn(t, y):
        calls["n"] += 1
        return y[0]

    def run(tol):
        calls["n"] = 0
        solution = solve(lambda t, y: torch.stack([y[1], -y[0]]), torch.tensor([1.0, 0.0], dtype=torch.float64),
                         torch.tensor([0.0, 3.0], dtype=torch.float64), rtol=1e-10, atol=1e-10,
                         events=[Event(fn, terminal=True, tol=tol)])
        return float(solution.event_t), calls["n"]

    precise, precise_calls = run(None)
    loose, loose_calls = run(1e-3)
    assert abs(precise - math.pi / 2) < 1e-9
    assert 0 <= loose - math.pi / 2 <= 1e-3 + 1e-9        # the far end of a bracket at most 1e-3 long
    assert loose_calls < precise_calls - 20


@pytest.mark.parametrize("tol", [0.0, -1.0, float("inf"), "1e-3", True])
def test_a_bad_root_tolerance_is_refused(tol):
    with pytest.raises(ValueError, match="Event tol must be a finite time > 0"):
        Event(lambda t, y: y, tol=tol)


# --- crossings inside one step: the sign is checked at Event.samples points of the dense output -----------------


def _crossings_near_a_maximum(samples, method="dopri5"):
    """x = cos t crosses 0.995 twice around each maximum, 0.2 apart: loose tolerances take steps of ~1 there, so
    both crossings of a pair lie inside one step and the step's ends have one sign."""
    level = 0.995
    solution = solve(oscillator, Y0, torch.tensor([0.0, 20.0], dtype=F64), method=method, rtol=1e-3, atol=1e-6,
                     events=[Event(lambda t, y: y[0] - level, samples=samples)])
    exact = sorted(2 * math.pi * k + s * math.acos(level) for k in range(4) for s in (-1, 1))
    exact = [x for x in exact if 0 < x < 20]
    return [float(r.t) for r in solution.events], exact


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "radau5"])
def test_two_crossings_inside_one_step_are_both_found(method):
    found, exact = _crossings_near_a_maximum(4, method)
    assert len(found) == len(exact) == 7
    # Each within 0.1 of its exact time (a pair is 0.2 apart): at rtol 1e-3 the level is nearly tangent to the
    # orbit, so x's error of ~5e-3 by t = 19 moves a crossing by ~0.05.
    assert found == pytest.approx(exact, abs=0.1)
    # Checked at the steps' ends only (torchdiffeq's and scipy's rule), the same steps miss some of the pairs.
    ends_only, _ = _crossings_near_a_maximum(0, method)
    assert len(ends_only) < len(exact)


@pytest.mark.parametrize("samples", [-1, 1.5, True, "4", np.bool_(True)])
def test_a_bad_sample_count_is_refused(samples):
    with pytest.raises(ValueError, match="Event samples must be an integer >= 0"):
        Event(lambda t, y: y, samples=samples)


def test_a_numpy_sample_count_is_an_int():
    assert Event(lambda t, y: y, samples=np.int64(3)).samples == 3


def test_the_sign_checks_cost_dopri8_its_dense_output_only():
    # The checks inside a step read the dense output: dopri8's costs 3 evaluations of f a step (a cubic Hermite
    # through the step's ends, which costs none, missed the crossings of the test above); samples=0 reads it only
    # where a sign changed.
    def run(events):
        return solve(oscillator, Y0, torch.tensor([0.0, 20.0], dtype=F64), method="dopri8", rtol=1e-6, atol=1e-9,
                     events=events).stats

    def far(t, y):
        return y[0] - 5.0   # (never reached: |x| <= 1)

    plain, ends_only, sampled = run([]), run([Event(far, samples=0)]), run([Event(far)])
    assert ends_only["nfe"] == plain["nfe"]
    # (+1 at most: the last step's f1, which the dense output needs and no next step reuses)
    assert 0 <= sampled["nfe"] - plain["nfe"] - 3 * sampled["n_accepted"] <= 1


@pytest.mark.parametrize("samples", [0, 4])
def test_a_blow_up_is_the_solution_s_failure_not_the_event_function_s(samples):
    # y' = 1e5 y: the step's end is still finite (-2e301 is not reached, +2e301 is) while its interpolant's
    # coefficients overflow; a NaN sample of the event function then blamed it (ValueError, even with throw=False).
    solution = solve(lambda t, y: 1e5 * y, torch.tensor([1.0], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                     method="dopri5", events=[Event(lambda t, y: y[0] + 1.0, samples=samples)], throw=False)
    assert solution.status == "non_finite"
