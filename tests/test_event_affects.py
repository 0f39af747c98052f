"""Events that change the state and go on (``Event(..., affect=...)``, SciML's ContinuousCallback with an affect!).

The bouncing ball has a closed form: dropped from h0 under gravity g, it hits the ground at t1 = sqrt(2 h0 / g) with
speed v1 = g t1, and each bounce with restitution e sends it up at e times its impact speed, so the k-th flight
lasts 2 e^k v1 / g. Its height at a later time, and the derivatives of that height with respect to e and h0, test
the jumps, the restarts and the gradients through both.
"""

import json
import math

import pytest
import torch

import neuralode

F64 = torch.float64
G = 9.81


def _fall(t, y):
    return torch.stack([y[1], torch.full_like(y[1], -G)])


def _bounce(restitution, direction=-1, **kwargs):
    return neuralode.Event(lambda t, y: y[0], direction=direction, name="ground",
                           affect=lambda t, y: torch.stack([y[0], -restitution * y[1]]), **kwargs)


def _closed_form(h0, e, t_end):
    """Impact times before t_end, and the height at t_end."""
    t1 = math.sqrt(2 * h0 / G)
    impacts, speed = [t1], G * t1
    while True:
        speed *= e
        landing = impacts[-1] + 2 * speed / G
        if landing >= t_end:
            break
        impacts.append(landing)
    tau = t_end - impacts[-1]
    return impacts, speed * tau - 0.5 * G * tau ** 2


@pytest.mark.parametrize("method", ["tsit5", "dopri5"])
def test_a_bouncing_ball_follows_its_closed_form(method):
    t = torch.linspace(0.0, 8.0, 17, dtype=F64)
    sol = neuralode.solve(_fall, torch.tensor([10.0, 0.0], dtype=F64), t, method=method, rtol=1e-10, atol=1e-10,
                          events=[_bounce(0.8)])
    impacts, height = _closed_form(10.0, 0.8, 8.0)
    assert sol.status == "success" and sol.ts.shape == (17,) and sol.ys.shape == (17, 2)
    assert len(sol.events) == len(impacts) == 4
    assert all(r.name == "ground" and r.direction == -1 for r in sol.events)
    assert max(abs(float(r.t) - exact) for r, exact in zip(sol.events, impacts)) < 1e-11
    assert abs(float(sol.ys[-1, 0]) - height) < 1e-9
    # between impacts the height never goes below the ground (a restart that re-fired would show as a dip)
    assert float(sol.ys[:, 0].min()) > -1e-9
    # the counts are summed over the stretches between jumps, as read and as written to JSON
    assert json.loads(json.dumps(sol.stats)) == dict(sol.stats.items())
    assert sol.stats["n_accepted"] + sol.stats["n_rejected"] == sol.stats["n_steps"]


@pytest.mark.parametrize("gradient", ["direct", "checkpoint", "adjoint", neuralode.Adjoint(interpolate=True)],
                         ids=["direct", "checkpoint", "adjoint", "interpolating"])
def test_gradients_through_the_bounces_match_the_closed_form(gradient):
    """d y(5) / d e and d y(5) / d h0 through two bounces: the event times move with both, and the affect's
    velocity depends on e and on the impact speed."""
    e = torch.tensor(0.8, dtype=F64, requires_grad=True)
    h0 = torch.tensor(10.0, dtype=F64, requires_grad=True)
    sol = neuralode.solve(_fall, torch.stack([h0, torch.zeros((), dtype=F64)]), torch.tensor([0.0, 5.0], dtype=F64),
                          rtol=1e-10, atol=1e-10, events=[_bounce(e)], gradient=gradient, adjoint_params=(e,))
    grads = torch.autograd.grad(sol.ys[-1, 0], (e, h0))
    step = 1e-6
    exact_e = (_closed_form(10.0, 0.8 + step, 5.0)[1] - _closed_form(10.0, 0.8 - step, 5.0)[1]) / (2 * step)
    exact_h = (_closed_form(10.0 + step, 0.8, 5.0)[1] - _closed_form(10.0 - step, 0.8, 5.0)[1]) / (2 * step)
    assert abs(float(grads[0]) - exact_e) < 1e-6 * abs(exact_e)
    assert abs(float(grads[1]) - exact_h) < 1e-6 * abs(exact_h)


