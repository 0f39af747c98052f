"""Methods and step-size controllers given as objects (issue 11 item 3): a tableau or Solver instance as
``method``, an IntegralController / PIController / PIDController as ``controller``. Each must take exactly the
steps its string/options counterpart takes, through every gradient strategy."""

import math

import pytest
import torch

import neuralode
from neuralode import IntegralController, PIController, PIDController, solve
from neuralode.solvers import ExplicitRungeKutta, Solver
from neuralode.tableaus import TABLEAUS, ButcherTableau

f64 = torch.float64


def vdp(t, y):
    return torch.stack([y[1], 5.0 * (1 - y[0] ** 2) * y[1] - y[0]])


Y0 = torch.tensor([2.0, 0.0], dtype=f64)
T = torch.linspace(0, 6, 20, dtype=f64)


def same(a, b):
    assert a.stats["n_steps"] == b.stats["n_steps"] and a.stats["nfe"] == b.stats["nfe"]
    torch.testing.assert_close(a.ys, b.ys, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["dopri5", "tsit5", "bosh3", "dopri8", "adaptive_heun"])
def test_a_tableau_or_stepper_object_takes_the_named_methods_steps(name):
    # (the second-order adaptive_heun at 1e-6 took 16 s for the same comparison)
    tol = dict(rtol=1e-4, atol=1e-6) if name == "adaptive_heun" else dict(rtol=1e-6, atol=1e-8)
    by_name = solve(vdp, Y0, T, method=name, **tol)
    same(solve(vdp, Y0, T, method=TABLEAUS[name], **tol), by_name)
    same(solve(vdp, Y0, T, method=ExplicitRungeKutta(TABLEAUS[name]), **tol), by_name)


def test_a_users_own_tableau_converges_at_its_order():
    # Ralston's second-order method (Ralston 1962): c = (0, 2/3), b = (1/4, 3/4); not in METHODS.
    ralston = ButcherTableau("ralston2", c=(0.0, 2 / 3), a=((), (2 / 3,)), b=(0.25, 0.75), order=2)
    assert "ralston2" not in neuralode.METHODS
    errors = []
    for h in (0.04, 0.02, 0.01):
        ys = solve(lambda t, y: -y + torch.sin(t), torch.tensor([1.0], dtype=f64), torch.tensor([0.0, 2.0], dtype=f64),
                   method=ralston, options={"step_size": h}).ys[-1]
        exact = 1.5 * math.exp(-2.0) + 0.5 * (math.sin(2.0) - math.cos(2.0))
        errors.append(abs(float(ys[0]) - exact))
    orders = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(1.9 < p < 2.15 for p in orders), orders


def test_an_inconsistent_tableau_fails_when_built():
    with pytest.raises(ValueError, match="weights b sum to"):
        ButcherTableau("bad", c=(0.0, 0.5), a=((), (0.5,)), b=(0.5, 0.6), order=2)


def test_a_method_object_goes_through_every_gradient_strategy():
    p = torch.tensor(0.7, dtype=f64)

    def field(t, y):
        return -p * y

    results = {}
    for gradient in ("direct", "checkpoint", "adjoint", neuralode.Adjoint(interpolate=True)):
        q = p.clone().requires_grad_()
        sol = solve(lambda t, y: -q * y, torch.ones(2, dtype=f64), T, method=TABLEAUS["tsit5"], gradient=gradient,
                    adjoint_params=[q], rtol=1e-9, atol=1e-10)
        sol.ys.sum().backward()
        results[str(gradient)] = float(q.grad)
    exact = float(sum(-2 * t * math.exp(-0.7 * t) for t in T.tolist()))
    for name, value in results.items():
        assert abs(value - exact) < 1e-6 * abs(exact), (name, value, exact)
    # The adjoint's backward method can be an object too.
    q = p.clone().requires_grad_()
    solve(lambda t, y: -q * y, torch.ones(2, dtype=f64), T, gradient=neuralode.Adjoint(method=TABLEAUS["dopri5"]),
          adjoint_params=[q], rtol=1e-9, atol=1e-10).ys.sum().backward()
    assert abs(float(q.grad) - exact) < 1e-6 * abs(exact)


def test_something_else_as_method_is_a_type_error():
    with pytest.raises(TypeError, match="method must be a name .*ButcherTableau.*Solver instance, got object"):
        solve(vdp, Y0, T, method=object())


