"""IMEX methods (kencarp3/4/5) on a SplitField: the data, the orders, stiffness, gradients and the errors."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import neuralode
from neuralode.tableaus.additive import ADDITIVE_TABLEAUS, KENCARP5, AdditiveTableau
from neuralode.tableaus.implicit import stability_function
from neuralode.tableaus.order_conditions import additive_satisfied_order, satisfied_order

IMEX = tuple(ADDITIVE_TABLEAUS)
DENSE_ORDER = {"kencarp3": 2, "kencarp4": 3, "kencarp5": 3}
D = torch.float64


# --- a non-stiff split problem: both terms nonlinear and time-dependent --------------------------------------------
def explicit_term(t, y):
    return torch.stack([-y[1] + 0.1 * torch.sin(t), 0.5 * y[0] * torch.cos(y[1])])


def implicit_term(t, y):
    return torch.stack([-2.0 * y[0] + 0.25 * y[1] ** 2, -y[1] + t])


def _reference(y0, t_end, stiff=False):
    def f(t, y):
        tt, yy = torch.tensor(t, dtype=D), torch.tensor(y, dtype=D)
        return (explicit_term(tt, yy) + implicit_term(tt, yy)).numpy()
    return solve_ivp(f, (0.0, t_end), y0, method="Radau" if stiff else "DOP853", rtol=1e-13, atol=1e-13,
                     dense_output=True).sol


def _pinned(h):
    """Steps of exactly h, each accepted (min_step = max_step = h, forced), with Newton converged to a tight
    tolerance."""
    return dict(rtol=1e-12, atol=1e-12, options={"first_step": h, "max_step": h, "min_step": h, "force_min_step": True})


# --- the data ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", IMEX)
def test_each_term_and_the_coupling_meet_the_claimed_order(name):
    pair = ADDITIVE_TABLEAUS[name]
    explicit, implicit, b = np.array(pair.a_explicit), np.array(pair.a_implicit), np.array(pair.b)
    assert satisfied_order(explicit, b, pair.order + 1)[0] == pair.order
    assert satisfied_order(implicit, b, pair.order + 1)[0] == pair.order
    assert additive_satisfied_order((explicit, implicit), (b, b), pair.order + 1)[0] == pair.order
    embedded = b - np.array(pair.b_err)
    assert additive_satisfied_order((explicit, implicit), (embedded, embedded), pair.error_order)[0] == pair.error_order
    # the dense output reproduces the step's end, and is of its order at every theta (each term, and coupled)
    dense = np.array(pair.dense)
    np.testing.assert_allclose(dense.sum(axis=1), b, atol=1e-12)


@pytest.mark.parametrize("name", IMEX)
def test_the_implicit_term_is_l_stable(name):
    tableau = ADDITIVE_TABLEAUS[name].implicit
    assert tableau.stiffly_accurate and tableau.structure == "esdirk"
    on_axis = stability_function(tableau, 1j * np.logspace(-3, 6, 400))
    assert np.abs(on_axis).max() <= 1 + 1e-12
    left = stability_function(tableau, -np.logspace(-3, 3, 400) + 0j)
    assert np.abs(left).max() <= 1 + 1e-12
    assert abs(stability_function(tableau, -1e9)) < 1e-6


def test_a_wrong_coefficient_is_refused():
    # diffrax 0.7.2 writes one of kencarp5's implicit coefficients as -4269925059573 / 7827059040719; the paper's (and
    # PETSc's) denominator is 7827059040749. The stage's row then misses its time by 2e-12: refused.
    rows = [list(row) for row in KENCARP5.a_implicit]
    rows[6][5] = -4269925059573 / 7827059040719
    with pytest.raises(ValueError, match="row 6 of a sums"):
        AdditiveTableau("typo", c=KENCARP5.c, a_explicit=KENCARP5.a_explicit, a_implicit=rows, b=KENCARP5.b,
                        order=5, b_err=KENCARP5.b_err, error_order=4)
    # Moving weight between two entries of an explicit row keeps its sum (c) but breaks the coupling conditions.
    explicit = [list(row) for row in KENCARP5.a_explicit]
    explicit[4][0] += 1e-3
    explicit[4][2] -= 1e-3
    with pytest.raises(ValueError, match="additive order conditions only up to order"):
        AdditiveTableau("moved", c=KENCARP5.c, a_explicit=explicit, a_implicit=KENCARP5.a_implicit, b=KENCARP5.b,
                        order=5, b_err=KENCARP5.b_err, error_order=4)


# --- orders, measured ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", IMEX)
def test_convergence_order_on_a_split_problem(name):
    pair = ADDITIVE_TABLEAUS[name]
    field = neuralode.SplitField(explicit_term, implicit_term)
    y0 = torch.tensor([1.0, 0.5], dtype=D)
    exact = _reference(y0.numpy(), 1.0)(1.0)
    steps = (8, 16, 32)   # (powers of two: the pinned steps add up to the span exactly)
    errors = []
    for n in steps:
        sol = neuralode.solve(field, y0, torch.tensor([0.0, 1.0], dtype=D), method=name, **_pinned(1.0 / n))
        assert sol.stats["n_accepted"] == n
        errors.append(np.abs(sol.ys[-1].numpy() - exact).max())
    slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert abs(-slope - pair.order) < 0.3, (name, errors, slope)


@pytest.mark.parametrize("name", IMEX)
def test_dense_output_order(name):
    field = neuralode.SplitField(explicit_term, implicit_term)
    y0 = torch.tensor([1.0, 0.5], dtype=D)
    exact = _reference(y0.numpy(), 1.0)
    errors = []
    steps = (8, 16, 32)
    for n in steps:
        sol = neuralode.solve(field, y0, torch.tensor([0.0, 1.0], dtype=D), method=name, dense=True, **_pinned(1.0 / n))
        middles = (np.arange(n) + 0.37) / n
        errors.append(max(np.abs(sol.evaluate(torch.tensor(m, dtype=D)).numpy() - exact(m)).max() for m in middles))
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert slope > min(DENSE_ORDER[name] + 1, ADDITIVE_TABLEAUS[name].order) - 0.3, (name, errors, slope)


# --- stiffness: Newton sees the implicit term only -----------------------------------------------------------------
def _stiff_field(rate=1e6):
    # y' = cos t - 0.05 sin(y) (explicit) - rate (y - sin t) (implicit): a slow manifold near sin t
    return neuralode.SplitField(explicit=lambda t, y: torch.cos(t) - 0.05 * torch.sin(y),
                                implicit=lambda t, y: -rate * (y - torch.sin(t)))


@pytest.mark.parametrize("name", IMEX)
@pytest.mark.parametrize("rtol", [1e-4, 1e-7])
def test_stiff_problem_within_tolerance_in_few_steps(name, rtol):
    field = _stiff_field()
    y0 = torch.tensor([0.0, 0.3], dtype=D)
    t = torch.linspace(0, 3, 7, dtype=D)

    def f(tt, yy):
        return field(torch.tensor(tt, dtype=D), torch.tensor(yy, dtype=D)).numpy()
    reference = solve_ivp(f, (0.0, 3.0), y0.numpy(), method="Radau", t_eval=t.numpy(), rtol=1e-12, atol=1e-14).y.T
    sol = neuralode.solve(field, y0, t, method=name, rtol=rtol, atol=rtol * 1e-2)
    assert sol.status == "success"
    error = np.abs(sol.ys.numpy() - reference).max()
    assert error < 30 * rtol, (name, error)
    # an explicit method would need about 2e6 steps here (|h lambda| < 3.3 over a span of 3)
    assert sol.stats["n_accepted"] < 3000


def test_the_explicit_term_is_never_differentiated_and_evaluated_once_a_stage():
    calls = {"explicit": 0}

    def explicit(t, y):
        calls["explicit"] += 1
        assert not y.requires_grad
        return torch.cos(t) - 0.05 * torch.sin(y)
    field = neuralode.SplitField(explicit, lambda t, y: -1e4 * (y - torch.sin(t)))
    sol = neuralode.solve(field, torch.tensor([0.0, 0.3], dtype=D), torch.linspace(0, 2, 5, dtype=D),
                          method="kencarp4", rtol=1e-6, atol=1e-8)
    stats = sol.stats
    assert stats["n_newton_failures"] == 0
    stages = ADDITIVE_TABLEAUS["kencarp4"].stages
    # one evaluation at each accepted step's start (a rejected step reuses its start's), one per later stage of each
    # attempt; the solve's first evaluation of the whole field (the input check) calls both terms once
    assert stats["nfe_explicit"] == stats["n_steps"] * (stages - 1) + stats["n_accepted"]
    # the rest of nfe: the whole field's evaluations outside the steps (the input check, the first step's choice)
    whole = stats["nfe"] - stats["nfe_explicit"] - stats["nfe_implicit"]
    assert 1 <= whole <= 3
    assert calls["explicit"] == stats["nfe_explicit"] + whole


def test_the_user_jacobian_is_the_implicit_terms():
    # (an explicit term whose Jacobian is not small next to the implicit one's: a check against the whole field
    # refused the right J and accepted the whole field's)
    rate = 100.0
    field = neuralode.SplitField(explicit=lambda t, y: torch.sin(y), implicit=lambda t, y: -rate * (y - torch.sin(t)))
    y0 = torch.tensor([0.0, 0.3], dtype=D)
    t = torch.linspace(0, 1, 3, dtype=D)
    plain = neuralode.solve(field, y0, t, method="kencarp4", rtol=1e-6)
    given = neuralode.solve(field, y0, t, method="kencarp4", rtol=1e-6,
                            options={"jac": lambda t, y: -rate * torch.eye(2, dtype=D)})
    torch.testing.assert_close(given.ys, plain.ys, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="option 'jac' disagrees"):
        neuralode.solve(field, y0, t, method="kencarp4", options={"jac": lambda t, y: -2 * rate * torch.eye(2, dtype=D)})
    with pytest.raises(ValueError, match="option 'jac' disagrees"):   # the whole field's J is not the implicit term's
        neuralode.solve(field, y0, t, method="kencarp4",
                        options={"jac": lambda t, y: torch.diag(torch.cos(y)) - rate * torch.eye(2, dtype=D)})
    # with any other method jac is the whole field's
    neuralode.solve(field, y0, t, method="kvaerno4",
                    options={"jac": lambda t, y: torch.diag(torch.cos(y)) - rate * torch.eye(2, dtype=D)})


# --- inputs ------------------------------------------------------------------------------------------------------------
def test_other_methods_solve_the_sum():
    field = neuralode.SplitField(explicit_term, implicit_term)
    y0 = torch.tensor([1.0, 0.5], dtype=D)
    t = torch.linspace(0, 1, 4, dtype=D)
    split = neuralode.solve(field, y0, t, method="dopri5", rtol=1e-8)
    whole = neuralode.solve(lambda t, y: explicit_term(t, y) + implicit_term(t, y), y0, t, method="dopri5", rtol=1e-8)
    assert torch.equal(split.ys, whole.ys)


def test_tuple_states_and_args_match_the_flat_solve():
    def explicit(t, y, k):
        u, v = y
        return (-v + 0.1 * torch.sin(t), k * u * torch.cos(v))

    def implicit(t, y, k):
        u, v = y
        return (-2.0 * u + 0.25 * v ** 2, -v + t)
    y0 = (torch.tensor(1.0, dtype=D), torch.tensor(0.5, dtype=D))
    t = torch.linspace(0, 1, 5, dtype=D)
    # (the same steps: a tuple state's error norm is the largest of its tensors', a flat state's their RMS)
    tuple_sol = neuralode.solve(neuralode.SplitField(explicit, implicit), y0, t, method="kencarp4",
                                args=torch.tensor(0.5, dtype=D), **_pinned(0.125))
    flat = neuralode.solve(neuralode.SplitField(explicit_term, implicit_term), torch.stack(y0), t, method="kencarp4",
                           **_pinned(0.125))
    torch.testing.assert_close(torch.stack(tuple_sol.ys, dim=-1), flat.ys, rtol=1e-12, atol=1e-14)


def test_events_are_located_on_the_dense_output():
    # y' = cos t - 100 (y - sin t), y(0) = 0: y = sin t; y = 1/2 at t = pi/6
    field = neuralode.SplitField(lambda t, y: torch.cos(t) * torch.ones_like(y), lambda t, y: -100.0 * (y - torch.sin(t)))
    sol = neuralode.solve(field, torch.zeros(1, dtype=D), torch.tensor([0.0, 2.0], dtype=D), method="kencarp4",
                          rtol=1e-9, atol=1e-12, events=[neuralode.Event(lambda t, y: y[0] - 0.5, terminal=True)])
    assert sol.event_t is not None
    assert abs(float(sol.event_t) - math.pi / 6) < 1e-8


def test_a_jump_in_the_explicit_term():
    # y' = s(t) - 50 y, s = 1 before t = 1/2 and -1 after it, y(0) = 0
    field = neuralode.SplitField(lambda t, y: torch.where(t < 0.5, 1.0, -1.0) * torch.ones_like(y),
                                 lambda t, y: -50.0 * y)
    t = torch.tensor([0.0, 1.0], dtype=D)
    sol = neuralode.solve(field, torch.zeros(1, dtype=D), t, method="kencarp4", rtol=1e-9, atol=1e-12,
                          options={"jump_t": [0.5]})
    at_jump = (1 - math.exp(-25)) / 50
    exact = at_jump * math.exp(-25) - (1 - math.exp(-25)) / 50
    assert abs(float(sol.ys[-1, 0]) - exact) < 1e-9


def test_float32():
    field = _stiff_field(1e4)
    sol = neuralode.solve(field, torch.tensor([0.0, 0.3]), torch.linspace(0, 1, 3), method="kencarp4", rtol=1e-5)
    assert sol.ys.dtype == torch.float32 and sol.status == "success"
    np.testing.assert_allclose(sol.ys[-1].numpy(), np.sin(1.0), atol=1e-3)


def test_refusals_say_what_to_do():
    y0 = torch.ones(2, dtype=D)
    t = torch.tensor([0.0, 1.0], dtype=D)
    with pytest.raises(ValueError, match="SplitField"):
        neuralode.solve(lambda t, y: -y, y0, t, method="kencarp4")
    with pytest.raises(TypeError, match="explicit"):
        neuralode.SplitField(explicit=3, implicit=lambda t, y: -y)
    bad_shape = neuralode.SplitField(lambda t, y: torch.zeros(1, dtype=D), lambda t, y: -y)
    with pytest.raises(ValueError, match="explicit term returned shape"):
        neuralode.solve(bad_shape, y0, t, method="kencarp4")
    bad_dtype = neuralode.SplitField(lambda t, y: -y, lambda t, y: (-y).float())
    with pytest.raises(ValueError, match="implicit term returned"):
        neuralode.solve(bad_dtype, y0, t, method="kencarp4")
    field = neuralode.SplitField(lambda t, y: -y, lambda t, y: -y)
    with pytest.raises(ValueError, match="compile=True"):
        neuralode.solve(field, y0, t, method="kencarp4", compile=True)
    with pytest.raises(ValueError, match="steps the backward solve on the terms"):
        neuralode.solve(lambda t, y: -y, y0.requires_grad_(), t, method="dopri5",
                        gradient=neuralode.Adjoint(method="kencarp4"))


# --- gradients -----------------------------------------------------------------------------------------------------
class _Terms(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
        self.rate = torch.nn.Parameter(torch.tensor(40.0, dtype=D))

    def explicit(self, t, y):
        return self.net(y)

    def implicit(self, t, y):
        return -self.rate * (y - torch.sin(t))


def _loss(terms, y0, gradient, name="kencarp4", **settings):
    field = neuralode.SplitField(terms.explicit, terms.implicit)
    sol = neuralode.solve(field, y0, torch.linspace(0, 1, 4, dtype=D), method=name, gradient=gradient,
                          adjoint_params=tuple(terms.parameters()), **settings)
    return (sol.ys ** 2).sum()


@pytest.mark.parametrize("name", IMEX)
def test_direct_gradient_matches_finite_differences(name):
    terms = _Terms()
    y0 = torch.tensor([0.5, -0.3], dtype=D, requires_grad=True)
    settings = _pinned(0.05)
    loss = _loss(terms, y0, "direct", name, **settings)
    params = [y0, terms.rate, terms.net[0].weight]
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for param, grad in zip(params, grads):
            for index in [(0,), (1,)] if param.ndim == 1 else ([()] if param.ndim == 0 else [(0, 1), (3, 0)]):
                step = 1e-6
                original = param[index].item()
                param[index] = original + step
                plus = _loss(terms, y0, "direct", name, **settings).item()
                param[index] = original - step
                minus = _loss(terms, y0, "direct", name, **settings).item()
                param[index] = original
                numeric = (plus - minus) / (2 * step)
                assert abs(grad[index].item() - numeric) <= 1e-6 * max(1.0, abs(numeric)), (name, index)


def test_checkpoint_and_adjoint_agree_with_direct():
    terms = _Terms()
    y0 = torch.tensor([0.5, -0.3], dtype=D, requires_grad=True)
    params = [y0, *terms.parameters()]
    settings = dict(rtol=1e-9, atol=1e-11)
    direct = torch.autograd.grad(_loss(terms, y0, "direct", **settings), params)
    checkpoint = torch.autograd.grad(_loss(terms, y0, "checkpoint", **settings), params)
    for d, c in zip(direct, checkpoint):
        torch.testing.assert_close(c, d, rtol=1e-10, atol=1e-12)
    # the backward solve on the augmented terms (the default), and with y(t) from the forward dense output
    for strategy in (neuralode.Adjoint(), neuralode.Adjoint(interpolate=True)):
        adjoint = torch.autograd.grad(_loss(terms, y0, strategy, **settings), params)
        for d, a in zip(direct, adjoint):
            torch.testing.assert_close(a, d, rtol=1e-5, atol=1e-7)


def test_the_adjoint_steps_back_on_the_terms():
    # By default the backward solve is the forward IMEX method on the augmented terms: its Newton iteration sees the
    # implicit term's augmented Jacobian only, and the explicit term (the network) is evaluated once per stage.
    calls = {"explicit": 0}
    terms = _Terms()

    def explicit(t, y):
        calls["explicit"] += 1
        return terms.net(y)
    field = neuralode.SplitField(explicit, terms.implicit)
    y0 = torch.tensor([0.5, -0.3], dtype=D, requires_grad=True)
    sol = neuralode.solve(field, y0, torch.linspace(0, 1, 4, dtype=D), method="kencarp4", gradient="adjoint",
                          adjoint_params=tuple(terms.parameters()), rtol=1e-8)
    forward_calls = calls["explicit"]
    (sol.ys ** 2).sum().backward()
    backward_calls = calls["explicit"] - forward_calls
    assert 0 < backward_calls < sol.stats["nfe_backward"]


def test_split_field_registers_its_terms_parameters():
    terms = _Terms()
    field = neuralode.SplitField(terms.net, lambda t, y: -terms.rate * y)
    assert {id(p) for p in field.parameters()} == {id(p) for p in terms.net.parameters()}


# --- the QA round's cases (/tmp/qa60) ------------------------------------------------------------------------------
def test_plain_terms_closing_over_learnable_tensors_are_not_left_without_a_gradient():
    k = torch.tensor(3.0, dtype=D, requires_grad=True)
    y0 = torch.tensor([1.0], dtype=D, requires_grad=True)
    field = neuralode.SplitField(lambda t, y: torch.sin(y), lambda t, y: -k * y)
    t = torch.tensor([0.0, 1.0], dtype=D)
    for gradient in ("adjoint", "checkpoint"):
        with pytest.raises(ValueError, match="implicit term is a plain function.*uses k"):
            neuralode.solve(field, y0, t, method="kencarp4", gradient=gradient)
    grads = {}
    for gradient in ("direct", "adjoint", "checkpoint"):
        sol = neuralode.solve(field, y0, t, method="kencarp4", gradient=gradient, adjoint_params=(k,), rtol=1e-10,
                              atol=1e-12)
        grads[gradient] = torch.autograd.grad(sol.ys[-1].sum(), (y0, k))
    for gradient in ("adjoint", "checkpoint"):
        for got, want in zip(grads[gradient], grads["direct"]):
            torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)


def test_a_terms_mistakes_are_named():
    y0 = torch.ones(2, dtype=D)
    t = torch.tensor([0.0, 1.0], dtype=D)
    with pytest.raises(TypeError, match="terms returned different structures"):
        neuralode.solve(neuralode.SplitField(lambda t, y: (y,), lambda t, y: -y), y0, t, method="kencarp4")
    with pytest.raises(TypeError, match="explicit term returned ndarray"):
        neuralode.solve(neuralode.SplitField(lambda t, y: y.numpy(), lambda t, y: -y), y0, t, method="dopri5")
    with pytest.raises(TypeError, match="explicit term is called as explicit\\(t, y, args\\)"):
        neuralode.solve(neuralode.SplitField(lambda t, y: y, lambda t, y, a: -y), y0, t, method="kencarp4", args=1.0)
    from neuralode.nn import ODEBlock
    with pytest.raises(ValueError, match="regularisers .* needs the SplitField itself"):
        ODEBlock(neuralode.SplitField(lambda t, y: y, lambda t, y: -y), method="kencarp4", kinetic=True)