@pytest.mark.parametrize("before", [[], [1.0]], ids=["jump first", "an output before it"])
def test_restarts_do_not_fire_again_and_an_output_at_the_jump_gets_the_new_state(before):
    sol = neuralode.solve(_fall, torch.tensor([10.0, 0.0], dtype=F64), torch.tensor([0.0, 5.0], dtype=F64),
                          rtol=1e-12, atol=1e-12, events=[_bounce(0.8)])
    jump = float(sol.events[0].t)   # the located time, so that an output time equals it exactly
    t = torch.tensor([0.0, *before, jump, 4.0], dtype=F64)
    # both directions watched: a root located a rounding below the ground must not count as a rise after the bounce
    sol = neuralode.solve(_fall, torch.tensor([10.0, 0.0], dtype=F64), t, rtol=1e-12, atol=1e-12,
                          events=[_bounce(0.8, direction=0)])
    assert [r.direction for r in sol.events] == [-1, -1]
    assert sol.ts.tolist() == t.tolist()            # each output time once (the jump's was given twice before)
    at_jump = sol.ys[len(before) + 1]
    assert abs(float(at_jump[0])) < 1e-9 and abs(float(at_jump[1]) - 0.8 * G * jump) < 1e-9   # after the jump


def test_events_at_the_same_time_all_occur_and_a_recording_event_on_the_jumps_root_counts_once():
    doses = [neuralode.Event(lambda t, y: t - 1.0, name="A", affect=lambda t, y: y + torch.tensor([1.0, 0.0])),
             neuralode.Event(lambda t, y: t - 1.0, name="B", affect=lambda t, y: y + torch.tensor([0.0, 1.0]))]
    sol = neuralode.solve(lambda t, y: -0.5 * y, torch.zeros(2, dtype=F64), torch.tensor([0.0, 3.0], dtype=F64),
                          rtol=1e-10, atol=1e-10, events=doses)
    assert [r.name for r in sol.events] == ["A", "B"]                 # both applied, in the order given
    torch.testing.assert_close(sol.ys[-1], torch.full((2,), math.exp(-1.0), dtype=F64))
    touch = neuralode.Event(lambda t, y: y[0], name="touch", terminal=2)
    for events in ([_bounce(0.8), touch], [touch, _bounce(0.8)]):
        sol = neuralode.solve(_fall, torch.tensor([10.0, 0.0], dtype=F64), torch.tensor([0.0, 8.0], dtype=F64),
                              rtol=1e-10, atol=1e-10, events=events)
        touches = [(round(float(r.t), 4), r.direction) for r in sol.events if r.name == "touch"]
        assert touches == [(1.4278, -1), (3.7124, -1)]               # once per bounce, downwards
        assert sol.status == "event" and abs(float(sol.event_t) - 3.7124) < 1e-4   # its second occurrence


@pytest.mark.parametrize("restitution, rtol", [(0.8, 1e-10), (0.8, 1e-7), (0.1, 1e-7), (1e-3, 1e-4)])
def test_a_zeno_point_is_an_error_not_a_fall_through_the_floor(restitution, rtol):
    """Infinitely many bounces before t = t1 (1 + e) / (1 - e). A hop shorter than the first step's sample spacing
    must still be found: the ball fell through the floor with success before (h(20) = -250.7 at e = 0.8, rtol 1e-7:
    after a jump the height started at 0, so its return below 0 in the first step was no crossing)."""
    y0, t = torch.tensor([10.0, 0.0], dtype=F64), torch.tensor([0.0, 30.0], dtype=F64)
    zeno = math.sqrt(2 * 10.0 / G) * (1 + restitution) / (1 - restitution)
    kwargs = dict(rtol=rtol, atol=rtol, events=[_bounce(restitution)])
    with pytest.raises(neuralode.StepSizeUnderflowError, match=r"accumulate at t=.*Zeno point"):
        neuralode.solve(_fall, y0, t, **kwargs)
    sol = neuralode.solve(_fall, y0, t, throw=False, **kwargs)
    assert sol.status == "step_size_underflow" and sol.event_t is None
    assert abs(float(sol.events[-1].t) - zeno) < 1e-3 * zeno
    assert float(sol.ys[:, 0].min()) > -1e-6       # never below the floor at the outputs reached