@pytest.mark.parametrize("controller, options", [
    (IntegralController(), {}),
    (IntegralController(safety=0.8, max_step=0.2, first_step=0.01, dfactor=0.3), {
        "safety": 0.8, "max_step": 0.2, "first_step": 0.01, "dfactor": 0.3}),
    (PIController(), {"controller": "pi"}),
    (PIDController(pcoeff=0.4, icoeff=0.3), {"controller": "pid", "pcoeff": 0.4, "icoeff": 0.3}),
    (PIDController(pcoeff=0.2, icoeff=0.4, dcoeff=0.1, min_step=1e-3), {
        "controller": "pid", "pcoeff": 0.2, "icoeff": 0.4, "dcoeff": 0.1, "min_step": 1e-3}),
])
def test_a_controller_object_takes_its_options_steps(controller, options):
    same(solve(vdp, Y0, T, controller=controller, rtol=1e-6, atol=1e-6),
         solve(vdp, Y0, T, options=options, rtol=1e-6, atol=1e-6))


def test_the_adjoint_backward_solve_uses_the_forward_controller_object():
    def run(**kwargs):
        q = torch.tensor(5.0, dtype=f64, requires_grad=True)
        sol = solve(lambda t, y: torch.stack([y[1], q * (1 - y[0] ** 2) * y[1] - y[0]]), Y0, T, gradient="adjoint",
                    adjoint_params=[q], rtol=1e-6, atol=1e-6, **kwargs)
        sol.ys.square().sum().backward()
        return sol.stats, float(q.grad)

    stats_object, grad_object = run(controller=PIDController(pcoeff=0.4, icoeff=0.3))
    stats_options, grad_options = run(options={"controller": "pid", "pcoeff": 0.4, "icoeff": 0.3})
    stats_default, _ = run()
    assert stats_object == stats_options and grad_object == grad_options
    assert stats_object["nfe_backward"] != stats_default["nfe_backward"]   # the PID rule did reach the backward solve


def test_per_sample_stepping_takes_a_controller_object():
    y0 = torch.tensor([[2.0, 0.0], [1.0, 0.5]], dtype=f64)

    def batch(t, y):
        return torch.stack([y[:, 1], 5.0 * (1 - y[:, 0] ** 2) * y[:, 1] - y[:, 0]], dim=1)

    a = solve(batch, y0, T, per_sample=True, controller=PIController(max_step=0.3))
    b = solve(batch, y0, T, per_sample=True, options={"controller": "pi", "max_step": 0.3})
    torch.testing.assert_close(a.ys, b.ys, rtol=0, atol=0)
    assert torch.equal(a.stats["n_steps"], b.stats["n_steps"])


@pytest.mark.parametrize("kwargs, error, match", [
    ({"controller": PIController(), "options": {"max_step": 0.1}}, ValueError, r"\['max_step'\] configure step-size"),
    ({"controller": PIController(), "method": "rk4", "options": {"step_size": 0.1}}, ValueError, "takes fixed steps"),
    ({"controller": "pi"}, TypeError, "controller must be an IntegralController"),
    ({"controller": IntegralController(), "rtol": 0.0, "atol": 0.0}, ValueError, "rtol and atol are both zero"),
])
def test_bad_controller_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        solve(vdp, Y0, T, **kwargs)


@pytest.mark.parametrize("settings, match", [
    ({"safety": 2.0}, r"'safety'=2.0 must be in \(0, 1\]"),
    ({"dfactor": 0.0}, "dfactor <= 1 \\(and > 0\\)"),
    ({"ifactor": 0.5}, "ifactor >= 1"),
    ({"min_step": 0.5, "max_step": 0.1}, "min_step <= max_step"),
    ({"max_num_steps": 0}, "max_num_steps must be a positive integer"),
    ({"first_step": -1.0}, "first_step must be a finite number > 0"),
    ({"safety": "high"}, "'safety' must be a number"),
])
def test_controller_settings_are_checked_when_built(settings, match):
    with pytest.raises((ValueError, TypeError), match=match):
        PIDController(**settings)


def test_stepper_objects_are_solvers():
    assert isinstance(ExplicitRungeKutta(TABLEAUS["rk4"]), Solver)
