"""torchdiffeq's public API beyond odeint: step callbacks, implicit_adams, scipy_solver, odeint_dense.

torchdiffeq is the reference only where the point is compatibility (same numbers for the same
algorithm); accuracy is checked against closed forms.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import neuralode
from neuralode.methods import REGISTRY

A = torch.tensor([[-0.3, 1.0], [-1.0, -0.2]], dtype=torch.float64)
Y0 = torch.tensor([1.0, 0.5], dtype=torch.float64)


def linear(t, y):
    return y @ A.T.to(y.dtype)


def exact(t):
    return torch.stack([torch.linalg.matrix_exp(A * float(ti)) @ Y0 for ti in t])


class Field(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(2, 2).double()

    def forward(self, t, y):
        return torch.tanh(self.linear(y))


def _counting(module, names):
    counts = dict.fromkeys(names, 0)
    seen = []
    for name in names:
        def callback(t0, y0, dt, _name=name):
            counts[_name] += 1
            seen.append((_name, t0, y0, dt))
        setattr(module, name, callback)
    return counts, seen


# --- callbacks -----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3", "adaptive_heun", "dopri8", "adams"])
def test_adaptive_callbacks_forward_and_adjoint(method):
    f = Field()
    names = ["callback_step", "callback_accept_step", "callback_reject_step"]
    counts, seen = _counting(f, names + [n + "_adjoint" for n in names])
    t = torch.tensor([0.0, 2.0], dtype=torch.float64)
    # (the second-order adaptive_heun at rtol 1e-8 took thousands of steps, 17 s, for the same assertions)
    tol = 1e-5 if method == "adaptive_heun" else 1e-8
    sol = neuralode.solve(f, Y0.clone().requires_grad_(True), t, method=method, gradient="adjoint",
                          rtol=tol, atol=tol)
    # Before the backward pass only the forward callbacks ran: one per attempted step.
    assert counts["callback_step"] == sol.stats["n_steps"] > 0
    assert counts["callback_accept_step"] == sol.stats["n_accepted"]
    assert counts["callback_reject_step"] == sol.stats["n_rejected"]
    assert counts["callback_step_adjoint"] == 0
    sol.ys.sum().backward()
    assert counts["callback_step_adjoint"] > 0
    assert counts["callback_accept_step_adjoint"] + counts["callback_reject_step_adjoint"] == \
        counts["callback_step_adjoint"]
    # Arguments: real time, the state in the user's shape, a positive step length.
    first = seen[0]
    assert first[0] == "callback_step" and first[1].item() == 0.0 and first[2].shape == (2,) and first[3] > 0
    adjoint_calls = [s for s in seen if s[0] == "callback_step_adjoint"]
    y, a, *param_adjoints = adjoint_calls[0][2]
    assert y.shape == a.shape == (2,) and [p.shape for p in param_adjoints] == [(2, 2), (2,)]
    assert adjoint_calls[0][1].item() == pytest.approx(2.0)  # the backward solve starts at the end


def test_callback_times_run_backwards_with_decreasing_t():
    f = Field()
    counts, seen = _counting(f, ["callback_accept_step"])
    neuralode.odeint(f, Y0, torch.tensor([1.0, 0.0], dtype=torch.float64))
    times = [s[1].item() for s in seen]
    assert times[0] == 1.0 and all(b < a for a, b in zip(times, times[1:]))
    assert all(s[3] > 0 for s in seen)  # dt is the step length in the direction of integration


@pytest.mark.parametrize("method", ["euler", "rk4", "explicit_adams", "implicit_adams"])
def test_fixed_grid_callback_step_once_per_step(method):
    f = Field()
    counts, _ = _counting(f, ["callback_step", "callback_step_adjoint"])
    out = neuralode.odeint_adjoint(f, Y0.clone().requires_grad_(True), torch.tensor([0.0, 1.0], dtype=torch.float64),
                                   method=method, options={"step_size": 0.1})
    assert counts["callback_step"] == 10
    out.sum().backward()
    assert counts["callback_step_adjoint"] == 10


@pytest.mark.parametrize("method,names", [("rk4", ["callback_accept_step"]), ("euler", ["callback_reject_step"]),
                                          ("scipy_solver", ["callback_step"])])
def test_callback_the_method_cannot_call_warns(method, names):
    f = Field()
    _counting(f, names)
    options = {"step_size": 0.1} if not REGISTRY[method].adaptive else None
    with pytest.warns(UserWarning, match=f"does not support callbacks.*{names[0]}"):
        neuralode.odeint(f, Y0, torch.tensor([0.0, 1.0], dtype=torch.float64), method=method, options=options)


def test_no_callbacks_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        neuralode.odeint(Field(), Y0, torch.tensor([0.0, 1.0], dtype=torch.float64), method="rk4",
                         options={"step_size": 0.1})


# --- implicit_adams ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["implicit_adams", "fixed_adams"])
def test_implicit_adams_converges_at_high_order(name):
    t = torch.linspace(0, 3, 7, dtype=torch.float64)
    errors = []
    steps = [0.1, 0.05, 0.025]
    for h in steps:
        # The corrector iterates to rtol/atol relative to the step's increment (torchdiffeq's test):
        # much tighter than the default and it stops converging in max_iters, dropping the order.
        ys = neuralode.odeint(linear, Y0, t, method=name, options={"step_size": h, "max_order": 12})
        errors.append(float((ys - exact(t)).abs().max()))
    slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert slope > 4.5, (slope, errors)  # the fourth-order start-up steps cap it near 5


def test_implicit_adams_matches_torchdiffeq():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    t = torch.linspace(0, 3, 7, dtype=torch.float64)
    for options in [{"step_size": 0.1}, {"step_size": 0.05, "max_order": 6}, {"step_size": 0.1, "max_iters": 1}]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = neuralode.odeint(linear, Y0, t, method="implicit_adams", options=options)
            theirs = torchdiffeq.odeint(linear, Y0, t, method="implicit_adams", options=options)
        torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-14)


def test_implicit_adams_warns_when_the_corrector_does_not_converge():
    with pytest.warns(UserWarning, match="Functional iteration did not converge"):
        neuralode.odeint(linear, Y0, torch.tensor([0.0, 1.0], dtype=torch.float64), method="implicit_adams",
                         options={"step_size": 0.1, "max_iters": 1}, rtol=1e-14, atol=1e-16)


def test_implicit_adams_options_are_checked():
    with pytest.raises(ValueError, match="max_order.*1..12"):
        neuralode.odeint(linear, Y0, torch.tensor([0.0, 1.0], dtype=torch.float64), method="implicit_adams",
                         options={"step_size": 0.1, "max_order": 13})
    with pytest.warns(UserWarning, match="reduces to"):
        neuralode.odeint(linear, Y0, torch.tensor([0.0, 1.0], dtype=torch.float64), method="implicit_adams",
                         options={"step_size": 0.1, "max_order": 3})


def test_implicit_adams_gradients_agree():
    y0 = Y0.clone().requires_grad_(True)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    f = Field()
    grads = []
    for gradient in ["direct", "adjoint"]:
        y0.grad = None
        neuralode.solve(f, y0, t, method="implicit_adams", options={"step_size": 0.01}, gradient=gradient,
                        rtol=1e-10, atol=1e-12).ys.sum().backward()
        grads.append(y0.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-8)


# --- scipy_solver --------------------------------------------------------------------------------

@pytest.mark.parametrize("solver", ["LSODA", "RK45", "RK23", "DOP853", "Radau", "BDF"])
@pytest.mark.parametrize("direction", [1, -1])
def test_scipy_solver_accuracy(solver, direction):
    pytest.importorskip("scipy")
    t = torch.linspace(0, 3, 7, dtype=torch.float64)
    t = t if direction == 1 else t.flip(0) - 3.0
    ys = neuralode.odeint(linear, Y0, t, method="scipy_solver", options={"solver": solver}, rtol=1e-10, atol=1e-12)
    reference = torch.stack([torch.linalg.matrix_exp(A * float(ti - t[0])) @ Y0 for ti in t])
    torch.testing.assert_close(ys, reference, rtol=1e-6, atol=1e-8)


def test_scipy_solver_matches_torchdiffeq_and_keeps_dtype():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    # float64 times: scipy sees the same numbers from both (with float32 times torchdiffeq hands scipy a
    # float32 t_eval, and results differ in the last float32 digits).
    t = torch.linspace(0, 3, 7, dtype=torch.float64)
    for solver in ["LSODA", "RK45"]:
        for y0 in [Y0, Y0.float()]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torchdiffeq passes min_step to RK45, which warns
                ours = neuralode.odeint(linear, y0, t, method="scipy_solver", options={"solver": solver})
                theirs = torchdiffeq.odeint(linear, y0, t, method="scipy_solver", options={"solver": solver})
            assert ours.dtype == y0.dtype and torch.equal(ours[0], y0)  # torchdiffeq: scipy's rounded copy
            torch.testing.assert_close(ours[1:], theirs[1:], rtol=0, atol=0)


def test_scipy_solver_min_step_warns_where_scipy_ignores_it():
    """min_step reaches LSODA only; with another solver it was dropped without a word."""
    t = torch.linspace(0, 1, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match="'min_step' of method 'scipy_solver' applies to solver='LSODA' only"):
        neuralode.odeint(linear, Y0, t, method="scipy_solver", options={"solver": "RK45", "min_step": 1e-3})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        neuralode.odeint(linear, Y0, t, method="scipy_solver", options={"solver": "LSODA", "min_step": 1e-3})
        neuralode.odeint(linear, Y0, t, method="scipy_solver", options={"solver": "RK45"})


def test_scipy_solver_gradients_by_the_adjoint():
    f = Field()
    y0 = Y0.clone().requires_grad_(True)
    t = torch.linspace(0, 1, 3, dtype=torch.float64)
    neuralode.odeint_adjoint(f, y0, t, method="scipy_solver", rtol=1e-10, atol=1e-12).sum().backward()
    adjoint_grad = y0.grad.clone()
    y0.grad = None
    neuralode.odeint(f, y0, t, method="dopri5", rtol=1e-10, atol=1e-12).sum().backward()
    torch.testing.assert_close(adjoint_grad, y0.grad, rtol=1e-6, atol=1e-8)
    with pytest.warns(UserWarning, match="carries no gradient"):
        out = neuralode.odeint(f, y0, t, method="scipy_solver")
    assert not out.requires_grad
    # Times that require grad do not attach a partial graph either (it gave dL/dt without the path through
    # y0 and dL/dt0 = 0): under direct nothing of the result is differentiable; the adjoint gives all of it.
    t_grad = t.clone().requires_grad_(True)
    with pytest.warns(UserWarning, match="carries no gradient"):
        out = neuralode.odeint(f, y0, t_grad, method="scipy_solver")
    with pytest.warns(UserWarning, match="carries no gradient"):
        out_t_only = neuralode.odeint(f, Y0, t_grad, method="scipy_solver")
    assert not out.requires_grad and not out_t_only.requires_grad
    neuralode.odeint_adjoint(f, y0, t_grad, method="scipy_solver", rtol=1e-10, atol=1e-12).sum().backward()
    t_ref = t.clone().requires_grad_(True)
    neuralode.odeint(f, y0.detach(), t_ref, method="dopri5", rtol=1e-10, atol=1e-12).sum().backward()
    torch.testing.assert_close(t_grad.grad, t_ref.grad, rtol=1e-6, atol=1e-8)


def test_scipy_solver_errors():
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="option 'solver'.*LSODA"):
        neuralode.odeint(linear, Y0, t, method="scipy_solver", options={"solver": "RK99"})
    with pytest.raises(ValueError, match="does not support events"):
        neuralode.odeint(linear, Y0, t, method="scipy_solver", event_fn=lambda t, y: y[0])
    with pytest.raises(ValueError, match="checkpoint.*scipy"):
        neuralode.solve(linear, Y0, t, method="scipy_solver", gradient="checkpoint")
    sol = neuralode.solve(lambda t, y: y ** 2, torch.ones(1, dtype=torch.float64), torch.tensor([0.0, 2.0],
                          dtype=torch.float64), method="scipy_solver", options={"solver": "RK45"}, throw=False)
    assert sol.status != "success" and "scipy" in sol.message and torch.isfinite(sol.ys).all()
    # scipy has no step cap of its own: LSODA past the blow-up of y' = y^2 stops at max_num_steps.
    capped = neuralode.solve(lambda t, y: y ** 2, torch.ones(1, dtype=torch.float64),
                             torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64), method="scipy_solver",
                             options={"max_num_steps": 2000}, throw=False)
    assert not capped.success and capped.ys.shape[0] == 2 and torch.isfinite(capped.ys).all()
    nan_field = neuralode.solve(lambda t, y: y * (math.nan if float(t) > 0.5 else -1.0), torch.ones(1, dtype=torch.float64),
                                torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64), method="scipy_solver", throw=False)
    assert nan_field.status == "non_finite" and nan_field.ys.shape[0] == 2


def test_scipy_solver_dense_output():
    sol = neuralode.solve(linear, Y0, torch.tensor([0.0, 3.0], dtype=torch.float64), method="scipy_solver",
                          options={"solver": "DOP853"}, rtol=1e-10, atol=1e-12, dense=True)
    # scipy's interpolant between its (long) steps, not the step values: looser than rtol.
    torch.testing.assert_close(sol.evaluate(torch.tensor([0.7, 1.9])), exact([0.7, 1.9]), rtol=1e-6, atol=1e-7)
    assert sol.stats["n_accepted"] == len(sol.step_times) > 1


# --- odeint_dense --------------------------------------------------------------------------------

@pytest.mark.parametrize("method", [None, "tsit5", "dopri8", "adams", "rk4"])
def test_odeint_dense(method):
    options = {"step_size": 0.01} if method == "rk4" else None
    y0 = Y0.clone().requires_grad_(True)
    dense = neuralode.odeint_dense(linear, y0, torch.tensor(0.0, dtype=torch.float64),
                                   torch.tensor(3.0, dtype=torch.float64), method=method, options=options,
                                   rtol=1e-9, atol=1e-11)
    values = dense(torch.tensor([0.0, 0.7, 3.0], dtype=torch.float64))
    assert values.shape == (3, 2)
    torch.testing.assert_close(values, exact([0.0, 0.7, 3.0]), rtol=1e-6, atol=1e-7)
    assert dense(1.5).shape == (2,)
    dense(1.5).sum().backward()
    expected = torch.linalg.matrix_exp(A * 1.5).sum(0)  # d(sum y(1.5))/dy0 = 1^T expm(1.5 A)
    torch.testing.assert_close(y0.grad, expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError):
        dense(3.5)


def test_odeint_dense_matches_torchdiffeq_inside_the_span():
    torchdiffeq = pytest.importorskip("torchdiffeq")  # odeint_dense is in 0.2.5 and on master
    t0, t1 = torch.tensor(0.0, dtype=torch.float64), torch.tensor(3.0, dtype=torch.float64)
    ours = neuralode.odeint_dense(linear, Y0, t0, t1)
    theirs = torchdiffeq.odeint_dense(linear, Y0, t0, t1)
    for te in [0.0, 0.3, 1.1]:
        torch.testing.assert_close(ours(te), theirs(torch.tensor(te, dtype=torch.float64)), rtol=1e-12, atol=1e-14)


# --- found by torchdiffeq's own test suite run against neuralode ----------------------------------

def test_fixed_step_event_that_never_occurs_stops():
    """A fixed-step solve until an event that never comes ran forever (as torchdiffeq's does)."""
    with pytest.raises(neuralode.MaxStepsError, match="event did not occur.*max_num_steps=500"):
        neuralode.odeint(lambda t, y: -y, torch.ones(1), torch.tensor([0.0, 1.0]), method="euler",
                         options={"step_size": 0.1, "max_num_steps": 500}, event_fn=lambda t, y: y + 1)


def test_odeint_adjoint_event_time_is_in_the_graph():
    """torchdiffeq returns event_t from its adjoint function: backward through it runs (zero gradient)."""
    weight = torch.nn.Parameter(torch.tensor(0.2, dtype=torch.float64))
    y0 = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    event_t, ys = neuralode.odeint_adjoint(lambda t, y: weight + 0 * y, y0, torch.tensor([1.0, 2.0], dtype=torch.float64),
                                           event_fn=lambda t, y: y - 3.5, adjoint_params=(weight,))
    assert event_t.requires_grad and event_t.item() == pytest.approx(3.5)
    event_t.backward()


def test_callable_adjoint_norm_receives_torchdiffeq_tuple():
    seen = []

    def norm(x):
        seen.append(tuple(v.shape for v in x))
        return torch.cat([v.reshape(-1) for v in x]).abs().max()

    params = (torch.rand(7, requires_grad=True), torch.rand((), requires_grad=True))
    out = neuralode.odeint_adjoint(lambda t, x: x * params[1] + params[0].sum(), torch.tensor(1.0),
                                   torch.tensor([0.0, 1.0]), adjoint_params=params, adjoint_options={"norm": norm})
    out.sum().backward()
    assert seen and set(seen) == {((), (), (), (7,), ())}  # (t adjoint, y, a, *parameter adjoints)


def test_rk4_float32_event_time_is_accurate():
    """torchdiffeq's event test with rk4 in float32: the event time to 1e-4 relative; adding each stage
    increment to y in turn lost that to rounding (1.01e-4), summing increments first keeps it."""
    a, b = 0.2, 3.0
    target_t = 1 + 7 / 9 * 2
    for interp in ("cubic", "linear"):
        event_t, _ = neuralode.odeint(lambda t, y: a + (y - (a * t + b)) ** 5, torch.tensor(a + b),
                                      torch.tensor([1.0, 2.0], dtype=torch.float64), method="rk4",
                                      options={"step_size": 0.01, "interp": interp},
                                      event_fn=lambda t, y: y - (a * target_t + b))
        assert abs(event_t.item() - target_t) / target_t < 1e-4


def test_callable_adjoint_norm_splits_tuple_states():
    seen = []

    def norm(x):
        seen.append(len(x))
        return torch.cat([v.reshape(-1) for v in x]).abs().max()

    params = (torch.rand(3, requires_grad=True),)
    y0 = (torch.ones(2), torch.ones(3))
    out = neuralode.odeint_adjoint(lambda t, y: (-y[0], -y[1] * params[0]), y0, torch.tensor([0.0, 1.0]),
                                   adjoint_params=params, adjoint_options={"norm": norm})
    (out[0].sum() + out[1].sum()).backward()
    assert set(seen) == {6}  # (t adjoint, y_0, y_1, a_0, a_1, parameter adjoint), as torchdiffeq


@pytest.mark.parametrize("solver", ["LSODA", "RK45", "DOP853"])
def test_scipy_solver_complex_states(solver):
    """scipy's LSODA is real-only (torchdiffeq raises scipy's ValueError): it gets real and imaginary parts."""
    t = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    ys = neuralode.odeint(lambda t, y: 1j * y, torch.ones(2, dtype=torch.complex128), t, method="scipy_solver",
                          options={"solver": solver}, rtol=1e-9, atol=1e-10)
    assert ys.dtype == torch.complex128
    torch.testing.assert_close(ys[:, 0], torch.exp(1j * t), rtol=1e-7, atol=1e-8)


def test_scipy_solver_stops_when_lsoda_stops_advancing():
    """LSODA past the blow-up of y' = y^2 took steps of length zero indefinitely: now a NonFiniteError."""
    sol = neuralode.solve(lambda t, y: y * y, torch.ones(1, dtype=torch.float64),
                          torch.tensor([0.0, 0.5, 1.5], dtype=torch.float64), method="scipy_solver", rtol=1e-3,
                          atol=1e-6, throw=False)
    assert sol.status == "non_finite" and "diverges" in sol.message and sol.ys.shape[0] == 2


# --- numbers as torchdiffeq takes them (found by running torchdiffeq's own tests and probes against us) ---------

def _decay_case():
    y0 = torch.tensor([1.0, 0.5], dtype=torch.float64)
    return (lambda t, y: -y), y0, torch.linspace(0, 1, 3, dtype=torch.float64)


@pytest.mark.parametrize("given, plain", [
    (dict(rtol=np.float32(1e-5)), dict(rtol=float(np.float32(1e-5)))),
    (dict(atol=np.array([1e-8, 1e-6])), dict(atol=torch.tensor([1e-8, 1e-6], dtype=torch.float64))),
    (dict(rtol=[1e-6, 1e-3]), dict(rtol=torch.tensor([1e-6, 1e-3], dtype=torch.float64))),
    (dict(options=dict(first_step=np.float32(0.125))), dict(options=dict(first_step=0.125))),
    (dict(options=dict(max_step=np.float64(0.2), safety=np.float32(0.75))),
     dict(options=dict(max_step=0.2, safety=float(np.float32(0.75))))),
    (dict(options=dict(max_num_steps=np.int64(1000))), dict(options=dict(max_num_steps=1000))),
    (dict(options=dict(max_num_steps=1e5)), dict(options=dict(max_num_steps=100_000))),
    (dict(method="rk4", options=dict(step_size=np.float32(0.125))), dict(method="rk4", options=dict(step_size=0.125))),
    (dict(method="rk4", options=dict(step_size=0.1, perturb=None)), dict(method="rk4", options=dict(step_size=0.1))),
    (dict(method="rk4", options=dict(step_size=0.1, perturb=np.bool_(True))),
     dict(method="rk4", options=dict(step_size=0.1, perturb=True))),
])
def test_numpy_numbers_lists_and_none_are_taken_as_torchdiffeq_takes_them(given, plain):
    """numpy scalars and arrays, lists of tolerances, a float step count and perturb=None: the same solve as the
    plain Python (or tensor) value, not a TypeError."""
    f, y0, t = _decay_case()
    torch.testing.assert_close(neuralode.odeint(f, y0, t, **given), neuralode.odeint(f, y0, t, **plain),
                               rtol=0, atol=0)


def test_adjoint_tolerances_take_numpy_scalars():
    f, y0, t = _decay_case()
    y0 = y0.clone().requires_grad_(True)
    out = neuralode.odeint_adjoint(f, y0, t, adjoint_rtol=np.float32(1e-7), adjoint_atol=np.float64(1e-9),
                                   adjoint_params=())
    (grad,) = torch.autograd.grad(out[-1].sum(), y0)
    torch.testing.assert_close(grad, torch.full_like(grad, math.exp(-1.0)), rtol=1e-5, atol=0)


@pytest.mark.parametrize("given, message", [
    (dict(options=dict(max_num_steps=1.5)), r"'max_num_steps' must be a positive integer \(such as 10_000\), got 1.5"),
    (dict(options=dict(max_num_steps=np.int64(0))), "'max_num_steps' must be a positive integer"),
    (dict(rtol=np.bool_(True)), "rtol must be a float or a tensor, got bool"),
    (dict(atol=["a", "b"]), "atol must be a float or a tensor, got a list that is not numbers"),
    (dict(method="rk4", options=dict(step_size=0.1, perturb="yes")), "'perturb' must be True or False, got 'yes'"),
])
def test_what_is_not_a_number_is_still_refused(given, message):
    f, y0, t = _decay_case()
    with pytest.raises((TypeError, ValueError), match=message):
        neuralode.odeint(f, y0, t, **given)


def test_output_times_that_require_grad_cost_no_evaluations_until_backward():
    """f at the outputs (dL/dt_i = <dL/dy_i, f(t_i, y_i)>) is evaluated in backward, as torchdiffeq does: the
    forward pass calls f as often as with t detached (it called f once per output more, 150 against 50)."""
    calls = [0]

    def f(t, y):
        calls[0] += 1
        return -y

    y0 = torch.tensor([1.0, 0.5], dtype=torch.float64)
    t = torch.linspace(0, 1, 100, dtype=torch.float64)
    neuralode.odeint(f, y0, t)
    detached = calls[0]
    calls[0] = 0
    t_grad = t.clone().requires_grad_(True)
    out = neuralode.odeint(f, y0, t_grad)
    assert calls[0] <= detached + 1          # (+1: f(t0, y0) again, on the path of dL/dt0)
    out.pow(2).sum().backward()
    assert calls[0] >= detached + 99          # now f at the 99 later outputs
    # dL/dt_i = 2 <y_i, f(t_i, y_i)> = -2 |y_i|^2 for i >= 1, and dL/dt_0 = -sum_i dL/dt_i (a shift of the start)
    expected = -2 * out.detach().pow(2).sum(-1)
    torch.testing.assert_close(t_grad.grad[1:], expected[1:], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(t_grad.grad[0], -expected[1:].sum(), rtol=1e-5, atol=1e-8)