def test_the_step_budget_spans_the_jumps_and_is_named_whole():
    y0, t = torch.tensor([10.0, 0.0], dtype=F64), torch.linspace(0.0, 8.0, 9, dtype=F64)
    sol = neuralode.solve(_fall, y0, t, events=[_bounce(0.8)], throw=False, options={"max_num_steps": 8})
    assert sol.status == "max_steps_reached" and sol.stats["n_steps"] == 8 and len(sol.events) >= 1
    with pytest.raises(neuralode.MaxStepsError, match=r"max_num_steps=8, counted over all \d+ stretches"):
        neuralode.solve(_fall, y0, t, events=[_bounce(0.8)], options={"max_num_steps": 8})
    controller = neuralode.IntegralController(max_num_steps=8)
    sol = neuralode.solve(_fall, y0, t, events=[_bounce(0.8)], throw=False, controller=controller)
    assert sol.status == "max_steps_reached" and sol.stats["n_steps"] == 8


def test_terminal_counts_recorded_events_and_pytree_states_across_the_jumps():
    field = lambda t, y: {"h": y["v"], "v": torch.full_like(y["v"], -G)}  # noqa: E731
    ground = neuralode.Event(lambda t, y: y["h"], direction=-1, terminal=3,
                             affect=lambda t, y: {"v": -0.9 * y["v"], "h": y["h"]})
    apex = neuralode.Event(lambda t, y: y["v"], direction=-1, name="apex")
    y0 = {"h": torch.tensor(10.0, dtype=F64), "v": torch.tensor(0.0, dtype=F64)}
    sol = neuralode.solve(field, y0, torch.linspace(0.0, 20.0, 5, dtype=F64), events=[ground, apex],
                          rtol=1e-10, atol=1e-10)
    assert [r.index for r in sol.events] == [0, 1, 0, 1, 0]
    impacts, speed = [math.sqrt(2 * 10.0 / G)], G * math.sqrt(2 * 10.0 / G)
    for _ in range(2):
        speed *= 0.9
        impacts.append(impacts[-1] + 2 * speed / G)
    assert abs(float(sol.events[1].t) - (impacts[0] + 0.9 * G * impacts[0] / G)) < 1e-9   # the apex after a bounce
    # the third impact stops the solve, before its affect: event_y is the state reached, falling
    assert sol.status == "event" and abs(float(sol.event_t) - impacts[2]) < 1e-9
    assert float(sol.event_y["v"]) < 0 and sol.ts.tolist() == [0.0, 5.0]


def test_an_affect_that_returns_the_wrong_state_is_named():
    y0, t = torch.tensor([10.0, 0.0], dtype=F64), torch.linspace(0.0, 5.0, 3, dtype=F64)

    def solve_with(affect, **kwargs):
        return neuralode.solve(_fall, y0, t, events=[neuralode.Event(lambda t, y: y[0], name="ground",
                                                                     affect=affect)], **kwargs)

    with pytest.raises(ValueError, match=r"affect of event 'ground' returned a tensor of shape \(\) .* state has "
                                         r"\(2,\)"):
        solve_with(lambda t, y: y[0])
    with pytest.raises(ValueError, match=r"dtype torch.float32 where the state has \(2,\) and torch.float64"):
        solve_with(lambda t, y: y.float())
    with pytest.raises(TypeError, match=r"affect of event 'ground' returned tuple; it must return the new state"):
        solve_with(lambda t, y: (y,))
    with pytest.raises(TypeError, match=r"Event affect must be callable"):
        neuralode.Event(lambda t, y: y[0], affect=1.0)
    with pytest.raises(TypeError, match=r"affect is called as affect\(t, y\).*takes neither two nor three"):
        neuralode.Event(lambda t, y: y[0], affect=lambda y: y)
    with pytest.raises(ValueError, match=r"Event tol cannot be combined with an affect"):
        neuralode.Event(lambda t, y: y[0], affect=lambda t, y: y, tol=1e-3)
    with pytest.raises(neuralode.NonFiniteError, match=r"affect of event 'ground' returned NaN or infinite values"):
        solve_with(lambda t, y: y * math.nan)
    failed = solve_with(lambda t, y: y * math.nan, throw=False)
    assert failed.status == "non_finite" and failed.ts.tolist() == [0.0]


