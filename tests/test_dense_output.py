"""Dense output: Solution.evaluate reproduces the step values exactly, agrees with the saved outputs,
and converges at the order of the interpolant (log-log regression on one step from exact data)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import neuralode
from neuralode.solvers.runge_kutta import ExplicitRungeKutta
from neuralode.tableaus import TABLEAUS

F64 = torch.float64
RK_METHODS = sorted(TABLEAUS)
A = torch.tensor([[-0.1, 1.0], [-1.0, -0.1]], dtype=F64)
Y0 = torch.tensor([1.0, 0.5], dtype=F64)
INTERP_ORDER = {"dopri5": 4, "tsit5": 4, "dopri8": 7}  # published continuous extensions; cubic Hermite: 3


def spiral(t, y):
    return (y ** 3) @ torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=F64)


def _options(method, **extra):
    if TABLEAUS[method].adaptive:
        return dict(extra)
    return {"step_size": 0.05, "interp": "cubic", **extra}


@pytest.mark.parametrize("method", RK_METHODS)
def test_evaluate_reproduces_step_values_exactly(method):
    y0 = torch.tensor([[1.0, 0.0]], dtype=F64)
    t = torch.tensor([0.0, 3.0], dtype=F64)
    tol = dict(rtol=1e-5, atol=1e-7)  # exactness holds at any tolerance; loose keeps low orders fast
    sol = neuralode.solve(spiral, y0, t, method=method, dense=True, options=_options(method), **tol)
    steps = sol.step_times
    assert steps.dtype == F64 and steps[-1] == 3.0
    assert len(steps) == sol.stats["n_accepted"]
    # output times never change the steps, and an output time on a step end is the step value itself
    at_steps = neuralode.solve(spiral, y0, torch.cat([t[:1], steps]), method=method, options=_options(method),
                               **tol)
    assert at_steps.stats["n_accepted"] == sol.stats["n_accepted"]
    assert torch.equal(sol.evaluate(steps), at_steps.ys[1:])
    assert torch.equal(sol.evaluate(0.0), y0)
    assert torch.equal(sol.evaluate(3.0), sol.ys[-1])


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3", "rk4"])
def test_evaluate_agrees_with_saved_outputs(method):
    t = torch.linspace(0.0, 3.0, 37, dtype=F64)
    y0 = torch.tensor([[1.0, 0.0]], dtype=F64)
    sol = neuralode.solve(spiral, y0, t, method=method, dense=True, options=_options(method))
    assert torch.equal(sol.evaluate(t), sol.ys)


def test_evaluate_shapes_and_tuple_states():
    y0 = (torch.ones(2, dtype=F64), torch.ones(3, 1, dtype=F64))
    sol = neuralode.solve(lambda t, y: (-y[0], 2 * y[1]), y0, torch.tensor([0.0, 1.0], dtype=F64), dense=True)
    a, b = sol.evaluate(torch.tensor([[0.1, 0.2], [0.3, 0.4]], dtype=F64))
    assert a.shape == (2, 2, 2) and b.shape == (2, 2, 3, 1)
    assert torch.allclose(a[1, 1], torch.exp(torch.tensor(-0.4, dtype=F64)) * torch.ones(2, dtype=F64), atol=1e-7)
    x, m = sol.evaluate(0.5)
    assert x.shape == (2,) and m.shape == (3, 1)
    x, m = sol.evaluate(sol.step_times)
    assert torch.equal(x[-1], sol.ys[0][-1]) and torch.equal(m[-1], sol.ys[1][-1])


def test_evaluate_backwards_in_time():
    t = torch.tensor([2.0, 0.0], dtype=F64)
    sol = neuralode.solve(lambda t, y: A @ y, Y0, t, dense=True, rtol=1e-10, atol=1e-12)
    for s in (1.7, 1.0, 0.25):
        exact = torch.linalg.matrix_exp(A * (s - 2.0)) @ Y0
        assert (sol.evaluate(s) - exact).abs().max() < 1e-8
    assert torch.equal(sol.evaluate(sol.step_times), sol.evaluate(sol.step_times.clone()))
    assert (sol.step_times < 2.0).all() and sol.step_times[-1] == 0.0


def _interp_slope(method, interp=None):
    """Error at the midpoint of one step of size h taken from exact data, against h."""
    adaptive = TABLEAUS[method].adaptive
    hs = [1.6, 1.2, 0.8, 0.6] if method == "dopri8" else [0.4, 0.2, 0.1, 0.05]
    errs = []
    for h in hs:
        options = {"first_step": h, "min_step": h, "max_step": h} if adaptive else {"step_size": h, "interp": interp}
        sol = neuralode.solve(lambda t, y: A @ y, Y0, torch.tensor([0.0, h], dtype=F64), method=method,
                              options=options, dense=True)
        exact = torch.linalg.matrix_exp(A * 0.5 * h) @ Y0
        errs.append(float((sol.evaluate(0.5 * h) - exact).norm()))
    return float(np.polyfit(np.log(hs), np.log(errs), 1)[0])


@pytest.mark.parametrize("method", RK_METHODS)
def test_dense_output_order(method):
    """The local error of the interpolant is O(h**(min(q, p) + 1)), with q the interpolant's order and
    p the method's: Hermite interpolants use the method's y1 and f1, so they cannot beat it."""
    tab = TABLEAUS[method]
    q = INTERP_ORDER.get(method, 3)
    interp = None if tab.adaptive else "cubic"
    assert abs(_interp_slope(method, interp) - (min(q, tab.order) + 1)) < 0.3


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_linear_interpolation_for_fixed_grids_is_the_default(method):
    """Fixed grids interpolate linearly by default (torchdiffeq's default): local error O(h**2)."""
    assert abs(_interp_slope(method, "linear") - 2) < 0.3
    y0 = torch.tensor([1.0], dtype=F64)
    t = torch.tensor([0.0, 0.05, 0.1], dtype=F64)
    ys = neuralode.odeint(lambda t, y: -y, y0, t, method=method, options={"step_size": 0.1})
    assert torch.allclose(ys[1], 0.5 * (ys[0] + ys[2]), rtol=0, atol=1e-15)


def test_dense_output_global_accuracy_between_steps():
    """With dense=True the interpolant between steps is accurate to the solve's tolerance."""
    T = 10.0
    sol = neuralode.solve(lambda t, y: A @ y, Y0, torch.tensor([0.0, T], dtype=F64), dense=True, rtol=1e-8,
                          atol=1e-10)
    s = torch.linspace(0, T, 101, dtype=F64)
    ys = sol.evaluate(s)
    exact = torch.stack([torch.linalg.matrix_exp(A * si) @ Y0 for si in s.tolist()])
    assert (ys - exact).abs().max() < 1e-6


@pytest.mark.parametrize("name", sorted(TABLEAUS))
def test_dense_coefficients_summed_equal_the_stacked_product(name):
    """The compiled loop sums each dense coefficient's terms (``stacked=False``) instead of one matrix product
    over the stacked stages: the same polynomial to rounding, for every explicit method."""
    stepper = ExplicitRungeKutta(TABLEAUS[name])
    field = lambda t, y: torch.sin(y) * (1.0 + t)  # noqa: E731
    y0 = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    outcome = stepper.step(field, 0.0, y0, field(0.0, y0), 0.1, None)
    f1 = outcome.f1 if outcome.f1 is not None else field(0.1, outcome.y1)
    stacked = stepper.dense_coefficients(field, 0.0, y0, 0.1, outcome, f1)
    summed = stepper.dense_coefficients(field, 0.0, y0, 0.1, outcome, f1, stacked=False)
    assert len(summed) == len(stacked)
    for a, b in zip(summed, stacked):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-12)   # (coefficients are sums of O(1) terms)


@pytest.mark.parametrize("gradient", ["adjoint", "checkpoint"])
def test_dense_output_of_a_non_direct_gradient_warns_that_it_is_detached(gradient):
    """The strategies differentiate ys; their interpolants carry no graph. Rather than a silently detached
    evaluate(), the solve says so when a gradient is wanted (and stays quiet under no_grad)."""
    field = torch.nn.Linear(2, 2).double()
    func = lambda t, y: torch.tanh(field(y))  # noqa: E731
    y0 = torch.ones(2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    params = tuple(field.parameters())
    with pytest.warns(UserWarning, match=f"gradient='{gradient}' the dense output carries no gradient"):
        solution = neuralode.solve(func, y0, t, dense=True, gradient=gradient, adjoint_params=params)
    assert solution.ys.requires_grad and not solution.evaluate(0.5).requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            neuralode.solve(func, y0, t, dense=True, gradient=gradient)
        assert neuralode.solve(func, y0, t, dense=True).evaluate(0.5).requires_grad   # direct: differentiable


@pytest.mark.parametrize("gradient", ["direct", "adjoint", "checkpoint"])
def test_dense_output_of_a_solve_with_one_time_is_the_initial_value(gradient):
    # It raised "cannot unpack non-iterable NoneType object": a solution with no step had no span.
    y0 = torch.tensor([1.0, -2.0], requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # dense output under adjoint/checkpoint warns that it is detached
        sol = neuralode.solve(lambda t, y: -y, y0, torch.tensor([0.5]), dense=True, gradient=gradient,
                              adjoint_params=())
    assert torch.equal(sol.evaluate(0.5), y0.detach()) and sol.step_times.numel() == 0
    with pytest.raises(ValueError, match=r"outside the solved span \[0.5, 0.5\]"):
        sol.evaluate(0.6)


def test_dense_output_of_a_failed_fixed_grid_solve_ends_where_it_is_finite():
    # Fixed grids find non-finite values after the loop; ts/ys were cut back but evaluate() returned NaN.
    sol = neuralode.solve(lambda t, y: y ** 2, torch.tensor([1.0]), torch.linspace(0, 2, 5), method="rk4",
                          options={"step_size": 0.1}, throw=False, dense=True)
    assert sol.status == "non_finite" and float(sol.ts[-1]) == 1.0
    end = float(sol.step_times[-1])
    assert 1.0 <= end < 2.0
    inside = torch.linspace(0.0, end, 23, dtype=torch.float64)
    assert torch.isfinite(sol.evaluate(inside)).all()
    with pytest.raises(ValueError, match="outside the solved span"):
        sol.evaluate(1.7)


# --- implicit methods: the derived dense outputs, and steps that land on the outputs -----------------------

def _stiff_problems():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import stiff_problems
    return stiff_problems


@pytest.mark.parametrize("tol", [1e-6, 1e-8, 1e-10])
def test_kvaerno5_interpolated_outputs_meet_the_tolerance(tol):
    """kvaerno5's order-4 continuous extension between its long steps: on y' = -10 y, 41 outputs, the cubic
    Hermite it replaced left 14x / 37x / 78x the tolerance at 1e-6 / 1e-8 / 1e-10 (measured before the change;
    after: 1.49x / 1.67x / 1.31x)."""
    t = torch.linspace(0, 1, 41, dtype=F64)
    sol = neuralode.solve(lambda t, y: -10 * y, torch.ones(1, dtype=F64), t, method="kvaerno5", rtol=tol, atol=tol,
                          options={"land_on_outputs": False}, dense=True)
    exact = torch.exp(-10 * t)[:, None]
    assert len(set(t.tolist()) - set(sol.step_times.tolist())) >= 39   # the outputs do lie between steps
    assert float(((sol.ys - exact).abs() / (tol + tol * exact)).max()) < 2.0


@pytest.mark.parametrize("method", ["kvaerno3", "kvaerno5", "radau5", "rodas5p", "auto"])
def test_stiff_methods_land_on_the_output_times_by_default(method):
    """Every output is a step's end value (as with step_t = the interior outputs, which differs only in that the
    step size restarts after each; the values agree to the tolerance), and land_on_outputs=False interpolates with
    fewer steps."""
    t = torch.linspace(0, 4, 9, dtype=F64)
    field = lambda t, y: torch.stack([y[1], -y[0] - 5 * y[1] * (y[0] ** 2 - 1)])  # noqa: E731
    y0 = torch.tensor([2.0, 0.0], dtype=F64)
    landed = neuralode.solve(field, y0, t, method=method, rtol=1e-6, atol=1e-8, dense=True)
    steps = set(landed.step_times.tolist())
    assert set(t[1:].tolist()) <= steps
    for time, value in zip(t, landed.ys):
        assert torch.equal(landed.evaluate(time), value)
    with_step_t = neuralode.solve(field, y0, t, method=method, rtol=1e-6, atol=1e-8,
                                  options={"step_t": t[1:-1], "land_on_outputs": False})
    torch.testing.assert_close(with_step_t.ys, landed.ys, rtol=1e-4, atol=1e-6)
    interpolated = neuralode.solve(field, y0, t, method=method, rtol=1e-6, atol=1e-8,
                                   options={"land_on_outputs": False})
    assert interpolated.stats["n_accepted"] < landed.stats["n_accepted"]


def test_landing_on_the_outputs_keeps_a_stiff_solve_within_its_tolerance():
    """HIRES (Hairer-Wanner IV.10, 8 species) at rtol 1e-6 with 41 outputs over its span: between kvaerno5's long
    steps the fast species y7, y8 miss the tolerance by almost two orders of magnitude (measured: 77x); with the
    steps landing on the outputs (the default) every output is within a few times the tolerance (3.9x), and so it is
    interpolated between steps whose interpolant is checked (2.4x; ``dense_error_control``, the default)."""
    sp = _stiff_problems()
    problem = sp.hires()
    t = torch.linspace(*problem.t_span, 41, dtype=F64)
    tol = 1e-6
    reference = sp.scipy_reference(problem, t.numpy(), rtol=1e-11)

    def worst(sol):
        return max(sp.mixed_error(y, r, tol, problem.atol(tol)) for y, r in zip(sol.ys.numpy(), reference)) / tol

    landed = neuralode.solve(problem.func, problem.y0, t, method="kvaerno5", rtol=tol, atol=problem.atol_tensor(tol))
    unchecked = neuralode.solve(problem.func, problem.y0, t, method="kvaerno5", rtol=tol, atol=problem.atol_tensor(tol),
                                options={"land_on_outputs": False, "dense_error_control": False})
    checked = neuralode.solve(problem.func, problem.y0, t, method="kvaerno5", rtol=tol, atol=problem.atol_tensor(tol),
                              options={"land_on_outputs": False})
    assert worst(landed) < 5 and worst(unchecked) > 20 and worst(checked) < 5


def test_land_on_outputs_must_be_a_bool():
    with pytest.raises(TypeError, match="'land_on_outputs' must be True or False"):
        neuralode.solve(lambda t, y: -y, Y0, torch.tensor([0.0, 1.0], dtype=F64), method="kvaerno5",
                        options={"land_on_outputs": "yes"})


def test_landing_on_close_outputs_carries_the_step_size_across_them():
    """Pairs of outputs 1e-6 apart: each landing used to restart the controller from the clipped, tiny step
    (kvaerno5 101 steps against 31 interpolating); the step size now carries on across an output, as across a
    state jump (42 steps)."""
    a = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=F64)
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    t = torch.tensor(sorted([0.0] + [k + d for k in range(1, 11) for d in (0.0, 1e-6)]), dtype=F64)
    exact = torch.stack([torch.matrix_exp(a * float(s)) @ y0 for s in t])
    for method in ("kvaerno5", "rodas5p", "radau5"):
        steps = {}
        for land in (False, True):
            sol = neuralode.solve(lambda t, y: y @ a.T, y0, t, method=method, rtol=1e-4, atol=1e-6,
                                  options={"land_on_outputs": land})
            assert (sol.ys - exact).abs().max() < 1e-3
            steps[land] = sol.stats["n_steps"]
        assert steps[True] <= 1.7 * steps[False], (method, steps)


@pytest.mark.parametrize("gap", [5e-324, 1e-310, 1e-300, 1e-16])
@pytest.mark.parametrize("method", ["kvaerno5", "kvaerno3", "rodas5p"])
def test_an_output_within_rounding_of_the_start_is_interpolated_not_landed_on(method, gap):
    """A landing step of subnormal length overflowed the stage derivatives (a NonFiniteError blamed on the field);
    outputs within rounding of the time before them are interpolated, which is exact there to rounding."""
    t = torch.tensor([0.0, gap, 1.0], dtype=F64)
    sol = neuralode.solve(lambda t, y: -y, torch.ones(1, dtype=F64), t, method=method, rtol=1e-6, atol=1e-8)
    assert sol.success
    torch.testing.assert_close(sol.ys[:, 0], torch.exp(-t), rtol=1e-5, atol=0)


def test_odeint_event_does_not_land_on_its_placeholder_end():
    """In event mode the second time is a placeholder: the steps of kvaerno5 are those of a solve that
    interpolates."""
    def event(t, y):
        return y[0] - 0.5

    y0 = torch.tensor([1.0, 0.0], dtype=F64)
    t0 = torch.tensor(0.0, dtype=F64)
    field = lambda t, y: torch.stack([y[1], -y[0]])  # noqa: E731
    default = neuralode.odeint_event(field, y0, t0, event_fn=event, method="kvaerno5", rtol=1e-8, atol=1e-10)
    interpolating = neuralode.odeint_event(field, y0, t0, event_fn=event, method="kvaerno5", rtol=1e-8,
                                           atol=1e-10, options={"land_on_outputs": False})
    assert torch.equal(default[0], interpolating[0]) and torch.equal(default[1], interpolating[1])
    assert abs(float(default[0]) - math.acos(0.5)) < 1e-7


def test_running_out_of_steps_while_landing_says_so():
    t = torch.linspace(0, 1, 61, dtype=F64)
    with pytest.raises(neuralode.MaxStepsError, match="end on each of the 59 output times"):
        neuralode.solve(lambda t, y: -y, torch.ones(2, dtype=F64), t, method="kvaerno5",
                        options={"max_num_steps": 40})


def test_the_adjoint_checks_land_on_outputs_too():
    y0 = torch.ones(2, dtype=F64, requires_grad=True)
    with pytest.raises(TypeError, match="'land_on_outputs' must be True or False"):
        sol = neuralode.solve(lambda t, y: -y, y0, torch.tensor([0.0, 0.5, 1.0], dtype=F64), method="kvaerno5",
                              gradient=neuralode.Adjoint(options={"land_on_outputs": "yes"}))
        sol.ys.sum().backward()


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "dopri8", "bosh3", "kvaerno5", "rk4"])
@pytest.mark.parametrize("backwards", [False, True])
def test_derivative_is_the_field_along_the_solution_and_the_time_gradient(method, backwards):
    # dy/dt of the interpolant approximates func(t, y(t)) to the interpolant's order (diffrax's sol.derivative);
    # a query time that requires grad gets that slope as its gradient (it got none before, silently).
    def field(t, y):
        return torch.stack([y[1], -y[0] + 0.1 * torch.sin(t)])

    span = torch.tensor([3.0, 0.0] if backwards else [0.0, 3.0], dtype=torch.float64)
    options = {"step_size": 1e-3, "interp": "cubic"} if method == "rk4" else {}
    tol = 1e-6 if method in ("bosh3", "kvaerno5") else 1e-10
    solution = neuralode.solve(field, torch.tensor([1.0, 0.0], dtype=torch.float64), span, method=method,
                               dense=True, rtol=tol, atol=tol, options=options)
    times = torch.linspace(0.0, 3.0, 23, dtype=torch.float64)
    slopes = solution.derivative(times)
    along = torch.stack([field(t, y) for t, y in zip(times, solution.evaluate(times))])
    assert slopes.shape == (23, 2)
    torch.testing.assert_close(slopes, along, rtol=0, atol=3e3 * tol if method != "rk4" else 1e-6)
    query = times.clone().requires_grad_(True)
    (solution.evaluate(query) * torch.tensor([1.0, -2.0], dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(query.grad, slopes @ torch.tensor([1.0, -2.0], dtype=torch.float64), rtol=1e-12,
                               atol=1e-12)
    # central differences of the interpolant itself, inside one step
    h = 1e-6
    inner = torch.tensor([0.77, 1.91], dtype=torch.float64)
    difference = (solution.evaluate(inner + h) - solution.evaluate(inner - h)) / (2 * h)
    torch.testing.assert_close(solution.derivative(inner), difference, rtol=0, atol=1e-6)


def test_derivative_of_a_linear_solution_and_errors():
    solution = neuralode.solve(lambda t, y: torch.ones_like(y), torch.zeros(3, dtype=torch.float64),
                               torch.tensor([0.0, 2.0], dtype=torch.float64), dense=True)
    torch.testing.assert_close(solution.derivative(torch.tensor([0.0, 0.5, 2.0])),
                               torch.ones(3, 3, dtype=torch.float64), rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match="outside the solved span"):
        solution.derivative(3.0)
    with pytest.raises(ValueError, match="no dense output"):
        neuralode.solve(lambda t, y: -y, torch.ones(1), torch.tensor([0.0, 1.0])).derivative(0.5)
    one_time = neuralode.solve(lambda t, y: -y, torch.ones(1), torch.tensor([0.0]), dense=True)
    with pytest.raises(ValueError, match="has no derivative"):
        one_time.derivative(0.0)