def test_an_affect_may_change_the_state_in_place_and_fixed_steps_restart_from_the_cubic_interpolant():
    e = torch.tensor(0.8, dtype=F64, requires_grad=True)

    def bounce_in_place(t, y):     # SciML's affect!: changes y (a copy of the solve's state) and returns None
        y[1] = -e * y[1].clone()   # (autograd's rule: the product must not save the view it overwrites)

    t = torch.tensor([0.0, 5.0], dtype=F64)
    sol = neuralode.solve(_fall, torch.tensor([10.0, 0.0], dtype=F64), t, rtol=1e-10, atol=1e-10,
                          events=[neuralode.Event(lambda t, y: y[0], direction=-1, affect=bounce_in_place)])
    (grad,) = torch.autograd.grad(sol.ys[-1, 0], e)
    step = 1e-6
    exact = (_closed_form(10.0, 0.8 + step, 5.0)[1] - _closed_form(10.0, 0.8 - step, 5.0)[1]) / (2 * step)
    assert abs(float(sol.ys[-1, 0]) - _closed_form(10.0, 0.8, 5.0)[1]) < 1e-9
    assert abs(float(grad) - exact) < 1e-6 * abs(exact)
    # rk4 with fixed steps integrates the fall exactly; a jump restarts from the interpolant at the event, which is
    # the cubic one (exact here) unless interp is given: the linear one left 7e-4 in the height
    sol = neuralode.solve(_fall, torch.tensor([10.0, 0.0], dtype=F64), t, method="rk4",
                          options={"step_size": 0.01}, events=[_bounce(0.8)])
    assert abs(float(sol.ys[-1, 0]) - _closed_form(10.0, 0.8, 5.0)[1]) < 1e-9


def test_dense_output_is_piecewise_and_right_continuous_at_the_jumps():
    e = torch.tensor(0.8, dtype=F64, requires_grad=True)
    sol = neuralode.solve(_fall, torch.tensor([10.0, 0.0], dtype=F64), torch.tensor([0.0, 5.0], dtype=F64),
                          rtol=1e-10, atol=1e-10, events=[_bounce(e)], dense=True)
    t1 = math.sqrt(2 * 10.0 / G)
    speed = 0.8 * G * t1                                   # upwards after the first bounce
    t2 = t1 + 2 * speed / G

    def height(t):
        return (10.0 - 0.5 * G * t * t if t < t1 else
                speed * (t - t1) - 0.5 * G * (t - t1) ** 2 if t < t2 else
                0.8 * speed * (t - t2) - 0.5 * G * (t - t2) ** 2)

    query = torch.tensor([0.5, t1, t1 + 0.3, t2 + 0.1, 5.0], dtype=F64)
    values = sol.evaluate(query).detach()
    assert max(abs(float(v) - height(float(x))) for x, v in zip(query, values[:, 0])) < 1e-9
    assert abs(float(values[1, 1]) - speed) < 1e-9                          # at the jump: the state after it
    assert abs(float(sol.derivative(t1 + 0.3)[1]) + G) < 1e-9                # the slope of the stretch after it
    ends = sol.step_times
    assert ends[-1] == 5.0 and bool((ends[1:] > ends[:-1]).all())
    assert min(abs(float(x) - t1) for x in ends) < 1e-12                      # a stretch ends at each jump
    # the dense output differentiates through the jumps too (direct strategy): d height(4) / d e
    (grad,) = torch.autograd.grad(sol.evaluate(4.0)[0], e)
    step = 1e-6
    exact = (_closed_form(10.0, 0.8 + step, 4.0)[1] - _closed_form(10.0, 0.8 - step, 4.0)[1]) / (2 * step)
    assert abs(float(grad) - exact) < 1e-6 * abs(exact)


def test_a_ball_left_on_the_floor_by_its_affect_does_not_fall_through_it():
    """An affect that puts the height at exactly 0 (a changed element, so not 'left where it was'), or leaves the
    ball at rest (slope 0): both fell through the floor with status success (h(3) = -12.1 for e = 0). The element
    now starts with the sign it leaves the root with, or where that is 0 the sign it had before it crossed."""
    y0, t = torch.tensor([10.0, 0.0], dtype=F64), torch.tensor([0.0, 14.0], dtype=F64)
    snap = neuralode.Event(lambda t, y: y[0], direction=-1,
                           affect=lambda t, y: torch.stack([torch.zeros_like(y[0]), -0.8 * y[1]]))
    dead = neuralode.Event(lambda t, y: y[0], direction=-1, affect=lambda t, y: torch.stack([y[0], 0.0 * y[1]]))
    for event in (snap, dead):
        sol = neuralode.solve(_fall, y0, t, rtol=1e-8, atol=1e-8, events=[event], throw=False)
        assert sol.status == "step_size_underflow" and "accumulate" in sol.message
        assert float(sol.ys[:, 0].min()) > -1e-6


def test_a_learnable_threshold_in_a_plain_event_function_gets_its_gradient():
    """Integrate-and-fire (v' = I - v, reset to 0 at v = theta): the spike period ln(I / (I - theta)) moves with a
    threshold the event function closes over; it got no gradient (None) unless the function was a Module."""
    current, end = 2.0, 5.0

    def v_end(theta):
        period = math.log(current / (current - theta))
        return current * (1 - math.exp(-(end - int(end / period) * period)))

    step = 1e-6
    exact = (v_end(0.9 + step) - v_end(0.9 - step)) / (2 * step)
    for gradient in ("direct", "checkpoint", "adjoint"):
        theta = torch.tensor(0.9, dtype=F64, requires_grad=True)
        spike = neuralode.Event(lambda t, v: v - theta, direction=1, affect=lambda t, v: torch.zeros_like(v))
        sol = neuralode.solve(lambda t, v: current - v, torch.zeros(1, dtype=F64), torch.tensor([0.0, end], dtype=F64),
                              rtol=1e-10, atol=1e-10, gradient=gradient, events=[spike], adjoint_params=())
        (grad,) = torch.autograd.grad(sol.ys[-1, 0], theta)
        assert abs(float(grad) - exact) < 1e-6 * abs(exact), gradient


def test_different_elements_firing_a_rounding_apart_are_no_zeno_point():
    """Two neurons with drives 2e-15 apart fire within the time's resolution of each other: two events, not an
    accumulation of one (it was reported as a Zeno point)."""
    def reset_the_one_that_fired(t, v):
        out = v.clone()
        out[torch.argmax(v)] = 0.0
        return out

    drive = torch.tensor([2.0, 2.0 + 2e-15, 3.0], dtype=F64)
    sol = neuralode.solve(lambda t, v: drive - v, torch.zeros(3, dtype=F64), torch.tensor([0.0, 3.0], dtype=F64),
                          rtol=1e-10, atol=1e-10, events=[neuralode.Event(lambda t, v: v - 1.0, direction=1,
                                                                          affect=reset_the_one_that_fired)])
    expected = sum(int(3.0 / math.log(i / (i - 1.0))) for i in (2.0, 2.0, 3.0))
    assert sol.success and len(sol.events) == expected == 15


def test_an_affect_with_three_arguments_is_told_which_elements_fired():
    """Integrate-and-fire neurons v' = I (threshold 1, reset to 0): affect(t, v, fired) resets only the neurons that
    fired (SciML's affect!(integrator, idx)); each then spikes at multiples of 1 / I, so v(T) = frac(I T)."""
    seen = []

    def reset_fired(t, v, fired):
        seen.append(fired.clone())
        return torch.where(fired, torch.zeros_like(v), v)

    drive = torch.tensor([1.0, 1.7, 0.3], dtype=F64)
    end = 2.5
    sol = neuralode.solve(lambda t, v: drive.clone(), torch.zeros(3, dtype=F64), torch.tensor([0.0, end], dtype=F64),
                          rtol=1e-10, atol=1e-10, events=[neuralode.Event(lambda t, v: v - 1.0, direction=1,
                                                                          affect=reset_fired)])
    expected = torch.frac(drive * end)
    assert torch.allclose(sol.ys[-1], expected, atol=1e-8)
    # one neuron at a time (their spike times differ), each mask of the event function's shape
    assert all(mask.shape == (3,) and mask.dtype == torch.bool and int(mask.sum()) == 1 for mask in seen)
    assert len(seen) == int(1.0 * end) + int(1.7 * end) + int(0.3 * end) == 6
    # a scalar event function: a 0-dim mask
    masks = []
    ball = neuralode.solve(lambda t, y: torch.stack([y[1], torch.tensor(-9.81, dtype=F64)]),
                           torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), rtol=1e-9,
                           atol=1e-9, events=[neuralode.Event(lambda t, y: y[0], direction=-1,
                                                              affect=lambda t, y, fired: masks.append(fired) or
                                                              torch.stack([y[0], -0.5 * y[1]]))])
    assert ball.success and masks and all(m.shape == () and bool(m) for m in masks)
